//! The SCXML interpreter (W3C SCXML, Appendix D "Algorithm for SCXML Interpretation"),
//! specialised to this engine:
//!
//! - State indices are pre-order document order, so entry order is ascending index and exit
//!   order is descending index (descendants before ancestors).
//! - The root is always active and never exited; it plays the `<scxml>` element in `findLCCA`.
//! - A macrostep is: eventless transitions until none are enabled, then one internal event,
//!   repeat; external events (undelayed `send`, timers) are taken only when it has settled.
//! - Final-state completion follows XState v5 (a parallel nested in a parallel region also
//!   completes its ancestors), a strict superset of SCXML's grandparent check.
//! - The interpreter works on a [`LiveState`] (indices, flags, the context as a live value);
//!   the stored [`InstanceState`] is converted to and from it only at the edges (`load`,
//!   `store`, `encode`), so a host that keeps a `LiveState` pays no conversion per event.
//! - Errors abort the whole call. The `InstanceState` entry points leave the caller's state
//!   untouched; a `LiveState` that failed half-way is marked broken and must be loaded again
//!   from the last stored state (stepping it is an error), which is what hosts roll back to.
//!
//! Beside the interpreter: `stored.rs` converts between `LiveState` and the stored form,
//! `scratch.rs` keeps the queues and strings a step reuses, `authorize.rs` runs the chart's
//! `allowRead`/`allowWrite` expressions.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rhai::{Dynamic, Scope};
use serde_json::Value;

use super::expr::{event_dynamic, to_dynamic, to_json, Active, Expr, ValueExpr, CALL_OPERATIONS};
use super::fast::{Env, SMALL_MAP};
use super::json;
use super::model::{Effect, Event, InstanceState, Step, Timer, WriteKind};
use super::parse::{Action, Kind};
use super::{
    Chart, ChartError, MAX_CONTEXT_BYTES, MAX_EXTERNAL_EVENTS, MAX_MICROSTEPS, MAX_TIMERS,
    MAX_TIMERS_PER_ADVANCE,
};

const MAX_QUEUE: usize = 10_000;
const MAX_EFFECTS: usize = 10_000;
const INIT_EVENT: &str = "xstate.init";

mod authorize;
mod scratch;
mod stored;

pub(crate) use authorize::{allow_read, allow_write};
pub(crate) use scratch::{Scratch, StateSet};
use stored::blank;
pub(crate) use stored::{encode, load, store};

/// An instance in the engine's working form: what [`InstanceState`] stores, with states as
/// indices of one compiled [`Chart`] (a `LiveState` only makes sense with the chart that
/// loaded it) and the context as a live value. Hosts load it once, step it, and convert it
/// back ([`Chart::store`], [`Chart::encode`]) only to persist.
#[derive(Debug, Clone, Default)]
pub struct LiveState {
    /// Active flags by state index (the root is always active).
    pub(crate) active: Vec<bool>,
    /// History state index → recorded state indices.
    pub(crate) history: BTreeMap<usize, Vec<usize>>,
    pub(crate) context: Value,
    pub(crate) timers: Vec<Timer>,
    pub(crate) timer_seq: u64,
    pub(crate) done: bool,
    pub(crate) output: Value,
    /// The context is known to be within [`MAX_CONTEXT_BYTES`] (checked since it last
    /// changed), so a step that does not assign need not measure it again.
    pub(crate) context_checked: bool,
    /// A step failed half-way: the state is meaningless until loaded again.
    pub(crate) broken: bool,
    /// Scratch space kept between calls so that a step allocates nothing for its queues and
    /// state sets; empty between calls.
    pub(crate) scratch: Scratch,
}

impl LiveState {
    /// Whether a top-level final state was reached (further events are ignored).
    pub fn done(&self) -> bool {
        self.done
    }

    /// The context as it is now.
    pub fn context(&self) -> &Value {
        &self.context
    }

    /// The machine output once `done` (null before, or when there is none).
    pub fn output(&self) -> &Value {
        &self.output
    }

    /// When the next timer is due, if any.
    pub fn next_due(&self) -> Option<i64> {
        self.timers.iter().map(|t| t.due_ms).min()
    }

    /// Whether this state is usable (a failed step leaves it broken).
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

/// What one call on a [`LiveState`] did besides changing it: the effects to publish after
/// the host commits, and how many microsteps were taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stepped {
    pub effects: Vec<Effect>,
    pub microsteps: u32,
}

struct Run<'c> {
    chart: &'c Chart,
    /// Expression operations this call (or this timer of an advance) has spent.
    spent: u64,
    /// The instance, stepped in place (moving a `LiveState` in and out of the run cost more
    /// than some steps); marked broken until [`Run::end`] or [`Run::finish`] succeeds.
    st: &'c mut LiveState,
    ctx_dyn: Option<Dynamic>,
    /// An `assign` ran this call, so the context must be measured again.
    ctx_dirty: bool,
    auth: &'c Value,
    auth_dyn: Option<Dynamic>,
    event: Event,
    event_dyn: Option<Dynamic>,
    effects: Vec<Effect>,
    microsteps: u32,
    total_microsteps: u32,
    now: i64,
}

