//! Spec 001 routes (machine pages) and the public site that serves them.
//!
//! API, zeq error shape:
//! - `GET  /api/state-machines/:slug/pages` — the machine's published pages (callers with a
//!   viewer key or better also see unpublished ones).
//! - `GET  /api/state-machines/:slug/pages/:page` — the live version with its HTML.
//! - `GET  /api/state-machines/:slug/pages/:page/history` — every version's metadata.
//! - `POST /api/state-machines/:slug/pages/:page/{publish,unpublish,rollback}`.
//!
//! Who may do what. Reads need no key, as spec 001 says ("reads of published pages are
//! public"), on private machines too: publishing *is* making a page public, and the reads show
//! only what was published (history shows metadata of versions that were each live once, never
//! HTML of anything but the live version). Non-owners' reads count against the machine's read
//! limit. Writes need the owner's account key or a machine key of role operator or admin (the
//! spin-up key is admin); viewers get 403.
//!
//! Public site, no key, no rate limit (it is the cheap, cached path):
//! - `/s/<slug>/` lists published pages; `/s/<slug>/p/<page>/` serves one (both also without
//!   the trailing slash, by a 308 redirect to the slash form, so relative links resolve).
//! - `/s/<slug>/state.json`: the machine's public instance states for page scripts.
//!
//! The site of a machine exists when the machine is public or has a published page.
//!
//! Page responses: `ETag: "<sha256 of the HTML>"` (the same tag for every encoding: they are
//! one content, precompressed), `If-None-Match` → 304, brotli or gzip by `Accept-Encoding`,
//! `Vary: Accept-Encoding`, `Cache-Control: no-cache` (always revalidate: a publish must show at
//! once), `X-Content-Type-Options: nosniff`, and [`PAGE_CSP`].

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use warp::reply::Response;
use warp::Filter;

use super::openapi::schema::{
    PageHistory, PageList, PageOne, PageWritten, PublishRequest, RollbackRequest, SiteState,
    ZeqError,
};
use super::PagesDeps;
use super::{
    bearer, body, json_response, parse_json, read_body, respond, with_gateway, Answer, ApiError,
    BodyStream,
};
use crate::auth::{Access, Principal, Slug};
use crate::clock;
use crate::ledger::hex;
use crate::machines::{self, Machine};
use crate::pages::{self, Draft, Encoded, PageError, PageSlug, Served};

/// The operations of this file, for `/api/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list,
    get_one,
    history,
    publish,
    unpublish,
    rollback,
    site_redirect,
    site_index,
    state_json,
    page_redirect,
    serve_page,
    site_head,
    site_index_head,
    site_state_head,
    site_page_head,
    site_page_slash_head
))]
pub(super) struct Api;

/// The policy of every published page.
///
/// - `sandbox allow-scripts allow-forms allow-popups`: scripts run, but without
///   `allow-same-origin` the document gets an *opaque origin*. It shares nothing with the
///   gateway's origin although it is served from it: `document.cookie` and `localStorage`
///   throw, and its requests carry `Origin: null` and no cookies, so the API (which
///   has no CORS) refuses to answer it and the console's credentials stay out of reach. No
///   `allow-top-navigation`, `allow-modals` or `allow-popups-to-escape-sandbox`: popups
///   inherit the sandbox.
/// - `default-src 'self' 'unsafe-inline' data:`: inline scripts and styles (pages are single
///   HTML documents) and the gateway's own files; nothing from other hosts.
/// - `connect-src 'self'`: `fetch` only back to the gateway, where the one endpoint that
///   answers opaque origins is the read-only `/s/<slug>/state.json`.
pub const PAGE_CSP: &str =
    "sandbox allow-scripts allow-forms allow-popups; default-src 'self' 'unsafe-inline' data:; connect-src 'self'";

/// The gateway's own HTML (the index): no scripts at all.
const INDEX_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Largest publish body: room for the HTML and script at their limits even when a client
/// escapes every character, without letting a body grow unbounded. Larger bodies get 413 before
/// being read.
pub const MAX_PUBLISH_BODY: u64 =
    2 * (pages::MAX_HTML_BYTES + pages::MAX_PYTHON_BYTES) as u64 + 64 * 1024;

