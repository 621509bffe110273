//! The workers' NOTIFY_SOCKET: the payload parser (`parse`) on arbitrary
//! datagrams, and the receive path (`NotifySocket::recv`) on real datagrams
//! sent to holdfast's own socket, with and without explicit
//! `SCM_CREDENTIALS` and with `SCM_RIGHTS` carrying 0 to 253 fds (the
//! kernel's most): every datagram is received with the sender's pid and
//! its fields, every fd it carried is closed (none leaks into holdfast), and
//! the socket keeps working.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use holdfast::fuzzing::{parse_notify, NotifySocket};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr, UnixCredentials};
use proptest::prelude::*;

use crate::support::{ensure, fuzz};

/// The receive buffer of `NotifySocket`: a longer datagram is cut there.
const RECV_BUFFER: usize = 4096;

fn payload() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        4 => ("[A-Z_]{1,20}", "[ -~]{0,40}").prop_map(|(k, v)| format!("{k}={v}").into_bytes()),
        2 => prop::sample::select(vec![
            b"READY=1".to_vec(),
            b"STOPPING=1".to_vec(),
            b"BARRIER=1".to_vec(),
            b"FDSTORE=1".to_vec(),
            b"STATUS=".to_vec(),
            b"=1".to_vec(),
            b"READY".to_vec(),
            b"READY=1\r".to_vec(),
            b"READY==1".to_vec(),
            b"MAINPID=-1".to_vec(),
            b"WATCHDOG_USEC=99999999999999999999999".to_vec(),
        ]),
        1 => prop::collection::vec(any::<u8>(), 0..40),
    ];
    prop_oneof![
        6 => prop::collection::vec(line, 0..10).prop_map(|l| l.join(&b'\n')),
        1 => prop::collection::vec(any::<u8>(), 0..300),
        1 => (0usize..6000, any::<u8>()).prop_map(|(n, b)| {
            let mut v = b"READY=1\nSTATUS=".to_vec();
            v.resize(n.max(v.len()), b.max(b' '));
            v
        }),
    ]
}

#[test]
fn notify_parse() {
    fuzz("notify_parse", 5000, payload(), |p| {
        let fields = parse_notify(&p);
        for (k, v) in &fields {
            ensure(!k.contains('\n') && !k.contains('='), || {
                format!("key {k:?}")
            })?;
            ensure(!v.contains('\n'), || format!("value {v:?}"))?;
        }
        // A line READY=1 is seen whatever the other lines hold.
        if p.split(|&b| b == b'\n').any(|l| l == b"READY=1") {
            ensure(fields.iter().any(|(k, v)| k == "READY" && v == "1"), || {
                format!("READY=1 missed: {fields:?}")
            })?;
        }
        Ok(())
    });
}

#[test]
fn notify_parse_round_trip() {
    let fields = prop::collection::vec(("[A-Z_]{1,20}", "[ -~]{0,40}"), 0..10);
    fuzz("notify_parse_round_trip", 3000, fields, |fields| {
        let text: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let got = parse_notify(text.join("\n").as_bytes());
        ensure(got == fields, || format!("{got:?} != {fields:?}"))
    });
}

/// Who the datagram says it is from, on top of what the kernel attaches.
#[derive(Debug, Clone, Copy)]
enum Creds {
    /// None: the kernel attaches the sender's own (SO_PASSCRED).
    Implicit,
    /// SCM_CREDENTIALS with the sender's own pid, uid and gid.
    Own,
    /// SCM_CREDENTIALS naming pid 1: allowed with CAP_SYS_ADMIN (the tests
    /// run as root); the kernel checks it, holdfast takes it as given.
    Other,
}

#[derive(Debug, Clone)]
struct Datagram {
    payload: Vec<u8>,
    creds: Creds,
    /// How many copies of one pipe's write end it carries.
    fds: usize,
}

fn datagram() -> impl Strategy<Value = Datagram> {
    let creds = prop::sample::select(vec![Creds::Implicit, Creds::Own, Creds::Other]);
    let fds = prop_oneof![
        4 => Just(0usize),
        4 => 1usize..=16,
        2 => 17usize..=64,
        1 => Just(253usize),
    ];
    (payload(), creds, fds).prop_map(|(payload, creds, fds)| Datagram {
        payload,
        creds,
        fds,
    })
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK).expect("pipe")
}

