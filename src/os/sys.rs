//! The only module with `unsafe`: fork/exec of a worker with an exact fd plan
//! (plus the fd flags of inherited sockets, the one `getsockopt(TCP_INFO)`
//! and the two pidfd calls that nix does not wrap).
//!
//! Everything the child needs is prepared before `fork()` (paths, argv, envp,
//! the fd table, a buffer for `LISTEN_PID`), because between fork and exec
//! only async-signal-safe calls are allowed: no allocation, no locks, no
//! logging. `LISTEN_PID` must be the worker's own pid (sd_listen_fds(3)), which
//! is only known in the child, so the child writes its pid into a buffer that
//! envp already points at. An exec failure is reported back over a CLOEXEC
//! pipe (EOF means exec succeeded), so a missing program is one clear error,
//! not a mystery exit 127. [`spawn`] returns right after fork; the caller
//! reads that report later through [`ExecReport`] (without blocking, e.g.
//! awaiting its fd's readability), so a slow exec never stalls the event loop.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

/// Why a spawn failed, naming the program and the step.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program of `command` (the file's, or the one after `--`).
    #[error("exec {program}: {reason} (the program of `command`)")]
    NotFound { program: String, reason: String },
    #[error("{stage} for {program}: {source}")]
    Child {
        program: String,
        stage: &'static str,
        source: io::Error,
    },
    #[error("fork for {program}: {source}")]
    Fork { program: String, source: io::Error },
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const PID_DIGITS: usize = 20;

/// What a child becomes. `fds[i]` becomes fd `3 + i`; `stdio` become 0, 1, 2.
/// Every other fd is closed in the child. The caller keeps ownership of all fds.
pub struct ExecPlan<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    /// `NAME=value` entries, without LISTEN_PID (see `listen_pid`).
    pub env: Vec<(String, String)>,
    /// Add `LISTEN_PID=<child pid>` to the environment.
    pub listen_pid: bool,
    pub cwd: Option<&'a Path>,
    pub stdio: [RawFd; 3],
    pub fds: &'a [RawFd],
    /// Sent to the child when holdfast dies (PR_SET_PDEATHSIG).
    pub parent_death_signal: nix::sys::signal::Signal,
    /// An fd of a cgroup's `cgroup.procs`, open for writing (see
    /// `procs::WorkerCgroup::procs_fd`): the child writes "0" to it, moving
    /// itself into that cgroup before exec, so everything it ever forks is
    /// there too. A failed write fails the spawn at stage "cgroup". The
    /// caller keeps ownership; the fd must stay open until `spawn` returns.
    pub cgroup_procs: Option<RawFd>,
}

/// A forked child: its pid, and the report of its exec still to be read.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub report: ExecReport,
}

/// The read end of a child's error pipe (O_NONBLOCK, close-on-exec). The
/// child writes 8 bytes (stage, errno) if a stage before exec fails, then
/// exits 127; the write end is close-on-exec, so EOF with nothing read means
/// exec succeeded (or the child was killed before it could report: its exit
/// status tells). Either way the child must still be reaped by the caller's
/// reaper. Dropping the report loses the outcome, nothing else.
#[derive(Debug)]
pub struct ExecReport {
    pipe: OwnedFd,
    program: String,
    buf: [u8; 8],
    len: usize,
}

impl ExecReport {
    /// Non-blocking: `None` = not known yet (the child has not exec'd or
    /// failed); `Some(Ok(()))` = exec succeeded (EOF); `Some(Err(e))` = the
    /// named stage failed. Once `Some`, every later call returns the same.
    pub fn poll(&mut self) -> Option<Result<(), SpawnError>> {
        loop {
            if self.len == self.buf.len() {
                return Some(Err(self.failure()));
            }
            match nix::unistd::read(&self.pipe, &mut self.buf[self.len..]) {
                Ok(0) if self.len == 0 => return Some(Ok(())),
                // The child writes its 8 bytes at once (PIPE_BUF makes that atomic);
                // a short report means it was killed mid-write.
                Ok(0) => {
                    return Some(Err(self.child_error(
                        "spawn",
                        io::Error::new(io::ErrorKind::UnexpectedEof, "truncated exec report"),
                    )))
                }
                Ok(n) => self.len += n,
                Err(nix::errno::Errno::EAGAIN) => return None,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Some(Err(self.child_error("report", e.into()))),
            }
        }
    }

