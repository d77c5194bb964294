//! The subcommands' arguments (clap), each with the `run` that `main.rs` dispatches to.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::CliError;
use crate::config::Config;

#[cfg(feature = "bench-tools")]
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Append ROWS `event` rows to MACHINE's log, as `POST …/event` would, in large
    /// transactions (to build a sync backlog quickly).
    FillLog {
        #[arg(long)]
        machine: String,
        #[arg(long)]
        rows: u64,
    },
}

#[derive(Subcommand)]
pub enum ChartCommand {
    /// Validate a definition file (XState v5-shaped JSON).
    ///
    /// Prints `ok`, or the error with the JSON path of the bad node (e.g.
    /// `$.states.online.on.PING.target: ...`) and exits 1.
    Check {
        /// The definition file.
        file: PathBuf,
    },
    /// Run a definition against a list of events, without a server.
    ///
    /// Prints one JSON line per input line, `{"value", "configuration", "tags", "done",
    /// "context"}`, after that input and everything it caused (internal events, undelayed
    /// sends, timers due by then) have been processed. The virtual clock starts at 0.
    Simulate {
        /// The definition file.
        file: PathBuf,
        /// Input, one per line: `NAME`, `{"type": NAME, ...data}`, or
        /// `{"type": "$advance", "ms": N}` to move the virtual clock. `-` reads stdin.
        #[arg(long, value_name = "EVENTS.jsonl")]
        events: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum AccountCommand {
    /// Create an account with a fresh ZID and print its first zeq_ak_ key once.
    Create {
        /// Display name.
        #[arg(long, default_value = "account")]
        name: String,
    },
    /// Add ZEQ to an account's wallet (the tally that pays for agent runs); prints the balance.
    Credit {
        /// The account's ZID.
        zid: String,
        /// Whole ZEQ to add.
        #[arg(value_parser = clap::value_parser!(i64).range(1..=1_000_000_000))]
        amount: i64,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Mint a key and print it once. Give --account for an account key or --machine with --role.
    Mint {
        #[command(flatten)]
        subject: SubjectArgs,
        /// Role of a machine key: viewer, operator or admin.
        #[arg(long, requires = "machine")]
        role: Option<String>,
        /// A name to tell keys apart.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Expire the key after this many days.
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List keys (never the raw keys: only id, name, hint, dates).
    List {
        #[command(flatten)]
        subject: SubjectArgs,
    },
    /// Revoke a key by id; it stops working at once.
    Revoke {
        /// Key id as shown by `key list`.
        id: String,
    },
}

#[derive(Args)]
#[group(multiple = false)]
pub struct SubjectArgs {
    /// Account ZID (ZEQ + 11 digits).
    #[arg(long)]
    pub account: Option<String>,
    /// Machine slug.
    #[arg(long)]
    pub machine: Option<String>,
}

#[derive(Subcommand)]
pub enum SiteCommand {
    /// Publish FILE (plaintext HTML, at most 2 MiB) as a new version of page PAGE of machine
    /// SLUG; the page is then live at /s/SLUG/p/PAGE/. Prints the version and its proof digest.
    Deploy(SiteDeploy),
}

#[derive(Args)]
pub struct SiteDeploy {
    /// Machine slug.
    pub slug: String,
    /// Page slug ([a-z0-9-]{1,64}).
    pub page: String,
    /// The HTML file.
    pub file: PathBuf,
    /// Page title (1–200 characters); defaults to the file name without its extension.
    #[arg(long)]
    pub title: Option<String>,
    /// The running gateway.
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    pub url: String,
    /// The owner's account key or an operator/admin machine key.
    #[arg(long, env = "SMGATE_KEY", hide_env_values = true)]
    pub key: String,
    /// CA certificate to trust for --url; defaults to the gateway's own (<data>/tls/cert.pem).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// agentZid recorded with the version; defaults to the machine owner's ZID.
    #[arg(long)]
    pub agent_zid: Option<String>,
    /// Attach a Python script (stored with the page and returned by the API, never run).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

impl AccountCommand {
    pub async fn run(self, config: &Config) -> Result<(), CliError> {
        match self {
            AccountCommand::Create { name } => super::account_create(config, name).await,
            AccountCommand::Credit { zid, amount } => {
                super::account_credit(config, &zid, amount).await
            }
        }
    }
}

impl KeyCommand {
    pub async fn run(self, config: &Config) -> Result<(), CliError> {
        match self {
            KeyCommand::Mint {
                subject,
                role,
                name,
                expires_in_days,
            } => {
                let subject = subject.parse(role.as_deref())?;
                super::key_mint(config, subject, name, expires_in_days).await
            }
            KeyCommand::List { subject } => super::key_list(config, subject.parse(None)?),
            KeyCommand::Revoke { id } => super::key_revoke(config, id).await,
        }
    }
}

impl SubjectArgs {
    fn parse(&self, role: Option<&str>) -> Result<super::KeyFilter, CliError> {
        super::subject(self.account.as_deref(), self.machine.as_deref(), role)
    }
}

impl ChartCommand {
    pub fn run(self) -> Result<(), CliError> {
        match self {
            ChartCommand::Check { file } => super::chart_check(&file),
            ChartCommand::Simulate { file, events } => super::chart_simulate(&file, &events),
        }
    }
}

impl SiteCommand {
    pub async fn run(self, config: &Config) -> Result<(), CliError> {
        let SiteCommand::Deploy(deploy) = self;
        super::site_deploy(config, deploy).await
    }
}

#[cfg(feature = "bench-tools")]
impl BenchCommand {
    pub async fn run(self, config: &Config) -> Result<(), CliError> {
        let BenchCommand::FillLog { machine, rows } = self;
        super::fill_log(config, machine, rows).await
    }
}
