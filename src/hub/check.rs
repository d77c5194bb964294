//! The batch checks: one pure function that both storage back ends call.
//!
//! A hub is a verifying mirror. [`parse`] checks what a batch says about itself (wire
//! version, slug, the checkpoint note's signature by the enrolled key, its origin and size);
//! [`decide`] then compares the batch with what the store holds for that log ([`Loaded`]: the
//! log's state with the right edge of its tree, the stored rows the batch repeats, the partial
//! tiles of the right edge) and answers with one [`Verdict`]: the rows, tree hashes, tiles and
//! new state to write; or "nothing to write, this is what is stored" (a repeated batch, or a gap
//! the gateway rewinds from); or a [`Refusal::Conflict`] carrying its [`Evidence`].
//!
//! No I/O, no clock (the time is an argument), so a back end can run it, lose a race for the
//! log's compare-and-set, re-read, and run it again with the same meaning.
//!
//! # Tiles
//! C2SP tlog-tiles of height 8: the tile at level `L` and index `N` holds the hashes of the
//! subtrees of `2^(8L)` leaves numbered `256N .. 256N + 255`. Appending record `n` completes
//! the subtree of level `8L` ending at `n` exactly when `8L <= trailing_ones(n)`, and its hash
//! is then the `8L`-th hash [`tlog::RightEdge::next_hashes`] returns; so the tiles follow from
//! the partial tile of each level alone, without rereading any row.

use crate::ledger::{self, genesis_prev_hash, tlog, Checkpoint, Hash, LedgerError, Row};
use crate::sync::{origin, Batch, WIRE_VERSION};

use super::{Enrollment, Refusal};

/// Tile height in levels of the tree (C2SP tlog-tiles).
pub const TILE_HEIGHT: u32 = 8;
/// Hashes in a full tile.
pub const TILE_WIDTH: usize = 1 << TILE_HEIGHT;

/// One log's state as a store keeps it: enough to check and append a batch without reading
/// any stored row it does not repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    pub genesis_zeqond: u64,
    /// Rows stored: seqs `0..size`. Always the size of the last checkpoint accepted.
    pub size: u64,
    /// Hash of row `size - 1` (the genesis link when empty).
    pub last_hash: Hash,
    /// The tree's right edge at `size`.
    pub edge: tlog::RightEdge,
    /// The signed note of the last checkpoint accepted (empty when none), and its root.
    pub checkpoint: String,
    pub root: Hash,
    /// The gateway's log size when it built the last batch (for lag).
    pub head_size: u64,
    pub last_ingest_ms: i64,
    pub last_row_ts_ms: i64,
}

impl LogState {
    /// A log the hub has no row of yet.
    pub fn empty(slug: &str, genesis_zeqond: u64) -> LogState {
        LogState {
            genesis_zeqond,
            size: 0,
            last_hash: genesis_prev_hash(slug, genesis_zeqond),
            edge: tlog::RightEdge::empty(),
            checkpoint: String::new(),
            root: tlog::empty_tree_hash(),
            head_size: 0,
            last_ingest_ms: 0,
            last_row_ts_ms: 0,
        }
    }
}

/// A tile: `hashes` are the level-`8·level` subtree hashes `256·index ..`, at most 256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub level: u8,
    pub index: u64,
    pub hashes: Vec<Hash>,
}

impl Tile {
    pub fn is_full(&self) -> bool {
        self.hashes.len() == TILE_WIDTH
    }
}

/// The partial tiles (width 1..255) of a tree of `size` leaves, as `(level, index, width)`.
pub fn partial_tiles(size: u64) -> Vec<(u8, u64, usize)> {
    (0..=7u8)
        .map(|level| (level, size >> (TILE_HEIGHT * u32::from(level))))
        .filter(|&(_, nodes)| nodes % TILE_WIDTH as u64 != 0)
        .map(|(level, nodes)| {
            (
                level,
                nodes / TILE_WIDTH as u64,
                (nodes % TILE_WIDTH as u64) as usize,
            )
        })
        .collect()
}

