//! Agent runs and the tally (spec 004): spawn, ticks, kill, the wallet, the ticker.
//!
//! A run is a deterministic evolutionary search ([`search`]) over chains of [`catalog`]
//! operators, answering a [`problem`] statement. It lives on one machine's chain: every
//! spawn, tick, kill and charge appends a row to that machine's log (`agent_spawned`,
//! `agent_tick`, `agent_killed`, `tally_charge`).
//!
//! # The chain a run lives on
//! A spawn may name `slug`, a machine where the caller is admin or owner. Without it, an
//! account's runs live on its own machine, the one whose slug is its lowercased ZID; that
//! machine is created (through [`machines::create`], so its log starts with `machine_created`)
//! in the same transaction as the first spawn that needs it. Its spin-up key is minted as for
//! any machine but not shown; the owner mints keys with `smgate key mint` when needed. If that
//! slug belongs to another account, the spawn is 403 `not_chain_member`: name a slug. A
//! machine key's runs default to its own machine.
//!
//! # The wallet
//! Balances are integer ZEQ on the account ([`crate::auth::Account::balance`]). The payer of a
//! run is the calling account, or the machine's owner when an admin machine key spawns. A
//! spawn costs 75 (60 burned, 15 to the foundation) and every tick 5 (4 / 1); the totals
//! burned and given to the foundation are kept in `META`. A spawn needs 75; when the balance
//! also covers the first tick, that tick runs in the same transaction (charged 80 in all),
//! otherwise the run starts without it. A tick the payer cannot afford writes nothing: the
//! ticker skips the run until the balance is topped up (`smgate account credit`), and `POST
//! tick` answers 402. Each charge, the work it pays for and their rows commit in one
//! transaction, so a refused request changes nothing.
//!
//! # Ticks and Zeqonds
//! A run ticks at most once per Zeqond: the Zeqond of its last tick is stored with it and the
//! write transaction refuses a second tick for the same Zeqond, whoever asks (the ticker or
//! `POST tick`). The ticker ([`ticker`]) ticks every live run once per Zeqond after the
//! synchronous first tick, and resumes the live runs after a restart.

pub mod byok;
pub mod catalog;
pub mod detmath;
pub mod problem;
pub mod search;
pub mod ticker;

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{Access, Account, Principal, Slug, Zid};
use crate::clock;
use crate::ledger::log::{self as ledger_log, Entry};
use crate::machines::{self, Machine, MachineError, NewMachine};
use crate::store::{self, StoreError, ACCOUNTS, META};

pub use byok::Agents;
use problem::Problem;
use search::{Generation, SearchState};

/// run id → [`Run`].
pub const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_runs");
/// (run id, generation) → [`Generation`].
pub const LINEAGE: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("agent_lineage");
/// (payer ZID, run id) → () : the live runs (what the ticker ticks and the quota counts).
pub const LIVE: TableDefinition<(&str, &str), ()> = TableDefinition::new("agent_live");
/// (payer ZID, run id) → () : every run an account paid for.
pub const BY_ACCOUNT: TableDefinition<(&str, &str), ()> = TableDefinition::new("agent_by_account");
/// (machine slug, run id) → () : every run on a machine.
pub const BY_MACHINE: TableDefinition<(&str, &str), ()> = TableDefinition::new("agent_by_machine");
/// (master run id, child run id) → () : mesh membership.
pub const MESH: TableDefinition<(&str, &str), ()> = TableDefinition::new("agent_mesh");
/// credential id → [`byok::Credential`] (sealed).
pub const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_credentials");

/// All tables of this module, created at first open.
/// This module's tables, for [`store::StoreOptions::tables`].
pub const TABLES: store::Tables = store::Tables {
    create: create_tables,
    migrate: None,
};

pub fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(RUNS)?;
    txn.open_table(LINEAGE)?;
    txn.open_table(LIVE)?;
    txn.open_table(BY_ACCOUNT)?;
    txn.open_table(BY_MACHINE)?;
    txn.open_table(MESH)?;
    txn.open_table(CREDENTIALS)?;
    Ok(())
}

/// `[agents]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// Live (running) agent runs one account may have; one more spawn is 409 `quota_exceeded`.
    pub max_live_per_account: u32,
    /// Milliseconds a tick waits for a BYOK model before falling back to the deterministic
    /// step. Keep it under a Zeqond (777 ms) so the ticker keeps its cadence.
    pub byok_timeout_ms: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        AgentsConfig {
            max_live_per_account: 10,
            byok_timeout_ms: 500,
        }
    }
}

