//! Linearizability checking: the Wing–Gong–Lowe search as Porcupine runs it.
//!
//! The history is split by key and each key is checked alone (P-compositionality: a history
//! is linearizable iff each key's sub-history is). For one key, calls and returns form a
//! linked list in real-time order; the search walks it, linearizes a call whose step the
//! model allows (lifting the call and its return out of the list), and backtracks when it
//! meets a return whose call has not been linearized yet. Every (set of linearized
//! operations, state) pair reached is remembered, so no configuration is explored twice.
//! An operation of unknown outcome has its return at the end of time: it may take effect
//! anywhere after its call, or (linearized last) in effect never.
//!
//! A search that hits its deadline or its memory bound answers `Unknown`, never
//! `Linearizable`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};

use super::models::{Model, Step};
use super::prune;
use crate::history::{Edn, Operation};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Linearizable,
    NotLinearizable,
    Unknown,
}

/// Bounds on one check.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The whole check answers `Unknown` for keys not finished by then.
    pub deadline: Option<Instant>,
    /// Remembered configurations per key before the key is given up as `Unknown`.
    pub memo_entries_max: usize,
    /// Decide what `prune` can before searching (off only to test the rules against the
    /// bare search).
    pub prune: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { deadline: None, memo_entries_max: 4_000_000, prune: true }
    }
}

impl Limits {
    pub fn within(time: Duration) -> Limits {
        Limits { deadline: Some(Instant::now() + time), ..Limits::default() }
    }
}

/// What the search found for one key.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyResult {
    pub key: Option<String>,
    pub operations: usize,
    pub verdict: Verdict,
    /// For a key that is not linearizable: the operation (index into the checked operations)
    /// whose completion no order of the operations before it can explain, found at the
    /// deepest point the search reached...
    pub stuck_operation: Option<usize>,
    /// ...and the operations linearized before it there, in order.
    pub linearized_before: Vec<usize>,
    /// Why a key is `Unknown`.
    pub unknown_reason: Option<String>,
    /// Decided before any search: an operation found a value no write can have left there
    /// (`stuck_operation`).
    pub unexplained_value: bool,
    /// Crashed writes nothing observed, left out of the search (`prune`).
    pub crashed_writes_dropped: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub keys: Vec<KeyResult>,
    pub elapsed_ms: u64,
}

/// One key and the steps of its operations (with their indexes among all operations).
type KeySteps<'a> = (Option<&'a Edn>, Vec<(usize, Step)>);

/// Checks `operations` against `model`, key by key.
pub fn check(model: Model, operations: &[Operation], limits: Limits) -> Result<Report, String> {
    let started = Instant::now();
    let mut by_key: BTreeMap<Option<&Edn>, Vec<(usize, Step)>> = BTreeMap::new();
    for (index, op) in operations.iter().enumerate() {
        if let Some(step) = model.step_of(op).map_err(|what| format!("operation at event {}: {what}", op.call + 1))? {
            by_key.entry(op.key.as_ref()).or_default().push((index, step));
        }
    }
    // Smallest keys first: one key that is not linearizable decides the verdict, and after
    // that the other keys get only a small search each (enough to list more anomalies, not
    // enough to spend minutes on keys that cannot change the answer).
    let mut by_key: Vec<KeySteps> = by_key.into_iter().collect();
    by_key.sort_by_key(|(_, steps)| steps.len());
    let mut keys = Vec::new();
    let mut key_limits = limits;
    for (key, steps) in by_key {
        let mut result = check_key(model, operations, &steps, key_limits);
        result.key = key.map(|k| k.to_string());
        if result.verdict == Verdict::NotLinearizable {
            key_limits.memo_entries_max = key_limits.memo_entries_max.min(AFTER_ANOMALY_MEMO_ENTRIES_MAX);
        }
        keys.push(result);
    }
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    let verdict = if keys.iter().any(|k| k.verdict == Verdict::NotLinearizable) {
        Verdict::NotLinearizable
    } else if keys.iter().any(|k| k.verdict == Verdict::Unknown) {
        Verdict::Unknown
    } else {
        Verdict::Linearizable
    };
    Ok(Report { verdict, keys, elapsed_ms: started.elapsed().as_millis() as u64 })
}

