//! fcntl record locks and flock through chunkfs live in the cluster: processes on two mounts
//! (and two on one mount) exclude each other, byte ranges and shared locks behave as POSIX
//! says, F_GETLK names the holder's pid, and a close gives the locks back. When the holder's
//! chunkfs is SIGSTOPped, the standby on the other mount takes the lock after the lease, and
//! the stopped holder's late write (queued before it stopped, sent after it resumed) is refused
//! with EIO: unique write ownership. Negative control: with fencing switched off in the nodes
//! (`unsafe-skip-fencing`), the late write lands after the standby's, and the check says so.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use chunkstore_tests::local::{chunkctl_ok, Down};
use chunkstore_tests::mount::Mount;

/// A process that takes an exclusive lock on a file (F_SETLKW, or F_SETLK with "try"), then
/// on "write" appends its tag and fdatasyncs, answering "ok" or "err ERRNO"; "exit" ends it.
const HOLDER: &str = r#"
import fcntl, os, sys
path, tag, mode = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if mode == "try" else 0))
    print("locked", flush=True)
except OSError as e:
    print("refused %d" % e.errno, flush=True)
    sys.exit(0)
for line in sys.stdin:
    if line.strip() == "write":
        try:
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, (tag + "\n").encode())
            os.fdatasync(fd)
            print("ok", flush=True)
        except OSError as e:
            print("err %d" % e.errno, flush=True)
    elif line.strip() == "exit":
        break
"#;

