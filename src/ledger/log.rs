//! The log in redb: one table of stored rows, one of tlog hashes, a head per machine, and an
//! index by Zeqond. This is the only file of `ledger` that touches storage; it is called inside
//! the writer's transactions, so a row is committed in the same transaction as the change it
//! records, or not at all.
//!
//! # Invariants (checked by `smgate verify`)
//! - `rows[(slug, s)]` exists for every `s < head.size`, decodes, has `seq == s`, a hash
//!   matching its contents, and `prev_hash` equal to row `s-1`'s hash (row 0: the genesis
//!   hash of the machine's slug and genesis Zeqond).
//! - `hashes[(slug, i)]` for `i < stored_hash_count(head.size)` is the Go-tlog stored-hash
//!   layout of the leaves `SHA-256(0x00 ‖ row hash)`.
//! - `head.last_hash` is row `size-1`'s hash.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{genesis_prev_hash, tlog, Hash, HashReader, LedgerError, Row};
use crate::clock;
use crate::store::{self, StoreError};

/// (slug, seq) → stored row bytes.
pub const ROWS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_rows");
/// (slug, stored hash index) → 32-byte hash.
pub const HASHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_hashes");
/// slug → [`Head`].
pub const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("log_heads");
/// (slug, zeqond, seq) → () : the rows of each Zeqond.
pub const BY_ZEQOND: TableDefinition<(&str, u64, u64), ()> = TableDefinition::new("log_by_zeqond");

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

/// The log tables opened once for a run of appends inside one write transaction.
///
/// Per machine it keeps a [`Tip`] in memory: the head and, from a machine's second append
/// on, the right edge of the tree (one hash per complete subtree along it, loaded once with
/// popcount(size) reads). An append then computes exactly the hashes it adds, reads nothing,
/// and writes its row, its tree hashes and its index entry; heads are written once, by
/// [`LogWriter::finish`] (or on drop). A single append reads its ≤ trailing_ones(size)
/// siblings directly, which is cheaper than loading the edge for one use.
pub struct LogWriter<'txn> {
    rows: Table<'txn, (&'static str, u64), &'static [u8]>,
    hashes: Table<'txn, (&'static str, u64), &'static [u8]>,
    heads: Table<'txn, &'static str, &'static [u8]>,
    by_zeqond: Table<'txn, (&'static str, u64, u64), ()>,
    tips: std::collections::HashMap<String, Tip>,
}

/// A machine's log head as the writer has advanced it, and the tree's right edge.
struct Tip {
    head: Head,
    /// Whether `head` differs from the stored head.
    dirty: bool,
    /// Loaded at the machine's second append in this writer.
    edge: Option<tlog::RightEdge>,
}

impl<'txn> LogWriter<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<LogWriter<'txn>, StoreError> {
        Ok(LogWriter {
            rows: txn.open_table(ROWS)?,
            hashes: txn.open_table(HASHES)?,
            heads: txn.open_table(HEADS)?,
            by_zeqond: txn.open_table(BY_ZEQOND)?,
            tips: Default::default(),
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
        self.tips.insert(
            slug.to_owned(),
            Tip {
                head,
                dirty: false,
                edge: Some(tlog::RightEdge::empty()),
            },
        );
        Ok(())
    }

    pub fn head(&mut self, slug: &str) -> Result<Option<Head>, StoreError> {
        Ok(self.tip(slug)?.map(|t| t.head))
    }

    fn tip(&mut self, slug: &str) -> Result<Option<&mut Tip>, StoreError> {
        if !self.tips.contains_key(slug) {
            let head: Option<Head> = self
                .heads
                .get(slug)?
                .map(|v| store::decode(v.value()))
                .transpose()?;
            let Some(head) = head else {
                return Ok(None);
            };
            self.tips.insert(
                slug.to_owned(),
                Tip {
                    head,
                    dirty: false,
                    edge: None,
                },
            );
        }
        Ok(self.tips.get_mut(slug))
    }

    /// Appends one row to `slug`'s log at wall time `now_ms`; returns the sealed row.
    pub fn append(&mut self, slug: &str, entry: Entry, now_ms: i64) -> Result<Row, StoreError> {
        let no_head = || StoreError::Corrupt(format!("machine `{slug}` has no log head"));
        self.tip(slug)?.ok_or_else(no_head)?;
        let tip = self.tips.get_mut(slug).ok_or_else(no_head)?;
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
        let stored_hashes = TableHashes {
            table: &self.hashes,
            slug,
        };
        let mut new_hashes = Vec::with_capacity(8);
        match &tip.edge {
            Some(edge) => edge.next_hashes(leaf, &mut new_hashes),
            None if tip.dirty => {
                // The second append of this machine: from now on the edge pays off.
                let edge = tlog::RightEdge::load(row.seq, &stored_hashes).map_err(ledger_err)?;
                let next = edge.next_hashes(leaf, &mut new_hashes);
                tip.edge = Some(edge);
                next
            }
            None => tlog::stored_hashes_for_record_hash(row.seq, leaf, &stored_hashes)
                .map(|h| new_hashes = h),
        }
        .map_err(ledger_err)?;
        // Keys ascend within each table across appends (seq, stored-hash index), so the
        // inserts land on the B-trees' rightmost pages.
        self.rows.insert((slug, row.seq), stored.as_slice())?;
        let first = tlog::stored_hash_index(0, row.seq);
        for (i, h) in new_hashes.iter().enumerate() {
            self.hashes.insert((slug, first + i as u64), h.as_slice())?;
        }
        self.by_zeqond.insert((slug, row.zeqond, row.seq), ())?;
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
        let table = txn.open_table(BY_ZEQOND)?;
        let mut out = Vec::new();
        for entry in table.range((slug, zeqond, 0)..=(slug, zeqond, u64::MAX))? {
            let (k, _) = entry?;
            out.push(k.value().2);
        }
        Ok(out)
    }

    pub fn tree_hash(txn: &ReadTransaction, slug: &str, size: u64) -> Result<Hash, StoreError> {
        let table = txn.open_table(HASHES)?;
        tlog::tree_hash(
            size,
            &TableHashes {
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
        let table = txn.open_table(HASHES)?;
        tlog::prove_record(
            size,
            seq,
            &TableHashes {
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
        let table = txn.open_table(HASHES)?;
        tlog::prove_tree(
            to,
            from,
            &TableHashes {
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
    let hashes = txn.open_table(HASHES)?;
    let reader = TableHashes {
        table: &hashes,
        slug,
    };
    let mut prev = genesis_prev_hash(slug, head.genesis_zeqond);
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
        let first = tlog::stored_hash_index(0, seq);
        for (i, want) in expected.iter().enumerate() {
            let index = first + i as u64;
            let stored = hashes.get((slug, index))?.map(|v| v.value().to_vec());
            if stored.as_deref() != Some(want.as_slice()) {
                return broken(
                    seq,
                    format!("stored tree hash {index} does not match the rows"),
                );
            }
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
            for def in [ROWS, HASHES] {
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
}
