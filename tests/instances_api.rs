//! Specs 002/003 over real TLS: versions, instances, events, authorizers, pause, upgrades,
//! deletion, the transition rows in the log, live updates, and durable timers across SIGKILL.

mod common;

use std::time::Duration;

use common::{call, Gw};
use reqwest::Method;
use serde_json::{json, Value};

const MANY: &[(&str, &str)] = &[
    ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000"),
    ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "10000000"),
    ("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "10000000"),
];

fn toggle() -> Value {
    json!({
        "id": "toggle",
        "initial": "off",
        "context": {"public": {"flips": 0}, "secret": "s3"},
        "authorizers": {
            "allowWrite": "type == \"initialization\" || event.type != \"FORBIDDEN\"",
            "allowRead": "auth.role != \"viewer\""
        },
        "states": {
            "off": {"tags": ["idle"], "on": {"FLIP": {"target": "on", "actions": {"type": "assign", "params": {"public": "#{ flips: context.public.flips + 1 }"}}}, "FORBIDDEN": "on"}},
            "on": {"on": {"FLIP": {"target": "off", "actions": {"type": "assign", "params": {"public": "#{ flips: context.public.flips + 1 }"}}}, "FINISH": "done"}},
            "done": {"type": "final"}
        }
    })
}

struct Setup {
    gw: Gw,
    admin: String,
    operator: String,
    viewer: String,
}

