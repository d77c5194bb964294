//! `smgate hub`: the central receiver of gateway logs, a verifying mirror.
//!
//! Each machine log is sequenced and signed by its gateway, so the hub needs no sequencer: an
//! ingest touches one log, checks the batch against what is stored for it, and writes. Where
//! it writes is a [`HubStore`]: the embedded redb file ([`embedded`], the default: one
//! machine, tests, small fleets) or PostgreSQL ([`pg`], any number of hub processes against one
//! database, every table keyed and partitioned by gateway). The checks are one pure function
//! ([`check`]) that both back ends run, so they accept and refuse the same batches.
//!
//! Data directory: `tls/cert.pem` + `tls/key.pem` (self-signed at first start, like a
//! gateway's), and for the embedded back end `hub.redb` and `enrolled/`.
//!
//! # What an ingest guarantees
//! A batch is checked completely before anything is written: the bearer token and verifier
//! key of an enrolled gateway (else 401); the checkpoint note's signature by that key; each new
//! row's seq, hash and link to the previous row (row 0: the genesis hash); rows the hub already
//! has are byte-identical (else 409 `fork`); the tree of all stored rows has the signed root
//! (else 409 `tampered`); and, when the gateway proves from the hub's last checkpoint, the
//! consistency proof. The write is one transaction that commits only if the log's size is still
//! the one the batch was checked against (a compare-and-set); a hub that loses that race
//! re-reads and re-checks, which for the same batch is an idempotent 200. So the hub's copy is
//! always a verified prefix of the gateway's log, a repeated batch changes nothing, a refused
//! batch leaves what the hub had, and no row is stored twice.

pub mod api;
pub mod check;
pub mod cli;
pub mod cosign;
pub mod embedded;
pub mod import;
pub mod metrics;
pub mod pg;
pub mod tiles;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::ledger::{self, hex, Checkpoint, Hash};
use crate::sync::{Ack, Batch};
use crate::{auth, clock};
use check::{Append, Evidence, Loaded, Verdict};

pub use api::{cert_pin, serve};

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

/// A store that did not answer, or answered with an error: the batch is not stored, and the
/// gateway retries (503).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault(pub String);

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an ingest was refused; each maps to one status code.
#[derive(Debug)]
pub enum Refusal {
    Unauthorized(&'static str),
    BadRequest(String),
    /// 409, with what proves it.
    Conflict(Box<Evidence>),
    /// 503: the store failed or did not answer in time; retry.
    Unavailable(String),
}

impl From<Fault> for Refusal {
    fn from(f: Fault) -> Refusal {
        Refusal::Unavailable(f.0)
    }
}

/// What the hub keeps per gateway and machine besides the rows (the embedded file's record,
/// and what the read API shows of a log on either back end).
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

/// The signed evidence of a refused batch as a store keeps it: once per distinct evidence
/// (`digest`: SHA-256 of the batch's checkpoint note and offending row), with when it was first
/// and last sent and how many times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub machine: String,
    pub digest: Hash,
    pub evidence: Evidence,
    pub first_ms: i64,
    pub last_ms: i64,
    pub times: u64,
}

impl Conflict {
    /// The record of `evidence` about `machine`, first seen at `now_ms`.
    pub fn new(machine: &str, evidence: &Evidence, now_ms: i64) -> Conflict {
        let mut bytes = evidence.checkpoint.as_bytes().to_vec();
        bytes.extend_from_slice(evidence.row.as_deref().unwrap_or_default());
        Conflict {
            machine: machine.to_owned(),
            digest: auth::sha256(&bytes),
            evidence: evidence.clone(),
            first_ms: now_ms,
            last_ms: now_ms,
            times: 1,
        }
    }
}

/// An enrolled gateway: its note verifier key and the SHA-256 of its bearer token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrollment {
    pub gateway_id: String,
    pub verifier_key: String,
    /// Lowercase hex SHA-256 of the bearer token; the token itself is shown once by `enroll`.
    pub token_sha256: String,
    pub enrolled_ms: i64,
}

/// Ingest counters of this hub process, for `GET /v1/stats`, `GET /metrics` and the sync
/// benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub body_bytes: AtomicU64,
    pub rows_received: AtomicU64,
    pub rows_stored: AtomicU64,
    pub stored_row_bytes: AtomicU64,
    pub conflicts: AtomicU64,
    pub unauthorized: AtomicU64,
    pub lost_races: AtomicU64,
    pub unavailable: AtomicU64,
    /// Ingests answered 200, and 400.
    pub accepted: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Time each ingest waited for its store (load and commit, summed).
    pub store_latency: metrics::Latency,
}

