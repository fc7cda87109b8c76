//! A setting outside its allowed range, named as the operator sets it (the
//! command-line flag without its dashes). The service libraries' config
//! constructors return it, so a rule between settings lives with the code
//! that relies on it, not only in the binary.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{setting} must be {allowed} (got {got})")]
pub struct ConfigError {
    /// The flag's name, e.g. `lease`.
    pub setting: &'static str,
    /// The allowed range, in words.
    pub allowed: String,
    pub got: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, allowed: impl Into<String>, got: impl fmt::Debug) -> Self {
        Self {
            setting,
            allowed: allowed.into(),
            got: format!("{got:?}"),
        }
    }
}

/// `Err` unless `lo <= value <= hi`.
pub fn check_range<T: PartialOrd + fmt::Debug>(
    setting: &'static str,
    value: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if value < lo || value > hi {
        return Err(ConfigError::new(
            setting,
            format!("between {lo:?} and {hi:?}"),
            value,
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_the_flag_and_the_range() {
        let e = check_range(
            "lease",
            Duration::ZERO,
            Duration::from_millis(200),
            Duration::from_secs(3600),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--lease must be between 200ms and 3600s (got 0ns)"
        );
        assert_eq!(check_range("batch-size", 500, 1, 10_000), Ok(500));
    }
}
