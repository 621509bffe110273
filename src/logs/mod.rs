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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// What the event loop asks of a sink thread.
enum Command {
    Attach(Pipe),
    /// Reopen by path; answers with the path reopened (None: not a file).
    Reopen(oneshot::Sender<Result<Option<PathBuf>, String>>),
    /// Drain what the pipes hold now, write it, and end the thread.
    Shutdown,
}

/// The loop's handle on one sink thread.
struct SinkHandle {
    dest: Dest,
    tx: mpsc::Sender<Command>,
    wake: File,
}

impl SinkHandle {
    fn send(&self, c: Command) -> bool {
        if self.tx.send(c).is_err() {
            return false;
        }
        // The pipe is non-blocking: when it is full a wake-up is pending anyway.
        let _ = (&self.wake).write(&[1]);
        true
    }
}

/// The read end of one worker stream, as the sink thread holds it.
struct Pipe {
    file: File,
    /// `[w<slot> <pid>] `, or empty.
    prefix: Vec<u8>,
    /// The start of a line whose newline has not arrived yet (at most MAX_LINE bytes).
    partial: Vec<u8>,
    closed: bool,
}

/// Lines collected for one write.
#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    lines: u64,
    split: u64,
}

impl Out {
    fn line(&mut self, prefix: &[u8], head: &[u8], tail: &[u8]) {
        self.buf.extend_from_slice(prefix);
        self.buf.extend_from_slice(head);
        self.buf.extend_from_slice(tail);
        self.buf.push(b'\n');
        self.lines += 1;
    }
}

impl Pipe {
    /// Cuts `data` (the next bytes of this stream) into lines for `out`; keeps
    /// an unfinished last line for later.
    fn consume(&mut self, mut data: &[u8], out: &mut Out) {
        loop {
            let room = MAX_LINE - self.partial.len();
            // One byte past the room: a line of exactly MAX_LINE bytes is not cut.
            let window = &data[..data.len().min(room + 1)];
            if let Some(i) = find_newline(window) {
                out.line(&self.prefix, &self.partial, &data[..i]);
                self.clear_partial();
                data = &data[i + 1..];
            } else if window.len() > room {
                out.line(&self.prefix, &self.partial, &data[..room]);
                out.split += 1;
                self.clear_partial();
                data = &data[room..];
            } else {
                self.partial.extend_from_slice(data);
                return;
            }
        }
    }

    /// End of stream: an unfinished last line is written with a newline added.
    fn finish(&mut self, out: &mut Out) {
        if !self.partial.is_empty() {
            out.line(&self.prefix, &self.partial, &[]);
            self.clear_partial();
        }
        self.closed = true;
    }

    fn clear_partial(&mut self) {
        if self.partial.capacity() > 8 * 1024 {
            self.partial = Vec::new();
        } else {
            self.partial.clear();
        }
    }
}

/// The index of the first `\n` in `s`, a machine word at a time.
fn find_newline(s: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const NL: u64 = LO * b'\n' as u64;
    let mut chunks = s.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_ne_bytes(w) ^ NL;
        if (x.wrapping_sub(LO) & !x & HI) != 0 {
            return c.iter().position(|&b| b == b'\n').map(|i| at + i);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| at + i)
}

/// A write failure that lasts until a write succeeds again.
struct Incident {
    lost: u64,
    since: Instant,
}

/// One destination, owned by its thread.
struct Sink {
    dest: Dest,
    file: File,
    /// The largest single write: unbounded for regular files, else ATOMIC_WRITE.
    piece: usize,
    incident: Option<Incident>,
    stats: Arc<LogStats>,
}

