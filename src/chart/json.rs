//! The engine's stored form in JSON ([`super::run::encode`]): the timers written as serde
//! derives them, through the shared writer of [`crate::json`].

use crate::json::{write_i64, write_str};
pub(crate) use crate::json::{write_u64, write_value};

use super::model::Timer;

/// The timers as serde derives them (`Timer` then `Event` in field order, `name` as `type`).
pub(crate) fn write_timers(out: &mut Vec<u8>, timers: &[Timer]) {
    out.push(b'[');
    for (i, t) in timers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        let id_at = out.len();
        write_str(out, &t.id);
        let id_end = out.len();
        out.extend_from_slice(b",\"due_ms\":");
        write_i64(out, t.due_ms);
        out.extend_from_slice(b",\"seq\":");
        write_u64(out, t.seq);
        out.extend_from_slice(b",\"event\":{\"type\":");
        if t.event.name == t.id {
            // An `after` timer's event is named as the timer: copy the bytes just written
            // instead of checking the name for escapes again.
            out.extend_from_within(id_at..id_end);
        } else {
            write_str(out, &t.event.name);
        }
        out.extend_from_slice(b",\"data\":");
        write_value(out, &t.event.data);
        out.extend_from_slice(b"}}");
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::model::{Event, Timer};
    use super::*;

    #[test]
    fn timers_are_written_as_serde_derives_them() {
        let timers = vec![
            Timer {
                id: "xstate.after.30000.m.online".into(),
                due_ms: -5,
                seq: 7,
                event: Event::new("xstate.after.30000.m.online", Value::Null),
            },
            Timer {
                id: "q\"".into(),
                due_ms: i64::MAX,
                seq: u64::MAX,
                event: Event::new("T\\", json!({"x": [1, 0.5]})),
            },
        ];
        let mut out = Vec::new();
        write_timers(&mut out, &timers);
        assert_eq!(
            String::from_utf8_lossy(&out),
            serde_json::to_string(&timers).unwrap()
        );
        let mut out = Vec::new();
        write_timers(&mut out, &[]);
        assert_eq!(out, b"[]");
    }
}
