//! The log in redb: one table of stored rows, one of tlog hashes, a head per machine, and an
//! index by Zeqond. This is the only file of `ledger` that touches storage; it is called inside
//! the writer's transactions, so a row is committed in the same transaction as the change it
//! records, or not at all.
//!
//! # Invariants (checked by `smgate verify`)
//! - `rows[(slug, s)]` exists for every `s < head.size`, decodes, has `seq == s`, a hash
//!   matching its contents, and `prev_hash` equal to row `s-1`'s hash (row 0: the genesis
//!   hash of the machine's slug and genesis Zeqond).
//! - Appending row `s` adds the Go-tlog stored hashes of its leaf (`SHA-256(0x00 ‖ row
//!   hash)`) and of the subtrees it completes, level 0 first: `32 × (1 + trailing_ones(s))`
//!   bytes. `tree[(slug, c)]` holds those bytes of rows `16c ..= 16c + 15` (fewer for the last,
//!   incomplete chunk: exactly the rows below `head.size`), concatenated in row order. Row
//!   `s`'s bytes start at [`chunk_offset`]`(s % 16)` in chunk `s / 16`; stored hash `i` of Go's
//!   flat layout is `split_stored_hash_index(i) = (level, n)` → row `((n + 1) << level) − 1`,
//!   slot `level`. A chunk is written once when it completes (and as it grows, once per write
//!   transaction), so a batch of appends costs one insert per row plus one per 16 rows.
//! - `zeqond_runs[(slug, z, first)] = last`: rows `first..=last` were written in Zeqond `z`.
//!   Runs end where a Zeqond or a write transaction ends, so the index costs an insert per
//!   run, not per row; one Zeqond may have several runs (the wall clock can step back).
//! - `head.last_hash` is row `size-1`'s hash.
//!
//! Schema 1 kept one `log_hashes` entry per stored hash and one `log_by_zeqond` entry per row;
//! [`migrate_from_schema_1`] rewrites those tables into schema 2's layout, which kept one
//! `log_tree` entry per row; [`migrate_from_schema_2`] groups those into the chunks above.
//!
//! The files: `write.rs` appends (the [`LogWriter`] of a write transaction), `read.rs` reads
//! rows, heads and proofs, `verify.rs` rechecks the invariants above, `migrate.rs` moves older
//! schemas' tables into these.

mod migrate;
pub mod read;
mod verify;
mod write;

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{genesis_prev_hash, tlog, Hash, HashReader, LedgerError, Row};
use crate::clock;
use crate::store::{self, StoreError};

pub use migrate::{
    drop_schema_1_tables, drop_schema_2_tables, migrate_from_schema_1, migrate_from_schema_2,
};
pub use verify::{verify_machine, Verification};
pub use write::{append, LogWriter};

/// (slug, seq) → stored row bytes.
pub const ROWS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_rows");
/// (slug, chunk) → the tree hashes appending rows `16 chunk ..` stored (module doc).
pub const TREE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_tree_chunks");
/// Rows whose tree hashes share one [`TREE`] entry.
pub const CHUNK_ROWS: u64 = 16;
/// slug → [`Head`].
pub const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("log_heads");
/// (slug, zeqond, first seq) → last seq: a run of rows written in one Zeqond.
pub const ZEQOND_RUNS: TableDefinition<(&str, u64, u64), u64> =
    TableDefinition::new("log_zeqond_runs");

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    pub size: u64,
    pub last_hash: Hash,
    pub genesis_zeqond: u64,
}

/// What a change contributes to its row; the log fills in seq, time and hashes.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: &'static str,
    pub actor: String,
    pub transition_id: [u8; 16],
    pub payload: Vec<u8>,
}

impl Entry {
    /// An entry with a fresh transition id and a canonical-JSON payload.
    pub fn json(
        kind: &'static str,
        actor: impl Into<String>,
        payload: &serde_json::Value,
    ) -> Entry {
        Entry {
            kind,
            actor: actor.into(),
            transition_id: *uuid::Uuid::new_v4().as_bytes(),
            payload: super::canonical::to_vec(payload),
        }
    }
}

fn ledger_err(e: LedgerError) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Where the tree hashes of the row at position `pos` (< 16) of a chunk start: each earlier
/// row of the chunk stored `1 + trailing_ones` hashes, and below position 15 trailing_ones
/// depends on the position alone (the low four bits are not all ones).
pub fn chunk_offset(pos: u64) -> usize {
    (0..pos.min(CHUNK_ROWS))
        .map(|j| 32 * (1 + j.trailing_ones() as usize))
        .sum()
}

/// Bytes of the tree hashes appending row `seq` stored.
fn row_tree_len(seq: u64) -> usize {
    32 * (1 + seq.trailing_ones() as usize)
}

/// Reads tlog hashes of one machine through any redb table handle.
pub struct TableHashes<'a, T> {
    pub table: &'a T,
    pub slug: &'a str,
}

impl<T: ReadableTable<(&'static str, u64), &'static [u8]>> HashReader for TableHashes<'_, T> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
        indexes
            .iter()
            .map(|&i| {
                let v = self
                    .table
                    .get((self.slug, i))
                    .map_err(|e| LedgerError::HashRead(format!("stored hash {i}: {e}")))?
                    .ok_or_else(|| LedgerError::HashRead(format!("stored hash {i} is missing")))?;
                v.value()
                    .try_into()
                    .map_err(|_| LedgerError::HashRead(format!("stored hash {i} is not 32 bytes")))
            })
            .collect()
    }
}

/// Reads tlog hashes of one machine from the `tree` table (hashes grouped by the row that
/// added them, rows grouped by chunk).
pub struct TreeHashes<'a, T> {
    pub table: &'a T,
    pub slug: &'a str,
}

impl<T: ReadableTable<(&'static str, u64), &'static [u8]>> HashReader for TreeHashes<'_, T> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
        indexes
            .iter()
            .map(|&i| {
                let (level, n) = tlog::split_stored_hash_index(i);
                let seq = 1u64
                    .checked_shl(level)
                    .and_then(|p| n.checked_add(1)?.checked_mul(p))
                    .map(|s| s - 1)
                    .ok_or_else(|| {
                        LedgerError::HashRead(format!("stored hash {i} is out of range"))
                    })?;
                let v = self
                    .table
                    .get((self.slug, seq / CHUNK_ROWS))
                    .map_err(|e| LedgerError::HashRead(format!("tree hashes of row {seq}: {e}")))?
                    .ok_or_else(|| {
                        LedgerError::HashRead(format!("tree hashes of row {seq} are missing"))
                    })?;
                let at = chunk_offset(seq % CHUNK_ROWS) + level as usize * 32;
                v.value()
                    .get(at..at + 32)
                    .and_then(|h| h.try_into().ok())
                    .ok_or_else(|| {
                        LedgerError::HashRead(format!(
                            "tree hashes of row {seq} lack level {level}"
                        ))
                    })
            })
            .collect()
    }
}

/// The log's tables, for [`store::StoreOptions::tables`]: created in a new database, and
/// moved from schemas 1 and 2.
pub const TABLES: store::Tables = store::Tables {
    create: create_tables,
    migrate: Some(store::Migration {
        copy: migrate::copy,
        drop: migrate::drop,
    }),
};

fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(ROWS)?;
    txn.open_table(TREE)?;
    txn.open_table(HEADS)?;
    txn.open_table(ZEQOND_RUNS)?;
    Ok(())
}

#[cfg(test)]
mod tests;
