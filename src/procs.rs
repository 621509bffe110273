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

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

/// The environment variable that carries each worker's unique serial (a `u64`
/// in decimal). The spawn code sets it; [`adopted`] reads it back from
/// `/proc/PID/environ` of processes that left the worker's tree.
pub const SERIAL_VAR: &str = "HOLDFAST_WORKER_SERIAL";

/// The name of worker `serial`'s cgroup, below holdfast's own.
const WORKER_PREFIX: &str = "worker-";

/// The xattrs systemd's system manager sets to "1" on the cgroup of a unit
/// with `Delegate=yes` (`src/core/cgroup.c:cgroup_delegate_xattr_apply()`;
/// a user manager sets neither), read in the order of systemd's own
/// `cg_is_delegated()`: `trusted.` first, then `user.`, the one a process
/// without CAP_SYS_ADMIN can read.
const DELEGATE_XATTRS: [&str; 2] = ["trusted.delegate", "user.delegate"];

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
    pub fn is_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// `/proc/PID/stat` of `pid`, or `None` if it is gone (or unreadable).
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses a `/proc/PID/stat` line. The command name may contain spaces and
/// `)`, so the fields are read after the *last* `)`.
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
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut found = false;
    let mut out = BTreeSet::new();
    for task in tasks.flatten() {
        let Ok(list) = fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        found = true;
        out.extend(
            list.split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    found.then(|| out.into_iter().collect())
}

/// The children of `pid` found by one pass over every `/proc/*/stat`: the
/// fallback when [`children`] has no children files. Costs one read per
/// process on the machine.
pub fn children_by_scan(pid: i32) -> Vec<i32> {
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
pub fn env_value<'a>(environ: &'a [u8], name: &str) -> Option<&'a [u8]> {
    environ.split(|&b| b == 0).find_map(|entry| {
        entry
            .strip_prefix(name.as_bytes())?
            .strip_prefix(b"=".as_slice())
    })
}

/// [`SERIAL_VAR`] in an environment block, if present and a `u64`.
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
    parse_serial(&fs::read(format!("/proc/{pid}/environ")).ok()?)
}

/// The cgroup v2 path (`0::PATH`) in a `/proc/PID/cgroup` text, relative to
/// the reader's cgroup namespace. `None` on a cgroup-v1-only host.
pub fn parse_cgroup_v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
}

/// The cgroup v2 path of `pid` (see [`parse_cgroup_v2_path`]).
pub fn cgroup_v2_path(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    parse_cgroup_v2_path(&text).map(str::to_string)
}

/// One cgroup2 mount from `/proc/self/mountinfo`: the path inside the
/// hierarchy that is mounted (`root`, "/" unless a subtree is bind-mounted)
/// and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub root: String,
    pub mount_point: PathBuf,
}

/// Every cgroup2 mount in a `/proc/PID/mountinfo` text (proc(5): fields up
/// to the optional ones, then `-`, the filesystem type, the source, the
/// super options; paths with `\NNN` octal escapes).
pub fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let f: Vec<&str> = left.split_whitespace().collect();
            Some(Cgroup2Mount {
                root: unescape_octal(f.get(3)?),
                mount_point: PathBuf::from(unescape_octal(f.get(4)?)),
            })
        })
        .collect()
}

