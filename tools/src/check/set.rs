//! Set checks: every acknowledged add is in the final read (else lost), no read holds an
//! element never added (unexpected), and a read begun after an add was acknowledged holds it
//! (else stale; for session reads only the adding client's own reads are held to this, and
//! allow-unavailable reads are not: such misses are counted, not anomalies).

use std::collections::{BTreeSet, HashMap};

use super::Reads;
use crate::history::{Edn, Operation, Outcome};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SetReport {
    pub acknowledged: usize,
    pub attempted: usize,
    pub lost: Vec<i64>,
    pub unexpected: Vec<i64>,
    /// (element, line of the read that missed it)
    pub stale: Vec<(i64, usize)>,
    /// Allow-unavailable reads that missed their own session's acknowledged add (allowed).
    pub stale_reads: usize,
    /// Keys with no successful read at all (their adds could not be verified).
    pub keys_never_read: Vec<String>,
}

impl SetReport {
    pub fn anomalies(&self) -> usize {
        self.lost.len() + self.unexpected.len() + self.stale.len()
    }
}

/// `session_of` maps a process to its client session (with session reads, a read is only held
/// to see the adds of its own session; with committed reads, to none but the last read's).
pub fn check(ops: &[Operation], reads: Reads, session_of: impl Fn(i64) -> i64) -> SetReport {
    let mut report = SetReport::default();
    for (key, ops) in super::by_key(ops) {
        let element = |op: &Operation| match op.input {
            Edn::Int(n) => Some(n),
            _ => None,
        };
        let attempted: HashMap<i64, &Operation> =
            ops.iter().filter(|op| op.f == "add" && !matches!(op.outcome, Outcome::Fail(_))).filter_map(|op| Some((element(op)?, *op))).collect();
        let acknowledged: Vec<(i64, &Operation)> = attempted.iter().filter(|(_, op)| op.outcome == Outcome::Ok).map(|(e, op)| (*e, *op)).collect();
        report.attempted += attempted.len();
        report.acknowledged += acknowledged.len();
        let read_sets: Vec<(&Operation, BTreeSet<i64>)> = ops
            .iter()
            .filter(|op| op.f == "read" && op.outcome == Outcome::Ok)
            .map(|op| {
                let items = match &op.output {
                    Edn::Vector(items) => items.iter().filter_map(|e| if let Edn::Int(n) = e { Some(*n) } else { None }).collect(),
                    _ => BTreeSet::new(),
                };
                (*op, items)
            })
            .collect();
        let Some((_, last)) = read_sets.iter().max_by_key(|(op, _)| op.ret) else {
            if !acknowledged.is_empty() {
                report.keys_never_read.push(key);
            }
            continue;
        };
        for (e, _) in &acknowledged {
            if !last.contains(e) {
                report.lost.push(*e);
            }
        }
        for (read, items) in &read_sets {
            report.unexpected.extend(items.iter().filter(|e| !attempted.contains_key(e)));
            let mut missed_own = false;
            for (e, add) in &acknowledged {
                let acked_before = add.ret.is_some_and(|r| r < read.call);
                let own = session_of(add.process) == session_of(read.process);
                if !acked_before || items.contains(e) || !last.contains(e) {
                    continue;
                }
                match reads {
                    Reads::Linearizable => report.stale.push((*e, read.ret.unwrap_or(read.call) + 1)),
                    Reads::Session if own => report.stale.push((*e, read.ret.unwrap_or(read.call) + 1)),
                    Reads::Committed if own => missed_own = true,
                    Reads::Session | Reads::Committed => {}
                }
            }
            report.stale_reads += usize::from(missed_own);
        }
    }
    report.lost.sort_unstable();
    report.unexpected.sort_unstable();
    report.unexpected.dedup();
    report
}

#[cfg(test)]
mod tests {
    use super::Reads;
    use crate::history::{operations, parse_history};

    #[test]
    fn lost_stale_and_unexpected_elements_are_told_apart() {
        let text = "{:process 0, :type :invoke, :f :add, :value 1}\n{:process 0, :type :ok, :f :add, :value 1}\n\
                    {:process 0, :type :invoke, :f :add, :value 2}\n{:process 0, :type :ok, :f :add, :value 2}\n\
                    {:process 1, :type :invoke, :f :read, :value nil}\n{:process 1, :type :ok, :f :read, :value [2]}\n\
                    {:process 1, :type :invoke, :f :read, :value nil}\n{:process 1, :type :ok, :f :read, :value [1 9]}\n";
        let ops = operations(&parse_history(text).unwrap()).unwrap();
        let report = super::check(&ops, Reads::Linearizable, |p| p);
        assert_eq!(report.lost, vec![2]);
        assert_eq!(report.unexpected, vec![9]);
        assert_eq!(report.stale, vec![(1, 6)]);
        let session = super::check(&ops, Reads::Session, |p| p);
        assert!(session.stale.is_empty(), "another session's add need not be visible yet");
        let own = super::check(&ops, Reads::Session, |_| 0);
        assert_eq!(own.stale, vec![(1, 6)], "a session read sees its own session's adds");
        let committed = super::check(&ops, Reads::Committed, |_| 0);
        assert_eq!((committed.stale.len(), committed.stale_reads), (0, 1), "an allow-unavailable read may miss it");
        assert_eq!((committed.lost, committed.unexpected), (vec![2], vec![9]));
    }
}