/// Where a hub keeps logs. Methods are keyed by gateway: every one reads or writes the logs
/// of one gateway only, which is what lets the PostgreSQL schema be partitioned by it.
pub trait HubStore: Send + Sync + 'static {
    /// The enrolled gateway `gateway_id`, if any.
    fn enrollment(
        &self,
        gateway_id: &str,
    ) -> impl Future<Output = Result<Option<Enrollment>, Fault>> + Send;
    /// Enrolled gateways by id, the first `limit` after `after` (`""`: from the first).
    fn enrollments(
        &self,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Enrollment>, Fault>> + Send;
    /// Enrols (or re-enrols) a gateway.
    fn enroll(&self, record: &Enrollment) -> impl Future<Output = Result<(), Fault>> + Send;
    /// What [`check::decide`] needs to judge `batch` (with checkpoint `cp`) of gateway `gw`.
    fn load(
        &self,
        gw: &str,
        batch: &Batch,
        cp: &Checkpoint,
    ) -> impl Future<Output = Result<Loaded, Fault>> + Send;
    /// Writes an accepted batch in one transaction that commits only if the log's size is
    /// still `append.old_size`; `Ok(false)` when it was not (nothing written).
    fn commit(
        &self,
        gw: &str,
        batch: &Batch,
        append: &Append,
    ) -> impl Future<Output = Result<bool, Fault>> + Send;
    /// Keeps the evidence of a refused batch.
    fn record_conflict(
        &self,
        gw: &str,
        machine: &str,
        evidence: &Evidence,
    ) -> impl Future<Output = Result<(), Fault>> + Send;
    /// The logs of one gateway by machine, the first `limit` after `after` (`""`: from the
    /// first).
    fn machines(
        &self,
        gw: &str,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Stored>, Fault>> + Send;
    /// The conflicts kept for one gateway, ordered by machine, seq, kind and evidence digest:
    /// `limit` of them from the `offset`-th.
    fn conflicts(
        &self,
        gw: &str,
        offset: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Conflict>, Fault>> + Send;
    /// The state of the store's connection pool, for `/metrics` (`None`: no pool).
    fn pool_state(&self) -> Option<metrics::PoolState> {
        None
    }
    /// One log's state, if the hub has any of it.
    fn log(
        &self,
        gw: &str,
        machine: &str,
    ) -> impl Future<Output = Result<Option<Stored>, Fault>> + Send;
    /// The first `width` hashes of hash tile `index` at tile level `level` (C2SP tlog-tiles,
    /// height 8), concatenated; `None` when the store does not have them.
    fn tile(
        &self,
        gw: &str,
        machine: &str,
        level: u8,
        index: u64,
        width: usize,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, Fault>> + Send;
    /// Stored row bytes `from..to` of one log.
    fn rows(
        &self,
        gw: &str,
        slug: &str,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, Fault>> + Send;
}

/// Times a hub re-reads and re-checks a batch after losing the compare-and-set to another hub
/// before it answers 503.
const RACES: usize = 4;

/// A hub: its data directory (TLS files), its store and its counters.
pub struct Hub<S> {
    pub dir: PathBuf,
    pub store: S,
    pub stats: Stats,
    pub cosigner: cosign::Cosigner,
    /// SHA-256 of the operator key (`hub.operator_key_sha256`); empty: no operator.
    pub operator_key_sha256: Option<Hash>,
}

/// Writes `bytes` to `tmp`, readable by the owner only (mode 0600) and synced, for the caller
/// to move into place (a rename replaces, a hard link keeps what is there).
pub(crate) fn write_private_tmp(tmp: &Path, bytes: &[u8]) -> Result<(), HubError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io(tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io(tmp))
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn valid_gateway_id(id: &str) -> bool {
    id.strip_prefix("gw-").is_some_and(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A new enrolment record for a gateway and its bearer token (shown once; only its SHA-256
/// is kept).
pub fn new_enrollment(
    gateway_id: &str,
    verifier_key: &str,
) -> Result<(Enrollment, String), HubError> {
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
    let (token, hash) = auth::new_raw_key("smh_");
    let record = Enrollment {
        gateway_id: gateway_id.to_owned(),
        verifier_key: verifier_key.to_owned(),
        token_sha256: hex::encode(&hash),
        enrolled_ms: clock::now_ms(),
    };
    Ok((record, token))
}

impl<S: HubStore> Hub<S> {
    /// A hub serving `store`, with its TLS files and cosigner key in `dir` (created at first
    /// start), cosigning as `config.name`.
    pub fn new(
        dir: &Path,
        store: S,
        config: &crate::config::HubConfig,
    ) -> Result<Hub<S>, HubError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        crate::gateway::ensure_tls_files(&dir.join("tls/cert.pem"), &dir.join("tls/key.pem"))?;
        let cosigner = cosign::Cosigner::load_or_create(&dir.join("cosigner.pk8"), &config.name)?;
        let operator = hex::decode_hash(&config.operator_key_sha256.to_ascii_lowercase()).ok();
        Ok(Hub {
            dir: dir.to_owned(),
            store,
            stats: Stats::default(),
            cosigner,
            operator_key_sha256: operator,
        })
    }

    /// Whether `bearer` is the operator key: its SHA-256, compared in constant time.
    pub fn is_operator(&self, bearer: Option<&str>) -> bool {
        match (self.operator_key_sha256, bearer) {
            (Some(want), Some(key)) => auth::ct_eq(&auth::sha256(key.as_bytes()), &want),
            _ => false,
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("tls/cert.pem")
    }

    /// Authorizes, verifies and stores one batch (see the module doc). A store bounds each
    /// of its round trips (`hub.timeout_ms` on PostgreSQL), so a store that stops answering
    /// is a 503, never a hung gateway.
    pub async fn ingest(&self, bearer: Option<&str>, batch: &Batch) -> Result<Ack, Refusal> {
        let enrolled = if valid_gateway_id(&batch.gateway_id) {
            self.store.enrollment(&batch.gateway_id).await?
        } else {
            None
        };
        let enrolled = check::authorize(enrolled, bearer, batch)?;
        let gw = enrolled.gateway_id.as_str();
        let (cp, body) = check::parse(&enrolled, batch)?;
        let stored = store_checked(&self.store, gw, batch, &cp).await;
        let size = self.stats.count_store(stored)?.size;
        // A v1 cosignature states "the largest tree I hold of this log": only then.
        Ok(Ack {
            stored_seq: size.checked_sub(1),
            cosignature: (size == cp.size)
                .then(|| self.cosigner.cosign(&body, clock::now_ms() as u64 / 1000)),
        })
    }
}

/// What [`store_checked`] did with a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// Rows the store holds of the log afterwards.
    pub size: u64,
    /// Rows and row bytes this call wrote (0 when the store had them).
    pub fresh_rows: u64,
    pub row_bytes: u64,
    /// Compare-and-sets lost to another hub on the way.
    pub lost_races: u64,
    /// Time spent waiting for the store.
    pub store_time: std::time::Duration,
}

/// Checks a parsed batch (`cp` is its verified checkpoint) against what `store` holds of its
/// log and writes it if it is new ([`check::decide`], then the compare-and-set commit): the
/// whole of an ingest after authorization, and of `smgate hub import`. A conflict's evidence
/// is recorded before the refusal is returned.
pub async fn store_checked<S: HubStore>(
    store: &S,
    gw: &str,
    batch: &Batch,
    cp: &Checkpoint,
) -> Result<Outcome, (Refusal, Outcome)> {
    let mut out = Outcome::default();
    for _ in 0..RACES {
        let started = std::time::Instant::now();
        let loaded = store.load(gw, batch, cp).await;
        out.store_time += started.elapsed();
        let loaded = loaded.map_err(|f| (f.into(), out))?;
        // Hashing a large batch takes milliseconds: off the async worker's hands.
        let verdict =
            tokio::task::block_in_place(|| check::decide(&loaded, batch, cp, clock::now_ms()));
        match verdict {
            Ok(Verdict::Stored(size)) => return Ok(Outcome { size, ..out }),
            Ok(Verdict::Append(append)) => {
                let started = std::time::Instant::now();
                let won = store.commit(gw, batch, &append).await;
                out.store_time += started.elapsed();
                if won.map_err(|f| (f.into(), out))? {
                    out.size = append.state.size;
                    out.fresh_rows = (batch.rows.len() - append.skip) as u64;
                    out.row_bytes = append.row_bytes;
                    return Ok(out);
                }
                out.lost_races += 1;
            }
            Err(Refusal::Conflict(evidence)) => {
                let kept = store.record_conflict(gw, &batch.machine, &evidence).await;
                kept.map_err(|f| (f.into(), out))?;
                return Err((Refusal::Conflict(evidence), out));
            }
            Err(other) => return Err((other, out)),
        }
    }
    let why =
        format!("other hubs wrote this log {RACES} times while this one checked the batch; retry");
    Err((Refusal::Unavailable(why), out))
}

impl Stats {
    /// Counts what [`store_checked`] did and passes its answer on.
    fn count_store(&self, r: Result<Outcome, (Refusal, Outcome)>) -> Result<Outcome, Refusal> {
        let (Ok(o) | Err((_, o))) = &r;
        self.rows_stored.fetch_add(o.fresh_rows, Ordering::Relaxed);
        self.stored_row_bytes
            .fetch_add(o.row_bytes, Ordering::Relaxed);
        self.lost_races.fetch_add(o.lost_races, Ordering::Relaxed);
        self.store_latency.record(o.store_time);
        r.map_err(|(refusal, _)| refusal)
    }
}

/// Opens the store the configuration names: PostgreSQL when `hub.database_url` is set (its
/// migrations applied), else the embedded redb file in `dir`.
pub enum Opened {
    Embedded(Hub<embedded::Embedded>),
    Pg(Hub<pg::Pg>),
}

impl Opened {
    pub async fn open(dir: &Path, config: &crate::config::HubConfig) -> Result<Opened, HubError> {
        if config.database_url.is_empty() {
            let store = embedded::Embedded::open(dir)?;
            return Ok(Opened::Embedded(Hub::new(dir, store, config)?));
        }
        let store = pg::Pg::connect(config).await?;
        store.migrate().await?;
        Ok(Opened::Pg(Hub::new(dir, store, config)?))
    }
}
