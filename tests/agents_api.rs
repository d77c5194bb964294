//! Agent runs and the tally (spec 004) over real TLS: every body code and range, the wallet
//! (402 leaves everything untouched), chain membership, quota, tick / kill / status /
//! lineage / list / mesh, ticker cadence, determinism across data dirs and restarts, BYOK
//! against a local OpenAI-compatible server, and `smgate account credit`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{call, cli, line_value, Gw};
use reqwest::Method;
use serde_json::{json, Value};
use smgate::agents::{self, problem::Problem, search};

const ZEQOND_MS: u64 = 777;
/// A target no chain comes near, so runs last all their generations.
const LONG: &str = "keep searching target=1e300";

fn credit(gw: &Gw, zid: &str, amount: i64) {
    let (ok, out, err) = cli(&gw.data(), &["account", "credit", zid, &amount.to_string()]);
    assert!(ok, "credit failed: {err}");
    assert!(out.contains("balance"), "{out}");
}

fn new_account(gw: &Gw) -> (String, String) {
    let (ok, out, err) = cli(&gw.data(), &["account", "create", "--name", "other"]);
    assert!(ok, "{err}");
    (line_value(&out, "account "), line_value(&out, "key "))
}

/// A gateway whose owner holds `amount` ZEQ, plus `extra` funded accounts (ZID, key).
fn funded(env: &[(&str, &str)], amount: i64, extra: usize) -> (Gw, Vec<(String, String)>) {
    let mut gw = Gw::start(env);
    gw.stop();
    if amount > 0 {
        credit(&gw, &gw.owner_zid.clone(), amount);
    }
    let others: Vec<_> = (0..extra)
        .map(|_| {
            let (zid, key) = new_account(&gw);
            credit(&gw, &zid, amount.max(1));
            (zid, key)
        })
        .collect();
    gw.spawn();
    (gw, others)
}

fn body(problem: &str, population: u64, generations: u64) -> Value {
    json!({"problem": problem, "population": population, "generations": generations, "precision": 0.001})
}

async fn spawn(gw: &Gw, key: &str, b: Value) -> (u16, Value) {
    let (s, v, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url("/api/zeq/agent/spawn"),
        Some(key),
        Some(b),
    )
    .await;
    (s, v)
}

async fn get(gw: &Gw, key: Option<&str>, path: &str) -> (u16, Value) {
    let (s, v, _) = call(&gw.client(), Method::GET, &gw.url(path), key, None).await;
    (s, v)
}

async fn post(gw: &Gw, key: Option<&str>, path: &str) -> (u16, Value) {
    let (s, v, _) = call(&gw.client(), Method::POST, &gw.url(path), key, None).await;
    (s, v)
}

async fn balance(gw: &Gw, zid: &str, key: &str) -> i64 {
    let (s, v) = get(gw, Some(key), &format!("/api/tally/account/{zid}")).await;
    assert_eq!(s, 200, "{v}");
    v["balance"].as_i64().unwrap()
}

async fn rows(gw: &Gw, slug: &str, key: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let (s, b) = get(
            gw,
            Some(key),
            &format!(
                "/api/chain/state-machines/{slug}/explore?from={from}&to={}",
                from + 100_000
            ),
        )
        .await;
        if s == 404 {
            return out;
        }
        assert_eq!(s, 200, "{b}");
        out.extend(b["rows"].as_array().unwrap().iter().cloned());
        match b["next"].as_u64() {
            Some(n) => from = n,
            None => return out,
        }
    }
}

