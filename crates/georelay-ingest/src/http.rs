//! The HTTP API of docs/DESIGN.md: handlers, limits and load shedding.
//!
//! A record is checked in this order, cheapest first, and **nothing of the
//! body is read before the device is known**: content type (415), declared
//! size (413), device exists and is enabled (401), room for the body in the
//! bytes-in-flight budget and the device's share of it (503 `overloaded`),
//! body size and arrival time (413, 408), JSON shape and record fields (400),
//! tag (401), plaintext a JSON object (400), then a slot among the requests
//! being verified and published (503 `overloaded`). Only then is it
//! published. So a client that trickles its body holds only bytes of the
//! budget (bounded, and only with a registered device's id), never a slot
//! the fast requests need; and an unknown id costs a cached look-up, not a
//! buffered body. The publish runs in a task of its own, so a request that
//! hits its deadline answers 503 while the publish still finishes (or times
//! out) under its own deadline, keeping the in-flight count that fencing
//! relies on honest.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use georelay_core::{DeviceId, RecordBody, SealedRecord};
use georelay_store::routing::DeviceAuth;
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio_util::task::TaskTracker;

use crate::error::{ApiError, ErrorCode};
use crate::metrics::{CountRequests, Metrics};
use crate::senders::{Placement, Senders};
use crate::Config;
use georelay_store::keys::Devices;

/// Shared by every handler; cloned (one `Arc`) per extraction.
pub type AppState = Arc<App>;

#[derive(Debug)]
pub struct App {
    pub config: Arc<Config>,
    /// The control plane and `telemetry` (progress answers).
    pub pool: georelay_store::PgPool,
    pub senders: Arc<Senders>,
    pub devices: Arc<Devices>,
    pub metrics: Metrics,
    /// Requests being verified and published at once.
    pub permits: Semaphore,
    /// The bytes-in-flight budget for request bodies, in KiB.
    pub body_kib: Arc<Semaphore>,
    /// Bodies being read or held per device.
    pub bodies_per_device: Arc<Mutex<HashMap<DeviceId, usize>>>,
    pub tasks: TaskTracker,
    /// False once shutdown began: `/readyz` says so and load balancers stop
    /// sending.
    pub accepting: Arc<AtomicBool>,
}

/// The devices' API with health and readiness; `/metrics` too unless it
/// is served on a listener of its own ([`metrics_app`]).
pub fn app(state: AppState, with_metrics: bool) -> axum::Router {
    let api = axum::Router::new()
        .route("/v1/devices/{device_id}/telemetry", post(post_one))
        .route("/v1/devices/{device_id}/telemetry/batch", post(post_batch))
        .route("/v1/devices/{device_id}/progress", get(get_progress));
    let mut app = axum::Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if with_metrics {
        app = app.route("/metrics", get(metrics));
    }
    app.fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(CountRequests(state.metrics.requests.clone()))
        .with_state(state)
}

/// `/metrics` alone, for `--metrics-listen`.
pub fn metrics_app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound })
        .with_state(state)
}

/// Most bodies one device may have in flight at once: a client that knows a
/// device id (ids are not secret) can take only this share of the budget.
pub const BODIES_PER_DEVICE: usize = 4;

fn overloaded(what: &str) -> ApiError {
    ApiError::unavailable(
        ErrorCode::Overloaded,
        format!("{what}; retry shortly"),
        Duration::from_secs(1),
    )
}

/// At most `max_concurrent_requests` records requests are verified and
/// published at once; the rest are refused at once (503, Retry-After)
/// instead of queuing without bound. Taken only once the body is in.
fn working_slot(state: &App) -> Result<SemaphorePermit<'_>, ApiError> {
    state
        .permits
        .try_acquire()
        .map_err(|_| overloaded("too many requests in progress"))
}

/// What a records request holds from admission until it is answered: its
/// bytes of the budget and its device's share.
struct Admitted {
    auth: Arc<DeviceAuth>,
    _bytes: OwnedSemaphorePermit,
    _share: DeviceShare,
}

/// One of a device's [`BODIES_PER_DEVICE`]; given back on drop.
struct DeviceShare {
    device: DeviceId,
    held: Arc<Mutex<HashMap<DeviceId, usize>>>,
}

