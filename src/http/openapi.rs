//! `GET /api/openapi.json`: the OpenAPI 3.1 document of every route.
//!
//! Nothing here lists routes. Each API file declares its operations with `#[utoipa::path]` on
//! the handler that answers them, right beside the warp filter that serves it, and gathers
//! them in its own `Api` (`#[derive(utoipa::OpenApi)]`); [`document`] merges those. A handler
//! lists its error statuses with the codes each can carry; the error bodies are declared once,
//! here ([`Errors`], [`error_body`]).
//! The schemas below are the shapes the handlers answer with; schemathesis (`.ci/run`, stage k)
//! checks every response of a live gateway against them, and `tests/openapi.rs` checks that the
//! router and the document name the same (method, path) pairs.

use std::sync::OnceLock;

use http::StatusCode;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi, Response as DocResponse};
use warp::reply::Response;

/// The document: every API file's operations, the bearer scheme, and the error responses that
/// any operation can give because of the store (503 while it reopens).
pub fn document() -> OpenApi {
    use utoipa::OpenApi as _;
    let mut doc = super::ops::Api::openapi();
    doc.merge(super::machines::Api::openapi());
    doc.merge(super::chain::Api::openapi());
    doc.merge(super::mqtt::Api::openapi());
    doc.merge(super::pages::Api::openapi());
    doc.merge(super::instances::Api::openapi());
    doc.merge(super::agents::Api::openapi());
    doc.merge(super::sync::Api::openapi());
    doc.merge(super::console::Api::openapi());
    doc.merge(super::rt::Api::openapi());
    doc.merge(Errors::openapi());
    doc.info = utoipa::openapi::InfoBuilder::new()
        .title("smgate")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "A state-machine host for IoT gateways: the zeq chain API (specs 000, 001, 004), \
             statebacked-shaped machines and instances (specs 002, 003), the public page site, \
             and operations. Errors of the zeq family are `{ok: false, error, message}`; of the \
             statebacked family `{error, code}`; routing errors (no such route) are zeq-shaped \
             everywhere.",
        ))
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    let unavailable = DocResponse::builder()
        .description("`storage_unavailable` / `unavailable`: the store is reopening; retry")
        .build();
    for item in doc.paths.paths.values_mut() {
        // HEAD answers carry no body.
        let with_bodies = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in with_bodies.into_iter().filter_map(Option::as_mut) {
            add_error_bodies(op);
        }
        for op in operations(item) {
            // Handler names repeat across files (`list`): prefix the tag to keep ids unique.
            let tag = tag_of(op);
            if let Some(id) = &mut op.operation_id {
                *id = format!("{tag}.{id}");
            }
            op.responses
                .responses
                .entry("503".into())
                .or_insert_with(|| unavailable.clone().into());
        }
    }
    doc
}

/// The error bodies, declared once for every operation (see [`error_body`]).
#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(schema::ZeqError, schema::SbError, schema::SbOrRouteError)))]
struct Errors;

/// The body of an error answer (4xx, 5xx) of an operation tagged `tag`: the statebacked
/// routes (`instances`) answer `{error, code}`, except that a request the router cannot match
/// (400, 404) is answered zeq-shaped, so those two may be either; every other area answers
/// `{ok: false, error, message}`. 503 is added to every operation without a body by
/// [`document`]. A handler whose answer differs declares its body itself (`/rt`, the site).
fn error_body(tag: &str, status: &str) -> Option<&'static str> {
    let code: u16 = status.parse().ok()?;
    match (tag, code) {
        (_, 503) | (_, ..=399) => None,
        ("instances", 400 | 404) => Some("SbOrRouteError"),
        ("instances", _) => Some("SbError"),
        _ => Some("ZeqError"),
    }
}

/// Gives each error response that its handler declared without a body the body of its area.
fn add_error_bodies(op: &mut utoipa::openapi::path::Operation) {
    use utoipa::openapi::{Content, Ref, RefOr};
    let tag = tag_of(op);
    for (status, response) in op.responses.responses.iter_mut() {
        let (RefOr::T(response), Some(name)) = (response, error_body(&tag, status)) else {
            continue;
        };
        if response.content.is_empty() {
            let body = Content::new(Some(Ref::from_schema_name(name)));
            response.content.insert("application/json".into(), body);
        }
    }
}

