//! Three nodes in one process talking over real loopback TCP: every group elects a leader,
//! writes go through the leader (others answer NotLeader with a hint), every replica's engine
//! ends up with the data, and linearizable and session reads see it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::node::network::MemFaults;
use chunkstore::node::transport::{serve, Connection};
use chunkstore::node::{NamespaceSpec, Node, NodeConfig};
use chunkstore::protocol::{ErrorReply, ReadPolicy, Request, Response, WriteTag};
use chunkstore::sim::{SimCluster, SimOptions};
use chunkstore::{DeviceConfig, Key, NamespaceConfig, Operation, Value, WriteOp, WritePolicy};

const GROUPS: u32 = 4;

fn node_config(id: u64, nodes: &[(u64, String)], dir: &std::path::Path, groups: u32) -> NodeConfig {
    let data_dir = dir.join(format!("node{id}"));
    std::fs::create_dir_all(&data_dir).unwrap();
    let engine = NamespaceConfig {
        write_block_size: 64 * 1024,
        commit_to_device: false,
        flush_max_ms: 50,
        ..NamespaceConfig::new("test", vec![DeviceConfig { path: data_dir.join("test.dat"), size: Some(32 << 20) }])
    };
    NodeConfig {
        peer_source: None,
        node_id: id,
        nodes: nodes.to_vec(),
        client_addresses: nodes.to_vec(),
        racks: Vec::new(),
        seeds: Vec::new(),
        data_dir,
        namespaces: vec![NamespaceSpec { engine, replication_factor: 3, groups }],
        heartbeat_ms: 50,
        election_timeout_ms: (300, 600),
        request_timeout: Duration::from_secs(5),
        snapshot_after_entries: 5000,
        entries_kept_after_snapshot: 1000,
        unsafe_skip_dedup: false,
        unsafe_unchecked_reads: false,
        unsafe_serve_damaged: false,
        test_power_loss_devices: false,
        test_crash_while_leaving: false,
        balance_leaders: true,
        unsafe_skip_fencing: false,
        unsafe_wal_torn_tail_rule: false,
        unsafe_wiped_replica_votes: false,
        unsafe_wal_ignore_sync_errors: false,
        wal_zero_fill: true,
        wal_segment_bytes: 64 << 20,
        unsafe_wal_skip_fsync: false,
    }
}

/// Starts `count` nodes, serving one listener each (clients and peers alike), and waits until
/// every one has joined the cluster.
async fn start_cluster(dir: &std::path::Path, count: u64) -> (Vec<Arc<Node>>, HashMap<u64, String>, Vec<tokio::task::JoinHandle<()>>) {
    start_cluster_with(dir, count, |_| {}).await
}

/// `start_cluster` with `tweak` applied to every node's configuration.
async fn start_cluster_with(
    dir: &std::path::Path,
    count: u64,
    tweak: impl Fn(&mut NodeConfig),
) -> (Vec<Arc<Node>>, HashMap<u64, String>, Vec<tokio::task::JoinHandle<()>>) {
    let mut listeners = Vec::new();
    for id in 1..=count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listeners.push((id, listener));
    }
    let nodes: Vec<(u64, String)> = listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap().to_string())).collect();
    let mut started = Vec::new();
    let mut servers = Vec::new();
    for (id, listener) in listeners {
        let mut config = node_config(id, &nodes, dir, GROUPS);
        tweak(&mut config);
        let node = Node::start(config).await.unwrap();
        servers.push(tokio::spawn(serve(listener, node.clone())));
        started.push(node);
    }
    let joins: Vec<_> = started
        .iter()
        .map(|node| {
            tokio::spawn({
                let node = node.clone();
                async move { node.join().await }
            })
        })
        .collect();
    for join in joins {
        join.await.unwrap().unwrap();
    }
    (started, nodes.into_iter().collect(), servers)
}

