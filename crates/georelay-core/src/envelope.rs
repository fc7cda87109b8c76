//! The queue envelope: what ingest publishes and the worker receives.
//!
//! Ingest verifies a record and forwards it **still sealed** under the device
//! key, so telemetry is encrypted at rest in the broker. The envelope adds what
//! the worker needs to store it in order: the epoch it was published under
//! (a namespace can appear twice in a group's trail, A → B → A, and the worker
//! draining epoch 1 in A must stop at the first message of epoch 3) and when
//! ingest accepted it (`telemetry.received_at`).
//!
//! Binary, big-endian, versioned:
//!
//! ```text
//! [0]       format version (1)
//! [1..9]    epoch (u64)
//! [9..17]   received_at, microseconds since the Unix epoch (i64)
//! [17]      device id length n (1..=128)
//! [18..18+n] device id
//! then      seq (u64), nonce (12 bytes), ciphertext with its 16-byte tag
//! ```
//!
//! A queue message is one envelope, or a **bundle** of them: ingest joins
//! the records of concurrent single-record requests to one queue and epoch
//! into one broker message, so the broker stores and acks one message for
//! many records ([`bundle`], [`unbundle`]):
//!
//! ```text
//! [0]       format (2: a bundle)
//! [1..3]    count n (u16, 1..=MAX_BUNDLE)
//! then n ×  length (u32) and a format-1 envelope of that length
//! ```
//!
//! Each envelope of a bundle is stored, duplicate-checked and dead-lettered
//! on its own; a bundle whose framing does not parse is one `undecodable`
//! dead letter.

use bytes::{BufMut, Bytes, BytesMut};

use crate::ids::{DeviceId, MAX_DEVICE_ID_LEN, MAX_SEQ};
use crate::record::{SealedRecord, NONCE_LEN, TAG_LEN};

const FORMAT_V1: u8 = 1;
const FORMAT_BUNDLE: u8 = 2;
/// The most envelopes one bundle carries.
pub const MAX_BUNDLE: usize = 64;
/// A bundle's bytes besides its envelopes: format and count, then a length
/// per envelope ([`bundle_len`]).
const BUNDLE_HEAD: usize = 1 + 2;
const PART_HEAD: usize = 4;
const FIXED_LEN: usize = 1 + 8 + 8 + 1 + 8 + NONCE_LEN + TAG_LEN;

/// Why a queue message cannot be read as an envelope: the worker dead-letters
/// it as `undecodable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message is too short to be an envelope")]
    Truncated,
    #[error("unknown envelope format {0}")]
    Format(u8),
    #[error("envelope names an invalid device id")]
    DeviceId,
    #[error("envelope seq or epoch is out of range")]
    Range,
    #[error("envelope received_at ({0} µs since 1970) is outside 1970..=9999")]
    ReceivedAt(i64),
    #[error("bundle framing does not parse: {0}")]
    Bundle(&'static str),
}

/// `received_at` as ingest stamps it (its clock) is after 1970 and before
/// the year 10000; anything else was not written by ingest, and PostgreSQL
/// could not store some of it (`timestamptz` ends in 294276, chrono and the
/// wire format go further), which would hold up the whole batch.
pub const RECEIVED_AT_RANGE: std::ops::RangeInclusive<i64> = 0..=253_402_300_799_999_999;

/// A verified record on its way through a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub epoch: u64,
    pub received_at_micros: i64,
    pub device: DeviceId,
    pub record: SealedRecord,
}

impl Envelope {
    pub fn encode(&self) -> Bytes {
        encode(
            self.epoch,
            self.received_at_micros,
            &self.device,
            &self.record,
        )
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let mut r = Reader(bytes);
        match r.u8()? {
            FORMAT_V1 => {}
            other => return Err(EnvelopeError::Format(other)),
        }
        let epoch = r.u64()?;
        let received_at_micros = i64::from_be_bytes(r.array()?);
        let id_len = usize::from(r.u8()?);
        if id_len == 0 || id_len > MAX_DEVICE_ID_LEN {
            return Err(EnvelopeError::DeviceId);
        }
        let id = std::str::from_utf8(r.take(id_len)?).map_err(|_| EnvelopeError::DeviceId)?;
        let device = DeviceId::parse(id).map_err(|_| EnvelopeError::DeviceId)?;
        let seq = r.u64()?;
        let nonce: [u8; NONCE_LEN] = r.array()?;
        if r.0.len() < TAG_LEN {
            return Err(EnvelopeError::Truncated);
        }
        if !(1..=MAX_SEQ).contains(&seq) || !(1..=MAX_SEQ).contains(&epoch) {
            return Err(EnvelopeError::Range);
        }
        if !RECEIVED_AT_RANGE.contains(&received_at_micros) {
            return Err(EnvelopeError::ReceivedAt(received_at_micros));
        }
        Ok(Self {
            epoch,
            received_at_micros,
            device,
            record: SealedRecord {
                seq,
                nonce,
                ciphertext: r.0.to_vec(),
            },
        })
    }
}

