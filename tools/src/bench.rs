//! `chunkctl bench engine`: 4 KiB puts with commit-to-device at several writer counts, the
//! plain-file physical limit measured in the same run, and the cold-start scan.

use std::fs::OpenOptions as FileOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chunkstore::{Bin, DeviceConfig, Key, Namespace, NamespaceConfig, OpenOptions, Value, WritePolicy};
use serde::Serialize;

pub const VALUE_BYTES: usize = 4096;

pub struct BenchOptions {
    pub writers: Vec<u32>,
    pub seconds: f64,
    pub dir: PathBuf,
    pub cold_start_records: u64,
    pub cold_start_value_bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct WriterResult {
    pub writers: u32,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub fsyncs_per_write: f64,
}

#[derive(Debug, Serialize)]
pub struct ColdStart {
    pub records: u64,
    pub value_bytes: usize,
    pub device_bytes: u64,
    pub seconds: f64,
    pub scan_mib_per_sec: f64,
    pub disk_sequential_read_mib_per_sec: f64,
    /// scan rate / sequential read rate of the same file, both from a cold page cache.
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub results: Vec<WriterResult>,
    pub baseline_ops_per_sec: f64,
    pub baseline_p50_us: u64,
    pub baseline_p99_us: u64,
    /// One writer's rate over the plain-file rate (goal ≥ 0.70).
    pub one_writer_vs_baseline: Option<f64>,
    /// Sixteen writers' rate over one writer's (goal ≥ 5).
    pub sixteen_vs_one_writer: Option<f64>,
    pub cold_start: Option<ColdStart>,
}

pub(crate) fn percentile(sorted: &[u64], pct: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * pct / 100.0).round() as usize]
}

/// Device size for a run: room for everything written plus slack; defragmentation recycles it.
const BENCH_DEVICE_BYTES: u64 = 2 << 30;
/// Keys written in all by a run, whatever the writer count.
const BENCH_KEYS: i64 = 100_000;

pub fn run(options: &BenchOptions, mut log: impl FnMut(&str)) -> Result<BenchReport> {
    std::fs::create_dir_all(&options.dir).with_context(|| format!("creating {}", options.dir.display()))?;
    let (baseline_ops_per_sec, baseline_p50_us, baseline_p99_us) = plain_file_baseline(&options.dir, options.seconds)?;
    log(&format!("plain file pwrite+fdatasync of 4 KiB: {baseline_ops_per_sec:.0} ops/s, p50 {baseline_p50_us} us"));
    let mut results = Vec::new();
    for &writers in &options.writers {
        let result = engine_run(&options.dir, writers, options.seconds)?;
        log(&format!(
            "{writers:>3} writers: {:.0} ops/s, p50 {} us, p99 {} us, {:.3} fdatasync per write",
            result.ops_per_sec, result.p50_us, result.p99_us, result.fsyncs_per_write
        ));
        results.push(result);
    }
    let rate = |w: u32| results.iter().find(|r| r.writers == w).map(|r| r.ops_per_sec);
    let cold_start = match options.cold_start_records {
        0 => None,
        records => {
            let cold = cold_start(&options.dir, records, options.cold_start_value_bytes, &mut log)?;
            Some(cold)
        }
    };
    Ok(BenchReport {
        one_writer_vs_baseline: rate(1).map(|r| r / baseline_ops_per_sec),
        sixteen_vs_one_writer: rate(16).zip(rate(1)).map(|(r16, r1)| r16 / r1),
        results,
        baseline_ops_per_sec,
        baseline_p50_us,
        baseline_p99_us,
        cold_start,
    })
}

/// A preallocated file (like an engine device) written with pwrite + fdatasync per 4 KiB.
pub(crate) fn plain_file_baseline(dir: &Path, seconds: f64) -> Result<(f64, u64, u64)> {
    let path = dir.join("baseline.dat");
    let _ = std::fs::remove_file(&path);
    let file = FileOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    file.set_len(0)?;
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, BENCH_DEVICE_BYTES as libc::off_t) } != 0 {
        file.set_len(BENCH_DEVICE_BYTES)?;
    }
    file.sync_all()?;
    let measured = timed_syncs(&file, BENCH_DEVICE_BYTES, seconds)?;
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(measured)
}