async fn wait_done(gw: &Gw, key: &str, id: &str, secs: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let (s, v) = get(gw, Some(key), &format!("/api/zeq/agent/status/{id}")).await;
        assert_eq!(s, 200, "{v}");
        if v["status"] != "running" {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run {id} did not finish: {v}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_checks_every_field_and_range_of_spec_004() {
    let (gw, _) = funded(
        &[("SMGATE_AGENTS_MAX_LIVE_PER_ACCOUNT", "1000")],
        100_000,
        0,
    );
    let k = gw.owner_key.as_str();
    let ok = body("a", 1, 1);
    let with = |field: &str, v: Value| {
        let mut b = ok.clone();
        if v.is_null() {
            b.as_object_mut().unwrap().remove(field);
        } else {
            b[field] = v;
        }
        b
    };
    let cases = [
        (with("problem", Value::Null), "invalid_problem"),
        (with("problem", json!("")), "invalid_problem"),
        (with("problem", json!("   ")), "invalid_problem"),
        (with("problem", json!("x".repeat(501))), "invalid_problem"),
        (with("problem", json!(5)), "invalid_problem"),
        (with("population", json!(0)), "invalid_population"),
        (with("population", json!(11)), "invalid_population"),
        (with("population", json!(4.5)), "invalid_population"),
        (with("population", json!("4")), "invalid_population"),
        (with("population", Value::Null), "invalid_population"),
        (with("generations", json!(0)), "invalid_generations"),
        (with("generations", json!(11)), "invalid_generations"),
        (with("generations", json!(-1)), "invalid_generations"),
        (with("generations", Value::Null), "invalid_generations"),
        (with("precision", json!(0.00009)), "invalid_precision"),
        (with("precision", json!(0.1001)), "invalid_precision"),
        (with("precision", json!("0.01")), "invalid_precision"),
        (with("precision", Value::Null), "invalid_precision"),
        (
            with("credential_id", json!("not-a-uuid")),
            "invalid_credential_id",
        ),
        (
            with("parent_master_id", json!(17)),
            "invalid_parent_master_id",
        ),
        (with("slug", json!("Bad Slug")), "invalid_slug"),
        (json!([1, 2]), "invalid_body"),
    ];
    for (b, code) in cases {
        let (s, v) = spawn(&gw, k, b.clone()).await;
        assert_eq!((s, v["error"].as_str()), (400, Some(code)), "{b}: {v}");
        assert_eq!(v["ok"], false);
    }
    // The edges of every range are accepted.
    for b in [
        with("problem", json!("é".repeat(500))),
        with("population", json!(10)),
        with("generations", json!(10)),
        with("precision", json!(0.0001)),
        with("precision", json!(0.1)),
    ] {
        let (s, v) = spawn(&gw, k, b.clone()).await;
        assert_eq!(s, 200, "{b}: {v}");
    }
    // 401 without a key, with an unknown key, with a malformed one.
    for key in [None, Some("zeq_ak_unknownunknownunknown"), Some("garbage")] {
        let (s, v, _) = call(
            &gw.client(),
            Method::POST,
            &gw.url("/api/zeq/agent/spawn"),
            key,
            Some(ok.clone()),
        )
        .await;
        assert_eq!((s, v["error"].as_str()), (401, Some("unauthorized")), "{v}");
    }
    for path in [
        "/api/zeq/agent/list",
        "/api/zeq/agent/status/x",
        &format!("/api/tally/account/{}", gw.owner_zid),
    ] {
        assert_eq!(get(&gw, None, path).await.0, 401, "{path}");
    }
    assert_eq!(post(&gw, None, "/api/zeq/agent/tick/x").await.0, 401);
    assert_eq!(post(&gw, None, "/api/zeq/agent/kill/x").await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_charges_and_logs_atomically_on_the_callers_own_chain() {
    let (gw, _) = funded(&[], 1000, 0);
    let k = gw.owner_key.as_str();
    let zid = gw.owner_zid.as_str();
    let slug = zid.to_lowercase();
    // No machine yet: the first spawn creates the caller's own.
    let (s, t) = get(&gw, Some(k), &format!("/api/tally/account/{zid}")).await;
    assert_eq!(
        (s, t["machines"].as_u64(), t["balance"].as_i64()),
        (200, Some(0), Some(1000)),
        "{t}"
    );
    let (s, v) = spawn(
        &gw,
        k,
        body("optimal radiation shielding for 180-day Mars transit", 4, 3),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], true);
    let id = v["agent_id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
    let agent_zid = v["agent_zid"].as_str().unwrap();
    assert!(
        agent_zid.starts_with("ZID-") && agent_zid.len() == 12,
        "{agent_zid}"
    );
    assert_eq!(v["slug"], slug.as_str());
    assert_eq!(v["machine_created"], true);
    // 75 for the spawn (60 burned, 15 to the foundation) + 5 for the synchronous first tick (4 / 1).
    assert_eq!(
        v["tally_charge"],
        json!({"charged": 80, "burned": 64, "toFoundation": 16, "remainingAfter": 920})
    );
    let ft = &v["first_tick"];
    assert_eq!(ft["generation"], 0);
    assert!(ft["best_fitness"].as_f64().unwrap() >= 0.0);
    let ops: Vec<&str> = ft["operators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert_eq!(ops[0], "KO42");
    assert!((2..=4).contains(&ops.len()));
    assert!(
        ft["result"]["terms"].as_array().unwrap().len() == ops.len(),
        "{ft}"
    );
    assert!(ft["result"]["unit"].is_string());
    let (_, t) = get(&gw, Some(k), &format!("/api/tally/account/{zid}")).await;
    assert_eq!(t["slugs"], json!([slug]));
    // Rows: the machine's genesis, then charge, spawn, charge, tick — all in one commit.
    let all = rows(&gw, &slug, k).await;
    let kinds: Vec<&str> = all
        .iter()
        .take(6)
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "machine_created",
            "key_minted",
            "tally_charge",
            "agent_spawned",
            "tally_charge",
            "agent_tick"
        ]
    );
    assert_eq!(all[2]["payload"]["charged"], 75);
    assert_eq!(all[2]["payload"]["burned"], 60);
    assert_eq!(all[2]["payload"]["toFoundation"], 15);
    assert_eq!(all[4]["payload"]["charged"], 5);
    assert_eq!(all[3]["payload"]["agent_id"], id);
    assert_eq!(all[5]["payload"]["generation"], 0);
    assert_eq!(all[5]["payload"]["by"], "spawn");
    assert!(
        all[..6]
            .windows(2)
            .all(|w| w[0]["zeqond"] == w[1]["zeqond"]),
        "one transaction, one Zeqond"
    );
    // The run ends within 3 generations (no target: the default objective may converge
    // early); every tick was charged.
    let done = wait_done(&gw, k, id, 20).await;
    let ticks = done["ticks"].as_i64().unwrap();
    assert!((1..=3).contains(&ticks), "{done}");
    let converged = done["best_fitness"].as_f64().unwrap() <= 0.001;
    assert_eq!(
        done["status"],
        if converged { "converged" } else { "exhausted" }
    );
    assert!(converged || ticks == 3);
    assert_eq!(balance(&gw, zid, k).await, 1000 - 75 - 5 * ticks);
    let charges = rows(&gw, &slug, k)
        .await
        .iter()
        .filter(|r| r["type"] == "tally_charge")
        .count();
    assert_eq!(charges as i64, 1 + ticks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_balance_creates_and_changes_nothing() {
    let (gw, others) = funded(&[], 0, 1);
    let k = gw.owner_key.as_str();
    let zid = gw.owner_zid.as_str();
    // Balance 0, no machine: 402 and still no machine, no run.
    let (s, v) = spawn(&gw, k, body("x", 1, 1)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (402, Some("INSUFFICIENT_BALANCE")),
        "{v}"
    );
    assert_eq!(
        (v["balance"].as_i64(), v["required"].as_i64()),
        (Some(0), Some(75))
    );
    let (_, t) = get(&gw, Some(k), &format!("/api/tally/account/{zid}")).await;
    assert_eq!(
        (
            t["balance"].as_i64(),
            t["machines"].as_u64(),
            t["agents"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{t}"
    );
    let (_, l) = get(&gw, Some(k), "/api/zeq/agent/list").await;
    assert_eq!(l["count"], 0);
    // On an existing machine the log does not grow either.
    let (s, _, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(k),
        Some(json!({"slug": "poor"})),
    )
    .await;
    assert_eq!(s, 201);
    let before = rows(&gw, "poor", k).await;
    let mut b = body("x", 1, 1);
    b["slug"] = json!("poor");
    let (s, _) = spawn(&gw, k, b).await;
    assert_eq!(s, 402);
    assert_eq!(rows(&gw, "poor", k).await, before);
    assert_eq!(balance(&gw, zid, k).await, 0);
    // 75 ≤ balance < 80: the spawn is paid, the first tick is not; ticks wait for money.
    let (ozid, okey) = &others[0];
    let mut gw = gw;
    gw.stop();
    credit(&gw, ozid, 76);
    gw.spawn();
    let (s, v) = spawn(&gw, okey, body(LONG, 1, 3)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["first_tick"], Value::Null);
    assert_eq!(v["tally_charge"]["charged"], 75);
    assert_eq!(v["tally_charge"]["remainingAfter"], 2);
    let id = v["agent_id"].as_str().unwrap();
    let (s, e) = post(&gw, Some(okey), &format!("/api/zeq/agent/tick/{id}")).await;
    assert_eq!(
        (s, e["error"].as_str(), e["required"].as_i64()),
        (402, Some("INSUFFICIENT_BALANCE"), Some(5)),
        "{e}"
    );
    tokio::time::sleep(Duration::from_millis(3 * ZEQOND_MS)).await;
    let (_, st) = get(&gw, Some(okey), &format!("/api/zeq/agent/status/{id}")).await;
    assert_eq!(
        (st["ticks"].as_u64(), st["status"].as_str()),
        (Some(0), Some("running")),
        "{st}"
    );
    assert_eq!(balance(&gw, ozid, okey).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_and_owners_spawn_on_a_chain() {
    let (gw, others) = funded(&[], 10_000, 1);
    let c = gw.client();
    let k = gw.owner_key.as_str();
    let (s, m, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(k),
        Some(json!({"slug": "lab"})),
    )
    .await;
    assert_eq!(s, 201);
    let admin_key = m["api_key"].as_str().unwrap().to_string();
    let (s, viewer, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/lab/api-keys"),
        Some(k),
        Some(json!({"scope": "viewer", "name": "viewer"})),
    )
    .await;
    assert_eq!(s, 201, "{viewer}");
    let (_, okey) = &others[0];
    let on = |slug: &str| {
        let mut b = body("x", 1, 1);
        b["slug"] = json!(slug);
        b
    };
    let (s, v) = spawn(&gw, okey, on("lab")).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("not_chain_member")),
        "{v}"
    );
    let (s, v) = spawn(&gw, viewer["api_key"].as_str().unwrap(), on("lab")).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (403, Some("not_chain_member")),
        "{v}"
    );
    let (s, v) = spawn(&gw, okey, on("no-such-machine")).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (404, Some("machine_not_found")),
        "{v}"
    );
    // The other account cannot squat the owner's default slug either way round.
    let (s, v) = spawn(&gw, okey, on(&gw.owner_zid.to_lowercase())).await;
    assert_eq!(s, 404, "{v}");
    // An admin machine key spawns on its machine; the owner pays.
    let before = balance(&gw, &gw.owner_zid, k).await;
    let (s, v) = spawn(&gw, &admin_key, body("x", 1, 1)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["slug"], "lab");
    assert_eq!(balance(&gw, &gw.owner_zid, k).await, before - 80);
    // The owner spawns on "lab" by slug; the run is listed for the key's machine too.
    let (s, _) = spawn(&gw, k, on("lab")).await;
    assert_eq!(s, 200);
    let (_, l) = get(&gw, Some(&admin_key), "/api/zeq/agent/list").await;
    assert_eq!(l["count"], 2, "{l}");
    // Another account's runs and tally are not visible.
    let id = v["agent_id"].as_str().unwrap();
    let (s, e) = get(&gw, Some(okey), &format!("/api/zeq/agent/status/{id}")).await;
    assert_eq!((s, e["error"].as_str()), (404, Some("agent_not_found")));
    let (s, _) = get(
        &gw,
        Some(okey),
        &format!("/api/tally/account/{}", gw.owner_zid),
    )
    .await;
    assert_eq!(s, 403);
    let (s, e) = get(&gw, Some(okey), "/api/tally/account/nope").await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_zid")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_at_the_configured_limit() {
    let (gw, _) = funded(&[("SMGATE_AGENTS_MAX_LIVE_PER_ACCOUNT", "2")], 10_000, 0);
    let k = gw.owner_key.as_str();
    let a = spawn(&gw, k, body(LONG, 1, 10)).await;
    let b = spawn(&gw, k, body(LONG, 1, 10)).await;
    assert_eq!((a.0, b.0), (200, 200));
    let before = balance(&gw, &gw.owner_zid, k).await;
    let (s, v) = spawn(&gw, k, body(LONG, 1, 10)).await;
    assert_eq!(
        (s, v["error"].as_str(), v["limit"].as_u64()),
        (409, Some("quota_exceeded"), Some(2)),
        "{v}"
    );
    assert!(
        balance(&gw, &gw.owner_zid, k).await <= before,
        "a refused spawn charges nothing"
    );
    let id = a.1["agent_id"].as_str().unwrap();
    assert_eq!(
        post(&gw, Some(k), &format!("/api/zeq/agent/kill/{id}"))
            .await
            .0,
        200
    );
    assert_eq!(spawn(&gw, k, body(LONG, 1, 10)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tick_kill_status_lineage_list_and_mesh() {
    let (gw, others) = funded(&[], 10_000, 1);
    let k = gw.owner_key.as_str();
    let slug = gw.owner_zid.to_lowercase();
    let (_, v) = spawn(&gw, k, body(LONG, 3, 10)).await;
    let id = v["agent_id"].as_str().unwrap().to_string();
    // A manual tick is charged 5 and lands in a Zeqond of its own.
    let (s, t) = post(&gw, Some(k), &format!("/api/zeq/agent/tick/{id}")).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["tally_charge"]["charged"], 5);
    assert!(t["generation"].as_u64().unwrap() >= 1);
    // The alternative spelling of the route works too.
    assert_eq!(
        post(&gw, Some(k), &format!("/api/zeq/agent/{id}/tick"))
            .await
            .0,
        200
    );
    let (_, st) = get(&gw, Some(k), &format!("/api/zeq/agent/status/{id}")).await;
    assert_eq!(st["agent_id"], id.as_str());
    assert_eq!(st["problem"], LONG);
    assert_eq!(st["population"], 3);
    // Kill: the row's transition id and Zeqond come back.
    let (s, kv) = post(&gw, Some(k), &format!("/api/zeq/agent/kill/{id}")).await;
    assert_eq!(s, 200, "{kv}");
    let killed_at = kv["killed_at_zeqond"].as_u64().unwrap();
    let tid = kv["transition_id"].as_str().unwrap();
    let all = rows(&gw, &slug, k).await;
    let row = all.iter().find(|r| r["type"] == "agent_killed").unwrap();
    assert_eq!(
        (row["transition_id"].as_str(), row["zeqond"].as_u64()),
        (Some(tid), Some(killed_at))
    );
    let (s, e) = post(&gw, Some(k), &format!("/api/zeq/agent/kill/{id}")).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("agent_already_dead")));
    let (s, e) = post(&gw, Some(k), &format!("/api/zeq/agent/tick/{id}")).await;
    assert_eq!((s, e["error"].as_str()), (409, Some("agent_done")));
    let (_, st) = get(&gw, Some(k), &format!("/api/zeq/agent/status/{id}")).await;
    assert_eq!(st["status"], "killed");
    let ticks = st["ticks"].as_u64().unwrap();
    // Nothing ticks after the kill.
    tokio::time::sleep(Duration::from_millis(2 * ZEQOND_MS)).await;
    let (_, st2) = get(&gw, Some(k), &format!("/api/zeq/agent/status/{id}")).await;
    assert_eq!(st2["ticks"].as_u64(), Some(ticks));
    // The lineage has one generation per tick, numbered from 0, each with its population.
    let (s, l) = get(&gw, Some(k), &format!("/api/zeq/agent/lineage/{id}")).await;
    assert_eq!(s, 200);
    let lineage = l["lineage"].as_array().unwrap();
    assert_eq!(lineage.len() as u64, ticks);
    for (i, g) in lineage.iter().enumerate() {
        assert_eq!(g["generation"], i as u64);
        assert_eq!(g["population"].as_array().unwrap().len(), 3);
        assert_eq!(g["best"]["operators"][0], "KO42");
    }
    // Unknown and foreign ids are 404.
    for path in [
        format!("/api/zeq/agent/status/{}", uuid::Uuid::new_v4()),
        "/api/zeq/agent/lineage/nope".into(),
    ] {
        let (s, e) = get(&gw, Some(k), &path).await;
        assert_eq!(
            (s, e["error"].as_str()),
            (404, Some("agent_not_found")),
            "{path}"
        );
    }
    let (_, okey) = &others[0];
    for path in ["tick", "kill"] {
        let (s, e) = post(&gw, Some(okey), &format!("/api/zeq/agent/{path}/{id}")).await;
        assert_eq!((s, e["error"].as_str()), (404, Some("agent_not_found")));
    }
    // Mesh: children spawned under a master are listed with it; a child's child joins the master.
    let mut cb = body("child", 1, 1);
    cb["parent_master_id"] = json!(id);
    let (s, c1) = spawn(&gw, k, cb.clone()).await;
    assert_eq!(s, 200, "{c1}");
    cb["parent_master_id"] = c1["agent_id"].clone();
    assert_eq!(spawn(&gw, k, cb.clone()).await.0, 200);
    let (s, mesh) = get(&gw, Some(k), &format!("/api/zeq/agent/mesh/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(mesh["count"], 2, "{mesh}");
    assert_eq!(mesh["master"]["agent_id"], id.as_str());
    assert!(mesh["children"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["master_id"] == id.as_str()));
    cb["parent_master_id"] = json!(uuid::Uuid::new_v4().to_string());
    let (s, e) = spawn(&gw, k, cb).await;
    assert_eq!((s, e["error"].as_str()), (404, Some("agent_not_found")));
    let (_, list) = get(&gw, Some(k), "/api/zeq/agent/list").await;
    assert_eq!(list["count"], 3);
    let (_, ol) = get(&gw, Some(okey), "/api/zeq/agent/list").await;
    assert_eq!(ol["count"], 0);
}

/// Per run: the Zeqonds of its ticks, in log order.
fn ticks_by_run(rows: &[Value]) -> BTreeMap<String, Vec<(u64, String, i64)>> {
    let mut out: BTreeMap<String, Vec<(u64, String, i64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r["type"] == "agent_tick") {
        let id = r["payload"]["agent_id"].as_str().unwrap().to_string();
        let by = r["payload"]["by"].as_str().unwrap().to_string();
        out.entry(id).or_default().push((
            r["zeqond"].as_u64().unwrap(),
            by,
            r["ts_ms"].as_i64().unwrap(),
        ));
    }
    out
}

/// Spawns `per_wave` runs of 10 generations every `every` Zeqonds for `waves` waves, so
/// that live runs cover ≥ 20 consecutive Zeqonds; then checks that every run ticked in each
/// Zeqond from its spawn on, exactly once, and that every Zeqond of the window saw ticker
/// ticks. Returns the most runs that ticked in one Zeqond.
async fn cadence(per_wave: usize, every: u64, waves: usize) -> usize {
    let (gw, _) = funded(
        &[("SMGATE_AGENTS_MAX_LIVE_PER_ACCOUNT", "10000")],
        10_000_000,
        0,
    );
    let k = gw.owner_key.clone();
    let slug = gw.owner_zid.to_lowercase();
    // One client, so spawns reuse connections instead of paying a TLS handshake each.
    let client = gw.client();
    let url = gw.url("/api/zeq/agent/spawn");
    for wave in 0..waves {
        let spawns = (0..per_wave).map(|_| {
            let (c, k, url) = (&client, k.clone(), url.clone());
            async move {
                let (s, v, _) =
                    call(c, Method::POST, &url, Some(&k), Some(body(LONG, 2, 10))).await;
                (s, v)
            }
        });
        for (s, v) in futures_util::future::join_all(spawns).await {
            assert_eq!(s, 200, "{v}");
        }
        if wave + 1 < waves {
            let now = smgate::clock::now_ms() as u64;
            tokio::time::sleep(Duration::from_millis(
                every * ZEQOND_MS - now % ZEQOND_MS + 100,
            ))
            .await;
        }
    }
    tokio::time::sleep(Duration::from_millis(12 * ZEQOND_MS)).await;
    let all = rows(&gw, &slug, &k).await;
    let runs = ticks_by_run(&all);
    assert_eq!(runs.len(), waves * per_wave);
    let mut per_zeqond: BTreeMap<u64, usize> = BTreeMap::new();
    for (id, ticks) in &runs {
        assert_eq!(ticks.len(), 10, "run {id} ticked {} times", ticks.len());
        assert_eq!(ticks[0].1, "spawn");
        for w in ticks.windows(2) {
            assert_eq!(
                w[1].0,
                w[0].0 + 1,
                "run {id}: a gap or a double between Zeqonds {} and {}: {ticks:?}",
                w[0].0,
                w[1].0
            );
        }
        for t in &ticks[1..] {
            *per_zeqond.entry(t.0).or_default() += 1;
        }
    }
    let (lo, hi) = (
        *per_zeqond.keys().next().unwrap(),
        *per_zeqond.keys().last().unwrap(),
    );
    assert!(hi - lo + 1 >= 20, "window of {} Zeqonds", hi - lo + 1);
    assert_eq!(
        per_zeqond.len() as u64,
        hi - lo + 1,
        "some Zeqond of the window had no tick"
    );
    per_zeqond.values().copied().max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticker_ticks_each_run_once_per_zeqond_over_20_zeqonds() {
    cadence(1, 8, 3).await;
}

/// 13 new runs per Zeqond for 30 Zeqonds: from the tenth Zeqond on, about 130 runs are live
/// at once (margin for spawn waves that slip a Zeqond on a loaded machine), and each still
/// ticks once per Zeqond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticker_keeps_the_cadence_with_100_live_runs() {
    let most = cadence(13, 1, 30).await;
    assert!(most >= 100, "at most {most} runs ticked in one Zeqond");
}

/// A commit slower than a Zeqond (a busy SD card) must not cost the following Zeqond its
/// tick: a pass that returns after the boundary is followed at once by the next pass. The
/// gateway runs in-process on a file backend whose next fsync is told to take 900 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_slower_than_a_zeqond_leaves_no_gap() {
    use smgate::store::{DiskLimit, StoreOptions};
    let (mut gw, _) = funded(&[], 10_000_000, 0);
    gw.stop();
    let mut config = smgate::config::Config::load(None, Vec::new()).unwrap();
    config.data.dir = gw.data();
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    let disk = DiskLimit::default();
    let options = StoreOptions {
        disk_limit: Some(disk.clone()),
        ..StoreOptions::default()
    };
    let (running, _) = smgate::server::start(config, Some(options)).await.unwrap();
    gw.addr = running.addr.to_string();
    let k = gw.owner_key.clone();
    let (s, v) = spawn(&gw, &k, body(LONG, 2, 10)).await;
    assert_eq!(s, 200, "{v}");
    let id = v["agent_id"].as_str().unwrap().to_string();
    // Arm the stall in the middle of the next Zeqond: the next commit is the ticker's pass at the
    // coming boundary, and it returns about 120 ms into the Zeqond after.
    let now = smgate::clock::now_ms() as u64;
    tokio::time::sleep(Duration::from_millis(ZEQOND_MS - now % ZEQOND_MS + 350)).await;
    disk.slow_next_sync(900);
    let done = wait_done(&gw, &k, &id, 60).await;
    assert_eq!(done["status"], "exhausted", "{done}");
    let all = rows(&gw, &v["slug"].as_str().unwrap().to_string(), &k).await;
    let ticks = &ticks_by_run(&all)[&id];
    assert_eq!(ticks.len(), 10, "{ticks:?}");
    for w in ticks.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "a gap or a double: {ticks:?}");
    }
    let overruns = common::metric(&gw, "smgate_agent_ticker_overruns_total").await;
    assert!(overruns >= 1, "no overrun counted");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineage_is_reproducible_across_a_restart_in_the_middle_of_a_run() {
    let (mut gw, _) = funded(&[], 10_000, 0);
    let k = gw.owner_key.clone();
    let problem = "shield a probe rho=2700 target=0.004 against cosmic rays";
    let (s, v) = spawn(
        &gw,
        &k,
        json!({"problem": problem, "population": 5, "generations": 10, "precision": 0.0001}),
    )
    .await;
    assert_eq!(s, 200);
    let id = v["agent_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(3 * ZEQOND_MS)).await;
    gw.kill();
    tokio::time::sleep(Duration::from_millis(2 * ZEQOND_MS)).await;
    gw.spawn();
    let done = wait_done(&gw, &k, &id, 30).await;
    // Compare the bytes the gateway sent (parsing floats could round them).
    let text = gw
        .client()
        .get(gw.url(&format!("/api/zeq/agent/lineage/{id}")))
        .bearer_auth(&k)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sent = text
        .split_once("\"lineage\":")
        .unwrap()
        .1
        .strip_suffix('}')
        .unwrap();
    let p = Problem::parse(problem);
    let expected: Vec<Value> = search::replay(problem, &id, 5, 10, 0.0001)
        .iter()
        .map(|g| g.to_json(&p))
        .collect();
    assert_eq!(expected.len() as u64, done["ticks"].as_u64().unwrap());
    assert_eq!(sent, serde_json::to_string(&expected).unwrap());
}

/// The same problem and agent id in two data directories, driven through the domain API with
/// a fixed agent id (the HTTP API mints ids), give byte-identical lineages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_problem_and_agent_id_give_identical_lineages_in_two_data_dirs() {
    use smgate::store::{GroupCommit, Store, StoreOptions};
    let agent_id = "5b7a9c12-3f1d-4b88-9e3c-1a2b3c4d5e6f".to_string();
    let problem = "radiation shield for a Mars transit d=0.05 target=0.3";
    let mut lineages = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &dir.path().join("smgate.redb"),
            StoreOptions {
                tables: smgate::gateway::TABLES,
                ..Default::default()
            },
        )
        .unwrap();
        let writer = GroupCommit::start(store.clone());
        let defaults = smgate::machines::Defaults {
            region: "local".into(),
            parent_origin: "zeq-dev".into(),
        };
        let (id, p) = (agent_id.clone(), problem.to_string());
        writer
            .write(move |txn| -> Result<(), agents::AgentError> {
                let t0 = 1_800_000_000_000i64;
                let (account, _) = smgate::auth::create_account(txn, "a", t0)?;
                agents::credit(txn, &account.zid, 1000)?;
                let principal = smgate::auth::Principal::Account {
                    zid: account.zid.clone(),
                    key_id: "k".into(),
                };
                let req = agents::SpawnRequest::from_json(
                    &json!({"problem": p, "population": 6, "generations": 10, "precision": 0.0001}),
                )
                .unwrap();
                let ctx = agents::SpawnContext {
                    principal: &principal,
                    agent_id: id.clone(),
                    max_live: 10,
                    defaults: &defaults,
                    enrichment: Default::default(),
                    now_ms: t0,
                };
                agents::spawn(txn, req, ctx)?;
                for n in 1..10 {
                    match agents::tick(txn, &id, "test", "test", Default::default(), t0 + n * 777) {
                        Ok(_) | Err(agents::AgentError::Done { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .await
            .unwrap();
        let lineage = store
            .view(|txn| agents::read::lineage(txn, &agent_id))
            .unwrap();
        writer.shutdown().await;
        lineages.push(
            serde_json::to_vec(
                &lineage
                    .iter()
                    .map(|g| g.to_json(&Problem::parse(problem)))
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
        );
    }
    assert_eq!(lineages[0], lineages[1]);
    let p = Problem::parse(problem);
    let replayed: Vec<Value> = search::replay(problem, &agent_id, 6, 10, 0.0001)
        .iter()
        .map(|g| g.to_json(&p))
        .collect();
    assert_eq!(lineages[0], serde_json::to_vec(&replayed).unwrap());
}

/// A minimal OpenAI-compatible server: answers `POST …/chat/completions` by `mode`.
struct Model {
    base: String,
    hits: Arc<AtomicUsize>,
    auth: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn model(mode: &'static str) -> Model {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let auth = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (h, a) = (hits.clone(), auth.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (h, a) = (h.clone(), a.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head, then the body by Content-Length.
                let (head_end, len) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                assert!(head.starts_with("POST /v1/chat/completions "), "{head}");
                if let Some(l) = head
                    .lines()
                    .find(|l| l.to_lowercase().starts_with("authorization:"))
                {
                    a.lock().unwrap().push(l.to_string());
                }
                h.fetch_add(1, Ordering::SeqCst);
                let content = match mode {
                    "ok" => r#"{"chains": [["GR37"], ["IS01", "SH01"]]}"#,
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        r#"{"chains": [["GR37"]]}"#
                    }
                    _ => "Sure! I would use some gravity and maybe a spring.",
                };
                let body = json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).to_string();
                let res = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = sock.write_all(res.as_bytes()).await;
            });
        }
    });
    Model { base, hits, auth }
}

async fn credential(gw: &Gw, key: &str, base: &str, api_key: &str) -> String {
    let (s, v, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url("/api/zeq/credentials"),
        Some(key),
        Some(json!({"base_url": base, "api_key": api_key, "model": "test-model"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert!(
        !v.to_string().contains(api_key),
        "the key is never returned"
    );
    v["credential_id"].as_str().unwrap().to_string()
}

async fn byok_tick_record(gw: &Gw, key: &str, credential_id: &str) -> (Value, Value) {
    let mut b = body(LONG, 4, 2);
    b["credential_id"] = json!(credential_id);
    let (s, v) = spawn(gw, key, b).await;
    assert_eq!(s, 200, "{v}");
    let id = v["agent_id"].as_str().unwrap();
    wait_done(gw, key, id, 20).await;
    let all = rows(gw, &gw.owner_zid.to_lowercase(), key).await;
    let ticks: Vec<&Value> = all
        .iter()
        .filter(|r| r["type"] == "agent_tick" && r["payload"]["agent_id"] == id)
        .collect();
    assert_eq!(ticks.len(), 2);
    let (_, l) = get(gw, Some(key), &format!("/api/zeq/agent/lineage/{id}")).await;
    (ticks[0]["payload"]["byok"].clone(), l["lineage"][0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byok_model_proposals_are_used_and_failures_fall_back() {
    let (gw, others) = funded(&[("SMGATE_AGENTS_BYOK_TIMEOUT_MS", "400")], 10_000, 1);
    let k = gw.owner_key.as_str();
    // Credential validation and ownership.
    for (b, code) in [
        (
            json!({"base_url": "ftp://x", "api_key": "k"}),
            "invalid_base_url",
        ),
        (json!({"api_key": "k"}), "invalid_base_url"),
        (
            json!({"base_url": "http://127.0.0.1:9/v1"}),
            "invalid_api_key",
        ),
        (
            json!({"base_url": "http://127.0.0.1:9/v1", "api_key": ""}),
            "invalid_api_key",
        ),
    ] {
        let (s, v, _) = call(
            &gw.client(),
            Method::POST,
            &gw.url("/api/zeq/credentials"),
            Some(k),
            Some(b),
        )
        .await;
        assert_eq!((s, v["error"].as_str()), (400, Some(code)), "{v}");
    }
    let (s, _, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url("/api/zeq/credentials"),
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 401);

    // Success: the model's chains join the population, and the row says so.
    let ok = model("ok").await;
    let secret = "sk-test-very-secret-0123456789";
    let cid = credential(&gw, k, &ok.base, secret).await;
    let (record, gen0) = byok_tick_record(&gw, k, &cid).await;
    assert_eq!(record, json!({"outcome": "ok", "proposed": 2}), "{record}");
    assert_eq!(gen0["proposed"], 2);
    let chains: Vec<Value> = gen0["population"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["operators"].clone())
        .collect();
    assert!(
        chains.contains(&json!(["KO42", "GR37"]))
            && chains.contains(&json!(["KO42", "IS01", "SH01"])),
        "{chains:?}"
    );
    assert!(
        ok.hits.load(Ordering::SeqCst) >= 2,
        "spawn and ticker both asked"
    );
    assert!(ok.auth.lock().unwrap().iter().all(|a| a.ends_with(secret)));
    // Someone else's credential is not usable; an unknown one neither.
    let (_, okey) = &others[0];
    let mut b = body("x", 1, 1);
    b["credential_id"] = json!(cid);
    let (s, e) = spawn(&gw, okey, b.clone()).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (404, Some("credential_not_found"))
    );
    b["credential_id"] = json!(uuid::Uuid::new_v4().to_string());
    assert_eq!(spawn(&gw, k, b).await.0, 404);

    // Garbage and timeouts fall back to the deterministic step and are recorded.
    let garbage = model("garbage").await;
    let gid = credential(&gw, k, &garbage.base, "sk-garbage").await;
    let (record, gen0) = byok_tick_record(&gw, k, &gid).await;
    assert_eq!(record, json!({"outcome": "fallback", "reason": "garbage"}));
    assert_eq!(gen0["proposed"], 0);
    let slow = model("slow").await;
    let sid = credential(&gw, k, &slow.base, "sk-slow").await;
    let started = std::time::Instant::now();
    let (record, _) = byok_tick_record(&gw, k, &sid).await;
    assert_eq!(record, json!({"outcome": "fallback", "reason": "timeout"}));
    assert!(started.elapsed() < Duration::from_secs(10));
    let dead = credential(&gw, k, "http://127.0.0.1:9/v1", "sk-dead").await;
    let (record, _) = byok_tick_record(&gw, k, &dead).await;
    assert_eq!(record["outcome"], "fallback");

    // At rest the key is sealed: the database file does not contain it.
    let mut gw = gw;
    gw.stop();
    let db = std::fs::read(gw.data().join("smgate.redb")).unwrap();
    assert!(
        !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the API key is stored in clear"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_credit_cli_checks_its_arguments() {
    let mut gw = Gw::start(&[]);
    gw.stop();
    let data = gw.data();
    let zid = gw.owner_zid.clone();
    let (ok, out, _) = cli(&data, &["account", "credit", &zid, "250"]);
    assert!(ok);
    assert_eq!(out.trim(), format!("account {zid} balance 250"));
    let (ok, out, _) = cli(&data, &["account", "credit", &zid, "5"]);
    assert!(ok && out.contains("balance 255"), "{out}");
    for args in [
        vec![zid.as_str(), "0"],
        vec![zid.as_str(), "-5"],
        vec![zid.as_str(), "x"],
        vec!["ZEQ1", "5"],
        vec!["ZEQ00000000000", "5"],
    ] {
        let mut full = vec!["account", "credit"];
        full.extend(args.iter());
        let (ok, _, err) = cli(&data, &full);
        assert!(!ok, "{args:?} should fail: {err}");
    }
    gw.spawn();
    assert_eq!(balance(&gw, &zid, &gw.owner_key).await, 255);
}
