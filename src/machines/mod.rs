//! Machines (spec 000): the unit of ownership, of the log and of sync.
//!
//! Slugs are `[a-z0-9-]{1,64}`. A slug the caller did not give is derived from the owner's
//! lowercased ZID and suffixed `-2`, `-3`, … until free; a slug the caller gave that is taken
//! is a conflict. Creating a machine mints its first `zsm_` key (role `admin`) in the same
//! transaction.

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::auth::{self, Access, KeyRecord, KeySubject, Principal, Role, Slug, Zid};
use crate::clock;
use crate::ledger::log::{Entry, LogWriter};
use crate::store::{self, StoreError, MACHINES};

/// Slugs that would shadow an API path (`/api/chain/state-machines/...`).
const RESERVED_SLUGS: &[&str] = &["state-machines"];

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("slug `{existing_slug}` is taken; choose another or omit it to derive one")]
    SlugTaken { existing_slug: String },
    #[error("no such machine")]
    NotFound,
    #[error("this key's role cannot do that on this machine")]
    Forbidden,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(code: &'static str, message: impl Into<String>) -> MachineError {
    MachineError::Invalid {
        code,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub slug: Slug,
    pub owner_zid: Zid,
    pub is_public: bool,
    pub status: String,
    pub display_name: Option<String>,
    pub purpose: Option<String>,
    pub parent_origin: String,
    pub region: String,
    pub genesis_zeqond: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl Machine {
    /// What `principal` may do on this machine.
    pub fn access(&self, principal: &Principal) -> Access {
        let member = match principal {
            Principal::Account { zid, .. } if *zid == self.owner_zid => Access::Owner,
            Principal::MachineKey { slug, role, .. } if *slug == self.slug => match role {
                Role::Viewer => Access::Viewer,
                Role::Operator => Access::Operator,
                Role::Admin => Access::Admin,
            },
            _ => Access::None,
        };
        if member == Access::None && self.is_public {
            Access::Public
        } else {
            member
        }
    }

    /// The spec 000 DTO. Callers below viewer (the public) do not see the owner or the purpose.
    pub fn to_json(&self, access: Access) -> Value {
        let mut m = json!({
            "id": self.id,
            "slug": self.slug,
            "parent_origin": self.parent_origin,
            "is_public": self.is_public,
            "status": self.status,
            "genesis_zeqond": self.genesis_zeqond.to_string(),
            "display_name": self.display_name,
            "region": self.region,
            "created_at": clock::rfc3339(self.created_ms),
            "updated_at": clock::rfc3339(self.updated_ms),
        });
        if access >= Access::Viewer {
            if let Value::Object(o) = &mut m {
                o.insert("purpose".into(), json!(self.purpose));
                o.insert("owner_zid".into(), json!(self.owner_zid));
            }
        }
        m
    }
}

/// A validated spin-up request.
#[derive(Debug, Clone, Default)]
pub struct NewMachine {
    pub slug: Option<Slug>,
    pub is_public: bool,
    pub display_name: Option<String>,
    pub purpose: Option<String>,
    pub parent_origin: Option<String>,
}

fn optional_string(
    body: &Map<String, Value>,
    field: &str,
    max_chars: usize,
    code: &'static str,
) -> Result<Option<String>, MachineError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max_chars => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(invalid(
            code,
            format!("{field} is longer than {max_chars} characters"),
        )),
        Some(_) => Err(invalid(code, format!("{field} must be a string"))),
    }
}

impl NewMachine {
    /// Validates a spin-up body field by field, each with its own error code.
    pub fn from_json(body: &Value) -> Result<NewMachine, MachineError> {
        let empty = Map::new();
        let body = match body {
            Value::Object(o) => o,
            Value::Null => &empty,
            _ => return Err(invalid("invalid_body", "the body must be a JSON object")),
        };
        let slug = match body.get("slug") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_str()
                    .and_then(Slug::parse)
                    .ok_or_else(|| invalid("invalid_slug", "slug must match [a-z0-9-]{1,64}"))?,
            ),
        };
        let is_public = match body.get("is_public") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("invalid_is_public", "is_public must be a boolean")),
        };
        let display_name = optional_string(body, "display_name", 255, "invalid_display_name")?;
        let purpose = optional_string(body, "purpose", 4000, "invalid_purpose")?;
        let parent_origin = optional_string(body, "parent_origin", 255, "invalid_parent_origin")?;
        if parent_origin.as_deref() == Some("") {
            return Err(invalid(
                "invalid_parent_origin",
                "parent_origin must not be empty",
            ));
        }
        Ok(NewMachine {
            slug,
            is_public,
            display_name,
            purpose,
            parent_origin,
        })
    }
}

