//! The SRE console in a real browser: headless Chromium driven over
//! WebDriver (Debian's `chromium` and `chromium-driver`; `./dev test`
//! installs them) against a live stack — real PostgreSQL, nats-server
//! regions, ingest and drain processes; the console runs in this process.
//!
//! The open page follows a failover without a reload (FAILOVER IN PROGRESS
//! within 30 s of the region's death, the worker following within 60 s of
//! its return); a failback goes through the form and lands in
//! `failover_events` with the console user as actor; a POST without a
//! session, or with another session's form token, changes nothing. A
//! screenshot is saved under `target/tmp/console/`.

use georelay_testkit::{master_key, wait_until, Stack, DRAIN_TEST_ARGS, GROUP, INGEST_TEST_ARGS};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "console-test-token-0123456789";
/// The W3C WebDriver element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session in it.
struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start chromedriver (Debian's chromium-driver; ./dev test installs it)");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let ready = wait_until(Duration::from_secs(20), || async {
            match http.get(format!("{base}/status")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            }
        })
        .await;
        assert!(ready, "chromedriver did not become ready on {base}");
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1000"]
        });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "goog:chromeOptions": options}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"));
        Browser {
            http,
            session: format!("{base}/session/{id}"),
            driver,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(
            answer["value"].get("error").is_none(),
            "WebDriver {path}: {answer}"
        );
        answer["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: {found}"))
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// The text of the first element matching `css`, read in one script:
    /// the live part of the page is replaced under any element reference.
    /// Empty while there is no such element, or while a page is loading
    /// (the script then has no document to run in).
    async fn text(&self, css: &str) -> String {
        let css = serde_json::to_string(css).unwrap();
        let script =
            format!("const e = document.querySelector({css}); return e ? e.innerText : '';");
        let answer: Value = self
            .http
            .post(format!("{}/execute/sync", self.session))
            .json(&json!({"script": script, "args": []}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["value"].as_str().unwrap_or_default().to_owned()
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap()
    }

    async fn quit(&self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

/// The group section's `data-*` attribute `name` on the open page.
async fn group_attr(browser: &Browser, name: &str) -> String {
    browser
        .script(&format!(
            "const g = document.querySelector('[data-group=\"{GROUP}\"]'); return g ? g.dataset.{name} : null;"
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_console_follows_a_failover_live_and_fails_back_through_its_form() {
    let mut stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let pool = stack.db.pool().clone();
    let ingest = stack.ingest(INGEST_TEST_ARGS).unwrap();
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let console = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let config = georelay_console::Config {
        poll_interval: Duration::from_millis(500),
        depth_interval: Duration::from_secs(1),
        ..georelay_console::Config::default()
    };
    tokio::spawn(georelay_console::run(
        config,
        pool.clone(),
        master_key().unwrap(),
        Some(TOKEN.to_owned().into()),
        listener,
        shutdown.clone(),
    ));
    let device = stack.device("plug-console").await.unwrap();
    device
        .post_until_accepted(&ingest.url(), 1..=5)
        .await
        .unwrap();

    let browser = Browser::start().await;

    // What the pages show is what SQL says.
    browser.goto(&format!("{console}/namespaces")).await;
    let shown = browser
        .script("return [...document.querySelectorAll('tr[data-namespace]')].map(r => r.dataset.namespace);")
        .await;
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM namespaces ORDER BY priority")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(shown, json!(names));
    browser.goto(&format!("{console}/groups")).await;
    let (epoch, senders): (i64, String) = sqlx::query_as(
        "SELECT g.epoch, n.name FROM routing_groups g JOIN namespaces n ON n.id = g.sender_namespace_id
         WHERE g.name = $1",
    )
    .bind(GROUP)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(group_attr(&browser, "epoch").await, epoch.to_string());
    assert_eq!(group_attr(&browser, "senders").await, senders);
    assert_eq!(group_attr(&browser, "state").await, "steady");
    // A mark that a reload would wipe.
    browser
        .script("window.notReloaded = true; return null;")
        .await;
    let live = wait_until(Duration::from_secs(10), || async {
        browser.text("#conn").await.starts_with("live")
    })
    .await;
    assert!(
        live,
        "the page never went live: {}",
        browser.text("#conn").await
    );

    // The priority-10 region dies with the senders on it.
    stack.regions[0].kill();
    device
        .post_until_accepted(&ingest.url(), 6..=10)
        .await
        .unwrap();
    let failover = wait_until(Duration::from_secs(30), || async {
        group_attr(&browser, "state").await == "failover"
    })
    .await;
    assert!(
        failover,
        "FAILOVER IN PROGRESS never appeared on the open page"
    );
    let state = browser
        .text(&format!("[data-group=\"{GROUP}\"] .state"))
        .await;
    assert_eq!(
        state,
        "FAILOVER IN PROGRESS: senders on eu-north, worker draining eu-west"
    );
    let blocked = wait_until(Duration::from_secs(30), || async {
        browser
            .text(&format!("[data-group=\"{GROUP}\"] .drain"))
            .await
            .contains("BLOCKED")
    })
    .await;
    assert!(
        blocked,
        "the worker blocked on the dead region, and the page did not say so"
    );
    // The ingest instance reports its open breaker with its heartbeat.
    let reported = wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM instances WHERE 'eu-west' = ANY (open_breakers))",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    })
    .await;
    assert!(
        reported,
        "no ingest instance reported eu-west's open breaker"
    );

    // It returns: the worker drains it and follows the senders.
    stack.regions[0].restart().unwrap();
    let followed = wait_until(Duration::from_secs(60), || async {
        group_attr(&browser, "state").await == "steady"
            && group_attr(&browser, "worker").await == "eu-north"
    })
    .await;
    assert!(
        followed,
        "the worker following never appeared on the open page"
    );
    assert_eq!(
        browser.script("return window.notReloaded === true;").await,
        json!(true),
        "the page was reloaded"
    );

    // Unauthenticated, the form is not offered and a POST is refused.
    let http = reqwest::Client::new();
    let moves = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM failover_events WHERE kind = 'sender_moved'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = moves().await;
    let refused = http
        .post(format!("{console}/actions/move"))
        .form(&[
            ("group", GROUP),
            ("to", "eu-west"),
            ("reason", "nobody"),
            ("csrf", "x"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // Signed in: the failback through the form.
    browser.goto(&format!("{console}/login")).await;
    browser
        .type_into("#login input[name=user]", "oncall-test")
        .await;
    browser.type_into("#login input[name=token]", TOKEN).await;
    browser.click("#login button").await;
    // The click may return before the next page has loaded.
    let signed_in = wait_until(Duration::from_secs(10), || async {
        browser.text("#user").await == "oncall-test"
    })
    .await;
    assert!(signed_in, "not signed in: {}", browser.text("body").await);
    browser
        .click("#move select[name=to] option[value=eu-west]")
        .await;
    browser
        .type_into("#move input[name=reason]", "failback after the drill")
        .await;
    browser.click("#move button").await;
    wait_until(Duration::from_secs(10), || async {
        !browser.text("#flash").await.is_empty()
    })
    .await;
    let flash = browser.text("#flash").await;
    assert!(
        flash.starts_with(&format!("group {GROUP}: senders moved eu-north -> eu-west")),
        "{flash}"
    );
    let (actor, reason, to): (String, Option<String>, String) = sqlx::query_as(
        "SELECT e.actor, e.reason, n.name FROM failover_events e JOIN namespaces n ON n.id = e.to_namespace_id
         WHERE e.kind = 'sender_moved' ORDER BY e.id DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (actor.as_str(), reason.as_deref(), to.as_str()),
        (
            "console:oncall-test",
            Some("failback after the drill"),
            "eu-west"
        )
    );
    assert_eq!(moves().await, before + 1, "the refused POST moved nothing");
    // The page after the form shows the move: senders back, the worker
    // draining eu-north first.
    assert_eq!(group_attr(&browser, "senders").await, "eu-west");
    assert_eq!(group_attr(&browser, "state").await, "failover");

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&dir).unwrap();
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    std::fs::write(dir.join("failback.png"), &png).unwrap();
    browser.quit().await;
    shutdown.cancel();
}

/// Signs in over plain HTTP; the session cookie (`name=value`).
async fn sign_in(http: &reqwest::Client, console: &str, user: &str) -> String {
    let answer = http
        .post(format!("{console}/login"))
        .form(&[("user", user), ("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303, "sign-in refused");
    let cookie = answer.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn a_form_token_from_another_session_or_none_is_refused_and_a_wrong_token_signs_nobody_in() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let pool = stack.db.pool().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let console = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(georelay_console::run(
        georelay_console::Config::default(),
        pool.clone(),
        master_key().unwrap(),
        Some(TOKEN.to_owned().into()),
        listener,
        shutdown.clone(),
    ));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let up = wait_until(Duration::from_secs(10), || async {
        http.get(format!("{console}/healthz")).send().await.is_ok()
    })
    .await;
    assert!(up);

    let wrong = http
        .post(format!("{console}/login"))
        .form(&[("user", "mallory"), ("token", "not-the-token-at-all")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());

    // A wrong token holds sign-ins back for a second (429 meanwhile).
    let released = wait_until(Duration::from_secs(5), || async {
        let tried = http
            .post(format!("{console}/login"))
            .form(&[("user", "probe"), ("token", TOKEN)])
            .send()
            .await
            .unwrap();
        tried.status() == 303
    })
    .await;
    assert!(released, "sign-ins stayed held back");
    let alice = sign_in(&http, &console, "alice").await;
    let bob = sign_in(&http, &console, "bob").await;
    let page = http
        .get(format!("{console}/groups"))
        .header("cookie", &bob)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let bobs_csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a signed-in page carries the form token")
        .to_owned();
    let moves = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM failover_events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // POSTs a form to `action` with a session cookie; the status.
    let act = |action: &'static str, cookie: String, form: Vec<(&'static str, String)>| {
        let request = http
            .post(format!("{console}/actions/{action}"))
            .header("cookie", cookie)
            .form(&form);
        async move { request.send().await.unwrap().status() }
    };
    let move_form = |reason: &'static str, csrf: &str| {
        vec![
            ("group", GROUP.to_owned()),
            ("to", "eu-north".to_owned()),
            ("reason", reason.to_owned()),
            ("csrf", csrf.to_owned()),
        ]
    };
    let before = moves().await;
    for csrf in [bobs_csrf.as_str(), ""] {
        let status = act("move", alice.clone(), move_form("forged", csrf)).await;
        assert_eq!(status, 403);
    }
    assert_eq!(moves().await, before, "a refused form moved the senders");

    // Bob's own token works: the control is real.
    let status = act("move", bob.clone(), move_form("drill", &bobs_csrf)).await;
    assert_eq!(status, 303);
    assert_eq!(moves().await, before + 1);

    // The failover bit is audited too, with the console user.
    let failover_off = vec![
        ("group", GROUP.to_owned()),
        ("failover", "off".to_owned()),
        ("csrf", bobs_csrf.clone()),
    ];
    assert_eq!(act("failover", bob.clone(), failover_off).await, 303);
    let (kind, actor): (String, String) =
        sqlx::query_as("SELECT kind, actor FROM failover_events ORDER BY id DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), actor.as_str()),
        ("failover_off", "console:bob")
    );
    shutdown.cancel();
}
