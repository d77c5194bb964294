//! The statechart engine: XState-v5-shaped JSON definitions run with W3C SCXML semantics.
//!
//! The engine is **pure**: it takes a compiled [`Chart`], an [`InstanceState`], an [`Event`]
//! and the time (`now_ms`), and returns the next state plus the [`Effect`]s the host must
//! publish after it commits. No I/O, no clock, no randomness; the same inputs always give the
//! same [`Step`], which is what makes instances replayable and the engine fuzzable.
//!
//! - `parse`  — definition JSON → validated state tree (targets resolved, errors with paths).
//! - `expr`   — the sandboxed Rhai engine; every expression is compiled once per version.
//! - `run`    — the SCXML interpreter (microsteps, macrosteps, queues, timers, history).
//! - `model`  — the data the host stores and exchanges (`InstanceState`, `Event`, `Step`…).
//! - `json`   — JSON writers, byte for byte serde_json's output: the stored form, and the
//!   log's canonical payloads (`ledger::canonical`).
//!
//! Two ways to run an instance: the `InstanceState` calls ([`Chart::send`], [`Chart::advance`])
//! take the stored form and return a new one, converting on every call; a host that steps an
//! instance repeatedly [`Chart::load`]s it once into a [`LiveState`], steps that
//! ([`Chart::send_live`], [`Chart::advance_live`]) and converts back only to persist
//! ([`Chart::encode`] writes the stored JSON bytes directly, with `json`'s writers). Both run
//! the same interpreter.
//! - `sim`    — `smgate chart check` / `smgate chart simulate`, and `fuzz_one`.
//!
//! Choices this module settles (beyond DESIGN.md):
//! - Expressions: a JSON string in an expression slot (`guard`, `assign` values, `data`,
//!   `expr`, `output`, authorizers) is Rhai source; any other JSON value is a literal.
//! - Runtime failures (a guard that errors or is not a bool, a failing `assign`, a macrostep
//!   that does not settle) fail the whole call: the host keeps the previous state.
//! - `after` timers raise `xstate.after.<ms>.<state id>`; they are matched exactly (not as a
//!   descriptor prefix), so a parent's delay never catches a child's timer.
//! - Reaching a top-level final state runs the exit actions of every active state (XState v5),
//!   keeps the configuration, cancels all timers and evaluates the root `output`.

mod expr;
mod fast;
pub(crate) mod json;
mod model;
mod parse;
mod run;
pub mod sim;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

pub use model::{Effect, Event, InstanceState, Step, Timer, WriteKind};
pub(crate) use run::json_size;
pub use run::{LiveState, Stepped};
pub use sim::{check, fuzz_one, simulate};

/// Most microsteps one macrostep may take before it is declared unsettled.
pub const MAX_MICROSTEPS: u32 = 1_000;
/// Most external events (undelayed `send`s and timers) one call may process.
pub const MAX_EXTERNAL_EVENTS: usize = 1_000;
/// Most timers a single `advance` fires; the rest stay due (see [`Chart::next_due`]).
pub const MAX_TIMERS_PER_ADVANCE: usize = 1_000;
/// Largest context (as JSON) a step may leave behind.
pub const MAX_CONTEXT_BYTES: usize = 400 * 1024;
/// Most pending timers an instance may hold.
pub const MAX_TIMERS: usize = 1_000;

/// What went wrong, and where: `path` is a JSON path into the definition (`$.states.a.on.X`)
/// for definition and expression errors, `$` for whole-instance errors, or `event` / `state`
/// for bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ChartError {
    pub path: String,
    pub message: String,
    pub kind: ErrorKind,
}

/// Lets the host map errors without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The definition is invalid (caught by `check` / compile).
    Definition,
    /// The caller passed something invalid (empty event type, unknown state id…).
    Input,
    /// An expression failed or a limit was hit while running; the step must be rolled back.
    Runtime,
}

impl ChartError {
    pub(crate) fn def(path: impl Into<String>, message: impl Into<String>) -> Self {
        ChartError {
            path: path.into(),
            message: message.into(),
            kind: ErrorKind::Definition,
        }
    }
    pub(crate) fn input(path: impl Into<String>, message: impl Into<String>) -> Self {
        ChartError {
            path: path.into(),
            message: message.into(),
            kind: ErrorKind::Input,
        }
    }
    pub(crate) fn runtime(path: impl Into<String>, message: impl Into<String>) -> Self {
        ChartError {
            path: path.into(),
            message: message.into(),
            kind: ErrorKind::Runtime,
        }
    }
}

