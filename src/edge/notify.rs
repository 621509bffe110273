//! holdfast's own NOTIFY_SOCKET for its workers (sd_notify(3) protocol).
//!
//! The sender is identified by the kernel-checked credentials that come with
//! every datagram (`SO_PASSCRED` / `SCM_CREDENTIALS`), never by what the
//! message says, so a worker's descendant can report for it and nobody else
//! can.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    bind, recvmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// One datagram: who sent it, and its `KEY=VALUE` lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub pid: i32,
    pub fields: Vec<(String, String)>,
}

impl Message {}

pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// The socket file's inode: tells whether the path still leads here.
    inode: u64,
}

/// Parses the sd_notify(3) payload: newline-separated `KEY=VALUE` assignments.
pub fn parse(payload: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(payload)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl NotifySocket {
    pub fn bind(path: &Path) -> io::Result<NotifySocket> {
        let _ = std::fs::remove_file(path);
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        setsockopt(&fd, sockopt::PassCred, &true)?;
        // Workers may run as another user (e.g. after dropping privileges).
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(path)?);
        Ok(NotifySocket {
            sock: UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd))?,
            path: path.to_path_buf(),
            inode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still leads to this socket (a tmp cleaner or an
    /// `rm -r` of the run directory may have removed it: then every READY=1
    /// sent to it is lost).
    pub fn is_in_place(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.inode)
    }

    /// The socket's fd (an upgrade keeps it open across the exec).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The socket file's inode (an upgrade hands it over with the socket).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// The socket a previous image bound at `path` (non-blocking and with
    /// SO_PASSCRED already: both live on the socket, not the fd); `inode`:
    /// its socket file's, as that image saw it.
    pub fn adopt(fd: std::os::fd::OwnedFd, path: PathBuf, inode: u64) -> io::Result<NotifySocket> {
        Ok(NotifySocket {
            sock: UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd))?,
            path,
            inode,
        })
    }

    /// Waits for the next datagram.
    pub async fn recv(&self) -> io::Result<Message> {
        loop {
            self.sock.readable().await?;
            let fd = self.sock.as_fd();
            match self
                .sock
                .try_io(Interest::READABLE, || recv_one(fd).map_err(io::Error::from))
            {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => continue, // no credentials attached: ignore
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The most fds one datagram can carry (`SCM_MAX_FD`, include/net/scm.h).
const SCM_MAX_FD: usize = 253;

fn recv_one(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<Option<Message>> {
    let mut buf = vec![0u8; 4096];
    // Room for as many fds as a datagram can carry (BARRIER=1 from
    // sd_notify_barrier(3) and FDSTORE=1 carry some): with less, the kernel
    // sets MSG_CTRUNC, `cmsgs()` refuses to walk the fds it did install, and
    // they leak while the datagram and its READY=1 are lost.
    let mut cmsg = nix::cmsg_space!(libc::ucred, [std::os::fd::RawFd; SCM_MAX_FD]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let len = msg.bytes;
    let mut pid = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
            // Workers have no fd store here; closing a barrier fd releases the sender.
            ControlMessageOwned::ScmRights(fds) => {
                for fd in fds {
                    let _ = nix::unistd::close(fd);
                }
            }
            _ => {}
        }
    }
    Ok(pid.map(|pid| Message {
        pid,
        fields: parse(&buf[..len]),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_assignments() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=Gunicorn arbiter booted\n"),
            vec![
                ("READY".into(), "1".into()),
                ("STATUS".into(), "Gunicorn arbiter booted".into())
            ]
        );
    }
}
