//! statebacked-shaped routes (specs 002/003): machine versions, instances, events, admin
//! views, and a live SSE stream per instance. Errors use statebacked's shape
//! `{"error": "<text>", "code": "<code>"}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Map, Value};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::openapi::schema::{
    AdminView, CreateInstanceRequest, CreateVersionRequest, DeleteInstanceRequest, Empty,
    InstanceList, InstanceView, SbMachine, SbMachineList, SendEventRequest, StatusBody,
    TargetVersionReply, TargetVersionRequest, TransitionList, VersionCreated, VersionList,
};
use super::InstancesDeps;
use super::{
    bearer, body, json_response, parse_json, read_body, visible_machine, with_gateway, ApiError,
    BodyStream,
};
use crate::auth::{Access, Principal, Slug};
use crate::chart::Event;
use crate::clock;
use crate::instances::{self as inst, InstanceError, Status};
use crate::machines::{self, Machine};

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list_machines,
    get_machine,
    create_version,
    list_versions,
    create_instance,
    list_instances,
    get_instance,
    send_event,
    list_events,
    admin_view,
    put_status,
    put_version,
    delete_instance,
    live
))]
pub(super) struct Api;

type Query = std::collections::HashMap<String, String>;
const PAGE: usize = 100;

/// A statebacked error.
pub(super) struct SbError(pub StatusCode, pub &'static str, pub String);

impl SbError {
    fn into_response(self) -> Response {
        json_response(self.0, &json!({"error": self.2, "code": self.1}))
    }
}

impl From<InstanceError> for SbError {
    fn from(e: InstanceError) -> Self {
        let (status, code) = e.status_code();
        let message = match &e {
            InstanceError::Chart(c) => format!("{} (at {})", c.message, c.path),
            other => other.to_string(),
        };
        SbError(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message,
        )
    }
}

impl From<crate::store::StoreError> for SbError {
    fn from(e: crate::store::StoreError) -> Self {
        InstanceError::Store(e).into()
    }
}

/// zeq-family errors from shared helpers (auth, body reading) in statebacked's shape.
impl From<ApiError> for SbError {
    fn from(e: ApiError) -> Self {
        let code = match e.code {
            "unauthorized" => "unauthorized",
            "machine_not_found" => "not-found",
            "payload_too_large" => "payload-too-large",
            "rate_limited" => "rate-limited",
            "invalid_body" => "invalid-parameters",
            "storage_full" => "storage-full",
            "storage_unavailable" => "unavailable",
            "forbidden" => "missing-scope",
            _ => "internal",
        };
        SbError(e.status, code, e.message)
    }
}

fn sb(result: Result<Response, SbError>) -> Response {
    result.unwrap_or_else(SbError::into_response)
}

fn missing_scope(what: &str) -> SbError {
    SbError(
        StatusCode::FORBIDDEN,
        "missing-scope",
        format!("this key's role cannot {what}"),
    )
}

fn bad(code: &'static str, message: impl Into<String>) -> SbError {
    SbError(StatusCode::BAD_REQUEST, code, message.into())
}

pub fn routes(
    deps: Arc<InstancesDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let g = move || with_gateway(deps.clone());
    let list = warp::path!("machines")
        .and(warp::get())
        .and(g())
        .and(bearer())
        .map(|deps, b| sb(list_machines(deps, b)));
    let one = warp::path!("machines" / String)
        .and(warp::get())
        .and(g())
        .and(bearer())
        .map(|m, deps, b| sb(get_machine(deps, b, m)));
    let new_version = warp::path!("machines" / String / "v")
        .and(warp::post())
        .and(g())
        .and(bearer())
        .and(body())
        .then(|m, deps, b, l, s| async move { sb(create_version(deps, b, m, l, s).await) });
    let versions = warp::path!("machines" / String / "v")
        .and(warp::get())
        .and(g())
        .and(bearer())
        .map(|m, deps, b| sb(list_versions(deps, b, m)));
    let create = warp::path!("machines" / String)
        .and(warp::post())
        .and(g())
        .and(bearer())
        .and(body())
        .then(|m, deps, b, l, s| async move { sb(create_instance(deps, b, m, l, s).await) });
    let instances = warp::path!("machines" / String / "i")
        .and(warp::get())
        .and(warp::query::<Query>())
        .and(g())
        .and(bearer())
        .map(|m, q, deps, b| sb(list_instances(deps, b, m, q)));
    let get = warp::path!("machines" / String / "i" / String)
        .and(warp::get())
        .and(g())
        .and(bearer())
        .map(|m, i, deps, b| sb(get_instance(deps, b, m, i)));
    let send = warp::path!("machines" / String / "i" / String / "events")
        .and(warp::post())
        .and(g())
        .and(bearer())
        .and(body())
        .then(|m, i, deps, b, l, s| async move { sb(send_event(deps, b, m, i, l, s).await) });
    let events = warp::path!("machines" / String / "i" / String / "events")
        .and(warp::get())
        .and(warp::query::<Query>())
        .and(g())
        .and(bearer())
        .map(|m, i, q, deps, b| sb(list_events(deps, b, m, i, q)));
    let admin = warp::path!("machines" / String / "i" / String / "admin")
        .and(warp::get())
        .and(g())
        .and(bearer())
        .map(|m, i, deps, b| sb(admin_view(deps, b, m, i)));
    let status = warp::path!("machines" / String / "i" / String / "status")
        .and(warp::put())
        .and(g())
        .and(bearer())
        .and(body())
        .then(|m, i, deps, b, l, s| async move { sb(put_status(deps, b, m, i, l, s).await) });
    let version = warp::path!("machines" / String / "i" / String / "v")
        .and(warp::put())
        .and(g())
        .and(bearer())
        .and(body())
        .then(|m, i, deps, b, l, s| async move { sb(put_version(deps, b, m, i, l, s).await) });
    let delete = warp::path!("machines" / String / "i" / String)
        .and(warp::delete())
        .and(g())
        .and(bearer())
        .and(body())
        .then(|m, i, deps, b, l, s| async move { sb(delete_instance(deps, b, m, i, l, s).await) });
    let live = warp::path!("machines" / String / "i" / String / "sse")
        .and(warp::get())
        .and(g())
        .and(bearer())
        .map(|m, i, deps, b| sb(live(deps, b, m, i)));
    list.or(one)
        .unify()
        .or(new_version)
        .unify()
        .or(versions)
        .unify()
        .or(create)
        .unify()
        .or(instances)
        .unify()
        .or(get)
        .unify()
        .or(send)
        .unify()
        .or(events)
        .unify()
        .or(admin)
        .unify()
        .or(status)
        .unify()
        .or(version)
        .unify()
        .or(delete)
        .unify()
        .or(live)
        .unify()
}

/// The machine and the caller's access, with `need` enforced.
fn machine_for(
    deps: &InstancesDeps,
    bearer: Option<&str>,
    slug: &str,
    need: Access,
    what: &str,
) -> Result<(Machine, Access, Principal), SbError> {
    let principal = deps.common.principal(bearer).map_err(ApiError::from)?;
    let (machine, access) = visible_machine(&deps.common, &principal, slug)?;
    if access < need {
        if principal == Principal::Anonymous {
            return Err(ApiError::unauthorized().into());
        }
        return Err(missing_scope(what));
    }
    if access >= Access::Operator && need >= Access::Operator {
        deps.limits
            .write
            .check(&machine.slug)
            .map_err(|s| SbError::from(deps.common.rate_limited(s)))?;
    } else if access < Access::Owner {
        deps.limits
            .read
            .check(&machine.slug)
            .map_err(|s| SbError::from(deps.common.rate_limited(s)))?;
    }
    Ok((machine, access, principal))
}

/// The `auth` value authorizers see.
fn auth_value(principal: &Principal, access: Access) -> Value {
    let role = match access {
        Access::Owner => "owner",
        Access::Admin => "admin",
        Access::Operator => "operator",
        Access::Viewer => "viewer",
        Access::Public => "public",
        Access::None => "none",
    };
    match principal {
        Principal::Account { zid, .. } => {
            json!({"sub": zid.as_str(), "zid": zid.as_str(), "role": role})
        }
        Principal::MachineKey { key_id, .. } => {
            json!({"sub": format!("key:{key_id}"), "role": role})
        }
        Principal::Anonymous => json!({"sub": null, "role": role}),
    }
}

fn version_json(v: &inst::Version) -> Value {
    json!({"id": v.id, "clientInfo": v.client_info, "createdAt": clock::rfc3339(v.created_ms), "number": v.number})
}

fn machine_json(deps: &InstancesDeps, m: &Machine) -> Result<Value, SbError> {
    let (meta, current) = deps.common.store.view(|txn| {
        let meta = inst::meta(txn, &m.slug)?;
        let current = match &meta.current_version {
            Some(id) => inst::version(txn, &m.slug, id)?,
            None => None,
        };
        Ok((meta, current))
    })?;
    Ok(json!({
        "slug": m.slug,
        "createdAt": clock::rfc3339(m.created_ms),
        "currentVersion": current.as_ref().map(version_json),
        "versions": meta.versions,
        "autoCreateInstances": meta.auto_create_instances,
    }))
}

/// The errors of every route that names a machine: who may call it and how often.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum SbMachineErrors {
    #[response(status = 401, description = "`unauthorized`")]
    Unauthorized,
    #[response(
        status = 403,
        description = "`missing-scope`, `rejected-by-machine-authorizer`"
    )]
    MissingScope,
    #[response(
        status = 404,
        description = "`not-found`, or `not_found` (no such route)"
    )]
    NotFound,
    #[response(status = 429, description = "`rate-limited`")]
    RateLimited,
}

