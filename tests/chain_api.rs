//! The verifiable log over real TLS: the event endpoint and its codes, row reads, SSE,
//! checkpoints and proofs checked by an independent RFC 9162 verifier, tampering, and SIGKILL.

mod common;
#[path = "common/rfc6962.rs"]
mod rfc6962;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{call, cli, create_machine, kill_during_burst, log_rows, Gw, UNLIMITED};
use reqwest::Method;
use rfc6962::{leaf, mth, unhex, verify_consistency, verify_inclusion, H};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn ev(slug: &str) -> String {
    format!("/api/chain/state-machines/{slug}/event")
}

/// Canonical JSON written independently: sorted keys, no whitespace.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<_, _> = m.iter().collect();
            let parts: Vec<String> = sorted
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::String((*k).clone()), canonical(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_endpoint_stores_the_payload_hash_not_the_payload() {
    let gw = Gw::start(UNLIMITED);
    let c = gw.client();
    create_machine(&gw, "ev", false).await;
    let payload = json!({"temp": 21.5, "unit": "C", "a": [1, {"z": true, "b": null}]});
    let (s, b, _) = call(
        &c,
        Method::POST,
        &gw.url(&ev("ev")),
        Some(&gw.owner_key),
        Some(json!({"type": "reading", "payload": payload})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["ok"], true);
    assert!(b["zeqondNumber"].as_u64().unwrap() > 2_000_000_000);
    assert_eq!(b["transitionId"].as_str().unwrap().len(), 36);
    let want = sha_hex(canonical(&payload).as_bytes());
    assert_eq!(b["payload_hash"], want.as_str());
    // The default type is "event"; a given hash is stored as is (lowercased).
    let h = "AB".repeat(32);
    let (s, b2, _) = call(
        &c,
        Method::POST,
        &gw.url(&ev("ev")),
        Some(&gw.owner_key),
        Some(json!({"hash": h})),
    )
    .await;
    assert_eq!(s, 201, "{b2}");
    let all = log_rows(&gw, "ev", Some(&gw.owner_key)).await;
    let kinds: Vec<&str> = all.iter().map(|r| r["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["machine_created", "key_minted", "event", "event"]);
    assert_eq!(
        all[2]["payload"],
        json!({"type": "reading", "payload_hash": want})
    );
    assert_eq!(
        all[3]["payload"],
        json!({"type": "event", "payload_hash": "ab".repeat(32)})
    );
    assert_eq!(all[2]["transition_id"], b["transitionId"]);
    // The payload itself is nowhere in the log.
    assert!(!serde_json::to_string(&all).unwrap().contains("21.5"));
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["seq"], i as u64);
        if i > 0 {
            assert_eq!(r["prev_hash"], all[i - 1]["hash"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_4xx_codes() {
    let gw = Gw::start(UNLIMITED);
    let c = gw.client();
    create_machine(&gw, "bad", false).await;
    let k = Some(gw.owner_key.as_str());
    for (body, code) in [
        (json!({"type": "x".repeat(65)}), "invalid_type"),
        (json!({"type": ""}), "invalid_type"),
        (json!({"type": 5}), "invalid_type"),
        (json!({"type": "a\nb"}), "invalid_type"),
        (json!({"hash": "abc"}), "invalid_hash"),
        (json!({"hash": "g".repeat(64)}), "invalid_hash"),
        (json!({"hash": 12}), "invalid_hash"),
        (
            json!({"hash": "a".repeat(64), "payload": {}}),
            "invalid_body",
        ),
        (json!("string"), "invalid_body"),
    ] {
        let (s, b, _) = call(&c, Method::POST, &gw.url(&ev("bad")), k, Some(body.clone())).await;
        assert_eq!((s, b["error"].as_str()), (400, Some(code)), "{body}: {b}");
    }
    let (s, _, _) = call(
        &c,
        Method::POST,
        &gw.url(&ev("bad")),
        k,
        Some(json!({"type": "x".repeat(64)})),
    )
    .await;
    assert_eq!(s, 201, "64 characters is allowed");
    let (s, b, _) = call(&c, Method::POST, &gw.url(&ev("nope")), k, Some(json!({}))).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("machine_not_found")));
    let base = "/api/chain/state-machines/bad";
    for (path, status, code) in [
        ("/explore?from=5&to=2", 400, "invalid_range"),
        ("/explore?from=-1", 400, "invalid_range"),
        ("/explore?from=abc", 400, "invalid_range"),
        ("/pohc/validate?from=0&to=999", 400, "invalid_range"),
        ("/proof/inclusion?seq=3&size=3", 400, "invalid_range"),
        ("/proof/inclusion?seq=0&size=999", 400, "invalid_range"),
        ("/proof/inclusion", 400, "invalid_range"),
        ("/proof/consistency?from=0&to=2", 400, "invalid_range"),
        ("/proof/consistency?from=3&to=2", 400, "invalid_range"),
        ("/block", 400, "invalid_zeqond"),
        ("/block?zeqond=12", 404, "no_block_at_zeqond"),
        ("/nothing", 404, "not_found"),
    ] {
        let (s, b, _) = call(&c, Method::GET, &gw.url(&format!("{base}{path}")), k, None).await;
        assert_eq!(
            (s, b["error"].as_str()),
            (status, Some(code)),
            "{path}: {b}"
        );
    }
    // Reading past the end is an empty page, not an error.
    let (s, b, _) = call(
        &c,
        Method::GET,
        &gw.url(&format!("{base}/explore?from=100")),
        k,
        None,
    )
    .await;
    assert_eq!((s, b["count"].as_u64()), (200, Some(0)));
    let (s, _, _) = call(
        &c,
        Method::POST,
        &gw.url(&ev("bad")),
        k,
        Some(json!({"payload": "x".repeat(70_000)})),
    )
    .await;
    assert_eq!(s, 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_follow_machine_access() {
    let gw = Gw::start(UNLIMITED);
    let c = gw.client();
    let admin = create_machine(&gw, "priv", false).await;
    create_machine(&gw, "pub", true).await;
    let (_, v, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/priv/api-keys"),
        Some(&admin),
        Some(json!({"name": "v", "scope": "viewer"})),
    )
    .await;
    let viewer = v["api_key"].as_str().unwrap().to_string();
    let (_, o, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/priv/api-keys"),
        Some(&admin),
        Some(json!({"name": "o", "scope": "operator"})),
    )
    .await;
    let operator = o["api_key"].as_str().unwrap().to_string();
    let (_, other, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(&gw.owner_key),
        Some(json!({"slug": "other"})),
    )
    .await;
    let foreign_key = other["api_key"].as_str().unwrap().to_string();
    let callers: [(&str, Option<&str>, u16, u16); 6] = [
        ("anonymous", None, 401, 401),
        ("foreign machine key", Some(&foreign_key), 404, 404),
        ("viewer", Some(&viewer), 200, 403),
        ("operator", Some(&operator), 200, 201),
        ("admin", Some(&admin), 200, 201),
        ("owner", Some(&gw.owner_key), 200, 201),
    ];
    for (who, key, read, write) in callers {
        for route in [
            "state",
            "explore",
            "checkpoint",
            "pohc/validate",
            "proof/inclusion?seq=0",
        ] {
            let (s, _, _) = call(
                &c,
                Method::GET,
                &gw.url(&format!("/api/chain/state-machines/priv/{route}")),
                key,
                None,
            )
            .await;
            assert_eq!(s, read, "{who} GET {route}");
        }
        let (s, _, _) = call(&c, Method::POST, &gw.url(&ev("priv")), key, Some(json!({}))).await;
        assert_eq!(s, write, "{who} POST event");
        // Public machines: anyone reads, nobody but members writes.
        let (s, _, _) = call(
            &c,
            Method::GET,
            &gw.url("/api/chain/state-machines/pub/explore"),
            key,
            None,
        )
        .await;
        assert_eq!(s, 200, "{who} reads a public log");
    }
    let (s, _, _) = call(&c, Method::POST, &gw.url(&ev("pub")), None, Some(json!({}))).await;
    assert_eq!(s, 401);
    let (s, _, _) = call(
        &c,
        Method::POST,
        &gw.url(&ev("pub")),
        Some(&foreign_key),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_owner_reads_and_writes_are_rate_limited_per_machine() {
    let gw = Gw::start(&[
        ("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "3"),
        ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "2"),
    ]);
    let c = gw.client();
    create_machine(&gw, "pub", true).await;
    for _ in 0..3 {
        let (s, _, _) = call(
            &c,
            Method::GET,
            &gw.url("/api/chain/state-machines/pub/state"),
            None,
            None,
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, b, h) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/pub/state"),
        None,
        None,
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (429, Some("rate_limited")));
    assert!(h.contains_key("retry-after"));
    // The owner is not read-limited.
    let (s, _, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/pub/state"),
        Some(&gw.owner_key),
        None,
    )
    .await;
    assert_eq!(s, 200);
    for want in [201, 201, 429] {
        let (s, _, _) = call(
            &c,
            Method::POST,
            &gw.url(&ev("pub")),
            Some(&gw.owner_key),
            Some(json!({})),
        )
        .await;
        assert_eq!(s, want);
    }
}

/// Checkpoints, inclusion and consistency proofs, checked with the independent verifier and
/// the gateway's published verifier key only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_and_proofs_verify_independently() {
    let gw = Gw::start(UNLIMITED);
    let c = gw.client();
    create_machine(&gw, "proofs", true).await;
    let (_, info, _) = call(&c, Method::GET, &gw.url("/api/gateway"), None, None).await;
    let vkey = info["verifier_key"].as_str().unwrap().to_string();
    let gateway_id = info["gateway_id"].as_str().unwrap();
    assert!(vkey.starts_with(&format!("{gateway_id}+")));
    let mut roots: Vec<(u64, H)> = Vec::new();
    for i in 0..19 {
        let note = c
            .get(gw.url("/api/chain/state-machines/proofs/checkpoint"))
            .send()
            .await
            .unwrap();
        assert!(note.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let note = note.text().await.unwrap();
        let (origin, size, root) = rfc6962::open_checkpoint(&note, &vkey);
        assert_eq!(origin, format!("{gateway_id}/proofs"));
        assert_eq!(size, 2 + i, "size grows by one per event");
        roots.push((size, root));
        let (s, _, _) = call(
            &c,
            Method::POST,
            &gw.url(&ev("proofs")),
            Some(&gw.owner_key),
            Some(json!({"payload": i})),
        )
        .await;
        assert_eq!(s, 201);
    }
    let all = log_rows(&gw, "proofs", None).await;
    let leaves: Vec<H> = all
        .iter()
        .map(|r| leaf(&unhex(r["hash"].as_str().unwrap())))
        .collect();
    for (size, root) in &roots {
        assert_eq!(
            mth(&leaves[..*size as usize]),
            *root,
            "checkpoint root of size {size}"
        );
    }
    for (size, root) in &roots {
        for seq in 0..*size {
            let (s, p, _) = call(
                &c,
                Method::GET,
                &gw.url(&format!(
                    "/api/chain/state-machines/proofs/proof/inclusion?seq={seq}&size={size}"
                )),
                None,
                None,
            )
            .await;
            assert_eq!(s, 200, "{p}");
            assert_eq!(p["row_hash"], all[seq as usize]["hash"]);
            let leaf_hash = unhex(p["leaf_hash"].as_str().unwrap());
            assert_eq!(leaf_hash, leaves[seq as usize]);
            let proof: Vec<H> = p["proof"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| unhex(h.as_str().unwrap()))
                .collect();
            assert!(
                verify_inclusion(seq, *size, &leaf_hash, &proof, root),
                "inclusion {seq} in {size}"
            );
        }
    }
    for (m, m_root) in &roots {
        for (n, n_root) in roots.iter().filter(|(n, _)| n >= m) {
            let (s, p, _) = call(
                &c,
                Method::GET,
                &gw.url(&format!(
                    "/api/chain/state-machines/proofs/proof/consistency?from={m}&to={n}"
                )),
                None,
                None,
            )
            .await;
            assert_eq!(s, 200);
            let proof: Vec<H> = p["proof"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| unhex(h.as_str().unwrap()))
                .collect();
            assert!(
                verify_consistency(*m, *n, m_root, n_root, &proof),
                "consistency {m} → {n}"
            );
        }
    }
    let (s, v, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/proofs/pohc/validate"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({"ok": true, "valid": true, "count": 21, "broken_at": null, "genesis_zeqond": v["genesis_zeqond"], "from": 0, "to": 20})
    );
    let (_, st, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/proofs/state"),
        None,
        None,
    )
    .await;
    assert_eq!(st["latest"], all[20]);
    let z = all[5]["zeqond"].as_u64().unwrap();
    let (s, block, _) = call(
        &c,
        Method::GET,
        &gw.url(&format!(
            "/api/chain/state-machines/proofs/block?zeqond={z}"
        )),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let in_block: Vec<u64> = block["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = all
        .iter()
        .filter(|r| r["zeqond"] == z)
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(in_block, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_live_rows_and_resumes_after_last_event_id() {
    let gw = Gw::start(UNLIMITED);
    let c = gw.client();
    create_machine(&gw, "live", false).await;
    let mut res = c
        .get(gw.url("/api/chain/state-machines/live/explore/sse"))
        .bearer_auth(&gw.owner_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    for i in 0..3 {
        call(
            &c,
            Method::POST,
            &gw.url(&ev("live")),
            Some(&gw.owner_key),
            Some(json!({"payload": i})),
        )
        .await;
    }
    let ids = read_sse_ids(&mut res, 3).await;
    assert_eq!(
        ids,
        vec![2, 3, 4],
        "live rows arrive in order from the head"
    );
    drop(res);
    for i in 3..5 {
        call(
            &c,
            Method::POST,
            &gw.url(&ev("live")),
            Some(&gw.owner_key),
            Some(json!({"payload": i})),
        )
        .await;
    }
    let mut res = c
        .get(gw.url("/api/chain/state-machines/live/explore/sse"))
        .bearer_auth(&gw.owner_key)
        .header("Last-Event-ID", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(
        read_sse_ids(&mut res, 3).await,
        vec![4, 5, 6],
        "resumes right after Last-Event-ID"
    );
}

async fn read_sse_ids(res: &mut reqwest::Response, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut buf = String::new();
    while ids.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), res.chunk())
            .await
            .expect("sse timed out")
            .unwrap()
            .expect("stream open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(id) = event.lines().find_map(|l| l.strip_prefix("id:")) {
                ids.push(id.trim().parse().unwrap());
                assert!(event.contains("event:row"));
            }
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rows_are_logged_with_their_changes() {
    let gw = Gw::start(UNLIMITED);
    let c = gw.client();
    let admin = create_machine(&gw, "keys", false).await;
    let (_, m, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/keys/api-keys"),
        Some(&admin),
        Some(json!({"name": "ops", "scope": "operator"})),
    )
    .await;
    let raw = m["api_key"].as_str().unwrap().to_string();
    let id = m["key"]["id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        call(
            &c,
            Method::DELETE,
            &gw.url(&format!("/api/chain/keys/api-keys/{id}")),
            Some(&admin),
            None,
        )
        .await;
    }
    let all = log_rows(&gw, "keys", Some(&gw.owner_key)).await;
    let kinds: Vec<&str> = all.iter().map(|r| r["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["machine_created", "key_minted", "key_minted", "key_revoked"],
        "revoking twice logs once"
    );
    assert_eq!(all[0]["payload"]["slug"], "keys");
    assert_eq!(all[0]["actor"], gw.owner_zid.as_str());
    assert_eq!(all[2]["payload"]["key_id"], id.as_str());
    assert_eq!(all[2]["payload"]["scope"], "operator");
    assert!(
        all[2]["actor"].as_str().unwrap().starts_with("key:"),
        "minted by the admin key"
    );
    assert!(
        !serde_json::to_string(&all).unwrap().contains(&raw),
        "the raw key is never logged"
    );
}

/// One flipped byte in one stored row: `smgate verify`, `pohc/validate` and proof
/// verification all point at that row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_reported_by_verify_pohc_and_proofs() {
    let mut gw = Gw::start(UNLIMITED);
    let c = gw.client();
    create_machine(&gw, "tamper", true).await;
    for i in 0..8 {
        let t = if i == 5 {
            "MARKER-Q7Z".to_string()
        } else {
            format!("t{i}")
        };
        let (s, _, _) = call(
            &c,
            Method::POST,
            &gw.url(&ev("tamper")),
            Some(&gw.owner_key),
            Some(json!({"type": t})),
        )
        .await;
        assert_eq!(s, 201);
    }
    let (_, info, _) = call(&c, Method::GET, &gw.url("/api/gateway"), None, None).await;
    let vkey = info["verifier_key"].as_str().unwrap().to_string();
    let note = c
        .get(gw.url("/api/chain/state-machines/tamper/checkpoint"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (_, size, root) = rfc6962::open_checkpoint(&note, &vkey);
    gw.stop();
    let (ok, out, _) = cli(&gw.data(), &["verify"]);
    assert!(ok, "intact log verifies: {out}");
    // The row with the marker is seq 7 (machine_created, key_minted, then t0..t4, marker).
    let path = gw.data().join("smgate.redb");
    let mut db = std::fs::read(&path).unwrap();
    let needle = b"MARKER-Q7Z";
    let mut flipped = 0;
    let mut at = 0;
    while let Some(pos) = db[at..].windows(needle.len()).position(|w| w == needle) {
        db[at + pos] ^= 0x01; // 'M' → 'L'
        flipped += 1;
        at += pos + needle.len();
    }
    assert!(flipped >= 1);
    std::fs::write(&path, db).unwrap();
    let (ok, _, err) = cli(&gw.data(), &["verify", "--machine", "tamper"]);
    assert!(!ok, "verify fails on a tampered row");
    assert!(err.contains("machine tamper: row 7 is broken"), "{err}");
    gw.spawn();
    let c = gw.client();
    let (_, v, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/tamper/pohc/validate"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (v["valid"].as_bool(), v["broken_at"].as_u64()),
        (Some(false), Some(7)),
        "{v}"
    );
    let (_, v, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/tamper/pohc/validate?from=0&to=6"),
        None,
        None,
    )
    .await;
    assert_eq!(v["valid"], true, "rows before it are intact");
    for seq in 0..size {
        let (_, p, _) = call(
            &c,
            Method::GET,
            &gw.url(&format!(
                "/api/chain/state-machines/tamper/proof/inclusion?seq={seq}&size={size}"
            )),
            None,
            None,
        )
        .await;
        let leaf_hash = leaf(&unhex(p["row_hash"].as_str().unwrap()));
        let proof: Vec<H> = p["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| unhex(h.as_str().unwrap()))
            .collect();
        assert_eq!(
            verify_inclusion(seq, size, &leaf_hash, &proof, &root),
            seq != 7,
            "inclusion of row {seq} against the signed checkpoint"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_an_event_burst_keeps_every_answered_row_and_verifies() {
    let mut gw = Gw::start(UNLIMITED);
    create_machine(&gw, "burst", false).await;
    let answered = kill_during_burst(
        &mut gw,
        &ev("burst"),
        8,
        40,
        |w, i| json!({"type": format!("w{w}"), "payload": i}),
        |b| Some((b["seq"].as_u64()?, b["hash"].as_str()?.to_string())),
    )
    .await;
    let (ok, out, err) = cli(&gw.data(), &["verify"]);
    assert!(ok, "verify after SIGKILL: {out}{err}");
    gw.spawn();
    let all = log_rows(&gw, "burst", Some(&gw.owner_key)).await;
    for (seq, hash) in &answered {
        assert_eq!(
            all[*seq as usize]["hash"],
            hash.as_str(),
            "answered row {seq} kept with the same hash"
        );
    }
}