impl AgentsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.byok_timeout_ms == 0 || self.byok_timeout_ms > 10_000 {
            return Err("agents.byok_timeout_ms must be from 1 to 10000".into());
        }
        Ok(())
    }
}

pub const SPAWN_COST: i64 = 75;
pub const SPAWN_BURN: i64 = 60;
pub const TICK_COST: i64 = 5;
pub const TICK_BURN: i64 = 4;
pub const MAX_PROBLEM_CHARS: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("send `Authorization: Bearer <zeq_ak_… or zsm_… key>`")]
    Unauthorized,
    #[error("the wallet holds {balance} ZEQ and this needs {required}; top up with `smgate account credit`")]
    InsufficientBalance { balance: i64, required: i64 },
    #[error("{0}")]
    NotChainMember(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no machine with that slug")]
    MachineNotFound,
    #[error("no agent run with that id is visible to this key")]
    NotFound,
    #[error("no credential with that id belongs to this account")]
    CredentialNotFound,
    #[error(
        "this account already has {limit} live agent runs; kill one or wait for one to finish"
    )]
    QuotaExceeded { limit: u32 },
    #[error("the run has ended ({status}); spawn a new one")]
    Done { status: &'static str },
    #[error("the run has already ended ({status})")]
    AlreadyDead { status: &'static str },
    #[error("the run already ticked in Zeqond {zeqond}; the next tick can come in Zeqond {}", zeqond + 1)]
    TooSoon { zeqond: u64 },
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<redb::TableError> for AgentError {
    fn from(e: redb::TableError) -> Self {
        AgentError::Store(e.into())
    }
}

impl From<redb::StorageError> for AgentError {
    fn from(e: redb::StorageError) -> Self {
        AgentError::Store(e.into())
    }
}

fn invalid(code: &'static str, message: impl Into<String>) -> AgentError {
    AgentError::Invalid {
        code,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    Running,
    /// best_fitness ≤ precision.
    Converged,
    /// `generations` reached.
    Exhausted,
    Killed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Converged => "converged",
            RunStatus::Exhausted => "exhausted",
            RunStatus::Killed => "killed",
        }
    }
}

/// One agent run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub agent_zid: String,
    pub slug: Slug,
    pub payer: Zid,
    pub problem: String,
    pub population: u8,
    pub generations: u8,
    pub precision: f64,
    pub credential_id: Option<String>,
    pub master_id: Option<String>,
    pub status: RunStatus,
    pub created_ms: i64,
    pub spawn_zeqond: u64,
    pub last_tick_zeqond: Option<u64>,
    pub ticks: u32,
    pub charged: i64,
    pub ended_zeqond: Option<u64>,
    pub search: SearchState,
}

impl Run {
    pub fn is_live(&self) -> bool {
        self.status == RunStatus::Running
    }

    /// The status DTO.
    pub fn to_json(&self) -> Value {
        let problem = Problem::parse(&self.problem);
        let best = self.search.best.as_ref().map(|b| {
            json!({
                "operators": b.genotype.operators(),
                "genes": b.genotype.genes,
                "fitness": b.fitness,
                "result": b.genotype.evaluate(&problem).to_json(),
            })
        });
        json!({
            "agent_id": self.id,
            "agent_zid": self.agent_zid,
            "slug": self.slug,
            "owner_zid": self.payer,
            "problem": self.problem,
            "population": self.population,
            "generations": self.generations,
            "precision": self.precision,
            "credential_id": self.credential_id,
            "master_id": self.master_id,
            "status": self.status.as_str(),
            "generation": self.search.next_generation.checked_sub(1),
            "ticks": self.ticks,
            "best_fitness": self.search.best.as_ref().map(|b| b.fitness),
            "best": best,
            "charged": self.charged,
            "spawn_zeqond": self.spawn_zeqond,
            "last_tick_zeqond": self.last_tick_zeqond,
            "ended_zeqond": self.ended_zeqond,
            "created_at": clock::rfc3339(self.created_ms),
        })
    }
}

/// `ZID-` and the first 8 hex digits of SHA-256(agent id).
pub fn agent_zid(agent_id: &str) -> String {
    format!(
        "ZID-{}",
        &crate::ledger::hex::encode(&crate::auth::sha256(agent_id.as_bytes()))[..8]
    )
}

