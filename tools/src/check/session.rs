//! Session guarantees of a register history whose completions carry the record's generation
//! (`:gen`): per client session, monotonic reads and read-your-writes; across all clients,
//! one value per generation and no value that nobody wrote (no dirty or invented reads);
//! and the final reads show every acknowledged write's generation (nothing lost).

use std::collections::{HashMap, HashSet};

use crate::history::{Edn, Operation, Outcome};

#[derive(Clone, Debug, serde::Serialize)]
pub struct SessionAnomaly {
    pub kind: &'static str,
    pub key: String,
    /// Line of the completion that shows it.
    pub line: usize,
    pub detail: String,
}

/// `session_of` maps a process to its client session; `final_process` marks the final reads.
pub fn check(ops: &[Operation], session_of: impl Fn(i64) -> i64, is_final: impl Fn(i64) -> bool) -> Vec<SessionAnomaly> {
    let mut anomalies = Vec::new();
    for (key, mut ops) in super::by_key(ops) {
        ops.sort_by_key(|op| op.ret.unwrap_or(usize::MAX));
        let written: HashSet<&Edn> = ops.iter().filter_map(|op| match (op.f.as_str(), &op.input) {
            ("write", v) => Some(v),
            ("cas", Edn::Vector(pair)) if pair.len() == 2 => Some(&pair[1]),
            _ => None,
        }).collect();
        let mut value_at: HashMap<i64, (&Edn, usize)> = HashMap::new();
        let mut session_floor: HashMap<i64, i64> = HashMap::new();
        let mut acknowledged_max = 0i64;
        let mut final_max: Option<i64> = None;
        for op in ops.iter().filter(|op| op.outcome == Outcome::Ok) {
            let Some(generation) = op.completion_int("gen") else { continue };
            let line = op.ret.expect("ok operations completed") + 1;
            let value = match op.f.as_str() {
                "read" => &op.output,
                "write" => &op.input,
                "cas" => match &op.input {
                    Edn::Vector(pair) if pair.len() == 2 => &pair[1],
                    _ => continue,
                },
                _ => continue,
            };
            let mut report = |kind, detail: String| anomalies.push(SessionAnomaly { kind, key: key.clone(), line, detail });
            if op.f == "read" && generation > 0 && !written.contains(value) {
                report("read-of-unwritten-value", format!("read {value} at generation {generation}; no operation wrote it"));
            }
            match value_at.get(&generation) {
                Some((other, other_line)) if *other != value && generation > 0 => report(
                    "two-values-at-one-generation",
                    format!("{value} at generation {generation}, but line {other_line} saw {other}"),
                ),
                Some(_) => {}
                None => {
                    value_at.insert(generation, (value, line));
                }
            }
            let session = session_of(op.process);
            let floor = session_floor.entry(session).or_default();
            if op.f == "read" && generation < *floor {
                report("went-back-in-time", format!("session {session} read generation {generation} after having seen {floor}"));
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
                anomalies.push(SessionAnomaly {
                    kind: "lost-write",
                    key: key.clone(),
                    line,
                    detail: format!("the final read shows generation {final_generation}; a write at generation {acknowledged_max} was acknowledged"),
                });
            }
        }
    }
    anomalies
}

#[cfg(test)]
mod tests {
    use crate::history::{operations, parse_history};

    #[test]
    fn a_session_that_reads_an_older_generation_went_back_in_time() {
        let text = "{:process 0, :type :invoke, :f :write, :key 1, :value 5}\n{:process 0, :type :ok, :f :write, :key 1, :value 5, :gen 1}\n\
                    {:process 0, :type :invoke, :f :write, :key 1, :value 6}\n{:process 0, :type :ok, :f :write, :key 1, :value 6, :gen 2}\n\
                    {:process 0, :type :invoke, :f :read, :key 1, :value nil}\n{:process 0, :type :ok, :f :read, :key 1, :value 5, :gen 1}\n";
        let ops = operations(&parse_history(text).unwrap()).unwrap();
        let found = super::check(&ops, |p| p, |_| false);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].kind, found[0].line), ("went-back-in-time", 6));
        // Another session may still read the older generation...
        assert!(super::check(&ops, |p| if p == 0 { 0 } else { 1 }, |_| false).len() == 1);
        let other = text.replace("{:process 0, :type :invoke, :f :read", "{:process 1, :type :invoke, :f :read").replace("{:process 0, :type :ok, :f :read", "{:process 1, :type :ok, :f :read");
        let ops = operations(&parse_history(&other).unwrap()).unwrap();
        assert!(super::check(&ops, |p| p, |_| false).is_empty());
        // ...but not as the final read: the acknowledged generation 2 would be lost.
        let lost = super::check(&ops, |p| p, |p| p == 1);
        assert_eq!(lost.iter().map(|a| a.kind).collect::<Vec<_>>(), vec!["lost-write"]);
        let forged = text.replace(":f :read, :key 1, :value 5, :gen 1}", ":f :read, :key 1, :value 6, :gen 1}");
        let ops = operations(&parse_history(&forged).unwrap()).unwrap();
        assert!(super::check(&ops, |p| p + 10, |_| false).iter().any(|a| a.kind == "two-values-at-one-generation"));
    }
}