pub fn routes(
    deps: Arc<PagesDeps>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let base = || warp::path!("api" / "state-machines" / String / "pages" / ..);
    let list = base()
        .and(warp::path::end())
        .and(warp::get())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .then(|slug, deps, bearer| async move { respond(list(deps, bearer, slug)) });
    let one = base()
        .and(warp::path!(String))
        .and(warp::get())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .then(|slug, page, deps, bearer| async move { respond(get_one(deps, bearer, slug, page)) });
    let history = base()
        .and(warp::path!(String / "history"))
        .and(warp::get())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .then(|slug, page, deps, bearer| async move { respond(history(deps, bearer, slug, page)) });
    let write = base()
        .and(warp::path!(String / String))
        .and(warp::post())
        .and(with_gateway(deps.clone()))
        .and(bearer())
        .and(body())
        .and_then(
            |slug: String, page: String, action: String, deps, bearer, len, body| async move {
                let w = PageWrite {
                    slug,
                    page,
                    declared: len,
                    body,
                };
                let answer = match action.as_str() {
                    "publish" => publish(deps, bearer, w).await,
                    "unpublish" => unpublish(deps, bearer, w).await,
                    "rollback" => rollback(deps, bearer, w).await,
                    _ => return Err(warp::reject::not_found()),
                };
                Ok::<_, warp::Rejection>(respond(answer))
            },
        );
    let site = warp::path("s")
        .and(warp::path::tail())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(with_gateway(deps))
        .and_then(
            |tail: warp::path::Tail,
             method: Method,
             headers: HeaderMap,
             query: String,
             deps: Arc<PagesDeps>| async move {
                if method != Method::GET && method != Method::HEAD {
                    return Err(warp::reject::not_found());
                }
                site(
                    &deps,
                    method == Method::HEAD,
                    tail.as_str(),
                    &headers,
                    &query,
                )
                .ok_or_else(warp::reject::not_found)
            },
        );
    list.or(one)
        .unify()
        .or(history)
        .unify()
        .or(write)
        .unify()
        .or(site)
        .unify()
}

impl From<PageError> for ApiError {
    fn from(e: PageError) -> ApiError {
        match e {
            PageError::Invalid { code, message } => ApiError::bad_request(code, message),
            PageError::TooLarge { field, limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("{field} is larger than {limit} bytes"),
            )
            .with("field", json!(field))
            .with("limit", json!(limit)),
            PageError::MachineNotFound => ApiError::machine_not_found(),
            PageError::PageNotFound => page_not_found(),
            PageError::VersionNotFound(v) => ApiError::new(
                StatusCode::NOT_FOUND,
                "version_not_found",
                format!("this page has no version {v}; see …/history for its versions"),
            ),
            PageError::NotPublished => ApiError::new(
                StatusCode::CONFLICT,
                "page_not_published",
                "the page is already offline; publish or roll back to bring it back",
            ),
            PageError::Store(s) => s.into(),
        }
    }
}

fn page_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "page_not_found",
        "this machine has no published page with that slug",
    )
}

fn page_slug(page: &str) -> Result<PageSlug, ApiError> {
    PageSlug::parse(page).ok_or_else(|| {
        ApiError::bad_request("invalid_page_slug", "pageSlug must match [a-z0-9-]{1,64}")
    })
}

/// A read: any caller, any existing machine (see the module doc). Non-owners are rate limited.
fn readable(
    deps: &PagesDeps,
    bearer: Option<&str>,
    slug: &str,
) -> Result<(Machine, Access), ApiError> {
    let principal = deps.common.principal(bearer)?;
    let machine = Slug::parse(slug)
        .map(|slug| deps.common.store.view(|txn| machines::get(txn, &slug)))
        .transpose()?
        .flatten()
        .ok_or_else(ApiError::machine_not_found)?;
    let access = machine.access(&principal);
    if access < Access::Owner {
        deps.limits
            .read
            .check(&machine.slug)
            .map_err(|s| deps.common.rate_limited(s))?;
    }
    Ok((machine, access))
}

fn page_url(slug: &str, page: &PageSlug) -> String {
    format!("/s/{slug}/p/{page}/")
}

