//! Identifiers that cross process boundaries.
//!
//! A device id appears in URLs, in the AAD `"{device_id}/{seq}"` and in broker
//! message ids `"{device_id}/{seq}/{digest}"`, so it must never contain `/`, white space
//! or anything a URL would escape. The same rule is a CHECK constraint on
//! `devices.id` (migrations/0001_control_plane.sql).

use std::fmt;
use std::str::FromStr;

/// The largest sequence number: `telemetry.seq` is a PostgreSQL `bigint`.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// Longest device id accepted.
pub const MAX_DEVICE_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("device id must be 1 to {MAX_DEVICE_ID_LEN} characters")]
    DeviceIdLength,
    #[error("device id must start with a letter or digit and contain only letters, digits, '.', '_', ':' and '-'")]
    DeviceIdCharacters,
}

/// A validated device id: 1 to 128 characters of `[A-Za-z0-9._:-]`, starting
/// with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() || s.len() > MAX_DEVICE_ID_LEN {
            return Err(IdError::DeviceIdLength);
        }
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok =
            chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
        if !(first_ok && rest_ok) {
            return Err(IdError::DeviceIdCharacters);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The record id `"{device_id}/{seq}"`: the AAD of the record's sealing
    /// (the broker's id adds a digest of the content:
    /// [`crate::SealedRecord::message_id`]).
    pub fn record_id(&self, seq: u64) -> String {
        format!("{}/{}", self.0, seq)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Appends `bytes` in lowercase hex (message ids are built per record on
/// the publish path: a table, not a `write!` per byte).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        for ok in [
            "a",
            "plug-0001",
            "site.7:meter_2",
            &"x".repeat(MAX_DEVICE_ID_LEN),
        ] {
            assert_eq!(
                DeviceId::parse(ok).map(|d| d.to_string()),
                Ok(ok.to_string())
            );
        }
    }

    #[test]
    fn rejects_ids_that_would_break_aad_or_urls() {
        assert_eq!(DeviceId::parse(""), Err(IdError::DeviceIdLength));
        assert_eq!(
            DeviceId::parse(&"x".repeat(MAX_DEVICE_ID_LEN + 1)),
            Err(IdError::DeviceIdLength)
        );
        for bad in ["a/b", "a b", "-lead", ".lead", "ünï", "a%2F", "a\n"] {
            assert_eq!(
                DeviceId::parse(bad),
                Err(IdError::DeviceIdCharacters),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn hex_is_two_lowercase_digits_a_byte() {
        let mut s = String::from("x/");
        push_hex(&mut s, &[0x00, 0xab, 0x0f, 0xf0, 0x9c]);
        assert_eq!(s, "x/00ab0ff09c");
    }

    #[test]
    fn record_id_is_device_slash_seq() {
        let d = DeviceId::parse("plug-1").unwrap();
        assert_eq!(d.record_id(42), "plug-1/42");
    }
}
