//! The long-running services: parse and check their configuration, build,
//! serve until SIGTERM or SIGINT, then shut down within the grace.

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::{DrainArgs, IngestArgs};
use crate::config;

pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let master = config::master_key()?;
    let defaults = georelay_ingest::Config::default();
    let ingest = georelay_ingest::Config {
        publish_deadline: args.publish_deadline,
        request_deadline: args.request_deadline,
        breaker: georelay_ingest::BreakerConfig {
            slow: args.breaker_slow,
            ..defaults.breaker.clone()
        },
        failover_cooldown: args.failover_cooldown,
        lease: args.lease,
        heartbeat_interval: (args.lease / 5).max(std::time::Duration::from_millis(100)),
        poll_interval: args.poll_interval,
        max_concurrent_requests: args.max_concurrent_requests.max(1),
        ..defaults
    };
    anyhow::ensure!(
        ingest.request_deadline > ingest.publish_deadline,
        "--request-deadline must be longer than --publish-deadline"
    );
    let pool = config::database_with(16).await?;
    georelay_store::control::check_master_key(&pool, &master).await?;
    let listener = bind(&args.listen).await?;
    georelay_ingest::run(ingest, pool, master, listener, shutdown_on_signal()).await?;
    Ok(())
}

pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let master = config::master_key()?;
    let defaults = georelay_drain::Config::default();
    anyhow::ensure!(
        (1..=10_000).contains(&args.batch_size),
        "--batch-size must be between 1 and 10000"
    );
    let drain = georelay_drain::Config {
        batch_size: args.batch_size,
        lease: args.lease,
        standby_poll: (args.lease / 5).max(std::time::Duration::from_millis(100)),
        publish_deadline: args.publish_deadline,
        seal_grace: args.publish_deadline + args.ingest_lease,
        declare_trouble_after: args.declare_trouble_after,
        failover_cooldown: args.failover_cooldown,
        // A broker call never outlasts half the lease, so a slow region
        // cannot make the worker lose its lease between renewals.
        limits: georelay_transport::Limits {
            publish_deadline: args.publish_deadline,
            request_deadline: (args.lease / 2).min(defaults.limits.request_deadline),
        },
        ..defaults
    };
    let pool = config::database_with(8).await?;
    georelay_store::control::check_master_key(&pool, &master).await?;
    let listener = bind(&args.listen).await?;
    georelay_drain::run(drain, pool, master, listener, shutdown_on_signal()).await?;
    Ok(())
}

/// Binds `listen` and prints the one line on stdout: `listening on ADDR`
/// (the actual port when 0 was asked; tests read it).
async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    shutdown
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
