//! `chunkcheck engine` against the real binary: SIGKILLs and power cuts lose no acknowledged
//! write, and the skipped-fsync negative control is caught. CHUNKSTORE_KILL_CYCLES sets the
//! cycles per mode (default 30, what CI runs).

use chunkstore_tests::{env_or, last_json_line, run};

fn check(extra: &[&str], cycles: u64) -> (Option<i32>, serde_json::Value) {
    let cycles = cycles.to_string();
    let mut args = vec!["engine", "--cycles", &cycles, "--json"];
    args.extend_from_slice(extra);
    let output = run("chunkcheck", &args);
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    (output.status.code(), last_json_line(&output))
}

fn assert_valid(report: &serde_json::Value, cycles: u64) {
    assert_eq!(report["valid"], true, "{report}");
    assert_eq!(report["cycles"], cycles);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["corrupt_returned"], 0);
    assert!(report["acked"].as_u64().unwrap() > cycles * 10, "the writer must get real work done: {report}");
}

#[test]
fn sigkill_loses_no_acknowledged_write() {
    let cycles = env_or("CHUNKSTORE_KILL_CYCLES", 30);
    let (code, report) = check(&[], cycles);
    assert_eq!(code, Some(0), "{report}");
    assert_valid(&report, cycles);
    assert!(report["kills_during_defrag"].as_u64().unwrap() > 0, "some kills must land during defragmentation: {report}");
}

#[test]
fn power_cut_loses_no_acknowledged_write() {
    let cycles = env_or("CHUNKSTORE_KILL_CYCLES", 30);
    let (code, report) = check(&["--power-loss"], cycles);
    assert_eq!(code, Some(0), "{report}");
    assert_valid(&report, cycles);
}

/// Negative control: without fdatasync a power cut must lose acknowledged writes, and the
/// check must say so with exit code 1.
#[test]
fn power_cut_without_fsync_is_caught() {
    let cycles = env_or("CHUNKSTORE_KILL_CYCLES", 30);
    let (code, report) = check(&["--power-loss", "--unsafe-skip-fsync"], cycles);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["valid"], false);
    assert!(report["lost"].as_u64().unwrap() > 0, "{report}");
}
