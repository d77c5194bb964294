//! The data the host stores and exchanges with the engine. `InstanceState` is stored as JSON
//! bytes, so every type here round-trips exactly through serde_json (no `Option<Value>`, whose
//! `Some(null)` would come back as `None`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An event: `type` plus arbitrary JSON `data` (null when absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub name: String,
    #[serde(default)]
    pub data: Value,
}

impl Event {
    pub fn new(name: impl Into<String>, data: Value) -> Self {
        Event {
            name: name.into(),
            data,
        }
    }
}

/// A pending timer: an `after` delay (`id` = `xstate.after.<ms>.<state id>`) or a delayed
/// `send` (`id` = its `params.id`, or `xstate.send.<seq>`). Fired by due time, ties by `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub id: String,
    pub due_ms: i64,
    pub seq: u64,
    pub event: Event,
}

/// Everything needed to continue an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceState {
    /// Active state ids (without the root), in document order.
    pub configuration: Vec<String>,
    /// History state id → the state ids it recorded when its parent was last exited.
    #[serde(default)]
    pub history: BTreeMap<String, Vec<String>>,
    pub context: Value,
    #[serde(default)]
    pub timers: Vec<Timer>,
    /// Sequence number for the next scheduled timer.
    #[serde(default)]
    pub timer_seq: u64,
    /// A top-level final state was reached; further events are ignored.
    #[serde(default)]
    pub done: bool,
    /// The machine output once `done` (null before, or when there is none).
    #[serde(default)]
    pub output: Value,
}

/// Something the host does after it commits the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Effect {
    /// Publish `data` (MQTT topic and/or SSE event name).
    Emit {
        topic: Option<String>,
        event: Option<String>,
        data: Value,
    },
    /// Write a log line.
    Log { label: Option<String>, value: Value },
}

/// The result of one call: the new state, the effects to publish after commit, how many
/// microsteps were taken, and whether anything in the state changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub state: InstanceState,
    pub effects: Vec<Effect>,
    pub microsteps: u32,
    pub changed: bool,
}

/// What `allowWrite` is asked about (its `type` variable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteKind {
    Initialization,
    Event,
}

impl WriteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Initialization => "initialization",
            WriteKind::Event => "event",
        }
    }
}
