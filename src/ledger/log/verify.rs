//! `smgate verify`: every invariant of the module doc, rechecked from the stored rows.

use super::*;

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
