//! `chunkctl bench fs`: what an application sees through a chunkfs mount, job by job, against
//! local ext4 (the cluster's own directory) and `bench kv`'s one-client put rate in the same
//! run; the journal, O_DSYNC append and random-read jobs also under libchunkpreload (fio
//! itself loading the shim). fio drives the jobs; chunkfs mounts a fresh volume of the cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// GlusterFS replica 3 on this machine, `journal` job (the figures): IOPS with 1 and
/// with 8 jobs.
pub const GLUSTERFS_JOURNAL_1_IOPS: f64 = 1200.0;
pub const GLUSTERFS_JOURNAL_8_IOPS: f64 = 2000.0;

pub struct FsBenchOptions {
    pub seeds: Vec<String>,
    /// Where the local baseline runs and the mountpoint goes (the cluster's directory).
    pub local_dir: PathBuf,
    pub namespace: String,
    pub seconds: f64,
    /// The chunkfs binary.
    pub chunkfs: PathBuf,
    /// Chunk size of the fresh volume.
    pub chunk_bytes: u32,
    /// libchunkpreload.so (its jobs are skipped without it).
    pub preload: Option<PathBuf>,
    /// The cluster's chunkd processes, for the CPU per put (see `bench_kv`).
    pub node_pids: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct FsJobResult {
    pub job: &'static str,
    pub jobs: u32,
    pub iops: f64,
    pub mib_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub local_iops: f64,
    pub local_p50_us: u64,
    pub local_p99_us: u64,
    /// iops / local_iops.
    pub vs_local: f64,
    /// The same job under libchunkpreload, on the same volume (the jobs the shim runs).
    pub shim_iops: Option<f64>,
    pub shim_p50_us: Option<u64>,
    pub shim_p99_us: Option<u64>,
    /// shim_iops / iops.
    pub shim_vs_chunkfs: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct FsReport {
    pub results: Vec<FsJobResult>,
    pub volume: String,
    pub chunk_bytes: u32,
    /// `bench kv`'s one-client put rate, in the same run.
    pub kv_one_client_puts_per_sec: f64,
    /// journal (1 job) IOPS over the one-client put rate (goal ≥ 0.9).
    pub journal_1_vs_kv_put: f64,
    /// random-read (1 job) IOPS over journal (1 job) IOPS (goal ≥ 5).
    pub random_read_vs_journal: f64,
    /// journal IOPS over GlusterFS replica 3's on this machine (1.2k with 1 job, 2.0k with 8).
    pub journal_1_vs_glusterfs: f64,
    pub journal_8_vs_glusterfs: f64,
    /// `bench kv`'s one-client put p50, in the same run.
    pub kv_one_client_put_p50_us: u64,
    /// The shim's journal (1 job) IOPS over chunkfs's (goal ≥ 1.2: no kernel round trip).
    pub shim_journal_1_vs_chunkfs: Option<f64>,
    /// The shim's journal (1 job) p50 over the one-client put p50 (goal ≤ 1.1).
    pub shim_journal_1_p50_vs_kv_put_p50: Option<f64>,
}

/// One job: its name, fio arguments, and the job counts it runs with.
struct Job {
    name: &'static str,
    args: &'static [&'static str],
    jobs: &'static [u32],
    /// Whether the job's operations are writes (else reads).
    writes: bool,
    /// Whether it also runs under the shim.
    shim: bool,
}

const JOBS: &[Job] = &[
    Job { name: "journal", args: &["--rw=write", "--bs=4k", "--fdatasync=1", "--size=16M"], jobs: &[1, 8], writes: true, shim: true },
    Job { name: "dsync-append", args: &["--rw=write", "--bs=512", "--sync=dsync", "--size=8M"], jobs: &[1], writes: true, shim: true },
    Job { name: "random-read", args: &["--rw=randread", "--bs=4k", "--size=8M", "--direct=1"], jobs: &[1, 8], writes: false, shim: true },
    Job { name: "sequential-write", args: &["--rw=write", "--bs=1M", "--end_fsync=1", "--size=48M"], jobs: &[1], writes: true, shim: false },
    // Large reads: what a chunk size pays in round trips (one ranged read per chunk).
    Job { name: "sequential-read", args: &["--rw=read", "--bs=1M", "--size=32M", "--direct=1"], jobs: &[1], writes: false, shim: false },
];

struct Measured {
    iops: f64,
    mib_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
}

/// fio running under libchunkpreload, its directory mapped to the volume.
struct UnderShim<'a> {
    library: &'a Path,
    options: &'a FsBenchOptions,
    volume: &'a str,
}

impl UnderShim<'_> {
    fn prepare(&self, cmd: &mut Command, dir: &Path) {
        cmd.env("LD_PRELOAD", self.library)
            .env("CHUNKSTORE_SEEDS", self.options.seeds.join(","))
            .env("CHUNKSTORE_NAMESPACE", &self.options.namespace)
            .env("CHUNKSTORE_MAP", format!("{}={}", dir.display(), self.volume));
    }

    /// Removes what a job left in the mapped directory.
    fn clear(&self, dir: &Path) -> Result<()> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "rm -f \"$0\"/*"]).arg(dir);
        self.prepare(&mut cmd, dir);
        let status = cmd.status().context("clearing the shim's directory")?;
        if !status.success() {
            bail!("clearing {} under the shim failed", dir.display());
        }
        Ok(())
    }
}

