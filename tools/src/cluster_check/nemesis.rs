//! Faults: the schedule is drawn from the seed before the run starts (so the same seed gives
//! the same sequence of fault kinds and targets), then carried out against the cluster.
//! Faults alternate with healthy periods of the same length: fault, heal, fault, heal...

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::cluster::TestCluster;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NemesisKind {
    /// SIGKILL of one node, a minority, a majority, all nodes, or the busiest leader; then a
    /// restart on the same data.
    Kill,
    /// SIGSTOP/SIGCONT of one node or the busiest leader, past the election timeout or for 30 s.
    Pause,
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
}

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
            NemesisKind::Kill => *[Target::One, Target::Minority, Target::Majority, Target::All, Target::Leader].choose(&mut rng).unwrap(),
            NemesisKind::Pause => *[Target::One, Target::Leader].choose(&mut rng).unwrap(),
        };
        let long = kind == NemesisKind::Pause && rng.gen_bool(0.25) && at + LONG_PAUSE + interval <= time_limit;
        let duration = if long { LONG_PAUSE } else { interval };
        faults.push(PlannedFault { kind, target, duration_ms: duration.as_millis() as u64, pick: rng.gen() });
        at += duration + interval;
    }
    faults
}

/// Picks the nodes a fault hits. `leader` is the node leading the most groups, if known.
pub fn pick_nodes(fault: &PlannedFault, nodes: &[u64], leader: Option<u64>) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(fault.pick);
    let mut shuffled = nodes.to_vec();
    shuffled.shuffle(&mut rng);
    let count = match fault.target {
        Target::One => 1,
        Target::Minority => (nodes.len() - 1) / 2,
        Target::Majority => nodes.len() / 2 + 1,
        Target::All => nodes.len(),
        Target::Leader => return vec![leader.unwrap_or(shuffled[0])],
    };
    shuffled.truncate(count.max(1));
    shuffled.sort_unstable();
    shuffled
}

/// Starts a planned fault on `nodes`.
pub fn inflict(cluster: &Arc<Mutex<TestCluster>>, kind: NemesisKind, nodes: &[u64]) {
    let mut cluster = cluster.lock().unwrap();
    for &id in nodes {
        match kind {
            NemesisKind::Kill => cluster.kill(id),
            NemesisKind::Pause => cluster.pause(id),
        }
    }
}

/// Ends a fault: killed nodes restart, paused ones continue.
pub fn heal(cluster: &Arc<Mutex<TestCluster>>, kind: NemesisKind, nodes: &[u64]) -> anyhow::Result<()> {
    let mut cluster = cluster.lock().unwrap();
    for &id in nodes {
        match kind {
            NemesisKind::Kill => cluster.restart(id)?,
            NemesisKind::Pause => cluster.resume(id),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_plans_the_same_faults() {
        let kinds = [NemesisKind::Kill, NemesisKind::Pause];
        let a = plan(7, &kinds, Duration::from_secs(5), Duration::from_secs(300));
        let b = plan(7, &kinds, Duration::from_secs(5), Duration::from_secs(300));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_ne!(format!("{a:?}"), format!("{:?}", plan(8, &kinds, Duration::from_secs(5), Duration::from_secs(300))));
        assert!(a.iter().any(|f| f.duration_ms == LONG_PAUSE.as_millis() as u64), "a 300 s run has a long pause");
        let nodes = [1, 2, 3, 4, 5];
        for fault in &a {
            let picked = pick_nodes(fault, &nodes, Some(3));
            let expected = match fault.target {
                Target::One | Target::Leader => 1,
                Target::Minority => 2,
                Target::Majority => 3,
                Target::All => 5,
            };
            assert_eq!(picked.len(), expected, "{fault:?}");
        }
    }
}
