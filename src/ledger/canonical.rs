//! Canonical JSON for row payloads: object keys sorted by their UTF-16 code units (RFC 8785
//! order), no insignificant whitespace, strings escaped as serde_json does, numbers as
//! serde_json prints them. The same value always gives the same bytes, whatever key order or
//! spacing it arrived with, so its SHA-256 is stable.

use serde_json::Value;

/// The canonical bytes of `value` (the writer is the engine's, `json::write_canonical`, byte
/// for byte what serde_json writes but for the key order).
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    crate::json::write_canonical(&mut out, value);
    out
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
