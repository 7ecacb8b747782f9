//! Engine behaviour beyond the model: group commit, limits, TTLs, tombstones, corruption,
//! bad files and failed devices.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::device::{Device, MemDevice};
use chunkstore::{Bin, DeviceConfig, Error, Key, Namespace, NamespaceConfig, OpenOptions, Operation, Ttl, Value, WritePolicy};
use common::{small_config, Disks, HookedDevice, ManualClock};

fn bytes_bin(len: usize, fill: u8) -> Vec<Bin> {
    vec![Bin::new("b", Value::Bytes(vec![fill; len]))]
}

fn put(ns: &Namespace, k: i64, len: usize, fill: u8) -> chunkstore::Result<chunkstore::RecordMeta> {
    ns.put(&Key::new("s", k), &bytes_bin(len, fill), &WritePolicy::default())
}

/// A put that waits out stop-writes while defragmentation frees space, as a client would.
fn put_retrying(ns: &Namespace, k: i64, len: usize, fill: u8) {
    wait_until("stop-writes to clear", || match put(ns, k, len, fill) {
        Ok(_) => true,
        Err(Error::StopWrites { .. }) => false,
        Err(err) => panic!("put {k}: {err}"),
    });
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn mem_open(config: &NamespaceConfig, devices: Vec<Arc<dyn Device>>, clock: Option<Arc<dyn chunkstore::Clock>>) -> Namespace {
    Namespace::open(config.clone(), OpenOptions { devices: Some(devices), clock, ..Default::default() }).unwrap()
}

#[test]
fn concurrent_writers_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let config = NamespaceConfig::new("gc", vec![DeviceConfig { path: dir.path().join("gc.dat"), size: Some(64 << 20) }]);
    let ns = Arc::new(Namespace::open(config, OpenOptions::default()).unwrap());
    let threads: Vec<_> = (0..32)
        .map(|t| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    put(&ns, t * 1000 + i, 4096, t as u8).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = ns.stats();
    let per_write = stats.fsyncs as f64 / stats.writes as f64;
    eprintln!("{} writes, {} fsyncs: {per_write:.3} per write", stats.writes, stats.fsyncs);
    assert_eq!(stats.writes, 32 * 40);
    assert!(per_write < 0.5, "group commit should share fsyncs: {per_write:.3} per write");
    assert_eq!(ns.get(&Key::new("s", 31_039i64), None).unwrap().unwrap().bin("b"), Some(&Value::Bytes(vec![31; 4096])));
}

#[test]
fn full_device_reaches_stop_writes_then_resumes_after_deletes() {
    let config = small_config(1, 32);
    let mut disks = Disks::new(&config, 1);
    let ns = disks.open(&config, None).unwrap();
    let mut written = 0;
    let err = loop {
        match put(&ns, written, 20_000, 1) {
            Ok(_) => written += 1,
            Err(err) => break err,
        }
        assert!(written < 1000, "a 2 MiB device cannot take 20 MB");
    };
    match &err {
        Error::StopWrites { reason, .. } => assert!(reason.contains("free blocks"), "{reason}"),
        other => panic!("expected StopWrites, got {other}"),
    }
    // Reads go on, deletes go on.
    assert!(ns.get(&Key::new("s", 0i64), None).unwrap().is_some());
    for k in 0..written - 5 {
        ns.delete(&Key::new("s", k), &WritePolicy::default()).unwrap();
    }
    // Defragmentation frees the space and writes resume by themselves.
    wait_until("writes to resume", || put(&ns, 5000, 20_000, 2).is_ok());
    for k in written - 5..written {
        assert_eq!(ns.get(&Key::new("s", k), None).unwrap().unwrap().bin("b"), Some(&Value::Bytes(vec![1; 20_000])));
    }
    assert!(ns.stats().defrag_blocks > 0);
}

#[test]
fn memory_budget_reaches_stop_writes() {
    let mut config = small_config(1, 64);
    config.memory_size = 1 << 20;
    config.stop_writes_pct = 1; // 10 KB of index: about 160 records
    let mut disks = Disks::new(&config, 2);
    let ns = disks.open(&config, None).unwrap();
    let mut written = 0;
    let err = loop {
        match put(&ns, written, 10, 1) {
            Ok(_) => written += 1,
            Err(err) => break err,
        }
        assert!(written < 10_000);
    };
    assert!(matches!(&err, Error::StopWrites { reason, .. } if reason.contains("stop-writes-pct")), "{err}");
    assert!((150..=170).contains(&written), "{written} records before stop-writes");
    ns.delete(&Key::new("s", 0i64), &WritePolicy::default()).expect("deletes go on under stop-writes");
}

#[test]
fn buffered_writes_past_max_write_cache_fail_at_once() {
    let mut config = small_config(1, 64);
    config.commit_to_device = false;
    config.max_write_cache = 2 * 64 * 1024;
    // Every sync takes 200 ms, so writes pile up in the cache.
    let mut device = HookedDevice::new(Arc::new(MemDevice::new("slow", 64 * 64 * 1024)));
    device.sync = Box::new(|| {
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
    });
    let device = Arc::new(device);
    let ns = mem_open(&config, vec![device], None);
    let started = Instant::now();
    let mut acked = 0;
    let err = loop {
        match put(&ns, acked, 8000, 3) {
            Ok(_) => acked += 1,
            Err(err) => break err,
        }
    };
    assert!(matches!(err, Error::DeviceOverload { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_millis(150), "the refusal must be immediate, not queued");
    assert!(acked >= 10, "{acked}");
    ns.flush().unwrap();
    put(&ns, 9999, 8000, 3).expect("writes are accepted again once the cache drained");
    for k in 0..acked {
        assert!(ns.get(&Key::new("s", k), None).unwrap().is_some());
    }
}

#[test]
fn expired_records_vanish_at_once_and_never_come_back() {
    let config = small_config(1, 32);
    let clock = ManualClock::at_secs(1_700_000_000);
    let mut disks = Disks::new(&config, 3);
    let ns = disks.open(&config, Some(clock.clone())).unwrap();
    let key = Key::new("s", 1i64);
    // An older version without TTL, then a newer one with a TTL.
    ns.put(&key, &bytes_bin(100, 1), &WritePolicy::default()).unwrap();
    let ttl = WritePolicy { ttl: Ttl::Seconds(10), ..Default::default() };
    let meta = ns.put(&key, &bytes_bin(100, 2), &ttl).unwrap();
    assert_eq!(meta.void_time_secs, 1_700_000_010);
    clock.advance_secs(9);
    assert!(ns.get(&key, None).unwrap().is_some());
    clock.advance_secs(2);
    assert!(ns.get(&key, None).unwrap().is_none(), "invisible as soon as the void time passes");
    wait_until("expiry to be reclaimed", || ns.stats().expired == 1);
    disks.crash(ns);
    let ns = disks.open(&config, Some(clock.clone())).unwrap();
    assert!(ns.get(&key, None).unwrap().is_none(), "the older version must not come back");
}

#[test]
fn deleted_records_stay_deleted_through_defrag_and_power_cuts() {
    let config = small_config(1, 24);
    let mut disks = Disks::new(&config, 4);
    let mut ns = disks.open(&config, None).unwrap();
    for k in 0..50 {
        put(&ns, k, 5000, k as u8).unwrap();
    }
    for k in 0..25 {
        ns.delete(&Key::new("s", k), &WritePolicy::default()).unwrap();
    }
    // Churn the live half so every old block is defragmented and tombstones get dropped.
    for round in 0..8u8 {
        for k in 25..50 {
            put_retrying(&ns, k, 5000, round);
        }
        if round % 3 == 2 {
            disks.crash(ns);
            ns = disks.open(&config, None).unwrap();
        }
    }
    wait_until("tombstones to be dropped", || ns.stats().tombstones_dropped > 0 || ns.stats().tombstones == 0);
    disks.crash(ns);
    let ns = disks.open(&config, None).unwrap();
    for k in 0..25 {
        assert!(ns.get(&Key::new("s", k), None).unwrap().is_none(), "deleted key {k} came back");
    }
    for k in 25..50 {
        assert_eq!(ns.get(&Key::new("s", k), None).unwrap().unwrap().bin("b"), Some(&Value::Bytes(vec![7; 5000])));
    }
}

/// Device offsets of the runs of 64 `fill` bytes (inside the records written with it).
fn runs(mem: &MemDevice, fill: u8) -> Vec<u64> {
    let mut all = vec![0u8; mem.size_bytes() as usize];
    mem.read_at(&mut all, 0).unwrap();
    let runs: Vec<u64> = all.windows(64).enumerate().filter(|(_, w)| w.iter().all(|&b| b == fill)).map(|(at, _)| at as u64).collect();
    assert!(!runs.is_empty(), "the record is on the device");
    runs
}

/// Device offset of the first run of 64 `fill` bytes (inside the record written with it).
fn find_run(mem: &MemDevice, fill: u8) -> u64 {
    runs(mem, fill)[0]
}

#[test]
fn corrupt_record_is_never_returned() {
    let config = small_config(1, 16);
    let mem = Arc::new(MemDevice::new("dev0", 16 * 64 * 1024));
    let ns = mem_open(&config, vec![mem.clone()], None);
    put(&ns, 1, 1000, 1).unwrap();
    put(&ns, 2, 1000, 2).unwrap();
    ns.close().unwrap();
    mem.corrupt(find_run(&mem, 1), 4);
    let ns = mem_open(&config, vec![mem.clone()], None);
    assert_eq!(ns.stats().scan.checksum_mismatches, 1);
    assert!(ns.get(&Key::new("s", 1i64), None).unwrap().is_none(), "a record failing its checksum is skipped");
    assert!(ns.get(&Key::new("s", 2i64), None).unwrap().is_some());
    // Corruption after start-up is caught on read.
    put(&ns, 3, 1000, 3).unwrap();
    ns.flush().unwrap();
    drop(ns);
    let ns = mem_open(&config, vec![mem.clone()], None);
    let key3 = Key::new("s", 3i64);
    assert!(ns.get(&key3, None).unwrap().is_some());
    mem.corrupt(find_run(&mem, 3), 2);
    match ns.get(&key3, None) {
        Err(Error::Corrupt { what, .. }) => assert!(what.contains("checksum"), "{what}"),
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

/// Twenty 5000-byte records (1..=12 fill the first 64 KiB block, which is sealed with its
/// trailer; 13..=20 are in the open block), made durable, then record 21 written after the
/// durable point. Returns the device and the durable points.
fn durable_point_scenario(config: &NamespaceConfig) -> (Arc<MemDevice>, Vec<chunkstore::DurablePoint>) {
    let mem = Arc::new(MemDevice::new("dev0", 16 * 64 * 1024));
    let ns = mem_open(config, vec![mem.clone()], None);
    for k in 1..=20 {
        put(&ns, k, 5000, k as u8).unwrap();
    }
    let points = ns.flush_to_durable_point().unwrap();
    put(&ns, 21, 5000, 21).unwrap();
    ns.close().unwrap();
    (mem, points)
}

/// Did a reopen (with these durable points) report lost acknowledged records?
fn reopen_finds_loss(config: &NamespaceConfig, mem: &Arc<MemDevice>, points: Option<Vec<chunkstore::DurablePoint>>) -> bool {
    let options = OpenOptions { devices: Some(vec![mem.clone() as Arc<dyn Device>]), durable_points: points, ..Default::default() };
    let ns = Namespace::open(config.clone(), options).unwrap();
    let lost = ns.lost_acknowledged_records();
    ns.close().unwrap();
    lost
}

/// The start-up scan tells damage to records that were durable from a torn tail: a record of
/// a sealed block (its trailer says what the block holds) or of the open block below the
/// durable point is a loss; the record written after the durable point is not. A device with
/// another id than the points name was replaced: a loss too.
#[test]
fn damage_below_the_durable_point_is_told_from_a_torn_tail() {
    let config = small_config(1, 16);
    let (mem, points) = durable_point_scenario(&config);
    assert!(!reopen_finds_loss(&config, &mem, Some(points.clone())), "nothing was damaged");
    // That start-up sealed the open block and synced it: record 21 is durable now.
    mem.corrupt(find_run(&mem, 21), 4);
    assert!(reopen_finds_loss(&config, &mem, Some(points.clone())), "record 21 was sealed by the last start-up");

    let (mem, points) = durable_point_scenario(&config);
    mem.corrupt(find_run(&mem, 21), 4);
    assert!(!reopen_finds_loss(&config, &mem, Some(points.clone())), "a torn record after the durable point is no loss");
    assert!(!reopen_finds_loss(&config, &mem, Some(points.clone())), "nor in the next life");

    let (mem, points) = durable_point_scenario(&config);
    mem.corrupt(find_run(&mem, 3), 4);
    assert!(reopen_finds_loss(&config, &mem, None), "the sealed block's trailer shows the loss without points");
    assert!(reopen_finds_loss(&config, &mem, Some(points)));

    // (Each start-up seals the open block as it finds it: a fresh scenario per judgement.)
    let (mem, _) = durable_point_scenario(&config);
    mem.corrupt(find_run(&mem, 15), 4);
    assert!(!reopen_finds_loss(&config, &mem, None), "without points the open block's tail cannot be judged");
    let (mem, points) = durable_point_scenario(&config);
    mem.corrupt(find_run(&mem, 15), 4);
    assert!(reopen_finds_loss(&config, &mem, Some(points.clone())), "a record of the open block below the durable point");
    assert!(reopen_finds_loss(&config, &mem, Some(points.clone())), "a damaged block is not sealed: the loss shows again");

    // A whole record of the sealed block zeroed (no fault to see: only its trailer's count).
    let (mem, points) = durable_point_scenario(&config);
    let data = find_run(&mem, 5);
    let mut before = vec![0u8; 256];
    mem.read_at(&mut before, data - 256).unwrap();
    let header_at = data - 256 + before.windows(4).rposition(|w| w == b"CKRC").expect("the record's header precedes its data") as u64;
    mem.write_at(&vec![0u8; (data + 5000 - header_at) as usize], header_at).unwrap();
    let ns = mem_open(&config, vec![mem.clone()], None);
    let scan = ns.stats().scan;
    assert_eq!((scan.checksum_mismatches, scan.garbage_regions, scan.torn_records), (0, 0, 0), "a zeroed record leaves no fault");
    ns.close().unwrap();
    assert!(reopen_finds_loss(&config, &mem, Some(points.clone())), "a record zeroed out of a sealed block");

    // A block's header (and its first records) overwritten: its other records still show
    // that it held data.
    let (mem, points) = durable_point_scenario(&config);
    mem.write_at(&[0xee; 1024], 64 * 1024).unwrap();
    assert!(reopen_finds_loss(&config, &mem, None), "a block whose header was overwritten");
    assert!(reopen_finds_loss(&config, &mem, Some(points.clone())));

    let other_device = points.iter().map(|p| chunkstore::DurablePoint { device_id: p.device_id ^ 1, ..*p }).collect();
    let (mem, _) = durable_point_scenario(&config);
    assert!(reopen_finds_loss(&config, &mem, Some(other_device)), "a device other than the one the points were recorded on");
}

#[test]
fn foreign_or_mismatched_device_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns.dat");
    let foreign: Vec<u8> = (0..4 * 64 * 1024).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&path, &foreign).unwrap();
    let mut config = NamespaceConfig::new("files", vec![DeviceConfig { path: path.clone(), size: Some(foreign.len() as u64) }]);
    config.write_block_size = 64 * 1024;
    let err = Namespace::open(config.clone(), OpenOptions::default()).err().expect("a foreign file is refused");
    assert!(err.to_string().contains("not a chunkstore device"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), foreign, "nothing was written to it");

    std::fs::remove_file(&path).unwrap();
    Namespace::open(config.clone(), OpenOptions::default()).unwrap().close().unwrap();
    let formatted = std::fs::read(&path).unwrap();

    let other_name = NamespaceConfig { name: "other".into(), ..config.clone() };
    let err = Namespace::open(other_name, OpenOptions::default()).err().unwrap();
    assert!(err.to_string().contains("belongs to namespace \"files\""), "{err}");

    let other_size = NamespaceConfig { devices: vec![DeviceConfig { path: path.clone(), size: Some(8 * 64 * 1024) }], ..config.clone() };
    let err = Namespace::open(other_size, OpenOptions::default()).err().unwrap();
    assert!(err.to_string().contains("never resizes"), "{err}");

    // A newer format version (with a valid checksum) is refused by name.
    let mut newer = formatted.clone();
    newer[8..12].copy_from_slice(&(chunkstore::format::FORMAT_VERSION + 1).to_le_bytes());
    let crc = crc32fast::hash(&newer[0..80]);
    newer[80..84].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &newer).unwrap();
    let err = Namespace::open(config.clone(), OpenOptions::default()).err().unwrap();
    assert!(err.to_string().contains(&format!("format version {}", chunkstore::format::FORMAT_VERSION + 1)), "{err}");

    // A flipped bit in the header is a checksum error, not a guess.
    let mut flipped = formatted.clone();
    flipped[13] ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    let err = Namespace::open(config, OpenOptions::default()).err().unwrap();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), flipped);
}

