//! The accept loop: TCP → TLS (rustls, handshake timeout) → hyper-util auto (HTTP/1.1 or h2 by
//! ALPN; request header timeout) → warp routes. On shutdown it stops accepting, lets open
//! requests finish within the grace period, then returns. Request bodies reach warp as
//! [`RequestBody`]: an HTTP/2 body a route did not read is drained rather than reset, so that
//! clients get every answer (`drain.rs` says why).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use super::drain::RequestBody;
use super::{routes, RemoteAddr};
use super::{Api, Common};

pub async fn serve(listener: TcpListener, api: Api, mut shutdown: watch::Receiver<bool>) {
    let service = warp::service(routes(&api));
    let graceful = GracefulShutdown::new();
    let handshake_timeout = Duration::from_secs(api.http.handshake_timeout_secs);
    let header_timeout = Duration::from_secs(api.http.header_read_timeout_secs);
    // The largest body any route reads: a refused body up to this size is drained.
    let drain_max = api.http.max_json_bytes.max(super::pages::MAX_PUBLISH_BODY);
    let deps = api.common.clone();
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
        deps.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        let acceptor = api.tls.get();
        let deps = deps.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let Some(tls) = handshake(&acceptor, tcp, peer, handshake_timeout, &deps).await else {
                return;
            };
            let first_request = Arc::new(Notify::new());
            let request_came = first_request.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    request_came.notify_one();
                    let h1 = req.version() < http::Version::HTTP_2;
                    let mut req = req.map(|body| {
                        if h1 {
                            RequestBody::h1(body)
                        } else {
                            RequestBody::h2(body, drain_max)
                        }
                    });
                    req.extensions_mut().insert(RemoteAddr(peer));
                    let method = req.method().clone();
                    let route = super::openapi::route_template(req.uri().path());
                    let has_body = req.headers().contains_key(http::header::TRANSFER_ENCODING)
                        || req
                            .headers()
                            .get(http::header::CONTENT_LENGTH)
                            .is_some_and(|v| v.as_bytes() != b"0");
                    let mut warp_svc = service.clone();
                    let deps = deps.clone();
                    async move {
                        let mut res = tower_service::Service::call(&mut warp_svc, req).await?;
                        // An error answered before the body was read (401, 404, 405, 413, …)
                        // leaves the body on the connection; hyper then closes it after the
                        // response. Say so, or an HTTP/1.1 client may reuse the connection and
                        // see its next request fail (schemathesis did).
                        if h1 && has_body && res.status().as_u16() >= 400 {
                            res.headers_mut().insert(
                                http::header::CONNECTION,
                                http::HeaderValue::from_static("close"),
                            );
                        }
                        deps.metrics
                            .record_request(method.as_str(), route, res.status().as_u16());
                        Ok::<_, Infallible>(res)
                    }
                });
            let mut builder = Builder::new(TokioExecutor::new());
            // hyper times the header of every HTTP/1.1 request, from when the connection waits
            // for one. Before the first request, hyper-util waits for the bytes that tell
            // HTTP/1.1 from h2 without a timeout, so the first header is also timed here: a
            // client that sends nothing, or part of the h2 preface, is closed too.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            let served = watcher.watch(conn.into_owned());
            tokio::pin!(served);
            let ended = tokio::select! {
                ended = &mut served => ended,
                came = tokio::time::timeout(header_timeout, first_request.notified()) => {
                    if came.is_err() {
                        tracing::debug!(%peer, "no request header within the timeout; closing");
                        return;
                    }
                    served.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = Duration::from_secs(api.http.shutdown_grace_secs);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
    }
}

/// The TLS handshake of a new connection, bounded by `timeout`; a failure is counted.
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    timeout: Duration,
    deps: &Common,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let failed = || {
        deps.metrics
            .tls_handshake_failures
            .fetch_add(1, Ordering::Relaxed)
    };
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            failed();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            failed();
            None
        }
    }
}
