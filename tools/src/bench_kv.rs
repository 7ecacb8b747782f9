//! `chunkctl bench kv`: 4 KiB puts and gets against a running cluster, per client count, with
//! the local plain-file limit (pwrite + fdatasync of 4 KiB) measured in the same run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chunkstore::client::{Client, ClientConfig, ClientError};
use chunkstore::protocol::{ErrorReply, ReadPolicy};
use chunkstore::{Bin, Key, Value, WritePolicy};
use serde::Serialize;

use crate::bench::{percentile, plain_file_baseline, VALUE_BYTES};

pub struct KvBenchOptions {
    pub seeds: Vec<String>,
    pub namespace: String,
    pub clients: Vec<u32>,
    pub seconds: f64,
    pub read_policy: ReadPolicy,
    /// Where the baseline file goes (the disk the cluster uses).
    pub baseline_dir: PathBuf,
    /// The cluster's chunkd processes (a local cluster's), whose CPU time is read from /proc
    /// for `cpu_us_per_op`; empty: not measured.
    pub node_pids: Vec<u32>,
    /// The operations to measure per client count, in order ("put", "get").
    pub ops: Vec<&'static str>,
}

/// The operations `bench kv` measures.
pub const OPS: [&str; 2] = ["put", "get"];

#[derive(Debug, Serialize)]
pub struct KvResult {
    pub clients: u32,
    pub op: &'static str,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub in_doubt: u64,
    pub baseline_p50_us: u64,
    /// CPU time of every chunkd process of the cluster and of this client process during the
    /// phase, per operation (µs); null when the nodes' processes are not known (`--seeds`).
    pub cpu_us_per_op: Option<f64>,
    /// Context switches (voluntary and not) of every thread of those processes during the
    /// phase, per operation: each is a hand-off between threads, the write path's main cost on
    /// a machine with few cores. Null like `cpu_us_per_op`.
    pub context_switches_per_op: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct KvReport {
    pub results: Vec<KvResult>,
    pub read_policy: String,
    pub baseline_ops_per_sec: f64,
    pub baseline_p50_us: u64,
    /// One client's put p50 over the baseline p50 (goal ≤ 10).
    pub one_client_put_p50_vs_baseline: Option<f64>,
    /// pwrite + fdatasync of 4 KiB in place: into a file whose blocks were all written before,
    /// so the sync commits data only (the physical limit of one durable write here).
    pub baseline_inplace_ops_per_sec: f64,
    pub baseline_inplace_p50_us: u64,
    /// One client's put p50 over the in-place baseline p50 (goal ≤ 2.5).
    pub one_client_put_p50_vs_inplace: Option<f64>,
    /// The put phases' `cpu_us_per_op`, by client count (goal ≤ 170 µs).
    pub put_cpu_us_per_op: Vec<(u32, Option<f64>)>,
}

/// Keys each client writes and reads (4 KiB values: 4 MiB per client).
const KEYS_PER_CLIENT: u64 = 1000;

pub fn run(options: &KvBenchOptions, mut log: impl FnMut(&str)) -> Result<KvReport> {
    std::fs::create_dir_all(&options.baseline_dir)?;
    let (baseline_ops_per_sec, baseline_p50_us, _) = plain_file_baseline(&options.baseline_dir, options.seconds.min(5.0))?;
    log(&format!("plain file pwrite+fdatasync of 4 KiB: {baseline_ops_per_sec:.0} ops/s, p50 {baseline_p50_us} us"));
    let (baseline_inplace_ops_per_sec, baseline_inplace_p50_us) = in_place_baseline(&options.baseline_dir, options.seconds.min(5.0))?;
    log(&format!("the same in place (blocks written before): {baseline_inplace_ops_per_sec:.0} ops/s, p50 {baseline_inplace_p50_us} us"));
    let mut results = Vec::new();
    for &clients in &options.clients {
        for &op in &options.ops {
            let result = phase(options, clients, op, baseline_p50_us)?;
            log(&format!(
                "{clients:>3} clients {op}: {:.0} ops/s, p50 {} us, p99 {} us{}{}{}",
                result.ops_per_sec,
                result.p50_us,
                result.p99_us,
                result.cpu_us_per_op.map(|cpu| format!(", {cpu:.0} us CPU per op")).unwrap_or_default(),
                result.context_switches_per_op.map(|n| format!(", {n:.1} context switches per op")).unwrap_or_default(),
                if result.in_doubt > 0 { format!(", {} in doubt", result.in_doubt) } else { String::new() }
            ));
            results.push(result);
        }
    }
    let one_client = results.iter().find(|r| r.clients == 1 && r.op == "put").map(|r| r.p50_us as f64);
    Ok(KvReport {
        read_policy: options.read_policy.name().to_owned(),
        baseline_ops_per_sec,
        baseline_p50_us,
        one_client_put_p50_vs_baseline: one_client.map(|p50| p50 / baseline_p50_us.max(1) as f64),
        baseline_inplace_ops_per_sec,
        baseline_inplace_p50_us,
        one_client_put_p50_vs_inplace: one_client.map(|p50| p50 / baseline_inplace_p50_us.max(1) as f64),
        put_cpu_us_per_op: results.iter().filter(|r| r.op == "put").map(|r| (r.clients, r.cpu_us_per_op)).collect(),
        results,
    })
}

/// Bytes of the in-place baseline's file (written whole before it is measured).
const IN_PLACE_BYTES: u64 = 64 << 20;

/// pwrite + fdatasync of 4 KiB, cycling over a file whose every block was written (and synced)
/// first: what one durable write costs when the filesystem has no metadata to commit. Returns
/// (ops/s, p50 µs).
fn in_place_baseline(dir: &std::path::Path, seconds: f64) -> Result<(f64, u64)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("baseline-in-place.dat");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
    let zeros = vec![0u8; 1 << 20];
    for at in (0..IN_PLACE_BYTES).step_by(zeros.len()) {
        file.write_all_at(&zeros, at)?;
    }
    file.sync_all()?;
    let (ops_per_sec, p50_us, _) = crate::bench::timed_syncs(&file, IN_PLACE_BYTES, seconds)?;
    drop(file);
    std::fs::remove_file(&path)?;
    Ok((ops_per_sec, p50_us))
}

