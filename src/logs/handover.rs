//! The log plumbing across an in-place upgrade of holdfast.
//!
//! The sink threads pause (each writes the whole lines it has collected and
//! stops reading), then hand back their open destination files and every
//! worker pipe, each pipe with the partial line it holds, and end. Nothing
//! is closed and nothing is read twice: what the workers write meanwhile
//! waits in the pipes. If the exec fails, [`Logs::resume`] starts the
//! threads again on the same files and pipes; the new image does the same
//! with the fds it inherited ([`LogsHandover::adopt`]). A line a worker was
//! in the middle of writing is therefore written once, whole, by whichever
//! image reads its newline.

use super::sink::Handed;
use super::*;
use std::os::fd::BorrowedFd;

use crate::os::handover::FdBank;

/// How long a sink may take to pause before the upgrade gives up (it is
/// stuck in write(2): a full disk, a stalled journald).
pub const PAUSE_WITHIN: Duration = Duration::from_secs(2);

/// The log plumbing taken apart for an upgrade: each destination's open
/// file, each worker pipe with its prefix and partial line, and the
/// counters. Owned here until the exec.
pub struct LogsHandover {
    config: LogsConfig,
    sinks: Vec<(Dest, File)>,
    route: [usize; 2],
    /// (index into `sinks`, pipe).
    pipes: Vec<(usize, Pipe)>,
    counters: LogCounters,
    /// The new image's side: a fresh [`Tail`] per adopted worker, shared by
    /// its pipes, so a failure after the upgrade quotes the lines written
    /// since (the lines before it are not handed over). Empty on the old
    /// image's side, whose pipes keep their own.
    tails: std::collections::HashMap<Pid, Tail>,
}

/// [`LogsHandover`] as the new image reads it: fd numbers instead of files.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogsRecord {
    config: LogsConfig,
    sinks: Vec<SinkRecord>,
    route: [usize; 2],
    pipes: Vec<PipeRecord>,
    counters: LogCounters,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct SinkRecord {
    dest: Dest,
    fd: RawFd,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct PipeRecord {
    sink: usize,
    fd: RawFd,
    slot: Slot,
    pid: Pid,
    /// 1 stdout, 2 stderr.
    stream: u8,
    prefix: Vec<u8>,
    partial: Vec<u8>,
}

/// One worker pipe, for the format-independent manifest of an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeFd {
    pub fd: RawFd,
    pub slot: Slot,
    pub pid: Pid,
    pub stream: u8,
}

impl LogsHandover {
    /// What the new image reads.
    pub fn record(&self) -> LogsRecord {
        LogsRecord {
            config: self.config.clone(),
            sinks: self
                .sinks
                .iter()
                .map(|(dest, file)| SinkRecord {
                    dest: dest.clone(),
                    fd: file.as_raw_fd(),
                })
                .collect(),
            route: self.route,
            pipes: self
                .pipes
                .iter()
                .map(|(sink, p)| PipeRecord {
                    sink: *sink,
                    fd: p.file.as_raw_fd(),
                    slot: p.worker.0,
                    pid: p.worker.1,
                    stream: p.worker.2,
                    prefix: p.prefix.clone(),
                    partial: p.partial.clone(),
                })
                .collect(),
            counters: self.counters,
        }
    }

    /// Worker pipes handed over, and how many hold a partial line.
    pub fn pipes(&self) -> (usize, usize) {
        let partial = self
            .pipes
            .iter()
            .filter(|(_, p)| !p.partial.is_empty())
            .count();
        (self.pipes.len(), partial)
    }

