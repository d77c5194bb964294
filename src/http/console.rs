//! Console sessions under `/ui/api/session`: sign in with an account key (POST), who am I
//! (GET), sign out (DELETE). The browser gets an HttpOnly, Secure, SameSite=Strict cookie and
//! never the key back; the API accepts the cookie through `bearer()` in `mod.rs`.

#![allow(clippy::result_large_err)] // the shared error type of the zeq routes

use std::sync::Arc;

use http::StatusCode;
use serde_json::{json, Value};
use warp::reply::Response;
use warp::Filter;

use super::ConsoleDeps;
use super::{
    body, json_response, parse_json, read_body, respond, session_cookie, with_gateway, ApiError,
    BodyStream, CONSOLE_HEADER, SESSION_COOKIE,
};
use crate::auth::session::{self, Session, SESSION_TTL_MS};
use crate::auth::{self, AuthError, Principal};
use crate::clock;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(sign_in, whoami, sign_out))]
pub(super) struct Api;

/// A console session as the console sees it (never the key, never the token).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ConsoleSession {
    /// Always `true`.
    pub ok: bool,
    /// The signed-in account.
    pub zid: String,
    /// The account's display name, if it has one.
    pub display_name: Option<String>,
    /// When the session ends (RFC 3339); sessions do not slide.
    pub expires_at: String,
}

/// Largest sign-in body: a key and some slack.
const MAX_SIGN_IN_BYTES: u64 = 1024;

pub fn routes(
    deps: Arc<ConsoleDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let path = || warp::path!("ui" / "api" / "session");
    let sign_in = path()
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(with_gateway(deps.clone()))
        .and(body())
        .then(|headers, deps, len, body| async move {
            respond(sign_in(deps, headers, len, body).await)
        });
    let whoami = path()
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(with_gateway(deps.clone()))
        .map(|headers, deps| respond(whoami(deps, headers)));
    let sign_out = path()
        .and(warp::delete())
        .and(warp::header::headers_cloned())
        .and(with_gateway(deps))
        .then(|headers, deps| async move { respond(sign_out(deps, headers).await) });
    sign_in.or(whoami).unify().or(sign_out).unify()
}

/// Console writes must come from the console itself: same origin (when the browser says so)
/// and with the console header, which no cross-origin form or unpreflighted script can send.
fn require_console(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let cross = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s != "same-origin");
    let marked = headers
        .get(CONSOLE_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    if cross || !marked {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "console_header_missing",
            format!("console session requests must come from the console and send `{CONSOLE_HEADER}: 1`"),
        ));
    }
    Ok(())
}

fn session_json(deps: &ConsoleDeps, s: &Session) -> Result<Value, ApiError> {
    let account = deps
        .common
        .store
        .view(|txn| auth::account(txn, s.zid.as_str()))?;
    Ok(json!({
        "ok": true,
        "zid": s.zid.as_str(),
        "display_name": account.map(|a| a.display_name),
        "expires_at": clock::rfc3339(s.expires_ms),
    }))
}

fn cookie(value: &str, max_age_secs: i64) -> String {
    format!("{SESSION_COOKIE}={value}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={max_age_secs}")
}

fn with_cookie(mut res: Response, cookie: &str) -> Response {
    let h = res.headers_mut();
    if let Ok(v) = cookie.parse() {
        h.insert(http::header::SET_COOKIE, v);
    }
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}

/// Sign in with an account key: answers a `Set-Cookie: smgate_session=…; HttpOnly; Secure;
/// SameSite=Strict` session cookie. Needs the `X-Smgate-Console: 1` header.
#[utoipa::path(post, path = "/ui/api/session", tag = "console",
    params(("x-smgate-console" = String, Header, description = "Must be `1`")),
    request_body(content = inline(Object), description = "`{\"key\": \"zeq_ak_…\"}`", content_type = "application/json"),
    responses(
        (status = 200, description = "Signed in; the cookie is set", body = ConsoleSession),
        (status = 400, description = "`invalid_body`"),
        (status = 401, description = "`unauthorized`: not a live account key"),
        (status = 403, description = "`console_header_missing`"),
        (status = 413, description = "`payload_too_large`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn sign_in(
    deps: Arc<ConsoleDeps>,
    headers: http::HeaderMap,
    len: Option<u64>,
    body: BodyStream,
) -> Result<Response, ApiError> {
    require_console(&headers)?;
    let bytes = read_body(len, body, MAX_SIGN_IN_BYTES).await?;
    let key = match parse_json(&bytes)?.get("key") {
        Some(Value::String(k)) => k.trim().to_string(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "send {\"key\": \"zeq_ak_…\"}",
            ))
        }
    };
    let not_account = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "sign in with a live account key (zeq_ak_…)",
        )
    };
    if !key.starts_with(auth::ACCOUNT_KEY_PREFIX) {
        return Err(not_account());
    }
    let (zid, key_id) = match deps.common.principal(Some(&key)) {
        Ok(Principal::Account { zid, key_id }) => (zid, key_id),
        Ok(_) | Err(AuthError::Unauthorized) => return Err(not_account()),
        Err(e) => return Err(e.into()),
    };
    let (raw, session) = deps
        .writer
        .write(move |txn| session::open(txn, zid, key_id, clock::now_ms()))
        .await?;
    let res = json_response(StatusCode::OK, &session_json(&deps, &session)?);
    Ok(with_cookie(res, &cookie(&raw, SESSION_TTL_MS / 1000)))
}

/// The session of the presented cookie.
#[utoipa::path(get, path = "/ui/api/session", tag = "console",
    responses(
        (status = 200, description = "Signed in", body = ConsoleSession),
        (status = 401, description = "`unauthorized`: no live session"),
    ))]
fn whoami(deps: Arc<ConsoleDeps>, headers: http::HeaderMap) -> Result<Response, ApiError> {
    let token = session_cookie(&headers).ok_or_else(ApiError::unauthorized)?;
    let now = clock::now_ms();
    let session = deps
        .common
        .store
        .view(|txn| session::find(txn, &token, now))?
        .ok_or_else(ApiError::unauthorized)?;
    let mut res = json_response(StatusCode::OK, &session_json(&deps, &session)?);
    res.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    Ok(res)
}

/// Sign out: deletes the session on the gateway and clears the cookie. Needs the
/// `X-Smgate-Console: 1` header.
#[utoipa::path(delete, path = "/ui/api/session", tag = "console",
    params(("x-smgate-console" = String, Header, description = "Must be `1`")),
    responses(
        (status = 200, description = "Signed out", body = Object),
        (status = 401, description = "`unauthorized`: no live session"),
        (status = 403, description = "`console_header_missing`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn sign_out(deps: Arc<ConsoleDeps>, headers: http::HeaderMap) -> Result<Response, ApiError> {
    require_console(&headers)?;
    let token = session_cookie(&headers).ok_or_else(ApiError::unauthorized)?;
    let closed = deps
        .writer
        .write(move |txn| session::close(txn, &token))
        .await?;
    if !closed {
        return Err(ApiError::unauthorized());
    }
    let res = json_response(StatusCode::OK, &json!({"ok": true}));
    Ok(with_cookie(res, &cookie("", 0)))
}
