//! Native evaluation of the simple expressions most charts are made of (`context.n + 1`,
//! `context.n % 3 == 0`, `event.type == "X"`, `#{ a: context.a + 1, b: event.data.b ?? 0 }`),
//! without entering Rhai.
//!
//! Rhai stays the reference. A fast form is built from the Rhai AST itself (so precedence and
//! grouping are Rhai's), only for a small grammar: literals (`()`, bools, integers, strings),
//! the variables `context`, `event` and `auth` with property chains, map literals, `+ - * / %`
//! on integers, comparisons of two integers or two strings, `==`/`!=` of two bools, `!`,
//! unary `-`, `&&`, `||` and `??`. Evaluation takes only the happy path: whenever a value is
//! outside it (a float, a type mismatch, an overflow, a property of something that is not a
//! map, a large value, a spent operation budget) it answers `None` and the caller runs Rhai,
//! which then produces the result or the error. So a fast result is always Rhai's result.
//!
//! Operation counts are part of that result: Rhai charges every evaluation against the call's
//! budget (see `expr::CALL_OPERATIONS`), so a fast evaluation reports the operations Rhai's
//! tree walker would have counted for the same path (one per statement, per evaluated
//! expression node and per literal operand, two per property chain plus one per map lookup,
//! and one per further link of a longer chain). `tests::fast_matches_rhai` checks results and
//! counts against Rhai.

use rhai::{Expr as RExpr, FnCallExpr, Stmt, Token, AST};
use serde_json::{Map, Value};

/// Largest pass-through value (nested entries and elements) returned without Rhai; far below
/// Rhai's size limits, so a value Rhai would reject never takes the fast path.
const MAX_PASS_ITEMS: usize = 256;
/// Largest total string length in a pass-through value.
const MAX_PASS_STRING_BYTES: usize = 16 * 1024;

/// An expression in the fast grammar.
#[derive(Debug, Clone)]
pub(crate) struct Fast {
    node: Node,
    /// Rhai ran the top-level operator as a statement (`Stmt::FnCall`), which skips the
    /// expression node's own operation.
    stmt_call: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Context,
    Event,
    Auth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone)]
enum Node {
    Unit,
    Bool(bool),
    Int(i64),
    Str(String),
    Var(Var),
    /// `var.p1.p2…` (at least one property).
    Path(Var, Vec<String>),
    /// Keys sorted (Rhai maps are ordered maps).
    Map(Vec<(String, Node)>),
    Bin(BinOp, Box<Node>, Box<Node>),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    Coalesce(Vec<Node>),
}

/// What the expression sees.
pub(crate) struct Env<'a> {
    pub context: &'a Value,
    pub event_type: &'a str,
    pub event_data: &'a Value,
    pub auth: &'a Value,
}

