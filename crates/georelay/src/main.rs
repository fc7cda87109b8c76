//! `georelay`: the one binary. Thin: it parses the command line and the
//! environment, picks concrete backends and hands over to the library crates.
//!
//! Exit codes: 0 success; 1 error; 2 usage (from clap, or a setting out
//! of range); 3 the thing already
//! exists; 4 the thing named does not exist; 69 the database is unreachable.
//! Errors are printed as one line on stderr, never as a panic or debug dump.

mod admin;
mod agent;
#[cfg(feature = "chaos")]
mod chaos;
mod cli;
mod config;
mod service;
mod table;

use clap::Parser;
use georelay_store::{ErrorKind, StoreError};
use std::process::ExitCode;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(match cli.command {
        Command::Ingest(_)
        | Command::Drain(_)
        | Command::Rollup(_)
        | Command::Console(_)
        | Command::Agent(_) => "info,async_nats=warn",
        _ => "warn",
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => {
            let pool = config::database().await?;
            georelay_store::migrate(&pool).await?;
            println!(
                "migrations up to date ({} known)",
                georelay_store::MIGRATOR.iter().count()
            );
            Ok(())
        }
        Command::Admin(cmd) => admin::run(cmd).await,
        Command::Ingest(args) => service::ingest(args).await,
        Command::Drain(args) => service::drain(args).await,
        Command::Rollup(args) => service::rollup(args).await,
        Command::Console(args) => service::console(args).await,
        Command::Agent(cmd) => agent::run(cmd).await,
        #[cfg(feature = "chaos")]
        Command::Chaos(cli::ChaosCmd::Drill(args)) => chaos::drill(args).await,
    }
}

/// Logs go to stderr, so command output on stdout stays clean for scripts.
/// `RUST_LOG` overrides the default level (warn for the CLI, info for the
/// services).
fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The error and its causes on one line, stopping once the line carries the
/// innermost cause's words (the store's errors already name their database
/// error in plain words and keep it as the source: it is not repeated).
fn one_line(e: &anyhow::Error) -> String {
    let root = e.root_cause().to_string();
    let mut line = String::new();
    for cause in e.chain() {
        if !line.is_empty() {
            if line.contains(&root) {
                break;
            }
            line.push_str(": ");
        }
        line.push_str(&cause.to_string());
    }
    line
}

fn exit_code(e: &anyhow::Error) -> u8 {
    // A setting out of range is a usage error, like clap's.
    if e.downcast_ref::<georelay_core::ConfigError>().is_some() {
        return 2;
    }
    match e.downcast_ref::<StoreError>().map(StoreError::kind) {
        Some(ErrorKind::AlreadyExists) => 3,
        Some(ErrorKind::NotFound) => 4,
        Some(ErrorKind::Unavailable) => 69,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    /// Like the store's errors: the message carries its source's words.
    #[derive(Debug)]
    struct Says(std::io::Error);

    impl std::fmt::Display for Says {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot connect: {}", self.0)
        }
    }

    impl std::error::Error for Says {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn one_line_names_each_cause_once() {
        let refused = || std::io::Error::other("connection refused");
        let plain = anyhow::Error::new(refused()).context("cannot open the ledger");
        assert_eq!(
            one_line(&plain),
            "cannot open the ledger: connection refused"
        );
        let says = anyhow::Error::new(Says(refused()));
        assert_eq!(one_line(&says), "cannot connect: connection refused");
        let both = anyhow::Error::new(Says(refused())).context("migrate");
        assert_eq!(
            one_line(&both),
            "migrate: cannot connect: connection refused"
        );
    }
}
