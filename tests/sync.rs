//! Upstream sync against `smgate hub` on loopback; both sides are the real binary.
//!
//! Invariants checked: rows written while the hub is down arrive after it returns, in order
//! and exactly once; SIGKILL of either side leaves no hole and no duplicate; a tampered row
//! is refused with 409 and the hub keeps what it had; unenrolled gateways and wrong keys get
//! 401; a long offline backlog drains completely, checked against signed checkpoints.

mod common;
#[path = "common/rfc6962.rs"]
mod rfc6962;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{call, cli, hub_operator_key_sha256, line_value, Gw, BIN, HUB_OPERATOR_KEY};
use reqwest::Method;
use serde_json::{json, Value};

const MANY: &[(&str, &str)] = &[
    ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000"),
    ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "10000000"),
    ("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "10000000"),
];

/// A running `smgate hub` with its own data directory.
struct Hub {
    dir: tempfile::TempDir,
    child: Option<Child>,
    addr: String,
    pin: String,
    /// The hub's cosigner verifier key, as it prints it at start.
    cosigner: String,
}

impl Hub {
    fn start() -> Hub {
        let mut hub = Hub {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            addr: "127.0.0.1:0".into(),
            pin: String::new(),
            cosigner: String::new(),
        };
        hub.spawn();
        hub
    }

