//! The peer network behind a trait, so that several nodes can run in one process.
//!
//! - `TcpNetwork`: the real one. A link is a `SharedConnection` (transport.rs): one TCP
//!   connection per peer, pipelined requests, reconnecting when it fails.
//! - `MemNetwork`: nodes of one process. A request is encoded as on the wire, delivered to
//!   the target node's handler and its response encoded back, with the faults a test sets:
//!   partitions (one way or both), dropped messages, delays (which reorder them) and
//!   duplicated requests, all drawn from one seeded generator.
//!
//! Every request a node sends to a peer goes through a `PeerLink` from its `Network`: Raft
//! messages (raft_network.rs), health probes, metadata, repair, revive and leadership calls.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::transport::SharedConnection;
use crate::protocol::{decode_body, encode_body, Request, Response, FRAME_BYTES_MAX_DEFAULT};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A link to one peer.
pub trait PeerLink: Send + Sync {
    /// Sends `request` and waits for its response, within `timeout` (connecting included).
    fn call<'a>(&'a self, request: &'a Request, timeout: Duration) -> BoxFuture<'a, io::Result<Response>>;
}

/// How a node reaches its peers.
pub trait Network: Send + Sync {
    /// A link to the node at `address`; callers keep it and share it (a TCP link connects on
    /// first use and again after a failure).
    fn link(&self, address: &str) -> Arc<dyn PeerLink>;
}

/// The real network: TCP, leaving from `source` when set.
#[derive(Debug, Default)]
pub struct TcpNetwork {
    pub source: Option<IpAddr>,
}

impl Network for TcpNetwork {
    fn link(&self, address: &str) -> Arc<dyn PeerLink> {
        Arc::new(SharedConnection::new(address).from_source(self.source))
    }
}

impl PeerLink for SharedConnection {
    fn call<'a>(&'a self, request: &'a Request, timeout: Duration) -> BoxFuture<'a, io::Result<Response>> {
        Box::pin(SharedConnection::call(self, request, timeout))
    }
}

/// What serves one address of a `MemNetwork`: a node's request handler (`None`: nothing
/// answers, as when the connection is reset).
pub type MemHandler = Arc<dyn Fn(Request) -> BoxFuture<'static, Option<Response>> + Send + Sync>;

/// Faults applied to every message of a `MemNetwork` (both ways), drawn from its seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemFaults {
    /// Chance that a request, or its response, is lost (the caller times out).
    pub drop: f64,
    /// Chance that a request is delivered twice (the second answer is thrown away).
    pub duplicate: f64,
    /// Each message waits a random time up to this before it is delivered (so messages
    /// overtake each other).
    pub delay_max: Duration,
}

/// Messages a `MemNetwork` carried, lost and duplicated so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemNetStats {
    pub delivered: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub refused: u64,
}

/// Nodes of one process (see the module's notes). Clones share the same network.
#[derive(Clone)]
pub struct MemNetwork {
    state: Arc<Mutex<MemNetState>>,
}

struct MemNetState {
    handlers: HashMap<String, MemHandler>,
    /// The life of each address: `unlisten` ends it, and links of an ended life (tasks a
    /// crashed node left running) reach no one.
    lives: HashMap<String, u64>,
    /// (from, to): messages from `from` to `to` are lost.
    cut: BTreeSet<(String, String)>,
    faults: MemFaults,
    rng: SmallRng,
    stats: MemNetStats,
}

/// What happens to one message.
enum Fate {
    Refused,
    Lost,
    Delivered { delay: Duration, duplicate: bool },
}

impl MemNetwork {
    pub fn new(seed: u64) -> MemNetwork {
        let state = MemNetState {
            handlers: HashMap::new(),
            lives: HashMap::new(),
            cut: BTreeSet::new(),
            faults: MemFaults::default(),
            rng: SmallRng::seed_from_u64(seed),
            stats: Default::default(),
        };
        MemNetwork { state: Arc::new(Mutex::new(state)) }
    }

    /// `handler` serves requests to `address` from now on.
    pub fn listen(&self, address: &str, handler: MemHandler) {
        self.state.lock().unwrap().handlers.insert(address.to_owned(), handler);
    }

    /// `node` serves requests to `address` (while it is alive: it is not kept alive by this).
    pub fn serve_node(&self, address: &str, node: &Arc<super::Node>) {
        let node = Arc::downgrade(node);
        self.listen(
            address,
            Arc::new(move |request| {
                let node = node.upgrade();
                Box::pin(async move {
                    match node {
                        Some(node) => Some(node.handle(request).await),
                        None => None,
                    }
                })
            }),
        );
    }

    /// Nothing serves `address` any more (its node stopped or crashed): requests to it are
    /// refused, as a closed port refuses a connection.
    /// Its life ends too: links made through `of(address)` before now reach no one.
    pub fn unlisten(&self, address: &str) {
        let mut state = self.state.lock().unwrap();
        state.handlers.remove(address);
        *state.lives.entry(address.to_owned()).or_default() += 1;
    }