/// A value while evaluating natively.
#[derive(Debug, Clone)]
enum V<'a> {
    Unit,
    Bool(bool),
    Int(i64),
    Str(&'a str),
    /// An object, an array, or a number that is not an `i64`, from the inputs.
    Json(&'a Value),
    /// The `event` map itself.
    Event,
    /// A map literal's value: keys sorted and distinct (as `Node::Map`'s).
    Map(Vec<(&'a str, V<'a>)>),
}

impl Fast {
    /// The fast form of `ast`, if it is a single expression in the fast grammar.
    pub fn from_ast(ast: &AST) -> Option<Fast> {
        let [stmt] = ast.statements() else {
            return None;
        };
        match stmt {
            Stmt::Expr(e) => Some(Fast {
                node: node(e)?,
                stmt_call: false,
            }),
            Stmt::FnCall(call, _) => Some(Fast {
                node: call_node(call)?,
                stmt_call: true,
            }),
            _ => None,
        }
    }

    /// The value as Rhai would return it (converted to JSON like `expr::to_json`) and the
    /// operations Rhai would count, or `None` to run Rhai. `allowed` is the most operations
    /// the evaluation may take before Rhai would stop it.
    pub fn eval_json(&self, env: &Env, allowed: u64) -> Option<(Value, u64)> {
        let (v, ops) = self.eval(env, allowed)?;
        let mut budget = Budget::default();
        Some((to_json(&v, env, &mut budget)?, ops))
    }

    /// [`Fast::eval_json`] writing the value into `out` and returning the operations. What
    /// `out` holds is reused where the value has its shape (an object with the same keys in
    /// the same order, a string buffer), so an `assign` that replaces a field with a value of
    /// the same shape, the common case, allocates nothing. On `None`, `out` holds garbage.
    pub fn eval_into(&self, env: &Env, allowed: u64, out: &mut Value) -> Option<u64> {
        let mut budget = Budget::default();
        let Node::Map(fields) = &self.node else {
            let (v, ops) = self.eval(env, allowed)?;
            write_json(&v, env, &mut budget, out)?;
            return Some(ops);
        };
        // A top-level map literal (the usual `assign` of a record) is written field by field
        // as it is evaluated, without collecting the fields first. The operations and the
        // budget add up to the same totals as `eval` then `to_json`, and both only grow, so
        // the verdict is the same.
        let mut ops: u64 = if self.stmt_call { 0 } else { 1 };
        ops += 1;
        budget.take(fields.len(), 0)?;
        let m = keyed_like(out, fields)?;
        for (slot, (_, f)) in m.values_mut().zip(fields) {
            let v = eval(f, env, &mut ops)?;
            write_json(&v, env, &mut budget, slot)?;
        }
        (ops <= allowed.min(super::expr::MAX_OPERATIONS)).then_some(ops)
    }

    /// Whether `value` is an object with exactly the keys (in order) of this expression's
    /// top-level map literal: the spare worth reusing for [`Fast::eval_into`].
    pub fn fits(&self, value: &Value) -> bool {
        match (&self.node, value) {
            (Node::Map(fields), Value::Object(m)) => {
                m.len() == fields.len() && m.keys().zip(fields).all(|(a, (b, _))| a == b)
            }
            _ => false,
        }
    }

    /// A guard: the bool and the operations, or `None` (also when the value is not a bool, so
    /// that Rhai reports the type it got).
    pub fn eval_bool(&self, env: &Env, allowed: u64) -> Option<(bool, u64)> {
        match self.eval(env, allowed)? {
            (V::Bool(b), ops) => Some((b, ops)),
            _ => None,
        }
    }

    fn eval<'a>(&'a self, env: &Env<'a>, allowed: u64) -> Option<(V<'a>, u64)> {
        // One operation for the statement; a statement call skips its node's own operation.
        let mut ops: u64 = if self.stmt_call { 0 } else { 1 };
        let v = eval(&self.node, env, &mut ops)?;
        (ops <= allowed.min(super::expr::MAX_OPERATIONS)).then_some((v, ops))
    }
}

fn var(name: &str) -> Option<Var> {
    match name {
        "context" => Some(Var::Context),
        "event" => Some(Var::Event),
        "auth" => Some(Var::Auth),
        _ => None,
    }
}