/// CPU time (user + system, µs) of these processes and of this one, from /proc; None if one
/// of them cannot be read (it exited).
fn cpu_time_us(pids: &[u32]) -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut total = 0;
    for stat in pids.iter().map(|pid| format!("/proc/{pid}/stat")).chain(["/proc/self/stat".to_owned()]) {
        let text = std::fs::read_to_string(stat).ok()?;
        // Fields after the command (which may hold spaces) closed by the last ')'.
        let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
        let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
        total += (utime + stime) * 1_000_000 / ticks_per_sec;
    }
    Some(total)
}

/// Context switches of every thread of these processes and of this one, from
/// /proc/PID/task/*/status; None if a process cannot be read (it exited).
fn context_switches(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for dir in pids.iter().map(|pid| format!("/proc/{pid}/task")).chain(["/proc/self/task".to_owned()]) {
        for task in std::fs::read_dir(dir).ok()?.flatten() {
            // A thread that ended between the listing and the read is skipped.
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
            for line in status.lines() {
                if let Some(count) = line.strip_prefix("voluntary_ctxt_switches:").or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:")) {
                    total += count.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    Some(total)
}

fn phase(options: &KvBenchOptions, clients: u32, op: &'static str, baseline_p50_us: u64) -> Result<KvResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let in_doubt = Arc::new(AtomicU64::new(0));
    let measured = !options.node_pids.is_empty();
    let cpu_before = measured.then(|| cpu_time_us(&options.node_pids)).flatten();
    let switches_before = measured.then(|| context_switches(&options.node_pids)).flatten();
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, in_doubt) = (stop.clone(), in_doubt.clone());
            let config = ClientConfig { read_policy: options.read_policy, ..ClientConfig::new(options.seeds.clone()) };
            let namespace = options.namespace.clone();
            std::thread::spawn(move || -> Result<Vec<u64>> {
                let client = Client::connect(config).context("connecting")?;
                let bins = vec![Bin::new("b", Value::Bytes(vec![c as u8; VALUE_BYTES]))];
                let mut latencies = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = Key::new("bench", ((c as i64) << 32) | (i % KEYS_PER_CLIENT) as i64);
                    let at = Instant::now();
                    let outcome = match op {
                        "put" => client.put(&namespace, &key, bins.clone(), &WritePolicy::default()).map(|_| ()),
                        _ => client.get(&namespace, &key, None).map(|_| ()),
                    };
                    match outcome {
                        Ok(()) => latencies.push(at.elapsed().as_micros() as u64),
                        Err(ClientError::Server(ErrorReply::Timeout { in_doubt: true })) => {
                            in_doubt.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => bail!("{op} failed: {err}"),
                    }
                    i += 1;
                }
                Ok(latencies)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(options.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().expect("client thread")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = cpu_before.and_then(|_| cpu_time_us(&options.node_pids));
    let switches_after = switches_before.and_then(|_| context_switches(&options.node_pids));
    let per_op = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(before), Some(after)) if !latencies.is_empty() => Some(after.saturating_sub(before) as f64 / latencies.len() as f64),
        _ => None,
    };
    let cpu_us_per_op = per_op(cpu_before, cpu_after);
    let context_switches_per_op = per_op(switches_before, switches_after);
    latencies.sort_unstable();
    Ok(KvResult {
        cpu_us_per_op,
        context_switches_per_op,
        clients,
        op,
        ops: latencies.len() as u64,
        ops_per_sec: latencies.len() as f64 / elapsed,
        p50_us: percentile(&latencies, 50.0),
        p99_us: percentile(&latencies, 99.0),
        in_doubt: in_doubt.load(Ordering::Relaxed),
        baseline_p50_us,
    })
}