#[test]
fn a_failed_fsync_poisons_the_device_until_restart() {
    let config = small_config(1, 16);
    // Every sync fails with EIO once `failing` is set.
    let failing = Arc::new(AtomicBool::new(false));
    let mut device = HookedDevice::new(Arc::new(MemDevice::new("dev0", 16 * 64 * 1024)));
    let flag = failing.clone();
    device.sync = Box::new(move || match flag.load(Ordering::SeqCst) {
        true => Err(io::Error::from_raw_os_error(libc::EIO)),
        false => Ok(()),
    });
    let ns = mem_open(&config, vec![Arc::new(device)], None);
    put(&ns, 1, 100, 1).unwrap();
    failing.store(true, Ordering::SeqCst);
    let err = put(&ns, 2, 100, 2).unwrap_err();
    assert!(matches!(&err, Error::DeviceFailed { reason, .. } if reason.contains("fdatasync")), "{err}");
    assert!(err.to_string().contains("restart"), "the message says what to do: {err}");
    failing.store(false, Ordering::SeqCst);
    assert!(matches!(put(&ns, 3, 100, 3), Err(Error::DeviceFailed { .. })), "still poisoned after the disk recovers");
    assert!(ns.get(&Key::new("s", 1i64), None).unwrap().is_some(), "durable records stay readable");
    assert_eq!(ns.stats().poisoned_devices.len(), 1);
}

