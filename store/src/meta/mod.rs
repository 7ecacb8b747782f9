//! Cluster metadata: the nodes, the namespaces and where each group's replicas live, kept by one
//! small Raft group of its own (the *metadata group*) on the lowest `META_VOTERS_MAX` node ids.
//!
//! Its log lives in the node's shared WAL like every partition group's (`GroupLogStore`, WAL
//! group `META_WAL_GROUP`); its messages travel as `Request::Raft` for `META_NAMESPACE`. The
//! state machine is small and held in memory; every applied batch is written to the WAL as the
//! group's applied marker before it counts as applied, so a restarted voter knows the cluster at
//! once, without a quorum.
//!
//! A fresh cluster is bootstrapped from the `[[nodes]]` and `[[namespaces]]` of its nodes'
//! configuration: the lowest voter initializes the group, and the first leader proposes
//! `MetaCommand::Bootstrap` with the metadata its own configuration describes. From then on the
//! metadata group is the authority: a node whose configuration disagrees with it refuses to
//! start and says where (`ClusterMeta::differences`).
//!
//! Invariants:
//! - **Placement is decided once and stored**: nodes take each group's replicas from the
//!   metadata, never from their own configuration (so that changing the node list in one file
//!   cannot move data; roster changes will go through this group).
//! - **A group's membership is decided by the group's own Raft log**; the placement stored here
//!   is what the group was created with.
//! - **The metadata applied point is durable before openraft is told it is applied.**

pub mod leases;
pub mod placement;
mod state_machine;
mod v1;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::raft::NodeId;
use crate::wal::GroupId;
pub use leases::{EndReason, LeaseState, Leases};
pub use state_machine::MetaStateMachine;

/// The name under which the metadata group's Raft messages travel (not a valid namespace name).
pub const META_NAMESPACE: &str = "$meta";
/// The metadata group's id in the WAL (no namespace's groups use it: start-up refuses a
/// namespace whose WAL prefix would reach it).
pub const META_WAL_GROUP: GroupId = u32::MAX;
/// The metadata group has at most this many voters: the lowest node ids.
pub const META_VOTERS_MAX: usize = 5;

pub use chunkstore_client::cluster::{ClusterMeta, NamespaceInfo, NodeInfo};

/// How many groups of the whole cluster move to new replicas at once.
pub const MOVES_AT_ONCE: usize = 2;

/// A namespace as a configuration file declares it: (name, replication factor, groups).
pub type NamespaceDecl = (String, u32, u32);

/// What the nodes compute from the cluster metadata (the data types are the client's, which
/// receives them in `Response::ClusterMeta`).
pub trait ClusterMetaExt {
    fn from_config(nodes: Vec<NodeInfo>, namespaces: &[NamespaceDecl]) -> ClusterMeta;
    fn targets(&self, ns: &NamespaceInfo) -> Vec<Vec<NodeId>>;
    fn metadata_voters_target(&self, current: &[NodeId], live: impl Fn(NodeId) -> bool) -> Vec<NodeId>;
    fn hosts(&self, ns: &NamespaceInfo, group: u32, node: NodeId) -> bool;
    fn check_roster(&self, roster: &[NodeId]) -> Result<(), String>;
    fn check_forget(&self, node: NodeId) -> Result<(), String>;
    fn balance(&self) -> Vec<(String, u32, u32)>;
    fn preferred_leaders(&self) -> BTreeMap<String, Vec<NodeId>>;
    fn differences(&self, configured: &ClusterMeta, me: NodeId) -> Vec<String>;
}

impl ClusterMetaExt for ClusterMeta {
    /// The metadata a configuration describes: its nodes, and its namespaces with each group's
    /// replicas placed over the nodes (`ClusterMeta::targets`).
    fn from_config(mut nodes: Vec<NodeInfo>, namespaces: &[NamespaceDecl]) -> ClusterMeta {
        nodes.sort_by_key(|n| n.id);
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
        let mut cluster = ClusterMeta { metadata_voters: voters(&ids), roster: ids, nodes, namespaces: Vec::new() };
        cluster.namespaces = namespaces
            .iter()
            .map(|(name, replication_factor, groups)| NamespaceInfo {
                name: name.clone(),
                replication_factor: *replication_factor,
                groups: *groups,
                placement: Vec::new(),
                moves: BTreeMap::new(),
            })
            .collect();
        cluster.namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        for index in 0..cluster.namespaces.len() {
            let placement = cluster.targets(&cluster.namespaces[index]);
            cluster.namespaces[index].placement = placement;
        }
        cluster
    }

