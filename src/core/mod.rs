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

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::ids::{Generation, Pid, ReplyTo, Slot, WorkerId};

mod actions;
mod events;
mod handover;
mod lifecycle;
mod recycle;
mod rollout;
mod spec;
mod state;
mod strays;
mod table;
pub use actions::SampleTarget;
pub(crate) use actions::{Action, ServiceState};
pub use events::{Event, Usage};
pub use events::{ExitReason, ReadyVia, Request, TreeSample};
pub use events::{ProcessSample, Scale};
pub(crate) use handover::{At, CoreState};
pub use recycle::MemoryState;
pub(crate) use spec::Spec;
pub use state::Worker;
pub use state::WorkerState;
pub(crate) use state::{Counters, Reason, Rollout, Settings, SlotInfo};
use state::{Phase, Replacement, Upgrade};
use table::Workers;

/// The [`Rules`] a worker's deadline is computed with, borrowed from the
/// supervisor's fields (so `self.workers` can be borrowed mutably beside it).
macro_rules! rules {
    ($sv:expr) => {
        &crate::core::table::Rules {
            specs: &$sv.specs,
            seed: $sv.settings.seed,
        }
    };
}
pub(crate) use rules;
pub use strays::AdoptedProc;
pub(crate) use strays::Stray;

/// The first restart delay after a crash; it doubles up to `restart_backoff_max`.
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(100);
/// A worker that was ready this long before it died starts its backoff afresh.
pub(crate) const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// A memory sampling round that has not come back after this long is lost
/// (its thread died): the next one may start.
pub(crate) const SAMPLE_LOST_AFTER: Duration = Duration::from_secs(60);
/// How often the listeners a ready worker must hold are checked again.
pub(crate) const RECHECK_EVERY: Duration = Duration::from_secs(2);
/// Checks in a row without its listeners before a ready worker is replaced
/// (one could be a moment of a server re-arranging its fds).
pub(crate) const NOT_SERVING_AFTER: u32 = 2;