#[test]
fn a_failed_write_poisons_the_device_until_restart() {
    for (errno, name) in [(libc::ENOSPC, "ENOSPC"), (libc::EIO, "EIO")] {
        let config = small_config(1, 16);
        // Every write fails once `failing` is set (a thin-provisioned disk out of space, a
        // dying disk).
        let failing = Arc::new(AtomicBool::new(false));
        let mut device = HookedDevice::new(Arc::new(MemDevice::new("dev0", 16 * 64 * 1024)));
        let flag = failing.clone();
        device.write = Box::new(move |mem, data, offset| match flag.load(Ordering::SeqCst) {
            true => Err(io::Error::from_raw_os_error(errno)),
            false => mem.write_at(data, offset),
        });
        let ns = mem_open(&config, vec![Arc::new(device)], None);
        put(&ns, 1, 100, 1).unwrap();
        failing.store(true, Ordering::SeqCst);
        let err = put(&ns, 2, 100, 2).unwrap_err();
        assert!(matches!(&err, Error::DeviceFailed { .. }), "{name}: {err}");
        assert!(err.to_string().contains("restart"), "{name}: the message says what to do: {err}");
        failing.store(false, Ordering::SeqCst);
        assert!(matches!(put(&ns, 3, 100, 3), Err(Error::DeviceFailed { .. })), "{name}: still poisoned after the disk recovers");
        assert!(ns.get(&Key::new("s", 1i64), None).unwrap().is_some(), "{name}: durable records stay readable");
        // The failed write is never returned: its read fails with the device's error.
        let failed = ns.get(&Key::new("s", 2i64), None);
        assert!(matches!(failed, Ok(None) | Err(Error::DeviceFailed { .. })), "{name}: {failed:?}");
        assert_eq!(ns.stats().poisoned_devices.len(), 1, "{name}");
    }
}

