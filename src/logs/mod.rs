//! The workers' stdout and stderr: pipes → files, whole lines, reopen by path.
//!
//! Every worker gets two pipes; holdfast keeps the read ends. Each
//! destination (a log file, or holdfast's own stdout / stderr) has one *sink
//! thread* that owns the open file and every pipe routed to it, polls them,
//! cuts what it reads into lines and writes whole lines only. That shape gives
//! the guarantees everything else rests on:
//! - one writer per file, writing complete lines: lines of different workers
//!   never interleave, and a reopen (done between two writes) never splits a
//!   line across the old and the new file;
//! - backpressure is the pipe: while a sink is slow its thread sits in
//!   write(2) and stops reading, the pipes fill, and the workers block in their
//!   own writes. No line is dropped and nothing piles up in holdfast's memory;
//! - the event loop only sends commands (attach, reopen, shutdown) over a
//!   channel plus a wake-up pipe, so a stuck disk never stalls signals,
//!   readiness or the control socket, and a slow sink stalls only the pipes
//!   routed to it.
//!
//! holdfast's own log (`[logs] holdfast_log`, the tracing output) is
//! [`OwnLog`]: queued to a writer thread of its own, so logging never blocks
//! the loop either, and reopened together with the workers' files.

mod handover;
mod own;
mod sink;
mod tail;

use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::config::LogsConfig;
use crate::ids::{Pid, Slot};

pub use handover::{LogsHandover, LogsRecord, PipeFd};
pub use own::own_log;
use sink::{Command, Pipe, Sink, SinkHandle};
pub use tail::Tail;

/// The longest line written as one, in bytes without its newline; a longer
/// line is cut here and the rest becomes the next line (with its own prefix).
pub const MAX_LINE: usize = 64 * 1024;

/// Bytes read from one pipe per turn, so one chatty worker cannot starve the others.
const READ_CHUNK: usize = 64 * 1024;

/// Lines collected from the pipes are written once this many bytes are waiting.
const FLUSH_AT: usize = 256 * 1024;

/// Writes to anything but a regular file are cut at line ends into pieces of
/// at most this size: the kernel keeps a pipe write of up to PIPE_BUF bytes
/// whole, so holdfast's own log lines on the same stderr cannot tear a line.
const ATOMIC_WRITE: usize = libc::PIPE_BUF;

/// Mode of a log file holdfast creates at start (before the umask).
const CREATE_MODE: u32 = 0o640;

/// Why the log plumbing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("log file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: io::Error,
    },
}

/// Counters of the log plumbing, shared with the sink threads. Only counters:
/// nothing here decides anything.
#[derive(Debug, Default)]
pub struct LogStats {
    lines_written: AtomicU64,
    bytes_written: AtomicU64,
    lines_lost: AtomicU64,
    lines_split: AtomicU64,
    write_errors: AtomicU64,
    reopens: AtomicU64,
    reopen_failures: AtomicU64,
}

/// A snapshot of [`LogStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogCounters {
    /// Worker lines written to their destination.
    pub lines_written: u64,
    /// Bytes of those lines, prefixes and newlines included.
    pub bytes_written: u64,
    /// Worker lines that could not be written (write errors) and were dropped.
    pub lines_lost: u64,
    /// Lines longer than [`MAX_LINE`] that were cut.
    pub lines_split: u64,
    /// Failed write(2) calls.
    pub write_errors: u64,
    /// Files reopened by path (holdfast's own log included).
    pub reopens: u64,
    /// Reopens that failed; the old file was kept.
    pub reopen_failures: u64,
    /// holdfast's own log events dropped because its writer could not keep up.
    pub own_log_dropped: u64,
}

impl LogStats {
    pub fn snapshot(&self) -> LogCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LogCounters {
            lines_written: get(&self.lines_written),
            bytes_written: get(&self.bytes_written),
            lines_lost: get(&self.lines_lost),
            lines_split: get(&self.lines_split),
            write_errors: get(&self.write_errors),
            reopens: get(&self.reopens),
            reopen_failures: get(&self.reopen_failures),
            own_log_dropped: own_log().dropped(),
        }
    }

    fn add(c: &AtomicU64, n: u64) {
        if n > 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Where a sink writes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Dest {
    File(PathBuf),
    Stdout,
    Stderr,
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dest::File(p) => p.display().fmt(f),
            Dest::Stdout => f.write_str("holdfast's stdout"),
            Dest::Stderr => f.write_str("holdfast's stderr"),
        }
    }
}

