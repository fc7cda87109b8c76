//! A region: one real `nats-server` child process with JetStream, its own
//! port and store directory. Tests kill it (`kill -9`), freeze it (SIGSTOP),
//! thaw it (SIGCONT) and restart it on the same port and store. Dropping the
//! guard kills the process and removes the store.

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct NatsRegion {
    name: String,
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
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!(
            "georelay-region-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut region = Self {
            name: name.to_owned(),
            port,
            extra: extra(&dir),
            dir,
            child: None,
        };
        region.spawn()?;
        Ok(region)
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
        self.spawn()
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("region is not running")?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("cannot send {signal} to region {}", self.name))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-n",
                &self.name,
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
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
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

impl Drop for NatsRegion {
    fn drop(&mut self) {
        // A frozen process must be thawed to die cleanly.
        let _ = self.resume();
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
