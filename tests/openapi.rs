//! `/api/openapi.json` and `/metrics` against the real binary.
//!
//! Invariants checked:
//! - the document is OpenAPI 3.1 in shape: every operation has responses, every `$ref` resolves;
//! - the router and the document name the same (method, path) pairs: [`ROUTES`] is every route
//!   the warp filters serve (read off `src/http/*.rs`); each is requested on a live gateway and
//!   must be answered by a handler (not the router's `no such route`), with a status the
//!   document lists for it; and the document has no operation that is not in [`ROUTES`];
//! - `/metrics` has every series issue 9 asks for, with values that moved after the traffic.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{call, Gw};
use reqwest::Method;
use serde_json::{json, Value};

/// Every (method, path template) the router serves.
const ROUTES: &[(&str, &str)] = &[
    // ops.rs
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/api/gateway"),
    ("GET", "/api/openapi.json"),
    ("GET", "/"),
    ("GET", "/ui"),
    ("GET", "/ui/"),
    ("GET", "/ui/{path}"),
    // machines.rs
    ("POST", "/api/chain/state-machines"),
    ("GET", "/api/chain/state-machines"),
    ("GET", "/api/chain/state-machines/{slug}"),
    ("POST", "/api/chain/{slug}/api-keys"),
    ("GET", "/api/chain/{slug}/api-keys"),
    ("DELETE", "/api/chain/{slug}/api-keys/{id}"),
    // chain.rs
    ("POST", "/api/chain/state-machines/{slug}/event"),
    ("GET", "/api/chain/state-machines/{slug}/state"),
    ("GET", "/api/chain/state-machines/{slug}/block"),
    ("GET", "/api/chain/state-machines/{slug}/explore"),
    ("GET", "/api/chain/state-machines/{slug}/explore/sse"),
    ("GET", "/api/chain/state-machines/{slug}/pohc/validate"),
    ("GET", "/api/chain/state-machines/{slug}/checkpoint"),
    ("GET", "/api/chain/state-machines/{slug}/proof/inclusion"),
    ("GET", "/api/chain/state-machines/{slug}/proof/consistency"),
    // mqtt.rs
    ("GET", "/api/chain/state-machines/{slug}/dead-letters"),
    // pages.rs
    ("GET", "/api/state-machines/{slug}/pages"),
    ("GET", "/api/state-machines/{slug}/pages/{page}"),
    ("GET", "/api/state-machines/{slug}/pages/{page}/history"),
    ("POST", "/api/state-machines/{slug}/pages/{page}/publish"),
    ("POST", "/api/state-machines/{slug}/pages/{page}/unpublish"),
    ("POST", "/api/state-machines/{slug}/pages/{page}/rollback"),
    ("GET", "/s/{slug}"),
    ("HEAD", "/s/{slug}"),
    ("GET", "/s/{slug}/"),
    ("HEAD", "/s/{slug}/"),
    ("GET", "/s/{slug}/state.json"),
    ("HEAD", "/s/{slug}/state.json"),
    ("GET", "/s/{slug}/p/{page}"),
    ("HEAD", "/s/{slug}/p/{page}"),
    ("GET", "/s/{slug}/p/{page}/"),
    ("HEAD", "/s/{slug}/p/{page}/"),
    // instances.rs
    ("GET", "/machines"),
    ("GET", "/machines/{machine}"),
    ("POST", "/machines/{machine}"),
    ("POST", "/machines/{machine}/v"),
    ("GET", "/machines/{machine}/v"),
    ("GET", "/machines/{machine}/i"),
    ("GET", "/machines/{machine}/i/{instance}"),
    ("DELETE", "/machines/{machine}/i/{instance}"),
    ("POST", "/machines/{machine}/i/{instance}/events"),
    ("GET", "/machines/{machine}/i/{instance}/events"),
    ("GET", "/machines/{machine}/i/{instance}/admin"),
    ("PUT", "/machines/{machine}/i/{instance}/status"),
    ("PUT", "/machines/{machine}/i/{instance}/v"),
    ("GET", "/machines/{machine}/i/{instance}/sse"),
    // agents.rs
    ("POST", "/api/zeq/agent/spawn"),
    ("POST", "/api/zeq/agent/tick/{id}"),
    ("POST", "/api/zeq/agent/{id}/tick"),
    ("POST", "/api/zeq/agent/kill/{id}"),
    ("POST", "/api/zeq/agent/{id}/kill"),
    ("GET", "/api/zeq/agent/list"),
    ("GET", "/api/zeq/agent/status/{id}"),
    ("GET", "/api/zeq/agent/lineage/{id}"),
    ("GET", "/api/zeq/agent/mesh/{id}"),
    ("GET", "/api/tally/account/{zid}"),
    ("POST", "/api/zeq/credentials"),
    // sync.rs
    ("GET", "/api/sync/status"),
    // console.rs
    ("POST", "/ui/api/session"),
    ("GET", "/ui/api/session"),
    ("DELETE", "/ui/api/session"),
    // rt.rs
    ("GET", "/rt"),
];

