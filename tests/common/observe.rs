//! What tests look at and how they wait: problems gathered and reported
//! together, polling with a deadline instead of sleeping, and the sockets a
//! process holds (from /proc).

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

/// How often [`poll`] asks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Everything wrong a test saw, reported together at the end.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// Records `what()` unless `ok`; returns `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.0.push(what());
        }
        ok
    }

    pub fn push(&mut self, what: String) {
        self.0.push(what);
    }

    /// The value, or `None` with the error recorded.
    pub fn note<T>(&mut self, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    pub fn assert_none(&self) {
        assert!(
            self.0.is_empty(),
            "{} problem(s):\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

/// Calls `cond` every [`POLL`] until it returns `Ok`; after `deadline`, the
/// last `Err` (prefixed with the time waited).
pub fn poll<T>(
    deadline: Duration,
    mut cond: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match cond() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= deadline => {
                return Err(format!("after {deadline:?}: {e}"))
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Socket inodes `pid` holds open.
pub fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let link = fs::read_link(e.path()).ok()?;
                    link.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Inodes of the established TCP connections to local `port` (IPv4 and
/// IPv6, from /proc/net/tcp{,6} of this network namespace).
pub fn established_inodes(port: u16) -> BTreeSet<u64> {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let c: Vec<&str> = l.split_whitespace().collect();
                    (c.len() > 9 && c[1].ends_with(&local) && c[3] == "01")
                        .then(|| c[9].parse().ok())?
                })
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// Established TCP connections to local `port` that `pid` holds.
pub fn established_on(pid: u32, port: u16) -> usize {
    socket_inodes(pid)
        .intersection(&established_inodes(port))
        .count()
}
