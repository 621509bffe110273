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
//!
//! The in-place upgrade of holdfast itself has three files: `upgrade` (the
//! old image: check the binary, wait for a quiet moment, quiesce, hand over,
//! exec from the main thread, undo), `adopt` (the new image: read, check and
//! rebuild everything, or fall back to a rolling restart) and `handover`
//! (what crosses the exec: the versioned state and the format-independent
//! manifest).

mod adopt;
mod handover;
mod input;
pub mod notify;
mod previous;
pub mod probe;
mod reload;
mod upgrade;
mod workers;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use signal_hook::consts::signal::*;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::{Address, Config, LogsConfig, Overrides, ReadyMode};
use crate::control::{self, Call, ControlSocket, Reply};
use crate::core::{
    Action, AdoptedProc, Event, ExitReason, ReadyVia, Request, Scale, Settings, Spec, Supervisor,
};
use crate::ids::{Generation, Pid, ReplyTo, Slot, WorkerId};
use crate::logs::Logs;
use crate::os::listener::{self, Listener};
use crate::os::spawn::{self, Start};
use crate::status::Snapshot;
use crate::systemd::{ActivationError, Inherited, Notifier};
use notify::NotifySocket;

pub use adopt::{Fallback, Incoming};
pub use handover::{adopt_state, Entry, Manifest};
pub use handover::{MANIFEST_VAR, STATE_VAR};
use input::ReloadWaiter;
pub use input::{Input, Prepared};
pub use upgrade::version_json;
use workers::{signal_group, Probe};

/// Why holdfast could not start; each maps to a sysexits code.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    #[error("{0}")]
    Command(#[from] crate::os::sys::SpawnError),
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

/// How long a failed worker's exit waits for the log threads to read its
/// last lines (a log thread stuck on a slow disk answers late).
const OUTPUT_WAIT: Duration = Duration::from_millis(500);
/// How long an exiting holdfast waits for the last worker output to be written.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the edge looks for adopted descendants and unlinked unix paths
/// when nothing else made it look.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// The generation spec of `config` (the program resolved on PATH).
pub fn spec_of(config: &Config) -> Result<Spec, crate::os::sys::SpawnError> {
    let program = spawn::resolve_program(&config.app)?;
    Ok(Spec {
        app: config.app.clone(),
        program,
        listeners: config.listen.clone(),
        memory: config.memory.clone(),
    })
}

/// How holdfast was started: its command line and its binary, resolved at
/// start (`current_exe()`), so that an upgrade's default binary is the path
/// a package upgrade renames a new file over.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub argv: Vec<OsString>,
    pub exe: PathBuf,
}

impl Invocation {
    /// This process's, read now: call it first thing.
    pub fn current() -> Invocation {
        let argv: Vec<OsString> = std::env::args_os().collect();
        let exe = std::env::current_exe().unwrap_or_else(|_| {
            argv.first()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("holdfast"))
        });
        Invocation { argv, exe }
    }
}

