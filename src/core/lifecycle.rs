//! A worker's life, as the supervisor decides it: spawn, start, the
//! readiness claim and the socket check, ready, drain, kill, exit, crash
//! backoff, and the deadlines that end each state.

use std::time::Instant;

use tracing::{debug, error, info, warn};

use super::{
    later, round, rules, Action, ExitReason, MemoryState, ReadyVia, Reason, Replacement,
    Supervisor, Worker, WorkerState, BACKOFF_RESET, BACKOFF_START,
};
use crate::config::ReadyMode;
use crate::ids::{Generation, Pid, Slot, WorkerId};

impl Supervisor {
    pub(super) fn spawn(
        &mut self,
        slot: Slot,
        generation: Generation,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> WorkerId {
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        self.workers.insert(
            Worker {
                id,
                slot,
                generation,
                pid: None,
                state: WorkerState::Spawning,
                started: now,
                status: None,
                memory: MemoryState::default(),
                not_serving: 0,
            },
            rules!(self),
        );
        out.push(Action::Spawn {
            id,
            slot,
            generation,
        });
        id
    }

    /// Sends the worker's generation's drain signal; SIGKILL follows at the deadline.
    pub(super) fn drain(
        &mut self,
        id: WorkerId,
        now: Instant,
        stopping: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (signal, timeout) = {
            let spec = self.spec_of(w);
            (spec.drain_signal(), spec.drain_timeout())
        };
        let kill_at = later(now, timeout);
        match (w.pid, w.state.clone()) {
            (_, WorkerState::Killed) => {}
            (_, WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at })
                if stopping =>
            {
                self.workers.update(&id, rules!(self), |w| {
                    w.state = WorkerState::Stopping { kill_at }
                });
            }
            (_, WorkerState::Draining { .. } | WorkerState::Stopping { .. }) => {}
            (Some(pid), _) => {
                info!(slot = %w.slot, %pid, generation = %w.generation, %signal, "draining worker");
                self.workers.update(&id, rules!(self), |w| {
                    w.state = if stopping {
                        WorkerState::Stopping { kill_at }
                    } else {
                        WorkerState::Draining { kill_at }
                    }
                });
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
    pub(super) fn kill(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        match w.pid {
            Some(pid) if w.state != WorkerState::Killed => {
                self.workers
                    .update(&id, rules!(self), |w| w.state = WorkerState::Killed);
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

    pub(super) fn on_spawned(
        &mut self,
        id: WorkerId,
        pid: Pid,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.get(&id) else {
            // Given up on before its fork came back (a failed rollout drained
            // it while it had no pid): it has served nothing yet.
            warn!(%pid, worker = %id, "a worker was forked after holdfast gave up on it; killing it");
            out.push(Action::Kill { id, pid });
            return;
        };
        let ready_by = later(now, self.spec_of(w).ready_timeout());
        self.workers.update(&id, rules!(self), |w| {
            w.pid = Some(pid);
            w.started = now;
            w.state = WorkerState::Starting { ready_by };
            info!(slot = %w.slot, %pid, generation = %w.generation, "worker spawned");
        });
    }

    pub(super) fn on_spawn_failed(
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
    pub(super) fn worker_failed(
        &mut self,
        w: Worker,
        why: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if let Some(pos) = self.inflight.iter().position(|r| r.new == Some(w.id)) {
            let r = self.inflight.remove(pos);
            let old_pid = self.workers.get(&r.old).and_then(|o| o.pid);
            for to in self.manual.remove(&r.old).unwrap_or_default() {
                let keeps = match old_pid {
                    Some(p) => format!("; the old worker (pid {p}) keeps serving"),
                    None => String::new(),
                };
                out.push(Action::Reply {
                    to,
                    outcome: Err(format!(
                        "slot {}: the new worker (generation {}) failed: {why}{keeps}",
                        w.slot, w.generation
                    )),
                });
            }
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
                    self.workers.update(&r.old, rules!(self), |old| {
                        old.memory.replacement_failed(later(now, retry))
                    });
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

    pub(super) fn crashed(&mut self, slot: Slot, why: String, now: Instant, was_up_long: bool) {
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
    pub(super) fn on_ready_claim(
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
        self.workers.update(&id, rules!(self), |w| {
            w.state = WorkerState::Checking { ready_by }
        });
        out.push(Action::CheckSockets {
            id,
            pid,
            generation,
        });
    }

    pub(super) fn on_sockets_checked(
        &mut self,
        id: WorkerId,
        missing: Vec<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if w.state.is_ready() {
            return self.recheck_answered(id, missing);
        }
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

    pub(super) fn become_ready(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let Some(pid) = w.pid else { return };
        let (slot, generation) = (w.slot, w.generation);
        info!(%slot, %pid, %generation, took = ?now.saturating_duration_since(w.started), "worker ready");
        self.workers.update(&id, rules!(self), |w| {
            w.state = WorkerState::Ready { since: now }
        });
        if let Some(info) = self.slots.get_mut(slot.0 as usize) {
            info.generation = generation;
        }
        // Start-before-stop: the new one is ready, so the old one may drain.
        if let Some(r) = self.inflight.iter().find(|r| r.new == Some(id)) {
            let old = r.old;
            let old_pid = self.workers.get(&old).and_then(|o| o.pid);
            for to in self.manual.remove(&old).unwrap_or_default() {
                let from = old_pid.map_or(String::new(), |p| format!("pid {p} → "));
                out.push(Action::Reply {
                    to,
                    outcome: Ok(format!(
                        "slot {slot} replaced: {from}pid {pid} (generation {generation}) is ready"
                    )),
                });
            }
            if self.workers.get(&old).is_some_and(|w| w.state.is_active()) {
                self.drain(old, now, false, out);
            } else {
                // max_surge = 0 drained the old one first: this replacement is done.
                self.inflight.retain(|r| r.new != Some(id));
            }
        }
    }

    pub(super) fn on_exit(
        &mut self,
        pid: Pid,
        reason: ExitReason,
        output: Vec<String>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
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
                let why = with_output(format!("exited before ready ({reason})"), &output);
                self.worker_failed(w, why, now, out);
            }
        }
        self.released_if_done(id, out);
    }

    /// Queues a start-before-stop replacement of ready worker `id` for
    /// `reason`, unless it is already queued or being replaced. Returns
    /// whether it was queued.
    pub(super) fn queue_replacement(
        &mut self,
        id: WorkerId,
        reason: Reason,
        detail: String,
    ) -> bool {
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

    /// The workers whose deadline passed (from the ordered deadlines, not
    /// a walk of every worker): ready delays, ready timeouts, drain timeouts.
    pub(super) fn expire(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut timed_out = Vec::new();
        let mut ready = Vec::new();
        let mut kill = Vec::new();
        let due = self.workers.due(now);
        for w in due.iter().filter_map(|id| self.workers.get(id)) {
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

    /// A ready worker's periodic socket check came back: after
    /// [`NOT_SERVING_AFTER`] checks in a row without its listeners it is
    /// replaced, start-before-stop (the others serve the queue meanwhile).
    fn recheck_answered(&mut self, id: WorkerId, missing: Vec<String>) {
        let Some(w) = self.workers.get_mut_unindexed(&id) else {
            return;
        };
        if missing.is_empty() {
            if w.not_serving > 0 {
                info!(slot = %w.slot, pid = w.pid.map_or(0, |p| p.0), "worker {} holds its listeners again", w.slot);
            }
            w.not_serving = 0;
            return;
        }
        w.not_serving = w.not_serving.saturating_add(1);
        let (slot, pid, n) = (w.slot, w.pid.map_or(0, |p| p.0), w.not_serving);
        let held = missing.join(", ");
        if n < super::NOT_SERVING_AFTER {
            warn!(%slot, pid, missing = ?missing, "worker {slot} (pid {pid}) is ready but no process of its tree holds {held} any more ({n} of {} checks)", super::NOT_SERVING_AFTER);
            return;
        }
        if n == super::NOT_SERVING_AFTER {
            error!(%slot, pid, missing = ?missing, "worker {slot} (pid {pid}) stopped holding {held}: it serves no new connection there (its accept loop died, or it closed them); replacing it");
            self.queue_replacement(
                id,
                super::Reason::NotServing,
                format!("holds {held} no more"),
            );
        }
    }
}

/// How many of a worker's last lines a failure message quotes at most
/// (the tail itself is bounded too: `crate::logs::Tail`).
const OUTPUT_LINES: usize = 10;

/// `why`, followed by the worker's last lines of output (if any) and, when
/// they show a server refusing to start over another copy's pid file, what
/// to do about it.
pub(super) fn with_output(why: String, output: &[String]) -> String {
    let lines: Vec<&String> = output
        .iter()
        .skip(output.len().saturating_sub(OUTPUT_LINES))
        .collect();
    if lines.is_empty() {
        return why;
    }
    let mut s = format!("{why}; its last output lines:");
    for l in &lines {
        s.push_str("\n  | ");
        s.push_str(l);
    }
    if let Some(hint) = pid_file_hint(output) {
        s.push('\n');
        s.push_str(hint);
    }
    s
}

/// Unicorn ("Already running on PID:1234 (or pid=... is stale)") and
/// Gunicorn ("Already running on PID 1234 (or pid file '...' is stale)")
/// refuse to start when their pid file names a live process: with a pid
/// file in the server's config, every slot after the first finds the first
/// slot's.
fn pid_file_hint(output: &[String]) -> Option<&'static str> {
    let found = output.iter().any(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("already running") && l.contains("pid")
    });
    found.then_some(
        "hint: the server found a pid file written by another copy of it. Every slot runs the same command, so a fixed pid file is taken by the first slot (and by the old worker during a rollout): remove the pid file from the server's config (holdfast tracks the pids), or give each worker its own with HOLDFAST_WORKER_SERIAL in its path (unique per worker; HOLDFAST_WORKER_ID is shared by a slot's old and new worker during a replacement) (README, \"Pid files\")",
    )
}
