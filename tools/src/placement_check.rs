//! `chunkcheck placement`: the production placement (`chunkstore::meta::placement`, what the
//! metadata leader runs on every roster change) over clusters larger than these machines can
//! start, through a seeded series of roster changes: what one placement costs to compute, how
//! many groups and replicas each change moves against the fewest it could, how much work it
//! gives the metadata group (a `SetRoster` entry, then a `StartMove` and a `FinishMove` per
//! group that moves, at most `MOVES_AT_ONCE` groups at a time), and whether every placement
//! keeps its rules: each group on `replication_factor` distinct nodes of the roster, distinct
//! racks where there are enough, every node within one replica of its share without racks.
//!
//! It runs placement alone, not the nodes: a cluster of 100 nodes and 4,096 groups in one
//! process (12,288 Raft replicas with their engines) is past this machine; the in-process
//! simulator (`chunkcheck sim`) runs the nodes, at a few nodes.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use chunkstore::meta::placement::place_namespace;
use chunkstore::meta::MOVES_AT_ONCE;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct PlacementOptions {
    pub seed: u64,
    pub nodes: u64,
    pub groups: u32,
    pub replication_factor: usize,
    /// Racks the nodes are spread over, round robin (0: no racks declared).
    pub racks: u64,
    /// Roster changes after the first placement.
    pub changes: usize,
}

/// One placement: the first, or after one roster change.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlacementStep {
    /// What changed: "start", "remove node N", "remove rack R", "add node N", "add all".
    pub change: String,
    pub roster_nodes: usize,
    /// Wall time to compute the placement (every group of the namespace).
    pub place_ms: f64,
    /// Groups whose replica set changed (each a move the metadata leader drives).
    pub groups_moved: usize,
    /// Replicas that changed node.
    pub replicas_moved: usize,
    /// The fewest replicas this change could move: those on nodes that left the roster, or
    /// the shares of nodes that joined it.
    pub replicas_moved_fewest: usize,
    /// Metadata entries the change costs: the roster, a start and a finish per moved group.
    pub metadata_entries: usize,
    /// Rounds of `MOVES_AT_ONCE` moves the change takes to settle.
    pub move_rounds: usize,
    pub replicas_per_node_min: usize,
    pub replicas_per_node_max: usize,
    /// Rule breaks found in this placement (none expected).
    pub violations: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PlacementReport {
    pub seed: u64,
    pub nodes: u64,
    pub groups: u32,
    pub replication_factor: usize,
    pub racks: u64,
    pub moves_at_once: usize,
    pub steps: Vec<PlacementStep>,
    pub place_ms_max: f64,
    pub groups_moved_total: usize,
    pub metadata_entries_total: usize,
    /// Replicas moved over the fewest possible, summed over the changes (1.0: minimal).
    pub movement_ratio: f64,
    pub valid: bool,
}