    /// Blocking: waits for the outcome (for tests and one-shot tools; the
    /// event loop awaits the fd's readability and calls [`ExecReport::poll`]).
    pub fn wait(mut self) -> Result<(), SpawnError> {
        loop {
            if let Some(outcome) = self.poll() {
                return outcome;
            }
            let mut fds = [nix::poll::PollFd::new(
                self.pipe.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(self.child_error("report", e.into())),
            }
        }
    }

    /// The program being started, as the plan named it.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// What an in-place upgrade of holdfast hands over: the pipe's fd (it
    /// stays open across the exec), the program, and the bytes read so far.
    pub fn record(&self) -> (RawFd, String, Vec<u8>) {
        (
            self.pipe.as_raw_fd(),
            self.program.clone(),
            self.buf[..self.len].to_vec(),
        )
    }

    /// The report a previous image was waiting for, on its handed-over pipe.
    pub fn adopt(pipe: OwnedFd, program: String, read: &[u8]) -> ExecReport {
        let mut buf = [0u8; 8];
        let len = read.len().min(8);
        buf[..len].copy_from_slice(&read[..len]);
        ExecReport {
            pipe,
            program,
            buf,
            len,
        }
    }

    fn failure(&self) -> SpawnError {
        let b = self.buf;
        let stage = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let errno = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
        self.child_error(stage_name(stage), io::Error::from_raw_os_error(errno))
    }

    fn child_error(&self, stage: &'static str, source: io::Error) -> SpawnError {
        SpawnError::Child {
            program: self.program.clone(),
            stage,
            source,
        }
    }
}

impl AsFd for ExecReport {
    /// Readable once the outcome is known (data or EOF): for `AsyncFd`.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pipe.as_fd()
    }
}

