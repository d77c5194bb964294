//! Read side of the log: rows, heads, tree hashes and proofs, over a read transaction.

use redb::ReadTransaction;

use super::*;
use crate::ledger::{tlog, Hash, Row};
use crate::store::{self, StoreError};

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
pub fn rows(txn: &ReadTransaction, slug: &str, from: u64, to: u64) -> Result<Vec<Row>, StoreError> {
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
