//! The long-running services: parse and check their configuration, build,
//! serve until SIGTERM or SIGINT, then shut down within the grace.

use anyhow::Context as _;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::cli::{ConsoleArgs, DrainArgs, IngestArgs, RollupArgs};
use crate::config;

pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let ingest = georelay_ingest::Config::new(georelay_ingest::Settings {
        publish_deadline: args.publish_deadline,
        request_deadline: args.request_deadline,
        breaker_slow: args.breaker_slow,
        failover_cooldown: args.failover_cooldown,
        lease: args.lease,
        poll_interval: args.poll_interval,
        max_concurrent_requests: args.max_concurrent_requests,
        max_bytes_in_flight: args.max_bytes_in_flight,
        servicebus_max_message: args.servicebus_max_message,
        servicebus_lock_duration: args.servicebus_lock_duration,
        nats_ca_file: args.nats_ca_file,
        device_cache_ttl: args.device_cache_ttl,
    })?;
    let master = config::master_key()?;
    let pool = config::database_with(16).await?;
    config::check_master_key(&pool, &master).await?;
    let api = bind(&args.listen).await?;
    let metrics = match &args.metrics_listen {
        Some(listen) => {
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} for metrics"))?;
            println!("metrics on {}", listener.local_addr()?);
            Some(listener)
        }
        None => None,
    };
    let teltonika = match &args.listen_teltonika {
        Some(listen) => {
            if !(1..=1_000_000).contains(&args.teltonika_max_connections) {
                anyhow::bail!("--teltonika-max-connections must be 1 to 1000000");
            }
            if !(Duration::from_secs(10)..=Duration::from_secs(86_400))
                .contains(&args.teltonika_idle_timeout)
            {
                anyhow::bail!("--teltonika-idle-timeout must be between 10s and 24h");
            }
            if !(1..=100_000).contains(&args.teltonika_max_records_per_second) {
                anyhow::bail!("--teltonika-max-records-per-second must be 1 to 100000");
            }
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} for Teltonika trackers"))?;
            println!("teltonika on {}", listener.local_addr()?);
            let config = georelay_ingest::TrackerConfig {
                max_connections: args.teltonika_max_connections,
                idle_timeout: args.teltonika_idle_timeout,
                allow: args.teltonika_allow.clone(),
                max_records_per_second: args.teltonika_max_records_per_second,
                ..georelay_ingest::TrackerConfig::default()
            };
            Some((listener, config))
        }
        None => None,
    };
    let listeners = georelay_ingest::Listeners {
        api,
        metrics,
        teltonika,
    };
    georelay_ingest::run(ingest, pool, master, listeners, shutdown_on_signal()).await?;
    Ok(())
}

pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let drain = georelay_drain::Config::new(georelay_drain::Settings {
        batch_size: args.batch_size,
        lease: args.lease,
        ingest_publish_deadline: args.publish_deadline,
        ingest_lease: args.ingest_lease,
        declare_trouble_after: args.declare_trouble_after,
        failover_cooldown: args.failover_cooldown,
        servicebus_lock_duration: args.servicebus_lock_duration,
        silent_after: args.silent_after,
        gap_warn_after: args.gap_warn_after,
        nats_ca_file: args.nats_ca_file,
    })?;
    let master = config::master_key()?;
    let pool = config::database_with(8).await?;
    config::check_master_key(&pool, &master).await?;
    let listener = bind(&args.listen).await?;
    georelay_drain::run(drain, pool, master, listener, shutdown_on_signal()).await?;
    Ok(())
}

pub async fn rollup(args: RollupArgs) -> anyhow::Result<()> {
    if !(Duration::from_millis(50)..=Duration::from_secs(60)).contains(&args.poll_interval) {
        anyhow::bail!("--poll-interval must be between 50ms and 1m");
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&args.lease) {
        anyhow::bail!("--lease must be between 1s and 1h");
    }
    let config = georelay_rollup::Config {
        poll_interval: args.poll_interval,
        lease: args.lease,
        ..georelay_rollup::Config::default()
    };
    let pool = config::database_with(4).await?;
    let listener = bind(&args.listen).await?;
    georelay_rollup::run(config, pool, listener, shutdown_on_signal()).await?;
    Ok(())
}

pub async fn console(args: ConsoleArgs) -> anyhow::Result<()> {
    let console = georelay_console::Config {
        poll_interval: args.poll_interval,
        depth_interval: args.depth_interval,
        silent_after: args.silent_after,
        ..georelay_console::Config::default()
    };
    let token = config::env("GEORELAY_CONSOLE_TOKEN")?
        .filter(|t| !t.is_empty())
        .map(Zeroizing::new);
    let master = config::master_key()?;
    let pool = config::database_with(4).await?;
    config::check_master_key(&pool, &master).await?;
    let listener = bind(&args.listen).await?;
    georelay_console::run(console, pool, master, token, listener, shutdown_on_signal()).await?;
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
