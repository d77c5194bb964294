//! The verifiable log: rows, hash chain, Merkle tree, checkpoints and proofs.
//!
//! Every change to a machine appends one [`Row`]. Rows are tied together twice:
//!
//! * **Hash chain** ([`row`], [`chain`]): each row's `hash` is SHA-256 of its canonical
//!   encoding (which includes `prev_hash`), and each `prev_hash` is the previous row's `hash`;
//!   row 0 points at [`genesis_prev_hash`]. Walking the chain needs nothing but the rows.
//! * **RFC 6962 Merkle tree** ([`tlog`]): row `seq` is leaf `seq`, with leaf hash
//!   `SHA-256(0x00 ‖ row hash)` and interior nodes `SHA-256(0x01 ‖ left ‖ right)`. Hashes are
//!   kept in Go `tlog`'s append-only "stored hash index" layout, so appending a leaf writes on
//!   average two hashes and every inclusion or consistency proof costs O(log n) reads.
//! * **Checkpoints** ([`note`]): the tree size and root, signed by the gateway's Ed25519 key in
//!   the C2SP signed-note format, so Go's `sumdb/note` and any RFC 6962 verifier can check our
//!   proofs without smgate code.
//!
//! This module is pure except for [`log`], which keeps rows and hashes in redb tables inside
//! the caller's write transaction: the rest knows bytes and hashes, not redb, HTTP or clocks. Storage hands it
//! hashes through [`tlog::HashReader`]; nothing here performs I/O (key generation draws from
//! the OS random source, nothing else touches the outside world).
//!
//! Wire encodings used by callers live here too, so they are written in exactly one place:
//! lowercase hex ([`hex`]) and standard base64 with padding ([`base64`]).
//!
//! [`fuzz_decode`] and [`fuzz_proofs`] are entry points for cargo-fuzz: they must not panic on
//! any input unless one of the invariants they assert has been broken.

pub mod base64;
pub mod canonical;
pub mod chain;
mod fuzz;
pub mod hex;
pub mod log;
pub mod note;
pub mod row;
pub mod tlog;

#[cfg(test)]
mod rfc9162;

pub use chain::{verify_chain, verify_chain_from, ChainReport};
pub use fuzz::{fuzz_decode, fuzz_proofs};
pub use note::{
    key_hash, parse_checkpoint, sign_note, verify_note, Checkpoint, GatewayKey, VerifierKey,
};
pub use row::{genesis_prev_hash, Row};
pub use tlog::{HashReader, MAX_TREE_SIZE};

/// A SHA-256 digest: row hashes, leaf hashes, interior nodes and tree roots.
pub type Hash = [u8; 32];

/// Everything that can go wrong in the ledger. Each variant has a stable [`code`](Self::code)
/// for API error bodies; the message says what was wrong and, where it helps, what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("stored row is truncated: input ended inside `{field}`")]
    Truncated { field: &'static str },

    #[error("stored row has {extra} unexpected trailing byte(s) after the hash")]
    TrailingBytes { extra: usize },

    #[error("unsupported row encoding version {found:#04x}; this build reads version 0x01")]
    UnsupportedVersion { found: u8 },

    #[error("row field `{field}` is {len} bytes long; the limit is {max}")]
    FieldTooLong {
        field: &'static str,
        len: u64,
        max: usize,
    },

    #[error("row field `{field}` must not be empty")]
    FieldEmpty { field: &'static str },

    #[error("row field `{field}` is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },

    #[error("expected a hash as exactly 64 lowercase hex digits")]
    InvalidHex,

    #[error("invalid base64: expected the standard alphabet with `=` padding")]
    InvalidBase64,

    #[error("invalid tree range: {detail}")]
    InvalidTreeRange { detail: String },

    #[error("hash storage has no stored hash at index {index}; the tree is incomplete")]
    MissingHash { index: u64 },

    #[error("hash storage failed: {0}")]
    HashRead(String),

    #[error("hash storage returned {got} hashes for {wanted} requested indexes")]
    HashCountMismatch { wanted: usize, got: usize },

    #[error("Merkle proof does not verify against the given tree size and hashes")]
    ProofFailed,

    #[error("malformed signed note: {0}")]
    MalformedNote(&'static str),

    #[error("malformed note verifier key: {0}; expected <name>+<8 hex>+<base64 key>")]
    MalformedVerifierKey(&'static str),

    #[error("note verifier key hash does not match its name and public key")]
    VerifierKeyHashMismatch,

    #[error("invalid signature by key {name}; the note was altered or signed by another key")]
    InvalidSignature { name: String },

    #[error("note has no signature by key {name}")]
    NoSignature { name: String },

    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(&'static str),

    #[error("Ed25519 key error: {0}")]
    Key(&'static str),
}

impl LedgerError {
    /// A short, stable, machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "row_truncated",
            Self::TrailingBytes { .. } => "row_trailing_bytes",
            Self::UnsupportedVersion { .. } => "row_unsupported_version",
            Self::FieldTooLong { .. } => "row_field_too_long",
            Self::FieldEmpty { .. } => "row_field_empty",
            Self::InvalidUtf8 { .. } => "row_invalid_utf8",
            Self::InvalidHex => "invalid_hex",
            Self::InvalidBase64 => "invalid_base64",
            Self::InvalidTreeRange { .. } => "invalid_tree_range",
            Self::MissingHash { .. } => "missing_hash",
            Self::HashCountMismatch { .. } => "hash_count_mismatch",
            Self::HashRead(_) => "hash_storage",
            Self::ProofFailed => "proof_failed",
            Self::MalformedNote(_) => "malformed_note",
            Self::MalformedVerifierKey(_) => "malformed_verifier_key",
            Self::VerifierKeyHashMismatch => "verifier_key_hash_mismatch",
            Self::InvalidSignature { .. } => "invalid_signature",
            Self::NoSignature { .. } => "no_signature",
            Self::MalformedCheckpoint(_) => "malformed_checkpoint",
            Self::Key(_) => "key_error",
        }
    }
}