async fn setup(def: Value) -> Setup {
    let gw = Gw::start(MANY);
    let c = gw.client();
    let (s, b, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(&gw.owner_key),
        Some(json!({"slug": "m"})),
    )
    .await;
    assert_eq!(s, 201);
    let admin = b["api_key"].as_str().unwrap().to_string();
    let mut keys = Vec::new();
    for role in ["operator", "viewer"] {
        let (_, k, _) = call(
            &c,
            Method::POST,
            &gw.url("/api/chain/m/api-keys"),
            Some(&admin),
            Some(json!({"name": role, "scope": role})),
        )
        .await;
        keys.push(k["api_key"].as_str().unwrap().to_string());
    }
    let (s, v, _) = call(
        &c,
        Method::POST,
        &gw.url("/machines/m/v"),
        Some(&admin),
        Some(json!({"definition": def, "clientInfo": "v1", "makeCurrent": true})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["machineVersionId"].as_str().unwrap().starts_with("mv_"));
    Setup {
        gw,
        admin,
        operator: keys[0].clone(),
        viewer: keys[1].clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_created_listed_and_current() {
    let s = setup(toggle()).await;
    let c = s.gw.client();
    let (st, b, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m/v"),
        Some(&s.admin),
        Some(json!({"definition": toggle(), "clientInfo": "v2"})),
    )
    .await;
    assert_eq!(st, 200);
    let v2 = b["machineVersionId"].as_str().unwrap().to_string();
    let (_, list, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/machines/m/v"),
        Some(&s.viewer),
        None,
    )
    .await;
    let infos: Vec<&str> = list["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["clientInfo"].as_str().unwrap())
        .collect();
    assert_eq!(infos, ["v1", "v2"]);
    let (_, m, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/machines/m"),
        Some(&s.viewer),
        None,
    )
    .await;
    assert_eq!(m["slug"], "m");
    assert_eq!(
        m["currentVersion"]["clientInfo"], "v1",
        "v2 was not made current"
    );
    let (_, all, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/machines"),
        Some(&s.gw.owner_key),
        None,
    )
    .await;
    assert_eq!(all["machines"].as_array().unwrap().len(), 1);
    // A bad definition names the bad node and writes nothing.
    let bad = json!({"definition": {"initial": "a", "states": {"a": {"on": {"GO": "nowhere"}}}}});
    let (st, e, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m/v"),
        Some(&s.admin),
        Some(bad),
    )
    .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (400, Some("invalid-definition")),
        "{e}"
    );
    assert!(
        e["error"].as_str().unwrap().contains("$.states.a.on.GO"),
        "{e}"
    );
    let (_, list, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/machines/m/v"),
        Some(&s.viewer),
        None,
    )
    .await;
    assert_eq!(list["versions"].as_array().unwrap().len(), 2);
    // Only admin+ creates versions.
    let (st, e, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m/v"),
        Some(&s.operator),
        Some(json!({"definition": toggle()})),
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (403, Some("missing-scope")));
    // An instance can pin a non-current version.
    let (st, _, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m"),
        Some(&s.operator),
        Some(json!({"slug": "pinned", "machineVersionId": v2})),
    )
    .await;
    assert_eq!(st, 200);
    let (_, a, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/machines/m/i/pinned/admin"),
        Some(&s.admin),
        None,
    )
    .await;
    assert_eq!(a["machineVersionId"], v2.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_lifecycle_codes_of_spec_002_003() {
    let s = setup(toggle()).await;
    let c = s.gw.client();
    let url = |p: &str| s.gw.url(p);
    let (st, v, _) = call(
        &c,
        Method::POST,
        &url("/machines/m"),
        Some(&s.operator),
        Some(json!({"slug": "user-1234", "context": {"public": {"flips": 10}}})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "off");
    assert_eq!(v["tags"], json!(["idle"]));
    assert_eq!(v["done"], false);
    assert_eq!(v["publicContext"], json!({"flips": 10}));
    assert!(v["ts"].as_i64().unwrap() > 1_700_000_000_000);
    assert!(v.get("context").is_none(), "only publicContext is public");
    // 409 invalid-state on an existing slug.
    let (st, e, _) = call(
        &c,
        Method::POST,
        &url("/machines/m"),
        Some(&s.operator),
        Some(json!({"slug": "user-1234"})),
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (409, Some("invalid-state")));
    assert!(e["error"].is_string());
    for bad in [
        json!({"slug": "has space"}),
        json!({"slug": "x".repeat(129)}),
        json!({}),
        json!({"slug": "ok", "context": [1]}),
    ] {
        let (st, e, _) = call(
            &c,
            Method::POST,
            &url("/machines/m"),
            Some(&s.operator),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(
            (st, e["code"].as_str()),
            (400, Some("invalid-parameters")),
            "{bad}"
        );
    }
    // Viewers cannot create; anonymous callers are asked to authenticate; strangers see nothing.
    let (st, e, _) = call(
        &c,
        Method::POST,
        &url("/machines/m"),
        Some(&s.viewer),
        Some(json!({"slug": "v"})),
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (403, Some("missing-scope")));
    let (st, _, _) = call(
        &c,
        Method::POST,
        &url("/machines/m"),
        None,
        Some(json!({"slug": "v"})),
    )
    .await;
    assert_eq!(st, 401);
    // Events: a name, or an object with data; the answer is the settled state.
    let (st, v, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/i/user-1234/events"),
        Some(&s.operator),
        Some(json!({"event": "FLIP"})),
    )
    .await;
    assert_eq!((st, v["state"].as_str()), (200, Some("on")));
    assert_eq!(v["publicContext"]["flips"], 11);
    let (_, v, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/i/user-1234/events"),
        Some(&s.operator),
        Some(json!({"event": {"type": "FLIP", "why": "test"}})),
    )
    .await;
    assert_eq!(v["state"], "off");
    // allowWrite rejects FORBIDDEN events.
    let (st, e, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/i/user-1234/events"),
        Some(&s.operator),
        Some(json!({"event": "FORBIDDEN"})),
    )
    .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (403, Some("rejected-by-machine-authorizer"))
    );
    for bad in [
        json!({}),
        json!({"event": ""}),
        json!({"event": {"no": "type"}}),
        json!({"event": 3}),
    ] {
        let (st, e, _) = call(
            &c,
            Method::POST,
            &url("/machines/m/i/user-1234/events"),
            Some(&s.operator),
            Some(bad),
        )
        .await;
        assert_eq!((st, e["code"].as_str()), (400, Some("invalid-parameters")));
    }
    // Reads: allowRead says viewers may not; the operator may; unknown instances are 404.
    let (st, v, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i/user-1234"),
        Some(&s.operator),
        None,
    )
    .await;
    assert_eq!((st, v["state"].as_str()), (200, Some("off")));
    let (st, e, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i/user-1234"),
        Some(&s.viewer),
        None,
    )
    .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (403, Some("rejected-by-machine-authorizer"))
    );
    let (st, e, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i/nobody"),
        Some(&s.operator),
        None,
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (404, Some("not-found")));
    // Admin view shows the full context; operators may not see it.
    let (st, a, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i/user-1234/admin"),
        Some(&s.admin),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(a["context"]["public"]["flips"], 12);
    let (st, e, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i/user-1234/admin"),
        Some(&s.operator),
        None,
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (403, Some("missing-scope")));
    // History, with cursor paging.
    let (_, h, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i/user-1234/events?limit=2"),
        Some(&s.viewer),
        None,
    )
    .await;
    let types: Vec<&str> = h["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["xstate.init", "FLIP"]);
    let cursor = h["cursor"].as_str().unwrap();
    let (_, h2, _) = call(
        &c,
        Method::GET,
        &url(&format!(
            "/machines/m/i/user-1234/events?limit=2&cursor={cursor}"
        )),
        Some(&s.viewer),
        None,
    )
    .await;
    assert_eq!(
        h2["events"][0]["event"],
        json!({"type": "FLIP", "why": "test"})
    );
    assert_eq!(h2["events"][0]["from"], json!(["on"]));
    assert_eq!(h2["events"][0]["to"], json!(["off"]));
    // Pause: events are refused with 409 invalid-state until resumed.
    let (st, _, _) = call(
        &c,
        Method::PUT,
        &url("/machines/m/i/user-1234/status"),
        Some(&s.admin),
        Some(json!({"status": "paused"})),
    )
    .await;
    assert_eq!(st, 200);
    let (st, e, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/i/user-1234/events"),
        Some(&s.operator),
        Some(json!({"event": "FLIP"})),
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (409, Some("invalid-state")));
    call(
        &c,
        Method::PUT,
        &url("/machines/m/i/user-1234/status"),
        Some(&s.admin),
        Some(json!({"status": "running"})),
    )
    .await;
    let (st, _, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/i/user-1234/events"),
        Some(&s.operator),
        Some(json!({"event": "FLIP"})),
    )
    .await;
    assert_eq!(st, 200);
    // Final state: done, further events ignored without error.
    let (_, v, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/i/user-1234/events"),
        Some(&s.operator),
        Some(json!({"event": "FINISH"})),
    )
    .await;
    assert_eq!(
        (v["state"].as_str(), v["done"].as_bool()),
        (Some("done"), Some(true))
    );
    let (st, v, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/i/user-1234/events"),
        Some(&s.operator),
        Some(json!({"event": "FLIP"})),
    )
    .await;
    assert_eq!((st, v["state"].as_str()), (200, Some("done")));
    // Listing with cursor.
    for i in 0..3 {
        call(
            &c,
            Method::POST,
            &url("/machines/m"),
            Some(&s.operator),
            Some(json!({"slug": format!("dev-{i}")})),
        )
        .await;
    }
    let (_, l, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i?limit=2"),
        Some(&s.viewer),
        None,
    )
    .await;
    let first: Vec<&str> = l["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["slug"].as_str().unwrap())
        .collect();
    assert_eq!(first, ["dev-0", "dev-1"]);
    let (_, l, _) = call(
        &c,
        Method::GET,
        &url(&format!(
            "/machines/m/i?limit=2&cursor={}",
            l["cursor"].as_str().unwrap()
        )),
        Some(&s.viewer),
        None,
    )
    .await;
    let second: Vec<&str> = l["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["slug"].as_str().unwrap())
        .collect();
    assert_eq!(second, ["dev-2", "user-1234"]);
    // Delete needs admin and the confirmation body.
    let (st, e, _) = call(
        &c,
        Method::DELETE,
        &url("/machines/m/i/dev-0"),
        Some(&s.admin),
        Some(json!({})),
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (400, Some("invalid-parameters")));
    let (st, _, _) = call(
        &c,
        Method::DELETE,
        &url("/machines/m/i/dev-0"),
        Some(&s.operator),
        Some(json!({"dangerDataWillBeDeletedForever": true})),
    )
    .await;
    assert_eq!(st, 403);
    let (st, _, _) = call(
        &c,
        Method::DELETE,
        &url("/machines/m/i/dev-0"),
        Some(&s.admin),
        Some(json!({"dangerDataWillBeDeletedForever": true})),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i/dev-0"),
        Some(&s.admin),
        None,
    )
    .await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_write_guards_initialization() {
    let mut def = toggle();
    def["authorizers"]["allowWrite"] =
        json!("type != \"initialization\" || auth.role == \"owner\"");
    let s = setup(def).await;
    let c = s.gw.client();
    let (st, e, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m"),
        Some(&s.operator),
        Some(json!({"slug": "a"})),
    )
    .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (403, Some("rejected-by-machine-authorizer"))
    );
    let (st, _, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m"),
        Some(&s.gw.owner_key),
        Some(json!({"slug": "a"})),
    )
    .await;
    assert_eq!(st, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_upgrades_apply_on_the_next_event_or_say_no_migration_path() {
    let s = setup(toggle()).await;
    let c = s.gw.client();
    let url = |p: &str| s.gw.url(p);
    call(
        &c,
        Method::POST,
        &url("/machines/m"),
        Some(&s.operator),
        Some(json!({"slug": "u"})),
    )
    .await;
    // v2 lacks the state `off`: no migration path while the instance is there.
    let v2_def = json!({"id": "toggle", "initial": "on", "states": {"on": {"on": {"FLIP": "on2"}}, "on2": {}}});
    let (_, v2, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/v"),
        Some(&s.admin),
        Some(json!({"definition": v2_def})),
    )
    .await;
    let v2 = v2["machineVersionId"].as_str().unwrap().to_string();
    let (st, e, _) = call(
        &c,
        Method::PUT,
        &url("/machines/m/i/u/v"),
        Some(&s.admin),
        Some(json!({"targetMachineVersionId": v2})),
    )
    .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (400, Some("no-migration-path")),
        "{e}"
    );
    // v3 has `off` and a new event.
    let mut v3_def = toggle();
    v3_def["states"]["off"]["on"]["JUMP"] = json!("on");
    let (_, v3, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/v"),
        Some(&s.admin),
        Some(json!({"definition": v3_def})),
    )
    .await;
    let v3 = v3["machineVersionId"].as_str().unwrap().to_string();
    let (st, _, _) = call(
        &c,
        Method::PUT,
        &url("/machines/m/i/u/v"),
        Some(&s.admin),
        Some(json!({"targetMachineVersionId": v3})),
    )
    .await;
    assert_eq!(st, 200);
    let (_, v, _) = call(
        &c,
        Method::POST,
        &url("/machines/m/i/u/events"),
        Some(&s.operator),
        Some(json!({"event": "JUMP"})),
    )
    .await;
    assert_eq!(v["state"], "on", "the event ran on v3");
    let (_, a, _) = call(
        &c,
        Method::GET,
        &url("/machines/m/i/u/admin"),
        Some(&s.admin),
        None,
    )
    .await;
    assert_eq!(a["machineVersionId"], v3.as_str());
    let (st, e, _) = call(
        &c,
        Method::PUT,
        &url("/machines/m/i/u/v"),
        Some(&s.admin),
        Some(json!({"targetMachineVersionId": "mv_nope"})),
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (404, Some("not-found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_appends_a_transition_row() {
    let s = setup(toggle()).await;
    let c = s.gw.client();
    call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m"),
        Some(&s.operator),
        Some(json!({"slug": "r"})),
    )
    .await;
    call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m/i/r/events"),
        Some(&s.operator),
        Some(json!({"event": {"type": "FLIP", "n": 1}})),
    )
    .await;
    let (_, ex, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/api/chain/state-machines/m/explore"),
        Some(&s.gw.owner_key),
        None,
    )
    .await;
    let rows = ex["rows"].as_array().unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r["type"].as_str().unwrap()).collect();
    assert_eq!(
        &kinds[kinds.len() - 3..],
        ["version_created", "instance_created", "transition"]
    );
    let t = &rows[rows.len() - 1]["payload"];
    assert_eq!(t["instance"], "r");
    assert_eq!(t["event"], "FLIP");
    assert_eq!(t["from"], json!(["off"]));
    assert_eq!(t["to"], json!(["on"]));
    // The payload hash is of the canonical event data.
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(br#"{"n":1}"#)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(t["payload_hash"], want.as_str());
    let (_, v, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/api/chain/state-machines/m/pohc/validate"),
        Some(&s.gw.owner_key),
        None,
    )
    .await;
    assert_eq!(v["valid"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_stream_pushes_instance_updates() {
    let s = setup(toggle()).await;
    let c = s.gw.client();
    call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m"),
        Some(&s.operator),
        Some(json!({"slug": "l"})),
    )
    .await;
    let mut res = c
        .get(s.gw.url("/machines/m/i/l/sse"))
        .bearer_auth(&s.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let first = next_update(&mut res).await;
    assert_eq!(first["state"], "off");
    call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m/i/l/events"),
        Some(&s.operator),
        Some(json!({"event": "FLIP"})),
    )
    .await;
    let second = next_update(&mut res).await;
    assert_eq!(second["state"], "on");
    assert_eq!(second["publicContext"]["flips"], 1);
}

async fn next_update(res: &mut reqwest::Response) -> Value {
    let mut buf = String::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), res.chunk())
            .await
            .expect("sse")
            .unwrap()
            .expect("open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(end) = buf.find("\n\n") {
            let event = &buf[..end];
            if event.contains("event:instance-update") {
                let data = event.lines().find_map(|l| l.strip_prefix("data:")).unwrap();
                return serde_json::from_str(data).unwrap();
            }
            buf.drain(..end + 2);
        }
    }
}

fn timed() -> Value {
    json!({
        "id": "timed",
        "initial": "waiting",
        "states": {
            "waiting": {"after": {"DELAY": "fired"}},
            "fired": {"tags": ["fired"]}
        }
    })
}

/// Timers survive SIGKILL: after restart each fires once, in due order, even though they
/// came due while the gateway was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_timers_fire_once_each_in_due_order_after_sigkill() {
    let mut s = setup(json!({"id": "x", "initial": "a", "states": {"a": {}}})).await;
    let c = s.gw.client();
    // Five versions with delays 1.5 s .. 2.3 s; instances created in reverse delay order.
    let mut expected = Vec::new();
    for (n, delay) in [2300, 2100, 1900, 1700, 1500].iter().enumerate() {
        let def = timed()
            .to_string()
            .replace("\"DELAY\"", &format!("\"{delay}\""));
        let (_, v, _) = call(
            &c,
            Method::POST,
            &s.gw.url("/machines/m/v"),
            Some(&s.admin),
            Some(json!({"definition": serde_json::from_str::<Value>(&def).unwrap()})),
        )
        .await;
        let vid = v["machineVersionId"].as_str().unwrap();
        let (st, b, _) = call(
            &c,
            Method::POST,
            &s.gw.url("/machines/m"),
            Some(&s.operator),
            Some(json!({"slug": format!("t{n}"), "machineVersionId": vid})),
        )
        .await;
        assert_eq!(st, 200, "{b}");
        expected.push((b["ts"].as_i64().unwrap() + delay, format!("t{n}")));
    }
    s.gw.kill();
    tokio::time::sleep(Duration::from_millis(2600)).await;
    s.gw.spawn();
    let c = s.gw.client();
    tokio::time::sleep(Duration::from_millis(500)).await;
    expected.sort();
    let (_, ex, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/api/chain/state-machines/m/explore"),
        Some(&s.gw.owner_key),
        None,
    )
    .await;
    let fired: Vec<String> = ex["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "transition" && r["payload"]["event"] == "xstate.after")
        .map(|r| r["payload"]["instance"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = expected.iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(fired, want, "each timer fired once, in due order");
    for (_, slug) in &expected {
        let (_, v, _) = call(
            &c,
            Method::GET,
            &s.gw.url(&format!("/machines/m/i/{slug}")),
            Some(&s.admin),
            None,
        )
        .await;
        assert_eq!(v["state"], "fired");
    }
    // And nothing fires twice later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, ex2, _) = call(
        &c,
        Method::GET,
        &s.gw.url("/api/chain/state-machines/m/explore"),
        Some(&s.gw.owner_key),
        None,
    )
    .await;
    assert_eq!(ex2["size"], ex["size"]);
}

/// The heartbeat example goes online → stale → offline on time with no messages, and back
/// online on the next heartbeat, also across a restart (shortened delays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_watchdog_runs_on_time_across_a_restart() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/firmware-config/machines/heartbeat.json"
    ))
    .unwrap();
    let def: Value = serde_json::from_str(
        &text
            .replace("\"30000\"", "\"600\"")
            .replace("\"60000\"", "\"900\""),
    )
    .unwrap();
    let mut s = setup(def).await;
    let c = s.gw.client();
    let (_, v, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m"),
        Some(&s.operator),
        Some(json!({"slug": "dev"})),
    )
    .await;
    assert_eq!(v["state"], "online");
    let state = |s: &Setup| {
        let c = s.gw.client();
        let url = s.gw.url("/machines/m/i/dev");
        let key = s.admin.clone();
        async move {
            call(&c, Method::GET, &url, Some(&key), None).await.1["state"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&s).await, "online");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(state(&s).await, "stale");
    s.gw.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.gw.spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        state(&s).await,
        "offline",
        "the stale → offline timer fired after the restart"
    );
    let c = s.gw.client();
    let (_, v, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m/i/dev/events"),
        Some(&s.operator),
        Some(json!({"event": {"type": "HEARTBEAT", "ts": 42}})),
    )
    .await;
    assert_eq!(v["state"], "online");
    assert_eq!(
        v["publicContext"],
        json!({"heartbeats": 1, "last_seen": 42})
    );
    assert_eq!(v["tags"], json!(["online"]));
}

/// A websocket to the gateway's `/rt` over real TLS (trusting only its certificate), with the
/// key as `?token=` like statebacked's client, or anonymous.
async fn rt_connect(
    gw: &Gw,
    token: Option<&str>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&gw.cert_pem()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let addr: std::net::SocketAddr = gw.addr.parse().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let url = match token {
        Some(t) => format!("wss://{}/rt?token={t}", gw.addr),
        None => format!("wss://{}/rt", gw.addr),
    };
    tokio_tungstenite::client_async(url, tls)
        .await
        .map(|(ws, _)| ws)
}

/// The next JSON text message, failing after 10 s.
async fn rt_next<S>(ws: &mut S) -> Value
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("socket open")
            .expect("no socket error");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

async fn rt_send<S>(ws: &mut S, v: Value)
where
    S: futures_util::Sink<tokio_tungstenite::tungstenite::Message> + Unpin,
    S::Error: std::fmt::Debug,
{
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(v.to_string()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_websocket_speaks_statebackeds_protocol() {
    let s = setup(toggle()).await;
    let c = s.gw.client();
    for i in ["lamp", "other"] {
        let (st, b, _) = call(
            &c,
            Method::POST,
            &s.gw.url("/machines/m"),
            Some(&s.admin),
            Some(json!({"slug": i})),
        )
        .await;
        assert_eq!(st, 200, "{b}");
    }

    // A key that does not authenticate is refused before the upgrade.
    match rt_connect(&s.gw, Some("zsm_notakey")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 401)
        }
        other => panic!("bad token was not refused with 401: {other:?}"),
    }

    let mut ws = rt_connect(&s.gw, Some(&s.operator)).await.unwrap();
    rt_send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(rt_next(&mut ws).await, json!({"type": "pong"}));

    // Subscribing sends the current state at once.
    let sub = json!({"type": "subscribe-to-instance", "machineName": "m",
        "machineInstanceName": "lamp", "requestId": "r1"});
    rt_send(&mut ws, sub).await;
    let u = rt_next(&mut ws).await;
    assert_eq!(u["type"], "instance-update", "{u}");
    assert_eq!(u["machineName"], "m");
    assert_eq!(u["machineInstanceName"], "lamp");
    assert_eq!(u["state"], "off");
    assert_eq!(u["publicContext"], json!({"flips": 0}));
    assert_eq!(u["tags"], json!(["idle"]));
    assert_eq!(u["done"], false);
    assert!(
        u.get("context").is_none() && !u.to_string().contains("s3"),
        "{u}"
    );

    // Events on other instances send nothing; an event on the subscribed one sends its state.
    for (inst, n) in [("other", 1), ("lamp", 1)] {
        let (st, b, _) = call(
            &c,
            Method::POST,
            &s.gw.url(&format!("/machines/m/i/{inst}/events")),
            Some(&s.operator),
            Some(json!({"event": "FLIP"})),
        )
        .await;
        assert_eq!(st, 200, "{inst} {n}: {b}");
    }
    let u = rt_next(&mut ws).await;
    assert_eq!(
        (u["machineInstanceName"].as_str(), u["state"].as_str()),
        (Some("lamp"), Some("on")),
        "{u}"
    );
    assert_eq!(u["publicContext"], json!({"flips": 1}));

    // Unknown instances and malformed messages get an error naming the request.
    rt_send(
        &mut ws,
        json!({"type": "subscribe-to-instance", "machineName": "m",
            "machineInstanceName": "nope", "requestId": "r2"}),
    )
    .await;
    let e = rt_next(&mut ws).await;
    assert_eq!(
        e,
        json!({"type": "error", "requestId": "r2", "status": 404, "code": "not-found",
            "error": e["error"]})
    );
    rt_send(
        &mut ws,
        json!({"type": "subscribe-to-instance", "requestId": "r3"}),
    )
    .await;
    let e = rt_next(&mut ws).await;
    assert_eq!(
        (e["status"].as_u64(), e["requestId"].as_str()),
        (Some(400), Some("r3"))
    );

    // After unsubscribing, changes send nothing: the next message is the pong.
    rt_send(
        &mut ws,
        json!({"type": "unsubscribe-from-instance", "machineName": "m",
            "machineInstanceName": "lamp", "requestId": "r1"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (st, _, _) = call(
        &c,
        Method::POST,
        &s.gw.url("/machines/m/i/lamp/events"),
        Some(&s.operator),
        Some(json!({"event": "FLIP"})),
    )
    .await;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    rt_send(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(rt_next(&mut ws).await, json!({"type": "pong"}));

    // allowRead applies: the toggle machine's authorizer rejects viewers.
    let mut viewer = rt_connect(&s.gw, Some(&s.viewer)).await.unwrap();
    rt_send(
        &mut viewer,
        json!({"type": "subscribe-to-instance", "machineName": "m",
            "machineInstanceName": "lamp", "requestId": "v1"}),
    )
    .await;
    let e = rt_next(&mut viewer).await;
    assert_eq!(
        (e["status"].as_u64(), e["code"].as_str()),
        (Some(403), Some("rejected-by-machine-authorizer")),
        "{e}"
    );

    // Anonymous callers see public machines only; `m` is private.
    let mut anon = rt_connect(&s.gw, None).await.unwrap();
    rt_send(
        &mut anon,
        json!({"type": "subscribe-to-instance", "machineName": "m",
            "machineInstanceName": "lamp", "requestId": "a1"}),
    )
    .await;
    let e = rt_next(&mut anon).await;
    assert!(
        matches!(e["status"].as_u64(), Some(401 | 404)),
        "anonymous read of a private machine: {e}"
    );
}
