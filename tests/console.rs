//! The console's sessions over real TLS: sign-in turns an account key into an HttpOnly,
//! Secure, SameSite=Strict cookie; the cookie reads without ceremony but writes only with the
//! console header; sign-out ends the session on the gateway; a cookie from another gateway is
//! unknown; and no console answer ever carries the key back.

mod common;

use common::Gw;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

const SESSION: &str = "/ui/api/session";
const CONSOLE: (&str, &str) = ("x-smgate-console", "1");

struct Answer {
    status: u16,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

/// One request: optional session cookie, optional console header, extra headers, JSON body.
async fn send(
    gw: &Gw,
    method: Method,
    path: &str,
    cookie: Option<&str>,
    console: bool,
    extra: &[(&str, &str)],
    body: Option<Value>,
) -> Answer {
    let mut req = gw.client().request(method, gw.url(path));
    if let Some(c) = cookie {
        req = req.header("cookie", format!("theme=dark; smgate_session={c}"));
    }
    if console {
        req = req.header(CONSOLE.0, CONSOLE.1);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.expect("body");
    Answer {
        status,
        headers,
        text,
    }
}

/// Signs in with `key`; returns the answer and the session token from `Set-Cookie`.
async fn sign_in(gw: &Gw, key: &str) -> (Answer, Option<String>) {
    let a = send(
        gw,
        Method::POST,
        SESSION,
        None,
        true,
        &[],
        Some(json!({"key": key})),
    )
    .await;
    let token = a
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.strip_prefix("smgate_session="))
        .map(|c| c.split(';').next().unwrap_or_default().to_string());
    (a, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_sets_a_strict_http_only_cookie_and_refuses_bad_keys() {
    let gw = Gw::start(&[]);
    let (a, token) = sign_in(&gw, &gw.owner_key).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let cookie = a.headers["set-cookie"].to_str().unwrap().to_string();
    let token = token.expect("session cookie");
    assert!(
        token.starts_with("zss_") && token.len() == 4 + 43,
        "{cookie}"
    );
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    for want in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=43200",
    ] {
        assert!(attrs.contains(&want), "missing {want} in {cookie}");
    }
    assert_eq!(a.headers["cache-control"], "no-store");
    assert_eq!(a.json()["zid"], json!(gw.owner_zid));
    assert!(
        !a.text.contains(&gw.owner_key),
        "the key came back: {}",
        a.text
    );

    // Unknown, malformed and non-account keys are refused with 401 and no cookie.
    let unknown = format!("zeq_ak_{}", "A".repeat(43));
    for bad in [unknown.as_str(), "not-a-key", ""] {
        let (a, t) = sign_in(&gw, bad).await;
        assert_eq!(a.status, 401, "{bad}: {}", a.text);
        assert!(t.is_none() && a.headers.get("set-cookie").is_none());
    }
    let created = send(
        &gw,
        Method::POST,
        "/api/chain/state-machines",
        None,
        false,
        &[("authorization", &format!("Bearer {}", gw.owner_key))],
        Some(json!({"slug": "kitchen"})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let machine_key = created.json()["api_key"].as_str().unwrap().to_string();
    let (a, t) = sign_in(&gw, &machine_key).await;
    assert_eq!(
        a.status, 401,
        "machine keys do not open console sessions: {}",
        a.text
    );
    assert!(t.is_none());

    // Sign-in itself must come from the console (login CSRF).
    let a = send(
        &gw,
        Method::POST,
        SESSION,
        None,
        false,
        &[],
        Some(json!({"key": gw.owner_key})),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert!(a.headers.get("set-cookie").is_none());

    // The session token is kept only as its hash.
    let db = std::fs::read(gw.data().join("smgate.redb")).unwrap();
    let raw = token.as_bytes();
    assert!(
        !db.windows(raw.len()).any(|w| w == raw),
        "raw session token in the database file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_reads_freely_but_writes_only_with_the_console_header() {
    let gw = Gw::start(&[]);
    let (_, token) = sign_in(&gw, &gw.owner_key).await;
    let token = token.expect("cookie");
    let c = Some(token.as_str());

    // Writes with the cookie alone are refused, and nothing is written.
    let body = json!({"slug": "kitchen", "display_name": "Kitchen"});
    let a = send(
        &gw,
        Method::POST,
        "/api/chain/state-machines",
        c,
        false,
        &[],
        Some(body.clone()),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    assert_eq!(a.json()["error"], "console_header_missing");
    let a = send(
        &gw,
        Method::POST,
        "/machines/kitchen/v",
        c,
        false,
        &[],
        Some(json!({})),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = send(
        &gw,
        Method::GET,
        "/api/chain/state-machines",
        c,
        false,
        &[],
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["count"], 0);

    // A browser that says the request comes from another origin gets no credentials from
    // the cookie (a published page runs in an opaque origin).
    let cross = [("sec-fetch-site", "cross-site")];
    let a = send(
        &gw,
        Method::POST,
        "/api/chain/state-machines",
        c,
        true,
        &cross,
        Some(body.clone()),
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.text);

    // With the header the cookie writes like the key it was opened with.
    let same = [("sec-fetch-site", "same-origin")];
    let a = send(
        &gw,
        Method::POST,
        "/api/chain/state-machines",
        c,
        true,
        &same,
        Some(body),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!(a.json()["machine"]["owner_zid"], json!(gw.owner_zid));
    let a = send(
        &gw,
        Method::GET,
        "/api/chain/state-machines",
        c,
        false,
        &cross,
        None,
    )
    .await;
    assert_eq!(
        a.json()["count"],
        0,
        "a cross-site read is anonymous: {}",
        a.text
    );
    let a = send(
        &gw,
        Method::GET,
        "/api/chain/state-machines",
        c,
        false,
        &same,
        None,
    )
    .await;
    assert_eq!(a.json()["count"], 1, "{}", a.text);
    let definition: Value = serde_json::from_str(
        &std::fs::read_to_string("firmware-config/machines/heartbeat.json").unwrap(),
    )
    .unwrap();
    let a = send(
        &gw,
        Method::POST,
        "/machines/kitchen/v",
        c,
        true,
        &[],
        Some(json!({"definition": definition, "makeCurrent": true})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = send(
        &gw,
        Method::POST,
        "/machines/kitchen",
        c,
        true,
        &[],
        Some(json!({"slug": "fridge-1"})),
    )
    .await;
    assert!(a.status == 200 || a.status == 201, "{}", a.text);

    // Reads, including the instance's event stream (EventSource cannot send headers).
    for path in [
        "/api/chain/state-machines",
        "/api/chain/state-machines/kitchen/pohc/validate",
        "/machines/kitchen/i",
        "/machines/kitchen/i/fridge-1/events",
        "/api/chain/state-machines/kitchen/dead-letters",
        "/api/sync/status",
        SESSION,
    ] {
        let a = send(&gw, Method::GET, path, c, false, &[], None).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
    }
    let mut res = gw
        .client()
        .get(gw.url("/machines/kitchen/i/fridge-1/sse"))
        .header("cookie", format!("smgate_session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), res.chunk())
        .await
        .expect("an SSE frame")
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&first);
    assert!(
        first.contains("instance-update") && first.contains("online"),
        "{first}"
    );
    // Without the cookie the private machine's stream is closed to us.
    let a = send(
        &gw,
        Method::GET,
        "/machines/kitchen/i/fridge-1/sse",
        None,
        false,
        &[],
        None,
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.text);

    // A session token is only good as the cookie, not as a bearer token.
    let a = send(
        &gw,
        Method::GET,
        "/api/chain/state-machines",
        None,
        false,
        &[("authorization", &format!("Bearer {token}"))],
        None,
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_out_ends_the_session_on_the_gateway() {
    let mut gw = Gw::start(&[]);
    let (_, token) = sign_in(&gw, &gw.owner_key).await;
    let token = token.expect("cookie");
    let c = Some(token.as_str());
    let (_, other) = sign_in(&gw, &gw.owner_key).await;
    let other = other.expect("second session");

    // Sessions survive a restart: they live in this gateway's store.
    gw.stop();
    gw.spawn();
    let a = send(&gw, Method::GET, SESSION, c, false, &[], None).await;
    assert_eq!(a.status, 200, "{}", a.text);

    // Sign-out is a write: the cookie alone cannot do it (a cross-site form could not either).
    let a = send(&gw, Method::DELETE, SESSION, c, false, &[], None).await;
    assert_eq!(a.status, 403, "{}", a.text);
    let a = send(
        &gw,
        Method::GET,
        "/api/chain/state-machines",
        c,
        false,
        &[],
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);

    let a = send(&gw, Method::DELETE, SESSION, c, true, &[], None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let cleared = a.headers["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with("smgate_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );

    // The old cookie is dead everywhere, even if the browser kept it.
    for path in [SESSION, "/api/chain/state-machines", "/api/sync/status"] {
        let a = send(&gw, Method::GET, path, c, false, &[], None).await;
        assert_eq!(a.status, 401, "{path}: {}", a.text);
    }
    let a = send(
        &gw,
        Method::POST,
        "/api/chain/state-machines",
        c,
        true,
        &[],
        Some(json!({"slug": "late"})),
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.text);
    let a = send(&gw, Method::DELETE, SESSION, c, true, &[], None).await;
    assert_eq!(a.status, 401, "{}", a.text);
    // Only that session: the other one is still signed in.
    let a = send(&gw, Method::GET, SESSION, Some(&other), false, &[], None).await;
    assert_eq!(a.status, 200, "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_from_another_gateway_does_not_work() {
    let a_gw = Gw::start(&[]);
    let b_gw = Gw::start(&[]);
    let (_, a_token) = sign_in(&a_gw, &a_gw.owner_key).await;
    let (_, b_token) = sign_in(&b_gw, &b_gw.owner_key).await;
    let (a_token, b_token) = (a_token.unwrap(), b_token.unwrap());
    for path in [SESSION, "/api/chain/state-machines", "/api/sync/status"] {
        let a = send(&a_gw, Method::GET, path, Some(&b_token), false, &[], None).await;
        assert_eq!(a.status, 401, "B's cookie on A, {path}: {}", a.text);
        let a = send(&a_gw, Method::GET, path, Some(&a_token), false, &[], None).await;
        assert_eq!(a.status, 200, "A's cookie on A, {path}: {}", a.text);
    }
    let a = send(
        &a_gw,
        Method::POST,
        "/api/chain/state-machines",
        Some(&b_token),
        true,
        &[],
        Some(json!({"slug": "stolen"})),
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_console_answer_carries_the_key_after_sign_in() {
    let gw = Gw::start(&[]);
    let key = gw.owner_key.clone();
    let (a, token) = sign_in(&gw, &key).await;
    let token = token.unwrap();
    let c = Some(token.as_str());
    let mut seen = vec![a];
    seen.push(
        send(
            &gw,
            Method::POST,
            "/api/chain/state-machines",
            c,
            true,
            &[],
            Some(json!({"slug": "kitchen"})),
        )
        .await,
    );
    assert_eq!(seen.last().unwrap().status, 201);
    for path in [
        SESSION,
        "/ui/",
        "/ui/app.js",
        "/ui/lib.js",
        "/ui/machines.js",
        "/ui/pages.js",
        "/ui/ops.js",
        "/api/chain/state-machines",
        "/api/chain/kitchen/api-keys",
        "/machines",
        "/api/sync/status",
        "/api/zeq/agent/list",
        "/api/gateway",
    ] {
        let a = send(&gw, Method::GET, path, c, false, &[], None).await;
        assert_eq!(a.status, 200, "{path}: {}", a.text);
        seen.push(a);
    }
    for a in &seen {
        assert!(!a.text.contains(&key), "key in a body: {}", a.text);
        for (name, v) in &a.headers {
            let v = v.to_str().unwrap_or_default();
            assert!(!v.contains(&key), "key in header {name}: {v}");
        }
    }
    // The account key list shows hints, never keys.
    let keys = send(
        &gw,
        Method::GET,
        "/api/chain/kitchen/api-keys",
        c,
        false,
        &[],
        None,
    )
    .await;
    assert!(
        keys.json()["keys"]
            .as_array()
            .is_some_and(|k| !k.is_empty()),
        "{}",
        keys.text
    );
}