/// What a store read for one batch of one log.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// `None`: the hub has nothing of this log.
    pub state: Option<LogState>,
    /// The stored rows of seqs `first_seq .. min(size, end)`, in order (the part of the batch
    /// the hub already has).
    pub overlap: Vec<Vec<u8>>,
    /// When the batch brings no new row (`end <= size`): the stored tree's root at `end`.
    pub root_at_end: Option<Hash>,
    /// The partial tiles of the stored tree ([`partial_tiles`] of `size`), when the store keeps
    /// tiles; `None` makes [`decide`] compute none.
    pub partial_tiles: Option<Vec<Tile>>,
}

/// What to write for an accepted batch.
#[derive(Debug, Clone)]
pub struct Append {
    /// The log's size before: the compare-and-set's expected value (0 and `created` for a
    /// log the store has no state of).
    pub old_size: u64,
    pub created: bool,
    /// Index in `batch.rows` of the first new row (seq `old_size`).
    pub skip: usize,
    /// Stored tlog hashes from `stored_hash_index(0, old_size)` on, in index order.
    pub hashes: Vec<Hash>,
    /// Tiles that changed: the ones completed (full) and the new partial tile per level.
    pub tiles: Vec<Tile>,
    /// The log's state after the batch.
    pub state: LogState,
    /// Bytes of the new rows.
    pub row_bytes: u64,
}

/// The answer for a batch that passed [`parse`].
#[derive(Debug, Clone)]
pub enum Verdict {
    Append(Box<Append>),
    /// Nothing to write; the hub stores `size` rows of this log.
    Stored(u64),
}

/// Why a batch conflicts with the stored log, with what proves it: the gateway's signed note
/// and the offending row beside the hub's own checkpoint and row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    /// `fork` or `tampered`.
    pub kind: String,
    /// The first offending seq.
    pub at: u64,
    pub message: String,
    /// Rows the hub stores of this log.
    pub stored_size: u64,
    /// The batch's signed checkpoint note.
    pub checkpoint: String,
    /// The batch's row at `at`, when there is one.
    pub row: Option<Vec<u8>>,
    /// The hub's stored row at `at`, when it has one.
    pub stored_row: Option<Vec<u8>>,
    /// The hub's last accepted signed checkpoint note.
    pub stored_checkpoint: String,
}

/// The authorization a store's enrollment record gives: token and verifier key.
pub fn authorize(
    enrolled: Option<Enrollment>,
    bearer: Option<&str>,
    batch: &Batch,
) -> Result<Enrollment, Refusal> {
    use crate::auth;
    use crate::ledger::hex;
    let enrolled = enrolled.ok_or(Refusal::Unauthorized("gateway is not enrolled"))?;
    let token = bearer.ok_or(Refusal::Unauthorized("no bearer token"))?;
    if !auth::ct_eq(
        hex::encode(&auth::sha256(token.as_bytes())).as_bytes(),
        enrolled.token_sha256.as_bytes(),
    ) {
        return Err(Refusal::Unauthorized("bearer token is not this gateway's"));
    }
    if batch.verifier_key != enrolled.verifier_key {
        return Err(Refusal::Unauthorized(
            "verifier key differs from the enrolled one",
        ));
    }
    Ok(enrolled)
}

/// Checks what a batch says about itself and returns its checkpoint and note body.
pub fn parse(enrolled: &Enrollment, batch: &Batch) -> Result<(Checkpoint, String), Refusal> {
    if batch.version != WIRE_VERSION {
        return Err(Refusal::BadRequest(format!(
            "wire version {} is not supported; this hub speaks {WIRE_VERSION}",
            batch.version
        )));
    }
    if crate::auth::Slug::parse(&batch.machine).is_none() {
        return Err(Refusal::BadRequest("machine is not a valid slug".into()));
    }
    if batch.rows.is_empty() {
        return Err(Refusal::BadRequest(
            "a batch carries at least one row".into(),
        ));
    }
    let body =
        ledger::verify_note(&batch.checkpoint, &enrolled.verifier_key).map_err(|e| match e {
            LedgerError::InvalidSignature { .. } | LedgerError::NoSignature { .. } => {
                Refusal::Unauthorized("checkpoint is not signed by the enrolled key")
            }
            other => Refusal::BadRequest(format!("checkpoint: {other}")),
        })?;
    let cp = ledger::parse_checkpoint(&body)
        .map_err(|e| Refusal::BadRequest(format!("checkpoint: {e}")))?;
    let key = origin(&enrolled.gateway_id, &batch.machine);
    if cp.origin != key {
        return Err(Refusal::BadRequest(format!(
            "checkpoint origin `{}` is not `{key}`",
            cp.origin
        )));
    }
    let end = batch
        .first_seq
        .checked_add(batch.rows.len() as u64)
        .ok_or_else(|| Refusal::BadRequest("seq overflow".into()))?;
    if cp.size != end {
        return Err(Refusal::BadRequest(format!(
            "checkpoint size {} does not cover rows {}..{end}",
            cp.size, batch.first_seq
        )));
    }
    Ok((cp, body))
}

