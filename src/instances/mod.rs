//! Statechart versions and instances (specs 002/003): the glue between the pure engine in
//! `chart` and the store.
//!
//! A *version* is an immutable definition of one machine, compiled once and cached. An
//! *instance* holds an [`InstanceState`] (stored as JSON, since its context is JSON) plus its
//! version and status. A call loads the stored state once into the engine's working form
//! ([`LiveState`]), steps that (timers, then the event), and encodes it straight back to the
//! stored bytes. Every committed step writes the new state, a `transition` row in the
//! machine's log, a history record (kept in the instance row until a run of them moves out,
//! `history`), and the instance's next timer deadline, all in one write transaction; a step
//! that fails writes nothing.
//!
//! Timers are durable: `DUE` indexes each running instance with a timer by a time at or before
//! its earliest deadline, so the timer task (`timers.rs`) finds what is due with one range
//! read, also right after boot. The entry is a lower bound, not the deadline itself: a step
//! that moves the deadline later (every heartbeat restarts its watchdog) leaves the entry
//! alone, and when the entry comes up the timer pass moves it to the real deadline. A
//! heartbeat then costs no index update (a remove and an insert in a random leaf before), and
//! the pass moves each entry about once per timer period.

pub mod history;
pub mod timers;

pub use history::history;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::chart::{Chart, ChartError, ErrorKind, Event, InstanceState, LiveState, WriteKind};
use crate::ledger::log::{self as ledger_log, Entry, LogWriter};
use crate::ledger::{canonical, hex};
use crate::store::{self, StoreError};

/// (machine slug, version id) → [`Version`].
pub const VERSIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("chart_versions");
/// machine slug → [`ChartMeta`].
pub const CHARTS: TableDefinition<&str, &[u8]> = TableDefinition::new("chart_meta");
/// (machine slug, instance slug) → [`Instance`].
pub const INSTANCES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("instances");
/// (machine slug, instance slug, n) → [`TransitionRecord`]: records written before runs
/// ([`history`]); read and deleted, no longer written.
pub const HISTORY: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("instance_history");
/// (due ms, machine slug, instance slug) → () : each instance's earliest pending timer.
pub const DUE: TableDefinition<(i64, &str, &str), ()> = TableDefinition::new("instance_due");

/// All tables of this module, created at first open.
/// This module's tables, for [`store::StoreOptions::tables`].
pub const TABLES: store::Tables = store::Tables {
    create: create_tables,
    migrate: None,
};

pub fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(VERSIONS)?;
    txn.open_table(CHARTS)?;
    txn.open_table(INSTANCES)?;
    txn.open_table(HISTORY)?;
    txn.open_table(history::RUNS)?;
    txn.open_table(DUE)?;
    Ok(())
}

