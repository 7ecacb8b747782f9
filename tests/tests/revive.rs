//! Dead and unavailable groups with real processes, on five nodes (RF 3): a group whose
//! replicas are only down shows `unavailable` and comes back by itself when they return; a
//! group two of whose three replicas lost their disks shows `dead`, refuses service with
//! PartitionDead, and `chunkctl revive` rebuilds it from the surviving replica, saying which
//! writes were lost: exactly those acknowledged above the survivor's last log index.
//!
//! Negative control: with `Node::is_dead` always false, nothing takes the wiped group for dead
//! and the test fails: `chunkctl up` waits for it to elect a leader ("the cluster did not
//! elect a leader for every group within 60s").

use std::path::Path;
use std::time::{Duration, Instant};

use chunkstore::client::{Client, ClientConfig, ClientError};
use chunkstore::protocol::{ErrorReply, ReadPolicy};
use chunkstore::{Bin, Key, Value, WritePolicy};
use chunkstore_tests::local::{chunkctl, chunkctl_ok, kill_node, seeds, status, Down};
use serde_json::Value as Json;

fn group_state(dir: &Path, group: u64) -> String {
    status(dir)["groups"][group as usize]["state"].as_str().unwrap().to_owned()
}

/// Waits up to `seconds` for group `group`'s state to be `state`.
fn wait_for_state(dir: &Path, group: u64, state: &str, seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        let seen = group_state(dir, group);
        if seen == state {
            return;
        }
        assert!(Instant::now() < deadline, "group {group} never showed {state} within {seconds} s (last: {seen}): {}", status(dir));
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `count` keys of group `group` (of 16), named `prefix`N.
fn keys_in_group(prefix: &str, group: u32, count: usize) -> Vec<Key> {
    (0..).map(|n| Key::new("dead", format!("{prefix}{n}").as_str())).filter(|key| chunkstore::raft::group_of(&key.digest, 16) == group).take(count).collect()
}

/// Writes each key (value = its position) and returns the log index each write was
/// acknowledged at.
fn write_all(client: &Client, keys: &[Key], group: u32) -> Vec<u64> {
    keys.iter()
        .enumerate()
        .map(|(n, key)| {
            client.put("test", key, vec![Bin::new("v", Value::Int(n as i64))], &WritePolicy::default()).unwrap();
            client.seen_index("test", group)
        })
        .collect()
}

#[test]
fn a_group_that_lost_a_majority_of_its_copies_is_dead_until_revived_and_says_what_was_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let dir = dir.as_path();
    chunkctl_ok(dir, &["up", "--nodes", "5", "--groups", "16"]);
    let _down = Down(dir);

    // A group with replicas on nodes 4 and 5 (and one of 1..3, the survivor to be), and one
    // with exactly one of them.
    let status_now = status(dir);
    let groups = status_now["groups"].as_array().unwrap();
    let replicas = |g: &Json| -> Vec<u64> { g["replicas"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect() };
    let doomed = groups.iter().find(|g| replicas(g).contains(&4) && replicas(g).contains(&5)).expect("no group on both 4 and 5");
    let group = doomed["group"].as_u64().unwrap();
    let survivor = replicas(doomed).into_iter().find(|r| *r <= 3).unwrap();
    let single = groups.iter().find(|g| replicas(g).contains(&4) != replicas(g).contains(&5)).expect("no group on one of 4 and 5")["group"].as_u64().unwrap();

    // Only down, disks intact: unavailable, and back by itself.
    kill_node(dir, 4);
    kill_node(dir, 5);
    wait_for_state(dir, group, "unavailable", 30);
    let output = chunkctl(dir, &["revive", "test", &group.to_string()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not dead"), "{}", String::from_utf8_lossy(&output.stderr));
    chunkctl_ok(dir, &["up"]);
    wait_for_state(dir, group, "ok", 30);

    // Writes the survivor holds, then writes it misses (it is down; nodes 4 and 5 commit them).
    let client = Client::connect(ClientConfig::new(seeds(dir))).unwrap();
    let kept = keys_in_group("kept", group as u32, 10);
    let kept_at = write_all(&client, &kept, group as u32);
    kill_node(dir, survivor);
    let missed = keys_in_group("missed", group as u32, 10);
    let missed_at = write_all(&client, &missed, group as u32);
    drop(client);

    // Nodes 4 and 5 lose their disks.
    chunkctl_ok(dir, &["down"]);
    for node in [4, 5] {
        std::fs::remove_dir_all(dir.join(format!("node{node}")).join("data")).unwrap();
    }
    chunkctl_ok(dir, &["up"]);
    wait_for_state(dir, group, "dead", 30);
    wait_for_state(dir, single, "ok", 30);
    let words = chunkctl_ok(dir, &["status"]);
    assert!(words.contains(&format!("namespace test: group {group} is dead")) && words.contains(&format!("chunkctl revive test {group}")), "{words}");

    // It refuses service, saying so.
    let client = Client::connect(ClientConfig::new(seeds(dir))).unwrap();
    match client.put("test", &kept[0], vec![Bin::new("v", Value::Int(-1))], &WritePolicy::default()) {
        Err(ClientError::Server(ErrorReply::PartitionDead { namespace, group: g })) => assert_eq!((namespace.as_str(), g as u64), ("test", group)),
        other => panic!("a write to a dead group answered {other:?}"),
    }
    for policy in [ReadPolicy::Linearizable, ReadPolicy::Session] {
        match client.get_with("test", &kept[0], None, policy) {
            Err(ClientError::Server(ErrorReply::PartitionDead { namespace, group: g })) => assert_eq!((namespace.as_str(), g as u64), ("test", group)),
            other => panic!("a {policy:?} read of a dead group answered {other:?}"),
        }
    }

    let revived: Json = serde_json::from_str(&chunkctl_ok(dir, &["revive", "test", &group.to_string(), "--json"])).unwrap();
    assert_eq!(revived["survivor"].as_u64(), Some(survivor), "{revived}");
    let last_index = revived["last_index"].as_u64().unwrap();
    let report = revived["report"].as_str().unwrap();
    assert!(report.contains(&format!("above {last_index} are lost")), "{report}");
    // The report is exact: every write at or below the index is there, every one above gone.
    assert!(kept_at.iter().all(|i| *i <= last_index), "kept writes at {kept_at:?}, survivor's log reaches {last_index}");
    assert!(missed_at.iter().all(|i| *i > last_index), "missed writes at {missed_at:?}, survivor's log reaches {last_index}");
    wait_for_state(dir, group, "ok", 30);
    for (n, key) in kept.iter().enumerate() {
        let record = client.get_with("test", key, None, ReadPolicy::Linearizable).unwrap();
        assert_eq!(record.and_then(|r| r.bins.first().map(|b| b.value.clone())), Some(Value::Int(n as i64)), "a write the survivor held is gone");
    }
    for key in &missed {
        let record = client.get_with("test", key, None, ReadPolicy::Linearizable).unwrap();
        assert!(record.is_none(), "a write reported lost is there: {record:?}");
    }
    // Serving again, on all three replicas (the two wiped ones catch up from the survivor).
    client.put("test", &kept[0], vec![Bin::new("v", Value::Int(100))], &WritePolicy::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(dir)["groups"][group as usize]["lost_copy"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the wiped replicas did not catch up: {}", status(dir));
        std::thread::sleep(Duration::from_millis(500));
    }
    let output = chunkctl(dir, &["revive", "test", &group.to_string()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("not dead"), "{}", String::from_utf8_lossy(&output.stderr));
    eprintln!("{report}");
}
