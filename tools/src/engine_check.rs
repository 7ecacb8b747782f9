//! `chunkcheck engine`: kill a real writer process at random moments and check that every
//! acknowledged write survives with its exact bytes and generation.
//!
//! The child (`chunkcheck engine-child`) runs writer threads, each owning its own keys, and
//! reports on stdout before (`B`) and after (`A`) each operation. The parent keeps the model:
//! after a SIGKILL, each key must hold its last acknowledged state, or the result of the one
//! operation that was in flight. With `--power-loss` the child's devices keep unsynced writes
//! in its own memory (tearing the last one at a random sector), so the kill is a power cut.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chunkstore::device::{Device, FileDevice, PowerLossDevice};
use chunkstore::{Bin, DeviceConfig, EngineEvent, Error, Key, Namespace, NamespaceConfig, OpenOptions, Operation, RecordExistsAction, Value, WritePolicy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

const SET: &str = "check";
const BIN: &str = "data";

#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub cycles: u32,
    pub power_loss: bool,
    pub unsafe_skip_fsync: bool,
    pub seed: u64,
    pub dir: PathBuf,
    pub writers: u32,
    pub keys: u32,
}

/// The `--json` summary (the last line of output).
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub valid: bool,
    pub cycles: u32,
    pub acked: u64,
    pub lost: u64,
    pub corrupt_returned: u64,
    pub resurrected: u64,
    pub generation_mismatches: u64,
    pub kills_during_defrag: u32,
    pub skipped_records_at_start: u64,
    pub seed: u64,
    pub power_loss: bool,
    pub unsafe_skip_fsync: bool,
}

/// The namespace both processes open: small blocks and devices so defragmentation never rests.
pub fn namespace_config(dir: &Path, unsafe_skip_fsync: bool) -> NamespaceConfig {
    let block = 128 * 1024;
    let devices = (0..2).map(|i| DeviceConfig { path: dir.join(format!("dev{i}.dat")), size: Some(64 * block) }).collect();
    NamespaceConfig {
        write_block_size: block as u32,
        max_write_cache: 16 * block,
        defrag_sleep_ms: 10,
        unsafe_skip_fsync,
        ..NamespaceConfig::new("check", devices)
    }
}

/// One write, as the child announces it. Values are generated from the nonce on both sides.
#[derive(Clone, Debug, PartialEq)]
enum Op {
    Put { nonce: u64, len: usize },
    WriteAt { offset: usize, len: usize, nonce: u64 },
    Truncate { len: usize },
    Delete,
}

impl Op {
    fn encode(&self) -> String {
        match self {
            Op::Put { nonce, len } => format!("put {nonce} {len}"),
            Op::WriteAt { offset, len, nonce } => format!("wat {offset} {len} {nonce}"),
            Op::Truncate { len } => format!("trunc {len}"),
            Op::Delete => "del".into(),
        }
    }

    fn decode(words: &[&str]) -> Option<Op> {
        let num = |i: usize| words.get(i)?.parse::<u64>().ok();
        Some(match *words.first()? {
            "put" => Op::Put { nonce: num(1)?, len: num(2)? as usize },
            "wat" => Op::WriteAt { offset: num(1)? as usize, len: num(2)? as usize, nonce: num(3)? },
            "trunc" => Op::Truncate { len: num(1)? as usize },
            "del" => Op::Delete,
            _ => return None,
        })
    }

    /// The state after this op, or `None` if the engine must refuse it (delete of nothing).
    fn apply(&self, state: &State) -> Option<State> {
        let generation = state.as_ref().map_or(1, |(g, _)| g + 1);
        let mut data = state.as_ref().map(|(_, d)| d.clone()).unwrap_or_default();
        match self {
            Op::Put { nonce, len } => return Some(Some((generation, value_bytes(*nonce, *len)))),
            Op::WriteAt { offset, len, nonce } => {
                if data.len() < offset + len {
                    data.resize(offset + len, 0);
                }
                data[*offset..offset + len].copy_from_slice(&value_bytes(*nonce, *len));
            }
            Op::Truncate { len } => data.resize(*len, 0),
            Op::Delete => return state.as_ref().map(|_| None),
        }
        Some(Some((generation, data)))
    }
}