/// Runs the series (see the module's notes). `progress` gets a line per step.
pub fn run(options: &PlacementOptions, progress: &dyn Fn(&str)) -> anyhow::Result<PlacementReport> {
    anyhow::ensure!(options.replication_factor >= 1, "--replication-factor must be at least 1");
    anyhow::ensure!(options.nodes as usize > options.replication_factor, "--nodes must be more than the replication factor (a roster change needs room)");
    anyhow::ensure!(options.groups >= 1 && options.groups.is_power_of_two() && options.groups <= 4096, "--groups must be a power of two from 1 to 4096");
    let rack_of = |id: u64| (options.racks > 0).then(|| format!("rack{}", (id - 1) % options.racks));
    let mut rng = SmallRng::seed_from_u64(options.seed);
    let all: Vec<u64> = (1..=options.nodes).collect();
    let mut roster: BTreeSet<u64> = all.iter().copied().collect();
    let mut steps = Vec::new();
    let mut previous: Option<Vec<Vec<u64>>> = None;
    for step in 0..=options.changes {
        let (change, fewest) = match step {
            0 => ("start".to_string(), Fewest::None),
            _ => roster_change(&mut rng, &mut roster, &all, options, &rack_of),
        };
        let racked: Vec<(u64, Option<String>)> = roster.iter().map(|id| (*id, rack_of(*id))).collect();
        let racked_refs: Vec<(u64, Option<&str>)> = racked.iter().map(|(id, rack)| (*id, rack.as_deref())).collect();
        let started = Instant::now();
        let placement = place_namespace("test", options.groups, &racked_refs, options.replication_factor);
        let place_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut load: HashMap<u64, usize> = roster.iter().map(|id| (*id, 0)).collect();
        placement.iter().flatten().for_each(|id| *load.entry(*id).or_default() += 1);
        let violations = check(&placement, &roster, options, &rack_of, &load);
        let (groups_moved, replicas_moved) = match &previous {
            None => (0, 0),
            Some(before) => moved(before, &placement),
        };
        let replicas_moved_fewest = match (fewest, &previous) {
            (Fewest::None, _) | (_, None) => 0,
            (Fewest::Left(left), Some(before)) => before.iter().flatten().filter(|id| left.contains(id)).count(),
            (Fewest::Joined(joined), _) => joined.iter().map(|id| load.get(id).copied().unwrap_or(0)).sum(),
        };
        let step = PlacementStep {
            change,
            roster_nodes: roster.len(),
            place_ms,
            groups_moved,
            replicas_moved,
            replicas_moved_fewest,
            metadata_entries: if step == 0 { 0 } else { 1 + 2 * groups_moved },
            move_rounds: groups_moved.div_ceil(MOVES_AT_ONCE),
            replicas_per_node_min: load.values().copied().min().unwrap_or(0),
            replicas_per_node_max: load.values().copied().max().unwrap_or(0),
            violations,
        };
        progress(&format!(
            "{:<16} {:>4} nodes  placed in {:>8.2} ms  {:>5} groups moved ({:>5} replicas, fewest {:>5})  {:>5} metadata entries  {}..{} replicas per node{}",
            step.change,
            step.roster_nodes,
            step.place_ms,
            step.groups_moved,
            step.replicas_moved,
            step.replicas_moved_fewest,
            step.metadata_entries,
            step.replicas_per_node_min,
            step.replicas_per_node_max,
            if step.violations.is_empty() { String::new() } else { format!("  VIOLATIONS: {:?}", step.violations) }
        ));
        steps.push(step);
        previous = Some(placement);
    }
    let moved: usize = steps.iter().map(|s| s.replicas_moved).sum();
    let fewest: usize = steps.iter().map(|s| s.replicas_moved_fewest).sum();
    Ok(PlacementReport {
        seed: options.seed,
        nodes: options.nodes,
        groups: options.groups,
        replication_factor: options.replication_factor,
        racks: options.racks,
        moves_at_once: MOVES_AT_ONCE,
        place_ms_max: steps.iter().map(|s| s.place_ms).fold(0.0, f64::max),
        groups_moved_total: steps.iter().map(|s| s.groups_moved).sum(),
        metadata_entries_total: steps.iter().map(|s| s.metadata_entries).sum(),
        movement_ratio: if fewest == 0 { 1.0 } else { moved as f64 / fewest as f64 },
        valid: steps.iter().all(|s| s.violations.is_empty()),
        steps,
    })
}

/// The least a change could move: the replicas on the nodes that left, or the shares of the
/// nodes that joined.
enum Fewest {
    None,
    Left(Vec<u64>),
    Joined(Vec<u64>),
}

