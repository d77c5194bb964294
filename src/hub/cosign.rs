//! The hub's cosignatures (C2SP tlog-cosignature, `cosignature/v1`, Ed25519).
//!
//! A hub cosigns a checkpoint only when it has verified it against the rows it stores and it is
//! the largest tree it holds of that log: that is what a v1 cosignature states ("as of this
//! time, the largest consistent tree head I observed for this origin has this root"). A verifier
//! holding the gateway's and the hub's keys thus knows the hub saw this same tree, so a gateway
//! cannot show one history to the hub and another to someone else.
//!
//! Signature line: `— <name> base64(key ID ‖ u64 BE timestamp ‖ Ed25519 signature)`, key ID
//! `SHA-256(<name> ‖ "\n" ‖ 0x04 ‖ public key)[:4]`, signed message `cosignature/v1\ntime
//! <timestamp>\n` followed by the checkpoint's note body. The key is `cosigner.pk8` (PKCS#8,
//! mode 0600) in the hub's data directory, created at first start; hubs that share a database
//! share this file (as they share `tls/`), so any of them cosigns as the same cosigner.

use std::path::Path;

use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::{Digest, Sha256};

use super::{io, HubError};
use crate::ledger::base64;

/// `cosignature/v1` Ed25519 key type byte.
const ALG_COSIGNATURE_V1: u8 = 0x04;

/// The hub's cosigning key and name.
pub struct Cosigner {
    name: String,
    key: Ed25519KeyPair,
    key_id: [u8; 4],
}

fn key_id(name: &str, public_key: &[u8]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_COSIGNATURE_V1]);
    h.update(public_key);
    let d: [u8; 32] = h.finalize().into();
    [d[0], d[1], d[2], d[3]]
}

impl Cosigner {
    /// Loads `path` (creating the key at first use) and names the cosigner `name`.
    pub fn load_or_create(path: &Path, name: &str) -> Result<Cosigner, HubError> {
        if name.is_empty() || name.contains(['+', ' ', '\n']) {
            return Err(HubError::Invalid(format!(
                "hub.name `{name}` is not a note key name (non-empty, no `+`, space or newline)"
            )));
        }
        let pkcs8 = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| HubError::Invalid("cannot generate the cosigner key".into()))?;
                write_private(path, doc.as_ref())?;
                // Read back: a hub that started at the same moment may have written first.
                std::fs::read(path).map_err(io(path))?
            }
            Err(e) => return Err(io(path)(e)),
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| {
            HubError::Invalid(format!(
                "{}: not an Ed25519 PKCS#8 key: {e}",
                path.display()
            ))
        })?;
        let key_id = key_id(name, key.public_key().as_ref());
        Ok(Cosigner {
            name: name.to_owned(),
            key,
            key_id,
        })
    }

    /// The verifier key: `<name>+<hex key ID>+<base64(0x04 ‖ public key)>`.
    pub fn verifier_key(&self) -> String {
        let mut material = vec![ALG_COSIGNATURE_V1];
        material.extend_from_slice(self.key.public_key().as_ref());
        format!(
            "{}+{}+{}",
            self.name,
            crate::ledger::hex::encode(&self.key_id),
            base64::encode(&material)
        )
    }

    /// The signature line (ending in a newline) cosigning a checkpoint whose note body is
    /// `body`, at `timestamp` (seconds since the epoch).
    pub fn cosign(&self, body: &str, timestamp: u64) -> String {
        let message = format!("cosignature/v1\ntime {timestamp}\n{body}");
        let mut sig = Vec::with_capacity(76);
        sig.extend_from_slice(&self.key_id);
        sig.extend_from_slice(&timestamp.to_be_bytes());
        sig.extend_from_slice(self.key.sign(message.as_bytes()).as_ref());
        format!("\u{2014} {} {}\n", self.name, base64::encode(&sig))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    super::write_private_tmp(&tmp, bytes)?;
    // Another hub starting at the same moment may have made one: keep the first.
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(path)(e)),
    }
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}
