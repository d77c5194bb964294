//! Definition JSON → validated, compiled state tree.
//!
//! Two passes: the first walks `states` in document order (key order) and numbers the nodes in
//! pre-order, so a node's index *is* its document order and every descendant has a larger index
//! than its ancestors (entry order = ascending, exit order = descending). The second pass, with
//! all ids known, resolves `initial`, history defaults and transition targets, and compiles
//! every expression. Every error carries the JSON path of the offending node.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// A JSON object of the definition.
type Object = Map<String, Value>;

use super::expr::{Expr, Sandbox, ValueExpr, READ_VARS, RUN_VARS, WRITE_VARS};
use super::{Chart, ChartError};

/// Id of a root without an `id` (what XState calls it).
pub(crate) const DEFAULT_ROOT_ID: &str = "(machine)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Atomic,
    Compound,
    Parallel,
    Final,
    History { deep: bool },
}

#[derive(Debug)]
pub(crate) struct StateNode {
    pub id: String,
    /// `done.state.<id>`, the event raised when this state completes (built once here, not
    /// on every completion).
    pub done_event: String,
    pub key: String,
    pub path: String,
    pub parent: Option<usize>,
    /// One past the index of this state's last descendant: with pre-order numbering the
    /// descendants are exactly the indices between, so "is a descendant" is two comparisons
    /// and a subtree is a range.
    pub end: usize,
    /// Children in document order, history states included.
    pub children: Vec<usize>,
    pub histories: Vec<usize>,
    pub kind: Kind,
    /// Compound: the initial child (may be a history state).
    pub initial: Option<usize>,
    /// History: default targets when nothing is recorded.
    pub history_default: Vec<usize>,
    /// Event transitions (`on` and `after`) in document order.
    pub transitions: Vec<usize>,
    /// Eventless transitions in document order.
    pub always: Vec<usize>,
    /// `after` delays: (ms, timer event / id).
    pub after: Vec<(i64, String)>,
    pub entry: Vec<Action>,
    pub exit: Vec<Action>,
    pub tags: Vec<String>,
    pub output: Option<ValueExpr>,
}

impl StateNode {
    pub fn is_atomic(&self) -> bool {
        matches!(self.kind, Kind::Atomic | Kind::Final)
    }
    pub fn is_history(&self) -> bool {
        matches!(self.kind, Kind::History { .. })
    }
}

#[derive(Debug)]
pub(crate) enum Trigger {
    /// SCXML event descriptor (normalized: `foo.*` → `foo`; `*` matches everything).
    Descriptor(String),
    /// An `after` timer event, matched exactly.
    Timer(String),
    Always,
}

impl Trigger {
    pub fn matches(&self, event: &str) -> bool {
        match self {
            Trigger::Descriptor(d) => descriptor_matches(d, event),
            Trigger::Timer(name) => name == event,
            Trigger::Always => false,
        }
    }
}

/// SCXML 3.12.1: `foo` matches `foo` and `foo.bar` (token prefix), `*` matches all.
pub(crate) fn descriptor_matches(descriptor: &str, event: &str) -> bool {
    if descriptor == "*" {
        return true;
    }
    // Most descriptors a step tries do not match; a differing first byte says so without
    // calling memcmp.
    if let (Some(d), Some(e)) = (descriptor.as_bytes().first(), event.as_bytes().first()) {
        if d != e {
            return false;
        }
    }
    match event.strip_prefix(descriptor) {
        Some("") => true,
        Some(rest) => rest.starts_with('.'),
        None => false,
    }
}

#[derive(Debug)]
pub(crate) struct TransitionDef {
    pub source: usize,
    pub trigger: Trigger,
    pub guard: Option<Expr>,
    pub targets: Vec<usize>,
    pub actions: Vec<Action>,
    pub reenter: bool,
}

#[derive(Debug)]
pub(crate) enum Action {
    Assign {
        fields: Vec<(String, ValueExpr)>,
        path: String,
    },
    Raise {
        event: String,
        data: Option<ValueExpr>,
    },
    Send {
        event: String,
        data: Option<ValueExpr>,
        delay: i64,
        id: Option<String>,
    },
    Cancel {
        id: String,
    },
    Log {
        label: Option<String>,
        expr: Option<ValueExpr>,
    },
    Emit {
        topic: Option<String>,
        event: Option<String>,
        expr: Option<ValueExpr>,
    },
}