/// The seqs of stored rows a store must read for `batch` given its stored size: the part of
/// the batch the hub already has.
pub fn overlap(batch: &Batch, stored_size: u64) -> std::ops::Range<u64> {
    let end = batch.first_seq + batch.rows.len() as u64;
    batch.first_seq..end.min(stored_size).max(batch.first_seq)
}

/// Compares a parsed batch with the stored log (see the module doc).
pub fn decide(
    loaded: &Loaded,
    batch: &Batch,
    cp: &Checkpoint,
    now_ms: i64,
) -> Result<Verdict, Refusal> {
    let stored = match &loaded.state {
        Some(s) => s.clone(),
        None => LogState::empty(&batch.machine, batch.genesis_zeqond),
    };
    let conflict = |kind: &'static str, at: u64, message: String| {
        let i = at.checked_sub(batch.first_seq).map(|i| i as usize);
        let stored_row = at
            .checked_sub(batch.first_seq)
            .and_then(|i| loaded.overlap.get(i as usize).cloned());
        Refusal::Conflict(Box::new(Evidence {
            kind: kind.to_owned(),
            at,
            message,
            stored_size: stored.size,
            checkpoint: batch.checkpoint.clone(),
            row: i.and_then(|i| batch.rows.get(i).cloned()),
            stored_row,
            stored_checkpoint: stored.checkpoint.clone(),
        }))
    };
    if stored.genesis_zeqond != batch.genesis_zeqond {
        return Err(conflict(
            "fork",
            0,
            "genesis Zeqond differs from the stored log's".into(),
        ));
    }
    if batch.first_seq > stored.size {
        // A gap: the gateway believes the hub has more than it has (a restored hub).
        // Answer with what is stored; the gateway rewinds to it.
        return Ok(Verdict::Stored(stored.size));
    }
    let repeated = overlap(batch, stored.size);
    if loaded.overlap.len() as u64 != repeated.end - repeated.start {
        return Err(Refusal::Unavailable(format!(
            "the store gave {} stored rows for seqs {repeated:?}",
            loaded.overlap.len()
        )));
    }
    // Rows the hub has must be exactly the same bytes.
    for (i, (sent, kept)) in batch.rows.iter().zip(&loaded.overlap).enumerate() {
        if sent != kept {
            let tampered = Row::decode_stored(sent)
                .map(|r| !r.verify_hash())
                .unwrap_or(true);
            let kind = if tampered { "tampered" } else { "fork" };
            let at = batch.first_seq + i as u64;
            return Err(conflict(
                kind,
                at,
                "row differs from the one already stored".into(),
            ));
        }
    }
    if cp.size <= stored.size {
        let root = if cp.size == stored.size {
            stored.root
        } else {
            loaded.root_at_end.ok_or_else(|| {
                Refusal::Unavailable("the store gave no root for a repeated batch".into())
            })?
        };
        if root != cp.root {
            return Err(conflict(
                "tampered",
                batch.first_seq,
                "the signed root is not the root of the rows".into(),
            ));
        }
        // A repeated batch: nothing to write.
        return Ok(Verdict::Stored(stored.size));
    }
    append(loaded, stored.clone(), batch, cp, now_ms).map_err(|(kind, at, message)| {
        if kind.is_empty() {
            Refusal::Unavailable(message)
        } else {
            conflict(kind, at, message)
        }
    })
}

