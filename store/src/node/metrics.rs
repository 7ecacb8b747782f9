//! A node's Prometheus metrics (OpenMetrics text on HTTP `GET /metrics`, at chunkd's
//! `metrics-listen` address): requests and their latency by kind, and, read when scraped, the
//! groups this node leads, each group's commit and apply lag, term and whether it may campaign, the WAL's fsyncs and bytes, each
//! namespace's device use and stop-writes state, and lease sessions.
//!
//! The HTTP side is a few lines on tokio, bounded (a request head of at most 8 KiB, read within
//! 5 s): one endpoint needs no HTTP framework.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Node;
use crate::protocol::{Request, Response};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabels {
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    namespace: String,
    group: u32,
}

/// The metrics a node keeps, and the registry that encodes them.
pub(crate) struct NodeMetrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<KindLabels, Histogram>,
    leaders: Family<NamespaceLabels, Gauge>,
    commit_lag: Family<GroupLabels, Gauge>,
    apply_lag: Family<GroupLabels, Gauge>,
    term: Family<GroupLabels, Gauge>,
    may_campaign: Family<GroupLabels, Gauge>,
    wal_fsyncs: Counter,
    wal_bytes: Counter,
    device_used: Family<NamespaceLabels, Gauge>,
    device_free: Family<NamespaceLabels, Gauge>,
    stop_writes: Family<NamespaceLabels, Gauge>,
    records: Family<NamespaceLabels, Gauge>,
    lease_sessions: Gauge,
    /// The WAL totals at the last scrape (counters advance by the difference).
    wal_seen: Mutex<(u64, u64)>,
}

impl Default for NodeMetrics {
    fn default() -> NodeMetrics {
        let requests = Family::<RequestLabels, Counter>::default();
        // 50 µs to about 1.6 s.
        let latency = Family::<KindLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 16)));
        let metrics = NodeMetrics {
            registry: Mutex::new(Registry::with_prefix("chunkstore")),
            requests,
            latency,
            leaders: Default::default(),
            commit_lag: Default::default(),
            apply_lag: Default::default(),
            term: Default::default(),
            may_campaign: Default::default(),
            wal_fsyncs: Default::default(),
            wal_bytes: Default::default(),
            device_used: Default::default(),
            device_free: Default::default(),
            stop_writes: Default::default(),
            records: Default::default(),
            lease_sessions: Default::default(),
            wal_seen: Default::default(),
        };
        {
            let mut registry = metrics.registry.lock().unwrap();
            registry.register("requests", "Requests answered, by kind and outcome (ok or the error)", metrics.requests.clone());
            registry.register("request_duration_seconds", "Time to answer a request, by kind", metrics.latency.clone());
            registry.register("groups_led", "Groups this node leads, by namespace", metrics.leaders.clone());
            registry.register(
                "group_commit_lag_entries",
                "Log entries this replica holds past the commit index it knows (on the leader: entries its slowest replica lacks)",
                metrics.commit_lag.clone(),
            );
            registry.register("group_apply_lag_entries", "Committed entries this replica has not applied yet", metrics.apply_lag.clone());
            registry.register("group_term", "The Raft term this replica is in (every election raises it)", metrics.term.clone());
            registry.register(
                "group_may_campaign",
                "1 if this replica starts an election when it hears no leader; 0 while it is cut off from most of the group, catches up, or waits for device space",
                metrics.may_campaign.clone(),
            );
            registry.register("wal_fsyncs", "fdatasync calls of the write-ahead log", metrics.wal_fsyncs.clone());
            registry.register("wal_written_bytes", "Bytes written to the write-ahead log", metrics.wal_bytes.clone());
            registry.register("device_used_bytes", "Bytes of the namespace's devices in use", metrics.device_used.clone());
            registry.register("device_free_bytes", "Bytes of the namespace's devices free for writes", metrics.device_free.clone());
            registry.register("stop_writes", "1 while the namespace refuses new writes on this node (stop-writes), else 0", metrics.stop_writes.clone());
            registry.register(
                "records",
                "Records this node's engine holds, by namespace (of the groups it replicates: a replica that moved away is forgotten)",
                metrics.records.clone(),
            );
            registry.register("lease_sessions", "Lease sessions open or ending (on the metadata leader; 0 elsewhere)", metrics.lease_sessions.clone());
        }
        metrics
    }
}

/// A request's kind, for the metrics (client requests by name, node-to-node ones as "peer").
fn kind(request: &Request) -> &'static str {
    match request {
        Request::Get { .. } | Request::GetRange { .. } => "get",
        Request::Write { .. } => "write",
        Request::ClusterMap => "cluster_map",
        Request::SessionOpen { .. } | Request::SessionKeepAlive { .. } | Request::SessionClose { .. } => "session",
        Request::SetRoster { .. } | Request::ForgetNode { .. } => "roster",
        _ => "peer",
    }
}

