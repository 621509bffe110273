//! The supervisor: the one owner of all worker state, and the only place that
//! decides what happens to a worker.
//!
//! It is a pure state machine: [`Supervisor::step`] takes the time and one
//! [`Event`] and returns the [`Action`]s to carry out. It makes no syscalls,
//! reads no clock and never awaits, so rollouts, surge limits, rollback,
//! backoff, descendants and readiness are unit-tested as tables of events and
//! expected actions. Deadlines live in the state; [`Supervisor::next_deadline`]
//! tells the edge when to send [`Event::Tick`].
//!
//! Its model of the world:
//! - **A generation is a whole [`Spec`]**: a worker is started, judged ready,
//!   drained and recycled by its own generation's spec, never by "the current
//!   config". A crashed slot restarts with the generation it belongs to.
//! - **Every replacement** — rollout, rollback, memory, age — is the same
//!   start-before-stop step taken from one queue, limited by `max_surge`
//!   (`max_surge = 0`: stop first, then start). A crashed worker leaves an
//!   empty slot, refilled after an exponential backoff.
//! - **Ready means serving**: READY=1, the delay or the probe, *and* the
//!   worker's process tree holding the listening sockets it must serve.
//! - **A worker is a tree**: the descendants that left its process group
//!   (setsid daemons, double forks) are re-parented to holdfast, reported as
//!   [`Event::Adopted`], and end with their worker (see `strays.rs`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use crate::config::{Metric, ReadyMode};
use crate::memory::TreeSample;

mod recycle;
mod spec;
mod strays;
pub use recycle::{MemoryState, Recycle};
pub use spec::Spec;
pub use strays::{AdoptedProc, Stray};

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub struct $name(pub $t);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
id_type!(
    /// A worker's stable position, 0..workers-1 (HOLDFAST_WORKER_ID).
    Slot(u32)
);
id_type!(
    /// A config generation; every accepted reload makes a new one.
    Generation(u64)
);
id_type!(
    /// One worker process's identity inside holdfast, known before its pid
    /// (HOLDFAST_WORKER_SERIAL in the worker's environment).
    WorkerId(u64)
);
id_type!(
    /// A process id.
    Pid(i32)
);
id_type!(
    /// Names the edge's reply channel for one request.
    ReplyTo(u64)
);

/// The first restart delay after a crash; it doubles up to `restart_backoff_max`.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// A worker that was ready this long before it died starts its backoff afresh.
pub const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// A memory sampling round that has not come back after this long is lost
/// (its thread died): the next one may start.
pub const SAMPLE_LOST_AFTER: Duration = Duration::from_secs(60);

/// `now + d`, saturating a hundred years ahead: a deadline can never
/// overflow, whatever a config says (the config refuses such durations too).
pub fn later(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
    now.checked_add(d.min(FAR))
        .or_else(|| now.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(now)
}

/// Why a worker is being replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    Rollout,
    Rollback,
    Memory,
    Age,
    Crash,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Rollout => "rollout",
            Reason::Rollback => "rollback",
            Reason::Memory => "memory",
            Reason::Age => "age",
            Reason::Crash => "crash",
        })
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    Code(i32),
    Signal(i32),
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Code(c) => write!(f, "exit status {c}"),
            ExitReason::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// How a worker said it was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyVia {
    /// READY=1 on holdfast's NOTIFY_SOCKET, from the worker or a descendant.
    Notify,
    /// The readiness probe answered below 500.
    Probe,
}

/// A change of the worker count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(u32),
    /// One more (SIGTTIN).
    Up,
    /// One fewer, never below one (SIGTTOU).
    Down,
}

/// A request from outside (signal or control socket).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Roll every worker to a new generation with this spec (the config was
    /// re-read and its sockets bound by the edge).
    Rollout {
        spec: Box<Spec>,
    },
    Scale(Scale),
    /// Reopen the log files (SIGUSR1); the core names who gets `reopen_signal`.
    ReopenLogs,
    /// Graceful stop; a second one kills at once.
    Stop,
    /// Stop now: SIGKILL every worker.
    Kill,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Tick,
    /// The worker's process exists (forked); its exec may still fail.
    Spawned {
        id: WorkerId,
        pid: Pid,
    },
    /// The worker could not be started (fork, exec, or a resource the edge needed).
    SpawnFailed {
        id: WorkerId,
        error: String,
    },
    /// The worker (or one of its descendants) says it is ready.
    Ready {
        id: WorkerId,
        via: ReadyVia,
    },
    /// A worker's STATUS= line.
    Status {
        id: WorkerId,
        status: String,
    },
    /// The answer to [`Action::CheckSockets`]: the addresses of required
    /// listeners that no process of the worker's tree holds.
    SocketsChecked {
        id: WorkerId,
        missing: Vec<String>,
    },
    /// A child of holdfast was reaped: a worker, or an adopted descendant.
    Exited {
        pid: Pid,
        reason: ExitReason,
    },
    /// Every process holdfast adopted as subreaper that is no worker's own
    /// process, as found now (a full listing, not a change).
    Adopted {
        procs: Vec<AdoptedProc>,
    },
    /// One memory sampling round (see `crate::memory`): facts, no decisions.
    MemorySample {
        samples: Vec<TreeSample>,
    },
    /// A reload was refused before it reached the core (bad config, bind failed).
    ReloadRejected {
        error: String,
        reply: Option<ReplyTo>,
    },
    Request {
        request: Request,
        reply: Option<ReplyTo>,
    },
}

/// One worker to read in a sampling round, with the metric its generation's
/// limit is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleTarget {
    pub id: WorkerId,
    pub pid: Pid,
    pub metric: Metric,
}