    /// Every fd handed over: destination files, then pipes.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.sinks
            .iter()
            .map(|(_, f)| f.as_fd())
            .chain(self.pipes.iter().map(|(_, p)| p.file.as_fd()))
            .collect()
    }

    /// The worker pipes, for the manifest.
    pub fn pipe_fds(&self) -> Vec<PipeFd> {
        self.pipes
            .iter()
            .map(|(_, p)| PipeFd {
                fd: p.file.as_raw_fd(),
                slot: p.worker.0,
                pid: p.worker.1,
                stream: p.worker.2,
            })
            .collect()
    }

    /// The plumbing a previous image handed over, its fds duplicated from
    /// `bank`.
    pub fn adopt(r: LogsRecord, bank: &FdBank) -> Result<LogsHandover, String> {
        let mut sinks = Vec::new();
        for s in r.sinks {
            let fd = bank.dup(s.fd, &format!("log destination {}", s.dest))?;
            sinks.push((s.dest, File::from(fd)));
        }
        if r.route.iter().any(|&i| i >= sinks.len()) {
            return Err(format!(
                "log routes {:?} name no destination of {}",
                r.route,
                sinks.len()
            ));
        }
        let mut pipes = Vec::new();
        let mut tails = std::collections::HashMap::new();
        for p in r.pipes {
            if p.sink >= sinks.len() || p.partial.len() > MAX_LINE {
                return Err(format!(
                    "the log pipe of worker {} (pid {}) names sink {} of {} or holds {} bytes",
                    p.slot,
                    p.pid,
                    p.sink,
                    sinks.len(),
                    p.partial.len()
                ));
            }
            let what = format!("log pipe of worker {} (pid {})", p.slot, p.pid);
            let fd = bank.dup(p.fd, &what)?;
            pipes.push((
                p.sink,
                Pipe {
                    file: File::from(fd),
                    worker: (p.slot, p.pid, p.stream),
                    prefix: p.prefix,
                    partial: p.partial,
                    closed: false,
                    tail: Some(tails.entry(p.pid).or_insert_with(Tail::default).clone()),
                },
            ));
        }
        Ok(LogsHandover {
            config: r.config,
            sinks,
            route: r.route,
            pipes,
            counters: r.counters,
            tails,
        })
    }

    /// The adopted workers' [`Tail`]s, by pid (see the field).
    pub fn take_tails(&mut self) -> std::collections::HashMap<Pid, Tail> {
        std::mem::take(&mut self.tails)
    }

    /// The worker pipes only, as a fallback adopts them without a record:
    /// each to the sink of its stream, with the prefix `[w<slot> <pid>] `
    /// when `[logs] prefix` is on and no partial line.
    pub fn attach_pipes(logs: &Logs, pipes: Vec<(PipeFd, OwnedFd)>) {
        for (p, fd) in pipes {
            let sink = &logs.sinks[logs.route[usize::from(p.stream == 2)]];
            let pipe = Pipe {
                file: File::from(fd),
                worker: (p.slot, p.pid, p.stream),
                prefix: logs.prefix(p.slot, p.pid),
                partial: Vec::new(),
                closed: false,
                tail: None,
            };
            if !sink.send(Command::Attach(pipe)) {
                error!(slot = %p.slot, pid = %p.pid, destination = %sink.dest, "the log thread is gone; this worker's output is discarded");
            }
        }
    }
}

