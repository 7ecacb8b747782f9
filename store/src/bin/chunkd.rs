//! chunkd: a chunkstore node. `chunkd --config FILE` (the format: store/src/node/config.rs).
//! SIGTERM or SIGINT shuts down cleanly: Raft groups stopped, engines flushed, WAL closed, and
//! "finished clean shutdown" logged. Logs through tracing (RUST_LOG, default info).

use std::path::PathBuf;
use std::process::ExitCode;

use chunkstore::node::config::ChunkdConfig;
use chunkstore::node::transport::serve;
use chunkstore::node::Node;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// A put allocates and frees many small buffers on several threads (frames, entries, records):
/// glibc's malloc took about 12% of a node's CPU at 32 clients (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn usage() -> ExitCode {
    eprintln!("usage: chunkd --config FILE");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour codes only on a terminal: a log file stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config_path = match args.as_slice() {
        [flag, path] if flag == "--config" => PathBuf::from(path),
        _ => return usage(),
    };
    let config = match ChunkdConfig::load(&config_path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("chunkd: bad configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("CHUNKD_WORKER_THREADS").ok().and_then(|v| v.parse::<usize>().ok()) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().thread_name("chunkd").build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("chunkd: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("chunkd: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ChunkdConfig) -> Result<(), String> {
    let node_config = config.node_config()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| format!("cannot create {}: {e}", config.data_dir.display()))?;
    let client = TcpListener::bind(&config.client_listen).await.map_err(|e| format!("cannot listen on {} (client-listen): {e}", config.client_listen))?;
    let peer = TcpListener::bind(&config.peer_listen).await.map_err(|e| format!("cannot listen on {} (peer-listen): {e}", config.peer_listen))?;
    let metrics = match &config.metrics_listen {
        Some(address) => Some(TcpListener::bind(address).await.map_err(|e| format!("cannot listen on {address} (metrics-listen): {e}"))?),
        None => None,
    };
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    if config.unsafe_unchecked_reads {
        tracing::warn!("UNSAFE test option unsafe-unchecked-reads is set: linearizable reads may be stale");
    }
    if config.test_crash_while_leaving {
        tracing::warn!("test hook test-crash-while-leaving is set: the process aborts when a group moves away from it");
    }
    if config.test_power_loss_devices {
        tracing::warn!("test hook test-power-loss-devices is set: unsynced engine and WAL writes are lost when the process dies");
    }
    if config.unsafe_serve_damaged {
        tracing::warn!("UNSAFE test option unsafe-serve-damaged is set: a damaged replica serves what is left of its data");
    }
    if config.unsafe_wal_skip_fsync {
        tracing::warn!("UNSAFE test option unsafe-wal-skip-fsync is set: the WAL acknowledges appends it never synced");
    }
    if config.unsafe_wal_torn_tail_rule {
        tracing::warn!("UNSAFE test option unsafe-wal-torn-tail-rule is set: damage in the newest WAL segment is cut off as a torn tail");
    }
    if config.unsafe_wal_ignore_sync_errors {
        tracing::warn!("UNSAFE test option unsafe-wal-ignore-sync-errors is set: the WAL acknowledges appends whose fdatasync failed");
    }
    if config.unsafe_wiped_replica_votes {
        tracing::warn!("UNSAFE test option unsafe-wiped-replica-votes is set: a replica that lost its disks votes before it caught up");
    }
    if config.unsafe_skip_fencing {
        tracing::warn!("UNSAFE test option unsafe-skip-fencing is set: writes of expired lease sessions are applied");
    }
    if config.unsafe_skip_dedup {
        tracing::warn!("UNSAFE test option unsafe-skip-dedup is set: retried writes may be applied twice");
    }
    let node = Node::start(node_config).await.map_err(|e| e.to_string())?;
    tokio::spawn(serve(client, node.clone()));
    tokio::spawn(serve(peer, node.clone()));
    if let Some(listener) = metrics {
        tokio::spawn(chunkstore::node::metrics::serve_metrics(listener, std::sync::Arc::downgrade(&node)));
    }
    let stop = async {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    tokio::pin!(stop);
    tokio::select! {
        joined = node.join() => {
            if let Err(err) = joined {
                node.shutdown().await;
                return Err(err.to_string());
            }
            tracing::info!(node = config.node_id, client = %config.client_listen, peer = %config.peer_listen, "chunkd ready");
            stop.await;
        }
        _ = &mut stop => {}
    }
    node.shutdown().await;
    tracing::info!(node = config.node_id, "finished clean shutdown");
    Ok(())
}