/// The owner a spin-up request acts for: an account key's ZID, or an admin machine key's owner.
pub fn spinup_owner(txn: &ReadTransaction, principal: &Principal) -> Result<Zid, MachineError> {
    match principal {
        Principal::Account { zid, .. } => Ok(zid.clone()),
        Principal::MachineKey {
            slug,
            role: Role::Admin,
            ..
        } => get(txn, slug)?
            .map(|m| m.owner_zid)
            .ok_or(MachineError::NotFound),
        Principal::MachineKey { .. } => Err(MachineError::Forbidden),
        Principal::Anonymous => Err(MachineError::Forbidden),
    }
}

/// Settings of the gateway that every new machine records.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub region: String,
    pub parent_origin: String,
}

/// Creates the machine, its log (row 0 `machine_created`) and its admin key (row 1
/// `key_minted`). Validates (slug free) before writing anything.
pub fn create(
    txn: &WriteTransaction,
    owner: &Zid,
    actor: &str,
    request: NewMachine,
    defaults: &Defaults,
    now_ms: i64,
) -> Result<(Machine, String), MachineError> {
    let slug = {
        let machines = txn.open_table(MACHINES).map_err(StoreError::from)?;
        let taken = |s: &str| -> Result<bool, MachineError> {
            Ok(RESERVED_SLUGS.contains(&s) || machines.get(s).map_err(StoreError::from)?.is_some())
        };
        match request.slug {
            Some(s) if taken(&s)? => {
                return Err(MachineError::SlugTaken {
                    existing_slug: s.to_string(),
                })
            }
            Some(s) => s,
            None => {
                let mut candidate = Slug::derived(owner, 1);
                let mut n = 2u64;
                while taken(&candidate)? {
                    candidate = Slug::derived(owner, n);
                    n += 1;
                }
                candidate
            }
        }
    };
    let machine = Machine {
        id: uuid::Uuid::new_v4().to_string(),
        slug: slug.clone(),
        owner_zid: owner.clone(),
        is_public: request.is_public,
        status: "active".into(),
        display_name: request.display_name,
        purpose: request.purpose,
        parent_origin: request
            .parent_origin
            .unwrap_or_else(|| defaults.parent_origin.clone()),
        region: defaults.region.clone(),
        genesis_zeqond: clock::zeqond(now_ms),
        created_ms: now_ms,
        updated_ms: now_ms,
    };
    txn.open_table(MACHINES)
        .map_err(StoreError::from)?
        .insert(slug.as_str(), store::encode(&machine).as_slice())
        .map_err(StoreError::from)?;
    {
        let mut log = LogWriter::open(txn)?;
        log.create(&slug, machine.genesis_zeqond)?;
        let created = json!({
            "id": machine.id,
            "slug": machine.slug,
            "owner_zid": machine.owner_zid,
            "is_public": machine.is_public,
            "display_name": machine.display_name,
            "purpose": machine.purpose,
            "parent_origin": machine.parent_origin,
            "region": machine.region,
            "genesis_zeqond": machine.genesis_zeqond.to_string(),
        });
        log.append(
            &slug,
            Entry::json("machine_created", actor, &created),
            now_ms,
        )?;
        log.finish()?;
    }
    let (raw, _) = mint_key(txn, &slug, Role::Admin, "spin-up", None, actor, now_ms)?;
    Ok((machine, raw))
}

/// Mints a machine key and appends its `key_minted` row (the hint, never the key).
pub fn mint_key(
    txn: &WriteTransaction,
    slug: &Slug,
    role: Role,
    name: &str,
    expires_ms: Option<i64>,
    actor: &str,
    now_ms: i64,
) -> Result<(String, KeyRecord), StoreError> {
    let subject = KeySubject::Machine {
        slug: slug.clone(),
        role,
    };
    let (raw, record) = auth::mint_key(txn, subject, name, expires_ms, now_ms)?;
    let payload = json!({
        "key_id": record.id,
        "name": record.name,
        "scope": role.as_str(),
        "hint": record.hint,
        "expires_ms": record.expires_ms,
    });
    crate::ledger::log::append(
        txn,
        slug,
        Entry::json("key_minted", actor, &payload),
        now_ms,
    )?;
    Ok((raw, record))
}

