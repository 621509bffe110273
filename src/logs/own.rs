//! holdfast's own log: the tracing output, queued to a writer thread.

use super::*;

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
    /// A duplicate of the file's fd, for an upgrade (None: stderr).
    Fd(mpsc::Sender<Option<OwnedFd>>),
}

enum OwnTarget {
    Stderr,
    File { path: PathBuf, file: File },
}

impl OwnTarget {
    fn dup(&self) -> Option<OwnedFd> {
        match self {
            OwnTarget::Stderr => None,
            OwnTarget::File { file, .. } => file.try_clone().ok().map(OwnedFd::from),
        }
    }

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

    /// Sends holdfast's log to `file`, open at `path`: the log file a
    /// previous image handed over (an in-place upgrade), not reopened.
    pub fn adopt(&self, path: &Path, file: File) {
        *self.lock() = OwnTarget::File {
            path: path.to_path_buf(),
            file,
        };
    }

    /// For an upgrade: a duplicate of the log file's fd (close-on-exec),
    /// after the events queued so far; `None` when holdfast logs to stderr
    /// (which the exec keeps anyway).
    pub fn handover_fd(&self) -> Option<OwnedFd> {
        let Some(q) = self.queue.get() else {
            return self.lock().dup();
        };
        let (tx, rx) = mpsc::channel();
        q.send(OwnMsg::Fd(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(2)).ok().flatten()
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
                OwnMsg::Fd(reply) => drop(reply.send(target.dup())),
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

    /// Counts `n` events a previous image dropped (an upgrade hands the
    /// count over, so it continues).
    pub fn add_dropped(&self, n: u64) {
        self.dropped_total.fetch_add(n, Ordering::Relaxed);
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
