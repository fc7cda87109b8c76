//! Chaos scenarios: each runs a whole system (three regions behind fault
//! proxies, PostgreSQL behind one, two ingest instances, two drain workers,
//! a simulated fleet), injects its fault, heals it, and checks the
//! invariants: 0 lost, 0 duplicated, 0 reordered, nothing stranded.
//!
//! Each prints its seed first; `GEORELAY_CHAOS_SEED=N` reproduces a run.
//! `GEORELAY_CHAOS_DURATION=120s` makes a longer soak (default 7 s of
//! sending per scenario). Scenarios run one at a time: they share 2 cores.

use georelay_core::TransportKind;
use georelay_testkit::chaos::{drill, DrillConfig, Scenario};
use georelay_testkit::Georelay;
use std::time::Duration;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(transport: TransportKind, scenario: Scenario) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let seed = std::env::var("GEORELAY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    println!("scenario {} on {transport} seed {seed}", scenario.name());
    let mut duration = std::env::var("GEORELAY_CHAOS_DURATION")
        .ok()
        .and_then(|s| s.trim_end_matches('s').parse().ok())
        .map_or(Duration::from_secs(7), Duration::from_secs);
    if transport == TransportKind::ServiceBus
        && matches!(scenario, Scenario::RegionLost | Scenario::RegionReturns)
    {
        // A fresh Service Bus reader waits out the 5 s lock before it reads:
        // the region is lost once the worker has caught up, and devices
        // must still be sending after the abandonment.
        duration = duration.max(Duration::from_secs(12));
    }
    let report = drill(&DrillConfig {
        scenario,
        transport,
        seed,
        duration,
        devices: 6,
        rate: 5.0,
        georelay: Georelay::for_tests().unwrap(),
    })
    .await
    .unwrap();
    println!("{}", report.render());
    assert!(
        report.pass,
        "scenario {} seed {seed} failed:\n{}",
        scenario.name(),
        report.render()
    );
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// Every scenario on each broker: `chaos::nats::kill_primary`,
/// `chaos::servicebus::kill_primary`, …
macro_rules! scenarios {
    ($module:ident, $transport:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn kill_primary() {
                run($transport, Scenario::KillPrimary).await
            }
            #[tokio::test]
            async fn hang_primary() {
                run($transport, Scenario::HangPrimary).await
            }
            #[tokio::test]
            async fn slow_primary() {
                run($transport, Scenario::SlowPrimary).await
            }
            #[tokio::test]
            async fn blackhole_primary() {
                run($transport, Scenario::BlackholePrimary).await
            }
            #[tokio::test]
            async fn flap_primary() {
                run($transport, Scenario::FlapPrimary).await
            }
            #[tokio::test]
            async fn kill_two() {
                run($transport, Scenario::KillTwo).await
            }
            #[tokio::test]
            async fn all_down() {
                run($transport, Scenario::AllDown).await
            }
            #[tokio::test]
            async fn kill_ingest() {
                run($transport, Scenario::KillIngest).await
            }
            #[tokio::test]
            async fn kill_worker() {
                run($transport, Scenario::KillWorker).await
            }
            #[tokio::test]
            async fn database_outage() {
                run($transport, Scenario::DatabaseOutage).await
            }
            #[tokio::test]
            async fn database_hang() {
                run($transport, Scenario::DatabaseHang).await
            }
            #[tokio::test]
            async fn planned_failover() {
                run($transport, Scenario::PlannedFailover).await
            }
            #[tokio::test]
            async fn region_lost() {
                run($transport, Scenario::RegionLost).await
            }
            #[tokio::test]
            async fn region_returns() {
                run($transport, Scenario::RegionReturns).await
            }
        }
    };
}

scenarios!(nats, TransportKind::Nats);
scenarios!(servicebus, TransportKind::ServiceBus);
