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

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{genesis_prev_hash, tlog, Hash, HashReader, LedgerError, Row};
use crate::clock;
use crate::store::{self, StoreError};

/// (slug, seq) → stored row bytes.
pub const ROWS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_rows");
/// (slug, chunk) → the tree hashes appending rows `16 chunk ..` stored (module doc).
pub const TREE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_tree_chunks");
/// Rows whose tree hashes share one [`TREE`] entry.
pub const CHUNK_ROWS: u64 = 16;
/// Schema 2: (slug, seq) → the tree hashes appending row `seq` stored. Read only by the
/// migration.
const V2_TREE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_tree");
/// slug → [`Head`].
pub const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("log_heads");
/// (slug, zeqond, first seq) → last seq: a run of rows written in one Zeqond.
pub const ZEQOND_RUNS: TableDefinition<(&str, u64, u64), u64> =
    TableDefinition::new("log_zeqond_runs");
/// Schema 1: (slug, stored hash index) → 32-byte hash. Read only by the migration.
const V1_HASHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_hashes");
/// Schema 1: (slug, zeqond, seq) → (). Read only by the migration.
const V1_BY_ZEQOND: TableDefinition<(&str, u64, u64), ()> = TableDefinition::new("log_by_zeqond");

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

/// The log tables opened once for a run of appends inside one write transaction.
///
/// Per machine it keeps a [`Tip`] in memory: the head and, from a machine's second append
/// on, the right edge of the tree (one hash per complete subtree along it, loaded once with
/// popcount(size) reads), and the tree hashes of the machine's incomplete chunk. An append
/// then computes exactly the hashes it adds, reads nothing, and writes its row, plus its chunk
/// when the row completes one. Heads, incomplete chunks and the open Zeqond run are written
/// once, by [`LogWriter::finish`] (or on drop). A single append reads its ≤ trailing_ones(size)
/// siblings directly, which is cheaper than loading the edge for one use.
pub struct LogWriter<'txn> {
    rows: Table<'txn, (&'static str, u64), &'static [u8]>,
    tree: Table<'txn, (&'static str, u64), &'static [u8]>,
    heads: Table<'txn, &'static str, &'static [u8]>,
    runs: Table<'txn, (&'static str, u64, u64), u64>,
    /// By machine. A writer serves a handful of machines, most often one, so a list searched
    /// from the last one used beats hashing the slug on every append.
    tips: Vec<(String, Tip)>,
    last: usize,
}

/// A machine's log head as the writer has advanced it, and the tree's right edge.
struct Tip {
    head: Head,
    /// Whether `head` differs from the stored head.
    dirty: bool,
    /// Loaded at the machine's second append in this writer.
    edge: Option<tlog::RightEdge>,
    /// The Zeqond run being extended: (zeqond, first seq, last seq), not yet written.
    run: Option<(u64, u64, u64)>,
    /// Tree hashes of rows `size - size % 16 .. size` (the incomplete chunk); loaded at the
    /// machine's first append in this writer.
    chunk: Option<Vec<u8>>,
    /// Whether `chunk` holds hashes not yet written to the table.
    chunk_dirty: bool,
}