/// A validated spawn body.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub problem: String,
    pub population: u8,
    pub generations: u8,
    pub precision: f64,
    pub credential_id: Option<String>,
    pub parent_master_id: Option<String>,
    pub slug: Option<Slug>,
}

fn int_in(
    body: &serde_json::Map<String, Value>,
    field: &str,
    code: &'static str,
) -> Result<u8, AgentError> {
    match body.get(field).and_then(Value::as_u64) {
        Some(n @ 1..=10) => Ok(n as u8),
        _ => Err(invalid(
            code,
            format!("{field} must be an integer from 1 to 10"),
        )),
    }
}

fn optional_uuid(
    body: &serde_json::Map<String, Value>,
    field: &str,
    code: &'static str,
) -> Result<Option<String>, AgentError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => uuid::Uuid::parse_str(s)
            .map(|u| Some(u.hyphenated().to_string()))
            .map_err(|_| invalid(code, format!("{field} must be a UUID"))),
        Some(_) => Err(invalid(code, format!("{field} must be a UUID string"))),
    }
}

impl SpawnRequest {
    /// Spec 004's body rules, each field with its own code.
    pub fn from_json(body: &Value) -> Result<SpawnRequest, AgentError> {
        let Value::Object(body) = body else {
            return Err(invalid("invalid_body", "the body must be a JSON object"));
        };
        let problem = match body.get("problem") {
            Some(Value::String(s))
                if !s.trim().is_empty() && s.chars().count() <= MAX_PROBLEM_CHARS =>
            {
                s.clone()
            }
            _ => {
                return Err(invalid(
                    "invalid_problem",
                    format!(
                    "problem must be a non-empty string of at most {MAX_PROBLEM_CHARS} characters"
                ),
                ))
            }
        };
        let population = int_in(body, "population", "invalid_population")?;
        let generations = int_in(body, "generations", "invalid_generations")?;
        let precision = match body.get("precision").and_then(Value::as_f64) {
            Some(p) if (0.0001..=0.1).contains(&p) => p,
            _ => {
                return Err(invalid(
                    "invalid_precision",
                    "precision must be a number from 0.0001 to 0.1",
                ))
            }
        };
        let credential_id = optional_uuid(body, "credential_id", "invalid_credential_id")?;
        let parent_master_id = optional_uuid(body, "parent_master_id", "invalid_parent_master_id")?;
        let slug = match body.get("slug") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(Slug::parse)
                    .ok_or_else(|| invalid("invalid_slug", "slug must match [a-z0-9-]{1,64}"))?,
            ),
        };
        Ok(SpawnRequest {
            problem,
            population,
            generations,
            precision,
            credential_id,
            parent_master_id,
            slug,
        })
    }
}

/// What a spawn or tick was given by the model (BYOK), decided before the write.
#[derive(Debug, Clone, Default)]
pub struct Enrichment {
    pub proposals: Vec<Vec<String>>,
    /// For the tick row: `{"outcome": "ok" | "fallback", ...}`; `None` without a credential.
    pub record: Option<Value>,
}

/// A charge as spec 004 shows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Charge {
    pub charged: i64,
    pub burned: i64,
    pub to_foundation: i64,
    pub remaining_after: i64,
}

impl Charge {
    pub fn to_json(&self) -> Value {
        json!({"charged": self.charged, "burned": self.burned, "toFoundation": self.to_foundation, "remainingAfter": self.remaining_after})
    }

    fn add(self, other: Charge) -> Charge {
        Charge {
            charged: self.charged + other.charged,
            burned: self.burned + other.burned,
            to_foundation: self.to_foundation + other.to_foundation,
            remaining_after: other.remaining_after,
        }
    }
}

/// The outcome of one tick.
#[derive(Debug, Clone)]
pub struct Tick {
    pub generation: Generation,
    pub status: RunStatus,
    pub zeqond: u64,
    pub charge: Charge,
    pub result: Value,
}

impl Tick {
    pub fn to_json(&self) -> Value {
        json!({
            "generation": self.generation.generation,
            "best_fitness": self.generation.best.fitness,
            "operators": self.generation.best.genotype.operators(),
            "result": self.result,
            "status": self.status.as_str(),
            "zeqond": self.zeqond,
        })
    }
}

pub struct Spawned {
    pub run: Run,
    pub charge: Charge,
    pub first_tick: Option<Tick>,
    pub machine_created: bool,
}