/// A key's state: absent, or (generation, bytes of its one bin).
type State = Option<(u32, Vec<u8>)>;

pub fn value_bytes(nonce: u64, len: usize) -> Vec<u8> {
    let mut x = nonce.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Child

pub struct ChildOptions {
    pub dir: PathBuf,
    pub seed: u64,
    pub writers: u32,
    pub keys: u32,
    pub power_loss: bool,
    pub unsafe_skip_fsync: bool,
}

fn say(line: &str) {
    // One write per line: lines are far below PIPE_BUF, so a kill never splits one.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

/// Runs until killed.
pub fn run_child(options: ChildOptions) -> Result<()> {
    let config = namespace_config(&options.dir, options.unsafe_skip_fsync);
    let mut devices: Vec<Arc<dyn Device>> = Vec::new();
    for (i, device) in config.devices.iter().enumerate() {
        let (file, _) = FileDevice::open_or_create(&device.path, device.size)?;
        let file: Arc<dyn Device> = Arc::new(file);
        devices.push(if options.power_loss { Arc::new(PowerLossDevice::new(file, options.seed ^ (i as u64 + 1))) } else { file });
    }
    let observer: chunkstore::engine::Observer = Arc::new(|event: &EngineEvent| match event {
        EngineEvent::DefragBlockStart { device, block } => say(&format!("D {device} {block}")),
        EngineEvent::DefragBlockDone { device, block, .. } => say(&format!("d {device} {block}")),
        EngineEvent::Flushed { .. } => {}
    });
    let ns = Arc::new(Namespace::open(config, OpenOptions { devices: Some(devices), observer: Some(observer), ..Default::default() })?);
    say("ready");
    let threads: Vec<_> = (0..options.writers)
        .map(|writer| {
            let ns = ns.clone();
            let (seed, writers, keys) = (options.seed, options.writers, options.keys);
            std::thread::spawn(move || writer_loop(&ns, seed, writer, writers, keys))
        })
        .collect();
    for thread in threads {
        if let Ok(Err(err)) = thread.join() {
            say(&format!("X {err:#}"));
            std::process::exit(3);
        }
    }
    Ok(())
}

fn writer_loop(ns: &Namespace, seed: u64, writer: u32, writers: u32, keys: u32) -> Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed ^ ((writer as u64) << 48));
    let mine: Vec<u32> = (0..keys).filter(|k| k % writers == writer).collect();
    for counter in 0u64.. {
        let key_number = mine[rng.gen_range(0..mine.len())];
        let nonce = (seed << 40) ^ ((writer as u64) << 32) ^ counter;
        let op = match rng.gen_range(0..10) {
            0..=3 => Op::Put { nonce, len: rng.gen_range(1..6000) },
            4..=6 => Op::WriteAt { offset: rng.gen_range(0..8000), len: rng.gen_range(1..3000), nonce },
            7 => Op::Truncate { len: rng.gen_range(0..8000) },
            _ => Op::Delete,
        };
        say(&format!("B {key_number} {}", op.encode()));
        let key = Key::new(SET, key_number as i64);
        let policy = WritePolicy::default();
        let result = match &op {
            Op::Put { nonce, len } => {
                let replace = WritePolicy { exists: RecordExistsAction::Replace, ..policy };
                ns.put(&key, &[Bin::new(BIN, Value::Bytes(value_bytes(*nonce, *len)))], &replace)
            }
            Op::WriteAt { offset, len, nonce } => {
                let write = Operation::WriteBytesAt { bin: BIN.into(), offset: *offset as u64, data: value_bytes(*nonce, *len), zero_fill: true };
                ns.operate(&key, &[write], &policy).map(|(meta, _)| meta)
            }
            Op::Truncate { len } => ns.operate(&key, &[Operation::TruncateBytes { bin: BIN.into(), len: *len as u64 }], &policy).map(|(meta, _)| meta),
            Op::Delete => ns.delete(&key, &policy),
        };
        match result {
            Ok(meta) => say(&format!("A {key_number} {}", meta.generation)),
            // Definite refusals: nothing was written.
            Err(Error::RecordNotFound | Error::StopWrites { .. } | Error::DeviceFull { .. } | Error::DeviceOverload { .. }) => {
                say(&format!("F {key_number}"));
                if !matches!(op, Op::Delete) {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Err(err) => bail!("key {key_number}: {err}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parent

#[derive(Default)]
struct KeyModel {
    acked: State,
    in_flight: Option<Op>,
    /// Every state this key has been in, to tell a stale version from garbage.
    history: HashSet<(u32, u32, usize)>,
}

fn fingerprint(generation: u32, data: &[u8]) -> (u32, u32, usize) {
    (generation, crc32fast::hash(data), data.len())
}

pub fn run_check(options: &CheckOptions, mut log: impl FnMut(&str)) -> Result<CheckReport> {
    std::fs::create_dir_all(&options.dir).with_context(|| format!("creating {}", options.dir.display()))?;
    for entry in std::fs::read_dir(&options.dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "dat") {
            std::fs::remove_file(&path)?;
        }
    }
    let mut report = CheckReport {
        cycles: options.cycles,
        seed: options.seed,
        power_loss: options.power_loss,
        unsafe_skip_fsync: options.unsafe_skip_fsync,
        ..Default::default()
    };
    let mut rng = SmallRng::seed_from_u64(options.seed);
    let mut model: HashMap<u32, KeyModel> = (0..options.keys).map(|k| (k, KeyModel::default())).collect();
    let exe = std::env::current_exe()?;
    for cycle in 0..options.cycles {
        let child_seed = rng.gen::<u32>() as u64;
        let mut child = spawn_child(&exe, options, child_seed)?;
        let lines = read_lines(&mut child);
        let during_defrag = rng.gen_bool(0.35);
        let delay = Duration::from_millis(rng.gen_range(30..400));
        let mut defrag_open = 0i64;
        let mut ready = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut kill_at: Option<Instant> = None;
        let killed_in_defrag = loop {
            if let Some(at) = kill_at {
                if Instant::now() >= at {
                    break defrag_open > 0;
                }
            }
            let wait = kill_at.map_or(Duration::from_millis(50), |at| at.saturating_duration_since(Instant::now()));
            match lines.recv_timeout(wait.max(Duration::from_micros(100))) {
                Ok(line) => {
                    handle_line(&line, &mut model, &mut report)?;
                    match line.as_bytes().first() {
                        Some(b'r') if !ready => {
                            ready = true;
                            if !during_defrag {
                                kill_at = Some(Instant::now() + delay);
                            } else {
                                kill_at = Some(Instant::now() + Duration::from_secs(3));
                            }
                        }
                        Some(b'D') => {
                            defrag_open += 1;
                            if during_defrag && ready {
                                kill_at = Some(Instant::now() + Duration::from_micros(rng.gen_range(0..2000)));
                            }
                        }
                        Some(b'd') => defrag_open -= 1,
                        _ => {}
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = child.wait()?;
                    bail!("cycle {cycle}: the writer process exited on its own ({status}); see its stderr above");
                }
            }
            if !ready && Instant::now() > deadline {
                let _ = child.kill();
                bail!("cycle {cycle}: the writer process did not start within 30 s");
            }
        };
        // SIGKILL: the process gets no chance to flush anything.
        child.kill().context("killing the writer")?;
        child.wait()?;
        for line in lines.iter() {
            handle_line(&line, &mut model, &mut report)?;
        }
        if killed_in_defrag {
            report.kills_during_defrag += 1;
        }
        verify(options, &mut model, &mut report)?;
        log(&format!(
            "cycle {}/{}: killed{} after {} acks in total; lost {} corrupt {} resurrected {}",
            cycle + 1,
            options.cycles,
            if killed_in_defrag { " during defragmentation" } else { "" },
            report.acked,
            report.lost,
            report.corrupt_returned,
            report.resurrected
        ));
    }
    report.valid = report.lost == 0 && report.corrupt_returned == 0 && report.resurrected == 0 && report.generation_mismatches == 0;
    Ok(report)
}

fn spawn_child(exe: &Path, options: &CheckOptions, seed: u64) -> Result<Child> {
    let mut command = Command::new(exe);
    command
        .arg("engine-child")
        .arg("--dir")
        .arg(&options.dir)
        .args(["--seed", &seed.to_string(), "--writers", &options.writers.to_string(), "--keys", &options.keys.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if options.power_loss {
        command.arg("--power-loss");
    }
    if options.unsafe_skip_fsync {
        command.arg("--unsafe-skip-fsync");
    }
    command.spawn().context("starting the writer process")
}

fn read_lines(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (sender, receiver) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

fn handle_line(line: &str, model: &mut HashMap<u32, KeyModel>, report: &mut CheckReport) -> Result<()> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let key = || -> Result<u32> { words.get(1).and_then(|w| w.parse().ok()).with_context(|| format!("bad line {line:?}")) };
    match words.first().copied() {
        Some("B") => {
            let op = Op::decode(&words[2..]).with_context(|| format!("bad op in {line:?}"))?;
            let entry = model.get_mut(&key()?).context("unknown key")?;
            if let Some(Some((g, d))) = op.apply(&entry.acked) {
                entry.history.insert(fingerprint(g, &d));
            }
            entry.in_flight = Some(op);
        }
        Some("A") => {
            let entry = model.get_mut(&key()?).context("unknown key")?;
            let op = entry.in_flight.take().context("ack without an operation")?;
            let generation: u32 = words.get(2).and_then(|w| w.parse().ok()).context("ack without generation")?;
            entry.acked = op.apply(&entry.acked).context("the engine acknowledged an operation the model refuses")?;
            let expected = entry.acked.as_ref().map_or(generation, |(g, _)| *g);
            if expected != generation && !matches!(op, Op::Delete) {
                report.generation_mismatches += 1;
            }
            report.acked += 1;
        }
        Some("F") => {
            model.get_mut(&key()?).context("unknown key")?.in_flight = None;
        }
        Some("X") => bail!("the writer process failed: {line}"),
        _ => {}
    }
    Ok(())
}

/// Opens the namespace as a restarted node would and checks every key.
fn verify(options: &CheckOptions, model: &mut HashMap<u32, KeyModel>, report: &mut CheckReport) -> Result<()> {
    let ns = Namespace::open(namespace_config(&options.dir, false), OpenOptions::default()).context("reopening after the kill")?;
    let scan = ns.stats().scan;
    report.skipped_records_at_start += scan.checksum_mismatches + scan.torn_records;
    for (key_number, entry) in model.iter_mut() {
        let found: State = match ns.get(&Key::new(SET, *key_number as i64), None) {
            Ok(Some(record)) => match record.bin(BIN) {
                Some(Value::Bytes(bytes)) => Some((record.meta.generation, bytes.clone())),
                _ => {
                    report.corrupt_returned += 1;
                    continue;
                }
            },
            Ok(None) => None,
            Err(err) => {
                tracing::error!(key = key_number, %err, "read failed after restart");
                report.lost += 1;
                continue;
            }
        };
        let in_flight_result = entry.in_flight.take().and_then(|op| op.apply(&entry.acked));
        if found == entry.acked || Some(&found) == in_flight_result.as_ref() {
            entry.acked = found;
            continue;
        }
        match &found {
            None => report.lost += 1,
            Some((g, d)) if entry.history.contains(&fingerprint(*g, d)) => {
                if entry.acked.is_none() {
                    report.resurrected += 1;
                } else {
                    report.lost += 1;
                }
            }
            Some(_) => report.corrupt_returned += 1,
        }
        tracing::warn!(key = key_number, expected = ?entry.acked.as_ref().map(|(g, d)| (g, d.len())), found = ?found.as_ref().map(|(g, d)| (g, d.len())), "acknowledged state missing after restart");
        // Carry on from what is there so one loss is not counted again every cycle.
        entry.acked = found;
    }
    ns.close()?;
    Ok(())
}
