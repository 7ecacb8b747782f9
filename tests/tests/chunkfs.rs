//! chunkfs with real chunkd processes and real mounts: what one mount writes and closes another
//! reads; write-temp-then-rename never shows a missing or half file; holes, truncate, links,
//! symlinks and unlinked-but-open files behave as POSIX says; bad input gets its errno; a
//! remount shows everything; SIGTERM unmounts cleanly; a killed chunkfs loses no acknowledged
//! write; an unreachable cluster is EIO (never a hang) and the mount works again once it is
//! back; stop-writes is ENOSPC with nothing written.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore_tests::local::{chunkctl_ok, Down};
use chunkstore_tests::mount::Mount;

fn up(dir: &Path, extra: &[&str]) {
    let mut args = vec!["up", "--nodes", "3"];
    args.extend_from_slice(extra);
    chunkctl_ok(dir, &args);
}

fn errno_of(err: &std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or(0)
}

/// Two mounts of one volume, POSIX basics, atomic rename-over, remount.
#[test]
fn two_mounts_see_one_volume_and_posix_holds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    up(&data, &[]);
    let _down = Down(&data);
    let mut a = Mount::new(&data, "vol", &dir.path().join("a"), &[]);
    let b = Mount::new(&data, "vol", &dir.path().join("b"), &[]);
    let (pa, pb) = (a.path.clone(), b.path.clone());

    // What one mount writes and closes, the other reads.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(pa.join("shared.bin"), &payload).unwrap();
    assert_eq!(fs::read(pb.join("shared.bin")).unwrap(), payload, "mount b reads what mount a wrote and closed");
    // An overwrite on b shows on a at the next open.
    let f = OpenOptions::new().write(true).open(pb.join("shared.bin")).unwrap();
    f.write_all_at(b"XYZ", 1000).unwrap();
    drop(f);
    let again = fs::read(pa.join("shared.bin")).unwrap();
    assert_eq!(&again[1000..1003], b"XYZ");
    assert_eq!(again.len(), payload.len());

    // Holes read as zeros; truncate shrinks and grows with zeros, never old bytes.
    let f = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(pa.join("sparse")).unwrap();
    f.write_all_at(b"end", 10 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), (10 << 20) + 3);
    let mut hole = vec![1u8; 4096];
    f.read_exact_at(&mut hole, 5 << 20).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "a hole reads as zeros");
    f.write_all_at(&[9u8; 200_000], 0).unwrap();
    f.set_len(100).unwrap();
    f.set_len(150_000).unwrap();
    let mut grown = vec![0u8; 150_000];
    f.read_exact_at(&mut grown, 0).unwrap();
    assert!(grown[..100].iter().all(|&b| b == 9) && grown[100..].iter().all(|&b| b == 0), "bytes cut by truncate do not come back");
    drop(f);

    // Hard links and symlinks.
    fs::write(pa.join("orig"), b"linked").unwrap();
    fs::hard_link(pa.join("orig"), pa.join("link")).unwrap();
    assert_eq!(fs::metadata(pa.join("orig")).unwrap().nlink(), 2);
    fs::remove_file(pa.join("orig")).unwrap();
    assert_eq!(fs::read(pb.join("link")).unwrap(), b"linked");
    std::os::unix::fs::symlink("link", pa.join("sym")).unwrap();
    assert_eq!(fs::read_link(pb.join("sym")).unwrap(), Path::new("link"));
    assert_eq!(fs::read(pa.join("sym")).unwrap(), b"linked");

    // An unlinked file that is still open keeps its data until the last close.
    let mut open = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(pa.join("doomed")).unwrap();
    open.write_all(b"still here").unwrap();
    fs::remove_file(pa.join("doomed")).unwrap();
    assert!(!pa.join("doomed").exists());
    let mut back = String::new();
    open.read_to_string(&mut back).unwrap(); // at the end already: nothing
    let mut buf = vec![0u8; 10];
    open.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"still here", "data of an unlinked open file stays readable");
    drop(open);

    // Directories: rmdir of a non-empty one, rename of a directory, no moving into itself.
    fs::create_dir_all(pa.join("d1/d2")).unwrap();
    assert_eq!(errno_of(&fs::remove_dir(pa.join("d1")).unwrap_err()), libc::ENOTEMPTY);
    assert_eq!(errno_of(&fs::rename(pa.join("d1"), pa.join("d1/d2/d3")).unwrap_err()), libc::EINVAL);
    fs::rename(pa.join("d1"), pa.join("moved")).unwrap();
    assert!(pb.join("moved/d2").is_dir());
    assert_eq!(fs::metadata(pa.join("moved")).unwrap().nlink(), 3);

    // Bad input gets its errno.
    let long = "n".repeat(256);
    assert_eq!(errno_of(&File::create(pa.join(&long)).unwrap_err()), libc::ENAMETOOLONG);
    File::create(pa.join("n".repeat(255))).unwrap();
    let f = OpenOptions::new().create(true).truncate(false).write(true).open(pa.join("huge")).unwrap();
    f.write_all_at(b"x", (1 << 40) - 1).unwrap();
    assert_eq!(errno_of(&f.write_all_at(b"x", 1 << 40).unwrap_err()), libc::EFBIG);
    assert_eq!(errno_of(&f.set_len((1 << 40) + 1).unwrap_err()), libc::EFBIG);
    assert_eq!(f.metadata().unwrap().len(), 1 << 40);
    f.set_len(0).unwrap();
    drop(f);

    // Write-temp-then-rename: a reader on the other mount always finds a whole version.
    fs::write(pa.join("config"), vec![b'0'; 20_000]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, path) = (stop.clone(), pb.join("config"));
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::SeqCst) {
                let bytes = fs::read(&path).unwrap_or_else(|e| panic!("the file went missing during rename-over: {e}"));
                assert_eq!(bytes.len(), 20_000, "a half-written file was visible");
                assert!(bytes.iter().all(|&b| b == bytes[0]), "a mixed file was visible");
                reads += 1;
            }
            reads
        })
    };
    for round in 1..=30u8 {
        let tmp = pa.join("config.tmp");
        fs::write(&tmp, vec![b'0' + round % 10; 20_000]).unwrap();
        fs::rename(&tmp, pa.join("config")).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let reads = reader.join().expect("reader saw only whole files");
    assert!(reads > 0);

    // SIGTERM unmounts cleanly; a fresh mount shows everything.
    assert!(a.unmount(), "SIGTERM unmounts cleanly");
    let a2 = Mount::new(&data, "vol", &dir.path().join("a"), &[]);
    assert_eq!(fs::read(a2.path.join("shared.bin")).unwrap(), again);
    assert_eq!(fs::read(a2.path.join("config")).unwrap(), vec![b'0'; 20_000]);
    let listing: Vec<String> = fs::read_dir(&a2.path).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(!listing.iter().any(|n| n == "doomed" || n == "orig" || n == "config.tmp"), "{listing:?}");
    assert_eq!(chunkctl_fs(&data, &["fsck", "vol"])["problems"].as_array().map(Vec::len), Some(0), "the volume is consistent");
}

