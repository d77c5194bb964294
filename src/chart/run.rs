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
//! - Errors abort the whole call; the caller keeps its previous `InstanceState`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rhai::{Dynamic, Scope};
use serde_json::Value;

use super::expr::{event_dynamic, to_dynamic, to_json, Active, Expr, ValueExpr, CALL_OPERATIONS};
use super::fast::Env;
use super::model::{Effect, Event, InstanceState, Step, Timer, WriteKind};
use super::parse::{Action, Kind};
use super::{
    Chart, ChartError, MAX_CONTEXT_BYTES, MAX_EXTERNAL_EVENTS, MAX_MICROSTEPS, MAX_TIMERS,
    MAX_TIMERS_PER_ADVANCE,
};

const MAX_QUEUE: usize = 10_000;
const MAX_EFFECTS: usize = 10_000;
const INIT_EVENT: &str = "xstate.init";

struct Run<'c> {
    chart: &'c Chart,
    /// Expression operations this call (or this timer of an advance) has spent.
    spent: u64,
    active: Vec<bool>,
    /// History state index → recorded state indices.
    history: BTreeMap<usize, Vec<usize>>,
    context: Value,
    ctx_dyn: Option<Dynamic>,
    auth: Value,
    auth_dyn: Option<Dynamic>,
    event: Event,
    event_dyn: Option<Dynamic>,
    internal: VecDeque<Event>,
    external: VecDeque<Event>,
    timers: Vec<Timer>,
    timer_seq: u64,
    effects: Vec<Effect>,
    microsteps: u32,
    total_microsteps: u32,
    done: bool,
    output: Value,
    now: i64,
}

pub(crate) fn initial(
    chart: &Chart,
    context: Value,
    auth: &Value,
    now: i64,
) -> Result<Step, ChartError> {
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
    let mut run = Run::new(chart, ctx, Vec::new(), auth, now)?;
    run.event = Event::new(INIT_EVENT, Value::Null);
    run.start()?;
    run.run_external()?;
    run.finish(None)
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
    let mut run = Run::load(chart, state, auth, now)?;
    run.external.push_back(event);
    run.run_external()?;
    run.finish(Some(state))
}

pub(crate) fn advance(chart: &Chart, state: &InstanceState, now: i64) -> Result<Step, ChartError> {
    if state.done || !state.timers.iter().any(|t| t.due_ms <= now) {
        return Ok(unchanged(state));
    }
    let mut run = Run::load(chart, state, &Value::Null, now)?;
    let mut fired = 0;
    let mut spent: u64 = 0;
    // Each timer is a top-level event with its own operation budget; the advance as a whole
    // stops early (leaving timers due, see `next_due`) once it has used one budget's worth.
    while !run.done && fired < MAX_TIMERS_PER_ADVANCE && spent < CALL_OPERATIONS {
        // Due order, ties in schedule order.
        let Some(next) = run
            .timers
            .iter()
            .enumerate()
            .filter(|(_, t)| t.due_ms <= now)
            .min_by_key(|(_, t)| (t.due_ms, t.seq))
            .map(|(i, _)| i)
        else {
            break;
        };
        let timer = run.timers.remove(next);
        // Time inside the advance is the timer's due time, so chained delays stay exact.
        run.now = timer.due_ms;
        run.external.push_back(timer.event);
        run.run_external()?;
        fired += 1;
        spent = spent.saturating_add(std::mem::take(&mut run.spent));
    }
    run.now = now;
    run.finish(Some(state))
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
    Run::load(chart, state, &Value::Null, 0).map(|_| ())
}

pub(crate) fn allow_read(
    chart: &Chart,
    state: &InstanceState,
    auth: &Value,
) -> Result<bool, ChartError> {
    let Some(expr) = &chart.allow_read else {
        return Ok(true);
    };
    let mut scope = Scope::new();
    scope.push_constant_dynamic("context", to_dynamic(&state.context, &expr.path)?);
    scope.push_constant_dynamic("auth", to_dynamic(auth, &expr.path)?);
    scope.push_constant_dynamic("state", to_dynamic(&chart.state_value(state), &expr.path)?);
    expect_bool(chart, expr, &mut scope, "allowRead")
}