impl Dest {
    fn open(&self) -> Result<File, LogsError> {
        match self {
            Dest::File(path) => open_log(path, CREATE_MODE).map_err(|source| LogsError::Open {
                path: path.clone(),
                source,
            }),
            Dest::Stdout => dup_stdio(io::stdout().as_fd(), "dup stdout"),
            Dest::Stderr => dup_stdio(io::stderr().as_fd(), "dup stderr"),
        }
    }
}

fn dup_stdio(fd: std::os::fd::BorrowedFd<'_>, what: &'static str) -> Result<File, LogsError> {
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(|source| LogsError::Os { what, source })
}

/// Opens `path` for appending; creates it with `mode` (umask ignored) if missing.
fn open_log(path: &Path, mode: u32) -> io::Result<File> {
    let existing = OpenOptions::new().append(true).open(path);
    match existing {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(mode)
                .open(path)
            {
                Ok(f) => {
                    // Best effort: the file is usable with the umask's mode too.
                    let _ = f.set_permissions(Permissions::from_mode(mode));
                    Ok(f)
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    OpenOptions::new().append(true).open(path)
                }
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

/// The two pipes of one worker about to be spawned: the write ends become its
/// fds 1 and 2; [`Logs::attach`] closes them in holdfast and hands the read
/// ends to the sinks. Dropped unattached (a failed spawn), it closes all four.
pub struct WorkerPipes {
    stdout: (OwnedFd, OwnedFd),
    stderr: (OwnedFd, OwnedFd),
}

impl WorkerPipes {
    /// The fds the child gets as stdout and stderr (CLOEXEC in holdfast).
    pub fn child_ends(&self) -> [RawFd; 2] {
        [self.stdout.1.as_raw_fd(), self.stderr.1.as_raw_fd()]
    }
}

/// What a reopen did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reopened {
    /// The files reopened.
    pub files: Vec<String>,
    /// One message per file that could not be (it is still written to).
    pub failures: Vec<String>,
}

impl Reopened {
    /// No file to reopen: neither `[logs] stdout`/`stderr` nor `holdfast_log`.
    pub fn nothing(&self) -> bool {
        self.files.is_empty() && self.failures.is_empty()
    }

    /// The answer to `reopen-logs`; `signalled` names the `reopen_signal`
    /// and how many workers got it.
    pub fn reply(
        &self,
        signalled: Option<(nix::sys::signal::Signal, usize)>,
    ) -> Result<String, String> {
        if !self.failures.is_empty() {
            return Err(self.failures.join("; "));
        }
        let mut parts = Vec::new();
        if !self.files.is_empty() {
            parts.push(format!("reopened {}", self.files.join(", ")));
        }
        if let Some((sig, n)) = signalled {
            parts.push(format!("sent {sig} to {n} worker(s)"));
        }
        if parts.is_empty() {
            return Err(
                "no log files in [logs] (stdout, stderr, holdfast_log): nothing to reopen".into(),
            );
        }
        Ok(parts.join("; "))
    }
}

/// The log plumbing the event loop holds: one sink thread per destination.
pub struct Logs {
    config: LogsConfig,
    sinks: Vec<SinkHandle>,
    /// Indexes into `sinks` of the workers' stdout and stderr.
    route: [usize; 2],
    stats: Arc<LogStats>,
    done: mpsc::Receiver<()>,
    threads: usize,
}

impl Logs {
    /// Opens the destinations (files are created, mode 0640, if missing) and
    /// starts their threads. stdout and stderr that are the same file share
    /// one sink, so their lines never interleave either.
    pub fn start(config: &LogsConfig) -> Result<Logs, LogsError> {
        let wanted = [
            config.stdout.clone().map_or(Dest::Stdout, Dest::File),
            config.stderr.clone().map_or(Dest::Stderr, Dest::File),
        ];
        let mut opened: Vec<(Dest, File, (u64, u64))> = Vec::new();
        let mut route = [0usize; 2];
        for (i, dest) in wanted.into_iter().enumerate() {
            if let Some(j) = opened.iter().position(|(d, _, _)| *d == dest) {
                route[i] = j;
                continue;
            }
            let file = dest.open()?;
            let meta = file.metadata().map_err(|source| LogsError::Os {
                what: "fstat log destination",
                source,
            })?;
            let id = (meta.dev(), meta.ino());
            match opened.iter().position(|(_, _, other)| *other == id) {
                // The same file under two names (or stdout and stderr that are
                // one file): one writer. A path wins, so it can be reopened.
                Some(j) => {
                    if matches!(dest, Dest::File(_)) && !matches!(opened[j].0, Dest::File(_)) {
                        opened[j] = (dest, file, id);
                    }
                    route[i] = j;
                }
                None => {
                    route[i] = opened.len();
                    opened.push((dest, file, id));
                }
            }
        }
        let opened = opened.into_iter().map(|(d, f, _)| (d, f)).collect();
        Logs::spawn(config, opened, route, Arc::new(LogStats::default()))
    }

    /// Starts one sink thread per destination, `route` naming the sinks of
    /// the workers' stdout and stderr.
    fn spawn(
        config: &LogsConfig,
        opened: Vec<(Dest, File)>,
        route: [usize; 2],
        stats: Arc<LogStats>,
    ) -> Result<Logs, LogsError> {
        let (done_tx, done) = mpsc::channel();
        let mut sinks = Vec::new();
        for (n, (dest, file)) in opened.into_iter().enumerate() {
            let (wake_r, wake_w) = nonblocking_pipe()?;
            let (tx, rx) = mpsc::channel();
            let sink = Sink::new(dest.clone(), file, Arc::clone(&stats));
            let done_tx = done_tx.clone();
            std::thread::Builder::new()
                .name(format!("logs-{n}"))
                .spawn(move || {
                    sink.run(rx, File::from(wake_r));
                    let _ = done_tx.send(());
                })
                .map_err(|source| LogsError::Os {
                    what: "start a log thread",
                    source,
                })?;
            debug!(destination = %dest, "log sink started");
            sinks.push(SinkHandle {
                dest,
                tx,
                wake: File::from(wake_w),
            });
        }
        let threads = sinks.len();
        Ok(Logs {
            config: config.clone(),
            sinks,
            route,
            stats,
            done,
            threads,
        })
    }

    /// The `[logs]` this was started with.
    pub fn config(&self) -> &LogsConfig {
        &self.config
    }

    /// Makes the stdout and stderr pipes for one worker.
    pub fn pipes(&self) -> Result<WorkerPipes, LogsError> {
        let make = || -> Result<(OwnedFd, OwnedFd), LogsError> {
            let os = |source: nix::errno::Errno| LogsError::Os {
                what: "worker output pipe",
                source: source.into(),
            };
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(os)?;
            // Only the read end: the worker's end stays blocking (backpressure).
            fcntl(&r, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(os)?;
            Ok((r, w))
        };
        Ok(WorkerPipes {
            stdout: make()?,
            stderr: make()?,
        })
    }

    /// After the spawn: closes holdfast's copies of the write ends and hands
    /// the read ends to the sinks, labelled with the worker's slot and pid.
    /// Returns the worker's [`Tail`]: its last lines, from both pipes.
    pub fn attach(&self, pipes: WorkerPipes, slot: Slot, pid: Pid) -> Tail {
        let tail = Tail::default();
        let prefix = if self.config.prefix {
            format!("[w{slot} {pid}] ").into_bytes()
        } else {
            Vec::new()
        };
        let WorkerPipes { stdout, stderr } = pipes;
        for (read, route, stream) in [(stdout.0, self.route[0], 1), (stderr.0, self.route[1], 2)] {
            let pipe = Pipe {
                file: File::from(read),
                worker: (slot, pid, stream),
                prefix: prefix.clone(),
                partial: Vec::new(),
                closed: false,
                tail: Some(tail.clone()),
            };
            let sink = &self.sinks[route];
            if !sink.send(Command::Attach(pipe)) {
                error!(%slot, %pid, destination = %sink.dest, "the log thread is gone; this worker's output is discarded");
            }
        }
        tail
    }

    /// Resolves once every sink has read what its pipes hold now: the lines
    /// an exited worker wrote are then in its [`Tail`]. A sink stuck in a
    /// write (a slow disk) answers late: callers bound the wait.
    pub fn sync(&self) -> impl Future<Output = ()> + Send + 'static {
        let waits: Vec<_> = self
            .sinks
            .iter()
            .filter_map(|s| {
                let (tx, rx) = oneshot::channel();
                s.send(Command::Sync(tx)).then_some(rx)
            })
            .collect();
        async move {
            for rx in waits {
                let _ = rx.await;
            }
        }
    }

    /// Asks every sink (and holdfast's own log) to reopen its file by path.
    /// The future resolves once all have.
    pub fn reopen(&self) -> impl Future<Output = Reopened> + Send + 'static {
        let mut waits = Vec::new();
        for s in &self.sinks {
            let (tx, rx) = oneshot::channel();
            if s.send(Command::Reopen(tx)) {
                waits.push((s.dest.clone(), rx));
            }
        }
        let stats = Arc::clone(&self.stats);
        async move {
            let mut reopened = Vec::new();
            let mut failed = Vec::new();
            let own = tokio::task::spawn_blocking(|| own_log().reopen()).await;
            match own {
                Ok(Ok(Some(p))) => {
                    LogStats::add(&stats.reopens, 1);
                    reopened.push(p.display().to_string());
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    LogStats::add(&stats.reopen_failures, 1);
                    error!("{e}; still writing to the old file");
                    failed.push(format!("{e} (still writing to the old file)"));
                }
                Err(e) => failed.push(format!("reopen holdfast's own log: {e}")),
            }
            for (dest, rx) in waits {
                match rx.await {
                    Ok(Ok(Some(p))) => reopened.push(p.display().to_string()),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => failed.push(e),
                    Err(_) => failed.push(format!("{dest}: the log thread is gone")),
                }
            }
            Reopened {
                files: reopened,
                failures: failed,
            }
        }
    }

    /// The counters, now.
    pub fn stats(&self) -> LogCounters {
        self.stats.snapshot()
    }

    /// Writes what the pipes hold now (the workers have exited) and ends the
    /// threads; gives up waiting after `within` (a sink that does not drain).
    pub fn shutdown(&self, within: Duration) {
        for s in &self.sinks {
            s.send(Command::Shutdown);
        }
        let until = Instant::now() + within;
        for _ in 0..self.threads {
            let left = until.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                warn!(waited = ?within, "log threads did not finish writing; exiting anyway");
                return;
            }
        }
    }
}

