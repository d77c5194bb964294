//! MQTT ingest report: N simulated devices (rumqttc connections, QoS 1) against a mosquitto on a
//! free loopback port, in one run:
//!
//! 1. broker-only ceiling: the devices publish as fast as the broker acks them, to a plain QoS 1
//!    subscriber; messages/s delivered and publish → delivery latency;
//! 2. smgate (external mode, release binary) with 10,000 heartbeat instances: the same load to
//!    `smgate/hb/<dev>/heartbeat`; applied heartbeats/s from `/metrics`, and how fast it
//!    drains the backlog the broker queued; then the target rate (30,000/s,
//!    `TEST_MQTT_BENCH_SUSTAIN`) offered steadily: applied/s and how far behind it ends;
//! 3. a steady 5,000 heartbeats/s: p50/p99 from publish to the retained `…/state` message (the
//!    state carries the publish time as `last_seen`), and smgate's RSS.
//!
//! It also accounts for the CPU time (user + system, from `/proc`) of mosquitto, of this process
//! (the devices and the subscriber) and of smgate (by thread) per message, and the bytes smgate
//! wrote per heartbeat. From those: how many heartbeats/s the machine's cores could carry at
//! these costs, and how much CPU per heartbeat the devices and the broker would leave smgate
//! at 0.8 of the ceiling.
//!
//! `cargo bench --bench mqtt`. Sizes: `TEST_MQTT_BENCH_DEVICES` (100),
//! `TEST_MQTT_BENCH_INSTANCES` (10,000), `TEST_MQTT_BENCH_SECS` (10), `TEST_MQTT_BENCH_RATE`
//! (5,000). Test knobs are `TEST_*`: the gateway inherits the environment, and an unknown
//! `SMGATE_*` variable is a configuration error. A report, not a gate.

mod measure;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use measure::{bytes_written, cpu_secs, env_u64, stat_cpu};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const BIN: &str = env!("CARGO_BIN_EXE_smgate");
type Failure = Box<dyn std::error::Error>;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18830)
}

/// CPU seconds of a process's live threads, summed by thread name (tokio's workers share one).
fn cpu_by_thread(pid: u32) -> Vec<(String, f64)> {
    let mut by: Vec<(String, f64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by;
    };
    for t in tasks.flatten() {
        let Some((name, secs)) = stat_cpu(&t.path().join("stat").to_string_lossy()) else {
            continue;
        };
        match by.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += secs,
            None => by.push((name, secs)),
        }
    }
    by
}

/// The machine's cores.
fn cores() -> f64 {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64
}

/// Busy CPU seconds of the whole machine (every core), from `/proc/stat`.
fn machine_busy_secs() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let ticks: Vec<f64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal …
            let idle = ticks.get(3)? + ticks.get(4)?;
            Some((ticks.iter().take(8).sum::<f64>() - idle) / 100.0)
        })
        .unwrap_or(0.0)
}

/// The processes whose CPU time the report accounts for.
#[derive(Clone, Copy)]
struct Procs {
    broker: u32,
    gateway: Option<u32>,
}

/// CPU seconds used so far by mosquitto, this process (the devices and the subscriber), the
/// gateway, and the machine as a whole.
#[derive(Clone)]
struct CpuAt {
    broker: f64,
    bench: f64,
    gateway: f64,
    machine: f64,
    /// The gateway's CPU seconds by thread name.
    threads: Vec<(String, f64)>,
    /// Bytes the gateway wrote (its database file, and its MQTT sockets).
    written: f64,
    at: Instant,
}

impl Procs {
    fn cpu(&self) -> CpuAt {
        CpuAt {
            broker: cpu_secs(self.broker),
            bench: cpu_secs(std::process::id()),
            gateway: self.gateway.map(cpu_secs).unwrap_or(0.0),
            machine: machine_busy_secs(),
            threads: self.gateway.map(cpu_by_thread).unwrap_or_default(),
            written: self.gateway.map(bytes_written).unwrap_or(0.0),
            at: Instant::now(),
        }
    }
}

/// CPU between two snapshots, per message, in µs.
struct CpuPer {
    broker: f64,
    bench: f64,
    gateway: f64,
    /// Share of the machine's cores that were busy (0..1).
    busy: f64,
    /// The gateway's threads (by name), most CPU first.
    threads: Vec<(String, f64)>,
    /// Bytes the gateway wrote per message.
    written: f64,
}

