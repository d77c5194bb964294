//! Durable statechart events over HTTPS, end to end: each request is one statechart step, its
//! `transition` row and its history record, committed (group commit, fsync) before the answer.
//!
//! `cargo bench --bench instances` — 32 concurrent clients, each driving its own instance of
//! the example heartbeat machine for 5 s, over TLS with keep-alive.

use std::time::{Duration, Instant};

use serde_json::json;
use smgate::config::Config;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::load(None, Vec::new()).expect("config");
    config.data.dir = dir.path().join("data");
    config.http.listen = "127.0.0.1:0".parse().expect("addr");
    config.limits.writes_per_minute_per_machine = u32::MAX;
    config.limits.reads_per_minute_per_machine = u32::MAX;
    let (running, made) = smgate::server::start(config.clone(), None)
        .await
        .expect("start");
    let key = made.expect("initialised").owner_key;
    let pem = std::fs::read(config.cert_path()).expect("cert");
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .build()
        .expect("client");
    let base = format!("https://{}", running.addr);
    let post = |path: &str, body: serde_json::Value| {
        let req = client
            .post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body);
        async move {
            let res = req.send().await.expect("send");
            assert!(res.status().is_success(), "{}", res.status());
        }
    };
    post("/api/chain/state-machines", json!({"slug": "bench"})).await;
    let def: serde_json::Value =
        serde_json::from_str(include_str!("../firmware-config/machines/heartbeat.json"))
            .expect("def");
    post(
        "/machines/bench/v",
        json!({"definition": def, "makeCurrent": true}),
    )
    .await;
    let clients = 32;
    for i in 0..clients {
        post("/machines/bench", json!({"slug": format!("dev-{i}")})).await;
    }
    let run_for = Duration::from_secs(5);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (client, key, url) = (
            client.clone(),
            key.clone(),
            format!("{base}/machines/bench/i/dev-{i}/events"),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while start.elapsed() < run_for {
                let t = Instant::now();
                let res = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"event": {"type": "HEARTBEAT", "ts": 1}}))
                    .send()
                    .await
                    .expect("send");
                assert_eq!(res.status(), 200);
                res.bytes().await.expect("body");
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            lat
        }));
    }
    let mut lat: Vec<f64> = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let stats = running.parts.writer.stats();
    let commits = stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    let requests = stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    println!("durable statechart events over HTTPS ({clients} clients, keep-alive, {secs:.1} s):");
    println!(
        "  {:.0} events/s, latency p50 {:.2} ms, p99 {:.2} ms",
        lat.len() as f64 / secs,
        pct(0.5),
        pct(0.99)
    );
    println!(
        "  group commit: {:.1} writes per fsync on average",
        requests as f64 / commits.max(1) as f64
    );
    running.shutdown().await;
}
