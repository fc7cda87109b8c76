//! A region: one real `nats-server` child process with JetStream, its own
//! port and store directory. Tests kill it (`kill -9`), freeze it (SIGSTOP),
//! thaw it (SIGCONT) and restart it on the same port and store. Dropping the
//! guard kills the process and removes the store. [`Region`] is either
//! broker behind the same faults: a test system runs on NATS or on Service
//! Bus (the contract double).

use anyhow::{bail, Context as _};
use georelay_core::{TransportKind, Triplet};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct NatsRegion {
    name: String,
    /// `-n`: unique, so the region knows its own server on its port.
    server_name: String,
    port: u16,
    dir: PathBuf,
    /// Added to the command line (credentials, TLS).
    extra: Vec<String>,
    child: Option<Child>,
}

impl NatsRegion {
    /// Starts `nats-server -js` on a free port of 127.0.0.1 and waits until it
    /// accepts connections.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_with(name, |_| Vec::new())
    }

    /// [`start`](Self::start) with more `nats-server` arguments, made from
    /// the region's own directory (where a test can put certificates).
    pub fn start_with(
        name: &str,
        extra: impl FnOnce(&std::path::Path) -> Vec<String>,
    ) -> anyhow::Result<Self> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("georelay-region-{name}-{unique}"));
        std::fs::create_dir_all(&dir)?;
        let mut region = Self {
            name: name.to_owned(),
            server_name: format!("{name}-{unique}"),
            port: 0,
            extra: extra(&dir),
            dir,
            child: None,
        };
        // A free port can be handed to a test beside this one too before
        // either server binds it: then the one that lost starts again on
        // another.
        for _ in 0..5 {
            region.port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            if region.spawn()? {
                return Ok(region);
            }
            region.kill();
        }
        bail!("region {name}: five free ports in a row were taken by other servers")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`
    /// The `nats-server` process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: the region is down, its store stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Lost for good: `kill -9`, and its store directory deleted.
    pub fn lose(&mut self) -> anyhow::Result<()> {
        self.kill();
        let store = self.dir.join("store");
        match std::fs::remove_dir_all(&store) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot delete {}", store.display()))
            }
            _ => Ok(()),
        }
    }

    /// SIGSTOP: the region hangs; connections stay open, nothing answers.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Starts the server again on the same port and store (after a kill).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        if !self.spawn()? {
            bail!(
                "region {}: another server took port {}",
                self.name,
                self.port
            );
        }
        Ok(())
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("region is not running")?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("cannot send {signal} to region {}", self.name))
    }

    /// Starts `nats-server` and waits until its port answers: `true` if
    /// it is this region's server, `false` if another one answers there.
    fn spawn(&mut self) -> anyhow::Result<bool> {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-n",
                &self.server_name,
            ])
            .arg("-sd")
            .arg(self.dir.join("store"))
            .arg("-l")
            .arg(self.dir.join("nats.log"))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nats-server (is it installed? ./dev test installs it)")?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                return Ok(server_name(stream).as_deref() == Some(self.server_name.as_str()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "region {} did not listen on port {} within 10 s; see {}",
            self.name,
            self.port,
            self.dir.join("nats.log").display()
        )
    }
}

/// The `server_name` of the `INFO` a NATS server greets a connection with.
fn server_name(stream: TcpStream) -> Option<String> {
    use std::io::BufRead as _;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line).ok()?;
    let info: serde_json::Value = serde_json::from_str(line.strip_prefix("INFO ")?).ok()?;
    info.get("server_name")?.as_str().map(str::to_owned)
}

impl Drop for NatsRegion {
    fn drop(&mut self) {
        // A frozen process must be thawed to die cleanly.
        let _ = self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The SAS policy of every Service Bus region a test system starts.
pub const SERVICEBUS_POLICY: &str = "RootManageSharedAccessKey";
/// Its key (tests only).
pub const SERVICEBUS_KEY: &str = "dGVzdC1vbmx5LXNhcy1rZXktZm9yLWdlb3JlbGF5LXJlZ2lvbnM=";

/// A region of a test system: a real `nats-server`, or a Service Bus
/// namespace served by the contract double. Both are killed, frozen, thawed
/// and restarted the same way, keeping what their queues hold.
#[derive(Debug)]
pub enum Region {
    Nats(NatsRegion),
    ServiceBus(crate::ServiceBusDouble),
}

impl Region {
    /// Starts a region named `name` (also the Service Bus namespace name).
    pub fn start(transport: TransportKind, name: &str) -> anyhow::Result<Self> {
        Ok(match transport {
            TransportKind::Nats => Self::Nats(NatsRegion::start(name)?),
            TransportKind::ServiceBus => Self::ServiceBus(crate::ServiceBusDouble::start(
                name,
                SERVICEBUS_POLICY,
                SERVICEBUS_KEY,
            )?),
        })
    }

    pub fn transport(&self) -> TransportKind {
        match self {
            Self::Nats(_) => TransportKind::Nats,
            Self::ServiceBus(_) => TransportKind::ServiceBus,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Nats(r) => r.name(),
            Self::ServiceBus(d) => d.name(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Self::Nats(r) => r.port(),
            Self::ServiceBus(d) => d.port(),
        }
    }

    /// The endpoint a namespace row holds to reach it directly.
    pub fn url(&self) -> String {
        match self {
            Self::Nats(r) => r.url(),
            Self::ServiceBus(d) => d.local_endpoint(),
        }
    }

    /// The endpoint that reaches it through `addr` (a fault proxy in front
    /// of its port).
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        match self {
            Self::Nats(_) => format!("nats://{addr}"),
            Self::ServiceBus(d) => format!("http://{addr}/{}", d.name()),
        }
    }

    /// The key name and key its namespace row holds (none for NATS).
    pub fn credentials(&self) -> (Option<&'static str>, Option<&'static str>) {
        match self {
            Self::Nats(_) => (None, None),
            Self::ServiceBus(_) => (Some(SERVICEBUS_POLICY), Some(SERVICEBUS_KEY)),
        }
    }

    /// How a client reaches it directly.
    pub fn triplet(&self) -> Triplet {
        let (key_name, key) = self.credentials();
        Triplet {
            transport: self.transport(),
            endpoint: self.url(),
            key_name: key_name.map(str::to_owned),
            key: key.map(|k| zeroize::Zeroizing::new(k.to_owned())),
        }
    }

    /// The `nats-server` process id, while it runs (NATS only).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Nats(r) => r.pid(),
            Self::ServiceBus(_) => None,
        }
    }

    /// Down: the server and its connections are gone; its queues stay.
    pub fn kill(&mut self) {
        match self {
            Self::Nats(r) => r.kill(),
            Self::ServiceBus(d) => d.kill(),
        }
    }

    /// Lost for good: down, and its store (every queue and message) gone.
    pub fn lose(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Nats(r) => r.lose(),
            Self::ServiceBus(d) => {
                d.lose();
                Ok(())
            }
        }
    }

    /// Hung: connections stay open, nothing answers.
    pub fn pause(&self) -> anyhow::Result<()> {
        match self {
            Self::Nats(r) => r.pause(),
            Self::ServiceBus(d) => {
                d.pause();
                Ok(())
            }
        }
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        match self {
            Self::Nats(r) => r.resume(),
            Self::ServiceBus(d) => {
                d.resume();
                Ok(())
            }
        }
    }

    /// Up again on the same port with the same queues (after a kill).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Nats(r) => r.restart(),
            Self::ServiceBus(d) => d.restart(),
        }
    }

    /// Messages the broker itself set aside in `queue`'s dead-letter
    /// sub-queue (Service Bus; NATS has none).
    pub fn dead_lettered(&self, queue: &str) -> usize {
        match self {
            Self::Nats(_) => 0,
            Self::ServiceBus(d) => d.dead_lettered(queue),
        }
    }
}
