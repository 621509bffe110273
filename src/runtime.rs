//! The edge: the one event loop that feeds the supervisor and carries out
//! its actions.
//!
//! It only does: receive (signal, child exit, notify datagram, probe result,
//! timer) → `Supervisor::step` → run the actions → feed their results back as
//! events. A failed action becomes an event (`SpawnFailed`), never an early
//! return, so one bad worker cannot take the loop down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use signal_hook::consts::signal::*;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::config::{AppConfig, Config, LogsConfig, MemoryConfig, Overrides, ReadyMode};
use crate::control::{self, ControlSocket};
use crate::listener::{self, Listener};
use crate::logs::{LogCounters, Logs};
use crate::memory::{self, Reading};
use crate::notify::{self, NotifySocket};
use crate::spawn::{self, Spec, Start};
use crate::status::Snapshot;
use crate::supervisor::{
    Action, Event, ExitReason, Generation, Pid, Policy, Recycle, ReplyTo, Request, Supervisor,
    WorkerId, WorkerState,
};
use crate::systemd::{ActivationError, Inherited, Notifier};

/// Why holdfast could not start; each maps to a sysexits code.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    #[error("{0}")]
    Command(#[from] crate::sys::SpawnError),
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Logs(#[from] crate::logs::LogsError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_)
            | StartError::Command(_)
            | StartError::Activation(_)
            | StartError::Listen(listener::ListenError::NotPassed { .. }) => exitcode::CONFIG,
            StartError::Listen(_) | StartError::Control(_) | StartError::Metrics(_) => {
                exitcode::UNAVAILABLE
            }
            StartError::Io { .. } => exitcode::OSERR,
            StartError::Logs(crate::logs::LogsError::Open { .. }) => exitcode::CANTCREAT,
            StartError::Logs(_) => exitcode::OSERR,
        }
    }
}

/// How long an exiting holdfast waits for the last worker output to be written.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub fn policy(app: &AppConfig) -> Policy {
    Policy {
        workers: app.workers.get(),
        max_surge: app.max_surge,
        ready: app.ready,
        ready_delay: app.ready_delay,
        ready_timeout: app.ready_timeout,
        drain_signal: app.drain_signal.0,
        drain_timeout: app.drain_timeout,
        backoff_max: app.restart_backoff_max,
    }
}

/// The supervisor's view of `[memory]`; `seed` feeds the lifetime jitter.
pub fn recycle(memory: &MemoryConfig, seed: u64) -> Recycle {
    Recycle {
        limit: memory.limit.map(|b| b.as_u64()),
        metric: memory.metric(),
        scope: memory.scope,
        grace: memory.grace,
        min_lifetime: memory.min_lifetime,
        child_signal: memory.child_signal.0,
        max_lifetime: memory.max_lifetime,
        lifetime_jitter: memory.lifetime_jitter.unwrap_or_default(),
        seed,
    }
}

/// A random u64 from the std hasher's per-process random keys (no RNG crate needed).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// A reply channel the edge holds for a request it fed to the supervisor.
pub type Reply = oneshot::Sender<Result<String, String>>;

/// Messages into the loop from its helpers (probes, control connections).
pub enum Input {
    /// The cheap half of a status snapshot (see [`crate::status`]).
    Status {
        reply: oneshot::Sender<Snapshot>,
    },
    /// Reopen every log file by path (what SIGUSR1 does); the reply comes
    /// once all are reopened, or names each that failed.
    ReopenLogs {
        reply: Option<Reply>,
    },
    Event(Event),
    Request {
        request: Request,
        reply: Option<Reply>,
    },
    Reload {
        reply: Option<Reply>,
    },
}

pub struct Runtime {
    config: Config,
    overrides: Overrides,
    sv: Supervisor,
    specs: BTreeMap<Generation, Spec>,
    listeners: Vec<Rc<Listener>>,
    pids: HashMap<i32, WorkerId>,
    probes: HashMap<WorkerId, Probe>,
    notify: NotifySocket,
    rundir: tempfile::TempDir,
    devnull: OwnedFd,
    logs: Logs,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    replies: HashMap<ReplyTo, Reply>,
    next_reply: u64,
    pending: VecDeque<Event>,
    exit: Option<i32>,
    ignored_senders: std::collections::HashSet<i32>,
    /// What systemd is told (READY, RELOADING, STOPPING, STATUS, WATCHDOG, FDSTORE).
    systemd: Notifier,
    /// Sockets systemd passed that no entry holds now (claimable on reload).
    inherited: Inherited,
    started: Instant,
    /// Bound in `new`, served from `run`.
    control: Option<ControlSocket>,
    metrics: Option<std::net::TcpListener>,
    /// The latest memory figures of each worker (by worker pid), from the last round.
    memory: HashMap<Pid, Reading>,
    /// When the running sampling round started; a new one waits for it.
    sampling: Option<Instant>,
    /// Every `[memory] interval`; `None` without `[memory]`.
    memory_tick: Option<tokio::time::Interval>,
    /// Random input to the lifetime jitter, drawn once.
    seed: u64,
}

