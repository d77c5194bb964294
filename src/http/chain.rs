//! The zeq chain routes of a machine's log: record an event, read rows (latest, by Zeqond,
//! paged, live over SSE), validate the hash chain, and serve checkpoints and proofs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::openapi::schema::{
    Block, ChainState, ConsistencyProof, EventRecorded, EventRequest, Explore, InclusionProof,
    Validation,
};
use super::ChainDeps;
use super::{
    bearer, body, json_response, parse_json, read_body, respond, visible_machine, with_gateway,
    ApiError, BodyStream,
};
use crate::auth::{sha256, Access, Slug};
use crate::clock;
use crate::ledger::{self, canonical, hex, log, Checkpoint, Row};
use crate::machines::{self, Machine};

/// Most rows one `explore` page returns.
pub const MAX_PAGE: u64 = 500;
/// Longest event type accepted.
pub const MAX_EVENT_TYPE: usize = 64;

type Query = std::collections::HashMap<String, String>;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    post_event,
    state,
    block,
    explore,
    explore_sse,
    pohc_validate,
    checkpoint,
    inclusion_proof,
    consistency_proof
))]
pub(super) struct Api;

pub fn routes(
    deps: Arc<ChainDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let base = || warp::path!("api" / "chain" / "state-machines" / String / ..);
    let event = base()
        .and(warp::path!("event"))
        .and(warp::post())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .and(body())
        .then(|slug, deps, bearer, len, body| async move {
            respond(post_event(deps, bearer, slug, len, body).await)
        });
    let reads = base()
        .and(warp::path::tail())
        .and(warp::get())
        .and(warp::query::<Query>())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .and(
            warp::header::optional::<u64>("last-event-id")
                .or(warp::any().map(|| None))
                .unify(),
        )
        .and_then(
            |slug: String,
             tail: warp::path::Tail,
             q: Query,
             deps: Arc<ChainDeps>,
             bearer: Option<String>,
             last: Option<u64>| async move {
                let route = tail.as_str().trim_end_matches('/').to_string();
                let known = matches!(
                    route.as_str(),
                    "state"
                        | "block"
                        | "explore"
                        | "explore/sse"
                        | "pohc/validate"
                        | "checkpoint"
                        | "proof/inclusion"
                        | "proof/consistency"
                );
                if !known {
                    return Err(warp::reject::not_found());
                }
                Ok::<_, warp::Rejection>(respond(read(deps, bearer, slug, &route, q, last)))
            },
        );
    event.or(reads).unify()
}

/// The machine, if the caller may read its log (public machines: anyone). Non-owners are
/// rate limited per machine.
fn readable(deps: &ChainDeps, bearer: Option<&str>, slug: &str) -> Result<Machine, ApiError> {
    let principal = deps.common.principal(bearer)?;
    let (machine, access) = visible_machine(&deps.common, &principal, slug)?;
    if access < Access::Owner {
        deps.limits
            .read
            .check(&machine.slug)
            .map_err(|s| deps.common.rate_limited(s))?;
    }
    Ok(machine)
}

