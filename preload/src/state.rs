//! The process's connection to the cluster: one client and one `Volume` per mapping, opened
//! (and the volume created) at the first mapped call, each with its own lease session.
//!
//! fork: the child starts with no connection (the parent's sockets and lease session stay the
//! parent's; the child opens its own at its first mapped call, so a child that only execs
//! costs nothing). The locks are taken before fork and released on both sides
//! (`pthread_atfork`), so the child never inherits one held by a thread that does not exist
//! there.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chunkfiles::{Volume, CHUNK_BYTES_DEFAULT};
use chunkstore_client::client::{Client, ClientConfig};
use parking_lot::Mutex;

use crate::config::{Config, Durability};
use crate::{log, Res};

static CONFIG: OnceLock<Config> = OnceLock::new();

/// What this process opened of the cluster (None: not yet, or forked since).
#[derive(Default)]
struct Connection {
    client: Option<Arc<Client>>,
    volumes: Vec<Option<Arc<Volume>>>,
}

static CONNECTION: Mutex<Connection> = Mutex::new(Connection { client: None, volumes: Vec::new() });

/// Cannot fail: every hook reaches the shim's state only once `lib::init` has marked it
/// active, which it does after `install` has set the configuration.
pub(crate) fn config() -> &'static Config {
    CONFIG.get().expect("the shim is active only once configured")
}

/// Keeps the configuration and registers the fork handlers (from the constructor).
pub(crate) fn install(config: Config) {
    let _ = CONFIG.set(config);
    crate::table::set_owner();
    crate::table::adopt_inherited();
    if self::config().durability == Durability::Fsync {
        // SAFETY: registering a plain function.
        unsafe { libc::atexit(commit_at_exit) };
    }
    // SAFETY: handlers that only take and release the shim's own locks.
    unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork_parent), Some(after_fork_child)) };
}

/// Mapping `index`'s volume, connecting and opening (creating) it on first use.
pub(crate) fn volume(index: usize) -> Res<Arc<Volume>> {
    let config = config();
    let mut connection = CONNECTION.lock();
    if let Some(Some(volume)) = connection.volumes.get(index) {
        return Ok(volume.clone());
    }
    let client = match &connection.client {
        Some(client) => client.clone(),
        None => {
            let mut client_config = ClientConfig::new(config.seeds.clone());
            client_config.timeout = Duration::from_millis(config.request_timeout_ms);
            client_config.source = config.source;
            let client = Client::connect(client_config).map_err(|e| {
                log(&format!("connecting to the cluster at {}: {e}", config.seeds.join(",")));
                libc::EIO
            })?;
            let client = Arc::new(client);
            connection.client = Some(client.clone());
            client
        }
    };
    let (prefix, name) = &config.maps[index];
    let mut volume = Volume::open(client, &config.namespace, name, Some(CHUNK_BYTES_DEFAULT)).map_err(|e| {
        log(&format!("opening volume {name} (mapped at {prefix}) in namespace {}: {e}", config.namespace));
        e.errno()
    })?;
    if config.durability == Durability::Fsync {
        volume.set_buffered(config.dirty_mib_max << 20);
    }
    volume.start_lease(Duration::from_millis(config.lease_ms)).map_err(|e| {
        log(&format!("opening a lease session for volume {name}: {e}"));
        e.errno()
    })?;
    let volume = Arc::new(volume);
    start_reaper(index, &volume);
    if connection.volumes.len() <= index {
        connection.volumes.resize(index + 1, None);
    }
    connection.volumes[index] = Some(volume.clone());
    Ok(volume)
}

/// Starts the thread that renews the orphans (files unlinked while open) this process holds
/// open on mapping `index`'s volume and frees those no mount or process renewed for
/// `ORPHAN_GRACE_NS` (`Volume::reap`), every `ORPHAN_REAP_PERIOD`, as every chunkfs mount does:
/// without it, a file a program unlinked and kept using would be freed under it by any mount's
/// reaper. It ends when the volume is dropped; a forked child starts its own with its volume.
fn start_reaper(index: usize, volume: &Arc<Volume>) {
    let volume = Arc::downgrade(volume);
    let started = std::thread::Builder::new().name("chunkpreload-reap".into()).spawn(move || loop {
        std::thread::sleep(chunkfiles::ORPHAN_REAP_PERIOD);
        let Some(volume) = volume.upgrade() else { return };
        let is_open = |ino: u64| crate::table::holds(index, ino);
        // A panic must not end the thread: renewals would stop, and what this process holds
        // would be freed under it.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| volume.reap(&is_open))) {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => log(&format!("renewing and freeing unlinked files failed (tried again later): {err}")),
            Err(_) => log("renewing and freeing unlinked files panicked (tried again later)"),
        }
    });
    if let Err(err) = started {
        log(&format!("could not start the thread that keeps unlinked open files: {err}"));
    }
}

/// Every volume opened so far (syncfs, sync).
pub(crate) fn opened_volumes() -> Vec<Arc<Volume>> {
    CONNECTION.lock().volumes.iter().flatten().cloned().collect()
}

/// `durability fsync`: at exit (and at the end of main) what writes hold is committed, as the
/// kernel's page cache would have kept it past the process's end; `_exit` and kill -9 lose it,
/// as a crash does.
extern "C" fn commit_at_exit() {
    let _: libc::c_int = crate::shim("exit", || {
        for volume in opened_volumes() {
            if let Err(err) = volume.flush_all() {
                log(&format!("committing held writes at exit failed: {err}"));
            }
        }
        Ok(0)
    });
}

extern "C" fn before_fork() {
    std::mem::forget(CONNECTION.lock());
    crate::table::before_fork();
}

extern "C" fn after_fork_parent() {
    crate::table::after_fork(false);
    // SAFETY: locked by `before_fork` on this thread, its guard forgotten.
    unsafe { CONNECTION.force_unlock() };
}

extern "C" fn after_fork_child() {
    crate::table::after_fork(true);
    // SAFETY: locked by `before_fork` on the thread that forked (the child's only thread).
    unsafe { CONNECTION.force_unlock() };
    // The parent's client, volumes and lease sessions are the parent's: forgotten here (not
    // dropped: dropping would close the parent's session), the child opens its own.
    let old = std::mem::take(&mut *CONNECTION.lock());
    std::mem::forget(old);
}
