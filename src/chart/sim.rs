//! `smgate chart check` and `smgate chart simulate` without a server, plus `fuzz_one`.
//!
//! Simulate input, one per line (blank lines are skipped and print nothing):
//! - `NAME` — an event with `data` `{}`;
//! - `{"type": NAME, ...data}` — an event whose `data` is the other keys;
//! - `{"type": "$advance", "ms": N}` — move the virtual clock (starting at 0) forward.
//!
//! After each line, the line's input and everything it caused (internal queue, undelayed
//! sends, timers that are due at the current virtual time) have been processed; then one line
//! `{"value", "configuration", "tags", "done", "context"}` is printed, keys in that order.

use serde_json::{Map, Value};

use super::{Chart, ChartError, Event, LiveState};

/// Most timer rounds one line may trigger (guards against `after: {"0": …}` loops).
const MAX_ADVANCE_ROUNDS: usize = 100;

/// Validates a definition; the error's path points at the bad node.
pub fn check(definition_text: &str) -> Result<(), ChartError> {
    Chart::from_json_str(definition_text).map(|_| ())
}

/// Runs `events_jsonl` against the definition; one output line per non-blank input line.
pub fn simulate(definition_text: &str, events_jsonl: &str) -> Result<Vec<String>, ChartError> {
    let chart = Chart::from_json_str(definition_text)?;
    let auth = Value::Null;
    let mut clock: i64 = 0;
    // One loaded instance for the whole run; an error ends the run, so a state broken by a
    // failed step is never read.
    let (mut state, _) = chart.initial_live(Value::Null, &auth, clock)?;
    settle_timers(&chart, &mut state, clock, 0)?;
    let mut out = Vec::new();
    for (n, line) in events_jsonl.lines().enumerate() {
        let line_no = n + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = |e: ChartError| ChartError {
            path: format!("events:{line_no}: {}", e.path),
            ..e
        };
        match parse_line(line).map_err(|m| ChartError::input(format!("events:{line_no}"), m))? {
            Input::Advance(ms) => {
                clock = clock.saturating_add(ms);
                settle_timers(&chart, &mut state, clock, line_no)?;
            }
            Input::Event(ev) => {
                chart.send_live(&mut state, ev, &auth, clock).map_err(at)?;
                settle_timers(&chart, &mut state, clock, line_no)?;
            }
        }
        out.push(render(&chart, &state));
    }
    Ok(out)
}

/// Parses and runs arbitrary bytes: the part before the first NUL byte is the definition, the
/// rest the events. Never panics; errors are expected and ignored.
pub fn fuzz_one(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (def, events) = match text.split_once('\0') {
        Some((d, e)) => (d, e),
        None => (
            text.as_ref(),
            "A\nB\n{\"type\":\"$advance\",\"ms\":100000}\n",
        ),
    };
    if let Ok(chart) = Chart::from_json_str(def) {
        let _ = simulate(def, events);
        if let Ok(step) = chart.initial(Value::Null, &Value::Null, 0) {
            let _ = chart.state_value(&step.state);
            let _ = chart.tags(&step.state);
            let _ = chart.allow_read(&step.state, &Value::Null);
            let _ = chart.allow_write(
                super::WriteKind::Event,
                None,
                &step.state.context,
                &Value::Null,
            );
        }
    }
}

enum Input {
    Advance(i64),
    Event(Event),
}

fn parse_line(line: &str) -> Result<Input, String> {
    if line.starts_with('{') {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(mut obj) = v else {
            return Err("expected an object".to_string());
        };
        let name = match obj.shift_remove("type") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => return Err("an event object needs a non-empty string \"type\"".to_string()),
        };
        if name == "$advance" {
            let ms = obj
                .get("ms")
                .and_then(Value::as_i64)
                .filter(|ms| *ms >= 0)
                .ok_or("$advance needs \"ms\": a non-negative integer")?;
            return Ok(Input::Advance(ms));
        }
        return Ok(Input::Event(Event::new(name, Value::Object(obj))));
    }
    if line.starts_with('"') {
        let name: String =
            serde_json::from_str(line).map_err(|e| format!("invalid JSON string: {e}"))?;
        if name.is_empty() {
            return Err("event type must not be empty".to_string());
        }
        return Ok(Input::Event(Event::new(name, Value::Object(Map::new()))));
    }
    Ok(Input::Event(Event::new(line, Value::Object(Map::new()))))
}

fn settle_timers(
    chart: &Chart,
    state: &mut LiveState,
    clock: i64,
    line_no: usize,
) -> Result<(), ChartError> {
    let mut rounds = 0;
    while state.next_due().is_some_and(|d| d <= clock) && !state.done() {
        rounds += 1;
        if rounds > MAX_ADVANCE_ROUNDS {
            return Err(ChartError::runtime(
                format!("events:{line_no}"),
                "timers keep coming due without time passing (a zero-delay timer loop?)",
            ));
        }
        chart.advance_live(state, clock).map_err(|e| ChartError {
            path: format!("events:{line_no}: {}", e.path),
            ..e
        })?;
    }
    Ok(())
}

fn render(chart: &Chart, state: &LiveState) -> String {
    let mut line = Map::new();
    line.insert("value".into(), chart.live_value(state));
    line.insert(
        "configuration".into(),
        Value::from(chart.live_configuration(state)),
    );
    line.insert("tags".into(), Value::from(chart.live_tags(state)));
    line.insert("done".into(), Value::Bool(state.done()));
    line.insert("context".into(), state.context().clone());
    Value::Object(line).to_string()
}