#[test]
fn buffered_writes_are_made_durable_within_flush_max_ms() {
    for (flush_max_ms, survives) in [(50, true), (60_000, false)] {
        let mut config = small_config(1, 32);
        config.commit_to_device = false;
        config.flush_max_ms = flush_max_ms;
        let mut disks = Disks::new(&config, 11);
        let ns = disks.open(&config, None).unwrap();
        let syncs = ns.stats().fsyncs;
        put(&ns, 1, 500, 7).unwrap();
        if survives {
            // Nothing else asks for a flush (one small write, no commit-to-device): the timer
            // must, and then the record is on the device.
            wait_until("the flush-max-ms flush", || ns.stats().fsyncs > syncs);
        } else {
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(ns.stats().fsyncs, syncs, "nothing flushed before flush-max-ms");
        }
        disks.crash(ns);
        let ns = disks.open(&config, None).unwrap();
        let found = ns.get(&Key::new("s", 1i64), None).unwrap().is_some();
        // The control (a long flush-max-ms, a power cut first) shows the cut loses what was
        // not flushed, so finding the record after the short one is the timer's doing.
        assert_eq!(found, survives, "flush-max-ms {flush_max_ms}");
    }
}

#[test]
fn oversized_records_and_offsets_are_refused_without_allocating() {
    let config = small_config(1, 16);
    let mut disks = Disks::new(&config, 5);
    let ns = disks.open(&config, None).unwrap();
    let key = Key::new("s", 1i64);
    assert!(matches!(put(&ns, 1, 70_000, 1), Err(Error::RecordTooBig { .. })));
    let huge = Operation::WriteBytesAt { bin: "b".into(), offset: u64::MAX - 10, data: vec![1; 20], zero_fill: true };
    assert!(matches!(ns.operate(&key, &[huge], &WritePolicy::default()), Err(Error::RecordTooBig { .. })));
    let grow = Operation::TruncateBytes { bin: "b".into(), len: 1 << 40 };
    assert!(matches!(ns.operate(&key, &[grow], &WritePolicy::default()), Err(Error::RecordTooBig { .. })));
    assert!(ns.get(&key, None).unwrap().is_none(), "nothing was written");
}

#[test]
fn operate_semantics() {
    let config = small_config(1, 16);
    let mut disks = Disks::new(&config, 6);
    let ns = disks.open(&config, None).unwrap();
    let key = Key::new("s", "file-chunk-0");
    let p = WritePolicy::default();
    let gap = Operation::WriteBytesAt { bin: "b".into(), offset: 10, data: vec![1], zero_fill: false };
    assert!(matches!(ns.operate(&key, &[gap], &p), Err(Error::BadRequest(_))), "a gap needs zero_fill");
    let ops = [
        Operation::WriteBytesAt { bin: "b".into(), offset: 4, data: vec![9, 9], zero_fill: true },
        Operation::Append { bin: "b".into(), value: Value::Bytes(vec![7]) },
        Operation::Prepend { bin: "s".into(), value: Value::String("lo".into()) },
        Operation::Append { bin: "s".into(), value: Value::String("ng".into()) },
        Operation::Add { bin: "n".into(), delta: 5 },
        Operation::ReadAll,
    ];
    let (meta, results) = ns.operate(&key, &ops, &p).unwrap();
    assert_eq!(meta.generation, 1);
    let values: Vec<_> = results.into_iter().map(|r| (r.bin, r.value.unwrap())).collect();
    assert_eq!(values, vec![("b".into(), Value::Bytes(vec![0, 0, 0, 0, 9, 9, 7])), ("s".into(), Value::String("long".into())), ("n".into(), Value::Int(5)),]);
    let wrong_type = [Operation::Add { bin: "s".into(), delta: 1 }];
    assert!(matches!(ns.operate(&key, &wrong_type, &p), Err(Error::IncompatibleBin { .. })));
    let reads_only = [Operation::Read { bin: "n".into() }];
    let (meta, _) = ns.operate(&key, &reads_only, &p).unwrap();
    assert_eq!(meta.generation, 1, "reads do not bump the generation");
    let drop_all = [Operation::DeleteBin { bin: "b".into() }, Operation::DeleteBin { bin: "s".into() }, Operation::DeleteBin { bin: "n".into() }];
    ns.operate(&key, &drop_all, &p).unwrap();
    assert!(ns.get(&key, None).unwrap().is_none(), "deleting the last bin deletes the record");
    let meta = ns.put(&key, &bytes_bin(1, 1), &p).unwrap();
    assert_eq!(meta.generation, 1, "a record re-created after a delete starts at generation 1");
    let meta = ns.touch(&key, &WritePolicy { ttl: Ttl::Seconds(100), ..p }).unwrap();
    assert_eq!(meta.generation, 2);
    assert!(meta.void_time_secs > 0);
}

