//! `chunkcheck history` against the 108 real Jepsen histories with published verdicts, and
//! the checker's negative controls.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chunkstore_tests::{last_json_line, run};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/histories")
}

fn model_for(file: &str) -> &'static str {
    if file.starts_with("kv/") { "kv" } else { "cas-register" }
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
    let corrupted: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| if i == line_number { l.replace(":value \"", ":value \"x 99 99 y") } else { l.to_owned() })
        .collect();
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
