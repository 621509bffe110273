//! Memory of worker process trees, read from /proc.
//!
//! One sampling round walks each worker's tree down its
//! `/proc/PID/task/TID/children` files (so its cost follows the workers'
//! processes, not every process on the machine; a kernel without
//! CONFIG_PROC_CHILDREN falls back to one pass over `/proc/*/stat`, see
//! [`crate::os::proc`]), then reads each process:
//! `/proc/PID/smaps_rollup` for PSS and USS (`Rss`, `Pss`, `Private_Clean +
//! Private_Dirty`), or only `/proc/PID/status` (`VmRSS`) when the metric is
//! RSS, which needs no page-table walk and is much cheaper. A process that
//! vanishes between listing and reading is normal: it is left out.
//!
//! Nothing is decided here. A round is blocking file I/O, so the edge runs
//! it off its event loop (`spawn_blocking`) and feeds the result to the
//! supervisor as [`crate::core::Event::MemorySample`]; grace counting,
//! limits, biggest-first and child signals are the supervisor's.
//!
//! The only action with a side effect, [`signal_descendant`], checks at the
//! moment of signalling that the process still descends from the worker and
//! signals it through a pidfd, so a recycled pid is never hit.

use std::collections::HashMap;
use std::io;

use nix::sys::signal::Signal;

use crate::config::Metric;
use crate::core::{ProcessSample, SampleTarget, TreeSample, Usage};
use crate::ids::Pid;

/// One sampling round: the trees of `workers`, each read for the metric its
/// generation's limit is about. A worker whose own process is gone is left
/// out. Blocking; takes roughly 10 µs per process for RSS and more for
/// PSS/USS (see `examples/bench_memory.rs`).
pub fn sample(workers: &[SampleTarget]) -> Vec<TreeSample> {
    if workers.is_empty() {
        return Vec::new();
    }
    // Without children files: one pass over /proc for the whole round.
    let scanned: Option<HashMap<i32, Vec<i32>>> = (!children_files()).then(|| {
        let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
        for (pid, ppid) in crate::os::proc::parents() {
            children.entry(ppid).or_default().push(pid);
        }
        children
    });
    workers
        .iter()
        .filter_map(|&SampleTarget { id, pid, metric }| {
            let tree = match &scanned {
                Some(children) => subtree(pid.0, |p| children.get(&p).cloned().unwrap_or_default()),
                None => subtree(pid.0, children_of),
            };
            let processes: Vec<ProcessSample> = tree
                .into_iter()
                .filter_map(|p| {
                    read_usage(p, metric).map(|usage| ProcessSample { pid: Pid(p), usage })
                })
                .collect();
            let sample = TreeSample { id, pid, processes };
            sample.root().is_some().then_some(sample)
        })
        .collect()
}

/// `root` and its descendants, breadth first (at most 100,000: a pid
/// reused into a loop cannot make it run forever).
fn subtree(root: i32, children: impl Fn(i32) -> Vec<i32>) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() && out.len() < 100_000 {
        out.extend(children(out[i]));
        i += 1;
    }
    out
}

/// Whether this kernel has `/proc/PID/task/TID/children` (CONFIG_PROC_CHILDREN, Linux 3.5+).
fn children_files() -> bool {
    let me = std::process::id();
    std::path::Path::new(&format!("/proc/{me}/task/{me}/children")).exists()
}

/// The children of every thread of `pid` (a child belongs to the thread
/// that forked it). Racy by nature: a child forked meanwhile may be missed
/// until the next round, which is harmless for sampling.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|list| crate::os::proc::parse_children(&list).collect::<Vec<i32>>())
        .collect()
}

/// The memory of one process, or `None` if it is gone (or unreadable).
pub(crate) fn read_usage(pid: i32, metric: Metric) -> Option<Usage> {
    match metric {
        Metric::Rss => {
            let status = crate::os::proc::read_text(format!("/proc/{pid}/status")).ok()?;
            Some(Usage {
                rss: kib_field(&status, "VmRSS:")?,
                pss: None,
                uss: None,
            })
        }
        Metric::Pss | Metric::Uss => {
            let rollup = crate::os::proc::read_text(format!("/proc/{pid}/smaps_rollup")).ok()?;
            parse_smaps_rollup(&rollup)
        }
    }
}