fn outcome(response: &Response) -> &'static str {
    use crate::protocol::ErrorReply as E;
    match response {
        Response::Error(error) => match error {
            E::NotLeader { .. } => "not_leader",
            E::PartitionUnavailable => "unavailable",
            E::Timeout { .. } => "timeout",
            E::StopWrites(_) | E::DeviceOverload(_) => "overload",
            E::Internal(_) => "internal",
            E::BadRequest(_) | E::UnknownNamespace(_) => "bad_request",
            _ => "refused",
        },
        _ => "ok",
    }
}

impl NodeMetrics {
    /// Counts a request answered with `response` after `elapsed`.
    pub(crate) fn observe(&self, request_kind: &'static str, response: &Response, elapsed: Duration) {
        self.requests.get_or_create(&RequestLabels { kind: request_kind, outcome: outcome(response) }).inc();
        self.latency.get_or_create(&KindLabels { kind: request_kind }).observe(elapsed.as_secs_f64());
    }

    pub(crate) fn kind(request: &Request) -> &'static str {
        kind(request)
    }
}

impl Node {
    /// The metrics as OpenMetrics text, the gauges read now.
    pub fn metrics_text(&self) -> String {
        let metrics = &self.metrics;
        let me = self.config.node_id;
        metrics.leaders.clear();
        metrics.commit_lag.clear();
        metrics.apply_lag.clear();
        metrics.term.clear();
        metrics.may_campaign.clear();
        for (name, hosted) in self.namespaces().into_iter().flatten() {
            let mut led = 0;
            for (group, local) in hosted.groups() {
                let m = local.raft.metrics().borrow().clone();
                let last = m.last_log_index.unwrap_or(0);
                let applied = m.last_applied.map_or(0, |l| l.index);
                // What this replica saved as committed (openraft saves it as it learns it); a
                // replica that has saved none yet counts its whole log as not committed.
                let wal_group = super::namespace_wal_group(name, group);
                let committed = crate::raft::log_store::saved_committed(&self.wal, wal_group).ok().flatten().map_or(applied, |c| c.index.max(applied));
                let labels = GroupLabels { namespace: name.clone(), group };
                let commit_lag = if m.current_leader == Some(me) {
                    led += 1;
                    let slowest = m.replication.as_ref().and_then(|r| r.values().map(|l| l.map_or(0, |l| l.index)).min()).unwrap_or(last);
                    last.saturating_sub(slowest)
                } else {
                    last.saturating_sub(committed)
                };
                metrics.commit_lag.get_or_create(&labels).set(commit_lag.min(i64::MAX as u64) as i64);
                metrics.apply_lag.get_or_create(&labels).set(committed.saturating_sub(applied).min(i64::MAX as u64) as i64);
                metrics.term.get_or_create(&labels).set(m.current_term.min(i64::MAX as u64) as i64);
                metrics.may_campaign.get_or_create(&labels).set(i64::from(self.may_campaign(&local)));
            }
            metrics.leaders.get_or_create(&NamespaceLabels { namespace: name.clone() }).set(led);
            let stats = hosted.engine.stats();
            let block = hosted.engine.config().write_block_size as u64;
            let labels = NamespaceLabels { namespace: name.clone() };
            metrics.device_used.get_or_create(&labels).set((stats.total_blocks.saturating_sub(stats.free_blocks) * block) as i64);
            metrics.device_free.get_or_create(&labels).set((stats.free_blocks * block) as i64);
            metrics.stop_writes.get_or_create(&labels).set(stats.stop_writes.is_some() as i64);
            metrics.records.get_or_create(&labels).set(stats.records.min(i64::MAX as u64) as i64);
        }
        let wal = self.wal.stats();
        {
            let mut seen = metrics.wal_seen.lock().unwrap();
            metrics.wal_fsyncs.inc_by(wal.fsyncs.saturating_sub(seen.0));
            metrics.wal_bytes.inc_by(wal.bytes.saturating_sub(seen.1));
            *seen = (wal.fsyncs.max(seen.0), wal.bytes.max(seen.1));
        }
        let leading = self.leading_meta().is_ok();
        let sessions = if leading { self.meta_state.leases().len() } else { 0 };
        metrics.lease_sessions.set(sessions as i64);
        let mut text = String::new();
        let registry = metrics.registry.lock().unwrap();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::warn!(%err, "encoding the metrics failed");
        }
        text
    }
}

/// The largest request head the metrics endpoint reads.
const HEAD_BYTES_MAX: usize = 8 << 10;

/// Serves `GET /metrics` on `listener` until the node is gone.
pub async fn serve_metrics(listener: tokio::net::TcpListener, node: std::sync::Weak<Node>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let node = node.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HEAD_BYTES_MAX {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => match node.upgrade() {
                    Some(node) => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", node.metrics_text()),
                    None => ("503 Service Unavailable", "text/plain", "the node is stopping\n".to_owned()),
                },
                ("GET", _) => ("404 Not Found", "text/plain", "only /metrics is served here\n".to_owned()),
                _ => ("405 Method Not Allowed", "text/plain", "only GET is served here\n".to_owned()),
            };
            let response = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
