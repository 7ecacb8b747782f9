//! libchunkpreload under unmodified binaries, on a real local cluster: coreutils give the same
//! answers on a mapped path as on a local directory; the sqlite3 CLI and Python's sqlite3 keep
//! every committed row through kill -9; a Java program (RandomAccessFile, FileChannel force and
//! lock, an atomic move) runs as it is; threads and forked children write through the shim; a
//! volume reads the same through the shim and a chunkfs mount; scandir, nftw, ftw,
//! getdents64 and find walk a mapped tree as a local one; freopen moves the standard streams
//! onto mapped files; a file unlinked while open keeps its data; a bad configuration stops the
//! process before main, and with no mapping the library does nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chunkstore_tests::local::{chunkctl_ok, Down};
use chunkstore_tests::mount::Mount;
use chunkstore_tests::{binary, kill_sqlite_mid_transaction};

/// A local cluster and a mapped prefix (which does not exist on the local disk).
struct Shim {
    _dir: tempfile::TempDir,
    data: PathBuf,
    /// The mapped prefix of volume "shim".
    root: PathBuf,
    /// A local directory, for comparisons and inputs.
    local: PathBuf,
}

impl Shim {
    fn new() -> Shim {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        chunkctl_ok(&data, &["up", "--nodes", "3"]);
        let root = dir.path().join("volume");
        let local = dir.path().join("local");
        std::fs::create_dir_all(&local).unwrap();
        Shim { data, root, local, _dir: dir }
    }

