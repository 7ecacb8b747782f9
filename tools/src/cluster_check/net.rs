//! Network cuts between nodes of the cluster under test, with iptables. Every node has its own
//! loopback address and its peer connections leave from it (chunkd binds them to its
//! `peer-listen` address), so a rule "drop packets from 127.A.B.11 to 127.A.B.12" cuts node 1
//! off from node 2 and nothing else: clients, which connect from 127.0.0.1, still reach every
//! node, as Jepsen's clients do.
//!
//! The rules live in a chain of our own, `chunkcheck-PID`, jumped to from OUTPUT (loopback
//! packets pass OUTPUT once). Healing flushes the chain; dropping the `Firewall` removes the
//! jump and the chain, and a new run removes the chains of runs whose process is gone (a run
//! killed with SIGKILL cannot clean up after itself).

use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cluster::node_host;

const CHAIN_PREFIX: &str = "chunkcheck-";

/// A directed cut: packets from the first node to the second are dropped.
pub type Cut = (u64, u64);

/// In a `Cut` or a link, this stands for the clients: they connect from 127.0.0.1.
pub const CLIENTS: u64 = 0;

fn host(endpoint: u64) -> String {
    match endpoint {
        CLIENTS => "127.0.0.1".into(),
        node => node_host(node),
    }
}

pub struct Firewall {
    chain: String,
    cuts: Vec<Cut>,
    /// Links whose packets go to a packet queue (`packets.rs`).
    queued: Vec<Cut>,
}

fn iptables(args: &[&str]) -> Result<String> {
    let output = Command::new("iptables").args(["-w", "5"]).args(args).output().context("running iptables (install it: apt-get install iptables)")?;
    if !output.status.success() {
        bail!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Firewall {
    /// Creates this run's chain. Needs root and iptables; says so when either is missing.
    pub fn new() -> Result<Firewall> {
        Firewall::named("")
    }

    /// A chain of this run's with a suffix of its own (another firewall beside the cluster's:
    /// the files workloads' machines).
    pub fn named(suffix: &str) -> Result<Firewall> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the partition nemesis cuts connections with iptables and needs root: run chunkcheck as root, or leave partition out of --nemesis");
        }
        remove_stale_chains()?;
        let chain = format!("{CHAIN_PREFIX}{}{suffix}", std::process::id());
        iptables(&["-N", &chain])?;
        let firewall = Firewall { chain, cuts: Vec::new(), queued: Vec::new() };
        iptables(&["-I", "OUTPUT", "-j", &firewall.chain])?;
        Ok(firewall)
    }

    /// Adds cuts (on top of those already in place).
    pub fn cut(&mut self, cuts: &[Cut]) -> Result<()> {
        for &(from, to) in cuts {
            let (source, destination) = (node_host(from), node_host(to));
            iptables(&["-A", &self.chain, "-s", &source, "-d", &destination, "-j", "DROP"])?;
            self.cuts.push((from, to));
        }
        Ok(())
    }

    /// Drops every packet from or to `host` (a machine of a files workload, cut off from the
    /// cluster).
    pub fn isolate(&mut self, host: &str) -> Result<()> {
        iptables(&["-A", &self.chain, "-s", host, "-j", "DROP"])?;
        iptables(&["-A", &self.chain, "-d", host, "-j", "DROP"])?;
        self.cuts.push((CLIENTS, CLIENTS));
        Ok(())
    }

    /// Sends the packets of each directed link to NFQUEUE queue `queue` (`--queue-bypass`:
    /// they pass untouched when nobody serves it).
    pub fn queue(&mut self, links: &[Cut], queue: u16) -> Result<()> {
        for &(from, to) in links {
            let (source, destination, number) = (host(from), host(to), queue.to_string());
            iptables(&["-A", &self.chain, "-s", &source, "-d", &destination, "-j", "NFQUEUE", "--queue-num", &number, "--queue-bypass"])?;
            self.queued.push((from, to));
        }
        Ok(())
    }

    /// True when cuts or queued links are in place.
    pub fn is_clear(&self) -> bool {
        self.cuts.is_empty() && self.queued.is_empty()
    }

    /// Removes every cut and queued link; returns how many packets the rules matched
    /// (evidence that they took effect: a node whose peer connections did not leave from its
    /// own address would get through untouched).
    pub fn heal(&mut self) -> Result<u64> {
        let listing = iptables(&["-L", &self.chain, "-v", "-x", "-n"])?;
        let matched = listing.lines().skip(2).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum();
        iptables(&["-F", &self.chain])?;
        self.cuts.clear();
        self.queued.clear();
        Ok(matched)
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        remove_chain(&self.chain);
    }
}