// ---- the LiveState entry points ---------------------------------------------------------

pub(crate) fn initial_live(
    chart: &Chart,
    context: Value,
    auth: &Value,
    now: i64,
) -> Result<(LiveState, Stepped), ChartError> {
    let mut ctx = chart.context.clone();
    match context {
        Value::Null => {}
        Value::Object(m) => {
            if let Value::Object(base) = &mut ctx {
                for (k, v) in m {
                    base.insert(k, v);
                }
            }
        }
        _ => return Err(ChartError::input("context", "context must be an object")),
    }
    let mut live = blank(chart);
    live.context = ctx;
    let mut run = Run::new(chart, &mut live, auth, now);
    run.event = Event::new(INIT_EVENT, Value::Null);
    run.start()?;
    run.run_external()?;
    let stepped = run.finish()?;
    Ok((live, stepped))
}

pub(crate) fn send_live(
    chart: &Chart,
    live: &mut LiveState,
    event: Event,
    auth: &Value,
    now: i64,
) -> Result<Stepped, ChartError> {
    if event.name.is_empty() {
        return Err(ChartError::input(
            "event.type",
            "event type must not be empty",
        ));
    }
    usable(chart, live)?;
    if live.done {
        return Ok(Stepped::default());
    }
    let mut run = Run::new(chart, live, auth, now);
    run.st.scratch.external.push_back(event);
    let result = run.run_external();
    run.end(result)
}

pub(crate) fn advance_live(
    chart: &Chart,
    live: &mut LiveState,
    now: i64,
) -> Result<Stepped, ChartError> {
    usable(chart, live)?;
    if live.done || !live.timers.iter().any(|t| t.due_ms <= now) {
        return Ok(Stepped::default());
    }
    let mut run = Run::new(chart, live, &Value::Null, now);
    let result = run.fire_due(now);
    run.now = now;
    run.end(result)
}

fn usable(chart: &Chart, live: &LiveState) -> Result<(), ChartError> {
    if live.broken || live.active.len() != chart.states.len() {
        return Err(ChartError::input(
            "state",
            "this live state is not usable (a step failed, or it belongs to another chart version); load it again from the stored state",
        ));
    }
    Ok(())
}

// ---- the InstanceState entry points (load, step, store) ---------------------------------

pub(crate) fn initial(
    chart: &Chart,
    context: Value,
    auth: &Value,
    now: i64,
) -> Result<Step, ChartError> {
    let (live, stepped) = initial_live(chart, context, auth, now)?;
    Ok(Step {
        state: store(chart, &live),
        effects: stepped.effects,
        microsteps: stepped.microsteps,
        changed: true,
    })
}

pub(crate) fn send(
    chart: &Chart,
    state: &InstanceState,
    event: Event,
    auth: &Value,
    now: i64,
) -> Result<Step, ChartError> {
    if event.name.is_empty() {
        return Err(ChartError::input(
            "event.type",
            "event type must not be empty",
        ));
    }
    if state.done {
        return Ok(unchanged(state));
    }
    let mut live = load(chart, state)?;
    let stepped = send_live(chart, &mut live, event, auth, now)?;
    Ok(step_from(chart, state, &live, stepped))
}

pub(crate) fn advance(chart: &Chart, state: &InstanceState, now: i64) -> Result<Step, ChartError> {
    if state.done || !state.timers.iter().any(|t| t.due_ms <= now) {
        return Ok(unchanged(state));
    }
    let mut live = load(chart, state)?;
    let stepped = advance_live(chart, &mut live, now)?;
    Ok(step_from(chart, state, &live, stepped))
}

fn step_from(chart: &Chart, before: &InstanceState, live: &LiveState, stepped: Stepped) -> Step {
    let state = store(chart, live);
    let changed = *before != state;
    Step {
        state,
        effects: stepped.effects,
        microsteps: stepped.microsteps,
        changed,
    }
}

fn unchanged(state: &InstanceState) -> Step {
    Step {
        state: state.clone(),
        effects: Vec::new(),
        microsteps: 0,
        changed: false,
    }
}

pub(crate) fn check_state(chart: &Chart, state: &InstanceState) -> Result<(), ChartError> {
    load(chart, state).map(|_| ())
}

