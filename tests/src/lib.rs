//! Helpers for the end-to-end tests in tests/tests: they run the real release binaries
//! (`cargo build --release` first; `./dev test` does it).

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a release binary of this workspace (or of `$CHUNKSTORE_BIN_DIR/NAME`).
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("CHUNKSTORE_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release"),
    };
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --release` first (./dev test does)", path.display());
    path
}

/// Runs a binary to completion and returns its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(binary(name)).args(args).output().unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// The JSON object on the last line of stdout.
pub fn last_json_line(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no output; stderr:\n{}", String::from_utf8_lossy(&output.stderr)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

/// A setting from the environment, for slow tests that CI runs in a bounded form.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Feeds a sqlite3 process (stdin piped) `preamble`, then a long transaction (rows into
/// `log` from 1,000,000 up, every balance of `accounts` to 0) that never commits, and kills
/// it with -9 in the middle.
pub fn kill_sqlite_mid_transaction(mut child: std::process::Child, preamble: &str) {
    use std::io::Write;
    {
        let stdin = child.stdin.as_mut().expect("sqlite3's stdin is piped");
        writeln!(stdin, "{preamble} BEGIN;").unwrap();
        for i in 0..20_000 {
            writeln!(stdin, "INSERT INTO log VALUES({});", 1_000_000 + i).unwrap();
        }
        writeln!(stdin, "UPDATE accounts SET balance=0;").unwrap();
        stdin.flush().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(800));
    child.kill().unwrap();
    let _ = child.wait();
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// iptables DROP rules in the OUTPUT chain (loopback traffic passes it once), removed when
/// dropped, even if the test fails. Needs root and iptables.
pub struct Cut(Vec<Vec<String>>);

impl Cut {
    fn iptables(action: &str, matches: &[String]) -> bool {
        Command::new("iptables")
            .args(["-w", "5", action, "OUTPUT"])
            .args(matches)
            .args(["-j", "DROP"])
            // Removal runs until no rule is left: its last "Bad rule" is expected.
            .stderr(if action == "-D" { std::process::Stdio::null() } else { std::process::Stdio::inherit() })
            .status()
            .is_ok_and(|s| s.success())
    }

    fn apply(rules: Vec<Vec<String>>) -> Cut {
        for rule in &rules {
            assert!(Cut::iptables("-I", rule), "iptables failed (the test needs root and iptables)");
        }
        Cut(rules)
    }

    /// Every packet from `address` and every packet to it.
    pub fn address(address: &str) -> Cut {
        Cut::apply(vec![vec!["-s".into(), address.into()], vec!["-d".into(), address.into()]])
    }

    /// Every packet between `node` and each of `others`, both ways; other traffic (clients on
    /// other addresses) still flows.
    pub fn isolate(node: &str, others: &[String]) -> Cut {
        Cut::apply(others.iter().flat_map(|other| [Cut::pair(node, other), Cut::pair(other, node)]).collect())
    }

    /// Every packet from each of `from` to each of `to`; the other way still flows.
    pub fn one_way(from: &[String], to: &[String]) -> Cut {
        Cut::apply(from.iter().flat_map(|f| to.iter().map(move |t| Cut::pair(f, t))).collect())
    }

    fn pair(from: &str, to: &str) -> Vec<String> {
        vec!["-s".into(), from.into(), "-d".into(), to.into()]
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in &self.0 {
            while Cut::iptables("-D", rule) {}
        }
    }
}

/// The body of `GET /metrics` at `address` (a node's `metrics` address).
pub fn scrape_metrics(address: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap_or_else(|e| panic!("connecting to metrics at {address}: {e}"));
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: chunkd\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of the sample named exactly `name` (with its labels) in metrics `text`; 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// Helpers for tests that drive a local cluster started by `chunkctl up --dir DIR`.
pub mod local {
    use std::path::Path;
    use std::process::Output;

    /// `chunkctl --dir DIR ARGS...`.
    pub fn chunkctl(dir: &Path, args: &[&str]) -> Output {
        let mut all = vec!["--dir", dir.to_str().unwrap()];
        all.extend_from_slice(args);
        super::run("chunkctl", &all)
    }

    /// `chunkctl`, which must succeed; its stdout.
    pub fn chunkctl_ok(dir: &Path, args: &[&str]) -> String {
        let output = chunkctl(dir, args);
        assert!(output.status.success(), "chunkctl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `chunkctl status --json`.
    pub fn status(dir: &Path) -> serde_json::Value {
        serde_json::from_str(&chunkctl_ok(dir, &["status", "--json"])).unwrap()
    }

    /// The client addresses of the cluster's nodes, from DIR/cluster.json.
    pub fn seeds(dir: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(dir.join("cluster.json")).unwrap();
        let cluster: serde_json::Value = serde_json::from_str(&text).unwrap();
        cluster["nodes"].as_array().unwrap().iter().map(|n| n["client"].as_str().unwrap().to_owned()).collect()
    }

    /// The config file of node `node` of the local cluster in `dir`.
    pub fn node_config(dir: &Path, node: u64) -> std::path::PathBuf {
        dir.join(format!("node{node}")).join("chunkd.toml")
    }

    /// SIGKILLs node `node`'s chunkd (which must be running).
    pub fn kill_node(dir: &Path, node: u64) {
        let config = node_config(dir, node);
        let killed = std::process::Command::new("pkill").args(["-KILL", "-f", config.to_str().unwrap()]).status().unwrap();
        assert!(killed.success(), "no chunkd of node {node} to kill");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    /// Starts node `node`'s chunkd alone (without `chunkctl up`, which waits for every group to
    /// elect), logging to its chunkd.log. `Down` stops it too.
    pub fn start_node(dir: &Path, node: u64) -> std::process::Child {
        let log_path = dir.join(format!("node{node}")).join("chunkd.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        std::process::Command::new(super::binary("chunkd"))
            .arg("--config")
            .arg(node_config(dir, node))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Stops the cluster in the directory when dropped, even if the test fails (and kills any
    /// chunkd of it that `chunkctl down` does not know of, such as those `start_node` started).
    pub struct Down<'a>(pub &'a Path);

    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = super::run("chunkctl", &["--dir", self.0.to_str().unwrap(), "down"]);
            let _ = std::process::Command::new("pkill").args(["-KILL", "-f", self.0.join("node").to_str().unwrap()]).status();
        }
    }
}

/// A chunkfs mount of a local cluster's volume: started by `Mount::new`, unmounted (SIGTERM,
/// then a lazy umount if it does not go) when dropped.
pub mod mount {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct Mount {
        pub child: Child,
        pub path: PathBuf,
    }

    /// Whether `path` is a mountpoint now (from /proc/mounts).
    pub fn is_mounted(path: &Path) -> bool {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let path = path.to_string_lossy();
        mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(&*path))
    }

    impl Mount {
        /// Mounts volume `volume` of the local cluster in `dir` at `path` (created), with extra
        /// chunkfs arguments; waits until the mount answers.
        pub fn new(dir: &Path, volume: &str, path: &Path, extra: &[&str]) -> Mount {
            std::fs::create_dir_all(path).unwrap();
            let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("chunkfs-{volume}.log"))).unwrap();
            let child = Command::new(super::binary("chunkfs"))
                .args(["mount", "--dir", dir.to_str().unwrap(), "--volume", volume])
                .args(extra)
                .arg(path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut mount = Mount { child, path: path.to_owned() };
            let deadline = Instant::now() + Duration::from_secs(30);
            while !is_mounted(path) {
                if let Ok(Some(status)) = mount.child.try_wait() {
                    panic!("chunkfs exited with {status} (log: {}/chunkfs-{volume}.log)", dir.display());
                }
                assert!(Instant::now() < deadline, "chunkfs did not mount {} in 30 s", path.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            mount
        }

        pub fn pid(&self) -> i32 {
            self.child.id() as i32
        }

        /// SIGTERM, and waits for the unmount; true if chunkfs exited cleanly.
        pub fn unmount(&mut self) -> bool {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return status.success() && !is_mounted(&self.path);
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        /// kill -9 of chunkfs, then clears the dead mountpoint (`umount -l`).
        pub fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            clear_mountpoint(&self.path);
        }
    }

    /// Clears a mountpoint whose chunkfs died (what the README tells users to do).
    pub fn clear_mountpoint(path: &Path) {
        if is_mounted(path) {
            let _ = Command::new("umount").arg("-l").arg(path).status();
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            if self.child.try_wait().ok().flatten().is_none() && !self.unmount() {
                self.kill();
            }
            clear_mountpoint(&self.path);
        }
    }
}
