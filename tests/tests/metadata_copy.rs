//! The metadata group when its voters lose their disks, with real processes on three nodes
//! (all three metadata voters):
//!
//! 1. A voter that lost its copy does not vote before it caught up. Sessions are opened while
//!    node 3 is down (committed on nodes 1 and 2); then node 2 is wiped and only nodes 2 and 3
//!    start. An empty node 2 that voted would elect node 3, which never saw those sessions and
//!    would hand their ids out again; instead the metadata group has no leader until node 1
//!    returns, and node 2 then catches up from it.
//! 2. A metadata group two of whose three voters lost their copy is dead: `chunkctl status`
//!    says so, and `chunkctl revive '$meta' 0` rebuilds it from the surviving voter; the wiped
//!    nodes then join, and the partition groups, dead too, are revived one by one, with every
//!    record the survivor held.
//!
//! Negative control: a metadata voter that neither waits for enough voters to answer nor
//! takes itself for one that lost its copy (as before this check existed) votes at once; node
//! 3 is elected in step 1 and opens session 1 again, an id already handed out, and the test
//! fails. (Without the waiting alone, node 2 still waits for node 1: each layer holds.)

use std::path::Path;
use std::time::{Duration, Instant};

use chunkstore::client::{Client, ClientConfig};
use chunkstore::protocol::ReadPolicy;
use chunkstore::{Bin, Key, Value, WritePolicy};
use chunkstore_tests::local::{chunkctl, chunkctl_ok, kill_node, seeds, start_node, Down};
use serde_json::Value as Json;

/// A client that gives up after a few seconds.
fn impatient_client(dir: &Path) -> Client {
    let config = ClientConfig { timeout: Duration::from_secs(1), retry_window: Duration::from_secs(3), ..ClientConfig::new(seeds(dir)) };
    Client::connect(config).unwrap()
}

