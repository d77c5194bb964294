//! Lowercase hex, the only spelling of hashes on the wire ("64 lowercase hex digits").
//!
//! Decoding is deliberately strict: exactly 64 digits, lowercase only, so every hash has one
//! textual form and string comparison of hashes is hash comparison.

use super::{Hash, LedgerError};

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Encodes bytes as lowercase hex.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decodes exactly 64 lowercase hex digits into a hash. Uppercase, whitespace, a `0x`
/// prefix or any other length is rejected.
pub fn decode_hash(s: &str) -> Result<Hash, LedgerError> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return Err(LedgerError::InvalidHex);
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(out)
}

fn nibble(c: u8) -> Result<u8, LedgerError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(LedgerError::InvalidHex),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328";

    #[test]
    fn encode_is_lowercase_and_round_trips() {
        assert_eq!(encode(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(encode(&[]), "");
        let h = decode_hash(SAMPLE).unwrap();
        assert_eq!(h[0], 0x5d);
        assert_eq!(h[31], 0x28);
        assert_eq!(encode(&h), SAMPLE);
    }

    #[test]
    fn decode_rejects_everything_but_64_lowercase_digits() {
        assert!(decode_hash(&SAMPLE.to_uppercase()).is_err());
        assert!(decode_hash(&SAMPLE[..62]).is_err());
        assert!(decode_hash(&format!("{SAMPLE}00")).is_err());
        assert!(decode_hash(&format!("0x{}", &SAMPLE[2..])).is_err());
        assert!(decode_hash(&format!(" {}", &SAMPLE[1..])).is_err());
        assert!(decode_hash(&SAMPLE.replace('d', "g")).is_err());
        // 64 bytes but not 64 characters: a multi-byte character must not slip through.
        let mut s = String::from(&SAMPLE[..62]);
        s.push('é');
        assert_eq!(s.len(), 64);
        assert!(decode_hash(&s).is_err());
        assert!(decode_hash("").is_err());
    }
}
