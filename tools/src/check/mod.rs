//! Checkers for recorded histories.

pub mod counter;
pub mod linearizable;
pub mod lock;
pub mod models;
pub mod prune;
pub mod session;
pub mod set;

use std::collections::BTreeMap;
use std::path::Path;

use linearizable::{Limits, Verdict};
use models::Model;

use crate::history::{operations, read_history, Edn, Operation};

/// What a workload's reads promise, and so what the checkers hold them to. Final reads are
/// always linearizable, whatever the workload's reads were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// A read sees every write acknowledged before it began.
    Linearizable,
    /// Session and allow-replica reads: a read sees its own client's acknowledged writes and
    /// never goes back in time for that client.
    Session,
    /// Allow-unavailable reads: any committed value, however old; never one that was not
    /// committed (no dirty read).
    Committed,
}

impl Reads {
    pub fn of(policy: chunkstore::protocol::ReadPolicy) -> Reads {
        use chunkstore::protocol::ReadPolicy;
        match policy {
            ReadPolicy::Linearizable => Reads::Linearizable,
            ReadPolicy::Session | ReadPolicy::AllowReplica => Reads::Session,
            ReadPolicy::AllowUnavailable => Reads::Committed,
        }
    }
}

/// Operations grouped by their key (printed as EDN; no key is the empty string).
pub fn by_key(ops: &[Operation]) -> BTreeMap<String, Vec<&Operation>> {
    let mut grouped: BTreeMap<String, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        grouped.entry(op.key.as_ref().map_or_else(String::new, Edn::to_string)).or_default().push(op);
    }
    grouped
}

/// `chunkcheck history`: prints a summary (and with `json` a JSON last line); returns the exit
/// code (0 linearizable, 1 not, 2 unknown or unreadable).
pub fn history_command(path: &Path, model: Model, limits: Limits, json: bool) -> u8 {
    let fail = |what: String| {
        eprintln!("chunkcheck history: {what}");
        if json {
            println!("{}", serde_json::json!({ "valid": "unknown", "error": what }));
        }
        2
    };
    let events = match read_history(path) {
        Ok(events) => events,
        Err(err) => return fail(err.to_string()),
    };
    let ops = match operations(&events) {
        Ok(ops) => ops,
        Err(err) => return fail(err.to_string()),
    };
    let report = match linearizable::check(model, &ops, limits) {
        Ok(report) => report,
        Err(what) => return fail(what),
    };
    let anomalies: Vec<serde_json::Value> = report
        .keys
        .iter()
        .filter(|k| k.verdict == Verdict::NotLinearizable)
        .map(|k| {
            let stuck = k.stuck_operation.map(|i| &ops[i]);
            if let Some(op) = stuck {
                let shown = events[op.call].to_string();
                let completion = op.ret.map(|r| events[r].to_string()).unwrap_or_else(|| "(no completion)".into());
                let why = match k.unexplained_value {
                    true => "no write can have left the value found by",
                    false => "no order of the operations explains",
                };
                eprintln!("key {}: {why} {shown} -> {completion} (line {})", k.key.as_deref().unwrap_or("(none)"), op.ret.unwrap_or(op.call) + 1);
            }
            serde_json::json!({
                "key": k.key,
                "reason": if k.unexplained_value { "unexplained-value" } else { "search" },
                "stuck_line": stuck.map(|op| op.ret.unwrap_or(op.call) + 1),
                "linearized_before_lines": k.linearized_before.iter().map(|&i| ops[i].call + 1).collect::<Vec<_>>(),
            })
        })
        .collect();
    for key in report.keys.iter().filter(|k| k.verdict == Verdict::Unknown) {
        eprintln!("key {}: unknown: {}", key.key.as_deref().unwrap_or("(none)"), key.unknown_reason.as_deref().unwrap_or(""));
    }
    let (valid, code) = match report.verdict {
        Verdict::Linearizable => (serde_json::json!(true), 0),
        Verdict::NotLinearizable => (serde_json::json!(false), 1),
        Verdict::Unknown => (serde_json::json!("unknown"), 2),
    };
    eprintln!("{}: {:?} ({} operations over {} keys, {} ms)", path.display(), report.verdict, ops.len(), report.keys.len(), report.elapsed_ms);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "valid": valid,
                "model": format!("{model:?}"),
                "ops": ops.len(),
                "keys": report.keys.len(),
                "elapsed_ms": report.elapsed_ms,
                "crashed_writes_dropped": report.keys.iter().map(|k| k.crashed_writes_dropped).sum::<usize>(),
                "anomalies": anomalies
            })
        );
    }
    code
}