fn fio(dir: &Path, job: &Job, jobs: u32, seconds: f64, shim: Option<&UnderShim>) -> Result<Measured> {
    let mut cmd = Command::new("fio");
    if let Some(shim) = shim {
        shim.prepare(&mut cmd, dir);
    }
    cmd.arg(format!("--name={}", job.name))
        .arg(format!("--directory={}", dir.display()))
        .arg(format!("--numjobs={jobs}"))
        .args(["--ioengine=psync", "--group_reporting", "--output-format=json", "--time_based"])
        .arg(format!("--runtime={}ms", (seconds * 1000.0) as u64))
        .args(job.args);
    let output = cmd.output().context("running fio (apt-get install fio)")?;
    if !output.status.success() {
        bail!("fio {} failed: {}", job.name, String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text.find('{').context("fio printed no JSON")?;
    let report: serde_json::Value = serde_json::from_str(&text[start..]).context("fio's JSON")?;
    let result = &report["jobs"][0];
    let side = if job.writes { &result["write"] } else { &result["read"] };
    let percentile = |lat: &serde_json::Value, p: &str| lat["percentile"][p].as_f64().unwrap_or(0.0);
    // An operation of a syncing job is the write and the sync after it.
    let (mut p50, mut p99) = (percentile(&side["clat_ns"], "50.000000"), percentile(&side["clat_ns"], "99.000000"));
    if result["sync"]["lat_ns"]["N"].as_u64().unwrap_or(0) > 0 {
        p50 += percentile(&result["sync"]["lat_ns"], "50.000000");
        p99 += percentile(&result["sync"]["lat_ns"], "99.000000");
    }
    Ok(Measured {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mib_per_sec: side["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        p50_us: (p50 / 1000.0) as u64,
        p99_us: (p99 / 1000.0) as u64,
    })
}

/// A chunkfs mount for the run, unmounted when dropped.
struct BenchMount {
    child: Child,
    path: PathBuf,
}

fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(&*path))
}

impl BenchMount {
    fn start(options: &FsBenchOptions, volume: &str, path: &Path) -> Result<BenchMount> {
        std::fs::create_dir_all(path)?;
        let child = Command::new(&options.chunkfs)
            .args(["mount", "--seeds", &options.seeds.join(","), "--namespace", &options.namespace, "--volume", volume])
            .arg(format!("--chunk-bytes={}", options.chunk_bytes))
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", options.chunkfs.display()))?;
        let mut mount = BenchMount { child, path: path.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !mounted(path) {
            if let Some(status) = mount.child.try_wait()? {
                bail!("chunkfs exited with {status}");
            }
            if Instant::now() > deadline {
                bail!("chunkfs did not mount {} within 30 s", path.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(mount)
    }
}

impl Drop for BenchMount {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

pub fn run(options: &FsBenchOptions, mut log: impl FnMut(&str)) -> Result<FsReport> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let volume = format!("bench-{stamp}-{}", std::process::id());
    let local = options.local_dir.join(format!("bench-fs-local-{}", std::process::id()));
    let mountpoint = options.local_dir.join(format!("bench-fs-mnt-{}", std::process::id()));
    std::fs::create_dir_all(&local).with_context(|| format!("creating {}", local.display()))?;
    let mount = BenchMount::start(options, &volume, &mountpoint)?;
    log(&format!("mounted a fresh volume {volume} at {}", mountpoint.display()));
    let kv = crate::bench_kv::run(
        &crate::bench_kv::KvBenchOptions {
            seeds: options.seeds.clone(),
            namespace: options.namespace.clone(),
            clients: vec![1],
            seconds: options.seconds,
            read_policy: Default::default(),
            baseline_dir: options.local_dir.clone(),
            node_pids: options.node_pids.clone(),
            ops: crate::bench_kv::OPS.to_vec(),
        },
        &mut log,
    )?;
    let kv_puts = kv.results.iter().find(|r| r.op == "put").map_or(0.0, |r| r.ops_per_sec);
    let kv_put_p50 = kv.results.iter().find(|r| r.op == "put").map_or(0, |r| r.p50_us);
    // The shim maps a path that exists nowhere on disk to a directory of the same volume.
    let shim_dir = options.local_dir.join(format!("bench-fs-shim-{}", std::process::id()));
    let shim = options.preload.as_deref().map(|library| UnderShim { library, options, volume: &volume });
    let mut results = Vec::new();
    for job in JOBS {
        for &jobs in job.jobs {
            let on_mount = fio(&mount.path, job, jobs, options.seconds, None)?;
            let on_local = fio(&local, job, jobs, options.seconds, None)?;
            clear(&mount.path);
            clear(&local);
            let under_shim = match shim.as_ref().filter(|_| job.shim) {
                Some(shim) => {
                    let measured = fio(&shim_dir, job, jobs, options.seconds, Some(shim))?;
                    shim.clear(&shim_dir)?;
                    Some(measured)
                }
                None => None,
            };
            // The next job starts with the space of this one's files back (a small local
            // cluster's devices would otherwise fill up over the run).
            free_volume(options, &volume)?;
            let result = FsJobResult {
                job: job.name,
                jobs,
                iops: on_mount.iops,
                mib_per_sec: on_mount.mib_per_sec,
                p50_us: on_mount.p50_us,
                p99_us: on_mount.p99_us,
                local_iops: on_local.iops,
                local_p50_us: on_local.p50_us,
                local_p99_us: on_local.p99_us,
                vs_local: if on_local.iops > 0.0 { on_mount.iops / on_local.iops } else { 0.0 },
                shim_iops: under_shim.as_ref().map(|m| m.iops),
                shim_p50_us: under_shim.as_ref().map(|m| m.p50_us),
                shim_p99_us: under_shim.as_ref().map(|m| m.p99_us),
                shim_vs_chunkfs: under_shim.as_ref().map(|m| if on_mount.iops > 0.0 { m.iops / on_mount.iops } else { 0.0 }),
            };
            let shim_text = match &under_shim {
                Some(m) => format!("   shim {:>9.0} IOPS p50 {:>6} us ({:.2}x chunkfs)", m.iops, m.p50_us, result.shim_vs_chunkfs.unwrap_or(0.0)),
                None => String::new(),
            };
            log(&format!(
                "{:>16} x{jobs}: {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>6} us  p99 {:>7} us   local ext4 {:>9.0} IOPS p50 {:>6} us  ({:.2}x local){shim_text}",
                job.name, result.iops, result.mib_per_sec, result.p50_us, result.p99_us, result.local_iops, result.local_p50_us, result.vs_local
            ));
            results.push(result);
        }
    }
    drop(mount);
    let _ = std::fs::remove_dir_all(&local);
    free_volume(options, &volume)?;
    let iops = |name: &str, jobs: u32| results.iter().find(|r| r.job == name && r.jobs == jobs).map_or(0.0, |r| r.iops);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let shim_journal = results.iter().find(|r| r.job == "journal" && r.jobs == 1).and_then(|r| Some((r.shim_vs_chunkfs?, r.shim_p50_us?)));
    let report = FsReport {
        volume,
        chunk_bytes: options.chunk_bytes,
        kv_one_client_puts_per_sec: kv_puts,
        journal_1_vs_kv_put: ratio(iops("journal", 1), kv_puts),
        random_read_vs_journal: ratio(iops("random-read", 1), iops("journal", 1)),
        journal_1_vs_glusterfs: ratio(iops("journal", 1), GLUSTERFS_JOURNAL_1_IOPS),
        journal_8_vs_glusterfs: ratio(iops("journal", 8), GLUSTERFS_JOURNAL_8_IOPS),
        kv_one_client_put_p50_us: kv_put_p50,
        shim_journal_1_vs_chunkfs: shim_journal.map(|(vs, _)| vs),
        shim_journal_1_p50_vs_kv_put_p50: shim_journal.map(|(_, p50)| ratio(p50 as f64, kv_put_p50 as f64)),
        results,
    };
    log(&format!(
        "one-client put {:.0}/s; journal x1 / put {:.2} (goal >= 0.9); random-read x1 / journal x1 {:.1} (goal >= 5); journal vs GlusterFS replica 3: x1 {:.2}, x8 {:.2}",
        report.kv_one_client_puts_per_sec, report.journal_1_vs_kv_put, report.random_read_vs_journal, report.journal_1_vs_glusterfs, report.journal_8_vs_glusterfs
    ));
    if let (Some(vs), Some(p50)) = (report.shim_journal_1_vs_chunkfs, report.shim_journal_1_p50_vs_kv_put_p50) {
        log(&format!("libchunkpreload: journal x1 {vs:.2}x chunkfs (goal >= 1.2); its p50 {p50:.2}x the one-client put p50 (goal <= 1.1)"));
    }
    Ok(report)
}

/// Frees the data of the run's files (unlinked by `clear`): the volume was this run's alone,
/// and every job's files are closed when it ends, so no mount or process holds them open and
/// they go without waiting out the orphan grace.
fn free_volume(options: &FsBenchOptions, volume: &str) -> Result<()> {
    let client = chunkstore::client::Client::connect(chunkstore::client::ClientConfig::new(options.seeds.clone()))?;
    let opened =
        chunkfiles::Volume::open(std::sync::Arc::new(client), &options.namespace, volume, None).map_err(|e| anyhow::anyhow!("volume {volume}: {e}"))?;
    for (ino, _) in opened.orphans().map_err(|e| anyhow::anyhow!("volume {volume}: {e}"))? {
        opened.reclaim(ino).map_err(|e| anyhow::anyhow!("freeing inode {ino} of {volume}: {e}"))?;
    }
    Ok(())
}

/// Removes the files a job left (the next job starts from nothing).
fn clear(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
