//! Teltonika Codec 8 and Codec 8 Extended over TCP, from the public
//! specification:
//!
//! - **Handshake**: two bytes of length (big-endian), then the IMEI in ASCII.
//!   The server answers one byte: `0x01` accepted, `0x00` refused.
//! - **AVL data packet**: four zero bytes (preamble), four bytes of data
//!   length (from the codec id through the second record count), codec id
//!   (`0x08` or `0x8E`), record count, the records, the record count again,
//!   and four bytes whose low two are the CRC-16/IBM of the data. The server
//!   answers four bytes: how many records it accepted. Anything but the
//!   count sent makes the tracker send the packet again.
//! - **Record**: timestamp (ms since the Unix epoch, 8 bytes), priority (1),
//!   GPS element (longitude and latitude as signed 1e-7 degrees, 4 bytes each;
//!   altitude 2, signed metres; angle 2; satellites 1; speed 2, km/h), IO
//!   element. Codec 8: event IO id (1), IO count (1), then groups of 1-, 2-,
//!   4- and 8-byte values, each group a count (1) and `id (1), value` pairs.
//!   Codec 8E: the same with 2-byte ids and counts, plus a last group of
//!   variable-length values (`id (2), length (2), bytes`).

use serde_json::{json, Map, Value};

use super::{Frame, Packet, Refusal, TrackerCodec, TrackerRecord};

const CODEC_8: u8 = 0x08;
const CODEC_8E: u8 = 0x8E;
/// Longest IMEI accepted in a handshake (IMEIs are 15 digits; some
/// firmwares pad or use 16).
const MAX_IMEI: usize = 17;
/// Preamble (4) + length (4) + CRC (4).
const PACKET_OVERHEAD: usize = 12;
/// Codec id, two counts: the smallest data field.
const MIN_DATA: usize = 3;

/// The Teltonika codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct Teltonika;

impl TrackerCodec for Teltonika {
    fn name(&self) -> &'static str {
        "teltonika"
    }

    fn handshake(&self, buf: &[u8]) -> Result<Frame<String>, Refusal> {
        let Some(len) = buf.get(..2) else {
            return Ok(Frame::Incomplete);
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len == 0 || len > MAX_IMEI {
            return Err(Refusal::Garbage(format!(
                "handshake length {len} (an IMEI is up to {MAX_IMEI} digits)"
            )));
        }
        let Some(imei) = buf.get(2..2 + len) else {
            return Ok(Frame::Incomplete);
        };
        if !imei.iter().all(u8::is_ascii_digit) {
            return Err(Refusal::Garbage("the IMEI is not all digits".to_owned()));
        }
        let imei = String::from_utf8_lossy(imei).into_owned();
        Ok(Frame::Complete {
            value: imei,
            len: 2 + len,
        })
    }

    fn handshake_reply(&self, accepted: bool) -> Vec<u8> {
        vec![u8::from(accepted)]
    }

    fn packet(&self, buf: &[u8], max_packet: usize) -> Result<Frame<Packet>, Refusal> {
        let Some(head) = buf.get(..8) else {
            // A preamble that is already wrong need not wait for the rest.
            if buf.iter().any(|&b| b != 0) {
                return Err(Refusal::Garbage("no zero preamble".to_owned()));
            }
            return Ok(Frame::Incomplete);
        };
        if head[..4] != [0, 0, 0, 0] {
            return Err(Refusal::Garbage("no zero preamble".to_owned()));
        }
        let data_len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if data_len < MIN_DATA || data_len + PACKET_OVERHEAD > max_packet {
            return Err(Refusal::Garbage(format!(
                "data length {data_len} (at most {} here)",
                max_packet.saturating_sub(PACKET_OVERHEAD)
            )));
        }
        let total = data_len + PACKET_OVERHEAD;
        let Some(packet) = buf.get(..total) else {
            return Ok(Frame::Incomplete);
        };
        let data = &packet[8..8 + data_len];
        let crc = &packet[8 + data_len..];
        let codec = data[0];
        if codec != CODEC_8 && codec != CODEC_8E {
            return Err(Refusal::Garbage(format!(
                "codec id 0x{codec:02X} (8 and 8E are spoken here)"
            )));
        }
        let declared = data[1];
        let value = if u32::from(crc16_ibm(data))
            != u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]])
        {
            Packet::BadCrc { declared }
        } else {
            match records(codec, data) {
                Ok(records)
                    if records.len() == usize::from(declared) && data[data_len - 1] == declared =>
                {
                    Packet::Records(records)
                }
                _ => Packet::BadCount { declared },
            }
        };
        Ok(Frame::Complete { value, len: total })
    }

    fn packet_reply(&self, accepted: usize) -> Vec<u8> {
        u32::try_from(accepted).unwrap_or(0).to_be_bytes().to_vec()
    }
}

