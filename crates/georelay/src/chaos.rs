//! `georelay chaos drill`: one drill from the test kit's chaos harness, run
//! with this binary, on a throwaway system of its own (it does not touch the
//! stack `./dev up` runs). Exit 0 on PASS, 1 on FAIL.

use anyhow::{bail, Context as _};
use georelay_testkit::chaos::{drill as run_drill, DrillConfig, Scenario};

use crate::cli::DrillArgs;

pub async fn drill(args: DrillArgs) -> anyhow::Result<()> {
    let Some(scenario) = Scenario::parse(&args.scenario) else {
        let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        bail!(
            "unknown scenario {:?}; one of: {}",
            args.scenario,
            names.join(", ")
        );
    };
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(
        args.rate > 0.0 && args.rate.is_finite(),
        "--rate must be above 0"
    );
    // The harness starts georelay processes: this very binary.
    let me = std::env::current_exe().context("cannot locate the georelay binary")?;
    std::env::set_var("GEORELAY_BIN", me);
    // The drill's own services log errors only, unless asked otherwise.
    if std::env::var_os("GEORELAY_TEST_LOG").is_none() {
        std::env::set_var("GEORELAY_TEST_LOG", "error");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if !args.json {
        eprintln!(
            "drill {} seed {seed}: starting (about {:?} of traffic, then the drain)",
            scenario.name(),
            args.duration
        );
    }
    let report = run_drill(&DrillConfig {
        scenario,
        seed,
        duration: args.duration,
        devices: args.devices,
        rate: args.rate,
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
