//! The gateway side of sync: pushes each machine's log to `upstream.url`.
//!
//! # Watermark
//! Per machine, `sync_acked[slug]` holds the tree size the hub has acknowledged storing. It is
//! written through the writer only after the hub's 200 answer, and set to exactly what the hub
//! says it has (so a hub restored from an older backup makes the gateway rewind and resend).
//! Rows are read from the log itself; sync never copies, moves or deletes them, so a row can
//! never be lost between the log and the hub. After a crash the gateway resends from the
//! durable watermark; the hub answers repeated rows idempotently.
//!
//! # Schedule
//! One task walks the machines with a backlog and drains each in turn, up to 64 batches
//! (each at most `batch_rows` rows and `batch_bytes` bytes) before the next machine's turn,
//! until all are drained, then sleeps until the next commit. The batches of a machine are
//! pipelined: while the hub verifies and stores one, the next is read and encoded, and the
//! previous watermark is written; a watermark write that fails makes the machine resend from
//! its durable watermark.
//! While the hub is unreachable (connection error, 5xx, 401) it retries with jittered
//! exponential backoff between `min_backoff_ms` and `max_backoff_ms`; new commits do not cut
//! the wait short. A 409 from the hub (fork or tampered history) stops that machine's sync
//! (retried every `max_backoff_ms`) and is shown in `GET /api/sync/status`.
//!
//! # Backlog quota
//! Unacked rows are never deleted. When the total unacked backlog exceeds
//! `backlog_quota_bytes`, the gateway raises an alarm — `smgate_sync_backlog_over_quota 1` in
//! `/metrics`, `over_quota: true` in `/api/sync/status`, and one `warn` log line per crossing —
//! and keeps accepting writes; if the disk itself fills, the store's own policy applies
//! (writes answer 507 `storage_full`, nothing committed is lost).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper_util::rt::TokioIo;
use redb::{ReadTransaction, TableDefinition};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    origin, Ack, Batch, Conflict, OneChunk, CONTENT_TYPE, INGEST_PATH, MAX_BODY_BYTES, WIRE_VERSION,
};
use crate::gateway::Identity;
use crate::ledger::{self, log, Checkpoint};
use crate::store::{self, GroupCommit, Store, StoreError};
use crate::{clock, machines};

/// slug → [`Watermark`]: what the hub has acknowledged.
pub const ACKED: TableDefinition<&str, &[u8]> = TableDefinition::new("sync_acked");
/// slug → [`Cosigned`]: the hub's last cosignature of this machine's checkpoint.
pub const COSIGNED: TableDefinition<&str, &[u8]> = TableDefinition::new("sync_cosigned");

/// The hub's C2SP cosignature line on the checkpoint of tree size `size` (the gateway's own
/// note of that size, with this line appended, verifies under both keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cosigned {
    pub size: u64,
    pub line: String,
}

/// The cosignature line stored for `slug` if it cosigns the tree of `size` (none when the
/// hub does not cosign, or has not yet seen this size).
pub fn cosignature(
    txn: &ReadTransaction,
    slug: &str,
    size: u64,
) -> Result<Option<String>, StoreError> {
    let table = match txn.open_table(COSIGNED) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(v) = table.get(slug)? else {
        return Ok(None);
    };
    let c = store::decode::<Cosigned>(v.value())?;
    Ok((c.size == size).then_some(c.line))
}

/// A hub's answer carries at most one signature line: `— <name> <base64>` and a newline.
fn signature_line(line: &str) -> bool {
    line.strip_prefix("\u{2014} ")
        .and_then(|l| l.strip_suffix('\n'))
        .is_some_and(|l| l.split(' ').count() == 2 && !l.chars().any(char::is_control))
}

/// `[upstream]`: where and how to push the log. An empty `url` turns sync off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `https://host:port` of the receiver (`smgate hub` or compatible); empty: no sync.
    pub url: String,
    /// PEM CA certificate(s) to trust for the receiver.
    pub ca_file: Option<PathBuf>,
    /// Instead of a CA: base64 SHA-256 of the receiver's SubjectPublicKeyInfo (DER), as
    /// printed by `smgate hub` (`pin sha256:…`). Survives certificate renewal with the same key.
    pub pin_sha256: Option<String>,
    /// Bearer token printed by `smgate hub enroll`.
    pub token: String,
    /// Most rows in one batch.
    pub batch_rows: usize,
    /// Most row bytes in one batch (a single larger row still goes alone).
    pub batch_bytes: usize,
    /// First retry delay while the receiver is unreachable; doubles up to `max_backoff_ms`.
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Unacked backlog above which the alarm fires (rows are kept regardless).
    pub backlog_quota_bytes: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: String::new(),
            ca_file: None,
            pin_sha256: None,
            token: String::new(),
            batch_rows: 16_384,
            batch_bytes: 8 << 20,
            min_backoff_ms: 500,
            max_backoff_ms: 60_000,
            backlog_quota_bytes: 1 << 30,
        }
    }
}