impl<'c> Run<'c> {
    fn new(chart: &'c Chart, st: &'c mut LiveState, auth: &'c Value, now: i64) -> Run<'c> {
        st.broken = true;
        Run {
            chart,
            spent: 0,
            st,
            ctx_dyn: None,
            ctx_dirty: false,
            auth,
            auth_dyn: None,
            // Every path sets the event before anything reads it.
            event: Event::new(String::new(), Value::Null),
            event_dyn: None,
            effects: Vec::new(),
            microsteps: 0,
            total_microsteps: 0,
            now,
        }
    }

    /// Finishes a successful call; after a failed one, leaves the state broken (with nothing
    /// active but the root, so reading it cannot go out of bounds).
    fn end(mut self, result: Result<(), ChartError>) -> Result<Stepped, ChartError> {
        let out = result.and_then(|()| self.finish());
        if out.is_err() {
            *self.st = blank(self.chart);
            self.st.broken = true;
        }
        out
    }

    /// Fires every timer due at or before `now`, in due order (see `Chart::advance`).
    fn fire_due(&mut self, now: i64) -> Result<(), ChartError> {
        let mut fired = 0;
        let mut spent: u64 = 0;
        // Each timer is a top-level event with its own operation budget; the advance as a
        // whole stops early (leaving timers due, see `next_due`) once it has used one
        // budget's worth.
        while !self.st.done && fired < MAX_TIMERS_PER_ADVANCE && spent < CALL_OPERATIONS {
            // Due order, ties in schedule order.
            let Some(next) = self
                .st
                .timers
                .iter()
                .enumerate()
                .filter(|(_, t)| t.due_ms <= now)
                .min_by_key(|(_, t)| (t.due_ms, t.seq))
                .map(|(i, _)| i)
            else {
                break;
            };
            let timer = self.st.timers.remove(next);
            // Time inside the advance is the timer's due time, so chained delays stay exact.
            self.now = timer.due_ms;
            self.st.scratch.recycle(timer.id);
            self.st.scratch.external.push_back(timer.event);
            self.run_external()?;
            fired += 1;
            spent = spent.saturating_add(std::mem::take(&mut self.spent));
        }
        Ok(())
    }

    /// Checks the context size (when it may have changed) and marks the state usable.
    fn finish(&mut self) -> Result<Stepped, ChartError> {
        // Measuring means serializing; the bound is a cheap walk that settles most contexts.
        if (self.ctx_dirty || !self.st.context_checked)
            && json_size_bound(&self.st.context) > MAX_CONTEXT_BYTES
        {
            let size = json_size(&self.st.context);
            if size > MAX_CONTEXT_BYTES {
                return Err(ChartError::runtime(
                    "$.context",
                    format!("context is {size} bytes as JSON; the limit is {MAX_CONTEXT_BYTES}"),
                ));
            }
        }
        self.st.context_checked = true;
        // The last event's name goes back to the pool like the others (when it was a timer's,
        // the next `after` timer reuses it instead of allocating).
        let last = std::mem::replace(&mut self.event, Event::new(String::new(), Value::Null));
        self.st.scratch.recycle(last.name);
        if self.st.done {
            self.st.timers.clear();
        }
        self.st.scratch.internal.clear();
        self.st.scratch.external.clear();
        self.st.broken = false;
        Ok(Stepped {
            effects: std::mem::take(&mut self.effects),
            microsteps: self.total_microsteps,
        })
    }

    // ---- main loop -------------------------------------------------------------------------

    /// Enters the initial configuration (SCXML: the initial transition of `<scxml>`), then
    /// settles.
    fn start(&mut self) -> Result<(), ChartError> {
        self.count_microstep()?;
        let mut to_enter = StateSet::default();
        self.add_descendants(0, &mut to_enter);
        self.enter_set(&to_enter)?;
        self.after_microstep()?;
        self.settle()
    }

    /// Takes external events until the queue is empty (undelayed sends land here).
    fn run_external(&mut self) -> Result<(), ChartError> {
        let mut taken = 0;
        while let Some(ev) = self.st.scratch.external.pop_front() {
            if self.st.done {
                self.st.scratch.external.clear();
                break;
            }
            taken += 1;
            if taken > MAX_EXTERNAL_EVENTS {
                return Err(ChartError::runtime(
                    "$",
                    format!("more than {MAX_EXTERNAL_EVENTS} external events in one call (a send loop?)"),
                ));
            }
            self.microsteps = 0;
            self.set_event(ev);
            let mut enabled = std::mem::take(&mut self.st.scratch.enabled);
            self.select_transitions(false, &mut enabled)?;
            if !enabled.is_empty() {
                self.microstep(&enabled)?;
            }
            self.st.scratch.enabled = enabled;
            self.settle()?;
        }
        Ok(())
    }

    /// SCXML mainEventLoop inner part: eventless transitions first, then the internal queue.
    fn settle(&mut self) -> Result<(), ChartError> {
        let mut enabled = std::mem::take(&mut self.st.scratch.enabled);
        while !self.st.done {
            self.select_transitions(true, &mut enabled)?;
            if enabled.is_empty() {
                let Some(ev) = self.st.scratch.internal.pop_front() else {
                    break;
                };
                self.set_event(ev);
                self.select_transitions(false, &mut enabled)?;
            }
            if !enabled.is_empty() {
                self.microstep(&enabled)?;
            }
        }
        self.st.scratch.enabled = enabled;
        if self.st.done {
            self.st.scratch.internal.clear();
        }
        Ok(())
    }

    fn set_event(&mut self, ev: Event) {
        let old = std::mem::replace(&mut self.event, ev);
        self.st.scratch.recycle(old.name);
        self.event_dyn = None;
    }

    /// Drops the timers `remove` picks, keeping the others in order.
    fn drop_timers(&mut self, remove: impl Fn(&Timer) -> bool) {
        let mut i = 0;
        while i < self.st.timers.len() {
            if remove(&self.st.timers[i]) {
                let t = self.st.timers.remove(i);
                self.st.scratch.recycle_timer(t);
            } else {
                i += 1;
            }
        }
    }

    fn count_microstep(&mut self) -> Result<(), ChartError> {
        self.microsteps += 1;
        self.total_microsteps = self.total_microsteps.saturating_add(1);
        if self.microsteps > MAX_MICROSTEPS {
            return Err(ChartError::runtime(
                "$",
                format!(
                    "the machine did not settle within {MAX_MICROSTEPS} microsteps (event \"{}\"; an eventless or raise loop?)",
                    self.event.name
                ),
            ));
        }
        Ok(())
    }

    // ---- selection --------------------------------------------------------------------------

    /// SCXML selectTransitions / selectEventlessTransitions: for each active atomic state in
    /// document order, the first enabled transition of it or its nearest ancestor; then
    /// removeConflictingTransitions.
    fn select_transitions(
        &mut self,
        eventless: bool,
        enabled: &mut Vec<usize>,
    ) -> Result<(), ChartError> {
        let chart = self.chart;
        enabled.clear();
        if eventless && !chart.has_eventless {
            return Ok(());
        }
        // Guards cannot change the configuration, so the active atomic states can be found
        // while selecting. Between microsteps the configuration is legal, so an active state
        // has no active child exactly when it is atomic (or final).
        for &atomic in &chart.atomics {
            if !self.st.active[atomic] {
                continue;
            }
            let mut cur = Some(atomic);
            'up: while let Some(s) = cur {
                let list = if eventless {
                    &chart.states[s].always
                } else {
                    &chart.states[s].transitions
                };
                for &t in list {
                    if !eventless && !chart.transitions[t].trigger.matches(&self.event.name) {
                        continue;
                    }
                    if self.guard_ok(t)? {
                        if !enabled.contains(&t) {
                            enabled.push(t);
                        }
                        break 'up;
                    }
                }
                cur = chart.states[s].parent;
            }
        }
        self.remove_conflicting(enabled);
        Ok(())
    }

