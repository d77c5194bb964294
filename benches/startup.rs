//! Start-up and footprint report for a gateway on a small board: binary size, idle RSS, time
//! from exec to the first HTTPS answer, and machine-create throughput over TLS with keep-alive,
//! beside the targets of issue 2. A report, not a gate: it fails only if the gateway does not
//! start or does not answer.
//!
//! `cargo bench --bench startup`. The aarch64 figure needs `scripts/cross-build.sh aarch64`
//! first; nginx and wrk comparisons run when those binaries are on PATH.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_smgate");
const MIB: f64 = 1024.0 * 1024.0;

const TARGET_BINARY_MIB: f64 = 15.0;
const TARGET_RSS_MIB: f64 = 20.0;
const TARGET_STARTUP_MS: f64 = 200.0;

const STARTUP_RUNS: usize = 10;
const LOAD_TASKS: usize = 8;
const LOAD_SECS: u64 = 5;

type Failure = Box<dyn std::error::Error>;

fn main() {
    if let Err(e) = report() {
        eprintln!("startup bench: FAILED: {e}");
        std::process::exit(1);
    }
}

fn report() -> Result<(), Failure> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    let owner_key = init(&data)?;
    let cert = std::fs::read(data.join("tls/cert.pem"))?;

    println!("smgate start-up report ({})", std::env::consts::ARCH);
    println!("{:<44} {:>14}   target", "measure", "value");
    binary_sizes();

    let rss = idle_rss(&data)?;
    row(
        "idle RSS 2 s after start",
        format!("{:.1} MiB", rss),
        Some((rss, TARGET_RSS_MIB, "MiB")),
    );

    let (median, p90) = rt.block_on(exec_to_first_https(&data, &cert))?;
    row(
        &format!("exec -> first HTTPS answer, median of {STARTUP_RUNS}"),
        format!("{median:.1} ms"),
        Some((median, TARGET_STARTUP_MS, "ms")),
    );
    row(
        &format!("exec -> first HTTPS answer, p90 of {STARTUP_RUNS}"),
        format!("{p90:.1} ms"),
        None,
    );

    let gw = Gateway::serve(
        &data,
        &[("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000000")],
    )?;
    let creates = rt.block_on(load(&gw.base, &cert, Load::Create(owner_key)))?;
    row(
        &format!("machine creates/s, TLS keep-alive, {LOAD_TASKS} clients"),
        format!("{creates:.0}/s"),
        None,
    );
    let healthz = rt.block_on(load(&gw.base, &cert, Load::Get("/healthz")))?;
    row(
        &format!("GET /healthz/s, TLS keep-alive, {LOAD_TASKS} clients"),
        format!("{healthz:.0}/s"),
        None,
    );
    let nginx = match Nginx::start(work.path(), &data) {
        Ok(Some(nginx)) => {
            let rate = rt.block_on(load(&nginx.base, &cert, Load::Get("/")))?;
            row(
                "nginx static 200/s, same client and cert",
                format!("{rate:.0}/s"),
                None,
            );
            row(
                "smgate /healthz vs nginx static 200",
                format!("{:.2}x", healthz / rate),
                None,
            );
            Some(nginx)
        }
        Ok(None) => {
            println!("(nginx not found: comparison skipped)");
            None
        }
        Err(e) => {
            println!("(nginx did not start, comparison skipped: {e})");
            None
        }
    };
    if let Some(smgate_wrk) = wrk(&format!("{}/healthz", gw.base)) {
        row(
            "wrk GET /healthz/s (2 threads, 8 conns)",
            format!("{smgate_wrk:.0}/s"),
            None,
        );
        if let Some(nginx_wrk) = nginx.as_ref().and_then(|n| wrk(&format!("{}/", n.base))) {
            row("wrk nginx static 200/s", format!("{nginx_wrk:.0}/s"), None);
            row(
                "wrk smgate vs nginx",
                format!("{:.2}x", smgate_wrk / nginx_wrk),
                None,
            );
        }
    }
    let status = gw.stop()?;
    if !status.success() {
        return Err(format!("smgate exited with {status} after SIGTERM").into());
    }
    Ok(())
}

fn row(what: &str, value: String, target: Option<(f64, f64, &str)>) {
    let target = match target {
        Some((v, t, unit)) => format!("<= {t} {unit} {}", if v <= t { "ok" } else { "MISSED" }),
        None => String::new(),
    };
    println!("{what:<44} {value:>14}   {target}");
}

fn binary_sizes() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let aarch64 = manifest.join("target/dist/smgate-aarch64-unknown-linux-gnu");
    match std::fs::metadata(&aarch64) {
        Ok(m) => {
            let mib = m.len() as f64 / MIB;
            row(
                "aarch64 static stripped binary",
                format!("{mib:.2} MiB"),
                Some((mib, TARGET_BINARY_MIB, "MiB")),
            );
        }
        Err(_) => println!(
            "(no {}: run scripts/cross-build.sh aarch64)",
            aarch64.display()
        ),
    }
    if let Ok(m) = std::fs::metadata(BIN) {
        row(
            "host release binary (dynamic, stripped)",
            format!("{:.2} MiB", m.len() as f64 / MIB),
            None,
        );
    }
}

/// `smgate init`; returns the owner key.
fn init(data: &Path) -> Result<String, Failure> {
    let out = Command::new(BIN)
        .arg("--data")
        .arg(data)
        .arg("init")
        .env("RUST_LOG", "warn")
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "smgate init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("owner key "))
        .map(|k| k.trim().to_string())
        .ok_or_else(|| format!("no owner key in init output: {stdout}").into())
}

