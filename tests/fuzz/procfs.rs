//! The /proc parsers: `/proc/PID/stat`, environ (the worker serial),
//! `/proc/PID/cgroup`, mountinfo (cgroup2 mounts), children lists,
//! `smaps_rollup`, `/proc/net/{tcp,tcp6,unix,netstat}`.
//!
//! Each gets arbitrary file contents (as the readers turn the bytes into
//! text) and never panics; each also gets well-formed contents generated
//! from known values, with fields that look like the syntax (a command name
//! with `) Z 1 (`, paths with spaces and escapes), and must give the values
//! back.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use holdfast::os::proc::{self, cgroup, memory, net};
use proptest::prelude::*;

use crate::support::{ensure, fuzz};

/// Arbitrary file contents: mostly printable, with the bytes that matter to
/// these parsers (spaces, newlines, parentheses, colons, NUL, non-UTF-8).
fn contents() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        6 => proptest::char::range(' ', '~').prop_map(|c| c as u8),
        2 => prop::sample::select(b" \n\t()0:-/\\=\0".to_vec()),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..600)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ------------------------------------------------------------ stat --

/// A command name as the kernel may print it: up to 15 bytes of anything but
/// NUL (prctl(PR_SET_NAME) and exec take any bytes), lossily decoded as the
/// reader does.
fn comm() -> impl Strategy<Value = String> {
    let byte = prop_oneof![
        3 => proptest::char::range(' ', '~').prop_map(|c| c as u8),
        2 => prop::sample::select(b"() \nZS".to_vec()),
        1 => 1u8..=255,
    ];
    prop::collection::vec(byte, 0..16).prop_map(|b| text(&b))
}

#[derive(Debug, Clone)]
struct StatLine {
    pid: i32,
    comm: String,
    state: char,
    ppid: i32,
    pgrp: i32,
    session: i32,
    threads: i64,
    starttime: u64,
}

fn stat_line() -> impl Strategy<Value = StatLine> {
    (
        (
            1..=i32::MAX,
            comm(),
            prop::sample::select(vec!['R', 'S', 'D', 'Z', 'T', 't', 'X', 'I']),
        ),
        (
            0..=i32::MAX,
            0..=i32::MAX,
            0..=i32::MAX,
            1..=i64::MAX,
            any::<u64>(),
        ),
    )
        .prop_map(
            |((pid, comm, state), (ppid, pgrp, session, threads, starttime))| StatLine {
                pid,
                comm,
                state,
                ppid,
                pgrp,
                session,
                threads,
                starttime,
            },
        )
}

impl StatLine {
    fn render(&self) -> String {
        format!(
            "{} ({}) {} {} {} {} 0 -1 4194560 100 0 0 0 3 1 0 0 20 0 {} 0 {} 12345678 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n",
            self.pid, self.comm, self.state, self.ppid, self.pgrp, self.session, self.threads, self.starttime
        )
    }
}

#[test]
fn proc_stat_arbitrary() {
    fuzz("proc_stat_arbitrary", 1500, contents(), |b| {
        let _ = proc::parse_stat(&text(&b));
        Ok(())
    });
}

#[test]
fn proc_stat_round_trip() {
    fuzz("proc_stat_round_trip", 1500, stat_line(), |l| {
        let s = proc::parse_stat(&l.render());
        let got = s.as_ref().map(|s| {
            (
                s.pid,
                s.comm.as_str(),
                s.state,
                s.ppid,
                s.pgrp,
                s.session,
                s.num_threads,
                s.starttime,
            )
        });
        let want = (
            l.pid,
            l.comm.as_str(),
            l.state,
            l.ppid,
            l.pgrp,
            l.session,
            l.threads,
            l.starttime,
        );
        ensure(got == Some(want), || format!("{got:?} != {want:?}"))
    });
}

// --------------------------------------------------------- environ --

