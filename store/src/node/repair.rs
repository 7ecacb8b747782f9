//! Rebuilding a replica whose engine lost acknowledged records (a damaged device region found
//! by the start-up scan) from a peer's copy, without touching its Raft log or vote.
//!
//! The damaged node, before starting its groups, asks another replica of each of its groups for
//! a snapshot taken at or after its own durable applied point, in parts (`SnapshotPart`), and
//! installs it as Raft would install a snapshot: records the damaged copy lost or holds in an
//! older version come back, records it should no longer have are deleted. The log entries after
//! that point are still in its log and are applied again when the group starts. Its vote and
//! log stay as they were, so it never votes as if it held less (or more) than it acknowledged.
//!
//! Invariant: **a node whose engine scan found damage serves nothing from that namespace until
//! every group it replicates there has been rebuilt from a peer** (it keeps asking, and says so
//! in its log, while no peer can answer).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::Node;
use crate::protocol::{ErrorReply, Request, Response};
use crate::raft::{GroupStateMachine, NodeId};

/// Bytes of snapshot per `SnapshotPart` answer (well inside the frame limit).
const PART_BYTES: usize = 4 << 20;
/// A transfer nobody asked for a part of in this long is dropped with its file.
const TRANSFER_IDLE_MAX: Duration = Duration::from_secs(600);
/// How long a peer waits for its applied point to reach the one asked for.
const APPLIED_WAIT_MAX: Duration = Duration::from_secs(5);
/// Timeout of one part request (the first one builds the snapshot).
const PART_TIMEOUT: Duration = Duration::from_secs(60);

/// Snapshot files being sent to peers that rebuild their copies.
#[derive(Default)]
pub(crate) struct Transfers {
    open: Mutex<HashMap<u64, Transfer>>,
}

struct Transfer {
    meta: Vec<u8>,
    path: PathBuf,
    len: u64,
    last_used: Instant,
}

impl Transfers {
    fn insert(&self, meta: Vec<u8>, path: PathBuf, len: u64) -> u64 {
        let id = rand::random::<u64>();
        let mut open = self.open.lock().unwrap();
        open.retain(|_, t| {
            let keep = t.last_used.elapsed() < TRANSFER_IDLE_MAX;
            if !keep {
                let _ = std::fs::remove_file(&t.path);
            }
            keep
        });
        open.insert(id, Transfer { meta, path, len, last_used: Instant::now() });
        id
    }

    fn get(&self, id: u64) -> Option<(Vec<u8>, PathBuf, u64)> {
        let mut open = self.open.lock().unwrap();
        let transfer = open.get_mut(&id)?;
        transfer.last_used = Instant::now();
        Some((transfer.meta.clone(), transfer.path.clone(), transfer.len))
    }

    fn finish(&self, id: u64) {
        if let Some(transfer) = self.open.lock().unwrap().remove(&id) {
            let _ = std::fs::remove_file(transfer.path);
        }
    }
}

impl Drop for Transfers {
    fn drop(&mut self) {
        for (_, transfer) in self.open.get_mut().unwrap().drain() {
            let _ = std::fs::remove_file(transfer.path);
        }
    }
}

impl Node {
    /// Serves one part of a snapshot of `namespace/group` to a peer rebuilding its copy.
    pub(crate) async fn handle_snapshot_part(&self, namespace: &str, group: u32, min_applied: u64, transfer: Option<u64>, offset: u64) -> Response {
        let Some(state_machine) = self.namespaces().and_then(|n| n.get(namespace)).and_then(|h| h.group(group)).map(|g| g.state_machine.clone()) else {
            return Response::Error(ErrorReply::BadRequest(format!("this node does not replicate {namespace}/{group}")));
        };
        let id = match transfer {
            Some(id) => id,
            None => match self.start_transfer(&state_machine, min_applied).await {
                Ok(id) => id,
                Err(reply) => return Response::Error(reply),
            },
        };
        let Some((meta, path, len)) = self.transfers.get(id) else {
            return Response::Error(ErrorReply::BadRequest(format!("no snapshot transfer {id:016x} (it finished or expired)")));
        };
        let read = async {
            let mut file = tokio::fs::File::open(&path).await?;
            file.seek(std::io::SeekFrom::Start(offset)).await?;
            let mut data = vec![0u8; (len.saturating_sub(offset) as usize).min(PART_BYTES)];
            file.read_exact(&mut data).await?;
            Ok::<_, std::io::Error>(data)
        };
        match read.await {
            Ok(data) => {
                if offset + data.len() as u64 >= len {
                    self.transfers.finish(id);
                }
                Response::SnapshotPart { transfer: id, meta, total_len: len, data }
            }
            Err(err) => {
                self.transfers.finish(id);
                Response::Error(ErrorReply::Internal(format!("reading snapshot file {}: {err}", path.display())))
            }
        }
    }

