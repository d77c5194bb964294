//! A pg_auto_failover formation per test (Debian's `postgresql-15-auto-failover`, `pg_autoctl`):
//! a monitor, a primary and a synchronous standby, each a `pg_autoctl create … --run` on its own
//! loopback port in a temp directory, run as the unprivileged `postgres` user through `runuser`
//! when the test runs as root (as `common/pg.rs` does for a plain cluster).
//!
//! The monitor's failure detection is shortened (health checks every second, a node unhealthy
//! after 3 s, a primary demoted after 5 s) so a failover takes seconds, not the default minute.
//! Without `pg_autoctl` or the monitor's extension a test prints why it is skipped and passes,
//! unless `CI_REQUIRE_PEERS=1` (`.ci/run` installs the package): then it fails.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pg::{bin_dir, free_port, is_root};

/// One `pg_autoctl … --run` process (a monitor or a Postgres node) and its port.
pub struct Node {
    pub port: u16,
    pgdata: PathBuf,
    child: Option<Child>,
}

pub struct Formation {
    dir: tempfile::TempDir,
    bin: PathBuf,
    autoctl: PathBuf,
    pub monitor: Node,
    /// Data nodes in creation order: the first starts as the primary.
    pub nodes: Vec<Node>,
}

/// The monitor settings that make a failover take seconds.
const FAST_FAILOVER: &[(&str, u32)] = &[
    ("pgautofailover.health_check_period", 1000),
    ("pgautofailover.health_check_timeout", 1000),
    ("pgautofailover.health_check_retry_delay", 500),
    ("pgautofailover.node_considered_unhealthy_timeout", 3000),
    ("pgautofailover.primary_demote_timeout", 5000),
];

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `pg_autoctl` and the PostgreSQL binaries whose version has the `pgautofailover` extension.
fn programs() -> Option<(PathBuf, PathBuf)> {
    let bin = bin_dir()?;
    let version = bin.parent()?.file_name()?.to_str()?.to_owned();
    let control = format!("/usr/share/postgresql/{version}/extension/pgautofailover.control");
    if !Path::new(&control).is_file() {
        return None;
    }
    Some((bin, find_in_path("pg_autoctl")?))
}

/// Kills a process group (a node started with its own group: pg_autoctl, its services and
/// the postgres they run).
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

