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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Address, Config, Metric, Scope};
use crate::core::{Reason, Supervisor, WorkerState};
use crate::os::listener::Listener;

/// Everything `holdfast status` shows, as sent over the control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub holdfast: Holdfast,
    pub workers: Vec<WorkerStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// System-wide listen-queue drop counters; `None` when /proc/net/netstat is unreadable.
    pub kernel: Option<KernelCounters>,
    pub counters: Counters,
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
    /// Every slot has a ready worker of the current generation and holdfast
    /// is not stopping.
    #[serde(default)]
    pub ready: bool,
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

/// What the loop knows, borrowed for [`snapshot`].
pub struct Sources<'a> {
    pub sv: &'a Supervisor,
    pub config: &'a Config,
    pub listeners: &'a [Rc<Listener>],
    pub started: Instant,
    pub now: Instant,
    /// (log reopens, log write errors) from the logs module, once there is one.
    pub log_stats: crate::logs::LogCounters,
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
                descendants: None,
                escaped: u32::try_from(escaped.len()).unwrap_or(u32::MAX),
                escaped_pids: escaped,
            }
        })
        .collect();
    // Slots with no worker: a crash loop shows every slot, with its next start.
    for (slot, info) in sv.slots() {
        if sv.workers().any(|w| w.slot == slot) {
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
            ready: sv.all_current_ready(),
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

/// The expensive half, for a blocking thread: connections, memory, unix
/// accept queues and kernel counters. `baseline` is `ListenOverflows` and
/// `ListenDrops` when holdfast started.
pub fn enrich(s: &mut Snapshot, baseline: Option<(u64, u64)>) {
    let parents = crate::os::tree::parents();
    let tcp = tcp_sockets();
    let unix = unix_sockets();
    for w in &mut s.workers {
        let Some(pid) = w.pid else { continue };
        if !parents.contains_key(&pid) {
            continue; // exited since the loop's half was taken
        }
        let mut tree = crate::os::tree::descendants_in(pid, &parents);
        for &p in &w.escaped_pids {
            tree.extend(crate::os::tree::descendants_in(p, &parents));
        }
        w.descendants = Some(tree.len().saturating_sub(1) as u64);
        let inodes: HashSet<u64> = tree
            .iter()
            .flat_map(|p| crate::os::tree::process_socket_inodes(*p))
            .collect();
        w.connections = Some(count_connections(&inodes, &s.listeners, &tcp, &unix));
        w.memory = memory(&tree, s.sampling);
    }
    if s.listeners
        .iter()
        .any(|l| matches!(l.kind, ListenerKind::Unix(_)))
    {
        match unix_listen_queues() {
            Ok(queues) => {
                for l in &mut s.listeners {
                    if let (ListenerKind::Unix(_), Some((now, max))) =
                        (&l.kind, queues.get(&l.inode))
                    {
                        l.accept_queue = Some(*now);
                        l.accept_queue_max = Some(*max);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "sock_diag for unix listeners failed"),
        }
    }
    s.kernel = listen_counters().map(|(overflows, drops)| {
        let (o0, d0) = baseline.unwrap_or((overflows, drops));
        let (o, d) = (overflows.saturating_sub(o0), drops.saturating_sub(d0));
        KernelCounters {
            listen_overflows: overflows,
            listen_drops: drops,
            listen_overflows_since_start: o,
            listen_drops_since_start: d,
            warning: (o > 0 || d > 0).then(|| {
                format!(
                    "the kernel dropped connections at full accept queues since holdfast started ({o} overflows, {d} drops, system-wide): workers are not accepting fast enough or the backlog is too small"
                )
            }),
        }
    });
}

/// A TCP socket from /proc/net/tcp{,6}: local address and state.
type TcpTable = HashMap<u64, (SocketAddr, u8)>;
/// A unix socket from /proc/net/unix: bound path and state.
type UnixTable = HashMap<u64, (String, u8)>;

const TCP_LISTEN: u8 = 0x0A;
/// `SS_CONNECTED` in /proc/net/unix's `St` column.
const UNIX_CONNECTED: u8 = 3;

fn count_connections(
    inodes: &HashSet<u64>,
    listeners: &[ListenerStatus],
    tcp: &TcpTable,
    unix: &UnixTable,
) -> u64 {
    let mut n = 0;
    for inode in inodes {
        let accepted = if let Some((local, state)) = tcp.get(inode) {
            *state != TCP_LISTEN
                && listeners.iter().any(|l| match &l.kind {
                    ListenerKind::Tcp(a) => {
                        a.port() == local.port()
                            && a.is_ipv4() == local.is_ipv4()
                            && (a.ip().is_unspecified() || a.ip() == local.ip())
                    }
                    _ => false,
                })
        } else if let Some((path, state)) = unix.get(inode) {
            *state == UNIX_CONNECTED
                && listeners
                    .iter()
                    .any(|l| matches!(&l.kind, ListenerKind::Unix(p) if p == path))
        } else {
            false
        };
        n += u64::from(accepted);
    }
    n
}

/// TCP sockets that are not listening, in TIME_WAIT or half-open, from an
/// INET_DIAG dump: the kernel skips the others, so a host with tens of
/// thousands of TIME_WAIT sockets costs nothing (formatting /proc/net/tcp for
/// them takes seconds). Falls back to /proc/net/tcp{,6}.
fn tcp_sockets() -> TcpTable {
    match inet_sockets() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag for TCP failed; reading /proc/net/tcp");
            let mut out = HashMap::new();
            for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
                if let Ok(text) = std::fs::read_to_string(file) {
                    out.extend(parse_proc_net_tcp(&text));
                }
            }
            out
        }
    }
}

fn inet_sockets() -> std::io::Result<TcpTable> {
    const TIME_WAIT: u32 = 6;
    const SYN_RECV: u32 = 3;
    let states: u32 = 0xFFF & !(1 << TIME_WAIT | 1 << SYN_RECV | 1u32 << TCP_LISTEN);
    let mut out = HashMap::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        // inet_diag_req_v2: family, protocol, ext, pad, states, sockid (48 bytes).
        let mut req = vec![family as u8, libc::IPPROTO_TCP as u8, 0, 0];
        req.extend_from_slice(&states.to_ne_bytes());
        req.extend_from_slice(&[0; 48]);
        sock_diag_dump(&req, |msg, _| {
            // inet_diag_msg: family, state, timer, retrans, sockid {sport be16,
            // dport be16, src [be32; 4], dst [be32; 4], if, cookie [u32; 2]},
            // expires, rqueue, wqueue, uid, inode.
            let (Some(head), Some(src), Some(inode)) =
                (msg.get(..4), msg.get(8..24), msg.get(68..72))
            else {
                return;
            };
            let port = msg
                .get(4..6)
                .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]));
            let ip = if i32::from(head[0]) == libc::AF_INET {
                IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3]))
            } else {
                let mut b = [0u8; 16];
                b.copy_from_slice(src);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let inode = u32::from_ne_bytes([inode[0], inode[1], inode[2], inode[3]]);
            if inode != 0 {
                out.insert(u64::from(inode), (SocketAddr::new(ip, port), head[1]));
            }
        })?;
    }
    Ok(out)
}

