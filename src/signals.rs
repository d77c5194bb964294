//! The process signals a long-running command listens to: SIGTERM and SIGINT stop it, SIGHUP
//! asks it to reload. One helper for `smgate serve` and `smgate hub`.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGTERM, SIGINT and SIGHUP handlers, installed together.
///
/// Install them before anything answers: a SIGTERM that arrives while the command is still
/// starting (systemd stopping a unit that is still starting, a supervisor that saw the first
/// answer) must mean a graceful stop, not the default action of dying mid-commit.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns at SIGTERM or SIGINT; calls `on_hangup` at each SIGHUP meanwhile.
    pub async fn stopped(&mut self, mut on_hangup: impl FnMut()) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => on_hangup(),
            }
        }
    }
}