/// The memo bound for the keys checked after one was found not linearizable.
const AFTER_ANOMALY_MEMO_ENTRIES_MAX: usize = 100_000;

const NONE: usize = usize::MAX;
const HEAD: usize = 0;

/// The call/return list of one key: node 0 is the head; a call and its return point at each
/// other through `partner`.
struct Timeline {
    next: Vec<usize>,
    prev: Vec<usize>,
    partner: Vec<usize>,
    /// The step (index into the key's steps) a node belongs to.
    step: Vec<usize>,
    is_call: Vec<bool>,
}

impl Timeline {
    fn new(operations: &[Operation], steps: &[(usize, Step)]) -> Timeline {
        // Real time is the order of events; returns of unknown outcome come after every
        // event, in the order of their calls.
        let end_of_time = operations.iter().map(|op| op.call.max(op.ret.unwrap_or(0))).max().unwrap_or(0) + 1;
        let mut events: Vec<(usize, usize, bool)> = Vec::with_capacity(steps.len() * 2);
        for (step, (op, _)) in steps.iter().enumerate() {
            let op = &operations[*op];
            events.push((op.call, step, true));
            events.push((op.ret.unwrap_or(end_of_time + op.call), step, false));
        }
        events.sort_unstable_by_key(|&(time, _, is_call)| (time, !is_call));
        let nodes = events.len() + 1;
        let mut timeline = Timeline {
            next: (1..=nodes).map(|n| if n == nodes { NONE } else { n }).collect(),
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
            partner: vec![NONE; nodes],
            step: vec![NONE; nodes],
            is_call: vec![false; nodes],
        };
        let mut call_node = vec![NONE; steps.len()];
        for (i, &(_, step, is_call)) in events.iter().enumerate() {
            let node = i + 1;
            timeline.step[node] = step;
            timeline.is_call[node] = is_call;
            if is_call {
                call_node[step] = node;
            } else {
                timeline.partner[node] = call_node[step];
                timeline.partner[call_node[step]] = node;
            }
        }
        timeline
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call: usize) {
        for node in [call, self.partner[call]] {
            let (prev, next) = (self.prev[node], self.next[node]);
            self.next[prev] = next;
            if next != NONE {
                self.prev[next] = prev;
            }
        }
    }

    /// Puts back what `lift` took out (in the reverse order).
    fn unlift(&mut self, call: usize) {
        for node in [self.partner[call], call] {
            let (prev, next) = (self.prev[node], self.next[node]);
            self.next[prev] = node;
            if next != NONE {
                self.prev[next] = node;
            }
        }
    }
}

/// The distinct states one key's search has met, and the transitions between them.
struct States {
    values: Vec<Edn>,
    ids: FxHashMap<Edn, u32>,
    transitions: FxHashMap<(u32, usize), Option<u32>>,
}

impl States {
    fn new(initial: Edn) -> States {
        let mut ids = FxHashMap::default();
        ids.insert(initial.clone(), 0);
        States { values: vec![initial], ids, transitions: FxHashMap::default() }
    }

    /// The state after step number `index` (which is `step`) from state `from`.
    fn apply(&mut self, model: Model, from: u32, index: usize, step: &Step) -> Option<u32> {
        if let Some(&known) = self.transitions.get(&(from, index)) {
            return known;
        }
        let to = model.apply(&self.values[from as usize], step).map(|value| match self.ids.get(&value) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(self.values.len()).expect("fewer states than memo entries");
                self.values.push(value.clone());
                self.ids.insert(value, id);
                id
            }
        });
        self.transitions.insert((from, index), to);
        to
    }
}