/// Appends `key` to a JSON path, bracketing keys that are not plain identifiers.
pub(crate) fn push_key(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '$');
    if plain {
        format!("{path}.{key}")
    } else {
        format!(
            "{path}[{}]",
            serde_json::to_string(key).unwrap_or_else(|_| format!("\"{key}\""))
        )
    }
}

fn push_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

const STATE_KEYS: &[&str] = &[
    "id",
    "initial",
    "type",
    "states",
    "on",
    "always",
    "after",
    "entry",
    "exit",
    "tags",
    "output",
    "meta",
    "description",
];
const HISTORY_KEYS: &[&str] = &["id", "type", "history", "target", "meta", "description"];
const ROOT_ONLY_KEYS: &[&str] = &["context", "authorizers"];

struct Builder<'a> {
    nodes: Vec<StateNode>,
    raw: Vec<&'a Map<String, Value>>,
    sandbox: Sandbox,
    transitions: Vec<TransitionDef>,
    by_id: HashMap<String, usize>,
}

pub(crate) fn compile(definition: &Value) -> Result<Chart, ChartError> {
    let mut b = Builder {
        nodes: Vec::new(),
        raw: Vec::new(),
        sandbox: Sandbox::new(),
        transitions: Vec::new(),
        by_id: HashMap::new(),
    };
    b.collect(definition, "", None, "$", "", 0)?;
    for i in 0..b.nodes.len() {
        if let Some(&other) = b.by_id.get(&b.nodes[i].id) {
            return Err(ChartError::def(
                &b.nodes[i].path,
                format!(
                    "state id \"{}\" is already used by the state at {}",
                    b.nodes[i].id, b.nodes[other].path
                ),
            ));
        }
        b.by_id.insert(b.nodes[i].id.clone(), i);
    }
    for i in 0..b.nodes.len() {
        b.resolve(i)?;
    }
    let root = b.raw[0];
    let context = match root.get("context") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Err(ChartError::def("$.context", "context must be an object")),
    };
    let (allow_read, allow_write) = match root.get("authorizers") {
        None | Some(Value::Null) => (None, None),
        Some(Value::Object(a)) => {
            let mut read = None;
            let mut write = None;
            for (k, v) in a {
                let path = push_key("$.authorizers", k);
                let vars = match k.as_str() {
                    "allowRead" => READ_VARS,
                    "allowWrite" => WRITE_VARS,
                    _ => {
                        return Err(ChartError::def(
                            path,
                            "unknown authorizer (expected allowRead or allowWrite)",
                        ))
                    }
                };
                let Value::String(src) = v else {
                    return Err(ChartError::def(
                        path,
                        "authorizer must be a Rhai expression string",
                    ));
                };
                let e = b.sandbox.compile(src, vars, &path)?;
                if k == "allowRead" {
                    read = Some(e);
                } else {
                    write = Some(e);
                }
            }
            (read, write)
        }
        Some(_) => {
            return Err(ChartError::def(
                "$.authorizers",
                "authorizers must be an object {allowRead, allowWrite}",
            ))
        }
    };
    for s in (1..b.nodes.len()).rev() {
        if let Some(p) = b.nodes[s].parent {
            b.nodes[p].end = b.nodes[p].end.max(b.nodes[s].end);
        }
    }
    let has_eventless = b.nodes.iter().any(|n| !n.always.is_empty());
    let atomics = (0..b.nodes.len())
        .filter(|&s| b.nodes[s].is_atomic())
        .collect();
    let output = b.nodes[0].output.take();
    let mut histories_by_id: Vec<usize> = (0..b.nodes.len())
        .filter(|&i| b.nodes[i].is_history())
        .collect();
    histories_by_id.sort_by(|&x, &y| b.nodes[x].id.cmp(&b.nodes[y].id));
    let ids_json = b
        .nodes
        .iter()
        .map(|n| {
            serde_json::to_vec(&n.id)
                .unwrap_or_default()
                .into_boxed_slice()
        })
        .collect();
    Ok(Chart {
        histories_by_id,
        ids_json,
        has_eventless,
        atomics,
        states: b.nodes,
        transitions: b.transitions,
        by_id: std::sync::Arc::new(b.by_id),
        context,
        output,
        allow_read,
        allow_write,
        sandbox: b.sandbox,
    })
}

fn as_str<'v>(v: &'v Value, path: &str, what: &str) -> Result<&'v str, ChartError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s),
        Value::String(_) => Err(ChartError::def(path, format!("{what} must not be empty"))),
        _ => Err(ChartError::def(path, format!("{what} must be a string"))),
    }
}

