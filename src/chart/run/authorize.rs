//! The chart's authorizers, `allowRead` and `allowWrite`: Rhai expressions over the context,
//! the caller and the event, run with their own operation budget.

use super::*;

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
