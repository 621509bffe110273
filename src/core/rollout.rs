//! Rollouts and the one place that starts work: requests (rollout, scale,
//! reopen, stop, kill), the replacement queue within `max_surge`, rollback
//! to the last good generation, stopping, and retiring unused generations.

use std::collections::BTreeSet;
use std::time::Instant;

use tracing::{debug, error, info, warn};

use super::{
    round, Action, Phase, Reason, Replacement, Request, Rollout, Scale, ServiceState, SlotInfo,
    Spec, Supervisor,
};
use crate::ids::{Generation, Pid, ReplyTo, Slot, WorkerId};

impl Supervisor {
    pub(super) fn on_request(
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
                // The same config as the rollout under way: superseding it
                // would restart workers that already start after it; one more
                // rollout once it ends makes every worker start after this
                // request (a new deploy's code), and folds a storm of reloads.
                if let Some(r) = &self.rollout {
                    if !r.rollback && self.specs.get(&r.generation) == Some(&*spec) {
                        let generation = r.generation;
                        let (_, waiters) = self.deferred.get_or_insert_with(|| (*spec, Vec::new()));
                        waiters.extend(reply);
                        info!(%generation, "a rollout of the same config is under way (generation {generation}); one more follows it");
                        return;
                    }
                }
                // A different config supersedes the rollout under way; who
                // waited for a repeat of that one gets this one.
                let mut waiters: Vec<ReplyTo> = reply.into_iter().collect();
                if let Some((_, w)) = self.deferred.take() {
                    waiters.extend(w);
                }
                self.start_rollout(*spec, waiters, now, out);
            }
            Request::Scale(scale) => self.on_scale(scale, reply, now, out),
            Request::ReplaceSlot(slot) => self.on_replace_slot(slot, reply, out),
            Request::Upgrade { binary } => self.on_upgrade(binary, reply, now, out),
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
                if self.phase == Phase::Exited {
                    return Self::reply(out, reply, Ok("stopped".into()));
                }
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
                let deferred = self.deferred.take().map(|(_, w)| w);
                let waiters = self.rollout.take().map(|r| r.waiters);
                let manual = std::mem::take(&mut self.manual).into_values();
                for to in waiters.into_iter().chain(deferred).chain(manual).flatten() {
                    out.push(Action::Reply {
                        to,
                        outcome: Err("holdfast is stopping".into()),
                    });
                }
                if let Some(u) = self.upgrade.take() {
                    // Not exec'd yet: the edge sees it is off and drops it.
                    info!("upgrade of holdfast cancelled: holdfast is stopping");
                    for to in u.waiters {
                        out.push(Action::Reply {
                            to,
                            outcome: Err("holdfast is stopping; upgrade cancelled".into()),
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
        }
    }

    /// `restart --slot N`: the slot's ready worker is replaced
    /// start-before-stop like any replacement (same queue, same surge
    /// budget), with its own generation; the answer comes when the new
    /// worker is ready. A replacement of that worker already under way or
    /// queued (a rollout's, memory's) is joined rather than doubled.
    fn on_replace_slot(&mut self, slot: Slot, reply: Option<ReplyTo>, out: &mut Vec<Action>) {
        let refused = if self.is_stopping() {
            Err("holdfast is stopping".to_string())
        } else if slot.0 >= self.wanted {
            Err(format!(
                "slot {slot} does not exist: holdfast runs {} worker(s), slots 0 to {}",
                self.wanted,
                self.wanted.saturating_sub(1)
            ))
        } else {
            self.active_in(slot)
                .into_iter()
                .filter_map(|id| self.workers.get(&id))
                .find(|w| w.state.is_ready())
                .map(|w| w.id)
                .ok_or_else(|| {
                    format!("slot {slot} has no ready worker to replace (it is starting or waiting to restart)")
                })
        };
        let old = match refused {
            Ok(id) => id,
            Err(why) => {
                warn!(%slot, "replacement refused: {why}");
                return Self::reply(out, reply, Err(why));
            }
        };
        let joined = self.inflight.iter().any(|r| r.old == old)
            || self.queue.iter().any(|(s, reason, marked)| {
                *s == slot
                    && (*marked == Some(old)
                        || (marked.is_none()
                            && matches!(reason, Reason::Rollout | Reason::Rollback)))
            });
        if !joined {
            let pid = self
                .workers
                .get(&old)
                .and_then(|w| w.pid)
                .map_or(0, |p| p.0);
            info!(%slot, pid, "worker {slot} (pid {pid}) replacement requested: replacing");
            self.queue.push_back((slot, Reason::Manual, Some(old)));
        } else {
            debug!(%slot, "replacement requested for a worker already being replaced: joined");
        }
        self.manual.entry(old).or_default().extend(reply);
    }

    /// `restart --slot` waiters whose worker went away without a replacement
    /// (it crashed, was scaled away): answered with why.
    pub(super) fn answer_lost_manual(&mut self, out: &mut Vec<Action>) {
        let lost: Vec<WorkerId> = self
            .manual
            .keys()
            .filter(|id| {
                let alive = self.workers.get(id).is_some_and(|w| w.state.is_active());
                let replacing = self.inflight.iter().any(|r| r.old == **id);
                !alive && !replacing
            })
            .copied()
            .collect();
        for id in lost {
            let which = match self.gone.iter().find(|g| g.0 == id) {
                Some((_, slot, pid)) => format!("the worker of slot {slot} (pid {pid})"),
                None => "the worker".to_string(),
            };
            for to in self.manual.remove(&id).unwrap_or_default() {
                out.push(Action::Reply {
                    to,
                    outcome: Err(format!(
                        "{which} stopped before its replacement was ready (it exited, or its slot was scaled away); a crashed slot restarts on its own"
                    )),
                });
            }
        }
    }

    pub(super) fn start_rollout(
        &mut self,
        spec: Spec,
        waiters: Vec<ReplyTo>,
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
            waiters,
        });
        self.scale(workers, now, out);
        self.queue_rollout(Reason::Rollout);
    }

