//! `chunkctl` against the real binary: the engine benchmark emits the JSON fields its contract
//! names, and bad arguments are clear errors. (Cluster commands: tests/cluster.rs.)

use chunkstore_tests::{last_json_line, run};

#[test]
fn bench_engine_reports_its_contract_fields() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["bench", "engine", "--writers", "1,4", "--seconds", "0.5", "--cold-start-records", "5000", "--json", "--dir", dir.path().to_str().unwrap()];
    let output = run("chunkctl", &args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = last_json_line(&output);
    let results = report["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    for (result, writers) in results.iter().zip([1, 4]) {
        assert_eq!(result["writers"], writers);
        assert!(result["ops_per_sec"].as_f64().unwrap() > 0.0);
        assert!(result["p50_us"].as_u64().unwrap() <= result["p99_us"].as_u64().unwrap());
        let fsyncs = result["fsyncs_per_write"].as_f64().unwrap();
        assert!(fsyncs > 0.0 && fsyncs <= 1.01, "commit-to-device syncs, at most once per write: {fsyncs}");
    }
    assert!(report["baseline_ops_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["baseline_p50_us"].as_u64().is_some());
    assert_eq!(report["cold_start"]["records"], 5000);
    assert!(report["cold_start"]["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the benchmark cleans up its files");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let output = run("chunkcheck", &["engine", "--writers", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--writers"));
    let output = run("chunkctl", &["bench", "engine", "--writers", "x"]);
    assert!(!output.status.success());
    // A malformed operate step is refused before anything is sent (no cluster is needed).
    for (op, says) in [("add:n=x", "not an integer"), ("frobnicate:n", "not an operation"), ("write-bytes:b=1", "BIN@OFFSET")] {
        let output = run("chunkctl", &["--seeds", "127.0.0.1:1", "operate", "test", "s", "k", op]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(says), "{op}: {stderr}");
    }
    let dir = std::env::temp_dir().join(format!("chunkctl-bad-groups-{}", std::process::id()));
    let output = run("chunkctl", &["--dir", dir.to_str().unwrap(), "up", "--groups", "3"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("power of two"), "{output:?}");
    assert!(!dir.exists(), "nothing is created for a refused cluster");
}
