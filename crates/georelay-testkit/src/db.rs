//! A fresh PostgreSQL database per test.

use anyhow::Context as _;
use sqlx::{Connection as _, PgConnection, PgPool};

/// A database of its own for one test, created on the test server and
/// dropped on drop (connections included, `WITH (FORCE)`).
#[derive(Debug)]
pub struct TestDb {
    pool: PgPool,
    url: String,
    name: String,
    admin_url: String,
}

impl TestDb {
    /// A new database with all migrations applied.
    pub async fn migrated() -> anyhow::Result<Self> {
        let db = Self::empty().await?;
        georelay_store::migrate(&db.pool).await?;
        Ok(db)
    }

    /// A new, empty database (no migrations).
    pub async fn empty() -> anyhow::Result<Self> {
        let admin_url = server_url();
        let name = format!("georelay_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.with_context(|| {
            format!(
                "cannot connect to the test PostgreSQL ({}); is it running, with that role and database? ./dev test (or ./dev up) starts it and creates them",
                redact(&admin_url)
            )
        })?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .context("cannot create a test database (the role needs CREATEDB)")?;
        let mut url = url::Url::parse(&admin_url).context("test database URL is not a URL")?;
        url.set_path(&name);
        let url = url.to_string();
        let pool = georelay_store::connect(&url, 8).await?;
        Ok(Self {
            pool,
            url,
            name,
            admin_url,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `postgres://…/georelay_test_…`, for processes under test.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on:
        // drop the database from a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("testkit: could not drop test database {}", self.name);
        }
    }
}

fn server_url() -> String {
    std::env::var("GEORELAY_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| crate::DEFAULT_DATABASE_URL.to_owned())
}

fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "unparsable URL".to_owned(),
    }
}
