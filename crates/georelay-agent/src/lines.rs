//! The LAN line gateway (`georelay agent run --listen-lines ADDR`): weak
//! local devices that cannot encrypt (a scale on a microcontroller) send
//! ASCII lines over TCP; the agent enriches each reading, seals it and keeps
//! it in the durable buffer, and only then answers.
//!
//! - A line is `Type:Value,SensorId` (the original format), `Type:Value`, or
//!   several `Type:Value` pairs separated by `;` with an optional
//!   `,SensorId` at the end; `\r\n` or `\n` ends it. Each pair becomes one
//!   record: `{"captured_at", "gateway", "sensor", "type", "value"}` — the
//!   agent's clock when the line arrived, this agent's device id, the
//!   sensor id (or null), the type, and the value as a number.
//! - Answers: `OK <seq>` (for several pairs, the last one's: the line's
//!   records take consecutive seqs up to it) once every
//!   record of the line is committed to the buffer (a kill -9 after it loses
//!   nothing); `ERR <reason>` for a malformed line, and the connection stays
//!   open.
//! - Bounds: line length ([`MAX_LINE`]; a longer line is answered `ERR` and
//!   skipped to its end), connections (`max_connections`; more are closed at
//!   accept), idle time. When the buffer is full the gateway stops reading
//!   the sockets (back-pressure: the devices' TCP windows fill) until there
//!   is room; nothing is dropped.

use chrono::{SecondsFormat, Utc};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buffer::{Buffer, BufferError};

/// Longest line taken, in bytes (without its end).
pub const MAX_LINE: usize = 1024;
/// Most pairs in one line.
pub const MAX_PAIRS: usize = 32;

/// A reading parsed from a line.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading<'a> {
    pub kind: &'a str,
    pub value: f64,
    pub sensor: Option<&'a str>,
}

/// Why a line was refused (the text after `ERR `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("empty line")]
    Empty,
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("not ASCII text")]
    NotText,
    #[error("pair {0} is not Type:Value")]
    NotAPair(usize),
    #[error("pair {0}: the type is 1 to 64 letters, digits, '_', '-' or '.'")]
    BadType(usize),
    #[error("pair {0}: the value is not a finite number")]
    BadValue(usize),
    #[error("the sensor id is 1 to 64 letters, digits, '_', '-', '.' or ':'")]
    BadSensor,
    #[error("more than {MAX_PAIRS} pairs")]
    TooManyPairs,
}

fn name_ok(s: &str, extra: &[u8]) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b) || extra.contains(&b))
}

/// Parses one line (without its `\r\n`).
pub fn parse(line: &str) -> Result<Vec<Reading<'_>>, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    if !line.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(LineError::NotText);
    }
    let line = line.trim();
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    let (pairs, sensor) = match line.rsplit_once(',') {
        Some((pairs, sensor)) => {
            let sensor = sensor.trim();
            if !name_ok(sensor, b":") {
                return Err(LineError::BadSensor);
            }
            (pairs, Some(sensor))
        }
        None => (line, None),
    };
    let pairs: Vec<&str> = pairs.split(';').collect();
    if pairs.len() > MAX_PAIRS {
        return Err(LineError::TooManyPairs);
    }
    pairs
        .iter()
        .enumerate()
        .map(|(i, pair)| {
            let n = i + 1;
            let (kind, value) = pair.split_once(':').ok_or(LineError::NotAPair(n))?;
            let (kind, value) = (kind.trim(), value.trim());
            if !name_ok(kind, b"") {
                return Err(LineError::BadType(n));
            }
            let value: f64 = value.parse().map_err(|_| LineError::BadValue(n))?;
            if !value.is_finite() {
                return Err(LineError::BadValue(n));
            }
            Ok(Reading {
                kind,
                value,
                sensor,
            })
        })
        .collect()
}

