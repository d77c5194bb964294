//! The authorization matrix of every endpoint beyond spec 000 (whose matrix is in
//! machines_api.rs): statebacked's instances API, the zeq chain reads and writes, pages, dead
//! letters, sync status, agents and the tally. Each endpoint is called on a private machine by
//! seven callers: anonymous, a foreign account, a foreign machine's admin key, this machine's
//! viewer, operator and admin keys, and the owner; the status each gets is checked against the
//! table below, and writes that were refused are checked to have changed nothing.

mod common;

use common::{call, cli, line_value, Gw};
use reqwest::Method;
use serde_json::{json, Value};

const MANY: &[(&str, &str)] = &[
    ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000"),
    ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "10000000"),
    ("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "10000000"),
];

const CALLERS: [&str; 7] = [
    "anonymous",
    "foreign account",
    "foreign machine key",
    "viewer",
    "operator",
    "admin",
    "owner",
];

fn toggle() -> Value {
    json!({"id": "toggle", "initial": "off", "context": {"public": {"n": 0}},
        "states": {"off": {"on": {"FLIP": "on"}}, "on": {"on": {"FLIP": "off"}}}})
}

struct World {
    gw: Gw,
    /// Keys in CALLERS order (None for anonymous).
    keys: Vec<Option<String>>,
    version: String,
    run: String,
    owner_zid: String,
    /// A Zeqond with a block on `m`'s chain.
    zeqond: u64,
}

async fn post(gw: &Gw, key: &str, path: &str, body: Value) -> Value {
    let (s, b, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url(path),
        Some(key),
        Some(body),
    )
    .await;
    assert!((200..300).contains(&s), "{path}: {s} {b}");
    b
}

/// A private machine `m` with viewer/operator/admin keys, a version, instances, a page and an
/// agent run; a second account with its own machine `f`.
async fn world() -> World {
    let mut gw = Gw::start(MANY);
    gw.stop();
    let (ok, out, err) = cli(&gw.data(), &["account", "create", "--name", "stranger"]);
    assert!(ok, "{err}");
    let (foreign_zid, foreign_account) = (line_value(&out, "account "), line_value(&out, "key "));
    for zid in [gw.owner_zid.clone(), foreign_zid] {
        let (ok, _, err) = cli(&gw.data(), &["account", "credit", &zid, "100000"]);
        assert!(ok, "{err}");
    }
    gw.spawn();
    let owner = gw.owner_key.clone();
    let b = post(
        &gw,
        &owner,
        "/api/chain/state-machines",
        json!({"slug": "m"}),
    )
    .await;
    let admin = b["api_key"].as_str().unwrap().to_string();
    let b = post(
        &gw,
        &foreign_account,
        "/api/chain/state-machines",
        json!({"slug": "f"}),
    )
    .await;
    let foreign_key = b["api_key"].as_str().unwrap().to_string();
    let mut roles = Vec::new();
    for role in ["viewer", "operator"] {
        let b = post(
            &gw,
            &admin,
            "/api/chain/m/api-keys",
            json!({"name": role, "scope": role}),
        )
        .await;
        roles.push(b["api_key"].as_str().unwrap().to_string());
    }
    let b = post(
        &gw,
        &owner,
        "/machines/m/v",
        json!({"definition": toggle(), "clientInfo": "v1", "makeCurrent": true}),
    )
    .await;
    let version = b["machineVersionId"].as_str().unwrap().to_string();
    // One instance everyone reads, and one per caller for the writes that consume it.
    post(&gw, &owner, "/machines/m", json!({"slug": "lamp"})).await;
    for i in 0..CALLERS.len() {
        post(
            &gw,
            &owner,
            "/machines/m",
            json!({"slug": format!("del-{i}")}),
        )
        .await;
    }
    post(
        &gw,
        &owner,
        "/api/chain/state-machines/m/event",
        json!({"type": "boot", "payload": {"n": 1}}),
    )
    .await;
    post(
        &gw,
        &owner,
        "/api/chain/state-machines/m/event",
        json!({"type": "boot", "payload": {"n": 2}}),
    )
    .await;
    for v in ["<p>one</p>", "<p>two</p>"] {
        post(
            &gw,
            &owner,
            "/api/state-machines/m/pages/home/publish",
            json!({"title": "Home", "html": v, "agentZid": "ZEQ-agent-1"}),
        )
        .await;
    }
    let b = post(
        &gw,
        &owner,
        "/api/zeq/agent/spawn",
        json!({"problem": "keep searching target=1e300", "population": 2, "generations": 10,
            "precision": 0.001, "slug": "m"}),
    )
    .await;
    let run = b["agent_id"].as_str().unwrap().to_string();
    let owner_zid = gw.owner_zid.clone();
    let (_, st, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url("/api/chain/state-machines/m/state"),
        Some(&owner),
        None,
    )
    .await;
    let zeqond = st["latest"]["zeqond"]
        .as_u64()
        .unwrap_or_else(|| panic!("no latest row in {st}"));
    World {
        keys: vec![
            None,
            Some(foreign_account),
            Some(foreign_key),
            Some(roles[0].clone()),
            Some(roles[1].clone()),
            Some(admin),
            Some(owner),
        ],
        gw,
        version,
        run,
        owner_zid,
        zeqond,
    }
}

