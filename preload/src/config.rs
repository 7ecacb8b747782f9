//! The shim's configuration: from the environment (`CHUNKSTORE_SEEDS`, `CHUNKSTORE_MAP`, ...)
//! or a TOML file (`CHUNKSTORE_CONFIG`), the environment overriding the file.
//!
//! ```toml
//! seeds = ["127.0.0.1:3000", "127.0.0.1:3001"]   # or dir = "/path/of/a/local/cluster"
//! map = { "/data/journal" = "journal" }           # mapped prefix = volume
//! namespace = "test"
//! durability = "write"                            # or "fsync"
//! lease_ms = 5000
//! source = "127.0.0.5"                            # the address connections leave from
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// Every write() commits before it returns, or writes wait in memory until fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Write,
    Fsync,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub seeds: Vec<String>,
    /// (prefix, volume), longest prefix first; prefixes absolute, normalised, without a
    /// trailing '/'.
    pub maps: Vec<(String, String)>,
    pub namespace: String,
    pub durability: Durability,
    pub lease_ms: u64,
    pub dirty_mib_max: usize,
    pub request_timeout_ms: u64,
    /// The address the process's connections leave from (None: the system's choice).
    pub source: Option<std::net::IpAddr>,
}

/// A configuration error: printed as one line before the process exits with status 1.
#[derive(Debug)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad configuration: {}", self.0)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    seeds: Option<Vec<String>>,
    dir: Option<String>,
    map: Option<BTreeMap<String, String>>,
    namespace: Option<String>,
    durability: Option<String>,
    lease_ms: Option<u64>,
    dirty_mib_max: Option<usize>,
    request_timeout_ms: Option<u64>,
    source: Option<String>,
}

fn err<T>(message: String) -> Result<T, ConfigError> {
    Err(ConfigError(message))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ConfigError> {
    text.trim().parse().map_err(|_| ConfigError(format!("{name}={text:?} is not a number")))
}

/// The seeds of the local cluster in `dir` (the cluster.json `chunkctl up --dir` writes).
fn seeds_of_dir(dir: &str) -> Result<Vec<String>, ConfigError> {
    let path = std::path::Path::new(dir).join("cluster.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError(format!("CHUNKSTORE_DIR: reading {}: {e}", path.display())))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| ConfigError(format!("{} is not a cluster description: {e}", path.display())))?;
    let seeds: Vec<String> = value["nodes"].as_array().into_iter().flatten().filter_map(|n| n["client"].as_str().map(str::to_owned)).collect();
    if seeds.is_empty() {
        return err(format!("{} lists no nodes", path.display()));
    }
    Ok(seeds)
}

/// Parses `CHUNKSTORE_MAP`'s form: `/prefix=VOLUME[,/other=VOLUME2]`.
fn parse_map(text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut map = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((prefix, volume)) = item.split_once('=') else {
            return err(format!("CHUNKSTORE_MAP: {item:?} is not PREFIX=VOLUME"));
        };
        if map.insert(prefix.trim().to_owned(), volume.trim().to_owned()).is_some() {
            return err(format!("CHUNKSTORE_MAP: prefix {prefix:?} mapped twice"));
        }
    }
    Ok(map)
}

impl Config {
    /// The configuration the environment gives; None when nothing is mapped (the library
    /// then does nothing).
    pub fn from_env() -> Result<Option<Config>, ConfigError> {
        let file = match env("CHUNKSTORE_CONFIG") {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| ConfigError(format!("CHUNKSTORE_CONFIG: reading {path}: {e}")))?;
                toml::from_str(&text).map_err(|e| ConfigError(format!("{path}: {}", e.message())))?
            }
        };
        let map = match env("CHUNKSTORE_MAP") {
            Some(text) => parse_map(&text)?,
            None => file.map.unwrap_or_default(),
        };
        if map.is_empty() {
            return Ok(None);
        }
        let seeds = match (env("CHUNKSTORE_SEEDS"), env("CHUNKSTORE_DIR")) {
            (Some(seeds), _) => seeds.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
            (None, Some(dir)) => seeds_of_dir(&dir)?,
            (None, None) => match (file.seeds, file.dir) {
                (Some(seeds), _) => seeds,
                (None, Some(dir)) => seeds_of_dir(&dir)?,
                (None, None) => Vec::new(),
            },
        };
        if seeds.is_empty() {
            return err(
                "CHUNKSTORE_MAP is set but no cluster is named: set CHUNKSTORE_SEEDS=HOST:PORT,... (or CHUNKSTORE_DIR, or seeds in CHUNKSTORE_CONFIG)".into()
            );
        }
        for seed in &seeds {
            if !seed.contains(':') {
                return err(format!("seed {seed:?} is not HOST:PORT"));
            }
        }
        let mut maps = Vec::new();
        for (prefix, volume) in map {
            let normal = crate::paths::normalize(&prefix);
            if !prefix.starts_with('/') || normal == "/" {
                return err(format!("mapped prefix {prefix:?} must be an absolute path other than /"));
            }
            if volume.is_empty() || volume.len() > 200 || volume.contains(['/', '\0']) {
                return err(format!("volume name {volume:?} (for {prefix}): 1 to 200 bytes, no '/'"));
            }
            maps.push((normal, volume));
        }
        maps.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        let durability = match env("CHUNKSTORE_DURABILITY").or(file.durability).as_deref() {
            None | Some("write") => Durability::Write,
            Some("fsync") => Durability::Fsync,
            Some(other) => return err(format!("durability {other:?}: write or fsync")),
        };
        let lease_ms = match env("CHUNKSTORE_LEASE_MS") {
            Some(text) => number("CHUNKSTORE_LEASE_MS", &text)?,
            None => file.lease_ms.unwrap_or(5000),
        };
        if !(200..=3_600_000).contains(&lease_ms) {
            return err(format!("lease {lease_ms} ms: 200 to 3600000"));
        }
        let dirty_mib_max = match env("CHUNKSTORE_DIRTY_MIB_MAX") {
            Some(text) => number("CHUNKSTORE_DIRTY_MIB_MAX", &text)?,
            None => file.dirty_mib_max.unwrap_or(64),
        };
        if !(1..=65536).contains(&dirty_mib_max) {
            return err(format!("dirty_mib_max {dirty_mib_max}: 1 to 65536"));
        }
        let request_timeout_ms = match env("CHUNKSTORE_REQUEST_TIMEOUT_MS") {
            Some(text) => number("CHUNKSTORE_REQUEST_TIMEOUT_MS", &text)?,
            None => file.request_timeout_ms.unwrap_or(5000),
        };
        if !(100..=600_000).contains(&request_timeout_ms) {
            return err(format!("request timeout {request_timeout_ms} ms: 100 to 600000"));
        }
        let namespace = env("CHUNKSTORE_NAMESPACE").or(file.namespace).unwrap_or_else(|| "test".into());
        let source = match env("CHUNKSTORE_SOURCE").or(file.source) {
            Some(text) => Some(text.parse().map_err(|_| ConfigError(format!("source {text:?} is not an IP address")))?),
            None => None,
        };
        Ok(Some(Config { seeds, maps, namespace, durability, lease_ms, dirty_mib_max, request_timeout_ms, source }))
    }
}
