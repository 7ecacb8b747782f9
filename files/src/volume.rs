//! A volume: opening or creating it, attributes, and the helpers its operations share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use chunkstore_client::client::{Client, ClientError};
use chunkstore_client::ops::{BatchWrite, GenerationPolicy, Operation, RecordExistsAction, Ttl, WriteOp, WritePolicy};
use chunkstore_client::protocol::{ErrorReply, ReadPolicy};
use chunkstore_client::value::{Bin, Record, RecordMeta, Value};
use chunkstore_client::Key;

use crate::error::{FsError, FsResult};
use crate::keys::VolumeKeys;
use crate::records::*;

/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;
/// The longest name of a directory entry, in bytes.
pub const NAME_BYTES_MAX: usize = 255;
/// The longest symlink target, in bytes.
pub const SYMLINK_TARGET_BYTES_MAX: usize = 4095;
/// The filesystem type statfs reports for a volume's files under libchunkpreload ("chun"):
/// how a program tells the shim serves a path.
pub const PRELOAD_FS_TYPE: i64 = 0x6368_756e;
/// The largest file: 1 TiB.
pub const FILE_BYTES_MAX: u64 = 1 << 40;
/// The most hard links an inode may have.
pub const LINKS_MAX: u32 = 65_000;
/// A volume's chunk size unless it is created with another (see ARCHITECTURE.md for why).
pub const CHUNK_BYTES_DEFAULT: u32 = 16 << 10;
/// The largest chunk size a volume may be created with (well inside a record).
pub const CHUNK_BYTES_MAX: u32 = 512 << 10;
/// How many times an operation that lost a race with another writer is tried again.
pub(crate) const CONFLICT_RETRIES_MAX: u32 = 64;
/// Inode numbers a mount reserves from the volume record at a time.
const INODES_RESERVED_AT_ONCE: i64 = 256;

/// Locks a mutex, taking over one a panicking thread left (the data it guards is rebuilt from
/// the cluster when in doubt: every cache here can be dropped).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// What a front shows of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// 512-byte blocks the data takes (chunks allocated, rounded up).
    pub blocks: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub crtime_ns: i64,
}

/// A time `setattr` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(i64),
}

impl TimeSet {
    pub(crate) fn resolve(self, now: i64) -> i64 {
        match self {
            TimeSet::Now => now,
            TimeSet::At(ns) => ns,
        }
    }
}

/// What `setattr` changes (None: leave as is).
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

/// The per-file state a mount keeps: held while writing the file (writes to one file are
/// ordered), with the size record as last written or read (None: read it again).
#[derive(Default)]
pub(crate) struct FileState {
    pub size: Option<FileSize>,
    /// Writes not committed yet (`--durability fsync`).
    pub dirty: crate::buffered::Dirty,
    /// Writes to the file whose commit failed, counted under this state's lock by the thread
    /// that saw the failure: an fsync that waited for that commit sees the count go up.
    pub failed_writes: u64,
}

/// A volume of the file layer, as one mount (or one process of the shim) sees it. Every method
/// blocks until the cluster answered; all are safe to call from many threads.
pub struct Volume {
    pub(crate) client: Arc<Client>,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) keys: VolumeKeys,
    pub(crate) chunk_bytes: u64,
    /// The lease session writes and locks go in (their fence refuses them once it ended).
    pub(crate) lease: Mutex<crate::locks::Lease>,
    /// Inode numbers reserved for this mount: [next, end).
    inodes: Mutex<(u64, u64)>,
    /// Serializes this mount's namespace changes (other mounts are caught by generations).
    pub(crate) tree: Mutex<()>,
    pub(crate) files: Mutex<HashMap<u64, Arc<Mutex<FileState>>>>,
    /// With `--durability fsync`: how many bytes writes may hold uncommitted (None: every
    /// write commits before it returns), and how many they hold now.
    pub(crate) buffered: Option<usize>,
    pub(crate) dirty_bytes: std::sync::atomic::AtomicUsize,
}

