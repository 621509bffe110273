//! Processes and cgroups, read from /proc and /sys: the facts holdfast needs
//! to account for every descendant of every worker (issue 11, item 2).
//!
//! A worker's process group is not its tree: a child that calls `setsid()`
//! (a daemonised helper, a double fork) leaves it. Two mechanisms catch such
//! processes, and this module provides the OS half of both; deciding what to
//! do with them is the supervisor's.
//!
//! - **A cgroup per worker**, where holdfast may create cgroups: cgroup v2,
//!   in a directory delegated to it (systemd's `Delegate=yes`). The child
//!   moves itself into its [`WorkerCgroup`] before exec (see
//!   `sys::ExecPlan::cgroup_procs`), so nothing it ever forks can leave; the
//!   kernel lists every member and `cgroup.kill` ends them all at once.
//!   holdfast itself stays in its own cgroup and only creates children,
//!   without enabling controllers: cgroup v2's "no internal processes" rule
//!   only binds a cgroup whose `cgroup.subtree_control` enables domain
//!   controllers, so a cgroup holding holdfast may still have children.
//! - **Subreaper adoption**, everywhere: holdfast is its workers' child
//!   subreaper, so a descendant whose parent died is re-parented to it.
//!   [`adopted`] lists those, with the facts the supervisor uses to attribute
//!   each to a worker (its session and group, the worker serial in its
//!   environment, the worker cgroup it is in).
//!
//! Also the one parser of `/proc/PID/stat` ([`stat`]).
//!
//! Everything here is blocking file I/O on procfs and cgroupfs (each call is
//! microseconds, but still a syscall per file): the edge runs it off its event
//! loop or on a tick, never per datagram. A process that vanishes between
//! listing and reading is normal and left out.
//!
//! What a worker's event costs here must not grow with the number of
//! workers or of processes on the machine: a tree is walked down from its
//! root through the kernel's children lists ([`descendants`]), never by
//! listing all of /proc (only [`parents`], for a whole-table answer such as
//! `holdfast status`, and the fallback of a kernel without children files,
//! do). Every open of a /proc file or directory is counted ([`reads`],
//! [`counting`]), so a test can assert that cost.

pub mod cgroup;
pub mod memory;
pub mod net;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;

pub use cgroup::{cgroup_v2_path, parse_cgroup2_mounts, Cgroup2Mount, Cgroups, WorkerCgroup};

/// The environment variable that carries each worker's unique serial (a `u64`
/// in decimal). The spawn code sets it; [`adopted`] reads it back from
/// `/proc/PID/environ` of processes that left the worker's tree.
pub const SERIAL_VAR: &str = "HOLDFAST_WORKER_SERIAL";

/// The fields of `/proc/PID/stat` (proc(5)) that holdfast uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    /// The command name (at most 15 bytes; may contain spaces and parentheses).
    pub comm: String,
    /// `R`, `S`, `D`, `Z` (zombie), `T`, `t`, `X` (dead), ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub num_threads: i64,
    /// When the process started, in clock ticks after boot: with the pid, it
    /// tells a process from a later one that reused the pid.
    pub starttime: u64,
}

