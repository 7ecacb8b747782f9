//! Operation histories in Jepsen's EDN format: one event map per line, in real-time order.
//!
//! `chunkcheck` writes its runs in this format and reads Jepsen's, so histories move freely
//! between it and Knossos, Elle or Porcupine. An event is `{:process P, :type T, :f F, :value V}`
//! with optional `:key`, `:error`, `:time` (nanoseconds since the run started) and `:node`.
//! The order of lines is the order of events in real time; the checkers rely on nothing else.

pub mod edn;

use std::fmt;
use std::path::Path;

pub use edn::Edn;

/// What an event says about its operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Invoke,
    /// Completed and took effect.
    Ok,
    /// Completed without taking effect (for a compare-and-set: see `Outcome::Fail`).
    Fail,
    /// Outcome unknown (a timeout or a crash): it may take effect at any point after its
    /// invocation, or never.
    Info,
}

impl EventType {
    fn keyword(self) -> &'static str {
        match self {
            EventType::Invoke => "invoke",
            EventType::Ok => "ok",
            EventType::Fail => "fail",
            EventType::Info => "info",
        }
    }
}

/// One line of a history.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Client process number, or `None` for the nemesis (`:process :nemesis`).
    pub process: Option<i64>,
    pub kind: EventType,
    pub f: String,
    pub key: Option<Edn>,
    pub value: Edn,
    pub error: Option<Edn>,
    pub time_ns: Option<u64>,
    /// Anything else on the line, kept so that a history reads back as written.
    pub extra: Vec<(Edn, Edn)>,
}

impl Event {
    pub fn new(process: i64, kind: EventType, f: &str, value: Edn) -> Event {
        Event { process: Some(process), kind, f: f.to_owned(), key: None, value, error: None, time_ns: None, extra: Vec::new() }
    }

    fn from_edn(map: Edn) -> Result<Event, String> {
        let Edn::Map(pairs) = map else { return Err("an event must be a map".into()) };
        let mut event = Event::new(0, EventType::Invoke, "", Edn::Nil);
        let (mut process, mut kind, mut f) = (None, None, None);
        for (k, v) in pairs {
            match (k.as_keyword(), v) {
                (Some("process"), Edn::Int(p)) => process = Some(Some(p)),
                (Some("process"), Edn::Keyword(_)) => process = Some(None),
                (Some("type"), Edn::Keyword(t)) => {
                    kind = Some(match t.as_str() {
                        "invoke" => EventType::Invoke,
                        "ok" => EventType::Ok,
                        "fail" => EventType::Fail,
                        "info" => EventType::Info,
                        other => return Err(format!(":type :{other} is not invoke, ok, fail or info")),
                    })
                }
                (Some("f"), Edn::Keyword(name)) => f = Some(name),
                (Some("key"), v) => event.key = Some(v),
                (Some("value"), v) => event.value = v,
                (Some("error"), v) => event.error = Some(v),
                (Some("time"), Edn::Int(t)) if t >= 0 => event.time_ns = Some(t as u64),
                (Some(name @ ("process" | "type" | "f" | "time")), v) => return Err(format!(":{name} cannot be {v}")),
                (_, v) => event.extra.push((k, v)),
            }
        }
        event.process = process.ok_or(":process is missing")?;
        event.kind = kind.ok_or(":type is missing")?;
        event.f = f.ok_or(":f is missing")?;
        Ok(event)
    }

    pub fn to_edn(&self) -> Edn {
        let mut pairs = vec![
            (Edn::keyword("process"), self.process.map_or(Edn::keyword("nemesis"), Edn::Int)),
            (Edn::keyword("type"), Edn::keyword(self.kind.keyword())),
            (Edn::keyword("f"), Edn::keyword(&self.f)),
        ];
        if let Some(key) = &self.key {
            pairs.push((Edn::keyword("key"), key.clone()));
        }
        pairs.push((Edn::keyword("value"), self.value.clone()));
        if let Some(error) = &self.error {
            pairs.push((Edn::keyword("error"), error.clone()));
        }
        if let Some(time) = self.time_ns {
            pairs.push((Edn::keyword("time"), Edn::Int(time as i64)));
        }
        pairs.extend(self.extra.iter().cloned());
        Edn::Map(pairs)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_edn().fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot read history {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("history line {line}: {what}")]
    Malformed { line: usize, what: String },
}

/// Parses a history: one event per line (blank lines and `;` comments allowed). A whole
/// history written as one EDN vector of events is accepted too.
pub fn parse_history(text: &str) -> Result<Vec<Event>, HistoryError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let Edn::Vector(items) = edn::parse(text).map_err(|e| HistoryError::Malformed { line: 1, what: e.to_string() })? else {
            unreachable!("a text starting with '[' parses to a vector or fails")
        };
        return items.into_iter().enumerate().map(|(i, item)| Event::from_edn(item).map_err(|what| HistoryError::Malformed { line: i + 1, what })).collect();
    }
    let mut events = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        let malformed = |what: String| HistoryError::Malformed { line: number + 1, what };
        let value = edn::parse(line).map_err(|e| malformed(e.to_string()))?;
        events.push(Event::from_edn(value).map_err(malformed)?);
    }
    Ok(events)
}