struct Holder {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Holder {
    fn start(file: &Path, tag: &str, mode: &str) -> Holder {
        let mut child = Command::new("python3").args(["-c", HOLDER]).arg(file).args([tag, mode]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Holder { child, stdin, lines }
    }

    fn next(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }

    fn say(&mut self, what: &str) {
        writeln!(self.stdin, "{what}").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// F_GETLK through python: "unlocked" or "TYPE PID".
fn getlk(file: &Path) -> String {
    let script = r#"
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
lk = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
t, w, s, l, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, lk))
print("unlocked" if t == fcntl.F_UNLCK else "%d %d" % (t, pid))
"#;
    let out = Command::new("python3").args(["-c", script]).arg(file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn byte_range_lock(file: &Path, start: u64, len: u64, shared: bool) -> String {
    let script = r#"
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
kind = fcntl.LOCK_SH if sys.argv[4] == "shared" else fcntl.LOCK_EX
try:
    fcntl.lockf(fd, kind | fcntl.LOCK_NB, int(sys.argv[3]), int(sys.argv[2]))
    print("locked", flush=True)
    sys.stdin.readline()
except OSError as e:
    print("refused %d" % e.errno, flush=True)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(file)
        .args([start.to_string(), len.to_string(), if shared { "shared".into() } else { "exclusive".to_string() }])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    drop(child.stdin.take());
    let _ = child.wait();
    line.trim().to_owned()
}

/// Locks exclude across mounts and processes, by byte range; F_GETLK names the holder; close
/// gives them back.
#[test]
fn fcntl_locks_exclude_across_mounts_and_processes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    chunkctl_ok(&data, &["up", "--nodes", "3"]);
    let _down = Down(&data);
    let a = Mount::new(&data, "vol", &dir.path().join("a"), &[]);
    let b = Mount::new(&data, "vol", &dir.path().join("b"), &[]);
    let (fa, fb) = (a.path.join("lockfile"), b.path.join("lockfile"));
    std::fs::write(&fa, b"").unwrap();
    let mut holder = Holder::start(&fa, "A", "wait");
    assert_eq!(holder.next(Duration::from_secs(20)).as_deref(), Some("locked"));
    let refused = format!("refused {}", libc::EAGAIN);
    assert_eq!(Holder::start(&fb, "B", "try").next(Duration::from_secs(20)), Some(refused.clone()), "another mount is excluded");
    assert_eq!(Holder::start(&fa, "A2", "try").next(Duration::from_secs(20)), Some(refused.clone()), "another process on the same mount is excluded");
    assert_eq!(getlk(&fb), format!("{} {}", libc::F_WRLCK, holder.child.id()), "F_GETLK names the holder's pid");
    holder.say("exit");
    let _ = holder.child.wait();
    assert_eq!(getlk(&fb), "unlocked", "the holder's exit gave the lock back");
    assert_eq!(Holder::start(&fb, "B", "try").next(Duration::from_secs(20)).as_deref(), Some("locked"));

    // Byte ranges as SQLite takes them: disjoint exclusive ranges and shared ones coexist.
    let ranged = a.path.join("ranged");
    std::fs::write(&ranged, b"").unwrap();
    let script = r#"
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
fcntl.lockf(fd, fcntl.LOCK_SH, 100, 1000)
print("locked", flush=True)
sys.stdin.readline()
"#;
    let mut ranges = Command::new("python3").args(["-c", script]).arg(&ranged).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(ranges.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let other = b.path.join("ranged");
    assert_eq!(byte_range_lock(&other, 0, 100, true), refused, "an exclusive range excludes a shared lock");
    assert_eq!(byte_range_lock(&other, 100, 100, true), "locked", "past it, shared locks coexist");
    assert_eq!(byte_range_lock(&other, 1000, 100, false), refused, "a shared range excludes an exclusive lock");
    assert_eq!(byte_range_lock(&other, 5000, 100, false), "locked", "a free range can be locked");
    drop(ranges.stdin.take());
    let _ = ranges.wait();

    // flock across mounts: held on A, refused on B (EWOULDBLOCK); given back at close.
    let flocked = a.path.join("flocked");
    std::fs::write(&flocked, b"").unwrap();
    let flock_script = r#"
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    sys.stdin.readline()
except OSError as e:
    print("refused %d" % e.errno, flush=True)
"#;
    let flock = |file: &Path| {
        let mut child = Command::new("python3").args(["-c", flock_script]).arg(file).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        (child, line.trim().to_owned())
    };
    let (mut holder, said) = flock(&flocked);
    assert_eq!(said, "locked");
    let (mut other, said) = flock(&b.path.join("flocked"));
    assert_eq!(said, refused, "a flock on one mount excludes one on the other");
    let _ = other.wait();
    drop(holder.stdin.take());
    let _ = holder.wait();
    let (mut after, said) = flock(&b.path.join("flocked"));
    assert_eq!(said, "locked", "the holder's close gave its flock back");
    drop(after.stdin.take());
    let _ = after.wait();

    // OFD locks (F_OFD_SETLK): owned by the open file description, so another description
    // of the same process is refused too; the description's close gives them back (within
    // 2 s: the release that carries it is asynchronous).
    let ofd_script = r#"
import fcntl, os, struct, sys, time
F_OFD_SETLK = 37
def lock(fd):
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
        return "locked"
    except OSError as e:
        return "refused %d" % e.errno
a = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
b = os.open(sys.argv[2], os.O_RDWR)
a2 = os.open(sys.argv[1], os.O_RDWR)
print(lock(a), lock(b), lock(a2), sep=",")
os.close(a)
# The kernel sends the description's release in the background after close returns (FUSE
# releases are asynchronous): its OFD locks go a moment later.
deadline = time.time() + 2
while lock(b) != "locked" and time.time() < deadline:
    time.sleep(0.02)
print(lock(b))
"#;
    let out = Command::new("python3").args(["-c", ofd_script]).arg(a.path.join("ofd")).arg(b.path.join("ofd")).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines, vec![format!("locked,{refused},{refused}").as_str(), "locked"], "OFD locks: {said} {}", String::from_utf8_lossy(&out.stderr));
}

/// The SIGSTOP failover drill; returns (takeover time, whether the stopped holder's late write
/// landed after the standby's).
fn stopped_holder_drill(skip_fencing: bool) -> (Duration, bool) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut up = vec!["up", "--nodes", "3"];
    if skip_fencing {
        up.extend(["--chunkd-option", "unsafe-skip-fencing=true"]);
    }
    chunkctl_ok(&data, &up);
    let _down = Down(&data);
    let a = Mount::new(&data, "vol", &dir.path().join("a"), &["--lease-ms", "2000"]);
    let b = Mount::new(&data, "vol", &dir.path().join("b"), &["--lease-ms", "2000"]);
    let (fa, fb) = (a.path.join("journal"), b.path.join("journal"));
    std::fs::write(&fa, b"").unwrap();
    let mut holder = Holder::start(&fa, "A", "wait");
    assert_eq!(holder.next(Duration::from_secs(20)).as_deref(), Some("locked"));
    holder.say("write");
    assert_eq!(holder.next(Duration::from_secs(20)).as_deref(), Some("ok"));
    let mut standby = Holder::start(&fb, "B", "wait");
    assert_eq!(standby.next(Duration::from_secs(1)), None, "the standby waits while the holder's lease lives");

    // The holder's machine goes away: its chunkfs stops; the holder's next write queues.
    // SAFETY: signalling a child of ours.
    unsafe { libc::kill(a.pid(), libc::SIGSTOP) };
    let stopped_at = Instant::now();
    holder.say("write");
    assert_eq!(standby.next(Duration::from_secs(60)).as_deref(), Some("locked"), "the standby took the lock");
    let takeover = stopped_at.elapsed();
    standby.say("write");
    assert_eq!(standby.next(Duration::from_secs(20)).as_deref(), Some("ok"));
    // SAFETY: as above.
    unsafe { libc::kill(a.pid(), libc::SIGCONT) };
    let late = holder.next(Duration::from_secs(60));
    let content = std::fs::read_to_string(&fb).unwrap();
    let lines: Vec<&str> = content.lines().collect();
    let first_b = lines.iter().position(|l| *l == "B").expect("the standby's record is there");
    let landed_late = lines[first_b..].contains(&"A");
    eprintln!("takeover {takeover:?}; holder's late write: {late:?}; journal {lines:?}");
    if !skip_fencing {
        assert_eq!(late.as_deref(), Some(format!("err {}", libc::EIO).as_str()), "the late write is refused with EIO");
    }
    (takeover, landed_late)
}

#[test]
fn stopped_holder_loses_its_lock_and_its_late_write_is_refused() {
    let (takeover, landed_late) = stopped_holder_drill(false);
    assert!(!landed_late, "the stopped holder's late write landed after the standby took over");
    assert!(takeover < Duration::from_secs(30), "{takeover:?}");
}

/// Negative control: the same drill with fencing off in the nodes lets the late write land,
/// and the check above sees it.
#[test]
fn negative_control_without_fencing_the_late_write_lands() {
    let (_, landed_late) = stopped_holder_drill(true);
    assert!(landed_late, "with fencing off, the late write should have landed (the drill would not catch a broken fence)");
}
