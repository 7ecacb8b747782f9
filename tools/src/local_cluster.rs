//! A local cluster of chunkd processes on loopback, kept in one directory: `DIR/cluster.json`
//! lists the nodes (id, addresses, pid), `DIR/nodeN/` holds each node's config, log and data.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chunkstore::client::{Client, ClientConfig};
use chunkstore::meta::ClusterMetaExt as _;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalNode {
    pub id: u64,
    pub client: String,
    pub peer: String,
    /// Where the node serves Prometheus metrics (`GET /metrics`).
    #[serde(default)]
    pub metrics: Option<String>,
    pub pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalCluster {
    pub nodes: Vec<LocalNode>,
}

impl LocalCluster {
    pub fn load(dir: &Path) -> Result<LocalCluster> {
        let path = dir.join("cluster.json");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("no cluster in {} (start one with chunkctl up --dir {})", dir.display(), dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a cluster description", path.display()))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("cluster.json");
        let tmp = dir.join("cluster.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    /// The pids of the nodes that are running.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.pid).filter(|&pid| is_running(pid)).collect()
    }
}

/// Is `pid` a live chunkd?
pub fn is_running(pid: u32) -> bool {
    is_live_process_named(pid, "chunkd")
}

/// Is `pid` a live (not zombie) process whose command line contains `name`?
pub fn is_live_process_named(pid: u32, name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(name))
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

/// Lowest port a local cluster listens on.
const LISTEN_PORT_MIN: u16 = 10_000;

/// A free port for a node to listen on, below the kernel's ephemeral range (where it picks
/// the source ports of outgoing connections): a port taken from that range can be taken again
/// by any connection before the node binds it, or while a stopped node is away, and the node
/// then fails to start with "Address already in use" (seen in CI with clusters side by side).
/// Random ports are tried until one binds; with no room below the ephemeral range, the kernel
/// picks.
///
/// A port found free is also reserved for `owner` (the cluster's directory) by a file in
/// `$TMPDIR/chunkstore-ports`, because a port that binds may still belong to a cluster whose
/// node is down for a moment (killed by a test, to be restarted on the same port): another
/// cluster started meanwhile must not take it (seen in CI). A reservation lapses when its
/// owner's directory is gone, or after a day.
pub fn free_port(host: &str, owner: &Path) -> Result<u16> {
    use rand::Rng;
    let reservations = std::env::temp_dir().join("chunkstore-ports");
    let _ = std::fs::create_dir_all(&reservations);
    let owner = std::path::absolute(owner).unwrap_or_else(|_| owner.to_owned());
    let reserve = |port: u16| -> bool {
        let path = reservations.join(port.to_string());
        let claim = || {
            std::fs::OpenOptions::new().write(true).create_new(true).open(&path).and_then(|mut f| {
                use std::io::Write;
                f.write_all(owner.as_os_str().as_encoded_bytes())
            })
        };
        if claim().is_ok() {
            return true;
        }
        let lapsed = std::fs::read(&path).map(|holder| !Path::new(&String::from_utf8_lossy(&holder).into_owned()).exists()).unwrap_or(false)
            || std::fs::metadata(&path).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(86_400)));
        lapsed && std::fs::remove_file(&path).is_ok() && claim().is_ok()
    };
    let ephemeral_min = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next().and_then(|low| low.parse::<u16>().ok()))
        .unwrap_or(32_768);
    if ephemeral_min > LISTEN_PORT_MIN + 1_000 {
        let mut rng = rand::thread_rng();
        for _ in 0..1_000 {
            let port = rng.gen_range(LISTEN_PORT_MIN..ephemeral_min);
            if std::net::TcpListener::bind((host, port)).is_ok() && reserve(port) {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind((host, 0)).with_context(|| format!("binding a port on {host}"))?.local_addr()?.port())
}

pub fn chunkd_binary() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("chunkd");
    if !path.exists() {
        bail!("{} not found: build it with cargo build --release", path.display());
    }
    Ok(path)
}

/// Starts `chunkd --config CONFIG` (with `env` added to its environment) with its output
/// appended to `log`, in its own process group (a Ctrl-C meant for the tool that started it
/// does not reach the node).
pub fn spawn_chunkd(chunkd: &Path, config: &Path, log: &Path, env: &[(String, String)]) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    Command::new(chunkd)
        .arg("--config")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", chunkd.display()))
}

