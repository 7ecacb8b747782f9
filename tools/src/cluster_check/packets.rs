//! Packet faults: delay, loss and reordering of the real packets between nodes (what Jepsen
//! does with `tc netem`).
//!
//! The kernels this project runs on have no `sch_netem` (`tc qdisc add dev lo root netem ...`
//! answers "Specified qdisc kind is unknown"), and the nodes of a run share `lo` with every
//! other run on the machine. So chunkcheck does netem's work itself, packet by packet: rules in
//! the run's iptables chain (`net.rs`) send the packets of the faulted links to an NFQUEUE
//! queue of this process, and a thread here holds each packet for its delay, or drops it,
//! before handing it back to the kernel. The packets are the nodes' own TCP segments; the
//! kernel's TCP retransmits what is dropped and reassembles what is reordered, as it would on
//! a bad network. The queue is bound with fail-open, and the rules with `--queue-bypass`: if
//! the queue is full or this process is gone, packets pass untouched rather than being lost
//! for good.
//!
//! Every packet's fate is counted (`PacketStats`), so a run shows that its faults took effect.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What happens to each packet of the faulted links while a fault lasts.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Shape {
    /// Every packet is held `delay_ms` ± `jitter_ms` (uniform), except as `reorder` says.
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// Probability that a packet is dropped.
    pub loss: f64,
    /// When above 0: only this share of packets is held, the others pass at once (so later
    /// packets overtake held ones, as netem's `reorder` does).
    pub reorder: f64,
}

/// What the queue did to the packets it saw during one fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PacketStats {
    /// Packets the rules sent to the queue.
    pub queued: u64,
    /// Packets held before being passed on.
    pub delayed: u64,
    pub dropped: u64,
    /// Packets passed on while an earlier packet of the same TCP connection was still held.
    pub reordered: u64,
}

/// Packets held at most this long in all (a bound, whatever the shape says).
const MAX_HOLD: Duration = Duration::from_secs(5);
/// Packets the kernel keeps for the queue; past it, packets pass untouched (fail-open).
const KERNEL_QUEUE_LEN: u32 = 8192;
/// Bytes of each packet copied to us: enough for the IPv4 and TCP headers' addresses and ports.
const COPY_RANGE: u16 = 64;

struct State {
    shape: Mutex<Option<(Shape, u64)>>,
    stats: Mutex<PacketStats>,
    stop: AtomicBool,
}

/// This process's NFQUEUE queue and the thread that serves it.
pub struct PacketQueue {
    number: u16,
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl PacketQueue {
    /// Binds a queue number no other process holds and starts serving it. Needs root.
    pub fn open() -> Result<PacketQueue> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the packet nemesis queues packets with iptables NFQUEUE and needs root: run chunkcheck as root, or leave packet out of --nemesis");
        }
        let mut queue = nfq::Queue::open().context("opening a netfilter queue socket (is nfnetlink_queue in this kernel?)")?;
        let base = 0x4000 + (std::process::id() % 0x2000) as u16 * 4;
        let mut bound = None;
        let mut last_error = None;
        for number in base..base + 64 {
            match queue.bind(number) {
                Ok(()) => {
                    bound = Some(number);
                    break;
                }
                Err(err) => last_error = Some(err),
            }
        }
        let Some(number) = bound else {
            bail!("no free NFQUEUE queue number in {base}..{}: {last_error:?}", base + 64);
        };
        queue.set_copy_range(number, COPY_RANGE)?;
        queue.set_fail_open(number, true)?;
        queue.set_queue_max_len(number, KERNEL_QUEUE_LEN)?;
        queue.set_nonblocking(true);
        let state = Arc::new(State { shape: Mutex::new(None), stats: Mutex::new(PacketStats::default()), stop: AtomicBool::new(false) });
        let thread = {
            let state = state.clone();
            std::thread::Builder::new().name("packet-queue".into()).spawn(move || serve(queue, number, &state))?
        };
        Ok(PacketQueue { number, state, thread: Some(thread) })
    }

    /// The queue number the iptables rules send packets to.
    pub fn number(&self) -> u16 {
        self.number
    }

    /// Starts a fault's shape (`seed` draws each packet's fate); the counts start from zero.
    pub fn start(&self, shape: Shape, seed: u64) {
        *self.state.stats.lock().unwrap() = PacketStats::default();
        *self.state.shape.lock().unwrap() = Some((shape, seed));
    }

    /// Ends the fault: held packets are passed on at once. Returns what the fault did.
    pub fn stop(&self) -> PacketStats {
        *self.state.shape.lock().unwrap() = None;
        // Let the thread see it and release what it holds before the rules go.
        std::thread::sleep(Duration::from_millis(20));
        *self.state.stats.lock().unwrap()
    }
}

