//! Typed configuration: TOML file, then `SMGATE_<SECTION>_<KEY>` environment overrides.
//!
//! Every option has a default that boots on a laptop; `firmware-config/smgate.toml` documents
//! each one. Unknown keys are an error, so a typo never silently falls back to a default.
//! `SMGATE_TEST_POWER_CUT=1` is not an option but a test hook (`store::PowerCut`), so no file
//! can set it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::store::{PowerCut, StoreOptions};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data: DataConfig,
    pub http: HttpConfig,
    pub gateway: GatewayConfig,
    pub store: StoreConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub upstream: crate::sync::client::UpstreamConfig,
    pub agents: crate::agents::AgentsConfig,
    pub mqtt: crate::mqtt::MqttConfig,
    pub hub: HubConfig,
    pub memory: MemoryConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory holding the redb file, the gateway identity and the generated TLS files.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the HTTPS listener. Port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// PEM certificate chain; empty means `<data>/tls/cert.pem`, generated at init.
    pub cert: Option<PathBuf>,
    /// PEM private key; empty means `<data>/tls/key.pem`, generated at init.
    pub key: Option<PathBuf>,
    /// Seconds that in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Seconds a client has to finish the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds a client has to send a request's whole header once the connection waits for
    /// one; a connection that does not is closed.
    pub header_read_timeout_secs: u64,
    /// Largest JSON body accepted by the API routes (pages have their own limit).
    pub max_json_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Region reported in machine DTOs.
    pub region: String,
    /// Default `parent_origin`; when unset, the `ZEQ_ORIGIN` environment variable or `zeq-dev`.
    pub origin: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// redb page cache in MiB (boards have 256 MB of RAM).
    pub cache_mb: usize,
    /// MiB of a transaction's page writes held in memory, so that a page written again is
    /// written to the file once (`store::writeback`).
    pub write_window_mb: usize,
    /// Save redb's allocator state with each commit, so that boot after a power cut needs no
    /// full repair scan. Off by default: it rewrites the state of every region of the file
    /// with every commit, so the bytes written to flash per heartbeat grow with the file
    /// (figures: docs/performance.md, and firmware-config/smgate.toml).
    pub quick_repair: bool,
    /// Most write requests folded into one transaction (one fsync).
    pub max_batch: usize,
    /// Test hook, set only by `SMGATE_TEST_POWER_CUT=1` (not in the file): the store keeps
    /// every write in memory until its sync, so that SIGKILL is a power cut
    /// (`store::PowerCut`).
    #[serde(skip)]
    pub test_power_cut: bool,
}

/// `[memory]`: how the write pipeline is sized for the board. A profile only supplies the
/// values of `store.cache_mb`, `store.write_window_mb` and `mqtt.batch_size` that the file and
/// the environment leave unset; [`Config::load`] resolves `auto` and records what it chose.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    pub profile: MemoryProfile,
    /// Set by [`Config::load`]: whether `auto` chose the profile.
    #[serde(skip)]
    pub automatic: bool,
    /// Set by [`Config::load`]: the RAM this process may use, as [`board_memory`] found it.
    #[serde(skip)]
    pub board_bytes: Option<u64>,
}

/// The two sizes of the ingest pipeline (figures: docs/performance.md, "Memory profiles").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryProfile {
    /// `small` when the process may use less than [`SMALL_BELOW`] of RAM (or that cannot be
    /// read), `large` otherwise.
    #[default]
    Auto,
    /// Peak RSS about 60 MiB with 10,000 instances and 1,000 devices publishing as fast as the
    /// writer commits, at 0.4–0.5 of `large`'s heartbeats/s and more than twice its bytes
    /// written per heartbeat while saturated.
    Small,
    /// Throughput first: a peak of about 160 MiB at saturation.
    Large,
}

/// `auto` picks `small` below this much RAM (boards with 256 or 512 MB).
pub const SMALL_BELOW: u64 = 1 << 30;

impl MemoryProfile {
    /// `auto` made concrete for a process that may use `board` bytes of RAM.
    pub fn resolve(self, board: Option<u64>) -> MemoryProfile {
        match (self, board) {
            (MemoryProfile::Auto, Some(b)) if b >= SMALL_BELOW => MemoryProfile::Large,
            (MemoryProfile::Auto, _) => MemoryProfile::Small,
            (p, _) => p,
        }
    }

