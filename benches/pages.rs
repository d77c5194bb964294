//! Published-page serving, side by side with nginx in the same run, and publishes/s of 2 MiB
//! pages (`cargo bench --bench pages`).
//!
//! Serving: the real `smgate` binary publishes one page; nginx (nginx-light, run as the current
//! user from a temp prefix) serves the very same bytes at the same path with the same
//! certificate and key, both on loopback. `wrk` loads each over TLS with keep-alive (HTTP/1.1,
//! no compression asked, so both send the same bytes), alternating gateway and nginx for
//! `ROUNDS` rounds; the table shows each one's best requests/s and its p99 latency, and the
//! ratio smgate/nginx (target ≥ 1.0). nginx gets `worker_processes` = CPU count, unlimited
//! keep-alive requests and no access log, so that it is not handicapped.
//!
//! Publishing: `PUBLISHES` distinct 2 MiB pages (text-like, so compression does real work)
//! posted by `CONCURRENCY` clients; each is compressed (gzip 9, brotli 9) and committed
//! durably before it is answered.
//!
//! Without wrk or nginx the serving table is skipped with a message. Environment:
//! `PAGES_BENCH_SECS` (wrk duration per run, default 8), `PAGES_BENCH_CONNECTIONS` (64).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ROUNDS: usize = 2;
const PUBLISHES: usize = 24;
const CONCURRENCY: usize = 4;
const TARGET_RATIO: f64 = 1.0;

struct Gateway {
    child: Child,
    addr: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Nginx {
    child: Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn start_gateway(data: &Path) -> (Gateway, String) {
    let bin = env!("CARGO_BIN_EXE_smgate");
    let out = Command::new(bin)
        .arg("--data")
        .arg(data)
        .arg("init")
        .output()
        .expect("smgate init");
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("owner key "))
        .expect("owner key")
        .trim()
        .to_string();
    let mut child = Command::new(bin)
        .arg("--data")
        .arg(data)
        .arg("serve")
        .env("SMGATE_HTTP_LISTEN", "127.0.0.1:0")
        .env("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "100000000")
        .env("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "100000000")
        // rustls warns on every handshake whose SNI is an IP address, as wrk's is.
        .env("RUST_LOG", "warn,rustls=error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("smgate serve");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("smgate: listening on https://") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("gateway did not listen");
    (Gateway { child, addr }, key)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start_nginx(dir: &Path, root: &Path, cert: &Path, key: &Path) -> (Nginx, String) {
    let port = free_port();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    // As root, nginx would switch its workers to `nobody`, who cannot read the temp dir.
    let user = if running_as_root() {
        "user root root;"
    } else {
        ""
    };
    let conf = format!(
        r#"{user}
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    types {{ text/html html; }}
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    sendfile on;
    tcp_nodelay on;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
        index index.html;
        add_header Cache-Control no-cache;
        add_header X-Content-Type-Options nosniff;
    }}
}}
"#,
        dir = dir.display(),
        cert = cert.display(),
        key = key.display(),
        root = root.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx");
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not listen; see {}/error.log",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Nginx { child }, addr)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: String,
}

fn parse_ms(s: &str) -> Option<f64> {
    let (num, unit) = s
        .trim()
        .split_at(s.trim().find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

fn wrk(url: &str, secs: u64, connections: u64) -> Wrk {
    let out = Command::new("wrk")
        .args([
            "-t",
            "1",
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
        ])
        .args(["-H", "Accept-Encoding: identity", url])
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let find = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps = find("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"));
    let p50_ms = find("50%").and_then(|v| parse_ms(&v)).unwrap_or(f64::NAN);
    let p99_ms = find("99%").and_then(|v| parse_ms(&v)).unwrap_or(f64::NAN);
    let errors = text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    Wrk {
        rps,
        p50_ms,
        p99_ms,
        errors,
    }
}

/// Text-like HTML of `size` bytes, different for each `seed` (a small xorshift picks words).
fn html_page(size: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "gateway",
        "machine",
        "state",
        "heartbeat",
        "sensor",
        "value",
        "online",
        "offline",
        "transition",
        "event",
        "page",
        "version",
        "publish",
        "the",
        "a",
        "of",
        "and",
        "to",
        "temperature",
        "pressure",
        "valve",
        "pump",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = String::with_capacity(size + 64);
    out.push_str(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>bench</title></head><body>\n",
    );
    while out.len() < size - 32 {
        out.push_str("<p>");
        for _ in 0..12 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
            out.push(' ');
        }
        out.push_str(&format!("#{}</p>\n", x % 100_000));
    }
    out.truncate(size - 15);
    out.push_str("</body></html>\n");
    out
}

fn client(cert: &Path) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(cert).expect("cert")).expect("pem"),
        )
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

async fn publish(c: &reqwest::Client, base: &str, key: &str, page: &str, html: String) -> Value {
    let body = json!({"title": "bench", "html": html, "agentZid": "ZEQ-bench"});
    let res = c
        .post(format!(
            "{base}/api/state-machines/bench/pages/{page}/publish"
        ))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("publish");
    assert_eq!(res.status(), 201, "publish failed");
    res.json().await.expect("json")
}