struct Probe {
    path: PathBuf,
    fd: OwnedFd,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn runtime_base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() && Path::new(&d).is_dir() => PathBuf::from(d),
        _ => std::env::temp_dir(),
    }
}

/// The environment variable of the test hook that stalls the event loop.
pub const STALL_HOOK: &str = "HOLDFAST_TEST_STALL_ON_USR2";

impl Runtime {
    /// Takes the sockets systemd passed (see [`Inherited::from_env`]), binds
    /// the rest and prepares everything; spawns nothing yet.
    pub fn new(config: Config, overrides: Overrides) -> Result<Runtime, StartError> {
        let inherited = Inherited::from_env()?;
        Runtime::with_inherited(config, overrides, inherited)
    }

    /// Like [`Runtime::new`], with the passed sockets already taken (before
    /// the tokio runtime opened fds of its own).
    pub fn with_inherited(
        config: Config,
        overrides: Overrides,
        mut inherited: Inherited,
    ) -> Result<Runtime, StartError> {
        let mut systemd = Notifier::from_env(Instant::now());
        let mut listeners: Vec<Rc<Listener>> = Vec::new();
        for spec in &config.listen {
            let in_use = inodes(&listeners);
            let l = match inherited.claim(spec, &in_use)? {
                Some(l) => l,
                None => Listener::bind(spec)?,
            };
            listeners.push(Rc::new(l));
        }
        inherited.settle(&listeners, &mut systemd);
        for l in &listeners {
            info!(name = %l.name, address = %l.address, backlog = l.backlog, fd = l.raw_fd(),
                origin = %l.origin, inode = l.socket_inode().unwrap_or(0), "listening");
        }
        systemd.store(&listeners);
        let spec = Spec::new(config.app.clone(), listeners.clone())?;
        let control = match ControlSocket::bind(&config.control_socket) {
            Ok(s) => Some(s),
            // Without a config file the path is the default rule's
            // (/run/holdfast or $XDG_RUNTIME_DIR), which may be unusable or
            // shared: run on without it rather than refuse to start.
            Err(e) if config.path.is_none() => {
                warn!(error = %e, "running without a control socket; signals still work (set control_socket in a config file)");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let metrics = config
            .metrics_listen
            .map(crate::metrics::bind)
            .transpose()?;
        let io = |what: &str| {
            let what = what.to_string();
            move |source| StartError::Io { what, source }
        };
        let rundir = tempfile::Builder::new()
            .prefix("holdfast-")
            .tempdir_in(runtime_base())
            .map_err(io("runtime directory"))?;
        let notify =
            NotifySocket::bind(&rundir.path().join("notify.sock")).map_err(io("notify socket"))?;
        let devnull = std::fs::File::open("/dev/null")
            .map_err(io("/dev/null"))?
            .into();
        crate::sys::become_subreaper().map_err(io("PR_SET_CHILD_SUBREAPER"))?;
        let logs = Logs::start(&config.logs)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut specs = BTreeMap::new();
        specs.insert(Generation(1), spec);
        let seed = random_seed();
        let mut sv = Supervisor::new(policy(&config.app));
        sv.set_recycle(config.memory.as_ref().map(|m| recycle(m, seed)));
        Ok(Runtime {
            sv,
            config,
            overrides,
            specs,
            listeners,
            pids: HashMap::new(),
            probes: HashMap::new(),
            notify,
            rundir,
            devnull,
            logs,
            tx,
            rx,
            replies: HashMap::new(),
            next_reply: 1,
            pending: VecDeque::new(),
            exit: None,
            ignored_senders: Default::default(),
            systemd,
            inherited,
            started: Instant::now(),
            control,
            metrics,
            memory: HashMap::new(),
            sampling: None,
            memory_tick: None,
            seed,
        })
    }

    /// The latest memory figures of the worker whose own pid is `pid`, from
    /// the last sampling round that found it; `None` without `[memory]` or
    /// before its first round.
    pub fn memory_of(&self, pid: Pid) -> Option<&Reading> {
        self.memory.get(&pid)
    }

    /// The log plumbing's counters, now (for status).
    pub fn log_stats(&self) -> LogCounters {
        self.logs.stats()
    }

    /// A sender for helpers that feed the loop.
    pub fn sender(&self) -> mpsc::UnboundedSender<Input> {
        self.tx.clone()
    }

    /// Runs until every worker has exited after a stop; returns the exit code.
    pub async fn run(mut self) -> i32 {
        let signals = signal_hook_tokio::Signals::new([
            SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGCHLD,
        ]);
        let mut signals = match signals {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot install signal handlers");
                return exitcode::OSERR;
            }
        };
        info!(pid = std::process::id(), workers = self.sv.policy().workers, command = ?self.config.app.command.0, "holdfast started");
        let mut stall = stall_hook();
        let baseline = crate::status::listen_counters();
        let control = self.control.take().and_then(|socket| {
            let path = socket.path().display().to_string();
            control::Server::start(socket, self.tx.clone(), baseline)
                .map_err(|e| error!(path, error = %e, "cannot serve the control socket"))
                .ok()
        });
        let metrics = self.metrics.take().and_then(|l| {
            crate::metrics::start(l, self.tx.clone(), baseline)
                .map_err(|e| error!(error = %e, "cannot serve metrics"))
                .ok()
        });
        self.feed(Event::Tick);
        self.memory_tick = self
            .config
            .memory
            .as_ref()
            .map(|m| memory_interval(m.interval));
        let mut repair = tokio::time::interval(Duration::from_secs(1));
        while self.exit.is_none() {
            let deadline = self.sv.next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            // WATCHDOG=1 and EXTEND_TIMEOUT_USEC come from this timer, so a
            // loop that stops turning stops them too.
            let systemd_due = self.systemd.next_due();
            let systemd_sleep = async {
                match systemd_due {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(sig) = signals.next() => self.on_signal(sig),
                Some(input) = self.rx.recv() => self.on_input(input),
                msg = self.notify.recv() => match msg {
                    Ok(m) => self.on_notify(m),
                    Err(e) => warn!(error = %e, "notify socket receive failed"),
                },
                _ = sleep => self.feed(Event::Tick),
                _ = repair.tick() => self.repair_paths(),
                _ = systemd_sleep => self.systemd.due(Instant::now(), &self.sv),
                Some(d) = next_signal(&mut stall) => stall_loop(d),
                _ = tick(&mut self.memory_tick) => self.sample_memory(),
            }
        }
        if self.systemd.uses_fd_store() {
            // The sockets live on in systemd's fd store: the next holdfast
            // adopts them by these paths.
            for l in &self.listeners {
                l.keep_path();
            }
        }
        let code = self.exit.unwrap_or(0);
        // Answer what is still queued ("holdfast is exiting") and let the
        // control server write replies already decided (stop --wait).
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        self.replies.clear();
        if let Some(m) = metrics {
            m.abort();
        }
        if let Some(c) = control {
            c.finish().await;
        }
        info!(code, "holdfast exiting");
        // The workers are gone; what they wrote last is still in the pipes.
        self.logs.shutdown(LOG_DRAIN_TIMEOUT);
        code
    }

    fn on_signal(&mut self, sig: i32) {
        match sig {
            SIGCHLD => self.reap(),
            SIGTERM | SIGINT => {
                info!(signal = %signame(sig), "stop requested");
                self.feed(Event::Request {
                    request: Request::Stop,
                    reply: None,
                });
            }
            SIGHUP => {
                info!("SIGHUP: re-reading the config and rolling every worker");
                self.reload(None);
            }
            SIGTTIN | SIGTTOU => {
                let n = self.sv.policy().workers;
                let workers = if sig == SIGTTIN {
                    n + 1
                } else {
                    n.saturating_sub(1)
                };
                if workers == 0 {
                    warn!("SIGTTOU ignored: there is only one worker");
                    return;
                }
                info!(signal = %signame(sig), from = n, to = workers, "scaling");
                self.feed(Event::Request {
                    request: Request::Scale { workers },
                    reply: None,
                });
            }
            SIGUSR1 => {
                info!("SIGUSR1: reopening the log files");
                self.reopen_logs(None);
            }
            _ => {}
        }
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Event(Event::MemorySample { samples }) => {
                self.sampling = None;
                self.record_memory(&samples);
                self.feed(Event::MemorySample { samples });
            }
            Input::Event(e) => self.feed(e),
            Input::Request { request, reply } => {
                let reply = reply.map(|r| self.hold_reply(r));
                self.feed(Event::Request { request, reply });
            }
            Input::Reload { reply } => self.reload(reply),
            Input::Status { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Input::ReopenLogs { reply } => self.reopen_logs(reply),
        }
    }

    /// The loop's half of a status snapshot: no /proc reads.
    fn snapshot(&self) -> Snapshot {
        crate::status::snapshot(crate::status::Sources {
            sv: &self.sv,
            config: &self.config,
            listeners: &self.listeners,
            started: self.started,
            now: Instant::now(),
            log_stats: self.logs.stats(),
        })
    }

    /// Reopens every log file by path off the loop (a slow disk never stalls
    /// it) and forwards `[logs] reopen_signal` to every worker.
    fn reopen_logs(&mut self, reply: Option<Reply>) {
        let signalled = self.logs.config().reopen_signal.as_ref().map(|sig| {
            for &pid in self.pids.keys() {
                debug!(pid, signal = %sig.0, "forwarding the log reopen signal");
                if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig.0) {
                    warn!(pid, signal = %sig.0, error = %e, "signal failed");
                }
            }
            (sig.0, self.pids.len())
        });
        let done = self.logs.reopen();
        tokio::spawn(async move {
            let reopened = done.await;
            match reply {
                Some(r) => drop(r.send(reopened.reply(signalled))),
                None if reopened.nothing() && signalled.is_none() => {
                    info!("no log files in [logs]; nothing to reopen")
                }
                None => {}
            }
        });
    }

    fn hold_reply(&mut self, r: Reply) -> ReplyTo {
        let to = ReplyTo(self.next_reply);
        self.next_reply += 1;
        self.replies.insert(to, r);
        to
    }

    /// Re-reads the config; on success binds new listeners and starts a rollout.
    /// A bad config changes nothing.
    fn reload(&mut self, reply: Option<Reply>) {
        if self.sv.is_stopping() {
            return self.reject_reload(reply, "holdfast is stopping".into());
        }
        let new = match Config::load(self.config.path.as_deref(), &self.overrides) {
            Ok(c) => c,
            Err(e) => return self.reject_reload(reply, e.to_string()),
        };
        let mut listeners: Vec<Rc<Listener>> = Vec::new();
        for l in &new.listen {
            if let Some(existing) = self.listeners.iter().find(|x| x.serves(&l.address)) {
                listeners.push(existing.clone());
                continue;
            }
            let claimed = match self.inherited.claim(l, &inodes(&listeners)) {
                Ok(c) => c,
                Err(e) => return self.reject_reload(reply, e.to_string()),
            };
            let adopted = match claimed {
                Some(a) => a,
                None => match Listener::bind(l) {
                    Ok(b) => b,
                    Err(e) => return self.reject_reload(reply, e.to_string()),
                },
            };
            info!(name = %l.name, address = %adopted.address, origin = %adopted.origin, "listening (new in this config)");
            listeners.push(Rc::new(adopted));
        }
        let spec = match Spec::new(new.app.clone(), listeners.clone()) {
            Ok(s) => s,
            Err(e) => return self.reject_reload(reply, e.to_string()),
        };
        if !same_logs(&new.logs, self.logs.config()) {
            warn!("[logs] changes take effect only on a restart of holdfast");
        }
        if new.control_socket != self.config.control_socket {
            warn!(old = %self.config.control_socket.display(), new = %new.control_socket.display(), "control_socket changes take effect only on a restart of holdfast");
        }
        let generation = Generation(
            self.sv
                .stable()
                .0
                .max(self.specs.keys().last().map_or(0, |g| g.0))
                + 1,
        );
        self.specs.insert(generation, spec);
        self.systemd.store_changes(&self.listeners, &listeners);
        self.listeners = listeners;
        let policy = policy(&new.app);
        let interval = |c: &Config| c.memory.as_ref().map(|m| m.interval);
        if interval(&new) != interval(&self.config) {
            self.memory_tick = new.memory.as_ref().map(|m| memory_interval(m.interval));
        }
        if new.memory.is_none() {
            self.memory.clear();
        }
        self.sv
            .set_recycle(new.memory.as_ref().map(|m| recycle(m, self.seed)));
        self.config = new;
        let reply = reply.map(|r| self.hold_reply(r));
        self.feed(Event::Request {
            request: Request::Rollout { policy },
            reply,
        });
    }

    fn reject_reload(&mut self, reply: Option<Reply>, msg: String) {
        error!("reload rejected, still running the previous config: {msg}");
        self.systemd.reload_rejected(&self.sv, &msg);
        if let Some(r) = reply {
            let _ = r.send(Err(format!("reload rejected: {msg}")));
        }
    }

    /// Steps the supervisor with `event` and everything its actions produce,
    /// then tells systemd what changed.
    fn feed(&mut self, event: Event) {
        self.pending.push_back(event);
        while let Some(e) = self.pending.pop_front() {
            let now = Instant::now();
            for action in self.sv.step(now, e) {
                self.act(action);
            }
        }
        self.systemd.sync(&self.sv);
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Spawn {
                id,
                slot,
                generation,
            } => {
                let result = self.spawn(id, slot, generation);
                self.pending.push_back(match result {
                    Ok(pid) => Event::Spawned { id, pid },
                    Err(error) => Event::SpawnFailed { id, error },
                });
            }
            Action::Signal { id, pid, signal } => {
                debug!(worker = %id, %pid, %signal, "signal");
                if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.0), signal) {
                    warn!(%pid, %signal, error = %e, "signal failed");
                }
            }
            Action::SignalProcess {
                id,
                worker,
                pid,
                signal,
            } => {
                if !self.pids.contains_key(&worker.0) {
                    return; // the worker was reaped: its pid may be anyone's now
                }
                match memory::signal_descendant(worker, pid, signal) {
                    Ok(memory::Signalled::Sent) => {
                        debug!(worker = %id, %pid, %signal, "signal to a worker's descendant")
                    }
                    Ok(memory::Signalled::NotDescendant) => {
                        info!(worker_pid = %worker, %pid, %signal, "process {pid} is gone or no longer under worker pid {worker}: not signalled")
                    }
                    Err(e) => warn!(%pid, %signal, error = %e, "signal failed"),
                }
            }
            Action::Kill { id, pid } => {
                debug!(worker = %id, %pid, "SIGKILL to process group");
                let _ =
                    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid.0), Signal::SIGKILL);
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.0), Signal::SIGKILL);
            }
            Action::Verify { id, pid } => {
                self.probes.remove(&id);
                self.repair_paths();
                self.verify(pid);
            }
            Action::RolloutDone {
                generation,
                outcome,
                keep,
            } => {
                if let Err(e) = &outcome {
                    debug!(%generation, error = %e, "rollout done with failure");
                }
                let live: std::collections::HashSet<Generation> =
                    self.sv.workers().map(|w| w.generation).collect();
                let target = self.sv.rollout().map(|r| r.generation);
                self.specs.retain(|g, _| {
                    *g == keep || *g >= generation || live.contains(g) || Some(*g) == target
                });
            }
            // READY=1 goes out with the sync at the end of this feed.
            Action::AllReady => self.systemd.all_ready(),
            Action::Reply { to, outcome } => {
                if let Some(r) = self.replies.remove(&to) {
                    let _ = r.send(outcome);
                }
            }
            Action::Exit { code } => self.exit = Some(code),
        }
    }

    fn spawn(
        &mut self,
        id: WorkerId,
        slot: crate::supervisor::Slot,
        generation: Generation,
    ) -> Result<Pid, String> {
        let Some(spec) = self.specs.get(&generation) else {
            return Err(format!(
                "no spec for generation {generation} (internal error)"
            ));
        };
        let probe = if spec.app.ready == ReadyMode::Probe {
            let path = self.rundir.path().join(format!("probe-{id}.sock"));
            let fd = listener::bind_probe(&path)
                .map_err(|e| format!("probe socket {}: {e}", path.display()))?;
            Some(Probe {
                path,
                fd,
                task: None,
            })
        } else {
            None
        };
        let pipes = self.logs.pipes().map_err(|e| e.to_string())?;
        let [out, err] = pipes.child_ends();
        let start = Start {
            slot,
            generation,
            notify_socket: self.notify.path(),
            probe: probe.as_ref().map(|p| p.fd.as_raw_fd()),
            stdio: [self.devnull.as_raw_fd(), out, err],
        };
        let pid = spawn::start(spec, &start).map_err(|e| e.to_string())?;
        self.logs.attach(pipes, slot, Pid(pid.as_raw()));
        self.pids.insert(pid.as_raw(), id);
        if let Some(mut p) = probe {
            let path = spec.app.ready_path.clone();
            p.task = Some(tokio::spawn(probe_until_ready(
                p.path.clone(),
                path,
                id,
                self.tx.clone(),
            )));
            self.probes.insert(id, p);
        }
        Ok(Pid(pid.as_raw()))
    }

    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.reaped(pid.as_raw(), ExitReason::Code(code))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.reaped(pid.as_raw(), ExitReason::Signal(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "waitpid failed");
                    break;
                }
            }
        }
    }

    fn reaped(&mut self, pid: i32, reason: ExitReason) {
        match self.pids.remove(&pid) {
            Some(id) => {
                self.probes.remove(&id);
                self.feed(Event::Exited {
                    pid: Pid(pid),
                    reason,
                });
                self.repair_paths();
            }
            None => debug!(pid, %reason, "reaped an orphaned descendant"),
        }
    }

    fn on_notify(&mut self, m: notify::Message) {
        if m.fields.iter().all(|(k, _)| k == "BARRIER") {
            // sd_notify_barrier(3): receiving it (and closing its fd) is the answer.
            return;
        }
        let pids = &self.pids;
        let Some(owner) = notify::owning_worker(m.pid, |p| pids.contains_key(&p)) else {
            if self.ignored_senders.insert(m.pid) {
                warn!(sender = m.pid, message = ?m.fields, "ignoring a notify message from a process that is not a worker of holdfast");
            }
            return;
        };
        let Some(&id) = self.pids.get(&owner) else {
            return;
        };
        if let Some(status) = m.get("STATUS") {
            self.feed(Event::Status {
                id,
                status: status.to_string(),
            });
        }
        if m.get("READY") == Some("1") && self.sv.policy().ready == ReadyMode::Notify {
            debug!(worker = %id, sender = m.pid, "READY=1");
            self.feed(Event::Ready { id });
        }
        if m.get("STOPPING") == Some("1") {
            debug!(worker = %id, sender = m.pid, "STOPPING=1");
        }
    }

    fn repair_paths(&self) {
        for l in &self.listeners {
            match l.repair() {
                Ok(true) => {
                    warn!(address = %l.address, "the unix socket path was removed or replaced (a worker unlinked it; Puma does this to inherited unix sockets it does not bind with a matching -b); restored it to holdfast's listening socket")
                }
                Ok(false) => {}
                Err(e) => {
                    error!(address = %l.address, error = %e, "cannot restore the unix socket path")
                }
            }
        }
    }

    /// Starts a sampling round off the loop (spawn_blocking) unless one is
    /// still running; its result comes back as `Event::MemorySample`.
    fn sample_memory(&mut self) {
        let Some(m) = &self.config.memory else {
            return;
        };
        // A round that has not come back in a minute is lost (its thread panicked): start anew.
        if self
            .sampling
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            debug!("the previous memory round is still running; skipping this one");
            return;
        }
        let metric = m.metric();
        // Only ready workers: decisions are about them, and a tree read while a
        // worker was still starting (children not yet forked) must not be
        // judged after it turned ready.
        let workers: Vec<(WorkerId, Pid)> = self
            .sv
            .workers()
            .filter(|w| matches!(w.state, WorkerState::Ready { .. }))
            .filter_map(|w| Some((w.id, w.pid?)))
            .collect();
        if workers.is_empty() {
            return;
        }
        self.sampling = Some(Instant::now());
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let samples = memory::sample(&workers, metric);
            let _ = tx.send(Input::Event(Event::MemorySample { samples }));
        });
    }

    /// Keeps the figures of this round for `memory_of`; workers not in it are forgotten.
    fn record_memory(&mut self, samples: &[memory::TreeSample]) {
        let Some(m) = &self.config.memory else {
            return;
        };
        let metric = m.metric();
        let now = Instant::now();
        self.memory = samples
            .iter()
            .filter(|s| self.pids.contains_key(&s.pid.0))
            .map(|s| (s.pid, Reading::of(s, metric, now)))
            .collect();
    }

    /// After READY: does the worker's process tree hold the listening sockets?
    fn verify(&self, pid: Pid) {
        let want: Vec<(String, u64)> = self
            .listeners
            .iter()
            .filter_map(|l| l.socket_inode().ok().map(|i| (l.address.to_string(), i)))
            .collect();
        tokio::task::spawn_blocking(move || {
            let held = crate::tree::socket_inodes(pid.0);
            let missing: Vec<&str> = want
                .iter()
                .filter(|(_, inode)| !held.contains(inode))
                .map(|(a, _)| a.as_str())
                .collect();
            if missing.len() == want.len() && !want.is_empty() {
                error!(%pid, listeners = ?missing,
                    "worker is ready but no process in its tree holds any of holdfast's listening sockets: a wrapper probably closed the inherited fds (e.g. `bundle exec` of Bundler < 2 without --keep-file-descriptors), or the server bound a socket of its own. Requests to these addresses are not served by this worker");
            } else if !missing.is_empty() {
                debug!(%pid, listeners = ?missing, "worker does not hold some listening sockets");
            }
        });
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.probes.clear();
        let _ = &self.rundir;
    }
}

