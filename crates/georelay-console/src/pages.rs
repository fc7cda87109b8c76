//! The pages, rendered on the server from a [`Snapshot`]. Each page has a
//! live part (`<main id="live">`, re-rendered and pushed over server-sent
//! events) and, for the pages with actions, forms outside it, so an update
//! never wipes what an SRE is typing.
//!
//! Every value from the database goes through [`esc`]. Elements carry
//! `data-*` attributes (group, namespace, state) for tests and scripts.

use chrono::{DateTime, Utc};
use std::fmt::Write as _;

use crate::auth::Session;
use crate::data::{Depth, Snapshot};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Groups,
    Namespaces,
    Processes,
    Events,
    Devices,
}

impl Page {
    pub const ALL: [Page; 5] = [
        Page::Groups,
        Page::Namespaces,
        Page::Processes,
        Page::Events,
        Page::Devices,
    ];

    pub fn slug(self) -> &'static str {
        match self {
            Page::Groups => "groups",
            Page::Namespaces => "namespaces",
            Page::Processes => "processes",
            Page::Events => "events",
            Page::Devices => "devices",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Page::Groups => "Groups",
            Page::Namespaces => "Namespaces",
            Page::Processes => "Processes",
            Page::Events => "Events",
            Page::Devices => "Devices",
        }
    }

    pub fn from_slug(slug: &str) -> Option<Page> {
        Page::ALL.into_iter().find(|p| p.slug() == slug)
    }
}

/// What the page says to the person looking at it, besides the data.
#[derive(Debug, Default)]
pub struct Chrome<'a> {
    pub session: Option<&'a Session>,
    pub actions_enabled: bool,
    /// The outcome of the last action: `(is_error, text)`.
    pub flash: Option<(bool, String)>,
}

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// "12 s ago", "3 min ago", "2 h ago" from `now`.
fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let s = (now - t).num_seconds().max(0);
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

fn secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.0} s")
    }
}

/// A whole page.
pub fn page(page: Page, snap: &Snapshot, chrome: &Chrome<'_>) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>georelay · {}</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/live.js\" defer></script></head><body><header><b>georelay</b><nav>",
        page.title()
    );
    for p in Page::ALL {
        let here = if p == page { " class=\"here\"" } else { "" };
        let _ = write!(h, " <a href=\"/{}\"{here}>{}</a>", p.slug(), p.title());
    }
    h.push_str("</nav><span id=\"conn\" class=\"warn\">connecting…</span><span class=\"who\">");
    match chrome.session {
        Some(s) => {
            let _ = write!(
                h,
                "signed in as <b id=\"user\">{}</b> <form method=\"post\" action=\"/logout\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>sign out</button></form>",
                esc(&s.user),
                esc(&s.csrf)
            );
        }
        None if chrome.actions_enabled => {
            h.push_str("read-only · <a href=\"/login\">sign in to act</a>")
        }
        None => h.push_str("read-only console"),
    }
    h.push_str("</span></header>");
    if let Some((error, text)) = &chrome.flash {
        let class = if *error { "flash error" } else { "flash" };
        let _ = write!(h, "<div class=\"{class}\" id=\"flash\">{}</div>", esc(text));
    }
    let _ = write!(
        h,
        "<main id=\"live\" data-src=\"/live/{}\">{}</main>",
        page.slug(),
        live(page, snap)
    );
    h.push_str(&actions(page, snap, chrome));
    h.push_str("</body></html>");
    h
}

/// The live part of a page: what the server-sent events replace.
pub fn live(page: Page, snap: &Snapshot) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let now = snap.at.unwrap_or_else(Utc::now);
    if snap.at.is_none() {
        h.push_str("<p class=\"warn\">loading the control plane…</p>");
        return h;
    }
    if let Some(why) = &snap.stale {
        let _ = write!(
            h,
            "<div class=\"banner\" id=\"stale\">DATABASE NOT ANSWERING: {}. Showing the control plane as of {}.</div>",
            esc(why),
            time(now)
        );
    }
    for p in &snap.problems {
        let _ = write!(
            h,
            "<div class=\"banner problem\">CONTROL PLANE PROBLEM: {}<br>fix: <code>{}</code></div>",
            esc(&p.what),
            esc(&p.fix)
        );
    }
    match page {
        Page::Groups => groups(&mut h, snap, now),
        Page::Namespaces => namespaces(&mut h, snap, now),
        Page::Processes => processes(&mut h, snap, now),
        Page::Events => events(&mut h, snap),
        Page::Devices => devices(&mut h, snap, now),
    }
    let _ = write!(h, "<p class=\"muted\">as of {}</p>", time(now));
    h
}

