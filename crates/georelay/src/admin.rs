//! `georelay admin …`: the operator's commands. Each prints what it did in
//! words; `status` prints the whole control plane at a glance.

use anyhow::{bail, Context as _};
use chrono::{DateTime, Utc};
use georelay_core::DeviceId;
use georelay_store::control::{self, Actor, NewNamespace};
use std::io::Read as _;
use zeroize::Zeroizing;

use crate::cli::{
    Admin, DeadLettersCmd, DeviceCmd, GroupCmd, NamespaceCmd, OffOr, OnOff, TrailAbandon, TrailCmd,
};
use crate::config;
use crate::table::Table;

pub async fn run(cmd: Admin) -> anyhow::Result<()> {
    let pool = config::database().await?;
    match cmd {
        Admin::Namespace(NamespaceCmd::Add(a)) => {
            let master = config::master_key()?;
            config::check_master_key(&pool, &master).await?;
            let key = match a.key.as_deref() {
                Some("-") => Some(read_secret_from_stdin()?),
                Some(k) => Some(Zeroizing::new(k.to_owned())),
                None => None,
            };
            let transport = a.transport.kind();
            control::add_namespace(
                &pool,
                &master,
                &NewNamespace {
                    name: &a.name,
                    region: &a.region,
                    transport,
                    endpoint: &a.endpoint,
                    priority: a.priority,
                    key_name: a.key_name.as_deref(),
                    key: key.as_ref().map(|k| k.as_bytes()),
                },
            )
            .await?;
            println!(
                "namespace {} added: region {}, {} at {}, priority {}",
                a.name,
                a.region,
                transport.as_str(),
                georelay_core::redacted_endpoint(&a.endpoint),
                a.priority
            );
        }
        Admin::Namespace(NamespaceCmd::SetKey(a)) => {
            let master = config::master_key()?;
            config::check_master_key(&pool, &master).await?;
            let key = match a.key.as_str() {
                "-" => read_secret_from_stdin()?,
                k => Zeroizing::new(k.to_owned()),
            };
            control::set_namespace_key(&pool, &master, &a.name, &a.key_name, key.as_bytes())
                .await?;
            println!("namespace {}: key {} set", a.name, a.key_name);
        }
        Admin::Namespace(NamespaceCmd::List) => print!(
            "{}",
            namespaces_table(&control::list_namespaces(&pool).await?)
        ),
        Admin::Namespace(NamespaceCmd::Enable(n)) => {
            let changed = control::set_namespace_enabled(&pool, &n.name, true).await?;
            println!(
                "namespace {} {}",
                n.name,
                if changed {
                    "enabled"
                } else {
                    "was already enabled"
                }
            );
        }
        Admin::Namespace(NamespaceCmd::Disable(n)) => {
            let changed = control::set_namespace_enabled(&pool, &n.name, false).await?;
            println!(
                "namespace {} {}",
                n.name,
                if changed {
                    "disabled: out of rotation"
                } else {
                    "was already disabled"
                }
            );
        }
        Admin::Group(GroupCmd::Add(g)) => {
            control::add_group(&pool, &g.name, &g.queue, &g.namespace, &actor(None)).await?;
            println!(
                "group {} added: queue {}, senders on {} (epoch 1)",
                g.name, g.queue, g.namespace
            );
        }
        Admin::Group(GroupCmd::List) => {
            print!("{}", groups_table(&control::list_groups(&pool).await?))
        }
        Admin::Device(DeviceCmd::Add(d)) => {
            let id =
                DeviceId::parse(&d.id).with_context(|| format!("invalid device id {:?}", d.id))?;
            let master = config::master_key()?;
            config::check_master_key(&pool, &master).await?;
            let key = control::add_device(&pool, &master, &id, &d.group).await?;
            eprintln!(
                "device {id} added to group {}; its key (shown once, keep it secret):",
                d.group
            );
            println!("{}", key.to_base64().as_str());
        }
        Admin::Device(DeviceCmd::List(l)) => {
            let mut t = Table::new(&["DEVICE", "GROUP", "ENABLED", "CREATED", "LAST SEEN"]);
            for d in control::list_devices(&pool, l.group.as_deref(), l.silent_for).await? {
                let seen = d.last_seen_at.map_or_else(|| "never".to_owned(), time);
                t.row(vec![
                    d.id,
                    d.group,
                    yes_no(d.enabled),
                    time(d.created_at),
                    seen,
                ]);
            }
            print!("{}", t.render(0));
        }
        Admin::Device(DeviceCmd::Disable(d)) => {
            let changed = control::set_device_enabled(&pool, &d.id, false).await?;
            println!(
                "device {} {}",
                d.id,
                if changed {
                    "disabled"
                } else {
                    "was already disabled"
                }
            );
        }
        Admin::Device(DeviceCmd::Enable(d)) => {
            let changed = control::set_device_enabled(&pool, &d.id, true).await?;
            let state = if changed {
                "enabled"
            } else {
                "was already enabled"
            };
            println!("device {} {state}", d.id);
        }
        Admin::Group(GroupCmd::Set(g)) => {
            if let Some(failover) = g.failover {
                let on = failover == OnOff::On;
                let changed =
                    control::set_failover_enabled(&pool, &g.name, on, &actor(g.reason.clone()))
                        .await?;
                let state = match (on, changed) {
                    (true, true) => "automatic failover on",
                    (false, true) => {
                        "automatic failover off: it stays where it is, even if its region goes down"
                    }
                    (true, false) => "automatic failover was already on",
                    (false, false) => "automatic failover was already off",
                };
                println!("group {}: {state}", g.name);
            }
            if let Some(limit) = g.abandon_after {
                let after = match limit {
                    OffOr::Off => None,
                    OffOr::After(d) => Some(d),
                };
                control::set_abandon_after(&pool, &g.name, after).await?;
                match after {
                    Some(d) => println!(
                        "group {}: the worker gives up on an old epoch it cannot read for {d:?}; devices with records stranded there wait for their agents to send them again",
                        g.name
                    ),
                    None => println!(
                        "group {}: the worker never gives up on an epoch by itself (georelay admin trail abandon does)",
                        g.name
                    ),
                }
            }
        }
        Admin::Device(DeviceCmd::ReleaseGap(r)) => {
            let gaps =
                georelay_store::gaps::request_release(&pool, &r.device, r.epoch, &actor(r.reason))
                    .await?;
            for (epoch, after, through) in gaps {
                println!(
                    "device {}: seqs {} stranded in epoch {epoch} given up; the worker stores its parked records in order now",
                    r.device,
                    georelay_store::gaps::seqs(after, through)
                );
            }
        }
        Admin::Trail(TrailCmd::Abandon(a)) => abandon(&pool, a).await?,
        Admin::DeadLetters(cmd) => dead_letters(&pool, cmd).await?,
        Admin::Failover(f) => {
            let reason = f
                .reason
                .clone()
                .or_else(|| Some("manual failover".to_owned()));
            let m = control::move_senders(&pool, &f.group, &f.to, &actor(reason)).await?;
            if m.moved {
                println!(
                    "group {}: senders moved {} -> {} (epoch {}); the worker drains {} and then follows",
                    f.group, m.from, m.to, m.epoch, m.from
                );
            } else {
                println!(
                    "group {}: senders already on {} (epoch {}); nothing changed",
                    f.group, m.to, m.epoch
                );
            }
        }
        Admin::Status => print!("{}", status(&pool).await?),
        Admin::Doctor => {
            let master = config::master_key()?;
            let problems = georelay_store::doctor::problems(&pool, Some(&master)).await?;
            if problems.is_empty() {
                println!("no problems found");
            } else {
                print!("{}", problems_text(&problems));
                bail!(
                    "{} control plane problem(s); each is printed above with its fix",
                    problems.len()
                );
            }
        }
    }
    Ok(())
}

