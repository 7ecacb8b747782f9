//! The client library. `Client` is blocking and needs no async runtime from its caller (plain
//! std sockets), so the LD_PRELOAD shim can embed it in any process; after a fork, a process
//! never reuses connections it inherited (they belong to the parent).
//!
//! Routing: a record's group comes from its digest; requests go to the group's leader from the
//! cluster map; NotLeader answers update the map (or refresh it) and the request is retried,
//! up to `retries_max` times.
//!
//! Invariant: **a write is retried only when it certainly was not applied** (the connection
//! could not be made, or a node answered NotLeader). A write whose fate is unknown comes back
//! as `Timeout { in_doubt: true }`; exactly-once retries of those come with the server's
//! deduplication of write tags.

mod connection;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use connection::BlockingConnection;

use crate::key::Key;
use crate::ops::{OpResult, Operation, WriteOp, WritePolicy};
use crate::protocol::{ClusterMap, ErrorReply, ReadPolicy, Request, Response, WriteTag};
use crate::raft::group_of;
use crate::value::{Bin, Record, RecordMeta};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Addresses of some nodes (HOST:PORT); the rest is learned from the cluster map.
    pub seeds: Vec<String>,
    /// Per attempt: connect, send, wait for the answer. Default 5 s.
    pub timeout: Duration,
    /// Attempts after the first, for answers that are safe to retry. Default 64.
    pub retries_max: u32,
    /// How long to keep retrying those (long enough for a group to elect a new leader).
    /// Default 15 s.
    pub retry_window: Duration,
    pub read_policy: ReadPolicy,
}