/// An action's `type` and `params` (with the params' path), checked against what that type
/// takes; `empty` stands in for absent params.
fn action_parts<'v>(
    v: &'v Value,
    path: &str,
    empty: &'v Map<String, Value>,
) -> Result<(&'v str, &'v Map<String, Value>, String), ChartError> {
    let obj = match v {
        Value::Object(obj) => obj,
        Value::String(name) => {
            return Err(ChartError::def(
                path,
                format!(
                    "named action \"{name}\" is not supported: write {{\"type\": \"assign\"|\"raise\"|\"send\"|\"cancel\"|\"log\"|\"emit\", \"params\": {{…}}}}"
                ),
            ))
        }
        _ => return Err(ChartError::def(path, "an action must be an object {type, params}")),
    };
    for k in obj.keys() {
        if k != "type" && k != "params" {
            return Err(ChartError::def(
                push_key(path, k),
                format!("unknown action key \"{k}\" (expected type and params)"),
            ));
        }
    }
    let ty = as_str(
        obj.get("type").unwrap_or(&Value::Null),
        &push_key(path, "type"),
        "action type",
    )?;
    let ppath = push_key(path, "params");
    let params = match obj.get("params") {
        None | Some(Value::Null) => empty,
        Some(Value::Object(p)) => p,
        Some(_) => return Err(ChartError::def(ppath, "params must be an object")),
    };
    let allowed: &[&str] = match ty {
        "assign" => &[],
        "raise" => &["event", "data"],
        "send" => &["event", "data", "delay", "id"],
        "cancel" => &["id"],
        "log" => &["label", "expr"],
        "emit" => &["topic", "event", "expr"],
        other => {
            return Err(ChartError::def(
                push_key(path, "type"),
                format!("unknown action type \"{other}\" (expected assign, raise, send, cancel, log or emit)"),
            ))
        }
    };
    if ty != "assign" {
        for k in params.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(ChartError::def(
                    push_key(&ppath, k),
                    format!(
                        "unknown {ty} parameter \"{k}\" (expected {})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
    }
    Ok((ty, params, ppath))
}

/// `tags`: a string or a list of strings.
fn parse_tags(v: &Value, kpath: &str) -> Result<Vec<String>, ChartError> {
    Ok(match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(n, t)| as_str(t, &push_index(kpath, n), "a tag").map(str::to_string))
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ChartError::def(
                kpath,
                "tags must be a string or a list of strings",
            ))
        }
    })
}

/// The keys a state may have: history states fewer, the root a few more.
fn check_keys(
    obj: &Map<String, Value>,
    path: &str,
    is_root: bool,
    is_history: bool,
) -> Result<(), ChartError> {
    for k in obj.keys() {
        let ok = if is_history {
            HISTORY_KEYS.contains(&k.as_str())
        } else {
            STATE_KEYS.contains(&k.as_str()) || (is_root && ROOT_ONLY_KEYS.contains(&k.as_str()))
        };
        if !ok {
            let hint = if ROOT_ONLY_KEYS.contains(&k.as_str()) {
                " (only allowed on the root)"
            } else if k == "history" || k == "target" {
                " (only allowed on history states)"
            } else if is_history {
                " (history states take only id, type, history, target, meta, description)"
            } else {
                ""
            };
            return Err(ChartError::def(
                push_key(path, k),
                format!("unknown key \"{k}\"{hint}"),
            ));
        }
    }
    if let Some(d) = obj.get("description") {
        if !d.is_string() {
            return Err(ChartError::def(
                push_key(path, "description"),
                "description must be a string",
            ));
        }
    }
    Ok(())
}

/// A state's id: its own, the root's default, or its dotted path.
fn state_id(
    obj: &Map<String, Value>,
    path: &str,
    is_root: bool,
    dot_path: &str,
) -> Result<String, ChartError> {
    let id = match obj.get("id") {
        Some(v) => {
            let id = as_str(v, &push_key(path, "id"), "id")?;
            if id.starts_with('#') {
                return Err(ChartError::def(
                    push_key(path, "id"),
                    "id must not start with '#'",
                ));
            }
            id.to_string()
        }
        None if is_root => DEFAULT_ROOT_ID.to_string(),
        None => dot_path.to_string(),
    };
    Ok(id)
}