/// The operation's first tag: its API area.
fn tag_of(op: &utoipa::openapi::path::Operation) -> String {
    op.tags
        .as_ref()
        .and_then(|t| t.first())
        .cloned()
        .unwrap_or_default()
}

fn operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// Every (METHOD, path template) of the document, e.g. `("GET", "/machines/{machine}")`.
pub fn route_table() -> Vec<(String, String)> {
    let doc = document();
    let mut out = Vec::new();
    for (path, item) in &doc.paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("PUT", item.put.is_some()),
            ("POST", item.post.is_some()),
            ("DELETE", item.delete.is_some()),
            ("HEAD", item.head.is_some()),
            ("PATCH", item.patch.is_some()),
        ];
        for (m, present) in methods {
            if present {
                out.push((m.to_string(), path.clone()));
            }
        }
    }
    out
}

/// The document as JSON, rendered once.
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        document()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    })
}

/// The route template a request path belongs to (a documented path, `{param}` segments
/// matching any one segment), so that metric labels stay few whatever the slugs are. Paths
/// that no route serves are `other`.
pub fn route_template(path: &str) -> &'static str {
    static TEMPLATES: OnceLock<Vec<(&'static str, Vec<&'static str>)>> = OnceLock::new();
    // Built once; the leaked strings are the few dozen documented paths.
    let templates = TEMPLATES.get_or_init(|| {
        let mut paths: Vec<&'static str> = route_table()
            .into_iter()
            .map(|(_, p)| &*Box::leak(p.into_boxed_str()))
            .collect();
        paths.sort_unstable();
        paths.dedup();
        paths
            .into_iter()
            .map(|p| (p, p.split('/').collect()))
            .collect()
    });
    let segs: Vec<&str> = path.split('/').collect();
    let matches = |t: &[&str]| {
        t.len() == segs.len()
            && t.iter().zip(&segs).all(|(t, s)| {
                if t.starts_with('{') {
                    !s.is_empty()
                } else {
                    t == s
                }
            })
    };
    // Literal segments win over parameters (`/api/zeq/agent/list` over `…/{id}/…`).
    let mut best: Option<(&'static str, usize)> = None;
    for (t, parts) in templates {
        // `/ui/{path}` takes the rest of the path, slashes included.
        let wildcard_tail = parts.last() == Some(&"{path}")
            && segs.len() >= parts.len()
            && parts[..parts.len() - 1] == segs[..parts.len() - 1];
        if matches(parts) || wildcard_tail {
            let params = parts.iter().filter(|p| p.starts_with('{')).count();
            if best.is_none_or(|(_, n)| params < n) {
                best = Some((t, params));
            }
        }
    }
    best.map(|(t, _)| t).unwrap_or("other")
}