    /// Writes a snapshot once this replica has applied `min_applied`, and opens a transfer.
    async fn start_transfer(&self, state_machine: &GroupStateMachine, min_applied: u64) -> Result<u64, ErrorReply> {
        let deadline = Instant::now() + APPLIED_WAIT_MAX;
        while state_machine.last_applied().map_or(0, |l| l.index) < min_applied {
            if Instant::now() >= deadline {
                return Err(ErrorReply::Timeout { in_doubt: false });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (meta, path) = state_machine.export_snapshot().await.map_err(|e| ErrorReply::Internal(e.to_string()))?;
        let len = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(err) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(ErrorReply::Internal(format!("snapshot file {}: {err}", path.display())));
            }
        };
        let meta = bincode::serialize(&meta).expect("snapshot metadata serializes");
        Ok(self.transfers.insert(meta, path, len))
    }

    /// Rebuilds this node's copy of `namespace/group` from one of its other `replicas`,
    /// asking them in turn until one succeeds.
    pub(crate) async fn rebuild_group(&self, namespace: &str, group: u32, replicas: &[NodeId], state_machine: &GroupStateMachine) {
        let me = self.config.node_id;
        let min_applied = state_machine.durable_applied().await.map_or(0, |l| l.index);
        let started = Instant::now();
        for round in 1u64.. {
            for &peer in replicas.iter().filter(|id| **id != me) {
                match self.fetch_snapshot(peer, namespace, group, min_applied, state_machine).await {
                    Ok(last) => {
                        tracing::warn!(
                            namespace,
                            group,
                            from = peer,
                            min_applied,
                            last_log = ?last,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "rebuilt this replica's copy of the group from a peer"
                        );
                        return;
                    }
                    Err(reason) => tracing::warn!(namespace, group, peer, %reason, "could not rebuild the group from this peer yet"),
                }
            }
            tokio::time::sleep(Duration::from_secs(round.min(5))).await;
        }
    }

    /// Fetches a snapshot of the group from `peer` and installs it. Returns its last log id.
    async fn fetch_snapshot(
        &self,
        peer: NodeId,
        namespace: &str,
        group: u32,
        min_applied: u64,
        state_machine: &GroupStateMachine,
    ) -> Result<Option<openraft::LogId<NodeId>>, String> {
        let connection = self.peers.get(&peer).ok_or_else(|| format!("node {peer} is not in the node list"))?;
        let mut file = state_machine.receive_file().await.map_err(|e| e.to_string())?;
        let (mut transfer, mut offset) = (None, 0u64);
        let meta = loop {
            let request = Request::SnapshotPart { namespace: namespace.to_owned(), group, min_applied, transfer, offset };
            match connection.call(&request, PART_TIMEOUT).await {
                Ok(Response::SnapshotPart { transfer: id, meta: part_meta, total_len, data }) => {
                    if transfer.is_some_and(|t| t != id) || (data.is_empty() && offset < total_len) {
                        return Err("the peer answered with another transfer or no data".into());
                    }
                    file.write_all(&data).await.map_err(|e| format!("writing the received snapshot: {e}"))?;
                    transfer = Some(id);
                    offset += data.len() as u64;
                    if offset >= total_len {
                        break part_meta;
                    }
                }
                Ok(Response::Error(reply)) => return Err(reply.to_string()),
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(err) => return Err(err.to_string()),
            }
        };
        file.flush().await.map_err(|e| e.to_string())?;
        let meta: openraft::SnapshotMeta<NodeId, openraft::BasicNode> = bincode::deserialize(&meta).map_err(|e| format!("malformed snapshot metadata: {e}"))?;
        let last = meta.last_log_id;
        if last.map_or(0, |l| l.index) < min_applied {
            return Err(format!("the snapshot ends at {last:?}, before this replica's applied index {min_applied}"));
        }
        state_machine.install_exported(&meta, file).await.map_err(|e| e.to_string())?;
        Ok(last)
    }
}
