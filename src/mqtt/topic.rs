//! The topic grammar of DESIGN.md (prefix configurable, default `smgate`):
//!
//! | topic | meaning |
//! | --- | --- |
//! | `<prefix>/<machine>/<instance>/heartbeat` | event `HEARTBEAT` |
//! | `<prefix>/<machine>/<instance>/events/<TYPE>` | event `<TYPE>` |
//! | `<prefix>/<machine>/<instance>/state` | retained public view (published by the gateway) |
//! | `<prefix>/$gateway/<gateway-id>/status` | retained `online` / Last Will `offline` |

use crate::auth::Slug;

/// Longest event type accepted (as on the HTTP `event` route).
pub const MAX_EVENT_TYPE: usize = 64;

/// A device topic, parsed. `machine` is only checked for shape.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceTopic<'a> {
    pub machine: Slug,
    pub instance: &'a str,
    pub event: &'a str,
}

/// Why a topic is not a device topic. `machine` is the machine segment when it has the shape
/// of a slug, so the dead letter can be filed under that machine.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownTopic {
    pub machine: Option<Slug>,
    pub why: &'static str,
}

pub fn parse<'a>(prefix: &str, topic: &'a str) -> Result<DeviceTopic<'a>, UnknownTopic> {
    let unknown = |machine, why| Err(UnknownTopic { machine, why });
    let Some(rest) = topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
        return unknown(None, "the topic is not under the gateway's prefix");
    };
    let levels: Vec<&str> = rest.split('/').collect();
    let Some(slug) = levels.first().and_then(|m| Slug::parse(m)) else {
        return unknown(
            None,
            "the machine level is not a machine slug ([a-z0-9-]{1,64})",
        );
    };
    let event = match levels.as_slice() {
        [_, _, "heartbeat"] => "HEARTBEAT",
        [_, _, "events", t] => {
            if t.is_empty() || t.chars().count() > MAX_EVENT_TYPE || t.chars().any(char::is_control)
            {
                return unknown(
                    Some(slug),
                    "the event type must be 1–64 characters without control characters",
                );
            }
            t
        }
        _ => {
            return unknown(
                Some(slug),
                "expected <prefix>/<machine>/<instance>/heartbeat or …/events/<TYPE>",
            )
        }
    };
    let instance = levels[1];
    if !crate::instances::valid_instance_slug(instance) {
        return unknown(
            Some(slug),
            "the instance level must match ^[a-zA-Z0-9_-]{1,128}$",
        );
    }
    Ok(DeviceTopic {
        machine: slug,
        instance,
        event,
    })
}

pub fn state(prefix: &str, machine: &str, instance: &str) -> String {
    format!("{prefix}/{machine}/{instance}/state")
}

pub fn emit(prefix: &str, machine: &str, instance: &str, name: &str) -> String {
    format!("{prefix}/{machine}/{instance}/emit/{name}")
}

pub fn status(prefix: &str, gateway_id: &str) -> String {
    format!("{prefix}/$gateway/{gateway_id}/status")
}

/// The subscriptions of the ingest connection.
pub fn subscriptions(prefix: &str) -> [String; 2] {
    [
        format!("{prefix}/+/+/heartbeat"),
        format!("{prefix}/+/+/events/+"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_and_events_map_to_event_types() {
        assert_eq!(
            parse("smgate", "smgate/m-1/dev_7/heartbeat"),
            Ok(DeviceTopic {
                machine: Slug::parse("m-1").unwrap(),
                instance: "dev_7",
                event: "HEARTBEAT"
            })
        );
        assert_eq!(
            parse("a/b", "a/b/m/i/events/DOOR.open").unwrap().event,
            "DOOR.open"
        );
    }

    #[test]
    fn unknown_topics_keep_the_machine_when_it_has_slug_shape() {
        assert_eq!(
            parse("smgate", "smgate/m/bad.slug/heartbeat")
                .unwrap_err()
                .machine,
            Slug::parse("m")
        );
        assert_eq!(
            parse("smgate", "smgate/m/i/events/").unwrap_err().machine,
            Slug::parse("m")
        );
        assert_eq!(
            parse("smgate", "smgate/M!/i/heartbeat")
                .unwrap_err()
                .machine,
            None
        );
        assert_eq!(
            parse("smgate", "other/m/i/heartbeat").unwrap_err().machine,
            None
        );
        assert_eq!(
            parse("smgate", "smgate/m/i/state").unwrap_err().machine,
            Slug::parse("m")
        );
        let long = format!("smgate/m/i/events/{}", "x".repeat(65));
        assert!(parse("smgate", &long).is_err());
    }
}
