//! The listening sockets: bound once at start-up, held for holdfast's whole
//! life, never accepted on.
//!
//! A unix socket path can be unlinked by a worker (Puma 5.6 unlinks every
//! inherited unix socket it does not bind itself), which would strand a front
//! proxy that connects by path. So holdfast keeps a hard link to every unix
//! socket inode it binds (`.NAME.holdfast` beside it) and [`Listener::repair`]
//! restores the path from it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{Address, Listen};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("bind {address}: {reason}")]
    Bind { address: Address, reason: String },
    #[error("listen {address}: another process is already listening on {path}")]
    UnixInUse { address: Address, path: PathBuf },
}

impl ListenError {
    fn bind(address: &Address, what: &str, e: io::Error) -> Self {
        let hint = match e.raw_os_error() {
            Some(libc::EADDRINUSE) => " (another process is listening there)",
            Some(libc::EACCES) => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
            Some(libc::ENOENT) => " (the directory does not exist)",
            Some(libc::EADDRNOTAVAIL) => " (no interface on this host has that address)",
            _ => "",
        };
        ListenError::Bind {
            address: address.clone(),
            reason: format!("{what}: {e}{hint}"),
        }
    }
}

/// One listening socket holdfast owns.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: Address,
    pub backlog: u32,
    fd: OwnedFd,
    /// For unix sockets bound here: (path, inode, keeper hard link).
    unix: Option<UnixPath>,
}

#[derive(Debug)]
struct UnixPath {
    path: PathBuf,
    inode: u64,
    keeper: PathBuf,
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The kernel's cap on any listen backlog (`net.core.somaxconn`).
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Listener {
    /// Binds and listens on `spec`. CLOEXEC is set: workers get the socket
    /// only through the explicit fd plan of a spawn.
    pub fn bind(spec: &Listen) -> Result<Listener, ListenError> {
        if let Some(max) = somaxconn() {
            if spec.backlog > max {
                tracing::warn!(
                    address = %spec.address,
                    backlog = spec.backlog,
                    somaxconn = max,
                    "listen backlog {} is above net.core.somaxconn = {}; the kernel silently caps it at {}, and bursts beyond that are refused (ECONNREFUSED, or EAGAIN on unix sockets). Raise it with `sysctl -w net.core.somaxconn={}`",
                    spec.backlog, max, max, spec.backlog
                );
            }
        }
        let backlog = i32::try_from(spec.backlog).unwrap_or(i32::MAX);
        match &spec.address {
            Address::Tcp(addr) => {
                let a = &spec.address;
                let s = Socket::new(Domain::for_address(*addr), Type::STREAM, None)
                    .map_err(|e| ListenError::bind(a, "socket", e))?;
                s.set_reuse_address(true)
                    .map_err(|e| ListenError::bind(a, "SO_REUSEADDR", e))?;
                if addr.is_ipv6() {
                    s.set_only_v6(true)
                        .map_err(|e| ListenError::bind(a, "IPV6_V6ONLY", e))?;
                }
                s.bind(&SockAddr::from(*addr))
                    .map_err(|e| ListenError::bind(a, "bind", e))?;
                s.listen(backlog)
                    .map_err(|e| ListenError::bind(a, "listen", e))?;
                Ok(Listener {
                    name: spec.name.clone(),
                    address: spec.address.clone(),
                    backlog: spec.backlog,
                    fd: s.into(),
                    unix: None,
                })
            }
            Address::Unix(path) => Self::bind_unix(spec, path, backlog),
            Address::Systemd(name) => Err(ListenError::Bind {
                address: spec.address.clone(),
                reason: format!(
                    "no socket named `{name}` was passed by systemd (LISTEN_FDNAMES); start holdfast from its .socket unit"
                ),
            }),
        }
    }

    fn bind_unix(spec: &Listen, path: &Path, backlog: i32) -> Result<Listener, ListenError> {
        let a = &spec.address;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ListenError::Bind {
                    address: a.clone(),
                    reason: format!(
                        "{} exists and is not a socket; not removing it",
                        path.display()
                    ),
                });
            }
            // A socket file is stale only if nobody accepts on it.
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ListenError::UnixInUse {
                        address: a.clone(),
                        path: path.to_path_buf(),
                    })
                }
                Err(_) => {
                    tracing::info!(path = %path.display(), "removing stale unix socket (nothing listens on it)");
                    std::fs::remove_file(path)
                        .map_err(|e| ListenError::bind(a, "remove stale socket", e))?;
                }
            }
        }
        let s = Socket::new(Domain::UNIX, Type::STREAM, None)
            .map_err(|e| ListenError::bind(a, "socket", e))?;
        let addr = SockAddr::unix(path).map_err(|e| ListenError::bind(a, "address", e))?;
        s.bind(&addr).map_err(|e| ListenError::bind(a, "bind", e))?;
        if let Some(mode) = spec.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| ListenError::bind(a, "chmod", e))?;
        }
        s.listen(backlog)
            .map_err(|e| ListenError::bind(a, "listen", e))?;
        let inode = std::fs::metadata(path)
            .map_err(|e| ListenError::bind(a, "stat", e))?
            .ino();
        let keeper = keeper_path(path);
        let _ = std::fs::remove_file(&keeper);
        if let Err(e) = std::fs::hard_link(path, &keeper) {
            tracing::warn!(path = %path.display(), keeper = %keeper.display(), error = %e,
                "cannot keep a hard link to the socket; if a worker unlinks the path it cannot be restored");
        }
        Ok(Listener {
            name: spec.name.clone(),
            address: spec.address.clone(),
            backlog: spec.backlog,
            fd: s.into(),
            unix: Some(UnixPath {
                path: path.to_path_buf(),
                inode,
                keeper,
            }),
        })
    }

    /// Adopts an already-listening socket (socket activation, fd store).
    pub fn adopt(name: String, address: Address, backlog: u32, fd: OwnedFd) -> Listener {
        Listener {
            name,
            address,
            backlog,
            fd,
            unix: None,
        }
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// The inode of the socket (as in /proc/PID/fd links `socket:[INODE]`).
    pub fn socket_inode(&self) -> io::Result<u64> {
        nix::sys::stat::fstat(self.fd.as_fd())
            .map(|st| st.st_ino)
            .map_err(io::Error::from)
    }

    /// Restores the unix socket path if a worker unlinked it or put something
    /// else there. Returns `Ok(true)` when it had to.
    pub fn repair(&self) -> io::Result<bool> {
        let Some(u) = &self.unix else {
            return Ok(false);
        };
        match std::fs::symlink_metadata(&u.path) {
            Ok(m) if m.ino() == u.inode => return Ok(false),
            Ok(_) => std::fs::remove_file(&u.path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::hard_link(&u.keeper, &u.path)?;
        Ok(true)
    }

    /// The unix path this listener serves, if it is a unix socket bound here.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
    }
}

fn keeper_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.holdfast"))
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(u) = &self.unix {
            // Remove the path only while it is still ours.
            if std::fs::symlink_metadata(&u.path).is_ok_and(|m| m.ino() == u.inode) {
                let _ = std::fs::remove_file(&u.path);
            }
            let _ = std::fs::remove_file(&u.keeper);
        }
    }
}

/// Binds every listener of `specs`, in order.
pub fn bind_all(specs: &[Listen]) -> Result<Vec<Listener>, ListenError> {
    specs.iter().map(Listener::bind).collect()
}

/// A private unix socket for one worker's readiness probe.
pub fn bind_probe(path: &Path) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    s.bind(&SockAddr::unix(path)?)?;
    s.listen(16)?;
    Ok(s.into())
}
