//! `chunkcheck register|counter` against real chunkd processes under kill and pause faults
//! (bounded runs; longer ones are in VALIDATION.md), and their negative control: the same
//! run against chunkd with an unsafe flag must report anomalies.

use chunkstore_tests::{env_or, last_json_line, run};

/// Runs a chunkcheck workload; returns (exit code, JSON result).
fn chunkcheck(workload: &str, seed: &str, nemesis: &str, interval: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = tempfile::tempdir().unwrap();
    let seconds = env_or("CHUNKCHECK_SECONDS", 40).to_string();
    let mut args = vec![
        workload, "--nodes", "3", "--time-limit", &seconds, "--nemesis", nemesis, "--nemesis-interval", interval, "--seed", seed, "--json", "--out",
    ];
    let out_dir = out.path().join("run");
    args.push(out_dir.to_str().unwrap());
    args.extend_from_slice(extra);
    let output = run("chunkcheck", &args);
    let result = last_json_line(&output);
    for file in ["history.edn", "results.json", "nemesis.log", "cluster/node1/chunkd.log"] {
        assert!(out_dir.join(file).exists(), "the run left no {file}");
    }
    (output.status.code().expect("exited"), result)
}

fn assert_contract_fields(result: &serde_json::Value) {
    for field in ["valid", "ops", "ok", "fail", "info", "anomalies", "nemesis_events", "recovery_ms"] {
        assert!(result.get(field).is_some(), "no {field} in {result}");
    }
}

/// Registers stay linearizable (and every session sees its own writes) through kills and
/// pauses, and every acknowledged write is in the final reads.
#[test]
fn register_under_kills_and_pauses_is_linearizable() {
    let (code, result) = chunkcheck("register", "11", "kill,pause", "5", &[]);
    assert_contract_fields(&result);
    assert_eq!((code, &result["valid"]), (0, &serde_json::json!(true)), "{result}");
    assert!(result["ok"].as_u64().unwrap() > 1000, "the workload made progress: {result}");
    assert!(result["nemesis_events"].as_u64().unwrap() >= 2, "faults happened: {result}");
    assert_eq!(result["checks"]["linearizable"]["verdict"], "linearizable");
}

/// No increment is lost or applied twice through kills and pauses.
#[test]
fn counter_under_kills_and_pauses_stays_within_bounds() {
    let (code, result) = chunkcheck("counter", "12", "kill,pause", "5", &[]);
    assert_contract_fields(&result);
    assert_eq!((code, &result["valid"]), (0, &serde_json::json!(true)), "{result}");
    assert!(result["checks"]["counter"]["reads"].as_u64().unwrap() > 100, "{result}");
}

/// Negative control: chunkd applying retried increments again (no exactly-once table) is
/// caught by the counter check: reads above the attempted increments.
#[test]
fn counter_catches_double_applied_increments_from_an_unsafe_build() {
    let (code, result) = chunkcheck("counter", "13", "kill", "3", &["--chunkd-option", "unsafe-skip-dedup = true"]);
    assert_eq!((code, &result["valid"]), (1, &serde_json::json!(false)), "{result}");
    assert!(result["anomalies"].as_u64().unwrap() > 0);
}
