//! Spec 000 routes: spin-up, machine reads, and machine keys.

use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use serde_json::{json, Value};
use warp::reply::Response;
use warp::Filter;

use super::{
    bearer, body, client_ip, json_response, parse_json, read_body, respond, visible_machine,
    with_gateway, ApiError, BodyStream,
};
use crate::auth::{self, Access, KeyRecord, KeySubject, Principal, Role};
use crate::clock;
use crate::machines::{self, Machine, MachineError, NewMachine};

use super::openapi::schema::{
    KeyList, KeyMinted, KeyOne, MachineCreated, MachineList, MachineOne, MintKeyRequest,
    NewMachineRequest, ZeqError,
};
use crate::server::Gateway;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(create, list, get_one, mint_key, list_keys, revoke_key))]
pub(super) struct Api;

pub fn routes(
    gw: Arc<Gateway>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let create = warp::path!("api" / "chain" / "state-machines")
        .and(warp::post())
        .and(with_gateway(gw.clone()))
        .and(client_ip())
        .and(bearer())
        .and(body())
        .then(|gw, ip, bearer, len, body| async move {
            respond(create(gw, ip, bearer, len, body).await)
        });
    let list = warp::path!("api" / "chain" / "state-machines")
        .and(warp::get())
        .and(with_gateway(gw.clone()))
        .and(bearer())
        .then(|gw, bearer| async move { respond(list(gw, bearer)) });
    let one = warp::path!("api" / "chain" / "state-machines" / String)
        .and(warp::get())
        .and(with_gateway(gw.clone()))
        .and(bearer())
        .then(|slug, gw, bearer| async move { respond(get_one(gw, bearer, slug)) });
    let mint = warp::path!("api" / "chain" / String / "api-keys")
        .and(warp::post())
        .and(with_gateway(gw.clone()))
        .and(bearer())
        .and(body())
        .then(|slug, gw, bearer, len, body| async move {
            respond(mint_key(gw, bearer, slug, len, body).await)
        });
    let keys = warp::path!("api" / "chain" / String / "api-keys")
        .and(warp::get())
        .and(with_gateway(gw.clone()))
        .and(bearer())
        .then(|slug, gw, bearer| async move { respond(list_keys(gw, bearer, slug)) });
    let revoke = warp::path!("api" / "chain" / String / "api-keys" / String)
        .and(warp::delete())
        .and(with_gateway(gw))
        .and(bearer())
        .then(
            |slug, id, gw, bearer| async move { respond(revoke_key(gw, bearer, slug, id).await) },
        );
    create
        .or(list)
        .unify()
        .or(one)
        .unify()
        .or(mint)
        .unify()
        .or(keys)
        .unify()
        .or(revoke)
        .unify()
}

/// Spin up a machine; the caller's account owns it and gets an admin key for it, once.
#[utoipa::path(post, path = "/api/chain/state-machines", tag = "machines",
    request_body = NewMachineRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = MachineCreated),
        (status = 400, description = "`invalid_body`, `invalid_slug`, `invalid_display_name`, `invalid_purpose`, …", body = ZeqError),
        (status = 401, description = "`unauthorized`", body = ZeqError),
        (status = 403, description = "`forbidden`: machine keys cannot spin up machines", body = ZeqError),
        (status = 409, description = "`slug_taken` (with `existing_slug`)", body = ZeqError),
        (status = 413, description = "`payload_too_large`", body = ZeqError),
        (status = 429, description = "`rate_limited` (with `retry_after`), 10 spin-ups/min/IP", body = ZeqError),
        (status = 507, description = "`storage_full`", body = ZeqError),
    ))]