/// Record an event: its payload's canonical SHA-256 (or a given hash) becomes a log row.
#[utoipa::path(post, path = "/api/chain/state-machines/{slug}/event", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug")),
    request_body = EventRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Recorded", body = EventRecorded),
        (status = 400, description = "`invalid_body`, `invalid_type`, `invalid_hash`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: needs the owner, an operator or admin key"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 413, description = "`payload_too_large`"),
        (status = 429, description = "`rate_limited`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn post_event(
    deps: Arc<ChainDeps>,
    bearer: Option<String>,
    slug: String,
    declared: Option<u64>,
    body: BodyStream,
) -> Result<Response, ApiError> {
    let principal = deps.common.principal(bearer.as_deref())?;
    if principal == crate::auth::Principal::Anonymous {
        return Err(ApiError::unauthorized());
    }
    let (machine, access) = visible_machine(&deps.common, &principal, &slug)?;
    if access < Access::Operator {
        return Err(ApiError::forbidden(
            "recording events needs the owner or an operator or admin key",
        ));
    }
    deps.limits
        .write
        .check(&machine.slug)
        .map_err(|s| deps.common.rate_limited(s))?;
    let bytes = read_body(declared, body, deps.max_json_bytes).await?;
    let body = parse_json(&bytes)?;
    let Value::Object(body) = body else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "the body must be a JSON object",
        ));
    };
    let event_type = match body.get("type") {
        None | Some(Value::Null) => "event".to_string(),
        Some(Value::String(t))
            if !t.is_empty()
                && t.chars().count() <= MAX_EVENT_TYPE
                && !t.chars().any(char::is_control) =>
        {
            t.clone()
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_type",
                format!(
                "type must be a string of 1–{MAX_EVENT_TYPE} characters without control characters"
            ),
            ))
        }
    };
    let payload_hash = match (body.get("payload"), body.get("hash")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "give either payload or hash, not both",
            ))
        }
        (None, Some(h)) => h
            .as_str()
            .and_then(|h| hex::decode_hash(&h.to_ascii_lowercase()).ok())
            .ok_or_else(|| {
                ApiError::bad_request("invalid_hash", "hash must be 64 hex digits (a SHA-256)")
            })?,
        (payload, None) => sha256(&canonical::to_vec(payload.unwrap_or(&Value::Null))),
    };
    let actor = principal.actor();
    let row = deps
        .writer
        .write(move |txn| {
            machines::record_event(
                txn,
                &machine.slug,
                &event_type,
                &payload_hash,
                &actor,
                clock::now_ms(),
            )
        })
        .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "ok": true,
            "zeqondNumber": row.zeqond,
            "transitionId": uuid::Uuid::from_bytes(row.transition_id).to_string(),
            "seq": row.seq,
            "hash": hex::encode(&row.hash),
            "payload_hash": hex::encode(&payload_hash),
        }),
    ))
}

/// A row as the API shows it. The payload is canonical JSON for every row smgate writes.
pub fn row_json(row: &Row) -> Value {
    let payload = serde_json::from_slice::<Value>(&row.payload)
        .unwrap_or_else(|_| json!({"base64": ledger::base64::encode(&row.payload)}));
    json!({
        "seq": row.seq,
        "zeqond": row.zeqond,
        "ts": clock::rfc3339(row.ts_ms),
        "ts_ms": row.ts_ms,
        "type": row.kind,
        "actor": row.actor,
        "transition_id": uuid::Uuid::from_bytes(row.transition_id).to_string(),
        "payload": payload,
        "prev_hash": hex::encode(&row.prev_hash),
        "hash": hex::encode(&row.hash),
    })
}

fn num(q: &Query, key: &str) -> Result<Option<u64>, ApiError> {
    match q.get(key) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_range",
                format!("`{key}` must be a non-negative integer"),
            )
        }),
    }
}

fn range_error(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_range", message)
}

fn read(
    deps: Arc<ChainDeps>,
    bearer: Option<String>,
    slug: String,
    route: &str,
    q: Query,
    last_event_id: Option<u64>,
) -> Result<Response, ApiError> {
    let machine = readable(&deps, bearer.as_deref(), &slug)?;
    let slug = machine.slug.as_str();
    let head = deps
        .common
        .store
        .view(|txn| log::read::head(txn, slug))?
        .ok_or_else(|| ApiError::internal("machine has no log"))?;
    let size = head.size;
    match route {
        "state" => state(&deps, slug, &head),
        "block" => block(&deps, slug, &q),
        "explore" => explore(&deps, slug, size, &q),
        "explore/sse" => explore_sse(&deps, &machine, size, &q, last_event_id),
        "pohc/validate" => pohc_validate(&deps, slug, &head, &q),
        "checkpoint" => checkpoint(&deps, slug, size),
        "proof/inclusion" => inclusion_proof(&deps, slug, size, &q),
        "proof/consistency" => consistency_proof(&deps, slug, size, &q),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route",
        )),
    }
}

/// The latest row and the log size.
#[utoipa::path(get, path = "/api/chain/state-machines/{slug}/state", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Head of the log", body = ChainState),
        (status = 401, description = "`unauthorized` (private machine, no key)"),
        (status = 404, description = "`machine_not_found`, or `not_found` (no such route)"),
        (status = 429, description = "`rate_limited`"),
    ))]
