//! Property tests: random small definitions and event sequences never panic, replay is
//! deterministic, and `InstanceState` round-trips exactly through serde_json.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;

/// A tiny deterministic PRNG so one `u64` seed describes a whole definition (shrinks well
/// enough, and keeps the generator readable).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const EVENTS: &[&str] = &["A", "B", "C", "A.x", "*", "done.state"];

/// Builds a random definition: every state has an explicit id `sN` so targets are easy.
fn definition(seed: u64) -> Value {
    let mut rng = Rng(seed | 1);
    let mut ids = Vec::new();
    let mut root = Map::new();
    root.insert("id".into(), json!("root"));
    root.insert("context".into(), json!({"n": 0, "public": {"k": 1}}));
    if rng.chance(30) {
        root.insert("type".into(), json!("parallel"));
    }
    let mut states = Map::new();
    let n = 1 + rng.below(3);
    for k in 0..n {
        states.insert(format!("k{k}"), state(&mut rng, 1, &mut ids));
    }
    root.insert("states".into(), Value::Object(states));
    let mut root = Value::Object(root);
    fill_transitions(&mut rng, &mut root, &ids, true);
    root
}

fn state(rng: &mut Rng, depth: u32, ids: &mut Vec<String>) -> Value {
    let id = format!("s{}", ids.len());
    ids.push(id.clone());
    let mut m = Map::new();
    m.insert("id".into(), json!(id));
    let roll = rng.below(100);
    if depth < 3 && roll < 35 {
        if roll < 12 {
            m.insert("type".into(), json!("parallel"));
        }
        let mut states = Map::new();
        for k in 0..(1 + rng.below(3)) {
            states.insert(format!("k{k}"), state(rng, depth + 1, ids));
        }
        if rng.chance(30) {
            let hid = format!("s{}", ids.len());
            ids.push(hid.clone());
            let kind = if rng.chance(50) { "deep" } else { "shallow" };
            states.insert(
                "h".into(),
                json!({"id": hid, "type": "history", "history": kind}),
            );
        }
        m.insert("states".into(), Value::Object(states));
    } else if roll < 50 {
        m.insert("type".into(), json!("final"));
        if rng.chance(50) {
            m.insert("output".into(), json!("context.n"));
        }
    }
    if rng.chance(30) {
        m.insert("tags".into(), json!([format!("t{}", rng.below(3))]));
    }
    Value::Object(m)
}

fn action(rng: &mut Rng) -> Value {
    match rng.below(6) {
        0 => json!({"type": "assign", "params": {"n": "context.n + 1"}}),
        1 => json!({"type": "raise", "params": {"event": EVENTS[rng.below(3) as usize]}}),
        2 => {
            json!({"type": "send", "params": {"event": "C", "delay": rng.below(3) * 100, "id": "x"}})
        }
        3 => json!({"type": "cancel", "params": {"id": "x"}}),
        4 => json!({"type": "log", "params": {"expr": "context.n"}}),
        _ => json!({"type": "emit", "params": {"event": "e", "expr": "event.type"}}),
    }
}

fn transition(rng: &mut Rng, ids: &[String]) -> Value {
    let mut t = Map::new();
    if !ids.is_empty() && rng.chance(80) {
        t.insert(
            "target".into(),
            json!(format!("#{}", ids[rng.below(ids.len() as u64) as usize])),
        );
    }
    if rng.chance(30) {
        t.insert("guard".into(), json!("context.n % 2 == 0"));
    }
    if rng.chance(50) {
        t.insert("actions".into(), json!([action(rng)]));
    }
    if rng.chance(20) {
        t.insert("reenter".into(), json!(true));
    }
    Value::Object(t)
}

fn fill_transitions(rng: &mut Rng, v: &mut Value, ids: &[String], is_root: bool) {
    let Value::Object(m) = v else { return };
    let kind = m
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if let Some(Value::Object(states)) = m.get_mut("states") {
        for (_, child) in states.iter_mut() {
            fill_transitions(rng, child, ids, false);
        }
    }
    if kind == "final" || kind == "history" {
        return;
    }
    if rng.chance(60) {
        let mut on = Map::new();
        for _ in 0..(1 + rng.below(2)) {
            on.insert(
                EVENTS[rng.below(EVENTS.len() as u64) as usize].into(),
                transition(rng, ids),
            );
        }
        m.insert("on".into(), Value::Object(on));
    }
    if rng.chance(15) {
        let mut t = transition(rng, ids);
        if let Value::Object(tm) = &mut t {
            tm.insert("guard".into(), json!("context.n < 3"));
            tm.insert(
                "actions".into(),
                json!([{"type": "assign", "params": {"n": "context.n + 1"}}]),
            );
        }
        m.insert("always".into(), t);
    }
    if !is_root && rng.chance(25) {
        m.insert(
            "after".into(),
            json!({(100 * (1 + rng.below(3))).to_string(): transition(rng, ids)}),
        );
    }
    if rng.chance(30) {
        m.insert("entry".into(), json!([action(rng)]));
    }
    if rng.chance(20) {
        m.insert("exit".into(), json!([action(rng)]));
    }
}

