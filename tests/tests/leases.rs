//! Lease sessions and locks with real processes: a lock holder (`chunkctl lock`, writing under
//! its session) that is SIGSTOPped past its lease, or cut off from the cluster with iptables,
//! loses the lock to a waiter, and none of its writes lands after the waiter took the lock:
//! every write it tries afterwards is refused with SessionExpired (unique write ownership, as
//! shared-storage failover of a JMS server needs).
//!
//! Another cuts the holder off together with the node it runs beside, the metadata leader.
//!
//! A fourth test cuts the metadata leader off from the leader of a data group (a link of a ring
//! partition): the expired session is fenced in that group through the third node, which relays
//! the fence (`FenceSession`'s `relay`), so the waiter takes the lock while the cut lasts.
//! Negative control: with the relay disabled (`relay` never set), the waiter does not get the
//! lock ("the waiter did not take the lock while the cut lasted").
//!
//! Negative controls: with the fence check in `raft::state_machine::record_write` disabled,
//! the tests with a paused or cut-off holder fail ("the old holder's write ... was accepted after the lock changed hands");
//! with its `LockHeld` check disabled, "a lock held by a live session was taken".

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunkstore::client::{Client, ClientConfig, ClientError};
use chunkstore::protocol::ErrorReply;
use chunkstore::{Key, Value};
use chunkstore_tests::local::status;
use chunkstore_tests::{binary, run, Cut};
use serde_json::Value as Json;