/// Parses /proc/net/tcp or tcp6 (proc_net_tcp(5)); inode 0 (TIME_WAIT) is skipped.
pub fn parse_proc_net_tcp(text: &str) -> Vec<(u64, (SocketAddr, u8))> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = parse_hex_addr(f.get(1)?)?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode: u64 = f.get(9)?.parse().ok()?;
            (inode != 0).then_some((inode, (local, state)))
        })
        .collect()
}

/// `0100007F:1F90` or the 32-hex-digit IPv6 form: each 32-bit word is
/// printed as the host-order value of the network-order bytes.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn unix_sockets() -> UnixTable {
    std::fs::read_to_string("/proc/net/unix")
        .map(|t| parse_proc_net_unix(&t).into_iter().collect())
        .unwrap_or_default()
}

/// Parses /proc/net/unix (unix(7)): sockets with a path, by inode.
pub fn parse_proc_net_unix(text: &str) -> Vec<(u64, (String, u8))> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Seven space-separated fields (the inode is padded), then the path,
            // which may contain spaces.
            let mut rest = line;
            let mut f = Vec::with_capacity(7);
            for _ in 0..7 {
                rest = rest.trim_start();
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                f.push(&rest[..end]);
                rest = &rest[end..];
            }
            let state = u8::from_str_radix(f.get(5)?, 16).ok()?;
            let inode: u64 = f.get(6)?.parse().ok()?;
            let path = rest.strip_prefix(' ').unwrap_or(rest).to_string();
            (!path.is_empty()).then_some((inode, (path, state)))
        })
        .collect()
}