impl UpstreamConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.url.is_empty() {
            return Ok(());
        }
        if !self.url.starts_with("https://") {
            return Err("upstream.url must start with https://".into());
        }
        if self.ca_file.is_none() && self.pin_sha256.is_none() {
            return Err("upstream needs ca_file or pin_sha256 to trust the receiver".into());
        }
        if let Some(pin) = &self.pin_sha256 {
            parse_pin(pin)?;
        }
        if self.token.is_empty() {
            return Err(
                "upstream.token is empty; give the token printed by `smgate hub enroll`".into(),
            );
        }
        if self.batch_rows == 0 || self.batch_bytes == 0 || self.batch_bytes > MAX_BODY_BYTES / 2 {
            return Err(format!(
                "upstream.batch_rows must be ≥ 1 and batch_bytes in 1..={}",
                MAX_BODY_BYTES / 2
            ));
        }
        if self.min_backoff_ms == 0 || self.max_backoff_ms < self.min_backoff_ms {
            return Err("upstream backoff: need 0 < min_backoff_ms ≤ max_backoff_ms".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Watermark {
    /// Rows the hub has stored: seqs `0..acked_size`.
    pub acked_size: u64,
    pub acked_ms: i64,
}

/// In-memory status of one machine's sync (the watermark itself is in redb).
#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineSync {
    pub last_success_ms: Option<i64>,
    pub last_error: Option<String>,
    /// `fork`, `tampered`, `unauthorized`, `offline`, `refused` or `local`.
    pub last_error_code: Option<String>,
    pub last_error_ms: Option<i64>,
    /// First offending seq of a 409.
    pub conflict_at: Option<u64>,
    pub next_retry_ms: Option<i64>,
}

/// What the sync task uses of the running gateway.
pub struct Deps {
    pub config: UpstreamConfig,
    pub store: Arc<Store>,
    pub writer: GroupCommit,
    /// Signs the checkpoints of the batches.
    pub identity: Arc<Identity>,
    /// What the task reports, read by `/api/sync/status` and `/metrics`.
    pub state: Arc<SyncState>,
}

/// Shared between the sync task and `/api/sync/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct SyncState {
    pub machines: Mutex<BTreeMap<String, MachineSync>>,
    pub over_quota: AtomicBool,
    pub rows_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub batches_acked: AtomicU64,
    pub conflicts: AtomicU64,
}

impl SyncState {
    fn update(&self, slug: &str, f: impl FnOnce(&mut MachineSync)) {
        if let Ok(mut m) = self.machines.lock() {
            f(m.entry(slug.to_owned()).or_default());
        }
    }

    pub fn get(&self, slug: &str) -> MachineSync {
        self.machines
            .lock()
            .ok()
            .and_then(|m| m.get(slug).cloned())
            .unwrap_or_default()
    }

    /// Prometheus lines for `/metrics`.
    pub fn render(&self) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP smgate_sync_rows_sent_total Rows sent upstream (including resends).\n# TYPE smgate_sync_rows_sent_total counter\nsmgate_sync_rows_sent_total {}\n\
             # HELP smgate_sync_bytes_sent_total Ingest body bytes sent upstream.\n# TYPE smgate_sync_bytes_sent_total counter\nsmgate_sync_bytes_sent_total {}\n\
             # HELP smgate_sync_batches_acked_total Batches the receiver acknowledged.\n# TYPE smgate_sync_batches_acked_total counter\nsmgate_sync_batches_acked_total {}\n\
             # HELP smgate_sync_conflicts_total Batches refused with 409 (fork or tampered).\n# TYPE smgate_sync_conflicts_total counter\nsmgate_sync_conflicts_total {}\n\
             # HELP smgate_sync_backlog_over_quota 1 while the unacked backlog exceeds upstream.backlog_quota_bytes.\n# TYPE smgate_sync_backlog_over_quota gauge\nsmgate_sync_backlog_over_quota {}\n",
            l(&self.rows_sent),
            l(&self.bytes_sent),
            l(&self.batches_acked),
            l(&self.conflicts),
            u8::from(self.over_quota.load(Ordering::Relaxed)),
        )
    }
}

