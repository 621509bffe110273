//! Taking the listening sockets: inherited (LISTEN_FDS through `listenfd`,
//! or UNICORN_FD), or bound with `--bind`; then registered with tokio.

use std::io;

use crate::args::Args;
use crate::inherited::Inherited;
use crate::Error;

/// A listening socket taken over from the parent, or bound by `--bind`.
#[derive(Debug)]
pub(crate) enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl std::os::fd::AsFd for StdListener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            StdListener::Tcp(l) => l.as_fd(),
            StdListener::Unix(l) => l.as_fd(),
        }
    }
}

/// A listener and its `LISTEN_FDNAMES` name, if any.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) listener: StdListener,
    pub(crate) name: Option<String>,
}

/// Takes every inherited listener: `LISTEN_FDS` (sd_listen_fds(3), checked
/// against `LISTEN_PID` by `listenfd`), or `UNICORN_FD` with
/// `--unicorn-fd`; failing those, binds `--bind`. An empty list means there
/// was nothing to take or bind. The fds are marked close-on-exec.
pub(crate) fn take_listeners(args: &Args, inherited: &Inherited) -> Result<Vec<Inbound>, Error> {
    let mut out = Vec::new();
    if args.unicorn_fd {
        let value = inherited.var("UNICORN_FD").unwrap_or_default();
        let fds = value
            .split(',')
            .map(|fd| fd.trim().parse::<i32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::UnicornFd(value.to_string()))?;
        for fd in fds {
            // listenfd only takes fds named by LISTEN_FDS; point it at one
            // fd at a time (it removes LISTEN_FDS and LISTEN_PID itself).
            std::env::set_var("LISTEN_FDS", "1");
            std::env::set_var("LISTEN_FDS_FIRST_FD", fd.to_string());
            std::env::remove_var("LISTEN_PID");
            let mut fds = listenfd::ListenFd::from_env();
            if let Some(listener) = take_one(&mut fds, 0, fd)? {
                out.push(Inbound {
                    listener,
                    name: None,
                });
            }
        }
        std::env::remove_var("LISTEN_FDS_FIRST_FD");
    } else {
        let names: Vec<&str> = inherited
            .var("LISTEN_FDNAMES")
            .map(|names| names.split(':').collect())
            .unwrap_or_default();
        // listenfd's extension to sd_listen_fds(3); only for error messages.
        let first: i32 = std::env::var("LISTEN_FDS_FIRST_FD")
            .ok()
            .and_then(|fd| fd.parse().ok())
            .unwrap_or(3);
        let mut fds = listenfd::ListenFd::from_env();
        for idx in 0..fds.len() {
            let fd = first + i32::try_from(idx).unwrap_or(i32::MAX - first);
            if let Some(listener) = take_one(&mut fds, idx, fd)? {
                out.push(Inbound {
                    listener,
                    name: names.get(idx).map(|name| name.to_string()),
                });
            }
        }
    }
    if out.is_empty() {
        if let Some(addr) = &args.bind {
            let bind_err = |source| Error::Bind {
                addr: addr.clone(),
                source,
            };
            let listener = match addr.strip_prefix("unix:") {
                Some(path) => StdListener::Unix(
                    std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?,
                ),
                None => StdListener::Tcp(std::net::TcpListener::bind(addr).map_err(bind_err)?),
            };
            out.push(Inbound {
                listener,
                name: None,
            });
        }
    }
    Ok(out)
}

pub(crate) fn take_one(
    fds: &mut listenfd::ListenFd,
    idx: usize,
    fd: i32,
) -> Result<Option<StdListener>, Error> {
    match fds.take_tcp_listener(idx) {
        Ok(tcp) => Ok(tcp.map(StdListener::Tcp)),
        Err(_) => fds
            .take_unix_listener(idx)
            .map(|unix| unix.map(StdListener::Unix))
            .map_err(|source| Error::NotStreamSocket { fd, source }),
    }
}

/// A listener registered with tokio.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Sets the socket non-blocking (on the open file description it shares
    /// with holdfast) and registers it with the runtime.
    pub(crate) fn from_std(listener: StdListener) -> io::Result<Listener> {
        Ok(match listener {
            StdListener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            StdListener::Unix(l) => {
                l.set_nonblocking(true)?;
                Listener::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        })
    }
}
