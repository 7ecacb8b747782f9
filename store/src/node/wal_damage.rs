//! A node whose write-ahead log is corrupt: damage that no crash can leave (a record that fails
//! its checksum with synced flushes after it, a damaged header, a bad record in an older
//! segment; see `wal::recovery`).
//!
//! The log may have lost entries this node acknowledged, votes it cast and the points its
//! engine's state rests on, and which groups the damaged bytes belonged to cannot be known
//! (the group field is under the same failed checksum). Cutting the log at the damage, as a
//! torn tail, would let this node vote as if it held less than it acknowledged: with the write
//! also missing from a lagging replica, the two would elect a leader without it. So the node
//! rebuilds from its peers, the way a node whose data directory was wiped does (`rejoin`): its
//! data directory is set aside whole (the log, the engine devices in it, snapshots, markers)
//! under `DATA_DIR/damaged/UNIX-SECONDS/`, with a `REPORT` saying why, and the node starts
//! empty; each of its replicas neither votes nor campaigns until a leader has caught it up.
//!
//! Invariant: **a node never starts on a WAL found corrupt**: it rebuilds from its peers, or
//! (engine devices outside the data directory, which it cannot set aside) refuses to start and
//! says what to do.

use std::path::{Path, PathBuf};

use super::{NamespaceSpec, NodeError};
use crate::wal::WalError;

/// The directory, inside the data directory, holding what was set aside.
pub(crate) const DAMAGED_DIR: &str = "damaged";

/// Moves everything in `data_dir` but `damaged/` into `damaged/UNIX-SECONDS/` (the WAL
/// last, so that a crash part way leaves a log that is still found corrupt and the move is
/// finished at the next start), writes the report, syncs both directories. Returns the
/// directory the data went to.
pub(crate) fn set_aside(data_dir: &Path, namespaces: &[NamespaceSpec], err: &WalError) -> Result<PathBuf, NodeError> {
    let outside: Vec<String> = namespaces
        .iter()
        .flat_map(|ns| ns.engine.devices.iter())
        .filter(|device| !device.path.starts_with(data_dir))
        .map(|device| device.path.display().to_string())
        .collect();
    if !outside.is_empty() {
        return Err(NodeError::Config(format!(
            "{err}. This node must be rebuilt from its peers, but its engine devices {} are outside its data directory, which it cannot set aside itself: stop the node, move {} aside, wipe those devices (or give it new ones), then start it: it rebuilds from its peers",
            outside.join(", "),
            data_dir.display()
        )));
    }
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let damaged = data_dir.join(DAMAGED_DIR);
    let mut target = damaged.join(seconds.to_string());
    let mut suffix = 1;
    while target.exists() {
        target = damaged.join(format!("{seconds}.{suffix}"));
        suffix += 1;
    }
    let io = |what: String| move |e: std::io::Error| NodeError::Config(format!("{err}; setting the data directory aside failed ({what}: {e})"));
    std::fs::create_dir_all(&target).map_err(io(format!("creating {}", target.display())))?;
    let report = format!(
        "chunkd found its write-ahead log corrupt at start-up:\n\n  {err}\n\nEverything that was in {} was moved here, and the node started empty: it rebuilds\nits replicas from its peers and votes again only once caught up. Keep this directory to\nexamine the damage; delete it to free its space.\n",
        data_dir.display()
    );
    std::fs::write(target.join("REPORT"), report).map_err(io("writing the report".into()))?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .map_err(io(format!("reading {}", data_dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.file_name().is_some_and(|name| name != DAMAGED_DIR))
        .collect();
    entries.sort_by_key(|path| path.file_name().is_some_and(|name| name == "wal"));
    for path in &entries {
        let to = target.join(path.file_name().expect("a directory entry has a name"));
        std::fs::rename(path, &to).map_err(io(format!("moving {} to {}", path.display(), to.display())))?;
    }
    // The parents of these: the new directory, `damaged/`, the data directory.
    for inside in [target.join("REPORT"), target.clone(), damaged.clone()] {
        crate::device::sync_parent_dir(&inside).map_err(|e| NodeError::Config(format!("{err}; syncing the directory of {} failed: {e}", inside.display())))?;
    }
    tracing::error!(
        %err,
        set_aside = %target.display(),
        "the write-ahead log is corrupt: the data directory was set aside and this node rebuilds from its peers"
    );
    Ok(target)
}
