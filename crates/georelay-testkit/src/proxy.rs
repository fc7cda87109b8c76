//! A fault proxy in front of a TCP service (a region, PostgreSQL) for the
//! faults a process signal cannot make: added latency with jitter, a
//! blackhole (connections accepted, nothing ever answered), reset
//! connections, a bandwidth cap. Small, in-tree, on tokio; it runs on a
//! runtime of its own so tests can flip faults from any thread.

use anyhow::Context as _;
use rand::Rng as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The fault in force.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Delay every chunk by `latency` ± `jitter`, each direction, in order.
    Latency { latency: Duration, jitter: Duration },
    /// Accept connections, forward nothing until healed (a partition: data
    /// in flight is held, not lost).
    Blackhole,
    /// Reset every open connection now, and each new one at once.
    Reset,
    /// At most this many bytes a second, each direction.
    Bandwidth(u64),
}

#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("cannot start the proxy runtime")?;
        // Bound here, adopted by the proxy's runtime: callers may be inside
        // a runtime of their own, which cannot block on another.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (fault, watcher) = watch::channel(Fault::None);
        runtime.spawn(async move {
            if let Ok(listener) = TcpListener::from_std(listener) {
                accept(listener, target, watcher).await;
            }
        });
        Ok(Self {
            addr,
            fault,
            runtime: Some(runtime),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, fault: watch::Receiver<Fault>) {
    while let Ok((client, _)) = listener.accept().await {
        let fault = fault.clone();
        tokio::spawn(async move {
            // Linger 0: every close of ours is a reset (RST), so aborting the
            // pipes resets both sides.
            let _ = client.set_zero_linger();
            if *fault.borrow() == Fault::Reset {
                return;
            }
            let Ok(upstream) = TcpStream::connect(target).await else {
                return;
            };
            let _ = upstream.set_zero_linger();
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            let mut up = tokio::spawn(pipe(cr, uw, fault.clone()));
            let mut down = tokio::spawn(pipe(ur, cw, fault.clone()));
            let mut f = fault.clone();
            loop {
                if *f.borrow_and_update() == Fault::Reset {
                    up.abort();
                    down.abort();
                    return;
                }
                tokio::select! {
                    changed = f.changed() => if changed.is_err() { return },
                    // Either direction ending ends the connection.
                    _ = &mut up => { down.abort(); return }
                    _ = &mut down => { up.abort(); return }
                }
            }
        });
    }
}

/// Reads one direction and writes it on under the fault in force; chunks
/// keep their order (a delay line), so latency does not cut throughput.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut fault: watch::Receiver<Fault>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // A blackhole is a partition: nothing passes, and what was in
            // flight passes when it heals (TCP never loses bytes silently).
            while *fault.borrow_and_update() == Fault::Blackhole {
                if fault.changed().await.is_err() {
                    return;
                }
            }
            let now = *fault.borrow();
            let due = match now {
                Fault::Latency { latency, jitter } => {
                    let j = if jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        rand::thread_rng().gen_range(Duration::ZERO..jitter * 2)
                    };
                    Instant::now() + (latency + j).saturating_sub(jitter)
                }
                Fault::Bandwidth(rate) => {
                    let secs = n as f64 / rate.max(1) as f64;
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    Instant::now()
                }
                Fault::None | Fault::Reset | Fault::Blackhole => Instant::now(),
            };
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    /// An echo server on its own thread.
    fn echo() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(addr: SocketAddr, timeout: Duration) -> std::io::Result<Duration> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        let t = Instant::now();
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        assert_eq!(&buf, b"ping");
        Ok(t.elapsed())
    }

    #[test]
    fn passes_delays_blackholes_and_resets() {
        let proxy = FaultProxy::start(echo()).unwrap();
        let fast = round_trip(proxy.addr(), Duration::from_secs(2)).unwrap();
        assert!(fast < Duration::from_millis(100), "{fast:?}");

        proxy.set(Fault::Latency {
            latency: Duration::from_millis(150),
            jitter: Duration::ZERO,
        });
        let slow = round_trip(proxy.addr(), Duration::from_secs(2)).unwrap();
        // 150 ms each way
        assert!(slow >= Duration::from_millis(300), "{slow:?}");

        proxy.set(Fault::Blackhole);
        let err = round_trip(proxy.addr(), Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );

        // An open connection is reset when the fault switches to Reset.
        proxy.set(Fault::None);
        let mut open = std::net::TcpStream::connect(proxy.addr()).unwrap();
        open.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).unwrap();
        proxy.set(Fault::Reset);
        std::thread::sleep(Duration::from_millis(200));
        open.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let got = open.write_all(b"y").and_then(|()| open.read(&mut one));
        assert!(matches!(got, Err(_) | Ok(0)), "{got:?}");
        assert!(round_trip(proxy.addr(), Duration::from_millis(500)).is_err());

        proxy.set(Fault::None);
        assert!(round_trip(proxy.addr(), Duration::from_secs(2)).is_ok());
    }
}
