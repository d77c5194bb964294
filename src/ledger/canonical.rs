//! Canonical JSON for row payloads: object keys sorted by their UTF-16 code units (RFC 8785
//! order), no insignificant whitespace, strings escaped as serde_json does, numbers as
//! serde_json prints them. The same value always gives the same bytes, whatever key order or
//! spacing it arrived with, so its SHA-256 is stable.

use serde_json::Value;

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
                write_string(k, out);
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
        Value::String(s) => write_string(s, out),
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(Value::String(s.to_owned()).to_string().as_bytes());
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
    fn strings_are_escaped_and_keys_sorted_by_utf16() {
        let v = json!({"é": 1, "z": "line\nbreak \"q\"", "\u{1F600}": 2, "\u{FF61}": 3});
        // U+1F600 is a surrogate pair (D83D…) and sorts before U+FF61 in UTF-16 order.
        assert_eq!(
            String::from_utf8(to_vec(&v)).unwrap(),
            "{\"z\":\"line\\nbreak \\\"q\\\"\",\"é\":1,\"\u{1F600}\":2,\"\u{FF61}\":3}"
        );
    }
}
