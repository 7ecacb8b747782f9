//! Real chunkd processes started by `chunkctl up`: writes and reads through the client library,
//! status, a SIGKILLed group leader during writes (no acknowledged write lost, writes resume),
//! the killed node restarted, and a clean `chunkctl down`.

use std::path::Path;
use std::time::{Duration, Instant};

use chunkstore::client::{Client, ClientConfig, ClientError};
use chunkstore::protocol::{ErrorReply, ReadPolicy};
use chunkstore::{Bin, Key, Value, WritePolicy};
use chunkstore_tests::{metric, run, scrape_metrics};

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

/// The nodes' client addresses.
fn seeds(dir: &Path) -> Vec<String> {
    cluster_json(dir)["nodes"].as_array().unwrap().iter().map(|n| n["client"].as_str().unwrap().to_owned()).collect()
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
    let metadata = &status_before["metadata"];
    assert_eq!(metadata["voters"], serde_json::json!([1, 2, 3]), "{status_before}");
    assert!(metadata["leader"].is_u64() && metadata["state"] == "ok", "{status_before}");
    for group in groups {
        assert_eq!(group["state"], "ok", "{group}");
        assert_eq!(group["replicas"].as_array().unwrap().len(), 3);
        assert!(group["leader"].is_u64() && group["namespace"] == "test");
    }
    let seeds: Vec<String> = seeds(dir);
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

    // Ad-hoc operate from the command line: steps applied in order, read results printed.
    let output = chunkctl(dir, &["operate", "test", "demo", "k1", "add:n=5", "append:s=ab", "write-bytes:b@2=xy", "read:n", "read:b"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout, "written: generation 1\nn = 5\nb = <4 bytes>\n", "{stdout}");
    let record = client.get("test", &Key::new("demo", "k1"), None).unwrap().unwrap();
    assert_eq!(record.bin("b"), Some(&Value::Bytes(b"\0\0xy".to_vec())));
    assert_eq!(record.bin("s"), Some(&Value::String("ab".into())));

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
        // A local cluster's processes are known: its CPU and context switches are measured.
        assert!(result["cpu_us_per_op"].as_f64().unwrap() > 0.0, "{result}");
        assert!(result["context_switches_per_op"].as_f64().unwrap() > 0.0, "{result}");
    }
    assert_eq!(report["read_policy"], "session", "the default read policy: {report}");
    assert!(report["baseline_inplace_p50_us"].as_u64().unwrap() > 0, "{report}");
    let bench = chunkctl(dir, &["bench", "kv", "--clients", "1", "--ops", "put", "--seconds", "0.5", "--json"]);
    let report = chunkstore_tests::last_json_line(&bench);
    let ops: Vec<_> = report["results"].as_array().unwrap().iter().map(|r| r["op"].clone()).collect();
    assert_eq!(ops, ["put"], "--ops put measures puts only: {report}");
    // Reads from any up-to-date replica (BENCHMARKS.md, "Reads from any replica").
    let bench = chunkctl(dir, &["bench", "kv", "--clients", "2", "--seconds", "0.5", "--read-policy", "allow-replica", "--json"]);
    let report = chunkstore_tests::last_json_line(&bench);
    assert_eq!(report["read_policy"], "allow-replica", "{report}");
    let gets = report["results"].as_array().unwrap().iter().find(|r| r["op"] == "get").cloned().unwrap_or_default();
    assert!(gets["ops_per_sec"].as_f64().unwrap_or(0.0) > 0.0, "no allow-replica gets: {report}");

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
    let seeds: Vec<String> = seeds(dir);
    let client = Arc::new(Client::connect(ClientConfig::new(seeds)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (client, stop, acked) = (client.clone(), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let (mut in_doubt, mut slowest) = (0, Duration::ZERO);
            let mut k = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = client.put("test", &Key::new("r", k), vec![Bin::new("v", Value::Int(k))], &WritePolicy::default());
                slowest = slowest.max(started.elapsed());
                match result {
                    Ok(_) => acked.lock().unwrap().push(k),
                    Err(ClientError::Server(ErrorReply::Timeout { in_doubt: true })) => in_doubt += 1,
                    Err(err) => panic!("write {k} failed: {err}"),
                }
                k += 1;
            }
            eprintln!("rolling restart: slowest write {slowest:?}");
            in_doubt
        })
    };
    for node in 1..=3u64 {
        let before = acked.lock().unwrap().len();
        let pid = cluster_json(dir)["nodes"].as_array().unwrap().iter().find(|n| n["id"] == node).unwrap()["pid"].as_u64().unwrap();
        // SAFETY: plain syscall on a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(format!("/proc/{pid}/stat")).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
        {
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

/// The leader of `key`'s group per `chunkctl status`, once the group has a live one.
fn group_leader(dir: &Path, key: &Key) -> u64 {
    let group = chunkstore::raft::group_of(&key.digest, 16) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = status(dir);
        let entry = now["groups"].as_array().unwrap().iter().find(|g| g["group"] == group).unwrap().clone();
        if entry["state"] == "ok" {
            return entry["leader"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "group {group} has no live leader: {now}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_field(dir: &Path, node: u64, field: &str) -> serde_json::Value {
    cluster_json(dir)["nodes"].as_array().unwrap().iter().find(|n| n["id"] == node).unwrap()[field].clone()
}

/// Sends one write with a fixed tag to `key`'s group leader (retrying NotLeader while a new
/// leader is elected), as a client retrying an in-doubt write would.
fn send_tagged(dir: &Path, client: &Client, key: &Key, tag: chunkstore::protocol::WriteTag) -> chunkstore::protocol::Response {
    use chunkstore::protocol::{Request, Response};
    let request = Request::Write {
        namespace: "test".into(),
        key: key.clone(),
        op: chunkstore::WriteOp::Operate(vec![chunkstore::Operation::Add { bin: "n".into(), delta: 1 }]),
        policy: WritePolicy::default(),
        tag,
    };
    for _ in 0..50 {
        let leader = group_leader(dir, key);
        let addr = node_field(dir, leader, "client");
        match client.call_node(addr.as_str().unwrap(), &request) {
            Ok(Response::Error(ErrorReply::NotLeader { .. })) | Err(_) => std::thread::sleep(Duration::from_millis(100)),
            Ok(response) => return response,
        }
    }
    panic!("no leader accepted the write");
}

fn counter(client: &Client, key: &Key) -> i64 {
    let record = client.get_with("test", key, None, ReadPolicy::Linearizable).unwrap();
    record.and_then(|r| r.bin("n").and_then(Value::as_int)).unwrap_or(0)
}

/// Exactly-once writes on real nodes: a write sent again with its tag (as a client retries a
/// write whose answer it lost) is applied once and answered with its first outcome, also by a
/// new leader after the old one was SIGKILLed; a delayed copy of a write older than its lane's
/// last is refused. The client library's own retries during a leader kill count every increment once.
/// Negative control: on nodes started with the unsafe-skip-dedup test option, the same retry
/// is applied twice.
#[test]
fn retried_in_doubt_writes_are_applied_once() {
    use chunkstore::protocol::{Response, WriteTag};

    for unsafe_skip_dedup in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let mut args = vec!["up", "--nodes", "3", "--device-size", "67108864"];
        if unsafe_skip_dedup {
            args.extend(["--chunkd-option", "unsafe-skip-dedup=true"]);
        }
        chunkctl(dir, &args);
        let _down = Down(dir);
        let seeds: Vec<String> = seeds(dir);
        let client = Client::connect(ClientConfig::new(seeds)).unwrap();
        let key = Key::new("once", "counter");
        let tag = |lane: u32, seq: u64| WriteTag { client_id: 0x5eed, born_ms: client.cluster_map().now_ms, lane, seq };

        let first = send_tagged(dir, &client, &key, tag(0, 1));
        let Response::Written { meta, .. } = &first else { panic!("{first:?}") };
        assert_eq!(meta.generation, 1);
        let again = send_tagged(dir, &client, &key, tag(0, 1));
        if unsafe_skip_dedup {
            assert_eq!(counter(&client, &key), 2, "negative control: without deduplication the retry is applied again");
            continue;
        }
        assert_eq!(again, Response::Written { meta: meta.clone(), results: Vec::new(), index: written_index(&again) });
        assert_eq!(counter(&client, &key), 1);

        // The leader dies; the new one answers the retry from its own table.
        let victim = group_leader(dir, &key);
        // SAFETY: plain syscall on a process this test started.
        unsafe { libc::kill(node_field(dir, victim, "pid").as_u64().unwrap() as i32, libc::SIGKILL) };
        let after_kill = send_tagged(dir, &client, &key, tag(0, 1));
        assert!(matches!(&after_kill, Response::Written { meta: m, .. } if m == meta), "{after_kill:?}");
        assert_eq!(counter(&client, &key), 1);

        // The lane moves on to write 3 (2 was given up before it was sent): a delayed copy of
        // 1 or 2 is refused.
        assert!(matches!(send_tagged(dir, &client, &key, tag(0, 3)), Response::Written { .. }));
        assert_eq!(send_tagged(dir, &client, &key, tag(0, 1)), Response::Error(ErrorReply::StaleWrite));
        assert_eq!(send_tagged(dir, &client, &key, tag(0, 2)), Response::Error(ErrorReply::StaleWrite));
        assert_eq!(counter(&client, &key), 2);

        // The killed node restarts (its replay rebuilds its table); then the library's own
        // retries: four threads increment while the group's leader is SIGKILLed.
        chunkctl(dir, &["up"]);
        let key = Key::new("once", "busy");
        let victim = group_leader(dir, &key);
        let victim_pid = node_field(dir, victim, "pid").as_u64().unwrap();
        let client = std::sync::Arc::new(client);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (client, key, stop) = (client.clone(), key.clone(), stop.clone());
                std::thread::spawn(move || {
                    let (mut acked, mut in_doubt) = (0, 0);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let add = vec![chunkstore::Operation::Add { bin: "n".into(), delta: 1 }];
                        match client.operate("test", &key, add, &WritePolicy::default()) {
                            Ok(_) => acked += 1,
                            Err(ClientError::Server(ErrorReply::Timeout { in_doubt: true })) => in_doubt += 1,
                            Err(err) => panic!("increment: {err}"),
                        }
                    }
                    (acked, in_doubt)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: plain syscall on a process this test started.
        unsafe { libc::kill(victim_pid as i32, libc::SIGKILL) };
        // Past the election and the clients' retries, with increments going on throughout.
        let resumed = group_leader(dir, &key);
        assert_ne!(resumed, victim);
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (acked, in_doubt) = threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let total = counter(&client, &key);
        eprintln!("increments during a leader kill: {acked} acknowledged, {in_doubt} in doubt, counter {total}");
        assert!(acked <= total && total <= acked + in_doubt, "{acked} acked, {in_doubt} in doubt, counter {total}");
    }
}

fn written_index(response: &chunkstore::protocol::Response) -> u64 {
    match response {
        chunkstore::protocol::Response::Written { index, .. } => *index,
        other => panic!("{other:?}"),
    }
}

/// A node that was down while the others wrote on and dropped their logs behind snapshots
/// restarts and catches up by installing snapshots (streamed as files); afterwards it serves
/// every record: with either other node down, every acknowledged write is read back.
#[test]
fn a_restarted_node_catches_up_from_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let options = ["--chunkd-option", "snapshot-after-entries=20", "--chunkd-option", "entries-kept-after-snapshot=0"];
    let mut args = vec!["up", "--nodes", "3", "--device-size", "67108864"];
    args.extend(options);
    chunkctl(dir, &args);
    let _down = Down(dir);
    let seeds: Vec<String> = seeds(dir);
    let client = Client::connect(ClientConfig::new(seeds)).unwrap();
    let kill = |node: u64| {
        // SAFETY: plain syscall on a process this test started.
        unsafe { libc::kill(node_field(dir, node, "pid").as_u64().unwrap() as i32, libc::SIGKILL) };
    };
    let put = |k: i64, round: i64| {
        let bins = vec![Bin::new("v", Value::Int(k * 1000 + round))];
        client.put("test", &Key::new("snap", k), bins, &WritePolicy::default()).unwrap();
    };
    kill(3);
    // 16 groups × ~60 entries each: every group snapshots (every 20 entries) and purges.
    for round in 0..3 {
        for k in 0..320 {
            put(k, round);
        }
    }
    chunkctl(dir, &["up"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(dir.join("node3/chunkd.log")).unwrap();
        let installs = log.matches("installed snapshot").count();
        if installs >= 16 {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 installed {installs} snapshots, expected one per group");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Node 3 must now hold everything: with node 1 and then node 2 down, the groups are served
    // by node 3 and one other.
    for other in [1u64, 2] {
        kill(other);
        for k in 0..320 {
            let record = client.get_with("test", &Key::new("snap", k), None, ReadPolicy::Linearizable).unwrap();
            assert_eq!(record.and_then(|r| r.bin("v").cloned()), Some(Value::Int(k * 1000 + 2)), "record {k} with node {other} down");
        }
        chunkctl(dir, &["up"]);
    }
}

/// The cluster metadata decides: a node restarted with a configuration that disagrees with it
/// (another number of groups for a namespace) exits at start and says what differs, and
/// `chunkctl up` reports that at once; with its configuration put back, the node rejoins.
#[test]
fn a_node_whose_configuration_disagrees_with_the_cluster_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    let pid = node_field(dir, 3, "pid").as_u64().unwrap() as i32;
    // SAFETY: plain syscalls on a process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(Instant::now() < deadline, "node 3 did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let config_path = dir.join("node3/chunkd.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(config.contains("groups = 16"), "{config}");
    std::fs::write(&config_path, config.replace("groups = 16", "groups = 32")).unwrap();
    let started = Instant::now();
    let refused = run("chunkctl", &["--dir", dir.to_str().unwrap(), "up"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "node 3 started with a disagreeing configuration");
    assert!(stderr.contains("node 3 exited"), "{stderr}");
    assert!(stderr.contains("groups 32 configured, the cluster has 16"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "chunkctl up took {:?} to notice", started.elapsed());

    std::fs::write(&config_path, config).unwrap();
    chunkctl(dir, &["up"]);
    let now = status(dir);
    assert!(now["groups"].as_array().unwrap().iter().all(|g| g["state"] == "ok"), "{now}");
}

/// Starts chunkd for node `id` of the cluster in `dir` on its existing config and data, and
/// records its pid in cluster.json (so that `chunkctl down` stops it).
///
/// Twice in CI a restarted node found its port taken ("Address already in use") although
/// the port is reserved for its cluster and its old process had exited; it never happened
/// here. Such a start is retried (up to 10 times, 1 s apart), printing who holds the port.
fn start_node(dir: &Path, id: u64) -> std::process::Child {
    let node_dir = dir.join(format!("node{id}"));
    for attempt in 1.. {
        let log_path = node_dir.join("chunkd.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let before = std::fs::metadata(&log_path).map(|m| m.len() as usize).unwrap_or(0);
        let mut child = std::process::Command::new(chunkstore_tests::binary("chunkd"))
            .arg("--config")
            .arg(node_dir.join("chunkd.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        // A port taken shows within a moment: chunkd binds before anything else.
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut port_taken = false;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                port_taken = text.get(before..).is_some_and(|t| t.contains("Address already in use"));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if port_taken && attempt < 10 {
            let sockets = std::process::Command::new("ss").args(["-tanp"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let config = std::fs::read_to_string(node_dir.join("chunkd.toml")).unwrap();
            let ports: Vec<&str> = config.lines().filter(|l| l.contains("-listen")).filter_map(|l| l.rsplit(':').next()).map(|p| p.trim_matches('"')).collect();
            let holders: Vec<String> =
                sockets.unwrap_or_default().lines().filter(|l| ports.iter().any(|p| l.contains(&format!(":{p} ")))).map(str::to_owned).collect();
            eprintln!("node {id}: its port was taken (attempt {attempt}); sockets on its ports {ports:?}:\n{}", holders.join("\n"));
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        let mut cluster = cluster_json(dir);
        for node in cluster["nodes"].as_array_mut().unwrap() {
            if node["id"] == id {
                node["pid"] = serde_json::json!(child.id());
            }
        }
        std::fs::write(dir.join("cluster.json"), serde_json::to_string_pretty(&cluster).unwrap()).unwrap();
        return child;
    }
    unreachable!("the loop returns")
}

/// A linearizable read right after every node was SIGKILLed and restarted returns each key's
/// last acknowledged write. (Before the fix, a restarted leader resumed its old term and read
/// from a state machine that had not re-applied its last writes: found by chunkcheck.)
#[test]
fn a_linearizable_read_after_a_whole_cluster_restart_sees_the_last_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Frequent snapshots move each group's durable applied point (flushed engine + marker)
    // past the first entry of the leader's term, the read index a resumed leader would use.
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864", "--chunkd-option", "snapshot-after-entries=16"]);
    let _down = Down(dir);
    let seeds: Vec<String> = seeds(dir);
    let mut stale = Vec::new();
    let mut started: Vec<std::process::Child> = Vec::new();
    for round in 0..3i64 {
        let client = Client::connect(ClientConfig::new(seeds.clone())).unwrap();
        // Many writes per key right before the kill: the engine flushes lazily, so the last of
        // them exist only in the WAL when the nodes die.
        for generation in 1..=20i64 {
            for k in 0..32i64 {
                let bins = vec![Bin::new("v", Value::Int(round * 1000 + generation))];
                client.put("test", &Key::new("restart", k), bins, &WritePolicy::default()).unwrap();
            }
        }
        for node in cluster_json(dir)["nodes"].as_array().unwrap() {
            // SAFETY: plain syscall on a process this test started.
            unsafe { libc::kill(node["pid"].as_u64().unwrap() as i32, libc::SIGKILL) };
        }
        for mut child in started.drain(..) {
            let _ = child.wait();
        }
        std::thread::sleep(Duration::from_millis(300));
        // Readers knock from the moment the nodes come back, as clients retrying would: the
        // first answer of each key counts.
        let readers: Vec<_> = (0..4i64)
            .map(|reader| {
                let seeds = seeds.clone();
                std::thread::spawn(move || {
                    let config = ClientConfig { read_policy: ReadPolicy::Linearizable, timeout: Duration::from_millis(500), ..ClientConfig::new(seeds) };
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let client = loop {
                        match Client::connect(config.clone()) {
                            Ok(client) => break client,
                            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                            Err(err) => panic!("no node came back: {err}"),
                        }
                    };
                    let mut answers = Vec::new();
                    for k in (reader..32).step_by(4) {
                        let record = loop {
                            match client.get("test", &Key::new("restart", k), None) {
                                Ok(record) => break record,
                                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                                Err(err) => panic!("key {k} unreadable after the restart: {err}"),
                            }
                        };
                        answers.push((k, record.and_then(|r| r.bin("v").cloned())));
                    }
                    answers
                })
            })
            .collect();
        // One node at a time: a leader that comes back before its followers has its
        // replication in back-off when they return, while its read confirmations go through.
        for id in 1..=3u64 {
            started.push(start_node(dir, id));
            std::thread::sleep(Duration::from_millis(1200));
        }
        for reader in readers {
            for (k, value) in reader.join().unwrap() {
                if value != Some(Value::Int(round * 1000 + 20)) {
                    stale.push(format!("round {round} key {k}: {value:?}"));
                }
            }
        }
    }
    assert!(stale.is_empty(), "linearizable reads returned stale values after the restart:\n{}", stale.join("\n"));
}

/// The record `key` as node `node` holds it, read from that node alone (a session read with no
/// floor: whatever it has applied).
fn held_by(dir: &Path, client: &Client, node: u64, key: &Key) -> Option<chunkstore::Record> {
    use chunkstore::protocol::{Request, Response};
    let request = Request::Get { namespace: "test".into(), key: key.clone(), bins: None, read: ReadPolicy::Session, min_index: 0 };
    let addr = node_field(dir, node, "client");
    match client.call_node(addr.as_str().unwrap(), &request) {
        Ok(Response::Record { record, .. }) => record,
        other => panic!("node {node} answered a read with {other:?}"),
    }
}

/// Node 3's disk is replaced by one a quarter the size of its peers': it reaches stop-writes
/// first. Its peers learn it, so the leaders on nodes 1 and 2 refuse new writes too ("replica
/// node 3 ..."), and node 3 keeps applying every write that was acknowledged: it holds them all.
/// Deletes go on under stop-writes; once they free room, writes are accepted again and node 3
/// ends up with exactly what was acknowledged. Negative control: with leaders ignoring their
/// replicas' stop-writes, node 3's apply waits for room that never comes, and it never holds
/// every acknowledged write.
#[test]
fn a_replica_in_stop_writes_stops_new_writes_to_its_groups_and_holds_every_acknowledged_one() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    chunkctl(dir, &["down"]);
    // Nothing was written: node 3 starts on a new, blank 16 MiB device of 128 KiB blocks.
    let config_path = dir.join("node3").join("chunkd.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    assert!(config.contains("device-size = 67108864\n"), "{config}");
    let config = config.replace("device-size = 67108864\n", "device-size = 16777216\n[namespaces.storage]\nwrite-block-size = 131072\n");
    std::fs::write(&config_path, config).unwrap();
    std::fs::remove_file(dir.join("node3").join("data").join("test.dat")).unwrap();
    chunkctl(dir, &["up"]);
    // The refusals for node 3 come from leaders on nodes 1 and 2: right after a restart node 3
    // may lead every group until leadership is balanced (a CI run saw 8,279 refusals, all by
    // node 3 itself).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(dir)["groups"].as_array().unwrap().iter().any(|g| g["leader"].as_u64().is_some_and(|l| l != 3)) {
        assert!(Instant::now() < deadline, "node 3 still leads every group 30 s after the restart");
        std::thread::sleep(Duration::from_millis(250));
    }

    let seeds: Vec<String> = seeds(dir);
    let client = Client::connect(ClientConfig::new(seeds)).unwrap();
    let value = |k: i64| Value::Bytes(vec![k as u8; 4096]);
    let key = |k: i64| Key::new("full", k);
    let mut acknowledged = Vec::new();
    let mut refusals = Vec::new();
    let mut k = 0;
    // 16 MiB hold about 3,800 of these records: write until refused, then on until a leader
    // on node 1 or 2 has refused for node 3 (every group has a replica on node 3).
    while !refusals.iter().any(|r: &String| r.contains("replica node 3")) {
        assert!(k < 12_000, "{k} writes, {} refused, none for node 3 (the last: {:?})", refusals.len(), refusals.last());
        match client.put("test", &key(k), vec![Bin::new("v", value(k))], &WritePolicy::default()) {
            Ok(_) => acknowledged.push(k),
            Err(ClientError::Server(ErrorReply::StopWrites(reason))) => refusals.push(reason),
            Err(err) => panic!("write {k}: {err}"),
        }
        k += 1;
    }
    assert!(acknowledged.len() > 2_000, "only {} writes before stop-writes", acknowledged.len());
    let unexpected: Vec<&String> = refusals.iter().filter(|r| !(r.contains("/node3/") && r.contains("min-avail-pct"))).collect();
    assert!(unexpected.is_empty(), "refusals not for node 3's device: {:?}", &unexpected[..unexpected.len().min(3)]);

    // Node 3 holds every acknowledged write (it may still be applying the last ones).
    let deadline = Instant::now() + Duration::from_secs(60);
    for &k in &acknowledged {
        while held_by(dir, &client, 3, &key(k)).and_then(|r| r.bin("v").cloned()) != Some(value(k)) {
            assert!(Instant::now() < deadline, "node 3 does not hold acknowledged write {k} of {}", acknowledged.len());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // Deletes go through under stop-writes; once defragmentation frees node 3's blocks, new
    // writes are accepted again.
    for &k in &acknowledged {
        client.delete("test", &key(k), &WritePolicy::default()).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let again = loop {
        match client.put("test", &key(k), vec![Bin::new("v", value(k))], &WritePolicy::default()) {
            Ok(_) => break k,
            Err(ClientError::Server(ErrorReply::StopWrites(reason))) => {
                assert!(Instant::now() < deadline, "still in stop-writes after deleting everything: {reason}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(err) => panic!("write {k}: {err}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while held_by(dir, &client, 3, &key(again)).is_none() {
        assert!(Instant::now() < deadline, "node 3 never applied the write after the deletes");
        std::thread::sleep(Duration::from_millis(50));
    }
    for &k in &acknowledged {
        assert!(held_by(dir, &client, 3, &key(k)).is_none(), "node 3 still holds deleted record {k}");
        assert!(client.get("test", &key(k), None).unwrap().is_none(), "deleted record {k} is back");
    }
}

/// A replica whose data directory was wiped comes back empty. It must not help elect a leader
/// that lacks acknowledged writes: writes are acknowledged by nodes 1 and 3 while node 2 is
/// paused; then node 3 loses its disk and node 1 goes down. Nodes 2 and 3 are a majority of
/// every group, but node 2 lacks the writes and node 3 has nothing: an empty node 3 that
/// voted like a new one would make node 2 leader, and reads would miss acknowledged writes.
/// Node 3 instead waits for enough of its peers (node 1) to answer, no read misses a write,
/// and once node 1 is back node 3 catches up in every group and then serves with node 2
/// alone. Negative control: without the rejoin check, a read with node 1 down misses writes.
#[test]
fn a_wiped_replica_does_not_vote_until_it_has_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    let seeds: Vec<String> = seeds(dir);
    let client = Client::connect(ClientConfig::new(seeds.clone())).unwrap();
    let signal = |node: u64, signal: i32| {
        let pid = node_field(dir, node, "pid").as_u64().unwrap() as i32;
        // SAFETY: plain syscalls on a process this test started.
        unsafe { libc::kill(pid, signal) };
        if signal == libc::SIGKILL {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
                assert!(Instant::now() < deadline, "node {node} did not die");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let value = |record: Option<chunkstore::Record>| record.and_then(|r| r.bin("v").cloned());
    const KEYS: i64 = 64;

    signal(2, libc::SIGSTOP);
    for k in 0..KEYS {
        client.put("test", &Key::new("w", k), vec![Bin::new("v", Value::Int(k))], &WritePolicy::default()).unwrap();
    }
    signal(3, libc::SIGKILL);
    std::fs::remove_dir_all(dir.join("node3/data")).unwrap();
    signal(1, libc::SIGKILL);
    signal(2, libc::SIGCONT);
    // What node 3 logs from here on (its log file goes on from its first life).
    let node3_log = || std::fs::read_to_string(dir.join("node3/chunkd.log")).unwrap();
    let first_life = node3_log().len();
    let node3 = start_node(dir, 3);

    let impatient = Client::connect(ClientConfig {
        timeout: Duration::from_millis(300),
        retries_max: 1,
        retry_window: Duration::from_millis(300),
        ..ClientConfig::new(seeds.clone())
    })
    .unwrap();
    // At least 8 s (several election timeouts), and until node 3 says it waits for its peers
    // (first as a metadata voter whose log is empty: "waiting for enough of the other metadata
    // voters"; with node 1 down, it gets no further than that).
    let (started, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(60));
    while started.elapsed() < Duration::from_secs(8) || !node3_log()[first_life..].contains("waiting for enough of the other") {
        if Instant::now() >= deadline {
            let log = node3_log();
            let lines: Vec<&str> = log[first_life..].lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            panic!("node 3 did not say it waits for its peers; its log since the restart ends:\n{tail}");
        }
        for k in 0..KEYS {
            if let Ok(record) = impatient.get_with("test", &Key::new("w", k), None, ReadPolicy::Linearizable) {
                assert_eq!(value(record), Some(Value::Int(k)), "with node 1 down, a read missed acknowledged write {k}");
            }
        }
    }

    let node1 = start_node(dir, 1);
    for k in 0..KEYS {
        let record = client.get_with("test", &Key::new("w", k), None, ReadPolicy::Linearizable).unwrap();
        assert_eq!(value(record), Some(Value::Int(k)), "acknowledged write {k} lost");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The partition groups' (the metadata group's line says namespace="$meta").
        let log = node3_log();
        let caught_up = log[first_life..]
            .lines()
            .filter(|l| l.contains("caught up from the group's leader: this replica votes again") && l.contains("namespace=\"test\""))
            .count();
        if caught_up == 16 {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 caught up in {caught_up} of 16 groups");
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(1, libc::SIGKILL);
    for k in 0..KEYS {
        let record = client.get_with("test", &Key::new("w", k), None, ReadPolicy::Linearizable).unwrap();
        assert_eq!(value(record), Some(Value::Int(k)), "write {k} not on nodes 2 and 3 once node 3 caught up");
    }
    chunkctl(dir, &["down"]);
    for mut child in [node1, node3] {
        let _ = child.wait();
    }
}

/// Replica reads. `AllowReplica`: a follower answers a read only once it has applied what the
/// client has seen of the group (a follower paused while a write committed, read right after
/// it resumes, never returns the older value: it answers the new one or NotLeader), and the
/// client reads its own writes whichever replica it picks. `AllowUnavailable`: with two of three
/// nodes killed after a write the third missed, a linearizable read fails while an
/// allow-unavailable read answers from the survivor with the last value it committed: stale for
/// the client that saw the newer write, never dirty.
#[test]
fn replica_reads_never_go_back_for_the_client_and_allow_unavailable_reads_survive_a_lost_quorum() {
    use chunkstore::protocol::{Request, Response};
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    let seeds: Vec<String> = seeds(dir);
    let client = Client::connect(ClientConfig::new(seeds.clone())).unwrap();
    let key = Key::new("replica", 1);
    let value = |record: Option<chunkstore::Record>| record.and_then(|r| r.bin("v").cloned());
    for round in 0..200 {
        client.put("test", &key, vec![Bin::new("v", Value::Int(round))], &WritePolicy::default()).unwrap();
        let read = client.get_with("test", &key, None, ReadPolicy::AllowReplica).unwrap();
        assert_eq!(value(read), Some(Value::Int(round)), "an allow-replica read missed this client's own write");
    }

    let leader = group_leader(dir, &key);
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let follower_pid = node_field(dir, follower, "pid").as_u64().unwrap() as i32;
    let follower_addr = node_field(dir, follower, "client").as_str().unwrap().to_owned();
    let leader_addr = node_field(dir, leader, "client").as_str().unwrap().to_owned();
    let mut stale_refused = 0;
    for round in 0..5 {
        // SAFETY: plain syscalls on a process this test started.
        unsafe { libc::kill(follower_pid, libc::SIGSTOP) };
        let response = send_put(&leader_addr, &client, &key, 1000 + round);
        let index = written_index(&response);
        unsafe { libc::kill(follower_pid, libc::SIGCONT) };
        let request = Request::Get { namespace: "test".into(), key: key.clone(), bins: None, read: ReadPolicy::AllowReplica, min_index: index };
        match client.call_node(&follower_addr, &request).unwrap() {
            Response::Record { record, .. } => assert_eq!(value(record), Some(Value::Int(1000 + round)), "a follower behind the client answered"),
            Response::Error(ErrorReply::NotLeader { .. }) => stale_refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    println!("a follower just resumed refused {stale_refused} of 5 reads as behind");

    let last_on_follower = Value::Int(1004);
    std::thread::sleep(Duration::from_secs(1)); // every replica applies the last write
                                                // The follower misses the next write for good: killed while the other two commit it, and
                                                // they are killed before it comes back. (A pause would not do: the leader's messages wait
                                                // in the paused process's socket and reach it on SIGCONT.)
    unsafe { libc::kill(follower_pid, libc::SIGKILL) };
    client.put("test", &key, vec![Bin::new("v", Value::Int(2000))], &WritePolicy::default()).unwrap();
    let read = client.get_with("test", &key, None, ReadPolicy::Linearizable).unwrap();
    assert_eq!(value(read), Some(Value::Int(2000)), "the client sees the write the follower missed");
    for node in (1..=3).filter(|n| *n != follower) {
        let pid = node_field(dir, node, "pid").as_u64().unwrap() as i32;
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut restarted = start_node(dir, follower);
    let impatient_config = ClientConfig {
        timeout: Duration::from_millis(500),
        retries_max: 2,
        retry_window: Duration::from_secs(1),
        ..ClientConfig::new(vec![follower_addr.clone()])
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let impatient = loop {
        match Client::connect(impatient_config.clone()) {
            Ok(client) => break client,
            Err(err) => assert!(Instant::now() < deadline, "the restarted follower did not answer within 30 s: {err}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(impatient.get_with("test", &key, None, ReadPolicy::Linearizable).is_err(), "a linearizable read answered without a quorum");
    // The client that saw 2000 reads through the survivor: stale (behind what it saw), yet the
    // last value the survivor had committed, never anything else.
    let read = loop {
        match client.get_with("test", &key, None, ReadPolicy::AllowUnavailable) {
            Ok(read) => break read,
            Err(err) => assert!(Instant::now() < deadline, "no allow-unavailable read answered within 30 s: {err}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(value(read), Some(last_on_follower), "an allow-unavailable read from the survivor");

    // The survivor's metrics count the read it just answered; status says what is wrong.
    let metrics = scrape_metrics(node_field(dir, follower, "metrics").as_str().unwrap());
    let gets_ok = metric(&metrics, "chunkstore_requests_total{kind=\"get\",outcome=\"ok\"}");
    assert!(gets_ok >= 1.0, "no get counted:\n{metrics}");
    assert!(metric(&metrics, "chunkstore_wal_fsyncs_total") > 0.0);
    assert_eq!(metric(&metrics, "chunkstore_stop_writes{namespace=\"test\"}"), 0.0);
    let health = &status(dir)["health"];
    assert_eq!(health["ok"], false);
    let problems: Vec<&str> = health["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let killed: Vec<u64> = (1..=3).filter(|n| *n != follower).collect();
    let unreachable = format!("nodes {} and {} unreachable", killed[0], killed[1]);
    let group = chunkstore::raft::group_of(&key.digest, 16);
    let expected = format!("namespace test: group {group} has no quorum: {unreachable}");
    assert!(problems.iter().any(|p| p.starts_with(&expected)), "no problem reads {expected:?}: {problems:?}");
    chunkctl(dir, &["down"]);
    let _ = restarted.wait();
}

/// One put sent straight to `leader_addr` (a fresh client id each time).
fn send_put(leader_addr: &str, client: &Client, key: &Key, v: i64) -> chunkstore::protocol::Response {
    use chunkstore::protocol::{Request, Response, WriteTag};
    let client_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let tag = WriteTag { client_id, born_ms: client.cluster_map().now_ms, lane: 0, seq: 1 };
    let request = Request::Write {
        namespace: "test".into(),
        key: key.clone(),
        op: chunkstore::WriteOp::Put(vec![Bin::new("v", Value::Int(v))]),
        policy: WritePolicy::default(),
        tag,
    };
    match client.call_node(leader_addr, &request) {
        Ok(response @ Response::Written { .. }) => response,
        other => panic!("the leader did not take the write: {other:?}"),
    }
}

/// Offsets of node `id`'s newest WAL segment holding records, and of its records' entries:
/// (segment path, (offset, is an entry) of every record in file order, end of the records).
fn wal_records(dir: &Path, id: u64) -> (std::path::PathBuf, Vec<(usize, bool)>, usize) {
    use chunkstore::wal::format::{decode_at, Decoded, Step, SEGMENT_HEADER_BYTES};
    let wal = dir.join(format!("node{id}/data/wal"));
    let mut segments: Vec<_> = std::fs::read_dir(&wal).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    for path in segments.into_iter().rev() {
        let data = std::fs::read(&path).unwrap();
        let (mut records, mut pos) = (Vec::new(), SEGMENT_HEADER_BYTES);
        loop {
            match decode_at(&data, pos, 16 << 20) {
                (Step::Record(record), next) => {
                    records.push((pos, matches!(record, Decoded::Entry { .. })));
                    pos = next;
                }
                (Step::Padding, next) => pos = next,
                _ => break,
            }
        }
        if !records.is_empty() {
            return (path, records, pos);
        }
    }
    panic!("node {id} has no WAL records");
}

/// What a read of each of the keys `w/0..keys` found while only nodes 2 and 3 run, node 3's
/// WAL damaged: one byte flipped in the first log entry of 64 acknowledged puts that only
/// nodes 1 and 3 took (node 2 was stopped), in the middle of its newest segment with synced
/// flushes after it. Returns the keys a read found without their acknowledged value (lost),
/// and the cluster (still up, node 1 down).
fn wal_damage_run(dir: &Path, options: &[&str]) -> (Vec<i64>, Client, std::process::Child) {
    let mut args = vec!["up", "--nodes", "3", "--device-size", "67108864"];
    args.extend_from_slice(options);
    chunkctl(dir, &args);
    let seeds: Vec<String> = seeds(dir);
    let client = Client::connect(ClientConfig::new(seeds.clone())).unwrap();
    let signal = |node: u64, signal: i32| {
        let pid = node_field(dir, node, "pid").as_u64().unwrap() as i32;
        // SAFETY: plain syscalls on a process this test started.
        unsafe { libc::kill(pid, signal) };
        if signal == libc::SIGKILL {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
                assert!(Instant::now() < deadline, "node {node} did not die");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    const KEYS: i64 = 64;
    // Every group has a leader and its first entries before node 3's log is measured.
    for k in 0..16 {
        client.put("test", &Key::new("warm", k), vec![Bin::new("v", Value::Int(k))], &WritePolicy::default()).unwrap();
    }
    signal(2, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    let (before_path, _, before_end) = wal_records(dir, 3);
    for k in 0..KEYS {
        client.put("test", &Key::new("w", k), vec![Bin::new("v", Value::Int(k))], &WritePolicy::default()).unwrap();
    }
    signal(3, libc::SIGKILL);
    let (path, records, end) = wal_records(dir, 3);
    assert_eq!(path, before_path, "node 3 started a new segment during the puts");
    let (damaged, _) = *records.iter().find(|(offset, entry)| *entry && *offset >= before_end).expect("an entry of the puts");
    assert!(end > damaged + 8192, "synced flushes follow the damaged entry: it is at {damaged}, the records end at {end}");
    let mut data = std::fs::read(&path).unwrap();
    data[damaged + 40] ^= 0x01;
    std::fs::write(&path, &data).unwrap();
    signal(1, libc::SIGKILL);
    signal(2, libc::SIGCONT);
    let node3 = start_node(dir, 3);

    let impatient = Client::connect(ClientConfig {
        timeout: Duration::from_millis(300),
        retries_max: 1,
        retry_window: Duration::from_millis(300),
        ..ClientConfig::new(seeds)
    })
    .unwrap();
    // Several election timeouts: long enough for nodes 2 and 3 to elect leaders if node 3
    // votes on what is left of its log.
    let mut lost = std::collections::BTreeSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        for k in 0..KEYS {
            if let Ok(record) = impatient.get_with("test", &Key::new("w", k), None, ReadPolicy::Linearizable) {
                if record.and_then(|r| r.bin("v").cloned()) != Some(Value::Int(k)) {
                    lost.insert(k);
                }
            }
        }
    }
    (lost.into_iter().collect(), client, node3)
}

/// A byte flipped in an acknowledged entry in the middle of a node's newest WAL segment (the
/// case the torn-tail rule took for a crash): the node reports the corruption, sets its data
/// directory aside, and rebuilds from its peers without voting until caught up, so with the one
/// other replica that holds the writes down, no read finds an acknowledged write missing; once
/// that replica is back, node 3 catches up in every group, and then holds every write (read
/// with node 1 down again). The negative control below is the same run on the old rule.
#[test]
fn a_corrupt_wal_is_reported_and_rebuilt_from_peers_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let _down = Down(dir);
    let node3_log = || std::fs::read_to_string(dir.join("node3/chunkd.log")).unwrap();
    let (lost, client, node3) = wal_damage_run(dir, &[]);
    assert!(lost.is_empty(), "reads missed acknowledged writes {lost:?}");
    assert!(node3_log().contains("the write-ahead log is corrupt"), "node 3 did not report the corruption");
    let set_aside: Vec<_> = std::fs::read_dir(dir.join("node3/data/damaged")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(set_aside.len(), 1, "{set_aside:?}");
    let report = std::fs::read_to_string(set_aside[0].join("REPORT")).unwrap();
    assert!(report.contains("a flush that was synced"), "{report}");
    assert!(set_aside[0].join("wal").is_dir() && set_aside[0].join("test.dat").exists(), "the WAL and the device were set aside");

    let node1 = start_node(dir, 1);
    let value = |k: i64| client.get_with("test", &Key::new("w", k), None, ReadPolicy::Linearizable).unwrap().and_then(|r| r.bin("v").cloned());
    for k in 0..64 {
        assert_eq!(value(k), Some(Value::Int(k)), "acknowledged write {k} lost");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let groups: std::collections::BTreeSet<String> = node3_log()
            .lines()
            .filter(|l| l.contains("caught up from the group's leader: this replica votes again") && l.contains("namespace=\"test\""))
            .filter_map(|l| l.split("group=").nth(1).and_then(|g| g.split_whitespace().next()).map(str::to_owned))
            .collect();
        if groups.len() == 16 {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 caught up in {} of 16 groups: {groups:?}", groups.len());
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = node_field(dir, 1, "pid").as_u64().unwrap() as i32;
    // SAFETY: plain syscall on a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    for k in 0..64 {
        assert_eq!(value(k), Some(Value::Int(k)), "write {k} not on nodes 2 and 3 once node 3 was rebuilt");
    }
    chunkctl(dir, &["down"]);
    for mut child in [node1, node3] {
        let _ = child.wait();
    }
}

/// Negative control: with the torn-tail rule of WAL format 2 (`unsafe-wal-torn-tail-rule`),
/// node 3 cuts its log at the flipped byte and votes on what is left: it and node 2, which
/// never had the writes, elect leaders without them, and reads find acknowledged writes gone.
#[test]
fn the_old_torn_tail_rule_loses_acknowledged_writes_on_a_corrupt_wal() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let _down = Down(dir);
    let (lost, _client, node3) = wal_damage_run(dir, &["--chunkd-option", "unsafe-wal-torn-tail-rule = true"]);
    assert!(!lost.is_empty(), "the old rule lost nothing: the test cannot tell the rules apart");
    assert!(!dir.join("node3/data/damaged").exists());
    chunkctl(dir, &["down"]);
    let mut node3 = node3;
    let _ = node3.wait();
}
