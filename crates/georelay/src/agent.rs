//! `georelay agent run` and `georelay agent simulate`: configuration in, the
//! agent library out. Device keys come from files or the environment, never
//! from the command line (it shows in `ps`).

use anyhow::{bail, Context as _};
use georelay_agent::buffer;
use georelay_agent::sender::SenderConfig;
use georelay_agent::{AgentConfig, SimDevice, SimulateConfig};
use georelay_core::{DeviceId, DeviceKey};
use std::path::Path;

use crate::cli::{AgentCmd, AgentRequeueArgs, AgentRunArgs, SimulateArgs, SimulateTrackerArgs};
use crate::{config, service};

pub async fn run(cmd: AgentCmd) -> anyhow::Result<()> {
    match cmd {
        AgentCmd::Run(args) => agent(args).await,
        AgentCmd::Simulate(args) => simulate(args).await,
        AgentCmd::Requeue(args) => requeue(args).await,
        AgentCmd::SimulateTracker(args) => simulate_tracker(args).await,
    }
}

/// A Teltonika tracker: readings at a rate, one packet per
/// `records_per_packet` readings, each sent again (reconnecting when needed)
/// until the server acknowledges all of it.
async fn simulate_tracker(args: SimulateTrackerArgs) -> anyhow::Result<()> {
    use georelay_ingest::tracker::teltonika::device::{packet, Avl, Codec, Tracker};

    DeviceId::parse(&args.imei).with_context(|| format!("--imei {:?}", args.imei))?;
    let stop = service::shutdown_on_signal();
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let every = std::time::Duration::from_secs_f64(f64::from(args.records_per_packet) / args.rate);
    let mut tracker: Option<Tracker> = None;
    let (mut acked, mut n) = (0u64, 0u64);
    let mut next = tokio::time::Instant::now();
    while !stop.is_cancelled() && until.is_none_or(|u| tokio::time::Instant::now() < u) {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
        next += every;
        let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        let records: Vec<Avl> = (0..u64::from(args.records_per_packet))
            .map(|i| {
                let mut r = Avl::at(now_ms + i);
                // A vehicle circling the demo's city, speed varying.
                let t = (n + i) as f64 / 60.0;
                r.longitude = 25.28 + 0.01 * t.cos();
                r.latitude = 54.69 + 0.01 * t.sin();
                r.speed = 30 + ((n + i) % 40) as u16;
                r
            })
            .collect();
        n += records.len() as u64;
        let bytes = packet(Codec::C8, &records);
        loop {
            if stop.is_cancelled() {
                break;
            }
            let sent = async {
                if tracker.is_none() {
                    let (t, answer) = Tracker::connect(&args.addr, &args.imei).await?;
                    anyhow::ensure!(
                        answer == 1,
                        "refused at the handshake (is {} a registered, enabled device?)",
                        args.imei
                    );
                    tracker = Some(t);
                }
                let t = tracker.as_mut().context("not connected")?;
                Ok::<u32, anyhow::Error>(t.send(&bytes).await?)
            };
            match sent.await {
                Ok(k) if k as usize == records.len() => {
                    acked += u64::from(k);
                    break;
                }
                Ok(_) => tracing::warn!("packet not acknowledged: sending it again"),
                Err(e) => {
                    tracing::warn!(error = %e, "tracker connection failed: reconnecting");
                    tracker = None;
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
    println!("tracker {}: {acked} records acknowledged", args.imei);
    Ok(())
}

async fn requeue(args: AgentRequeueArgs) -> anyhow::Result<()> {
    let state_dir = &args.state.state_dir;
    let buffers = match &args.device {
        Some(device) => {
            let device = DeviceId::parse(device).with_context(|| format!("--device {device:?}"))?;
            vec![buffer::path(state_dir, &device)]
        }
        None => files_ending(state_dir, buffer::EXTENSION)?,
    };
    anyhow::ensure!(
        !buffers.is_empty(),
        "no agent buffer (DEVICE.db) in {}",
        state_dir.display()
    );
    for path in buffers {
        anyhow::ensure!(path.is_file(), "no agent buffer at {}", path.display());
        let moved = buffer::requeue(&path)
            .await
            .with_context(|| format!("cannot requeue {}", path.display()))?;
        let device = path.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
        println!("{device}: {moved} set-aside records back in line");
    }
    Ok(())
}

/// The files in `dir` with extension `extension`, in name order.
fn files_ending(dir: &Path, extension: &str) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == extension))
        .collect();
    found.sort();
    Ok(found)
}

fn sender(urls: Vec<String>, confirm_after: std::time::Duration) -> anyhow::Result<SenderConfig> {
    let urls: Vec<String> = urls
        .into_iter()
        .map(|u| u.trim_end_matches('/').to_owned())
        .collect();
    for u in &urls {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            bail!("--url {u:?} must start with http:// or https://");
        }
    }
    Ok(SenderConfig {
        urls,
        confirm_after,
        ..SenderConfig::default()
    })
}

