//! Workloads: client threads that drive the cluster and record every operation.
//!
//! Each thread owns one `Client` (one session) and runs one Jepsen process at a time: after
//! an operation of unknown outcome its process number grows by the concurrency, as Jepsen
//! does, because the old operation may still be in flight. Processes of thread `t` are
//! `t, t + concurrency, t + 2 * concurrency, ...`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chunkstore::client::{Client, ClientConfig, ClientError};
use chunkstore::protocol::{ErrorReply, ReadPolicy};
use chunkstore::{Bin, GenerationPolicy, Key, Operation as StoreOp, RecordExistsAction, Ttl, Value, WritePolicy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::history::{Edn, Event, EventType};

pub const NAMESPACE: &str = "test";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Read, write and compare-and-set on independent keys; unique values; a bounded number
    /// of operations per key.
    Register,
    /// Increments (operate add) and reads.
    Counter,
    /// Each client adds unique elements; reads return the whole set.
    Set,
    /// Lease sessions take locks (one per key) and append to the key's log as writes of the
    /// session; now and then a holder stops renewing its lease past the TTL (a pause), then
    /// writes again (see `check::lock`).
    Lock,
}

/// The lease TTL of the lock workload's sessions.
pub const LOCK_TTL: Duration = Duration::from_millis(1500);

/// Every event of the run, in real-time order, also written line by line to history.edn.
pub struct Recorder {
    started: Instant,
    inner: Mutex<(Vec<Event>, BufWriter<File>)>,
    /// Client operations completed so far: (all, :fail, :info), for the progress line.
    completed: [std::sync::atomic::AtomicU64; 3],
}

impl Recorder {
    pub fn create(path: &std::path::Path) -> std::io::Result<Recorder> {
        Ok(Recorder { started: Instant::now(), inner: Mutex::new((Vec::new(), BufWriter::new(File::create(path)?))), completed: Default::default() })
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Appends `event` stamped with the time. Taking the lock orders events: an invocation is
    /// recorded before its request is sent, a completion after its answer arrived.
    pub fn record(&self, mut event: Event) {
        let mut inner = self.inner.lock().unwrap();
        event.time_ns = Some(self.started.elapsed().as_nanos() as u64);
        if event.process.is_some() && event.kind != EventType::Invoke {
            use std::sync::atomic::Ordering::Relaxed;
            self.completed[0].fetch_add(1, Relaxed);
            match event.kind {
                EventType::Fail => self.completed[1].fetch_add(1, Relaxed),
                EventType::Info => self.completed[2].fetch_add(1, Relaxed),
                _ => 0,
            };
        }
        let _ = writeln!(inner.1, "{event}");
        inner.0.push(event);
    }

    /// Client operations completed so far: (all, failed, in doubt).
    pub fn completed(&self) -> (u64, u64, u64) {
        let [all, fail, info] = &self.completed;
        use std::sync::atomic::Ordering::Relaxed;
        (all.load(Relaxed), fail.load(Relaxed), info.load(Relaxed))
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flushes the file and hands back the events.
    pub fn finish(&self) -> Vec<Event> {
        let mut inner = self.inner.lock().unwrap();
        let _ = inner.1.flush();
        inner.0.clone()
    }
}

/// What the workers share.
pub struct Shared {
    pub workload: Workload,
    pub seeds: Vec<String>,
    pub read_policy: ReadPolicy,
    pub concurrency: usize,
    pub keys: u64,
    pub ops_per_key_max: u32,
    pub seed: u64,
    pub stop: AtomicBool,
    pub recorder: Recorder,
    /// Source of unique written values and set elements.
    next_value: AtomicI64,
    /// Register and set keys in use and the operations each has had; a key that reaches
    /// `ops_per_key_max` is replaced by a fresh one.
    key_pool: Mutex<KeyPool>,
}

struct KeyPool {
    active: Vec<(u64, u32)>,
    next_key: u64,
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        workload: Workload,
        seeds: Vec<String>,
        read_policy: ReadPolicy,
        concurrency: usize,
        keys: u64,
        ops_per_key_max: u32,
        seed: u64,
        recorder: Recorder,
    ) -> Shared {
        Shared {
            workload,
            seeds,
            read_policy,
            concurrency,
            keys,
            ops_per_key_max,
            seed,
            stop: AtomicBool::new(false),
            recorder,
            next_value: AtomicI64::new(1),
            key_pool: Mutex::new(KeyPool { active: (0..keys).map(|k| (k, 0)).collect(), next_key: keys }),
        }
    }

    /// Every key an operation was issued on.
    pub fn keys_used(&self) -> u64 {
        match self.workload {
            Workload::Register | Workload::Set => self.key_pool.lock().unwrap().next_key,
            Workload::Counter | Workload::Lock => self.keys,
        }
    }

    /// Registers and sets move on to a fresh key after `ops_per_key_max` operations (bounded
    /// linearizability searches; sets that stay small, so reads stay cheap). Counters keep
    /// their keys for the whole run.
    fn pick_key(&self, rng: &mut SmallRng) -> u64 {
        if matches!(self.workload, Workload::Counter | Workload::Lock) {
            return rng.gen_range(0..self.keys);
        }
        let mut pool = self.key_pool.lock().unwrap();
        let slot = rng.gen_range(0..pool.active.len());
        let key = pool.active[slot].0;
        pool.active[slot].1 += 1;
        if pool.active[slot].1 >= self.ops_per_key_max {
            pool.active[slot] = (pool.next_key, 0);
            pool.next_key += 1;
        }
        key
    }
}

/// A client for the workload: short timeouts so that a worker notices the end of the run.
pub fn connect(seeds: &[String], read_policy: ReadPolicy, stop: &AtomicBool) -> Option<Client> {
    let config = ClientConfig { timeout: Duration::from_secs(2), retry_window: Duration::from_secs(6), read_policy, ..ClientConfig::new(seeds.to_vec()) };
    loop {
        match Client::connect(config.clone()) {
            Ok(client) => return Some(client),
            Err(_) if !stop.load(Ordering::Relaxed) => std::thread::sleep(Duration::from_millis(200)),
            Err(_) => return None,
        }
    }
}

pub fn record_key(workload: Workload, key: u64) -> Key {
    let set = match workload {
        Workload::Register => "register",
        Workload::Counter => "counter",
        Workload::Set => "set",
        // The log of appends; the lock itself is `lock_key`.
        Workload::Lock => "lock-log",
    };
    Key::new(set, key as i64)
}

/// The record the lock workload takes as the lock of `key`'s log.
fn lock_key(key: u64) -> Key {
    Key::new("lock", key as i64)
}

/// An operation about to be invoked.
pub struct Invocation {
    pub f: &'static str,
    pub key: u64,
    pub value: Edn,
}

/// How an operation ended.
pub struct Completion {
    pub kind: EventType,
    pub value: Edn,
    pub error: Option<Edn>,
    pub extra: Vec<(Edn, Edn)>,
}

impl Completion {
    fn ok(value: Edn) -> Completion {
        Completion { kind: EventType::Ok, value, error: None, extra: Vec::new() }
    }

