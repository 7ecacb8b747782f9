//! Faults: the schedule is drawn from the seed before the run starts (so the same seed gives
//! the same sequence of fault kinds and targets), then carried out against the cluster.
//! Faults alternate with healthy periods of the same length: fault, heal, fault, heal...

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::cluster::TestCluster;
use super::disk::{self, Corruption};
use super::net::{self, Cut};
use super::packets::{PacketStats, Shape};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NemesisKind {
    /// SIGKILL of one node, a minority, a majority, all nodes, the busiest leader, or the
    /// replicas of one group one after another; then a restart on the same data.
    Kill,
    /// SIGSTOP/SIGCONT of one node or the busiest leader, past the election timeout or for 30 s.
    Pause,
    /// Network cuts between nodes (iptables, needs root): random halves, one node or the
    /// busiest leader isolated, a majorities ring, or one node cut off in one direction only.
    Partition,
    /// Wall-clock faults (libfaketime): one node's clock jumps, or strobes between two
    /// times, or every node's clock is skewed differently (by more than Aerospike's 27 s).
    Clock,
    /// One node's engine device damaged while it is down (killed, random regions of its
    /// written blocks overwritten, restarted: it must find the damage and rebuild its copy
    /// from its peers, never serve it), or a power cut of every node. With it, every node's
    /// engine devices drop unsynced writes when the process dies, so every kill is a power cut.
    Disk,
    /// Packets of one node's links, or of every link, delayed, dropped or reordered (netem's
    /// faults, done through NFQUEUE: `packets.rs`; needs root).
    Packet,
    /// One node loses its disk: killed, its whole data directory (WAL, snapshots, devices)
    /// deleted, restarted empty. It must catch up from its peers without ever helping a replica
    /// that lacks acknowledged writes to lead (store/src/node/rejoin.rs).
    Wipe,
    /// One node's write-ahead log damaged while it is down: killed, one byte flipped inside a
    /// record in the middle of its newest segment (synced flushes after it: no crash can do
    /// that), restarted. It must report the corruption and rebuild from its peers without
    /// voting until caught up (store/src/node/wal_damage.rs), never cut the log as a torn tail.
    WalCorrupt,
    /// Roster changes under the workload. Shrink: a minority of the nodes taken off the roster
    /// (leaving at least the replication factor), so that their groups move away; healing puts
    /// them back, and groups move back. Replace: a fresh chunkd (new id, empty disk) joins the
    /// cluster and takes one node's place on the roster; the replaced node's groups move to
    /// it, and once it holds nothing the node is stopped and forgotten (ForgetNode).
    Roster,
    /// Files workloads only: kill -9 of one application process at a random moment; it is
    /// started again at once and recovers from what the file holds.
    AppKill,
    /// Files workloads only: kill -9 of one chunkfs process (its applications see their calls
    /// fail); healing mounts the volume afresh and restarts them.
    FsKill,
    /// Files workloads only: SIGSTOP of one machine's chunkfs and applications (failover: the
    /// active one's) for the fault's length, then SIGCONT: its lease runs out meanwhile.
    HostPause,
    /// Files workloads only: one machine (failover: the active one) cut off from the cluster
    /// for the fault's length: every packet from or to its address dropped (its mount's or its
    /// applications' connections leave from an address of its own; needs root).
    MachineCut,
}

impl NemesisKind {
    /// Faults of the processes of a files workload rather than of the cluster's nodes.
    pub fn is_process_fault(self) -> bool {
        matches!(self, NemesisKind::AppKill | NemesisKind::FsKill | NemesisKind::HostPause | NemesisKind::MachineCut)
    }
}

/// Which nodes a fault hits, resolved when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    One,
    Minority,
    Majority,
    All,
    /// The node leading the most groups.
    Leader,
    /// Kill: the replicas of one group, one after another: each is killed, and restarted when
    /// the next one is killed.
    Rolling,
    /// Partitions: a random minority against the rest.
    Halves,
    /// Partitions: every node sees a majority, no two the same one.
    Ring,
    /// Partitions: one node's packets to the others are dropped, or theirs to it.
    OneWay,
    /// Clock: one node's clock jumps forward or back, by up to a day.
    Jump,
    /// Clock: one node's clock flips between right and far off, every `STROBE_PERIOD`.
    Strobe,
    /// Clock: every node's clock is off by a different amount, up to a minute either way.
    Skew,
    /// Disk: regions of one node's devices overwritten while it is down.
    Corrupt,
    /// Disk: every node killed at once, losing what its devices had not synced.
    PowerCut,
    /// Packets: every packet held, by tens of milliseconds or past the election timeout, with
    /// jitter (so packets overtake each other too).
    Delay,
    /// Packets: a share of packets dropped.
    Loss,
    /// Packets: a share of packets held, the rest passing them.
    Reorder,
    /// Roster: the nodes taken off the roster.
    Shrink,
    /// Roster: the node a fresh node replaces (it leaves the cluster for good).
    Replace,
    /// App-kill and fs-kill: one process of the workload (no node).
    Process,
}

