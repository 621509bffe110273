//! The edge: the one event loop that feeds the supervisor and carries out
//! its actions.
//!
//! It only does: receive (signal, child exit, notify datagram, probe result,
//! timer, helper answer) → `Supervisor::step` → run the actions → feed their
//! results back as events. It decides nothing about workers: which
//! generation a worker runs, whether a READY=1 counts, who is signalled and
//! when, are the supervisor's. A failed action becomes an event
//! (`SpawnFailed`), never an early return, so one bad worker cannot take the
//! loop down.
//!
//! Nothing here blocks the loop: a reload reads its file and binds its
//! sockets on a blocking thread; socket checks, memory rounds and the /proc
//! walk that finds who sent a notify datagram run there too; an exec
//! failure is read from the child's report pipe when the child is reaped;
//! messages to systemd go through the notifier's own thread.

use std::collections::{HashMap, HashSet, VecDeque};
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

use crate::config::{Address, Config, LogsConfig, Overrides, ReadyMode};
use crate::control::{self, ControlSocket};
use crate::listener::{self, Listener};
use crate::logs::{LogCounters, Logs};
use crate::notify::{self, NotifySocket};
use crate::spawn::{self, Start};
use crate::status::Snapshot;
use crate::supervisor::{
    Action, AdoptedProc, Event, ExitReason, Generation, Pid, ReadyVia, ReplyTo, Request, Scale,
    Settings, Slot, Spec, Supervisor, WorkerId,
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
/// How often the edge looks for adopted descendants and unlinked unix paths
/// when nothing else made it look.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// The generation spec of `config` (the program resolved on PATH).
pub fn spec_of(config: &Config) -> Result<Spec, crate::sys::SpawnError> {
    let program = spawn::resolve_program(&config.app)?;
    Ok(Spec {
        app: config.app.clone(),
        program,
        listeners: config.listen.clone(),
        memory: config.memory.clone(),
    })
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

/// Who waits on a reload: for its end, and for its start.
#[derive(Default)]
struct ReloadWaiter {
    reply: Option<Reply>,
    started: Option<Reply>,
}

/// Messages into the loop from its helpers (probes, control connections,
/// blocking threads).
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
    /// Re-read the config and roll every worker (SIGHUP). `reply`: when the
    /// rollout ends; `started`: when it has started (or was refused).
    Reload {
        reply: Option<Reply>,
        started: Option<Reply>,
    },
    /// A reload prepared off the loop.
    Prepared(Box<Prepared>),
    /// A notify datagram whose sender was found to belong to worker `id`.
    Notified {
        id: WorkerId,
        fields: Vec<(String, String)>,
    },
    /// A notify datagram from a process that belongs to no worker.
    NotifyStranger {
        sender: i32,
    },
}

/// What a reload read and bound on its blocking thread.
pub struct Prepared {
    result: Result<(Config, Spec, Vec<Listener>), String>,
    /// The sockets systemd passed, handed back to the loop.
    inherited: Inherited,
}

pub struct Runtime {
    /// The last accepted config (control socket, logs, metrics).
    config: Config,
    overrides: Overrides,
    sv: Supervisor,
    /// The current config's listeners, in order.
    listeners: Vec<Rc<Listener>>,
    /// Every listener some generation still uses (a superset of `listeners`).
    held: Vec<Rc<Listener>>,
    /// Unreaped worker processes (their own pid).
    pids: HashMap<i32, WorkerId>,
    /// Exec reports of workers that may not have exec'd yet.
    execs: HashMap<i32, (WorkerId, crate::sys::ExecReport)>,
    probes: HashMap<WorkerId, Probe>,
    /// holdfast's delegated cgroup, when it has one: a cgroup per worker.
    cgroups: Option<crate::procs::Cgroups>,
    worker_cgroups: HashMap<WorkerId, crate::procs::WorkerCgroup>,
    /// What the previous holdfast of this unit left running (see [`Previous`]).
    previous: Previous,
    notify: NotifySocket,
    rundir: tempfile::TempDir,
    devnull: OwnedFd,
    logs: Logs,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    /// Reply channels by the id the supervisor answers to (a reload folded
    /// from several requests answers them all).
    replies: HashMap<ReplyTo, Vec<Reply>>,
    next_reply: u64,
    pending: VecDeque<Event>,
    exit: Option<i32>,
    ignored_senders: HashSet<i32>,
    /// What systemd is told (READY, RELOADING, STOPPING, STATUS, WATCHDOG, FDSTORE).
    systemd: Notifier,
    /// Sockets systemd passed that no entry holds now (claimable on reload);
    /// `None` while a reload has them on its thread.
    inherited: Option<Inherited>,
    /// Reloads served by the preparation under way (`Some` while one is).
    reloading: Option<Vec<ReloadWaiter>>,
    /// Reloads asked for meanwhile: one more preparation serves them all.
    reload_pending: Vec<ReloadWaiter>,
    started: Instant,
    /// Bound in `new`, served from `run`.
    control: Option<ControlSocket>,
    metrics: Option<std::net::TcpListener>,
}

struct Probe {
    path: PathBuf,
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

/// The workers an earlier holdfast of the same unit left in their cgroups
/// (see `procs::Cgroups::previous_workers`): with `KillMode=process`,
/// systemd restarts a crashed holdfast without killing them, and they drain
/// on their parent-death signal while the new holdfast takes over the
/// sockets from the fd store. systemd will not end them later either (not
/// even at a stop), so holdfast does: each second it removes the cgroups
/// that emptied, at `kill_at` (start + drain_timeout) it kills the rest
/// through `cgroup.kill`, and it exits only once they are gone.
struct Previous {
    cgroups: Vec<crate::procs::WorkerCgroup>,
    kill_at: Instant,
    killed: bool,
}

/// How long an exiting holdfast waits for the previous holdfast's workers
/// after killing them (a process in uninterruptible sleep): then it exits anyway.
const PREVIOUS_ABANDON_AFTER: Duration = Duration::from_secs(5);

impl Previous {
    fn find(cgroups: Option<&crate::procs::Cgroups>, drain_timeout: Duration) -> Previous {
        let found = cgroups.map(|c| c.previous_workers()).unwrap_or_default();
        if !found.is_empty() {
            let names: Vec<String> = found
                .iter()
                .map(|c| c.dir().display().to_string())
                .collect();
            let pids: Vec<i32> = found
                .iter()
                .flat_map(|c| c.pids().unwrap_or_default())
                .collect();
            warn!(cgroups = ?names, pids = ?pids, drain_timeout = ?drain_timeout,
                "the previous holdfast of this unit left workers running (they drain since it died, on their parent-death signal); new workers start now; these are killed if still there after drain_timeout");
        }
        Previous {
            cgroups: found,
            kill_at: Instant::now() + drain_timeout,
            killed: false,
        }
    }

    /// The first worker id after theirs.
    fn next_serial(&self) -> Option<u64> {
        self.cgroups.iter().map(|c| c.serial() + 1).max()
    }

    /// Removes the cgroups that emptied; past `kill_at`, kills the rest.
    fn check(&mut self, now: Instant) {
        if self.cgroups.is_empty() {
            return;
        }
        let kill = now >= self.kill_at;
        let mut left = Vec::new();
        for cg in std::mem::take(&mut self.cgroups) {
            match cg.pids() {
                Ok(p) if p.is_empty() => {
                    let dir = cg.dir().display().to_string();
                    match cg.remove() {
                        Ok(()) => {
                            info!(cgroup = %dir, "a worker of the previous holdfast has exited")
                        }
                        Err(e) => {
                            warn!(cgroup = %dir, error = %e, "cannot remove a worker cgroup of the previous holdfast")
                        }
                    }
                }
                Ok(p) => {
                    if kill && !self.killed {
                        warn!(cgroup = %cg.dir().display(), pids = ?p, "a worker of the previous holdfast still runs after drain_timeout: SIGKILL to its cgroup");
                    }
                    if kill {
                        if let Err(e) = cg.kill() {
                            warn!(cgroup = %cg.dir().display(), error = %e, "cannot kill a worker cgroup of the previous holdfast");
                        }
                    }
                    left.push(cg);
                }
                Err(e) => {
                    // Removed behind holdfast's back: nothing left to wait for.
                    debug!(cgroup = %cg.dir().display(), error = %e, "previous worker cgroup unreadable; forgetting it");
                }
            }
        }
        self.killed |= kill;
        self.cgroups = left;
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
        let spec = spec_of(&config)?;
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
        let cgroups = match crate::procs::Cgroups::detect() {
            Ok(c) => {
                info!(cgroup = %c.dir().display(), "a cgroup per worker: every descendant of a worker is contained and ends with it");
                Some(c)
            }
            Err(why) => {
                info!(reason = %why, "no cgroup per worker; descendants that leave a worker's process group are tracked as holdfast's adopted children");
                None
            }
        };
        let previous = Previous::find(cgroups.as_ref(), config.app.drain_timeout);
        let logs = Logs::start(&config.logs)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let settings = Settings {
            seed: random_seed(),
            reopen_signal: config.logs.reopen_signal.map(|s| s.0),
        };
        let mut sv = Supervisor::new(spec, settings);
        if let Some(first) = previous.next_serial() {
            sv.number_workers_from(first);
        }
        Ok(Runtime {
            sv,
            config,
            overrides,
            held: listeners.clone(),
            listeners,
            pids: HashMap::new(),
            execs: HashMap::new(),
            probes: HashMap::new(),
            cgroups,
            worker_cgroups: HashMap::new(),
            previous,
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
            ignored_senders: HashSet::new(),
            systemd,
            inherited: Some(inherited),
            reloading: None,
            reload_pending: Vec::new(),
            started: Instant::now(),
            control,
            metrics,
        })
    }

    /// The log plumbing's counters, now (for status).
    pub fn log_stats(&self) -> LogCounters {
        self.logs.stats()
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
        info!(pid = std::process::id(), workers = self.sv.workers_wanted(), command = ?self.config.app.command.0, "holdfast started");
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
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = housekeeping.tick() => self.housekeeping(false),
                _ = systemd_sleep => self.systemd.due(Instant::now(), &self.sv),
                Some(d) = next_signal(&mut stall) => stall_loop(d),
            }
        }
        // systemd (KillMode=process) leaves what the previous holdfast
        // left to us: a stop ends once it is gone.
        let abandon = self.previous.kill_at.max(Instant::now()) + PREVIOUS_ABANDON_AFTER;
        while !self.previous.cgroups.is_empty() && Instant::now() < abandon {
            self.previous.check(Instant::now());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if self.systemd.uses_fd_store() {
            // The sockets live on in systemd's fd store: the next holdfast
            // adopts them by these paths. (A final stop closes the store
            // and removes RuntimeDirectory=, paths and keepers with it.) A
            // socket-activated path is systemd's and stays anyway; its
            // keeper link is holdfast's and goes.
            for l in self
                .held
                .iter()
                .filter(|l| !matches!(l.origin, listener::Origin::Activated { .. }))
            {
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
        self.systemd.flush(Duration::from_secs(2));
        code
    }

    fn on_signal(&mut self, sig: i32) {
        let request = |request| Event::Request {
            request,
            reply: None,
        };
        match sig {
            SIGCHLD => self.reap(),
            SIGTERM | SIGINT => {
                info!(signal = %signame(sig), "stop requested");
                self.feed(request(Request::Stop));
            }
            SIGHUP => {
                info!("SIGHUP: re-reading the config and rolling every worker");
                self.reload(ReloadWaiter::default());
            }
            SIGTTIN => {
                info!("SIGTTIN: one more worker");
                self.feed(request(Request::Scale(Scale::Up)));
            }
            SIGTTOU => {
                info!("SIGTTOU: one worker fewer");
                self.feed(request(Request::Scale(Scale::Down)));
            }
            SIGUSR1 => {
                info!("SIGUSR1: reopening the log files");
                self.feed(request(Request::ReopenLogs));
            }
            _ => {}
        }
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Event(e) => self.feed(e),
            Input::Request { request, reply } => {
                let reply = reply.map(|r| self.hold_reply(r));
                self.feed(Event::Request { request, reply });
            }
            Input::Reload { reply, started } => self.reload(ReloadWaiter { reply, started }),
            Input::Prepared(p) => self.prepared(*p),
            Input::Status { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Input::ReopenLogs { reply } => {
                let reply = reply.map(|r| self.hold_reply(r));
                self.feed(Event::Request {
                    request: Request::ReopenLogs,
                    reply,
                });
            }
            Input::Notified { id, fields } => self.notified(id, fields),
            Input::NotifyStranger { sender } => {
                if self.ignored_senders.insert(sender) {
                    warn!(
                        sender,
                        "ignoring notify messages from a process that is not a worker of holdfast"
                    );
                }
            }
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

    fn hold_reply(&mut self, r: Reply) -> ReplyTo {
        self.hold_replies(vec![r]).unwrap_or(ReplyTo(0))
    }

    /// One id for all of `rs`; `None` when there is nobody to answer.
    fn hold_replies(&mut self, rs: Vec<Reply>) -> Option<ReplyTo> {
        if rs.is_empty() {
            return None;
        }
        let to = ReplyTo(self.next_reply);
        self.next_reply += 1;
        self.replies.insert(to, rs);
        Some(to)
    }

    /// Re-reads the config and binds its new sockets on a blocking thread;
    /// the result comes back as [`Input::Prepared`]. Reloads asked for
    /// while one is prepared are folded into one more after it (a hundred
    /// SIGHUPs make at most two rollouts).
    fn reload(&mut self, w: ReloadWaiter) {
        if self.sv.is_stopping() {
            info!("reload ignored: holdfast is stopping");
            for r in [w.reply, w.started].into_iter().flatten() {
                let _ = r.send(Err("holdfast is stopping".into()));
            }
            return;
        }
        self.reload_pending.push(w);
        if self.reloading.is_none() {
            self.start_reload();
        } else {
            debug!("a reload is being prepared; another follows it");
        }
    }

    fn start_reload(&mut self) {
        let Some(mut inherited) = self.inherited.take() else {
            return;
        };
        self.reloading = Some(std::mem::take(&mut self.reload_pending));
        let path = self.config.path.clone();
        let overrides = self.overrides.clone();
        let held: Vec<(Address, u64)> = self
            .held
            .iter()
            .map(|l| (l.address.clone(), l.socket_inode().unwrap_or(0)))
            .chain(
                // An activated socket is also known by its systemd: name.
                self.held.iter().filter_map(|l| match &l.origin {
                    listener::Origin::Activated { name } => Some((
                        Address::Systemd(name.clone()),
                        l.socket_inode().unwrap_or(0),
                    )),
                    _ => None,
                }),
            )
            .collect();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = prepare(path.as_deref(), &overrides, &held, &mut inherited);
            let _ = tx.send(Input::Prepared(Box::new(Prepared { result, inherited })));
        });
    }

    /// A reload came back from its thread: roll out, or refuse with its error.
    fn prepared(&mut self, p: Prepared) {
        self.inherited = Some(p.inherited);
        let waiters = self.reloading.take().unwrap_or_default();
        let (replies, started): (Vec<_>, Vec<_>) =
            waiters.into_iter().map(|w| (w.reply, w.started)).unzip();
        let reply = self.hold_replies(replies.into_iter().flatten().collect());
        let started: Vec<Reply> = started.into_iter().flatten().collect();
        // Each reload must be answered RELOADING=1 … READY=1 (see
        // `Notifier::reload_began`), also one that lands during a rollout.
        let during_rollout = self.systemd.told() == crate::systemd::Told::Reloading;
        let answer = match p.result {
            Err(error) => {
                let answer = Err(format!("reload rejected: {error}"));
                self.feed(Event::ReloadRejected { error, reply });
                answer
            }
            Ok((config, spec, bound)) => {
                for l in bound {
                    info!(name = %l.name, address = %l.address, origin = %l.origin, "listening (new in this config)");
                    self.held.push(Rc::new(l));
                }
                let listeners: Vec<Rc<Listener>> = config
                    .listen
                    .iter()
                    .filter_map(|want| self.held.iter().find(|l| l.serves(&want.address)))
                    .cloned()
                    .collect();
                if !same_logs(&config.logs, self.logs.config()) {
                    warn!("[logs] changes take effect only on a restart of holdfast");
                }
                if config.control_socket != self.config.control_socket {
                    warn!(old = %self.config.control_socket.display(), new = %config.control_socket.display(), "control_socket changes take effect only on a restart of holdfast");
                }
                self.systemd.store_changes(&self.listeners, &listeners);
                self.listeners = listeners;
                self.config = config;
                self.feed(Event::Request {
                    request: Request::Rollout {
                        spec: Box::new(spec),
                    },
                    reply,
                });
                match self.sv.rollout() {
                    Some(r) => Ok(format!("rollout of generation {} started", r.generation)),
                    None if self.sv.is_stopping() => Err("holdfast is stopping".to_string()),
                    None => Ok("rollout done".to_string()),
                }
            }
        };
        if during_rollout {
            self.systemd.reload_began();
        }
        for s in started {
            let _ = s.send(answer.clone());
        }
        if self.reload_pending.is_empty() {
            return;
        }
        if self.sv.is_stopping() {
            for w in std::mem::take(&mut self.reload_pending) {
                for r in [w.reply, w.started].into_iter().flatten() {
                    let _ = r.send(Err("holdfast is stopping".into()));
                }
            }
        } else {
            self.start_reload();
        }
    }

    /// Steps the supervisor with `event` and everything its actions produce.
    fn feed(&mut self, event: Event) {
        self.pending.push_back(event);
        while let Some(e) = self.pending.pop_front() {
            let now = Instant::now();
            for action in self.sv.step(now, e) {
                self.act(action);
            }
        }
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
            Action::Drain { id, pid, signal } => {
                debug!(worker = %id, %pid, %signal, "drain signal to the process group");
                signal_group(pid, signal);
            }
            Action::Signal { pid, signal } => {
                debug!(%pid, %signal, "signal");
                if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.0), signal) {
                    debug!(%pid, %signal, error = %e, "signal failed");
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
                match crate::memory::signal_descendant(worker, pid, signal) {
                    Ok(crate::memory::Signalled::Sent) => {
                        debug!(worker = %id, %pid, %signal, "signal to a worker's descendant")
                    }
                    Ok(crate::memory::Signalled::NotDescendant) => {
                        info!(worker_pid = %worker, %pid, %signal, "process {pid} is gone or no longer under worker pid {worker}: not signalled")
                    }
                    Err(e) => warn!(%pid, %signal, error = %e, "signal failed"),
                }
            }
            Action::Kill { id, pid } => {
                debug!(worker = %id, %pid, "SIGKILL to the process group");
                signal_group(pid, Signal::SIGKILL);
                if let Some(cg) = self.worker_cgroups.get(&id) {
                    if let Err(e) = cg.kill() {
                        warn!(worker = %id, cgroup = %cg.dir().display(), error = %e, "cannot kill the worker's cgroup");
                    }
                }
            }
            Action::CheckSockets {
                id,
                pid,
                generation,
            } => self.check_sockets(id, pid, generation),
            Action::Sample { targets } => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || {
                    let samples = crate::memory::sample(&targets);
                    let _ = tx.send(Input::Event(Event::MemorySample { samples }));
                });
            }
            Action::ReopenLogs { reply, signalled } => {
                let reply = reply
                    .and_then(|to| self.replies.remove(&to))
                    .unwrap_or_default();
                let done = self.logs.reopen();
                tokio::spawn(async move {
                    let reopened = done.await;
                    if reply.is_empty() && reopened.nothing() && signalled.is_none() {
                        info!("no log files in [logs]; nothing to reopen");
                    }
                    for r in reply {
                        let _ = r.send(reopened.reply(signalled));
                    }
                });
            }
            Action::Service { state, status } => self.systemd.tell(state, &status),
            Action::Retire { generation } => {
                debug!(%generation, "generation retired");
                self.release_listeners();
            }
            Action::Released { id } => {
                self.probes.remove(&id);
                self.remove_cgroup(id);
            }
            Action::Reply { to, outcome } => {
                let replies = self.replies.remove(&to).unwrap_or_default();
                if !replies.is_empty() {
                    // After what systemd was told before it (READY=1 at a
                    // rollout's end): see `Notifier::then`.
                    self.systemd.then(Box::new(move || {
                        for r in replies {
                            let _ = r.send(outcome.clone());
                        }
                    }));
                }
            }
            Action::Exit { code } => self.exit = Some(code),
        }
    }

    /// Closes the listeners no generation uses any more (a reload dropped
    /// them and the last worker that had them is gone).
    fn release_listeners(&mut self) {
        let specs: Vec<&Spec> = self.sv.specs().map(|(_, s)| s).collect();
        let listeners = &self.listeners;
        self.held.retain(|l| {
            let used = listeners.iter().any(|c| Rc::ptr_eq(c, l))
                || specs
                    .iter()
                    .any(|s| s.listeners.iter().any(|w| l.serves(&w.address)));
            if !used {
                info!(address = %l.address, "closing a listener no generation uses any more");
            }
            used
        });
    }

    /// The listeners of `spec`, in fd order.
    fn listeners_of(&self, spec: &Spec) -> Result<Vec<Rc<Listener>>, String> {
        spec.listeners
            .iter()
            .map(|want| {
                self.held
                    .iter()
                    .find(|l| l.serves(&want.address))
                    .cloned()
                    .ok_or_else(|| {
                        format!("listener {} is not held (internal error)", want.address)
                    })
            })
            .collect()
    }

    fn spawn(&mut self, id: WorkerId, slot: Slot, generation: Generation) -> Result<Pid, String> {
        let Some(spec) = self.sv.spec(generation) else {
            return Err(format!(
                "no spec for generation {generation} (internal error)"
            ));
        };
        let listeners = self.listeners_of(spec)?;
        let probe = if spec.ready() == ReadyMode::Probe {
            let path = self.rundir.path().join(format!("probe-{id}.sock"));
            let fd = listener::bind_probe(&path)
                .map_err(|e| format!("probe socket {}: {e}", path.display()))?;
            Some((path, fd))
        } else {
            None
        };
        let pipes = self.logs.pipes().map_err(|e| e.to_string())?;
        let [out, err] = pipes.child_ends();
        let cgroup = match &self.cgroups {
            Some(c) => Some(
                c.create(id.0)
                    .map_err(|e| format!("cgroup for worker {id} in {}: {e}", c.dir().display()))?,
            ),
            None => None,
        };
        let start = Start {
            slot,
            generation,
            serial: id.0,
            cgroup_procs: cgroup.as_ref().map(|c| c.procs_fd().as_raw_fd()),
            notify_socket: self.notify.path(),
            probe: probe.as_ref().map(|(_, fd)| fd.as_raw_fd()),
            stdio: [self.devnull.as_raw_fd(), out, err],
        };
        let started = spawn::start(spec, &listeners, &start).map_err(|e| e.to_string())?;
        let pid = started.pid.as_raw();
        if let Some(cg) = cgroup {
            self.worker_cgroups.insert(id, cg);
        }
        self.logs.attach(pipes, slot, Pid(pid));
        self.pids.insert(pid, id);
        self.execs.insert(pid, (id, started.report));
        if let Some((path, _fd)) = probe {
            // The worker has the probe socket now; holdfast only connects to it.
            let task = tokio::spawn(crate::probe::until_ready(
                path.clone(),
                spec.app.ready_path.clone(),
                id,
                self.tx.clone(),
            ));
            self.probes.insert(
                id,
                Probe {
                    path,
                    task: Some(task),
                },
            );
        }
        Ok(Pid(pid))
    }

    fn reap(&mut self) {
        let mut any = false;
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
            any = true;
        }
        if any {
            // An exit may have orphaned descendants, or unlinked a unix path:
            // the supervisor hears of both before it decides anything else.
            self.housekeeping(true);
        }
    }

    fn reaped(&mut self, pid: i32, reason: ExitReason) {
        // An exec that failed reports before the child's exit counts.
        if let Some((id, mut report)) = self.execs.remove(&pid) {
            if let Some(Err(e)) = report.poll() {
                self.pids.remove(&pid);
                self.feed(Event::SpawnFailed {
                    id,
                    error: e.to_string(),
                });
            }
        }
        self.pids.remove(&pid);
        self.feed(Event::Exited {
            pid: Pid(pid),
            reason,
        });
    }

    /// Every second and after exits (`after_exit`): settle exec reports,
    /// list adopted descendants, restore unlinked unix paths.
    fn housekeeping(&mut self, after_exit: bool) {
        self.previous.check(Instant::now());
        self.execs
            .retain(|_, (_, report)| !matches!(report.poll(), Some(Ok(()))));
        self.repair_paths();
        let pids = &self.pids;
        let procs: Vec<AdoptedProc> =
            crate::procs::adopted(|p| pids.contains_key(&p), self.cgroups.as_ref())
                .into_iter()
                .map(|a| AdoptedProc {
                    pid: Pid(a.pid),
                    pgid: Pid(a.pgid),
                    worker: a.cgroup_serial.or(a.serial).map(WorkerId),
                    comm: a.comm,
                })
                .collect();
        if after_exit || !procs.is_empty() || self.sv.strays().next().is_some() {
            self.feed(Event::Adopted { procs });
        }
    }

    /// After READY: which required listeners does the worker's tree (with
    /// its adopted descendants) not hold? Off the loop; answers as an event.
    fn check_sockets(&mut self, id: WorkerId, pid: Pid, generation: Generation) {
        let want: Vec<(String, u64)> = match self.sv.spec(generation) {
            Some(spec) => spec
                .required_listeners()
                .filter_map(|w| {
                    let l = self.held.iter().find(|l| l.serves(&w.address))?;
                    Some((w.address.to_string(), l.socket_inode().ok()?))
                })
                .collect(),
            None => Vec::new(),
        };
        let extra: Vec<i32> = self
            .sv
            .strays()
            .filter(|s| s.worker == Some(id))
            .map(|s| s.pid.0)
            .collect();
        self.repair_paths();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut held = crate::tree::socket_inodes(pid.0);
            for p in extra {
                held.extend(crate::tree::socket_inodes(p));
            }
            let missing: Vec<String> = want
                .into_iter()
                .filter(|(_, inode)| !held.contains(inode))
                .map(|(a, _)| a)
                .collect();
            let _ = tx.send(Input::Event(Event::SocketsChecked { id, missing }));
        });
    }

    fn on_notify(&mut self, m: notify::Message) {
        if m.fields.iter().all(|(k, _)| k == "BARRIER") {
            // sd_notify_barrier(3): receiving it (and closing its fd) is the answer.
            return;
        }
        if let Some(&id) = self.pids.get(&m.pid) {
            return self.notified(id, m.fields);
        }
        // A descendant in its worker's process group (most are): one small
        // read, here and now, before a sender that exits at once is gone.
        let group = crate::procs::stat(m.pid).and_then(|s| self.pids.get(&s.pgrp).copied());
        if let Some(id) = group {
            return self.notified(id, m.fields);
        }
        // Elsewhere: which worker it belongs to is a walk of /proc, off the loop.
        let workers: HashMap<i32, WorkerId> = self.pids.clone();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            match notify::owning_worker(m.pid, |p| workers.contains_key(&p)) {
                Some(owner) => {
                    if let Some(&id) = workers.get(&owner) {
                        let _ = tx.send(Input::Notified {
                            id,
                            fields: m.fields,
                        });
                    }
                }
                None => {
                    debug!(sender = m.pid, message = ?m.fields, "notify message from a process that is not a worker's");
                    let _ = tx.send(Input::NotifyStranger { sender: m.pid });
                }
            }
        });
    }

    fn notified(&mut self, id: WorkerId, fields: Vec<(String, String)>) {
        let get = |key: &str| {
            fields
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if let Some(status) = get("STATUS") {
            self.feed(Event::Status {
                id,
                status: status.to_string(),
            });
        }
        if get("READY") == Some("1") {
            debug!(worker = %id, "READY=1");
            self.feed(Event::Ready {
                id,
                via: ReadyVia::Notify,
            });
        }
        if get("STOPPING") == Some("1") {
            debug!(worker = %id, "STOPPING=1");
        }
    }

    /// A worker and its descendants are gone: its cgroup goes too (if it is
    /// still busy, a later release retries).
    fn remove_cgroup(&mut self, id: WorkerId) {
        let Some(cg) = self.worker_cgroups.remove(&id) else {
            return;
        };
        match cg.pids() {
            Ok(p) if !p.is_empty() => {
                debug!(worker = %id, pids = ?p, "worker cgroup still has processes; kept for now");
                self.worker_cgroups.insert(id, cg);
            }
            _ => {
                let dir = cg.dir().to_path_buf();
                if let Err(e) = cg.remove() {
                    warn!(cgroup = %dir.display(), error = %e, "cannot remove a worker's cgroup");
                }
            }
        }
    }

    fn repair_paths(&self) {
        for l in &self.held {
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
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.probes.clear();
        let _ = &self.rundir;
    }
}

/// The reload's blocking half: read and validate the config, resolve the
/// command, and take or bind the sockets it names that `held` lacks.
fn prepare(
    path: Option<&Path>,
    overrides: &Overrides,
    held: &[(Address, u64)],
    inherited: &mut Inherited,
) -> Result<(Config, Spec, Vec<Listener>), String> {
    let config = Config::load(path, overrides).map_err(|e| e.to_string())?;
    let spec = spec_of(&config).map_err(|e| e.to_string())?;
    let mut bound: Vec<Listener> = Vec::new();
    for l in &config.listen {
        if held.iter().any(|(a, _)| a == &l.address) || bound.iter().any(|b| b.serves(&l.address)) {
            continue;
        }
        let in_use: Vec<u64> = held
            .iter()
            .map(|(_, i)| *i)
            .chain(bound.iter().filter_map(|b| b.socket_inode().ok()))
            .collect();
        let listener = match inherited.claim(l, &in_use).map_err(|e| e.to_string())? {
            Some(a) => a,
            None => Listener::bind(l).map_err(|e| e.to_string())?,
        };
        bound.push(listener);
    }
    Ok((config, spec, bound))
}

/// `signal` to the process group `pid` leads, or to `pid` alone when it left
/// the group (a server that called setsid itself).
fn signal_group(pid: Pid, signal: Signal) {
    let p = nix::unistd::Pid::from_raw(pid.0);
    match nix::sys::signal::killpg(p, signal) {
        Ok(()) => {}
        Err(nix::errno::Errno::ESRCH) => {
            if let Err(e) = nix::sys::signal::kill(p, signal) {
                debug!(%pid, %signal, error = %e, "signal failed");
            }
        }
        Err(e) => warn!(%pid, %signal, error = %e, "signal to the process group failed"),
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
