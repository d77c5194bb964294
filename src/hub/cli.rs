//! `smgate hub …`: the hub's command line, kept here so that `main.rs` dispatches in one line
//! and nothing outside this module needs the hub's types.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::{embedded::Embedded, pg::Pg, HubError, HubStore, Opened};
use crate::config::Config;

#[derive(Args)]
pub struct HubArgs {
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
    /// Apply the database migrations this binary knows (PostgreSQL only; `hub` applies them
    /// at start too) and exit.
    Migrate,
    /// Copy an embedded hub's file (its `hub.redb`, with `enrolled/` beside it) into the
    /// PostgreSQL database of hub.database_url: gateways, logs, checkpoints and conflicts.
    /// Every log is re-verified as it is copied; running it again changes nothing. Stop the
    /// embedded hub first (redb locks its file); run `hub migrate` first.
    Import { file: PathBuf },
    /// Make an operator key for the read API (`/v1/gateways…`, `/v1/stats`, `/metrics`):
    /// prints the key once, and the SHA-256 to set as hub.operator_key_sha256.
    OperatorKey,
}

/// Runs one `smgate hub` command: serve until SIGTERM/SIGINT, `enroll`, `migrate`, `import`
/// or `operator-key`. With `hub.database_url` set, the hub's logs and enrolments are in
/// PostgreSQL (a multi-host URL with `target_session_attrs=read-write` follows a failover);
/// otherwise in `dir`.
pub async fn run(dir: PathBuf, config: &Config, args: HubArgs) -> Result<(), HubError> {
    match args.command {
        Some(HubCommand::Enroll {
            gateway_id,
            verifier_key,
        }) => enroll(&dir, config, &gateway_id, &verifier_key).await,
        Some(HubCommand::Migrate) => {
            let applied = Pg::connect(&pg_config(config, "migrate")?)
                .await?
                .migrate()
                .await?;
            println!("smgate hub: migrations applied: {applied:?}");
            Ok(())
        }
        Some(HubCommand::Import { file }) => import(config, &file).await,
        Some(HubCommand::OperatorKey) => {
            let (key, hash) = crate::auth::new_raw_key("smo_");
            println!("operator key {key}");
            println!("operator_key_sha256 {}", crate::ledger::hex::encode(&hash));
            println!("(the key is shown once; set the SHA-256 as hub.operator_key_sha256)");
            Ok(())
        }
        None => match Opened::open(&dir, &config.hub).await? {
            Opened::Embedded(hub) => serve_until_signal(Arc::new(hub), args.listen).await,
            Opened::Pg(hub) => serve_until_signal(Arc::new(hub), args.listen).await,
        },
    }
}

/// The hub settings of a command that needs PostgreSQL, or an error that says so.
fn pg_config(config: &Config, command: &str) -> Result<crate::config::HubConfig, HubError> {
    if config.hub.database_url.is_empty() {
        return Err(HubError::Invalid(format!(
            "hub {command} works on PostgreSQL only: set hub.database_url \
             (SMGATE_HUB_DATABASE_URL)"
        )));
    }
    Ok(config.hub.clone())
}

async fn enroll(
    dir: &std::path::Path,
    config: &Config,
    gateway_id: &str,
    verifier_key: &str,
) -> Result<(), HubError> {
    let (record, token) = super::new_enrollment(gateway_id, verifier_key)?;
    if config.hub.database_url.is_empty() {
        Embedded::enroll_file(dir, &record)?;
    } else {
        let pg = Pg::connect(&config.hub).await?;
        pg.migrate().await?;
        pg.enroll(&record).await.map_err(|e| HubError::Store(e.0))?;
    }
    println!("enrolled {gateway_id}");
    println!("token {token}");
    println!("(shown once; set it as upstream.token on the gateway)");
    Ok(())
}

async fn import(config: &Config, file: &std::path::Path) -> Result<(), HubError> {
    let mut hub = pg_config(config, "import")?;
    hub.timeout_ms = hub.timeout_ms.max(super::import::IMPORT_TIMEOUT_MS);
    let pg = Pg::connect(&hub).await?;
    let r = super::import::import(file, &pg).await?;
    println!(
        "smgate hub: imported {} logs ({} new rows), {} gateways enrolled, {} already enrolled, \
         {} conflicts",
        r.logs, r.rows, r.enrolled, r.kept, r.conflicts
    );
    if r.refused.is_empty() {
        return Ok(());
    }
    Err(HubError::Invalid(format!(
        "{} logs were refused (their evidence is kept as conflicts): {}",
        r.refused.len(),
        r.refused.join("; ")
    )))
}

async fn serve_until_signal<S: HubStore>(
    hub: Arc<super::Hub<S>>,
    listen: std::net::SocketAddr,
) -> Result<(), HubError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| HubError::Invalid(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| HubError::Invalid(e.to_string()))?;
    let pin = super::cert_pin(&hub.cert_path())?;
    println!("smgate hub: listening on https://{addr}");
    println!("smgate hub: pin sha256:{pin}");
    println!("smgate hub: cosigner {}", hub.cosigner.verifier_key());
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(super::serve(hub, listener, rx));
    use tokio::signal::unix::{signal, SignalKind};
    let sig = |e: std::io::Error| HubError::Invalid(e.to_string());
    let mut term = signal(SignalKind::terminate()).map_err(sig)?;
    let mut int = signal(SignalKind::interrupt()).map_err(sig)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = task => return r.map_err(|e| HubError::Invalid(e.to_string()))?,
    }
    let _ = tx.send(true);
    Ok(())
}