    /// Where each group of `ns` belongs under the current roster (preferred leader first):
    /// placed as a whole over the roster, balanced, on distinct racks where there are enough
    /// (`placement::place_namespace`).
    fn targets(&self, ns: &NamespaceInfo) -> Vec<Vec<NodeId>> {
        let racked: Vec<(NodeId, Option<&str>)> = self.roster.iter().map(|id| (*id, self.node(*id).and_then(|n| n.rack.as_deref()))).collect();
        placement::place_namespace(&ns.name, ns.groups, &racked, ns.replication_factor as usize)
    }

    /// The metadata voters the cluster should have, given the `current` ones (the group's
    /// membership) and which nodes are `live`. Each voter off the roster hands its place to a
    /// live roster node that is not a voter, on a rack the voters do not cover yet where there
    /// is one, else the lowest id; a voter nobody can replace stays (the group never shrinks:
    /// fewer voters would survive fewer failures). Then the group grows, with live roster nodes
    /// picked the same way, to the largest odd size (at most `META_VOTERS_MAX`) that the roster
    /// and the live spare nodes allow: a cluster started on one node gets three voters once it
    /// has three, so the metadata no longer lives on one disk. Never to an even size: four
    /// voters survive no more failures than three.
    fn metadata_voters_target(&self, current: &[NodeId], live: impl Fn(NodeId) -> bool) -> Vec<NodeId> {
        let rack = |id: NodeId| self.node(id).and_then(|n| n.rack.clone());
        let mut kept: Vec<NodeId> = current.iter().copied().filter(|id| self.roster.contains(id)).collect();
        let mut spare: Vec<NodeId> = self.roster.iter().copied().filter(|id| !current.contains(id) && live(*id)).collect();
        // The spare node to add next, if any: a rack the voters lack first.
        let pick = |kept: &[NodeId], spare: &mut Vec<NodeId>| -> Option<NodeId> {
            let covered: BTreeSet<Option<String>> = kept.iter().map(|id| rack(*id)).collect();
            let index = spare.iter().position(|id| rack(*id).is_some_and(|r| !covered.contains(&Some(r)))).or((!spare.is_empty()).then_some(0))?;
            Some(spare.remove(index))
        };
        for leaving in current.iter().copied().filter(|id| !self.roster.contains(id)) {
            let next = pick(&kept, &mut spare).unwrap_or(leaving);
            kept.push(next);
        }
        let reachable = META_VOTERS_MAX.min(self.roster.len()).min(kept.len() + spare.len());
        let size = if reachable % 2 == 1 { reachable } else { reachable.saturating_sub(1) };
        while kept.len() < size {
            let Some(next) = pick(&kept, &mut spare) else { break };
            kept.push(next);
        }
        kept.sort_unstable();
        kept
    }

    /// Whether `node` hosts a replica of `group` of `ns`: it is a voter, or a move takes the
    /// group to it.
    fn hosts(&self, ns: &NamespaceInfo, group: u32, node: NodeId) -> bool {
        ns.placement.get(group as usize).is_some_and(|r| r.contains(&node)) || ns.moves.get(&group).is_some_and(|r| r.contains(&node))
    }

    /// Why `roster` cannot be the roster, if it cannot: unknown nodes, or fewer nodes than a
    /// namespace's replication factor.
    fn check_roster(&self, roster: &[NodeId]) -> Result<(), String> {
        if let Some(unknown) = roster.iter().find(|id| self.node(**id).is_none()) {
            let known: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
            return Err(format!("node {unknown} is not a node of the cluster (its nodes: {known:?})"));
        }
        let mut distinct = roster.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        for ns in &self.namespaces {
            if distinct.len() < ns.replication_factor as usize {
                return Err(format!(
                    "namespace {:?} keeps {} replicas of each group: the roster needs at least {} nodes, not {}",
                    ns.name,
                    ns.replication_factor,
                    ns.replication_factor,
                    distinct.len()
                ));
            }
        }
        Ok(())
    }

    /// Why `node` cannot leave the node list, if it cannot.
    fn check_forget(&self, node: NodeId) -> Result<(), String> {
        if self.node(node).is_none() {
            return Err(format!("node {node} is not a node of the cluster"));
        }
        if self.roster.contains(&node) {
            return Err(format!("node {node} is on the roster: take it off first (roster set)"));
        }
        if self.metadata_voters.contains(&node) {
            return Err(format!(
                "node {node} is a metadata voter (voters {:?}): wait until the metadata leader has handed its place to a node on the roster",
                self.metadata_voters
            ));
        }
        let holds = self.namespaces.iter().flat_map(|ns| (0..ns.groups).map(move |g| (ns, g))).filter(|(ns, g)| self.hosts(ns, *g, node)).count();
        if holds > 0 {
            return Err(format!("node {node} still holds replicas of {holds} groups: wait until they have moved"));
        }
        Ok(())
    }

