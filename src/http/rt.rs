//! statebacked's real-time protocol: a websocket at `/rt` carrying JSON text messages.
//!
//! The client authenticates with `?token=<key>` (browsers cannot set headers on a websocket)
//! or an `Authorization: Bearer` header; without either it is anonymous and sees public
//! machines only. Then, on one socket, any number of subscriptions (up to
//! [`MAX_SUBSCRIPTIONS`]):
//!
//! ```text
//! → {"type":"subscribe-to-instance","machineName":"m","machineInstanceName":"i","requestId":"r1"}
//! ← {"type":"instance-update","machineName":"m","machineInstanceName":"i",
//!    "ts":…,"state":…,"publicContext":{…},"tags":[…],"done":false}      now, and after each change
//! → {"type":"unsubscribe-from-instance","machineName":"m","machineInstanceName":"i","requestId":"r1"}
//! → {"type":"ping"}                                                      ← {"type":"pong"}
//! ← {"type":"error","requestId":"r1","status":404,"code":"not-found","error":"…"}
//! ```
//!
//! Each subscription is authorized like `GET /machines/:m/i/:i` (read access, then the
//! machine's `allowRead` on the current state), and `allowRead` is re-checked on every later
//! state: a state the caller may not read ends the subscription with an `error` message.
//! Updates follow commits, so a client sees the latest committed state, not necessarily every
//! intermediate one (statebacked promises the same). The server pings every 30 s, so dead
//! peers are dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{json, Value};
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::reply::Response;
use warp::{Filter, Reply};

use super::instances::{authorize_live, current_view, SbError};
use super::openapi::schema::ZeqError;
use super::InstancesDeps;
use super::{bearer, json_response, with_gateway};
use crate::auth::Slug;

/// Subscriptions one socket may hold at once.
pub const MAX_SUBSCRIPTIONS: usize = 256;
/// Largest client message accepted (a subscribe message is ~150 bytes).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
const SERVER_PING: Duration = Duration::from_secs(30);

type Query = HashMap<String, String>;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(rt))]
pub(super) struct Api;

pub fn routes(
    deps: Arc<InstancesDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("rt")
        .and(warp::get())
        .and(warp::ws())
        .and(warp::query::<Query>())
        .and(with_gateway(deps))
        .and(bearer())
        .map(rt)
}

/// statebacked's real-time websocket (see the module documentation for its messages). A
/// request that is not a websocket upgrade is refused with 400.
#[utoipa::path(get, path = "/rt", tag = "instances",
    params(("token" = Option<String>, Query, description = "A key, for clients that cannot set headers")),
    security((), ("bearer" = [])),
    responses(
        (status = 101, description = "Switching to the websocket protocol"),
        (status = 400, description = "`invalid_request`: not a websocket upgrade", body = ZeqError),
        (status = 401, description = "`unauthorized`: the key does not authenticate"),
        (status = 405, description = "`method_not_allowed`", body = ZeqError),
    ))]
fn rt(ws: Ws, q: Query, deps: Arc<InstancesDeps>, bearer: Option<String>) -> Response {
    let token = bearer.or_else(|| q.get("token").cloned());
    // A key that does not authenticate is refused before the upgrade, with the same 401 as any
    // other route; no key at all is anonymous.
    if let Err(e) = deps.common.principal(token.as_deref()) {
        let e = SbError::from(super::ApiError::from(e));
        return json_response(e.0, &json!({"error": e.2, "code": e.1}));
    }
    ws.max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| session(deps, token, socket))
        .into_response()
}

/// One subscription: the request that made it, the auth to re-check `allowRead` with, and the
/// step count last sent (`None` until the first update).
struct Sub {
    request_id: Value,
    machine: Slug,
    auth: Value,
    last_steps: Option<u64>,
}

async fn session(deps: Arc<InstancesDeps>, token: Option<String>, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let mut commits = deps.writer.subscribe();
    let mut ping = tokio::time::interval(SERVER_PING);
    ping.tick().await;
    // Keyed by (machineName as the client wrote it, machineInstanceName).
    let mut subs: HashMap<(String, String), Sub> = HashMap::new();
    loop {
        let out = tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(m)) if m.is_text() => {
                    handle(&deps, token.as_deref(), &mut subs, m.to_str().unwrap_or_default())
                }
                Some(Ok(m)) if m.is_close() => break,
                Some(Ok(_)) => continue, // pings are answered by the protocol layer
                Some(Err(_)) | None => break,
            },
            changed = commits.changed() => {
                if changed.is_err() {
                    break;
                }
                refresh(&deps, &mut subs, None)
            }
            _ = ping.tick() => vec![Message::ping(Vec::new())],
        };
        for m in out {
            if tx.send(m).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.close().await;
}

