//! The hub's HTTPS API: `POST /v1/ingest` for gateways (their bearer tokens), the tlog-tiles
//! read path for auditors (`/logs/…`, public), and `GET` reads for operators (`/v1/gateways…`,
//! `/v1/stats`, `/metrics`), which answer only the operator key (`hub.operator_key_sha256`;
//! anything else, a gateway's token included, is 401). Routes parse, call [`Hub`], and map
//! [`Refusal`]s to status codes here and nowhere else.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{tiles, Fault, Hub, HubError, HubStore, Refusal, Stored};
use crate::clock;
use crate::ledger::{hex, Row};
use crate::sync::{Batch, OneChunk, CONTENT_TYPE, INGEST_PATH, MAX_BODY_BYTES};

type Response = http::Response<OneChunk>;

/// Seconds a gateway is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "2";

fn json_response(status: u16, value: &Value) -> Response {
    let mut res = http::Response::new(OneChunk(Some(Bytes::from(value.to_string()))));
    *res.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}

fn unavailable(why: &str) -> Response {
    let mut res = json_response(503, &json!({"error": "unavailable", "message": why}));
    res.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    res
}

fn refusal_response(r: Refusal) -> Response {
    match r {
        Refusal::Unauthorized(why) => {
            json_response(401, &json!({"error": "unauthorized", "message": why}))
        }
        Refusal::BadRequest(why) => {
            json_response(400, &json!({"error": "bad_request", "message": why}))
        }
        Refusal::Conflict(e) => json_response(
            409,
            &json!({
                "error": e.kind,
                "at": e.at,
                "message": e.message,
                "stored_seq": e.stored_size.checked_sub(1),
            }),
        ),
        Refusal::Unavailable(why) => unavailable(&why),
    }
}

/// Reads a body of at most `limit` bytes.
pub async fn read_limited(mut body: Incoming, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(format!("body is larger than {limit} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// A request's query parameters (`a=1&b=x`; the values the routes take need no decoding).
struct Query(HashMap<String, String>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='));
        Query(pairs.map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
    }

    fn num(&self, key: &str, default: u64) -> u64 {
        self.0
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn text(&self, key: &str) -> &str {
        self.0.get(key).map_or("", String::as_str)
    }

    /// `limit`: [`PAGE`] by default, at most [`MAX_PAGE`].
    fn limit(&self) -> usize {
        self.num("limit", PAGE as u64).clamp(1, MAX_PAGE as u64) as usize
    }
}

/// Items per page of a list, by default and at most.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn bearer(req: &http::Request<Incoming>) -> Option<String> {
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(s, _)| s.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned())
}

async fn handle<S: HubStore>(hub: Arc<Hub<S>>, req: http::Request<Incoming>) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method().as_str(), parts.as_slice()) {
        ("POST", _) if path == INGEST_PATH => ingest_route(hub, req).await,
        ("GET", ["logs", gw, machine, rest @ ..]) => log_route(&hub, gw, machine, rest).await,
        ("GET", ["healthz"]) => json_response(200, &json!({"ok": true})),
        ("GET", ["v1", ..] | ["metrics"]) => {
            if !hub.is_operator(bearer(&req).as_deref()) {
                return operator_refused(hub.operator_key_sha256.is_some());
            }
            operator_route(&hub, &parts, &Query::parse(req.uri().query())).await
        }
        _ => not_found("no such route"),
    }
}

/// 401 for anything but the operator key: no key, a wrong one, a gateway's sync token.
fn operator_refused(configured: bool) -> Response {
    let message = if configured {
        "send the operator key as Authorization: Bearer <key>"
    } else {
        "the operator API is off: set hub.operator_key_sha256 (see `smgate hub operator-key`)"
    };
    let mut res = json_response(401, &json!({"error": "unauthorized", "message": message}));
    res.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"smgate-hub operator\""),
    );
    res
}

