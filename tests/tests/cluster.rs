//! Real chunkd processes started by `chunkctl up`: writes and reads through the client library,
//! status, a SIGKILLed group leader during writes (no acknowledged write lost, writes resume),
//! the killed node restarted, and a clean `chunkctl down`.

use std::path::Path;
use std::time::{Duration, Instant};

use chunkstore::client::{Client, ClientConfig, ClientError};
use chunkstore::protocol::{ErrorReply, ReadPolicy};
use chunkstore::{Bin, Key, Value, WritePolicy};
use chunkstore_tests::run;

fn chunkctl(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let output = run("chunkctl", &all);
    assert!(output.status.success(), "chunkctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn cluster_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json")).unwrap()).unwrap()
}

fn status(dir: &Path) -> serde_json::Value {
    let output = chunkctl(dir, &["status", "--json"]);
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Stops the cluster even if the test fails.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = run("chunkctl", &["--dir", self.0.to_str().unwrap(), "down"]);
    }
}

#[test]
fn leader_killed_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    let status_before = status(dir);
    let groups = status_before["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 16);
    for group in groups {
        assert_eq!(group["state"], "ok", "{group}");
        assert_eq!(group["replicas"].as_array().unwrap().len(), 3);
        assert!(group["leader"].is_u64() && group["namespace"] == "test");
    }
    let seeds: Vec<String> = cluster_json(dir)["nodes"].as_array().unwrap().iter().map(|n| n["client"].as_str().unwrap().to_owned()).collect();
    let client = Client::connect(ClientConfig::new(seeds)).unwrap();

    // The leader of group 0 is killed after 100 writes, in the middle of the stream.
    let victim = groups[0]["leader"].as_u64().unwrap();
    let victim_pid = cluster_json(dir)["nodes"].as_array().unwrap().iter().find(|n| n["id"] == victim).unwrap()["pid"].as_u64().unwrap();
    let mut acked = Vec::new();
    let mut in_doubt = Vec::new();
    let mut killed_at = None;
    let mut first_write_after_kill = None;
    for k in 0..400i64 {
        if k == 100 {
            // SAFETY: plain syscall on a process this test started.
            unsafe { libc::kill(victim_pid as i32, libc::SIGKILL) };
            killed_at = Some(Instant::now());
        }
        let bins = vec![Bin::new("v", Value::Int(k * 7))];
        let key = Key::new("s", k);
        match client.put("test", &key, bins, &WritePolicy::default()) {
            Ok(_) => {
                acked.push(k);
                // Writes to the killed leader's group need a new leader first.
                let in_victims_group = chunkstore::raft::group_of(&key.digest, 16) == 0;
                if let (true, Some(at), None) = (in_victims_group, killed_at, first_write_after_kill) {
                    first_write_after_kill = Some(at.elapsed());
                }
            }
            Err(ClientError::Server(ErrorReply::Timeout { in_doubt: true })) => in_doubt.push(k),
            Err(err) => panic!("write {k}: {err}"),
        }
    }
    eprintln!("acked {}, in doubt {:?}, first write after the kill {:?}", acked.len(), in_doubt, first_write_after_kill);
    assert!(acked.len() >= 390, "RF 3 keeps serving with one node down: only {} of 400 acked", acked.len());
    assert!(first_write_after_kill.unwrap() < Duration::from_secs(20), "writes resumed after {:?}", first_write_after_kill);

    // Every acknowledged write is there (linearizable reads through the new leaders).
    for &k in &acked {
        let record = client.get_with("test", &Key::new("s", k), None, ReadPolicy::Linearizable).unwrap();
        assert_eq!(record.and_then(|r| r.bin("v").cloned()), Some(Value::Int(k * 7)), "acknowledged write {k} lost");
    }

    // The killed node comes back, catches up, and every group has a live leader again.
    chunkctl(dir, &["up"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = status(dir);
        if now["groups"].as_array().unwrap().iter().all(|g| g["state"] == "ok") && now["nodes"].as_array().unwrap().iter().all(|n| n["up"] == true) {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster did not recover: {now}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let record = client.get("test", &Key::new("s", 399i64), None).unwrap().unwrap();
    assert_eq!(record.bin("v"), Some(&Value::Int(399 * 7)));

    // The kv benchmark's contract fields, on the recovered cluster (a short run).
    let bench = chunkctl(dir, &["bench", "kv", "--clients", "1,2", "--seconds", "0.5", "--json"]);
    let report = chunkstore_tests::last_json_line(&bench);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "put and get for each client count: {report}");
    for result in results {
        assert!(result["clients"].is_u64() && (result["op"] == "put" || result["op"] == "get"), "{result}");
        assert!(result["ops_per_sec"].as_f64().unwrap() > 0.0, "{result}");
        assert!(result["p50_us"].as_u64().unwrap() <= result["p99_us"].as_u64().unwrap());
        assert!(result["baseline_p50_us"].as_u64().unwrap() > 0);
    }

    let down = chunkctl(dir, &["down"]);
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert_eq!(stderr.matches("stopped").count(), 3, "{stderr}");
    for node in 1..=3 {
        let log = std::fs::read_to_string(dir.join(format!("node{node}/chunkd.log"))).unwrap();
        assert!(log.contains("finished clean shutdown"), "node {node} did not shut down cleanly");
    }
}

/// Restarts every node in turn (SIGTERM, clean shutdown, `chunkctl up` brings it back) while a
/// client keeps writing: no acknowledged write is lost and writing never stops for long.
#[test]
fn rolling_restart_under_load_loses_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    let seeds: Vec<String> = cluster_json(dir)["nodes"].as_array().unwrap().iter().map(|n| n["client"].as_str().unwrap().to_owned()).collect();
    let client = Arc::new(Client::connect(ClientConfig::new(seeds)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (client, stop, acked) = (client.clone(), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut in_doubt = 0;
            let mut k = 0i64;
            while !stop.load(Ordering::Relaxed) {
                match client.put("test", &Key::new("r", k), vec![Bin::new("v", Value::Int(k))], &WritePolicy::default()) {
                    Ok(_) => acked.lock().unwrap().push(k),
                    Err(ClientError::Server(ErrorReply::Timeout { in_doubt: true })) => in_doubt += 1,
                    Err(err) => panic!("write {k} failed: {err}"),
                }
                k += 1;
            }
            in_doubt
        })
    };
    for node in 1..=3u64 {
        let before = acked.lock().unwrap().len();
        let pid = cluster_json(dir)["nodes"].as_array().unwrap().iter().find(|n| n["id"] == node).unwrap()["pid"].as_u64().unwrap();
        // SAFETY: plain syscall on a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(format!("/proc/{pid}/stat")).is_ok() && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ") {
            assert!(Instant::now() < deadline, "node {node} did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        chunkctl(dir, &["up"]);
        let log = std::fs::read_to_string(dir.join(format!("node{node}/chunkd.log"))).unwrap();
        assert!(log.contains("finished clean shutdown"), "node {node} shut down cleanly on SIGTERM");
        // Writes went on while this node was away and came back.
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < before + 20 {
            assert!(Instant::now() < deadline, "writes stalled while restarting node {node}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let in_doubt = writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    eprintln!("rolling restart: {} writes acknowledged, {in_doubt} in doubt", acked.len());
    for k in acked {
        let record = client.get_with("test", &Key::new("r", k), None, ReadPolicy::Linearizable).unwrap();
        assert_eq!(record.and_then(|r| r.bin("v").cloned()), Some(Value::Int(k)), "acknowledged write {k} lost");
    }
}
