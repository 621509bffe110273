//! The supervisor: the one owner of all worker state, and the only place that
//! decides what happens to a worker.
//!
//! It is a pure state machine: [`Supervisor::step`] takes the time and one
//! [`Event`] and returns the [`Action`]s to carry out. It makes no syscalls,
//! reads no clock and never awaits, so rollouts, surge limits, rollback and
//! backoff are unit-tested as tables of events and expected actions. Deadlines
//! live in the state; [`Supervisor::next_deadline`] tells the edge when to
//! send [`Event::Tick`].
//!
//! Every replacement — rollout, rollback, memory, age — is the same
//! start-before-stop step taken from one queue, limited by `max_surge`
//! (`max_surge = 0`: stop first, then start). A crashed worker leaves an empty
//! slot, which is refilled after an exponential backoff.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use crate::config::ReadyMode;
use crate::memory::TreeSample;

mod recycle;
pub use recycle::{MemoryState, Recycle};

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
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
    /// A config generation; every rollout makes a new one.
    Generation(u64)
);
id_type!(
    /// One worker process's identity inside holdfast, known before its pid.
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

/// The tunables of the replacement step (the `[app]` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub workers: u32,
    pub max_surge: u32,
    pub ready: ReadyMode,
    pub ready_delay: Duration,
    pub ready_timeout: Duration,
    pub drain_signal: Signal,
    pub drain_timeout: Duration,
    pub backoff_max: Duration,
}

/// The first restart delay after a crash; it doubles up to `backoff_max`.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// A worker that was ready this long before it died starts its backoff afresh.
pub const BACKOFF_RESET: Duration = Duration::from_secs(10);

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