/// Inodes of `listeners`' sockets: a passed socket already held is not claimed twice.
fn inodes(listeners: &[Rc<Listener>]) -> Vec<u64> {
    listeners
        .iter()
        .filter_map(|l| l.socket_inode().ok())
        .collect()
}

/// The test hook: with `HOLDFAST_TEST_STALL_ON_USR2=SECONDS` set, SIGUSR2
/// blocks the event loop's thread for that long (so tests can see the
/// watchdog pings stop). Not for production use.
fn stall_hook() -> Option<(signal_hook_tokio::Signals, Duration)> {
    let secs: f64 = std::env::var(STALL_HOOK).ok()?.trim().parse().ok()?;
    let stall = Duration::try_from_secs_f64(secs).ok()?;
    match signal_hook_tokio::Signals::new([SIGUSR2]) {
        Ok(s) => {
            warn!(hook = STALL_HOOK, stall = ?stall, "test hook enabled: SIGUSR2 stalls the event loop");
            Some((s, stall))
        }
        Err(e) => {
            warn!(error = %e, "cannot install the SIGUSR2 test hook");
            None
        }
    }
}

async fn next_signal(
    hook: &mut Option<(signal_hook_tokio::Signals, Duration)>,
) -> Option<Duration> {
    match hook {
        Some((s, d)) => s.next().await.map(|_| *d),
        None => std::future::pending().await,
    }
}

