//! Real devices (these tests need root, as CI has): a device file on a small tmpfs, where
//! creation beyond its size is a clear error, a full device reaches stop-writes without
//! corruption, and deletes plus defragmentation let writes resume; and a raw block device
//! (a loop device).

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

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Loop {
        assert!(is_root(), "this test attaches a loop device and needs root (CI runs as root)");
        let output = Command::new("losetup").args(["-f", "--show"]).arg(image).output().expect("losetup (util-linux)");
        assert!(output.status.success(), "losetup failed: {}", String::from_utf8_lossy(&output.stderr));
        Loop(String::from_utf8(output.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn raw_block_device_keeps_records_and_foreign_content_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let device = Loop::attach(&image);
    let block_config =
        || NamespaceConfig { write_block_size: 64 * 1024, ..NamespaceConfig::new("raw", vec![DeviceConfig { path: device.0.clone().into(), size: None }]) };
    let ns = Namespace::open(block_config(), OpenOptions::default()).unwrap();
    assert_eq!(ns.stats().total_blocks, 16 * 16 - 1, "the whole 16 MiB device is used, less the header block");
    for k in 0..100i64 {
        ns.put(&Key::new("s", k), &[Bin::new("b", Value::Int(k))], &WritePolicy::default()).unwrap();
    }
    ns.close().unwrap();
    let ns = Namespace::open(block_config(), OpenOptions::default()).unwrap();
    for k in 0..100i64 {
        assert_eq!(ns.get(&Key::new("s", k), None).unwrap().unwrap().bin("b"), Some(&Value::Int(k)));
    }
    ns.close().unwrap();

    // A block device holding something else is refused and left as it was.
    let other = dir.path().join("other.img");
    let foreign: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 199) as u8 + 1).collect();
    std::fs::write(&other, &foreign).unwrap();
    let other_device = Loop::attach(&other);
    let config =
        NamespaceConfig { write_block_size: 64 * 1024, ..NamespaceConfig::new("raw", vec![DeviceConfig { path: other_device.0.clone().into(), size: None }]) };
    let err = Namespace::open(config, OpenOptions::default()).err().expect("foreign content is refused");
    assert!(err.to_string().contains("not a chunkstore device"), "{err}");
    drop(other_device);
    assert_eq!(std::fs::read(&other).unwrap(), foreign, "nothing was written to it");

    // A filesystem leaves the first bytes zero (ext4's superblock is at byte 1024); so does a
    // chunkstore device whose header was wiped. Neither is taken for a blank device.
    let mut ext4_like = foreign.clone();
    ext4_like[..1024].fill(0);
    let mut wiped_header = std::fs::read(&image).unwrap();
    wiped_header[..4096].fill(0);
    for (name, content) in [("ext4-like", ext4_like), ("wiped header", wiped_header)] {
        std::fs::write(&other, &content).unwrap();
        let other_device = Loop::attach(&other);
        let config = NamespaceConfig {
            write_block_size: 64 * 1024,
            ..NamespaceConfig::new("raw", vec![DeviceConfig { path: other_device.0.clone().into(), size: None }])
        };
        let err = Namespace::open(config, OpenOptions::default()).err().unwrap_or_else(|| panic!("{name}: refused"));
        assert!(err.to_string().contains("not blank"), "{name}: {err}");
        drop(other_device);
        assert!(std::fs::read(&other).unwrap() == content, "{name}: nothing was written to it");
    }
}
