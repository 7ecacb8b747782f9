//! Where a group's replicas live: rendezvous hashing over the nodes, so that the placement is
//! deterministic (every node computes the same), balanced, and moves little when nodes change.

/// The `replication_factor` replicas of `group` of `namespace` among `nodes`, best first (the
/// first is the group's preferred leader, which spreads leaders over the nodes too).
pub fn replicas(namespace: &str, group: u32, nodes: &[u64], replication_factor: usize) -> Vec<u64> {
    let mut scored: Vec<(u64, u64)> = nodes.iter().map(|&node| (score(namespace, group, node), node)).collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().take(replication_factor).map(|(_, node)| node).collect()
}

/// Like `replicas`, over nodes that may declare a rack: the best-scored node of each rack
/// first, so that the replicas go to distinct racks while there are racks enough, then the
/// best of the rest. A node without a rack is a rack of its own. Without racks, this is
/// `replicas`.
pub fn replicas_on_racks(namespace: &str, group: u32, nodes: &[(u64, Option<&str>)], replication_factor: usize) -> Vec<u64> {
    let ids: Vec<u64> = nodes.iter().map(|(id, _)| *id).collect();
    let ranked = replicas(namespace, group, &ids, ids.len());
    let rack_of = |id: u64| nodes.iter().find(|(n, _)| *n == id).and_then(|(_, rack)| *rack);
    let mut chosen: Vec<u64> = Vec::new();
    let mut racks_used: Vec<&str> = Vec::new();
    for &id in &ranked {
        if chosen.len() == replication_factor {
            break;
        }
        match rack_of(id) {
            Some(rack) if racks_used.contains(&rack) => {}
            Some(rack) => {
                racks_used.push(rack);
                chosen.push(id);
            }
            None => chosen.push(id),
        }
    }
    for &id in &ranked {
        if chosen.len() == replication_factor {
            break;
        }
        if !chosen.contains(&id) {
            chosen.push(id);
        }
    }
    // Preferred leaders stay spread: the order is the rendezvous order.
    chosen.sort_by_key(|id| ranked.iter().position(|r| r == id));
    chosen
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
            let unracked: Vec<(u64, Option<&str>)> = nodes.iter().map(|n| (*n, None)).collect();
            assert_eq!(replicas_on_racks("ns", group, &unracked, 3), replicas("ns", group, &nodes, 3));
        }
        for node in nodes {
            assert!((120..=190).contains(&held[node as usize]), "node {node} holds {} groups", held[node as usize]);
            assert!((30..=75).contains(&first[node as usize]), "node {node} is first for {} groups", first[node as usize]);
        }
    }

    /// With racks, a group's replicas go to distinct racks while there are enough racks, and
    /// fill up from any rack when there are not; moving to racks keeps placement balanced.
    #[test]
    fn racks_spread_replicas() {
        let nodes = [(1, Some("a")), (2, Some("a")), (3, Some("b")), (4, Some("b")), (5, Some("c")), (6, Some("c"))];
        let mut held = [0usize; 7];
        for group in 0..256 {
            let r = replicas_on_racks("ns", group, &nodes, 3);
            let mut racks: Vec<_> = r.iter().map(|id| nodes[*id as usize - 1].1).collect();
            racks.sort();
            racks.dedup();
            assert_eq!(racks.len(), 3, "group {group}: {r:?} shares a rack");
            r.iter().for_each(|id| held[*id as usize] += 1);
        }
        assert!(held[1..].iter().all(|h| (90..=170).contains(h)), "unbalanced: {held:?}");
        let two_racks = [(1, Some("a")), (2, Some("a")), (3, Some("b"))];
        for group in 0..64 {
            let r = replicas_on_racks("ns", group, &two_racks, 3);
            assert_eq!(r.len(), 3);
            let r2 = replicas_on_racks("ns", group, &two_racks, 2);
            assert!(r2.contains(&3), "group {group}: two replicas, two racks: {r2:?}");
        }
    }
}