/// The length of the envelope [`encode`] makes for `record` from `device`.
pub fn encoded_len(device: &DeviceId, record: &SealedRecord) -> usize {
    FIXED_LEN - TAG_LEN + device.as_str().len() + record.ciphertext.len()
}

/// The envelope of `record` from `device` under `epoch`, encoded without
/// first copying the record into an [`Envelope`] (ingest's publish path).
pub fn encode(
    epoch: u64,
    received_at_micros: i64,
    device: &DeviceId,
    record: &SealedRecord,
) -> Bytes {
    let id = device.as_str().as_bytes();
    let mut out = BytesMut::with_capacity(encoded_len(device, record));
    out.put_u8(FORMAT_V1);
    out.put_u64(epoch);
    out.put_i64(received_at_micros);
    // DeviceId guarantees 1..=128 bytes.
    out.put_u8(id.len() as u8);
    out.put_slice(id);
    out.put_u64(record.seq);
    out.put_slice(&record.nonce);
    out.put_slice(&record.ciphertext);
    out.freeze()
}

/// The size of a bundle of envelopes of these lengths.
pub fn bundle_len(envelope_lens: impl IntoIterator<Item = usize>) -> usize {
    BUNDLE_HEAD
        + envelope_lens
            .into_iter()
            .map(|n| PART_HEAD + n)
            .sum::<usize>()
}

/// How many of envelopes of these lengths, from the first, go in one
/// message of at most `max_bytes`: the first always (alone it is itself,
/// unframed); more while their bundle stays within [`MAX_BUNDLE`] envelopes
/// and `max_bytes`.
pub fn fitting(lens: impl IntoIterator<Item = usize>, max_bytes: usize) -> usize {
    let mut size = BUNDLE_HEAD;
    let mut n = 0;
    for len in lens.into_iter().take(MAX_BUNDLE) {
        size += PART_HEAD + len;
        if n > 0 && size > max_bytes {
            break;
        }
        n += 1;
    }
    n
}

/// One queue message carrying `envelopes` (1..=[`MAX_BUNDLE`] encoded
/// envelopes, in the order the worker is to store them).
pub fn bundle(envelopes: &[Bytes]) -> Bytes {
    assert!(
        (1..=MAX_BUNDLE).contains(&envelopes.len()),
        "a bundle carries 1..={MAX_BUNDLE} envelopes"
    );
    let mut out = BytesMut::with_capacity(bundle_len(envelopes.iter().map(Bytes::len)));
    out.put_u8(FORMAT_BUNDLE);
    out.put_u16(envelopes.len() as u16);
    for e in envelopes {
        // An envelope is far below 4 GiB: no broker carries that.
        out.put_u32(e.len() as u32);
        out.put_slice(e);
    }
    out.freeze()
}

/// A bundle's broker message id: `bundle/` and 128 bits of SHA-256 over its
/// envelopes' message ids (`SealedRecord::message_id`, which name each
/// record's content). The same records bundled again get the same id, and
/// the broker drops the copy; other content never shares an id, so the
/// broker's duplicate window never hides a record behind another bundle.
pub fn bundle_id<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for id in ids {
        hash.update((id.len() as u64).to_be_bytes());
        hash.update(id.as_bytes());
    }
    let mut out = String::from("bundle/");
    crate::ids::push_hex(&mut out, &hash.finalize()[..16]);
    out
}