/// Waits up to `seconds` until `check` holds for `chunkctl status --json`.
fn wait_for_status(dir: &Path, what: &str, seconds: u64, check: impl Fn(&Json) -> bool) -> Json {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        // No node answers while none has joined yet.
        let output = chunkctl(dir, &["status", "--json"]);
        let now: Json = serde_json::from_slice(&output.stdout).unwrap_or(Json::Null);
        if check(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "never {what} within {seconds} s: {now} {}", String::from_utf8_lossy(&output.stderr));
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wipe(dir: &Path, node: u64) {
    std::fs::remove_dir_all(dir.join(format!("node{node}")).join("data")).unwrap();
}

fn metadata_is_ok(status: &Json) -> bool {
    status["metadata"]["state"] == "ok" && status["metadata"]["lost_copy"].as_array().is_some_and(|l| l.is_empty())
}

#[test]
fn metadata_voters_that_lost_their_disks_catch_up_before_voting_and_a_dead_metadata_group_is_revived() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let dir = dir.as_path();
    chunkctl_ok(dir, &["up", "--nodes", "3", "--groups", "4"]);
    let _down = Down(dir);

    // Records, and sessions opened while node 3 is down: on nodes 1 and 2 only.
    let client = Client::connect(ClientConfig::new(seeds(dir))).unwrap();
    let keys: Vec<Key> = (0..20).map(|n| Key::new("meta", n as i64)).collect();
    for (n, key) in keys.iter().enumerate() {
        client.put("test", key, vec![Bin::new("v", Value::Int(n as i64))], &WritePolicy::default()).unwrap();
    }
    kill_node(dir, 3);
    let mut sessions: Vec<u64> = (0..5).map(|_| client.open_session(Duration::from_secs(600)).unwrap()).collect();
    drop(client);

    // Node 2 loses its disk; nodes 2 and 3 start without node 1.
    chunkctl_ok(dir, &["down"]);
    wipe(dir, 2);
    let mut children = vec![start_node(dir, 2), start_node(dir, 3)];
    std::thread::sleep(Duration::from_secs(8));
    // Node 2 must not vote: node 3 alone has no quorum, so no session can be opened (and
    // certainly none with an id handed out before).
    match impatient_client(dir).open_session(Duration::from_secs(600)) {
        Err(_) => {}
        Ok(id) => panic!(
            "the metadata group elected a leader without node 1, with node 2's vote after its disk was wiped: it opened session {id}{}",
            if sessions.contains(&id) { ", an id already handed out" } else { "" }
        ),
    }
    children.push(start_node(dir, 1));
    let now = wait_for_status(dir, "the metadata group back with node 2 caught up", 60, metadata_is_ok);
    assert_eq!(now["metadata"]["voters"], serde_json::json!([1, 2, 3]), "{now}");
    let log = std::fs::read_to_string(dir.join("node2").join("chunkd.log")).unwrap();
    assert!(log.contains("lost its copy of the metadata group"), "node 2 did not notice it lost its copy");
    let client = Client::connect(ClientConfig::new(seeds(dir))).unwrap();
    let id = client.open_session(Duration::from_secs(600)).unwrap();
    assert!(sessions.iter().all(|s| *s < id), "session {id} after sessions {sessions:?}: an id went backwards");
    sessions.push(id);
    drop(client);

    // Nodes 2 and 3 lose their disks: the metadata group (and every partition group) is dead.
    for child in &mut children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    wipe(dir, 2);
    wipe(dir, 3);
    let mut children = vec![start_node(dir, 1), start_node(dir, 2), start_node(dir, 3)];
    let now = wait_for_status(dir, "the metadata group dead", 60, |s| s["metadata"]["state"] == "dead");
    assert_eq!(now["metadata"]["lost_copy"], serde_json::json!([2, 3]), "{now}");
    let words = chunkctl_ok(dir, &["status"]);
    assert!(words.contains("the metadata group is dead") && words.contains("chunkctl revive '$meta' 0"), "{words}");

    let revived: Json = serde_json::from_str(&chunkctl_ok(dir, &["revive", "$meta", "0", "--json"])).unwrap();
    assert_eq!(revived["survivor"].as_u64(), Some(1), "{revived}");
    // The wiped nodes join once the metadata group leads again; their partition groups are
    // dead (two of three copies lost) until revived too.
    let now = wait_for_status(dir, "every group dead or ok after the metadata came back", 60, |s| {
        metadata_is_ok(s) && s["groups"].as_array().unwrap().iter().all(|g| g["state"] == "dead" || g["state"] == "ok")
    });
    let dead: Vec<u64> = now["groups"].as_array().unwrap().iter().filter(|g| g["state"] == "dead").map(|g| g["group"].as_u64().unwrap()).collect();
    assert_eq!(dead, vec![0, 1, 2, 3], "every group lost two of its three copies: {now}");
    for group in dead {
        let revived: Json = serde_json::from_str(&chunkctl_ok(dir, &["revive", "test", &group.to_string(), "--json"])).unwrap();
        assert_eq!(revived["survivor"].as_u64(), Some(1), "{revived}");
    }
    wait_for_status(dir, "every group ok with every copy back", 60, |s| {
        s["groups"].as_array().unwrap().iter().all(|g| g["state"] == "ok" && g["lost_copy"].as_array().is_some_and(|l| l.is_empty()))
    });
    let client = Client::connect(ClientConfig::new(seeds(dir))).unwrap();
    for (n, key) in keys.iter().enumerate() {
        let record = client.get_with("test", key, None, ReadPolicy::Linearizable).unwrap();
        assert_eq!(record.and_then(|r| r.bins.first().map(|b| b.value.clone())), Some(Value::Int(n as i64)), "a record the survivor held is gone");
    }
    let id = client.open_session(Duration::from_secs(600)).unwrap();
    assert!(sessions.iter().all(|s| *s < id), "session {id} after sessions {sessions:?}: an id went backwards");
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
}