/// A request from outside (signal or control socket).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Roll every worker to a new generation with this policy (config already re-read).
    Rollout {
        policy: Policy,
    },
    Scale {
        workers: u32,
    },
    /// Graceful stop; a second one kills at once.
    Stop,
    /// Stop now: SIGKILL every worker.
    Kill,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Tick,
    Spawned {
        id: WorkerId,
        pid: Pid,
    },
    SpawnFailed {
        id: WorkerId,
        error: String,
    },
    /// The worker (or one of its descendants) is ready.
    Ready {
        id: WorkerId,
    },
    /// A worker's STATUS= line.
    Status {
        id: WorkerId,
        status: String,
    },
    Exited {
        pid: Pid,
        reason: ExitReason,
    },
    /// Replace a worker (memory or age), start-before-stop.
    Replace {
        pid: Pid,
        reason: Reason,
        detail: String,
    },
    /// One memory sampling round (see `crate::memory`): facts, no decisions.
    MemorySample {
        samples: Vec<TreeSample>,
    },
    Request {
        request: Request,
        reply: Option<ReplyTo>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Spawn {
        id: WorkerId,
        slot: Slot,
        generation: Generation,
    },
    /// Send the drain signal to the worker's pid.
    Signal {
        id: WorkerId,
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
    /// SIGKILL the worker's whole process group.
    Kill {
        id: WorkerId,
        pid: Pid,
    },
    /// After READY: check the worker's tree holds the listeners, restore unix paths.
    Verify {
        id: WorkerId,
        pid: Pid,
    },
    /// A rollout ended; generations older than `keep` that no worker runs can be dropped.
    RolloutDone {
        generation: Generation,
        outcome: Result<(), String>,
        keep: Generation,
    },
    /// The first generation is ready (systemd READY=1).
    AllReady,
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
            WorkerState::Ready { .. } => "ready",
            WorkerState::Draining { .. } => "draining",
            WorkerState::Stopping { .. } => "stopping",
            WorkerState::Killed => "killed",
        }
    }
    fn is_active(&self) -> bool {
        matches!(
            self,
            WorkerState::Spawning | WorkerState::Starting { .. } | WorkerState::Ready { .. }
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

#[derive(Debug, Clone, Default)]
pub struct SlotInfo {
    /// Crashes in a row (reset once a worker stays up BACKOFF_RESET).
    pub crashes: u32,
    pub restart_at: Option<Instant>,
    pub restarts: u32,
    pub last_exit: Option<String>,
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
    waiters: Vec<ReplyTo>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counters {
    pub replacements: BTreeMap<Reason, u64>,
    pub failed_rollouts: u64,
    pub drain_kills: u64,
    /// Bloated children sent `child_signal` (`[memory]` scope = "process").
    pub child_signals: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Starting,
    Running,
    Stopping { waiters: Vec<ReplyTo> },
}

/// The whole of holdfast's worker state.
#[derive(Debug)]
pub struct Supervisor {
    policy: Policy,
    /// What crash restarts and new slots run when no rollout is under way.
    stable: Generation,
    newest: Generation,
    rollout: Option<Rollout>,
    last_rollout: Option<(Generation, Result<(), String>)>,
    workers: BTreeMap<WorkerId, Worker>,
    slots: Vec<SlotInfo>,
    /// Replacements waiting for surge budget; memory/age entries name their worker.
    queue: VecDeque<(Slot, Reason, Option<WorkerId>)>,
    inflight: Vec<Replacement>,
    next_id: u64,
    phase: Phase,
    /// `[memory]`: memory limits and lifetimes; `None` when not configured.
    recycle: Option<Recycle>,
    pub counters: Counters,
}

impl Supervisor {
    /// A supervisor for generation 1 with `policy`; the first `Tick` spawns the workers.
    pub fn new(policy: Policy) -> Self {
        let slots = vec![SlotInfo::default(); policy.workers as usize];
        Supervisor {
            policy,
            stable: Generation(1),
            newest: Generation(1),
            rollout: None,
            last_rollout: None,
            workers: BTreeMap::new(),
            slots,
            queue: VecDeque::new(),
            inflight: Vec::new(),
            next_id: 1,
            phase: Phase::Starting,
            recycle: None,
            counters: Counters::default(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
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
    pub fn rollout(&self) -> Option<&Rollout> {
        self.rollout.as_ref()
    }
    pub fn last_rollout(&self) -> Option<&(Generation, Result<(), String>)> {
        self.last_rollout.as_ref()
    }
    pub fn stable(&self) -> Generation {
        self.stable
    }
    /// The generation the next `Request::Rollout` will create.
    pub fn next_generation(&self) -> Generation {
        Generation(self.newest.0 + 1)
    }
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }
    /// Workers that are ready now.
    pub fn ready_count(&self) -> usize {
        self.workers
            .values()
            .filter(|w| matches!(w.state, WorkerState::Ready { .. }))
            .count()
    }
    fn target(&self) -> Generation {
        self.rollout.as_ref().map_or(self.stable, |r| r.generation)
    }

    /// The earliest deadline in the state: when the edge must send `Tick`.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|w| match w.state {
            WorkerState::Starting { ready_by } => {
                let delay = (self.policy.ready == ReadyMode::Delay)
                    .then(|| w.started + self.policy.ready_delay);
                Some(delay.map_or(ready_by, |d| d.min(ready_by)))
            }
            WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at } => Some(kill_at),
            _ => None,
        });
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        workers.chain(restarts).chain(self.age_deadlines()).min()
    }

    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Tick => {
                self.expire(now, &mut out);
                self.expire_ages(now);
            }
            Event::Spawned { id, pid } => self.on_spawned(id, pid, now),
            Event::SpawnFailed { id, error } => self.on_spawn_failed(id, error, now, &mut out),
            Event::Ready { id } => self.on_ready(id, now, &mut out),
            Event::Status { id, status } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.status = Some(status);
                }
            }
            Event::Exited { pid, reason } => self.on_exit(pid, reason, now, &mut out),
            Event::Replace {
                pid,
                reason,
                detail,
            } => self.on_replace(pid, reason, detail),
            Event::MemorySample { samples } => self.on_memory_sample(samples, now, &mut out),
            Event::Request { request, reply } => self.on_request(request, reply, now, &mut out),
        }
        self.advance(now, &mut out);
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

    /// Sends the drain signal; SIGKILL follows at the deadline.
    fn drain(&mut self, id: WorkerId, now: Instant, stopping: bool, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let kill_at = now + self.policy.drain_timeout;
        match (w.pid, &w.state) {
            (_, WorkerState::Killed) => {}
            (_, WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at })
                if stopping =>
            {
                w.state = WorkerState::Stopping { kill_at: *kill_at };
            }
            (_, WorkerState::Draining { .. } | WorkerState::Stopping { .. }) => {}
            (Some(pid), _) => {
                info!(slot = %w.slot, %pid, generation = %w.generation, signal = %self.policy.drain_signal, "draining worker");
                w.state = if stopping {
                    WorkerState::Stopping { kill_at }
                } else {
                    WorkerState::Draining { kill_at }
                };
                out.push(Action::Signal {
                    id,
                    pid,
                    signal: self.policy.drain_signal,
                });
            }
            (None, _) => {
                // Never got a pid: nothing to signal.
                self.workers.remove(&id);
            }
        }
    }

    fn kill(&mut self, id: WorkerId, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match w.pid {
            Some(pid) if w.state != WorkerState::Killed => {
                w.state = WorkerState::Killed;
                out.push(Action::Kill { id, pid });
            }
            Some(_) => {}
            None => {
                self.workers.remove(&id);
            }
        }
    }

    fn on_spawned(&mut self, id: WorkerId, pid: Pid, now: Instant) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.pid = Some(pid);
            w.started = now;
            w.state = WorkerState::Starting {
                ready_by: now + self.policy.ready_timeout,
            };
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
        self.worker_failed(w, error, now, out);
    }

    /// A worker that never became ready is gone (exit, spawn failure, timeout).
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
                    let retry = self.policy.backoff_max;
                    warn!(slot = %r.slot, reason = %r.reason, error = %why, retry_in = ?retry, "replacement worker failed; the old worker keeps serving");
                    if let Some(old) = self.workers.get_mut(&r.old) {
                        old.memory.replacement_failed(now + retry);
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
        self.crashed(w.slot, why, now, false);
    }

    fn crashed(&mut self, slot: Slot, why: String, now: Instant, was_up_long: bool) {
        let Some(info) = self.slots.get_mut(slot.0 as usize) else {
            return;
        };
        if was_up_long {
            info.crashes = 0;
        }
        info.crashes += 1;
        let factor = 1u32.checked_shl(info.crashes - 1).unwrap_or(u32::MAX);
        let delay = BACKOFF_START
            .saturating_mul(factor)
            .min(self.policy.backoff_max);
        info.restart_at = Some(now + delay);
        info.last_exit = Some(why.clone());
        *self.counters.replacements.entry(Reason::Crash).or_default() += 1;
        warn!(%slot, error = %why, crashes = info.crashes, restart_in = ?delay, "worker crashed; restarting after backoff");
    }

    fn on_ready(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let WorkerState::Starting { .. } = w.state else {
            return;
        };
        let Some(pid) = w.pid else { return };
        w.state = WorkerState::Ready { since: now };
        info!(slot = %w.slot, %pid, generation = %w.generation, took = ?now.saturating_duration_since(w.started), "worker ready");
        out.push(Action::Verify { id, pid });
        // Start-before-stop: the new one is ready, so the old one may drain.
        if let Some(r) = self.inflight.iter().find(|r| r.new == Some(id)) {
            let old = r.old;
            if self.policy.max_surge > 0 {
                self.drain(old, now, false, out);
            } else {
                // max_surge = 0 drained the old one first: this replacement is done.
                self.inflight.retain(|r| r.new != Some(id));
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, reason: ExitReason, now: Instant, out: &mut Vec<Action>) {
        let Some(id) = self.worker_by_pid(pid) else {
            debug!(%pid, %reason, "reaped a process that is not a worker");
            return;
        };
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        let age = now.saturating_duration_since(w.started);
        if let Some(info) = self.slots.get_mut(w.slot.0 as usize) {
            info.last_exit = Some(reason.to_string());
        }
        match w.state {
            WorkerState::Draining { .. } | WorkerState::Stopping { .. } | WorkerState::Killed => {
                info!(slot = %w.slot, %pid, generation = %w.generation, %reason, "worker exited");
                if let Some(pos) = self.inflight.iter().position(|r| r.old == id) {
                    let r = self.inflight.remove(pos);
                    if self.policy.max_surge == 0 && !self.is_stopping() {
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
                if let Some(info) = self.slots.get_mut(w.slot.0 as usize) {
                    info.restarts += 1;
                }
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
            WorkerState::Spawning | WorkerState::Starting { .. } => {
                warn!(slot = %w.slot, %pid, generation = %w.generation, %reason, "worker exited before it was ready");
                if let Some(info) = self.slots.get_mut(w.slot.0 as usize) {
                    info.restarts += 1;
                }
                self.worker_failed(w, format!("exited before ready ({reason})"), now, out);
            }
        }
    }

    fn on_replace(&mut self, pid: Pid, reason: Reason, detail: String) {
        if let Some(id) = self.worker_by_pid(pid) {
            self.queue_replacement(id, reason, detail);
        }
    }

    /// Queues a start-before-stop replacement of ready worker `id` for
    /// `reason`, unless it is already queued or being replaced. Returns
    /// whether it was queued.
    fn queue_replacement(&mut self, id: WorkerId, reason: Reason, detail: String) -> bool {
        let Some(w) = self.workers.get(&id) else {
            return false;
        };
        let Some(pid) = w.pid else { return false };
        if !matches!(w.state, WorkerState::Ready { .. }) || self.is_stopping() {
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

    fn on_request(
        &mut self,
        request: Request,
        reply: Option<ReplyTo>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match request {
            Request::Rollout { policy } => {
                if self.is_stopping() {
                    if let Some(to) = reply {
                        out.push(Action::Reply {
                            to,
                            outcome: Err("holdfast is stopping".into()),
                        });
                    }
                    return;
                }
                let workers = policy.workers;
                self.policy = policy;
                self.newest = Generation(self.newest.0 + 1);
                let generation = self.newest;
                if let Some(old) = self.rollout.take() {
                    info!(generation = %old.generation, "rollout superseded by a newer one");
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
                info!(%generation, workers, max_surge = self.policy.max_surge, "rollout started");
                self.rollout = Some(Rollout {
                    generation,
                    rollback: false,
                    started: now,
                    waiters: reply.into_iter().collect(),
                });
                self.scale(workers, now, out);
                self.queue_rollout(Reason::Rollout);
            }
            Request::Scale { workers } => {
                if self.is_stopping() || workers == 0 {
                    if let Some(to) = reply {
                        out.push(Action::Reply {
                            to,
                            outcome: Err(if workers == 0 {
                                "workers must be at least 1".into()
                            } else {
                                "holdfast is stopping".into()
                            }),
                        });
                    }
                    return;
                }
                self.scale(workers, now, out);
                if let Some(to) = reply {
                    out.push(Action::Reply {
                        to,
                        outcome: Ok(format!("scaled to {workers} workers")),
                    });
                }
            }
            Request::Stop => {
                if let Phase::Stopping { waiters } = &mut self.phase {
                    warn!("second stop request: killing every worker now");
                    waiters.extend(reply);
                    let ids: Vec<_> = self.workers.keys().copied().collect();
                    for id in ids {
                        self.kill(id, out);
                    }
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
                    self.kill(id, out);
                }
            }
        }
    }

    fn scale(&mut self, workers: u32, now: Instant, out: &mut Vec<Action>) {
        let old = self.slots.len() as u32;
        if workers == old {
            return;
        }
        info!(from = old, to = workers, "scaling");
        self.policy.workers = workers;
        if workers > old {
            self.slots.resize(workers as usize, SlotInfo::default());
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
        error!(%generation, reason = %why, "{kind} failed; the previous generation keeps serving");
        // Stop everything of this rollout that has not proven itself,
        // gracefully: a starting worker may already be serving requests.
        let mut stop = Vec::new();
        self.inflight.retain(|x| match x.new {
            Some(new) if matches!(x.reason, Reason::Rollout | Reason::Rollback) => {
                let ready = self
                    .workers
                    .get(&new)
                    .is_some_and(|w| matches!(w.state, WorkerState::Ready { .. }));
                if !ready {
                    stop.push(new);
                }
                ready // a ready one is already draining its old worker: let it finish
            }
            _ => true,
        });
        for id in stop {
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
        self.last_rollout = Some((generation, Err(message.clone())));
        out.push(Action::RolloutDone {
            generation,
            outcome: Err(message),
            keep: self.stable,
        });
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
            match w.state {
                WorkerState::Starting { ready_by } => {
                    if self.policy.ready == ReadyMode::Delay
                        && now >= w.started + self.policy.ready_delay
                    {
                        ready.push(w.id);
                    } else if now >= ready_by {
                        timed_out.push(w.id);
                    }
                }
                WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at }
                    if now >= kill_at =>
                {
                    kill.push(w.id)
                }
                _ => {}
            }
        }
        for id in ready {
            self.on_ready(id, now, out);
        }
        for id in kill {
            if let Some(w) = self.workers.get(&id) {
                error!(slot = %w.slot, pid = w.pid.map_or(0, |p| p.0), generation = %w.generation, timeout = ?self.policy.drain_timeout,
                    "worker did not exit within drain_timeout after {}; sending SIGKILL to its process group", self.policy.drain_signal);
            }
            self.counters.drain_kills += 1;
            self.kill(id, out);
        }
        for id in timed_out {
            let Some(w) = self.workers.get(&id).cloned() else {
                continue;
            };
            let why = format!(
                "not ready after {}",
                humantime::format_duration(self.policy.ready_timeout)
            );
            let hint = match self.policy.ready {
                ReadyMode::Notify => " (ready = \"notify\": it never sent READY=1 to NOTIFY_SOCKET. Servers that do not speak sd_notify, such as Unicorn, need ready = \"delay\" or ready = \"probe\"; Puma needs the sd_notify gem, Debian package ruby-sd-notify)",
                ReadyMode::Probe => " (ready = \"probe\": GET of ready_path on its private socket never answered below 500. The server must serve every inherited socket, as Gunicorn does; uWSGI needs --protocol http)",
                ReadyMode::Delay => "",
            };
            error!(slot = %w.slot, pid = w.pid.map_or(0, |p| p.0), generation = %w.generation, "worker {why}{hint}; stopping it with {}", self.policy.drain_signal);
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
        match &mut self.phase {
            Phase::Stopping { waiters } => {
                if self.workers.is_empty() {
                    info!("every worker has exited");
                    for to in std::mem::take(waiters) {
                        out.push(Action::Reply {
                            to,
                            outcome: Ok("stopped".into()),
                        });
                    }
                    out.push(Action::Exit { code: 0 });
                }
                return;
            }
            Phase::Starting | Phase::Running => {}
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
            self.spawn(slot, target, now, out);
        }
        // Replacements, within the surge budget.
        let budget = self.policy.max_surge.max(1) as usize;
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
            let ready = current
                .filter(|w| active.len() == 1 && matches!(w.state, WorkerState::Ready { .. }));
            let Some(old) = ready.map(|w| w.id) else {
                i += 1; // starting or empty: wait
                continue;
            };
            if self.inflight.iter().any(|r| r.slot == slot) {
                i += 1;
                continue;
            }
            self.queue.remove(i);
            *self.counters.replacements.entry(reason).or_default() += 1;
            if self.policy.max_surge > 0 {
                let new = self.spawn(slot, target, now, out);
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
            self.active_in(Slot(s)).iter().any(|id| {
                self.workers
                    .get(id)
                    .is_some_and(|w| matches!(w.state, WorkerState::Ready { .. }))
            })
        });
        if self.phase == Phase::Starting && all_slots_ready {
            info!(workers = self.slots.len(), generation = %self.stable, "all workers ready");
            self.phase = Phase::Running;
            out.push(Action::AllReady);
        }
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
                && self.workers.get(&active[0]).is_some_and(|w| {
                    w.generation == generation && matches!(w.state, WorkerState::Ready { .. })
                })
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
        out.push(Action::RolloutDone {
            generation,
            outcome: outcome.map(|_| ()),
            keep: generation,
        });
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