#[test]
fn bad_configs_name_the_field() {
    let base = small_config(1, 16);
    let cases: Vec<(NamespaceConfig, &str)> = vec![
        (NamespaceConfig { write_block_size: 1000, ..base.clone() }, "write-block-size"),
        (NamespaceConfig { name: "bad name!".into(), ..base.clone() }, "name"),
        (NamespaceConfig { defrag_lwm_pct: 0, ..base.clone() }, "defrag-lwm-pct"),
        (NamespaceConfig { max_write_cache: 1, ..base.clone() }, "max-write-cache"),
        (NamespaceConfig { devices: vec![], ..base.clone() }, "devices"),
        (NamespaceConfig { min_avail_pct: 90, ..base.clone() }, "min-avail-pct"),
    ];
    for (config, field) in cases {
        let err = config.sanitize().unwrap_err();
        assert!(err.to_string().contains(field), "{err} should name {field}");
    }
    let err = NamespaceConfig::from_toml("name = \"x\"\nflush-max-msec = 5\n").unwrap_err();
    assert!(err.to_string().contains("flush-max-msec"), "{err}");
    let parsed = NamespaceConfig::from_toml("name = \"ns1\"\ncommit-to-device = false\n[[devices]]\npath = \"/tmp/x.dat\"\nsize = 67108864\n").unwrap();
    assert!(!parsed.commit_to_device);
    assert_eq!(parsed.flush_max_ms, 1000, "unset fields keep their defaults");
    parsed.sanitize().unwrap();
}

#[test]
fn eviction_removes_records_nearest_expiry_and_never_those_without_ttl() {
    let mut config = small_config(1, 64);
    config.memory_size = 1 << 20;
    config.high_water_memory_pct = 1; // about 160 records
    config.evict_tenth_pct = 100; // 10% of the evictable records per round
    let clock = ManualClock::at_secs(1_700_000_000);
    let mut disks = Disks::new(&config, 7);
    let ns = disks.open(&config, Some(clock.clone())).unwrap();
    for k in 0..100 {
        put(&ns, k, 10, 0).unwrap(); // no TTL: never evicted
    }
    for k in 100..300 {
        let ttl = WritePolicy { ttl: Ttl::Seconds(1000 + k as u32), ..Default::default() };
        ns.put(&Key::new("s", k), &bytes_bin(10, 0), &ttl).unwrap();
    }
    // 1% of 1 MiB at 65 bytes per record: eviction stops at 161 live records.
    wait_until("eviction", || ns.stats().evicted > 0 && ns.stats().records <= 161);
    std::thread::sleep(Duration::from_millis(100));
    assert!(ns.stats().records >= 140, "eviction overshot: {:?}", ns.stats());
    for k in 0..100 {
        assert!(ns.get(&Key::new("s", k), None).unwrap().is_some(), "record {k} without TTL was evicted");
    }
    // The ones nearest expiry went first: the last-expiring record is still there.
    assert!(ns.get(&Key::new("s", 299i64), None).unwrap().is_some());
    assert!(ns.get(&Key::new("s", 100i64), None).unwrap().is_none());
}

#[test]
fn disk_eviction_frees_space_from_records_nearest_expiry() {
    let mut config = small_config(1, 64);
    config.high_water_disk_pct = 30;
    config.evict_tenth_pct = 100;
    let clock = ManualClock::at_secs(1_700_000_000);
    let mut disks = Disks::new(&config, 9);
    let ns = disks.open(&config, Some(clock.clone())).unwrap();
    // 100 records without TTL (about 5% of the device), then 1,000 with TTLs in write order
    // (about 50% more): the oldest expire first, so eviction empties whole blocks.
    for k in 0..100 {
        put_retrying(&ns, k, 2000, 1);
    }
    for k in 100..1100 {
        let ttl = WritePolicy { ttl: Ttl::Seconds(1000 + k as u32), ..Default::default() };
        ns.put(&Key::new("s", k), &bytes_bin(2000, 2), &ttl).unwrap();
    }
    wait_until("disk eviction and defragmentation", || {
        let stats = ns.stats();
        stats.evicted > 0 && 100 - stats.available_pct <= 30
    });
    for k in 0..100 {
        assert!(ns.get(&Key::new("s", k), None).unwrap().is_some(), "record {k} without TTL was evicted");
    }
    assert!(ns.get(&Key::new("s", 1099i64), None).unwrap().is_some(), "the last to expire stays");
    assert!(ns.get(&Key::new("s", 100i64), None).unwrap().is_none(), "the first to expire went");
    assert!(ns.stats().records > 300, "eviction stopped near the mark: {:?}", ns.stats());
}

#[test]
fn garbage_blocks_never_panic_the_parser() {
    use chunkstore::format::{decode_body, BlockItem, BlockWalker, RECORD_MAGIC};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    for round in 0..200 {
        let mut block = vec![0u8; 64 * 1024];
        rng.fill(&mut block[..]);
        // Plant record magics with this epoch and random lengths so the walker has to judge.
        for _ in 0..50 {
            let at = rng.gen_range(8..8000) * 8;
            block[at..at + 4].copy_from_slice(&RECORD_MAGIC);
            block[at + 24..at + 32].copy_from_slice(&(round as u64).to_le_bytes());
        }
        for item in BlockWalker::new(&block, 1, round as u64) {
            if let BlockItem::Record { bytes, .. } = item {
                let _ = decode_body(bytes);
            }
        }
    }
}

