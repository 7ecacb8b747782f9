//! Applications on a chunkfs mount while the cluster fails under them: an appender with
//! fdatasync keeps every acknowledged record through kill -9 of its file's group leader (and
//! its writes resume within seconds), and through a power cut of every node; the sqlite3 CLI
//! runs transactions in rollback-journal and WAL mode with `integrity_check` ok, and every
//! committed row survives kill -9 of sqlite3 mid-transaction.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore_tests::kill_sqlite_mid_transaction;
use chunkstore_tests::local::{chunkctl_ok, kill_node, status, Down};
use chunkstore_tests::mount::Mount;

const RECORD_BYTES: usize = 512;

/// A record: its sequence number, then a pattern derived from it, then a CRC of the rest.
fn record(seq: u64) -> [u8; RECORD_BYTES] {
    let mut r = [0u8; RECORD_BYTES];
    r[..8].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in r[8..RECORD_BYTES - 4].iter_mut().enumerate() {
        *b = (seq as usize * 31 + i) as u8;
    }
    let crc = crc32(&r[..RECORD_BYTES - 4]);
    r[RECORD_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    r
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Appends records with fdatasync after each, counting the records acknowledged in the file
/// (those there before included), until stopped or a call fails; notes when each was
/// acknowledged.
struct Appender {
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acked_at: Arc<std::sync::Mutex<Vec<Instant>>>,
    thread: Option<std::thread::JoinHandle<Option<std::io::Error>>>,
}

impl Appender {
    /// Starts at the record after those in the file.
    fn start(path: &Path) -> Appender {
        let (acked, stop, acked_at) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)), Arc::new(std::sync::Mutex::new(Vec::new())));
        let mut file = OpenOptions::new().create(true).append(true).open(path).unwrap();
        let first = file.metadata().unwrap().len() / RECORD_BYTES as u64;
        acked.store(first, Ordering::SeqCst);
        let thread = {
            let (acked, stop, acked_at) = (acked.clone(), stop.clone(), acked_at.clone());
            std::thread::spawn(move || {
                let mut seq = first;
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = file.write_all(&record(seq)).and_then(|_| file.sync_data()) {
                        return Some(e);
                    }
                    seq += 1;
                    acked.store(seq, Ordering::SeqCst);
                    acked_at.lock().unwrap().push(Instant::now());
                }
                None
            })
        };
        Appender { acked, stop, acked_at, thread: Some(thread) }
    }

    fn finish(&mut self) -> (u64, Option<std::io::Error>) {
        self.stop.store(true, Ordering::SeqCst);
        let error = self.thread.take().map(|t| t.join().unwrap()).unwrap_or(None);
        (self.acked.load(Ordering::SeqCst), error)
    }
}

/// Every acknowledged record is intact and in order; after them, only whole records or nothing.
fn check_journal(bytes: &[u8], acked: u64) {
    assert!(bytes.len() as u64 >= acked * RECORD_BYTES as u64, "{} bytes hold fewer than the {acked} acknowledged records", bytes.len());
    assert_eq!(bytes.len() % RECORD_BYTES, 0, "a torn record at the tail ({} bytes)", bytes.len());
    for (seq, chunk) in bytes.chunks(RECORD_BYTES).enumerate() {
        assert_eq!(chunk, &record(seq as u64)[..], "record {seq} of {} (acknowledged: {acked}) is not intact", bytes.len() / RECORD_BYTES);
    }
}

/// The node leading the group that holds `file`'s data (from its inode number).
fn leader_of_file(data: &Path, volume: &str, file: &Path) -> u64 {
    let ino = fs::metadata(file).unwrap().ino();
    let key = chunkfiles::keys::VolumeKeys::new(volume).size(ino);
    let st = status(data);
    let groups = st["groups"].as_array().unwrap();
    let count = groups.iter().filter(|g| g["namespace"] == "test").count() as u32;
    let group = chunkstore::raft::group_of(&key.digest, count);
    let entry = groups.iter().find(|g| g["namespace"] == "test" && g["group"] == group).unwrap();
    entry["leader"].as_u64().unwrap_or_else(|| panic!("group {group} has no leader: {entry}"))
}

