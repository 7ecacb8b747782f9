//! `chunkcheck files`: the file layer under the faults its users fear. A fresh cluster of real
//! chunkd processes, a real chunkfs mount, real application processes writing through it; the
//! cluster's faults and the processes' own (kill -9 of an application, of chunkfs); then every
//! node restarted, the volume mounted afresh, and every acknowledged write looked for.
//!
//! Reading order: `journal.rs` (the journal writer and its checker, also failover's),
//! `bank.rs` (sqlite), this file (the run, the machines and their mounts, the supervisors that
//! restart killed applications, the process faults, the failover checks), `report.rs`.

pub mod bank;
pub mod journal;
mod report;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::cluster_check::cluster::TestCluster;
use crate::cluster_check::nemesis::{self, NemesisKind};
use crate::cluster_check::workload::Recorder;
use crate::cluster_check::{self as cc, FaultRecord, ProcessFaults, Record, Schedule, INTERRUPTED};
use crate::history::{Edn, Event, EventType};
use crate::mount::ChunkfsMount;
use journal::{Placed, SyncMode};

/// The volume every run mounts.
pub const VOLUME: &str = "check";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilesWorkload {
    /// Writer processes append checksummed records to journal files, syncing each.
    Journal,
    /// Bank transfers in SQLite databases.
    Sqlite,
    /// Two instances on two mounts ("machines") wait for one fcntl lock; the holder writes the
    /// journal, and when its machine is taken away the other takes over.
    Failover,
}

/// Which front the applications go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// A chunkfs mount.
    Fuse,
    /// libchunkpreload.so in the application.
    Preload,
}

#[derive(Clone, Debug)]
pub struct FilesOptions {
    pub workload: FilesWorkload,
    pub via: Via,
    pub nodes: u64,
    pub replication_factor: usize,
    pub groups: u32,
    pub time_limit: Duration,
    pub nemeses: Vec<NemesisKind>,
    pub nemesis_interval: Duration,
    pub seed: u64,
    pub out: PathBuf,
    /// Application processes (journal: one file each; failover: always 2, one per machine).
    pub writers: usize,
    /// Extra arguments of every chunkfs mount (the unsafe negative controls).
    pub chunkfs_options: Vec<String>,
    /// Extra `KEY = VALUE` lines of every node's chunkd.toml.
    pub chunkd_options: Vec<String>,
    /// Negative control: damage the first file in its middle before reading it back.
    pub test_corrupt_after_run: bool,
}

/// How long the cluster may take to answer again after every node restarted.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);
/// Lost and corrupt findings listed per file in the summary (all count).
const FINDINGS_LISTED_MAX: usize = 20;
/// The failover mounts' lease: how long a lock outlives a machine that stopped answering.
/// Takeover takes about this plus the standby's lock retry (at most 200 ms) and a write.
pub const FAILOVER_LEASE_MS: u64 = 2000;
/// Each node's engine device: room for the run's journals at full speed, 256 MiB and 16 MiB a
/// second of run, at most 2 GiB (ten minutes). The devices are allocated on disk, so a short
/// run (CI's) takes a fraction of a long one's space.
fn device_bytes(time_limit: Duration) -> u64 {
    ((256 << 20) + time_limit.as_secs() * (16 << 20)).min(2 << 30)
}
/// Machines' loopback addresses: `own_loopback_host(MACHINE_HOST_BASE + machine)`, past any
/// node's.
const MACHINE_HOST_BASE: u64 = 200;
/// Failover's directory in the volume (absent on the bare mountpoint when a mount is down).
const FAILOVER_DIRECTORY: &str = "failover";