fn chunkctl_fs(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["fs"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = chunkctl_ok(dir, &all);
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("chunkctl fs {args:?} printed {out:?}: {e}"))
}

/// A killed chunkfs loses no acknowledged write; the README's way of clearing its mountpoint
/// works, and a fresh mount goes on.
#[test]
fn killed_chunkfs_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    up(&data, &[]);
    let _down = Down(&data);
    let path = dir.path().join("m");
    let mut mount = Mount::new(&data, "vol", &path, &[]);
    let acked = Arc::new(std::sync::Mutex::new(0u64));
    let writer = {
        let (acked, file) = (acked.clone(), path.join("journal"));
        std::thread::spawn(move || {
            let mut f = OpenOptions::new().create(true).append(true).open(&file).unwrap();
            for i in 0u64.. {
                let mut record = [0u8; 512];
                record[..8].copy_from_slice(&i.to_le_bytes());
                if f.write_all(&record).and_then(|_| f.sync_data()).is_err() {
                    return;
                }
                *acked.lock().unwrap() = i + 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    mount.kill();
    let _ = writer.join();
    let acked = *acked.lock().unwrap();
    assert!(acked > 10, "the writer made progress before the kill ({acked})");
    let fresh = Mount::new(&data, "vol", &path, &[]);
    let bytes = fs::read(fresh.path.join("journal")).unwrap();
    assert!(bytes.len() as u64 >= acked * 512, "{} bytes for {acked} acknowledged records", bytes.len());
    for i in 0..acked {
        let at = (i * 512) as usize;
        assert_eq!(u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()), i, "record {i}");
    }
}

/// With the cluster down, a write fails with EIO within the client's retry window instead of
/// hanging, and the same mount works again once the cluster is back.
#[test]
fn unreachable_cluster_is_eio_then_the_mount_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    up(&data, &[]);
    let _down = Down(&data);
    let mount = Mount::new(&data, "vol", &dir.path().join("m"), &["--request-timeout-ms", "500"]);
    let file = mount.path.join("f");
    fs::write(&file, b"before").unwrap();
    let f = OpenOptions::new().write(true).custom_flags(libc::O_DSYNC).open(&file).unwrap();
    chunkctl_ok(&data, &["down"]);
    let started = Instant::now();
    let err = f.write_all_at(b"during", 0).unwrap_err();
    assert_eq!(errno_of(&err), libc::EIO, "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "EIO came after {:?}", started.elapsed());
    chunkctl_ok(&data, &["up"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f.write_all_at(b"after!", 0) {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("the mount did not work again once the cluster was back: {e}"),
        }
    }
    drop(f);
    assert_eq!(fs::read(&file).unwrap(), b"after!");
}

/// Stop-writes reaches an application as ENOSPC, with nothing of the refused write kept.
#[test]
fn stop_writes_is_enospc_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    up(&data, &["--device-size", &(24u64 << 20).to_string(), "--groups", "4"]);
    let _down = Down(&data);
    let mount = Mount::new(&data, "vol", &dir.path().join("m"), &[]);
    let mut acknowledged = 0u64;
    let mut refused = None;
    for i in 0..400u64 {
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(mount.path.join(format!("f{}", i % 8))).unwrap();
        let chunk = vec![(i % 251) as u8; 256 << 10];
        let at = f.metadata().unwrap().len();
        match f.write_all_at(&chunk, at) {
            Ok(()) => acknowledged += chunk.len() as u64,
            Err(e) => {
                refused = Some((e, i % 8, at));
                break;
            }
        }
    }
    let (err, file, size_before) = refused.expect("the device filled up");
    assert_eq!(errno_of(&err), libc::ENOSPC, "{err}");
    let size_after = fs::metadata(mount.path.join(format!("f{file}"))).unwrap().len();
    assert_eq!(size_after, size_before, "a refused write leaves the size as it was");
    assert!(acknowledged > 0);
}

/// Peak resident memory of a process, in bytes (VmHWM).
fn peak_rss_bytes(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Writes 300 MiB to one file in 1 MiB writes (no fsync).
fn write_300_mib(path: &Path) {
    let mut f = File::create(path).unwrap();
    let block = vec![7u8; 1 << 20];
    for _ in 0..300 {
        f.write_all(&block).unwrap();
    }
}

/// `--durability fsync`: writes are held until fsync (another mount does not see them, this one
/// does), fsync commits them, kill -9 loses only what was never synced, a failed commit is EIO
/// on every descriptor open then, and memory stays bounded in both modes.
#[test]
fn fsync_mode_holds_writes_until_synced_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    up(&data, &["--device-size", &(1u64 << 30).to_string()]);
    let _down = Down(&data);
    let mut a = Mount::new(&data, "vol", &dir.path().join("a"), &["--durability", "fsync", "--dirty-mib-max", "8"]);
    let b = Mount::new(&data, "vol", &dir.path().join("b"), &[]);
    let mut f = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(a.path.join("f")).unwrap();
    f.write_all(b"synced;").unwrap();
    f.sync_data().unwrap();
    f.write_all(b"held").unwrap();
    assert_eq!(fs::read(b.path.join("f")).unwrap(), b"synced;", "another mount sees only what was synced");
    assert_eq!(fs::read(a.path.join("f")).unwrap(), b"synced;held", "this mount reads its held writes");
    assert_eq!(f.metadata().unwrap().len(), 11);
    drop(f);
    // Close commits.
    assert_eq!(fs::read(b.path.join("f")).unwrap(), b"synced;held", "close committed the held write");
    let mut f = OpenOptions::new().append(true).open(a.path.join("f")).unwrap();
    f.write_all(b"-lost").unwrap();
    a.kill();
    let mut a = Mount::new(&data, "vol", &dir.path().join("a"), &["--durability", "fsync", "--dirty-mib-max", "8"]);
    assert_eq!(fs::read(a.path.join("f")).unwrap(), b"synced;held", "kill -9 lost only what was never synced");

    // A region written over and over holds each byte once: 16 passes over 1 MiB (one commit
    // entry's worth of chunks) in 4 KiB writes, under a limit the passes do not reach, commit
    // as one MiB at fsync (they were once held pass by pass, and the 16 MiB entry was too
    // large to send: EIO after the retry window, on a healthy cluster).
    {
        let mut c = Mount::new(&data, "vol", &dir.path().join("c"), &["--durability", "fsync", "--dirty-mib-max", "64"]);
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(c.path.join("rewritten")).unwrap();
        for pass in 1..=16u8 {
            for block in 0..256u64 {
                f.write_all_at(&[pass; 4096], block * 4096).unwrap();
            }
        }
        f.sync_data().expect("the held passes commit");
        drop(f);
        let read = fs::read(b.path.join("rewritten")).unwrap();
        assert_eq!(read.len(), 1 << 20);
        assert!(read.iter().all(|byte| *byte == 16), "another mount reads the last pass");
        // One byte at every other offset over 1 MiB: 524,288 held pieces, whose operations
        // alone outweigh a frame (a commit cut by chunks only sent 17 MB and got EIO).
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(c.path.join("sparse-held")).unwrap();
        for k in 0..(1u64 << 19) {
            f.write_all_at(&[(k % 251) as u8 + 1], 2 * k).unwrap();
        }
        f.sync_data().expect("half a million held pieces commit");
        drop(f);
        let read = fs::read(b.path.join("sparse-held")).unwrap();
        assert_eq!(read.len(), (1 << 20) - 1);
        assert!(
            read.iter().enumerate().all(|(i, byte)| *byte == if i % 2 == 0 { ((i as u64 / 2) % 251) as u8 + 1 } else { 0 }),
            "another mount reads every piece"
        );
        c.unmount();
    }

    // Memory: 300 MiB written without a sync holds at most 8 MiB; write mode holds nothing.
    write_300_mib(&a.path.join("big-held"));
    write_300_mib(&b.path.join("big-written"));
    for (mount, mode) in [(&a, "fsync"), (&b, "write")] {
        let peak = peak_rss_bytes(mount.pid());
        eprintln!("chunkfs --durability {mode}: peak RSS {} MiB after writing 300 MiB", peak >> 20);
        assert!(peak < 120 << 20, "chunkfs --durability {mode} peaked at {} MiB writing 300 MiB", peak >> 20);
    }
    assert_eq!(fs::metadata(b.path.join("big-held")).unwrap().len(), 300 << 20, "the held file was committed (close)");

    // A failed commit: EIO from fsync on every descriptor open on the file then.
    let mut one = OpenOptions::new().write(true).open(a.path.join("f")).unwrap();
    let two = OpenOptions::new().write(true).open(a.path.join("f")).unwrap();
    one.write_all(b"held").unwrap();
    // (Starting chunkctl closes inherited descriptors at exec: a close, which commits what is
    // held. The doomed write is held after the cluster went down.)
    chunkctl_ok(&data, &["down"]);
    one.write_all(b"doomed").unwrap();
    // A fork-then-exec closes the child's copies of both descriptors: each close commits (and
    // fails) and reports EIO there, and must not use up the failure the parent's fsync
    // reports (it once did, when another test's child happened to do this: a CI failure).
    assert!(std::process::Command::new("true").status().unwrap().success());
    assert_eq!(errno_of(&one.sync_data().unwrap_err()), libc::EIO);
    assert_eq!(errno_of(&two.sync_data().unwrap_err()), libc::EIO, "the other descriptor hears of the failure too");
    chunkctl_ok(&data, &["up"]);
    drop((one, two));
    a.unmount();
}

/// `chunkctl fs fsck` finds a dangling entry, a wrong link count and an orphaned inode with its
/// data (each made by writing the volume's records directly), `--repair` fixes them, and a
/// second check finds nothing.
#[test]
fn fsck_finds_and_repairs_a_damaged_volume() {
    use chunkfiles::keys::VolumeKeys;
    use chunkfiles::records::{encode, FileSize, Inode, Kind, BIN_DATA, BIN_INODE};
    use chunkstore::client::{Client, ClientConfig};
    use chunkstore::{Bin, Value, WritePolicy};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    up(&data, &[]);
    let _down = Down(&data);
    let mut mount = Mount::new(&data, "vol", &dir.path().join("m"), &[]);
    fs::write(mount.path.join("a"), b"linked").unwrap();
    fs::hard_link(mount.path.join("a"), mount.path.join("b")).unwrap();
    fs::write(mount.path.join("c"), b"soon dangling").unwrap();
    let (ino_a, ino_c) = (fs::metadata(mount.path.join("a")).unwrap().ino(), fs::metadata(mount.path.join("c")).unwrap().ino());
    assert!(mount.unmount());
    let fsck = |repair: bool| {
        let mut args = vec!["fs", "fsck", "vol", "--json"];
        if repair {
            args.push("--repair");
        }
        let out = chunkstore_tests::local::chunkctl(&data, &args);
        let report: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("")).unwrap();
        (out.status.code(), report)
    };
    assert_eq!(fsck(false).1["problems"].as_array().unwrap().len(), 0, "a clean volume");

    let client = Client::connect(ClientConfig::new(chunkstore_tests::local::seeds(&data))).unwrap();
    let keys = VolumeKeys::new("vol");
    let policy = WritePolicy { ttl: chunkstore::Ttl::NeverExpire, ..WritePolicy::default() };
    // A dangling entry: c's inode goes.
    client.delete("test", &keys.inode(ino_c), &WritePolicy::default()).unwrap();
    // A wrong link count: a's inode says 5.
    let record = client.get("test", &keys.inode(ino_a), None).unwrap().unwrap();
    let Some(Value::Bytes(bytes)) = record.bin(BIN_INODE) else { panic!("inode bin") };
    let mut inode: Inode = chunkfiles::records::decode(bytes, "a").unwrap();
    inode.nlink = 5;
    client.put("test", &keys.inode(ino_a), vec![Bin::new(BIN_INODE, Value::Bytes(encode(&inode).unwrap()))], &policy).unwrap();
    // An orphaned inode with data, created long ago, that no entry reaches.
    let orphan = 100;
    inode.kind = Kind::File;
    inode.nlink = 1;
    inode.crtime_ns = 1;
    client.put("test", &keys.inode(orphan), vec![Bin::new(BIN_INODE, Value::Bytes(encode(&inode).unwrap()))], &policy).unwrap();
    let mut size = FileSize { size: 5000, ..FileSize::default() };
    size.add_extent(0, 1);
    client.put("test", &keys.size(orphan), size.bins(), &policy).unwrap();
    client.put("test", &keys.chunk(orphan, 0), vec![Bin::new(BIN_DATA, Value::Bytes(vec![1; 5000]))], &policy).unwrap();

    let (code, report) = fsck(false);
    let problems: Vec<String> = report["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
    assert_eq!(code, Some(1), "problems left: exit 1 ({problems:?})");
    assert!(problems.iter().any(|p| p.contains(&format!("names inode {ino_c} that does not exist"))), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains(&format!("inode {ino_a}: link count 5 but 2 links"))), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("inode 100: unreachable, holding 5000 bytes")), "{problems:?}");
    let (code, report) = fsck(true);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["repaired"].as_u64(), Some(problems.len() as u64));
    assert_eq!(fsck(false).1["problems"].as_array().unwrap().len(), 0, "repaired");
    assert!(client.get("test", &keys.chunk(orphan, 0), None).unwrap().is_none(), "the orphan's chunk was freed");
    assert!(client.get("test", &keys.size(orphan), None).unwrap().is_none(), "the orphan's size record was freed");
    let fresh = Mount::new(&data, "vol", &dir.path().join("m"), &[]);
    assert_eq!(fs::metadata(fresh.path.join("a")).unwrap().nlink(), 2);
    assert!(!fresh.path.join("c").exists());
}
