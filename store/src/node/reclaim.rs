//! A node reclaims what a group that moved away left in its engine (`raft::forget` has the
//! steps and why they are safe).
//!
//! The metadata says when the group left (`roster::host_what_the_cluster_says`): the group
//! committed a membership without this node. The node then writes a marker file
//! (`DATA_DIR/leaving/NAMESPACE.GROUP`, synced), stops the replica, forgets it, and removes the
//! marker. A node that crashed in between finishes at its next start (`finish_interrupted`):
//! the marker, written while the metadata was current, says the group had left. Without the
//! marker a restarted node could not tell a group that left from one its own (possibly older)
//! copy of the metadata does not place here yet.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{namespace_wal_group, rejoin, Group, Node};
use crate::engine::Namespace;

/// Where the marker of `namespace`'s `group` lives.
fn marker_path(data_dir: &Path, namespace: &str, group: u32) -> PathBuf {
    data_dir.join("leaving").join(format!("{namespace}.{group}"))
}

fn write_marker(marker: &Path) -> std::io::Result<()> {
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::File::create(marker)?.sync_all()?;
    crate::device::sync_parent_dir(marker).map_err(|e| std::io::Error::other(e.to_string()))
}

fn remove_marker(marker: &Path) {
    match std::fs::remove_file(marker) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        // Left behind, it only makes the next start forget the group again (if still away).
        Err(err) => tracing::warn!(path = %marker.display(), %err, "could not remove a leaving marker"),
    }
}

impl Node {
    /// Stops this node's replica of `namespace`'s `group` (of `groups`), which the metadata
    /// moved away, and forgets it.
    pub(super) async fn leave_group(&self, namespace: &str, group: u32, groups: u32, engine: &Arc<Namespace>, stopped: Arc<Group>) {
        let marker = marker_path(&self.config.data_dir, namespace, group);
        if let Err(err) = write_marker(&marker) {
            tracing::warn!(namespace, group, %err, "cannot write a leaving marker: the replica's records are reclaimed only if this run gets to it");
        }
        stopped.state_machine.stop();
        let _ = stopped.raft.shutdown().await;
        tracing::info!(namespace, group, "the group moved away: its replica here stopped");
        drop(stopped);
        self.forget(namespace, group, groups, engine, &marker).await;
    }

    /// At start-up, before the groups start: finishes forgetting the replicas whose group left
    /// while the node was forgetting them (their marker is there). `hosted` is what the node's
    /// metadata places here: a marked group it places here came back, and is not forgotten.
    pub(super) async fn finish_interrupted(&self, namespace: &str, groups: u32, hosted: &[u32], engine: &Arc<Namespace>) {
        for group in 0..groups {
            let marker = marker_path(&self.config.data_dir, namespace, group);
            if !marker.exists() {
                continue;
            }
            match hosted.contains(&group) {
                true => remove_marker(&marker),
                false => {
                    tracing::info!(namespace, group, "finishing forgetting a replica whose group moved away before the node stopped");
                    self.forget(namespace, group, groups, engine, &marker).await;
                }
            }
        }
    }

    /// A move brings `namespace`'s `group` back before it was forgotten here: it is not.
    pub(super) fn keep_group(&self, namespace: &str, group: u32) {
        remove_marker(&marker_path(&self.config.data_dir, namespace, group));
    }

    async fn forget(&self, namespace: &str, group: u32, groups: u32, engine: &Arc<Namespace>, marker: &Path) {
        let (engine, wal) = (engine.clone(), self.wal.clone());
        let wal_group = namespace_wal_group(namespace, group);
        let snapshot_dir = self.config.data_dir.join("snapshots");
        let forgotten = tokio::task::spawn_blocking(move || {
            crate::raft::forget::forget_replica(&engine, &wal, wal_group, group, groups, &snapshot_dir)
        })
        .await;
        match forgotten {
            Ok(Ok(records)) => {
                tracing::info!(namespace, group, records, "the replica of a group that moved away is forgotten: its records' space is reclaimed");
                // It holds nothing now: should the group come back, an empty log makes it
                // catch up before it votes anyway.
                remove_marker(&rejoin::marker_path(&self.config.data_dir, namespace, group));
                remove_marker(marker);
            }
            Ok(Err(err)) => tracing::warn!(namespace, group, %err, "cannot forget the replica of a group that moved away (retried at the next start)"),
            Err(err) => tracing::warn!(namespace, group, %err, "forgetting a replica failed (retried at the next start)"),
        }
    }
}
