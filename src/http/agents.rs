//! Spec 004 routes: agent runs under `/api/zeq/agent/`, the tally under `/api/tally/`, and BYOK
//! credentials. Handlers parse, call `crate::agents`, and map its errors to the zeq shape.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use warp::reply::Response;
use warp::Filter;

use super::openapi::schema::{
    AgentList, AgentStatus, CredentialCreated, CredentialRequest, Killed, Lineage, Mesh,
    SpawnRequest as SpawnBody, Spawned, Tally, Ticked,
};
use super::AgentsDeps;
use super::{
    bearer, body, json_response, parse_json, read_body, respond, with_gateway, Answer, ApiError,
    BodyStream,
};
use crate::agents::{self, byok, read, AgentError, Enrichment, Run, SpawnContext, SpawnRequest};
use crate::auth::{Access, Principal, Slug, Zid};
use crate::clock;
use crate::machines;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        spawn, tick, tick_by_id, kill, kill_by_id, list, status, lineage, mesh, tally, credential
    ),
    components(schemas(Ticked, Killed))
)]
pub(super) struct Api;

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        let message = e.to_string();
        match e {
            AgentError::Invalid { code, .. } => ApiError::bad_request(code, message),
            AgentError::Unauthorized => ApiError::unauthorized(),
            AgentError::InsufficientBalance { balance, required } => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "INSUFFICIENT_BALANCE",
                message,
            )
            .with("balance", json!(balance))
            .with("required", json!(required)),
            AgentError::NotChainMember(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "not_chain_member", message)
            }
            AgentError::Forbidden(_) => ApiError::forbidden(message),
            AgentError::MachineNotFound => ApiError::machine_not_found(),
            AgentError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "agent_not_found", message)
            }
            AgentError::CredentialNotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "credential_not_found", message)
            }
            AgentError::QuotaExceeded { limit } => {
                ApiError::new(StatusCode::CONFLICT, "quota_exceeded", message)
                    .with("limit", json!(limit))
            }
            AgentError::Done { status } => {
                ApiError::new(StatusCode::CONFLICT, "agent_done", message)
                    .with("status", json!(status))
            }
            AgentError::AlreadyDead { status } => {
                ApiError::new(StatusCode::CONFLICT, "agent_already_dead", message)
                    .with("status", json!(status))
            }
            AgentError::TooSoon { zeqond } => {
                ApiError::new(StatusCode::CONFLICT, "tick_too_soon", message)
                    .with("last_tick_zeqond", json!(zeqond))
                    .with("next_zeqond", json!(zeqond + 1))
            }
            AgentError::Machine(m) => m.into(),
            AgentError::Store(s) => s.into(),
        }
    }
}

pub fn routes(
    deps: Arc<AgentsDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let g = move || with_gateway(deps.clone());
    let spawn = warp::path!("api" / "zeq" / "agent" / "spawn")
        .and(warp::post())
        .and(g())
        .and(bearer())
        .and(body())
        .then(
            |deps, bearer, len, body| async move { respond(spawn(deps, bearer, len, body).await) },
        );
    let tick = warp::path!("api" / "zeq" / "agent" / "tick" / String)
        .and(warp::post())
        .and(g())
        .and(bearer())
        .then(|id, deps, bearer| async move { respond(tick(deps, bearer, id).await) });
    let tick_by_id = warp::path!("api" / "zeq" / "agent" / String / "tick")
        .and(warp::post())
        .and(g())
        .and(bearer())
        .then(|id, deps, bearer| async move { respond(tick_by_id(deps, bearer, id).await) });
    let kill = warp::path!("api" / "zeq" / "agent" / "kill" / String)
        .and(warp::post())
        .and(g())
        .and(bearer())
        .then(|id, deps, bearer| async move { respond(kill(deps, bearer, id).await) });
    let kill_by_id = warp::path!("api" / "zeq" / "agent" / String / "kill")
        .and(warp::post())
        .and(g())
        .and(bearer())
        .then(|id, deps, bearer| async move { respond(kill_by_id(deps, bearer, id).await) });
    let list = warp::path!("api" / "zeq" / "agent" / "list")
        .and(warp::get())
        .and(g())
        .and(bearer())
        .then(|deps, bearer| async move { respond(list(deps, bearer)) });
    let view = warp::path!("api" / "zeq" / "agent" / String / String)
        .and(warp::get())
        .and(g())
        .and(bearer())
        .and_then(
            |what: String, id: String, deps: Arc<AgentsDeps>, bearer: Option<String>| async move {
                let answer = match what.as_str() {
                    "status" => status(deps, bearer, id),
                    "lineage" => lineage(deps, bearer, id),
                    "mesh" => mesh(deps, bearer, id),
                    _ => return Err(warp::reject::not_found()),
                };
                Ok::<_, warp::Rejection>(respond(answer))
            },
        );
    let tally = warp::path!("api" / "tally" / "account" / String)
        .and(warp::get())
        .and(g())
        .and(bearer())
        .then(|zid, deps, bearer| async move { respond(tally(deps, bearer, zid)) });
    let credentials = warp::path!("api" / "zeq" / "credentials")
        .and(warp::post())
        .and(g())
        .and(bearer())
        .and(body())
        .then(|deps, bearer, len, body| async move {
            respond(credential(deps, bearer, len, body).await)
        });
    spawn
        .or(tick)
        .unify()
        .or(tick_by_id)
        .unify()
        .or(kill)
        .unify()
        .or(kill_by_id)
        .unify()
        .or(list)
        .unify()
        .or(view)
        .unify()
        .or(tally)
        .unify()
        .or(credentials)
        .unify()
}