fn read_key(path: &Path) -> anyhow::Result<DeviceKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the device key {}", path.display()))?;
    DeviceKey::from_base64(&text).with_context(|| {
        format!(
            "{} is not a device key (base64 of 32 bytes)",
            path.display()
        )
    })
}

async fn agent(args: AgentRunArgs) -> anyhow::Result<()> {
    let device =
        DeviceId::parse(&args.device).with_context(|| format!("--device {:?}", args.device))?;
    let key = match (&args.key_file, config::env("GEORELAY_DEVICE_KEY")?) {
        (Some(path), _) => read_key(path)?,
        (None, Some(b64)) => {
            DeviceKey::from_base64(&b64).context("GEORELAY_DEVICE_KEY is not base64 of 32 bytes")?
        }
        (None, None) => bail!("give the device key with --key-file FILE or GEORELAY_DEVICE_KEY"),
    };
    if !args.stdin && args.watch.is_none() && args.listen_lines.is_none() {
        bail!("give --stdin, --watch DIR and/or --listen-lines ADDR: where readings come from");
    }
    let lines = match &args.listen_lines {
        Some(listen) => {
            if !(1..=100_000).contains(&args.lines_max_connections) {
                bail!("--lines-max-connections must be 1 to 100000");
            }
            if args.lines_idle_timeout < std::time::Duration::from_secs(1) {
                bail!("--lines-idle-timeout must be at least 1s");
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} for local devices' lines"))?;
            println!("lines on {}", listener.local_addr()?);
            let config = georelay_agent::lines::LinesConfig {
                max_connections: args.lines_max_connections,
                idle_timeout: args.lines_idle_timeout,
            };
            Some((listener, config))
        }
        None => None,
    };
    let stop = service::shutdown_on_signal();
    georelay_agent::run(
        AgentConfig {
            device,
            key,
            sender: sender(args.urls, args.confirm_after)?,
            state_dir: args.state.state_dir,
            read_stdin: args.stdin,
            watch: args.watch,
            lines,
            max_buffer: args.max_buffer.max(1),
        },
        stop,
    )
    .await?;
    Ok(())
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.keys_dir)
        .with_context(|| format!("cannot create {}", args.keys_dir.display()))?;
    if let Some(group) = &args.provision_group {
        provision(&args.keys_dir, group, args.devices.unwrap_or(10)).await?;
    }
    let mut devices = Vec::new();
    for path in files_ending(&args.keys_dir, "key")?
        .into_iter()
        .take(args.devices.unwrap_or(usize::MAX))
    {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let id = DeviceId::parse(stem)
            .with_context(|| format!("{} is not named after a device id", path.display()))?;
        devices.push(SimDevice {
            id,
            key: read_key(&path)?,
        });
    }
    anyhow::ensure!(
        !devices.is_empty(),
        "no device keys (ID.key) in {}",
        args.keys_dir.display()
    );
    let stop = service::shutdown_on_signal();
    let duration = args.duration.filter(|d| !d.is_zero());
    println!(
        "simulating {} devices at {}/s each{}",
        devices.len(),
        args.rate,
        match (args.count, duration) {
            (Some(c), _) => format!(", {c} readings each"),
            (None, Some(d)) => format!(" for {d:?}"),
            (None, None) => " until stopped".to_owned(),
        }
    );
    let summary = georelay_agent::simulate(
        SimulateConfig {
            devices,
            sender: SenderConfig {
                backoff_max: args.max_backoff.max(std::time::Duration::from_millis(200)),
                ..sender(args.urls, args.confirm_after)?
            },
            state_dir: args.state_dir,
            rate: args.rate,
            count: args.count,
            duration,
            ledger: args.ledger,
            settle: args.settle,
        },
        stop,
    )
    .await?;
    println!(
        "devices {}  produced {}  accepted {}  retries {}  refused {}  still buffered {}  unconfirmed {}  resent {}  unconfirmed-peak {}",
        summary.devices,
        summary.produced,
        summary.accepted,
        summary.retries,
        summary.rejected,
        summary.left,
        summary.unconfirmed,
        summary.resent,
        summary.peak_unconfirmed
    );
    Ok(())
}

/// Creates devices sim-0001…sim-N in `group` where no key file exists yet.
async fn provision(keys_dir: &Path, group: &str, n: usize) -> anyhow::Result<()> {
    let pool = config::database().await?;
    let master = config::master_key()?;
    config::check_master_key(&pool, &master).await?;
    for i in 1..=n {
        let id = DeviceId::parse(&format!("sim-{i:04}"))?;
        let path = keys_dir.join(format!("{id}.key"));
        if path.exists() {
            continue;
        }
        let key = georelay_store::control::add_device(&pool, &master, &id, group).await?;
        write_private(&path, &key.to_base64())?;
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{text}")?;
    Ok(())
}
