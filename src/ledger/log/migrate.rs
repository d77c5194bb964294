//! Older schemas' log tables, moved into the current layout by `Store::open`.

use super::*;

/// Schema 2: (slug, seq) → the tree hashes appending row `seq` stored. Read only by the
/// migration.
pub(super) const V2_TREE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log_tree");
/// Schema 1: (slug, stored hash index) → 32-byte hash. Read only by the migration.
pub(super) const V1_HASHES: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("log_hashes");
/// Schema 1: (slug, zeqond, seq) → (). Read only by the migration.
pub(super) const V1_BY_ZEQOND: TableDefinition<(&str, u64, u64), ()> =
    TableDefinition::new("log_by_zeqond");

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

/// [`store::Migration::copy`]: schema 1 goes through schema 2's layout.
pub(super) fn copy(db: &redb::Database, from: u32, chunk: u64) -> Result<u64, StoreError> {
    let mut rows = 0;
    if from == 1 {
        rows = migrate_from_schema_1(db, chunk)?;
    }
    Ok(rows.max(migrate_from_schema_2(db, chunk)?))
}

/// [`store::Migration::drop`].
pub(super) fn drop(txn: &WriteTransaction, from: u32) -> Result<(), StoreError> {
    if from == 1 {
        drop_schema_1_tables(txn)?;
    }
    drop_schema_2_tables(txn)
}
