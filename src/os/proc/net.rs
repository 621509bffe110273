//! The network tables of /proc: TCP and unix sockets by inode
//! (`/proc/net/tcp`, `tcp6`, `unix`; proc_net_tcp(5), unix(7)) and the
//! kernel's listen-queue drop counters (`/proc/net/netstat`). The status
//! path reads them; TCP comes from sock_diag first (see
//! [`crate::os::sock_diag`]), these files are its fallback.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A TCP socket from /proc/net/tcp{,6}: local address and state.
pub type TcpTable = HashMap<u64, (SocketAddr, u8)>;
/// A unix socket from /proc/net/unix: bound path and state.
pub type UnixTable = HashMap<u64, (String, u8)>;

pub(crate) const TCP_LISTEN: u8 = 0x0A;
/// `SS_CONNECTED` in /proc/net/unix's `St` column.
pub(crate) const UNIX_CONNECTED: u8 = 3;

/// TCP sockets that are not listening, in TIME_WAIT or half-open, from an
/// INET_DIAG dump: the kernel skips the others, so a host with tens of
/// thousands of TIME_WAIT sockets costs nothing (formatting /proc/net/tcp for
/// them takes seconds). Falls back to /proc/net/tcp{,6}.
pub(crate) fn tcp_sockets() -> TcpTable {
    match crate::os::sock_diag::tcp_sockets() {
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

/// Parses /proc/net/tcp or tcp6 (proc_net_tcp(5)); inode 0 (TIME_WAIT) is skipped.
#[doc(hidden)]
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

/// Sockets with a path from /proc/net/unix, by inode; empty when unreadable.
#[doc(hidden)]
pub fn unix_sockets() -> UnixTable {
    crate::os::proc::read_text("/proc/net/unix")
        .map(|t| parse_proc_net_unix(&t).into_iter().collect())
        .unwrap_or_default()
}

/// Parses /proc/net/unix (unix(7)): sockets with a path, by inode.
#[doc(hidden)]
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

/// `ListenOverflows` and `ListenDrops` from /proc/net/netstat (for every socket of holdfast's network namespace).
pub(crate) fn listen_counters() -> Option<(u64, u64)> {
    parse_netstat(&std::fs::read_to_string("/proc/net/netstat").ok()?)
}

#[doc(hidden)]
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

    /// One unix socket anywhere on the host bound to a path that is not
    /// UTF-8 made /proc/net/unix unreadable as a whole, and every unix
    /// listener's connection count vanished from `holdfast status`.
    #[test]
    fn a_socket_path_that_is_not_utf8_hides_no_other_socket() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"\xff.sock"));
        let plain = dir.path().join("plain.sock");
        let _odd = std::os::unix::net::UnixListener::bind(&odd).expect("bind odd");
        let plain_listener = std::os::unix::net::UnixListener::bind(&plain).expect("bind");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&plain_listener);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .expect("fd")
            .ino();
        let table = unix_sockets();
        assert_eq!(
            table.get(&inode).map(|(p, _)| p.as_str()),
            plain.to_str(),
            "{} sockets",
            table.len()
        );
    }

    #[test]
    fn parses_netstat() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_netstat(netstat), Some((7, 9)));
        assert_eq!(parse_netstat("IpExt: A\nIpExt: 1\n"), None);
    }
}
