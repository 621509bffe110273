//! The status snapshot: what `holdfast status` and `/metrics` show.
//!
//! It is built in two halves so that the event loop never waits on /proc:
//! [`snapshot`] runs inside the loop and copies only what the supervisor and
//! the listeners already know (pids, states, generations, ages, counters, the
//! TCP accept queues, one `getsockopt` each); [`enrich`] runs on a blocking
//! thread and adds what costs a walk of /proc: open client connections per
//! worker (socket inodes in `/proc/PID/fd` matched against `/proc/net/tcp`,
//! `tcp6` and `unix`), memory from `/proc/PID/smaps_rollup`, the accept
//! queue of unix listeners (NETLINK_SOCK_DIAG, sock_diag(7)) and the kernel's
//! `ListenOverflows` / `ListenDrops` from `/proc/net/netstat`.
//!
//! Every /proc read may fail (a process exits between listing and reading);
//! a figure that cannot be read is `None` and shows as `-`, never as 0.

mod enrich;
mod render;
mod snapshot;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Metric, Scope};

pub use enrich::enrich;
pub use render::render;
pub use snapshot::{snapshot, Sources};

/// Everything `holdfast status` shows, as sent over the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub holdfast: Holdfast,
    pub workers: Vec<WorkerStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// Listen-queue drop counters of holdfast's network namespace (every socket in it); `None` when /proc/net/netstat is unreadable.
    pub kernel: Option<KernelCounters>,
    pub counters: Counters,
    /// What holdfast's own per-event work cost in /proc reads (for tests
    /// and benchmarks that check it does not grow with the worker count).
    #[serde(default)]
    pub cost: Cost,
    /// How memory is measured (from `[memory]`); not part of the protocol.
    #[serde(skip)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holdfast {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: f64,
    /// The config file, if holdfast runs with one.
    pub config: Option<PathBuf>,
    pub control_socket: PathBuf,
    /// The generation crash restarts and new slots run (the last good one).
    pub generation: u64,
    pub workers_wanted: u32,
    pub stopping: bool,
    pub rollout: Option<RolloutStatus>,
    pub last_rollout: Option<LastRollout>,
    /// Why the last reload was refused (bad config, bind failed), until the
    /// next accepted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_rejected: Option<String>,
    /// An in-place upgrade of holdfast is under way.
    #[serde(default)]
    pub upgrading: bool,
    /// Every slot has a ready worker of the current generation and holdfast
    /// is not stopping.
    #[serde(default)]
    pub ready: bool,
    /// Why not, in one line (`holdfast status --ready`, `/readyz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
}

/// holdfast's own /proc reads, in total and on the two paths each worker's
/// start takes: the check that a worker that said READY=1 holds its
/// listeners, and finding the worker of a notify datagram sent by a
/// descendant. Each path's reads per event must not grow with the number of
/// workers or of processes on the machine.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Cost {
    /// Opens of /proc files, directories and links since holdfast started
    /// (this image).
    pub proc_reads: u64,
    /// Socket checks of a READY=1 claim that finished, and their /proc reads.
    pub ready_checks: u64,
    pub ready_check_reads: u64,
    /// Notify datagrams whose sender was not a worker's own pid, and the
    /// /proc reads that found its worker.
    pub notify_lookups: u64,
    pub notify_lookup_reads: u64,
}

/// A rollout under way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutStatus {
    pub generation: u64,
    /// A rollback to the last good generation after a failed rollout.
    pub rollback: bool,
    /// Workers of `generation` that are ready.
    pub ready: u32,
    /// Workers wanted.
    pub total: u32,
    pub elapsed_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LastRollout {
    pub generation: u64,
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerStatus {
    pub slot: u32,
    /// `None` while the spawn is in progress.
    pub pid: Option<i32>,
    pub generation: u64,
    /// starting, ready, draining, stopping or killed.
    pub state: String,
    pub age_secs: f64,
    /// The worker's last `STATUS=` line (sd_notify(3)).
    pub status: Option<String>,
    /// Unexpected exits in this slot.
    pub restarts: u32,
    /// How the slot's previous worker ended.
    pub last_exit: Option<String>,
    /// A slot with no worker (crash backoff): seconds until its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_in_secs: Option<f64>,
    /// Processes of its tree besides its own: its process-group
    /// descendants plus `escaped`; `None` when /proc could not be read.
    #[serde(default)]
    pub descendants: Option<u64>,
    /// Descendants that left its process group (setsid daemons) and were
    /// re-parented to holdfast.
    #[serde(default)]
    pub escaped: u32,
    /// Their pids (for `enrich`).
    #[serde(skip)]
    pub escaped_pids: Vec<i32>,
    /// Client connections the worker's process tree holds open, accepted from
    /// holdfast's listeners; `None` when /proc could not be read.
    pub connections: Option<u64>,
    pub memory: Option<Memory>,
    /// The kernel's view of the worker's own process when it is not simply
    /// running or sleeping: "stopped" (SIGSTOP: hung, accepting nothing),
    /// "traced", "disk sleep" (uninterruptible I/O), "zombie".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_state: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Memory {
    /// The figure `[memory] limit` is compared to.
    pub metric: Metric,
    pub scope: Scope,
    pub bytes: u64,
    /// Resident set size, same scope.
    pub rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
    /// holdfast's own fd for it (workers get it at 3 + position).
    pub fd: i32,
    pub backlog: u32,
    pub inode: u64,
    /// Connections waiting to be accepted; `None` when the kernel does not say.
    pub accept_queue: Option<u32>,
    /// The queue's length limit (backlog capped by net.core.somaxconn).
    pub accept_queue_max: Option<u32>,
    #[serde(skip)]
    pub kind: ListenerKind,
}

/// What [`enrich`] needs to match a worker's sockets to a listener.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ListenerKind {
    Tcp(SocketAddr),
    Unix(String),
    #[default]
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KernelCounters {
    /// `TcpExt: ListenOverflows`: connections dropped because an accept queue was full.
    pub listen_overflows: u64,
    /// `TcpExt: ListenDrops`: all drops at listen time (overflows included).
    pub listen_drops: u64,
    pub listen_overflows_since_start: u64,
    pub listen_drops_since_start: u64,
    /// Set when the counters grew since holdfast started.
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    /// Replacements started, by reason: rollout, rollback, memory, age, crash.
    pub replacements: BTreeMap<String, u64>,
    pub failed_rollouts: u64,
    /// Workers SIGKILLed because they did not exit within drain_timeout.
    pub drain_kills: u64,
    pub log_reopens: u64,
    pub log_reopen_failures: u64,
    pub log_write_errors: u64,
    /// Worker lines that could not be written and were dropped.
    pub log_lines_lost: u64,
    /// Worker child processes sent `child_signal` for memory.
    pub child_signals: u64,
    /// Descendants that outlived their worker (or belonged to none) and were stopped.
    #[serde(default)]
    pub strays_stopped: u64,
    /// In-place upgrades of holdfast adopted by the new image.
    #[serde(default)]
    pub upgrades: u64,
    /// Upgrades refused or failed before the exec (the old image ran on).
    #[serde(default)]
    pub failed_upgrades: u64,
}

/// How worker memory is measured: the `[memory]` metric and scope, or pss
/// over the tree when `[memory]` is not configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub metric: Metric,
    pub scope: Scope,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            metric: Metric::Pss,
            scope: Scope::Tree,
        }
    }
}

/// How long the loop may take to answer a status request before the caller gives up.
pub const LOOP_TIMEOUT: Duration = Duration::from_secs(10);
