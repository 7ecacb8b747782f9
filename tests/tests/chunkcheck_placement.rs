//! `chunkcheck placement`: the production placement over 100 nodes and 4,096 groups through
//! seeded roster changes (more than these machines can start as nodes): every placement keeps
//! its rules, the report carries what each change costs, and bad arguments are refused.

use chunkstore_tests::{last_json_line, run};

fn seed() -> String {
    (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 ^ std::process::id() as u64).to_string()
}

#[test]
fn placement_of_4096_groups_over_100_nodes_keeps_its_rules_through_roster_changes() {
    for racks in ["0", "5"] {
        let seed = seed();
        let output = run("chunkcheck", &["placement", "--seed", &seed, "--racks", racks, "--changes", "12", "--json"]);
        let report = last_json_line(&output);
        assert_eq!(output.status.code(), Some(0), "seed {seed}, racks {racks}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(report["valid"], serde_json::json!(true), "{report}");
        assert_eq!((report["nodes"].as_u64(), report["groups"].as_u64()), (Some(100), Some(4096)));
        let steps = report["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 13, "the first placement and 12 changes");
        for step in steps {
            assert!(step["violations"].as_array().unwrap().is_empty(), "{step}");
            let moved = step["groups_moved"].as_u64().unwrap();
            assert!(step["place_ms"].as_f64().unwrap() > 0.0, "{step}");
            assert!(step["replicas_moved"].as_u64().unwrap() >= moved, "{step}");
            if step["change"] != "start" {
                assert_eq!(step["metadata_entries"].as_u64().unwrap(), 1 + 2 * moved, "{step}");
                assert_eq!(step["move_rounds"].as_u64().unwrap(), moved.div_ceil(report["moves_at_once"].as_u64().unwrap()), "{step}");
            }
            if racks == "0" {
                let (min, max) = (step["replicas_per_node_min"].as_u64().unwrap(), step["replicas_per_node_max"].as_u64().unwrap());
                assert!(max <= min + 1, "without racks every node holds its share: {step}");
            }
            // A change that takes nodes off the roster moves at least their replicas.
            if step["change"].as_str().unwrap().starts_with("remove") {
                assert!(step["replicas_moved"].as_u64() >= step["replicas_moved_fewest"].as_u64(), "{step}");
                assert!(step["replicas_moved_fewest"].as_u64().unwrap() > 0, "{step}");
            }
        }
        assert!(report["movement_ratio"].as_f64().unwrap() >= 1.0, "{report}");
    }
}

#[test]
fn placement_refuses_bad_arguments() {
    for (args, says) in [(&["--groups", "100"][..], "power of two"), (&["--nodes", "3"][..], "more than the replication factor")] {
        let mut all = vec!["placement"];
        all.extend_from_slice(args);
        let output = run("chunkcheck", &all);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains(says), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
}