fn check_key(model: Model, operations: &[Operation], steps: &[(usize, Step)], limits: Limits) -> KeyResult {
    let mut result = KeyResult {
        key: None,
        operations: steps.len(),
        verdict: Verdict::Linearizable,
        stuck_operation: None,
        linearized_before: Vec::new(),
        unknown_reason: None,
        unexplained_value: false,
        crashed_writes_dropped: 0,
    };
    if let Some(unexplained) = prune::unexplained_observation(model, operations, steps).filter(|_| limits.prune) {
        result.verdict = Verdict::NotLinearizable;
        result.stuck_operation = Some(steps[unexplained].0);
        result.unexplained_value = true;
        return result;
    }
    let (steps, dropped) = match limits.prune {
        true => prune::without_unobserved_crashes(model, operations, steps.to_vec()),
        false => (steps.to_vec(), 0),
    };
    result.crashed_writes_dropped = dropped;
    let steps = &steps[..];
    let mut timeline = Timeline::new(operations, steps);
    let words = steps.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    // States are interned (strings of the kv model grow long) and transitions remembered, so
    // the memo hashes a bitset and a number.
    let mut states = States::new(model.initial());
    let mut memo: FxHashSet<(Vec<u64>, u32)> = FxHashSet::default();
    let mut calls: Vec<(usize, u32)> = Vec::new();
    let mut deepest = 0usize;
    let mut state = 0u32;
    let mut node = timeline.next[HEAD];
    let mut iterations = 0u64;
    while timeline.next[HEAD] != NONE {
        iterations += 1;
        if iterations.is_multiple_of(4096) && limits.deadline.is_some_and(|d| Instant::now() >= d) {
            result.verdict = Verdict::Unknown;
            result.unknown_reason = Some(format!("the search ran out of time after {iterations} steps"));
            return result;
        }
        debug_assert!(node != NONE, "every call's return is further down the list");
        let step = timeline.step[node];
        if timeline.is_call[node] {
            if let Some(next_state) = states.apply(model, state, step, &steps[step].1) {
                linearized[step / 64] |= 1 << (step % 64);
                if memo.insert((linearized.clone(), next_state)) {
                    if memo.len() > limits.memo_entries_max {
                        result.verdict = Verdict::Unknown;
                        result.unknown_reason = Some(format!("the search remembered more than {} configurations", limits.memo_entries_max));
                        return result;
                    }
                    calls.push((node, state));
                    state = next_state;
                    timeline.lift(node);
                    node = timeline.next[HEAD];
                    continue;
                }
                linearized[step / 64] &= !(1 << (step % 64));
            }
            node = timeline.next[node];
        } else {
            // A return whose call is not linearized yet: what came before must change.
            if calls.len() >= deepest {
                deepest = calls.len();
                result.stuck_operation = Some(steps[step].0);
                result.linearized_before = calls.iter().map(|(call, _)| steps[timeline.step[*call]].0).collect();
            }
            let Some((call, saved)) = calls.pop() else {
                result.verdict = Verdict::NotLinearizable;
                return result;
            };
            state = saved;
            let undone = timeline.step[call];
            linearized[undone / 64] &= !(1 << (undone % 64));
            timeline.unlift(call);
            node = timeline.next[call];
        }
    }
    result.stuck_operation = None;
    result.linearized_before.clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{operations, parse_history};

    fn verdict(model: Model, text: &str) -> Verdict {
        check(model, &operations(&parse_history(text).unwrap()).unwrap(), Limits::default()).unwrap().verdict
    }

    #[test]
    fn a_read_of_an_overwritten_value_after_the_write_finished_is_caught() {
        let stale = "{:process 0, :type :invoke, :f :write, :value 1}\n{:process 0, :type :ok, :f :write, :value 1}\n\
                     {:process 0, :type :invoke, :f :write, :value 2}\n{:process 0, :type :ok, :f :write, :value 2}\n\
                     {:process 1, :type :invoke, :f :read, :value nil}\n{:process 1, :type :ok, :f :read, :value 1}\n";
        assert_eq!(verdict(Model::CasRegister, stale), Verdict::NotLinearizable);
        // The same read overlapping the second write may see either value.
        let concurrent = "{:process 0, :type :invoke, :f :write, :value 1}\n{:process 0, :type :ok, :f :write, :value 1}\n\
                          {:process 0, :type :invoke, :f :write, :value 2}\n{:process 1, :type :invoke, :f :read, :value nil}\n\
                          {:process 1, :type :ok, :f :read, :value 1}\n{:process 0, :type :ok, :f :write, :value 2}\n";
        assert_eq!(verdict(Model::CasRegister, concurrent), Verdict::Linearizable);
    }

    #[test]
    fn an_operation_of_unknown_outcome_may_take_effect_late_or_never() {
        let late = "{:process 0, :type :invoke, :f :write, :value 1}\n{:process 0, :type :info, :f :write, :value 1}\n\
                    {:process 1, :type :invoke, :f :read, :value nil}\n{:process 1, :type :ok, :f :read, :value nil}\n\
                    {:process 1, :type :invoke, :f :read, :value nil}\n{:process 1, :type :ok, :f :read, :value 1}\n";
        assert_eq!(verdict(Model::CasRegister, late), Verdict::Linearizable);
        // But once seen it cannot be unseen.
        let flicker = format!("{late}{{:process 1, :type :invoke, :f :read, :value nil}}\n{{:process 1, :type :ok, :f :read, :value nil}}\n");
        assert_eq!(verdict(Model::CasRegister, &flicker), Verdict::NotLinearizable);
    }

    #[test]
    fn a_failed_compare_and_set_must_have_seen_another_value() {
        let history = "{:process 0, :type :invoke, :f :write, :value 1}\n{:process 0, :type :ok, :f :write, :value 1}\n\
                       {:process 1, :type :invoke, :f :cas, :value [1 2]}\n{:process 1, :type :fail, :f :cas, :value [1 2]}\n";
        assert_eq!(verdict(Model::CasRegister, history), Verdict::NotLinearizable);
        // A failure that only says "no effect" (Jepsen's reading) is consistent with anything.
        let no_effect = history.replace(":fail, :f :cas, :value [1 2]}", ":fail, :f :cas, :value [1 2], :error :unavailable}");
        assert_eq!(verdict(Model::CasRegister, &no_effect), Verdict::Linearizable);
    }

    #[test]
    fn keys_are_checked_apart_and_the_kv_model_appends() {
        let history = "{:process 0, :type :invoke, :f :append, :key \"a\", :value \"x\"}\n{:process 0, :type :ok, :f :append, :key \"a\", :value \"x\"}\n\
                       {:process 0, :type :invoke, :f :append, :key \"b\", :value \"y\"}\n{:process 0, :type :ok, :f :append, :key \"b\", :value \"y\"}\n\
                       {:process 1, :type :invoke, :f :get, :key \"a\", :value nil}\n{:process 1, :type :ok, :f :get, :key \"a\", :value \"x\"}\n";
        assert_eq!(verdict(Model::Kv, history), Verdict::Linearizable);
        assert_eq!(
            verdict(
                Model::Kv,
                &history.replace(
                    ":value \"x\"}\n{:process 0, :type :invoke, :f :append, :key \"b\"",
                    ":value \"x\"}\n{:process 0, :type :invoke, :f :append, :key \"a\""
                )
            ),
            Verdict::NotLinearizable
        );
    }

    #[test]
    fn a_search_out_of_time_says_unknown() {
        let mut text = String::new();
        for p in 0..12 {
            text += &format!("{{:process {p}, :type :invoke, :f :write, :value {p}}}\n");
        }
        for p in 0..12 {
            text += &format!("{{:process {p}, :type :ok, :f :write, :value {p}}}\n");
        }
        // A value seen, replaced, then seen again: every read has a write that could explain
        // it alone, so only the search (every order of the twelve writes) can refute it.
        for value in [3, 4, 3] {
            text += &format!("{{:process 99, :type :invoke, :f :read, :value nil}}\n{{:process 99, :type :ok, :f :read, :value {value}}}\n");
        }
        let ops = operations(&parse_history(&text).unwrap()).unwrap();
        let expired = Limits { deadline: Some(Instant::now()), ..Limits::default() };
        let report = check(Model::CasRegister, &ops, expired).unwrap();
        assert_eq!(report.verdict, Verdict::Unknown, "{report:?}");
        let tiny_memo = Limits { memo_entries_max: 10, ..Limits::default() };
        assert_eq!(check(Model::CasRegister, &ops, tiny_memo).unwrap().verdict, Verdict::Unknown);
        assert_eq!(check(Model::CasRegister, &ops, Limits::default()).unwrap().verdict, Verdict::NotLinearizable);
    }
}
