//! The listening sockets: bound once at start-up, held for holdfast's whole
//! life, never accepted on.
//!
//! A unix socket path can be unlinked by a worker (Puma 5.6 unlinks every
//! inherited unix socket it does not bind itself), which would strand a front
//! proxy that connects by path. So holdfast keeps a hard link to every unix
//! socket inode it binds (`.NAME.holdfast` beside it) and [`Listener::repair`]
//! restores the path from it.
//!
//! A listener may also be adopted from systemd (socket activation or the fd
//! store, see `systemd`): [`inspect`] says what a passed fd really is, and
//! [`Origin`] records who owns the socket's path.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use crate::config::{Address, Listen};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("bind {address}: {reason}")]
    Bind { address: Address, reason: String },
    #[error("listen {address}: another process is already listening on {path}")]
    UnixInUse { address: Address, path: PathBuf },
    #[error("listen {address}: no socket named `{name}` was passed by systemd (LISTEN_FDNAMES); start holdfast from the .socket unit that names it with FileDescriptorName={name}")]
    NotPassed { address: Address, name: String },
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

/// Where a listening socket came from: who owns its unix path, and whether it
/// belongs in systemd's fd store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Origin {
    /// holdfast bound it.
    Bound,
    /// systemd passed it from a socket unit (or `systemd-socket-activate`)
    /// under this `LISTEN_FDNAMES` name. systemd owns the socket and its path:
    /// holdfast never unlinks that path.
    Activated { name: String },
    /// systemd handed it back from its fd store, where an earlier holdfast put it.
    Stored,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Bound => f.write_str("bound"),
            Origin::Activated { .. } => f.write_str("socket-activated"),
            Origin::Stored => f.write_str("fd-store"),
        }
    }
}

/// One listening socket holdfast owns.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// The socket's real address; for an entry written `systemd:NAME`, what
    /// the passed socket is bound to.
    pub address: Address,
    pub backlog: u32,
    pub origin: Origin,
    fd: OwnedFd,
    /// For unix sockets with a path: (path, inode, keeper hard link).
    unix: Option<UnixPath>,
    /// Leave the path and its keeper on drop (see [`Listener::keep_path`]).
    keep_path: Cell<bool>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct UnixPath {
    path: PathBuf,
    inode: u64,
    keeper: PathBuf,
}

/// A [`Listener`] as an in-place upgrade of holdfast hands it over: what it
/// is, and the fd number its socket keeps across the exec.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ListenerRecord {
    pub name: String,
    pub address: Address,
    pub backlog: u32,
    pub origin: Origin,
    pub fd: i32,
    unix: Option<UnixPath>,
    keep_path: bool,
}