/// A `smgate serve` child on a free port, stopped with SIGTERM.
struct Gateway {
    child: Option<Child>,
    base: String,
}

impl Gateway {
    fn spawn(data: &Path, port: u16, env: &[(&str, &str)]) -> Result<Child, Failure> {
        let mut cmd = Command::new(BIN);
        cmd.arg("--data").arg(data).arg("serve");
        cmd.env("SMGATE_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn");
        cmd.envs(env.iter().copied());
        Ok(cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?)
    }

    /// Starts and waits for the `listening on` line.
    fn serve(data: &Path, env: &[(&str, &str)]) -> Result<Gateway, Failure> {
        let mut child = Self::spawn(data, 0, env)?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("smgate: listening on https://") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let mut gw = Gateway {
            child: Some(child),
            base: String::new(),
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "smgate serve did not start listening")?;
        gw.base = format!("https://{addr}");
        Ok(gw)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stop(mut self) -> Result<std::process::ExitStatus, Failure> {
        let mut child = self.child.take().ok_or("not running")?;
        terminate(&mut child)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn terminate(child: &mut Child) -> Result<std::process::ExitStatus, Failure> {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("smgate did not stop within 20 s of SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn idle_rss(data: &Path) -> Result<f64, Failure> {
    let started = Instant::now();
    let gw = Gateway::serve(data, &[])?;
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid()))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or("no VmRSS in /proc/<pid>/status")?;
    gw.stop()?;
    Ok(kib / 1024.0)
}

fn client(cert: &[u8]) -> Result<reqwest::Client, Failure> {
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert)?)
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        // One keep-alive connection per client task, as most device clients would use.
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// Execs `serve` on a port chosen beforehand and polls /healthz (real certificate checks)
/// until it answers 200; returns (median, p90) in milliseconds.
async fn exec_to_first_https(data: &Path, cert: &[u8]) -> Result<(f64, f64), Failure> {
    let mut times = Vec::with_capacity(STARTUP_RUNS);
    for _ in 0..STARTUP_RUNS {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let client = client(cert)?;
        let url = format!("https://127.0.0.1:{port}/healthz");
        let t0 = Instant::now();
        let mut child = Gateway::spawn(data, port, &[])?;
        let answered = loop {
            match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => break Ok(t0.elapsed()),
                Ok(r) => break Err(format!("/healthz answered {}", r.status())),
                Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                    if let Some(status) = child.try_wait()? {
                        break Err(format!(
                            "smgate serve exited with {status} before answering"
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => break Err(format!("no HTTPS answer within 20 s: {e}")),
            }
        };
        drop(client);
        let status = terminate(&mut child)?;
        let elapsed = answered?;
        if !status.success() {
            return Err(format!("smgate exited with {status} after SIGTERM").into());
        }
        times.push(elapsed.as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    Ok((pick(0.5), pick(0.9)))
}

enum Load {
    /// POST /api/chain/state-machines with this bearer key and a fresh slug each time.
    Create(String),
    Get(&'static str),
}

/// `LOAD_TASKS` tasks sharing one client (so one keep-alive connection each) for `LOAD_SECS`;
/// returns successful requests per second. Any non-success answer is an error.
async fn load(base: &str, cert: &[u8], what: Load) -> Result<f64, Failure> {
    let client = client(cert)?;
    let what = Arc::new(what);
    let done = Arc::new(AtomicU64::new(0));
    let run = std::process::id();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(LOAD_SECS);
    let mut tasks = Vec::new();
    for task in 0..LOAD_TASKS {
        let (client, what, done, base) =
            (client.clone(), what.clone(), done.clone(), base.to_string());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let req = match &*what {
                    Load::Create(key) => client
                        .post(format!("{base}/api/chain/state-machines"))
                        .bearer_auth(key)
                        .json(&serde_json::json!({ "slug": format!("b{run}-{task}-{i}") })),
                    Load::Get(path) => client.get(format!("{base}{path}")),
                };
                let res = req.send().await.map_err(|e| e.to_string())?;
                let status = res.status();
                let body = res.bytes().await.map_err(|e| e.to_string())?;
                if !status.is_success() {
                    return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// nginx answering a static 200 over TLS with the gateway's own certificate.
struct Nginx {
    child: Child,
    base: String,
}

impl Nginx {
    fn start(work: &Path, data: &Path) -> Result<Option<Nginx>, Failure> {
        let Some(bin) = which("nginx") else {
            return Ok(None);
        };
        let dir = work.join("nginx");
        std::fs::create_dir_all(&dir)?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {cert};\n\
             ssl_certificate_key {key};\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
            cert = data.join("tls/cert.pem").display(),
            key = data.join("tls/key.pem").display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut nginx = Nginx {
            child,
            base: format!("https://127.0.0.1:{port}"),
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited with {status}: {}", log.trim()).into());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("nginx did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Some(nginx))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT is nginx's graceful stop; then reap.
        let _ = Command::new("kill")
            .arg("-QUIT")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `wrk -t2 -c8 -d5s URL`, requests per second; None when wrk is missing or fails.
fn wrk(url: &str) -> Option<f64> {
    let bin = which("wrk")?;
    let out = Command::new(bin)
        .args([
            "-t2",
            &format!("-c{LOAD_TASKS}"),
            &format!("-d{LOAD_SECS}s"),
            url,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
