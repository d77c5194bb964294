//! Harness for black-box tests: runs the real `smgate` binary on an ephemeral port with a temp
//! data directory and talks real TLS to it, trusting only the certificate that `init` made.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_smgate");

pub struct Gw {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub addr: String,
    pub owner_key: String,
    pub owner_zid: String,
    pub env: Vec<(String, String)>,
}

/// Runs `smgate --data <dir> <args>` to completion: whether it succeeded, stdout, stderr.
pub fn cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    cli_env(dir, args, &[])
}

/// [`cli`] with `env` added to smgate's environment.
pub fn cli_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run smgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Gw {
    /// Initialises a fresh data directory and starts `serve` with `env` added.
    pub fn start(env: &[(&str, &str)]) -> Gw {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let (ok, out, err) = cli(&data, &["init"]);
        assert!(ok, "init failed: {err}");
        let owner_key = line_value(&out, "owner key ");
        let owner_zid = line_value(&out, "owner account ");
        let mut gw = Gw {
            dir,
            child: None,
            addr: String::new(),
            owner_key,
            owner_zid,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        gw.spawn();
        gw
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `serve` on the existing data directory and waits until it listens.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.arg("--data").arg(self.data()).arg("serve");
        cmd.env("SMGATE_HTTP_LISTEN", "127.0.0.1:0")
            .env("SMGATE_MQTT_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("smgate: listening on https://") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        self.addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("gateway did not start listening");
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit. Inside a multi-thread runtime the wait lets the
    /// runtime keep running, so that open client connections can answer the server's GOAWAY.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.stop_blocking())
            }
            _ => self.stop_blocking(),
        }
    }

    fn stop_blocking(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(self.data().join("tls/cert.pem")).expect("cert")
    }

    pub fn client(&self) -> reqwest::Client {
        client_trusting(&self.cert_pem())
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn client_trusting(pem: &[u8]) -> reqwest::Client {
    client_trusting_within(pem, Duration::from_secs(30))
}

/// A client trusting `pem` alone whose requests give up after `timeout`.
pub fn client_trusting_within(pem: &[u8], timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem).expect("pem"))
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        .timeout(timeout)
        .build()
        .expect("client")
}

pub fn line_value(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in {text}"))
        .trim()
        .to_string()
}

/// Sends a request and returns (status, JSON body, headers).
pub async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = client.request(method, url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("request");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json, headers)
}

/// Rate limits high enough that no burst of a test is refused.
pub const UNLIMITED: &[(&str, &str)] = &[
    ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000"),
    ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "10000000"),
    ("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "10000000"),
];

/// Creates machine `slug` as the owner and returns its admin key.
pub async fn create_machine(gw: &Gw, slug: &str, public: bool) -> String {
    let (s, b, _) = call(
        &gw.client(),
        reqwest::Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(&gw.owner_key),
        Some(serde_json::json!({"slug": slug, "is_public": public})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    b["api_key"].as_str().unwrap().to_string()
}

/// Every row of machine `slug`'s log, in order, read page by page through the explore API.
pub async fn log_rows(gw: &Gw, slug: &str, key: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let (s, b, _) = call(
            &gw.client(),
            reqwest::Method::GET,
            &gw.url(&format!(
                "/api/chain/state-machines/{slug}/explore?from={from}&to={}",
                from + 10_000
            )),
            key,
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        out.extend(b["rows"].as_array().unwrap().iter().cloned());
        match b["next"].as_u64() {
            Some(n) => from = n,
            None => return out,
        }
    }
}

/// Posts `body(worker, i)` for i = 0, 1, … to `path` with the owner key from `workers`
/// concurrent loops, and SIGKILLs the gateway, requests in flight, once `kill_after` were
/// answered 201 (a count, not a time: CI machines vary). A loop stops at its first request not
/// answered 201. Returns `answer` of every 201 body, those that came after the kill included.
pub async fn kill_during_burst<T: Send + 'static>(
    gw: &mut Gw,
    path: &str,
    workers: usize,
    kill_after: usize,
    body: impl Fn(usize, u64) -> Value + Clone + Send + 'static,
    answer: impl Fn(&Value) -> Option<T> + Clone + Send + 'static,
) -> Vec<T> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<T>();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, url, key) = (gw.client(), gw.url(path), gw.owner_key.clone());
        let (body, answer, tx) = (body.clone(), answer.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let sent = client.post(&url).bearer_auth(&key).json(&body(w, i)).send();
                let Ok(r) = sent.await else { return };
                if r.status() != 201 {
                    return;
                }
                let Some(a) = r.json::<Value>().await.ok().as_ref().and_then(&answer) else {
                    return;
                };
                let _ = tx.send(a);
            }
        }));
    }
    drop(tx);
    let mut answered = Vec::new();
    while answered.len() < kill_after {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(a)) => answered.push(a),
            _ => panic!("the burst stalled after {} answers", answered.len()),
        }
    }
    gw.kill();
    for t in tasks {
        let _ = t.await;
    }
    while let Some(a) = rx.recv().await {
        answered.push(a);
    }
    answered
}