/// How often a strobed clock flips.
pub const STROBE_PERIOD: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, serde::Serialize)]
pub struct PlannedFault {
    pub kind: NemesisKind,
    pub target: Target,
    /// How long the fault lasts before it is healed.
    pub duration_ms: u64,
    /// Seed for picking the nodes within the target.
    pub pick: u64,
}

/// Pauses at least this long outlast Aerospike's 27 s clock-skew limit.
pub const LONG_PAUSE: Duration = Duration::from_secs(30);

/// The faults of a run of `time_limit`, one per two intervals.
pub fn plan(seed: u64, kinds: &[NemesisKind], interval: Duration, time_limit: Duration) -> Vec<PlannedFault> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x006e_656d_6573_6973);
    let mut faults = Vec::new();
    if kinds.is_empty() || interval.is_zero() {
        return faults;
    }
    let mut at = interval;
    while at + interval <= time_limit {
        let kind = *kinds.choose(&mut rng).expect("kinds is not empty");
        let target = match kind {
            NemesisKind::Kill => *[Target::One, Target::Minority, Target::Majority, Target::All, Target::Leader, Target::Rolling].choose(&mut rng).unwrap(),
            NemesisKind::Pause => *[Target::One, Target::Leader].choose(&mut rng).unwrap(),
            NemesisKind::Partition => *[Target::Halves, Target::One, Target::Leader, Target::Ring, Target::OneWay].choose(&mut rng).unwrap(),
            NemesisKind::Clock => *[Target::Jump, Target::Strobe, Target::Skew].choose(&mut rng).unwrap(),
            NemesisKind::Disk => *[Target::Corrupt, Target::PowerCut].choose(&mut rng).unwrap(),
            NemesisKind::Packet => *[Target::Delay, Target::Loss, Target::Reorder].choose(&mut rng).unwrap(),
            NemesisKind::Wipe | NemesisKind::WalCorrupt => Target::One,
            NemesisKind::Roster => *[Target::Shrink, Target::Replace].choose(&mut rng).unwrap(),
            NemesisKind::AppKill | NemesisKind::FsKill | NemesisKind::HostPause | NemesisKind::MachineCut => Target::Process,
        };
        let long = kind == NemesisKind::Pause && rng.gen_bool(0.25) && at + LONG_PAUSE + interval <= time_limit;
        let duration = if long { LONG_PAUSE } else { interval };
        faults.push(PlannedFault { kind, target, duration_ms: duration.as_millis() as u64, pick: rng.gen() });
        at += duration + interval;
    }
    faults
}

/// What a fault hits, resolved when it starts: the nodes, and for partitions the directed
/// cuts (packets from the first node to the second are dropped).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    pub nodes: Vec<u64>,
    pub cuts: Vec<Cut>,
    /// Clock faults: (node, offset of its wall clock in milliseconds).
    pub clock_offsets: Vec<(u64, i64)>,
    /// Disk faults: picks the regions overwritten. Packet faults: draws each packet's fate.
    pub seed: u64,
    /// Packet faults: what happens to the packets of the links in `cuts`.
    pub shape: Option<Shape>,
}

