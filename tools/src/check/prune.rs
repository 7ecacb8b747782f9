//! What the linearizability search can be spared, decided before it starts (as Knossos and
//! Porcupine prune): a read that no write can explain fails the key at once, and a crashed
//! write nothing ever observed is dropped. Both rules are sound on their own terms, argued at
//! each function; neither can turn a verdict around.
//!
//! Positions are event numbers: an operation's call, and its return or, for an operation of
//! unknown outcome, the end of time.

use rustc_hash::FxHashMap;

use super::models::{Model, Step};
use crate::history::{Edn, Operation};

/// An operation's span in event numbers; `ret` is `u64::MAX` for an unknown outcome.
#[derive(Clone, Copy)]
struct Span {
    call: u64,
    ret: u64,
}

fn span(op: &Operation) -> Span {
    Span { call: op.call as u64, ret: op.ret.map_or(u64::MAX, |r| r as u64) }
}

/// What an operation may leave in the register, if it sets it at all.
enum Sets<'a> {
    /// The value is exactly this (a write, a compare-and-set that may have succeeded).
    To(&'a Edn),
    /// The value ends with this (an append of the kv model).
    EndingWith(&'a str),
}

fn sets(step: &Step) -> Option<Sets<'_>> {
    match step {
        Step::Write(value) => Some(Sets::To(value)),
        Step::Cas { to, succeeded: Some(true) | None, .. } => Some(Sets::To(to)),
        Step::Append(Edn::Str(suffix)) => Some(Sets::EndingWith(suffix)),
        _ => None,
    }
}

/// What an operation found in the register: a read's value, a successful compare-and-set's
/// `from`.
fn observes(step: &Step) -> Option<&Edn> {
    match step {
        Step::Read(value) => Some(value),
        Step::Cas { from, succeeded: Some(true), .. } => Some(from),
        _ => None,
    }
}

/// The first operation (index into `steps`, in event order) that found a value no write can
/// have left there when it looked, if there is one: the key is then not linearizable.
///
/// Why it is sound: whatever an operation R finds was left by the last operation W that set
/// the register before R's linearization point (or is the initial value, if none did). W was
/// called before R returned. Every operation X that surely set the register (completed, and
/// not a compare-and-set that failed or may have) and returned before R was called is
/// linearized before R, so W is X or comes after X: W returned after X was called. So R needs
/// a W that could leave its value, called before R returned, returning after the latest call
/// of such an X; and the initial value needs no X at all. No such W: no order explains R.
pub fn unexplained_observation(model: Model, operations: &[Operation], steps: &[(usize, Step)]) -> Option<usize> {
    // Operations that surely set the register, by return: (ret, call).
    let mut sure: Vec<(u64, u64)> = steps
        .iter()
        .filter(|(op, step)| sets(step).is_some() && operations[*op].ret.is_some() && !matches!(step, Step::Cas { succeeded: None, .. }))
        .map(|(op, _)| (span(&operations[*op]).ret, span(&operations[*op]).call))
        .collect();
    sure.sort_unstable();
    // latest_call[i]: the latest call among the first i of them.
    let mut latest_call = Vec::with_capacity(sure.len() + 1);
    latest_call.push(None);
    for &(_, call) in &sure {
        let before = latest_call.last().copied().flatten();
        latest_call.push(Some(before.map_or(call, |b: u64| b.max(call))));
    }
    // Setters whose value is known exactly, by value; the others (appends) in a list.
    let mut to_value: FxHashMap<&Edn, Vec<(usize, Span)>> = FxHashMap::default();
    let mut ending: Vec<(usize, &str, Span)> = Vec::new();
    for (i, (op, step)) in steps.iter().enumerate() {
        match sets(step) {
            Some(Sets::To(value)) => to_value.entry(value).or_default().push((i, span(&operations[*op]))),
            Some(Sets::EndingWith(suffix)) => ending.push((i, suffix, span(&operations[*op]))),
            None => {}
        }
    }
    let initial = model.initial();
    let mut observers: Vec<(usize, &Edn, Span)> =
        steps.iter().enumerate().filter_map(|(i, (op, step))| observes(step).map(|v| (i, v, span(&operations[*op])))).collect();
    observers.sort_unstable_by_key(|(_, _, s)| s.ret);
    for (i, value, r) in observers {
        // The latest call of a sure setter that returned before R was called.
        let returned_before = sure.partition_point(|&(ret, _)| ret < r.call);
        let floor = latest_call[returned_before];
        let viable = |w: &Span| w.call < r.ret && floor.is_none_or(|f| w.ret > f);
        let explained = (floor.is_none() && *value == initial)
            || to_value.get(value).is_some_and(|ws| ws.iter().any(|(w, s)| *w != i && viable(s)))
            || matches!(value, Edn::Str(text) if ending.iter().any(|(w, suffix, s)| *w != i && text.ends_with(suffix) && viable(s)));
        if !explained {
            return Some(i);
        }
    }
    None
}