fn main() {
    let secs: u64 = std::env::var("PAGES_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let connections: u64 = std::env::var("PAGES_BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (gw, key) = start_gateway(&data);
    let base = format!("https://{}", gw.addr);
    let cert = data.join("tls/cert.pem");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let c = client(&cert);

    // One page, a typical single-file dashboard size.
    let page = html_page(8 * 1024, 1);
    rt.block_on(async {
        let res = c
            .post(format!("{base}/api/chain/state-machines"))
            .bearer_auth(&key)
            .json(&json!({"slug": "bench"}))
            .send()
            .await
            .expect("create");
        assert_eq!(res.status(), 201);
        publish(&c, &base, &key, "home", page.clone()).await;
    });
    let path = "/s/bench/p/home/";
    let served = rt.block_on(async {
        c.get(format!("{base}{path}"))
            .send()
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body")
    });
    assert_eq!(
        served.as_ref(),
        page.as_bytes(),
        "the gateway serves the published bytes"
    );

    println!("smgate pages bench: one {} byte page over TLS (HTTP/1.1 keep-alive, identity), {} connections, {secs} s per run", page.len(), connections);
    if have("wrk") && have("nginx") {
        let ngx_dir = tmp.path().join("nginx");
        let root = ngx_dir.join("root");
        std::fs::create_dir_all(root.join("s/bench/p/home")).expect("nginx root");
        std::fs::write(root.join("s/bench/p/home/index.html"), &page).expect("page file");
        let (_nginx, ngx_addr) = start_nginx(&ngx_dir, &root, &cert, &data.join("tls/key.pem"));
        let ngx_bytes = rt.block_on(async {
            c.get(format!("https://{ngx_addr}{path}"))
                .send()
                .await
                .expect("nginx get")
                .bytes()
                .await
                .expect("body")
        });
        assert_eq!(ngx_bytes, served, "nginx serves the same bytes");

        let mut best_gw: Option<Wrk> = None;
        let mut best_ngx: Option<Wrk> = None;
        // Warm both (TLS session set-up, page cache).
        wrk(&format!("{base}{path}"), 1, connections);
        wrk(&format!("https://{ngx_addr}{path}"), 1, connections);
        for round in 1..=ROUNDS {
            let g = wrk(&format!("{base}{path}"), secs, connections);
            let n = wrk(&format!("https://{ngx_addr}{path}"), secs, connections);
            println!(
                "  round {round}: smgate {:>9.0} req/s p99 {:>6.2} ms | nginx {:>9.0} req/s p99 {:>6.2} ms {}{}",
                g.rps, g.p99_ms, n.rps, n.p99_ms, g.errors, n.errors
            );
            if best_gw.as_ref().is_none_or(|b| g.rps > b.rps) {
                best_gw = Some(g);
            }
            if best_ngx.as_ref().is_none_or(|b| n.rps > b.rps) {
                best_ngx = Some(n);
            }
        }
        let (g, n) = (best_gw.expect("rounds"), best_ngx.expect("rounds"));
        let ratio = g.rps / n.rps;
        println!("| server | requests/s | p50 ms | p99 ms |");
        println!("|---|---:|---:|---:|");
        println!(
            "| smgate | {:.0} | {:.2} | {:.2} |",
            g.rps, g.p50_ms, g.p99_ms
        );
        println!(
            "| nginx  | {:.0} | {:.2} | {:.2} |",
            n.rps, n.p50_ms, n.p99_ms
        );
        println!(
            "ratio smgate/nginx: {ratio:.2} (target >= {TARGET_RATIO:.1}: {})",
            if ratio >= TARGET_RATIO {
                "met"
            } else {
                "NOT met"
            }
        );
    } else {
        println!(
            "SKIP serving comparison: wrk and nginx are needed (apt-get install wrk nginx-light)"
        );
    }

    // Publishes of distinct 2 MiB pages.
    let pages: Vec<String> = (0..PUBLISHES)
        .map(|i| html_page(2 * 1024 * 1024, 1000 + i as u64))
        .collect();
    let started = Instant::now();
    let (versions, sizes) = rt.block_on(async {
        let mut tasks = Vec::new();
        let chunks: Vec<Vec<String>> = (0..CONCURRENCY)
            .map(|w| pages.iter().skip(w).step_by(CONCURRENCY).cloned().collect())
            .collect();
        for (w, chunk) in chunks.into_iter().enumerate() {
            let (c, base, key) = (c.clone(), base.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                for html in chunk {
                    let v = publish(&c, &base, &key, &format!("big-{w}"), html).await;
                    assert!(v["version"].as_u64().is_some());
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        // Sizes of the stored encodings of the last page, as served.
        let url = format!("{base}/s/bench/p/big-0/");
        let br = c
            .get(&url)
            .header("accept-encoding", "br")
            .send()
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body")
            .len();
        let gz = c
            .get(&url)
            .header("accept-encoding", "gzip")
            .send()
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body")
            .len();
        (total, (br, gz))
    });
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "publishes of distinct 2 MiB pages: {versions} in {elapsed:.2} s = {:.1} publishes/s ({:.1} MiB/s of HTML), {CONCURRENCY} clients; stored br {} KiB, gzip {} KiB per 2048 KiB page",
        versions as f64 / elapsed,
        versions as f64 * 2.0 / elapsed,
        sizes.0 / 1024,
        sizes.1 / 1024
    );
    drop(gw);
}
