//! redb storage: table definitions, postcard codecs, the schema version, and the single writer.
//!
//! # What a commit guarantees
//! Only the writer task ([`GroupCommit`]) opens write transactions. It folds every queued
//! request into one transaction and answers each request only after that transaction has been
//! committed with `Durability::Immediate` and its syncs are done. So an answered write is on
//! disk, and a request that failed leaves nothing behind. The syncs run in the background
//! while the writer builds the next transaction (module doc of `writeback`); a reader
//! ([`Store::read`]) never sees a commit before it is durable. The test
//! `every_write_answered_before_a_power_cut_survives_it` cuts the power under the store, torn
//! commits included ([`PowerCut`]), and finds every write answered Ok in the file.
//!
//! Each request closure must either write everything it means to write or return `Err` before
//! writing anything ("validate, then apply"): requests share a transaction, and redb cannot roll
//! back one of them alone. Domain code keeps this shape by reading and checking first.
//!
//! # Failure
//! When the disk is full or failing, the commit fails; every request of that batch gets
//! [`StoreError::Full`] (HTTP 507 `storage_full`) or [`StoreError::Unavailable`] (503), and the
//! previous committed state stays intact. redb then refuses all I/O on that handle
//! (`PreviousIo`), so the writer reopens the database at once; readers keep working on the
//! reopened handle.

mod backend;
#[cfg(test)]
mod power_cut_tests;
mod writeback;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use backend::{DiskLimit, PowerCut};
pub use writer::{BatchStats, GroupCommit, LATENCY_BOUNDS, SIZE_BOUNDS};

/// Version of the table layout this build reads and writes. 2 grouped the log's tree hashes
/// by row and its Zeqond index by run; 3 groups the tree hashes of 16 rows per entry.
pub const SCHEMA_VERSION: u32 = 3;
/// Log rows per write transaction when migrating older schemas (bounded memory on big logs).
const MIGRATION_CHUNK: u64 = 50_000;

/// `schema_version`, `gateway_id`, … → postcard values.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// ZID → [`crate::auth::Account`].
pub const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// SHA-256 of a raw key (32 bytes) → [`crate::auth::KeyRecord`]. Raw keys are never stored.
pub const KEYS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keys");
/// Key id (UUID string) → SHA-256 of the key, to revoke and list by id.
pub const KEY_IDS: TableDefinition<&str, &[u8]> = TableDefinition::new("key_ids");
/// Machine slug → [`crate::machines::Machine`].
pub const MACHINES: TableDefinition<&str, &[u8]> = TableDefinition::new("machines");

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage is full: {0}; free space on the data volume, nothing committed was lost")]
    Full(String),
    #[error("storage is unavailable: {0}; retry shortly")]
    Unavailable(String),
    #[error("storage is recovering from an I/O error; retry shortly")]
    Recovering,
    #[error("stored data is corrupt: {0}; run `smgate verify`")]
    Corrupt(String),
    #[error("the gateway is shutting down; retry against the restarted gateway")]
    ShuttingDown,
    #[error("data directory was written by a newer smgate (schema {found}, this build reads {SCHEMA_VERSION})")]
    NewerSchema { found: u32 },
}

