//! NETLINK_SOCK_DIAG (sock_diag(7)): what the kernel knows of sockets,
//! without formatting /proc/net for every one of them. Two dumps: TCP
//! sockets that are neither listening, in TIME_WAIT nor half-open (a host
//! with tens of thousands of TIME_WAIT sockets costs nothing), and the
//! accept queues of listening unix sockets.
//!
//! I/O and parsing are apart: [`dump`] sends one request and collects the
//! kernel's datagrams; [`parse_inet`] and [`parse_unix`] are pure functions
//! over those bytes, tested on replies recorded from a real kernel
//! (`tests/fixtures/sock_diag/`) and on broken ones.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::os::proc::net::{TcpTable, TCP_LISTEN};

/// The netlink message header's length (`struct nlmsghdr`).
const HDR: usize = 16;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct inet_diag_msg`'s length.
const INET_MSG: usize = 72;
/// `struct unix_diag_msg`'s length.
const UNIX_MSG: usize = 16;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;

/// TCP sockets that are not listening, in TIME_WAIT or half-open, by inode:
/// local address and state. Blocking; errors when sock_diag is unavailable
/// (the caller falls back to /proc/net/tcp).
pub(crate) fn tcp_sockets() -> io::Result<TcpTable> {
    let mut out = HashMap::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        out.extend(parse_inet(&dump(&inet_request(family))?)?);
    }
    Ok(out)
}

/// Accept queues of every listening unix socket, by inode: (queued now,
/// max), from a dump with `UDIAG_SHOW_RQLEN` (for a listening socket the
/// kernel reports its pending connections and `sk_max_ack_backlog`).
/// Blocking.
pub(crate) fn unix_listen_queues() -> io::Result<HashMap<u64, (u32, u32)>> {
    parse_unix(&dump(&unix_request())?)
}

/// `inet_diag_req_v2` for TCP of `family`: every state but LISTEN,
/// TIME_WAIT and SYN_RECV.
fn inet_request(family: i32) -> Vec<u8> {
    const TIME_WAIT: u32 = 6;
    const SYN_RECV: u32 = 3;
    let states: u32 = 0xFFF & !(1 << TIME_WAIT | 1 << SYN_RECV | 1u32 << TCP_LISTEN);
    // family, protocol, ext, pad, states, sockid (48 bytes).
    let mut req = vec![family as u8, libc::IPPROTO_TCP as u8, 0, 0];
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(&[0; 48]);
    req
}

/// `unix_diag_req` for listening sockets, with their queue lengths.
fn unix_request() -> Vec<u8> {
    // family, protocol, pad u16, states, ino, show, cookie [u32; 2].
    let mut req = vec![libc::AF_UNIX as u8, 0, 0, 0];
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&UDIAG_SHOW_RQLEN.to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]);
    req
}

/// Sends one SOCK_DIAG_BY_FAMILY dump request with `payload` (a
/// `*_diag_req`) and returns the kernel's datagrams, the last of which
/// holds NLMSG_DONE (or NLMSG_ERROR). Blocking, with a 2 s receive timeout.
pub fn dump(payload: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    use nix::sys::socket::{
        recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
        SockProtocol, SockType,
    };
    use std::os::fd::AsRawFd;
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
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a dump of a busy host ends well within this many datagrams.
    for _ in 0..100_000 {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(malformed());
        }
        let datagram = buf[..n].to_vec();
        let last = messages(&datagram, 0, |_, _| ())?;
        out.push(datagram);
        if last {
            return Ok(out);
        }
    }
    Err(malformed())
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag reply")
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    b.get(i..i + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// Walks the netlink messages of one datagram, calling `each` with every
/// reply's fixed part (`fixed` bytes) and its attributes (type, data).
/// Returns whether the dump ended here (NLMSG_DONE); an NLMSG_ERROR is its
/// errno, and a length that does not fit is an error, never a panic.
fn messages(
    datagram: &[u8],
    fixed: usize,
    mut each: impl FnMut(&[u8], Vec<(u16, &[u8])>),
) -> io::Result<bool> {
    let mut off = 0;
    while off + HDR <= datagram.len() {
        let msg = &datagram[off..];
        let len = u32_at(msg, 0).ok_or_else(malformed)? as usize;
        let kind = u16_at(msg, 4).ok_or_else(malformed)?;
        if len < HDR || len > msg.len() {
            return Err(malformed());
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(msg, HDR).ok_or_else(malformed)? as i32;
                return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
            }
            _ => {}
        }
        let body = &msg[HDR..len];
        if fixed > 0 && body.len() >= fixed {
            let mut attrs = Vec::new();
            let mut a = fixed;
            while a + 4 <= body.len() {
                let alen = usize::from(u16_at(body, a).ok_or_else(malformed)?);
                let atype = u16_at(body, a + 2).ok_or_else(malformed)?;
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
    Ok(false)
}

/// Every message of a whole dump; an error if it never ends.
fn walk(
    datagrams: &[Vec<u8>],
    fixed: usize,
    mut each: impl FnMut(&[u8], Vec<(u16, &[u8])>),
) -> io::Result<()> {
    for d in datagrams {
        if messages(d, fixed, &mut each)? {
            return Ok(());
        }
    }
    Err(malformed())
}

/// The TCP sockets of an inet dump's replies, by inode (0, a socket being
/// torn down, is left out).
#[doc(hidden)]
pub fn parse_inet(datagrams: &[Vec<u8>]) -> io::Result<TcpTable> {
    let mut out = HashMap::new();
    walk(datagrams, INET_MSG, |msg, _| {
        // inet_diag_msg: family, state, timer, retrans, sockid {sport be16,
        // dport be16, src [be32; 4], dst [be32; 4], if, cookie [u32; 2]},
        // expires, rqueue, wqueue, uid, inode.
        let (Some(head), Some(src), Some(inode)) = (msg.get(..4), msg.get(8..24), msg.get(68..72))
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
    Ok(out)
}

/// The accept queues (now, max) of a unix dump's replies, by inode.
#[doc(hidden)]
pub fn parse_unix(datagrams: &[Vec<u8>]) -> io::Result<HashMap<u64, (u32, u32)>> {
    let mut out = HashMap::new();
    walk(datagrams, UNIX_MSG, |msg, attrs| {
        // unix_diag_msg: family, type, state, pad, ino u32, cookie [u32; 2].
        let Some(ino) = u32_at(msg, 4) else { return };
        for (kind, data) in attrs {
            if let (UNIX_DIAG_RQLEN, Some(rq), Some(wq)) = (kind, u32_at(data, 0), u32_at(data, 4))
            {
                out.insert(u64::from(ino), (rq, wq));
            }
        }
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests;