pub(crate) fn never_expire(exists: RecordExistsAction, generation: GenerationPolicy) -> WritePolicy {
    WritePolicy { exists, generation, ttl: Ttl::NeverExpire }
}

/// Checks a name for a directory entry.
pub fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_BYTES_MAX {
        return Err(FsError::NameTooLong(name.len()));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid(format!("{:?} cannot name an entry", String::from_utf8_lossy(name))));
    }
    Ok(())
}

/// A directory entry with its name.
pub type NamedEntry = (Vec<u8>, Entry);

impl Volume {
    /// Opens volume `name` of `namespace`; creates it first (with chunks of `create`, bytes) if
    /// it does not exist and `create` is given.
    pub fn open(client: Arc<Client>, namespace: &str, name: &str, create: Option<u32>) -> FsResult<Volume> {
        if name.is_empty() || name.len() > 200 || name.contains(['/', '\0']) {
            return Err(FsError::Invalid(format!("volume name {name:?}: 1 to 200 bytes, no '/'")));
        }
        let keys = VolumeKeys::new(name);
        let mut record = linearizable_get(&client, namespace, &keys.volume())?;
        if record.is_none() {
            let Some(chunk_bytes) = create else {
                return Err(FsError::NotFound);
            };
            match Volume::create(&client, namespace, name, chunk_bytes) {
                Ok(()) | Err(FsError::Exists) => {}
                Err(err) => return Err(err),
            }
            record = linearizable_get(&client, namespace, &keys.volume())?;
        }
        let record = record.ok_or(FsError::NotFound)?;
        let format = int_bin(&record, BIN_FORMAT);
        if format != VOLUME_FORMAT {
            return Err(FsError::Corrupt(format!("volume {name} has format {format}; this build reads format {VOLUME_FORMAT}")));
        }
        let chunk_bytes = int_bin(&record, BIN_CHUNK_BYTES);
        if chunk_bytes <= 0 || chunk_bytes % 512 != 0 || chunk_bytes > CHUNK_BYTES_MAX as i64 {
            return Err(FsError::Corrupt(format!("volume {name} has chunk size {chunk_bytes}")));
        }
        Ok(Volume {
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            keys,
            chunk_bytes: chunk_bytes as u64,
            lease: Mutex::new(Default::default()),
            inodes: Mutex::new((0, 0)),
            tree: Mutex::new(()),
            files: Mutex::new(HashMap::new()),
            buffered: None,
            dirty_bytes: Default::default(),
        })
    }

