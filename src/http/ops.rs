//! Operations: `/healthz`, `/metrics`, `/api/gateway`, `/api/openapi.json`, and the embedded
//! console under `/ui/`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::StatusCode;
use serde_json::json;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::openapi::schema::{GatewayInfo, Health};
use super::OpsDeps;
use super::{json_response, respond, with_gateway, ApiError};
use crate::clock;
use crate::machines;

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    healthz,
    metrics,
    gateway_info,
    super::openapi::reply,
    root,
    ui,
    ui_index,
    ui_file
))]
pub(super) struct Api;

#[derive(rust_embed::RustEmbed)]
#[folder = "web-ui/"]
struct WebUi;

pub fn routes(
    deps: Arc<OpsDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .and(with_gateway(deps.clone()))
        .map(|deps: Arc<OpsDeps>| healthz(&deps));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_gateway(deps.clone()))
        .map(|deps: Arc<OpsDeps>| metrics(&deps));
    let info = warp::path!("api" / "gateway")
        .and(warp::get())
        .and(with_gateway(deps))
        .map(|deps: Arc<OpsDeps>| respond(gateway_info(&deps)));
    let openapi = warp::path!("api" / "openapi.json")
        .and(warp::get())
        .map(super::openapi::reply);
    let root = warp::path::end().and(warp::get()).map(root);
    let ui = warp::path("ui")
        .and(warp::get())
        .and(warp::path::full())
        .and(warp::path::tail())
        .map(|full: warp::path::FullPath, tail: warp::path::Tail| {
            match (full.as_str(), tail.as_str()) {
                ("/ui", _) => ui(),
                (_, "") => ui_index(),
                (_, file) => ui_file(file),
            }
        });
    healthz
        .or(metrics)
        .unify()
        .or(info)
        .unify()
        .or(openapi)
        .unify()
        .or(root)
        .unify()
        .or(ui)
        .unify()
}

/// Liveness: the store answers a read.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "Up", body = Health)))]
fn healthz(deps: &OpsDeps) -> Response {
    match deps.common.store.view(|_| Ok(())) {
        Ok(_) => json_response(StatusCode::OK, &json!({"ok": true, "status": "ok"})),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Prometheus text exposition of the gateway's counters, gauges and histograms.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Metrics", content_type = "text/plain", body = String)))]
fn metrics(deps: &OpsDeps) -> Response {
    let mut text = deps.render_metrics();
    text.push_str(&deps.sync.render());
    let mut res = text.into_response();
    if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
        res.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    res
}

/// To the console.
#[utoipa::path(get, path = "/", tag = "ops",
    responses((status = 303, description = "See `/ui/`", headers(("location" = String)))))]
fn root() -> Response {
    warp::redirect::see_other(http::Uri::from_static("/ui/")).into_response()
}

/// To the console's index.
#[utoipa::path(get, path = "/ui", tag = "ops",
    responses((status = 308, description = "See `/ui/`", headers(("location" = String)))))]
fn ui() -> Response {
    warp::redirect::permanent(http::Uri::from_static("/ui/")).into_response()
}

/// The console.
#[utoipa::path(get, path = "/ui/", tag = "ops",
    responses((status = 200, description = "The console's HTML", content_type = "text/html", body = String)))]
fn ui_index() -> Response {
    ui_file("")
}

