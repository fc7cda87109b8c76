//! Configuration from the environment, validated with messages that say what
//! to fix. Secrets are read here and never printed.

use anyhow::bail;
use georelay_core::MasterKey;
use georelay_store::PgPool;

/// Connects to `DATABASE_URL`.
pub async fn database() -> anyhow::Result<PgPool> {
    database_with(4).await
}

/// Connects to `DATABASE_URL` with a pool of up to `connections`.
pub async fn database_with(connections: u32) -> anyhow::Result<PgPool> {
    let Some(url) = env("DATABASE_URL")? else {
        bail!("DATABASE_URL is not set (for example postgres://georelay:georelay@127.0.0.1:5432/georelay)");
    };
    Ok(georelay_store::connect(&url, connections).await?)
}

/// Reads `GEORELAY_MASTER_KEY` (base64 of 32 bytes).
pub fn master_key() -> anyhow::Result<MasterKey> {
    let Some(value) = env("GEORELAY_MASTER_KEY")? else {
        bail!("GEORELAY_MASTER_KEY is not set (base64 of 32 random bytes, e.g. from `head -c 32 /dev/urandom | base64`)");
    };
    Ok(MasterKey::from_base64(&value)?)
}

/// An environment variable: `None` when it is not set; an error naming it
/// when it is set to something that is not UTF-8 (not "not set").
pub fn env(name: &str) -> anyhow::Result<Option<String>> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{name} is set but is not valid UTF-8"),
    }
}

/// Refuses a master key that sealed none of the secrets in the database;
/// names (ERROR) the rows sealed otherwise, which are refused one by one
/// where they are used rather than stopping the process.
pub async fn check_master_key(pool: &PgPool, master: &MasterKey) -> anyhow::Result<()> {
    let odd = georelay_store::control::check_master_key(pool, master).await?;
    if !odd.is_empty() {
        tracing::error!(
            rows = %odd.join(", "),
            "sealed keys that this master key did not seal (pasted in by hand, or restored from another installation): those devices get 401 and those namespaces are left out until their keys are set again; the rest goes on"
        );
    }
    Ok(())
}