const MANY: &[(&str, &str)] = &[
    ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000"),
    ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "10000000"),
    ("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "10000000"),
];

/// A client that trusts the gateway's certificate and does not follow redirects.
fn raw_client(gw: &Gw) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&gw.cert_pem()).expect("pem"))
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn fetch_doc(gw: &Gw) -> Value {
    let (status, doc, headers) = call(
        &gw.client(),
        Method::GET,
        &gw.url("/api/openapi.json"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{doc}");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    doc
}

fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if [
                "get", "put", "post", "delete", "head", "patch", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                out.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

/// Every `$ref` in `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "$ref" {
                    out.extend(x.as_str().map(String::from));
                } else {
                    refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_is_openapi_3_1_and_names_exactly_the_routes_the_router_serves() {
    let gw = Gw::start(MANY);
    let doc = fetch_doc(&gw).await;

    // Shape.
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "smgate");
    assert!(doc["info"]["version"].is_string());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let ops = operations(&doc);
    for (method, path, op) in &ops {
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path}: no responses"));
        assert!(
            responses
                .keys()
                .any(|s| s.starts_with('2') || s.starts_with('3') || s == "101"),
            "{method} {path}: no success response"
        );
        let params: BTreeSet<String> = op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let in_path: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(String::from)
            .collect();
        assert_eq!(params, in_path, "{method} {path}: path parameters");
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in &all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {r}"
        );
    }

    // The document names exactly the routes of the router.
    let documented: BTreeSet<(String, String)> =
        ops.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the document: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not in ROUTES: {unserved:?}"
    );

    // Each route is served by a handler on a live gateway, with a documented status.
    let c = gw.client();
    let (s, made, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(&gw.owner_key),
        Some(json!({"slug": "probe", "is_public": true})),
    )
    .await;
    assert_eq!(s, 201, "{made}");
    let values: HashMap<&str, &str> = [
        ("slug", "probe"),
        ("machine", "probe"),
        ("instance", "i-1"),
        ("page", "home"),
        ("id", "00000000-0000-4000-8000-000000000000"),
        ("zid", gw.owner_zid.as_str()),
        ("path", "index.html"),
    ]
    .into();
    let raw = raw_client(&gw);
    for (method, template, op) in &ops {
        let path: String = template
            .split('/')
            .map(
                |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => values
                        .get(name)
                        .copied()
                        .unwrap_or_else(|| panic!("no probe value for {{{name}}}")),
                    None => seg,
                },
            )
            .collect::<Vec<_>>()
            .join("/");
        let mut req = raw
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                gw.url(&path),
            )
            .bearer_auth(&gw.owner_key);
        if method == "POST" || method == "PUT" || method == "DELETE" {
            req = req.header("content-type", "application/json").body("{}");
        }
        let res = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = res.status().as_u16();
        let is_stream = res
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
        let body: Value = if is_stream {
            Value::Null // endless; the headers are enough
        } else {
            let text = res.text().await.unwrap();
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        let routing_miss =
            (status == 404 && body["error"] == "not_found" && body["message"] == "no such route")
                || status == 405;
        assert!(
            !routing_miss,
            "{method} {path}: the router does not serve it ({status} {body})"
        );
        assert!(
            op["responses"].get(status.to_string()).is_some(),
            "{method} {template}: answered {status}, which the document does not list ({body})"
        );
    }
    // And a path that no route serves is the router's miss, so the check above can fail.
    let (s, b, _) = call(&c, Method::GET, &gw.url("/api/no-such-route"), None, None).await;
    assert_eq!((s, b["message"].as_str()), (404, Some("no such route")));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Samples of `name` (with labels) in a Prometheus text exposition.
fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            if series.split('{').next()? != name {
                return None;
            }
            Some((series, value.parse::<f64>().ok()?))
        })
        .collect()
}