/// How `up` makes a new cluster.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub nodes: u64,
    /// Bytes of each node's device for namespace "test".
    pub device_bytes: u64,
    /// Raft groups of namespace "test" (a power of two).
    pub groups: u32,
    /// Extra top-level lines for every chunkd.toml (`KEY = VALUE`, TOML).
    pub chunkd_options: Vec<String>,
    /// Each node on its own loopback address (`own_loopback_host`) rather than 127.0.0.1.
    pub address_per_node: bool,
    /// Racks to spread the nodes over (node N on rack `rack-((N - 1) % racks + 1)`); 0: none.
    pub racks: u32,
}

/// The rack `UpOptions::racks` gives node `id`, if any.
pub fn rack_of(id: u64, racks: u32) -> Option<String> {
    (racks > 0).then(|| format!("rack-{}", (id - 1) % u64::from(racks) + 1))
}

/// The loopback address of node `id` of a new cluster whose nodes have one each:
/// 127.A.B.(10+id), A.B from this process's id, so that clusters started at the same time
/// (by chunkctl or chunkcheck) do not share addresses. Its peer
/// connections leave from it too (chunkd binds them to its `peer-listen` address), so an
/// iptables rule on the address cuts that node's traffic and nothing else.
pub fn own_loopback_host(id: u64) -> String {
    let pid = std::process::id();
    format!("127.{}.{}.{}", 1 + pid % 99, (pid / 99) % 256, 10 + id)
}

/// A new node's host: on its own loopback address if the cluster's nodes have one each (the
/// same 127.A.B. as `existing`, a node of the cluster), else 127.0.0.1.
fn host_like(existing: &LocalNode, id: u64) -> String {
    let host = existing.client.rsplit_once(':').map_or("127.0.0.1", |(host, _)| host);
    match host.rsplit_once('.') {
        Some((prefix, _)) if host != "127.0.0.1" => format!("{prefix}.{}", 10 + id),
        _ => "127.0.0.1".into(),
    }
}

/// Client, peer and metrics addresses on `host`, on free ports.
fn node_on(host: &str, id: u64, dir: &Path) -> Result<LocalNode> {
    Ok(LocalNode {
        id,
        client: format!("{host}:{}", free_port(host, dir)?),
        peer: format!("{host}:{}", free_port(host, dir)?),
        metrics: Some(format!("{host}:{}", free_port(host, dir)?)),
        pid: None,
    })
}

