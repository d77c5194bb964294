//! MQTT heartbeats as transitions, black-box: the real binary against its embedded broker and
//! against a real mosquitto started on a free loopback port, with `mosquitto_pub` /
//! `mosquitto_sub` as devices and consumers. Invariants checked: a message changes state only
//! after commit and exactly once (also across SIGKILLs), bad input lands in dead letters and
//! touches nothing else, states are retained, the status topic carries birth and Last Will.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{call, metric, Gw};
use reqwest::Method;
use serde_json::{json, Value};

const MANY: &[(&str, &str)] = &[
    ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000"),
    ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "10000000"),
    ("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "10000000"),
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn heartbeat_def() -> Value {
    serde_json::from_str(common::HEARTBEAT_DEF).unwrap()
}

/// Opens on `OPEN` (counted, with an `emit`), closes on `CLOSE`; the authorizer lets only the
/// MQTT principal in and refuses `FORBIDDEN`.
fn door_def() -> Value {
    json!({
        "id": "door",
        "initial": "closed",
        "context": {"public": {"opens": 0, "by": null}},
        "authorizers": {
            "allowWrite": "type == \"initialization\" || (auth.sub == \"mqtt\" && auth.role == \"operator\" && event.type != \"FORBIDDEN\")"
        },
        "states": {
            "closed": {"on": {
                "OPEN": {"target": "open", "actions": [
                    {"type": "assign", "params": {"public": "#{ opens: context.public.opens + 1, by: event.data.by }"}},
                    {"type": "emit", "params": {"topic": "opened", "expr": "#{ opens: context.public.opens }"}}
                ]},
                "FORBIDDEN": "open"
            }},
            "open": {"on": {"CLOSE": "closed"}}
        }
    })
}

/// A mosquitto on a free loopback port with persistence in a temp dir; killed on drop.
struct Mosquitto {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).unwrap();
        // The shipped sample's settings, on a test port and directory. `user root` keeps
        // mosquitto from switching to a user that cannot write the temp dir (when run as root).
        writeln!(
            f,
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nuser root\n\
             max_inflight_messages 1000\nmax_queued_messages 1000000\nmax_queued_bytes 0\nmax_packet_size 262144\n\
             log_dest stderr\nlog_type error\n",
            dir.path().display()
        )
        .unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto {
            port,
            child,
            _dir: dir,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SMGATE_MQTT_MODE".into(), "external".into()),
            (
                "SMGATE_MQTT_URL".into(),
                format!("mqtt://127.0.0.1:{}", self.port),
            ),
        ]
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_pub` one QoS 1 message (`None`: empty payload).
fn publish(port: u16, topic: &str, payload: Option<&[u8]>) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
    ]);
    let out = match payload {
        None => cmd.arg("-n").output(),
        Some(p) => {
            cmd.args(["-s"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("mosquitto_pub");
            child.stdin.take().unwrap().write_all(p).unwrap();
            child.wait_with_output()
        }
    }
    .expect("mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first line `mosquitto_sub --retained-only` prints for `topic` within 3 s, with `args`
/// added (subscription QoS, output format).
fn sub_retained(port: u16, topic: &str, args: &[&str]) -> String {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args(["-C", "1", "-W", "3", "--retained-only"])
        .args(args)
        .output()
        .expect("mosquitto_sub");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().unwrap_or_default().to_string()
}

/// The retained message on `topic`, or None after 3 s.
fn retained(port: u16, topic: &str) -> Option<Value> {
    serde_json::from_str(&sub_retained(port, topic, &[])).ok()
}

/// The QoS at which a QoS 1 subscriber receives the retained message on `topic` (the lower of
/// the publisher's and the subscription's).
fn retained_qos(port: u16, topic: &str) -> Option<u8> {
    sub_retained(port, topic, &["-q", "1", "-F", "%q"])
        .trim()
        .parse()
        .ok()
}

/// States are retained snapshots published at `mqtt.state_qos`: 1 by default, 0 on request;
/// anything else is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_states_go_at_the_configured_qos() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    for (setting, want) in [(None, 1u8), (Some("0"), 0)] {
        let extra: Vec<(&str, &str)> = setting
            .map(|q| ("SMGATE_MQTT_STATE_QOS", q))
            .into_iter()
            .collect();
        let s = setup(true, &extra, &[("hb", heartbeat_def(), true)]).await;
        publish(s.port, "smgate/hb/q-1/heartbeat", Some(b"{}"));
        let qos = eventually(20, "the retained state", async || {
            retained_qos(s.port, "smgate/hb/q-1/state")
        })
        .await;
        assert_eq!(qos, want, "state_qos {setting:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = common::cli_env(dir.path(), &["serve"], &[("SMGATE_MQTT_STATE_QOS", "2")]);
    assert!(!ok);
    assert!(err.contains("mqtt.state_qos must be 0 or 1"), "{err}");
}

/// Polls `f` until it returns Some, for up to `secs`.
async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Setup {
    gw: Gw,
    admin: String,
    /// Port devices publish to: the embedded broker or mosquitto.
    port: u16,
    mosquitto: Option<Mosquitto>,
}

/// A gateway with machine `slug` running `def`; on mosquitto when `external`.
async fn setup(external: bool, extra: &[(&str, &str)], machines: &[(&str, Value, bool)]) -> Setup {
    let mosquitto = external.then(Mosquitto::start);
    let mut env: Vec<(String, String)> = MANY
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let port = match &mosquitto {
        Some(m) => {
            env.extend(m.env());
            m.port
        }
        None => {
            let p = free_port();
            env.push(("SMGATE_MQTT_LISTEN".into(), format!("127.0.0.1:{p}")));
            // These tests are about ingest; `mqtt_server.rs` tests the keys.
            env.push(("SMGATE_MQTT_ALLOW_ANONYMOUS".into(), "true".into()));
            p
        }
    };
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let gw = Gw::start(&env_refs);
    let c = gw.client();
    let mut admin = String::new();
    for (slug, def, auto) in machines {
        let (s, b, _) = call(
            &c,
            Method::POST,
            &gw.url("/api/chain/state-machines"),
            Some(&gw.owner_key),
            Some(json!({"slug": slug})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        admin = b["api_key"].as_str().unwrap().to_string();
        let body = json!({"definition": def, "makeCurrent": true, "autoCreateInstances": auto});
        let (s, v, _) = call(
            &c,
            Method::POST,
            &gw.url(&format!("/machines/{slug}/v")),
            Some(&admin),
            Some(body),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    Setup {
        gw,
        admin,
        port,
        mosquitto,
    }
}

async fn instance(gw: &Gw, machine: &str, slug: &str) -> Option<Value> {
    let (s, b, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url(&format!("/machines/{machine}/i/{slug}")),
        Some(&gw.owner_key),
        None,
    )
    .await;
    (s == 200).then_some(b)
}

/// Every transition record of an instance (`GET …/events`, all pages).
async fn history(gw: &Gw, machine: &str, slug: &str) -> Vec<Value> {
    let c = gw.client();
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = cursor
            .as_ref()
            .map(|c| format!("&cursor={c}"))
            .unwrap_or_default();
        let (s, b, _) = call(
            &c,
            Method::GET,
            &gw.url(&format!(
                "/machines/{machine}/i/{slug}/events?limit=1000{q}"
            )),
            Some(&gw.owner_key),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        out.extend(b["events"].as_array().unwrap().iter().cloned());
        match b["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

async fn dead_letters(gw: &Gw, machine: &str, key: &str) -> Vec<Value> {
    let (s, b, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url(&format!("/api/chain/state-machines/{machine}/dead-letters")),
        Some(key),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["ok"], true);
    b["dead_letters"].as_array().unwrap().clone()
}

async fn heartbeat_changes_state_and_publishes_retained(external: bool) {
    let s = setup(
        external,
        &[],
        &[("hb", heartbeat_def(), true), ("door", door_def(), true)],
    )
    .await;
    let port = s.port;
    publish(port, "smgate/hb/dev-1/heartbeat", Some(br#"{"ts": 1234}"#));
    let view = eventually(20, "the retained state of dev-1", async || {
        retained(port, "smgate/hb/dev-1/state").filter(|v| v["publicContext"]["heartbeats"] == 1)
    })
    .await;
    assert_eq!(view["state"], "online");
    assert_eq!(view["tags"], json!(["online"]));
    assert_eq!(view["publicContext"]["last_seen"], 1234);
    // The same public view over HTTP.
    let http = instance(&s.gw, "hb", "dev-1").await.unwrap();
    assert_eq!(http["publicContext"], view["publicContext"]);
    // An empty payload is `{}`.
    publish(port, "smgate/hb/dev-1/heartbeat", None);
    eventually(20, "the second heartbeat", async || {
        retained(port, "smgate/hb/dev-1/state").filter(|v| v["publicContext"]["heartbeats"] == 2)
    })
    .await;
    // events/<TYPE> is event <TYPE> with the payload as data; `emit` is published after commit.
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "smgate/door/d-1/emit/#",
            "-C",
            "1",
            "-W",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    publish(
        port,
        "smgate/door/d-1/events/OPEN",
        Some(br#"{"by": "badge-7"}"#),
    );
    let view = eventually(20, "the door's state", async || {
        retained(port, "smgate/door/d-1/state").filter(|v| v["state"] == "open")
    })
    .await;
    assert_eq!(view["publicContext"], json!({"opens": 1, "by": "badge-7"}));
    let out = sub.wait_with_output_timeout();
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap(),
        json!({"opens": 1}),
        "emit payload"
    );
    // The transition rows carry the MQTT actor.
    let (_, rows, _) = call(
        &s.gw.client(),
        Method::GET,
        &s.gw.url("/api/chain/state-machines/door/explore?limit=50"),
        Some(&s.gw.owner_key),
        None,
    )
    .await;
    let text = rows.to_string();
    assert!(text.contains("\"actor\":\"mqtt\""), "{text}");
    // The gateway's status is retained online with its birth number.
    let gateway_id = gateway_id(&s.gw).await;
    let status = retained(port, &format!("smgate/$gateway/{gateway_id}/status")).expect("status");
    assert_eq!(status["status"], "online");
    assert!(status["bdSeq"].as_u64().unwrap() >= 1);
    assert_eq!(metric(&s.gw, "smgate_mqtt_applied_total").await, 3);
    drop(s.mosquitto);
}

trait WaitTimeout {
    fn wait_with_output_timeout(self) -> String;
}

impl WaitTimeout for Child {
    fn wait_with_output_timeout(self) -> String {
        let out = self.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

async fn gateway_id(gw: &Gw) -> String {
    let (s, b, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url("/api/gateway"),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    b["gateway_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_heartbeat_changes_state_and_publishes_retained_state() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    heartbeat_changes_state_and_publishes_retained(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_heartbeat_changes_state_and_publishes_retained_state() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    heartbeat_changes_state_and_publishes_retained(true).await;
}

async fn bad_input_lands_in_dead_letters(external: bool) {
    let s = setup(
        external,
        &[("SMGATE_MQTT_MAX_PAYLOAD_BYTES", "1024")],
        &[("door", door_def(), true)],
    )
    .await;
    let port = s.port;
    publish(port, "smgate/door/d-1/events/OPEN", Some(br#"{"by": "a"}"#));
    eventually(20, "d-1 open", async || {
        retained(port, "smgate/door/d-1/state").filter(|v| v["state"] == "open")
    })
    .await;
    let before = history(&s.gw, "door", "d-1").await.len();
    let big = vec![b'x'; 2000];
    let bad: Vec<(&str, Option<&[u8]>, &str)> = vec![
        (
            "smgate/door/d-1/events/CLOSE",
            Some(b"{not json"),
            "invalid_json",
        ),
        (
            "smgate/door/d-1/events/CLOSE",
            Some(b"[1, 2]"),
            "invalid_json",
        ),
        ("smgate/door/d-1/events/CLOSE", Some(&big), "oversize"),
        (
            "smgate/door/bad.slug/heartbeat",
            Some(b"{}"),
            "unknown_topic",
        ),
        ("smgate/door/d-1/events/", Some(b"{}"), "unknown_topic"),
        (
            "smgate/door/d-1/events/FORBIDDEN",
            Some(b"{}"),
            "rejected_by_authorizer",
        ),
    ];
    for (topic, payload, _) in &bad {
        publish(port, topic, *payload);
    }
    // Wrong machine: no such machine on this gateway.
    publish(port, "smgate/no-such-machine/d-1/heartbeat", Some(b"{}"));
    let letters = eventually(20, "six dead letters", async || {
        let l = dead_letters(&s.gw, "door", &s.admin).await;
        (l.len() == bad.len()).then_some(l)
    })
    .await;
    // Newest first; each with its reason, topic and (kept) payload.
    let mut got: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            (
                l["topic"].as_str().unwrap().into(),
                l["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    got.reverse();
    let want: Vec<(String, String)> = bad
        .iter()
        .map(|(t, _, r)| (t.to_string(), r.to_string()))
        .collect();
    assert_eq!(got, want);
    let oversize = letters.iter().find(|l| l["reason"] == "oversize").unwrap();
    assert_eq!(
        (
            oversize["payload_bytes"].as_u64(),
            oversize["truncated"].as_bool()
        ),
        (Some(2000), Some(true))
    );
    assert!(letters
        .iter()
        .all(|l| l["message"].as_str().is_some_and(|m| !m.is_empty())
            && l["ts_ms"].as_i64().is_some()));
    eventually(20, "the unknown-machine letter counted", async || {
        (metric(&s.gw, "smgate_mqtt_dead_letters_total").await == 7).then_some(())
    })
    .await;
    // Nothing else was affected: same state, no new transition records, and the instance
    // still takes a valid event (so the bad ones were acked, not stuck in front of it).
    let view = instance(&s.gw, "door", "d-1").await.unwrap();
    assert_eq!(
        (
            view["state"].as_str(),
            view["publicContext"]["opens"].as_u64()
        ),
        (Some("open"), Some(1))
    );
    assert_eq!(history(&s.gw, "door", "d-1").await.len(), before);
    assert!(instance(&s.gw, "door", "bad-slug").await.is_none());
    publish(port, "smgate/door/d-1/events/CLOSE", Some(b"{}"));
    eventually(20, "d-1 closed", async || {
        retained(port, "smgate/door/d-1/state").filter(|v| v["state"] == "closed")
    })
    .await;
    assert_eq!(metric(&s.gw, "smgate_mqtt_applied_total").await, 2);
    // Viewers may read dead letters; anonymous callers may not.
    let (st, _, _) = call(
        &s.gw.client(),
        Method::GET,
        &s.gw.url("/api/chain/state-machines/door/dead-letters"),
        None,
        None,
    )
    .await;
    assert_eq!(st, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_bad_input_lands_in_dead_letters_and_nothing_else_changes() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    bad_input_lands_in_dead_letters(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_bad_input_lands_in_dead_letters_and_nothing_else_changes() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    bad_input_lands_in_dead_letters(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_instances_are_created_only_when_the_machine_allows_it() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    let s = setup(true, &[], &[("hb", heartbeat_def(), false)]).await;
    let port = s.port;
    publish(port, "smgate/hb/new-1/heartbeat", Some(b"{}"));
    let letters = eventually(20, "the unknown-instance letter", async || {
        let l = dead_letters(&s.gw, "hb", &s.admin).await;
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(letters[0]["reason"], "unknown_instance");
    assert!(instance(&s.gw, "hb", "new-1").await.is_none());
    // Turn auto-create on (with a new current version); the next heartbeat creates it.
    let body =
        json!({"definition": heartbeat_def(), "makeCurrent": true, "autoCreateInstances": true});
    let (st, v, _) = call(
        &s.gw.client(),
        Method::POST,
        &s.gw.url("/machines/hb/v"),
        Some(&s.admin),
        Some(body),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    publish(port, "smgate/hb/new-1/heartbeat", Some(b"{}"));
    let view = eventually(20, "new-1 created", async || {
        instance(&s.gw, "hb", "new-1").await
    })
    .await;
    assert_eq!(view["publicContext"]["heartbeats"], 1);
    assert_eq!(view["state"], "online");
    let h = history(&s.gw, "hb", "new-1").await;
    assert_eq!(
        h.iter()
            .map(|e| e["event"]["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["xstate.init", "HEARTBEAT"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_born_online_and_dies_offline_with_the_same_sequence() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    let mut s = setup(true, &[], &[("hb", heartbeat_def(), true)]).await;
    let topic = format!("smgate/$gateway/{}/status", gateway_id(&s.gw).await);
    let port = s.port;
    let first = eventually(20, "online", async || {
        retained(port, &topic).filter(|v| v["status"] == "online")
    })
    .await;
    let n = first["bdSeq"].as_u64().unwrap();
    // SIGKILL: the broker publishes the Last Will, retained, with the same birth number.
    s.gw.kill();
    let will = eventually(20, "the Last Will", async || {
        retained(port, &topic).filter(|v| v["status"] == "offline")
    })
    .await;
    assert_eq!(will["bdSeq"].as_u64(), Some(n), "{will}");
    // The next start is a new birth.
    s.gw.spawn();
    let again = eventually(20, "online again", async || {
        retained(port, &topic).filter(|v| v["status"] == "online")
    })
    .await;
    assert!(again["bdSeq"].as_u64().unwrap() > n, "{again}");
    // SIGTERM: the gateway says offline itself (a clean DISCONNECT suppresses the will).
    assert!(s.gw.stop().success());
    let bye = eventually(20, "offline after SIGTERM", async || {
        retained(port, &topic).filter(|v| v["status"] == "offline")
    })
    .await;
    assert_eq!(bye["bdSeq"], again["bdSeq"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_transitions_publish_the_retained_state() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    // A watchdog with short timers: online → stale (300 ms) → offline (300 ms more).
    let mut def = heartbeat_def();
    def["states"]["online"]["after"] = json!({"300": "stale"});
    def["states"]["stale"]["after"] = json!({"300": "offline"});
    let s = setup(false, &[], &[("hb", def, true)]).await;
    let port = s.port;
    publish(port, "smgate/hb/w-1/heartbeat", Some(b"{}"));
    eventually(20, "offline by timers", async || {
        retained(port, "smgate/hb/w-1/state").filter(|v| v["state"] == "offline")
    })
    .await;
    publish(port, "smgate/hb/w-1/heartbeat", Some(b"{}"));
    let v = eventually(20, "online again", async || {
        retained(port, "smgate/hb/w-1/state")
            .filter(|v| v["state"] == "online" && v["publicContext"]["heartbeats"] == 2)
    })
    .await;
    assert_eq!(v["tags"], json!(["online"]));
}

/// Under steady traffic the ingest connection pings after each round of acks (to learn which
/// the broker has processed), so one of its PINGREQs is often unanswered when rumqttc's own
/// keepalive ping comes due, which rumqttc takes for a dead connection: under load the
/// connection was cut every keepalive period. It must stay up; and a broker that stops
/// answering (SIGSTOP: the TCP connection stays open) must still be found dead by the gateway
/// itself, within about a keepalive period, and reconnected to once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_keepalive_survives_steady_acks_and_finds_a_silent_broker() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    let s = setup(
        true,
        &[("SMGATE_MQTT_KEEPALIVE_SECS", "1")],
        &[("hb", heartbeat_def(), true)],
    )
    .await;
    // About 6 s (six keepalive periods) of steady heartbeats across 50 instances.
    let total = 4000;
    let acked =
        publish_numbered_paced(s.port, total, 50, 0, false, Duration::from_micros(1500)).await;
    assert_eq!(acked.len() as u64, total);
    eventually(60, "every heartbeat applied", async || {
        (common::metric(&s.gw, "smgate_mqtt_applied_total").await >= total).then_some(())
    })
    .await;
    assert_eq!(
        common::metric(&s.gw, "smgate_mqtt_connection_losses_total").await,
        0,
        "the ingest connection was cut under steady traffic"
    );
    assert_eq!(common::metric(&s.gw, "smgate_mqtt_connects_total").await, 1);
    let pid = s.mosquitto.as_ref().unwrap().child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let found = tokio::time::timeout(
        Duration::from_secs(8),
        eventually(8, "the silent broker found dead", async || {
            (common::metric(&s.gw, "smgate_mqtt_connection_losses_total").await >= 1).then_some(())
        }),
    )
    .await;
    signal("-CONT");
    assert!(
        found.is_ok(),
        "the gateway did not notice the silent broker"
    );
    eventually(30, "reconnected", async || {
        (common::metric(&s.gw, "smgate_mqtt_connects_total").await >= 2).then_some(())
    })
    .await;
    publish(s.port, "smgate/hb/after-pause/heartbeat", Some(b"{}"));
    eventually(30, "applied after the reconnect", async || {
        instance(&s.gw, "hb", "after-pause").await
    })
    .await;
}

/// A QoS 1 publisher (rumqttc) of numbered heartbeats; returns the numbers the broker acked.
/// Stops at the first connection error when `stop_on_error` (the embedded broker died with the
/// gateway), else rumqttc reconnects and resends.
async fn publish_numbered(
    port: u16,
    total: u64,
    instances: u64,
    from: u64,
    stop_on_error: bool,
) -> Vec<u64> {
    publish_numbered_paced(port, total, instances, from, stop_on_error, Duration::ZERO).await
}

/// As [`publish_numbered`], one message every `gap`.
async fn publish_numbered_paced(
    port: u16,
    total: u64,
    instances: u64,
    from: u64,
    stop_on_error: bool,
    gap: Duration,
) -> Vec<u64> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new(
        format!("device-sim-{from}-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(100)
        .set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let feeder = tokio::spawn(async move {
        for n in from..from + total {
            let topic = format!("smgate/hb/dev-{}/heartbeat", n % instances);
            if client
                .publish(topic, QoS::AtLeastOnce, false, format!("{{\"n\":{n}}}"))
                .await
                .is_err()
            {
                return;
            }
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
    });
    // pkid → number, in the order rumqttc sends them.
    let mut next = from;
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while (acked.len() as u64) < total && Instant::now() < deadline {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let std::collections::hash_map::Entry::Vacant(e) = inflight.entry(pkid) {
                    e.insert(next);
                    next += 1;
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                if let Some(n) = inflight.remove(&a.pkid) {
                    acked.push(n);
                }
            }
            Ok(_) => {}
            Err(_) if stop_on_error => break,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    feeder.abort();
    acked
}

/// Every HEARTBEAT `n` recorded per instance, from the transition history (the log's rows).
async fn applied_numbers(gw: &Gw, instances: u64) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..instances {
        if instance(gw, "hb", &format!("dev-{i}")).await.is_none() {
            continue;
        }
        for e in history(gw, "hb", &format!("dev-{i}")).await {
            if e["event"]["type"] == "HEARTBEAT" {
                *seen.entry(e["event"]["n"].as_u64().unwrap()).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Of the heartbeat numbers `expected`: those not applied, those applied more than once (with
/// their counts; at most 10 of each), and how many distinct numbers were applied.
async fn once_each(
    gw: &Gw,
    instances: u64,
    expected: impl IntoIterator<Item = u64>,
) -> (Vec<u64>, Vec<(u64, usize)>, usize) {
    let seen = applied_numbers(gw, instances).await;
    let dups = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, c)| (*n, *c))
        .take(10)
        .collect();
    let missing = expected
        .into_iter()
        .filter(|n| !seen.contains_key(n))
        .take(10)
        .collect();
    (missing, dups, seen.len())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Devices outrunning the writer leave the backlog in the broker, not in the gateway: with
/// batches of 16, reading pauses at 64 publishes waiting for a batch (`client::queue_cap`),
/// whatever mosquitto's inflight window lets through (it does not bound a client that acks;
/// 1,000 here). A rumqttc device publishes 20,000 QoS 1 heartbeats as fast as mosquitto takes
/// them; every one is applied exactly once, and the peak of the ingest queue stays within the
/// cap plus one read of the event loop (at most 10 packets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_backlog_stays_in_the_broker_while_the_writer_is_behind() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    let (total, instances) = (20_000u64, 100u64);
    let s = setup(
        true,
        &[("SMGATE_MQTT_BATCH_SIZE", "16")],
        &[("hb", heartbeat_def(), true)],
    )
    .await;
    let acked = publish_numbered(s.port, total, instances, 0, false).await;
    assert_eq!(acked.len() as u64, total, "the broker acked every message");
    let applied_when_published = metric(&s.gw, "smgate_mqtt_applied_total").await;
    eventually(300, "all messages applied", async || {
        (metric(&s.gw, "smgate_mqtt_applied_total").await >= total).then_some(())
    })
    .await;
    let peak = metric(&s.gw, "smgate_mqtt_ingest_queued_peak").await;
    eprintln!(
        "backlog test: {applied_when_published} of {total} applied when the device finished; ingest queue peak {peak}"
    );
    assert!(
        applied_when_published < total - 1_000,
        "the writer kept up ({applied_when_published} applied): no backlog was tested"
    );
    assert!(peak <= 64 + 9, "ingest queue peaked at {peak}");
    assert!(
        peak >= 32,
        "the queue never filled ({peak}): the pause was not tested"
    );
    let seen = applied_numbers(&s.gw, instances).await;
    assert_eq!(seen.len() as u64, total);
    assert!(seen.values().all(|c| *c == 1), "a message applied twice");
    assert_eq!(metric(&s.gw, "smgate_mqtt_ingest_queued").await, 0);
}

/// The embedded server's queue to the writer is bounded (`server::queue_cap`: four batches):
/// with batches of 16, 8 devices with up to 100 publishes in flight each (Receive Maximum
/// caps them at 32) find at most 64 waiting, and the rest waits in their sockets. Every
/// heartbeat is applied exactly once, and the gauge is back at 0 afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ingest_queue_stays_bounded_while_the_writer_is_behind() {
    let (devices, per, instances) = (8u64, 2_500u64, 100u64);
    let s = setup(
        false,
        &[("SMGATE_MQTT_BATCH_SIZE", "16")],
        &[("hb", heartbeat_def(), true)],
    )
    .await;
    let runs: Vec<_> = (0..devices)
        .map(|d| tokio::spawn(publish_numbered(s.port, per, instances, d * per, false)))
        .collect();
    let mut acked = 0;
    for r in runs {
        acked += r.await.unwrap().len() as u64;
    }
    assert_eq!(acked, devices * per, "every publish acked");
    let peak = metric(&s.gw, "smgate_mqtt_ingest_queued_peak").await;
    assert!(peak <= 64, "ingest queue peaked at {peak}");
    assert!(
        peak >= 32,
        "the queue never filled ({peak}): the bound was not tested"
    );
    let seen = applied_numbers(&s.gw, instances).await;
    assert_eq!(seen.len() as u64, devices * per);
    assert!(seen.values().all(|c| *c == 1), "a message applied twice");
    assert_eq!(metric(&s.gw, "smgate_mqtt_ingest_queued").await, 0);
}

/// The issue's crash test, sized by `TEST_MQTT_CRASH_MESSAGES` / `TEST_MQTT_CRASH_INSTANCES`
/// (defaults 20,000 across 200; `.ci/run` runs 100,000 across 1,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_every_message_is_applied_exactly_once_across_sigkills() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    let total = env_u64("TEST_MQTT_CRASH_MESSAGES", 20_000);
    let instances = env_u64("TEST_MQTT_CRASH_INSTANCES", 200);
    let mut s = setup(true, &[], &[("hb", heartbeat_def(), true)]).await;
    let port = s.port;
    let publisher = tokio::spawn(publish_numbered(port, total, instances, 0, false));
    let mut kills = 0;
    let mut duplicates = 0;
    let started = Instant::now();
    while kills < 5 || !publisher.is_finished() {
        tokio::time::sleep(Duration::from_millis(700 + (kills as u64 * 137) % 500)).await;
        // Counters live in the process: read them before it dies.
        duplicates += metric(&s.gw, "smgate_mqtt_duplicates_total").await;
        s.gw.kill();
        kills += 1;
        s.gw.spawn();
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "publisher did not finish"
        );
    }
    let acked = publisher.await.unwrap();
    assert_eq!(acked.len() as u64, total, "the broker acked every message");
    // Wait until the gateway has drained the broker's queue for its session.
    let counts = eventually(600, "all messages applied", async || {
        let mut sum = 0;
        for i in 0..instances {
            sum += instance(&s.gw, "hb", &format!("dev-{i}"))
                .await
                .map(|v| v["publicContext"]["heartbeats"].as_u64().unwrap())
                .unwrap_or(0);
        }
        (sum >= total).then_some(sum)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (missing, dups, applied) = once_each(&s.gw, instances, 0..total).await;
    eprintln!(
        "crash test: {total} messages, {instances} instances, {kills} SIGKILLs; heartbeats counted {counts}; redeliveries recognised and skipped {}",
        duplicates + metric(&s.gw, "smgate_mqtt_duplicates_total").await
    );
    assert!(
        dups.is_empty() && missing.is_empty() && applied as u64 == total && counts == total,
        "dups {dups:?} missing {missing:?}"
    );
    for i in 0..instances {
        let v = instance(&s.gw, "hb", &format!("dev-{i}")).await.unwrap();
        assert_eq!(
            v["publicContext"]["heartbeats"].as_u64().unwrap(),
            total / instances + u64::from(i < total % instances),
            "dev-{i}"
        );
    }
    assert!(s.gw.stop().success());
    let (ok, out, err) = common::cli(&s.gw.data(), &["verify"]);
    assert!(ok, "verify failed: {out}{err}");
}

/// A store with machine `hb` (heartbeat chart, auto-create on), for in-process `ingest` tests:
/// the database, the chart cache and a fixed time.
fn heartbeat_store(
    dir: &std::path::Path,
) -> (
    std::sync::Arc<redb::Database>,
    smgate::instances::Charts,
    i64,
) {
    let db = common::open_db(dir);
    let now = 1_700_000_000_000;
    let txn = db.begin_write().unwrap();
    common::create_heartbeat_machine(&txn, "hb", now);
    smgate::instances::set_auto_create(&txn, "hb", true).unwrap();
    txn.commit().unwrap();
    (db, Default::default(), now)
}

/// The dedup invariant of `ingest` (exactly-once effect over QoS 1), in process and
/// deterministic: a redelivery (same packet id, DUP) of a committed message is a duplicate —
/// acked, no second transition; a new message reusing the packet id without DUP is applied;
/// and once the broker has processed the first delivery's PUBACK (`ingest::forget`), even an
/// identical message on the reused packet id that is later redelivered with DUP is applied.
#[test]
fn a_committed_redelivery_is_skipped_and_a_reused_packet_id_is_applied() {
    use redb::ReadableTable;
    use smgate::instances;
    use smgate::mqtt::ingest::{self, Message, Outcome, Rules};
    let dir = tempfile::tempdir().unwrap();
    let (db, charts, now) = heartbeat_store(dir.path());
    let rules = Rules {
        prefix: "smgate".into(),
        client_id: "smgate-test".into(),
        max_payload: 1024,
        dead_letter_cap: 10,
    };
    let msg_with = |pkid: u16, dup: bool, payload: &'static [u8]| {
        Message::new(
            "smgate-test".into(),
            "smgate/hb/dev-1/heartbeat".into(),
            bytes::Bytes::from_static(payload),
            pkid,
            dup,
            rules.max_payload,
        )
    };
    let msg = |pkid: u16, dup: bool| msg_with(pkid, dup, b"{}");
    // One batch transaction, as the batcher runs it.
    let batch = |mut messages: Vec<Message>, tag: u64, settled: &[(u16, u64)]| {
        let settled: Vec<ingest::Forget> = settled
            .iter()
            .map(|&(pkid, tag)| ingest::Forget::Delivery("smgate-test".into(), pkid, tag))
            .collect();
        let settled = settled.as_slice();
        let txn = db.begin_write().unwrap();
        let out =
            ingest::apply_then_forget(&txn, &charts, &rules, &mut messages, tag, settled, now)
                .unwrap();
        txn.commit().unwrap();
        out.iter()
            .zip(&messages)
            .map(|(o, m)| {
                let kind = match o {
                    Outcome::Applied { .. } => "applied",
                    Outcome::Duplicate(_) => "duplicate",
                    Outcome::Dead(r) => r,
                };
                (kind, o.entry_tag(m.pkid, tag))
            })
            .collect::<Vec<_>>()
    };
    let heartbeats = || {
        let txn = db.begin_read().unwrap();
        instances::history(&txn, "hb", "dev-1", None, 1000)
            .unwrap()
            .iter()
            .filter(|(_, r)| r.event == "HEARTBEAT")
            .count()
    };

    assert_eq!(batch(vec![msg(7, false)], 11, &[]), [("applied", Some(11))]);
    assert_eq!(heartbeats(), 1);
    // The PUBACK was lost with the connection: the broker redelivers with DUP. Acked (its ack
    // settles the first delivery's entry, tag 11), not applied.
    assert_eq!(
        batch(vec![msg(7, true)], 12, &[]),
        [("duplicate", Some(11))]
    );
    assert_eq!(heartbeats(), 1, "a redelivery must not add a transition");
    // A redelivery of a different message on that packet id is applied.
    let other = msg_with(7, true, b"{\"n\": 2}");
    assert_eq!(batch(vec![other], 13, &[]), [("applied", Some(13))]);
    assert_eq!(heartbeats(), 2);
    // The broker acknowledged our PUBACK and reuses packet id 7 for a new, identical message
    // (same topic and payload): without DUP it is new, and applied.
    assert_eq!(batch(vec![msg(7, false)], 14, &[]), [("applied", Some(14))]);
    assert_eq!(heartbeats(), 3);
    // Its PUBACK is settled (broker processed it) in the next batch; then packet id 7 carries
    // another identical message, whose first delivery is not committed (crash), and which the
    // broker redelivers with DUP: it must be applied, not taken for the settled one.
    assert_eq!(batch(vec![], 15, &[(7, 14)]), []);
    assert_eq!(batch(vec![msg(7, true)], 16, &[]), [("applied", Some(16))]);
    assert_eq!(heartbeats(), 4);
    // Settling an older delivery of a packet id leaves the newer delivery's entry alone.
    assert_eq!(batch(vec![], 17, &[(7, 14)]), []);
    assert_eq!(
        batch(vec![msg(7, true)], 18, &[]),
        [("duplicate", Some(16))]
    );
    assert_eq!(heartbeats(), 4);
    // After a reconnect the broker resends packet id 9 while our ack of the first copy is on
    // its way; the ack settles (PINGRESP) before the batcher has applied the resent copy, so
    // both arrive in one batch: the copy is still recognised, then the entry is forgotten.
    assert_eq!(batch(vec![msg(9, false)], 21, &[]), [("applied", Some(21))]);
    assert_eq!(heartbeats(), 5);
    assert_eq!(
        batch(vec![msg(9, true)], 22, &[(9, 21)]),
        [("duplicate", Some(21))]
    );
    assert_eq!(heartbeats(), 5, "the resent copy must not add a transition");
    // QoS 0 (packet id 0) leaves no entry and is never a duplicate.
    assert_eq!(batch(vec![msg(0, false)], 19, &[]), [("applied", None)]);
    assert_eq!(batch(vec![msg(0, true)], 20, &[]), [("applied", None)]);
    assert_eq!(heartbeats(), 7);
    // The table holds only unsettled deliveries.
    let txn = db.begin_read().unwrap();
    let left: Vec<u16> = txn
        .open_table(ingest::INFLIGHT)
        .unwrap()
        .iter()
        .unwrap()
        .map(|e| e.unwrap().0.value().1)
        .collect();
    assert_eq!(left, [7]);
}

/// `ingest::apply` reads a batch's instance rows ahead in key order, steps each instance in
/// memory and writes its row once, after its last step (history runs likewise, in key order):
/// the batch must leave exactly what applying its messages one at a time leaves. The
/// batch mixes runs of several events per instance (with timers due before them), a paused
/// instance, a pending version upgrade, an instance created on the way, a redelivery within
/// the batch, a packet id reused, and bad input; compared are the outcomes, instance rows,
/// histories, due index, log rows, dead letters and dedup entries.
#[test]
fn a_batch_applied_at_once_writes_what_its_messages_applied_one_by_one_write() {
    use redb::{ReadTransaction, ReadableTable};
    use smgate::instances::{self, history::RUNS, Charts, Status, DUE, INSTANCES};
    use smgate::ledger::log::{read as log_read, ROWS};
    use smgate::mqtt::ingest::{self, Message, Outcome, Rules, DEAD_LETTERS, INFLIGHT};
    let dir = tempfile::tempdir().unwrap();
    let now = 1_700_000_000_000;
    let devices = 80;
    let rules = Rules {
        prefix: "smgate".into(),
        client_id: "smgate-test".into(),
        max_payload: 1024,
        dead_letter_cap: 100,
    };
    let msg = |topic: &str, payload: &[u8], pkid: u16, dup: bool| {
        Message::new(
            "smgate-test".into(),
            topic.into(),
            bytes::Bytes::copy_from_slice(payload),
            pkid,
            dup,
            rules.max_payload,
        )
    };
    let beat = |d: u64, n: u64| format!("{{\"ts\": {n}, \"d\": {d}}}").into_bytes();
    // One store set up, then copied, so that both hold the same version ids.
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    {
        let db = common::open_db(&a_dir);
        let charts = Charts::default();
        let txn = db.begin_write().unwrap();
        common::create_heartbeat_machine(&txn, "hb", now);
        instances::set_auto_create(&txn, "hb", true).unwrap();
        let next = common::HEARTBEAT_DEF.replace("stale after 30 s", "stale after 30 s (v2)");
        let v2 = instances::create_version(&txn, "hb", &next, None, false, "test", now).unwrap();
        let mut created: Vec<Message> = (0..devices)
            .map(|d| msg(&format!("smgate/hb/dev-{d}/heartbeat"), b"", 0, false))
            .collect();
        ingest::apply(&txn, &charts, &rules, &mut created, 1, now).unwrap();
        instances::set_status(&txn, "hb", "dev-5", Status::Paused).unwrap();
        instances::set_target_version(&txn, &charts, "hb", "dev-9", &v2.id).unwrap();
        txn.commit().unwrap();
    }
    std::fs::copy(a_dir.join("db.redb"), b_dir.join("db.redb")).unwrap();
    // 45 s later: every watchdog (30 s) is due and fires before the instance's first event.
    let later = now + 45_000;
    let make = || {
        let mut batch = Vec::new();
        let mut pkid = 0;
        for round in 0..3 {
            for d in 0..devices {
                pkid += 1;
                let topic = format!("smgate/hb/dev-{d}/heartbeat");
                batch.push(msg(&topic, &beat(d, round), pkid, false));
            }
            match round {
                0 => {
                    batch.push(msg("smgate/hb/dev-3/heartbeat", b"{not json", 300, false));
                    batch.push(msg("smgate/hb/dev-1/bogus", b"{}", 301, false));
                    batch.push(msg("smgate/nope/dev-1/heartbeat", b"{}", 302, false));
                    // Redelivered within the batch: a duplicate of the first message.
                    batch.push(msg("smgate/hb/dev-0/heartbeat", &beat(0, 0), 1, true));
                }
                1 => {
                    batch.push(msg("smgate/hb/new-1/heartbeat", b"{}", 303, false));
                    batch.push(msg("smgate/hb/dev-2/events/PING", b"{}", 304, false));
                    batch.push(msg("smgate/hb/dev-4/heartbeat", &[b' '; 2000], 305, false));
                    // Packet id 2 again, for a new message.
                    batch.push(msg("smgate/hb/dev-7/heartbeat", &beat(7, 99), 2, false));
                }
                _ => batch.push(msg("smgate/hb/new-1/heartbeat", b"{}", 306, false)),
            }
        }
        batch
    };
    let kinds = |out: &[Outcome]| -> Vec<String> {
        out.iter()
            .map(|o| match o {
                Outcome::Applied {
                    machine,
                    instance,
                    view,
                    ..
                } => {
                    format!("applied {machine}/{instance} {view}")
                }
                Outcome::Duplicate(t) => format!("duplicate {t}"),
                Outcome::Dead(r) => format!("dead {r}"),
            })
            .collect()
    };
    let dump = |txn: &ReadTransaction| -> Vec<String> {
        let mut rows = Vec::new();
        for e in txn.open_table(INSTANCES).unwrap().iter().unwrap() {
            let (k, v) = e.unwrap();
            rows.push(format!("instance {:?} {:?}", k.value(), v.value()));
        }
        for e in txn.open_table(RUNS).unwrap().iter().unwrap() {
            let (k, v) = e.unwrap();
            rows.push(format!("history {:?} {:?}", k.value(), v.value()));
        }
        for e in txn.open_table(DUE).unwrap().iter().unwrap() {
            rows.push(format!("due {:?}", e.unwrap().0.value()));
        }
        for e in txn.open_table(DEAD_LETTERS).unwrap().iter().unwrap() {
            let (k, v) = e.unwrap();
            rows.push(format!("dead letter {:?} {:?}", k.value(), v.value()));
        }
        for e in txn.open_table(INFLIGHT).unwrap().iter().unwrap() {
            let (k, v) = e.unwrap();
            rows.push(format!("inflight {:?} {:?}", k.value(), v.value()));
        }
        let seqs: Vec<(String, u64)> = txn
            .open_table(ROWS)
            .unwrap()
            .iter()
            .unwrap()
            .map(|e| {
                let (k, _) = e.unwrap();
                let (slug, seq) = k.value();
                (slug.to_owned(), seq)
            })
            .collect();
        for (slug, seq) in seqs {
            // Transition ids are random, and with them the hashes: the rest must match.
            let r = log_read::row(txn, &slug, seq).unwrap().unwrap();
            let payload = String::from_utf8_lossy(&r.payload).into_owned();
            rows.push(format!(
                "log {slug} {} {} {} {} {payload}",
                r.seq, r.ts_ms, r.kind, r.actor
            ));
        }
        rows
    };
    let apply = |path: &std::path::Path, whole: bool, batch: &mut [Message]| {
        let db = common::open_db(path);
        let charts = Charts::default();
        let txn = db.begin_write().unwrap();
        let out = if whole {
            ingest::apply(&txn, &charts, &rules, batch, 7, later).unwrap()
        } else {
            let mut out = Vec::new();
            for m in batch.chunks_mut(1) {
                out.extend(ingest::apply(&txn, &charts, &rules, m, 7, later).unwrap());
            }
            out
        };
        txn.commit().unwrap();
        let rows = dump(&db.begin_read().unwrap());
        (kinds(&out), rows)
    };
    let (out_a, rows_a) = apply(&a_dir, true, &mut make());
    let (out_b, rows_b) = apply(&b_dir, false, &mut make());
    let count = |what: &str| out_a.iter().filter(|o| o.starts_with(what)).count();
    // 240 heartbeats, 3 of them to the paused dev-5; new-1 twice, PING, packet id 2 reused.
    assert_eq!(count("applied"), 240 - 3 + 4, "{out_a:#?}");
    assert_eq!(count("duplicate"), 1);
    // dev-5 three times, bad JSON, bad topic, unknown machine, oversize.
    assert_eq!(count("dead"), 3 + 4);
    assert_eq!(out_a, out_b);
    assert_eq!(rows_a.len(), rows_b.len());
    for (a, b) in rows_a.iter().zip(&rows_b) {
        assert_eq!(a, b);
    }
}

/// The same invariant end to end on mosquitto: the gateway commits a message and dies before
/// acking it (`TEST_MQTT_ABORT_BEFORE_ACK`); mosquitto redelivers it with DUP to the restarted
/// gateway, which acks it without a second transition; after another restart nothing is
/// redelivered (the ack was produced) and new messages are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_redelivery_after_a_crash_between_commit_and_ack_is_acked_not_reapplied() {
    if !common::have_programs(&["/usr/sbin/mosquitto", "mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    let topic = "smgate/hb/dev-x/heartbeat";
    let mut s = setup(
        true,
        &[("TEST_MQTT_ABORT_BEFORE_ACK", topic)],
        &[("hb", heartbeat_def(), true)],
    )
    .await;
    publish(s.port, topic, Some(b"{\"n\": 1}"));
    // The gateway aborts right after the commit.
    let child = s.gw.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the gateway did not abort");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.gw.child = None;
    s.gw.env.retain(|(k, _)| k != "TEST_MQTT_ABORT_BEFORE_ACK");
    s.gw.spawn();
    eventually(30, "the redelivery recognised", async || {
        (metric(&s.gw, "smgate_mqtt_duplicates_total").await == 1).then_some(())
    })
    .await;
    let beats = |h: &[Value]| {
        h.iter()
            .filter(|e| e["event"]["type"] == "HEARTBEAT")
            .count()
    };
    assert_eq!(beats(&history(&s.gw, "hb", "dev-x").await), 1);
    assert_eq!(metric(&s.gw, "smgate_mqtt_applied_total").await, 0);
    // The duplicate was acked: a restart gets no redelivery, and a new message is applied.
    assert!(s.gw.stop().success());
    s.gw.spawn();
    publish(s.port, topic, Some(b"{\"n\": 2}"));
    eventually(30, "the next message applied", async || {
        (metric(&s.gw, "smgate_mqtt_applied_total").await == 1).then_some(())
    })
    .await;
    assert_eq!(metric(&s.gw, "smgate_mqtt_duplicates_total").await, 0);
    assert_eq!(beats(&history(&s.gw, "hb", "dev-x").await), 2);
    assert!(s.gw.stop().success());
}

// ---------------------------------------------------------------------------------------------
// smgate as the devices' MQTT server: real clients (paho-mqtt, mosquitto_pub/sub, rumqttc).

/// Whether paho-mqtt (Python) is importable; `.ci/run` installs it and requires it.
fn have_paho() -> bool {
    if !common::have_programs(&["python3"]) {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI_REQUIRE_PEERS").as_deref() != Ok("1"),
            "CI_REQUIRE_PEERS=1 but paho-mqtt is not installed (pip install paho-mqtt)"
        );
        eprintln!("SKIPPED: this test needs paho-mqtt (pip install paho-mqtt)");
    }
    ok
}

/// Starts `tests/devices/paho_device.py` publishing `total` numbered heartbeats from `first`.
fn paho_device(
    port: u16,
    key: &str,
    client_id: &str,
    (first, total, instances): (u64, u64, u64),
    args: &[&str],
    out: &std::path::Path,
) -> Child {
    Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/devices/paho_device.py"
        ))
        .args(["--port", &port.to_string(), "--password", key])
        .args(["--client-id", client_id, "--out"])
        .arg(out)
        .args(["--first", &first.to_string(), "--total", &total.to_string()])
        .args(["--instances", &instances.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
        .spawn()
        .expect("start the paho device")
}

/// The product's promise, end to end: paho-mqtt devices (persistent sessions, QoS 1,
/// reconnecting and resending what was not acknowledged, with DUP) publish numbered heartbeats
/// to smgate's own MQTT server while it is SIGKILLed at least 5 times. Every number a device
/// holds a PUBACK for is applied exactly once (counted from the transition history), every
/// number is acknowledged in the end, and `smgate verify` passes. `extra` runs the same drill
/// with other settings (the power-cut storage backend).
async fn server_crash_drill(extra: &[(&str, &str)], what: &str) {
    if !have_paho() {
        return;
    }
    let total = env_u64("TEST_MQTT_CRASH_MESSAGES", 20_000);
    let instances = env_u64("TEST_MQTT_CRASH_INSTANCES", 200);
    let devices = 4u64;
    let mut env = vec![("SMGATE_MQTT_ALLOW_ANONYMOUS", "false")];
    env.extend_from_slice(extra);
    let mut s = setup(false, &env, &[("hb", heartbeat_def(), true)]).await;
    let out = tempfile::tempdir().unwrap();
    let per = total / devices;
    let mut children: Vec<Child> = (0..devices)
        .map(|d| {
            let n = if d == devices - 1 {
                total - per * d
            } else {
                per
            };
            // 3.1.1 and 5, QoS 1 and 2.
            let v5: &[&str] = match d % 4 {
                1 => &["--v5"],
                2 => &["--qos", "2"],
                3 => &["--v5", "--qos", "2"],
                _ => &[],
            };
            paho_device(
                s.port,
                &s.admin,
                &format!("crash-dev-{d}"),
                (d * per, n, instances),
                v5,
                &out.path().join(format!("acked-{d}")),
            )
        })
        .collect();
    // Kills while the devices are busy, a second or so apart; then they finish.
    let mut kills = 0;
    let mut duplicates = 0;
    let running = |c: &mut Vec<Child>| c.iter_mut().any(|c| c.try_wait().unwrap().is_none());
    while kills < 6 {
        tokio::time::sleep(Duration::from_millis(250 + (kills as u64 * 137) % 350)).await;
        assert!(
            running(&mut children),
            "the devices finished after {kills} kills: raise TEST_MQTT_CRASH_MESSAGES"
        );
        duplicates += metric(&s.gw, "smgate_mqtt_duplicates_total").await;
        s.gw.kill();
        kills += 1;
        s.gw.spawn();
    }
    let mut acked = Vec::new();
    for (d, c) in children.iter_mut().enumerate() {
        let status = c.wait().unwrap();
        let err =
            std::fs::read_to_string(out.path().join(format!("acked-{d}.err"))).unwrap_or_default();
        assert!(
            status.success(),
            "device {d} exited with {status} (3: not every message was acknowledged): {err}"
        );
        let text = std::fs::read_to_string(out.path().join(format!("acked-{d}"))).unwrap();
        acked.extend(text.lines().map(|l| l.parse::<u64>().unwrap()));
    }
    assert_eq!(acked.len() as u64, total, "every message was acknowledged");
    let (missing, dups, applied) = once_each(&s.gw, instances, acked.iter().copied()).await;
    eprintln!(
        "{what}: {total} messages from {devices} paho devices over {instances} instances, {kills} kills; redeliveries recognised {}",
        duplicates + metric(&s.gw, "smgate_mqtt_duplicates_total").await
    );
    assert!(
        dups.is_empty() && missing.is_empty() && applied as u64 == total,
        "acknowledged but not applied: {missing:?}; applied twice: {dups:?}"
    );
    assert!(s.gw.stop().success());
    let (ok, out, err) = common::cli(&s.gw.data(), &["verify"]);
    assert!(ok, "verify failed: {out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_every_acked_heartbeat_is_applied_exactly_once_across_sigkills() {
    server_crash_drill(&[], "SIGKILL drill").await;
}

/// Runs `mosquitto_pub` or `mosquitto_sub` with `-d` (its debug lines show the packets),
/// as a device with `key`; its exit status and everything it printed.
fn mosquitto_client(
    program: &str,
    port: u16,
    key: Option<&str>,
    v5: bool,
    args: &[&str],
) -> (i32, String) {
    let mut cmd = Command::new(program);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-d"]);
    if let Some(k) = key {
        cmd.args(["-u", "device", "-P", k]);
    }
    if v5 {
        cmd.args(["-V", "mqttv5"]);
    }
    let out = cmd.args(args).output().expect(program);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn mosquitto_pub(port: u16, key: Option<&str>, v5: bool, args: &[&str]) -> (i32, String) {
    mosquitto_client("mosquitto_pub", port, key, v5, args)
}

/// `mosquitto_sub -v` for up to `secs` seconds (or `-C` messages).
fn mosquitto_sub(port: u16, key: Option<&str>, v5: bool, args: &[&str], secs: u32) -> String {
    let secs = secs.to_string();
    let mut all = vec!["-v", "-W", &secs];
    all.extend_from_slice(args);
    mosquitto_client("mosquitto_sub", port, key, v5, &all).1
}

/// [`mosquitto_sub`] on a thread, started before what it is to receive.
fn mosquitto_sub_bg(
    port: u16,
    key: &str,
    v5: bool,
    args: &[&str],
    secs: u32,
) -> std::thread::JoinHandle<String> {
    let key = key.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mosquitto_sub(port, Some(&key), v5, &args, secs)
    })
}

/// [`mosquitto_pub`] that must succeed; what it printed.
fn mosquitto_pub_ok(port: u16, key: Option<&str>, v5: bool, args: &[&str]) -> String {
    let (code, out) = mosquitto_pub(port, key, v5, args);
    assert_eq!(code, 0, "{out}");
    out
}

/// [`mosquitto_sub_bg`], given half a second to subscribe.
async fn watch(
    port: u16,
    key: &str,
    v5: bool,
    args: &[&str],
    secs: u32,
) -> std::thread::JoinHandle<String> {
    let w = mosquitto_sub_bg(port, key, v5, args, secs);
    tokio::time::sleep(Duration::from_millis(500)).await;
    w
}

/// What a background `mosquitto_sub` printed.
fn joined<T: Send + 'static>(w: std::thread::JoinHandle<T>) -> T {
    tokio::task::block_in_place(|| w.join().unwrap())
}

/// Mints a machine key with `scope` over HTTPS.
async fn mint(gw: &Gw, bearer: &str, machine: &str, scope: &str) -> (String, String) {
    let (s, b, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url(&format!("/api/chain/{machine}/api-keys")),
        Some(bearer),
        Some(json!({"name": format!("{scope} device"), "scope": scope})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    (
        b["api_key"].as_str().unwrap().to_string(),
        b["key"]["id"].as_str().unwrap().to_string(),
    )
}

/// Who may do what over MQTT: {anonymous, wrong key, revoked key, foreign account, foreign
/// machine's key, viewer, operator, admin, owner} × {connect, publish to its machine, publish
/// to another machine, subscribe to its machine's state, subscribe to another's state}, each
/// in MQTT 3.1.1 and 5. Refused connects are CONNACK 5 / 0x87; a refused publish is not
/// applied, is counted and dead-lettered (MQTT 5: PUBACK 0x87); a refused subscription is
/// SUBACK 0x80 / 0x87. A revoked key's open connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_authorizes_every_principal_per_topic() {
    if !common::have_programs(&["mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    let mut s = setup(
        false,
        &[("SMGATE_MQTT_ALLOW_ANONYMOUS", "false")],
        &[
            ("hb", heartbeat_def(), true),
            ("other", heartbeat_def(), true),
        ],
    )
    .await;
    // A second account, made offline (accounts have no HTTP API).
    assert!(s.gw.stop().success());
    let (ok, made, err) = common::cli(&s.gw.data(), &["account", "create", "--name", "stranger"]);
    assert!(ok, "{made}{err}");
    let stranger = made
        .lines()
        .find_map(|l| l.strip_prefix("key "))
        .unwrap()
        .to_string();
    s.gw.spawn();
    let owner = s.gw.owner_key.clone();
    let (viewer, _) = mint(&s.gw, &owner, "hb", "viewer").await;
    let (operator, _) = mint(&s.gw, &owner, "hb", "operator").await;
    let (admin, _) = mint(&s.gw, &owner, "hb", "admin").await;
    let (foreign, _) = mint(&s.gw, &owner, "other", "operator").await;
    let (revoked, revoked_id) = mint(&s.gw, &owner, "hb", "operator").await;
    // An instance of each machine, so that a granted subscription receives a retained state.
    for m in ["hb", "other"] {
        mosquitto_pub_ok(
            s.port,
            Some(&owner),
            false,
            &[
                "-q",
                "1",
                "-t",
                &format!("smgate/{m}/seed/heartbeat"),
                "-m",
                "{}",
            ],
        );
    }
    eventually(10, "seed instances", async || {
        instance(&s.gw, "other", "seed").await?;
        instance(&s.gw, "hb", "seed").await
    })
    .await;
    // The revoked key holds a connection open, then is revoked: the connection closes.
    let port = s.port;
    let held = {
        let k = revoked.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            mosquitto_sub(port, Some(&k), false, &["-t", "smgate/hb/+/state"], 30);
            t.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (st, b, _) = call(
        &s.gw.client(),
        Method::DELETE,
        &s.gw.url(&format!("/api/chain/hb/api-keys/{revoked_id}")),
        Some(&owner),
        None,
    )
    .await;
    assert_eq!(st, 200, "{b}");
    let held_for = joined(held);
    assert!(
        held_for < Duration::from_secs(20),
        "the revoked key's connection stayed open for {held_for:?}"
    );

    // (who, key, connects, may publish to hb, to other, may subscribe to hb's, other's states)
    #[rustfmt::skip]
    let cases: [(&str, Option<&str>, bool, [bool; 4]); 9] = [
        ("anonymous", None, false, [false; 4]),
        ("wrong", Some("zsm_notakeyatall0000000000000000000000000"), false, [false; 4]),
        ("revoked", Some(&revoked), false, [false; 4]),
        ("stranger", Some(&stranger), true, [false; 4]),
        ("foreign", Some(&foreign), true, [false, true, false, true]),
        ("viewer", Some(&viewer), true, [false, false, true, false]),
        ("operator", Some(&operator), true, [true, false, true, false]),
        ("admin", Some(&admin), true, [true, false, true, false]),
        ("owner", Some(&owner), true, [true, true, true, true]),
    ];
    let refused_before = metric(&s.gw, "smgate_mqtt_publishes_refused_total").await;
    let mut refused_publishes = 0;
    for &(who, key, connects, rights) in &cases {
        for v5 in [false, true] {
            let tag = format!("{}-v{}", who, if v5 { 5 } else { 4 });
            // Connect (and publish) to each machine.
            for (i, m) in ["hb", "other"].into_iter().enumerate() {
                let inst = format!("by-{tag}");
                let (code, out) = mosquitto_pub(
                    s.port,
                    key,
                    v5,
                    &[
                        "-q",
                        "1",
                        "-t",
                        &format!("smgate/{m}/{inst}/heartbeat"),
                        "-m",
                        "{}",
                    ],
                );
                if !connects {
                    assert_ne!(code, 0, "{tag} connected: {out}");
                    assert!(
                        out.contains("not authori") || out.contains("Not authori"),
                        "{tag}: {out}"
                    );
                    continue;
                }
                assert!(out.contains("received CONNACK (0)"), "{tag}: {out}");
                assert!(out.contains("received PUBACK"), "{tag}: {out}");
                if v5 {
                    let refused = out.contains("RC:135");
                    assert_eq!(refused, !rights[i], "{tag} → {m}: {out}");
                }
                if !rights[i] {
                    refused_publishes += 1;
                }
                let applied = eventually(10, "the publish settled", async || {
                    let made = instance(&s.gw, m, &inst).await.is_some();
                    let dead = dead_letters(&s.gw, m, &owner)
                        .await
                        .iter()
                        .any(|d| d["topic"].as_str().is_some_and(|t| t.contains(&inst)));
                    (made || dead).then_some(made)
                })
                .await;
                assert_eq!(applied, rights[i], "{tag} → {m}");
            }
            if !connects {
                continue;
            }
            for (i, m) in ["hb", "other"].into_iter().enumerate() {
                let got = mosquitto_sub(
                    s.port,
                    key,
                    v5,
                    &["-C", "1", "-t", &format!("smgate/{m}/seed/state")],
                    2,
                );
                let granted = got.contains("smgate/") && got.contains("/seed/state {");
                assert_eq!(granted, rights[2 + i], "{tag} subscribes to {m}: {got}");
                if !rights[2 + i] {
                    let code = if v5 { "135" } else { "128" };
                    assert!(got.contains(&format!("): {code}")), "{tag}: {got}");
                }
            }
            // A wildcard subscription is granted, and delivers only what the key may read.
            let got = mosquitto_sub(s.port, key, v5, &["-t", "smgate/+/seed/state"], 2);
            assert_eq!(
                got.contains("smgate/hb/seed/state {"),
                rights[2],
                "{tag}: {got}"
            );
            assert_eq!(
                got.contains("smgate/other/seed/state {"),
                rights[3],
                "{tag}: {got}"
            );
        }
    }
    assert_eq!(
        metric(&s.gw, "smgate_mqtt_publishes_refused_total").await - refused_before,
        refused_publishes
    );
}

/// The embedded server with keys required and the heartbeat machine `hb`, for a test with
/// mosquitto's clients; None when they are not installed (and `CI_REQUIRE_PEERS` unset).
async fn keyed_server() -> Option<Setup> {
    if !common::have_programs(&["mosquitto_pub", "mosquitto_sub"]) {
        return None;
    }
    let extra = [("SMGATE_MQTT_ALLOW_ANONYMOUS", "false")];
    Some(setup(false, &extra, &[("hb", heartbeat_def(), true)]).await)
}

/// Interoperability with real clients in both protocol versions: QoS 0, 1 and 2 publishes are
/// applied (QoS 2 once, through PUBREC/PUBREL/PUBCOMP), `+`/`#` subscriptions receive the
/// retained state at once and later states live, other topics are relayed (and retained), and
/// a client killed without DISCONNECT has its Will published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_interoperates_with_mosquitto_clients_and_rumqttc() {
    let Some(s) = keyed_server().await else {
        return;
    };
    let key = s.admin.clone();
    let port = s.port;
    for (v5, qos) in [
        (false, "0"),
        (false, "1"),
        (false, "2"),
        (true, "0"),
        (true, "1"),
        (true, "2"),
    ] {
        let inst = format!("q{qos}-v{}", if v5 { 5 } else { 4 });
        for n in 1..=3 {
            let out = mosquitto_pub_ok(
                port,
                Some(&key),
                v5,
                &[
                    "-q",
                    qos,
                    "-t",
                    &format!("smgate/hb/{inst}/heartbeat"),
                    "-m",
                    &format!("{{\"n\":{n}}}"),
                ],
            );
            if qos == "2" {
                assert!(
                    out.contains("received PUBREC") && out.contains("received PUBCOMP"),
                    "{out}"
                );
            }
        }
        eventually(10, "three heartbeats", async || {
            let v = instance(&s.gw, "hb", &inst).await?;
            (v["publicContext"]["heartbeats"] == 3).then_some(v)
        })
        .await;
        let beats = history(&s.gw, "hb", &inst).await;
        assert_eq!(
            beats
                .iter()
                .filter(|e| e["event"]["type"] == "HEARTBEAT")
                .count(),
            3
        );
    }
    // Retained state on subscribe, through both wildcards, in both versions.
    for v5 in [false, true] {
        for filter in ["smgate/hb/+/state", "smgate/#"] {
            let got = mosquitto_sub(port, Some(&key), v5, &["-t", filter, "--retained-only"], 2);
            assert!(got.contains("smgate/hb/q1-v4/state {"), "{filter}: {got}");
            assert!(got.contains("\"heartbeats\":3"), "{got}");
        }
    }
    // Live states: a subscriber started first sees the next state.
    let live = watch(
        port,
        &key,
        true,
        &["-t", "smgate/hb/live/state", "-C", "1"],
        10,
    )
    .await;
    mosquitto_pub_ok(
        port,
        Some(&key),
        false,
        &["-q", "1", "-t", "smgate/hb/live/heartbeat", "-m", "{}"],
    );
    let got = joined(live);
    assert!(
        got.contains("smgate/hb/live/state {") && got.contains("\"heartbeats\":1"),
        "{got}"
    );
    // Other topics are relayed, and kept when retained.
    mosquitto_pub_ok(
        port,
        Some(&key),
        true,
        &["-q", "1", "-r", "-t", "site/lobby/temp", "-m", "21.5"],
    );
    let got = mosquitto_sub(
        port,
        Some(&key),
        false,
        &["-t", "site/+/temp", "-C", "1"],
        3,
    );
    assert!(got.contains("site/lobby/temp 21.5"), "{got}");
    // A Will: a subscriber's client is killed; its Will reaches a watcher.
    let watcher = watch(port, &key, false, &["-t", "site/wills/#", "-C", "1"], 15).await;
    let mut doomed = sub_command(port, &key)
        .args([
            "-t",
            "nothing/here",
            "--will-topic",
            "site/wills/dev-9",
            "--will-payload",
            "gone",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let got = joined(watcher);
    assert!(got.contains("site/wills/dev-9 gone"), "{got}");
    // rumqttc (3.1.1) publishes at QoS 1 and 2 and receives its own machine's states.
    {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let mut o = MqttOptions::new("rumqttc-dev", "127.0.0.1", port);
        o.set_credentials("hb", key.clone());
        let (client, mut ev) = AsyncClient::new(o, 10);
        client
            .subscribe("smgate/hb/rq/state", QoS::AtLeastOnce)
            .await
            .unwrap();
        client
            .publish("smgate/hb/rq/heartbeat", QoS::AtLeastOnce, false, "{}")
            .await
            .unwrap();
        client
            .publish("smgate/hb/rq/heartbeat", QoS::ExactlyOnce, false, "{}")
            .await
            .unwrap();
        let (mut acks, mut comps, mut states) = (0, 0, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while (acks < 1 || comps < 1 || states < 1) && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
                Ok(Ok(Event::Incoming(Packet::PubComp(_)))) => comps += 1,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == "smgate/hb/rq/state" => {
                    states += 1
                }
                Ok(Ok(_)) => {}
                other => panic!("rumqttc: {other:?}"),
            }
        }
        assert_eq!((acks.min(1), comps.min(1), states.min(1)), (1, 1, 1));
        let v = eventually(10, "two heartbeats", async || {
            let v = instance(&s.gw, "hb", "rq").await?;
            (v["publicContext"]["heartbeats"] == 2).then_some(v)
        })
        .await;
        assert_eq!(v["state"], "online");
    }
}

/// `mosquitto_sub` of the embedded server, as user `d` with `key`.
fn sub_command(port: u16, key: &str) -> Command {
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-u",
        "d",
        "-P",
        key,
    ]);
    cmd
}

