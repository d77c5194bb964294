//! The hub's HTTPS API: `POST /v1/ingest` for gateways, `GET` reads for operators. Routes
//! parse, call [`Hub`], and map [`Refusal`]s to status codes here and nowhere else.

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

use super::{tiles, Hub, HubError, HubStore, Refusal, Stored};
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

async fn handle<S: HubStore>(hub: Arc<Hub<S>>, req: http::Request<Incoming>) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method().as_str(), parts.as_slice()) {
        ("POST", _) if path == INGEST_PATH => ingest_route(hub, req).await,
        ("GET", ["v1", "gateways"]) => gateways_route(&hub).await,
        ("GET", ["v1", "gateways", id, "machines"]) => match hub.store.machines(id).await {
            Ok(ms) => {
                let now = clock::now_ms();
                let list: Vec<Value> = ms.iter().map(|m| machine_json(m, now)).collect();
                json_response(200, &json!({"gateway_id": id, "machines": list}))
            }
            Err(e) => unavailable(&e.0),
        },
        ("GET", ["v1", "gateways", id, "machines", slug, "rows"]) => {
            let num = |k: &str, d: u64| {
                query
                    .get(k)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(d)
            };
            let from = num("from", 0);
            let to = num("to", from + 1000).min(from + 10_000);
            match hub.store.rows(id, slug, from, to).await {
                Ok(rows) => {
                    let list: Vec<Value> = rows
                        .iter()
                        .filter_map(|b| Row::decode_stored(b).ok())
                        .map(|r| json!({"seq": r.seq, "type": r.kind, "hash": hex::encode(&r.hash), "prev_hash": hex::encode(&r.prev_hash)}))
                        .collect();
                    json_response(200, &json!({"rows": list}))
                }
                Err(e) => unavailable(&e.0),
            }
        }
        ("GET", ["logs", gw, machine, rest @ ..]) => log_route(&hub, gw, machine, rest).await,
        ("GET", ["v1", "stats"]) => {
            let s = &hub.stats;
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
        ("GET", ["healthz"]) => json_response(200, &json!({"ok": true})),
        _ => json_response(
            404,
            &json!({"error": "not_found", "message": "no such route"}),
        ),
    }
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

async fn gateways_route<S: HubStore>(hub: &Hub<S>) -> Response {
    let enrolled = match hub.store.enrollments().await {
        Ok(e) => e,
        Err(e) => return unavailable(&e.0),
    };
    let mut list = Vec::with_capacity(enrolled.len());
    for e in enrolled {
        let machines = hub.store.machines(&e.gateway_id).await.unwrap_or_default();
        list.push(json!({
            "gateway_id": e.gateway_id,
            "verifier_key": e.verifier_key,
            "enrolled_at": clock::rfc3339(e.enrolled_ms),
            "machines": machines.len(),
            "rows": machines.iter().map(|m| m.size).sum::<u64>(),
        }));
    }
    json_response(200, &json!({"gateways": list}))
}

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
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(s, _)| s.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
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
            return refusal_response(Refusal::BadRequest(format!("body is not a v1 batch: {e}")))
        }
    };
    hub.stats
        .rows_received
        .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
    match hub.ingest(bearer.as_deref(), &batch).await {
        Ok(ack) => json_response(200, &json!(ack)),
        Err(r) => {
            match &r {
                Refusal::Conflict(e) => {
                    hub.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(kind = e.kind, at = e.at, message = %e.message, "ingest refused");
                }
                Refusal::Unauthorized(why) => {
                    hub.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(why, "ingest unauthorized");
                }
                Refusal::Unavailable(why) => {
                    hub.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(why, "ingest unavailable");
                }
                Refusal::BadRequest(_) => {}
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
