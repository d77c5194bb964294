//! `smgate hub`: the reference receiver of gateway logs.
//!
//! Data directory: `hub.redb` (rows, tree hashes and the last checkpoint per gateway and
//! machine), `tls/cert.pem` + `tls/key.pem` (self-signed at first start, like a gateway's), and
//! `enrolled/<gateway-id>.json`, one file per enrolled gateway (its note verifier key and the
//! SHA-256 of its bearer token). Enrolment files are read per request, so `smgate hub enroll`
//! works while the hub runs.
//!
//! # What an ingest guarantees
//! A batch is checked completely before anything is written, in one redb write transaction
//! that commits only when every check passed: the bearer token and verifier key of an enrolled
//! gateway (else 401); the checkpoint note's signature by that key; each new row's seq, hash
//! and link to the previous row (row 0: the genesis hash); rows the hub already has are
//! byte-identical (else 409 `fork`); the tree of all stored rows has the signed root (else 409
//! `tampered`); and, when the gateway proves from the hub's last checkpoint, the consistency
//! proof. So the hub's copy is always a verified prefix of the gateway's log, a repeated
//! batch changes nothing, and a refused batch leaves what the hub had.

pub mod cli;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ledger::{self, genesis_prev_hash, hex, log::TableHashes, tlog, Hash, LedgerError, Row};
use crate::sync::{
    origin, Ack, Batch, OneChunk, CONTENT_TYPE, INGEST_PATH, MAX_BODY_BYTES, WIRE_VERSION,
};
use crate::{auth, clock, store};

/// ("<gateway>/<slug>", seq) → stored row bytes.
const ROWS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("hub_rows");
/// ("<gateway>/<slug>", stored hash index) → 32-byte tlog hash.
const HASHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("hub_hashes");
/// "<gateway>/<slug>" → [`Stored`].
const MACHINES: TableDefinition<&str, &[u8]> = TableDefinition::new("hub_machines");

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hub database: {0}")]
    Store(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Init(#[from] crate::gateway::InitError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Why an ingest was refused; each maps to one status code.
#[derive(Debug)]
pub enum Refusal {
    Unauthorized(&'static str),
    BadRequest(String),
    /// 409: `kind` is `fork` or `tampered`; `at` the first offending seq.
    Conflict {
        kind: &'static str,
        at: u64,
        message: String,
        stored_seq: Option<u64>,
    },
    Unavailable(String),
}

impl Refusal {
    fn conflict(
        kind: &'static str,
        at: u64,
        message: impl Into<String>,
        stored: &Stored,
    ) -> Refusal {
        Refusal::Conflict {
            kind,
            at,
            message: message.into(),
            stored_seq: stored.size.checked_sub(1),
        }
    }
}

fn db_err(e: impl std::fmt::Display) -> Refusal {
    Refusal::Unavailable(e.to_string())
}

/// What the hub keeps per gateway and machine besides the rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub gateway_id: String,
    pub slug: String,
    pub genesis_zeqond: u64,
    /// Rows stored: seqs `0..size`.
    pub size: u64,
    pub last_hash: Hash,
    /// The signed note of the last checkpoint accepted, its size and root.
    pub checkpoint: String,
    pub checkpoint_size: u64,
    pub root: Hash,
    /// The gateway's log size when it built the last batch.
    pub head_size: u64,
    pub last_ingest_ms: i64,
    pub last_row_ts_ms: i64,
}

/// An enrolled gateway, as stored in `enrolled/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrollment {
    pub gateway_id: String,
    pub verifier_key: String,
    /// Lowercase hex SHA-256 of the bearer token; the token itself is shown once by `enroll`.
    pub token_sha256: String,
    pub enrolled_ms: i64,
}

/// Ingest counters, for `GET /v1/stats` and the sync benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub body_bytes: AtomicU64,
    pub rows_received: AtomicU64,
    pub rows_stored: AtomicU64,
    pub stored_row_bytes: AtomicU64,
    pub conflicts: AtomicU64,
    pub unauthorized: AtomicU64,
}

/// A hub's state: its data directory and database.
pub struct Hub {
    pub dir: PathBuf,
    db: Database,
    pub stats: Stats,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_owned(),
        source,
    }
}

