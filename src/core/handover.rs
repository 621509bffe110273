//! The in-place upgrade of holdfast, as the supervisor sees it: the
//! decisions (an upgrade is asked for, fails in the old image, or was
//! adopted by the new one) and the state the old image hands to the new one.
//!
//! The handed-over state, [`CoreState`], is plain data kept apart from the
//! live types: those may change from one version to the next, the format
//! only together with the edge's format version (its envelope carries it).
//! Every `Instant` is written as an [`At`], microseconds relative to the
//! moment of the handover, so a deadline keeps its remaining time and an age
//! its age. [`Supervisor::restore`] is the one way back: a constructor that
//! checks what it reads and refuses a state that cannot be right (a worker
//! of a generation without a spec, two workers with one pid, ...), so a
//! corrupt handover is an error the edge can fall back from, never a panic.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::recycle::ChildState;
use super::{
    later, Action, Counters, MemoryState, Phase, Reason, Replacement, Rollout, ServiceState,
    Settings, SlotInfo, Spec, Stray, Supervisor, Upgrade, Worker, WorkerState,
};
use crate::config::SignalName;
use crate::ids::{Generation, Pid, ReplyTo, Slot, WorkerId};

/// A moment as microseconds from the handover: negative in the past
/// (a start, a `since`), positive in the future (a deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub(crate) struct At(pub i64);

impl At {
    /// `t` relative to `now`.
    pub(crate) fn of(t: Instant, now: Instant) -> At {
        let us = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        if t >= now {
            At(us(t.duration_since(now)))
        } else {
            At(-us(now.duration_since(t)))
        }
    }

    /// The moment, relative to `now` (the new image's clock): a past that
    /// reaches before the clock's origin is the origin's nearest moment.
    pub(crate) fn at(self, now: Instant) -> Instant {
        let d = Duration::from_micros(self.0.unsigned_abs());
        if self.0 >= 0 {
            later(now, d)
        } else {
            now.checked_sub(d).unwrap_or(now)
        }
    }
}

fn opt(t: Option<Instant>, now: Instant) -> Option<At> {
    t.map(|t| At::of(t, now))
}

fn back(a: Option<At>, now: Instant) -> Option<Instant> {
    a.map(|a| a.at(now))
}