/// A table: header cells, then rows of already-escaped cells.
fn table(h: &mut String, id: &str, head: &[&str], rows: &[(String, Vec<String>)]) {
    let _ = write!(h, "<table id=\"{id}\"><tr>");
    for c in head {
        let _ = write!(h, "<th>{c}</th>");
    }
    h.push_str("</tr>");
    for (attrs, cells) in rows {
        let _ = write!(h, "<tr{attrs}>");
        for c in cells {
            let _ = write!(h, "<td>{c}</td>");
        }
        h.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(
            h,
            "<tr><td colspan=\"{}\" class=\"muted\">none</td></tr>",
            head.len()
        );
    }
    h.push_str("</table>");
}

fn depth_text(snap: &Snapshot, namespace: &str, queue: &str) -> String {
    match snap.depths.get(&(namespace.to_owned(), queue.to_owned())) {
        Some(Depth::Messages(n)) => n.to_string(),
        Some(Depth::NoQueue(why)) => format!(
            "<span class=\"muted\" title=\"{}\">no queue</span>",
            esc(why)
        ),
        Some(Depth::Unknown(why)) => {
            format!("<span class=\"bad\" title=\"{}\">unknown</span>", esc(why))
        }
        None => "<span class=\"muted\">not measured yet</span>".to_owned(),
    }
}

fn groups(h: &mut String, snap: &Snapshot, now: DateTime<Utc>) {
    if snap.groups.is_empty() {
        h.push_str("<p>No groups yet: <code>georelay admin group add --name G --queue Q --namespace N</code></p>");
    }
    for g in &snap.groups {
        let (state, class, text) = if g.failover_in_progress() {
            (
                "failover",
                "failover",
                format!(
                    "FAILOVER IN PROGRESS: senders on {}, worker draining {}",
                    esc(&g.sender_namespace),
                    esc(&g.drain_namespace)
                ),
            )
        } else {
            (
                "steady",
                "steady",
                format!("steady on {}", esc(&g.sender_namespace)),
            )
        };
        let _ = write!(
            h,
            "<section class=\"group\" data-group=\"{name}\" data-state=\"{state}\" data-epoch=\"{epoch}\" \
             data-senders=\"{senders}\" data-worker=\"{worker}\"><h2>group {name}</h2>\
             <p><span class=\"state {class}\">{text}</span> · queue <b>{queue}</b> · epoch <b>{epoch}</b> · \
             automatic failover <b class=\"{fo_class}\">{fo}</b> · senders moved {moved}</p>",
            name = esc(&g.name),
            epoch = g.epoch,
            senders = esc(&g.sender_namespace),
            worker = esc(&g.drain_namespace),
            queue = esc(&g.queue),
            fo_class = if g.failover_enabled { "ok" } else { "warn" },
            fo = if g.failover_enabled { "on" } else { "OFF" },
            moved = ago(g.moved_at, now),
        );
        h.push_str("<p class=\"drain\">worker: ");
        match snap.progress.iter().find(|p| p.group == g.name) {
            None => {
                h.push_str("<span class=\"bad\">no worker has ever held this group's lease</span>")
            }
            Some(p) => {
                if !p.live {
                    h.push_str("<span class=\"bad\">NO WORKER holds the lease</span>");
                } else {
                    let _ = write!(
                        h,
                        "{}",
                        esc(p.holder.as_deref().unwrap_or("an unregistered process"))
                    );
                }
                if let (Some(since), true) = (p.blocked_since, p.live) {
                    let _ = write!(
                        h,
                        " · <span class=\"blocked\">BLOCKED for {}: {}</span>",
                        ago(since, now).trim_end_matches(" ago"),
                        esc(p
                            .blocked_on
                            .as_deref()
                            .unwrap_or("cannot read the epoch it drains"))
                    );
                }
                match (p.last_batch_at, p.last_batch_lag) {
                    (Some(at), Some(lag)) if (now - at).num_seconds() < 10 => {
                        let _ = write!(h, " · drain lag {}", secs(lag));
                    }
                    (Some(at), _) => {
                        let _ = write!(h, " · idle, last batch stored {}", ago(at, now));
                    }
                    (None, _) => h.push_str(" · nothing stored yet"),
                }
                if let Some(rate) = snap.per_minute.get(&g.name) {
                    let _ = write!(h, " · {rate:.0} records/min");
                }
            }
        }
        h.push_str("</p>");
        let rows: Vec<(String, Vec<String>)> = snap
            .trail
            .iter()
            .filter(|e| e.group == g.name)
            .map(|e| {
                let state = if e.epoch == g.epoch {
                    "current: senders write here".to_owned()
                } else if let Some(at) = e.sealed_at {
                    format!("sealed {}, draining", ago(at, now))
                } else {
                    "<span class=\"warn\">waiting for senders to leave (not sealed)</span>"
                        .to_owned()
                };
                (
                    format!(" data-epoch=\"{}\"", e.epoch),
                    vec![
                        e.epoch.to_string(),
                        esc(&e.namespace),
                        time(e.opened_at),
                        state,
                        depth_text(snap, &e.namespace, &g.queue),
                    ],
                )
            })
            .collect();
        table(
            h,
            &format!("trail-{}", esc(&g.name)),
            &["EPOCH", "NAMESPACE", "OPENED", "STATE", "DEPTH"],
            &rows,
        );
        h.push_str("</section>");
    }
}