fn node(e: &RExpr) -> Option<Node> {
    Some(match e {
        RExpr::Unit(_) => Node::Unit,
        RExpr::BoolConstant(b, _) => Node::Bool(*b),
        RExpr::IntegerConstant(n, _) => Node::Int(*n),
        RExpr::StringConstant(s, _) => Node::Str(s.to_string()),
        RExpr::Variable(v, _, _) => Node::Var(var(v.1.as_str())?),
        RExpr::Dot(chain, flags, _) if flags.is_empty() => {
            let RExpr::Variable(v, _, _) = &chain.lhs else {
                return None;
            };
            let mut props = Vec::new();
            let mut rest = &chain.rhs;
            loop {
                match rest {
                    RExpr::Property(p, _) => {
                        props.push(p.2.to_string());
                        break;
                    }
                    RExpr::Dot(next, flags, _) if flags.is_empty() => {
                        let RExpr::Property(p, _) = &next.lhs else {
                            return None;
                        };
                        props.push(p.2.to_string());
                        rest = &next.rhs;
                    }
                    _ => return None,
                }
            }
            Node::Path(var(v.1.as_str())?, props)
        }
        RExpr::Map(m, _) => {
            let mut fields: Vec<(String, Node)> =
                m.0.iter()
                    .map(|(k, v)| Some((k.name.to_string(), node(v)?)))
                    .collect::<Option<_>>()?;
            fields.sort_by(|a, b| a.0.cmp(&b.0));
            if fields.windows(2).any(|w| w[0].0 == w[1].0) {
                return None;
            }
            Node::Map(fields)
        }
        RExpr::FnCall(call, _) => call_node(call)?,
        RExpr::And(list, _) => Node::And(list.iter().map(node).collect::<Option<_>>()?),
        RExpr::Or(list, _) => Node::Or(list.iter().map(node).collect::<Option<_>>()?),
        RExpr::Coalesce(list, _) => Node::Coalesce(list.iter().map(node).collect::<Option<_>>()?),
        _ => return None,
    })
}

/// Operands of an operator call. A map literal is left to Rhai: as an operand, Rhai may take a
/// constant map as one literal, which counts operations differently.
fn operand(e: &RExpr) -> Option<Box<Node>> {
    match e {
        RExpr::Map(..) => None,
        e => node(e).map(Box::new),
    }
}

fn call_node(call: &FnCallExpr) -> Option<Node> {
    if call.capture_parent_scope {
        return None;
    }
    let token = call.op_token.as_ref()?;
    match (call.args.as_slice(), token) {
        ([a], Token::Bang) => Some(Node::Not(operand(a)?)),
        ([a], Token::UnaryMinus | Token::Minus) => Some(Node::Neg(operand(a)?)),
        ([a, b], t) => {
            let op = match t {
                Token::Plus => BinOp::Add,
                Token::Minus => BinOp::Sub,
                Token::Multiply => BinOp::Mul,
                Token::Divide => BinOp::Div,
                Token::Modulo => BinOp::Rem,
                Token::EqualsTo => BinOp::Eq,
                Token::NotEqualsTo => BinOp::Ne,
                Token::LessThan => BinOp::Lt,
                Token::LessThanEqualsTo => BinOp::Le,
                Token::GreaterThan => BinOp::Gt,
                Token::GreaterThanEqualsTo => BinOp::Ge,
                _ => return None,
            };
            Some(Node::Bin(op, operand(a)?, operand(b)?))
        }
        _ => None,
    }
}

fn from_json(v: &Value) -> V<'_> {
    match v {
        Value::Null => V::Unit,
        Value::Bool(b) => V::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => V::Int(i),
            None => V::Json(v),
        },
        Value::String(s) => V::Str(s),
        Value::Array(_) | Value::Object(_) => V::Json(v),
    }
}

fn var_value<'a>(v: Var, env: &Env<'a>) -> V<'a> {
    match v {
        Var::Context => from_json(env.context),
        Var::Auth => from_json(env.auth),
        Var::Event => V::Event,
    }
}

/// `target.prop` where Rhai looks the property up in a map (missing = `()`); `None` when the
/// target is not a map (Rhai would look for a getter and fail).
fn property<'a>(target: V<'a>, prop: &str, env: &Env<'a>) -> Option<V<'a>> {
    match target {
        V::Json(Value::Object(m)) => Some(small_get(m, prop).map_or(V::Unit, from_json)),
        V::Event => Some(match prop {
            "type" => V::Str(env.event_type),
            "data" => from_json(env.event_data),
            _ => V::Unit,
        }),
        _ => None,
    }
}

/// Maps up to this size are searched key by key: comparing a few short keys is cheaper than
/// hashing one (serde_json's map hashes with SipHash).
pub(crate) const SMALL_MAP: usize = 8;