impl ClientConfig {
    pub fn new(seeds: Vec<String>) -> ClientConfig {
        ClientConfig {
            seeds,
            timeout: Duration::from_secs(5),
            retries_max: 64,
            retry_window: Duration::from_secs(15),
            read_policy: ReadPolicy::Session,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Server(ErrorReply),
    #[error("no node reachable among {0:?}")]
    NoNodeReachable(Vec<String>),
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
}

pub struct Client {
    config: ClientConfig,
    client_id: u64,
    next_seq: AtomicU64,
    map: Mutex<ClusterMap>,
    /// Idle connections by node address, and the process that opened them.
    pool: Mutex<(u32, HashMap<String, Vec<BlockingConnection>>)>,
    /// Newest log index seen per (namespace, group): session reads never go below it.
    seen: Mutex<HashMap<(String, u32), u64>>,
}

/// Idle connections kept per node.
const POOL_PER_NODE_MAX: usize = 16;

impl Client {
    /// Connects to the first seed that answers and loads the cluster map.
    pub fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let client = Client {
            client_id: rand::random(),
            next_seq: AtomicU64::new(1),
            map: Mutex::new(ClusterMap::default()),
            pool: Mutex::new((std::process::id(), HashMap::new())),
            seen: Mutex::new(HashMap::new()),
            config,
        };
        client.refresh_map()?;
        Ok(client)
    }

    pub fn cluster_map(&self) -> ClusterMap {
        self.map.lock().unwrap().clone()
    }

    /// Asks the seeds, then every known node, for the cluster map.
    pub fn refresh_map(&self) -> Result<ClusterMap, ClientError> {
        let known: Vec<String> = self.map.lock().unwrap().nodes.iter().map(|(_, a)| a.clone()).collect();
        let mut tried = Vec::new();
        for addr in self.config.seeds.iter().chain(known.iter()) {
            tried.push(addr.clone());
            if let Ok(Response::ClusterMap(map)) = self.call(addr, &Request::ClusterMap) {
                *self.map.lock().unwrap() = map.clone();
                return Ok(map);
            }
        }
        Err(ClientError::NoNodeReachable(tried))
    }

    pub fn get(&self, namespace: &str, key: &Key, bins: Option<Vec<String>>) -> Result<Option<Record>, ClientError> {
        self.get_with(namespace, key, bins, self.config.read_policy)
    }

    pub fn get_with(&self, namespace: &str, key: &Key, bins: Option<Vec<String>>, read: ReadPolicy) -> Result<Option<Record>, ClientError> {
        let group = self.group(namespace, key)?;
        let min_index = self.seen.lock().unwrap().get(&(namespace.to_owned(), group)).copied().unwrap_or(0);
        let request = Request::Get { namespace: namespace.into(), key: key.clone(), bins, read, min_index };
        match self.routed(namespace, group, &request, false)? {
            Response::Record { record, index } => {
                self.saw(namespace, group, index);
                Ok(record)
            }
            other => Err(unexpected(other)),
        }
    }

    pub fn put(&self, namespace: &str, key: &Key, bins: Vec<Bin>, policy: &WritePolicy) -> Result<RecordMeta, ClientError> {
        Ok(self.write(namespace, key, WriteOp::Put(bins), policy)?.0)
    }

    pub fn delete(&self, namespace: &str, key: &Key, policy: &WritePolicy) -> Result<RecordMeta, ClientError> {
        Ok(self.write(namespace, key, WriteOp::Delete, policy)?.0)
    }

    pub fn operate(&self, namespace: &str, key: &Key, ops: Vec<Operation>, policy: &WritePolicy) -> Result<(RecordMeta, Vec<OpResult>), ClientError> {
        self.write(namespace, key, WriteOp::Operate(ops), policy)
    }

    pub fn write(&self, namespace: &str, key: &Key, op: WriteOp, policy: &WritePolicy) -> Result<(RecordMeta, Vec<OpResult>), ClientError> {
        let group = self.group(namespace, key)?;
        let tag = WriteTag { client_id: self.client_id, seq: self.next_seq.fetch_add(1, Ordering::Relaxed) };
        let request = Request::Write { namespace: namespace.into(), key: key.clone(), op, policy: *policy, tag };
        match self.routed(namespace, group, &request, true)? {
            Response::Written { meta, results, index } => {
                self.saw(namespace, group, index);
                Ok((meta, results))
            }
            other => Err(unexpected(other)),
        }
    }

    fn group(&self, namespace: &str, key: &Key) -> Result<u32, ClientError> {
        let groups = self.map.lock().unwrap().namespaces.iter().find(|n| n.name == namespace).map(|n| n.groups);
        let groups = match groups {
            Some(groups) => groups,
            None => self
                .refresh_map()?
                .namespaces
                .iter()
                .find(|n| n.name == namespace)
                .map(|n| n.groups)
                .ok_or_else(|| ClientError::UnknownNamespace(namespace.into()))?,
        };
        Ok(group_of(&key.digest, groups))
    }

    fn saw(&self, namespace: &str, group: u32, index: u64) {
        let mut seen = self.seen.lock().unwrap();
        let entry = seen.entry((namespace.to_owned(), group)).or_default();
        *entry = (*entry).max(index);
    }

    fn leader_address(&self, namespace: &str, group: u32) -> Option<String> {
        let map = self.map.lock().unwrap();
        let leader = map.namespaces.iter().find(|n| n.name == namespace)?.leaders.get(group as usize).copied().flatten()?;
        map.nodes.iter().find(|(id, _)| *id == leader).map(|(_, addr)| addr.clone())
    }

    /// After the leader could not be reached: try the group's other replicas (they answer
    /// NotLeader with the new leader once one is elected).
    fn forget_leader(&self, namespace: &str, group: u32) {
        let mut map = self.map.lock().unwrap();
        let Some(ns) = map.namespaces.iter_mut().find(|n| n.name == namespace) else { return };
        let (Some(slot), Some(replicas)) = (ns.leaders.get(group as usize).copied(), ns.replicas.get(group as usize)) else { return };
        let others: Vec<u64> = replicas.iter().copied().filter(|r| Some(*r) != slot).collect();
        if !others.is_empty() {
            let pick = others[rand::random::<usize>() % others.len()];
            ns.leaders[group as usize] = Some(pick);
        }
    }

    fn set_leader(&self, namespace: &str, group: u32, leader: u64) {
        let mut map = self.map.lock().unwrap();
        if let Some(ns) = map.namespaces.iter_mut().find(|n| n.name == namespace) {
            if let Some(slot) = ns.leaders.get_mut(group as usize) {
                *slot = Some(leader);
            }
        }
    }

    /// Sends to the group's leader, retrying what is safe to retry.
    fn routed(&self, namespace: &str, group: u32, request: &Request, is_write: bool) -> Result<Response, ClientError> {
        let mut attempt = 0;
        let give_up_at = Instant::now() + self.config.retry_window;
        loop {
            let retry = |attempt: &mut u32| -> bool {
                *attempt += 1;
                if *attempt > self.config.retries_max || Instant::now() >= give_up_at {
                    return false;
                }
                std::thread::sleep(Duration::from_millis((25u64 << (*attempt).min(4)).min(400)));
                true
            };
            let Some(addr) = self.leader_address(namespace, group) else {
                if !retry(&mut attempt) {
                    return Err(ClientError::Server(ErrorReply::PartitionUnavailable));
                }
                let _ = self.refresh_map();
                continue;
            };
            match self.call(&addr, request) {
                Ok(Response::Error(ErrorReply::NotLeader { leader })) => {
                    if !retry(&mut attempt) {
                        return Err(ClientError::Server(ErrorReply::PartitionUnavailable));
                    }
                    match leader {
                        Some(leader) => self.set_leader(namespace, group, leader),
                        None => drop(self.refresh_map()),
                    }
                }
                Ok(Response::Error(reply)) => return Err(ClientError::Server(reply)),
                Ok(response) => return Ok(response),
                Err(CallError::NotSent) => {
                    if !retry(&mut attempt) {
                        return Err(ClientError::NoNodeReachable(vec![addr]));
                    }
                    // The leader is unreachable: ask another replica who leads now (a refreshed
                    // map would still name the dead node until the group elects a new leader).
                    self.forget_leader(namespace, group);
                }
                Err(CallError::Lost) if is_write => return Err(ClientError::Server(ErrorReply::Timeout { in_doubt: true })),
                Err(CallError::Lost) => {
                    if !retry(&mut attempt) {
                        return Err(ClientError::Server(ErrorReply::Timeout { in_doubt: false }));
                    }
                    let _ = self.refresh_map();
                }
            }
        }
    }

    fn call(&self, addr: &str, request: &Request) -> Result<Response, CallError> {
        let mut connection = match self.take_connection(addr) {
            Some(connection) => connection,
            None => BlockingConnection::connect(addr, self.config.timeout).map_err(|_| CallError::NotSent)?,
        };
        let deadline = Instant::now() + self.config.timeout;
        match connection.call(request, deadline) {
            Ok(response) => {
                self.return_connection(addr, connection);
                Ok(response)
            }
            Err(err) => Err(err),
        }
    }

    fn take_connection(&self, addr: &str) -> Option<BlockingConnection> {
        let mut pool = self.pool.lock().unwrap();
        if pool.0 != std::process::id() {
            // Forked: the inherited sockets are the parent's. Forget them without closing
            // them under the parent (leak the fds into the child rather than shut them down).
            for (_, connections) in pool.1.drain() {
                connections.into_iter().for_each(BlockingConnection::abandon);
            }
            pool.0 = std::process::id();
        }
        pool.1.get_mut(addr).and_then(Vec::pop)
    }

    fn return_connection(&self, addr: &str, connection: BlockingConnection) {
        let mut pool = self.pool.lock().unwrap();
        if pool.0 != std::process::id() {
            connection.abandon();
            return;
        }
        let idle = pool.1.entry(addr.to_owned()).or_default();
        if idle.len() < POOL_PER_NODE_MAX {
            idle.push(connection);
        }
    }
}

/// Why a call failed: before the request could have reached the server, or after.
pub(crate) enum CallError {
    NotSent,
    Lost,
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Server(ErrorReply::Internal(format!("unexpected response {response:?}")))
}
