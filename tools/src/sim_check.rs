//! `chunkcheck sim`: linearizable registers on a cluster in one process (`chunkstore::sim`:
//! nodes of the production code on memory disks over the in-memory network) under a seeded
//! schedule of faults: power cuts of one node or of every node at once (unsynced WAL and engine
//! writes lost, some torn through), restarts on what the cut left, a node's disks wiped (one
//! at a time, alone or behind a lagging node and a node down), wall clocks that jump a day,
//! an hour, a minute or seconds either way, disks that fail their fsyncs (then the node
//! loses power; or while another node lags, then every node loses power), roster changes
//! (more nodes than replicas), nodes isolated and healed,
//! lost, duplicated and delayed messages. At the end, with operations in flight, the whole
//! cluster loses power once more and restarts; every key is read, and the linearizability
//! checker decides the history.
//!
//! The seed fixes the faults (their kinds, order, targets and spacing: every fault makes the
//! same draws, `FaultDraw`, whether or not the cluster's state lets it run) and the network's
//! draws; the nodes still run on tokio's multi-threaded runtime and their own threads, so a
//! replay (`replay` in the report) repeats the schedule, not the interleaving.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunkstore::node::network::MemFaults;
use chunkstore::protocol::{ReadPolicy, Request, Response, WriteTag};
use chunkstore::sim::{SimClient, SimCluster, SimOptions, SIM_NAMESPACE};
use chunkstore::{Bin, Key, Value, WriteOp, WritePolicy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::check::linearizable::{self, Limits, Verdict};
use crate::check::models::Model;
use crate::history::{operations, Edn, Event, EventType};

#[derive(Clone, Debug)]
pub struct SimCheckOptions {
    pub seed: u64,
    pub nodes: u64,
    pub groups: u32,
    /// Faults in the schedule (about half a second apart).
    pub faults: usize,
    pub keys: u64,
    pub clients: u64,
    /// Where to write the history (EDN, one event per line), if anywhere.
    pub history: Option<PathBuf>,
    /// UNSAFE (negative control): the nodes' WALs never fdatasync.
    pub unsafe_wal_skip_fsync: bool,
    /// UNSAFE (negative control): leaders answer reads without checking that they still lead.
    pub unsafe_unchecked_reads: bool,
    /// UNSAFE (negative control): a wiped replica votes at once, without catching up first.
    pub unsafe_wiped_replica_votes: bool,
    /// UNSAFE (negative control): the WALs take a failed fdatasync for a success.
    pub unsafe_wal_ignore_sync_errors: bool,
}

/// One fault of the schedule, as the report lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimFault {
    pub at_ms: u64,
    pub kind: &'static str,
    /// The node(s) it hit (ids).
    pub nodes: Vec<u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SimReport {
    pub seed: u64,
    /// The command that runs the same schedule again.
    pub replay: String,
    /// `true`, `false`, or `"unknown"` (the checker ran out of time).
    pub valid: serde_json::Value,
    pub verdict: Verdict,
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
    /// Keys whose history is not linearizable.
    pub anomalies: Vec<String>,
    /// Keys the final reads found no leader for, the whole cluster up and the network whole
    /// for 30 s (a run with any is invalid).
    pub unavailable_keys: Vec<u64>,
    /// Nodes that refused to start on what their disks held after a fault, and why (a run with
    /// any is invalid: a replica's durable state was lost or damaged).
    pub refused_to_start: Vec<String>,
    pub faults: Vec<SimFault>,
    pub messages_delivered: u64,
    pub messages_dropped: u64,
    pub messages_duplicated: u64,
    pub elapsed_ms: u64,
}

impl SimCheckOptions {
    fn replay(&self) -> String {
        let mut command = format!(
            "chunkcheck sim --seed {} --nodes {} --groups {} --faults {} --keys {} --clients {}",
            self.seed, self.nodes, self.groups, self.faults, self.keys, self.clients
        );
        if self.unsafe_wal_skip_fsync {
            command.push_str(" --unsafe-wal-skip-fsync");
        }
        if self.unsafe_unchecked_reads {
            command.push_str(" --unsafe-unchecked-reads");
        }
        if self.unsafe_wiped_replica_votes {
            command.push_str(" --unsafe-wiped-replica-votes");
        }
        if self.unsafe_wal_ignore_sync_errors {
            command.push_str(" --unsafe-wal-ignore-sync-errors");
        }
        command
    }
}

/// The random choices of one fault of the schedule (each fault uses some of them).
struct FaultDraw {
    kind: u32,
    /// The node hit (the isolated, lagging, wiped, jumped... one).
    index: usize,
    /// Offset of a second node from `index` (1 to nodes - 1).
    other: usize,
    pause_ms: u64,
    lag_ms: u64,
    down_ms: u64,
    jump: usize,
    failing_ms: u64,
    /// Which nodes a roster change keeps (each three times in four).
    roster: Vec<bool>,
}

/// Starts node `index`; a node that refuses to start on what its disks hold after a fault
/// (a WAL it finds corrupt) is noted in `refused` and stays down: the run is then invalid.
async fn start_noting(cluster: &mut SimCluster, index: usize, refused: &mut Vec<String>) {
    if let Err(err) = cluster.start(index).await {
        refused.push(format!("node {}: {err}", index + 1));
    }
}

/// `start_noting` for every node not running.
async fn start_all_noting(cluster: &mut SimCluster, refused: &mut Vec<String>) {
    for index in 0..cluster.addresses().len() {
        if !cluster.is_running(index) {
            start_noting(cluster, index, refused).await;
        }
    }
}

/// The history as the clients record it.
struct Recorder {
    started: Instant,
    /// The clients' birth (wall clock), in their write tags: the exactly-once table forgets
    /// clients older than its horizon.
    born_ms: u64,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn record(&self, process: i64, kind: EventType, f: &str, key: u64, value: Edn) {
        let mut event = Event::new(process, kind, f, value);
        event.key = Some(Edn::Int(key as i64));
        event.time_ns = Some(self.started.elapsed().as_nanos() as u64);
        self.events.lock().unwrap().push(event);
    }
}

fn register_key(key: u64) -> Key {
    Key::new("register", key as i64)
}

/// One operation of client `process` (write when `value` is some, else read), recorded.
async fn perform(client: &SimClient, recorder: &Recorder, process: i64, seq: u64, key: u64, value: Option<i64>, patience: Duration) -> EventType {
    let (f, request) = match value {
        Some(v) => (
            "write",
            Request::Write {
                namespace: SIM_NAMESPACE.into(),
                key: register_key(key),
                op: WriteOp::Put(vec![Bin::new("v", Value::Int(v))]),
                policy: WritePolicy::default(),
                tag: WriteTag { client_id: 1000 + process as u64, born_ms: recorder.born_ms, lane: 0, seq },
            },
        ),
        None => ("read", Request::Get { namespace: SIM_NAMESPACE.into(), key: register_key(key), bins: None, read: ReadPolicy::Linearizable, min_index: 0 }),
    };
    recorder.record(process, EventType::Invoke, f, key, value.map_or(Edn::Nil, Edn::Int));
    let answer = client.call_leader((process as usize) ^ key as usize, &request, patience).await;
    let (kind, out) = match (answer, value) {
        (Some(Response::Written { .. }), Some(v)) => (EventType::Ok, Edn::Int(v)),
        // A write not known to be written may still be (an entry proposed, then the leader lost).
        (_, Some(v)) => (EventType::Info, Edn::Int(v)),
        (Some(Response::Record { record, .. }), None) => {
            let read = match record.as_ref().map(|r| r.bin("v")) {
                None => Edn::Nil,
                Some(Some(Value::Int(v))) => Edn::Int(*v),
                Some(other) => Edn::Str(format!("unexpected bin {other:?}")),
            };
            (EventType::Ok, read)
        }
        // A read that got no answer changed nothing.
        (_, None) => (EventType::Fail, Edn::Nil),
    };
    recorder.record(process, kind, f, key, out);
    kind
}

/// Runs the simulation (see the module's notes). `progress` gets a line per fault.
pub fn run(options: &SimCheckOptions, progress: &dyn Fn(&str)) -> anyhow::Result<SimReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(simulate(options, progress))
}