pub fn read_history(path: &Path) -> Result<Vec<Event>, HistoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| HistoryError::Read { path: path.display().to_string(), source })?;
    parse_history(&text)
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Ok,
    /// Completed with `:fail`, with the event's `:error` if any.
    Fail(Option<Edn>),
    /// `:info`, or no completion at all in the history.
    Unknown,
}

/// An invocation paired with its completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub process: i64,
    pub f: String,
    pub key: Option<Edn>,
    /// The invocation's value (what was asked).
    pub input: Edn,
    /// The completion's value (what was returned); `Nil` when there was none.
    pub output: Edn,
    pub outcome: Outcome,
    /// Position of the invocation among all events.
    pub call: usize,
    /// Position of the completion, `None` when the outcome is unknown (it may take effect any
    /// time after `call`).
    pub ret: Option<usize>,
    /// Other fields of the completion (chunkcheck records the record's generation as `:gen`).
    pub extra: Vec<(Edn, Edn)>,
}

impl Operation {
    /// An integer field of the completion, such as `gen`.
    pub fn completion_int(&self, name: &str) -> Option<i64> {
        self.extra.iter().find_map(|(k, v)| match (k, v) {
            (Edn::Keyword(k), Edn::Int(n)) if k == name => Some(*n),
            _ => None,
        })
    }
}

/// Pairs each client's invocations with their completions. Nemesis events are skipped.
pub fn operations(events: &[Event]) -> Result<Vec<Operation>, HistoryError> {
    let mut open: std::collections::HashMap<i64, usize> = Default::default();
    let mut operations: Vec<Operation> = Vec::new();
    for (position, event) in events.iter().enumerate() {
        let Some(process) = event.process else { continue };
        let malformed = |what: String| HistoryError::Malformed { line: position + 1, what };
        match event.kind {
            EventType::Invoke => {
                if let Some(&earlier) = open.get(&process) {
                    return Err(malformed(format!("process {process} invokes again before its operation at event {} completed", operations[earlier].call + 1)));
                }
                open.insert(process, operations.len());
                operations.push(Operation {
                    process,
                    f: event.f.clone(),
                    key: event.key.clone(),
                    input: event.value.clone(),
                    output: Edn::Nil,
                    outcome: Outcome::Unknown,
                    call: position,
                    ret: None,
                    extra: Vec::new(),
                });
            }
            kind => {
                let Some(index) = open.remove(&process) else {
                    return Err(malformed(format!("process {process} completes an operation it never invoked")));
                };
                let op = &mut operations[index];
                if op.f != event.f {
                    return Err(malformed(format!("process {process} invoked :{} but completes :{}", op.f, event.f)));
                }
                op.output = event.value.clone();
                op.extra = event.extra.clone();
                match kind {
                    EventType::Ok => (op.outcome, op.ret) = (Outcome::Ok, Some(position)),
                    EventType::Fail => (op.outcome, op.ret) = (Outcome::Fail(event.error.clone()), Some(position)),
                    _ => {}
                }
            }
        }
    }
    Ok(operations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocations_pair_with_their_completions_and_open_ones_stay_unknown() {
        let text = "{:process 0, :type :invoke, :f :write, :value 1}\n\
                    {:process 1, :type :invoke, :f :read, :value nil}\n\
                    {:process :nemesis, :type :info, :f :kill, :value nil}\n\
                    {:process 0, :type :ok, :f :write, :value 1}\n\
                    {:process 1, :type :info, :f :read, :value nil}\n\
                    {:process 2, :type :invoke, :f :cas, :value [1 2]}\n\
                    {:process 2, :type :fail, :f :cas, :value [1 2], :error :cas-mismatch}\n\
                    {:process 3, :type :invoke, :f :write, :value 5}\n";
        let events = parse_history(text).unwrap();
        assert_eq!(events.len(), 8);
        assert_eq!(events[2].process, None);
        let ops = operations(&events).unwrap();
        assert_eq!(ops.len(), 4);
        assert_eq!((ops[0].call, ops[0].ret, &ops[0].outcome), (0, Some(3), &Outcome::Ok));
        assert_eq!((ops[1].ret, &ops[1].outcome), (None, &Outcome::Unknown));
        assert_eq!(ops[2].outcome, Outcome::Fail(Some(Edn::keyword("cas-mismatch"))));
        assert_eq!((ops[3].ret, &ops[3].outcome), (None, &Outcome::Unknown));
        for event in &events {
            assert_eq!(&parse_history(&event.to_string()).unwrap()[0], event);
        }
    }

    #[test]
    fn a_broken_history_names_its_line() {
        let twice = "{:process 0, :type :invoke, :f :read, :value nil}\n{:process 0, :type :invoke, :f :read, :value nil}\n";
        assert!(matches!(operations(&parse_history(twice).unwrap()), Err(HistoryError::Malformed { line: 2, .. })));
        let orphan = "{:process 0, :type :ok, :f :read, :value nil}";
        assert!(matches!(operations(&parse_history(orphan).unwrap()), Err(HistoryError::Malformed { line: 1, .. })));
        let no_type = "\n{:process 0, :f :read, :value nil}";
        let err = parse_history(no_type).unwrap_err();
        assert!(matches!(err, HistoryError::Malformed { line: 2, ref what } if what.contains(":type")), "{err}");
    }
}