/// Largest definition accepted, in bytes of JSON.
pub const MAX_DEFINITION_BYTES: usize = 256 * 1024;
/// Largest context, in bytes of JSON (DESIGN: 400 KB).
pub const MAX_CONTEXT_BYTES: usize = 400 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the machine's authorizer rejected this {0}")]
    Rejected(&'static str),
    #[error("{0}")]
    MissingScope(String),
    #[error("{0}")]
    NoMigrationPath(String),
    #[error("{0}")]
    Chart(ChartError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl InstanceError {
    /// (HTTP status, statebacked code).
    pub fn status_code(&self) -> (u16, &'static str) {
        match self {
            InstanceError::Invalid { code, .. } => (400, code),
            InstanceError::NotFound(_) => (404, "not-found"),
            InstanceError::Conflict(_) => (409, "invalid-state"),
            InstanceError::Rejected(_) => (403, "rejected-by-machine-authorizer"),
            InstanceError::MissingScope(_) => (403, "missing-scope"),
            InstanceError::NoMigrationPath(_) => (400, "no-migration-path"),
            InstanceError::Chart(e) => match e.kind {
                ErrorKind::Definition => (400, "invalid-definition"),
                ErrorKind::Input => (400, "invalid-parameters"),
                ErrorKind::Runtime => (400, "transition-failed"),
            },
            InstanceError::Store(StoreError::Full(_)) => (507, "storage-full"),
            InstanceError::Store(StoreError::Corrupt(_) | StoreError::NewerSchema { .. }) => {
                (500, "internal")
            }
            InstanceError::Store(_) => (503, "unavailable"),
        }
    }
}

impl From<redb::TableError> for InstanceError {
    fn from(e: redb::TableError) -> Self {
        InstanceError::Store(e.into())
    }
}

impl From<redb::StorageError> for InstanceError {
    fn from(e: redb::StorageError) -> Self {
        InstanceError::Store(e.into())
    }
}

impl From<ChartError> for InstanceError {
    fn from(e: ChartError) -> Self {
        InstanceError::Chart(e)
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> InstanceError {
    InstanceError::Invalid {
        code,
        message: message.into(),
    }
}

/// An event must have a type. [`Steps::send_event`] checks it before looking the instance up
/// (so a request with neither gets this error), [`Prepared::step`] for the MQTT batches.
fn check_event_name(event: &Event) -> Result<(), InstanceError> {
    if event.name.is_empty() {
        return Err(invalid(
            "invalid-parameters",
            "event type must not be empty",
        ));
    }
    Ok(())
}

/// Instance and statebacked path slugs: `^[a-zA-Z0-9_-]{1,128}$`.
pub fn valid_instance_slug(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    pub id: String,
    pub machine: String,
    /// 1, 2, … in creation order.
    pub number: u64,
    pub client_info: Option<String>,
    pub definition: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChartMeta {
    pub current_version: Option<String>,
    pub versions: u64,
    /// Create unknown instances from the current version when MQTT messages name them.
    pub auto_create_instances: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Running,
    Paused,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub machine: String,
    pub slug: String,
    pub version_id: String,
    /// Version to move to on the next event (`PUT …/v`).
    pub target_version_id: Option<String>,
    pub status: Status,
    pub created_ms: i64,
    /// Time of the last committed step (the `ts` of the public view).
    pub ts_ms: i64,
    /// [`InstanceState`] as JSON.
    #[serde(with = "store::bytes")]
    pub state: Vec<u8>,
    pub next_due: Option<i64>,
    pub steps: u64,
    /// The newest transition records, stored after the row's postcard bytes
    /// ([`history::encode_instance`]).
    #[serde(skip)]
    pub recent: history::Recent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub ts_ms: i64,
    pub event: String,
    /// Event data as canonical JSON bytes.
    #[serde(with = "store::bytes")]
    pub data: Vec<u8>,
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub log_seq: u64,
    pub version_id: String,
}

/// Compiled charts by version id; versions are immutable, so entries never go stale.
#[derive(Default)]
pub struct Charts {
    cache: RwLock<HashMap<String, Arc<Chart>>>,
}

impl Charts {
    /// The compiled chart of `version`, compiling it on first use.
    pub fn get(&self, version: &Version) -> Result<Arc<Chart>, InstanceError> {
        if let Some(c) = self
            .cache
            .read()
            .ok()
            .and_then(|c| c.get(&version.id).cloned())
        {
            return Ok(c);
        }
        let chart = Arc::new(Chart::from_json_str(&version.definition)?);
        if let Ok(mut c) = self.cache.write() {
            c.insert(version.id.clone(), chart.clone());
        }
        Ok(chart)
    }

    /// The compiled chart of `machine`'s version `id`; the version (with its whole
    /// definition) is read and decoded only on a cache miss.
    fn load(
        &self,
        txn: &WriteTransaction,
        machine: &str,
        id: &str,
    ) -> Result<Arc<Chart>, InstanceError> {
        if let Some(c) = self.cache.read().ok().and_then(|c| c.get(id).cloned()) {
            return Ok(c);
        }
        self.get(&load_version(txn, machine, id)?)
    }
}

fn decode_state(bytes: &[u8]) -> Result<InstanceState, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("instance state: {e}")))
}

/// The stored bytes of `state` (the JSON of its [`InstanceState`]).
fn encode_state(chart: &Chart, state: &LiveState) -> Result<Vec<u8>, InstanceError> {
    // The engine already refuses steps that leave a larger context; this guards the store.
    let context_len = crate::chart::json_size(state.context());
    if context_len > MAX_CONTEXT_BYTES {
        return Err(invalid(
            "context-too-large",
            format!("context is {context_len} bytes; the limit is {MAX_CONTEXT_BYTES}"),
        ));
    }
    let mut bytes = Vec::new();
    chart.encode(state, &mut bytes);
    Ok(bytes)
}

/// Reads an instance row (with its history tail) through either kind of transaction.
macro_rules! get_instance {
    ($txn:expr, $machine:expr, $slug:expr) => {{
        (|| -> Result<Option<Instance>, StoreError> {
            let t = $txn.open_table(INSTANCES)?;
            let v = t.get(($machine, $slug))?;
            v.map(|g| history::decode_instance(g.value())).transpose()
        })()
    }};
}

/// Writes an instance row (with its history tail) outside a run of [`Steps`].
fn put_instance(txn: &WriteTransaction, instance: &Instance) -> Result<(), StoreError> {
    txn.open_table(INSTANCES)?.insert(
        (instance.machine.as_str(), instance.slug.as_str()),
        history::encode_instance(instance).as_slice(),
    )?;
    Ok(())
}

/// Reads through either a read or a write transaction.
macro_rules! get_in {
    ($txn:expr, $table:expr, $key:expr) => {{
        (|| -> Result<_, StoreError> {
            let t = $txn.open_table($table)?;
            let v = t.get($key)?;
            v.map(|g| store::decode(g.value())).transpose()
        })()
    }};
}

pub fn meta(txn: &ReadTransaction, machine: &str) -> Result<ChartMeta, StoreError> {
    Ok(get_in!(txn, CHARTS, machine)?.unwrap_or_default())
}

pub fn version(
    txn: &ReadTransaction,
    machine: &str,
    id: &str,
) -> Result<Option<Version>, StoreError> {
    get_in!(txn, VERSIONS, (machine, id))
}

/// Versions of `machine`, oldest first.
pub fn versions(txn: &ReadTransaction, machine: &str) -> Result<Vec<Version>, StoreError> {
    let t = txn.open_table(VERSIONS)?;
    let mut out: Vec<Version> = Vec::new();
    for e in t.range((machine, "")..)? {
        let (k, v) = e?;
        if k.value().0 != machine {
            break;
        }
        out.push(store::decode(v.value())?);
    }
    out.sort_by_key(|v| v.number);
    Ok(out)
}

pub fn instance(
    txn: &ReadTransaction,
    machine: &str,
    slug: &str,
) -> Result<Option<Instance>, StoreError> {
    get_instance!(txn, machine, slug)
}

/// Up to `limit` instances of `machine` after `cursor` (an instance slug), in slug order.
pub fn instances(
    txn: &ReadTransaction,
    machine: &str,
    cursor: Option<&str>,
    limit: usize,
) -> Result<Vec<Instance>, StoreError> {
    let t = txn.open_table(INSTANCES)?;
    let mut out = Vec::new();
    let start = cursor.unwrap_or("");
    for e in t.range((machine, start)..)? {
        let (k, v) = e?;
        let (m, s) = k.value();
        if m != machine {
            break;
        }
        if cursor.is_some() && s == start {
            continue;
        }
        out.push(history::decode_instance(v.value())?);
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}

/// Stores a new immutable version (its definition already compiled by the caller) and appends
/// a `version_created` row.
pub fn create_version(
    txn: &WriteTransaction,
    machine: &str,
    definition: &str,
    client_info: Option<String>,
    make_current: bool,
    actor: &str,
    now_ms: i64,
) -> Result<Version, InstanceError> {
    let mut meta: ChartMeta = get_in!(txn, CHARTS, machine)?.unwrap_or_default();
    let version = Version {
        id: format!("mv_{}", uuid::Uuid::new_v4().simple()),
        machine: machine.to_owned(),
        number: meta.versions + 1,
        client_info,
        definition: definition.to_owned(),
        created_ms: now_ms,
    };
    meta.versions += 1;
    if make_current || meta.current_version.is_none() {
        meta.current_version = Some(version.id.clone());
    }
    txn.open_table(VERSIONS)?.insert(
        (machine, version.id.as_str()),
        store::encode(&version).as_slice(),
    )?;
    txn.open_table(CHARTS)?
        .insert(machine, store::encode(&meta).as_slice())?;
    let definition_hash = hex::encode(&crate::auth::sha256(definition.as_bytes()));
    let payload = json!({
        "version_id": version.id, "number": version.number, "client_info": version.client_info,
        "definition_sha256": definition_hash, "current": meta.current_version.as_deref() == Some(version.id.as_str()),
    });
    ledger_log::append(
        txn,
        machine,
        Entry::json("version_created", actor, &payload),
        now_ms,
    )?;
    Ok(version)
}

/// Sets the MQTT auto-create flag of a machine.
pub fn set_auto_create(txn: &WriteTransaction, machine: &str, on: bool) -> Result<(), StoreError> {
    let mut meta: ChartMeta = get_in!(txn, CHARTS, machine)?.unwrap_or_default();
    meta.auto_create_instances = on;
    txn.open_table(CHARTS)?
        .insert(machine, store::encode(&meta).as_slice())?;
    Ok(())
}

/// The public view `{ts, state, publicContext, tags, done}` of a state.
pub fn public_view(chart: &Chart, state: &InstanceState, ts_ms: i64) -> Value {
    json!({
        "ts": ts_ms,
        "state": chart.state_value(state),
        "publicContext": chart.public_context(state),
        "tags": chart.tags(state),
        "done": state.done,
    })
}

/// [`public_view`] of a loaded state.
pub fn public_view_live(chart: &Chart, state: &LiveState, ts_ms: i64) -> Value {
    json!({
        "ts": ts_ms,
        "state": chart.live_value(state),
        "publicContext": state.context().get("public").cloned().unwrap_or_else(|| json!({})),
        "tags": chart.live_tags(state),
        "done": state.done(),
    })
}

/// What a caller passes to authorizers as `auth`.
pub type Auth = Value;

/// Creates an instance at its initial state (after the initial macrostep).
#[allow(clippy::too_many_arguments)]
pub fn create_instance(
    txn: &WriteTransaction,
    charts: &Charts,
    machine: &str,
    slug: &str,
    context: Value,
    version_id: Option<&str>,
    auth: &Auth,
    actor: &str,
    now_ms: i64,
) -> Result<(Instance, Value, Vec<crate::chart::Effect>), InstanceError> {
    let mut steps = Steps::open(txn)?;
    let created = steps.create_instance(
        charts, machine, slug, context, version_id, auth, actor, now_ms,
    )?;
    steps.finish()?;
    Ok(created)
}

/// The definition's `context` merged under the caller's: statebacked's "initial context".
fn chart_default_context(_chart: &Chart, given: Value) -> Value {
    match given {
        Value::Null => json!({}),
        other => other,
    }
}

/// What sending an event did.
pub struct Sent {
    pub view: Value,
    pub effects: Vec<crate::chart::Effect>,
    pub instance: Instance,
}

type InstancesTable<'txn> = Table<'txn, (&'static str, &'static str), &'static [u8]>;

/// The tables that steps write, opened once for a run of steps in one write transaction (an
/// MQTT batch, a timer pass) rather than once per step: a step then costs its inserts, not
/// eight table opens and closes, and the log writer keeps each machine's head and tree edge
/// in memory from one step to the next. While it is open, these tables must be reached
/// through it (redb refuses to open a table twice); [`Steps::finish`] writes the log heads.
pub struct Steps<'txn> {
    txn: &'txn WriteTransaction,
    instances: InstancesTable<'txn>,
    runs: Table<'txn, (&'static str, &'static str, u64), &'static [u8]>,
    due: Table<'txn, (i64, &'static str, &'static str), ()>,
    log: LogWriter<'txn>,
    /// History runs to insert at [`Steps::write_deferred`], when deferred.
    deferred_runs: Option<Vec<DeferredRun>>,
}

/// A history run waiting for [`Steps::write_deferred`]: its key in [`history::RUNS`] and bytes.
type DeferredRun = ((String, String, u64), Vec<u8>);

impl<'txn> Steps<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Steps<'txn>, StoreError> {
        Ok(Steps {
            txn,
            instances: txn.open_table(INSTANCES)?,
            runs: txn.open_table(history::RUNS)?,
            due: txn.open_table(DUE)?,
            log: LogWriter::open(txn)?,
            deferred_runs: None,
        })
    }

    /// From now on, history runs are held until [`Steps::write_deferred`], which inserts
    /// them in key order: the runs of a batch's steps belong to instances in no order, and
    /// inserted as they fill, each landed on a leaf of its own, read and copied once per run.
    /// Nothing may read a stepped instance's history before that.
    pub fn defer_runs(&mut self) {
        self.deferred_runs.get_or_insert_with(Vec::new);
    }

    /// Inserts the history runs held since [`Steps::defer_runs`], in key order.
    pub fn write_deferred(&mut self) -> Result<(), StoreError> {
        let Some(runs) = &mut self.deferred_runs else {
            return Ok(());
        };
        runs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for ((machine, slug, first), run) in runs.drain(..) {
            self.runs
                .insert((machine.as_str(), slug.as_str(), first), run.as_slice())?;
        }
        Ok(())
    }

    /// Writes the deferred history runs and the log heads; call it before the transaction
    /// commits.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.write_deferred()?;
        self.log.finish()
    }

    pub fn instance(&self, machine: &str, slug: &str) -> Result<Option<Instance>, StoreError> {
        self.instances
            .get((machine, slug))?
            .map(|v| history::decode_instance(v.value()))
            .transpose()
    }

    /// Writes an instance row; for the rows [`Steps::record_unwritten`] left to the caller.
    pub fn put(&mut self, instance: &Instance) -> Result<(), StoreError> {
        self.instances.insert(
            (instance.machine.as_str(), instance.slug.as_str()),
            history::encode_instance(instance).as_slice(),
        )?;
        Ok(())
    }

    /// [`create_instance`] within this run of steps.
    #[allow(clippy::too_many_arguments)]
    pub fn create_instance(
        &mut self,
        charts: &Charts,
        machine: &str,
        slug: &str,
        context: Value,
        version_id: Option<&str>,
        auth: &Auth,
        actor: &str,
        now_ms: i64,
    ) -> Result<(Instance, Value, Vec<crate::chart::Effect>), InstanceError> {
        if self.instances.get((machine, slug))?.is_some() {
            return Err(InstanceError::Conflict(format!(
                "instance `{slug}` already exists"
            )));
        }
        let txn = self.txn;
        let meta: ChartMeta = get_in!(txn, CHARTS, machine)?.unwrap_or_default();
        let version_id = match version_id {
            Some(v) => v.to_owned(),
            None => meta.current_version.ok_or_else(|| {
                InstanceError::NotFound(
                    "this machine has no current version; POST /machines/{machineSlug}/v first"
                        .into(),
                )
            })?,
        };
        let version: Version =
            get_in!(txn, VERSIONS, (machine, version_id.as_str()))?.ok_or_else(|| {
                InstanceError::NotFound(format!("no version `{version_id}` on this machine"))
            })?;
        let chart = charts.get(&version)?;
        let mut initial_context = chart_default_context(&chart, context);
        if !chart.allow_write(WriteKind::Initialization, None, &initial_context, auth)? {
            return Err(InstanceError::Rejected("initialization"));
        }
        let (state, stepped) =
            chart.initial_live(std::mem::take(&mut initial_context), auth, now_ms)?;
        let state_bytes = encode_state(&chart, &state)?;
        let mut instance = Instance {
            machine: machine.to_owned(),
            slug: slug.to_owned(),
            version_id: version.id.clone(),
            target_version_id: None,
            status: Status::Running,
            created_ms: now_ms,
            ts_ms: now_ms,
            state: state_bytes,
            next_due: None,
            steps: 0,
            recent: Default::default(),
        };
        let event = Event::new("xstate.init", Value::Null);
        self.commit_step(
            &chart,
            &mut instance,
            Vec::new(),
            &state,
            &event,
            actor,
            "instance_created",
            now_ms,
        )?;
        Ok((
            instance,
            public_view_live(&chart, &state, now_ms),
            stepped.effects,
        ))
    }

    /// [`send_event`] within this run of steps.
    #[allow(clippy::too_many_arguments)]
    pub fn send_event(
        &mut self,
        charts: &Charts,
        machine: &str,
        slug: &str,
        event: Event,
        auth: &Auth,
        actor: &str,
        now_ms: i64,
    ) -> Result<Sent, InstanceError> {
        check_event_name(&event)?;
        let mut instance = self
            .instance(machine, slug)?
            .ok_or_else(|| InstanceError::NotFound(format!("no instance `{slug}`")))?;
        let mut prepared = self.prepare(charts, &instance)?;
        let step = prepared.step(event, auth, actor, now_ms)?;
        let (view, effects) = self.record(&mut instance, step, now_ms)?;
        Ok(Sent {
            view,
            effects,
            instance,
        })
    }

    /// What stepping `instance` needs from the tables (its charts), for [`Prepared::step`].
    pub fn prepare(&self, charts: &Charts, instance: &Instance) -> Result<Prepared, InstanceError> {
        let machine = instance.machine.as_str();
        if instance.status == Status::Paused {
            return Ok(Prepared::paused());
        }
        let chart = charts.load(self.txn, machine, &instance.version_id)?;
        let target = match &instance.target_version_id {
            Some(t) => Some((t.clone(), charts.load(self.txn, machine, t)?)),
            None => None,
        };
        Ok(Prepared {
            slug: instance.slug.clone(),
            chart: Some(chart),
            version_id: instance.version_id.clone(),
            target,
            state: instance.state.clone(),
        })
    }

    /// Writes a step that [`Prepared::step`] computed for `instance` (which must be the
    /// instance as the previous recorded step of the same [`Prepared`] left it); returns its
    /// public view and effects.
    pub fn record(
        &mut self,
        instance: &mut Instance,
        step: Step,
        now_ms: i64,
    ) -> Result<(Value, Vec<crate::chart::Effect>), InstanceError> {
        let recorded = self.record_unwritten(instance, step, now_ms)?;
        self.put(instance)?;
        Ok(recorded)
    }

    /// [`Steps::record`] without writing the instance row: the caller writes it with
    /// [`Steps::put`] before anything else reads it (a batch writes each instance's row once,
    /// after its last step, and the rows of a batch in key order).
    pub fn record_unwritten(
        &mut self,
        instance: &mut Instance,
        step: Step,
        now_ms: i64,
    ) -> Result<(Value, Vec<crate::chart::Effect>), InstanceError> {
        if let Some(v) = step.upgraded_to {
            instance.version_id = v;
            instance.target_version_id = None;
        }
        self.write_step(instance, step.done, now_ms)?;
        Ok((step.view, step.effects))
    }

    /// Fires every timer due at `now_ms` for one instance. `None` if the instance is gone,
    /// paused, or has nothing due.
    pub fn fire_due(
        &mut self,
        charts: &Charts,
        machine: &str,
        slug: &str,
        now_ms: i64,
    ) -> Result<Option<Sent>, InstanceError> {
        let Some(mut instance) = self.instance(machine, slug)? else {
            return Ok(None);
        };
        if instance.status == Status::Paused {
            return Ok(None);
        }
        let stored = decode_state(&instance.state)?;
        let chart = charts.load(self.txn, machine, &instance.version_id)?;
        if !chart.next_due(&stored).is_some_and(|d| d <= now_ms) {
            return Ok(None);
        }
        let mut state = chart.load(&stored)?;
        let from = chart.live_configuration(&state);
        let stepped = chart.advance_live(&mut state, now_ms)?;
        let event = Event::new("xstate.after", Value::Null);
        self.commit_step(
            &chart,
            &mut instance,
            from,
            &state,
            &event,
            "timer",
            "transition",
            now_ms,
        )?;
        Ok(Some(Sent {
            view: public_view_live(&chart, &state, now_ms),
            effects: stepped.effects,
            instance,
        }))
    }

    /// Takes an instance whose timers fail out of the due index, so one broken timer cannot
    /// stall the others. Its state is unchanged; the next event retries the timers.
    pub fn park_timers(&mut self, machine: &str, slug: &str) -> Result<(), StoreError> {
        if let Some(mut instance) = self.instance(machine, slug)? {
            if let Some(d) = instance.next_due.take() {
                self.due.remove((d, machine, slug))?;
            }
            self.put(&instance)?;
        }
        Ok(())
    }

    /// The deadline of the earliest timer of a running instance (None when it is gone,
    /// paused, or has no timer).
    pub fn next_due(&self, machine: &str, slug: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .instance(machine, slug)?
            .filter(|i| i.status == Status::Running)
            .and_then(|i| i.next_due))
    }

    /// Brings the due-index entry `(due_ms, machine, slug)` in line with its instance: kept
    /// when it is the deadline, moved to the deadline when that differs, dropped when the
    /// instance is gone, paused or has no timer.
    pub fn reindex_due(
        &mut self,
        due_ms: i64,
        machine: &str,
        slug: &str,
    ) -> Result<(), StoreError> {
        let want = self.next_due(machine, slug)?;
        self.move_due(due_ms, machine, slug, want)
    }

    /// [`Steps::reindex_due`] for a caller that has just read the instance's
    /// [`Steps::next_due`] (`want`).
    fn move_due(
        &mut self,
        due_ms: i64,
        machine: &str,
        slug: &str,
        want: Option<i64>,
    ) -> Result<(), StoreError> {
        if want != Some(due_ms) {
            self.due.remove((due_ms, machine, slug))?;
            if let Some(d) = want {
                self.due.insert((d, machine, slug), ())?;
            }
        }
        Ok(())
    }

    /// Writes a step: instance state, due index, history record, and the log row.
    #[allow(clippy::too_many_arguments)]
    fn commit_step(
        &mut self,
        chart: &Chart,
        instance: &mut Instance,
        from_cfg: Vec<String>,
        to: &LiveState,
        event: &Event,
        actor: &str,
        kind: &'static str,
        now_ms: i64,
    ) -> Result<(), InstanceError> {
        let done = Done::new(
            chart,
            &instance.slug,
            &instance.version_id,
            from_cfg,
            to,
            (&event.name, canonical::to_vec(&event.data)),
            (actor, kind),
            now_ms,
        )?;
        self.write_step(instance, done, now_ms)?;
        self.put(instance)?;
        Ok(())
    }

    /// Writes the rows of a [`Done`] step but the instance's own, and advances `instance` to
    /// it.
    fn write_step(
        &mut self,
        instance: &mut Instance,
        done: Done,
        now_ms: i64,
    ) -> Result<(), InstanceError> {
        let Done {
            entry,
            mut record,
            state,
            next_due,
        } = done;
        let row = self.log.append(&instance.machine, entry, now_ms)?;
        let (machine, slug) = (instance.machine.as_str(), instance.slug.as_str());
        match (instance.next_due, next_due) {
            // The entry at or before `old` bounds the later deadline too (module doc).
            (Some(old), Some(new)) if new >= old => {}
            (old, new) => {
                if let Some(old) = old {
                    self.due.remove((old, machine, slug))?;
                }
                if let Some(new) = new {
                    self.due.insert((new, machine, slug), ())?;
                }
            }
        }
        record.log_seq = row.seq;
        if let Some((first, run)) = history::record(instance, &record)? {
            let (machine, slug) = (instance.machine.as_str(), instance.slug.as_str());
            match &mut self.deferred_runs {
                Some(runs) => runs.push(((machine.to_owned(), slug.to_owned(), first), run)),
                None => {
                    self.runs.insert((machine, slug, first), run.as_slice())?;
                }
            }
        }
        instance.next_due = next_due;
        instance.steps += 1;
        instance.state = state;
        instance.ts_ms = now_ms;
        Ok(())
    }
}