#[test]
fn proc_environ_serial() {
    // Entries of an environment block: some the serial (well formed or not),
    // some other variables, some that only look like it.
    let entry = prop_oneof![
        any::<u64>().prop_map(|n| format!("HOLDFAST_WORKER_SERIAL={n}").into_bytes()),
        "[a-zA-Z_]{0,24}=[ -~]{0,16}".prop_map(String::into_bytes),
        prop::sample::select(vec![
            b"HOLDFAST_WORKER_SERIAL=".to_vec(),
            b"HOLDFAST_WORKER_SERIALS=1".to_vec(),
            b"HOLDFAST_WORKER_SERIAL=-1".to_vec(),
            b"HOLDFAST_WORKER_SERIAL=18446744073709551616".to_vec(),
            b"HOLDFAST_WORKER_SERIAL=\xff".to_vec(),
            b"XHOLDFAST_WORKER_SERIAL=5".to_vec(),
        ]),
        prop::collection::vec(1u8..=255, 0..20),
    ];
    let block = (prop::collection::vec(entry, 0..12), any::<bool>());
    fuzz(
        "proc_environ_serial",
        1500,
        block,
        |(entries, final_nul)| {
            let mut environ = entries.join(&0u8);
            if final_nul && !environ.is_empty() {
                environ.push(0);
            }
            // getenv(3): the first entry named exactly so, its value a u64 or nothing.
            let want = entries
                .iter()
                .find_map(|e| e.strip_prefix(b"HOLDFAST_WORKER_SERIAL="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
            let got = proc::parse_serial(&environ);
            ensure(got == want, || format!("{got:?} != {want:?}"))
        },
    );
}

// ---------------------------------------------------------- cgroup --

#[test]
fn proc_cgroup_arbitrary() {
    fuzz(
        "proc_cgroup_arbitrary",
        1500,
        (contents(), contents()),
        |(a, b)| {
            let (a, b) = (text(&a), text(&b));
            if let Some(p) = cgroup::parse_cgroup_v2_path(&a) {
                ensure(!p.contains('\n'), || {
                    format!("a cgroup path with a newline: {p:?}")
                })?;
            }
            let _ = cgroup::parse_cgroup2_mounts(&a);
            let _ = cgroup::worker_serial_in(&a, &b);
            Ok(())
        },
    );
}

/// A path as it may appear in mountinfo or /proc/PID/cgroup, before escaping.
fn path() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9.@ \t\\\\\n_-]{1,8}", 0..5)
        .prop_map(|c| format!("/{}", c.join("/")))
}