/// The operator's reads (the caller checked the key).
async fn operator_route<S: HubStore>(hub: &Hub<S>, parts: &[&str], q: &Query) -> Response {
    let answer = match parts {
        ["v1", "gateways"] => gateways_route(hub, q).await,
        ["v1", "gateways", gw] => gateway_route(hub, gw).await,
        ["v1", "gateways", gw, "machines"] => machines_route(hub, gw, q).await,
        ["v1", "gateways", gw, "machines", m] => match hub.store.log(gw, m).await {
            Ok(Some(log)) => Ok(json_response(200, &machine_json(&log, clock::now_ms()))),
            Ok(None) => Ok(not_found("no such log")),
            Err(e) => Err(e),
        },
        ["v1", "gateways", gw, "machines", m, "rows"] => rows_route(hub, gw, m, q).await,
        ["v1", "gateways", gw, "conflicts"] => conflicts_route(hub, gw, q).await,
        ["v1", "stats"] => Ok(stats_route(&hub.stats)),
        ["metrics"] => {
            let text = super::metrics::render(&hub.stats, hub.store.pool_state());
            Ok(bytes_response(
                "text/plain; version=0.0.4; charset=utf-8",
                "no-store",
                text.into_bytes(),
            ))
        }
        _ => Ok(not_found("no such route")),
    };
    answer.unwrap_or_else(|e| unavailable(&e.0))
}

fn stats_route(s: &super::Stats) -> Response {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    json_response(
        200,
        &json!({
            "requests": l(&s.requests),
            "body_bytes": l(&s.body_bytes),
            "rows_received": l(&s.rows_received),
            "rows_stored": l(&s.rows_stored),
            "stored_row_bytes": l(&s.stored_row_bytes),
            "conflicts": l(&s.conflicts),
            "unauthorized": l(&s.unauthorized),
            "lost_races": l(&s.lost_races),
            "unavailable": l(&s.unavailable),
        }),
    )
}

async fn rows_route<S: HubStore>(
    hub: &Hub<S>,
    gw: &str,
    m: &str,
    q: &Query,
) -> Result<Response, Fault> {
    let from = q.num("from", 0);
    let to = q.num("to", from + 1000).min(from + 10_000);
    let rows = hub.store.rows(gw, m, from, to).await?;
    let list: Vec<Value> = rows
        .iter()
        .filter_map(|b| Row::decode_stored(b).ok())
        .map(|r| json!({"seq": r.seq, "type": r.kind, "hash": hex::encode(&r.hash), "prev_hash": hex::encode(&r.prev_hash)}))
        .collect();
    Ok(json_response(200, &json!({"rows": list})))
}

fn not_found(what: &str) -> Response {
    json_response(404, &json!({"error": "not_found", "message": what}))
}

fn bytes_response(content_type: &'static str, cache: &'static str, body: Vec<u8>) -> Response {
    let mut res = http::Response::new(OneChunk(Some(Bytes::from(body))));
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static(cache),
    );
    res
}

/// The tlog-tiles read path of one log (`tiles.rs`).
async fn log_route<S: HubStore>(hub: &Hub<S>, gw: &str, machine: &str, rest: &[&str]) -> Response {
    let log = match hub.store.log(gw, machine).await {
        Ok(Some(log)) => log,
        Ok(None) => return not_found("no such log"),
        Err(e) => return unavailable(&e.0),
    };
    let request = match rest {
        ["checkpoint"] => {
            // The gateway's note with the hub's cosignature: the stored checkpoint was
            // verified when stored and is the largest tree the hub holds of this log.
            let mut note = log.checkpoint;
            if let Some(split) = note.rfind("\n\n") {
                let line = hub
                    .cosigner
                    .cosign(&note[..=split], clock::now_ms() as u64 / 1000);
                note.push_str(&line);
            }
            return bytes_response("text/plain; charset=utf-8", "no-cache", note.into_bytes());
        }
        ["tile", tile @ ..] => match tiles::parse(tile) {
            Some(t) if t.within(log.size) => t,
            _ => return not_found("no such tile in this log's tree"),
        },
        _ => return not_found("no such route"),
    };
    let cache = if request.is_full() {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=60"
    };
    let body = match request.level {
        Some(level) => {
            let width = request.width;
            match hub
                .store
                .tile(gw, machine, level, request.index, width)
                .await
            {
                Ok(Some(hashes)) => hashes,
                Ok(None) => return not_found("tile not stored"),
                Err(e) => return unavailable(&e.0),
            }
        }
        None => {
            let from = request.index * 256;
            match hub
                .store
                .rows(gw, machine, from, from + request.width as u64)
                .await
            {
                Ok(rows) if rows.len() == request.width => {
                    let hashes: Vec<[u8; 32]> = rows
                        .iter()
                        .filter_map(|r| r.get(r.len().saturating_sub(32)..)?.try_into().ok())
                        .collect();
                    tiles::entry_bundle(&hashes)
                }
                Ok(_) => return not_found("entries not stored"),
                Err(e) => return unavailable(&e.0),
            }
        }
    };
    bytes_response("application/octet-stream", cache, body)
}

