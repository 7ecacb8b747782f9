//! chunkctl: start chunkstore locally, look at it, benchmark it. See `chunkctl --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Context, Result};
use chunkstore::client::{Client, ClientConfig};
use chunkstore::meta::ClusterMetaExt as _;
use chunkstore::{Bin, Key, Operation, Value, WritePolicy};
use chunkstore_tools::bench::{self, BenchOptions};
use chunkstore_tools::local_cluster::{self, LocalCluster};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chunkctl", about = "Operate and benchmark chunkstore")]
struct Cli {
    /// The directory of a local cluster started by `chunkctl up`.
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Addresses of some nodes, HOST:PORT[,...] (instead of --dir).
    #[arg(long, global = true, value_delimiter = ',')]
    seeds: Vec<String>,
    /// The address this command's connections leave from (for drills that cut one client off).
    #[arg(long, global = true)]
    source: Option<std::net::IpAddr>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Start a local cluster of chunkd processes on loopback in --dir (default ./chunkstore-data),
    /// or start the stopped nodes of the one there, and wait until every group has a leader.
    Up {
        /// Nodes of a new cluster (replication factor min(3, nodes)).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Bytes of each node's device for namespace "test".
        #[arg(long, default_value_t = 256 << 20)]
        device_size: u64,
        /// Raft groups of namespace "test" (a power of two up to 4096).
        #[arg(long, default_value_t = 16)]
        groups: u32,
        /// An extra top-level setting for every node's chunkd.toml, as KEY=VALUE in TOML
        /// (repeatable; for example request-timeout-ms=2000, or the unsafe-* test options).
        #[arg(long = "chunkd-option", value_name = "KEY=VALUE", value_parser = parse_chunkd_option)]
        chunkd_options: Vec<String>,
        /// Put each node on its own loopback address (127.A.B.(10+id)) instead of 127.0.0.1,
        /// so that one node's traffic can be cut with iptables (as chunkcheck's partitions do).
        #[arg(long)]
        address_per_node: bool,
        /// Spread the nodes over this many racks (node N on rack-((N - 1) % RACKS + 1)); a
        /// group's replicas then go to distinct racks where there are enough. 0: no racks.
        #[arg(long, default_value_t = 0)]
        racks: u32,
    },
    /// Stop the local cluster in --dir cleanly (SIGTERM, then SIGKILL after 30 s).
    Down,
    /// Nodes and, per namespace, each group's leader, replicas and state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Read a record: NAMESPACE SET KEY (integer keys are integers).
    Get {
        namespace: String,
        set: String,
        key: String,
        /// session: never older than this client saw; linearizable: confirmed with a quorum;
        /// allow-replica: any replica that is up to date for this client; allow-unavailable:
        /// any replica when the group has no leader (possibly stale, never dirty).
        #[arg(long, value_enum, default_value = "session")]
        read_policy: ReadPolicyArg,
    },
    /// Write bins: NAMESPACE SET KEY BIN=VALUE... (integer values are integers).
    Put { namespace: String, set: String, key: String, bins: Vec<String> },
    /// Delete a record (durably): NAMESPACE SET KEY.
    Delete { namespace: String, set: String, key: String },
    /// Apply operations to one record atomically, in order: NAMESPACE SET KEY OP...
    /// OP is one of read:BIN, read-all, write:BIN=VALUE, add:BIN=N, append:BIN=VALUE,
    /// prepend:BIN=VALUE, write-bytes:BIN@OFFSET=TEXT (zero-fills a gap),
    /// truncate:BIN=LENGTH, delete-bin:BIN, delete-record. Integer values are integers.
    Operate {
        namespace: String,
        set: String,
        key: String,
        #[arg(required = true)]
        ops: Vec<String>,
    },
    /// Hold a lock as a lease session and write under it, for failover drills: opens a session
    /// (renewed every third of --ttl-ms), takes the record NAMESPACE SET KEY as a lock (waiting
    /// up to --wait-ms), then appends "SESSION:N;" to bin "log" of record KEY-data every
    /// --write-every-ms, as writes of the session. Prints one JSON object per event on stdout
    /// ({"event": "session"|"locked"|"write"|"lease", ...}; a write's "lease_held" says whether
    /// a renewal sent less than a TTL before it was confirmed); stops after --writes writes (0:
    /// never; after them the session is closed), and exits 2 if the lock was not taken.
    Lock {
        namespace: String,
        set: String,
        key: String,
        #[arg(long, default_value_t = 2000)]
        ttl_ms: u64,
        #[arg(long, default_value_t = 30_000)]
        wait_ms: u64,
        #[arg(long, default_value_t = 100)]
        write_every_ms: u64,
        #[arg(long, default_value_t = 0)]
        writes: u64,
    },
    /// The roster: the nodes that own data. Changing it moves groups to where it puts them,
    /// a few at a time (progress in `status`).
    #[command(subcommand)]
    Roster(RosterCommand),
    /// Add a node to, or remove one from, the local cluster in --dir.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Rebuild a dead group (status says `dead`: a majority of its replicas lost their copy)
    /// from its best surviving replica, and say what may have been lost: writes acknowledged
    /// with a log index above the survivor's last entry. Refused for a group that is not dead.
    /// The metadata group is `$meta 0` (quote it in a shell: '$meta').
    Revive {
        namespace: String,
        group: u32,
        /// Print one JSON object: survivor, last_term, last_index, report.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Volumes of the file layer (what chunkfs mounts).
    #[command(subcommand)]
    Fs(FsCommand),
}

#[derive(Subcommand)]
enum FsCommand {
    /// Create a volume (chunkfs also creates one on its first mount).
    Create {
        volume: String,
        #[arg(long, default_value = "test")]
        namespace: String,
        /// Bytes per data chunk, a multiple of 512, fixed for the volume's life.
        #[arg(long, default_value_t = chunkfiles::CHUNK_BYTES_DEFAULT)]
        chunk_bytes: u32,
        #[arg(long)]
        json: bool,
    },
    /// List a directory of a volume.
    Ls {
        volume: String,
        #[arg(default_value = "/")]
        path: String,
        #[arg(long, default_value = "test")]
        namespace: String,
        #[arg(long)]
        json: bool,
    },
    /// An inode's attributes (a path in the volume; a final symlink is not followed).
    Stat {
        volume: String,
        path: String,
        #[arg(long, default_value = "test")]
        namespace: String,
        #[arg(long)]
        json: bool,
    },
    /// Check a volume: dangling entries, wrong link counts, orphaned inodes and their data.
    /// Exit 0 consistent (or repaired), 1 problems left. Run --repair on a quiet volume.
    Fsck {
        volume: String,
        #[arg(long, default_value = "test")]
        namespace: String,
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RosterCommand {
    /// The roster, every node (with its rack), and how many groups are where it puts them.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Make NODE... the roster (node ids; at least as many as the largest replication factor).
    Set {
        #[arg(required = true)]
        nodes: Vec<u64>,
        /// Wait until every group is where the new roster puts it.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Start one more chunkd for the local cluster in --dir and put it on the roster: groups
    /// then move to it (on real machines: start a chunkd, then `roster set`).
    Add {
        /// The new node's rack (replicas of a group go to distinct racks where there are enough).
        #[arg(long)]
        rack: Option<String>,
        /// Wait until every group is where the new roster puts it.
        #[arg(long)]
        wait: bool,
    },
    /// Take NODE off the roster, wait until its groups have moved away (and, for a metadata
    /// voter, another roster node took its place), then stop it and remove it from the cluster
    /// (on real machines: `roster set` without it, wait, stop it, and drop its [[nodes]] entry).
    Remove {
        node: u64,
        /// Give up (leaving the node running) after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ReadPolicyArg {
    Session,
    Linearizable,
    AllowReplica,
    AllowUnavailable,
}

impl ReadPolicyArg {
    fn policy(self) -> chunkstore::protocol::ReadPolicy {
        use chunkstore::protocol::ReadPolicy;
        match self {
            ReadPolicyArg::Session => ReadPolicy::Session,
            ReadPolicyArg::Linearizable => ReadPolicy::Linearizable,
            ReadPolicyArg::AllowReplica => ReadPolicy::AllowReplica,
            ReadPolicyArg::AllowUnavailable => ReadPolicy::AllowUnavailable,
        }
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// 4 KiB puts and gets against a running cluster (--dir or --seeds), per client count, with
    /// pwrite+fdatasync of 4 KiB on the local disk measured in the same run.
    /// A fresh chunkfs volume of the cluster against local ext4 (the cluster's directory),
    /// job by job with fio: journal (4 KiB writes + fdatasync, 1 and 8 jobs), dsync-append
    /// (512 B O_DSYNC appends), random-read (4 KiB, 1 and 8 jobs), sequential-write (1 MiB,
    /// fsync at the end), sequential-read (1 MiB), with `bench kv`'s one-client put rate in
    /// the same run.
    Fs {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Chunk size of the fresh volume (a multiple of 512).
        #[arg(long, default_value_t = chunkfiles::CHUNK_BYTES_DEFAULT)]
        chunk_bytes: u32,
        #[arg(long, default_value = "test")]
        namespace: String,
        /// Print the report as one JSON line at the end.
        #[arg(long)]
        json: bool,
    },
    Kv {
        /// Comma-separated client counts.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<u32>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, value_enum, default_value = "session")]
        read_policy: ReadPolicyArg,
        /// Namespace to write in.
        #[arg(long, default_value = "test")]
        namespace: String,
        /// Comma-separated operations to measure per client count (put, get).
        #[arg(long, value_delimiter = ',', default_value = "put,get")]
        ops: Vec<String>,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
    /// 4 KiB puts with commit-to-device per writer count, against pwrite+fdatasync on a plain
    /// file in the same run, and the cold-start scan.
    Engine {
        /// Comma-separated writer counts.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        writers: Vec<u32>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Where the device files go (on the disk to measure).
        #[arg(long, default_value = "bench-data")]
        dir: PathBuf,
        /// Records for the cold-start measurement (0 skips it).
        #[arg(long, default_value_t = 1_000_000)]
        cold_start_records: u64,
        /// Bytes per record value in the cold-start measurement.
        #[arg(long, default_value_t = 512)]
        cold_start_value_bytes: usize,
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Die quietly when output goes to a closed pipe (`| head`), as command-line tools do.
    // SAFETY: setting a signal disposition at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    chunkstore_tools::logging::init("warn");
    let result = match cli.command {
        Commands::Up { nodes, device_size, groups, chunkd_options, address_per_node, racks } => {
            let dir = cli.dir.clone().unwrap_or_else(|| PathBuf::from("chunkstore-data"));
            let options = local_cluster::UpOptions {
                nodes,
                device_bytes: device_size,
                groups,
                chunkd_options: chunkd_options.iter().map(|o| o.replacen('=', " = ", 1)).collect(),
                address_per_node,
                racks,
            };
            local_cluster::up(&dir, &options, &mut |line| eprintln!("{line}")).map(|cluster| {
                let seeds = cluster.seeds().join(",");
                let me = std::env::args().next().unwrap_or_else(|| "chunkctl".into());
                println!(
                    "chunkstore is up: {} nodes, namespace \"test\" ({groups} groups, replication factor {})",
                    cluster.nodes.len(),
                    cluster.nodes.len().min(3)
                );
                println!("  seeds: {seeds}");
                println!("  try:   {me} --dir {} put test demo k1 greeting=hello", dir.display());
                println!("         {me} --dir {} get test demo k1", dir.display());
                println!("         {me} --dir {} status", dir.display());
                println!("  stop:  {me} --dir {} down", dir.display());
            })
        }
        Commands::Down => {
            let dir = cli.dir.clone().unwrap_or_else(|| PathBuf::from("chunkstore-data"));
            local_cluster::down(&dir, Duration::from_secs(30), &mut |line| eprintln!("{line}"))
        }
        Commands::Status { json } => client(&cli).and_then(|client| status(&client, json)),
        Commands::Get { ref namespace, ref set, ref key, read_policy } => client(&cli).and_then(|client| {
            let record = client.get_with(namespace, &user_key(set, key), None, read_policy.policy())?;
            match record {
                Some(record) => {
                    println!("generation {}", record.meta.generation);
                    for bin in record.bins {
                        println!("{} = {}", bin.name, show(&bin.value));
                    }
                }
                None => println!("(no record)"),
            }
            Ok(())
        }),
        Commands::Put { ref namespace, ref set, ref key, ref bins } => client(&cli).and_then(|client| {
            let bins = bins.iter().map(|b| parse_bin(b)).collect::<Result<Vec<_>>>()?;
            let meta = client.put(namespace, &user_key(set, key), bins, &WritePolicy::default())?;
            println!("written: generation {}", meta.generation);
            Ok(())
        }),
        Commands::Delete { ref namespace, ref set, ref key } => client(&cli).and_then(|client| {
            client.delete(namespace, &user_key(set, key), &WritePolicy::default())?;
            println!("deleted");
            Ok(())
        }),
        Commands::Operate { ref namespace, ref set, ref key, ref ops } => (|| {
            let ops = ops.iter().map(|op| parse_operation(op)).collect::<Result<Vec<_>>>()?;
            let client = client(&cli)?;
            let (meta, results) = client.operate(namespace, &user_key(set, key), ops, &WritePolicy::default())?;
            println!("written: generation {}", meta.generation);
            for result in results {
                match result.value {
                    Some(value) => println!("{} = {}", result.bin, show(&value)),
                    None => println!("{} = (none)", result.bin),
                }
            }
            Ok(())
        })(),
        Commands::Lock { ref namespace, ref set, ref key, ttl_ms, wait_ms, write_every_ms, writes } => client(&cli).and_then(|client| {
            let drill = LockDrill {
                namespace,
                set,
                key,
                ttl: Duration::from_millis(ttl_ms),
                wait: Duration::from_millis(wait_ms),
                write_every: Duration::from_millis(write_every_ms),
                writes,
            };
            hold_lock(std::sync::Arc::new(client), &drill)
        }),
        Commands::Revive { ref namespace, group, json } => client_with_timeout(&cli, Duration::from_secs(30)).and_then(|client| {
            let revived = client.revive(namespace, group)?;
            match json {
                true => println!("{}", serde_json::to_string(&revived)?),
                false => println!("{}", revived.report),
            }
            Ok(())
        }),
        Commands::Roster(RosterCommand::Show { json }) => client(&cli).and_then(|client| roster_show(&client, json)),
        Commands::Roster(RosterCommand::Set { ref nodes, wait }) => client(&cli).and_then(|client| {
            client.set_roster(nodes)?;
            println!("roster set to {nodes:?}: groups move to where it puts them (chunkctl status shows progress)");
            if wait {
                local_cluster::wait_for_balance(&client, Duration::from_secs(3600), &mut |line| eprintln!("{line}"))?;
                println!("every group is where the roster puts it");
            }
            Ok(())
        }),
        Commands::Node(NodeCommand::Add { ref rack, wait }) => (|| {
            let dir = cli.dir.clone().unwrap_or_else(|| PathBuf::from("chunkstore-data"));
            let node = local_cluster::add_node(&dir, rack.as_deref(), &mut |line| eprintln!("{line}"))?;
            let client = client(&cli)?;
            let mut roster = client.cluster_meta()?.roster;
            roster.push(node.id);
            client.set_roster(&roster)?;
            println!("node {} joined at {} and is on the roster {roster:?}: groups move to it (chunkctl status shows progress)", node.id, node.client);
            if wait {
                local_cluster::wait_for_balance(&client, Duration::from_secs(3600), &mut |line| eprintln!("{line}"))?;
                println!("every group is where the roster puts it");
            }
            Ok(())
        })(),
        Commands::Node(NodeCommand::Remove { node, timeout_s }) => {
            let dir = cli.dir.clone().unwrap_or_else(|| PathBuf::from("chunkstore-data"));
            local_cluster::remove_node(&dir, node, Duration::from_secs(timeout_s), &mut |line| eprintln!("{line}"))
        }
        Commands::Fs(ref command) => return fs_command(&cli, command),
        Commands::Bench(BenchCommand::Kv { ref clients, seconds, read_policy, ref namespace, ref ops, json }) => (|| {
            let ops = ops
                .iter()
                .map(|op| chunkstore_tools::bench_kv::OPS.into_iter().find(|known| known == op).ok_or_else(|| anyhow::anyhow!("--ops {op}: one of put, get")))
                .collect::<Result<Vec<_>>>()?;
            let (seeds, baseline_dir, node_pids) = match (&cli.seeds, &cli.dir) {
                (seeds, _) if !seeds.is_empty() => (seeds.clone(), PathBuf::from("bench-data"), Vec::new()),
                (_, dir) => {
                    let dir = dir.clone().unwrap_or_else(|| PathBuf::from("chunkstore-data"));
                    let cluster = LocalCluster::load(&dir)?;
                    (cluster.seeds(), dir, cluster.pids())
                }
            };
            let read_policy = read_policy.policy();
            let options = chunkstore_tools::bench_kv::KvBenchOptions {
                seeds,
                namespace: namespace.clone(),
                clients: clients.clone(),
                seconds,
                read_policy,
                baseline_dir,
                node_pids,
                ops,
            };
            let report = chunkstore_tools::bench_kv::run(&options, |line| eprintln!("{line}"))?;
            if json {
                println!("{}", serde_json::to_string(&report).expect("report serializes"));
            }
            Ok(())
        })(),
        Commands::Bench(BenchCommand::Fs { seconds, chunk_bytes, ref namespace, json }) => (|| {
            let (seeds, local_dir, node_pids) = match (&cli.seeds, &cli.dir) {
                (seeds, _) if !seeds.is_empty() => (seeds.clone(), PathBuf::from("bench-data"), Vec::new()),
                (_, dir) => {
                    let dir = dir.clone().unwrap_or_else(|| PathBuf::from("chunkstore-data"));
                    let cluster = LocalCluster::load(&dir)?;
                    (cluster.seeds(), dir, cluster.pids())
                }
            };
            if !(0.5..=3600.0).contains(&seconds) {
                anyhow::bail!("--seconds {seconds}: 0.5 to 3600");
            }
            let chunkfs = std::env::current_exe()?.with_file_name("chunkfs");
            let local_dir = std::fs::canonicalize(&local_dir).unwrap_or(local_dir);
            let preload = Some(std::env::current_exe()?.with_file_name("libchunkpreload.so")).filter(|p| p.exists());
            if preload.is_none() {
                eprintln!("libchunkpreload.so is not next to chunkctl: the shim's jobs are skipped");
            }
            let options = chunkstore_tools::bench_fs::FsBenchOptions {
                seeds,
                local_dir,
                namespace: namespace.clone(),
                seconds,
                chunkfs,
                chunk_bytes,
                preload,
                node_pids,
            };
            let report = chunkstore_tools::bench_fs::run(&options, |line| eprintln!("{line}"))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(())
        })(),
        Commands::Bench(BenchCommand::Engine { writers, seconds, dir, cold_start_records, cold_start_value_bytes, json }) => {
            let options = BenchOptions { writers, seconds, dir: dir.clone(), cold_start_records, cold_start_value_bytes };
            let created_dir = !dir.exists();
            bench::run(&options, |line| eprintln!("{line}")).map(|report| {
                if created_dir {
                    let _ = std::fs::remove_dir(&dir);
                }
                if json {
                    println!("{}", serde_json::to_string(&report).expect("report serializes"));
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chunkctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}

struct LockDrill<'a> {
    namespace: &'a str,
    set: &'a str,
    key: &'a str,
    ttl: Duration,
    wait: Duration,
    write_every: Duration,
    writes: u64,
}

/// `chunkctl lock`: see its help.
fn hold_lock(client: std::sync::Arc<Client>, drill: &LockDrill) -> Result<()> {
    use chunkstore::client::{ClientError, KeptSession};
    use chunkstore::protocol::ErrorReply;
    let event = |value: serde_json::Value| println!("{value}");
    // Renewed every third of the TTL by the session's own thread, which reports failures.
    let kept = KeptSession::open(client.clone(), drill.ttl, |err| {
        let expired = matches!(err, ClientError::Server(ErrorReply::SessionExpired { .. }));
        println!("{}", serde_json::json!({"event": "lease", "error": err.to_string(), "session_expired": expired}));
    })?;
    let session = kept.id();
    event(serde_json::json!({"event": "session", "session": session, "ttl_ms": drill.ttl.as_millis() as u64}));
    if let Err(err) = client.lock(session, drill.namespace, &user_key(drill.set, drill.key), drill.wait) {
        event(serde_json::json!({"event": "lock-failed", "error": err.to_string()}));
        drop(kept);
        std::process::exit(2);
    }
    event(serde_json::json!({"event": "locked", "session": session}));
    let data = user_key(drill.set, &format!("{}-data", drill.key));
    let mut n = 1;
    while drill.writes == 0 || n <= drill.writes {
        let append = Operation::Append { bin: "log".into(), value: Value::String(format!("{session}:{n};")) };
        let op = chunkstore::WriteOp::Operate(vec![append]);
        // Whether the holder, by its own renewals, still knew its lease held when it wrote.
        let held = kept.held();
        match client.write_in_session(session, drill.namespace, &data, op, &WritePolicy::default()) {
            Ok(_) => event(serde_json::json!({"event": "write", "n": n, "ok": true, "lease_held": held})),
            Err(err) => {
                let expired = matches!(err, ClientError::Server(ErrorReply::SessionExpired { .. }));
                event(serde_json::json!({"event": "write", "n": n, "ok": false, "error": err.to_string(), "session_expired": expired, "lease_held": held}));
            }
        }
        n += 1;
        std::thread::sleep(drill.write_every);
    }
    // Closes the session: the cluster fences it, then releases the lock.
    drop(kept);
    std::process::exit(0)
}

fn open_volume(cli: &Cli, namespace: &str, volume: &str) -> Result<chunkfiles::Volume> {
    let client = std::sync::Arc::new(client(cli)?);
    chunkfiles::Volume::open(client, namespace, volume, None).map_err(|e| match e {
        chunkfiles::FsError::NotFound => anyhow::anyhow!("no volume {volume:?} in namespace {namespace} (chunkctl fs create {volume})"),
        other => anyhow::anyhow!("volume {volume}: {other}"),
    })
}

fn attr_json(attr: &chunkfiles::Attr) -> serde_json::Value {
    serde_json::json!({
        "ino": attr.ino, "kind": format!("{:?}", attr.kind).to_lowercase(), "perm": format!("{:o}", attr.perm), "nlink": attr.nlink,
        "uid": attr.uid, "gid": attr.gid, "size": attr.size, "mtime_ns": attr.mtime_ns, "ctime_ns": attr.ctime_ns,
    })
}

/// `chunkctl fs ...`: exit 0, 1 (fsck found problems left), or 2 (could not run).
fn fs_command(cli: &Cli, command: &FsCommand) -> ExitCode {
    let result: Result<bool> = (|| match command {
        FsCommand::Create { volume, namespace, chunk_bytes, json } => {
            let client = client(cli)?;
            chunkfiles::Volume::create(&client, namespace, volume, *chunk_bytes).map_err(|e| match e {
                chunkfiles::FsError::Exists => anyhow::anyhow!("volume {volume:?} exists in namespace {namespace}"),
                other => anyhow::anyhow!("creating volume {volume}: {other}"),
            })?;
            match json {
                true => println!("{}", serde_json::json!({"volume": volume, "namespace": namespace, "chunk_bytes": chunk_bytes, "created": true})),
                false => println!("volume {volume} created in namespace {namespace} ({chunk_bytes}-byte chunks)"),
            }
            Ok(true)
        }
        FsCommand::Ls { volume, path, namespace, json } => {
            let volume = open_volume(cli, namespace, volume)?;
            let dir = volume.resolve(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            let (_, entries) = volume.readdir(dir.ino).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            let mut listed = Vec::new();
            for (name, entry) in entries {
                let name = String::from_utf8_lossy(&name).into_owned();
                match volume.getattr(entry.ino) {
                    Ok(attr) => listed.push((name, Some(attr))),
                    Err(_) => listed.push((name, None)),
                }
            }
            if *json {
                let entries: Vec<serde_json::Value> = listed
                    .iter()
                    .map(|(name, attr)| match attr {
                        Some(attr) => serde_json::json!({"name": name, "attr": attr_json(attr)}),
                        None => serde_json::json!({"name": name, "attr": null}),
                    })
                    .collect();
                println!("{}", serde_json::json!({"path": path, "entries": entries}));
            } else {
                for (name, attr) in listed {
                    match attr {
                        Some(a) => println!("{:>10} {:>5o} {:>3} {:>12} {name}", format!("{:?}", a.kind).to_lowercase(), a.perm, a.nlink, a.size),
                        None => println!("{:>10} {name} (dangling: fsck finds it)", "?"),
                    }
                }
            }
            Ok(true)
        }
        FsCommand::Stat { volume, path, namespace, json } => {
            let volume = open_volume(cli, namespace, volume)?;
            let attr = volume.resolve(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            match json {
                true => println!("{}", attr_json(&attr)),
                false => println!(
                    "{path}: inode {} {:?} perm {:o} links {} uid {} gid {} size {}",
                    attr.ino, attr.kind, attr.perm, attr.nlink, attr.uid, attr.gid, attr.size
                ),
            }
            Ok(true)
        }
        FsCommand::Fsck { volume, namespace, repair, json } => {
            let opened = open_volume(cli, namespace, volume)?;
            let report = opened.fsck(*repair).map_err(|e| anyhow::anyhow!("fsck of {volume}: {e}"))?;
            let clean = report.problems.is_empty() || report.repaired == report.problems.len() as u64;
            if *json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                for problem in &report.problems {
                    println!("problem: {problem}");
                }
                println!(
                    "volume {volume}: {} inodes ({} directories, {} files, {} bytes), {} problems, {} repaired",
                    report.inodes,
                    report.directories,
                    report.files,
                    report.bytes,
                    report.problems.len(),
                    report.repaired
                );
            }
            Ok(clean)
        }
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("chunkctl: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// A client for --seeds, or for the cluster in --dir (default ./chunkstore-data).
fn client(cli: &Cli) -> Result<Client> {
    client_with_timeout(cli, ClientConfig::new(Vec::new()).timeout)
}

/// A client whose requests may each take up to `timeout`.
fn client_with_timeout(cli: &Cli, timeout: Duration) -> Result<Client> {
    let seeds = if !cli.seeds.is_empty() {
        cli.seeds.clone()
    } else {
        let dir = cli.dir.clone().unwrap_or_else(|| PathBuf::from("chunkstore-data"));
        LocalCluster::load(&dir)?.seeds()
    };
    Client::connect(ClientConfig { source: cli.source, timeout, ..ClientConfig::new(seeds) }).context("connecting to the cluster")
}

fn user_key(set: &str, key: &str) -> Key {
    match key.parse::<i64>() {
        Ok(int) => Key::new(set, int),
        Err(_) => Key::new(set, key),
    }
}

fn parse_bin(text: &str) -> Result<Bin> {
    let (name, value) = text.split_once('=').with_context(|| format!("{text:?} is not BIN=VALUE"))?;
    let value = match value.parse::<i64>() {
        Ok(int) => Value::Int(int),
        Err(_) => Value::String(value.to_owned()),
    };
    Ok(Bin::new(name, value))
}

/// One `operate` step from its command-line form (see `chunkctl operate --help`).
fn parse_operation(text: &str) -> Result<Operation> {
    let (kind, arg) = text.split_once(':').unwrap_or((text, ""));
    let bin_value = || -> Result<(String, Value)> {
        let bin = parse_bin(arg).with_context(|| format!("{text:?}: expected {kind}:BIN=VALUE"))?;
        Ok((bin.name, bin.value))
    };
    let integer = |value: &str, what: &str| value.parse::<i64>().with_context(|| format!("{text:?}: {what} {value:?} is not an integer"));
    Ok(match kind {
        "read" if !arg.is_empty() => Operation::Read { bin: arg.to_owned() },
        "read-all" => Operation::ReadAll,
        "write" => Operation::Write(parse_bin(arg)?),
        "add" => {
            let (bin, value) = arg.split_once('=').with_context(|| format!("{text:?}: expected add:BIN=N"))?;
            Operation::Add { bin: bin.to_owned(), delta: integer(value, "the delta")? }
        }
        "append" => bin_value().map(|(bin, value)| Operation::Append { bin, value })?,
        "prepend" => bin_value().map(|(bin, value)| Operation::Prepend { bin, value })?,
        "write-bytes" => {
            let (target, data) = arg.split_once('=').with_context(|| format!("{text:?}: expected write-bytes:BIN@OFFSET=TEXT"))?;
            let (bin, offset) = target.split_once('@').with_context(|| format!("{text:?}: expected write-bytes:BIN@OFFSET=TEXT"))?;
            let offset = u64::try_from(integer(offset, "the offset")?).with_context(|| format!("{text:?}: negative offset"))?;
            Operation::WriteBytesAt { bin: bin.to_owned(), offset, data: data.as_bytes().to_vec(), zero_fill: true }
        }
        "truncate" => {
            let (bin, len) = arg.split_once('=').with_context(|| format!("{text:?}: expected truncate:BIN=LENGTH"))?;
            let len = u64::try_from(integer(len, "the length")?).with_context(|| format!("{text:?}: negative length"))?;
            Operation::TruncateBytes { bin: bin.to_owned(), len }
        }
        "delete-bin" if !arg.is_empty() => Operation::DeleteBin { bin: arg.to_owned() },
        "delete-record" => Operation::DeleteRecord,
        _ => anyhow::bail!("{text:?} is not an operation (see chunkctl operate --help)"),
    })
}

fn show(value: &Value) -> String {
    match value {
        Value::Int(v) => v.to_string(),
        Value::Float(v) => v.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Bytes(b) => format!("<{} bytes>", b.len()),
    }
}

fn status(client: &Client, json: bool) -> Result<()> {
    // Each node knows the leaders of the groups it replicates: ask every node.
    let map = client.cluster_map();
    let mut groups: Vec<serde_json::Value> = Vec::new();
    let mut nodes_up = Vec::new();
    let mut views = Vec::new();
    for (id, addr) in &map.nodes {
        let view = Client::connect(ClientConfig { retries_max: 0, timeout: Duration::from_secs(2), ..ClientConfig::new(vec![addr.clone()]) });
        nodes_up.push(serde_json::json!({ "id": id, "address": addr, "up": view.is_ok() }));
        if let Ok(view) = view {
            views.push((*id, view.cluster_map()));
        }
    }
    // Moves and the roster come from the metadata leader (absent while it has no quorum).
    let meta = client.cluster_meta().ok();
    // How far each move is, as the metadata leader driving it last heard (best effort).
    let stages = meta.as_ref().and_then(|_| client.move_stages().ok()).unwrap_or_default();
    let preferred = meta.as_ref().map(|m| m.preferred_leaders()).unwrap_or_default();
    for ns in &map.namespaces {
        let known = meta.as_ref().and_then(|m| m.namespace(&ns.name));
        let preferred = preferred.get(&ns.name);
        let moves = known.map(|n| n.moves.clone()).unwrap_or_default();
        for group in 0..ns.groups as usize {
            // The metadata leader's placement when it answered, else the answering node's.
            let replicas = known.and_then(|n| n.placement.get(group)).unwrap_or(&ns.replicas[group]);
            let moving_to = moves.get(&(group as u32));
            let move_stage = moving_to.and_then(|_| stages.iter().find(|s| s.namespace == ns.name && s.group == group as u32)).map(|s| s.stage.clone());
            let leader = views
                .iter()
                .filter(|(id, _)| replicas.contains(id))
                .find_map(|(_, view)| view.namespaces.iter().find(|n| n.name == ns.name).and_then(|n| n.leaders[group]));
            let leader_up = leader.is_some_and(|l| views.iter().any(|(id, _)| *id == l));
            // Each node reports its own replica: whether it lost its copy, and whether it takes
            // the group for dead (too many replicas lost theirs for a quorum).
            let reported = |pick: fn(&chunkstore::protocol::NamespaceMap) -> &Vec<u32>| -> Vec<u64> {
                views
                    .iter()
                    .filter(|(id, view)| replicas.contains(id) && view.namespaces.iter().any(|n| n.name == ns.name && pick(n).contains(&(group as u32))))
                    .map(|(id, _)| *id)
                    .collect()
            };
            let lost_copy = reported(|n| &n.lost);
            let dead = !reported(|n| &n.dead).is_empty();
            let reachable = replicas.iter().filter(|r| views.iter().any(|(id, _)| id == *r)).count();
            let state = match (leader, leader_up) {
                (Some(_), true) => "ok",
                _ if dead => "dead",
                _ if reachable < replicas.len() / 2 + 1 => "unavailable",
                (Some(_), false) => "leader-down",
                (None, _) => "no-leader",
            };
            let preferred_leader = preferred.and_then(|p| p.get(group));
            groups.push(serde_json::json!({
                "namespace": ns.name, "group": group, "leader": leader, "preferred_leader": preferred_leader,
                "replicas": replicas, "state": state, "moving_to": moving_to, "move_stage": move_stage, "lost_copy": lost_copy,
            }));
        }
    }
    // The metadata group: its voters, and its leader as any voter that is up knows it.
    let voters = &map.metadata_voters;
    let meta_leader = views.iter().filter(|(id, _)| voters.contains(id)).find_map(|(_, view)| view.metadata_leader);
    // "ok" only when the metadata leader confirmed itself with a quorum (it answered the
    // metadata); a leader that some voter still believes in may have lost its quorum.
    // Voters that lost their copy, as the voters that are up know them (each its own, the
    // others' from their health reports), and whether that leaves the group dead.
    let mut meta_lost: Vec<u64> = views.iter().filter(|(id, _)| voters.contains(id)).flat_map(|(_, view)| view.metadata_lost.clone()).collect();
    meta_lost.sort_unstable();
    meta_lost.dedup();
    let meta_dead = views.iter().any(|(id, view)| voters.contains(id) && view.metadata_dead);
    let meta_reachable = voters.iter().filter(|v| views.iter().any(|(id, _)| id == *v)).count();
    let meta_state = match (&meta, meta_leader) {
        (Some(_), _) => "ok",
        _ if meta_dead => "dead",
        _ if meta_reachable < voters.len() / 2 + 1 => "unavailable",
        (None, Some(_)) => "unconfirmed",
        (None, None) => "no-leader",
    };
    let metadata = serde_json::json!({ "voters": voters, "leader": meta_leader, "state": meta_state, "lost_copy": meta_lost });
    let down: Vec<u64> = nodes_up.iter().filter(|n| n["up"] != true).filter_map(|n| n["id"].as_u64()).collect();
    let problems = health_problems(&down, &metadata, &groups);
    let rebalance: Vec<serde_json::Value> = meta
        .iter()
        .flat_map(|m| m.balance())
        .map(|(namespace, placed, total)| serde_json::json!({ "namespace": namespace, "placed": placed, "groups": total }))
        .collect();
    let roster = meta.as_ref().map(|m| m.roster.clone());
    let leaders = leadership_counts(&map.nodes, &groups);
    if json {
        let health = serde_json::json!({ "ok": problems.is_empty(), "problems": problems });
        println!(
            "{}",
            serde_json::json!({
                "health": health, "nodes": nodes_up, "metadata": metadata, "roster": roster,
                "rebalance": rebalance, "leaders": leaders, "groups": groups,
            })
        );
        return Ok(());
    }
    match problems.len() {
        0 => println!("health: ok: every node is up and every group has a leader"),
        n => {
            println!("health: {n} problem{}:", if n == 1 { "" } else { "s" });
            for problem in &problems {
                println!("  - {problem}");
            }
        }
    }
    for node in &nodes_up {
        println!("node {} at {}: {}", node["id"], node["address"].as_str().unwrap_or(""), if node["up"] == true { "up" } else { "DOWN" });
    }
    println!("metadata group: voters {} leader {} {}", metadata["voters"], metadata["leader"], metadata["state"].as_str().unwrap_or(""));
    match &roster {
        Some(roster) => println!("roster: {roster:?}"),
        None => println!("roster: unknown (the metadata leader did not answer)"),
    }
    for b in &rebalance {
        let (placed, total) = (b["placed"].as_u64().unwrap_or(0) as u32, b["groups"].as_u64().unwrap_or(0) as u32);
        let word = if placed == total { "balanced" } else { "rebalancing" };
        println!("{} {} {placed}/{total} groups placed: {word}", b["namespace"].as_str().unwrap_or(""), progress_bar(placed, total));
    }
    let words: Vec<String> = leaders.iter().map(|l| format!("node {} {}/{}", l["node"], l["leads"], l["preferred"])).collect();
    println!("groups led/preferred: {}", words.join(", "));
    for group in &groups {
        let moving = match (&group["moving_to"], group["move_stage"].as_str()) {
            (serde_json::Value::Null, _) => String::new(),
            (to, Some(stage)) => format!(" moving to {to}: {stage}"),
            (to, None) => format!(" moving to {to}"),
        };
        println!(
            "{}/{:<3} leader {:<4} replicas {} {}{moving}",
            group["namespace"].as_str().unwrap_or(""),
            group["group"],
            group["leader"],
            group["replicas"],
            group["state"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Per node: how many groups it leads, and for how many it is the preferred leader (the
/// leaders hand groups over until the two agree).
fn leadership_counts(nodes: &[(u64, String)], groups: &[serde_json::Value]) -> Vec<serde_json::Value> {
    nodes
        .iter()
        .map(|(id, _)| {
            let leads = groups.iter().filter(|g| g["leader"].as_u64() == Some(*id)).count();
            let preferred = groups.iter().filter(|g| g["preferred_leader"].as_u64() == Some(*id)).count();
            serde_json::json!({ "node": id, "leads": leads, "preferred": preferred })
        })
        .collect()
}

/// `roster show`.
fn roster_show(client: &Client, json: bool) -> Result<()> {
    let meta = client.cluster_meta().context("reading the cluster metadata")?;
    let balance: Vec<serde_json::Value> = meta
        .balance()
        .into_iter()
        .map(|(namespace, placed, groups)| serde_json::json!({ "namespace": namespace, "placed": placed, "groups": groups }))
        .collect();
    let nodes: Vec<serde_json::Value> = meta
        .nodes
        .iter()
        .map(|n| serde_json::json!({ "id": n.id, "client": n.client, "peer": n.peer, "rack": n.rack, "on_roster": meta.roster.contains(&n.id) }))
        .collect();
    if json {
        println!("{}", serde_json::json!({ "roster": meta.roster, "nodes": nodes, "metadata_voters": meta.metadata_voters, "balance": balance }));
        return Ok(());
    }
    println!("roster: {:?}", meta.roster);
    for n in &meta.nodes {
        let rack = n.rack.as_deref().map(|r| format!(" rack {r}")).unwrap_or_default();
        let on = if meta.roster.contains(&n.id) { "on the roster" } else { "off the roster" };
        println!("node {} at {}{rack}: {on}", n.id, n.client);
    }
    for b in &balance {
        println!("{}: {}/{} groups where the roster puts them", b["namespace"].as_str().unwrap_or(""), b["placed"], b["groups"]);
    }
    Ok(())
}

/// "node 2", "nodes 2 and 3", "nodes 1, 2 and 3".
fn nodes_in_words(ids: &[u64]) -> String {
    match ids {
        [] => "no node".into(),
        [one] => format!("node {one}"),
        [init @ .., last] => format!("nodes {} and {last}", init.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// What is wrong with the cluster, in words: nodes down, and each group (or the metadata
/// group) without a reachable leader, saying whether it lacks a quorum and which replicas are
/// unreachable.
fn health_problems(down: &[u64], metadata: &serde_json::Value, groups: &[serde_json::Value]) -> Vec<String> {
    let ids = |value: &serde_json::Value| -> Vec<u64> { value.as_array().map(|a| a.iter().filter_map(|v| v.as_u64()).collect()).unwrap_or_default() };
    let mut problems = Vec::new();
    if !down.is_empty() {
        problems.push(format!("{} unreachable", nodes_in_words(down)));
    }
    let describe = |name: String, replicas: Vec<u64>, state: &str, leader: Option<u64>| -> String {
        let mut unreachable: Vec<u64> = replicas.iter().copied().filter(|r| down.contains(r)).collect();
        unreachable.sort_unstable();
        let quorum = replicas.len() / 2 + 1;
        let reachable = replicas.len() - unreachable.len();
        let why = if reachable < quorum {
            format!("has no quorum: {} unreachable ({reachable} of {} replicas up, {quorum} needed)", nodes_in_words(&unreachable), replicas.len())
        } else {
            match (state, leader) {
                ("leader-down", Some(leader)) => format!("lost its leader, node {leader}: the other replicas elect a new one"),
                _ if unreachable.is_empty() => "has no leader yet: electing".to_owned(),
                _ => format!("has no leader yet ({} unreachable): electing", nodes_in_words(&unreachable)),
            }
        };
        format!("{name} {why}")
    };
    // A dead group: who lost their copy, and the revive command that rebuilds it.
    let dead = |name: &str, lost: Vec<u64>, revive: &str, rest: &str| -> String {
        let whose = if lost.len() == 1 { "its" } else { "their" };
        format!("{name} is dead: {} lost {whose} copy, too many for a quorum; `chunkctl revive {revive}` rebuilds it {rest}", nodes_in_words(&lost))
    };
    if metadata["state"] == "dead" {
        let rest = "from the voter whose log reaches furthest (then revive the dead groups)";
        problems.push(dead("the metadata group", ids(&metadata["lost_copy"]), "'$meta' 0", rest));
    } else if metadata["state"] != "ok" {
        problems.push(describe("the metadata group".into(), ids(&metadata["voters"]), "no-leader", None));
    }
    for group in groups.iter().filter(|g| g["state"] != "ok") {
        let (namespace, id) = (group["namespace"].as_str().unwrap_or(""), &group["group"]);
        // The words ("group 7 has no quorum: ..."), after the namespace it belongs to.
        let name = format!("namespace {namespace}: group {id}");
        if group["state"] == "dead" {
            let rest = "from the best surviving replica (writes only the lost copies held are lost)";
            problems.push(dead(&name, ids(&group["lost_copy"]), &format!("{namespace} {id}"), rest));
            continue;
        }
        problems.push(describe(name, ids(&group["replicas"]), group["state"].as_str().unwrap_or(""), group["leader"].as_u64()));
    }
    problems
}

/// A text progress bar: `done` of `total`.
fn progress_bar(done: u32, total: u32) -> String {
    const WIDTH: u32 = 20;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(WIDTH as usize - filled))
}

fn parse_chunkd_option(option: &str) -> Result<String, String> {
    match option.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() && !value.trim().is_empty() => Ok(option.to_owned()),
        _ => Err(format!("{option:?} is not KEY=VALUE")),
    }
}
