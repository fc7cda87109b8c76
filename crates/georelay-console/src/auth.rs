//! Who may act: a sign-in with the console token, a signed session cookie,
//! and a CSRF token in every form.
//!
//! - Reading needs nothing (bind the console to a private address). Acting
//!   needs a session, which the sign-in form gives for the token in
//!   `GEORELAY_CONSOLE_TOKEN` and a user name that the audit trail records
//!   (`console:NAME`). Without a token configured the console is read-only.
//! - The session cookie is `base64url(user).expiry.base64url(mac)`, the MAC an
//!   HMAC-SHA256 under a key drawn at start-up: it cannot be forged, and a
//!   restart ends every session. `HttpOnly; SameSite=Strict`.
//! - Every form carries `csrf` = HMAC of the session cookie: another site can
//!   neither read it nor (SameSite) send the cookie along.
//! - A wrong token holds further sign-ins back for a second (guessing).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

pub const SESSION_COOKIE: &str = "georelay_session";

/// A signed-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    /// The form token that goes with this session.
    pub csrf: String,
    cookie: String,
}

/// Why a sign-in was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    #[error("this console was started without GEORELAY_CONSOLE_TOKEN: it is read-only")]
    ReadOnly,
    #[error("a user name is 1 to 64 letters, digits, '.', '_', '-' or '@'")]
    BadUser,
    #[error("wrong token")]
    WrongToken,
    #[error("too many attempts: wait a second and try again")]
    Throttled,
}

