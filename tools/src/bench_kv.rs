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
}

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
}

#[derive(Debug, Serialize)]
pub struct KvReport {
    pub results: Vec<KvResult>,
    pub read_policy: String,
    pub baseline_ops_per_sec: f64,
    pub baseline_p50_us: u64,
    /// One client's put p50 over the baseline p50 (goal ≤ 10).
    pub one_client_put_p50_vs_baseline: Option<f64>,
}

/// Keys each client writes and reads (4 KiB values: 4 MiB per client).
const KEYS_PER_CLIENT: u64 = 1000;

pub fn run(options: &KvBenchOptions, mut log: impl FnMut(&str)) -> Result<KvReport> {
    std::fs::create_dir_all(&options.baseline_dir)?;
    let (baseline_ops_per_sec, baseline_p50_us, _) = plain_file_baseline(&options.baseline_dir, options.seconds.min(5.0))?;
    log(&format!("plain file pwrite+fdatasync of 4 KiB: {baseline_ops_per_sec:.0} ops/s, p50 {baseline_p50_us} us"));
    let mut results = Vec::new();
    for &clients in &options.clients {
        for op in ["put", "get"] {
            let result = phase(options, clients, op, baseline_p50_us)?;
            log(&format!(
                "{clients:>3} clients {op}: {:.0} ops/s, p50 {} us, p99 {} us{}",
                result.ops_per_sec,
                result.p50_us,
                result.p99_us,
                if result.in_doubt > 0 { format!(", {} in doubt", result.in_doubt) } else { String::new() }
            ));
            results.push(result);
        }
    }
    let one_client_put = results.iter().find(|r| r.clients == 1 && r.op == "put").map(|r| r.p50_us as f64 / baseline_p50_us.max(1) as f64);
    Ok(KvReport {
        results,
        read_policy: options.read_policy.name().to_owned(),
        baseline_ops_per_sec,
        baseline_p50_us,
        one_client_put_p50_vs_baseline: one_client_put,
    })
}

fn phase(options: &KvBenchOptions, clients: u32, op: &'static str, baseline_p50_us: u64) -> Result<KvResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let in_doubt = Arc::new(AtomicU64::new(0));
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
    latencies.sort_unstable();
    Ok(KvResult {
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
