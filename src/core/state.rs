//! The supervisor's state: workers and where each is in its life, slots,
//! replacements under way, rollouts, counters and settings.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use nix::sys::signal::Signal;

use super::MemoryState;
use crate::ids::{Generation, Pid, ReplyTo, Slot, WorkerId};

/// Why a worker is being replaced.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Reason {
    Rollout,
    Rollback,
    Memory,
    Age,
    Crash,
    /// Ready, but its tree stopped holding the listeners it must serve.
    NotServing,
    /// Asked for: `holdfast restart --slot N`.
    Manual,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Rollout => "rollout",
            Reason::Rollback => "rollback",
            Reason::Memory => "memory",
            Reason::Age => "age",
            Reason::Crash => "crash",
            Reason::NotServing => "not-serving",
            Reason::Manual => "manual",
        })
    }
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
    pub(super) fn is_active(&self) -> bool {
        matches!(
            self,
            WorkerState::Spawning
                | WorkerState::Starting { .. }
                | WorkerState::Checking { .. }
                | WorkerState::Ready { .. }
        )
    }
    pub(super) fn is_ready(&self) -> bool {
        matches!(self, WorkerState::Ready { .. })
    }
    /// Not yet proven ready (a failure of it is a failed start).
    pub(super) fn is_starting(&self) -> bool {
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
    /// Ready, but the last checks in a row found its tree without the
    /// listeners it must hold.
    pub not_serving: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct SlotInfo {
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
    pub(super) fn new(generation: Generation) -> SlotInfo {
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
pub(super) struct Replacement {
    pub(super) slot: Slot,
    pub(super) reason: Reason,
    pub(super) old: WorkerId,
    pub(super) new: Option<WorkerId>,
}

#[derive(Debug, Clone)]
pub(crate) struct Rollout {
    pub generation: Generation,
    pub rollback: bool,
    pub started: Instant,
    /// The worker count to return to if this rollout fails.
    pub(super) workers_before: u32,
    pub(super) waiters: Vec<ReplyTo>,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Counters {
    pub replacements: BTreeMap<Reason, u64>,
    pub failed_rollouts: u64,
    pub drain_kills: u64,
    /// Bloated children sent `child_signal` (`[memory]` scope = "process").
    pub child_signals: u64,
    /// Descendants that outlived their worker (or had none) and were stopped.
    pub strays_stopped: u64,
    /// In-place upgrades of holdfast itself that were adopted by the new image.
    #[serde(default)]
    pub upgrades: u64,
    /// Upgrades that failed before the exec; the old image kept running.
    #[serde(default)]
    pub failed_upgrades: u64,
}

/// An in-place upgrade of holdfast under way: the edge checks the new binary,
/// quiesces and execs it; the new image reports [`super::Event::Upgraded`],
/// or the old one [`super::Event::UpgradeFailed`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Upgrade {
    pub started: Instant,
    /// Who waits for the outcome (`upgrade --wait`).
    pub waiters: Vec<ReplyTo>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Phase {
    Starting,
    Running,
    Stopping {
        waiters: Vec<ReplyTo>,
    },
    /// `Exit` was decided; nothing more happens.
    Exited,
}

/// Settings of the supervisor itself (not of a generation).
#[derive(Debug, Clone, Default)]
pub(crate) struct Settings {
    /// Random input for the lifetime jitter, drawn by the edge once.
    pub seed: u64,
    /// `[logs] reopen_signal`: sent to workers when the logs are reopened.
    pub reopen_signal: Option<Signal>,
    /// holdfast is PID 1 of its pid namespace (a container's init): every
    /// orphan of the namespace is re-parented to it, not only its workers'
    /// descendants (see `strays.rs`).
    pub init: bool,
}
