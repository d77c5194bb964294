//! The PostgreSQL back end: any number of hub processes against one database.
//!
//! # Schema
//! Every table's key starts with the gateway (`gw`) and every table is hash-partitioned by it,
//! so one ingest is a single-partition transaction and the same schema runs distributed by
//! gateway on Citus or YugabyteDB. Every statement names its gateway as `$1` (a test below
//! reads each statement of this file and rejects one that does not); the two exceptions are
//! named: the migrations' own bookkeeping, and the operator's list of gateways.
//!
//! - `gateways(gw, verifier_key, token_sha256, enrolled_ms)`: enrolment; the token only as
//!   SHA-256.
//! - `logs(gw, machine, genesis, size, last_hash, right_edge, checkpoint, root, …)`: one row
//!   per log; `right_edge` is the tree's right edge (≤ 64 hashes, concatenated), all an
//!   append needs, so no per-row tree hashes are stored.
//! - `log_rows(gw, machine, seq, row)`: the rows, byte for byte as the gateway sent them.
//! - `log_checkpoints(gw, machine, size, root, note, at_ms)`: every checkpoint accepted.
//! - `log_tiles(gw, machine, level, idx, hashes)`: C2SP tlog-tiles of height 8. Full tiles
//!   are written once; the partial tile of each level is overwritten as it grows (it is what
//!   completes the next full tile without rereading rows, and what `.p/<W>` serves).
//! - `log_conflicts(gw, machine, seq, kind, digest, …)`: the signed evidence of each refused
//!   fork or tamper, once per distinct evidence (`times` counts repeats).
//!
//! # Ingest
//! [`HubStore::load`] reads the log's row, the stored rows the batch repeats and the partial
//! tiles in one repeatable-read snapshot; [`super::check::decide`] judges; [`HubStore::commit`]
//! inserts rows, checkpoint and tiles and ends with `UPDATE logs … WHERE gw = $1 AND machine =
//! $2 AND size = $old` (for a new log, an insert that does nothing if the row exists). Zero rows
//! updated means another hub got there first: the transaction rolls back and the hub re-reads
//! and re-checks. Rows and checkpoints are inserted with `ON CONFLICT DO NOTHING`, so a racing
//! insert waits for the other transaction and never stores a row twice.
//!
//! # Failover
//! `hub.database_url` may name every node of a failover group
//! (`postgres://…@db1:5432,db2:5432/smgate?target_session_attrs=read-write`): a new connection
//! tries the hosts in order and keeps the first that takes writes. When the primary dies, the
//! statements in flight fail (503, the gateway retries), the pool drops the closed connections
//! when it hands them out again, and the next ones find the promoted standby. A batch the hub
//! acknowledged is on the new primary when the standby was synchronous (`tests/hub_ha.rs`,
//! with pg_auto_failover).
//!
//! # Timeouts
//! Every round trip to the database is bounded on the client side by `hub.timeout_ms` (a
//! statement that does not answer is a [`Fault`]: 503 with Retry-After, the gateway retries),
//! the pool bounds its waits for a connection by the same, and each connection sets
//! `statement_timeout` and `idle_in_transaction_session_timeout` so the server lets go too. So
//! a database that stops answering never hangs a gateway.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;

use super::check::{self, Append, Evidence, Loaded, LogState, Tile};
use super::metrics::PoolState;
use super::{Conflict, Enrollment, Fault, HubError, HubStore, Stored};
use crate::config::HubConfig;
use crate::ledger::{tlog, Checkpoint, Hash};
use crate::sync::Batch;

/// Hash partitions per table.
const PARTITIONS: u32 = 16;