/// The machine's published pages (viewers and above also see offline ones). No key needed.
#[utoipa::path(get, path = "/api/state-machines/{slug}/pages", tag = "pages",
    params(("slug" = String, Path, description = "Machine slug")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Pages", body = PageList),
        (status = 401, description = "`unauthorized`: unknown, revoked or expired key"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
fn list(deps: Arc<PagesDeps>, bearer: Option<String>, slug: String) -> Result<Response, ApiError> {
    let (machine, access) = readable(&deps, bearer.as_deref(), &slug)?;
    let slug = &machine.slug;
    let pages = deps.common.store.view(|txn| {
        let mut out = Vec::new();
        for (page, record) in pages::list(txn, slug)? {
            let shown = match record.live {
                Some(l) => {
                    pages::version(txn, slug, &page, l.version)?.map(|v| v.to_json(Some(&l)))
                }
                None if access >= Access::Viewer => Some(json!({"live": false})),
                None => None,
            };
            if let Some(mut v) = shown {
                if let Value::Object(o) = &mut v {
                    o.insert("pageSlug".into(), json!(page.as_str()));
                    o.insert("latestVersion".into(), json!(record.latest));
                    o.insert("url".into(), json!(page_url(slug, &page)));
                }
                out.push(v);
            }
        }
        Ok(out)
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "slug": slug, "count": pages.len(), "pages": pages}),
    ))
}

/// The live version of a page, with its HTML.
#[utoipa::path(get, path = "/api/state-machines/{slug}/pages/{page}", tag = "pages",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug, `[a-z0-9-]{1,64}`")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The live page", body = PageOne),
        (status = 400, description = "`invalid_page_slug`"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, `page_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
fn get_one(
    deps: Arc<PagesDeps>,
    bearer: Option<String>,
    slug: String,
    page: String,
) -> Result<Response, ApiError> {
    let (machine, _) = readable(&deps, bearer.as_deref(), &slug)?;
    let page = page_slug(&page)?;
    let slug = &machine.slug;
    let found = deps.common.store.view(|txn| {
        let Some((_, v)) = pages::live(txn, slug, &page)? else {
            return Ok(None);
        };
        let html = pages::blob(txn, &v.html_sha256, pages::IDENTITY)?.ok_or_else(|| {
            crate::store::StoreError::Corrupt(format!("page {slug}/{page}: HTML blob missing"))
        })?;
        Ok(Some((v, html)))
    })?;
    let (v, html) = found.ok_or_else(page_not_found)?;
    let html = String::from_utf8(html)
        .map_err(|_| crate::store::StoreError::Corrupt("page HTML is not UTF-8".into()))?;
    let mut dto = v.to_json(Some(&pages::Live {
        version: v.version,
        html_sha256: v.html_sha256,
    }));
    if let Value::Object(o) = &mut dto {
        o.insert("slug".into(), json!(slug));
        o.insert("pageSlug".into(), json!(page.as_str()));
        o.insert("url".into(), json!(page_url(slug, &page)));
        o.insert("html".into(), json!(html));
        o.insert("pythonScript".into(), json!(v.python_script));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"ok": true, "page": dto}),
    ))
}

/// Every version's metadata, newest first.
#[utoipa::path(get, path = "/api/state-machines/{slug}/pages/{page}/history", tag = "pages",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug")),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "History", body = PageHistory),
        (status = 400, description = "`invalid_page_slug`"),
        (status = 401, description = "`unauthorized`"),
        (status = 404, description = "`machine_not_found`, `page_not_found`, or `not_found`"),
        (status = 429, description = "`rate_limited`"),
    ))]
fn history(
    deps: Arc<PagesDeps>,
    bearer: Option<String>,
    slug: String,
    page: String,
) -> Result<Response, ApiError> {
    let (machine, _) = readable(&deps, bearer.as_deref(), &slug)?;
    let page = page_slug(&page)?;
    let slug = &machine.slug;
    let (record, versions) = deps.common.store.view(|txn| {
        Ok((
            pages::get(txn, slug, &page)?,
            pages::history(txn, slug, &page)?,
        ))
    })?;
    let record = record.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "page_not_found",
            "this machine has no page with that slug",
        )
    })?;
    let versions: Vec<Value> = versions
        .iter()
        .rev()
        .map(|v| v.to_json(record.live.as_ref()))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "ok": true,
            "slug": slug,
            "pageSlug": page.as_str(),
            "latestVersion": record.latest,
            "liveVersion": record.live.map(|l| l.version),
            "versions": versions,
        }),
    ))
}

// Path-only declarations of the three writes that `write` above dispatches by action, and of
// the public site (`site` dispatches by tail). Writes need the owner or an operator or admin key.

/// Publish a new version and make it live.
#[utoipa::path(post, path = "/api/state-machines/{slug}/pages/{page}/publish", tag = "pages",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug")),
    request_body = PublishRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Published", body = PageWritten),
        (status = 400, description = "`invalid_body`, `invalid_page_slug`, `invalid_title`, `invalid_html`, `invalid_agent_zid`, …"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`"),
        (status = 404, description = "`machine_not_found`, or `not_found`"),
        (status = 413, description = "`payload_too_large` (with `field`, `limit`)"),
        (status = 429, description = "`rate_limited`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn publish(deps: Arc<PagesDeps>, bearer: Option<String>, w: PageWrite) -> Answer {
    write(deps, bearer, w, Action::Publish).await
}

/// Take the page offline (its versions stay).
#[utoipa::path(post, path = "/api/state-machines/{slug}/pages/{page}/unpublish", tag = "pages",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug")),
    request_body(content = serde_json::Value, description = "Ignored; may be empty"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Offline", body = PageWritten),
        (status = 400, description = "`invalid_body`, `invalid_page_slug`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`"),
        (status = 404, description = "`machine_not_found`, `page_not_found`, or `not_found`"),
        (status = 409, description = "`page_not_published`"),
        (status = 413, description = "`payload_too_large`"),
        (status = 429, description = "`rate_limited`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn unpublish(deps: Arc<PagesDeps>, bearer: Option<String>, w: PageWrite) -> Answer {
    write(deps, bearer, w, Action::Unpublish).await
}

/// Make an earlier version live again (as a new version).
#[utoipa::path(post, path = "/api/state-machines/{slug}/pages/{page}/rollback", tag = "pages",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug")),
    request_body = RollbackRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Rolled back", body = PageWritten),
        (status = 400, description = "`invalid_body`, `invalid_page_slug`, `invalid_version`"),
        (status = 401, description = "`unauthorized`"),
        (status = 403, description = "`forbidden`"),
        (status = 404, description = "`machine_not_found`, `page_not_found`, `version_not_found`, or `not_found`"),
        (status = 413, description = "`payload_too_large`"),
        (status = 429, description = "`rate_limited`"),
        (status = 507, description = "`storage_full`"),
    ))]
