//! The Rhai sandbox. Expressions are compiled once per chart version; each call builds a
//! small runtime engine that shares the precompiled packages and adds `in_state` bound to that
//! call's configuration (a registered function cannot see the scope, and the chart itself must
//! stay immutable to be shared across threads).
//!
//! Sandbox: `Engine::new_raw()` plus pure packages only (no `LanguageCorePackage`: it has
//! `sleep`; no time, no modules, no custom syntax), `eval`/`print`/`debug` disabled, limits on
//! operations, depth, call levels, string/array/map sizes. Strict variables: a typo in a
//! variable name is a compile error with the expression's path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicIteratorPackage, BasicMapPackage, BasicMathPackage,
    BasicStringPackage, BitFieldPackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, Module, OptimizationLevel, Scope, Shared, AST};
use serde_json::Value;

use super::ChartError;

pub(crate) const MAX_OPERATIONS: u64 = 200_000;
pub(crate) const MAX_EXPR_DEPTH: usize = 64;
pub(crate) const MAX_FN_EXPR_DEPTH: usize = 32;
pub(crate) const MAX_CALL_LEVELS: usize = 16;
/// Matches the 400 KB context limit so existing context strings always fit.
pub(crate) const MAX_STRING_SIZE: usize = 400 * 1024;
pub(crate) const MAX_ARRAY_SIZE: usize = 10_000;
pub(crate) const MAX_MAP_SIZE: usize = 10_000;
pub(crate) const MAX_SOURCE_LEN: usize = 16 * 1024;
/// Rhai operations all expressions of one call may spend together. Operation counts are
/// deterministic, so this stands in for the settle-time budget without reading a clock.
pub(crate) const CALL_OPERATIONS: u64 = 5_000_000;

/// Counts the operations of one call across evaluations (see [`CALL_OPERATIONS`]).
#[derive(Default)]
pub(crate) struct Meter {
    spent: AtomicU64,
    current: AtomicU64,
}

impl Meter {
    /// Folds the operations of the evaluation that just ended into the total.
    pub fn settle(&self) {
        let ops = self.current.swap(0, Ordering::Relaxed);
        self.spent.fetch_add(ops, Ordering::Relaxed);
    }

    /// Starts a new budget (one per top-level event); returns what the last one spent.
    pub fn restart(&self) -> u64 {
        self.spent.swap(0, Ordering::Relaxed)
    }
}

/// Variables of transition/action expressions.
pub(crate) const RUN_VARS: &[&str] = &["context", "event", "auth"];
/// Variables of `allowRead`.
pub(crate) const READ_VARS: &[&str] = &["context", "auth", "state"];
/// Variables of `allowWrite`.
pub(crate) const WRITE_VARS: &[&str] = &["type", "event", "context", "auth"];

/// A compiled expression and the JSON path it came from (for errors).
#[derive(Debug, Clone)]
pub(crate) struct Expr {
    pub ast: AST,
    pub path: String,
}

/// A slot that takes either Rhai source (a JSON string) or a literal JSON value.
#[derive(Debug, Clone)]
pub(crate) enum ValueExpr {
    Literal(Value),
    Expr(Expr),
}

/// The precompiled packages and the compile-time engine of one chart.
pub(crate) struct Sandbox {
    packages: Vec<Shared<Module>>,
    compiler: Engine,
}

/// The set of active states as `in_state` sees it during one call.
pub(crate) type ActiveSet = Arc<RwLock<ActiveView>>;

#[derive(Default)]
pub(crate) struct ActiveView {
    pub ids: Arc<std::collections::HashMap<String, usize>>,
    pub flags: Vec<bool>,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let packages = vec![
            ArithmeticPackage::new().as_shared_module(),
            LogicPackage::new().as_shared_module(),
            BitFieldPackage::new().as_shared_module(),
            BasicStringPackage::new().as_shared_module(),
            MoreStringPackage::new().as_shared_module(),
            BasicIteratorPackage::new().as_shared_module(),
            BasicArrayPackage::new().as_shared_module(),
            BasicMapPackage::new().as_shared_module(),
            BasicMathPackage::new().as_shared_module(),
        ];
        let compiler = base_engine(&packages);
        Sandbox { packages, compiler }
    }

    /// Compiles `src` with exactly `vars` in scope.
    pub fn compile(&self, src: &str, vars: &[&str], path: &str) -> Result<Expr, ChartError> {
        if src.trim().is_empty() {
            return Err(ChartError::def(path, "expression is empty"));
        }
        if src.len() > MAX_SOURCE_LEN {
            return Err(ChartError::def(
                path,
                format!("expression is longer than {MAX_SOURCE_LEN} bytes"),
            ));
        }
        let mut scope = Scope::new();
        for v in vars {
            scope.push_constant_dynamic(*v, Dynamic::UNIT);
        }
        let ast = self
            .compiler
            .compile_with_scope(&scope, src)
            .map_err(|e| ChartError::def(path, format!("invalid Rhai expression: {e}")))?;
        Ok(Expr {
            ast,
            path: path.to_string(),
        })
    }

    /// A runtime engine whose `in_state("id")` reads `active` and whose evaluations all draw
    /// on `meter`.
    pub fn runtime(&self, active: Option<ActiveSet>, meter: Arc<Meter>) -> Engine {
        let mut engine = base_engine(&self.packages);
        engine.on_progress(move |ops| {
            meter.current.store(ops, Ordering::Relaxed);
            if meter.spent.load(Ordering::Relaxed).saturating_add(ops) > CALL_OPERATIONS {
                Some(Dynamic::UNIT)
            } else {
                None
            }
        });
        engine.register_fn("in_state", move |id: &str| -> bool {
            let Some(active) = &active else { return false };
            let id = id.strip_prefix('#').unwrap_or(id);
            match active.read() {
                Ok(view) => view
                    .ids
                    .get(id)
                    .and_then(|&i| view.flags.get(i).copied())
                    .unwrap_or(false),
                Err(_) => false,
            }
        });
        engine
    }
}

