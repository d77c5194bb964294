//! What the `smgate` subcommands do, once `main.rs` has parsed them: the offline commands on a
//! stopped gateway's data directory (`init`, `account`, `key`, `verify`, `identity`, `bench`),
//! the pure `chart` commands, `site deploy` over HTTPS, and `serve`'s life until SIGTERM. Part
//! of the command line, with `main.rs`; nothing else imports it.

mod args;
mod keys;
mod offline;
mod serve;

#[cfg(feature = "bench-tools")]
pub use args::BenchCommand;
pub use args::SiteDeploy;
pub use args::{AccountCommand, ChartCommand, KeyCommand, SiteCommand, SubjectArgs};
pub use keys::{key_list, key_mint, key_revoke, subject, KeyFilter};
pub use offline::{account_create, account_credit, chart_check, chart_simulate, identity, init};
pub use offline::{site_deploy, verify};
pub use serve::serve;

#[cfg(feature = "bench-tools")]
pub use offline::fill_log;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::gateway::{self, InitError};
use crate::store::{Store, StoreError};

/// Why a command failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An argument that does not name a valid thing (a ZID, a role, a subject).
    #[error("{0}")]
    Usage(String),
    /// The account, machine or key the command names does not exist.
    #[error("{0}")]
    Missing(String),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Output(std::io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Chart(#[from] crate::chart::ChartError),
    /// `smgate verify` found a row that breaks an invariant of the log.
    #[error("machine {machine}: row {seq} is broken: {why}")]
    Broken {
        machine: String,
        seq: u64,
        why: String,
    },
    #[error(transparent)]
    Client(#[from] crate::http::client::ClientError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    Start(#[from] crate::server::StartError),
    #[error("{0}")]
    Store(String),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError::Store(e.to_string())
    }
}

/// Reads a file an argument names (`-` is stdin).
fn read(path: &Path) -> Result<String, CliError> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    };
    text.map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Prints what `init` made: the owner key, once.
pub fn print_owner(made: &gateway::Initialised) {
    println!("gateway {}", made.gateway_id);
    println!("owner account {}", made.owner);
    println!("owner key {}", made.owner_key);
    println!(
        "(shown once; also written to {} with mode 0600)",
        made.key_file.display()
    );
}

/// Opens the store for an offline command; a running gateway holds the lock.
fn offline_store(config: &Config) -> Result<Arc<Store>, CliError> {
    if !config.paths().is_initialised() {
        return Err(CliError::Usage(format!(
            "{} is not initialised; run `smgate init` first",
            config.data.dir.display()
        )));
    }
    let store = Store::open(&config.db_path(), config.store_options()).map_err(|e| {
        CliError::Store(format!(
            "{e} (if the gateway is running, stop it or use the HTTP API)"
        ))
    })?;
    Ok(store)
}

/// A ZID argument.
fn zid(s: &str) -> Result<crate::auth::Zid, CliError> {
    crate::auth::Zid::parse(s)
        .ok_or_else(|| CliError::Usage(format!("`{s}` is not a ZID (ZEQ + 11 digits)")))
}
