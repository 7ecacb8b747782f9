//! The code behind `chunkctl` and `chunkcheck` (the binaries in src/bin are thin CLIs).

pub mod bench;
pub mod bench_fs;
pub mod bench_kv;
pub mod check;
pub mod cluster_check;
pub mod engine_check;
pub mod files_check;
pub mod history;
pub mod local_cluster;
pub mod logging;
pub mod mount;
pub mod placement_check;
pub mod sim_check;