/// Finds `program` the way execvp(3) would, in `path_var`, relative to `cwd`
/// when it contains a slash.
pub fn resolve(
    program: &str,
    path_var: Option<&OsStr>,
    cwd: Option<&Path>,
) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = match cwd {
            Some(c) if !program.starts_with('/') => c.join(program),
            _ => PathBuf::from(program),
        };
        return if executable(&p) {
            Ok(p)
        } else if p.exists() {
            Err(format!("{} is not an executable file", p.display()))
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(path_var) {
        let candidate = dir.join(program);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(format!(
        "not found in PATH ({})",
        path_var.to_string_lossy()
    ))
}

fn cstring(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in argument"))
}

/// Forks and execs `plan` (`path` is the resolved program); returns right
/// after fork with the child's pid and the [`ExecReport`] that tells later
/// whether exec succeeded. The child is its own process-group leader (and in
/// `plan.cgroup_procs`'s cgroup) before it execs. Errors before fork (a NUL
/// byte, no pipe) and a failed fork are returned here; the caller's fds are
/// only borrowed.
///
/// Memory: the child reads argv, envp, the fd plan and the `LISTEN_PID`
/// buffer between fork and exec, and this function frees them as soon as it
/// returns. That is sound because `fork()` (not `vfork()`) gives the child
/// its own copy-on-write copy of the whole address space: the parent's frees
/// and later writes touch only the parent's pages, and every pointer the
/// child holds refers to its own copy, which lives until exec replaces it.
pub fn spawn(plan: &ExecPlan<'_>, path: &Path) -> Result<Spawned, SpawnError> {
    let program = plan.program.to_string();
    let child_err = |stage, source| SpawnError::Child {
        program: program.clone(),
        stage,
        source,
    };

    // Everything the child touches, allocated here.
    let exe = cstring(path.as_os_str().as_bytes()).map_err(|e| child_err("argv", e))?;
    let argv: Vec<CString> = std::iter::once(plan.program)
        .chain(plan.args.iter().map(String::as_str))
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<_>>()
        .map_err(|e| child_err("argv", e))?;
    let mut envs: Vec<CString> = plan
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<_>>()
        .map_err(|e| child_err("env", e))?;
    let mut pid_buf = vec![0u8; LISTEN_PID_PREFIX.len() + PID_DIGITS + 1];
    pid_buf[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
    let pid_buf_ptr = pid_buf.as_mut_ptr();
    let cwd = plan
        .cwd
        .map(|c| cstring(c.as_os_str().as_bytes()))
        .transpose()
        .map_err(|e| child_err("cwd", e))?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = envs.iter_mut().map(|e| e.as_ptr()).collect();
    if plan.listen_pid {
        env_ptrs.push(pid_buf_ptr as *const libc::c_char);
    }
    env_ptrs.push(std::ptr::null());

    // Sources in target order: stdin, stdout, stderr, listeners...
    let sources: Vec<RawFd> = plan.stdio.iter().chain(plan.fds).copied().collect();
    let mut scratch: Vec<RawFd> = vec![-1; sources.len()];
    let scratch_ptr = scratch.as_mut_ptr();
    let first_free = sources.len() as RawFd; // fds 0..first_free are the plan
    let err_target = first_free; // the error pipe sits right above the plan
    let scratch_base = first_free + 1;

    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| child_err("pipe", e.into()))?;
    // Only the parent's end: the child's blocking write of 8 bytes into an
    // empty pipe cannot block anyway.
    nix::fcntl::fcntl(
        &err_r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .map_err(|e| child_err("pipe", e.into()))?;
    let err_w_raw = err_w.as_raw_fd();
    let parent = nix::unistd::getpid();
    let pdeath = plan.parent_death_signal as libc::c_int;

    // Every signal blocked across the fork: the child starts with
    // holdfast's handlers installed, and a signal it got before it reset them
    // (a drain signal sent right after the spawn) would run holdfast's
    // handler in the child and be lost. Blocked, it stays pending until the
    // child has reset every disposition to the default (as exec would).
    let mask = nix::sys::signal::SigSet::all()
        .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_SETMASK)
        .map_err(|e| child_err("sigprocmask", e.into()))?;
    // SAFETY: the child branch only calls async-signal-safe functions on
    // memory prepared above (no allocation, no locks, no logging) and ends in
    // execve or _exit; the parent branch is ordinary code.
    let fork = unsafe { nix::unistd::fork() };
    if !matches!(fork, Ok(nix::unistd::ForkResult::Child)) {
        // Back to the parent's own mask (the child sets its own).
        let _ = mask.thread_set_mask();
    }
    match fork {
        Ok(nix::unistd::ForkResult::Child) => {
            // SAFETY: see `child_after_fork`: async-signal-safe only; every
            // pointer refers to memory allocated before fork and still alive.
            unsafe {
                child_after_fork(ChildArgs {
                    exe: exe.as_ptr(),
                    argv: argv_ptrs.as_ptr(),
                    envp: env_ptrs.as_ptr(),
                    cwd: cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                    pid_digits: if plan.listen_pid {
                        pid_buf_ptr.add(LISTEN_PID_PREFIX.len())
                    } else {
                        std::ptr::null_mut()
                    },
                    sources: sources.as_ptr(),
                    scratch: scratch_ptr,
                    count: sources.len(),
                    scratch_base,
                    err_w: err_w_raw,
                    err_target,
                    parent: parent.as_raw(),
                    pdeath,
                    cgroup_procs: plan.cgroup_procs.unwrap_or(-1),
                })
            }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            // Its own process group at once, from this side too: a drain
            // signal to the group right after the spawn must reach it even
            // before the child's own setpgid ran (EACCES once it exec'd:
            // then it did).
            let _ = nix::unistd::setpgid(child, child);
            drop(err_w);
            // The child has its own copy of all of it (see the doc above).
            drop((argv, envs, pid_buf, scratch));
            Ok(Spawned {
                pid: child,
                report: ExecReport {
                    pipe: err_r,
                    program,
                    buf: [0; 8],
                    len: 0,
                },
            })
        }
        Err(e) => Err(SpawnError::Fork {
            program,
            source: e.into(),
        }),
    }
}

/// The stages the child reports by index: append only.
const STAGES: [&str; 7] = [
    "setpgid", "prctl", "dup", "close", "chdir", "execve", "cgroup",
];

fn stage_name(i: u32) -> &'static str {
    STAGES.get(i as usize).copied().unwrap_or("spawn")
}

struct ChildArgs {
    exe: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    pid_digits: *mut u8,
    sources: *const RawFd,
    scratch: *mut RawFd,
    count: usize,
    scratch_base: RawFd,
    err_w: RawFd,
    err_target: RawFd,
    parent: libc::pid_t,
    pdeath: libc::c_int,
    /// `cgroup.procs` to write "0" to, or -1.
    cgroup_procs: RawFd,
}