    /// Creates volume `name` with its root directory: `Exists` if it is there.
    pub fn create(client: &Client, namespace: &str, name: &str, chunk_bytes: u32) -> FsResult<()> {
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(512) || chunk_bytes > CHUNK_BYTES_MAX {
            return Err(FsError::Invalid(format!("chunk size {chunk_bytes}: a multiple of 512 up to {CHUNK_BYTES_MAX}")));
        }
        let keys = VolumeKeys::new(name);
        let now = now_ns();
        let root = Volume::new_inode(Kind::Dir, 0o755, crate::tree::Owner { uid: 0, gid: 0 }, ROOT_INO, now);
        let create_only = never_expire(RecordExistsAction::CreateOnly, GenerationPolicy::None);
        let writes = vec![
            BatchWrite {
                key: keys.volume(),
                op: WriteOp::Put(vec![
                    Bin::new(BIN_FORMAT, Value::Int(VOLUME_FORMAT)),
                    Bin::new(BIN_CHUNK_BYTES, Value::Int(chunk_bytes as i64)),
                    Bin::new(BIN_NEXT_INO, Value::Int(ROOT_INO as i64 + 1)),
                    Bin::new(BIN_CREATED, Value::Int(now)),
                ]),
                policy: create_only,
            },
            BatchWrite { key: keys.inode(ROOT_INO), op: WriteOp::Put(vec![Bin::new(BIN_INODE, Value::Bytes(encode(&root)?))]), policy: create_only },
        ];
        match client.write_batch(namespace, writes, None) {
            Ok(_) => Ok(()),
            Err(chunkstore_client::client::ClientError::Server(chunkstore_client::protocol::ErrorReply::RecordExists)) => Err(FsError::Exists),
            Err(err) => Err(err.into()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A tree or size record as the cluster holds it now: a linearizable read, confirmed with a
    /// quorum by the group's leader. A session read could be answered by a replica that has
    /// not applied another mount's fsync yet (a mount has seen nothing of a file it never
    /// touched), and a mount must see what another mount synced before it asked. The file's
    /// chunks share the size record's group, so the chunk reads that follow (session reads)
    /// are never older than the size they are read under.
    pub(crate) fn get(&self, key: &Key) -> FsResult<Option<Record>> {
        linearizable_get(&self.client, &self.namespace, key)
    }

    /// Applies writes of one group as one entry, in the mount's lease session (for a file's
    /// data: the session its locks were taken under, `ino`). `Conflict` when a generation
    /// check failed.
    pub(crate) fn batch(&self, ino: Option<u64>, writes: Vec<BatchWrite>) -> FsResult<RecordMeta> {
        self.batch_as(None, ino, writes)
    }

    /// `batch` for a descriptor opened under session `opened` (`locks.rs`, `write_as`).
    pub(crate) fn batch_as(&self, opened: Option<u64>, ino: Option<u64>, writes: Vec<BatchWrite>) -> FsResult<RecordMeta> {
        let session = self.session_for(ino, opened)?;
        Ok(self.client.write_batch(&self.namespace, writes, session)?)
    }

    /// An inode's tree record and its generation; `NotFound` if there is none.
    pub(crate) fn read_inode(&self, ino: u64) -> FsResult<(Inode, u32)> {
        let record = self.get(&self.keys.inode(ino))?.ok_or(FsError::NotFound)?;
        let bytes = bytes_bin(&record, BIN_INODE).ok_or_else(|| FsError::Corrupt(format!("inode {ino} has no {BIN_INODE} bin")))?;
        Ok((decode(bytes, &format!("inode {ino}"))?, record.meta.generation))
    }

    /// A regular file's size record as the cluster holds it now.
    pub(crate) fn read_size(&self, ino: u64) -> FsResult<FileSize> {
        FileSize::from_record(self.get(&self.keys.size(ino))?.as_ref())
    }

    /// A fresh inode number (from this mount's reserved range, reserving more when it ran out).
    pub(crate) fn allocate_ino(&self) -> FsResult<u64> {
        let mut range = lock(&self.inodes);
        if range.0 >= range.1 {
            let ops = vec![Operation::Add { bin: BIN_NEXT_INO.into(), delta: INODES_RESERVED_AT_ONCE }, Operation::Read { bin: BIN_NEXT_INO.into() }];
            let policy = never_expire(RecordExistsAction::UpdateOnly, GenerationPolicy::None);
            let (_, results) = self.client.operate(&self.namespace, &self.keys.volume(), ops, &policy)?;
            let end = match results.first().and_then(|r| r.value.as_ref()) {
                Some(Value::Int(end)) if *end > INODES_RESERVED_AT_ONCE => *end as u64,
                other => return Err(FsError::Corrupt(format!("volume record's {BIN_NEXT_INO} read {other:?}"))),
            };
            *range = (end - INODES_RESERVED_AT_ONCE as u64, end);
        }
        let ino = range.0;
        range.0 += 1;
        Ok(ino)
    }

    /// The mount's state of a file.
    pub(crate) fn file(&self, ino: u64) -> Arc<Mutex<FileState>> {
        lock(&self.files).entry(ino).or_default().clone()
    }

    /// How many writes to the file failed to commit since the mount began: a front compares it
    /// with what a descriptor saw before, to report EIO to every descriptor open then.
    pub fn failed_writes(&self, ino: u64) -> u64 {
        let file = lock(&self.files).get(&ino).cloned();
        file.map_or(0, |file| lock(&file).failed_writes)
    }

    /// Counts a write to the file that failed to commit (a front's write-through `write`).
    pub fn note_failed_write(&self, ino: u64) {
        lock(&self.file(ino)).failed_writes += 1;
    }

    /// Forgets what this mount cached of a file (on open: another mount may have written it).
    pub fn invalidate(&self, ino: u64) {
        if let Some(file) = lock(&self.files).get(&ino).cloned() {
            lock(&file).size = None;
        }
    }

    pub(crate) fn attr_of(&self, ino: u64, inode: &Inode) -> FsResult<Attr> {
        let mut attr = Attr {
            ino,
            kind: inode.kind,
            perm: inode.perm,
            nlink: inode.nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: inode.rdev,
            size: 0,
            blocks: 0,
            atime_ns: inode.atime_ns,
            mtime_ns: inode.mtime_ns,
            ctime_ns: inode.ctime_ns,
            crtime_ns: inode.crtime_ns,
        };
        match inode.kind {
            Kind::File => {
                let size = self.read_size(ino)?;
                if size.generation != 0 {
                    attr.size = size.size;
                    attr.mtime_ns = size.mtime_ns;
                    attr.ctime_ns = attr.ctime_ns.max(size.ctime_ns);
                }
                if let Some((dirty_size, written_ns)) = self.dirty_size(ino) {
                    attr.size = dirty_size;
                    attr.mtime_ns = written_ns;
                    attr.ctime_ns = attr.ctime_ns.max(written_ns);
                }
                attr.blocks = attr.size.div_ceil(512);
            }
            Kind::Symlink => attr.size = inode.target.len() as u64,
            Kind::Dir => attr.size = 4096,
            _ => {}
        }
        Ok(attr)
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let (inode, _) = self.read_inode(ino)?;
        self.attr_of(ino, &inode)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_BYTES_MAX {
            return Err(FsError::NameTooLong(name.len()));
        }
        let (dir, _) = self.read_inode(parent)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let entry = dir.entries.get(name).ok_or(FsError::NotFound)?;
        self.getattr(entry.ino)
    }

    /// A directory's entries (without "." and ".."), and its parent.
    pub fn readdir(&self, ino: u64) -> FsResult<(u64, Vec<NamedEntry>)> {
        let (dir, _) = self.read_inode(ino)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok((dir.parent, dir.entries.into_iter().collect()))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (inode, _) = self.read_inode(ino)?;
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        Ok(inode.target)
    }

    /// The orphan list: inodes without links whose data waits until no mount has them open,
    /// with when a mount last said it had one open (or it lost its last link).
    pub fn orphans(&self) -> FsResult<Vec<(u64, i64)>> {
        match self.get(&self.keys.orphans())? {
            None => Ok(Vec::new()),
            Some(record) => match bytes_bin(&record, BIN_ORPHANS) {
                Some(bytes) => decode(bytes, "orphan list"),
                None => Ok(Vec::new()),
            },
        }
    }
}

impl Volume {
    /// The inode a path names from the root ("/a/b"), without following a final symlink
    /// (lstat's view; symlinks on the way are not followed either).
    pub fn resolve(&self, path: &str) -> FsResult<Attr> {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                ino = self.readdir(ino)?.0;
                continue;
            }
            ino = self.lookup(ino, part.as_bytes())?.ino;
        }
        self.getattr(ino)
    }
}

/// A linearizable read of `key`, asked again within the client's retry window while the
/// group's leader cannot confirm it still leads (`Timeout` not in doubt: an election under
/// way) or no quorum answers: a read changes nothing, so it is always safe to ask again, and
/// a session read at such a moment would have been answered (perhaps stale) rather than fail.
fn linearizable_get(client: &Client, namespace: &str, key: &Key) -> FsResult<Option<Record>> {
    let give_up_at = std::time::Instant::now() + client.config().retry_window;
    let mut pause = std::time::Duration::from_millis(25);
    loop {
        match client.get_with(namespace, key, None, ReadPolicy::Linearizable) {
            Err(ClientError::Server(ErrorReply::Timeout { in_doubt: false } | ErrorReply::PartitionUnavailable))
                if std::time::Instant::now() + pause < give_up_at =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(400));
            }
            answered => return Ok(answered?),
        }
    }
}