/// A state's kind, from its `type` and its children, checked against what the kind allows;
/// and its child states.
fn state_kind<'v>(
    obj: &'v Map<String, Value>,
    path: &str,
    type_str: Option<&str>,
    is_root: bool,
) -> Result<(Kind, Option<&'v Object>), ChartError> {
    let states = match obj.get("states") {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            return Err(ChartError::def(
                push_key(path, "states"),
                "states must be an object",
            ))
        }
    };
    let has_children = states.is_some_and(|m| !m.is_empty());
    let kind = match type_str {
        None => {
            if has_children {
                Kind::Compound
            } else {
                Kind::Atomic
            }
        }
        Some("atomic") => Kind::Atomic,
        Some("compound") => Kind::Compound,
        Some("parallel") => Kind::Parallel,
        Some("final") => Kind::Final,
        Some("history") => {
            let deep = match obj.get("history") {
                None => false,
                Some(Value::String(s)) if s == "shallow" => false,
                Some(Value::String(s)) if s == "deep" => true,
                Some(_) => {
                    return Err(ChartError::def(
                        push_key(path, "history"),
                        "history must be \"shallow\" or \"deep\"",
                    ))
                }
            };
            Kind::History { deep }
        }
        Some(other) => {
            return Err(ChartError::def(
                push_key(path, "type"),
                format!(
                    "unknown state type \"{other}\" (expected atomic, compound, parallel, final or history)"
                ),
            ))
        }
    };
    match kind {
        Kind::Compound | Kind::Parallel if !has_children => {
            return Err(ChartError::def(
                path,
                "a compound or parallel state needs at least one child in states",
            ))
        }
        Kind::Atomic | Kind::Final if has_children => {
            return Err(ChartError::def(
                push_key(path, "states"),
                "an atomic or final state cannot have child states",
            ))
        }
        Kind::History { .. } if is_root => {
            return Err(ChartError::def(path, "the root cannot be a history state"))
        }
        Kind::Final if is_root => {
            return Err(ChartError::def(path, "the root cannot be a final state"))
        }
        _ => {}
    }
    if kind == Kind::Final {
        for k in ["on", "always", "after"] {
            if obj.contains_key(k) {
                return Err(ChartError::def(
                    push_key(path, k),
                    "a final state cannot have transitions",
                ));
            }
        }
    }
    if obj.contains_key("initial") && kind != Kind::Compound {
        return Err(ChartError::def(
            push_key(path, "initial"),
            "initial is only allowed on a compound state",
        ));
    }
    Ok((kind, states))
}

impl<'a> Builder<'a> {
    /// Pass 1: number the nodes in pre-order and check each node's keys and type.
    fn collect(
        &mut self,
        value: &'a Value,
        key: &str,
        parent: Option<usize>,
        path: &str,
        dot_path: &str,
        depth: usize,
    ) -> Result<usize, ChartError> {
        if depth > 64 {
            return Err(ChartError::def(
                path,
                "states are nested more than 64 levels deep",
            ));
        }
        let Value::Object(obj) = value else {
            return Err(ChartError::def(path, "a state must be an object"));
        };
        let is_root = parent.is_none();
        let type_str = match obj.get("type") {
            None => None,
            Some(v) => Some(as_str(v, &push_key(path, "type"), "type")?),
        };
        let is_history = type_str == Some("history");
        check_keys(obj, path, is_root, is_history)?;
        let id = state_id(obj, path, is_root, dot_path)?;
        let (kind, states) = state_kind(obj, path, type_str, is_root)?;
        let index = self.nodes.len();
        self.nodes.push(StateNode {
            done_event: format!("done.state.{id}"),
            id,
            key: key.to_string(),
            path: path.to_string(),
            parent,
            end: index + 1,
            children: Vec::new(),
            histories: Vec::new(),
            kind,
            initial: None,
            history_default: Vec::new(),
            transitions: Vec::new(),
            always: Vec::new(),
            after: Vec::new(),
            entry: Vec::new(),
            exit: Vec::new(),
            tags: Vec::new(),
            output: None,
        });
        self.raw.push(obj);
        if let Some(states) = states {
            self.collect_children(index, states, path, dot_path, depth)?;
        }
        Ok(index)
    }

