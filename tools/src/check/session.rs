//! Session guarantees of a register history whose completions carry the record's generation
//! (`:gen`): per client session, monotonic reads and read-your-writes (not for
//! allow-unavailable reads, which may be stale: those are counted); across all clients, one
//! value per generation and no value that nobody wrote or only a failed operation wrote (no
//! dirty or invented reads); and the final reads show every acknowledged write's generation
//! (nothing lost).

use std::collections::{HashMap, HashSet};

use super::Reads;
use crate::history::{Edn, Operation, Outcome};

#[derive(Clone, Debug, serde::Serialize)]
pub struct SessionAnomaly {
    pub kind: &'static str,
    pub key: String,
    /// Line of the completion that shows it.
    pub line: usize,
    pub detail: String,
}

#[derive(Clone, Debug, Default)]
pub struct SessionReport {
    pub anomalies: Vec<SessionAnomaly>,
    /// Reads older than what their session had seen, allowed because the reads were
    /// allow-unavailable (`Reads::Committed`): the evidence that stale answers were served.
    pub stale_reads: usize,
}

/// The value an operation wrote (or, for a compare-and-set, would write).
fn value_written(op: &Operation) -> Option<&Edn> {
    match (op.f.as_str(), &op.input) {
        ("write", v) => Some(v),
        ("cas", Edn::Vector(pair)) if pair.len() == 2 => Some(&pair[1]),
        _ => None,
    }
}