async fn rollback(deps: Arc<PagesDeps>, bearer: Option<String>, w: PageWrite) -> Answer {
    write(deps, bearer, w, Action::Rollback).await
}

/// A write to one page, as its route extracted it.
struct PageWrite {
    slug: String,
    page: String,
    declared: Option<u64>,
    body: BodyStream,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Publish,
    Unpublish,
    Rollback,
}

async fn write(
    deps: Arc<PagesDeps>,
    bearer: Option<String>,
    w: PageWrite,
    action: Action,
) -> Result<Response, ApiError> {
    let PageWrite {
        slug,
        page,
        declared,
        body,
    } = w;
    let principal = deps.common.principal(bearer.as_deref())?;
    if principal == Principal::Anonymous {
        return Err(ApiError::unauthorized());
    }
    let (machine, access) = super::visible_machine(&deps.common, &principal, &slug)?;
    if access < Access::Operator {
        return Err(ApiError::forbidden(
            "publishing needs the machine owner's key or an operator or admin machine key",
        ));
    }
    let page = page_slug(&page)?;
    deps.limits
        .write
        .check(&machine.slug)
        .map_err(|s| deps.common.rate_limited(s))?;
    let limit = match action {
        Action::Publish => MAX_PUBLISH_BODY,
        _ => deps.max_json_bytes,
    };
    let bytes = read_body(declared, body, limit).await?;
    let body = parse_json(&bytes)?;
    drop(bytes);
    let (slug, actor) = (machine.slug.clone(), principal.actor());
    let url = page_url(&slug, &page);
    let (status, version, row) = match action {
        Action::Publish => {
            let draft = Draft::from_json(body)?;
            let encoded = encode_if_new(&deps, &draft).await?;
            let (slug, page) = (slug.clone(), page.clone());
            let p = deps
                .writer
                .write(move |txn| {
                    pages::publish(
                        txn,
                        &slug,
                        &page,
                        draft,
                        encoded.as_ref(),
                        &actor,
                        clock::now_ms(),
                    )
                })
                .await?;
            (StatusCode::CREATED, p.version, p.row)
        }
        Action::Rollback => {
            let from = match body.get("version") {
                Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
                    ApiError::bad_request("invalid_version", "version must be a positive integer")
                })?,
                None => {
                    return Err(ApiError::bad_request(
                        "invalid_version",
                        "give the version to roll back to: {\"version\": N}",
                    ))
                }
            };
            let (slug, page) = (slug.clone(), page.clone());
            let p = deps
                .writer
                .write(move |txn| pages::rollback(txn, &slug, &page, from, &actor, clock::now_ms()))
                .await?;
            (StatusCode::CREATED, p.version, p.row)
        }
        Action::Unpublish => {
            let (slug, page) = (slug.clone(), page.clone());
            let (v, row) = deps
                .writer
                .write(move |txn| pages::unpublish(txn, &slug, &page, &actor, clock::now_ms()))
                .await?;
            (StatusCode::OK, v, row)
        }
    };
    tracing::info!(slug = %machine.slug, page = %page, version = version.version, ?action, by = %principal.actor(), "page write");
    let live = !matches!(action, Action::Unpublish);
    let mut dto = version.to_json(live.then_some(&pages::Live {
        version: version.version,
        html_sha256: version.html_sha256,
    }));
    if let Value::Object(o) = &mut dto {
        o.insert("slug".into(), json!(slug));
        o.insert("pageSlug".into(), json!(page.as_str()));
        o.insert("url".into(), json!(url));
    }
    Ok(json_response(
        status,
        &json!({
            "ok": true,
            "version": version.version,
            "proof_digest": hex::encode(&version.proof_digest),
            "htmlSha256": hex::encode(&version.html_sha256),
            "url": url,
            "page": dto,
            "row": {"seq": row.seq, "type": row.kind, "hash": hex::encode(&row.hash)},
        }),
    ))
}