async fn dead_letters(pool: &georelay_store::PgPool, cmd: DeadLettersCmd) -> anyhow::Result<()> {
    use georelay_store::dead_letters::{self as dl, Filter, Replayed};
    match cmd {
        DeadLettersCmd::List(l) => {
            let since = l
                .since
                .map(|d| chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or_default());
            let letters = dl::list(
                pool,
                &Filter {
                    group: l.group.as_deref(),
                    reason: l.reason.as_deref(),
                    since,
                    limit: l.limit.clamp(1, 10_000),
                    ..Filter::default()
                },
            )
            .await?;
            let mut t = Table::new(&["ID", "AT", "GROUP", "REASON", "DEVICE", "SEQ", "DETAIL"]);
            for d in &letters {
                let mut detail = d.detail.clone().unwrap_or_default();
                if detail.chars().count() > 80 {
                    detail = detail.chars().take(79).chain(['…']).collect();
                }
                t.row(vec![
                    d.id.to_string(),
                    time(d.at),
                    d.group.clone().unwrap_or_default(),
                    d.reason.clone(),
                    d.device_id.clone().unwrap_or_default(),
                    d.seq.map(|s| s.to_string()).unwrap_or_default(),
                    detail,
                ]);
            }
            print!("{}", t.render(0));
        }
        DeadLettersCmd::Show(s) => {
            let found = dl::list(
                pool,
                &Filter {
                    id: Some(s.id),
                    limit: 1,
                    ..Filter::default()
                },
            )
            .await?;
            let Some(d) = found.first() else {
                bail!("dead letter {} does not exist", s.id);
            };
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
            println!("id          {}\nat          {}\ngroup       {}\nnamespace   {}\nepoch       {}\nmessage id  {}\nreason      {}\ndetail      {}\nraw         {} bytes",
                d.id, time(d.at), opt(&d.group), opt(&d.namespace),
                d.epoch.map_or("-".to_owned(), |e| e.to_string()), opt(&d.message_id),
                d.reason, opt(&d.detail), d.raw.len());
            match georelay_core::Envelope::decode(&d.raw) {
                Ok(e) => println!(
                    "envelope    epoch {}, received {}, device {}, seq {}, sealed record {} bytes",
                    e.epoch,
                    chrono::DateTime::from_timestamp_micros(e.received_at_micros)
                        .map_or("-".to_owned(), time),
                    e.device,
                    e.record.seq,
                    e.record.ciphertext.len()
                ),
                Err(e) => println!("envelope    not readable: {e}"),
            }
        }
        DeadLettersCmd::Replay(r) => {
            let master = config::master_key()?;
            let mut letters = dl::list(
                pool,
                &Filter {
                    id: r.id,
                    reason: r.reason.as_deref(),
                    limit: 100_000,
                    ..Filter::default()
                },
            )
            .await?;
            if letters.is_empty() {
                bail!("no such dead letters");
            }
            // Oldest first: a device's records in the order they came.
            letters.reverse();
            let (mut stored, mut kept) = (0, 0);
            for d in &letters {
                match dl::replay(pool, &master, d).await? {
                    Replayed::Stored => stored += 1,
                    Replayed::Kept { reason, why } => {
                        kept += 1;
                        println!("{}: kept ({}): {why}", d.id, reason.as_str());
                    }
                }
            }
            println!("{stored} stored, {kept} kept");
        }
    }
    Ok(())
}