/// `now + d`, saturating a hundred years ahead: a deadline can never
/// overflow, whatever a config says (the config refuses such durations too).
pub fn later(now: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
    now.checked_add(d.min(FAR))
        .or_else(|| now.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(now)
}

/// The whole of holdfast's worker state.
#[derive(Debug)]
pub(crate) struct Supervisor {
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
    workers: Workers,
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
    /// When ready workers' listeners are checked next.
    recheck_at: Option<Instant>,
    /// A reload of the same spec as the rollout under way: it runs once that
    /// one ends (so every worker starts after it), with these waiters.
    deferred: Option<(Spec, Vec<ReplyTo>)>,
    /// Why the last reload was rejected, until the next accepted one.
    reload_note: Option<String>,
    /// What the service manager was last told.
    told: Option<(ServiceState, String)>,
    /// `restart --slot` waiters, by the worker to replace: answered when
    /// its replacement is ready, or with why it failed.
    manual: BTreeMap<WorkerId, Vec<ReplyTo>>,
    /// As PID 1: orphans of the namespace that are no worker's, reaped but
    /// left alone (logged once each).
    foreign: std::collections::BTreeSet<Pid>,
    /// An in-place upgrade of holdfast itself under way.
    upgrade: Option<Upgrade>,
    pub counters: Counters,
}

impl Supervisor {
    /// A supervisor for generation 1 with `spec`; the first `Tick` spawns the workers.
    pub fn new(spec: Spec, settings: Settings) -> Self {
        let wanted = spec.app.workers.get();
        let slots = vec![SlotInfo::new(Generation(1)); wanted as usize];
        let mut specs = BTreeMap::new();
        specs.insert(Generation(1), spec);
        let mut workers = Workers::default();
        workers.set_slots(wanted);
        Supervisor {
            settings,
            specs,
            stable: Generation(1),
            newest: Generation(1),
            wanted,
            rollout: None,
            last_rollout: None,
            workers,
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
            recheck_at: None,
            deferred: None,
            reload_note: None,
            told: None,
            manual: BTreeMap::new(),
            foreign: std::collections::BTreeSet::new(),
            upgrade: None,
            counters: Counters::default(),
        }
    }

    /// Numbers new workers from `first` on (ids below it are never used):
    /// a holdfast restarted by systemd while the previous one's workers
    /// still drain (`KillMode=process`) continues after their serials, so
    /// no worker id, `HOLDFAST_WORKER_SERIAL` or `worker-N` cgroup is reused.
    pub(crate) fn number_workers_from(&mut self, first: u64) {
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
    pub(crate) fn current_spec(&self) -> &Spec {
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
    pub(crate) fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }
    pub(crate) fn slot_info(&self, slot: Slot) -> Option<&SlotInfo> {
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
    pub(crate) fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. } | Phase::Exited)
    }
    /// Whether an in-place upgrade of holdfast is under way (requested, not
    /// yet failed or adopted).
    pub(crate) fn is_upgrading(&self) -> bool {
        self.upgrade.is_some()
    }
    /// Adopted descendants holdfast knows of.
    pub(crate) fn strays(&self) -> impl Iterator<Item = &Stray> {
        self.strays.values()
    }
    /// Why the last reload was rejected, until the next accepted one.
    pub(crate) fn reload_note(&self) -> Option<&str> {
        self.reload_note.as_deref()
    }
    /// Workers that are ready now.
    pub(crate) fn ready_count(&self) -> usize {
        self.workers.ready_count()
    }
    /// Whether every slot has a ready worker of the current generation and
    /// holdfast is not stopping (what an orchestrator's readiness probe asks).
    pub(crate) fn all_current_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// What a readiness probe answers: `Ok` when every slot has a ready
    /// worker of the current generation — the last good one, or the one a
    /// rollout under way brings (start-before-stop keeps a ready worker of
    /// one or the other in every slot, so a healthy rollout never makes
    /// holdfast unready) — and holdfast is not stopping; else the reason, in
    /// one line. A stop makes it unready at once, before any worker drains,
    /// so an orchestrator stops sending traffic first.
    pub(crate) fn readiness(&self) -> Result<String, String> {
        if self.is_stopping() {
            return Err("holdfast is stopping".into());
        }
        let current = [self.stable, self.target()];
        let total = self.slots.len();
        // O(workers): a probe's answer is about every slot.
        let ready = (0..total as u32)
            .filter(|&s| {
                self.workers
                    .in_slot(Slot(s))
                    .any(|w| w.state.is_ready() && current.contains(&w.generation))
            })
            .count();
        let generation = match &self.rollout {
            Some(r) if r.generation != self.stable => {
                format!("generation {} (rollout to {})", self.stable, r.generation)
            }
            _ => format!("generation {}", self.stable),
        };
        if ready == total {
            Ok(format!(
                "ready: {ready}/{total} slots have a ready worker, {generation}"
            ))
        } else {
            Err(format!(
                "{ready}/{total} slots have a ready worker of {generation}"
            ))
        }
    }
    /// Recomputes the workers' indexes and panics if they differ (the
    /// table tests run it after every step).
    #[cfg(test)]
    pub(crate) fn check_indexes(&self) {
        if let Err(e) = self.workers.check(rules!(self)) {
            panic!("{e}");
        }
    }
    fn target(&self) -> Generation {
        self.rollout.as_ref().map_or(self.stable, |r| r.generation)
    }
    fn max_surge(&self) -> u32 {
        self.current_spec().app.max_surge
    }

    /// The earliest deadline in the state: when the edge must send `Tick`.
    /// O(log N) in the workers: their deadlines (state and age) are kept
    /// ordered; a restart is pending only in an empty slot.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let restarts = self
            .workers
            .empty_slots()
            .filter_map(|s| self.slots.get(s.0 as usize)?.restart_at);
        let sampling = self
            .sample_at
            .into_iter()
            .chain(self.sampling.map(|t| later(t, SAMPLE_LOST_AFTER)))
            .chain(self.recheck_at);
        self.workers
            .next_deadline()
            .into_iter()
            .chain(restarts)
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
                if let Some(w) = self.workers.get_mut_unindexed(&id) {
                    w.status = Some(status);
                }
            }
            Event::SocketsChecked { id, missing } => {
                self.on_sockets_checked(id, missing, now, &mut out)
            }
            Event::Exited {
                pid,
                reason,
                output,
            } => self.on_exit(pid, reason, output, now, &mut out),
            Event::Adopted { procs } => self.on_adopted(procs, now, &mut out),
            Event::MemorySample { samples } => {
                self.sampling = None;
                self.on_memory_sample(samples, now, &mut out)
            }
            Event::ReloadRejected { error, reply } => {
                self.on_reload_rejected(error, reply, &mut out)
            }
            Event::Request { request, reply } => self.on_request(request, reply, now, &mut out),
            Event::UpgradeFailed { error } => self.upgrade_failed(error, &mut out),
            Event::Upgraded { message } => self.upgraded(message, now, &mut out),
        }
        self.advance(now, &mut out);
        self.answer_lost_manual(&mut out);
        self.sample_if_due(now, &mut out);
        self.recheck_if_due(now, &mut out);
        self.retire(&mut out);
        self.tell(&mut out);
        #[cfg(test)]
        self.check_indexes();
        out
    }

    /// Whether the exit of `pid` would be a failure that reports the
    /// worker's last lines (it is a worker not yet ready): the edge then
    /// drains its output pipes before it reports [`Event::Exited`].
    pub(crate) fn exit_would_fail(&self, pid: Pid) -> bool {
        self.worker_by_pid(pid)
            .and_then(|id| self.workers.get(&id))
            .is_some_and(|w| w.state.is_starting())
    }

    fn worker_by_pid(&self, pid: Pid) -> Option<WorkerId> {
        self.workers.by_pid(pid)
    }

    /// The active workers of `slot`, by id: O(log N + workers in the slot).
    fn active_in(&self, slot: Slot) -> Vec<WorkerId> {
        self.workers
            .in_slot(slot)
            .filter(|w| w.state.is_active())
            .map(|w| w.id)
            .collect()
    }

    fn reply(out: &mut Vec<Action>, reply: Option<ReplyTo>, outcome: Result<String, String>) {
        if let Some(to) = reply {
            out.push(Action::Reply { to, outcome });
        }
    }

    /// What the service manager should be told now.
    pub(crate) fn service_state(&self) -> ServiceState {
        match self.phase {
            Phase::Stopping { .. } | Phase::Exited => ServiceState::Stopping,
            Phase::Starting => ServiceState::Starting,
            Phase::Running if self.rollout.is_some() || self.upgrade.is_some() => {
                ServiceState::Reloading
            }
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
    pub(crate) fn status_line(&self) -> String {
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
            let done = self.workers.ready_in_generation(r.generation);
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
        if self.upgrade.is_some() {
            line.push_str("; upgrading holdfast");
        }
        line
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests;

impl Supervisor {
    /// Every [`RECHECK_EVERY`], the listeners each ready worker must hold
    /// are checked again: ready means serving for as long as it runs, not
    /// only at READY=1.
    ///
    /// Per step it costs O(generations); the walk of every ready worker
    /// happens once per [`RECHECK_EVERY`], when the checks are due.
    fn recheck_if_due(&mut self, now: Instant, out: &mut Vec<Action>) {
        let checked = |g: Generation| {
            self.specs
                .get(&g)
                .unwrap_or_else(|| self.current_spec())
                .required_listeners()
                .next()
                .is_some()
        };
        let any = self.workers.ready_generations().any(checked);
        if !any || self.is_stopping() {
            self.recheck_at = None;
            return;
        }
        let at = *self
            .recheck_at
            .get_or_insert_with(|| later(now, RECHECK_EVERY));
        if now < at {
            return;
        }
        self.recheck_at = Some(later(now, RECHECK_EVERY));
        let due: Vec<(WorkerId, Pid, Generation)> = self
            .workers
            .values()
            .filter(|w| w.state.is_ready())
            .filter(|w| self.spec_of(w).required_listeners().next().is_some())
            .filter_map(|w| Some((w.id, w.pid?, w.generation)))
            .collect();
        for (id, pid, generation) in due {
            out.push(Action::CheckSockets {
                id,
                pid,
                generation,
            });
        }
    }
}