impl Drop for DeviceShare {
    fn drop(&mut self) {
        let mut held = self.held.lock();
        if let Some(n) = held.get_mut(&self.device) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.device);
            }
        }
    }
}

/// Checks the content type, the declared size and the device, reserves the
/// body's bytes (the declared length, else the limit), then reads the body
/// within the size limit and the body read time.
async fn admit_and_read(
    state: &AppState,
    device: &DeviceId,
    request: Request,
    limit: usize,
) -> Result<(Vec<u8>, Admitted), ApiError> {
    // The request's own headers: a `HeaderMap` extractor would copy them.
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    let auth = device_auth(state, device).await?;
    let share = {
        let mut held = state.bodies_per_device.lock();
        let n = held.entry(device.clone()).or_insert(0);
        if *n >= BODIES_PER_DEVICE {
            return Err(overloaded("this device has too many requests in progress"));
        }
        *n += 1;
        DeviceShare {
            device: device.clone(),
            held: state.bodies_per_device.clone(),
        }
    };
    let reserve = declared.map_or(limit, |n| n as usize);
    let kib = u32::try_from(reserve.div_ceil(1024)).unwrap_or(u32::MAX);
    let bytes = state
        .body_kib
        .clone()
        .try_acquire_many_owned(kib)
        .map_err(|_| overloaded("too many request bytes in flight"))?;
    let timeout = state.config.body_read_timeout;
    let body = tokio::time::timeout(timeout, read_body(body, reserve, limit))
        .await
        .map_err(|_| ApiError::BodyTimeout(timeout))??;
    Ok((
        body,
        Admitted {
            auth,
            _bytes: bytes,
            _share: share,
        },
    ))
}

#[derive(Debug, serde::Serialize)]
struct Accepted {
    device_id: String,
    seq: u64,
    #[serde(flatten)]
    placement: Placement,
}

#[derive(Debug, serde::Serialize)]
struct BatchAccepted {
    device_id: String,
    count: usize,
    first_seq: u64,
    last_seq: u64,
    #[serde(flatten)]
    placement: Placement,
}

#[derive(Debug, Deserialize)]
struct BatchBody {
    records: Vec<RecordBody>,
}

async fn post_one(
    State(state): State<AppState>,
    device_id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let device = parse_device(device_id)?;
    let (bytes, admitted) = admit_and_read(&state, &device, request, state.config.max_body).await?;
    let record: RecordBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            ErrorCode::MalformedJson,
            format!("body is not a record: {e}"),
        )
    })?;
    let sealed = SealedRecord::from_body(&record).map_err(|e| ApiError::from_record(e, None))?;
    let group_id = verify(
        &admitted.auth,
        &device,
        std::slice::from_ref(&sealed),
        false,
    )?;
    let _slot = working_slot(&state)?;
    let seq = sealed.seq;
    let placement = publish(&state, group_id, device.clone(), vec![sealed]).await?;
    state.metrics.records_accepted.inc();
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            device_id: device.to_string(),
            seq,
            placement,
        }),
    ))
}

async fn post_batch(
    State(state): State<AppState>,
    device_id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<(StatusCode, Json<BatchAccepted>), ApiError> {
    let device = parse_device(device_id)?;
    let (bytes, admitted) =
        admit_and_read(&state, &device, request, state.config.max_batch_body).await?;
    let batch: BatchBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            ErrorCode::MalformedJson,
            format!("body is not {{\"records\": [...]}}: {e}"),
        )
    })?;
    // Parsed: only the records are held from here on (within the bytes
    // the body reserved).
    drop(bytes);
    let max = state.config.max_batch;
    if batch.records.is_empty() || batch.records.len() > max {
        return Err(ApiError::bad_request(
            ErrorCode::BadBatchSize,
            format!(
                "a batch holds 1 to {max} records, got {}",
                batch.records.len()
            ),
        ));
    }
    let mut sealed = batch
        .records
        .iter()
        .enumerate()
        .map(|(i, r)| SealedRecord::from_body(r).map_err(|e| ApiError::from_record(e, Some(i))))
        .collect::<Result<Vec<_>, _>>()?;
    drop(batch);
    // Queue order is seq order, whatever order they came in.
    sealed.sort_by_key(|r| r.seq);
    if let Some(w) = sealed.windows(2).find(|w| w[0].seq == w[1].seq) {
        return Err(ApiError::bad_request(
            ErrorCode::DuplicateSeq,
            format!("seq {} appears twice in the batch", w[0].seq),
        ));
    }
    let group_id = verify(&admitted.auth, &device, &sealed, true)?;
    let _slot = working_slot(&state)?;
    let (count, first_seq, last_seq) = (
        sealed.len(),
        sealed.first().map_or(0, |r| r.seq),
        sealed.last().map_or(0, |r| r.seq),
    );
    let placement = publish(&state, group_id, device.clone(), sealed).await?;
    state.metrics.records_accepted.inc_by(count as u64);
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchAccepted {
            device_id: device.to_string(),
            count,
            first_seq,
            last_seq,
            placement,
        }),
    ))
}