/// The records of a line's readings, enriched.
pub fn records(readings: &[Reading<'_>], gateway: &str, captured_at: &str) -> Vec<String> {
    readings
        .iter()
        .map(|r| {
            serde_json::json!({
                "captured_at": captured_at,
                "gateway": gateway,
                "sensor": r.sensor,
                "type": r.kind,
                "value": r.value,
            })
            .to_string()
        })
        .collect()
}

/// The agent's clock, as readings carry it.
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The gateway's bounds.
#[derive(Debug, Clone)]
pub struct LinesConfig {
    pub max_connections: usize,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
}

impl Default for LinesConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Serves local devices on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    buffer: Buffer,
    wake: Arc<Notify>,
    config: LinesConfig,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "line gateway: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = config.max_connections, "line gateway: too many connections; closed");
            continue;
        };
        let (buffer, wake, stop, idle) = (
            buffer.clone(),
            wake.clone(),
            stop.clone(),
            config.idle_timeout,
        );
        connections.spawn(async move {
            if let Err(e) = connection(stream, &buffer, &wake, idle, &stop).await {
                tracing::debug!(%peer, error = %e, "line gateway: connection ended");
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

async fn connection(
    stream: TcpStream,
    buffer: &Buffer,
    wake: &Notify,
    idle: Duration,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(4096, read);
    let gateway = buffer.device().to_string();
    loop {
        let line = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            line = tokio::time::timeout(idle, read_line(&mut reader)) => match line {
                Err(_) => return Ok(()),
                Ok(line) => line?,
            },
        };
        let Some(line) = line else { return Ok(()) };
        let captured_at = now();
        let answer = match line.map_err(|_| LineError::TooLong).and_then(|l| {
            let readings = parse(&l)?;
            Ok(records(&readings, &gateway, &captured_at))
        }) {
            Err(e) => format!("ERR {e}\r\n"),
            Ok(records) => {
                let refs: Vec<&str> = records.iter().map(String::as_str).collect();
                match push(buffer, &refs, stop).await {
                    Ok(seqs) => {
                        wake.notify_one();
                        // One number, as the original protocol has it: a
                        // line's records take consecutive seqs up to it.
                        match seqs.last() {
                            Some(last) => format!("OK {last}\r\n"),
                            None => "ERR nothing to take\r\n".to_owned(),
                        }
                    }
                    // Stopping while the buffer is full: not taken, no answer.
                    Err(BufferError::Full(_)) => return Ok(()),
                    Err(e) => {
                        tracing::error!(error = %e, "line gateway: cannot buffer a reading");
                        "ERR the gateway cannot store it now; send it again\r\n".to_owned()
                    }
                }
            }
        };
        write.write_all(answer.as_bytes()).await?;
    }
}

/// Buffers a line's records, waiting (without reading the socket) while the
/// buffer is full.
async fn push(
    buffer: &Buffer,
    records: &[&str],
    stop: &CancellationToken,
) -> Result<Vec<u64>, BufferError> {
    let mut warned = false;
    loop {
        match buffer.push_all(records, None).await {
            Err(BufferError::Full(n)) => {
                if !warned {
                    tracing::warn!(records = n, "offline buffer full: the line gateway stops reading until records are delivered");
                    warned = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return Err(BufferError::Full(n)),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            other => return other,
        }
    }
}

/// The next line (without `\r\n`), `Err(())` for one over [`MAX_LINE`] (read
/// to its end, never held); `None` at the end of the stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<Result<String, ()>>> {
    let mut line = Vec::new();
    let (mut too_long, mut any) = (false, false);
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if any {
                Some(finish(line, too_long))
            } else {
                None
            });
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        if !too_long {
            if line.len() + chunk.len() > MAX_LINE + 1 {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(finish(line, too_long)));
        }
    }
}

fn finish(mut line: Vec<u8>, too_long: bool) -> Result<String, ()> {
    if too_long {
        return Err(());
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    // Not UTF-8: parse() refuses it as not text.
    Ok(String::from_utf8(line)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_original_and_the_other_formats_parse() {
        assert_eq!(
            parse("Weight:12.3,Scale.Arduino").unwrap(),
            [Reading {
                kind: "Weight",
                value: 12.3,
                sensor: Some("Scale.Arduino")
            }]
        );
        assert_eq!(
            parse("Weight:-0.5").unwrap(),
            [Reading {
                kind: "Weight",
                value: -0.5,
                sensor: None
            }]
        );
        assert_eq!(
            parse("Temp:21.5;Humidity:40,room-3").unwrap(),
            [
                Reading {
                    kind: "Temp",
                    value: 21.5,
                    sensor: Some("room-3")
                },
                Reading {
                    kind: "Humidity",
                    value: 40.0,
                    sensor: Some("room-3")
                },
            ]
        );
    }

    #[test]
    fn malformed_lines_say_why() {
        assert_eq!(parse(""), Err(LineError::Empty));
        assert_eq!(parse("Weight"), Err(LineError::NotAPair(1)));
        assert_eq!(parse("Weight:heavy"), Err(LineError::BadValue(1)));
        assert_eq!(parse("Weight:NaN"), Err(LineError::BadValue(1)));
        assert_eq!(parse("Weight:inf"), Err(LineError::BadValue(1)));
        assert_eq!(parse(":1"), Err(LineError::BadType(1)));
        assert_eq!(parse("A:1;B"), Err(LineError::NotAPair(2)));
        assert_eq!(parse("Weight:1,"), Err(LineError::BadSensor));
        assert_eq!(parse("Weight:1,a b"), Err(LineError::BadSensor));
        assert_eq!(parse("W\u{e9}ight:1"), Err(LineError::NotText));
        assert_eq!(parse(&"A:1;".repeat(40)), Err(LineError::TooManyPairs));
        assert_eq!(parse(&"x".repeat(MAX_LINE + 1)), Err(LineError::TooLong));
    }

    #[test]
    fn a_record_carries_capture_time_gateway_sensor_type_and_value() {
        let r = parse("Weight:12.3,Scale.Arduino").unwrap();
        let records = records(&r, "plug-0001", "2026-11-30T04:00:00.000Z");
        let v: serde_json::Value = serde_json::from_str(&records[0]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"captured_at": "2026-11-30T04:00:00.000Z", "gateway": "plug-0001",
                               "sensor": "Scale.Arduino", "type": "Weight", "value": 12.3})
        );
    }

    /// Property: any well-formed line parses back to what it was made of, and
    /// no line at all makes the parser panic or take more than it was given.
    #[test]
    fn well_formed_lines_round_trip_and_random_ones_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6765_6f72);
        let alphabet: &[u8] = b"abcXYZ019_-.";
        let word = |rng: &mut rand::rngs::StdRng, extra: &[u8]| -> String {
            let n = rng.gen_range(1..=12);
            (0..n)
                .map(|_| {
                    let set: Vec<u8> = alphabet.iter().chain(extra).copied().collect();
                    set[rng.gen_range(0..set.len())] as char
                })
                .collect()
        };
        for _ in 0..5000 {
            let pairs: Vec<(String, f64)> = (0..rng.gen_range(1..=5))
                .map(|_| (word(&mut rng, b""), rng.gen_range(-1e6..1e6)))
                .collect();
            let sensor = rng.gen_bool(0.5).then(|| word(&mut rng, b":"));
            let mut line = pairs
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(";");
            if let Some(s) = &sensor {
                line = format!("{line},{s}");
            }
            let parsed = parse(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(parsed.len(), pairs.len());
            for (r, (k, v)) in parsed.iter().zip(&pairs) {
                assert_eq!(
                    (r.kind, r.value, r.sensor),
                    (k.as_str(), *v, sensor.as_deref())
                );
            }
        }
        for _ in 0..20_000 {
            let n = rng.gen_range(0..80);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen_range(0x20..0x7f)).collect();
            let line = String::from_utf8(bytes).unwrap();
            if let Ok(readings) = parse(&line) {
                assert!(!readings.is_empty() && readings.len() <= MAX_PAIRS);
                assert!(readings
                    .iter()
                    .all(|r| r.value.is_finite() && line.contains(r.kind)));
            }
        }
    }

    #[tokio::test]
    async fn lines_are_cut_at_their_end_and_an_overlong_one_is_skipped() {
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("A:1\r\n{long}\nB:2");
        let mut reader = BufReader::new(input.as_bytes());
        assert_eq!(
            read_line(&mut reader).await.unwrap(),
            Some(Ok("A:1".to_owned()))
        );
        assert_eq!(read_line(&mut reader).await.unwrap(), Some(Err(())));
        assert_eq!(
            read_line(&mut reader).await.unwrap(),
            Some(Ok("B:2".to_owned()))
        );
        assert_eq!(read_line(&mut reader).await.unwrap(), None);
    }
}
