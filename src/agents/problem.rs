//! The problem grammar: a plain-language statement with numeric `name=value` parameters.
//!
//! ```text
//! problem   := text with parameters anywhere in it
//! parameter := name "=" number        (no spaces around "=")
//! name      := [A-Za-z_][A-Za-z0-9_]*
//! number    := [+-]? digits ("." digits)? ([eE] [+-]? digits)?   (also ".5", "5.")
//! ```
//!
//! A parameter must start at the beginning of the text or after a character that cannot be
//! part of a name (so `x=1` inside `max=1` is read as `max=1`), and its number must end at the
//! end of the text or before a character that is not a letter, digit or `.` (so `d=2cm` is not
//! a parameter: give SI values, `d=0.02`). Values are in the SI unit the catalog gives for the
//! input of that name (`M` kg, `r` m, `t` s, …). Names are case-sensitive (`M` is a central
//! mass, `m` a small one). When a name repeats, the last value wins. Non-finite values are not
//! parameters.
//!
//! `target=` is special: it is the value the chain's result should reach, in the head
//! operator's unit. Without a target the search uses the default objective (see
//! [`super::search`]).

use std::collections::BTreeMap;

/// A parsed problem.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Parameters other than `target`, by name.
    pub params: BTreeMap<String, f64>,
    pub target: Option<f64>,
    /// The statement lowercased, for keyword matching.
    pub words: String,
}

fn name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Reads a number at the start of `s`; returns it and its length.
fn number(s: &[u8]) -> Option<(f64, usize)> {
    let mut i = 0;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && s[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let mut mantissa = digits(&mut i);
    if i < s.len() && s[i] == b'.' {
        i += 1;
        mantissa += digits(&mut i);
    }
    if mantissa == 0 {
        return None;
    }
    if i < s.len() && (s[i] == b'e' || s[i] == b'E') {
        let mut j = i + 1;
        if j < s.len() && (s[j] == b'+' || s[j] == b'-') {
            j += 1;
        }
        if digits(&mut j) > 0 {
            i = j;
        }
    }
    let v: f64 = std::str::from_utf8(&s[..i]).ok()?.parse().ok()?;
    v.is_finite().then_some((v, i))
}

impl Problem {
    pub fn parse(text: &str) -> Problem {
        let s = text.as_bytes();
        let mut params = BTreeMap::new();
        let mut target = None;
        let mut i = 0;
        while i < s.len() {
            let starts_name =
                (s[i].is_ascii_alphabetic() || s[i] == b'_') && (i == 0 || !name_char(s[i - 1]));
            if !starts_name {
                i += 1;
                continue;
            }
            let start = i;
            while i < s.len() && name_char(s[i]) {
                i += 1;
            }
            if i >= s.len() || s[i] != b'=' {
                continue;
            }
            let name = &text[start..i];
            let Some((value, len)) = number(&s[i + 1..]) else {
                i += 1;
                continue;
            };
            let end = i + 1 + len;
            if end < s.len() && (s[end].is_ascii_alphanumeric() || s[end] == b'.' || s[end] == b'_')
            {
                i = end;
                continue;
            }
            if name == "target" {
                target = Some(value);
            } else {
                params.insert(name.to_owned(), value);
            }
            i = end;
        }
        Problem {
            params,
            target,
            words: text.to_lowercase(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_and_target_are_read_from_the_text() {
        let p =
            Problem::parse("Shield a probe: d=0.05 rho=2700, target=1e-3 (M=5.97E24; x=.5 y=5.)");
        assert_eq!(p.target, Some(1e-3));
        assert_eq!(p.params.get("d"), Some(&0.05));
        assert_eq!(p.params.get("rho"), Some(&2700.0));
        assert_eq!(p.params.get("M"), Some(&5.97e24));
        assert_eq!(p.params.get("x"), Some(&0.5));
        assert_eq!(p.params.get("y"), Some(&5.0));
        assert_eq!(p.params.len(), 5);
    }

    #[test]
    fn malformed_parameters_are_plain_text() {
        let p = Problem::parse("d=2cm max=3 a = 4 b=x c=1.2.3 e=-7 f=1e q=inf");
        assert_eq!(p.params.get("max"), Some(&3.0));
        assert_eq!(p.params.get("e"), Some(&-7.0));
        assert_eq!(
            p.params.get("f"),
            None,
            "a dangling exponent makes it not a number"
        );
        assert!(
            !p.params.contains_key("d")
                && !p.params.contains_key("x")
                && !p.params.contains_key("a")
        );
        assert!(!p.params.contains_key("c") && !p.params.contains_key("q"));
        assert_eq!(p.target, None);
        let none = Problem::parse("optimal radiation shielding for 180-day Mars transit");
        assert!(none.params.is_empty());
    }
}