fn valid_gateway_id(id: &str) -> bool {
    id.strip_prefix("gw-").is_some_and(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Hub {
    /// Opens (creating on first use) the hub's data directory, database and TLS files.
    pub fn open(dir: &Path) -> Result<Hub, HubError> {
        std::fs::create_dir_all(dir.join("enrolled")).map_err(io(dir))?;
        crate::gateway::ensure_tls_files(&dir.join("tls/cert.pem"), &dir.join("tls/key.pem"))?;
        let db =
            Database::create(dir.join("hub.redb")).map_err(|e| HubError::Store(e.to_string()))?;
        let txn = db
            .begin_write()
            .map_err(|e| HubError::Store(e.to_string()))?;
        {
            let open =
                |r: Result<(), redb::TableError>| r.map_err(|e| HubError::Store(e.to_string()));
            open(txn.open_table(ROWS).map(drop))?;
            open(txn.open_table(HASHES).map(drop))?;
            open(txn.open_table(MACHINES).map(drop))?;
        }
        txn.commit().map_err(|e| HubError::Store(e.to_string()))?;
        Ok(Hub {
            dir: dir.to_owned(),
            db,
            stats: Stats::default(),
        })
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("tls/cert.pem")
    }

    /// Enrols (or re-enrols) a gateway by its note verifier key and returns its new bearer
    /// token. Needs no database, so it works while the hub runs.
    pub fn enroll(dir: &Path, gateway_id: &str, verifier_key: &str) -> Result<String, HubError> {
        if !valid_gateway_id(gateway_id) {
            return Err(HubError::Invalid(format!(
                "`{gateway_id}` is not a gateway id (gw- and 16 hex digits; see `smgate identity`)"
            )));
        }
        let vk = ledger::VerifierKey::parse(verifier_key)
            .map_err(|e| HubError::Invalid(format!("verifier key: {e}")))?;
        if vk.name != gateway_id {
            return Err(HubError::Invalid(format!(
                "the verifier key is named `{}`, not `{gateway_id}`",
                vk.name
            )));
        }
        let enrolled = dir.join("enrolled");
        std::fs::create_dir_all(&enrolled).map_err(io(&enrolled))?;
        let (token, hash) = auth::new_raw_key("smh_");
        let record = Enrollment {
            gateway_id: gateway_id.to_owned(),
            verifier_key: verifier_key.to_owned(),
            token_sha256: hex::encode(&hash),
            enrolled_ms: clock::now_ms(),
        };
        let path = enrolled.join(format!("{gateway_id}.json"));
        let tmp = enrolled.join(format!(".{gateway_id}.json.tmp"));
        let text =
            serde_json::to_vec_pretty(&record).map_err(|e| HubError::Invalid(e.to_string()))?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(&text)
                .and_then(|_| f.sync_all())
                .map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(token)
    }

    pub fn enrollment(&self, gateway_id: &str) -> Option<Enrollment> {
        if !valid_gateway_id(gateway_id) {
            return None;
        }
        let text =
            std::fs::read(self.dir.join("enrolled").join(format!("{gateway_id}.json"))).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn enrollments(&self) -> Vec<Enrollment> {
        let mut out: Vec<Enrollment> = std::fs::read_dir(self.dir.join("enrolled"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .filter_map(|id| self.enrollment(&id))
            .collect();
        out.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        out
    }

    /// Checks the bearer token and key of the batch's gateway.
    pub fn authorize(&self, bearer: Option<&str>, batch: &Batch) -> Result<Enrollment, Refusal> {
        let enrolled = self
            .enrollment(&batch.gateway_id)
            .ok_or(Refusal::Unauthorized("gateway is not enrolled"))?;
        let token = bearer.ok_or(Refusal::Unauthorized("no bearer token"))?;
        if !auth::ct_eq(
            hex::encode(&auth::sha256(token.as_bytes())).as_bytes(),
            enrolled.token_sha256.as_bytes(),
        ) {
            return Err(Refusal::Unauthorized("bearer token is not this gateway's"));
        }
        if batch.verifier_key != enrolled.verifier_key {
            return Err(Refusal::Unauthorized(
                "verifier key differs from the enrolled one",
            ));
        }
        Ok(enrolled)
    }

    /// Verifies and stores one batch of an authorized gateway (see the module doc).
    pub fn ingest(&self, enrolled: &Enrollment, batch: &Batch) -> Result<Ack, Refusal> {
        if batch.version != WIRE_VERSION {
            return Err(Refusal::BadRequest(format!(
                "wire version {} is not supported; this hub speaks {WIRE_VERSION}",
                batch.version
            )));
        }
        if !crate::machines::valid_slug(&batch.machine) {
            return Err(Refusal::BadRequest("machine is not a valid slug".into()));
        }
        if batch.rows.is_empty() {
            return Err(Refusal::BadRequest(
                "a batch carries at least one row".into(),
            ));
        }
        let body =
            ledger::verify_note(&batch.checkpoint, &enrolled.verifier_key).map_err(
                |e| match e {
                    LedgerError::InvalidSignature { .. } | LedgerError::NoSignature { .. } => {
                        Refusal::Unauthorized("checkpoint is not signed by the enrolled key")
                    }
                    other => Refusal::BadRequest(format!("checkpoint: {other}")),
                },
            )?;
        let cp = ledger::parse_checkpoint(&body)
            .map_err(|e| Refusal::BadRequest(format!("checkpoint: {e}")))?;
        let key = origin(&enrolled.gateway_id, &batch.machine);
        if cp.origin != key {
            return Err(Refusal::BadRequest(format!(
                "checkpoint origin `{}` is not `{key}`",
                cp.origin
            )));
        }
        let end = batch
            .first_seq
            .checked_add(batch.rows.len() as u64)
            .ok_or_else(|| Refusal::BadRequest("seq overflow".into()))?;
        if cp.size != end {
            return Err(Refusal::BadRequest(format!(
                "checkpoint size {} does not cover rows {}..{end}",
                cp.size, batch.first_seq
            )));
        }

        let txn = self.db.begin_write().map_err(db_err)?;
        let mut fresh = Vec::new();
        let stored = {
            let machines = txn.open_table(MACHINES).map_err(db_err)?;
            let rows = txn.open_table(ROWS).map_err(db_err)?;
            let hashes = txn.open_table(HASHES).map_err(db_err)?;
            let stored = match machines.get(key.as_str()).map_err(db_err)? {
                Some(v) => store::decode::<Stored>(v.value()).map_err(db_err)?,
                None => Stored {
                    gateway_id: enrolled.gateway_id.clone(),
                    slug: batch.machine.clone(),
                    genesis_zeqond: batch.genesis_zeqond,
                    size: 0,
                    last_hash: genesis_prev_hash(&batch.machine, batch.genesis_zeqond),
                    checkpoint: String::new(),
                    checkpoint_size: 0,
                    root: tlog::empty_tree_hash(),
                    head_size: 0,
                    last_ingest_ms: 0,
                    last_row_ts_ms: 0,
                },
            };
            if stored.genesis_zeqond != batch.genesis_zeqond {
                return Err(Refusal::conflict(
                    "fork",
                    0,
                    "genesis Zeqond differs from the stored log's",
                    &stored,
                ));
            }
            if batch.first_seq > stored.size {
                // A gap: the gateway believes the hub has more than it has (a restored hub).
                // Answer with what is stored; the gateway rewinds to it.
                return Ok(Ack {
                    stored_seq: stored.size.checked_sub(1),
                });
            }
            // Rows the hub has must be exactly the same bytes.
            for (i, bytes) in batch.rows.iter().enumerate() {
                let seq = batch.first_seq + i as u64;
                if seq >= stored.size {
                    break;
                }
                let same = rows
                    .get((key.as_str(), seq))
                    .map_err(db_err)?
                    .is_some_and(|v| v.value() == bytes.as_slice());
                if !same {
                    let tampered = Row::decode_stored(bytes)
                        .map(|r| !r.verify_hash())
                        .unwrap_or(true);
                    let kind = if tampered { "tampered" } else { "fork" };
                    return Err(Refusal::conflict(
                        kind,
                        seq,
                        "row differs from the one already stored",
                        &stored,
                    ));
                }
            }
            let stored_hashes = TableHashes {
                table: &hashes,
                slug: key.as_str(),
            };
            // The new rows' tree hashes come from the right edge of the stored tree alone,
            // in index order, so they are also inserted in key order below.
            let mut edge = if end > stored.size {
                tlog::RightEdge::load(stored.size, &stored_hashes)
                    .map_err(|e| Refusal::Unavailable(e.to_string()))?
            } else {
                tlog::RightEdge::empty()
            };
            let mut new_hashes: Vec<Hash> = Vec::new();
            let mut leaf_hashes = Vec::with_capacity(8);
            let mut last_hash = stored.last_hash;
            let mut last_ts = stored.last_row_ts_ms;
            let skip = (stored.size - batch.first_seq) as usize;
            for (i, bytes) in batch.rows.iter().enumerate().skip(skip) {
                let seq = batch.first_seq + i as u64;
                let row = Row::decode_stored(bytes).map_err(|e| {
                    Refusal::conflict(
                        "tampered",
                        seq,
                        format!("row does not decode: {e}"),
                        &stored,
                    )
                })?;
                if row.seq != seq {
                    return Err(Refusal::conflict(
                        "tampered",
                        seq,
                        format!("row claims seq {}", row.seq),
                        &stored,
                    ));
                }
                if !Row::stored_hash_matches(bytes) {
                    return Err(Refusal::conflict(
                        "tampered",
                        seq,
                        "row hash does not match its contents",
                        &stored,
                    ));
                }
                if row.prev_hash != last_hash {
                    return Err(Refusal::conflict(
                        "fork",
                        seq,
                        "prev_hash does not link to the stored log",
                        &stored,
                    ));
                }
                edge.next_hashes(tlog::record_hash(&row.hash), &mut leaf_hashes)
                    .map_err(|e| Refusal::Unavailable(e.to_string()))?;
                edge.advance(&leaf_hashes);
                new_hashes.extend_from_slice(&leaf_hashes);
                last_hash = row.hash;
                last_ts = row.ts_ms;
                fresh.push(seq);
            }
            let root = if fresh.is_empty() {
                tlog::tree_hash(cp.size, &stored_hashes)
                    .map_err(|e| Refusal::Unavailable(e.to_string()))?
            } else {
                edge.root()
            };
            if root != cp.root {
                let at = fresh.first().copied().unwrap_or(batch.first_seq);
                return Err(Refusal::conflict(
                    "tampered",
                    at,
                    "the signed root is not the root of the rows",
                    &stored,
                ));
            }
            let c = stored.checkpoint_size;
            if c > 0
                && c < cp.size
                && batch.proof_from == c
                && tlog::check_tree(&batch.consistency, cp.size, &cp.root, c, &stored.root).is_err()
            {
                return Err(Refusal::conflict(
                    "fork",
                    c,
                    "consistency proof from the last stored checkpoint fails",
                    &stored,
                ));
            }
            if fresh.is_empty() {
                // A repeated batch: nothing to write. Dropping the transaction aborts it.
                return Ok(Ack {
                    stored_seq: stored.size.checked_sub(1),
                });
            }
            drop(hashes);
            let mut hashes = txn.open_table(HASHES).map_err(db_err)?;
            let first = tlog::stored_hash_index(0, stored.size);
            for (i, h) in new_hashes.iter().enumerate() {
                hashes
                    .insert((key.as_str(), first + i as u64), h.as_slice())
                    .map_err(db_err)?;
            }
            drop(rows);
            let mut rows = txn.open_table(ROWS).map_err(db_err)?;
            let mut bytes_stored = 0u64;
            for (i, bytes) in batch.rows.iter().enumerate().skip(skip) {
                rows.insert((key.as_str(), batch.first_seq + i as u64), bytes.as_slice())
                    .map_err(db_err)?;
                bytes_stored += bytes.len() as u64;
            }
            self.stats
                .rows_stored
                .fetch_add(fresh.len() as u64, Ordering::Relaxed);
            self.stats
                .stored_row_bytes
                .fetch_add(bytes_stored, Ordering::Relaxed);
            let updated = Stored {
                size: end,
                last_hash,
                checkpoint: batch.checkpoint.clone(),
                checkpoint_size: cp.size,
                root: cp.root,
                head_size: batch.head_size.max(end),
                last_ingest_ms: clock::now_ms(),
                last_row_ts_ms: last_ts,
                ..stored
            };
            drop(machines);
            let mut machines = txn.open_table(MACHINES).map_err(db_err)?;
            machines
                .insert(key.as_str(), store::encode(&updated).as_slice())
                .map_err(db_err)?;
            updated
        };
        txn.commit().map_err(db_err)?;
        Ok(Ack {
            stored_seq: stored.size.checked_sub(1),
        })
    }

    /// Machines stored for one gateway.
    pub fn machines(&self, gateway_id: &str) -> Result<Vec<Stored>, HubError> {
        let e = |e: &dyn std::fmt::Display| HubError::Store(e.to_string());
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        let table = txn.open_table(MACHINES).map_err(|x| e(&x))?;
        let prefix = format!("{gateway_id}/");
        let mut out = Vec::new();
        for entry in table.range(prefix.as_str()..).map_err(|x| e(&x))? {
            let (k, v) = entry.map_err(|x| e(&x))?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            out.push(store::decode::<Stored>(v.value()).map_err(|x| e(&x))?);
        }
        Ok(out)
    }

    /// Stored rows `from..to` of one machine, decoded.
    pub fn rows(
        &self,
        gateway_id: &str,
        slug: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<Row>, HubError> {
        let e = |e: &dyn std::fmt::Display| HubError::Store(e.to_string());
        let txn = self.db.begin_read().map_err(|x| e(&x))?;
        let table = txn.open_table(ROWS).map_err(|x| e(&x))?;
        let key = origin(gateway_id, slug);
        let mut out = Vec::new();
        for entry in table
            .range((key.as_str(), from)..(key.as_str(), to.max(from)))
            .map_err(|x| e(&x))?
        {
            let (_, v) = entry.map_err(|x| e(&x))?;
            out.push(Row::decode_stored(v.value()).map_err(|x| e(&x))?);
        }
        Ok(out)
    }
}

type Response = http::Response<OneChunk>;

fn json_response(status: u16, value: &Value) -> Response {
    let mut res = http::Response::new(OneChunk(Some(Bytes::from(value.to_string()))));
    *res.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}

fn refusal_response(r: Refusal) -> Response {
    match r {
        Refusal::Unauthorized(why) => {
            json_response(401, &json!({"error": "unauthorized", "message": why}))
        }
        Refusal::BadRequest(why) => {
            json_response(400, &json!({"error": "bad_request", "message": why}))
        }
        Refusal::Conflict {
            kind,
            at,
            message,
            stored_seq,
        } => json_response(
            409,
            &json!({"error": kind, "at": at, "message": message, "stored_seq": stored_seq}),
        ),
        Refusal::Unavailable(why) => {
            json_response(503, &json!({"error": "unavailable", "message": why}))
        }
    }
}

/// Reads a body of at most `limit` bytes.
pub async fn read_limited(mut body: Incoming, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(format!("body is larger than {limit} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

async fn handle(hub: Arc<Hub>, req: http::Request<Incoming>) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method().as_str(), parts.as_slice()) {
        ("POST", _) if path == INGEST_PATH => ingest_route(hub, req).await,
        ("GET", ["v1", "gateways"]) => {
            let list: Vec<Value> = hub
                .enrollments()
                .into_iter()
                .map(|e| {
                    let machines = hub.machines(&e.gateway_id).unwrap_or_default();
                    json!({
                        "gateway_id": e.gateway_id,
                        "verifier_key": e.verifier_key,
                        "enrolled_at": clock::rfc3339(e.enrolled_ms),
                        "machines": machines.len(),
                        "rows": machines.iter().map(|m| m.size).sum::<u64>(),
                    })
                })
                .collect();
            json_response(200, &json!({"gateways": list}))
        }
        ("GET", ["v1", "gateways", id, "machines"]) => match hub.machines(id) {
            Ok(ms) => {
                let now = clock::now_ms();
                let list: Vec<Value> = ms.iter().map(|m| machine_json(m, now)).collect();
                json_response(200, &json!({"gateway_id": id, "machines": list}))
            }
            Err(e) => json_response(
                503,
                &json!({"error": "unavailable", "message": e.to_string()}),
            ),
        },
        ("GET", ["v1", "gateways", id, "machines", slug, "rows"]) => {
            let num = |k: &str, d: u64| {
                query
                    .get(k)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(d)
            };
            let from = num("from", 0);
            let to = num("to", from + 1000).min(from + 10_000);
            match hub.rows(id, slug, from, to) {
                Ok(rows) => {
                    let list: Vec<Value> = rows
                        .iter()
                        .map(|r| json!({"seq": r.seq, "type": r.kind, "hash": hex::encode(&r.hash), "prev_hash": hex::encode(&r.prev_hash)}))
                        .collect();
                    json_response(200, &json!({"rows": list}))
                }
                Err(e) => json_response(
                    503,
                    &json!({"error": "unavailable", "message": e.to_string()}),
                ),
            }
        }
        ("GET", ["v1", "stats"]) => {
            let s = &hub.stats;
            let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
            json_response(
                200,
                &json!({
                    "requests": l(&s.requests),
                    "body_bytes": l(&s.body_bytes),
                    "rows_received": l(&s.rows_received),
                    "rows_stored": l(&s.rows_stored),
                    "stored_row_bytes": l(&s.stored_row_bytes),
                    "conflicts": l(&s.conflicts),
                    "unauthorized": l(&s.unauthorized),
                }),
            )
        }
        ("GET", ["healthz"]) => json_response(200, &json!({"ok": true})),
        _ => json_response(
            404,
            &json!({"error": "not_found", "message": "no such route"}),
        ),
    }
}

fn machine_json(m: &Stored, now: i64) -> Value {
    json!({
        "slug": m.slug,
        "stored_seq": m.size.checked_sub(1),
        "stored_size": m.size,
        "checkpoint": m.checkpoint,
        "checkpoint_size": m.checkpoint_size,
        "root": hex::encode(&m.root),
        "gateway_head_size": m.head_size,
        "lag_rows": m.head_size.saturating_sub(m.size),
        "lag_ms": if m.last_row_ts_ms > 0 { (now - m.last_row_ts_ms).max(0) } else { 0 },
        "last_ingest": clock::rfc3339(m.last_ingest_ms),
    })
}

async fn ingest_route(hub: Arc<Hub>, req: http::Request<Incoming>) -> Response {
    hub.stats.requests.fetch_add(1, Ordering::Relaxed);
    let ct = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.split(';').next().map(str::trim) != Some(CONTENT_TYPE) {
        return json_response(
            415,
            &json!({"error": "unsupported_media_type", "message": format!("send Content-Type: {CONTENT_TYPE}")}),
        );
    }
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(s, _)| s.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned());
    let bytes = match read_limited(req.into_body(), MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => return json_response(413, &json!({"error": "payload_too_large", "message": e})),
    };
    hub.stats
        .body_bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    let batch: Batch = match postcard::from_bytes(&bytes) {
        Ok(b) => b,
        Err(e) => {
            return refusal_response(Refusal::BadRequest(format!("body is not a v1 batch: {e}")))
        }
    };
    hub.stats
        .rows_received
        .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
    let worker = hub.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let enrolled = worker.authorize(bearer.as_deref(), &batch)?;
        worker.ingest(&enrolled, &batch)
    })
    .await
    .unwrap_or_else(|e| Err(Refusal::Unavailable(e.to_string())));
    match outcome {
        Ok(ack) => json_response(200, &json!(ack)),
        Err(r) => {
            match &r {
                Refusal::Conflict {
                    kind, at, message, ..
                } => {
                    hub.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(kind, at, message, "ingest refused");
                }
                Refusal::Unauthorized(why) => {
                    hub.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(why, "ingest unauthorized");
                }
                _ => {}
            }
            refusal_response(r)
        }
    }
}

/// Base64 SHA-256 of the SubjectPublicKeyInfo of the first certificate in a PEM file: the
/// value of `upstream.pin_sha256` for a gateway that pins this hub's key.
pub fn cert_pin(pem: &Path) -> Result<String, HubError> {
    use rustls::pki_types::pem::PemObject;
    let cert = rustls::pki_types::CertificateDer::from_pem_file(pem)
        .map_err(|e| HubError::Invalid(format!("{}: {e}", pem.display())))?;
    crate::sync::client::spki_pin(&cert)
        .map_err(|e| HubError::Invalid(format!("{}: {e}", pem.display())))
}

/// Serves the hub on `listener` until `shutdown` changes.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), HubError> {
    let acceptor = crate::tls::Acceptor::load(&hub.cert_path(), &hub.dir.join("tls/key.pem"))?;
    loop {
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let tls = acceptor.get();
        let hub = hub.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(tcp)).await
            else {
                tracing::debug!(%peer, "TLS handshake failed");
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let hub = hub.clone();
                async move { Ok::<_, Infallible>(handle(hub, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(%peer, error = %e, "hub connection ended with an error");
            }
        });
    }
}