fn base_engine(packages: &[Shared<Module>]) -> Engine {
    let mut engine = Engine::new_raw();
    for p in packages {
        engine.register_global_module(p.clone());
    }
    engine
        .set_optimization_level(OptimizationLevel::None)
        .set_max_operations(MAX_OPERATIONS)
        .set_max_expr_depths(MAX_EXPR_DEPTH, MAX_FN_EXPR_DEPTH)
        .set_max_call_levels(MAX_CALL_LEVELS)
        .set_max_string_size(MAX_STRING_SIZE)
        .set_max_array_size(MAX_ARRAY_SIZE)
        .set_max_map_size(MAX_MAP_SIZE)
        .set_max_variables(256)
        .set_max_functions(64)
        .set_strict_variables(true);
    for symbol in ["eval", "print", "debug"] {
        engine.disable_symbol(symbol);
    }
    // Rhai reserves words it does not use yet, `public` among them; `context.public` is where
    // the public context lives, so these words are plain identifiers here. (`on_parse_token`
    // is why the `internals` feature is on; nothing else of it is used.)
    #[allow(deprecated)]
    engine.on_parse_token(|token, _, _| match token {
        rhai::Token::Reserved(word) if UNRESERVED.contains(&word.as_str()) => {
            rhai::Token::Identifier(word)
        }
        other => other,
    });
    engine
}

/// Reserved-but-unused Rhai words that definitions may use as names (never `eval`, `this`…).
const UNRESERVED: &[&str] = &[
    "public",
    "private",
    "protected",
    "package",
    "shared",
    "sync",
    "async",
    "spawn",
    "case",
    "var",
    "use",
    "super",
    "static",
    "with",
    "module",
    "new",
    "default",
    "void",
    "null",
    "match",
    "await",
    "yield",
    "goto",
    "exit",
];

impl Expr {
    pub fn eval(&self, engine: &Engine, scope: &mut Scope) -> Result<Dynamic, ChartError> {
        engine
            .eval_ast_with_scope::<Dynamic>(scope, &self.ast)
            .map_err(|e| ChartError::runtime(&self.path, describe(&e)))
    }
}

fn describe(e: &EvalAltResult) -> String {
    match e {
        EvalAltResult::ErrorTooManyOperations(_) => {
            format!("expression exceeded the limit of {MAX_OPERATIONS} operations (endless loop?)")
        }
        EvalAltResult::ErrorTerminated(..) => format!(
            "the call exceeded its budget of {CALL_OPERATIONS} expression operations (too much work in one step)"
        ),
        EvalAltResult::ErrorStackOverflow(_) => {
            "expression recursed too deeply (stack overflow)".to_string()
        }
        EvalAltResult::ErrorDataTooLarge(what, _) => {
            format!("expression built a value that is too large ({what})")
        }
        other => format!("expression failed: {other}"),
    }
}

/// JSON → Rhai value.
pub(crate) fn to_dynamic(value: &Value, path: &str) -> Result<Dynamic, ChartError> {
    rhai::serde::to_dynamic(value)
        .map_err(|e| ChartError::runtime(path, format!("value cannot be passed to Rhai: {e}")))
}

/// Rhai value → JSON (maps come back with sorted keys: Rhai maps are ordered maps).
pub(crate) fn to_json(value: &Dynamic, path: &str) -> Result<Value, ChartError> {
    rhai::serde::from_dynamic::<Value>(value).map_err(|e| {
        ChartError::runtime(
            path,
            format!(
                "expression returned a {} that cannot be stored as JSON: {e}",
                value.type_name()
            ),
        )
    })
}

/// `#{type, data}` for the `event` variable.
pub(crate) fn event_dynamic(name: &str, data: &Value, path: &str) -> Result<Dynamic, ChartError> {
    let mut map = rhai::Map::new();
    map.insert("type".into(), Dynamic::from(name.to_string()));
    map.insert("data".into(), to_dynamic(data, path)?);
    Ok(Dynamic::from_map(map))
}