/// `m.get(key)`, searching small maps without hashing.
pub(crate) fn small_get<'m>(m: &'m Map<String, Value>, key: &str) -> Option<&'m Value> {
    if m.len() <= SMALL_MAP {
        m.iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v)
    } else {
        m.get(key)
    }
}

fn eval<'a>(n: &'a Node, env: &Env<'a>, ops: &mut u64) -> Option<V<'a>> {
    // The node's own operation (`eval_expr`, or `get_arg_value` for a literal operand).
    *ops += 1;
    Some(match n {
        Node::Unit => V::Unit,
        Node::Bool(b) => V::Bool(*b),
        Node::Int(i) => V::Int(*i),
        Node::Str(s) => V::Str(s),
        Node::Var(v) => var_value(*v, env),
        Node::Path(v, props) => {
            // The variable, one per map lookup, and one per link of a longer chain.
            *ops += 1 + props.len() as u64;
            if props.len() > 1 {
                *ops += props.len() as u64;
            }
            let mut cur = var_value(*v, env);
            for p in props {
                cur = property(cur, p, env)?;
            }
            cur
        }
        Node::Map(fields) => {
            let mut map = Vec::with_capacity(fields.len());
            for (k, f) in fields {
                map.push((k.as_str(), eval(f, env, ops)?));
            }
            V::Map(map)
        }
        Node::Bin(op, a, b) => {
            let a = eval(a, env, ops)?;
            let b = eval(b, env, ops)?;
            binary(*op, &a, &b)?
        }
        Node::Not(a) => match eval(a, env, ops)? {
            V::Bool(b) => V::Bool(!b),
            _ => return None,
        },
        Node::Neg(a) => match eval(a, env, ops)? {
            V::Int(i) => V::Int(i.checked_neg()?),
            _ => return None,
        },
        Node::And(list) => {
            let mut out = true;
            for x in list {
                let V::Bool(b) = eval(x, env, ops)? else {
                    return None;
                };
                if !b {
                    out = false;
                    break;
                }
            }
            V::Bool(out)
        }
        Node::Or(list) => {
            let mut out = false;
            for x in list {
                let V::Bool(b) = eval(x, env, ops)? else {
                    return None;
                };
                if b {
                    out = true;
                    break;
                }
            }
            V::Bool(out)
        }
        Node::Coalesce(list) => {
            let mut out = V::Unit;
            for x in list {
                out = eval(x, env, ops)?;
                if !matches!(out, V::Unit) {
                    break;
                }
            }
            out
        }
    })
}

fn binary<'a>(op: BinOp, a: &V<'a>, b: &V<'a>) -> Option<V<'a>> {
    use std::cmp::Ordering;
    let ord: Ordering = match (a, b) {
        (V::Int(x), V::Int(y)) => {
            let r = match op {
                BinOp::Add => x.checked_add(*y),
                BinOp::Sub => x.checked_sub(*y),
                BinOp::Mul => x.checked_mul(*y),
                BinOp::Div => x.checked_div(*y),
                BinOp::Rem => x.checked_rem(*y),
                _ => return compare(op, x.cmp(y)),
            };
            return r.map(V::Int);
        }
        (V::Str(x), V::Str(y)) => x.cmp(y),
        (V::Bool(x), V::Bool(y)) if matches!(op, BinOp::Eq | BinOp::Ne) => x.cmp(y),
        _ => return None,
    };
    compare(op, ord)
}

fn compare<'a>(op: BinOp, ord: std::cmp::Ordering) -> Option<V<'a>> {
    use std::cmp::Ordering::*;
    Some(V::Bool(match op {
        BinOp::Eq => ord == Equal,
        BinOp::Ne => ord != Equal,
        BinOp::Lt => ord == Less,
        BinOp::Le => ord != Greater,
        BinOp::Gt => ord == Greater,
        BinOp::Ge => ord != Less,
        _ => return None,
    }))
}

#[derive(Default)]
struct Budget {
    items: usize,
    string_bytes: usize,
}

