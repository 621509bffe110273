//! The expensive half of a snapshot, for a blocking thread: what costs a
//! walk of /proc (connections per worker, memory, descendants), the accept
//! queues of unix listeners (sock_diag) and the kernel's drop counters.

use std::collections::HashSet;

use super::*;
use crate::os::proc::net::{TcpTable, UnixTable, TCP_LISTEN, UNIX_CONNECTED};
use crate::os::proc::{self, net};

/// The expensive half, for a blocking thread: connections, memory, unix
/// accept queues and kernel counters. `baseline` is `ListenOverflows` and
/// `ListenDrops` when holdfast started.
pub fn enrich(s: &mut Snapshot, baseline: Option<(u64, u64)>) {
    let parents = proc::parents();
    // Built once for every worker's tree (not once per worker).
    let children = proc::children_map(&parents);
    let tcp = net::tcp_sockets();
    let unix = net::unix_sockets();
    for w in &mut s.workers {
        let Some(pid) = w.pid else { continue };
        if !parents.contains_key(&pid) {
            continue; // exited since the loop's half was taken
        }
        let mut tree = proc::descendants_of(pid, &children);
        for &p in &w.escaped_pids {
            tree.extend(proc::descendants_of(p, &children));
        }
        w.descendants = Some(tree.len().saturating_sub(1) as u64);
        w.process_state = proc::stat(pid).and_then(|s| unusual_state(s.state));
        let inodes: HashSet<u64> = tree
            .iter()
            .flat_map(|p| proc::process_socket_inodes(*p))
            .collect();
        w.connections = Some(count_connections(&inodes, &s.listeners, &tcp, &unix));
        w.memory = memory(&tree, s.sampling);
    }
    if s.listeners
        .iter()
        .any(|l| matches!(l.kind, ListenerKind::Unix(_)))
    {
        match crate::os::sock_diag::unix_listen_queues() {
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
    s.kernel = net::listen_counters().map(|(overflows, drops)| {
        let (o0, d0) = baseline.unwrap_or((overflows, drops));
        let (o, d) = (overflows.saturating_sub(o0), drops.saturating_sub(d0));
        KernelCounters {
            listen_overflows: overflows,
            listen_drops: drops,
            listen_overflows_since_start: o,
            listen_drops_since_start: d,
            warning: (o > 0 || d > 0).then(|| {
                format!(
                    "the kernel dropped connections at full accept queues since holdfast started ({o} overflows, {d} drops, all sockets of this network namespace): workers are not accepting fast enough or the backlog is too small"
                )
            }),
        }
    });
}

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

fn memory(tree: &[i32], sampling: Sampling) -> Option<Memory> {
    let per: Vec<(u64, u64)> = tree
        .iter()
        .filter_map(|&pid| proc::memory::read_usage(pid, sampling.metric))
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

/// A process state letter of /proc/PID/stat worth showing: anything but
/// running (R), sleeping (S) and idle (I).
fn unusual_state(letter: char) -> Option<String> {
    match letter {
        'T' => Some("stopped"),
        't' => Some("traced"),
        'D' => Some("disk sleep"),
        'Z' => Some("zombie"),
        'X' => Some("dead"),
        _ => None,
    }
    .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