/// mountinfo's escape: space, tab, newline and backslash as `\NNN`.
fn escape(p: &str) -> String {
    let mut out = String::new();
    for c in p.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[test]
fn proc_mountinfo_round_trip() {
    // (root, mount point, fs type, optional fields) per line.
    let line = (
        path(),
        path(),
        prop::sample::select(vec!["cgroup2", "cgroup", "ext4", "tmpfs", "proc"]),
        prop::collection::vec("(shared|master|propagate_from):[0-9]{1,3}", 0..3),
    );
    fuzz(
        "proc_mountinfo_round_trip",
        1500,
        prop::collection::vec(line, 0..8),
        |lines| {
            let text: String = lines
                .iter()
                .enumerate()
                .map(|(i, (root, at, fs, opt))| {
                    let opt = opt.iter().map(|o| format!("{o} ")).collect::<String>();
                    format!(
                        "{} 25 0:{i} {} {} rw,nosuid {opt}- {fs} {fs} rw\n",
                        30 + i,
                        escape(root),
                        escape(at),
                    )
                })
                .collect();
            let got = cgroup::parse_cgroup2_mounts(&text);
            let want: Vec<(String, PathBuf)> = lines
                .iter()
                .filter(|l| l.2 == "cgroup2")
                .map(|(root, at, ..)| (root.clone(), PathBuf::from(at)))
                .collect();
            let got: Vec<(String, PathBuf)> =
                got.into_iter().map(|m| (m.root, m.mount_point)).collect();
            ensure(got == want, || format!("{got:?} != {want:?}\n{text}"))
        },
    );
}

#[test]
fn proc_cgroup_dir_and_serial() {
    let mounts = prop::collection::vec((path(), path()), 0..4);
    fuzz(
        "proc_cgroup_dir_and_serial",
        1500,
        (path(), mounts, path(), any::<u64>(), path()),
        |(cg, mounts, own, serial, below)| {
            let mounts: Vec<cgroup::Cgroup2Mount> = mounts
                .into_iter()
                .map(|(root, at)| cgroup::Cgroup2Mount {
                    root,
                    mount_point: PathBuf::from(at),
                })
                .collect();
            if let Some(dir) = cgroup::cgroup_dir(&cg, &mounts) {
                ensure(
                    mounts.iter().any(|m| dir.starts_with(&m.mount_point)),
                    || format!("{dir:?} is under no mount point"),
                )?;
            }
            // A process in own/worker-N (or below it) is worker N's.
            let base = own.trim_end_matches('/');
            let inside = format!("{base}/worker-{serial}{}", below.trim_end_matches('/'));
            let got = cgroup::worker_serial_in(&own, &inside);
            ensure(got == Some(serial), || {
                format!("{own:?} {inside:?}: {got:?}")
            })?;
            // Not below `own`: no worker's.
            let outside = format!("{base}x/worker-{serial}");
            let got = cgroup::worker_serial_in(&own, &outside);
            ensure(got.is_none(), || format!("{own:?} {outside:?}: {got:?}"))
        },
    );
}

// -------------------------------------------------------- children --

#[test]
fn proc_children_list() {
    let list = prop::collection::vec(
        prop_oneof![
            4 => (1..=i32::MAX).prop_map(|p| p.to_string()),
            1 => "[-+]?[0-9]{0,12}|[ -~]{0,6}",
        ],
        0..40,
    );
    fuzz(
        "proc_children_list",
        1500,
        (list, "[ \t\n]{1,3}"),
        |(items, sep)| {
            let text = items.join(&sep);
            let got: Vec<i32> = proc::parse_children(&text).collect();
            // Only pids: a 0 or a negative number would make kill(2) signal a
            // whole process group or every process.
            ensure(got.iter().all(|&p| p > 0), || format!("{got:?}"))?;
            let want: Vec<i32> = items
                .iter()
                .flat_map(|i| i.split_whitespace())
                .filter_map(|w| w.parse::<i32>().ok())
                .filter(|&p| p > 0)
                .collect();
            ensure(got == want, || format!("{got:?} != {want:?}"))
        },
    );
}

// ---------------------------------------------------- smaps_rollup --

#[test]
fn proc_smaps_rollup() {
    let field = prop_oneof![
        4 => 0u64..(1 << 40),
        1 => any::<u64>(),
    ];
    let rollup = (
        prop::collection::vec(field, 4),
        prop::collection::vec(
            prop::sample::select(vec![
                "Pss_Dirty",
                "Shared_Clean",
                "Swap",
                "Rss_x",
                "Private",
            ]),
            0..4,
        ),
        contents(),
    );
    fuzz("proc_smaps_rollup", 1500, rollup, |(v, noise, garbage)| {
        let _ = memory::parse_smaps_rollup(&text(&garbage));
        let mut t = String::from("55d1c0a3b000-7ffc8b5f1000 ---p 00000000 00:00 0 [rollup]\n");
        for n in &noise {
            t.push_str(&format!("{n}: 999 kB\n"));
        }
        for (name, kib) in ["Rss", "Pss", "Private_Clean", "Private_Dirty"]
            .iter()
            .zip(&v)
        {
            t.push_str(&format!("{name}: {kib:>12} kB\n"));
        }
        let got = memory::parse_smaps_rollup(&t).map(|u| (u.rss, u.pss, u.uss));
        let bytes = |k: u64| k.checked_mul(1024);
        let want = (|| {
            let uss = bytes(v[2])?.checked_add(bytes(v[3])?)?;
            Some((bytes(v[0])?, Some(bytes(v[1])?), Some(uss)))
        })();
        // A figure too large for a u64 of bytes is no figure, never a wrapped one.
        ensure(got == want, || format!("{got:?} != {want:?}\n{t}"))
    });
}

// ------------------------------------------------------- /proc/net --

#[test]
fn proc_net_arbitrary() {
    fuzz("proc_net_arbitrary", 1500, contents(), |b| {
        let t = text(&b);
        let _ = net::parse_proc_net_tcp(&t);
        let _ = net::parse_proc_net_unix(&t);
        let _ = net::parse_netstat(&t);
        Ok(())
    });
}

/// /proc/net/tcp's address: each 32-bit word of the address as the
/// host-order value of its network-order bytes, the port in hex.
fn hex_addr(a: &SocketAddr) -> String {
    let words: Vec<u8> = match a.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let ip: String = words
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    format!("{ip}:{:04X}", a.port())
}

#[test]
fn proc_net_tcp_round_trip() {
    let socket = (
        any::<SocketAddr>(),
        any::<SocketAddr>(),
        1u8..=12,
        any::<u64>(),
    );
    fuzz(
        "proc_net_tcp_round_trip",
        1500,
        prop::collection::vec(socket, 0..20),
        |sockets| {
            let mut t = String::from("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n");
            for (i, (local, remote, st, inode)) in sockets.iter().enumerate() {
                t.push_str(&format!(
                    "{i:4}: {} {} {st:02X} 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0000000000000000 20 4 30 10 -1\n",
                    hex_addr(local),
                    hex_addr(remote)
                ));
            }
            let got = net::parse_proc_net_tcp(&t);
            let want: Vec<(u64, (SocketAddr, u8))> = sockets
                .iter()
                .filter(|s| s.3 != 0)
                .map(|(l, _, st, inode)| (*inode, (strip_flow(*l), *st)))
                .collect();
            ensure(got == want, || format!("{got:?} != {want:?}"))
        },
    );
}

/// The address as the table has it: no flow info or scope id.
fn strip_flow(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip(), a.port())
}