/// Machines visible to the caller.
#[utoipa::path(get, path = "/machines", tag = "instances",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Machines", body = SbMachineList),
        (status = 401, description = "`unauthorized`"),
    ))]
fn list_machines(deps: Arc<InstancesDeps>, bearer: Option<String>) -> Result<Response, SbError> {
    let principal = deps
        .common
        .principal(bearer.as_deref())
        .map_err(ApiError::from)?;
    let all = deps.common.store.view(machines::all)?;
    let mut out = Vec::new();
    for m in all.iter().filter(|m| m.access(&principal) > Access::None) {
        out.push(machine_json(&deps, m)?);
    }
    Ok(json_response(StatusCode::OK, &json!({"machines": out})))
}

/// A machine with its current version.
#[utoipa::path(get, path = "/machines/{machine}", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The machine", body = SbMachine),
        SbMachineErrors,
    ))]
fn get_machine(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
) -> Result<Response, SbError> {
    let (machine, _, _) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Public,
        "read this machine",
    )?;
    Ok(json_response(
        StatusCode::OK,
        &machine_json(&deps, &machine)?,
    ))
}

async fn json_object(
    deps: &InstancesDeps,
    len: Option<u64>,
    body: BodyStream,
    limit: u64,
) -> Result<Map<String, Value>, SbError> {
    let _ = deps;
    let bytes = read_body(len, body, limit).await?;
    match parse_json(&bytes)? {
        Value::Object(o) => Ok(o),
        _ => Err(bad("invalid-parameters", "the body must be a JSON object")),
    }
}