/// Kills every process whose working directory is `dir` or below it. Each postgres child is a
/// session of its own, and some (the logger, the monitor's health-check worker) outlive a
/// killed postmaster; all of them work in their data directory, so this finds exactly the
/// formation's.
fn kill_working_in(dir: &Path) {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

impl Formation {
    /// A monitor, a primary and its synchronous standby, all running; or `None` (after
    /// printing why) when pg_auto_failover is not installed and `CI_REQUIRE_PEERS` is not 1.
    pub async fn start() -> Option<Formation> {
        let Some((bin, autoctl)) = programs() else {
            assert!(
                std::env::var("CI_REQUIRE_PEERS").as_deref() != Ok("1"),
                "CI_REQUIRE_PEERS=1 but pg_auto_failover (pg_autoctl and the pgautofailover \
                 extension of the installed PostgreSQL) is not installed"
            );
            eprintln!(
                "SKIPPED: this test needs pg_auto_failover (Debian's \
                 postgresql-15-auto-failover); `.ci/run` installs it and requires this test"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown postgres of the formation directory failed");
        }
        let mut f = Formation {
            dir,
            bin,
            autoctl,
            monitor: Node {
                port: 0,
                pgdata: PathBuf::new(),
                child: None,
            },
            nodes: Vec::new(),
        };
        f.monitor = f.spawn("monitor", &["monitor"]);
        f.tune_monitor().await;
        let url = f.monitor_url();
        // One after the other: the node that registers first becomes the primary, and the
        // monitor numbers nodes in that order.
        let node = f.spawn(
            "node1",
            &["postgres", "--dbname", "smgate", "--monitor", &url],
        );
        f.nodes.push(node);
        f.wait_states(&["single"], Duration::from_secs(120)).await;
        let node = f.spawn(
            "node2",
            &["postgres", "--dbname", "smgate", "--monitor", &url],
        );
        f.nodes.push(node);
        f.wait_states(&["primary", "secondary"], Duration::from_secs(240))
            .await;
        Some(f)
    }

    /// Starts `pg_autoctl create <what> … --run` for a node named `name` in its own process
    /// group, its output in `<name>.log`.
    fn spawn(&self, name: &str, what: &[&str]) -> Node {
        let (port, pgdata) = (free_port(), self.dir.path().join(name));
        let d = self.dir.path();
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let env = [
            ("PATH", path),
            (
                "XDG_CONFIG_HOME",
                d.join("xdg/config").display().to_string(),
            ),
            ("XDG_DATA_HOME", d.join("xdg/data").display().to_string()),
            ("XDG_RUNTIME_DIR", d.join("xdg/run").display().to_string()),
        ];
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "env"]);
            c.args(env.iter().map(|(k, v)| format!("{k}={v}")));
            c.arg(&self.autoctl);
            c
        } else {
            let mut c = Command::new(&self.autoctl);
            c.envs(env.iter().map(|(k, v)| (k, v)));
            c
        };
        let log = std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .arg("create")
            .args(what)
            .arg("--pgdata")
            .arg(&pgdata)
            .args(["--pgport", &port.to_string()])
            .args(["--hostname", "127.0.0.1", "--listen", "127.0.0.1"])
            .args(["--auth", "trust", "--no-ssl", "--run"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        Node {
            port,
            pgdata,
            child: Some(child),
        }
    }

    pub fn monitor_url(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover",
            self.monitor.port
        )
    }

    /// A direct connection to data node `i`.
    pub async fn client(&self, i: usize, db: &str) -> tokio_postgres::Client {
        let url = format!("postgres://postgres@127.0.0.1:{}/{db}", self.nodes[i].port);
        connect(&url).await.unwrap()
    }

    /// The URL an application uses: every data node, the one that takes writes chosen at
    /// connect time.
    pub fn url(&self, db: &str) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!(
            "postgres://postgres@{}/{db}?target_session_attrs=read-write",
            hosts.join(",")
        )
    }

    /// Waits for the monitor to answer, then shortens its failure detection.
    async fn tune_monitor(&self) {
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/pg_auto_failover",
            self.monitor.port
        );
        let started = Instant::now();
        let client = loop {
            match connect(&url).await {
                Ok(c) if c.simple_query("SELECT 1").await.is_ok() => break c,
                _ if started.elapsed() > Duration::from_secs(120) => {
                    panic!("the monitor did not start: {}", self.log("monitor"))
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        for (name, ms) in FAST_FAILOVER {
            client
                .batch_execute(&format!("ALTER SYSTEM SET {name} = {ms}"))
                .await
                .unwrap();
        }
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `(port, reported state, goal state)` of each data node, as the monitor has them.
    pub async fn states(&self) -> Vec<(u16, String, String)> {
        let Ok(monitor) = connect(&self.monitor_url()).await else {
            return Vec::new();
        };
        let Ok(rows) = monitor
            .query(
                "SELECT nodeport, reportedstate::text, goalstate::text \
                 FROM pgautofailover.node ORDER BY nodeid",
                &[],
            )
            .await
        else {
            return Vec::new();
        };
        rows.iter()
            .map(|r| (r.get::<_, i32>(0) as u16, r.get(1), r.get(2)))
            .collect()
    }

    /// Waits until data node `i` reports and is assigned `want[i]` for every `i` (`""`: any
    /// state). While
    /// waiting it asks the current primary for a checkpoint now and then: a new standby's
    /// base backup otherwise waits for a spread checkpoint (minutes).
    pub async fn wait_states(&self, want: &[&str], timeout: Duration) {
        let started = Instant::now();
        loop {
            let states = self.states().await;
            let reached = states.len() == want.len()
                && states
                    .iter()
                    .zip(want)
                    .all(|((_, r, g), w)| w.is_empty() || (r == w && g == w));
            if reached {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the formation did not reach {want:?} in {timeout:?}: {states:?}\n{}\n{}",
                self.log("node1"),
                self.log("node2")
            );
            for (i, (_, reported, _)) in states.iter().enumerate() {
                if reported == "wait_primary" || reported == "primary" {
                    let url = format!("postgres://postgres@127.0.0.1:{}/smgate", states[i].0);
                    if let Ok(c) = connect(&url).await {
                        let _ = c.batch_execute("CHECKPOINT").await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Fails the test unless node 0 is a primary that waits for node 1 at every commit: its
    /// `synchronous_standby_names` names node 1's replication connection, which is streaming
    /// as a `sync` or `quorum` standby, `synchronous_commit` waits for it, and the monitor
    /// counts node 1 in the replication quorum.
    pub async fn assert_synchronous(&self) {
        let primary = self.client(0, "smgate").await;
        let show = |name: &'static str| {
            let primary = &primary;
            async move {
                let row = primary
                    .query_one("SELECT current_setting($1)", &[&name])
                    .await;
                row.unwrap().get::<_, String>(0)
            }
        };
        let names = show("synchronous_standby_names").await;
        let commit = show("synchronous_commit").await;
        assert!(
            ["on", "remote_apply", "remote_write"].contains(&commit.as_str()),
            "synchronous_commit = {commit}"
        );
        // The standby reports `secondary` before its replication connection is up: wait
        // for it to stream, then judge.
        let started = Instant::now();
        let standbys = loop {
            let rows = primary
                .query(
                    "SELECT application_name, sync_state, state FROM pg_stat_replication",
                    &[],
                )
                .await
                .unwrap();
            let streaming = rows.iter().any(|r| r.get::<_, String>(2) == "streaming");
            if streaming || started.elapsed() > Duration::from_secs(60) {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            standbys.len(),
            1,
            "one standby streams from the primary; the standby's log:\n{}",
            self.log("node2")
        );
        let (app, sync, state): (String, String, String) =
            (standbys[0].get(0), standbys[0].get(1), standbys[0].get(2));
        assert!(
            names.contains(&app),
            "synchronous_standby_names `{names}` does not name the standby `{app}`"
        );
        assert!(
            (sync == "sync" || sync == "quorum") && state == "streaming",
            "the standby is {state}, {sync}: not synchronous"
        );
        let monitor = connect(&self.monitor_url()).await.unwrap();
        let quorum: bool = monitor
            .query_one(
                "SELECT replicationquorum FROM pgautofailover.node WHERE nodeport = $1",
                &[&i32::from(self.nodes[1].port)],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            quorum,
            "the monitor does not count the standby in the quorum"
        );
    }

    /// SIGKILLs data node `i`: its pg_autoctl (so nothing restarts it), its postgres and every
    /// server process of its data directory.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            kill_group(&mut child);
        }
        kill_working_in(&self.nodes[i].pgdata);
    }
}

impl Drop for Formation {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if let Some(mut child) = self.monitor.child.take() {
            kill_group(&mut child);
        }
        kill_working_in(self.dir.path());
    }
}