async fn create(
    gw: Arc<Gateway>,
    ip: IpAddr,
    bearer: Option<String>,
    declared: Option<u64>,
    body: BodyStream,
) -> Result<Response, ApiError> {
    gw.spinup_limit
        .check(&ip)
        .map_err(|secs| gw.rate_limited(secs))?;
    let principal = gw.principal(bearer.as_deref())?;
    if principal == Principal::Anonymous {
        return Err(ApiError::unauthorized());
    }
    let bytes = read_body(declared, body, gw.config.http.max_json_bytes).await?;
    let request = NewMachine::from_json(&parse_json(&bytes)?)?;
    let owner = gw
        .store
        .view(|txn| match machines::spinup_owner(txn, &principal) {
            Err(MachineError::Store(e)) => Err(e),
            other => Ok(other),
        })??;
    let defaults = gw.machine_defaults.clone();
    let actor = principal.actor();
    let (machine, api_key) = gw
        .writer
        .write(move |txn| {
            machines::create(txn, &owner, &actor, request, &defaults, clock::now_ms())
        })
        .await?;
    tracing::info!(slug = %machine.slug, owner = %machine.owner_zid, "machine created");
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"ok": true, "machine": machine.to_json(Access::Owner), "api_key": api_key}),
    ))
}

/// Machines visible to the caller (public ones for anyone).
#[utoipa::path(get, path = "/api/chain/state-machines", tag = "machines",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Visible machines", body = MachineList),
        (status = 401, description = "`unauthorized`: unknown, revoked or expired key", body = ZeqError),
    ))]
fn list(gw: Arc<Gateway>, bearer: Option<String>) -> Result<Response, ApiError> {
    let principal = gw.principal(bearer.as_deref())?;
    let all = gw.store.view(machines::all)?;
    let visible: Vec<Value> = all
        .iter()
        .filter_map(|m| {
            let access = m.access(&principal);
            (access > Access::None).then(|| m.to_json(access))
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "count": visible.len(), "machines": visible}),
    ))
}

/// One machine.
#[utoipa::path(get, path = "/api/chain/state-machines/{slug}", tag = "machines",
    params(("slug" = String, Path, description = "Machine slug")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The machine", body = MachineOne),
        (status = 401, description = "`unauthorized`", body = ZeqError),
        (status = 404, description = "`machine_not_found`, or `not_found` (no such route)", body = ZeqError),
    ))]
fn get_one(gw: Arc<Gateway>, bearer: Option<String>, slug: String) -> Result<Response, ApiError> {
    let principal = gw.principal(bearer.as_deref())?;
    let (machine, access) = visible_machine(&gw, &principal, &slug)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "machine": machine.to_json(access)}),
    ))
}

fn key_json(k: &KeyRecord) -> Value {
    let scope = match &k.subject {
        KeySubject::Machine { role, .. } => role.as_str(),
        KeySubject::Account { .. } => "account",
    };
    json!({
        "id": k.id,
        "name": k.name,
        "scope": scope,
        "hint": k.hint,
        "created_at": clock::rfc3339(k.created_ms),
        "expires_at": k.expires_ms.map(clock::rfc3339),
        "revoked_at": k.revoked_ms.map(clock::rfc3339),
        "active": k.is_live(clock::now_ms()),
    })
}

/// Admin+ on the machine, or the reason why not.
fn require_admin(
    gw: &Gateway,
    bearer: Option<&str>,
    slug: &str,
) -> Result<(Machine, Principal), ApiError> {
    let principal = gw.principal(bearer)?;
    let (machine, access) = visible_machine(gw, &principal, slug)?;
    if access < Access::Admin {
        return Err(ApiError::forbidden(
            "managing keys needs the owner or an admin key of this machine",
        ));
    }
    Ok((machine, principal))
}

/// Longest key lifetime a request may ask for: ten years.
const MAX_KEY_TTL_SECS: u64 = 10 * 365 * 86_400;

/// Mint a machine key (owner or admin).
#[utoipa::path(post, path = "/api/chain/{slug}/api-keys", tag = "machines",
    params(("slug" = String, Path, description = "Machine slug")),
    request_body = MintKeyRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Minted; the raw key is shown once", body = KeyMinted),
        (status = 400, description = "`invalid_body`, `invalid_name`, `invalid_scope`, `invalid_expiry`", body = ZeqError),
        (status = 401, description = "`unauthorized`", body = ZeqError),
        (status = 403, description = "`forbidden`: needs the owner or an admin key", body = ZeqError),
        (status = 404, description = "`machine_not_found`, or `not_found` (no such route)", body = ZeqError),
        (status = 413, description = "`payload_too_large`", body = ZeqError),
        (status = 507, description = "`storage_full`", body = ZeqError),
    ))]