/// The acked size of `slug` (0 when it was never acked or the table does not exist yet).
pub fn acked(txn: &ReadTransaction, slug: &str) -> Result<u64, StoreError> {
    let table = match txn.open_table(ACKED) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let v = table.get(slug)?;
    Ok(v.map(|v| store::decode::<Watermark>(v.value()))
        .transpose()?
        .map_or(0, |w| w.acked_size))
}

/// Backlog of one machine: (head size, acked size, unacked rows, unacked bytes, exact?).
/// Bytes are summed exactly up to 65,536 rows and extrapolated beyond, so the status call
/// stays cheap with a million rows queued.
pub fn backlog(
    txn: &ReadTransaction,
    slug: &str,
) -> Result<(u64, u64, u64, u64, bool), StoreError> {
    let size = log::read::head(txn, slug)?.map_or(0, |h| h.size);
    let acked = acked(txn, slug)?.min(size);
    let rows = size - acked;
    const SAMPLE: u64 = 65_536;
    let table = txn.open_table(log::ROWS)?;
    let mut bytes = 0u64;
    let mut n = 0u64;
    for entry in table.range((slug, acked)..(slug, size.min(acked + SAMPLE)))? {
        bytes += entry?.1.value().len() as u64;
        n += 1;
    }
    let exact = n == rows;
    if !exact && n > 0 {
        bytes = bytes / n * rows;
    }
    Ok((size, acked, rows, bytes, exact))
}

/// Where and how to connect.
struct Upstream {
    host: String,
    port: u16,
    authority: String,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    token: String,
}

/// Marks the TLS error of a pin mismatch, so that sync status can name it.
const PIN_MISMATCH: &str = "upstream key does not match upstream.pin_sha256";

/// `upstream.pin_sha256`: base64 (standard alphabet, padded) of a 32-byte SHA-256.
fn parse_pin(pin: &str) -> Result<[u8; 32], String> {
    ledger::base64::decode(pin.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| {
            "upstream.pin_sha256 must be the base64 SHA-256 of the receiver's public key \
             (44 characters, as printed by `smgate hub`)"
                .to_owned()
        })
}

/// Base64 SHA-256 of the SubjectPublicKeyInfo of a DER certificate: the pin of its key.
pub fn spki_pin(cert: &CertificateDer<'_>) -> Result<String, String> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("certificate: {e}"))?;
    Ok(ledger::base64::encode(&crate::auth::sha256(
        ee.subject_public_key_info().as_ref(),
    )))
}

