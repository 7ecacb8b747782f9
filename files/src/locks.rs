//! Locks in the cluster: POSIX record locks on byte ranges of a file, kept in the file's lock
//! table (a record in the file's own group, decided by the group: `raft::range_locks`), under
//! the mount's lease session.
//!
//! Invariants:
//! - **Every write of a mount goes in its lease session**, so once the cluster has fenced a
//!   session (its lease ran out), nothing it sends lands, however late it arrives.
//! - **A file this mount locked under a session is written under that session only**: when
//!   that session ends, writes to the file fail (EIO) instead of going on under a new session
//!   that never held its locks; files it never locked go on under the new one.
//! - **A descriptor opened under a session in which the mount took any lock writes under that
//!   session only** (`Volume::write_as`): the lock may guard other files than the one locked
//!   (a server's lock file and its journal), so once the cluster fenced the session, every
//!   descriptor opened under it fails its writes, as an NFSv4 client's open state ends with its
//!   lease. Descriptors opened afterwards write under the new session. (`chunkcheck files
//!   --workload failover` found the gap: a stopped server's late journal write landed after the
//!   standby had taken over, because only the lock file was pinned to the old session.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chunkstore_client::client::{ClientError, KeptSession};
use chunkstore_client::protocol::ErrorReply;
use chunkstore_client::{RangeLock, RangeLockKind};

use crate::error::{FsError, FsResult};
use crate::volume::{lock, Volume};

/// A lock a front asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
    Unlock,
}

/// The lock in the way of a test (F_GETLK): its range (inclusive), kind and holder's pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub start: u64,
    pub end: u64,
    pub exclusive: bool,
    pub pid: u32,
}

/// The mount's lease session, renewed by its own thread, and the files locked under each.
#[derive(Default)]
pub(crate) struct Lease {
    pub session: Option<Arc<KeptSession>>,
    pub ttl: Duration,
    /// Files with locks taken under a session, by inode: that session's id.
    pub locked: HashMap<u64, u64>,
    /// Sessions under which this mount took locks.
    pub lock_sessions: std::collections::HashSet<u64>,
}

/// How long a lock wait (F_SETLKW) sleeps between tries at most.
const LOCK_RETRY_MAX: Duration = Duration::from_millis(200);

impl Volume {
    /// Opens the mount's lease session (TTL `ttl`); writes and locks go in it from now on.
    pub fn start_lease(&self, ttl: Duration) -> FsResult<()> {
        let session = KeptSession::open(self.client.clone(), ttl, |err| tracing::warn!(error = %err, "renewing the mount's lease failed"))?;
        let mut lease = lock(&self.lease);
        lease.ttl = ttl;
        lease.session = Some(Arc::new(session));
        Ok(())
    }

    /// The session a descriptor opened now belongs to (`write_as`): the mount's current one.
    /// (When a new one cannot be opened now, the current one, ended or not.)
    pub fn open_session(&self) -> Option<u64> {
        self.session_for(None, None).unwrap_or_else(|_| lock(&self.lease).session.as_ref().map(|session| session.id()))
    }

    /// The session a write to `ino` goes in: the one its locks were taken under; else, for a
    /// descriptor opened under a session in which the mount took locks (`opened`), that one;
    /// else the mount's current one (a new one if the cluster ended the last).
    pub(crate) fn session_for(&self, ino: Option<u64>, opened: Option<u64>) -> FsResult<Option<u64>> {
        let mut lease = lock(&self.lease);
        if let Some(&session) = ino.and_then(|ino| lease.locked.get(&ino)) {
            return Ok(Some(session));
        }
        if let Some(session) = opened.filter(|session| lease.lock_sessions.contains(session)) {
            return Ok(Some(session));
        }
        match &lease.session {
            None => Ok(None),
            Some(current) if !current.expired() => Ok(Some(current.id())),
            Some(_) => {
                let ttl = lease.ttl;
                tracing::warn!("the mount's lease session ended (fenced by the cluster); opening a new one: files locked under the old one refuse writes until unlocked and locked again");
                let session = KeptSession::open(self.client.clone(), ttl, |err| tracing::warn!(error = %err, "renewing the mount's lease failed"))?;
                let id = session.id();
                lease.session = Some(Arc::new(session));
                Ok(Some(id))
            }
        }
    }

    /// Takes (waiting while another owner holds a conflicting lock, with `wait`), changes or
    /// gives back a byte-range lock of `owner` on file `ino`; `end` is inclusive.
    // The arguments are the POSIX lock request as FUSE and fcntl hand it over.
    #[allow(clippy::too_many_arguments)]
    pub fn lock_range(&self, ino: u64, owner: u64, pid: u32, start: u64, end: u64, kind: LockKind, wait: bool) -> FsResult<()> {
        if start > end {
            return Err(FsError::Invalid(format!("lock range {start}..={end}")));
        }
        let session = self.lock_session(ino, kind)?;
        let kind = match kind {
            LockKind::Shared => RangeLockKind::Shared,
            LockKind::Exclusive => RangeLockKind::Exclusive,
            LockKind::Unlock => RangeLockKind::Unlock,
        };
        let request = RangeLock { owner, pid, start, end, kind };
        let mut pause = Duration::from_millis(5);
        loop {
            match self.client.range_lock(session, &self.namespace, &self.keys.locks(ino), request) {
                Ok(()) => {
                    if kind != RangeLockKind::Unlock {
                        let mut lease = lock(&self.lease);
                        lease.locked.insert(ino, session);
                        lease.lock_sessions.insert(session);
                    }
                    return Ok(());
                }
                Err(ClientError::Server(ErrorReply::RangeLockHeld(_))) if wait => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(LOCK_RETRY_MAX);
                }
                Err(ClientError::Server(ErrorReply::RangeLockHeld(_))) => return Err(FsError::WouldBlock),
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// The session a lock request on `ino` goes in: an unlock in the one the file's locks were
    /// taken under, a new lock in the mount's current session (the file then moves to it).
    fn lock_session(&self, ino: u64, kind: LockKind) -> FsResult<u64> {
        if kind == LockKind::Unlock {
            if let Some(session) = lock(&self.lease).locked.get(&ino).copied() {
                return Ok(session);
            }
        }
        self.session_for(None, None)?.ok_or(FsError::NotSupported("locks need the mount's lease session"))
    }

    /// The lock of another owner that would block `exclusive` (or shared) lock of `owner` on the
    /// range, if any (F_GETLK).
    pub fn test_lock(&self, ino: u64, owner: u64, pid: u32, start: u64, end: u64, exclusive: bool) -> FsResult<Option<LockHolder>> {
        let session = self.session_for(None, None)?.ok_or(FsError::NotSupported("locks need the mount's lease session"))?;
        let request = RangeLock { owner, pid, start, end, kind: RangeLockKind::Test { exclusive } };
        match self.client.range_lock(session, &self.namespace, &self.keys.locks(ino), request) {
            Ok(()) => Ok(None),
            Err(ClientError::Server(ErrorReply::RangeLockHeld(held))) => {
                Ok(Some(LockHolder { start: held.start, end: held.end, exclusive: held.exclusive, pid: held.pid }))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Whether this mount took locks on `ino` (a close then gives back its owner's locks).
    pub fn has_locks(&self, ino: u64) -> bool {
        lock(&self.lease).locked.contains_key(&ino)
    }
}
