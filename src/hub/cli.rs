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
}

/// Runs one `smgate hub` command: serve until SIGTERM/SIGINT, `enroll` or `migrate`. With
/// `hub.database_url` set, the hub's logs and enrolments are in PostgreSQL; otherwise in `dir`.
pub async fn run(dir: PathBuf, config: &Config, args: HubArgs) -> Result<(), HubError> {
    let on_pg = !config.hub.database_url.is_empty();
    match args.command {
        Some(HubCommand::Enroll {
            gateway_id,
            verifier_key,
        }) => {
            let (record, token) = super::new_enrollment(&gateway_id, &verifier_key)?;
            if on_pg {
                let pg = Pg::connect(&config.hub).await?;
                pg.migrate().await?;
                pg.enroll(&record).await.map_err(|e| HubError::Store(e.0))?;
            } else {
                Embedded::enroll_file(&dir, &record)?;
            }
            println!("enrolled {gateway_id}");
            println!("token {token}");
            println!("(shown once; set it as upstream.token on the gateway)");
            return Ok(());
        }
        Some(HubCommand::Migrate) => {
            if !on_pg {
                return Err(HubError::Invalid(
                    "hub migrate needs hub.database_url (SMGATE_HUB_DATABASE_URL); the embedded \
                     hub file needs no migration"
                        .into(),
                ));
            }
            let applied = Pg::connect(&config.hub).await?.migrate().await?;
            println!("smgate hub: migrations applied: {applied:?}");
            return Ok(());
        }
        None => {}
    }
    match Opened::open(&dir, &config.hub).await? {
        Opened::Embedded(hub) => serve_until_signal(Arc::new(hub), args.listen).await,
        Opened::Pg(hub) => serve_until_signal(Arc::new(hub), args.listen).await,
    }
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