/// Blocks the loop's thread on purpose (the SIGUSR2 test hook).
fn stall_loop(d: Duration) {
    warn!(stall = ?d, "test hook: stalling the event loop");
    std::thread::sleep(d);
    warn!("test hook: event loop stall over");
}

/// GETs `path` on the probe socket every 100 ms until it answers below 500.
async fn probe_until_ready(
    sock: PathBuf,
    path: String,
    id: WorkerId,
    tx: mpsc::UnboundedSender<Input>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        match tokio::time::timeout(Duration::from_secs(5), probe_once(&sock, &path)).await {
            Ok(Ok(status)) if status < 500 => {
                let _ = tx.send(Input::Event(Event::Ready { id }));
                return;
            }
            Ok(Ok(status)) => debug!(worker = %id, status, "probe: not ready yet"),
            Ok(Err(e)) => debug!(worker = %id, error = %e, "probe: not ready yet"),
            Err(_) => debug!(worker = %id, "probe: timed out"),
        }
    }
}

async fn probe_once(sock: &Path, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock).await?;
    s.write_all(
        format!(
            "GET {path} HTTP/1.0\r\nHost: holdfast-probe\r\nUser-Agent: holdfast-probe\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let k = s.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP status line: {line:?}"),
            )
        })
}

/// The sampling timer: a late tick is not made up for by a burst (a burst
/// would count one spike as several samples).
fn memory_interval(every: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// Waits for the next tick of `interval`, or forever without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Whether two `[logs]` tables ask for the same thing.
fn same_logs(a: &LogsConfig, b: &LogsConfig) -> bool {
    a.stdout == b.stdout
        && a.stderr == b.stderr
        && a.prefix == b.prefix
        && a.holdfast_log == b.holdfast_log
        && a.reopen_signal.as_ref().map(|s| s.0) == b.reopen_signal.as_ref().map(|s| s.0)
}

fn signame(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string())
}