    fn guard_ok(&mut self, t: usize) -> Result<bool, ChartError> {
        let Some(guard) = &self.chart.transitions[t].guard else {
            return Ok(true);
        };
        if let Some(fast) = &guard.fast {
            let env = self.env();
            if let Some((b, ops)) = fast.eval_bool(&env, self.allowed()) {
                self.spent += ops;
                return Ok(b);
            }
        }
        let v = self.eval(guard)?;
        v.as_bool().map_err(|ty| {
            ChartError::runtime(&guard.path, format!("guard must return a bool, got {ty}"))
        })
    }

    /// SCXML removeConflictingTransitions: two transitions conflict when their exit sets
    /// intersect; the one whose source is a descendant wins, otherwise the earlier one.
    fn remove_conflicting(&self, enabled: &mut Vec<usize>) {
        if enabled.len() < 2 {
            return;
        }
        let mut filtered: Vec<(usize, Vec<usize>)> = Vec::new();
        for &t1 in enabled.iter() {
            let exit1 = self.exit_set(&[t1]);
            let mut preempted = false;
            let mut remove = Vec::new();
            for (n, (t2, exit2)) in filtered.iter().enumerate() {
                if exit1.iter().any(|s| exit2.binary_search(s).is_ok()) {
                    let s1 = self.chart.transitions[t1].source;
                    let s2 = self.chart.transitions[*t2].source;
                    if self.is_descendant(s1, s2) {
                        remove.push(n);
                    } else {
                        preempted = true;
                        break;
                    }
                }
            }
            if !preempted {
                for n in remove.into_iter().rev() {
                    filtered.remove(n);
                }
                filtered.push((t1, exit1));
            }
        }
        enabled.clear();
        enabled.extend(filtered.into_iter().map(|(t, _)| t));
    }

    // ---- microstep --------------------------------------------------------------------------