impl Stat {
    /// Whether the process has exited (a zombie waiting to be reaped, or dead).
    pub(crate) fn is_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

static READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    static THREAD_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts one open of a /proc file, directory or link.
fn count_read() {
    READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    THREAD_READS.with(|c| c.set(c.get() + 1));
}

/// Opens of /proc files, directories and links by this process so far.
pub fn reads() -> u64 {
    READS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs `f` and returns what it returned with the /proc opens it made on
/// this thread (other threads' reads meanwhile are not counted).
pub fn counting<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = THREAD_READS.with(std::cell::Cell::get);
    let out = f();
    (out, THREAD_READS.with(std::cell::Cell::get) - before)
}

/// A /proc (or cgroupfs) file as text. The kernel prints command names and
/// paths as the bytes they are, so a file may hold bytes that are not UTF-8:
/// they become U+FFFD instead of failing the whole read (one process named
/// in Latin-1, or one socket path anywhere on the host, would otherwise hide
/// a process or a whole table).
pub(crate) fn read_text(path: impl AsRef<std::path::Path>) -> std::io::Result<String> {
    let bytes = fs::read(path)?;
    Ok(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// `/proc/PID/stat` of `pid`, or `None` if it is gone (or unreadable).
pub fn stat(pid: i32) -> Option<Stat> {
    count_read();
    parse_stat(&read_text(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses a `/proc/PID/stat` line. The command name may contain spaces and
/// `)`, so the fields are read after the *last* `)`.
#[doc(hidden)]
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    // Fields 3.. of proc(5), so field N is at index N - 3.
    let f: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let mut state = f.first()?.chars();
    let (Some(state), None) = (state.next(), state.next()) else {
        return None;
    };
    Some(Stat {
        pid,
        comm,
        state,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
        num_threads: f.get(17)?.parse().ok()?,
        starttime: f.get(19)?.parse().ok()?,
    })
}

/// The children of `pid`: the union of `/proc/PID/task/*/children` (a child
/// belongs to the thread that forked it, and an orphan is re-parented to some
/// thread of its subreaper). `None` when the kernel has no children files
/// (CONFIG_PROC_CHILDREN) or `pid` is gone. Racy by nature: a child forked or
/// reaped meanwhile may be missed or listed.
pub fn children(pid: i32) -> Option<Vec<i32>> {
    count_read();
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut found = false;
    let mut out = BTreeSet::new();
    for task in tasks.flatten() {
        count_read();
        let Ok(list) = fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        found = true;
        out.extend(parse_children(&list));
    }
    found.then(|| out.into_iter().collect())
}

/// The pids of a `/proc/PID/task/TID/children` file (space-separated);
/// anything that is not a pid is skipped.
#[doc(hidden)]
pub fn parse_children(list: &str) -> impl Iterator<Item = i32> + '_ {
    // Only pids: 0 or a negative number ("-0", "-1") given to kill(2) would
    // signal a process group or every process.
    list.split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .filter(|&p| p > 0)
}

/// The children of `pid` found by one pass over every `/proc/*/stat`: the
/// fallback when [`children`] has no children files. Costs one read per
/// process on the machine.
pub fn children_by_scan(pid: i32) -> Vec<i32> {
    count_read();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| stat(p).is_some_and(|s| s.ppid == pid))
        .collect();
    out.sort_unstable();
    out
}

/// The value of `name` in an environment block (`/proc/PID/environ`: entries
/// separated by NUL), the first if it occurs twice, as getenv(3) would.
#[doc(hidden)]
pub fn env_value<'a>(environ: &'a [u8], name: &str) -> Option<&'a [u8]> {
    environ.split(|&b| b == 0).find_map(|entry| {
        entry
            .strip_prefix(name.as_bytes())?
            .strip_prefix(b"=".as_slice())
    })
}

/// [`SERIAL_VAR`] in an environment block, if present and a `u64`.
#[doc(hidden)]
pub fn parse_serial(environ: &[u8]) -> Option<u64> {
    std::str::from_utf8(env_value(environ, SERIAL_VAR)?)
        .ok()?
        .parse()
        .ok()
}

/// [`SERIAL_VAR`] of `pid`, from `/proc/PID/environ`: the environment it was
/// exec'd with (a process may overwrite that memory, and a program exec'd
/// with a cleaned environment has none). `None` if absent or unreadable
/// (another user's process, a zombie).
pub fn serial(pid: i32) -> Option<u64> {
    count_read();
    parse_serial(&fs::read(format!("/proc/{pid}/environ")).ok()?)
}

/// A process re-parented to holdfast, with the facts that attribute it to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Adopted {
    pub pid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// [`SERIAL_VAR`] from /proc/PID/environ, if readable and present.
    pub serial: Option<u64>,
    /// The serial of the worker cgroup it is in, when it is in one of ours.
    pub cgroup_serial: Option<u64>,
    pub comm: String,
}

/// holdfast's own live children that are not in `is_worker` (which must
/// answer true for every pid holdfast started itself and has not reaped yet):
/// descendants re-parented to holdfast because their parent died (setsid
/// daemons, double forks, group members of an exited worker). Zombies are left
/// out: they are already dead, and the reaper collects them.
///
/// Each listed pid stays this very process until holdfast reaps it (holdfast
/// is its parent, so the pid cannot be reused before): signal it only while
/// the reaper has not reported it.
///
/// Cheap: it reads `/proc/self/task/*/children` (every thread's: an orphan is
/// re-parented to some thread of its subreaper), then stat, environ and
/// (with `cgroups`) cgroup of each adopted process only. Without children
/// files it scans /proc once. Blocking.
pub fn adopted(is_worker: impl Fn(i32) -> bool, cgroups: Option<&Cgroups>) -> Vec<Adopted> {
    let me = std::process::id() as i32;
    let kids = children(me).unwrap_or_else(|| children_by_scan(me));
    kids.into_iter()
        .filter(|&pid| !is_worker(pid))
        .filter_map(|pid| {
            let st = stat(pid)?;
            // Re-checked: it may have been reaped and the pid reused since the listing.
            if st.ppid != me || st.is_exited() {
                return None;
            }
            Some(Adopted {
                pid,
                pgid: st.pgrp,
                sid: st.session,
                serial: serial(pid),
                cgroup_serial: cgroups.and_then(|c| c.serial_of(pid)),
                comm: st.comm,
            })
        })
        .collect()
}