    /// Pass 1 for the child states of node `index`.
    fn collect_children(
        &mut self,
        index: usize,
        states: &'a Map<String, Value>,
        path: &str,
        dot_path: &str,
        depth: usize,
    ) -> Result<(), ChartError> {
        let states_path = push_key(path, "states");
        for (k, v) in states {
            let child_path = push_key(&states_path, k);
            if k.is_empty() || k.contains('.') || k.starts_with('#') {
                return Err(ChartError::def(
                    child_path,
                    "a state key must be non-empty, without '.', and not start with '#'",
                ));
            }
            let child_dot = if dot_path.is_empty() {
                k.clone()
            } else {
                format!("{dot_path}.{k}")
            };
            let c = self.collect(v, k, Some(index), &child_path, &child_dot, depth + 1)?;
            self.nodes[index].children.push(c);
            if self.nodes[c].is_history() {
                self.nodes[index].histories.push(c);
            }
        }
        Ok(())
    }

    /// Pass 2: resolve references and compile expressions of node `i`.
    fn resolve(&mut self, i: usize) -> Result<(), ChartError> {
        let obj = self.raw[i];
        let path = self.nodes[i].path.clone();
        match self.nodes[i].kind {
            Kind::Compound => self.nodes[i].initial = Some(self.resolve_initial(i, &path)?),
            Kind::History { .. } => {
                self.nodes[i].history_default = self.resolve_history(i, &path)?;
                return Ok(());
            }
            _ => {}
        }
        for (k, v) in obj {
            let kpath = push_key(&path, k);
            match k.as_str() {
                "on" => self.resolve_on(i, v, &kpath)?,
                "after" => self.resolve_after(i, v, &kpath)?,
                "always" => {
                    let ts = self.parse_transitions(i, v, &kpath, || Trigger::Always)?;
                    self.nodes[i].always.extend(ts);
                }
                "entry" => self.nodes[i].entry = self.parse_actions(v, &kpath)?,
                "exit" => self.nodes[i].exit = self.parse_actions(v, &kpath)?,
                "tags" => self.nodes[i].tags = parse_tags(v, &kpath)?,
                "output" => {
                    if !(i == 0 || self.nodes[i].kind == Kind::Final) {
                        return Err(ChartError::def(
                            kpath,
                            "output is only allowed on the root and on final states",
                        ));
                    }
                    self.nodes[i].output = Some(self.value_expr(v, &kpath)?);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The initial child of compound node `i`: its `initial`, or its first non-history child.
    fn resolve_initial(&self, i: usize, path: &str) -> Result<usize, ChartError> {
        let obj = self.raw[i];
        match obj.get("initial") {
            Some(v) => {
                let ipath = push_key(path, "initial");
                let key = as_str(v, &ipath, "initial")?;
                self.child_by_key(i, key).ok_or_else(|| {
                    ChartError::def(
                        &ipath,
                        format!(
                            "initial \"{key}\" is not a child of this state (children: {})",
                            self.child_keys(i)
                        ),
                    )
                })
            }
            None => self.nodes[i]
                .children
                .iter()
                .copied()
                .find(|&c| !self.nodes[c].is_history())
                .ok_or_else(|| ChartError::def(path, "a compound state needs a non-history child")),
        }
    }

    /// The default targets of history node `i`: its `target`, or its parent's initial state
    /// (all regions of a parallel parent).
    fn resolve_history(&self, i: usize, path: &str) -> Result<Vec<usize>, ChartError> {
        let obj = self.raw[i];
        let Some(parent) = self.nodes[i].parent else {
            return Err(ChartError::def(path, "history state without a parent"));
        };
        let defaults = match obj.get("target") {
            Some(Value::Null) | None => match self.nodes[parent].kind {
                Kind::Parallel => self.nodes[parent]
                    .children
                    .iter()
                    .copied()
                    .filter(|&c| !self.nodes[c].is_history())
                    .collect(),
                _ => {
                    let init = self.initial_of(parent);
                    if init == Some(i) || init.is_none() {
                        return Err(ChartError::def(
                            path,
                            "this history state is its parent's initial state, so it needs a default target",
                        ));
                    }
                    init.into_iter().collect()
                }
            },
            Some(t) => {
                let tpath = push_key(path, "target");
                let targets = self.resolve_targets(i, t, &tpath)?;
                for &t in &targets {
                    if !self.is_descendant(t, parent) || self.nodes[t].is_history() {
                        return Err(ChartError::def(
                            &tpath,
                            format!(
                                "a history default target must be a non-history descendant of \"{}\"",
                                self.nodes[parent].id
                            ),
                        ));
                    }
                }
                targets
            }
        };
        Ok(defaults)
    }

    /// `on`: event descriptor → transitions.
    fn resolve_on(&mut self, i: usize, v: &Value, kpath: &str) -> Result<(), ChartError> {
        let Value::Object(on) = v else {
            return Err(ChartError::def(
                kpath,
                "on must be an object of event → transition",
            ));
        };
        for (event, tv) in on {
            let epath = push_key(kpath, event);
            let desc = normalize_descriptor(event).map_err(|m| ChartError::def(&epath, m))?;
            let ts = self.parse_transitions(i, tv, &epath, || Trigger::Descriptor(desc.clone()))?;
            self.nodes[i].transitions.extend(ts);
        }
        Ok(())
    }

    /// `after`: delay in milliseconds → transitions, each delay a named timer.
    fn resolve_after(&mut self, i: usize, v: &Value, kpath: &str) -> Result<(), ChartError> {
        let Value::Object(after) = v else {
            return Err(ChartError::def(
                kpath,
                "after must be an object of delay (ms) → transition",
            ));
        };
        for (delay, tv) in after {
            let dpath = push_key(kpath, delay);
            let ms = delay
                .parse::<u32>()
                .ok()
                .filter(|_| delay.chars().all(|c| c.is_ascii_digit()))
                .ok_or_else(|| {
                    ChartError::def(
                        &dpath,
                        "an after key must be a delay in milliseconds (0..=4294967295)",
                    )
                })?;
            let name = format!("xstate.after.{ms}.{}", self.nodes[i].id);
            if !self.nodes[i].after.iter().any(|(_, n)| *n == name) {
                self.nodes[i].after.push((i64::from(ms), name.clone()));
            }
            let ts = self.parse_transitions(i, tv, &dpath, || Trigger::Timer(name.clone()))?;
            self.nodes[i].transitions.extend(ts);
        }
        Ok(())
    }

    fn initial_of(&self, s: usize) -> Option<usize> {
        match self.raw[s].get("initial") {
            Some(Value::String(k)) => self.child_by_key(s, k),
            _ => self.nodes[s]
                .children
                .iter()
                .copied()
                .find(|&c| !self.nodes[c].is_history()),
        }
    }

    fn child_by_key(&self, s: usize, key: &str) -> Option<usize> {
        self.nodes[s]
            .children
            .iter()
            .copied()
            .find(|&c| self.nodes[c].key == key)
    }

    fn child_keys(&self, s: usize) -> String {
        let keys: Vec<&str> = self.nodes[s]
            .children
            .iter()
            .map(|&c| self.nodes[c].key.as_str())
            .collect();
        keys.join(", ")
    }

    /// `a` is a proper descendant of `b`.
    fn is_descendant(&self, a: usize, b: usize) -> bool {
        let mut cur = self.nodes[a].parent;
        while let Some(p) = cur {
            if p == b {
                return true;
            }
            cur = self.nodes[p].parent;
        }
        false
    }

    fn descend(
        &self,
        from: usize,
        keys: &str,
        path: &str,
        target: &str,
    ) -> Result<usize, ChartError> {
        let mut cur = from;
        for key in keys.split('.') {
            cur = self.child_by_key(cur, key).ok_or_else(|| {
                ChartError::def(
                    path,
                    format!(
                        "target \"{target}\": \"{}\" has no child \"{key}\" (children: {})",
                        self.nodes[cur].id,
                        self.child_keys(cur)
                    ),
                )
            })?;
        }
        Ok(cur)
    }

    fn resolve_target(&self, source: usize, target: &str, path: &str) -> Result<usize, ChartError> {
        let found = if let Some(rest) = target.strip_prefix('#') {
            if let Some(&s) = self.by_id.get(rest) {
                s
            } else {
                // `#a.b`: the longest prefix that is an id, then child keys.
                let mut found = None;
                for (pos, _) in rest
                    .match_indices('.')
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    if let Some(&base) = self.by_id.get(&rest[..pos]) {
                        found = Some(self.descend(base, &rest[pos + 1..], path, target)?);
                        break;
                    }
                }
                found.ok_or_else(|| {
                    ChartError::def(path, format!("target \"{target}\": no state has this id"))
                })?
            }
        } else if let Some(rest) = target.strip_prefix('.') {
            self.descend(source, rest, path, target)?
        } else if target.is_empty() {
            return Err(ChartError::def(path, "target must not be empty"));
        } else {
            // A sibling (child of the parent); on the root, a child of the root.
            let base = self.nodes[source].parent.unwrap_or(source);
            self.descend(base, target, path, target)?
        };
        if found == 0 {
            return Err(ChartError::def(
                path,
                "the root cannot be a transition target",
            ));
        }
        Ok(found)
    }

    fn resolve_targets(
        &self,
        source: usize,
        v: &Value,
        path: &str,
    ) -> Result<Vec<usize>, ChartError> {
        let targets = match v {
            Value::Null => Vec::new(),
            Value::String(s) => vec![self.resolve_target(source, s, path)?],
            Value::Array(list) => list
                .iter()
                .enumerate()
                .map(|(n, t)| {
                    let tpath = push_index(path, n);
                    match t {
                        Value::String(s) => self.resolve_target(source, s, &tpath),
                        _ => Err(ChartError::def(tpath, "a target must be a string")),
                    }
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(ChartError::def(
                    path,
                    "target must be a string or a list of strings",
                ))
            }
        };
        // SCXML: several targets must form a legal configuration (one per parallel region).
        for (n, &a) in targets.iter().enumerate() {
            for &b in &targets[..n] {
                let lca = self.lca(a, b);
                let legal =
                    a != b && lca != a && lca != b && self.nodes[lca].kind == Kind::Parallel;
                if !legal {
                    return Err(ChartError::def(
                        path,
                        format!(
                            "targets \"{}\" and \"{}\" cannot be active together (several targets must be in different regions of a parallel state)",
                            self.nodes[b].id, self.nodes[a].id
                        ),
                    ));
                }
            }
        }
        Ok(targets)
    }

    /// Lowest common ancestor-or-self.
    fn lca(&self, a: usize, b: usize) -> usize {
        let mut anc_a = vec![a];
        let mut cur = self.nodes[a].parent;
        while let Some(p) = cur {
            anc_a.push(p);
            cur = self.nodes[p].parent;
        }
        let mut cur = Some(b);
        while let Some(p) = cur {
            if anc_a.contains(&p) {
                return p;
            }
            cur = self.nodes[p].parent;
        }
        0
    }

    fn parse_transitions(
        &mut self,
        source: usize,
        v: &Value,
        path: &str,
        trigger: impl Fn() -> Trigger,
    ) -> Result<Vec<usize>, ChartError> {
        let mut out = Vec::new();
        match v {
            Value::Array(list) => {
                for (n, item) in list.iter().enumerate() {
                    let ipath = push_index(path, n);
                    if item.is_array() {
                        return Err(ChartError::def(
                            ipath,
                            "nested lists of transitions are not allowed",
                        ));
                    }
                    out.push(self.parse_transition(source, item, &ipath, trigger())?);
                }
            }
            _ => out.push(self.parse_transition(source, v, path, trigger())?),
        }
        Ok(out)
    }

    fn parse_transition(
        &mut self,
        source: usize,
        v: &Value,
        path: &str,
        trigger: Trigger,
    ) -> Result<usize, ChartError> {
        let mut t = TransitionDef {
            source,
            trigger,
            guard: None,
            targets: Vec::new(),
            actions: Vec::new(),
            reenter: false,
        };
        match v {
            // `null` = a forbidden transition: consumes the event, does nothing.
            Value::Null => {}
            Value::String(_) => t.targets = self.resolve_targets(source, v, path)?,
            Value::Object(obj) => {
                for (k, val) in obj {
                    let kpath = push_key(path, k);
                    match k.as_str() {
                        "target" => t.targets = self.resolve_targets(source, val, &kpath)?,
                        "guard" => {
                            let src = as_str(val, &kpath, "guard (a Rhai expression)")?;
                            t.guard = Some(self.sandbox.compile(src, RUN_VARS, &kpath)?);
                        }
                        "actions" => t.actions = self.parse_actions(val, &kpath)?,
                        "reenter" => {
                            t.reenter = val.as_bool().ok_or_else(|| {
                                ChartError::def(&kpath, "reenter must be true or false")
                            })?
                        }
                        "description" | "meta" => {}
                        _ => {
                            return Err(ChartError::def(
                                kpath,
                                format!("unknown transition key \"{k}\" (expected target, guard, actions, reenter, description, meta)"),
                            ))
                        }
                    }
                }
            }
            _ => {
                return Err(ChartError::def(
                    path,
                    "a transition must be a target string, an object {target, guard, actions, reenter}, or a list of those",
                ))
            }
        }
        self.transitions.push(t);
        Ok(self.transitions.len() - 1)
    }

    fn value_expr(&self, v: &Value, path: &str) -> Result<ValueExpr, ChartError> {
        match v {
            Value::String(src) => Ok(ValueExpr::Expr(self.sandbox.compile(src, RUN_VARS, path)?)),
            other => Ok(ValueExpr::Literal(other.clone())),
        }
    }

    fn parse_actions(&self, v: &Value, path: &str) -> Result<Vec<Action>, ChartError> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Array(list) => list
                .iter()
                .enumerate()
                .map(|(n, a)| self.parse_action(a, &push_index(path, n)))
                .collect(),
            _ => Ok(vec![self.parse_action(v, path)?]),
        }
    }

    fn parse_action(&self, v: &Value, path: &str) -> Result<Action, ChartError> {
        let empty = Map::new();
        let (ty, params, ppath) = action_parts(v, path, &empty)?;
        let string_param = |k: &str, required: bool| -> Result<Option<String>, ChartError> {
            match params.get(k) {
                None | Some(Value::Null) if !required => Ok(None),
                None | Some(Value::Null) => Err(ChartError::def(
                    push_key(&ppath, k),
                    format!("{ty} needs params.{k}"),
                )),
                Some(v) => Ok(Some(as_str(v, &push_key(&ppath, k), k)?.to_string())),
            }
        };
        let expr_param = |k: &str| -> Result<Option<ValueExpr>, ChartError> {
            match params.get(k) {
                None => Ok(None),
                Some(v) => Ok(Some(self.value_expr(v, &push_key(&ppath, k))?)),
            }
        };
        Ok(match ty {
            "assign" => {
                if params.is_empty() {
                    return Err(ChartError::def(
                        ppath,
                        "assign needs params {key: expression}",
                    ));
                }
                let mut fields = Vec::new();
                for (k, v) in params {
                    if k.is_empty() {
                        return Err(ChartError::def(
                            push_key(&ppath, k),
                            "context key must not be empty",
                        ));
                    }
                    fields.push((k.clone(), self.value_expr(v, &push_key(&ppath, k))?));
                }
                Action::Assign {
                    fields,
                    path: ppath,
                }
            }
            "raise" => Action::Raise {
                event: string_param("event", true)?.unwrap_or_default(),
                data: expr_param("data")?,
            },
            "send" => {
                let delay = match params.get("delay") {
                    None | Some(Value::Null) => 0,
                    Some(v) => v
                        .as_u64()
                        .and_then(|d| u32::try_from(d).ok())
                        .map(i64::from)
                        .ok_or_else(|| {
                            ChartError::def(
                                push_key(&ppath, "delay"),
                                "delay must be a whole number of milliseconds (0..=4294967295)",
                            )
                        })?,
                };
                Action::Send {
                    event: string_param("event", true)?.unwrap_or_default(),
                    data: expr_param("data")?,
                    delay,
                    id: string_param("id", false)?,
                }
            }
            "cancel" => Action::Cancel {
                id: string_param("id", true)?.unwrap_or_default(),
            },
            "log" => Action::Log {
                label: string_param("label", false)?,
                expr: expr_param("expr")?,
            },
            _ => {
                let topic = string_param("topic", false)?;
                let event = string_param("event", false)?;
                if topic.is_none() && event.is_none() {
                    return Err(ChartError::def(
                        ppath,
                        "emit needs params.topic or params.event",
                    ));
                }
                Action::Emit {
                    topic,
                    event,
                    expr: expr_param("expr")?,
                }
            }
        })
    }
}

/// Validates an `on` key as an SCXML event descriptor and normalizes `foo.*` to `foo`.
fn normalize_descriptor(key: &str) -> Result<String, String> {
    if key == "*" {
        return Ok(key.to_string());
    }
    let trimmed = key.strip_suffix(".*").unwrap_or(key);
    if trimmed.is_empty() {
        return Err("event name must not be empty".to_string());
    }
    for token in trimmed.split('.') {
        if token.is_empty() {
            return Err(format!("event descriptor \"{key}\" has an empty token"));
        }
        if token.contains('*') {
            return Err(format!(
                "event descriptor \"{key}\": '*' is only allowed alone or as a final \".*\""
            ));
        }
        if token.chars().any(char::is_whitespace) {
            return Err(format!("event descriptor \"{key}\" contains whitespace"));
        }
    }
    Ok(trimmed.to_string())
}
