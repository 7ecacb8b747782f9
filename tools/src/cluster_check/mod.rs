//! `chunkcheck register|counter|set`: a fresh cluster of real chunkd processes, concurrent
//! clients recording every operation, faults from a seeded schedule, then heal, recover,
//! final reads, and the checkers. Reading order: `cluster.rs` (the processes),
//! `workload.rs` (clients and the history), `nemesis.rs` (faults), this file (the run).

pub mod clock;
pub mod cluster;
pub mod disk;
pub mod nemesis;
pub mod net;
pub mod packets;
pub mod report;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chunkstore::client::{Client, ClientConfig};
use chunkstore::protocol::ReadPolicy;
use serde_json::json;

use crate::check::linearizable::{self, Limits, Verdict};
use crate::check::models::Model;
use crate::check::{counter, session, set, Reads};
use crate::history::{operations, Edn, Event, EventType};
use chunkstore::meta::ClusterMetaExt as _;
use cluster::TestCluster;
use nemesis::{NemesisKind, PlannedFault};
use workload::{Invocation, Shared, Workload};

/// Everything a run is told.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub workload: Workload,
    pub nodes: u64,
    pub replication_factor: usize,
    pub groups: u32,
    pub time_limit: Duration,
    pub concurrency: usize,
    pub keys: u64,
    pub ops_per_key_max: u32,
    pub nemeses: Vec<NemesisKind>,
    pub nemesis_interval: Duration,
    pub seed: u64,
    pub out: PathBuf,
    pub read_policy: ReadPolicy,
    /// Extra `KEY = VALUE` lines for every node's chunkd.toml (the unsafe negative controls).
    pub chunkd_options: Vec<String>,
    /// Time the linearizability search may take before it answers unknown.
    pub check_time_limit: Duration,
}

/// Each node's engine device in the cluster workloads (their records are small).
const CLUSTER_DEVICE_BYTES: u64 = 128 << 20;

/// Processes of the final reads (after every worker process).
pub(crate) const FINAL_PROCESS: i64 = 1_000_000_000;

/// Progress lines that start with this are status updates (a terminal shows them on one
/// line that updates in place); other lines are events of the run.
pub const STATUS_PREFIX: char = '[';

/// Set by SIGINT/SIGTERM: the run stops, heals and tears down.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to `INTERRUPTED`.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// A fault as it happened.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FaultRecord {
    pub kind: NemesisKind,
    pub target: nemesis::Target,
    pub nodes: Vec<u64>,
    /// Partitions: packets from the first node to the second were dropped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cuts: Vec<net::Cut>,
    /// Partitions: packets the cuts dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_packets: Option<u64>,
    /// Packet faults: what happens to each packet of the links in `cuts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<packets::Shape>,
    /// Packet faults: what the queue did to the packets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets: Option<packets::PacketStats>,
    /// Clock faults: (node, wall-clock offset in milliseconds).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clock_offsets: Vec<(u64, i64)>,
    /// Clock faults: (node, offset the node's own clock showed once the fault began, as its
    /// cluster map's `now_ms` tells; None if it did not answer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub observed_clock_offsets: Vec<(u64, Option<i64>)>,
    /// Disk faults: the regions of the node's devices overwritten while it was down.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub corrupted: Vec<disk::Corruption>,
    /// Roster replace: the fresh node that joined in the replaced node's place.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub joined: Vec<u64>,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// Runs the test; the JSON result (also written to OUT/results.json). Exit code by `valid`.
