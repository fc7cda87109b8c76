//! A namespace as the brokers need it: the transport, the endpoint and the
//! credentials (the "triplet" of namespace, key name and key). Defined here,
//! below the store and the transports, so the control plane can describe a
//! namespace and the transports can connect to it with one type.

use std::borrow::Cow;
use std::fmt;
use zeroize::Zeroizing;

/// `endpoint` fit to print or log: credentials written into it
/// (`scheme://user:pass@host`) are shown as `***`. Credentials belong in the
/// sealed key columns (a CHECK refuses new endpoints that carry them); rows
/// from before that may still have them.
pub fn redacted_endpoint(endpoint: &str) -> Cow<'_, str> {
    let Some(scheme_end) = endpoint.find("://").map(|i| i + 3) else {
        return Cow::Borrowed(endpoint);
    };
    let authority_end = endpoint[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(endpoint.len(), |i| scheme_end + i);
    match endpoint[scheme_end..authority_end].rfind('@') {
        Some(at) => Cow::Owned(format!(
            "{}***{}",
            &endpoint[..scheme_end],
            &endpoint[scheme_end + at..]
        )),
        None => Cow::Borrowed(endpoint),
    }
}

/// Which broker a namespace is. Stored as `namespaces.transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// A NATS JetStream server.
    Nats,
    /// An Azure Service Bus namespace (REST).
    ServiceBus,
}

impl TransportKind {
    pub const ALL: [TransportKind; 2] = [Self::Nats, Self::ServiceBus];

    /// The name in `namespaces.transport` and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nats => "nats",
            Self::ServiceBus => "servicebus",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to reach one namespace. Two triplets that compare equal reach the
/// same broker with the same credentials: a connection made for one serves
/// the other, and a changed triplet (a rotated key, a new endpoint) needs a
/// new connection.
#[derive(Clone, PartialEq, Eq)]
pub struct Triplet {
    pub transport: TransportKind,
    pub endpoint: String,
    /// The SAS policy name (Service Bus).
    pub key_name: Option<String>,
    /// The opened key; never printed.
    pub key: Option<Zeroizing<String>>,
}

impl Triplet {
    /// A NATS server without credentials.
    pub fn nats(endpoint: impl Into<String>) -> Self {
        Self {
            transport: TransportKind::Nats,
            endpoint: endpoint.into(),
            key_name: None,
            key: None,
        }
    }
}

impl fmt::Debug for Triplet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Triplet")
            .field("transport", &self.transport)
            .field("endpoint", &redacted_endpoint(&self.endpoint))
            .field("key_name", &self.key_name)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_an_endpoint_are_not_printed() {
        for (given, shown) in [
            (
                "nats://alice:s3cret@10.0.0.1:4222",
                "nats://***@10.0.0.1:4222",
            ),
            (
                "tls://token@nats.example:4222/x@y",
                "tls://***@nats.example:4222/x@y",
            ),
            ("nats://10.0.0.1:4222", "nats://10.0.0.1:4222"),
            (
                "https://ns.servicebus.windows.net/",
                "https://ns.servicebus.windows.net/",
            ),
            ("no scheme@host", "no scheme@host"),
        ] {
            assert_eq!(redacted_endpoint(given), shown);
        }
    }

    #[test]
    fn transport_names_round_trip() {
        for k in TransportKind::ALL {
            assert_eq!(TransportKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(TransportKind::parse("kafka"), None);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let t = Triplet {
            transport: TransportKind::ServiceBus,
            endpoint: "https://ns.servicebus.windows.net".into(),
            key_name: Some("send".into()),
            key: Some(Zeroizing::new("s3cret-key".into())),
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("s3cret-key"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}
