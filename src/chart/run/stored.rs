//! `LiveState` ↔ the stored [`InstanceState`]: `load` checks a stored state against the
//! chart version, `store` and `encode` write it back (`encode` straight to JSON bytes).

use super::*;

/// A state with nothing active but the root.
pub(super) fn blank(chart: &Chart) -> LiveState {
    let mut active = vec![false; chart.states.len()];
    active[0] = true;
    LiveState {
        active,
        context: Value::Null,
        ..LiveState::default()
    }
}

/// `InstanceState` → `LiveState`: checks that every state exists in this chart version and
/// that the configuration is legal.
pub(crate) fn load(chart: &Chart, state: &InstanceState) -> Result<LiveState, ChartError> {
    let mut live = blank(chart);
    for id in &state.configuration {
        match chart.by_id.get(id) {
            Some(&i) if i != 0 && !chart.states[i].is_history() => live.active[i] = true,
            _ => {
                return Err(ChartError::input(
                    "state.configuration",
                    format!("\"{id}\" is not a state of this chart version"),
                ))
            }
        }
    }
    check_configuration(chart, &live.active)?;
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
            live.history.insert(hi, rec);
        }
    }
    live.context = state.context.clone();
    live.timers = state.timers.clone();
    live.timer_seq = state.timer_seq;
    live.done = state.done;
    live.output = state.output.clone();
    Ok(live)
}

/// `LiveState` → `InstanceState`.
pub(crate) fn store(chart: &Chart, live: &LiveState) -> InstanceState {
    InstanceState {
        configuration: configuration_ids(chart, live).map(str::to_owned).collect(),
        history: live
            .history
            .iter()
            .map(|(h, v)| {
                (
                    chart.states[*h].id.clone(),
                    v.iter().map(|&s| chart.states[s].id.clone()).collect(),
                )
            })
            .collect(),
        context: live.context.clone(),
        timers: live.timers.clone(),
        timer_seq: live.timer_seq,
        done: live.done,
        output: live.output.clone(),
    }
}

/// Active state ids without the root, in document order (`InstanceState::configuration`).
fn configuration_ids<'a>(
    chart: &'a Chart,
    live: &'a LiveState,
) -> impl Iterator<Item = &'a str> + Clone {
    chart
        .states
        .iter()
        .zip(&live.active)
        .skip(1)
        .filter(|(_, a)| **a)
        .map(|(n, _)| n.id.as_str())
}

/// The JSON bytes `serde_json::to_vec(&store(chart, live))` would give, written straight
/// from the live state (no intermediate `InstanceState`), appended to `out`.
///
/// Written by hand because it runs once per committed step and serde's generic path was
/// half the host's per-step cost: field names are literals in `InstanceState`'s field order,
/// state ids come pre-escaped from the compiled chart (`Chart::ids_json`), and the values the
/// host put there (context, timers, output) go through `json`'s writers, which hand every
/// string that needs escaping and every float to serde_json.
pub(crate) fn encode(chart: &Chart, live: &LiveState, out: &mut Vec<u8>) {
    let ids = &chart.ids_json;
    out.extend_from_slice(b"{\"configuration\":[");
    let mut first = true;
    for (i, _) in live.active.iter().enumerate().skip(1).filter(|(_, a)| **a) {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&ids[i]);
    }
    out.extend_from_slice(b"],\"history\":{");
    let mut first = true;
    for h in &chart.histories_by_id {
        if let Some(rec) = live.history.get(h) {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&ids[*h]);
            out.extend_from_slice(b":[");
            for (k, &x) in rec.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&ids[x]);
            }
            out.push(b']');
        }
    }
    out.extend_from_slice(b"},\"context\":");
    json::write_value(out, &live.context);
    out.extend_from_slice(b",\"timers\":");
    json::write_timers(out, &live.timers);
    out.extend_from_slice(b",\"timer_seq\":");
    json::write_u64(out, live.timer_seq);
    out.extend_from_slice(if live.done {
        b",\"done\":true,\"output\":"
    } else {
        b",\"done\":false,\"output\":"
    });
    json::write_value(out, &live.output);
    out.push(b'}');
}

/// A legal SCXML configuration: ancestors of active states are active, an active compound
/// has exactly one active child, an active parallel has all its children active.
fn check_configuration(chart: &Chart, active: &[bool]) -> Result<(), ChartError> {
    for (i, node) in chart.states.iter().enumerate() {
        if !active[i] {
            continue;
        }
        if let Some(p) = node.parent {
            if !active[p] {
                return Err(bad_config(&node.id, "its parent is not active"));
            }
        }
        let kids = node.children.iter().filter(|&&c| active[c]).count();
        let regions = node
            .children
            .iter()
            .filter(|&&c| !chart.states[c].is_history())
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