/// holdfast's run directory (the workers' notify socket, probe sockets):
/// removed when holdfast exits, never at an exec, which runs no destructor
/// (an upgrade hands it to the new image).
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> std::io::Result<RunDir> {
        let dir = tempfile::Builder::new()
            .prefix("holdfast-")
            .tempdir_in(runtime_base())?;
        Ok(RunDir(dir.keep()))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Counts work under way off the loop (blocking helpers whose answers come
/// back as [`Input`]): an upgrade execs only when there is none, so no
/// answer is lost with the old image.
#[derive(Clone, Default)]
struct InFlight(Arc<AtomicUsize>);

/// One piece of off-loop work; dropped when its answer has been sent.
struct InFlightGuard(Arc<AtomicUsize>);

impl InFlight {
    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.0.clone())
    }
    fn none(&self) -> bool {
        self.0.load(Ordering::SeqCst) == 0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A random u64 from the std hasher's per-process random keys (no RNG crate needed).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
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
    /// Each worker's last lines of output, by pid (until it is reaped).
    tails: HashMap<i32, crate::logs::Tail>,
    /// Exec reports of workers that may not have exec'd yet.
    execs: HashMap<i32, (WorkerId, crate::os::sys::ExecReport)>,
    probes: HashMap<WorkerId, Probe>,
    /// holdfast's delegated cgroup, when it has one: a cgroup per worker.
    cgroups: Option<crate::os::proc::Cgroups>,
    worker_cgroups: HashMap<WorkerId, crate::os::proc::WorkerCgroup>,
    /// What the previous holdfast of this unit left running.
    previous: previous::Previous,
    notify: NotifySocket,
    rundir: RunDir,
    devnull: OwnedFd,
    logs: Logs,
    tx: mpsc::UnboundedSender<Input>,
    rx: mpsc::UnboundedReceiver<Input>,
    /// Requests of the control socket and `/metrics`.
    calls_tx: control::Calls,
    calls: mpsc::UnboundedReceiver<Call>,
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
    /// The control server and the metrics task, once `run` started them;
    /// the metrics listener's fd (owned by its task).
    control_server: Option<control::Server>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    metrics_fd: Option<RawFd>,
    /// `ListenOverflows`, `ListenDrops` when holdfast first started.
    baseline: Option<(u64, u64)>,
    /// How holdfast was started (an upgrade execs `exe` by default).
    invocation: Invocation,
    /// Off-loop work under way.
    in_flight: InFlight,
    /// The in-place upgrade under way, the edge's half.
    upgrade: Option<upgrade::Job>,
    /// Replies to `upgrade` without --wait: answered as the exec starts.
    early: HashSet<ReplyTo>,
    /// Holds the control server and /metrics still right before an exec.
    pause: control::Pause,
    /// In an image exec'd by an upgrade: what `run` tells the core first.
    adopted: Option<adopt::Adopted>,
    /// Socket checks the actions of this step asked for: one blocking task
    /// runs them all after the step (a recheck of every ready worker is one
    /// thread, not one per worker).
    socket_checks: Vec<workers::SocketCheck>,
    /// Which worker a descendant that sent a notify datagram belongs to, by
    /// (pid, start time): found once by a walk up its parents. Bounded.
    senders: HashMap<(i32, u64), WorkerId>,
    /// The /proc cost of the per-worker paths, for `status --json`.
    cost: crate::status::Cost,
}

/// Where holdfast's run directory goes: systemd's `RuntimeDirectory=`
/// (`$RUNTIME_DIRECTORY`, the first of its list), else `$XDG_RUNTIME_DIR`,
/// else the temp dir. /tmp is the last resort: tmp cleaners age it.
fn runtime_base() -> PathBuf {
    let first = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .and_then(|v| v.to_str()?.split(':').next().map(PathBuf::from))
            .filter(|d| !d.as_os_str().is_empty() && d.is_dir())
    };
    first("RUNTIME_DIRECTORY")
        .or_else(|| first("XDG_RUNTIME_DIR"))
        .unwrap_or_else(std::env::temp_dir)
}

impl Runtime {
    /// Like [`Runtime::new`], with the passed sockets already taken (before
    /// the tokio runtime opened fds of its own).
    pub fn with_inherited(
        config: Config,
        overrides: Overrides,
        inherited: Inherited,
        invocation: Invocation,
    ) -> Result<Runtime, StartError> {
        Runtime::start(config, overrides, inherited, invocation, None)
    }

