//! Standard-alphabet base64 with `=` padding (RFC 4648 §4), as used by signed notes and
//! checkpoints.
//!
//! Decoding is strict so that every byte string has exactly one accepted spelling: the length
//! must be a multiple of four, padding may only appear as the last one or two characters, the
//! unused low bits of the final symbol must be zero, and whitespace is not skipped.

use super::LedgerError;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes bytes as padded standard base64.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b0 = chunk[0];
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let sym = |v: u8| char::from(ALPHABET[usize::from(v & 0x3f)]);
        out.push(sym(b0 >> 2));
        out.push(sym((b0 << 4) | (b1 >> 4)));
        out.push(if chunk.len() > 1 {
            sym((b1 << 2) | (b2 >> 6))
        } else {
            '='
        });
        out.push(if chunk.len() > 2 { sym(b2) } else { '=' });
    }
    out
}

/// Decodes padded standard base64, rejecting any non-canonical spelling.
pub fn decode(s: &str) -> Result<Vec<u8>, LedgerError> {
    let bytes = s.as_bytes();
    if bytes.len() % 4 != 0 {
        return Err(LedgerError::InvalidBase64);
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let last_quad = bytes.len() / 4;
    for (i, quad) in bytes.chunks_exact(4).enumerate() {
        let is_last = i + 1 == last_quad;
        let pad = match (quad[2], quad[3]) {
            (b'=', b'=') if is_last => 2,
            (_, b'=') if is_last => 1,
            _ => 0,
        };
        let mut v = [0u8; 4];
        for (slot, &c) in v.iter_mut().zip(quad.iter()).take(4 - pad) {
            *slot = symbol(c)?;
        }
        out.push((v[0] << 2) | (v[1] >> 4));
        match pad {
            0 => {
                out.push((v[1] << 4) | (v[2] >> 2));
                out.push((v[2] << 6) | v[3]);
            }
            1 => {
                if v[2] & 0x03 != 0 {
                    return Err(LedgerError::InvalidBase64);
                }
                out.push((v[1] << 4) | (v[2] >> 2));
            }
            _ => {
                if v[1] & 0x0f != 0 {
                    return Err(LedgerError::InvalidBase64);
                }
            }
        }
    }
    Ok(out)
}

fn symbol(c: u8) -> Result<u8, LedgerError> {
    match c {
        b'A'..=b'Z' => Ok(c - b'A'),
        b'a'..=b'z' => Ok(c - b'a' + 26),
        b'0'..=b'9' => Ok(c - b'0' + 52),
        b'+' => Ok(62),
        b'/' => Ok(63),
        _ => Err(LedgerError::InvalidBase64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 4648 §10 test vectors.
    const RFC4648: [(&str, &str); 7] = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];

    #[test]
    fn rfc4648_vectors_encode_and_decode() {
        for (plain, enc) in RFC4648 {
            assert_eq!(encode(plain.as_bytes()), enc, "encode {plain:?}");
            assert_eq!(decode(enc).unwrap(), plain.as_bytes(), "decode {enc:?}");
        }
    }

    #[test]
    fn uses_the_standard_alphabet() {
        assert_eq!(encode(&[0xfb, 0xff, 0xbf]), "+/+/");
        assert_eq!(decode("+/+/").unwrap(), vec![0xfb, 0xff, 0xbf]);
        assert!(
            decode("-_-_").is_err(),
            "URL-safe alphabet must be rejected"
        );
    }

    #[test]
    fn rejects_non_canonical_and_malformed_input() {
        for bad in [
            "Zg", "Zg=", "Zm9", "Zg==Zg==", "Z===", "====", "Zh==", "Zm9=", "Zm8=\n", " Zm8=",
            "Zm 8", "Zm8*", "=Zm8", "Zg=a", "Zé==",
        ] {
            assert!(decode(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    proptest! {
        #[test]
        fn round_trips_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let enc = encode(&data);
            prop_assert_eq!(enc.len() % 4, 0);
            prop_assert_eq!(decode(&enc).unwrap(), data);
        }

        #[test]
        fn decode_never_panics_and_only_accepts_canonical(s in "[A-Za-z0-9+/=]{0,16}") {
            if let Ok(bytes) = decode(&s) {
                prop_assert_eq!(encode(&bytes), s);
            }
        }
    }
}
