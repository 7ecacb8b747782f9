//! Our digests and partition ids equal the ones the official Aerospike client computes.

use chunkstore::key::{partition_id, UserKey};
use chunkstore::Key;

fn official(set: &str, key: aerospike::Value) -> [u8; 20] {
    aerospike::Key::new("ns", set, key).expect("the official client accepts the key").digest
}

#[test]
fn digests_match_the_official_aerospike_client() {
    let sets = ["", "set1", "a-much-longer-set-name-with-dashes"];
    let mut checked = 0;
    for set in sets {
        for int in [0i64, 1, -1, 42, i64::MAX, i64::MIN, 1 << 40] {
            assert_eq!(Key::new(set, int).digest, official(set, aerospike::Value::Int(int)), "int {int} in {set:?}");
            checked += 1;
        }
        for string in ["", "hello", "ünïcødé", "key with spaces"] {
            assert_eq!(Key::new(set, string).digest, official(set, aerospike::Value::from(string)), "string {string:?}");
            checked += 1;
        }
        for blob in [vec![], vec![0u8], vec![1, 2, 3, 255], vec![7u8; 1000]] {
            let ours = Key::new(set, UserKey::Bytes(blob.clone())).digest;
            assert_eq!(ours, official(set, aerospike::Value::Blob(blob.clone())), "blob of {} bytes", blob.len());
            checked += 1;
        }
    }
    assert_eq!(checked, 45);
}

#[test]
fn partition_id_is_the_clients_low_twelve_bits() {
    for int in 0..2000i64 {
        let digest = official("s", aerospike::Value::Int(int));
        // The client's rule: first four digest bytes as little-endian u32, modulo 4096.
        let expected = (u32::from_le_bytes(digest[0..4].try_into().unwrap()) % 4096) as u16;
        assert_eq!(partition_id(&digest), expected);
        assert_eq!(Key::new("s", int).partition_id(), expected);
    }
}