/// # Safety
/// Must only be called in the child right after fork. All pointers must point
/// to memory allocated before the fork; `scratch` must have `count` slots.
unsafe fn child_after_fork(a: ChildArgs) -> ! {
    let mut err_fd = a.err_w;
    let fail = |fd: RawFd, stage: u32| -> ! {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        let s = stage.to_ne_bytes();
        let e = errno.to_ne_bytes();
        let mut i = 0;
        while i < 4 {
            buf[i] = s[i];
            buf[4 + i] = e[i];
            i += 1;
        }
        libc::write(fd, buf.as_ptr().cast(), 8);
        libc::_exit(127)
    };

    // A fresh signal state, as a new program expects: every disposition back
    // to the default (holdfast's handlers, and SIGPIPE, which Rust ignores
    // and an ignored disposition would survive exec), then an empty mask.
    // The parent blocked everything across the fork, so a signal sent to us
    // meanwhile is still pending and now gets its default action.
    let mut sig = 1;
    while sig < 65 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
        sig += 1;
    }
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());

    if libc::setpgid(0, 0) != 0 {
        fail(err_fd, 0);
    }
    if libc::prctl(libc::PR_SET_PDEATHSIG, a.pdeath as libc::c_ulong, 0, 0, 0) != 0 {
        fail(err_fd, 1);
    }
    if libc::getppid() != a.parent {
        // holdfast died between fork and prctl.
        libc::_exit(1);
    }
    // Into the worker's cgroup before anything can fork: "0" is the writer.
    // Done before the fd shuffle, while the plan's fd numbers are still valid.
    if a.cgroup_procs >= 0 && libc::write(a.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
        fail(err_fd, 6);
    }

    // Move every source above the target range first, so no dup2 clobbers a
    // source that has not been placed yet.
    let mut i = 0;
    while i < a.count {
        let fd = libc::fcntl(*a.sources.add(i), libc::F_DUPFD_CLOEXEC, a.scratch_base);
        if fd < 0 {
            fail(err_fd, 2);
        }
        *a.scratch.add(i) = fd;
        i += 1;
    }
    let moved = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, a.scratch_base);
    if moved < 0 {
        fail(err_fd, 2);
    }
    err_fd = moved;
    let mut i = 0;
    while i < a.count {
        // dup2 clears FD_CLOEXEC on the target: these are what exec passes on.
        if libc::dup2(*a.scratch.add(i), i as RawFd) < 0 {
            fail(err_fd, 2);
        }
        i += 1;
    }
    if libc::dup3(err_fd, a.err_target, libc::O_CLOEXEC) < 0 {
        fail(err_fd, 2);
    }
    err_fd = a.err_target;
    // Nothing else is inherited: close everything above the error pipe.
    if libc::syscall(
        libc::SYS_close_range,
        (a.err_target + 1) as libc::c_uint,
        libc::c_uint::MAX,
        0,
    ) != 0
    {
        // Kernels before 5.9: close one by one up to the soft limit.
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < 1 << 20 {
            lim.rlim_cur as RawFd
        } else {
            1 << 16
        };
        let mut fd = a.err_target + 1;
        while fd < max {
            libc::close(fd);
            fd += 1;
        }
    }
    if !a.cwd.is_null() && libc::chdir(a.cwd) != 0 {
        fail(err_fd, 4);
    }
    if !a.pid_digits.is_null() {
        write_decimal(a.pid_digits, libc::getpid() as u64);
    }
    libc::execve(a.exe, a.argv, a.envp);
    fail(err_fd, 5)
}

/// Writes `n` in decimal followed by NUL at `out` (room for 21 bytes).
///
/// # Safety
/// `out` must be valid for 21 bytes of writes.
unsafe fn write_decimal(out: *mut u8, mut n: u64) {
    let mut digits = [0u8; PID_DIGITS];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 {
            break;
        }
    }
    let mut i = 0;
    while i < len {
        *out.add(i) = digits[len - 1 - i];
        i += 1;
    }
    *out.add(len) = 0;
}

/// Makes holdfast the reaper of orphaned descendants (PR_SET_CHILD_SUBREAPER).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Duplicates `fd` (CLOEXEC) into a new owned fd.
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    let new = nix::fcntl::fcntl(
        // SAFETY: the caller's fd is open for the duration of this call.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3),
    )?;
    // SAFETY: fcntl just returned this fd and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Whether [`take_listen_fds`] has run in this process.