/// A step as it is written: the log entry, the history record (its log position still to be
/// filled in), the stored state and the next deadline. Everything in it is computed without a
/// table, so it can be built on any thread.
struct Done {
    entry: Entry,
    record: TransitionRecord,
    state: Vec<u8>,
    next_due: Option<i64>,
}

impl Done {
    /// `event` is the name and the canonical JSON data of the event applied; `by` is (actor,
    /// log row kind).
    #[allow(clippy::too_many_arguments)]
    fn new(
        chart: &Chart,
        slug: &str,
        version_id: &str,
        from_cfg: Vec<String>,
        to: &LiveState,
        event: (&str, Vec<u8>),
        by: (&str, &'static str),
        now_ms: i64,
    ) -> Result<Done, InstanceError> {
        let state = encode_state(chart, to)?;
        let (name, data) = event;
        let to_cfg = chart.live_configuration(to);
        let payload = json!({
            "instance": slug,
            "event": name,
            "payload_hash": hex::encode(&crate::auth::sha256(&data)),
            "from": from_cfg,
            "to": to_cfg,
            "version_id": version_id,
        });
        Ok(Done {
            entry: Entry::json(by.1, by.0, &payload),
            record: TransitionRecord {
                ts_ms: now_ms,
                event: name.to_owned(),
                data,
                from: from_cfg,
                to: to_cfg,
                log_seq: 0,
                version_id: version_id.to_owned(),
            },
            state,
            next_due: to.next_due(),
        })
    }
}

/// What stepping one instance reads, taken from the tables by [`Steps::prepare`]: a run of
/// events on one instance is stepped in memory, without reading its row again
/// ([`Steps::record_unwritten`] writes everything but the row). Each successful step advances
/// it, so each event is stepped from the state the last one left.
pub struct Prepared {
    slug: String,
    /// None for a paused instance: every event is refused.
    chart: Option<Arc<Chart>>,
    version_id: String,
    /// The pending upgrade: version id and its chart.
    target: Option<(String, Arc<Chart>)>,
    /// The stored state (JSON).
    state: Vec<u8>,
}

/// One event's step computed by [`Prepared::step`], for [`Steps::record`].
pub struct Step {
    /// The version the instance moved to before the event (a pending upgrade).
    upgraded_to: Option<String>,
    done: Done,
    view: Value,
    effects: Vec<crate::chart::Effect>,
}

impl Prepared {
    fn paused() -> Prepared {
        Prepared {
            slug: String::new(),
            chart: None,
            version_id: String::new(),
            target: None,
            state: Vec::new(),
        }
    }