    /// `(section, key, value)` of each option the profile sizes.
    /// `large`'s are the options' defaults.
    fn sizes(self) -> [(&'static str, &'static str, usize); 3] {
        let (cache, window, batch) = match self {
            MemoryProfile::Small => (3, 1, 512),
            _ => {
                let store = StoreConfig::default();
                let mqtt = crate::mqtt::MqttConfig::default();
                (store.cache_mb, store.write_window_mb, mqtt.batch_size)
            }
        };
        [
            ("store", "cache_mb", cache),
            ("store", "write_window_mb", window),
            ("mqtt", "batch_size", batch),
        ]
    }

    pub fn name(self) -> &'static str {
        match self {
            MemoryProfile::Auto => "auto",
            MemoryProfile::Small => "small",
            MemoryProfile::Large => "large",
        }
    }
}

/// The RAM this process may use: `MemTotal`, or its cgroup's limit when that is lower (a
/// container, or systemd's `MemoryMax=`): `memory.max` under cgroup v2, `memory.limit_in_bytes`
/// under v1. `None` when none of them can be read.
pub fn board_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let total = read("/proc/meminfo").and_then(|m| meminfo_total(&m));
    let limits = read("/proc/self/cgroup")
        .map(|c| cgroup_limit_files(&c))
        .unwrap_or_default();
    let limit = limits
        .iter()
        .filter_map(|f| read(f)?.trim().parse::<u64>().ok())
        .min();
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// The files that hold the memory limit of the cgroups that `/proc/self/cgroup` names: the
/// v2 hierarchy's (`0::<path>`) and the v1 memory controller's (`<n>:…memory…:<path>`). A
/// limit of "max" (v2, none) does not parse, and v1's "none" is a number larger than any RAM.
fn cgroup_limit_files(proc_self_cgroup: &str) -> Vec<String> {
    proc_self_cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?.trim());
            let path = path.trim_end_matches('/');
            if controllers.is_empty() {
                Some(format!("/sys/fs/cgroup{path}/memory.max"))
            } else if controllers.split(',').any(|c| c == "memory") {
                Some(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
            } else {
                None
            }
        })
        .collect()
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn meminfo_total(meminfo: &str) -> Option<u64> {
    let kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb << 10)
}

/// Resolves `[memory] profile` in `doc` for `board` bytes of RAM and fills in the options it
/// sizes that `doc` leaves unset.
fn apply_memory_profile(
    doc: &mut toml::Table,
    board: Option<u64>,
) -> Result<(MemoryProfile, bool), ConfigError> {
    let asked: MemoryProfile = match doc.get("memory").and_then(|m| m.get("profile")) {
        None => MemoryProfile::Auto,
        Some(v) => v.clone().try_into().map_err(|e: toml::de::Error| {
            ConfigError::Invalid(format!(
                "memory.profile must be \"auto\", \"small\" or \"large\": {e}"
            ))
        })?,
    };
    let chosen = asked.resolve(board);
    for (section, key, value) in chosen.sizes() {
        // A section that is not a table fails its deserialization below.
        if let toml::Value::Table(t) = doc
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            t.entry(key).or_insert(toml::Value::Integer(value as i64));
        }
    }
    Ok((chosen, asked == MemoryProfile::Auto))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Machine spin-ups per minute per client IP (spec 000: 10).
    pub spinup_per_minute_per_ip: u32,
    /// Writes per minute per machine.
    pub writes_per_minute_per_machine: u32,
    /// Reads per minute per machine for callers that are not the owner.
    pub reads_per_minute_per_machine: u32,
}