impl Sink {
    fn new(dest: Dest, file: File, stats: Arc<LogStats>) -> Sink {
        let piece = piece_for(&file);
        Sink {
            dest,
            file,
            piece,
            incident: None,
            stats,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>, wake: File) {
        let mut pipes: Vec<Pipe> = Vec::new();
        let mut out = Out::default();
        let mut scratch = vec![0u8; READ_CHUNK];
        let mut stopping = false;
        let mut ready: Vec<bool> = Vec::new();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Command::Attach(p)) => pipes.push(p),
                    Ok(Command::Reopen(done)) => {
                        let _ = done.send(self.reopen());
                    }
                    Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            let timeout = if stopping {
                PollTimeout::ZERO
            } else {
                PollTimeout::NONE
            };
            let mut fds: Vec<PollFd<'_>> = std::iter::once(&wake)
                .chain(pipes.iter().map(|p| &p.file))
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // Cannot happen with valid fds; do not spin if it does.
                    error!(path = %self.dest, error = %e, "poll on worker pipes failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            ready.clear();
            ready.extend(
                fds.iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty())),
            );
            drop(fds);
            if ready[0] {
                let mut drain = [0u8; 64];
                while matches!((&wake).read(&mut drain), Ok(n) if n > 0) {}
            }
            let mut busy = false;
            for (p, _) in pipes.iter_mut().zip(&ready[1..]).filter(|(_, r)| **r) {
                match (&p.file).read(&mut scratch) {
                    Ok(0) => p.finish(&mut out),
                    Ok(n) => p.consume(&scratch[..n], &mut out),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => {
                        warn!(path = %self.dest, error = %e, "reading a worker pipe failed; closing it");
                        p.finish(&mut out);
                    }
                }
                busy = true;
                if out.buf.len() >= FLUSH_AT {
                    self.flush(&mut out);
                }
            }
            self.flush(&mut out);
            pipes.retain(|p| !p.closed);
            if stopping && !busy {
                break;
            }
        }
        for p in &mut pipes {
            p.finish(&mut out);
        }
        self.flush(&mut out);
    }

    /// Writes the collected lines; on an error drops the rest and counts it.
    fn flush(&mut self, out: &mut Out) {
        if out.buf.is_empty() {
            return;
        }
        let (written, result) = self.write_out(&out.buf);
        let lost = match &result {
            Ok(()) => 0,
            Err(_) => out.buf[written..].iter().filter(|&&b| b == b'\n').count() as u64,
        };
        let s = &self.stats;
        LogStats::add(&s.lines_written, out.lines - lost);
        LogStats::add(&s.bytes_written, written as u64);
        LogStats::add(&s.lines_split, out.split);
        match result {
            Ok(()) => {
                if let Some(i) = self.incident.take() {
                    warn!(path = %self.dest, lines_lost = i.lost, after = ?i.since.elapsed(), "writing worker output works again");
                }
            }
            Err(e) => {
                LogStats::add(&s.write_errors, 1);
                LogStats::add(&s.lines_lost, lost);
                match &mut self.incident {
                    Some(i) => i.lost += lost,
                    None => {
                        error!(path = %self.dest, error = %e, lines_lost = lost, "cannot write worker output; dropping lines until writing works again");
                        self.incident = Some(Incident {
                            lost,
                            since: Instant::now(),
                        });
                    }
                }
            }
        }
        out.buf.clear();
        out.lines = 0;
        out.split = 0;
    }

    /// Writes `buf` (whole lines) in pieces of at most `self.piece` bytes cut
    /// at line ends; returns how much was written and how it ended.
    fn write_out(&mut self, buf: &[u8]) -> (usize, io::Result<()>) {
        let mut done = 0;
        while done < buf.len() {
            let end = if buf.len() - done <= self.piece {
                buf.len()
            } else {
                let window = &buf[done..done + self.piece];
                match window.iter().rposition(|&b| b == b'\n') {
                    Some(i) => done + i + 1,
                    // One line longer than a piece: it goes in one write.
                    None => find_newline(&buf[done..]).map_or(buf.len(), |i| done + i + 1),
                }
            };
            match self.file.write(&buf[done..end]) {
                Ok(0) => return (done, Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Someone made our stdout non-blocking: wait until it takes more.
                    let mut fd = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fd, PollTimeout::NONE);
                }
                Err(e) => return (done, Err(e)),
            }
        }
        (done, Ok(()))
    }

    fn reopen(&mut self) -> Result<Option<PathBuf>, String> {
        let Dest::File(path) = &self.dest else {
            return Ok(None);
        };
        let mode = self
            .file
            .metadata()
            .map_or(CREATE_MODE, |m| m.permissions().mode() & 0o7777);
        match open_log(path, mode) {
            Ok(f) => {
                self.piece = piece_for(&f);
                self.file = f;
                LogStats::add(&self.stats.reopens, 1);
                info!(path = %path.display(), "log file reopened");
                Ok(Some(path.clone()))
            }
            Err(e) => {
                LogStats::add(&self.stats.reopen_failures, 1);
                error!(path = %path.display(), error = %e, "cannot reopen the log file; still writing to the old one");
                Err(format!(
                    "reopen {}: {e} (still writing to the old file)",
                    path.display()
                ))
            }
        }
    }
}

