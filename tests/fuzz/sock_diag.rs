//! sock_diag's pure parsers (`parse_inet`, `parse_unix`) on netlink replies:
//! dumps generated from known sockets must give them back, split into
//! datagrams any way, with foreign attributes in between; the same dumps
//! and the replies recorded from a real kernel, with lengths, types and
//! bytes corrupted and datagrams cut, dropped or repeated, and arbitrary
//! bytes, must never panic or hang.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use holdfast::os::sock_diag::{parse_inet, parse_unix};
use proptest::prelude::*;

use crate::support::{ensure, fuzz};

const HDR: usize = 16;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;

/// One netlink message: header, then `body`, padded to 4 bytes.
fn message(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR + body.len() + 3);
    m.extend_from_slice(&((HDR + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    while m.len() % 4 != 0 {
        m.push(0);
    }
    m
}

/// One attribute (`struct nlattr`), padded to 4 bytes.
fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(data);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

/// Messages into datagrams: `cuts` picks where one datagram ends; the
/// last one ends with NLMSG_DONE.
fn datagrams(messages: Vec<Vec<u8>>, cuts: &[bool]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    for (i, m) in messages.into_iter().enumerate() {
        if cuts.get(i).copied().unwrap_or(false) && !out.last().is_some_and(Vec::is_empty) {
            out.push(Vec::new());
        }
        out.last_mut().expect("one").extend_from_slice(&m);
    }
    out.last_mut()
        .expect("one")
        .extend_from_slice(&message(NLMSG_DONE, &0i32.to_ne_bytes()));
    out
}

/// A foreign attribute (type other than the one parsed).
fn foreign() -> impl Strategy<Value = Vec<u8>> {
    (
        // Any type but RQLEN's (no filter: rejects would count against the run).
        (0u16..15).prop_map(|t| if t >= UNIX_DIAG_RQLEN { t + 1 } else { t }),
        prop::collection::vec(any::<u8>(), 0..12),
    )
        .prop_map(|(t, d)| attr(t, &d))
}

#[derive(Debug, Clone)]
struct UnixSock {
    ino: u32,
    queues: Option<(u32, u32)>,
    before: Vec<Vec<u8>>,
    after: Vec<Vec<u8>>,
}

fn unix_sock() -> impl Strategy<Value = UnixSock> {
    (
        any::<u32>(),
        prop::option::of(any::<(u32, u32)>()),
        prop::collection::vec(foreign(), 0..3),
        prop::collection::vec(foreign(), 0..3),
    )
        .prop_map(|(ino, queues, before, after)| UnixSock {
            ino,
            queues,
            before,
            after,
        })
}

fn unix_dump() -> impl Strategy<Value = (Vec<UnixSock>, Vec<bool>)> {
    (
        prop::collection::vec(unix_sock(), 0..12),
        prop::collection::vec(any::<bool>(), 12),
    )
}

fn unix_messages(socks: &[UnixSock]) -> Vec<Vec<u8>> {
    socks
        .iter()
        .map(|s| {
            // unix_diag_msg: family, type, state, pad, ino, cookie.
            let mut body = vec![libc::AF_UNIX as u8, 1, 10, 0];
            body.extend_from_slice(&s.ino.to_ne_bytes());
            body.extend_from_slice(&[0xab; 8]);
            for a in &s.before {
                body.extend_from_slice(a);
            }
            if let Some((rq, wq)) = s.queues {
                let mut d = rq.to_ne_bytes().to_vec();
                d.extend_from_slice(&wq.to_ne_bytes());
                body.extend_from_slice(&attr(UNIX_DIAG_RQLEN, &d));
            }
            for a in &s.after {
                body.extend_from_slice(a);
            }
            message(SOCK_DIAG_BY_FAMILY, &body)
        })
        .collect()
}

#[test]
fn sock_diag_unix_dump_round_trip() {
    fuzz(
        "sock_diag_unix_dump_round_trip",
        1500,
        unix_dump(),
        |(socks, cuts)| {
            let got = parse_unix(&datagrams(unix_messages(&socks), &cuts));
            let mut want = HashMap::new();
            for s in &socks {
                if let Some(q) = s.queues {
                    want.insert(u64::from(s.ino), q);
                }
            }
            ensure(got.as_ref().ok() == Some(&want), || {
                format!("{got:?} != {want:?}")
            })
        },
    );
}

#[derive(Debug, Clone)]
struct InetSock {
    v4: bool,
    state: u8,
    src: [u8; 16],
    port: u16,
    inode: u32,
    tail: Vec<Vec<u8>>,
}

fn inet_dump() -> impl Strategy<Value = (Vec<InetSock>, Vec<bool>)> {
    let sock = (
        any::<bool>(),
        1u8..=12,
        any::<[u8; 16]>(),
        any::<u16>(),
        any::<u32>(),
        prop::collection::vec(foreign(), 0..2),
    )
        .prop_map(|(v4, state, src, port, inode, tail)| InetSock {
            v4,
            state,
            src,
            port,
            inode,
            tail,
        });
    (
        prop::collection::vec(sock, 0..12),
        prop::collection::vec(any::<bool>(), 12),
    )
}

fn inet_messages(socks: &[InetSock]) -> Vec<Vec<u8>> {
    socks
        .iter()
        .map(|s| {
            let family = if s.v4 { libc::AF_INET } else { libc::AF_INET6 };
            let mut body = vec![0u8; 72];
            body[0] = family as u8;
            body[1] = s.state;
            body[4..6].copy_from_slice(&s.port.to_be_bytes());
            body[6..8].copy_from_slice(&443u16.to_be_bytes());
            body[8..24].copy_from_slice(&s.src);
            body[24..40].copy_from_slice(&[0x11; 16]);
            body[68..72].copy_from_slice(&s.inode.to_ne_bytes());
            for a in &s.tail {
                body.extend_from_slice(a);
            }
            message(SOCK_DIAG_BY_FAMILY, &body)
        })
        .collect()
}

#[test]
fn sock_diag_inet_dump_round_trip() {
    fuzz(
        "sock_diag_inet_dump_round_trip",
        1500,
        inet_dump(),
        |(socks, cuts)| {
            let got = parse_inet(&datagrams(inet_messages(&socks), &cuts));
            let mut want = HashMap::new();
            for s in socks.iter().filter(|s| s.inode != 0) {
                let ip = if s.v4 {
                    IpAddr::V4(Ipv4Addr::new(s.src[0], s.src[1], s.src[2], s.src[3]))
                } else {
                    IpAddr::V6(Ipv6Addr::from(s.src))
                };
                want.insert(u64::from(s.inode), (SocketAddr::new(ip, s.port), s.state));
            }
            ensure(got.as_ref().ok() == Some(&want), || {
                format!("{got:?} != {want:?}")
            })
        },
    );
}

/// One corruption of a dump.
#[derive(Debug, Clone)]
enum Corrupt {
    /// A u32 (a message length, an inode, ...) at an offset of a datagram.
    U32 {
        datagram: usize,
        at: usize,
        value: u32,
    },
    /// A u16 (an attribute's length or type, a message type).
    U16 {
        datagram: usize,
        at: usize,
        value: u16,
    },
    Byte {
        datagram: usize,
        at: usize,
        value: u8,
    },
    Cut {
        datagram: usize,
        at: usize,
    },
    Drop {
        datagram: usize,
    },
    Repeat {
        datagram: usize,
    },
    Insert {
        datagram: usize,
        at: usize,
        bytes: Vec<u8>,
    },
}

fn corrupt() -> impl Strategy<Value = Corrupt> {
    let d = 0usize..8;
    let at = 0usize..2048;
    let u32s = prop_oneof![
        Just(0u32),
        Just(3),
        Just(15),
        Just(16),
        Just(17),
        Just(20),
        Just(88),
        Just(0x7fff_ffff),
        Just(u32::MAX),
        any::<u32>(),
    ];
    let u16s = prop_oneof![
        Just(0u16),
        Just(2),
        Just(3),
        Just(4),
        Just(5),
        Just(12),
        Just(u16::MAX),
        any::<u16>()
    ];
    prop_oneof![
        (d.clone(), at.clone(), u32s).prop_map(|(datagram, at, value)| Corrupt::U32 {
            datagram,
            at,
            value
        }),
        (d.clone(), at.clone(), u16s).prop_map(|(datagram, at, value)| Corrupt::U16 {
            datagram,
            at,
            value
        }),
        (d.clone(), at.clone(), any::<u8>()).prop_map(|(datagram, at, value)| Corrupt::Byte {
            datagram,
            at,
            value
        }),
        (d.clone(), at.clone()).prop_map(|(datagram, at)| Corrupt::Cut { datagram, at }),
        d.clone().prop_map(|datagram| Corrupt::Drop { datagram }),
        d.clone().prop_map(|datagram| Corrupt::Repeat { datagram }),
        (d, at, prop::collection::vec(any::<u8>(), 1..40)).prop_map(|(datagram, at, bytes)| {
            Corrupt::Insert {
                datagram,
                at,
                bytes,
            }
        }),
    ]
}

fn apply(dump: &mut Vec<Vec<u8>>, c: &Corrupt) {
    if dump.is_empty() {
        return;
    }
    let n = dump.len();
    let pick = |d: usize| d % n;
    match c {
        Corrupt::U32 {
            datagram,
            at,
            value,
        } => {
            let d = &mut dump[pick(*datagram)];
            if d.len() >= 4 {
                let at = at % (d.len() - 3);
                d[at..at + 4].copy_from_slice(&value.to_ne_bytes());
            }
        }
        Corrupt::U16 {
            datagram,
            at,
            value,
        } => {
            let d = &mut dump[pick(*datagram)];
            if d.len() >= 2 {
                let at = at % (d.len() - 1);
                d[at..at + 2].copy_from_slice(&value.to_ne_bytes());
            }
        }
        Corrupt::Byte {
            datagram,
            at,
            value,
        } => {
            let d = &mut dump[pick(*datagram)];
            if !d.is_empty() {
                let at = at % d.len();
                d[at] = *value;
            }
        }
        Corrupt::Cut { datagram, at } => {
            let d = &mut dump[pick(*datagram)];
            let at = at % (d.len() + 1);
            d.truncate(at);
        }
        Corrupt::Drop { datagram } => {
            dump.remove(pick(*datagram));
        }
        Corrupt::Repeat { datagram } => {
            let d = dump[pick(*datagram)].clone();
            dump.insert(pick(*datagram), d);
        }
        Corrupt::Insert {
            datagram,
            at,
            bytes,
        } => {
            let d = &mut dump[pick(*datagram)];
            let at = at % (d.len() + 1);
            d.splice(at..at, bytes.iter().copied());
        }
    }
}

/// The recorded replies, as `src/os/sock_diag/tests.rs` reads them.
fn fixture(name: &str) -> Vec<Vec<u8>> {
    let path = format!(
        "{}/tests/fixtures/sock_diag/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(|line| {
            (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Base {
    Unix(Vec<UnixSock>, Vec<bool>),
    Inet(Vec<InetSock>, Vec<bool>),
    RecordedUnix,
    RecordedInet,
    Arbitrary(Vec<Vec<u8>>),
}

#[test]
fn sock_diag_corrupt_replies() {
    let base = prop_oneof![
        unix_dump().prop_map(|(s, c)| Base::Unix(s, c)),
        inet_dump().prop_map(|(s, c)| Base::Inet(s, c)),
        Just(Base::RecordedUnix),
        Just(Base::RecordedInet),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..4)
            .prop_map(Base::Arbitrary),
    ];
    let (unix, inet) = (fixture("unix.hex"), fixture("inet4.hex"));
    fuzz(
        "sock_diag_corrupt_replies",
        10000,
        (base, prop::collection::vec(corrupt(), 0..6)),
        |(base, corruptions)| {
            let mut dump = match base {
                Base::Unix(s, c) => datagrams(unix_messages(&s), &c),
                Base::Inet(s, c) => datagrams(inet_messages(&s), &c),
                Base::RecordedUnix => unix.clone(),
                Base::RecordedInet => inet.clone(),
                Base::Arbitrary(d) => d,
            };
            for c in &corruptions {
                apply(&mut dump, c);
            }
            // Either parser on either dump: an answer or an error, no panic.
            let total: usize = dump.iter().map(Vec::len).sum();
            if let Ok(t) = parse_unix(&dump) {
                // Each socket is a message of its own: at least 32 bytes.
                ensure(t.len() * 32 <= total, || {
                    format!("{} sockets from {total} bytes", t.len())
                })?;
            }
            if let Ok(t) = parse_inet(&dump) {
                ensure(t.len() * 88 <= total, || {
                    format!("{} sockets from {total} bytes", t.len())
                })?;
            }
            Ok(())
        },
    );
}