/// Versioned migrations, applied in order, each once, under an advisory lock (so hubs that
/// start together do not race). A migration is never edited once released; a change is a new
/// entry.
fn migrations() -> Vec<(i32, String)> {
    let tables = [
        "gateways (gw text NOT NULL, verifier_key text NOT NULL, token_sha256 text NOT NULL, \
         enrolled_ms bigint NOT NULL, PRIMARY KEY (gw))",
        "logs (gw text NOT NULL, machine text NOT NULL, genesis bigint NOT NULL, \
         size bigint NOT NULL, last_hash bytea NOT NULL, right_edge bytea NOT NULL, \
         checkpoint text NOT NULL, root bytea NOT NULL, head_size bigint NOT NULL, \
         last_ingest_ms bigint NOT NULL, last_row_ts_ms bigint NOT NULL, PRIMARY KEY (gw, machine))",
        "log_rows (gw text NOT NULL, machine text NOT NULL, seq bigint NOT NULL, \
         row bytea NOT NULL, PRIMARY KEY (gw, machine, seq))",
        "log_checkpoints (gw text NOT NULL, machine text NOT NULL, size bigint NOT NULL, \
         root bytea NOT NULL, note text NOT NULL, at_ms bigint NOT NULL, \
         PRIMARY KEY (gw, machine, size))",
        "log_tiles (gw text NOT NULL, machine text NOT NULL, level smallint NOT NULL, \
         idx bigint NOT NULL, hashes bytea NOT NULL, PRIMARY KEY (gw, machine, level, idx))",
        "log_conflicts (gw text NOT NULL, machine text NOT NULL, seq bigint NOT NULL, \
         kind text NOT NULL, digest bytea NOT NULL, message text NOT NULL, \
         stored_size bigint NOT NULL, checkpoint text NOT NULL, row bytea, stored_row bytea, \
         stored_checkpoint text NOT NULL, first_ms bigint NOT NULL, last_ms bigint NOT NULL, \
         times bigint NOT NULL, PRIMARY KEY (gw, machine, seq, kind, digest))",
    ];
    let mut v1 = String::new();
    for t in tables {
        let name = t.split_whitespace().next().unwrap_or_default();
        v1.push_str(&format!("CREATE TABLE {t} PARTITION BY HASH (gw);\n"));
        for r in 0..PARTITIONS {
            v1.push_str(&format!(
                "CREATE TABLE {name}_p{r} PARTITION OF {name} \
                 FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {r});\n"
            ));
        }
    }
    vec![(1, v1)]
}

// Migration bookkeeping: one small table outside the fleet's data, not keyed by gateway.
const SQL_SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS hub_schema \
     (version int PRIMARY KEY, applied_ms bigint NOT NULL)";
const SQL_SCHEMA_LOCK: &str = "SELECT pg_advisory_xact_lock(7424151)";
const SQL_SCHEMA_VERSIONS: &str = "SELECT version FROM hub_schema";
const SQL_SCHEMA_APPLIED: &str = "INSERT INTO hub_schema (version, applied_ms) VALUES ($1, $2)";

const SQL_ENROLLMENT: &str =
    "SELECT verifier_key, token_sha256, enrolled_ms FROM gateways WHERE gw = $1";
// The operator's list of every gateway: a scan of one small table, never on the ingest path.
const SQL_SCAN_GATEWAYS: &str = "SELECT gw, verifier_key, token_sha256, enrolled_ms \
     FROM gateways WHERE gw > $1 ORDER BY gw LIMIT $2";
const SQL_ENROLL: &str = "INSERT INTO gateways (gw, verifier_key, token_sha256, enrolled_ms) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (gw) DO UPDATE SET verifier_key = EXCLUDED.verifier_key, \
     token_sha256 = EXCLUDED.token_sha256, enrolled_ms = EXCLUDED.enrolled_ms";
const SQL_LOG: &str = "SELECT genesis, size, last_hash, right_edge, checkpoint, root, head_size, \
     last_ingest_ms, last_row_ts_ms FROM logs WHERE gw = $1 AND machine = $2";
const SQL_LOGS_OF_GATEWAY: &str = "SELECT machine, genesis, size, last_hash, checkpoint, root, \
     head_size, last_ingest_ms, last_row_ts_ms FROM logs WHERE gw = $1 AND machine > $2 \
     ORDER BY machine LIMIT $3";
const SQL_ONE_LOG: &str = "SELECT machine, genesis, size, last_hash, checkpoint, root, \
     head_size, last_ingest_ms, last_row_ts_ms FROM logs WHERE gw = $1 AND machine = $2";
/// A log's row as [`SQL_LOGS_OF_GATEWAY`] and [`SQL_ONE_LOG`] select it.
fn stored(gw: &str, r: &tokio_postgres::Row) -> Result<Stored, Fault> {
    let size = r.get::<_, i64>(2) as u64;
    Ok(Stored {
        gateway_id: gw.to_owned(),
        slug: r.get(0),
        genesis_zeqond: r.get::<_, i64>(1) as u64,
        size,
        last_hash: hash(r.get(3))?,
        checkpoint: r.get(4),
        checkpoint_size: size,
        root: hash(r.get(5))?,
        head_size: r.get::<_, i64>(6) as u64,
        last_ingest_ms: r.get(7),
        last_row_ts_ms: r.get(8),
    })
}

