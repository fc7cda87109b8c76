//! The admin CLI end to end, as an operator runs it: the built binary against
//! a fresh database, its output and its exit codes.

use base64::Engine as _;
use georelay_core::secret::{device_key_context, namespace_key_context};
use georelay_core::MasterKey;
use georelay_testkit::{georelay_command, TestDb};
use std::io::Write as _;
use std::process::{Output, Stdio};

struct Cli {
    db: TestDb,
    master_key: String,
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Cli {
    async fn new() -> Self {
        let db = TestDb::migrated().await.unwrap();
        let master_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        Self { db, master_key }
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, &[], None)
    }

    fn run_with(&self, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
        let mut cmd = georelay_command(&self.db).unwrap();
        cmd.env("GEORELAY_MASTER_KEY", &self.master_key).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().unwrap();
        Run {
            code: status.code().unwrap(),
            stdout: String::from_utf8(stdout).unwrap(),
            stderr: String::from_utf8(stderr).unwrap(),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, 0, "georelay {args:?} failed: {}", r.stderr);
        r.stdout
    }

    /// Runs a command that must fail with `code` and a one-line error
    /// containing `message`.
    fn fails(&self, args: &[&str], code: i32, message: &str) {
        self.fails_with(args, &[], code, message)
    }

    fn fails_with(&self, args: &[&str], env: &[(&str, &str)], code: i32, message: &str) {
        let r = self.run_with(args, env, None);
        assert_eq!(
            r.code, code,
            "georelay {args:?}: stdout {:?} stderr {:?}",
            r.stdout, r.stderr
        );
        assert!(
            r.stderr.contains(message),
            "georelay {args:?}: {:?} lacks {message:?}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        if code != 2 {
            assert_eq!(r.stderr.lines().count(), 1, "one line: {:?}", r.stderr);
        }
    }

    fn setup_regions(&self) {
        for (name, port, prio) in [
            ("eu-west", 4311, "10"),
            ("eu-north", 4312, "20"),
            ("us-east", 4313, "30"),
        ] {
            let endpoint = format!("nats://127.0.0.1:{port}");
            let out = self.ok(&[
                "admin",
                "namespace",
                "add",
                "--name",
                name,
                "--region",
                name,
                "--transport",
                "nats",
                "--endpoint",
                &endpoint,
                "--priority",
                prio,
            ]);
            assert!(out.contains(&format!("namespace {name} added")), "{out}");
        }
        self.ok(&[
            "admin",
            "group",
            "add",
            "--name",
            "demo",
            "--queue",
            "telemetry",
            "--namespace",
            "eu-west",
        ]);
    }
}

#[tokio::test]
async fn an_operator_sets_up_moves_and_inspects_a_group() {
    let cli = Cli::new().await;
    cli.setup_regions();

    let list = cli.ok(&["admin", "namespace", "list"]);
    let names: Vec<&str> = list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        names,
        ["eu-west", "eu-north", "us-east"],
        "by priority:\n{list}"
    );

    let key = cli.ok(&[
        "admin",
        "device",
        "add",
        "--id",
        "plug-0001",
        "--group",
        "demo",
    ]);
    let key = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .unwrap();
    assert_eq!(
        key.len(),
        32,
        "the device key is printed once, base64 of 32 bytes"
    );
    cli.ok(&[
        "admin",
        "device",
        "add",
        "--id",
        "plug-0002",
        "--group",
        "demo",
    ]);
    cli.ok(&["admin", "device", "disable", "--id", "plug-0002"]);
    let devices = cli.ok(&["admin", "device", "list", "--group", "demo"]);
    assert!(
        devices
            .lines()
            .any(|l| l.starts_with("plug-0001") && l.contains(" yes ")),
        "{devices}"
    );
    assert!(
        devices
            .lines()
            .any(|l| l.starts_with("plug-0002") && l.contains(" no ")),
        "{devices}"
    );

    let status = cli.ok(&["admin", "status"]);
    assert!(
        status.contains("demo  queue telemetry  epoch 1  steady on eu-west"),
        "{status}"
    );

    let moved = cli.ok(&[
        "admin", "failover", "--group", "demo", "--to", "eu-north", "--reason", "drill",
    ]);
    assert!(
        moved.contains("senders moved eu-west -> eu-north (epoch 2)"),
        "{moved}"
    );
    let again = cli.ok(&["admin", "failover", "--group", "demo", "--to", "eu-north"]);
    assert!(
        again.contains("already on eu-north (epoch 2); nothing changed"),
        "{again}"
    );

    let status = cli.ok(&["admin", "status"]);
    assert!(
        status.contains(
            "epoch 2  FAILOVER IN PROGRESS: senders on eu-north, worker draining eu-west"
        ),
        "{status}"
    );
    let trail: Vec<&str> = status
        .lines()
        .filter(|l| l.trim_start().starts_with(['1', '2']))
        .collect();
    assert_eq!(trail.len(), 2, "{status}");
    assert!(
        trail[0].contains("eu-west") && trail[0].contains("not sealed"),
        "{status}"
    );
    assert!(
        trail[1].contains("eu-north") && trail[1].contains("current"),
        "{status}"
    );

    let groups = cli.ok(&["admin", "group", "list"]);
    let row: Vec<&str> = groups
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .take(6)
        .collect();
    assert_eq!(
        row,
        ["demo", "telemetry", "2", "eu-north", "eu-west", "on"],
        "{groups}"
    );

    let (actor, reason): (String, Option<String>) =
        sqlx::query_as("SELECT actor, reason FROM failover_events WHERE kind = 'sender_moved'")
            .fetch_one(cli.db.pool())
            .await
            .unwrap();
    assert!(actor.starts_with("cli:"), "{actor}");
    assert_eq!(reason.as_deref(), Some("drill"));

    cli.ok(&["admin", "namespace", "disable", "--name", "us-east"]);
    cli.fails(
        &["admin", "failover", "--group", "demo", "--to", "us-east"],
        1,
        "it is disabled",
    );
    cli.ok(&["admin", "namespace", "enable", "--name", "us-east"]);
    let moved = cli.ok(&["admin", "failover", "--group", "demo", "--to", "us-east"]);
    assert!(moved.contains("(epoch 3)"), "{moved}");
}