impl ListenerRecord {
    /// Whether the previous image would have left the path on exit.
    pub fn keeps_path(&self) -> bool {
        self.keep_path
    }
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
                    origin: Origin::Bound,
                    fd: s.into(),
                    unix: None,
                    keep_path: Cell::new(false),
                })
            }
            Address::Unix(path) => Self::bind_unix(spec, path, backlog),
            Address::Systemd(name) => Err(ListenError::NotPassed {
                address: spec.address.clone(),
                name: name.clone(),
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
            origin: Origin::Bound,
            fd: s.into(),
            unix: Some(UnixPath {
                path: path.to_path_buf(),
                inode,
                keeper,
            }),
            keep_path: Cell::new(false),
        })
    }

    /// Adopts an already-listening socket for `spec` (socket activation, fd
    /// store); `local` is its real address (see [`inspect`]), which the
    /// caller has checked against the entry. Takes ownership of `fd`.
    ///
    /// A unix socket's path gets a keeper hard link like a bound one, so
    /// [`Listener::repair`] works; if the path is gone but a keeper left by an
    /// earlier holdfast is there, the path is restored from it. A socket from
    /// the fd store was holdfast's own: it is given the entry's `backlog`
    /// again. A socket-activated one keeps the unit's `Backlog=`.
    pub(crate) fn adopt(spec: &Listen, local: Address, fd: OwnedFd, origin: Origin) -> Listener {
        if origin == Origin::Stored {
            let backlog = i32::try_from(spec.backlog).unwrap_or(i32::MAX);
            if let Err(e) = SockRef::from(&fd).listen(backlog) {
                tracing::warn!(address = %local, backlog = spec.backlog, error = %e, "cannot apply the configured backlog to the stored socket");
            }
        }
        let unix = match &local {
            Address::Unix(path) => adopt_path(path),
            _ => None,
        };
        let l = Listener {
            name: spec.name.clone(),
            address: local,
            backlog: spec.backlog,
            origin,
            fd,
            unix,
            keep_path: Cell::new(false),
        };
        match l.repair() {
            Ok(true) => {
                tracing::info!(address = %l.address, "restored the unix socket path from its keeper link")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(address = %l.address, error = %e, "cannot restore the unix socket path")
            }
        }
        l
    }

    /// What an upgrade hands over (the socket itself stays open at `fd`).
    pub fn record(&self) -> ListenerRecord {
        ListenerRecord {
            name: self.name.clone(),
            address: self.address.clone(),
            backlog: self.backlog,
            origin: self.origin.clone(),
            fd: self.fd.as_raw_fd(),
            unix: self.unix.clone(),
            keep_path: self.keep_path.get(),
        }
    }

    /// The listener a previous image handed over, its socket `fd` (taken
    /// from the record's fd number): nothing is bound, listened or linked
    /// again. It must be a listening socket (the error names what it is
    /// instead).
    pub fn from_record(r: ListenerRecord, fd: OwnedFd) -> io::Result<Listener> {
        let facts = inspect(fd.as_fd())?;
        if !facts.listening {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "listener {} ({}): fd {} is {}",
                    r.name, r.address, r.fd, facts.description
                ),
            ));
        }
        Ok(Listener {
            name: r.name,
            address: r.address,
            backlog: r.backlog,
            origin: r.origin,
            fd,
            unix: r.unix,
            keep_path: Cell::new(r.keep_path),
        })
    }

    /// Whether this listener is the one a config entry at `address` means: the
    /// same address, or `systemd:NAME` for a socket systemd passed as NAME.
    pub fn serves(&self, address: &Address) -> bool {
        match (address, &self.origin) {
            (Address::Systemd(want), Origin::Activated { name }) => want == name,
            _ => self.address == *address,
        }
    }

    /// Leaves the unix path (and its keeper link) in place when this listener
    /// is dropped: the socket lives on in systemd's fd store, and the next
    /// holdfast adopts it by that path.
    pub(crate) fn keep_path(&self) {
        self.keep_path.set(true);
    }

    /// Sets whether the path is left on drop (an adoption keeps it while it
    /// may still fail, then restores what the previous image had).
    pub(crate) fn set_keep_path(&self, keep: bool) {
        self.keep_path.set(keep);
    }

    pub(crate) fn raw_fd(&self) -> i32 {
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
    pub(crate) fn repair(&self) -> io::Result<bool> {
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
}

fn keeper_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.holdfast"))
}

/// Path bookkeeping for an adopted unix socket bound to `path`: the path's
/// inode if it is a socket, else the keeper's (an earlier holdfast's link).
fn adopt_path(path: &Path) -> Option<UnixPath> {
    let socket_inode = |p: &Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| m.ino())
    };
    let keeper = keeper_path(path);
    match (socket_inode(path), socket_inode(&keeper)) {
        (Some(inode), kept) => {
            if kept != Some(inode) {
                let _ = std::fs::remove_file(&keeper);
                if let Err(e) = std::fs::hard_link(path, &keeper) {
                    tracing::debug!(path = %path.display(), keeper = %keeper.display(), error = %e,
                        "cannot keep a hard link to the adopted socket; if a worker unlinks the path it cannot be restored");
                }
            }
            Some(UnixPath {
                path: path.to_path_buf(),
                inode,
                keeper,
            })
        }
        (None, Some(inode)) => Some(UnixPath {
            path: path.to_path_buf(),
            inode,
            keeper,
        }),
        (None, None) => {
            tracing::warn!(path = %path.display(),
                "the adopted unix socket's path is gone and there is no keeper link to restore it from: clients that connect by path are refused until holdfast binds it anew");
            None
        }
    }
}