pub(crate) fn allow_write(
    chart: &Chart,
    kind: WriteKind,
    event: Option<&Event>,
    context: &Value,
    auth: &Value,
) -> Result<bool, ChartError> {
    let Some(expr) = &chart.allow_write else {
        return Ok(true);
    };
    let mut scope = Scope::new();
    let ev = match event {
        Some(e) => event_dynamic(&e.name, &e.data, &expr.path)?,
        None => event_dynamic(INIT_EVENT, &Value::Null, &expr.path)?,
    };
    scope.push_constant_dynamic("type", Dynamic::from(kind.as_str().to_string()));
    scope.push_constant_dynamic("event", ev);
    scope.push_constant_dynamic("context", to_dynamic(context, &expr.path)?);
    scope.push_constant_dynamic("auth", to_dynamic(auth, &expr.path)?);
    expect_bool(chart, expr, &mut scope, "allowWrite")
}

fn expect_bool(
    chart: &Chart,
    expr: &Expr,
    scope: &mut Scope,
    what: &str,
) -> Result<bool, ChartError> {
    // Authorizers run on their own, with a whole budget.
    let v = chart.sandbox.eval(expr, scope, None, CALL_OPERATIONS).0?;
    v.as_bool()
        .map_err(|t| ChartError::runtime(&expr.path, format!("{what} must return a bool, got {t}")))
}

