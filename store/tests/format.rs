//! The version-1 format fixture (written by examples/write_format_fixture.rs when version 1
//! shipped) still opens and reads back exactly. A format change must keep this passing.

use chunkstore::{DeviceConfig, Key, Namespace, NamespaceConfig, OpenOptions, Value};

#[test]
fn version_one_device_reads_back_exactly() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1.dat");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("format-v1.dat");
    std::fs::copy(&fixture, &path).unwrap();
    let config = NamespaceConfig { write_block_size: 64 * 1024, ..NamespaceConfig::new("fixture", vec![DeviceConfig { path, size: Some(8 * 64 * 1024) }]) };
    let ns = Namespace::open(config, OpenOptions::default()).unwrap();
    let scan = ns.stats().scan;
    assert_eq!((scan.checksum_mismatches, scan.torn_records, scan.damaged_block_headers), (0, 0, 0));
    assert_eq!(ns.stats().records, 4);
    assert_eq!(ns.stats().tombstones, 1);

    let one = ns.get(&Key::new("set", 1i64), None).unwrap().unwrap();
    assert_eq!(one.bin("i"), Some(&Value::Int(-7)));
    assert_eq!(one.bin("f"), Some(&Value::Float(2.5)));
    assert_eq!(one.meta.generation, 1);
    assert_eq!(one.meta.last_update_ms, 1_700_000_000_000);

    let two = ns.get(&Key::new("set", "two"), None).unwrap().unwrap();
    assert_eq!(two.bin("s"), Some(&Value::String("version one!".into())));
    assert_eq!(two.meta.generation, 2);
    assert_eq!(two.set, "set");

    let blob = ns.get(&Key::new("", vec![1u8, 2, 3]), None).unwrap().unwrap();
    assert_eq!(blob.bin("b"), Some(&Value::Bytes(vec![0xab; 700])));

    assert!(ns.get(&Key::new("set", "gone"), None).unwrap().is_none());
    let ttl = ns.get(&Key::new("set", "ttl"), None).unwrap().unwrap();
    assert_eq!(ttl.meta.void_time_secs, 1_700_000_000 + 2_000_000_000);
}