#[allow(clippy::result_large_err)]
fn state(deps: &ChainDeps, slug: &str, head: &log::Head) -> Result<Response, ApiError> {
    let size = head.size;
    let row = deps
        .common
        .store
        .view(|txn| log::read::row(txn, slug, size - 1))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "slug": slug, "size": size, "genesis_zeqond": head.genesis_zeqond.to_string(),
                "latest": row.as_ref().map(row_json)}),
    ))
}

/// Rows live as server-sent events (`event: row`, `id: <seq>`); resumes after `Last-Event-ID`.
#[utoipa::path(get, path = "/api/chain/state-machines/{slug}/explore/sse", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug"),
           ("from" = Option<u64>, Query, description = "First seq (default: the next row)"),
           ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this seq")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid_range`"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
#[allow(clippy::result_large_err)]
fn explore_sse(
    deps: &Arc<ChainDeps>,
    machine: &Machine,
    size: u64,
    q: &Query,
    last_event_id: Option<u64>,
) -> Result<Response, ApiError> {
    let from = match (last_event_id, num(q, "from")?) {
        (Some(id), _) => id.saturating_add(1),
        (None, Some(f)) => f,
        (None, None) => size,
    };
    Ok(sse(deps.clone(), machine.slug.clone(), from))
}

/// The signed checkpoint of the log (a signed note, tlog format).
#[utoipa::path(get, path = "/api/chain/state-machines/{slug}/checkpoint", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The signed note", content_type = "text/plain", body = String),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
#[allow(clippy::result_large_err)]
fn checkpoint(deps: &ChainDeps, slug: &str, size: u64) -> Result<Response, ApiError> {
    let (root, cosigned) = deps.common.store.view(|txn| {
        Ok((
            log::read::tree_hash(txn, slug, size)?,
            crate::sync::client::cosignature(txn, slug, size)?,
        ))
    })?;
    // With the hub's cosignature when the hub has verified this very tree.
    let mut note = checkpoint_note(deps, slug, size, root)?;
    note.push_str(cosigned.as_deref().unwrap_or(""));
    let mut res = note.into_response();
    if let Ok(v) = "text/plain; charset=utf-8".parse() {
        res.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    Ok(res)
}

/// The rows written in one Zeqond.
#[utoipa::path(get, path = "/api/chain/state-machines/{slug}/block", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug"),
           ("zeqond" = u64, Query, description = "The Zeqond")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Rows at that Zeqond", body = Block),
        (status = 400, description = "`invalid_zeqond`, `invalid_range`"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`no_block_at_zeqond`, `machine_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
fn block(deps: &ChainDeps, slug: &str, q: &Query) -> Result<Response, ApiError> {
    let z = num(q, "zeqond")?
        .ok_or_else(|| ApiError::bad_request("invalid_zeqond", "give ?zeqond=N"))?;
    let rows = deps.common.store.view(|txn| {
        let seqs = log::read::seqs_at_zeqond(txn, slug, z)?;
        let mut rows = Vec::with_capacity(seqs.len());
        for s in seqs {
            rows.extend(log::read::row(txn, slug, s)?);
        }
        Ok(rows)
    })?;
    if rows.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_block_at_zeqond",
            format!("no rows at zeqond {z}"),
        ));
    }
    let rows: Vec<Value> = rows.iter().map(row_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "zeqond": z, "count": rows.len(), "rows": rows}),
    ))
}

/// A page of rows `from..=to` (at most 500).
#[utoipa::path(get, path = "/api/chain/state-machines/{slug}/explore", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug"),
           ("from" = Option<u64>, Query, description = "First seq (default 0)"),
           ("to" = Option<u64>, Query, description = "Last seq, inclusive")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Rows", body = Explore),
        (status = 400, description = "`invalid_range`"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
fn explore(deps: &ChainDeps, slug: &str, size: u64, q: &Query) -> Result<Response, ApiError> {
    let from = num(q, "from")?.unwrap_or(0);
    let to = num(q, "to")?.unwrap_or_else(|| from.saturating_add(MAX_PAGE - 1));
    if from > to {
        return Err(range_error(format!("from ({from}) is after to ({to})")));
    }
    // `to` is inclusive; one page is at most MAX_PAGE rows.
    let end = to
        .min(from.saturating_add(MAX_PAGE - 1))
        .min(size.saturating_sub(1));
    let rows = if from < size {
        deps.common
            .store
            .view(|txn| log::read::rows(txn, slug, from, end + 1))?
    } else {
        Vec::new()
    };
    let next = (from < size && end < to && end + 1 < size).then_some(end + 1);
    let rows: Vec<Value> = rows.iter().map(row_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "from": from, "to": to, "size": size, "count": rows.len(), "rows": rows, "next": next}),
    ))
}

/// Rechecks the hash chain of rows `from..=to`.
#[utoipa::path(operation_id = "validate", get, path = "/api/chain/state-machines/{slug}/pohc/validate", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug"),
           ("from" = Option<u64>, Query, description = "First seq (default 0)"),
           ("to" = Option<u64>, Query, description = "Last seq (default: the last row)")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The report", body = Validation),
        (status = 400, description = "`invalid_range`"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
fn pohc_validate(
    deps: &ChainDeps,
    slug: &str,
    head: &log::Head,
    q: &Query,
) -> Result<Response, ApiError> {
    let size = head.size;
    let from = num(q, "from")?.unwrap_or(0);
    let to = num(q, "to")?.unwrap_or(size.saturating_sub(1));
    if from > to || to >= size {
        return Err(range_error(format!(
            "need from ≤ to < {size} (the log size)"
        )));
    }
    let report = deps
        .common
        .store
        .view(|txn| validate(txn, slug, head.genesis_zeqond, from, to))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "valid": report.valid, "count": report.count, "broken_at": report.broken_at,
                "genesis_zeqond": head.genesis_zeqond.to_string(), "from": from, "to": to}),
    ))
}

/// RFC 6962 inclusion proof of row `seq` in the tree of `size` rows.
#[utoipa::path(operation_id = "inclusion", get, path = "/api/chain/state-machines/{slug}/proof/inclusion", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug"),
           ("seq" = u64, Query, description = "The row"),
           ("size" = Option<u64>, Query, description = "Tree size (default: the log size)")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The proof", body = InclusionProof),
        (status = 400, description = "`invalid_range`"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
fn inclusion_proof(
    deps: &ChainDeps,
    slug: &str,
    size: u64,
    q: &Query,
) -> Result<Response, ApiError> {
    let seq = num(q, "seq")?.ok_or_else(|| range_error("give ?seq=I"))?;
    let tree = num(q, "size")?.unwrap_or(size);
    if seq >= tree || tree > size {
        return Err(range_error(format!(
            "need seq < size ≤ {size} (the log size)"
        )));
    }
    let (row, proof) = deps.common.store.view(|txn| {
        let row = log::read::row(txn, slug, seq)?
            .ok_or_else(|| crate::store::StoreError::Corrupt(format!("row {seq} missing")))?;
        Ok((row, log::read::prove_inclusion(txn, slug, seq, tree)?))
    })?;
    let leaf = ledger::tlog::record_hash(&row.compute_hash());
    Ok(json_response(
        StatusCode::OK,
        &json!({"seq": seq, "tree_size": tree, "row_hash": hex::encode(&row.compute_hash()),
                "leaf_hash": hex::encode(&leaf), "proof": proof.iter().map(|h| hex::encode(h)).collect::<Vec<_>>()}),
    ))
}

/// RFC 6962 consistency proof between tree sizes `from` and `to`.
#[utoipa::path(operation_id = "consistency", get, path = "/api/chain/state-machines/{slug}/proof/consistency", tag = "chain",
    params(("slug" = String, Path, description = "Machine slug"),
           ("from" = u64, Query, description = "Older size, ≥ 1"),
           ("to" = Option<u64>, Query, description = "Newer size (default: the log size)")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The proof", body = ConsistencyProof),
        (status = 400, description = "`invalid_range`"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
fn consistency_proof(
    deps: &ChainDeps,
    slug: &str,
    size: u64,
    q: &Query,
) -> Result<Response, ApiError> {
    let from = num(q, "from")?.ok_or_else(|| range_error("give ?from=M"))?;
    let to = num(q, "to")?.unwrap_or(size);
    if from == 0 || from > to || to > size {
        return Err(range_error(format!(
            "need 1 ≤ from ≤ to ≤ {size} (the log size)"
        )));
    }
    let proof = deps
        .common
        .store
        .view(|txn| log::read::prove_consistency(txn, slug, from, to))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"from": from, "to": to, "proof": proof.iter().map(|h| hex::encode(h)).collect::<Vec<_>>()}),
    ))
}

/// Walks rows `from..=to`, checking each hash and each link; row `from` links to row
/// `from-1`'s stored hash (or the genesis hash).
pub fn validate(
    txn: &redb::ReadTransaction,
    slug: &str,
    genesis_zeqond: u64,
    from: u64,
    to: u64,
) -> Result<ledger::ChainReport, crate::store::StoreError> {
    let anchor = if from == 0 {
        ledger::genesis_prev_hash(slug, genesis_zeqond)
    } else {
        match log::read::row(txn, slug, from - 1)? {
            Some(r) => r.hash,
            None => {
                return Ok(ledger::ChainReport {
                    valid: false,
                    count: 0,
                    broken_at: Some(from - 1),
                })
            }
        }
    };
    let mut report = ledger::ChainReport {
        valid: true,
        count: 0,
        broken_at: None,
    };
    let mut cursor = from;
    let mut prev = anchor;
    // In chunks, so memory stays bounded on long logs.
    while cursor <= to {
        let end = to.min(cursor + 4095);
        let rows = log::read::rows(txn, slug, cursor, end + 1)?;
        let chunk = ledger::verify_chain_from(rows.into_iter(), cursor, prev);
        report.count += chunk.count;
        if !chunk.valid {
            report.valid = false;
            report.broken_at = chunk.broken_at;
            return Ok(report);
        }
        prev = match log::read::row(txn, slug, end)? {
            Some(r) => r.hash,
            None => break,
        };
        cursor = end + 1;
    }
    Ok(report)
}

pub fn checkpoint_note(
    deps: &ChainDeps,
    slug: &str,
    size: u64,
    root: ledger::Hash,
) -> Result<String, ApiError> {
    let body = Checkpoint {
        origin: format!("{}/{}", deps.identity.id, slug),
        size,
        root,
    }
    .to_body()
    .map_err(|e| ApiError::internal(e.to_string()))?;
    ledger::sign_note(&body, &deps.identity.id, &deps.identity.key)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Live rows from `from` on: first the backlog, then each row as its commit lands. The event
/// id is the row's seq, so a client that reconnects with `Last-Event-ID` resumes after it.
fn sse(deps: Arc<ChainDeps>, slug: Slug, from: u64) -> Response {
    let mut commits = deps.writer.subscribe();
    let stream = async_stream(move |tx| async move {
        let mut cursor = from;
        loop {
            let batch = deps.common.store.view(|txn| {
                let size = log::read::head(txn, &slug)?.map(|h| h.size).unwrap_or(0);
                if cursor >= size {
                    return Ok(Vec::new());
                }
                log::read::rows(txn, &slug, cursor, size.min(cursor + 256))
            });
            let rows = match batch {
                Ok(rows) => rows,
                Err(_) => return,
            };
            if rows.is_empty() {
                if commits.changed().await.is_err() {
                    return;
                }
                continue;
            }
            for row in rows {
                cursor = row.seq + 1;
                let event = warp::sse::Event::default()
                    .id(row.seq.to_string())
                    .event("row")
                    .data(row_json(&row).to_string());
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    });
    warp::sse::reply(
        warp::sse::keep_alive()
            .interval(Duration::from_secs(15))
            .stream(stream),
    )
    .into_response()
}

/// A stream fed by a task through a small channel: the producer stops when the client leaves.
fn async_stream<F, Fut>(
    producer: F,
) -> impl futures_util::Stream<Item = Result<warp::sse::Event, Infallible>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<warp::sse::Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(Ok)))
}
