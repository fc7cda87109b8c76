//! The accept loop: HTTP/1.1 with a header read timeout (slowloris), a cap on
//! open connections (beyond it, new connections wait in the kernel's backlog
//! instead of costing memory here), a cap on each connection's read buffer
//! (outside the bytes-in-flight budget, which counts bodies), and graceful
//! shutdown: on `shutdown`, stop accepting, let each connection finish its
//! request in progress, close.

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Config;

/// A connection's read buffer grows to at most this (hyper's default is
/// about 400 KiB: at 10,000 connections, 4 GiB outside the bytes-in-flight
/// budget). A request head must fit in it, else 431.
const READ_BUFFER: usize = 64 * 1024;

pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    config: &Config,
    shutdown: CancellationToken,
    accepting: Arc<AtomicBool>,
) {
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let header_read_timeout = config.header_read_timeout;
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(READ_BUFFER)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    accepting.store(false, Ordering::Relaxed);
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Sends `head` on a new connection; what came back until ingest
    /// closed it, or `None` if it held the connection for 2 s (the header
    /// read timeout is 5 s).
    async fn answer(addr: std::net::SocketAddr, head: &[u8]) -> Option<String> {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket.write_all(head).await.unwrap();
        let mut answer = Vec::new();
        let read = socket.read_to_end(&mut answer);
        tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .ok()
            .map(|r| {
                r.unwrap();
                String::from_utf8_lossy(&answer).into_owned()
            })
    }

    /// A request head that fills a connection's read buffer is refused at
    /// once (431), not held, buffer and all, until the header read timeout;
    /// one of half that size is served.
    #[tokio::test]
    async fn a_head_that_fills_the_read_buffer_is_refused_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let accepting = Arc::new(AtomicBool::new(true));
                serve(listener, app, &Config::default(), shutdown, accepting).await;
            }
        });
        let mut head = b"GET / HTTP/1.1\r\nconnection: close\r\nx-padding: ".to_vec();
        head.resize(READ_BUFFER / 2, b'x');
        head.extend_from_slice(b"\r\n\r\n");
        let served = answer(addr, &head).await.expect("answered");
        assert!(served.starts_with("HTTP/1.1 200"), "{served}");
        // The whole buffer and no end of the head yet: nothing more is read.
        head.truncate(READ_BUFFER / 2);
        head.resize(READ_BUFFER, b'x');
        let refused = answer(addr, &head).await;
        assert!(
            refused
                .as_deref()
                .is_some_and(|a| a.starts_with("HTTP/1.1 431")),
            "{refused:?}"
        );
        shutdown.cancel();
        server.await.unwrap();
    }
}