/// Rss, Pss and Private_Clean + Private_Dirty of an `smaps_rollup` text.
/// A kernel thread or a zombie has an empty one: `None`.
#[doc(hidden)]
pub fn parse_smaps_rollup(text: &str) -> Option<Usage> {
    let rss = kib_field(text, "Rss:")?;
    let pss = kib_field(text, "Pss:")?;
    let private =
        kib_field(text, "Private_Clean:")?.checked_add(kib_field(text, "Private_Dirty:")?)?;
    Some(Usage {
        rss,
        pss: Some(pss),
        uss: Some(private),
    })
}

/// The `NAME:   123 kB` line of a /proc text, in bytes; `None` when it is
/// missing, not a number, or more bytes than a u64 holds (a figure wrapped
/// around to a small one is a wrong one).
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut words = line[name.len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Whether `pid` descends from `ancestor` right now (its parent chain reaches
/// it within 64 levels).
pub(crate) fn is_descendant(pid: Pid, ancestor: Pid) -> bool {
    let mut p = pid.0;
    for _ in 0..64 {
        let Some((_, parent)) = crate::os::proc::pgrp_and_parent(p) else {
            return false;
        };
        if parent == ancestor.0 {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        p = parent;
    }
    false
}

/// What became of a signal to a worker's descendant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signalled {
    Sent,
    /// The pid is gone or no longer under the worker: nothing was sent.
    NotDescendant,
}

/// Sends `signal` to `pid` if, at this moment, it still descends from
/// `worker`. The pid is pinned with a pidfd before the check, so if it exits
/// and the pid is reused in between, the signal goes nowhere (ESRCH) rather
/// than to the new process. Kernels without pidfd (before 5.3) fall back to
/// kill(2) right after the check.
pub(crate) fn signal_descendant(worker: Pid, pid: Pid, signal: Signal) -> io::Result<Signalled> {
    let pidfd = match crate::os::sys::pidfd_open(pid.0) {
        Ok(fd) => Some(fd),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(Signalled::NotDescendant),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
        Err(e) => return Err(e),
    };
    if !is_descendant(pid, worker) {
        return Ok(Signalled::NotDescendant);
    }
    let sent = match &pidfd {
        Some(fd) => crate::os::sys::pidfd_send_signal(fd, signal),
        None => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.0), signal)
            .map_err(io::Error::from),
    };
    match sent {
        Ok(()) => Ok(Signalled::Sent),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(Signalled::NotDescendant),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::WorkerId;

    const ROLLUP: &str =
        "55d1c0a3b000-7ffc8b5f1000 ---p 00000000 00:00 0                          [rollup]
Rss:              104960 kB
Pss:               35512 kB
Pss_Dirty:         30000 kB
Shared_Clean:       1556 kB
Shared_Dirty:      70000 kB
Private_Clean:        40 kB
Private_Dirty:     33364 kB
Swap:                  0 kB
";

    #[test]
    fn smaps_rollup_gives_rss_pss_and_uss() {
        let u = parse_smaps_rollup(ROLLUP).expect("parses");
        assert_eq!(u.rss, 104960 * 1024);
        assert_eq!(u.pss, Some(35512 * 1024));
        assert_eq!(u.uss, Some((40 + 33364) * 1024));
        // Pss_Dirty must not be taken for Pss.
        assert_eq!(u.get(Metric::Pss), Some(35512 * 1024));
    }

    #[test]
    fn empty_rollup_is_none() {
        assert_eq!(parse_smaps_rollup(""), None);
    }

    /// Found by tests/fuzz (proc_smaps_rollup): 2^54 kB is more bytes than a
    /// u64 holds; `kib * 1024` wrapped to 0 in release (and panicked in
    /// debug), so the figure read as 0 bytes.
    #[test]
    fn a_figure_past_u64_bytes_is_no_figure() {
        let huge =
            "Rss: 0 kB\nPss: 0 kB\nPrivate_Clean: 0 kB\nPrivate_Dirty: 18014398509481984 kB\n";
        assert_eq!(parse_smaps_rollup(huge), None);
        let sum = format!(
            "Rss: 1 kB\nPss: 1 kB\nPrivate_Clean: {0} kB\nPrivate_Dirty: {0} kB\n",
            u64::MAX / 1024
        );
        assert_eq!(parse_smaps_rollup(&sum), None);
        assert_eq!(
            kib_field("VmRSS: 18014398509481983 kB", "VmRSS:"),
            Some(u64::MAX - 1023)
        );
    }

    #[test]
    fn this_process_is_measured() {
        let me = std::process::id() as i32;
        let rss = read_usage(me, Metric::Rss).expect("own status");
        let full = read_usage(me, Metric::Pss).expect("own smaps_rollup");
        assert!(rss.rss > 0 && rss.pss.is_none());
        let (pss, uss) = (full.pss.expect("pss"), full.uss.expect("uss"));
        assert!(uss <= pss && pss <= full.rss, "{full:?}");
    }

    #[test]
    fn a_vanished_process_is_left_out() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = Pid(child.id() as i32);
        child.wait().expect("wait");
        assert_eq!(read_usage(pid.0, Metric::Uss), None);
        assert_eq!(
            sample(&[SampleTarget {
                id: WorkerId(1),
                pid,
                metric: Metric::Uss
            }]),
            vec![]
        );
    }

    #[test]
    fn a_tree_sums_its_processes() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let me = Pid(std::process::id() as i32);
        let kid = Pid(child.id() as i32);
        let round = sample(&[SampleTarget {
            id: WorkerId(7),
            pid: me,
            metric: Metric::Pss,
        }]);
        let descends = is_descendant(kid, me);
        let _ = child.kill();
        let _ = child.wait();
        let tree = &round[0];
        assert_eq!(tree.id, WorkerId(7));
        assert_eq!(tree.root().map(|p| p.pid), Some(me));
        assert!(tree.descendants().iter().any(|p| p.pid == kid), "{tree:?}");
        let sum: u64 = tree
            .processes
            .iter()
            .map(|p| p.usage.pss.unwrap_or(0))
            .sum();
        assert_eq!(tree.total(Metric::Pss), sum);
        assert!(descends);
        assert!(!is_descendant(me, kid));
    }

    /// Kills and reaps the processes a test started, even when it fails.
    struct Started(Vec<std::process::Child>, Vec<i32>);

    impl Drop for Started {
        fn drop(&mut self) {
            for &pid in &self.1 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Ancestry is followed past the parent: a grandchild descends from us
    /// (two links up), and nothing descends from a process below it or
    /// beside it.
    #[test]
    fn ancestry_is_followed_past_the_parent() {
        use std::io::BufRead;
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let out = sh.stdout.take().expect("stdout");
        let other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let (sh_pid, other_pid) = (Pid(sh.id() as i32), Pid(other.id() as i32));
        let mut started = Started(vec![sh, other], Vec::new());
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("the grandchild's pid");
        let grandchild = Pid(line.trim().parse().expect("a pid"));
        started.1.push(grandchild.0);
        let me = Pid(std::process::id() as i32);
        assert!(is_descendant(grandchild, sh_pid), "its parent");
        assert!(is_descendant(grandchild, me), "its grandparent");
        assert!(
            !is_descendant(grandchild, other_pid),
            "a sibling of its parent"
        );
        assert!(!is_descendant(sh_pid, grandchild), "its child");
        assert!(!is_descendant(me, grandchild));
        assert!(
            !is_descendant(me, me),
            "a process is not its own descendant"
        );
    }

    #[test]
    fn children_files_and_the_proc_scan_agree() {
        let mut kids: Vec<_> = (0..3)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .expect("spawn sleep")
            })
            .collect();
        let me = std::process::id() as i32;
        let mut scanned: HashMap<i32, Vec<i32>> = HashMap::new();
        for (pid, ppid) in crate::os::proc::parents() {
            scanned.entry(ppid).or_default().push(pid);
        }
        let mut a = subtree(me, children_of);
        let mut b = subtree(me, |p| scanned.get(&p).cloned().unwrap_or_default());
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        assert!(children_files());
        a.sort();
        b.sort();
        // Other tests' children may come and go meanwhile: compare ours.
        for k in &kids {
            let pid = k.id() as i32;
            assert!(a.contains(&pid) && b.contains(&pid), "{a:?} {b:?}");
        }
    }
}
