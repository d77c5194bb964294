//! The `smgate` command line: argument parsing and dispatch to [`smgate::cli`] (and the hub).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "bench-tools")]
use smgate::cli::BenchCommand;
use smgate::cli::{self, AccountCommand, ChartCommand, CliError, KeyCommand, SiteCommand};
use smgate::config::Config;

/// The gateway's allocator: mimalloc, committing memory on demand ([`smgate::alloc`]); the
/// `system-alloc` feature leaves the system's, for heap profilers that hook `malloc`.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOCATOR: smgate::alloc::Allocator = smgate::alloc::Allocator;

#[derive(Parser)]
#[command(
    name = "smgate",
    version,
    about = "State-machine host for IoT gateways: statecharts, pages and a verifiable log in one binary",
    long_about = "smgate keeps machines, statecharts, instances and pages in an embedded redb database, \
serves its API and console over HTTPS (rustls), and writes every change to a verifiable log.\n\n\
Quick start: `smgate serve` initialises ./data on first boot (printing the owner key once) and \
listens on https://127.0.0.1:8443."
)]
struct Cli {
    /// Config file (TOML). Without it, built-in defaults apply; SMGATE_<SECTION>_<KEY> env vars override either.
    #[arg(long, short, global = true, env = "SMGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data.dir`).
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory: database, gateway identity, self-signed TLS certificate and the
    /// owner account, whose key is printed once and written to <data>/initial-owner.key (0600).
    Init,
    /// Run the gateway (initialises an empty data directory first).
    Serve,
    /// Check every machine's log offline: each row's hash, the hash chain, and the Merkle tree.
    /// Exits non-zero naming the first broken row. Stop the gateway first.
    Verify {
        /// Only this machine.
        #[arg(long)]
        machine: Option<String>,
    },
    /// Manage accounts (offline: stop the gateway first).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Manage keys (offline: stop the gateway first; a running gateway has the HTTP API).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Validate or dry-run a statechart definition offline (needs no data directory).
    #[command(subcommand)]
    Chart(ChartCommand),
    /// Publish pages to a running gateway over its HTTPS API.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Print this gateway's id and note verifier key (what `smgate hub enroll` takes).
    Identity,
    /// Run `smgate hub`, the reference upstream receiver, in its own data directory (--data,
    /// default ./hub); or enrol a gateway, migrate, import an embedded hub, make an operator key.
    ///
    /// Logs go to an embedded redb file in the data directory, or, with hub.database_url
    /// (SMGATE_HUB_DATABASE_URL), to PostgreSQL shared by any number of hubs. For a failover
    /// group give every node and let the client pick the writable one:
    /// postgres://hub@db1:5432,db2:5432/smgate?target_session_attrs=read-write. Gateways POST
    /// to /v1/ingest; auditors read /logs/<gateway>/<machine>/ (tlog-tiles, public); operators
    /// read /v1/gateways…, /v1/stats and /metrics with the key whose SHA-256 is
    /// hub.operator_key_sha256.
    Hub(smgate::hub::cli::HubArgs),
    /// Benchmark helpers (offline: stop the gateway first).
    #[cfg(feature = "bench-tools")]
    #[command(subcommand)]
    Bench(BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(8)
        .thread_name("smgate")
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("smgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, CliError> {
    let mut config = Config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(d) = &cli.data {
        config.data.dir = d.clone();
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.level.clone());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    Ok(config)
}

async fn run(args: Cli) -> Result<(), CliError> {
    let config = load_config(&args)?;
    let hub_dir = args.data.clone().unwrap_or_else(|| PathBuf::from("./hub"));
    match args.command {
        Command::Init => cli::init(&config).await,
        Command::Serve => cli::serve(config).await,
        Command::Verify { machine } => cli::verify(&config, machine.as_deref()),
        Command::Account(cmd) => cmd.run(&config).await,
        Command::Key(cmd) => cmd.run(&config).await,
        Command::Chart(cmd) => cmd.run(),
        Command::Site(cmd) => cmd.run(&config).await,
        Command::Identity => cli::identity(&config),
        Command::Hub(args) => Ok(smgate::hub::cli::run(hub_dir, &config, args).await?),
        #[cfg(feature = "bench-tools")]
        Command::Bench(cmd) => cmd.run(&config).await,
    }
}
