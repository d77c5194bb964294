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
//! xstate runs through `benches/xstate/bench.mjs` (`npm ci` there once); without node or the
//! package the xstate column is skipped with a message. `CHART_BENCH_STEPS` overrides STEPS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{json, Map, Value};
use smgate::chart::{Chart, Event, InstanceState};

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
    let xstate = XState::find(root);
    if let Err(why) = &xstate {
        println!("xstate column skipped: {why}");
    }

    let mut rows = Vec::new();
    for case in &cases {
        let definition = read(&case.definition);
        let chart = Chart::from_json_str(&definition)
            .unwrap_or_else(|e| panic!("{}: {e}", case.definition.display()));
        let inputs = parse_inputs(&read(&case.events));
        let traced = run(&chart, &inputs, TRACE, TRACE); // also warms up
        let mut ours = run(&chart, &inputs, steps, 0);
        ours.trace = traced.trace;
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
        println!("{}: final state {}", case.name, ours.last);
        if let Some(theirs) = &theirs {
            assert_same(case.name, &ours, theirs);
            println!(
                "{}: xstate reached the same state (and the same first {TRACE} steps)",
                case.name
            );
        }
        rows.push((case.name, ours, theirs.map(|t| t.events_per_s)));
    }

    println!();
    println!(
        "{:<40} {:>14} {:>10} {:>12} {:>14} {:>8}",
        "machine", "smgate ev/s", "ns/event", "allocs/event", "xstate ev/s", "ratio"
    );
    for (name, ours, theirs) in &rows {
        let (xs, ratio) = match theirs {
            Some(t) => (format!("{t:.0}"), format!("{:.1}x", ours.events_per_s / t)),
            None => ("-".to_string(), "-".to_string()),
        };
        println!(
            "{:<40} {:>14.0} {:>10.0} {:>12.1} {:>14} {:>8}",
            name, ours.events_per_s, ours.ns_per_event, ours.allocs_per_event, xs, ratio
        );
    }
    println!("(target: smgate >= {TARGET_RATIO}x xstate's events/s; {steps} steps per engine and machine)");
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

fn snapshot(chart: &Chart, state: &InstanceState) -> Value {
    json!({"value": chart.state_value(state), "context": state.context})
}

/// Runs `steps` inputs (cycling) the way `simulate` does. With `trace_len` > 0 it records the
/// state after each of the first steps (a separate, untimed run: recording costs more than
/// an event).
fn run(chart: &Chart, inputs: &[Input], steps: usize, trace_len: usize) -> Outcome {
    let auth = Value::Null;
    let mut clock = 0i64;
    let mut state = chart
        .initial(Value::Null, &auth, clock)
        .expect("initial")
        .state;
    let mut trace = Vec::with_capacity(trace_len);
    let a0 = ALLOCATIONS.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for i in 0..steps {
        match &inputs[i % inputs.len()] {
            Input::Event(ev) => {
                state = chart
                    .send(&state, ev.clone(), &auth, clock)
                    .expect("send")
                    .state;
            }
            Input::Advance(ms) => clock += ms,
        }
        while chart.next_due(&state).is_some_and(|d| d <= clock) && !state.done {
            state = chart.advance(&state, clock).expect("advance").state;
        }
        if i < trace_len {
            trace.push(snapshot(chart, &state));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - a0;
    Outcome {
        events_per_s: steps as f64 / secs,
        ns_per_event: secs * 1e9 / steps as f64,
        allocs_per_event: allocs as f64 / steps as f64,
        trace,
        last: snapshot(chart, &state),
    }
}

fn assert_same(name: &str, ours: &Outcome, theirs: &XStateResult) {
    for (i, (a, b)) in ours.trace.iter().zip(&theirs.trace).enumerate() {
        assert_eq!(a, b, "{name}: engines differ after step {}", i + 1);
    }
    assert_eq!(
        ours.last, theirs.last,
        "{name}: engines reach different final states"
    );
}

struct XState {
    script: PathBuf,
}

struct XStateResult {
    events_per_s: f64,
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
            trace: v["trace"].as_array().cloned().unwrap_or_default(),
            last: v["final"].clone(),
        })
    }
}
