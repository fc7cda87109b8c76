//! `georelay console`: the SRE console. One page per concern (groups,
//! namespaces, processes, events, devices), rendered on the server from the
//! control plane and kept live over server-sent events (NOTIFY on the
//! `georelay` channel, and a poll); the actions of a bad day (move senders,
//! the failover bit, a namespace in or out of rotation) behind a sign-in.
//!
//! Guarantees:
//! - Reading changes nothing. Actions go through the same store functions,
//!   SQL and triggers as `georelay admin`; moves are audited in
//!   `failover_events` with actor `console:USER` and the reason given.
//! - An action needs a session (see [`auth`]) and the session's CSRF token;
//!   without a session a POST is refused with 401, with a wrong token 403.
//! - Bounded: request bodies (16 KiB), live streams
//!   ([`Config::max_live_streams`], 503 beyond), every load and depth call
//!   (timeouts). A database that does not answer leaves the last snapshot on
//!   the page, marked stale; the console itself keeps running.
//! - No inline script (the Content-Security-Policy forbids it): the one
//!   script is `assets/live.js`, vendored.

pub mod auth;
mod data;
pub mod pages;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::StreamExt as _;
use georelay_core::MasterKey;
use georelay_store::control::{self, Actor};
use georelay_store::PgPool;
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::auth::{Auth, Session, SignInError};
use crate::data::{Loader, Snapshots};
use crate::pages::{Chrome, Page};

/// The console's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often the control plane is read when no NOTIFY came.
    pub poll_interval: Duration,
    /// How often the brokers are asked for queue depths.
    pub depth_interval: Duration,
    /// A device not seen this long is silent (as the drain's `--silent-after`).
    pub silent_after: Duration,
    /// How long a sign-in lasts.
    pub session_length: Duration,
    /// Most pages kept live at once.
    pub max_live_streams: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(2),
            depth_interval: Duration::from_secs(5),
            silent_after: Duration::from_secs(600),
            session_length: Duration::from_secs(8 * 3600),
            max_live_streams: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("--poll-interval must be between 100ms and 1m (got {0:?})")]
    PollInterval(Duration),
    #[error("--depth-interval must be between 1s and 10m (got {0:?})")]
    DepthInterval(Duration),
    #[error("GEORELAY_CONSOLE_TOKEN must be at least 16 characters (it guards the actions)")]
    ShortToken,
    #[error("serving the console: {0}")]
    Serve(#[source] std::io::Error),
}

impl Config {
    fn check(&self) -> Result<(), ConsoleError> {
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.poll_interval) {
            return Err(ConsoleError::PollInterval(self.poll_interval));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.depth_interval) {
            return Err(ConsoleError::DepthInterval(self.depth_interval));
        }
        Ok(())
    }
}

/// Request bodies (the forms) are small.
const MAX_BODY: usize = 16 * 1024;
const FLASH_COOKIE: &str = "georelay_flash";

struct App {
    auth: Auth,
    pool: PgPool,
    snapshots: Snapshots,
    live_streams: Arc<Semaphore>,
    stop: CancellationToken,
}

/// Serves the console on `listener` until `shutdown`. `token`: the console
/// token that signs SREs in (`None`: read-only).
pub async fn run(
    config: Config,
    pool: PgPool,
    master: MasterKey,
    token: Option<Zeroizing<String>>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ConsoleError> {
    config.check()?;
    if token.as_ref().is_some_and(|t| t.len() < 16) {
        return Err(ConsoleError::ShortToken);
    }
    let (loader, snapshots) = Loader::new(pool.clone(), Arc::new(master), config.clone());
    let stop = shutdown.child_token();
    let loading = tokio::spawn(loader.run(stop.clone()));
    let app = Arc::new(App {
        auth: Auth::new(token.as_deref().map(String::as_str), config.session_length),
        pool,
        snapshots,
        live_streams: Arc::new(Semaphore::new(config.max_live_streams)),
        stop: stop.clone(),
    });
    if !app.auth.actions_enabled() {
        tracing::info!("console is read-only: GEORELAY_CONSOLE_TOKEN is not set");
    }
    let served = axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    stop.cancel();
    let _ = loading.await;
    served.map_err(ConsoleError::Serve)
}

fn router(app: Arc<App>) -> Router {
    let acting = Router::new()
        .route("/actions/move", post(move_senders))
        .route("/actions/failover", post(failover_bit))
        .route("/actions/namespace", post(namespace_enabled))
        .route("/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_session));
    Router::new()
        .route("/", get(|| async { Redirect::to("/groups") }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/static/live.js", get(script))
        .route("/static/console.css", get(style))
        .route("/login", get(login_page).post(login))
        .route("/live/{page}", get(live))
        .route("/{page}", get(show))
        .merge(acting)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../assets/live.js"),
    )
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../assets/console.css"),
    )
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn session(app: &App, headers: &HeaderMap) -> Option<Session> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| auth::cookie(h, auth::SESSION_COOKIE))
        .and_then(|c| app.auth.session(c))
}

/// The outcome of the last action, carried to the next page in a cookie.
fn flash(headers: &HeaderMap) -> Option<(bool, String)> {
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| auth::cookie(h, FLASH_COOKIE))?;
    let (kind, text) = value.split_at_checked(1)?;
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(text).ok()?).ok()?;
    Some((kind == "e", text))
}

