//! The `smgate` command line: argument parsing and dispatch to [`smgate::cli`] (and the hub).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use smgate::cli::{self, CliError, SiteDeploy};
use smgate::config::Config;

/// The gateway's allocator: mimalloc, committing memory on demand ([`smgate::alloc`]).
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
    /// default ./hub); or enrol a gateway with it.
    Hub(HubArgs),
    /// Benchmark helpers (offline: stop the gateway first).
    #[cfg(feature = "bench-tools")]
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct HubArgs {
    #[command(subcommand)]
    command: Option<HubCommand>,
    /// HTTPS address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: std::net::SocketAddr,
}

#[derive(Subcommand)]
enum HubCommand {
    /// Enrol a gateway by its id and note verifier key (both printed by `smgate identity`);
    /// prints the bearer token for its `upstream.token` once. Works while the hub runs.
    Enroll {
        gateway_id: String,
        verifier_key: String,
    },
}

#[cfg(feature = "bench-tools")]
#[derive(Subcommand)]
enum BenchCommand {
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
enum ChartCommand {
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
enum AccountCommand {
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
enum KeyCommand {
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
struct SubjectArgs {
    /// Account ZID (ZEQ + 11 digits).
    #[arg(long)]
    account: Option<String>,
    /// Machine slug.
    #[arg(long)]
    machine: Option<String>,
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Publish FILE (plaintext HTML, at most 2 MiB) as a new version of page PAGE of machine
    /// SLUG; the page is then live at /s/SLUG/p/PAGE/. Prints the version and its proof digest.
    Deploy(DeployArgs),
}

#[derive(Args)]
struct DeployArgs {
    /// Machine slug.
    slug: String,
    /// Page slug ([a-z0-9-]{1,64}).
    page: String,
    /// The HTML file.
    file: PathBuf,
    /// Page title (1–200 characters); defaults to the file name without its extension.
    #[arg(long)]
    title: Option<String>,
    /// The running gateway.
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    url: String,
    /// The owner's account key or an operator/admin machine key.
    #[arg(long, env = "SMGATE_KEY", hide_env_values = true)]
    key: String,
    /// CA certificate to trust for --url; defaults to the gateway's own (<data>/tls/cert.pem).
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// agentZid recorded with the version; defaults to the machine owner's ZID.
    #[arg(long)]
    agent_zid: Option<String>,
    /// Attach a Python script (stored with the page and returned by the API, never run).
    #[arg(long)]
    python: Option<PathBuf>,
}

impl From<DeployArgs> for SiteDeploy {
    fn from(a: DeployArgs) -> SiteDeploy {
        let DeployArgs {
            slug,
            page,
            file,
            title,
            url,
            key,
            cacert,
            agent_zid,
            python,
        } = a;
        SiteDeploy {
            slug,
            page,
            file,
            title,
            url,
            key,
            cacert,
            agent_zid,
            python,
        }
    }
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
        Command::Account(AccountCommand::Create { name }) => {
            cli::account_create(&config, name).await
        }
        Command::Account(AccountCommand::Credit { zid, amount }) => {
            cli::account_credit(&config, &zid, amount).await
        }
        Command::Key(KeyCommand::Mint {
            subject,
            role,
            name,
            expires_in_days,
        }) => {
            let subject = subject.parse(role.as_deref())?;
            cli::key_mint(&config, subject, name, expires_in_days).await
        }
        Command::Key(KeyCommand::List { subject }) => cli::key_list(&config, subject.parse(None)?),
        Command::Key(KeyCommand::Revoke { id }) => cli::key_revoke(&config, id).await,
        Command::Chart(ChartCommand::Check { file }) => cli::chart_check(&file),
        Command::Chart(ChartCommand::Simulate { file, events }) => {
            cli::chart_simulate(&file, &events)
        }
        Command::Site(SiteCommand::Deploy(deploy)) => {
            cli::site_deploy(&config, deploy.into()).await
        }
        Command::Identity => cli::identity(&config),
        Command::Hub(args) => hub_command(hub_dir, args).await,
        #[cfg(feature = "bench-tools")]
        Command::Bench(BenchCommand::FillLog { machine, rows }) => {
            cli::fill_log(&config, machine, rows).await
        }
    }
}

impl SubjectArgs {
    fn parse(&self, role: Option<&str>) -> Result<Option<smgate::auth::KeySubject>, CliError> {
        cli::subject(self.account.as_deref(), self.machine.as_deref(), role)
    }
}

/// `smgate hub`: serve until SIGTERM/SIGINT, or `hub enroll`.
async fn hub_command(dir: PathBuf, args: HubArgs) -> Result<(), CliError> {
    use smgate::sync::hub::{self, Hub};
    let fail = |e: hub::HubError| CliError::Usage(e.to_string());
    if let Some(HubCommand::Enroll {
        gateway_id,
        verifier_key,
    }) = args.command
    {
        let token = Hub::enroll(&dir, &gateway_id, &verifier_key).map_err(fail)?;
        println!("enrolled {gateway_id}");
        println!("token {token}");
        println!("(shown once; set it as upstream.token on the gateway)");
        return Ok(());
    }
    let hub = Arc::new(Hub::open(&dir).map_err(fail)?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::Usage(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let pin = hub::cert_pin(&hub.cert_path()).map_err(fail)?;
    println!("smgate hub: listening on https://{addr}");
    println!("smgate hub: pin sha256:{pin}");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(hub::serve(hub, listener, rx));
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| CliError::Usage(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| CliError::Usage(e.to_string()))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = task => return r.map_err(|e| CliError::Usage(e.to_string()))?.map_err(fail),
    }
    let _ = tx.send(true);
    Ok(())
}