const SQL_TILE: &str = "SELECT substring(hashes FROM 1 FOR $5) FROM log_tiles \
     WHERE gw = $1 AND machine = $2 AND level = $3 AND idx = $4";
const SQL_ROWS: &str = "SELECT row FROM log_rows \
     WHERE gw = $1 AND machine = $2 AND seq >= $3 AND seq < $4 ORDER BY seq";
const SQL_ROW_HASHES: &str = "SELECT substring(row FROM octet_length(row) - 31) FROM log_rows \
     WHERE gw = $1 AND machine = $2 AND seq < $3 ORDER BY seq";
const SQL_CHECKPOINT_ROOT: &str =
    "SELECT root FROM log_checkpoints WHERE gw = $1 AND machine = $2 AND size = $3";
const SQL_TILES: &str = "SELECT t.level, t.idx, t.hashes FROM log_tiles t \
     JOIN unnest($3::int2[], $4::int8[]) AS w(level, idx) ON t.level = w.level AND t.idx = w.idx \
     WHERE t.gw = $1 AND t.machine = $2 ORDER BY t.level";
/// The batch's new rows, every one under the batch's gateway (`copy_rows`): a binary `COPY`,
/// the cheapest way into PostgreSQL (`cargo bench --bench hub` measures the difference).
const SQL_COPY_ROWS: &str = "COPY log_rows (gw, machine, seq, row) FROM STDIN (FORMAT binary)";
const SQL_INSERT_CHECKPOINT: &str =
    "INSERT INTO log_checkpoints (gw, machine, size, root, note, at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING";
// A partial tile only ever grows, and a full one never changes.
const SQL_UPSERT_TILES: &str = "INSERT INTO log_tiles (gw, machine, level, idx, hashes) \
     SELECT $1, $2, l, i, h FROM unnest($3::int2[], $4::int8[], $5::bytea[]) AS n(l, i, h) \
     ON CONFLICT (gw, machine, level, idx) DO UPDATE SET hashes = EXCLUDED.hashes \
     WHERE octet_length(EXCLUDED.hashes) > octet_length(log_tiles.hashes)";
const SQL_CREATE_LOG: &str = "INSERT INTO logs (gw, machine, genesis, size, last_hash, \
     right_edge, checkpoint, root, head_size, last_ingest_ms, last_row_ts_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING";
const SQL_ADVANCE_LOG: &str = "UPDATE logs SET size = $4, last_hash = $5, right_edge = $6, \
     checkpoint = $7, root = $8, head_size = $9, last_ingest_ms = $10, last_row_ts_ms = $11 \
     WHERE gw = $1 AND machine = $2 AND size = $3";
const SQL_CONFLICT: &str = "INSERT INTO log_conflicts (gw, machine, seq, kind, digest, message, \
     stored_size, checkpoint, row, stored_row, stored_checkpoint, first_ms, last_ms, times) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, 1) \
     ON CONFLICT (gw, machine, seq, kind, digest) \
     DO UPDATE SET last_ms = EXCLUDED.last_ms, times = log_conflicts.times + 1";
const SQL_CONFLICTS_OF_GATEWAY: &str = "SELECT machine, seq, kind, digest, message, \
     stored_size, checkpoint, row, stored_row, stored_checkpoint, first_ms, last_ms, times \
     FROM log_conflicts WHERE gw = $1 ORDER BY machine, seq, kind, digest OFFSET $2 LIMIT $3";
// `smgate hub import`: a conflict as another store kept it (its times and count), once.
const SQL_COPY_CONFLICT: &str = "INSERT INTO log_conflicts (gw, machine, seq, kind, digest, \
     message, stored_size, checkpoint, row, stored_row, stored_checkpoint, first_ms, last_ms, \
     times) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
     ON CONFLICT DO NOTHING";