    /// Starts (again) on the address it had, so gateways find it where they left it.
    fn spawn(&mut self) {
        let started = common::start_hub(
            Command::new(BIN)
                .arg("--data")
                .arg(self.dir.path())
                .args(["hub", "--listen", &self.addr])
                .env("RUST_LOG", "warn")
                .env("SMGATE_HUB_OPERATOR_KEY_SHA256", hub_operator_key_sha256()),
        );
        self.addr = started.addr;
        self.pin = started.pin;
        self.cosigner = started.cosigner;
        self.child = Some(started.child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    fn client(&self) -> reqwest::Client {
        common::client_trusting(&std::fs::read(self.dir.path().join("tls/cert.pem")).unwrap())
    }

    /// Enrols a gateway and returns its token.
    fn enroll(&self, id: &str, vkey: &str) -> String {
        let (ok, out, err) = cli(self.dir.path(), &["hub", "enroll", id, vkey]);
        assert!(ok, "enroll failed: {err}");
        line_value(&out, "token ")
    }

    async fn machine(&self, gw_id: &str, slug: &str) -> Option<Value> {
        let (s, b, _) = call(
            &self.client(),
            Method::GET,
            &self.url(&format!("/v1/gateways/{gw_id}/machines")),
            Some(HUB_OPERATOR_KEY),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        b["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["slug"] == slug)
            .cloned()
    }

    async fn stored_size(&self, gw_id: &str, slug: &str) -> u64 {
        self.machine(gw_id, slug)
            .await
            .map_or(0, |m| m["stored_size"].as_u64().unwrap())
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
    }
}

fn identity(gw: &Gw) -> (String, String) {
    let (ok, out, err) = cli(&gw.data(), &["identity"]);
    assert!(ok, "{err}");
    (
        line_value(&out, "gateway "),
        line_value(&out, "verifier_key "),
    )
}

/// Points the gateway at the hub (restart needed) with small batches and quick retries.
fn upstream_env(gw: &mut Gw, hub: &Hub, token: &str, batch_rows: u32) {
    gw.env.retain(|(k, _)| !k.starts_with("SMGATE_UPSTREAM_"));
    for (k, v) in [
        ("SMGATE_UPSTREAM_URL", format!("https://{}", hub.addr)),
        ("SMGATE_UPSTREAM_PIN_SHA256", hub.pin.clone()),
        ("SMGATE_UPSTREAM_TOKEN", token.to_string()),
        ("SMGATE_UPSTREAM_BATCH_ROWS", batch_rows.to_string()),
        ("SMGATE_UPSTREAM_MIN_BACKOFF_MS", "100".into()),
        ("SMGATE_UPSTREAM_MAX_BACKOFF_MS", "800".into()),
    ] {
        gw.env.push((k.to_string(), v));
    }
}

async fn create_machine(gw: &Gw, slug: &str) {
    let (s, b, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(&gw.owner_key),
        Some(json!({"slug": slug, "is_public": false})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
}

async fn events(gw: &Gw, slug: &str, n: usize, tag: &str) {
    let c = gw.client();
    let url = gw.url(&format!("/api/chain/state-machines/{slug}/event"));
    for i in 0..n {
        let (s, b, _) = call(
            &c,
            Method::POST,
            &url,
            Some(&gw.owner_key),
            Some(json!({"type": format!("{tag}{i}")})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
    }
}

async fn status(gw: &Gw, slug: &str) -> Value {
    let (s, b, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url("/api/sync/status"),
        Some(&gw.owner_key),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    b["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["slug"] == slug)
        .cloned()
        .expect("machine in status")
}

async fn log_size(gw: &Gw, slug: &str) -> u64 {
    let note = checkpoint(gw, slug).await;
    note.lines().nth(1).unwrap().parse().unwrap()
}

async fn checkpoint(gw: &Gw, slug: &str) -> String {
    let res = gw
        .client()
        .get(gw.url(&format!("/api/chain/state-machines/{slug}/checkpoint")))
        .bearer_auth(&gw.owner_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.text().await.unwrap()
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Row hashes of `from..to` as the gateway serves them (explore pages of up to 500 rows).
async fn gateway_hashes(gw: &Gw, slug: &str, from: u64, to: u64) -> Vec<String> {
    let mut out = Vec::new();
    while from + (out.len() as u64) < to {
        let at = from + out.len() as u64;
        let url = gw.url(&format!(
            "/api/chain/state-machines/{slug}/explore?from={at}&to={}",
            to - 1
        ));
        let (s, b, _) = call(&gw.client(), Method::GET, &url, Some(&gw.owner_key), None).await;
        assert_eq!(s, 200, "{b}");
        let rows = b["rows"].as_array().unwrap();
        assert!(!rows.is_empty());
        for r in rows {
            assert_eq!(r["seq"].as_u64().unwrap(), from + out.len() as u64);
            out.push(r["hash"].as_str().unwrap().to_string());
        }
    }
    out
}

/// Row hashes of `from..to` as the hub stored them; asserts the seqs are contiguous.
async fn hub_hashes(hub: &Hub, gw_id: &str, slug: &str, from: u64, to: u64) -> Vec<String> {
    let mut out = Vec::new();
    while from + (out.len() as u64) < to {
        let at = from + out.len() as u64;
        let url = hub.url(&format!(
            "/v1/gateways/{gw_id}/machines/{slug}/rows?from={at}&to={}",
            to.min(at + 10_000)
        ));
        let (s, b, _) = call(
            &hub.client(),
            Method::GET,
            &url,
            Some(HUB_OPERATOR_KEY),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        let rows = b["rows"].as_array().unwrap();
        assert!(!rows.is_empty(), "hole at seq {at}");
        for r in rows {
            assert_eq!(
                r["seq"].as_u64().unwrap(),
                from + out.len() as u64,
                "rows in order, no hole"
            );
            out.push(r["hash"].as_str().unwrap().to_string());
        }
    }
    out
}

/// The hub's last checkpoint is signed by the gateway, covers everything it stored, and its
/// root is the RFC 6962 root of the gateway's rows (computed here independently).
async fn check_hub_copy(hub: &Hub, gw: &Gw, gw_id: &str, vkey: &str, slug: &str, size: u64) {
    let m = hub.machine(gw_id, slug).await.expect("machine at the hub");
    assert_eq!(m["stored_size"].as_u64().unwrap(), size);
    let (origin, cp_size, root) = rfc6962::open_checkpoint(m["checkpoint"].as_str().unwrap(), vkey);
    assert_eq!(origin, format!("{gw_id}/{slug}"));
    assert_eq!(cp_size, size);
    let gateway = gateway_hashes(gw, slug, 0, size).await;
    let stored = hub_hashes(hub, gw_id, slug, 0, size).await;
    assert_eq!(
        gateway, stored,
        "the hub holds exactly the gateway's rows, in order"
    );
    let leaves: Vec<_> = gateway
        .iter()
        .map(|h| rfc6962::leaf(&rfc6962::unhex(h)))
        .collect();
    assert_eq!(
        rfc6962::mth(&leaves),
        root,
        "signed root is the root of the stored rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_made_while_the_hub_is_down_arrive_in_order_exactly_once() {
    let mut hub = Hub::start();
    let mut gw = Gw::start(MANY);
    let (id, vkey) = identity(&gw);
    let token = hub.enroll(&id, &vkey);
    hub.kill();
    gw.stop();
    upstream_env(&mut gw, &hub, &token, 40);
    gw.spawn();
    create_machine(&gw, "down").await;
    events(&gw, "down", 150, "e").await;
    let size = log_size(&gw, "down").await;
    assert!(size >= 152);
    wait_until(
        "an offline error in the status",
        Duration::from_secs(20),
        || async {
            let s = status(&gw, "down").await;
            s["last_error_code"] == "offline" && s["acked_size"] == 0
        },
    )
    .await;
    let s = status(&gw, "down").await;
    assert_eq!(s["backlog_rows"].as_u64().unwrap(), size);
    assert!(s["backlog_bytes"].as_u64().unwrap() > size * 100);
    assert!(
        s["next_retry"].is_string() || s["last_error"].is_string(),
        "{s}"
    );

    hub.spawn();
    wait_until("the backlog to drain", Duration::from_secs(30), || async {
        hub.stored_size(&id, "down").await == size
    })
    .await;
    check_hub_copy(&hub, &gw, &id, &vkey, "down", size).await;
    let (_, stats, _) = call(
        &hub.client(),
        Method::GET,
        &hub.url("/v1/stats"),
        Some(HUB_OPERATOR_KEY),
        None,
    )
    .await;
    assert_eq!(
        stats["rows_stored"].as_u64().unwrap(),
        size,
        "each row stored exactly once: {stats}"
    );
    wait_until("the watermark", Duration::from_secs(10), || async {
        status(&gw, "down").await["backlog_rows"] == 0
    })
    .await;
    let s = status(&gw, "down").await;
    assert_eq!(s["acked_seq"].as_u64().unwrap(), size - 1);
    assert!(
        s["last_success"].is_string() && s["last_error"].is_null(),
        "{s}"
    );

    // Online, new rows follow at once.
    events(&gw, "down", 5, "live").await;
    wait_until("live rows", Duration::from_secs(10), || async {
        hub.stored_size(&id, "down").await == size + 5
    })
    .await;
    let hub_m = hub.machine(&id, "down").await.unwrap();
    assert_eq!(hub_m["lag_rows"], 0);

    // The gateway keeps the hub's cosignature and serves its checkpoint with both signatures
    // (once the watermark, written with it, is down).
    wait_until("the watermark", Duration::from_secs(10), || async {
        status(&gw, "down").await["backlog_rows"] == 0
    })
    .await;
    let note = checkpoint(&gw, "down").await;
    assert_eq!(note.matches('\u{2014}').count(), 2, "{note}");
    smgate::ledger::verify_note(&note, &vkey).expect("the gateway's signature");
    common::verify_cosignature(&note, &hub.cosigner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_gateway_mid_batch_and_hub_mid_ingest_leaves_no_hole_or_duplicate() {
    let mut hub = Hub::start();
    let mut gw = Gw::start(MANY);
    let (id, vkey) = identity(&gw);
    let token = hub.enroll(&id, &vkey);
    create_machine(&gw, "crash").await;
    gw.stop();
    let (ok, _, err) = cli(
        &gw.data(),
        &["bench", "fill-log", "--machine", "crash", "--rows", "60000"],
    );
    assert!(ok, "{err}");
    upstream_env(&mut gw, &hub, &token, 200);
    gw.spawn();
    let size = log_size(&gw, "crash").await;
    assert_eq!(size, 60_002);
    // SIGKILL the gateway while batches are in flight.
    wait_until("some progress", Duration::from_secs(30), || async {
        hub.stored_size(&id, "crash").await > 2_000
    })
    .await;
    gw.kill();
    let at_kill = hub.stored_size(&id, "crash").await;
    assert!(at_kill < size, "killed mid-drain");
    gw.spawn();
    // SIGKILL the hub while it ingests.
    wait_until("more progress", Duration::from_secs(30), || async {
        hub.stored_size(&id, "crash").await > at_kill + 2_000
    })
    .await;
    hub.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.spawn();
    let after_restart = hub.stored_size(&id, "crash").await;
    assert!(
        after_restart < size,
        "hub killed mid-drain ({after_restart})"
    );
    wait_until("the drain", Duration::from_secs(120), || async {
        hub.stored_size(&id, "crash").await == size
    })
    .await;
    check_hub_copy(&hub, &gw, &id, &vkey, "crash", size).await;
    wait_until("the watermark", Duration::from_secs(10), || async {
        status(&gw, "crash").await["backlog_rows"] == 0
    })
    .await;
    gw.stop();
    let (ok, out, err) = cli(&gw.data(), &["verify"]);
    assert!(ok, "gateway log intact: {out} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_row_is_refused_with_409_and_reported() {
    let mut hub = Hub::start();
    let mut gw = Gw::start(MANY);
    let (id, vkey) = identity(&gw);
    let token = hub.enroll(&id, &vkey);
    gw.stop();
    upstream_env(&mut gw, &hub, &token, 1000);
    gw.spawn();
    create_machine(&gw, "tamper").await;
    events(&gw, "tamper", 3, "ok").await;
    let synced = log_size(&gw, "tamper").await;
    wait_until("first rows", Duration::from_secs(20), || async {
        hub.stored_size(&id, "tamper").await == synced
    })
    .await;
    // Rows the hub has not seen yet; one carries a marker that we then corrupt on disk.
    hub.kill();
    events(&gw, "tamper", 2, "later").await;
    let (s, _, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url("/api/chain/state-machines/tamper/event"),
        Some(&gw.owner_key),
        Some(json!({"type": "MARKER-K4T"})),
    )
    .await;
    assert_eq!(s, 201);
    let marker_seq = synced + 2;
    gw.stop();
    let path = gw.data().join("smgate.redb");
    let mut db = std::fs::read(&path).unwrap();
    let needle = b"MARKER-K4T";
    let mut flipped = 0;
    let mut at = 0;
    while let Some(pos) = db[at..].windows(needle.len()).position(|w| w == needle) {
        db[at + pos] ^= 0x01;
        flipped += 1;
        at += pos + needle.len();
    }
    assert!(flipped >= 1);
    std::fs::write(&path, db).unwrap();
    hub.spawn();
    gw.spawn();
    wait_until("the 409 in the status", Duration::from_secs(20), || async {
        status(&gw, "tamper").await["last_error_code"] == "tampered"
    })
    .await;
    let s = status(&gw, "tamper").await;
    assert_eq!(s["conflict_at"].as_u64().unwrap(), marker_seq, "{s}");
    assert_eq!(
        s["acked_size"].as_u64().unwrap(),
        synced,
        "the watermark stays: {s}"
    );
    assert!(s["last_error"].as_str().unwrap().contains("hash"), "{s}");
    // The hub kept what it had.
    assert_eq!(hub.stored_size(&id, "tamper").await, synced);
    let (_, stats, _) = call(
        &hub.client(),
        Method::GET,
        &hub.url("/v1/stats"),
        Some(HUB_OPERATOR_KEY),
        None,
    )
    .await;
    assert!(stats["conflicts"].as_u64().unwrap() >= 1, "{stats}");
    let (_, metrics, _) = call(&gw.client(), Method::GET, &gw.url("/metrics"), None, None).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("smgate_sync_conflicts_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_gateways_and_wrong_keys_get_401() {
    let hub = Hub::start();
    let mut gw = Gw::start(MANY);
    let (id, vkey) = identity(&gw);
    create_machine(&gw, "auth").await;
    gw.stop();
    // Not enrolled at all.
    upstream_env(&mut gw, &hub, "smh_not-a-token", 1000);
    gw.spawn();
    wait_until("401 in the status", Duration::from_secs(20), || async {
        status(&gw, "auth").await["last_error_code"] == "unauthorized"
    })
    .await;
    assert_eq!(hub.stored_size(&id, "auth").await, 0);
    // Enrolled, but the gateway sends a wrong token.
    let token = hub.enroll(&id, &vkey);
    let (_, before, _) = call(
        &hub.client(),
        Method::GET,
        &hub.url("/v1/stats"),
        Some(HUB_OPERATOR_KEY),
        None,
    )
    .await;
    wait_until("another 401", Duration::from_secs(20), || async {
        let (_, s, _) = call(
            &hub.client(),
            Method::GET,
            &hub.url("/v1/stats"),
            Some(HUB_OPERATOR_KEY),
            None,
        )
        .await;
        s["unauthorized"].as_u64() > before["unauthorized"].as_u64()
    })
    .await;
    assert_eq!(status(&gw, "auth").await["last_error_code"], "unauthorized");
    // Enrolled under another gateway's key: the right token no longer helps.
    let other = Gw::start(MANY);
    let (other_id, other_vkey) = identity(&other);
    assert_ne!(other_id, id);
    gw.stop();
    upstream_env(&mut gw, &hub, &token, 1000);
    let forged = std::fs::read_to_string(hub.dir.path().join(format!("enrolled/{id}.json")))
        .unwrap()
        .replace(&vkey, &other_vkey);
    std::fs::write(hub.dir.path().join(format!("enrolled/{id}.json")), forged).unwrap();
    gw.spawn();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status(&gw, "auth").await["last_error_code"], "unauthorized");
    assert_eq!(hub.stored_size(&id, "auth").await, 0);
    // The same token and key, enrolled properly: accepted.
    let token = hub.enroll(&id, &vkey);
    gw.stop();
    upstream_env(&mut gw, &hub, &token, 1000);
    gw.spawn();
    let size = log_size(&gw, "auth").await;
    wait_until("sync after enrolment", Duration::from_secs(20), || async {
        hub.stored_size(&id, "auth").await == size
    })
    .await;
    // A raw request with no token, and one with a body that is not a batch.
    let res = hub
        .client()
        .post(hub.url("/v1/ingest"))
        .header("content-type", "application/vnd.smgate.sync.v1+postcard")
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = hub
        .client()
        .post(hub.url("/v1/ingest"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
}

/// `upstream.pin_sha256` pins the hub's public key (base64 SHA-256 of its SubjectPublicKeyInfo):
/// the hub's own pin connects; any other key is refused at the TLS handshake, nothing is sent,
/// and `/api/sync/status` says why and names the key the receiver presented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pinned_key_connects_and_a_wrong_pin_is_refused_with_a_clear_error() {
    let hub = Hub::start();
    assert_eq!(hub.pin.len(), 44, "base64 of 32 bytes: {}", hub.pin);
    let mut gw = Gw::start(MANY);
    let (id, vkey) = identity(&gw);
    let token = hub.enroll(&id, &vkey);
    create_machine(&gw, "pinned").await;
    gw.stop();
    upstream_env(&mut gw, &hub, &token, 1000);
    let wrong = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    for (k, v) in gw.env.iter_mut() {
        if k == "SMGATE_UPSTREAM_PIN_SHA256" {
            *v = wrong.into();
        }
    }
    gw.spawn();
    wait_until(
        "the pin error in the status",
        Duration::from_secs(20),
        || async { status(&gw, "pinned").await["last_error_code"] == "pin_mismatch" },
    )
    .await;
    let st = status(&gw, "pinned").await;
    let message = st["last_error"].as_str().unwrap();
    assert!(message.contains("upstream.pin_sha256"), "{message}");
    assert!(
        message.contains(&hub.pin),
        "names the presented key: {message}"
    );
    assert_eq!(hub.stored_size(&id, "pinned").await, 0);
    let (_, stats, _) = call(
        &hub.client(),
        Method::GET,
        &hub.url("/v1/stats"),
        Some(HUB_OPERATOR_KEY),
        None,
    )
    .await;
    assert_eq!(stats["requests"], 0, "nothing crossed a refused handshake");
    // A pin that is not base64 of 32 bytes is a configuration error: serve refuses to start.
    gw.stop();
    for (k, v) in gw.env.iter_mut() {
        if k == "SMGATE_UPSTREAM_PIN_SHA256" {
            *v = "0123abcd".into();
        }
    }
    let out = Command::new(BIN)
        .arg("--data")
        .arg(gw.data())
        .arg("serve")
        .envs(gw.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SMGATE_HTTP_LISTEN", "127.0.0.1:0")
        .env("SMGATE_MQTT_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstream.pin_sha256"), "{err}");
    // The right pin: the rows arrive.
    upstream_env(&mut gw, &hub, &token, 1000);
    gw.spawn();
    let size = log_size(&gw, "pinned").await;
    wait_until(
        "sync with the right pin",
        Duration::from_secs(20),
        || async { hub.stored_size(&id, "pinned").await == size },
    )
    .await;
    assert!(status(&gw, "pinned").await["last_error_code"].is_null());
}

/// Rows accumulated offline (TEST_SYNC_LONG_ROWS, default 50,000; CI sets 1,000,000) drain
/// completely once the hub is reachable, verified against the signed checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_drains_completely() {
    let n: u64 = std::env::var("TEST_SYNC_LONG_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let mut hub = Hub::start();
    let mut gw = Gw::start(MANY);
    let (id, vkey) = identity(&gw);
    let token = hub.enroll(&id, &vkey);
    hub.kill();
    create_machine(&gw, "long").await;
    gw.stop();
    let t = Instant::now();
    let (ok, _, err) = cli(
        &gw.data(),
        &[
            "bench",
            "fill-log",
            "--machine",
            "long",
            "--rows",
            &n.to_string(),
        ],
    );
    assert!(ok, "{err}");
    eprintln!("filled {n} rows offline in {:?}", t.elapsed());
    upstream_env(&mut gw, &hub, &token, 4096);
    gw.spawn();
    let size = log_size(&gw, "long").await;
    assert_eq!(size, n + 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status(&gw, "long").await["backlog_rows"].as_u64().unwrap(),
        size
    );
    hub.spawn();
    let t = Instant::now();
    wait_until(
        "the long drain",
        Duration::from_secs(60 + n / 2_000),
        || async { hub.stored_size(&id, "long").await == size },
    )
    .await;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "drained {size} rows in {secs:.1} s ({:.0} rows/s)",
        size as f64 / secs
    );
    // The hub's checkpoint is the gateway's: same signed size and root.
    let m = hub.machine(&id, "long").await.unwrap();
    let (_, hub_size, hub_root) =
        rfc6962::open_checkpoint(m["checkpoint"].as_str().unwrap(), &vkey);
    let (_, gw_size, gw_root) = rfc6962::open_checkpoint(&checkpoint(&gw, "long").await, &vkey);
    assert_eq!((hub_size, hub_root), (gw_size, gw_root));
    // Spot checks of the stored rows against the gateway's (first, middle and last pages).
    for from in [0, size / 2, size.saturating_sub(1000)] {
        let to = (from + 1000).min(size);
        assert_eq!(
            hub_hashes(&hub, &id, "long", from, to).await,
            gateway_hashes(&gw, "long", from, to).await
        );
    }
    wait_until("the watermark", Duration::from_secs(10), || async {
        status(&gw, "long").await["backlog_rows"] == 0
    })
    .await;
}
