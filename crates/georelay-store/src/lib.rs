//! georelay-store: everything georelay keeps in PostgreSQL.
//!
//! - [`MIGRATOR`] embeds `migrations/` at build time; `georelay migrate` and
//!   the test kit apply it. Applying it twice is a no-op.
//! - [`control`]: the control plane the admin CLI, the senders and the worker
//!   share: namespaces, routing groups and their trail, devices.
//! - [`routing`]: the senders' snapshot, device keys, and the failover
//!   transaction (shared by ingest and the worker).
//! - [`drain`]: the worker's lease, the seal barrier, storing batches,
//!   following the trail.
//! - [`gaps`]: records stranded in an abandoned epoch, and the newer
//!   records of their devices parked until those are back.
//! - [`keys`]: a cache of device keys, opened with the master key.
//! - [`instances`]: process leases and the epochs ingest acknowledges.
//!
//! Every statement that moves senders goes through the database trigger on
//! `routing_groups.sender_namespace_id` (see `migrations/0001_control_plane.sql`):
//! this crate sets the actor and reason for it and never writes the trail,
//! the epoch or the audit itself.

pub mod control;
pub mod dead_letters;
pub mod doctor;
pub mod drain;
mod error;
pub mod gaps;
pub mod instances;
pub mod keys;
pub mod overview;
pub mod progress;
pub mod rollup;
pub mod routing;

pub use error::{ErrorKind, StoreError};
pub use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::Connection as _;
pub use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// The schema, embedded from `migrations/` at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How long to wait for a connection before calling the database unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a pool to `url` and checks that the database answers. Errors name
/// host, port and database, never the password.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let invalid = || StoreError::Config("DATABASE_URL is not a valid postgres:// URL".to_owned());
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid());
    }
    let options = PgConnectOptions::from_str(url).map_err(|_| invalid())?;
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("(default database)")
    );
    // One plain connection first: a pool retries until its timeout and then
    // reports only that it timed out, hiding "connection refused" or "password
    // authentication failed".
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
        Err(_) => {
            return Err(StoreError::ConnectTimedOut {
                target,
                after: CONNECT_TIMEOUT,
            })
        }
        Ok(Err(source)) => return Err(StoreError::Connect { target, source }),
        Ok(Ok(conn)) => drop(conn.close().await),
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Connect { target, source })
}

/// Applies pending migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    Ok(MIGRATOR.run(pool).await?)
}
