//! Secrets at rest, sealed with the master key.
//!
//! Device keys and Service Bus SAS keys are stored only in this sealed form
//! (`devices.key_sealed`, `namespaces.key_sealed`). The master key comes from
//! `GEORELAY_MASTER_KEY` (base64 of 32 bytes) and is never stored.
//!
//! Sealed layout, all in one `bytea`:
//!
//! ```text
//! [0]      format version (1)
//! [1..5]   master key id: the first 4 bytes of SHA-256("georelay master key id" || key)
//! [5..17]  random 96-bit nonce
//! [17..]   AES-256-GCM ciphertext and 16-byte tag; AAD = format byte, key id, context
//! ```
//!
//! The context names what the secret belongs to (for example
//! `device-key:plug-1`), so a sealed value copied onto another row does not
//! open there. The key id lets a wrong master key be reported as such, and lets
//! a later rotation hold several master keys and pick the right one.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use zeroize::Zeroizing;

use crate::record::{KEY_LEN, NONCE_LEN, TAG_LEN};

const FORMAT_V1: u8 = 1;
const HEADER_LEN: usize = 1 + 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("GEORELAY_MASTER_KEY must be base64 of exactly 32 bytes")]
    MalformedMasterKey,
    #[error("sealed secret is malformed or of an unknown format")]
    Format,
    #[error("secret was sealed with master key {sealed_with}, but the configured master key is {configured}")]
    WrongMasterKey {
        sealed_with: KeyId,
        configured: KeyId,
    },
    #[error("sealed secret does not authenticate (tampered, or moved from another row)")]
    Tampered,
    #[error("secret is too large to seal")]
    TooLarge,
}

/// A short, public fingerprint of a master key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; 4]);

impl KeyId {
    /// The first bytes of every value this key seals: format version, then id.
    pub fn sealed_header(self) -> [u8; HEADER_LEN] {
        [FORMAT_V1, self.0[0], self.0[1], self.0[2], self.0[3]]
    }

    /// The key id a sealed value names, if it is of a known format.
    pub fn of_sealed(sealed: &[u8]) -> Option<Self> {
        match sealed {
            [FORMAT_V1, a, b, c, d, ..] => Some(Self([*a, *b, *c, *d])),
            _ => None,
        }
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The master key. Zeroed on drop; `Debug` shows only its id.
pub struct MasterKey {
    key: Zeroizing<[u8; KEY_LEN]>,
    id: KeyId,
}

impl MasterKey {
    pub fn from_base64(s: &str) -> Result<Self, SecretError> {
        let bytes = Zeroizing::new(
            B64.decode(s.trim())
                .map_err(|_| SecretError::MalformedMasterKey)?,
        );
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SecretError::MalformedMasterKey)?;
        let key = Zeroizing::new(key);
        let digest = Sha256::new()
            .chain_update(b"georelay master key id")
            .chain_update(key.as_ref())
            .finalize();
        let id = KeyId([digest[0], digest[1], digest[2], digest[3]]);
        Ok(Self { key, id })
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Seals `secret` for `context`, with a fresh random nonce.
    pub fn seal(&self, context: &str, secret: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let header = self.id.sealed_header();
        let aad = [&header[..], context.as_bytes()].concat();
        let ciphertext = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::TooLarge)?;
        Ok([&header[..], &nonce, &ciphertext].concat())
    }

    /// Opens a value sealed by [`seal`](Self::seal) for the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        if sealed.len() < HEADER_LEN + NONCE_LEN + TAG_LEN {
            return Err(SecretError::Format);
        }
        let sealed_with = KeyId::of_sealed(sealed).ok_or(SecretError::Format)?;
        if sealed_with != self.id {
            return Err(SecretError::WrongMasterKey {
                sealed_with,
                configured: self.id,
            });
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = [header, context.as_bytes()].concat();
        self.cipher()
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SecretError::Tampered)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.key.as_ref().into())
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

/// The sealing context of a device's key.
pub fn device_key_context(device_id: &str) -> String {
    format!("device-key:{device_id}")
}

/// The sealing context of a namespace's SAS key.
pub fn namespace_key_context(namespace: &str) -> String {
    format!("namespace-key:{namespace}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_base64(&B64.encode([byte; KEY_LEN])).unwrap()
    }

    #[test]
    fn round_trip_and_layout() {
        let m = master(1);
        let sealed = m.seal("device-key:a", b"secret bytes").unwrap();
        assert_eq!(
            sealed.len(),
            HEADER_LEN + NONCE_LEN + b"secret bytes".len() + TAG_LEN
        );
        assert_eq!(KeyId::of_sealed(&sealed), Some(m.id()));
        assert_eq!(
            m.open("device-key:a", &sealed).unwrap().as_slice(),
            b"secret bytes"
        );
        assert!(!sealed.windows(12).any(|w| w == b"secret bytes"));
        assert_ne!(
            m.seal("device-key:a", b"secret bytes").unwrap(),
            sealed,
            "fresh nonce each time"
        );
    }

    #[test]
    fn wrong_master_key_is_named() {
        let sealed = master(1).seal("c", b"s").unwrap();
        let err = master(2).open("c", &sealed).unwrap_err();
        assert_eq!(
            err,
            SecretError::WrongMasterKey {
                sealed_with: master(1).id(),
                configured: master(2).id()
            }
        );
        assert!(err.to_string().contains(&master(1).id().to_string()));
    }

    #[test]
    fn tampering_or_another_context_fails() {
        let m = master(1);
        let sealed = m.seal("device-key:a", b"s").unwrap();
        assert_eq!(
            m.open("device-key:b", &sealed).unwrap_err(),
            SecretError::Tampered
        );
        for i in HEADER_LEN..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert_eq!(
                m.open("device-key:a", &t).unwrap_err(),
                SecretError::Tampered,
                "byte {i}"
            );
        }
        assert_eq!(
            m.open("device-key:a", &sealed[..10]).unwrap_err(),
            SecretError::Format
        );
        let mut unknown = sealed.clone();
        unknown[0] = 9;
        assert_eq!(
            m.open("device-key:a", &unknown).unwrap_err(),
            SecretError::Format
        );
    }

    #[test]
    fn malformed_master_keys_are_refused() {
        for bad in [
            "",
            "not base64!",
            &B64.encode([0u8; 16]),
            &B64.encode([0u8; 33]),
        ] {
            assert_eq!(
                MasterKey::from_base64(bad).unwrap_err(),
                SecretError::MalformedMasterKey
            );
        }
        assert_eq!(
            format!("{:?}", master(3)),
            format!("MasterKey({})", master(3).id())
        );
    }
}
