//! The Rhai sandbox. Expressions are compiled once per chart version, and each chart has one
//! runtime engine. What an evaluation needs beyond its scope (the active states `in_state`
//! reads, the operations left in the call's budget) lives in a thread-local [`Frame`] that
//! [`Sandbox::eval`] fills in before it runs Rhai: a registered function cannot see the scope,
//! and the chart must stay immutable to be shared across threads. Building an engine per call
//! used to cost more than most of the expressions it ran.
//!
//! Expressions in a small grammar also get a native form (`fast`), evaluated without Rhai.
//!
//! Sandbox: `Engine::new_raw()` plus pure packages only (no `LanguageCorePackage`: it has
//! `sleep`; no time, no modules, no custom syntax), `eval`/`print`/`debug` disabled, limits on
//! operations, depth, call levels, string/array/map sizes. Strict variables: a typo in a
//! variable name is a compile error with the expression's path.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicIteratorPackage, BasicMapPackage, BasicMathPackage,
    BasicStringPackage, BitFieldPackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{Dynamic, Engine, EvalAltResult, Module, OptimizationLevel, Scope, Shared, AST};
use serde_json::Value;

use super::fast::Fast;
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
    /// The native form, when the expression is in the fast grammar (see `fast`).
    pub fast: Option<Fast>,
}

/// A slot that takes either Rhai source (a JSON string) or a literal JSON value.
#[derive(Debug, Clone)]
pub(crate) enum ValueExpr {
    Literal(Value),
    Expr(Expr),
}

/// The compile-time and the runtime engine of one chart.
pub(crate) struct Sandbox {
    compiler: Engine,
    runtime: Engine,
}

/// What the runtime engine's callbacks read during one evaluation on this thread.
#[derive(Default)]
struct Frame {
    /// State ids and active flags for `in_state`; none for authorizers.
    ids: Option<Arc<HashMap<String, usize>>>,
    flags: Vec<bool>,
    /// Operations the evaluation may take before the call's budget is spent.
    allowed: u64,
    /// Operations taken so far.
    ops: u64,
}

thread_local! {
    static FRAME: RefCell<Frame> = RefCell::new(Frame::default());
}

/// The active states an evaluation sees through `in_state`.
pub(crate) struct Active<'a> {
    pub ids: &'a Arc<HashMap<String, usize>>,
    pub flags: &'a [bool],
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
        let mut runtime = base_engine(&packages);
        runtime.on_progress(|ops| {
            FRAME.with(|f| {
                let mut f = f.borrow_mut();
                f.ops = ops;
                (ops > f.allowed).then_some(Dynamic::UNIT)
            })
        });
        runtime.register_fn("in_state", |id: &str| -> bool {
            let id = id.strip_prefix('#').unwrap_or(id);
            FRAME.with(|f| {
                let f = f.borrow();
                f.ids
                    .as_ref()
                    .and_then(|ids| ids.get(id))
                    .and_then(|&i| f.flags.get(i).copied())
                    .unwrap_or(false)
            })
        });
        Sandbox { compiler, runtime }
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
        let fast = if vars == RUN_VARS {
            Fast::from_ast(&ast)
        } else {
            None
        };
        Ok(Expr {
            ast,
            path: path.to_string(),
            fast,
        })
    }

    /// Runs `expr` with Rhai. `in_state` reads `active` (false for every id without it);
    /// Rhai stops the evaluation once it has taken more than `allowed` operations. Returns
    /// the result and the operations taken.
    pub fn eval(
        &self,
        expr: &Expr,
        scope: &mut Scope,
        active: Option<Active>,
        allowed: u64,
    ) -> (Result<Dynamic, ChartError>, u64) {
        FRAME.with(|f| {
            let mut f = f.borrow_mut();
            match active {
                Some(a) => {
                    if !f.ids.as_ref().is_some_and(|ids| Arc::ptr_eq(ids, a.ids)) {
                        f.ids = Some(a.ids.clone());
                    }
                    f.flags.clear();
                    f.flags.extend_from_slice(a.flags);
                }
                None => f.ids = None,
            }
            f.allowed = allowed;
            f.ops = 0;
        });
        let result = self
            .runtime
            .eval_ast_with_scope::<Dynamic>(scope, &expr.ast)
            .map_err(|e| ChartError::runtime(&expr.path, describe(&e)));
        let ops = FRAME.with(|f| f.borrow().ops);
        (result, ops)
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
