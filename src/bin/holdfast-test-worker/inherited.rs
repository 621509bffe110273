//! What the process inherited (fds, sockets, socket-activation variables),
//! captured at the top of `main` and served as JSON by `GET /inherited`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use nix::sys::socket::{getpeername, getsockname, SockaddrLike, SockaddrStorage};

/// What the process inherited, captured at the top of `main` and served
/// as JSON by `GET /inherited`.
///
/// Only the fd numbers and their link targets are read at start; the sockets
/// are described on the first `/inherited` ([`Inherited::render`]), because
/// that reads the whole socket table (/proc/net/tcp), which after a load of
/// one-shot connections holds tens of thousands of TIME_WAIT entries and
/// took 1.5-4 s on a busy 2-core box: every worker's start, and so every
/// rollout step, waited for it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Inherited {
    /// Every open fd, in order.
    pub(crate) fds: Vec<i32>,
    /// For each fd ≥ 3: `tcp:IP:PORT listening`, `unix:/path listening`,
    /// `... connected`, `... open`, or the `/proc/self/fd` link target.
    /// Filled by [`Inherited::render`].
    pub(crate) sockets: BTreeMap<i32, String>,
    /// The `/proc/self/fd` link target of each fd ≥ 3, as captured.
    #[serde(skip)]
    pub(crate) targets: BTreeMap<i32, String>,
    /// The socket-activation and holdfast variables that were set.
    pub(crate) env: BTreeMap<String, String>,
}

/// Variables reported by `/inherited` (and every `EINHORN_FD_<n>`).
pub(crate) const CAPTURED_VARS: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "SERVER_STARTER_PORT",
    "EINHORN_FD_COUNT",
    "UNICORN_FD",
    "HOLDFAST_WORKER_ID",
    "HOLDFAST_GENERATION",
    "NOTIFY_SOCKET",
];

impl Inherited {
    pub(crate) fn capture() -> Inherited {
        // Collect the names first and close the directory handle, so that
        // its own fd no longer resolves and drops out below.
        let names: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
            Ok(dir) => dir
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut fds = Vec::new();
        let mut targets = BTreeMap::new();
        for fd in names {
            if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
                fds.push(fd);
                targets.insert(fd, target.to_string_lossy().into_owned());
            }
        }
        fds.sort_unstable();
        targets.retain(|fd, _| *fd >= 3);
        let env = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                let wanted = CAPTURED_VARS.contains(&k.as_str())
                    || k.strip_prefix("EINHORN_FD_")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                wanted.then(|| (k, v.to_string_lossy().into_owned()))
            })
            .collect();
        Inherited {
            fds,
            sockets: BTreeMap::new(),
            targets,
            env,
        }
    }

    /// The JSON of `/inherited`, describing each inherited fd that is still
    /// the file it was at start (the worker keeps its inherited fds open).
    pub(crate) fn render(&self) -> String {
        let table = SocketTable::read();
        let sockets = self
            .targets
            .iter()
            .map(|(&fd, target)| {
                let now = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                    .map(|t| t.to_string_lossy().into_owned());
                let described = match now {
                    Ok(now) if now == *target => describe_fd(fd, target, &table),
                    _ => format!("{target} (closed since start)"),
                };
                (fd, described)
            })
            .collect();
        let full = Inherited {
            sockets,
            ..self.clone()
        };
        serde_json::to_string(&full).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub(crate) fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }
}

/// Kind and state of the sockets of this network namespace, by inode, from
/// /proc/net. (SO_ACCEPTCONN via getsockopt would need a `BorrowedFd` made
/// from a raw fd number, which is `unsafe`; the kernel's tables say the same.)
#[derive(Debug, Default)]
pub(crate) struct SocketTable {
    pub(crate) by_inode: BTreeMap<u64, SocketInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketInfo {
    pub(crate) kind: &'static str,
    pub(crate) state: SocketState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketState {
    Listening,
    Connected,
    Open,
}

impl SocketTable {
    pub(crate) fn read() -> SocketTable {
        let mut table = SocketTable::default();
        for (file, kind) in [
            ("/proc/net/tcp", "tcp"),
            ("/proc/net/tcp6", "tcp"),
            ("/proc/net/udp", "udp"),
            ("/proc/net/udp6", "udp"),
        ] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (Some(st), Some(inode)) = (cols.get(3), cols.get(9)) else {
                    continue;
                };
                let state = match (kind, *st) {
                    ("tcp", "0A") => SocketState::Listening,
                    ("tcp", "01") => SocketState::Connected,
                    _ => SocketState::Open,
                };
                if let Ok(inode) = inode.parse() {
                    table.by_inode.insert(inode, SocketInfo { kind, state });
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string("/proc/net/unix") {
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (Some(flags), Some(st), Some(inode)) = (cols.get(3), cols.get(5), cols.get(6))
                else {
                    continue;
                };
                const SO_ACCEPTCON: u32 = 0x10000;
                let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & SO_ACCEPTCON != 0);
                let state = if listening {
                    SocketState::Listening
                } else if *st == "03" {
                    SocketState::Connected
                } else {
                    SocketState::Open
                };
                if let Ok(inode) = inode.parse() {
                    table.by_inode.insert(
                        inode,
                        SocketInfo {
                            kind: "unix",
                            state,
                        },
                    );
                }
            }
        }
        table
    }
}

/// One fd ≥ 3 for `/inherited`: the socket's kind, local address and state,
/// or the link target for anything that is not a known socket.
pub(crate) fn describe_fd(fd: i32, target: &str, table: &SocketTable) -> String {
    let Some(info) = target
        .strip_prefix("socket:[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inode| inode.parse::<u64>().ok())
        .and_then(|inode| table.by_inode.get(&inode))
    else {
        return target.to_string();
    };
    let Ok(local) = getsockname::<SockaddrStorage>(fd) else {
        return target.to_string();
    };
    let address = if let Some(unix) = local.as_unix_addr() {
        if let Some(path) = unix.path() {
            path.display().to_string()
        } else if let Some(name) = unix.as_abstract() {
            format!("@{}", String::from_utf8_lossy(name))
        } else {
            "(unnamed)".to_string()
        }
    } else if let Some(v4) = local.as_sockaddr_in() {
        SocketAddr::from(std::net::SocketAddrV4::from(*v4)).to_string()
    } else if let Some(v6) = local.as_sockaddr_in6() {
        SocketAddr::from(std::net::SocketAddrV6::from(*v6)).to_string()
    } else {
        format!("family {:?}", local.family())
    };
    let state = match info.state {
        SocketState::Listening => "listening",
        // A unix socket's table entry may not say; the peer does.
        SocketState::Connected => "connected",
        SocketState::Open if getpeername::<SockaddrStorage>(fd).is_ok() => "connected",
        SocketState::Open => "open",
    };
    format!("{}:{address} {state}", info.kind)
}
