//! chunkcheck: validation by crashing real processes. See `chunkcheck --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use chunkstore_tools::check::models::Model;
use chunkstore_tools::engine_check::{run_check, run_child, CheckOptions, ChildOptions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chunkcheck", about = "Crash, kill and power-cut validation of chunkstore")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
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
        /// Print one JSON object as the last line.
        #[arg(long)]
        json: bool,
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
    chunkstore_tools::logging::init("warn");
    match Cli::parse().command {
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
        Commands::History { file, model, time_limit, json } => {
            ExitCode::from(chunkstore_tools::check::history_command(&file, model, std::time::Duration::from_secs(time_limit), json))
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