/// (method, path, body, expected statuses in CALLERS order). `{i}` in a path or body is the
/// caller's index, so consuming writes (deletes, kills) each get their own target.
type Case = (Method, String, Option<Value>, [u16; 7]);

fn cases(w: &World) -> Vec<Case> {
    use Method as M;
    let (v, run, zid) = (&w.version, &w.run, &w.owner_zid);
    let chain = "/api/chain/state-machines/m";
    let pages = "/api/state-machines/m/pages";
    // Reads of a private machine: outsiders do not learn it exists (statebacked says 404 to
    // keys that cannot see it; anonymous is asked to authenticate).
    const READ: [u16; 7] = [401, 404, 404, 200, 200, 200, 200];
    const SB_READ: [u16; 7] = [401, 404, 404, 200, 200, 200, 200];
    // Spec 001: page reads are public ("Auth: none"), even on a private machine.
    const PUBLIC: [u16; 7] = [200; 7];
    // Spec 001 writes: "owner / machine key"; a viewer key is a machine key for reading only.
    const PAGE_WRITE: [u16; 7] = [401, 404, 404, 403, 201, 201, 201];
    let c = |m: Method, p: String, b: Option<Value>, e: [u16; 7]| (m, p, b, e);
    vec![
        // Agents first, while the run (10 generations, one per Zeqond) is still live.
        c(
            M::GET,
            format!("/api/zeq/agent/status/{run}"),
            None,
            [401, 404, 404, 200, 200, 200, 200],
        ),
        c(
            M::GET,
            format!("/api/zeq/agent/lineage/{run}"),
            None,
            [401, 404, 404, 200, 200, 200, 200],
        ),
        c(
            M::POST,
            format!("/api/zeq/agent/tick/{run}"),
            None,
            [401, 404, 404, 403, 403, 200, 200],
        ),
        c(
            M::GET,
            format!("/api/tally/account/{zid}"),
            None,
            [401, 403, 403, 403, 403, 403, 200],
        ),
        // statebacked (specs 002/003)
        c(M::GET, "/machines/m".into(), None, SB_READ),
        c(M::GET, "/machines/m/v".into(), None, SB_READ),
        c(
            M::POST,
            "/machines/m/v".into(),
            Some(json!({"definition": toggle(), "clientInfo": "c{i}"})),
            [401, 404, 404, 403, 403, 200, 200],
        ),
        c(
            M::POST,
            "/machines/m".into(),
            Some(json!({"slug": "new-{i}"})),
            [401, 404, 404, 403, 200, 200, 200],
        ),
        c(M::GET, "/machines/m/i".into(), None, SB_READ),
        c(M::GET, "/machines/m/i/lamp".into(), None, SB_READ),
        c(
            M::POST,
            "/machines/m/i/lamp/events".into(),
            Some(json!({"event": "FLIP"})),
            [401, 404, 404, 403, 200, 200, 200],
        ),
        c(M::GET, "/machines/m/i/lamp/events".into(), None, SB_READ),
        c(
            M::GET,
            "/machines/m/i/lamp/admin".into(),
            None,
            [401, 404, 404, 403, 403, 200, 200],
        ),
        c(
            M::PUT,
            "/machines/m/i/lamp/status".into(),
            Some(json!({"status": "running"})),
            [401, 404, 404, 403, 403, 200, 200],
        ),
        c(
            M::PUT,
            "/machines/m/i/lamp/v".into(),
            Some(json!({"targetMachineVersionId": v})),
            [401, 404, 404, 403, 403, 200, 200],
        ),
        c(
            M::DELETE,
            "/machines/m/i/del-{i}".into(),
            Some(json!({"dangerDataWillBeDeletedForever": true})),
            [401, 404, 404, 403, 403, 200, 200],
        ),
        // zeq chain
        c(
            M::POST,
            format!("{chain}/event"),
            Some(json!({"type": "t{i}", "payload": {"i": "{i}"}})),
            [401, 404, 404, 403, 201, 201, 201],
        ),
        c(M::GET, format!("{chain}/state"), None, READ),
        c(
            M::GET,
            format!("{chain}/block?zeqond={}", w.zeqond),
            None,
            READ,
        ),
        c(M::GET, format!("{chain}/explore?from=0&to=5"), None, READ),
        c(
            M::GET,
            format!("{chain}/pohc/validate?from=0&to=5"),
            None,
            READ,
        ),
        c(M::GET, format!("{chain}/checkpoint"), None, READ),
        c(
            M::GET,
            format!("{chain}/proof/inclusion?seq=0&size=2"),
            None,
            READ,
        ),
        c(
            M::GET,
            format!("{chain}/proof/consistency?from=1&to=2"),
            None,
            READ,
        ),
        c(M::GET, format!("{chain}/dead-letters"), None, READ),
        // pages (spec 001)
        c(M::GET, pages.into(), None, PUBLIC),
        c(M::GET, format!("{pages}/home"), None, PUBLIC),
        c(M::GET, format!("{pages}/home/history"), None, PUBLIC),
        c(
            M::POST,
            format!("{pages}/p{{i}}/publish"),
            Some(json!({"title": "T", "html": "<p>{i}</p>", "agentZid": "ZEQ-agent-1"})),
            PAGE_WRITE,
        ),
        c(
            M::POST,
            format!("{pages}/home/rollback"),
            Some(json!({"version": 1})),
            PAGE_WRITE,
        ),
        c(
            M::POST,
            format!("{pages}/p{{i}}/unpublish"),
            None,
            [401, 404, 404, 403, 200, 200, 200],
        ),
        // gateway-wide
        c(
            M::GET,
            "/api/sync/status".into(),
            None,
            [401, 200, 200, 200, 200, 200, 200],
        ),
    ]
}

