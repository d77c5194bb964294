//! Machine pages (spec 001): versioned HTML publishing with proof digests, and what public
//! serving needs (content-addressed blobs with their precomputed encodings).
//!
//! # Model
//! A machine hosts pages named by a [`PageSlug`]. Each publish inserts an immutable
//! [`PageVersion`] numbered 1, 2, … with no gaps, and makes it the live one (the previous live
//! version goes offline). Unpublish takes the page offline without touching any version;
//! rollback re-publishes an earlier version's content as a *new* version n+1, so history only
//! grows. Which version is live is kept in the page's [`Page`] record, never in the version,
//! so versions are written once and never rewritten.
//!
//! # Storage (tables created in `Store::ensure_schema`)
//! - `pages`: (machine slug, page slug) → [`Page`] (latest version number, live version).
//! - `page_versions`: (machine slug, page slug, version) → [`PageVersion`] (metadata, never HTML).
//! - `page_blobs`: (SHA-256 of the HTML, encoding) → bytes, for encodings `identity`, `gzip`
//!   and `br`. HTML is stored once per distinct content, whatever number of versions, pages or
//!   machines use it, so a rollback copies nothing. The compressed forms are made once, when a
//!   content is first published, and only kept when smaller than the HTML itself.
//!
//! # Invariants
//! - For a page with `latest = n`, versions 1..=n exist and no others.
//! - `live`, when set, names an existing version and carries that version's HTML hash.
//! - Every version's `identity` blob exists.
//! - Each write appends exactly one log row (`deploy_published`, `page_unpublished`,
//!   `page_rolled_back`) in the same transaction; the row carries the version's hashes and
//!   title, never the HTML.
//!
//! Write functions run inside the writer's shared transaction, so they read and check
//! everything first and return `Err` before their first write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::auth::{sha256, Slug};
use crate::ledger::hex;
use crate::ledger::log::{self, Entry};
use crate::machines::Machine;
use crate::store::{self, StoreError, MACHINES};

/// (machine slug, page slug) → [`Page`].
pub const PAGES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("pages");
/// (machine slug, page slug, version) → [`PageVersion`].
pub const PAGE_VERSIONS: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("page_versions");
/// (SHA-256 of the HTML, encoding name) → bytes.
pub const PAGE_BLOBS: TableDefinition<(&[u8], &str), &[u8]> = TableDefinition::new("page_blobs");

/// This module's tables, for [`store::StoreOptions::tables`].
pub const TABLES: store::Tables = store::Tables {
    create: |txn| {
        txn.open_table(PAGES)?;
        txn.open_table(PAGE_VERSIONS)?;
        txn.open_table(PAGE_BLOBS)?;
        Ok(())
    },
    migrate: None,
};