/// Runs the check; the JSON summary (also OUT/results.json). Exit code by `valid`.
pub fn run(options: &FilesOptions, progress: &mut impl FnMut(&str)) -> serde_json::Value {
    let started = Instant::now();
    let mut result = match run_inner(options, progress) {
        Ok(result) => result,
        Err(err) => {
            json!({ "valid": "unknown", "error": format!("{err:#}"), "acked": 0, "lost": 0, "corrupt": 0, "ops": 0, "nemesis_events": 0, "dual_writers": 0, "takeovers": 0 })
        }
    };
    result["workload"] = json!(options.workload);
    result["via"] = json!(options.via);
    result["seed"] = json!(options.seed);
    result["out"] = json!(options.out.display().to_string());
    result["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
    let _ = std::fs::write(options.out.join("results.json"), serde_json::to_string_pretty(&result).unwrap_or_default());
    result
}

fn run_inner(options: &FilesOptions, progress: &mut impl FnMut(&str)) -> Result<serde_json::Value> {
    if options.writers == 0 {
        bail!("--writers must be at least 1");
    }
    std::fs::create_dir_all(&options.out).with_context(|| format!("creating {}", options.out.display()))?;
    let plan = nemesis::plan(options.seed, &options.nemeses, options.nemesis_interval, options.time_limit);
    let mut nemesis_log = format!("seed {} plan ({} faults, interval {:?}):\n", options.seed, plan.len(), options.nemesis_interval);
    nemesis_log += &plan.iter().map(|fault| format!("  {fault:?}\n")).collect::<String>();
    let (tools, chunkd_options) = cc::fault_tools(&options.nemeses, &options.chunkd_options)?;
    progress(&format!("starting {} nodes in {}", options.nodes, options.out.display()));
    let cluster = TestCluster::start(
        &options.out.join("cluster"),
        options.nodes,
        options.replication_factor,
        options.groups,
        device_bytes(options.time_limit),
        &chunkd_options,
        tools,
    )?;
    let cluster = Arc::new(Mutex::new(cluster));
    let mut mount_options = options.chunkfs_options.clone();
    if options.workload == FilesWorkload::Failover {
        mount_options.extend(["--lease-ms".to_owned(), FAILOVER_LEASE_MS.to_string()]);
    }
    let preload = match options.via {
        Via::Fuse => None,
        Via::Preload => Some(crate::mount::preload_library()?),
    };
    let lease_ms = (options.workload == FilesWorkload::Failover).then_some(FAILOVER_LEASE_MS);
    let mounts = Mounts { seeds: cluster.lock().unwrap().seeds(), options: mount_options, log: options.out.join("chunkfs.log"), preload, lease_ms };
    let apps = Apps::new(options, mounts)?;
    let directory = match options.workload {
        FilesWorkload::Journal => None,
        FilesWorkload::Sqlite => Some(bank::DIRECTORY),
        FilesWorkload::Failover => Some(FAILOVER_DIRECTORY),
    };
    if let Some(directory) = directory {
        apps.mounts.make_directory(&apps.machines[0], directory).with_context(|| format!("creating {directory} in the volume"))?;
    }

    let recorder = Recorder::create(&options.out.join("history.edn"))?;
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut crashed: Vec<String> = Vec::new();
    let mut left = Vec::new();
    std::thread::scope(|scope| {
        for writer in 0..apps.writers {
            let (apps, recorder) = (&apps, &recorder);
            scope.spawn(move || apps.supervise(writer, recorder));
        }
        let record = Record { faults: &mut faults, crashed: &mut crashed, left: &mut left, log: &mut nemesis_log };
        let schedule = Schedule { time_limit: options.time_limit, interval: options.nemesis_interval, plan: &plan };
        // The applications stop however the faults end (a panic too: the supervisors would
        // otherwise restart them for ever, and the scope wait for them).
        let _stop = StopApps(&apps);
        cc::drive_faults(&schedule, &cluster, &recorder, record, &mut AppFaults { apps: &apps, recorder: &recorder }, progress);
    });

    progress("stopping the mounts, restarting every node");
    for machine in &apps.machines {
        if let Some(mut mount) = machine.mount.lock().unwrap().take() {
            if !mount.unmount() {
                crashed.push(format!("chunkfs at {} did not unmount cleanly", machine.mountpoint.display()));
            }
        }
    }
    let recovery = {
        let mut cluster = cluster.lock().unwrap();
        cluster.heal()?;
        // Every node restarts from its disk: the acknowledged records must survive that too.
        cluster.restart_all()?;
        cluster.wait_until_ready(RECOVERY_LIMIT)
    };
    let recovery_ms = recovery.as_ref().ok().map(|d| d.as_millis() as u64);
    let mut run_error = recovery.err().map(|e| format!("the cluster did not recover: {e:#}"));
    let mut verdicts = Verdicts::default();
    if run_error.is_none() && !INTERRUPTED.load(Ordering::SeqCst) {
        progress("reading everything back through a fresh mount");
        match read_back(&apps, &options.out.join("mnt-check"), options.test_corrupt_after_run) {
            Ok(found) => verdicts = found,
            Err(err) => run_error = Some(format!("reading back: {err:#}")),
        }
    }
    {
        let mut cluster = cluster.lock().unwrap();
        crashed.extend(cluster.exited().into_iter().map(|(id, status)| format!("node {id} exited on its own ({status})")));
        cluster.tear_down();
    }
    std::fs::write(options.out.join("nemesis.log"), &nemesis_log)?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        run_error.get_or_insert_with(|| "interrupted".into());
    }

    let events = recorder.finish();
    let count = |kind: EventType| events.iter().filter(|e| e.process.is_some() && e.kind == kind).count();
    let seen = apps.seen.lock().unwrap();
    let dual_writers = verdicts.dual_writers;
    let (lost, corrupt) = (verdicts.lost(), verdicts.corrupt());
    let valid = match (lost + corrupt + dual_writers as usize, &run_error) {
        (0, None) => json!(true),
        (0, Some(_)) => json!("unknown"),
        _ => json!(false),
    };
    let files: Vec<serde_json::Value> = verdicts
        .files
        .iter()
        .map(|v| {
            let mut shown = serde_json::to_value(v).unwrap_or_default();
            shown["lost_count"] = json!(v.lost.len());
            shown["corrupt_count"] = json!(v.corrupt.len());
            shown["lost"] = json!(v.lost.iter().take(FINDINGS_LISTED_MAX).collect::<Vec<_>>());
            shown["corrupt"] = json!(v.corrupt.iter().take(FINDINGS_LISTED_MAX).collect::<Vec<_>>());
            shown["writer_runs"] = json!(v.writer_runs.len());
            shown
        })
        .collect();
    let mut result = json!({
        "valid": valid,
        "acked": seen.acked_count(),
        "lost": lost,
        "corrupt": corrupt,
        "ops": count(EventType::Invoke),
        "ok": count(EventType::Ok),
        "info": count(EventType::Info),
        "nemesis_events": faults.len(),
        "app_starts": apps.starts.load(Ordering::SeqCst),
        "recovery_ms": recovery_ms,
        "files": files,
        "faults": faults,
    });
    if options.workload == FilesWorkload::Failover {
        let mut takeovers: Vec<u64> = seen.takeovers.iter().map(|&(_, took)| took).collect();
        takeovers.sort_unstable();
        result["takeovers"] = json!(takeovers.len());
        result["takeover_p50_ms"] = json!(takeovers.get(takeovers.len().div_ceil(2).saturating_sub(1)));
        result["takeover_max_ms"] = json!(takeovers.last());
        result["takeover_ms"] = json!(seen.takeovers.iter().map(|&(at, took)| json!({ "at_ms": at, "took_ms": took })).collect::<Vec<_>>());
        result["resumed_on_the_same_machine"] = json!(seen.resumed_in_place);
        result["dual_writers"] = json!(dual_writers);
        result["lock_holders"] = json!(seen.holders.len());
        result["lease_ms"] = json!(FAILOVER_LEASE_MS);
    } else {
        result["dual_writers"] = json!(0);
    }
    if let Some(bank) = &verdicts.bank {
        let mut shown = serde_json::to_value(bank)?;
        shown["lost_count"] = json!(bank.lost.len());
        shown["lost"] = json!(bank.lost.iter().take(FINDINGS_LISTED_MAX).collect::<Vec<_>>());
        shown["corrupt"] = json!(bank.corrupt.iter().take(FINDINGS_LISTED_MAX).collect::<Vec<_>>());
        result["bank"] = shown;
    }
    if let Some(error) = &run_error {
        result["error"] = json!(error);
    }
    if !crashed.is_empty() {
        result["problems"] = json!(crashed);
    }
    progress("writing the report");
    if let Err(err) = report::write(&options.out, options, &result, &events, &faults) {
        result["report_error"] = json!(format!("{err:#}"));
    }
    Ok(result)
}

