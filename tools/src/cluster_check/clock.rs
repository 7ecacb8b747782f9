//! Wall-clock faults with libfaketime (Debian's `libfaketime`): every node runs with the
//! library preloaded and reads its clock offset from a file of its own, which the nemesis
//! rewrites to jump, skew or strobe that node's clock. Only the wall clock moves
//! (`FAKETIME_DONT_FAKE_MONOTONIC`), as when an operator or NTP steps it: Raft's timers run
//! on the monotonic clock, and no safety property of chunkstore may depend on the wall clock.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where Debian puts the library (amd64 and arm64): the variant that serializes its own
/// state, since every chunkd thread reads the clock (with the plain one, a thread reading the
/// clock while another re-reads the offset file was seen to get no offset at all).
const LIBRARY_PATHS: [&str; 2] = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1"];

/// The file a node reads its clock offset from.
pub fn offset_file(node_dir: &Path) -> PathBuf {
    node_dir.join("faketime")
}

/// The preloadable library, or a clear error saying how to get it.
pub fn library() -> Result<PathBuf> {
    match LIBRARY_PATHS.iter().map(PathBuf::from).find(|p| p.exists()) {
        Some(path) => Ok(path),
        None => bail!("the clock nemesis needs libfaketime (apt-get install libfaketime); looked for {}", LIBRARY_PATHS.join(", ")),
    }
}

/// Environment for a node whose clock follows `offset_file`.
pub fn environment(library: &Path, offset_file: &Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), library.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE".into(), offset_file.display().to_string()),
        // Read the file on every call, so that a strobe takes effect at once.
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Sets a node's wall clock `offset_ms` away from the real one (libfaketime's "+S.sss" form).
pub fn set_offset(offset_file: &Path, offset_ms: i64) -> Result<()> {
    let sign = if offset_ms < 0 { '-' } else { '+' };
    let text = format!("{sign}{}.{:03}\n", offset_ms.unsigned_abs() / 1000, offset_ms.unsigned_abs() % 1000);
    // Written whole, then renamed, so that the node never reads half a line.
    let partial = offset_file.with_extension("partial");
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, offset_file).with_context(|| format!("renaming to {}", offset_file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_written_as_libfaketime_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = offset_file(dir.path());
        for (ms, text) in [(0, "+0.000\n"), (1500, "+1.500\n"), (-86_400_000, "-86400.000\n"), (-5, "-0.005\n")] {
            set_offset(&file, ms).unwrap();
            assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
        }
    }
}