/// Picks the nodes a fault hits. `leader` is the node leading the most groups, if known;
/// `groups` the replicas of each group, as far as known.
pub fn resolve(fault: &PlannedFault, nodes: &[u64], leader: Option<u64>, groups: &[Vec<u64>]) -> Resolved {
    let mut rng = SmallRng::seed_from_u64(fault.pick);
    let mut shuffled = nodes.to_vec();
    shuffled.shuffle(&mut rng);
    // The view of the cluster may be stale (a node that left since): only nodes of the cluster.
    let leader = leader.filter(|l| nodes.contains(l)).unwrap_or(shuffled[0]);
    let picked = |count: usize| {
        let mut picked = shuffled[..count.clamp(1, nodes.len())].to_vec();
        picked.sort_unstable();
        picked
    };
    let hit = match fault.target {
        Target::One | Target::OneWay | Target::Jump | Target::Strobe | Target::Corrupt | Target::Replace => picked(1),
        Target::Minority | Target::Halves | Target::Shrink => picked((nodes.len() - 1) / 2),
        Target::Majority => picked(nodes.len() / 2 + 1),
        Target::All | Target::Ring | Target::Skew | Target::PowerCut => picked(nodes.len()),
        Target::Leader => vec![leader],
        Target::Process => Vec::new(),
        // In the order they are killed.
        Target::Rolling => match groups.choose(&mut rng) {
            Some(replicas) if !replicas.is_empty() && replicas.iter().all(|r| nodes.contains(r)) => replicas.clone(),
            _ => shuffled[..3.min(nodes.len())].to_vec(),
        },
        // One node's links, or every link.
        Target::Delay | Target::Loss | Target::Reorder => match rng.gen_bool(0.5) {
            true => picked(1),
            false => picked(nodes.len()),
        },
    };
    let cuts = match (fault.kind, fault.target) {
        (NemesisKind::Partition, Target::Ring) => net::majorities_ring(&shuffled),
        (NemesisKind::Partition, Target::OneWay) => {
            let (node, others) = (hit[0], nodes.iter().copied().filter(|&o| o != hit[0]));
            match rng.gen_bool(0.5) {
                true => others.map(|o| (node, o)).collect(),
                false => others.map(|o| (o, node)).collect(),
            }
        }
        (NemesisKind::Partition, _) => net::isolate(&hit, nodes),
        (NemesisKind::Packet, _) => net::links_of(&hit, nodes),
        _ => Vec::new(),
    };
    let sign = |rng: &mut SmallRng| if rng.gen_bool(0.5) { 1 } else { -1 };
    let clock_offsets = match fault.target {
        Target::Jump => hit.iter().map(|&n| (n, sign(&mut rng) * rng.gen_range(2_000..=86_400_000))).collect(),
        Target::Strobe => hit.iter().map(|&n| (n, sign(&mut rng) * rng.gen_range(2_000..=600_000))).collect(),
        Target::Skew => hit.iter().map(|&n| (n, rng.gen_range(-60_000..=60_000))).collect(),
        _ => Vec::new(),
    };
    let shape = match fault.target {
        // One delay in four outlasts the election timeout (800..1600 ms by default) both ways.
        Target::Delay => {
            let delay_ms = if rng.gen_bool(0.25) { rng.gen_range(500..=1_000) } else { rng.gen_range(10..=200) };
            Some(Shape { delay_ms, jitter_ms: delay_ms / 2, loss: 0.0, reorder: 0.0 })
        }
        Target::Loss => Some(Shape { delay_ms: 0, jitter_ms: 0, loss: rng.gen_range(0.05..=0.4), reorder: 0.0 }),
        Target::Reorder => {
            let delay_ms = rng.gen_range(5..=50);
            Some(Shape { delay_ms, jitter_ms: delay_ms / 2, loss: 0.0, reorder: rng.gen_range(0.1..=0.5) })
        }
        _ => None,
    };
    Resolved { nodes: hit, cuts, clock_offsets, seed: rng.gen(), shape }
}

/// What starting a fault did beyond what `Resolved` says.
#[derive(Debug, Default)]
pub struct Inflicted {
    /// Disk faults: the regions overwritten.
    pub corrupted: Vec<Corruption>,
    /// Roster replace: the fresh node that joined.
    pub joined: Vec<u64>,
}

