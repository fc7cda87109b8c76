//! What a device may ask about its own records: which of them are stored
//! (`GET /v1/devices/{id}/progress?after=N`). The request is authenticated
//! with an HMAC under the device key over the device id, `after` and a
//! time, so nobody else learns a device's progress and an old request
//! cannot be replayed beyond [`MAX_SKEW_MS`]; no record contents are
//! revealed either way.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{DeviceId, DeviceKey};

/// The request header that carries `t=<unix ms>,mac=<base64>`.
pub const HEADER: &str = "x-georelay-progress-auth";

/// How far the request's time may be from the server's.
pub const MAX_SKEW_MS: i64 = 300_000;

fn mac(key: &DeviceKey, device: &DeviceId, after: u64, t_ms: i64) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(format!("georelay progress\n{device}\n{after}\n{t_ms}").as_bytes());
    mac
}

/// The header value for a request made at `t_ms`.
pub fn header(key: &DeviceKey, device: &DeviceId, after: u64, t_ms: i64) -> String {
    use base64::Engine as _;
    let tag = mac(key, device, after, t_ms).finalize().into_bytes();
    format!(
        "t={t_ms},mac={}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// Whether `value` authenticates a request for `after` at a time within
/// [`MAX_SKEW_MS`] of `now_ms` (constant-time comparison).
pub fn verify(key: &DeviceKey, device: &DeviceId, after: u64, value: &str, now_ms: i64) -> bool {
    use base64::Engine as _;
    let mut t = None;
    let mut tag = None;
    for part in value.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("mac", v)) => tag = base64::engine::general_purpose::STANDARD.decode(v).ok(),
            _ => return false,
        }
    }
    let (Some(t), Some(tag)) = (t, tag) else {
        return false;
    };
    if (now_ms - t).abs() > MAX_SKEW_MS {
        return false;
    }
    mac(key, device, after, t).verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_verifies_only_for_its_device_after_key_and_time() {
        let key = DeviceKey::generate();
        let device = DeviceId::parse("plug-1").unwrap();
        let h = header(&key, &device, 5, 1_000_000);
        assert!(verify(&key, &device, 5, &h, 1_000_000));
        assert!(verify(&key, &device, 5, &h, 1_000_000 + MAX_SKEW_MS));
        assert!(
            !verify(&key, &device, 5, &h, 1_000_000 + MAX_SKEW_MS + 1),
            "too old"
        );
        assert!(!verify(&key, &device, 6, &h, 1_000_000), "another after");
        let other = DeviceId::parse("plug-2").unwrap();
        assert!(!verify(&key, &other, 5, &h, 1_000_000), "another device");
        assert!(
            !verify(&DeviceKey::generate(), &device, 5, &h, 1_000_000),
            "another key"
        );
        assert!(!verify(&key, &device, 5, "t=1000000", 1_000_000));
        assert!(!verify(&key, &device, 5, "garbage", 1_000_000));
        assert!(!verify(
            &key,
            &device,
            5,
            &h.replace("t=1000000", "t=1000001"),
            1_000_000
        ));
    }
}