fn piece_for(file: &File) -> usize {
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => usize::MAX,
        _ => ATOMIC_WRITE,
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
        let stats = Arc::new(LogStats::default());
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
        let (done_tx, done) = mpsc::channel();
        let mut sinks = Vec::new();
        for (n, (dest, file, _)) in opened.into_iter().enumerate() {
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
    pub fn attach(&self, pipes: WorkerPipes, slot: Slot, pid: Pid) {
        let prefix = if self.config.prefix {
            format!("[w{slot} {pid}] ").into_bytes()
        } else {
            Vec::new()
        };
        let WorkerPipes { stdout, stderr } = pipes;
        for (read, route) in [(stdout.0, self.route[0]), (stderr.0, self.route[1])] {
            let pipe = Pipe {
                file: File::from(read),
                prefix: prefix.clone(),
                partial: Vec::new(),
                closed: false,
            };
            let sink = &self.sinks[route];
            if !sink.send(Command::Attach(pipe)) {
                error!(%slot, %pid, destination = %sink.dest, "the log thread is gone; this worker's output is discarded");
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

    /// The live counters, for whoever reports them.
    pub fn stats_handle(&self) -> Arc<LogStats> {
        Arc::clone(&self.stats)
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

/// Events queued for holdfast's own log before new ones are dropped (and counted).
const OWN_QUEUE: usize = 10_000;

/// holdfast's own log (the tracing output): stderr, or `[logs] holdfast_log`.
///
/// Once [`OwnLog::start_writer`] has run, each event is formatted by the
/// thread that logs it and queued to one writer thread, so no thread that
/// logs (the event loop above all) ever waits on a slow disk or a stuck
/// journald. When the queue is full, events are dropped and counted, and the
/// writer says how many once it catches up. Before that (start-up, while
/// holdfast has no thread yet) events are written directly.
pub struct OwnLog {
    /// The target while there is no writer thread.
    direct: Mutex<OwnTarget>,
    queue: OnceLock<mpsc::SyncSender<OwnMsg>>,
    /// Dropped since the writer last reported.
    dropped: AtomicU64,
    dropped_total: AtomicU64,
}

enum OwnMsg {
    Event(Vec<u8>),
    Reopen(mpsc::Sender<Result<Option<PathBuf>, LogsError>>),
    Flush(mpsc::Sender<()>),
}

enum OwnTarget {
    Stderr,
    File { path: PathBuf, file: File },
}

impl OwnTarget {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            OwnTarget::Stderr => io::stderr().write_all(b),
            OwnTarget::File { file, .. } => file.write_all(b),
        }
    }

    /// Reopens the file by path, same mode if it must be created; keeps the
    /// old file on failure. `None` for stderr.
    fn reopen(&mut self) -> Result<Option<PathBuf>, LogsError> {
        let OwnTarget::File { path, file } = self else {
            return Ok(None);
        };
        let mode = file
            .metadata()
            .map_or(CREATE_MODE, |m| m.permissions().mode() & 0o7777);
        *file = open_log(path, mode).map_err(|source| LogsError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Some(path.clone()))
    }
}

static OWN_LOG: OwnLog = OwnLog {
    direct: Mutex::new(OwnTarget::Stderr),
    queue: OnceLock::new(),
    dropped: AtomicU64::new(0),
    dropped_total: AtomicU64::new(0),
};

/// The process-wide [`OwnLog`] the tracing subscriber writes to.
pub fn own_log() -> &'static OwnLog {
    &OWN_LOG
}

impl OwnLog {
    fn lock(&self) -> MutexGuard<'_, OwnTarget> {
        self.direct.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends holdfast's log to `path` (appended; created 0640 if missing).
    /// Opens an fd but starts no thread.
    pub fn open(&self, path: &Path) -> Result<(), LogsError> {
        let file = open_log(path, CREATE_MODE).map_err(|source| LogsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        *self.lock() = OwnTarget::File {
            path: path.to_path_buf(),
            file,
        };
        Ok(())
    }

    /// From now on events go through the writer thread. Once per process;
    /// if the thread cannot start, events keep being written directly.
    pub fn start_writer(&'static self) {
        let mut direct = self.lock();
        if self.queue.get().is_some() {
            return;
        }
        let (tx, rx) = mpsc::sync_channel(OWN_QUEUE);
        let (ready_tx, ready_rx) = mpsc::channel::<OwnTarget>();
        let spawned = std::thread::Builder::new()
            .name("holdfast-log".into())
            .spawn(move || {
                if let Ok(target) = ready_rx.recv() {
                    self.run(target, rx);
                }
            });
        match spawned {
            Ok(_) => {
                let target = std::mem::replace(&mut *direct, OwnTarget::Stderr);
                let _ = ready_tx.send(target);
                let _ = self.queue.set(tx);
            }
            Err(e) => {
                drop(direct);
                warn!(error = %e, "cannot start the log writer thread; holdfast's own log is written directly");
            }
        }
    }

    fn run(&self, mut target: OwnTarget, rx: mpsc::Receiver<OwnMsg>) {
        for msg in rx {
            match msg {
                // Nowhere to report a failure to write the log itself.
                OwnMsg::Event(b) => drop(target.write_all(&b)),
                OwnMsg::Reopen(reply) => {
                    let r = target.reopen();
                    let _ = reply.send(r);
                }
                OwnMsg::Flush(done) => drop(done.send(())),
            }
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                warn!(
                    dropped,
                    "holdfast's own log could not keep up; events were dropped"
                );
            }
        }
    }

    /// Reopens holdfast's log file by path (after the events queued before
    /// this call are written). `None` when holdfast logs to stderr. Blocks.
    pub fn reopen(&self) -> Result<Option<PathBuf>, LogsError> {
        let r = match self.queue.get() {
            None => self.lock().reopen(),
            Some(q) => {
                let (tx, rx) = mpsc::channel();
                let gone = || LogsError::Os {
                    what: "reopen holdfast's log",
                    source: io::Error::other("the log writer thread is gone"),
                };
                q.send(OwnMsg::Reopen(tx)).map_err(|_| gone())?;
                rx.recv().map_err(|_| gone())?
            }
        };
        if let Ok(Some(path)) = &r {
            info!(path = %path.display(), "holdfast's log reopened");
        }
        r
    }

    /// Waits up to `within` until what was logged so far is written (at exit).
    pub fn flush(&self, within: Duration) {
        let Some(q) = self.queue.get() else {
            return;
        };
        let until = Instant::now() + within;
        let (tx, rx) = mpsc::channel();
        let mut msg = OwnMsg::Flush(tx);
        loop {
            match q.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(m)) if Instant::now() < until => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let _ = rx.recv_timeout(until.saturating_duration_since(Instant::now()));
    }

    /// Events dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// A writer for one tracing event: collects it, queues it when dropped.
    pub fn writer(&self) -> OwnLogWriter<'_> {
        OwnLogWriter {
            log: self,
            buf: Vec::new(),
        }
    }

    fn submit(&self, event: Vec<u8>) {
        let q = match self.queue.get() {
            Some(q) => q,
            None => {
                let mut direct = self.lock();
                // The writer may have started while this thread waited.
                match self.queue.get() {
                    Some(q) => q,
                    None => {
                        let _ = direct.write_all(&event);
                        return;
                    }
                }
            }
        };
        match q.try_send(OwnMsg::Event(event)) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::TrySendError::Disconnected(OwnMsg::Event(e))) => {
                let _ = io::stderr().write_all(&e);
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {}
        }
    }
}

/// See [`OwnLog::writer`].
pub struct OwnLogWriter<'a> {
    log: &'a OwnLog,
    buf: Vec<u8>,
}

