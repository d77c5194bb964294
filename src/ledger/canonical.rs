//! Canonical JSON for row payloads: object keys sorted by their UTF-16 code units (RFC 8785
//! order), no insignificant whitespace, strings escaped as serde_json does, numbers as
//! serde_json prints them. The same value always gives the same bytes, whatever key order or
//! spacing it arrived with, so its SHA-256 is stable.

use serde_json::Value;

// The stored-state writers of the engine: byte for byte what serde_json writes (tested there
// against it), without a `Value` and a `String` allocated per string.
use crate::json::{write_number, write_str};

pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k);
                out.push(b':');
                write(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(v, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_str(out, s),
        Value::Number(n) => write_number(out, n),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_spacing_do_not_change_the_bytes() {
        let a: Value =
            serde_json::from_str(r#"{ "b": 1, "a": [true, null, "x"], "c": {"z": 1, "y": 2} }"#)
                .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"c":{"y":2,"z":1},"a":[true,null,"x"],"b":1}"#).unwrap();
        assert_eq!(to_vec(&a), to_vec(&b));
        assert_eq!(
            String::from_utf8(to_vec(&a)).unwrap(),
            r#"{"a":[true,null,"x"],"b":1,"c":{"y":2,"z":1}}"#
        );
    }

    #[test]
    fn scalars_are_written_as_serde_json_writes_them() {
        // Keys already in order, so serde_json's own output is the canonical form.
        let v = json!({"a": [0, -1, i64::MIN, u64::MAX, 0.1, 1e300, -0.0, 1.5e-7],
            "b": [true, false, null], "c": "\u{0}\u{1f}\\\"é\u{2028}", "d": {"": ""}});
        assert_eq!(to_vec(&v), serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn strings_are_escaped_and_keys_sorted_by_utf16() {
        let v = json!({"é": 1, "z": "line\nbreak \"q\"", "\u{1F600}": 2, "\u{FF61}": 3});
        // U+1F600 is a surrogate pair (D83D…) and sorts before U+FF61 in UTF-16 order.
        assert_eq!(
            String::from_utf8(to_vec(&v)).unwrap(),
            "{\"z\":\"line\\nbreak \\\"q\\\"\",\"é\":1,\"\u{1F600}\":2,\"\u{FF61}\":3}"
        );
    }
}