/// Test hook `TEST_HUB_HOLD_BEFORE_COMMIT=<machine>`: a commit to that machine's log stops
/// after its inserts and compare-and-set, before `COMMIT`, and prints a line to stdout; it goes
/// on once the file `TEST_HUB_RELEASE_FILE` exists, or never when that is unset (so a test can
/// SIGKILL the hub there, or let another hub race it).
fn hold_before_commit(machine: &str) -> impl Future<Output = ()> {
    let hooked = std::env::var("TEST_HUB_HOLD_BEFORE_COMMIT").is_ok_and(|m| m == machine);
    async move {
        if !hooked {
            return;
        }
        println!("smgate hub: test hook: holding a commit before COMMIT");
        let Some(release) = std::env::var_os("TEST_HUB_RELEASE_FILE") else {
            return std::future::pending().await;
        };
        while !std::path::Path::new(&release).exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Bounds one round trip to the database: a statement that does not answer within the
/// timeout is a [`Fault`] (503, the gateway retries), whatever the server is doing.
trait Bounded<T> {
    fn bounded(self, t: Duration) -> impl Future<Output = Result<T, Fault>> + Send;
}

impl<T: Send, F: Future<Output = Result<T, tokio_postgres::Error>> + Send> Bounded<T> for F {
    async fn bounded(self, t: Duration) -> Result<T, Fault> {
        match tokio::time::timeout(t, self).await {
            Ok(r) => r.map_err(fault),
            Err(_) => Err(Fault(format!(
                "the hub database did not answer within {} ms; nothing was stored, retry",
                t.as_millis()
            ))),
        }
    }
}

fn fault(e: impl std::fmt::Display) -> Fault {
    Fault(format!("hub database: {e}"))
}

/// Writes `rows` as `log_rows` from `first` on, in one binary `COPY`. False when some of them
/// are there already: another hub's commit of the same batch got in first (its uncommitted
/// rows made this one wait, and their commit makes this a unique violation), so this
/// transaction lost the race, as its compare-and-set would have told.
async fn copy_rows(
    txn: &tokio_postgres::Transaction<'_>,
    gw: &str,
    m: &str,
    first: u64,
    rows: &[Vec<u8>],
) -> Result<bool, tokio_postgres::Error> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::error::SqlState;
    use tokio_postgres::types::Type;
    let sink = txn.copy_in(SQL_COPY_ROWS).await?;
    let types = [Type::TEXT, Type::TEXT, Type::INT8, Type::BYTEA];
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    for (i, row) in rows.iter().enumerate() {
        let seq = int(first + i as u64);
        writer.as_mut().write(&[&gw, &m, &seq, row]).await?;
    }
    match writer.finish().await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(false),
        Err(e) => Err(e),
    }
}

fn int(v: u64) -> i64 {
    v as i64
}

fn hash(bytes: &[u8]) -> Result<Hash, Fault> {
    bytes
        .try_into()
        .map_err(|_| Fault(format!("hub database: a hash of {} bytes", bytes.len())))
}

fn hashes(bytes: &[u8]) -> Result<Vec<Hash>, Fault> {
    if bytes.len() % 32 != 0 {
        return Err(Fault(format!(
            "hub database: hashes of {} bytes",
            bytes.len()
        )));
    }
    bytes.chunks_exact(32).map(hash).collect()
}

/// A pool of connections to the hub's database.
pub struct Pg {
    pool: Pool,
    timeout: Duration,
}

