//! The cluster under test: real chunkd processes, each on its own loopback address
//! (127.A.B.(10+id), `node_host`), so that faults can target one node's traffic. Killed with SIGKILL,
//! paused with SIGSTOP, cut off from each other with iptables (`net.rs`), restarted on the
//! same data; everything is torn down on drop, network rules included.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chunkstore::client::{Client, ClientConfig};

use super::clock;
use super::net::{Cut, Firewall};
use super::packets::{PacketQueue, PacketStats, Shape};
use crate::local_cluster::{self, LocalCluster, LocalNode, UpOptions};
use chunkstore::meta::ClusterMetaExt as _;

/// One node of the cluster under test.
pub struct TestNode {
    pub id: u64,
    pub host: String,
    pub client: String,
    pub peer: String,
    child: Option<Child>,
    paused: bool,
    /// Taken off the roster for good (the roster nemesis's replace): stopped and forgotten
    /// once its groups have moved away (`retire_finished`).
    pub leaving: bool,
}

pub struct TestCluster {
    pub dir: PathBuf,
    pub nodes: Vec<TestNode>,
    chunkd: PathBuf,
    tools: FaultTools,
    replication_factor: usize,
    /// How the configs were written (rewritten as nodes join and leave).
    options: UpOptions,
    /// The id the next fresh node gets: ids are never reused.
    next_id: u64,
}

/// What some faults need set up before the nodes start.
#[derive(Default)]
pub struct FaultTools {
    /// Partitions and packet faults: this run's iptables chain.
    pub firewall: Option<Firewall>,
    /// Packet faults: the queue the firewall sends the faulted links' packets to.
    pub packets: Option<PacketQueue>,
    /// Clock faults: libfaketime; every node then runs with it.
    pub fake_clock: Option<PathBuf>,
}

/// The loopback address of node `id` (Linux routes all of 127.0.0.0/8 to lo; see
/// `local_cluster::own_loopback_host`: runs going on at the same time, such as the test
/// suite's, use different addresses, and one run's cuts cannot touch another's nodes).
pub fn node_host(id: u64) -> String {
    local_cluster::own_loopback_host(id)
}