/// One seeded roster change, never below the replication factor.
fn roster_change(
    rng: &mut SmallRng,
    roster: &mut BTreeSet<u64>,
    all: &[u64],
    options: &PlacementOptions,
    rack_of: &dyn Fn(u64) -> Option<String>,
) -> (String, Fewest) {
    let off: Vec<u64> = all.iter().copied().filter(|id| !roster.contains(id)).collect();
    let room = roster.len().saturating_sub(options.replication_factor);
    match rng.gen_range(0..4) {
        0 | 1 if room > 0 => {
            let members: Vec<u64> = roster.iter().copied().collect();
            let id = members[rng.gen_range(0..members.len())];
            roster.remove(&id);
            (format!("remove node {id}"), Fewest::Left(vec![id]))
        }
        2 if options.racks > 1 => {
            let rack = rack_of(all[rng.gen_range(0..all.len())]);
            let leaving: Vec<u64> = roster.iter().copied().filter(|id| rack_of(*id) == rack).collect();
            if leaving.is_empty() || roster.len() - leaving.len() < options.replication_factor {
                return add_one(rng, roster, &off);
            }
            for id in &leaving {
                roster.remove(id);
            }
            (format!("remove {}", rack.unwrap_or_default()), Fewest::Left(leaving))
        }
        3 if off.len() > 1 => {
            roster.extend(off.iter().copied());
            ("add all".to_string(), Fewest::Joined(off))
        }
        _ => add_one(rng, roster, &off),
    }
}

fn add_one(rng: &mut SmallRng, roster: &mut BTreeSet<u64>, off: &[u64]) -> (String, Fewest) {
    match off.is_empty() {
        true => ("unchanged".to_string(), Fewest::None),
        false => {
            let id = off[rng.gen_range(0..off.len())];
            roster.insert(id);
            (format!("add node {id}"), Fewest::Joined(vec![id]))
        }
    }
}

/// Groups whose replica set changed, and replicas that changed node.
fn moved(before: &[Vec<u64>], after: &[Vec<u64>]) -> (usize, usize) {
    let mut groups = 0;
    let mut replicas = 0;
    for (old, new) in before.iter().zip(after) {
        let old: BTreeSet<u64> = old.iter().copied().collect();
        let new: BTreeSet<u64> = new.iter().copied().collect();
        let changed = new.difference(&old).count();
        groups += usize::from(changed > 0);
        replicas += changed;
    }
    (groups, replicas)
}

/// The placement's rules (see the module's notes), as violations found.
fn check(
    placement: &[Vec<u64>],
    roster: &BTreeSet<u64>,
    options: &PlacementOptions,
    rack_of: &dyn Fn(u64) -> Option<String>,
    load: &HashMap<u64, usize>,
) -> Vec<String> {
    let mut violations = Vec::new();
    if placement.len() != options.groups as usize {
        violations.push(format!("{} groups placed of {}", placement.len(), options.groups));
    }
    let racks_on_roster: BTreeSet<Option<String>> = roster.iter().map(|id| rack_of(*id)).collect();
    for (group, replicas) in placement.iter().enumerate() {
        let distinct: BTreeSet<u64> = replicas.iter().copied().collect();
        if replicas.len() != options.replication_factor || distinct.len() != replicas.len() {
            violations.push(format!("group {group} on {replicas:?}: not {} distinct nodes", options.replication_factor));
        }
        if let Some(stray) = replicas.iter().find(|id| !roster.contains(id)) {
            violations.push(format!("group {group} on node {stray}, which is off the roster"));
        }
        let racks: BTreeSet<Option<String>> = replicas.iter().map(|id| rack_of(*id)).collect();
        if options.racks > 0 && racks.len() < options.replication_factor.min(racks_on_roster.len()) {
            violations.push(format!(
                "group {group} on {replicas:?}: {} racks where {} were possible",
                racks.len(),
                options.replication_factor.min(racks_on_roster.len())
            ));
        }
        if violations.len() > 20 {
            break;
        }
    }
    if options.racks == 0 {
        let (min, max) = (load.values().min().copied().unwrap_or(0), load.values().max().copied().unwrap_or(0));
        if max > min + 1 {
            violations.push(format!("replicas per node range from {min} to {max}: more than one apart"));
        }
    }
    violations
}
