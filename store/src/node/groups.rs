//! This node's replicas of partition groups: each one's state machine over the namespace's
//! engine, its log in the shared WAL (`namespace_wal_group`), whether it starts as a replica
//! that lost its copy and must catch up before it votes (`rejoin_state`), and the Raft
//! instance itself (`start_group`).

use super::*;

/// This node's replica of a partition group.
pub(crate) struct Group {
    pub(super) raft: RaftInstance,
    pub(super) state_machine: GroupStateMachine,
    /// The group's log in the WAL.
    pub(super) wal_group: u32,
    /// Set while this replica catches up after its copy was lost: it neither votes nor campaigns.
    pub(super) rejoin: rejoin::Rejoin,
    /// Writes (and fences) hold it shared from their leadership check until answered; a
    /// leadership hand-over holds it exclusively (see `leadership`).
    pub(super) write_gate: tokio::sync::RwLock<()>,
}

/// A namespace as this node hosts it: its engine and its replicas of the namespace's groups.
pub(super) struct HostedNamespace {
    pub(super) engine: Arc<Namespace>,
    pub(super) groups: u32,
    /// The groups this node replicates (they change as groups move: see `roster`).
    pub(super) local: std::sync::RwLock<HashMap<u32, Arc<Group>>>,
}

impl HostedNamespace {
    pub(super) fn group(&self, group: u32) -> Option<Arc<Group>> {
        self.local.read().unwrap().get(&group).cloned()
    }

    /// The groups this node replicates, by id.
    pub(super) fn groups(&self) -> Vec<(u32, Arc<Group>)> {
        let mut all: Vec<_> = self.local.read().unwrap().iter().map(|(g, group)| (*g, group.clone())).collect();
        all.sort_unstable_by_key(|(g, _)| *g);
        all
    }
}

impl Node {
    /// Opens a namespace's engine and starts this node's replicas of its groups. An engine that
    /// lost acknowledged records has every group it holds rebuilt from the peers first.
    pub(super) async fn host_namespace(&self, spec: &NamespaceSpec, cluster: &ClusterMeta, cluster_index: u64) -> Result<HostedNamespace, NodeError> {
        let me = self.config.node_id;
        let info = cluster.namespace(&spec.engine.name).expect("differences checked every namespace");
        let hosted: Vec<u32> = (0..info.groups).filter(|g| cluster.hosts(info, *g, me)).collect();
        let wal_group = |group: u32| namespace_wal_group(&spec.engine.name, group);
        // The engine's durable point as the groups' applied markers recorded it: the scan
        // then tells damage to acknowledged records from a torn tail.
        let durable_points =
            crate::raft::recorded_engine_points(&self.wal, hosted.iter().map(|group| wal_group(*group))).map_err(|e| NodeError::Raft(e.to_string()))?;
        let devices = match (&self.storage, self.config.test_power_loss_devices) {
            (Some(storage), _) => {
                Some(storage.devices(&spec.engine).map_err(|e| NodeError::Config(format!("namespace {}: its devices: {e}", spec.engine.name)))?)
            }
            (None, true) => Some(power_loss_devices(&spec.engine)?),
            (None, false) => None,
        };
        // Records of replicas that moved away and were forgotten stay out of the index.
        let void_points = crate::raft::forget::recorded_void_points(&self.wal, info.groups, (0..info.groups).map(|g| (g, wal_group(g))))
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let options = OpenOptions { replicated: true, durable_points, void_points, devices, clock: Some(self.clock.clone()), ..OpenOptions::default() };
        let engine = Arc::new(Namespace::open(spec.engine.clone(), options)?);
        self.finish_interrupted(&spec.engine.name, info.groups, &hosted, &engine).await;
        let mut state_machines = Vec::new();
        for &group in &hosted {
            state_machines.push(self.group_state_machine(&engine, &spec.engine.name, group, info.groups)?);
        }
        if engine.lost_acknowledged_records() && !self.config.unsafe_serve_damaged {
            tracing::warn!(namespace = %spec.engine.name, groups = hosted.len(),
                "the engine lost acknowledged records: rebuilding every group this node replicates here from its peers before serving");
            for (&group, state_machine) in hosted.iter().zip(&state_machines) {
                let mut replicas = info.placement[group as usize].clone();
                replicas.extend(info.moves.get(&group).into_iter().flatten());
                self.rebuild_group(&spec.engine.name, group, &replicas, state_machine).await;
            }
            let retire = engine.clone();
            tokio::task::spawn_blocking(move || retire.retire_damaged_blocks()).await.map_err(|e| NodeError::Raft(e.to_string()))??;
        }
        let mut local = HashMap::new();
        for (&group, state_machine) in hosted.iter().zip(state_machines) {
            self.host_group(&spec.engine.name, group, cluster_index)
                .map_err(|e| NodeError::Config(format!("cannot record that group {group} is hosted here: {e}")))?;
            let started = self.start_group(cluster, info, group, state_machine, true).await?;
            local.insert(group, Arc::new(started));
        }
        let local = std::sync::RwLock::new(local);
        Ok(HostedNamespace { engine, groups: info.groups, local })
    }

