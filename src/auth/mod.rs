//! Who is calling: accounts (ZIDs), account keys (`zeq_ak_…`), machine keys (`zsm_…`) with
//! roles, and the rate limits that protect the gateway.
//!
//! Raw keys exist only in the response that mints them. At rest a key is its SHA-256: the
//! lookup hashes the presented key, finds the record by that hash and compares the stored hash
//! in constant time. Revoked and expired keys resolve to nothing, exactly like unknown ones.

mod ratelimit;
pub mod session;

pub use ratelimit::RateLimiter;

use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{self, StoreError, ACCOUNTS, KEYS, KEY_IDS};

pub const ACCOUNT_KEY_PREFIX: &str = "zeq_ak_";
pub const MACHINE_KEY_PREFIX: &str = "zsm_";
/// Random characters after the prefix: 43 base62 characters carry 256 bits.
const KEY_BODY_LEN: usize = 43;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("bearer token missing or invalid")]
    Unauthorized,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An account id: `ZEQ` followed by 11 digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Zid(String);

impl Zid {
    pub fn parse(s: &str) -> Option<Zid> {
        let digits = s.strip_prefix("ZEQ")?;
        (digits.len() == 11 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| Zid(s.into()))
    }

    fn random() -> Zid {
        let mut bytes = [0u8; 11];
        fill_random(&mut bytes);
        let digits: String = bytes.iter().map(|b| char::from(b'0' + b % 10)).collect();
        Zid(format!("ZEQ{digits}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Zid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A machine's slug: `[a-z0-9-]{1,64}`, one URL path segment and one MQTT topic level that
/// need no escaping. Parsed once where a slug enters (an HTTP path or body, an MQTT topic, a
/// command-line argument) and trusted inside. It lives here, beside [`Zid`], because machine
/// keys and principals name their machine, and `auth` sits below `machines`.
///
/// Serialized as the plain string (JSON, and postcard in stored rows), as it was before it
/// had a type, so rows written then still decode.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slug(String);

impl Slug {
    pub fn parse(s: &str) -> Option<Slug> {
        let valid = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        valid.then(|| Slug(s.to_owned()))
    }

    /// The slug a machine gets when its creator names none: the owner's lowercased ZID, then
    /// `-2`, `-3`, … (`n` ≥ 2) while taken. Valid by construction (`zeq` and 11 digits).
    pub fn derived(owner: &Zid, n: u64) -> Slug {
        let base = owner.as_str().to_ascii_lowercase();
        Slug(if n < 2 { base } else { format!("{base}-{n}") })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A slug is read as text wherever the store, the log or a topic wants a `&str`.
impl std::ops::Deref for Slug {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<Slug> for String {
    fn from(slug: Slug) -> String {
        slug.0
    }
}

impl std::borrow::Borrow<str> for Slug {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Slug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A machine key's role. Machine owners (through their account keys) rank above `Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What a caller may do on one machine, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    None,
    Public,
    Viewer,
    Operator,
    Admin,
    Owner,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub zid: Zid,
    pub display_name: String,
    pub balance: i64,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeySubject {
    Account { zid: Zid },
    Machine { slug: Slug, role: Role },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub hash: [u8; 32],
    pub subject: KeySubject,
    pub name: String,
    /// The prefix and first four characters, enough for a person to tell keys apart.
    pub hint: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

impl KeyRecord {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms.is_none_or(|e| now_ms < e)
    }
}

/// The caller of one request, resolved from its bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    Account {
        zid: Zid,
        key_id: String,
    },
    MachineKey {
        slug: Slug,
        role: Role,
        key_id: String,
    },
}

impl Principal {
    /// Short actor name for logs and log rows: the ZID, or the key id of a machine key.
    pub fn actor(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".into(),
            Principal::Account { zid, .. } => zid.to_string(),
            Principal::MachineKey { key_id, .. } => format!("key:{key_id}"),
        }
    }
}

pub fn fill_random(buf: &mut [u8]) {
    // The system RNG failing is not recoverable for a security appliance.
    SystemRandom::new()
        .fill(buf)
        .expect("system random number generator failed");
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equality whose running time does not depend on where the inputs differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A fresh raw key with `prefix` and its SHA-256.
pub fn new_raw_key(prefix: &str) -> (String, [u8; 32]) {
    let mut out = String::with_capacity(prefix.len() + KEY_BODY_LEN);
    out.push_str(prefix);
    let mut buf = [0u8; 64];
    while out.len() < prefix.len() + KEY_BODY_LEN {
        fill_random(&mut buf);
        // Rejection sampling keeps every character uniform: 248 = 4 × 62.
        for b in buf.iter().filter(|b| **b < 248) {
            if out.len() == prefix.len() + KEY_BODY_LEN {
                break;
            }
            out.push(char::from(BASE62[(*b % 62) as usize]));
        }
    }
    let hash = sha256(out.as_bytes());
    (out, hash)
}

fn hint(raw: &str) -> String {
    let cut = raw.find('_').map(|i| i + 1).unwrap_or(0);
    let cut = if raw.starts_with(ACCOUNT_KEY_PREFIX) {
        ACCOUNT_KEY_PREFIX.len()
    } else {
        cut
    };
    format!("{}…", &raw[..(cut + 4).min(raw.len())])
}

/// Mints a key for `subject` inside `txn`; returns the raw key (shown once) and its record.
pub fn mint_key(
    txn: &WriteTransaction,
    subject: KeySubject,
    name: &str,
    expires_ms: Option<i64>,
    now_ms: i64,
) -> Result<(String, KeyRecord), StoreError> {
    let prefix = match subject {
        KeySubject::Account { .. } => ACCOUNT_KEY_PREFIX,
        KeySubject::Machine { .. } => MACHINE_KEY_PREFIX,
    };
    let (raw, hash) = new_raw_key(prefix);
    let record = KeyRecord {
        id: uuid::Uuid::new_v4().to_string(),
        hash,
        subject,
        name: name.to_owned(),
        hint: hint(&raw),
        created_ms: now_ms,
        expires_ms,
        revoked_ms: None,
    };
    txn.open_table(KEYS)?
        .insert(hash.as_slice(), store::encode(&record).as_slice())?;
    txn.open_table(KEY_IDS)?
        .insert(record.id.as_str(), hash.as_slice())?;
    Ok((raw, record))
}

/// Whether the account or machine a key would be minted for exists.
pub fn subject_exists(txn: &WriteTransaction, subject: &KeySubject) -> Result<bool, StoreError> {
    Ok(match subject {
        KeySubject::Account { zid } => txn.open_table(ACCOUNTS)?.get(zid.as_str())?.is_some(),
        KeySubject::Machine { slug, .. } => txn
            .open_table(store::MACHINES)?
            .get(slug.as_str())?
            .is_some(),
    })
}

/// Looks up a key record by id.
pub fn key_by_id(txn: &ReadTransaction, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    let ids = txn.open_table(KEY_IDS)?;
    let Some(hash) = ids.get(id)? else {
        return Ok(None);
    };
    let keys = txn.open_table(KEYS)?;
    let record = keys.get(hash.value())?;
    record.map(|r| store::decode(r.value())).transpose()
}

/// Looks up a key record by id inside a write transaction.
pub fn key_by_id_in(txn: &WriteTransaction, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    let hash = match txn.open_table(KEY_IDS)?.get(id)? {
        Some(h) => h.value().to_vec(),
        None => return Ok(None),
    };
    let keys = txn.open_table(KEYS)?;
    let record = keys.get(hash.as_slice())?;
    record.map(|r| store::decode(r.value())).transpose()
}

/// Marks key `id` revoked if `belongs` accepts its subject. Returns the updated record, or
/// `None` if there is no such key (or it belongs elsewhere).
pub fn revoke_key(
    txn: &WriteTransaction,
    id: &str,
    belongs: impl Fn(&KeySubject) -> bool,
    now_ms: i64,
) -> Result<Option<KeyRecord>, StoreError> {
    let hash = {
        let ids = txn.open_table(KEY_IDS)?;
        let found = ids.get(id)?.map(|h| h.value().to_vec());
        match found {
            Some(h) => h,
            None => return Ok(None),
        }
    };
    let mut keys = txn.open_table(KEYS)?;
    let mut record: KeyRecord = match keys.get(hash.as_slice())? {
        Some(r) => store::decode(r.value())?,
        None => return Ok(None),
    };
    if !belongs(&record.subject) {
        return Ok(None);
    }
    if record.revoked_ms.is_none() {
        record.revoked_ms = Some(now_ms);
        keys.insert(hash.as_slice(), store::encode(&record).as_slice())?;
    }
    Ok(Some(record))
}

/// Every key whose subject satisfies `keep`, oldest first.
pub fn list_keys(
    txn: &ReadTransaction,
    keep: impl Fn(&KeySubject) -> bool,
) -> Result<Vec<KeyRecord>, StoreError> {
    let keys = txn.open_table(KEYS)?;
    let mut out = Vec::new();
    for entry in keys.iter()? {
        let (_, v) = entry?;
        let record: KeyRecord = store::decode(v.value())?;
        if keep(&record.subject) {
            out.push(record);
        }
    }
    out.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Resolves a presented bearer token or console session token (`zss_…`, from the session
/// cookie). Unknown, revoked and expired keys and sessions are all `Unauthorized`.
pub fn resolve(
    txn: &ReadTransaction,
    bearer: Option<&str>,
    now_ms: i64,
) -> Result<Principal, AuthError> {
    let Some(raw) = bearer else {
        return Ok(Principal::Anonymous);
    };
    if raw.starts_with(session::SESSION_PREFIX) {
        return session::resolve(txn, raw, now_ms);
    }
    if !(raw.starts_with(ACCOUNT_KEY_PREFIX) || raw.starts_with(MACHINE_KEY_PREFIX)) {
        return Err(AuthError::Unauthorized);
    }
    let hash = sha256(raw.as_bytes());
    let keys = txn.open_table(KEYS).map_err(StoreError::from)?;
    let found = keys.get(hash.as_slice()).map_err(StoreError::from)?;
    let Some(found) = found else {
        return Err(AuthError::Unauthorized);
    };
    let record: KeyRecord = store::decode(found.value())?;
    if !ct_eq(&record.hash, &hash) || !record.is_live(now_ms) {
        return Err(AuthError::Unauthorized);
    }
    Ok(match record.subject {
        KeySubject::Account { zid } => Principal::Account {
            zid,
            key_id: record.id,
        },
        KeySubject::Machine { slug, role } => Principal::MachineKey {
            slug,
            role,
            key_id: record.id,
        },
    })
}

/// Creates an account with a fresh, unused ZID and mints its first account key.
pub fn create_account(
    txn: &WriteTransaction,
    display_name: &str,
    now_ms: i64,
) -> Result<(Account, String), StoreError> {
    let zid = {
        let accounts = txn.open_table(ACCOUNTS)?;
        loop {
            let candidate = Zid::random();
            if accounts.get(candidate.as_str())?.is_none() {
                break candidate;
            }
        }
    };
    let account = Account {
        zid: zid.clone(),
        display_name: display_name.into(),
        balance: 0,
        created_ms: now_ms,
    };
    txn.open_table(ACCOUNTS)?
        .insert(zid.as_str(), store::encode(&account).as_slice())?;
    let (raw, _) = mint_key(txn, KeySubject::Account { zid }, "initial", None, now_ms)?;
    Ok((account, raw))
}

pub fn account(txn: &ReadTransaction, zid: &str) -> Result<Option<Account>, StoreError> {
    store::get(txn, ACCOUNTS, zid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_keys_have_prefix_length_and_alphabet() {
        let (raw, hash) = new_raw_key(MACHINE_KEY_PREFIX);
        assert!(raw.starts_with("zsm_"));
        assert_eq!(raw.len(), 4 + KEY_BODY_LEN);
        assert!(raw[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(hash, sha256(raw.as_bytes()));
        let (other, _) = new_raw_key(MACHINE_KEY_PREFIX);
        assert_ne!(raw, other);
    }

    #[test]
    fn zids_parse_strictly() {
        assert!(Zid::parse("ZEQ07491829374").is_some());
        assert!(Zid::parse("ZEQ0749182937").is_none());
        assert!(Zid::parse("zeq07491829374").is_none());
        assert!(Zid::parse("ZEQ0749182937a").is_none());
        let z = Zid::random();
        assert!(Zid::parse(z.as_str()).is_some());
    }

    #[test]
    fn slugs_parse_strictly() {
        assert!(Slug::parse("my-iot-fleet").is_some());
        assert!(Slug::parse(&"a".repeat(64)).is_some());
        assert!(Slug::parse(&"a".repeat(65)).is_none());
        assert!(Slug::parse("").is_none());
        assert!(Slug::parse("My-Fleet").is_none());
        assert!(Slug::parse("fleet_1").is_none());
    }

    /// Stored rows and JSON carried the slug as a plain `String` before it had a type: a key
    /// record written then decodes now, and both forms encode to the same bytes.
    #[test]
    fn slugs_keep_the_plain_string_wire_and_storage_format() {
        #[derive(Serialize, Deserialize)]
        #[allow(dead_code)] // `Account` keeps `Machine` at its variant index
        enum OldSubject {
            Account { zid: Zid },
            Machine { slug: String, role: Role },
        }
        let old = OldSubject::Machine {
            slug: "fleet-1".into(),
            role: Role::Operator,
        };
        let new = KeySubject::Machine {
            slug: Slug::parse("fleet-1").unwrap(),
            role: Role::Operator,
        };
        let stored = store::encode(&old);
        assert_eq!(stored, store::encode(&new));
        assert_eq!(store::decode::<KeySubject>(&stored).unwrap(), new);
        let slug = Slug::parse("fleet-1").unwrap();
        assert_eq!(serde_json::to_string(&slug).unwrap(), "\"fleet-1\"");
        assert_eq!(serde_json::from_str::<Slug>("\"fleet-1\"").unwrap(), slug);
    }

    #[test]
    fn ct_eq_compares_whole_inputs() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn hints_show_prefix_and_four_chars() {
        assert_eq!(hint("zeq_ak_ABCDEFG"), "zeq_ak_ABCD…");
        assert_eq!(hint("zsm_ABCDEFG"), "zsm_ABCD…");
    }
}
