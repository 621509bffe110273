//! Descendants that left their worker's process group.
//!
//! A worker's child that calls `setsid()` (a daemonised helper, a double
//! fork) is out of reach of a signal to the worker's group, and when its
//! parent exits it is re-parented to holdfast, the subreaper. The edge lists
//! such processes ([`Event::Adopted`](super::Event::Adopted)) with the worker
//! they came from when it can tell (the worker's serial in their environment
//! or cgroup, or their process group); everything decided about them is here:
//!
//! - while its worker runs, a descendant is the worker's business (a helper
//!   the app wants): it is counted, not touched;
//! - when its worker is SIGKILLed at its drain deadline, so is it;
//! - when its worker's own process has exited (drained or crashed), or it
//!   belongs to no live worker, it gets SIGTERM, and SIGKILL after the
//!   worker generation's `drain_timeout`;
//! - a stop ends only once every one of them is gone, so nothing outlives
//!   holdfast holding its sockets.
//!
//! **As PID 1** of a pid namespace (a container without an init), every
//! orphan of the namespace is re-parented to holdfast, not only its
//! workers' descendants: the orphans of a `docker exec` or `kubectl exec`
//! session, of a health-check script, of a cron-like sidecar process. Those
//! are not holdfast's to stop: it reaps them when they exit (so no zombie
//! piles up, which is all tini does) and leaves them alone, logged once.
//! An orphan that names no worker but holds one of holdfast's listening
//! sockets is a worker's descendant that lost its trace (it cleared its
//! environment and left the group): it keeps the port busy after holdfast
//! is gone, so it is stopped like any stray. When holdfast exits, the
//! kernel kills what is left of the namespace, as for any PID 1. Outside a
//! namespace of its own, only holdfast's own descendants can be re-parented
//! to it (it is their subreaper), so an orphan that names no worker is
//! still a worker's and is stopped.
//!
//! Signalling them by pid is safe: they are holdfast's own children, and a
//! pid is not reused before its parent reaps it.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use super::{later, Action, ExitReason, Supervisor, Worker, WorkerState};
use crate::ids::{Pid, WorkerId};

/// How long a stop waits for a descendant after SIGKILL before giving up on
/// it (a process in uninterruptible sleep): holdfast then exits anyway.
pub(crate) const ABANDON_AFTER: Duration = Duration::from_secs(5);

/// A process holdfast adopted as subreaper, as the edge found it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdoptedProc {
    pub pid: Pid,
    pub pgid: Pid,
    /// The worker its environment or cgroup names, if any.
    pub worker: Option<WorkerId>,
    /// Its command name (`/proc/PID/comm`), for messages.
    pub comm: String,
    /// It holds one of holdfast's listening sockets (looked at only for a
    /// process that names no worker, when holdfast is PID 1).
    pub holds_listener: bool,
}

/// A worker's descendant outside its process group, now holdfast's child.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stray {
    pub pid: Pid,
    /// The worker it descends from, when known (it may be gone).
    pub worker: Option<WorkerId>,
    pub comm: String,
    pub since: Instant,
    /// SIGTERM was sent: SIGKILL at this time.
    pub kill_at: Option<Instant>,
    /// When SIGKILL was sent.
    pub killed_at: Option<Instant>,
}