/// Starts a fault. The roster's nodes (`hit.nodes`) must be nodes on the roster.
pub fn inflict(cluster: &Arc<Mutex<TestCluster>>, kind: NemesisKind, target: Target, hit: &Resolved) -> anyhow::Result<Inflicted> {
    let mut cluster = cluster.lock().unwrap();
    let mut done = Inflicted::default();
    match kind {
        // A rolling kill starts with its first replica (`tick` goes on).
        NemesisKind::Kill if target == Target::Rolling => hit.nodes.iter().take(1).for_each(|&id| cluster.kill(id)),
        NemesisKind::Kill => hit.nodes.iter().for_each(|&id| cluster.kill(id)),
        NemesisKind::Pause => hit.nodes.iter().for_each(|&id| cluster.pause(id)),
        NemesisKind::Partition => cluster.cut(&hit.cuts)?,
        NemesisKind::Clock => hit.clock_offsets.iter().try_for_each(|&(id, offset)| cluster.set_clock(id, offset))?,
        NemesisKind::Packet => match hit.shape {
            Some(shape) => cluster.disturb(&hit.cuts, shape, hit.seed)?,
            None => anyhow::bail!("a packet fault without a shape"),
        },
        NemesisKind::Disk => {
            for &id in &hit.nodes {
                cluster.kill(id);
                if target == Target::Corrupt {
                    done.corrupted.extend(disk::corrupt_devices(id, &cluster.node_dir(id).join("data"), hit.seed)?);
                }
            }
        }
        NemesisKind::Wipe => {
            for &id in &hit.nodes {
                cluster.kill(id);
                let data = cluster.node_dir(id).join("data");
                std::fs::remove_dir_all(&data).map_err(|e| anyhow::anyhow!("wiping {}: {e}", data.display()))?;
            }
        }
        NemesisKind::WalCorrupt => {
            for &id in &hit.nodes {
                cluster.kill(id);
                done.corrupted.extend(disk::corrupt_wal(id, &cluster.node_dir(id).join("data"), hit.seed)?);
            }
        }
        NemesisKind::Roster if target == Target::Replace => {
            let joined = cluster.add_fresh_node()?;
            done.joined.push(joined);
            hit.nodes.iter().for_each(|&id| cluster.set_leaving(id));
            set_roster(&cluster, &cluster.roster())?;
        }
        NemesisKind::Roster => {
            let roster: Vec<u64> = cluster.roster().into_iter().filter(|id| !hit.nodes.contains(id)).collect();
            set_roster(&cluster, &roster)?;
        }
        NemesisKind::AppKill | NemesisKind::FsKill | NemesisKind::HostPause | NemesisKind::MachineCut => {
            anyhow::bail!("{kind:?} is a fault of a files workload's processes, not of the cluster")
        }
    }
    Ok(done)
}

