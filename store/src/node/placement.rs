//! Where a group's replicas live: rendezvous hashing over the nodes, so that the placement is
//! deterministic (every node computes the same), balanced, and moves little when nodes change.

/// The `replication_factor` replicas of `group` of `namespace` among `nodes`, best first (the
/// first is the group's preferred leader, which spreads leaders over the nodes too).
pub fn replicas(namespace: &str, group: u32, nodes: &[u64], replication_factor: usize) -> Vec<u64> {
    let mut scored: Vec<(u64, u64)> = nodes.iter().map(|&node| (score(namespace, group, node), node)).collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().take(replication_factor).map(|(_, node)| node).collect()
}

fn score(namespace: &str, group: u32, node: u64) -> u64 {
    let seed = (crc32fast::hash(namespace.as_bytes()) as u64) << 32 | group as u64;
    splitmix64(seed ^ splitmix64(node))
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placement is balanced: over 256 groups on 5 nodes with RF 3, each node holds close to
    /// 3/5 of the groups and is first (preferred leader) for close to 1/5.
    #[test]
    fn balanced_and_deterministic() {
        let nodes = [1, 2, 3, 4, 5];
        let mut held = [0usize; 6];
        let mut first = [0usize; 6];
        for group in 0..256 {
            let r = replicas("ns", group, &nodes, 3);
            assert_eq!(r, replicas("ns", group, &nodes, 3));
            assert_eq!(r.len(), 3);
            let mut distinct = r.clone();
            distinct.dedup();
            assert_eq!(distinct.len(), 3);
            first[r[0] as usize] += 1;
            for node in r {
                held[node as usize] += 1;
            }
        }
        for node in nodes {
            assert!((120..=190).contains(&held[node as usize]), "node {node} holds {} groups", held[node as usize]);
            assert!((30..=75).contains(&first[node as usize]), "node {node} is first for {} groups", first[node as usize]);
        }
    }
}