async fn mint_key(
    gw: Arc<Gateway>,
    bearer: Option<String>,
    slug: String,
    declared: Option<u64>,
    body: BodyStream,
) -> Result<Response, ApiError> {
    let (machine, principal) = require_admin(&gw, bearer.as_deref(), &slug)?;
    let bytes = read_body(declared, body, gw.config.http.max_json_bytes).await?;
    let body = parse_json(&bytes)?;
    let name = match body.get("name") {
        Some(Value::String(s)) if (1..=100).contains(&s.chars().count()) => s.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_name",
                "name must be a string of 1–100 characters",
            ))
        }
    };
    let role = match body
        .get("scope")
        .and_then(Value::as_str)
        .and_then(Role::parse)
    {
        Some(r) => r,
        None => {
            return Err(ApiError::bad_request(
                "invalid_scope",
                "scope must be one of viewer, operator, admin",
            ))
        }
    };
    let ttl = match body.get("expires_in_seconds") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_KEY_TTL_SECS).contains(&n) => Some(n as i64 * 1000),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_expiry",
                    "expires_in_seconds must be an integer from 1 to 315360000",
                ))
            }
        },
    };
    let (slug, actor) = (machine.slug.clone(), principal.actor());
    let (raw, record) = gw
        .writer
        .write(move |txn| -> Result<_, ApiError> {
            let now = clock::now_ms();
            Ok(machines::mint_key(
                txn,
                &slug,
                role,
                &name,
                ttl.map(|t| now + t),
                &actor,
                now,
            )?)
        })
        .await?;
    tracing::info!(slug = %machine.slug, key = %record.id, by = %principal.actor(), "machine key minted");
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"ok": true, "key": key_json(&record), "api_key": raw}),
    ))
}

/// The machine's keys (owner or admin); never the raw keys.
#[utoipa::path(get, path = "/api/chain/{slug}/api-keys", tag = "machines",
    params(("slug" = String, Path, description = "Machine slug")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Keys", body = KeyList),
        (status = 401, description = "`unauthorized`", body = ZeqError),
        (status = 403, description = "`forbidden`", body = ZeqError),
        (status = 404, description = "`machine_not_found`, or `not_found` (no such route)", body = ZeqError),
    ))]
fn list_keys(gw: Arc<Gateway>, bearer: Option<String>, slug: String) -> Result<Response, ApiError> {
    let (machine, _) = require_admin(&gw, bearer.as_deref(), &slug)?;
    let keys = gw.store.view(|txn| {
        auth::list_keys(
            txn,
            |s| matches!(s, KeySubject::Machine { slug, .. } if *slug == machine.slug),
        )
    })?;
    let keys: Vec<Value> = keys.iter().map(key_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "keys": keys}),
    ))
}

/// Revoke a machine key (owner or admin).
#[utoipa::path(delete, path = "/api/chain/{slug}/api-keys/{id}", tag = "machines",
    params(("slug" = String, Path, description = "Machine slug"), ("id" = String, Path, description = "Key id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Revoked", body = KeyOne),
        (status = 401, description = "`unauthorized`", body = ZeqError),
        (status = 403, description = "`forbidden`", body = ZeqError),
        (status = 404, description = "`machine_not_found`, `key_not_found`, or `not_found` (no such route)", body = ZeqError),
        (status = 507, description = "`storage_full`", body = ZeqError),
    ))]
async fn revoke_key(
    gw: Arc<Gateway>,
    bearer: Option<String>,
    slug: String,
    id: String,
) -> Result<Response, ApiError> {
    let (machine, principal) = require_admin(&gw, bearer.as_deref(), &slug)?;
    let (machine_slug, actor) = (machine.slug.clone(), principal.actor());
    let record = gw
        .writer
        .write(move |txn| -> Result<_, MachineError> {
            Ok(machines::revoke_key(
                txn,
                &machine_slug,
                &id,
                &actor,
                clock::now_ms(),
            )?)
        })
        .await?;
    let Some(record) = record else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            "this machine has no key with that id",
        ));
    };
    tracing::info!(slug = %machine.slug, key = %record.id, by = %principal.actor(), "machine key revoked");
    gw.mqtt.key_revoked(&record.id);
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "key": key_json(&record)}),
    ))
}