pub fn run(options: &RunOptions, progress: &mut impl FnMut(&str)) -> serde_json::Value {
    let started = Instant::now();
    let mut result = match run_inner(options, progress) {
        Ok(result) => result,
        Err(err) => {
            json!({ "valid": "unknown", "error": format!("{err:#}"), "ops": 0, "ok": 0, "fail": 0, "info": 0, "anomalies": 0, "nemesis_events": 0, "recovery_ms": null })
        }
    };
    result["workload"] = json!(options.workload);
    result["seed"] = json!(options.seed);
    result["out"] = json!(options.out.display().to_string());
    result["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
    let _ = std::fs::write(options.out.join("results.json"), serde_json::to_string_pretty(&result).unwrap_or_default());
    result
}

fn run_inner(options: &RunOptions, progress: &mut impl FnMut(&str)) -> Result<serde_json::Value> {
    std::fs::create_dir_all(&options.out).with_context(|| format!("creating {}", options.out.display()))?;
    let shrunk = options.nodes - (options.nodes - 1) / 2;
    if options.nemeses.contains(&NemesisKind::Roster) && (options.nodes < 3 || (shrunk as usize) < options.replication_factor) {
        anyhow::bail!(
            "--nemesis roster takes a minority of the {} nodes off the roster, leaving {shrunk}: fewer than the replication factor {} (use more nodes)",
            options.nodes,
            options.replication_factor
        );
    }
    let plan = nemesis::plan(options.seed, &options.nemeses, options.nemesis_interval, options.time_limit);
    let mut nemesis_log = String::new();
    nemesis_log += &format!("seed {} plan ({} faults, interval {:?}):\n", options.seed, plan.len(), options.nemesis_interval);
    for fault in &plan {
        nemesis_log += &format!("  {fault:?}\n");
    }
    let (tools, chunkd_options) = fault_tools(&options.nemeses, &options.chunkd_options)?;
    progress(&format!("starting {} nodes in {}", options.nodes, options.out.display()));
    let cluster = TestCluster::start(
        &options.out.join("cluster"),
        options.nodes,
        options.replication_factor,
        options.groups,
        CLUSTER_DEVICE_BYTES,
        &chunkd_options,
        tools,
    )?;
    let cluster = Arc::new(Mutex::new(cluster));
    let recorder = workload::Recorder::create(&options.out.join("history.edn"))?;
    let seeds = cluster.lock().unwrap().seeds();
    let shared =
        Shared::new(options.workload, seeds.clone(), options.read_policy, options.concurrency, options.keys, options.ops_per_key_max, options.seed, recorder);

    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut crashed: Vec<String> = Vec::new();
    // (node, when it left: ms since the run started; after the time limit if only after the run)
    let mut left: Vec<(u64, u64)> = Vec::new();
    std::thread::scope(|scope| {
        for thread in 0..options.concurrency {
            let shared = &shared;
            scope.spawn(move || workload::run_worker(shared, thread));
        }
        let record = Record { faults: &mut faults, crashed: &mut crashed, left: &mut left, log: &mut nemesis_log };
        let schedule = Schedule { time_limit: options.time_limit, interval: options.nemesis_interval, plan: &plan };
        drive_faults(&schedule, &cluster, &shared.recorder, record, &mut NoProcesses, progress);
        shared.stop.store(true, Ordering::SeqCst);
    });

    progress("healing every fault and restarting every node");
    let recovery = {
        let mut cluster = cluster.lock().unwrap();
        cluster.heal()?;
        // Every node restarts from what it has on disk (a crash of the whole cluster; with
        // disk faults on, a power cut), so the final reads also check that every acknowledged
        // write survives one; recovery is timed from there.
        cluster.restart_all()?;
        cluster.wait_until_ready(Duration::from_secs(120))
    };
    let recovery_ms = recovery.as_ref().ok().map(|d| d.as_millis() as u64);
    let mut run_error = recovery.err().map(|e| format!("the cluster did not recover: {e:#}"));
    // Roster changes must come to an end: every group where the full roster puts it.
    let mut roster_settled_ms = None;
    if run_error.is_none() && options.nemeses.contains(&NemesisKind::Roster) && !INTERRUPTED.load(Ordering::SeqCst) {
        let seeds = cluster.lock().unwrap().seeds();
        match wait_for_roster_to_settle(seeds, ROSTER_SETTLE_LIMIT) {
            Ok(took) => roster_settled_ms = Some(took.as_millis() as u64),
            Err(err) => run_error = Some(format!("{err:#}")),
        }
    }
    // Replaced nodes leave once their groups have moved: the final reads then come from the
    // nodes that stay.
    if run_error.is_none() && options.nemeses.contains(&NemesisKind::Roster) && !INTERRUPTED.load(Ordering::SeqCst) {
        match retire_leaving_nodes(&cluster, ROSTER_SETTLE_LIMIT) {
            Ok(retired) => {
                nemesis_log += &retired.iter().map(|id| format!("after the run: node {id} left the cluster\n")).collect::<String>();
                let at = shared.recorder.elapsed().as_millis() as u64;
                left.extend(retired.into_iter().map(|id| (id, at)));
            }
            Err(err) => run_error = Some(format!("{err:#}")),
        }
    }
    if run_error.is_none() && !INTERRUPTED.load(Ordering::SeqCst) {
        let seeds = cluster.lock().unwrap().seeds();
        if let Err(err) = final_reads(&shared, seeds) {
            run_error = Some(format!("final reads: {err:#}"));
        }
    }
    {
        let mut cluster = cluster.lock().unwrap();
        crashed.extend(cluster.exited().into_iter().map(|(id, status)| format!("node {id} exited on its own ({status})")));
        cluster.tear_down();
    }
    std::fs::write(options.out.join("nemesis.log"), &nemesis_log)?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        run_error.get_or_insert_with(|| "interrupted".into());
    }

    let events = shared.recorder.finish();
    let mut result = check_history(options, &events)?;
    let anomalies = result["anomalies"].as_u64().unwrap_or(0);
    if !crashed.is_empty() {
        result["node_exits"] = json!(crashed);
    }
    if let Some(error) = &run_error {
        result["error"] = json!(error);
        if anomalies == 0 {
            result["valid"] = json!("unknown");
        }
    }
    result["nemesis_events"] = json!(faults.len());
    result["faults"] = json!(faults);
    result["recovery_ms"] = json!(recovery_ms);
    if options.nemeses.contains(&NemesisKind::Roster) {
        result["roster_settled_ms"] = json!(roster_settled_ms);
        result["nodes_joined"] = json!(faults.iter().flat_map(|f| f.joined.iter()).collect::<Vec<_>>());
        result["nodes_left"] = json!(left.iter().map(|(node, at_ms)| json!({ "node": node, "at_ms": at_ms })).collect::<Vec<_>>());
    }
    result["availability"] = availability(&events, &faults);
    for (shown, (ok, ok_reads)) in result["faults"].as_array_mut().into_iter().flatten().zip(ok_during_each(&events, &faults)) {
        shown["ok_ops"] = json!(ok);
        shown["ok_reads"] = json!(ok_reads);
    }
    progress("writing the report");
    if let Err(err) = report::write(&options.out, options, &result, &events, &faults) {
        result["report_error"] = json!(format!("{err:#}"));
    }
    Ok(result)
}

