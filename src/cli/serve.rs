//! `smgate serve`: start the gateway, tell systemd, reload TLS on SIGHUP, stop on SIGTERM.

use super::{print_owner, CliError};
use crate::config::{Config, MemoryProfile};
use crate::server;
use crate::signals::Signals;
use crate::systemd;

pub async fn serve(config: Config) -> Result<(), CliError> {
    // Before `start`: the listener answers before it returns (`Signals`).
    let mut signals = Signals::install().map_err(CliError::Signals)?;
    let memory = memory_line(&config);
    if config.memory.profile == MemoryProfile::Small {
        crate::alloc::purge_at_once();
    }
    let (running, initialised) = server::start(config, None).await?;
    if let Some(made) = &initialised {
        print_owner(made);
    }
    println!("smgate: listening on https://{}", running.addr);
    println!("smgate: {memory}");
    if let Some(addr) = running.mqtt_broker() {
        println!("smgate: mqtt broker on {addr}");
    }
    if let Some(addr) = running.mqtt_tls() {
        println!("smgate: mqtts broker on {addr}");
    }
    tracing::info!(addr = %running.addr, gateway = %running.parts.identity.id, "listening");
    systemd::notify("READY=1");
    if let Some(every) = systemd::watchdog_interval() {
        let store = running.parts.store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                // Ping only while the store answers, so a wedged store gets us restarted.
                if store.view(|_| Ok(())).is_ok() {
                    systemd::notify("WATCHDOG=1");
                }
            }
        });
    }
    signals
        .stopped(|| match running.reload_tls() {
            Ok(()) => tracing::info!("TLS certificate reloaded"),
            Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the old certificate"),
        })
        .await;
    systemd::notify("STOPPING=1");
    tracing::info!("shutting down: finishing requests and the last commit");
    running.shutdown().await;
    Ok(())
}

/// The memory profile in use and why, with the sizes it led to.
fn memory_line(config: &Config) -> String {
    let m = &config.memory;
    let why = match (m.automatic, m.board_bytes) {
        (true, Some(b)) => format!(" (auto: {} MiB of RAM)", b >> 20),
        (true, None) => " (auto: the RAM could not be read)".into(),
        (false, _) => String::new(),
    };
    format!(
        "memory profile {}{why}: store.cache_mb {}, store.write_window_mb {}, mqtt.batch_size {}",
        m.profile.name(),
        config.store.cache_mb,
        config.store.write_window_mb,
        config.mqtt.batch_size
    )
}