fn account_in(txn: &WriteTransaction, zid: &Zid) -> Result<Option<Account>, StoreError> {
    let t = txn.open_table(ACCOUNTS)?;
    let v = t.get(zid.as_str())?;
    v.map(|v| store::decode(v.value())).transpose()
}

fn machine_in(txn: &WriteTransaction, slug: &Slug) -> Result<Option<Machine>, StoreError> {
    let t = txn.open_table(store::MACHINES)?;
    let v = t.get(slug.as_str())?;
    v.map(|v| store::decode(v.value())).transpose()
}

fn run_in(txn: &WriteTransaction, id: &str) -> Result<Option<Run>, StoreError> {
    let t = txn.open_table(RUNS)?;
    let v = t.get(id)?;
    v.map(|v| store::decode(v.value())).transpose()
}

fn meta_add(txn: &WriteTransaction, key: &str, n: i64) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let old: i64 = match meta.get(key)? {
        Some(v) => store::decode(v.value())?,
        None => 0,
    };
    meta.insert(key, store::encode(&(old + n)).as_slice())?;
    Ok(())
}

/// Debits `cost` (of which `burn` is burned) and appends the `tally_charge` row. The caller
/// has checked the balance.
#[allow(clippy::too_many_arguments)]
fn charge(
    txn: &WriteTransaction,
    mut account: Account,
    cost: i64,
    burn: i64,
    slug: &str,
    reason: &str,
    agent_id: &str,
    actor: &str,
    now_ms: i64,
) -> Result<Charge, StoreError> {
    account.balance -= cost;
    txn.open_table(ACCOUNTS)?
        .insert(account.zid.as_str(), store::encode(&account).as_slice())?;
    meta_add(txn, "tally_burned", burn)?;
    meta_add(txn, "tally_foundation", cost - burn)?;
    let c = Charge {
        charged: cost,
        burned: burn,
        to_foundation: cost - burn,
        remaining_after: account.balance,
    };
    let payload = json!({
        "zid": account.zid, "reason": reason, "agent_id": agent_id,
        "charged": c.charged, "burned": c.burned, "toFoundation": c.to_foundation, "remainingAfter": c.remaining_after,
    });
    ledger_log::append(
        txn,
        slug,
        Entry::json("tally_charge", actor, &payload),
        now_ms,
    )?;
    Ok(c)
}

/// The chain a spawn targets and who pays: (slug, payer, machine to create first).
fn spawn_target(
    txn: &WriteTransaction,
    principal: &Principal,
    slug: Option<&Slug>,
) -> Result<(Slug, Zid, bool), AgentError> {
    let member = |m: &Machine| -> Result<(), AgentError> {
        if m.access(principal) >= Access::Admin {
            Ok(())
        } else {
            Err(AgentError::NotChainMember(format!(
                "the caller is not admin or owner of machine `{}`",
                m.slug
            )))
        }
    };
    match principal {
        Principal::Anonymous => Err(AgentError::Unauthorized),
        Principal::Account { zid, .. } => match slug {
            Some(s) => {
                let m = machine_in(txn, s)?.ok_or(AgentError::MachineNotFound)?;
                member(&m)?;
                Ok((m.slug, zid.clone(), false))
            }
            None => {
                let own = Slug::derived(zid, 1);
                match machine_in(txn, &own)? {
                    Some(m) if m.owner_zid == *zid => Ok((own, zid.clone(), false)),
                    Some(_) => Err(AgentError::NotChainMember(format!(
                        "machine `{own}` belongs to another account; name a machine of yours with `slug`"
                    ))),
                    None => Ok((own, zid.clone(), true)),
                }
            }
        },
        Principal::MachineKey { slug: own, .. } => {
            let target = slug.unwrap_or(own);
            let m = machine_in(txn, target)?.ok_or(AgentError::MachineNotFound)?;
            member(&m)?;
            Ok((m.slug, m.owner_zid, false))
        }
    }
}

/// Who may act on `run`: its payer as owner, else the caller's access to its machine.
pub fn run_access(machine: Option<&Machine>, run: &Run, principal: &Principal) -> Access {
    if let Principal::Account { zid, .. } = principal {
        if *zid == run.payer {
            return Access::Owner;
        }
    }
    match machine.map(|m| m.access(principal)) {
        // Public machines do not make their runs public.
        Some(Access::Public) | None => Access::None,
        Some(a) => a,
    }
}