/// How the applications reach the run's volume: chunkfs mounts, or (`--via preload`)
/// libchunkpreload in each application, mapping its machine's path to the volume. Reading
/// back always mounts (so a preload run is also read through the other front).
struct Mounts {
    seeds: Vec<String>,
    options: Vec<String>,
    log: PathBuf,
    /// `--via preload`: the library.
    preload: Option<PathBuf>,
    /// The lease of the applications' sessions (failover; else the default). For mounts it is
    /// in `options`.
    lease_ms: Option<u64>,
}

/// How long a mount is retried while the cluster comes back (after a power cut).
const MOUNT_RETRY_LIMIT: Duration = Duration::from_secs(60);

impl Mounts {
    /// A machine's front at `mountpoint`: a chunkfs mount, or none (`--via preload`: the path
    /// is mapped inside each application).
    fn machine(&self, machine: &Machine) -> Result<Option<ChunkfsMount>> {
        match self.preload {
            None => self.start_from(&machine.mountpoint, Some(&machine.source)).map(Some),
            Some(_) => Ok(None),
        }
    }

    /// Sets up `command` to reach the volume at `mountpoint` (preload: the library and its
    /// configuration in the environment).
    fn prepare(&self, command: &mut Command, mountpoint: &Path, source: &str) {
        if let Some(library) = &self.preload {
            command
                .env("LD_PRELOAD", library)
                .env("CHUNKSTORE_SEEDS", self.seeds.join(","))
                .env("CHUNKSTORE_MAP", format!("{}={VOLUME}", mountpoint.display()));
            command.env("CHUNKSTORE_SOURCE", source);
            if let Some(lease_ms) = self.lease_ms {
                command.env("CHUNKSTORE_LEASE_MS", lease_ms.to_string());
            }
        }
    }