/// What holdfast tells its service manager (sd_notify(3)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Not every slot was ready yet: no READY=1 so far.
    Starting,
    Ready,
    /// A rollout is under way (RELOADING=1; READY=1 ends it).
    Reloading,
    Stopping,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Spawn {
        id: WorkerId,
        slot: Slot,
        generation: Generation,
    },
    /// Send its generation's drain signal to the worker's process group.
    Drain {
        id: WorkerId,
        pid: Pid,
        signal: Signal,
    },
    /// SIGKILL the worker's process group (and its cgroup, if it has one).
    Kill {
        id: WorkerId,
        pid: Pid,
    },
    /// `signal` to one process that holdfast has not reaped: a worker's own
    /// process (the log reopen signal) or an adopted descendant.
    Signal {
        pid: Pid,
        signal: Signal,
    },
    /// Send `signal` to `pid`, a descendant of worker `worker` (scope =
    /// "process": a bloated child). The edge signals it only if it still
    /// descends from `worker` at that moment.
    SignalProcess {
        id: WorkerId,
        worker: Pid,
        pid: Pid,
        signal: Signal,
    },
    /// The worker says it is ready: find which of its generation's required
    /// listeners its tree does not hold, and answer with
    /// [`Event::SocketsChecked`].
    CheckSockets {
        id: WorkerId,
        pid: Pid,
        generation: Generation,
    },
    /// Read these workers' memory off the loop; answer with [`Event::MemorySample`].
    Sample {
        targets: Vec<SampleTarget>,
    },
    /// Reopen the log files by path; `signalled`: the reopen signal went to
    /// this many workers (with [`Action::Signal`]s just before).
    ReopenLogs {
        reply: Option<ReplyTo>,
        signalled: Option<(Signal, usize)>,
    },
    /// Tell the service manager holdfast's state and one-line status.
    Service {
        state: ServiceState,
        status: String,
    },
    /// No worker, slot or rollout uses this generation any more.
    Retire {
        generation: Generation,
    },
    /// The worker and every descendant attributed to it are gone: its
    /// per-worker resources (cgroup, probe socket) may go too.
    Released {
        id: WorkerId,
    },
    Reply {
        to: ReplyTo,
        outcome: Result<String, String>,
    },
    Exit {
        code: i32,
    },
}

/// Where a worker is in its life.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerState {
    /// Spawn requested; no pid yet.
    Spawning,
    Starting {
        ready_by: Instant,
    },
    /// It said it is ready; holdfast checks its tree holds the sockets.
    Checking {
        ready_by: Instant,
    },
    Ready {
        since: Instant,
    },
    /// Drain signal sent (replacement or scale-down); SIGKILL at `kill_at`.
    Draining {
        kill_at: Instant,
    },
    /// Drain signal sent for shutdown; SIGKILL at `kill_at`.
    Stopping {
        kill_at: Instant,
    },
    /// SIGKILL sent; waiting to reap.
    Killed,
}

impl WorkerState {
    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Spawning | WorkerState::Starting { .. } => "starting",
            WorkerState::Checking { .. } => "checking",
            WorkerState::Ready { .. } => "ready",
            WorkerState::Draining { .. } => "draining",
            WorkerState::Stopping { .. } => "stopping",
            WorkerState::Killed => "killed",
        }
    }
    fn is_active(&self) -> bool {
        matches!(
            self,
            WorkerState::Spawning
                | WorkerState::Starting { .. }
                | WorkerState::Checking { .. }
                | WorkerState::Ready { .. }
        )
    }
    fn is_ready(&self) -> bool {
        matches!(self, WorkerState::Ready { .. })
    }
    /// Not yet proven ready (a failure of it is a failed start).
    fn is_starting(&self) -> bool {
        matches!(
            self,
            WorkerState::Spawning | WorkerState::Starting { .. } | WorkerState::Checking { .. }
        )
    }
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub id: WorkerId,
    pub slot: Slot,
    pub generation: Generation,
    pub pid: Option<Pid>,
    pub state: WorkerState,
    pub started: Instant,
    pub status: Option<String>,
    /// Memory and age recycling state.
    pub memory: MemoryState,
}

#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// The generation this slot runs: that of the last worker that was
    /// ready in it (a crash restart uses it).
    pub generation: Generation,
    /// Crashes in a row (reset once a worker stays up BACKOFF_RESET).
    pub crashes: u32,
    pub restart_at: Option<Instant>,
    pub restarts: u32,
    pub last_exit: Option<String>,
}

