//! Every node's Prometheus metrics, with real processes: a 3-node cluster with 4 groups takes
//! writes and reads and holds a lease session; each family the cluster-operations issue lists
//! is checked against what the test did (operations and latency histograms by kind, leaders
//! held, commit and apply lag per group, WAL fsyncs and bytes, device use and free space,
//! stop-writes, sessions, and the records each node holds). The lag gauges are checked to move: a follower SIGSTOPped while its
//! groups take writes shows up in its leaders' commit lag, and the lag is gone once it runs
//! again.
//!
//! Negative control: with the leader's commit lag computed as on a follower (entries past the
//! commit index it knows: none on a leader), the test fails ("no leader shows the paused
//! follower's lag").

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chunkstore::client::{Client, ClientConfig};
use chunkstore::protocol::ReadPolicy;
use chunkstore::{Bin, Key, Value, WritePolicy};
use chunkstore_tests::local::{chunkctl_ok, seeds, status, Down};
use chunkstore_tests::{metric, scrape_metrics};

const GROUPS: u64 = 4;

fn cluster_nodes(dir: &Path) -> Vec<serde_json::Value> {
    let cluster: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json")).unwrap()).unwrap();
    cluster["nodes"].as_array().unwrap().clone()
}

/// Node id -> its metrics text, for every node but `skip` (a paused node would not answer).
fn scrape_all(dir: &Path, skip: Option<u64>) -> BTreeMap<u64, String> {
    let nodes = cluster_nodes(dir);
    let up = nodes.iter().filter(|n| n["id"].as_u64() != skip);
    up.map(|n| (n["id"].as_u64().unwrap(), scrape_metrics(n["metrics"].as_str().unwrap()))).collect()
}

