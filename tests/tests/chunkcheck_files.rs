//! `chunkcheck files`: applications writing through real chunkfs mounts (or under libchunkpreload) while nodes, mounts and
//! the applications themselves are killed, paused and cut off (bounded runs; the long ones are
//! in VALIDATION.md), and the negative controls that must make the check fail.

use std::collections::BTreeSet;

use chunkstore_tests::{env_or, last_json_line, run};
use serde_json::json;

/// Runs `chunkcheck files`; the exit code, the JSON summary, and the kept run directory.
fn files(workload: &str, seed: &str, seconds: u64, nemesis: &str, extra: &[&str]) -> (i32, serde_json::Value, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("run");
    let seconds = seconds.to_string();
    let mut args = vec!["files", "--workload", workload, "--nodes", "3", "--time-limit", &seconds, "--nemesis", nemesis];
    args.extend_from_slice(&["--nemesis-interval", "4", "--seed", seed, "--json", "--out", out_dir.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let output = run("chunkcheck", &args);
    let result = last_json_line(&output);
    for field in ["valid", "acked", "lost", "corrupt", "ops", "nemesis_events"] {
        assert!(result.get(field).is_some(), "no {field} in {result}");
    }
    if result["valid"] != json!("unknown") {
        for file in ["history.edn", "results.json", "nemesis.log", "index.html", "latency.svg", "throughput.svg", "chunkfs.log"] {
            assert!(out_dir.join(file).exists(), "the run left no {file}");
        }
    }
    (output.status.code().expect("exited"), result, out)
}

fn fault_kinds(result: &serde_json::Value) -> BTreeSet<String> {
    result["faults"].as_array().expect("faults").iter().map(|f| f["kind"].as_str().unwrap().to_owned()).collect()
}

/// Journal writers (fdatasync and O_DSYNC) lose no acknowledged record and never leave a
/// torn one, through node kills, pauses, partitions, kill -9 of the writers and of chunkfs.
#[test]
fn journal_writers_lose_nothing_through_node_mount_and_application_kills() {
    let seconds = env_or("CHUNKCHECK_FILES_SECONDS", 50);
    let (code, result, _out) = files("journal", "24", seconds, "kill,pause,partition,app-kill,fs-kill", &[]);
    assert_eq!((code, &result["valid"]), (0, &json!(true)), "{result}");
    assert_eq!((&result["lost"], &result["corrupt"]), (&json!(0), &json!(0)), "{result}");
    assert!(result["acked"].as_u64().unwrap() > 1000, "the writers made progress: {result}");
    let kinds = fault_kinds(&result);
    assert!(kinds.contains("app-kill") && kinds.contains("fs-kill"), "the run killed writers and chunkfs: {kinds:?}");
    assert!(result["app_starts"].as_u64().unwrap() > 3, "killed writers were restarted: {result}");
    // Every writer's file was checked, each with its acknowledged records.
    let files = result["files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    assert!(files.iter().all(|f| f["acked"].as_u64().unwrap() > 0 && f["records"].as_u64() >= f["acked"].as_u64()), "{result}");
}

/// SQLite bank transfers from three processes: the total never changes, every committed
/// transfer survives, and the integrity check passes after every crash.
#[test]
fn sqlite_transfers_survive_node_mount_and_application_kills() {
    let seconds = env_or("CHUNKCHECK_FILES_SECONDS", 50);
    let (code, result, _out) = files("sqlite", "2", seconds, "kill,app-kill,fs-kill", &[]);
    assert_eq!((code, &result["valid"]), (0, &json!(true)), "{result}");
    let bank = &result["bank"];
    assert!(bank["acked"].as_u64().unwrap() > 20, "transfers were committed: {result}");
    assert_eq!(bank["total"], json!(1000));
    assert!(bank["transfers"].as_u64() >= bank["acked"].as_u64());
    assert!(bank["integrity_checks"].as_u64().unwrap() > 3, "each restart checked the database: {result}");
    assert!(fault_kinds(&result).len() >= 2, "{result}");
}

/// Negative control: a chunkfs that answers writes before committing them loses acknowledged
/// records when a power cut takes the cluster and the applications' machine down.
#[test]
fn acknowledging_before_the_commit_loses_records_in_a_power_cut() {
    let (code, result, _out) = files("journal", "10", 20, "disk", &["--chunkfs-option=--unsafe-ack-before-commit"]);
    assert_eq!((code, &result["valid"]), (1, &json!(false)), "{result}");
    assert!(result["lost"].as_u64().unwrap() > 0, "{result}");
    let targets: Vec<&str> = result["faults"].as_array().unwrap().iter().filter_map(|f| f["target"].as_str()).collect();
    assert!(targets.contains(&"power-cut"), "{targets:?}");
}

/// Negative control: a journal damaged in its middle after the run is reported corrupt (and
/// what follows the damage is still found).
#[test]
fn a_journal_damaged_after_the_run_is_corrupt() {
    let (code, result, _out) = files("journal", "4", 10, "none", &["--test-corrupt-after-run"]);
    assert_eq!((code, &result["valid"]), (1, &json!(false)), "{result}");
    assert!(result["corrupt"].as_u64().unwrap() > 0, "{result}");
    assert_eq!(result["lost"], json!(0), "only the damaged record is wrong: {result}");
}

/// Failover: the standby takes the lock and goes on with the journal when the active
/// instance is killed, its chunkfs killed, its machine stopped (SIGSTOP of chunkfs and the
/// instance, then SIGCONT: its late write is refused) or cut off from the cluster, and never
/// do two write.
#[test]
fn failover_takes_over_with_nothing_lost_and_no_dual_writer() {
    let seconds = env_or("CHUNKCHECK_FILES_SECONDS", 50);
    let (code, result, out) = files("failover", "1", seconds, "app-kill,fs-kill,host-pause,machine-cut", &[]);
    assert_eq!((code, &result["valid"]), (0, &json!(true)), "{result}");
    assert!(std::fs::read_to_string(out.path().join("run/takeover.svg")).unwrap().contains("<rect"), "the takeover plot has bars");
    for field in ["takeovers", "takeover_p50_ms", "takeover_max_ms", "dual_writers"] {
        assert!(result.get(field).is_some(), "no {field} in {result}");
    }
    assert_eq!(result["dual_writers"], json!(0), "{result}");
    assert!(result["takeovers"].as_u64().unwrap() >= 2, "the standby took over: {result}");
    assert!(result["lock_holders"].as_u64().unwrap() >= 3, "{result}");
    assert!(fault_kinds(&result).contains("host-pause"), "{result}");
}

/// Negative control: a machine cut off from the cluster, with fencing off: once the cut heals,
/// the old holder's write that waited lands over the new holder's records.
#[test]
fn a_machine_cut_off_without_fencing_loses_records() {
    let (code, result, _out) = files("failover", "3", 30, "machine-cut", &["--chunkd-option", "unsafe-skip-fencing = true"]);
    assert_eq!((code, &result["valid"]), (1, &json!(false)), "{result}");
    assert!(result["lost"].as_u64().unwrap() + result["dual_writers"].as_u64().unwrap() > 0, "{result}");
    assert!(fault_kinds(&result).contains("machine-cut"), "{result}");
}

/// Negative control: with fencing off in the cluster, the stopped instance's late writes land
/// after the standby took over: dual writers.
#[test]
fn failover_without_fencing_has_dual_writers() {
    let (code, result, _out) = files("failover", "1", 30, "host-pause", &["--chunkd-option", "unsafe-skip-fencing = true"]);
    assert_eq!((code, &result["valid"]), (1, &json!(false)), "{result}");
    assert!(result["dual_writers"].as_u64().unwrap() > 0, "{result}");
}

/// The same journal writers under libchunkpreload (no mount): nothing acknowledged is lost
/// through node kills, pauses, partitions and kill -9 of the writers; read back through a
/// chunkfs mount.
#[test]
fn journal_writers_under_the_shim_lose_nothing() {
    let seconds = env_or("CHUNKCHECK_PRELOAD_SECONDS", 25);
    let (code, result, _out) = files("journal", "24", seconds, "kill,pause,partition,app-kill", &["--via", "preload"]);
    assert_eq!((code, &result["valid"]), (0, &json!(true)), "{result}");
    assert_eq!(result["via"], json!("preload"));
    assert_eq!((&result["lost"], &result["corrupt"]), (&json!(0), &json!(0)), "{result}");
    assert!(result["acked"].as_u64().unwrap() > 1000, "the writers made progress: {result}");
    assert!(result["app_starts"].as_u64().unwrap() > 3, "killed writers were restarted: {result}");
    assert_eq!(result["files"].as_array().unwrap().len(), 3);
}

/// Python sqlite3 bank transfers under the shim: the total holds, every committed transfer
/// survives, integrity checks pass after every crash.
#[test]
fn sqlite_transfers_under_the_shim_survive() {
    let seconds = env_or("CHUNKCHECK_PRELOAD_SECONDS", 25);
    let (code, result, _out) = files("sqlite", "2", seconds, "kill,app-kill", &["--via", "preload"]);
    assert_eq!((code, &result["valid"]), (0, &json!(true)), "{result}");
    let bank = &result["bank"];
    assert!(bank["acked"].as_u64().unwrap() > 10, "transfers were committed: {result}");
    assert_eq!(bank["total"], json!(1000));
    assert!(bank["integrity_checks"].as_u64().unwrap() > 2, "{result}");
}

/// Failover under the shim: each instance's process holds its own lease session; a stopped
/// holder is fenced and the standby takes over, with no dual writer.
#[test]
fn failover_under_the_shim_takes_over_without_dual_writers() {
    let seconds = env_or("CHUNKCHECK_PRELOAD_SECONDS", 25).max(25);
    let (code, result, _out) = files("failover", "1", seconds, "host-pause,app-kill,machine-cut", &["--via", "preload"]);
    assert_eq!((code, &result["valid"]), (0, &json!(true)), "{result}");
    assert_eq!(result["dual_writers"], json!(0), "{result}");
    assert!(result["takeovers"].as_u64().unwrap() >= 1, "the standby took over: {result}");
}