impl OpsDeps {
    /// The Prometheus text of `/metrics`.
    pub fn render_metrics(&self) -> String {
        let machines = self.common.store.view(machines::count).unwrap_or(0);
        let mut out = self.common.metrics.render(
            self.writer.stats(),
            &[
                (
                    "smgate_uptime_seconds",
                    "Seconds since start.",
                    self.started.elapsed().as_secs_f64(),
                ),
                (
                    "smgate_machines",
                    "Machines on this gateway.",
                    machines as f64,
                ),
                (
                    "smgate_process_resident_bytes",
                    "Resident set size of the process.",
                    crate::metrics::rss_bytes() as f64,
                ),
            ],
        );
        out.push_str(&self.mqtt.render());
        crate::metrics::counter(
            &mut out,
            "smgate_timers_fired_total",
            "Statechart timers fired by the timer task.",
            self.timers_fired.load(Ordering::Relaxed),
        );
        for (name, help, value) in [
            (
                "smgate_agent_ticks_total",
                "Agent ticks the ticker committed.",
                &self.agents.ticked,
            ),
            (
                "smgate_agent_ticks_skipped_total",
                "Agent ticks the ticker skipped (run ended, already ticked, payer cannot pay).",
                &self.agents.skipped,
            ),
            (
                "smgate_agent_ticker_overruns_total",
                "Ticker passes that returned after the next Zeqond began (a slow commit).",
                &self.agents.overruns,
            ),
        ] {
            crate::metrics::counter(&mut out, name, help, value.load(Ordering::Relaxed));
        }
        // One read transaction for the store-derived gauges; skipped (not zeroed) when the
        // store is unavailable, so a reopen does not look like an empty backlog.
        let from_store = self.common.store.view(|txn| {
            let timers = crate::instances::pending_timers(txn)?;
            let mut lag = Vec::new();
            for m in machines::all(txn)? {
                let size = crate::ledger::log::read::head(txn, &m.slug)?.map_or(0, |h| h.size);
                let acked = crate::sync::client::acked(txn, &m.slug)?.min(size);
                lag.push((m.slug.into(), (size - acked) as f64));
            }
            Ok((timers, lag))
        });
        if let Ok((timers, lag)) = from_store {
            let _ = writeln!(
                out,
                "# HELP smgate_timers_pending Statechart timers waiting to fire.\n# TYPE smgate_timers_pending gauge\nsmgate_timers_pending {timers}"
            );
            crate::metrics::labelled_gauge(
                &mut out,
                "smgate_sync_lag_rows",
                "Log rows not yet acknowledged by the upstream, per machine.",
                "machine",
                &lag,
            );
        }
        out
    }
}

/// The gateway's identity and version.
#[utoipa::path(operation_id = "gateway", get, path = "/api/gateway", tag = "ops",
    responses((status = 200, description = "Gateway", body = GatewayInfo)))]
fn gateway_info(deps: &OpsDeps) -> Result<Response, ApiError> {
    let machines = deps.common.store.view(machines::count)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "ok": true,
            "gateway_id": deps.identity.id,
            "public_key": crate::ledger::base64::encode(&deps.identity.public_key()),
            "verifier_key": deps.identity.verifier_key(),
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": clock::rfc3339(deps.started_ms),
            "uptime_seconds": deps.started.elapsed().as_secs(),
            "machines": machines,
            "region": deps.region,
        }),
    ))
}

/// A console file (the rest of the path, slashes included).
#[utoipa::path(get, path = "/ui/{path}", tag = "ops",
    params(("path" = String, Path, description = "File under web-ui/")),
    responses(
        (status = 200, description = "The file", content((String = "text/html"), (String = "text/javascript"), (String = "text/css"), (String = "image/svg+xml"), (serde_json::Value = "application/json"), (String = "application/octet-stream"))),
        (status = 404, description = "`not_found`"),
    ))]
fn ui_file(tail: &str) -> Response {
    let path = if tail.is_empty() { "index.html" } else { tail };
    let Some(file) = WebUi::get(path) else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such console file")
            .into_response();
    };
    let mime = match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    let mut res = Response::new(file.data.into_owned().into());
    let h = res.headers_mut();
    let set = |h: &mut http::HeaderMap, k: http::header::HeaderName, v: &str| {
        if let Ok(v) = v.parse() {
            h.insert(k, v);
        }
    };
    set(h, http::header::CONTENT_TYPE, mime);
    set(h, http::header::CACHE_CONTROL, "no-cache");
    set(h, http::header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, http::header::REFERRER_POLICY, "no-referrer");
    set(
        h,
        http::header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    );
    set(
        h,
        http::header::ETAG,
        &format!(
            "\"{}\"",
            crate::ledger::hex::encode(&file.metadata.sha256_hash())
        ),
    );
    res
}
