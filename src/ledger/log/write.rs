//! Appending: the [`LogWriter`] of one write transaction, and [`append`] for a single row.

use super::*;

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