/// `?after=<gateway id>&limit=N`: enrolled gateways by id; `next` is the `after` of the
/// next page (null on the last).
async fn gateways_route<S: HubStore>(hub: &Hub<S>, q: &Query) -> Result<Response, Fault> {
    let limit = q.limit();
    let page = hub.store.enrollments(q.text("after"), limit).await?;
    let next = (page.len() == limit).then(|| page.last().map(|e| e.gateway_id.clone()));
    let list: Vec<Value> = page.iter().map(enrollment_json).collect();
    Ok(json_response(
        200,
        &json!({"gateways": list, "next": next.flatten()}),
    ))
}

fn enrollment_json(e: &super::Enrollment) -> Value {
    json!({
        "gateway_id": e.gateway_id,
        "verifier_key": e.verifier_key,
        "enrolled_at": clock::rfc3339(e.enrolled_ms),
    })
}

/// One gateway: its enrolment and a summary of its logs (every page of them).
async fn gateway_route<S: HubStore>(hub: &Hub<S>, gw: &str) -> Result<Response, Fault> {
    let Some(e) = hub.store.enrollment(gw).await? else {
        return Ok(not_found("no such gateway"));
    };
    let (mut machines, mut rows, mut lag_rows, mut last_ingest) = (0u64, 0u64, 0u64, 0i64);
    let mut after = String::new();
    loop {
        let page = hub.store.machines(gw, &after, MAX_PAGE).await?;
        for m in &page {
            machines += 1;
            rows += m.size;
            lag_rows += m.head_size.saturating_sub(m.size);
            last_ingest = last_ingest.max(m.last_ingest_ms);
        }
        match page.last() {
            Some(m) if page.len() == MAX_PAGE => after = m.slug.clone(),
            _ => break,
        }
    }
    let mut out = enrollment_json(&e);
    out["machines"] = json!(machines);
    out["rows"] = json!(rows);
    out["lag_rows"] = json!(lag_rows);
    out["last_ingest"] = json!((last_ingest > 0).then(|| clock::rfc3339(last_ingest)));
    Ok(json_response(200, &out))
}

/// `?after=<machine>&limit=N`: a gateway's logs by machine, with lag and last checkpoint.
async fn machines_route<S: HubStore>(hub: &Hub<S>, gw: &str, q: &Query) -> Result<Response, Fault> {
    let limit = q.limit();
    let page = hub.store.machines(gw, q.text("after"), limit).await?;
    let now = clock::now_ms();
    let next = (page.len() == limit).then(|| page.last().map(|m| m.slug.clone()));
    let list: Vec<Value> = page.iter().map(|m| machine_json(m, now)).collect();
    Ok(json_response(
        200,
        &json!({"gateway_id": gw, "machines": list, "next": next.flatten()}),
    ))
}

/// `?offset=N&limit=M`: a gateway's conflicts with their signed evidence: the batch's
/// checkpoint note (signed by the gateway) and offending row beside the hub's checkpoint and
/// row at that seq; rows in standard base64.
async fn conflicts_route<S: HubStore>(
    hub: &Hub<S>,
    gw: &str,
    q: &Query,
) -> Result<Response, Fault> {
    let (offset, limit) = (q.num("offset", 0), q.limit());
    let page = hub.store.conflicts(gw, offset, limit).await?;
    let b64 = |v: &Option<Vec<u8>>| v.as_ref().map(|b| crate::ledger::base64::encode(b));
    let list: Vec<Value> = page
        .iter()
        .map(|c| {
            json!({
                "machine": c.machine,
                "at": c.evidence.at,
                "kind": c.evidence.kind,
                "digest": hex::encode(&c.digest),
                "message": c.evidence.message,
                "stored_size": c.evidence.stored_size,
                "checkpoint": c.evidence.checkpoint,
                "row": b64(&c.evidence.row),
                "stored_row": b64(&c.evidence.stored_row),
                "stored_checkpoint": c.evidence.stored_checkpoint,
                "first": clock::rfc3339(c.first_ms),
                "last": clock::rfc3339(c.last_ms),
                "times": c.times,
            })
        })
        .collect();
    let next = (page.len() == limit).then_some(offset + limit as u64);
    Ok(json_response(
        200,
        &json!({"gateway_id": gw, "conflicts": list, "next_offset": next}),
    ))
}

