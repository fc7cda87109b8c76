//! The telemetry record and its AES-256-GCM sealing.
//!
//! A plug computer seals a JSON object under its 256-bit device key with a
//! 12-byte nonce and the AAD `"{device_id}/{seq}"`, and sends
//! `{"seq", "nonce", "ciphertext"}` (base64, the ciphertext carrying its
//! 16-byte tag). Binding device id and seq in the AAD means a record cannot be
//! replayed under another device or another seq: it opens only where it was
//! sealed for.
//!
//! Nonces must never repeat under one key. This module does not pick them: the
//! sender does (the agent derives them from the seq it has persisted).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroizing;

use crate::ids::{DeviceId, MAX_SEQ};

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// Why a record is refused. The HTTP layer maps these to status codes in one
/// place; the drain worker maps them to dead-letter reasons.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("seq must be between 1 and {MAX_SEQ}")]
    SeqOutOfRange,
    #[error("{field} is not valid base64")]
    Base64 { field: &'static str },
    #[error("nonce must be {NONCE_LEN} bytes, got {0}")]
    NonceLength(usize),
    #[error("ciphertext must be at least the {TAG_LEN}-byte tag")]
    CiphertextTooShort,
    /// Wrong key, wrong device id or seq, or tampered bytes: GCM cannot tell
    /// which, and neither should the caller's answer.
    #[error("record does not authenticate")]
    Authentication,
    #[error("plaintext is not a JSON object")]
    NotJsonObject,
    /// PostgreSQL's `jsonb` cannot store U+0000; refused at the edge so a
    /// record that got a 202 can always be stored.
    #[error("plaintext contains \\u0000, which cannot be stored")]
    NulCharacter,
}

/// A device's AES-256 key. Zeroed on drop; never printed by `Debug`.
#[derive(Clone)]
pub struct DeviceKey(Zeroizing<[u8; KEY_LEN]>);

impl DeviceKey {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        Self(key)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }

    pub fn from_base64(s: &str) -> Option<Self> {
        let bytes = Zeroizing::new(B64.decode(s.trim()).ok()?);
        Self::from_bytes(&bytes)
    }

    /// The key as base64, for printing once to the operator who provisions
    /// the device.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.0.as_ref()))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.as_ref().into())
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

/// The JSON body of one record, as it travels over HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    pub seq: u64,
    /// base64 of 12 bytes
    pub nonce: String,
    /// base64 of the AES-256-GCM ciphertext followed by its 16-byte tag
    pub ciphertext: String,
}

/// A decoded, well-formed (not yet authenticated) record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    pub seq: u64,
    pub nonce: [u8; NONCE_LEN],
    /// ciphertext with the tag appended
    pub ciphertext: Vec<u8>,
}

/// Hex digits of content digest in a [`SealedRecord::message_id`] (128 bits).
const MESSAGE_ID_DIGEST_HEX: usize = 32;

impl SealedRecord {
    /// The broker's duplicate-detection id, `"{device}/{seq}/{digest}"`: the
    /// digest (128 bits of SHA-256 over nonce and ciphertext, in hex) covers
    /// the content. A re-send of the identical record has the same id and is
    /// dropped by the broker; a *different* record under a reused seq has
    /// another, so it reaches the worker, which keeps it as a `seq_conflict`
    /// (with an id of `"{device}/{seq}"` the broker dropped it and the device
    /// had a 202 for a record that vanished). Nobody who can write to a queue
    /// can take a future record's id without knowing its ciphertext.
    pub fn message_id(&self, device: &DeviceId) -> String {
        use sha2::{Digest, Sha256};
        use std::fmt::Write as _;
        let digest = Sha256::new()
            .chain_update(self.nonce)
            .chain_update(&self.ciphertext)
            .finalize();
        let mut id = String::with_capacity(device.as_str().len() + 22 + MESSAGE_ID_DIGEST_HEX);
        // Writing to a String cannot fail.
        let _ = write!(id, "{device}/{}/", self.seq);
        crate::ids::push_hex(&mut id, &digest[..MESSAGE_ID_DIGEST_HEX / 2]);
        id
    }

