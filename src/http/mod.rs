//! HTTP: one file per API area, each a set of warp filters that parse, call the domain, and map
//! errors. This file holds what they share: the error shape of the zeq paths, body reading with
//! a limit, bearer extraction, and the route table. `listener.rs` serves the routes over TLS.

mod agents;
mod chain;
pub mod client;
mod console;
mod deps;
mod drain;
mod instances;
mod listener;
mod machines;
mod mqtt;
pub mod openapi;
mod ops;
mod pages;
mod rt;
mod sync;

pub use deps::{
    AgentsDeps, Api, ChainDeps, Common, ConsoleDeps, InstancesDeps, MachineLimits, MachinesDeps,
    OpsDeps, PagesDeps, SyncDeps,
};
pub use listener::serve;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::StatusCode;
use serde_json::{json, Map, Value};
use warp::reply::Response;
use warp::{Buf, Filter, Reply};

use crate::auth::AuthError;
use crate::auth::{Access, Principal, Slug};
use crate::machines::{Machine, MachineError};
use crate::store::StoreError;

/// The peer address of the connection, put on each request by the listener.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub SocketAddr);

/// An error of the zeq API family: `{"ok": false, "error": "<code>", "message": ...}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// 500 `unspecified`: a failure that is not the caller's.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "unspecified", message)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <zeq_ak_… or zsm_… key>`; the key may be unknown, revoked or expired",
        )
    }

    pub fn machine_not_found() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "machine_not_found",
            "no machine with that slug is visible to this key",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn rate_limited(retry_after: u64) -> ApiError {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests; retry in {retry_after} s"),
        );
        e.retry_after = Some(retry_after);
        e.extra.insert("retry_after".into(), json!(retry_after));
        e
    }

    pub fn with(mut self, key: &str, value: Value) -> ApiError {
        self.extra.insert(key.into(), value);
        self
    }

    pub fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("ok".into(), json!(false));
        body.insert("error".into(), json!(self.code));
        body.insert("message".into(), json!(self.message));
        body.extend(self.extra);
        let mut res = json_response(self.status, &Value::Object(body));
        if let Some(secs) = self.retry_after {
            if let Ok(v) = secs.to_string().parse() {
                res.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
        }
        res
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Full(_) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                e.to_string(),
            ),
            StoreError::Unavailable(_) | StoreError::Recovering | StoreError::ShuttingDown => {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    e.to_string(),
                )
            }
            StoreError::Corrupt(_) | StoreError::NewerSchema { .. } => {
                tracing::error!(error = %e, "storage error");
                ApiError::internal(e.to_string())
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Unauthorized => ApiError::unauthorized(),
            AuthError::Store(s) => s.into(),
        }
    }
}

impl From<MachineError> for ApiError {
    fn from(e: MachineError) -> ApiError {
        match e {
            MachineError::Invalid { code, message } => ApiError::bad_request(code, message),
            MachineError::SlugTaken { existing_slug } => ApiError::new(
                StatusCode::CONFLICT,
                "slug_taken",
                format!("slug `{existing_slug}` is taken"),
            )
            .with("existing_slug", json!(existing_slug)),
            MachineError::NotFound => ApiError::machine_not_found(),
            MachineError::Forbidden => ApiError::forbidden("this key's role cannot do that"),
            MachineError::Store(s) => s.into(),
        }
    }
}

/// The machine and the caller's access to it. Private machines are invisible to callers who
/// have no access: anonymous callers are asked to authenticate, others get 404.
pub fn visible_machine(
    common: &Common,
    principal: &Principal,
    slug: &str,
) -> Result<(Machine, Access), ApiError> {
    let machine = match Slug::parse(slug) {
        Some(slug) => common.store.view(|txn| crate::machines::get(txn, &slug))?,
        None => None,
    };
    let access = machine
        .as_ref()
        .map(|m| m.access(principal))
        .unwrap_or(Access::None);
    match machine {
        Some(m) if access > Access::None => Ok((m, access)),
        _ if *principal == Principal::Anonymous => Err(ApiError::unauthorized()),
        _ => Err(ApiError::machine_not_found()),
    }
}

pub fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut res = warp::reply::json(value).into_response();
    *res.status_mut() = status;
    res
}

/// What a handler of the zeq family returns: its answer, or the error to answer with.
pub type Answer = Result<Response, ApiError>;

/// Collapses a handler's result into a response.
pub fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(ApiError::into_response)
}

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send>>;

fn box_stream<S, B>(s: S) -> BodyStream
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf,
{
    Box::pin(s.map(|chunk| chunk.map(|mut b| b.copy_to_bytes(b.remaining()))))
}

/// The request body as a stream, with the declared length when there is one.
pub fn body() -> impl Filter<Extract = (Option<u64>, BodyStream), Error = Infallible> + Clone {
    warp::header::optional::<u64>("content-length")
        .or(warp::any().map(|| None))
        .unify()
        .and(
            warp::body::stream()
                .map(box_stream)
                .or(warp::any().map(|| Box::pin(futures_util::stream::empty()) as BodyStream))
                .unify(),
        )
}