    fn microstep(&mut self, enabled: &[usize]) -> Result<(), ChartError> {
        self.count_microstep()?;
        let chart = self.chart;
        // SCXML order: exit (recording history), transition content, then the entry set is
        // computed from the freshly recorded history. The domains are the ones the exit set
        // was computed from: recomputed after history is recorded, a history target can
        // move a domain below states that were just exited (a transition from a region of a
        // parallel state to that state's deep history would then leave the parallel state
        // inactive under its active children; xstate 5 has that flaw, we do not copy it).
        let mut domains = std::mem::take(&mut self.st.scratch.domains);
        domains.clear();
        domains.extend(enabled.iter().map(|&t| self.transition_domain(t)));
        self.exit_states(enabled, &domains)?;
        for &t in enabled {
            self.exec_actions(&chart.transitions[t].actions)?;
        }
        let mut to_enter = std::mem::take(&mut self.st.scratch.to_enter);
        to_enter.0.clear();
        for (&t, &domain) in enabled.iter().zip(&domains) {
            let def = &chart.transitions[t];
            if def.targets.is_empty() {
                continue;
            }
            for &s in &def.targets {
                self.add_descendants(s, &mut to_enter);
            }
            for s in self.effective_targets(t) {
                self.add_ancestors(s, domain, &mut to_enter);
            }
        }
        self.st.scratch.domains = domains;
        // Domains are compound states or the root. SCXML's root (`<scxml>`) is never
        // parallel, ours may be: when the root was the domain, its regions that no target
        // re-entered are re-entered by default, as a parallel ancestor would be.
        if chart.states[0].kind == Kind::Parallel {
            for &c in &chart.states[0].children {
                if !chart.states[c].is_history()
                    && !self.st.active[c]
                    && !to_enter.iter().any(|&x| x == c || self.is_descendant(x, c))
                {
                    self.add_descendants(c, &mut to_enter);
                }
            }
        }
        self.enter_set(&to_enter)?;
        self.st.scratch.to_enter = to_enter;
        self.after_microstep()
    }

    /// `domains[i]` is the domain of `enabled[i]`.
    fn exit_states(&mut self, enabled: &[usize], domains: &[usize]) -> Result<(), ChartError> {
        let chart = self.chart;
        let mut exit = std::mem::take(&mut self.st.scratch.exit);
        self.exit_set_into(enabled, |i, _| domains[i], &mut exit);
        // Record history for every exited state first (SCXML exitStates).
        for &s in exit.iter().rev() {
            for &h in &chart.states[s].histories {
                let deep = matches!(chart.states[h].kind, Kind::History { deep: true });
                let active = &self.st.active;
                // Reuses the previous record's allocation. Both lists are in document order.
                let rec = self.st.history.entry(h).or_default();
                rec.clear();
                if deep {
                    rec.extend(
                        (s + 1..chart.states[s].end)
                            .filter(|&x| active[x] && chart.states[x].is_atomic()),
                    );
                } else {
                    let children = chart.states[s].children.iter().copied();
                    rec.extend(children.filter(|&x| active[x]));
                }
            }
        }
        for &s in exit.iter().rev() {
            self.exec_actions(&chart.states[s].exit)?;
            let after = &chart.states[s].after;
            if !after.is_empty() {
                self.drop_timers(|t| after.iter().any(|(_, id)| *id == t.id));
            }
            self.st.active[s] = false;
        }
        self.st.scratch.exit = exit;
        Ok(())
    }

    /// SCXML computeExitSet: active proper descendants of each transition's domain, sorted
    /// (document order).
    fn exit_set(&self, ts: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        self.exit_set_into(ts, |_, t| self.transition_domain(t), &mut out);
        out
    }

    /// [`Self::exit_set`] with the domain of `ts[i]` given by `domain(i, ts[i])`.
    fn exit_set_into(
        &self,
        ts: &[usize],
        domain: impl Fn(usize, usize) -> usize,
        out: &mut Vec<usize>,
    ) {
        out.clear();
        for (i, &t) in ts.iter().enumerate() {
            if self.chart.transitions[t].targets.is_empty() {
                continue;
            }
            let domain = domain(i, t);
            for s in domain + 1..self.chart.states[domain].end {
                if self.st.active[s] {
                    out.push(s);
                }
            }
        }
        if ts.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }

    /// SCXML getTransitionDomain. `reenter: false` keeps the source only when it is compound
    /// and every effective target is a proper descendant; otherwise the LCCA of source and
    /// targets (the root when nothing else contains them).
    fn transition_domain(&self, t: usize) -> usize {
        let def = &self.chart.transitions[t];
        if !def.reenter
            && self.chart.states[def.source].kind == Kind::Compound
            && self
                .effective_targets(t)
                .all(|s| self.is_descendant(s, def.source))
        {
            return def.source;
        }
        // findLCCA: the nearest proper ancestor of the source that is compound (or the root)
        // and contains every target.
        let mut cur = self.chart.states[def.source].parent;
        while let Some(anc) = cur {
            let eligible = anc == 0 || self.chart.states[anc].kind == Kind::Compound;
            if eligible
                && self
                    .effective_targets(t)
                    .all(|s| self.is_descendant(s, anc))
            {
                return anc;
            }
            cur = self.chart.states[anc].parent;
        }
        0
    }