fn live_count(txn: &WriteTransaction, zid: &Zid) -> Result<u32, StoreError> {
    let live = txn.open_table(LIVE)?;
    let mut n = 0;
    for entry in live.range((zid.as_str(), "")..)? {
        let (k, _) = entry?;
        if k.value().0 != zid.as_str() {
            break;
        }
        n += 1;
    }
    Ok(n)
}

/// Everything a spawn needs besides the request.
pub struct SpawnContext<'a> {
    pub principal: &'a Principal,
    pub agent_id: String,
    pub max_live: u32,
    pub defaults: &'a machines::Defaults,
    pub enrichment: Enrichment,
    pub now_ms: i64,
}

/// The master of the mesh a spawn with parent `parent` joins, when the parent is a run its
/// spawner may see or pays for. The mesh is flat: a child of a child joins its master's mesh.
fn mesh_master(
    txn: &WriteTransaction,
    parent: Option<&str>,
    principal: &Principal,
    payer: &Zid,
) -> Result<Option<String>, AgentError> {
    let Some(p) = parent else {
        return Ok(None);
    };
    let parent = run_in(txn, p)?.ok_or(AgentError::NotFound)?;
    let machine = machine_in(txn, &parent.slug)?;
    if run_access(machine.as_ref(), &parent, principal) < Access::Viewer && parent.payer != *payer {
        return Err(AgentError::NotFound);
    }
    Ok(Some(parent.master_id.unwrap_or(parent.id)))
}

/// Spawns a run inside `txn`: validates everything first (chain, credential, parent, quota,
/// balance), then creates the default machine if needed, charges, stores the run and runs the
/// first tick.
pub fn spawn(
    txn: &WriteTransaction,
    req: SpawnRequest,
    ctx: SpawnContext<'_>,
) -> Result<Spawned, AgentError> {
    let (slug, payer, create_machine) = spawn_target(txn, ctx.principal, req.slug.as_ref())?;
    if let Some(c) = &req.credential_id {
        let cred = byok::credential_in(txn, c)?;
        if cred.is_none_or(|c| c.owner != payer) {
            return Err(AgentError::CredentialNotFound);
        }
    }
    let master_id = mesh_master(txn, req.parent_master_id.as_deref(), ctx.principal, &payer)?;
    if live_count(txn, &payer)? >= ctx.max_live {
        return Err(AgentError::QuotaExceeded {
            limit: ctx.max_live,
        });
    }
    let account = account_in(txn, &payer)?;
    let balance = account.as_ref().map(|a| a.balance).unwrap_or(0);
    let Some(account) = account.filter(|a| a.balance >= SPAWN_COST) else {
        return Err(AgentError::InsufficientBalance {
            balance,
            required: SPAWN_COST,
        });
    };
    if run_in(txn, &ctx.agent_id)?.is_some() {
        return Err(invalid("agent_exists", "an agent run with this id exists"));
    }
    // Validated: from here on everything is written.
    let actor = ctx.principal.actor();
    let now = ctx.now_ms;
    if create_machine {
        let request = NewMachine {
            slug: Some(slug.clone()),
            ..NewMachine::default()
        };
        machines::create(txn, &payer, &actor, request, ctx.defaults, now)?;
    }
    let spawn_charge = charge(
        txn,
        account,
        SPAWN_COST,
        SPAWN_BURN,
        &slug,
        "agent_spawn",
        &ctx.agent_id,
        &actor,
        now,
    )?;
    let run = Run {
        id: ctx.agent_id.clone(),
        agent_zid: agent_zid(&ctx.agent_id),
        slug: slug.clone(),
        payer: payer.clone(),
        problem: req.problem.clone(),
        population: req.population,
        generations: req.generations,
        precision: req.precision,
        credential_id: req.credential_id.clone(),
        master_id: master_id.clone(),
        status: RunStatus::Running,
        created_ms: now,
        spawn_zeqond: clock::zeqond(now),
        last_tick_zeqond: None,
        ticks: 0,
        charged: SPAWN_COST,
        ended_zeqond: None,
        search: SearchState::new(&req.problem, &ctx.agent_id),
    };
    let spawned_row = json!({
        "agent_id": run.id, "agent_zid": run.agent_zid, "owner_zid": run.payer, "problem": run.problem,
        "population": run.population, "generations": run.generations, "precision": run.precision,
        "byok": run.credential_id.is_some(), "master_id": run.master_id,
    });
    ledger_log::append(
        txn,
        &slug,
        Entry::json("agent_spawned", actor.clone(), &spawned_row),
        now,
    )?;
    txn.open_table(RUNS)?
        .insert(run.id.as_str(), store::encode(&run).as_slice())?;
    txn.open_table(LIVE)?
        .insert((payer.as_str(), run.id.as_str()), ())?;
    txn.open_table(BY_ACCOUNT)?
        .insert((payer.as_str(), run.id.as_str()), ())?;
    txn.open_table(BY_MACHINE)?
        .insert((slug.as_str(), run.id.as_str()), ())?;
    if let Some(m) = &master_id {
        txn.open_table(MESH)?
            .insert((m.as_str(), run.id.as_str()), ())?;
    }
    let first_tick = if spawn_charge.remaining_after >= TICK_COST {
        Some(tick(txn, &run.id, "spawn", &actor, ctx.enrichment, now)?)
    } else {
        None
    };
    let charge = first_tick
        .as_ref()
        .map(|t| spawn_charge.add(t.charge))
        .unwrap_or(spawn_charge);
    let run = run_in(txn, &ctx.agent_id)?.unwrap_or(run);
    Ok(Spawned {
        run,
        charge,
        first_tick,
        machine_created: create_machine,
    })
}

