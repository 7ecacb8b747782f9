//! The fronts and the file layer link no server code: from Cargo.lock, none of chunkfs,
//! chunkstore-files, chunkstore-client and the shim depends (however indirectly) on the server
//! crate, openraft or tokio, while chunkd's crate does (the check can see a dependency).

use std::collections::{BTreeMap, BTreeSet};

fn dependencies() -> BTreeMap<String, Vec<String>> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    let lock: toml::Value = toml::from_str(&lock).unwrap();
    let mut out = BTreeMap::new();
    for package in lock["package"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap().to_owned();
        let deps = package
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map_or_else(Vec::new, |d| d.iter().map(|x| x.as_str().unwrap().split(' ').next().unwrap().to_owned()).collect());
        out.entry(name).or_insert_with(Vec::new).extend(deps);
    }
    out
}

fn closure(deps: &BTreeMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(name) = stack.pop() {
        for dep in deps.get(&name).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                stack.push(dep.clone());
            }
        }
    }
    seen
}

#[test]
fn fronts_and_file_layer_link_no_server_code() {
    let deps = dependencies();
    for front in ["chunkfs", "chunkstore-files", "chunkstore-client", "chunkpreload"] {
        let linked = closure(&deps, front);
        for forbidden in ["chunkstore", "openraft", "tokio"] {
            assert!(!linked.contains(forbidden), "{front} links {forbidden}");
        }
    }
    // The check sees a server dependency where there is one.
    let server = closure(&deps, "chunkstore");
    assert!(server.contains("openraft") && server.contains("tokio") && server.contains("chunkstore-client"));
}
