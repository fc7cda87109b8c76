//! The tracker front door: devices whose firmware cannot change speak a
//! binary protocol over TCP (`georelay ingest --listen-teltonika ADDR`). The
//! protocol is a [`TrackerCodec`] (Teltonika Codec 8/8E is
//! [`teltonika::Teltonika`]; a fleet's own protocol is one more module); the
//! rest is the same for every codec and the same as the HTTP path from the
//! router on:
//!
//! - **Handshake**: the device names itself (an IMEI). It must be a
//!   registered, enabled device (`devices.id` = IMEI); anything else is
//!   refused at the handshake and the connection closed.
//! - **Sealing**: trackers cannot encrypt, so each record is sealed here with
//!   the device's key, then published through the same router, breakers,
//!   failover and fencing as a POST. seq = the record's timestamp in ms, so a
//!   re-sent packet is the same records: the same seqs, the same sealed bytes
//!   (the nonce is an HMAC of seq and payload under the device key: a nonce
//!   is never reused with another plaintext), the same message ids, stored
//!   once. Within a packet a record whose timestamp is not after the one
//!   before it gets the previous seq + 1 (its payload keeps its timestamp).
//! - **Acknowledgement**: a packet is acknowledged (the count of its records)
//!   only after the broker acked every record in it. A bad CRC or a count
//!   that does not match is answered 0 (the tracker sends it again) and
//!   counted; a publish that fails too. A connection that sends what is not
//!   the protocol is closed.
//! - **Bounds**: connections (`--teltonika-max-connections`), source
//!   networks (`--teltonika-allow`), records a second per device
//!   (`--teltonika-max-records-per-second`), handshake time, idle time
//!   between packets, the time one packet may take to arrive (slow
//!   senders), packet size.

pub mod teltonika;

use georelay_core::{DeviceId, SealedRecord};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::http::{self, App};

/// A frame read from the start of a buffer.
#[derive(Debug, PartialEq)]
pub enum Frame<T> {
    /// More bytes are needed.
    Incomplete,
    /// `value`, from the first `len` bytes.
    Complete { value: T, len: usize },
}

/// A packet the codec framed.
#[derive(Debug, PartialEq)]
pub enum Packet {
    Records(Vec<TrackerRecord>),
    /// The checksum does not match: answered 0, the tracker sends it again.
    BadCrc {
        declared: u8,
    },
    /// The records do not match the count (or do not fit the length).
    BadCount {
        declared: u8,
    },
}

/// What is not the protocol: the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not the protocol: {0}")]
    Garbage(String),
}

/// One reading of a tracker.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackerRecord {
    /// When it was taken, ms since the Unix epoch: its seq.
    pub timestamp_ms: u64,
    /// A JSON object: what is stored in `telemetry.payload`.
    pub payload: serde_json::Value,
}

/// A tracker protocol, without I/O: framing from a buffer, and the replies.
pub trait TrackerCodec: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The device id the tracker opens with.
    fn handshake(&self, buf: &[u8]) -> Result<Frame<String>, Refusal>;
    fn handshake_reply(&self, accepted: bool) -> Vec<u8>;
    /// A data packet of at most `max_packet` bytes.
    fn packet(&self, buf: &[u8], max_packet: usize) -> Result<Frame<Packet>, Refusal>;
    /// The answer to a packet: how many records were accepted.
    fn packet_reply(&self, accepted: usize) -> Vec<u8>;
}

/// A source network trackers may connect from (`10.0.0.0/8`, `::1/128`, or
/// one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or ADDRESS/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix is 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (
                u128::from(u32::from(a)) << 96,
                u128::from(u32::from(b)) << 96,
                self.prefix,
            ),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), self.prefix),
            _ => return false,
        };
        let mask = if bits == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(bits))
        };
        a & mask == b & mask
    }
}

/// The front door's bounds.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    pub max_connections: usize,
    /// Empty: any source.
    pub allow: Vec<Network>,
    pub handshake_timeout: Duration,
    /// Longest silence between packets.
    pub idle_timeout: Duration,
    /// Longest one packet may take to arrive once it began.
    pub packet_timeout: Duration,
    pub max_packet: usize,
    /// Records a second one device may send (a burst of as many), across
    /// its connections; a packet beyond it is answered 0 and sent again.
    pub max_records_per_second: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            allow: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            packet_timeout: Duration::from_secs(30),
            max_packet: 64 * 1024,
            max_records_per_second: 100,
        }
    }
}

