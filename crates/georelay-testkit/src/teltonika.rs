//! A Teltonika tracker for tests: a TCP client that shakes hands, sends
//! packets (built by `georelay_ingest::tracker::teltonika::encode`) and
//! reads the server's answers.

pub use georelay_ingest::tracker::teltonika::encode::{handshake, packet, Avl, Codec};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connected tracker.
#[derive(Debug)]
pub struct Tracker {
    pub stream: TcpStream,
}

impl Tracker {
    /// Connects and shakes hands; the server's one-byte answer.
    pub async fn connect(addr: &str, imei: &str) -> anyhow::Result<(Self, u8)> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&handshake(imei)).await?;
        let mut answer = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer)).await??;
        Ok((Self { stream }, answer[0]))
    }

    /// Sends bytes and reads the four-byte answer: the records accepted.
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<u32> {
        self.stream.write_all(bytes).await?;
        let mut answer = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(30), self.stream.read_exact(&mut answer))
            .await??;
        Ok(u32::from_be_bytes(answer))
    }

    /// Whether the server closed the connection (EOF within `within`).
    pub async fn closed(&mut self, within: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(within, self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