    /// Makes a directory in the volume (through the front the applications use).
    fn make_directory(&self, machine: &Machine, directory: &str) -> Result<()> {
        let path = machine.mountpoint.join(directory);
        if self.preload.is_none() {
            return Ok(std::fs::create_dir_all(path)?);
        }
        let mut command = Command::new("mkdir");
        command.arg("-p").arg(&path);
        self.prepare(&mut command, &machine.mountpoint, &machine.source);
        let output = command.output().context("running mkdir under libchunkpreload")?;
        if !output.status.success() {
            bail!("mkdir -p {} under libchunkpreload: {}", path.display(), String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(())
    }

    /// Mounts the volume, retrying while the cluster does not answer yet.
    fn start(&self, mountpoint: &Path) -> Result<ChunkfsMount> {
        self.start_from(mountpoint, None)
    }

    /// `start`, the mount's connections leaving from `source`.
    fn start_from(&self, mountpoint: &Path, source: Option<&str>) -> Result<ChunkfsMount> {
        let deadline = Instant::now() + MOUNT_RETRY_LIMIT;
        let mut options = self.options.clone();
        if let Some(source) = source {
            options.extend(["--source".to_owned(), source.to_owned()]);
        }
        loop {
            match ChunkfsMount::start(&self.seeds, VOLUME, mountpoint, &options, &self.log) {
                Ok(mount) => return Ok(mount),
                Err(err) if Instant::now() > deadline => return Err(err.context(format!("mounting for {MOUNT_RETRY_LIMIT:?}"))),
                Err(err) => tracing::info!("mounting again in a second: {err:#}"),
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// A "machine": a chunkfs mount and the applications that run on it.
struct Machine {
    mountpoint: PathBuf,
    /// Its own loopback address: its mount's (or, under the shim, its applications')
    /// connections leave from it, so `machine-cut` can cut it off.
    source: String,
    mount: Mutex<Option<ChunkfsMount>>,
    /// Whether applications may start on it (not while its mount is killed or it is paused).
    up: AtomicBool,
}

/// What the applications were told and saw.
#[derive(Default)]
struct Seen {
    /// journal and failover: the records acknowledged, by file (failover: one file).
    records: Vec<Vec<Placed>>,
    /// sqlite: committed transfers.
    transfers: Vec<String>,
    /// sqlite: integrity checks at a process's start that were not ok, reads of a total that
    /// was not the opening one.
    anomalies: Vec<String>,
    /// sqlite: integrity checks run at processes' starts.
    integrity_checks: u64,
    /// failover: the processes that took the lock, in order, with the first record each set out
    /// to write.
    holders: Vec<journal::Holder>,
    /// failover: a machine taken away (ms into the run, machine) until the other one's first
    /// acknowledged write (a takeover) or its own (it resumed in place).
    taken_away: Option<(u64, usize)>,
    /// (when the machine was taken away, ms into the run; how long until the takeover)
    takeovers: Vec<(u64, u64)>,
    resumed_in_place: u64,
}

impl Seen {
    fn acked_count(&self) -> usize {
        self.records.iter().map(Vec::len).sum::<usize>() + self.transfers.len()
    }
}

/// The machines, the application processes and what they acknowledged.
struct Apps {
    workload: FilesWorkload,
    writers: usize,
    seed: u64,
    machines: Vec<Machine>,
    mounts: Mounts,
    log: PathBuf,
    stop: AtomicBool,
    /// The running process of each writer.
    pids: Mutex<Vec<Option<u32>>>,
    /// `machine-cut`: the rules that cut a machine off.
    firewall: Mutex<Option<crate::cluster_check::net::Firewall>>,
    seen: Mutex<Seen>,
    starts: AtomicU64,
}

impl Apps {
    /// Mounts the machines (failover: two, one instance each; else one for every writer).
    fn new(options: &FilesOptions, mounts: Mounts) -> Result<Apps> {
        let (machines, writers, files) = match options.workload {
            FilesWorkload::Failover => (2, 2, 1),
            FilesWorkload::Journal => (1, options.writers, options.writers),
            FilesWorkload::Sqlite => (1, options.writers, 0),
        };
        let mut started = Vec::new();
        // Under the shim the path is the volume's only in the applications: nothing is there
        // on the local disk, so an application without the library fails instead of writing
        // files no one checks.
        let base = if options.via == Via::Preload { "shim" } else { "mnt" };
        for machine in 0..machines {
            let mountpoint = options.out.join(if machines == 1 { base.to_owned() } else { format!("{base}-{machine}") });
            let source = crate::local_cluster::own_loopback_host(MACHINE_HOST_BASE + machine as u64);
            let mut started_machine = Machine { mountpoint, source, mount: Mutex::new(None), up: AtomicBool::new(true) };
            started_machine.mount = Mutex::new(mounts.machine(&started_machine)?);
            started.push(started_machine);
        }
        let firewall = match options.nemeses.contains(&NemesisKind::MachineCut) {
            true => Some(crate::cluster_check::net::Firewall::named("-machines")?),
            false => None,
        };
        Ok(Apps {
            workload: options.workload,
            writers,
            seed: options.seed,
            machines: started,
            mounts,
            log: options.out.join("writers.log"),
            stop: AtomicBool::new(false),
            pids: Mutex::new(vec![None; writers]),
            firewall: Mutex::new(firewall),
            seen: Mutex::new(Seen { records: vec![Vec::new(); files], ..Seen::default() }),
            starts: AtomicU64::new(0),
        })
    }

    fn machine_of(&self, writer: usize) -> usize {
        writer % self.machines.len()
    }

    /// The journal file writer `writer` writes, as a path under a mountpoint.
    fn journal_of(&self, writer: usize) -> PathBuf {
        match self.workload {
            FilesWorkload::Failover => Path::new(FAILOVER_DIRECTORY).join("journal"),
            _ => PathBuf::from(format!("journal-{writer}")),
        }
    }

    /// The file of `seen.records` writer `writer`'s records go to.
    fn file_index(&self, writer: usize) -> usize {
        match self.workload {
            FilesWorkload::Failover => 0,
            _ => writer,
        }
    }

    /// Journal writers: even ones fdatasync after each write, odd ones write O_DSYNC.
    /// Failover: both fdatasync, as a message server does.
    fn sync_of(&self, writer: usize) -> SyncMode {
        if writer.is_multiple_of(2) || self.workload == FilesWorkload::Failover {
            SyncMode::Fdatasync
        } else {
            SyncMode::Dsync
        }
    }

    fn writer_seed(&self, writer: usize) -> u64 {
        self.seed ^ (writer as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Stops every application (kill -9: whatever it was doing is not acknowledged).
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for machine in &self.machines {
            self.signal_machine(machine, libc::SIGCONT);
        }
        self.signal_writers(|_| true, libc::SIGKILL);
    }

    /// Sends `signal` to the applications of the writers `which` picks.
    fn signal_writers(&self, which: impl Fn(usize) -> bool, signal: libc::c_int) -> Vec<u64> {
        let mut hit = Vec::new();
        for (writer, pid) in self.pids.lock().unwrap().iter().enumerate() {
            if let Some(pid) = pid.filter(|_| which(writer)) {
                // SAFETY: our own child, not reaped yet (its supervisor waits for it after its
                // output ends), so the pid cannot have been reused.
                unsafe { libc::kill(pid as i32, signal) };
                hit.push(writer as u64);
            }
        }
        hit
    }

    fn signal_machine(&self, machine: &Machine, signal: libc::c_int) {
        if let Some(mount) = machine.mount.lock().unwrap().as_ref() {
            // SAFETY: our own child (a chunkfs not yet waited for).
            unsafe { libc::kill(mount.pid() as i32, signal) };
        }
    }

    /// The machine whose instance took the lock last (failover); else the first.
    fn active_machine(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        let last = seen.holders.last().map_or(0, |holder| holder.process);
        self.machine_of(last as usize % self.writers)
    }

    /// Keeps application `writer` running until the run stops: each start is a new history
    /// process (`writer + writers * start`), its calls recorded from what it says.
    fn supervise(&self, writer: usize, recorder: &Recorder) {
        let machine = &self.machines[self.machine_of(writer)];
        let mut start = 0u64;
        let mut quick_failures = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            if !machine.up.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let process = (writer as u64 + self.writers as u64 * start) as i64;
            start += 1;
            self.starts.fetch_add(1, Ordering::SeqCst);
            let began = Instant::now();
            if let Err(err) = self.run_once(writer, process, recorder) {
                tracing::warn!(writer, "application: {err:#}");
            }
            // One that fails at once (the cluster or the mount away) is restarted less often.
            quick_failures = if began.elapsed() < Duration::from_secs(1) { (quick_failures + 1).min(5) } else { 0 };
            std::thread::sleep(Duration::from_millis(100 << quick_failures));
        }
    }

    fn command(&self, writer: usize, process: i64) -> Result<Command> {
        let machine = &self.machines[self.machine_of(writer)];
        let mountpoint = &machine.mountpoint;
        let mut command;
        match self.workload {
            FilesWorkload::Journal | FilesWorkload::Failover => {
                command = Command::new(std::env::current_exe()?);
                command.arg("files-journal-writer").arg("--file").arg(mountpoint.join(self.journal_of(writer)));
                // Each start writes different records (as a restarted server journals new
                // messages): one that rewrote a lost acknowledged record identically would hide
                // the loss.
                let seed = self.writer_seed(writer) ^ (process as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                command.args(["--sync", &format!("{:?}", self.sync_of(writer)).to_lowercase(), "--seed", &seed.to_string()]);
                command.args(["--writer", &process.to_string(), if self.mounts.preload.is_some() { "--on-preload" } else { "--on-fuse" }]);
                if self.workload == FilesWorkload::Failover {
                    command.arg("--lock").arg(mountpoint.join(FAILOVER_DIRECTORY).join("lock"));
                }
            }
            FilesWorkload::Sqlite => {
                command = Command::new("python3");
                command.args(["-c", bank::APP]).arg(mountpoint.join(bank::DIRECTORY).join(bank::DATABASE));
                command.args([
                    format!("p{process}"),
                    bank::ACCOUNTS.to_string(),
                    bank::OPENING_BALANCE.to_string(),
                    self.writer_seed(writer).wrapping_add(process as u64).to_string(),
                ]);
            }
        }
        self.mounts.prepare(&mut command, mountpoint, &machine.source);
        Ok(command)
    }

    fn run_once(&self, writer: usize, process: i64, recorder: &Recorder) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = self.command(writer, process)?.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log).spawn().context("starting an application")?;
        self.pids.lock().unwrap()[writer] = Some(child.id());
        if self.stop.load(Ordering::SeqCst) {
            let _ = child.kill();
        }
        let event = |kind: EventType, f: &str, value: Edn| {
            let mut event = Event::new(process, kind, f, value);
            event.key = Some(Edn::Int(self.file_index(writer) as i64));
            event
        };
        // The call in flight, as recorded, and (journal) the record it writes.
        let mut pending: Option<(Event, Option<Placed>)> = None;
        let stdout = child.stdout.take().context("the application's output")?;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            let words: Vec<&str> = line.splitn(2, ' ').collect();
            match (words[0], words.get(1).copied().unwrap_or_default()) {
                ("I", what) if self.workload != FilesWorkload::Sqlite => {
                    let numbers: Vec<u64> = what.split(' ').map(str::parse).collect::<Result<_, _>>()?;
                    let [seq, offset, len, crc] = numbers[..] else { bail!("writer {writer} said {line:?}") };
                    let placed = Placed { seq, offset, len, crc: u32::try_from(crc)? };
                    if let Some(holder) = self.seen.lock().unwrap().holders.iter_mut().rev().find(|holder| holder.process == process as u64) {
                        holder.first_seq.get_or_insert(seq);
                    }
                    let mut invoke = event(EventType::Invoke, "append", Edn::Vector(vec![Edn::Int(seq as i64), Edn::Int(offset as i64)]));
                    // When it began, for the takeover's accounting (the recorder stamps its copy).
                    invoke.time_ns = Some(recorder.elapsed().as_nanos() as u64);
                    recorder.record(invoke.clone());
                    pending = Some((invoke, Some(placed)));
                }
                ("I", id) => {
                    let mut invoke = event(EventType::Invoke, "transfer", Edn::Str(id.to_owned()));
                    invoke.time_ns = Some(recorder.elapsed().as_nanos() as u64);
                    recorder.record(invoke.clone());
                    pending = Some((invoke, None));
                }
                ("A", what) => {
                    let (mut done, placed) = pending.take().with_context(|| format!("application {writer} acknowledged {what} without starting it"))?;
                    let done_invoked_ns = done.time_ns.unwrap_or(0);
                    done.kind = EventType::Ok;
                    recorder.record(done);
                    let mut seen = self.seen.lock().unwrap();
                    match placed {
                        Some(placed) if placed.seq.to_string() == what => seen.records[self.file_index(writer)].push(placed),
                        Some(placed) => bail!("writer {writer} acknowledged {what} while writing {}", placed.seq),
                        None => seen.transfers.push(what.to_owned()),
                    }
                    let machine = self.machine_of(writer);
                    // A write already under way when the machine was taken away says nothing
                    // of who goes on after it.
                    let invoked_after = |since_ms: u64| done_invoked_ns / 1_000_000 >= since_ms;
                    if let Some((since_ms, away)) = seen.taken_away.filter(|&(since_ms, _)| invoked_after(since_ms)) {
                        seen.taken_away = None;
                        match away == machine {
                            true => seen.resumed_in_place += 1,
                            false => seen.takeovers.push((since_ms, (recorder.elapsed().as_millis() as u64).saturating_sub(since_ms))),
                        }
                    }
                }
                ("L", _) => {
                    recorder.record(event(EventType::Invoke, "lock", Edn::Nil));
                    recorder.record(event(EventType::Ok, "lock", Edn::Nil));
                    self.seen.lock().unwrap().holders.push(journal::Holder { process: process as u64, first_seq: None });
                }
                ("S", total) => {
                    let total: i64 = total.parse()?;
                    recorder.record(event(EventType::Invoke, "read", Edn::Nil));
                    recorder.record(event(EventType::Ok, "read", Edn::Int(total)));
                    if total != bank::ACCOUNTS * bank::OPENING_BALANCE {
                        self.seen.lock().unwrap().anomalies.push(format!("process {process} read a total of {total}"));
                    }
                }
                ("C", result) => {
                    let mut seen = self.seen.lock().unwrap();
                    seen.integrity_checks += 1;
                    if result != "ok" {
                        seen.anomalies.push(format!("integrity check as process {process} started: {result}"));
                    }
                }
                ("R", _) => {}
                ("E", error) => {
                    if let Some((mut failed, _)) = pending.take() {
                        failed.kind = EventType::Info;
                        failed.error = Some(Edn::Str(error.to_owned()));
                        recorder.record(failed);
                    }
                }
                _ => tracing::warn!(writer, line, "a line the application should not print"),
            }
        }
        let status = child.wait()?;
        self.pids.lock().unwrap()[writer] = None;
        // Killed mid-call: it may or may not have happened.
        if let Some((mut died, _)) = pending {
            died.kind = EventType::Info;
            died.error = Some(Edn::Str(format!("application {status}")));
            recorder.record(died);
        }
        Ok(())
    }
}

/// Stops the applications when dropped.
struct StopApps<'a>(&'a Apps);

impl Drop for StopApps<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The faults of the applications' processes and machines. Each hits one machine: failover's
/// active one (its instance holds the lock), else the only one.
struct AppFaults<'a> {
    apps: &'a Apps,
    recorder: &'a Recorder,
}

impl AppFaults<'_> {
    /// Failover: times the takeover from now.
    fn taking_away(&self, machine: usize) {
        if self.apps.workload == FilesWorkload::Failover {
            self.apps.seen.lock().unwrap().taken_away = Some((self.recorder.elapsed().as_millis() as u64, machine));
        }
    }

    /// Puts fault `kind` on `machine` (app-kill: one writer); what it hit.
    fn inflict_on(&self, kind: NemesisKind, machine: usize, pick: u64) -> Result<Vec<u64>> {
        let apps = self.apps;
        match kind {
            NemesisKind::AppKill => {
                let writer = match apps.workload {
                    FilesWorkload::Failover => machine,
                    _ => (pick % apps.writers as u64) as usize,
                };
                Ok(apps.signal_writers(|w| w == writer, libc::SIGKILL))
            }
            NemesisKind::FsKill => {
                self.kill_mount(machine);
                Ok(vec![machine as u64])
            }
            NemesisKind::HostPause => {
                let target = &apps.machines[machine];
                target.up.store(false, Ordering::SeqCst);
                apps.signal_machine(target, libc::SIGSTOP);
                apps.signal_writers(|w| apps.machine_of(w) == machine, libc::SIGSTOP);
                Ok(vec![machine as u64])
            }
            NemesisKind::MachineCut => {
                let mut firewall = apps.firewall.lock().unwrap();
                let firewall = firewall.as_mut().context("machine-cut has no firewall")?;
                firewall.isolate(&apps.machines[machine].source)?;
                Ok(vec![machine as u64])
            }
            other => bail!("{other:?} is not a fault of the applications"),
        }
    }

    fn kill_mount(&self, machine: usize) {
        let machine = &self.apps.machines[machine];
        machine.up.store(false, Ordering::SeqCst);
        if let Some(mut mount) = machine.mount.lock().unwrap().take() {
            mount.kill();
        }
    }
}

impl ProcessFaults for AppFaults<'_> {
    fn inflict(&mut self, kind: NemesisKind, pick: u64) -> Result<Vec<u64>> {
        let apps = self.apps;
        let machine = apps.active_machine();
        let hit = self.inflict_on(kind, machine, pick)?;
        // From when the fault is in place: a write begun before it may still complete.
        self.taking_away(machine);
        Ok(hit)
    }