#[allow(clippy::result_large_err)]
fn caller(deps: &AgentsDeps, bearer: Option<&str>) -> Result<Principal, ApiError> {
    match deps.common.principal(bearer)? {
        Principal::Anonymous => Err(ApiError::unauthorized()),
        p => Ok(p),
    }
}

/// Asks the run's model when it has a credential that the payer owns; otherwise nothing.
async fn enrichment(
    deps: &AgentsDeps,
    credential_id: Option<&str>,
    payer: Option<&Zid>,
    problem: &str,
    best: Option<Vec<&'static str>>,
) -> Result<Enrichment, ApiError> {
    let Some(id) = credential_id else {
        return Ok(Enrichment::default());
    };
    let cred = deps.common.store.view(|txn| byok::credential(txn, id))?;
    match cred {
        Some(c) if Some(&c.owner) == payer => {
            Ok(deps.agents.enrich(Some(&c), problem, best.as_deref()).await)
        }
        // The write refuses it (404 credential_not_found) or records the fallback.
        _ => Ok(Enrichment::default()),
    }
}

/// Spawn an agent run (and its machine when `slug` names none); charges the tally.
#[utoipa::path(post, path = "/api/zeq/agent/spawn", tag = "agents",
    request_body = SpawnBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Spawned", body = Spawned),
        (status = 400, description = "`invalid_body`, `invalid_problem`, `invalid_population`, …"),
        (status = 401, description = "`unauthorized`"),
        (status = 402, description = "`INSUFFICIENT_BALANCE` (with `balance`, `required`)"),
        (status = 403, description = "`forbidden`, `not_chain_member`"),
        (status = 404, description = "`agent_not_found`, `credential_not_found`, `machine_not_found`, or `not_found`"),
        (status = 409, description = "`quota_exceeded`, `agent_done`, `agent_already_dead`, `tick_too_soon`, `slug_taken`"),
        (status = 413, description = "`payload_too_large`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn spawn(
    deps: Arc<AgentsDeps>,
    bearer: Option<String>,
    declared: Option<u64>,
    body: BodyStream,
) -> Result<Response, ApiError> {
    let principal = caller(&deps, bearer.as_deref())?;
    let bytes = read_body(declared, body, deps.max_json_bytes).await?;
    let request = SpawnRequest::from_json(&parse_json(&bytes)?)?;
    let payer = match &principal {
        Principal::Account { zid, .. } => Some(zid.clone()),
        Principal::MachineKey { slug, .. } => {
            let target = request.slug.clone().unwrap_or_else(|| slug.clone());
            deps.common
                .store
                .view(|txn| machines::get(txn, &target))?
                .map(|m| m.owner_zid)
        }
        Principal::Anonymous => None,
    };
    let enrichment = enrichment(
        &deps,
        request.credential_id.as_deref(),
        payer.as_ref(),
        &request.problem,
        None,
    )
    .await?;
    let agent_id = uuid::Uuid::new_v4().to_string();
    let max_live = deps.agents.config.max_live_per_account;
    let defaults = deps.defaults.clone();
    let spawned = deps
        .writer
        .write(move |txn| {
            let ctx = SpawnContext {
                principal: &principal,
                agent_id,
                max_live,
                defaults: &defaults,
                enrichment,
                now_ms: clock::now_ms(),
            };
            agents::spawn(txn, request, ctx)
        })
        .await?;
    deps.agents.wake.notify_one();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "ok": true,
            "agent_id": spawned.run.id,
            "agent_zid": spawned.run.agent_zid,
            "slug": spawned.run.slug,
            "machine_created": spawned.machine_created,
            "status": spawned.run.status.as_str(),
            "tally_charge": spawned.charge.to_json(),
            "first_tick": spawned.first_tick.as_ref().map(agents::Tick::to_json),
        }),
    ))
}