impl Drop for PacketQueue {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP connection (or other flow) as its packets' addresses and ports tell.
type Flow = [u8; 12];

fn flow_of(packet: &[u8]) -> Flow {
    let mut flow = [0u8; 12];
    if packet.len() >= 20 && packet[0] >> 4 == 4 {
        flow[..8].copy_from_slice(&packet[12..20]);
        let header = (packet[0] & 0x0f) as usize * 4;
        if packet[9] == 6 && packet.len() >= header + 4 {
            flow[8..].copy_from_slice(&packet[header..header + 4]);
        }
    }
    flow
}

struct Held {
    message: nfq::Message,
    flow: Flow,
}

/// The queue's thread: takes packets from the kernel, decides each one's fate by the current
/// shape, and hands held packets back when their time comes.
fn serve(mut queue: nfq::Queue, number: u16, state: &State) {
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut held: HashMap<u64, Held> = HashMap::new();
    let mut held_by_flow: HashMap<Flow, BTreeSet<u64>> = HashMap::new();
    let mut sequence = 0u64;
    let mut rng = SmallRng::seed_from_u64(0);
    let mut current_seed = None;
    let mut stats = PacketStats::default();
    loop {
        let stopping = state.stop.load(Ordering::SeqCst);
        let shape = *state.shape.lock().unwrap();
        if shape.map(|(_, seed)| seed) != current_seed {
            current_seed = shape.map(|(_, seed)| seed);
            rng = SmallRng::seed_from_u64(current_seed.unwrap_or(0));
            stats = PacketStats::default();
        }
        let mut release_all = stopping || shape.is_none();
        loop {
            let mut message = match queue.recv() {
                Ok(message) => message,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => {
                    tracing::warn!(queue = number, %err, "packet queue: receive failed; passing held packets on");
                    release_all = true;
                    break;
                }
            };
            stats.queued += 1;
            let flow = flow_of(message.get_payload());
            let hold = match shape {
                Some((shape, _)) if rng.gen_bool(shape.loss.clamp(0.0, 1.0)) => {
                    stats.dropped += 1;
                    message.set_verdict(nfq::Verdict::Drop);
                    let _ = queue.verdict(message);
                    continue;
                }
                Some((shape, _)) if shape.reorder <= 0.0 || rng.gen_bool(shape.reorder.min(1.0)) => {
                    let low = shape.delay_ms.saturating_sub(shape.jitter_ms);
                    Duration::from_millis(rng.gen_range(low..=shape.delay_ms + shape.jitter_ms)).min(MAX_HOLD)
                }
                _ => Duration::ZERO,
            };
            if hold.is_zero() || stopping {
                pass(&mut queue, message, flow, None, &held_by_flow, &mut stats);
                continue;
            }
            stats.delayed += 1;
            sequence += 1;
            due.push(Reverse((Instant::now() + hold, sequence)));
            held_by_flow.entry(flow).or_default().insert(sequence);
            held.insert(sequence, Held { message, flow });
        }
        let now = Instant::now();
        while let Some(&Reverse((at, id))) = due.peek() {
            if at > now && !release_all {
                break;
            }
            due.pop();
            if let Some(packet) = held.remove(&id) {
                if let Some(ids) = held_by_flow.get_mut(&packet.flow) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        held_by_flow.remove(&packet.flow);
                    }
                }
                pass(&mut queue, packet.message, packet.flow, Some(id), &held_by_flow, &mut stats);
            }
        }
        if shape.is_some() {
            *state.stats.lock().unwrap() = stats;
        }
        if stopping {
            return;
        }
        // Idle, nothing can arrive soon (no fault means no rules); with a fault, look often.
        let nap = match (shape.is_some(), due.peek()) {
            (_, Some(Reverse((at, _)))) => at.saturating_duration_since(now).min(Duration::from_millis(1)),
            (true, None) => Duration::from_millis(1),
            (false, None) => Duration::from_millis(10),
        };
        std::thread::sleep(nap);
    }
}

