//! Compact JSON writing, byte for byte what `serde_json::to_vec` writes, without serde's
//! generic path: shared by the statechart engine's stored form (`chart::json`, written on every
//! committed step, where going through `Serialize` (a serializer per value, escaping byte by
//! byte) cost more than the step itself) and the log's canonical JSON (`ledger::canonical`).
//!
//! Only the common cases are written here: strings that need no escaping (checked eight bytes
//! at a time) and integers. Anything else (a string with a quote, a backslash or a control
//! character, a float) is handed to serde_json, so escaping and float formatting stay its own.

use serde_json::{Number, Value};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether serde_json would escape any byte of `s`: a control character (below 0x20), `"`
/// or `\`. Everything else, non-ASCII included, it writes as is.
fn needs_escape(s: &[u8]) -> bool {
    if s.len() < 8 {
        // Most keys and ids: a table lookup per byte beats assembling a padded word.
        return s.iter().any(|&b| ESCAPED[usize::from(b)]);
    }
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        if any_escaped(word(chunk)) {
            return true;
        }
    }
    // The last bytes are tested as the final eight, overlapping the previous chunk: one more
    // word, no loop and no copy.
    !chunks.remainder().is_empty() && any_escaped(word(&s[s.len() - 8..]))
}

/// Eight bytes as a little-endian word (`bytes` is eight long; the zeros fallback would
/// answer "escape", the safe side).
fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
}

/// The bytes serde_json escapes, by value.
const ESCAPED: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Whether any of the eight bytes in `x` is below 0x20, `"` or `\`: the SWAR "has less" and
/// "has zero" tests (exact about whether any byte matches, which is all that is asked).
fn any_escaped(x: u64) -> bool {
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    let hit = (x.wrapping_sub(ONES * 0x20) & !x)
        | (quote.wrapping_sub(ONES) & !quote)
        | (backslash.wrapping_sub(ONES) & !backslash);
    hit & HIGHS != 0
}

/// A JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// "00" to "99", for writing integers two digits at a time.
const PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// A JSON integer (what serde_json writes through `itoa`).
pub fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        buf[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        buf[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        buf[at] = b'0' + n as u8;
    }
    out.extend_from_slice(&buf[at..]);
}

pub fn write_i64(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    write_u64(out, n.unsigned_abs());
}

/// A JSON number (integers by hand, floats through serde_json).
pub fn write_number(out: &mut Vec<u8>, n: &Number) {
    if let Some(u) = n.as_u64() {
        write_u64(out, u);
    } else if let Some(i) = n.as_i64() {
        write_i64(out, i);
    } else {
        let _ = serde_json::to_writer(&mut *out, n);
    }
}

/// A JSON value, object keys in the map's order (as serde_json writes them).
pub fn write_value(out: &mut Vec<u8>, v: &Value) {
    write_any(out, v, false);
}

/// [`write_value`] with object keys sorted by their UTF-16 code units (RFC 8785 order): the
/// log's canonical JSON (`ledger::canonical`).
pub fn write_canonical(out: &mut Vec<u8>, v: &Value) {
    write_any(out, v, true);
}

fn write_any(out: &mut Vec<u8>, v: &Value, sorted: bool) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(list) => {
            out.push(b'[');
            for (i, x) in list.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_any(out, x, sorted);
            }
            out.push(b']');
        }
        Value::Object(map) if sorted => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            write_object(out, entries.into_iter(), sorted);
        }
        Value::Object(map) => write_object(out, map.iter(), sorted),
    }
}

fn write_object<'v>(
    out: &mut Vec<u8>,
    entries: impl Iterator<Item = (&'v String, &'v Value)>,
    sorted: bool,
) {
    out.push(b'{');
    for (i, (k, x)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k);
        out.push(b':');
        write_any(out, x, sorted);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    //! Each writer against serde_json, byte for byte.

    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;

    fn same(v: &Value) {
        let mut out = Vec::new();
        write_value(&mut out, v);
        assert_eq!(
            String::from_utf8_lossy(&out),
            serde_json::to_string(v).unwrap()
        );
    }

    #[test]
    fn values_are_written_as_serde_json_writes_them() {
        same(&json!({
            "s": "plain", "q": "a\"b", "b": "a\\b", "c": "\u{1}\u{1f}\n\t", "u": "é😀\u{2028}\u{7f}/",
            "long clean string, more than eight bytes": "0123456789abcdefghij",
            "long\"dirty": "0123456789abcdef\u{0}ghij",
            "i": [0, 1, -1, 9, 10, 99, 100, i64::MIN, i64::MAX, u64::MAX],
            "f": [0.1, 1e300, -0.0, 3.0, 1.5e-7], "n": null, "t": true, "x": false,
            "nested": {"": [], "a": {}, "b": [[], {"c": [null]}]}
        }));
    }

    #[test]
    fn integers_around_each_digit_count_are_written_as_serde_json_writes_them() {
        let mut n: i64 = 1;
        for _ in 0..18 {
            for m in [n - 1, n, n + 1, 10 * n - 1] {
                same(&json!([m, -m]));
            }
            n *= 10;
        }
        for m in 0..1_100 {
            same(&json!(m));
        }
    }

    #[test]
    fn an_escaped_byte_is_found_at_every_position_of_short_and_long_strings() {
        // Below eight bytes the table is used, from eight the words, and the last word
        // overlaps the one before: every length to 24 and every position in it.
        for len in 0..24 {
            for at in 0..len {
                for b in [b'"', b'\\', 0, 0x1f] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let s = String::from_utf8(bytes).unwrap();
                    assert!(needs_escape(s.as_bytes()), "{s:?}");
                    let mut out = Vec::new();
                    write_str(&mut out, &s);
                    assert_eq!(out, serde_json::to_vec(&s).unwrap());
                }
            }
            let clean = "é".repeat(len / 2) + "~".repeat(len % 2).as_str();
            assert!(!needs_escape(clean.as_bytes()), "{clean:?}");
        }
    }

    proptest! {
        #[test]
        fn any_string_is_written_as_serde_json_writes_it(s in any::<String>(), ascii in "[ -~\\x00-\\x1f]{0,40}") {
            for s in [&s, &ascii] {
                let mut out = Vec::new();
                write_str(&mut out, s);
                prop_assert_eq!(out, serde_json::to_vec(s).unwrap());
            }
        }

        #[test]
        fn any_integer_is_written_as_serde_json_writes_it(i in any::<i64>(), u in any::<u64>()) {
            same(&json!([i, u]));
        }
    }
}