/// The supervisor's whole state, handed over by an in-place upgrade.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CoreState {
    pub seed: u64,
    pub reopen_signal: Option<SignalName>,
    /// holdfast is PID 1 (the same pid runs the new image).
    #[serde(default)]
    pub init: bool,
    /// Every generation something still uses, with its whole spec.
    pub specs: Vec<(Generation, Spec)>,
    pub stable: Generation,
    pub newest: Generation,
    pub wanted: u32,
    pub rollout: Option<RolloutState>,
    pub last_rollout: Option<(Generation, Result<(), String>)>,
    pub workers: Vec<WorkerRecord>,
    pub slots: Vec<SlotRecord>,
    pub queue: Vec<(Slot, Reason, Option<WorkerId>)>,
    pub inflight: Vec<ReplacementRecord>,
    pub next_id: u64,
    pub phase: PhaseRecord,
    pub strays: Vec<StrayRecord>,
    pub listed_since_exit: bool,
    pub gone: Vec<(WorkerId, Slot, Pid)>,
    pub sample_at: Option<At>,
    pub recheck_at: Option<At>,
    /// A reload of the same spec waiting for the rollout under way.
    pub deferred: Option<(Spec, Vec<ReplyTo>)>,
    pub reload_note: Option<String>,
    pub told: Option<(ServiceState, String)>,
    pub upgrade: Option<UpgradeRecord>,
    /// `restart --slot` waiters, by the worker being replaced.
    #[serde(default)]
    pub manual: Vec<(WorkerId, Vec<ReplyTo>)>,
    /// As PID 1: orphans reaped and left alone (logged once each).
    #[serde(default)]
    pub foreign: Vec<Pid>,
    pub counters: Counters,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RolloutState {
    pub generation: Generation,
    pub rollback: bool,
    pub started: At,
    pub workers_before: u32,
    pub waiters: Vec<ReplyTo>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct WorkerRecord {
    pub id: WorkerId,
    pub slot: Slot,
    pub generation: Generation,
    pub pid: Option<Pid>,
    pub state: StateRecord,
    pub started: At,
    pub status: Option<String>,
    pub memory: MemoryRecord,
    pub not_serving: u32,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StateRecord {
    Spawning,
    Starting { ready_by: At },
    Checking { ready_by: At },
    Ready { since: At },
    Draining { kill_at: At },
    Stopping { kill_at: At },
    Killed,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct MemoryRecord {
    pub over: u32,
    pub last: Option<u64>,
    pub sampled: bool,
    pub young_logged: bool,
    pub aged: bool,
    /// scope = "process": (child pid, samples over, when it was signalled).
    pub children: Vec<(Pid, u32, Option<At>)>,
    pub retry_at: Option<At>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SlotRecord {
    pub generation: Generation,
    pub crashes: u32,
    pub restart_at: Option<At>,
    pub restarts: u32,
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ReplacementRecord {
    pub slot: Slot,
    pub reason: Reason,
    pub old: WorkerId,
    pub new: Option<WorkerId>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PhaseRecord {
    Starting,
    Running,
    Stopping { waiters: Vec<ReplyTo> },
    Exited,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct StrayRecord {
    pub pid: Pid,
    pub worker: Option<WorkerId>,
    pub comm: String,
    pub since: At,
    pub kill_at: Option<At>,
    pub killed_at: Option<At>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct UpgradeRecord {
    pub started: At,
    pub waiters: Vec<ReplyTo>,
}

impl WorkerState {
    fn record(&self, now: Instant) -> StateRecord {
        let at = |t: Instant| At::of(t, now);
        match *self {
            WorkerState::Spawning => StateRecord::Spawning,
            WorkerState::Starting { ready_by } => StateRecord::Starting {
                ready_by: at(ready_by),
            },
            WorkerState::Checking { ready_by } => StateRecord::Checking {
                ready_by: at(ready_by),
            },
            WorkerState::Ready { since } => StateRecord::Ready { since: at(since) },
            WorkerState::Draining { kill_at } => StateRecord::Draining {
                kill_at: at(kill_at),
            },
            WorkerState::Stopping { kill_at } => StateRecord::Stopping {
                kill_at: at(kill_at),
            },
            WorkerState::Killed => StateRecord::Killed,
        }
    }
}

impl StateRecord {
    fn live(&self, now: Instant) -> WorkerState {
        match *self {
            StateRecord::Spawning => WorkerState::Spawning,
            StateRecord::Starting { ready_by } => WorkerState::Starting {
                ready_by: ready_by.at(now),
            },
            StateRecord::Checking { ready_by } => WorkerState::Checking {
                ready_by: ready_by.at(now),
            },
            StateRecord::Ready { since } => WorkerState::Ready {
                since: since.at(now),
            },
            StateRecord::Draining { kill_at } => WorkerState::Draining {
                kill_at: kill_at.at(now),
            },
            StateRecord::Stopping { kill_at } => WorkerState::Stopping {
                kill_at: kill_at.at(now),
            },
            StateRecord::Killed => WorkerState::Killed,
        }
    }
}

impl MemoryState {
    fn record(&self, now: Instant) -> MemoryRecord {
        MemoryRecord {
            over: self.over,
            last: self.last,
            sampled: self.sampled,
            young_logged: self.young_logged,
            aged: self.aged,
            children: self
                .children
                .iter()
                .map(|(pid, c)| (*pid, c.over, opt(c.signalled_at, now)))
                .collect(),
            retry_at: opt(self.retry_at, now),
        }
    }
}

impl MemoryRecord {
    fn live(&self, now: Instant) -> MemoryState {
        MemoryState {
            over: self.over,
            last: self.last,
            sampled: self.sampled,
            young_logged: self.young_logged,
            aged: self.aged,
            children: self
                .children
                .iter()
                .map(|(pid, over, at)| {
                    (
                        *pid,
                        ChildState {
                            over: *over,
                            signalled_at: back(*at, now),
                        },
                    )
                })
                .collect(),
            retry_at: back(self.retry_at, now),
        }
    }
}

impl Supervisor {
    /// Request::Upgrade: refused while stopping or while another upgrade is
    /// under way; otherwise the edge is told to carry it out. Until the exec,
    /// everything runs on as usual (the rollout in progress too); systemd
    /// hears RELOADING=1 (see `service_state`).
    pub(super) fn on_upgrade(
        &mut self,
        binary: Option<PathBuf>,
        reply: Option<ReplyTo>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.is_stopping() {
            warn!("upgrade refused: holdfast is stopping");
            return Self::reply(out, reply, Err("holdfast is stopping".into()));
        }
        if self.upgrade.is_some() {
            warn!("upgrade refused: another upgrade of holdfast is under way");
            return Self::reply(
                out,
                reply,
                Err(
                    "busy: an upgrade of holdfast is already under way; retry once it has ended"
                        .into(),
                ),
            );
        }
        info!(binary = ?binary, "upgrade of holdfast requested");
        self.upgrade = Some(Upgrade {
            started: now,
            waiters: reply.into_iter().collect(),
        });
        out.push(Action::Upgrade { binary });
    }

    /// The old image could not upgrade: it runs on as it was.
    pub(super) fn upgrade_failed(&mut self, error: String, out: &mut Vec<Action>) {
        let Some(u) = self.upgrade.take() else {
            return;
        };
        self.counters.failed_upgrades += 1;
        error!(%error, "upgrade of holdfast failed; this image runs on, nothing changed");
        for to in u.waiters {
            out.push(Action::Reply {
                to,
                outcome: Err(error.clone()),
            });
        }
    }

    /// The first step of the new image: the waiters get `message`, and the
    /// socket checks the old image had under way (their answers died with
    /// it) are asked for again.
    pub(super) fn upgraded(&mut self, message: String, now: Instant, out: &mut Vec<Action>) {
        if let Some(u) = self.upgrade.take() {
            self.counters.upgrades += 1;
            info!(took = ?now.saturating_duration_since(u.started), "{message}");
            for to in u.waiters {
                out.push(Action::Reply {
                    to,
                    outcome: Ok(message.clone()),
                });
            }
        }
        for w in self.workers.values() {
            if let (WorkerState::Checking { .. }, Some(pid)) = (&w.state, w.pid) {
                out.push(Action::CheckSockets {
                    id: w.id,
                    pid,
                    generation: w.generation,
                });
            }
        }
    }

    /// A supervisor for an image that could not read its predecessor's
    /// state (an upgrade's fallback): `old` are the previous image's worker
    /// processes, as its manifest names them, by serial. They become
    /// generation 1, ready, one per slot, judged by `spec` (their own spec
    /// was in the state that could not be read). The caller then rolls out
    /// generation 2 from the config file, start-before-stop, as any rollout
    /// does; the surplus over its worker count drains once it is ready.
    pub(crate) fn inherit(
        spec: Spec,
        settings: Settings,
        old: Vec<(WorkerId, Pid)>,
        now: Instant,
    ) -> Supervisor {
        let mut sv = Supervisor::new(spec, settings);
        if old.is_empty() {
            return sv;
        }
        sv.wanted = old.len() as u32;
        sv.slots = vec![SlotInfo::new(Generation(1)); old.len()];
        sv.workers.set_slots(sv.wanted);
        for (i, (id, pid)) in old.into_iter().enumerate() {
            sv.next_id = sv.next_id.max(id.0 + 1);
            sv.workers.insert(
                Worker {
                    id,
                    slot: Slot(i as u32),
                    generation: Generation(1),
                    pid: Some(pid),
                    state: WorkerState::Ready { since: now },
                    started: now,
                    status: None,
                    memory: MemoryState::default(),
                    not_serving: 0,
                },
                super::rules!(sv),
            );
        }
        sv.phase = Phase::Running;
        #[cfg(test)]
        sv.check_indexes();
        sv
    }

    /// The whole state as plain data, every moment relative to `now`.
    pub(crate) fn handover(&self, now: Instant) -> CoreState {
        let at = |t: Instant| At::of(t, now);
        CoreState {
            seed: self.settings.seed,
            reopen_signal: self.settings.reopen_signal.map(SignalName),
            init: self.settings.init,
            specs: self.specs.iter().map(|(g, s)| (*g, s.clone())).collect(),
            stable: self.stable,
            newest: self.newest,
            wanted: self.wanted,
            rollout: self.rollout.as_ref().map(|r| RolloutState {
                generation: r.generation,
                rollback: r.rollback,
                started: at(r.started),
                workers_before: r.workers_before,
                waiters: r.waiters.clone(),
            }),
            last_rollout: self.last_rollout.clone(),
            workers: self
                .workers
                .values()
                .map(|w| WorkerRecord {
                    id: w.id,
                    slot: w.slot,
                    generation: w.generation,
                    pid: w.pid,
                    state: w.state.record(now),
                    started: at(w.started),
                    status: w.status.clone(),
                    memory: w.memory.record(now),
                    not_serving: w.not_serving,
                })
                .collect(),
            slots: self
                .slots
                .iter()
                .map(|s| SlotRecord {
                    generation: s.generation,
                    crashes: s.crashes,
                    restart_at: opt(s.restart_at, now),
                    restarts: s.restarts,
                    last_exit: s.last_exit.clone(),
                })
                .collect(),
            queue: self.queue.iter().copied().collect(),
            inflight: self
                .inflight
                .iter()
                .map(|r| ReplacementRecord {
                    slot: r.slot,
                    reason: r.reason,
                    old: r.old,
                    new: r.new,
                })
                .collect(),
            next_id: self.next_id,
            phase: match &self.phase {
                Phase::Starting => PhaseRecord::Starting,
                Phase::Running => PhaseRecord::Running,
                Phase::Stopping { waiters } => PhaseRecord::Stopping {
                    waiters: waiters.clone(),
                },
                Phase::Exited => PhaseRecord::Exited,
            },
            strays: self
                .strays
                .values()
                .map(|s| StrayRecord {
                    pid: s.pid,
                    worker: s.worker,
                    comm: s.comm.clone(),
                    since: at(s.since),
                    kill_at: opt(s.kill_at, now),
                    killed_at: opt(s.killed_at, now),
                })
                .collect(),
            listed_since_exit: self.listed_since_exit,
            gone: self.gone.iter().copied().collect(),
            sample_at: opt(self.sample_at, now),
            recheck_at: opt(self.recheck_at, now),
            deferred: self.deferred.clone(),
            reload_note: self.reload_note.clone(),
            told: self.told.clone(),
            upgrade: self.upgrade.as_ref().map(|u| UpgradeRecord {
                started: at(u.started),
                waiters: u.waiters.clone(),
            }),
            manual: self.manual.iter().map(|(w, to)| (*w, to.clone())).collect(),
            foreign: self.foreign.iter().copied().collect(),
            counters: self.counters.clone(),
        }
    }

    /// The supervisor a handover describes, its moments relative to `now`.
    /// Refuses a state that cannot be right, naming what is wrong. A memory
    /// sampling round the old image had under way is lost with its thread:
    /// the next one starts at its time.
    pub(crate) fn restore(state: CoreState, now: Instant) -> Result<Supervisor, String> {
        let specs: BTreeMap<Generation, Spec> = state.specs.into_iter().collect();
        let has = |g: &Generation| specs.contains_key(g);
        if !has(&state.stable) {
            return Err(format!(
                "the stable generation {} has no spec",
                state.stable
            ));
        }
        if let Some(r) = &state.rollout {
            if !has(&r.generation) {
                return Err(format!(
                    "the rollout's generation {} has no spec",
                    r.generation
                ));
            }
        }
        // Counts no config allows would make slots by the billion (a
        // failed rollout scales back to `workers_before`).
        let ceiling = crate::config::WORKERS_CEILING;
        let deferred = state.deferred.iter().map(|(s, _)| (state.newest, s));
        for (g, s) in specs.iter().map(|(g, s)| (*g, s)).chain(deferred) {
            let (w, max) = (s.app.workers.get(), s.app.max_workers.get());
            if w > ceiling || max > ceiling {
                return Err(format!(
                    "generation {g} asks for {w} workers (max_workers {max}): above the {ceiling} any config allows"
                ));
            }
        }
        if let Some(r) = &state.rollout {
            if r.workers_before == 0 || r.workers_before > ceiling {
                return Err(format!(
                    "the rollout would return to {} workers: not 1 to {ceiling}",
                    r.workers_before
                ));
            }
        }
        if state.wanted == 0 || state.wanted > ceiling || state.slots.len() != state.wanted as usize
        {
            return Err(format!(
                "{} slot(s) for {} wanted worker(s)",
                state.slots.len(),
                state.wanted
            ));
        }
        let mut workers = BTreeMap::new();
        let mut pids = std::collections::BTreeSet::new();
        for w in state.workers {
            if !has(&w.generation) {
                return Err(format!(
                    "worker {} (slot {}) runs generation {}, which has no spec",
                    w.id, w.slot, w.generation
                ));
            }
            if w.id.0 >= state.next_id {
                return Err(format!(
                    "worker id {} is not below the next id {}",
                    w.id, state.next_id
                ));
            }
            if let Some(pid) = w.pid {
                if pid.0 <= 0 || !pids.insert(pid) {
                    return Err(format!("worker pid {pid} is not a valid, unique pid"));
                }
            }
            let live = Worker {
                id: w.id,
                slot: w.slot,
                generation: w.generation,
                pid: w.pid,
                state: w.state.live(now),
                started: w.started.at(now),
                status: w.status,
                memory: w.memory.live(now),
                not_serving: w.not_serving,
            };
            if workers.insert(w.id, live).is_some() {
                return Err(format!("worker id {} appears twice", w.id));
            }
        }
        for r in &state.inflight {
            if r.slot.0 >= state.wanted {
                return Err(format!(
                    "a replacement of slot {} beyond the {} slot(s)",
                    r.slot, state.wanted
                ));
            }
        }
        let slots = state
            .slots
            .into_iter()
            .map(|s| SlotInfo {
                generation: s.generation,
                crashes: s.crashes,
                restart_at: back(s.restart_at, now),
                restarts: s.restarts,
                last_exit: s.last_exit,
            })
            .collect();
        let strays = state
            .strays
            .into_iter()
            .map(|s| {
                (
                    s.pid,
                    Stray {
                        pid: s.pid,
                        worker: s.worker,
                        comm: s.comm,
                        since: s.since.at(now),
                        kill_at: back(s.kill_at, now),
                        killed_at: back(s.killed_at, now),
                    },
                )
            })
            .collect();
        let mut sv = Supervisor {
            settings: Settings {
                seed: state.seed,
                reopen_signal: state.reopen_signal.map(|s| s.0),
                init: state.init,
            },
            specs,
            stable: state.stable,
            newest: state.newest,
            wanted: state.wanted,
            rollout: state.rollout.map(|r| Rollout {
                generation: r.generation,
                rollback: r.rollback,
                started: r.started.at(now),
                workers_before: r.workers_before,
                waiters: r.waiters,
            }),
            last_rollout: state.last_rollout,
            workers: super::Workers::default(),
            slots,
            queue: state.queue.into_iter().collect(),
            inflight: state
                .inflight
                .into_iter()
                .map(|r| Replacement {
                    slot: r.slot,
                    reason: r.reason,
                    old: r.old,
                    new: r.new,
                })
                .collect(),
            next_id: state.next_id,
            phase: match state.phase {
                PhaseRecord::Starting => Phase::Starting,
                PhaseRecord::Running => Phase::Running,
                PhaseRecord::Stopping { waiters } => Phase::Stopping { waiters },
                PhaseRecord::Exited => Phase::Exited,
            },
            strays,
            listed_since_exit: state.listed_since_exit,
            gone: state.gone.into_iter().collect(),
            sample_at: back(state.sample_at, now),
            sampling: None,
            recheck_at: back(state.recheck_at, now),
            deferred: state.deferred,
            reload_note: state.reload_note,
            told: state.told,
            upgrade: state.upgrade.map(|u| Upgrade {
                started: u.started.at(now),
                waiters: u.waiters,
            }),
            manual: state.manual.into_iter().collect(),
            foreign: state.foreign.into_iter().collect(),
            counters: state.counters,
        };
        // The indexes are derived, not handed over: rebuilt here.
        sv.workers.set_slots(sv.wanted);
        for w in workers.into_values() {
            sv.workers.insert(w, super::rules!(sv));
        }
        #[cfg(test)]
        sv.check_indexes();
        Ok(sv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_keep_their_distance_to_now() {
        let now = Instant::now();
        let then = now + Duration::from_millis(1500);
        let before = now.checked_sub(Duration::from_millis(250)).unwrap_or(now);
        assert_eq!(At::of(then, now), At(1_500_000));
        assert_eq!(At::of(before, now), At(-250_000));
        assert_eq!(At::of(now, now), At(0));
        // Read back by a later image: the same distances from its own now.
        let later_now = now + Duration::from_secs(7);
        assert_eq!(
            At(1_500_000).at(later_now),
            later_now + Duration::from_millis(1500)
        );
        assert_eq!(
            At(-250_000).at(later_now),
            later_now - Duration::from_millis(250)
        );
        // A past before the clock's origin saturates instead of panicking.
        assert!(At(i64::MIN).at(now) <= now);
        assert!(At(i64::MAX).at(now) > now);
    }
}
