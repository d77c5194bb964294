//! Disk full: writes answer 507 `storage_full`, reads keep working, nothing committed is lost,
//! and writing resumes once space is free. The store's file backend is told that the file may
//! not grow (what ENOSPC looks like to redb), so the real commit-failure and reopen paths run.

mod common;

use serde_json::{json, Value};
use smgate::config::Config;
use smgate::store::{DiskLimit, StoreOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_writes_keeps_reads_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::load(None, Vec::new()).unwrap();
    config.data.dir = dir.path().join("data");
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.limits.spinup_per_minute_per_ip = 100_000;
    let limit = DiskLimit::default();
    let options = StoreOptions {
        disk_limit: Some(limit.clone()),
        ..StoreOptions::default()
    };
    let (running, made) = smgate::server::start(config.clone(), Some(options))
        .await
        .unwrap();
    let owner_key = made.expect("fresh data dir is initialised").owner_key;
    let pem = std::fs::read(config.cert_path()).unwrap();
    let client = common::client_trusting(&pem);
    let url = |p: &str| format!("https://{}{}", running.addr, p);
    let create = |slug: String| {
        let req = client
            .post(url("/api/chain/state-machines"))
            .bearer_auth(&owner_key)
            .json(&json!({"slug": slug, "purpose": "x".repeat(3000)}));
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    };
    let mut committed = Vec::new();
    for i in 0..20 {
        let (s, b) = create(format!("before-{i}")).await;
        assert_eq!(s, 201, "{b}");
        committed.push(format!("before-{i}"));
    }
    limit.fill();
    // Concurrent writers share commits (group commit), which fills the disk in fewer fsyncs.
    let mut refused = None;
    let mut full_seen = false;
    'fill: for round in 0..500 {
        let batch: Vec<_> = (0..32)
            .map(|j| create(format!("during-{round}-{j}")))
            .collect();
        let results = futures_util::future::join_all(batch).await;
        for (j, (s, b)) in results.into_iter().enumerate() {
            match s {
                201 => committed.push(format!("during-{round}-{j}")),
                507 => {
                    assert_eq!(b["error"], "storage_full");
                    assert!(b["message"].as_str().unwrap().contains("full"), "{b}");
                    full_seen = true;
                    refused.get_or_insert(format!("during-{round}-{j}"));
                }
                // Requests sharing the batch whose write hit ENOSPC see redb's PreviousIo.
                503 => {
                    assert_eq!(b["error"], "storage_unavailable", "{b}");
                    refused.get_or_insert(format!("during-{round}-{j}"));
                }
                other => panic!("unexpected {other}: {b}"),
            }
        }
        if refused.is_some() {
            break 'fill;
        }
    }
    let refused = refused.expect("the full disk refused a write");
    assert!(
        full_seen,
        "at least one write was answered 507 storage_full"
    );
    // A later write may fit into pages the failed transaction freed; either way it is
    // answered cleanly and, if answered 201, kept.
    let (s, b) = create("still-full".into()).await;
    match s {
        201 => committed.push("still-full".into()),
        507 | 503 => {}
        other => panic!("unexpected {other}: {b}"),
    }
    // Reads keep working and see everything committed.
    let res = client
        .get(url("/api/chain/state-machines"))
        .bearer_auth(&owner_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let list: Value = res.json().await.unwrap();
    let slugs: Vec<&str> = list["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["slug"].as_str().unwrap())
        .collect();
    for s in &committed {
        assert!(
            slugs.contains(&s.as_str()),
            "committed {s} missing while full"
        );
    }
    assert!(
        !slugs.contains(&refused.as_str()),
        "a refused write left a machine behind"
    );
    let res = client.get(url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let metrics = client
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("smgate_commit_failures_total 0"),
        "commit failures counted"
    );

    limit.free();
    let (s, b) = create("after".into()).await;
    assert_eq!(s, 201, "writes resume once space is free: {b}");
    committed.push("after".into());
    running.shutdown().await;

    // After a restart (normal backend) everything committed is there.
    let (running, _) = smgate::server::start(config.clone(), None).await.unwrap();
    let url = |p: &str| format!("https://{}{}", running.addr, p);
    let list: Value = client
        .get(url("/api/chain/state-machines"))
        .bearer_auth(&owner_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slugs: Vec<&str> = list["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["slug"].as_str().unwrap())
        .collect();
    assert_eq!(
        slugs.len(),
        committed.len(),
        "exactly the committed machines"
    );
    for s in &committed {
        assert!(slugs.contains(&s.as_str()), "{s} lost");
    }
    running.shutdown().await;
}