fn namespaces(h: &mut String, snap: &Snapshot, now: DateTime<Utc>) {
    let queues: Vec<&str> = {
        let mut q: Vec<&str> = snap.groups.iter().map(|g| g.queue.as_str()).collect();
        q.sort_unstable();
        q.dedup();
        q
    };
    let rows: Vec<(String, Vec<String>)> = snap
        .namespaces
        .iter()
        .map(|n| {
            let health_class = match n.health.as_str() {
                "healthy" => "ok",
                "degraded" => "warn",
                _ => "bad",
            };
            let depth = queues
                .iter()
                .map(|q| format!("{} {}", esc(q), depth_text(snap, &n.name, q)))
                .collect::<Vec<_>>()
                .join("<br>");
            let open: Vec<String> = snap
                .open_breakers
                .iter()
                .filter(|b| b.namespace == n.name)
                .map(|b| esc(&b.instance))
                .collect();
            let breakers = if open.is_empty() {
                format!(
                    "<span class=\"ok\">closed on all {} ingest instances</span>",
                    snap.ingest_live
                )
            } else {
                format!("<span class=\"bad\">OPEN on {}</span>", open.join(", "))
            };
            (
                format!(" data-namespace=\"{}\"", esc(&n.name)),
                vec![
                    esc(&n.name),
                    esc(&n.region),
                    esc(&n.transport),
                    n.priority.to_string(),
                    if n.enabled {
                        "yes".to_owned()
                    } else {
                        "<span class=\"warn\">no</span>".to_owned()
                    },
                    format!("<span class=\"{health_class}\">{}</span>", esc(&n.health)),
                    format!(
                        "{} ({})",
                        time(n.health_changed_at),
                        ago(n.health_changed_at, now)
                    ),
                    depth,
                    breakers,
                    esc(&georelay_core::redacted_endpoint(&n.endpoint)),
                ],
            )
        })
        .collect();
    h.push_str("<h2>namespaces (triplets)</h2>");
    table(
        h,
        "namespaces",
        &[
            "NAME",
            "REGION",
            "TRANSPORT",
            "PRIORITY",
            "ENABLED",
            "HEALTH",
            "SINCE",
            "QUEUE DEPTH",
            "BREAKERS",
            "ENDPOINT",
        ],
        &rows,
    );
}

