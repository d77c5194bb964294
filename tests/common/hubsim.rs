//! What the hub tests share: a hub process, simulated gateways that sign their logs with their
//! own keys and push batches over HTTPS as the gateway's sync client does (retry the same rows
//! until a 200, move the watermark to what the hub says it stores), and the check that a log at
//! the database equals the gateway's.

#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{self, BIN};
use smgate::hub::pg::Pg;
use smgate::ledger::note::GatewayKey;
use smgate::ledger::{genesis_prev_hash, tlog, Hash, Row};
use smgate::sync::{Batch, CONTENT_TYPE, INGEST_PATH, WIRE_VERSION};

/// A running `smgate hub` on PostgreSQL.
pub struct HubProc {
    pub child: Child,
    pub addr: String,
    /// The hub's cosigner verifier key, as it prints it at start.
    pub cosigner: String,
    pub lines: Receiver<String>,
}

impl HubProc {
    /// Starts a hub with TLS files in `dir` (shared by the hubs of a test, as behind one
    /// load balancer) and the database at `url`.
    pub fn start(dir: &std::path::Path, url: &str, env: &[(&str, &str)]) -> HubProc {
        let started = common::start_hub(
            Command::new(BIN)
                .arg("--data")
                .arg(dir)
                .args(["hub", "--listen", "127.0.0.1:0"])
                .env("RUST_LOG", "warn")
                .env("SMGATE_HUB_DATABASE_URL", url)
                .env(
                    "SMGATE_HUB_OPERATOR_KEY_SHA256",
                    common::hub_operator_key_sha256(),
                )
                .envs(env.iter().copied()),
        );
        HubProc {
            child: started.child,
            addr: started.addr,
            cosigner: started.cosigner,
            lines: started.lines,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    /// Waits for the test hook's line (the hub holds a commit open).
    pub fn wait_for_hold(&self) {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(120))
                .expect("the hub never reached the hold before COMMIT");
            if line.contains("holding a commit before COMMIT") {
                return;
            }
        }
    }