/// What the faults of `nemeses` need set up before the nodes start, and the nodes' config
/// lines with what they need added to `chunkd_options`.
pub(crate) fn fault_tools(nemeses: &[NemesisKind], chunkd_options: &[String]) -> Result<(cluster::FaultTools, Vec<String>)> {
    let wants = |kind| nemeses.contains(&kind);
    let tools = cluster::FaultTools {
        firewall: match wants(NemesisKind::Partition) || wants(NemesisKind::Packet) {
            true => Some(net::Firewall::new()?),
            false => None,
        },
        packets: match wants(NemesisKind::Packet) {
            true => Some(packets::PacketQueue::open()?),
            false => None,
        },
        fake_clock: match wants(NemesisKind::Clock) {
            true => Some(clock::library()?),
            false => None,
        },
    };
    // With disk faults every kill is a power cut: the engines' devices drop unsynced writes.
    let mut chunkd_options = chunkd_options.to_vec();
    if wants(NemesisKind::Disk) {
        chunkd_options.push("test-power-loss-devices = true".into());
    }
    Ok((tools, chunkd_options))
}

/// What the nemesis thread records as the run goes.
pub(crate) struct Record<'a> {
    pub faults: &'a mut Vec<FaultRecord>,
    /// Nodes that exited on their own, and faults that could not be started or healed.
    pub crashed: &'a mut Vec<String>,
    /// Replaced nodes that left the cluster.
    pub left: &'a mut Vec<(u64, u64)>,
    /// nemesis.log
    pub log: &'a mut String,
}

/// When faults come: the run's length, the time between faults, and the plan.
pub(crate) struct Schedule<'a> {
    pub time_limit: Duration,
    pub interval: Duration,
    pub plan: &'a [PlannedFault],
}

/// Faults of the processes a files workload runs besides the nodes (`NemesisKind::AppKill`,
/// `NemesisKind::FsKill`).
pub(crate) trait ProcessFaults {
    /// Starts one; the numbers of the processes it hit (shown where a node fault shows nodes).
    fn inflict(&mut self, kind: NemesisKind, pick: u64) -> Result<Vec<u64>>;
    fn heal(&mut self, kind: NemesisKind, hit: &[u64]) -> Result<()>;