#[tokio::test]
async fn bad_input_gets_a_one_line_error_and_a_meaningful_exit_code() {
    let cli = Cli::new().await;
    cli.setup_regions();
    cli.ok(&[
        "admin", "device", "add", "--id", "plug-1", "--group", "demo",
    ]);

    // 4: not found
    cli.fails(
        &[
            "admin", "device", "add", "--id", "plug-2", "--group", "nope",
        ],
        4,
        "group \"nope\" does not exist",
    );
    cli.fails(
        &["admin", "failover", "--group", "nope", "--to", "eu-west"],
        4,
        "group \"nope\" does not exist",
    );
    cli.fails(
        &["admin", "failover", "--group", "demo", "--to", "mars"],
        4,
        "namespace \"mars\" does not exist",
    );
    cli.fails(
        &[
            "admin",
            "group",
            "add",
            "--name",
            "g2",
            "--queue",
            "q",
            "--namespace",
            "mars",
        ],
        4,
        "namespace \"mars\"",
    );
    // A second group on a queue: refused by the database, with the way.
    cli.fails(
        &[
            "admin",
            "group",
            "add",
            "--name",
            "g2",
            "--queue",
            "telemetry",
            "--namespace",
            "eu-north",
        ],
        1,
        "queue \"telemetry\" belongs to another group (two workers would share one queue and reorder) (give each group a queue of its own)",
    );
    cli.fails(
        &["admin", "device", "disable", "--id", "ghost"],
        4,
        "device \"ghost\" does not exist",
    );
    cli.fails(
        &["admin", "namespace", "disable", "--name", "ghost"],
        4,
        "namespace \"ghost\" does not exist",
    );

    // 3: duplicates
    cli.fails(
        &[
            "admin",
            "namespace",
            "add",
            "--name",
            "eu-west",
            "--region",
            "x",
            "--transport",
            "nats",
            "--endpoint",
            "e",
            "--priority",
            "1",
        ],
        3,
        "namespace \"eu-west\" already exists",
    );
    cli.fails(
        &[
            "admin",
            "group",
            "add",
            "--name",
            "demo",
            "--queue",
            "q",
            "--namespace",
            "eu-west",
        ],
        3,
        "group \"demo\" already exists",
    );
    // The same group again, queue and all (deploy/bootstrap.sh on a second
    // `./dev up`): "already exists", which set-up scripts take as done.
    cli.fails(
        &[
            "admin",
            "group",
            "add",
            "--name",
            "demo",
            "--queue",
            "telemetry",
            "--namespace",
            "eu-west",
        ],
        3,
        "group \"demo\" already exists",
    );
    cli.fails(
        &[
            "admin", "device", "add", "--id", "plug-1", "--group", "demo",
        ],
        3,
        "device \"plug-1\" already exists",
    );

    // 1: refused values, in words
    cli.fails(
        &["admin", "device", "add", "--id", "a/b", "--group", "demo"],
        1,
        "invalid device id \"a/b\"",
    );
    cli.fails(
        &[
            "admin",
            "group",
            "add",
            "--name",
            "g2",
            "--queue",
            "no spaces",
            "--namespace",
            "eu-west",
        ],
        1,
        "queue name must be",
    );
    cli.fails(
        &[
            "admin",
            "namespace",
            "add",
            "--name",
            "sb",
            "--region",
            "x",
            "--transport",
            "servicebus",
            "--endpoint",
            "https://x.servicebus.windows.net",
            "--priority",
            "5",
        ],
        1,
        "a servicebus namespace needs --key-name and --key",
    );

    // master key: missing, malformed, not the one that sealed the database's secrets
    cli.fails_with(
        &["admin", "device", "add", "--id", "p", "--group", "demo"],
        &[("GEORELAY_MASTER_KEY", "")],
        1,
        "GEORELAY_MASTER_KEY must be base64 of exactly 32 bytes",
    );
    cli.fails_with(
        &["admin", "device", "add", "--id", "p", "--group", "demo"],
        &[("GEORELAY_MASTER_KEY", "c2hvcnQ=")],
        1,
        "GEORELAY_MASTER_KEY must be base64 of exactly 32 bytes",
    );
    let other = base64::engine::general_purpose::STANDARD.encode([8u8; 32]);
    cli.fails_with(
        &["admin", "device", "add", "--id", "p", "--group", "demo"],
        &[("GEORELAY_MASTER_KEY", &other)],
        1,
        "but the configured master key is",
    );
    let mut no_key = georelay_command(&cli.db).unwrap();
    let out = no_key
        .args(["admin", "device", "add", "--id", "p", "--group", "demo"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GEORELAY_MASTER_KEY is not set"));

    // the database: unreachable, or not configured
    cli.fails_with(
        &["admin", "status"],
        &[("DATABASE_URL", "postgres://georelay@127.0.0.1:1/none")],
        69,
        "cannot connect to PostgreSQL at 127.0.0.1:1/none",
    );
    cli.fails_with(
        &["admin", "status"],
        &[("DATABASE_URL", "mysql:/nope")],
        1,
        "DATABASE_URL is not a valid postgres:// URL",
    );

    // 2: usage errors from the argument parser
    cli.fails(&["admin", "namespace", "add", "--name", "x"], 2, "required");
    cli.fails(
        &[
            "admin",
            "namespace",
            "add",
            "--name",
            "x",
            "--region",
            "r",
            "--transport",
            "kafka",
            "--endpoint",
            "e",
            "--priority",
            "1",
        ],
        2,
        "invalid value 'kafka'",
    );

    let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(cli.db.pool())
        .await
        .unwrap();
    assert_eq!(devices, 1, "no failed command left anything behind");
}

/// The database holds device and SAS keys only sealed: the raw bytes of every
/// row contain neither the key bytes nor their base64 or hex text, and the
/// sealed value opens, under the master key, to exactly the printed key.
#[tokio::test]
async fn keys_are_never_stored_in_plaintext() {
    let cli = Cli::new().await;
    cli.setup_regions();
    let device_key_b64 = cli
        .ok(&[
            "admin", "device", "add", "--id", "plug-9", "--group", "demo",
        ])
        .trim()
        .to_owned();
    let device_key = base64::engine::general_purpose::STANDARD
        .decode(&device_key_b64)
        .unwrap();
    let sas_key = "Zm9vYmFyU0FTa2V5LXZlcnktc2VjcmV0LTEyMzQ1Njc4OTA=";
    let r = cli.run_with(
        &[
            "admin",
            "namespace",
            "add",
            "--name",
            "sb-west",
            "--region",
            "westeurope",
            "--transport",
            "servicebus",
            "--endpoint",
            "https://georelay-west.servicebus.windows.net",
            "--priority",
            "5",
            "--key-name",
            "RootManageSharedAccessKey",
            "--key",
            "-",
        ],
        &[],
        Some(sas_key),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        !r.stdout.contains(sas_key) && !r.stderr.contains(sas_key),
        "the SAS key is not echoed"
    );

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let needles: Vec<Vec<u8>> = vec![
        device_key.clone(),
        device_key_b64.as_bytes().to_vec(),
        hex(&device_key).into_bytes(),
        sas_key.as_bytes().to_vec(),
        base64::engine::general_purpose::STANDARD
            .decode(sas_key)
            .unwrap(),
        hex(sas_key.as_bytes()).into_bytes(),
    ];
    // Every column of every row, as raw bytes and as text.
    let rows: Vec<(Vec<u8>, String)> = sqlx::query_as(
        "SELECT key_sealed, to_jsonb(d)::text FROM devices d
         UNION ALL SELECT key_sealed, to_jsonb(n)::text FROM namespaces n WHERE key_sealed IS NOT NULL",
    )
    .fetch_all(cli.db.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    for (raw, text) in &rows {
        for needle in &needles {
            assert!(
                !raw.windows(needle.len()).any(|w| w == needle.as_slice()),
                "plaintext key in key_sealed"
            );
            assert!(
                !text
                    .as_bytes()
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice()),
                "plaintext key in {text}"
            );
        }
    }

    let master = MasterKey::from_base64(&cli.master_key).unwrap();
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT key_sealed FROM devices WHERE id = 'plug-9'")
        .fetch_one(cli.db.pool())
        .await
        .unwrap();
    assert_eq!(
        master
            .open(&device_key_context("plug-9"), &sealed)
            .unwrap()
            .as_slice(),
        device_key.as_slice()
    );
    let sealed: Vec<u8> =
        sqlx::query_scalar("SELECT key_sealed FROM namespaces WHERE name = 'sb-west'")
            .fetch_one(cli.db.pool())
            .await
            .unwrap();
    assert_eq!(
        master
            .open(&namespace_key_context("sb-west"), &sealed)
            .unwrap()
            .as_slice(),
        sas_key.as_bytes()
    );
}

#[tokio::test]
async fn nonsense_settings_are_refused_at_start_naming_the_setting() {
    let cli = Cli::new().await;
    cli.fails(&["ingest", "--lease", "0s"], 2, "--lease must be between");
    cli.fails(&["drain", "--lease", "0s"], 2, "--lease must be between");
    cli.fails(
        &["ingest", "--max-concurrent-requests", "100000000"],
        2,
        "--max-concurrent-requests must be between",
    );
    // An interval between two readings that would round to nothing.
    for rate in ["1e12", "NaN", "0"] {
        cli.fails(
            &[
                "agent",
                "simulate",
                "--url",
                "http://127.0.0.1:1",
                "--keys-dir",
                "/nonexistent",
                "--state-dir",
                "/nonexistent",
                "--rate",
                rate,
            ],
            2,
            "'--rate <RATE>': must be a number of readings a second from 0.001 to 1000000",
        );
    }
    // A device asking about its records all the time, or never.
    for after in ["0s", "2h"] {
        cli.fails(
            &[
                "agent",
                "run",
                "--device",
                "plug-1",
                "--url",
                "http://127.0.0.1:1",
                "--state-dir",
                "/nonexistent",
                "--confirm-after",
                after,
            ],
            2,
            "must be from 100ms to 1h",
        );
    }
    // Set, but not UTF-8: said so, not "not set".
    use std::os::unix::ffi::OsStrExt as _;
    let out = georelay_command(&cli.db)
        .unwrap()
        .env(
            "GEORELAY_MASTER_KEY",
            std::ffi::OsStr::from_bytes(b"\xff\xfe"),
        )
        .arg("ingest")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("GEORELAY_MASTER_KEY is set but is not valid UTF-8"),
        "{stderr}"
    );
}

/// NATS credentials go into the sealed key columns, never the endpoint (it
/// was the only way, and `namespace list` printed it): an endpoint with
/// `user:pass@` is refused with the way to do it; credentials given as
/// `--key-name user:NAME --key -` are stored sealed, never printed, and a
/// region that asks for them accepts what the control plane holds.
#[tokio::test]
async fn nats_credentials_are_sealed_and_never_printed() {
    let cli = Cli::new().await;
    let region = georelay_testkit::NatsRegion::start_with("creds", |_| {
        ["--user", "georelay", "--pass", "n4ts-s3cret"]
            .map(String::from)
            .to_vec()
    })
    .unwrap();
    let in_url = format!("nats://georelay:n4ts-s3cret@127.0.0.1:{}", region.port());
    let add = |endpoint: &str, creds: &[&'static str]| {
        let args = [
            &[
                "admin",
                "namespace",
                "add",
                "--name",
                "eu-auth",
                "--region",
                "eu",
                "--transport",
                "nats",
                "--endpoint",
                endpoint,
                "--priority",
                "1",
            ][..],
            creds,
        ]
        .concat();
        cli.run_with(&args, &[], Some("n4ts-s3cret"))
    };
    let refused = add(&in_url, &[]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("must not carry credentials")
            && refused.stderr.contains("--key-name user:NAME")
            && !refused.stderr.contains("n4ts-s3cret"),
        "{}",
        refused.stderr
    );
    let bad_name = add(&region.url(), &["--key-name", "georelay", "--key", "-"]);
    assert_eq!(bad_name.code, 1, "{}", bad_name.stderr);
    assert!(bad_name.stderr.contains("user:NAME"), "{}", bad_name.stderr);
    let added = add(
        &region.url(),
        &["--key-name", "user:georelay", "--key", "-"],
    );
    assert_eq!(added.code, 0, "{}", added.stderr);
    let list = cli.ok(&["admin", "namespace", "list"]);
    assert!(
        list.contains("eu-auth") && !list.contains("n4ts-s3cret"),
        "{list}"
    );
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT key_sealed FROM namespaces WHERE name = 'eu-auth'")
            .fetch_one(cli.db.pool())
            .await
            .unwrap();
    assert!(
        !stored.windows(11).any(|w| w == b"n4ts-s3cret"),
        "sealed, not plaintext"
    );
    // What the services load from the control plane gets in.
    let master = MasterKey::from_base64(&cli.master_key).unwrap();
    let routing = georelay_store::routing::load_routing(cli.db.pool(), &master)
        .await
        .unwrap();
    let triplet = &routing.namespaces[0].triplet;
    let ns = georelay_transport::Namespace::connect(triplet, georelay_transport::Limits::default())
        .await
        .unwrap();
    ns.probe().await.unwrap();
    // A row from before the rule, with credentials in its endpoint, is
    // listed with them masked.
    sqlx::query("ALTER TABLE namespaces DROP CONSTRAINT namespaces_endpoint_no_credentials")
        .execute(cli.db.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE namespaces SET endpoint = $1 WHERE name = 'eu-auth'")
        .bind(&in_url)
        .execute(cli.db.pool())
        .await
        .unwrap();
    let list = cli.ok(&["admin", "namespace", "list"]);
    assert!(
        !list.contains("n4ts-s3cret") && list.contains("nats://***@127.0.0.1"),
        "{list}"
    );
}

/// `admin doctor` checks the control plane's invariants and prints each
/// problem with the statement that fixes it (exit 1); `admin status` shows
/// them first. Problems made by hand: an ingest instance with a lease a day
/// ahead (it holds back every seal barrier), and a drain lease naming no
/// running process.
#[tokio::test]
async fn doctor_names_each_problem_with_its_fix() {
    let cli = Cli::new().await;
    cli.setup_regions();
    assert_eq!(cli.ok(&["admin", "doctor"]), "no problems found\n");
    let pool = cli.db.pool();
    sqlx::query("INSERT INTO instances (id, role, hostname, lease_until) VALUES ('00000000-0000-0000-0000-00000000beef', 'ingest', 'ghost', now() + interval '1 day')")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO drain_leases (group_id, instance_id, token, lease_until) SELECT id, '00000000-0000-0000-0000-00000000dead', 1, now() + interval '1 hour' FROM routing_groups")
        .execute(pool)
        .await
        .unwrap();
    let r = cli.run(&["admin", "doctor"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("2 control plane problem(s)"),
        "{}",
        r.stderr
    );
    let fixes: Vec<&str> = r
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("fix: "))
        .collect();
    assert_eq!(
        fixes,
        vec![
            "UPDATE drain_leases SET lease_until = now() WHERE group_id = (SELECT id FROM routing_groups WHERE name = 'demo')",
            "DELETE FROM instances WHERE id = '00000000-0000-0000-0000-00000000beef'",
        ],
        "{}",
        r.stdout
    );
    let status = cli.ok(&["admin", "status"]);
    assert!(
        status.starts_with("PROBLEM group demo: its drain lease names instance"),
        "{status}"
    );
    // The printed fixes fix it.
    for fix in fixes {
        sqlx::query(fix).execute(pool).await.unwrap();
    }
    assert_eq!(cli.ok(&["admin", "doctor"]), "no problems found\n");
}