    /// A write that failed some other way may or may not have been applied (a retry after an
    /// in-doubt attempt can end in any error): its outcome is unknown. A read that failed had
    /// no effect.
    fn failed(is_write: bool, value: Edn, err: &ClientError) -> Completion {
        let error = Edn::Str(err.to_string());
        Completion { kind: if is_write { EventType::Info } else { EventType::Fail }, value, error: Some(error), extra: Vec::new() }
    }
}

fn policy(exists: RecordExistsAction, generation: GenerationPolicy) -> WritePolicy {
    WritePolicy { exists, generation, ttl: Ttl::NeverExpire }
}

/// Reads the register bin `v`: (value or nil, generation or 0).
fn read_register(client: &Client, key: &Key, read: ReadPolicy) -> Result<(Edn, u32), ClientError> {
    let record = client.get_with(NAMESPACE, key, None, read)?;
    Ok(match record {
        None => (Edn::Nil, 0),
        Some(record) => match record.bin("v") {
            Some(Value::Int(v)) => (Edn::Int(*v), record.meta.generation),
            other => (Edn::Str(format!("unexpected bin {other:?}")), record.meta.generation),
        },
    })
}

fn generation_extra(generation: u32) -> Vec<(Edn, Edn)> {
    vec![(Edn::keyword("gen"), Edn::Int(generation as i64))]
}

/// Carries out one operation; reads use `read`.
fn execute(client: &Client, shared: &Shared, op: &Invocation, read: ReadPolicy) -> Completion {
    let key = record_key(shared.workload, op.key);
    match (shared.workload, op.f) {
        (Workload::Register, "read") => match read_register(client, &key, read) {
            Ok((value, generation)) => Completion { extra: generation_extra(generation), ..Completion::ok(value) },
            Err(err) => Completion::failed(false, Edn::Nil, &err),
        },
        (Workload::Register, "write") => {
            let Edn::Int(v) = op.value else { unreachable!("register writes are integers") };
            match client.put(NAMESPACE, &key, vec![Bin::new("v", Value::Int(v))], &policy(RecordExistsAction::Replace, GenerationPolicy::None)) {
                Ok(meta) => Completion { extra: generation_extra(meta.generation), ..Completion::ok(op.value.clone()) },
                Err(err) => Completion::failed(true, op.value.clone(), &err),
            }
        }
        (Workload::Register, "cas") => compare_and_set(client, &key, &op.value),
        (Workload::Counter, "add") => {
            match client.operate(
                NAMESPACE,
                &key,
                vec![StoreOp::Add { bin: "n".into(), delta: 1 }],
                &policy(RecordExistsAction::CreateOrUpdate, GenerationPolicy::None),
            ) {
                Ok(_) => Completion::ok(op.value.clone()),
                Err(err) => Completion::failed(true, op.value.clone(), &err),
            }
        }
        (Workload::Counter, "read") => match client.get_with(NAMESPACE, &key, None, read) {
            Ok(record) => match record.as_ref().map(|r| r.bin("n")) {
                None | Some(None) => Completion::ok(Edn::Int(0)),
                Some(Some(Value::Int(n))) => Completion::ok(Edn::Int(*n)),
                Some(Some(other)) => Completion::ok(Edn::Str(format!("unexpected bin {other:?}"))),
            },
            Err(err) => Completion::failed(false, Edn::Nil, &err),
        },
        (Workload::Set, "add") => {
            let Edn::Int(element) = op.value else { unreachable!("set elements are integers") };
            let append = StoreOp::Append { bin: "s".into(), value: Value::String(format!("{element} ")) };
            match client.operate(NAMESPACE, &key, vec![append], &policy(RecordExistsAction::CreateOrUpdate, GenerationPolicy::None)) {
                Ok(_) => Completion::ok(op.value.clone()),
                Err(err) => Completion::failed(true, op.value.clone(), &err),
            }
        }
        (Workload::Set, "read") => match client.get_with(NAMESPACE, &key, None, read) {
            Ok(record) => match record.as_ref().and_then(|r| r.bin("s")) {
                None => Completion::ok(Edn::Vector(Vec::new())),
                Some(Value::String(text)) => {
                    let elements: Result<Vec<Edn>, _> = text.split_whitespace().map(|e| e.parse::<i64>().map(Edn::Int)).collect();
                    Completion::ok(elements.map(Edn::Vector).unwrap_or_else(|_| Edn::Str(format!("unparsable set {text:?}"))))
                }
                Some(other) => Completion::ok(Edn::Str(format!("unexpected bin {other:?}"))),
            },
            Err(err) => Completion::failed(false, Edn::Nil, &err),
        },
        (Workload::Lock, "read") => match client.get_with(NAMESPACE, &key, None, read) {
            Ok(record) => match record.as_ref().and_then(|r| r.bin("log")) {
                None => Completion::ok(Edn::Vector(Vec::new())),
                Some(Value::String(text)) => Completion::ok(parse_lock_log(text).unwrap_or_else(|| Edn::Str(format!("unparsable log {text:?}")))),
                Some(other) => Completion::ok(Edn::Str(format!("unexpected bin {other:?}"))),
            },
            Err(err) => Completion::failed(false, Edn::Nil, &err),
        },
        (Workload::Lock, "append" | "append-after-pause") => {
            let Edn::Vector(items) = &op.value else { unreachable!("lock appends are [session holding value]") };
            let [Edn::Int(session), Edn::Int(holding), Edn::Int(value)] = items.as_slice() else { unreachable!("lock appends are integers") };
            let append = StoreOp::Append { bin: "log".into(), value: Value::String(format!("{session}.{holding}:{value} ")) };
            let write = chunkstore::WriteOp::Operate(vec![append]);
            match client.write_in_session(*session as u64, NAMESPACE, &key, write, &policy(RecordExistsAction::CreateOrUpdate, GenerationPolicy::None)) {
                Ok(_) => Completion::ok(op.value.clone()),
                // Refused, and never applied (the session is fenced for good).
                Err(ClientError::Server(ErrorReply::SessionExpired { .. })) => {
                    Completion { kind: EventType::Fail, value: op.value.clone(), error: Some(Edn::keyword("session-expired")), extra: Vec::new() }
                }
                Err(err) => Completion::failed(true, op.value.clone(), &err),
            }
        }
        (Workload::Lock, "acquire" | "release") => {
            let Edn::Int(session) = op.value else { unreachable!("lock operations name their session") };
            let done = match op.f {
                "acquire" => client.lock(session as u64, NAMESPACE, &lock_key(op.key), Duration::from_secs(2)),
                _ => client.unlock(session as u64, NAMESPACE, &lock_key(op.key)),
            };
            match done {
                Ok(()) => Completion::ok(op.value.clone()),
                Err(ClientError::Server(reply @ (ErrorReply::LockHeld { .. } | ErrorReply::SessionExpired { .. } | ErrorReply::LockNotHeld { .. }))) => {
                    Completion { kind: EventType::Fail, value: op.value.clone(), error: Some(Edn::Str(reply.to_string())), extra: Vec::new() }
                }
                Err(err) => Completion::failed(true, op.value.clone(), &err),
            }
        }
        (workload, f) => unreachable!("{workload:?} has no operation {f}"),
    }
}

/// Compare-and-set on the register: a linearizable read, then a write conditional on the
/// generation read. Written values are unique, so a different generation means a different
/// value: a generation mismatch is a failed comparison at the moment of the write.
fn compare_and_set(client: &Client, key: &Key, value: &Edn) -> Completion {
    let Edn::Vector(pair) = value else { unreachable!("cas values are [from to]") };
    let (from, Edn::Int(to)) = (&pair[0], &pair[1]) else { unreachable!("cas writes integers") };
    let mismatch = || Completion { kind: EventType::Fail, value: value.clone(), error: Some(Edn::keyword("cas-mismatch")), extra: Vec::new() };
    let (current, generation) = match read_register(client, key, ReadPolicy::Linearizable) {
        Ok(read) => read,
        Err(err) => return Completion { kind: EventType::Fail, ..Completion::failed(false, value.clone(), &err) },
    };
    if &current != from || generation == 0 {
        return mismatch();
    }
    let write = policy(RecordExistsAction::Replace, GenerationPolicy::ExpectEqual(generation));
    match client.put(NAMESPACE, key, vec![Bin::new("v", Value::Int(*to))], &write) {
        Ok(meta) => Completion { extra: generation_extra(meta.generation), ..Completion::ok(value.clone()) },
        Err(ClientError::Server(ErrorReply::GenerationMismatch { .. })) => mismatch(),
        Err(err) => Completion::failed(true, value.clone(), &err),
    }
}

/// A lock log's entries, `SESSION.HOLDING:VALUE ` each, as `[[session holding value] ...]`.
fn parse_lock_log(text: &str) -> Option<Edn> {
    let entries = text.split_whitespace().map(|entry| {
        let (holder, value) = entry.split_once(':')?;
        let (session, holding) = holder.split_once('.')?;
        Some(Edn::Vector(vec![Edn::Int(session.parse().ok()?), Edn::Int(holding.parse().ok()?), Edn::Int(value.parse().ok()?)]))
    });
    entries.collect::<Option<Vec<Edn>>>().map(Edn::Vector)
}

/// Chooses the next operation of a thread.
fn generate(shared: &Shared, rng: &mut SmallRng, seen: &HashMap<u64, i64>) -> Invocation {
    let key = shared.pick_key(rng);
    let unique = || shared.next_value.fetch_add(1, Ordering::Relaxed);
    match shared.workload {
        Workload::Register => match rng.gen_range(0..3) {
            0 => Invocation { f: "read", key, value: Edn::Nil },
            1 => Invocation { f: "write", key, value: Edn::Int(unique()) },
            _ => match seen.get(&key) {
                Some(&from) => Invocation { f: "cas", key, value: Edn::Vector(vec![Edn::Int(from), Edn::Int(unique())]) },
                None => Invocation { f: "read", key, value: Edn::Nil },
            },
        },
        Workload::Counter => match rng.gen_bool(0.6) {
            true => Invocation { f: "add", key, value: Edn::Int(1) },
            false => Invocation { f: "read", key, value: Edn::Nil },
        },
        Workload::Set => match rng.gen_bool(0.8) {
            true => Invocation { f: "add", key, value: Edn::Int(unique()) },
            false => Invocation { f: "read", key, value: Edn::Nil },
        },
        Workload::Lock => unreachable!("lock workers choose their own operations (run_lock_worker)"),
    }
}

/// Records the invocation, runs it, records the completion.
pub fn perform(client: &Client, shared: &Shared, process: i64, op: &Invocation) -> Completion {
    perform_with_policy(client, shared, process, op, shared.read_policy)
}

pub fn perform_with_policy(client: &Client, shared: &Shared, process: i64, op: &Invocation, read: ReadPolicy) -> Completion {
    let mut invoke = Event::new(process, EventType::Invoke, op.f, op.value.clone());
    invoke.key = Some(Edn::Int(op.key as i64));
    shared.recorder.record(invoke);
    let done = execute(client, shared, op, read);
    let mut event = Event::new(process, done.kind, op.f, done.value.clone());
    event.key = Some(Edn::Int(op.key as i64));
    event.error = done.error.clone();
    event.extra = done.extra.clone();
    shared.recorder.record(event);
    done
}

/// One client thread, until `shared.stop`.
pub fn run_worker(shared: &Shared, thread: usize) {
    let Some(client) = connect(&shared.seeds, shared.read_policy, &shared.stop) else { return };
    if shared.workload == Workload::Lock {
        return run_lock_worker(shared, &client, thread);
    }
    let mut rng = SmallRng::seed_from_u64(shared.seed.wrapping_mul(1_000_003).wrapping_add(thread as u64));
    let mut process = thread as i64;
    // The last value this thread saw or wrote per register key: what its next cas expects.
    let mut seen: HashMap<u64, i64> = HashMap::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let op = generate(shared, &mut rng, &seen);
        let done = perform(&client, shared, process, &op);
        match (done.kind, op.f, &done.value) {
            (EventType::Ok, "read" | "write", Edn::Int(v)) => {
                seen.insert(op.key, *v);
            }
            (EventType::Ok, "cas", Edn::Vector(pair)) => {
                if let Edn::Int(to) = pair[1] {
                    seen.insert(op.key, to);
                }
            }
            (EventType::Info, ..) => process += shared.concurrency as i64,
            _ => {}
        }
    }
}

