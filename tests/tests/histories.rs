//! `chunkcheck history` against the 108 real Jepsen histories with published verdicts, and
//! the checker's negative controls.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chunkstore_tests::{last_json_line, run};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/histories")
}

fn model_for(file: &str) -> &'static str {
    if file.starts_with("kv/") {
        "kv"
    } else {
        "cas-register"
    }
}

fn check(path: &Path, model: &str) -> (i32, serde_json::Value) {
    let output = run("chunkcheck", &["history", path.to_str().unwrap(), "--model", model, "--json"]);
    (output.status.code().expect("exited"), last_json_line(&output))
}

/// Every fixture history gets its published verdict (exit 0 linearizable, 1 not).
#[test]
fn every_fixture_history_gets_its_published_verdict() {
    let manifest = std::fs::read_to_string(fixtures().join("MANIFEST.tsv")).unwrap();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let (file, verdict) = line.split_once('\t').expect("file<TAB>verdict");
        let started = Instant::now();
        let (code, json) = check(&fixtures().join(file), model_for(file));
        let expected = match verdict {
            "linearizable" => (0, serde_json::json!(true)),
            "not-linearizable" => (1, serde_json::json!(false)),
            other => panic!("unknown verdict {other} in MANIFEST.tsv"),
        };
        if (code, json["valid"].clone()) != expected {
            wrong.push(format!("{file}: expected {verdict}, got exit {code} {json}"));
        }
        if file.starts_with("kv/c50") {
            eprintln!("{file}: {} ms", started.elapsed().as_millis());
        }
        checked += 1;
    }
    assert_eq!(checked, 108, "MANIFEST.tsv lists 108 histories");
    assert!(wrong.is_empty(), "{} wrong verdicts:\n{}", wrong.len(), wrong.join("\n"));
}

/// A linearizable history with one read changed to a value it cannot have seen is flagged,
/// and the anomaly names the read's line.
#[test]
fn a_corrupted_read_in_a_valid_history_is_caught() {
    let text = std::fs::read_to_string(fixtures().join("kv/c10-ok.edn")).unwrap();
    let (line_number, _) = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(":type :ok, :f :get") && !l.contains(":value \"\""))
        .nth(20)
        .expect("c10-ok has reads of non-empty values");
    let corrupted: Vec<String> =
        text.lines().enumerate().map(|(i, l)| if i == line_number { l.replace(":value \"", ":value \"x 99 99 y") } else { l.to_owned() }).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupted.edn");
    std::fs::write(&path, corrupted.join("\n")).unwrap();
    let (code, json) = check(&path, "kv");
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["valid"], false);
    assert_eq!(json["anomalies"][0]["stuck_line"], line_number + 1, "{json}");
}

/// A history that is not a history is exit 2 with the line named, never a verdict.
#[test]
fn a_malformed_history_is_unknown_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.edn");
    std::fs::write(&path, "{:process 0, :type :invoke, :f :read, :value nil}\n{:process 0, :type :ok, :f :read, :value [1}\n").unwrap();
    let output = run("chunkcheck", &["history", path.to_str().unwrap(), "--model", "cas-register", "--json"]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(last_json_line(&output)["valid"], "unknown");
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 2"), "{}", String::from_utf8_lossy(&output.stderr));
    let wrong_model = run("chunkcheck", &["history", fixtures().join("kv/c01-ok.edn").to_str().unwrap(), "--model", "cas-register"]);
    assert_eq!(wrong_model.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong_model.stderr).contains("no operation :"), "{}", String::from_utf8_lossy(&wrong_model.stderr));
}

/// Every fixture history with a provably wrong operation appended (a read of a value nothing
/// wrote; a read of the first of two writes made one after the other) is found not
/// linearizable within 10 s, the anomaly naming the appended read where the history was
/// linearizable. The bare search gave up
/// on six of them ("remembered more than 4000000 configurations": crashed writes left open
/// to the end of time), etcd_007 with 82 operations among them.
#[test]
fn every_fixture_with_a_wrong_operation_appended_is_decided_in_time() {
    let manifest = std::fs::read_to_string(fixtures().join("MANIFEST.tsv")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (file, verdict) in manifest.lines().filter_map(|l| l.split_once('\t')) {
        let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
        let text = text.trim_end();
        let p = 1_000_000;
        let (impossible, stale) = match model_for(file) {
            "kv" => {
                // The key most operations touch.
                let mut counts = std::collections::BTreeMap::new();
                for key in text.split(":key \"").skip(1).filter_map(|rest| rest.split('"').next()) {
                    *counts.entry(key).or_insert(0) += 1;
                }
                let key = counts.iter().max_by_key(|(_, n)| **n).map(|(k, _)| *k).expect("kv histories have keys");
                let op = |f: &str, value: &str, out: &str| {
                    format!("{{:process {p}, :type :invoke, :f :{f}, :key \"{key}\", :value {value}}}\n{{:process {p}, :type :ok, :f :{f}, :key \"{key}\", :value {out}}}")
                };
                (
                    op("get", "nil", "\"never written\""),
                    [op("put", "\"zz-a\"", "\"zz-a\""), op("put", "\"zz-b\"", "\"zz-b\""), op("get", "nil", "\"zz-a\"")].join("\n"),
                )
            }
            _ => {
                let op = |f: &str, value: &str, out: &str| {
                    format!("{{:process {p}, :type :invoke, :f :{f}, :value {value}}}\n{{:process {p}, :type :ok, :f :{f}, :value {out}}}")
                };
                (
                    op("read", "nil", "987654321"),
                    [op("write", "987654001", "987654001"), op("write", "987654002", "987654002"), op("read", "nil", "987654001")].join("\n"),
                )
            }
        };
        for (what, appended) in [("impossible read", impossible), ("stale read", stale)] {
            let history = format!("{text}\n{appended}\n");
            let path = dir.path().join("appended.edn");
            std::fs::write(&path, &history).unwrap();
            let started = Instant::now();
            let (code, json) = check(&path, model_for(file));
            let elapsed = started.elapsed();
            let last_line = history.lines().count();
            // In a history that was linearizable, the appended read is the anomaly.
            let names_the_read = verdict != "linearizable" || json["anomalies"][0]["stuck_line"] == last_line;
            if code != 1 || json["valid"] != false || elapsed.as_secs_f64() > 10.0 || !names_the_read {
                wrong.push(format!("{file} + {what}: exit {code} after {elapsed:?}: {json}"));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 216);
    assert!(wrong.is_empty(), "{} not decided:\n{}", wrong.len(), wrong.join("\n"));
}