/// The page's HTML compressed for serving, unless the gateway already stores that content;
/// computed off the runtime.
async fn encode_if_new(deps: &PagesDeps, draft: &Draft) -> Result<Option<Encoded>, ApiError> {
    let sha = crate::auth::sha256(draft.html.as_bytes());
    if deps.common.store.view(|txn| pages::has_blob(txn, &sha))? {
        return Ok(None);
    }
    let html = draft.html.clone().into_bytes();
    let encoded = tokio::task::spawn_blocking(move || Encoded::compute(html))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Some(encoded))
}

// ---- the public site ------------------------------------------------------------------

fn set(h: &mut HeaderMap, name: header::HeaderName, value: &'static str) {
    h.insert(name, HeaderValue::from_static(value));
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut res = Response::new(text.into());
    *res.status_mut() = status;
    let h = res.headers_mut();
    set(h, header::CONTENT_TYPE, "text/plain; charset=utf-8");
    set(h, header::CACHE_CONTROL, "no-cache");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    res
}

/// The HEAD form of a GET response: its headers with the length it would have, no body.
/// (hyper strips HEAD bodies on HTTP/1.1 but not on HTTP/2, where a body is a protocol error.)
fn head_of(mut res: Response) -> Response {
    use hyper::body::Body as _;
    let len = res.body().size_hint().exact();
    *res.body_mut() = Bytes::new().into();
    if let (Some(n), true) = (len, res.status() != StatusCode::NOT_MODIFIED) {
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    res
}

fn redirect(to: String) -> Response {
    let mut res = Response::new(Bytes::new().into());
    *res.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&to) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// Routes `/s/…` (GET, or HEAD when `head`); `None` for paths that are not part of the site.
fn site(
    deps: &PagesDeps,
    head: bool,
    tail: &str,
    headers: &HeaderMap,
    query: &str,
) -> Option<Response> {
    let parts: Vec<&str> = tail.split('/').collect();
    let response = match (head, parts.as_slice()) {
        (false, [slug]) if !slug.is_empty() => site_redirect(slug, query),
        (true, [slug]) if !slug.is_empty() => site_head(slug, query),
        (false, [slug, ""]) => site_index(deps, slug, headers),
        (true, [slug, ""]) => site_index_head(deps, slug, headers),
        (false, [slug, "state.json"]) => state_json(deps, slug),
        (true, [slug, "state.json"]) => site_state_head(deps, slug),
        (false, [slug, "p", page]) if !page.is_empty() => page_redirect(slug, page, query),
        (true, [slug, "p", page]) if !page.is_empty() => site_page_head(slug, page, query),
        (false, [slug, "p", page, ""]) => serve_page(deps, slug, page, headers),
        (true, [slug, "p", page, ""]) => site_page_slash_head(deps, slug, page, headers),
        _ => return None,
    };
    Some(response)
}

/// `path` with the request's query string, if it had one.
fn with_query(path: String, query: &str) -> String {
    if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    }
}