/// A compiled, immutable statechart version. `Send + Sync`; share it with `Arc`.
pub struct Chart {
    pub(crate) states: Vec<parse::StateNode>,
    pub(crate) transitions: Vec<parse::TransitionDef>,
    /// History state indices in the order of their ids (how `InstanceState::history`, a
    /// map by id, is stored).
    pub(crate) histories_by_id: Vec<usize>,
    /// Each state id as a JSON string (quoted, escaped as serde_json does), by state index:
    /// the stored bytes write ids without escaping them again on every step.
    pub(crate) ids_json: Vec<Box<[u8]>>,
    pub(crate) by_id: std::sync::Arc<HashMap<String, usize>>,
    /// Some state has an `always` transition; without one, settling skips the search for
    /// eventless transitions.
    pub(crate) has_eventless: bool,
    /// Indices of the atomic and final states, ascending: where selection starts.
    pub(crate) atomics: Vec<usize>,
    pub(crate) context: Value,
    pub(crate) output: Option<expr::ValueExpr>,
    pub(crate) allow_read: Option<expr::Expr>,
    pub(crate) allow_write: Option<expr::Expr>,
    pub(crate) sandbox: expr::Sandbox,
}

impl std::fmt::Debug for Chart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chart")
            .field("root", &self.states[0].id)
            .field("states", &self.states.len())
            .field("transitions", &self.transitions.len())
            .finish()
    }
}

impl Chart {
    /// Validates and compiles a definition (key order of the JSON objects is document order).
    pub fn compile(definition: &Value) -> Result<Chart, ChartError> {
        parse::compile(definition)
    }