    pub async fn stats(&self, client: &reqwest::Client) -> serde_json::Value {
        client
            .get(self.url("/v1/stats"))
            .bearer_auth(common::HUB_OPERATOR_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A simulated gateway: its id, signing key and enrolment token.
pub struct SimGateway {
    pub id: String,
    pub key: GatewayKey,
    pub vkey: String,
    pub token: String,
}

impl SimGateway {
    pub fn new(n: u64) -> SimGateway {
        let id = format!("gw-{:016x}", 0x5eed_0000_0000_0000u64 + n);
        let key = GatewayKey::from_pkcs8(&GatewayKey::generate().unwrap()).unwrap();
        let vkey = key.verifier_key(&id).unwrap();
        SimGateway {
            id,
            key,
            vkey,
            token: String::new(),
        }
    }

    /// Enrols through the library (fast for hundreds of gateways).
    pub async fn enroll_in(&mut self, db: &Pg) {
        use smgate::hub::HubStore;
        let (record, token) = smgate::hub::new_enrollment(&self.id, &self.vkey).unwrap();
        db.enroll(&record).await.unwrap();
        self.token = token;
    }
}

/// One machine log of a simulated gateway, with its stored tlog hashes.
#[derive(Clone)]
pub struct SimLog {
    pub machine: String,
    pub genesis: u64,
    pub rows: Vec<Vec<u8>>,
    pub hashes: Vec<Hash>,
    pub edge: tlog::RightEdge,
    pub last_hash: Hash,
}

impl SimLog {
    pub fn new(machine: &str) -> SimLog {
        SimLog {
            machine: machine.to_string(),
            genesis: 1_000,
            rows: Vec::new(),
            hashes: Vec::new(),
            edge: tlog::RightEdge::empty(),
            last_hash: genesis_prev_hash(machine, 1_000),
        }
    }

    /// Appends `n` rows whose payload carries `tag` (two logs grown with different tags from
    /// the same prefix are a fork).
    pub fn grow(&mut self, n: usize, tag: &str) {
        for _ in 0..n {
            let seq = self.rows.len() as u64;
            let (row, bytes) = Row {
                seq,
                zeqond: 1_000 + seq,
                ts_ms: 1_700_000_000_000 + seq as i64,
                kind: "event".into(),
                actor: "sim".into(),
                transition_id: [7; 16],
                payload: format!("{{\"tag\":\"{tag}\",\"seq\":{seq}}}").into_bytes(),
                prev_hash: self.last_hash,
                hash: [0; 32],
            }
            .seal_stored()
            .unwrap();
            let added = self.edge.push(tlog::record_hash(&row.hash)).unwrap();
            self.hashes.extend(added);
            self.last_hash = row.hash;
            self.rows.push(bytes);
        }
    }

    pub fn size(&self) -> u64 {
        self.rows.len() as u64
    }

    /// Another history signed by the same gateway: this log's first `at` rows, then `n` rows
    /// of its own.
    pub fn fork(&self, at: u64, n: usize) -> SimLog {
        let mut fork = self.clone();
        fork.rows.truncate(at as usize);
        fork.hashes.truncate(tlog::stored_hash_count(at) as usize);
        fork.edge = tlog::RightEdge::load(at, &fork.hashes).unwrap();
        fork.last_hash = Row::decode_stored(&fork.rows[at as usize - 1])
            .unwrap()
            .hash;
        fork.grow(n, "other");
        fork
    }

    /// The signed checkpoint note of the first `size` rows.
    pub fn checkpoint(&self, gw: &SimGateway, size: u64) -> String {
        let root = tlog::tree_hash(size, &self.hashes).unwrap();
        let body = smgate::ledger::Checkpoint {
            origin: format!("{}/{}", gw.id, self.machine),
            size,
            root,
        }
        .to_body()
        .unwrap();
        smgate::ledger::note::sign_note(&body, &gw.id, &gw.key).unwrap()
    }

    /// Rows `from..to`, proving consistency from `acked` as a gateway does.
    pub fn batch(&self, gw: &SimGateway, from: u64, to: u64, acked: u64) -> Batch {
        let consistency = if acked > 0 && acked < to {
            tlog::prove_tree(to, acked, &self.hashes).unwrap()
        } else {
            Vec::new()
        };
        Batch {
            version: WIRE_VERSION,
            gateway_id: gw.id.clone(),
            verifier_key: gw.vkey.clone(),
            machine: self.machine.clone(),
            genesis_zeqond: self.genesis,
            first_seq: from,
            rows: self.rows[from as usize..to as usize].to_vec(),
            checkpoint: self.checkpoint(gw, to),
            proof_from: acked,
            consistency,
            head_size: self.size(),
        }
    }
}

/// Runs `smgate --data <dir> <args>` against the database at `url` (empty: the embedded
/// hub): (success, stdout, stderr).
pub fn hub_cli(dir: &std::path::Path, url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--data")
        .arg(dir)
        .args(args)
        .env("SMGATE_HUB_DATABASE_URL", url)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A client of the hubs whose TLS files are in `dir`. A debug hub on a loaded 2-core machine
/// takes tens of seconds over a 61,092-row batch (the tiles test), so it waits up to 2 minutes
/// for an answer.
pub fn client(dir: &std::path::Path) -> reqwest::Client {
    let pem = std::fs::read(dir.join("tls/cert.pem")).unwrap();
    common::client_trusting_within(&pem, Duration::from_secs(120))
}

/// POSTs a batch; `Err` is a transport error (no answer).
pub async fn post(
    client: &reqwest::Client,
    hub: &str,
    token: &str,
    batch: &Batch,
) -> Result<(u16, serde_json::Value, reqwest::header::HeaderMap), String> {
    let res = client
        .post(format!("https://{hub}{INGEST_PATH}"))
        .bearer_auth(token)
        .header("content-type", CONTENT_TYPE)
        .body(postcard::to_allocvec(batch).unwrap())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.json().await.unwrap_or(serde_json::Value::Null);
    Ok((status, body, headers))
}

/// The pushing side shared by a test's simulated gateways: the hubs, whose turn is next, and
/// how many batches were acknowledged.
pub struct Pusher {
    pub client: reqwest::Client,
    pub hubs: Vec<String>,
    pub turn: AtomicU64,
    pub acked: AtomicU64,
    /// Per `(gateway, machine)`: the rows the hubs acknowledged storing (what must never be
    /// lost).
    pub acked_sizes: Mutex<HashMap<(String, String), u64>>,
    /// Answers that were not a 200: 503s and transport errors.
    pub retries: AtomicU64,
}

impl Pusher {
    pub fn new(client: reqwest::Client, hubs: &[HubProc]) -> Arc<Pusher> {
        Arc::new(Pusher {
            client,
            hubs: hubs.iter().map(|h| h.addr.clone()).collect(),
            turn: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_sizes: Mutex::new(HashMap::new()),
            retries: AtomicU64::new(0),
        })
    }

    /// Pushes `log` like a gateway: batches of up to `batch_rows`, each to the next hub in
    /// turn, retrying on 503 and transport errors. Asserts that the hub's stored size never
    /// goes back below what it acknowledged.
    pub async fn push(&self, gw: &SimGateway, log: &SimLog, batch_rows: u64) {
        let mut acked = 0;
        while acked < log.size() {
            let to = (acked + batch_rows).min(log.size());
            let batch = log.batch(gw, acked, to, acked);
            let turn = self.turn.fetch_add(1, Ordering::Relaxed) as usize;
            let hub = &self.hubs[turn % self.hubs.len()];
            match post(&self.client, hub, &gw.token, &batch).await {
                Ok((200, body, _)) => {
                    let stored = body["stored_seq"].as_u64().map_or(0, |s| s + 1);
                    assert!(
                        stored >= acked,
                        "{}/{}: the hub acknowledged {acked} rows before and now stores {stored}",
                        gw.id,
                        log.machine
                    );
                    acked = stored;
                    self.acked.fetch_add(1, Ordering::Relaxed);
                    let key = (gw.id.clone(), log.machine.clone());
                    self.acked_sizes.lock().unwrap().insert(key, acked);
                }
                Ok((503, _, headers)) => {
                    assert!(
                        headers.contains_key("retry-after"),
                        "503 without Retry-After"
                    );
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Ok((status, body, _)) => panic!("{}/{}: {status} {body}", gw.id, log.machine),
            }
        }
    }
}

/// The log at the database equals the gateway's: same rows once each, the gateway's own
/// signed checkpoint, which verifies under its key and whose root is the root of the rows the
/// database holds; and every stored tile holds the tree's hashes.
pub async fn check_log(db: &tokio_postgres::Client, gw: &SimGateway, log: &SimLog) {
    let m = log.machine.as_str();
    let row = db
        .query_one(
            "SELECT size, checkpoint FROM logs WHERE gw = $1 AND machine = $2",
            &[&gw.id, &m],
        )
        .await
        .unwrap();
    let size: i64 = row.get(0);
    let note: String = row.get(1);
    assert_eq!(size as u64, log.size(), "{}/{m}: stored size", gw.id);
    assert_eq!(
        note,
        log.checkpoint(gw, log.size()),
        "{}/{m}: checkpoint",
        gw.id
    );
    let rows = db
        .query(
            "SELECT seq, row FROM log_rows WHERE gw = $1 AND machine = $2 ORDER BY seq",
            &[&gw.id, &m],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len() as u64,
        log.size(),
        "{}/{m}: rows stored once each",
        gw.id
    );
    let mut edge = tlog::RightEdge::empty();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.get::<_, i64>(0), i as i64);
        let bytes: Vec<u8> = r.get(1);
        assert_eq!(bytes, log.rows[i], "{}/{m}: row {i}", gw.id);
        let h: Hash = bytes[bytes.len() - 32..].try_into().unwrap();
        edge.push(tlog::record_hash(&h)).unwrap();
    }
    let body = smgate::ledger::verify_note(&note, &gw.vkey).expect("checkpoint verifies");
    let cp = smgate::ledger::parse_checkpoint(&body).unwrap();
    assert_eq!(
        (cp.size, cp.root),
        (log.size(), edge.root()),
        "{}/{m}: root",
        gw.id
    );
    let tiles = db
        .query(
            "SELECT level, idx, hashes FROM log_tiles WHERE gw = $1 AND machine = $2",
            &[&gw.id, &m],
        )
        .await
        .unwrap();
    for t in &tiles {
        let (level, idx): (i16, i64) = (t.get(0), t.get(1));
        let hashes: Vec<u8> = t.get(2);
        for (k, h) in hashes.chunks(32).enumerate() {
            let n = idx as u64 * 256 + k as u64;
            let want = log.hashes[tlog::stored_hash_index(8 * level as u32, n) as usize];
            assert_eq!(h, want, "{}/{m}: tile {level}/{idx} hash {k}", gw.id);
        }
    }
    let expected_tiles = smgate::hub::check::partial_tiles(log.size()).len()
        + (0..8).map(|l| (log.size() >> (8 * l)) / 256).sum::<u64>() as usize;
    assert_eq!(tiles.len(), expected_tiles, "{}/{m}: tiles", gw.id);
}
