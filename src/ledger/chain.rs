//! Hash-chain verification: the walk `pohc/validate` does, offline.
//!
//! A chain is valid when, for every row in order: its `seq` is the previous row's plus one
//! (the first row's is the expected start), its `prev_hash` is the previous row's `hash` (the
//! first row's is the expected genesis or anchor hash), and its `hash` matches its contents.

use serde::{Deserialize, Serialize};

use super::{Hash, Row};

/// Outcome of [`verify_chain`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReport {
    /// Whether every row checked out.
    pub valid: bool,
    /// Number of rows that verified before the first broken one (all of them when valid).
    pub count: u64,
    /// The seq position of the first broken row: the seq that row should have had, which is
    /// its own `seq` unless the break is a gap or repeat in `seq` itself.
    pub broken_at: Option<u64>,
}

/// Verifies a whole log from row 0, whose `prev_hash` must be `expected_first_prev` (normally
/// [`super::genesis_prev_hash`]). Stops at the first broken row. An empty iterator is a valid
/// chain of zero rows.
pub fn verify_chain(rows: impl Iterator<Item = Row>, expected_first_prev: Hash) -> ChainReport {
    verify_chain_from(rows, 0, expected_first_prev)
}

/// Verifies a segment of a log that starts at `first_seq`, anchored on the hash of row
/// `first_seq - 1` (or the genesis hash when `first_seq` is 0).
pub fn verify_chain_from(
    rows: impl Iterator<Item = Row>,
    first_seq: u64,
    expected_first_prev: Hash,
) -> ChainReport {
    let mut expected_seq = first_seq;
    let mut expected_prev = expected_first_prev;
    let mut count = 0u64;
    for row in rows {
        if row.seq != expected_seq || row.prev_hash != expected_prev || !row.verify_hash() {
            return ChainReport {
                valid: false,
                count,
                broken_at: Some(expected_seq),
            };
        }
        expected_prev = row.hash;
        count += 1;
        // A log cannot reach u64::MAX rows; saturating keeps the walk panic-free regardless.
        expected_seq = expected_seq.saturating_add(1);
    }
    ChainReport {
        valid: true,
        count,
        broken_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::genesis_prev_hash;
    use super::*;

    fn chain(n: u64) -> (Hash, Vec<Row>) {
        let genesis = genesis_prev_hash("demo", 7);
        let mut prev = genesis;
        let rows = (0..n)
            .map(|seq| {
                let row = Row {
                    seq,
                    zeqond: 7 + seq,
                    ts_ms: 1_700_000_000_000 + seq as i64,
                    kind: if seq == 0 {
                        "machine_created".into()
                    } else {
                        "transition".into()
                    },
                    actor: "mqtt".into(),
                    transition_id: [seq as u8; 16],
                    payload: seq.to_be_bytes().to_vec(),
                    prev_hash: prev,
                    hash: [0; 32],
                }
                .seal();
                prev = row.hash;
                row
            })
            .collect();
        (genesis, rows)
    }

    #[test]
    fn intact_chain_is_valid() {
        let (genesis, rows) = chain(10);
        let report = verify_chain(rows.into_iter(), genesis);
        assert_eq!(
            report,
            ChainReport {
                valid: true,
                count: 10,
                broken_at: None
            }
        );
        let empty = verify_chain(std::iter::empty(), genesis);
        assert!(empty.valid);
        assert_eq!(empty.count, 0);
    }

    #[test]
    fn wrong_genesis_breaks_at_row_zero() {
        let (_, rows) = chain(3);
        let report = verify_chain(rows.into_iter(), genesis_prev_hash("other", 7));
        assert_eq!(report.broken_at, Some(0));
        assert_eq!(report.count, 0);
        assert!(!report.valid);
    }

    #[test]
    fn tampered_payload_is_reported_at_its_seq() {
        let (genesis, mut rows) = chain(10);
        rows[6].payload.push(1);
        let report = verify_chain(rows.into_iter(), genesis);
        assert_eq!(report.broken_at, Some(6));
        assert_eq!(report.count, 6);
    }

    #[test]
    fn resealed_tampered_row_breaks_the_next_link() {
        let (genesis, mut rows) = chain(10);
        rows[4].payload.push(1);
        rows[4] = rows[4].clone().seal();
        let report = verify_chain(rows.into_iter(), genesis);
        assert_eq!(report.broken_at, Some(5));
    }

    #[test]
    fn removed_or_repeated_rows_break_seq_continuity() {
        let (genesis, rows) = chain(6);
        let mut gap = rows.clone();
        gap.remove(3);
        assert_eq!(verify_chain(gap.into_iter(), genesis).broken_at, Some(3));

        let mut repeat = rows.clone();
        repeat.insert(3, rows[2].clone());
        assert_eq!(verify_chain(repeat.into_iter(), genesis).broken_at, Some(3));

        // A last row relinked to skip a row is caught by seq even though hashes link up.
        let mut relinked = rows[..3].to_vec();
        let mut skip = rows[4].clone();
        skip.prev_hash = relinked[2].hash;
        relinked.push(skip.seal());
        assert_eq!(
            verify_chain(relinked.into_iter(), genesis).broken_at,
            Some(3)
        );
    }

    #[test]
    fn segment_verification_uses_its_anchor() {
        let (_, rows) = chain(8);
        let anchor = rows[3].hash;
        let report = verify_chain_from(rows[4..].iter().cloned(), 4, anchor);
        assert!(report.valid);
        assert_eq!(report.count, 4);
        let bad = verify_chain_from(rows[4..].iter().cloned(), 5, anchor);
        assert_eq!(bad.broken_at, Some(5));
    }
}