    /// A command with the library loaded and ROOT mapped to volume "shim".
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("LD_PRELOAD", binary("libchunkpreload.so"))
            .env("CHUNKSTORE_DIR", &self.data)
            .env("CHUNKSTORE_MAP", format!("{}=shim", self.root.display()))
            .env("ROOT", &self.root)
            .env("LOCAL", &self.local);
        command
    }

    fn sh(&self, script: &str) -> Output {
        self.command("sh").args(["-c", script]).output().unwrap()
    }

    fn sh_ok(&self, script: &str) -> String {
        let output = self.sh(script);
        assert!(output.status.success(), "{script}:\n{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// The same shell session on a directory: what coreutils print, times, inode numbers and
/// block counts left out (they differ between any two filesystems). Redirections hand mapped
/// descriptors to the programs the shell execs.
const COREUTILS_SESSION: &str = r#"
set -e
D="$1"
cp "$LOCAL/in.txt" "$D/a.txt"
cat "$D/a.txt"
dd if="$LOCAL/big" of="$D/big" bs=64k conv=fsync status=none
cmp "$LOCAL/big" "$D/big" && echo "big: same bytes"
wc -c < "$D/big"
head -c 100000 "$D/big" | md5sum
sort -rn < "$D/a.txt" > "$D/sorted"; cat "$D/sorted"
ls "$D/nothing" 2> "$D/err" || cat "$D/err" | sed "s|$D|D|"
mkdir -p "$D/d/e"
mv "$D/a.txt" "$D/d/e/b.txt"
ls -l --time-style=+ "$D/d/e" | grep -v '^total'  # blocks: each filesystem counts its own
stat -c '%n %s %F %a %h' "$D/d/e/b.txt"
ln -s e/b.txt "$D/d/link"
cat "$D/d/link"
readlink "$D/d/link"
stat -L -c '%s %F' "$D/d/link"
ls "$D/d"
echo more >> "$D/d/e/b.txt"
tail -n 2 "$D/d/e/b.txt"
truncate -s 5 "$D/d/e/b.txt"
cat "$D/d/e/b.txt"; echo
cp -r "$D/d" "$D/copy"
ls -R "$D/copy" | sed "s|$D|D|"
test -e "$D/nothing" || echo "no such file"
cat "$D/nothing" 2>&1 | sed "s|$D|D|" || true
rm -r "$D/d" "$D/copy" "$D/sorted" "$D/err"
rm "$D/big"
ls -A "$D"
echo done
"#;

/// coreutils on a mapped path answer exactly as on a local directory (the same script, under
/// the library both times: the local run also shows unmapped paths pass through untouched).
#[test]
fn coreutils_on_a_mapped_path_answer_as_on_a_local_directory() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    std::fs::write(shim.local.join("in.txt"), "hello\nworld\n").unwrap();
    let big: Vec<u8> = (0..3_000_001u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(shim.local.join("big"), &big).unwrap();
    let plain = shim.local.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let run_on = |dir: &Path| {
        let output = shim.command("sh").args(["-c", COREUTILS_SESSION, "session"]).arg(dir).output().unwrap();
        assert!(output.status.success(), "on {}: {}", dir.display(), String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    shim.sh_ok(r#"mkdir -p "$ROOT""#);
    let local = run_on(&plain);
    let mapped = run_on(&shim.root);
    assert!(local.contains("big: same bytes") && local.ends_with("done\n"), "{local}");
    assert_eq!(mapped.replace(shim.root.to_str().unwrap(), "D"), local.replace(plain.to_str().unwrap(), "D"), "coreutils answer alike");
    // Nothing of it reached the local disk under the mapped prefix.
    assert!(!shim.root.exists(), "the mapped prefix is the volume's, not a local directory");
}

/// A tree of files, directories and symlinks (one to a file, one to a directory beside the
/// tree, one dangling) under directory $1.
const WALK_TREE: &str = r#"
set -e
D="$1"
mkdir -p "$D/t/sub/deeper" "$D/t/skip/inner" "$D/t/sib" "$D/t/empty" "$D/other"
printf hello > "$D/t/a.txt"; printf bb > "$D/t/b.txt"; printf x > "$D/t/.hidden"
printf ccc > "$D/t/sub/c.txt"; printf dddd > "$D/t/sub/deeper/d.txt"
printf h > "$D/t/skip/hidden.txt"; printf e > "$D/t/skip/inner/e.txt"
for s in 1 2 3; do printf s > "$D/t/sib/s$s"; done
printf other > "$D/other/o.txt"
ln -s a.txt "$D/t/filelink"; ln -s ../other "$D/t/dirlink"; ln -s nowhere "$D/t/dangling"
"#;

/// scandir (a filter, alphasort, scandirat), nftw (FTW_PHYS|FTW_DEPTH, following symlinks,
/// FTW_MOUNT, FTW_ACTIONRETVAL with FTW_SKIP_SUBTREE, FTW_SKIP_SIBLINGS and FTW_STOP, a
/// non-zero answer, FTW_CHDIR from absolute and relative starting points), ftw, ftw64 and
/// getdents64 (small and large buffers, resuming at a d_off, rewinding with lseek, EINVAL,
/// ENOTDIR), printing what they see; orders that are unspecified are sorted away by the test,
/// the ones that are specified (pre- and post-order) are checked here.
const WALKS_PROGRAM: &str = r##"
// scandir, nftw, ftw and getdents64 on a tree made by the test; prints what it sees, paths
// relative to argv[1]. The test sorts the lines: orders are checked here.
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *top;
static size_t top_len;
static const char *section;

static const char *rel(const char *path) {
    if (strncmp(path, top, top_len) == 0 && (path[top_len] == '/' || path[top_len] == 0))
        return path[top_len] ? path + top_len + 1 : ".";
    return path;
}

static const char *kind(int flag) {
    switch (flag) {
    case FTW_F: return "F";
    case FTW_D: return "D";
    case FTW_DNR: return "DNR";
    case FTW_NS: return "NS";
    case FTW_SL: return "SL";
    case FTW_DP: return "DP";
    case FTW_SLN: return "SLN";
    }
    return "?";
}

// Visit order, for the order checks.
static char *seen[256];
static int seen_count;

static void forget_seen(void) {
    for (int i = 0; i < seen_count; i++) free(seen[i]);
    seen_count = 0;
}

static int index_of(const char *path) {
    for (int i = 0; i < seen_count; i++)
        if (!strcmp(seen[i], path)) return i;
    return -1;
}

// Every directory is visited before (pre-order) or after (post-order) what it holds.
static void check_order(int post) {
    int parents = 0, bad = 0;
    for (int i = 0; i < seen_count; i++) {
        char parent[4096];
        snprintf(parent, sizeof parent, "%s", seen[i]);
        char *slash = strrchr(parent, '/');
        if (!slash) continue;
        *slash = 0;
        int p = index_of(parent);
        if (p < 0) continue;
        parents++;
        if (post ? p < i : p > i) bad++;
    }
    printf("%s order: %s (%d checked)\n", section, bad ? "broken" : "ok", parents);
    forget_seen();
}

static void show(const char *path, const struct stat *st, int flag, struct FTW *f) {
    if (seen_count < 256) seen[seen_count++] = strdup(path);
    printf("%s %s %s level=%d base=%s", section, kind(flag), rel(path), f->level, path + f->base);
    if (flag == FTW_F || flag == FTW_SL || flag == FTW_SLN) printf(" size=%lld", (long long)st->st_size);
    if (flag == FTW_SL || flag == FTW_SLN) printf(" link=%d", S_ISLNK(st->st_mode));
    printf("\n");
}

static int visit(const char *path, const struct stat *st, int flag, struct FTW *f) {
    show(path, st, flag, f);
    return FTW_CONTINUE;
}

// FTW_CHDIR: where the function runs, and whether the last name is found from there.
static int visit_chdir(const char *path, const struct stat *st, int flag, struct FTW *f) {
    show(path, st, flag, f);
    char cwd[4096];
    struct stat here;
    printf("%s cwd %s: %s, %s found=%d\n", section, kind(flag), rel(path), getcwd(cwd, sizeof cwd) ? rel(cwd) : "?",
           lstat(path + f->base, &here) == 0);
    return FTW_CONTINUE;
}

// FTW_ACTIONRETVAL: skip the subtree of "skip", and the siblings of sib's first entry.
static int visit_skipping(const char *path, const struct stat *st, int flag, struct FTW *f) {
    const char *name = path + f->base;
    if (strstr(path, "/sib/")) {
        printf("%s %s sib/? level=%d\n", section, kind(flag), f->level);
        return FTW_SKIP_SIBLINGS;
    }
    show(path, st, flag, f);
    if (flag == FTW_D && !strcmp(name, "skip")) return FTW_SKIP_SUBTREE;
    return FTW_CONTINUE;
}

static int calls_after_stop, stopped, stop_value;

static int visit_stopping(const char *path, const struct stat *st, int flag, struct FTW *f) {
    (void)path, (void)st, (void)f;
    if (stopped) calls_after_stop++;
    if (flag == FTW_F && !stopped) {
        stopped = 1;
        return stop_value;
    }
    return 0;
}

static int visit_ftw(const char *path, const struct stat *st, int flag) {
    printf("%s %s %s", section, kind(flag), rel(path));
    if (flag == FTW_F) printf(" size=%lld", (long long)st->st_size);
    printf("\n");
    return 0;
}

static int visit_ftw64(const char *path, const struct stat64 *st, int flag) {
    return visit_ftw(path, (const struct stat *)st, flag);
}

static int no_dots(const struct dirent *e) { return e->d_name[0] != '.'; }

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void print_list(const char *what, int n, struct dirent **list, int sort) {
    if (n < 0) {
        printf("%s: -1 %s\n", what, strerrorname_np(errno));
        return;
    }
    char **names = malloc(sizeof(char *) * (n ? n : 1));
    for (int i = 0; i < n; i++) names[i] = list[i]->d_name;
    if (sort) qsort(names, n, sizeof(char *), by_name);
    printf("%s: %d:", what, n);
    for (int i = 0; i < n; i++) printf(" %s", names[i]);
    printf("\n");
    for (int i = 0; i < n; i++) free(list[i]);
    free(list);
    free(names);
}

#define LIST(what, call, sort) do { int n_ = (call); print_list(what, n_, list, sort); } while (0)

static void walk(const char *name, const char *path, int (*fn)(const char *, const struct stat *, int, struct FTW *), int flags) {
    section = name;
    int rc = nftw(path, fn, 4, flags);
    printf("%s returned %d%s%s\n", name, rc, rc < 0 ? " " : "", rc < 0 ? strerrorname_np(errno) : "");
}

static void path_of(char *out, const char *name) { snprintf(out, 4096, "%s/%s", top, name); }

static void dents(int fd, size_t size) {
    char buf[4096] __attribute__((aligned(8)));
    char *names[64];
    int n = 0, calls = 0, shapes_ok = 1;
    long long offs[64];
    for (;;) {
        ssize_t got = getdents64(fd, buf, size);
        if (got < 0) {
            printf("getdents64 %zu: -1 %s\n", size, strerrorname_np(errno));
            return;
        }
        if (got == 0) break;
        calls++;
        for (ssize_t at = 0; at < got;) {
            struct dirent64 *d = (struct dirent64 *)(buf + at);
            if (d->d_reclen % 8 || d->d_reclen < 19 + strlen(d->d_name) + 1) shapes_ok = 0;
            if (n < 64) {
                offs[n] = d->d_off;
                names[n] = malloc(300);
                snprintf(names[n], 300, "%.255s:%d", d->d_name, d->d_type);
                n++;
            }
            at += d->d_reclen;
        }
    }
    // Resuming from the second record's d_off reads the third record first.
    char third[300], resumed[300] = "";
    snprintf(third, sizeof third, "%s", n > 2 ? names[2] : "");
    long long second_off = n > 1 ? offs[1] : 0;
    qsort(names, n, sizeof(char *), by_name);
    printf("getdents64 %zu: %d records, %s calls, records %s:", size, n, calls > 1 ? "several" : "one", shapes_ok ? "aligned" : "misshapen");
    for (int i = 0; i < n; i++) printf(" %s", names[i]), free(names[i]);
    printf("\n");
    printf("getdents64 %zu: at the end %zd\n", size, getdents64(fd, buf, size));
    if (lseek(fd, second_off, SEEK_SET) == second_off && getdents64(fd, buf, sizeof buf) > 0)
        snprintf(resumed, sizeof resumed, "%.255s:%d", ((struct dirent64 *)buf)->d_name, ((struct dirent64 *)buf)->d_type);
    printf("getdents64 %zu: resume at d_off %s\n", size, strcmp(third, resumed) ? "wrong" : "ok");
    printf("getdents64 %zu: rewind %lld\n", size, (long long)lseek(fd, 0, SEEK_SET));
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    top = argv[1];
    top_len = strlen(top);
    setvbuf(stdout, NULL, _IOLBF, 0);
    char t[4096], p[4096];
    path_of(t, "t");

    // scandir: a filter and alphasort; no filter and no sort; errors; scandirat.
    struct dirent **list;
    int n = scandir(t, &list, no_dots, alphasort);
    if (n >= 0) {
        printf("scandir alphasort %d:", n);
        for (int i = 0; i < n; i++) printf(" %s:%d", list[i]->d_name, list[i]->d_type);
        printf("\n");
        for (int i = 0; i < n; i++) free(list[i]);
        free(list);
    } else
        printf("scandir alphasort: -1 %s\n", strerrorname_np(errno));
    LIST("scandir all", scandir(t, &list, NULL, NULL), 1);
    path_of(p, "t/sub");
    LIST("scandir64 sub", scandir64(p, (struct dirent64 ***)&list, NULL, alphasort64), 0);
    path_of(p, "t/empty");
    LIST("scandir empty", scandir(p, &list, no_dots, alphasort), 0);
    path_of(p, "t/a.txt");
    LIST("scandir file", scandir(p, &list, NULL, NULL), 0);
    path_of(p, "t/missing");
    LIST("scandir missing", scandir(p, &list, NULL, NULL), 0);
    int tfd = open(t, O_RDONLY | O_DIRECTORY);
    LIST("scandirat sub", scandirat(tfd, "sub", &list, no_dots, alphasort), 0);
    LIST("scandirat dirlink", scandirat(tfd, "dirlink", &list, no_dots, alphasort), 0);
    close(tfd);

    // nftw: post-order without following symlinks; pre-order following them; skips; stops.
    walk("phys-depth", t, visit, FTW_PHYS | FTW_DEPTH);
    check_order(1);
    walk("follow", t, visit, 0);
    check_order(0);
    walk("mount-phys", t, visit, FTW_MOUNT | FTW_PHYS);
    forget_seen();
    walk("skipping", t, visit_skipping, FTW_ACTIONRETVAL | FTW_PHYS);
    check_order(0);
    stop_value = FTW_STOP;
    walk("stop", t, visit_stopping, FTW_ACTIONRETVAL);
    printf("stop: calls after %d\n", calls_after_stop);
    stopped = calls_after_stop = 0;
    stop_value = 42;
    walk("value", t, visit_stopping, FTW_PHYS);
    printf("value: calls after %d\n", calls_after_stop);
    path_of(p, "t/a.txt");
    walk("file", p, visit, 0);
    path_of(p, "t/dangling");
    walk("dangling", p, visit, 0);
    walk("dangling-phys", p, visit, FTW_PHYS);
    path_of(p, "t/missing");
    walk("missing", p, visit, 0);
    walk("bad-flags", t, visit, 1 << 10);

    // FTW_CHDIR, from an absolute and from relative starting points; the working directory
    // is back where it was afterwards.
    char before[4096], after[4096];
    getcwd(before, sizeof before);
    walk("chdir", t, visit_chdir, FTW_CHDIR | FTW_PHYS);
    forget_seen();
    walk("chdir-depth", t, visit_chdir, FTW_CHDIR | FTW_PHYS | FTW_DEPTH);
    forget_seen();
    getcwd(after, sizeof after);
    printf("chdir: working directory %s\n", strcmp(before, after) ? "moved" : "restored");
    if (chdir(top) != 0) return 3;
    walk("relative", "t/sub/", visit, FTW_PHYS);
    walk("relative-chdir", "t", visit_chdir, FTW_PHYS | FTW_CHDIR);
    forget_seen();
    if (chdir("t") != 0) return 3;
    walk("dot-chdir", ".", visit_chdir, FTW_PHYS | FTW_CHDIR | FTW_DEPTH);
    forget_seen();
    getcwd(after, sizeof after);
    printf("dot-chdir: working directory %s\n", rel(after));

    // ftw: symlinks followed, ftw's typeflags.
    section = "ftw";
    printf("ftw returned %d\n", ftw(t, visit_ftw, 2));
    section = "ftw64";
    printf("ftw64 returned %d\n", ftw64(t, visit_ftw64, 2));

    // getdents64: a buffer of a record or two, then a large one; too small; on a file.
    int fd = open(t, O_RDONLY | O_DIRECTORY);
    dents(fd, 64);
    dents(fd, 4096); // after the rewind: everything again
    char tiny[8];
    ssize_t got = getdents64(fd, tiny, sizeof tiny);
    printf("getdents64 tiny: %zd %s\n", got, strerrorname_np(errno));
    close(fd);
    path_of(p, "t/a.txt");
    fd = open(p, O_RDONLY);
    char buf[512];
    got = getdents64(fd, buf, sizeof buf);
    printf("getdents64 file: %zd %s\n", got, strerrorname_np(errno));
    close(fd);
    return 0;
}
"##;

/// scandir, nftw, ftw and getdents64 on a mapped tree answer exactly as on a local directory
/// (glibc's own scandir and nftw reach mapped paths through internal calls the shim cannot
/// see, and failed with ENOENT), and find (gnulib's fts) walks it alike.
#[test]
fn directory_walks_on_a_mapped_tree_answer_as_on_a_local_directory() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    let program = compile_c(&shim.local, "walks", WALKS_PROGRAM);
    // The local directory by its canonical path: getcwd answers with that one (FTW_CHDIR).
    let plain = shim.local.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let plain = std::fs::canonicalize(plain).unwrap();
    // Sorted lines of a command run under the library (unmapped paths pass through it).
    let sorted = |program: &Path, args: &[&str], dir: &Path| {
        let output = shim.command(program.to_str().unwrap()).args(args).arg(dir).current_dir(&shim.local).output().unwrap();
        assert!(output.status.success(), "{} on {}: {}", program.display(), dir.display(), String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8_lossy(&output.stdout).replace(dir.to_str().unwrap(), "D");
        let mut lines: Vec<String> = stdout.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    for dir in [&plain, &shim.root] {
        sorted(Path::new("sh"), &["-c", WALK_TREE, "tree"], dir);
    }
    let local = sorted(&program, &[], &plain);
    let mapped = sorted(&program, &[], &shim.root);
    // What the program sees on a real filesystem, so that equal answers mean something.
    for line in [
        "scandir alphasort 9: a.txt:8 b.txt:8 dangling:10 dirlink:10 empty:4 filelink:10 sib:4 skip:4 sub:4",
        "scandir all: 12: . .. .hidden a.txt b.txt dangling dirlink empty filelink sib skip sub",
        "scandirat dirlink: 1: o.txt",
        "scandir missing: -1 ENOENT",
        "phys-depth DP t level=0 base=t",
        "phys-depth SL t/dirlink level=1 base=dirlink size=8 link=1",
        "phys-depth order: ok (19 checked)",
        "follow F t/dirlink/o.txt level=2 base=o.txt size=5",
        "follow SLN t/dangling level=1 base=dangling size=7 link=1",
        "follow order: ok (20 checked)",
        "skipping D t/skip level=1 base=skip",
        "skipping F sib/? level=2",
        "stop returned 1",
        "stop: calls after 0",
        "value returned 42",
        "chdir cwd F: t/sub/deeper/d.txt, t/sub/deeper found=1",
        "chdir-depth cwd DP: t/sub, t/sub found=0",
        "chdir: working directory restored",
        "relative D t/sub level=0 base=sub",
        "dot-chdir: working directory t",
        "ftw NS t/dangling",
        "ftw64 F t/filelink size=5",
        "getdents64 64: 12 records, several calls, records aligned: ..:4 .:4 .hidden:8 a.txt:8 b.txt:8 dangling:10 dirlink:10 empty:4 filelink:10 sib:4 skip:4 sub:4",
        "getdents64 4096: resume at d_off ok",
        "getdents64 tiny: -1 EINVAL",
        "getdents64 file: -1 ENOTDIR",
    ] {
        assert!(local.iter().any(|l| l == line), "{line:?} is not in the local run:\n{}", local.join("\n"));
    }
    assert!(!local.iter().any(|l| l.starts_with("skipping F t/skip/")), "FTW_SKIP_SUBTREE skips: {local:?}");
    let only = |a: &[String], b: &[String]| a.iter().filter(|l| !b.contains(l)).cloned().collect::<Vec<_>>();
    assert_eq!(mapped, local, "only on the volume: {:?}\nonly local: {:?}", only(&mapped, &local), only(&local, &mapped));
    // find walks with fts (openat, fdopendir, fstatat): the shim's hooks already serve it.
    for (options, args) in
        [(&[][..], &["-printf", "%y %d %P %l\n"][..]), (&["-L"], &["-printf", "%y %d %P %l\n"]), (&[], &["-type", "f", "-printf", "%P %s\n"])]
    {
        let find = |dir: &Path| {
            let output = shim.command("find").args(options).arg(dir.join("t")).args(args).output().unwrap();
            assert!(output.status.success(), "find {options:?} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
            let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        let local = find(&plain);
        assert!(local.len() >= 10, "find {options:?} {args:?} lists the tree: {local:?}");
        assert_eq!(find(&shim.root), local, "find {options:?} {args:?}");
    }
}

/// tail -f follows a file another process appends to through the shim.
#[test]
fn tail_follows_appends_of_another_process() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    shim.sh_ok(r#"mkdir -p "$ROOT" && echo first > "$ROOT/log""#);
    let mut tail = shim.command("tail").arg("-f").arg(shim.root.join("log")).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    shim.sh_ok(r#"echo second >> "$ROOT/log"; echo third >> "$ROOT/log""#);
    std::thread::sleep(Duration::from_millis(2500));
    tail.kill().unwrap();
    let output = tail.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "first\nsecond\nthird\n");
}

/// sqlite3 with a busy timeout, as applications set one: a killed process's locks last until
/// its lease session ends (5 s), as an NFS client's do.
fn sqlite(shim: &Shim, db: &Path, sql: &str) -> String {
    let output = shim.command("sqlite3").args(["-cmd", ".timeout 15000"]).arg(db).arg(sql).output().expect("sqlite3 runs (./dev test installs it)");
    assert!(output.status.success(), "sqlite3 {sql:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The sqlite3 CLI in rollback-journal modes and in WAL mode with exclusive locking keeps
/// every committed transaction through kill -9 mid-transaction; shared-memory WAL is refused
/// with a clear error (a writable shared mapping); Python's sqlite3 module works too.
#[test]
fn sqlite_under_the_shim_keeps_committed_rows_through_kill() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    shim.sh_ok(r#"mkdir -p "$ROOT""#);
    for (mode, pragma) in [
        ("delete", "PRAGMA journal_mode=delete;"),
        ("truncate", "PRAGMA journal_mode=truncate;"),
        ("persist", "PRAGMA journal_mode=persist;"),
        ("wal", "PRAGMA locking_mode=exclusive; PRAGMA journal_mode=wal;"),
    ] {
        let db = shim.root.join(format!("bank-{mode}.db"));
        sqlite(&shim, &db, &format!("{pragma} CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL); CREATE TABLE log(n INTEGER);"));
        sqlite(
            &shim,
            &db,
            &format!("{pragma} WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<100) INSERT INTO accounts SELECT i, 1000 FROM c;"),
        );
        for n in 0..10 {
            let (from, to) = (n % 100 + 1, (n * 7) % 100 + 1);
            sqlite(&shim, &db, &format!("{pragma} BEGIN; UPDATE accounts SET balance=balance-10 WHERE id={from}; UPDATE accounts SET balance=balance+10 WHERE id={to}; INSERT INTO log VALUES({n}); COMMIT;"));
        }
        assert_eq!(sqlite(&shim, &db, &format!("{pragma} SELECT sum(balance), count(*) FROM accounts;")).lines().last().unwrap(), "100000|100");
        let child = shim.command("sqlite3").arg(&db).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        kill_sqlite_mid_transaction(child, pragma);
        let check = sqlite(&shim, &db, &format!("{pragma} PRAGMA integrity_check; SELECT sum(balance) FROM accounts; SELECT count(*) FROM log WHERE n < 1000000; SELECT count(*) FROM log WHERE n >= 1000000;"));
        let last: Vec<&str> = check.lines().rev().take(4).collect();
        assert_eq!(last, ["0", "10", "100000", "ok"], "{mode}: integrity, the total, every committed row, no uncommitted one: {check}");
    }
    // WAL with shared memory needs a writable MAP_SHARED mapping of the -shm file: refused.
    let output = shim.command("sqlite3").arg(shim.root.join("shared-wal.db")).arg("PRAGMA journal_mode=wal; CREATE TABLE t(a);").output().unwrap();
    assert!(!output.status.success(), "shared-memory WAL cannot work under the shim");
    assert!(String::from_utf8_lossy(&output.stderr).contains("MAP_SHARED mapping of"), "{}", String::from_utf8_lossy(&output.stderr));
    // Python's sqlite3 module.
    let script = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nc.execute('create table t(a integer primary key, b text)')\nwith c:\n    c.executemany('insert into t(b) values(?)', [('x'*100,)]*500)\nprint(c.execute('select count(*), sum(length(b)) from t').fetchone(), c.execute('pragma integrity_check').fetchone()[0])";
    let output = shim.command("python3").args(["-c", script]).arg(shim.root.join("py.db")).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "(500, 50000) ok");
}

const JAVA_PROGRAM: &str = r#"
import java.io.*;
import java.nio.ByteBuffer;
import java.nio.channels.*;
import java.nio.file.*;

public class ShimJava {
    public static void main(String[] args) throws Exception {
        Path dir = Paths.get(args[0]);
        Files.createDirectories(dir);
        Path journal = dir.resolve("journal.dat");
        try (RandomAccessFile raf = new RandomAccessFile(journal.toFile(), "rw")) {
            for (int i = 0; i < 100; i++) {
                raf.seek(raf.length());
                raf.write(("record " + i + "\n").getBytes());
            }
            raf.getFD().sync();
        }
        try (FileChannel ch = FileChannel.open(journal, StandardOpenOption.WRITE, StandardOpenOption.APPEND)) {
            FileLock lock = ch.lock();
            ch.write(ByteBuffer.wrap("locked append\n".getBytes()));
            ch.force(true);
            System.out.println("locked " + lock.isValid());
            lock.release();
        }
        Path tmp = dir.resolve("state.tmp");
        Files.write(tmp, "state 42\n".getBytes());
        Files.move(tmp, dir.resolve("state"), StandardCopyOption.ATOMIC_MOVE);
        System.out.println(Files.readAllLines(journal).size() + " lines, " + Files.size(journal) + " bytes");
        System.out.println(Files.readString(dir.resolve("state")).trim() + ", tmp exists: " + Files.exists(tmp));
    }
}
"#;

/// A Java program on openjdk-17 runs unmodified under the shim: RandomAccessFile,
/// FileChannel.write/force/lock, Files.move with ATOMIC_MOVE; a chunkfs mount of the volume
/// then shows what it wrote.
#[test]
fn a_java_program_runs_unmodified_under_the_shim() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    let source = shim.local.join("ShimJava.java");
    std::fs::write(&source, JAVA_PROGRAM).unwrap();
    let output = shim.command("java").arg(&source).arg(shim.root.join("java")).output().expect("java runs (./dev test installs openjdk-17)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "locked true\n101 lines, 1004 bytes\nstate 42, tmp exists: false\n");
    let mount = Mount::new(&shim.data, "shim", &shim.local.join("mnt"), &[]);
    let journal = std::fs::read_to_string(mount.path.join("java/journal.dat")).unwrap();
    assert!(journal.starts_with("record 0\nrecord 1\n") && journal.ends_with("record 99\nlocked append\n"), "{journal}");
    assert_eq!(std::fs::read_to_string(mount.path.join("java/state")).unwrap(), "state 42\n");
}

const THREADS_AND_FORKS: &str = r#"
import os, sys, threading, subprocess, fcntl, errno
root = sys.argv[1]
os.makedirs(root, exist_ok=True)
# Threads write their own regions of one file through one descriptor.
fd = os.open(os.path.join(root, "threads.dat"), os.O_RDWR | os.O_CREAT, 0o644)
def worker(t):
    for i in range(50):
        os.pwrite(fd, bytes([65 + t]) * 512, (t * 50 + i) * 512)
threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
for t in threads: t.start()
for t in threads: t.join()
os.fsync(fd)
data = os.pread(fd, 8 * 50 * 512, 0)
assert all(data[(t * 50 + i) * 512:(t * 50 + i + 1) * 512] == bytes([65 + t]) * 512 for t in range(8) for i in range(50)), "thread regions"
# The parent holds a POSIX lock; a forked child (its own process, its own lease session)
# cannot take it, and writes its own file and appends to a shared one.
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
shared = os.open(os.path.join(root, "shared.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
children = []
for c in range(4):
    pid = os.fork()
    if pid == 0:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os._exit(3)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os._exit(4)
        with open(os.path.join(root, "child-%d" % c), "w") as f:
            f.write("child %d\n" % c * 100)
        for i in range(20):
            os.write(shared, b"%d:%02d\n" % (c, i))
        os.fsync(shared)
        os._exit(0)
    children.append(pid)
for pid in children:
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, "child exit %d" % os.WEXITSTATUS(status)
# A child that only execs.
assert subprocess.run(["true"]).returncode == 0
os.write(shared, b"parent\n")
lines = open(os.path.join(root, "shared.log")).read().splitlines()
assert len(lines) == 81 and lines[-1] == "parent", lines
assert sorted(lines[:-1]) == sorted("%d:%02d" % (c, i) for c in range(4) for i in range(20)), "appends from 4 processes interleave whole"
for c in range(4):
    assert open(os.path.join(root, "child-%d" % c)).read() == "child %d\n" % c * 100
# The parent's offset and its descriptors still work after the children.
os.lseek(fd, 0, os.SEEK_SET)
assert os.read(fd, 3) == b"AAA"
os.close(fd)
print("ok")
"#;

/// Eight threads writing through one descriptor, four forked children with their own
/// sessions (locks held by the parent are not theirs), O_APPEND from several processes, and
/// a child that only execs.
#[test]
fn threads_and_forked_children_write_through_the_shim() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    let output = shim.command("python3").args(["-c", THREADS_AND_FORKS]).arg(shim.root.join("tf")).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
}

/// A volume reads the same through the shim and through a chunkfs mount, both ways.
#[test]
fn a_volume_reads_the_same_through_the_shim_and_a_mount() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    let payload: Vec<u8> = (0..2_500_000u32).map(|i| (i.wrapping_mul(7919) >> 5) as u8).collect();
    std::fs::write(shim.local.join("payload"), &payload).unwrap();
    shim.sh_ok(r#"mkdir -p "$ROOT/in/deep" && cp "$LOCAL/payload" "$ROOT/in/deep/p" && echo tiny > "$ROOT/in/t""#);
    let mount = Mount::new(&shim.data, "shim", &shim.local.join("mnt"), &[]);
    assert_eq!(std::fs::read(mount.path.join("in/deep/p")).unwrap(), payload, "the mount reads what the shim wrote");
    assert_eq!(std::fs::read_to_string(mount.path.join("in/t")).unwrap(), "tiny\n");
    let reversed: Vec<u8> = payload.iter().rev().copied().collect();
    std::fs::write(mount.path.join("from-mount"), &reversed).unwrap();
    std::fs::write(shim.local.join("reversed"), &reversed).unwrap();
    assert_eq!(shim.sh_ok(r#"cmp "$LOCAL/reversed" "$ROOT/from-mount" && echo same"#).trim(), "same", "the shim reads what the mount wrote");
}

/// A bad configuration is one line on stderr and exit status 1 before main; no mapping: the
/// library does nothing; an unreachable cluster fails mapped calls with EIO, not the process.
#[test]
fn configuration_errors_stop_before_main_and_no_mapping_does_nothing() {
    let library = binary("libchunkpreload.so");
    let run = |env: &[(&str, &str)]| {
        let mut command = Command::new("sh");
        command.args(["-c", "echo main ran"]).env("LD_PRELOAD", &library).env_remove("CHUNKSTORE_MAP").env_remove("CHUNKSTORE_SEEDS");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    for (env, says) in [
        (vec![("CHUNKSTORE_MAP", "relative=vol"), ("CHUNKSTORE_SEEDS", "127.0.0.1:1")], "must be an absolute path"),
        (vec![("CHUNKSTORE_MAP", "/data=vol")], "no cluster is named"),
        (vec![("CHUNKSTORE_MAP", "/data"), ("CHUNKSTORE_SEEDS", "127.0.0.1:1")], "is not PREFIX=VOLUME"),
        (vec![("CHUNKSTORE_MAP", "/data=a/b"), ("CHUNKSTORE_SEEDS", "127.0.0.1:1")], "volume name"),
        (vec![("CHUNKSTORE_MAP", "/data=vol"), ("CHUNKSTORE_SEEDS", "127.0.0.1:1"), ("CHUNKSTORE_LEASE_MS", "soon")], "is not a number"),
        (vec![("CHUNKSTORE_CONFIG", "/nonexistent/shim.toml")], "CHUNKSTORE_CONFIG"),
    ] {
        let output = run(&env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{env:?}: {stderr}");
        assert!(output.stdout.is_empty(), "main never ran: {env:?}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains("libchunkpreload: bad configuration") && stderr.contains(says), "{env:?}: {stderr}");
    }
    let output = run(&[]);
    assert_eq!((output.status.code(), String::from_utf8_lossy(&output.stdout).trim()), (Some(0), "main ran"));
    assert!(output.stderr.is_empty());
    // A TOML file works like the environment.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shim.toml");
    std::fs::write(&config, "seeds = [\"127.0.0.1:1\"]\nmap = { \"/data\" = \"vol\" }\nrequest_timeout_ms = 300\n").unwrap();
    let config = config.to_str().unwrap();
    // Nothing answers at 127.0.0.1:1: the mapped call fails (EIO), the process goes on.
    let mut command = Command::new("sh");
    command.args(["-c", "cat /data/x; echo \"status $?\"; echo unmapped > \"$0/f\" && cat \"$0/f\"", dir.path().to_str().unwrap()]);
    let output = command.env("LD_PRELOAD", &library).env("CHUNKSTORE_CONFIG", config).env_remove("CHUNKSTORE_MAP").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout, "status 1\nunmapped\n", "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Input/output error"), "{}", String::from_utf8_lossy(&output.stderr));
}

/// Negative control for `chunkcheck files --via preload`: its writer refuses a file the shim
/// does not serve (started without the library, it would write a local file no one checks).
#[test]
fn the_journal_writer_refuses_a_file_the_shim_does_not_serve() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("journal");
    let output = Command::new(binary("chunkcheck"))
        .args(["files-journal-writer", "--sync", "fdatasync", "--seed", "1", "--writer", "0", "--on-preload", "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("is not served by libchunkpreload"), "{}", String::from_utf8_lossy(&output.stdout));
}

/// `chunkctl bench fs` runs the journal, O_DSYNC append and random-read jobs under the shim
/// too, in the same run as chunkfs and local ext4, and reports them (the figures themselves
/// are BENCHMARKS.md's).
#[test]
fn bench_fs_measures_the_shim_beside_chunkfs() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    let output = chunkstore_tests::local::chunkctl(&shim.data, &["bench", "fs", "--seconds", "0.5", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = chunkstore_tests::last_json_line(&output);
    for field in ["shim_journal_1_vs_chunkfs", "shim_journal_1_p50_vs_kv_put_p50", "kv_one_client_put_p50_us"] {
        assert!(report[field].as_f64().is_some_and(|v| v > 0.0), "{field} in {report}");
    }
    let results = report["results"].as_array().unwrap();
    for (job, under_shim) in [("journal", true), ("dsync-append", true), ("random-read", true), ("sequential-write", false)] {
        let result = results.iter().find(|r| r["job"] == job && r["jobs"] == 1).unwrap_or_else(|| panic!("no {job} in {report}"));
        assert_eq!(result["shim_iops"].as_f64().is_some_and(|v| v > 0.0), under_shim, "{job}: {result}");
    }
}

const HELD_WRITES: &str = r#"
import os, sys
root, step = sys.argv[1], sys.argv[2]
path = lambda name: os.path.join(root, name)
if step == "write":
    os.makedirs(root, exist_ok=True)
    fd = os.open(path("synced"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"A" * 1000)
    os.fsync(fd)
    os.write(fd, b"B" * 1000)
    closed = os.open(path("closed"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(closed, b"C" * 1000)
    os.close(closed)
    kept = os.open(path("at-exit"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(kept, b"D" * 1000)
    if os.fork() == 0:
        os._exit(0)  # a child's exit commits nothing of the parent's
    os.wait()
    crash = os.fork()
    if crash == 0:
        os.write(fd, b"E" * 1000)
        os._exit(0)  # no atexit: as a crash
    os.wait()
    os._exit(0)  # the parent crashes too: "synced" keeps only what fsync committed
if step == "write-and-exit":
    kept = os.open(path("at-exit"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(kept, b"D" * 1000)
    sys.exit(0)  # a normal exit commits it
print(os.stat(path("synced")).st_size, os.stat(path("closed")).st_size, os.stat(path("at-exit")).st_size)
"#;

/// `CHUNKSTORE_DURABILITY=fsync`: writes wait in memory until fsync, close or a normal exit;
/// what a process that dies without them held is lost, as in a crash, and nothing else.
#[test]
fn fsync_durability_commits_at_fsync_close_and_exit() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    let root = shim.root.join("held");
    let run = |step: &str| {
        let output = shim.command("python3").env("CHUNKSTORE_DURABILITY", "fsync").args(["-c", HELD_WRITES]).arg(&root).arg(step).output().unwrap();
        assert!(output.status.success(), "{step}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    run("write");
    assert_eq!(run("check"), "1000 1000 0", "fsync and close committed; the crashed process's held writes are gone");
    run("write-and-exit");
    assert_eq!(run("check"), "1000 1000 1000", "a normal exit commits what was held");
}

/// Compiles a C program of the test into `dir/NAME` (with the system's cc: ./dev installs gcc).
fn compile_c(dir: &Path, name: &str, source: &str) -> PathBuf {
    let source_path = dir.join(format!("{name}.c"));
    std::fs::write(&source_path, source).unwrap();
    let program = dir.join(name);
    let compiled = Command::new("cc").args(["-O1", "-Wall", "-o"]).arg(&program).arg(&source_path).output().expect("cc runs (./dev installs gcc)");
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
    program
}

/// freopen onto mapped paths: stdout ("w", then "a"), stderr and stdin take the mapped file
/// (printf, write(1, ...) and fgets all reach it); another stream is refused with ENOTSUP.
const FREOPEN_PROGRAM: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *out = argv[1], *err = argv[2], *other = argv[3];
    if (!freopen(out, "w", stdout)) { perror("freopen stdout w"); return 1; }
    printf("one by printf\n");
    fflush(stdout);
    if (write(1, "two by write\n", 13) != 13) { perror("write"); return 1; }
    if (!freopen(out, "a", stdout)) { perror("freopen stdout a"); return 1; }
    fprintf(stdout, "three appended\n");
    fflush(stdout);
    if (!freopen(err, "w", stderr)) { perror("freopen stderr"); return 1; }
    fprintf(stderr, "to stderr\n");
    if (!freopen(out, "r", stdin)) { fprintf(stderr, "freopen stdin: %s\n", strerror(errno)); return 1; }
    char line[100];
    int lines = 0;
    while (fgets(line, sizeof line, stdin)) lines++;
    fprintf(stderr, "stdin lines: %d\n", lines);
    FILE *f = fopen(other, "w");
    if (!f) { fprintf(stderr, "fopen other: %s\n", strerror(errno)); return 1; }
    FILE *g = freopen(out, "w", f);
    fprintf(stderr, "other stream: %s\n", g ? "reopened" : strerror(errno));
    return 0;
}
"#;

#[test]
fn freopen_onto_a_mapped_path_serves_the_standard_streams() {
    let shim = Shim::new();
    let _down = Down(&shim.data);
    let program = compile_c(&shim.local, "freopen", FREOPEN_PROGRAM);
    let run = |dir: &Path| {
        let output =
            shim.command(program.to_str().unwrap()).args([dir.join("out"), dir.join("err"), shim.local.join("other")]).stdout(Stdio::null()).output().unwrap();
        assert!(output.status.success(), "{}: {}", dir.display(), String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    // On a local directory first: what glibc's freopen does.
    let plain = shim.local.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let stderr_plain = run(&plain);
    assert_eq!(std::fs::read_to_string(plain.join("out")).unwrap(), "", "the last freopen (\"w\") truncated it: {stderr_plain}");
    assert_eq!(std::fs::read_to_string(plain.join("err")).unwrap(), "to stderr\nstdin lines: 3\nother stream: reopened\n");
    // On the mapped path: the same files, except that another stream is refused.
    shim.sh_ok(r#"mkdir -p "$ROOT/f""#);
    let stderr_mapped = run(&shim.root.join("f"));
    assert_eq!(stderr_mapped, "", "everything went to the files");
    let out = shim.sh_ok(r#"cat "$ROOT/f/out""#);
    assert_eq!(out, "one by printf\ntwo by write\nthree appended\n", "stdout's writes reached the mapped file");
    // The library's own line about the refused stream goes to standard error: the mapped file.
    let err = shim.sh_ok(r#"cat "$ROOT/f/err""#);
    assert_eq!(
        err,
        "to stderr\nstdin lines: 3\nlibchunkpreload: freopen onto a mapped path works for stdin, stdout and stderr only (ENOTSUP)\nother stream: Operation not supported\n"
    );
}

/// A program that unlinks a file and goes on using it (a temporary file's usual life).
const UNLINKED_BUT_OPEN: &str = r#"
import os, sys, time
path, hold = sys.argv[1], float(sys.argv[2])
data = bytes(((i * 7919) >> 5) & 0xff for i in range(100000))
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, data)
os.fsync(fd)
os.unlink(path)
print("unlinked", flush=True)
time.sleep(hold)
os.lseek(fd, 0, 0)
back = b""
while len(back) < len(data):
    piece = os.read(fd, len(data) - len(back))
    if not piece:
        break
    back += piece
print("same" if back == data else "differs: %d bytes, %d zero" % (len(back), back.count(0)), flush=True)
"#;

/// A file unlinked while a process under the shim holds it open keeps its data for as long
/// as the process holds it, past the orphan grace period, with a chunkfs mount of the volume
/// reaping orphans beside it (the mount frees what nobody renewed for 30 s: the shim renews
/// what it holds). Negative control (run by hand, VALIDATION.md): without the shim's reaper
/// thread the program reads zeros back.
#[test]
fn a_file_unlinked_while_open_under_the_shim_keeps_its_data() {
    use std::io::BufRead;
    let shim = Shim::new();
    let _down = Down(&shim.data);
    let hold = (chunkfiles::ORPHAN_GRACE_NS / 1_000_000_000) as u64 + 3 * chunkfiles::ORPHAN_REAP_PERIOD.as_secs();
    let mut program =
        shim.command("python3").args(["-c", UNLINKED_BUT_OPEN]).arg(shim.root.join("held")).arg(hold.to_string()).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(program.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "unlinked");
    let mount = Mount::new(&shim.data, "shim", &shim.local.join("mnt"), &[]);
    assert!(!mount.path.join("held").exists(), "the name is gone");
    assert_eq!(lines.next().unwrap().unwrap(), "same", "the unlinked file's data, read after {hold} s");
    assert!(program.wait().unwrap().success());
}
