//! `GET /api/chain/state-machines/:slug/dead-letters`: the machine's MQTT dead letters, newest
//! first (viewer and above; `?limit=` 1–1000, default 100).

use std::sync::Arc;

use http::StatusCode;
use serde_json::{json, Value};
use warp::reply::Response;
use warp::Filter;

use super::Common;
use super::{bearer, json_response, respond, visible_machine, with_gateway, ApiError};
use crate::auth::Access;
use crate::clock;
use crate::mqtt::ingest;

use super::openapi::schema::DeadLetters;

type Query = std::collections::HashMap<String, String>;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list))]
pub(super) struct Api;

pub fn routes(
    deps: Arc<Common>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("api" / "chain" / "state-machines" / String / "dead-letters")
        .and(warp::get())
        .and(warp::query::<Query>())
        .and(with_gateway(deps))
        .and(bearer())
        .map(
            |slug: String, q: Query, deps: Arc<Common>, bearer: Option<String>| {
                respond(list(&deps, bearer.as_deref(), &slug, &q))
            },
        )
}

/// The machine's MQTT dead letters, newest first (viewer and above).
#[utoipa::path(get, path = "/api/chain/state-machines/{slug}/dead-letters", tag = "mqtt",
    params(("slug" = String, Path, description = "Machine slug"),
           ("limit" = Option<u32>, Query, description = "1–1000, default 100")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Dead letters", body = DeadLetters),
        (status = 400, description = "`invalid_limit`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
    ))]
#[allow(clippy::result_large_err)] // the shared error type of the zeq routes
fn list(deps: &Common, bearer: Option<&str>, slug: &str, q: &Query) -> Result<Response, ApiError> {
    let principal = deps.principal(bearer)?;
    let (machine, access) = visible_machine(deps, &principal, slug)?;
    if access < Access::Viewer {
        return Err(ApiError::forbidden(
            "reading dead letters needs the owner or a viewer, operator or admin key",
        ));
    }
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request("invalid_limit", "limit must be an integer from 1 to 1000")
            })?,
    };
    let letters = deps
        .store
        .view(|txn| ingest::dead_letters(txn, &machine.slug, limit))?;
    let items: Vec<Value> = letters
        .iter()
        .map(|(n, d)| {
            json!({
                "n": n,
                "topic": d.topic,
                "payload": String::from_utf8_lossy(&d.payload),
                "payload_bytes": d.payload_len,
                "truncated": d.payload_len > d.payload.len() as u64,
                "reason": d.reason,
                "message": d.message,
                "ts": clock::rfc3339(d.ts_ms),
                "ts_ms": d.ts_ms,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "slug": machine.slug, "dead_letters": items}),
    ))
}
