//! Worker cgroups (cgroup v2, delegated to holdfast): finding holdfast's
//! own cgroup and whether it may create children, creating one cgroup per
//! worker, listing, killing and removing it. Every file read here is
//! blocking I/O on cgroupfs and /proc.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

/// The name of worker `serial`'s cgroup, below holdfast's own.
const WORKER_PREFIX: &str = "worker-";

/// The xattrs systemd's system manager sets to "1" on the cgroup of a unit
/// with `Delegate=yes` (`src/core/cgroup.c:cgroup_delegate_xattr_apply()`;
/// a user manager sets neither), read in the order of systemd's own
/// `cg_is_delegated()`: `trusted.` first, then `user.`, the one a process
/// without CAP_SYS_ADMIN can read.
const DELEGATE_XATTRS: [&str; 2] = ["trusted.delegate", "user.delegate"];

/// The cgroup v2 path (`0::PATH`) in a `/proc/PID/cgroup` text, relative to
/// the reader's cgroup namespace. `None` on a cgroup-v1-only host.
#[doc(hidden)]
pub fn parse_cgroup_v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
}

/// The cgroup v2 path of `pid` (see [`parse_cgroup_v2_path`]).
pub fn cgroup_v2_path(pid: i32) -> Option<String> {
    let text = super::read_text(format!("/proc/{pid}/cgroup")).ok()?;
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
#[doc(hidden)]
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
#[doc(hidden)]
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
        let own =
            super::read_text("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
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
        let mountinfo = super::read_text("/proc/self/mountinfo")
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
                procs: Some(procs),
                removed: false,
            }),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(with_dir("open cgroup.procs of", e))
            }
        }
    }

    /// What an upgrade hands over.
    pub fn record(&self) -> CgroupRecord {
        CgroupRecord {
            dir: self.dir.clone(),
            path: self.path.clone(),
            serial: 0,
        }
    }

    /// The delegated cgroup a previous image detected, as it was (holdfast
    /// never moves out of it, and the exec keeps the process in it).
    pub fn adopt(r: CgroupRecord) -> Cgroups {
        Cgroups {
            dir: r.dir,
            path: r.path,
        }
    }

    /// The cgroup of worker `serial` if it exists (an upgrade's fallback
    /// finds the previous image's workers' cgroups by their serials).
    pub fn existing_worker(&self, serial: u64) -> Option<WorkerCgroup> {
        let name = format!("{WORKER_PREFIX}{serial}");
        let dir = self.dir.join(&name);
        dir.is_dir().then(|| {
            WorkerCgroup::adopt(CgroupRecord {
                path: format!("{}/{name}", self.path.trim_end_matches('/')),
                dir,
                serial,
            })
        })
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
                procs: Some(procs),
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
    pub(crate) fn serial_of(&self, pid: i32) -> Option<u64> {
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
    /// `cgroup.procs`, O_WRONLY | O_CLOEXEC; `None` for the cgroup of a
    /// worker adopted from a previous image (it is never spawned into again).
    procs: Option<File>,
    removed: bool,
}

/// A [`Cgroups`] or [`WorkerCgroup`] as an in-place upgrade hands it over:
/// the directory and the cgroup path (nothing is open).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupRecord {
    pub dir: PathBuf,
    pub path: String,
    /// The worker's serial; 0 for holdfast's own cgroup.
    pub serial: u64,
}

impl WorkerCgroup {
    /// The cgroup as /proc/PID/cgroup names it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The worker's serial (the cgroup's name is `worker-<serial>`).
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `cgroup.procs`, opened for writing (close-on-exec): the child writes
    /// "0" to it between fork and exec. Borrowed: this cgroup keeps it open.
    /// `None` for an adopted worker's cgroup.
    pub fn procs_fd(&self) -> Option<BorrowedFd<'_>> {
        self.procs.as_ref().map(|f| f.as_fd())
    }

    /// What an upgrade hands over.
    pub fn record(&self) -> CgroupRecord {
        CgroupRecord {
            dir: self.dir.clone(),
            path: self.path.clone(),
            serial: self.serial,
        }
    }

    /// The cgroup of a worker a previous image started (it exists: its
    /// worker is alive in it). Nothing is created or opened.
    pub fn adopt(r: CgroupRecord) -> WorkerCgroup {
        WorkerCgroup {
            dir: r.dir,
            path: r.path,
            serial: r.serial,
            procs: None,
            removed: false,
        }
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
        match crate::os::sys::pidfd_open(pid) {
            Ok(fd) => {
                // The pidfd pins this process: if it is a member now, the
                // signal can only reach it.
                if member(pid) {
                    let _ = crate::os::sys::pidfd_send_signal(&fd, Signal::SIGKILL);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
