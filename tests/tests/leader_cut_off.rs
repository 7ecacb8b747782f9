//! Nodes cut off from their groups, with real processes: each node of a 3-node cluster has its
//! own loopback address (`chunkctl up --address-per-node`), and iptables drops every packet
//! between one node and the other two while clients still reach every node (as in chunkcheck's
//! partitions).
//!
//! Leaders cut off: openraft 0.9 leaders do not step down, so the cut-off node goes on
//! believing it leads; the other two elect a new leader. Checked, first for a data group's
//! leader, then for the metadata group's (opening and renewing lease sessions):
//! - a request the cut-off leader was already serving is given up, answered like a timeout,
//!   once the leader falls out of touch, not held for the whole request timeout (60 s here,
//!   longer than the test's client waits for one answer);
//! - a new request to it is turned away at once with NotLeader naming no leader (nothing was
//!   proposed), and its cluster map names no leader;
//! - a client that knows only the cut-off node as leader still gets its request done by the
//!   new leader.
//!
//! Negative control: with `Node::leads_out_of_touch` always false, the request in flight is
//! held until the client gives up ("no answer within 30 s") and the test fails.
//!
//! Followers cut off: openraft 0.9 has no pre-vote, so a replica that hears no leader would
//! campaign in ever higher terms, and once the cut healed its term would depose the leaders of
//! the groups it follows. A replica cut off from most of its group does not campaign
//! (`Node::may_campaign`). Checked with each replica's term in the nodes' metrics: no term of
//! a group the cut-off node followed moves, during the cut or after it heals.
//!
//! The cut is made both ways, then in each direction alone.
//!
//! Negative controls (each fails the test):
//! - `Node::hears_a_quorum_of` always true: the node campaigns 3 s into the first cut ("cut
//!   off (both ways), the node campaigned for group 0 3.0s after the cut");
//! - no hold before a peer counts again (`ANSWERING_HOLD` zero): the node campaigns as soon as
//!   the cut heals, before its leader reached it ("group 1's term on node 1 moved after the cut
//!   (its packets to the others) healed");
//! - peers counted when their health reports arrive, not when they answer this node's: the
//!   same, after the first cut.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chunkstore::client::{Client, ClientConfig, ClientError};
use chunkstore::protocol::{ErrorReply, Request, Response, WriteTag};
use chunkstore::{Bin, Key, Value, WriteOp, WritePolicy};
use chunkstore_tests::local::{chunkctl_ok, status, Down};
use chunkstore_tests::{metric, scrape_metrics, Cut};
use serde_json::Value as Json;

fn host(address: &str) -> String {
    address.rsplit_once(':').unwrap().0.to_owned()
}

/// Node id -> client address, from `chunkctl status`.
fn addresses(status: &Json) -> Vec<(u64, String)> {
    status["nodes"].as_array().unwrap().iter().map(|n| (n["id"].as_u64().unwrap(), n["address"].as_str().unwrap().to_owned())).collect()
}

/// A client that waits up to 30 s for one answer, and knows `first` as its first seed.
fn client(first: &str, all: &[(u64, String)]) -> Client {
    let mut seeds = vec![first.to_owned()];
    seeds.extend(all.iter().map(|(_, a)| a.clone()).filter(|a| a != first));
    Client::connect(ClientConfig { timeout: Duration::from_secs(30), retry_window: Duration::from_secs(30), ..ClientConfig::new(seeds) }).unwrap()
}

/// Sends one request to one node and returns its answer; fails the test if none came.
fn answer(client: &Client, address: &str, request: &Request) -> Response {
    match client.call_node(address, request) {
        Ok(response) => response,
        Err(err) => panic!("no answer from {address} within 30 s ({err}): the cut-off leader held the request"),
    }
}

fn write_request(n: u64) -> Request {
    let tag = WriteTag { client_id: 7_000 + n, born_ms: 0, lane: 0, seq: 1 };
    let op = WriteOp::Put(vec![Bin::new("v", Value::Int(n as i64))]);
    Request::Write { namespace: "test".into(), key: Key::new("cut", n as i64), op, policy: WritePolicy::default(), tag }
}

