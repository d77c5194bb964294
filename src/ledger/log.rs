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
/// Heads and the tree hashes written through this writer are also kept in memory: the
/// siblings an append needs are almost always hashes the previous appends just wrote, so a
/// batch reads them from the cache instead of the B-tree. Every value is still written to
/// its table at once, so dropping the writer at any point leaves the tables consistent.
pub struct LogWriter<'txn> {
    rows: Table<'txn, (&'static str, u64), &'static [u8]>,
    hashes: Table<'txn, (&'static str, u64), &'static [u8]>,
    heads: Table<'txn, &'static str, &'static [u8]>,
    by_zeqond: Table<'txn, (&'static str, u64, u64), ()>,
    head_cache: std::collections::HashMap<String, Head>,
    hash_cache: std::collections::HashMap<(String, u64), Hash>,
}

/// Reads hashes from the writer's cache first, then from the table.
struct CachedHashes<'a, T> {
    cache: &'a std::collections::HashMap<(String, u64), Hash>,
    table: TableHashes<'a, T>,
}

impl<T: ReadableTable<(&'static str, u64), &'static [u8]>> HashReader for CachedHashes<'_, T> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
        indexes
            .iter()
            .map(
                |&i| match self.cache.get(&(self.table.slug.to_owned(), i)) {
                    Some(h) => Ok(*h),
                    None => self.table.read_hashes(&[i]).map(|v| v[0]),
                },
            )
            .collect()
    }
}

impl<'txn> LogWriter<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<LogWriter<'txn>, StoreError> {
        Ok(LogWriter {
            rows: txn.open_table(ROWS)?,
            hashes: txn.open_table(HASHES)?,
            heads: txn.open_table(HEADS)?,
            by_zeqond: txn.open_table(BY_ZEQOND)?,
            head_cache: Default::default(),
            hash_cache: Default::default(),
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
        self.head_cache.insert(slug.to_owned(), head);
        Ok(())
    }

    pub fn head(&mut self, slug: &str) -> Result<Option<Head>, StoreError> {
        if let Some(h) = self.head_cache.get(slug) {
            return Ok(Some(*h));
        }
        let head: Option<Head> = self
            .heads
            .get(slug)?
            .map(|v| store::decode(v.value()))
            .transpose()?;
        if let Some(h) = head {
            self.head_cache.insert(slug.to_owned(), h);
        }
        Ok(head)
    }

    /// Appends one row to `slug`'s log at wall time `now_ms`; returns the sealed row.
    pub fn append(&mut self, slug: &str, entry: Entry, now_ms: i64) -> Result<Row, StoreError> {
        let head = self
            .head(slug)?
            .ok_or_else(|| StoreError::Corrupt(format!("machine `{slug}` has no log head")))?;
        let row = Row {
            seq: head.size,
            zeqond: clock::zeqond(now_ms),
            ts_ms: now_ms,
            kind: entry.kind.to_owned(),
            actor: entry.actor,
            transition_id: entry.transition_id,
            payload: entry.payload,
            prev_hash: head.last_hash,
            hash: [0; 32],
        }
        .try_seal()
        .map_err(|e| StoreError::Corrupt(format!("row refused: {e}")))?;
        let new_hashes = {
            let reader = CachedHashes {
                cache: &self.hash_cache,
                table: TableHashes {
                    table: &self.hashes,
                    slug,
                },
            };
            tlog::stored_hashes_for_record_hash(row.seq, tlog::record_hash(&row.hash), &reader)
                .map_err(ledger_err)?
        };
        let first = tlog::stored_hash_index(0, row.seq);
        for (i, h) in new_hashes.iter().enumerate() {
            self.hashes.insert((slug, first + i as u64), h.as_slice())?;
            self.hash_cache
                .insert((slug.to_owned(), first + i as u64), *h);
        }
        self.rows
            .insert((slug, row.seq), row.encode_stored().as_slice())?;
        self.by_zeqond.insert((slug, row.zeqond, row.seq), ())?;
        let head = Head {
            size: row.seq + 1,
            last_hash: row.hash,
            ..head
        };
        self.heads.insert(slug, store::encode(&head).as_slice())?;
        self.head_cache.insert(slug.to_owned(), head);
        Ok(row)
    }
}

/// Appends one row; opens the tables for just this row.
pub fn append(
    txn: &WriteTransaction,
    slug: &str,
    entry: Entry,
    now_ms: i64,
) -> Result<Row, StoreError> {
    LogWriter::open(txn)?.append(slug, entry, now_ms)
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