    /// Steps `event`: timers that came due before it fire first, a pending upgrade is made,
    /// `allowWrite` is asked, and the event is sent. A failed step leaves `self` as it was.
    pub fn step(
        &mut self,
        event: Event,
        auth: &Auth,
        actor: &str,
        now_ms: i64,
    ) -> Result<Step, InstanceError> {
        check_event_name(&event)?;
        let Some(current) = &self.chart else {
            return Err(InstanceError::Conflict(
                "the instance is paused; PUT its status to running first".into(),
            ));
        };
        let mut chart = current.clone();
        let stored = decode_state(&self.state)?;
        let mut state = chart.load(&stored)?;
        let from = chart.live_configuration(&state);
        // Timers that came due before this event fire first, in due order.
        if state.next_due().is_some_and(|d| d <= now_ms) {
            chart.advance_live(&mut state, now_ms)?;
        }
        if let Some((_, next)) = &self.target {
            state = next
                .load(&chart.store(&state))
                .map_err(|e| InstanceError::NoMigrationPath(e.message))?;
            chart = next.clone();
        }
        if !chart.allow_write(WriteKind::Event, Some(&event), state.context(), auth)? {
            return Err(InstanceError::Rejected("event"));
        }
        let data = canonical::to_vec(&event.data);
        let name = event.name.clone();
        let stepped = chart.send_live(&mut state, event, auth, now_ms)?;
        let version_id = match &self.target {
            Some((id, _)) => id.as_str(),
            None => self.version_id.as_str(),
        };
        let done = Done::new(
            &chart,
            &self.slug,
            version_id,
            from,
            &state,
            (&name, data),
            (actor, "transition"),
            now_ms,
        )?;
        let view = public_view_live(&chart, &state, now_ms);
        // The step succeeded: the next one starts where it ended.
        self.state.clone_from(&done.state);
        let upgraded_to = self.target.take().map(|(id, next)| {
            self.chart = Some(next);
            self.version_id.clone_from(&id);
            id
        });
        Ok(Step {
            upgraded_to,
            done,
            view,
            effects: stepped.effects,
        })
    }
}

/// Sends one event to an instance: fires due timers first, upgrades the version if one is
/// pending, checks `allowWrite`, runs the step, and commits it.
#[allow(clippy::too_many_arguments)]
pub fn send_event(
    txn: &WriteTransaction,
    charts: &Charts,
    machine: &str,
    slug: &str,
    event: Event,
    auth: &Auth,
    actor: &str,
    now_ms: i64,
) -> Result<Sent, InstanceError> {
    let mut steps = Steps::open(txn)?;
    let sent = steps.send_event(charts, machine, slug, event, auth, actor, now_ms)?;
    steps.finish()?;
    Ok(sent)
}

fn load_version(txn: &WriteTransaction, machine: &str, id: &str) -> Result<Version, InstanceError> {
    get_in!(txn, VERSIONS, (machine, id))?
        .ok_or_else(|| StoreError::Corrupt(format!("version {id} of {machine} is missing")).into())
}

/// Pauses or resumes an instance.
pub fn set_status(
    txn: &WriteTransaction,
    machine: &str,
    slug: &str,
    status: Status,
) -> Result<Instance, InstanceError> {
    let mut instance: Instance = get_instance!(txn, machine, slug)?
        .ok_or_else(|| InstanceError::NotFound(format!("no instance `{slug}`")))?;
    if instance.status != status {
        // Paused instances keep their timers but leave the due index, so the timer task
        // never spins on them; resuming puts them back (overdue ones fire at once).
        if let Some(d) = instance.next_due {
            let mut due = txn.open_table(DUE)?;
            match status {
                Status::Paused => due.remove((d, machine, slug))?,
                Status::Running => due.insert((d, machine, slug), ())?,
            };
        }
    }
    instance.status = status;
    put_instance(txn, &instance)?;
    Ok(instance)
}

/// Schedules an upgrade to `target` on the next event, if the current state exists there.
pub fn set_target_version(
    txn: &WriteTransaction,
    charts: &Charts,
    machine: &str,
    slug: &str,
    target: &str,
) -> Result<Instance, InstanceError> {
    let mut instance: Instance = get_instance!(txn, machine, slug)?
        .ok_or_else(|| InstanceError::NotFound(format!("no instance `{slug}`")))?;
    let version: Version = get_in!(txn, VERSIONS, (machine, target))?
        .ok_or_else(|| InstanceError::NotFound(format!("no version `{target}` on this machine")))?;
    let chart = charts.get(&version)?;
    let state = decode_state(&instance.state)?;
    chart.check_state(&state).map_err(|e| {
        InstanceError::NoMigrationPath(format!(
            "the instance's current state does not exist in {target}: {}",
            e.message
        ))
    })?;
    instance.target_version_id = Some(target.to_owned());
    put_instance(txn, &instance)?;
    Ok(instance)
}

/// Deletes an instance, its history and its timer entry, and logs `instance_deleted`.
pub fn delete_instance(
    txn: &WriteTransaction,
    machine: &str,
    slug: &str,
    actor: &str,
    now_ms: i64,
) -> Result<(), InstanceError> {
    let instance: Instance = get_instance!(txn, machine, slug)?
        .ok_or_else(|| InstanceError::NotFound(format!("no instance `{slug}`")))?;
    if let Some(d) = instance.next_due {
        txn.open_table(DUE)?.remove((d, machine, slug))?;
    }
    history::delete(txn, machine, slug)?;
    txn.open_table(INSTANCES)?.remove((machine, slug))?;
    ledger_log::append(
        txn,
        machine,
        Entry::json("instance_deleted", actor, &json!({"instance": slug})),
        now_ms,
    )?;
    Ok(())
}

/// The earliest (due, machine, instance) entries at or before `now_ms`, at most `limit`.
pub fn due(
    txn: &ReadTransaction,
    now_ms: i64,
    limit: usize,
) -> Result<Vec<(i64, String, String)>, StoreError> {
    let t = txn.open_table(DUE)?;
    let mut out = Vec::new();
    for e in t.range((i64::MIN, "", "")..)? {
        let (k, _) = e?;
        let (d, m, s) = k.value();
        if d > now_ms || out.len() == limit {
            break;
        }
        out.push((d, m.to_owned(), s.to_owned()));
    }
    Ok(out)
}

/// How many timers are pending, over all instances (0 before the first timer table exists).
pub fn pending_timers(txn: &ReadTransaction) -> Result<u64, StoreError> {
    use redb::ReadableTableMetadata;
    match txn.open_table(DUE) {
        Ok(t) => Ok(t.len()?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The earliest pending timer of any instance.
pub fn earliest_due(txn: &ReadTransaction) -> Result<Option<i64>, StoreError> {
    let t = txn.open_table(DUE)?;
    let first = t.first()?;
    Ok(first.map(|(k, _)| k.value().0))
}

/// Public views of every instance of `machine` (for published pages): publicContext only.
pub fn public_states(
    txn: &ReadTransaction,
    charts: &Charts,
    machine: &str,
) -> Result<Vec<Value>, InstanceError> {
    let mut out = Vec::new();
    for inst in instances(txn, machine, None, 10_000)? {
        let version = version(txn, machine, &inst.version_id)?
            .ok_or_else(|| StoreError::Corrupt("version missing".into()))?;
        let chart = charts.get(&version)?;
        let state = decode_state(&inst.state)?;
        let mut view = public_view(&chart, &state, inst.ts_ms);
        if let Value::Object(o) = &mut view {
            o.insert("instance".into(), json!(inst.slug));
        }
        out.push(view);
    }
    Ok(out)
}