/// Undoes mountinfo's `\NNN` escapes (space, tab, newline, backslash).
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|c| (b'0'..=b'7').contains(c))
                .then(|| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
        });
        match (b[i], octal.and_then(|n| u8::try_from(n).ok())) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` (as /proc/PID/cgroup shows it) under the
/// cgroup2 mount that contains it: of the mounts whose root is an ancestor
/// of `path`, the one with the longest root, the first listed on a tie.
pub fn cgroup_dir(path: &str, mounts: &[Cgroup2Mount]) -> Option<PathBuf> {
    let under = |root: &str| -> Option<String> {
        let root = root.trim_end_matches('/');
        let rest = path.strip_prefix(root)?;
        (rest.is_empty() || rest.starts_with('/')).then(|| rest.trim_start_matches('/').into())
    };
    let mut best: Option<(&Cgroup2Mount, String)> = None;
    for m in mounts {
        if let Some(rest) = under(&m.root) {
            if best
                .as_ref()
                .map_or(true, |(b, _)| m.root.len() > b.root.len())
            {
                best = Some((m, rest));
            }
        }
    }
    best.map(|(m, rest)| {
        if rest.is_empty() {
            m.mount_point.clone()
        } else {
            m.mount_point.join(rest)
        }
    })
}

/// The serial of the worker cgroup that `path` (a process's cgroup path) is
/// in, when it is at or below `own/worker-N`.
pub fn worker_serial_in(own: &str, path: &str) -> Option<u64> {
    let rest = if own == "/" {
        path.strip_prefix('/')?
    } else {
        path.strip_prefix(own)?.strip_prefix('/')?
    };
    let name = rest.split('/').next()?;
    let digits = name.strip_prefix(WORKER_PREFIX)?;
    // "worker-007" is not ours: we only create canonical decimal names.
    (!digits.starts_with('0') || digits == "0")
        .then(|| digits.parse().ok())
        .flatten()
}

/// Whether an xattr value means "yes", as systemd's `parse_boolean()` reads it.
fn xattr_true(value: &[u8]) -> bool {
    let v = String::from_utf8_lossy(value);
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "yes" | "y" | "true" | "t" | "on"
    )
}

/// Whether `dir` carries a delegation xattr set to a true value: `Ok(Some(name))`
/// naming it, `Ok(None)` when neither is set (or readable: `trusted.` needs
/// CAP_SYS_ADMIN).
fn delegation_xattr(dir: &Path) -> io::Result<Option<&'static str>> {
    for name in DELEGATE_XATTRS {
        let mut buf = [0u8; 16];
        match rustix::fs::getxattr(dir, name, &mut buf[..]) {
            Ok(n) if xattr_true(&buf[..n]) => return Ok(Some(name)),
            Ok(_) => {}
            // Absent, not readable by us, a value longer than any boolean, or
            // no xattrs on this filesystem: not this one.
            Err(e)
                if [
                    rustix::io::Errno::NODATA,
                    rustix::io::Errno::PERM,
                    rustix::io::Errno::ACCESS,
                    rustix::io::Errno::RANGE,
                    rustix::io::Errno::OPNOTSUPP,
                ]
                .contains(&e) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(None)
}

/// holdfast's own cgroup v2 directory, delegated to it: where it creates one
/// child cgroup per worker. It never writes the attributes of this directory
/// itself (they belong to whoever delegated it, usually systemd), and never
/// moves itself out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    /// The directory, e.g. `/sys/fs/cgroup/system.slice/holdfast.service`.
    dir: PathBuf,
    /// The same cgroup as `/proc/PID/cgroup` names it, e.g.
    /// `/system.slice/holdfast.service`.
    path: String,
}

impl Cgroups {
    /// holdfast's own cgroup v2 directory, from the `0::PATH` line of
    /// `/proc/self/cgroup` and the cgroup2 mount in `/proc/self/mountinfo`
    /// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host), if
    /// it is delegated to us: it carries the `trusted.delegate` (or
    /// `user.delegate`) xattr that systemd sets on a unit's cgroup with
    /// `Delegate=yes`, and we may write to it. Otherwise the reason, for one
    /// info log line; holdfast then accounts for escaped processes through
    /// [`adopted`] only.
    pub fn detect() -> Result<Cgroups, String> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let path = parse_cgroup_v2_path(&own)
            .ok_or("no cgroup v2 entry in /proc/self/cgroup (a cgroup v1 only host)")?;
        if path.ends_with(" (deleted)") {
            return Err(format!("holdfast's cgroup {path} was removed"));
        }
        if path == "/" {
            return Err(
                "holdfast runs in the root cgroup, which is never delegated \
                 (run it as a systemd service with Delegate=yes)"
                    .into(),
            );
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        let mounts = parse_cgroup2_mounts(&mountinfo);
        if mounts.is_empty() {
            return Err("no cgroup2 file system is mounted".into());
        }
        let dir = cgroup_dir(path, &mounts)
            .ok_or_else(|| format!("no cgroup2 mount contains holdfast's cgroup {path}"))?;
        match delegation_xattr(&dir) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(format!(
                    "{} is not delegated to holdfast (no trusted.delegate or user.delegate \
                     xattr: set Delegate=yes in its systemd unit)",
                    dir.display()
                ))
            }
            Err(e) => return Err(format!("{}: reading its xattrs: {e}", dir.display())),
        }
        nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).map_err(|e| {
            format!(
                "{} is delegated but holdfast cannot create cgroups in it: {e}",
                dir.display()
            )
        })?;
        Ok(Cgroups {
            dir,
            path: path.to_string(),
        })
    }

    /// The delegated directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup path of the delegated directory, as /proc/PID/cgroup shows it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Creates the cgroup of worker `serial` (`<dir>/worker-<serial>`) and
    /// opens its `cgroup.procs` for the child to move itself into (see
    /// `sys::ExecPlan::cgroup_procs`). An empty cgroup of that name left over
    /// from an earlier run is replaced; one with processes is an error.
    /// Controllers are not enabled: the cgroup is for containment, not limits.
    pub fn create(&self, serial: u64) -> io::Result<WorkerCgroup> {
        let name = format!("{WORKER_PREFIX}{serial}");
        let dir = self.dir.join(&name);
        let path = format!("{}/{name}", self.path.trim_end_matches('/'));
        let with_dir = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()))
        };
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // rmdir succeeds only when it is empty and has no children.
                fs::remove_dir(&dir).map_err(|e| with_dir("left over from an earlier run:", e))?;
                fs::create_dir(&dir).map_err(|e| with_dir("mkdir", e))?;
            }
            Err(e) => return Err(with_dir("mkdir", e)),
        }
        let procs = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("cgroup.procs"));
        match procs {
            Ok(procs) => Ok(WorkerCgroup {
                dir,
                path,
                serial,
                procs,
                removed: false,
            }),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(with_dir("open cgroup.procs of", e))
            }
        }
    }

    /// The `worker-N` cgroups already here when holdfast starts, left by an
    /// earlier holdfast of the same unit: under systemd with
    /// `KillMode=process`, a crashed or watchdog-killed holdfast's workers
    /// drain on after it (their parent-death signal is their drain signal).
    /// Empty ones are removed now; those with members are returned, in
    /// serial order, for the new holdfast to wait for and kill at a deadline.
    /// Nothing else below the directory is touched (systemd's `.control`,
    /// where ExecReload= runs, is not holdfast's).
    pub fn previous_workers(&self) -> Vec<WorkerCgroup> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(serial) = name
                .strip_prefix(WORKER_PREFIX)
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let dir = e.path();
            let Ok(procs) = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(dir.join("cgroup.procs"))
            else {
                continue;
            };
            let cg = WorkerCgroup {
                path: format!("{}/{name}", self.path.trim_end_matches('/')),
                dir,
                serial,
                procs,
                removed: false,
            };
            match cg.pids() {
                Ok(p) if p.is_empty() => {
                    let _ = cg.remove();
                }
                _ => found.push(cg),
            }
        }
        found.sort_by_key(|c| c.serial);
        found
    }

    /// The serial of the worker cgroup `pid` is in, if it is in one of ours.
    pub fn serial_of(&self, pid: i32) -> Option<u64> {
        worker_serial_in(&self.path, &cgroup_v2_path(pid)?)
    }
}

/// One worker's cgroup: every process the worker ever forks stays in it.
/// Dropping it removes the directory when it is empty (best effort);
/// [`WorkerCgroup::remove`] does the same and reports failure.
#[derive(Debug)]
pub struct WorkerCgroup {
    dir: PathBuf,
    /// As /proc/PID/cgroup names it.
    path: String,
    serial: u64,
    /// `cgroup.procs`, O_WRONLY | O_CLOEXEC.
    procs: File,
    removed: bool,
}

impl WorkerCgroup {
    /// The worker's serial (the cgroup's name is `worker-<serial>`).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup as /proc/PID/cgroup names it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `cgroup.procs`, opened for writing (close-on-exec): the child writes
    /// "0" to it between fork and exec. Borrowed: this cgroup keeps it open.
    pub fn procs_fd(&self) -> BorrowedFd<'_> {
        self.procs.as_fd()
    }

    /// Every live member: the processes in this cgroup and in any cgroup a
    /// (privileged) worker created below it. Exited processes (zombies) are
    /// not members.
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        let mut out = Vec::new();
        let mut dirs = vec![self.dir.clone()];
        while let Some(dir) = dirs.pop() {
            let text = match fs::read_to_string(dir.join("cgroup.procs")) {
                Ok(t) => t,
                // A sub-cgroup removed meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound && dir != self.dir => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}/cgroup.procs: {e}", dir.display()),
                    ))
                }
            };
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
            if let Ok(entries) = fs::read_dir(&dir) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// SIGKILL to every member, at once, through `cgroup.kill` (Linux ≥ 5.14:
    /// the kernel also catches processes forking meanwhile); on older kernels
    /// [`WorkerCgroup::kill_each`]. Returns when the signals are sent; the
    /// members are gone when [`WorkerCgroup::pids`] is empty.
    pub fn kill(&self) -> io::Result<()> {
        let path = self.dir.join("cgroup.kill");
        match OpenOptions::new().write(true).open(&path) {
            Ok(mut f) => f
                .write_all(b"1")
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.kill_each(),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    /// What [`WorkerCgroup::kill`] does without `cgroup.kill`: freezes the
    /// cgroup where `cgroup.freeze` exists (Linux ≥ 5.2; a frozen process
    /// cannot fork, and SIGKILL still ends it), then sends SIGKILL to each
    /// member through a pidfd taken while it is still a member, so a pid
    /// reused meanwhile is never hit; repeats while new members appear (at
    /// most 16 rounds). Public so that tests exercise it on kernels that have
    /// `cgroup.kill`.
    pub fn kill_each(&self) -> io::Result<()> {
        let _ = fs::write(self.dir.join("cgroup.freeze"), b"1");
        let mut signalled = BTreeSet::new();
        for _ in 0..16 {
            let fresh: Vec<i32> = self
                .pids()?
                .into_iter()
                .filter(|p| !signalled.contains(p))
                .collect();
            if fresh.is_empty() {
                break;
            }
            for pid in fresh {
                signalled.insert(pid);
                self.kill_member(pid);
            }
        }
        Ok(())
    }

    /// SIGKILL to `pid` if it is (still) a member. Gone is not an error.
    fn kill_member(&self, pid: i32) {
        let member = |pid| {
            cgroup_v2_path(pid).is_some_and(|p| {
                p.strip_prefix(self.path.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
        };
        match crate::sys::pidfd_open(pid) {
            Ok(fd) => {
                // The pidfd pins this process: if it is a member now, the
                // signal can only reach it.
                if member(pid) {
                    let _ = crate::sys::pidfd_send_signal(&fd, Signal::SIGKILL);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                // Kernels before 5.3: a narrow race with pid reuse remains.
                if member(pid) {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            Err(_) => {} // gone
        }
    }

    /// Removes the cgroup (rmdir). It must be empty: with processes left
    /// (EBUSY), the error names the directory. Wait for [`WorkerCgroup::pids`]
    /// to be empty first.
    pub fn remove(mut self) -> io::Result<()> {
        self.removed = true;
        fs::remove_dir(&self.dir).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                " (processes are left in it)"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("rmdir {}: {e}{hint}", self.dir.display()))
        })
    }
}

impl Drop for WorkerCgroup {
    fn drop(&mut self) {
        if !self.removed {
            // Only succeeds when empty: a populated cgroup is never lost track of by the kernel.
            let _ = fs::remove_dir(&self.dir);
        }
    }
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

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
36 31 0:33 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
";
    const UNIFIED: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn mountinfo_hybrid_and_unified() {
        assert_eq!(
            parse_cgroup2_mounts(HYBRID),
            vec![Cgroup2Mount {
                root: "/".into(),
                mount_point: "/sys/fs/cgroup/unified".into()
            }]
        );
        assert_eq!(
            parse_cgroup2_mounts(UNIFIED),
            vec![Cgroup2Mount {
                root: "/".into(),
                mount_point: "/sys/fs/cgroup".into()
            }]
        );
        // No optional fields, escaped spaces, and a v1-only host.
        let odd = "40 1 0:38 /a\\040b /mnt/c\\134g\\040x rw - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mounts(odd),
            vec![Cgroup2Mount {
                root: "/a b".into(),
                mount_point: "/mnt/c\\g x".into()
            }]
        );
        let v1 =
            "33 31 0:30 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd\n";
        assert!(parse_cgroup2_mounts(v1).is_empty());
        assert!(parse_cgroup2_mounts("garbage\n\n").is_empty());
    }

    #[test]
    fn proc_cgroup_variants() {
        let hybrid = "12:pids:/system.slice/holdfast.service\n1:name=systemd:/system.slice/holdfast.service\n0::/system.slice/holdfast.service\n";
        assert_eq!(
            parse_cgroup_v2_path(hybrid),
            Some("/system.slice/holdfast.service")
        );
        assert_eq!(parse_cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(parse_cgroup_v2_path("0::/a b/c\n"), Some("/a b/c"));
        // cgroup v1 only: no 0:: line; "10:cpu,cpuacct:/x" must not match.
        assert_eq!(
            parse_cgroup_v2_path("10:cpu,cpuacct:/x\n1:name=systemd:/x\n"),
            None
        );
        assert_eq!(parse_cgroup_v2_path(""), None);
        assert_eq!(
            parse_cgroup_v2_path("0::/gone (deleted)\n"),
            Some("/gone (deleted)")
        );
    }

    #[test]
    fn cgroup_dir_picks_the_containing_mount() {
        let mounts = parse_cgroup2_mounts(HYBRID);
        assert_eq!(
            cgroup_dir("/system.slice/holdfast.service", &mounts),
            Some(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/holdfast.service"
            ))
        );
        assert_eq!(
            cgroup_dir("/", &mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A bind mount of a subtree (a container's view).
        let sub = vec![
            Cgroup2Mount {
                root: "/".into(),
                mount_point: "/sys/fs/cgroup".into(),
            },
            Cgroup2Mount {
                root: "/machine.slice/c1".into(),
                mount_point: "/run/c1".into(),
            },
        ];
        assert_eq!(
            cgroup_dir("/machine.slice/c1/app", &sub),
            Some(PathBuf::from("/run/c1/app"))
        );
        assert_eq!(
            cgroup_dir("/machine.slice/c10", &sub),
            Some(PathBuf::from("/sys/fs/cgroup/machine.slice/c10"))
        );
        assert_eq!(cgroup_dir("/machine.slice/c10", &sub[1..]), None);
    }

    #[test]
    fn worker_serial_from_a_cgroup_path() {
        let own = "/system.slice/holdfast.service";
        assert_eq!(worker_serial_in(own, &format!("{own}/worker-7")), Some(7));
        assert_eq!(
            worker_serial_in(own, &format!("{own}/worker-7/inner")),
            Some(7)
        );
        assert_eq!(worker_serial_in(own, &format!("{own}/worker-0")), Some(0));
        assert_eq!(worker_serial_in(own, own), None);
        assert_eq!(worker_serial_in(own, &format!("{own}/.control")), None);
        assert_eq!(worker_serial_in(own, &format!("{own}/worker-x")), None);
        assert_eq!(worker_serial_in(own, &format!("{own}/worker-07")), None);
        assert_eq!(worker_serial_in(own, &format!("{own}x/worker-7")), None);
        assert_eq!(worker_serial_in(own, "/other/worker-7"), None);
        assert_eq!(worker_serial_in("/", "/worker-3"), Some(3));
    }

    #[test]
    fn xattr_booleans() {
        for yes in [&b"1"[..], b"yes", b"true", b"on", b"1\n"] {
            assert!(xattr_true(yes), "{yes:?}");
        }
        for no in [&b"0"[..], b"no", b"", b"2"] {
            assert!(!xattr_true(no), "{no:?}");
        }
    }

    #[test]
    fn octal_unescape() {
        assert_eq!(unescape_octal("a\\040b\\011c\\012d\\134"), "a b\tc\nd\\");
        assert_eq!(unescape_octal("\\9\\04"), "\\9\\04");
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
