//! The embedded back end: one redb file in the hub's data directory, for one machine, tests
//! and small fleets (the default when `hub.database_url` is empty).
//!
//! Data directory: `hub.redb` (rows, tree hashes in Go tlog's stored-hash layout and the last
//! checkpoint per gateway and machine), and `enrolled/<gateway-id>.json`, one file per enrolled
//! gateway (its note verifier key and the SHA-256 of its bearer token). Enrolment files are read
//! per request, so `smgate hub enroll` works while the hub runs (redb locks its file).
//!
//! The file format is the one the hub had before the PostgreSQL back end: [`Stored`] per log,
//! one row per seq, one tree hash per stored-hash index; and since the operator API the signed
//! evidence of refused batches ([`Conflict`]; a file from before gets that table when a hub
//! opens it). A commit re-reads the log's size in its write transaction and writes only when it
//! is still the size the batch was checked against (redb has one writer, so in one process
//! that always holds).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use super::check::{self, Append, Evidence, Loaded, LogState};
use super::{io, valid_gateway_id, Conflict, Enrollment, Fault, HubError, HubStore, Stored};
use crate::ledger::{log::TableHashes, tlog, Checkpoint};
use crate::store;
use crate::sync::{origin, Batch};

/// ("<gateway>/<slug>", seq) → stored row bytes.
const ROWS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("hub_rows");
/// ("<gateway>/<slug>", stored hash index) → 32-byte tlog hash.
const HASHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("hub_hashes");
/// "<gateway>/<slug>" → [`Stored`].
const MACHINES: TableDefinition<&str, &[u8]> = TableDefinition::new("hub_machines");
/// ("<gateway>/<slug>", seq, kind, evidence digest) → [`Conflict`].
const CONFLICTS: TableDefinition<(&str, u64, &str, &[u8]), &[u8]> =
    TableDefinition::new("hub_conflicts");

fn fault(e: impl std::fmt::Display) -> Fault {
    Fault(e.to_string())
}

/// The hub's redb file and enrolment directory.
pub struct Embedded {
    dir: PathBuf,
    db: Arc<Database>,
}

impl Embedded {
    /// Opens (creating on first use) `hub.redb` and `enrolled/` in `dir`.
    pub fn open(dir: &Path) -> Result<Embedded, HubError> {
        std::fs::create_dir_all(dir.join("enrolled")).map_err(io(dir))?;
        let db =
            Database::create(dir.join("hub.redb")).map_err(|e| HubError::Store(e.to_string()))?;
        let txn = db
            .begin_write()
            .map_err(|e| HubError::Store(e.to_string()))?;
        {
            let open =
                |r: Result<(), redb::TableError>| r.map_err(|e| HubError::Store(e.to_string()));
            open(txn.open_table(ROWS).map(drop))?;
            open(txn.open_table(HASHES).map(drop))?;
            open(txn.open_table(MACHINES).map(drop))?;
            open(txn.open_table(CONFLICTS).map(drop))?;
        }
        txn.commit().map_err(|e| HubError::Store(e.to_string()))?;
        Ok(Embedded {
            dir: dir.to_owned(),
            db: Arc::new(db),
        })
    }

