//! The sqlite workload: bank transfers in one SQLite database (rollback journal, synchronous
//! FULL), run by several Python processes at once through the sqlite3 library, as any SQLite
//! application does. Each transfer moves money between two accounts and records itself in
//! one transaction; now and then a process reads the total, which must never change. Each
//! process, when it starts (so after every crash), runs `PRAGMA integrity_check` first.
//!
//! A process tells the run what it does on stdout: `C RESULT` the integrity check's result;
//! `I ID` about to commit transfer ID; `A ID` committed; `S TOTAL` a read of the total;
//! `E MESSAGE` a call failed (the process exits 3).

use serde::Serialize;

/// Accounts in the bank, each opened with `OPENING_BALANCE`.
pub const ACCOUNTS: i64 = 10;
pub const OPENING_BALANCE: i64 = 100;

/// The database, in a directory of the volume (not of the bare mountpoint: when the mount is
/// gone the directory is too, and SQLite cannot create the database elsewhere).
pub const DIRECTORY: &str = "bank";
pub const DATABASE: &str = "bank.db";

/// The application: `python3 -c APP DATABASE NAME ACCOUNTS OPENING SEED`.
pub const APP: &str = r#"
import random, sqlite3, sys
db, name, accounts, opening, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
try:
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    con.execute("PRAGMA synchronous=FULL")
    rows = con.execute("PRAGMA integrity_check").fetchall()
    say("C " + ("ok" if rows == [("ok",)] else repr(rows).replace("\n", " ")))
    con.execute("BEGIN IMMEDIATE")
    con.execute("CREATE TABLE IF NOT EXISTS accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
    con.execute("CREATE TABLE IF NOT EXISTS transfers(id TEXT PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER)")
    if con.execute("SELECT count(*) FROM accounts").fetchone()[0] == 0:
        con.executemany("INSERT INTO accounts VALUES(?, ?)", [(i, opening) for i in range(accounts)])
    con.execute("COMMIT")
    rng = random.Random(seed)
    n = 0
    while True:
        n += 1
        if rng.random() < 0.2:
            say("S %d" % con.execute("SELECT sum(balance) FROM accounts").fetchone()[0])
            continue
        src, dst = rng.sample(range(accounts), 2)
        amount = rng.randint(1, 10)
        tid = "%s-%d" % (name, n)
        say("I " + tid)
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, src))
        con.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, dst))
        con.execute("INSERT INTO transfers VALUES(?, ?, ?, ?)", (tid, src, dst, amount))
        con.execute("COMMIT")
        say("A " + tid)
except Exception as e:
    say("E %s: %s" % (type(e).__name__, str(e).replace("\n", " ")))
    sys.exit(3)
"#;

/// The final check, through a fresh mount: `python3 -c CHECK DATABASE`; prints one JSON
/// object: the integrity check's rows, the total, and every transfer's id.
pub const CHECK: &str = r#"
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
print(json.dumps({
    "integrity": [r[0] for r in con.execute("PRAGMA integrity_check")],
    "total": con.execute("SELECT sum(balance) FROM accounts").fetchone()[0],
    "accounts": con.execute("SELECT count(*) FROM accounts").fetchone()[0],
    "ids": [r[0] for r in con.execute("SELECT id FROM transfers")],
}))
"#;

/// What the sqlite check found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BankVerdict {
    /// Committed transfers.
    pub acked: u64,
    /// Transfers in the database at the end.
    pub transfers: u64,
    pub total: Option<i64>,
    /// Committed transfers missing from the database.
    pub lost: Vec<String>,
    /// Integrity checks that were not ok (at a process's start or at the end), reads of a
    /// total that was not the opening one, a final total that was not.
    pub corrupt: Vec<String>,
    /// Integrity checks run (each process start, and the final one).
    pub integrity_checks: u64,
}

/// Checks the final database (the `CHECK` output) against what was acknowledged and seen.
pub fn check(found: &serde_json::Value, acked: &[String], seen: &[String], integrity_checks: u64) -> BankVerdict {
    let expected = ACCOUNTS * OPENING_BALANCE;
    let mut verdict = BankVerdict { acked: acked.len() as u64, corrupt: seen.to_vec(), integrity_checks: integrity_checks + 1, ..Default::default() };
    let integrity: Vec<&str> = found["integrity"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
    if integrity != ["ok"] {
        verdict.corrupt.push(format!("final integrity check: {integrity:?}"));
    }
    verdict.total = found["total"].as_i64();
    if verdict.total != Some(expected) || found["accounts"].as_i64() != Some(ACCOUNTS) {
        verdict.corrupt.push(format!("final total {:?} over {} accounts, not {expected} over {ACCOUNTS}", verdict.total, found["accounts"]));
    }
    let ids: std::collections::HashSet<&str> = found["ids"].as_array().into_iter().flatten().filter_map(|id| id.as_str()).collect();
    verdict.transfers = ids.len() as u64;
    verdict.lost = acked.iter().filter(|id| !ids.contains(id.as_str())).cloned().collect();
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_lost_transfer_a_changed_total_and_a_failed_integrity_check_are_found() {
        let acked: Vec<String> = ["a-1", "a-2", "b-1"].map(String::from).to_vec();
        let good = json!({ "integrity": ["ok"], "total": 1000, "accounts": 10, "ids": ["a-1", "a-2", "b-1", "b-2"] });
        let verdict = check(&good, &acked, &[], 3);
        assert!(verdict.lost.is_empty() && verdict.corrupt.is_empty(), "{verdict:?}");
        let lost = json!({ "integrity": ["ok"], "total": 1000, "accounts": 10, "ids": ["a-1", "b-1"] });
        assert_eq!(check(&lost, &acked, &[], 0).lost, vec!["a-2".to_owned()]);
        let bad = json!({ "integrity": ["row 3 missing from index"], "total": 990, "accounts": 10, "ids": ["a-1", "a-2", "b-1"] });
        assert_eq!(check(&bad, &acked, &[], 0).corrupt.len(), 2);
    }
}