fn io_error(e: std::io::Error) -> StoreError {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    let full = matches!(e.raw_os_error(), Some(ENOSPC) | Some(EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull;
    if full {
        StoreError::Full(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        match e {
            redb::StorageError::Io(io) => io_error(io),
            redb::StorageError::PreviousIo => StoreError::Recovering,
            redb::StorageError::ValueTooLarge(n) => {
                StoreError::Corrupt(format!("value of {n} bytes is too large"))
            }
            other => StoreError::Corrupt(other.to_string()),
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                match redb::Error::from(e) {
                    redb::Error::Io(io) => io_error(io),
                    redb::Error::PreviousIo => StoreError::Recovering,
                    redb::Error::DatabaseAlreadyOpen => StoreError::Unavailable(
                        "the database is open in another process (is the gateway running?)".into(),
                    ),
                    other => StoreError::Corrupt(other.to_string()),
                }
            }
        }
    )*};
}
from_redb!(
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

/// postcard encoding of a stored value. Only plain data structs are stored, which always encode.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("undecodable value: {e}")))
}

/// `#[serde(with = "store::bytes")]` for a stored `Vec<u8>` field: the same postcard bytes as
/// the field without it (a varint length, then the bytes), written and read as one slice
/// instead of one `u8` at a time. serde has no specialisation for `Vec<u8>`, so without this a
/// 500-byte instance state costs 500 calls each way, a visible share of the MQTT writer's
/// instructions (docs/performance.md, "Figures from code comments"). Self-describing formats
/// read a sequence of numbers too, as they did before.
pub mod bytes {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

/// A domain module's share of the database, listed in [`StoreOptions::tables`]: the store
/// creates the tables of every share in a new database (so that readers never meet a missing
/// table) and runs their migrations from an older [`SCHEMA_VERSION`]. The store itself knows
/// only its own tables ([`META`], the accounts, keys and machines).
#[derive(Debug, Clone, Copy)]
pub struct Tables {
    pub create: fn(&WriteTransaction) -> Result<(), StoreError>,
    pub migrate: Option<Migration>,
}

/// How a share moves its tables from an older schema version. Each step is idempotent and
/// reads only tables that the final transaction drops, so a migration interrupted anywhere
/// runs again from the start.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Copies what schema `from` kept into the current tables, at most `chunk` rows per write
    /// transaction (bounded memory on big logs); returns the rows it copied.
    pub copy: fn(db: &Database, from: u32, chunk: u64) -> Result<u64, StoreError>,
    /// Drops the tables of schema `from`, inside the transaction that records the new version.
    pub drop: fn(txn: &WriteTransaction, from: u32) -> Result<(), StoreError>,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The domain modules' tables (`gateway::TABLES` lists the gateway's). Empty by default:
    /// a bare store has only its own tables, and a write creates any other it opens.
    pub tables: &'static [Tables],
    pub cache_bytes: usize,
    /// Page writes held in memory before they go to the sync thread (`writeback`).
    pub write_window_bytes: usize,
    pub quick_repair: bool,
    pub max_batch: usize,
    /// Test hook: makes the file unable to grow, as a full disk does.
    pub disk_limit: Option<DiskLimit>,
    /// Test hook: keeps every write in memory until a sync, so that a SIGKILL or
    /// [`PowerCut::cut`] is a power cut (module doc of `backend`). Not with `disk_limit`.
    pub power_cut: Option<PowerCut>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            tables: &[],
            cache_bytes: 12 << 20,
            write_window_bytes: writeback::MAX_HELD,
            quick_repair: false,
            max_batch: 1024,
            disk_limit: None,
            power_cut: None,
        }
    }
}

/// The database handle shared by readers, and the path and options to reopen it.
pub struct Store {
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
    options: StoreOptions,
    /// Which commits are durable (module doc of `writeback`); kept across reopens.
    durability: Arc<writeback::Durability>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and checks its schema version.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Arc<Store>, StoreError> {
        if options.power_cut.is_some() {
            tracing::warn!(
                path = %path.display(),
                "TEST HOOK ON (SMGATE_TEST_POWER_CUT): the store keeps every write in memory \
                 until its sync, so a crash is a power cut; never run a real gateway like this"
            );
        }
        let durability = Arc::new(writeback::Durability::default());
        let db = open_database(path, &options, &durability)?;
        let store = Store {
            db: RwLock::new(Some(Arc::new(db))),
            path: path.to_owned(),
            options,
            durability,
        };
        store.ensure_schema()?;
        Ok(Arc::new(store))
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The current database handle (readers begin their read transactions on it).
    pub fn database(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the database is being reopened".into()))
    }

    /// A read transaction that sees only durable commits: the writer answers a commit after
    /// its sync, which may still be running when the commit becomes visible.
    pub fn read(&self) -> Result<ReadTransaction, StoreError> {
        let txn = self.database()?.begin_read()?;
        self.durability.wait_visible();
        Ok(txn)
    }

    pub(crate) fn durability(&self) -> &writeback::Durability {
        &self.durability
    }

    /// Runs `f` in a read transaction. A read that meets a handle the writer is about to
    /// reopen after an I/O error waits for the reopen and runs again, so reads keep working
    /// while writes fail.
    pub fn view<T>(
        &self,
        f: impl Fn(&ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            let outcome = self.read().and_then(|txn| f(&txn));
            match outcome {
                Err(StoreError::Recovering) if attempt < 50 => {
                    attempt += 1;
                    // `database()` blocks while the writer holds the slot to reopen it.
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => return other,
            }
        }
    }

    /// Drops the failed handle and opens the file again, as redb requires after an I/O error.
    /// Waits briefly for in-flight readers to let go of the old handle.
    pub(crate) fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self
            .db
            .write()
            .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?;
        if let Some(old) = slot.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(shared) => {
                        *slot = Some(shared);
                        return Err(StoreError::Unavailable(
                            "readers hold the old handle".into(),
                        ));
                    }
                }
            }
        }
        // A reader's transaction may still pin the file for a moment after its handle is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match open_database(&self.path, &self.options, &self.durability) {
                Ok(db) => {
                    *slot = Some(Arc::new(db));
                    tracing::warn!(path = %self.path.display(), "database reopened after an I/O error");
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "reopen failed, retrying");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn ensure_schema(&self) -> Result<(), StoreError> {
        let db = self.database()?;
        let found = {
            let read = db.begin_read()?;
            match read.open_table(META) {
                Ok(t) => match t.get("schema_version")? {
                    Some(v) => Some(decode::<u32>(v.value())?),
                    None => None,
                },
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            }
        };
        match found {
            Some(v) if v > SCHEMA_VERSION => Err(StoreError::NewerSchema { found: v }),
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            Some(from @ (1 | 2)) => {
                let started = std::time::Instant::now();
                let migrations: Vec<Migration> = self
                    .options
                    .tables
                    .iter()
                    .filter_map(|t| t.migrate)
                    .collect();
                let mut rows = 0;
                for m in &migrations {
                    rows = rows.max((m.copy)(&db, from, MIGRATION_CHUNK)?);
                }
                let mut txn = db.begin_write()?;
                txn.set_quick_repair(self.options.quick_repair);
                for m in &migrations {
                    (m.drop)(&txn, from)?;
                }
                txn.open_table(META)?
                    .insert("schema_version", encode(&SCHEMA_VERSION).as_slice())?;
                txn.commit()?;
                tracing::info!(
                    rows,
                    seconds = started.elapsed().as_secs_f64(),
                    "migrated the database from schema {from} to {SCHEMA_VERSION}"
                );
                Ok(())
            }
            Some(v) => Err(StoreError::Corrupt(format!(
                "unknown schema version {v} (this build reads 1 to {SCHEMA_VERSION})"
            ))),
            None => {
                let mut txn = db.begin_write()?;
                txn.set_quick_repair(self.options.quick_repair);
                {
                    let mut meta = txn.open_table(META)?;
                    meta.insert("schema_version", encode(&SCHEMA_VERSION).as_slice())?;
                    // Create every table so that readers never meet a missing one.
                    txn.open_table(ACCOUNTS)?;
                    txn.open_table(KEYS)?;
                    txn.open_table(KEY_IDS)?;
                    txn.open_table(MACHINES)?;
                }
                for t in self.options.tables {
                    (t.create)(&txn)?;
                }
                txn.commit()?;
                Ok(())
            }
        }
    }
}

