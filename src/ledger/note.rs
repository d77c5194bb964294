//! Checkpoints as C2SP signed notes, byte-compatible with Go's `golang.org/x/mod/sumdb/note`.
//!
//! A signed note is `body ‖ "\n" ‖ signature lines`, where the body is one or more
//! newline-terminated lines and each signature line is
//! `"— " ‖ <key name> ‖ " " ‖ base64(key hash ‖ signature) ‖ "\n"` (U+2014 EM DASH, a space).
//! The Ed25519 signature covers exactly the body bytes. The 4-byte key hash is the first four
//! bytes of `SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)`; it lets a verifier pick the right key
//! without trying them all.
//!
//! A verifier key is published as `<name>+<8 hex key hash>+<base64(0x01 ‖ public key)>`.
//!
//! A checkpoint body (C2SP tlog-checkpoint) is `<origin>\n<tree size>\n<base64 root>\n`; we
//! never write extension lines, and ignore any we read.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{base64, Hash, LedgerError};

/// Algorithm byte for Ed25519 keys in signed notes.
const ALG_ED25519: u8 = 0x01;
/// Every signature line starts with U+2014 EM DASH and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Go's limit; stops a note with endless signature lines from costing endless work.
const MAX_SIGNATURES: usize = 100;

/// A signed statement of the log's size and root hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Identifies the log: `<gateway-id>/<slug>` for smgate.
    pub origin: String,
    /// Number of rows (leaves) in the tree.
    pub size: u64,
    /// RFC 6962 root hash of the first `size` leaves.
    pub root: Hash,
}

impl Checkpoint {
    /// The note body: `<origin>\n<size>\n<base64 root>\n`. Fails if the origin is empty or
    /// contains a control character (a newline would forge extra lines).
    pub fn to_body(&self) -> Result<String, LedgerError> {
        if self.origin.is_empty() {
            return Err(LedgerError::MalformedCheckpoint("origin is empty"));
        }
        if self.origin.chars().any(char::is_control) {
            return Err(LedgerError::MalformedCheckpoint(
                "origin contains a control character",
            ));
        }
        Ok(format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            base64::encode(&self.root)
        ))
    }
}

/// Parses a checkpoint body (as returned by [`verify_note`]). The size must be plain decimal
/// without leading zeros and the root must be 32 bytes; extension lines after the root are
/// allowed (non-empty) and ignored.
pub fn parse_checkpoint(body: &str) -> Result<Checkpoint, LedgerError> {
    let text = body
        .strip_suffix('\n')
        .ok_or(LedgerError::MalformedCheckpoint(
            "body must end with a newline",
        ))?;
    let mut lines = text.split('\n');
    let origin = lines.next().unwrap_or_default();
    let size = lines
        .next()
        .ok_or(LedgerError::MalformedCheckpoint("missing tree size line"))?;
    let root = lines
        .next()
        .ok_or(LedgerError::MalformedCheckpoint("missing root hash line"))?;
    if origin.is_empty() || origin.chars().any(char::is_control) {
        return Err(LedgerError::MalformedCheckpoint(
            "origin line is empty or has control characters",
        ));
    }
    let canonical_decimal = !size.is_empty()
        && size.bytes().all(|b| b.is_ascii_digit())
        && (size == "0" || !size.starts_with('0'));
    if !canonical_decimal {
        return Err(LedgerError::MalformedCheckpoint(
            "tree size is not a plain decimal number",
        ));
    }
    let size = size
        .parse::<u64>()
        .map_err(|_| LedgerError::MalformedCheckpoint("tree size does not fit in 64 bits"))?;
    let root: Hash = base64::decode(root)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(LedgerError::MalformedCheckpoint(
            "root hash is not base64 of 32 bytes",
        ))?;
    if lines.any(str::is_empty) {
        return Err(LedgerError::MalformedCheckpoint("blank extension line"));
    }
    Ok(Checkpoint {
        origin: origin.to_owned(),
        size,
        root,
    })
}

/// The gateway's Ed25519 identity key.
pub struct GatewayKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for GatewayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GatewayKey")
            .field("public_key", &base64::encode(&self.public_key()))
            .finish_non_exhaustive()
    }
}