/// Whether every copy of the pipe's write end is closed: its read end sees
/// EOF (0) rather than EAGAIN.
fn all_writers_closed(read: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    matches!(nix::unistd::read(read, &mut b), Ok(0))
}

fn send(to: &std::path::Path, d: &Datagram, write_end: RawFd) -> nix::Result<usize> {
    let sender = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    let addr = UnixAddr::new(to)?;
    let fds = vec![write_end; d.fds];
    let own = UnixCredentials::new();
    let other = UnixCredentials::from(libc::ucred {
        pid: 1,
        uid: own.uid(),
        gid: own.gid(),
    });
    let mut cmsgs = Vec::new();
    match d.creds {
        Creds::Implicit => {}
        Creds::Own => cmsgs.push(ControlMessage::ScmCredentials(&own)),
        Creds::Other => cmsgs.push(ControlMessage::ScmCredentials(&other)),
    }
    if !fds.is_empty() {
        cmsgs.push(ControlMessage::ScmRights(&fds));
    }
    sendmsg(
        sender.as_fd().as_raw_fd(),
        &[IoSlice::new(&d.payload)],
        &cmsgs,
        MsgFlags::empty(),
        Some(&addr),
    )
}

#[test]
fn notify_receive_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let path = dir.path().join("notify.sock");
    let sock = rt
        .block_on(async { NotifySocket::bind(&path) })
        .expect("bind");
    let me = std::process::id() as i32;
    fuzz(
        "notify_receive_path",
        400,
        prop::collection::vec(datagram(), 1..4),
        |datagrams| {
            for d in &datagrams {
                let (read, write) = pipe();
                let sent = send(&path, d, write.as_raw_fd());
                drop(write);
                let sent = match sent {
                    Ok(n) => n,
                    // Longer than the socket's buffer (EMSGSIZE, not here at 6 KB).
                    Err(e) => {
                        return Err(proptest::test_runner::TestCaseError::fail(format!(
                            "send: {e}"
                        )))
                    }
                };
                ensure(sent == d.payload.len(), || {
                    format!("sent {sent} of {}", d.payload.len())
                })?;
                let got = rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(5), sock.recv()).await
                });
                let got = match got {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        return Err(proptest::test_runner::TestCaseError::fail(format!(
                            "recv failed: {e} (the datagram and its READY=1 are lost)"
                        )))
                    }
                    Err(_) => {
                        return Err(proptest::test_runner::TestCaseError::fail(
                            "no datagram within 5s",
                        ))
                    }
                };
                let pid = match d.creds {
                    Creds::Other => 1,
                    _ => me,
                };
                ensure(got.pid == pid, || format!("pid {} != {pid}", got.pid))?;
                let want = parse_notify(&d.payload[..d.payload.len().min(RECV_BUFFER)]);
                ensure(got.fields == want, || {
                    format!("{:?} != {want:?}", got.fields)
                })?;
                ensure(all_writers_closed(&read), || {
                    format!("{} fd(s) sent, and a copy is still open in holdfast", d.fds)
                })?;
            }
            Ok(())
        },
    );
}

/// Found by `notify_receive_path`: a datagram with 17 fds (any over 16)
/// was lost with its READY=1 (`recv` failed with ENOBUFS: the control
/// buffer had room for 16, the kernel cut the rest and set MSG_CTRUNC, and
/// nix refuses to walk a cut buffer), and the 16 fds the kernel had already
/// installed in holdfast leaked, on every such datagram.
#[test]
fn a_datagram_with_more_than_16_fds_is_received_and_its_fds_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let path = dir.path().join("notify.sock");
    let sock = rt
        .block_on(async { NotifySocket::bind(&path) })
        .expect("bind");
    for fds in [17, 253] {
        let (read, write) = pipe();
        let d = Datagram {
            payload: b"READY=1".to_vec(),
            creds: Creds::Implicit,
            fds,
        };
        send(&path, &d, write.as_raw_fd()).expect("send");
        drop(write);
        let m = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), sock.recv()).await })
            .expect("a datagram within 5s")
            .unwrap_or_else(|e| panic!("{fds} fds: recv: {e}"));
        assert_eq!(m.fields, vec![("READY".to_string(), "1".to_string())]);
        assert!(all_writers_closed(&read), "{fds} fds: a copy leaked");
    }
}