/// The device id from the path; one that does not percent-decode to UTF-8
/// gets the same JSON error as any other bad id.
/// Which of the device's records are stored: `{"device_id", "after",
/// "stored": [[first, last], ...], "complete", "abandoned": [epoch, ...]}`
/// for the seqs above `after` (`?after=N`, default 0), over at most 10,000
/// seqs (`complete` false: ask again after the last); `abandoned`: the
/// epochs of its group given up (a region lost for good): what the device
/// got a 202 for in one of them and is not stored, it sends again. Authenticated with an HMAC under the device key
/// (header `x-georelay-progress-auth`, `georelay_core::progress`); any
/// failure is the one 401 of the records routes. Reads only `telemetry`'s
/// primary key.
async fn get_progress(
    State(state): State<AppState>,
    device_id: Result<Path<String>, PathRejection>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let device = parse_device(device_id)?;
    let mut after = 0u64;
    for pair in uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("after", v)) => {
                after = v
                    .parse()
                    .ok()
                    .filter(|a| *a <= georelay_core::MAX_SEQ)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            ErrorCode::InvalidQuery,
                            format!("after must be a seq from 0 to {}", georelay_core::MAX_SEQ),
                        )
                    })?;
            }
            _ => {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidQuery,
                    format!("unknown query parameter {pair:?} (only after=N)"),
                ))
            }
        }
    }
    let presented = headers
        .get(georelay_core::progress::HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::Unauthorized)?;
    let auth = device_auth(&state, &device).await?;
    let now_ms = unix_now_ms();
    if !georelay_core::progress::verify(&auth.key, &device, after, presented, now_ms) {
        return Err(ApiError::Unauthorized);
    }
    let _slot = working_slot(&state)?;
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let read = async {
        tokio::try_join!(
            georelay_store::progress::stored_ranges(&state.pool, device.as_str(), after),
            georelay_store::progress::abandoned_epochs(&state.pool, device.as_str())
        )
    };
    let ((ranges, complete), abandoned) =
        match tokio::time::timeout(state.config.request_deadline, read).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read a device's progress");
                return Err(ApiError::unavailable(
                    ErrorCode::ControlPlaneUnavailable,
                    "progress cannot be read now; retry",
                    Duration::from_secs(1),
                ));
            }
            Err(_) => {
                return Err(ApiError::unavailable(
                    ErrorCode::Deadline,
                    "progress was not read within the request deadline; retry",
                    Duration::from_secs(1),
                ))
            }
        };
    Ok(Json(serde_json::json!({
        "device_id": device.as_str(),
        "after": after,
        "stored": ranges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
        "complete": complete,
        "abandoned": abandoned,
    })))
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn parse_device(id: Result<Path<String>, PathRejection>) -> Result<DeviceId, ApiError> {
    let Path(id) = id.map_err(|_| {
        ApiError::bad_request(
            ErrorCode::InvalidDeviceId,
            "the device id in the path is not valid UTF-8",
        )
    })?;
    DeviceId::parse(&id)
        .map_err(|e| ApiError::bad_request(ErrorCode::InvalidDeviceId, e.to_string()))
}

