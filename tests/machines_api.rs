//! Spec 000 over real TLS: every status and error code, the rate limit, both slug-collision
//! cases, the authorization matrix, and the key endpoints.

mod common;

use common::{call, Gw};
use reqwest::Method;
use serde_json::{json, Value};

const SPINUP: &str = "/api/chain/state-machines";

async fn spinup(gw: &Gw, key: Option<&str>, body: Value) -> (u16, Value) {
    let (s, b, _) = call(&gw.client(), Method::POST, &gw.url(SPINUP), key, Some(body)).await;
    (s, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinup_returns_the_spec_dto_and_a_zsm_key_once() {
    let gw = Gw::start(&[
        ("SMGATE_GATEWAY_REGION", "us-east"),
        ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "1000"),
    ]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        / 777;
    let (status, body) = spinup(
        &gw,
        Some(&gw.owner_key),
        json!({"slug": "my-iot-fleet", "is_public": false, "display_name": "Production IoT fleet",
               "purpose": "Audited heartbeats from kitchen sensors", "parent_origin": "zeq-dev"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["ok"], true);
    let m = &body["machine"];
    uuid_like(m["id"].as_str().unwrap());
    assert_eq!(m["slug"], "my-iot-fleet");
    assert_eq!(m["parent_origin"], "zeq-dev");
    assert_eq!(m["is_public"], false);
    assert_eq!(m["status"], "active");
    assert_eq!(m["display_name"], "Production IoT fleet");
    assert_eq!(m["purpose"], "Audited heartbeats from kitchen sensors");
    assert_eq!(m["owner_zid"], gw.owner_zid.as_str());
    assert_eq!(m["region"], "us-east");
    let genesis: u64 = m["genesis_zeqond"]
        .as_str()
        .expect("genesis_zeqond is a string")
        .parse()
        .unwrap();
    assert!(
        genesis >= before && genesis <= before + 20,
        "{genesis} vs {before}"
    );
    for f in ["created_at", "updated_at"] {
        let t = m[f].as_str().unwrap();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
    let key = body["api_key"].as_str().unwrap();
    assert!(key.starts_with("zsm_") && key.len() > 40, "{key}");
    // The key works, and is never shown again.
    let (s, one, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url("/api/chain/state-machines/my-iot-fleet"),
        Some(key),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(!one.to_string().contains(key));
    let (_, keys, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url("/api/chain/my-iot-fleet/api-keys"),
        Some(key),
        None,
    )
    .await;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert_eq!(keys["keys"][0]["scope"], "admin");
    assert!(!keys.to_string().contains(key));
}

fn uuid_like(s: &str) {
    assert_eq!(s.len(), 36, "{s}");
    assert_eq!(s.matches('-').count(), 4, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_slug_is_lowercased_zid_with_suffixes_and_user_collision_is_409() {
    let gw = Gw::start(&[("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "1000")]);
    let base = gw.owner_zid.to_lowercase();
    let mut slugs = Vec::new();
    for _ in 0..3 {
        let (s, b) = spinup(&gw, Some(&gw.owner_key), json!({})).await;
        assert_eq!(s, 201, "{b}");
        slugs.push(b["machine"]["slug"].as_str().unwrap().to_string());
    }
    assert_eq!(
        slugs,
        vec![base.clone(), format!("{base}-2"), format!("{base}-3")]
    );
    // A user-supplied slug that collides: 409 with existing_slug, and nothing is created.
    let (s, b) = spinup(&gw, Some(&gw.owner_key), json!({"slug": base})).await;
    assert_eq!(s, 409);
    assert_eq!(b["ok"], false);
    assert_eq!(b["error"], "slug_taken");
    assert_eq!(b["existing_slug"], base.as_str());
    let (s, b) = spinup(&gw, Some(&gw.owner_key), json!({"slug": "fleet"})).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = spinup(&gw, Some(&gw.owner_key), json!({"slug": "fleet"})).await;
    assert_eq!((s, b["error"].as_str()), (409, Some("slug_taken")));
    let (_, list, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url(SPINUP),
        Some(&gw.owner_key),
        None,
    )
    .await;
    assert_eq!(list["machines"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_own_400_code() {
    let gw = Gw::start(&[("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "1000")]);
    let k = Some(gw.owner_key.as_str());
    let cases = [
        (json!({"slug": "My-Fleet"}), "invalid_slug"),
        (json!({"slug": "a".repeat(65)}), "invalid_slug"),
        (json!({"slug": ""}), "invalid_slug"),
        (json!({"slug": "under_score"}), "invalid_slug"),
        (json!({"slug": 7}), "invalid_slug"),
        (
            json!({"display_name": "x".repeat(256)}),
            "invalid_display_name",
        ),
        (json!({"purpose": "x".repeat(4001)}), "invalid_purpose"),
        (json!({"is_public": "true"}), "invalid_is_public"),
        (json!({"parent_origin": ""}), "invalid_parent_origin"),
        (json!([1, 2]), "invalid_body"),
    ];
    for (body, code) in cases {
        let (s, b) = spinup(&gw, k, body.clone()).await;
        assert_eq!((s, b["error"].as_str()), (400, Some(code)), "{body} → {b}");
        assert!(b["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Limits are inclusive.
    let (s, b) = spinup(&gw, k, json!({"slug": "a".repeat(64), "display_name": "x".repeat(255), "purpose": "p".repeat(4000)})).await;
    assert_eq!(s, 201, "{b}");
    // Not JSON at all.
    let res = gw
        .client()
        .post(gw.url(SPINUP))
        .bearer_auth(&gw.owner_key)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.unwrap()["error"], "invalid_body");
    // Over the JSON body limit: 413 before reading it all.
    let res = gw
        .client()
        .post(gw.url(SPINUP))
        .bearer_auth(&gw.owner_key)
        .body(vec![b' '; 200_000])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    // Nothing above created a machine except the one valid request.
    let (_, list, _) = call(&gw.client(), Method::GET, &gw.url(SPINUP), k, None).await;
    assert_eq!(list["count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_invalid_and_revoked_bearers_are_401() {
    let gw = Gw::start(&[("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "1000")]);
    let (s, b) = spinup(&gw, None, json!({})).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("unauthorized")));
    let (s, _) = spinup(&gw, Some("zeq_ak_notakey"), json!({})).await;
    assert_eq!(s, 401);
    let (s, _) = spinup(&gw, Some("garbage"), json!({})).await;
    assert_eq!(s, 401);
    // A machine key that is revoked stops working at once.
    let (_, b) = spinup(&gw, Some(&gw.owner_key), json!({"slug": "m1"})).await;
    let admin = b["api_key"].as_str().unwrap().to_string();
    let c = gw.client();
    let (s, minted, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/m1/api-keys"),
        Some(&admin),
        Some(json!({"name": "ops", "scope": "admin"})),
    )
    .await;
    assert_eq!(s, 201, "{minted}");
    let second = minted["api_key"].as_str().unwrap().to_string();
    let id = minted["key"]["id"].as_str().unwrap();
    let (s, _) = spinup(&gw, Some(&second), json!({})).await;
    assert_eq!(s, 201);
    let (s, r, _) = call(
        &c,
        Method::DELETE,
        &gw.url(&format!("/api/chain/m1/api-keys/{id}")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert!(r["key"]["revoked_at"].is_string());
    let (s, b) = spinup(&gw, Some(&second), json!({})).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("unauthorized")));
    // Expired keys are refused like unknown ones.
    let (_, minted, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/m1/api-keys"),
        Some(&admin),
        Some(json!({"name": "short", "scope": "viewer", "expires_in_seconds": 1})),
    )
    .await;
    let short = minted["api_key"].as_str().unwrap().to_string();
    let (s, _, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/m1"),
        Some(&short),
        None,
    )
    .await;
    assert_eq!(s, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (s, _, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/m1"),
        Some(&short),
        None,
    )
    .await;
    assert_eq!(s, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleventh_spinup_in_a_minute_from_one_ip_is_429_with_retry_after() {
    let gw = Gw::start(&[]);
    for i in 0..10 {
        let (s, b) = spinup(&gw, Some(&gw.owner_key), json!({"slug": format!("rl-{i}")})).await;
        assert_eq!(s, 201, "request {i}: {b}");
    }
    let (s, b, h) = call(
        &gw.client(),
        Method::POST,
        &gw.url(SPINUP),
        Some(&gw.owner_key),
        Some(json!({"slug": "rl-10"})),
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (429, Some("rate_limited")));
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=6).contains(&retry), "Retry-After {retry}");
    // Refused spin-ups count against the IP too (no free retries), and create nothing.
    let (s, _) = spinup(&gw, None, json!({})).await;
    assert_eq!(s, 429);
    let (_, list, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url(SPINUP),
        Some(&gw.owner_key),
        None,
    )
    .await;
    assert_eq!(list["count"], 10);
    let metrics = gw
        .client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("smgate_rate_limited_total 2"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_origin_comes_from_zeq_origin_env() {
    let gw = Gw::start(&[("ZEQ_ORIGIN", "acme-labs")]);
    let (s, b) = spinup(&gw, Some(&gw.owner_key), json!({})).await;
    assert_eq!(s, 201);
    assert_eq!(b["machine"]["parent_origin"], "acme-labs");
    let (_, b) = spinup(&gw, Some(&gw.owner_key), json!({"parent_origin": "other"})).await;
    assert_eq!(b["machine"]["parent_origin"], "other");
}

/// Every machine endpoint against: anonymous, a foreign account, a foreign machine key, each
/// role of this machine, and the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix() {
    let gw = Gw::start(&[("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "1000")]);
    let c = gw.client();
    let (_, b) = spinup(
        &gw,
        Some(&gw.owner_key),
        json!({"slug": "private-m", "purpose": "secret plans"}),
    )
    .await;
    let admin = b["api_key"].as_str().unwrap().to_string();
    let (_, b) = spinup(
        &gw,
        Some(&gw.owner_key),
        json!({"slug": "public-m", "is_public": true, "purpose": "open"}),
    )
    .await;
    let _public_admin = b["api_key"].as_str().unwrap().to_string();
    let mut role_keys = Vec::new();
    for role in ["viewer", "operator"] {
        let (s, m, _) = call(
            &c,
            Method::POST,
            &gw.url("/api/chain/private-m/api-keys"),
            Some(&admin),
            Some(json!({"name": role, "scope": role})),
        )
        .await;
        assert_eq!(s, 201);
        role_keys.push(m["api_key"].as_str().unwrap().to_string());
    }
    // A second account with its own machine.
    let mut gw = gw;
    gw.stop();
    let (ok, out, err) = common::cli(&gw.data(), &["account", "create", "--name", "stranger"]);
    assert!(ok, "{err}");
    let foreign_account = common::line_value(&out, "key ");
    gw.spawn();
    let c = gw.client();
    let (s, b) = spinup(&gw, Some(&foreign_account), json!({"slug": "foreign-m"})).await;
    assert_eq!(s, 201, "{b}");
    let foreign_key = b["api_key"].as_str().unwrap().to_string();

    let anon: Option<&str> = None;
    let callers: Vec<(&str, Option<&str>)> = vec![
        ("anonymous", anon),
        ("foreign account", Some(&foreign_account)),
        ("foreign machine key", Some(&foreign_key)),
        ("viewer", Some(&role_keys[0])),
        ("operator", Some(&role_keys[1])),
        ("admin", Some(&admin)),
        ("owner", Some(&gw.owner_key)),
    ];
    // (caller, GET private machine, mint key, list keys)
    let expected = [
        ("anonymous", 401, 401, 401),
        ("foreign account", 404, 404, 404),
        ("foreign machine key", 404, 404, 404),
        ("viewer", 200, 403, 403),
        ("operator", 200, 403, 403),
        ("admin", 200, 201, 200),
        ("owner", 200, 201, 200),
    ];
    for ((who, key), (who2, get, mint, list)) in callers.iter().zip(expected) {
        assert_eq!(*who, who2);
        let (s, body, _) = call(
            &c,
            Method::GET,
            &gw.url("/api/chain/state-machines/private-m"),
            *key,
            None,
        )
        .await;
        assert_eq!(s, get, "{who} GET: {body}");
        if s == 200 {
            assert_eq!(
                body["machine"]["purpose"], "secret plans",
                "{who} sees owner fields"
            );
        }
        let (s, body, _) = call(
            &c,
            Method::POST,
            &gw.url("/api/chain/private-m/api-keys"),
            *key,
            Some(json!({"name": "x", "scope": "viewer"})),
        )
        .await;
        assert_eq!(s, mint, "{who} mint: {body}");
        let (s, body, _) = call(
            &c,
            Method::GET,
            &gw.url("/api/chain/private-m/api-keys"),
            *key,
            None,
        )
        .await;
        assert_eq!(s, list, "{who} list: {body}");
        // Public machines read anonymously, without owner-only fields for outsiders.
        let (s, body, _) = call(
            &c,
            Method::GET,
            &gw.url("/api/chain/state-machines/public-m"),
            *key,
            None,
        )
        .await;
        assert_eq!(s, 200, "{who} public GET");
        let outsider = matches!(
            *who,
            "anonymous"
                | "foreign account"
                | "foreign machine key"
                | "viewer"
                | "operator"
                | "admin"
        );
        assert_eq!(
            body["machine"].get("owner_zid").is_none(),
            outsider && *who != "owner",
            "{who}: {body}"
        );
        // Listing shows exactly what the caller may see.
        let (s, body, _) = call(&c, Method::GET, &gw.url(SPINUP), *key, None).await;
        assert_eq!(s, 200);
        let mut slugs: Vec<String> = body["machines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["slug"].as_str().unwrap().to_string())
            .collect();
        slugs.sort();
        let want: Vec<&str> = match *who {
            "anonymous" => vec!["public-m"],
            "foreign account" | "foreign machine key" => vec!["foreign-m", "public-m"],
            "owner" => vec!["private-m", "public-m"],
            _ => vec!["private-m", "public-m"],
        };
        assert_eq!(slugs, want, "{who}");
    }
    // Revocation: only admin+ of the machine, and only keys of that machine.
    let (_, keys, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/private-m/api-keys"),
        Some(&admin),
        None,
    )
    .await;
    let viewer_id = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "viewer")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/api/chain/private-m/api-keys/{viewer_id}");
    for (who, key, want) in [
        ("anonymous", None, 401),
        ("foreign account", Some(foreign_account.as_str()), 404),
        ("operator", Some(role_keys[1].as_str()), 403),
    ] {
        let (s, _, _) = call(&c, Method::DELETE, &gw.url(&path), key, None).await;
        assert_eq!(s, want, "{who} revoke");
    }
    let (s, _, _) = call(
        &c,
        Method::DELETE,
        &gw.url(&format!("/api/chain/foreign-m/api-keys/{viewer_id}")),
        Some(&foreign_account),
        None,
    )
    .await;
    assert_eq!(
        s, 404,
        "a key of another machine is not found through this one"
    );
    let (s, _, _) = call(
        &c,
        Method::DELETE,
        &gw.url(&path),
        Some(&gw.owner_key),
        None,
    )
    .await;
    assert_eq!(s, 200);
    // Machine keys of viewer/operator role cannot spin up machines for the owner.
    let (s, b) = spinup(&gw, Some(&role_keys[1]), json!({})).await;
    assert_eq!((s, b["error"].as_str()), (403, Some("forbidden")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_minting_validates_its_body() {
    let gw = Gw::start(&[]);
    let (_, b) = spinup(&gw, Some(&gw.owner_key), json!({"slug": "k"})).await;
    let admin = b["api_key"].as_str().unwrap().to_string();
    let c = gw.client();
    for (body, code) in [
        (json!({"scope": "viewer"}), "invalid_name"),
        (json!({"name": "", "scope": "viewer"}), "invalid_name"),
        (json!({"name": "n"}), "invalid_scope"),
        (json!({"name": "n", "scope": "root"}), "invalid_scope"),
        (
            json!({"name": "n", "scope": "viewer", "expires_in_seconds": 0}),
            "invalid_expiry",
        ),
        (
            json!({"name": "n", "scope": "viewer", "expires_in_seconds": "soon"}),
            "invalid_expiry",
        ),
    ] {
        let (s, r, _) = call(
            &c,
            Method::POST,
            &gw.url("/api/chain/k/api-keys"),
            Some(&admin),
            Some(body.clone()),
        )
        .await;
        assert_eq!((s, r["error"].as_str()), (400, Some(code)), "{body}");
    }
    let (s, r, _) = call(
        &c,
        Method::DELETE,
        &gw.url("/api/chain/k/api-keys/no-such-id"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((s, r["error"].as_str()), (404, Some("key_not_found")));
    let (s, r, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/Not_A_Slug"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((s, r["error"].as_str()), (404, Some("machine_not_found")));
    let (s, r, _) = call(&c, Method::GET, &gw.url("/api/nothing-here"), None, None).await;
    assert_eq!((s, r["error"].as_str()), (404, Some("not_found")));
}

/// Spec 000's `500 unspecified` (DB error): a stored key record that no longer decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_is_500_unspecified() {
    let mut gw = Gw::start(&[]);
    gw.stop();
    // The owner key's record holds its hint `zeq_ak_XXXX…`; invalid UTF-8 there makes the
    // record undecodable.
    let path = gw.data().join("smgate.redb");
    let mut db = std::fs::read(&path).unwrap();
    let hint = format!("{}…", &gw.owner_key[..11]);
    let mut hits = 0;
    let mut at = 0;
    while let Some(pos) = db[at..]
        .windows(hint.len())
        .position(|w| w == hint.as_bytes())
    {
        db[at + pos + 8] = 0xFF;
        hits += 1;
        at += pos + hint.len();
    }
    assert!(hits >= 1, "found the key record");
    std::fs::write(&path, db).unwrap();
    gw.spawn();
    let (s, b) = spinup(&gw, Some(&gw.owner_key), json!({})).await;
    assert_eq!((s, b["error"].as_str()), (500, Some("unspecified")), "{b}");
    assert!(b["message"].as_str().unwrap().contains("corrupt"), "{b}");
}
