//! Statechart engine events/s, side by side with xstate 5 on Node running the same definitions
//! and the same event sequences in the same run (`cargo bench --bench chart`).
//!
//! Cases: the 3-state heartbeat machine of `firmware-config/machines/` and the 20-state
//! `benches/defs/device.json` (parallel regions, deep and shallow history, guards, assigns, an
//! `after` timer). Each events file is cycled for `STEPS` lines; a line is an event (`send`) or
//! a `$advance` of the virtual clock (`advance`, firing the due timers), exactly as in
//! `smgate chart simulate`. Both engines must reach the same state value and context: the
//! first steps are compared one by one, and the final state after all steps.
//!
//! What is timed is what a host does per input line:
//! - smgate `host`: steps a loaded [`LiveState`] (`send_live`, then `advance_live` while timers
//!   are due) and, when anything ran, encodes the stored form (the JSON bytes the instances
//!   API writes per step), compared with `xstate+persist`;
//! - smgate `step`: the same without the encoding — the engine alone, compared with xstate;
//! - smgate `stored`: the `InstanceState` calls, which convert the stored form in and out on
//!   every call (what hosts did before `LiveState`);
//! - xstate: `actor.send` (or the clock advance) plus `actor.getSnapshot()`, and in the
//!   `xstate+persist` column also `JSON.stringify(actor.getPersistedSnapshot())`.
//!
//! xstate runs through `benches/xstate/bench.mjs` (`npm ci` there once); without node or the
//! package the xstate column is skipped with a message. `CHART_BENCH_STEPS` overrides STEPS;
//! `CHART_BENCH_MODES` (comma-separated `host`, `step`, `stored`) picks the smgate runs and
//! `CHART_BENCH_XSTATE=0` skips xstate — for instruction counts under callgrind:
//! `CHART_BENCH_MODES=host CHART_BENCH_XSTATE=0 CHART_BENCH_STEPS=N valgrind --tool=callgrind
//! target/release/deps/chart-* --bench`, differenced over two N.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{json, Map, Value};
use smgate::chart::{Chart, Event, InstanceState, LiveState};

/// Counts allocations so the table can show allocations per event.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const STEPS: usize = 200_000;
/// Steps compared one by one between the engines (the whole cycle, several times).
const TRACE: usize = 200;
const TARGET_RATIO: f64 = 20.0;

enum Input {
    Event(Event),
    Advance(i64),
}

struct Case {
    name: &'static str,
    definition: PathBuf,
    events: PathBuf,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `LiveState` steps plus encoding the stored form after each line that ran anything.
    Host,
    /// `LiveState` steps only.
    Step,
    /// The `InstanceState` calls.
    Stored,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Host => "host",
            Mode::Step => "step",
            Mode::Stored => "stored",
        }
    }
}