impl<'txn> LogWriter<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<LogWriter<'txn>, StoreError> {
        Ok(LogWriter {
            rows: txn.open_table(ROWS)?,
            tree: txn.open_table(TREE)?,
            heads: txn.open_table(HEADS)?,
            runs: txn.open_table(ZEQOND_RUNS)?,
            tips: Vec::new(),
            last: 0,
        })
    }

    /// Starts the log of a new machine. Its first row must follow in the same transaction.
    pub fn create(&mut self, slug: &str, genesis_zeqond: u64) -> Result<(), StoreError> {
        let head = Head {
            size: 0,
            last_hash: genesis_prev_hash(slug, genesis_zeqond),
            genesis_zeqond,
        };
        self.heads.insert(slug, store::encode(&head).as_slice())?;
        let tip = Tip {
            head,
            dirty: false,
            edge: Some(tlog::RightEdge::empty()),
            run: None,
            chunk: Some(Vec::new()),
            chunk_dirty: false,
        };
        match self.tips.iter().position(|(s, _)| s == slug) {
            Some(i) => self.tips[i].1 = tip,
            None => self.tips.push((slug.to_owned(), tip)),
        }
        Ok(())
    }

    pub fn head(&mut self, slug: &str) -> Result<Option<Head>, StoreError> {
        Ok(self.tip(slug)?.map(|i| self.tips[i].1.head))
    }

    /// The index in `tips` of `slug`'s tip, loading its head on first use; None when the
    /// machine has no log.
    fn tip(&mut self, slug: &str) -> Result<Option<usize>, StoreError> {
        if self.tips.get(self.last).is_some_and(|(s, _)| s == slug) {
            return Ok(Some(self.last));
        }
        if let Some(i) = self.tips.iter().position(|(s, _)| s == slug) {
            self.last = i;
            return Ok(Some(i));
        }
        let head: Option<Head> = self
            .heads
            .get(slug)?
            .map(|v| store::decode(v.value()))
            .transpose()?;
        let Some(head) = head else {
            return Ok(None);
        };
        self.tips.push((
            slug.to_owned(),
            Tip {
                head,
                dirty: false,
                edge: None,
                run: None,
                chunk: None,
                chunk_dirty: false,
            },
        ));
        self.last = self.tips.len() - 1;
        Ok(Some(self.last))
    }

    /// Appends one row to `slug`'s log at wall time `now_ms`; returns the sealed row.
    pub fn append(&mut self, slug: &str, entry: Entry, now_ms: i64) -> Result<Row, StoreError> {
        let i = self
            .tip(slug)?
            .ok_or_else(|| StoreError::Corrupt(format!("machine `{slug}` has no log head")))?;
        let tip = &mut self.tips[i].1;
        let (row, stored) = Row {
            seq: tip.head.size,
            zeqond: clock::zeqond(now_ms),
            ts_ms: now_ms,
            kind: entry.kind.to_owned(),
            actor: entry.actor,
            transition_id: entry.transition_id,
            payload: entry.payload,
            prev_hash: tip.head.last_hash,
            hash: [0; 32],
        }
        .seal_stored()
        .map_err(|e| StoreError::Corrupt(format!("row refused: {e}")))?;
        let leaf = tlog::record_hash(&row.hash);
        let mut new_hashes = Vec::with_capacity(8);
        match &tip.edge {
            Some(edge) => edge.next_hashes(leaf, &mut new_hashes),
            None if tip.dirty => {
                // The second append of this machine: from now on the edge pays off. It is
                // read from the table, which must hold the first append's hashes.
                if tip.chunk_dirty {
                    if let Some(chunk) = &tip.chunk {
                        self.tree
                            .insert((slug, (row.seq - 1) / CHUNK_ROWS), chunk.as_slice())?;
                    }
                    tip.chunk_dirty = false;
                }
                let stored_hashes = TreeHashes {
                    table: &self.tree,
                    slug,
                };
                let edge = tlog::RightEdge::load(row.seq, &stored_hashes).map_err(ledger_err)?;
                let next = edge.next_hashes(leaf, &mut new_hashes);
                tip.edge = Some(edge);
                next
            }
            None => tlog::stored_hashes_for_record_hash(
                row.seq,
                leaf,
                &TreeHashes {
                    table: &self.tree,
                    slug,
                },
            )
            .map(|h| new_hashes = h),
        }
        .map_err(ledger_err)?;
        let pos = row.seq % CHUNK_ROWS;
        let chunk = match &mut tip.chunk {
            Some(c) => c,
            None => {
                let mut c = Vec::with_capacity(chunk_offset(CHUNK_ROWS - 1) + 8 * 32);
                if pos > 0 {
                    let stored = self.tree.get((slug, row.seq / CHUNK_ROWS))?;
                    let stored = stored.as_ref().map(|v| v.value()).unwrap_or_default();
                    if stored.len() != chunk_offset(pos) {
                        return Err(StoreError::Corrupt(format!(
                            "log of `{slug}`: tree chunk {} holds {} bytes, not the {} of rows before {}",
                            row.seq / CHUNK_ROWS,
                            stored.len(),
                            chunk_offset(pos),
                            row.seq
                        )));
                    }
                    c.extend_from_slice(stored);
                }
                tip.chunk.insert(c)
            }
        };
        chunk.extend_from_slice(new_hashes.as_flattened());
        // Keys ascend within each table across appends (seq, chunk), so the inserts land on
        // the B-trees' rightmost pages.
        self.rows.insert((slug, row.seq), stored.as_slice())?;
        if pos == CHUNK_ROWS - 1 {
            self.tree
                .insert((slug, row.seq / CHUNK_ROWS), chunk.as_slice())?;
            chunk.clear();
            tip.chunk_dirty = false;
        } else {
            tip.chunk_dirty = true;
        }
        match &mut tip.run {
            Some((z, _, last)) if *z == row.zeqond && *last + 1 == row.seq => *last = row.seq,
            run => {
                if let Some((z, first, last)) = run.replace((row.zeqond, row.seq, row.seq)) {
                    self.runs.insert((slug, z, first), last)?;
                }
            }
        }
        if let Some(edge) = &mut tip.edge {
            edge.advance(&new_hashes);
        }
        tip.head = Head {
            size: row.seq + 1,
            last_hash: row.hash,
            ..tip.head
        };
        tip.dirty = true;
        Ok(row)
    }

    /// Writes the heads of every machine appended to. Call it before the transaction
    /// commits; dropping the writer does the same, but cannot report a failure.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.write_heads()
    }

    fn write_heads(&mut self) -> Result<(), StoreError> {
        for (slug, tip) in self.tips.iter_mut().filter(|(_, t)| t.dirty) {
            self.heads
                .insert(slug.as_str(), store::encode(&tip.head).as_slice())?;
            if let (true, Some(chunk)) = (tip.chunk_dirty, &tip.chunk) {
                let last = tip.head.size - 1;
                self.tree
                    .insert((slug.as_str(), last / CHUNK_ROWS), chunk.as_slice())?;
                tip.chunk_dirty = false;
            }
            if let Some((z, first, last)) = tip.run.take() {
                self.runs.insert((slug.as_str(), z, first), last)?;
            }
            tip.dirty = false;
        }
        Ok(())
    }
}