/// Per-device token buckets: an IMEI is not a secret, so one device's
/// records (whoever sends them) are bounded.
#[derive(Debug, Default)]
struct RateLimit {
    buckets: parking_lot::Mutex<std::collections::HashMap<DeviceId, (f64, tokio::time::Instant)>>,
}

impl RateLimit {
    /// Takes `n` records' tokens from `device`'s bucket; false if it has
    /// not that many.
    fn take(&self, device: &DeviceId, n: usize, per_second: u32) -> bool {
        let now = tokio::time::Instant::now();
        let rate = f64::from(per_second);
        let mut buckets = self.buckets.lock();
        // Full buckets carry nothing: drop them now and then.
        if buckets.len() > 10_000 {
            buckets.retain(|_, (tokens, at)| *tokens + (now - *at).as_secs_f64() * rate < rate);
        }
        let (tokens, at) = buckets.entry(device.clone()).or_insert((rate, now));
        *tokens = (*tokens + (now - *at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= n as f64 {
            *tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

/// Serves trackers on `listener` until `shutdown`; a packet being published
/// then is finished and answered.
pub(crate) async fn serve<C: TrackerCodec>(
    codec: Arc<C>,
    listener: TcpListener,
    app: Arc<App>,
    config: Arc<TrackerConfig>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let limits = Arc::new(RateLimit::default());
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "tracker accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = &app.metrics;
        if !config.allow.is_empty() && !config.allow.iter().any(|n| n.contains(peer.ip())) {
            metrics
                .tracker_closed
                .with_label_values(&[codec.name(), "not_allowed"])
                .inc();
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics
                .tracker_closed
                .with_label_values(&[codec.name(), "too_many_connections"])
                .inc();
            continue;
        };
        let (codec, app, config, stop) =
            (codec.clone(), app.clone(), config.clone(), shutdown.clone());
        let limits = limits.clone();
        connections.spawn(async move {
            let gauge = app
                .metrics
                .tracker_connections
                .with_label_values(&[codec.name()]);
            gauge.inc();
            let why = Connection {
                codec: &*codec,
                app: &app,
                config: &config,
                limits: &limits,
                stream,
                peer,
            }
            .run(stop)
            .await;
            gauge.dec();
            app.metrics
                .tracker_closed
                .with_label_values(&[codec.name(), why.as_str()])
                .inc();
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Eof,
    Garbage,
    UnknownDevice,
    HandshakeTimeout,
    Idle,
    SlowPacket,
    Io,
    Shutdown,
    ControlPlaneUnavailable,
}

impl Closed {
    fn as_str(self) -> &'static str {
        match self {
            Self::Eof => "closed_by_device",
            Self::Garbage => "garbage",
            Self::UnknownDevice => "unknown_device",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Idle => "idle",
            Self::SlowPacket => "slow_packet",
            Self::Io => "io_error",
            Self::Shutdown => "shutdown",
            Self::ControlPlaneUnavailable => "control_plane_unavailable",
        }
    }
}

struct Connection<'a, C> {
    codec: &'a C,
    app: &'a App,
    config: &'a TrackerConfig,
    limits: &'a RateLimit,
    stream: TcpStream,
    peer: SocketAddr,
}

/// Reads more into `buf` within `limit`; `Err(why)` on EOF, error or timeout.
async fn fill(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: Duration,
    on_timeout: Closed,
    stop: &CancellationToken,
) -> Result<(), Closed> {
    let mut chunk = [0u8; 4096];
    tokio::select! {
        _ = stop.cancelled() => Err(Closed::Shutdown),
        read = tokio::time::timeout(limit, stream.read(&mut chunk)) => match read {
            Err(_) => Err(on_timeout),
            Ok(Ok(0)) => Err(Closed::Eof),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Ok(Err(_)) => Err(Closed::Io),
        },
    }
}

impl<C: TrackerCodec> Connection<'_, C> {
    async fn run(mut self, stop: CancellationToken) -> Closed {
        let name = self.codec.name();
        let mut buf = Vec::with_capacity(1024);
        // The handshake, all of it within the handshake timeout.
        let deadline = tokio::time::Instant::now() + self.config.handshake_timeout;
        let (imei, used) = loop {
            match self.codec.handshake(&buf) {
                Ok(Frame::Complete { value, len }) => break (value, len),
                Ok(Frame::Incomplete) => {}
                Err(e) => {
                    tracing::info!(codec = name, peer = %self.peer, error = %e, "tracker handshake refused");
                    return Closed::Garbage;
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Err(why) = fill(
                &mut self.stream,
                &mut buf,
                left,
                Closed::HandshakeTimeout,
                &stop,
            )
            .await
            {
                return why;
            }
        };
        buf.drain(..used);
        let device = match DeviceId::parse(&imei) {
            Ok(d) => d,
            Err(_) => return self.refuse(&imei).await,
        };
        match http::device_auth(self.app, &device).await {
            Ok(_) => {}
            Err(e) if e.is_unauthorized() => return self.refuse(&imei).await,
            Err(_) => {
                // The control plane does not answer: not the device's
                // fault. Refused for now; the tracker reconnects.
                let _ = self
                    .stream
                    .write_all(&self.codec.handshake_reply(false))
                    .await;
                return Closed::ControlPlaneUnavailable;
            }
        }
        // A tracker deletes what was acknowledged: if a region holding some
        // of it is given up, nobody can send it again (docs/architecture.md,
        // "A region lost for good"). Best effort: the device is known.
        let mark = georelay_store::gaps::mark_does_not_send_again(&self.app.pool, device.as_str());
        match tokio::time::timeout(self.app.config.request_deadline, mark).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(device = %device, error = %e, "cannot mark the tracker as not sending again")
            }
            Err(_) => {
                tracing::debug!(device = %device, "marking the tracker as not sending again timed out")
            }
        }
        if self
            .stream
            .write_all(&self.codec.handshake_reply(true))
            .await
            .is_err()
        {
            return Closed::Io;
        }
        tracing::debug!(codec = name, peer = %self.peer, device = %device, "tracker connected");
        loop {
            // Idle until a packet begins; then it must arrive in full within
            // the packet timeout.
            let mut started = (!buf.is_empty()).then(tokio::time::Instant::now);
            let packet = loop {
                match self.codec.packet(&buf, self.config.max_packet) {
                    Ok(Frame::Complete { value, len }) => {
                        buf.drain(..len);
                        break value;
                    }
                    Ok(Frame::Incomplete) => {}
                    Err(e) => {
                        tracing::info!(codec = name, device = %device, error = %e, "tracker sent garbage: closing");
                        return Closed::Garbage;
                    }
                }
                let (limit, on_timeout) = match started {
                    None => (self.config.idle_timeout, Closed::Idle),
                    Some(at) => (
                        (at + self.config.packet_timeout)
                            .saturating_duration_since(tokio::time::Instant::now()),
                        Closed::SlowPacket,
                    ),
                };
                if let Err(why) = fill(&mut self.stream, &mut buf, limit, on_timeout, &stop).await {
                    return why;
                }
                started.get_or_insert_with(tokio::time::Instant::now);
            };
            let accepted = self.take(&device, packet).await;
            if self
                .stream
                .write_all(&self.codec.packet_reply(accepted))
                .await
                .is_err()
            {
                return Closed::Io;
            }
        }
    }

    async fn refuse(&mut self, imei: &str) -> Closed {
        tracing::warn!(codec = self.codec.name(), peer = %self.peer, device = %imei,
            "tracker refused at the handshake: no such enabled device (register it: georelay admin device add --id IMEI --group G)");
        let _ = self
            .stream
            .write_all(&self.codec.handshake_reply(false))
            .await;
        Closed::UnknownDevice
    }

    /// Seals and publishes a packet's records; how many to acknowledge (all
    /// or none).
    async fn take(&self, device: &DeviceId, packet: Packet) -> usize {
        let name = self.codec.name();
        let packets = &self.app.metrics.tracker_packets;
        let records = match packet {
            Packet::Records(r) => r,
            Packet::BadCrc { .. } => {
                packets.with_label_values(&[name, "bad_crc"]).inc();
                return 0;
            }
            Packet::BadCount { .. } => {
                packets.with_label_values(&[name, "bad_count"]).inc();
                return 0;
            }
        };
        if !self
            .limits
            .take(device, records.len(), self.config.max_records_per_second)
        {
            packets.with_label_values(&[name, "rate_limited"]).inc();
            return 0;
        }
        // Looked up again: a device disabled since the handshake stops here.
        let auth = match http::device_auth(self.app, device).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(codec = name, device = %device, error = %e.to_string(), "tracker packet not taken");
                packets.with_label_values(&[name, "refused"]).inc();
                return 0;
            }
        };
        let sealed = match seal_all(&auth.key, device, &records) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(codec = name, device = %device, error = %e, "tracker packet cannot be sealed");
                packets.with_label_values(&[name, "refused"]).inc();
                return 0;
            }
        };
        match http::publish(self.app, auth.group_id, device.clone(), sealed).await {
            Ok(_) => {
                packets.with_label_values(&[name, "acked"]).inc();
                self.app
                    .metrics
                    .records_accepted
                    .inc_by(records.len() as u64);
                records.len()
            }
            Err(e) => {
                tracing::warn!(codec = name, device = %device, error = %e.to_string(),
                    "tracker packet not queued: answered 0, the tracker sends it again");
                packets.with_label_values(&[name, "not_queued"]).inc();
                0
            }
        }
    }
}