fn processes(h: &mut String, snap: &Snapshot, now: DateTime<Utc>) {
    let rows: Vec<(String, Vec<String>)> = snap
        .processes
        .iter()
        .map(|p| {
            let lease = if p.lease_left >= 0.0 {
                format!("live, {:.1} s left", p.lease_left)
            } else {
                format!(
                    "<span class=\"bad\">LAPSED {:.0} s ago</span>",
                    -p.lease_left
                )
            };
            (
                format!(" data-role=\"{}\"", esc(&p.role)),
                vec![
                    esc(&p.role),
                    esc(&p.hostname),
                    p.pid.map_or_else(|| "-".to_owned(), |pid| pid.to_string()),
                    lease,
                    esc(&p.epochs),
                    esc(&p.draining),
                ],
            )
        })
        .collect();
    h.push_str("<h2>processes</h2>");
    table(
        h,
        "processes",
        &[
            "ROLE",
            "HOST",
            "PID",
            "LEASE",
            "ACKNOWLEDGES (group:epoch)",
            "DRAINS",
        ],
        &rows,
    );
    let rows: Vec<(String, Vec<String>)> = snap
        .progress
        .iter()
        .map(|p| {
            (
                format!(" data-group=\"{}\"", esc(&p.group)),
                vec![
                    esc(&p.group),
                    esc(p.holder.as_deref().unwrap_or("-")),
                    if p.live {
                        "live".to_owned()
                    } else {
                        "<span class=\"bad\">lapsed</span>".to_owned()
                    },
                    p.stored_total.to_string(),
                    p.last_batch_at
                        .map_or_else(|| "-".to_owned(), |t| ago(t, now)),
                    p.blocked_since.filter(|_| p.live).map_or_else(
                        || "no".to_owned(),
                        |t| format!("<span class=\"blocked\">since {}</span>", time(t)),
                    ),
                ],
            )
        })
        .collect();
    h.push_str("<h2>drain leases</h2>");
    table(
        h,
        "leases",
        &[
            "GROUP",
            "HOLDER",
            "LEASE",
            "STORED",
            "LAST BATCH",
            "BLOCKED",
        ],
        &rows,
    );
}

fn events(h: &mut String, snap: &Snapshot) {
    let rows: Vec<(String, Vec<String>)> = snap
        .events
        .iter()
        .map(|e| {
            (
                format!(" data-kind=\"{}\"", esc(&e.kind)),
                vec![
                    time(e.at),
                    esc(&e.group),
                    esc(&e.kind),
                    esc(e.from_namespace.as_deref().unwrap_or("-")),
                    esc(e.to_namespace.as_deref().unwrap_or("-")),
                    e.epoch.to_string(),
                    esc(&e.actor),
                    esc(e.reason.as_deref().unwrap_or("")),
                ],
            )
        })
        .collect();
    h.push_str("<h2>failover events (newest first)</h2>");
    table(
        h,
        "events",
        &[
            "AT", "GROUP", "KIND", "FROM", "TO", "EPOCH", "ACTOR", "REASON",
        ],
        &rows,
    );
    let rows: Vec<(String, Vec<String>)> = snap
        .dead
        .iter()
        .map(|d| {
            (
                String::new(),
                vec![
                    esc(&d.reason),
                    d.total.to_string(),
                    d.last_day.to_string(),
                    time(d.newest),
                ],
            )
        })
        .collect();
    h.push_str("<h2>dead letters by reason</h2>");
    table(
        h,
        "dead-by-reason",
        &["REASON", "TOTAL", "LAST 24 H", "NEWEST"],
        &rows,
    );
    let rows: Vec<(String, Vec<String>)> = snap
        .newest_dead
        .iter()
        .map(|d| {
            (
                String::new(),
                vec![
                    d.id.to_string(),
                    time(d.at),
                    esc(d.group.as_deref().unwrap_or("-")),
                    esc(&d.reason),
                    esc(d.device_id.as_deref().unwrap_or("-")),
                    d.seq.map_or_else(|| "-".to_owned(), |s| s.to_string()),
                    esc(d.detail.as_deref().unwrap_or("")),
                ],
            )
        })
        .collect();
    h.push_str("<h2>newest dead letters</h2><p class=\"muted\">each: <code>georelay admin dead-letters show --id N</code></p>");
    table(
        h,
        "dead-letters",
        &["ID", "AT", "GROUP", "REASON", "DEVICE", "SEQ", "DETAIL"],
        &rows,
    );
}