fn text(v: &Value) -> Message {
    Message::text(v.to_string())
}

fn error(request_id: &Value, status: StatusCode, code: &str, message: &str) -> Message {
    text(&json!({
        "type": "error",
        "requestId": request_id,
        "status": status.as_u16(),
        "code": code,
        "error": message,
    }))
}

/// Answers one client message.
fn handle(
    deps: &InstancesDeps,
    token: Option<&str>,
    subs: &mut HashMap<(String, String), Sub>,
    raw: &str,
) -> Vec<Message> {
    let Ok(msg) = serde_json::from_str::<Value>(raw) else {
        return vec![error(
            &Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid-parameters",
            "messages are JSON objects with a \"type\"",
        )];
    };
    let request_id = msg.get("requestId").cloned().unwrap_or(Value::Null);
    let names = || {
        let m = msg.get("machineName")?.as_str()?;
        let i = msg.get("machineInstanceName")?.as_str()?;
        Some((m.to_string(), i.to_string()))
    };
    match msg.get("type").and_then(Value::as_str) {
        Some("ping") => vec![text(&json!({"type": "pong"}))],
        Some("subscribe-to-instance") => {
            let Some(key) = names() else {
                return vec![error(
                    &request_id,
                    StatusCode::BAD_REQUEST,
                    "invalid-parameters",
                    "machineName and machineInstanceName are required strings",
                )];
            };
            if !subs.contains_key(&key) && subs.len() >= MAX_SUBSCRIPTIONS {
                return vec![error(
                    &request_id,
                    StatusCode::BAD_REQUEST,
                    "too-many-subscriptions",
                    &format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                )];
            }
            match authorize_live(deps, token, &key.0, &key.1) {
                Ok((machine, auth)) => {
                    subs.insert(
                        key.clone(),
                        Sub {
                            request_id,
                            machine,
                            auth,
                            last_steps: None,
                        },
                    );
                    refresh(deps, subs, Some(&key))
                }
                Err(e) => vec![error(&request_id, e.0, e.1, &e.2)],
            }
        }
        Some("unsubscribe-from-instance") => {
            if let Some(key) = names() {
                subs.remove(&key);
            }
            Vec::new()
        }
        _ => vec![error(
            &request_id,
            StatusCode::BAD_REQUEST,
            "invalid-parameters",
            "type is one of subscribe-to-instance, unsubscribe-from-instance, ping",
        )],
    }
}

/// Sends an `instance-update` for each subscription (or just `only`) whose instance moved
/// since its last update; ends subscriptions whose instance is gone or no longer readable.
fn refresh(
    deps: &InstancesDeps,
    subs: &mut HashMap<(String, String), Sub>,
    only: Option<&(String, String)>,
) -> Vec<Message> {
    let mut out = Vec::new();
    let mut ended = Vec::new();
    for (key, sub) in subs.iter_mut() {
        if only.is_some_and(|k| k != key) {
            continue;
        }
        match current_view(deps, &sub.machine, &key.1, &sub.auth) {
            Ok(Some((steps, mut view))) => {
                if sub.last_steps == Some(steps) {
                    continue;
                }
                sub.last_steps = Some(steps);
                if let Value::Object(o) = &mut view {
                    o.insert("type".into(), json!("instance-update"));
                    o.insert("machineName".into(), json!(key.0));
                    o.insert("machineInstanceName".into(), json!(key.1));
                }
                out.push(text(&view));
            }
            Ok(None) => {
                out.push(error(
                    &sub.request_id,
                    StatusCode::NOT_FOUND,
                    "not-found",
                    "the instance no longer exists",
                ));
                ended.push(key.clone());
            }
            Err(e) => {
                out.push(error(&sub.request_id, e.0, e.1, &e.2));
                ended.push(key.clone());
            }
        }
    }
    for key in ended {
        subs.remove(&key);
    }
    out
}