impl Logs {
    /// Takes the plumbing apart for an upgrade (see the module): every sink
    /// pauses within [`PAUSE_WITHIN`] or none is taken apart and the error
    /// names the one that did not. On success the sink threads are gone and
    /// `self` must not be used again: [`Logs::resume`] the result (exec
    /// failed) or hand it over.
    pub fn handover(&self) -> Result<LogsHandover, String> {
        let until = Instant::now() + PAUSE_WITHIN;
        let mut acks = Vec::new();
        for s in &self.sinks {
            let (tx, rx) = mpsc::channel();
            if !s.send(Command::Pause(tx)) {
                self.resume_all();
                return Err(format!("the log thread of {} is gone", s.dest));
            }
            acks.push(rx);
        }
        for (s, ack) in self.sinks.iter().zip(&acks) {
            let left = until.saturating_duration_since(Instant::now());
            if ack.recv_timeout(left).is_err() {
                self.resume_all();
                return Err(format!(
                    "the log writer of {} did not pause within {}s (stuck writing: a full disk, a stalled reader?); retry",
                    s.dest,
                    PAUSE_WITHIN.as_secs()
                ));
            }
        }
        let mut sinks = Vec::new();
        let mut pipes = Vec::new();
        for (i, s) in self.sinks.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let handed = if s.send(Command::Handover(tx)) {
                rx.recv_timeout(PAUSE_WITHIN).ok()
            } else {
                None
            };
            // Paused threads answer at once; one that does not has died.
            let Some(Handed { file, pipes: p }) = handed else {
                return Err(format!(
                    "the log thread of {} died during the handover",
                    s.dest
                ));
            };
            sinks.push((s.dest.clone(), file));
            pipes.extend(p.into_iter().map(|p| (i, p)));
        }
        Ok(LogsHandover {
            config: self.config.clone(),
            sinks,
            route: self.route,
            pipes,
            counters: self.stats.snapshot(),
            tails: std::collections::HashMap::new(),
        })
    }

    fn resume_all(&self) {
        for s in &self.sinks {
            s.send(Command::Resume);
        }
    }

    /// Starts the sink threads again on handed-over files and pipes (after
    /// a failed exec, or in the new image), counters included.
    pub fn resume(h: LogsHandover) -> Result<Logs, LogsError> {
        let stats = Arc::new(LogStats::from_counters(&h.counters));
        own_log().add_dropped(h.counters.own_log_dropped);
        let logs = Logs::spawn(&h.config, h.sinks, h.route, stats)?;
        for (sink, pipe) in h.pipes {
            if !logs.sinks[sink].send(Command::Attach(pipe)) {
                error!(destination = %logs.sinks[sink].dest, "the log thread is gone; a worker's output is discarded");
            }
        }
        Ok(logs)
    }

    /// The line prefix of a worker's output.
    pub(super) fn prefix(&self, slot: Slot, pid: Pid) -> Vec<u8> {
        if self.config.prefix {
            format!("[w{slot} {pid}] ").into_bytes()
        } else {
            Vec::new()
        }
    }
}

impl LogStats {
    fn from_counters(c: &LogCounters) -> LogStats {
        LogStats {
            lines_written: AtomicU64::new(c.lines_written),
            bytes_written: AtomicU64::new(c.bytes_written),
            lines_lost: AtomicU64::new(c.lines_lost),
            lines_split: AtomicU64::new(c.lines_split),
            write_errors: AtomicU64::new(c.write_errors),
            reopens: AtomicU64::new(c.reopens),
            reopen_failures: AtomicU64::new(c.reopen_failures),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_file(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "waited 10 s for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A worker writes half a line, holdfast hands its plumbing over and
    /// takes it back (as a failed exec does), the worker finishes the line:
    /// it is written once, whole, and the counters carry on.
    #[test]
    fn a_line_cut_by_the_handover_is_written_once_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.log");
        let config = LogsConfig {
            stdout: Some(out.clone()),
            stderr: Some(out.clone()),
            ..LogsConfig::default()
        };
        let logs = Logs::start(&config).expect("start");
        let pipes = logs.pipes().expect("pipes");
        // The test's own copies of the worker's stdout and stderr.
        let mut writer = File::from(pipes.stdout.1.try_clone().expect("dup"));
        let stderr = pipes.stderr.1.try_clone().expect("dup");
        logs.attach(pipes, Slot(0), Pid(42));
        writer.write_all(b"one\ntw").expect("write");
        wait_for("the first line", || read_file(&out) == "[w0 42] one\n");
        let h = logs.handover().expect("handover");
        let record = h.record();
        assert_eq!(record.pipes.len(), 2);
        assert_eq!(record.pipes[0].partial, b"tw");
        assert_eq!(record.counters.lines_written, 1);
        writer.write_all(b"o\nthree\n").expect("write");
        let logs = Logs::resume(h).expect("resume");
        wait_for("the cut line, whole, and the next", || {
            read_file(&out) == "[w0 42] one\n[w0 42] two\n[w0 42] three\n"
        });
        assert_eq!(logs.stats().lines_written, 3);
        drop((writer, stderr));
        logs.shutdown(Duration::from_secs(5));
    }
}