impl Write for OwnLogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for OwnLogWriter<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.log.submit(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe(prefix: &str) -> Pipe {
        let file = File::open("/dev/null").expect("open /dev/null");
        Pipe {
            file,
            prefix: prefix.as_bytes().to_vec(),
            partial: Vec::new(),
            closed: false,
        }
    }

    fn lines(out: &Out) -> Vec<String> {
        String::from_utf8_lossy(&out.buf)
            .split_inclusive('\n')
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn whole_lines_only_and_partial_carried() {
        let mut p = pipe("[w0 1] ");
        let mut out = Out::default();
        p.consume(b"a\nbb\ncc", &mut out);
        assert_eq!(lines(&out), ["[w0 1] a\n", "[w0 1] bb\n"]);
        p.consume(b"c\n\nd", &mut out);
        assert_eq!(
            lines(&out),
            ["[w0 1] a\n", "[w0 1] bb\n", "[w0 1] ccc\n", "[w0 1] \n"]
        );
        p.finish(&mut out);
        assert_eq!(lines(&out)[4], "[w0 1] d\n");
        assert_eq!(out.lines, 5);
        assert!(p.closed);
    }

    #[test]
    fn long_lines_are_cut_at_the_bound() {
        let mut p = pipe("");
        let mut out = Out::default();
        // Exactly MAX_LINE then a newline: not cut, even across reads.
        let exact = vec![b'x'; MAX_LINE];
        p.consume(&exact[..10], &mut out);
        p.consume(&exact[10..], &mut out);
        p.consume(b"\n", &mut out);
        assert_eq!(out.lines, 1);
        assert_eq!(out.split, 0);
        assert_eq!(out.buf.len(), MAX_LINE + 1);
        // MAX_LINE + 5: one cut line, then the 5 left as a line of their own.
        let mut out = Out::default();
        let mut long = vec![b'y'; MAX_LINE + 5];
        long.push(b'\n');
        p.consume(&long[..3], &mut out);
        p.consume(&long[3..], &mut out);
        assert_eq!(out.split, 1);
        assert_eq!(
            lines(&out).iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE + 1, 6]
        );
        // Three bounds' worth with no newline at all: cut without waiting for one.
        let mut out = Out::default();
        p.consume(&vec![b'z'; 3 * MAX_LINE], &mut out);
        assert_eq!(out.split, 2);
        assert_eq!(p.partial.len(), MAX_LINE);
        p.finish(&mut out);
        assert_eq!(out.lines, 3);
    }

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

    #[test]
    fn find_newline_agrees_with_position() {
        let mut s = vec![b'a'; 40];
        assert_eq!(find_newline(&s), None);
        for i in 0..40 {
            s[i] = b'\n';
            assert_eq!(find_newline(&s), Some(i), "at {i}");
            assert_eq!(find_newline(&s[..i]), None);
            s[i] = b'\n' + 128;
            assert_eq!(find_newline(&s), None, "high byte at {i}");
            s[i] = b'a';
        }
    }

    #[test]
    fn writes_to_a_pipe_are_cut_at_line_ends() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
        let mut sink = Sink::new(Dest::Stdout, File::from(w), Arc::default());
        assert_eq!(sink.piece, ATOMIC_WRITE);
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = File::from(r).read_to_end(&mut v);
            v
        });
        let mut out = Out::default();
        let mut p = pipe("");
        let line = [b'q'; 999];
        for _ in 0..20 {
            p.consume(&line, &mut out);
            p.consume(b"\n", &mut out);
        }
        sink.flush(&mut out);
        drop(sink);
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), 20 * 1000);
        assert_eq!(got.iter().filter(|&&b| b == b'\n').count(), 20);
    }
}