static LISTEN_FDS_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Takes ownership of the `count` fds a service manager passed at exec,
/// 3..3+count (sd_listen_fds(3)), marking each close-on-exec. Runs once per
/// process: a second call gets nothing, so no fd is ever owned twice. An entry
/// is an error when that fd is not open.
pub(crate) fn take_listen_fds(count: usize) -> Vec<io::Result<OwnedFd>> {
    use std::sync::atomic::Ordering;
    if LISTEN_FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return Vec::new();
    }
    (0..count)
        .map(|i| {
            let fd =
                RawFd::try_from(3 + i).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
            // SAFETY: fcntl(F_GETFD/F_SETFD) on an fd number reads and writes
            // no memory of ours; an fd that is not open gives EBADF.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the fd is open (F_GETFD succeeded) and was inherited at
            // exec under LISTEN_FDS, so nothing in this process opened it; the
            // once-only guard above means no other OwnedFd is made for it.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect()
}

/// Whether [`take_inherited_fds`] has run in this process.
static INHERITED_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Takes ownership of the fds a previous image of holdfast handed over
/// across its exec (an in-place upgrade), by number, marking each
/// close-on-exec again. Runs once per process: a second call gets nothing,
/// so no fd is ever owned twice. An entry is an error when that fd is not
/// open; fds 0-2 are refused (they are stdio, never handed over).
pub(crate) fn take_inherited_fds(numbers: &[RawFd]) -> Vec<(RawFd, io::Result<OwnedFd>)> {
    use std::sync::atomic::Ordering;
    if INHERITED_TAKEN.swap(true, Ordering::SeqCst) {
        return Vec::new();
    }
    let mut seen = std::collections::BTreeSet::new();
    numbers
        .iter()
        .filter(|&&fd| seen.insert(fd))
        .map(|&fd| {
            if fd < 3 {
                return (fd, Err(io::Error::from_raw_os_error(libc::EBADF)));
            }
            // SAFETY: fcntl(F_GETFD/F_SETFD) on an fd number reads and writes
            // no memory of ours; an fd that is not open gives EBADF.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            if flags < 0 {
                return (fd, Err(io::Error::last_os_error()));
            }
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
                return (fd, Err(io::Error::last_os_error()));
            }
            // SAFETY: the fd is open (F_GETFD succeeded) and was inherited at
            // exec from the previous image, which listed it; nothing in this
            // image opened it (it was open before this image ran any code),
            // the numbers are deduplicated, and the once-only guard above
            // means no other OwnedFd is made for it.
            (fd, Ok(unsafe { OwnedFd::from_raw_fd(fd) }))
        })
        .collect()
}

/// The accept queue of a listening TCP socket: (connections waiting to be
/// accepted now, the queue's maximum), from `TCP_INFO` (tcp(7)). For a socket
/// in LISTEN state the kernel reports `sk_ack_backlog` in `tcpi_unacked` and
/// `sk_max_ack_backlog` in `tcpi_sacked`. nix has no `TCP_INFO` wrapper.
pub(crate) fn tcp_accept_queue(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is a borrowed, open descriptor; `info` points at
    // `len` writable bytes (zero-initialised, so a short write by an older
    // kernel leaves valid zeros) and `len` is a valid in/out pointer.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tcp_info is plain integers, valid for any bit pattern, and it
    // was zero-initialised before the kernel wrote its prefix.
    let info = unsafe { info.assume_init() };
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// pidfd_open(2): an fd that refers to exactly this process, so a signal sent
/// through it can never reach a later process that reuses the pid. ENOSYS on
/// kernels before 5.3; ESRCH if the process is gone.
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags (0) by value, touches no memory
    // of ours, and returns a new fd or -1 with errno set.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// pidfd_send_signal(2): `signal` to the process `pidfd` refers to; ESRCH if it has exited.
pub(crate) fn pidfd_send_signal(
    pidfd: &OwnedFd,
    signal: nix::sys::signal::Signal,
) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call (borrowed from an
    // OwnedFd); a null siginfo is allowed and means "as kill(2) would"; flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by tests/fuzz (config_mutated): `check` of a config whose
    /// program is missing said "exec holdfast-no-such-program: not found in
    /// PATH (...)", naming no key, unlike every other config error; with a
    /// program after `--` a reader could not tell which `command` was meant.
    #[test]
    fn a_missing_program_names_the_command_key() {
        let reason = resolve(
            "holdfast-no-such-program",
            Some(OsStr::new("/nonexistent")),
            None,
        )
        .expect_err("no such program");
        let e = SpawnError::NotFound {
            program: "holdfast-no-such-program".into(),
            reason,
        };
        assert_eq!(
            e.to_string(),
            "exec holdfast-no-such-program: not found in PATH (/nonexistent) (the program of `command`)"
        );
    }
}