/// `steps` without the crashed writes no operation can have observed (compare-and-set
/// register only): a write of unknown outcome, or a compare-and-set of unknown outcome,
/// whose value no read returned and no compare-and-set compared against, in a key where no
/// compare-and-set that failed can be linearized after it.
///
/// Why it is sound: an operation of unknown outcome may take effect never, so an order of the
/// rest is an order of the whole. Conversely, take an order of the whole and remove W: only
/// the stretch from W to the next write changes, from W's value to the one before it. No read
/// lies in that stretch (it would have returned W's value), nor a successful compare-and-set
/// (it compared against it), nor a failed one (none can come after W). A compare-and-set of
/// unknown outcome there did nothing (its `from` is not W's value), and moves to the end of
/// the order, where what it does is seen by no one.
pub fn without_unobserved_crashes(model: Model, operations: &[Operation], steps: Vec<(usize, Step)>) -> (Vec<(usize, Step)>, usize) {
    if model != Model::CasRegister {
        return (steps, 0);
    }
    let mut observed: rustc_hash::FxHashSet<&Edn> = rustc_hash::FxHashSet::default();
    let mut last_failed_cas_ret = None;
    for (op, step) in &steps {
        match step {
            Step::Read(value) => drop(observed.insert(value)),
            Step::Cas { from, succeeded, .. } => {
                observed.insert(from);
                if *succeeded == Some(false) {
                    let ret = span(&operations[*op]).ret;
                    last_failed_cas_ret = Some(last_failed_cas_ret.map_or(ret, |r: u64| r.max(ret)));
                }
            }
            _ => {}
        }
    }
    let droppable = |op: usize, step: &Step| {
        let crashed = operations[op].ret.is_none();
        let value = match step {
            Step::Write(value) => value,
            Step::Cas { to, succeeded: None, .. } => to,
            _ => return false,
        };
        crashed && !observed.contains(value) && last_failed_cas_ret.is_none_or(|r| r < span(&operations[op]).call)
    };
    let keep: Vec<bool> = steps.iter().map(|(op, step)| !droppable(*op, step)).collect();
    let dropped = keep.iter().filter(|k| !**k).count();
    let kept = steps.into_iter().zip(keep).filter_map(|(step, keep)| keep.then_some(step)).collect();
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::linearizable::{check, KeyResult, Limits, Verdict};
    use super::super::models::Model;
    use crate::history::{operations, parse_history};

    /// A seeded xorshift: each call a number below its argument.
    fn below_from(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |below| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        }
    }

    fn key_result(text: &str, prune: bool) -> KeyResult {
        model_key_result(Model::CasRegister, text, prune)
    }

    fn model_key_result(model: Model, text: &str, prune: bool) -> KeyResult {
        let limits = Limits { prune, ..Limits::default() };
        let report = check(model, &operations(&parse_history(text).unwrap()).unwrap(), limits).unwrap();
        report.keys.into_iter().next().unwrap()
    }

    fn op(process: usize, f: &str, value: &str, outcome: &str, out: &str) -> (String, String) {
        let out = if out.is_empty() { value } else { out };
        (
            format!("{{:process {process}, :type :invoke, :f :{f}, :value {value}}}\n"),
            format!("{{:process {process}, :type :{outcome}, :f :{f}, :value {out}}}\n"),
        )
    }

    /// Twenty crashed writes of distinct values make the bare search remember millions of
    /// configurations; a read of a value none of them wrote is decided before it starts.
    #[test]
    fn a_read_no_write_explains_is_decided_at_once() {
        let mut text = String::new();
        let mut closes = String::new();
        for p in 0..20 {
            let (invoke, _) = op(p, "write", &p.to_string(), "info", "");
            text += &invoke;
            closes += &format!("{{:process {p}, :type :info, :f :write, :value {p}}}\n");
        }
        text += &closes;
        let (invoke, done) = op(99, "read", "nil", "ok", "77");
        let started = Instant::now();
        let result = key_result(&format!("{text}{invoke}{done}"), true);
        assert_eq!(result.verdict, Verdict::NotLinearizable);
        assert!(result.unexplained_value);
        assert_eq!(result.stuck_operation, Some(20), "the read is named");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// Two writes one after the other, then a read of the first: stale whatever the crashed
    /// writes around them did, decided without a search.
    #[test]
    fn a_stale_read_after_two_sequential_writes_is_decided_at_once() {
        let mut text = String::new();
        for p in 0..20 {
            text += &op(p, "write", &(p + 100).to_string(), "info", "").0;
        }
        for (value, f, out) in [("1", "write", ""), ("2", "write", ""), ("nil", "read", "1")] {
            let (invoke, done) = op(99, f, value, "ok", out);
            text += &invoke;
            text += &done;
        }
        let result = key_result(&text, true);
        assert_eq!(result.verdict, Verdict::NotLinearizable);
        assert!(result.unexplained_value);
        // A crashed write of the stale value may explain the read: then it is not stale.
        let explained = format!("{}{text}", op(50, "write", "1", "info", "").0);
        assert_eq!(key_result(&explained, true).verdict, Verdict::Linearizable);
    }

    /// A crashed write nothing read is still needed when a compare-and-set failed after it:
    /// it is the only way the register stopped holding 1. It must not be dropped.
    #[test]
    fn a_crashed_write_that_explains_a_failed_compare_and_set_is_kept() {
        let mut text = String::new();
        let (invoke, done) = op(0, "write", "1", "ok", "");
        text += &(invoke + &done);
        text += &op(1, "write", "2", "info", "").0;
        let (invoke, done) = op(2, "cas", "[1 3]", "fail", "");
        text += &(invoke + &done);
        let result = key_result(&text, true);
        assert_eq!(result.verdict, Verdict::Linearizable);
        assert_eq!(result.crashed_writes_dropped, 0);
        // Without the failed compare-and-set it is dropped.
        let unobserved =
            key_result(&format!("{}{}", op(0, "write", "1", "ok", "").0 + &op(0, "write", "1", "ok", "").1, op(1, "write", "2", "info", "").0), true);
        assert_eq!(unobserved.crashed_writes_dropped, 1);
    }

    /// Random small histories (writes, reads and compare-and-sets over three values, some
    /// crashed, some failed) get the same verdict with the rules as from the bare search.
    #[test]
    fn the_rules_never_change_a_verdict() {
        let mut next = below_from(0x2545f4914f6cdd1d);
        let (mut linearizable, mut refuted, mut dropped) = (0, 0, 0);
        for _ in 0..3000 {
            // Up to 4 processes, each with one operation open at a time.
            let mut open: Vec<Option<(String, String)>> = vec![None; 4];
            let mut crashed = [false; 4];
            let mut text = String::new();
            let value = |n: u64| if n == 0 { "nil".to_string() } else { n.to_string() };
            for _ in 0..14 {
                let p = next(4) as usize;
                if crashed[p] {
                    continue;
                }
                match open[p].take() {
                    Some((_, done)) => text += &done,
                    None => {
                        let v = value(1 + next(3));
                        let (invoke, done) = match next(3) {
                            0 => op(p, "read", "nil", "ok", &value(next(4))),
                            1 => op(p, "write", &v, if next(3) == 0 { "info" } else { "ok" }, ""),
                            _ => op(p, "cas", &format!("[{} {v}]", value(next(4))), ["ok", "fail", "info"][next(3) as usize], ""),
                        };
                        text += &invoke;
                        if done.contains(":info") {
                            crashed[p] = true;
                        } else {
                            open[p] = Some((invoke, done));
                        }
                    }
                }
            }
            for (_, done) in open.into_iter().flatten() {
                text += &done;
            }
            if text.is_empty() {
                continue;
            }
            let pruned = key_result(&text, true);
            let bare = key_result(&text, false);
            assert_eq!(pruned.verdict, bare.verdict, "the rules changed the verdict of:\n{text}");
            linearizable += (bare.verdict == Verdict::Linearizable) as usize;
            refuted += pruned.unexplained_value as usize;
            dropped += pruned.crashed_writes_dropped;
        }
        // The histories exercise both verdicts and both rules.
        assert!(linearizable > 300 && refuted > 300 && dropped > 100, "linearizable {linearizable}, refuted {refuted}, dropped {dropped}");
    }

    /// The same for the kv model: gets, puts and appends of short strings (appends make a
    /// value explainable by a write of its suffix), some crashed.
    #[test]
    fn the_rules_never_change_a_kv_verdict() {
        let mut next = below_from(0x9e3779b97f4a7c15);
        let strings = ["", "a", "b", "ab", "ba", "aa", "bab"];
        let (mut linearizable, mut refuted) = (0, 0);
        for _ in 0..3000 {
            let mut open: Vec<Option<String>> = vec![None; 4];
            let mut crashed = [false; 4];
            let mut text = String::new();
            for _ in 0..14 {
                let p = next(4) as usize;
                if crashed[p] {
                    continue;
                }
                match open[p].take() {
                    Some(done) => text += &done,
                    None => {
                        let (f, value, out) = match next(3) {
                            0 => ("get", "nil".to_string(), format!("{:?}", strings[next(strings.len() as u64) as usize])),
                            1 => ("put", format!("{:?}", strings[1 + next(2) as usize]), String::new()),
                            _ => ("append", format!("{:?}", strings[1 + next(2) as usize]), String::new()),
                        };
                        let out = if out.is_empty() { value.clone() } else { out };
                        let outcome = if f != "get" && next(4) == 0 { "info" } else { "ok" };
                        text += &format!("{{:process {p}, :type :invoke, :f :{f}, :key \"k\", :value {value}}}\n");
                        let done = format!("{{:process {p}, :type :{outcome}, :f :{f}, :key \"k\", :value {out}}}\n");
                        if outcome == "info" {
                            crashed[p] = true;
                        } else {
                            open[p] = Some(done);
                        }
                    }
                }
            }
            for done in open.into_iter().flatten() {
                text += &done;
            }
            if text.is_empty() {
                continue;
            }
            let pruned = model_key_result(Model::Kv, &text, true);
            let bare = model_key_result(Model::Kv, &text, false);
            assert_eq!(pruned.verdict, bare.verdict, "the rules changed the verdict of:\n{text}");
            linearizable += (bare.verdict == Verdict::Linearizable) as usize;
            refuted += pruned.unexplained_value as usize;
        }
        assert!(linearizable > 300 && refuted > 300, "linearizable {linearizable}, refuted {refuted}");
    }
}
