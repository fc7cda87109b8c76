//! The store's error type: a [`StoreError::kind`] a caller can match on, and
//! messages an operator can act on (database refusals are translated from
//! constraint names into plain words here, in one place).

use georelay_core::SecretError;

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{what} \"{name}\" does not exist")]
    NotFound { what: &'static str, name: String },
    #[error("{what} \"{name}\" already exists")]
    AlreadyExists { what: &'static str, name: String },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("database error: {0}")]
    Database(String),
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config(_) => ErrorKind::Config,
            Self::Unavailable(_) => ErrorKind::Unavailable,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Self::Refused(_) => ErrorKind::Refused,
            Self::Secret(_) => ErrorKind::Secret,
            Self::Migration(_) => ErrorKind::Migration,
            Self::Database(_) => ErrorKind::Database,
        }
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
                // check, foreign key, not null; and the triggers' own GRnnn codes
                Some("23514" | "23503" | "23502" | "22001") | Some("GR001" | "GR002" | "GR003") => {
                    return Self::Refused(refusal(db.constraint(), db.message()))
                }
                _ => {}
            }
        }
        if is_unavailable(&e) {
            Self::Unavailable(format!("lost the database: {}", describe(&e)))
        } else {
            Self::Database(describe(&e))
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
pub(crate) fn describe(e: &sqlx::Error) -> String {
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
        Some("devices_id_check") => {
            "device id must be 1 to 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit".to_owned()
        }
        _ => message.to_owned(),
    }
}