/// Waits until the two nodes other than `cut_off` agree on a leader for what `leader_of` reads.
fn wait_for_new_leader(dir: &Path, cut_off: u64, leader_of: impl Fn(&Json) -> Option<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(leader) = leader_of(&status(dir)).filter(|l| *l != cut_off) {
            return leader;
        }
        assert!(Instant::now() < deadline, "the nodes left elected no new leader within 30 s: {}", status(dir));
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_leader_cut_off_from_its_group_turns_requests_away_and_clients_find_the_new_leader() {
    assert!(chunkstore_tests::is_root(), "this test cuts nodes off with iptables: run it as root (CI does)");
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let _down = Down(dir);
    chunkctl_ok(dir, &["up", "--nodes", "3", "--groups", "1", "--address-per-node", "--chunkd-option", "request-timeout-ms=60000"]);
    let before = status(dir);
    let nodes = addresses(&before);
    assert!(nodes.iter().all(|(_, a)| !a.starts_with("127.0.0.1:")), "every node has its own address: {before}");
    let address_of = |id: u64| nodes.iter().find(|(n, _)| *n == id).unwrap().1.clone();
    let others_of = |id: u64| nodes.iter().filter(|(n, _)| *n != id).map(|(_, a)| host(a)).collect::<Vec<_>>();

    // A data group's leader.
    let leader = before["groups"][0]["leader"].as_u64().expect("group 0 has a leader");
    let cut = Cut::isolate(&host(&address_of(leader)), &others_of(leader));
    let probe = client(&address_of(leader), &nodes);
    let in_flight = answer(&probe, &address_of(leader), &write_request(1));
    assert_eq!(in_flight, Response::Error(ErrorReply::Timeout { in_doubt: true }), "a write the cut-off leader had proposed");
    let new = answer(&probe, &address_of(leader), &write_request(2));
    assert_eq!(new, Response::Error(ErrorReply::NotLeader { leader: None }), "a write sent after it fell out of touch");
    match answer(&probe, &address_of(leader), &Request::ClusterMap) {
        Response::ClusterMap(map) => assert_eq!(map.namespaces[0].leaders, vec![None], "the cut-off leader's map names no leader"),
        other => panic!("unexpected answer to ClusterMap: {other:?}"),
    }
    let fresh = client(&address_of(leader), &nodes);
    fresh
        .put("test", &Key::new("cut", 3), vec![Bin::new("v", Value::Int(3))], &WritePolicy::default())
        .expect("a client that took the cut-off node for the leader writes through the new one");
    let elected = wait_for_new_leader(dir, leader, |s| s["groups"][0]["leader"].as_u64());
    assert_ne!(elected, leader);
    drop(cut);

    // The metadata group's leader, with lease sessions.
    let deadline = Instant::now() + Duration::from_secs(30);
    let meta_leader = loop {
        let now = status(dir);
        if let (Some(leader), "ok") = (now["metadata"]["leader"].as_u64(), now["metadata"]["state"].as_str().unwrap_or("")) {
            break leader;
        }
        assert!(Instant::now() < deadline, "the metadata group did not settle after the cut healed: {now}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let holder = client(&address_of(meta_leader), &nodes);
    let session = holder.open_session(Duration::from_secs(60)).expect("a session opens before the cut");
    let cut = Cut::isolate(&host(&address_of(meta_leader)), &others_of(meta_leader));
    let open = Request::SessionOpen { ttl_ms: 5_000 };
    let in_flight = answer(&holder, &address_of(meta_leader), &open);
    assert_eq!(in_flight, Response::Error(ErrorReply::Timeout { in_doubt: true }), "a session the cut-off metadata leader had proposed");
    for request in [open, Request::SessionKeepAlive { session }] {
        let new = answer(&holder, &address_of(meta_leader), &request);
        assert_eq!(new, Response::Error(ErrorReply::NotLeader { leader: None }), "{request:?} sent after it fell out of touch");
    }
    match answer(&holder, &address_of(meta_leader), &Request::ClusterMap) {
        Response::ClusterMap(map) => assert_eq!(map.metadata_leader, None, "the cut-off metadata leader's map names no leader"),
        other => panic!("unexpected answer to ClusterMap: {other:?}"),
    }
    let fresh = client(&address_of(meta_leader), &nodes);
    match fresh.keep_alive(session) {
        Ok(ttl) => assert_eq!(ttl, Duration::from_secs(60)),
        Err(err @ ClientError::Server(ErrorReply::SessionExpired { .. })) => panic!("the session ended while its lease ran: {err}"),
        Err(err) => panic!("the renewal found no new metadata leader: {err}"),
    }
    fresh.open_session(Duration::from_secs(5)).expect("a new session opens at the new metadata leader");
    drop(cut);
}

/// Each data group's term as each node's metrics show it: node -> group -> term.
fn terms(nodes: &[(u64, String)]) -> BTreeMap<u64, BTreeMap<u64, f64>> {
    nodes.iter().map(|(id, metrics)| (*id, group_gauges(&scrape_metrics(metrics), "chunkstore_group_term"))).collect()
}

/// A per-group gauge of the "test" namespace: group -> value.
fn group_gauges(text: &str, name: &str) -> BTreeMap<u64, f64> {
    (0..4).map(|group| (group, metric(text, &format!("{name}{{namespace=\"test\",group=\"{group}\"}}")))).collect()
}

/// Group -> leader, from `chunkctl status`.
fn leaders(status: &Json) -> BTreeMap<u64, Option<u64>> {
    status["groups"].as_array().unwrap().iter().map(|g| (g["group"].as_u64().unwrap(), g["leader"].as_u64())).collect()
}

/// Waits until every node leads the groups it is the preferred leader of (so that no
/// hand-over is due) and every group has a leader; the status then.
fn settled(dir: &Path) -> Json {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = status(dir);
        let balanced = now["leaders"].as_array().unwrap().iter().all(|n| n["leads"] == n["preferred"]);
        if balanced && leaders(&now).values().all(Option::is_some) {
            return now;
        }
        assert!(Instant::now() < deadline, "leadership did not settle within 30 s: {now}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_follower_cut_off_from_its_groups_does_not_campaign_nor_depose_their_leaders_when_the_cut_heals() {
    assert!(chunkstore_tests::is_root(), "this test cuts nodes off with iptables: run it as root (CI does)");
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let _down = Down(dir);
    chunkctl_ok(dir, &["up", "--nodes", "3", "--groups", "4", "--address-per-node"]);
    let nodes = addresses(&status(dir));
    let cluster: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("cluster.json")).unwrap()).unwrap();
    let metrics: Vec<(u64, String)> =
        cluster["nodes"].as_array().unwrap().iter().map(|n| (n["id"].as_u64().unwrap(), n["metrics"].as_str().unwrap().to_owned())).collect();
    let cut_off = 3;
    let others: Vec<String> = nodes.iter().filter(|(n, _)| *n != cut_off).map(|(_, a)| host(a)).collect();
    let own = vec![host(&nodes.iter().find(|(n, _)| *n == cut_off).unwrap().1)];
    let own_metrics = metrics.iter().find(|(n, _)| *n == cut_off).unwrap().1.clone();

    // Both ways; then only the node's own packets (it still hears the others' health reports,
    // but gets no answers: hearing alone would let it campaign); then only packets to it.
    let cuts: [(&str, &dyn Fn() -> Cut); 3] = [
        ("both ways", &|| Cut::isolate(&own[0], &others)),
        ("its packets to the others", &|| Cut::one_way(&own, &others)),
        ("the others' packets to it", &|| Cut::one_way(&others, &own)),
    ];
    for (what, cut) in cuts {
        let settled = settled(dir);
        let followed: Vec<u64> = leaders(&settled).into_iter().filter(|(_, leader)| *leader != Some(cut_off)).map(|(group, _)| group).collect();
        assert!(!followed.is_empty(), "node {cut_off} follows some group: {settled}");
        let before = terms(&metrics);
        let cut = cut();
        // Campaigns would start 2.4 to 3.2 s after the last word from the leader (openraft
        // 0.9's leader lease, then an election timeout), and again every timeout after: 8 s
        // give each followed group at least two.
        let cut_at = Instant::now();
        let mut held_back = false;
        while cut_at.elapsed() < Duration::from_secs(8) {
            std::thread::sleep(Duration::from_millis(500));
            let text = scrape_metrics(&own_metrics);
            let now = group_gauges(&text, "chunkstore_group_term");
            for group in &followed {
                assert_eq!(now[group], before[&cut_off][group], "cut off ({what}), the node campaigned for group {group} {:?} after the cut", cut_at.elapsed());
            }
            held_back |= group_gauges(&text, "chunkstore_group_may_campaign").values().all(|v| *v == 0.0);
        }
        assert!(held_back, "cut off ({what}), the node never showed that it held its campaigns back (chunkstore_group_may_campaign)");
        drop(cut);

        // After the heal: the node may campaign again, and no followed group elected again or
        // changed its leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let campaigns = group_gauges(&scrape_metrics(&own_metrics), "chunkstore_group_may_campaign");
            if campaigns.values().all(|v| *v == 1.0) {
                break;
            }
            assert!(Instant::now() < deadline, "the node did not take up campaigning within 30 s of the heal ({what}): {campaigns:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_secs(3));
        let after = terms(&metrics);
        let now = leaders(&status(dir));
        for group in &followed {
            for (node, seen) in &after {
                assert_eq!(
                    seen[group], before[&1][group],
                    "group {group}'s term on node {node} moved after the cut ({what}) healed: before {before:?}, after {after:?}"
                );
            }
            assert_eq!(now[group], leaders(&settled)[group], "group {group} changed its leader after the cut ({what})");
        }
    }
}