/// Keeps a fault of `duration` going (`since` is the time since it started): a strobed clock
/// flips every `STROBE_PERIOD`; a rolling kill moves on to the next replica every
/// `duration / replicas`, restarting the ones before it.
pub fn tick(cluster: &Arc<Mutex<TestCluster>>, target: Target, hit: &Resolved, since: Duration, duration: Duration) -> anyhow::Result<()> {
    let mut cluster = cluster.lock().unwrap();
    match target {
        Target::Strobe => {
            let off = (since.as_millis() / STROBE_PERIOD.as_millis()).is_multiple_of(2);
            hit.clock_offsets.iter().try_for_each(|&(id, offset)| cluster.set_clock(id, if off { offset } else { 0 }))
        }
        Target::Rolling if !hit.nodes.is_empty() => {
            let step = (duration.as_millis() / hit.nodes.len() as u128).max(1);
            let current = ((since.as_millis() / step) as usize).min(hit.nodes.len() - 1);
            for &id in &hit.nodes[..current] {
                cluster.restart(id)?;
            }
            cluster.kill(hit.nodes[current]);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What healing a network fault found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Healed {
    /// Partitions: packets the cuts dropped.
    pub dropped_packets: Option<u64>,
    /// Packet faults: what the queue did.
    pub packets: Option<PacketStats>,
}

/// Ends a fault: killed nodes restart, paused ones continue, cuts and queued links are
/// removed.
pub fn heal(cluster: &Arc<Mutex<TestCluster>>, kind: NemesisKind, hit: &Resolved) -> anyhow::Result<Healed> {
    let mut cluster = cluster.lock().unwrap();
    match kind {
        NemesisKind::Kill | NemesisKind::Disk | NemesisKind::Wipe | NemesisKind::WalCorrupt => hit.nodes.iter().try_for_each(|&id| cluster.restart(id))?,
        NemesisKind::Pause => hit.nodes.iter().for_each(|&id| cluster.resume(id)),
        NemesisKind::Partition => return Ok(Healed { dropped_packets: Some(cluster.heal_network()?.0), packets: None }),
        NemesisKind::Packet => return Ok(Healed { dropped_packets: None, packets: cluster.heal_network()?.1 }),
        NemesisKind::Clock => hit.clock_offsets.iter().try_for_each(|&(id, _)| cluster.set_clock(id, 0))?,
        // Shrink: the nodes come back. Replace: the roster stays as it is (the same call); the
        // replaced node leaves when its groups have moved (`TestCluster::retire_finished`).
        NemesisKind::Roster => set_roster(&cluster, &cluster.roster())?,
        NemesisKind::AppKill | NemesisKind::FsKill | NemesisKind::HostPause | NemesisKind::MachineCut => {
            anyhow::bail!("{kind:?} is a fault of a files workload's processes, not of the cluster")
        }
    }
    Ok(Healed::default())
}

/// Sets the roster through the metadata leader (retrying within the client's window).
fn set_roster(cluster: &TestCluster, roster: &[u64]) -> anyhow::Result<()> {
    use anyhow::Context;
    let client = chunkstore::client::Client::connect(chunkstore::client::ClientConfig::new(cluster.seeds())).context("connecting to set the roster")?;
    client.set_roster(roster).with_context(|| format!("setting the roster to {roster:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_plans_the_same_faults() {
        let kinds =
            [NemesisKind::Kill, NemesisKind::Pause, NemesisKind::Partition, NemesisKind::Clock, NemesisKind::Disk, NemesisKind::Packet, NemesisKind::Roster];
        let a = plan(7, &kinds, Duration::from_secs(5), Duration::from_secs(300));
        let b = plan(7, &kinds, Duration::from_secs(5), Duration::from_secs(300));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_ne!(format!("{a:?}"), format!("{:?}", plan(8, &kinds, Duration::from_secs(5), Duration::from_secs(300))));
        assert!(a.iter().any(|f| f.duration_ms == LONG_PAUSE.as_millis() as u64), "a 300 s run has a long pause");
        let nodes = [1, 2, 3, 4, 5];
        for fault in &a {
            let hit = resolve(fault, &nodes, Some(3), &[]);
            let expected = match fault.target {
                Target::One | Target::Leader | Target::OneWay | Target::Jump | Target::Strobe | Target::Corrupt | Target::Replace => 1,
                Target::Minority | Target::Halves | Target::Shrink => 2,
                Target::Majority | Target::Rolling => 3,
                Target::All | Target::Ring | Target::Skew | Target::PowerCut => 5,
                Target::Delay | Target::Loss | Target::Reorder => hit.nodes.len(),
                Target::Process => 0,
            };
            assert_eq!(hit.nodes.len(), expected, "{fault:?}");
            if fault.kind == NemesisKind::Packet {
                assert!(hit.nodes.len() == 1 || hit.nodes.len() == 5, "{fault:?}");
                // Every link of the hit nodes, to the other nodes and to the clients, both ways.
                assert_eq!(hit.cuts.len(), if hit.nodes.len() == 1 { 2 * 5 } else { 2 * (10 + 5) }, "{fault:?}");
                let shape = hit.shape.expect("a packet fault has a shape");
                match fault.target {
                    Target::Delay => assert!(shape.delay_ms > 0 && shape.loss == 0.0 && shape.reorder == 0.0),
                    Target::Loss => assert!(shape.loss > 0.0 && shape.delay_ms == 0),
                    _ => assert!(shape.reorder > 0.0 && shape.reorder < 1.0 && shape.delay_ms > 0),
                }
                continue;
            }
            assert!(hit.shape.is_none());
            if fault.target == Target::Leader {
                assert_eq!(hit.nodes, vec![3]);
            }
            let cut_count = match (fault.kind, fault.target) {
                (NemesisKind::Partition, Target::OneWay) => 4,
                (NemesisKind::Partition, Target::Halves) => 2 * 2 * 3,
                (NemesisKind::Partition, Target::Ring) => 5 * 2,
                (NemesisKind::Partition, _) => 2 * 4,
                _ => 0,
            };
            assert_eq!(hit.cuts.len(), cut_count, "{fault:?}");
            match fault.kind {
                NemesisKind::Clock => assert_eq!(hit.clock_offsets.len(), hit.nodes.len(), "{fault:?}"),
                _ => assert!(hit.clock_offsets.is_empty()),
            }
        }
        assert!(a.iter().any(|f| f.kind == NemesisKind::Clock), "a 300 s run has a clock fault");
        assert!(a.iter().any(|f| f.kind == NemesisKind::Partition), "a 300 s run has a partition");
        assert!(a.iter().any(|f| f.kind == NemesisKind::Disk), "a 300 s run has a disk fault");
        assert!(a.iter().any(|f| f.kind == NemesisKind::Packet), "a 300 s run has a packet fault");
        assert!(a.iter().any(|f| f.target == Target::Shrink), "a 300 s run shrinks the roster");
        assert!(a.iter().any(|f| f.target == Target::Replace), "a 300 s run replaces a node");
    }
}