impl Pg {
    /// A pool for `config.database_url` (nothing is connected until first use).
    pub async fn connect(config: &HubConfig) -> Result<Pg, HubError> {
        let invalid =
            |e: &dyn std::fmt::Display| HubError::Invalid(format!("hub.database_url: {e}"));
        let mut pg: tokio_postgres::Config =
            config.database_url.parse().map_err(|e| invalid(&e))?;
        let ms = config.timeout_ms;
        let options = format!(
            "{} -c statement_timeout={ms} -c idle_in_transaction_session_timeout={}",
            pg.get_options().unwrap_or(""),
            ms.saturating_mul(4)
        );
        pg.options(options.trim());
        let timeout = Duration::from_millis(ms);
        pg.connect_timeout(timeout);
        pg.keepalives_idle(Duration::from_secs(10));
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &config.database_ca {
            None => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
            Some(ca) => Manager::from_config(pg, rustls_connector(ca)?, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| invalid(&e))?;
        Ok(Pg { pool, timeout })
    }

    /// Applies the migrations this binary knows that the database has not seen; returns the
    /// versions applied.
    pub async fn migrate(&self) -> Result<Vec<i32>, HubError> {
        let err = |e: &dyn std::fmt::Display| HubError::Store(format!("migration: {e}"));
        let mut client = self.pool.get().await.map_err(|e| err(&e))?;
        client
            .batch_execute(SQL_SCHEMA_TABLE)
            .await
            .map_err(|e| err(&e))?;
        let txn = client.transaction().await.map_err(|e| err(&e))?;
        txn.execute(SQL_SCHEMA_LOCK, &[])
            .await
            .map_err(|e| err(&e))?;
        let have: Vec<i32> = txn
            .query(SQL_SCHEMA_VERSIONS, &[])
            .await
            .map_err(|e| err(&e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut applied = Vec::new();
        for (version, sql) in migrations() {
            if have.contains(&version) {
                continue;
            }
            txn.batch_execute(&sql).await.map_err(|e| err(&e))?;
            txn.execute(SQL_SCHEMA_APPLIED, &[&version, &crate::clock::now_ms()])
                .await
                .map_err(|e| err(&e))?;
            applied.push(version);
        }
        txn.commit().await.map_err(|e| err(&e))?;
        Ok(applied)
    }

    /// Fails unless every migration this binary knows was applied (`smgate hub import`
    /// writes into an existing schema and never creates one).
    pub async fn require_schema(&self) -> Result<(), HubError> {
        let missing = |why: &str| {
            HubError::Invalid(format!(
                "the database at hub.database_url has no complete hub schema ({why}); run \
                 `smgate hub migrate` first"
            ))
        };
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| HubError::Store(e.to_string()))?;
        let have: Vec<i32> = match client.query(SQL_SCHEMA_VERSIONS, &[]).await {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                return Err(missing("no migration was applied"))
            }
            Err(e) => return Err(HubError::Store(e.to_string())),
        };
        match migrations().iter().find(|(v, _)| !have.contains(v)) {
            Some((v, _)) => Err(missing(&format!("migration {v} is missing"))),
            None => Ok(()),
        }
    }

    async fn within<T>(&self, work: impl Future<Output = Result<T, Fault>>) -> Result<T, Fault> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(Fault(format!(
                    "the hub database did not answer within {} ms",
                    self.timeout.as_millis()
                )))
            })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, Fault> {
        self.pool.get().await.map_err(fault)
    }

    async fn load_snapshot(
        &self,
        gw: &str,
        batch: &Batch,
        cp: &Checkpoint,
    ) -> Result<Loaded, Fault> {
        let t = self.timeout;
        let mut client = self.client().await?;
        let txn = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .bounded(t)
            .await?;
        let m = batch.machine.as_str();
        let Some(row) = txn.query_opt(SQL_LOG, &[&gw, &m]).bounded(t).await? else {
            return Ok(Loaded {
                state: None,
                overlap: Vec::new(),
                root_at_end: None,
                partial_tiles: Some(Vec::new()),
            });
        };
        let size = row.get::<_, i64>(1) as u64;
        let state = LogState {
            genesis_zeqond: row.get::<_, i64>(0) as u64,
            size,
            last_hash: hash(row.get(2))?,
            edge: tlog::RightEdge::from_hashes(size, hashes(row.get(3))?).map_err(fault)?,
            checkpoint: row.get(4),
            root: hash(row.get(5))?,
            head_size: row.get::<_, i64>(6) as u64,
            last_ingest_ms: row.get(7),
            last_row_ts_ms: row.get(8),
        };
        let range = check::overlap(batch, size);
        let overlap: Vec<Vec<u8>> = if range.is_empty() {
            Vec::new()
        } else {
            let (from, to) = (int(range.start), int(range.end));
            txn.query(SQL_ROWS, &[&gw, &m, &from, &to])
                .bounded(t)
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        let root_at_end = if cp.size < size {
            Some(root_at(&txn, gw, m, cp.size, t).await?)
        } else {
            None
        };
        let want = check::partial_tiles(size);
        let levels: Vec<i16> = want.iter().map(|t| i16::from(t.0)).collect();
        let idxs: Vec<i64> = want.iter().map(|t| int(t.1)).collect();
        let mut partial = Vec::with_capacity(want.len());
        for r in txn
            .query(SQL_TILES, &[&gw, &m, &levels, &idxs])
            .bounded(t)
            .await?
        {
            partial.push(Tile {
                level: r.get::<_, i16>(0) as u8,
                index: r.get::<_, i64>(1) as u64,
                hashes: hashes(r.get(2))?,
            });
        }
        txn.commit().bounded(t).await?;
        Ok(Loaded {
            state: Some(state),
            overlap,
            root_at_end,
            partial_tiles: Some(partial),
        })
    }

    async fn commit_append(&self, gw: &str, batch: &Batch, a: &Append) -> Result<bool, Fault> {
        let t = self.timeout;
        let mut client = self.client().await?;
        let txn = client.transaction().bounded(t).await?;
        let m = batch.machine.as_str();
        if !copy_rows(&txn, gw, m, a.old_size, &batch.rows[a.skip..])
            .bounded(t)
            .await?
        {
            txn.rollback().bounded(t).await?;
            return Ok(false);
        }
        let s = &a.state;
        let (size, now) = (int(s.size), s.last_ingest_ms);
        txn.execute(
            SQL_INSERT_CHECKPOINT,
            &[&gw, &m, &size, &s.root.as_slice(), &s.checkpoint, &now],
        )
        .bounded(t)
        .await?;
        if !a.tiles.is_empty() {
            let levels: Vec<i16> = a.tiles.iter().map(|t| i16::from(t.level)).collect();
            let idxs: Vec<i64> = a.tiles.iter().map(|t| int(t.index)).collect();
            let blobs: Vec<Vec<u8>> = a.tiles.iter().map(|t| t.hashes.concat()).collect();
            txn.execute(SQL_UPSERT_TILES, &[&gw, &m, &levels, &idxs, &blobs])
                .bounded(t)
                .await?;
        }
        let edge = s.edge.hashes().concat();
        let (genesis, head) = (int(s.genesis_zeqond), int(s.head_size));
        let (old, last, root) = (int(a.old_size), s.last_hash.as_slice(), s.root.as_slice());
        // A new log's row is inserted, knowing its genesis; a known log's row advances only
        // from the size that was checked.
        let (sql, third): (&str, &(dyn ToSql + Sync)) = match a.created {
            true => (SQL_CREATE_LOG, &genesis),
            false => (SQL_ADVANCE_LOG, &old),
        };
        let p: [&(dyn ToSql + Sync); 11] = [
            &gw,
            &m,
            third,
            &size,
            &last,
            &edge,
            &s.checkpoint,
            &root,
            &head,
            &now,
            &s.last_row_ts_ms,
        ];
        let won = txn.execute(sql, &p).bounded(t).await?;
        if won != 1 {
            txn.rollback().bounded(t).await?;
            return Ok(false);
        }
        hold_before_commit(m).await;
        txn.commit().bounded(t).await?;
        Ok(true)
    }

    /// Copies a conflict another store kept (`smgate hub import`); one already here is left
    /// as it is, so a second import changes nothing.
    pub async fn copy_conflict(&self, gw: &str, c: &Conflict) -> Result<(), Fault> {
        self.execute_conflict(SQL_COPY_CONFLICT, gw, c, true).await
    }

    /// Runs [`SQL_CONFLICT`] (`all`: false, its first 12 parameters) or [`SQL_COPY_CONFLICT`].
    async fn execute_conflict(
        &self,
        sql: &str,
        gw: &str,
        c: &Conflict,
        all: bool,
    ) -> Result<(), Fault> {
        let (seq, stored, times) = (
            int(c.evidence.at),
            int(c.evidence.stored_size),
            int(c.times),
        );
        let p: [&(dyn ToSql + Sync); 14] = [
            &gw,
            &c.machine,
            &seq,
            &c.evidence.kind,
            &c.digest.as_slice(),
            &c.evidence.message,
            &stored,
            &c.evidence.checkpoint,
            &c.evidence.row,
            &c.evidence.stored_row,
            &c.evidence.stored_checkpoint,
            &c.first_ms,
            &c.last_ms,
            &times,
        ];
        let params = if all { &p[..] } else { &p[..12] };
        self.within(async {
            let client = self.client().await?;
            client.execute(sql, params).await.map_err(fault)?;
            Ok(())
        })
        .await
    }
}