    /// `hit`: machines (fs-kill, host-pause); app-kill's writers restart by themselves.
    fn heal(&mut self, kind: NemesisKind, hit: &[u64]) -> Result<()> {
        let apps = self.apps;
        if kind == NemesisKind::AppKill {
            return Ok(());
        }
        for &machine in hit {
            let Some(target) = apps.machines.get(machine as usize) else { bail!("no machine {machine}") };
            match kind {
                NemesisKind::FsKill => {
                    // Applications that were running went on failing; the fresh mount gets
                    // fresh ones.
                    apps.signal_writers(|w| apps.machine_of(w) == machine as usize, libc::SIGKILL);
                    *target.mount.lock().unwrap() = apps.mounts.machine(target)?;
                    target.up.store(true, Ordering::SeqCst);
                }
                NemesisKind::HostPause => {
                    apps.signal_machine(target, libc::SIGCONT);
                    apps.signal_writers(|w| apps.machine_of(w) == machine as usize, libc::SIGCONT);
                    target.up.store(true, Ordering::SeqCst);
                }
                NemesisKind::MachineCut => {
                    if let Some(firewall) = apps.firewall.lock().unwrap().as_mut() {
                        let matched = firewall.heal()?;
                        if matched == 0 {
                            // The machine's connections did not leave from its address.
                            bail!("machine-cut of machine {machine} dropped no packet");
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The applications' machines lose power with the nodes: chunkfs and the applications die.
    fn power_cut(&mut self) -> Result<()> {
        let active = self.apps.active_machine();
        for machine in 0..self.apps.machines.len() {
            self.kill_mount(machine);
        }
        self.apps.signal_writers(|_| true, libc::SIGKILL);
        self.taking_away(active);
        Ok(())
    }

    fn power_restored(&mut self) -> Result<()> {
        let all: Vec<u64> = (0..self.apps.machines.len() as u64).collect();
        self.heal(NemesisKind::FsKill, &all)
    }
}

/// What the check of the volume found.
#[derive(Default)]
struct Verdicts {
    /// journal and failover: each file.
    files: Vec<journal::FileVerdict>,
    /// sqlite: the database.
    bank: Option<bank::BankVerdict>,
    /// failover: records an earlier lock holder wrote after a later one (`journal::dual_writes`).
    dual_writers: u64,
}

impl Verdicts {
    fn lost(&self) -> usize {
        self.files.iter().map(|v| v.lost.len()).sum::<usize>() + self.bank.as_ref().map_or(0, |b| b.lost.len())
    }

    fn corrupt(&self) -> usize {
        self.files.iter().map(|v| v.corrupt.len()).sum::<usize>() + self.bank.as_ref().map_or(0, |b| b.corrupt.len())
    }
}

/// Mounts the volume afresh and checks what the applications wrote against what they were
/// told. With `corrupt_first`, a negative control: 512 bytes in the middle of the first file
/// are overwritten first.
fn read_back(apps: &Apps, mountpoint: &Path, corrupt_first: bool) -> Result<Verdicts> {
    let mut mount = apps.mounts.start(mountpoint)?;
    let seen = apps.seen.lock().unwrap();
    let mut verdicts = Verdicts::default();
    let first = match apps.workload {
        FilesWorkload::Sqlite => mountpoint.join(bank::DIRECTORY).join(bank::DATABASE),
        _ => mountpoint.join(apps.journal_of(0)),
    };
    if corrupt_first {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&first).with_context(|| format!("opening {} to damage it", first.display()))?;
        let middle = (file.metadata()?.len() / 2) & !511;
        file.write_all_at(&[0x5a; 512], middle)?;
        tracing::warn!("negative control: overwrote 512 bytes at {middle} of {}", first.display());
    }
    match apps.workload {
        FilesWorkload::Sqlite => {
            let output = Command::new("python3").args(["-c", bank::CHECK]).arg(&first).stderr(Stdio::inherit()).output().context("running python3")?;
            let found: serde_json::Value = match output.status.success() {
                true => serde_json::from_slice(&output.stdout).context("the check's output")?,
                // A database that cannot be read at all is corrupt.
                false => json!({ "integrity": ["the database could not be read"] }),
            };
            verdicts.bank = Some(bank::check(&found, &seen.transfers, &seen.anomalies, seen.integrity_checks));
        }
        _ => {
            for (file, acked) in seen.records.iter().enumerate() {
                let name = apps.journal_of(file);
                let path = mountpoint.join(&name);
                let data = match std::fs::read(&path) {
                    Ok(data) => data,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                    Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
                };
                if apps.workload == FilesWorkload::Failover {
                    verdicts.dual_writers += journal::dual_writes(&data, &seen.holders);
                }
                let mut verdict = journal::check_file(&name.display().to_string(), &data, acked);
                verdict.sync = Some(apps.sync_of(file));
                verdicts.files.push(verdict);
            }
        }
    }
    mount.unmount();
    Ok(verdicts)
}
