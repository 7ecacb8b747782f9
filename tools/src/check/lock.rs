//! Lock checks: unique write ownership. Clients hold a lock per key as lease sessions and
//! append `[session holding value]` entries to the key's log, as writes of the session
//! (`holding` counts the session's acquisitions: a session may release a lock and take it
//! again later); a client may stop renewing its lease (a pause) and write again later. The
//! final log of each key must show:
//! - **exclusive ownership**: the entries of each holding form one unbroken run. Once another
//!   holder wrote, the earlier one never writes again: a session that lost its lock (its
//!   lease ran out and another took the lock) has every later write refused;
//! - no acknowledged append lost, none refused with a definite error applied, none applied
//!   twice, and no entry that was never appended.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::history::{Edn, Operation, Outcome};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LockReport {
    /// Sessions that wrote, and how often a key's log passed from one session to another.
    pub sessions: usize,
    pub takeovers: usize,
    pub acquired: usize,
    pub appends_acknowledged: usize,
    pub appends_refused: usize,
    /// Appends attempted after the client stopped renewing its lease past the TTL, and how
    /// many of those were refused.
    pub appends_after_pause: usize,
    pub refused_after_pause: usize,
    /// "key K: session S wrote again after session T took over" and the like.
    pub anomalies: Vec<LockAnomaly>,
    /// Keys with acknowledged appends and no successful final read.
    pub keys_never_read: Vec<String>,
}

/// One anomaly: the key, the history line of the operation it concerns (1-based), and what.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LockAnomaly {
    pub key: String,
    pub line: usize,
    pub detail: String,
}

/// An append or a log entry: (session, holding, value).
type Entry = (i64, i64, i64);

/// `[session holding value]` of an append or of a log entry.
fn entry(value: &Edn) -> Option<Entry> {
    match value {
        Edn::Vector(items) => match items.as_slice() {
            [Edn::Int(session), Edn::Int(holding), Edn::Int(value)] => Some((*session, *holding, *value)),
            _ => None,
        },
        _ => None,
    }
}

pub fn check(ops: &[Operation]) -> LockReport {
    let mut report = LockReport::default();
    let mut sessions = BTreeSet::new();
    report.acquired = ops.iter().filter(|op| op.f == "acquire" && op.outcome == Outcome::Ok).count();
    for (key, ops) in super::by_key(ops) {
        let appends: Vec<&Operation> = ops.iter().copied().filter(|op| op.f == "append" || op.f == "append-after-pause").collect();
        let attempted: HashMap<Entry, &Operation> = appends.iter().filter_map(|op| Some((entry(&op.input)?, *op))).collect();
        for op in &appends {
            match op.outcome {
                Outcome::Ok => report.appends_acknowledged += 1,
                Outcome::Fail(_) => report.appends_refused += 1,
                Outcome::Unknown => {}
            }
            if op.f == "append-after-pause" {
                report.appends_after_pause += 1;
                if matches!(op.outcome, Outcome::Fail(_)) {
                    report.refused_after_pause += 1;
                }
            }
        }
        let Some(last) = ops.iter().filter(|op| op.f == "read" && op.outcome == Outcome::Ok).max_by_key(|op| op.ret) else {
            if appends.iter().any(|op| op.outcome == Outcome::Ok) {
                report.keys_never_read.push(key);
            }
            continue;
        };
        let log: Vec<Entry> = match &last.output {
            Edn::Vector(items) => match items.iter().map(entry).collect::<Option<Vec<_>>>() {
                Some(log) => log,
                None => {
                    anomaly(&mut report, last, format!("key {key}: unreadable log {}", last.output));
                    continue;
                }
            },
            Edn::Nil => Vec::new(),
            other => {
                anomaly(&mut report, last, format!("key {key}: unreadable log {other}"));
                continue;
            }
        };
        // The operation an entry came from (the final read for an entry from nowhere).
        let source = |item: &Entry| attempted.get(item).copied().unwrap_or(last);
        // Exclusive ownership: one unbroken run per holding.
        let mut finished: BTreeMap<(i64, i64), i64> = BTreeMap::new();
        let mut current: Option<(i64, i64)> = None;
        for item @ &(session, holding, _) in &log {
            sessions.insert(session);
            if current == Some((session, holding)) {
                continue;
            }
            if let Some(previous) = current {
                report.takeovers += 1;
                finished.insert(previous, session);
            }
            if let Some(successor) = finished.get(&(session, holding)) {
                let what = format!("key {key}: session {session} (holding {holding}) wrote again after session {successor} took over");
                anomaly(&mut report, source(item), what);
            }
            current = Some((session, holding));
        }
        // Each entry once, from an append that may have happened.
        let mut seen = BTreeSet::new();
        for item in &log {
            if !seen.insert(*item) {
                anomaly(&mut report, source(item), format!("key {key}: entry {item:?} applied twice"));
            }
            match attempted.get(item) {
                None => anomaly(&mut report, last, format!("key {key}: entry {item:?} was never appended")),
                Some(op) if matches!(op.outcome, Outcome::Fail(_)) => {
                    anomaly(&mut report, op, format!("key {key}: entry {item:?} was refused ({:?}) yet applied", op.outcome))
                }
                Some(_) => {}
            }
        }
        for (item, op) in &attempted {
            if op.outcome == Outcome::Ok && !seen.contains(item) {
                anomaly(&mut report, op, format!("key {key}: acknowledged append {item:?} lost"));
            }
        }
    }
    report.sessions = sessions.len();
    report.anomalies.sort_by(|a, b| (&a.key, a.line, &a.detail).cmp(&(&b.key, b.line, &b.detail)));
    report
}

