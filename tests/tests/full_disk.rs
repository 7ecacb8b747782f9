//! A device on a small, real filesystem (tmpfs mounted for the test; needs root): creation
//! beyond its size is a clear error, a full device reaches stop-writes without corruption, and
//! deletes plus defragmentation let writes resume.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chunkstore::{Bin, DeviceConfig, Error, Key, Namespace, NamespaceConfig, OpenOptions, Value, WritePolicy};
use chunkstore_tests::is_root;

struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Mount {
        assert!(is_root(), "this test mounts a small tmpfs and needs root (CI runs as root)");
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status().unwrap();
        assert!(status.success(), "mount tmpfs failed");
        Mount(dir.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn config(path: &Path, size: u64) -> NamespaceConfig {
    NamespaceConfig {
        write_block_size: 64 * 1024,
        max_write_cache: 4 * 64 * 1024,
        defrag_sleep_ms: 10,
        ..NamespaceConfig::new("small", vec![DeviceConfig { path: path.to_owned(), size: Some(size) }])
    }
}

#[test]
fn small_filesystem_fills_to_stop_writes_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let _mount = Mount::tmpfs(dir.path(), "6m");

    let too_big = dir.path().join("too-big.dat");
    let err = Namespace::open(config(&too_big, 64 << 20), OpenOptions::default()).err().expect("64 MiB cannot fit in 6 MiB");
    assert!(err.to_string().contains("no room"), "{err}");
    assert!(!too_big.exists(), "a device that could not be created leaves no file behind");

    let path = dir.path().join("ns.dat");
    let ns = Namespace::open(config(&path, 4 << 20), OpenOptions::default()).unwrap();
    let bins = |k: i64| [Bin::new("b", Value::Bytes(vec![k as u8; 10_000]))];
    let mut acked = 0i64;
    let err = loop {
        match ns.put(&Key::new("s", acked), &bins(acked), &WritePolicy::default()) {
            Ok(_) => acked += 1,
            Err(err) => break err,
        }
        assert!(acked < 1000);
    };
    assert!(matches!(&err, Error::StopWrites { reason, .. } if reason.contains("min-avail-pct")), "{err}");
    ns.close().unwrap();

    // No corruption: every acknowledged record is back after a restart, byte for byte.
    let ns = Namespace::open(config(&path, 4 << 20), OpenOptions::default()).unwrap();
    assert_eq!(ns.stats().scan.checksum_mismatches, 0);
    for k in 0..acked {
        let record = ns.get(&Key::new("s", k), None).unwrap().unwrap_or_else(|| panic!("record {k} lost"));
        assert_eq!(record.bin("b"), Some(&Value::Bytes(vec![k as u8; 10_000])));
    }
    assert!(matches!(ns.put(&Key::new("s", 9999), &bins(1), &WritePolicy::default()), Err(Error::StopWrites { .. })));
    for k in 0..acked / 2 {
        ns.delete(&Key::new("s", k), &WritePolicy::default()).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ns.put(&Key::new("s", 9999), &bins(1), &WritePolicy::default()).is_err() {
        assert!(Instant::now() < deadline, "writes did not resume after deletes: {:?}", ns.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ns.stats().defrag_blocks > 0);
    ns.close().unwrap();
}