/// Sums (scope tree) or takes the largest process (scope process) of the
/// metric, read the same way the memory sampler reads it.
fn memory(tree: &[i32], sampling: Sampling) -> Option<Memory> {
    let per: Vec<(u64, u64)> = tree
        .iter()
        .filter_map(|&pid| crate::os::memory::read_usage(pid, sampling.metric))
        .filter_map(|u| Some((u.get(sampling.metric)?, u.rss)))
        .collect();
    if per.is_empty() {
        return None;
    }
    let (bytes, rss_bytes) = match sampling.scope {
        Scope::Tree => per.iter().fold((0, 0), |(m, r), (pm, pr)| (m + pm, r + pr)),
        Scope::Process => per
            .iter()
            .copied()
            .max_by_key(|(m, _)| *m)
            .unwrap_or((0, 0)),
    };
    Some(Memory {
        metric: sampling.metric,
        scope: sampling.scope,
        bytes,
        rss_bytes,
    })
}

/// `ListenOverflows` and `ListenDrops` from /proc/net/netstat (system-wide).
pub fn listen_counters() -> Option<(u64, u64)> {
    parse_netstat(&std::fs::read_to_string("/proc/net/netstat").ok()?)
}

pub fn parse_netstat(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let map: HashMap<&str, u64> = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        return Some((*map.get("ListenOverflows")?, *map.get("ListenDrops")?));
    }
    None
}

/// Accept queues of every listening unix socket, by inode: (queued now,
/// max), from a sock_diag dump with `UDIAG_SHOW_RQLEN` (for a listening
/// socket the kernel reports its pending connections and
/// `sk_max_ack_backlog`).
pub fn unix_listen_queues() -> std::io::Result<HashMap<u64, (u32, u32)>> {
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    const UNIX_DIAG_RQLEN: u16 = 4;
    // unix_diag_req: family, protocol, pad u16, states, ino, show, cookie [u32; 2].
    let mut req = vec![libc::AF_UNIX as u8, 0, 0, 0];
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&UDIAG_SHOW_RQLEN.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    let mut out = HashMap::new();
    sock_diag_dump(&req, |msg, attrs| {
        // unix_diag_msg: family, type, state, pad, ino u32, cookie [u32; 2].
        let Some(ino) = msg.get(4..8) else { return };
        let ino = u64::from(u32::from_ne_bytes([ino[0], ino[1], ino[2], ino[3]]));
        for (kind, data) in attrs {
            if let (UNIX_DIAG_RQLEN, Some(q)) = (kind, data.get(..8)) {
                let rq = u32::from_ne_bytes([q[0], q[1], q[2], q[3]]);
                let wq = u32::from_ne_bytes([q[4], q[5], q[6], q[7]]);
                out.insert(ino, (rq, wq));
            }
        }
    })?;
    Ok(out)
}

/// Sends one NETLINK_SOCK_DIAG dump request with `payload` (a
/// `*_diag_req`) and calls `each` with every reply's fixed part (16 bytes
/// for unix, 72 for inet) and its attributes (type, data).
fn sock_diag_dump(
    payload: &[u8],
    mut each: impl FnMut(&[u8], Vec<(u16, &[u8])>),
) -> std::io::Result<()> {
    use nix::sys::socket::{
        recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
        SockProtocol, SockType,
    };
    use std::os::fd::AsRawFd;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const HDR: usize = 16;

    let fixed = if payload.first() == Some(&(libc::AF_UNIX as u8)) {
        16
    } else {
        72
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(2, 0),
    )?;
    let len = u32::try_from(HDR + payload.len()).unwrap_or(u32::MAX);
    let mut req = Vec::with_capacity(HDR + payload.len());
    req.extend_from_slice(&len.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    req.extend_from_slice(payload);
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
    };
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed sock_diag reply");
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a dump of a busy host ends well within this many datagrams.
    for _ in 0..100_000 {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(bad());
        }
        let mut off = 0;
        while off + HDR <= n {
            let msg = &buf[off..n];
            let len = u32_at(msg, 0).ok_or_else(bad)? as usize;
            let kind = u16_at(msg, 4).ok_or_else(bad)?;
            if len < HDR || len > msg.len() {
                return Err(bad());
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = u32_at(msg, HDR).ok_or_else(bad)? as i32;
                    return Err(std::io::Error::from_raw_os_error(errno.saturating_neg()));
                }
                _ => {}
            }
            let body = &msg[HDR..len];
            if body.len() >= fixed {
                let mut attrs = Vec::new();
                let mut a = fixed;
                while a + 4 <= body.len() {
                    let alen = usize::from(u16_at(body, a).ok_or_else(bad)?);
                    let atype = u16_at(body, a + 2).ok_or_else(bad)?;
                    if alen < 4 || a + alen > body.len() {
                        break;
                    }
                    attrs.push((atype, &body[a + 4..a + alen]));
                    a += (alen + 3) & !3;
                }
                each(&body[..fixed], attrs);
            }
            off += (len + 3) & !3;
        }
    }
    Err(bad())
}

