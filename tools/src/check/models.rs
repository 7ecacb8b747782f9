//! Sequential specifications the linearizability search checks a history against.

use crate::history::{Edn, Operation, Outcome};

/// A model names the data type one key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// One register per key, initially `nil`: `:read`, `:write V`, `:cas [FROM TO]`.
    ///
    /// A `:cas` completed with `:fail` and no `:error` (or `:error :cas-mismatch`) means the
    /// comparison failed: at its linearization point the register did not hold FROM (the
    /// reading the published etcd verdicts use). With any other `:error` a `:fail` only
    /// means "had no effect" (Jepsen's reading), and the operation is dropped.
    CasRegister,
    /// One string per key, initially `""`: `:get`, `:put V`, `:append V`.
    Kv,
}

/// An operation as the search sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A read that returned this value.
    Read(Edn),
    Write(Edn),
    /// Compare-and-set that succeeded (`Some(true)`), found another value (`Some(false)`),
    /// or whose outcome is unknown (`None`: either, as the state allows).
    Cas {
        from: Edn,
        to: Edn,
        succeeded: Option<bool>,
    },
    Append(Edn),
}

impl Model {
    pub fn initial(self) -> Edn {
        match self {
            Model::CasRegister => Edn::Nil,
            Model::Kv => Edn::Str(String::new()),
        }
    }

    /// The step an operation makes, `Ok(None)` for one that cannot matter (a read whose
    /// result is unknown, an operation that definitely had no effect), or why the operation
    /// does not belong to this model.
    pub fn step_of(self, op: &Operation) -> Result<Option<Step>, String> {
        if let Outcome::Fail(error) = &op.outcome {
            if !(op.f == "cas" && is_mismatch(error.as_ref())) {
                return Ok(None);
            }
        }
        let known = op.outcome != Outcome::Unknown;
        let step = match (self, op.f.as_str()) {
            (Model::CasRegister, "read") | (Model::Kv, "get") => match known {
                true => Step::Read(self.normalize(op.output.clone())),
                false => return Ok(None),
            },
            (Model::CasRegister, "write") | (Model::Kv, "put") => Step::Write(self.normalize(op.input.clone())),
            (Model::Kv, "append") => Step::Append(self.normalize(op.input.clone())),
            (Model::CasRegister, "cas") => match &op.input {
                Edn::Vector(pair) if pair.len() == 2 => Step::Cas {
                    from: pair[0].clone(),
                    to: pair[1].clone(),
                    succeeded: match op.outcome {
                        Outcome::Ok => Some(true),
                        Outcome::Fail(_) => Some(false),
                        Outcome::Unknown => None,
                    },
                },
                other => return Err(format!("a :cas value must be [FROM TO], not {other}")),
            },
            (model, f) => return Err(format!("the {model:?} model has no operation :{f}")),
        };
        Ok(Some(step))
    }

    /// The kv model's strings: `nil` reads as the empty string.
    fn normalize(self, value: Edn) -> Edn {
        match (self, value) {
            (Model::Kv, Edn::Nil) => Edn::Str(String::new()),
            (_, value) => value,
        }
    }

    /// The state after `step`, or `None` if the step is impossible in `state`.
    pub fn apply(self, state: &Edn, step: &Step) -> Option<Edn> {
        match step {
            Step::Read(value) => (value == state).then(|| state.clone()),
            Step::Write(value) => Some(value.clone()),
            Step::Cas { from, to, succeeded } => match (state == from, succeeded) {
                (true, Some(true) | None) => Some(to.clone()),
                (false, Some(false) | None) => Some(state.clone()),
                _ => None,
            },
            Step::Append(suffix) => match (state, suffix) {
                (Edn::Str(current), Edn::Str(suffix)) => Some(Edn::Str(format!("{current}{suffix}"))),
                _ => None,
            },
        }
    }
}

fn is_mismatch(error: Option<&Edn>) -> bool {
    match error {
        None => true,
        Some(Edn::Keyword(name)) => name == "cas-mismatch",
        Some(_) => false,
    }
}
