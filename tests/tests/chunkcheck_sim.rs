//! `chunkcheck sim`: linearizable registers on a cluster in one process (the production
//! node's code on memory disks over the in-memory network) under a seeded schedule of power
//! cuts (one node or all), wiped disks, failed fsyncs, clock jumps, roster changes, restarts,
//! isolated nodes and a lossy network. A run with a random
//! seed must be valid; each negative control, a build with one safety mechanism switched off,
//! must be caught.

use chunkstore_tests::{last_json_line, run};

/// A different seed each run (printed with any failure, with the command that replays it).
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    nanos ^ (std::process::id() as u64) << 32
}

/// Runs `chunkcheck sim` with 12 faults and `extra` flags; returns (exit code, JSON result).
fn sim(seed: u64, extra: &[&str]) -> (i32, serde_json::Value) {
    sim_with(seed, "12", extra)
}

/// `sim` with `faults` faults.
fn sim_with(seed: u64, faults: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let seed = seed.to_string();
    let history = tempfile::NamedTempFile::new().unwrap();
    let mut args = vec!["sim", "--seed", &seed, "--faults", faults, "--json", "--history", history.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = run("chunkcheck", &args);
    let result = last_json_line(&output);
    for field in ["seed", "replay", "valid", "verdict", "ok", "fail", "info", "anomalies", "unavailable_keys", "faults", "messages_dropped"] {
        assert!(!result[field].is_null(), "no {field} in {result}");
    }
    assert!(result["replay"].as_str().unwrap().contains(&format!("--seed {seed}")), "{result}");
    // The history is written, and reads back as the same number of completed operations.
    let text = std::fs::read_to_string(history.path()).unwrap();
    let completions = text.lines().filter(|line| !line.contains(":type :invoke")).count() as u64;
    let counted = ["ok", "fail", "info"].iter().map(|f| result[f].as_u64().unwrap()).sum::<u64>();
    assert_eq!(completions, counted, "the history and the counts disagree");
    (output.status.code().expect("exited"), result)
}

#[test]
fn registers_on_an_in_process_cluster_through_power_cuts_are_linearizable() {
    let seed = random_seed();
    let (code, result) = sim(seed, &[]);
    assert_eq!((code, &result["valid"]), (0, &serde_json::json!(true)), "seed {seed}: {result}");
    assert!(result["ok"].as_u64().unwrap() >= 5, "seed {seed}: too few operations: {result}");
    assert!(result["faults"].as_array().unwrap().iter().any(|f| f["kind"] == "power-cut-all"), "no whole-cluster power cut: {result}");
}

/// Negative control: WALs that never fdatasync lose the cluster's state to the power cuts.
#[test]
fn sim_catches_a_wal_that_never_syncs() {
    let seed = random_seed();
    let (code, result) = sim(seed, &["--unsafe-wal-skip-fsync"]);
    assert_eq!((code, &result["valid"]), (1, &serde_json::json!(false)), "seed {seed}: {result}");
}

/// Negative control: leaders that answer reads without checking that they still lead serve
/// stale values once isolated. Whether a schedule isolates a leader long enough for another to
/// be elected while a client reads from it is up to the seed: four of six seeds of 20 faults
/// caught it when measured (2026-12-08), and one CI run missed on three in a row, so up to eight
/// seeds, and one must catch it.
#[test]
fn sim_catches_reads_a_deposed_leader_answers() {
    let first = random_seed();
    let mut results = Vec::new();
    for seed in first..first + 8 {
        let (code, result) = sim_with(seed, "20", &["--unsafe-unchecked-reads"]);
        if (code, &result["verdict"]) == (1, &serde_json::json!("not-linearizable")) {
            return;
        }
        results.push(result);
    }
    panic!("seeds {first}..{}: no stale read found: {results:?}", first + 8);
}

/// Negative control, a bug found before (VALIDATION.md, "Cluster validation"): a replica whose
/// disks were wiped votes like a new one instead of catching up first, and with a lagging
/// replica and the third one down, elects the lagging one, which lacks acknowledged writes.
/// The schedule's `lag-down-wipe` fault sets that pattern up; whether the lagging node wins
/// the election before the third comes back is up to the run: up to six seeds, 20 faults each
/// (five of six seeds caught it when measured), and one must.
#[test]
fn sim_catches_a_wiped_replica_that_votes_before_catching_up() {
    let first = random_seed();
    let mut results = Vec::new();
    for seed in first..first + 6 {
        let (code, result) = sim_with(seed, "20", &["--unsafe-wiped-replica-votes"]);
        if (code, &result["verdict"]) == (1, &serde_json::json!("not-linearizable")) {
            assert!(result["replay"].as_str().unwrap().contains("--unsafe-wiped-replica-votes"), "{result}");
            return;
        }
        results.push(result);
    }
    panic!("seeds {first}..{}: no acknowledged write lost: {results:?}", first + 6);
}

/// Groups moving through roster changes among the other faults, on four nodes. The schedule is
/// a function of the seed: seed 43's takes node 4 off the roster among power cuts, a disk that
/// fails its fsyncs, clock jumps and an isolation.
#[test]
fn registers_through_roster_changes_on_four_nodes_are_linearizable() {
    let (code, result) = sim_with(43, "12", &["--nodes", "4", "--groups", "8"]);
    assert_eq!((code, &result["valid"]), (0, &serde_json::json!(true)), "{result}");
    let kinds: Vec<&str> = result["faults"].as_array().unwrap().iter().map(|f| f["kind"].as_str().unwrap()).collect();
    for kind in ["roster", "fsync-error", "clock-forward", "power-cut-all"] {
        assert!(kinds.iter().any(|k| k.starts_with(kind)), "seed 43's schedule has no {kind}: {kinds:?}");
    }
}
