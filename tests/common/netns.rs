//! A network namespace of the test's own, entered by the calling thread.
//!
//! The story tests need figures the kernel keeps per network namespace:
//! `Tcp: PassiveOpens` (every TCP connection accepted, to count how many
//! upstream connections a proxy opened), `TcpExt: ListenOverflows` (exact,
//! not polluted by other tests on the host) and `net.core.somaxconn`
//! (changed without touching the host's). `unshare(CLONE_NEWNET)` moves only
//! the calling thread; everything it starts afterwards (holdfast, its
//! workers, nginx, Apache, the load's threads) inherits the namespace. A
//! libtest thread runs one test and ends, so nothing else is ever in it; the
//! namespace goes away with its last process.
//!
//! Only loopback exists in it, so a test in it can reach nothing but itself.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use nix::sched::{unshare, CloneFlags};

/// The calling thread's private network namespace, with `lo` up.
pub struct PrivateNet {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl PrivateNet {
    /// Moves the calling thread into a new network namespace and brings up
    /// `lo`. Panics if that is not possible (these tests run as root).
    pub fn enter() -> PrivateNet {
        unshare(CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET): {e} (the story tests need root)"));
        let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .find(|p| fs::metadata(p).is_ok())
            .expect("`ip` is not installed: apt-get install iproute2 (tests/run does)");
        let out = Command::new(ip)
            .args(["link", "set", "lo", "up"])
            .output()
            .expect("run ip link set lo up");
        assert!(
            out.status.success(),
            "ip link set lo up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PrivateNet {
            _not_send: std::marker::PhantomData,
        }
    }

    /// Sets this namespace's `net.core.somaxconn` (the host's is untouched).
    pub fn set_somaxconn(&self, n: u32) {
        // /proc/sys/net is resolved by the opening thread's namespace.
        fs::write("/proc/sys/net/core/somaxconn", n.to_string())
            .unwrap_or_else(|e| panic!("set net.core.somaxconn={n}: {e}"));
        assert_eq!(self.somaxconn(), n, "somaxconn in the test's namespace");
    }

    pub fn somaxconn(&self) -> u32 {
        fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("read somaxconn")
            .trim()
            .parse()
            .expect("somaxconn is a number")
    }

    /// `Tcp:` counters of /proc/net/snmp in this namespace.
    pub fn tcp(&self, name: &str) -> u64 {
        counter("snmp", "Tcp", name)
    }

    /// `TcpExt:` counters of /proc/net/netstat in this namespace.
    pub fn tcp_ext(&self, name: &str) -> u64 {
        counter("netstat", "TcpExt", name)
    }
}

/// One counter of a /proc/net table of the calling thread's namespace
/// (header line and value line, both starting with `prefix:`).
fn counter(file: &str, prefix: &str, name: &str) -> u64 {
    let path = format!("/proc/thread-self/net/{file}");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let tag = format!("{prefix}:");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(&tag)).collect();
    assert_eq!(rows.len(), 2, "{path}: two `{tag}` lines");
    let map: BTreeMap<&str, &str> = rows[0]
        .split_whitespace()
        .zip(rows[1].split_whitespace())
        .collect();
    map.get(name)
        .unwrap_or_else(|| panic!("{path}: no {prefix} counter {name}"))
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {prefix} {name}: {e}"))
}