/// `[hub]`: where `smgate hub` keeps logs. Read by the hub only; a gateway ignores it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// PostgreSQL connection URL (`postgres://user:password@host:port/db`, libpq key=value
    /// also accepted). Empty: the embedded redb file in the hub's data directory.
    pub database_url: String,
    /// PEM file of the CA certificates that sign the database's certificate. When set, the
    /// hub connects with TLS (rustls) and verifies the server against them; when empty, it
    /// connects without TLS (a loopback or private-network database).
    pub database_ca: Option<PathBuf>,
    /// Most milliseconds one ingest or read waits for the database before the hub answers
    /// 503 with Retry-After (the gateway retries); also each statement's server-side limit.
    pub timeout_ms: u64,
    /// Database connections per hub process.
    pub pool_size: usize,
    /// The hub's cosigner name (C2SP tlog-cosignature key name), e.g. `hub.example.com`. Its
    /// Ed25519 key is `cosigner.pk8` in the hub's data directory, made at first start.
    pub name: String,
    /// Lowercase hex SHA-256 of the operator key that reads the hub's operator API
    /// (`/v1/gateways…`, `/v1/stats`, `/metrics`) as `Authorization: Bearer <key>`; the key
    /// itself is never stored (`smgate hub operator-key` makes one). Empty: those routes answer
    /// 401. The auditors' tlog-tiles paths (`/logs/…`) are public either way.
    pub operator_key_sha256: String,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            database_url: String::new(),
            database_ca: None,
            timeout_ms: 5_000,
            pool_size: 16,
            name: "smgate-hub".into(),
            operator_key_sha256: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. `info` or `smgate=debug,warn`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: PathBuf::from("./data"),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            cert: None,
            key: None,
            shutdown_grace_secs: 10,
            handshake_timeout_secs: 10,
            header_read_timeout_secs: 10,
            max_json_bytes: 64 * 1024,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            region: "local".into(),
            origin: None,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_mb: 12,
            write_window_mb: 16,
            quick_repair: false,
            max_batch: 1024,
            test_power_cut: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            spinup_per_minute_per_ip: 10,
            writes_per_minute_per_machine: 600,
            reads_per_minute_per_machine: 120,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl Config {
    /// Loads `path` (or the defaults when `None`) and applies `SMGATE_*` overrides from `env`;
    /// the memory profile is sized for this machine ([`board_memory`]).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Config::load_for(path, env, board_memory())
    }

    /// [`Config::load`] for a process that may use `board` bytes of RAM.
    pub fn load_for(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        board: Option<u64>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let mut doc: toml::Table =
            toml::from_str(&text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut test_power_cut = false;
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("SMGATE_") else {
                continue;
            };
            // A test hook, not an option: no `[test]` section takes it, and no file sets it.
            if rest == "TEST_POWER_CUT" {
                test_power_cut = match value.as_str() {
                    "1" => true,
                    "0" | "" => false,
                    _ => {
                        return Err(ConfigError::Invalid(format!(
                            "SMGATE_TEST_POWER_CUT is a test hook and must be 1 or 0, not {value:?}"
                        )))
                    }
                };
                continue;
            }
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            let section = section.to_ascii_lowercase();
            let key = key.to_ascii_lowercase();
            // A bare TOML literal (number, bool, array) keeps its type; anything else is a string.
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            let table = doc
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match table {
                toml::Value::Table(t) => {
                    t.insert(key, parsed);
                }
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "`{section}` is not a section"
                    )))
                }
            }
        }
        let (profile, automatic) = apply_memory_profile(&mut doc, board)?;
        let mut config: Config = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.store.test_power_cut = test_power_cut;
        config.memory = MemoryConfig {
            profile,
            automatic,
            board_bytes: board,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.store.write_window_mb) {
            return Err(ConfigError::Invalid(
                "store.write_window_mb must be between 1 and 1024".into(),
            ));
        }
        if self.store.max_batch == 0 {
            return Err(ConfigError::Invalid(
                "store.max_batch must be at least 1".into(),
            ));
        }
        if self.http.header_read_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "http.header_read_timeout_secs must be at least 1".into(),
            ));
        }
        if self.limits.spinup_per_minute_per_ip == 0 {
            return Err(ConfigError::Invalid(
                "limits.spinup_per_minute_per_ip must be at least 1".into(),
            ));
        }
        if self.gateway.region.is_empty() {
            return Err(ConfigError::Invalid(
                "gateway.region must not be empty".into(),
            ));
        }
        self.upstream.validate().map_err(ConfigError::Invalid)?;
        if self.hub.timeout_ms == 0 || self.hub.pool_size == 0 {
            return Err(ConfigError::Invalid(
                "hub.timeout_ms and hub.pool_size must be at least 1".into(),
            ));
        }
        let key = &self.hub.operator_key_sha256;
        if !key.is_empty() && (key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(ConfigError::Invalid(
                "hub.operator_key_sha256 must be 64 hex digits (the SHA-256 that `smgate hub \
                 operator-key` prints), or empty"
                    .into(),
            ));
        }
        self.agents.validate().map_err(ConfigError::Invalid)?;
        self.mqtt.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// The default `parent_origin` of new machines.
    pub fn parent_origin(&self) -> String {
        self.gateway
            .origin
            .clone()
            .or_else(|| std::env::var("ZEQ_ORIGIN").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "zeq-dev".into())
    }

    pub fn db_path(&self) -> PathBuf {
        self.paths().db()
    }

    /// The data directory and TLS files.
    pub fn paths(&self) -> crate::gateway::Paths {
        crate::gateway::Paths {
            dir: self.data.dir.clone(),
            cert: self.cert_path(),
            key: self.key_path(),
        }
    }

    /// How to open the gateway's store: `[store]`, with every domain module's tables.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            tables: crate::gateway::TABLES,
            cache_bytes: self.store.cache_mb << 20,
            write_window_bytes: self.store.write_window_mb << 20,
            quick_repair: self.store.quick_repair,
            max_batch: self.store.max_batch,
            disk_limit: None,
            power_cut: self.store.test_power_cut.then(PowerCut::default),
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.http
            .cert
            .clone()
            .unwrap_or_else(|| self.data.dir.join("tls/cert.pem"))
    }

    pub fn key_path(&self) -> PathBuf {
        self.http
            .key
            .clone()
            .unwrap_or_else(|| self.data.dir.join("tls/key.pem"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_boot_on_a_laptop() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.data.dir, PathBuf::from("./data"));
        assert_eq!(c.limits.spinup_per_minute_per_ip, 10);
    }

    #[test]
    fn env_overrides_keep_types_and_unknown_keys_fail() {
        let env = vec![
            ("SMGATE_HTTP_LISTEN".to_string(), "127.0.0.1:0".to_string()),
            (
                "SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP".to_string(),
                "99".to_string(),
            ),
            ("SMGATE_GATEWAY_REGION".to_string(), "eu-west".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.http.listen.port(), 0);
        assert_eq!(c.limits.spinup_per_minute_per_ip, 99);
        assert_eq!(c.gateway.region, "eu-west");
        let bad = vec![("SMGATE_HTTP_LISTN".to_string(), "x".to_string())];
        let err = Config::load(None, bad).unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
    }

    /// `SMGATE_TEST_POWER_CUT` is the one `SMGATE_TEST_*` name: a test hook, off unless it is
    /// exactly 1, and not an option that a file or a typo can set.
    #[test]
    fn the_power_cut_hook_is_set_only_by_its_variable() {
        let load =
            |name: &str, v: &str| Config::load(None, vec![(name.to_string(), v.to_string())]);
        assert!(!Config::default().store.test_power_cut);
        let on = load("SMGATE_TEST_POWER_CUT", "1").unwrap();
        assert!(on.store.test_power_cut);
        assert!(on.store_options().power_cut.is_some());
        let off = load("SMGATE_TEST_POWER_CUT", "0").unwrap();
        assert!(off.store_options().power_cut.is_none());
        assert!(load("SMGATE_TEST_POWER_CUT", "yes").is_err());
        assert!(load("SMGATE_TEST_POWER_CUTT", "1").is_err());
        assert!(load("SMGATE_STORE_TEST_POWER_CUT", "true").is_err());
        let err = toml::from_str::<Config>("[store]\ntest_power_cut = true").unwrap_err();
        assert!(err.to_string().contains("test_power_cut"), "{err}");
    }

    #[test]
    fn the_write_window_is_set_in_mib_and_bounded() {
        let load = |v: &str| {
            Config::load(
                None,
                vec![("SMGATE_STORE_WRITE_WINDOW_MB".to_string(), v.to_string())],
            )
        };
        assert_eq!(Config::default().store.write_window_mb, 16);
        let c = load("32").unwrap();
        assert_eq!(c.store_options().write_window_bytes, 32 << 20);
        for bad in ["0", "1025"] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains("store.write_window_mb"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_header_read_timeout_is_ten_seconds_and_never_zero() {
        assert_eq!(Config::default().http.header_read_timeout_secs, 10);
        let zero = vec![(
            "SMGATE_HTTP_HEADER_READ_TIMEOUT_SECS".to_string(),
            "0".to_string(),
        )];
        let err = Config::load(None, zero).unwrap_err().to_string();
        assert!(err.contains("http.header_read_timeout_secs"), "{err}");
    }

    /// `auto` sizes the pipeline for the board's RAM; a profile fills in only the options the
    /// file and the environment leave unset, and a bad name is a clear error.
    #[test]
    fn the_memory_profile_sizes_what_is_left_unset() {
        const MIB: u64 = 1 << 20;
        let load = |env: &[(&str, &str)], board: Option<u64>| {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            Config::load_for(None, env.collect::<Vec<_>>(), board)
        };
        let sizes = |c: &Config| (c.store.cache_mb, c.store.write_window_mb, c.mqtt.batch_size);

        let board = load(&[], Some(256 * MIB)).unwrap();
        assert_eq!(board.memory.profile, MemoryProfile::Small);
        assert!(board.memory.automatic);
        assert_eq!(sizes(&board), (3, 1, 512));
        let server = load(&[], Some(8 << 30)).unwrap();
        assert_eq!(server.memory.profile, MemoryProfile::Large);
        assert_eq!(sizes(&server), (12, 16, 4096));
        assert_eq!(sizes(&server), sizes(&Config::default()));
        // Unknown RAM: the safe side.
        assert_eq!(
            load(&[], None).unwrap().memory.profile,
            MemoryProfile::Small
        );

        let asked = load(&[("SMGATE_MEMORY_PROFILE", "large")], Some(256 * MIB)).unwrap();
        assert_eq!(
            (asked.memory.profile, asked.memory.automatic),
            (MemoryProfile::Large, false)
        );
        assert_eq!(sizes(&asked), (12, 16, 4096));
        let mixed = load(
            &[
                ("SMGATE_MEMORY_PROFILE", "small"),
                ("SMGATE_MQTT_BATCH_SIZE", "2048"),
            ],
            Some(8 << 30),
        )
        .unwrap();
        assert_eq!(sizes(&mixed), (3, 1, 2048));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("smgate.toml");
        std::fs::write(
            &file,
            "[store]\ncache_mb = 8\n[memory]\nprofile = \"small\"\n",
        )
        .unwrap();
        let c = Config::load_for(Some(&file), Vec::new(), Some(8 << 30)).unwrap();
        assert_eq!(sizes(&c), (8, 1, 512));

        let err = load(&[("SMGATE_MEMORY_PROFILE", "tiny")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory.profile"), "{err}");
        let err = load(&[("SMGATE_MEMORY_SIZE", "1")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("size"), "{err}");
    }

    #[test]
    fn board_memory_reads_memtotal_in_bytes() {
        let meminfo = "MemTotal:         254012 kB\nMemFree:           1000 kB\n";
        assert_eq!(meminfo_total(meminfo), Some(254012 << 10));
        assert_eq!(meminfo_total("MemFree: 1 kB\n"), None);
        let hybrid = "4:memory:/box/one\n3:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            cgroup_limit_files(hybrid),
            [
                "/sys/fs/cgroup/memory/box/one/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory.max",
            ]
        );
        assert_eq!(
            cgroup_limit_files("0::/system.slice/smgate.service\n"),
            ["/sys/fs/cgroup/system.slice/smgate.service/memory.max"]
        );
        // This machine's own figure is read and plausible.
        let here = board_memory().expect("/proc/meminfo is readable here");
        assert!(here > 16 << 20, "{here}");
    }

    #[test]
    fn shipped_firmware_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("firmware-config/smgate.toml");
        Config::load(Some(&p), Vec::new()).unwrap();
        // It documents the sizes the memory profile sets without pinning them.
        let board = Config::load_for(Some(&p), Vec::new(), Some(256 << 20)).unwrap();
        assert_eq!(board.memory.profile, MemoryProfile::Small);
        assert_eq!(board.store.cache_mb, 3);
        assert_eq!(board.mqtt.batch_size, 512);
    }
}