impl Drop for LogWriter<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.write_heads() {
            tracing::error!(error = %e, "log heads could not be written");
        }
    }
}

/// Appends one row; opens the tables for just this row.
pub fn append(
    txn: &WriteTransaction,
    slug: &str,
    entry: Entry,
    now_ms: i64,
) -> Result<Row, StoreError> {
    let mut w = LogWriter::open(txn)?;
    let row = w.append(slug, entry, now_ms)?;
    w.finish()?;
    Ok(row)
}

/// Read side of the log: rows, heads, tree hashes and proofs, over a read transaction.
pub mod read {
    use redb::ReadTransaction;

    use super::*;

    pub fn head(txn: &ReadTransaction, slug: &str) -> Result<Option<Head>, StoreError> {
        store::get(txn, HEADS, slug)
    }

    /// Decodes row `seq` without checking its hash (verification reports on bad rows).
    pub fn row(txn: &ReadTransaction, slug: &str, seq: u64) -> Result<Option<Row>, StoreError> {
        let rows = txn.open_table(ROWS)?;
        let v = rows.get((slug, seq))?;
        v.map(|v| Row::decode_stored(v.value()).map_err(ledger_err))
            .transpose()
    }

    /// Rows `from..to` (end exclusive), in order.
    pub fn rows(
        txn: &ReadTransaction,
        slug: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<Row>, StoreError> {
        let table = txn.open_table(ROWS)?;
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for entry in table.range((slug, from)..(slug, to))? {
            let (_, v) = entry?;
            out.push(Row::decode_stored(v.value()).map_err(ledger_err)?);
        }
        Ok(out)
    }

    /// Seqs of the rows written during `zeqond`.
    pub fn seqs_at_zeqond(
        txn: &ReadTransaction,
        slug: &str,
        zeqond: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let table = txn.open_table(ZEQOND_RUNS)?;
        let mut out = Vec::new();
        for entry in table.range((slug, zeqond, 0)..=(slug, zeqond, u64::MAX))? {
            let (k, last) = entry?;
            out.extend(k.value().2..=last.value());
        }
        Ok(out)
    }

    pub fn tree_hash(txn: &ReadTransaction, slug: &str, size: u64) -> Result<Hash, StoreError> {
        let table = txn.open_table(TREE)?;
        tlog::tree_hash(
            size,
            &TreeHashes {
                table: &table,
                slug,
            },
        )
        .map_err(ledger_err)
    }

    pub fn prove_inclusion(
        txn: &ReadTransaction,
        slug: &str,
        seq: u64,
        size: u64,
    ) -> Result<Vec<Hash>, StoreError> {
        let table = txn.open_table(TREE)?;
        tlog::prove_record(
            size,
            seq,
            &TreeHashes {
                table: &table,
                slug,
            },
        )
        .map_err(ledger_err)
    }

    pub fn prove_consistency(
        txn: &ReadTransaction,
        slug: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<Hash>, StoreError> {
        let table = txn.open_table(TREE)?;
        tlog::prove_tree(
            to,
            from,
            &TreeHashes {
                table: &table,
                slug,
            },
        )
        .map_err(ledger_err)
    }
}

/// Result of checking one machine's stored log end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub rows: u64,
    /// First broken row and why; `None` when the log is intact.
    pub broken: Option<(u64, String)>,
}

/// Checks every invariant of the module doc for `slug`: each row decodes, has its seq, its
/// hash matches its contents, it links to its predecessor, and the stored tree hashes equal
/// the ones recomputed from the rows. Memory stays constant: the stored hashes are checked
/// in append order, so each one read as a sibling was already verified. `progress` gets
/// (rows checked, total).
pub fn verify_machine(
    txn: &redb::ReadTransaction,
    slug: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<Verification, StoreError> {
    let Some(head) = read::head(txn, slug)? else {
        return Ok(Verification {
            rows: 0,
            broken: Some((0, "the machine has no log head".into())),
        });
    };
    let rows = txn.open_table(ROWS)?;
    let hashes = txn.open_table(TREE)?;
    let reader = TreeHashes {
        table: &hashes,
        slug,
    };
    let mut prev = genesis_prev_hash(slug, head.genesis_zeqond);
    // The chunk of tree hashes the rows being checked are in: (chunk number, bytes).
    let mut chunk: Option<(u64, Vec<u8>)> = None;
    let broken = |seq: u64, why: String| {
        Ok(Verification {
            rows: seq,
            broken: Some((seq, why)),
        })
    };
    for seq in 0..head.size {
        let Some(bytes) = rows.get((slug, seq))? else {
            return broken(seq, "row is missing".into());
        };
        let row = match Row::decode_stored(bytes.value()) {
            Ok(r) => r,
            Err(e) => return broken(seq, format!("row does not decode: {e}")),
        };
        if row.seq != seq {
            return broken(seq, format!("row claims seq {}", row.seq));
        }
        if !row.verify_hash() {
            return broken(seq, "row hash does not match its contents".into());
        }
        if row.prev_hash != prev {
            return broken(
                seq,
                "prev_hash does not match the previous row's hash".into(),
            );
        }
        let expected =
            match tlog::stored_hashes_for_record_hash(seq, tlog::record_hash(&row.hash), &reader) {
                Ok(h) => h,
                Err(e) => return broken(seq, format!("tree hashes unreadable: {e}")),
            };
        let c = seq / CHUNK_ROWS;
        if chunk.as_ref().map(|(k, _)| *k) != Some(c) {
            let bytes = hashes.get((slug, c))?.map(|v| v.value().to_vec());
            chunk = Some((c, bytes.unwrap_or_default()));
        }
        let bytes = chunk
            .as_ref()
            .map(|(_, b)| b.as_slice())
            .unwrap_or_default();
        let at = chunk_offset(seq % CHUNK_ROWS);
        let want = expected.as_flattened();
        if bytes.get(at..at + want.len()) != Some(want) {
            return broken(seq, "stored tree hashes do not match the rows".into());
        }
        // A chunk ends with its last row's hashes: row 16c + 15's, or the log's last row's.
        let last_of_chunk = seq % CHUNK_ROWS == CHUNK_ROWS - 1 || seq + 1 == head.size;
        if last_of_chunk && bytes.len() != at + want.len() {
            return broken(seq, "stored tree hashes go on past the row".into());
        }
        prev = row.hash;
        if seq % 4096 == 0 || seq + 1 == head.size {
            progress(seq + 1, head.size);
        }
    }
    if head.last_hash != prev {
        return broken(
            head.size.saturating_sub(1),
            "log head does not match the last row".into(),
        );
    }
    Ok(Verification {
        rows: head.size,
        broken: None,
    })
}

/// Rewrites schema 1's per-hash table (`log_hashes`) and per-row Zeqond index
/// (`log_by_zeqond`) into schema 2's per-row tree table and [`ZEQOND_RUNS`] (then
/// [`migrate_from_schema_2`] does the rest), in write transactions of at most
/// `chunk` entries so that memory stays bounded on a large log. It is idempotent: everything
/// is recomputed from the schema-1 tables, which only [`drop_schema_1_tables`] removes, so an
/// interrupted migration is simply run again. Returns the rows migrated.
pub fn migrate_from_schema_1(db: &redb::Database, chunk: u64) -> Result<u64, StoreError> {
    let chunk = chunk.max(1);
    let heads = head_sizes(db)?;
    let mut migrated = 0;
    for (slug, size) in &heads {
        let mut from = 0;
        while from < *size {
            let to = (from + chunk).min(*size);
            let txn = db.begin_write()?;
            {
                let old = txn.open_table(V1_HASHES)?;
                let mut tree = txn.open_table(V2_TREE)?;
                let mut value = Vec::with_capacity(8 * 32);
                for seq in from..to {
                    let first = tlog::stored_hash_index(0, seq);
                    value.clear();
                    for i in first..=first + u64::from(seq.trailing_ones()) {
                        let h = old.get((slug.as_str(), i))?.ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "log of `{slug}`: stored hash {i} of row {seq} is missing"
                            ))
                        })?;
                        value.extend_from_slice(h.value());
                    }
                    tree.insert((slug.as_str(), seq), value.as_slice())?;
                }
            }
            txn.commit()?;
            migrated += to - from;
            from = to;
        }
    }
    // The per-row Zeqond index, coalesced into runs in key order; a run still open at the
    // end of a transaction is carried into the next, so runs never depend on `chunk`.
    let mut after: Option<(String, u64, u64)> = None;
    let mut open: Option<(String, u64, u64, u64)> = None;
    loop {
        let txn = db.begin_write()?;
        let done = {
            let old = txn.open_table(V1_BY_ZEQOND)?;
            let mut runs = txn.open_table(ZEQOND_RUNS)?;
            let lower = match &after {
                Some((s, z, q)) => std::ops::Bound::Excluded((s.as_str(), *z, *q)),
                None => std::ops::Bound::Unbounded,
            };
            let mut n = 0;
            let mut last_key = None;
            for e in old.range::<(&str, u64, u64)>((lower, std::ops::Bound::Unbounded))? {
                let (k, _) = e?;
                let (slug, z, seq) = k.value();
                match &mut open {
                    Some((s, rz, _, last)) if s == slug && *rz == z && *last + 1 == seq => {
                        *last = seq
                    }
                    run => {
                        if let Some((s, rz, first, last)) =
                            run.replace((slug.to_owned(), z, seq, seq))
                        {
                            runs.insert((s.as_str(), rz, first), last)?;
                        }
                    }
                }
                last_key = Some((slug.to_owned(), z, seq));
                n += 1;
                if n == chunk {
                    break;
                }
            }
            if n < chunk {
                if let Some((s, rz, first, last)) = open.take() {
                    runs.insert((s.as_str(), rz, first), last)?;
                }
            }
            after = last_key.or(after);
            n < chunk
        };
        txn.commit()?;
        if done {
            return Ok(migrated);
        }
    }
}

