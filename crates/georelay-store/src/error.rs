//! The store's error type: a [`StoreError::kind`] a caller can match on, and
//! messages an operator can act on (database refusals are translated from
//! constraint names into plain words here, in one place).

use georelay_core::SecretError;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad configuration (malformed URL): fix and restart.
    Config,
    /// The database cannot be reached now; retrying may help.
    Unavailable,
    /// A named thing does not exist.
    NotFound,
    /// A thing with that name exists already.
    AlreadyExists,
    /// The database refused the change (a constraint or a trigger's rule).
    Refused,
    /// A sealed secret cannot be opened or sealed with this master key.
    Secret,
    /// Migrations failed.
    Migration,
    /// Any other database error.
    Database,
}

/// What went wrong. Every variant made from a database error keeps it as its
/// [`std::error::Error::source`] (a caller can look at the SQLSTATE); the
/// message already says in plain words what the source says, without
/// connection secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to PostgreSQL at {target}: {}", describe(.source))]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot connect to PostgreSQL at {target}: no answer within {after:?}")]
    ConnectTimedOut { target: String, after: Duration },
    #[error("lost the database: {}", describe(.0))]
    Lost(#[source] sqlx::Error),
    /// A bounded piece of work ran past its bound (a database that hangs
    /// rather than refuses).
    #[error("{what} took longer than {limit:?}")]
    TimedOut { what: &'static str, limit: Duration },
    #[error("{what} \"{name}\" does not exist")]
    NotFound { what: &'static str, name: String },
    #[error("{what} \"{name}\" already exists")]
    AlreadyExists { what: &'static str, name: String },
    #[error("{message}")]
    Refused {
        message: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {}", describe(.0))]
    Database(#[source] sqlx::Error),
    /// Not possible yet; the message says what to wait for.
    #[error("{0}")]
    NotYet(String),
    /// A row the schema should have made impossible.
    #[error("{0}")]
    Inconsistent(String),
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config(_) => ErrorKind::Config,
            Self::Connect { .. }
            | Self::ConnectTimedOut { .. }
            | Self::Lost(_)
            | Self::TimedOut { .. }
            | Self::NotYet(_) => ErrorKind::Unavailable,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Self::Refused { .. } => ErrorKind::Refused,
            Self::Secret(_) => ErrorKind::Secret,
            Self::Migration(_) => ErrorKind::Migration,
            Self::Database(_) | Self::Inconsistent(_) => ErrorKind::Database,
        }
    }

    /// Whether the database refused the values of the statement (a data
    /// exception, a constraint, a program limit: SQLSTATE classes 22, 23 and
    /// 54) rather than failed to run it: the same values will be refused
    /// again, so retrying cannot help, and without them it can succeed.
    pub fn refused_the_data(&self) -> bool {
        let (Self::Refused { source, .. } | Self::Database(source)) = self else {
            return false;
        };
        let sqlx::Error::Database(db) = source else {
            return false;
        };
        db.code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54"))
    }

    /// Classifies a database error; `what` and `name` say what a unique
    /// violation collided with.
    pub(crate) fn from_sqlx(e: sqlx::Error, what: &'static str, name: &str) -> Self {
        if let sqlx::Error::Database(db) = &e {
            match db.code().as_deref() {
                Some("23505") => {
                    return Self::AlreadyExists {
                        what,
                        name: name.to_owned(),
                    }
                }
                // check, foreign key, not null
                Some("23514" | "23503" | "23502" | "22001") => {
                    let message = refusal(db.constraint(), db.message());
                    return Self::Refused { message, source: e };
                }
                // The control plane's guards (GRnnn): their words and the
                // safe way (the hint), as psql would show them.
                Some(code) if code.starts_with("GR") => {
                    let hint = db
                        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|pg| pg.hint());
                    let message = match hint {
                        Some(hint) => format!("{} ({hint})", db.message()),
                        None => db.message().to_owned(),
                    };
                    return Self::Refused { message, source: e };
                }
                _ => {}
            }
        }
        if is_unavailable(&e) {
            Self::Lost(e)
        } else {
            Self::Database(e)
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::from_sqlx(e, "row", "?")
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
    )
}

/// One line describing a sqlx error, without connection secrets.
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection".to_owned(),
        other => other.to_string(),
    }
}

/// Plain words for the constraints an operator can run into.
fn refusal(constraint: Option<&str>, message: &str) -> String {
    let names = "1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit";
    match constraint {
        Some("namespaces_name_check") => format!("namespace name must be {names}"),
        Some("namespaces_region_check") => format!("region must be {names}"),
        Some("routing_groups_name_check") => format!("group name must be {names}"),
        Some("routing_groups_queue_check") => {
            "queue name must be 1 to 63 letters, digits, '_' or '-', starting with a letter or digit".to_owned()
        }
        Some("namespaces_endpoint_check") => "endpoint must be 1 to 1024 characters".to_owned(),
        Some("namespaces_servicebus_needs_key") => {
            "a servicebus namespace needs --key-name and --key (its SAS policy)".to_owned()
        }
        Some("namespaces_key_pair") => "--key-name and --key go together".to_owned(),
        Some("namespaces_endpoint_no_credentials") => {
            "the endpoint must not carry credentials (user:pass@): give them as --key-name user:NAME (or token) and --key -, which are stored sealed".to_owned()
        }
        Some("namespaces_nats_key_name") => {
            "a nats namespace's --key-name is user:NAME (with the password as --key) or token (with the token as --key)".to_owned()
        }
        Some("devices_id_check") => {
            "device id must be 1 to 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit".to_owned()
        }
        _ => message.to_owned(),
    }
}
