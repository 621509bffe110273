//! The cheap half of a snapshot, built inside the event loop from what the
//! supervisor and the listeners already know: no /proc reads.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::rc::Rc;
use std::time::Instant;

use super::*;
use crate::config::{Address, Config};
use crate::core::{Reason, Supervisor, WorkerState};
use crate::os::listener::Listener;

/// What the loop knows, borrowed for [`snapshot`].
pub struct Sources<'a> {
    pub sv: &'a Supervisor,
    pub config: &'a Config,
    pub listeners: &'a [Rc<Listener>],
    pub started: Instant,
    pub now: Instant,
    /// (log reopens, log write errors) from the logs module, once there is one.
    pub log_stats: crate::logs::LogCounters,
    /// The edge's /proc cost counters (`proc_reads` is filled in here).
    pub cost: Cost,
}

/// The cheap half, run inside the loop: no /proc reads, one `getsockopt`
/// per TCP listener.
pub fn snapshot(src: Sources<'_>) -> Snapshot {
    let Sources {
        sv,
        config,
        listeners,
        started,
        now,
        log_stats,
        cost,
    } = src;
    let secs = |since: Instant| now.saturating_duration_since(since).as_secs_f64();
    let rollout = sv.rollout().map(|r| {
        let ready = sv
            .workers()
            .filter(|w| {
                w.generation == r.generation && matches!(w.state, WorkerState::Ready { .. })
            })
            .count();
        let total = sv.workers_wanted();
        RolloutStatus {
            generation: r.generation.0,
            rollback: r.rollback,
            ready: u32::try_from(ready).unwrap_or(u32::MAX).min(total),
            total,
            elapsed_secs: secs(r.started),
        }
    });
    let last_rollout = sv.last_rollout().map(|(g, outcome)| LastRollout {
        generation: g.0,
        ok: outcome.is_ok(),
        error: outcome.as_ref().err().cloned(),
    });
    let mut workers: Vec<WorkerStatus> = sv
        .workers()
        .map(|w| {
            let slot = sv.slot_info(w.slot);
            let escaped: Vec<i32> = sv
                .strays()
                .filter(|s| s.worker == Some(w.id))
                .map(|s| s.pid.0)
                .collect();
            WorkerStatus {
                slot: w.slot.0,
                pid: w.pid.map(|p| p.0),
                generation: w.generation.0,
                state: w.state.name().to_string(),
                age_secs: secs(w.started),
                status: w.status.clone(),
                restarts: slot.map_or(0, |s| s.restarts),
                last_exit: slot.and_then(|s| s.last_exit.clone()),
                restart_in_secs: None,
                connections: None,
                memory: None,
                process_state: None,
                descendants: None,
                escaped: u32::try_from(escaped.len()).unwrap_or(u32::MAX),
                escaped_pids: escaped,
            }
        })
        .collect();
    // Slots with no worker: a crash loop shows every slot, with its next start.
    let occupied: std::collections::HashSet<u32> = workers.iter().map(|w| w.slot).collect();
    for (slot, info) in sv.slots() {
        if occupied.contains(&slot.0) {
            continue;
        }
        workers.push(WorkerStatus {
            slot: slot.0,
            pid: None,
            generation: info.generation.0,
            state: "waiting".to_string(),
            age_secs: 0.0,
            status: None,
            restarts: info.restarts,
            last_exit: info.last_exit.clone(),
            restart_in_secs: Some(
                info.restart_at
                    .map_or(0.0, |t| t.saturating_duration_since(now).as_secs_f64()),
            ),
            connections: None,
            memory: None,
            process_state: None,
            descendants: None,
            escaped: 0,
            escaped_pids: Vec::new(),
        });
    }
    workers.sort_by_key(|w| (w.slot, w.generation));
    let listeners = listeners
        .iter()
        .map(|l| {
            let (kind, queue) = match &l.address {
                Address::Tcp(a) => (
                    ListenerKind::Tcp(*a),
                    crate::os::sys::tcp_accept_queue(l.as_fd()).ok(),
                ),
                Address::Unix(p) => (ListenerKind::Unix(p.to_string_lossy().into_owned()), None),
                Address::Systemd(_) => (ListenerKind::Other, None),
            };
            ListenerStatus {
                name: l.name.clone(),
                address: l.address.to_string(),
                fd: l.raw_fd(),
                backlog: l.backlog,
                inode: l.socket_inode().unwrap_or(0),
                accept_queue: queue.map(|q| q.0),
                accept_queue_max: queue.map(|q| q.1),
                kind,
            }
        })
        .collect();
    let mut replacements: BTreeMap<String, u64> = [
        Reason::Rollout,
        Reason::Rollback,
        Reason::Memory,
        Reason::Age,
        Reason::Crash,
        Reason::NotServing,
        Reason::Manual,
    ]
    .iter()
    .map(|r| (r.to_string(), 0))
    .collect();
    for (reason, n) in &sv.counters.replacements {
        replacements.insert(reason.to_string(), *n);
    }
    Snapshot {
        holdfast: Holdfast {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_secs: secs(started),
            config: config.path.clone(),
            control_socket: config.control_socket.clone(),
            generation: sv.stable().0,
            workers_wanted: sv.workers_wanted(),
            stopping: sv.is_stopping(),
            rollout,
            last_rollout,
            reload_rejected: sv.reload_note().map(str::to_string),
            upgrading: sv.is_upgrading(),
            ready: sv.all_current_ready(),
            not_ready: sv.readiness().err(),
        },
        workers,
        listeners,
        kernel: None,
        counters: Counters {
            replacements,
            failed_rollouts: sv.counters.failed_rollouts,
            drain_kills: sv.counters.drain_kills,
            log_reopens: log_stats.reopens,
            log_reopen_failures: log_stats.reopen_failures,
            log_write_errors: log_stats.write_errors,
            log_lines_lost: log_stats.lines_lost,
            child_signals: sv.counters.child_signals,
            strays_stopped: sv.counters.strays_stopped,
            upgrades: sv.counters.upgrades,
            failed_upgrades: sv.counters.failed_upgrades,
        },
        cost: Cost {
            proc_reads: crate::os::proc::reads(),
            ..cost
        },
        sampling: config
            .memory
            .as_ref()
            .map_or_else(Sampling::default, |m| Sampling {
                metric: m.metric(),
                scope: m.scope,
            }),
    }
}