    /// Parses definition text (JSON) and compiles it.
    pub fn from_json_str(text: &str) -> Result<Chart, ChartError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ChartError::def("$", format!("definition is not valid JSON: {e}")))?;
        Chart::compile(&value)
    }

    /// The id of the root state (`id` of the definition, or `(machine)`).
    pub fn id(&self) -> &str {
        &self.states[0].id
    }

    /// Starts an instance: `context` (an object, or null) is merged over the definition's
    /// `context`, then the initial configuration is entered and the machine settles.
    pub fn initial(&self, context: Value, auth: &Value, now_ms: i64) -> Result<Step, ChartError> {
        run::initial(self, context, auth, now_ms)
    }

    /// Processes one external event (plus everything it causes) to completion. Does not fire
    /// due timers: call [`Chart::advance`] first when time has passed.
    pub fn send(
        &self,
        state: &InstanceState,
        event: Event,
        auth: &Value,
        now_ms: i64,
    ) -> Result<Step, ChartError> {
        run::send(self, state, event, auth, now_ms)
    }

    /// Fires every timer due at or before `now_ms`, in due order (ties in schedule order),
    /// including timers that come due during the advance, up to [`MAX_TIMERS_PER_ADVANCE`].
    pub fn advance(&self, state: &InstanceState, now_ms: i64) -> Result<Step, ChartError> {
        run::advance(self, state, now_ms)
    }

    /// Like [`Chart::initial`], returning the instance as a [`LiveState`].
    pub fn initial_live(
        &self,
        context: Value,
        auth: &Value,
        now_ms: i64,
    ) -> Result<(LiveState, Stepped), ChartError> {
        run::initial_live(self, context, auth, now_ms)
    }

    /// The stored form → the working form; checks that it fits this chart version (see
    /// [`Chart::check_state`]).
    pub fn load(&self, state: &InstanceState) -> Result<LiveState, ChartError> {
        run::load(self, state)
    }

    /// The working form → the stored form.
    pub fn store(&self, live: &LiveState) -> InstanceState {
        run::store(self, live)
    }

    /// Appends the stored form as JSON to `out`: exactly the bytes of
    /// `serde_json::to_vec(&self.store(live))`, without building the `InstanceState`.
    pub fn encode(&self, live: &LiveState, out: &mut Vec<u8>) {
        run::encode(self, live, out)
    }

    /// [`Chart::send`] on a [`LiveState`]. On error, `live` is left broken (every further
    /// call on it fails): load it again from the last stored state.
    pub fn send_live(
        &self,
        live: &mut LiveState,
        event: Event,
        auth: &Value,
        now_ms: i64,
    ) -> Result<Stepped, ChartError> {
        run::send_live(self, live, event, auth, now_ms)
    }

    /// [`Chart::advance`] on a [`LiveState`]; errors as for [`Chart::send_live`].
    pub fn advance_live(&self, live: &mut LiveState, now_ms: i64) -> Result<Stepped, ChartError> {
        run::advance_live(self, live, now_ms)
    }

    /// [`Chart::state_value`] of a [`LiveState`].
    pub fn live_value(&self, live: &LiveState) -> Value {
        self.value_of(0, &live.active)
    }

    /// [`Chart::tags`] of a [`LiveState`].
    pub fn live_tags(&self, live: &LiveState) -> Vec<String> {
        self.tags_of(&live.active)
    }

    /// [`Chart::atomic_configuration`] of a [`LiveState`].
    pub fn live_configuration(&self, live: &LiveState) -> Vec<String> {
        self.atomic_ids(&live.active)
    }

    /// When the next timer is due, if any.
    pub fn next_due(&self, state: &InstanceState) -> Option<i64> {
        state.timers.iter().map(|t| t.due_ms).min()
    }

    /// The state value as XState prints it: a string for an atomic child of the root, nested
    /// objects for compound states, several keys under a parallel state.
    pub fn state_value(&self, state: &InstanceState) -> Value {
        let active = self.active_flags(state);
        self.value_of(0, &active)
    }

    /// Tags of all active states, sorted and de-duplicated.
    pub fn tags(&self, state: &InstanceState) -> Vec<String> {
        self.tags_of(&self.active_flags(state))
    }

    fn tags_of(&self, active: &[bool]) -> Vec<String> {
        let mut tags = BTreeSet::new();
        for (node, _) in self.states.iter().zip(active).filter(|(_, a)| **a) {
            tags.extend(node.tags.iter().map(String::as_str));
        }
        tags.into_iter().map(str::to_owned).collect()
    }

    /// Active atomic (and final) state ids, sorted.
    pub fn atomic_configuration(&self, state: &InstanceState) -> Vec<String> {
        self.atomic_ids(&self.active_flags(state))
    }

    fn atomic_ids(&self, active: &[bool]) -> Vec<String> {
        let mut ids: Vec<&str> = self
            .states
            .iter()
            .zip(active)
            .filter(|(n, a)| **a && n.is_atomic())
            .map(|(n, _)| n.id.as_str())
            .collect();
        ids.sort_unstable();
        ids.into_iter().map(str::to_owned).collect()
    }

    /// `context.public`, or `{}`.
    pub fn public_context(&self, state: &InstanceState) -> Value {
        match state.context.get("public") {
            Some(v) => v.clone(),
            None => Value::Object(serde_json::Map::new()),
        }
    }

    /// Whether a state with this id exists (used to check migration paths between versions).
    pub fn has_state(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// Checks that a stored state fits this chart version: every configuration id exists and
    /// the configuration is legal (e.g. before moving an instance to another version).
    pub fn check_state(&self, state: &InstanceState) -> Result<(), ChartError> {
        run::check_state(self, state)
    }

    /// Runs the root `authorizers.allowRead` (no authorizer = allow). Sees `context`, `auth`
    /// and `state` (the state value).
    pub fn allow_read(&self, state: &InstanceState, auth: &Value) -> Result<bool, ChartError> {
        run::allow_read(self, state, auth)
    }

    /// Runs the root `authorizers.allowWrite` (no authorizer = allow). Sees `type`
    /// (`"initialization"` or `"event"`), `event`, `context` and `auth`.
    pub fn allow_write(
        &self,
        kind: WriteKind,
        event: Option<&Event>,
        context: &Value,
        auth: &Value,
    ) -> Result<bool, ChartError> {
        run::allow_write(self, kind, event, context, auth)
    }

    fn active_flags(&self, state: &InstanceState) -> Vec<bool> {
        let mut active = vec![false; self.states.len()];
        active[0] = true;
        for id in &state.configuration {
            if let Some(&i) = self.by_id.get(id) {
                active[i] = true;
            }
        }
        active
    }

    fn value_of(&self, s: usize, active: &[bool]) -> Value {
        // Port of XState v5 getValueFromAdj: a compound with an atomic active child prints the
        // child's key; everything else is an object of active children.
        let node = &self.states[s];
        let kids = node.children.iter().copied().filter(|&c| active[c]);
        if node.kind == parse::Kind::Compound {
            match kids.clone().next() {
                Some(c) if self.states[c].is_atomic() => {
                    return Value::String(self.states[c].key.clone())
                }
                Some(_) => {}
                None => return Value::Object(serde_json::Map::new()),
            }
        }
        let mut map = serde_json::Map::new();
        for c in kids {
            map.insert(self.states[c].key.clone(), self.value_of(c, active));
        }
        Value::Object(map)
    }
}

#[cfg(test)]
mod send_sync {
    fn assert_send_sync<T: Send + Sync>() {}
    #[test]
    fn chart_is_send_and_sync() {
        assert_send_sync::<super::Chart>();
    }
}