pub struct Auth {
    /// The console token, kept only as its HMAC (compared in constant time).
    token_mac: Option<Vec<u8>>,
    key: Zeroizing<[u8; 32]>,
    session_length: Duration,
    next_attempt: Mutex<Instant>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("actions", &self.token_mac.is_some())
            .finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(token: Option<&str>, session_length: Duration) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, key.as_mut());
        let mut auth = Self {
            token_mac: None,
            key,
            session_length,
            next_attempt: Mutex::new(Instant::now()),
        };
        auth.token_mac = token.map(|t| auth.mac(&[b"token", t.as_bytes()]));
        auth
    }

    /// Whether actions can be enabled at all.
    pub fn actions_enabled(&self) -> bool {
        self.token_mac.is_some()
    }

    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        self.mac_state(parts).finalize().into_bytes().to_vec()
    }

    fn mac_state(&self, parts: &[&[u8]]) -> HmacSha256 {
        // A key of any length is accepted by HMAC.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(self.key.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    /// Checks a sign-in; the session cookie's value on success.
    pub fn sign_in(&self, user: &str, token: &str) -> Result<String, SignInError> {
        let Some(expected) = &self.token_mac else {
            return Err(SignInError::ReadOnly);
        };
        if !valid_user(user) {
            return Err(SignInError::BadUser);
        }
        let now = Instant::now();
        {
            let mut next = self.next_attempt.lock();
            if now < *next {
                return Err(SignInError::Throttled);
            }
            if self
                .mac_state(&[b"token", token.as_bytes()])
                .verify_slice(expected)
                .is_err()
            {
                *next = now + Duration::from_secs(1);
                return Err(SignInError::WrongToken);
            }
        }
        let expires = chrono::Utc::now().timestamp() + self.session_length.as_secs() as i64;
        Ok(self.cookie_for(user, expires))
    }

    fn cookie_for(&self, user: &str, expires: i64) -> String {
        let expires = expires.to_string();
        let mac = self.mac(&[b"session", user.as_bytes(), expires.as_bytes()]);
        format!(
            "{}.{expires}.{}",
            URL_SAFE_NO_PAD.encode(user),
            URL_SAFE_NO_PAD.encode(mac)
        )
    }

    /// The session a cookie value stands for: `None` when it is forged,
    /// expired, or from before a restart.
    pub fn session(&self, cookie: &str) -> Option<Session> {
        let mut parts = cookie.split('.');
        let (user, expires, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let user = String::from_utf8(URL_SAFE_NO_PAD.decode(user).ok()?).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        self.mac_state(&[b"session", user.as_bytes(), expires.as_bytes()])
            .verify_slice(&mac)
            .ok()?;
        if expires.parse::<i64>().ok()? <= chrono::Utc::now().timestamp() {
            return None;
        }
        let csrf = URL_SAFE_NO_PAD.encode(self.mac(&[b"csrf", cookie.as_bytes()]));
        Some(Session {
            user,
            csrf,
            cookie: cookie.to_owned(),
        })
    }

    /// Whether `csrf` is this session's form token (constant time).
    pub fn csrf_ok(&self, session: &Session, csrf: &str) -> bool {
        match URL_SAFE_NO_PAD.decode(csrf) {
            Ok(given) => self
                .mac_state(&[b"csrf", session.cookie.as_bytes()])
                .verify_slice(&given)
                .is_ok(),
            Err(_) => false,
        }
    }

    /// `Set-Cookie` for a new session.
    pub fn set_cookie(&self, value: &str) -> String {
        format!(
            "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
            self.session_length.as_secs()
        )
    }
}

/// `Set-Cookie` that ends the session.
pub fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

fn valid_user(user: &str) -> bool {
    (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(Some("s3cret-token"), Duration::from_secs(3600))
    }

    #[test]
    fn a_session_is_given_for_the_token_and_read_back() {
        let a = auth();
        let cookie = a.sign_in("alice", "s3cret-token").unwrap();
        let s = a.session(&cookie).unwrap();
        assert_eq!(s.user, "alice");
        assert!(a.csrf_ok(&s, &s.csrf));
    }

    #[test]
    fn a_wrong_token_is_refused_and_then_throttled() {
        let a = auth();
        assert_eq!(a.sign_in("alice", "guess"), Err(SignInError::WrongToken));
        assert_eq!(
            a.sign_in("alice", "s3cret-token"),
            Err(SignInError::Throttled)
        );
    }

    #[test]
    fn without_a_token_nobody_signs_in() {
        let a = Auth::new(None, Duration::from_secs(60));
        assert!(!a.actions_enabled());
        assert_eq!(a.sign_in("alice", ""), Err(SignInError::ReadOnly));
    }

    #[test]
    fn forged_expired_and_foreign_cookies_are_no_session() {
        let a = auth();
        let cookie = a.sign_in("alice", "s3cret-token").unwrap();
        // Another user name under alice's MAC.
        let (_, rest) = cookie.split_once('.').unwrap();
        let forged = format!("{}.{rest}", URL_SAFE_NO_PAD.encode("mallory"));
        assert_eq!(a.session(&forged), None);
        // Signed, but expired.
        let expired = a.cookie_for("alice", chrono::Utc::now().timestamp() - 1);
        assert_eq!(a.session(&expired), None);
        // Signed by another process (a restart draws a new key).
        assert_eq!(auth().session(&cookie), None);
        assert_eq!(a.session("garbage"), None);
    }

    #[test]
    fn a_csrf_token_belongs_to_its_session() {
        let a = auth();
        let one = a
            .session(&a.sign_in("alice", "s3cret-token").unwrap())
            .unwrap();
        *a.next_attempt.lock() = Instant::now();
        let other = a
            .session(&a.cookie_for("bob", chrono::Utc::now().timestamp() + 60))
            .unwrap();
        assert!(!a.csrf_ok(&one, &other.csrf));
        assert!(!a.csrf_ok(&one, ""));
        assert!(!a.csrf_ok(&one, "not base64!"));
    }

    #[test]
    fn user_names_are_checked() {
        let a = auth();
        assert_eq!(
            a.sign_in("<script>", "s3cret-token"),
            Err(SignInError::BadUser)
        );
        assert_eq!(a.sign_in("", "s3cret-token"), Err(SignInError::BadUser));
    }

    #[test]
    fn a_cookie_is_found_among_others() {
        assert_eq!(
            cookie("a=1; georelay_session=x.y.z; b=2", SESSION_COOKIE),
            Some("x.y.z")
        );
        assert_eq!(cookie("a=1", SESSION_COOKIE), None);
    }
}