fn round_trip(state: &InstanceState) -> InstanceState {
    let bytes = serde_json::to_vec(state).expect("serialize");
    let back: InstanceState = serde_json::from_slice(&bytes).expect("deserialize");
    assert_eq!(&back, state, "InstanceState must round-trip");
    assert_eq!(serde_json::to_vec(&back).expect("serialize"), bytes);
    back
}

/// Drives the API; returns every state (or error) along the way.
fn drive(chart: &Chart, events: &[u8]) -> Vec<Result<InstanceState, ChartError>> {
    let mut out = Vec::new();
    let mut now = 0;
    let mut state = match chart.initial(Value::Null, &Value::Null, now) {
        Ok(step) if chart.check_state(&step.state).is_ok() => step.state,
        Ok(step) => panic!(
            "initial produced an illegal state: {:?}",
            step.state.configuration
        ),
        Err(e) => return vec![Err(e)],
    };
    out.push(Ok(state.clone()));
    // A host that keeps the instance loaded steps a LiveState alongside; it must agree with
    // the stored-form calls at every step, and encode to exactly the stored bytes.
    let mut live = chart.load(&state).expect("load the initial state");
    for &e in events {
        let stored = round_trip(&state);
        let (result, live_result) = if e as usize >= EVENTS.len() {
            now += 100 * i64::from(e - EVENTS.len() as u8 + 1);
            (
                chart.advance(&stored, now),
                chart.advance_live(&mut live, now),
            )
        } else {
            let name = if EVENTS[e as usize] == "*" {
                "Z"
            } else {
                EVENTS[e as usize]
            };
            let event = Event::new(name, json!({"i": e}));
            (
                chart.send(&stored, event.clone(), &Value::Null, now),
                chart.send_live(&mut live, event, &Value::Null, now),
            )
        };
        match (result, live_result) {
            (Ok(step), Ok(stepped)) => {
                if let Err(e) = chart.check_state(&step.state) {
                    panic!("step produced an illegal state: {e}");
                }
                assert_eq!(
                    chart.store(&live),
                    step.state,
                    "live and stored paths differ"
                );
                assert_eq!(stepped.effects, step.effects);
                assert_eq!(stepped.microsteps, step.microsteps);
                let mut bytes = Vec::new();
                chart.encode(&live, &mut bytes);
                assert_eq!(bytes, serde_json::to_vec(&step.state).expect("serialize"));
                assert_eq!(chart.live_value(&live), chart.state_value(&step.state));
                assert_eq!(chart.live_tags(&live), chart.tags(&step.state));
                assert_eq!(
                    chart.live_configuration(&live),
                    chart.atomic_configuration(&step.state)
                );
                state = step.state;
                out.push(Ok(state.clone()));
            }
            // The host would roll back: keep the previous state (and load it again).
            (Err(err), Err(live_err)) => {
                assert_eq!(err, live_err);
                assert!(live.is_broken());
                assert!(chart
                    .send_live(&mut live, Event::new("A", Value::Null), &Value::Null, now)
                    .is_err());
                live = chart.load(&state).expect("reload");
                out.push(Err(err));
            }
            (a, b) => panic!("stored and live paths disagree: {a:?} vs {b:?}"),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn random_definitions_never_panic_replay_identically_and_round_trip(
        seed in any::<u64>(),
        events in proptest::collection::vec(0u8..9, 0..12),
    ) {
        let def = definition(seed);
        if let Ok(chart) = Chart::compile(&def) {
            let first = drive(&chart, &events);
            let second = drive(&chart, &events);
            prop_assert_eq!(&first, &second);
            // Same again through the CLI contract.
            let lines: Vec<String> = events.iter().map(|&e| {
                if e as usize >= EVENTS.len() {
                    format!("{{\"type\":\"$advance\",\"ms\":{}}}", 100 * (e as usize - EVENTS.len() + 1))
                } else {
                    EVENTS[e as usize].replace('*', "Z")
                }
            }).collect();
            let text = def.to_string();
            let a = simulate(&text, &lines.join("\n"));
            let b = simulate(&text, &lines.join("\n"));
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn fuzz_one_never_panics_on_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzz_one(&data);
    }

    #[test]
    fn fuzz_one_never_panics_on_mutated_definitions(seed in any::<u64>(), cut in 0usize..400, byte in any::<u8>()) {
        let mut text = definition(seed).to_string().into_bytes();
        if !text.is_empty() {
            let at = cut % text.len();
            text[at] = byte;
        }
        fuzz_one(&text);
    }
}

#[test]
fn generator_produces_mostly_valid_definitions() {
    let valid = (1..200u64)
        .filter(|&s| Chart::compile(&definition(s)).is_ok())
        .count();
    assert!(
        valid > 100,
        "only {valid} of 199 random definitions compile"
    );
}
