//! `smgate chart check` and `smgate chart simulate`, black-box: the built binary, run in an
//! empty directory with a clean environment, must need no data directory or config and must
//! print exactly the DESIGN.md contract.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const HEARTBEAT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/firmware-config/machines/heartbeat.json"
);
const HEARTBEAT_EVENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/firmware-config/machines/heartbeat.events.jsonl"
);

/// What `heartbeat.events.jsonl` must print, line for line: 30 s of silence make it stale,
/// 60 s more make it offline, every HEARTBEAT counts and brings it back online, and a long
/// silence passes through stale to offline within one `$advance`.
const HEARTBEAT_EXPECTED: &[&str] = &[
    r#"{"value":"online","configuration":["online"],"tags":["online"],"done":false,"context":{"public":{"heartbeats":0,"last_seen":null}}}"#,
    r#"{"value":"stale","configuration":["stale"],"tags":["stale"],"done":false,"context":{"public":{"heartbeats":0,"last_seen":null}}}"#,
    r#"{"value":"online","configuration":["online"],"tags":["online"],"done":false,"context":{"public":{"heartbeats":1,"last_seen":"2025-01-01T00:00:31Z"}}}"#,
    r#"{"value":"stale","configuration":["stale"],"tags":["stale"],"done":false,"context":{"public":{"heartbeats":1,"last_seen":"2025-01-01T00:00:31Z"}}}"#,
    r#"{"value":"offline","configuration":["offline"],"tags":["offline"],"done":false,"context":{"public":{"heartbeats":1,"last_seen":"2025-01-01T00:00:31Z"}}}"#,
    r#"{"value":"online","configuration":["online"],"tags":["online"],"done":false,"context":{"public":{"heartbeats":2,"last_seen":"2025-01-01T00:00:31Z"}}}"#,
    r#"{"value":"offline","configuration":["offline"],"tags":["offline"],"done":false,"context":{"public":{"heartbeats":2,"last_seen":"2025-01-01T00:00:31Z"}}}"#,
];

/// Runs `smgate ARGS` in `dir` with an empty environment (no SMGATE_* config) and `stdin`.
fn smgate(dir: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_smgate"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn smgate");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for smgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("utf-8 stderr")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// The directory must stay as the test left it: the chart commands create no data dir.
fn assert_untouched(dir: &Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, expected, "chart commands must not create files");
}

#[test]
fn check_accepts_the_heartbeat_example_without_a_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = smgate(dir.path(), &["chart", "check", HEARTBEAT], "");
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "ok\n");
    assert_untouched(dir.path(), &[]);
}

#[test]
fn check_reports_the_json_path_of_a_bad_target_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let def = write(
        dir.path(),
        "door.json",
        r##"{"id": "door", "initial": "closed", "states": {
            "closed": {"on": {"OPEN": "opened"}},
            "opened": {"states": {"wide": {"on": {"SHUT": "#nowhere"}}}}
        }}"##,
    );
    let o = smgate(
        dir.path(),
        &["chart", "check", def.to_str().expect("path")],
        "",
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "");
    assert_eq!(
        stderr(&o),
        "smgate: $.states.opened.states.wide.on.SHUT: target \"#nowhere\": no state has this id\n"
    );
    assert_untouched(dir.path(), &["door.json"]);
}

#[test]
fn check_reports_the_path_of_a_bad_guard_expression() {
    let dir = tempfile::tempdir().expect("tempdir");
    let def = write(
        dir.path(),
        "door.json",
        r#"{"states": {"closed": {"on": {"OPEN": {"target": "opened", "guard": "context.locked =="}}}, "opened": {}}}"#,
    );
    let o = smgate(
        dir.path(),
        &["chart", "check", def.to_str().expect("path")],
        "",
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.starts_with("smgate: $.states.closed.on.OPEN.guard: invalid Rhai expression"),
        "{err}"
    );
}

#[test]
fn check_rejects_invalid_json_at_the_root_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let def = write(dir.path(), "broken.json", r#"{"states": "#);
    let o = smgate(
        dir.path(),
        &["chart", "check", def.to_str().expect("path")],
        "",
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("smgate: $: definition is not valid JSON"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn check_of_a_missing_file_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = smgate(dir.path(), &["chart", "check", "missing.json"], "");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("smgate: cannot read missing.json"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn simulate_heartbeat_example_prints_the_expected_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = smgate(
        dir.path(),
        &["chart", "simulate", HEARTBEAT, "--events", HEARTBEAT_EVENTS],
        "",
    );
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, HEARTBEAT_EXPECTED);
    assert!(out.ends_with('\n'));
    assert_untouched(dir.path(), &[]);
}

#[test]
fn simulate_stdout_is_exactly_the_library_simulate() {
    let def = std::fs::read_to_string(HEARTBEAT).expect("read heartbeat.json");
    let events = std::fs::read_to_string(HEARTBEAT_EVENTS).expect("read events");
    let lines = smgate::chart::simulate(&def, &events).expect("simulate");
    let dir = tempfile::tempdir().expect("tempdir");
    let o = smgate(
        dir.path(),
        &["chart", "simulate", HEARTBEAT, "--events", HEARTBEAT_EVENTS],
        "",
    );
    assert_eq!(stdout(&o), format!("{}\n", lines.join("\n")));
}

#[test]
fn simulate_reads_events_from_stdin_with_dash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = "HEARTBEAT\n\n{\"type\": \"$advance\", \"ms\": 30000}\n\"HEARTBEAT\"\n";
    let o = smgate(
        dir.path(),
        &["chart", "simulate", HEARTBEAT, "--events", "-"],
        events,
    );
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    // The blank line prints nothing; a JSON string is an event name.
    let expected = [
        r#"{"value":"online","configuration":["online"],"tags":["online"],"done":false,"context":{"public":{"heartbeats":1,"last_seen":null}}}"#,
        r#"{"value":"stale","configuration":["stale"],"tags":["stale"],"done":false,"context":{"public":{"heartbeats":1,"last_seen":null}}}"#,
        r#"{"value":"online","configuration":["online"],"tags":["online"],"done":false,"context":{"public":{"heartbeats":2,"last_seen":null}}}"#,
    ];
    assert_eq!(stdout(&o).lines().collect::<Vec<_>>(), expected);
}

#[test]
fn simulate_bad_event_line_names_the_line_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = "HEARTBEAT\n{\"type\": \"$advance\", \"ms\": -1}\n";
    let o = smgate(
        dir.path(),
        &["chart", "simulate", HEARTBEAT, "--events", "-"],
        events,
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "");
    assert_eq!(
        stderr(&o),
        "smgate: events:2: $advance needs \"ms\": a non-negative integer\n"
    );
}

#[test]
fn simulate_of_a_bad_definition_reports_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let def = write(
        dir.path(),
        "bad.json",
        r#"{"states": {"a": {"after": {"soon": "a"}}}}"#,
    );
    let o = smgate(
        dir.path(),
        &[
            "chart",
            "simulate",
            def.to_str().expect("path"),
            "--events",
            "-",
        ],
        "X\n",
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("smgate: $.states.a.after.soon"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn chart_help_lists_check_and_simulate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = smgate(dir.path(), &["chart", "--help"], "");
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("check") && out.contains("simulate"), "{out}");
}