impl GatewayKey {
    /// Generates a new key from the OS random source and returns it as PKCS#8 (v2) bytes,
    /// the form to store; load it with [`GatewayKey::from_pkcs8`].
    pub fn generate() -> Result<Vec<u8>, LedgerError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| LedgerError::Key("could not generate a key: no system randomness"))?;
        Ok(doc.as_ref().to_vec())
    }

    /// Loads a key from PKCS#8 bytes (v1, or v2 whose public key must match).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<GatewayKey, LedgerError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|_| LedgerError::Key("not a valid Ed25519 PKCS#8 private key"))?;
        Ok(GatewayKey { pair })
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The note verifier key for this key under `name`:
    /// `<name>+<8 hex key hash>+<base64(0x01 ‖ public key)>`.
    pub fn verifier_key(&self, name: &str) -> Result<String, LedgerError> {
        check_name(name).map_err(LedgerError::MalformedVerifierKey)?;
        Ok(VerifierKey {
            name: name.to_owned(),
            key_hash: key_hash(name, &self.public_key()),
            public_key: self.public_key(),
        }
        .to_string())
    }

    fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// A parsed note verifier key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    pub name: String,
    pub key_hash: [u8; 4],
    pub public_key: [u8; 32],
}

impl VerifierKey {
    /// Parses `<name>+<8 hex>+<base64(0x01 ‖ 32-byte key)>` and checks the key hash.
    pub fn parse(s: &str) -> Result<VerifierKey, LedgerError> {
        use LedgerError::MalformedVerifierKey as Bad;
        let (name, rest) = s.split_once('+').ok_or(Bad("missing `+`"))?;
        let (hash_hex, key_b64) = rest.split_once('+').ok_or(Bad("missing second `+`"))?;
        check_name(name).map_err(Bad)?;
        if hash_hex.len() != 8 || !hash_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Bad("key hash is not 8 hex digits"));
        }
        let hash = u32::from_str_radix(hash_hex, 16).map_err(|_| Bad("bad key hash"))?;
        let key = base64::decode(key_b64).map_err(|_| Bad("key is not base64"))?;
        let (&alg, public_key) = key.split_first().ok_or(Bad("empty key"))?;
        if alg != ALG_ED25519 {
            return Err(Bad(
                "unknown key algorithm; only Ed25519 (0x01) is supported",
            ));
        }
        let public_key: [u8; 32] = public_key
            .try_into()
            .map_err(|_| Bad("Ed25519 public key must be 32 bytes"))?;
        let key_hash = hash.to_be_bytes();
        if key_hash != self::key_hash(name, &public_key) {
            return Err(LedgerError::VerifierKeyHashMismatch);
        }
        Ok(VerifierKey {
            name: name.to_owned(),
            key_hash,
            public_key,
        })
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut key = Vec::with_capacity(33);
        key.push(ALG_ED25519);
        key.extend_from_slice(&self.public_key);
        write!(
            f,
            "{}+{}+{}",
            self.name,
            super::hex::encode(&self.key_hash),
            base64::encode(&key)
        )
    }
}

/// First 4 bytes of `SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)`.
pub fn key_hash(name: &str, public_key: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public_key);
    let digest: [u8; 32] = h.finalize().into();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// Signs `body` and returns the signed note: `body ‖ "\n" ‖ "— <name> <base64(key hash ‖
/// signature)>\n"`. The body must be non-empty newline-terminated lines, none of them empty,
/// without control characters.
pub fn sign_note(body: &str, name: &str, key: &GatewayKey) -> Result<String, LedgerError> {
    check_name(name).map_err(LedgerError::MalformedNote)?;
    check_text(body)?;
    if body.is_empty() || !body.ends_with('\n') {
        return Err(LedgerError::MalformedNote(
            "body must be non-empty and end with a newline",
        ));
    }
    if body.starts_with('\n') || body.contains("\n\n") {
        return Err(LedgerError::MalformedNote(
            "body must not contain empty lines",
        ));
    }
    let mut sig = Vec::with_capacity(68);
    sig.extend_from_slice(&key_hash(name, &key.public_key()));
    sig.extend_from_slice(&key.sign(body.as_bytes()));
    Ok(format!(
        "{body}\n{SIG_PREFIX}{name} {}\n",
        base64::encode(&sig)
    ))
}