/// `admin trail abandon`: says what the epoch's queue still holds, and with
/// `--yes` gives it up.
async fn abandon(pool: &georelay_store::PgPool, a: TrailAbandon) -> anyhow::Result<()> {
    let (namespace, queue) = control::epoch_home(pool, &a.group, a.epoch).await?;
    let held = match config::master_key() {
        Ok(master) => queue_depth(pool, &master, &namespace, &queue).await,
        Err(e) => format!("cannot count it ({e})"),
    };
    if !a.yes {
        let devices = control::devices_acknowledged_in(pool, &a.group, a.epoch).await?;
        bail!(
            "epoch {} of group {} is on {namespace}, whose queue {queue} holds {held}; ingest acknowledged records of {devices} devices there. Abandoning lets the worker go on at once: devices with records there not stored wait (their newer records parked) until their agents send those again, the others flow; a device that never sends them again needs `georelay admin device release-gap`. Run again with --yes to do it",
            a.epoch,
            a.group
        );
    }
    let done = control::abandon_epoch(pool, &a.group, a.epoch, &actor(a.reason)).await?;
    println!(
        "epoch {} of group {} abandoned ({} held {held}); the worker drains {} now; {} devices wait for records stranded there (georelay admin status lists them)",
        a.epoch, a.group, done.namespace, done.worker_on, done.gaps
    );
    if done.given_up > 0 {
        println!(
            "{} devices that do not send again (trackers) had records there: those are given up (gap_released events)",
            done.given_up
        );
    }
    Ok(())
}

/// What `queue` holds in namespace `name`, in words (the region may be gone).
async fn queue_depth(
    pool: &georelay_store::PgPool,
    master: &georelay_core::MasterKey,
    name: &str,
    queue: &str,
) -> String {
    let routing = match georelay_store::routing::load_routing(pool, master).await {
        Ok(r) => r,
        Err(e) => return format!("an unknown number of records (cannot read the routing: {e})"),
    };
    let Some(ns) = routing.namespaces.iter().find(|n| n.name == name) else {
        return "an unknown number of records (its key does not open)".to_owned();
    };
    let limits = georelay_transport::Limits::default();
    let depth = async {
        let conn = georelay_transport::Namespace::connect(&ns.triplet, limits).await?;
        conn.depth(queue).await
    };
    match depth.await {
        Ok(n) => format!("{n} records"),
        Err(e) => format!("an unknown number of records (cannot reach it: {e})"),
    }
}