#[test]
fn proc_net_unix_round_trip() {
    let socket = (any::<u64>(), 0u8..=4, prop::option::of("/[ -~]{0,40}"));
    fuzz(
        "proc_net_unix_round_trip",
        1500,
        prop::collection::vec(socket, 0..20),
        |sockets| {
            let mut t = String::from("Num       RefCount Protocol Flags    Type St Inode Path\n");
            for (i, (inode, st, path)) in sockets.iter().enumerate() {
                t.push_str(&format!(
                    "{i:016x}: 00000002 00000000 00010000 0001 {st:02} {inode:5}"
                ));
                if let Some(p) = path {
                    t.push(' ');
                    t.push_str(p);
                }
                t.push('\n');
            }
            let got = net::parse_proc_net_unix(&t);
            let want: Vec<(u64, (String, u8))> = sockets
                .iter()
                .filter_map(|(inode, st, p)| Some((*inode, (p.clone()?, *st))))
                .collect();
            ensure(got == want, || format!("{got:?} != {want:?}\n{t}"))
        },
    );
}

#[test]
fn proc_netstat_round_trip() {
    let counters = prop::collection::vec(("[A-Z][A-Za-z]{0,12}", any::<u64>()), 0..10);
    fuzz(
        "proc_netstat_round_trip",
        1500,
        (
            counters,
            any::<u64>(),
            any::<u64>(),
            0usize..10,
            "(IpExt|MPTcpExt|TcpExtX)",
        ),
        |(others, overflows, drops, at, before)| {
            let mut pairs: Vec<(String, u64)> = others
                .into_iter()
                .filter(|(k, _)| k != "ListenOverflows" && k != "ListenDrops")
                .collect();
            let at = at.min(pairs.len());
            pairs.insert(at, ("ListenOverflows".into(), overflows));
            pairs.push(("ListenDrops".into(), drops));
            let names: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
            let values: Vec<String> = pairs.iter().map(|p| p.1.to_string()).collect();
            let t = format!(
                "{before}: InReceives\n{before}: 5\nTcpExt: {}\nTcpExt: {}\n",
                names.join(" "),
                values.join(" ")
            );
            let got = net::parse_netstat(&t);
            ensure(got == Some((overflows, drops)), || format!("{got:?}\n{t}"))
        },
    );
}
