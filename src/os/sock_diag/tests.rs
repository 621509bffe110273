//! The parsers on replies recorded from a real kernel (a listening unix
//! socket of backlog 7 with 2 connections waiting; an established TCP
//! connection on 127.0.0.1 and the other sockets of the host at that
//! moment), and on replies cut or corrupted.

use super::*;

/// One datagram per line, in hex, as [`dump`] returned them.
fn fixture(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(|line| {
            (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

const UNIX: &str = include_str!("../../../tests/fixtures/sock_diag/unix.hex");
const INET4: &str = include_str!("../../../tests/fixtures/sock_diag/inet4.hex");

#[test]
fn a_recorded_unix_dump_gives_each_listeners_queue() {
    let queues = parse_unix(&fixture(UNIX)).expect("parses");
    // The recording's listener (inode 3426801): 2 waiting, backlog 7.
    assert_eq!(queues.get(&3426801), Some(&(2, 7)));
    assert_eq!(queues.len(), 2, "{queues:?}");
}

#[test]
fn a_recorded_inet_dump_gives_each_sockets_address_and_state() {
    let table = parse_inet(&fixture(INET4)).expect("parses");
    assert_eq!(table.len(), 65);
    let established = 1;
    // The recording's client and the connection its listener accepted.
    assert_eq!(
        table.get(&3426807),
        Some(&("127.0.0.1:45400".parse().expect("addr"), established))
    );
    assert_eq!(
        table.get(&3426808),
        Some(&("127.0.0.1:45681".parse().expect("addr"), established))
    );
    // The dump asked for neither LISTEN nor TIME_WAIT nor SYN_RECV.
    assert!(table
        .values()
        .all(|(_, st)| ![TCP_LISTEN, 6, 3].contains(st)));
}

#[test]
fn a_cut_or_corrupt_reply_is_an_error_not_a_panic() {
    let whole = fixture(UNIX);
    // Without its last datagram (NLMSG_DONE), the dump never ends.
    assert!(parse_unix(&whole[..whole.len() - 1]).is_err());
    // A message length past the datagram's end.
    let mut long = whole.clone();
    long[0][0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert!(parse_unix(&long).is_err());
    // Every prefix of the first datagram: an error or fewer sockets, never a panic.
    for cut in 0..whole[0].len() {
        let mut d = whole.clone();
        d[0].truncate(cut);
        let _ = parse_unix(&d);
    }
    // NLMSG_ERROR carries a negative errno.
    let mut err = vec![0u8; HDR + 4];
    err[0..4].copy_from_slice(&(HDR as u32 + 4).to_ne_bytes());
    err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
    err[HDR..].copy_from_slice(&(-libc::EACCES).to_ne_bytes());
    let e = parse_inet(&[err]).expect_err("an error reply");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
}

/// The live dumps agree with the kernel on a socket of this test.
#[test]
fn a_live_unix_dump_sees_a_waiting_connection() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.sock");
    let s =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).expect("socket");
    s.bind(&socket2::SockAddr::unix(&path).expect("address"))
        .expect("bind");
    s.listen(5).expect("listen");
    let _waiting = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    let ino = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .expect("fd")
        .ino();
    let queues = unix_listen_queues().expect("sock_diag");
    assert_eq!(queues.get(&ino), Some(&(1, 5)));
}