/// An MQTT 5 client that stays connected under `id` with a persistent session (`-c`) and, when
/// given, a Will on `will_topic` delayed by `delay` seconds.
fn v5_client(port: u16, key: &str, id: &str, will: Option<(&str, u32)>) -> Child {
    let mut cmd = sub_command(port, key);
    cmd.args(["-V", "mqttv5", "-i", id, "-c", "-t", "nothing/here"]);
    if let Some((topic, delay)) = will {
        cmd.args(["--will-topic", topic, "--will-payload", "gone"])
            .args(["-D", "will", "will-delay-interval", &delay.to_string()]);
    }
    cmd.stdout(Stdio::null()).spawn().unwrap()
}

/// Kills `client` after it has had time to connect.
async fn kill_after_connect(mut client: Child) {
    tokio::time::sleep(Duration::from_millis(1000)).await;
    client.kill().unwrap();
    client.wait().unwrap();
}

/// The MQTT 5 Will Delay Interval (5.0 §3.1.2.5): a killed client's Will waits for its delay;
/// it is never published when the client resumes its session within the delay, and at once
/// when the client comes back with a clean start (its old session ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_delays_a_will_and_drops_it_when_the_session_resumes() {
    let Some(s) = keyed_server().await else {
        return;
    };
    let (key, port) = (s.admin.clone(), s.port);
    // Not back: published after the 2 s delay, not before.
    let watcher = watch(port, &key, false, &["-t", "site/late/#", "-C", "1"], 15).await;
    kill_after_connect(v5_client(port, &key, "late", Some(("site/late/a", 2)))).await;
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!watcher.is_finished(), "the Will came before its delay");
    let got = joined(watcher);
    assert!(got.contains("site/late/a gone"), "{got}");
    assert!(
        killed.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        killed.elapsed()
    );
    // Back within the delay, resuming the session: never published.
    let watcher = watch(port, &key, false, &["-t", "site/back/#", "-C", "1"], 8).await;
    kill_after_connect(v5_client(port, &key, "back", Some(("site/back/a", 5)))).await;
    let mut again = v5_client(port, &key, "back", None);
    let got = joined(watcher);
    assert!(!got.contains("site/back/a"), "{got}");
    again.kill().unwrap();
    again.wait().unwrap();
    // Back with a clean start: the old session ends, so its Will goes at once.
    let watcher = watch(port, &key, false, &["-t", "site/fresh/#", "-C", "1"], 15).await;
    kill_after_connect(v5_client(port, &key, "fresh", Some(("site/fresh/a", 60)))).await;
    let back = Instant::now();
    mosquitto_pub_ok(
        port,
        Some(&key),
        true,
        &["-i", "fresh", "-t", "site/other", "-m", "x"],
    );
    let got = joined(watcher);
    assert!(got.contains("site/fresh/a gone"), "{got}");
    assert!(
        back.elapsed() < Duration::from_secs(10),
        "{:?}",
        back.elapsed()
    );
}