struct Outcome {
    events_per_s: f64,
    ns_per_event: f64,
    allocs_per_event: f64,
    trace: Vec<Value>,
    last: Value,
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let steps = std::env::var("CHART_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEPS);
    let cases = [
        Case {
            name: "heartbeat (3 states)",
            definition: root.join("firmware-config/machines/heartbeat.json"),
            events: root.join("firmware-config/machines/heartbeat.events.jsonl"),
        },
        Case {
            name: "device (20 states, parallel, history)",
            definition: root.join("benches/defs/device.json"),
            events: root.join("benches/defs/device.events.jsonl"),
        },
    ];
    let modes: Vec<Mode> = match std::env::var("CHART_BENCH_MODES") {
        Ok(list) => [Mode::Host, Mode::Step, Mode::Stored]
            .into_iter()
            .filter(|m| list.split(',').any(|x| x.trim() == m.name()))
            .collect(),
        Err(_) => vec![Mode::Host, Mode::Step, Mode::Stored],
    };
    let xstate = if std::env::var("CHART_BENCH_XSTATE").is_ok_and(|v| v == "0") {
        Err("CHART_BENCH_XSTATE=0".to_string())
    } else {
        XState::find(root)
    };
    if let Err(why) = &xstate {
        println!("xstate column skipped: {why}");
    }

    let mut rows = Vec::new();
    for case in &cases {
        let definition = read(&case.definition);
        let chart = Chart::from_json_str(&definition)
            .unwrap_or_else(|e| panic!("{}: {e}", case.definition.display()));
        let inputs = parse_inputs(&read(&case.events));
        // Every mode must agree step by step (this also warms up).
        let traced = run(&chart, &inputs, TRACE, TRACE, Mode::Host);
        for mode in [Mode::Step, Mode::Stored] {
            let other = run(&chart, &inputs, TRACE, TRACE, mode);
            assert_eq!(
                traced.trace,
                other.trace,
                "{}: {} differs",
                case.name,
                mode.name()
            );
        }
        let ours: Vec<(Mode, Outcome)> = modes
            .iter()
            .map(|&m| (m, run(&chart, &inputs, steps, 0, m)))
            .collect();
        let theirs = match &xstate {
            Ok(x) => match x.run(case, steps) {
                Ok(v) => Some(v),
                Err(e) => {
                    println!("{}: xstate failed: {e}", case.name);
                    None
                }
            },
            Err(_) => None,
        };
        if let Some((_, o)) = ours.first() {
            println!("{}: final state {}", case.name, o.last);
        }
        for (mode, o) in &ours {
            assert_eq!(o.last, ours[0].1.last, "{}: {}", case.name, mode.name());
        }
        if let Some(theirs) = &theirs {
            if let Some((_, o)) = ours.first() {
                assert_same(case.name, &traced.trace, &o.last, theirs);
            }
            println!(
                "{}: xstate reached the same state (and the same first {TRACE} steps)",
                case.name
            );
        }
        rows.push((case.name, ours, theirs));
    }

    println!();
    println!(
        "{:<38} {:<7} {:>12} {:>9} {:>13} {:>12} {:>8} {:>15} {:>8}",
        "machine",
        "smgate",
        "ev/s",
        "ns/event",
        "allocs/event",
        "xstate ev/s",
        "ratio",
        "xstate+persist",
        "ratio"
    );
    for (name, ours, theirs) in &rows {
        for (mode, o) in ours {
            let cols = |x: Option<f64>| match x {
                Some(t) => (format!("{t:.0}"), format!("{:.1}x", o.events_per_s / t)),
                None => ("-".to_string(), "-".to_string()),
            };
            let (xs, ratio) = cols(theirs.as_ref().map(|t| t.events_per_s));
            let (xp, pratio) = cols(theirs.as_ref().and_then(|t| t.persist_events_per_s));
            println!(
                "{:<38} {:<7} {:>12.0} {:>9.0} {:>13.1} {:>12} {:>8} {:>15} {:>8}",
                name,
                mode.name(),
                o.events_per_s,
                o.ns_per_event,
                o.allocs_per_event,
                xs,
                ratio,
                xp,
                pratio
            );
        }
    }
    println!("({steps} steps per engine and machine)");
    println!();
    // Like against like: the engine alone against xstate's send + getSnapshot, and a host
    // that persists every step against xstate doing the same (its persisted snapshot as
    // JSON). The strictest pairing, persisting against not persisting, is shown as well.
    println!("target: >= {TARGET_RATIO}x xstate's events/s");
    for (name, ours, theirs) in &rows {
        let Some(theirs) = theirs else { continue };
        let ours_in = |mode: Mode| ours.iter().find(|(m, _)| *m == mode).map(|(_, o)| o);
        let verdict = |label: &str, o: Option<&Outcome>, t: Option<f64>, judged: bool| {
            if let (Some(o), Some(t)) = (o, t) {
                let ratio = o.events_per_s / t;
                let mark = match (judged, ratio >= TARGET_RATIO) {
                    (false, _) => "(reported)",
                    (true, true) => "ok",
                    (true, false) => "MISSED",
                };
                println!("  {name:<38} {label:<44} {ratio:>6.1}x  {mark}");
            }
        };
        verdict(
            "engine: step vs xstate",
            ours_in(Mode::Step),
            Some(theirs.events_per_s),
            true,
        );
        verdict(
            "persisting: host vs xstate+persist",
            ours_in(Mode::Host),
            theirs.persist_events_per_s,
            true,
        );
        verdict(
            "host (persisting) vs xstate (not)",
            ours_in(Mode::Host),
            Some(theirs.events_per_s),
            false,
        );
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `smgate chart simulate` input format (see `chart::sim`).
fn parse_inputs(text: &str) -> Vec<Input> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            if !line.starts_with('{') {
                let name =
                    serde_json::from_str::<String>(line).unwrap_or_else(|_| line.to_string());
                return Input::Event(Event::new(name, Value::Object(Map::new())));
            }
            let Value::Object(mut obj) = serde_json::from_str(line).expect("event line is JSON")
            else {
                panic!("event line is not an object: {line}")
            };
            let name = obj
                .shift_remove("type")
                .and_then(|t| t.as_str().map(String::from));
            match name.as_deref() {
                Some("$advance") => Input::Advance(obj["ms"].as_i64().expect("$advance ms")),
                Some(n) => Input::Event(Event::new(n, Value::Object(obj))),
                None => panic!("event without type: {line}"),
            }
        })
        .collect()
}