#[test]
fn records_from_a_blocks_lost_life_never_come_back() {
    let mut config = small_config(1, 16);
    config.commit_to_device = false;
    let mem = Arc::new(MemDevice::new("dev0", 16 * 64 * 1024));
    let key = Key::new("s", "k");
    // Life 1: one flush holds the block header, fillers and K; only the header sector is lost.
    // The disk writes a block's first flush back without its first sector (the block header),
    // out of order, and then loses power.
    let powered = Arc::new(AtomicBool::new(true));
    let mut lossy = HookedDevice::new(mem.clone());
    let on = powered.clone();
    lossy.write = Box::new(move |mem, data, offset| {
        let block_bytes = 64 * 1024;
        if !on.load(Ordering::SeqCst) {
            return Err(io::Error::other("power cut"));
        }
        if offset >= block_bytes && offset.is_multiple_of(block_bytes) && data.len() > 512 {
            on.store(false, Ordering::SeqCst);
            return mem.write_at(&data[512..], offset + 512);
        }
        mem.write_at(data, offset)
    });
    let on = powered.clone();
    lossy.sync = Box::new(move || match on.load(Ordering::SeqCst) {
        true => Ok(()),
        false => Err(io::Error::other("power cut")),
    });
    let ns = mem_open(&config, vec![Arc::new(lossy)], None);
    for filler in 0..4 {
        put(&ns, 100 + filler, 300, 9).unwrap();
    }
    ns.put(&key, &bytes_bin(100, 1), &WritePolicy::default()).unwrap();
    assert!(ns.flush().is_err(), "the power cut fails the flush");
    drop(ns);
    // Life 2: the block is free again; K is written and deleted, durably.
    let ns = mem_open(&config, vec![mem.clone()], None);
    assert!(ns.get(&key, None).unwrap().is_none(), "nothing of life 1 is visible");
    ns.put(&key, &bytes_bin(100, 2), &WritePolicy::default()).unwrap();
    ns.delete(&key, &WritePolicy::default()).unwrap();
    ns.close().unwrap();
    // Life 3: the acknowledged delete holds; life 1's K stays buried.
    let ns = mem_open(&config, vec![mem], None);
    assert!(ns.get(&key, None).unwrap().is_none(), "a record from the block's lost life came back");
}

#[test]
fn blocks_from_an_earlier_formatting_are_not_loaded() {
    let config = small_config(1, 16);
    let mem = Arc::new(MemDevice::new("dev0", 16 * 64 * 1024));
    let ns = mem_open(&config, vec![mem.clone()], None);
    for k in 0..20 {
        put(&ns, k, 500, 1).unwrap();
    }
    ns.close().unwrap();
    // The device header is wiped, the blocks are not: damaged, not new, so refused untouched.
    mem.write_at(&[0u8; 512], 0).unwrap();
    let mut before = vec![0u8; 16 * 64 * 1024];
    mem.read_at(&mut before, 0).unwrap();
    let err = Namespace::open(config.clone(), OpenOptions { devices: Some(vec![mem.clone()]), ..Default::default() }).err().expect("refused");
    assert!(err.to_string().contains("not blank"), "{err}");
    let mut after = vec![0u8; before.len()];
    mem.read_at(&mut after, 0).unwrap();
    assert!(before == after, "nothing was written to it");
    // Blanked the way the error asks (header block and every block's first bytes zeroed), it
    // is a new device: the records still lying in the blocks' bodies are not loaded.
    for block in 0..16u64 {
        mem.write_at(&[0u8; 512], block * 64 * 1024).unwrap();
    }
    mem.write_at(&vec![0u8; 64 * 1024], 0).unwrap();
    let ns = mem_open(&config, vec![mem.clone()], None);
    assert_eq!(ns.stats().records, 0, "records of the earlier formatting were loaded");
}

