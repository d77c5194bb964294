//! `GET /api/sync/status`: upstream sync per machine, for the machines the caller owns or
//! administers.

use std::sync::Arc;

use http::StatusCode;
use serde_json::{json, Value};
use warp::reply::Response;
use warp::Filter;

use super::openapi::schema::SyncStatus;
use super::SyncDeps;
use super::{bearer, json_response, respond, with_gateway, ApiError};
use crate::auth::{Access, Principal};
use crate::clock;
use crate::sync::client;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(status))]
pub(super) struct Api;

pub fn routes(
    deps: Arc<SyncDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("api" / "sync" / "status")
        .and(warp::get())
        .and(with_gateway(deps))
        .and(bearer())
        .map(|deps: Arc<SyncDeps>, bearer: Option<String>| {
            respond(status(&deps, bearer.as_deref()))
        })
}

/// Upstream sync per machine the caller owns or administers.
#[utoipa::path(get, path = "/api/sync/status", tag = "sync",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Sync status", body = SyncStatus),
        (status = 401, description = "`unauthorized`"),
    ))]
fn status(deps: &SyncDeps, bearer: Option<&str>) -> Result<Response, ApiError> {
    let principal = deps.common.principal(bearer)?;
    if principal == Principal::Anonymous {
        return Err(ApiError::unauthorized());
    }
    let ms = |t: Option<i64>| t.map(clock::rfc3339);
    let machines = deps.common.store.view(|txn| {
        let mut out = Vec::new();
        for m in crate::machines::all(txn)? {
            if m.access(&principal) < Access::Admin {
                continue;
            }
            let (size, acked, rows, bytes, exact) = client::backlog(txn, &m.slug)?;
            let s = deps.state.get(&m.slug);
            out.push(json!({
                "slug": m.slug,
                "log_size": size,
                "acked_seq": acked.checked_sub(1),
                "acked_size": acked,
                "backlog_rows": rows,
                "backlog_bytes": bytes,
                "backlog_bytes_exact": exact,
                "last_success": ms(s.last_success_ms),
                "last_error": s.last_error,
                "last_error_code": s.last_error_code,
                "last_error_at": ms(s.last_error_ms),
                "conflict_at": s.conflict_at,
                "next_retry": ms(s.next_retry_ms),
            }));
        }
        Ok(out)
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "ok": true,
            "enabled": !deps.upstream.url.is_empty(),
            "upstream": deps.upstream.url,
            "gateway_id": deps.identity.id,
            "over_quota": deps.state.over_quota.load(std::sync::atomic::Ordering::Relaxed),
            "backlog_quota_bytes": deps.upstream.backlog_quota_bytes,
            "machines": Value::Array(machines),
        }),
    ))
}