fn one(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{series}` in /metrics:\n{text}"))
}

async fn metrics(gw: &Gw) -> String {
    let res = gw.client().get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    res.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_requests_commits_mqtt_timers_sync_lag_rate_limits_and_rss() {
    let mqtt_port = free_port();
    let mqtt = format!("127.0.0.1:{mqtt_port}");
    let gw = Gw::start(&[
        ("SMGATE_MQTT_LISTEN", mqtt.as_str()),
        ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "2"),
    ]);
    let c = gw.client();

    // Writes: a machine with the heartbeat chart, instances created by MQTT heartbeats.
    let (s, b, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(&gw.owner_key),
        Some(json!({"slug": "hb"})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let def: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/firmware-config/machines/heartbeat.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let (s, b, _) = call(
        &c,
        Method::POST,
        &gw.url("/machines/hb/v"),
        Some(&gw.owner_key),
        Some(json!({"definition": def, "makeCurrent": true, "autoCreateInstances": true})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let mut opts = MqttOptions::new("metrics-test", "127.0.0.1", mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_credentials("hb", gw.owner_key.clone());
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        client
            .publish(
                "smgate/hb/dev-1/heartbeat",
                QoS::AtLeastOnce,
                false,
                r#"{"ts": 1}"#,
            )
            .await
            .unwrap();
        client
            .publish(
                "smgate/hb/dev-2/heartbeat",
                QoS::AtLeastOnce,
                false,
                r#"{"ts": 2}"#,
            )
            .await
            .unwrap();
        client
            .publish(
                "smgate/hb/dev-1/events/HEARTBEAT",
                QoS::AtLeastOnce,
                false,
                "{not json",
            )
            .await
            .unwrap();
        let mut acks = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while acks < 3 {
            assert!(
                Instant::now() < deadline,
                "the broker did not ack 3 publishes"
            );
            if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
                tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await
            {
                acks += 1;
            }
        }
    }
    // Reads, and spin-ups past the limit of 2 per minute.
    let (s, _, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/hb"),
        Some(&gw.owner_key),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let mut limited = 0;
    for i in 0..3 {
        let (s, _, _) = call(
            &c,
            Method::POST,
            &gw.url("/api/chain/state-machines"),
            Some(&gw.owner_key),
            Some(json!({"slug": format!("m-{i}")})),
        )
        .await;
        limited += u32::from(s == 429);
    }
    assert!(
        limited >= 1,
        "the third spin-up within a minute should be refused"
    );

    // The MQTT side applies asynchronously: wait until both heartbeats and the dead letter count.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics(&gw).await;
        if one(&text, "smgate_mqtt_applied_total") >= 2.0
            && one(&text, "smgate_mqtt_dead_letters_total") >= 1.0
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "MQTT counters did not move:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Requests by method, route template and status.
    assert!(
        one(
            &text,
            r#"smgate_http_requests_total{method="GET",route="/api/chain/state-machines/{slug}",status="200"}"#
        ) >= 1.0
    );
    assert!(
        one(
            &text,
            r#"smgate_http_requests_total{method="POST",route="/api/chain/state-machines",status="201"}"#
        ) >= 1.0
    );
    assert!(
        one(
            &text,
            r#"smgate_http_requests_total{method="POST",route="/api/chain/state-machines",status="429"}"#
        ) >= 1.0
    );
    assert!(
        one(
            &text,
            r#"smgate_http_requests_total{method="POST",route="/machines/{machine}/v",status="200"}"#
        ) >= 1.0
    );
    // Commit batch sizes and latency: histograms with +Inf buckets equal to their counts.
    for h in ["smgate_commit_batch_size", "smgate_commit_seconds"] {
        let count = one(&text, &format!("{h}_count"));
        assert!(count >= 4.0, "{h}_count = {count}");
        assert_eq!(one(&text, &format!("{h}_bucket{{le=\"+Inf\"}}")), count);
        assert!(one(&text, &format!("{h}_sum")) > 0.0);
        assert!(samples(&text, &format!("{h}_bucket")).len() >= 10);
    }
    // MQTT applied / dead-lettered.
    assert!(one(&text, "smgate_mqtt_applied_total") >= 2.0);
    assert!(
        one(
            &text,
            r#"smgate_mqtt_dead_letters_by_reason_total{reason="invalid_json"}"#
        ) >= 1.0
    );
    // Timers pending: each online heartbeat instance waits for its 30 s `after`.
    assert!(one(&text, "smgate_timers_pending") >= 2.0);
    assert_eq!(one(&text, "smgate_timers_fired_total"), 0.0);
    // Sync lag per machine: no upstream, so every row of hb's log is unacked.
    let lag = one(&text, r#"smgate_sync_lag_rows{machine="hb"}"#);
    let (_, state, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/hb/state"),
        Some(&gw.owner_key),
        None,
    )
    .await;
    assert!(
        lag >= 1.0 && lag <= state["size"].as_f64().unwrap(),
        "lag {lag}, log {state}"
    );
    // Rate-limited requests and process RSS.
    assert!(one(&text, "smgate_rate_limited_total") >= 1.0);
    let rss = one(&text, "smgate_process_resident_bytes");
    assert!(rss > 1_000_000.0 && rss < 4e9, "rss {rss}");
}
