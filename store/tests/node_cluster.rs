//! Three nodes in one process talking over real loopback TCP: every group elects a leader,
//! writes go through the leader (others answer NotLeader with a hint), every replica's engine
//! ends up with the data, and linearizable and session reads see it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::node::transport::{serve, Connection};
use chunkstore::node::{NamespaceSpec, Node, NodeConfig};
use chunkstore::protocol::{ErrorReply, ReadPolicy, Request, Response, WriteTag};
use chunkstore::{DeviceConfig, Key, NamespaceConfig, Operation, Value, WriteOp, WritePolicy};

const GROUPS: u32 = 4;

async fn start_cluster(dir: &std::path::Path) -> (Vec<Arc<Node>>, HashMap<u64, String>) {
    let mut listeners = Vec::new();
    for id in 1..=3u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listeners.push((id, listener));
    }
    let nodes: Vec<(u64, String)> = listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap().to_string())).collect();
    let mut started = Vec::new();
    for (id, listener) in listeners {
        let data_dir = dir.join(format!("node{id}"));
        std::fs::create_dir_all(&data_dir).unwrap();
        let engine = NamespaceConfig {
            write_block_size: 64 * 1024,
            commit_to_device: false,
            flush_max_ms: 50,
            ..NamespaceConfig::new("test", vec![DeviceConfig { path: data_dir.join("test.dat"), size: Some(32 << 20) }])
        };
        let config = NodeConfig {
            node_id: id,
            nodes: nodes.clone(),
            client_addresses: nodes.clone(),
            data_dir,
            namespaces: vec![NamespaceSpec { engine, replication_factor: 3, groups: GROUPS }],
            heartbeat_ms: 50,
            election_timeout_ms: (300, 600),
            request_timeout: Duration::from_secs(5),
            snapshot_after_entries: 5000,
            entries_kept_after_snapshot: 1000,
            unsafe_skip_dedup: false,
        };
        let node = Node::start(config).await.unwrap();
        tokio::spawn(serve(listener, node.clone()));
        started.push(node);
    }
    (started, nodes.into_iter().collect())
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
    let (nodes, addrs) = start_cluster(dir.path()).await;
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
    let client = chunkstore::client::AsyncClient::connect(chunkstore::client::ClientConfig::new(seeds)).await.unwrap();
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
