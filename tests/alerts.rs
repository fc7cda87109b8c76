//! The alert rules (`deploy/prometheus/alerts.yml`) through a real
//! Prometheus against a live stack: every metric the rules and the Grafana
//! dashboard (`deploy/grafana/georelay.json`) name exists in the services'
//! `/metrics`, and the drain-blocked alert fires when the old
//! region dies during a failover and resolves when it returns. The rules run
//! as they are, with every `for:` shortened to 1 s; Prometheus scrapes and
//! evaluates every second. Needs `prometheus` (Debian's package; `./dev
//! test` installs it).

use georelay_testkit::{wait_until, Stack, DRAIN_TEST_ARGS, INGEST_TEST_ARGS};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const RULES: &str = include_str!("../deploy/prometheus/alerts.yml");
const DASHBOARD: &str = include_str!("../deploy/grafana/georelay.json");

/// A Prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    dir: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_prometheus(ingest: &str, drain: &str) -> Prometheus {
    let dir = std::env::temp_dir().join(format!(
        "georelay-prometheus-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let rules: String = RULES
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 1s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("alerts.yml"), rules).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n\
             - {{job_name: georelay-ingest, static_configs: [{{targets: ['{ingest}']}}]}}\n\
             - {{job_name: georelay-drain, static_configs: [{{targets: ['{drain}']}}]}}\n"
        ),
    )
    .unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start prometheus (Debian's package; ./dev test installs it)");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir,
    }
}

/// The states of alert `name` Prometheus reports (`pending`, `firing`).
async fn alert_states(prometheus: &Prometheus, name: &str) -> Vec<String> {
    let Ok(response) = reqwest::get(format!("{}/api/v1/alerts", prometheus.url)).await else {
        return Vec::new();
    };
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    body["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == name)
        .filter_map(|a| a["state"].as_str().map(str::to_owned))
        .collect()
}

/// Every `georelay_*` metric the rules and the dashboard's queries name.
fn metrics_named() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(queries.len() >= 10, "the dashboard has its queries");
    let rules = RULES
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .map(str::to_owned);
    let mut names: Vec<String> = queries
        .into_iter()
        .chain(rules)
        .flat_map(|q| {
            q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("georelay_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn the_drain_blocked_alert_fires_through_prometheus_and_resolves() {
    let mut stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let ingest = stack.ingest(INGEST_TEST_ARGS).unwrap();
    let drain = stack.drain(DRAIN_TEST_ARGS).unwrap();
    let prometheus = start_prometheus(&ingest.addr().to_string(), &drain.addr().to_string());
    let device = stack.device("plug-alert").await.unwrap();
    device
        .post_until_accepted(&ingest.url(), 1..=5)
        .await
        .unwrap();

    // The old region dies with the senders on it: they fail over, and the
    // worker cannot read epoch 1 there.
    stack.regions[0].kill();
    device
        .post_until_accepted(&ingest.url(), 6..=10)
        .await
        .unwrap();
    let fired = wait_until(Duration::from_secs(60), || async {
        alert_states(&prometheus, "GeorelayDrainBlocked")
            .await
            .contains(&"firing".to_owned())
    })
    .await;
    assert!(fired, "GeorelayDrainBlocked never fired");
    // `admin status` says so too, with the cause.
    let status = georelay_testkit::admin_status(&stack.db).unwrap();
    assert!(
        status.contains("BLOCKED for")
            && status.contains("cannot read epoch 1 on namespace eu-west"),
        "{status}"
    );

    // Every metric a rule or the dashboard reads is there to read.
    let mut exposed = String::new();
    for service in [&ingest, &drain] {
        exposed += &service.metrics().await.unwrap();
    }
    for name in metrics_named() {
        assert!(
            exposed
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "{name} is named in alerts.yml or the dashboard but not in /metrics"
        );
    }

    stack.regions[0].restart().unwrap();
    let resolved = wait_until(Duration::from_secs(60), || async {
        alert_states(&prometheus, "GeorelayDrainBlocked")
            .await
            .is_empty()
    })
    .await;
    assert!(
        resolved,
        "GeorelayDrainBlocked still {:?}",
        alert_states(&prometheus, "GeorelayDrainBlocked").await
    );
}