/// Create a version from a statechart definition (admin).
#[utoipa::path(post, path = "/machines/{machine}/v", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug")),
    request_body = CreateVersionRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Created", body = VersionCreated),
        (status = 400, description = "`invalid-parameters`, `invalid-definition`, or a routing error"),
        (status = 413, description = "`payload-too-large`"),
        (status = 507, description = "`storage-full`"),
        SbMachineErrors,
    ))]
async fn create_version(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    len: Option<u64>,
    body: BodyStream,
) -> Result<Response, SbError> {
    let (machine, _, principal) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Admin,
        "create versions",
    )?;
    let body = json_object(&deps, len, body, inst::MAX_DEFINITION_BYTES as u64 + 4096).await?;
    let definition = body
        .get("definition")
        .ok_or_else(|| bad("invalid-parameters", "give the statechart as `definition`"))?;
    // Compile before the write: a bad definition never reaches the store.
    crate::chart::Chart::compile(definition).map_err(|e| SbError::from(InstanceError::from(e)))?;
    let text =
        serde_json::to_string(definition).map_err(|e| bad("invalid-parameters", e.to_string()))?;
    if text.len() > inst::MAX_DEFINITION_BYTES {
        return Err(bad(
            "invalid-parameters",
            format!(
                "definition is larger than {} bytes",
                inst::MAX_DEFINITION_BYTES
            ),
        ));
    }
    let client_info = match body.get("clientInfo") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 512 => Some(s.clone()),
        Some(_) => {
            return Err(bad(
                "invalid-parameters",
                "clientInfo must be a string of at most 512 bytes",
            ))
        }
    };
    let make_current = match body.get("makeCurrent") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("invalid-parameters", "makeCurrent must be a boolean")),
    };
    let auto_create = body.get("autoCreateInstances").and_then(Value::as_bool);
    let actor = principal.actor();
    let m = machine.slug.clone();
    let version = deps
        .writer
        .write(move |txn| -> Result<_, InstanceError> {
            let v = inst::create_version(
                txn,
                &m,
                &text,
                client_info,
                make_current,
                &actor,
                clock::now_ms(),
            )?;
            if let Some(on) = auto_create {
                inst::set_auto_create(txn, &m, on)?;
            }
            Ok(v)
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"machineVersionId": version.id, "number": version.number}),
    ))
}

