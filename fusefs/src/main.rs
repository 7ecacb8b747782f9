//! chunkfs: mounts a chunkstore volume with FUSE. See `fs.rs` for the mapping of each request
//! onto the file layer, and ARCHITECTURE.md for what is guaranteed.

mod fs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chunkfiles::{Volume, CHUNK_BYTES_DEFAULT};
use chunkstore_client::client::{Client, ClientConfig};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "chunkfs", about = "A FUSE filesystem on chunkstore: every acknowledged write() is committed to device on a quorum")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// Every write() returns once committed to device on a quorum (the default).
    Write,
    /// Writes are held in memory (up to --dirty-bytes-max for the mount) until fsync,
    /// fdatasync, close or an O_SYNC/O_DSYNC write commits them.
    Fsync,
}

#[derive(Subcommand)]
enum Commands {
    /// Mount a volume (created on first mount) at MOUNTPOINT; runs until unmounted or SIGTERM.
    Mount(MountArgs),
}

#[derive(clap::Args)]
struct MountArgs {
    /// Addresses of some cluster nodes, HOST:PORT,...
    #[arg(long, value_delimiter = ',', conflicts_with = "dir", required_unless_present = "dir")]
    seeds: Vec<String>,
    /// A local cluster's directory (chunkctl up --dir): its nodes are the seeds.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The volume to mount.
    #[arg(long, default_value = "default")]
    volume: String,
    /// The namespace the volume lives in.
    #[arg(long, default_value = "test")]
    namespace: String,
    #[arg(long, value_enum, default_value_t = Durability::Write)]
    durability: Durability,
    /// Chunk size of a volume created by this mount (a multiple of 512).
    #[arg(long, default_value_t = CHUNK_BYTES_DEFAULT)]
    chunk_bytes: u32,
    /// With --durability fsync: most bytes of writes held uncommitted by the mount, in MiB
    /// (past it, a write commits its file's held writes before returning).
    #[arg(long, default_value_t = 64)]
    dirty_mib_max: usize,
    /// Requests served at once.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// The mount's lease, in ms: its locks outlive it by at most this once it is cut off
    /// (or stopped), and its writes are refused from then on.
    #[arg(long, default_value_t = 5000)]
    lease_ms: u64,
    /// Per cluster request attempt, in ms (an operation gives up with EIO after the client's
    /// retry window of 15 s).
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// The address the mount's connections to the cluster leave from (a machine's own address;
    /// drills cut it off with a firewall rule). Default: the system's choice.
    #[arg(long)]
    source: Option<std::net::IpAddr>,
    /// UNSAFE, for negative controls only: answer each write before it is committed (the
    /// commits follow in order on a thread). A killed mount then loses acknowledged writes,
    /// which `chunkcheck files` must report.
    #[arg(long)]
    unsafe_ack_before_commit: bool,
    mountpoint: PathBuf,
}

/// The seeds of the local cluster in `dir` (its cluster.json, as chunkctl up writes it).
pub fn seeds_of_dir(dir: &std::path::Path) -> Result<Vec<String>> {
    let path = dir.join("cluster.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("no cluster in {} (start one with chunkctl up --dir {})", dir.display(), dir.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not a cluster description", path.display()))?;
    let seeds: Vec<String> = value["nodes"].as_array().into_iter().flatten().filter_map(|n| n["client"].as_str().map(str::to_owned)).collect();
    if seeds.is_empty() {
        bail!("{} lists no nodes", path.display());
    }
    Ok(seeds)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    // As mount(8)'s helper (`mount -o remount,ro MOUNTPOINT` runs mount.fuse, which runs
    // `chunkfs SOURCE MOUNTPOINT -o OPTIONS`): remounts only.
    let args: Vec<String> = std::env::args().collect();
    if args.len() >= 3 && args[1].starts_with("chunkfs:") {
        return match remount_as_helper(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("chunkfs: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Mount(args) => mount(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chunkfs: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `MOUNTPOINT -o OPTIONS` from mount.fuse: a remount (read-only or read-write) of a mounted
/// volume goes straight to the kernel; anything else is refused (mount with `chunkfs mount`).
fn remount_as_helper(args: &[String]) -> Result<()> {
    let mountpoint = &args[0];
    let options = args.iter().position(|a| a == "-o").and_then(|i| args.get(i + 1)).map_or("", String::as_str);
    let options: Vec<&str> = options.split(',').collect();
    if !options.contains(&"remount") {
        bail!("as a mount helper chunkfs only remounts; mount a volume with `chunkfs mount`");
    }
    let mut flags = libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if options.iter().rev().find(|o| **o == "ro" || **o == "rw") == Some(&"ro") {
        flags |= libc::MS_RDONLY;
    }
    let target = std::ffi::CString::new(mountpoint.as_bytes()).context("mountpoint")?;
    // SAFETY: a NUL-terminated path; no source, type or data for a remount.
    let rc = unsafe { libc::mount(std::ptr::null(), target.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
    if rc != 0 {
        bail!("remounting {mountpoint}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn mount(args: MountArgs) -> Result<()> {
    let MountArgs {
        seeds,
        dir,
        volume,
        namespace,
        durability,
        chunk_bytes,
        dirty_mib_max,
        threads,
        lease_ms,
        request_timeout_ms,
        source,
        unsafe_ack_before_commit,
        mountpoint,
    } = args;
    let (volume, namespace, mountpoint) = (volume.as_str(), namespace.as_str(), mountpoint.as_path());
    if !(200..=3_600_000).contains(&lease_ms) {
        bail!("--lease-ms {lease_ms}: 200 to 3600000");
    }
    // Before any thread starts (the lease's renewals): every thread inherits the mask, and
    // only the signal thread of `serve` takes them.
    let signals = fs::block_termination_signals();
    if !(1..=65536).contains(&dirty_mib_max) {
        bail!("--dirty-mib-max {dirty_mib_max}: 1 to 65536");
    }
    if !(1..=256).contains(&threads) {
        bail!("--threads {threads}: 1 to 256");
    }
    if !mountpoint.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    let seeds = match dir {
        Some(dir) => seeds_of_dir(&dir)?,
        None => seeds,
    };
    let mut config = ClientConfig::new(seeds.clone());
    config.timeout = Duration::from_millis(request_timeout_ms);
    config.source = source;
    let client = Client::connect(config).with_context(|| format!("connecting to the cluster at {}", seeds.join(",")))?;
    let mut volume = Volume::open(Arc::new(client), namespace, volume, Some(chunk_bytes))
        .map_err(|e| anyhow::anyhow!("opening volume {volume} in namespace {namespace}: {e}"))?;
    if durability == Durability::Fsync {
        volume.set_buffered(dirty_mib_max << 20);
    }
    volume.start_lease(Duration::from_millis(lease_ms)).map_err(|e| anyhow::anyhow!("opening the mount's lease session: {e}"))?;
    fs::serve(volume, mountpoint, fs::Serving { threads, unsafe_ack_before_commit }, signals)
}