/// Removes the jump to `chain` and the chain itself (errors ignored: it may be gone already).
fn remove_chain(chain: &str) {
    while iptables(&["-D", "OUTPUT", "-j", chain]).is_ok() {}
    let _ = iptables(&["-F", chain]);
    let _ = iptables(&["-X", chain]);
}

/// Chains of earlier runs whose process no longer exists.
fn remove_stale_chains() -> Result<()> {
    let rules = iptables(&["-S"])?;
    for line in rules.lines() {
        let Some(chain) = line.strip_prefix("-N ") else { continue };
        let Some(pid) = chain.strip_prefix(CHAIN_PREFIX).and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u32>().ok()) else { continue };
        if !crate::local_cluster::is_live_process_named(pid, "chunkcheck") {
            remove_chain(chain);
        }
    }
    Ok(())
}

/// Every directed link between a node of `side` and any other node or the clients.
pub fn links_of(side: &[u64], nodes: &[u64]) -> Vec<Cut> {
    let mut links = Vec::new();
    for &a in side {
        for &b in nodes.iter().chain(&[CLIENTS]).filter(|&&b| b != a && !(side.contains(&b) && b < a)) {
            links.push((a, b));
            links.push((b, a));
        }
    }
    links
}

/// The cuts that separate `side` from every other node, both ways.
pub fn isolate(side: &[u64], nodes: &[u64]) -> Vec<Cut> {
    let mut cuts = Vec::new();
    for &a in side {
        for &b in nodes.iter().filter(|b| !side.contains(b)) {
            cuts.push((a, b));
            cuts.push((b, a));
        }
    }
    cuts
}

/// Jepsen's majorities ring: nodes in `ring` order each see their nearest neighbours, enough
/// for a majority, but no two nodes see the same majority. Needs 4 or more nodes (with 3 every
/// pair is adjacent; then it is halves).
pub fn majorities_ring(ring: &[u64]) -> Vec<Cut> {
    let n = ring.len();
    if n < 4 {
        return isolate(&ring[..n / 2], ring);
    }
    // Each node must see n/2 others: its neighbours up to `reach` steps either way.
    let reach = (n / 2).div_ceil(2);
    let mut cuts = Vec::new();
    for i in 0..n {
        for j in 0..n {
            let distance = (i + n - j) % n;
            if i != j && distance.min(n - distance) > reach {
                cuts.push((ring[i], ring[j]));
            }
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sees(cuts: &[Cut], nodes: &[u64], node: u64) -> usize {
        nodes.iter().filter(|&&other| other == node || !cuts.contains(&(node, other))).count()
    }

    #[test]
    fn in_a_majorities_ring_every_node_sees_a_majority_and_no_two_the_same() {
        for n in 4..=9u64 {
            let nodes: Vec<u64> = (1..=n).collect();
            let cuts = majorities_ring(&nodes);
            assert!(!cuts.is_empty(), "{n} nodes: something is cut");
            let mut views = std::collections::BTreeSet::new();
            for &node in &nodes {
                assert!(sees(&cuts, &nodes, node) > nodes.len() / 2, "{n} nodes: node {node} sees a majority");
                assert!(sees(&cuts, &nodes, node) < nodes.len(), "{n} nodes: node {node} does not see everyone");
                let view: Vec<u64> = nodes.iter().copied().filter(|&o| o == node || !cuts.contains(&(node, o))).collect();
                views.insert(view);
            }
            assert_eq!(views.len(), nodes.len(), "{n} nodes: every node sees a different majority");
        }
    }

    #[test]
    fn the_links_of_a_side_are_each_listed_once_both_ways() {
        assert_eq!(links_of(&[2], &[1, 2, 3]), vec![(2, 1), (1, 2), (2, 3), (3, 2), (2, CLIENTS), (CLIENTS, 2)]);
        let all = links_of(&[1, 2, 3], &[1, 2, 3]);
        assert_eq!(all.len(), 2 * (3 + 3), "3 links between the nodes and 3 to the clients, both ways");
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn isolating_a_side_cuts_both_ways_and_only_across() {
        let cuts = isolate(&[2], &[1, 2, 3]);
        assert_eq!(cuts, vec![(2, 1), (1, 2), (2, 3), (3, 2)]);
    }
}
