//! A node reclaims what a group that moved away left in its engine (`raft::forget` has the
//! steps and why they are safe).
//!
//! A group can leave a node in two ways: while the node runs its replica (the usual way), or
//! while the node is down or does not run the replica for another reason; then the node finds
//! a replica it does not run with a log or an applied point (`forget_left_behind`). Its copy of
//! the metadata must then be at least as new as the one that last brought the group here:
//! after a restart a node may hold older metadata (its own copy) than what it acted on before,
//! and a group a newer move brought here would look moved away. So the follow loop records
//! the metadata index at which it starts a replica a move brings (`DATA_DIR/hosting/NS.GROUP`),
//! and a replica it does not run is forgotten only from metadata at or past that index: a group
//! not placed here in metadata that already holds that move left again since.
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

/// Where the metadata index that last brought `namespace`'s `group` here is kept.
fn hosting_path(data_dir: &Path, namespace: &str, group: u32) -> PathBuf {
    data_dir.join("hosting").join(format!("{namespace}.{group}"))
}

fn write_marker(marker: &Path) -> std::io::Result<()> {
    write_synced(marker, b"")
}

/// Writes `bytes` to `path` (through a temporary file, so a crash leaves the old or the new
/// contents) and syncs it and its directory.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    crate::device::sync_parent_dir(path).map_err(|e| std::io::Error::other(e.to_string()))
}

/// The metadata index recorded in a hosting file: 0 without one; unreadable, `u64::MAX`
/// (never forgotten from metadata alone).
fn read_hosting(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(path = %path.display(), "unreadable hosting file: the replica is not forgotten while the node does not run it");
            u64::MAX
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => 0,
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "unreadable hosting file: the replica is not forgotten while the node does not run it");
            u64::MAX
        }
    }
}

fn remove_marker(marker: &Path) {
    match std::fs::remove_file(marker) {
        Ok(()) => {
            if let Err(err) = crate::device::sync_parent_dir(marker) {
                tracing::warn!(path = %marker.display(), %err, "could not sync a directory after removing a marker");
            }
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        // Left behind, it only makes the next start forget the group again (if still away).
        Err(err) => tracing::warn!(path = %marker.display(), %err, "could not remove a marker file (leaving or hosting)"),
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
        // openraft's state-machine worker may still apply what it had queued: wait for it.
        stopped.state_machine.close().await;
        tracing::info!(namespace, group, "the group moved away: its replica here stopped");
        if self.config.test_crash_while_leaving {
            tracing::error!(namespace, group, "test hook test-crash-while-leaving: aborting before the replica is forgotten");
            std::process::abort();
        }
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

    /// A move brings `namespace`'s `group` here, per metadata at index `cluster_applied`: a
    /// replica left behind earlier is not forgotten any more, and the index is recorded (see
    /// the module's comment). Fails if the index cannot be recorded: the replica must not start.
    pub(super) fn host_group(&self, namespace: &str, group: u32, cluster_applied: u64) -> std::io::Result<()> {
        remove_marker(&marker_path(&self.config.data_dir, namespace, group));
        let path = hosting_path(&self.config.data_dir, namespace, group);
        let recorded = read_hosting(&path);
        if recorded == u64::MAX || recorded >= cluster_applied {
            return Ok(());
        }
        write_synced(&path, cluster_applied.to_string().as_bytes())
    }

    /// Forgets this node's replica of `namespace`'s `group` (of `groups`), which the node does
    /// not run, if it holds a log or an applied point and the node's metadata (at index
    /// `cluster_applied`, not placing the group here) is at least as new as the move that last
    /// brought it here.
    pub(super) async fn forget_left_behind(&self, namespace: &str, group: u32, groups: u32, engine: &Arc<Namespace>, cluster_applied: u64) {
        let state = self.wal.log_state(namespace_wal_group(namespace, group));
        if state.last.is_none() && state.applied.is_none() {
            return;
        }
        if read_hosting(&hosting_path(&self.config.data_dir, namespace, group)) > cluster_applied {
            return;
        }
        let marker = marker_path(&self.config.data_dir, namespace, group);
        if let Err(err) = write_marker(&marker) {
            tracing::warn!(namespace, group, %err, "cannot write a leaving marker");
        }
        tracing::info!(namespace, group, "the group moved away while this node did not run its replica");
        self.forget(namespace, group, groups, engine, &marker).await;
    }

    async fn forget(&self, namespace: &str, group: u32, groups: u32, engine: &Arc<Namespace>, marker: &Path) {
        let (engine, wal) = (engine.clone(), self.wal.clone());
        let wal_group = namespace_wal_group(namespace, group);
        let snapshot_dir = self.config.data_dir.join("snapshots");
        let forgotten = tokio::task::spawn_blocking(move || crate::raft::forget::forget_replica(&engine, &wal, wal_group, group, groups, &snapshot_dir)).await;
        match forgotten {
            Ok(Ok(records)) => {
                tracing::info!(namespace, group, records, "the replica of a group that moved away is forgotten: its records' space is reclaimed");
                // It holds nothing now: should the group come back, an empty log makes it
                // catch up before it votes anyway.
                remove_marker(&rejoin::marker_path(&self.config.data_dir, namespace, group));
                remove_marker(&hosting_path(&self.config.data_dir, namespace, group));
                remove_marker(marker);
            }
            Ok(Err(err)) => tracing::warn!(namespace, group, %err, "cannot forget the replica of a group that moved away (retried at the next start)"),
            Err(err) => tracing::warn!(namespace, group, %err, "forgetting a replica failed (retried at the next start)"),
        }
    }
}
