//! The `smgate` command line: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use smgate::auth::{self, KeyRecord, KeySubject, Role, Zid};
use smgate::config::Config;
use smgate::store::{GroupCommit, Store, StoreError};
use smgate::{clock, gateway, server, systemd};

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
    /// default ./hub); or enrol a gateway with it.
    Hub(smgate::hub::cli::HubArgs),
    /// Benchmark helpers (offline: stop the gateway first).
    #[command(subcommand)]
    Bench(BenchCommand),
}

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

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] smgate::config::ConfigError),
    #[error(transparent)]
    Init(#[from] gateway::InitError),
    #[error(transparent)]
    Start(#[from] server::StartError),
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError::Store(e.to_string())
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

async fn run(cli: Cli) -> Result<(), CliError> {
    let config = load_config(&cli)?;
    let hub_dir = cli.data.clone().unwrap_or_else(|| PathBuf::from("./hub"));
    match cli.command {
        Command::Init => {
            let made = gateway::init(&config).await?;
            print_owner(&made);
            Ok(())
        }
        Command::Serve => serve(config).await,
        Command::Verify { machine } => verify(&config, machine.as_deref()),
        Command::Account(AccountCommand::Create { name }) => {
            let writer = GroupCommit::start(offline_store(&config)?);
            let (account, raw) = writer
                .write(move |txn| auth::create_account(txn, &name, clock::now_ms()))
                .await?;
            writer.shutdown().await;
            println!(
                "account {}\nkey {raw}\n(shown once; store it now)",
                account.zid
            );
            Ok(())
        }
        Command::Account(AccountCommand::Credit { zid, amount }) => {
            let zid = Zid::parse(&zid).ok_or_else(|| {
                CliError::Usage(format!("`{zid}` is not a ZID (ZEQ + 11 digits)"))
            })?;
            let writer = GroupCommit::start(offline_store(&config)?);
            let who = zid.clone();
            let balance = writer
                .write(move |txn| smgate::agents::credit(txn, &who, amount))
                .await;
            writer.shutdown().await;
            let balance = balance?.ok_or_else(|| CliError::Usage(format!("no account {zid}")))?;
            println!("account {zid} balance {balance}");
            Ok(())
        }
        Command::Key(cmd) => key_command(&config, cmd).await,
        Command::Chart(cmd) => chart_command(cmd),
        Command::Site(cmd) => site_command(&config, cmd).await,
        Command::Identity => {
            let id = gateway::Identity::load(&gateway::identity_path(&config))?;
            println!("gateway {}", id.id);
            println!("verifier_key {}", id.verifier_key());
            Ok(())
        }
        Command::Hub(args) => smgate::hub::cli::run(hub_dir, &config, args)
            .await
            .map_err(|e| CliError::Usage(e.to_string())),
        Command::Bench(BenchCommand::FillLog { machine, rows }) => {
            fill_log(&config, machine, rows).await
        }
    }
}

/// `smgate chart …`: pure, offline; reads only the files it is given.
fn chart_command(cmd: ChartCommand) -> Result<(), CliError> {
    use smgate::chart;
    use std::io::Write as _;
    let read = |path: &PathBuf| -> Result<String, CliError> {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(path)
        };
        text.map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
    };
    let fail = |e: chart::ChartError| CliError::Usage(e.to_string());
    match cmd {
        ChartCommand::Check { file } => {
            chart::check(&read(&file)?).map_err(fail)?;
            println!("ok");
        }
        ChartCommand::Simulate { file, events } => {
            let lines = chart::simulate(&read(&file)?, &read(&events)?).map_err(fail)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for line in lines {
                writeln!(out, "{line}").map_err(|e| CliError::Usage(e.to_string()))?;
            }
            out.flush().map_err(|e| CliError::Usage(e.to_string()))?;
        }
    }
    Ok(())
}

fn print_owner(made: &gateway::Initialised) {
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
    if !gateway::is_initialised(config) {
        return Err(CliError::Usage(format!(
            "{} is not initialised; run `smgate init` first",
            config.data.dir.display()
        )));
    }
    let store = Store::open(&config.db_path(), gateway::store_options(config)).map_err(|e| {
        CliError::Store(format!(
            "{e} (if the gateway is running, stop it or use the HTTP API)"
        ))
    })?;
    Ok(store)
}

fn parse_subject(s: &SubjectArgs, role: Option<&str>) -> Result<Option<KeySubject>, CliError> {
    match (&s.account, &s.machine) {
        (Some(zid), None) => {
            let zid = Zid::parse(zid).ok_or_else(|| {
                CliError::Usage(format!("`{zid}` is not a ZID (ZEQ + 11 digits)"))
            })?;
            Ok(Some(KeySubject::Account { zid }))
        }
        (None, Some(slug)) => {
            let role = match role {
                Some(r) => Role::parse(r).ok_or_else(|| {
                    CliError::Usage(format!("role `{r}` is not viewer, operator or admin"))
                })?,
                None => Role::Viewer,
            };
            Ok(Some(KeySubject::Machine {
                slug: slug.clone(),
                role,
            }))
        }
        _ => Ok(None),
    }
}

async fn key_command(config: &Config, cmd: KeyCommand) -> Result<(), CliError> {
    let store = offline_store(config)?;
    let writer = GroupCommit::start(store.clone());
    let result = match cmd {
        KeyCommand::Mint {
            subject,
            role,
            name,
            expires_in_days,
        } => {
            let subject = parse_subject(&subject, role.as_deref())?
                .ok_or_else(|| CliError::Usage("give --account ZID or --machine SLUG".into()))?;
            let ttl = expires_in_days.map(|d| i64::from(d) * 86_400_000);
            let (raw, record) = writer
                .write(move |txn| -> Result<_, CliError> {
                    let read_ok = auth::subject_exists(txn, &subject)?;
                    if !read_ok {
                        return Err(CliError::Usage("no such account or machine".into()));
                    }
                    let now = clock::now_ms();
                    let expires = ttl.map(|t| now + t);
                    Ok(match subject {
                        // Machine keys are logged on the machine's chain.
                        KeySubject::Machine { slug, role } => smgate::machines::mint_key(
                            txn, &slug, role, &name, expires, "cli", now,
                        )?,
                        account => auth::mint_key(txn, account, &name, expires, now)?,
                    })
                })
                .await?;
            println!("id {}\nkey {raw}\n(shown once; store it now)", record.id);
            Ok(())
        }
        KeyCommand::List { subject } => {
            let wanted = parse_subject(&subject, None)?;
            let keys = store.view(|txn| {
                auth::list_keys(txn, |s| match (&wanted, s) {
                    (None, _) => true,
                    (Some(KeySubject::Account { zid: a }), KeySubject::Account { zid: b }) => {
                        a == b
                    }
                    (
                        Some(KeySubject::Machine { slug: a, .. }),
                        KeySubject::Machine { slug: b, .. },
                    ) => a == b,
                    _ => false,
                })
            })?;
            println!(
                "{:<36}  {:<24}  {:<12}  {:<16}  {:<20}  status",
                "id", "subject", "name", "hint", "created"
            );
            for k in keys {
                let subject = match &k.subject {
                    KeySubject::Account { zid } => format!("account {zid}"),
                    KeySubject::Machine { slug, role } => format!("{slug} ({})", role.as_str()),
                };
                let status = if k.revoked_ms.is_some() {
                    "revoked"
                } else if k.is_live(clock::now_ms()) {
                    "active"
                } else {
                    "expired"
                };
                println!(
                    "{:<36}  {:<24}  {:<12}  {:<16}  {:<20}  {status}",
                    k.id,
                    subject,
                    k.name,
                    k.hint,
                    clock::rfc3339(k.created_ms)
                );
            }
            Ok(())
        }
        KeyCommand::Revoke { id } => {
            let record = writer
                .write(move |txn| match auth::key_by_id_in(txn, &id)? {
                    Some(KeyRecord {
                        subject: KeySubject::Machine { slug, .. },
                        ..
                    }) => smgate::machines::revoke_key(txn, &slug, &id, "cli", clock::now_ms()),
                    _ => auth::revoke_key(txn, &id, |_| true, clock::now_ms()),
                })
                .await?;
            match record {
                Some(k) => {
                    println!("revoked {}", k.id);
                    Ok(())
                }
                None => Err(CliError::Usage("no key with that id".into())),
            }
        }
    };
    writer.shutdown().await;
    result
}

fn verify(config: &Config, only: Option<&str>) -> Result<(), CliError> {
    use std::io::Write;
    let store = offline_store(config)?;
    let machines = store.view(smgate::machines::all)?;
    let selected: Vec<_> = machines
        .iter()
        .filter(|m| only.is_none_or(|s| s == m.slug))
        .collect();
    if let Some(s) = only.filter(|_| selected.is_empty()) {
        return Err(CliError::Usage(format!("no machine `{s}`")));
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut total = 0;
    for m in &selected {
        let report = store.view(|txn| {
            smgate::ledger::log::verify_machine(txn, &m.slug, |done, all| {
                if tty {
                    eprint!(
                        "\r{}: {done}/{all} rows ({}%)",
                        m.slug,
                        done * 100 / all.max(1)
                    );
                    let _ = std::io::stderr().flush();
                }
            })
        })?;
        if tty {
            eprintln!();
        }
        if let Some((seq, why)) = report.broken {
            return Err(CliError::Usage(format!(
                "machine {}: row {seq} is broken: {why}",
                m.slug
            )));
        }
        println!("{}: {} rows ok", m.slug, report.rows);
        total += report.rows;
    }
    println!("verified {} machine(s), {total} rows", selected.len());
    Ok(())
}

async fn serve(config: Config) -> Result<(), CliError> {
    // Signal handlers first: the listener answers before `start` returns, and a SIGTERM that
    // arrives then (systemd stopping a unit that is still starting, a supervisor that saw the
    // first answer) must mean a graceful stop, not the default action of dying mid-commit.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| CliError::Usage(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| CliError::Usage(e.to_string()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| CliError::Usage(e.to_string()))?;
    let (running, initialised) = server::start(config, None).await?;
    if let Some(made) = &initialised {
        print_owner(made);
    }
    println!("smgate: listening on https://{}", running.addr);
    if let Some(addr) = running.mqtt_broker() {
        println!("smgate: mqtt broker on {addr}");
    }
    if let Some(addr) = running.mqtt_tls() {
        println!("smgate: mqtts broker on {addr}");
    }
    tracing::info!(addr = %running.addr, gateway = %running.gateway.identity.id, "listening");
    systemd::notify("READY=1");
    if let Some(every) = systemd::watchdog_interval() {
        let gw = running.gateway.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                // Ping only while the store answers, so a wedged store gets us restarted.
                if gw.store.view(|_| Ok(())).is_ok() {
                    systemd::notify("WATCHDOG=1");
                }
            }
        });
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match running.reload_tls() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the old certificate"),
            },
        }
    }
    systemd::notify("STOPPING=1");
    tracing::info!("shutting down: finishing requests and the last commit");
    running.shutdown().await;
    Ok(())
}