/// kill -9 of the leader of the journal's group while it is appended with fdatasync: nothing
/// acknowledged is lost and writes resume within seconds; then a power cut of every node
/// (devices drop unsynced writes): nothing acknowledged is lost either.
#[test]
fn appends_survive_leader_kill_and_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    chunkctl_ok(&data, &["up", "--nodes", "3", "--chunkd-option", "test-power-loss-devices=true"]);
    let _down = Down(&data);
    let mut mount = Mount::new(&data, "vol", &dir.path().join("m"), &[]);
    let journal = mount.path.join("journal");
    fs::write(&journal, b"").unwrap();
    let leader = leader_of_file(&data, "vol", &journal);
    let mut appender = Appender::start(&journal);
    std::thread::sleep(Duration::from_secs(2));
    let before = appender.acked.load(Ordering::SeqCst);
    assert!(before > 20, "the appender made progress ({before})");
    let killed_at = Instant::now();
    kill_node(&data, leader);
    // Writes resume: the first acknowledgement after the kill.
    let deadline = killed_at + Duration::from_secs(30);
    let resumed = loop {
        if let Some(&t) = appender.acked_at.lock().unwrap().iter().find(|&&t| t > killed_at + Duration::from_millis(50)) {
            break t - killed_at;
        }
        assert!(Instant::now() < deadline, "no write was acknowledged within 30 s of killing node {leader}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("writes resumed {resumed:?} after kill -9 of node {leader}, the journal group's leader");
    chunkctl_ok(&data, &["up"]);
    std::thread::sleep(Duration::from_secs(1));
    let (acked, error) = appender.finish();
    assert!(error.is_none(), "the appender failed: {error:?}");
    check_journal(&fs::read(&journal).unwrap(), acked);

    // A power cut of every node while appending.
    let mut appender = Appender::start(&journal);
    std::thread::sleep(Duration::from_secs(2));
    for node in 1..=3 {
        let _ = Command::new("pkill").args(["-KILL", "-f", chunkstore_tests::local::node_config(&data, node).to_str().unwrap()]).status();
    }
    let (acked_in_all, _) = appender.finish();
    assert!(acked_in_all > acked, "the appender made progress before the power cut");
    chunkctl_ok(&data, &["up"]);
    mount.kill();
    let fresh = Mount::new(&data, "vol", &dir.path().join("m"), &[]);
    let bytes = fs::read(fresh.path.join("journal")).unwrap();
    check_journal(&bytes, acked_in_all);
}

fn sqlite(db: &Path, sql: &str) -> String {
    let output = Command::new("sqlite3").arg(db).arg(sql).output().expect("sqlite3 runs (./dev test installs it)");
    assert!(output.status.success(), "sqlite3 {sql:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// sqlite3 in rollback-journal and WAL mode: transactions, integrity, and kill -9 mid-transaction.
#[test]
fn sqlite_transactions_survive_kill_of_sqlite3() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    chunkctl_ok(&data, &["up", "--nodes", "3"]);
    let _down = Down(&data);
    let mount = Mount::new(&data, "vol", &dir.path().join("m"), &[]);
    for mode in ["delete", "wal"] {
        let db = mount.path.join(format!("bank-{mode}.db"));
        assert_eq!(sqlite(&db, &format!("PRAGMA journal_mode={mode};")), mode);
        sqlite(&db, "CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL); CREATE TABLE log(n INTEGER);");
        sqlite(&db, "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<100) INSERT INTO accounts SELECT i, 1000 FROM c;");
        for n in 0..20 {
            let from = n % 100 + 1;
            let to = (n * 7) % 100 + 1;
            sqlite(&db, &format!("BEGIN; UPDATE accounts SET balance=balance-10 WHERE id={from}; UPDATE accounts SET balance=balance+10 WHERE id={to}; INSERT INTO log VALUES({n}); COMMIT;"));
        }
        assert_eq!(sqlite(&db, "SELECT sum(balance), count(*) FROM accounts;"), "100000|100");
        assert_eq!(sqlite(&db, "PRAGMA integrity_check;"), "ok");
        // kill -9 of sqlite3 in the middle of a long transaction: committed rows stay, the
        // uncommitted ones never show.
        let child = Command::new("sqlite3").arg(&db).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        kill_sqlite_mid_transaction(child, &format!("PRAGMA journal_mode={mode};"));
        assert_eq!(sqlite(&db, "PRAGMA integrity_check;"), "ok", "{mode}: integrity after kill -9");
        assert_eq!(sqlite(&db, "SELECT sum(balance) FROM accounts;"), "100000", "{mode}: the killed transaction did not land");
        assert_eq!(sqlite(&db, "SELECT count(*) FROM log WHERE n < 1000000;"), "20", "{mode}: every committed transaction is there");
        assert_eq!(sqlite(&db, "SELECT count(*) FROM log WHERE n >= 1000000;"), "0", "{mode}: no uncommitted row");
    }
}