/// Hands a packet back to the kernel; counts it as reordered when an earlier packet of its
/// connection is still held (`id` is its own place in the hold order, None if never held).
fn pass(queue: &mut nfq::Queue, mut message: nfq::Message, flow: Flow, id: Option<u64>, held_by_flow: &HashMap<Flow, BTreeSet<u64>>, stats: &mut PacketStats) {
    if let Some(earliest) = held_by_flow.get(&flow).and_then(|ids| ids.first()) {
        if id.is_none_or(|id| *earliest < id) {
            stats.reordered += 1;
        }
    }
    message.set_verdict(nfq::Verdict::Accept);
    if let Err(err) = queue.verdict(message) {
        tracing::warn!(%err, "packet queue: could not pass a packet on");
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;
    use crate::cluster_check::cluster::node_host;
    use crate::cluster_check::net::{self, Firewall, CLIENTS};

    /// Round trips of one byte between a client socket (127.0.0.1) and an echo server on a node
    /// address; the slowest of `count`.
    fn slowest_round_trip(stream: &mut TcpStream, count: usize) -> Duration {
        let mut slowest = Duration::ZERO;
        let mut byte = [0u8; 1];
        for i in 0..count {
            let started = Instant::now();
            stream.write_all(&[i as u8]).unwrap();
            stream.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], i as u8);
            slowest = slowest.max(started.elapsed());
        }
        slowest
    }

    fn echo_server(listener: TcpListener) {
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// The real thing: the kernel's packets on lo, sent through this process's queue by the
    /// run's iptables chain. Needs root (CI runs as root).
    #[test]
    fn queued_packets_are_delayed_dropped_and_reordered_and_tcp_still_delivers_every_byte() {
        let node = 90;
        let listener = TcpListener::bind((node_host(node).as_str(), 0)).expect("bind a node address on lo");
        let address = listener.local_addr().unwrap();
        echo_server(listener);
        let mut firewall = Firewall::new().expect("root and iptables");
        let queue = PacketQueue::open().expect("a netfilter queue");
        let links = net::links_of(&[node], &[node]);
        assert_eq!(links, vec![(node, CLIENTS), (CLIENTS, node)]);
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_nodelay(true).unwrap();
        let healthy = slowest_round_trip(&mut stream, 20);
        assert!(healthy < Duration::from_millis(100), "healthy round trips are fast ({healthy:?})");

        // Delay: every packet held 150 ± 0 ms each way.
        queue.start(Shape { delay_ms: 150, jitter_ms: 0, loss: 0.0, reorder: 0.0 }, 1);
        firewall.queue(&links, queue.number()).unwrap();
        let mut fastest = Duration::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            slowest_round_trip(&mut stream, 1);
            fastest = fastest.min(started.elapsed());
        }
        let stats = queue.stop();
        let matched = firewall.heal().unwrap();
        assert!(fastest >= Duration::from_millis(300), "a round trip crosses two delayed links ({fastest:?})");
        assert!(stats.queued >= 6 && stats.delayed >= 6 && stats.dropped == 0, "{stats:?}");
        assert!(matched >= stats.queued, "the rules matched what the queue saw ({matched} < {stats:?})");
        assert!(slowest_round_trip(&mut stream, 20) < Duration::from_millis(100), "healed: fast again");

        // Loss, then reordering: 2 MB through each, echoed back intact.
        let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        for (seed, shape) in
            [(2, Shape { delay_ms: 0, jitter_ms: 0, loss: 0.2, reorder: 0.0 }), (3, Shape { delay_ms: 20, jitter_ms: 10, loss: 0.0, reorder: 0.3 })]
        {
            queue.start(shape, seed);
            firewall.queue(&links, queue.number()).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let sent = payload.clone();
            let sender = std::thread::spawn(move || writer.write_all(&sent).unwrap());
            let mut echoed = vec![0u8; payload.len()];
            stream.read_exact(&mut echoed).unwrap();
            sender.join().unwrap();
            let stats = queue.stop();
            firewall.heal().unwrap();
            assert!(echoed == payload, "{shape:?}: every byte came back, in order");
            assert!(stats.queued > 50, "{shape:?}: {stats:?}");
            if shape.loss > 0.0 {
                assert!(stats.dropped > 0 && stats.delayed == 0, "{shape:?}: {stats:?}");
            } else {
                assert!(stats.delayed > 0 && stats.delayed < stats.queued && stats.reordered > 0 && stats.dropped == 0, "{shape:?}: {stats:?}");
            }
        }
    }

    #[test]
    fn a_flow_is_its_addresses_and_tcp_ports() {
        let mut packet = vec![0u8; 40];
        packet[0] = 0x45;
        packet[9] = 6;
        packet[12..16].copy_from_slice(&[127, 1, 2, 11]);
        packet[16..20].copy_from_slice(&[127, 1, 2, 12]);
        packet[20..24].copy_from_slice(&[0x1f, 0x90, 0xc3, 0x50]);
        let flow = flow_of(&packet);
        assert_eq!(flow, [127, 1, 2, 11, 127, 1, 2, 12, 0x1f, 0x90, 0xc3, 0x50]);
        packet[21] = 0x91;
        assert_ne!(flow_of(&packet), flow, "another source port is another connection");
        assert_eq!(flow_of(&packet[..10]), [0; 12], "a short packet is no flow, and no panic");
    }
}
