//! What happens to the supervisor: the [`Event`]s the edge feeds it, the
//! [`Request`]s from outside, and the facts they carry (exits, memory
//! samples). Events name what happened; they decide nothing.

use std::fmt;
use std::path::PathBuf;

use nix::sys::signal::Signal;

use super::{AdoptedProc, Spec};
use crate::config::Metric;
use crate::ids::{Pid, ReplyTo, Slot, WorkerId};

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
    /// Replace the ready worker of this slot, start-before-stop, with its
    /// own generation (`holdfast restart --slot N`); answered once the new
    /// worker is ready, or with why it failed.
    ReplaceSlot(Slot),
    /// Replace holdfast's own image in place (SIGUSR2, `holdfast upgrade`):
    /// `binary`, or the one holdfast was started from. Workers are not touched.
    Upgrade {
        binary: Option<PathBuf>,
    },
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
    /// `output`: a worker's last lines of stdout and stderr (bounded, see
    /// `crate::logs::Tail`), read once its pipes were drained when the
    /// supervisor asked for them ([`Supervisor::exit_would_fail`]); empty
    /// otherwise.
    ///
    /// [`Supervisor::exit_would_fail`]: super::Supervisor::exit_would_fail
    Exited {
        pid: Pid,
        reason: ExitReason,
        output: Vec<String>,
    },
    /// Every process holdfast adopted as subreaper that is no worker's own
    /// process, as found now (a full listing, not a change).
    Adopted {
        procs: Vec<AdoptedProc>,
    },
    /// One memory sampling round (see `crate::os::proc::memory`): facts, no decisions.
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
    /// The upgrade could not be carried out (the new binary failed its
    /// checks, or the exec failed): the old image runs on, nothing changed.
    UpgradeFailed {
        error: String,
    },
    /// This image was exec'd by an upgrade and has adopted the state
    /// ([`super::Supervisor::restore`]); `message` is the waiters' answer.
    Upgraded {
        message: String,
    },
}

/// One process's memory, in bytes. `pss` and `uss` are read only when the
/// metric needs them (they cost a walk of the page tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Usage {
    /// Resident pages, shared ones counted in full.
    pub rss: u64,
    /// Proportional set size: each shared page divided by the number of processes mapping it.
    pub pss: Option<u64>,
    /// Unique set size: private pages only (`Private_Clean + Private_Dirty`).
    pub uss: Option<u64>,
}

impl Usage {
    /// The figure for `metric`, if it was read.
    pub fn get(&self, metric: Metric) -> Option<u64> {
        match metric {
            Metric::Rss => Some(self.rss),
            Metric::Pss => self.pss,
            Metric::Uss => self.uss,
        }
    }
}

/// One process of a worker's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSample {
    pub pid: Pid,
    pub usage: Usage,
}

/// One worker's process tree in one round: the worker's own process first,
/// then its descendants (breadth first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSample {
    pub id: WorkerId,
    pub pid: Pid,
    pub processes: Vec<ProcessSample>,
}

impl TreeSample {
    /// `metric` summed over the tree.
    pub fn total(&self, metric: Metric) -> u64 {
        self.processes
            .iter()
            .filter_map(|p| p.usage.get(metric))
            .sum()
    }

    /// The worker's own process (absent when it vanished during the round).
    pub fn root(&self) -> Option<&ProcessSample> {
        self.processes.first().filter(|p| p.pid == self.pid)
    }

    /// Every process but the worker's own.
    pub fn descendants(&self) -> &[ProcessSample] {
        match self.root() {
            Some(_) => &self.processes[1..],
            None => &self.processes,
        }
    }
}