impl CpuAt {
    fn per_message(&self, to: &CpuAt, messages: u64) -> CpuPer {
        let per = |a: f64, b: f64| (b - a).max(0.0) / messages.max(1) as f64;
        let us = |a: f64, b: f64| per(a, b) * 1e6;
        let wall = to.at.duration_since(self.at).as_secs_f64().max(1e-3);
        CpuPer {
            broker: us(self.broker, to.broker),
            bench: us(self.bench, to.bench),
            gateway: us(self.gateway, to.gateway),
            busy: (to.machine - self.machine).max(0.0) / (wall * cores()),
            written: per(self.written, to.written),
            threads: {
                let mut t: Vec<(String, f64)> = to
                    .threads
                    .iter()
                    .map(|(name, secs)| {
                        let was = self
                            .threads
                            .iter()
                            .find(|(n, _)| n == name)
                            .map_or(0.0, |(_, s)| *s);
                        (name.clone(), us(was, *secs))
                    })
                    .filter(|(_, us)| *us >= 0.05)
                    .collect();
                t.sort_by(|a, b| b.1.total_cmp(&a.1));
                t
            },
        }
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if let Err(e) = report() {
        eprintln!("mqtt bench: FAILED: {e}");
        std::process::exit(1);
    }
}

fn report() -> Result<(), Failure> {
    let devices = env_u64("TEST_MQTT_BENCH_DEVICES", 100);
    let instances = env_u64("TEST_MQTT_BENCH_INSTANCES", 10_000);
    let secs = env_u64("TEST_MQTT_BENCH_SECS", 10);
    let rate = env_u64("TEST_MQTT_BENCH_RATE", 5_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let work = tempfile::tempdir()?;
    let (port, mosquitto) = mosquitto(work.path())?;
    println!("smgate MQTT report: {devices} devices, {instances} instances, {secs} s per phase, mosquitto on 127.0.0.1:{port}");
    let mut procs = Procs {
        broker: mosquitto.0.id(),
        gateway: None,
    };
    let cores = cores();

    // 1. The broker alone.
    let before = procs.cpu();
    let ceiling = rt.block_on(run_load(
        port,
        devices,
        instances,
        secs,
        None,
        "bench/ceiling",
        Sink::Plain,
    ))?;
    println!(
        "broker-only ceiling: {:>9.0} msg/s delivered to a plain subscriber; publish->delivery p50 {:.1} ms p99 {:.1} ms",
        ceiling.rate, ceiling.p50, ceiling.p99
    );
    let ceiling_cpu = before.per_message(&procs.cpu(), ceiling.sent);
    println!(
        "  CPU per message: mosquitto {:.1} µs, devices + subscriber {:.1} µs; the machine's {cores} cores {:.0}% busy",
        ceiling_cpu.broker,
        ceiling_cpu.bench,
        ceiling_cpu.busy * 100.0
    );

    let ceiling_steady = rt.block_on(run_load(
        port,
        devices,
        instances,
        secs,
        Some(rate),
        "bench/ceiling",
        Sink::Plain,
    ))?;
    println!(
        "broker-only at {rate}/s: {:>9.0} msg/s delivered; publish->delivery p50 {:.1} ms p99 {:.1} ms",
        ceiling_steady.rate, ceiling_steady.p50, ceiling_steady.p99
    );

    // 2. smgate on the same broker.
    let gw = Gateway::start(work.path(), port)?;
    procs.gateway = Some(gw.child.0.id());
    rt.block_on(gw.setup())?;
    let warm = rt.block_on(warm_up(&gw, port, instances))?;
    println!("created {instances} instances by heartbeat in {warm:.1} s");
    println!(
        "smgate RSS after creating them: {:.1} MiB",
        gw.rss_mib("VmRSS")
    );
    let sat = rt.block_on(load_gateway(
        &gw, procs, port, devices, instances, secs, None,
    ))?;
    let (load, drained) = (&sat.load, sat.drained);
    let applied_rate = sat.rate_in_window();
    let sustained = load.sent as f64 / (sat.window + drained);
    println!(
        "smgate saturated: devices published {:.0} msg/s; applied {:>9.0} heartbeats/s during the load, {:.0}/s including the drain ({:.1} s)",
        load.rate, applied_rate, sustained, drained
    );
    // What the gateway applies with no publisher competing for the two cores: the backlog the
    // broker queued during the load.
    let draining = sat.behind() as f64 / drained.max(1e-3);
    println!("smgate draining the backlog: {draining:.0} heartbeats/s");
    // Where the two cores went, per heartbeat: the load and its drain together, and the drain
    // alone (no device publishing).
    let [start, load_end, end] = &sat.cpu;
    let whole = start.per_message(end, load.sent);
    let drain = load_end.per_message(end, sat.behind());
    println!(
        "  CPU per heartbeat, load and drain: mosquitto {:.1} µs, devices {:.1} µs, smgate {:.1} µs; the cores {:.0}% busy",
        whole.broker,
        whole.bench,
        whole.gateway,
        whole.busy * 100.0
    );
    println!(
        "  CPU per heartbeat, draining: mosquitto {:.1} µs, smgate {:.1} µs; the cores {:.0}% busy",
        drain.broker,
        drain.gateway,
        drain.busy * 100.0
    );
    let threads: Vec<String> = drain
        .threads
        .iter()
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect();
    println!(
        "  smgate's threads, µs per heartbeat draining: {}; it wrote {:.0} bytes per heartbeat (database and sockets)",
        threads.join(", "),
        drain.written
    );
    // With these costs, the cores cannot carry more than `bound` heartbeats/s; and at 0.8 of
    // the ceiling, what the devices and the broker leave to smgate per heartbeat.
    let bound = cores * 1e6 / (whole.broker + whole.bench + whole.gateway).max(1e-3);
    let budget = cores * 1e6 / (0.8 * ceiling.rate).max(1.0) - whole.broker - whole.bench;
    println!(
        "  the {cores} cores allow at most {bound:.0} heartbeats/s at these costs; at 0.8 of the ceiling, devices and broker leave smgate {budget:.1} µs per heartbeat (it spends {:.1})",
        whole.gateway
    );
    println!(
        "smgate RSS after the saturated load: {:.1} MiB (peak so far {:.1} MiB)",
        gw.rss_mib("VmRSS"),
        gw.rss_mib("VmHWM")
    );
    // 2b. The target rate offered steadily: does the gateway keep up, and how far behind is
    // it when the devices stop?
    let offered = env_u64("TEST_MQTT_BENCH_SUSTAIN", 30_000);
    rt.block_on(gw.settle())?;
    let held = rt.block_on(load_gateway(
        &gw,
        procs,
        port,
        devices,
        instances,
        secs,
        Some(offered),
    ))?;
    let held_rate = held.rate_in_window();
    println!(
        "smgate at {offered}/s offered: devices published {:.0} msg/s; applied {held_rate:.0} heartbeats/s during the load; {} behind at its end, caught up {:.1} s later; RSS {:.1} MiB (peak so far {:.1} MiB)",
        held.load.rate,
        held.behind(),
        held.drained,
        gw.rss_mib("VmRSS"),
        gw.rss_mib("VmHWM")
    );
    // 3. Latency at a steady rate, to the retained state message. The phases are independent:
    // the backlog of the saturated phase has been applied (above); let the state publisher
    // flush what it queued before measuring.
    rt.block_on(gw.settle())?;
    let (applied_before, cpu_before) = (rt.block_on(gw.applied())?, procs.cpu());
    let steady = rt.block_on(run_load(
        port,
        devices,
        instances,
        secs,
        Some(rate),
        "smgate/hb",
        Sink::State,
    ))?;
    println!(
        "smgate at {rate}/s: {:.0} states/s received; publish->retained state p50 {:.1} ms p99 {:.1} ms",
        steady.rate, steady.p50, steady.p99
    );
    let steady_applied = rt.block_on(gw.applied())? - applied_before;
    let steady_cpu = cpu_before.per_message(&procs.cpu(), steady_applied);
    println!(
        "  per heartbeat at {rate}/s: smgate {:.1} µs CPU, {:.0} bytes written (database and sockets); mosquitto {:.1} µs",
        steady_cpu.gateway, steady_cpu.written, steady_cpu.broker
    );
    let rss = gw.rss_mib("VmRSS");
    println!(
        "smgate RSS with {instances} instances: {rss:.1} MiB (peak {:.1} MiB)",
        gw.rss_mib("VmHWM")
    );
    println!();
    let ratio = applied_rate.max(sustained) / ceiling.rate.max(1.0);
    println!("{:<52} {:>12}   target", "measure", "value");
    let row = |name: &str, value: String, ok: bool, target: &str| {
        println!(
            "{name:<52} {value:>12}   {target} {}",
            if ok { "ok" } else { "MISSED" }
        );
    };
    row(
        "applied / broker-only ceiling",
        format!("{ratio:.2}"),
        ratio >= 0.8,
        ">= 0.8",
    );
    row(
        "  CPU bound on applied/s, all processes' costs",
        format!("{bound:.0}"),
        true,
        "(report)",
    );
    row(
        "  smgate µs/heartbeat left at 0.8 / spent",
        format!("{budget:.1} / {:.1}", whole.gateway),
        true,
        "(report)",
    );
    row(
        "applied heartbeats/s",
        format!("{:.0}", applied_rate.max(sustained)),
        applied_rate.max(sustained) >= 30_000.0,
        ">= 30000",
    );
    row(
        "applied heartbeats/s draining a backlog",
        format!("{draining:.0}"),
        true,
        "(report)",
    );
    row(
        &format!("applied heartbeats/s at {offered}/s offered"),
        format!("{held_rate:.0}"),
        true,
        "(report)",
    );
    row(
        &format!("p50 publish->state at {rate}/s (ms)"),
        format!("{:.1}", steady.p50),
        true,
        "(report)",
    );
    row(
        &format!("p99 publish->state at {rate}/s (ms)"),
        format!("{:.1}", steady.p99),
        steady.p99 <= 50.0,
        "<= 50",
    );
    row(
        &format!("bytes written per heartbeat at {rate}/s"),
        format!("{:.0}", steady_cpu.written),
        true,
        "(report)",
    );
    row(
        &format!("RSS with {instances} instances (MiB)"),
        format!("{rss:.1}"),
        rss <= 64.0,
        "<= 64",
    );
    Ok(())
}

fn mosquitto(dir: &Path) -> Result<(u16, Killed), Failure> {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::create_dir_all(dir.join("mosq"))?;
    let mut f = std::fs::File::create(&conf)?;
    // firmware-config/mosquitto.conf's settings, on a test port, with no limit on the queue of
    // the gateway's session: the saturated phase publishes ~1M messages in 10 s, and the
    // backlog waits in the broker (the gateway reads at its commit pace). The inflight window
    // follows the gateway's (`SMGATE_MQTT_INFLIGHT`, which the gateway inherits) as the sample
    // config asks.
    let inflight = env_u64("SMGATE_MQTT_INFLIGHT", 8192);
    writeln!(
        f,
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nuser root\n\
         max_inflight_messages {inflight}\nmax_queued_messages 0\nmax_queued_bytes 0\nmax_packet_size 262144\nlog_dest stderr\nlog_type error\n",
        dir.join("mosq").display()
    )?;
    let child = Killed(
        Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("mosquitto did not listen".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((port, child))
}

#[derive(Clone, Copy, PartialEq)]
enum Sink {
    /// No subscriber (smgate is the consumer).
    None,
    /// A QoS 1 subscriber on the published topics.
    Plain,
    /// A QoS 1 subscriber on smgate's retained states.
    State,
}

struct Load {
    sent: u64,
    /// Delivered (Plain, State) or published (None) per second.
    rate: f64,
    p50: f64,
    p99: f64,
}

/// `devices` connections publish `{"ts": µs}` heartbeats to `<prefix>/dev-<i>/heartbeat`
/// (instances spread over devices) for `secs`, as fast as the broker acks (or at `rate`).
async fn run_load(
    port: u16,
    devices: u64,
    instances: u64,
    secs: u64,
    rate: Option<u64>,
    prefix: &str,
    sink: Sink,
) -> Result<Load, Failure> {
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut sub_task = None;
    if sink != Sink::None {
        let filter = match sink {
            Sink::Plain => format!("{prefix}/+/heartbeat"),
            _ => format!("{prefix}/+/state"),
        };
        let mut o = MqttOptions::new(format!("bench-sub-{}", now_us()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 100);
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        let (received, latencies, stop) = (received.clone(), latencies.clone(), stop.clone());
        let started = now_us();
        sub_task = Some(tokio::spawn(async move {
            let _client = client;
            while !stop.load(Ordering::Relaxed) {
                let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(200), el.poll()).await
                else {
                    continue;
                };
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    if p.retain {
                        continue; // retained states from before this phase
                    }
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    // A state's own `ts` is the commit time in ms; the device's publish time
                    // (µs) travels as `last_seen`.
                    let ts = match sink {
                        Sink::State => v["publicContext"]["last_seen"].as_u64(),
                        _ => v["ts"].as_u64(),
                    };
                    if let Some(ts) = ts.filter(|t| *t >= started) {
                        received.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut l) = latencies.lock() {
                            l.push(now_us().saturating_sub(ts));
                        }
                    }
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for d in 0..devices {
        let mut o = MqttOptions::new(format!("bench-dev-{d}-{}", now_us()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30)).set_inflight(100);
        let (client, mut el) = AsyncClient::new(o, 200);
        let prefix = prefix.to_string();
        let per_device = rate.map(|r| Duration::from_secs_f64(devices as f64 / r as f64));
        let mine: Vec<u64> = (0..instances).filter(|i| i % devices == d).collect();
        // Sent = acked by the broker; what was still queued in the client at the deadline is not.
        let acks = sent.clone();
        let poller = tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = ev {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        tasks.push(tokio::spawn(async move {
            let mut next = Instant::now();
            let mut k = 0usize;
            while Instant::now() < deadline {
                if let Some(gap) = per_device {
                    next += gap;
                    tokio::time::sleep_until(next.into()).await;
                }
                let i = mine[k % mine.len().max(1)];
                k += 1;
                let topic = format!("{prefix}/dev-{i}/heartbeat");
                if client
                    .publish(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        format!("{{\"ts\":{}}}", now_us()),
                    )
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // Let the acks of what is in flight arrive, then drop the connection.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            poller.abort();
            drop(client);
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = (t0.elapsed().as_secs_f64() - 1.5).max(0.1);
    if sink != Sink::None {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = sub_task {
        let _ = t.await;
    }
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .map(|us| *us as f64 / 1000.0)
            .unwrap_or(f64::NAN)
    };
    let sent = sent.load(Ordering::Relaxed);
    let rate = match sink {
        Sink::None => sent as f64 / elapsed,
        _ => received.load(Ordering::Relaxed) as f64 / elapsed,
    };
    Ok(Load {
        sent,
        rate,
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

struct Gateway {
    child: Killed,
    addr: String,
    key: String,
    http: reqwest::Client,
}

impl Gateway {
    fn start(dir: &Path, port: u16) -> Result<Gateway, Failure> {
        let data = dir.join("data");
        let out = Command::new(BIN)
            .arg("--data")
            .arg(&data)
            .arg("init")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("owner key "))
            .ok_or("init printed no owner key")?
            .trim()
            .to_string();
        let mut child = Command::new(BIN)
            .arg("--data")
            .arg(&data)
            .arg("serve")
            .env("SMGATE_HTTP_LISTEN", "127.0.0.1:0")
            .env("SMGATE_MQTT_MODE", "external")
            .env("SMGATE_MQTT_URL", format!("mqtt://127.0.0.1:{port}"))
            .env("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "100000000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut addr = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(a) = line.strip_prefix("smgate: listening on https://") {
                addr = a.to_string();
                break;
            }
        }
        let cert = std::fs::read(data.join("tls/cert.pem"))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&cert)?)
            .tls_built_in_root_certs(false)
            .use_rustls_tls()
            .build()?;
        Ok(Gateway {
            child: Killed(child),
            addr,
            key,
            http,
        })
    }

    async fn setup(&self) -> Result<(), Failure> {
        let url = |p: &str| format!("https://{}{}", self.addr, p);
        let r = self
            .http
            .post(url("/api/chain/state-machines"))
            .bearer_auth(&self.key)
            .json(&serde_json::json!({"slug": "hb"}))
            .send()
            .await?;
        let body: serde_json::Value = r.json().await?;
        let admin = body["api_key"]
            .as_str()
            .ok_or("no machine key")?
            .to_string();
        let def: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-config/machines/heartbeat.json"),
        )?)?;
        let r = self
            .http
            .post(url("/machines/hb/v"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"definition": def, "makeCurrent": true, "autoCreateInstances": true}))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("version: {}", r.text().await?).into());
        }
        Ok(())
    }

    async fn applied(&self) -> Result<u64, Failure> {
        let text = self
            .http
            .get(format!("https://{}/metrics", self.addr))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("smgate_mqtt_applied_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64)
    }

    /// Seconds until `applied` reaches `target`.
    async fn wait_applied(&self, target: u64, limit: Duration) -> Result<f64, Failure> {
        let t0 = Instant::now();
        while self.applied().await? < target {
            if t0.elapsed() > limit {
                return Err(
                    format!("applied stuck at {} of {target}", self.applied().await?).into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Waits until nothing is applied for a second (devices are quiet, the backlog is in),
    /// then as long again for the state publisher to flush.
    async fn settle(&self) -> Result<(), Failure> {
        let mut last = self.applied().await?;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.applied().await?;
            if now == last {
                break;
            }
            last = now;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }

    /// `VmRSS` or `VmHWM` (peak) of the gateway, MiB.
    fn rss_mib(&self, field: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.0.id()))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix(field)
                        .and_then(|l| l.strip_prefix(':'))
                        .map(|v| {
                            v.trim()
                                .trim_end_matches(" kB")
                                .trim()
                                .parse::<f64>()
                                .unwrap_or(0.0)
                        })
                })
            })
            .unwrap_or(0.0)
            / 1024.0
    }
}

/// One heartbeat per instance (auto-create), from one connection; seconds until all applied.
/// Heartbeats to the gateway for one phase, as it applied them.
struct Applied {
    load: Load,
    /// Applied while the devices published.
    in_window: u64,
    /// Seconds from the start of the load to its end.
    window: f64,
    /// Seconds from the end of the load until everything published was applied.
    drained: f64,
    /// CPU used at the start of the load, at its end, and when all was applied.
    cpu: [CpuAt; 3],
}

impl Applied {
    fn rate_in_window(&self) -> f64 {
        self.in_window as f64 / self.window
    }

    /// Published but not yet applied when the devices stopped (the broker's backlog).
    fn behind(&self) -> u64 {
        self.load.sent.saturating_sub(self.in_window)
    }
}

/// The devices publish heartbeats to the gateway's instances for `secs`, as fast as the
/// broker acks (or at `rate`); then waits until all of them are applied.
async fn load_gateway(
    gw: &Gateway,
    procs: Procs,
    port: u16,
    devices: u64,
    instances: u64,
    secs: u64,
    rate: Option<u64>,
) -> Result<Applied, Failure> {
    let before = gw.applied().await?;
    let t0 = Instant::now();
    let cpu_start = procs.cpu();
    let load = run_load(
        port,
        devices,
        instances,
        secs,
        rate,
        "smgate/hb",
        Sink::None,
    )
    .await?;
    let in_window = gw.applied().await? - before;
    let window = t0.elapsed().as_secs_f64();
    let cpu_load_end = procs.cpu();
    let drained = gw
        .wait_applied(before + load.sent, Duration::from_secs(300))
        .await?;
    Ok(Applied {
        load,
        in_window,
        window,
        drained,
        cpu: [cpu_start, cpu_load_end, procs.cpu()],
    })
}

async fn warm_up(gw: &Gateway, port: u16, instances: u64) -> Result<f64, Failure> {
    let t0 = Instant::now();
    let mut o = MqttOptions::new(format!("bench-warm-{}", now_us()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(200);
    let (client, mut el) = AsyncClient::new(o, 1000);
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let before = gw.applied().await?;
    for i in 0..instances {
        client
            .publish(
                format!("smgate/hb/dev-{i}/heartbeat"),
                QoS::AtLeastOnce,
                false,
                "{}",
            )
            .await?;
    }
    gw.wait_applied(before + instances, Duration::from_secs(600))
        .await?;
    let _ = client.disconnect().await;
    poller.abort();
    Ok(t0.elapsed().as_secs_f64())
}