/// `3h12m`, `45s`, `2d3h`: the two largest units.
pub fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

fn bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let m = b as f64 / MIB;
    if m >= 1024.0 {
        format!("{:.2}G", m / 1024.0)
    } else {
        format!("{m:.1}M")
    }
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::Rss => "RSS",
        Metric::Pss => "PSS",
        Metric::Uss => "USS",
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = width[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The table `holdfast status` prints.
pub fn render(s: &Snapshot) -> String {
    let h = &s.holdfast;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "holdfast {}  pid {}  up {}  config {}",
        h.version,
        h.pid,
        short_duration(h.uptime_secs),
        h.config.as_ref().map_or_else(
            || "(none: command line)".into(),
            |p| p.display().to_string()
        )
    );
    let mut line = format!("generation {}  workers {}", h.generation, h.workers_wanted);
    if h.stopping {
        line.push_str("  STOPPING");
    }
    match &h.rollout {
        Some(r) => {
            let _ = write!(
                line,
                "  {} to generation {}: {}/{} ready ({})",
                if r.rollback { "ROLLBACK" } else { "rollout" },
                r.generation,
                r.ready,
                r.total,
                short_duration(r.elapsed_secs)
            );
        }
        None => line.push_str("  no rollout in progress"),
    }
    let _ = writeln!(out, "{line}");
    let _ = match &h.last_rollout {
        Some(r) if r.ok => writeln!(out, "last rollout: generation {} ok", r.generation),
        Some(r) => writeln!(
            out,
            "last rollout: generation {} FAILED: {}",
            r.generation,
            r.error.as_deref().unwrap_or("?")
        ),
        None => writeln!(out, "last rollout: none"),
    };
    if let Some(why) = &h.reload_rejected {
        let _ = writeln!(out, "{why}");
    }
    out.push('\n');

    let metric = s
        .workers
        .iter()
        .find_map(|w| w.memory.as_ref().map(|m| metric_name(m.metric)))
        .unwrap_or(metric_name(s.sampling.metric));
    let mut rows = vec![[
        "SLOT",
        "PID",
        "GEN",
        "STATE",
        "AGE",
        metric,
        "RSS",
        "CONNS",
        "DESC",
        "RESTARTS",
        "LAST EXIT",
    ]
    .map(String::from)
    .to_vec()];
    for w in &s.workers {
        let state = match w.restart_in_secs {
            Some(secs) => format!("{} (start in {})", w.state, short_duration(secs)),
            None => w.state.clone(),
        };
        let desc = match (w.descendants, w.escaped) {
            (Some(n), 0) => n.to_string(),
            (Some(n), e) => format!("{n} ({e} escaped)"),
            (None, 0) => "-".to_string(),
            (None, e) => format!("? ({e} escaped)"),
        };
        rows.push(vec![
            w.slot.to_string(),
            or_dash(w.pid),
            w.generation.to_string(),
            state,
            if w.pid.is_some() {
                short_duration(w.age_secs)
            } else {
                "-".to_string()
            },
            or_dash(w.memory.as_ref().map(|m| bytes(m.bytes))),
            or_dash(w.memory.as_ref().map(|m| bytes(m.rss_bytes))),
            or_dash(w.connections),
            desc,
            w.restarts.to_string(),
            or_dash(w.last_exit.clone()),
        ]);
    }
    out.push_str(&table(&rows));
    out.push('\n');

    let mut rows = vec![["LISTENER", "ADDRESS", "FD", "ACCEPT QUEUE (now/max)"]
        .map(String::from)
        .to_vec()];
    for l in &s.listeners {
        let queue = match (l.accept_queue, l.accept_queue_max) {
            (Some(n), Some(m)) => format!("{n}/{m}"),
            _ => "n/a".to_string(),
        };
        rows.push(vec![
            l.name.clone(),
            l.address.clone(),
            l.fd.to_string(),
            queue,
        ]);
    }
    out.push_str(&table(&rows));
    match &s.kernel {
        Some(k) => {
            let _ = writeln!(
                out,
                "kernel (system-wide): ListenOverflows {} (+{} since start)  ListenDrops {} (+{} since start)",
                k.listen_overflows,
                k.listen_overflows_since_start,
                k.listen_drops,
                k.listen_drops_since_start
            );
            if let Some(w) = &k.warning {
                let _ = writeln!(out, "WARNING: {w}");
            }
        }
        None => out.push_str("kernel: /proc/net/netstat unreadable\n"),
    }
    out.push('\n');
    let c = &s.counters;
    let reasons: Vec<String> = c
        .replacements
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(out, "replacements: {}", reasons.join(", "));
    let _ = writeln!(
        out,
        "failed rollouts {}  drain kills {}  child signals {}  log reopens {} (failed {})  log write errors {}  log lines lost {}",
        c.failed_rollouts,
        c.drain_kills,
        c.child_signals,
        c.log_reopens,
        c.log_reopen_failures,
        c.log_write_errors,
        c.log_lines_lost
    );
    out
}