#[test]
fn a_record_copied_into_another_records_data_is_never_taken_for_real() {
    use chunkstore::format::RECORD_MAGIC;
    let mut config = small_config(1, 16);
    config.commit_to_device = false;
    let mem = Arc::new(MemDevice::new("dev0", 16 * 64 * 1024));
    let ns = mem_open(&config, vec![mem.clone()], None);
    let a = Key::new("s", "a");
    ns.put(&a, &bytes_bin(300, 0x11), &WritePolicy::default()).unwrap();
    ns.flush().unwrap();
    // A's bytes as they sit on the device (first record of block 1), as a backup image of the
    // device would hold them, with its seq raised so that it would win if ever believed.
    let block = 64 * 1024u64;
    let mut head = [0u8; 12];
    mem.read_at(&mut head, block + 64).unwrap();
    assert_eq!(head[0..4], RECORD_MAGIC);
    let len = u32::from_le_bytes(head[8..12].try_into().unwrap()) as usize;
    let mut copy = vec![0u8; len];
    mem.read_at(&mut copy, block + 64).unwrap();
    copy[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    // Valid where A was written: only the CRC's binding to the record's place rejects it.
    let crc = chunkstore::format::record_crc(&copy, 1, 64);
    copy[4..8].copy_from_slice(&crc.to_le_bytes());
    // B carries the copy in its data (same block, same epoch); then A is deleted.
    ns.put(&Key::new("s", "b"), &[Bin::new("b", Value::Bytes(copy))], &WritePolicy::default()).unwrap();
    ns.delete(&a, &WritePolicy::default()).unwrap();
    ns.close().unwrap();
    // Damage B's checksum so that the start-up scan walks through B's data byte by byte.
    let b_offset = block + (64 + len as u64).next_multiple_of(512);
    let mut magic = [0u8; 4];
    mem.read_at(&mut magic, b_offset).unwrap();
    assert_eq!(magic, RECORD_MAGIC, "B starts at the next sector");
    mem.corrupt(b_offset + 4, 4);
    let ns = mem_open(&config, vec![mem], None);
    assert!(ns.get(&a, None).unwrap().is_none(), "the copy inside B's data was taken for a record");
    assert!(ns.stats().scan.checksum_mismatches >= 1);
}

#[test]
fn replicated_writes_replay_idempotently_and_pass_local_limits() {
    use chunkstore::{Replicated, WriteOp};
    let config = small_config(1, 16);
    let mut disks = Disks::new(&config, 9);
    let mut ns = disks.open(&config, None).unwrap();
    let key = Key::new("s", "counter");
    let add = WriteOp::Operate(vec![Operation::Add { bin: "n".into(), delta: 1 }]);
    let at = |log_index| Replicated { log_index, now_ms: 1_700_000_000_000 };
    for index in [3, 5, 8] {
        assert!(ns.apply_replicated(&key, &add, &WritePolicy::default(), at(index)).unwrap().is_some());
    }
    // After a power cut the log is replayed from an earlier point: entries the record already
    // reflects are skipped, so the counter is not incremented twice.
    disks.crash(ns);
    ns = disks.open(&config, None).unwrap();
    for index in [3, 5, 8] {
        assert_eq!(ns.apply_replicated(&key, &add, &WritePolicy::default(), at(index)).unwrap(), None, "entry {index}");
    }
    let (meta, _) = ns.apply_replicated(&key, &add, &WritePolicy::default(), at(9)).unwrap().unwrap();
    assert_eq!(meta.generation, 4);
    assert_eq!(ns.get(&key, None).unwrap().unwrap().bin("n"), Some(&Value::Int(4)));
    // Fill the device to stop-writes: local writes are refused, replicated ones are applied.
    let mut k = 0;
    while put(&ns, 1000 + k, 20_000, 1).is_ok() {
        k += 1;
    }
    let put_op = WriteOp::Put(bytes_bin(100, 7));
    assert!(ns.apply_replicated(&Key::new("s", "late"), &put_op, &WritePolicy::default(), at(10)).unwrap().is_some());
}

#[test]
fn replicated_namespaces_never_reclaim_locally() {
    use chunkstore::{Replicated, WriteOp};
    let mut config = small_config(1, 16);
    config.nsup_period_ms = 5;
    let clock = ManualClock::at_secs(1_700_000_000);
    let device: Arc<dyn Device> = Arc::new(MemDevice::new("dev0", 16 * 64 * 1024));
    let options = OpenOptions { devices: Some(vec![device]), clock: Some(clock.clone()), replicated: true, ..Default::default() };
    let ns = Namespace::open(config, options).unwrap();
    let key = Key::new("s", "ttl");
    let ttl = WritePolicy { ttl: Ttl::Seconds(10), ..Default::default() };
    let at = |log_index| Replicated { log_index, now_ms: 1_700_000_000_000 };
    ns.apply_replicated(&key, &WriteOp::Put(bytes_bin(10, 1)), &ttl, at(5)).unwrap().unwrap();
    clock.advance_secs(60);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ns.stats().expired, 0, "no local tombstone: its seq would not be a log index");
    // The next log entry for the record is applied, not mistaken for one already reflected.
    let later = at(6);
    let applied = ns.apply_replicated(&key, &WriteOp::Put(bytes_bin(10, 2)), &WritePolicy::default(), Replicated { now_ms: 1_700_000_100_000, ..later });
    assert!(applied.unwrap().is_some());
    assert_eq!(ns.get(&key, None).unwrap().unwrap().bin("b"), Some(&Value::Bytes(vec![2; 10])));
}

/// A replicated engine keeps tombstones until the group's durable applied point passes them
/// (replay never starts before it), and snapshots carry tombstones, so a receiver replaying
/// older entries does not bring a deleted record back.
#[test]
fn replicated_tombstones_survive_until_the_floor_and_travel_in_snapshots() {
    use chunkstore::{Replicated, WriteOp};
    let open = || {
        let mut config = small_config(1, 24);
        config.commit_to_device = false;
        let device: Arc<dyn Device> = Arc::new(MemDevice::new("dev0", 24 * 64 * 1024));
        Namespace::open(config, OpenOptions { devices: Some(vec![device]), replicated: true, ..Default::default() }).unwrap()
    };
    let at = |log_index| Replicated { log_index, now_ms: 1_700_000_000_000 };
    let p = WritePolicy::default();
    let ns = open();
    let gone = Key::new("s", "gone");
    ns.apply_replicated(&gone, &WriteOp::Put(bytes_bin(100, 1)), &p, at(1)).unwrap();
    ns.apply_replicated(&gone, &WriteOp::Delete, &p, at(2)).unwrap();
    // Churn other records so that every old block gets defragmented.
    let mut index = 3;
    let mut churn = |ns: &Namespace, rounds: i64| {
        for round in 0..rounds {
            for k in 0..20i64 {
                ns.apply_replicated(&Key::new("s", k), &WriteOp::Put(bytes_bin(5000, round as u8)), &p, at(index)).unwrap();
                index += 1;
            }
        }
    };
    churn(&ns, 12);
    std::thread::sleep(Duration::from_millis(200));
    assert!(ns.stats().defrag_blocks > 0);
    assert_eq!(ns.stats().tombstones_dropped, 0, "no floor yet: the tombstone must stay");
    // A snapshot taken now carries the deletion.
    let snapshot = ns.export(|_| true).unwrap();
    let carried = snapshot.iter().find(|v| v.digest == gone.digest).expect("the tombstone is in the snapshot");
    assert!(carried.tombstone && carried.seq == 2);
    let receiver = open();
    receiver.apply_replicated(&gone, &WriteOp::Put(bytes_bin(100, 1)), &p, at(1)).unwrap();
    receiver.import(|_| true, snapshot, 0).unwrap();
    assert!(receiver.get(&gone, None).unwrap().is_none());
    assert_eq!(receiver.apply_replicated(&gone, &WriteOp::Put(bytes_bin(100, 1)), &p, at(1)).unwrap(), None, "a replayed older write is skipped");
    // Once the group's applied point is durable past it, the tombstone may go.
    ns.set_tombstone_floor(0, 1, 1_000_000);
    wait_until("the tombstone to be dropped", || {
        churn(&ns, 1);
        ns.stats().tombstones_dropped > 0
    });
}