fn chunkctl(dir: &Path, args: &[&str]) {
    let mut all = vec!["--dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let output = run("chunkctl", &all);
    assert!(output.status.success(), "chunkctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Stops the cluster even if the test fails.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = run("chunkctl", &["--dir", self.0.to_str().unwrap(), "down"]);
    }
}

/// A `chunkctl lock` process and the JSON events it printed so far.
struct Holder {
    child: Child,
    events: Arc<Mutex<Vec<Json>>>,
}

impl Holder {
    fn start(dir: &Path, args: &[&str]) -> Holder {
        let mut child = Command::new(binary("chunkctl"))
            .args(["--dir", dir.to_str().unwrap()])
            .args(["lock", "test", "locks", "L"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let (stdout, sink) = (child.stdout.take().unwrap(), events.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(event) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(event);
                }
            }
        });
        Holder { child, events }
    }

    fn events(&self) -> Vec<Json> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the events, or fails saying `what`.
    fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&[Json]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.events()) {
            assert!(Instant::now() < deadline, "{what}; events: {:?}", self.events());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn session(&self) -> u64 {
        self.events().iter().find(|e| e["event"] == "session").and_then(|e| e["session"].as_u64()).expect("a session event")
    }

    fn signal(&self, signal: i32) {
        // SAFETY: a plain syscall on a process this test started.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn writes(events: &[Json]) -> Vec<&Json> {
    events.iter().filter(|e| e["event"] == "write").collect()
}

fn ok_writes(events: &[Json]) -> usize {
    writes(events).iter().filter(|e| e["ok"] == true).count()
}

/// The (session, n) entries of the data record's log, in the order they were applied.
fn applied_log(dir: &Path) -> Vec<(u64, u64)> {
    let cluster: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json")).unwrap()).unwrap();
    let seeds = cluster["nodes"].as_array().unwrap().iter().map(|n| n["client"].as_str().unwrap().to_owned()).collect();
    let client = Client::connect(ClientConfig::new(seeds)).unwrap();
    let record = client.get_with("test", &Key::new("locks", "L-data"), None, chunkstore::protocol::ReadPolicy::Linearizable).unwrap();
    let Some(Value::String(log)) = record.and_then(|r| r.bin("log").cloned()) else { panic!("no log written") };
    log.split_terminator(';')
        .map(|entry| {
            let (session, n) = entry.split_once(':').unwrap();
            (session.parse().unwrap(), n.parse().unwrap())
        })
        .collect()
}

/// The host (IP address) of node `id` in a `chunkctl status --json` answer.
fn node_host(status: &Json, id: u64) -> String {
    let node = status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap();
    node["address"].as_str().unwrap().rsplit_once(':').unwrap().0.to_owned()
}

/// What the tests check once the old holder `a` was cut off (paused or partitioned) while a
/// waiter `b` took the lock and wrote 10 times, and `a` then ran again:
/// - `a`'s writes after it ran again are all refused with SessionExpired, and its keep-alive
///   learnt that the session expired;
/// - in the record, every write of `a` comes before every write of `b`, `b` wrote 1..=10, and
///   every write `a` saw acknowledged is there (at most one more: the one in flight when it was
///   cut off, applied before the fence, its answer lost).
fn check_unique_ownership(dir: &Path, a: &Holder, b: &Holder, a_ok_before: usize, a_events_before: usize) {
    a.wait_until("the old holder wrote 5 more times", Duration::from_secs(60), |events| writes(&events[a_events_before..]).len() >= 5);
    let events = a.events();
    let later = writes(&events[a_events_before..]);
    // The first may be the write in flight when it was cut off (applied before the fence).
    for event in &later[1..] {
        assert_eq!(event["ok"], false, "the old holder's write {event} was accepted after the lock changed hands");
        assert_eq!(event["session_expired"], true, "the old holder's write was refused for another reason: {event}");
        // Its own view agrees: no renewal it sent within a TTL was confirmed (`KeptSession::held`).
        assert_eq!(event["lease_held"], false, "the old holder believed it still held its lease: {event}");
    }
    a.wait_until("the old holder's keep-alive learnt that its session expired", Duration::from_secs(30), |events| {
        events.iter().any(|e| e["event"] == "lease" && e["session_expired"] == true)
    });
    let (sa, sb) = (a.session(), b.session());
    let log = applied_log(dir);
    let last_a = log.iter().rposition(|(s, _)| *s == sa).expect("the old holder wrote before it was cut off");
    let first_b = log.iter().position(|(s, _)| *s == sb).expect("the new holder wrote");
    assert!(last_a < first_b, "a write of the old holder (session {sa}) landed after the new holder's (session {sb}): {log:?}");
    let b_entries: Vec<u64> = log.iter().filter(|(s, _)| *s == sb).map(|(_, n)| *n).collect();
    assert_eq!(b_entries, (1..=10).collect::<Vec<_>>(), "the new holder's writes");
    let a_applied = log.iter().filter(|(s, _)| *s == sa).count();
    let a_acknowledged = a_ok_before + later.iter().filter(|e| e["ok"] == true).count();
    assert!(
        a_applied >= a_acknowledged && a_applied <= a_acknowledged + 1,
        "the old holder saw {a_acknowledged} writes acknowledged, the record has {a_applied}: {log:?}"
    );
}

/// A `KeptSession` renews its lease by itself: past several TTLs its writes are still taken
/// and it still knows its lease held; dropped, it closes the session, whose writes are then
/// refused. First, locks without waiting: another session's `try_lock` of a held lock is
/// refused `LockHeld`, the holder's own succeeds, and once the holder unlocks the other's try
/// takes it.
#[test]
fn a_kept_session_renews_its_lease_by_itself_and_closes_when_dropped() {
    use chunkstore::client::KeptSession;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    let cluster: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json")).unwrap()).unwrap();
    let seeds = cluster["nodes"].as_array().unwrap().iter().map(|n| n["client"].as_str().unwrap().to_owned()).collect();
    let client = Arc::new(Client::connect(ClientConfig::new(seeds)).unwrap());
    let failures = Arc::new(Mutex::new(Vec::new()));
    let heard = failures.clone();
    let kept = KeptSession::open(client.clone(), Duration::from_millis(1000), move |err| heard.lock().unwrap().push(err.to_string())).unwrap();
    let session = kept.id();
    let key = Key::new("locks", "kept");

    // Try, wait and release: another session's try is refused at once while the lock is held,
    // and takes it once it is given back.
    let lock = Key::new("locks", "try");
    let other = client.open_session(Duration::from_secs(30)).unwrap();
    client.try_lock(session, "test", &lock).unwrap();
    match client.try_lock(other, "test", &lock) {
        Err(ClientError::Server(ErrorReply::LockHeld { .. })) => {}
        refused => panic!("another session's try of a held lock answered {refused:?}"),
    }
    client.try_lock(session, "test", &lock).expect("the holder's own try of its lock");
    client.unlock(session, "test", &lock).unwrap();
    client.try_lock(other, "test", &lock).expect("a try after the holder gave the lock back");
    client.unlock(other, "test", &lock).unwrap();
    client.lock(session, "test", &lock, Duration::from_secs(5)).expect("a free lock, waited for");
    client.unlock(session, "test", &lock).unwrap();
    client.close_session(other).unwrap();
    let write = |n: i64| {
        client.write_in_session(
            session,
            "test",
            &key,
            chunkstore::WriteOp::Put(vec![chunkstore::Bin::new("n", Value::Int(n))]),
            &chunkstore::WritePolicy::default(),
        )
    };
    for n in 0..7 {
        std::thread::sleep(Duration::from_millis(500));
        assert!(kept.held(), "the lease was not known held {} ms in (TTL 1000 ms); failures: {:?}", 500 * (n + 1), failures.lock().unwrap());
        write(n).unwrap_or_else(|err| panic!("a write of the kept session was refused {} ms in: {err}", 500 * (n + 1)));
    }
    assert!(failures.lock().unwrap().is_empty(), "renewals failed: {:?}", failures.lock().unwrap());
    drop(kept);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match write(100) {
            Err(err) if err.to_string().contains("expired") => break,
            outcome => assert!(Instant::now() < deadline, "a write of the dropped session was not refused: {outcome:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Closed, not left to expire: the metadata voters applied its end as a close.
    let closed = |line: &str| line.contains("lease session ends") && line.contains(&format!("session={session} ")) && line.contains("reason=Closed");
    let logs: Vec<String> = (1..=3).map(|n| std::fs::read_to_string(dir.join(format!("node{n}/chunkd.log"))).unwrap()).collect();
    assert!(logs.iter().any(|log| log.lines().any(closed)), "no metadata voter applied a close of session {session}");
}

/// A lock holder SIGSTOPped past its lease loses the lock to a waiter, and after SIGCONT every
/// write it tries is refused.
#[test]
fn a_paused_lock_holder_loses_its_lock_and_its_later_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    let a = Holder::start(dir, &["--ttl-ms", "1000"]);
    a.wait_until("the first holder took the lock and wrote", Duration::from_secs(30), |events| ok_writes(events) >= 3);
    // While the holder's lease is kept alive, nobody else gets the lock.
    let mut c = Holder::start(dir, &["--wait-ms", "1500", "--writes", "1"]);
    let status = c.child.wait().unwrap();
    let refused = c.events().iter().any(|e| e["event"] == "lock-failed" && e["error"].as_str().unwrap_or("").contains("held by lease session"));
    assert!(status.code() == Some(2) && refused, "a lock held by a live session was taken: {status:?} {:?}", c.events());
    a.signal(libc::SIGSTOP);
    let a_before = a.events();
    let mut b = Holder::start(dir, &["--ttl-ms", "5000", "--writes", "10"]);
    let status = b.child.wait().unwrap();
    assert!(status.success(), "the waiter did not take the lock: {:?}", b.events());
    a.signal(libc::SIGCONT);
    check_unique_ownership(dir, &a, &b, ok_writes(&a_before), a_before.len());
}

/// A lock holder whose host is cut off from the cluster (iptables drops every packet from and
/// to its address) loses the lock to a waiter, and once the cut heals every write it tries is
/// refused.
#[test]
fn a_partitioned_lock_holder_loses_its_lock_and_its_later_writes_are_refused() {
    assert!(chunkstore_tests::is_root(), "this test cuts a client off with iptables: run it as root (CI does)");
    const HOLDER_HOST: &str = "127.0.0.77";
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--device-size", "67108864"]);
    let _down = Down(dir);
    let a = Holder::start(dir, &["--source", HOLDER_HOST, "--ttl-ms", "1000"]);
    a.wait_until("the first holder took the lock and wrote", Duration::from_secs(30), |events| ok_writes(events) >= 3);
    let cut = Cut::address(HOLDER_HOST);
    let a_before = a.events();
    let mut b = Holder::start(dir, &["--ttl-ms", "5000", "--writes", "10"]);
    let status = b.child.wait().unwrap();
    assert!(status.success(), "the waiter did not take the lock: {:?}", b.events());
    // Whatever the cut-off holder wrote meanwhile was not acknowledged (nothing reached it).
    drop(cut);
    check_unique_ownership(dir, &a, &b, ok_writes(&a_before), a.events().len());
}

/// A lock holder that runs beside a node (its client on the node's address, as an application
/// on that node's machine) is cut off together with that node from the rest of the cluster and
/// from the waiter. The node is the metadata leader, the one the holder's keep-alives reach
/// while the cut lasts: what it says on its side of the cut must not keep the session alive.
/// The other two nodes elect a metadata leader, which ends the session; the waiter takes the
/// lock; once the cut heals every write of the old holder is refused.
#[test]
fn a_lock_holder_cut_off_with_its_node_loses_its_lock_and_its_later_writes_are_refused() {
    assert!(chunkstore_tests::is_root(), "this test cuts a node off with iptables: run it as root (CI does)");
    const WAITER_HOST: &str = "127.0.0.1";
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--address-per-node", "--device-size", "67108864"]);
    let _down = Down(dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (meta_leader, now) = loop {
        let now = status(dir);
        if let Some(leader) = now["metadata"]["leader"].as_u64() {
            break (leader, now);
        }
        assert!(Instant::now() < deadline, "no metadata leader: {now}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let host_of = |id: u64| node_host(&now, id);
    let holder_host = host_of(meta_leader);
    let a = Holder::start(dir, &["--source", &holder_host, "--ttl-ms", "1000"]);
    a.wait_until("the first holder took the lock and wrote", Duration::from_secs(30), |events| ok_writes(events) >= 3);
    let mut others: Vec<String> = [1, 2, 3].into_iter().filter(|n| *n != meta_leader).map(host_of).collect();
    others.push(WAITER_HOST.to_owned());
    let cut = Cut::isolate(&holder_host, &others);
    let mut b = Holder::start(dir, &["--source", WAITER_HOST, "--ttl-ms", "5000", "--writes", "10"]);
    let status = b.child.wait().unwrap();
    assert!(status.success(), "the waiter did not take the lock while the holder and its node were cut off: {:?}", b.events());
    // The holder still reached its node during the cut; what it saw acknowledged then counts.
    let a_at_heal = a.events();
    drop(cut);
    check_unique_ownership(dir, &a, &b, ok_writes(&a_at_heal), a_at_heal.len());
}

/// The metadata leader of a 3-node cluster (each node on its own address) is cut off, both
/// ways, from a node that leads some data group, as in a ring partition; the third node reaches
/// both. A holder paused past its lease must still be fenced in that group, which only the
/// third node can pass on, so the waiter takes the lock before the cut heals.
#[test]
fn a_lock_changes_hands_while_the_metadata_leader_is_cut_off_from_a_group_leader() {
    assert!(chunkstore_tests::is_root(), "this test cuts two nodes apart with iptables: run it as root (CI does)");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    chunkctl(dir, &["up", "--nodes", "3", "--address-per-node", "--device-size", "67108864"]);
    let _down = Down(dir);
    let a = Holder::start(dir, &["--ttl-ms", "1000"]);
    a.wait_until("the first holder took the lock and wrote", Duration::from_secs(30), |events| ok_writes(events) >= 3);
    // The metadata leader, and a node that leads some data group.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (meta_leader, group_leader, now) = loop {
        let now = status(dir);
        let meta = now["metadata"]["leader"].as_u64();
        let other = now["groups"].as_array().unwrap().iter().filter_map(|g| g["leader"].as_u64()).find(|l| Some(*l) != meta);
        if let (Some(meta), Some(other)) = (meta, other) {
            break (meta, other, now);
        }
        assert!(Instant::now() < deadline, "no node other than the metadata leader leads a group: {now}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let host_of = |id: u64| node_host(&now, id);
    let relay = [1, 2, 3].into_iter().find(|n| *n != meta_leader && *n != group_leader).unwrap();
    let cut = Cut::isolate(&host_of(meta_leader), &[host_of(group_leader)]);
    a.signal(libc::SIGSTOP);
    let a_before = a.events();
    let mut b = Holder::start(dir, &["--ttl-ms", "5000", "--writes", "10", "--wait-ms", "20000"]);
    let status = b.child.wait().unwrap();
    assert!(status.success(), "the waiter did not take the lock while the cut lasted: {:?}", b.events());
    let log = std::fs::read_to_string(dir.join(format!("node{relay}/chunkd.log"))).unwrap();
    let led: Vec<String> = now["groups"].as_array().unwrap().iter().filter(|g| g["leader"] == group_leader).map(|g| format!("group={} ", g["group"])).collect();
    let relayed = |line: &str| line.contains("relayed a fence to the group's leader") && led.iter().any(|g| format!("{line} ").contains(g.as_str()));
    assert!(log.lines().any(relayed), "node {relay} relayed no fence from node {meta_leader} to node {group_leader} (groups {led:?})");
    drop(cut);
    a.signal(libc::SIGCONT);
    check_unique_ownership(dir, &a, &b, ok_writes(&a_before), a_before.len());
}