    /// Opens an existing hub file `path` (its enrolment directory beside it) to read it, for
    /// `smgate hub import`: a missing file and one a running hub holds are errors that say so.
    pub fn open_existing(path: &Path) -> Result<Embedded, HubError> {
        if !path.is_file() {
            return Err(HubError::Invalid(format!(
                "{}: no such hub file (the embedded hub keeps `hub.redb` in its data directory)",
                path.display()
            )));
        }
        let db = Database::open(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => HubError::Invalid(format!(
                "{}: the file is locked by a running hub; stop that hub (or copy the file) and \
                 import again",
                path.display()
            )),
            other => HubError::Store(format!("{}: {other}", path.display())),
        })?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        Ok(Embedded {
            dir,
            db: Arc::new(db),
        })
    }

    /// Every log in the file, by gateway and machine.
    pub fn all_logs(&self) -> Result<Vec<Stored>, Fault> {
        let txn = self.db.begin_read().map_err(fault)?;
        let table = txn.open_table(MACHINES).map_err(fault)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(fault)? {
            out.push(store::decode::<Stored>(entry.map_err(fault)?.1.value()).map_err(fault)?);
        }
        Ok(out)
    }

    /// Writes `enrolled/<id>.json` (mode 0600, renamed into place); needs no database.
    pub fn enroll_file(dir: &Path, record: &Enrollment) -> Result<(), HubError> {
        let enrolled = dir.join("enrolled");
        std::fs::create_dir_all(&enrolled).map_err(io(&enrolled))?;
        let id = &record.gateway_id;
        let path = enrolled.join(format!("{id}.json"));
        let tmp = enrolled.join(format!(".{id}.json.tmp"));
        let text =
            serde_json::to_vec_pretty(record).map_err(|e| HubError::Invalid(e.to_string()))?;
        super::write_private_tmp(&tmp, &text)?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    fn enrollment_file(&self, gateway_id: &str) -> Option<Enrollment> {
        if !valid_gateway_id(gateway_id) {
            return None;
        }
        let text =
            std::fs::read(self.dir.join("enrolled").join(format!("{gateway_id}.json"))).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn load_blocking(&self, gw: &str, batch: &Batch, cp: &Checkpoint) -> Result<Loaded, Fault> {
        let key = origin(gw, &batch.machine);
        let txn = self.db.begin_read().map_err(fault)?;
        let machines = txn.open_table(MACHINES).map_err(fault)?;
        let rows = txn.open_table(ROWS).map_err(fault)?;
        let hashes = txn.open_table(HASHES).map_err(fault)?;
        let Some(stored) = machines.get(key.as_str()).map_err(fault)? else {
            return Ok(Loaded {
                state: None,
                overlap: Vec::new(),
                root_at_end: None,
                partial_tiles: None,
            });
        };
        let stored = store::decode::<Stored>(stored.value()).map_err(fault)?;
        let reader = TableHashes {
            table: &hashes,
            slug: key.as_str(),
        };
        let range = check::overlap(batch, stored.size);
        let mut overlap = Vec::with_capacity((range.end - range.start) as usize);
        for entry in rows
            .range((key.as_str(), range.start)..(key.as_str(), range.end))
            .map_err(fault)?
        {
            overlap.push(entry.map_err(fault)?.1.value().to_vec());
        }
        let root_at_end = if cp.size < stored.size {
            Some(tlog::tree_hash(cp.size, &reader).map_err(fault)?)
        } else {
            None
        };
        let edge = tlog::RightEdge::load(stored.size, &reader).map_err(fault)?;
        Ok(Loaded {
            state: Some(LogState {
                genesis_zeqond: stored.genesis_zeqond,
                size: stored.size,
                last_hash: stored.last_hash,
                edge,
                checkpoint: stored.checkpoint,
                root: stored.root,
                head_size: stored.head_size,
                last_ingest_ms: stored.last_ingest_ms,
                last_row_ts_ms: stored.last_row_ts_ms,
            }),
            overlap,
            root_at_end,
            partial_tiles: None,
        })
    }

    fn commit_blocking(&self, gw: &str, batch: &Batch, append: &Append) -> Result<bool, Fault> {
        let key = origin(gw, &batch.machine);
        let txn = self.db.begin_write().map_err(fault)?;
        {
            let mut machines = txn.open_table(MACHINES).map_err(fault)?;
            let now = match machines.get(key.as_str()).map_err(fault)? {
                Some(v) => Some(store::decode::<Stored>(v.value()).map_err(fault)?.size),
                None => None,
            };
            let expected = (!append.created).then_some(append.old_size);
            if now != expected {
                // Dropping the transaction aborts it.
                return Ok(false);
            }
            let mut hashes = txn.open_table(HASHES).map_err(fault)?;
            let first = tlog::stored_hash_index(0, append.old_size);
            for (i, h) in append.hashes.iter().enumerate() {
                hashes
                    .insert((key.as_str(), first + i as u64), h.as_slice())
                    .map_err(fault)?;
            }
            let mut rows = txn.open_table(ROWS).map_err(fault)?;
            for (i, bytes) in batch.rows.iter().enumerate().skip(append.skip) {
                rows.insert((key.as_str(), batch.first_seq + i as u64), bytes.as_slice())
                    .map_err(fault)?;
            }
            let s = &append.state;
            let stored = Stored {
                gateway_id: gw.to_owned(),
                slug: batch.machine.clone(),
                genesis_zeqond: s.genesis_zeqond,
                size: s.size,
                last_hash: s.last_hash,
                checkpoint: s.checkpoint.clone(),
                checkpoint_size: s.size,
                root: s.root,
                head_size: s.head_size,
                last_ingest_ms: s.last_ingest_ms,
                last_row_ts_ms: s.last_row_ts_ms,
            };
            machines
                .insert(key.as_str(), store::encode(&stored).as_slice())
                .map_err(fault)?;
        }
        txn.commit().map_err(fault)?;
        Ok(true)
    }

    fn machines_blocking(&self, gw: &str, after: &str, limit: usize) -> Result<Vec<Stored>, Fault> {
        let txn = self.db.begin_read().map_err(fault)?;
        let table = txn.open_table(MACHINES).map_err(fault)?;
        let prefix = format!("{gw}/");
        let from = format!("{prefix}{after}");
        let mut out = Vec::new();
        for entry in table.range(from.as_str()..).map_err(fault)? {
            let (k, v) = entry.map_err(fault)?;
            if !k.value().starts_with(&prefix) || out.len() == limit {
                break;
            }
            if k.value() != from {
                out.push(store::decode::<Stored>(v.value()).map_err(fault)?);
            }
        }
        Ok(out)
    }

    fn conflicts_blocking(
        &self,
        gw: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<Conflict>, Fault> {
        let txn = self.db.begin_read().map_err(fault)?;
        // A file from before conflicts were kept (opened by `import`, which creates nothing)
        // has none.
        let table = match txn.open_table(CONFLICTS) {
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            other => other.map_err(fault)?,
        };
        let prefix = format!("{gw}/");
        let first: (&str, u64, &str, &[u8]) = (prefix.as_str(), 0, "", &[]);
        let mut out = Vec::new();
        for entry in table.range(first..).map_err(fault)?.skip(offset as usize) {
            let (k, v) = entry.map_err(fault)?;
            if !k.value().0.starts_with(&prefix) || out.len() == limit {
                break;
            }
            out.push(store::decode::<Conflict>(v.value()).map_err(fault)?);
        }
        Ok(out)
    }

    /// Keeps `evidence` once per distinct evidence; a repeat counts and moves `last_ms`.
    fn record_conflict_blocking(
        &self,
        gw: &str,
        machine: &str,
        evidence: &Evidence,
    ) -> Result<(), Fault> {
        let mut c = Conflict::new(machine, evidence, crate::clock::now_ms());
        let key = origin(gw, machine);
        let txn = self.db.begin_write().map_err(fault)?;
        {
            let mut table = txn.open_table(CONFLICTS).map_err(fault)?;
            let k = (
                key.as_str(),
                c.evidence.at,
                c.evidence.kind.as_str(),
                c.digest.as_slice(),
            );
            if let Some(old) = table.get(k).map_err(fault)? {
                let old = store::decode::<Conflict>(old.value()).map_err(fault)?;
                (c.first_ms, c.times) = (old.first_ms, old.times + 1);
            }
            table
                .insert(k, store::encode(&c).as_slice())
                .map_err(fault)?;
        }
        txn.commit().map_err(fault)
    }

    fn log_blocking(&self, gw: &str, machine: &str) -> Result<Option<Stored>, Fault> {
        let txn = self.db.begin_read().map_err(fault)?;
        let table = txn.open_table(MACHINES).map_err(fault)?;
        let key = origin(gw, machine);
        match table.get(key.as_str()).map_err(fault)? {
            Some(v) => Ok(Some(store::decode::<Stored>(v.value()).map_err(fault)?)),
            None => Ok(None),
        }
    }

    /// A tile's hashes are stored hashes: `(8·level, 256·index + k)` for each `k`.
    fn tile_blocking(
        &self,
        gw: &str,
        machine: &str,
        level: u8,
        index: u64,
        width: usize,
    ) -> Result<Option<Vec<u8>>, Fault> {
        let txn = self.db.begin_read().map_err(fault)?;
        let table = txn.open_table(HASHES).map_err(fault)?;
        let key = origin(gw, machine);
        let mut out = Vec::with_capacity(width * 32);
        for k in 0..width as u64 {
            let at =
                tlog::stored_hash_index(u32::from(level) * check::TILE_HEIGHT, index * 256 + k);
            match table.get((key.as_str(), at)).map_err(fault)? {
                Some(h) => out.extend_from_slice(h.value()),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    fn rows_blocking(
        &self,
        gateway_id: &str,
        slug: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<Vec<u8>>, Fault> {
        let txn = self.db.begin_read().map_err(fault)?;
        let table = txn.open_table(ROWS).map_err(fault)?;
        let key = origin(gateway_id, slug);
        let mut out = Vec::new();
        for entry in table
            .range((key.as_str(), from)..(key.as_str(), to.max(from)))
            .map_err(fault)?
        {
            out.push(entry.map_err(fault)?.1.value().to_vec());
        }
        Ok(out)
    }
}

// redb is blocking; `block_in_place` lets the runtime move other tasks off this worker while a
// call runs (the hub runs on the multi-threaded runtime).
impl HubStore for Embedded {
    async fn enrollment(&self, gateway_id: &str) -> Result<Option<Enrollment>, Fault> {
        Ok(self.enrollment_file(gateway_id))
    }

    async fn enrollments(&self, after: &str, limit: usize) -> Result<Vec<Enrollment>, Fault> {
        let mut out: Vec<Enrollment> = std::fs::read_dir(self.dir.join("enrolled"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .filter(|id| id.as_str() > after)
            .filter_map(|id| self.enrollment_file(&id))
            .collect();
        out.sort_by(|a, b| a.gateway_id.cmp(&b.gateway_id));
        out.truncate(limit);
        Ok(out)
    }

    async fn enroll(&self, record: &Enrollment) -> Result<(), Fault> {
        Embedded::enroll_file(&self.dir, record).map_err(fault)
    }

    async fn load(&self, gw: &str, batch: &Batch, cp: &Checkpoint) -> Result<Loaded, Fault> {
        tokio::task::block_in_place(|| self.load_blocking(gw, batch, cp))
    }

    async fn commit(&self, gw: &str, batch: &Batch, append: &Append) -> Result<bool, Fault> {
        tokio::task::block_in_place(|| self.commit_blocking(gw, batch, append))
    }

    async fn record_conflict(&self, gw: &str, machine: &str, e: &Evidence) -> Result<(), Fault> {
        tokio::task::block_in_place(|| self.record_conflict_blocking(gw, machine, e))
    }

    async fn machines(&self, gw: &str, after: &str, limit: usize) -> Result<Vec<Stored>, Fault> {
        tokio::task::block_in_place(|| self.machines_blocking(gw, after, limit))
    }

    async fn conflicts(&self, gw: &str, offset: u64, limit: usize) -> Result<Vec<Conflict>, Fault> {
        tokio::task::block_in_place(|| self.conflicts_blocking(gw, offset, limit))
    }

    async fn log(&self, gw: &str, machine: &str) -> Result<Option<Stored>, Fault> {
        tokio::task::block_in_place(|| self.log_blocking(gw, machine))
    }

    async fn tile(
        &self,
        gw: &str,
        machine: &str,
        level: u8,
        index: u64,
        width: usize,
    ) -> Result<Option<Vec<u8>>, Fault> {
        tokio::task::block_in_place(|| self.tile_blocking(gw, machine, level, index, width))
    }

    async fn rows(
        &self,
        gateway_id: &str,
        slug: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<Vec<u8>>, Fault> {
        tokio::task::block_in_place(|| self.rows_blocking(gateway_id, slug, from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `smgate hub import` reads files written before conflicts were kept, without creating
    /// anything in them: a missing conflicts table is no conflict, not an error.
    #[test]
    fn a_hub_file_from_before_conflicts_were_kept_imports_with_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(ROWS).unwrap();
        txn.open_table(HASHES).unwrap();
        txn.open_table(MACHINES).unwrap();
        txn.commit().unwrap();
        drop(db);
        let old = Embedded::open_existing(&path).unwrap();
        assert!(old.all_logs().unwrap().is_empty());
        let conflicts = old.conflicts_blocking("gw-0123456789abcdef", 0, 10);
        assert_eq!(conflicts.unwrap(), Vec::new());
        // A running hub holds the file: the import says so.
        let err = Embedded::open_existing(&path).err().unwrap().to_string();
        assert!(err.contains("locked by a running hub"), "{err}");
    }
}