/// CRC-16/IBM (also ARC): polynomial 0x8005 reflected (0xA001), initial 0.
pub fn crc16_ibm(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// A cursor over the data field; `None` when it runs out.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn uint(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    /// A 1-byte (Codec 8) or 2-byte (Codec 8E) id or count.
    fn small(&mut self, extended: bool) -> Option<u64> {
        self.uint(if extended { 2 } else { 1 })
    }
}

/// The records of a data field whose CRC matched; `Err` when they do not
/// fit the length (a wrong count, or a malformed record).
fn records(codec: u8, data: &[u8]) -> Result<Vec<TrackerRecord>, ()> {
    let extended = codec == CODEC_8E;
    let count = usize::from(data[1]);
    let mut r = Reader {
        data: &data[..data.len() - 1],
        at: 2,
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push(record(&mut r, extended, codec).ok_or(())?);
    }
    if r.at != r.data.len() {
        return Err(());
    }
    Ok(out)
}

fn record(r: &mut Reader<'_>, extended: bool, codec: u8) -> Option<TrackerRecord> {
    let timestamp = r.uint(8)?;
    let priority = r.uint(1)?;
    let longitude = i32::from_be_bytes(r.take(4)?.try_into().ok()?);
    let latitude = i32::from_be_bytes(r.take(4)?.try_into().ok()?);
    let altitude = i16::from_be_bytes(r.take(2)?.try_into().ok()?);
    let angle = r.uint(2)?;
    let satellites = r.uint(1)?;
    let speed = r.uint(2)?;
    let event_io = r.small(extended)?;
    let _total = r.small(extended)?;
    let mut io = Map::new();
    for width in [1usize, 2, 4, 8] {
        for _ in 0..r.small(extended)? {
            let id = r.small(extended)?;
            io.insert(id.to_string(), json!(r.uint(width)?));
        }
    }
    if extended {
        for _ in 0..r.uint(2)? {
            let id = r.uint(2)?;
            let len = usize::try_from(r.uint(2)?).ok()?;
            let bytes = r.take(len)?;
            let mut hex = String::new();
            georelay_core::ids::push_hex(&mut hex, bytes);
            io.insert(id.to_string(), Value::String(hex));
        }
    }
    let payload = json!({
        "timestamp": timestamp,
        "priority": priority,
        "longitude": f64::from(longitude) / 1e7,
        "latitude": f64::from(latitude) / 1e7,
        "altitude": altitude,
        "angle": angle,
        "satellites": satellites,
        "speed": speed,
        "event_io": event_io,
        "io": io,
        "codec": if codec == CODEC_8E { "8E" } else { "8" },
    });
    Some(TrackerRecord {
        timestamp_ms: timestamp,
        payload,
    })
}

/// The tracker's side: packets as a tracker sends them (Codec 8 and 8
/// Extended, with the CRC) and its connection, for the simulator
/// (`georelay agent simulate-tracker`) and the tests.
pub mod device {
    use super::crc16_ibm;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A connected tracker.
    #[derive(Debug)]
    pub struct Tracker {
        pub stream: TcpStream,
    }

    fn timed_out(what: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no {what} in time"))
    }