/// `smgate bench fill-log`: appends event rows offline, 10,000 per transaction.
async fn fill_log(config: &Config, slug: String, rows: u64) -> Result<(), CliError> {
    use smgate::ledger::log::{Entry, LogWriter};
    let writer = GroupCommit::start(offline_store(config)?);
    let mut done = 0u64;
    while done < rows {
        let n = (rows - done).min(10_000);
        let (s, first) = (slug.clone(), done);
        writer
            .write(move |txn| -> Result<(), CliError> {
                let mut log = LogWriter::open(txn)?;
                if !smgate::machines::valid_slug(&s) || log.head(&s)?.is_none() {
                    return Err(CliError::Usage(format!("no machine `{s}`")));
                }
                let now = clock::now_ms();
                for i in first..first + n {
                    let hash = auth::sha256(&i.to_be_bytes());
                    let payload = serde_json::json!({"type": "fill", "payload_hash": smgate::ledger::hex::encode(&hash)});
                    log.append(&s, Entry::json("event", "bench", &payload), now)?;
                }
                log.finish()?;
                Ok(())
            })
            .await?;
        done += n;
    }
    writer.shutdown().await;
    println!("appended {rows} rows to {slug}");
    Ok(())
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Publish FILE (plaintext HTML, at most 2 MiB) as a new version of page PAGE of machine
    /// SLUG; the page is then live at /s/SLUG/p/PAGE/. Prints the version and its proof digest.
    Deploy {
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
    },
}