    /// A fresh start, or (`fallback`) the start of an image that could not
    /// read its predecessor's state: the sockets come in `inherited`, and
    /// the previous image's control socket, metrics listener, workers and
    /// their log pipes in `fallback`.
    fn start(
        config: Config,
        overrides: Overrides,
        mut inherited: Inherited,
        invocation: Invocation,
        mut fallback: Option<adopt::Leftovers>,
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
        let handed_control = fallback.as_mut().and_then(|f| f.control.take());
        let control = match handed_control {
            Some(c) => Some(c),
            None => match ControlSocket::bind(&config.control_socket) {
                Ok(s) => Some(s),
                // Without a config file the path is the default rule's
                // (/run/holdfast or $XDG_RUNTIME_DIR), which may be unusable or
                // shared: run on without it rather than refuse to start.
                Err(e) if config.path.is_none() => {
                    warn!(error = %e, "running without a control socket; signals still work (set control_socket in a config file)");
                    None
                }
                Err(e) => return Err(e.into()),
            },
        };
        let handed_metrics = fallback.as_mut().and_then(|f| f.metrics.take());
        let metrics = match handed_metrics {
            Some(m) => Some(m),
            None => config
                .metrics_listen
                .map(crate::metrics::bind)
                .transpose()?,
        };
        let io = |what: &str| {
            let what = what.to_string();
            move |source| StartError::Io { what, source }
        };
        let rundir = RunDir::create().map_err(io("runtime directory"))?;
        let notify =
            NotifySocket::bind(&rundir.path().join("notify.sock")).map_err(io("notify socket"))?;
        let devnull = std::fs::File::open("/dev/null")
            .map_err(io("/dev/null"))?
            .into();
        crate::os::sys::become_subreaper().map_err(io("PR_SET_CHILD_SUBREAPER"))?;
        let cgroups = match crate::os::proc::Cgroups::detect() {
            Ok(c) => {
                info!(cgroup = %c.dir().display(), "a cgroup per worker: every descendant of a worker is contained and ends with it");
                Some(c)
            }
            Err(why) => {
                info!(reason = %why, "no cgroup per worker; descendants that leave a worker's process group are tracked as holdfast's adopted children");
                None
            }
        };
        let logs = Logs::start(&config.logs)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let settings = Settings {
            seed: random_seed(),
            reopen_signal: config.logs.reopen_signal.map(|s| s.0),
            init: std::process::id() == 1,
        };
        let now = Instant::now();
        // The previous holdfast's workers (a crash, KillMode=process), and in
        // a fallback, the previous image's own workers: those are not left
        // over, they are inherited.
        let inherited_serials: Vec<u64> =
            fallback.as_ref().map(|f| f.serials()).unwrap_or_default();
        let previous = previous::Previous::find(
            cgroups.as_ref(),
            config.app.drain_timeout,
            &inherited_serials,
        );
        let (mut sv, pids, worker_cgroups) = match &mut fallback {
            None => (
                Supervisor::new(spec, settings),
                HashMap::new(),
                HashMap::new(),
            ),
            Some(f) => f.inherit(spec, settings, &logs, cgroups.as_ref(), now),
        };
        if let Some(first) = previous.next_serial() {
            sv.number_workers_from(first);
        }
        let mut rt = Runtime {
            sv,
            config,
            overrides,
            held: listeners.clone(),
            listeners,
            pids,
            tails: HashMap::new(),
            execs: HashMap::new(),
            probes: HashMap::new(),
            cgroups,
            worker_cgroups,
            previous,
            notify,
            rundir,
            devnull,
            logs,
            tx,
            rx,
            calls_tx,
            calls,
            replies: HashMap::new(),
            next_reply: 1,
            pending: VecDeque::new(),
            exit: None,
            ignored_senders: HashSet::new(),
            systemd,
            inherited: Some(inherited),
            reloading: None,
            reload_pending: Vec::new(),
            started: now,
            control,
            metrics,
            control_server: None,
            metrics_task: None,
            metrics_fd: None,
            baseline: crate::os::proc::net::listen_counters(),
            invocation,
            in_flight: InFlight::default(),
            upgrade: None,
            early: HashSet::new(),
            pause: control::Pause::new(),
            adopted: None,
            socket_checks: Vec::new(),
            senders: HashMap::new(),
            cost: crate::status::Cost::default(),
        };
        if let Some(f) = fallback {
            rt.adopted = Some(f.into_adopted());
        }
        Ok(rt)
    }