/// The last step of the schema-1 migration, in the transaction that records the schema.
pub fn drop_schema_1_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.delete_table(V1_HASHES)?;
    txn.delete_table(V1_BY_ZEQOND)?;
    Ok(())
}

/// Every machine's log size.
fn head_sizes(db: &redb::Database) -> Result<Vec<(String, u64)>, StoreError> {
    let read = db.begin_read()?;
    let table = read.open_table(HEADS)?;
    let mut out = Vec::new();
    for e in table.iter()? {
        let (k, v) = e?;
        out.push((k.value().to_owned(), store::decode::<Head>(v.value())?.size));
    }
    Ok(out)
}

/// Groups schema 2's per-row tree hashes (`log_tree`) into [`TREE`]'s chunks, in write
/// transactions of about `rows` rows (whole chunks). Idempotent like
/// [`migrate_from_schema_1`]: only [`drop_schema_2_tables`] removes what it reads. Returns
/// the rows migrated.
pub fn migrate_from_schema_2(db: &redb::Database, rows: u64) -> Result<u64, StoreError> {
    let per_txn = rows.div_ceil(CHUNK_ROWS).max(1);
    let mut migrated = 0;
    for (slug, size) in head_sizes(db)? {
        let chunks = size.div_ceil(CHUNK_ROWS);
        let mut c = 0;
        while c < chunks {
            let end = (c + per_txn).min(chunks);
            let txn = db.begin_write()?;
            {
                let old = txn.open_table(V2_TREE)?;
                let mut tree = txn.open_table(TREE)?;
                let mut value = Vec::with_capacity(chunk_offset(CHUNK_ROWS - 1) + 64 * 32);
                for k in c..end {
                    value.clear();
                    let rows = k * CHUNK_ROWS..((k + 1) * CHUNK_ROWS).min(size);
                    for seq in rows.clone() {
                        let h = old.get((slug.as_str(), seq))?.ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "log of `{slug}`: the tree hashes of row {seq} are missing"
                            ))
                        })?;
                        if h.value().len() != row_tree_len(seq) {
                            return Err(StoreError::Corrupt(format!(
                                "log of `{slug}`: the tree hashes of row {seq} are {} bytes",
                                h.value().len()
                            )));
                        }
                        value.extend_from_slice(h.value());
                    }
                    tree.insert((slug.as_str(), k), value.as_slice())?;
                    migrated += rows.end - rows.start;
                }
            }
            txn.commit()?;
            c = end;
        }
    }
    Ok(migrated)
}