fn problems_text(problems: &[georelay_store::doctor::Problem]) -> String {
    let mut out = String::new();
    for p in problems {
        out.push_str(&format!(
            "PROBLEM {}
  fix: {}
",
            p.what, p.fix
        ));
    }
    out
}

/// The audit actor for commands run by a person: `cli:USER@HOST`.
fn actor(reason: Option<String>) -> Actor {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| match std::fs::metadata("/proc/self") {
            Ok(m) => format!("uid{}", std::os::unix::fs::MetadataExt::uid(&m)),
            Err(_) => "unknown".to_owned(),
        });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    Actor {
        actor: format!("cli:{user}@{host}"),
        reason,
    }
}

fn read_secret_from_stdin() -> anyhow::Result<Zeroizing<String>> {
    let mut s = Zeroizing::new(String::new());
    std::io::stdin()
        .read_to_string(&mut s)
        .context("cannot read the key from stdin")?;
    let trimmed = Zeroizing::new(s.trim().to_owned());
    if trimmed.is_empty() {
        bail!("--key - read an empty key from stdin");
    }
    Ok(trimmed)
}

/// `admin status`'s STRANDED section: devices whose newer records wait for
/// records stranded in an abandoned epoch.
fn stranded_text(open: &[georelay_store::gaps::OpenGap]) -> String {
    let mut out =
        "\nSTRANDED (records acknowledged in an abandoned epoch, not stored yet)\n".to_owned();
    if open.is_empty() {
        out.push_str("  (none)\n");
        return out;
    }
    let mut t = Table::new(&[
        "GROUP", "DEVICE", "EPOCH", "SEQS", "SINCE", "PARKED", "STATE",
    ]);
    for g in open {
        t.row(vec![
            g.group.clone(),
            g.device_id.clone(),
            g.epoch.to_string(),
            georelay_store::gaps::seqs(g.after_seq, g.through_seq),
            time(g.opened_at),
            g.parked.to_string(),
            if g.release_requested_at.is_some() {
                "released: the worker stores the parked records".to_owned()
            } else {
                "WAITING for the agent to send them again".to_owned()
            },
        ]);
    }
    out.push_str(&t.render(2));
    out.push_str("  (a device that never will: georelay admin device release-gap --device D)\n");
    out
}