/// What a passed fd really is, from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketFacts {
    /// `AF_INET`, `AF_INET6`, `AF_UNIX`, ...
    pub domain: Domain,
    pub stream: bool,
    /// `SO_ACCEPTCONN`: `listen()` was called on it.
    pub listening: bool,
    /// The local address, when it is one a config entry can name (TCP, or a
    /// unix socket with a path).
    pub local: Option<Address>,
    /// For messages: e.g. "a listening TCP socket on 127.0.0.1:8080".
    pub description: String,
}

/// Looks at `fd`: family, type, listening, local address. An fd that is not
/// a socket is an error whose message says what it is.
pub(crate) fn inspect(fd: BorrowedFd<'_>) -> io::Result<SocketFacts> {
    let s = SockRef::from(&fd);
    let ty = match s.r#type() {
        Ok(t) => t,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            let what = match nix::sys::stat::fstat(fd).map(|st| st.st_mode & libc::S_IFMT) {
                Ok(libc::S_IFIFO) => "a FIFO",
                Ok(libc::S_IFREG) => "a regular file",
                Ok(libc::S_IFCHR) => "a character device",
                Ok(libc::S_IFDIR) => "a directory",
                _ => "not a socket",
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("it is {what}, not a socket"),
            ));
        }
        Err(e) => return Err(e),
    };
    let domain = s.domain()?;
    let listening = s.is_listener()?;
    let stream = ty == Type::STREAM;
    let addr = s.local_addr()?;
    let (local, at) = if let Some(a) = addr.as_socket() {
        (Some(Address::Tcp(a)), a.to_string())
    } else if let Some(p) = addr.as_pathname() {
        (
            Some(Address::Unix(p.to_path_buf())),
            p.display().to_string(),
        )
    } else if let Some(name) = addr.as_abstract_namespace() {
        (None, format!("@{}", String::from_utf8_lossy(name)))
    } else {
        (None, "no address".to_string())
    };
    let what = match (domain, ty) {
        (Domain::IPV4 | Domain::IPV6, Type::STREAM) => "TCP",
        (Domain::IPV4 | Domain::IPV6, Type::DGRAM) => "UDP",
        (Domain::UNIX, Type::STREAM) => "unix stream",
        (Domain::UNIX, Type::DGRAM) => "unix datagram",
        (Domain::UNIX, Type::SEQPACKET) => "unix seqpacket",
        _ => "non-TCP, non-unix",
    };
    let state = if listening {
        "listening"
    } else {
        "non-listening"
    };
    let description = format!("a {state} {what} socket on {at}");
    Ok(SocketFacts {
        domain,
        stream,
        listening,
        local,
        description,
    })
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.keep_path.get() {
            return;
        }
        if let Some(u) = &self.unix {
            // systemd owns a socket-activated path; only the keeper is ours.
            let owned = !matches!(self.origin, Origin::Activated { .. });
            // Remove the path only while it is still ours.
            if owned && std::fs::symlink_metadata(&u.path).is_ok_and(|m| m.ino() == u.inode) {
                let _ = std::fs::remove_file(&u.path);
            }
            let _ = std::fs::remove_file(&u.keeper);
        }
    }
}

/// A private unix socket for one worker's readiness probe.
pub(crate) fn bind_probe(path: &Path) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    s.bind(&SockAddr::unix(path)?)?;
    s.listen(16)?;
    Ok(s.into())
}