    /// Runs until every worker has exited after a stop; returns the exit code.
    pub async fn run(mut self) -> i32 {
        let signals = signal_hook_tokio::Signals::new([
            SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2, SIGCHLD,
        ]);
        let mut signals = match signals {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot install signal handlers");
                return exitcode::OSERR;
            }
        };
        // An image exec'd by an upgrade inherited these blocked (pending
        // ones wait for the handlers just installed); otherwise a no-op.
        if let Err(e) = crate::os::handover::unblock_signals() {
            error!(error = %e, "cannot unblock signals");
        }
        if self.adopted.is_none() {
            info!(pid = std::process::id(), workers = self.sv.workers_wanted(), command = ?self.config.app.command.0, "holdfast started");
        }
        let baseline = self.baseline;
        self.control_server = self.control.take().and_then(|socket| {
            let path = socket.path().display().to_string();
            control::Server::start(
                socket,
                self.calls_tx.clone(),
                baseline,
                self.pause.subscribe(),
            )
            .map_err(|e| error!(path, error = %e, "cannot serve the control socket"))
            .ok()
        });
        self.metrics_fd = self.metrics.as_ref().map(|l| l.as_raw_fd());
        self.metrics_task = self.metrics.take().and_then(|l| {
            crate::metrics::start(l, self.calls_tx.clone(), baseline, self.pause.subscribe())
                .map_err(|e| error!(error = %e, "cannot serve metrics"))
                .ok()
        });
        match self.adopted.take() {
            Some(a) => self.resume_adopted(a),
            None => self.feed(Event::Tick),
        }
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.exit.is_none() {
            let deadline = [self.sv.next_deadline(), self.upgrade_due()]
                .into_iter()
                .flatten()
                .min();
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
                Some(call) = self.calls.recv() => self.on_call(call),
                msg = self.notify.recv() => match msg {
                    Ok(m) => self.on_notify(m),
                    Err(e) => warn!(error = %e, "notify socket receive failed"),
                },
                _ = sleep => {
                    self.upgrade_timers();
                    self.feed(Event::Tick);
                }
                _ = housekeeping.tick() => {
                    self.housekeeping(false);
                    match self.control_server.as_ref().map(control::Server::repair_path) {
                        Some(Ok(true)) => warn!("the control socket's path was removed or replaced; restored it (holdfast status and the other commands find holdfast again)"),
                        Some(Err(e)) => error!(error = %e, "cannot restore the control socket's path"),
                        _ => {}
                    }
                }
                _ = systemd_sleep => self.systemd.due(Instant::now(), &self.sv),
            }
            // The one place an upgrade execs: between two turns of the loop,
            // once nothing is under way whose answer the exec would lose.
            self.upgrade_if_quiet();
        }
        // systemd (KillMode=process) leaves what the previous holdfast
        // left to us: a stop ends once it is gone.
        let abandon = self.previous.kill_at.max(Instant::now()) + previous::PREVIOUS_ABANDON_AFTER;
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
                .filter(|l| !matches!(l.origin, crate::os::listener::Origin::Activated { .. }))
            {
                l.keep_path();
            }
        }
        let code = self.exit.unwrap_or(0);
        // Answer what is still queued ("holdfast is exiting") and let the
        // control server write replies already decided (stop --wait).
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        self.calls.close();
        while self.calls.try_recv().is_ok() {}
        self.replies.clear();
        if let Some(m) = self.metrics_task.take() {
            m.abort();
        }
        if let Some(c) = self.control_server.take() {
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
            SIGUSR2 => {
                info!("SIGUSR2: upgrading holdfast in place");
                self.feed(request(Request::Upgrade { binary: None }));
            }
            _ => {}
        }
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Event(e) => self.feed(e),
            Input::Prepared(p) => self.prepared(*p),
            Input::Trial(t) => self.trial_output(t),
            Input::Exited(e) => {
                self.feed(e);
                self.housekeeping(true);
            }
            Input::NotifyAncestry {
                sender,
                ancestors,
                reads,
                fields,
            } => self.notify_ancestry(sender, ancestors, reads, fields),
            Input::SocketsChecked {
                id,
                missing,
                claim,
                reads,
            } => {
                if claim {
                    self.cost.ready_checks += 1;
                    self.cost.ready_check_reads += reads;
                }
                self.feed(Event::SocketsChecked { id, missing });
            }
        }
    }

    fn on_call(&mut self, call: Call) {
        let request = |request, reply| Event::Request { request, reply };
        match call {
            Call::Status { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Call::Reload { reply, started } => self.reload(ReloadWaiter { reply, started }),
            Call::ReopenLogs { reply } => {
                let reply = Some(self.hold_reply(reply));
                self.feed(request(Request::ReopenLogs, reply));
            }
            Call::Scale { workers, reply } => {
                let reply = Some(self.hold_reply(reply));
                self.feed(request(Request::Scale(Scale::To(workers)), reply));
            }
            Call::ReplaceSlot { slot, reply } => {
                let reply = Some(self.hold_reply(reply));
                self.feed(request(Request::ReplaceSlot(Slot(slot)), reply));
            }
            Call::Stop { reply } => {
                let reply = Some(self.hold_reply(reply));
                self.feed(request(Request::Stop, reply));
            }
            Call::Upgrade {
                binary,
                wait,
                reply,
            } => {
                let to = self.hold_reply(reply);
                if !wait {
                    self.early.insert(to);
                }
                self.feed(request(Request::Upgrade { binary }, Some(to)));
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
            cost: self.cost.clone(),
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

    /// Steps the supervisor with `event` and everything its actions produce.
    fn feed(&mut self, event: Event) {
        self.pending.push_back(event);
        while let Some(e) = self.pending.pop_front() {
            let now = Instant::now();
            for action in self.sv.step(now, e) {
                self.act(action);
            }
        }
        self.run_socket_checks();
        // Reports of execs that succeeded are done with: their pipes close
        // now, not at the next housekeeping (a non-blocking read each).
        self.execs
            .retain(|_, (_, report)| !matches!(report.poll(), Some(Ok(()))));
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
                if !self.pids.contains_key(&pid.0) {
                    // Reaped, its exit not reported yet (see `reaped`): its
                    // pid, and soon its group id, may be anyone's.
                    return debug!(worker = %id, %pid, "drain of a reaped worker: not signalled");
                }
                debug!(worker = %id, %pid, %signal, "drain signal to the process group");
                signal_group(pid, signal);
                signal_group(pid, Signal::SIGCONT);
            }
            Action::Terminate { pid } => {
                debug!(%pid, "SIGTERM and SIGCONT to an adopted descendant");
                let p = nix::unistd::Pid::from_raw(pid.0);
                for signal in [Signal::SIGTERM, Signal::SIGCONT] {
                    if let Err(e) = nix::sys::signal::kill(p, signal) {
                        debug!(%pid, %signal, error = %e, "signal failed");
                    }
                }
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
                match crate::os::proc::memory::signal_descendant(worker, pid, signal) {
                    Ok(crate::os::proc::memory::Signalled::Sent) => {
                        debug!(worker = %id, %pid, %signal, "signal to a worker's descendant")
                    }
                    Ok(crate::os::proc::memory::Signalled::NotDescendant) => {
                        info!(worker_pid = %worker, %pid, %signal, "process {pid} is gone or no longer under worker pid {worker}: not signalled")
                    }
                    Err(e) => warn!(%pid, %signal, error = %e, "signal failed"),
                }
            }
            Action::Kill { id, pid } => {
                debug!(worker = %id, %pid, "SIGKILL to the process group");
                if self.pids.contains_key(&pid.0) {
                    signal_group(pid, Signal::SIGKILL);
                }
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
                let guard = self.in_flight.enter();
                tokio::task::spawn_blocking(move || {
                    let _guard = guard;
                    let samples = crate::os::proc::memory::sample(&targets);
                    let _ = tx.send(Input::Event(Event::MemorySample { samples }));
                });
            }
            Action::ReopenLogs { reply, signalled } => {
                let reply = reply
                    .and_then(|to| self.replies.remove(&to))
                    .unwrap_or_default();
                let done = self.logs.reopen();
                let guard = self.in_flight.enter();
                tokio::spawn(async move {
                    let _guard = guard;
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
                self.early.remove(&to);
                let replies = self.replies.remove(&to).unwrap_or_default();
                if !replies.is_empty() {
                    // Counted as on its way out from now (an upgrade waits for
                    // it), though sent only after what systemd was told before
                    // it (READY=1 at a rollout's end): see `Notifier::then`.
                    let answering = control::Answering::new();
                    self.systemd.then(Box::new(move || {
                        for r in replies {
                            let _ = r.send(outcome.clone());
                        }
                        drop(answering);
                    }));
                }
            }
            Action::Exit { code } => self.exit = Some(code),
            Action::Upgrade { binary } => self.begin_upgrade(binary),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Probe sockets live in the run directory, which goes after them.
        self.probes.clear();
    }
}

/// Inodes of `listeners`' sockets: a passed socket already held is not claimed twice.
fn inodes(listeners: &[Rc<Listener>]) -> Vec<u64> {
    listeners
        .iter()
        .filter_map(|l| l.socket_inode().ok())
        .collect()
}

fn signame(sig: i32) -> String {
    Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string())
}