/// Verifies a signed note against one verifier key and returns its body (the text the
/// signature covers, ending with a newline). Signatures by other keys are ignored, as Go's
/// `note.Open` does with unknown verifiers; a signature by this key that does not verify is
/// an error, and so is the absence of any.
pub fn verify_note(note: &str, verifier_key: &str) -> Result<String, LedgerError> {
    use LedgerError::MalformedNote as Bad;
    let vk = VerifierKey::parse(verifier_key)?;
    check_text(note)?;
    let split = note
        .rfind("\n\n")
        .ok_or(Bad("no blank line before the signatures"))?;
    let (body, sigs) = (&note[..split + 1], &note[split + 2..]);
    let sigs = sigs.strip_suffix('\n').ok_or(Bad(
        "signature block must be non-empty and end with a newline",
    ))?;
    let mut verified = false;
    for (i, line) in sigs.split('\n').enumerate() {
        if i >= MAX_SIGNATURES {
            return Err(Bad("too many signatures"));
        }
        let line = line
            .strip_prefix(SIG_PREFIX)
            .ok_or(Bad("signature line must start with an em dash and a space"))?;
        let (name, sig_b64) = line
            .split_once(' ')
            .ok_or(Bad("signature line has no key name"))?;
        check_name(name).map_err(Bad)?;
        let sig = base64::decode(sig_b64).map_err(|_| Bad("signature is not base64"))?;
        if sig.len() < 5 {
            return Err(Bad("signature is too short"));
        }
        if name != vk.name || sig[..4] != vk.key_hash {
            continue;
        }
        let ok = UnparsedPublicKey::new(&ED25519, &vk.public_key)
            .verify(body.as_bytes(), &sig[4..])
            .is_ok();
        if !ok {
            return Err(LedgerError::InvalidSignature {
                name: format!("{}+{}", vk.name, super::hex::encode(&vk.key_hash)),
            });
        }
        verified = true;
    }
    if verified {
        Ok(body.to_owned())
    } else {
        Err(LedgerError::NoSignature {
            name: format!("{}+{}", vk.name, super::hex::encode(&vk.key_hash)),
        })
    }
}

/// A key name: non-empty, no whitespace, no `+`, no control characters.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("key name is empty");
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '+')
    {
        return Err("key name contains whitespace, `+` or a control character");
    }
    Ok(())
}

