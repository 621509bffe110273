//! What the supervisor decides: the [`Action`]s the edge carries out.
//! Actions are commands; a failed one comes back as an event.

use nix::sys::signal::Signal;

use crate::config::Metric;
use crate::ids::{Generation, Pid, ReplyTo, Slot, WorkerId};

/// One worker to read in a sampling round, with the metric its generation's
/// limit is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleTarget {
    pub id: WorkerId,
    pub pid: Pid,
    pub metric: Metric,
}

/// What holdfast tells its service manager (sd_notify(3)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ServiceState {
    /// Not every slot was ready yet: no READY=1 so far.
    Starting,
    Ready,
    /// A rollout is under way (RELOADING=1; READY=1 ends it).
    Reloading,
    Stopping,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Spawn {
        id: WorkerId,
        slot: Slot,
        generation: Generation,
    },
    /// Send its generation's drain signal to the worker's process group,
    /// then SIGCONT: a stopped (SIGSTOPped, hung) worker must get to handle
    /// it, or it would only die at the drain deadline with its requests.
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
    /// SIGTERM, then SIGCONT, to an adopted descendant holdfast has not
    /// reaped: it is told to go, even if it is stopped.
    Terminate {
        pid: Pid,
    },
    /// `signal` to one process that holdfast has not reaped: a worker's own
    /// process (the log reopen signal) or an adopted descendant (SIGKILL).
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
    /// Upgrade holdfast in place: check `binary` (the start binary when
    /// `None`), quiesce, hand the state over and exec it in this pid. The
    /// outcome comes back as [`super::Event::UpgradeFailed`] from this image,
    /// or as [`super::Event::Upgraded`] from the new one.
    Upgrade {
        binary: Option<std::path::PathBuf>,
    },
}