/// The machine's versions (viewer).
#[utoipa::path(get, path = "/machines/{machine}/v", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Versions", body = VersionList),
        SbMachineErrors,
    ))]
fn list_versions(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
) -> Result<Response, SbError> {
    let (machine, _, _) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Viewer,
        "list versions",
    )?;
    let versions = deps
        .common
        .store
        .view(|txn| inst::versions(txn, &machine.slug))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"versions": versions.iter().map(version_json).collect::<Vec<_>>()}),
    ))
}

/// Create an instance at its initial state (operator).
#[utoipa::path(post, path = "/machines/{machine}", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug")),
    request_body = CreateInstanceRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The new instance", body = InstanceView),
        (status = 400, description = "`invalid-parameters`, `invalid-definition`, `transition-failed`, or a routing error"),
        (status = 409, description = "`invalid-state`"),
        (status = 413, description = "`payload-too-large`"),
        (status = 507, description = "`storage-full`"),
        SbMachineErrors,
    ))]
async fn create_instance(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    len: Option<u64>,
    body: BodyStream,
) -> Result<Response, SbError> {
    let (machine, access, principal) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Operator,
        "create instances",
    )?;
    let body = json_object(&deps, len, body, inst::MAX_CONTEXT_BYTES as u64 + 4096).await?;
    let instance = match body.get("slug") {
        Some(Value::String(s)) if inst::valid_instance_slug(s) => s.clone(),
        _ => {
            return Err(bad(
                "invalid-parameters",
                "slug must match ^[a-zA-Z0-9_-]{1,128}$",
            ))
        }
    };
    let context = match body.get("context") {
        None | Some(Value::Null) => json!({}),
        Some(Value::Object(o)) => Value::Object(o.clone()),
        Some(_) => return Err(bad("invalid-parameters", "context must be an object")),
    };
    let version_id = match body.get("machineVersionId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(bad(
                "invalid-parameters",
                "machineVersionId must be a string",
            ))
        }
    };
    let auth = auth_value(&principal, access);
    let (charts, actor, m) = (deps.charts.clone(), principal.actor(), machine.slug.clone());
    let (_, view, _) = deps
        .writer
        .write(move |txn| {
            inst::create_instance(
                txn,
                &charts,
                &m,
                &instance,
                context,
                version_id.as_deref(),
                &auth,
                &actor,
                clock::now_ms(),
            )
        })
        .await?;
    Ok(json_response(StatusCode::OK, &view))
}

/// The machine's instances, paged (viewer).
#[utoipa::path(get, path = "/machines/{machine}/i", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("limit" = Option<u32>, Query, description = "1–1000, default 100"), ("cursor" = Option<String>, Query, description = "From a previous page")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Instances", body = InstanceList),
        SbMachineErrors,
    ))]
fn list_instances(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    q: Query,
) -> Result<Response, SbError> {
    let (machine, _, _) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Viewer,
        "list instances",
    )?;
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(PAGE)
        .clamp(1, 1000);
    let list = deps.common.store.view(|txn| {
        inst::instances(
            txn,
            &machine.slug,
            q.get("cursor").map(String::as_str),
            limit,
        )
    })?;
    let cursor = (list.len() == limit)
        .then(|| list.last().map(|i| i.slug.clone()))
        .flatten();
    let items: Vec<Value> = list
        .iter()
        .map(|i| json!({"slug": i.slug, "createdAt": clock::rfc3339(i.created_ms), "status": i.status.as_str(),
                         "machineVersionId": i.version_id, "updatedAt": clock::rfc3339(i.ts_ms)}))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"instances": items, "cursor": cursor}),
    ))
}

/// The instance, its chart and state, or 404.
fn load(
    deps: &InstancesDeps,
    machine: &str,
    slug: &str,
) -> Result<
    (
        inst::Instance,
        Arc<crate::chart::Chart>,
        crate::chart::InstanceState,
    ),
    SbError,