/// Trusts the receiver whose certificate carries the pinned public key, whatever signed the
/// certificate (the hub's is self-signed). The handshake signatures are still checked
/// against that key by rustls' webpki verifiers, so only the key's holder gets through.
#[derive(Debug)]
struct PinnedKey {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            rustls::Error::General(format!("upstream certificate does not parse: {e}"))
        })?;
        let got = crate::auth::sha256(ee.subject_public_key_info().as_ref());
        if crate::auth::ct_eq(&got, &self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "{PIN_MISMATCH} (the receiver's key is {})",
                ledger::base64::encode(&got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl Upstream {
    fn new(cfg: &UpstreamConfig) -> Result<Upstream, String> {
        let uri: http::Uri = cfg
            .url
            .parse()
            .map_err(|_| format!("bad upstream.url `{}`", cfg.url))?;
        let host = uri
            .host()
            .ok_or("upstream.url has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = match (&cfg.pin_sha256, &cfg.ca_file) {
            (Some(pin), _) => {
                let pin = parse_pin(pin)?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedKey { pin, provider }))
                    .with_no_client_auth()
            }
            (None, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
                for c in certs {
                    roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            (None, None) => return Err("upstream needs ca_file or pin_sha256".into()),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(host.clone())
            .map_err(|_| format!("bad upstream host `{host}`"))?;
        Ok(Upstream {
            authority: uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| host.clone()),
            host,
            port,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
            token: cfg.token.clone(),
        })
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<OneChunk>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

/// How one push ended, when it did not end in an ack.
enum PushError {
    /// Unreachable, 5xx, 401: retry everything later with backoff.
    Offline {
        code: &'static str,
        message: String,
    },
    /// 409 or another refusal of this machine's batch.
    Refused {
        code: String,
        at: Option<u64>,
        message: String,
    },
    Local(String),
}

/// Builds the next batch of `slug` from `acked` on. `None` when there is nothing to send.
fn build_batch(
    deps: &Deps,
    txn: &ReadTransaction,
    slug: &str,
    acked: u64,
) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
    let cfg = &deps.config;
    let Some(head) = log::read::head(txn, slug)? else {
        return Ok(None);
    };
    if acked >= head.size {
        return Ok(None);
    }
    let table = txn.open_table(log::ROWS)?;
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    let end = head.size.min(acked + cfg.batch_rows as u64);
    for entry in table.range((slug, acked)..(slug, end))? {
        let (_, v) = entry?;
        let v = v.value();
        if !rows.is_empty() && bytes + v.len() > cfg.batch_bytes {
            break;
        }
        bytes += v.len();
        rows.push(v.to_vec());
    }
    let size = acked + rows.len() as u64;
    let root = log::read::tree_hash(txn, slug, size)?;
    let id = &deps.identity.id;
    let body = Checkpoint {
        origin: origin(id, slug),
        size,
        root,
    }
    .to_body()
    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let checkpoint = ledger::sign_note(&body, id, &deps.identity.key)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let consistency = if acked > 0 && acked < size {
        log::read::prove_consistency(txn, slug, acked, size)?
    } else {
        Vec::new()
    };
    let batch = Batch {
        version: WIRE_VERSION,
        gateway_id: id.clone(),
        verifier_key: deps.identity.verifier_key(),
        machine: slug.to_owned(),
        genesis_zeqond: head.genesis_zeqond,
        first_seq: acked,
        rows,
        checkpoint,
        proof_from: acked,
        consistency,
        head_size: head.size,
    };
    let n = batch.rows.len() as u64;
    Ok(Some((
        postcard::to_allocvec(&batch).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        n,
    )))
}

async fn post(
    upstream: &Upstream,
    conn: &mut Option<hyper::client::conn::http1::SendRequest<OneChunk>>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), PushError> {
    let offline = |m: String| PushError::Offline {
        code: "offline",
        message: m,
    };
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = Some(upstream.connect().await.map_err(|m| {
            if m.contains(PIN_MISMATCH) {
                PushError::Offline {
                    code: "pin_mismatch",
                    message: m,
                }
            } else {
                offline(m)
            }
        })?);
    }
    let Some(sender) = conn.as_mut() else {
        return Err(offline("no connection".into()));
    };
    sender.ready().await.map_err(|e| offline(e.to_string()))?;
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(INGEST_PATH)
        .header(http::header::HOST, &upstream.authority)
        .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", upstream.token),
        )
        .header(
            http::header::USER_AGENT,
            concat!("smgate/", env!("CARGO_PKG_VERSION")),
        )
        .body(OneChunk(Some(Bytes::from(body))))
        .map_err(|e| PushError::Local(e.to_string()))?;
    let res = match tokio::time::timeout(Duration::from_secs(120), sender.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            *conn = None;
            return Err(offline(e.to_string()));
        }
        Err(_) => {
            *conn = None;
            return Err(offline("no answer within 120 s".into()));
        }
    };
    let status = res.status().as_u16();
    let mut body = res.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| offline(e.to_string()))?;
        if let Ok(d) = frame.into_data() {
            bytes.extend_from_slice(&d);
        }
    }
    Ok((status, bytes))
}

/// A batch ready to send.
struct Built {
    body: Vec<u8>,
    rows: u64,
}

/// Reads and encodes the next batch of `slug` from `from` on, off the async threads.
async fn build(deps: &Arc<Deps>, slug: &str, from: u64) -> Result<Option<Built>, PushError> {
    let (deps, slug) = (deps.clone(), slug.to_owned());
    tokio::task::spawn_blocking(move || deps.store.view(|txn| build_batch(&deps, txn, &slug, from)))
        .await
        .map_err(|e| PushError::Local(e.to_string()))?
        .map(|b| b.map(|(body, rows)| Built { body, rows }))
        .map_err(|e| PushError::Local(e.to_string()))
}