    /// The state machine of this node's replica of `namespace`'s `group`, over `engine`.
    pub(super) fn group_state_machine(&self, engine: &Arc<Namespace>, namespace: &str, group: u32, groups: u32) -> Result<GroupStateMachine, NodeError> {
        let snapshot_dir = self.config.data_dir.join("snapshots");
        let wal_group = namespace_wal_group(namespace, group);
        let state_machine =
            GroupStateMachine::new(engine.clone(), self.wal.clone(), wal_group, group, groups, &snapshot_dir).map_err(|e| NodeError::Raft(e.to_string()))?;
        if self.config.unsafe_skip_dedup {
            state_machine.set_unsafe_skip_dedup();
        }
        if self.config.unsafe_skip_fencing {
            state_machine.set_unsafe_skip_fencing();
        }
        Ok(state_machine)
    }

    /// Starts this node's Raft instance of `info`'s `group`. A voter (in the group's placement)
    /// whose log is empty while the group lived on catches up before it votes (`rejoin_state`);
    /// at cluster creation (`at_start`, empty log, never voted), the group's preferred leader
    /// initializes it. A replica a move brings here starts empty, as a learner the group's
    /// leader adds.
    pub(super) async fn start_group(
        &self,
        cluster: &ClusterMeta,
        info: &meta::NamespaceInfo,
        group: u32,
        state_machine: GroupStateMachine,
        at_start: bool,
    ) -> Result<Group, NodeError> {
        let me = self.config.node_id;
        let wal_group = namespace_wal_group(&info.name, group);
        let replicas = &info.placement[group as usize];
        let fresh = self.wal.log_state(wal_group).last.is_none();
        let rejoin = match replicas.contains(&me) {
            true => self.rejoin_state(&info.name, group, replicas, wal_group, fresh).await?,
            // A move brings the group here. If this replica holds anything, it is from before
            // the group last left this node (a replica that left is forgotten, `reclaim`, but
            // one whose forgetting failed keeps its log), with a membership the group has long
            // changed; voting on it, replicas like it
            // could elect a second leader in a term the group already has one (seen in a
            // roster run: "two incomparable leaders"). So it catches up from the group's
            // leader before it votes, like a replica that lost its copy.
            false => {
                let marker = rejoin::marker_path(&self.config.data_dir, &info.name, group);
                tracing::info!(namespace = %info.name, group, "a move brings the group here: its replica catches up before it votes");
                rejoin::Rejoin::start(marker.clone()).map_err(|e| NodeError::Config(format!("cannot write {}: {e}", marker.display())))?
            }
        };
        let network = GroupNetwork::new(info.name.clone(), group, self.peers.clone());
        let log_store = GroupLogStore::new(self.wal.clone(), wal_group).syncing_as_follower_of_others(me);
        let raft =
            RaftInstance::new(me, self.raft_config.clone(), network, log_store, state_machine.clone()).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        if rejoin.is_active() {
            raft.runtime_config().elect(false);
        }
        let voted = self.wal.log_state(wal_group).vote.is_some();
        if at_start && fresh && !voted && !rejoin.is_active() && replicas.first() == Some(&me) {
            let members: BTreeMap<NodeId, BasicNode> =
                replicas.iter().map(|id| (*id, BasicNode::new(cluster.node(*id).map(|n| n.peer.clone()).unwrap_or_default()))).collect();
            raft.initialize(members).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        }
        Ok(Group { raft, state_machine, wal_group, rejoin, write_gate: Default::default() })
    }