/// To the slash form of the site index.
#[utoipa::path(operation_id = "site", get, path = "/s/{slug}", tag = "site",
    params(("slug" = String, Path, description = "Machine slug")),
    responses(
        (status = 308, description = "See `/s/{slug}/`", headers(("location" = String))),
        (status = 404, description = "No such route"),
    ))]
fn site_redirect(slug: &str, query: &str) -> Response {
    redirect(with_query(format!("/s/{slug}/"), query))
}

/// To the slash form of a page.
#[utoipa::path(operation_id = "site_page", get, path = "/s/{slug}/p/{page}", tag = "site",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug")),
    responses(
        (status = 308, description = "See `/s/{slug}/p/{page}/`", headers(("location" = String))),
        (status = 404, description = "No such route"),
    ))]
fn page_redirect(slug: &str, page: &str, query: &str) -> Response {
    redirect(with_query(format!("/s/{slug}/p/{page}/"), query))
}

// The HEAD forms: the GET answer's status and headers, without its body.

/// The HEAD forms of the site's routes: the GET response's status and headers, no body.
#[utoipa::path(head, path = "/s/{slug}", tag = "site",
    params(("slug" = String, Path, description = "Machine slug")),
    responses((status = 308, description = "See `/s/{slug}/`"), (status = 404, description = "No such route")))]
fn site_head(slug: &str, query: &str) -> Response {
    head_of(site_redirect(slug, query))
}

#[utoipa::path(head, path = "/s/{slug}/", tag = "site",
    params(("slug" = String, Path, description = "Machine slug")),
    responses((status = 200, description = "The index exists"), (status = 304, description = "Not modified"),
              (status = 404, description = "No such site")))]
fn site_index_head(deps: &PagesDeps, slug: &str, headers: &HeaderMap) -> Response {
    head_of(site_index(deps, slug, headers))
}

#[utoipa::path(head, path = "/s/{slug}/state.json", tag = "site",
    params(("slug" = String, Path, description = "Machine slug")),
    responses((status = 200, description = "The states exist"), (status = 404, description = "No such site")))]
fn site_state_head(deps: &PagesDeps, slug: &str) -> Response {
    head_of(state_json(deps, slug))
}

#[utoipa::path(head, path = "/s/{slug}/p/{page}", tag = "site",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug")),
    responses((status = 308, description = "See `/s/{slug}/p/{page}/`"), (status = 404, description = "No such route")))]
fn site_page_head(slug: &str, page: &str, query: &str) -> Response {
    head_of(page_redirect(slug, page, query))
}

#[utoipa::path(head, path = "/s/{slug}/p/{page}/", tag = "site",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug")),
    responses((status = 200, description = "The page exists"), (status = 304, description = "Not modified"),
              (status = 404, description = "No such page")))]
fn site_page_slash_head(deps: &PagesDeps, slug: &str, page: &str, headers: &HeaderMap) -> Response {
    head_of(serve_page(deps, slug, page, headers))
}

fn store_failure(e: crate::store::StoreError) -> Response {
    ApiError::from(e).into_response()
}

type Site = (Machine, Vec<(PageSlug, pages::PageVersion)>);

/// The machine and its published pages, when its site exists (public, or a published page).
fn site_machine(deps: &PagesDeps, slug: &str) -> Result<Option<Site>, crate::store::StoreError> {
    let Some(slug) = Slug::parse(slug) else {
        return Ok(None);
    };
    deps.common.store.view(|txn| {
        let Some(m) = machines::get(txn, &slug)? else {
            return Ok(None);
        };
        let published = pages::published(txn, &slug)?;
        Ok((m.is_public || !published.is_empty()).then_some((m, published)))
    })
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The site's index of published pages (no scripts).
#[utoipa::path(get, path = "/s/{slug}/", tag = "site",
    params(("slug" = String, Path, description = "Machine slug"),
           ("If-None-Match" = Option<String>, Header, description = "ETag(s) the client has")),
    responses(
        (status = 200, description = "The index", content_type = "text/html", body = String),
        (status = 304, description = "Not modified"),
        (status = 404, description = "No such site (or, JSON, no such route)", content((String = "text/plain"), (ZeqError = "application/json"))),
    ))]
