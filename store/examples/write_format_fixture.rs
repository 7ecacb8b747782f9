//! Writes store/tests/fixtures/format-v1.dat, the version-1 device that store/tests/format.rs
//! reads back. Run only to create the fixture of a new format version:
//! `cargo run --example write_format_fixture -- PATH`. The clock is fixed, so the bytes are too.

use std::sync::Arc;

use chunkstore::{Bin, Clock, DeviceConfig, Key, Namespace, NamespaceConfig, OpenOptions, Operation, Ttl, Value, WritePolicy};

struct FixedClock;

impl Clock for FixedClock {
    fn now_ms(&self) -> u64 {
        1_700_000_000_000
    }
}

pub fn fixture_config(path: std::path::PathBuf) -> NamespaceConfig {
    NamespaceConfig { write_block_size: 64 * 1024, ..NamespaceConfig::new("fixture", vec![DeviceConfig { path, size: Some(8 * 64 * 1024) }]) }
}

fn main() -> chunkstore::Result<()> {
    let path = std::env::args().nth(1).expect("usage: write_format_fixture PATH");
    let options = OpenOptions { clock: Some(Arc::new(FixedClock)), ..Default::default() };
    let ns = Namespace::open(fixture_config(path.into()), options)?;
    let p = WritePolicy::default();
    ns.put(&Key::new("set", 1i64), &[Bin::new("i", Value::Int(-7)), Bin::new("f", Value::Float(2.5))], &p)?;
    ns.put(&Key::new("set", "two"), &[Bin::new("s", Value::String("version one".into()))], &p)?;
    ns.put(&Key::new("", vec![1u8, 2, 3]), &[Bin::new("b", Value::Bytes(vec![0xab; 700]))], &p)?;
    ns.operate(&Key::new("set", "two"), &[Operation::Append { bin: "s".into(), value: Value::String("!".into()) }], &p)?;
    ns.put(&Key::new("set", "gone"), &[Bin::new("i", Value::Int(1))], &p)?;
    ns.delete(&Key::new("set", "gone"), &p)?;
    let ttl = WritePolicy { ttl: Ttl::Seconds(2_000_000_000), ..p };
    ns.put(&Key::new("set", "ttl"), &[Bin::new("i", Value::Int(3))], &ttl)?;
    ns.close()
}