pub fn write_config(dir: &Path, cluster: &LocalCluster, node: &LocalNode, replication_factor: usize, options: &UpOptions) -> Result<PathBuf> {
    let device_bytes = options.device_bytes;
    let node_dir = dir.join(format!("node{}", node.id));
    std::fs::create_dir_all(&node_dir)?;
    let mut text = format!(
        "node-id = {}\nclient-listen = \"{}\"\npeer-listen = \"{}\"\ndata-dir = \"{}\"\n",
        node.id,
        node.client,
        node.peer,
        node_dir.join("data").display()
    );
    if let Some(metrics) = &node.metrics {
        text += &format!("metrics-listen = \"{metrics}\"\n");
    }
    text += "\n";
    for line in &options.chunkd_options {
        text += line;
        text += "\n";
    }
    for other in &cluster.nodes {
        let rack = rack_of(other.id, options.racks).map(|r| format!("rack = {r:?}\n")).unwrap_or_default();
        text += &format!("[[nodes]]\nid = {}\nclient = \"{}\"\npeer = \"{}\"\n{rack}\n", other.id, other.client, other.peer);
    }
    text += &format!("[[namespaces]]\nname = \"test\"\nreplication-factor = {replication_factor}\ngroups = {}\ndevice-size = {device_bytes}\n", options.groups);
    let path = node_dir.join("chunkd.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts (or restarts, keeping its data) the cluster in `dir`, and waits until every group
/// has a leader.
pub fn up(dir: &Path, options: &UpOptions, log: &mut impl FnMut(&str)) -> Result<LocalCluster> {
    let nodes = options.nodes;
    if !options.groups.is_power_of_two() || options.groups > 4096 {
        bail!("--groups {} must be a power of two up to 4096", options.groups);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = &dir.canonicalize()?;
    let mut cluster = match LocalCluster::load(dir) {
        Ok(existing) => {
            let running = existing.nodes.iter().filter(|n| n.pid.is_some_and(is_running)).count();
            if running == existing.nodes.len() {
                bail!("the cluster in {} is already running (chunkctl down --dir {} stops it)", dir.display(), dir.display());
            }
            log(&format!("starting {} of the {} nodes in {} (data kept)", existing.nodes.len() - running, existing.nodes.len(), dir.display()));
            existing
        }
        Err(_) => {
            if nodes == 0 {
                bail!("--nodes must be at least 1");
            }
            // The directory first: it names the owner of the ports reserved below.
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut fresh = Vec::new();
            for id in 1..=nodes {
                let host = if options.address_per_node { own_loopback_host(id) } else { "127.0.0.1".into() };
                fresh.push(node_on(&host, id, dir)?);
            }
            LocalCluster { nodes: fresh }
        }
    };
    let replication_factor = cluster.nodes.len().min(3);
    let chunkd = chunkd_binary()?;
    let mut started = Vec::new();
    for index in 0..cluster.nodes.len() {
        let node = cluster.nodes[index].clone();
        if node.pid.is_some_and(is_running) {
            continue;
        }
        // A node that has a config keeps it (its devices were made with those sizes).
        let existing_config = dir.join(format!("node{}", node.id)).join("chunkd.toml");
        let config = match existing_config.exists() {
            true => existing_config,
            false => write_config(dir, &cluster, &node, replication_factor, options)?,
        };
        let child = spawn_chunkd(&chunkd, &config, &dir.join(format!("node{}", node.id)).join("chunkd.log"), &[])?;
        cluster.nodes[index].pid = Some(child.id());
        started.push((node.id, child));
    }
    cluster.save(dir)?;
    wait_for_leaders(dir, &cluster, Duration::from_secs(60), &mut started).with_context(|| format!("see the logs in {}/node*/chunkd.log", dir.display()))?;
    Ok(cluster)
}

/// Waits until, on every node, every group it replicates knows its leader. Fails at once,
/// quoting the end of its log, if one of the `started` nodes exits meanwhile.
pub fn wait_for_leaders(dir: &Path, cluster: &LocalCluster, timeout: Duration, started: &mut [(u64, std::process::Child)]) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        for (id, child) in started.iter_mut() {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.join(format!("node{id}")).join("chunkd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
                bail!("node {id} exited ({status}) while starting; the end of its log:\n{}", tail.join("\n"));
            }
        }
        let mut ready = true;
        for node in &cluster.nodes {
            let config = ClientConfig { timeout: Duration::from_secs(2), retries_max: 0, ..ClientConfig::new(vec![node.client.clone()]) };
            match Client::connect(config) {
                Ok(client) => {
                    let map = client.cluster_map();
                    // A node that has not joined yet hands out a map without namespaces.
                    if map.namespaces.is_empty() {
                        ready = false;
                    }
                    for ns in &map.namespaces {
                        for (group, replicas) in ns.replicas.iter().enumerate() {
                            // A dead group waits for `chunkctl revive`, not for an election.
                            if replicas.contains(&node.id) && ns.leaders[group].is_none() && !ns.dead.contains(&(group as u32)) {
                                ready = false;
                            }
                        }
                    }
                }
                Err(_) => ready = false,
            }
        }
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not elect a leader for every group within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to every node, then waits for them to exit (SIGKILL after `grace`).
pub fn down(dir: &Path, grace: Duration, log: &mut impl FnMut(&str)) -> Result<()> {
    let mut cluster = LocalCluster::load(dir)?;
    for node in &cluster.nodes {
        if let Some(pid) = node.pid.filter(|pid| is_running(*pid)) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    for node in &mut cluster.nodes {
        let Some(pid) = node.pid else { continue };
        let deadline = Instant::now() + grace;
        while is_running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_running(pid) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            log(&format!("node {} did not stop within {grace:?}: killed", node.id));
        } else {
            log(&format!("node {} stopped", node.id));
        }
        node.pid = None;
    }
    cluster.save(dir)
}

/// Starts one more chunkd for the local cluster in `dir` (the next node id, new loopback
/// ports, the configuration of the cluster's first node otherwise), and waits until the
/// cluster has taken it in. It owns no data until the roster names it.
pub fn add_node(dir: &Path, rack: Option<&str>, log: &mut impl FnMut(&str)) -> Result<LocalNode> {
    let dir = &dir.canonicalize().with_context(|| format!("no cluster in {}", dir.display()))?;
    let mut cluster = LocalCluster::load(dir)?;
    let template_node = cluster.nodes.first().context("the cluster has no nodes")?.id;
    let template_path = dir.join(format!("node{template_node}")).join("chunkd.toml");
    let template = std::fs::read_to_string(&template_path).with_context(|| format!("reading {}", template_path.display()))?;
    let id = cluster.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
    let node = node_on(&host_like(&cluster.nodes[0], id), id, dir)?;
    let node_dir = dir.join(format!("node{id}"));
    if node_dir.exists() {
        bail!("{} exists already: a node of this id ran here before", node_dir.display());
    }
    std::fs::create_dir_all(&node_dir)?;
    let rack_line = rack.map(|r| format!("rack = {r:?}\n")).unwrap_or_default();
    let entry = format!("[[nodes]]\nid = {id}\nclient = \"{}\"\npeer = \"{}\"\n{rack_line}\n", node.client, node.peer);
    let mut text = String::new();
    let mut placed = false;
    for line in template.lines() {
        let line = match line.split_once(" = ").map(|(key, _)| key) {
            Some("node-id") => format!("node-id = {id}"),
            Some("client-listen") => format!("client-listen = \"{}\"", node.client),
            Some("peer-listen") => format!("peer-listen = \"{}\"", node.peer),
            Some("data-dir") => format!("data-dir = \"{}\"", node_dir.join("data").display()),
            Some("metrics-listen") => format!("metrics-listen = \"{}\"", node.metrics.as_deref().unwrap_or_default()),
            _ => line.to_owned(),
        };
        if line == "[[namespaces]]" && !placed {
            text += &entry;
            placed = true;
        }
        text += &line;
        text += "\n";
    }
    if !placed {
        bail!("{} has no [[namespaces]] section to place the new node before", template_path.display());
    }
    let config = node_dir.join("chunkd.toml");
    std::fs::write(&config, text)?;
    let mut child = spawn_chunkd(&chunkd_binary()?, &config, &node_dir.join("chunkd.log"), &[])?;
    let mut added = node.clone();
    added.pid = Some(child.id());
    cluster.nodes.push(added.clone());
    cluster.save(dir)?;
    log(&format!("node {id} started at {} (log: {})", node.client, node_dir.join("chunkd.log").display()));
    let client = Client::connect(ClientConfig::new(cluster.seeds())).context("connecting to the cluster")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            let log_text = std::fs::read_to_string(node_dir.join("chunkd.log")).unwrap_or_default();
            let tail: Vec<&str> = log_text.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("node {id} exited ({status}) while joining; the end of its log:\n{}", tail.join("\n"));
        }
        if client.cluster_meta().is_ok_and(|meta| meta.node(id).is_some()) {
            return Ok(added);
        }
        if Instant::now() > deadline {
            bail!("node {id} did not join the cluster within 60 s (see {})", node_dir.join("chunkd.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every group of the cluster is where the roster puts it, saying how far it is
/// every 5 s.
pub fn wait_for_balance(client: &Client, timeout: Duration, log: &mut impl FnMut(&str)) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut next_report = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(meta) = client.cluster_meta() {
            let balance = meta.balance();
            if balance.iter().all(|(_, placed, groups)| placed == groups) {
                return Ok(());
            }
            if Instant::now() >= next_report {
                let parts: Vec<String> = balance.iter().map(|(ns, placed, groups)| format!("{ns}: {placed}/{groups} groups placed")).collect();
                log(&format!("rebalancing: {}", parts.join(", ")));
                next_report += Duration::from_secs(5);
            }
        }
        if Instant::now() > deadline {
            bail!("the groups did not reach their places within {timeout:?} (chunkctl status shows which move waits, and why in the nodes' logs)");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Takes node `id` of the local cluster in `dir` off the roster, waits until no group has a
/// replica on it and (for a metadata voter) another node took its place among the metadata
/// voters, stops it, removes it from the cluster, and rewrites the `[[nodes]]` of the other
/// nodes' configuration files to the cluster's nodes (a node refuses to start with one that
/// names a node the cluster does not have, or fewer nodes than a replication factor).
pub fn remove_node(dir: &Path, id: u64, timeout: Duration, log: &mut impl FnMut(&str)) -> Result<()> {
    let dir = &dir.canonicalize().with_context(|| format!("no cluster in {}", dir.display()))?;
    let mut cluster = LocalCluster::load(dir)?;
    let index = cluster.nodes.iter().position(|n| n.id == id).with_context(|| format!("the cluster in {} has no node {id}", dir.display()))?;
    let seeds: Vec<String> = cluster.nodes.iter().filter(|n| n.id != id).map(|n| n.client.clone()).collect();
    let client = Client::connect(ClientConfig::new(seeds)).context("connecting to the cluster")?;
    let meta = client.cluster_meta().context("reading the cluster metadata")?;
    let voter = meta.metadata_voters.contains(&id);
    if voter && meta.roster.iter().all(|n| *n == id || meta.metadata_voters.contains(n)) {
        bail!(
            "node {id} is a voter of the metadata group ({:?}) and every other node on the roster is one too: \
             add a node first (chunkctl node add); it takes node {id}'s place",
            meta.metadata_voters
        );
    }
    if meta.roster.contains(&id) {
        let roster: Vec<u64> = meta.roster.iter().copied().filter(|n| *n != id).collect();
        client.set_roster(&roster).with_context(|| format!("taking node {id} off the roster"))?;
        log(&format!("node {id} is off the roster (now {roster:?}): its groups move away"));
    }
    if voter {
        log(&format!("node {id} is a metadata voter: the metadata leader hands its place to another node on the roster"));
    }
    let deadline = Instant::now() + timeout;
    loop {
        let meta = client.cluster_meta().context("reading the cluster metadata")?;
        let holds = meta.namespaces.iter().map(|ns| (0..ns.groups).filter(|g| meta.hosts(ns, *g, id)).count()).sum::<usize>();
        let votes = meta.metadata_voters.contains(&id);
        if holds == 0 && !votes {
            if voter {
                log(&format!("the metadata voters are now {:?}", meta.metadata_voters));
            }
            break;
        }
        if Instant::now() > deadline {
            let voting = if votes { format!(" and is still a metadata voter ({:?})", meta.metadata_voters) } else { String::new() };
            bail!("node {id} still holds replicas of {holds} groups{voting} after {timeout:?}; it keeps running");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if let Some(pid) = cluster.nodes[index].pid.filter(|pid| is_running(*pid)) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let stop_by = Instant::now() + Duration::from_secs(30);
        while is_running(pid) && Instant::now() < stop_by {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    client.forget_node(id).with_context(|| format!("removing node {id} from the cluster's node list"))?;
    cluster.nodes.remove(index);
    cluster.save(dir)?;
    // Each node's configuration lists the cluster's nodes as they are now: each from its own
    // configuration (which has its rack).
    let paths: Vec<PathBuf> = cluster.nodes.iter().map(|n| dir.join(format!("node{}", n.id)).join("chunkd.toml")).collect();
    let mut texts = Vec::new();
    for path in &paths {
        texts.push(std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?);
    }
    let mut tables = Vec::new();
    for ((node, text), path) in cluster.nodes.iter().zip(&texts).zip(&paths) {
        tables.push(node_table(text, node.id).with_context(|| format!("{} has no [[nodes]] entry for its own node", path.display()))?);
    }
    for (text, path) in texts.iter().zip(&paths) {
        let listed = with_node_tables(text, &tables);
        if listed != *text {
            std::fs::write(path, listed).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    log(&format!("node {id} holds no data, stopped and left the cluster (its directory {} can go)", dir.join(format!("node{id}")).display()));
    Ok(())
}

/// The tables of `text` (a chunkd.toml), each with its lines up to the next table header
/// (comments included); the lines before the first header come first, as a table of their own.
fn toml_tables(text: &str) -> Vec<Vec<&str>> {
    let mut tables: Vec<Vec<&str>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim_start().starts_with('[') {
            tables.push(Vec::new());
        }
        tables.last_mut().expect("one table at least").push(line);
    }
    tables
}

/// Whether `table` is the `[[nodes]]` table of a node (of node `id`, if given).
fn is_node_table(table: &[&str], id: Option<u64>) -> bool {
    table.first().is_some_and(|l| l.trim() == "[[nodes]]") && id.is_none_or(|id| table.iter().any(|l| l.trim() == format!("id = {id}")))
}

/// Node `id`'s `[[nodes]]` table in `text` (its own configuration has it, with its rack).
fn node_table(text: &str, id: u64) -> Option<String> {
    toml_tables(text).into_iter().find(|t| is_node_table(t, Some(id))).map(|t| t.iter().map(|l| format!("{l}\n")).collect())
}

/// `text` with its `[[nodes]]` tables replaced by `tables` (placed where the first was).
fn with_node_tables(text: &str, tables: &[String]) -> String {
    let mut out = String::new();
    let mut placed = false;
    for table in toml_tables(text) {
        if !is_node_table(&table, None) {
            table.iter().for_each(|l| out += &format!("{l}\n"));
        } else if !placed {
            tables.iter().for_each(|t| out += t);
            placed = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{node_table, with_node_tables};

    #[test]
    fn the_node_list_of_a_configuration_is_replaced_whole() {
        let two = "node-id = 2\n\n[[nodes]]\nid = 1\npeer = \"a\"\n\n[[nodes]]\nid = 2\npeer = \"b\"\n\n[[namespaces]]\nname = \"test\"\n";
        let four = "node-id = 4\n[[nodes]]\nid = 4\npeer = \"d\"\nrack = \"r\"\n[[namespaces]]\n";
        assert_eq!(node_table(two, 2).as_deref(), Some("[[nodes]]\nid = 2\npeer = \"b\"\n\n"));
        assert_eq!(node_table(two, 12), None);
        let tables = [node_table(two, 2).unwrap(), node_table(four, 4).unwrap()];
        assert_eq!(
            with_node_tables(two, &tables),
            "node-id = 2\n\n[[nodes]]\nid = 2\npeer = \"b\"\n\n[[nodes]]\nid = 4\npeer = \"d\"\nrack = \"r\"\n[[namespaces]]\nname = \"test\"\n"
        );
    }
}