/// pwrite + fdatasync of 4 KiB for `seconds`, cycling over the first `wrap` bytes of `file`:
/// (ops/s, p50 µs, p99 µs).
pub(crate) fn timed_syncs(file: &std::fs::File, wrap: u64, seconds: f64) -> Result<(f64, u64, u64)> {
    let block = vec![0xa5u8; VALUE_BYTES];
    let (mut latencies, started, mut offset) = (Vec::new(), Instant::now(), 0u64);
    while started.elapsed().as_secs_f64() < seconds {
        let op = Instant::now();
        file.write_all_at(&block, offset)?;
        file.sync_data()?;
        latencies.push(op.elapsed().as_micros() as u64);
        offset = (offset + VALUE_BYTES as u64) % wrap;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok((latencies.len() as f64 / elapsed, percentile(&latencies, 50.0), percentile(&latencies, 99.0)))
}

fn bench_namespace(dir: &Path, name: &str, device_bytes: u64, commit_to_device: bool) -> Result<Namespace> {
    let path = dir.join(format!("{name}.dat"));
    let _ = std::fs::remove_file(&path);
    let config = NamespaceConfig { commit_to_device, ..NamespaceConfig::new(name, vec![DeviceConfig { path, size: Some(device_bytes) }]) };
    Ok(Namespace::open(config, OpenOptions::default())?)
}

fn engine_run(dir: &Path, writers: u32, seconds: f64) -> Result<WriterResult> {
    let ns = Arc::new(bench_namespace(dir, &format!("bench{writers}"), BENCH_DEVICE_BYTES, true)?);
    let stop = Arc::new(AtomicBool::new(false));
    // Overwrites within a bounded key space (about 450 MB live in all) keep defragmentation
    // busy without filling the device.
    let keys_per_writer = (BENCH_KEYS / writers as i64).max(64);
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (ns, stop) = (ns.clone(), stop.clone());
            std::thread::spawn(move || -> Result<Vec<u64>> {
                let bins = [Bin::new("b", Value::Bytes(vec![w as u8; VALUE_BYTES]))];
                let mut latencies = Vec::new();
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let key = Key::new("bench", (w as i64) << 32 | (i % keys_per_writer));
                    let op = Instant::now();
                    ns.put(&key, &bins, &WritePolicy::default())?;
                    latencies.push(op.elapsed().as_micros() as u64);
                    i += 1;
                }
                Ok(latencies)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().expect("writer thread")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = ns.stats();
    drop(ns);
    let _ = std::fs::remove_file(dir.join(format!("bench{writers}.dat")));
    latencies.sort_unstable();
    Ok(WriterResult {
        writers,
        ops: latencies.len() as u64,
        ops_per_sec: latencies.len() as f64 / elapsed,
        p50_us: percentile(&latencies, 50.0),
        p99_us: percentile(&latencies, 99.0),
        fsyncs_per_write: stats.fsyncs as f64 / stats.writes.max(1) as f64,
    })
}

/// Drops a file's pages from the page cache (the next read comes from the disk).
fn drop_cache(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    file.sync_all()?;
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(rc == 0, "posix_fadvise failed: {rc}");
    Ok(())
}

fn cold_start(dir: &Path, records: u64, value_bytes: usize, log: &mut impl FnMut(&str)) -> Result<ColdStart> {
    let per_record = (chunkstore::format::RECORD_HEADER_BYTES + 32 + value_bytes).next_multiple_of(8) as u64;
    let block = 1u64 << 20;
    let device_bytes = ((records * per_record * 5 / 4) / block + 8) * block;
    let path = dir.join("coldstart.dat");
    {
        let ns = Arc::new(bench_namespace(dir, "coldstart", device_bytes, false)?);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let ns = ns.clone();
                std::thread::spawn(move || -> Result<()> {
                    let bins = [Bin::new("b", Value::Bytes(vec![t as u8; value_bytes]))];
                    for i in (t..records).step_by(4) {
                        loop {
                            match ns.put(&Key::new("cold", i as i64), &bins, &WritePolicy::default()) {
                                Err(chunkstore::Error::DeviceOverload { .. }) => std::thread::sleep(Duration::from_millis(1)),
                                other => break other.map(|_| ())?,
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("loader thread")?;
        }
        Arc::try_unwrap(ns).ok().expect("loaders are done").close()?;
    }
    drop_cache(&path)?;
    let config = NamespaceConfig::new("coldstart", vec![DeviceConfig { path: path.clone(), size: Some(device_bytes) }]);
    let started = Instant::now();
    let ns = Namespace::open(config, OpenOptions::default())?;
    let seconds = started.elapsed().as_secs_f64();
    let found = ns.stats().records;
    anyhow::ensure!(found == records, "cold start found {found} records, {records} were written");
    ns.close()?;

    drop_cache(&path)?;
    let file = std::fs::File::open(&path)?;
    let mut buf = vec![0u8; block as usize];
    let read_started = Instant::now();
    let mut offset = 0;
    while offset < device_bytes {
        file.read_exact_at(&mut buf, offset)?;
        offset += block;
    }
    let read_seconds = read_started.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    let mib = device_bytes as f64 / (1024.0 * 1024.0);
    let cold = ColdStart {
        records,
        value_bytes,
        device_bytes,
        seconds,
        scan_mib_per_sec: mib / seconds,
        disk_sequential_read_mib_per_sec: mib / read_seconds,
        ratio: read_seconds / seconds,
    };
    log(&format!(
        "cold start of {records} records ({:.0} MiB device): {seconds:.2} s, scan {:.0} MiB/s vs sequential read {:.0} MiB/s (ratio {:.2})",
        mib, cold.scan_mib_per_sec, cold.disk_sequential_read_mib_per_sec, cold.ratio
    ));
    Ok(cold)
}
