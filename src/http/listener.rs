//! The accept loop: TCP → TLS (rustls, handshake timeout) → hyper-util auto (HTTP/1.1 or h2 by
//! ALPN) → warp routes. On shutdown it stops accepting, lets open requests finish within the
//! grace period, then returns.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{routes, RemoteAddr};
use crate::server::Gateway;

pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let service = warp::service(routes(gw.clone()));
    let graceful = GracefulShutdown::new();
    let handshake_timeout = Duration::from_secs(gw.config.http.handshake_timeout_secs);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        gw.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        let acceptor = gw.tls.get();
        let gw = gw.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    gw.metrics
                        .tls_handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    gw.metrics
                        .tls_handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let svc =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(RemoteAddr(peer));
                    let method = req.method().clone();
                    let route = super::openapi::route_template(req.uri().path());
                    let mut warp_svc = service.clone();
                    let gw = gw.clone();
                    async move {
                        let res = tower_service::Service::call(&mut warp_svc, req).await?;
                        gw.metrics
                            .record_request(method.as_str(), route, res.status().as_u16());
                        Ok::<_, Infallible>(res)
                    }
                });
            let builder = Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = Duration::from_secs(gw.config.http.shutdown_grace_secs);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
    }
}