fn site_index(deps: &PagesDeps, slug: &str, headers: &HeaderMap) -> Response {
    let (machine, published) = match site_machine(deps, slug) {
        Ok(Some(found)) => found,
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such site\n"),
        Err(e) => return store_failure(e),
    };
    let name = html_escape(machine.display_name.as_deref().unwrap_or(&machine.slug));
    let mut html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
<title>{name}</title><style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem}}</style></head>\
<body><h1>{name}</h1>\n"
    );
    if published.is_empty() {
        html.push_str("<p>No published pages.</p>\n");
    } else {
        html.push_str("<ul>\n");
        for (page, v) in &published {
            html.push_str(&format!(
                "<li><a href=\"p/{page}/\">{}</a> <small>v{} · {}</small></li>\n",
                html_escape(&v.title),
                v.version,
                clock::rfc3339(v.created_ms)
            ));
        }
        html.push_str("</ul>\n");
    }
    html.push_str("</body></html>\n");
    let sha = crate::auth::sha256(html.as_bytes());
    let etag = format!("\"{}\"", hex::encode(&sha));
    let mut res = if if_none_match(headers, &etag) {
        let mut r = Response::new(Bytes::new().into());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(html.into())
    };
    let h = res.headers_mut();
    set(h, header::CONTENT_TYPE, "text/html; charset=utf-8");
    set(h, header::CACHE_CONTROL, "no-cache");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::CONTENT_SECURITY_POLICY, INDEX_CSP);
    set(h, header::REFERRER_POLICY, "no-referrer");
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    res
}

/// `If-None-Match` with weak comparison (RFC 9110 §13.1.2): any listed tag, or `*`.
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
        })
}

/// The encoding to send: brotli, else gzip, when the client accepts it (q > 0) and it is
/// stored; else identity.
fn choose_encoding<'a>(
    headers: &HeaderMap,
    served: &'a Served,
) -> (Option<&'static str>, &'a Bytes) {
    let mut br = false;
    let mut gzip = false;
    for value in headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for item in value.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .or_else(|| p.trim().strip_prefix("Q="))
                })
                .filter_map(|q| q.trim().parse::<f32>().ok())
                .next()
                .unwrap_or(1.0);
            let ok = q > 0.0;
            match name.as_str() {
                "br" => br = ok,
                "gzip" | "x-gzip" => gzip = ok,
                "*" => {
                    br |= ok;
                    gzip |= ok;
                }
                _ => {}
            }
        }
    }
    match (&served.br, &served.gzip) {
        (Some(b), _) if br => (Some(pages::BR), b),
        (_, Some(g)) if gzip => (Some(pages::GZIP), g),
        _ => (None, &served.identity),
    }
}

/// A published page: brotli or gzip by `Accept-Encoding`, ETag, sandboxing CSP.
#[utoipa::path(operation_id = "site_page_slash", get, path = "/s/{slug}/p/{page}/", tag = "site",
    params(("slug" = String, Path, description = "Machine slug"), ("page" = String, Path, description = "Page slug"),
           ("If-None-Match" = Option<String>, Header, description = "ETag(s) the client has")),
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 304, description = "Not modified"),
        (status = 404, description = "No such page (or, JSON, no such route)", content((String = "text/plain"), (ZeqError = "application/json"))),
    ))]