    pub(super) fn on_scale(
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

    pub(super) fn scale(&mut self, workers: u32, now: Instant, out: &mut Vec<Action>) {
        let old = self.wanted;
        if workers == old {
            return;
        }
        info!(from = old, to = workers, "scaling");
        self.wanted = workers;
        self.workers.set_slots(workers);
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
            .in_slots_from(Slot(workers))
            .map(|w| w.id)
            .collect();
        for id in gone {
            self.drain(id, now, false, out);
        }
    }

    pub(super) fn queue_rollout(&mut self, reason: Reason) {
        self.queue
            .retain(|(_, r, _)| !matches!(r, Reason::Rollout | Reason::Rollback));
        for s in 0..self.slots.len() as u32 {
            self.queue.push_back((Slot(s), reason, None));
        }
    }

    pub(super) fn on_reload_rejected(
        &mut self,
        error: String,
        reply: Option<ReplyTo>,
        out: &mut Vec<Action>,
    ) {
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

    pub(super) fn fail_rollout(
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

    /// The one place that starts work: fill empty slots, take replacements from
    /// the queue within the surge budget, and notice finished rollouts.
    pub(super) fn advance(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Stopping { .. } => return self.finish_stop(now, out),
            Phase::Exited => return,
            Phase::Starting | Phase::Running => {}
        }
        let target = self.target();
        // Empty slots: first start, crash restart, scale-up, stop-first
        // replacement aftermath (kept as a set: no walk of every slot).
        let empty: Vec<Slot> = self.workers.empty_slots().collect();
        for slot in empty {
            if self.inflight.iter().any(|r| r.slot == slot) {
                continue;
            }
            let Some(info) = self.slots.get_mut(slot.0 as usize) else {
                continue;
            };
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
                Reason::Memory | Reason::Age | Reason::Manual
                    if old_gen == self.stable || old_gen == target =>
                {
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
        if self.phase == Phase::Starting && self.workers.all_slots_ready() {
            info!(workers = self.slots.len(), generation = %self.stable, "all workers ready");
            self.phase = Phase::Running;
        }
        // A reload of the same config waited for the rollout that just ended.
        if self.rollout.is_none() {
            if let Some((spec, waiters)) = self.deferred.take() {
                info!("the rollout under way ended; starting the one asked for meanwhile");
                self.start_rollout(spec, waiters, now, out);
                self.advance(now, out);
            }
        }
    }

    /// Stopping: exit once every worker and every descendant is gone.
    pub(super) fn finish_stop(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.workers.is_empty() || !self.listed_since_exit || !self.strays_settled(now) {
            return;
        }
        if !matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        let Phase::Stopping { waiters } = std::mem::replace(&mut self.phase, Phase::Exited) else {
            return;
        };
        info!("every worker has exited");
        for to in waiters {
            out.push(Action::Reply {
                to,
                outcome: Ok("stopped".into()),
            });
        }
        out.push(Action::Exit { code: 0 });
    }

    pub(super) fn check_rollout_done(&mut self, now: Instant, out: &mut Vec<Action>) {
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
        // The walk of every slot only once nothing of the rollout is pending.
        if pending || self.workers.ready_in_generation(generation) < self.slots.len() {
            return;
        }
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
    pub(super) fn retire(&mut self, out: &mut Vec<Action>) {
        let mut keep: BTreeSet<Generation> = self.workers.generations().collect();
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
}