/// A replicated group whose replica left the node is forgotten: its records leave the index,
/// defragmentation frees their space, and after a restart with the void points they stay gone,
/// while the other group's records, and the group's records written after it came back, stay.
#[test]
fn a_forgotten_group_is_reclaimed_and_stays_forgotten_after_a_restart() {
    use chunkstore::{DurablePoint, Replicated, VoidPoints, WriteOp};
    let mut config = small_config(2, 24);
    config.defrag_lwm_pct = 60;
    let mem: Vec<Arc<MemDevice>> = (0..2).map(|d| Arc::new(MemDevice::new(&format!("dev{d}"), 24 * 64 * 1024))).collect();
    let open = |void_points: Option<VoidPoints>| {
        let devices: Vec<Arc<dyn Device>> = mem.iter().map(|m| m.clone() as Arc<dyn Device>).collect();
        Namespace::open(config.clone(), OpenOptions { devices: Some(devices), replicated: true, void_points, ..Default::default() }).unwrap()
    };
    let group_of = |key: &Key| chunkstore::raft::group_of(&key.digest, 2);
    let at = |log_index| Replicated { log_index, now_ms: 1_700_000_000_000 };
    let p = WritePolicy::default();
    let ns = open(None);
    let keys: Vec<Key> = (0..120i64).map(|k| Key::new("s", k)).collect();
    for (i, key) in keys.iter().enumerate() {
        ns.apply_replicated(key, &WriteOp::Put(bytes_bin(5000, 1)), &p, at(i as u64 + 1)).unwrap().unwrap();
    }
    // A tombstone of the group goes too.
    let deleted = keys.iter().find(|k| group_of(k) == 1).unwrap();
    ns.apply_replicated(deleted, &WriteOp::Delete, &p, at(1000)).unwrap().unwrap();
    let in_group_1 = keys.iter().filter(|k| group_of(k) == 1).count() as u64;
    assert!(in_group_1 > 30 && in_group_1 < 90, "{in_group_1} of 120 keys in group 1");
    let free_before = ns.stats().free_blocks;

    let mut recorded: Vec<DurablePoint> = Vec::new();
    let forgotten = ns.forget_group(1, 2, |points| {
        recorded = points.to_vec();
        Ok(())
    });
    assert_eq!(forgotten.unwrap(), in_group_1, "records and tombstones of group 1 that left the index");
    assert_eq!(recorded.len(), 2, "one void point per device");
    assert_eq!(ns.stats().records, 120 - in_group_1);
    assert_eq!(ns.stats().tombstones, 0);
    for key in &keys {
        let found = ns.get(key, None).unwrap();
        assert_eq!(found.is_some(), group_of(key) == 0, "key {:02x?} of group {}", &key.digest[..4], group_of(key));
    }
    wait_until("defragmentation to free the forgotten records' blocks", || ns.stats().free_blocks >= free_before + 4);
    let void = || Some(VoidPoints { groups: 2, points: vec![(1, recorded.clone())] });
    // A restart in between: new writes must still land past the void points, even where the
    // blocks that reached them were freed.
    ns.close().unwrap();
    let ns = open(void());
    assert_eq!(ns.stats().records, 120 - in_group_1, "after a restart before the group came back");

    // The group comes back (its log starts over): what it writes now is kept.
    let back: Vec<&Key> = keys.iter().filter(|k| group_of(k) == 1).take(5).collect();
    for (i, key) in back.iter().enumerate() {
        ns.apply_replicated(key, &WriteOp::Put(bytes_bin(100, 9)), &p, at(i as u64 + 1)).unwrap().expect("applied, not taken for a replay");
    }
    ns.close().unwrap();

    let ns = open(void());
    for key in &keys {
        let found = ns.get(key, None).unwrap().map(|r| r.bin("b").cloned());
        let expected = match (group_of(key), back.contains(&key)) {
            (0, _) => Some(Some(Value::Bytes(vec![1; 5000]))),
            (_, true) => Some(Some(Value::Bytes(vec![9; 100]))),
            _ => None,
        };
        assert_eq!(found, expected, "key {:02x?} of group {} after the restart", &key.digest[..4], group_of(key));
    }
    assert_eq!(ns.stats().records, 120 - in_group_1 + back.len() as u64);
}

/// Defragmentation copies records that were acknowledged long ago into the open block, and
/// frees their originals once the copies are durable. Nothing replays those records (the log
/// that wrote them is gone), so damage to a copy is a loss even when it lies past the durable
/// point recorded before the defragmentation: the scan must say so, never take it for a torn
/// tail.
#[test]
fn damage_to_a_defragmented_copy_is_a_loss_not_a_torn_tail() {
    let config = NamespaceConfig { defrag_lwm_pct: 50, ..small_config(1, 16) };
    let mem = Arc::new(MemDevice::new("dev0", 16 * 64 * 1024));
    let ns = mem_open(&config, vec![mem.clone()], None);
    for k in 1..=14 {
        put(&ns, k, 5000, k as u8).unwrap();
    }
    let points = ns.flush_to_durable_point().unwrap();
    // Records 1..=10 move on (new values after the durable point): the first block keeps 11
    // and 12 only, falls under the low-water mark, and defragmentation copies them.
    for k in 1..=10 {
        put(&ns, k, 5000, 100 + k as u8).unwrap();
    }
    wait_until("the first block to be defragmented", || ns.stats().defrag_blocks > 0);
    ns.close().unwrap();
    let copy = *runs(&mem, 11).last().unwrap();
    assert!(copy > find_run(&mem, 11), "record 11 was copied");
    assert!(!reopen_finds_loss(&config, &mem, Some(points.clone())), "nothing was damaged");
    mem.corrupt(copy, 4);
    assert!(reopen_finds_loss(&config, &mem, Some(points)), "the only copy of record 11 is damaged");
}

/// A block left open by a crash has no trailer for ever after. Later lives move the durable
/// point past it; that must not make its intact records look damaged.
#[test]
fn a_block_left_open_by_a_crash_is_no_loss_in_later_lives() {
    let config = small_config(1, 16);
    let (mem, _) = durable_point_scenario(&config);
    let options = || OpenOptions { devices: Some(vec![mem.clone() as Arc<dyn Device>]), ..Default::default() };
    let ns = Namespace::open(config.clone(), options()).unwrap();
    for k in 30..=60 {
        put(&ns, k, 5000, k as u8).unwrap();
    }
    let points = ns.flush_to_durable_point().unwrap();
    ns.close().unwrap();
    assert!(!reopen_finds_loss(&config, &mem, Some(points)), "the earlier life's open block is intact");
}