fn open_database(
    path: &Path,
    options: &StoreOptions,
    durability: &Arc<writeback::Durability>,
) -> Result<Database, StoreError> {
    let mut builder = Database::builder();
    builder.set_cache_size(options.cache_bytes);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_error)?;
    let window = options.write_window_bytes;
    match (&options.disk_limit, &options.power_cut) {
        (None, None) => {
            let file = redb::backends::FileBackend::new(file)?;
            create_on(&builder, file, durability, window)
        }
        (Some(limit), None) => create_on(&builder, limit.backend(file)?, durability, window),
        (None, Some(power)) => create_on(&builder, power.backend(file)?, durability, window),
        (Some(_), Some(_)) => Err(StoreError::Unavailable(
            "the disk_limit and power_cut test backends do not combine; set one".into(),
        )),
    }
}

/// Opens the database on `file`, whose page writes wait in memory for the commit's sync
/// (module doc of `writeback`).
fn create_on<B: redb::StorageBackend>(
    builder: &redb::Builder,
    file: B,
    durability: &Arc<writeback::Durability>,
    window: usize,
) -> Result<Database, StoreError> {
    let backend =
        writeback::WriteBack::with_window(file, durability.clone(), window).map_err(io_error)?;
    Ok(builder.create_with_backend(backend)?)
}

/// Reads one postcard value from `table` inside a read transaction.
pub fn get<T: DeserializeOwned>(
    txn: &ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let t = txn.open_table(table)?;
    let v = t.get(key)?;
    v.map(|g| decode(g.value())).transpose()
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    /// A row as it was stored before [`super::bytes`]: `Vec<u8>` through serde's sequence.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Before {
        n: u64,
        state: Vec<u8>,
        name: String,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct After {
        n: u64,
        #[serde(with = "super::bytes")]
        state: Vec<u8>,
        name: String,
    }

    #[test]
    fn a_byte_field_encodes_as_it_did_and_reads_rows_written_before() {
        // Lengths around the varint boundaries of the length prefix.
        for len in [0, 1, 127, 128, 500, 16_383, 16_384, 70_000] {
            let state: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let before = Before {
                n: 42,
                state: state.clone(),
                name: "dev-1".into(),
            };
            let after = After {
                n: 42,
                state,
                name: "dev-1".into(),
            };
            let old = super::encode(&before);
            assert_eq!(super::encode(&after), old, "length {len}");
            let read: After = super::decode(&old).unwrap();
            assert_eq!(read, after, "length {len}");
        }
    }

    #[test]
    fn a_byte_field_reads_a_sequence_from_json() {
        let json = serde_json::to_string(&Before {
            n: 1,
            state: vec![0, 255, 7],
            name: String::new(),
        })
        .unwrap();
        let read: After = serde_json::from_str(&json).unwrap();
        assert_eq!(read.state, [0, 255, 7]);
        // And writes one: serde_json has no byte strings.
        assert_eq!(serde_json::to_string(&read).unwrap(), json);
        assert!(serde_json::from_str::<After>(r#"{"n":1,"state":[256],"name":""}"#).is_err());
    }
}
