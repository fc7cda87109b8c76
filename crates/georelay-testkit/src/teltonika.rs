//! A Teltonika tracker for tests: AVL packets built as the specification
//! lays them out (Codec 8 and Codec 8 Extended, CRC-16/IBM), and a TCP
//! client that shakes hands, sends packets and reads the server's answers.

use georelay_ingest::tracker::teltonika::crc16_ibm;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One AVL record to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Avl {
    pub timestamp_ms: u64,
    pub priority: u8,
    /// Degrees; sent as signed 1e-7 degrees.
    pub longitude: f64,
    pub latitude: f64,
    pub altitude: i16,
    pub angle: u16,
    pub satellites: u8,
    pub speed: u16,
    /// IO elements `(id, value)` of 1, 2, 4 and 8 bytes.
    pub io1: Vec<(u16, u8)>,
    pub io2: Vec<(u16, u16)>,
    pub io4: Vec<(u16, u32)>,
    pub io8: Vec<(u16, u64)>,
    /// Variable-length IO elements (Codec 8 Extended only).
    pub iox: Vec<(u16, Vec<u8>)>,
}

impl Avl {
    /// A record at `timestamp_ms` with a position and a few IO elements.
    pub fn at(timestamp_ms: u64) -> Self {
        Self {
            timestamp_ms,
            priority: 1,
            longitude: 25.279_651_4,
            latitude: 54.687_157_3,
            altitude: 112,
            angle: 90,
            satellites: 9,
            speed: 42,
            io1: vec![(239, 1), (240, 1)],
            io2: vec![(66, 12_345)],
            io4: vec![(241, 24_602)],
            io8: vec![(78, 0x0102_0304_0506_0708)],
            iox: Vec::new(),
        }
    }
}

/// Codec 8 or Codec 8 Extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    C8,
    C8E,
}

fn small(out: &mut Vec<u8>, codec: Codec, v: u16) {
    match codec {
        // Codec 8 ids and counts are one byte: the tests keep them small.
        Codec::C8 => out.push(u8::try_from(v).unwrap_or(u8::MAX)),
        Codec::C8E => out.extend_from_slice(&v.to_be_bytes()),
    }
}

fn record(out: &mut Vec<u8>, codec: Codec, r: &Avl) {
    out.extend_from_slice(&r.timestamp_ms.to_be_bytes());
    out.push(r.priority);
    out.extend_from_slice(&((r.longitude * 1e7).round() as i32).to_be_bytes());
    out.extend_from_slice(&((r.latitude * 1e7).round() as i32).to_be_bytes());
    out.extend_from_slice(&r.altitude.to_be_bytes());
    out.extend_from_slice(&r.angle.to_be_bytes());
    out.push(r.satellites);
    out.extend_from_slice(&r.speed.to_be_bytes());
    small(out, codec, 0); // event IO id
    let total = r.io1.len() + r.io2.len() + r.io4.len() + r.io8.len() + r.iox.len();
    small(out, codec, total as u16);
    small(out, codec, r.io1.len() as u16);
    for &(id, v) in &r.io1 {
        small(out, codec, id);
        out.push(v);
    }
    small(out, codec, r.io2.len() as u16);
    for &(id, v) in &r.io2 {
        small(out, codec, id);
        out.extend_from_slice(&v.to_be_bytes());
    }
    small(out, codec, r.io4.len() as u16);
    for &(id, v) in &r.io4 {
        small(out, codec, id);
        out.extend_from_slice(&v.to_be_bytes());
    }
    small(out, codec, r.io8.len() as u16);
    for &(id, v) in &r.io8 {
        small(out, codec, id);
        out.extend_from_slice(&v.to_be_bytes());
    }
    if codec == Codec::C8E {
        out.extend_from_slice(&(r.iox.len() as u16).to_be_bytes());
        for (id, v) in &r.iox {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&(v.len() as u16).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
}

/// An AVL data packet of `records`, with its CRC.
pub fn packet(codec: Codec, records: &[Avl]) -> Vec<u8> {
    let mut data = vec![match codec {
        Codec::C8 => 0x08,
        Codec::C8E => 0x8E,
    }];
    data.push(records.len() as u8);
    for r in records {
        record(&mut data, codec, r);
    }
    data.push(records.len() as u8);
    let mut out = vec![0, 0, 0, 0];
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&u32::from(crc16_ibm(&data)).to_be_bytes());
    out
}

/// The handshake of a tracker with `imei`.
pub fn handshake(imei: &str) -> Vec<u8> {
    let mut out = (imei.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(imei.as_bytes());
    out
}

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