    /// Groups whose voters differ from where the roster puts them, moves in progress included:
    /// (groups placed, groups in all), per namespace.
    fn balance(&self) -> Vec<(String, u32, u32)> {
        self.namespaces
            .iter()
            .map(|ns| {
                let targets = self.targets(ns);
                let placed = (0..ns.groups).filter(|g| !ns.moves.contains_key(g) && same_set(&ns.placement[*g as usize], &targets[*g as usize])).count() as u32;
                (ns.name.clone(), placed, ns.groups)
            })
            .collect()
    }

    /// Each group's preferred leader, per namespace: one of its voters, chosen so that every
    /// node is preferred for about as many groups as every other (across all namespaces).
    /// First, group by group, the voter preferred for the fewest groups so far (ties to the
    /// placement's order); then groups move from a node preferred for two more than another of
    /// their voters, until none does. Every node computes the same from the same metadata.
    fn preferred_leaders(&self) -> BTreeMap<String, Vec<NodeId>> {
        let mut count: BTreeMap<NodeId, usize> = BTreeMap::new();
        let load = |count: &BTreeMap<NodeId, usize>, id: &NodeId| count.get(id).copied().unwrap_or(0);
        let mut chosen: Vec<Vec<Option<NodeId>>> = Vec::with_capacity(self.namespaces.len());
        for ns in &self.namespaces {
            let leaders = ns
                .placement
                .iter()
                .map(|voters| {
                    let leader = voters.iter().copied().min_by_key(|id| load(&count, id));
                    if let Some(id) = leader {
                        *count.entry(id).or_default() += 1;
                    }
                    leader
                })
                .collect();
            chosen.push(leaders);
        }
        // Each move lowers the sum of squared counts, so this ends; the bound is a backstop.
        for _ in 0..64 {
            let mut moved = false;
            for (ns, leaders) in self.namespaces.iter().zip(chosen.iter_mut()) {
                for (voters, leader) in ns.placement.iter().zip(leaders.iter_mut()) {
                    let Some(current) = *leader else { continue };
                    let Some(lightest) = voters.iter().copied().min_by_key(|id| load(&count, id)) else { continue };
                    if load(&count, &current) > load(&count, &lightest) + 1 {
                        *count.entry(current).or_default() -= 1;
                        *count.entry(lightest).or_default() += 1;
                        *leader = Some(lightest);
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
        }
        self.namespaces.iter().zip(chosen).map(|(ns, leaders)| (ns.name.clone(), leaders.into_iter().map(|l| l.unwrap_or(0)).collect())).collect()
    }

    /// How a node's configuration (`configured`, from `from_config`) disagrees with this
    /// metadata, one line per difference; empty when it agrees. Placement and roster are not
    /// compared (the stored ones win), nor nodes the cluster gained after this node's
    /// configuration was written; `me` may be new to the cluster (it joins).
    fn differences(&self, configured: &ClusterMeta, me: NodeId) -> Vec<String> {
        let mut out = Vec::new();
        for node in &configured.nodes {
            match self.node(node.id) {
                None if node.id == me => {}
                None => out.push(format!("[[nodes]] lists node {} but the cluster has no such node (a new node joins by starting it)", node.id)),
                Some(known) if known != node => out.push(format!(
                    "[[nodes]] gives node {} client {:?} peer {:?} rack {:?}, the cluster has client {:?} peer {:?} rack {:?}",
                    node.id, node.client, node.peer, node.rack, known.client, known.peer, known.rack
                )),
                Some(_) => {}
            }
        }
        for ns in &configured.namespaces {
            match self.namespace(&ns.name) {
                None => out.push(format!("namespace {:?} is configured but the cluster has no such namespace", ns.name)),
                Some(known) => {
                    if known.replication_factor != ns.replication_factor {
                        out.push(format!(
                            "namespace {:?}: replication-factor {} configured, the cluster has {}",
                            ns.name, ns.replication_factor, known.replication_factor
                        ));
                    }
                    if known.groups != ns.groups {
                        out.push(format!("namespace {:?}: groups {} configured, the cluster has {}", ns.name, ns.groups, known.groups));
                    }
                }
            }
        }
        for ns in &self.namespaces {
            if configured.namespace(&ns.name).is_none() {
                out.push(format!("namespace {:?} exists in the cluster but is not configured", ns.name));
            }
        }
        out
    }
}

pub fn same_set(a: &[NodeId], b: &[NodeId]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// The metadata group's voters among `node_ids`: the lowest `META_VOTERS_MAX`, ascending.
pub fn voters(node_ids: &[NodeId]) -> Vec<NodeId> {
    let mut ids = node_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids.truncate(META_VOTERS_MAX);
    ids
}

/// A change to the metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Sets the metadata of a fresh cluster; a no-op once it is set.
    Bootstrap(ClusterMeta),
    /// Opens a lease session (see `leases`).
    OpenSession { ttl_ms: u64 },
    /// An open session ends: it is to be fenced and released everywhere.
    EndSession { session: u64, reason: EndReason },
    /// An ending session has been fenced and released everywhere.
    SessionFinished { session: u64 },
    /// A node joins the cluster (it owns no data until the roster names it).
    AddNode(NodeInfo),
    /// The nodes that own data from now on (checked by `ClusterMeta::check_roster`).
    SetRoster(Vec<NodeId>),
    /// A node leaves the cluster's node list (refused while it is on the roster, holds a
    /// replica or is a metadata voter).
    ForgetNode(NodeId),
    /// A group starts moving to `replicas` (unless it is moving already).
    StartMove { namespace: String, group: u32, replicas: Vec<NodeId> },
    /// A group's membership is `replicas` now: its move is over.
    FinishMove { namespace: String, group: u32, replicas: Vec<NodeId> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaResult {
    Noop,
    Bootstrapped,
    /// The metadata was set already (by an earlier Bootstrap); nothing changed.
    AlreadyBootstrapped,
    SessionOpened {
        session: u64,
    },
    /// `SESSIONS_MAX` sessions are open or ending already.
    TooManySessions(usize),
    /// `EndSession` ended the session, or found it not open.
    SessionEnded {
        was_open: bool,
    },
    /// A roster or node change was refused: why.
    Refused(String),
}

openraft::declare_raft_types!(
    /// The metadata group's openraft types.
    pub MetaTypeConfig:
        D = MetaCommand,
        R = MetaResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<MetaTypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type MetaRaft = openraft::Raft<MetaTypeConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> NodeInfo {
        NodeInfo { id, client: format!("127.0.0.1:{}", 7400 + id), peer: format!("127.0.0.1:{}", 7500 + id), rack: None }
    }

    /// Voters off the roster hand their place to live roster nodes, preferring a rack the
    /// voters lack; with nobody to take it, a voter stays; the group never shrinks.
    #[test]
    fn metadata_voters_off_the_roster_are_replaced_by_live_roster_nodes() {
        let mut cluster = ClusterMeta::from_config((1..=5).map(node).collect(), &[]);
        assert_eq!(cluster.metadata_voters, vec![1, 2, 3, 4, 5]);
        let all = |_| true;
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3, 4, 5], all), vec![1, 2, 3, 4, 5], "all on the roster: nothing changes");
        cluster.roster = vec![2, 3, 4, 5];
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3], all), vec![2, 3, 4]);
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3], |id| id != 4), vec![2, 3, 5], "node 4 is down");
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3], |id| id < 4), vec![1, 2, 3], "nobody live to take node 1's place");
        cluster.roster = vec![4, 5];
        assert_eq!(
            cluster.metadata_voters_target(&[1, 2, 3], all),
            vec![3, 4, 5],
            "nodes 1 and 2 give way to 4 and 5; node 3, with nobody left to replace it, stays"
        );
        // Racks: node 2 and 3 are on rack a; node 4 too, node 5 on rack b.
        for n in &mut cluster.nodes {
            n.rack = Some(if n.id == 5 { "b" } else { "a" }.into());
        }
        cluster.roster = vec![2, 3, 4, 5];
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3], all), vec![2, 3, 5], "rack b is not covered yet");
    }

    /// The group grows to the largest odd size the roster and the live spare nodes allow, up
    /// to five; never to an even size, never past five, never shrinking.
    #[test]
    fn metadata_voters_grow_to_an_odd_size_as_the_roster_grows() {
        let mut cluster = ClusterMeta::from_config((1..=7).map(node).collect(), &[]);
        let all = |_| true;
        cluster.roster = vec![1, 2];
        assert_eq!(cluster.metadata_voters_target(&[1], all), vec![1], "two nodes: two voters survive no more than one");
        cluster.roster = vec![1, 2, 3];
        assert_eq!(cluster.metadata_voters_target(&[1], all), vec![1, 2, 3]);
        assert_eq!(cluster.metadata_voters_target(&[1], |id| id != 3), vec![1], "only one live spare: not to two");
        cluster.roster = vec![1, 2, 3, 4];
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3], all), vec![1, 2, 3], "four nodes: stays at three");
        assert_eq!(cluster.metadata_voters_target(&[1, 2], all), vec![1, 2, 3], "an even group grows to odd");
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3, 4], all), vec![1, 2, 3, 4], "never shrinks");
        cluster.roster = (1..=7).collect();
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3], all), vec![1, 2, 3, 4, 5]);
        assert_eq!(cluster.metadata_voters_target(&[1, 2, 3, 4, 5], all), vec![1, 2, 3, 4, 5], "five at most");
        // Growth prefers racks the voters lack: node 4 on rack b, node 6 on c, the others on a.
        for n in &mut cluster.nodes {
            n.rack = Some(
                match n.id {
                    4 => "b",
                    6 => "c",
                    _ => "a",
                }
                .into(),
            );
        }
        cluster.roster = vec![1, 2, 4, 6];
        assert_eq!(cluster.metadata_voters_target(&[1], all), vec![1, 4, 6], "node 2 shares node 1's rack");
    }

    #[test]
    fn voters_are_the_lowest_five_ids() {
        assert_eq!(voters(&[9, 3, 1, 7, 5, 2, 8]), vec![1, 2, 3, 5, 7]);
        assert_eq!(voters(&[4, 2]), vec![2, 4]);
    }

    /// The same configuration gives the same metadata whatever the order it lists things in;
    /// each kind of disagreement is named, and agreement gives no differences.
    #[test]
    fn differences_name_what_disagrees() {
        let decl = vec![("a".to_string(), 3, 16), ("b".to_string(), 1, 4)];
        let meta = ClusterMeta::from_config(vec![node(1), node(2), node(3)], &decl);
        let reordered = ClusterMeta::from_config(vec![node(3), node(1), node(2)], &[decl[1].clone(), decl[0].clone()]);
        assert_eq!(meta, reordered);
        assert!(meta.differences(&reordered, 1).is_empty());
        assert_eq!(meta.namespace("a").unwrap().placement.len(), 16);

        let mut moved = node(2);
        moved.peer = "127.0.0.1:9999".into();
        let other = ClusterMeta::from_config(vec![node(1), moved, node(4)], &[("a".to_string(), 2, 32), ("c".to_string(), 1, 4)]);
        let diff = meta.differences(&other, 1).join("\n");
        assert!(meta.differences(&other, 4).join("\n").contains("node 2 client"));
        assert!(!meta.differences(&other, 4).join("\n").contains("lists node 4"), "a new node joins");
        for expected in [
            "node 2 client",
            "lists node 4 but",
            "replication-factor 2 configured, the cluster has 3",
            "groups 32 configured, the cluster has 16",
            "namespace \"c\" is configured",
            "namespace \"b\" exists in the cluster",
        ] {
            assert!(diff.contains(expected), "{expected:?} missing from:\n{diff}");
        }
    }

    /// Preferred leaders are voters of their group, spread within one group of each other
    /// over the nodes, across namespaces; plain first-in-placement is not (the control).
    #[test]
    fn preferred_leaders_are_spread_evenly() {
        let nodes: Vec<NodeInfo> = (1..=5).map(node).collect();
        let meta = ClusterMeta::from_config(nodes, &[("a".to_string(), 3, 64), ("b".to_string(), 2, 16)]);
        let preferred = meta.preferred_leaders();
        let mut count: BTreeMap<NodeId, usize> = BTreeMap::new();
        for ns in &meta.namespaces {
            let leaders = &preferred[&ns.name];
            assert_eq!(leaders.len(), ns.groups as usize);
            for (g, leader) in leaders.iter().enumerate() {
                assert!(ns.placement[g].contains(leader), "{}/{g}: {leader} is not a voter", ns.name);
                *count.entry(*leader).or_default() += 1;
            }
        }
        let (low, high) = (count.values().min().unwrap(), count.values().max().unwrap());
        assert!(high - low <= 1, "uneven: {count:?}");
        assert_eq!(count.values().sum::<usize>(), 80);

        let mut first: BTreeMap<NodeId, usize> = BTreeMap::new();
        for ns in &meta.namespaces {
            for voters in &ns.placement {
                *first.entry(voters[0]).or_default() += 1;
            }
        }
        assert!(first.values().max().unwrap() - first.values().min().unwrap() > 1, "the control should be uneven: {first:?}");
    }
}
