//! sd_notify(3) from the worker: READY=1, and the barrier a short-lived
//! sender needs.

use std::io;
use std::time::Duration;

use crate::Error;

/// Sends `READY=1` and `STATUS=serving` to `NOTIFY_SOCKET` (sd_notify(3));
/// nothing if it is unset. sd-notify 0.5 treats an `@` name as a path, so
/// the abstract namespace is handled here.
/// sd_notify_barrier(3): sends `BARRIER=1` with the write end of a pipe and
/// waits up to `timeout` for the manager to close it, which it does only
/// after handling every earlier message of this sender. systemd-notify does
/// this by default; a sender that exits right after `READY=1` needs it.
pub(crate) fn notify_barrier(timeout: Duration) -> Result<(), Error> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::{AsFd, AsRawFd};
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let notify_err = |source: io::Error| Error::Notify {
        socket: socket.to_string_lossy().into_owned(),
        source,
    };
    let sock = std::os::unix::net::UnixDatagram::unbound().map_err(notify_err)?;
    match socket.to_str().and_then(|s| s.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(notify_err)?;
            sock.connect_addr(&addr).map_err(notify_err)?;
        }
        None => sock.connect(&socket).map_err(notify_err)?,
    }
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| notify_err(e.into()))?;
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[io::IoSlice::new(b"BARRIER=1\n")],
        &[ControlMessage::ScmRights(&[write.as_raw_fd()])],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| notify_err(e.into()))?;
    drop(write);
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, ms) {
        Ok(0) => Err(notify_err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("BARRIER=1 not released within {timeout:?}"),
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(notify_err(e.into())),
    }
}

pub(crate) fn notify_ready() -> Result<(), Error> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let states = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ];
    let notify_err = |source| Error::Notify {
        socket: socket.to_string_lossy().into_owned(),
        source,
    };
    match socket.to_str().and_then(|s| s.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(notify_err)?;
            let sock = std::os::unix::net::UnixDatagram::unbound().map_err(notify_err)?;
            sock.connect_addr(&addr).map_err(notify_err)?;
            sock.send(b"READY=1\nSTATUS=serving\n")
                .map(drop)
                .map_err(notify_err)
        }
        None => sd_notify::notify(&states).map_err(notify_err),
    }
}