/// An MQTT 5 client (rumqttc) of the embedded server, with the packets it receives on a
/// channel; `resume`: clean start 0 with a session that lasts 300 s.
async fn v5_rumqttc(
    port: u16,
    key: &str,
    id: &str,
    resume: bool,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
) {
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials("d", key);
    if resume {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(300));
    }
    let (client, mut events) = AsyncClient::new(o, 10);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = events.poll().await {
            if let Event::Incoming(p) = e {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    (client, rx)
}

/// The next PUBLISH a [`v5_rumqttc`] client receives (other packets are skipped).
async fn next_v5_publish(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
) -> rumqttc::v5::mqttbytes::v5::Publish {
    use rumqttc::v5::mqttbytes::v5::Packet;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Packet::Publish(p))) => return p,
            Ok(Some(_)) => {}
            other => panic!("no PUBLISH: {other:?}"),
        }
    }
}

/// Waits for a [`v5_rumqttc`] client's next SUBACK.
async fn v5_suback(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Packet::SubAck(_))) => return,
            Ok(Some(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

/// MQTT 5 subscription options and properties (5.0 §3.8.3.1, §3.3.2.3) on relayed topics:
/// No Local keeps a client's own messages from it, Retain As Published keeps the retain flag
/// of live deliveries, Retain Handling sends retained messages on every subscribe, only on a
/// new one, or never; a publish's properties reach MQTT 5 subscribers unaltered, its Message
/// Expiry Interval counted down, and a message that expires while a session is away is not
/// delivered when it returns. Shared subscriptions are refused with their reason code,
/// UNSUBACK says which filters existed, and a client without an id is told the one it got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_honours_mqtt5_subscription_options_and_forwards_properties() {
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties, RetainForwardRule};
    use rumqttc::v5::mqttbytes::QoS;
    let Some(s) = keyed_server().await else {
        return;
    };
    let (key, port) = (s.admin.clone(), s.port);
    // Retain handling: 0 on every subscribe, 1 on a new one, 2 never.
    let filter = |path: &str, nolocal, rap, rule: u8| Filter {
        nolocal,
        preserve_retain: rap,
        retain_forward_rule: match rule {
            0 => RetainForwardRule::OnEverySubscribe,
            1 => RetainForwardRule::OnNewSubscribe,
            _ => RetainForwardRule::Never,
        },
        ..Filter::new(path, QoS::AtLeastOnce)
    };
    let (a, mut a_rx) = v5_rumqttc(port, &key, "v5-a", false).await;
    let (b, mut b_rx) = v5_rumqttc(port, &key, "v5-b", false).await;
    let every = 0;
    a.subscribe_many([
        filter("site/nl/#", true, false, every),
        filter("site/rap/#", false, true, every),
        filter("site/plain/#", false, false, every),
        filter("site/props/#", false, false, every),
    ])
    .await
    .unwrap();
    v5_suback(&mut a_rx).await;
    b.subscribe("site/nl/#", QoS::AtLeastOnce).await.unwrap();
    v5_suback(&mut b_rx).await;
    // No Local: b receives a's message, a does not (its later deliveries come in order).
    a.publish("site/nl/x", QoS::AtLeastOnce, false, "own")
        .await
        .unwrap();
    assert_eq!(next_v5_publish(&mut b_rx).await.topic, "site/nl/x");
    a.publish("site/rap/x", QoS::AtLeastOnce, true, "r")
        .await
        .unwrap();
    a.publish("site/plain/x", QoS::AtLeastOnce, true, "p")
        .await
        .unwrap();
    let first = next_v5_publish(&mut a_rx).await;
    assert_eq!(first.topic, "site/rap/x", "{first:?}");
    assert!(first.retain, "Retain As Published keeps the flag");
    let second = next_v5_publish(&mut a_rx).await;
    assert_eq!(second.topic, "site/plain/x");
    assert!(!second.retain, "a live delivery carries retain 0");
    // Properties, forwarded unaltered but for the expiry countdown.
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        response_topic: Some("site/reply".into()),
        correlation_data: Some("c-1".into()),
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    b.publish_with_properties("site/props/x", QoS::AtLeastOnce, false, "hi", props.clone())
        .await
        .unwrap();
    let got = next_v5_publish(&mut a_rx).await;
    let p = got.properties.expect("properties");
    assert!(matches!(p.message_expiry_interval, Some(58..=60)), "{p:?}");
    assert_eq!(
        PublishProperties {
            message_expiry_interval: Some(60),
            ..p
        },
        props
    );
    // Retain Handling: never, then only on a new subscription.
    b.publish("site/rh/t", QoS::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    b.publish("site/end", QoS::AtLeastOnce, true, "end")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_only = 1;
    for f in [
        filter("site/rh/#", false, false, 2),
        filter("site/rh/+", false, false, new_only),
        filter("site/rh/+", false, false, new_only),
        filter("site/end", false, false, every),
    ] {
        // In order, without waiting for each SUBACK (publishes may come between them).
        a.subscribe_many([f]).await.unwrap();
    }
    let got = next_v5_publish(&mut a_rx).await;
    assert_eq!((got.topic.as_ref(), got.retain), (&b"site/rh/t"[..], true));
    assert_eq!(next_v5_publish(&mut a_rx).await.topic, "site/end");
    // Shared subscriptions are refused as not offered; UNSUBACK says which filters existed.
    a.subscribe("$share/g/site/x", QoS::AtLeastOnce)
        .await
        .unwrap();
    a.unsubscribe("site/none").await.unwrap();
    a.unsubscribe("site/plain/#").await.unwrap();
    let mut acks = Vec::new();
    while acks.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), a_rx.recv()).await {
            Ok(Some(Packet::SubAck(s))) => acks.push(format!("{:?}", s.return_codes)),
            Ok(Some(Packet::UnsubAck(u))) => acks.push(format!("{:?}", u.reasons)),
            Ok(Some(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        acks,
        [
            "[SharedSubscriptionsNotSupported]",
            "[NoSubscriptionExisted]",
            "[Success]"
        ]
    );
    // A client without a client id is told the one it got.
    let (_anon, mut anon_rx) = v5_rumqttc(port, &key, "", false).await;
    match tokio::time::timeout(Duration::from_secs(10), anon_rx.recv()).await {
        Ok(Some(Packet::ConnAck(c))) => {
            let id = c.properties.and_then(|p| p.assigned_client_identifier);
            assert!(
                id.as_deref().is_some_and(|i| i.starts_with("smgate-")),
                "{id:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Message expiry while a persistent session is away.
    let (c, mut c_rx) = v5_rumqttc(port, &key, "v5-c", true).await;
    c.subscribe("site/exp/#", QoS::AtLeastOnce).await.unwrap();
    v5_suback(&mut c_rx).await;
    c.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (topic, secs) in [("site/exp/short", 1), ("site/exp/long", 100)] {
        let props = PublishProperties {
            message_expiry_interval: Some(secs),
            ..Default::default()
        };
        b.publish_with_properties(topic, QoS::AtLeastOnce, false, "e", props)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_c, mut c_rx) = v5_rumqttc(port, &key, "v5-c", true).await;
    let got = next_v5_publish(&mut c_rx).await;
    assert_eq!(
        got.topic, "site/exp/long",
        "the expired message was delivered"
    );
    let left = got.properties.and_then(|p| p.message_expiry_interval);
    assert!(matches!(left, Some(95..=98)), "{left:?}");
}

/// QoS 2 in `ingest`: until its PUBREL (the entry is forgotten), a QoS 2 delivery's entry makes
/// every later QoS 2 PUBLISH of the session on that packet id the same message, with or without
/// DUP (paho-mqtt resends without DUP after some reconnects); after the release the packet id
/// carries a new message, even an identical one.
#[test]
fn a_qos2_packet_id_is_one_message_until_its_release() {
    use smgate::instances;
    use smgate::mqtt::ingest::{self, Forget, Message, Outcome, Rules};
    let dir = tempfile::tempdir().unwrap();
    let (db, charts, now) = heartbeat_store(dir.path());
    let rules = Rules {
        prefix: "smgate".into(),
        client_id: String::new(),
        max_payload: 1024,
        dead_letter_cap: 10,
    };
    let session: std::sync::Arc<str> = "machine:hb|dev-2".into();
    let q2 = |dup: bool| {
        Message::new(
            session.clone(),
            "smgate/hb/dev-2/heartbeat".into(),
            bytes::Bytes::from_static(b"{}"),
            5,
            dup,
            1024,
        )
        .exactly_once()
    };
    let run = |mut m: Vec<Message>, tag: u64, forget: &[Forget]| -> Vec<&'static str> {
        let txn = db.begin_write().unwrap();
        let out =
            ingest::apply_then_forget(&txn, &charts, &rules, &mut m, tag, forget, now).unwrap();
        txn.commit().unwrap();
        out.iter()
            .map(|o| match o {
                Outcome::Applied { .. } => "applied",
                Outcome::Duplicate(_) => "duplicate",
                Outcome::Dead(r) => r,
            })
            .collect()
    };
    assert_eq!(run(vec![q2(false)], 11, &[]), ["applied"]);
    // Resent after a reconnect, without DUP and with it: the same message.
    assert_eq!(run(vec![q2(false)], 12, &[]), ["duplicate"]);
    assert_eq!(run(vec![q2(true)], 13, &[]), ["duplicate"]);
    // PUBREL: the entry goes (before PUBCOMP), and packet id 5 is free for a new message.
    let release = [Forget::Delivery(session.clone(), 5, 0)];
    assert_eq!(run(vec![], 14, &release), Vec::<&str>::new());
    assert_eq!(run(vec![q2(false)], 15, &[]), ["applied"]);
    // A clean session removes every entry of the session.
    assert_eq!(
        run(vec![], 16, &[Forget::Client(session.clone())]),
        Vec::<&str>::new()
    );
    assert_eq!(run(vec![q2(false)], 17, &[]), ["applied"]);
    let txn = db.begin_read().unwrap();
    let beats = instances::history(&txn, "hb", "dev-2", None, 100)
        .unwrap()
        .iter()
        .filter(|(_, r)| r.event == "HEARTBEAT")
        .count();
    assert_eq!(beats, 3);
}

/// The same drill on the power-cut storage backend (`SMGATE_TEST_POWER_CUT=1`): the gateway
/// keeps every write that no completed sync covered in its own memory, so each SIGKILL is a
/// power cut. Every acknowledged heartbeat is applied exactly once and `smgate verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_every_acked_heartbeat_is_applied_exactly_once_across_power_cuts() {
    server_crash_drill(&[("SMGATE_TEST_POWER_CUT", "1")], "power-cut drill").await;
}

/// A raw MQTT 3.1.1 connection for bad-input tests: packets encoded with rumqttc's codec.
struct Raw(std::net::TcpStream);

impl Raw {
    fn open(port: u16) -> Raw {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw(s)
    }

    fn send(&mut self, p: rumqttc::mqttbytes::v4::Packet) {
        let mut buf = bytes::BytesMut::new();
        p.write(&mut buf, 1 << 24).unwrap();
        let _ = self.0.write_all(&buf);
    }

    fn connect(port: u16, id: &str, key: &str) -> Raw {
        use rumqttc::mqttbytes::v4::{Connect, Packet};
        let mut r = Raw::open(port);
        let mut c = Connect::new(id);
        c.set_login("dev", key);
        r.send(Packet::Connect(c));
        let mut ack = [0u8; 4];
        std::io::Read::read_exact(&mut r.0, &mut ack).unwrap();
        assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK");
        r
    }

    /// Whether the server closed the connection (EOF or reset) within the read timeout,
    /// reading and dropping whatever it sends before.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut self.0, &mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// Bad input gets a clear refusal or a disconnect, and nothing else changes: malformed packets,
/// an oversize packet, a flood of connections that never send CONNECT (past
/// `mqtt.max_connections`), and a subscriber that never reads. Throughout, a device keeps
/// publishing and every one of its acknowledged heartbeats is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_bad_input_and_keeps_serving_devices() {
    use rumqttc::mqttbytes::v4::{Packet, Publish, Subscribe};
    use rumqttc::mqttbytes::QoS;
    if !common::have_programs(&["mosquitto_pub"]) {
        return;
    }
    let s = setup(
        false,
        &[
            ("SMGATE_MQTT_ALLOW_ANONYMOUS", "false"),
            ("SMGATE_MQTT_MAX_PACKET_BYTES", "8192"),
            ("SMGATE_MQTT_MAX_PAYLOAD_BYTES", "4096"),
            ("SMGATE_MQTT_MAX_CONNECTIONS", "40"),
            ("SMGATE_MQTT_CONNECT_TIMEOUT_SECS", "2"),
            ("SMGATE_MQTT_MAX_QUEUED_MESSAGES", "50"),
            ("SMGATE_MQTT_INFLIGHT", "20"),
        ],
        &[("hb", heartbeat_def(), true)],
    )
    .await;
    let (port, key) = (s.port, s.admin.clone());
    let beat = |n: u32| {
        let (code, out) = mosquitto_pub(
            port,
            Some(&key),
            false,
            &[
                "-q",
                "1",
                "-t",
                "smgate/hb/steady/heartbeat",
                "-m",
                &format!("{{\"n\":{n}}}"),
            ],
        );
        assert_eq!(code, 0, "heartbeat {n}: {out}");
    };
    let mut n = 0;
    let mut beat_next = || {
        n += 1;
        beat(n);
        n
    };
    tokio::task::block_in_place(|| {
        // Garbage instead of CONNECT; a bad remaining length after CONNECT; a PUBLISH over the
        // packet limit; a second CONNECT.
        let mut r = Raw::open(port);
        r.0.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(r.closed(), "garbage before CONNECT");
        beat_next();
        let mut r = Raw::connect(port, "bad-1", &key);
        r.0.write_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f])
            .unwrap();
        assert!(r.closed(), "malformed remaining length");
        beat_next();
        let mut r = Raw::connect(port, "bad-2", &key);
        let mut big = Publish::new(
            "smgate/hb/steady/heartbeat",
            QoS::AtLeastOnce,
            vec![b' '; 9000],
        );
        big.pkid = 1;
        r.send(Packet::Publish(big));
        assert!(r.closed(), "oversize packet");
        beat_next();
        let mut r = Raw::connect(port, "bad-3", &key);
        r.send(Packet::Connect(rumqttc::mqttbytes::v4::Connect::new(
            "again",
        )));
        assert!(r.closed(), "second CONNECT");
        beat_next();
        // A flood of silent connections: past the limit they are closed at once; the rest
        // after the CONNECT timeout; then devices connect again.
        let mut flood: Vec<Raw> = (0..60).map(|_| Raw::open(port)).collect();
        // The 20 past the limit are closed at once; once they are, all 60 were accepted.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut refused_at_once = 0;
        while refused_at_once < 20 && Instant::now() < deadline {
            flood.retain_mut(|r| {
                r.0.set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                let closed = r.closed();
                refused_at_once += usize::from(closed);
                !closed
            });
        }
        assert_eq!(
            refused_at_once, 20,
            "connections past the limit closed at once"
        );
        for r in &flood {
            r.0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let refused = mosquitto_pub(
            port,
            Some(&key),
            false,
            &["-q", "1", "-t", "smgate/hb/steady/heartbeat", "-m", "{}"],
        );
        assert_ne!(refused.0, 0, "connection limit: {}", refused.1);
        let closed = flood
            .into_iter()
            .filter_map(|mut r| r.closed().then_some(()))
            .count();
        assert_eq!(
            closed, 40,
            "every silent connection is closed after the CONNECT timeout"
        );
        beat_next();
    });
    // A subscriber that never reads: relayed traffic past its queue bound disconnects it; the
    // publisher's acks keep coming.
    let mut slow = tokio::task::block_in_place(|| {
        let mut r = Raw::connect(port, "slow-sub", &key);
        r.send(Packet::Subscribe(Subscribe::new(
            "site/#",
            QoS::AtLeastOnce,
        )));
        r
    });
    let payload = "x".repeat(4000);
    for i in 0..300 {
        mosquitto_pub_ok(
            port,
            Some(&key),
            false,
            &[
                "-q",
                "1",
                "-t",
                &format!("site/flood/{i}"),
                "-m",
                &payload,
                "-r",
            ],
        );
        if metric(&s.gw, "smgate_mqtt_subscribers_dropped_total").await > 0 {
            break;
        }
    }
    assert!(metric(&s.gw, "smgate_mqtt_subscribers_dropped_total").await >= 1);
    assert!(
        tokio::task::block_in_place(|| slow.closed()),
        "the slow subscriber is disconnected"
    );
    let last = beat_next();
    let v = eventually(10, "every heartbeat applied", async || {
        let v = instance(&s.gw, "hb", "steady").await?;
        (v["publicContext"]["heartbeats"] == last).then_some(v)
    })
    .await;
    assert_eq!(v["state"], "online");
    let name = "smgate_mqtt_connects_refused_total{reason=\"max_connections\"}";
    let refused = metric(&s.gw, name).await;
    assert!(refused >= 20, "refused connections counted: {refused}");
}

/// MQTT over TLS on `mqtt.tls_listen` with the gateway's own certificate (verified by
/// `mosquitto_pub --cafile`), and retained states that come from the store: after a SIGKILL
/// and a restart, a new subscription receives every instance's current state at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_tls_and_rebuilds_retained_states_after_a_crash() {
    if !common::have_programs(&["mosquitto_pub", "mosquitto_sub"]) {
        return;
    }
    let tls_port = free_port();
    let tls_addr = format!("127.0.0.1:{tls_port}");
    let mut s = setup(
        false,
        &[
            ("SMGATE_MQTT_ALLOW_ANONYMOUS", "false"),
            ("SMGATE_MQTT_TLS_LISTEN", &tls_addr),
        ],
        &[("hb", heartbeat_def(), true)],
    )
    .await;
    let cafile = s.gw.data().join("tls/cert.pem");
    let cafile = cafile.to_str().unwrap();
    let tls = |args: &[&str]| {
        let mut a = vec!["--cafile", cafile];
        a.extend_from_slice(args);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    for n in 1..=4 {
        let args = tls(&[
            "-q",
            "1",
            "-t",
            &format!("smgate/hb/tls-{}/heartbeat", n % 2),
            "-m",
            "{}",
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out) = mosquitto_pub(tls_port, Some(&s.admin), n % 2 == 0, &refs);
        assert_eq!(code, 0, "over TLS: {out}");
    }
    // Plain MQTT on the TLS port is not spoken.
    let (code, _) = mosquitto_pub(
        tls_port,
        Some(&s.admin),
        false,
        &["-q", "1", "-t", "x", "-m", "{}"],
    );
    assert_ne!(code, 0);
    eventually(10, "both instances stepped twice", async || {
        let a = instance(&s.gw, "hb", "tls-0").await?;
        let b = instance(&s.gw, "hb", "tls-1").await?;
        (a["publicContext"]["heartbeats"] == 2 && b["publicContext"]["heartbeats"] == 2)
            .then_some(())
    })
    .await;
    s.gw.kill();
    s.gw.spawn();
    let args = tls(&["-t", "smgate/hb/+/state", "--retained-only"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let got = mosquitto_sub(tls_port, Some(&s.admin), true, &refs, 3);
    for i in ["tls-0", "tls-1"] {
        let line = got
            .lines()
            .find(|l| l.starts_with(&format!("smgate/hb/{i}/state {{")))
            .unwrap_or_else(|| panic!("no retained state of {i}: {got}"));
        assert!(line.contains("\"heartbeats\":2"), "{line}");
    }
}

/// The MQTT server's own status: retained `online` with a birth number before the listener
/// opens; on SIGTERM an `offline` with the same number reaches a subscriber before its
/// connection closes; the next start is a new birth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_status_is_online_then_offline_on_sigterm_with_the_same_birth() {
    if !common::have_programs(&["mosquitto_sub"]) {
        return;
    }
    let mut s = setup(false, &[("SMGATE_MQTT_ALLOW_ANONYMOUS", "false")], &[]).await;
    let topic = format!("smgate/$gateway/{}/status", gateway_id(&s.gw).await);
    let status = |text: &str| -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{topic} ")))
            .map(|v| serde_json::from_str(v).unwrap())
            .collect()
    };
    let first = status(&mosquitto_sub(
        s.port,
        Some(&s.gw.owner_key),
        false,
        &["-t", &topic, "-C", "1"],
        5,
    ));
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["status"], "online");
    let watcher = mosquitto_sub_bg(s.port, &s.gw.owner_key, true, &["-t", &topic], 20);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(s.gw.stop().success());
    let seen = status(&joined(watcher));
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[0]["status"].as_str(), seen[1]["status"].as_str()),
        (Some("online"), Some("offline"))
    );
    assert_eq!(seen[1]["bdSeq"], first[0]["bdSeq"]);
    s.gw.spawn();
    let again = status(&mosquitto_sub(
        s.port,
        Some(&s.gw.owner_key),
        false,
        &["-t", &topic, "-C", "1"],
        5,
    ));
    assert!(
        again[0]["bdSeq"].as_u64() > first[0]["bdSeq"].as_u64(),
        "{again:?}"
    );
}