> {
    let found = deps.common.store.view(|txn| {
        let Some(i) = inst::instance(txn, machine, slug)? else {
            return Ok(None);
        };
        let v = inst::version(txn, machine, &i.version_id)?;
        Ok(Some((i, v)))
    })?;
    let Some((instance, Some(version))) = found else {
        return Err(SbError(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no instance `{slug}`"),
        ));
    };
    let chart = deps.charts.get(&version)?;
    let state = serde_json::from_slice(&instance.state)
        .map_err(|e| SbError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok((instance, chart, state))
}

/// An instance's public view (the chart's `allowRead` decides).
#[utoipa::path(get, path = "/machines/{machine}/i/{instance}", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("instance" = String, Path, description = "Instance slug")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The instance", body = InstanceView),
        (status = 400, description = "`transition-failed` (authorizer error), or a routing error"),
        SbMachineErrors,
    ))]
fn get_instance(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    instance: String,
) -> Result<Response, SbError> {
    let (machine, access, principal) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Public,
        "read instances",
    )?;
    let (i, chart, state) = load(&deps, &machine.slug, &instance)?;
    allowed_to_read(&chart, &state, &auth_value(&principal, access))?;
    Ok(json_response(
        StatusCode::OK,
        &inst::public_view(&chart, &state, i.ts_ms),
    ))
}

/// `{"event": "NAME"}` or `{"event": {"type": "NAME", ...data}}`.
pub fn parse_event(body: &Map<String, Value>) -> Result<Event, String> {
    match body.get("event") {
        Some(Value::String(name)) if !name.is_empty() => Ok(Event::new(name.clone(), json!({}))),
        Some(Value::Object(o)) => {
            let name = o
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .ok_or("event.type must be a non-empty string")?;
            let mut data = o.clone();
            data.remove("type");
            Ok(Event::new(name, Value::Object(data)))
        }
        _ => Err("give `event` as a name or as {\"type\": name, ...data}".into()),
    }
}

/// Send an event; answers after the step committed (operator).
#[utoipa::path(post, path = "/machines/{machine}/i/{instance}/events", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("instance" = String, Path, description = "Instance slug")),
    request_body = SendEventRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The instance after the step", body = InstanceView),
        (status = 400, description = "`invalid-parameters`, `transition-failed`, or a routing error"),
        (status = 409, description = "`invalid-state`"),
        (status = 413, description = "`payload-too-large`"),
        (status = 507, description = "`storage-full`"),
        SbMachineErrors,
    ))]
async fn send_event(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    instance: String,
    len: Option<u64>,
    body: BodyStream,
) -> Result<Response, SbError> {
    let (machine, access, principal) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Operator,
        "send events",
    )?;
    let body = json_object(&deps, len, body, inst::MAX_CONTEXT_BYTES as u64).await?;
    let event = parse_event(&body).map_err(|m| bad("invalid-parameters", m))?;
    let auth = auth_value(&principal, access);
    let (charts, actor, m) = (deps.charts.clone(), principal.actor(), machine.slug.clone());
    let sent = deps
        .writer
        .write(move |txn| {
            inst::send_event(
                txn,
                &charts,
                &m,
                &instance,
                event,
                &auth,
                &actor,
                clock::now_ms(),
            )
        })
        .await?;
    deps.mqtt.committed(&machine.slug, &sent);
    Ok(json_response(StatusCode::OK, &sent.view))
}

/// The instance's transitions, paged (viewer).
#[utoipa::path(get, path = "/machines/{machine}/i/{instance}/events", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("instance" = String, Path, description = "Instance slug"), ("limit" = Option<u32>, Query, description = "1–1000, default 100"), ("cursor" = Option<String>, Query, description = "From a previous page")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Transitions", body = TransitionList),
        (status = 400, description = "`invalid-parameters`, or a routing error"),
        SbMachineErrors,
    ))]
