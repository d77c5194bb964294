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
    NewMachineRequest,
};
use super::MachinesDeps;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(create, list, get_one, mint_key, list_keys, revoke_key))]
pub(super) struct Api;

pub fn routes(
    deps: Arc<MachinesDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let create = warp::path!("api" / "chain" / "state-machines")
        .and(warp::post())
        .and(with_gateway(deps.clone()))
        .and(client_ip())
        .and(bearer())
        .and(body())
        .then(|deps, ip, bearer, len, body| async move {
            respond(create(deps, ip, bearer, len, body).await)
        });
    let list = warp::path!("api" / "chain" / "state-machines")
        .and(warp::get())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .then(|deps, bearer| async move { respond(list(deps, bearer)) });
    let one = warp::path!("api" / "chain" / "state-machines" / String)
        .and(warp::get())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .then(|slug, deps, bearer| async move { respond(get_one(deps, bearer, slug)) });
    let mint = warp::path!("api" / "chain" / String / "api-keys")
        .and(warp::post())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .and(body())
        .then(|slug, deps, bearer, len, body| async move {
            respond(mint_key(deps, bearer, slug, len, body).await)
        });
    let keys = warp::path!("api" / "chain" / String / "api-keys")
        .and(warp::get())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .then(|slug, deps, bearer| async move { respond(list_keys(deps, bearer, slug)) });
    let revoke =
        warp::path!("api" / "chain" / String / "api-keys" / String)
            .and(warp::delete())
            .and(with_gateway(deps))
            .and(bearer())
            .then(|slug, id, deps, bearer| async move {
                respond(revoke_key(deps, bearer, slug, id).await)
            });
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
        (status = 400, description = "`invalid_body`, `invalid_slug`, `invalid_display_name`, `invalid_purpose`, …"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: machine keys cannot spin up machines"),
        (status = 409, description = "`slug_taken` (with `existing_slug`)"),
        (status = 413, description = "`payload_too_large`"),
        (status = 429, description = "`rate_limited` (with `retry_after`), 10 spin-ups/min/IP"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn create(
    deps: Arc<MachinesDeps>,
    ip: IpAddr,
    bearer: Option<String>,
    declared: Option<u64>,
    body: BodyStream,
) -> Result<Response, ApiError> {
    deps.spinup_limit
        .check(&ip)
        .map_err(|secs| deps.common.rate_limited(secs))?;
    let principal = deps.common.principal(bearer.as_deref())?;
    if principal == Principal::Anonymous {
        return Err(ApiError::unauthorized());
    }
    let bytes = read_body(declared, body, deps.max_json_bytes).await?;
    let request = NewMachine::from_json(&parse_json(&bytes)?)?;
    let owner = deps
        .common
        .store
        .view(|txn| match machines::spinup_owner(txn, &principal) {
            Err(MachineError::Store(e)) => Err(e),
            other => Ok(other),
        })??;
    let defaults = deps.defaults.clone();
    let actor = principal.actor();
    let (machine, api_key) = deps
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
        (status = 401, description = "`unauthorized`: unknown, revoked or expired key"),
    ))]
fn list(deps: Arc<MachinesDeps>, bearer: Option<String>) -> Result<Response, ApiError> {
    let principal = deps.common.principal(bearer.as_deref())?;
    let all = deps.common.store.view(machines::all)?;
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
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, or `not_found` (no such route)"),
    ))]
fn get_one(
    deps: Arc<MachinesDeps>,
    bearer: Option<String>,
    slug: String,
) -> Result<Response, ApiError> {
    let principal = deps.common.principal(bearer.as_deref())?;
    let (machine, access) = visible_machine(&deps.common, &principal, &slug)?;
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
    deps: &MachinesDeps,
    bearer: Option<&str>,
    slug: &str,
) -> Result<(Machine, Principal), ApiError> {
    let principal = deps.common.principal(bearer)?;
    let (machine, access) = visible_machine(&deps.common, &principal, slug)?;
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
        (status = 400, description = "`invalid_body`, `invalid_name`, `invalid_scope`, `invalid_expiry`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`: needs the owner or an admin key"),
        (status = 404, description = "`machine_not_found`, or `not_found` (no such route)"),
        (status = 413, description = "`payload_too_large`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn mint_key(
    deps: Arc<MachinesDeps>,
    bearer: Option<String>,
    slug: String,
    declared: Option<u64>,
    body: BodyStream,
) -> Result<Response, ApiError> {
    let (machine, principal) = require_admin(&deps, bearer.as_deref(), &slug)?;
    let bytes = read_body(declared, body, deps.max_json_bytes).await?;
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
    let (raw, record) = deps
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
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`"),
        (status = 404, description = "`machine_not_found`, or `not_found` (no such route)"),
    ))]
fn list_keys(
    deps: Arc<MachinesDeps>,
    bearer: Option<String>,
    slug: String,
) -> Result<Response, ApiError> {
    let (machine, _) = require_admin(&deps, bearer.as_deref(), &slug)?;
    let keys = deps.common.store.view(|txn| {
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
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`"),
        (status = 404, description = "`machine_not_found`, `key_not_found`, or `not_found` (no such route)"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn revoke_key(
    deps: Arc<MachinesDeps>,
    bearer: Option<String>,
    slug: String,
    id: String,
) -> Result<Response, ApiError> {
    let (machine, principal) = require_admin(&deps, bearer.as_deref(), &slug)?;
    let (machine_slug, actor) = (machine.slug.clone(), principal.actor());
    let record = deps
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
    deps.mqtt.key_revoked(&record.id);
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "key": key_json(&record)}),
    ))
}