/// The run and the caller's access to it; runs the caller cannot see are 404.
#[allow(clippy::result_large_err)]
fn visible_run(
    deps: &AgentsDeps,
    principal: &Principal,
    id: &str,
) -> Result<(Run, Access), ApiError> {
    let found = deps.common.store.view(|txn| {
        let Some(run) = read::run(txn, id)? else {
            return Ok(None);
        };
        let machine = machines::get(txn, &run.slug)?;
        Ok(Some((run, machine)))
    })?;
    let Some((run, machine)) = found else {
        return Err(AgentError::NotFound.into());
    };
    let access = agents::run_access(machine.as_ref(), &run, principal);
    if access < Access::Viewer {
        return Err(AgentError::NotFound.into());
    }
    Ok((run, access))
}

fn admin(access: Access, what: &str) -> Result<(), ApiError> {
    if access >= Access::Admin {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "{what} needs the run's owner or an admin key of its machine"
        )))
    }
}

/// What a tick answers besides [`RunErrors`] (one declaration for its two paths).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum TickAnswers {
    #[response(status = 200, description = "The tick")]
    Ticked(Ticked),
    #[response(
        status = 402,
        description = "`INSUFFICIENT_BALANCE` (with `balance`, `required`)"
    )]
    InsufficientBalance,
}

/// The errors of a write to a run (tick, kill, on either of their paths).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum RunErrors {
    #[response(status = 401, description = "`unauthorized`")]
    Unauthorized,
    #[response(status = 403, description = "`forbidden`, `not_chain_member`")]
    Forbidden,
    #[response(
        status = 404,
        description = "`agent_not_found`, `credential_not_found`, `machine_not_found`, or `not_found`"
    )]
    NotFound,
    #[response(
        status = 409,
        description = "`quota_exceeded`, `agent_done`, `agent_already_dead`, `tick_too_soon`, `slug_taken`"
    )]
    Conflict,
    #[response(status = 507, description = "`storage_full`")]
    StorageFull,
}

/// Run one generation now (run owner or machine admin).
#[utoipa::path(post, path = "/api/zeq/agent/tick/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent run id")),
    security(("bearer" = [])),
    responses(TickAnswers, RunErrors))]
async fn tick(
    deps: Arc<AgentsDeps>,
    bearer: Option<String>,
    id: String,
) -> Result<Response, ApiError> {
    let principal = caller(&deps, bearer.as_deref())?;
    let (run, access) = visible_run(&deps, &principal, &id)?;
    admin(access, "ticking")?;
    if !run.is_live() {
        return Err(AgentError::Done {
            status: run.status.as_str(),
        }
        .into());
    }
    let best = run.search.best.as_ref().map(|b| b.genotype.operators());
    let enrichment = enrichment(
        &deps,
        run.credential_id.as_deref(),
        Some(&run.payer),
        &run.problem,
        best,
    )
    .await?;
    let actor = principal.actor();
    // The ticker usually has ticked this Zeqond already: then this tick claims the next
    // Zeqond (the ticker leaves the run alone there) and waits for it.
    let mut attempt = 0;
    let outcome = loop {
        let (run_id, actor, e) = (id.clone(), actor.clone(), enrichment.clone());
        let outcome = deps
            .writer
            .write(move |txn| agents::tick(txn, &run_id, "manual", &actor, e, clock::now_ms()))
            .await;
        match outcome {
            Err(AgentError::TooSoon { zeqond }) if attempt < 2 => {
                attempt += 1;
                if let Ok(mut claims) = deps.agents.claims.lock() {
                    claims.insert(id.clone(), zeqond + 1);
                }
                let wait = ((zeqond + 1) as i64 * clock::ZEQOND_MS - clock::now_ms()).max(0) + 1;
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
            other => break other,
        }
    };
    if let Ok(mut claims) = deps.agents.claims.lock() {
        claims.remove(&id);
    }
    let done = outcome?;
    let mut body = done.to_json();
    if let Value::Object(o) = &mut body {
        o.insert("ok".into(), json!(true));
        o.insert("agent_id".into(), json!(run.id));
        o.insert("tally_charge".into(), done.charge.to_json());
    }
    Ok(json_response(StatusCode::OK, &body))
}

/// Same as `/api/zeq/agent/tick/{id}`.
#[utoipa::path(post, path = "/api/zeq/agent/{id}/tick", tag = "agents",
    params(("id" = String, Path, description = "Agent run id")),
    security(("bearer" = [])),
    responses(TickAnswers, RunErrors))]