/// The envelopes a queue message carries, in order, each still encoded
/// (slices of `message`, not copies): the message itself if it is one
/// envelope, or those of a bundle. `Err` when a bundle's framing does not
/// parse: the message as a whole is `undecodable`. An envelope inside is
/// not checked here; [`Envelope::decode`] judges each on its own.
pub fn unbundle(message: &Bytes) -> Result<Vec<Bytes>, EnvelopeError> {
    if message.first() != Some(&FORMAT_BUNDLE) {
        return Ok(vec![message.clone()]);
    }
    let mut r = Reader(&message[1..]);
    let count = usize::from(u16::from_be_bytes(r.array()?));
    if !(1..=MAX_BUNDLE).contains(&count) {
        return Err(EnvelopeError::Bundle("count outside 1..=64"));
    }
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_be_bytes(r.array()?) as usize;
        let start = message.len() - r.0.len();
        r.take(len)
            .map_err(|_| EnvelopeError::Bundle("an envelope runs past the end"))?;
        parts.push(message.slice(start..start + len));
    }
    if !r.0.is_empty() {
        return Err(EnvelopeError::Bundle("bytes after the last envelope"));
    }
    Ok(parts)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EnvelopeError> {
        if self.0.len() < n {
            return Err(EnvelopeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EnvelopeError> {
        self.take(N)?
            .try_into()
            .map_err(|_| EnvelopeError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, EnvelopeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, EnvelopeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::DeviceKey;

    fn envelope() -> Envelope {
        let key = DeviceKey::generate();
        let device = DeviceId::parse("plug-7").unwrap();
        let record = SealedRecord::seal(&key, &device, 42, [3; NONCE_LEN], br#"{"v":1}"#).unwrap();
        Envelope {
            epoch: 3,
            received_at_micros: 1_700_000_000_123_456,
            device,
            record,
        }
    }

    #[test]
    fn round_trip() {
        let e = envelope();
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        assert_eq!(encoded_len(&e.device, &e.record), e.encode().len());
    }

    #[test]
    fn every_truncation_short_of_the_tag_is_refused() {
        let bytes = envelope().encode();
        // version, epoch, received_at, id length, "plug-7", seq, nonce
        let header = 1 + 8 + 8 + 1 + 6 + 8 + NONCE_LEN;
        for n in 0..header + TAG_LEN {
            assert!(
                Envelope::decode(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        assert!(Envelope::decode(&bytes[..header + TAG_LEN]).is_ok());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut bytes = envelope().encode().to_vec();
        bytes[0] = 9;
        assert_eq!(Envelope::decode(&bytes), Err(EnvelopeError::Format(9)));

        let mut bytes = envelope().encode().to_vec();
        bytes[18] = b'/';
        assert_eq!(Envelope::decode(&bytes), Err(EnvelopeError::DeviceId));

        let mut bytes = envelope().encode().to_vec();
        bytes[17] = 0;
        assert_eq!(Envelope::decode(&bytes), Err(EnvelopeError::DeviceId));

        let mut e = envelope();
        e.record.seq = 0;
        assert_eq!(Envelope::decode(&e.encode()), Err(EnvelopeError::Range));
    }

    #[test]
    fn a_bundle_gives_back_its_envelopes_in_order() {
        let a = envelope().encode();
        let mut e = envelope();
        e.record.seq = 43;
        let b = e.encode();
        let message = bundle(&[a.clone(), b.clone()]);
        assert_eq!(message.len(), bundle_len([a.len(), b.len()]));
        assert_eq!(unbundle(&message).unwrap(), vec![a.clone(), b]);
        // A lone envelope is its own message.
        assert_eq!(unbundle(&a).unwrap(), vec![a]);
    }

    #[test]
    fn a_bundle_id_names_exactly_its_records() {
        let id = bundle_id(["plug-1/1/aa", "plug-1/2/bb"]);
        assert_eq!(id, bundle_id(["plug-1/1/aa", "plug-1/2/bb"]));
        assert_eq!(id.len(), "bundle/".len() + 32);
        for other in [
            bundle_id(["plug-1/1/aa", "plug-1/2/bc"]),
            bundle_id(["plug-1/2/bb", "plug-1/1/aa"]),
            bundle_id(["plug-1/1/aa"]),
            bundle_id(["plug-1/1/aaplug-1/2/bb"]),
        ] {
            assert_ne!(id, other);
        }
    }

    #[test]
    fn a_bundle_whose_framing_does_not_parse_is_refused() {
        let a = envelope().encode();
        let message = bundle(&[a.clone(), a.clone()]).to_vec();
        // Cut anywhere inside: an envelope runs past the end, or the count
        // or a length is missing.
        for n in 1..message.len() {
            let cut = Bytes::copy_from_slice(&message[..n]);
            assert!(unbundle(&cut).is_err(), "prefix of {n} bytes");
        }
        let mut longer = message.clone();
        longer.push(0);
        assert_eq!(
            unbundle(&Bytes::from(longer)),
            Err(EnvelopeError::Bundle("bytes after the last envelope"))
        );
        for count in [0u16, 65] {
            let mut bad = message.clone();
            bad[1..3].copy_from_slice(&count.to_be_bytes());
            assert_eq!(
                unbundle(&Bytes::from(bad)),
                Err(EnvelopeError::Bundle("count outside 1..=64"))
            );
        }
        // An envelope inside that is itself bad is left to `decode`.
        let junk = Bytes::from_static(b"junk");
        let parts = unbundle(&bundle(&[junk.clone(), a])).unwrap();
        assert_eq!(parts[0], junk);
        assert!(Envelope::decode(&parts[0]).is_err());
    }

    /// A `received_at` PostgreSQL cannot store would hold up its whole batch.
    #[test]
    fn received_at_outside_1970_to_9999_is_refused() {
        let mut e = envelope();
        for (micros, ok) in [
            (-1, false),
            (i64::MIN, false),
            (0, true),
            (253_402_300_799_999_999, true),
            (253_402_300_800_000_000, false),
            (i64::MAX, false),
        ] {
            e.received_at_micros = micros;
            let decoded = Envelope::decode(&e.encode());
            match ok {
                true => assert!(decoded.is_ok(), "{micros}"),
                false => assert_eq!(decoded, Err(EnvelopeError::ReceivedAt(micros))),
            }
        }
    }
}