/// A conflict as [`SQL_CONFLICTS_OF_GATEWAY`] selects it.
fn conflict(r: &tokio_postgres::Row) -> Result<Conflict, Fault> {
    Ok(Conflict {
        machine: r.get(0),
        digest: hash(r.get(3))?,
        evidence: Evidence {
            at: r.get::<_, i64>(1) as u64,
            kind: r.get(2),
            message: r.get(4),
            stored_size: r.get::<_, i64>(5) as u64,
            checkpoint: r.get(6),
            row: r.get(7),
            stored_row: r.get(8),
            stored_checkpoint: r.get(9),
        },
        first_ms: r.get(10),
        last_ms: r.get(11),
        times: r.get::<_, i64>(12) as u64,
    })
}

/// The stored tree's root at `size`: from the checkpoint accepted at that size, else from the
/// row hashes (a batch repeating a prefix no checkpoint of the hub's ended at: rare).
async fn root_at(
    txn: &deadpool_postgres::Transaction<'_>,
    gw: &str,
    m: &str,
    size: u64,
    t: Duration,
) -> Result<Hash, Fault> {
    let n = int(size);
    if let Some(r) = txn
        .query_opt(SQL_CHECKPOINT_ROOT, &[&gw, &m, &n])
        .bounded(t)
        .await?
    {
        return hash(r.get(0));
    }
    let mut edge = tlog::RightEdge::empty();
    for r in txn.query(SQL_ROW_HASHES, &[&gw, &m, &n]).bounded(t).await? {
        edge.push(tlog::record_hash(&hash(r.get(0))?))
            .map_err(fault)?;
    }
    Ok(edge.root())
}