/// This document.
#[utoipa::path(operation_id = "openapi", get, path = "/api/openapi.json", tag = "ops",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = serde_json::Value)))]
pub fn reply() -> Response {
    let mut res = Response::new(json().into());
    *res.status_mut() = StatusCode::OK;
    if let Ok(v) = "application/json".parse() {
        res.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::route_template;

    #[test]
    fn templates_hide_slugs_and_prefer_literal_segments() {
        let cases = [
            (
                "/api/chain/state-machines/abc",
                "/api/chain/state-machines/{slug}",
            ),
            (
                "/api/chain/x/api-keys/123",
                "/api/chain/{slug}/api-keys/{id}",
            ),
            ("/api/zeq/agent/list", "/api/zeq/agent/list"),
            ("/api/zeq/agent/abc/tick", "/api/zeq/agent/{id}/tick"),
            ("/api/zeq/agent/tick/abc", "/api/zeq/agent/tick/{id}"),
            (
                "/machines/m1/i/dev-7/events",
                "/machines/{machine}/i/{instance}/events",
            ),
            ("/s/kitchen/p/home/", "/s/{slug}/p/{page}/"),
            ("/ui/js/app.js", "/ui/{path}"),
            ("/ui/", "/ui/"),
            ("/", "/"),
            ("/nope/x", "other"),
            ("/machines//i", "other"),
        ];
        for (path, template) in cases {
            assert_eq!(route_template(path), template, "{path}");
        }
    }
}

/// Response and request shapes. They are declarations for the document; handlers build the
/// same fields with `json!` and schemathesis holds the two together.
#[allow(dead_code)]
pub mod schema {
    use serde::Serialize;
    use serde_json::Value;
    use utoipa::ToSchema;

    /// Error of the zeq family (and of routing: no such route, wrong method). Some codes add
    /// fields: `retry_after` (429), `existing_slug` (409 `slug_taken`), `field`/`limit` (413),
    /// `balance`/`required` (402), `status` (409 agent), `last_tick_zeqond`/`next_zeqond`.
    #[derive(Serialize, ToSchema)]
    pub struct ZeqError {
        /// Always `false`.
        pub ok: bool,
        /// The stable error code, e.g. `unauthorized`, `machine_not_found`, `rate_limited`.
        pub error: String,
        /// What went wrong and what to do.
        pub message: String,
    }

    /// Error of the statebacked family (`/machines/…`).
    #[derive(Serialize, ToSchema)]
    pub struct SbError {
        /// What went wrong.
        pub error: String,
        /// The stable code, e.g. `unauthorized`, `missing-scope`, `not-found`,
        /// `invalid-parameters`, `invalid-definition`, `rate-limited`.
        pub code: String,
    }

    /// A statebacked error, or a routing error (zeq shape) when the path did not match.
    #[derive(Serialize, ToSchema)]
    #[serde(untagged)]
    pub enum SbOrRouteError {
        Sb(SbError),
        Route(ZeqError),
    }

    // ---- spec 000: machines and keys ----

    #[derive(Serialize, ToSchema)]
    pub struct NewMachineRequest {
        /// Defaults to the lowercased ZID.
        #[schema(pattern = "^[a-z0-9-]{1,64}$")]
        pub slug: Option<String>,
        pub is_public: Option<bool>,
        #[schema(max_length = 255)]
        pub display_name: Option<String>,
        #[schema(max_length = 4000)]
        pub purpose: Option<String>,
        pub parent_origin: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Machine {
        pub id: String,
        pub slug: String,
        pub parent_origin: String,
        pub is_public: bool,
        pub status: String,
        /// Decimal string.
        pub genesis_zeqond: String,
        pub display_name: Option<String>,
        pub region: String,
        pub created_at: String,
        pub updated_at: String,
        /// Viewers and above only.
        #[schema(required = false)]
        pub purpose: Option<String>,
        /// Viewers and above only.
        #[schema(required = false)]
        pub owner_zid: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct MachineCreated {
        pub ok: bool,
        pub machine: Machine,
        /// The spin-up key (`zsm_…`, admin scope), shown once.
        pub api_key: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct MachineList {
        pub ok: bool,
        pub count: u64,
        pub machines: Vec<Machine>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct MachineOne {
        pub ok: bool,
        pub machine: Machine,
    }

    #[derive(Serialize, ToSchema)]
    pub struct MintKeyRequest {
        #[schema(min_length = 1, max_length = 100)]
        pub name: String,
        /// `viewer`, `operator` or `admin`.
        #[schema(pattern = "^(viewer|operator|admin)$")]
        pub scope: String,
        #[schema(minimum = 1, maximum = 315360000)]
        pub expires_in_seconds: Option<u64>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct ApiKey {
        pub id: String,
        pub name: String,
        /// `viewer`, `operator`, `admin` or `account`.
        pub scope: String,
        pub hint: String,
        pub created_at: String,
        pub expires_at: Option<String>,
        pub revoked_at: Option<String>,
        pub active: bool,
    }

    #[derive(Serialize, ToSchema)]
    pub struct KeyMinted {
        pub ok: bool,
        pub key: ApiKey,
        /// The raw key, shown once.
        pub api_key: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct KeyList {
        pub ok: bool,
        pub keys: Vec<ApiKey>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct KeyOne {
        pub ok: bool,
        pub key: ApiKey,
    }

    // ---- chain: events and the log ----

    #[derive(Serialize, ToSchema)]
    pub struct EventRequest {
        /// 1–64 characters without control characters; default `event`.
        #[serde(rename = "type")]
        pub kind: Option<String>,
        /// Any JSON; its canonical SHA-256 is recorded. Not with `hash`.
        pub payload: Option<Value>,
        /// A SHA-256 in hex, recorded as is. Not with `payload`.
        pub hash: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct EventRecorded {
        pub ok: bool,
        pub zeqondNumber: u64,
        pub transitionId: String,
        pub seq: u64,
        pub hash: String,
        pub payload_hash: String,
    }

    /// One log row.
    #[derive(Serialize, ToSchema)]
    pub struct Row {
        pub seq: u64,
        pub zeqond: u64,
        pub ts: String,
        pub ts_ms: i64,
        #[serde(rename = "type")]
        pub kind: String,
        pub actor: String,
        pub transition_id: String,
        pub payload: Value,
        pub prev_hash: String,
        pub hash: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct ChainState {
        pub ok: bool,
        pub slug: String,
        pub size: u64,
        pub genesis_zeqond: String,
        pub latest: Option<Row>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Block {
        pub ok: bool,
        pub zeqond: u64,
        pub count: u64,
        pub rows: Vec<Row>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Explore {
        pub ok: bool,
        pub from: u64,
        pub to: u64,
        pub size: u64,
        pub count: u64,
        pub rows: Vec<Row>,
        /// The `from` of the next page, if any.
        pub next: Option<u64>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Validation {
        pub ok: bool,
        pub valid: bool,
        pub count: u64,
        pub broken_at: Option<u64>,
        pub genesis_zeqond: String,
        pub from: u64,
        pub to: u64,
    }

    #[derive(Serialize, ToSchema)]
    pub struct InclusionProof {
        pub seq: u64,
        pub tree_size: u64,
        pub row_hash: String,
        pub leaf_hash: String,
        pub proof: Vec<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct ConsistencyProof {
        pub from: u64,
        pub to: u64,
        pub proof: Vec<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct DeadLetter {
        pub n: u64,
        pub topic: String,
        /// The kept prefix of the payload, lossily decoded as UTF-8.
        pub payload: String,
        pub payload_bytes: u64,
        pub truncated: bool,
        pub reason: String,
        pub message: String,
        pub ts: String,
        pub ts_ms: i64,
    }

    #[derive(Serialize, ToSchema)]
    pub struct DeadLetters {
        pub ok: bool,
        pub slug: String,
        pub dead_letters: Vec<DeadLetter>,
    }

    // ---- spec 001: pages ----

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct PageVersion {
        pub version: u64,
        pub title: String,
        pub htmlSha256: String,
        pub htmlBytes: u64,
        pub agentZid: Option<String>,
        pub proof_digest: String,
        pub hasPythonScript: bool,
        pub publishedAt: String,
        pub live: bool,
        #[schema(required = false)]
        pub rolledBackFrom: Option<u64>,
    }

    /// A page in a listing: its live version, or (viewers and above) `live: false` for a page
    /// that is offline.
    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct PageListItem {
        pub pageSlug: String,
        pub latestVersion: u64,
        pub url: String,
        pub live: bool,
        #[schema(required = false)]
        pub version: Option<u64>,
        #[schema(required = false)]
        pub title: Option<String>,
        #[schema(required = false)]
        pub htmlSha256: Option<String>,
        #[schema(required = false)]
        pub publishedAt: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct PageList {
        pub ok: bool,
        pub slug: String,
        pub count: u64,
        pub pages: Vec<PageListItem>,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct PageLive {
        pub slug: String,
        pub pageSlug: String,
        pub url: String,
        pub version: u64,
        pub title: String,
        pub htmlSha256: String,
        pub live: bool,
        pub html: String,
        pub pythonScript: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct PageOne {
        pub ok: bool,
        pub page: PageLive,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct PageHistory {
        pub ok: bool,
        pub slug: String,
        pub pageSlug: String,
        pub latestVersion: u64,
        pub liveVersion: Option<u64>,
        /// Newest first.
        pub versions: Vec<PageVersion>,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct PublishRequest {
        /// 1–200 characters.
        #[schema(min_length = 1, max_length = 200)]
        pub title: String,
        /// Non-empty HTML, at most 2 MiB.
        #[schema(min_length = 1)]
        pub html: String,
        /// The ZID of the agent (or account) that wrote the page.
        #[schema(pattern = "^ZEQ[0-9A-Za-z-]{3,28}$")]
        pub agentZid: String,
        /// At most 256 KiB.
        pub pythonScript: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct RollbackRequest {
        /// The version to make live again.
        #[schema(minimum = 1)]
        pub version: u64,
    }

    #[derive(Serialize, ToSchema)]
    pub struct RowRef {
        pub seq: u64,
        #[serde(rename = "type")]
        pub kind: String,
        pub hash: String,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct PageWritten {
        pub ok: bool,
        pub version: u64,
        pub proof_digest: String,
        pub htmlSha256: String,
        pub url: String,
        pub page: Value,
        pub row: RowRef,
    }

    #[derive(Serialize, ToSchema)]
    pub struct SiteState {
        pub slug: String,
        /// Public views of the machine's instances.
        pub instances: Vec<Value>,
    }

    // ---- specs 002/003: statebacked machines and instances ----

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct SbVersion {
        pub id: String,
        pub clientInfo: Option<String>,
        pub createdAt: String,
        pub number: u64,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct SbMachine {
        pub slug: String,
        pub createdAt: String,
        pub currentVersion: Option<SbVersion>,
        pub versions: u64,
        pub autoCreateInstances: bool,
    }

    #[derive(Serialize, ToSchema)]
    pub struct SbMachineList {
        pub machines: Vec<SbMachine>,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct CreateVersionRequest {
        /// The statechart (xstate-like JSON).
        pub definition: Value,
        pub clientInfo: Option<String>,
        pub makeCurrent: Option<bool>,
        pub autoCreateInstances: Option<bool>,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct VersionCreated {
        pub machineVersionId: String,
        pub number: u64,
    }

    #[derive(Serialize, ToSchema)]
    pub struct VersionList {
        pub versions: Vec<SbVersion>,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct CreateInstanceRequest {
        #[schema(pattern = "^[a-zA-Z0-9_-]{1,128}$")]
        pub slug: String,
        /// An object; default `{}`.
        pub context: Option<Value>,
        pub machineVersionId: Option<String>,
    }

    /// What any reader of an instance sees.
    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct InstanceView {
        pub ts: i64,
        pub state: Value,
        pub publicContext: Value,
        pub tags: Vec<String>,
        pub done: bool,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct InstanceSummary {
        pub slug: String,
        pub createdAt: String,
        pub status: String,
        pub machineVersionId: String,
        pub updatedAt: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct InstanceList {
        pub instances: Vec<InstanceSummary>,
        pub cursor: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct SendEventRequest {
        /// An event name, or `{"type": name, ...data}`.
        pub event: Value,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct Transition {
        pub n: u64,
        pub ts: i64,
        pub event: Value,
        pub from: Value,
        pub to: Value,
        pub seq: Value,
        pub machineVersionId: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct TransitionList {
        pub events: Vec<Transition>,
        pub cursor: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct AdminView {
        pub ts: i64,
        pub state: Value,
        pub context: Value,
        pub tags: Vec<String>,
        pub done: bool,
        pub output: Value,
        pub status: String,
        pub machineVersionId: String,
        pub targetMachineVersionId: Option<String>,
        pub configuration: Value,
        pub pendingTimers: Vec<Value>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct StatusBody {
        /// `paused` or `running`.
        #[schema(pattern = "^(paused|running)$")]
        pub status: String,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct TargetVersionRequest {
        pub targetMachineVersionId: String,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct TargetVersionReply {
        pub targetMachineVersionId: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    #[allow(non_snake_case)]
    pub struct DeleteInstanceRequest {
        /// Must be `true`.
        pub dangerDataWillBeDeletedForever: bool,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Empty {}

    // ---- spec 004: agents, tally, credentials ----

    #[derive(Serialize, ToSchema)]
    pub struct SpawnRequest {
        pub problem: String,
        #[schema(minimum = 1, maximum = 10)]
        pub population: u8,
        #[schema(minimum = 1, maximum = 10)]
        pub generations: u8,
        pub precision: Option<f64>,
        pub credential_id: Option<String>,
        pub parent_master_id: Option<String>,
        pub slug: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Spawned {
        pub ok: bool,
        pub agent_id: String,
        pub agent_zid: String,
        pub slug: String,
        pub machine_created: bool,
        pub status: String,
        pub tally_charge: Value,
        pub first_tick: Value,
    }

    /// A tick's outcome (generation, fitness, …) with `ok`, `agent_id` and `tally_charge`.
    #[derive(Serialize, ToSchema)]
    pub struct Ticked {
        pub ok: bool,
        pub agent_id: String,
        pub tally_charge: Value,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Killed {
        pub ok: bool,
        pub agent_id: String,
        pub killed_at_zeqond: u64,
        pub transition_id: Value,
    }

    #[derive(Serialize, ToSchema)]
    pub struct AgentList {
        pub ok: bool,
        pub count: u64,
        pub live: u64,
        pub agents: Vec<Value>,
    }

    /// A run (id, status, problem, best, …) with `ok`.
    #[derive(Serialize, ToSchema)]
    pub struct AgentStatus {
        pub ok: bool,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Lineage {
        pub ok: bool,
        pub agent_id: String,
        pub problem: String,
        pub status: String,
        pub lineage: Vec<Value>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Mesh {
        pub ok: bool,
        pub master_id: String,
        pub master: Value,
        pub count: u64,
        pub children: Vec<Value>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct Tally {
        pub ok: bool,
        pub zid: String,
        pub balance: i64,
        pub machines: u64,
        pub slugs: Vec<String>,
        pub agents: u64,
        pub live_agents: u64,
        pub spent_on_agents: i64,
        pub costs: Value,
    }

    #[derive(Serialize, ToSchema)]
    pub struct CredentialRequest {
        /// `http(s)://` URL of an OpenAI-compatible API.
        pub base_url: String,
        pub api_key: String,
        pub model: Option<String>,
        pub name: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct CredentialCreated {
        pub ok: bool,
        pub credential_id: String,
        pub name: String,
        pub created_at: String,
    }

    // ---- operations and sync ----

    #[derive(Serialize, ToSchema)]
    pub struct Health {
        pub ok: bool,
        pub status: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct GatewayInfo {
        pub ok: bool,
        pub gateway_id: String,
        pub public_key: String,
        pub verifier_key: String,
        pub version: String,
        pub started_at: String,
        pub uptime_seconds: u64,
        pub machines: u64,
        pub region: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct SyncMachine {
        pub slug: String,
        pub log_size: u64,
        pub acked_seq: Option<u64>,
        pub acked_size: u64,
        pub backlog_rows: u64,
        pub backlog_bytes: u64,
        pub backlog_bytes_exact: bool,
        pub last_success: Option<String>,
        pub last_error: Option<String>,
        pub last_error_code: Option<String>,
        pub last_error_at: Option<String>,
        pub conflict_at: Option<u64>,
        pub next_retry: Option<String>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct SyncStatus {
        pub ok: bool,
        pub enabled: bool,
        pub upstream: String,
        pub gateway_id: String,
        pub over_quota: bool,
        pub backlog_quota_bytes: u64,
        pub machines: Vec<SyncMachine>,
    }
}