    /// Decodes and checks the shape of a wire record: seq range, base64,
    /// nonce length, room for the tag.
    pub fn from_body(body: &RecordBody) -> Result<Self, RecordError> {
        check_seq(body.seq)?;
        let nonce = B64
            .decode(&body.nonce)
            .map_err(|_| RecordError::Base64 { field: "nonce" })?;
        let nonce: [u8; NONCE_LEN] = nonce
            .as_slice()
            .try_into()
            .map_err(|_| RecordError::NonceLength(nonce.len()))?;
        let ciphertext = B64
            .decode(&body.ciphertext)
            .map_err(|_| RecordError::Base64 {
                field: "ciphertext",
            })?;
        if ciphertext.len() < TAG_LEN {
            return Err(RecordError::CiphertextTooShort);
        }
        Ok(Self {
            seq: body.seq,
            nonce,
            ciphertext,
        })
    }

    pub fn to_body(&self) -> RecordBody {
        RecordBody {
            seq: self.seq,
            nonce: B64.encode(self.nonce),
            ciphertext: B64.encode(&self.ciphertext),
        }
    }

    /// Seals `plaintext` for `device` at `seq`. The caller guarantees that
    /// `nonce` is never used twice with `key`.
    pub fn seal(
        key: &DeviceKey,
        device: &DeviceId,
        seq: u64,
        nonce: [u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<Self, RecordError> {
        check_seq(seq)?;
        let aad = device.record_id(seq);
        let ciphertext = key
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| RecordError::Authentication)?;
        Ok(Self {
            seq,
            nonce,
            ciphertext,
        })
    }

    /// Checks the tag under `key` and the AAD `"{device}/{seq}"` and returns
    /// the plaintext.
    pub fn open(
        &self,
        key: &DeviceKey,
        device: &DeviceId,
    ) -> Result<Zeroizing<Vec<u8>>, RecordError> {
        let aad = device.record_id(self.seq);
        key.cipher()
            .decrypt(
                Nonce::from_slice(&self.nonce),
                Payload {
                    msg: &self.ciphertext,
                    aad: aad.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| RecordError::Authentication)
    }

    /// [`open`](Self::open), then requires the plaintext to be a JSON object
    /// with no NUL (PostgreSQL's jsonb cannot hold one). Returns the
    /// plaintext as the device wrote it: stored as is, numbers keep every
    /// digit (a parse into `f64` and back would round them).
    pub fn open_object(&self, key: &DeviceKey, device: &DeviceId) -> Result<String, RecordError> {
        let mut plaintext = self.open(key, device)?;
        match serde_json::from_slice(&plaintext) {
            Ok(Walked {
                object: true,
                nul: false,
            }) => {}
            Ok(Walked {
                object: true,
                nul: true,
            }) => return Err(RecordError::NulCharacter),
            _ => return Err(RecordError::NotJsonObject),
        }
        // Parsed as JSON, so UTF-8; taken out without a copy.
        String::from_utf8(std::mem::take(&mut *plaintext)).map_err(|_| RecordError::NotJsonObject)
    }
}

/// What walking a JSON value found, without building it (a record is
/// checked on every request; a `serde_json::Value` would allocate every
/// key, string and map of it): whether it is an object, and whether any
/// string or key in it holds U+0000.
struct Walked {
    object: bool,
    nul: bool,
}

impl<'de> Deserialize<'de> for Walked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Walk)
    }
}

struct Walk;

impl Walk {
    const SCALAR: Walked = Walked {
        object: false,
        nul: false,
    };
}

