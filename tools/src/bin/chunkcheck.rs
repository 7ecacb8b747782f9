//! chunkcheck: validation by crashing real processes. See `chunkcheck --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use chunkstore::protocol::ReadPolicy;
use chunkstore_tools::check::linearizable::Verdict;
use chunkstore_tools::check::models::Model;
use chunkstore_tools::cluster_check::nemesis::NemesisKind;
use chunkstore_tools::cluster_check::workload::Workload;
use chunkstore_tools::cluster_check::{self, RunOptions};
use chunkstore_tools::engine_check::{run_check, run_child, CheckOptions, ChildOptions};
use chunkstore_tools::files_check::journal::{self, SyncMode};
use chunkstore_tools::files_check::{self, FilesOptions, FilesWorkload, Via};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chunkcheck", about = "Crash, kill and power-cut validation of chunkstore")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

/// What every cluster workload takes.
#[derive(clap::Args)]
struct ClusterArgs {
    /// chunkd processes, each on its own loopback address 127.A.B.(10+id) (A.B from the process id).
    #[arg(long, default_value_t = 5)]
    nodes: u64,
    #[arg(long, default_value_t = 3)]
    replication_factor: usize,
    /// Raft groups of the test namespace.
    #[arg(long, default_value_t = 16)]
    groups: u32,
    /// Seconds of workload and faults (healing, recovery and the final reads come after).
    #[arg(long, default_value_t = 120)]
    time_limit: u64,
    /// Client threads, each with its own client (session).
    #[arg(long, default_value_t = 10)]
    concurrency: usize,
    /// Keys in use at a time.
    #[arg(long, default_value_t = 8)]
    keys: u64,
    /// Register and set: operations on one key before it is replaced by a fresh key.
    #[arg(long, default_value_t = 200)]
    ops_per_key: u32,
    /// Faults, comma-separated (kill, pause, partition, clock, disk, packet, wipe, wal-corrupt, roster); `none` for none.
    /// `roster` takes nodes off the roster and back, or replaces a node: a fresh chunkd joins in
    /// its place and the replaced one, once its groups have moved, is stopped and forgotten.
    #[arg(long, value_delimiter = ',', default_value = "kill,pause")]
    nemesis: Vec<String>,
    /// Seconds between faults (and the length of most faults).
    #[arg(long, default_value_t = 10)]
    nemesis_interval: u64,
    /// Seed of the fault schedule and the operations (random when absent; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for the report (default chunkcheck-runs/WORKLOAD-SEED).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Read policy of the workload's reads: linearizable, session, allow-replica or
    /// allow-unavailable. The linearizability check covers the first; the session checks the
    /// next two; allow-unavailable reads may be stale (counted as `stale_reads`) but never
    /// dirty. Final reads are always linearizable.
    #[arg(long, default_value = "linearizable")]
    read_policy: String,
    /// Extra line for every node's chunkd.toml (`KEY = VALUE`), e.g. an unsafe negative control.
    #[arg(long)]
    chunkd_option: Vec<String>,
    /// Seconds the linearizability search may take before it answers unknown.
    #[arg(long, default_value_t = 300)]
    check_time_limit: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// What `chunkcheck files` takes.
#[derive(clap::Args)]
struct FilesArgs {
    #[arg(long, value_enum)]
    workload: FilesWorkload,
    /// The front the applications write through.
    #[arg(long, value_enum, default_value_t = Via::Fuse)]
    via: Via,
    /// chunkd processes, each on its own loopback address.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    #[arg(long, default_value_t = 3)]
    replication_factor: usize,
    /// Raft groups of the test namespace.
    #[arg(long, default_value_t = 16)]
    groups: u32,
    /// Seconds of workload and faults (restarting every node and reading back come after).
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Faults, comma-separated: the cluster's (kill, pause, partition, clock, disk, packet,
    /// wipe, roster) and the applications' (app-kill: kill -9 of one application process, which
    /// restarts and recovers; fs-kill: kill -9 of chunkfs, then a fresh mount; host-pause:
    /// SIGSTOP of a machine's chunkfs and applications, then SIGCONT). In failover they hit the
    /// active instance's machine. `none` for none.
    #[arg(long, value_delimiter = ',', default_value = "kill,pause,app-kill,fs-kill")]
    nemesis: Vec<String>,
    /// Seconds between faults (and the length of most faults).
    #[arg(long, default_value_t = 10)]
    nemesis_interval: u64,
    /// Application processes (journal: one journal file each; even ones fdatasync after each
    /// record, odd ones write O_DSYNC; failover: always one instance on each of two machines).
    #[arg(long, default_value_t = 3)]
    writers: usize,
    /// Seed of the fault schedule and the records (random when absent; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for the report (default chunkcheck-runs/files-WORKLOAD-SEED).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Extra argument for every chunkfs mount, e.g. an unsafe negative control
    /// (--chunkfs-option=--unsafe-ack-before-commit).
    #[arg(long, allow_hyphen_values = true)]
    chunkfs_option: Vec<String>,
    /// Extra line for every node's chunkd.toml (`KEY = VALUE`).
    #[arg(long)]
    chunkd_option: Vec<String>,
    /// Negative control: after the run, overwrite 512 bytes in the middle of the first file
    /// (journal-0, or the database) before the check reads it: the run must report corrupt.
    #[arg(long)]
    test_corrupt_after_run: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Commands {
    /// Linearizable registers: read, write, compare-and-set on independent keys under faults.
    /// Exit code: 0 valid, 1 anomalies found, 2 unknown or the run could not complete.
    Register(ClusterArgs),
    /// Increments and reads: every read between the acknowledged and the attempted increments.
    Counter(ClusterArgs),
    /// Unique adds to sets: no acknowledged add lost, no element from nowhere.
    Set(ClusterArgs),
    /// Unique write ownership: lease sessions take locks and append to each lock's log under
    /// them; holders now and then pause past their lease, then write again. No session may
    /// write to a log after another session wrote to it, and no acknowledged append is lost
    /// (use --keys 2 or 3 for contention).
    Lock(ClusterArgs),
    /// The file layer under faults: application processes write through a real chunkfs mount
    /// while nodes, mounts and the applications themselves are killed, paused or cut off; then
    /// every node restarts and a fresh mount reads back every acknowledged write.
    /// Exit code: 0 valid, 1 acknowledged writes lost or corrupt, 2 the run could not complete.
    Files(FilesArgs),
    /// SIGKILL a writing process at random moments and check every acknowledged write.
    /// Exit code: 0 valid, 1 anomalies found, 2 the run could not complete.
    Engine {
        /// Kill/restart cycles.
        #[arg(long, default_value_t = 30)]
        cycles: u32,
        /// Run the writer on a device layer that keeps unsynced writes in process memory and
        /// tears the last write: the kill is then a power cut.
        #[arg(long)]
        power_loss: bool,
        /// UNSAFE negative control: the engine skips fdatasync. With --power-loss this run
        /// must report lost writes.
        #[arg(long)]
        unsafe_skip_fsync: bool,
        /// Seed for kill timing and operations (random when absent; always printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Directory for the device files (a fresh temporary directory when absent).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Writer threads in the child.
        #[arg(long, default_value_t = 8)]
        writers: u32,
        /// Keys written (each owned by one writer thread).
        #[arg(long, default_value_t = 256)]
        keys: u32,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
    /// Linearizable registers on a cluster in one process (nodes of the production code on
    /// memory disks over an in-memory network) under a seeded schedule of power cuts of one
    /// node or all, restarts, isolated nodes and a lossy network; ends with a power cut of every
    /// node with operations in flight. The seed fixes the schedule, not the interleaving.
    /// Exit code: 0 linearizable, 1 not, 2 unknown or the run could not complete.
    Sim {
        /// Chosen at random when not given; printed either way, with the command that replays it.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, default_value_t = 4)]
        groups: u32,
        /// Faults in the schedule, about half a second apart.
        #[arg(long, default_value_t = 20)]
        faults: usize,
        #[arg(long, default_value_t = 8)]
        keys: u64,
        #[arg(long, default_value_t = 4)]
        clients: u64,
        /// Write the history here (EDN, one event per line; `chunkcheck history` reads it).
        #[arg(long)]
        history: Option<PathBuf>,
        /// UNSAFE (negative control): the WALs never fdatasync.
        #[arg(long)]
        unsafe_wal_skip_fsync: bool,
        /// UNSAFE (negative control): leaders answer reads without checking that they still lead.
        #[arg(long)]
        unsafe_unchecked_reads: bool,
        /// UNSAFE (negative control): a replica whose disks were wiped votes at once, without
        /// catching up first.
        #[arg(long)]
        unsafe_wiped_replica_votes: bool,
        /// UNSAFE (negative control): the WALs take a failed fdatasync for a success.
        #[arg(long)]
        unsafe_wal_ignore_sync_errors: bool,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
    /// The production placement over a cluster larger than this machine can start (100 nodes,
    /// 4,096 groups by default) through seeded roster changes: what a placement costs, what
    /// each change moves against the fewest it could, the metadata entries it takes, and the
    /// placement's rules checked every time. Exit code: 0 every rule held, 1 not, 2 bad
    /// arguments.
    Placement {
        /// Chosen at random when not given; printed either way.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 100)]
        nodes: u64,
        /// A power of two, at most 4096.
        #[arg(long, default_value_t = 4096)]
        groups: u32,
        #[arg(long, default_value_t = 3)]
        replication_factor: usize,
        /// Racks the nodes are spread over, round robin (0: none declared).
        #[arg(long, default_value_t = 0)]
        racks: u64,
        /// Roster changes after the first placement.
        #[arg(long, default_value_t = 20)]
        changes: usize,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
    /// Check a recorded history (Jepsen's EDN format, one event per line) for linearizability.
    /// Exit code: 0 linearizable, 1 not, 2 unknown (the search ran out of time or memory) or
    /// the file could not be read.
    History {
        file: PathBuf,
        #[arg(long, value_enum)]
        model: Model,
        /// Give up (verdict unknown) after this many seconds.
        #[arg(long, default_value_t = 300)]
        time_limit: u64,
        /// Search every history whole: do not first fail reads no write explains, nor drop
        /// crashed writes nothing observed (to compare with the bare search).
        #[arg(long)]
        no_prune: bool,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
    /// The journal writer `files --workload journal` starts and kills (internal).
    #[command(hide = true)]
    FilesJournalWriter {
        #[arg(long)]
        file: PathBuf,
        #[arg(long, value_enum)]
        sync: SyncMode,
        #[arg(long)]
        seed: u64,
        /// Its process number in the run's history, written in each record.
        #[arg(long)]
        writer: u64,
        /// Wait for an exclusive fcntl lock on this file before writing (failover).
        #[arg(long)]
        lock: Option<PathBuf>,
        /// Refuse to write unless the file is on a FUSE mount.
        #[arg(long)]
        on_fuse: bool,
        /// Refuse to write unless libchunkpreload serves the file.
        #[arg(long)]
        on_preload: bool,
    },
    /// The writing process `engine` starts and kills (internal).
    #[command(hide = true)]
    EngineChild {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        writers: u32,
        #[arg(long)]
        keys: u32,
        #[arg(long)]
        power_loss: bool,
        #[arg(long)]
        unsafe_skip_fsync: bool,
    },
}

fn main() -> ExitCode {
    // Die quietly when output goes to a closed pipe (`| head`), as command-line tools do.
    // SAFETY: setting a signal disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let command = Cli::parse().command;
    // The simulated nodes log in this process: their warnings (elections under faults, power
    // cuts) are the expected course of a run, so only errors show unless RUST_LOG says more.
    chunkstore_tools::logging::init(if matches!(command, Commands::Sim { .. }) { "error" } else { "warn" });
    match command {
        Commands::Engine { cycles, power_loss, unsafe_skip_fsync, seed, dir, writers, keys, json } => {
            let seed = seed.unwrap_or_else(|| rand::random::<u32>() as u64);
            let temp;
            let dir = match dir {
                Some(dir) => dir,
                None => {
                    temp = std::env::temp_dir().join(format!("chunkcheck-engine-{}-{seed}", std::process::id()));
                    temp
                }
            };
            if writers == 0 || keys < writers {
                eprintln!("chunkcheck: --writers must be at least 1 and --keys at least --writers");
                return ExitCode::from(2);
            }
            eprintln!("chunkcheck engine: seed {seed}, {cycles} cycles, power loss {power_loss}, skip fsync {unsafe_skip_fsync}, dir {}", dir.display());
            let options = CheckOptions { cycles, power_loss, unsafe_skip_fsync, seed, dir: dir.clone(), writers, keys };
            let result = run_check(&options, |line| eprintln!("{line}"));
            let _ = std::fs::remove_dir_all(&dir);
            match result {
                Ok(report) => {
                    let verdict = if report.valid { "valid: every acknowledged write survived" } else { "INVALID: acknowledged writes were lost or corrupted" };
                    eprintln!(
                        "{verdict} (acked {}, lost {}, corrupt returned {}, resurrected {}, kills during defrag {})",
                        report.acked, report.lost, report.corrupt_returned, report.resurrected, report.kills_during_defrag
                    );
                    if json {
                        println!("{}", serde_json::to_string(&report).expect("report serializes"));
                    }
                    ExitCode::from(if report.valid { 0 } else { 1 })
                }
                Err(err) => {
                    eprintln!("chunkcheck engine: the run could not complete: {err:#}");
                    if json {
                        println!("{}", serde_json::json!({ "valid": "unknown", "error": format!("{err:#}"), "seed": seed }));
                    }
                    ExitCode::from(2)
                }
            }
        }
        Commands::Register(args) => cluster_run(Workload::Register, args),
        Commands::Counter(args) => cluster_run(Workload::Counter, args),
        Commands::Set(args) => cluster_run(Workload::Set, args),
        Commands::Lock(args) => cluster_run(Workload::Lock, args),
        Commands::Placement { seed, nodes, groups, replication_factor, racks, changes, json } => {
            use chunkstore_tools::placement_check::{run, PlacementOptions};
            let seed = seed.unwrap_or_else(rand::random);
            let options = PlacementOptions { seed, nodes, groups, replication_factor, racks, changes };
            eprintln!("chunkcheck placement: seed {seed}, {nodes} nodes, {groups} groups, RF {replication_factor}, {racks} racks, {changes} roster changes");
            match run(&options, &|line| eprintln!("{line}")) {
                Ok(report) => {
                    eprintln!(
                        "{}: placement took at most {:.2} ms; {} groups moved in all, {} metadata entries; replicas moved / fewest possible {:.2}",
                        if report.valid { "valid" } else { "INVALID: a placement broke its rules" },
                        report.place_ms_max,
                        report.groups_moved_total,
                        report.metadata_entries_total,
                        report.movement_ratio
                    );
                    if json {
                        println!("{}", serde_json::to_string(&report).expect("report serializes"));
                    }
                    ExitCode::from(if report.valid { 0 } else { 1 })
                }
                Err(err) => {
                    eprintln!("chunkcheck placement: {err:#}");
                    if json {
                        println!("{}", serde_json::json!({ "valid": "unknown", "error": format!("{err:#}"), "seed": seed }));
                    }
                    ExitCode::from(2)
                }
            }
        }
        Commands::Sim {
            seed,
            nodes,
            groups,
            faults,
            keys,
            clients,
            history,
            unsafe_wal_skip_fsync,
            unsafe_unchecked_reads,
            unsafe_wiped_replica_votes,
            unsafe_wal_ignore_sync_errors,
            json,
        } => {
            use chunkstore_tools::sim_check::{run, SimCheckOptions};
            let seed = seed.unwrap_or_else(rand::random);
            let options = SimCheckOptions {
                seed,
                nodes,
                groups,
                faults,
                keys,
                clients,
                history,
                unsafe_wal_skip_fsync,
                unsafe_unchecked_reads,
                unsafe_wiped_replica_votes,
                unsafe_wal_ignore_sync_errors,
            };
            eprintln!("chunkcheck sim: seed {seed}, {nodes} nodes, {groups} groups, {faults} faults, {keys} keys, {clients} clients");
            match run(&options, &|line| eprintln!("{line}")) {
                Ok(report) => {
                    let verdict = match report.verdict {
                        _ if !report.refused_to_start.is_empty() => "INVALID: a node refused to start on what its disks held",
                        _ if !report.unavailable_keys.is_empty() => "INVALID: keys unavailable after the last restart",
                        Verdict::Linearizable => "valid: linearizable",
                        Verdict::NotLinearizable => "INVALID: not linearizable",
                        Verdict::Unknown => "unknown: the checker ran out of time",
                    };
                    eprintln!(
                        "{verdict} ({} ok, {} fail, {} info; anomalies on keys {:?}); replay: {}",
                        report.ok, report.fail, report.info, report.anomalies, report.replay
                    );
                    for why in &report.refused_to_start {
                        eprintln!("refused to start: {why}");
                    }
                    if json {
                        println!("{}", serde_json::to_string(&report).expect("report serializes"));
                    }
                    ExitCode::from(match report.verdict {
                        _ if !report.unavailable_keys.is_empty() || !report.refused_to_start.is_empty() => 1,
                        Verdict::Linearizable => 0,
                        Verdict::NotLinearizable => 1,
                        Verdict::Unknown => 2,
                    })
                }
                Err(err) => {
                    eprintln!("chunkcheck sim: {err:#} (replay: seed {seed})");
                    if json {
                        println!("{}", serde_json::json!({ "valid": "unknown", "seed": seed, "error": format!("{err:#}") }));
                    }
                    ExitCode::from(2)
                }
            }
        }
        Commands::History { file, model, time_limit, no_prune, json } => {
            let mut limits = chunkstore_tools::check::linearizable::Limits::within(std::time::Duration::from_secs(time_limit));
            limits.prune = !no_prune;
            ExitCode::from(chunkstore_tools::check::history_command(&file, model, limits, json))
        }
        Commands::Files(args) => files_run(args),
        Commands::FilesJournalWriter { file, sync, seed, writer, lock, on_fuse, on_preload } => {
            match journal::run_writer(&journal::WriterOptions { file, sync, seed, writer, lock, on_fuse, on_preload }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(3),
            }
        }
        Commands::EngineChild { dir, seed, writers, keys, power_loss, unsafe_skip_fsync } => {
            match run_child(ChildOptions { dir, seed, writers, keys, power_loss, unsafe_skip_fsync }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    println!("X {err:#}");
                    ExitCode::from(3)
                }
            }
        }
    }
}

fn cluster_run(workload: Workload, args: ClusterArgs) -> ExitCode {
    let fail = |what: String| {
        eprintln!("chunkcheck: {what}");
        if args.json {
            println!("{}", serde_json::json!({ "valid": "unknown", "error": what }));
        }
        ExitCode::from(2)
    };
    let read_policy = match args.read_policy.as_str() {
        "linearizable" => ReadPolicy::Linearizable,
        "session" => ReadPolicy::Session,
        "allow-replica" => ReadPolicy::AllowReplica,
        "allow-unavailable" => ReadPolicy::AllowUnavailable,
        other => return fail(format!("--read-policy {other}: use linearizable, session, allow-replica or allow-unavailable")),
    };
    let nemeses = match parse_nemeses(&args.nemesis, false) {
        Ok(nemeses) => nemeses,
        Err(err) => return fail(err),
    };
    if args.nodes == 0 || args.replication_factor == 0 || args.replication_factor as u64 > args.nodes {
        return fail(format!("--replication-factor {} must be between 1 and --nodes {}", args.replication_factor, args.nodes));
    }
    if args.concurrency == 0 || args.keys == 0 || args.ops_per_key == 0 {
        return fail("--concurrency, --keys and --ops-per-key must be at least 1".into());
    }
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let name = format!("{workload:?}").to_lowercase();
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("chunkcheck-runs").join(format!("{name}-{seed}")));
    let options = RunOptions {
        workload,
        nodes: args.nodes,
        replication_factor: args.replication_factor,
        groups: args.groups,
        time_limit: std::time::Duration::from_secs(args.time_limit),
        concurrency: args.concurrency,
        keys: args.keys,
        ops_per_key_max: args.ops_per_key,
        nemeses,
        nemesis_interval: std::time::Duration::from_secs(args.nemesis_interval),
        seed,
        out: out.clone(),
        read_policy,
        chunkd_options: args.chunkd_option.clone(),
        check_time_limit: std::time::Duration::from_secs(args.check_time_limit),
    };
    eprintln!(
        "chunkcheck {name}: seed {seed}, {} nodes, RF {}, {} s, nemesis {:?} every {} s, report in {}",
        args.nodes,
        args.replication_factor,
        args.time_limit,
        options.nemeses,
        args.nemesis_interval,
        out.display()
    );
    cluster_check::catch_interrupts();
    let result = cluster_check::run(&options, &mut status_printer());
    let code = match &result["valid"] {
        serde_json::Value::Bool(true) => 0,
        serde_json::Value::Bool(false) => 1,
        _ => 2,
    };
    eprintln!(
        "{}: {} ops ({} ok, {} fail, {} info), {} anomalies, {} faults, recovery {} ms{}",
        match code {
            0 => "valid",
            1 => "INVALID",
            _ => "unknown",
        },
        result["ops"],
        result["ok"],
        result["fail"],
        result["info"],
        result["anomalies"],
        result["nemesis_events"],
        result["recovery_ms"],
        result["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default()
    );
    if args.json {
        println!("{result}");
    }
    ExitCode::from(code)
}

/// The faults named in --nemesis; the files workloads' own (app-kill, fs-kill) only if `files`.
fn parse_nemeses(names: &[String], files: bool) -> Result<Vec<NemesisKind>, String> {
    let mut nemeses = Vec::new();
    let known = if files {
        "kill, pause, partition, clock, disk, packet, wipe, wal-corrupt, roster, app-kill, fs-kill, host-pause, machine-cut"
    } else {
        "kill, pause, partition, clock, disk, packet, wipe, wal-corrupt, roster"
    };
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty() && *n != "none") {
        nemeses.push(match name {
            "kill" => NemesisKind::Kill,
            "pause" => NemesisKind::Pause,
            "partition" => NemesisKind::Partition,
            "clock" => NemesisKind::Clock,
            "disk" => NemesisKind::Disk,
            "packet" => NemesisKind::Packet,
            "wipe" => NemesisKind::Wipe,
            "wal-corrupt" => NemesisKind::WalCorrupt,
            "roster" => NemesisKind::Roster,
            "app-kill" if files => NemesisKind::AppKill,
            "fs-kill" if files => NemesisKind::FsKill,
            "host-pause" if files => NemesisKind::HostPause,
            "machine-cut" if files => NemesisKind::MachineCut,
            other => return Err(format!("--nemesis {other}: unknown fault ({known})")),
        });
    }
    Ok(nemeses)
}

fn files_run(args: FilesArgs) -> ExitCode {
    let fail = |what: String| {
        eprintln!("chunkcheck files: {what}");
        if args.json {
            println!("{}", serde_json::json!({ "valid": "unknown", "error": what }));
        }
        ExitCode::from(2)
    };
    let nemeses = match parse_nemeses(&args.nemesis, true) {
        Ok(nemeses) => nemeses,
        Err(err) => return fail(err),
    };
    if args.nodes == 0 || args.replication_factor == 0 || args.replication_factor as u64 > args.nodes {
        return fail(format!("--replication-factor {} must be between 1 and --nodes {}", args.replication_factor, args.nodes));
    }
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let workload = serde_json::to_value(args.workload).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("chunkcheck-runs").join(format!("files-{workload}-{seed}")));
    let options = FilesOptions {
        workload: args.workload,
        via: args.via,
        nodes: args.nodes,
        replication_factor: args.replication_factor,
        groups: args.groups,
        time_limit: std::time::Duration::from_secs(args.time_limit),
        nemeses,
        nemesis_interval: std::time::Duration::from_secs(args.nemesis_interval),
        seed,
        out: out.clone(),
        writers: args.writers,
        chunkfs_options: args.chunkfs_option.clone(),
        chunkd_options: args.chunkd_option.clone(),
        test_corrupt_after_run: args.test_corrupt_after_run,
    };
    eprintln!(
        "chunkcheck files {workload}: seed {seed}, {} nodes, {} writers, {} s, nemesis {:?} every {} s, report in {}",
        args.nodes,
        args.writers,
        args.time_limit,
        options.nemeses,
        args.nemesis_interval,
        out.display()
    );
    cluster_check::catch_interrupts();
    let result = files_check::run(&options, &mut status_printer());
    let code = match &result["valid"] {
        serde_json::Value::Bool(true) => 0,
        serde_json::Value::Bool(false) => 1,
        _ => 2,
    };
    eprintln!(
        "{}: {} acknowledged, {} lost, {} corrupt, {} dual writes, {} calls, {} faults, {} application starts{}{}",
        match code {
            0 => "valid",
            1 => "INVALID",
            _ => "unknown",
        },
        result["acked"],
        result["lost"],
        result["corrupt"],
        result["dual_writers"],
        result["ops"],
        result["nemesis_events"],
        result["app_starts"],
        match result.get("takeovers") {
            Some(n) => format!(", {n} takeovers (p50 {} ms, max {} ms)", result["takeover_p50_ms"], result["takeover_max_ms"]),
            None => String::new(),
        },
        result["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default()
    );
    if args.json {
        println!("{result}");
    }
    ExitCode::from(code)
}

/// Prints a run's progress: on a terminal, status updates rewrite one line in place; in a log,
/// one status line every 5 s.
fn status_printer() -> impl FnMut(&str) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let mut last_status: Option<std::time::Instant> = None;
    let mut on_status_line = false;
    move |line: &str| {
        let is_status = line.starts_with(cluster_check::STATUS_PREFIX);
        match (is_status, terminal) {
            (true, true) => {
                eprint!("\r\x1b[K{line}");
                on_status_line = true;
            }
            (true, false) => {
                if last_status.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) {
                    last_status = Some(std::time::Instant::now());
                    eprintln!("{line}");
                }
            }
            (false, _) => {
                if std::mem::take(&mut on_status_line) {
                    eprintln!();
                }
                eprintln!("{line}");
            }
        }
    }
}