/// Reads at most `limit` bytes; a larger body is refused with 413 as soon as it is known to
/// be larger (from its `Content-Length`, or when the stream passes the limit), never buffered.
pub async fn read_body(
    declared: Option<u64>,
    mut stream: BodyStream,
    limit: u64,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit) as usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("invalid_body", format!("cannot read the body: {e}"))
        })?;
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Parses a JSON body; an empty body is `{}`.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request("invalid_body", format!("the body is not valid JSON: {e}"))
    })
}

/// Name of the console's session cookie (HttpOnly, Secure, SameSite=Strict; see `console.rs`).
pub const SESSION_COOKIE: &str = "smgate_session";
/// Header the console sends on every cookie-authenticated write: a cross-origin form cannot
/// send it, and a cross-origin script that tries needs a CORS preflight this gateway never
/// grants. Together with SameSite=Strict this is the console's CSRF defence.
pub const CONSOLE_HEADER: &str = "x-smgate-console";

/// A cookie-authenticated write without [`CONSOLE_HEADER`]: refused with 403.
#[derive(Debug)]
pub struct ConsoleHeaderMissing;

impl warp::reject::Reject for ConsoleHeaderMissing {}

/// The caller's credential: the bearer token if the request sent one, else the console's
/// session token from its cookie. Reads (GET/HEAD, including EventSource, which cannot send
/// headers) may use the cookie alone; writes with the cookie must also carry
/// [`CONSOLE_HEADER`]. A cookie on a request the browser marks as coming from another origin
/// (`Sec-Fetch-Site`, e.g. a published page in its opaque sandbox origin) is ignored.
pub fn bearer() -> impl Filter<Extract = (Option<String>,), Error = warp::Rejection> + Clone {
    warp::method().and(warp::header::headers_cloned()).and_then(
        |method: http::Method, headers: http::HeaderMap| async move {
            credential(&method, &headers).map_err(warp::reject::custom)
        },
    )
}

fn credential(
    method: &http::Method,
    headers: &http::HeaderMap,
) -> Result<Option<String>, ConsoleHeaderMissing> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let token = v.to_str().ok().and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        });
        // A session token is only good in its cookie; in a header it is an unknown key.
        return Ok(token.map(|t| {
            if t.starts_with(crate::auth::session::SESSION_PREFIX) {
                String::new()
            } else {
                t
            }
        }));
    }
    let Some(token) = session_cookie(headers) else {
        return Ok(None);
    };
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if fetch_site.is_some_and(|s| s != "same-origin" && s != "none") {
        return Ok(None);
    }
    let safe = method == http::Method::GET || method == http::Method::HEAD;
    let marked = headers
        .get(CONSOLE_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    if safe || marked {
        Ok(Some(token))
    } else {
        Err(ConsoleHeaderMissing)
    }
}

/// The value of the session cookie. HTTP/2 clients may split cookies over several headers.
pub fn session_cookie(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == SESSION_COOKIE && !value.is_empty()).then(|| value.to_string())
        })
}

pub fn client_ip() -> impl Filter<Extract = (IpAddr,), Error = Infallible> + Clone {
    warp::ext::optional::<RemoteAddr>()
        .map(|a: Option<RemoteAddr>| a.map(|a| a.0.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0])))
}

/// Hands a route its area's dependencies.
pub fn with_gateway<T: Send + Sync + 'static>(
    deps: Arc<T>,
) -> impl Filter<Extract = (Arc<T>,), Error = Infallible> + Clone {
    warp::any().map(move || deps.clone())
}

/// Every route of the gateway.
pub fn routes(api: &Api) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    // Pages first: `/s/…` is the hot public path; no other area shares its prefixes.
    pages::routes(api.pages.clone())
        .or(machines::routes(api.machines.clone()))
        .unify()
        .or(chain::routes(api.chain.clone()))
        .unify()
        .or(agents::routes(api.agents.clone()))
        .unify()
        .or(instances::routes(api.instances.clone()))
        .unify()
        .or(rt::routes(api.instances.clone()))
        .unify()
        .or(mqtt::routes(api.common.clone()))
        .unify()
        .or(console::routes(api.console.clone()))
        .unify()
        .or(ops::routes(api.ops.clone()))
        .unify()
        .or(sync::routes(api.sync.clone()))
        .unify()
        .recover(|r: warp::Rejection| async move { Ok::<_, Infallible>(rejection(r)) })
        .unify()
}

fn rejection(r: warp::Rejection) -> Response {
    let e = if r.find::<ConsoleHeaderMissing>().is_some() {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "console_header_missing",
            format!("a write signed in by the console's cookie must send `{CONSOLE_HEADER}: 1`"),
        )
    } else if r.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the body is too large",
        )
    } else {
        ApiError::bad_request("invalid_request", format!("{r:?}"))
    };
    e.into_response()
}