    /// Whether this replica of `namespace`'s `group` must catch up before it votes (see
    /// `rejoin`): it was catching up when it stopped (its marker is there), or its log is empty
    /// while the group lived on at other replicas. With an empty log it waits (logging at once and every
    /// 5 s) until enough of the other replicas have answered that any entry the group committed,
    /// and any term a leader was elected in, is known to one of them: ceil(n/2) of the n
    /// replicas. A term it learns is recorded as its own vote first, so that it never votes
    /// twice in a term it forgot, nor takes entries from a leader of an older term.
    pub(super) async fn rejoin_state(
        &self,
        namespace: &str,
        group: u32,
        replicas: &[NodeId],
        wal_group: u32,
        fresh: bool,
    ) -> Result<rejoin::Rejoin, NodeError> {
        let marker = rejoin::marker_path(&self.config.data_dir, namespace, group);
        let start = |reason: &str| {
            tracing::warn!(namespace, group, reason, "this replica catches up before it votes again in this group");
            rejoin::Rejoin::start(marker.clone()).map_err(|e| NodeError::Config(format!("cannot write {}: {e}", marker.display())))
        };
        if marker.exists() {
            return start("it was catching up when the node stopped");
        }
        let me = self.config.node_id;
        let others: Vec<NodeId> = replicas.iter().copied().filter(|id| *id != me).collect();
        if !fresh || others.is_empty() || self.config.unsafe_wiped_replica_votes {
            return Ok(rejoin::Rejoin::none());
        }
        let needed = replicas.len().div_ceil(2);
        let request = Request::GroupLog { namespace: namespace.to_owned(), group };
        let ask = |id: &NodeId| -> rejoin::AskLog<'_> {
            let peer = self.peers.get(id);
            let request = &request;
            Box::pin(async move { peer?.call(request, Duration::from_secs(2)).await.ok() })
        };
        let answers = self.survey_logs((namespace, group, wal_group), &others, needed, ask).await?;
        let lived_on = answers.iter().find(|a| a.lived_on()).map(|a| (a.from, a.last_index.unwrap_or(0)));
        match lived_on {
            Some((id, index)) => start(&format!("its log is empty and node {id}'s reaches index {index}")),
            None => Ok(rejoin::Rejoin::none()),
        }
    }

    /// How far this node's log of `namespace`'s `group` reaches (for a replica deciding whether
    /// it must catch up before it votes).
    pub(super) fn group_log(&self, namespace: &str, group: u32) -> Response {
        let wal_group = match namespace == META_NAMESPACE {
            true => META_WAL_GROUP,
            false => namespace_wal_group(namespace, group),
        };
        let state = self.wal.log_state(wal_group);
        let vote: Option<openraft::Vote<NodeId>> = state.vote.and_then(|bytes| bincode::deserialize(&bytes).ok());
        Response::GroupLog { last_index: state.last.map(|(index, _)| index), vote_term: vote.map(|v| v.leader_id().term) }
    }

    /// Ends `rejoin` (the replica votes again) once its log durably reaches the commit index a
    /// leader reported in its own term.
    pub(super) async fn finish_rejoin_once_caught_up(&self, namespace: &str, group: u32, wal_group: u32, rejoin: &rejoin::Rejoin) {
        let Some(target) = rejoin.target().filter(|_| rejoin.is_active()) else { return };
        if self.wal.log_state(wal_group).last.is_some_and(|(index, _)| index >= target)
            && crate::raft::log_store::append_durable(&self.wal, wal_group, Vec::new()).await.is_ok()
        {
            rejoin.finish();
            tracing::warn!(namespace, group, index = target, "caught up from the group's leader: this replica votes again");
        }
    }
}

/// A namespace's WAL group ids are `prefix << 12 | group`, the prefix taken from a hash of the
/// name (so that it does not depend on the order of namespaces in the configuration; start-up
/// refuses two namespaces with the same prefix).
pub(super) fn wal_prefix(namespace: &str) -> u32 {
    crc32fast::hash(namespace.as_bytes()) & 0xF_FFFF
}

/// The WAL group id of `namespace`'s Raft group `group`.
pub(super) fn namespace_wal_group(namespace: &str, group: u32) -> u32 {
    wal_prefix(namespace) << 12 | group
}

/// The namespace's devices, each behind a `PowerLossDevice` (the `test-power-loss-devices` hook).
pub(super) fn power_loss_devices(engine: &NamespaceConfig) -> Result<Vec<Arc<dyn crate::device::Device>>, NodeError> {
    let mut devices: Vec<Arc<dyn crate::device::Device>> = Vec::new();
    for device in &engine.devices {
        let (file, _created) = crate::device::FileDevice::open_or_create(&device.path, device.size)?;
        devices.push(Arc::new(crate::device::PowerLossDevice::new(Arc::new(file), rand::random())));
    }
    Ok(devices)
}