fn snapshot(chart: &Chart, state: &InstanceState, live: &LiveState, mode: Mode) -> Value {
    match mode {
        Mode::Stored => json!({"value": chart.state_value(state), "context": state.context}),
        _ => json!({"value": chart.live_value(live), "context": live.context()}),
    }
}

/// Runs `steps` inputs (cycling) the way a host does (see the module doc for the modes).
/// With `trace_len` > 0 it records the state after each of the first steps (a separate,
/// untimed run: recording costs more than an event).
fn run(chart: &Chart, inputs: &[Input], steps: usize, trace_len: usize, mode: Mode) -> Outcome {
    let auth = Value::Null;
    let mut clock = 0i64;
    let mut state = chart
        .initial(Value::Null, &auth, clock)
        .expect("initial")
        .state;
    let mut live: LiveState = chart.load(&state).expect("load");
    let mut stored: Vec<u8> = Vec::new();
    let mut trace = Vec::with_capacity(trace_len);
    let a0 = ALLOCATIONS.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for i in 0..steps {
        let input = &inputs[i % inputs.len()];
        if let Input::Advance(ms) = input {
            clock += ms;
        }
        if mode == Mode::Stored {
            if let Input::Event(ev) = input {
                state = chart
                    .send(&state, ev.clone(), &auth, clock)
                    .expect("send")
                    .state;
            }
            while chart.next_due(&state).is_some_and(|d| d <= clock) && !state.done {
                state = chart.advance(&state, clock).expect("advance").state;
            }
        } else {
            let mut ran = false;
            if let Input::Event(ev) = input {
                chart
                    .send_live(&mut live, ev.clone(), &auth, clock)
                    .expect("send");
                ran = true;
            }
            while live.next_due().is_some_and(|d| d <= clock) && !live.done() {
                chart.advance_live(&mut live, clock).expect("advance");
                ran = true;
            }
            if ran && mode == Mode::Host {
                stored.clear();
                chart.encode(&live, &mut stored);
            }
        }
        if i < trace_len {
            trace.push(snapshot(chart, &state, &live, mode));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - a0;
    if mode == Mode::Host && !stored.is_empty() {
        let decoded: InstanceState = serde_json::from_slice(&stored).expect("stored form");
        assert_eq!(decoded, chart.store(&live), "encode and store disagree");
    }
    Outcome {
        events_per_s: steps as f64 / secs,
        ns_per_event: secs * 1e9 / steps as f64,
        allocs_per_event: allocs as f64 / steps as f64,
        trace,
        last: snapshot(chart, &state, &live, mode),
    }
}

/// The first steps one by one, then the final state after all steps.
fn assert_same(name: &str, trace: &[Value], last: &Value, theirs: &XStateResult) {
    for (i, (a, b)) in trace.iter().zip(&theirs.trace).enumerate() {
        assert_eq!(a, b, "{name}: engines differ after step {}", i + 1);
    }
    assert_eq!(
        last, &theirs.last,
        "{name}: engines reach different final states"
    );
}

struct XState {
    script: PathBuf,
}

struct XStateResult {
    events_per_s: f64,
    persist_events_per_s: Option<f64>,
    trace: Vec<Value>,
    last: Value,
}

impl XState {
    /// node on PATH and `benches/xstate/node_modules/xstate` installed (`npm ci` once if
    /// npm is there and the lock file is).
    fn find(root: &Path) -> Result<XState, String> {
        let dir = root.join("benches/xstate");
        let node = Command::new("node").arg("--version").output();
        if !node.is_ok_and(|o| o.status.success()) {
            return Err("node is not on PATH".into());
        }
        if !dir.join("node_modules/xstate/package.json").exists() {
            println!("installing xstate: npm ci in {}", dir.display());
            let npm = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--silent"])
                .current_dir(&dir)
                .status();
            if !npm.is_ok_and(|s| s.success()) {
                return Err(format!(
                    "xstate is not installed and `npm ci` in {} failed",
                    dir.display()
                ));
            }
        }
        Ok(XState {
            script: dir.join("bench.mjs"),
        })
    }

    fn run(&self, case: &Case, steps: usize) -> Result<XStateResult, String> {
        let out = Command::new("node")
            .arg(&self.script)
            .arg(&case.definition)
            .arg(&case.events)
            .arg(steps.to_string())
            .arg(TRACE.to_string())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(XStateResult {
            events_per_s: v["events_per_s"].as_f64().ok_or("no events_per_s")?,
            persist_events_per_s: v["persist_events_per_s"].as_f64(),
            trace: v["trace"].as_array().cloned().unwrap_or_default(),
            last: v["final"].clone(),
        })
    }
}
