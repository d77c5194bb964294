//! The gateway as a process: restarts, SIGKILL, SIGTERM with requests in flight, SIGHUP
//! certificate reload, TLS versions and ALPN, keys at rest, and the offline CLI.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{call, cli, cli_env, client_trusting, kill_during_burst, Gw, BIN};
use reqwest::Method;
use serde_json::{json, Value};

const SPINUP: &str = "/api/chain/state-machines";
const MANY: &[(&str, &str)] = &[("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000")];

async fn create(gw: &Gw, client: &reqwest::Client, key: &str, body: Value) -> (u16, Value) {
    let (s, b, _) = call(client, Method::POST, &gw.url(SPINUP), Some(key), Some(body)).await;
    (s, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_and_keys_survive_a_restart() {
    let mut gw = Gw::start(MANY);
    let c = gw.client();
    let (s, b) = create(
        &gw,
        &c,
        &gw.owner_key,
        json!({"slug": "durable", "is_public": true}),
    )
    .await;
    assert_eq!(s, 201);
    let admin = b["api_key"].as_str().unwrap().to_string();
    let (_, m, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/durable/api-keys"),
        Some(&admin),
        Some(json!({"name": "v", "scope": "viewer"})),
    )
    .await;
    let viewer = m["api_key"].as_str().unwrap().to_string();
    let viewer_id = m["key"]["id"].as_str().unwrap().to_string();
    let (_, m, _) = call(
        &c,
        Method::POST,
        &gw.url("/api/chain/durable/api-keys"),
        Some(&admin),
        Some(json!({"name": "gone", "scope": "viewer"})),
    )
    .await;
    let revoked = m["api_key"].as_str().unwrap().to_string();
    let revoked_id = m["key"]["id"].as_str().unwrap().to_string();
    let (s, _, _) = call(
        &c,
        Method::DELETE,
        &gw.url(&format!("/api/chain/durable/api-keys/{revoked_id}")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(s, 200);

    // An idle h2 connection stays open in `c`; SIGTERM must not wait out the grace period for it.
    let t = std::time::Instant::now();
    assert!(gw.stop().success(), "clean exit on SIGTERM");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "idle keep-alive delayed shutdown: {:?}",
        t.elapsed()
    );
    gw.spawn();
    let c = gw.client();
    for key in [&gw.owner_key, &admin, &viewer] {
        let (s, b, _) = call(
            &c,
            Method::GET,
            &gw.url("/api/chain/state-machines/durable"),
            Some(key),
            None,
        )
        .await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["machine"]["slug"], "durable");
    }
    let (s, _, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/state-machines/durable"),
        Some(&revoked),
        None,
    )
    .await;
    assert_eq!(s, 401, "revocation survives restart");
    let (_, keys, _) = call(
        &c,
        Method::GET,
        &gw.url("/api/chain/durable/api-keys"),
        Some(&admin),
        None,
    )
    .await;
    let ids: Vec<&str> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&viewer_id.as_str()) && ids.contains(&revoked_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_of_creates_loses_no_answered_201() {
    let mut gw = Gw::start(MANY);
    let answered = kill_during_burst(
        &mut gw,
        SPINUP,
        8,
        40,
        |w, i| json!({"slug": format!("b-{w}-{i}")}),
        |b| Some(b["machine"]["slug"].as_str()?.to_string()),
    )
    .await;
    gw.spawn();
    let c = gw.client();
    let (_, list, _) = call(&c, Method::GET, &gw.url(SPINUP), Some(&gw.owner_key), None).await;
    let stored: std::collections::HashSet<String> = list["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["slug"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = answered.iter().filter(|s| !stored.contains(*s)).collect();
    assert!(
        lost.is_empty(),
        "{} answered 201 but lost after SIGKILL: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_a_request_in_flight_then_exits() {
    let mut gw = Gw::start(MANY);
    let c = gw.client();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let stream = futures_util_stream(rx);
    let body = json!({"slug": "in-flight"}).to_string().into_bytes();
    let (first, rest) = body.split_at(5);
    tx.send(Ok(first.to_vec())).await.unwrap();
    let req = c
        .post(gw.url(SPINUP))
        .bearer_auth(&gw.owner_key)
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let pending = tokio::spawn(req);
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are no longer accepted while the old request finishes.
    let fresh = client_trusting(&gw.cert_pem());
    assert!(
        fresh.get(gw.url("/healthz")).send().await.is_err(),
        "listener closed after SIGTERM"
    );
    tx.send(Ok(rest.to_vec())).await.unwrap();
    drop(tx);
    let res = pending.await.unwrap().expect("in-flight request answered");
    assert_eq!(res.status(), 201);
    let status = {
        let mut child = gw.child.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap()
    };
    assert!(status.success());
    gw.spawn();
    let (s, _, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url("/api/chain/state-machines/in-flight"),
        Some(&gw.owner_key),
        None,
    )
    .await;
    assert_eq!(s, 200, "the in-flight create was committed");
}

fn futures_util_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core_stream::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_core_stream::poll_fn(move |cx| rx.poll_recv(cx))
}

mod futures_core_stream {
    pub use futures_util::stream::{poll_fn, Stream};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_for_new_connections() {
    let gw = Gw::start(&[]);
    let old_pem = gw.cert_pem();
    let fresh =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let new_pem = fresh.cert.pem();
    std::fs::write(gw.data().join("tls/cert.pem"), &new_pem).unwrap();
    std::fs::write(
        gw.data().join("tls/key.pem"),
        fresh.key_pair.serialize_pem(),
    )
    .unwrap();
    // Before SIGHUP the old certificate is still served.
    assert!(client_trusting(&old_pem)
        .get(gw.url("/healthz"))
        .send()
        .await
        .is_ok());
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = client_trusting(new_pem.as_bytes())
        .get(gw.url("/healthz"))
        .send()
        .await
        .expect("new cert served");
    assert_eq!(res.status(), 200);
    assert!(
        client_trusting(&old_pem)
            .get(gw.url("/healthz"))
            .send()
            .await
            .is_err(),
        "old cert no longer served"
    );
    // A broken file on SIGHUP keeps the working certificate.
    std::fs::write(gw.data().join("tls/cert.pem"), "not a cert").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(client_trusting(new_pem.as_bytes())
        .get(gw.url("/healthz"))
        .send()
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_12_and_13_with_alpn_h2_and_http11() {
    let gw = Gw::start(&[]);
    let pem = reqwest::Certificate::from_pem(&gw.cert_pem()).unwrap();
    let builder = || {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(pem.clone())
    };
    let tls12 = builder()
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    let res = tls12.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let tls13 = builder()
        .min_tls_version(reqwest::tls::Version::TLS_1_3)
        .build()
        .unwrap();
    let res = tls13.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2, "ALPN picks h2");
    let h1 = builder().http1_only().build().unwrap();
    let res = h1.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", gw.addr))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_keys_never_reach_the_database_file() {
    let mut gw = Gw::start(MANY);
    let c = gw.client();
    let mut raw = vec![gw.owner_key.clone()];
    for i in 0..5 {
        let (_, b) = create(&gw, &c, &gw.owner_key, json!({"slug": format!("scan-{i}")})).await;
        let admin = b["api_key"].as_str().unwrap().to_string();
        let (_, m, _) = call(
            &c,
            Method::POST,
            &gw.url(&format!("/api/chain/scan-{i}/api-keys")),
            Some(&admin),
            Some(json!({"name": "op", "scope": "operator"})),
        )
        .await;
        raw.push(admin);
        raw.push(m["api_key"].as_str().unwrap().to_string());
    }
    gw.stop();
    let (ok, out, _) = cli(&gw.data(), &["account", "create"]);
    assert!(ok);
    raw.push(common::line_value(&out, "key "));
    let (ok, out, _) = cli(
        &gw.data(),
        &["key", "mint", "--machine", "scan-0", "--role", "admin"],
    );
    assert!(ok);
    raw.push(common::line_value(&out, "key "));
    let db = std::fs::read(gw.data().join("smgate.redb")).unwrap();
    for key in &raw {
        let body = key.split('_').next_back().unwrap();
        assert!(
            find(&db, key.as_bytes()).is_none(),
            "raw key found in the database"
        );
        assert!(
            find(&db, body.as_bytes()).is_none(),
            "key body found in the database"
        );
        // Its SHA-256 is what is stored.
        let hash = smgate::auth::sha256(key.as_bytes());
        assert!(find(&db, &hash).is_some(), "key hash is stored");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_cli_manages_accounts_and_keys() {
    let mut gw = Gw::start(&[]);
    // The running gateway holds the database; offline commands say so.
    let (ok, _, err) = cli(&gw.data(), &["account", "create"]);
    assert!(!ok && err.contains("gateway running"), "{err}");
    gw.stop();
    let (ok, out, _) = cli(&gw.data(), &["account", "create", "--name", "alice"]);
    assert!(ok);
    let zid = common::line_value(&out, "account ");
    let (ok, out, _) = cli(
        &gw.data(),
        &["key", "mint", "--account", &zid, "--name", "laptop"],
    );
    assert!(ok);
    let key = common::line_value(&out, "key ");
    let id = common::line_value(&out, "id ");
    assert!(key.starts_with("zeq_ak_"));
    let (ok, listing, _) = cli(&gw.data(), &["key", "list", "--account", &zid]);
    assert!(ok);
    assert!(
        listing.contains(&id) && listing.contains("laptop") && !listing.contains(&key),
        "{listing}"
    );
    let (ok, _, err) = cli(&gw.data(), &["key", "mint", "--account", "ZEQ00000000000"]);
    assert!(!ok && err.contains("no such account"), "{err}");
    let (ok, _, err) = cli(&gw.data(), &["key", "mint", "--account", "bogus"]);
    assert!(!ok && err.contains("not a ZID"), "{err}");
    let (ok, _, err) = cli(&gw.data(), &["init"]);
    assert!(!ok && err.contains("already initialised"), "{err}");
    gw.spawn();
    let c = gw.client();
    let (s, _) = create(&gw, &c, &key, json!({})).await;
    assert_eq!(s, 201, "a CLI-minted account key works");
    gw.stop();
    let (ok, _, _) = cli(&gw.data(), &["key", "revoke", &id]);
    assert!(ok);
    let (_, listing, _) = cli(&gw.data(), &["key", "list", "--account", &zid]);
    assert!(listing.contains("revoked"), "{listing}");
    gw.spawn();
    let (s, _) = create(&gw, &gw.client(), &key, json!({})).await;
    assert_eq!(s, 401);
    let v = std::process::Command::new(common::BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("smgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_writes_a_private_owner_key_and_serve_autoinits() {
    use std::os::unix::fs::PermissionsExt;
    let gw = Gw::start(&[]);
    let file = gw.data().join("initial-owner.key");
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), gw.owner_key);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(gw.data().join("identity.pk8"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(gw.data().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // `serve` on an empty directory initialises it and prints the owner key once.
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(common::BIN)
        .arg("--data")
        .arg(dir.path().join("d"))
        .arg("serve")
        .env("SMGATE_HTTP_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut seen = Vec::new();
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let done = l.starts_with("smgate: listening");
            seen.push(l);
            if done {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let key = lines
        .iter()
        .find_map(|l| l.strip_prefix("owner key "))
        .expect("owner key printed");
    assert!(key.starts_with("zeq_ak_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_and_console() {
    let gw = Gw::start(&[]);
    let c = gw.client();
    let (s, b, _) = call(&c, Method::GET, &gw.url("/healthz"), None, None).await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ok")));
    create(&gw, &c, &gw.owner_key, json!({})).await;
    let (s, info, _) = call(&c, Method::GET, &gw.url("/api/gateway"), None, None).await;
    assert_eq!(s, 200);
    assert!(info["gateway_id"].as_str().unwrap().starts_with("gw-"));
    assert_eq!(info["machines"], 1);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let res = c.get(gw.url("/metrics")).send().await.unwrap();
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let m = res.text().await.unwrap();
    for needle in [
        "smgate_http_requests_total{method=\"POST\",route=\"/api/chain/state-machines\",status=\"201\"} 1",
        "smgate_commit_batch_size_bucket{le=\"+Inf\"}",
        "smgate_commit_seconds_count",
        "smgate_process_resident_bytes",
        "smgate_machines 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    let res = c.get(gw.url("/ui/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    let html = res.text().await.unwrap();
    assert!(html.contains("smgate console") && html.contains("app.js"));
    let res = c.get(gw.url("/ui/app.js")).send().await.unwrap();
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&gw.cert_pem()).unwrap())
        .build()
        .unwrap()
        .get(gw.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/ui/");
}

/// Bytes of the process's private anonymous mappings that are readable and writable, from
/// `/proc/<pid>/maps`: memory the allocator has committed, touched or not.
fn committed_anonymous(pid: i32) -> u64 {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            // An anonymous mapping has no path after offset, device and inode.
            let anonymous = f.nth(3).is_none();
            let (a, b) = range.split_once('-')?;
            let len = u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?;
            (anonymous && perms == "rw-p").then_some(len)
        })
        .sum()
}

/// mimalloc reserves a 1 GiB arena at the first allocation. `src/alloc.rs` sets it to commit
/// on demand (freed memory then leaves RSS after a burst, and a 256 MB board is not promised
/// a gigabyte); the option must be set before that first allocation, and once was believed
/// not to be. Committed eagerly, the whole arena is one read-write mapping; on demand, it is
/// reserved without access and committed in pieces. `MIMALLOC_ARENA_EAGER_COMMIT` still wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allocator_commits_memory_on_demand_unless_the_environment_says_otherwise() {
    let mut gw = Gw::start(&[]);
    let on_demand = committed_anonymous(gw.pid());
    gw.stop();
    let mut eager = Gw::start(&[("MIMALLOC_ARENA_EAGER_COMMIT", "1")]);
    let committed = committed_anonymous(eager.pid());
    eager.stop();
    assert!(
        committed >= 1 << 30,
        "eager commit maps the arena read-write: {committed} bytes"
    );
    assert!(
        on_demand < 256 << 20,
        "at rest after start-up, {on_demand} bytes committed"
    );
}

/// `serve` with `env` added on a fresh data directory: the line that names its memory
/// profile.
fn memory_line(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("--data").arg(dir.path().join("data")).arg("serve");
    cmd.envs(env.iter().copied());
    memory_line_of(cmd)
}

/// The line of `cmd` (a `serve`) that names its memory profile; the gateway is killed once it
/// has printed it.
fn memory_line_of(mut cmd: Command) -> String {
    let mut child = cmd
        .env("SMGATE_HTTP_LISTEN", "127.0.0.1:0")
        .env("SMGATE_MQTT_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("smgate: memory profile "));
    let _ = child.kill();
    let _ = child.wait();
    line.expect("serve printed no memory profile")
}

/// A memory cgroup with a limit, made for one test and removed when dropped: under the
/// process's own v1 memory cgroup (`memory.limit_in_bytes`) or v2 cgroup (`memory.max`).
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    /// `None` where this process cannot make one (not root, no memory controller).
    fn make(limit: u64) -> Option<MemoryCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let name = format!("smgate-test-{}", std::process::id());
        for line in own.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let path = path.trim().trim_end_matches('/');
            let (dir, file) = if controllers.split(',').any(|c| c == "memory") {
                (
                    format!("/sys/fs/cgroup/memory{path}/{name}"),
                    "memory.limit_in_bytes",
                )
            } else if controllers.is_empty() {
                (format!("/sys/fs/cgroup{path}/{name}"), "memory.max")
            } else {
                continue;
            };
            if std::fs::create_dir(&dir).is_ok() {
                let cgroup = MemoryCgroup(dir.into());
                if std::fs::write(cgroup.0.join(file), limit.to_string()).is_ok() {
                    return Some(cgroup);
                }
            }
        }
        None
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// On a board, or in a container, with 256 MiB for smgate, `auto` picks the small profile
/// without any configuration: `serve` runs in a memory cgroup limited to 256 MiB (root
/// needed; `.ci/run` runs as root and requires this test).
#[test]
fn auto_picks_the_small_profile_under_a_256_mib_memory_limit() {
    let Some(cgroup) = MemoryCgroup::make(256 << 20) else {
        assert!(
            std::env::var("CI_REQUIRE_PEERS").as_deref() != Ok("1"),
            "CI_REQUIRE_PEERS=1 but no memory cgroup could be made here"
        );
        eprintln!("SKIPPED: making a memory cgroup needs root and a memory controller");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("sh");
    // Joins the cgroup, then becomes smgate.
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(&cgroup.0)
        .arg(BIN)
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("serve");
    assert_eq!(
        memory_line_of(cmd),
        "smgate: memory profile small (auto: 256 MiB of RAM): store.cache_mb 3, \
         store.write_window_mb 1, mqtt.batch_size 512"
    );
}

/// The memory profile sizes the ingest pipeline: `serve` says which one it runs and why, a
/// profile asked for is the one used, an explicit size wins over it, and a bad name stops
/// `serve` with an error that names the option.
#[test]
fn serve_names_its_memory_profile_and_refuses_an_unknown_one() {
    let auto = memory_line(&[]);
    assert!(
        auto.contains("(auto: ") && auto.contains(" MiB of RAM)"),
        "{auto}"
    );
    let small = memory_line(&[("SMGATE_MEMORY_PROFILE", "small")]);
    assert_eq!(
        small,
        "smgate: memory profile small: store.cache_mb 3, store.write_window_mb 1, mqtt.batch_size 512"
    );
    let mixed = memory_line(&[
        ("SMGATE_MEMORY_PROFILE", "large"),
        ("SMGATE_STORE_CACHE_MB", "6"),
    ]);
    assert!(
        mixed.ends_with("large: store.cache_mb 6, store.write_window_mb 16, mqtt.batch_size 4096"),
        "{mixed}"
    );
    let dir = tempfile::tempdir().unwrap();
    let profile = [("SMGATE_MEMORY_PROFILE", "tiny")];
    let (ok, _, err) = cli_env(&dir.path().join("data"), &["serve"], &profile);
    assert!(!ok);
    assert!(err.contains("memory.profile"), "{err}");
}
