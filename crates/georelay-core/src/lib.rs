//! georelay-core: the types every georelay process agrees on, with no I/O.
//!
//! - [`ids`]: device ids and sequence numbers, validated once at the edge so
//!   everything behind it can trust them (they appear in AADs, broker message
//!   ids and URLs).
//! - [`record`]: the telemetry record as plug computers send it and its
//!   AES-256-GCM sealing, with the AAD `"{device_id}/{seq}"` of the HTTP
//!   contract. A record opens only under the key, device id and seq it was
//!   sealed for.
//! - [`envelope`]: the binary queue message: the still-sealed record plus the
//!   epoch it was published under and when ingest accepted it.
//! - [`secret`]: sealing of secrets at rest (device keys, SAS keys) with the
//!   master key. A sealed secret names the master key that sealed it, so a
//!   wrong master key is a clear error and the key can be rotated later.
//! - [`config`]: a setting out of range, named by its flag, for the
//!   services' config constructors.
//! - [`triplet`]: a namespace as the brokers need it (transport kind,
//!   endpoint, credentials), shared by the control plane and the transports.

pub mod config;
pub mod envelope;
pub mod ids;
pub mod progress;
pub mod record;
pub mod secret;
pub mod triplet;

pub use config::{check_range, ConfigError};
pub use envelope::{Envelope, EnvelopeError};
pub use ids::{DeviceId, IdError, MAX_SEQ};
pub use record::{DeviceKey, RecordBody, RecordError, SealedRecord, KEY_LEN, NONCE_LEN, TAG_LEN};
pub use secret::{KeyId, MasterKey, SecretError};
pub use triplet::{redacted_endpoint, TransportKind, Triplet};