impl Budget {
    fn take(&mut self, items: usize, string_bytes: usize) -> Option<()> {
        self.items += items;
        self.string_bytes += string_bytes;
        (self.items <= MAX_PASS_ITEMS && self.string_bytes <= MAX_PASS_STRING_BYTES).then_some(())
    }
}

fn to_json(v: &V, env: &Env, budget: &mut Budget) -> Option<Value> {
    Some(match v {
        V::Unit => Value::Null,
        V::Bool(b) => Value::Bool(*b),
        V::Int(i) => Value::from(*i),
        V::Str(s) => {
            budget.take(0, s.len())?;
            Value::String((*s).to_string())
        }
        V::Json(j) => pass_through(j, budget)?,
        V::Event => {
            let mut m = Map::new();
            m.insert("data".into(), pass_through(env.event_data, budget)?);
            m.insert(
                "type".into(),
                to_json(&V::Str(env.event_type), env, budget)?,
            );
            Value::Object(m)
        }
        V::Map(fields) => {
            budget.take(fields.len(), 0)?;
            let mut m = Map::with_capacity(fields.len());
            for (k, f) in fields {
                m.insert((*k).to_string(), to_json(f, env, budget)?);
            }
            Value::Object(m)
        }
    })
}

/// [`to_json`] into `out`, reusing its object and string allocations where the shapes match.
/// Takes from `budget` exactly what `to_json` takes, in the same order, so both accept the
/// same values.
fn write_json(v: &V, env: &Env, budget: &mut Budget, out: &mut Value) -> Option<()> {
    match v {
        V::Str(s) => {
            budget.take(0, s.len())?;
            match out {
                Value::String(buf) => {
                    buf.clear();
                    buf.push_str(s);
                }
                _ => *out = Value::String((*s).to_string()),
            }
        }
        V::Map(fields) => {
            budget.take(fields.len(), 0)?;
            let m = keyed_like(out, fields)?;
            for (slot, (_, f)) in m.values_mut().zip(fields) {
                write_json(f, env, budget, slot)?;
            }
        }
        other => *out = to_json(other, env, budget)?,
    }
    Some(())
}