/// The process group and parent of `pid` (from /proc/PID/stat), if it still exists.
pub(crate) fn pgrp_and_parent(pid: i32) -> Option<(i32, i32)> {
    stat(pid).map(|s| (s.pgrp, s.ppid))
}

/// `pid` and its parents, nearest first: at most `depth` pids, one stat
/// read each, ending before pid 1 and before `stop` (holdfast itself: nothing
/// above it is a worker) or where a parent is gone.
pub(crate) fn ancestors(pid: i32, depth: usize, stop: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut p = pid;
    while out.len() < depth && p > 1 && p != stop {
        out.push(p);
        match stat(p) {
            Some(s) => p = s.ppid,
            None => break,
        }
    }
    out
}

// ---------------------------------------------------------------- trees --
/// All live pids with their parent, from one pass over /proc: one read per
/// process on the machine, for answers about every worker at once.
pub fn parents() -> HashMap<i32, i32> {
    count_read();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| stat(pid).map(|s| (pid, s.ppid)))
        .collect()
}

/// `root` and every descendant of it, root first, walked down through the
/// kernel's children lists ([`children`]): reads in proportion to the tree,
/// not to the machine. Without children files (a kernel without
/// CONFIG_PROC_CHILDREN) it falls back to one pass over /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let Some(first) = children(root) else {
        return descendants_in(root, &parents());
    };
    let mut out = vec![root];
    let mut seen: HashSet<i32> = HashSet::from([root]);
    let mut next = first;
    // A pid reused inside the tree while it is read could make a cycle; `seen` ends it.
    while let Some(pid) = next.pop() {
        if !seen.insert(pid) {
            continue;
        }
        out.push(pid);
        next.extend(children(pid).unwrap_or_default());
    }
    out
}

/// Like [`descendants`], over a parent map already read.
pub(crate) fn descendants_in(root: i32, parents: &HashMap<i32, i32>) -> Vec<i32> {
    descendants_of(root, &children_map(parents))
}

/// Each pid's children, from a parent map: built once for many trees.
pub(crate) fn children_map(parents: &HashMap<i32, i32>) -> HashMap<i32, Vec<i32>> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    children
}