/// The samples of family `name` in `text`, by their label text.
fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            Some((labels.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn sum(texts: &BTreeMap<u64, String>, name: &str) -> f64 {
    texts.values().map(|t| metric(t, name)).sum()
}

/// Waits until every replica's lag gauges are 0 (all applied and replicated).
fn wait_for_no_lag(dir: &Path) -> BTreeMap<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let texts = scrape_all(dir, None);
        let lagging: Vec<(u64, String, f64)> = texts
            .iter()
            .flat_map(|(node, t)| {
                let lags = samples(t, "chunkstore_group_commit_lag_entries").into_iter().chain(samples(t, "chunkstore_group_apply_lag_entries"));
                lags.filter(|(_, v)| *v != 0.0).map(|(l, v)| (*node, l, v)).collect::<Vec<_>>()
            })
            .collect();
        if lagging.is_empty() {
            return texts;
        }
        assert!(Instant::now() < deadline, "replicas still lag 30 s after the writes: {lagging:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn every_node_serves_the_metrics_operators_need_and_they_follow_what_the_cluster_did() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let _down = Down(dir);
    chunkctl_ok(dir, &["up", "--nodes", "3", "--groups", &GROUPS.to_string(), "--device-size", "67108864"]);
    let client = Client::connect(ClientConfig::new(seeds(dir))).unwrap();
    const WRITES: i64 = 40;
    for n in 0..WRITES {
        client.put("test", &Key::new("metrics", n), vec![Bin::new("v", Value::Int(n))], &WritePolicy::default()).unwrap();
        client.get_with("test", &Key::new("metrics", n), None, ReadPolicy::Linearizable).unwrap();
    }
    let session = client.open_session(Duration::from_secs(60)).unwrap();
    let texts = wait_for_no_lag(dir);

    // Operations and their latency, by kind, on the nodes that served them.
    assert!(sum(&texts, "chunkstore_requests_total{kind=\"write\",outcome=\"ok\"}") >= WRITES as f64, "{texts:?}");
    assert!(sum(&texts, "chunkstore_requests_total{kind=\"get\",outcome=\"ok\"}") >= WRITES as f64);
    assert!(sum(&texts, "chunkstore_request_duration_seconds_count{kind=\"write\"}") >= WRITES as f64);
    assert!(sum(&texts, "chunkstore_request_duration_seconds_sum{kind=\"write\"}") > 0.0);
    let mut histograms = 0;
    for (node, text) in &texts {
        // The histogram's buckets: cumulative, 16 of them from 50 µs up, each twice the last,
        // then +Inf, which counts every request.
        let buckets: Vec<(String, f64)> = text
            .lines()
            .filter(|l| l.starts_with("chunkstore_request_duration_seconds_bucket{") && l.contains("kind=\"write\""))
            .map(|l| {
                let le = l.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()).unwrap_or("").to_owned();
                (le, l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN))
            })
            .collect();
        let count = metric(text, "chunkstore_request_duration_seconds_count{kind=\"write\"}");
        if count == 0.0 {
            continue;
        }
        assert_eq!(buckets.len(), 17, "node {node}: write latency buckets {buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "node {node}: buckets not cumulative: {buckets:?}");
        assert_eq!(buckets.last().map(|(le, n)| (le.as_str(), *n)), Some(("+Inf", count)), "node {node}: {buckets:?}");
        assert!(buckets[0].1 < count, "node {node}: every write under 50 µs? {buckets:?}");
        histograms += 1;
    }
    assert!(histograms > 0, "no node served writes");
    for (node, text) in &texts {
        // Leaders held: the balanced leadership gives every group one leader.
        let groups = samples(text, "chunkstore_group_term");
        assert_eq!(groups.len() as u64, GROUPS, "node {node} reports a term for each group it hosts: {groups:?}");
        assert_eq!(samples(text, "chunkstore_group_commit_lag_entries").len() as u64, GROUPS, "node {node}: commit lag per group");
        assert_eq!(samples(text, "chunkstore_group_apply_lag_entries").len() as u64, GROUPS, "node {node}: apply lag per group");
        assert!(metric(text, "chunkstore_wal_fsyncs_total") > 0.0, "node {node}: WAL fsyncs");
        assert!(metric(text, "chunkstore_wal_written_bytes_total") > 0.0, "node {node}: WAL bytes");
        let used = metric(text, "chunkstore_device_used_bytes{namespace=\"test\"}");
        let free = metric(text, "chunkstore_device_free_bytes{namespace=\"test\"}");
        assert!(used > 0.0 && free > 0.0 && used + free <= 67108864.0, "node {node}: device used {used}, free {free}");
        assert_eq!(metric(text, "chunkstore_stop_writes{namespace=\"test\"}"), 0.0, "node {node}: stop-writes");
        // Every node replicates every group (3 nodes, 3 replicas each).
        assert_eq!(metric(text, "chunkstore_records{namespace=\"test\"}"), WRITES as f64, "node {node}: records held");
    }
    assert_eq!(sum(&texts, "chunkstore_groups_led{namespace=\"test\"}") as u64, GROUPS, "every group has one leader");
    // Sessions: counted by the metadata leader, which holds the lease table.
    let meta_leader = status(dir)["metadata"]["leader"].as_u64().unwrap();
    assert_eq!(metric(&texts[&meta_leader], "chunkstore_lease_sessions"), 1.0, "the metadata leader counts the open session");
    client.close_session(session).unwrap();

    // The lag gauges move: a paused follower falls behind its leaders.
    let paused = (1..=3).find(|n| *n != meta_leader).unwrap();
    let pid = cluster_nodes(dir).iter().find(|n| n["id"] == paused).unwrap()["pid"].as_u64().unwrap() as i32;
    // SAFETY: plain syscalls on a process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let others: Vec<u64> = (1..=3).filter(|n| *n != paused).collect();
    for n in 0..WRITES {
        let written = client.put("test", &Key::new("metrics-later", n), vec![Bin::new("v", Value::Int(n))], &WritePolicy::default());
        if let Err(err) = written {
            unsafe { libc::kill(pid, libc::SIGCONT) };
            panic!("a write with one follower paused failed: {err}");
        }
    }
    let behind: f64 = {
        let texts = scrape_all(dir, Some(paused));
        others.iter().map(|n| samples(&texts[n], "chunkstore_group_commit_lag_entries").values().sum::<f64>()).sum()
    };
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(behind >= 1.0, "no leader shows the paused follower's lag");
    wait_for_no_lag(dir);
}