/// Note text: no ASCII control characters other than newline (Go's rule).
fn check_text(text: &str) -> Result<(), LedgerError> {
    if text.bytes().any(|b| b < 0x20 && b != b'\n') {
        return Err(LedgerError::MalformedNote(
            "contains a control character other than newline",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from golang.org/x/mod/sumdb/note (package docs and note_test.go).
    const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const PETER_SKEY_B64: &str = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                        then you don't know what your problem is.\n";
    const PETER_SIG: &str = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
    const ENOCH_SIG: &str = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

    fn peter_key() -> GatewayKey {
        let skey = base64::decode(PETER_SKEY_B64).unwrap();
        assert_eq!(skey[0], ALG_ED25519);
        GatewayKey {
            pair: Ed25519KeyPair::from_seed_unchecked(&skey[1..]).unwrap(),
        }
    }

    fn peter_note() -> String {
        format!("{TEXT}\n{PETER_SIG}")
    }

    #[test]
    fn go_example_verifier_key_parses_and_matches_the_private_key() {
        let vk = VerifierKey::parse(PETER_VKEY).unwrap();
        assert_eq!(vk.name, "PeterNeumann");
        assert_eq!(vk.key_hash, [0xc7, 0x4f, 0x20, 0xa3]);
        assert_eq!(vk.to_string(), PETER_VKEY);
        let key = peter_key();
        assert_eq!(key.public_key(), vk.public_key);
        assert_eq!(key.verifier_key("PeterNeumann").unwrap(), PETER_VKEY);
    }

    #[test]
    fn go_example_note_is_reproduced_byte_for_byte() {
        let signed = sign_note(TEXT, "PeterNeumann", &peter_key()).unwrap();
        assert_eq!(signed, peter_note());
    }

    #[test]
    fn go_example_note_verifies() {
        assert_eq!(verify_note(&peter_note(), PETER_VKEY).unwrap(), TEXT);
        // Other signers' lines are ignored; duplicates are harmless.
        let multi = format!("{TEXT}\n{PETER_SIG}{ENOCH_SIG}{PETER_SIG}");
        assert_eq!(verify_note(&multi, PETER_VKEY).unwrap(), TEXT);
        // Only someone else's signature: not verified.
        let enoch_only = format!("{TEXT}\n{ENOCH_SIG}");
        assert!(matches!(
            verify_note(&enoch_only, PETER_VKEY),
            Err(LedgerError::NoSignature { .. })
        ));
    }

    #[test]
    fn altered_notes_fail() {
        let altered = peter_note().replace("cryptography", "cryptographY");
        assert!(matches!(
            verify_note(&altered, PETER_VKEY),
            Err(LedgerError::InvalidSignature { .. })
        ));
        // Go's "invalid signature" case: four characters spliced into the signature.
        let sig = format!("{}ABCD{}", &PETER_SIG[..60], &PETER_SIG[60..]);
        assert!(matches!(
            verify_note(&format!("{TEXT}\n{sig}"), PETER_VKEY),
            Err(LedgerError::InvalidSignature { .. })
        ));
    }

    #[test]
    fn go_malformed_notes_are_rejected() {
        let bad = [
            TEXT.to_owned(),
            format!("{TEXT}\n"),
            format!("{TEXT}\n{}", &PETER_SIG[..PETER_SIG.len() - 1]),
            format!("\x01{TEXT}\n{PETER_SIG}"),
            format!("{TEXT}\n— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="),
            format!("{TEXT}\n{PETER_SIG}Unexpected line.\n"),
            format!("{TEXT}\n{}", PETER_SIG.repeat(101)),
            format!("{TEXT}\n- PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"),
        ];
        for msg in bad {
            assert!(
                matches!(
                    verify_note(&msg, PETER_VKEY),
                    Err(LedgerError::MalformedNote(_))
                ),
                "accepted {msg:?}"
            );
        }
    }

    #[test]
    fn go_mangled_verifier_keys_are_rejected() {
        let b = PETER_VKEY.as_bytes();
        for i in 0..=b.len() {
            for j in i + 1..=b.len() {
                if i != 0 || j != b.len() {
                    let s = std::str::from_utf8(&b[i..j]).unwrap();
                    assert!(VerifierKey::parse(s).is_err(), "accepted {s:?}");
                }
            }
        }
        for i in 0..b.len() {
            let mut m = b.to_vec();
            m[i] += 1;
            let s = String::from_utf8(m).unwrap();
            assert!(VerifierKey::parse(&s).is_err(), "accepted {s:?}");
        }
        // Wrong key length and unknown algorithm, each with a matching key hash.
        for s in [
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        ] {
            assert!(VerifierKey::parse(s).is_err(), "accepted {s:?}");
        }
    }

    #[test]
    fn checkpoint_round_trip_with_a_generated_key() {
        let pkcs8 = GatewayKey::generate().unwrap();
        let key = GatewayKey::from_pkcs8(&pkcs8).unwrap();
        let name = "gw-0123abcd";
        let vkey = key.verifier_key(name).unwrap();
        assert!(vkey.starts_with("gw-0123abcd+"));

        let cp = Checkpoint {
            origin: format!("{name}/demo"),
            size: 8,
            root: [0xab; 32],
        };
        let body = cp.to_body().unwrap();
        assert_eq!(
            body,
            format!("gw-0123abcd/demo\n8\n{}\n", base64::encode(&[0xab; 32]))
        );
        let note = sign_note(&body, name, &key).unwrap();
        assert!(note.starts_with(&format!("{body}\n\u{2014} {name} ")));
        assert!(note.ends_with('\n'));
        let opened = verify_note(&note, &vkey).unwrap();
        assert_eq!(opened, body);
        assert_eq!(parse_checkpoint(&opened).unwrap(), cp);

        // A different size under the same signature fails.
        let forged = note.replacen("\n8\n", "\n9\n", 1);
        assert!(matches!(
            verify_note(&forged, &vkey),
            Err(LedgerError::InvalidSignature { .. })
        ));
        // Another key with the same name does not verify it.
        let other = GatewayKey::from_pkcs8(&GatewayKey::generate().unwrap()).unwrap();
        assert!(verify_note(&note, &other.verifier_key(name).unwrap()).is_err());
    }

    #[test]
    fn sign_rejects_bad_bodies_and_names() {
        let key = peter_key();
        for body in ["", "abc", "a\n\nb\n", "\nabc\n", "a\tb\n"] {
            assert!(sign_note(body, "n", &key).is_err(), "signed {body:?}");
        }
        for name in ["", "a b", "a+b", "a\nb"] {
            assert!(sign_note(TEXT, name, &key).is_err(), "name {name:?}");
            assert!(key.verifier_key(name).is_err(), "name {name:?}");
        }
        assert!(GatewayKey::from_pkcs8(b"not a key").is_err());
    }

    #[test]
    fn parse_checkpoint_is_strict_about_the_three_lines() {
        let root = base64::encode(&[1u8; 32]);
        let ok = format!("o\n0\n{root}\n");
        assert_eq!(parse_checkpoint(&ok).unwrap().size, 0);
        let ext = format!("o\n12\n{root}\nextension line\n");
        assert_eq!(parse_checkpoint(&ext).unwrap().size, 12);
        let short_root = base64::encode(&[1u8; 31]);
        for bad in [
            format!("o\n12\n{root}"),
            format!("\n12\n{root}\n"),
            format!("o\n012\n{root}\n"),
            format!("o\n+12\n{root}\n"),
            format!("o\n-1\n{root}\n"),
            format!("o\n\n{root}\n"),
            format!("o\n18446744073709551616\n{root}\n"),
            format!("o\n12\n{short_root}\n"),
            format!("o\n12\n{root}\n\n"),
            "o\n12\n".to_owned(),
            format!("o\n12\n{root} \n"),
        ] {
            assert!(parse_checkpoint(&bad).is_err(), "accepted {bad:?}");
        }
        let bad_origin = Checkpoint {
            origin: "a\nb".into(),
            size: 1,
            root: [0; 32],
        };
        assert!(bad_origin.to_body().is_err());
    }
}