/// How long the loop may take to answer a status request before the caller gives up.
pub const LOOP_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_v4_and_v6() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 12346 1\n   2: 0100007F:1F90 0100007F:C351 06 00000000:00000000 00:00000000 00000000     0        0 0 1\n";
        let t = parse_proc_net_tcp(v4);
        let local: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        assert_eq!(t, vec![(12345, (local, 0x0A)), (12346, (local, 0x01))]);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        let t = parse_proc_net_tcp(v6);
        assert_eq!(t, vec![(777, ("[::1]:8080".parse().expect("addr"), 0x0A))]);
    }

    #[test]
    fn parses_proc_net_unix() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n0000000027debf20: 00000002 00000000 00010000 0001 01 62293 /run/app.sock\n000000008145e00b: 00000003 00000000 00000000 0001 03 62296 /run/app.sock\n000000008145e00c: 00000003 00000000 00000000 0001 03 62297\n000000008145e00d: 00000003 00000000 00000000 0001 03 62298 /tmp/a b.sock\n";
        assert_eq!(
            parse_proc_net_unix(text),
            vec![
                (62293, ("/run/app.sock".to_string(), 1)),
                (62296, ("/run/app.sock".to_string(), 3)),
                (62298, ("/tmp/a b.sock".to_string(), 3)),
            ]
        );
    }

    #[test]
    fn parses_netstat() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_netstat(netstat), Some((7, 9)));
        assert_eq!(parse_netstat("IpExt: A\nIpExt: 1\n"), None);
    }

    #[test]
    fn counts_only_accepted_connections_of_our_listeners() {
        let listeners = vec![
            ListenerStatus {
                name: "http".into(),
                address: "0.0.0.0:8080".into(),
                fd: 3,
                backlog: 16,
                inode: 1,
                accept_queue: None,
                accept_queue_max: None,
                kind: ListenerKind::Tcp("0.0.0.0:8080".parse().expect("addr")),
            },
            ListenerStatus {
                name: "sock".into(),
                address: "unix:/run/a.sock".into(),
                fd: 4,
                backlog: 16,
                inode: 2,
                accept_queue: None,
                accept_queue_max: None,
                kind: ListenerKind::Unix("/run/a.sock".into()),
            },
        ];
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let tcp: TcpTable = [
            (1, (a("0.0.0.0:8080"), TCP_LISTEN)), // the listener itself
            (10, (a("127.0.0.1:8080"), 1)),       // accepted
            (11, (a("10.0.0.1:8080"), 8)),        // accepted, CLOSE_WAIT
            (12, (a("127.0.0.1:41000"), 1)),      // outgoing (database)
            (13, (a("[::1]:8080"), 1)),           // other family
        ]
        .into_iter()
        .collect();
        let unix: UnixTable = [
            (2, ("/run/a.sock".to_string(), 1)),
            (20, ("/run/a.sock".to_string(), UNIX_CONNECTED)),
            (21, ("/run/other.sock".to_string(), UNIX_CONNECTED)),
        ]
        .into_iter()
        .collect();
        let held: HashSet<u64> = [1, 2, 10, 11, 12, 13, 20, 21, 99].into_iter().collect();
        assert_eq!(count_connections(&held, &listeners, &tcp, &unix), 3);
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(5.9), "5s");
        assert_eq!(short_duration(125.0), "2m5s");
        assert_eq!(short_duration(3.0 * 3600.0 + 720.0), "3h12m");
        assert_eq!(short_duration(2.0 * 86400.0 + 3.0 * 3600.0), "2d3h");
    }
}