impl<'de> serde::de::Visitor<'de> for Walk {
    type Value = Walked;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Walked, E> {
        Ok(Self::SCALAR)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Walked, E> {
        Ok(Self::SCALAR)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Walked, E> {
        Ok(Self::SCALAR)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Walked, E> {
        Ok(Self::SCALAR)
    }
    fn visit_unit<E>(self) -> Result<Walked, E> {
        Ok(Self::SCALAR)
    }
    fn visit_str<E>(self, v: &str) -> Result<Walked, E> {
        Ok(Walked {
            object: false,
            nul: v.contains('\0'),
        })
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Walked, A::Error> {
        let mut nul = false;
        while let Some(item) = seq.next_element::<Walked>()? {
            nul |= item.nul;
        }
        Ok(Walked { object: false, nul })
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Walked, A::Error> {
        let mut nul = false;
        while let Some((k, v)) = map.next_entry::<Walked, Walked>()? {
            nul |= k.nul || v.nul;
        }
        Ok(Walked { object: true, nul })
    }
}

fn check_seq(seq: u64) -> Result<(), RecordError> {
    if (1..=MAX_SEQ).contains(&seq) {
        Ok(())
    } else {
        Err(RecordError::SeqOutOfRange)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    fn sealed() -> (DeviceKey, DeviceId, SealedRecord) {
        let key = DeviceKey::generate();
        let dev = device("plug-1");
        let rec = SealedRecord::seal(&key, &dev, 7, [9; NONCE_LEN], br#"{"t":21.5}"#).unwrap();
        (key, dev, rec)
    }

    #[test]
    fn seal_open_round_trip_through_the_wire_body() {
        let (key, dev, rec) = sealed();
        let wire = serde_json::to_string(&rec.to_body()).unwrap();
        let body: RecordBody = serde_json::from_str(&wire).unwrap();
        let back = SealedRecord::from_body(&body).unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.open(&key, &dev).unwrap().as_slice(), br#"{"t":21.5}"#);
        let text = back.open_object(&key, &dev).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["t"],
            21.5
        );
    }

    #[test]
    fn the_message_id_covers_the_content() {
        let (key, dev, rec) = sealed();
        let id = rec.message_id(&dev);
        assert!(id.starts_with("plug-1/7/"), "{id}");
        assert_eq!(id.len(), "plug-1/7/".len() + MESSAGE_ID_DIGEST_HEX);
        assert_eq!(rec.clone().message_id(&dev), id, "same record, same id");
        let other = SealedRecord::seal(&key, &dev, 7, [9; NONCE_LEN], br#"{"t":22}"#).unwrap();
        assert_ne!(other.message_id(&dev), id, "same seq, other content");
        let mut renonced = rec.clone();
        renonced.nonce[0] ^= 1;
        assert_ne!(
            renonced.message_id(&dev),
            id,
            "same ciphertext, other nonce"
        );
    }

    #[test]
    fn any_flipped_bit_fails_to_open() {
        let (key, dev, rec) = sealed();
        for byte in 0..NONCE_LEN {
            let mut r = rec.clone();
            r.nonce[byte] ^= 1;
            assert_eq!(
                r.open(&key, &dev),
                Err(RecordError::Authentication),
                "nonce byte {byte}"
            );
        }
        let tag_start = rec.ciphertext.len() - TAG_LEN;
        for byte in 0..rec.ciphertext.len() {
            let mut r = rec.clone();
            r.ciphertext[byte] ^= 0x80;
            let part = if byte < tag_start {
                "ciphertext"
            } else {
                "tag"
            };
            assert_eq!(
                r.open(&key, &dev),
                Err(RecordError::Authentication),
                "{part} byte {byte}"
            );
        }
    }

    #[test]
    fn another_device_or_seq_or_key_fails_to_open() {
        let (key, dev, rec) = sealed();
        // "plug-1" and "plug-0" differ in one bit of the last byte.
        assert_eq!(
            rec.open(&key, &device("plug-0")),
            Err(RecordError::Authentication)
        );
        let other_seq = SealedRecord {
            seq: 6,
            ..rec.clone()
        };
        assert_eq!(other_seq.open(&key, &dev), Err(RecordError::Authentication));
        assert_eq!(
            rec.open(&DeviceKey::generate(), &dev),
            Err(RecordError::Authentication)
        );
        assert!(rec.open(&key, &dev).is_ok());
    }

    #[test]
    fn plaintext_must_be_a_json_object() {
        let key = DeviceKey::generate();
        let dev = device("plug-1");
        for bad in [
            &b"[1,2]"[..],
            b"42",
            b"\"s\"",
            b"not json",
            b"",
            br#"{"a":1} x"#,
            br#"{"a":1e999}"#,
            br#"{"a":[1,}"#,
        ] {
            let rec = SealedRecord::seal(&key, &dev, 1, [1; NONCE_LEN], bad).unwrap();
            assert_eq!(rec.open_object(&key, &dev), Err(RecordError::NotJsonObject));
        }
    }

    #[test]
    fn a_nul_character_is_refused() {
        let key = DeviceKey::generate();
        let dev = device("plug-1");
        for bad in [
            &br#"{"a":"x\u0000y"}"#[..],
            br#"{"\u0000":1}"#,
            br#"{"a":[{"b":"\u0000"}]}"#,
            br#"{"a":{"b":{"\u0000":[]}}}"#,
            br#"{"a":[[1,"\u0000"]]}"#,
        ] {
            let rec = SealedRecord::seal(&key, &dev, 1, [1; NONCE_LEN], bad).unwrap();
            assert_eq!(rec.open_object(&key, &dev), Err(RecordError::NulCharacter));
        }
        // An escaped backslash followed by "u0000" is plain text, not U+0000.
        let fine =
            SealedRecord::seal(&key, &dev, 1, [1; NONCE_LEN], br#"{"a":"\\u0000"}"#).unwrap();
        let text = fine.open_object(&key, &dev).unwrap();
        let nested = br#"{"a":{"b":[1,-2,2.5,null,true,"x"]},"c":{}}"#;
        let rec = SealedRecord::seal(&key, &dev, 1, [1; NONCE_LEN], nested).unwrap();
        assert_eq!(rec.open_object(&key, &dev).unwrap().as_bytes(), nested);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["a"],
            "\\u0000"
        );
    }

    #[test]
    fn malformed_wire_bodies_are_refused_by_kind() {
        let ok = sealed().2.to_body();
        let with = |f: &dyn Fn(&mut RecordBody)| {
            let mut b = ok.clone();
            f(&mut b);
            SealedRecord::from_body(&b)
        };
        assert_eq!(with(&|b| b.seq = 0), Err(RecordError::SeqOutOfRange));
        assert_eq!(
            with(&|b| b.seq = MAX_SEQ + 1),
            Err(RecordError::SeqOutOfRange)
        );
        assert_eq!(
            with(&|b| b.nonce = "!!".into()),
            Err(RecordError::Base64 { field: "nonce" })
        );
        assert_eq!(
            with(&|b| b.nonce = B64.encode([0u8; 8])),
            Err(RecordError::NonceLength(8))
        );
        assert_eq!(
            with(&|b| b.ciphertext = "%%".into()),
            Err(RecordError::Base64 {
                field: "ciphertext"
            })
        );
        assert_eq!(
            with(&|b| b.ciphertext = B64.encode([0u8; TAG_LEN - 1])),
            Err(RecordError::CiphertextTooShort)
        );
        assert!(with(&|_| ()).is_ok());
    }

    #[test]
    fn device_key_debug_does_not_show_the_key() {
        let key = DeviceKey::generate();
        assert_eq!(format!("{key:?}"), "DeviceKey(..)");
        let b64 = key.to_base64();
        assert_eq!(
            DeviceKey::from_base64(&b64).unwrap().as_bytes(),
            key.as_bytes()
        );
        assert!(DeviceKey::from_base64("c2hvcnQ=").is_none());
    }
}