impl Supervisor {
    /// A fresh listing of adopted processes: remember the new ones and act
    /// on those whose worker is gone or going; forget those not listed.
    pub(super) fn on_adopted(
        &mut self,
        procs: Vec<super::AdoptedProc>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.listed_since_exit = true;
        let listed: std::collections::BTreeSet<Pid> = procs.iter().map(|p| p.pid).collect();
        let vanished: Vec<Pid> = self
            .strays
            .keys()
            .filter(|p| !listed.contains(p))
            .copied()
            .collect();
        for pid in vanished {
            if let Some(s) = self.strays.remove(&pid) {
                debug!(%pid, comm = %s.comm, "adopted process gone");
                if let Some(id) = s.worker {
                    self.released_if_done(id, out);
                }
            }
        }
        self.foreign.retain(|p| listed.contains(p));
        for p in procs {
            if self.strays.contains_key(&p.pid)
                || self.foreign.contains(&p.pid)
                || self.worker_by_pid(p.pid).is_some()
            {
                continue;
            }
            let owner = p.worker.or_else(|| {
                self.workers
                    .values()
                    .find(|w| w.pid == Some(p.pgid))
                    .map(|w| w.id)
                    .or_else(|| {
                        self.gone
                            .iter()
                            .find(|(_, _, pid)| *pid == p.pgid)
                            .map(|(id, _, _)| *id)
                    })
            });
            if owner.is_none() && self.settings.init && !p.holds_listener {
                info!(pid = %p.pid, comm = %p.comm, "process {} ({}) was re-parented to holdfast as PID 1 but is no worker's descendant (e.g. left by an exec into the container): it is reaped when it exits, not stopped", p.pid, p.comm);
                self.foreign.insert(p.pid);
                continue;
            }
            let mut stray = Stray {
                pid: p.pid,
                worker: owner,
                comm: p.comm,
                since: now,
                kill_at: None,
                killed_at: None,
            };
            let live = owner.and_then(|id| self.workers.get(&id));
            match live.map(|w| (w.slot, w.pid, w.state.clone())) {
                Some((slot, Some(wpid), WorkerState::Killed)) => {
                    info!(%slot, worker_pid = %wpid, pid = %p.pid, comm = %stray.comm, "descendant of a killed worker, outside its process group: SIGKILL");
                    self.kill_stray(&mut stray, now, out);
                }
                Some((slot, Some(wpid), _)) => {
                    info!(%slot, worker_pid = %wpid, pid = %p.pid, comm = %stray.comm, "worker {slot} (pid {wpid}) has a descendant outside its process group: pid {} ({}), e.g. a daemonised helper; it is stopped with its worker", p.pid, stray.comm);
                }
                _ => {
                    let timeout = self.current_spec().drain_timeout();
                    let whose = match owner.and_then(|id| self.gone.iter().find(|g| g.0 == id)) {
                        Some((_, slot, wpid)) => {
                            format!("a descendant of worker {slot} (pid {wpid}), outlived it")
                        }
                        None => "belongs to no live worker of holdfast".to_string(),
                    };
                    warn!(pid = %p.pid, comm = %stray.comm, "process {} ({}) {whose}: SIGTERM now, SIGKILL in {}", p.pid, stray.comm, humantime::format_duration(timeout));
                    self.term_stray(&mut stray, timeout, now, out);
                }
            }
            self.strays.insert(stray.pid, stray);
        }
    }

    fn term_stray(
        &mut self,
        s: &mut Stray,
        timeout: Duration,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if s.kill_at.is_some() || s.killed_at.is_some() {
            return;
        }
        self.counters.strays_stopped += 1;
        s.kill_at = Some(later(now, timeout));
        out.push(Action::Terminate { pid: s.pid });
    }

    fn kill_stray(&mut self, s: &mut Stray, now: Instant, out: &mut Vec<Action>) {
        if s.killed_at.is_some() {
            return;
        }
        if s.kill_at.is_none() {
            self.counters.strays_stopped += 1;
        }
        s.killed_at = Some(now);
        out.push(Action::Signal {
            pid: s.pid,
            signal: Signal::SIGKILL,
        });
    }

    /// Worker `w`'s own process exited: its descendants outside its group
    /// get SIGTERM, and SIGKILL after its generation's drain_timeout.
    pub(super) fn orphan_strays_of(&mut self, w: &Worker, now: Instant, out: &mut Vec<Action>) {
        let timeout = self.spec_of(w).drain_timeout();
        let pids: Vec<Pid> = self
            .strays
            .values()
            .filter(|s| s.worker == Some(w.id))
            .map(|s| s.pid)
            .collect();
        for pid in pids {
            let Some(mut s) = self.strays.remove(&pid) else {
                continue;
            };
            if s.kill_at.is_none() && s.killed_at.is_none() {
                warn!(slot = %w.slot, worker_pid = ?w.pid, %pid, comm = %s.comm, "process {pid} ({}), a descendant of worker {} outside its process group, outlived it: SIGTERM now, SIGKILL in {}", s.comm, w.slot, humantime::format_duration(timeout));
            }
            if w.state == WorkerState::Killed {
                self.kill_stray(&mut s, now, out);
            } else {
                self.term_stray(&mut s, timeout, now, out);
            }
            self.strays.insert(pid, s);
        }
    }

