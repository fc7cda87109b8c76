//! `georelay chaos drill`: one drill from the test kit's chaos harness, run
//! with this binary, on a throwaway system of its own (it does not touch the
//! stack `./dev up` runs). Exit 0 on PASS, 1 on FAIL. Built only with the
//! `chaos` feature: the production image carries no test kit.

use anyhow::{bail, Context as _};
use georelay_testkit::chaos::{drill as run_drill, DrillConfig};
use georelay_testkit::Georelay;

use crate::cli::DrillArgs;

pub async fn drill(args: DrillArgs) -> anyhow::Result<()> {
    let scenario = args.scenario;
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(
        args.rate > 0.0 && args.rate.is_finite(),
        "--rate must be above 0"
    );
    // The harness starts georelay processes: this very binary. Its services
    // log errors only, unless GEORELAY_TEST_LOG asks otherwise.
    let georelay = Georelay {
        bin: std::env::current_exe().context("cannot locate the georelay binary")?,
        log: std::env::var("GEORELAY_TEST_LOG").unwrap_or_else(|_| "error".into()),
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if !args.json {
        eprintln!(
            "drill {} on {} seed {seed}: starting (about {:?} of traffic, then the drain)",
            scenario.name(),
            args.transport.kind(),
            args.duration
        );
    }
    let report = run_drill(&DrillConfig {
        scenario,
        transport: args.transport.kind(),
        seed,
        duration: args.duration,
        devices: args.devices,
        rate: args.rate,
        georelay,
    })
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if !report.pass {
        bail!("drill {} (seed {seed}) failed", scenario.name());
    }
    Ok(())
}
