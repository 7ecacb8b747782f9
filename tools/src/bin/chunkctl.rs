//! chunkctl: start chunkstore locally, look at it, benchmark it. See `chunkctl --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chunkstore::{Bin, DeviceConfig, Key, Namespace, NamespaceConfig, OpenOptions, Operation, Value, WritePolicy};
use chunkstore_tools::bench::{self, BenchOptions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chunkctl", about = "Operate and benchmark chunkstore")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Start chunkstore locally. Until the cluster lands this opens the storage engine in DIR,
    /// shows a few operations and its figures, and stops cleanly.
    Up {
        #[arg(long, default_value = "chunkstore-data")]
        dir: PathBuf,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
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
    let cli = Cli::parse();
    chunkstore_tools::logging::init(if matches!(cli.command, Commands::Up { .. }) { "info" } else { "warn" });
    let result = match cli.command {
        Commands::Up { dir } => up(&dir),
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

fn up(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = NamespaceConfig::new("demo", vec![DeviceConfig { path: dir.join("demo.dat"), size: Some(64 << 20) }]);
    let ns = Namespace::open(config, OpenOptions::default())?;
    let scan = ns.stats().scan;
    println!("namespace demo open on {} ({} records found in {} ms)", dir.join("demo.dat").display(), ns.stats().records, scan.elapsed_ms);
    let key = Key::new("journal", "chunk-0");
    let chunk = Operation::WriteBytesAt { bin: "data".into(), offset: 512, data: b"hello, durable world".to_vec(), zero_fill: true };
    let (meta, _) = ns.operate(&key, &[chunk, Operation::Add { bin: "writes".into(), delta: 1 }], &WritePolicy::default())?;
    println!("wrote 20 bytes at offset 512 of journal/chunk-0: generation {} (on disk before this line printed)", meta.generation);
    let record = ns.get(&key, None)?.context("the record just written")?;
    if let (Some(Value::Bytes(data)), Some(Value::Int(writes))) = (record.bin("data"), record.bin("writes")) {
        println!("read back: {} bytes, text {:?}, written {writes} times", data.len(), String::from_utf8_lossy(&data[512..]));
    }
    ns.put(&Key::new("journal", "meta"), &[Bin::new("name", Value::String("queue.journal".into()))], &WritePolicy::default())?;
    let stats = ns.stats();
    println!(
        "records {}, writes {}, fdatasync calls {}, free blocks {}/{}, index memory {} bytes",
        stats.records, stats.writes, stats.fsyncs, stats.free_blocks, stats.total_blocks, stats.memory_used_bytes
    );
    ns.close()?;
    println!("closed cleanly; run again to see the records survive (data in {})", dir.display());
    Ok(())
}
