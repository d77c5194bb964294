//! Where an instance's transition records are kept.
//!
//! A step used to insert its record into [`HISTORY`] under `(machine, instance, n)`. With
//! thousands of instances stepping at once, every one of those inserts landed on a different
//! B-tree leaf, so each step dirtied one more 4 KiB page than its instance row already did —
//! the largest single cost of MQTT ingest. Now the newest records ride along in the
//! instance's own row (its [`Recent`] tail, written anyway by the step) and move to
//! [`RUNS`] together, as one value per run of up to [`RUN_RECORDS`] records or
//! [`RUN_BYTES`] bytes: one extra page write per run instead of one per step. The records
//! are committed in the same transaction as the step either way, so nothing about
//! durability changes.
//!
//! Reading one instance's records goes through three places in `n` order: the records of
//! [`HISTORY`] (written before runs existed; nothing writes there any more), the runs, then
//! the tail.
//!
//! The tail is stored after the [`Instance`]'s postcard bytes as `count (u32 LE) ‖ the
//! records' postcard bytes`. A row written before tails existed simply has no suffix.

use redb::{ReadTransaction, TableDefinition, WriteTransaction};

use super::{Instance, TransitionRecord, HISTORY};
use crate::store::{self, StoreError};

/// (machine slug, instance slug, n of the run's first record) → the run's records, each as
/// postcard bytes, back to back.
pub const RUNS: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("instance_history_runs");

/// A tail moves to [`RUNS`] when it holds this many records…
pub const RUN_RECORDS: u32 = 8;
/// …or this many bytes (a step with large event data moves on its own).
pub const RUN_BYTES: usize = 512;

/// The newest records of an instance, not yet in a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recent {
    pub count: u32,
    /// The records' postcard bytes, back to back.
    pub bytes: Vec<u8>,
}

/// An instance row: the instance, then its tail if it has one.
pub fn encode_instance(instance: &Instance) -> Vec<u8> {
    let mut out = store::encode(instance);
    if instance.recent.count > 0 {
        out.extend_from_slice(&instance.recent.count.to_le_bytes());
        out.extend_from_slice(&instance.recent.bytes);
    }
    out
}

pub fn decode_instance(bytes: &[u8]) -> Result<Instance, StoreError> {
    let (mut instance, rest): (Instance, &[u8]) = postcard::take_from_bytes(bytes)
        .map_err(|e| StoreError::Corrupt(format!("undecodable instance: {e}")))?;
    if !rest.is_empty() {
        let (count, records) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| StoreError::Corrupt("truncated history tail".into()))?;
        instance.recent = Recent {
            count: u32::from_le_bytes(*count),
            bytes: records.to_vec(),
        };
    }
    Ok(instance)
}

/// Adds the record of step `instance.steps` (not yet counted) to the tail. When that fills
/// the tail, the tail is emptied and returned as a run, (n of its first record, its bytes),
/// for the caller to insert into [`RUNS`] under `(machine, instance, n)`.
pub fn record(
    instance: &mut Instance,
    record: &TransitionRecord,
) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let recent = &mut instance.recent;
    postcard::to_extend(record, std::mem::take(&mut recent.bytes))
        .map(|b| recent.bytes = b)
        .map_err(|e| StoreError::Corrupt(format!("unencodable record: {e}")))?;
    recent.count += 1;
    if recent.count >= RUN_RECORDS || recent.bytes.len() >= RUN_BYTES {
        let first = first_of_tail(instance.steps + 1, recent.count)?;
        return Ok(Some((first, std::mem::take(recent).bytes)));
    }
    Ok(None)
}

/// `n` of the first record of a tail of `count` records after `steps` steps; a row whose tail
/// is longer than its steps is corrupt.
fn first_of_tail(steps: u64, count: u32) -> Result<u64, StoreError> {
    steps.checked_sub(u64::from(count)).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "instance row has {count} history records after {steps} steps"
        ))
    })
}

/// Decodes back-to-back records.
fn records(mut bytes: &[u8]) -> Result<Vec<TransitionRecord>, StoreError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (r, rest) = postcard::take_from_bytes(bytes)
            .map_err(|e| StoreError::Corrupt(format!("undecodable record: {e}")))?;
        out.push(r);
        bytes = rest;
    }
    Ok(out)
}

/// Transition records of one instance after `after` (exclusive), oldest first, at most
/// `limit`, with their `n`.
pub fn history(
    txn: &ReadTransaction,
    machine: &str,
    slug: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, TransitionRecord)>, StoreError> {
    let from = after.map_or(0, |a| a.saturating_add(1));
    let mut out = Vec::new();
    let full = |out: &Vec<(u64, TransitionRecord)>| out.len() >= limit;
    let legacy = txn.open_table(HISTORY)?;
    for e in legacy.range((machine, slug, from)..=(machine, slug, u64::MAX))? {
        let (k, v) = e?;
        if full(&out) {
            return Ok(out);
        }
        out.push((k.value().2, store::decode(v.value())?));
    }
    let push = |first: u64, bytes: &[u8], out: &mut Vec<_>| -> Result<(), StoreError> {
        for (i, r) in records(bytes)?.into_iter().enumerate() {
            let n = first + i as u64;
            if n >= from && !full(out) {
                out.push((n, r));
            }
        }
        Ok(())
    };
    match txn.open_table(RUNS) {
        Ok(runs) => {
            // The run holding `from` starts at or before it.
            let start = runs
                .range((machine, slug, 0)..=(machine, slug, from))?
                .next_back()
                .transpose()?
                .map_or(from, |(k, _)| k.value().2);
            for e in runs.range((machine, slug, start)..=(machine, slug, u64::MAX))? {
                if full(&out) {
                    return Ok(out);
                }
                let (k, v) = e?;
                push(k.value().2, v.value(), &mut out)?;
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(v) = txn.open_table(super::INSTANCES)?.get((machine, slug))? {
        let instance = decode_instance(v.value())?;
        let first = first_of_tail(instance.steps, instance.recent.count)?;
        push(first, &instance.recent.bytes, &mut out)?;
    }
    Ok(out)
}

/// Removes every record of one instance (its tail goes with its row).
pub fn delete(txn: &WriteTransaction, machine: &str, slug: &str) -> Result<(), StoreError> {
    let range = (machine, slug, 0)..=(machine, slug, u64::MAX);
    txn.open_table(HISTORY)?
        .retain_in(range.clone(), |_, _| false)?;
    txn.open_table(RUNS)?.retain_in(range, |_, _| false)?;
    Ok(())
}