/// Runs one tick of run `id` in `txn`: refuses (writing nothing) when the run has ended, has
/// already ticked this Zeqond, or its payer cannot pay; else charges 5, computes the next
/// generation, stores it and appends `tally_charge` and `agent_tick`.
pub fn tick(
    txn: &WriteTransaction,
    id: &str,
    by: &str,
    actor: &str,
    enrichment: Enrichment,
    now_ms: i64,
) -> Result<Tick, AgentError> {
    let mut run = run_in(txn, id)?.ok_or(AgentError::NotFound)?;
    if !run.is_live() {
        return Err(AgentError::Done {
            status: run.status.as_str(),
        });
    }
    let zeqond = clock::zeqond(now_ms);
    if let Some(last) = run.last_tick_zeqond.filter(|l| *l >= zeqond) {
        return Err(AgentError::TooSoon { zeqond: last });
    }
    let account = account_in(txn, &run.payer)?;
    let balance = account.as_ref().map(|a| a.balance).unwrap_or(0);
    let Some(account) = account.filter(|a| a.balance >= TICK_COST) else {
        return Err(AgentError::InsufficientBalance {
            balance,
            required: TICK_COST,
        });
    };
    let c = charge(
        txn,
        account,
        TICK_COST,
        TICK_BURN,
        &run.slug,
        "agent_tick",
        id,
        actor,
        now_ms,
    )?;
    let problem = Problem::parse(&run.problem);
    let generation = search::step(
        &mut run.search,
        &problem,
        run.population as usize,
        &enrichment.proposals,
    );
    run.status = if generation.best.fitness <= run.precision {
        RunStatus::Converged
    } else if run.search.next_generation >= u32::from(run.generations) {
        RunStatus::Exhausted
    } else {
        RunStatus::Running
    };
    run.last_tick_zeqond = Some(zeqond);
    run.ticks += 1;
    run.charged += TICK_COST;
    if !run.is_live() {
        run.ended_zeqond = Some(zeqond);
        txn.open_table(LIVE)?
            .remove((run.payer.as_str(), run.id.as_str()))?;
    }
    let result = generation.best.genotype.evaluate(&problem).to_json();
    let row = json!({
        "agent_id": run.id,
        "generation": generation.generation,
        "best_fitness": generation.best.fitness,
        "operators": generation.best.genotype.operators(),
        "value": result["value"],
        "unit": result["unit"],
        "status": run.status.as_str(),
        "by": by,
        "byok": enrichment.record,
    });
    ledger_log::append(
        txn,
        &run.slug,
        Entry::json("agent_tick", actor, &row),
        now_ms,
    )?;
    txn.open_table(LINEAGE)?.insert(
        (run.id.as_str(), generation.generation),
        store::encode(&generation).as_slice(),
    )?;
    txn.open_table(RUNS)?
        .insert(run.id.as_str(), store::encode(&run).as_slice())?;
    Ok(Tick {
        generation,
        status: run.status,
        zeqond,
        charge: c,
        result,
    })
}