fn list_events(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    instance: String,
    q: Query,
) -> Result<Response, SbError> {
    let (machine, _, _) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Viewer,
        "read transition history",
    )?;
    load(&deps, &machine.slug, &instance)?;
    let after = match q.get("cursor") {
        None => None,
        Some(c) => Some(c.parse::<u64>().map_err(|_| {
            bad(
                "invalid-parameters",
                "cursor must be a number from a previous page",
            )
        })?),
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(PAGE)
        .clamp(1, 1000);
    let records = deps
        .common
        .store
        .view(|txn| inst::history(txn, &machine.slug, &instance, after, limit))?;
    let cursor = (records.len() == limit)
        .then(|| records.last().map(|(n, _)| n.to_string()))
        .flatten();
    let items: Vec<Value> = records
        .iter()
        .map(|(n, r)| {
            let mut event = serde_json::from_slice::<Value>(&r.data).ok().filter(Value::is_object).unwrap_or_else(|| json!({}));
            if let Value::Object(o) = &mut event {
                o.insert("type".into(), json!(r.event));
            }
            json!({"n": n, "ts": r.ts_ms, "event": event, "from": r.from, "to": r.to, "seq": r.log_seq, "machineVersionId": r.version_id})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"events": items, "cursor": cursor}),
    ))
}

/// Full state, context and timers (admin).
#[utoipa::path(get, path = "/machines/{machine}/i/{instance}/admin", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("instance" = String, Path, description = "Instance slug")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Full state", body = AdminView),
        SbMachineErrors,
    ))]
fn admin_view(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    instance: String,
) -> Result<Response, SbError> {
    let (machine, _, _) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Admin,
        "read full instance state",
    )?;
    let (i, chart, state) = load(&deps, &machine.slug, &instance)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "ts": i.ts_ms, "state": chart.state_value(&state), "context": state.context, "tags": chart.tags(&state),
            "done": state.done, "output": state.output, "status": i.status.as_str(), "machineVersionId": i.version_id,
            "targetMachineVersionId": i.target_version_id, "configuration": chart.atomic_configuration(&state),
            "pendingTimers": state.timers.iter().map(|t| json!({"id": t.id, "due": t.due_ms, "event": t.event.name})).collect::<Vec<_>>(),
        }),
    ))
}

/// Pause or resume an instance (admin).
#[utoipa::path(put, path = "/machines/{machine}/i/{instance}/status", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("instance" = String, Path, description = "Instance slug")),
    request_body = StatusBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The new status", body = StatusBody),
        (status = 400, description = "`invalid-parameters`, or a routing error"),
        (status = 409, description = "`invalid-state`"),
        (status = 413, description = "`payload-too-large`"),
        (status = 507, description = "`storage-full`"),
        SbMachineErrors,
    ))]
async fn put_status(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    instance: String,
    len: Option<u64>,
    body: BodyStream,
) -> Result<Response, SbError> {
    let (machine, _, _) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Admin,
        "change instance status",
    )?;
    let body = json_object(&deps, len, body, 4096).await?;
    let status = match body.get("status").and_then(Value::as_str) {
        Some("paused") => Status::Paused,
        Some("running") => Status::Running,
        _ => {
            return Err(bad(
                "invalid-parameters",
                "status must be \"paused\" or \"running\"",
            ))
        }
    };
    let m = machine.slug.clone();
    let i = deps
        .writer
        .write(move |txn| inst::set_status(txn, &m, &instance, status))
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": i.status.as_str()}),
    ))
}

/// Set the version the instance migrates to (admin).
#[utoipa::path(put, path = "/machines/{machine}/i/{instance}/v", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("instance" = String, Path, description = "Instance slug")),
    request_body = TargetVersionRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The target", body = TargetVersionReply),
        (status = 400, description = "`invalid-parameters`, `no-migration-path`, or a routing error"),
        (status = 409, description = "`invalid-state`"),
        (status = 413, description = "`payload-too-large`"),
        (status = 507, description = "`storage-full`"),
        SbMachineErrors,
    ))]
async fn put_version(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    instance: String,
    len: Option<u64>,
    body: BodyStream,
) -> Result<Response, SbError> {
    let (machine, _, _) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Admin,
        "change instance versions",
    )?;
    let body = json_object(&deps, len, body, 4096).await?;
    let target = body
        .get("targetMachineVersionId")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("invalid-parameters", "give targetMachineVersionId"))?
        .to_owned();
    let (charts, m) = (deps.charts.clone(), machine.slug.clone());
    let i = deps
        .writer
        .write(move |txn| inst::set_target_version(txn, &charts, &m, &instance, &target))
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"targetMachineVersionId": i.target_version_id}),
    ))
}

/// Delete an instance and its history (admin).
#[utoipa::path(delete, path = "/machines/{machine}/i/{instance}", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("instance" = String, Path, description = "Instance slug")),
    request_body = DeleteInstanceRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Deleted", body = Empty),
        (status = 400, description = "`invalid-parameters`, or a routing error"),
        (status = 413, description = "`payload-too-large`"),
        (status = 507, description = "`storage-full`"),
        SbMachineErrors,
    ))]