    /// SIGKILL to every descendant attributed to worker `id` (its deadline passed).
    pub(super) fn kill_strays_of(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let pids: Vec<Pid> = self
            .strays
            .values()
            .filter(|s| s.worker == Some(id))
            .map(|s| s.pid)
            .collect();
        for pid in pids {
            if let Some(mut s) = self.strays.remove(&pid) {
                self.kill_stray(&mut s, now, out);
                self.strays.insert(pid, s);
            }
        }
    }

    /// SIGKILL to every descendant (a second stop, `Kill`).
    pub(super) fn kill_all_strays(&mut self, now: Instant, out: &mut Vec<Action>) {
        let pids: Vec<Pid> = self.strays.keys().copied().collect();
        for pid in pids {
            if let Some(mut s) = self.strays.remove(&pid) {
                self.kill_stray(&mut s, now, out);
                self.strays.insert(pid, s);
            }
        }
    }

    /// SIGKILL to descendants whose SIGTERM deadline passed.
    pub(super) fn expire_strays(&mut self, now: Instant, out: &mut Vec<Action>) {
        let due: Vec<Pid> = self
            .strays
            .values()
            .filter(|s| s.killed_at.is_none() && s.kill_at.is_some_and(|t| t <= now))
            .map(|s| s.pid)
            .collect();
        for pid in due {
            if let Some(mut s) = self.strays.remove(&pid) {
                error!(%pid, comm = %s.comm, "process {pid} ({}) did not exit after SIGTERM: SIGKILL", s.comm);
                self.kill_stray(&mut s, now, out);
                self.strays.insert(pid, s);
            }
        }
    }

    pub(super) fn stray_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        let stopping = self.is_stopping();
        self.strays.values().filter_map(move |s| match s.killed_at {
            None => s.kill_at,
            Some(t) if stopping => Some(later(t, ABANDON_AFTER)),
            Some(_) => None,
        })
    }

    /// A stop may end: no descendant left, or only ones SIGKILLed long ago.
    pub(super) fn strays_settled(&self, now: Instant) -> bool {
        let stuck: Vec<Pid> = self
            .strays
            .values()
            .filter(|s| !s.killed_at.is_some_and(|t| later(t, ABANDON_AFTER) <= now))
            .map(|s| s.pid)
            .collect();
        if !stuck.is_empty() {
            return false;
        }
        if !self.strays.is_empty() {
            let pids: Vec<i32> = self.strays.keys().map(|p| p.0).collect();
            error!(?pids, "processes still there {ABANDON_AFTER:?} after SIGKILL (uninterruptible sleep?): exiting without them");
        }
        true
    }

    /// A descendant was reaped.
    pub(super) fn stray_exited(&mut self, pid: Pid, reason: ExitReason, out: &mut Vec<Action>) {
        match self.strays.remove(&pid) {
            Some(s) => {
                info!(%pid, comm = %s.comm, %reason, "descendant outside a worker's process group exited");
                if let Some(id) = s.worker {
                    self.released_if_done(id, out);
                }
            }
            None => debug!(%pid, %reason, "reaped a process that is not a worker"),
        }
    }

    /// Worker `id` is gone with every descendant attributed to it.
    pub(super) fn released_if_done(&mut self, id: WorkerId, out: &mut Vec<Action>) {
        if self.workers.contains_key(&id) || self.strays.values().any(|s| s.worker == Some(id)) {
            return;
        }
        out.push(Action::Released { id });
    }
}
