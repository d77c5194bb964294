//! Console sessions: what an operator's browser holds instead of an account key.
//!
//! Signing in with an account key mints a session token (`zss_` + 256 random bits, the same
//! shape as a key). The browser keeps it only in an HttpOnly cookie; the store keeps only its
//! SHA-256, the account and the key it was opened with, and when it ends. A session resolves to
//! the same [`Principal`] as its key, so every existing permission check applies unchanged,
//! and it dies with its key: revoking or expiring the key ends its sessions too.
//!
//! Sessions live in this gateway's redb file, so a restart keeps people signed in and a token
//! minted by another gateway is simply unknown here.

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{ct_eq, key_by_id, new_raw_key, sha256, AuthError, Principal, Zid};
use crate::store::{self, StoreError};

pub const SESSION_PREFIX: &str = "zss_";
/// How long a session lasts after sign-in (not sliding: a stolen cookie ages out).
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

/// Session hash → [`Session`]. Created on first sign-in (data directories older than the
/// console do not have it, so readers treat a missing table as "no sessions").
pub const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("console_sessions");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub hash: [u8; 32],
    pub zid: Zid,
    /// The account key the session was opened with; the session lives only as long as it.
    pub key_id: String,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// Opens a session for an account key; returns the raw token (for the cookie only) and the
/// record. Expired sessions are dropped on the way, so the table stays as small as the number
/// of people signed in.
pub fn open(
    txn: &WriteTransaction,
    zid: Zid,
    key_id: String,
    now_ms: i64,
) -> Result<(String, Session), StoreError> {
    let (raw, hash) = new_raw_key(SESSION_PREFIX);
    let session = Session {
        hash,
        zid,
        key_id,
        created_ms: now_ms,
        expires_ms: now_ms + SESSION_TTL_MS,
    };
    let mut table = txn.open_table(SESSIONS)?;
    let mut expired = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let old: Session = store::decode(v.value())?;
        if old.expires_ms <= now_ms {
            expired.push(k.value().to_vec());
        }
    }
    for k in expired {
        table.remove(k.as_slice())?;
    }
    table.insert(hash.as_slice(), store::encode(&session).as_slice())?;
    Ok((raw, session))
}

/// Ends the session of `raw`; `false` if there was none.
pub fn close(txn: &WriteTransaction, raw: &str) -> Result<bool, StoreError> {
    let hash = sha256(raw.as_bytes());
    let mut table = txn.open_table(SESSIONS)?;
    let removed = table.remove(hash.as_slice())?.is_some();
    Ok(removed)
}

/// The live session of a presented token, if any.
pub fn find(txn: &ReadTransaction, raw: &str, now_ms: i64) -> Result<Option<Session>, StoreError> {
    if !raw.starts_with(SESSION_PREFIX) {
        return Ok(None);
    }
    let hash = sha256(raw.as_bytes());
    let table = match txn.open_table(SESSIONS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(found) = table.get(hash.as_slice())? else {
        return Ok(None);
    };
    let session: Session = store::decode(found.value())?;
    if !ct_eq(&session.hash, &hash) || session.expires_ms <= now_ms {
        return Ok(None);
    }
    let key_live = key_by_id(txn, &session.key_id)?.is_some_and(|k| k.is_live(now_ms));
    Ok(key_live.then_some(session))
}

/// Resolves a session token to the principal of the key it was opened with.
pub fn resolve(txn: &ReadTransaction, raw: &str, now_ms: i64) -> Result<Principal, AuthError> {
    match find(txn, raw, now_ms)? {
        Some(s) => Ok(Principal::Account {
            zid: s.zid,
            key_id: s.key_id,
        }),
        None => Err(AuthError::Unauthorized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_256_bits_and_the_session_prefix() {
        let (raw, hash) = new_raw_key(SESSION_PREFIX);
        assert!(raw.starts_with(SESSION_PREFIX));
        // 43 base62 characters: 43 × log2(62) ≈ 256.03 bits.
        assert_eq!(raw.len(), SESSION_PREFIX.len() + 43);
        assert_eq!(hash, sha256(raw.as_bytes()));
    }
}