fn devices(h: &mut String, snap: &Snapshot, now: DateTime<Utc>) {
    stranded(h, snap, now);
    let rows: Vec<(String, Vec<String>)> = snap
        .fleets
        .iter()
        .map(|f| {
            let silent = if f.silent > 0 {
                format!("<span class=\"bad\">{}</span>", f.silent)
            } else {
                "0".to_owned()
            };
            (
                format!(" data-group=\"{}\"", esc(&f.group)),
                vec![
                    esc(&f.group),
                    f.devices.to_string(),
                    f.enabled.to_string(),
                    silent,
                    f.seen_last_minute.to_string(),
                    snap.per_minute
                        .get(&f.group)
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.0}")),
                ],
            )
        })
        .collect();
    h.push_str("<h2>fleet per group</h2>");
    table(
        h,
        "fleets",
        &[
            "GROUP",
            "DEVICES",
            "ENABLED",
            "SILENT",
            "SEEN IN THE LAST MINUTE",
            "RECORDS/MIN",
        ],
        &rows,
    );
    let rows: Vec<(String, Vec<String>)> = snap
        .devices
        .iter()
        .map(|d| {
            let seen = d.last_seen_at.map_or_else(
                || "never".to_owned(),
                |t| format!("{} ({})", time(t), ago(t, now)),
            );
            (
                format!(" data-device=\"{}\"", esc(&d.id)),
                vec![
                    esc(&d.id),
                    esc(&d.group),
                    if d.enabled {
                        "yes".to_owned()
                    } else {
                        "<span class=\"warn\">no</span>".to_owned()
                    },
                    seen,
                    if d.silent {
                        "<span class=\"bad\">SILENT</span>".to_owned()
                    } else {
                        String::new()
                    },
                ],
            )
        })
        .collect();
    h.push_str("<h2>devices (silent first)</h2>");
    table(
        h,
        "devices",
        &["DEVICE", "GROUP", "ENABLED", "LAST SEEN", ""],
        &rows,
    );
}

/// Devices whose newer records are parked until records stranded in an
/// abandoned epoch are sent again (or an SRE releases them).
fn stranded(h: &mut String, snap: &Snapshot, now: DateTime<Utc>) {
    h.push_str("<h2>stranded records (abandoned epochs)</h2>");
    if snap.stranded.is_empty() {
        h.push_str("<p id=\"stranded-none\" class=\"muted\">none: no device waits for records of a region given up</p>");
        return;
    }
    let rows: Vec<(String, Vec<String>)> = snap
        .stranded
        .iter()
        .map(|g| {
            let state = if g.release_requested_at.is_some() {
                "released: the worker stores the parked records".to_owned()
            } else {
                format!(
                    "<span class=\"warn\">WAITING</span> for its agent to send them again; a device that never will: <code>georelay admin device release-gap --device {}</code>",
                    esc(&g.device_id)
                )
            };
            (
                format!(" data-device=\"{}\"", esc(&g.device_id)),
                vec![
                    esc(&g.device_id),
                    esc(&g.group),
                    g.epoch.to_string(),
                    georelay_store::gaps::seqs(g.after_seq, g.through_seq),
                    format!("{} ({})", time(g.opened_at), ago(g.opened_at, now)),
                    g.parked.to_string(),
                    state,
                ],
            )
        })
        .collect();
    table(
        h,
        "stranded",
        &[
            "DEVICE", "GROUP", "EPOCH", "SEQS", "SINCE", "PARKED", "STATE",
        ],
        &rows,
    );
}

/// The forms of a page: outside the live part. Shown only with a session.
fn actions(page: Page, snap: &Snapshot, chrome: &Chrome<'_>) -> String {
    let mut h = String::new();
    if !matches!(page, Page::Groups | Page::Namespaces) {
        return h;
    }
    h.push_str("<section class=\"actions\"><h2>actions</h2>");
    let Some(session) = chrome.session else {
        if chrome.actions_enabled {
            h.push_str("<p class=\"muted\"><a href=\"/login\">Sign in</a> to move senders, set the failover bit or enable a namespace.</p>");
        } else {
            h.push_str("<p class=\"muted\">Read-only: this console was started without GEORELAY_CONSOLE_TOKEN.</p>");
        }
        h.push_str("</section>");
        return h;
    };
    let csrf = format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&session.csrf)
    );
    let options = |names: &mut dyn Iterator<Item = &str>| -> String {
        names
            .map(|n| format!("<option value=\"{0}\">{0}</option>", esc(n)))
            .collect()
    };
    let group_options = options(&mut snap.groups.iter().map(|g| g.name.as_str()));
    let ns_options = options(&mut snap.namespaces.iter().map(|n| n.name.as_str()));
    match page {
        Page::Groups => {
            let _ = write!(
                h,
                "<form method=\"post\" action=\"/actions/move\" id=\"move\">{csrf}\
                 <label>group<select name=\"group\">{group_options}</select></label>\
                 <label>move senders to<select name=\"to\">{ns_options}</select></label>\
                 <label>reason<input name=\"reason\" required maxlength=\"500\" size=\"40\" placeholder=\"failback after the eu-west incident\"></label>\
                 <button>move senders</button></form>\
                 <form method=\"post\" action=\"/actions/failover\" id=\"failover-bit\">{csrf}\
                 <label>group<select name=\"group\">{group_options}</select></label>\
                 <label>automatic failover<select name=\"failover\"><option value=\"on\">on</option><option value=\"off\">off</option></select></label>\
                 <button>set</button></form>"
            );
        }
        Page::Namespaces => {
            let _ = write!(
                h,
                "<form method=\"post\" action=\"/actions/namespace\" id=\"namespace-enabled\">{csrf}\
                 <label>namespace<select name=\"namespace\">{ns_options}</select></label>\
                 <label>rotation<select name=\"enabled\"><option value=\"on\">enable</option><option value=\"off\">disable (out of rotation)</option></select></label>\
                 <button>apply</button></form>"
            );
        }
        _ => {}
    }
    h.push_str("</section>");
    h
}