/// The value of an unlabelled sample of `/metrics` (0 when the gateway does not print it).
pub async fn metric(gw: &Gw, name: &str) -> u64 {
    let (_, b, _) = call(
        &gw.client(),
        reqwest::Method::GET,
        &gw.url("/metrics"),
        None,
        None,
    )
    .await;
    let text = b.as_str().unwrap_or_default().to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// Whether the outside programs a test talks to (mosquitto, mosquitto_pub, …) are installed.
/// `cargo test` on a machine with only the Rust toolchain skips such a test with a loud note;
/// `.ci/run` installs the programs and sets `CI_REQUIRE_PEERS=1`, under which a missing
/// program fails the test instead of skipping it.
pub fn have_programs(programs: &[&str]) -> bool {
    let found = |p: &str| {
        if p.contains('/') {
            Path::new(p).exists()
        } else {
            std::env::var_os("PATH")
                .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
                .unwrap_or(false)
        }
    };
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !found(p)).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI_REQUIRE_PEERS").as_deref() != Ok("1"),
        "CI_REQUIRE_PEERS=1 but {missing:?} is not installed"
    );
    eprintln!(
        "SKIPPED: this test needs {missing:?}; `.ci/run` installs them and requires this test"
    );
    false
}

/// The example heartbeat machine's definition (`firmware-config/machines/heartbeat.json`).
pub const HEARTBEAT_DEF: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/firmware-config/machines/heartbeat.json"
));

/// Opens (or creates) the store `db.redb` in `dir`, for tests that drive the library on a
/// store without a gateway.
pub fn open_db(dir: &Path) -> std::sync::Arc<redb::Database> {
    smgate::store::Store::open(
        &dir.join("db.redb"),
        smgate::store::StoreOptions {
            tables: smgate::gateway::TABLES,
            ..Default::default()
        },
    )
    .unwrap()
    .database()
    .unwrap()
}

/// The `auth` those tests pass to steps: an operator.
pub fn operator() -> Value {
    serde_json::json!({"sub": "test", "role": "operator"})
}

/// Creates machine `slug` with the example heartbeat chart as its current version, in
/// `txn`: for tests that drive `instances` or `mqtt::ingest` on a store, without a gateway.
pub fn create_heartbeat_machine(txn: &redb::WriteTransaction, slug: &str, now_ms: i64) {
    let owner = smgate::auth::Zid::parse("ZEQ00000000001").unwrap();
    let defaults = smgate::machines::Defaults {
        region: "test".into(),
        parent_origin: "https://test".into(),
    };
    let request =
        smgate::machines::NewMachine::from_json(&serde_json::json!({ "slug": slug })).unwrap();
    smgate::machines::create(txn, &owner, "test", request, &defaults, now_ms).unwrap();
    smgate::instances::create_version(txn, slug, HEARTBEAT_DEF, None, true, "test", now_ms)
        .unwrap();
}

/// Checks a C2SP `cosignature/v1` line by `vkey` in `note`, independently of the hub's code
/// (key ID, timestamped signature over `cosignature/v1\ntime <t>\n` and the note body), and
/// returns its timestamp.
pub fn verify_cosignature(note: &str, vkey: &str) -> u64 {
    use smgate::ledger::base64;
    let mut parts = vkey.splitn(3, '+');
    let (name, id_hex, material) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        base64::decode(parts.next().unwrap()).unwrap(),
    );
    assert_eq!(material[0], 0x04, "cosignature/v1 key type");
    let public = &material[1..];
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut h, format!("{name}\n").as_bytes());
    sha2::Digest::update(&mut h, [0x04]);
    sha2::Digest::update(&mut h, public);
    let digest = sha2::Digest::finalize(h);
    assert_eq!(smgate::ledger::hex::encode(&digest[..4]), id_hex, "key ID");
    let split = note.rfind("\n\n").expect("signature block");
    let body = &note[..split + 1];
    let line = note[split + 2..]
        .lines()
        .find_map(|l| l.strip_prefix(&format!("\u{2014} {name} ")))
        .expect("a cosignature line by this cosigner");
    let sig = base64::decode(line).unwrap();
    assert_eq!(sig.len(), 4 + 8 + 64);
    assert_eq!(&digest[..4], &sig[..4]);
    let ts = u64::from_be_bytes(sig[4..12].try_into().unwrap());
    let message = format!("cosignature/v1\ntime {ts}\n{body}");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
        .verify(message.as_bytes(), &sig[12..])
        .expect("the hub's cosignature verifies");
    ts
}

/// The operator key the tests' hubs are configured with, and its SHA-256 for
/// `SMGATE_HUB_OPERATOR_KEY_SHA256`.
pub const HUB_OPERATOR_KEY: &str = "smo_tests-operator-key-0123456789abcdef";

pub fn hub_operator_key_sha256() -> String {
    smgate::ledger::hex::encode(&smgate::auth::sha256(HUB_OPERATOR_KEY.as_bytes()))
}

/// A started `smgate hub`: the process, the lines it prints after its banner, and what the
/// banner says.
pub struct HubStart {
    pub child: Child,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub addr: String,
    pub pin: String,
    pub cosigner: String,
}

/// Spawns `cmd` (an `smgate … hub` command line its caller prepared) with stdout piped and
/// reads the hub's banner: address, certificate pin, cosigner key.
pub fn start_hub(cmd: &mut Command) -> HubStart {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn hub");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = |prefix: &str, wait: u64| {
        let line = lines
            .recv_timeout(Duration::from_secs(wait))
            .expect("hub did not start");
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("hub banner: {line}"))
            .to_string()
    };
    let addr = next("smgate hub: listening on https://", 60);
    let pin = next("smgate hub: pin sha256:", 5);
    let cosigner = next("smgate hub: cosigner ", 5);
    HubStart {
        child,
        lines,
        addr,
        pin,
        cosigner,
    }
}
