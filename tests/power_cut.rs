//! Power cuts of the whole gateway. `smgate serve` runs with the test hook
//! `SMGATE_TEST_POWER_CUT=1` (`store::PowerCut`): every write stays in its memory until the
//! fsync that covers it, so a SIGKILL is a power cut. What no completed sync covered is gone
//! (the page cache does not save it, as it does for a plain SIGKILL), and a kill during a sync's
//! write-out leaves a torn commit. After each cut, `smgate verify` passes on what survived and
//! every event answered 201 is in the log exactly once.

mod common;

use std::collections::HashMap;

use common::{cli, create_machine, kill_during_burst, log_rows, Gw, UNLIMITED};
use serde_json::json;

/// An event answered 201: its row number, row hash and payload hash.
struct Answered {
    seq: u64,
    hash: String,
    payload_hash: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_answered_before_a_power_cut_is_in_the_log_once_and_verify_passes() {
    let env: Vec<(&str, &str)> = (UNLIMITED.iter().copied())
        .chain([("SMGATE_TEST_POWER_CUT", "1")])
        .collect();
    let mut gw = Gw::start(&env);
    create_machine(&gw, "cut", false).await;
    let mut answered: Vec<Answered> = Vec::new();
    for round in 0..5u64 {
        // A different point of the burst in each round.
        let kill_after = 20 + 37 * round as usize;
        let got = kill_during_burst(
            &mut gw,
            "/api/chain/state-machines/cut/event",
            8,
            kill_after,
            move |w, i| json!({"type": "reading", "payload": {"round": round, "w": w, "i": i}}),
            |b| {
                Some(Answered {
                    seq: b["seq"].as_u64()?,
                    hash: b["hash"].as_str()?.to_string(),
                    payload_hash: b["payload_hash"].as_str()?.to_string(),
                })
            },
        )
        .await;
        answered.extend(got);

        let (ok, out, err) = cli(&gw.data(), &["verify"]);
        assert!(ok, "round {round}: verify after the power cut: {out}{err}");
        gw.spawn();
        let log = log_rows(&gw, "cut", Some(&gw.owner_key)).await;
        let mut times: HashMap<&str, usize> = HashMap::new();
        for row in log.iter().filter(|r| r["type"] == "event") {
            let payload_hash = row["payload"]["payload_hash"].as_str().unwrap();
            *times.entry(payload_hash).or_default() += 1;
        }
        for a in &answered {
            let n = times.get(a.payload_hash.as_str()).copied().unwrap_or(0);
            assert_eq!(
                n, 1,
                "round {round}: event {} answered 201 is in the log {n} times",
                a.seq
            );
            assert_eq!(
                log[a.seq as usize]["hash"],
                a.hash.as_str(),
                "round {round}: row {} kept with the hash it was answered with",
                a.seq
            );
        }
        assert!(
            times.values().all(|&n| n == 1),
            "round {round}: an event is in the log twice"
        );
        eprintln!(
            "round {round}: {} events answered 201 so far, {} in the log",
            answered.len(),
            times.len()
        );
    }
}