fn serve_page(deps: &PagesDeps, slug: &str, page: &str, headers: &HeaderMap) -> Response {
    let (Some(slug), Some(page)) = (Slug::parse(slug), PageSlug::parse(page)) else {
        return plain(StatusCode::NOT_FOUND, "no such page\n");
    };
    let found = deps.common.store.view(|txn| {
        let Some(record) = pages::get(txn, &slug, &page)? else {
            return Ok(None);
        };
        let Some(live) = record.live else {
            return Ok(None);
        };
        pages::served(txn, &live.html_sha256)
    });
    let served = match found {
        Ok(Some(s)) => s,
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such page\n"),
        Err(e) => return store_failure(e),
    };
    let etag = format!("\"{}\"", hex::encode(&served.sha256));
    let mut res = if if_none_match(headers, &etag) {
        let mut r = Response::new(Bytes::new().into());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let (encoding, bytes) = choose_encoding(headers, &served);
        let mut r = Response::new(bytes.clone().into());
        if let Some(e) = encoding {
            set(r.headers_mut(), header::CONTENT_ENCODING, e);
        }
        set(
            r.headers_mut(),
            header::CONTENT_TYPE,
            "text/html; charset=utf-8",
        );
        r
    };
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    set(h, header::VARY, "Accept-Encoding");
    set(h, header::CACHE_CONTROL, "no-cache");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::CONTENT_SECURITY_POLICY, PAGE_CSP);
    set(h, header::REFERRER_POLICY, "no-referrer");
    res
}

/// Public instance states for page scripts; any origin, no credentials.
#[utoipa::path(operation_id = "site_state", get, path = "/s/{slug}/state.json", tag = "site",
    params(("slug" = String, Path, description = "Machine slug")),
    responses(
        (status = 200, description = "States", body = SiteState),
        (status = 404, description = "No such site (or, JSON, no such route)", content((String = "text/plain"), (ZeqError = "application/json"))),
    ))]
fn state_json(deps: &PagesDeps, slug: &str) -> Response {
    // One `{instance, ts, state, publicContext, tags, done}` per instance: the public view
    // (context.public and nothing else of the context), never the admin view.
    let states = match site_machine(deps, slug) {
        Ok(Some((m, _))) => deps.common.store.view(|txn| {
            match crate::instances::public_states(txn, &deps.charts, &m.slug) {
                Err(crate::instances::InstanceError::Store(e)) => Err(e),
                other => Ok(other),
            }
        }),
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such site\n"),
        Err(e) => return store_failure(e),
    };
    let mut res = match states {
        Ok(Ok(instances)) => json_response(
            StatusCode::OK,
            &json!({"slug": slug, "instances": instances}),
        ),
        Ok(Err(e)) => {
            tracing::error!(slug, error = %e, "public states of a site");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "public states unavailable\n",
            )
        }
        Err(e) => store_failure(e),
    };
    let h = res.headers_mut();
    set(h, header::ACCESS_CONTROL_ALLOW_ORIGIN, "*");
    set(h, header::CACHE_CONTROL, "no-cache");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn accept_encoding_prefers_brotli_and_honours_q_zero() {
        let s = Served {
            sha256: [0; 32],
            identity: Bytes::from_static(b"i"),
            gzip: Some(Bytes::from_static(b"g")),
            br: Some(Bytes::from_static(b"b")),
        };
        let pick = |h: &[(&'static str, &'static str)]| choose_encoding(&headers(h), &s).0;
        assert_eq!(pick(&[]), None);
        assert_eq!(
            pick(&[("accept-encoding", "gzip, deflate, br")]),
            Some("br")
        );
        assert_eq!(pick(&[("accept-encoding", "gzip")]), Some("gzip"));
        assert_eq!(
            pick(&[("accept-encoding", "br;q=0, gzip;q=0.5")]),
            Some("gzip")
        );
        assert_eq!(pick(&[("accept-encoding", "*")]), Some("br"));
        assert_eq!(pick(&[("accept-encoding", "identity")]), None);
        let only_gzip = Served { br: None, ..s };
        assert_eq!(
            choose_encoding(&headers(&[("accept-encoding", "br, gzip")]), &only_gzip).0,
            Some("gzip")
        );
    }

    #[test]
    fn if_none_match_uses_weak_comparison_and_lists() {
        let tag = "\"abc\"";
        assert!(if_none_match(
            &headers(&[("if-none-match", "\"abc\"")]),
            tag
        ));
        assert!(if_none_match(
            &headers(&[("if-none-match", "\"x\", W/\"abc\"")]),
            tag
        ));
        assert!(if_none_match(&headers(&[("if-none-match", "*")]), tag));
        assert!(!if_none_match(
            &headers(&[("if-none-match", "\"abd\"")]),
            tag
        ));
        assert!(!if_none_match(&headers(&[]), tag));
    }
}
