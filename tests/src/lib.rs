//! Helpers for the end-to-end tests in tests/tests: they run the real release binaries
//! (`cargo build --release` first; `./dev test` does it).

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a release binary of this workspace (or of `$CHUNKSTORE_BIN_DIR/NAME`).
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("CHUNKSTORE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release"),
    };
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --release` first (./dev test does)", path.display());
    path
}

/// Runs a binary to completion and returns its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(binary(name)).args(args).output().unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// The JSON object on the last line of stdout.
pub fn last_json_line(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!("no output; stderr:\n{}", String::from_utf8_lossy(&output.stderr))
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// A setting from the environment, for slow tests that CI runs in a bounded form.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
