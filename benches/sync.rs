//! Sync benchmark: drain rate of an offline backlog to `smgate hub` on loopback, and bytes on
//! the wire per row against the stored row size.
//!
//! A gateway data dir gets SYNC_BENCH_ROWS rows (default 200,000) with `smgate bench fill-log`
//! while no upstream is configured; then the hub starts, the gateway restarts pointed at it,
//! and the clock runs from the gateway listening until the hub has stored every row. Both
//! sides are the release binary. Wire bytes are the ingest request bodies the hub received
//! (`GET /v1/stats` `body_bytes`), stored bytes the encoded rows it stored
//! (`stored_row_bytes`), so the ratio is the protocol's overhead over the rows themselves.
//!
//! `cargo bench --bench sync`

#[path = "../tests/common/mod.rs"]
mod common;
mod measure;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{call, cli, line_value, Gw, BIN};
use measure::cpu_secs;
use reqwest::Method;
use serde_json::{json, Value};

const MANY: &[(&str, &str)] = &[
    ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000"),
    ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "10000000"),
];

/// `smgate hub` on an ephemeral loopback port; killed on drop.
struct Hub {
    dir: tempfile::TempDir,
    child: Child,
    addr: String,
    pin: String,
}

impl Hub {
    fn start() -> Hub {
        let dir = tempfile::tempdir().expect("tempdir");
        let started = common::start_hub(
            Command::new(BIN)
                .arg("--data")
                .arg(dir.path())
                .args(["hub", "--listen", "127.0.0.1:0"])
                .env("RUST_LOG", "warn")
                .env(
                    "SMGATE_HUB_OPERATOR_KEY_SHA256",
                    common::hub_operator_key_sha256(),
                ),
        );
        Hub {
            dir,
            child: started.child,
            addr: started.addr,
            pin: started.pin,
        }
    }

    fn client(&self) -> reqwest::Client {
        common::client_trusting(&std::fs::read(self.dir.path().join("tls/cert.pem")).expect("cert"))
    }

    async fn get(&self, c: &reqwest::Client, path: &str) -> Value {
        let (s, b, _) = call(
            c,
            Method::GET,
            &format!("https://{}{path}", self.addr),
            Some(common::HUB_OPERATOR_KEY),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        b
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rows: u64 = std::env::var("SYNC_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut gw = Gw::start(MANY);
    let (ok, out, err) = cli(&gw.data(), &["identity"]);
    assert!(ok, "{err}");
    let (id, vkey) = (
        line_value(&out, "gateway "),
        line_value(&out, "verifier_key "),
    );
    let (s, b, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(&gw.owner_key),
        Some(json!({"slug": "drain", "is_public": false})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    gw.stop();
    let t = Instant::now();
    let (ok, _, err) = cli(
        &gw.data(),
        &[
            "bench",
            "fill-log",
            "--machine",
            "drain",
            "--rows",
            &rows.to_string(),
        ],
    );
    assert!(ok, "{err}");
    let fill = t.elapsed().as_secs_f64();
    let size = rows + 2; // machine_created and key_minted come first

    let hub = Hub::start();
    let (ok, out, err) = cli(hub.dir.path(), &["hub", "enroll", &id, &vkey]);
    assert!(ok, "enroll failed: {err}");
    let token = line_value(&out, "token ");
    for (k, v) in [
        ("SMGATE_UPSTREAM_URL", format!("https://{}", hub.addr)),
        ("SMGATE_UPSTREAM_PIN_SHA256", hub.pin.clone()),
        ("SMGATE_UPSTREAM_TOKEN", token),
    ] {
        gw.env.push((k.to_owned(), v));
    }
    let c = hub.client();
    let t = Instant::now();
    gw.spawn();
    let (gw_pid, hub_pid) = (gw.pid() as u32, hub.child.id());
    let cpu0 = cpu_secs(gw_pid) + cpu_secs(hub_pid);
    let path = format!("/v1/gateways/{id}/machines");
    loop {
        let b = hub.get(&c, &path).await;
        let stored = b["machines"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["slug"] == "drain"))
            .and_then(|m| m["stored_size"].as_u64())
            .unwrap_or(0);
        if stored == size {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "drain stalled at {stored} of {size} rows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let (gw_cpu, hub_cpu) = (cpu_secs(gw_pid), cpu_secs(hub_pid));
    let cpu = gw_cpu + hub_cpu - cpu0;
    let stats = hub.get(&c, "/v1/stats").await;
    let n = |k: &str| stats[k].as_u64().unwrap_or(0) as f64;
    let (wire, stored, requests) = (n("body_bytes"), n("stored_row_bytes"), n("requests"));
    println!("sync drain of {size} rows (filled offline in {fill:.1} s), gateway → hub on loopback, TLS:");
    println!(
        "  drain rate   {:>10.0} rows/s  ({secs:.2} s, {requests} requests, {:.0} rows/request)  target ≥ 50000 rows/s",
        size as f64 / secs,
        n("rows_received") / requests.max(1.0)
    );
    println!(
        "  CPU          {:>10.0} rows per CPU-second of gateway + hub together  (gateway {gw_cpu:.2} s incl. start-up, hub {hub_cpu:.2} s; load-independent, fsync waits excluded)",
        size as f64 / cpu.max(0.001)
    );
    println!(
        "  wire         {:>10.1} B/row   (ingest request bodies the hub received)",
        wire / size as f64
    );
    println!(
        "  stored       {:>10.1} B/row   (encoded rows the hub stored)",
        stored / size as f64
    );
    println!(
        "  wire/stored  {:>10.3}×  target ≤ 1.2×",
        wire / stored.max(1.0)
    );
    gw.stop();
}