/// A persistent session keeps what is published for its subscriptions while its client is
/// away, and sends again, with their packet ids and DUP, the deliveries it never saw acked
/// (3.1.1 §4.4, 5.0 §4.4): with `mosquitto_sub -c` in 3.1.1 and 5, and with rumqttc; an
/// MQTT 5 session ends at its Session Expiry Interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keeps_a_persistent_session_s_deliveries_while_its_client_is_away() {
    let Some(s) = keyed_server().await else {
        return;
    };
    let (key, port) = (s.admin.clone(), s.port);
    for v5 in [false, true] {
        let (id, topic) = if v5 {
            ("watcher-5", "lab/news-5")
        } else {
            ("watcher-4", "lab/news-4")
        };
        // 5.0: clean start 0 and a session expiry interval keep the session.
        let keep: &[&str] = if v5 { &["-c", "-x", "3600"] } else { &["-c"] };
        let mut first = vec!["-i", id, "-q", "1", "-t", topic, "-C", "1"];
        first.extend_from_slice(keep);
        let sub = mosquitto_sub_bg(port, &key, v5, &first, 10);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (code, out) =
            mosquitto_pub(port, Some(&key), v5, &["-q", "1", "-t", topic, "-m", "n0"]);
        assert_eq!(code, 0, "{out}");
        let got = sub.join().unwrap();
        assert!(got.contains(&format!("{topic} n0")), "{got}");
        // The client is away: three messages for its subscription.
        for n in 1..=3 {
            let m = format!("n{n}");
            let (code, out) =
                mosquitto_pub(port, Some(&key), v5, &["-q", "1", "-t", topic, "-m", &m]);
            assert_eq!(code, 0, "{out}");
        }
        // Back, without subscribing again (`-t` names a topic nobody publishes to).
        let mut again = vec!["-i", id, "-q", "1", "-t", "lab/nothing", "-C", "3"];
        again.extend_from_slice(keep);
        let got = mosquitto_sub(port, Some(&key), v5, &again, 10);
        let lines: Vec<&str> = got.lines().filter(|l| l.starts_with(topic)).collect();
        assert_eq!(
            lines,
            [
                format!("{topic} n1"),
                format!("{topic} n2"),
                format!("{topic} n3")
            ],
            "v5 {v5}: {got}"
        );
    }

    // An MQTT 5 session that expires one second after its connection: what comes later is not
    // kept for it.
    let brief = ["-i", "brief", "-q", "1", "-c", "-x", "1", "-W", "1"];
    let _ = mosquitto_sub(
        port,
        Some(&key),
        true,
        &[&brief[..], &["-t", "lab/brief"]].concat(),
        1,
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    mosquitto_pub_ok(
        port,
        Some(&key),
        true,
        &["-q", "1", "-t", "lab/brief", "-m", "late"],
    );
    let got = mosquitto_sub(
        port,
        Some(&key),
        true,
        &[&brief[..], &["-t", "lab/nothing"]].concat(),
        1,
    );
    assert!(!got.contains("lab/brief"), "{got}");

    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let connect = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_credentials("hb", key.clone());
        o.set_clean_session(false);
        o.set_manual_acks(true);
        AsyncClient::new(o, 10)
    };
    let next_publish = async |ev: &mut rumqttc::EventLoop| loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return p,
            Ok(Ok(_)) => {}
            other => panic!("rumqttc: {other:?}"),
        }
    };
    let (client, mut ev) = connect("slow-reader");
    client
        .subscribe("lab/slow", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = ev.poll().await {
            break;
        }
    }
    mosquitto_pub_ok(
        port,
        Some(&key),
        false,
        &["-q", "1", "-t", "lab/slow", "-m", "m1"],
    );
    let first = next_publish(&mut ev).await;
    assert_eq!((first.payload.as_ref(), first.dup), (&b"m1"[..], false));
    // Gone without acking it.
    drop((client, ev));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (client, mut ev) = connect("slow-reader");
    match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => assert!(c.session_present),
        other => panic!("rumqttc: {other:?}"),
    }
    let again = next_publish(&mut ev).await;
    assert_eq!(
        (
            again.payload.as_ref(),
            again.pkid,
            again.dup,
            again.topic.as_str()
        ),
        (&b"m1"[..], first.pkid, true, "lab/slow")
    );
    client.ack(&again).await.unwrap();
    // Acked now (a SUBACK after it says the server read the PUBACK, which came first): a
    // third connection gets nothing again.
    client
        .subscribe("lab/after-ack", QoS::AtMostOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("rumqttc: {other:?}"),
        }
    }
    drop((client, ev));
    let (_client, mut ev) = connect("slow-reader");
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(300), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => panic!("delivered again: {p:?}"),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("rumqttc: {e}"),
        }
    }
}