async fn tick_by_id(deps: Arc<AgentsDeps>, bearer: Option<String>, id: String) -> Answer {
    tick(deps, bearer, id).await
}

/// Stop a run (run owner or machine admin).
#[utoipa::path(post, path = "/api/zeq/agent/kill/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent run id")),
    security(("bearer" = [])),
    responses((status = 200, description = "Killed", body = Killed), RunErrors))]
async fn kill(
    deps: Arc<AgentsDeps>,
    bearer: Option<String>,
    id: String,
) -> Result<Response, ApiError> {
    let principal = caller(&deps, bearer.as_deref())?;
    let (_, access) = visible_run(&deps, &principal, &id)?;
    admin(access, "killing")?;
    let actor = principal.actor();
    let run_id = id.clone();
    let (zeqond, transition_id) = deps
        .writer
        .write(move |txn| agents::kill(txn, &run_id, &actor, clock::now_ms()))
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "agent_id": id, "killed_at_zeqond": zeqond, "transition_id": transition_id}),
    ))
}

/// Same as `/api/zeq/agent/kill/{id}`.
#[utoipa::path(post, path = "/api/zeq/agent/{id}/kill", tag = "agents",
    params(("id" = String, Path, description = "Agent run id")),
    security(("bearer" = [])),
    responses((status = 200, description = "Killed", body = Killed), RunErrors))]
async fn kill_by_id(deps: Arc<AgentsDeps>, bearer: Option<String>, id: String) -> Answer {
    kill(deps, bearer, id).await
}

/// The caller's runs (account: its own; machine key: its machine's).
#[utoipa::path(get, path = "/api/zeq/agent/list", tag = "agents",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Runs", body = AgentList),
        (status = 401, description = "`unauthorized`"),
    ))]
fn list(deps: Arc<AgentsDeps>, bearer: Option<String>) -> Result<Response, ApiError> {
    let principal = caller(&deps, bearer.as_deref())?;
    let runs = match &principal {
        Principal::Account { zid, .. } => deps
            .common
            .store
            .view(|txn| read::by_account(txn, zid.as_str()))?,
        Principal::MachineKey { slug, .. } => {
            deps.common.store.view(|txn| read::by_machine(txn, slug))?
        }
        Principal::Anonymous => Vec::new(),
    };
    let live = runs.iter().filter(|r| r.is_live()).count();
    let agents: Vec<Value> = runs.iter().map(Run::to_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "count": agents.len(), "live": live, "agents": agents}),
    ))
}

/// The run `id`, if the caller may see it.
#[allow(clippy::result_large_err)]
fn seen_run(
    deps: &AgentsDeps,
    bearer: Option<String>,
    id: &str,
) -> Result<(Run, Principal), ApiError> {
    let principal = caller(deps, bearer.as_deref())?;
    let (run, _) = visible_run(deps, &principal, id)?;
    Ok((run, principal))
}

/// A run: status, best genotype, fitness, charges.
#[utoipa::path(get, path = "/api/zeq/agent/status/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent run id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The run", body = AgentStatus),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`agent_not_found`, `credential_not_found`, `machine_not_found`, or `not_found`"),
    ))]
#[allow(clippy::result_large_err)]
fn status(deps: Arc<AgentsDeps>, bearer: Option<String>, id: String) -> Result<Response, ApiError> {
    let (run, _) = seen_run(&deps, bearer, &id)?;
    let mut v = run.to_json();
    if let Value::Object(o) = &mut v {
        o.insert("ok".into(), json!(true));
    }
    Ok(json_response(StatusCode::OK, &v))
}

/// A run's generations.
#[utoipa::path(get, path = "/api/zeq/agent/lineage/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent run id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Generations", body = Lineage),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`agent_not_found`, `credential_not_found`, `machine_not_found`, or `not_found`"),
    ))]
#[allow(clippy::result_large_err)]
fn lineage(
    deps: Arc<AgentsDeps>,
    bearer: Option<String>,
    id: String,
) -> Result<Response, ApiError> {
    let (run, _) = seen_run(&deps, bearer, &id)?;
    let problem = agents::problem::Problem::parse(&run.problem);
    let generations = deps.common.store.view(|txn| read::lineage(txn, &run.id))?;
    let lineage: Vec<Value> = generations.iter().map(|g| g.to_json(&problem)).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "agent_id": run.id, "problem": run.problem, "status": run.status.as_str(), "lineage": lineage}),
    ))
}