/// The sign-in page.
pub fn login(actions_enabled: bool, error: Option<&str>) -> String {
    let mut h = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>georelay · sign in</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\"></head><body>\
         <header><b>georelay</b><nav><a href=\"/groups\">back to the console</a></nav></header><main>",
    );
    if let Some(e) = error {
        let _ = write!(
            h,
            "<div class=\"flash error\" id=\"flash\">{}</div>",
            esc(e)
        );
    }
    if actions_enabled {
        h.push_str(
            "<h2>sign in to act</h2><form method=\"post\" action=\"/login\" id=\"login\">\
             <p><label>your name (the audit trail records it)<br><input name=\"user\" required maxlength=\"64\" autocomplete=\"username\"></label></p>\
             <p><label>console token<br><input name=\"token\" type=\"password\" required autocomplete=\"current-password\"></label></p>\
             <p><button>sign in</button></p></form>",
        );
    } else {
        h.push_str("<p>This console was started without <code>GEORELAY_CONSOLE_TOKEN</code>: it is read-only.</p>");
    }
    h.push_str("</main></body></html>");
    h
}

/// A short page for a refused request.
pub fn refused(status: u16, text: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>georelay · {status}</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\"></head><body><main>\
         <h2>{status}</h2><p id=\"refused\">{}</p><p><a href=\"/groups\">back to the console</a></p></main></body></html>",
        esc(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use georelay_store::control::Group;

    fn snapshot() -> Snapshot {
        Snapshot {
            at: Some(Utc::now()),
            groups: vec![Group {
                id: 1,
                name: "demo<script>".to_owned(),
                queue: "telemetry".to_owned(),
                failover_enabled: true,
                epoch: 2,
                sender_namespace: "eu-north".to_owned(),
                drain_namespace: "eu-west".to_owned(),
                moved_at: Utc::now(),
            }],
            ..Snapshot::default()
        }
    }

    #[test]
    fn values_from_the_database_are_escaped() {
        let html = live(Page::Groups, &snapshot());
        assert!(html.contains("demo&lt;script&gt;"));
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn a_group_between_namespaces_shows_failover_in_progress() {
        let html = live(Page::Groups, &snapshot());
        assert!(html.contains("FAILOVER IN PROGRESS: senders on eu-north, worker draining eu-west"));
        assert!(html.contains("data-state=\"failover\""));
        assert!(html.contains("no worker has ever held this group's lease"));
    }

    #[test]
    fn forms_need_a_session() {
        let snap = snapshot();
        let html = page(
            Page::Groups,
            &snap,
            &Chrome {
                actions_enabled: true,
                ..Chrome::default()
            },
        );
        assert!(!html.contains("action=\"/actions/move\""));
        assert!(html.contains("sign in to act"));
    }

    #[test]
    fn a_device_waiting_for_stranded_records_is_shown_with_how_to_release_it() {
        let mut snap = snapshot();
        assert!(live(Page::Devices, &snap).contains("stranded-none"));
        snap.stranded = vec![georelay_store::gaps::OpenGap {
            group: "demo".to_owned(),
            device_id: "plug-7".to_owned(),
            epoch: 3,
            after_seq: 10,
            through_seq: 14,
            opened_at: Utc::now(),
            release_requested_at: None,
            parked: 5,
        }];
        let html = live(Page::Devices, &snap);
        assert!(html.contains("<td>11..=14</td>"), "{html}");
        assert!(html.contains("release-gap --device plug-7"));
    }

    #[test]
    fn a_stale_snapshot_says_so() {
        let mut snap = snapshot();
        snap.stale = Some("connection refused".to_owned());
        assert!(
            live(Page::Namespaces, &snap).contains("DATABASE NOT ANSWERING: connection refused")
        );
    }
}