/// Sends one batch and returns the hub's ack.
async fn send(
    deps: &Deps,
    upstream: &Upstream,
    conn: &mut Option<hyper::client::conn::http1::SendRequest<OneChunk>>,
    built: Built,
) -> Result<Ack, PushError> {
    let len = built.body.len() as u64;
    let (status, answer) = post(upstream, conn, built.body).await?;
    deps.state
        .rows_sent
        .fetch_add(built.rows, Ordering::Relaxed);
    deps.state.bytes_sent.fetch_add(len, Ordering::Relaxed);
    let text = String::from_utf8_lossy(&answer);
    match status {
        200 => serde_json::from_slice::<Ack>(&answer).map_err(|e| PushError::Refused {
            code: "refused".into(),
            at: None,
            message: format!("unreadable ack: {e}"),
        }),
        409 => {
            let c: Conflict = serde_json::from_slice(&answer).map_err(|e| PushError::Refused {
                code: "refused".into(),
                at: None,
                message: format!("409 without a readable body: {e}"),
            })?;
            Err(PushError::Refused {
                code: c.error,
                at: Some(c.at),
                message: c.message,
            })
        }
        401 => Err(PushError::Offline {
            code: "unauthorized",
            message: format!("401: {text}"),
        }),
        s if s >= 500 => Err(PushError::Offline {
            code: "offline",
            message: format!("{s}: {text}"),
        }),
        s => Err(PushError::Refused {
            code: "refused".into(),
            at: None,
            message: format!("{s}: {text}"),
        }),
    }
}

/// Writes the durable watermark of `slug` through the writer.
async fn save_watermark(
    deps: Arc<Deps>,
    slug: String,
    acked_size: u64,
    cosignature: Option<String>,
) -> Result<(), StoreError> {
    deps.writer
        .write(move |txn| -> Result<(), StoreError> {
            if let Some(line) = cosignature.filter(|l| signature_line(l)) {
                let mut c = txn.open_table(COSIGNED)?;
                let cosigned = Cosigned {
                    size: acked_size,
                    line,
                };
                c.insert(slug.as_str(), store::encode(&cosigned).as_slice())?;
            }
            let mut t = txn.open_table(ACKED)?;
            t.insert(
                slug.as_str(),
                store::encode(&Watermark {
                    acked_size,
                    acked_ms: clock::now_ms(),
                })
                .as_slice(),
            )?;
            Ok(())
        })
        .await
}

/// The watermark write in flight: at most one, so watermarks reach disk in ack order.
type Saving = Option<(String, tokio::task::JoinHandle<Result<(), StoreError>>)>;

/// Waits for the watermark write in flight; if it failed, forgets the in-memory cursor so
/// that the machine resends from its durable watermark.
async fn settle(saving: &mut Saving, cursors: &mut BTreeMap<String, u64>) {
    let Some((slug, task)) = saving.take() else {
        return;
    };
    let outcome = task
        .await
        .unwrap_or_else(|e| Err(StoreError::Corrupt(e.to_string())));
    if let Err(e) = outcome {
        cursors.remove(&slug);
        tracing::warn!(error = %e, "sync: cannot save the watermark; will resend");
    }
}

/// Most batches one machine sends in a row before the others get their turn.
const BATCHES_PER_TURN: usize = 64;

/// Jittered exponential backoff.
struct Backoff {
    min: u64,
    max: u64,
    current: u64,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let mut r = [0u8; 8];
        crate::auth::fill_random(&mut r);
        // Full jitter over [base/2, base].
        let jitter = u64::from_le_bytes(r) % (base / 2 + 1);
        Duration::from_millis(base / 2 + jitter)
    }

    fn reset(&mut self) {
        self.current = self.min;
    }
}