    /// The network as the node at `address` sees it (in its current life).
    pub fn of(&self, address: &str) -> Arc<dyn Network> {
        let life = self.state.lock().unwrap().lives.get(address).copied().unwrap_or(0);
        Arc::new(MemView { net: self.clone(), from: address.to_owned(), life })
    }

    /// Messages between `side` and every other address are lost, both ways, until `heal`.
    pub fn isolate(&self, side: &[&str], others: &[&str]) {
        let mut state = self.state.lock().unwrap();
        for a in side {
            for b in others {
                state.cut.insert((a.to_string(), b.to_string()));
                state.cut.insert((b.to_string(), a.to_string()));
            }
        }
    }

    /// Messages from `from` to `to` only are lost (a one-way cut), until `heal`.
    pub fn cut_one_way(&self, from: &str, to: &str) {
        self.state.lock().unwrap().cut.insert((from.to_owned(), to.to_owned()));
    }

    /// Ends every cut.
    pub fn heal(&self) {
        self.state.lock().unwrap().cut.clear();
    }

    pub fn set_faults(&self, faults: MemFaults) {
        self.state.lock().unwrap().faults = faults;
    }

    pub fn stats(&self) -> MemNetStats {
        self.state.lock().unwrap().stats
    }

    fn fate(&self, from: &str, life: Option<u64>, to: &str) -> Fate {
        let mut state = self.state.lock().unwrap();
        if life.is_some_and(|life| state.lives.get(from).copied().unwrap_or(0) != life) {
            state.stats.refused += 1;
            return Fate::Refused;
        }
        let listening = state.handlers.contains_key(to);
        let faults = state.faults;
        let cut = state.cut.contains(&(from.to_owned(), to.to_owned()));
        if cut || (faults.drop > 0.0 && state.rng.gen_bool(faults.drop.min(1.0))) {
            state.stats.dropped += 1;
            Fate::Lost
        } else if !listening {
            state.stats.refused += 1;
            Fate::Refused
        } else {
            let delay = match faults.delay_max.is_zero() {
                true => Duration::ZERO,
                false => state.rng.gen_range(Duration::ZERO..=faults.delay_max),
            };
            let duplicate = faults.duplicate > 0.0 && state.rng.gen_bool(faults.duplicate.min(1.0));
            state.stats.delivered += 1;
            state.stats.duplicated += duplicate as u64;
            Fate::Delivered { delay, duplicate }
        }
    }

    /// One request from `from` to `to` and its response, through the faults.
    async fn exchange(&self, from: &str, life: u64, to: &str, body: Vec<u8>) -> io::Result<Response> {
        let (delay, duplicate) = match self.fate(from, Some(life), to) {
            Fate::Refused => return Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("nothing listens at {to}"))),
            Fate::Lost => return std::future::pending().await,
            Fate::Delivered { delay, duplicate } => (delay, duplicate),
        };
        tokio::time::sleep(delay).await;
        // Delivered to whoever serves the address now: the node may have lost its power (and
        // perhaps started again) while the message was on its way.
        let (handler, target_life) = {
            let state = self.state.lock().unwrap();
            match state.handlers.get(to) {
                Some(handler) => (handler.clone(), state.lives.get(to).copied().unwrap_or(0)),
                None => return Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("{to} went away"))),
            }
        };
        let request: Request = decode_body(&body, FRAME_BYTES_MAX_DEFAULT).map_err(io::Error::other)?;
        if duplicate {
            let (again, handler) = (decode_body::<Request>(&body, FRAME_BYTES_MAX_DEFAULT).map_err(io::Error::other)?, handler.clone());
            tokio::spawn(async move { drop(handler(again).await) });
        }
        let Some(response) = handler(request).await else {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, format!("{to} went away")));
        };
        let body = encode_body(&response, FRAME_BYTES_MAX_DEFAULT).map_err(io::Error::other)?;
        // A node that lost its power while answering sends nothing back.
        if self.state.lock().unwrap().lives.get(to).copied().unwrap_or(0) != target_life {
            return std::future::pending().await;
        }
        // The way back has its own fate.
        match self.fate(to, None, from) {
            Fate::Lost => std::future::pending().await,
            Fate::Refused | Fate::Delivered { .. } => {}
        }
        decode_body(&body, FRAME_BYTES_MAX_DEFAULT).map_err(io::Error::other)
    }
}

/// The network as one node sees it.
struct MemView {
    net: MemNetwork,
    from: String,
    life: u64,
}

impl Network for MemView {
    fn link(&self, address: &str) -> Arc<dyn PeerLink> {
        Arc::new(MemLink { net: self.net.clone(), from: self.from.clone(), life: self.life, to: address.to_owned() })
    }
}

struct MemLink {
    net: MemNetwork,
    from: String,
    life: u64,
    to: String,
}

impl PeerLink for MemLink {
    fn call<'a>(&'a self, request: &'a Request, timeout: Duration) -> BoxFuture<'a, io::Result<Response>> {
        Box::pin(async move {
            let body = encode_body(request, FRAME_BYTES_MAX_DEFAULT).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            match tokio::time::timeout(timeout, self.net.exchange(&self.from, self.life, &self.to, body)).await {
                Ok(answer) => answer,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")),
            }
        })
    }
}