fn nonblocking_pipe() -> Result<(OwnedFd, OwnedFd), LogsError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| LogsError::Os {
        what: "log wake-up pipe",
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_replies() {
        use nix::sys::signal::Signal::SIGUSR1;
        let files = |f: &[&str], e: &[&str]| Reopened {
            files: f.iter().map(|s| s.to_string()).collect(),
            failures: e.iter().map(|s| s.to_string()).collect(),
        };
        let table = [
            (
                files(&["/a", "/b"], &[]),
                None,
                Ok("reopened /a, /b".to_string()),
            ),
            (
                files(&["/a"], &[]),
                Some((SIGUSR1, 2)),
                Ok("reopened /a; sent SIGUSR1 to 2 worker(s)".to_string()),
            ),
            (
                files(&[], &[]),
                Some((SIGUSR1, 1)),
                Ok("sent SIGUSR1 to 1 worker(s)".to_string()),
            ),
            (
                files(&["/a"], &["x failed", "y failed"]),
                None,
                Err("x failed; y failed".to_string()),
            ),
        ];
        for (i, (r, signalled, want)) in table.into_iter().enumerate() {
            assert_eq!(r.reply(signalled), want, "row {i}");
        }
        let nothing = files(&[], &[]);
        assert!(nothing.nothing());
        assert!(nothing.reply(None).is_err_and(|e| e.contains("[logs]")));
    }
}
