//! Upstream sync: each machine's verifiable log pushed to a central receiver, in order, in
//! bounded batches, each with a signed checkpoint and a consistency proof.
//!
//! - [`client`]: the gateway side. A per-machine watermark (the hub's acked size) lives in
//!   redb and advances only on the hub's answer; rows are read from the log, never copied
//!   into an outbox, so nothing is ever deleted or dropped before it is acked.
//!
//! The receiver, `smgate hub`, is its own module (`crate::hub`): it imports this wire format,
//! and nothing here imports it.
//!
//! The wire format (version 1) is defined here, once, and documented for other
//! implementations in `docs/sync-protocol.md`.

pub mod client;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use serde::{Deserialize, Serialize};

use crate::ledger::Hash;

/// Content type of a version-1 ingest body (a postcard-encoded [`Batch`]).
pub const CONTENT_TYPE: &str = "application/vnd.smgate.sync.v1+postcard";
/// Path of the ingest endpoint, relative to the upstream URL.
pub const INGEST_PATH: &str = "/v1/ingest";
/// Version byte that opens every [`Batch`].
pub const WIRE_VERSION: u8 = 1;
/// Largest ingest body a hub accepts (and the most a client puts in one batch).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// One ingest request: consecutive rows of one machine's log, with a checkpoint covering them.
///
/// Postcard encoding: integers are varints, strings and byte strings are a varint length then
/// the bytes, `Vec<T>` is a varint count then the items, `[u8; 32]` is 32 raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Always [`WIRE_VERSION`]; a receiver refuses other values with 400.
    pub version: u8,
    /// `gw-` + 16 hex digits, as printed by `smgate identity`.
    pub gateway_id: String,
    /// The gateway's note verifier key; must equal the enrolled one.
    pub verifier_key: String,
    /// Machine slug; the checkpoint origin is `<gateway_id>/<machine>`.
    pub machine: String,
    /// Genesis Zeqond of the machine's log (row 0's `prev_hash` is derived from it).
    pub genesis_zeqond: u64,
    /// Seq of `rows[0]`.
    pub first_seq: u64,
    /// Stored row bytes (the canonical encoding followed by the row hash), seqs
    /// `first_seq ..`, in order.
    pub rows: Vec<Vec<u8>>,
    /// C2SP signed note of the checkpoint of tree size `first_seq + rows.len()`.
    pub checkpoint: String,
    /// Tree size the consistency proof starts from: the size the gateway believes acked.
    pub proof_from: u64,
    /// RFC 6962 consistency proof from `proof_from` to the checkpoint's size (empty when
    /// `proof_from` is 0 or equal to the size).
    pub consistency: Vec<Hash>,
    /// The machine's log size at the gateway when the batch was built (for lag reporting).
    pub head_size: u64,
}

/// 200 answer of the ingest endpoint (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Highest seq the hub has stored for this machine; `None` when it has none.
    pub stored_seq: Option<u64>,
    /// The hub's C2SP `cosignature/v1` signature line on the batch's checkpoint, when the hub
    /// verified it and it is the largest tree the hub stores of this log (absent otherwise,
    /// and from hubs that do not cosign).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cosignature: Option<String>,
}

impl Ack {
    /// Rows stored: the size the gateway's watermark moves to.
    pub fn stored_size(&self) -> u64 {
        self.stored_seq.map_or(0, |s| s + 1)
    }
}

/// 409 answer: `error` is `fork` (a stored row or link differs) or `tampered` (a row's hash
/// or the signed root does not match the rows); `at` is the first offending seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub error: String,
    pub at: u64,
    pub message: String,
    pub stored_seq: Option<u64>,
}

/// Checkpoint origin of a machine's log.
pub fn origin(gateway_id: &str, slug: &str) -> String {
    format!("{gateway_id}/{slug}")
}

/// A request or response body that is one chunk (the client's batches, the hub's answers).
pub struct OneChunk(pub Option<Bytes>);

impl Body for OneChunk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}