/// Ends run `id` and appends `agent_killed`; returns (Zeqond, transition id of the row).
pub fn kill(
    txn: &WriteTransaction,
    id: &str,
    actor: &str,
    now_ms: i64,
) -> Result<(u64, String), AgentError> {
    let mut run = run_in(txn, id)?.ok_or(AgentError::NotFound)?;
    if !run.is_live() {
        return Err(AgentError::AlreadyDead {
            status: run.status.as_str(),
        });
    }
    let zeqond = clock::zeqond(now_ms);
    run.status = RunStatus::Killed;
    run.ended_zeqond = Some(zeqond);
    txn.open_table(LIVE)?
        .remove((run.payer.as_str(), run.id.as_str()))?;
    txn.open_table(RUNS)?
        .insert(run.id.as_str(), store::encode(&run).as_slice())?;
    let payload = json!({"agent_id": run.id, "generation": run.search.next_generation.checked_sub(1), "ticks": run.ticks});
    let row = ledger_log::append(
        txn,
        &run.slug,
        Entry::json("agent_killed", actor, &payload),
        now_ms,
    )?;
    Ok((
        zeqond,
        uuid::Uuid::from_bytes(row.transition_id).to_string(),
    ))
}

/// Adds `amount` ZEQ to an account (`smgate account credit`); returns the new balance.
pub fn credit(txn: &WriteTransaction, zid: &Zid, amount: i64) -> Result<Option<i64>, StoreError> {
    let Some(mut account) = account_in(txn, zid)? else {
        return Ok(None);
    };
    account.balance = account.balance.saturating_add(amount);
    txn.open_table(ACCOUNTS)?
        .insert(zid.as_str(), store::encode(&account).as_slice())?;
    meta_add(txn, "tally_credited", amount)?;
    Ok(Some(account.balance))
}

/// Read side.
pub mod read {
    use super::*;

    pub fn run(txn: &ReadTransaction, id: &str) -> Result<Option<Run>, StoreError> {
        store::get(txn, RUNS, id)
    }

    pub fn lineage(txn: &ReadTransaction, id: &str) -> Result<Vec<Generation>, StoreError> {
        let t = txn.open_table(LINEAGE)?;
        let mut out = Vec::new();
        for entry in t.range((id, 0)..=(id, u32::MAX))? {
            let (_, v) = entry?;
            out.push(store::decode(v.value())?);
        }
        Ok(out)
    }

    fn ids(
        txn: &ReadTransaction,
        table: TableDefinition<(&str, &str), ()>,
        key: &str,
    ) -> Result<Vec<String>, StoreError> {
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for entry in t.range((key, "")..)? {
            let (k, _) = entry?;
            let (a, b) = k.value();
            if a != key {
                break;
            }
            out.push(b.to_owned());
        }
        Ok(out)
    }

    fn runs_of(txn: &ReadTransaction, ids: Vec<String>) -> Result<Vec<Run>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(run(txn, &id)?);
        }
        out.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub fn by_account(txn: &ReadTransaction, zid: &str) -> Result<Vec<Run>, StoreError> {
        runs_of(txn, ids(txn, BY_ACCOUNT, zid)?)
    }

    pub fn by_machine(txn: &ReadTransaction, slug: &Slug) -> Result<Vec<Run>, StoreError> {
        runs_of(txn, ids(txn, BY_MACHINE, slug)?)
    }

    pub fn mesh(txn: &ReadTransaction, master: &str) -> Result<Vec<Run>, StoreError> {
        runs_of(txn, ids(txn, MESH, master)?)
    }

    pub fn live_count(txn: &ReadTransaction, zid: &str) -> Result<usize, StoreError> {
        Ok(ids(txn, LIVE, zid)?.len())
    }

    /// Every live run id (the ticker's work list).
    pub fn live(txn: &ReadTransaction) -> Result<Vec<String>, StoreError> {
        let t = txn.open_table(LIVE)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, _) = entry?;
            out.push(k.value().1.to_owned());
        }
        Ok(out)
    }

    /// Gateway-wide tally totals from `META`: (burned, to the foundation, credited).
    pub fn totals(txn: &ReadTransaction) -> Result<(i64, i64, i64), StoreError> {
        let get = |k: &str| -> Result<i64, StoreError> {
            Ok(store::get::<i64>(txn, META, k)?.unwrap_or(0))
        };
        Ok((
            get("tally_burned")?,
            get("tally_foundation")?,
            get("tally_credited")?,
        ))
    }
}