fn fill(s: &str, i: usize) -> String {
    s.replace("{i}", &i.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_for_every_kind_of_caller() {
    let w = world().await;
    let c = w.gw.client();
    let mut table = String::new();
    let mut wrong = Vec::new();
    for (method, path, body, expected) in cases(&w) {
        let mut got = [0u16; 7];
        for (i, key) in w.keys.iter().enumerate() {
            let body = body
                .as_ref()
                .map(|b| serde_json::from_str(&fill(&b.to_string(), i)).unwrap());
            let (s, b, _) = call(
                &c,
                method.clone(),
                &w.gw.url(&fill(&path, i)),
                key.as_deref(),
                body,
            )
            .await;
            got[i] = s;
            if s != expected[i] {
                wrong.push(format!(
                    "{method} {path} as {}: {s} (want {}) {b}",
                    CALLERS[i], expected[i]
                ));
            }
        }
        table.push_str(&format!("{:<7} {:<55} {:?}\n", method.as_str(), path, got));
    }
    println!("{table}");
    assert!(
        wrong.is_empty(),
        "unexpected statuses:\n{}",
        wrong.join("\n")
    );

    // Refused writes changed nothing; allowed ones took effect.
    let owner = w.keys[6].as_deref();
    let get = |path: String| {
        let c = c.clone();
        let url = w.gw.url(&path);
        async move { call(&c, Method::GET, &url, owner, None).await }
    };
    for (i, who) in CALLERS.iter().enumerate() {
        let (s, _, _) = get(format!("/machines/m/i/del-{i}")).await;
        let deleted = i >= 5;
        assert_eq!(
            s,
            if deleted { 404 } else { 200 },
            "del-{i} after {who}'s DELETE"
        );
        let (s, _, _) = get(format!("/machines/m/i/new-{i}")).await;
        assert_eq!(
            s,
            if i >= 4 { 200 } else { 404 },
            "new-{i} after {who}'s create"
        );
        // Published then unpublished by operator and up; never created below.
        let (s, b, _) = get(format!("/api/state-machines/m/pages/p{i}/history")).await;
        assert_eq!(
            s,
            if i >= 4 { 200 } else { 404 },
            "page p{i} after {who}: {b}"
        );
        if i >= 4 {
            assert_eq!(b["versions"].as_array().map(Vec::len), Some(1), "{b}");
            assert_eq!(b["versions"][0]["live"], false, "p{i} unpublished: {b}");
        }
    }
    let (_, versions, _) = get("/machines/m/v".into()).await;
    let infos: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["clientInfo"].as_str())
        .collect();
    assert_eq!(infos, ["v1", "c5", "c6"], "versions after the matrix");
    let (_, rows, _) = get("/api/chain/state-machines/m/explore?from=0&to=10000".into()).await;
    let text = rows.to_string();
    for i in 0..CALLERS.len() {
        assert_eq!(
            text.contains(&format!("\"type\":\"t{i}\"")),
            i >= 4,
            "event t{i} by {} in the log",
            CALLERS[i]
        );
    }
    // Gateway-wide sync status lists only the machines the caller administers.
    for (i, key) in w.keys.iter().enumerate().skip(1) {
        let (_, b, _) = call(
            &c,
            Method::GET,
            &w.gw.url("/api/sync/status"),
            key.as_deref(),
            None,
        )
        .await;
        let sees_m = b.to_string().contains("\"slug\":\"m\"");
        assert_eq!(sees_m, i >= 5, "{} sees m in sync status: {b}", CALLERS[i]);
    }
}