/// Largest HTML accepted: 2 MiB of UTF-8.
pub const MAX_HTML_BYTES: usize = 2 * 1024 * 1024;
/// Largest `pythonScript` accepted: 256 KiB of UTF-8.
pub const MAX_PYTHON_BYTES: usize = 256 * 1024;
/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("{field} is larger than {limit} bytes")]
    TooLarge { field: &'static str, limit: usize },
    #[error("no such machine")]
    MachineNotFound,
    #[error("this machine has no page with that slug")]
    PageNotFound,
    #[error("this page has no version {0}")]
    VersionNotFound(u64),
    #[error("the page is not published")]
    NotPublished,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(code: &'static str, message: impl Into<String>) -> PageError {
    PageError::Invalid {
        code,
        message: message.into(),
    }
}

/// A page's name within its machine: `[a-z0-9-]{1,64}`, the machine slug rule, so that it is
/// one URL path segment that needs no escaping and reads the same everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageSlug(String);

impl PageSlug {
    pub fn parse(s: &str) -> Option<PageSlug> {
        Slug::parse(s).map(|s| PageSlug(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PageSlug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `^ZEQ[0-9A-Za-z-]{3,28}$`: the publishing agent's ZID as spec 001 spells it.
pub fn valid_agent_zid(s: &str) -> bool {
    s.strip_prefix("ZEQ").is_some_and(|rest| {
        (3..=28).contains(&rest.len())
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// The live version of a page and its HTML hash (denormalised, so serving is one lookup).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Live {
    pub version: u64,
    pub html_sha256: [u8; 32],
}

/// A page's record: how many versions it has and which one is live.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page {
    pub latest: u64,
    pub live: Option<Live>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// How a version came to be.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Origin {
    Publish,
    Rollback { from: u64 },
}

/// One immutable version of a page. The HTML is in `page_blobs` under `html_sha256`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageVersion {
    pub version: u64,
    pub title: String,
    pub html_sha256: [u8; 32],
    pub html_bytes: u64,
    pub agent_zid: String,
    /// Stored and returned, never executed.
    pub python_script: Option<String>,
    pub proof_digest: [u8; 32],
    pub origin: Origin,
    pub actor: String,
    pub created_ms: i64,
}

impl PageVersion {
    /// The API view of this version's metadata (no HTML).
    pub fn to_json(&self, live: Option<&Live>) -> Value {
        let mut v = json!({
            "version": self.version,
            "title": self.title,
            "htmlSha256": hex::encode(&self.html_sha256),
            "htmlBytes": self.html_bytes,
            "agentZid": self.agent_zid,
            "proof_digest": hex::encode(&self.proof_digest),
            "hasPythonScript": self.python_script.is_some(),
            "publishedAt": crate::clock::rfc3339(self.created_ms),
            "live": live.is_some_and(|l| l.version == self.version),
        });
        if let (Origin::Rollback { from }, Value::Object(o)) = (self.origin, &mut v) {
            o.insert("rolledBackFrom".into(), json!(from));
        }
        v
    }
}

/// `sha256(slug|pageSlug|sha256(html)|version|ownerZid)` (spec 001), with the HTML hash in
/// lowercase hex and the version in decimal.
pub fn proof_digest(
    slug: &str,
    page: &str,
    html_sha256: &[u8; 32],
    version: u64,
    owner_zid: &str,
) -> [u8; 32] {
    let text = format!(
        "{slug}|{page}|{}|{version}|{owner_zid}",
        hex::encode(html_sha256)
    );
    sha256(text.as_bytes())
}

/// A validated publish request.
#[derive(Debug, Clone)]
pub struct Draft {
    pub title: String,
    pub html: String,
    pub agent_zid: String,
    pub python_script: Option<String>,
}

impl Draft {
    /// Validates a publish body field by field, each with its own code. Size limits are
    /// [`PageError::TooLarge`] (HTTP 413); everything else is [`PageError::Invalid`] (400).
    pub fn from_json(body: Value) -> Result<Draft, PageError> {
        let Value::Object(mut body) = body else {
            return Err(invalid("invalid_body", "the body must be a JSON object"));
        };
        let mut take = |field: &str| body.remove(field).filter(|v| !v.is_null());
        let title = match take("title") {
            Some(Value::String(t)) if (1..=MAX_TITLE_CHARS).contains(&t.chars().count()) => t,
            _ => {
                return Err(invalid(
                    "invalid_title",
                    format!("title must be a string of 1–{MAX_TITLE_CHARS} characters"),
                ))
            }
        };
        let html = match take("html") {
            Some(Value::String(h)) if h.len() > MAX_HTML_BYTES => {
                return Err(PageError::TooLarge {
                    field: "html",
                    limit: MAX_HTML_BYTES,
                })
            }
            Some(Value::String(h)) if !h.is_empty() => h,
            _ => {
                return Err(invalid(
                    "invalid_html",
                    "html must be a non-empty string of plaintext HTML (at most 2 MiB)",
                ))
            }
        };
        let agent_zid = match take("agentZid") {
            Some(Value::String(z)) if valid_agent_zid(&z) => z,
            _ => {
                return Err(invalid(
                    "invalid_agent_zid",
                    "agentZid must match ^ZEQ[0-9A-Za-z-]{3,28}$",
                ))
            }
        };
        let python_script = match take("pythonScript") {
            None => None,
            Some(Value::String(p)) if p.len() > MAX_PYTHON_BYTES => {
                return Err(PageError::TooLarge {
                    field: "pythonScript",
                    limit: MAX_PYTHON_BYTES,
                })
            }
            Some(Value::String(p)) => Some(p),
            Some(_) => {
                return Err(invalid(
                    "invalid_python_script",
                    "pythonScript must be a string (at most 256 KiB)",
                ))
            }
        };
        Ok(Draft {
            title,
            html,
            agent_zid,
            python_script,
        })
    }
}

/// HTML and its compressed forms, made once per distinct content.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub sha256: [u8; 32],
    pub identity: Vec<u8>,
    pub gzip: Option<Vec<u8>>,
    pub br: Option<Vec<u8>>,
}

/// Encoding names as stored and as sent in `Content-Encoding`.
pub const IDENTITY: &str = "identity";
pub const GZIP: &str = "gzip";
pub const BR: &str = "br";

impl Encoded {
    /// Compresses `html` with gzip (level 6) and brotli (quality 7, 4 MiB window), the two on
    /// their own threads. CPU-bound: call it off the async runtime. The levels give nearly the
    /// highest levels' sizes in a fraction of their time (figures: docs/performance.md, "Figures
    /// from code comments"); brotli 11 would take seconds per publish on a gateway. It is paid
    /// once per distinct content.
    pub fn compute(html: Vec<u8>) -> Encoded {
        use std::io::Write;
        let sha256 = sha256(&html);
        let gzip = || {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(html.len() / 3),
                flate2::Compression::new(6),
            );
            enc.write_all(&html).and_then(|_| enc.finish()).ok()
        };
        let br = || {
            let params = brotli::enc::BrotliEncoderParams {
                quality: 7,
                lgwin: 22,
                ..Default::default()
            };
            let mut out = Vec::with_capacity(html.len() / 3);
            brotli::BrotliCompress(&mut html.as_slice(), &mut out, &params)
                .ok()
                .map(|_| out)
        };
        let (gzip, br) = std::thread::scope(|s| {
            let g = s.spawn(gzip);
            let b = br();
            (g.join().ok().flatten(), b)
        });
        let smaller = |c: Option<Vec<u8>>| c.filter(|c| c.len() < html.len());
        Encoded {
            sha256,
            gzip: smaller(gzip),
            br: smaller(br),
            identity: html,
        }
    }
}

/// What a publish or rollback made.
#[derive(Debug, Clone)]
pub struct Published {
    pub version: PageVersion,
    pub row: crate::ledger::Row,
}

fn owner_of(txn: &WriteTransaction, slug: &Slug) -> Result<Machine, PageError> {
    let machines = txn.open_table(MACHINES).map_err(StoreError::from)?;
    let m = machines.get(slug.as_str()).map_err(StoreError::from)?;
    m.map(|v| store::decode::<Machine>(v.value()))
        .transpose()?
        .ok_or(PageError::MachineNotFound)
}

fn page_in(
    txn: &WriteTransaction,
    slug: &Slug,
    page: &PageSlug,
) -> Result<Option<Page>, StoreError> {
    let pages = txn.open_table(PAGES)?;
    let v = pages.get((slug.as_str(), page.as_str()))?;
    v.map(|v| store::decode(v.value())).transpose()
}

fn version_in(
    txn: &WriteTransaction,
    slug: &Slug,
    page: &PageSlug,
    version: u64,
) -> Result<Option<PageVersion>, StoreError> {
    let versions = txn.open_table(PAGE_VERSIONS)?;
    let v = versions.get((slug.as_str(), page.as_str(), version))?;
    v.map(|v| store::decode(v.value())).transpose()
}

fn has_blob_in(txn: &WriteTransaction, sha: &[u8; 32]) -> Result<bool, StoreError> {
    Ok(txn
        .open_table(PAGE_BLOBS)?
        .get((sha.as_slice(), IDENTITY))?
        .is_some())
}

fn row_payload(
    kind_extra: Option<(&str, Value)>,
    slug: &Slug,
    page: &PageSlug,
    v: &PageVersion,
) -> Value {
    let mut m = Map::new();
    m.insert("slug".into(), json!(slug));
    m.insert("pageSlug".into(), json!(page.as_str()));
    m.insert("version".into(), json!(v.version));
    m.insert("html_sha256".into(), json!(hex::encode(&v.html_sha256)));
    m.insert("proof_digest".into(), json!(hex::encode(&v.proof_digest)));
    m.insert("title".into(), json!(v.title));
    m.insert("agentZid".into(), json!(v.agent_zid));
    if let Some((k, val)) = kind_extra {
        m.insert(k.into(), val);
    }
    Value::Object(m)
}

/// Writes version `v` as the new live version of `page` and appends its row.
fn install(
    txn: &WriteTransaction,
    slug: &Slug,
    page: &PageSlug,
    previous: Option<Page>,
    version: PageVersion,
    entry: Entry,
    now_ms: i64,
) -> Result<Published, PageError> {
    let record = Page {
        latest: version.version,
        live: Some(Live {
            version: version.version,
            html_sha256: version.html_sha256,
        }),
        created_ms: previous.as_ref().map_or(now_ms, |p| p.created_ms),
        updated_ms: now_ms,
    };
    txn.open_table(PAGE_VERSIONS)
        .map_err(StoreError::from)?
        .insert(
            (slug.as_str(), page.as_str(), version.version),
            store::encode(&version).as_slice(),
        )
        .map_err(StoreError::from)?;
    txn.open_table(PAGES)
        .map_err(StoreError::from)?
        .insert(
            (slug.as_str(), page.as_str()),
            store::encode(&record).as_slice(),
        )
        .map_err(StoreError::from)?;
    let row = log::append(txn, slug, entry, now_ms)?;
    Ok(Published { version, row })
}

/// Publishes `draft` as version n+1 of `page` and makes it live; appends `deploy_published`.
/// `encoded` must be `Encoded::compute(draft.html)` (its blobs are stored if new); when the
/// caller knows the content is already stored it may pass `None`.
pub fn publish(
    txn: &WriteTransaction,
    slug: &Slug,
    page: &PageSlug,
    draft: Draft,
    encoded: Option<&Encoded>,
    actor: &str,
    now_ms: i64,
) -> Result<Published, PageError> {
    // Validate: the machine, the page record, and that the content is (or will be) stored.
    let machine = owner_of(txn, slug)?;
    let previous = page_in(txn, slug, page)?;
    let html_sha256 = encoded.map_or_else(|| sha256(draft.html.as_bytes()), |e| e.sha256);
    if encoded.is_some_and(|e| e.identity != draft.html.as_bytes()) {
        return Err(
            StoreError::Corrupt("publish: encodings do not belong to this HTML".into()).into(),
        );
    }
    let stored = has_blob_in(txn, &html_sha256)?;
    if !stored && encoded.is_none() {
        return Err(
            StoreError::Corrupt("publish: new content given without its encodings".into()).into(),
        );
    }
    let number = previous.as_ref().map_or(1, |p| p.latest + 1);
    let version = PageVersion {
        version: number,
        proof_digest: proof_digest(
            slug,
            page.as_str(),
            &html_sha256,
            number,
            machine.owner_zid.as_str(),
        ),
        title: draft.title,
        html_sha256,
        html_bytes: draft.html.len() as u64,
        agent_zid: draft.agent_zid,
        python_script: draft.python_script,
        origin: Origin::Publish,
        actor: actor.to_owned(),
        created_ms: now_ms,
    };
    // Apply.
    if let (false, Some(e)) = (stored, encoded) {
        let mut blobs = txn.open_table(PAGE_BLOBS).map_err(StoreError::from)?;
        let key = e.sha256.as_slice();
        blobs
            .insert((key, IDENTITY), e.identity.as_slice())
            .map_err(StoreError::from)?;
        if let Some(g) = &e.gzip {
            blobs
                .insert((key, GZIP), g.as_slice())
                .map_err(StoreError::from)?;
        }
        if let Some(b) = &e.br {
            blobs
                .insert((key, BR), b.as_slice())
                .map_err(StoreError::from)?;
        }
    }
    let entry = Entry::json(
        "deploy_published",
        actor,
        &row_payload(None, slug, page, &version),
    );
    install(txn, slug, page, previous, version, entry, now_ms)
}

/// Takes `page` offline; appends `page_unpublished`. Returns the version that was live.
pub fn unpublish(
    txn: &WriteTransaction,
    slug: &Slug,
    page: &PageSlug,
    actor: &str,
    now_ms: i64,
) -> Result<(PageVersion, crate::ledger::Row), PageError> {
    owner_of(txn, slug)?;
    let mut record = page_in(txn, slug, page)?.ok_or(PageError::PageNotFound)?;
    let live = record.live.ok_or(PageError::NotPublished)?;
    let version = version_in(txn, slug, page, live.version)?.ok_or_else(|| {
        StoreError::Corrupt(format!(
            "page {slug}/{page}: live version {} is missing",
            live.version
        ))
    })?;
    record.live = None;
    record.updated_ms = now_ms;
    txn.open_table(PAGES)
        .map_err(StoreError::from)?
        .insert(
            (slug.as_str(), page.as_str()),
            store::encode(&record).as_slice(),
        )
        .map_err(StoreError::from)?;
    let payload = row_payload(None, slug, page, &version);
    let row = log::append(
        txn,
        slug,
        Entry::json("page_unpublished", actor, &payload),
        now_ms,
    )?;
    Ok((version, row))
}

/// Re-publishes version `from` of `page` as a new version n+1 (same content, title, agent and
/// script; a new proof digest for the new number); appends `page_rolled_back`.
pub fn rollback(
    txn: &WriteTransaction,
    slug: &Slug,
    page: &PageSlug,
    from: u64,
    actor: &str,
    now_ms: i64,
) -> Result<Published, PageError> {
    let machine = owner_of(txn, slug)?;
    let previous = page_in(txn, slug, page)?.ok_or(PageError::PageNotFound)?;
    let source = version_in(txn, slug, page, from)?.ok_or(PageError::VersionNotFound(from))?;
    if !has_blob_in(txn, &source.html_sha256)? {
        return Err(StoreError::Corrupt(format!(
            "page {slug}/{page} v{from}: its HTML blob is missing"
        ))
        .into());
    }
    let number = previous.latest + 1;
    let version = PageVersion {
        version: number,
        proof_digest: proof_digest(
            slug,
            page.as_str(),
            &source.html_sha256,
            number,
            machine.owner_zid.as_str(),
        ),
        origin: Origin::Rollback { from },
        actor: actor.to_owned(),
        created_ms: now_ms,
        ..source
    };
    let payload = row_payload(Some(("from_version", json!(from))), slug, page, &version);
    let entry = Entry::json("page_rolled_back", actor, &payload);
    install(txn, slug, page, Some(previous), version, entry, now_ms)
}

/// Opens a table for reading; a database made before the table existed reads as empty.
fn read_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn get(
    txn: &ReadTransaction,
    slug: &Slug,
    page: &PageSlug,
) -> Result<Option<Page>, StoreError> {
    let Some(t) = read_table(txn, PAGES)? else {
        return Ok(None);
    };
    let v = t.get((slug.as_str(), page.as_str()))?;
    v.map(|v| store::decode(v.value())).transpose()
}

pub fn version(
    txn: &ReadTransaction,
    slug: &Slug,
    page: &PageSlug,
    version: u64,
) -> Result<Option<PageVersion>, StoreError> {
    let Some(t) = read_table(txn, PAGE_VERSIONS)? else {
        return Ok(None);
    };
    let v = t.get((slug.as_str(), page.as_str(), version))?;
    v.map(|v| store::decode(v.value())).transpose()
}

/// The page and its live version, when it is published.
pub fn live(
    txn: &ReadTransaction,
    slug: &Slug,
    page: &PageSlug,
) -> Result<Option<(Page, PageVersion)>, StoreError> {
    let Some(record) = get(txn, slug, page)? else {
        return Ok(None);
    };
    let Some(l) = record.live else {
        return Ok(None);
    };
    let v = version(txn, slug, page, l.version)?.ok_or_else(|| {
        StoreError::Corrupt(format!(
            "page {slug}/{page}: live version {} is missing",
            l.version
        ))
    })?;
    Ok(Some((record, v)))
}

/// Every version of `page`, oldest first.
pub fn history(
    txn: &ReadTransaction,
    slug: &Slug,
    page: &PageSlug,
) -> Result<Vec<PageVersion>, StoreError> {
    let Some(t) = read_table(txn, PAGE_VERSIONS)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in
        t.range((slug.as_str(), page.as_str(), 0)..=(slug.as_str(), page.as_str(), u64::MAX))?
    {
        let (_, v) = entry?;
        out.push(store::decode(v.value())?);
    }
    Ok(out)
}

/// Every page of machine `slug` in page-slug order, with its record.
pub fn list(txn: &ReadTransaction, slug: &Slug) -> Result<Vec<(PageSlug, Page)>, StoreError> {
    let Some(t) = read_table(txn, PAGES)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in t.range((slug.as_str(), "")..)? {
        let (k, v) = entry?;
        let (s, p) = k.value();
        if s != slug.as_str() {
            break;
        }
        out.push((PageSlug(p.to_owned()), store::decode(v.value())?));
    }
    Ok(out)
}

/// The pages of `slug` that are live, with their live versions.
pub fn published(
    txn: &ReadTransaction,
    slug: &Slug,
) -> Result<Vec<(PageSlug, PageVersion)>, StoreError> {
    let mut out = Vec::new();
    for (page, record) in list(txn, slug)? {
        if let Some(l) = record.live {
            if let Some(v) = version(txn, slug, &page, l.version)? {
                out.push((page, v));
            }
        }
    }
    Ok(out)
}

/// Stored bytes of content `sha` in `encoding` ([`IDENTITY`], [`GZIP`] or [`BR`]).
pub fn blob(
    txn: &ReadTransaction,
    sha: &[u8; 32],
    encoding: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let Some(t) = read_table(txn, PAGE_BLOBS)? else {
        return Ok(None);
    };
    let v = t.get((sha.as_slice(), encoding))?;
    Ok(v.map(|v| v.value().to_vec()))
}

pub fn has_blob(txn: &ReadTransaction, sha: &[u8; 32]) -> Result<bool, StoreError> {
    let Some(t) = read_table(txn, PAGE_BLOBS)? else {
        return Ok(false);
    };
    Ok(t.get((sha.as_slice(), IDENTITY))?.is_some())
}

/// A content's bytes in each stored encoding, shared between requests.
#[derive(Debug)]
pub struct Served {
    pub sha256: [u8; 32],
    pub identity: bytes::Bytes,
    pub gzip: Option<bytes::Bytes>,
    pub br: Option<bytes::Bytes>,
}

/// Bytes of contents kept in memory for serving. Contents are immutable (addressed by their
/// hash), so the cache never needs invalidating; it only needs a bound. Boards have 256 MB.
const CACHE_BYTES: usize = 16 << 20;

struct Cache {
    entries: HashMap<[u8; 32], Arc<Served>>,
    bytes: usize,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        Mutex::new(Cache {
            entries: HashMap::new(),
            bytes: 0,
        })
    })
}

/// The stored encodings of content `sha`, from memory when recently served.
pub fn served(txn: &ReadTransaction, sha: &[u8; 32]) -> Result<Option<Arc<Served>>, StoreError> {
    if let Some(hit) = cache()
        .lock()
        .ok()
        .and_then(|c| c.entries.get(sha).cloned())
    {
        return Ok(Some(hit));
    }
    let Some(identity) = blob(txn, sha, IDENTITY)? else {
        return Ok(None);
    };
    let served = Arc::new(Served {
        sha256: *sha,
        identity: identity.into(),
        gzip: blob(txn, sha, GZIP)?.map(Into::into),
        br: blob(txn, sha, BR)?.map(Into::into),
    });
    let size = served.identity.len()
        + served.gzip.as_ref().map_or(0, |b| b.len())
        + served.br.as_ref().map_or(0, |b| b.len());
    if let Ok(mut c) = cache().lock() {
        if size <= CACHE_BYTES / 4 {
            // Crude bound: when full, start over. Serving keeps the working set warm again.
            if c.bytes + size > CACHE_BYTES {
                c.entries.clear();
                c.bytes = 0;
            }
            if c.entries.insert(*sha, served.clone()).is_none() {
                c.bytes += size;
            }
        }
    }
    Ok(Some(served))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_slug_rule_is_the_machine_slug_rule() {
        assert!(PageSlug::parse("hello").is_some());
        assert!(PageSlug::parse("a-1").is_some());
        assert!(PageSlug::parse(&"a".repeat(64)).is_some());
        for bad in ["", "Hello", "a_b", "a/b", "a.b", "..", "é", &"a".repeat(65)] {
            assert!(PageSlug::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn agent_zid_follows_the_spec_pattern() {
        assert!(valid_agent_zid("ZEQ07491829374"));
        assert!(valid_agent_zid("ZEQabc"));
        assert!(valid_agent_zid(&format!("ZEQ{}", "a-".repeat(14))));
        for bad in [
            "ZEQab",
            "zeq123",
            "ZEQ12_3",
            "ZEQ",
            &format!("ZEQ{}", "1".repeat(29)),
            "XZEQ123",
            "ZEQ12 3",
        ] {
            assert!(!valid_agent_zid(bad), "{bad:?}");
        }
    }

    /// Vectors computed independently with Python:
    /// `hashlib.sha256(b"|".join([b"fleet", b"hello", hashlib.sha256(html).hexdigest().encode(),
    ///  b"1", b"ZEQ07491829374"])).hexdigest()`.
    #[test]
    fn proof_digest_matches_independent_vectors() {
        let html = b"<!doctype html><h1>hello</h1>";
        let h = sha256(html);
        assert_eq!(
            hex::encode(&h),
            "12abe7e692c09087602ee113adf9eac0f5c36601145000cb2ebe205452a6c0ed"
        );
        assert_eq!(
            hex::encode(&proof_digest("fleet", "hello", &h, 1, "ZEQ07491829374")),
            "589f027557530917bdac7b99cd4b2644f7dfbf57223dc7d7e6cd21cd37638f1f"
        );
        assert_eq!(
            hex::encode(&proof_digest("fleet", "hello", &h, 12, "ZEQ07491829374")),
            "43f802f19c47f453427897817bfc6712994652b36fd30375e1293f91e8dfd1d8"
        );
    }

    #[test]
    fn draft_fields_have_their_own_codes() {
        let ok = json!({"title": "T", "html": "<p>x</p>", "agentZid": "ZEQ123"});
        assert!(Draft::from_json(ok.clone()).is_ok());
        let code = |patch: Value| {
            let mut b = ok.clone();
            for (k, v) in patch.as_object().unwrap() {
                b[k] = v.clone();
            }
            match Draft::from_json(b) {
                Err(PageError::Invalid { code, .. }) => code,
                Err(PageError::TooLarge { field, .. }) => field,
                other => panic!("expected an error, got {other:?}"),
            }
        };
        assert_eq!(code(json!({"title": ""})), "invalid_title");
        assert_eq!(code(json!({"title": "t".repeat(201)})), "invalid_title");
        assert_eq!(code(json!({"title": null})), "invalid_title");
        assert_eq!(code(json!({"html": ""})), "invalid_html");
        assert_eq!(code(json!({"html": 3})), "invalid_html");
        assert_eq!(
            code(json!({"html": "x".repeat(MAX_HTML_BYTES + 1)})),
            "html"
        );
        assert_eq!(code(json!({"agentZid": "ZEQ1"})), "invalid_agent_zid");
        assert_eq!(code(json!({"pythonScript": 1})), "invalid_python_script");
        assert_eq!(
            code(json!({"pythonScript": "p".repeat(MAX_PYTHON_BYTES + 1)})),
            "pythonScript"
        );
        assert!(Draft::from_json(json!({"title": "é".repeat(200), "html": "x".repeat(MAX_HTML_BYTES), "agentZid": "ZEQ123",
            "pythonScript": "p".repeat(MAX_PYTHON_BYTES)})).is_ok());
    }

    #[test]
    fn encodings_round_trip_and_are_kept_only_when_smaller() {
        use std::io::Read;
        let html = "<p>hello</p>".repeat(1000).into_bytes();
        let e = Encoded::compute(html.clone());
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(e.gzip.as_deref().unwrap())
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, html);
        let mut out = Vec::new();
        brotli::Decompressor::new(e.br.as_deref().unwrap(), 4096)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, html);
        let tiny = Encoded::compute(b"x".to_vec());
        assert!(tiny.gzip.is_none() && tiny.br.is_none());
    }
}