/// `root` and every descendant of it, root first, over a [`children_map`].
pub(crate) fn descendants_of(root: i32, children: &HashMap<i32, Vec<i32>>) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// Socket inodes held open by `pid` (from the `socket:[N]` links in /proc/PID/fd).
pub(crate) fn process_socket_inodes(pid: i32) -> HashSet<u64> {
    count_read();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        count_read();
        let link = std::fs::read_link(e.ok()?.path()).ok()?;
        let s = link.to_str()?;
        s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// Socket inodes held by `root` or any of its descendants.
pub fn socket_inodes(root: i32) -> HashSet<u64> {
    descendants(root)
        .into_iter()
        .flat_map(process_socket_inodes)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_line(comm: &str) -> String {
        format!(
            "4242 ({comm}) S 1 4240 4239 0 -1 4194560 100 0 0 0 3 1 0 0 20 0 7 0 123456 \
             12345678 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
        )
    }

    #[test]
    fn stat_fields() {
        let s = parse_stat(&stat_line("puma 6.4.2 (app)")).expect("parses");
        assert_eq!(
            s,
            Stat {
                pid: 4242,
                comm: "puma 6.4.2 (app)".into(),
                state: 'S',
                ppid: 1,
                pgrp: 4240,
                session: 4239,
                num_threads: 7,
                starttime: 123456,
            }
        );
        assert!(!s.is_exited());
    }

    #[test]
    fn stat_comm_with_parens_spaces_and_a_fake_state() {
        // A name crafted to look like the rest of the line.
        let s = parse_stat(&stat_line(") Z 9 9 9 (")).expect("parses");
        assert_eq!(s.comm, ") Z 9 9 9 (");
        assert_eq!((s.state, s.ppid, s.pgrp, s.session), ('S', 1, 4240, 4239));
        let s = parse_stat(&stat_line("a b)")).expect("parses");
        assert_eq!(s.comm, "a b)");
        assert_eq!(
            parse_stat(&stat_line("")).map(|s| s.comm),
            Some(String::new())
        );
    }

    #[test]
    fn stat_zombie_and_garbage() {
        let z = stat_line("x").replacen(") S ", ") Z ", 1);
        assert!(parse_stat(&z).expect("parses").is_exited());
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_stat("12 x S 1 2 3"), None);
    }

    /// Found by tests/fuzz (proc_children_list): "-0" (and "0", "-1")
    /// parsed as pids.
    #[test]
    fn a_children_list_gives_only_pids() {
        let got: Vec<i32> = parse_children("-0\t12 0 -1 +7 x 2147483648 3\n").collect();
        assert_eq!(got, vec![12, 7, 3]);
    }

    /// A process whose name is not UTF-8 (here "sl\xe9ep", Latin-1) was
    /// invisible: /proc/PID/stat and /proc/PID/status print the name as its
    /// bytes, `read_to_string` refused the whole file, and `stat` said the
    /// process was gone (so an adopted daemon of that name was never
    /// stopped) and its memory was never read. Arbitrary file contents in
    /// tests/fuzz (procfs.rs) are what the readers must take.
    #[test]
    fn a_process_whose_name_is_not_utf8_is_seen() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join(std::ffi::OsStr::from_bytes(b"sl\xe9ep"));
        fs::copy("/bin/sleep", &exe).expect("copy sleep");
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).expect("chmod");
        // Another test's fork may briefly hold the copy's write fd (ETXTBSY).
        let mut tries = 0;
        let mut child = loop {
            match std::process::Command::new(&exe).arg("30").spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("spawn {}: {e}", exe.display()),
            }
        };
        let pid = child.id() as i32;
        let seen = stat(pid);
        let rss = crate::os::proc::memory::read_usage(pid, crate::config::Metric::Rss);
        let _ = child.kill();
        let _ = child.wait();
        let seen = seen.expect("the process is seen");
        assert_eq!(seen.comm, "sl\u{fffd}ep");
        assert_eq!(seen.ppid, std::process::id() as i32);
        assert!(rss.is_some_and(|u| u.rss > 0), "{rss:?}");
    }

    #[test]
    fn own_stat() {
        let me = std::process::id() as i32;
        let s = stat(me).expect("own stat");
        assert_eq!(s.pid, me);
        assert_eq!(s.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw());
        assert!(s.num_threads >= 1);
    }

    #[test]
    fn serial_from_environ() {
        assert_eq!(
            parse_serial(b"HOLDFAST_WORKER_SERIAL=7\0PATH=/bin\0"),
            Some(7)
        );
        assert_eq!(
            parse_serial(b"PATH=/bin\0HOLDFAST_WORKER_SERIAL=18446744073709551615\0HOME=/\0"),
            Some(u64::MAX)
        );
        // At the end, with and without the final NUL.
        assert_eq!(
            parse_serial(b"PATH=/bin\0HOLDFAST_WORKER_SERIAL=12\0"),
            Some(12)
        );
        assert_eq!(
            parse_serial(b"PATH=/bin\0HOLDFAST_WORKER_SERIAL=12"),
            Some(12)
        );
        // Absent, a longer name, a bad value, empty.
        assert_eq!(parse_serial(b"PATH=/bin\0HOME=/\0"), None);
        assert_eq!(
            parse_serial(b"HOLDFAST_WORKER_SERIALS=3\0X_HOLDFAST_WORKER_SERIAL=4\0"),
            None
        );
        assert_eq!(parse_serial(b"HOLDFAST_WORKER_SERIAL=x\0"), None);
        assert_eq!(parse_serial(b"HOLDFAST_WORKER_SERIAL=\0"), None);
        assert_eq!(parse_serial(b""), None);
        // The first of two, as getenv(3) reads it.
        assert_eq!(
            parse_serial(b"HOLDFAST_WORKER_SERIAL=1\0HOLDFAST_WORKER_SERIAL=2\0"),
            Some(1)
        );
        // A value containing '=' and non-UTF-8 neighbours.
        assert_eq!(
            env_value(b"\xff\xfe\0A=b=c\0", "A"),
            Some(b"b=c".as_slice())
        );
    }

    #[test]
    fn own_pid_has_a_group_and_parent() {
        let me = std::process::id() as i32;
        let (_, parent) = pgrp_and_parent(me).expect("own stat");
        // Itself, then its parent, nearest first; nothing at or above `stop`.
        let (chain, reads) = counting(|| ancestors(me, 32, parent));
        assert_eq!(chain, vec![me]);
        assert_eq!(reads, 1);
        assert_eq!(ancestors(me, 0, parent), Vec::<i32>::new());
    }

    #[test]
    fn descendants_walk_the_tree_not_the_machine() {
        // sh → sleep: a grandchild found through the children lists.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read the grandchild's pid");
        let grandchild: i32 = line.trim().parse().expect("a pid");
        let pid = child.id() as i32;
        let (tree, reads) = counting(|| descendants(pid));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(grandchild),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(tree, vec![pid, grandchild]);
        // Two processes of one thread each: a task listing and a children
        // file per process, whatever else runs on the machine.
        assert_eq!(reads, 4);
    }

    #[test]
    fn own_children_are_listed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id() as i32;
        let pid = child.id() as i32;
        let listed = children(me).expect("children files (CONFIG_PROC_CHILDREN)");
        let scanned = children_by_scan(me);
        let _ = child.kill();
        let _ = child.wait();
        assert!(listed.contains(&pid), "{listed:?}");
        assert!(scanned.contains(&pid), "{scanned:?}");
    }
}