async fn simulate(options: &SimCheckOptions, progress: &dyn Fn(&str)) -> anyhow::Result<SimReport> {
    anyhow::ensure!(options.nodes >= 3, "a simulated cluster needs at least 3 nodes (RF 3)");
    anyhow::ensure!(options.keys >= 1 && options.clients >= 1, "--keys and --clients must be at least 1");
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let mut rng = SmallRng::seed_from_u64(options.seed);
    let sim = SimOptions {
        nodes: options.nodes,
        groups: options.groups,
        seed: options.seed,
        unsafe_wal_skip_fsync: options.unsafe_wal_skip_fsync,
        unsafe_unchecked_reads: options.unsafe_unchecked_reads,
        unsafe_wiped_replica_votes: options.unsafe_wiped_replica_votes,
        unsafe_wal_ignore_sync_errors: options.unsafe_wal_ignore_sync_errors,
        ..SimOptions::default()
    };
    let mut cluster = SimCluster::new(dir.path().to_owned(), sim);
    cluster.start_all().await?;
    // Every group led before the faults start.
    let client = cluster.client();
    for key in 0..options.groups as u64 * 4 {
        let probe =
            Request::Get { namespace: SIM_NAMESPACE.into(), key: Key::new("probe", key as i64), bins: None, read: ReadPolicy::Linearizable, min_index: 0 };
        anyhow::ensure!(client.call_leader(key as usize, &probe, Duration::from_secs(60)).await.is_some(), "the cluster never elected its leaders");
    }
    cluster.net.set_faults(MemFaults { drop: 0.01, duplicate: 0.03, delay_max: Duration::from_millis(2) });
    let born_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64);
    let recorder = Arc::new(Recorder { started: Instant::now(), born_ms, events: Mutex::new(Vec::new()) });
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..options.clients)
        .map(|first| {
            let (client, recorder, stop, options) = (client.clone(), recorder.clone(), stop.clone(), options.clone());
            let mut rng = SmallRng::seed_from_u64(rng.gen());
            tokio::spawn(async move {
                let mut process = first as i64;
                let mut seq = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    seq += 1;
                    let key = rng.gen_range(0..options.keys);
                    let value = rng.gen_bool(0.5).then(|| process * 1_000_000 + seq as i64);
                    if perform(&client, &recorder, process, seq, key, value, Duration::from_secs(5)).await == EventType::Info {
                        // A process with an operation in doubt never invokes another (Jepsen's rule).
                        process += options.clients as i64;
                        seq = 0;
                    }
                }
            })
        })
        .collect();
    let mut faults = Vec::new();
    // Nodes that refused to start on what their disks held (each stays down).
    let mut refused: Vec<String> = Vec::new();
    let at = |started: &Instant| started.elapsed().as_millis() as u64;
    for _ in 0..options.faults {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..800))).await;
        let nodes = options.nodes as usize;
        // Every draw a fault may use, made for every fault: the schedule is then a function of
        // the seed alone, even where a fault is skipped for the cluster's state (a wipe while
        // an earlier one still catches up).
        let draw = FaultDraw {
            kind: rng.gen_range(0..13),
            index: rng.gen_range(0..nodes),
            other: rng.gen_range(1..nodes),
            pause_ms: rng.gen_range(0..500),
            lag_ms: rng.gen_range(100..400),
            down_ms: rng.gen_range(3000..6000),
            jump: rng.gen_range(0..8),
            failing_ms: rng.gen_range(50..500),
            roster: (0..nodes).map(|_| rng.gen_bool(0.75)).collect(),
        };
        let fault = match draw.kind {
            0..=2 => {
                let index = draw.index;
                let pause = Duration::from_millis(draw.pause_ms);
                cluster.power_cut(&[index]).await;
                tokio::time::sleep(pause).await;
                start_noting(&mut cluster, index, &mut refused).await;
                SimFault { at_ms: at(&started), kind: "power-cut", nodes: vec![index as u64 + 1] }
            }
            3 => {
                cluster.power_cut(&(0..nodes).collect::<Vec<_>>()).await;
                start_all_noting(&mut cluster, &mut refused).await;
                SimFault { at_ms: at(&started), kind: "power-cut-all", nodes: (1..=options.nodes).collect() }
            }
            4 | 5 => {
                let addresses = cluster.addresses();
                let alone = draw.index;
                let others: Vec<&str> = addresses.iter().enumerate().filter(|(i, _)| *i != alone).map(|(_, a)| a.as_str()).collect();
                cluster.net.isolate(&[&addresses[alone]], &others);
                SimFault { at_ms: at(&started), kind: "isolate", nodes: vec![alone as u64 + 1] }
            }
            // One node's disks lost (never a second before the first caught up: the promise
            // covers a minority of a group's replicas), and it restarts empty.
            6 if cluster.disks_lost().is_empty() => {
                let index = draw.index;
                cluster.wipe(index).await;
                start_noting(&mut cluster, index, &mut refused).await;
                SimFault { at_ms: at(&started), kind: "wipe", nodes: vec![index as u64 + 1] }
            }
            // The pattern that once lost writes: node `lagging` falls behind (isolated) while
            // the others take writes; then `down` loses power and `wiped` its disks, and the
            // lagging node comes back with the empty one while `down` stays down a while. An
            // empty replica that votes like a new one elects the lagging node.
            7 if cluster.disks_lost().is_empty() => {
                let addresses = cluster.addresses();
                let lagging = draw.index;
                let down = (lagging + draw.other) % nodes;
                let wiped = (0..nodes).find(|i| *i != lagging && *i != down).expect("three nodes or more");
                cluster.net.heal();
                let others: Vec<&str> = addresses.iter().enumerate().filter(|(i, _)| *i != lagging).map(|(_, a)| a.as_str()).collect();
                cluster.net.isolate(&[&addresses[lagging]], &others);
                tokio::time::sleep(Duration::from_millis(draw.lag_ms)).await;
                cluster.power_cut(&[down]).await;
                cluster.wipe(wiped).await;
                cluster.net.heal();
                start_noting(&mut cluster, wiped, &mut refused).await;
                // Long enough for the lagging node to be allowed to campaign again (2 s of answered
                // health reports) and to win an election.
                tokio::time::sleep(Duration::from_millis(draw.down_ms)).await;
                start_noting(&mut cluster, down, &mut refused).await;
                SimFault { at_ms: at(&started), kind: "lag-down-wipe", nodes: vec![lagging as u64 + 1, down as u64 + 1, wiped as u64 + 1] }
            }
            // A node's wall clock jumps (proposals carry it: TTLs, last-update times, the
            // exactly-once table's idle horizon); elections and leases run on monotonic time.
            8 => {
                let index = draw.index;
                let jumps_ms = [-86_400_000, -3_600_000, -60_000, -5_000, 5_000, 60_000, 3_600_000, 86_400_000];
                let delta_ms = jumps_ms[draw.jump];
                cluster.jump_clock(index, delta_ms);
                SimFault { at_ms: at(&started), kind: if delta_ms < 0 { "clock-back" } else { "clock-forward" }, nodes: vec![index as u64 + 1] }
            }
            // A node's disks fail their fsyncs for a while (its WAL must not acknowledge what
            // it could not sync), then it loses power and restarts on what was durable.
            9 => {
                let index = draw.index;
                cluster.fail_syncs(index);
                tokio::time::sleep(Duration::from_millis(draw.failing_ms)).await;
                cluster.power_cut(&[index]).await;
                start_noting(&mut cluster, index, &mut refused).await;
                SimFault { at_ms: at(&started), kind: "fsync-error", nodes: vec![index as u64 + 1] }
            }
            // The roster changes (clusters of more nodes than replicas): groups move through
            // their own Raft logs while the other faults go on.
            10 if nodes > 3 => {
                let mut roster: Vec<u64> = (1..=options.nodes).filter(|id| draw.roster[*id as usize - 1]).collect();
                for id in 1..=options.nodes {
                    if roster.len() < 3 && !roster.contains(&id) {
                        roster.push(id);
                    }
                }
                roster.sort_unstable();
                let answer = client.call_leader(draw.index, &Request::SetRoster { nodes: roster.clone() }, Duration::from_secs(5)).await;
                let kind = match answer {
                    Some(Response::Noted) => "roster",
                    _ => "roster-refused",
                };
                SimFault { at_ms: at(&started), kind, nodes: roster }
            }
            // A disk failing its fsyncs where it decides commits: node `lagging` falls behind
            // (isolated) while `failing`'s disk fails, then every node loses power. A WAL that
            // acknowledged what it could not sync leaves entries committed on the leader alone,
            // and the two others can elect one of themselves without them.
            11 => {
                let addresses = cluster.addresses();
                let lagging = draw.index;
                let failing = (lagging + draw.other) % nodes;
                cluster.net.heal();
                let others: Vec<&str> = addresses.iter().enumerate().filter(|(i, _)| *i != lagging).map(|(_, a)| a.as_str()).collect();
                cluster.net.isolate(&[&addresses[lagging]], &others);
                cluster.fail_syncs(failing);
                tokio::time::sleep(Duration::from_millis(draw.lag_ms)).await;
                cluster.power_cut(&(0..nodes).collect::<Vec<_>>()).await;
                cluster.net.heal();
                start_all_noting(&mut cluster, &mut refused).await;
                SimFault { at_ms: at(&started), kind: "lag-fsync-error-cut", nodes: vec![lagging as u64 + 1, failing as u64 + 1] }
            }
            _ => {
                cluster.net.heal();
                SimFault { at_ms: at(&started), kind: "heal", nodes: Vec::new() }
            }
        };
        progress(&format!("{:>6} ms  {} {:?}", fault.at_ms, fault.kind, fault.nodes));
        faults.push(fault);
    }
    // The end: every node loses power at once, the moment a write is acknowledged (so that it
    // is still in the nodes' WALs only), with other operations in flight; then all restart.
    cluster.net.heal();
    let acknowledged = |recorder: &Recorder| recorder.events.lock().unwrap().iter().filter(|e| e.kind == EventType::Ok && e.f == "write").count();
    let before = acknowledged(&recorder);
    let deadline = Instant::now() + Duration::from_secs(20);
    while acknowledged(&recorder) == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    cluster.power_cut(&(0..options.nodes as usize).collect::<Vec<_>>()).await;
    faults.push(SimFault { at_ms: at(&started), kind: "power-cut-all", nodes: (1..=options.nodes).collect() });
    stop.store(true, Ordering::SeqCst);
    cluster.net.set_faults(MemFaults::default());
    start_all_noting(&mut cluster, &mut refused).await;
    for task in clients {
        task.await?;
    }
    // Final reads of every key, by a process of their own: with every node up and the network
    // whole, each must be answered (a cluster that lost its state may never elect again).
    let final_process = 1_000_000_000;
    let mut unavailable = Vec::new();
    for key in 0..options.keys {
        if perform(&client, &recorder, final_process, key + 1, key, None, Duration::from_secs(30)).await != EventType::Ok {
            unavailable.push(key);
        }
    }
    let stats = cluster.net.stats();
    cluster.shutdown().await;
    let events = std::mem::take(&mut *recorder.events.lock().unwrap());
    if let Some(path) = &options.history {
        let text: String = events.iter().map(|e| format!("{e}\n")).collect();
        std::fs::write(path, text).map_err(|e| anyhow::anyhow!("writing the history to {}: {e}", path.display()))?;
    }
    let count = |kind: EventType| events.iter().filter(|e| e.kind == kind).count();
    let ops = operations(&events)?;
    let report = linearizable::check(Model::CasRegister, &ops, Limits::within(Duration::from_secs(120))).map_err(anyhow::Error::msg)?;
    let anomalies: Vec<String> = report.keys.iter().filter(|k| k.verdict == Verdict::NotLinearizable).map(|k| k.key.clone().unwrap_or_default()).collect();
    let valid = match report.verdict {
        _ if !unavailable.is_empty() || !refused.is_empty() => serde_json::json!(false),
        Verdict::Linearizable => serde_json::json!(true),
        Verdict::NotLinearizable => serde_json::json!(false),
        Verdict::Unknown => serde_json::json!("unknown"),
    };
    Ok(SimReport {
        seed: options.seed,
        replay: options.replay(),
        valid,
        verdict: report.verdict,
        ok: count(EventType::Ok),
        fail: count(EventType::Fail),
        info: count(EventType::Info),
        anomalies,
        unavailable_keys: unavailable,
        refused_to_start: refused,
        faults,
        messages_delivered: stats.delivered,
        messages_dropped: stats.dropped,
        messages_duplicated: stats.duplicated,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}