/// The last step of the schema-2 migration, in the transaction that records the schema.
pub fn drop_schema_2_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.delete_table(V2_TREE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use redb::Database;

    use super::*;

    fn entry(i: u64) -> Entry {
        Entry {
            kind: "event",
            actor: "test".into(),
            transition_id: [1; 16],
            payload: format!("{{\"i\":{i}}}").into_bytes(),
        }
    }

    /// The writer's in-memory head and right edge give the same stored rows, tree hashes and
    /// head as appending one row per writer (which reads its siblings from the table), across
    /// transactions, several machines and sizes on both sides of powers of two; and the
    /// result passes `verify_machine`.
    #[test]
    fn batched_appends_store_what_single_appends_store_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let batched = Database::create(dir.path().join("a.redb")).unwrap();
        let single = Database::create(dir.path().join("b.redb")).unwrap();
        let now = 1_700_000_000_000;
        for (db, slugs) in [(&batched, ["m1", "m2"]), (&single, ["m1", "m2"])] {
            let txn = db.begin_write().unwrap();
            let mut w = LogWriter::open(&txn).unwrap();
            for s in slugs {
                w.create(s, 7).unwrap();
            }
            w.finish().unwrap();
            txn.commit().unwrap();
        }
        let mut seq = 0;
        for batch in [1u64, 2, 5, 64, 1, 200, 3] {
            let txn = batched.begin_write().unwrap();
            let mut w = LogWriter::open(&txn).unwrap();
            for i in seq..seq + batch {
                for s in ["m1", "m2"] {
                    let row = w.append(s, entry(i), now + i as i64).unwrap();
                    assert_eq!(row.seq, i);
                }
            }
            w.finish().unwrap();
            txn.commit().unwrap();
            for i in seq..seq + batch {
                let txn = single.begin_write().unwrap();
                for s in ["m1", "m2"] {
                    append(&txn, s, entry(i), now + i as i64).unwrap();
                }
                txn.commit().unwrap();
            }
            seq += batch;
        }
        let dump = |db: &Database| {
            let txn = db.begin_read().unwrap();
            let mut out = Vec::new();
            for def in [ROWS, TREE] {
                for e in txn.open_table(def).unwrap().iter().unwrap() {
                    let (k, v) = e.unwrap();
                    out.push((k.value().0.to_owned(), k.value().1, v.value().to_vec()));
                }
            }
            for s in ["m1", "m2"] {
                let head = read::head(&txn, s).unwrap().unwrap();
                assert_eq!(head.size, seq);
                let v = verify_machine(&txn, s, |_, _| {}).unwrap();
                assert_eq!(v.broken, None, "{s}");
                out.push((s.to_owned(), u64::MAX, store::encode(&head)));
            }
            out
        };
        assert_eq!(dump(&batched), dump(&single));
    }

    const BASE_MS: i64 = 1_700_000_000_000;

    /// Two machines' logs of 67 rows each, written in several transactions; each slug's rows
    /// sit in 0.3-Zeqond steps, so Zeqonds hold 3-4 rows and runs cross transaction ends. The
    /// clock steps back once. Returns the rows per machine.
    fn sample_log(db: &Database) -> u64 {
        let base = BASE_MS;
        let mut seq = 0u64;
        for (i, batch) in [5u64, 1, 9, 17, 2, 33].into_iter().enumerate() {
            let txn = db.begin_write().unwrap();
            let mut w = LogWriter::open(&txn).unwrap();
            if i == 0 {
                w.create("m1", 0).unwrap();
                w.create("m2", 0).unwrap();
            }
            for _ in 0..batch {
                let t = if i == 4 {
                    base
                } else {
                    base + seq as i64 * 233
                };
                w.append("m1", entry(seq), t).unwrap();
                w.append("m2", entry(seq), t + 777).unwrap();
                seq += 1;
            }
            w.finish().unwrap();
            txn.commit().unwrap();
        }
        seq
    }

    /// Everything the log answers: rows per Zeqond, tree hashes, proofs, verification.
    fn answers(db: &Database, seq: u64) -> Vec<String> {
        let base = BASE_MS;
        let txn = db.begin_read().unwrap();
        let mut out = Vec::new();
        for s in ["m1", "m2"] {
            let v = verify_machine(&txn, s, |_, _| {}).unwrap();
            assert_eq!(v.broken, None, "{s}");
            out.push(format!("{s} rows {}", v.rows));
            for z in clock::zeqond(base) - 1..clock::zeqond(base + 100 * 233) + 3 {
                out.push(format!(
                    "{s} z{z} {:?}",
                    read::seqs_at_zeqond(&txn, s, z).unwrap()
                ));
            }
            for size in [1, 2, 7, 8, 9, 31, 32, 33, seq] {
                out.push(format!(
                    "{s} root {size} {:?}",
                    read::tree_hash(&txn, s, size).unwrap()
                ));
                for at in [0, size / 2, size - 1] {
                    let p = read::prove_inclusion(&txn, s, at, size).unwrap();
                    out.push(format!("{s} incl {at} {size} {p:?}"));
                }
                let p = read::prove_consistency(&txn, s, size / 3 + 1, size).unwrap();
                out.push(format!("{s} cons {size} {p:?}"));
            }
        }
        out
    }

    /// A flipped byte anywhere in a tree chunk names the row whose hashes hold it, and bytes
    /// past the last row's hashes are reported against that row.
    #[test]
    fn verify_names_the_row_of_a_damaged_tree_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let seq = sample_log(&db);
        assert_eq!(seq % CHUNK_ROWS, 3, "the last chunk is incomplete");
        let damage = |c: u64, f: &dyn Fn(&mut Vec<u8>)| {
            let txn = db.begin_write().unwrap();
            let old = {
                let mut t = txn.open_table(TREE).unwrap();
                let old = t.get(("m1", c)).unwrap().unwrap().value().to_vec();
                let mut v = old.clone();
                f(&mut v);
                t.insert(("m1", c), v.as_slice()).unwrap();
                old
            };
            txn.commit().unwrap();
            let broken = verify_machine(&db.begin_read().unwrap(), "m1", |_, _| {})
                .unwrap()
                .broken;
            let txn = db.begin_write().unwrap();
            txn.open_table(TREE)
                .unwrap()
                .insert(("m1", c), old.as_slice())
                .unwrap();
            txn.commit().unwrap();
            broken.map(|(at, _)| at)
        };
        // Chunk 2 holds rows 32..=47; row 32 + j starts at chunk_offset(j).
        for j in [0, 1, 7, 14, 15] {
            let at = chunk_offset(j);
            assert_eq!(
                damage(2, &|v| v[at + 5] ^= 1),
                Some(32 + j),
                "row {}",
                32 + j
            );
        }
        assert_eq!(damage(2, &|v| v.truncate(v.len() - 32)), Some(47));
        let last = seq / CHUNK_ROWS;
        assert_eq!(damage(last, &|v| v.extend([0; 32])), Some(seq - 1));
        assert_eq!(damage(last, &|_| {}), None);
    }

    /// Each row's tree hashes, split out of the chunks: (slug, seq, bytes).
    fn tree_by_row(txn: &WriteTransaction) -> Vec<(String, u64, Vec<u8>)> {
        let tree = txn.open_table(TREE).unwrap();
        let mut out = Vec::new();
        for e in tree.iter().unwrap() {
            let (k, v) = e.unwrap();
            let (slug, c) = k.value();
            let (mut seq, mut rest) = (c * CHUNK_ROWS, v.value());
            while !rest.is_empty() {
                let (row, more) = rest.split_at(row_tree_len(seq));
                out.push((slug.to_owned(), seq, row.to_vec()));
                (seq, rest) = (seq + 1, more);
            }
        }
        out
    }

    /// Everything the log answers is the same after the log is rewritten into schema 1's
    /// layout and migrated back, with a chunk size that splits runs and machines across
    /// transactions, and after running the migration a second time (an interrupted migration
    /// is rerun from the start).
    #[test]
    fn schema_1_logs_migrate_to_the_chunked_layout() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("m.redb")).unwrap();
        let seq = sample_log(&db);
        let before = answers(&db, seq);
        // Zeqonds of several rows, including ones whose rows span two transactions (rows 4
        // and 5), and the Zeqond the clock stepped back to holding two runs.
        let zeqonds: Vec<&String> = before.iter().filter(|l| l.starts_with("m1 z")).collect();
        assert!(
            zeqonds.iter().any(|l| l.ends_with(" [4, 5, 6]")),
            "{zeqonds:?}"
        );
        assert!(
            zeqonds.iter().any(|l| l.ends_with(" [0, 32, 33]")),
            "{zeqonds:?}"
        );
        // Rewrite into schema 1: one hash per stored index, one index entry per row.
        let txn = db.begin_write().unwrap();
        {
            let runs = txn.open_table(ZEQOND_RUNS).unwrap();
            let mut hashes = txn.open_table(V1_HASHES).unwrap();
            let mut by_zeqond = txn.open_table(V1_BY_ZEQOND).unwrap();
            for (slug, seq, v) in tree_by_row(&txn) {
                let first = tlog::stored_hash_index(0, seq);
                for (i, h) in v.chunks(32).enumerate() {
                    hashes.insert((slug.as_str(), first + i as u64), h).unwrap();
                }
            }
            for e in runs.iter().unwrap() {
                let (k, last) = e.unwrap();
                let (slug, z, first) = k.value();
                for q in first..=last.value() {
                    by_zeqond.insert((slug, z, q), ()).unwrap();
                }
            }
        }
        txn.delete_table(TREE).unwrap();
        txn.delete_table(ZEQOND_RUNS).unwrap();
        txn.commit().unwrap();
        assert_eq!(migrate_from_schema_1(&db, 7).unwrap(), 2 * seq);
        assert_eq!(migrate_from_schema_2(&db, 7).unwrap(), 2 * seq);
        let once = answers(&db, seq);
        assert_eq!(migrate_from_schema_1(&db, 5).unwrap(), 2 * seq);
        assert_eq!(migrate_from_schema_2(&db, 40).unwrap(), 2 * seq);
        let txn = db.begin_write().unwrap();
        drop_schema_1_tables(&txn).unwrap();
        drop_schema_2_tables(&txn).unwrap();
        txn.commit().unwrap();
        assert_eq!(answers(&db, seq), before);
        assert_eq!(once, before);
        let txn = db.begin_read().unwrap();
        assert!(
            txn.open_table(V1_HASHES).is_err() && txn.open_table(V2_TREE).is_err(),
            "schema 1 and 2 tables are dropped"
        );
    }

    /// Schema 2's per-row tree hashes migrate into the same chunks the writer makes (the
    /// tree table is byte-identical afterwards), also when run twice.
    #[test]
    fn schema_2_logs_migrate_to_the_chunked_layout() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("m.redb")).unwrap();
        let seq = sample_log(&db);
        let before = answers(&db, seq);
        let chunks = |db: &Database| -> Vec<(String, u64, Vec<u8>)> {
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(TREE).unwrap();
            t.iter()
                .unwrap()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (k.value().0.to_owned(), k.value().1, v.value().to_vec())
                })
                .collect()
        };
        let written = chunks(&db);
        assert_eq!(written.len(), 2 * seq.div_ceil(CHUNK_ROWS) as usize);
        let txn = db.begin_write().unwrap();
        {
            let mut old = txn.open_table(V2_TREE).unwrap();
            for (slug, seq, v) in tree_by_row(&txn) {
                old.insert((slug.as_str(), seq), v.as_slice()).unwrap();
            }
        }
        txn.delete_table(TREE).unwrap();
        txn.commit().unwrap();
        assert_eq!(migrate_from_schema_2(&db, 7).unwrap(), 2 * seq);
        assert_eq!(migrate_from_schema_2(&db, 1000).unwrap(), 2 * seq);
        let txn = db.begin_write().unwrap();
        drop_schema_2_tables(&txn).unwrap();
        txn.commit().unwrap();
        assert_eq!(chunks(&db), written);
        assert_eq!(answers(&db, seq), before);
    }
}