impl SlotInfo {
    fn new(generation: Generation) -> SlotInfo {
        SlotInfo {
            generation,
            crashes: 0,
            restart_at: None,
            restarts: 0,
            last_exit: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Replacement {
    slot: Slot,
    reason: Reason,
    old: WorkerId,
    new: Option<WorkerId>,
}

#[derive(Debug, Clone)]
pub struct Rollout {
    pub generation: Generation,
    pub rollback: bool,
    pub started: Instant,
    /// The worker count to return to if this rollout fails.
    workers_before: u32,
    waiters: Vec<ReplyTo>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counters {
    pub replacements: BTreeMap<Reason, u64>,
    pub failed_rollouts: u64,
    pub drain_kills: u64,
    /// Bloated children sent `child_signal` (`[memory]` scope = "process").
    pub child_signals: u64,
    /// Descendants that outlived their worker (or had none) and were stopped.
    pub strays_stopped: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Starting,
    Running,
    Stopping { waiters: Vec<ReplyTo> },
}

/// Settings of the supervisor itself (not of a generation).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Random input for the lifetime jitter, drawn by the edge once.
    pub seed: u64,
    /// `[logs] reopen_signal`: sent to workers when the logs are reopened.
    pub reopen_signal: Option<Signal>,
}

/// The whole of holdfast's worker state.
#[derive(Debug)]
pub struct Supervisor {
    settings: Settings,
    /// Every generation something still uses, with its spec.
    specs: BTreeMap<Generation, Spec>,
    /// The last good generation: what slots run when no rollout is under way.
    stable: Generation,
    newest: Generation,
    /// The slot count.
    wanted: u32,
    rollout: Option<Rollout>,
    last_rollout: Option<(Generation, Result<(), String>)>,
    workers: BTreeMap<WorkerId, Worker>,
    slots: Vec<SlotInfo>,
    /// Replacements waiting for surge budget; memory/age entries name their worker.
    queue: VecDeque<(Slot, Reason, Option<WorkerId>)>,
    inflight: Vec<Replacement>,
    next_id: u64,
    phase: Phase,
    strays: BTreeMap<Pid, Stray>,
    /// The edge listed adopted processes since the last worker exited: a
    /// stop may only end once it has (a worker's daemon is re-parented to
    /// holdfast only when the worker exits).
    listed_since_exit: bool,
    /// Recently gone workers (for messages about their descendants).
    gone: VecDeque<(WorkerId, Slot, Pid)>,
    /// When the next memory sampling round is due.
    sample_at: Option<Instant>,
    /// When the running sampling round started.
    sampling: Option<Instant>,
    /// Why the last reload was rejected, until the next accepted one.
    reload_note: Option<String>,
    /// What the service manager was last told.
    told: Option<(ServiceState, String)>,
    pub counters: Counters,
}

impl Supervisor {
    /// A supervisor for generation 1 with `spec`; the first `Tick` spawns the workers.
    pub fn new(spec: Spec, settings: Settings) -> Self {
        let wanted = spec.app.workers.get();
        let slots = vec![SlotInfo::new(Generation(1)); wanted as usize];
        let mut specs = BTreeMap::new();
        specs.insert(Generation(1), spec);
        Supervisor {
            settings,
            specs,
            stable: Generation(1),
            newest: Generation(1),
            wanted,
            rollout: None,
            last_rollout: None,
            workers: BTreeMap::new(),
            slots,
            queue: VecDeque::new(),
            inflight: Vec::new(),
            next_id: 1,
            phase: Phase::Starting,
            strays: BTreeMap::new(),
            listed_since_exit: true,
            gone: VecDeque::new(),
            sample_at: None,
            sampling: None,
            reload_note: None,
            told: None,
            counters: Counters::default(),
        }
    }

    /// Numbers new workers from `first` on (ids below it are never used):
    /// a holdfast restarted by systemd while the previous one's workers
    /// still drain (`KillMode=process`) continues after their serials, so
    /// no worker id, `HOLDFAST_WORKER_SERIAL` or `worker-N` cgroup is reused.
    pub fn number_workers_from(&mut self, first: u64) {
        self.next_id = self.next_id.max(first);
    }

    /// The spec of `generation`, while something uses it.
    pub fn spec(&self, generation: Generation) -> Option<&Spec> {
        self.specs.get(&generation)
    }
    /// Every generation still in use, with its spec.
    pub fn specs(&self) -> impl Iterator<Item = (Generation, &Spec)> {
        self.specs.iter().map(|(g, s)| (*g, s))
    }
    /// The spec new workers get: the rollout's target, else the stable one.
    pub fn current_spec(&self) -> &Spec {
        match self.specs.get(&self.target()) {
            Some(s) => s,
            None => self.stable_spec(),
        }
    }
    fn stable_spec(&self) -> &Spec {
        match self.specs.get(&self.stable) {
            Some(s) => s,
            // The stable generation is never retired (see `retire`).
            None => unreachable!("the stable generation {} has no spec", self.stable),
        }
    }
    /// The spec of `w`'s generation (the current one as a fallback).
    fn spec_of(&self, w: &Worker) -> &Spec {
        self.specs
            .get(&w.generation)
            .unwrap_or_else(|| self.current_spec())
    }
    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }
    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }
    pub fn slot_info(&self, slot: Slot) -> Option<&SlotInfo> {
        self.slots.get(slot.0 as usize)
    }
    pub fn slots(&self) -> impl Iterator<Item = (Slot, &SlotInfo)> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| (Slot(i as u32), s))
    }
    pub fn rollout(&self) -> Option<&Rollout> {
        self.rollout.as_ref()
    }
    pub fn last_rollout(&self) -> Option<&(Generation, Result<(), String>)> {
        self.last_rollout.as_ref()
    }
    pub fn stable(&self) -> Generation {
        self.stable
    }
    /// How many workers (slots) holdfast runs.
    pub fn workers_wanted(&self) -> u32 {
        self.wanted
    }
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }
    /// Adopted descendants holdfast knows of.
    pub fn strays(&self) -> impl Iterator<Item = &Stray> {
        self.strays.values()
    }
    /// Why the last reload was rejected, until the next accepted one.
    pub fn reload_note(&self) -> Option<&str> {
        self.reload_note.as_deref()
    }
    /// Workers that are ready now.
    pub fn ready_count(&self) -> usize {
        self.workers.values().filter(|w| w.state.is_ready()).count()
    }
    /// Whether every slot has a ready worker of the current generation and
    /// holdfast is not stopping (what an orchestrator's readiness probe asks).
    pub fn all_current_ready(&self) -> bool {
        !self.is_stopping()
            && (0..self.slots.len() as u32).all(|s| {
                self.workers
                    .values()
                    .any(|w| w.slot == Slot(s) && w.state.is_ready() && w.generation == self.stable)
            })
    }
    fn target(&self) -> Generation {
        self.rollout.as_ref().map_or(self.stable, |r| r.generation)
    }
    fn max_surge(&self) -> u32 {
        self.current_spec().app.max_surge
    }

    /// The earliest deadline in the state: when the edge must send `Tick`.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|w| match w.state {
            WorkerState::Starting { ready_by } => {
                let spec = self.spec_of(w);
                let delay = (spec.ready() == ReadyMode::Delay)
                    .then(|| later(w.started, spec.app.ready_delay));
                Some(delay.map_or(ready_by, |d| d.min(ready_by)))
            }
            WorkerState::Checking { ready_by } => Some(ready_by),
            WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at } => Some(kill_at),
            _ => None,
        });
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let sampling = self
            .sample_at
            .into_iter()
            .chain(self.sampling.map(|t| later(t, SAMPLE_LOST_AFTER)));
        workers
            .chain(restarts)
            .chain(self.age_deadlines())
            .chain(self.stray_deadlines())
            .chain(sampling)
            .min()
    }

    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Tick => {
                self.expire(now, &mut out);
                self.expire_ages(now);
                self.expire_strays(now, &mut out);
            }
            Event::Spawned { id, pid } => self.on_spawned(id, pid, now, &mut out),
            Event::SpawnFailed { id, error } => self.on_spawn_failed(id, error, now, &mut out),
            Event::Ready { id, via } => self.on_ready_claim(id, Some(via), now, &mut out),
            Event::Status { id, status } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.status = Some(status);
                }
            }
            Event::SocketsChecked { id, missing } => {
                self.on_sockets_checked(id, missing, now, &mut out)
            }
            Event::Exited { pid, reason } => self.on_exit(pid, reason, now, &mut out),
            Event::Adopted { procs } => self.on_adopted(procs, now, &mut out),
            Event::MemorySample { samples } => {
                self.sampling = None;
                self.on_memory_sample(samples, now, &mut out)
            }
            Event::ReloadRejected { error, reply } => {
                self.on_reload_rejected(error, reply, &mut out)
            }
            Event::Request { request, reply } => self.on_request(request, reply, now, &mut out),
        }
        self.advance(now, &mut out);
        self.sample_if_due(now, &mut out);
        self.retire(&mut out);
        self.tell(&mut out);
        out
    }

    fn worker_by_pid(&self, pid: Pid) -> Option<WorkerId> {
        self.workers
            .values()
            .find(|w| w.pid == Some(pid))
            .map(|w| w.id)
    }

    fn active_in(&self, slot: Slot) -> Vec<WorkerId> {
        self.workers
            .values()
            .filter(|w| w.slot == slot && w.state.is_active())
            .map(|w| w.id)
            .collect()
    }

    fn spawn(
        &mut self,
        slot: Slot,
        generation: Generation,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> WorkerId {
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        self.workers.insert(
            id,
            Worker {
                id,
                slot,
                generation,
                pid: None,
                state: WorkerState::Spawning,
                started: now,
                status: None,
                memory: MemoryState::default(),
            },
        );
        out.push(Action::Spawn {
            id,
            slot,
            generation,
        });
        id
    }

    /// Sends the worker's generation's drain signal; SIGKILL follows at the deadline.
    fn drain(&mut self, id: WorkerId, now: Instant, stopping: bool, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (signal, timeout) = {
            let spec = self.spec_of(w);
            (spec.drain_signal(), spec.drain_timeout())
        };
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let kill_at = later(now, timeout);
        match (w.pid, &w.state) {
            (_, WorkerState::Killed) => {}
            (_, WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at })
                if stopping =>
            {
                w.state = WorkerState::Stopping { kill_at: *kill_at };
            }
            (_, WorkerState::Draining { .. } | WorkerState::Stopping { .. }) => {}
            (Some(pid), _) => {
                info!(slot = %w.slot, %pid, generation = %w.generation, %signal, "draining worker");
                w.state = if stopping {
                    WorkerState::Stopping { kill_at }
                } else {
                    WorkerState::Draining { kill_at }
                };
                out.push(Action::Drain { id, pid, signal });
            }
            (None, _) => {
                // Never got a pid: nothing to signal.
                self.workers.remove(&id);
                self.released_if_done(id, out);
            }
        }
    }

    /// SIGKILL to the worker's group, and to every descendant attributed to it.
    fn kill(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match w.pid {
            Some(pid) if w.state != WorkerState::Killed => {
                w.state = WorkerState::Killed;
                out.push(Action::Kill { id, pid });
                self.kill_strays_of(id, now, out);
            }
            Some(_) => {}
            None => {
                self.workers.remove(&id);
                self.released_if_done(id, out);
            }
        }
    }

    fn on_spawned(&mut self, id: WorkerId, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&id) else {
            // Given up on before its fork came back (a failed rollout drained
            // it while it had no pid): it has served nothing yet.
            warn!(%pid, worker = %id, "a worker was forked after holdfast gave up on it; killing it");
            out.push(Action::Kill { id, pid });
            return;
        };
        let ready_by = later(now, self.spec_of(w).ready_timeout());
        if let Some(w) = self.workers.get_mut(&id) {
            w.pid = Some(pid);
            w.started = now;
            w.state = WorkerState::Starting { ready_by };
            info!(slot = %w.slot, %pid, generation = %w.generation, "worker spawned");
        }
    }

    fn on_spawn_failed(
        &mut self,
        id: WorkerId,
        error: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        error!(slot = %w.slot, generation = %w.generation, %error, "worker spawn failed");
        // A pid that never exec'd has no descendants; it is reaped as a stranger.
        self.released_if_done(id, out);
        if w.state.is_starting() {
            self.worker_failed(w, error, now, out);
        }
    }

    /// A worker that never became ready is gone (exit, spawn failure,
    /// timeout, failed socket check).
    fn worker_failed(&mut self, w: Worker, why: String, now: Instant, out: &mut Vec<Action>) {
        if let Some(pos) = self.inflight.iter().position(|r| r.new == Some(w.id)) {
            let r = self.inflight.remove(pos);
            match r.reason {
                Reason::Rollout | Reason::Rollback => self.fail_rollout(
                    w.generation,
                    format!("slot {} (generation {}): {why}", w.slot, w.generation),
                    now,
                    out,
                ),
                _ => {
                    let retry = self.spec_of(&w).app.restart_backoff_max;
                    warn!(slot = %r.slot, reason = %r.reason, error = %why, retry_in = ?retry, "replacement worker failed; the old worker keeps serving");
                    if let Some(old) = self.workers.get_mut(&r.old) {
                        old.memory.replacement_failed(later(now, retry));
                    }
                }
            }
            return;
        }
        if let Some(r) = &self.rollout {
            if r.generation == w.generation {
                self.fail_rollout(
                    w.generation,
                    format!("slot {} (generation {}): {why}", w.slot, w.generation),
                    now,
                    out,
                );
                return;
            }
        }
        if w.generation != self.stable {
            // Left over from a rollout that already failed or was superseded.
            debug!(slot = %w.slot, generation = %w.generation, error = %why, "a worker of an abandoned rollout failed");
            return;
        }
        self.crashed(w.slot, why, now, false);
    }

    fn crashed(&mut self, slot: Slot, why: String, now: Instant, was_up_long: bool) {
        let backoff_max = self.current_spec().app.restart_backoff_max;
        let Some(info) = self.slots.get_mut(slot.0 as usize) else {
            return;
        };
        if was_up_long {
            info.crashes = 0;
        }
        info.crashes = info.crashes.saturating_add(1);
        info.restarts = info.restarts.saturating_add(1);
        let factor = 1u32.checked_shl(info.crashes - 1).unwrap_or(u32::MAX);
        let delay = BACKOFF_START.saturating_mul(factor).min(backoff_max);
        info.restart_at = Some(later(now, delay));
        info.last_exit = Some(why.clone());
        *self.counters.replacements.entry(Reason::Crash).or_default() += 1;
        warn!(%slot, generation = %info.generation, error = %why, crashes = info.crashes, restart_in = ?delay, "worker crashed; restarting after backoff");
    }

    /// READY=1, a probe answer, or the delay: valid only for the worker's own
    /// generation's ready mode (`via` None is the delay timer). A valid claim
    /// is checked against the sockets before the worker counts as ready.
    fn on_ready_claim(
        &mut self,
        id: WorkerId,
        via: Option<ReadyVia>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let WorkerState::Starting { ready_by } = w.state else {
            return;
        };
        let Some(pid) = w.pid else { return };
        let spec = self.spec_of(w);
        let mode = spec.ready();
        let fits = matches!(
            (mode, via),
            (ReadyMode::Notify, Some(ReadyVia::Notify))
                | (ReadyMode::Probe, Some(ReadyVia::Probe))
                | (ReadyMode::Delay, None)
        );
        if !fits {
            debug!(slot = %w.slot, %pid, generation = %w.generation, ?via, ready = ?mode, "readiness signal ignored: not this generation's ready mode");
            return;
        }
        if spec.required_listeners().next().is_none() {
            return self.become_ready(id, now, out);
        }
        let generation = w.generation;
        if let Some(w) = self.workers.get_mut(&id) {
            w.state = WorkerState::Checking { ready_by };
        }
        out.push(Action::CheckSockets {
            id,
            pid,
            generation,
        });
    }

    fn on_sockets_checked(
        &mut self,
        id: WorkerId,
        missing: Vec<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if !matches!(w.state, WorkerState::Checking { .. }) {
            return;
        }
        if missing.is_empty() {
            return self.become_ready(id, now, out);
        }
        let w = w.clone();
        let why = format!(
            "said it was ready, but no process of its tree holds {}: a wrapper probably closed the inherited fds (e.g. `bundle exec` of Bundler < 2 without --keep-file-descriptors), the server bound sockets of its own, or it closed inherited sockets it was not told to serve (Puma does, without a matching -b); if it serves only some listeners on purpose, name them in ready_listeners",
            missing.join(", ")
        );
        error!(slot = %w.slot, pid = w.pid.map_or(0, |p| p.0), generation = %w.generation, missing = ?missing, "worker {why}; stopping it");
        self.drain(id, now, false, out);
        self.worker_failed(w, why, now, out);
    }

    fn become_ready(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(pid) = w.pid else { return };
        w.state = WorkerState::Ready { since: now };
        let (slot, generation) = (w.slot, w.generation);
        info!(%slot, %pid, %generation, took = ?now.saturating_duration_since(w.started), "worker ready");
        if let Some(info) = self.slots.get_mut(slot.0 as usize) {
            info.generation = generation;
        }
        // Start-before-stop: the new one is ready, so the old one may drain.
        if let Some(r) = self.inflight.iter().find(|r| r.new == Some(id)) {
            let old = r.old;
            if self.workers.get(&old).is_some_and(|w| w.state.is_active()) {
                self.drain(old, now, false, out);
            } else {
                // max_surge = 0 drained the old one first: this replacement is done.
                self.inflight.retain(|r| r.new != Some(id));
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, reason: ExitReason, now: Instant, out: &mut Vec<Action>) {
        let Some(id) = self.worker_by_pid(pid) else {
            return self.stray_exited(pid, reason, out);
        };
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        self.listed_since_exit = false;
        self.gone.push_back((id, w.slot, pid));
        if self.gone.len() > 256 {
            self.gone.pop_front();
        }
        let age = now.saturating_duration_since(w.started);
        if let Some(info) = self.slots.get_mut(w.slot.0 as usize) {
            info.last_exit = Some(reason.to_string());
        }
        // Its descendants outside its group outlive it no longer.
        self.orphan_strays_of(&w, now, out);
        match w.state {
            WorkerState::Draining { .. } | WorkerState::Stopping { .. } | WorkerState::Killed => {
                info!(slot = %w.slot, %pid, generation = %w.generation, %reason, "worker exited");
                if let Some(pos) = self.inflight.iter().position(|r| r.old == id) {
                    let r = self.inflight.remove(pos);
                    if self.max_surge() == 0 && r.new.is_none() && !self.is_stopping() {
                        // Stop-before-start: now start the new one.
                        let g = self.target();
                        let new = self.spawn(r.slot, g, now, out);
                        self.inflight.push(Replacement {
                            new: Some(new),
                            ..r
                        });
                    }
                }
            }
            WorkerState::Ready { since } => {
                warn!(slot = %w.slot, %pid, generation = %w.generation, %reason, "worker exited unexpectedly");
                // A replacement whose old worker died: nothing left to drain.
                self.inflight.retain(|r| r.old != id);
                let long = now.saturating_duration_since(since) >= BACKOFF_RESET;
                self.crashed(
                    w.slot,
                    format!("{reason} after {}", humantime::format_duration(round(age))),
                    now,
                    long,
                );
            }
            WorkerState::Spawning | WorkerState::Starting { .. } | WorkerState::Checking { .. } => {
                warn!(slot = %w.slot, %pid, generation = %w.generation, %reason, "worker exited before it was ready");
                self.worker_failed(w, format!("exited before ready ({reason})"), now, out);
            }
        }
        self.released_if_done(id, out);
    }

    /// Queues a start-before-stop replacement of ready worker `id` for
    /// `reason`, unless it is already queued or being replaced. Returns
    /// whether it was queued.
    fn queue_replacement(&mut self, id: WorkerId, reason: Reason, detail: String) -> bool {
        let Some(w) = self.workers.get(&id) else {
            return false;
        };
        let Some(pid) = w.pid else { return false };
        if !w.state.is_ready() || self.is_stopping() {
            return false;
        }
        let slot = w.slot;
        let busy = self.inflight.iter().any(|r| r.slot == slot)
            || self
                .queue
                .iter()
                .any(|(s, _, w)| *s == slot && *w == Some(id));
        if busy {
            debug!(%slot, %pid, %reason, %detail, "already being replaced");
            return false;
        }
        info!(%slot, %pid, %reason, %detail, "worker {slot} (pid {pid}) {detail}: replacing");
        self.queue.push_back((slot, reason, Some(id)));
        true
    }

    fn reply(out: &mut Vec<Action>, reply: Option<ReplyTo>, outcome: Result<String, String>) {
        if let Some(to) = reply {
            out.push(Action::Reply { to, outcome });
        }
    }

    fn on_request(
        &mut self,
        request: Request,
        reply: Option<ReplyTo>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match request {
            Request::Rollout { spec } => {
                if self.is_stopping() {
                    warn!("rollout refused: holdfast is stopping");
                    return Self::reply(out, reply, Err("holdfast is stopping".into()));
                }
                self.start_rollout(*spec, reply, now, out);
            }
            Request::Scale(scale) => self.on_scale(scale, reply, now, out),
            Request::ReopenLogs => {
                // Workers not told to stop: a draining server may give the
                // signal another meaning mid-drain (Puma: USR1 is a phased
                // restart), and its lines already written stay in the old file.
                let signalled = self.settings.reopen_signal.map(|signal| {
                    let pids: Vec<Pid> = self
                        .workers
                        .values()
                        .filter(|w| w.state.is_active())
                        .filter_map(|w| w.pid)
                        .collect();
                    for &pid in &pids {
                        out.push(Action::Signal { pid, signal });
                    }
                    (signal, pids.len())
                });
                out.push(Action::ReopenLogs { reply, signalled });
            }
            Request::Stop => {
                if let Phase::Stopping { waiters } = &mut self.phase {
                    warn!("second stop request: killing every worker now");
                    waiters.extend(reply);
                    let ids: Vec<_> = self.workers.keys().copied().collect();
                    for id in ids {
                        self.kill(id, now, out);
                    }
                    self.kill_all_strays(now, out);
                    return;
                }
                info!(
                    workers = self.workers.len(),
                    "stopping: draining every worker"
                );
                self.phase = Phase::Stopping {
                    waiters: reply.into_iter().collect(),
                };
                if let Some(r) = self.rollout.take() {
                    for to in r.waiters {
                        out.push(Action::Reply {
                            to,
                            outcome: Err("holdfast is stopping".into()),
                        });
                    }
                }
                self.queue.clear();
                self.inflight.clear();
                let ids: Vec<_> = self.workers.keys().copied().collect();
                for id in ids {
                    self.drain(id, now, true, out);
                }
            }
            Request::Kill => {
                if !self.is_stopping() {
                    self.phase = Phase::Stopping {
                        waiters: reply.into_iter().collect(),
                    };
                }
                self.rollout = None;
                self.queue.clear();
                self.inflight.clear();
                let ids: Vec<_> = self.workers.keys().copied().collect();
                for id in ids {
                    self.kill(id, now, out);
                }
                self.kill_all_strays(now, out);
            }
        }
    }

    fn start_rollout(
        &mut self,
        spec: Spec,
        reply: Option<ReplyTo>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let workers = spec.app.workers.get();
        self.newest = Generation(self.newest.0 + 1);
        let generation = self.newest;
        self.specs.insert(generation, spec);
        self.reload_note = None;
        let mut workers_before = self.wanted;
        if let Some(old) = self.rollout.take() {
            info!(generation = %old.generation, "rollout superseded by a newer one");
            workers_before = old.workers_before;
            for to in old.waiters {
                out.push(Action::Reply {
                    to,
                    outcome: Err(format!(
                        "rollout of generation {} superseded by generation {generation}",
                        old.generation
                    )),
                });
            }
        }
        info!(%generation, workers, max_surge = self.specs[&generation].app.max_surge, "rollout started");
        self.rollout = Some(Rollout {
            generation,
            rollback: false,
            started: now,
            workers_before,
            waiters: reply.into_iter().collect(),
        });
        self.scale(workers, now, out);
        self.queue_rollout(Reason::Rollout);
    }

    fn on_scale(
        &mut self,
        scale: Scale,
        reply: Option<ReplyTo>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let max = self.current_spec().app.max_workers.get();
        let from = self.wanted;
        let to = match scale {
            Scale::To(n) => n,
            Scale::Up => from.saturating_add(1),
            Scale::Down => from.saturating_sub(1),
        };
        let refused = if self.is_stopping() {
            Some("holdfast is stopping".to_string())
        } else if to == 0 {
            Some(format!(
                "cannot scale to 0 workers: at least 1 (running {from})"
            ))
        } else if to > max {
            Some(format!(
                "cannot scale to {to} workers: above max_workers = {max} (running {from}; raise [app] max_workers in the config if you mean it)"
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            warn!(from, to, max_workers = max, "scale refused: {why}");
            return Self::reply(out, reply, Err(why));
        }
        if let Some(r) = &mut self.rollout {
            // The operator's wish holds whatever the rollout's outcome.
            r.workers_before = to;
        }
        self.scale(to, now, out);
        Self::reply(out, reply, Ok(format!("scaled to {to} workers")));
    }

    fn scale(&mut self, workers: u32, now: Instant, out: &mut Vec<Action>) {
        let old = self.wanted;
        if workers == old {
            return;
        }
        info!(from = old, to = workers, "scaling");
        self.wanted = workers;
        if workers > old {
            let g = self.target();
            self.slots.resize(workers as usize, SlotInfo::new(g));
            return;
        }
        self.slots.truncate(workers as usize);
        self.queue.retain(|(s, _, _)| s.0 < workers);
        self.inflight.retain(|r| r.slot.0 < workers);
        let gone: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.slot.0 >= workers)
            .map(|w| w.id)
            .collect();
        for id in gone {
            self.drain(id, now, false, out);
        }
    }

    fn queue_rollout(&mut self, reason: Reason) {
        self.queue
            .retain(|(_, r, _)| !matches!(r, Reason::Rollout | Reason::Rollback));
        for s in 0..self.slots.len() as u32 {
            self.queue.push_back((Slot(s), reason, None));
        }
    }

    fn on_reload_rejected(&mut self, error: String, reply: Option<ReplyTo>, out: &mut Vec<Action>) {
        error!("reload rejected, still running the previous config: {error}");
        self.reload_note = Some(format!("last reload rejected: {error}"));
        // The reload protocol (Type=notify-reload) still wants RELOADING=1 …
        // READY=1 around a reload that changed nothing.
        if self.is_stopping() {
            return Self::reply(out, reply, Err("holdfast is stopping".into()));
        }
        if self.service_state() == ServiceState::Ready {
            let status = self.status_line();
            out.push(Action::Service {
                state: ServiceState::Reloading,
                status: status.clone(),
            });
            out.push(Action::Service {
                state: ServiceState::Ready,
                status: status.clone(),
            });
            self.told = Some((ServiceState::Ready, status));
        }
        Self::reply(out, reply, Err(format!("reload rejected: {error}")));
    }

    fn fail_rollout(
        &mut self,
        generation: Generation,
        why: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(r) = self.rollout.take() else { return };
        if r.generation != generation {
            self.rollout = Some(r);
            return;
        }
        self.counters.failed_rollouts += 1;
        let kind = if r.rollback { "rollback" } else { "rollout" };
        error!(%generation, reason = %why, "{kind} failed; generation {} keeps serving", self.stable);
        // Stop everything of this rollout that has not proven itself,
        // gracefully: a starting worker may already be serving requests.
        let mut stop = Vec::new();
        self.inflight.retain(|x| match x.new {
            Some(new) if matches!(x.reason, Reason::Rollout | Reason::Rollback) => {
                let ready = self.workers.get(&new).is_some_and(|w| w.state.is_ready());
                if !ready {
                    stop.push(new);
                }
                ready // a ready one is already draining its old worker: let it finish
            }
            _ => true,
        });
        // Slots the rollout added and never filled with a ready worker, too.
        let extra: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.generation == generation && w.state.is_starting())
            .map(|w| w.id)
            .collect();
        for id in stop.into_iter().chain(extra) {
            self.drain(id, now, false, out);
        }
        self.queue
            .retain(|(_, r, _)| !matches!(r, Reason::Rollout | Reason::Rollback));
        let message = format!("{kind} of generation {generation} failed: {why}");
        for to in r.waiters {
            out.push(Action::Reply {
                to,
                outcome: Err(message.clone()),
            });
        }
        self.last_rollout = Some((generation, Err(message)));
        // The worker count the failed config asked for goes too.
        if self.wanted != r.workers_before {
            info!(
                from = self.wanted,
                to = r.workers_before,
                "restoring the worker count of generation {}",
                self.stable
            );
            self.scale(r.workers_before, now, out);
        }
        // Slots the failed generation had already taken go back to the stable one.
        for s in &mut self.slots {
            if s.generation == generation {
                s.generation = self.stable;
            }
        }
        // A forward rollout that already moved some slots goes back to the stable generation.
        let moved = self
            .workers
            .values()
            .any(|w| w.state.is_active() && w.generation != self.stable);
        if !r.rollback && moved {
            warn!(generation = %self.stable, "rolling back to the last good generation");
            self.rollout = Some(Rollout {
                generation: self.stable,
                rollback: true,
                started: now,
                workers_before: r.workers_before,
                waiters: Vec::new(),
            });
            self.queue_rollout(Reason::Rollback);
        }
    }

    fn expire(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut timed_out = Vec::new();
        let mut ready = Vec::new();
        let mut kill = Vec::new();
        for w in self.workers.values() {
            let spec = self.spec_of(w);
            match w.state {
                WorkerState::Starting { ready_by } => {
                    if spec.ready() == ReadyMode::Delay
                        && now >= later(w.started, spec.app.ready_delay)
                    {
                        ready.push(w.id);
                    } else if now >= ready_by {
                        timed_out.push(w.id);
                    }
                }
                WorkerState::Checking { ready_by } if now >= ready_by => timed_out.push(w.id),
                WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at }
                    if now >= kill_at =>
                {
                    kill.push(w.id)
                }
                _ => {}
            }
        }
        for id in ready {
            self.on_ready_claim(id, None, now, out);
        }
        for id in kill {
            if let Some(w) = self.workers.get(&id) {
                let spec = self.spec_of(w);
                error!(slot = %w.slot, pid = w.pid.map_or(0, |p| p.0), generation = %w.generation, timeout = ?spec.drain_timeout(),
                    "worker did not exit within drain_timeout after {}; sending SIGKILL to its process group and descendants", spec.drain_signal());
            }
            self.counters.drain_kills += 1;
            self.kill(id, now, out);
        }
        for id in timed_out {
            // One timeout may fail a rollout and drain the others with it.
            let Some(w) = self
                .workers
                .get(&id)
                .filter(|w| w.state.is_starting())
                .cloned()
            else {
                continue;
            };
            let spec = self.spec_of(&w);
            let why = format!(
                "not ready after {}",
                humantime::format_duration(spec.ready_timeout())
            );
            let hint = match (spec.ready(), &w.state) {
                (_, WorkerState::Checking { .. }) => " (it said it was ready; the check of its sockets did not finish)",
                (ReadyMode::Notify, _) => " (ready = \"notify\": it never sent READY=1 to NOTIFY_SOCKET. Servers that do not speak sd_notify, such as Unicorn, need ready = \"delay\" or ready = \"probe\"; Puma needs the sd_notify gem, Debian package ruby-sd-notify)",
                (ReadyMode::Probe, _) => " (ready = \"probe\": GET of ready_path on its private socket never answered below 500. The server must serve every inherited socket, as Gunicorn does; uWSGI needs --protocol http)",
                (ReadyMode::Delay, _) => "",
            };
            let signal = spec.drain_signal();
            error!(slot = %w.slot, pid = w.pid.map_or(0, |p| p.0), generation = %w.generation, "worker {why}{hint}; stopping it with {signal}");
            // Not ready is not idle: a server that never says READY=1 may
            // already accept from the shared sockets, so it gets the drain
            // signal (SIGKILL after drain_timeout), as any old worker does.
            // Draining, its exit does not count as a failure a second time.
            self.drain(id, now, false, out);
            self.worker_failed(w, format!("{why}{hint}"), now, out);
        }
    }

    /// The one place that starts work: fill empty slots, take replacements from
    /// the queue within the surge budget, and notice finished rollouts.
    fn advance(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Phase::Stopping { .. } = self.phase {
            self.finish_stop(now, out);
            return;
        }
        let target = self.target();
        // Empty slots: first start, crash restart, scale-up, stop-first replacement aftermath.
        for s in 0..self.slots.len() as u32 {
            let slot = Slot(s);
            if !self.active_in(slot).is_empty() || self.inflight.iter().any(|r| r.slot == slot) {
                continue;
            }
            let info = &mut self.slots[s as usize];
            if info.restart_at.is_some_and(|t| t > now) {
                continue;
            }
            info.restart_at = None;
            // A crash restart runs the slot's own generation, unless that is
            // neither the stable one nor the rollout's target (a failed one).
            let own = info.generation;
            let g = if own == self.stable || own == target {
                own
            } else {
                target
            };
            self.spawn(slot, g, now, out);
        }
        // Replacements, within the surge budget.
        let max_surge = self.max_surge();
        let budget = max_surge.max(1) as usize;
        let mut i = 0;
        while i < self.queue.len() && self.inflight.len() < budget {
            let (slot, reason, marked) = self.queue[i];
            let active = self.active_in(slot);
            let current = active.first().and_then(|id| self.workers.get(id));
            let stale = match (marked, current) {
                // A memory/age mark is for one worker; gone or replaced means done.
                (Some(id), _) => !active.contains(&id),
                (None, None) => self.rollout.is_none(),
                (None, Some(w)) => self.rollout.is_none() || w.generation == target,
            };
            if stale {
                self.queue.remove(i);
                continue;
            }
            let ready = current.filter(|w| active.len() == 1 && w.state.is_ready());
            let Some((old, old_gen)) = ready.map(|w| (w.id, w.generation)) else {
                i += 1; // starting or empty: wait
                continue;
            };
            if self.inflight.iter().any(|r| r.slot == slot) {
                i += 1;
                continue;
            }
            self.queue.remove(i);
            *self.counters.replacements.entry(reason).or_default() += 1;
            // Memory and age replacements keep the worker's own generation
            // (a rollout under way replaces the slot again in its turn).
            let g = match reason {
                Reason::Memory | Reason::Age if old_gen == self.stable || old_gen == target => {
                    old_gen
                }
                _ => target,
            };
            if max_surge > 0 {
                let new = self.spawn(slot, g, now, out);
                self.inflight.push(Replacement {
                    slot,
                    reason,
                    old,
                    new: Some(new),
                });
            } else {
                self.inflight.push(Replacement {
                    slot,
                    reason,
                    old,
                    new: None,
                });
                self.drain(old, now, false, out);
            }
        }
        self.check_rollout_done(now, out);
        // Every slot has a ready worker; a replacement already under way
        // (memory, age) does not hold back the first READY=1.
        let all_slots_ready = (0..self.slots.len() as u32).all(|s| {
            self.active_in(Slot(s))
                .iter()
                .any(|id| self.workers.get(id).is_some_and(|w| w.state.is_ready()))
        });
        if self.phase == Phase::Starting && all_slots_ready {
            info!(workers = self.slots.len(), generation = %self.stable, "all workers ready");
            self.phase = Phase::Running;
        }
    }

    /// Stopping: exit once every worker and every descendant is gone.
    fn finish_stop(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.workers.is_empty() || !self.listed_since_exit || !self.strays_settled(now) {
            return;
        }
        let Phase::Stopping { waiters } = &mut self.phase else {
            return;
        };
        info!("every worker has exited");
        for to in std::mem::take(waiters) {
            out.push(Action::Reply {
                to,
                outcome: Ok("stopped".into()),
            });
        }
        out.push(Action::Exit { code: 0 });
    }

    fn check_rollout_done(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(r) = &self.rollout else { return };
        let generation = r.generation;
        let pending = self
            .queue
            .iter()
            .any(|(_, x, _)| matches!(x, Reason::Rollout | Reason::Rollback))
            || self
                .inflight
                .iter()
                .any(|x| matches!(x.reason, Reason::Rollout | Reason::Rollback));
        let all_new = (0..self.slots.len() as u32).all(|s| {
            let active = self.active_in(Slot(s));
            active.len() == 1
                && self
                    .workers
                    .get(&active[0])
                    .is_some_and(|w| w.generation == generation && w.state.is_ready())
        });
        if pending || !all_new {
            return;
        }
        let Some(r) = self.rollout.take() else { return };
        let took = now.saturating_duration_since(r.started);
        self.stable = generation;
        let outcome = if r.rollback {
            Err(format!("rolled back to generation {generation}"))
        } else {
            Ok(format!(
                "generation {generation} is serving ({} workers, rollout took {})",
                self.slots.len(),
                humantime::format_duration(round(took))
            ))
        };
        info!(%generation, took = ?took, rollback = r.rollback, "rollout finished");
        for to in r.waiters {
            out.push(Action::Reply {
                to,
                outcome: outcome.clone(),
            });
        }
        if !r.rollback {
            self.last_rollout = Some((generation, Ok(())));
        }
    }

    /// Drops the specs nothing uses any more: neither the stable generation,
    /// the rollout's target, nor any worker.
    fn retire(&mut self, out: &mut Vec<Action>) {
        let mut keep: BTreeSet<Generation> = self.workers.values().map(|w| w.generation).collect();
        keep.insert(self.stable);
        keep.insert(self.target());
        let gone: Vec<Generation> = self
            .specs
            .keys()
            .filter(|g| !keep.contains(g))
            .copied()
            .collect();
        for generation in gone {
            self.specs.remove(&generation);
            debug!(%generation, "generation retired");
            out.push(Action::Retire { generation });
        }
    }

    /// What the service manager should be told now.
    pub fn service_state(&self) -> ServiceState {
        match self.phase {
            Phase::Stopping { .. } => ServiceState::Stopping,
            Phase::Starting => ServiceState::Starting,
            Phase::Running if self.rollout.is_some() => ServiceState::Reloading,
            Phase::Running => ServiceState::Ready,
        }
    }

    /// Tells the service manager what changed: state or status line.
    fn tell(&mut self, out: &mut Vec<Action>) {
        let now = (self.service_state(), self.status_line());
        if self.told.as_ref() != Some(&now) {
            out.push(Action::Service {
                state: now.0,
                status: now.1.clone(),
            });
            self.told = Some(now);
        }
    }

    /// The one-line status (systemd's STATUS=), e.g. `4/4 workers ready,
    /// generation 7, rollout 2/4 to generation 8`. It changes only with the
    /// state, never with the clock.
    pub fn status_line(&self) -> String {
        let workers = self.wanted;
        let mut line = if self.is_stopping() {
            let left = self.workers.len() + self.strays.len();
            format!("stopping: {left} process(es) left")
        } else {
            let ready = self.ready_count();
            let starting = if self.phase == Phase::Starting {
                "starting: "
            } else {
                ""
            };
            format!(
                "{starting}{ready}/{workers} workers ready, generation {}",
                self.stable
            )
        };
        if self.is_stopping() {
            return line;
        }
        if let Some(r) = &self.rollout {
            let done = self
                .workers
                .values()
                .filter(|w| w.generation == r.generation && w.state.is_ready())
                .count();
            let kind = if r.rollback { "rollback" } else { "rollout" };
            line.push_str(&format!(
                ", {kind} {done}/{workers} to generation {}",
                r.generation
            ));
        } else if let Some((g, Err(_))) = &self.last_rollout {
            line.push_str(&format!(", rollout of generation {g} failed"));
        }
        if let Some(note) = &self.reload_note {
            line.push_str(&format!("; {note}"));
        }
        line
    }

    /// Schedules and starts memory sampling rounds for the ready workers
    /// whose generation has a memory limit.
    fn sample_if_due(&mut self, now: Instant, out: &mut Vec<Action>) {
        let interval = self
            .specs
            .values()
            .filter_map(|s| s.memory.as_ref().filter(|m| m.limit.is_some()))
            .map(|m| m.interval)
            .min();
        let Some(interval) = interval else {
            self.sample_at = None;
            return;
        };
        let due = *self.sample_at.get_or_insert_with(|| later(now, interval));
        if now < due || self.is_stopping() {
            return;
        }
        self.sample_at = Some(later(now, interval));
        if let Some(since) = self.sampling {
            if now < later(since, SAMPLE_LOST_AFTER) {
                debug!("the previous memory round is still running; skipping this one");
                return;
            }
            warn!(
                "the memory sampling round started {:?} ago never answered; starting a new one",
                now.saturating_duration_since(since)
            );
        }
        // Only ready workers: decisions are about them, and a tree read while a
        // worker was still starting (children not yet forked) must not be
        // judged after it turned ready.
        let targets: Vec<SampleTarget> = self
            .workers
            .values()
            .filter(|w| w.state.is_ready())
            .filter_map(|w| {
                let r = self.spec_of(w).recycle()?;
                r.limit?;
                Some(SampleTarget {
                    id: w.id,
                    pid: w.pid?,
                    metric: r.metric,
                })
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        self.sampling = Some(now);
        out.push(Action::Sample { targets });
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