/// `out` as an object with exactly the keys of `fields`, in their order: kept as it is when it
/// already is one (its values are overwritten next), rebuilt otherwise. (Always `Some`; an
/// `Option` so that callers need no unreachable branch.)
fn keyed_like<'o, K: AsRef<str>, X>(
    out: &'o mut Value,
    fields: &[(K, X)],
) -> Option<&'o mut Map<String, Value>> {
    let same_keys = matches!(&*out, Value::Object(m)
        if m.len() == fields.len() && m.keys().zip(fields).all(|(a, (b, _))| a == b.as_ref()));
    if !same_keys {
        *out = Value::Object(
            fields
                .iter()
                .map(|(k, _)| (k.as_ref().to_string(), Value::Null))
                .collect(),
        );
    }
    match out {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// A JSON input value as it comes back out of Rhai: object keys sorted, integers only.
fn pass_through(v: &Value, budget: &mut Budget) -> Option<Value> {
    Some(match v {
        Value::Null | Value::Bool(_) => v.clone(),
        Value::Number(n) => {
            n.as_i64()?;
            v.clone()
        }
        Value::String(s) => {
            budget.take(0, s.len())?;
            v.clone()
        }
        Value::Array(list) => {
            budget.take(list.len(), 0)?;
            Value::Array(
                list.iter()
                    .map(|x| pass_through(x, budget))
                    .collect::<Option<_>>()?,
            )
        }
        Value::Object(m) => {
            budget.take(m.len(), 0)?;
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let mut out = Map::new();
            for (k, x) in entries {
                budget.take(0, k.len())?;
                out.insert(k.clone(), pass_through(x, budget)?);
            }
            Value::Object(out)
        }
    })
}

#[cfg(test)]
mod tests {
    //! The fast path against Rhai: same value (as JSON), same operation count.

    use proptest::prelude::*;
    use rhai::Scope;
    use serde_json::{json, Value};

    use super::super::expr::{event_dynamic, to_dynamic, to_json, Sandbox, RUN_VARS};
    use super::Env;

    /// Compiles `src`; when it has a fast form that answers, checks that Rhai gives the same
    /// value and counts the same operations. Returns whether the fast path answered.
    fn check(sandbox: &Sandbox, src: &str, context: &Value, event: (&str, &Value)) -> bool {
        let Ok(expr) = sandbox.compile(src, RUN_VARS, "$") else {
            return false;
        };
        let Some(fast) = &expr.fast else {
            return false;
        };
        let auth = json!({"sub": "u1", "n": 2});
        let env = Env {
            context,
            event_type: event.0,
            event_data: event.1,
            auth: &auth,
        };
        let Some((value, ops)) = fast.eval_json(&env, u64::MAX) else {
            return false;
        };
        let mut scope = Scope::new();
        scope.push_constant_dynamic("context", to_dynamic(context, "$").unwrap());
        scope.push_constant_dynamic("event", event_dynamic(event.0, event.1, "$").unwrap());
        scope.push_constant_dynamic("auth", to_dynamic(&auth, "$").unwrap());
        let (result, rhai_ops) = sandbox.eval(&expr, &mut scope, None, u64::MAX);
        let rhai_value = result
            .and_then(|d| to_json(&d, "$"))
            .unwrap_or_else(|e| panic!("{src}: fast path gave {value}, Rhai failed: {e}"));
        assert_eq!(value, rhai_value, "{src}: values differ");
        assert_eq!(ops, rhai_ops, "{src}: operation counts differ");
        // A bool result must also take the guard path.
        if let Value::Bool(b) = value {
            assert_eq!(fast.eval_bool(&env, u64::MAX), Some((b, ops)), "{src}");
        }
        // Written into a spare, whatever it held, the same value and count.
        for mut spare in [
            value.clone(),
            Value::Null,
            json!({"q": "x", "p": 1}),
            json!("s"),
        ] {
            assert_eq!(
                fast.eval_into(&env, u64::MAX, &mut spare),
                Some(ops),
                "{src}"
            );
            assert_eq!(spare, value, "{src}: eval_into");
        }
        // One operation short of the count, the fast path leaves the verdict to Rhai.
        assert!(fast.eval_json(&env, ops - 1).is_none(), "{src}: budget");
        assert!(
            fast.eval_into(&env, ops - 1, &mut Value::Null).is_none(),
            "{src}: budget"
        );
        true
    }

    fn context() -> Value {
        json!({
            "n": 7, "m": -3, "big": i64::MAX, "s": "abc", "t": "abd", "yes": true, "no": false,
            "null": null, "f": 1.5,
            "public": {"heartbeats": 4, "last_seen": "x", "zeta": {"b": 1, "a": [1, {"d": 2, "c": 3}]}},
            "list": [3, 1, 2]
        })
    }

    #[test]
    fn fast_matches_rhai_on_the_bench_expressions() {
        let sandbox = Sandbox::new();
        let ctx = json!({"jobs": 4, "switches": 0, "public": {"powered": 2, "heartbeats": 1, "last_seen": null}});
        let data = json!({"ts": "2025-01-01T00:00:31Z"});
        let empty = json!({});
        for src in [
            "context.jobs % 3 == 0",
            "context.jobs % 3 == 1",
            "context.jobs + 1",
            "context.switches + 1",
            "#{ powered: context.public.powered + 1 }",
            "#{ heartbeats: context.public.heartbeats + 1, last_seen: event.data.ts ?? context.public.last_seen }",
        ] {
            assert!(check(&sandbox, src, &ctx, ("HEARTBEAT", &data)), "{src}: not fast");
            assert!(check(&sandbox, src, &ctx, ("HEARTBEAT", &empty)), "{src}: not fast");
        }
    }

    #[test]
    fn fast_matches_rhai_on_each_construct() {
        let sandbox = Sandbox::new();
        let ctx = context();
        let data = json!({"k": 5, "name": "x"});
        let fast = [
            "()",
            "true",
            "42",
            "-5",
            "\"hi\"",
            "event",
            "auth",
            "context.n",
            "context.public.zeta",
            "context.public.zeta.a",
            "context.missing",
            "context.public.missing",
            "event.type",
            "event.data",
            "event.data.k",
            "event.nope",
            "auth.sub",
            "context.n + 1",
            "context.n - context.m",
            "context.n * 3",
            "context.n / 2",
            "context.m / 2",
            "context.m % 2",
            "context.n % 3 == 1",
            "-context.n",
            "!context.yes",
            "context.s == \"abc\"",
            "context.s < context.t",
            "context.s >= \"abc\"",
            "context.yes != context.no",
            "context.n > 3 && context.n < 10",
            "context.n > 30 && context.nope",
            "context.n > 3 || context.nope",
            "context.no || context.yes || context.no",
            "context.missing ?? 1",
            "context.missing ?? context.n ?? 2",
            "#{ b: 1, a: context.n + 1, c: #{ y: event.type, x: () } }",
            "#{ z: context.public }",
            "event.type == \"GO\" && event.data.k == 5",
            "(context.n + 1) * (context.m - 1)",
            "context.n == 7 && !(context.m > 0)",
        ];
        let slow: Vec<&str> = fast
            .into_iter()
            .filter(|src| !check(&sandbox, src, &ctx, ("GO", &data)))
            .collect();
        assert!(slow.is_empty(), "not fast: {slow:?}");
        // Outside the happy path: Rhai decides (errors, floats, mixed types, large values).
        let rhai_only = [
            "context",
            "context.big + 1",
            "context.n / 0",
            "context.f + 1",
            "context.f",
            "context.n == \"7\"",
            "context.null.x",
            "context.s.x",
            "context.n && true",
            "context.s + \"x\"",
            "in_state(\"a\")",
            "context.yes < context.no",
            "context.n == ()",
        ];
        let taken: Vec<&str> = rhai_only
            .into_iter()
            .filter(|src| check(&sandbox, src, &ctx, ("GO", &data)))
            .collect();
        assert!(taken.is_empty(), "took the fast path: {taken:?}");
    }

    fn leaf(pick: u8, n: i64) -> String {
        match pick % 12 {
            0 => n.to_string(),
            1 => "context.n".into(),
            2 => "context.m".into(),
            3 => "context.s".into(),
            4 => "\"abc\"".into(),
            5 => "context.yes".into(),
            6 => "event.data.k".into(),
            7 => "event.type".into(),
            8 => "context.null".into(),
            9 => "context.public.heartbeats".into(),
            10 => "true".into(),
            _ => "context.missing".into(),
        }
    }

    fn expression() -> impl Strategy<Value = String> {
        let leaf = (any::<u8>(), -4i64..10).prop_map(|(p, n)| leaf(p, n));
        leaf.prop_recursive(4, 24, 3, |inner| {
            prop_oneof![
                (inner.clone(), 0usize..15, inner.clone()).prop_map(|(a, op, b)| {
                    let ops = [
                        "+", "-", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", "&&", "||",
                        "??", "+",
                    ];
                    format!("({a} {} {b})", ops[op])
                }),
                inner.clone().prop_map(|a| format!("!{a}")),
                inner.clone().prop_map(|a| format!("-({a})")),
                (inner.clone(), inner).prop_map(|(a, b)| format!("#{{ q: {a}, p: {b} }}")),
            ]
        })
    }

    proptest! {
        #[test]
        fn fast_path_equals_rhai(src in expression(), k in -3i64..4) {
            let sandbox = Sandbox::new();
            let data = json!({"k": k});
            check(&sandbox, &src, &context(), ("GO", &data));
        }
    }
}