/// A log's state for operators. Lag is told two ways: `lag_rows`, the rows the gateway said
/// it had when it built its last batch minus the rows stored (what is still on its way), and
/// `last_ingest_age_ms`, the time since the hub last stored a batch of this log; `lag_ms` is
/// the age of the last stored row by the gateway's clock.
fn machine_json(m: &Stored, now: i64) -> Value {
    json!({
        "slug": m.slug,
        "stored_seq": m.size.checked_sub(1),
        "stored_size": m.size,
        "checkpoint": m.checkpoint,
        "checkpoint_size": m.checkpoint_size,
        "root": hex::encode(&m.root),
        "gateway_head_size": m.head_size,
        "lag_rows": m.head_size.saturating_sub(m.size),
        "lag_ms": if m.last_row_ts_ms > 0 { (now - m.last_row_ts_ms).max(0) } else { 0 },
        "last_ingest": clock::rfc3339(m.last_ingest_ms),
        "last_ingest_age_ms": (now - m.last_ingest_ms).max(0),
    })
}

async fn ingest_route<S: HubStore>(hub: Arc<Hub<S>>, req: http::Request<Incoming>) -> Response {
    hub.stats.requests.fetch_add(1, Ordering::Relaxed);
    let ct = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.split(';').next().map(str::trim) != Some(CONTENT_TYPE) {
        return json_response(
            415,
            &json!({"error": "unsupported_media_type", "message": format!("send Content-Type: {CONTENT_TYPE}")}),
        );
    }
    let bearer = bearer(&req);
    let bytes = match read_limited(req.into_body(), MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => return json_response(413, &json!({"error": "payload_too_large", "message": e})),
    };
    hub.stats
        .body_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    let batch: Batch = match postcard::from_bytes(&bytes) {
        Ok(b) => b,
        Err(e) => {
            hub.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return refusal_response(Refusal::BadRequest(format!("body is not a v1 batch: {e}")));
        }
    };
    hub.stats
        .rows_received
        .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
    match hub.ingest(bearer.as_deref(), &batch).await {
        Ok(ack) => {
            hub.stats.accepted.fetch_add(1, Ordering::Relaxed);
            json_response(200, &json!(ack))
        }
        Err(r) => {
            match &r {
                Refusal::Conflict(e) => {
                    hub.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(kind = %e.kind, at = e.at, message = %e.message, "ingest refused");
                }
                Refusal::Unauthorized(why) => {
                    hub.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(why, "ingest unauthorized");
                }
                Refusal::Unavailable(why) => {
                    hub.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(why, "ingest unavailable");
                }
                Refusal::BadRequest(_) => {
                    hub.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                }
            }
            refusal_response(r)
        }
    }
}

/// Base64 SHA-256 of the SubjectPublicKeyInfo of the first certificate in a PEM file: the
/// value of `upstream.pin_sha256` for a gateway that pins this hub's key.
pub fn cert_pin(pem: &Path) -> Result<String, HubError> {
    use rustls::pki_types::pem::PemObject;
    let cert = rustls::pki_types::CertificateDer::from_pem_file(pem)
        .map_err(|e| HubError::Invalid(format!("{}: {e}", pem.display())))?;
    crate::sync::client::spki_pin(&cert)
        .map_err(|e| HubError::Invalid(format!("{}: {e}", pem.display())))
}

/// Serves the hub on `listener` until `shutdown` changes.
pub async fn serve<S: HubStore>(
    hub: Arc<Hub<S>>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), HubError> {
    let acceptor = crate::tls::Acceptor::load(&hub.cert_path(), &hub.dir.join("tls/key.pem"))?;
    loop {
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let tls = acceptor.get();
        let hub = hub.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(tcp)).await
            else {
                tracing::debug!(%peer, "TLS handshake failed");
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let hub = hub.clone();
                async move { Ok::<_, Infallible>(handle(hub, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(%peer, error = %e, "hub connection ended with an error");
            }
        });
    }
}