/// Binds `addr` once the listener that had it is gone.
async fn bind_again(addr: &str) -> tokio::net::TcpListener {
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sends `request` to `node`, following NotLeader hints; returns the final response.
async fn call_leader(addrs: &HashMap<u64, String>, mut node: u64, request: Request) -> Response {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut connection = Connection::new(addrs[&node].clone());
        let response = connection.call(&request, Duration::from_secs(5)).await;
        match response {
            Ok(Response::Error(ErrorReply::NotLeader { leader: Some(leader) })) if leader != node => node = leader,
            Ok(Response::Error(ErrorReply::NotLeader { .. })) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(other) => return other,
        }
        assert!(Instant::now() < deadline, "no leader answered {request:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_tcp_replicate_and_serve_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, addrs, _servers) = start_cluster(dir.path(), 3).await;
    // Every group gets a leader, and every node replicates every group (RF 3 on 3 nodes).
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes.iter().any(|n| n.leaders("test").iter().any(|(_, leader)| leader.is_none())) {
        assert!(Instant::now() < deadline, "groups without a leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(nodes.iter().all(|n| n.leaders("test").len() == GROUPS as usize));

    let mut last_index = HashMap::new();
    for k in 0..40i64 {
        let request = Request::Write {
            namespace: "test".into(),
            key: Key::new("s", k),
            op: WriteOp::Operate(vec![Operation::Add { bin: "n".into(), delta: k }]),
            policy: WritePolicy::default(),
            tag: WriteTag { client_id: 1, born_ms: 1, lane: 0, seq: k as u64 + 1 },
        };
        match call_leader(&addrs, 1 + (k as u64 % 3), request).await {
            Response::Written { meta, index, .. } => {
                assert_eq!(meta.generation, 1);
                last_index.insert(k, index);
            }
            other => panic!("write {k}: {other:?}"),
        }
    }
    for k in 0..40i64 {
        let get = Request::Get { namespace: "test".into(), key: Key::new("s", k), bins: None, read: ReadPolicy::Linearizable, min_index: 0 };
        match call_leader(&addrs, 1, get).await {
            Response::Record { record: Some(record), index } => {
                assert_eq!(record.bin("n"), Some(&Value::Int(k)));
                assert!(index >= last_index[&k]);
            }
            other => panic!("read {k}: {other:?}"),
        }
    }
    // Session reads: any replica that has applied what the client saw answers; each node
    // catches up, so asking every node directly eventually succeeds with the value.
    for node in 1..=3u64 {
        for k in [0i64, 17, 39] {
            let get = Request::Get { namespace: "test".into(), key: Key::new("s", k), bins: None, read: ReadPolicy::Session, min_index: last_index[&k] };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let response = Connection::new(addrs[&node].clone()).call(&get, Duration::from_secs(5)).await.unwrap();
                match response {
                    Response::Record { record: Some(record), index } => {
                        assert_eq!(record.bin("n"), Some(&Value::Int(k)), "node {node} key {k}");
                        assert!(index >= last_index[&k]);
                        break;
                    }
                    Response::Error(ErrorReply::NotLeader { .. }) => {}
                    other => panic!("session read of {k} on node {node}: {other:?}"),
                }
                assert!(Instant::now() < deadline, "node {node} never caught up to index {}", last_index[&k]);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // The async client API, on this test's runtime: routing, writes with their tags, reads.
    let seeds: Vec<String> = addrs.values().cloned().collect();
    let client = chunkstore::async_client::AsyncClient::connect(chunkstore::client::ClientConfig::new(seeds)).await.unwrap();
    let add = vec![Operation::Add { bin: "n".into(), delta: 100 }];
    let (meta, _) = client.operate("test", &Key::new("s", 3i64), add, &WritePolicy::default()).await.unwrap();
    assert_eq!(meta.generation, 2);
    let record = client.get("test", &Key::new("s", 3i64), None).await.unwrap().unwrap();
    assert_eq!(record.bin("n"), Some(&Value::Int(103)), "session read after the client's own write");
    client.delete("test", &Key::new("s", 3i64), &WritePolicy::default()).await.unwrap();
    assert_eq!(client.get_with("test", &Key::new("s", 3i64), None, ReadPolicy::Linearizable).await.unwrap(), None);
    assert!(matches!(client.get("nope", &Key::new("s", 1i64), None).await, Err(chunkstore::client::ClientError::UnknownNamespace(_))));

    let unknown = Request::Get { namespace: "nope".into(), key: Key::new("s", 1i64), bins: None, read: ReadPolicy::Session, min_index: 0 };
    let response = Connection::new(addrs[&1].clone()).call(&unknown, Duration::from_secs(5)).await.unwrap();
    assert_eq!(response, Response::Error(ErrorReply::UnknownNamespace("nope".into())));
    for node in &nodes {
        node.shutdown().await;
    }
}

/// A write as large as a client can send is refused before it is proposed: its entry, with
/// the AppendEntries message around it, would not fit in a peer frame, so the followers could
/// never receive it and the group would stall (its later writes timing out). The group takes
/// writes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_too_large_to_replicate_is_refused_and_its_group_goes_on() {
    use chunkstore::protocol::{encode_body, FRAME_BYTES_MAX_DEFAULT};
    let dir = tempfile::tempdir().unwrap();
    let (nodes, addrs, _servers) = start_cluster(dir.path(), 3).await;
    let write = |key: i64, bytes: usize, seq: u64| Request::Write {
        namespace: "test".into(),
        key: Key::new("big", key),
        op: WriteOp::Put(vec![chunkstore::Bin { name: "b".into(), value: Value::Bytes(vec![7; bytes]) }]),
        policy: WritePolicy::default(),
        tag: WriteTag { client_id: 9, born_ms: 1, lane: 0, seq },
    };
    // The largest request a frame holds.
    let overhead = encode_body(&write(1, 0, 1), FRAME_BYTES_MAX_DEFAULT).unwrap().len();
    let largest = FRAME_BYTES_MAX_DEFAULT - overhead - 16;
    assert!(encode_body(&write(1, largest, 1), FRAME_BYTES_MAX_DEFAULT).is_ok());
    match call_leader(&addrs, 1, write(1, largest, 1)).await {
        Response::Error(ErrorReply::BadRequest(why)) => assert!(why.contains("a log entry holds at most"), "{why}"),
        other => panic!("a write too large to replicate: {other:?}"),
    }
    // The same key's group goes on taking writes.
    match call_leader(&addrs, 1, write(1, 1000, 2)).await {
        Response::Written { meta, .. } => assert_eq!(meta.generation, 1),
        other => panic!("a small write after the refused one: {other:?}"),
    }
    for node in &nodes {
        node.shutdown().await;
    }
}

/// Six nodes: the lowest five vote in the metadata group, the sixth learns the metadata from
/// them. Every node hands out the same cluster map (placement from the metadata, the same
/// metadata voters). A node restarted with a configuration that disagrees with the metadata
/// (another number of groups) refuses to join and says what differs; restarted with its
/// original configuration it joins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_group_bootstraps_and_refuses_a_disagreeing_node() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, addrs, servers) = start_cluster(dir.path(), 6).await;
    let mut maps = Vec::new();
    for node in 1..=6u64 {
        match Connection::new(addrs[&node].clone()).call(&Request::ClusterMap, Duration::from_secs(5)).await.unwrap() {
            Response::ClusterMap(map) => maps.push(map),
            other => panic!("node {node}: {other:?}"),
        }
    }
    for map in &maps {
        assert_eq!(map.metadata_voters, vec![1, 2, 3, 4, 5]);
        assert_eq!(map.nodes.len(), 6);
        assert_eq!(map.namespaces.len(), 1);
        assert_eq!(map.namespaces[0].replicas, maps[0].namespaces[0].replicas, "every node uses the same placement");
        assert_eq!(map.namespaces[0].replicas.len(), GROUPS as usize);
    }
    assert_eq!(maps[5].metadata_leader, None, "node 6 is not a metadata voter");
    assert!(maps[0].metadata_leader.is_some_and(|l| (1..=5).contains(&l)));
    // The metadata log pins no WAL segment: every voter purges it up to its last entry.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nodes[..5].iter().all(|n| matches!(n.metadata_log(), (Some(purged), Some(last)) if purged == last)) {
        let logs: Vec<_> = nodes.iter().map(|n| n.metadata_log()).collect();
        assert!(Instant::now() < deadline, "metadata logs not purged: {logs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(nodes[5].metadata_log(), (None, None), "node 6 keeps no metadata log");
    // Node 6 hosts exactly the groups the placement gives it.
    let hosted: Vec<u32> = nodes[5].leaders("test").iter().map(|(g, _)| *g).collect();
    let placed: Vec<u32> = (0..GROUPS).filter(|g| maps[0].namespaces[0].replicas[*g as usize].contains(&6)).collect();
    assert_eq!(hosted, placed);

    // Node 2 comes back configured with 8 groups: refused, with the difference named.
    let peers: Vec<(u64, String)> = (1..=6u64).map(|id| (id, addrs[&id].clone())).collect();
    nodes[1].shutdown().await;
    servers[1].abort();
    let listener = bind_again(&addrs[&2]).await;
    let wrong = Node::start(node_config(2, &peers, dir.path(), 8)).await.unwrap();
    let server = tokio::spawn(serve(listener, wrong.clone()));
    let refused = wrong.join().await.expect_err("a node configured with other groups must not join");
    assert!(refused.to_string().contains("groups 8 configured, the cluster has 4"), "{refused}");
    wrong.shutdown().await;
    drop(wrong);
    server.abort();
    let _ = server.await;
    let listener = bind_again(&addrs[&2]).await;
    let again = Node::start(node_config(2, &peers, dir.path(), GROUPS)).await.unwrap();
    tokio::spawn(serve(listener, again.clone()));
    again.join().await.unwrap();
    assert_eq!(again.leaders("test").len(), (0..GROUPS).filter(|g| maps[0].namespaces[0].replicas[*g as usize].contains(&2)).count());
    again.shutdown().await;
    for (i, node) in nodes.iter().enumerate() {
        if i != 1 {
            node.shutdown().await;
        }
    }
}

/// Writes `count` records through the leaders: key k holds bin "v" = "payload-k". Returns the
/// highest log index acknowledged per key.
async fn write_payloads(addrs: &HashMap<u64, String>, count: i64) -> HashMap<i64, u64> {
    let mut acknowledged = HashMap::new();
    for k in 0..count {
        let request = Request::Write {
            namespace: "test".into(),
            key: Key::new("s", k),
            op: WriteOp::Put(vec![chunkstore::Bin::new("v", Value::String(format!("payload-{k}")))]),
            policy: WritePolicy::default(),
            tag: WriteTag { client_id: 7, born_ms: 1, lane: 0, seq: k as u64 + 1 },
        };
        match call_leader(addrs, 1 + (k as u64 % 3), request).await {
            Response::Written { index, .. } => acknowledged.insert(k, index),
            other => panic!("write {k}: {other:?}"),
        };
    }
    acknowledged
}

/// Overwrites every copy of `pattern` in `path` (a stopped node's device file) with `with`.
fn corrupt_every(path: &std::path::Path, pattern: &[u8], with: &[u8]) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let mut hits = 0;
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(pattern.len()).position(|w| w == pattern) {
        let start = at + found;
        bytes[start..start + with.len()].copy_from_slice(with);
        hits += 1;
        at = start + pattern.len();
    }
    std::fs::write(path, bytes).unwrap();
    hits
}

/// What node `node` answers to session reads of keys 0..count at their acknowledged index:
/// the keys whose answer is not their payload.
async fn wrong_answers(addrs: &HashMap<u64, String>, node: u64, acknowledged: &HashMap<i64, u64>) -> Vec<(i64, String)> {
    let mut wrong = Vec::new();
    for (&k, &index) in acknowledged {
        let get = Request::Get { namespace: "test".into(), key: Key::new("s", k), bins: None, read: ReadPolicy::Session, min_index: index };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let response = Connection::new(addrs[&node].clone()).call(&get, Duration::from_secs(5)).await;
            match response {
                Ok(Response::Record { record, .. }) => {
                    let value = record.as_ref().and_then(|r| r.bin("v").cloned());
                    if value != Some(Value::String(format!("payload-{k}"))) {
                        wrong.push((k, format!("{value:?}")));
                    }
                    break;
                }
                Ok(Response::Error(ErrorReply::NotLeader { .. })) | Err(_) => {}
                Ok(other) => panic!("session read of {k} on node {node}: {other:?}"),
            }
            assert!(Instant::now() < deadline, "node {node} never answered a session read of {k} at index {index}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    wrong.sort();
    wrong
}

/// A replica whose device was damaged while it was down (every stored copy of the records'
/// values overwritten) finds the damage in its start-up scan, rebuilds each of its groups from
/// a peer before serving, and then answers every acknowledged record. Snapshots are taken
/// every 20 entries, so the damaged records lie below its durable applied point and its log
/// cannot bring them back. The same damage under `unsafe-serve-damaged` (the replica served as
/// it is) gives wrong answers: the check can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_damaged_device_is_rebuilt_from_its_peers_before_it_serves() {
    for unsafe_serve_damaged in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let tweak = |config: &mut NodeConfig| {
            config.snapshot_after_entries = 20;
            config.entries_kept_after_snapshot = 0;
        };
        let (nodes, addrs, servers) = start_cluster_with(dir.path(), 3, tweak).await;
        let acknowledged = write_payloads(&addrs, 200).await;
        assert_eq!(wrong_answers(&addrs, 2, &acknowledged).await, Vec::<(i64, String)>::new(), "before the damage");
        // Let the snapshot policy write its applied markers past most of the writes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        nodes[1].shutdown().await;
        servers[1].abort();

        let device = dir.path().join("node2").join("test.dat");
        let hits = corrupt_every(&device, b"payload-", b"PAYLOAD-");
        assert!(hits >= 200, "only {hits} stored copies found to damage");
        let listener = bind_again(&addrs[&2]).await;
        let peers: Vec<(u64, String)> = (1..=3).map(|id| (id, addrs[&id].clone())).collect();
        let mut config = node_config(2, &peers, dir.path(), GROUPS);
        tweak(&mut config);
        config.unsafe_serve_damaged = unsafe_serve_damaged;
        let again = Node::start(config).await.unwrap();
        let server = tokio::spawn(serve(listener, again.clone()));
        tokio::time::timeout(Duration::from_secs(60), again.join()).await.expect("the damaged node joins").unwrap();

        let wrong = wrong_answers(&addrs, 2, &acknowledged).await;
        if unsafe_serve_damaged {
            assert!(!wrong.is_empty(), "served as it is, the damaged replica still answered every record");
        } else {
            assert_eq!(wrong, Vec::<(i64, String)>::new(), "the rebuilt replica's answers");
        }
        again.shutdown().await;
        server.abort();
        for node in [&nodes[0], &nodes[2]] {
            node.shutdown().await;
        }
    }
}

/// A cluster of three nodes in one process (`chunkstore::sim`), started, every group led.
async fn sim_cluster(dir: &std::path::Path, options: SimOptions) -> SimCluster {
    let mut cluster = SimCluster::new(dir.to_owned(), SimOptions { groups: GROUPS, ..options });
    cluster.start_all().await.unwrap();
    let probe = Request::Get { namespace: "test".into(), key: Key::new("probe", 0i64), bins: None, read: ReadPolicy::Linearizable, min_index: 0 };
    let client = cluster.client();
    for first in 0..GROUPS as usize * 4 {
        client.call_leader(first, &probe, Duration::from_secs(30)).await.expect("every group elects a leader");
    }
    cluster
}

/// An Add of `k + 1` to key `k` of `set`, as client `client_id`'s write number `seq`.
fn add_write(set: &str, k: i64, client_id: u64, seq: u64) -> Request {
    Request::Write {
        namespace: "test".into(),
        key: Key::new(set, k),
        op: WriteOp::Operate(vec![Operation::Add { bin: "n".into(), delta: k + 1 }]),
        policy: WritePolicy::default(),
        tag: WriteTag { client_id, born_ms: 1, lane: 0, seq },
    }
}

/// Whether key `k` of `set` reads back as one `add_write`, through a linearizable read
/// (`Err` with what was found, or that no leader answered).
async fn holds_one_add(cluster: &SimCluster, set: &str, k: i64) -> Result<(), String> {
    let get = Request::Get { namespace: "test".into(), key: Key::new(set, k), bins: None, read: ReadPolicy::Linearizable, min_index: 0 };
    match cluster.client().call_leader(k as usize, &get, Duration::from_secs(30)).await {
        Some(Response::Record { record: Some(record), .. }) if record.bin("n") == Some(&Value::Int(k + 1)) && record.meta.generation == 1 => Ok(()),
        Some(other) => Err(format!("key {k}: {other:?}")),
        None => Err(format!("key {k}: no leader answers")),
    }
}

/// Three nodes in one process over the in-memory network (`MemNetwork`, the network the
/// simulator uses): messages lost, duplicated (`duplicate` of them) and delayed at random, and
/// node 1 cut off from the other two for a third of the writes. Returns what went wrong, if
/// anything: an acknowledged write missing, or applied more than once.
async fn faulty_in_memory_network_run(seed: u64, duplicate: f64, unsafe_skip_dedup: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = sim_cluster(dir.path(), SimOptions { seed, unsafe_skip_dedup, ..SimOptions::default() }).await;
    let client = cluster.client();
    cluster.net.set_faults(MemFaults { drop: 0.02, duplicate, delay_max: Duration::from_millis(3) });
    let mut problems = Vec::new();
    let mut written = Vec::new();
    for k in 0..60i64 {
        match k {
            20 => cluster.net.isolate(&["node1"], &["node2", "node3"]),
            40 => cluster.net.heal(),
            _ => {}
        }
        match client.call_leader(k as usize, &add_write("m", k, 11, k as u64 + 1), Duration::from_secs(30)).await {
            Some(Response::Written { meta, .. }) if meta.generation == 1 => written.push(k),
            Some(Response::Written { meta, .. }) => problems.push(format!("write {k} answered generation {}", meta.generation)),
            other => panic!("write {k} (seed {seed}): {other:?}"),
        }
    }
    cluster.net.set_faults(MemFaults::default());
    for k in written {
        if let Err(problem) = holds_one_add(&cluster, "m", k).await {
            problems.push(problem);
        }
    }
    let stats = cluster.net.stats();
    assert!(stats.dropped > 0 && stats.duplicated > 0, "the faults took no effect: {stats:?}");
    cluster.shutdown().await;
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("; ")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_a_faulty_in_memory_network_keep_every_acknowledged_write_once() {
    let seed: u64 = rand::random();
    if let Err(problems) = faulty_in_memory_network_run(seed, 0.05, false).await {
        panic!("seed {seed}: {problems}");
    }
}

/// Negative control of the test above: with the exactly-once table off (`unsafe_skip_dedup`),
/// duplicated requests are applied twice, and the test sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_exactly_once_table_duplicated_requests_apply_twice() {
    let seed: u64 = rand::random();
    let found = faulty_in_memory_network_run(seed, 0.3, true).await;
    assert!(found.is_err(), "seed {seed}: nothing applied twice without the exactly-once table");
}

/// A seeded schedule of faults over a 3-node in-process cluster while three writers write, each
/// write to a key of its own: partitions, lost, duplicated and delayed messages, and power cuts
/// of one node or of all of them at once, each followed by a restart on what the cut left; at
/// the end, with writes in flight, one more power cut of the whole cluster. Returns the
/// acknowledged writes that do not read back at the end.
async fn power_cut_schedule(seed: u64, faults: usize, unsafe_wal_skip_fsync: bool) -> Vec<String> {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = sim_cluster(dir.path(), SimOptions { seed, unsafe_wal_skip_fsync, ..SimOptions::default() }).await;
    cluster.net.set_faults(MemFaults { drop: 0.01, duplicate: 0.03, delay_max: Duration::from_millis(2) });
    let acknowledged: Arc<std::sync::Mutex<Vec<i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3i64)
        .map(|writer| {
            let (client, acknowledged, stop) = (cluster.client(), acknowledged.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0i64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let k = writer * 1_000_000 + n;
                    let request = add_write("w", k, 100 + writer as u64, n as u64);
                    // One try per node and hint, then the write is left in doubt.
                    let mut node = 1 + (n as u64 % 3);
                    for _ in 0..6 {
                        match client.network.link(&format!("node{node}")).call(&request, Duration::from_secs(2)).await {
                            Ok(Response::Written { .. }) => {
                                acknowledged.lock().unwrap().push(k);
                                break;
                            }
                            Ok(Response::Error(ErrorReply::NotLeader { leader: Some(leader) })) if leader <= 3 => node = leader,
                            _ => {
                                node = node % 3 + 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for _ in 0..faults {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..800))).await;
        match rng.gen_range(0..10) {
            0..=2 => {
                let index = rng.gen_range(0..3);
                cluster.power_cut(&[index]).await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..500))).await;
                cluster.start(index).await.unwrap();
            }
            3 | 4 => {
                cluster.power_cut(&[0, 1, 2]).await;
                cluster.start_all().await.unwrap();
            }
            5 | 6 => {
                let addresses = cluster.addresses();
                let alone = rng.gen_range(0..3);
                let others: Vec<&str> = addresses.iter().enumerate().filter(|(i, _)| *i != alone).map(|(_, a)| a.as_str()).collect();
                cluster.net.isolate(&[&addresses[alone]], &others);
            }
            _ => cluster.net.heal(),
        }
    }
    // The end: the whole cluster loses power at once, the moment a write is acknowledged (so
    // that acknowledged writes are still in the nodes' WALs only), with more in flight; then it
    // starts again.
    cluster.net.heal();
    let mut missing = Vec::new();
    let before = acknowledged.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acknowledged.lock().unwrap().len() == before {
        if Instant::now() > deadline {
            missing.push("no write acknowledged in 20 s after the network healed".to_owned());
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    cluster.power_cut(&[0, 1, 2]).await;
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    cluster.net.set_faults(MemFaults::default());
    cluster.start_all().await.unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    for k in acknowledged {
        if let Err(problem) = holds_one_add(&cluster, "w", k).await {
            let unavailable = problem.contains("no leader answers");
            missing.push(problem);
            if unavailable {
                // Everything not yet read is unavailable too.
                break;
            }
        }
    }
    cluster.shutdown().await;
    missing
}

/// Power cuts of one node and of the whole cluster (unsynced WAL and engine writes lost, some
/// torn through, on every disk), partitions and a lossy network lose no acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_power_cuts_and_partitions_lose_no_acknowledged_write() {
    let seed: u64 = rand::random();
    let missing = power_cut_schedule(seed, 12, false).await;
    assert!(missing.is_empty(), "seed {seed}: {} acknowledged writes lost: {missing:?}", missing.len());
}

/// Negative control of the test above: a WAL that never fdatasyncs (`unsafe-wal-skip-fsync`)
/// loses acknowledged writes to the same kind of schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_power_cuts_lose_writes_the_wal_never_synced() {
    let seed: u64 = rand::random();
    let missing = power_cut_schedule(seed, 12, true).await;
    assert!(!missing.is_empty(), "seed {seed}: nothing lost with the WAL never synced");
    eprintln!("seed {seed}: with the WAL never synced, {} lost, the first: {}", missing.len(), missing[0]);
}