/// The sync task; returns at once when `upstream.url` is empty.
pub async fn run(deps: Deps, mut shutdown: watch::Receiver<bool>) {
    let Some(mut p) = Pusher::new(deps) else {
        return;
    };
    let mut commits = p.deps.writer.subscribe();
    loop {
        if *shutdown.borrow() {
            p.settle().await;
            return;
        }
        let work = p.scan();
        let now = clock::now_ms();
        let mut progressed = false;
        let mut offline = None;
        for (slug, durable) in work {
            if p.deps
                .state
                .get(&slug)
                .next_retry_ms
                .is_some_and(|t| t > now)
            {
                continue;
            }
            let (next, moved) = p.push(&slug, durable, &shutdown).await;
            progressed |= moved;
            match next {
                Ok(_) => {}
                Err(PushError::Offline { code, message }) => {
                    offline = Some((slug, code, message));
                    break;
                }
                Err(e) => p.record_failure(&slug, e, now),
            }
            if *shutdown.borrow() {
                p.settle().await;
                return;
            }
        }
        p.settle().await;
        if let Some((slug, code, message)) = offline {
            if p.back_off(&slug, code, message, &mut shutdown).await {
                continue;
            }
            return;
        }
        if progressed {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(p.until_next_retry()) => {}
            _ = commits.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The sync task's state between passes.
struct Pusher {
    deps: Arc<Deps>,
    upstream: Upstream,
    conn: Option<hyper::client::conn::http1::SendRequest<OneChunk>>,
    backoff: Backoff,
    /// In-memory cursors: the hub's last answer, ahead of the durable watermark only while
    /// its write is in flight.
    cursors: BTreeMap<String, u64>,
    saving: Saving,
    quota_checked: Option<std::time::Instant>,
}

/// Summing the backlog's bytes reads up to 65,536 rows per machine: done for the quota alarm
/// at most this often, not before every batch.
const QUOTA_EVERY: Duration = Duration::from_secs(5);

impl Pusher {
    /// `None` when sync is off (no `upstream.url`) or misconfigured (logged).
    fn new(deps: Deps) -> Option<Pusher> {
        let cfg = &deps.config;
        if cfg.url.is_empty() {
            return None;
        }
        let upstream = match Upstream::new(cfg) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "upstream sync disabled: bad configuration");
                return None;
            }
        };
        let backoff = Backoff {
            min: cfg.min_backoff_ms,
            max: cfg.max_backoff_ms,
            current: cfg.min_backoff_ms,
        };
        Some(Pusher {
            deps: Arc::new(deps),
            upstream,
            conn: None,
            backoff,
            cursors: BTreeMap::new(),
            saving: None,
            quota_checked: None,
        })
    }

    async fn settle(&mut self) {
        settle(&mut self.saving, &mut self.cursors).await;
    }

    /// The machines with rows the upstream has not acked, from their durable watermarks;
    /// raises or clears the quota alarm when it is time to check it.
    fn scan(&mut self) -> Vec<(String, u64)> {
        let check_quota = self
            .quota_checked
            .is_none_or(|t| t.elapsed() >= QUOTA_EVERY);
        let work = self.deps.store.view(|txn| {
            let mut out = Vec::new();
            let mut total = 0u64;
            for m in machines::all(txn)? {
                let (size, acked) = if check_quota {
                    let (size, acked, _, bytes, _) = backlog(txn, &m.slug)?;
                    total += bytes;
                    (size, acked)
                } else {
                    let size = log::read::head(txn, &m.slug)?.map_or(0, |h| h.size);
                    (size, acked(txn, &m.slug)?)
                };
                if size > acked {
                    out.push((m.slug.into(), acked));
                }
            }
            Ok((out, total))
        });
        let (work, backlog_bytes) = match work {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "sync: cannot read the backlog");
                (Vec::new(), 0)
            }
        };
        if check_quota {
            self.quota_checked = Some(std::time::Instant::now());
            let quota = self.deps.config.backlog_quota_bytes;
            let over = backlog_bytes > quota;
            if over != self.deps.state.over_quota.swap(over, Ordering::Relaxed) && over {
                tracing::warn!(backlog_bytes, quota, "sync backlog over quota: rows are kept, but the upstream has not acked them; check the uplink");
            }
        }
        work
    }

    /// Sends up to [`BATCHES_PER_TURN`] batches of `slug` from its cursor on. Returns how the
    /// turn ended (`Ok` when there was nothing more to send) and whether the hub stored
    /// anything new.
    async fn push(
        &mut self,
        slug: &str,
        durable: u64,
        shutdown: &watch::Receiver<bool>,
    ) -> (Result<Option<Built>, PushError>, bool) {
        let mut progressed = false;
        let mut from = self
            .cursors
            .get(slug)
            .copied()
            .unwrap_or(durable)
            .max(durable);
        let mut next = build(&self.deps, slug, from).await;
        for _ in 0..BATCHES_PER_TURN {
            let built = match next {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    next = Err(e);
                    break;
                }
            };
            let sent = from + built.rows;
            // While the hub verifies and stores this batch, read and encode the one after
            // it and let the previous watermark reach the disk.
            let (answer, prebuilt, ()) = tokio::join!(
                send(&self.deps, &self.upstream, &mut self.conn, built),
                build(&self.deps, slug, sent),
                settle(&mut self.saving, &mut self.cursors),
            );
            let stored = match answer {
                Ok(ack) => self.acked(slug, ack),
                Err(e) => {
                    next = Err(e);
                    break;
                }
            };
            if stored == from {
                // The hub stored nothing new: look again after the next commit.
                next = Ok(None);
                break;
            }
            progressed = true;
            next = if stored == sent {
                prebuilt
            } else {
                // The hub has a different size (a restored or ahead receiver): continue
                // from what it says it has.
                build(&self.deps, slug, stored).await
            };
            from = stored;
            if *shutdown.borrow() {
                break;
            }
        }
        (next, progressed)
    }

    /// An ack: the watermark write starts, the cursor moves, the status clears. Returns the
    /// size the hub has stored.
    fn acked(&mut self, slug: &str, ack: Ack) -> u64 {
        self.backoff.reset();
        let stored = ack.stored_size();
        self.deps
            .state
            .batches_acked
            .fetch_add(1, Ordering::Relaxed);
        let save = save_watermark(
            self.deps.clone(),
            slug.to_owned(),
            stored,
            ack.cosignature.clone(),
        );
        self.saving = Some((slug.to_owned(), tokio::spawn(save)));
        self.cursors.insert(slug.to_owned(), stored);
        self.deps.state.update(slug, |m| {
            m.last_success_ms = Some(clock::now_ms());
            m.last_error = None;
            m.last_error_code = None;
            m.conflict_at = None;
            m.next_retry_ms = None;
        });
        stored
    }

    /// A refused or unbuildable batch: the machine waits (the others go on).
    fn record_failure(&self, slug: &str, e: PushError, now: i64) {
        let cfg = &self.deps.config;
        match e {
            PushError::Offline { .. } => {}
            PushError::Refused { code, at, message } => {
                self.deps
                    .state
                    .conflicts
                    .fetch_add(u64::from(at.is_some()), Ordering::Relaxed);
                tracing::error!(machine = %slug, code, at, message, "upstream refused the log; sync of this machine is stopped until it changes");
                let retry = now + cfg.max_backoff_ms as i64;
                self.deps.state.update(slug, |m| {
                    m.last_error = Some(message);
                    m.last_error_code = Some(code);
                    m.last_error_ms = Some(now);
                    m.conflict_at = at;
                    m.next_retry_ms = Some(retry);
                });
            }
            PushError::Local(message) => {
                tracing::warn!(machine = %slug, message, "sync: cannot build a batch");
                let retry = now + cfg.min_backoff_ms as i64;
                self.deps.state.update(slug, |m| {
                    m.last_error = Some(message);
                    m.last_error_code = Some("local".into());
                    m.last_error_ms = Some(now);
                    m.next_retry_ms = Some(retry);
                });
            }
        }
    }

    /// The upstream is unreachable: wait out the backoff. `false` when shut down meanwhile.
    async fn back_off(
        &mut self,
        slug: &str,
        code: &'static str,
        message: String,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let wait = self.backoff.next();
        let retry = clock::now_ms() + wait.as_millis() as i64;
        tracing::info!(machine = %slug, code, message, retry_in_ms = wait.as_millis() as u64, "upstream unreachable; retrying");
        self.deps.state.update(slug, |m| {
            m.last_error = Some(message);
            m.last_error_code = Some(code.into());
            m.last_error_ms = Some(clock::now_ms());
            m.next_retry_ms = Some(retry);
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return false,
        }
        self.deps.state.update(slug, |m| m.next_retry_ms = None);
        true
    }

    /// Until the earliest retry of a machine that waits, at most a minute.
    fn until_next_retry(&self) -> Duration {
        let next = self
            .deps
            .state
            .machines
            .lock()
            .ok()
            .and_then(|m| m.values().filter_map(|s| s.next_retry_ms).min());
        next.map_or(Duration::from_secs(60), |t| {
            Duration::from_millis((t - clock::now_ms()).clamp(10, 60_000) as u64)
        })
    }
}