/// One lock-workload thread, until `shared.stop`: opens a lease session (renewed every third
/// of the TTL by a second thread), takes a random key's lock, appends to its log a few times,
/// and releases it; one holding in five ends in a pause instead: renewals stop, the thread
/// sleeps past the TTL (another session can take the lock meanwhile), then appends once more
/// (`append-after-pause`) and gives the session up. An append of unknown outcome (it may still
/// be applied later) ends the session rather than the holding: closing a session fences it
/// everywhere before its locks are released, while a plain release would let the lost append
/// land after the next holder's writes.
fn run_lock_worker(shared: &Shared, client: &Client, thread: usize) {
    let mut rng = SmallRng::seed_from_u64(shared.seed.wrapping_mul(1_000_003).wrapping_add(thread as u64));
    let mut process = thread as i64;
    let stopped = || shared.stop.load(Ordering::Relaxed);
    while !stopped() {
        let session = match client.open_session(LOCK_TTL) {
            Ok(session) => session as i64,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let renewing = AtomicBool::new(true);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut last = Instant::now();
                while renewing.load(Ordering::Relaxed) && !stopped() {
                    std::thread::sleep(Duration::from_millis(20));
                    if last.elapsed() >= LOCK_TTL / 3 && renewing.load(Ordering::Relaxed) {
                        last = Instant::now();
                        if let Err(ClientError::Server(ErrorReply::SessionExpired { .. })) = client.keep_alive(session as u64) {
                            return;
                        }
                    }
                }
            });
            let run = |f: &'static str, key: u64, value: Edn, process: &mut i64| {
                let done = perform(client, shared, *process, &Invocation { f, key, value });
                if done.kind == EventType::Info {
                    *process += shared.concurrency as i64;
                }
                done
            };
            let mut holding = 0;
            while !stopped() {
                let key = rng.gen_range(0..shared.keys);
                let acquired = run("acquire", key, Edn::Int(session), &mut process);
                if acquired.kind != EventType::Ok {
                    if acquired.error.as_ref().is_some_and(|e| e.to_string().contains("expired")) {
                        break;
                    }
                    continue;
                }
                holding += 1;
                let mut ended = false;
                for _ in 0..rng.gen_range(2..6) {
                    let value = Edn::Vector(vec![Edn::Int(session), Edn::Int(holding), Edn::Int(shared.next_value.fetch_add(1, Ordering::Relaxed))]);
                    if run("append", key, value, &mut process).kind != EventType::Ok {
                        ended = true;
                        break;
                    }
                }
                if ended {
                    break;
                }
                if rng.gen_bool(0.2) {
                    renewing.store(false, Ordering::Relaxed);
                    let until = Instant::now() + LOCK_TTL * 2 + Duration::from_millis(500);
                    while Instant::now() < until && !stopped() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let value = Edn::Vector(vec![Edn::Int(session), Edn::Int(holding), Edn::Int(shared.next_value.fetch_add(1, Ordering::Relaxed))]);
                    run("append-after-pause", key, value, &mut process);
                    break;
                }
                run("release", key, Edn::Int(session), &mut process);
                if rng.gen_bool(0.3) {
                    break;
                }
            }
            renewing.store(false, Ordering::Relaxed);
        });
        let _ = client.close_session(session as u64);
    }
}