fn rustls_connector(
    ca: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, HubError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |e: &dyn std::fmt::Display| {
        HubError::Invalid(format!("hub.database_ca {}: {e}", ca.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl HubStore for Pg {
    async fn enrollment(&self, gateway_id: &str) -> Result<Option<Enrollment>, Fault> {
        self.within(async {
            let client = self.client().await?;
            let row = client
                .query_opt(SQL_ENROLLMENT, &[&gateway_id])
                .await
                .map_err(fault)?;
            Ok(row.map(|r| Enrollment {
                gateway_id: gateway_id.to_owned(),
                verifier_key: r.get(0),
                token_sha256: r.get(1),
                enrolled_ms: r.get(2),
            }))
        })
        .await
    }

    async fn enrollments(&self, after: &str, limit: usize) -> Result<Vec<Enrollment>, Fault> {
        let limit = limit as i64;
        self.within(async {
            let client = self.client().await?;
            let rows = client
                .query(SQL_SCAN_GATEWAYS, &[&after, &limit])
                .await
                .map_err(fault)?;
            Ok(rows
                .iter()
                .map(|r| Enrollment {
                    gateway_id: r.get(0),
                    verifier_key: r.get(1),
                    token_sha256: r.get(2),
                    enrolled_ms: r.get(3),
                })
                .collect())
        })
        .await
    }

    async fn enroll(&self, e: &Enrollment) -> Result<(), Fault> {
        self.within(async {
            let client = self.client().await?;
            client
                .execute(
                    SQL_ENROLL,
                    &[
                        &e.gateway_id,
                        &e.verifier_key,
                        &e.token_sha256,
                        &e.enrolled_ms,
                    ],
                )
                .await
                .map_err(fault)?;
            Ok(())
        })
        .await
    }

    async fn load(&self, gw: &str, batch: &Batch, cp: &Checkpoint) -> Result<Loaded, Fault> {
        self.load_snapshot(gw, batch, cp).await
    }

    async fn commit(&self, gw: &str, batch: &Batch, append: &Append) -> Result<bool, Fault> {
        // Each statement is bounded, not the whole: a large batch may take longer than one
        // round trip's limit, and the test hook holds a commit open between statements.
        self.commit_append(gw, batch, append).await
    }

    async fn record_conflict(&self, gw: &str, machine: &str, e: &Evidence) -> Result<(), Fault> {
        let c = Conflict::new(machine, e, crate::clock::now_ms());
        self.execute_conflict(SQL_CONFLICT, gw, &c, false).await
    }

    async fn machines(&self, gw: &str, after: &str, limit: usize) -> Result<Vec<Stored>, Fault> {
        let limit = limit as i64;
        self.within(async {
            let client = self.client().await?;
            let rows = client
                .query(SQL_LOGS_OF_GATEWAY, &[&gw, &after, &limit])
                .await
                .map_err(fault)?;
            rows.iter().map(|r| stored(gw, r)).collect()
        })
        .await
    }

    async fn conflicts(&self, gw: &str, offset: u64, limit: usize) -> Result<Vec<Conflict>, Fault> {
        let (offset, limit) = (int(offset), limit as i64);
        self.within(async {
            let client = self.client().await?;
            let rows = client
                .query(SQL_CONFLICTS_OF_GATEWAY, &[&gw, &offset, &limit])
                .await
                .map_err(fault)?;
            rows.iter().map(conflict).collect()
        })
        .await
    }

    fn pool_state(&self) -> Option<PoolState> {
        let s = self.pool.status();
        Some(PoolState {
            max_size: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        })
    }

    async fn log(&self, gw: &str, machine: &str) -> Result<Option<Stored>, Fault> {
        self.within(async {
            let client = self.client().await?;
            let Some(r) = client
                .query_opt(SQL_ONE_LOG, &[&gw, &machine])
                .await
                .map_err(fault)?
            else {
                return Ok(None);
            };
            stored(gw, &r).map(Some)
        })
        .await
    }

    async fn tile(
        &self,
        gw: &str,
        machine: &str,
        level: u8,
        index: u64,
        width: usize,
    ) -> Result<Option<Vec<u8>>, Fault> {
        let (level, index, bytes) = (i16::from(level), int(index), (width * 32) as i32);
        self.within(async {
            let client = self.client().await?;
            let row = client
                .query_opt(SQL_TILE, &[&gw, &machine, &level, &index, &bytes])
                .await
                .map_err(fault)?;
            Ok(row
                .map(|r| r.get::<_, Vec<u8>>(0))
                .filter(|h| h.len() == width * 32))
        })
        .await
    }

    async fn rows(&self, gw: &str, slug: &str, from: u64, to: u64) -> Result<Vec<Vec<u8>>, Fault> {
        self.within(async {
            let client = self.client().await?;
            let (from, to) = (int(from), int(to.max(from)));
            let rows = client
                .query(SQL_ROWS, &[&gw, &slug, &from, &to])
                .await
                .map_err(fault)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    /// Every statement of the hub names its gateway: a `SELECT`, `UPDATE` or `DELETE` has
    /// `gw = $1` in its `WHERE`, an `INSERT` writes `$1` into `gw`, a `COPY` writes `gw` first.
    /// That is what keeps each ingest inside one partition (one shard on Citus). The named
    /// exceptions: the migration bookkeeping (`SQL_SCHEMA_*`, not fleet data) and operator
    /// scans (`SQL_SCAN_*`).
    #[test]
    fn every_hub_statement_names_its_gateway() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/hub");
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap();
            for (name, sql) in statements(text) {
                checked += 1;
                let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ");
                if name.starts_with("SQL_SCHEMA_") || name.starts_with("SQL_SCAN_") {
                    continue;
                }
                let ok = if let Some(rest) = sql.strip_prefix("INSERT INTO ") {
                    let cols = rest.split_once('(').map(|(_, c)| c).unwrap_or("");
                    cols.starts_with("gw,")
                        && (sql.contains("VALUES ($1,") || sql.contains("SELECT $1,"))
                } else if let Some(rest) = sql.strip_prefix("COPY ") {
                    // Its rows carry the gateway first (`copy_rows` writes the batch's).
                    rest.split_once('(')
                        .is_some_and(|(_, c)| c.starts_with("gw,"))
                } else {
                    sql.split_once(" WHERE ").is_some_and(|(_, w)| {
                        w.starts_with("gw = $1") || w.starts_with("t.gw = $1")
                    })
                };
                assert!(
                    ok,
                    "{} {name} does not name its gateway as $1: {sql}",
                    path.display()
                );
            }
            // No SQL outside a named statement.
            for kw in ["\"SELECT ", "\"INSERT ", "\"UPDATE ", "\"DELETE "] {
                let consts = text.matches(&format!(": &str =\n    {kw}")).count()
                    + text.matches(&format!(": &str = {kw}")).count();
                assert_eq!(
                    text.matches(kw).count(),
                    consts,
                    "{}: SQL in a literal that is not an SQL_ const",
                    path.display()
                );
            }
        }
        assert!(checked >= 20, "found only {checked} statements");
    }

    /// `(name, text)` of every `const SQL_…: &str = "…";` in `source`.
    fn statements(source: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut rest = source;
        while let Some(i) = rest.find("const SQL_") {
            rest = &rest[i + 6..];
            let (name, after) = rest.split_once(':').unwrap();
            let open = after.find('"').unwrap();
            let body = &after[open + 1..];
            let close = body.find("\";").unwrap();
            let sql = body[..close].replace("\\\n", " ");
            out.push((name.to_string(), sql));
            rest = &body[close..];
        }
        out
    }
}