fn anomaly(report: &mut LockReport, op: &Operation, detail: String) {
    let key = op.key.as_ref().map_or_else(String::new, Edn::to_string);
    report.anomalies.push(LockAnomaly { key, line: op.call + 1, detail });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Event, EventType};

    /// Builds operations from (process, f, input, outcome or None for unknown, output).
    fn ops(spec: &[(i64, &str, Edn, Option<EventType>, Edn)]) -> Vec<Operation> {
        let mut events = Vec::new();
        for (process, f, input, kind, output) in spec {
            let mut invoke = Event::new(*process, EventType::Invoke, f, input.clone());
            invoke.key = Some(Edn::Int(0));
            events.push(invoke);
            if let Some(kind) = kind {
                let mut done = Event::new(*process, *kind, f, output.clone());
                done.key = Some(Edn::Int(0));
                events.push(done);
            }
        }
        crate::history::operations(&events).unwrap()
    }

    fn pair(session: i64, value: i64) -> Edn {
        Edn::Vector(vec![Edn::Int(session), Edn::Int(1), Edn::Int(value)])
    }

    #[test]
    fn a_session_writing_after_its_successor_is_caught() {
        let log = Edn::Vector(vec![pair(1, 1), pair(2, 2), pair(1, 3)]);
        let history = ops(&[
            (0, "append", pair(1, 1), Some(EventType::Ok), pair(1, 1)),
            (1, "append", pair(2, 2), Some(EventType::Ok), pair(2, 2)),
            (0, "append-after-pause", pair(1, 3), None, Edn::Nil),
            (9, "read", Edn::Nil, Some(EventType::Ok), log),
        ]);
        let report = check(&history);
        let details: Vec<&str> = report.anomalies.iter().map(|a| a.detail.as_str()).collect();
        assert_eq!(details, vec!["key 0: session 1 (holding 1) wrote again after session 2 took over"], "{report:?}");
        assert_eq!((report.anomalies[0].key.as_str(), report.anomalies[0].line), ("0", 5), "the paused append's invocation");
        assert_eq!(report.takeovers, 2);
    }

    #[test]
    fn lost_refused_twice_and_phantom_entries_are_caught_and_clean_runs_pass() {
        let history = ops(&[
            (0, "append", pair(1, 1), Some(EventType::Ok), pair(1, 1)),
            (0, "append", pair(1, 2), Some(EventType::Ok), pair(1, 2)),
            (1, "append", pair(2, 3), Some(EventType::Fail), pair(2, 3)),
            (9, "read", Edn::Nil, Some(EventType::Ok), Edn::Vector(vec![pair(1, 1), pair(1, 1), pair(2, 3), pair(3, 9)])),
        ]);
        let text = check(&history).anomalies.iter().map(|a| a.detail.clone()).collect::<Vec<_>>().join("\n");
        for expected in ["(1, 1, 1) applied twice", "(2, 1, 3) was refused", "(3, 1, 9) was never appended", "append (1, 1, 2) lost"] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
        let clean = ops(&[
            (0, "append", pair(1, 1), Some(EventType::Ok), pair(1, 1)),
            (1, "append", pair(2, 2), None, Edn::Nil),
            (11, "append", pair(2, 3), Some(EventType::Ok), pair(2, 3)),
            (9, "read", Edn::Nil, Some(EventType::Ok), Edn::Vector(vec![pair(1, 1), pair(2, 3)])),
        ]);
        let report = check(&clean);
        assert!(report.anomalies.is_empty(), "{report:?}");
        assert_eq!((report.sessions, report.takeovers), (2, 1));
        // A session that released the lock may take it again: a new holding, a new run.
        let again = |holding: i64, value: i64| Edn::Vector(vec![Edn::Int(1), Edn::Int(holding), Edn::Int(value)]);
        let retaken = ops(&[
            (0, "append", again(1, 1), Some(EventType::Ok), Edn::Nil),
            (1, "append", pair(2, 2), Some(EventType::Ok), Edn::Nil),
            (0, "append", again(2, 3), Some(EventType::Ok), Edn::Nil),
            (9, "read", Edn::Nil, Some(EventType::Ok), Edn::Vector(vec![again(1, 1), pair(2, 2), again(2, 3)])),
        ]);
        assert!(check(&retaken).anomalies.is_empty());
    }
}
