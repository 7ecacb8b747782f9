//! Bin values and records as the engine hands them out.

/// A bin's value. Lists and maps may come later; the on-disk type byte leaves room for them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    Int(i64),
    Float(f64),
    String(String),
    /// (Encoded as one byte string, not byte by byte: the same bincode bytes, far less work.)
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::String(_) => "string",
            Value::Bytes(_) => "bytes",
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(bytes) => Some(bytes),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(*value),
            _ => None,
        }
    }
}

/// A named value inside a record.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Bin {
    pub name: String,
    pub value: Value,
}

impl Bin {
    /// Longest bin name, in bytes (Aerospike's limit is 15).
    pub const NAME_MAX_BYTES: usize = 15;

    pub fn new(name: impl Into<String>, value: Value) -> Bin {
        Bin { name: name.into(), value }
    }
}

/// What the engine knows about a record apart from its bins.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordMeta {
    /// +1 on every write; a record re-created after a delete starts again at 1.
    pub generation: u32,
    /// Seconds since the Unix epoch after which the record is gone; 0 = never expires.
    pub void_time_secs: u32,
    /// Wall-clock milliseconds since the Unix epoch of the last write (informational only).
    pub last_update_ms: u64,
}

/// A record as read.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub set: String,
    pub meta: RecordMeta,
    pub bins: Vec<Bin>,
}

impl Record {
    pub fn bin(&self, name: &str) -> Option<&Value> {
        self.bins.iter().find(|bin| bin.name == name).map(|bin| &bin.value)
    }
}