/// `session_of` maps a process to its client session; `is_final` marks the final reads.
pub fn check(ops: &[Operation], reads: Reads, session_of: impl Fn(i64) -> i64, is_final: impl Fn(i64) -> bool) -> SessionReport {
    let mut report = SessionReport::default();
    for (key, mut ops) in super::by_key(ops) {
        ops.sort_by_key(|op| op.ret.unwrap_or(usize::MAX));
        // Values a write may have put in place; a definite failure (a compare-and-set that
        // found another value) put nothing.
        let written: HashSet<&Edn> = ops.iter().filter(|op| !matches!(op.outcome, Outcome::Fail(_))).filter_map(|op| value_written(op)).collect();
        let failed: HashSet<&Edn> = ops.iter().filter(|op| matches!(op.outcome, Outcome::Fail(_))).filter_map(|op| value_written(op)).collect();
        let mut value_at: HashMap<i64, (&Edn, usize)> = HashMap::new();
        let mut session_floor: HashMap<i64, i64> = HashMap::new();
        let mut acknowledged_max = 0i64;
        let mut final_max: Option<i64> = None;
        for op in ops.iter().filter(|op| op.outcome == Outcome::Ok) {
            let Some(generation) = op.completion_int("gen") else { continue };
            let line = op.ret.expect("ok operations completed") + 1;
            let value = match op.f.as_str() {
                "read" => &op.output,
                _ => match value_written(op) {
                    Some(value) => value,
                    None => continue,
                },
            };
            let mut report_anomaly = |kind, detail: String| report.anomalies.push(SessionAnomaly { kind, key: key.clone(), line, detail });
            if op.f == "read" && generation > 0 && !written.contains(value) {
                if failed.contains(value) {
                    report_anomaly("read-of-failed-write", format!("read {value} at generation {generation}; only an operation that failed wrote it"));
                } else {
                    report_anomaly("read-of-unwritten-value", format!("read {value} at generation {generation}; no operation wrote it"));
                }
            }
            match value_at.get(&generation) {
                Some((other, other_line)) if *other != value && generation > 0 => {
                    report_anomaly("two-values-at-one-generation", format!("{value} at generation {generation}, but line {other_line} saw {other}"))
                }
                Some(_) => {}
                None => {
                    value_at.insert(generation, (value, line));
                }
            }
            let session = session_of(op.process);
            let floor = session_floor.entry(session).or_default();
            if op.f == "read" && generation < *floor {
                if reads == Reads::Committed && !is_final(op.process) {
                    report.stale_reads += 1;
                } else {
                    report_anomaly("went-back-in-time", format!("session {session} read generation {generation} after having seen {floor}"));
                }
            }
            *floor = (*floor).max(generation);
            if op.f != "read" {
                acknowledged_max = acknowledged_max.max(generation);
            }
            if op.f == "read" && is_final(op.process) {
                final_max = Some(final_max.unwrap_or(0).max(generation));
            }
        }
        if let Some(final_generation) = final_max {
            if final_generation < acknowledged_max {
                let line = ops.last().and_then(|op| op.ret).unwrap_or(0) + 1;
                report.anomalies.push(SessionAnomaly {
                    kind: "lost-write",
                    key: key.clone(),
                    line,
                    detail: format!("the final read shows generation {final_generation}; a write at generation {acknowledged_max} was acknowledged"),
                });
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::Reads;
    use crate::history::{operations, parse_history};

    const WRITES_THEN_OLD_READ: &str =
        "{:process 0, :type :invoke, :f :write, :key 1, :value 5}\n{:process 0, :type :ok, :f :write, :key 1, :value 5, :gen 1}\n\
                    {:process 0, :type :invoke, :f :write, :key 1, :value 6}\n{:process 0, :type :ok, :f :write, :key 1, :value 6, :gen 2}\n\
                    {:process 0, :type :invoke, :f :read, :key 1, :value nil}\n{:process 0, :type :ok, :f :read, :key 1, :value 5, :gen 1}\n";

    fn kinds(text: &str, reads: Reads, session_of: impl Fn(i64) -> i64, is_final: impl Fn(i64) -> bool) -> Vec<&'static str> {
        let ops = operations(&parse_history(text).unwrap()).unwrap();
        super::check(&ops, reads, session_of, is_final).anomalies.iter().map(|a| a.kind).collect()
    }

    #[test]
    fn a_session_that_reads_an_older_generation_went_back_in_time() {
        let ops = operations(&parse_history(WRITES_THEN_OLD_READ).unwrap()).unwrap();
        let found = super::check(&ops, Reads::Session, |p| p, |_| false).anomalies;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].kind, found[0].line), ("went-back-in-time", 6));
        // Another session may still read the older generation...
        assert_eq!(kinds(WRITES_THEN_OLD_READ, Reads::Session, |p| if p == 0 { 0 } else { 1 }, |_| false).len(), 1);
        let other = WRITES_THEN_OLD_READ
            .replace("{:process 0, :type :invoke, :f :read", "{:process 1, :type :invoke, :f :read")
            .replace("{:process 0, :type :ok, :f :read", "{:process 1, :type :ok, :f :read");
        assert!(kinds(&other, Reads::Session, |p| p, |_| false).is_empty());
        // ...but not as the final read: the acknowledged generation 2 would be lost.
        assert_eq!(kinds(&other, Reads::Session, |p| p, |p| p == 1), vec!["lost-write"]);
        let forged = WRITES_THEN_OLD_READ.replace(":f :read, :key 1, :value 5, :gen 1}", ":f :read, :key 1, :value 6, :gen 1}");
        assert!(kinds(&forged, Reads::Session, |p| p + 10, |_| false).contains(&"two-values-at-one-generation"));
    }

    #[test]
    fn committed_reads_may_be_stale_but_never_dirty() {
        // An allow-unavailable read may go back for its own session: counted, not an anomaly.
        let ops = operations(&parse_history(WRITES_THEN_OLD_READ).unwrap()).unwrap();
        let report = super::check(&ops, Reads::Committed, |p| p, |_| false);
        assert!(report.anomalies.is_empty(), "{:?}", report.anomalies);
        assert_eq!(report.stale_reads, 1);
        // The final reads are linearizable whatever the workload's reads were.
        assert_eq!(kinds(WRITES_THEN_OLD_READ, Reads::Committed, |p| p, |p| p == 0), vec!["went-back-in-time", "lost-write"]);
        // A value only a failed compare-and-set would have written was never committed.
        let dirty = format!(
            "{WRITES_THEN_OLD_READ}{{:process 1, :type :invoke, :f :cas, :key 1, :value [6 7]}}\n{{:process 1, :type :fail, :f :cas, :key 1, :value [6 7], :error :cas-mismatch}}\n\
             {{:process 2, :type :invoke, :f :read, :key 1, :value nil}}\n{{:process 2, :type :ok, :f :read, :key 1, :value 7, :gen 3}}\n"
        );
        assert_eq!(kinds(&dirty, Reads::Committed, |p| p, |_| false), vec!["read-of-failed-write"]);
        // The same compare-and-set with an unknown outcome may have taken effect.
        let unknown = dirty.replace(
            "{:process 1, :type :fail, :f :cas, :key 1, :value [6 7], :error :cas-mismatch}",
            "{:process 1, :type :info, :f :cas, :key 1, :value [6 7]}",
        );
        assert!(kinds(&unknown, Reads::Committed, |p| p, |_| false).is_empty());
        let invented = dirty.replace(":value 7, :gen 3}", ":value 8, :gen 3}");
        assert_eq!(kinds(&invented, Reads::Committed, |p| p, |_| false), vec!["read-of-unwritten-value"]);
    }
}