impl<'c> Run<'c> {
    fn new(
        chart: &'c Chart,
        context: Value,
        timers: Vec<Timer>,
        auth: &Value,
        now: i64,
    ) -> Result<Run<'c>, ChartError> {
        let mut active = vec![false; chart.states.len()];
        active[0] = true;
        Ok(Run {
            chart,
            spent: 0,
            active,
            history: BTreeMap::new(),
            context,
            ctx_dyn: None,
            auth: auth.clone(),
            auth_dyn: None,
            // Every path sets the event before anything reads it.
            event: Event::new(String::new(), Value::Null),
            event_dyn: None,
            internal: VecDeque::new(),
            external: VecDeque::new(),
            timers,
            timer_seq: 0,
            effects: Vec::new(),
            microsteps: 0,
            total_microsteps: 0,
            done: false,
            output: Value::Null,
            now,
        })
    }

    fn load(
        chart: &'c Chart,
        state: &InstanceState,
        auth: &Value,
        now: i64,
    ) -> Result<Run<'c>, ChartError> {
        let mut run = Run::new(
            chart,
            state.context.clone(),
            state.timers.clone(),
            auth,
            now,
        )?;
        run.timer_seq = state.timer_seq;
        run.done = state.done;
        run.output = state.output.clone();
        for id in &state.configuration {
            match chart.by_id.get(id) {
                Some(&i) if i != 0 && !chart.states[i].is_history() => run.active[i] = true,
                _ => {
                    return Err(ChartError::input(
                        "state.configuration",
                        format!("\"{id}\" is not a state of this chart version"),
                    ))
                }
            }
        }
        run.check_configuration()?;
        // Unknown history entries are dropped: they can only come from another version.
        for (h, ids) in &state.history {
            let Some(&hi) = chart.by_id.get(h) else {
                continue;
            };
            if !chart.states[hi].is_history() {
                continue;
            }
            let rec: Vec<usize> = ids
                .iter()
                .filter_map(|id| chart.by_id.get(id).copied())
                .collect();
            if rec.len() == ids.len() {
                run.history.insert(hi, rec);
            }
        }
        Ok(run)
    }

    /// A legal SCXML configuration: ancestors of active states are active, an active compound
    /// has exactly one active child, an active parallel has all its children active.
    fn check_configuration(&self) -> Result<(), ChartError> {
        for (i, node) in self.chart.states.iter().enumerate() {
            if !self.active[i] {
                continue;
            }
            if let Some(p) = node.parent {
                if !self.active[p] {
                    return Err(bad_config(&node.id, "its parent is not active"));
                }
            }
            let kids = node.children.iter().filter(|&&c| self.active[c]).count();
            let regions = node
                .children
                .iter()
                .filter(|&&c| !self.chart.states[c].is_history())
                .count();
            let ok = match node.kind {
                Kind::Compound => kids == 1,
                Kind::Parallel => kids == regions,
                _ => true,
            };
            if !ok {
                return Err(bad_config(
                    &node.id,
                    "its active children are not a legal configuration",
                ));
            }
        }
        Ok(())
    }

    fn finish(mut self, before: Option<&InstanceState>) -> Result<Step, ChartError> {
        let size = json_size(&self.context);
        if size > MAX_CONTEXT_BYTES {
            return Err(ChartError::runtime(
                "$.context",
                format!("context is {size} bytes as JSON; the limit is {MAX_CONTEXT_BYTES}"),
            ));
        }
        if self.done {
            self.timers.clear();
        }
        let configuration = self
            .chart
            .states
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(i, _)| self.active[*i])
            .map(|(_, n)| n.id.clone())
            .collect();
        let history = self
            .history
            .iter()
            .map(|(h, v)| {
                (
                    self.chart.states[*h].id.clone(),
                    v.iter().map(|&s| self.chart.states[s].id.clone()).collect(),
                )
            })
            .collect();
        let state = InstanceState {
            configuration,
            history,
            context: self.context,
            timers: self.timers,
            timer_seq: self.timer_seq,
            done: self.done,
            output: self.output,
        };
        let changed = match before {
            Some(b) => *b != state,
            None => true,
        };
        Ok(Step {
            state,
            effects: self.effects,
            microsteps: self.total_microsteps,
            changed,
        })
    }

    // ---- main loop -------------------------------------------------------------------------

    /// Enters the initial configuration (SCXML: the initial transition of `<scxml>`), then
    /// settles.
    fn start(&mut self) -> Result<(), ChartError> {
        self.count_microstep()?;
        let mut to_enter = BTreeSet::new();
        self.add_descendants(0, &mut to_enter);
        self.enter_set(to_enter)?;
        self.after_microstep()?;
        self.settle()
    }

    /// Takes external events until the queue is empty (undelayed sends land here).
    fn run_external(&mut self) -> Result<(), ChartError> {
        let mut taken = 0;
        while let Some(ev) = self.external.pop_front() {
            if self.done {
                self.external.clear();
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
            let enabled = self.select_transitions(false)?;
            if !enabled.is_empty() {
                self.microstep(&enabled)?;
            }
            self.settle()?;
        }
        Ok(())
    }

    /// SCXML mainEventLoop inner part: eventless transitions first, then the internal queue.
    fn settle(&mut self) -> Result<(), ChartError> {
        while !self.done {
            let mut enabled = self.select_transitions(true)?;
            if enabled.is_empty() {
                let Some(ev) = self.internal.pop_front() else {
                    break;
                };
                self.set_event(ev);
                enabled = self.select_transitions(false)?;
            }
            if !enabled.is_empty() {
                self.microstep(&enabled)?;
            }
        }
        if self.done {
            self.internal.clear();
        }
        Ok(())
    }

    fn set_event(&mut self, ev: Event) {
        self.event = ev;
        self.event_dyn = None;
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
    fn select_transitions(&mut self, eventless: bool) -> Result<Vec<usize>, ChartError> {
        let chart = self.chart;
        let mut enabled: Vec<usize> = Vec::new();
        // Guards cannot change the configuration, so the active atomic states can be found
        // while selecting.
        for atomic in 0..chart.states.len() {
            if !self.active[atomic]
                || chart.states[atomic]
                    .children
                    .iter()
                    .any(|&c| self.active[c])
            {
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
        Ok(self.remove_conflicting(enabled))
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
    fn remove_conflicting(&self, enabled: Vec<usize>) -> Vec<usize> {
        if enabled.len() < 2 {
            return enabled;
        }
        let mut filtered: Vec<(usize, Vec<usize>)> = Vec::new();
        for t1 in enabled {
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
        filtered.into_iter().map(|(t, _)| t).collect()
    }

    // ---- microstep --------------------------------------------------------------------------

    fn microstep(&mut self, enabled: &[usize]) -> Result<(), ChartError> {
        self.count_microstep()?;
        let chart = self.chart;
        // SCXML order: exit (recording history), transition content, then the entry set is
        // computed from the freshly recorded history.
        self.exit_states(enabled)?;
        for &t in enabled {
            self.exec_actions(&chart.transitions[t].actions)?;
        }
        let mut to_enter = BTreeSet::new();
        for &t in enabled {
            let def = &chart.transitions[t];
            if def.targets.is_empty() {
                continue;
            }
            for &s in &def.targets {
                self.add_descendants(s, &mut to_enter);
            }
            let domain = self.transition_domain(t);
            for &s in self.effective_targets(t).iter() {
                self.add_ancestors(s, domain, &mut to_enter);
            }
        }
        // Domains are compound states or the root. SCXML's root (`<scxml>`) is never
        // parallel, ours may be: when the root was the domain, its regions that no target
        // re-entered are re-entered by default, as a parallel ancestor would be.
        if chart.states[0].kind == Kind::Parallel {
            for &c in &chart.states[0].children {
                if !chart.states[c].is_history()
                    && !self.active[c]
                    && !to_enter.iter().any(|&x| x == c || self.is_descendant(x, c))
                {
                    self.add_descendants(c, &mut to_enter);
                }
            }
        }
        self.enter_set(to_enter)?;
        self.after_microstep()
    }

    fn exit_states(&mut self, enabled: &[usize]) -> Result<(), ChartError> {
        let chart = self.chart;
        let exit = self.exit_set(enabled);
        // Record history for every exited state first (SCXML exitStates).
        for &s in exit.iter().rev() {
            for &h in &chart.states[s].histories {
                let deep = matches!(chart.states[h].kind, Kind::History { deep: true });
                let rec: Vec<usize> = (0..chart.states.len())
                    .filter(|&x| {
                        self.active[x]
                            && if deep {
                                chart.states[x].is_atomic() && self.is_descendant(x, s)
                            } else {
                                chart.states[x].parent == Some(s)
                            }
                    })
                    .collect();
                self.history.insert(h, rec);
            }
        }
        for &s in exit.iter().rev() {
            self.exec_actions(&chart.states[s].exit)?;
            let after = &chart.states[s].after;
            if !after.is_empty() {
                self.timers
                    .retain(|t| !after.iter().any(|(_, id)| *id == t.id));
            }
            self.active[s] = false;
        }
        Ok(())
    }

    /// SCXML computeExitSet: active proper descendants of each transition's domain, sorted
    /// (document order).
    fn exit_set(&self, ts: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        for &t in ts {
            if self.chart.transitions[t].targets.is_empty() {
                continue;
            }
            let domain = self.transition_domain(t);
            for s in 0..self.chart.states.len() {
                if self.active[s] && self.is_descendant(s, domain) {
                    out.push(s);
                }
            }
        }
        if ts.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
        out
    }

    /// SCXML getTransitionDomain. `reenter: false` keeps the source only when it is compound
    /// and every effective target is a proper descendant; otherwise the LCCA of source and
    /// targets (the root when nothing else contains them).
    fn transition_domain(&self, t: usize) -> usize {
        let def = &self.chart.transitions[t];
        let targets = self.effective_targets(t);
        if !def.reenter
            && self.chart.states[def.source].kind == Kind::Compound
            && targets.iter().all(|&s| self.is_descendant(s, def.source))
        {
            return def.source;
        }
        // findLCCA: the nearest proper ancestor of the source that is compound (or the root)
        // and contains every target.
        let mut cur = self.chart.states[def.source].parent;
        while let Some(anc) = cur {
            let eligible = anc == 0 || self.chart.states[anc].kind == Kind::Compound;
            if eligible && targets.iter().all(|&s| self.is_descendant(s, anc)) {
                return anc;
            }
            cur = self.chart.states[anc].parent;
        }
        0
    }

    /// SCXML getEffectiveTargetStates: history targets are replaced by what they recorded
    /// (or their default targets).
    /// Without a history target these are the targets themselves (a repeated target changes
    /// nothing where they are used: they are tested with `all` and added to sets).
    fn effective_targets(&self, t: usize) -> Cow<'c, [usize]> {
        let chart = self.chart;
        let targets = &chart.transitions[t].targets;
        if !targets.iter().any(|&s| chart.states[s].is_history()) {
            return Cow::Borrowed(targets);
        }
        let mut out = Vec::new();
        for &s in targets {
            if self.chart.states[s].is_history() {
                let list = match self.history.get(&s) {
                    Some(rec) => rec.clone(),
                    None => self.chart.states[s].history_default.clone(),
                };
                for x in list {
                    if !out.contains(&x) {
                        out.push(x);
                    }
                }
            } else if !out.contains(&s) {
                out.push(s);
            }
        }
        Cow::Owned(out)
    }

    /// SCXML addDescendantStatesToEnter.
    fn add_descendants(&self, s: usize, to_enter: &mut BTreeSet<usize>) {
        let chart = self.chart;
        let node = &chart.states[s];
        match node.kind {
            Kind::History { .. } => {
                let Some(parent) = node.parent else { return };
                let list = match self.history.get(&s) {
                    Some(rec) => rec.clone(),
                    None => node.history_default.clone(),
                };
                for &x in &list {
                    self.add_descendants(x, to_enter);
                }
                for &x in &list {
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
    fn add_ancestors(&self, s: usize, ancestor: usize, to_enter: &mut BTreeSet<usize>) {
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
    fn enter_set(&mut self, to_enter: BTreeSet<usize>) -> Result<(), ChartError> {
        let chart = self.chart;
        let mut completed: BTreeSet<usize> = BTreeSet::new();
        for s in to_enter {
            self.active[s] = true;
            let node = &chart.states[s];
            self.exec_actions(&node.entry)?;
            for (ms, name) in &node.after {
                let due = self.now.saturating_add(*ms);
                self.schedule(name.clone(), due, Event::new(name.clone(), Value::Null))?;
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
                self.raise(Event::new(
                    format!("done.state.{}", chart.states[parent].id),
                    data.clone(),
                ))?;
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
                    self.raise(Event::new(
                        format!("done.state.{}", chart.states[m].id),
                        Value::Null,
                    ))?;
                }
                marker = chart.states[m].parent;
            }
            if marker.is_some() {
                continue;
            }
            // The machine is done: evaluate the root output.
            self.done = true;
            let final_data = if parent == 0 { data } else { Value::Null };
            self.output = match &chart.output {
                Some(o) => {
                    let cause = std::mem::replace(
                        &mut self.event,
                        Event::new(format!("done.state.{}", chart.states[0].id), final_data),
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
        if !self.done {
            return Ok(());
        }
        let chart = self.chart;
        for s in (0..chart.states.len()).rev() {
            if self.active[s] {
                self.exec_actions(&chart.states[s].exit)?;
            }
        }
        self.timers.clear();
        self.internal.clear();
        self.external.clear();
        Ok(())
    }

    /// XState isInFinalState.
    fn in_final(&self, s: usize) -> bool {
        let node = &self.chart.states[s];
        match node.kind {
            Kind::Compound => node
                .children
                .iter()
                .any(|&c| self.active[c] && self.chart.states[c].kind == Kind::Final),
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
        let mut cur = self.chart.states[a].parent;
        while let Some(p) = cur {
            if p == b {
                return true;
            }
            cur = self.chart.states[p].parent;
        }
        false
    }

    // ---- actions ----------------------------------------------------------------------------

    fn raise(&mut self, ev: Event) -> Result<(), ChartError> {
        if self.internal.len() >= MAX_QUEUE {
            return Err(ChartError::runtime(
                "$",
                "internal event queue overflow (a raise loop?)",
            ));
        }
        self.internal.push_back(ev);
        Ok(())
    }

    fn schedule(&mut self, id: String, due_ms: i64, event: Event) -> Result<(), ChartError> {
        if self.timers.len() >= MAX_TIMERS {
            return Err(ChartError::runtime(
                "$",
                format!("more than {MAX_TIMERS} pending timers"),
            ));
        }
        self.timers.push(Timer {
            id,
            due_ms,
            seq: self.timer_seq,
            event,
        });
        self.timer_seq = self.timer_seq.wrapping_add(1);
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
                let mut values = Vec::with_capacity(fields.len());
                for (k, v) in fields {
                    values.push((k, self.value(v)?));
                }
                let Value::Object(ctx) = &mut self.context else {
                    return Err(ChartError::runtime(path, "context is not an object"));
                };
                for (k, v) in values {
                    ctx.insert(k.clone(), v);
                }
                self.ctx_dyn = None;
            }
            Action::Raise { event, data } => {
                let data = self.opt_value(data)?;
                self.raise(Event::new(event.clone(), data))?;
            }
            Action::Send {
                event,
                data,
                delay,
                id,
            } => {
                let data = self.opt_value(data)?;
                let ev = Event::new(event.clone(), data);
                if *delay == 0 {
                    if self.external.len() >= MAX_QUEUE {
                        return Err(ChartError::runtime("$", "external event queue overflow"));
                    }
                    self.external.push_back(ev);
                } else {
                    let id = id
                        .clone()
                        .unwrap_or_else(|| format!("xstate.send.{}", self.timer_seq));
                    let due = self.now.saturating_add(*delay);
                    self.schedule(id, due, ev)?;
                }
            }
            Action::Cancel { id } => self.timers.retain(|t| t.id != *id),
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
                let d = self.eval(e)?;
                to_json(&d, &e.path)
            }
        }
    }

    fn env(&self) -> Env<'_> {
        Env {
            context: &self.context,
            event_type: &self.event.name,
            event_data: &self.event.data,
            auth: &self.auth,
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
                let d = to_dynamic(&self.auth, "auth")?;
                self.auth_dyn = Some(d.clone());
                d
            }
        };
        let ctx = match &self.ctx_dyn {
            Some(d) => d.clone(),
            None => {
                let d = to_dynamic(&self.context, &e.path)?;
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
            flags: &self.active,
        };
        let (result, ops) = self
            .chart
            .sandbox
            .eval(e, &mut scope, Some(active), self.allowed());
        self.spent = self.spent.saturating_add(ops);
        result
    }
}

/// Length of `value` as compact JSON, without building the bytes.
fn json_size(value: &Value) -> usize {
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
