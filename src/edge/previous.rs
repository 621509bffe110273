//! The workers the previous holdfast of this unit left running.
//!
//! Under systemd with `KillMode=process`, a crashed or watchdog-killed
//! holdfast's workers are not killed: they drain on their parent-death
//! signal (their drain signal) while systemd starts a new holdfast, which
//! takes the same sockets from the fd store. Their `worker-N` cgroups tell
//! the new holdfast they are there; it waits for them and ends them.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// The workers an earlier holdfast of the same unit left in their cgroups
/// (see `os::proc::Cgroups::previous_workers`): with `KillMode=process`,
/// systemd restarts a crashed holdfast without killing them, and they drain
/// on their parent-death signal while the new holdfast takes over the
/// sockets from the fd store. systemd will not end them later either (not
/// even at a stop), so holdfast does: each second it removes the cgroups
/// that emptied, at `kill_at` (start + drain_timeout) it kills the rest
/// through `cgroup.kill`, and it exits only once they are gone.
pub(super) struct Previous {
    pub(super) cgroups: Vec<crate::os::proc::WorkerCgroup>,
    pub(super) kill_at: Instant,
    killed: bool,
}

/// [`Previous`] as an in-place upgrade hands it over.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct PreviousRecord {
    cgroups: Vec<crate::os::proc::cgroup::CgroupRecord>,
    kill_at: crate::core::At,
    killed: bool,
}

/// How long an exiting holdfast waits for the previous holdfast's workers
/// after killing them (a process in uninterruptible sleep): then it exits anyway.
pub(super) const PREVIOUS_ABANDON_AFTER: Duration = Duration::from_secs(5);

impl Previous {
    /// `inherited`: serials of workers that are not left over but taken on
    /// (an upgrade's fallback inherits the previous image's workers).
    pub(super) fn find(
        cgroups: Option<&crate::os::proc::Cgroups>,
        drain_timeout: Duration,
        inherited: &[u64],
    ) -> Previous {
        let mut found = cgroups.map(|c| c.previous_workers()).unwrap_or_default();
        found.retain(|c| !inherited.contains(&c.serial()));
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

    /// What an in-place upgrade hands over: the cgroups still waited for,
    /// and the deadline (relative to `now`).
    pub(super) fn record(&self, now: Instant) -> PreviousRecord {
        PreviousRecord {
            cgroups: self.cgroups.iter().map(|c| c.record()).collect(),
            kill_at: crate::core::At::of(self.kill_at, now),
            killed: self.killed,
        }
    }

    /// What the image before an upgrade was still waiting for.
    pub(super) fn adopt(r: PreviousRecord, now: Instant) -> Previous {
        Previous {
            cgroups: r
                .cgroups
                .into_iter()
                .map(crate::os::proc::WorkerCgroup::adopt)
                .collect(),
            kill_at: r.kill_at.at(now),
            killed: r.killed,
        }
    }

    /// The first worker id after theirs.
    pub(super) fn next_serial(&self) -> Option<u64> {
        self.cgroups.iter().map(|c| c.serial() + 1).max()
    }

    /// Removes the cgroups that emptied; past `kill_at`, kills the rest.
    pub(super) fn check(&mut self, now: Instant) {
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
