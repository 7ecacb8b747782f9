//! Counter bounds: every read lies between the increments acknowledged before it began and
//! the increments attempted before it ended (the second seed: Aerospike lost about 10% of
//! acknowledged increments under partitions). Allow-unavailable reads may be stale: they are
//! held only to the upper bound (nothing invented), and counted when below their session's own
//! increments.

use super::Reads;
use crate::history::{Edn, Operation, Outcome};

#[derive(Clone, Debug, serde::Serialize)]
pub struct CounterAnomaly {
    pub key: String,
    /// Line of the read's completion in the history.
    pub line: usize,
    pub read: i64,
    pub lower: i64,
    pub upper: i64,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CounterReport {
    pub reads: usize,
    pub acknowledged_adds: i64,
    pub attempted_adds: i64,
    /// Allow-unavailable reads below their own session's acknowledged increments (allowed).
    pub stale_reads: usize,
    pub anomalies: Vec<CounterAnomaly>,
}

/// Checks `:add` (value = the increment) and `:read` operations, key by key. With session
/// reads a read's lower bound counts only its own session's acknowledged increments, with
/// committed (allow-unavailable) reads none; the final reads (`is_final`) are held to all.
pub fn check(ops: &[Operation], reads: Reads, session_of: impl Fn(i64) -> i64, is_final: impl Fn(i64) -> bool) -> CounterReport {
    let mut report = CounterReport::default();
    for (key, ops) in super::by_key(ops) {
        let delta = |op: &Operation| match op.input {
            Edn::Int(n) => n,
            _ => 0,
        };
        let adds: Vec<&&Operation> = ops.iter().filter(|op| op.f == "add" && !matches!(op.outcome, Outcome::Fail(_))).collect();
        report.acknowledged_adds += adds.iter().filter(|op| op.outcome == Outcome::Ok).map(|op| delta(op)).sum::<i64>();
        report.attempted_adds += adds.iter().map(|op| delta(op)).sum::<i64>();
        for read in ops.iter().filter(|op| op.f == "read" && op.outcome == Outcome::Ok) {
            let Edn::Int(value) = read.output else {
                report.anomalies.push(CounterAnomaly { key: key.clone(), line: read.ret.unwrap_or(read.call) + 1, read: -1, lower: 0, upper: 0 });
                continue;
            };
            let end = read.ret.expect("an ok read has a completion");
            let strict = reads == Reads::Linearizable || is_final(read.process);
            let counted = |a: &Operation| strict || session_of(a.process) == session_of(read.process);
            let mut lower: i64 = adds.iter().filter(|a| a.outcome == Outcome::Ok && a.ret.is_some_and(|r| r < read.call) && counted(a)).map(|a| delta(a)).sum();
            let upper: i64 = adds.iter().filter(|a| a.call < end).map(|a| delta(a)).sum();
            report.reads += 1;
            if reads == Reads::Committed && !strict {
                report.stale_reads += usize::from(value < lower);
                lower = 0;
            }
            if value < lower || value > upper {
                report.anomalies.push(CounterAnomaly { key: key.clone(), line: end + 1, read: value, lower, upper });
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::Reads;
    use crate::history::{operations, parse_history};

    #[test]
    fn a_read_below_the_acknowledged_increments_is_a_lost_update() {
        let text = "{:process 0, :type :invoke, :f :add, :value 1}\n{:process 0, :type :ok, :f :add, :value 1}\n\
                    {:process 1, :type :invoke, :f :add, :value 1}\n{:process 1, :type :info, :f :add, :value 1}\n\
                    {:process 2, :type :invoke, :f :read, :value nil}\n{:process 2, :type :ok, :f :read, :value R}\n";
        let run = |r: &str| {
            super::check(&operations(&parse_history(&text.replace(" R}", &format!(" {r}}}"))).unwrap()).unwrap(), Reads::Linearizable, |p| p, |_| false)
        };
        assert_eq!(run("0").anomalies.len(), 1, "lost the acknowledged increment");
        assert!(run("1").anomalies.is_empty());
        assert!(run("2").anomalies.is_empty(), "the info increment may have happened");
        assert_eq!(run("3").anomalies[0].upper, 2, "more increments than were ever attempted");
        let session = super::check(&operations(&parse_history(&text.replace(" R}", " 0}")).unwrap()).unwrap(), Reads::Session, |p| p, |_| false);
        assert!(session.anomalies.is_empty(), "a session read need not see another session's increment yet");
        // A read of its own session's increment: required with session reads, not with
        // allow-unavailable ones (counted as stale), and the final reads are held to it.
        let own = text
            .replace("{:process 2, :type :invoke, :f :read", "{:process 0, :type :invoke, :f :read")
            .replace("{:process 2, :type :ok, :f :read", "{:process 0, :type :ok, :f :read");
        let run_own = |r: &str, reads, is_final: fn(i64) -> bool| {
            super::check(&operations(&parse_history(&own.replace(" R}", &format!(" {r}}}"))).unwrap()).unwrap(), reads, |p| p, is_final)
        };
        assert_eq!(run_own("0", Reads::Session, |_| false).anomalies.len(), 1);
        let stale = run_own("0", Reads::Committed, |_| false);
        assert_eq!((stale.anomalies.len(), stale.stale_reads), (0, 1));
        assert_eq!(run_own("0", Reads::Committed, |p| p == 0).anomalies.len(), 1, "a final read is linearizable");
        assert_eq!(run_own("3", Reads::Committed, |_| false).anomalies.len(), 1, "never more than was attempted");
    }
}