    impl Tracker {
        /// Connects and shakes hands; the server's one-byte answer (1:
        /// accepted).
        pub async fn connect(addr: &str, imei: &str) -> std::io::Result<(Self, u8)> {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(&handshake(imei)).await?;
            let mut answer = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer))
                .await
                .map_err(|_| timed_out("handshake answer"))??;
            Ok((Self { stream }, answer[0]))
        }

        /// Sends bytes and reads the four-byte answer: the records accepted.
        pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<u32> {
            self.stream.write_all(bytes).await?;
            let mut answer = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(30), self.stream.read_exact(&mut answer))
                .await
                .map_err(|_| timed_out("packet answer"))??;
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
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The specification's Codec 8 example: one record, IO of every width.
    pub const CODEC8_ONE: &str = "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF";
    /// The specification's Codec 8 Extended example: one record with a
    /// variable-length IO element group (empty).
    pub const CODEC8E_ONE: &str = "000000000000004A8E010000016B412CEE000100000000000000000000000000000000010005000100010100010011001D00010010015E2C880002000B000000003544C87A000E000000001DD7E06A00000100002994";

    fn parse(bytes: &[u8]) -> Packet {
        match Teltonika.packet(bytes, 4096).unwrap() {
            Frame::Complete { value, len } => {
                assert_eq!(len, bytes.len());
                value
            }
            Frame::Incomplete => panic!("incomplete"),
        }
    }

    #[test]
    fn the_specifications_codec_8_example_parses() {
        let Packet::Records(records) = parse(&hex(CODEC8_ONE)) else {
            panic!("not accepted")
        };
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.timestamp_ms, 0x0000_016B_40D8_EA30);
        assert_eq!(r.payload["priority"], 1);
        assert_eq!(r.payload["event_io"], 1);
        assert_eq!(r.payload["io"]["21"], 3);
        assert_eq!(r.payload["io"]["1"], 1);
        assert_eq!(r.payload["io"]["66"], 0x5E0F);
        assert_eq!(r.payload["io"]["241"], 0x601A);
        assert_eq!(r.payload["io"]["78"], 0);
    }

    #[test]
    fn the_specifications_codec_8e_example_parses() {
        let Packet::Records(records) = parse(&hex(CODEC8E_ONE)) else {
            panic!("not accepted")
        };
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.timestamp_ms, 0x0000_016B_412C_EE00);
        assert_eq!(r.payload["codec"], "8E");
        assert_eq!(r.payload["io"]["1"], 1);
        assert_eq!(r.payload["io"]["17"], 0x1D);
        assert_eq!(r.payload["io"]["16"], 0x015E_2C88);
        assert_eq!(r.payload["io"]["11"], 0x3544_C87A);
        assert_eq!(r.payload["io"]["14"], 0x1DD7_E06A);
    }

    #[test]
    fn a_bad_crc_and_a_wrong_count_are_told_apart_from_garbage() {
        let mut bad_crc = hex(CODEC8_ONE);
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 0xFF;
        assert!(matches!(parse(&bad_crc), Packet::BadCrc { declared: 1 }));

        // Count 2 declared, one record sent (CRC made right).
        let mut wrong = hex(CODEC8_ONE);
        wrong[9] = 2;
        let n = wrong.len();
        wrong[n - 5] = 2;
        let crc = crc16_ibm(&wrong[8..n - 4]);
        wrong[n - 2..].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(parse(&wrong), Packet::BadCount { declared: 2 }));

        assert!(matches!(
            Teltonika.packet(b"GET / HTTP/1.1\r\n", 4096),
            Err(Refusal::Garbage(_))
        ));
        assert!(matches!(
            Teltonika.packet(&[0, 0, 1], 4096),
            Err(Refusal::Garbage(_))
        ));
    }

    #[test]
    fn a_packet_arrives_in_pieces_and_a_huge_length_is_refused_before_it_is_read() {
        let bytes = hex(CODEC8_ONE);
        for cut in 0..bytes.len() {
            assert!(matches!(
                Teltonika.packet(&bytes[..cut], 4096),
                Ok(Frame::Incomplete)
            ));
        }
        let mut huge = bytes[..8].to_vec();
        huge[4..8].copy_from_slice(&1_000_000u32.to_be_bytes());
        assert!(matches!(
            Teltonika.packet(&huge, 4096),
            Err(Refusal::Garbage(_))
        ));
    }

    #[test]
    fn what_is_encoded_parses_back() {
        use super::device::{packet, Avl, Codec};
        for codec in [Codec::C8, Codec::C8E] {
            let mut records: Vec<Avl> = (0..5)
                .map(|i| Avl::at(1_795_996_800_000 + i * 1000))
                .collect();
            records[2].latitude = -33.5;
            if codec == Codec::C8E {
                records[3].iox.push((10_348, vec![1, 2, 255]));
                records[3].io2.push((300, 7));
            }
            let Packet::Records(parsed) = parse(&packet(codec, &records)) else {
                panic!("{codec:?} not accepted")
            };
            assert_eq!(parsed.len(), 5);
            for (r, p) in records.iter().zip(&parsed) {
                assert_eq!(p.timestamp_ms, r.timestamp_ms);
                assert_eq!(p.payload["latitude"], r.latitude);
                assert_eq!(p.payload["speed"], r.speed);
                for (id, v) in &r.io4 {
                    assert_eq!(p.payload["io"][id.to_string()], *v);
                }
            }
            if codec == Codec::C8E {
                assert_eq!(parsed[3].payload["io"]["10348"], "0102ff");
            }
        }
    }

    #[test]
    fn the_handshake_reads_the_imei() {
        let mut hello = vec![0x00, 0x0F];
        hello.extend_from_slice(b"356307042441013");
        match Teltonika.handshake(&hello).unwrap() {
            Frame::Complete { value, len } => {
                assert_eq!((value.as_str(), len), ("356307042441013", 17));
            }
            Frame::Incomplete => panic!("incomplete"),
        }
        assert!(matches!(
            Teltonika.handshake(&hello[..5]),
            Ok(Frame::Incomplete)
        ));
        assert!(Teltonika.handshake(&[0x10, 0x00]).is_err());
        assert!(Teltonika.handshake(b"\x00\x03a;b").is_err());
        assert_eq!(Teltonika.packet_reply(3), vec![0, 0, 0, 3]);
        assert_eq!(Teltonika.handshake_reply(false), vec![0]);
    }
}