async fn delete_instance(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    instance: String,
    len: Option<u64>,
    body: BodyStream,
) -> Result<Response, SbError> {
    let (machine, _, principal) = machine_for(
        &deps,
        bearer.as_deref(),
        &slug,
        Access::Admin,
        "delete instances",
    )?;
    let body = json_object(&deps, len, body, 4096).await?;
    if body.get("dangerDataWillBeDeletedForever") != Some(&Value::Bool(true)) {
        return Err(bad(
            "invalid-parameters",
            "confirm with {\"dangerDataWillBeDeletedForever\": true}",
        ));
    }
    let (m, actor) = (machine.slug.clone(), principal.actor());
    deps.writer
        .write(move |txn| inst::delete_instance(txn, &m, &instance, &actor, clock::now_ms()))
        .await?;
    Ok(json_response(StatusCode::OK, &json!({})))
}

/// Authorizes a live read of one instance: read access to the machine and the machine's
/// `allowRead` on the instance's current state. Returns the machine's slug and the `auth`
/// value to re-check `allowRead` with on each later state.
pub(super) fn authorize_live(
    deps: &InstancesDeps,
    bearer: Option<&str>,
    slug: &str,
    instance: &str,
) -> Result<(Slug, Value), SbError> {
    let (machine, access, principal) =
        machine_for(deps, bearer, slug, Access::Public, "read instances")?;
    let auth = auth_value(&principal, access);
    match current_view(deps, &machine.slug, instance, &auth)? {
        Some(_) => Ok((machine.slug, auth)),
        None => Err(SbError(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no instance {instance} of machine {slug}"),
        )),
    }
}

/// The chart's `allowRead` on `state` for the caller `auth`: 403 when it says no.
fn allowed_to_read(
    chart: &crate::chart::Chart,
    state: &crate::chart::InstanceState,
    auth: &Value,
) -> Result<(), SbError> {
    let allowed = chart
        .allow_read(state, auth)
        .map_err(|e| SbError::from(InstanceError::from(e)))?;
    if !allowed {
        return Err(SbError(
            StatusCode::FORBIDDEN,
            "rejected-by-machine-authorizer",
            "allowRead rejected this read".into(),
        ));
    }
    Ok(())
}

/// The instance's step count and public view (`{ts, state, publicContext, tags, done}`), or
/// `None` once it no longer exists. A state whose `allowRead` rejects `auth` is a 403.
pub(super) fn current_view(
    deps: &InstancesDeps,
    machine: &str,
    instance: &str,
    auth: &Value,
) -> Result<Option<(u64, Value)>, SbError> {
    let (i, chart, state) = match load(deps, machine, instance) {
        Ok(found) => found,
        Err(SbError(StatusCode::NOT_FOUND, ..)) => return Ok(None),
        Err(e) => return Err(e),
    };
    allowed_to_read(&chart, &state, auth)?;
    Ok(Some((i.steps, inst::public_view(&chart, &state, i.ts_ms))))
}

/// The instance's public view now and after every committed change (`instance-update`).
#[utoipa::path(get, path = "/machines/{machine}/i/{instance}/sse", tag = "instances",
    params(("machine" = String, Path, description = "Machine slug"), ("instance" = String, Path, description = "Instance slug")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid-parameters`, or a routing error"),
        SbMachineErrors,
    ))]
fn live(
    deps: Arc<InstancesDeps>,
    bearer: Option<String>,
    slug: String,
    instance: String,
) -> Result<Response, SbError> {
    let (m, auth) = authorize_live(&deps, bearer.as_deref(), &slug, &instance)?;
    let mut commits = deps.writer.subscribe();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<warp::sse::Event>(16);
    tokio::spawn(async move {
        let mut last_steps = None;
        loop {
            // Gone, or no longer readable under allowRead: the stream ends.
            let Ok(Some((steps, view))) = current_view(&deps, &m, &instance, &auth) else {
                return;
            };
            if last_steps != Some(steps) {
                last_steps = Some(steps);
                let event = warp::sse::Event::default()
                    .event("instance-update")
                    .id(steps.to_string())
                    .data(view.to_string());
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = commits.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>))
    });
    Ok(warp::sse::reply(
        warp::sse::keep_alive()
            .interval(Duration::from_secs(15))
            .stream(stream),
    )
    .into_response())
}
