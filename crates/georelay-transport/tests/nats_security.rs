//! NATS regions that ask for credentials or TLS, with real `nats-server`
//! processes: the credentials come from a namespace's (sealed) key columns,
//! never from the endpoint; a `tls://` endpoint is verified against the CA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use georelay_testkit::NatsRegion;
use georelay_transport::{ErrorKind, Limits, Namespace, TransportKind, Triplet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use zeroize::Zeroizing;

fn triplet(endpoint: String, key_name: Option<&str>, key: Option<&str>) -> Triplet {
    Triplet {
        transport: TransportKind::Nats,
        endpoint,
        key_name: key_name.map(str::to_owned),
        key: key.map(|k| Zeroizing::new(k.to_owned())),
    }
}

/// Publishes and reads back one message.
async fn round_trip(ns: &Namespace) {
    ns.ensure_queue("q").await.unwrap();
    ns.publish("q", "d/1/x", Bytes::from_static(b"m"))
        .await
        .unwrap();
    let got = ns.receive("q", 10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test]
async fn a_region_with_a_user_and_password_takes_only_the_sealed_credentials() {
    let region = NatsRegion::start_with("auth", |_| {
        ["--user", "georelay", "--pass", "s3cret-pass"]
            .map(String::from)
            .to_vec()
    })
    .unwrap();
    let none = Namespace::connect(&triplet(region.url(), None, None), Limits::default())
        .await
        .unwrap();
    let err = none.ensure_queue("q").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    let wrong = triplet(region.url(), Some("user:georelay"), Some("wrong"));
    let wrong = Namespace::connect(&wrong, Limits::default()).await.unwrap();
    assert_eq!(wrong.probe().await.unwrap_err().kind(), ErrorKind::Auth);
    let good = triplet(region.url(), Some("user:georelay"), Some("s3cret-pass"));
    let good = Namespace::connect(&good, Limits::default()).await.unwrap();
    round_trip(&good).await;
    let bad_name = triplet(region.url(), Some("georelay"), Some("s3cret-pass"));
    let err = Namespace::connect(&bad_name, Limits::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(
        !format!("{good:?}").contains("s3cret-pass"),
        "no password in Debug"
    );
}

#[tokio::test]
async fn a_region_with_a_token_takes_it_from_the_key() {
    let region = NatsRegion::start_with("token", |_| {
        ["--auth", "t0ken-value"].map(String::from).to_vec()
    })
    .unwrap();
    let good = triplet(region.url(), Some("token"), Some("t0ken-value"));
    round_trip(&Namespace::connect(&good, Limits::default()).await.unwrap()).await;
    let none = Namespace::connect(&triplet(region.url(), None, None), Limits::default())
        .await
        .unwrap();
    assert_eq!(none.probe().await.unwrap_err().kind(), ErrorKind::Auth);
}

/// A CA, and a certificate it signs for 127.0.0.1, made with `openssl`.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (./dev test installs it)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=georelay test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

#[tokio::test]
async fn a_tls_region_is_verified_against_the_given_ca() {
    let mut ca = None;
    let region = NatsRegion::start_with("tls", |dir| {
        certificates(dir);
        ca = Some(dir.join("ca.pem"));
        vec![
            "--tls".into(),
            "--tlscert".into(),
            dir.join("server.pem").display().to_string(),
            "--tlskey".into(),
            dir.join("server.key").display().to_string(),
        ]
    })
    .unwrap();
    let endpoint = format!("tls://127.0.0.1:{}", region.port());
    let trusting = Limits {
        nats_ca_file: ca,
        ..Limits::default()
    };
    let ns = Namespace::connect(&triplet(endpoint.clone(), None, None), trusting)
        .await
        .unwrap();
    round_trip(&ns).await;
    // Without the CA the server's certificate is not trusted: no connection.
    let untrusting = Namespace::connect(&triplet(endpoint, None, None), Limits::default())
        .await
        .unwrap();
    assert!(!untrusting.wait_connected(Duration::from_secs(2)).await);
}