impl TestCluster {
    /// Writes the configs and starts every node; returns once every group has a leader. The
    /// cluster owns the fault `tools` from then on: the firewall (needed for `cut`), the packet
    /// queue (for `disturb`), and libfaketime (every node's wall clock can then be moved with
    /// `set_clock`).
    pub fn start(
        dir: &Path,
        nodes: u64,
        replication_factor: usize,
        groups: u32,
        device_bytes: u64,
        chunkd_options: &[String],
        tools: FaultTools,
    ) -> Result<TestCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut listed = Vec::new();
        for id in 1..=nodes {
            let host = node_host(id);
            listed.push(LocalNode {
                id,
                client: format!("{host}:{}", local_cluster::free_port(&host, dir)?),
                peer: format!("{host}:{}", local_cluster::free_port(&host, dir)?),
                metrics: None,
                pid: None,
            });
        }
        let layout = LocalCluster { nodes: listed.clone() };
        let options = UpOptions { nodes, device_bytes, groups, chunkd_options: chunkd_options.to_vec(), address_per_node: true, racks: 0 };
        for node in &listed {
            local_cluster::write_config(dir, &layout, node, replication_factor, &options)?;
        }
        let mut cluster = TestCluster {
            dir: dir.to_owned(),
            nodes: listed
                .into_iter()
                .map(|n| TestNode { id: n.id, host: node_host(n.id), client: n.client, peer: n.peer, child: None, paused: false, leaving: false })
                .collect(),
            chunkd: local_cluster::chunkd_binary()?,
            tools,
            replication_factor,
            options,
            next_id: nodes + 1,
        };
        if cluster.tools.fake_clock.is_some() {
            for id in 1..=nodes {
                cluster.set_clock(id, 0)?;
            }
        }
        for id in 1..=nodes {
            cluster.restart(id)?;
        }
        cluster.wait_until_ready(Duration::from_secs(60))?;
        Ok(cluster)
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    /// Every node of the cluster, leaving ones included.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The nodes that belong on the roster: every node but the leaving ones.
    pub fn roster(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| !n.leaving).map(|n| n.id).collect()
    }

    pub fn client_address(&self, id: u64) -> Option<&str> {
        self.nodes.iter().find(|n| n.id == id).map(|n| n.client.as_str())
    }

    fn layout(&self) -> LocalCluster {
        LocalCluster {
            nodes: self.nodes.iter().map(|n| LocalNode { id: n.id, client: n.client.clone(), peer: n.peer.clone(), metrics: None, pid: None }).collect(),
        }
    }

    /// Starts a fresh node: a new id, its own loopback address, an empty data directory, a
    /// config listing the cluster's nodes. It joins the cluster by itself (AddNode through the
    /// metadata leader); returns its id once the cluster metadata has it, holding nothing (the
    /// roster decides that). Every node's config then lists it (a node that restarts with no
    /// metadata, wiped, finds the metadata leader among the nodes its config lists). A node
    /// that does not join within 60 s is stopped and dropped again.
    pub fn add_fresh_node(&mut self) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let host = node_host(id);
        let client = format!("{host}:{}", local_cluster::free_port(&host, &self.dir)?);
        let peer = format!("{host}:{}", local_cluster::free_port(&host, &self.dir)?);
        self.nodes.push(TestNode { id, host, client, peer, child: None, paused: false, leaving: false });
        match self.start_fresh_node(id) {
            Ok(()) => {
                self.write_configs()?;
                Ok(id)
            }
            Err(err) => {
                self.kill(id);
                self.nodes.retain(|n| n.id != id);
                Err(err)
            }
        }
    }

    fn start_fresh_node(&mut self, id: u64) -> Result<()> {
        let layout = self.layout();
        let node = layout.nodes.iter().find(|n| n.id == id).expect("just added");
        local_cluster::write_config(&self.dir, &layout, node, self.replication_factor, &self.options)?;
        if self.tools.fake_clock.is_some() {
            self.set_clock(id, 0)?;
        }
        self.restart(id)?;
        let seeds: Vec<String> = self.nodes.iter().filter(|n| n.id != id).map(|n| n.client.clone()).collect();
        let log = self.node_dir(id).join("chunkd.log");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exited = self.node_mut(id).and_then(|n| n.child.as_mut()).and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                anyhow::bail!("the fresh node {id} exited ({status}) while joining (see {})", log.display());
            }
            if Self::quick_client(seeds.clone()).and_then(|c| Ok(c.cluster_meta()?)).is_ok_and(|meta| meta.node(id).is_some()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("the fresh node {id} did not join within 60 s (see {})", log.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes the config of every node but the leaving ones for the cluster's nodes as they
    /// are now. A leaving node keeps its config: it was a metadata voter that the group removed,
    /// its own copy of the metadata stopped there, and chunkd refuses to start with a config
    /// listing a node its copy does not know (one that joined since).
    fn write_configs(&self) -> Result<()> {
        let layout = self.layout();
        for node in &layout.nodes {
            if self.nodes.iter().any(|n| n.id == node.id && !n.leaving) {
                local_cluster::write_config(&self.dir, &layout, node, self.replication_factor, &self.options)?;
            }
        }
        Ok(())
    }

    /// Marks a node as leaving: `roster` no longer has it.
    pub fn set_leaving(&mut self, id: u64) {
        if let Some(node) = self.node_mut(id) {
            node.leaving = true;
        }
    }

    /// Stops and forgets (ForgetNode) every leaving node that holds no replica and no metadata
    /// vote any more, and rewrites the others' configs without it (a restarted chunkd checks its
    /// `[[nodes]]` against the cluster's). Returns the nodes that left; a leaving node whose
    /// groups are still moving stays for a later call, and so does one whose ForgetNode failed
    /// (it is forgotten when the metadata no longer lists it, whatever answered).
    pub fn retire_finished(&mut self) -> Result<Vec<u64>> {
        let leaving: Vec<u64> = self.nodes.iter().filter(|n| n.leaving).map(|n| n.id).collect();
        if leaving.is_empty() {
            return Ok(Vec::new());
        }
        let seeds: Vec<String> = self.nodes.iter().filter(|n| !n.leaving).map(|n| n.client.clone()).collect();
        let client = Self::quick_client(seeds).context("connecting to retire leaving nodes")?;
        let meta = client.cluster_meta().context("reading the cluster metadata")?;
        let mut retired = Vec::new();
        let mut failed = None;
        for id in leaving {
            let holds = meta.namespaces.iter().any(|ns| (0..ns.groups).any(|g| meta.hosts(ns, g, id)));
            if meta.node(id).is_some() && (holds || meta.metadata_voters.contains(&id) || meta.roster.contains(&id)) {
                continue;
            }
            self.resume(id);
            self.kill(id);
            if meta.node(id).is_some() {
                if let Err(err) = client.forget_node(id) {
                    // Its answer may be what was lost: the next call reads the metadata again.
                    failed = Some(anyhow::anyhow!("forgetting node {id}: {err}"));
                    continue;
                }
            }
            self.nodes.retain(|n| n.id != id);
            retired.push(id);
        }
        if !retired.is_empty() {
            self.write_configs()?;
        }
        match (retired.is_empty(), failed) {
            (true, Some(err)) => Err(err),
            _ => Ok(retired),
        }
    }

    /// The node, if it is (still) one of the cluster's: a node that left is not, and faults
    /// aimed at it (from a stale view of the cluster) do nothing.
    fn node_mut(&mut self, id: u64) -> Option<&mut TestNode> {
        self.nodes.iter_mut().find(|n| n.id == id)
    }

    /// A client for the nemesis's own requests: short waits, so that a fault is never held
    /// up long by a node that does not answer.
    fn quick_client(seeds: Vec<String>) -> Result<Client> {
        let config = ClientConfig { timeout: Duration::from_secs(2), retries_max: 3, retry_window: Duration::from_secs(3), ..ClientConfig::new(seeds) };
        Ok(Client::connect(config)?)
    }

    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node{id}"))
    }

    pub fn is_up(&self, id: u64) -> bool {
        self.nodes.iter().any(|n| n.id == id && n.child.is_some())
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.nodes.iter().any(|n| n.id == id && n.paused)
    }

    /// SIGKILL (a paused node is killed too).
    pub fn kill(&mut self, id: u64) {
        let Some(node) = self.node_mut(id) else { return };
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
    }

    /// Starts a node that is down, on its existing data.
    pub fn restart(&mut self, id: u64) -> Result<()> {
        let config = self.node_dir(id).join("chunkd.toml");
        let log_path = self.node_dir(id).join("chunkd.log");
        let chunkd = self.chunkd.clone();
        let env = match &self.tools.fake_clock {
            Some(library) => clock::environment(library, &clock::offset_file(&self.node_dir(id))),
            None => Vec::new(),
        };
        let Some(node) = self.node_mut(id) else { return Ok(()) };
        if node.child.is_some() {
            return Ok(());
        }
        let child = local_cluster::spawn_chunkd(&chunkd, &config, &log_path, &env)?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    pub fn pause(&mut self, id: u64) {
        let Some(node) = self.node_mut(id) else { return };
        if let Some(child) = &node.child {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
            node.paused = true;
        }
    }

    pub fn resume(&mut self, id: u64) {
        let Some(node) = self.node_mut(id) else { return };
        if let Some(child) = &node.child {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
        node.paused = false;
    }

    /// Drops the packets of every directed cut.
    pub fn cut(&mut self, cuts: &[Cut]) -> Result<()> {
        match &mut self.tools.firewall {
            Some(firewall) => firewall.cut(cuts),
            None => anyhow::bail!("this cluster was started without a firewall"),
        }
    }

    /// Sends the packets of every directed link through the packet queue, which treats them
    /// as `shape` says (`seed` draws each packet's fate).
    pub fn disturb(&mut self, links: &[Cut], shape: Shape, seed: u64) -> Result<()> {
        match (&mut self.tools.firewall, &self.tools.packets) {
            (Some(firewall), Some(packets)) => {
                packets.start(shape, seed);
                firewall.queue(links, packets.number())
            }
            _ => anyhow::bail!("this cluster was started without a packet queue"),
        }
    }

    /// Moves node `id`'s wall clock `offset_ms` away from the real one.
    pub fn set_clock(&mut self, id: u64, offset_ms: i64) -> Result<()> {
        match self.tools.fake_clock {
            Some(_) => clock::set_offset(&clock::offset_file(&self.node_dir(id)), offset_ms),
            None => anyhow::bail!("this cluster was started without libfaketime"),
        }
    }

    /// Ends packet faults (held packets pass) and removes every rule. Returns the packets the
    /// rules matched, and what the packet queue did to them.
    pub fn heal_network(&mut self) -> Result<(u64, Option<PacketStats>)> {
        let packets = self.tools.packets.as_ref().map(|queue| queue.stop());
        let matched = match &mut self.tools.firewall {
            Some(firewall) if !firewall.is_clear() => firewall.heal()?,
            _ => 0,
        };
        Ok((matched, packets))
    }

    /// Heals the network, resumes paused nodes and restarts dead ones (a node that exited on
    /// its own counts as dead: the caller learns of it from `exited`).
    pub fn heal(&mut self) -> Result<()> {
        self.heal_network()?;
        if self.tools.fake_clock.is_some() {
            for id in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
                self.set_clock(id, 0)?;
            }
        }
        for id in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
            self.resume(id);
            self.restart(id)?;
        }
        Ok(())
    }

    /// SIGKILLs every node at once, then starts each again on its data.
    pub fn restart_all(&mut self) -> Result<()> {
        let ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        ids.iter().for_each(|&id| self.kill(id));
        ids.iter().try_for_each(|&id| self.restart(id))
    }

    /// Nodes whose process exited without being killed by us, with their exit status.
    pub fn exited(&mut self) -> Vec<(u64, String)> {
        let mut gone = Vec::new();
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child {
                if let Ok(Some(status)) = child.try_wait() {
                    gone.push((node.id, status.to_string()));
                    node.child = None;
                }
            }
        }
        gone
    }

    /// Waits until every node is up and every group has a leader known to all its replicas.
    pub fn wait_until_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let layout = self.layout();
        let mut children: Vec<(u64, Child)> = self.nodes.iter_mut().filter_map(|n| n.child.take().map(|c| (n.id, c))).collect();
        let result = local_cluster::wait_for_leaders(&self.dir, &layout, timeout, &mut children);
        for (id, child) in children {
            if let Some(node) = self.node_mut(id) {
                node.child = Some(child);
            }
        }
        result.map(|()| started.elapsed())
    }

    /// Stops every node (SIGCONT first, then SIGKILL) and removes the firewall chain: nothing
    /// is left running, no rule left behind.
    pub fn tear_down(&mut self) {
        for id in self.nodes.iter().map(|n| n.id).collect::<Vec<_>>() {
            self.resume(id);
            self.kill(id);
        }
        self.tools.packets = None;
        self.tools.firewall = None;
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.tear_down();
    }
}