/// Longest an action waits for the snapshot to show its outcome.
const SHOW_OUTCOME_WITHIN: Duration = Duration::from_secs(2);

/// A 303 back to `to`, carrying `text` to show there.
fn done(to: &str, error: bool, text: &str) -> Response {
    let text: String = text.chars().take(1000).collect();
    let cookie = format!(
        "{FLASH_COOKIE}={}{}; Path=/; HttpOnly; SameSite=Strict; Max-Age=60",
        if error { "e" } else { "o" },
        URL_SAFE_NO_PAD.encode(text)
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(to)).into_response()
}

async fn show(
    State(app): State<Arc<App>>,
    Path(slug): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(page) = Page::from_slug(&slug) else {
        return html(StatusCode::NOT_FOUND, pages::refused(404, "no such page"));
    };
    let session = session(&app, &headers);
    let flash = flash(&headers);
    let snapshot = app.snapshots.rx.borrow().clone();
    let chrome = Chrome {
        session: session.as_ref(),
        actions_enabled: app.auth.actions_enabled(),
        flash: flash.clone(),
    };
    let mut response = html(StatusCode::OK, pages::page(page, &snapshot, &chrome));
    if flash.is_some() {
        let clear = format!("{FLASH_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
        if let Ok(v) = HeaderValue::from_str(&clear) {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    response
}

/// The live part of a page as server-sent events: one `page` event now and
/// one each time it changes.
async fn live(State(app): State<Arc<App>>, Path(slug): Path<String>) -> Response {
    let Some(page) = Page::from_slug(&slug) else {
        return html(StatusCode::NOT_FOUND, pages::refused(404, "no such page"));
    };
    let Ok(permit) = app.live_streams.clone().try_acquire_owned() else {
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::refused(503, "too many live pages open: reload later"),
        );
    };
    let rx = app.snapshots.rx.clone();
    let stream = futures_util::stream::unfold(
        (rx, String::new(), true, permit),
        move |(mut rx, last, mut first, permit)| async move {
            loop {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                first = false;
                let snapshot = rx.borrow_and_update().clone();
                let body = pages::live(page, &snapshot);
                if body != last {
                    // SSE cannot carry a carriage return; the pages escape them.
                    let event = Event::default().event("page").data(body.replace('\r', ""));
                    return Some((Ok::<_, Infallible>(event), (rx, body, first, permit)));
                }
            }
        },
    )
    .take_until(app.stop.clone().cancelled_owned());
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn login_page(State(app): State<Arc<App>>) -> Response {
    html(
        StatusCode::OK,
        pages::login(app.auth.actions_enabled(), None),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    token: Zeroizing<String>,
}

async fn login(State(app): State<Arc<App>>, Form(form): Form<LoginForm>) -> Response {
    match app.auth.sign_in(form.user.trim(), &form.token) {
        Ok(cookie) => {
            tracing::info!(user = %form.user.trim(), "console: signed in");
            (
                [(header::SET_COOKIE, app.auth.set_cookie(&cookie))],
                Redirect::to("/groups"),
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(user = %form.user.trim(), error = %e, "console: sign-in refused");
            let status = match e {
                SignInError::Throttled => StatusCode::TOO_MANY_REQUESTS,
                SignInError::BadUser => StatusCode::BAD_REQUEST,
                SignInError::ReadOnly => StatusCode::FORBIDDEN,
                SignInError::WrongToken => StatusCode::UNAUTHORIZED,
            };
            html(
                status,
                pages::login(app.auth.actions_enabled(), Some(&e.to_string())),
            )
        }
    }
}

/// Refuses every request without a session (401) before its body is read.
async fn require_session(
    State(app): State<Arc<App>>,
    mut request: Request,
    next: Next,
) -> Response {
    match session(&app, request.headers()) {
        Some(s) => {
            request.extensions_mut().insert(s);
            next.run(request).await
        }
        None => html(
            StatusCode::UNAUTHORIZED,
            pages::refused(401, "sign in first: actions need a session (/login)"),
        ),
    }
}

fn csrf_refused() -> Response {
    html(
        StatusCode::FORBIDDEN,
        pages::refused(
            403,
            "the form's token does not match your session: reload the page and try again",
        ),
    )
}

#[derive(Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(app): State<Arc<App>>,
    Extension(session): Extension<Session>,
    Form(form): Form<LogoutForm>,
) -> Response {
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    (
        [(header::SET_COOKIE, auth::clear_cookie())],
        Redirect::to("/groups"),
    )
        .into_response()
}

fn actor(session: &Session, reason: Option<String>) -> Actor {
    Actor {
        actor: format!("console:{}", session.user),
        reason,
    }
}

#[derive(Deserialize)]
struct MoveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    reason: String,
}

async fn move_senders(
    State(app): State<Arc<App>>,
    Extension(session): Extension<Session>,
    Form(form): Form<MoveForm>,
) -> Response {
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let reason = form.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return done(
            "/groups",
            true,
            "a move needs a reason (1 to 500 characters): the audit trail keeps it",
        );
    }
    let actor = actor(&session, Some(reason.to_owned()));
    match control::move_senders(&app.pool, &form.group, &form.to, &actor).await {
        Ok(m) if m.moved => {
            app.snapshots.refresh(SHOW_OUTCOME_WITHIN).await;
            tracing::warn!(actor = %actor.actor, group = %form.group, from = %m.from, to = %m.to, epoch = m.epoch, reason,
                "console: senders moved");
            done(
                "/groups",
                false,
                &format!(
                    "group {}: senders moved {} -> {} (epoch {}); the worker drains {} and then follows",
                    form.group, m.from, m.to, m.epoch, m.from
                ),
            )
        }
        Ok(m) => done(
            "/groups",
            false,
            &format!(
                "group {}: senders already on {} (epoch {}); nothing changed",
                form.group, m.to, m.epoch
            ),
        ),
        Err(e) => done("/groups", true, &format!("not moved: {e}")),
    }
}

#[derive(Deserialize)]
struct FailoverForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    failover: String,
}

async fn failover_bit(
    State(app): State<Arc<App>>,
    Extension(session): Extension<Session>,
    Form(form): Form<FailoverForm>,
) -> Response {
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let Some(on) = on_off(&form.failover) else {
        return done("/groups", true, "automatic failover is on or off");
    };
    let actor = actor(&session, None);
    match control::set_failover_enabled(&app.pool, &form.group, on, &actor).await {
        Ok(changed) => {
            app.snapshots.refresh(SHOW_OUTCOME_WITHIN).await;
            tracing::warn!(actor = %actor.actor, group = %form.group, on, changed,
                "console: automatic failover set");
            let state = if on { "on" } else { "OFF" };
            let text = if changed {
                format!("group {}: automatic failover {state}", form.group)
            } else {
                format!(
                    "group {}: automatic failover was already {state}",
                    form.group
                )
            };
            done("/groups", false, &text)
        }
        Err(e) => done("/groups", true, &format!("not changed: {e}")),
    }
}

#[derive(Deserialize)]
struct NamespaceForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    enabled: String,
}

async fn namespace_enabled(
    State(app): State<Arc<App>>,
    Extension(session): Extension<Session>,
    Form(form): Form<NamespaceForm>,
) -> Response {
    if !app.auth.csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let Some(on) = on_off(&form.enabled) else {
        return done(
            "/namespaces",
            true,
            "a namespace is enabled (on) or disabled (off)",
        );
    };
    match control::set_namespace_enabled(&app.pool, &form.namespace, on).await {
        Ok(changed) => {
            app.snapshots.refresh(SHOW_OUTCOME_WITHIN).await;
            tracing::warn!(actor = %actor(&session, None).actor, namespace = %form.namespace, on, changed,
                "console: namespace rotation set");
            let state = if on {
                "enabled"
            } else {
                "disabled: out of rotation"
            };
            let text = if changed {
                format!("namespace {} {state}", form.namespace)
            } else {
                format!(
                    "namespace {} was already {}",
                    form.namespace,
                    if on { "enabled" } else { "disabled" }
                )
            };
            done("/namespaces", false, &text)
        }
        Err(e) => done("/namespaces", true, &format!("not changed: {e}")),
    }
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}