    /// Every node lost power (`Target::PowerCut`): on one machine, so did the workload's
    /// processes.
    fn power_cut(&mut self) -> Result<()> {
        Ok(())
    }

    fn power_restored(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The cluster workloads run no other processes.
struct NoProcesses;

impl ProcessFaults for NoProcesses {
    fn inflict(&mut self, kind: NemesisKind, _pick: u64) -> Result<Vec<u64>> {
        anyhow::bail!("{} is a fault of the files workloads only", kind_name(kind))
    }

    fn heal(&mut self, _kind: NemesisKind, _hit: &[u64]) -> Result<()> {
        Ok(())
    }
}

/// Carries out the fault plan until the time limit (or an interrupt), printing progress.
/// Between faults, replaced nodes whose groups have moved away leave the cluster.
pub(crate) fn drive_faults(
    schedule: &Schedule,
    cluster: &Arc<Mutex<TestCluster>>,
    recorder: &workload::Recorder,
    record: Record,
    processes: &mut dyn ProcessFaults,
    progress: &mut impl FnMut(&str),
) {
    let Record { faults, crashed, left, log } = record;
    let Schedule { time_limit, interval, plan } = *schedule;
    let mut next = 0;
    let mut next_start = interval;
    let mut active: Option<(FaultRecord, Duration)> = None;
    let mut last_progress = Duration::ZERO;
    let mut nemesis_client: Option<Client> = None;
    loop {
        let now = recorder.elapsed();
        if now >= time_limit || INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        crashed.extend(
            cluster.lock().unwrap().exited().into_iter().map(|(id, status)| format!("node {id} exited on its own ({status}) at {} ms", now.as_millis())),
        );
        match &mut active {
            Some((fault, ends)) if now >= *ends => {
                match heal_fault(cluster, processes, fault) {
                    Ok(()) => {}
                    Err(err) => crashed.push(format!("could not heal {:?}: {err:#}", fault.kind)),
                }
                fault.end_ms = now.as_millis() as u64;
                *log += &format!("{:>8} ms heal {:?} {:?}\n", fault.end_ms, fault.kind, fault.nodes);
                recorder.record(nemesis_event(&format!("stop-{}", kind_name(fault.kind)), &fault.nodes));
                faults.push(fault.clone());
                next_start = now + interval;
                active = None;
            }
            None if next < plan.len() && now >= next_start => {
                let planned = &plan[next];
                next += 1;
                let seeds = cluster.lock().unwrap().seeds();
                let (leader, groups) = cluster_view(&mut nemesis_client, &seeds);
                // Roster changes pick among the roster's nodes; other faults hit leaving nodes too.
                let node_ids = match planned.kind {
                    NemesisKind::Roster => cluster.lock().unwrap().roster(),
                    _ => cluster.lock().unwrap().ids(),
                };
                let mut hit = nemesis::resolve(planned, &node_ids, leader, &groups);
                let inflicted = match planned.kind.is_process_fault() {
                    true => processes.inflict(planned.kind, planned.pick).map(|processes| {
                        hit.nodes = processes;
                        nemesis::Inflicted::default()
                    }),
                    false => nemesis::inflict(cluster, planned.kind, planned.target, &hit).and_then(|inflicted| {
                        if planned.target == nemesis::Target::PowerCut {
                            processes.power_cut()?;
                        }
                        Ok(inflicted)
                    }),
                };
                let nemesis::Inflicted { corrupted, joined } = match inflicted {
                    Ok(inflicted) => inflicted,
                    Err(err) => {
                        crashed.push(format!("could not start {:?}: {err:#}", planned.kind));
                        nemesis::Inflicted::default()
                    }
                };
                let cuts = match hit.cuts.is_empty() {
                    true => String::new(),
                    false => format!(" cutting {}", hit.cuts.iter().map(|(a, b)| format!("{a}->{b}")).collect::<Vec<_>>().join(" ")),
                };
                let cuts = cuts + &hit.clock_offsets.iter().map(|(n, ms)| format!(" clock of {n} {ms:+} ms")).collect::<String>();
                let cuts = cuts
                    + &corrupted.iter().map(|c| format!(" overwrote {} bytes at {} of {}", c.len, c.offset, c.file.display())).collect::<String>()
                    + &joined.iter().map(|id| format!(" node {id} joined in its place")).collect::<String>();
                let observed_clock_offsets = match planned.target {
                    // A strobe's phase is whatever it is when observed.
                    nemesis::Target::Jump | nemesis::Target::Skew => {
                        let addresses: Vec<(u64, Option<String>)> = {
                            let cluster = cluster.lock().unwrap();
                            hit.clock_offsets.iter().map(|&(id, _)| (id, cluster.client_address(id).map(str::to_owned))).collect()
                        };
                        addresses.into_iter().map(|(id, address)| (id, address.and_then(|a| observed_clock_offset(&a)))).collect()
                    }
                    _ => Vec::new(),
                };
                *log += &format!("{:>8} ms {:?} {:?} {:?} for {} ms{cuts}\n", now.as_millis(), planned.kind, planned.target, hit.nodes, planned.duration_ms);
                recorder.record(nemesis_event(&format!("start-{}", kind_name(planned.kind)), &hit.nodes));
                let record = FaultRecord {
                    kind: planned.kind,
                    target: planned.target,
                    nodes: hit.nodes,
                    cuts: hit.cuts,
                    dropped_packets: None,
                    shape: hit.shape,
                    packets: None,
                    clock_offsets: hit.clock_offsets,
                    observed_clock_offsets,
                    corrupted,
                    joined,
                    start_ms: now.as_millis() as u64,
                    end_ms: 0,
                };
                active = Some((record, now + Duration::from_millis(planned.duration_ms)));
            }
            Some((fault, ends)) => {
                let since = now.saturating_sub(Duration::from_millis(fault.start_ms));
                let duration = ends.saturating_sub(Duration::from_millis(fault.start_ms));
                if let Err(err) = nemesis::tick(cluster, fault.target, &fault.resolved(), since, duration) {
                    crashed.push(format!("could not keep {:?} going: {err:#}", fault.kind));
                }
            }
            _ => {}
        }
        if now >= last_progress + Duration::from_secs(1) {
            if active.is_none() {
                match cluster.lock().unwrap().retire_finished() {
                    Ok(retired) => {
                        *log += &retired.iter().map(|id| format!("{:>8} ms node {id} left the cluster\n", now.as_millis())).collect::<String>();
                        left.extend(retired.into_iter().map(|id| (id, now.as_millis() as u64)));
                    }
                    // The metadata leader may be down or electing: tried again a second later.
                    Err(err) => tracing::debug!("retiring leaving nodes: {err:#}"),
                }
            }
            last_progress = now;
            let fault = active.as_ref().map_or("none".to_string(), |(f, ends)| {
                format!("{} {:?} {:?} ({} s left)", kind_name(f.kind), f.target, f.nodes, ends.saturating_sub(now).as_secs())
            });
            let (ops, fail, info) = recorder.completed();
            progress(&format!("[{:>4}s/{}s] {ops} ops ({fail} fail, {info} info), fault: {fault}", now.as_secs(), time_limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some((mut fault, _)) = active {
        if let Err(err) = heal_fault(cluster, processes, &mut fault) {
            crashed.push(format!("could not heal {:?}: {err:#}", fault.kind));
        }
        fault.end_ms = recorder.elapsed().as_millis() as u64;
        *log += &format!("{:>8} ms heal {:?} {:?} (end of run)\n", fault.end_ms, fault.kind, fault.nodes);
        recorder.record(nemesis_event(&format!("stop-{}", kind_name(fault.kind)), &fault.nodes));
        faults.push(fault);
    }
}

/// Ends a fault, of the cluster or of the workload's processes.
fn heal_fault(cluster: &Arc<Mutex<TestCluster>>, processes: &mut dyn ProcessFaults, fault: &mut FaultRecord) -> Result<()> {
    match fault.kind.is_process_fault() {
        true => processes.heal(fault.kind, &fault.nodes),
        false => {
            fault.record_healed(nemesis::heal(cluster, fault.kind, &fault.resolved())?);
            match fault.target {
                nemesis::Target::PowerCut => processes.power_restored(),
                _ => Ok(()),
            }
        }
    }
}

pub(crate) fn kind_name(kind: NemesisKind) -> &'static str {
    match kind {
        NemesisKind::Kill => "kill",
        NemesisKind::Pause => "pause",
        NemesisKind::Partition => "partition",
        NemesisKind::Clock => "clock",
        NemesisKind::Disk => "disk",
        NemesisKind::Roster => "roster",
        NemesisKind::Packet => "packet",
        NemesisKind::Wipe => "wipe",
        NemesisKind::WalCorrupt => "wal-corrupt",
        NemesisKind::AppKill => "app-kill",
        NemesisKind::FsKill => "fs-kill",
        NemesisKind::HostPause => "host-pause",
        NemesisKind::MachineCut => "machine-cut",
    }
}

impl FaultRecord {
    fn resolved(&self) -> nemesis::Resolved {
        nemesis::Resolved { nodes: self.nodes.clone(), cuts: self.cuts.clone(), clock_offsets: self.clock_offsets.clone(), seed: 0, shape: self.shape }
    }

    fn record_healed(&mut self, healed: nemesis::Healed) {
        self.dropped_packets = healed.dropped_packets;
        self.packets = healed.packets;
    }
}

pub(crate) fn nemesis_event(f: &str, nodes: &[u64]) -> Event {
    let mut event = Event::new(0, EventType::Info, f, Edn::Vector(nodes.iter().map(|&n| Edn::Int(n as i64)).collect()));
    event.process = None;
    event
}

/// The node leading the most groups, and the replicas of every group, as the cluster map says
/// (None and nothing if no node answers).
fn cluster_view(client: &mut Option<Client>, seeds: &[String]) -> (Option<u64>, Vec<Vec<u64>>) {
    if client.is_none() {
        let config = ClientConfig { timeout: Duration::from_millis(500), retries_max: 0, ..ClientConfig::new(seeds.to_vec()) };
        *client = Client::connect(config).ok();
    }
    let Some(map) = client.as_ref().and_then(|c| c.refresh_map().ok()) else { return (None, Vec::new()) };
    let mut counts: std::collections::BTreeMap<u64, usize> = Default::default();
    for ns in &map.namespaces {
        for leader in ns.leaders.iter().flatten() {
            *counts.entry(*leader).or_default() += 1;
        }
    }
    let leader = counts.into_iter().max_by_key(|(_, count)| *count).map(|(id, _)| id);
    (leader, map.namespaces.iter().flat_map(|ns| ns.replicas.iter().cloned()).collect())
}

/// How far the wall clock of the node at `address` is from ours, by the `now_ms` of the
/// cluster map it sends (the time halfway through the request is taken as its moment).
fn observed_clock_offset(address: &str) -> Option<i64> {
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let config = ClientConfig { timeout: Duration::from_millis(1000), retries_max: 0, ..ClientConfig::new(vec![address.to_owned()]) };
    let client = Client::connect(config).ok()?;
    let before = now_ms();
    let map = client.refresh_map().ok()?;
    let after = now_ms();
    Some(map.now_ms as i64 - (before + after) / 2)
}

/// After healing: one linearizable read of every key, retried until it succeeds (`seeds`: the
/// nodes of the cluster as it is now).
fn final_reads(shared: &Shared, seeds: Vec<String>) -> Result<()> {
    let client =
        Client::connect(ClientConfig { read_policy: ReadPolicy::Linearizable, ..ClientConfig::new(seeds) }).context("connecting for the final reads")?;
    for key in 0..shared.keys_used() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let op = Invocation { f: "read", key, value: Edn::Nil };
            let done = workload::perform_with_policy(&client, shared, FINAL_PROCESS, &op, ReadPolicy::Linearizable);
            if done.kind == EventType::Ok {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("key {key} could not be read within 30 s after healing: {:?}", done.error);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Runs the workload's checkers over the history.
pub fn check_history(options: &RunOptions, events: &[Event]) -> Result<serde_json::Value> {
    let ops = operations(events)?;
    let count = |kind: EventType| events.iter().filter(|e| e.process.is_some() && e.kind == kind).count();
    let concurrency = options.concurrency.max(1) as i64;
    let session_of = |process: i64| if process >= FINAL_PROCESS { -1 } else { process % concurrency };
    let is_final = |process: i64| process >= FINAL_PROCESS;
    let reads = Reads::of(options.read_policy);
    let mut result = json!({
        "ops": ops.len(),
        "ok": count(EventType::Ok),
        "fail": count(EventType::Fail),
        // Completed :info plus invocations that never completed.
        "info": ops.iter().filter(|op| op.outcome == crate::history::Outcome::Unknown).count(),
        "read_policy": options.read_policy.name().to_owned(),
    });
    let (anomalies, unknown, details) = match options.workload {
        Workload::Register => {
            let sessions = session::check(&ops, reads, session_of, is_final);
            let mut anomalies = sessions.anomalies.len();
            let mut details = json!({ "session": sessions.anomalies, "stale_reads": sessions.stale_reads });
            // Weaker reads may rightly be stale, so the linearizability check leaves them out
            // and covers the rest: writes, compare-and-sets (which read too) and final reads.
            // Leaving reads out of a linearizable register history keeps it linearizable.
            let weak_read = |op: &&crate::history::Operation| reads != Reads::Linearizable && op.f == "read" && !is_final(op.process);
            let checked: Vec<crate::history::Operation> = ops.iter().filter(|op| !weak_read(op)).cloned().collect();
            let report = linearizable::check(Model::CasRegister, &checked, Limits::within(options.check_time_limit)).map_err(anyhow::Error::msg)?;
            anomalies += report.keys.iter().filter(|k| k.verdict == Verdict::NotLinearizable).count();
            let unknown = report.verdict == Verdict::Unknown;
            let bad: Vec<_> = report.keys.iter().filter(|k| k.verdict != Verdict::Linearizable).collect();
            details["linearizable"] = json!({
                "verdict": report.verdict,
                "keys": report.keys.len(),
                "elapsed_ms": report.elapsed_ms,
                "not_linearizable_or_unknown": bad,
                "weak_reads_left_out": ops.len() - checked.len(),
            });
            (anomalies, unknown, details)
        }
        Workload::Counter => {
            let report = counter::check(&ops, reads, session_of, is_final);
            (report.anomalies.len(), false, json!({ "counter": report }))
        }
        Workload::Lock => {
            let report = crate::check::lock::check(&ops);
            let unknown = !report.keys_never_read.is_empty();
            (report.anomalies.len(), unknown, json!({ "lock": report }))
        }
        Workload::Set => {
            let report = set::check(&ops, reads, session_of);
            let unknown = !report.keys_never_read.is_empty();
            (report.anomalies(), unknown, json!({ "set": report }))
        }
    };
    result["anomalies"] = json!(anomalies);
    result["valid"] = match (anomalies, unknown) {
        (0, false) => json!(true),
        (0, true) => json!("unknown"),
        _ => json!(false),
    };
    result["checks"] = details;
    Ok(result)
}

/// For each fault, the workload's operations and reads that completed successfully while it
/// was active.
fn ok_during_each(events: &[Event], faults: &[FaultRecord]) -> Vec<(u64, u64)> {
    faults
        .iter()
        .map(|fault| {
            let ok = events.iter().filter(|e| {
                let ms = e.time_ns.unwrap_or(0) / 1_000_000;
                e.process.is_some_and(|p| p < FINAL_PROCESS) && e.kind == EventType::Ok && ms >= fault.start_ms && ms < fault.end_ms
            });
            ok.fold((0, 0), |(all, reads), e| (all + 1, reads + u64::from(e.f == "read")))
        })
        .collect()
}

/// Successful operations per second while a fault was active and while none was.
fn availability(events: &[Event], faults: &[FaultRecord]) -> serde_json::Value {
    let in_fault = |ms: u64| faults.iter().any(|f| ms >= f.start_ms && ms < f.end_ms.max(f.start_ms));
    let fault_ms: u64 = faults.iter().map(|f| f.end_ms.saturating_sub(f.start_ms)).sum();
    let last_ms = events.iter().filter_map(|e| e.time_ns).max().unwrap_or(0) / 1_000_000;
    let (mut during, mut outside) = (0u64, 0u64);
    for event in events.iter().filter(|e| e.process.is_some_and(|p| p < FINAL_PROCESS) && e.kind == EventType::Ok) {
        let ms = event.time_ns.unwrap_or(0) / 1_000_000;
        if in_fault(ms) {
            during += 1;
        } else {
            outside += 1;
        }
    }
    let rate = |count: u64, ms: u64| if ms == 0 { serde_json::Value::Null } else { json!((count as f64 * 1000.0 / ms as f64).round()) };
    json!({
        "ok_per_sec_during_faults": rate(during, fault_ms),
        "ok_per_sec_outside_faults": rate(outside, last_ms.saturating_sub(fault_ms)),
        "fault_ms": fault_ms,
    })
}

/// How long, after recovery, the groups may take to reach the places the full roster gives them.
const ROSTER_SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// After the roster settled: waits until every replaced node has left (`retire_finished`);
/// the nodes that left.
fn retire_leaving_nodes(cluster: &Mutex<TestCluster>, limit: Duration) -> anyhow::Result<Vec<u64>> {
    let started = Instant::now();
    let mut retired = Vec::new();
    let mut last = String::new();
    loop {
        match cluster.lock().unwrap().retire_finished() {
            Ok(done) => retired.extend(done),
            Err(err) => last = format!(": {err:#}"),
        }
        let leaving: Vec<u64> = cluster.lock().unwrap().nodes.iter().filter(|n| n.leaving).map(|n| n.id).collect();
        if leaving.is_empty() {
            return Ok(retired);
        }
        if started.elapsed() > limit {
            anyhow::bail!("nodes {leaving:?} were replaced but did not leave within {} s{last}", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits until no group moves and every group is where the roster puts it; how long that took,
/// or what was still unsettled at `limit` (a move that never ends is a failed run, though no
/// operation saw it).
fn wait_for_roster_to_settle(seeds: Vec<String>, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let client = Client::connect(ClientConfig::new(seeds))?;
    let mut last = String::from("no cluster metadata read yet");
    while started.elapsed() < limit {
        match client.cluster_meta() {
            Ok(meta) => {
                let moving: Vec<String> =
                    meta.namespaces.iter().flat_map(|ns| ns.moves.iter().map(move |(g, to)| format!("{}/{g} to {to:?}", ns.name))).collect();
                let unplaced: Vec<String> = meta
                    .balance()
                    .into_iter()
                    .filter(|(_, placed, total)| placed != total)
                    .map(|(ns, placed, total)| format!("{ns}: {placed}/{total} placed"))
                    .collect();
                if moving.is_empty() && unplaced.is_empty() {
                    return Ok(started.elapsed());
                }
                last = format!("moving: {moving:?}; {unplaced:?}");
            }
            Err(err) => last = format!("reading the cluster metadata: {err}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    anyhow::bail!("the roster did not settle within {} s after recovery: {last}", limit.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(read_policy: ReadPolicy) -> RunOptions {
        RunOptions {
            workload: Workload::Register,
            nodes: 3,
            replication_factor: 3,
            groups: 1,
            time_limit: Duration::from_secs(1),
            concurrency: 2,
            keys: 1,
            ops_per_key_max: 10,
            nemeses: Vec::new(),
            nemesis_interval: Duration::from_secs(1),
            seed: 1,
            out: PathBuf::new(),
            read_policy,
            chunkd_options: Vec::new(),
            check_time_limit: Duration::from_secs(10),
        }
    }

    /// Two compare-and-sets from the same value both succeed, one after the other: no read
    /// shows it, so only the linearizability check can. It must run whatever the read policy
    /// (leaving out only the weaker reads), else such a history passes as valid.
    #[test]
    fn the_linearizability_check_covers_writes_whatever_the_read_policy() {
        let history = "\
{:process 0, :type :invoke, :f :write, :key 0, :value 1}
{:process 0, :type :ok, :f :write, :key 0, :value 1}
{:process 0, :type :invoke, :f :cas, :key 0, :value [1 2]}
{:process 0, :type :ok, :f :cas, :key 0, :value [1 2]}
{:process 1, :type :invoke, :f :read, :key 0, :value nil}
{:process 1, :type :ok, :f :read, :key 0, :value 1}
{:process 1, :type :invoke, :f :cas, :key 0, :value [1 3]}
{:process 1, :type :ok, :f :cas, :key 0, :value [1 3]}
";
        let events = crate::history::parse_history(history).unwrap();
        for policy in [ReadPolicy::Linearizable, ReadPolicy::AllowReplica, ReadPolicy::AllowUnavailable] {
            let result = check_history(&options(policy), &events).unwrap();
            assert_eq!(result["valid"], json!(false), "{policy:?}: {result}");
            assert_eq!(result["checks"]["linearizable"]["verdict"], json!("not-linearizable"), "{policy:?}: {result}");
        }
        // The stale read of 1 (after the first compare-and-set) is left out only when reads may be stale.
        let left_out = |policy| check_history(&options(policy), &events).unwrap()["checks"]["linearizable"]["weak_reads_left_out"].clone();
        assert_eq!((left_out(ReadPolicy::Linearizable), left_out(ReadPolicy::AllowReplica)), (json!(0), json!(1)));
    }
}