/// Reads a body of at most `limit` bytes into one buffer of `reserve`
/// bytes, allocated once: what it holds is what the budget counts (a
/// growing buffer would hold up to twice that, and a collect-then-copy
/// twice again; untouched pages of the allocation are not resident).
async fn read_body(mut body: Body, reserve: usize, limit: usize) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt as _;
    let mut out = Vec::with_capacity(reserve);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| {
            ApiError::bad_request(
                ErrorCode::BodyUnreadable,
                "the request body could not be read",
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if out.len() + data.len() > limit {
            return Err(ApiError::TooLarge { limit });
        }
        out.extend_from_slice(&data);
    }
    Ok(out)
}

/// The device, if it exists and is enabled (401 otherwise: unknown and
/// disabled look the same), looked up before any of the body is read.
pub(crate) async fn device_auth(
    state: &App,
    device: &DeviceId,
) -> Result<Arc<DeviceAuth>, ApiError> {
    let unavailable = || {
        ApiError::unavailable(
            ErrorCode::ControlPlaneUnavailable,
            "device keys cannot be read now; retry",
            Duration::from_secs(1),
        )
    };
    // A database that hangs (rather than refuses) must not hang requests.
    let lookup = tokio::time::timeout(
        state.config.request_deadline,
        state.devices.get(device.as_str()),
    );
    match lookup.await {
        Err(_) => {
            tracing::warn!("reading device keys timed out");
            Err(unavailable())
        }
        // That one row is bad, not the database: refuse that device only.
        Ok(Err(georelay_store::StoreError::Secret(e))) => {
            tracing::error!(device = %device, error = %e,
                "the device's sealed key does not open (its row was edited by hand, copied, or restored from another installation): refused with 401; register it again with a new key");
            Err(ApiError::Unauthorized)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read device keys");
            Err(unavailable())
        }
        Ok(Ok(found)) => found.filter(|a| a.enabled).ok_or(ApiError::Unauthorized),
    }
}

/// Every record authenticates under the device's key and holds a JSON
/// object. Returns the device's group.
fn verify(
    auth: &DeviceAuth,
    device: &DeviceId,
    records: &[SealedRecord],
    batch: bool,
) -> Result<i64, ApiError> {
    for (i, r) in records.iter().enumerate() {
        r.open_object(&auth.key, device)
            .map_err(|e| ApiError::from_record(e, batch.then_some(i)))?;
    }
    Ok(auth.group_id)
}

/// Runs the publish in a tracked task and waits for it up to the request
/// deadline.
pub(crate) async fn publish(
    state: &App,
    group_id: i64,
    device: DeviceId,
    records: Vec<SealedRecord>,
) -> Result<Placement, ApiError> {
    let senders = state.senders.clone();
    let task = state
        .tasks
        .spawn(async move { senders.deliver(group_id, &device, &records).await });
    let deadline = state.config.request_deadline;
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(result)) => result.map_err(ApiError::from),
        Ok(Err(join)) => {
            tracing::error!(error = %join, "publish task failed");
            Err(ApiError::unavailable(
                ErrorCode::Internal,
                "the record was not queued; retry",
                Duration::from_secs(1),
            ))
        }
        Err(_) => Err(ApiError::unavailable(
            ErrorCode::Deadline,
            "the record was not queued within the request deadline; retry",
            Duration::from_secs(1),
        )),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Ready when accepting, the lease is valid (the database answered a
/// heartbeat lately) and some region is writable.
async fn readyz(State(state): State<AppState>) -> Response {
    let (ready, accepting, lease, region) = readiness(&state);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ready": ready,
        "checks": {"accepting": accepting, "lease_valid": lease, "region_writable": region},
    });
    (status, Json(body)).into_response()
}

/// `(ready, accepting, lease valid, some region writable)`.
fn readiness(state: &AppState) -> (bool, bool, bool, bool) {
    let accepting = state.accepting.load(Ordering::Relaxed);
    let lease = state.senders.lease.is_valid();
    let region = state.senders.some_region_writable();
    (accepting && lease && region, accepting, lease, region)
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.ready.set(i64::from(readiness(&state).0));
    let budget = state.config.max_bytes_in_flight / 1024;
    let reserved = budget.saturating_sub(state.body_kib.available_permits());
    state
        .metrics
        .body_bytes_in_flight
        .set(i64::try_from(reserved * 1024).unwrap_or(i64::MAX));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