/// Seals a packet's records: seq from the timestamp (bumped past the
/// previous record's within the packet), nonce an HMAC of seq and payload.
pub fn seal_all(
    key: &georelay_core::DeviceKey,
    device: &DeviceId,
    records: &[TrackerRecord],
) -> Result<Vec<SealedRecord>, georelay_core::RecordError> {
    let mut previous = 0u64;
    records
        .iter()
        .map(|r| {
            let seq = r.timestamp_ms.max(previous + 1);
            previous = seq;
            let plaintext = serde_json::to_vec(&r.payload).unwrap_or_default();
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(b"georelay tracker nonce\0");
            mac.update(&seq.to_be_bytes());
            mac.update(&plaintext);
            let digest = mac.finalize().into_bytes();
            let mut nonce = [0u8; georelay_core::record::NONCE_LEN];
            nonce.copy_from_slice(&digest[..georelay_core::record::NONCE_LEN]);
            SealedRecord::seal(key, device, seq, nonce, &plaintext)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use georelay_core::DeviceKey;
    use serde_json::json;

    fn rec(ts: u64, v: i64) -> TrackerRecord {
        TrackerRecord {
            timestamp_ms: ts,
            payload: json!({"timestamp": ts, "v": v}),
        }
    }

    #[test]
    fn equal_timestamps_get_the_next_seq_and_a_resend_seals_the_same_bytes() {
        let key = DeviceKey::generate();
        let device = DeviceId::parse("356307042441013").unwrap();
        let records = [rec(1000, 1), rec(1000, 2), rec(999, 3), rec(2000, 4)];
        let a = seal_all(&key, &device, &records).unwrap();
        let seqs: Vec<u64> = a.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1000, 1001, 1002, 2000]);
        let b = seal_all(&key, &device, &records).unwrap();
        assert_eq!(a, b, "a re-sent packet is the same sealed records");
        // Another payload at the same seq never reuses the nonce.
        let other = seal_all(&key, &device, &[rec(1000, 9)]).unwrap();
        assert_ne!(other[0].nonce, a[0].nonce);
        assert_eq!(
            a[1].open_object(&key, &device).unwrap(),
            "{\"timestamp\":1000,\"v\":2}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_is_held_to_its_rate_and_refills() {
        let limit = RateLimit::default();
        let a = DeviceId::parse("356307042441013").unwrap();
        let b = DeviceId::parse("490154203237518").unwrap();
        assert!(limit.take(&a, 8, 10));
        assert!(!limit.take(&a, 3, 10), "a burst beyond the bucket");
        assert!(limit.take(&b, 10, 10), "another device has its own bucket");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limit.take(&a, 7, 10), "half a second refills five");
        assert!(!limit.take(&a, 1, 10));
    }

    #[test]
    fn networks_contain_their_addresses() {
        let n: Network = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Network = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        let any: Network = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("example.com".parse::<Network>().is_err());
    }
}