/// Revokes key `id` if it belongs to machine `slug`, appending a `key_revoked` row the first
/// time. `None` when the machine has no such key.
pub fn revoke_key(
    txn: &WriteTransaction,
    slug: &Slug,
    id: &str,
    actor: &str,
    now_ms: i64,
) -> Result<Option<KeyRecord>, StoreError> {
    let belongs = |s: &KeySubject| matches!(s, KeySubject::Machine { slug: s, .. } if s == slug);
    let before = auth::key_by_id_in(txn, id)?;
    let was_live = before.as_ref().is_some_and(|k| k.revoked_ms.is_none());
    let record = auth::revoke_key(txn, id, belongs, now_ms)?;
    if let Some(k) = &record {
        if was_live {
            let payload = json!({"key_id": k.id, "name": k.name});
            crate::ledger::log::append(
                txn,
                slug,
                Entry::json("key_revoked", actor, &payload),
                now_ms,
            )?;
        }
    }
    Ok(record)
}

pub fn get(txn: &ReadTransaction, slug: &Slug) -> Result<Option<Machine>, StoreError> {
    store::get(txn, MACHINES, slug.as_str())
}

/// Every machine in slug order.
pub fn all(txn: &ReadTransaction) -> Result<Vec<Machine>, StoreError> {
    let table = txn.open_table(MACHINES)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (_, v) = entry?;
        out.push(store::decode(v.value())?);
    }
    Ok(out)
}

pub fn count(txn: &ReadTransaction) -> Result<u64, StoreError> {
    Ok(txn.open_table(MACHINES)?.len()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_slugs_are_the_lowercased_owner_then_suffixed() {
        let owner = Zid::parse("ZEQ07491829374").unwrap();
        assert_eq!(Slug::derived(&owner, 1).as_str(), "zeq07491829374");
        assert_eq!(Slug::derived(&owner, 3).as_str(), "zeq07491829374-3");
    }

    /// A machine row written while its slug was a plain `String` decodes as it is now.
    #[test]
    fn machine_rows_written_before_the_slug_type_still_decode() {
        #[derive(Serialize)]
        struct OldMachine {
            id: String,
            slug: String,
            owner_zid: Zid,
            is_public: bool,
            status: String,
            display_name: Option<String>,
            purpose: Option<String>,
            parent_origin: String,
            region: String,
            genesis_zeqond: u64,
            created_ms: i64,
            updated_ms: i64,
        }
        let old = OldMachine {
            id: "id".into(),
            slug: "kitchen-2".into(),
            owner_zid: Zid::parse("ZEQ07491829374").unwrap(),
            is_public: true,
            status: "active".into(),
            display_name: None,
            purpose: Some("p".into()),
            parent_origin: "zeq-dev".into(),
            region: "local".into(),
            genesis_zeqond: 7,
            created_ms: 1,
            updated_ms: 2,
        };
        let m: Machine = store::decode(&store::encode(&old)).unwrap();
        assert_eq!(m.slug.as_str(), "kitchen-2");
        assert_eq!((m.genesis_zeqond, m.updated_ms), (7, 2));
        assert_eq!(store::encode(&m), store::encode(&old));
    }

    #[test]
    fn spinup_body_fields_have_their_own_codes() {
        let code = |v: Value| match NewMachine::from_json(&v) {
            Err(MachineError::Invalid { code, .. }) => code,
            other => panic!("expected invalid, got {other:?}"),
        };
        assert_eq!(code(json!({"slug": "Bad"})), "invalid_slug");
        assert_eq!(code(json!({"slug": 5})), "invalid_slug");
        assert_eq!(
            code(json!({"display_name": "x".repeat(256)})),
            "invalid_display_name"
        );
        assert_eq!(
            code(json!({"purpose": "x".repeat(4001)})),
            "invalid_purpose"
        );
        assert_eq!(code(json!({"is_public": "yes"})), "invalid_is_public");
        assert_eq!(code(json!([1])), "invalid_body");
        let ok = NewMachine::from_json(&json!({"display_name": "é".repeat(255)})).unwrap();
        assert_eq!(ok.display_name.unwrap().chars().count(), 255);
    }
}

/// Appends a zeq `event` row: the event type and the SHA-256 of its canonical payload (the
/// payload itself is not kept). Returns the row.
pub fn record_event(
    txn: &WriteTransaction,
    slug: &Slug,
    event_type: &str,
    payload_hash: &[u8; 32],
    actor: &str,
    now_ms: i64,
) -> Result<crate::ledger::Row, StoreError> {
    let payload =
        json!({"type": event_type, "payload_hash": crate::ledger::hex::encode(payload_hash)});
    crate::ledger::log::append(txn, slug, Entry::json("event", actor, &payload), now_ms)
}