async fn status(pool: &georelay_store::PgPool) -> anyhow::Result<String> {
    let groups = control::list_groups(pool).await?;
    let trail = control::undrained_trail(pool).await?;
    let namespaces = control::list_namespaces(pool).await?;
    let workers = georelay_store::overview::drain_progress(pool).await?;
    // Key checks need the master key; without it `admin doctor` does them.
    let master = config::master_key().ok();
    let problems = georelay_store::doctor::problems(pool, master.as_ref()).await?;
    let mut out = problems_text(&problems);
    out.push_str("GROUPS\n");
    if groups.is_empty() {
        out.push_str("  (none: georelay admin group add --name G --queue Q --namespace N)\n");
    }
    for g in &groups {
        let state = if g.failover_in_progress() {
            format!(
                "FAILOVER IN PROGRESS: senders on {}, worker draining {}",
                g.sender_namespace, g.drain_namespace
            )
        } else {
            format!("steady on {}", g.sender_namespace)
        };
        out.push_str(&format!(
            "  {}  queue {}  epoch {}  {}  (automatic failover {})\n",
            g.name,
            g.queue,
            g.epoch,
            state,
            if g.failover_enabled { "on" } else { "OFF" }
        ));
        out.push_str(&format!(
            "    worker: {}\n",
            worker_line(workers.iter().find(|w| w.group == g.name))
        ));
        let mut t = Table::new(&["EPOCH", "NAMESPACE", "OPENED", "STATE"]);
        for e in trail.iter().filter(|e| e.group == g.name) {
            let what = if e.epoch == g.epoch {
                "current (senders write here)".to_owned()
            } else if let Some(at) = e.sealed_at {
                format!("sealed {}, draining", time(at))
            } else {
                "waiting for senders to leave (not sealed)".to_owned()
            };
            t.row(vec![
                e.epoch.to_string(),
                e.namespace.clone(),
                time(e.opened_at),
                what,
            ]);
        }
        out.push_str("    undrained trail:\n");
        out.push_str(&t.render(6));
    }
    out.push_str("\nNAMESPACES\n");
    out.push_str(&namespaces_table(&namespaces));
    out.push_str("\nDEAD LETTERS\n");
    let dead = georelay_store::dead_letters::by_reason(pool).await?;
    if dead.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut t = Table::new(&["REASON", "TOTAL", "LAST 24 H", "NEWEST"]);
        for d in &dead {
            t.row(vec![
                d.reason.clone(),
                d.total.to_string(),
                d.last_day.to_string(),
                time(d.newest),
            ]);
        }
        out.push_str(&t.render(2));
        out.push_str("  (georelay admin dead-letters list --reason R)\n");
    }
    out.push_str(&stranded_text(
        &georelay_store::gaps::open(pool, None).await?,
    ));
    out.push_str("\nROLLUP\n");
    let rollup = georelay_store::rollup::progress(pool).await?;
    let held = if rollup.held {
        "a worker holds the lease"
    } else {
        "NO WORKER holds the lease (start georelay rollup)"
    };
    out.push_str(&format!(
        "  rolled up to store_order {}, {} behind, last advanced {}; {held}\n",
        rollup.watermark,
        rollup.behind,
        time(rollup.updated_at)
    ));
    out.push_str("\nPROCESSES\n");
    let processes = control::list_processes(pool).await?;
    if processes.is_empty() {
        out.push_str("  (none registered)\n");
    } else {
        let mut t = Table::new(&["ROLE", "HOST", "PID", "LEASE", "ACKNOWLEDGES", "DRAINS"]);
        for p in &processes {
            let lease = if p.lease_left >= 0.0 {
                format!("live, {:.1} s left", p.lease_left)
            } else {
                format!("LAPSED {:.0} s ago", -p.lease_left)
            };
            t.row(vec![
                p.role.clone(),
                p.hostname.clone(),
                p.pid.map_or_else(|| "-".to_owned(), |pid| pid.to_string()),
                lease,
                p.epochs.clone(),
                p.draining.clone(),
            ]);
        }
        out.push_str(&t.render(2));
    }
    Ok(out)
}

/// Who drains a group and how it goes, from its lease row.
fn worker_line(w: Option<&georelay_store::overview::DrainProgress>) -> String {
    let Some(w) = w.filter(|w| w.live) else {
        return "NONE holds the drain lease: start `georelay drain` (nothing is stored until one does)"
            .to_owned();
    };
    let holder = w.holder.as_deref().unwrap_or("an unregistered process");
    if let Some(since) = w.blocked_since {
        let secs = (Utc::now() - since).num_seconds().max(0);
        return format!(
            "{holder}, BLOCKED for {secs} s: {} (newer records wait: strict order; runbook: docs/operations.md, GeorelayDrainBlocked)",
            w.blocked_on.as_deref().unwrap_or("cannot read the epoch it drains")
        );
    }
    match (w.last_batch_at, w.last_batch_lag) {
        (Some(at), Some(lag)) => format!(
            "{holder}, last batch {} with lag {lag:.2} s, {} records stored",
            time(at),
            w.stored_total
        ),
        _ => format!("{holder}, nothing stored yet"),
    }
}

fn namespaces_table(namespaces: &[control::Namespace]) -> String {
    let mut t = Table::new(&[
        "NAME",
        "REGION",
        "TRANSPORT",
        "PRIORITY",
        "ENABLED",
        "HEALTH",
        "SINCE",
        "ENDPOINT",
    ]);
    for n in namespaces {
        t.row(vec![
            n.name.clone(),
            n.region.clone(),
            n.transport.clone(),
            n.priority.to_string(),
            yes_no(n.enabled),
            n.health.clone(),
            time(n.health_changed_at),
            georelay_core::redacted_endpoint(&n.endpoint).into_owned(),
        ]);
    }
    t.render(2)
}

fn groups_table(groups: &[control::Group]) -> String {
    let mut t = Table::new(&[
        "GROUP", "QUEUE", "EPOCH", "SENDERS", "WORKER", "FAILOVER", "MOVED",
    ]);
    for g in groups {
        t.row(vec![
            g.name.clone(),
            g.queue.clone(),
            g.epoch.to_string(),
            g.sender_namespace.clone(),
            g.drain_namespace.clone(),
            if g.failover_enabled { "on" } else { "off" }.to_owned(),
            time(g.moved_at),
        ]);
    }
    t.render(0)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}
