//! `smgate hub …`: the hub's command line, kept here so that `main.rs` dispatches in one line
//! and nothing outside this module needs the hub's types.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::{Hub, HubError};

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
}

/// Runs one `smgate hub` command: serve until SIGTERM/SIGINT, or `enroll`.
pub async fn run(dir: PathBuf, args: HubArgs) -> Result<(), HubError> {
    if let Some(HubCommand::Enroll {
        gateway_id,
        verifier_key,
    }) = args.command
    {
        let token = Hub::enroll(&dir, &gateway_id, &verifier_key)?;
        println!("enrolled {gateway_id}");
        println!("token {token}");
        println!("(shown once; set it as upstream.token on the gateway)");
        return Ok(());
    }
    let hub = Arc::new(Hub::open(&dir)?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| HubError::Invalid(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| HubError::Invalid(e.to_string()))?;
    let pin = super::cert_pin(&hub.cert_path())?;
    println!("smgate hub: listening on https://{addr}");
    println!("smgate hub: pin sha256:{pin}");
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