/// A master run and the children the caller may see.
#[utoipa::path(get, path = "/api/zeq/agent/mesh/{id}", tag = "agents",
    params(("id" = String, Path, description = "Agent run id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The mesh", body = Mesh),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`agent_not_found`, `credential_not_found`, `machine_not_found`, or `not_found`"),
    ))]
#[allow(clippy::result_large_err)]
fn mesh(deps: Arc<AgentsDeps>, bearer: Option<String>, id: String) -> Result<Response, ApiError> {
    let (run, principal) = seen_run(&deps, bearer, &id)?;
    let children = deps.common.store.view(|txn| {
        let mut out = Vec::new();
        for child in read::mesh(txn, &run.id)? {
            let machine = machines::get(txn, &child.slug)?;
            if agents::run_access(machine.as_ref(), &child, &principal) >= Access::Viewer {
                out.push(child.to_json());
            }
        }
        Ok(out)
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "master_id": run.id, "master": run.to_json(), "count": children.len(), "children": children}),
    ))
}

/// An account's balance and spending (its own account key only).
#[utoipa::path(get, path = "/api/tally/account/{zid}", tag = "agents",
    params(("zid" = String, Path, description = "ZEQ and 11 digits")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The tally", body = Tally),
        (status = 400, description = "`invalid_zid`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`, `not_chain_member`"),
        (status = 404, description = "`account_not_found`, or `not_found`"),
    ))]
fn tally(deps: Arc<AgentsDeps>, bearer: Option<String>, zid: String) -> Result<Response, ApiError> {
    let principal = caller(&deps, bearer.as_deref())?;
    let zid = Zid::parse(&zid)
        .ok_or_else(|| ApiError::bad_request("invalid_zid", "a ZID is ZEQ and 11 digits"))?;
    if !matches!(&principal, Principal::Account { zid: z, .. } if *z == zid) {
        return Err(ApiError::forbidden(
            "an account's tally is visible only with its own account key",
        ));
    }
    let (account, slugs, runs, live) = deps.common.store.view(|txn| {
        let account = crate::auth::account(txn, zid.as_str())?;
        let slugs: Vec<Slug> = machines::all(txn)?
            .into_iter()
            .filter(|m| m.owner_zid == zid)
            .map(|m| m.slug)
            .collect();
        let runs = read::by_account(txn, zid.as_str())?;
        let live = read::live_count(txn, zid.as_str())?;
        Ok((account, slugs, runs, live))
    })?;
    let account = account.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "account_not_found",
            "no such account",
        )
    })?;
    let spent: i64 = runs.iter().map(|r| r.charged).sum();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "ok": true,
            "zid": zid,
            "balance": account.balance,
            "machines": slugs.len(),
            "slugs": slugs,
            "agents": runs.len(),
            "live_agents": live,
            "spent_on_agents": spent,
            "costs": {"spawn": agents::SPAWN_COST, "tick": agents::TICK_COST},
        }),
    ))
}

/// Store a BYOK model credential, sealed (account keys only).
#[utoipa::path(post, path = "/api/zeq/credentials", tag = "agents",
    request_body = CredentialRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored", body = CredentialCreated),
        (status = 400, description = "`invalid_body`, `invalid_base_url`, `invalid_api_key`, `invalid_model`, `invalid_name`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`, `not_chain_member`"),
        (status = 413, description = "`payload_too_large`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn credential(
    deps: Arc<AgentsDeps>,
    bearer: Option<String>,
    declared: Option<u64>,
    body: BodyStream,
) -> Result<Response, ApiError> {
    let principal = caller(&deps, bearer.as_deref())?;
    let Principal::Account { zid, .. } = principal else {
        return Err(ApiError::forbidden(
            "credentials belong to accounts: use an account key (zeq_ak_…)",
        ));
    };
    let bytes = read_body(declared, body, deps.max_json_bytes).await?;
    let cred = byok::new_credential(&deps.agents, &zid, &parse_json(&bytes)?, clock::now_ms())?;
    let reply = json!({"ok": true, "credential_id": cred.id, "name": cred.name, "created_at": clock::rfc3339(cred.created_ms)});
    deps.writer
        .write(move |txn| byok::store_credential(txn, &cred))
        .await?;
    Ok(json_response(StatusCode::CREATED, &reply))
}