/// `smgate site deploy`: spec 001's publish call with the HTML read from a file.
async fn site_command(config: &Config, cmd: SiteCommand) -> Result<(), CliError> {
    use smgate::http::client;
    let SiteCommand::Deploy {
        slug,
        page,
        file,
        title,
        url,
        key,
        cacert,
        agent_zid,
        python,
    } = cmd;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))
    };
    let html = read(&file)?;
    let python = python.as_ref().map(read).transpose()?;
    let title = title.unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| page.clone())
    });
    let cacert = cacert.unwrap_or_else(|| config.cert_path());
    let base = url.trim_end_matches('/').to_string();
    let fail = |e: client::ClientError| CliError::Usage(e.to_string());
    let refused = |status: u16, body: &serde_json::Value| {
        let code = body
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("error");
        let message = body
            .get("message")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| body.to_string());
        CliError::Usage(format!("gateway answered {status} {code}: {message}"))
    };
    let agent_zid = match agent_zid {
        Some(z) => z,
        None => {
            let path = format!("/api/chain/state-machines/{slug}");
            let (status, body) =
                client::request(&base, &cacert, http::Method::GET, &path, Some(&key), None)
                    .await
                    .map_err(fail)?;
            if status != 200 {
                return Err(refused(status, &body));
            }
            body.pointer("/machine/owner_zid")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or_else(|| {
                    CliError::Usage(
                        "this key cannot see the machine's owner ZID; give --agent-zid".into(),
                    )
                })?
        }
    };
    let mut request = serde_json::json!({"title": title, "html": html, "agentZid": agent_zid});
    if let Some(p) = python {
        request["pythonScript"] = serde_json::Value::String(p);
    }
    let path = format!("/api/state-machines/{slug}/pages/{page}/publish");
    let (status, body) = client::request(
        &base,
        &cacert,
        http::Method::POST,
        &path,
        Some(&key),
        Some(&request),
    )
    .await
    .map_err(fail)?;
    if status != 201 {
        return Err(refused(status, &body));
    }
    println!("published {slug}/{page} version {}", body["version"]);
    println!(
        "proof_digest {}",
        body["proof_digest"].as_str().unwrap_or("")
    );
    println!("url {base}{}", body["url"].as_str().unwrap_or(""));
    Ok(())
}