    /// SCXML getEffectiveTargetStates: history targets are replaced by what they recorded
    /// (or their default targets). A state may come more than once (SCXML's is a set): that
    /// changes nothing where they are used (tested with `all`, added to sets), and listing
    /// them in place allocates nothing.
    fn effective_targets(&self, t: usize) -> impl Iterator<Item = usize> + '_ {
        let chart = self.chart;
        chart.transitions[t]
            .targets
            .iter()
            .flat_map(move |s| self.history_or(s))
            .copied()
    }

    /// What history state `s` recorded (or its default targets); `s` itself for any other
    /// state.
    fn history_or<'a>(&'a self, s: &'a usize) -> &'a [usize] {
        let node = &self.chart.states[*s];
        if !node.is_history() {
            return std::slice::from_ref(s);
        }
        match self.st.history.get(s) {
            Some(rec) => rec,
            None => &node.history_default,
        }
    }

    /// SCXML addDescendantStatesToEnter.
    fn add_descendants(&self, s: usize, to_enter: &mut StateSet) {
        let chart = self.chart;
        let node = &chart.states[s];
        match node.kind {
            Kind::History { .. } => {
                let Some(parent) = node.parent else { return };
                let list = self.history_or(&s);
                for &x in list {
                    self.add_descendants(x, to_enter);
                }
                for &x in list {
                    self.add_ancestors(x, parent, to_enter);
                }
            }
            Kind::Compound => {
                to_enter.insert(s);
                if let Some(init) = node.initial {
                    self.add_descendants(init, to_enter);
                    self.add_ancestors(init, s, to_enter);
                }
            }
            Kind::Parallel => {
                to_enter.insert(s);
                for &c in &node.children {
                    if chart.states[c].is_history() {
                        continue;
                    }
                    if !to_enter.iter().any(|&x| x == c || self.is_descendant(x, c)) {
                        self.add_descendants(c, to_enter);
                    }
                }
            }
            Kind::Atomic | Kind::Final => {
                to_enter.insert(s);
            }
        }
    }

    /// SCXML addAncestorStatesToEnter: proper ancestors of `s` below `ancestor`, filling in
    /// the other regions of parallel ancestors.
    fn add_ancestors(&self, s: usize, ancestor: usize, to_enter: &mut StateSet) {
        let chart = self.chart;
        let mut cur = chart.states[s].parent;
        while let Some(anc) = cur {
            if anc == ancestor {
                break;
            }
            to_enter.insert(anc);
            if chart.states[anc].kind == Kind::Parallel {
                for &c in &chart.states[anc].children {
                    if chart.states[c].is_history() {
                        continue;
                    }
                    if !to_enter.iter().any(|&x| x == c || self.is_descendant(x, c)) {
                        self.add_descendants(c, to_enter);
                    }
                }
            }
            cur = chart.states[anc].parent;
        }
    }

    /// SCXML enterStates (the loop part), with XState v5 completion of final states.
    fn enter_set(&mut self, to_enter: &StateSet) -> Result<(), ChartError> {
        let chart = self.chart;
        let mut completed: BTreeSet<usize> = BTreeSet::new();
        for &s in &to_enter.0 {
            self.st.active[s] = true;
            let node = &chart.states[s];
            self.exec_actions(&node.entry)?;
            for (ms, name) in &node.after {
                let due = self.now.saturating_add(*ms);
                let id = self.st.scratch.string(name);
                let event = Event::new(self.st.scratch.string(name), Value::Null);
                self.schedule(id, due, event)?;
            }
            if node.kind != Kind::Final {
                continue;
            }
            let data = match &node.output {
                Some(o) => self.value(o)?,
                None => Value::Null,
            };
            let Some(parent) = node.parent else { continue };
            let parent_kind = chart.states[parent].kind;
            if parent_kind == Kind::Compound && parent != 0 {
                let name = self.st.scratch.string(&chart.states[parent].done_event);
                self.raise(Event::new(name, data.clone()))?;
            }
            let mut marker = if parent_kind == Kind::Parallel {
                Some(parent)
            } else {
                chart.states[parent].parent
            };
            while let Some(m) = marker {
                if chart.states[m].kind != Kind::Parallel
                    || completed.contains(&m)
                    || !self.in_final(m)
                {
                    break;
                }
                completed.insert(m);
                if m != 0 {
                    let name = self.st.scratch.string(&chart.states[m].done_event);
                    self.raise(Event::new(name, Value::Null))?;
                }
                marker = chart.states[m].parent;
            }
            if marker.is_some() {
                continue;
            }
            // The machine is done: evaluate the root output.
            self.st.done = true;
            let final_data = if parent == 0 { data } else { Value::Null };
            self.st.output = match &chart.output {
                Some(o) => {
                    let cause = std::mem::replace(
                        &mut self.event,
                        Event::new(chart.states[0].done_event.clone(), final_data),
                    );
                    self.event_dyn = None;
                    let out = self.value(o);
                    self.set_event(cause);
                    out?
                }
                None => final_data,
            };
        }
        Ok(())
    }

    /// After a microstep that finished the machine: exit actions of every active state run in
    /// exit order (XState v5), but the configuration keeps them.
    fn after_microstep(&mut self) -> Result<(), ChartError> {
        if !self.st.done {
            return Ok(());
        }
        let chart = self.chart;
        for s in (0..chart.states.len()).rev() {
            if self.st.active[s] {
                self.exec_actions(&chart.states[s].exit)?;
            }
        }
        self.st.timers.clear();
        self.st.scratch.internal.clear();
        self.st.scratch.external.clear();
        Ok(())
    }

    /// XState isInFinalState.
    fn in_final(&self, s: usize) -> bool {
        let node = &self.chart.states[s];
        match node.kind {
            Kind::Compound => node
                .children
                .iter()
                .any(|&c| self.st.active[c] && self.chart.states[c].kind == Kind::Final),
            Kind::Parallel => node
                .children
                .iter()
                .filter(|&&c| !self.chart.states[c].is_history())
                .all(|&c| self.in_final(c)),
            Kind::Final => true,
            _ => false,
        }
    }

    /// `a` is a proper descendant of `b`.
    fn is_descendant(&self, a: usize, b: usize) -> bool {
        descends(self.chart, a, b)
    }

    // ---- actions ----------------------------------------------------------------------------

    fn raise(&mut self, ev: Event) -> Result<(), ChartError> {
        if self.st.scratch.internal.len() >= MAX_QUEUE {
            return Err(ChartError::runtime(
                "$",
                "internal event queue overflow (a raise loop?)",
            ));
        }
        self.st.scratch.internal.push_back(ev);
        Ok(())
    }

    fn schedule(&mut self, id: String, due_ms: i64, event: Event) -> Result<(), ChartError> {
        if self.st.timers.len() >= MAX_TIMERS {
            return Err(ChartError::runtime(
                "$",
                format!("more than {MAX_TIMERS} pending timers"),
            ));
        }
        self.st.timers.push(Timer {
            id,
            due_ms,
            seq: self.st.timer_seq,
            event,
        });
        self.st.timer_seq = self.st.timer_seq.wrapping_add(1);
        Ok(())
    }

    fn effect(&mut self, e: Effect) -> Result<(), ChartError> {
        if self.effects.len() >= MAX_EFFECTS {
            return Err(ChartError::runtime(
                "$",
                format!("more than {MAX_EFFECTS} effects in one call"),
            ));
        }
        self.effects.push(e);
        Ok(())
    }

    fn exec_actions(&mut self, actions: &[Action]) -> Result<(), ChartError> {
        for a in actions {
            self.exec_action(a)?;
        }
        Ok(())
    }

    fn exec_action(&mut self, action: &Action) -> Result<(), ChartError> {
        match action {
            Action::Assign { fields, path } => {
                // XState v5: every property sees the context as it was before this assign.
                if let [(k, v)] = fields.as_slice() {
                    let mut value = self.spare_for(v);
                    self.value_into(v, &mut value)?;
                    self.set_field(path, k, value)?;
                } else {
                    let mut values = Vec::with_capacity(fields.len());
                    for (k, v) in fields {
                        values.push((k, self.value(v)?));
                    }
                    for (k, v) in values {
                        self.set_field(path, k, v)?;
                    }
                }
            }
            Action::Raise { event, data } => {
                let data = self.opt_value(data)?;
                let name = self.st.scratch.string(event);
                self.raise(Event::new(name, data))?;
            }
            Action::Send {
                event,
                data,
                delay,
                id,
            } => {
                let data = self.opt_value(data)?;
                let ev = Event::new(self.st.scratch.string(event), data);
                if *delay == 0 {
                    if self.st.scratch.external.len() >= MAX_QUEUE {
                        return Err(ChartError::runtime("$", "external event queue overflow"));
                    }
                    self.st.scratch.external.push_back(ev);
                } else {
                    let id = id
                        .clone()
                        .unwrap_or_else(|| format!("xstate.send.{}", self.st.timer_seq));
                    let due = self.now.saturating_add(*delay);
                    self.schedule(id, due, ev)?;
                }
            }
            Action::Cancel { id } => self.drop_timers(|t| t.id == *id),
            Action::Log { label, expr } => {
                let value = self.opt_value(expr)?;
                self.effect(Effect::Log {
                    label: label.clone(),
                    value,
                })?;
            }
            Action::Emit { topic, event, expr } => {
                let data = self.opt_value(expr)?;
                self.effect(Effect::Emit {
                    topic: topic.clone(),
                    event: event.clone(),
                    data,
                })?;
            }
        }
        Ok(())
    }

    fn set_field(&mut self, path: &str, key: &str, value: Value) -> Result<(), ChartError> {
        let Value::Object(ctx) = &mut self.st.context else {
            return Err(ChartError::runtime(path, "context is not an object"));
        };
        // Replacing in place keeps the key's position and its allocation.
        let slot = if ctx.len() <= SMALL_MAP {
            ctx.iter_mut()
                .find(|(k, _)| k.as_str() == key)
                .map(|(_, v)| v)
        } else {
            ctx.get_mut(key)
        };
        match slot {
            Some(slot) => {
                let old = std::mem::replace(slot, value);
                self.st.scratch.keep_spare(old);
            }
            None => {
                ctx.insert(key.to_owned(), value);
            }
        }
        self.ctx_dyn = None;
        self.ctx_dirty = true;
        Ok(())
    }

    fn opt_value(&mut self, v: &Option<ValueExpr>) -> Result<Value, ChartError> {
        match v {
            Some(v) => self.value(v),
            None => Ok(Value::Null),
        }
    }

    fn value(&mut self, v: &ValueExpr) -> Result<Value, ChartError> {
        match v {
            ValueExpr::Literal(l) => Ok(l.clone()),
            ValueExpr::Expr(e) => {
                if let Some(fast) = &e.fast {
                    let env = self.env();
                    if let Some((v, ops)) = fast.eval_json(&env, self.allowed()) {
                        self.spent += ops;
                        return Ok(v);
                    }
                }
                self.rhai_value(e)
            }
        }
    }

    /// [`Self::value`] written into `out`, reusing its allocations on the fast path (see
    /// `Fast::eval_into`).
    fn value_into(&mut self, v: &ValueExpr, out: &mut Value) -> Result<(), ChartError> {
        match v {
            ValueExpr::Literal(l) => out.clone_from(l),
            ValueExpr::Expr(e) => {
                if let Some(fast) = &e.fast {
                    let env = self.env();
                    if let Some(ops) = fast.eval_into(&env, self.allowed(), out) {
                        self.spent += ops;
                        return Ok(());
                    }
                }
                *out = self.rhai_value(e)?;
            }
        }
        Ok(())
    }

    fn rhai_value(&mut self, e: &Expr) -> Result<Value, ChartError> {
        let d = self.eval(e)?;
        to_json(&d, &e.path)
    }

    /// A spare object shaped like what `v` builds, or null.
    fn spare_for(&mut self, v: &ValueExpr) -> Value {
        let ValueExpr::Expr(Expr {
            fast: Some(fast), ..
        }) = v
        else {
            return Value::Null;
        };
        let spares = &mut self.st.scratch.spares;
        match spares.iter().position(|s| fast.fits(s)) {
            Some(i) => spares.swap_remove(i),
            None => Value::Null,
        }
    }

    fn env(&self) -> Env<'_> {
        Env {
            context: &self.st.context,
            event_type: &self.event.name,
            event_data: &self.event.data,
            auth: self.auth,
        }
    }

    /// Operations the next evaluation may take before the call's budget is spent.
    fn allowed(&self) -> u64 {
        CALL_OPERATIONS.saturating_sub(self.spent)
    }

    fn eval(&mut self, e: &Expr) -> Result<Dynamic, ChartError> {
        let auth = match &self.auth_dyn {
            Some(d) => d.clone(),
            None => {
                let d = to_dynamic(self.auth, "auth")?;
                self.auth_dyn = Some(d.clone());
                d
            }
        };
        let ctx = match &self.ctx_dyn {
            Some(d) => d.clone(),
            None => {
                let d = to_dynamic(&self.st.context, &e.path)?;
                self.ctx_dyn = Some(d.clone());
                d
            }
        };
        let ev = match &self.event_dyn {
            Some(d) => d.clone(),
            None => {
                let d = event_dynamic(&self.event.name, &self.event.data, &e.path)?;
                self.event_dyn = Some(d.clone());
                d
            }
        };
        let mut scope = Scope::new();
        scope.push_constant_dynamic("context", ctx);
        scope.push_constant_dynamic("event", ev);
        scope.push_constant_dynamic("auth", auth);
        let active = Active {
            ids: &self.chart.by_id,
            flags: &self.st.active,
        };
        let (result, ops) = self
            .chart
            .sandbox
            .eval(e, &mut scope, Some(active), self.allowed());
        self.spent = self.spent.saturating_add(ops);
        result
    }
}

/// `a` is a proper descendant of `b`.
fn descends(chart: &Chart, a: usize, b: usize) -> bool {
    b < a && a < chart.states[b].end
}

/// At least `json_size(value)`, without looking at string contents: escaped, a byte takes at
/// most 6 bytes (`\u00XX`), and a number at most 24 (`-1.2345678901234567e-308`).
fn json_size_bound(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 24,
        Value::String(s) => s.len().saturating_mul(6).saturating_add(2),
        Value::Array(list) => list.iter().fold(list.len().saturating_add(2), |n, v| {
            n.saturating_add(json_size_bound(v))
        }),
        Value::Object(map) => map.iter().fold(
            map.len().saturating_mul(2).saturating_add(2),
            |n, (k, v)| {
                n.saturating_add(k.len().saturating_mul(6).saturating_add(2))
                    .saturating_add(json_size_bound(v))
            },
        ),
    }
}

/// Length of `value` as compact JSON, without building the bytes.
pub(crate) fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

fn bad_config(id: &str, why: &str) -> ChartError {
    ChartError::input(
        "state.configuration",
        format!("configuration is not legal for this chart version: \"{id}\": {why}"),
    )
}