/// A failed check of the new rows: (kind, seq, message); an empty kind is a store fault.
type Failed = (&'static str, u64, String);

fn append(
    loaded: &Loaded,
    stored: LogState,
    batch: &Batch,
    cp: &Checkpoint,
    now_ms: i64,
) -> Result<Verdict, Failed> {
    let fault = |e: LedgerError| ("", 0, e.to_string());
    let skip = (stored.size - batch.first_seq) as usize;
    let mut tiles = match &loaded.partial_tiles {
        Some(p) => Some(TileBuilder::new(stored.size, p).map_err(|m| ("", 0, m))?),
        None => None,
    };
    let mut edge = stored.edge.clone();
    let mut hashes: Vec<Hash> = Vec::with_capacity(2 * (batch.rows.len() - skip));
    let mut leaf_hashes = Vec::with_capacity(8);
    let mut last_hash = stored.last_hash;
    let mut last_ts = stored.last_row_ts_ms;
    let mut row_bytes = 0u64;
    for (i, bytes) in batch.rows.iter().enumerate().skip(skip) {
        let seq = batch.first_seq + i as u64;
        let row = Row::decode_stored(bytes)
            .map_err(|e| ("tampered", seq, format!("row does not decode: {e}")))?;
        if row.seq != seq {
            return Err(("tampered", seq, format!("row claims seq {}", row.seq)));
        }
        if !Row::stored_hash_matches(bytes) {
            return Err((
                "tampered",
                seq,
                "row hash does not match its contents".into(),
            ));
        }
        if row.prev_hash != last_hash {
            return Err((
                "fork",
                seq,
                "prev_hash does not link to the stored log".into(),
            ));
        }
        edge.next_hashes(tlog::record_hash(&row.hash), &mut leaf_hashes)
            .map_err(fault)?;
        if let Some(t) = tiles.as_mut() {
            t.add(seq, &leaf_hashes);
        }
        edge.advance(&leaf_hashes);
        hashes.extend_from_slice(&leaf_hashes);
        last_hash = row.hash;
        last_ts = row.ts_ms;
        row_bytes += bytes.len() as u64;
    }
    let first_new = stored.size;
    if edge.root() != cp.root {
        return Err((
            "tampered",
            first_new,
            "the signed root is not the root of the rows".into(),
        ));
    }
    let c = stored.size;
    if c > 0
        && batch.proof_from == c
        && tlog::check_tree(&batch.consistency, cp.size, &cp.root, c, &stored.root).is_err()
    {
        return Err((
            "fork",
            c,
            "consistency proof from the last stored checkpoint fails".into(),
        ));
    }
    let state = LogState {
        size: cp.size,
        last_hash,
        edge,
        checkpoint: batch.checkpoint.clone(),
        root: cp.root,
        head_size: batch.head_size.max(cp.size),
        last_ingest_ms: now_ms,
        last_row_ts_ms: last_ts,
        genesis_zeqond: stored.genesis_zeqond,
    };
    Ok(Verdict::Append(Box::new(Append {
        old_size: stored.size,
        created: loaded.state.is_none(),
        skip,
        hashes,
        tiles: tiles.map(TileBuilder::finish).unwrap_or_default(),
        state,
        row_bytes,
    })))
}

/// Tiles as records are appended: the current partial tile of each level, and the tiles
/// completed or changed so far.
struct TileBuilder {
    /// Per level: (index, hashes) of the tile being filled.
    current: Vec<(u64, Vec<Hash>)>,
    changed: Vec<bool>,
    done: Vec<Tile>,
}

impl TileBuilder {
    fn new(size: u64, partial: &[Tile]) -> Result<TileBuilder, String> {
        let mut current: Vec<(u64, Vec<Hash>)> = (0..8u32)
            .map(|l| ((size >> (TILE_HEIGHT * l)) / TILE_WIDTH as u64, Vec::new()))
            .collect();
        let want = partial_tiles(size);
        if want.len() != partial.len() {
            return Err(format!(
                "the store gave {} partial tiles for a tree of {size}, not {}",
                partial.len(),
                want.len()
            ));
        }
        for ((level, index, width), tile) in want.into_iter().zip(partial) {
            if tile.level != level || tile.index != index || tile.hashes.len() != width {
                return Err(format!(
                    "stored partial tile {}/{} has width {}, not tile {level}/{index} of width {width}",
                    tile.level,
                    tile.index,
                    tile.hashes.len()
                ));
            }
            current[level as usize].1 = tile.hashes.clone();
        }
        Ok(TileBuilder {
            current,
            changed: vec![false; 8],
            done: Vec::new(),
        })
    }

    /// Record `seq` was appended and stored `hashes` (its leaf first, then one per level).
    fn add(&mut self, seq: u64, hashes: &[Hash]) {
        for level in 0..8usize {
            let Some(h) = hashes.get(level * TILE_HEIGHT as usize) else {
                break;
            };
            debug_assert_eq!(
                (seq >> (level as u32 * TILE_HEIGHT)) % TILE_WIDTH as u64,
                self.current[level].1.len() as u64
            );
            let (index, tile) = &mut self.current[level];
            tile.push(*h);
            self.changed[level] = true;
            if tile.len() == TILE_WIDTH {
                self.done.push(Tile {
                    level: level as u8,
                    index: *index,
                    hashes: std::mem::take(tile),
                });
                *index += 1;
                self.changed[level] = false;
            }
        }
    }

    fn finish(mut self) -> Vec<Tile> {
        for (level, (index, hashes)) in self.current.into_iter().enumerate() {
            if self.changed[level] && !hashes.is_empty() {
                self.done.push(Tile {
                    level: level as u8,
                    index,
                    hashes,
                });
            }
        }
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::note::{sign_note, GatewayKey};

    const GW: &str = "gw-00000000000000aa";

    struct Log {
        key: GatewayKey,
        vkey: String,
        rows: Vec<Vec<u8>>,
        hashes: Vec<Hash>,
        edge: tlog::RightEdge,
    }

    impl Log {
        fn new(n: usize) -> Log {
            let key = GatewayKey::from_pkcs8(&GatewayKey::generate().unwrap()).unwrap();
            let vkey = key.verifier_key(GW).unwrap();
            let mut log = Log {
                key,
                vkey,
                rows: Vec::new(),
                hashes: Vec::new(),
                edge: tlog::RightEdge::empty(),
            };
            let mut prev = genesis_prev_hash("m", 1);
            for seq in 0..n as u64 {
                let (row, bytes) = Row {
                    seq,
                    zeqond: 1 + seq,
                    ts_ms: seq as i64,
                    kind: "event".into(),
                    actor: "t".into(),
                    transition_id: [0; 16],
                    payload: seq.to_be_bytes().to_vec(),
                    prev_hash: prev,
                    hash: [0; 32],
                }
                .seal_stored()
                .unwrap();
                log.hashes
                    .extend(log.edge.push(tlog::record_hash(&row.hash)).unwrap());
                prev = row.hash;
                log.rows.push(bytes);
            }
            log
        }

        fn batch(&self, from: u64, to: u64) -> Batch {
            let root = tlog::tree_hash(to, &self.hashes).unwrap();
            let origin = origin(GW, "m");
            let body = Checkpoint {
                origin,
                size: to,
                root,
            }
            .to_body()
            .unwrap();
            Batch {
                version: WIRE_VERSION,
                gateway_id: GW.into(),
                verifier_key: self.vkey.clone(),
                machine: "m".into(),
                genesis_zeqond: 1,
                first_seq: from,
                rows: self.rows[from as usize..to as usize].to_vec(),
                checkpoint: sign_note(&body, GW, &self.key).unwrap(),
                proof_from: 0,
                consistency: Vec::new(),
                head_size: to,
            }
        }

        fn enrollment(&self) -> Enrollment {
            Enrollment {
                gateway_id: GW.into(),
                verifier_key: self.vkey.clone(),
                token_sha256: String::new(),
                enrolled_ms: 0,
            }
        }
    }

    /// A store that keeps exactly what `decide` asks it to write, as a back end does.
    #[derive(Default)]
    struct Kept {
        state: Option<LogState>,
        rows: Vec<Vec<u8>>,
        tiles: std::collections::BTreeMap<(u8, u64), Vec<Hash>>,
    }

    impl Kept {
        fn loaded(&self, batch: &Batch) -> Loaded {
            let size = self.state.as_ref().map_or(0, |s| s.size);
            let r = overlap(batch, size);
            Loaded {
                state: self.state.clone(),
                overlap: self.rows[r.start as usize..r.end as usize].to_vec(),
                root_at_end: None,
                partial_tiles: Some(
                    partial_tiles(size)
                        .into_iter()
                        .map(|(level, index, _)| Tile {
                            level,
                            index,
                            hashes: self.tiles[&(level, index)].clone(),
                        })
                        .collect(),
                ),
            }
        }

        fn apply(&mut self, log: &Log, batch: &Batch) -> Verdict {
            let (cp, _) = parse(&log.enrollment(), batch).unwrap();
            let verdict = decide(&self.loaded(batch), batch, &cp, 0).unwrap();
            if let Verdict::Append(a) = &verdict {
                self.rows.extend(batch.rows[a.skip..].iter().cloned());
                for t in &a.tiles {
                    self.tiles.insert((t.level, t.index), t.hashes.clone());
                }
                self.state = Some(a.state.clone());
            }
            verdict
        }
    }

    /// Invariant: the tiles a store keeps from `decide`'s answers hold the tree's stored
    /// hashes, whatever the batch boundaries (every tile, full or partial, of every level).
    #[test]
    fn tiles_from_any_batch_split_hold_the_trees_hashes() {
        let n = 66_000u64;
        let log = Log::new(n as usize);
        let mut kept = Kept::default();
        let mut at = 0;
        for step in [1u64, 254, 1, 256, 513, 65_535, 1_000_000] {
            let to = (at + step).min(n);
            assert!(matches!(
                kept.apply(&log, &log.batch(at, to)),
                Verdict::Append(_)
            ));
            at = to;
            if at == n {
                break;
            }
        }
        assert_eq!(at, n);
        let mut expected = 0;
        for level in 0..8u8 {
            let nodes = n >> (8 * u32::from(level));
            expected += nodes.div_ceil(256);
            for index in 0..nodes.div_ceil(256) {
                let tile = &kept.tiles[&(level, index)];
                assert_eq!(tile.len() as u64, (nodes - index * 256).min(256));
                for (k, h) in tile.iter().enumerate() {
                    let i = tlog::stored_hash_index(8 * u32::from(level), index * 256 + k as u64);
                    assert_eq!(h, &log.hashes[i as usize], "tile {level}/{index} hash {k}");
                }
            }
        }
        assert_eq!(kept.tiles.len() as u64, expected);
    }

    /// Invariant: a repeated batch writes nothing; a batch that differs from a stored row is a
    /// fork whose evidence holds both rows and both signed checkpoints.
    #[test]
    fn a_repeat_is_stored_and_a_different_row_is_a_fork_with_evidence() {
        let log = Log::new(20);
        let mut kept = Kept::default();
        kept.apply(&log, &log.batch(0, 20));
        assert!(matches!(
            kept.apply(&log, &log.batch(5, 20)),
            Verdict::Stored(20)
        ));
        let other = Log::new(20); // same rows, another key: signed by it, so refused at parse
        assert!(parse(&log.enrollment(), &other.batch(0, 20)).is_err());
        let mut forked = log.batch(5, 20);
        forked.rows[3] = log.rows[2].clone();
        let (cp, _) = parse(&log.enrollment(), &forked).unwrap();
        let Err(Refusal::Conflict(e)) = decide(&kept.loaded(&forked), &forked, &cp, 0) else {
            panic!("not a conflict");
        };
        assert_eq!((e.kind.as_str(), e.at, e.stored_size), ("fork", 8, 20));
        assert_eq!(e.row.as_deref(), Some(log.rows[2].as_slice()));
        assert_eq!(e.stored_row.as_deref(), Some(log.rows[8].as_slice()));
        assert_eq!(e.checkpoint, forked.checkpoint);
        assert_eq!(e.stored_checkpoint, log.batch(0, 20).checkpoint);
    }
}
