//! Processes the benchmark starts and what it reads about them in /proc.
//!
//! Every server is started in a process group of its own ([`Group`]); the
//! group is killed when the guard drops, also on panic. Processes that leave
//! the group (Passenger's watchdog calls setsid) are found by ancestry and
//! killed by pid. The benchmark is the child subreaper of everything it
//! starts, so a master that re-execs itself (Unicorn USR2) and outlives its
//! parent is reparented here and reaped here, not left to pid 1.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Polls `cond` every 20 ms until it holds; `Err` naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        if t.elapsed() >= limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Process groups and holdfast pids alive now, for the interrupt handler.
static LIVE: std::sync::Mutex<Vec<Live>> = std::sync::Mutex::new(Vec::new());

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Live {
    Group(i32),
    Holdfast(i32),
}

/// Remembers `l` until [`forget`]: an interrupt (SIGINT, SIGTERM, SIGHUP)
/// of the benchmark stops it.
pub fn remember(l: Live) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(l);
}

pub fn forget(l: Live) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|x| *x != l);
}

/// On SIGINT, SIGTERM or SIGHUP: SIGTERM to every remembered holdfast (it
/// stops its workers) and process group (Apache stops Passenger), then exit
/// 130. The servers run in process groups of their own, so a terminal's
/// Ctrl-C would not reach them.
pub fn stop_everything_on_interrupt() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).context("signal handler")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let live = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
            eprintln!(
                "bench_alternatives: signal {sig}: stopping {} server(s)",
                live.len()
            );
            for l in live {
                match l {
                    Live::Group(g) => {
                        let _ = killpg(Pid::from_raw(g), Signal::SIGTERM);
                    }
                    Live::Holdfast(p) => {
                        let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
                    }
                }
            }
            std::process::exit(130);
        }
    });
    Ok(())
}

/// Becomes the child subreaper of every process this benchmark starts.
pub fn become_subreaper() -> Result<()> {
    nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")
}

/// A server started in a process group of its own, with stdout and stderr
/// appended to `log`. Dropping it kills the group (TERM, then KILL).
pub struct Group {
    pub child: Child,
    pub log: PathBuf,
    pgid: i32,
    /// The group is gone (stopped or killed): Drop does nothing.
    done: bool,
}

impl Group {
    /// Starts `program args` in `cwd` with `env` added, in a new process group.
    pub fn spawn(
        program: &str,
        args: &[&str],
        cwd: &Path,
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Group> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(out.try_clone().context("dup log")?)
            .stderr(out)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES");
        for (k, v) in env {
            cmd.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {program} {}", args.join(" ")))?;
        let pgid = child.id() as i32;
        remember(Live::Group(pgid));
        Ok(Group {
            child,
            log,
            pgid,
            done: false,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()), sig).with_context(|| format!("kill -{sig} {}", self.pid()))
    }

    /// Sends `sig` to the whole group and waits up to `limit` for every
    /// member to be gone; then SIGKILLs the group. Reaps what it can.
    pub fn stop(mut self, sig: Signal, limit: Duration) {
        self.stop_inner(sig, limit);
    }

    /// Waits up to `limit` for every member of the group to be gone (after
    /// the caller signalled it); the guard then has nothing left to kill.
    pub fn wait_gone(&mut self, limit: Duration) -> Result<()> {
        let pgid = self.pgid;
        wait_until(&format!("process group {pgid} to exit"), limit, || {
            let _ = self.child.try_wait();
            group_members(pgid).is_empty()
        })?;
        self.done = true;
        forget(Live::Group(pgid));
        Ok(())
    }

    fn stop_inner(&mut self, sig: Signal, limit: Duration) {
        if self.done {
            return;
        }
        self.done = true;
        let pgid = self.pgid;
        let _ = killpg(Pid::from_raw(pgid), sig);
        let gone = wait_until("the group to exit", limit, || {
            let _ = self.child.try_wait();
            reap_orphans();
            group_members(pgid).is_empty()
        });
        if gone.is_err() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            let _ = self.child.wait();
            let _ = wait_until(
                "the killed group to be reaped",
                Duration::from_secs(5),
                || {
                    reap_orphans();
                    group_members(pgid).is_empty()
                },
            );
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop_inner(Signal::SIGTERM, Duration::from_secs(10));
    }
}

/// Reads a file as text, lossily; empty if it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Reaps `pid` if it is a zombie child of this process (no-op otherwise).
pub fn reap(pid: i32) {
    if stat(pid).is_some_and(|s| s.state == 'Z' && s.ppid == std::process::id() as i32) {
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// Reaps zombies that were reparented to this process (it is their subreaper).
/// Only pids whose parent is this process and whose state is Z are waited
/// for, so `std::process::Child` handles keep working.
pub fn reap_orphans() {
    let me = std::process::id() as i32;
    for (pid, st) in all_stats() {
        if st.ppid == me && st.state == 'Z' {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// The fields of /proc/PID/stat the benchmark uses.
#[derive(Debug, Clone)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident pages.
    pub rss_pages: u64,
}

/// /proc/PID/stat of `pid`, or None if it is gone (or unreadable).
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); ppid 4, pgrp 5, session 6, utime 14, stime 15, rss 24.
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgid: f.get(2)?.parse().ok()?,
        sid: f.get(3)?.parse().ok()?,
        cpu_ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        rss_pages: f.get(21)?.parse().ok()?,
    })
}

/// Every process's stat, by pid.
pub fn all_stats() -> BTreeMap<i32, Stat> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            if let Some(st) = stat(pid) {
                out.insert(pid, st);
            }
        }
    }
    out
}

/// Live (not zombie) members of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    all_stats()
        .into_iter()
        .filter(|(_, s)| s.pgid == pgid && s.state != 'Z')
        .map(|(p, _)| p)
        .collect()
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// Live children of `pid`, from /proc/PID/task/*/children (no scan of /proc).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out.retain(|&p| alive(p));
    out.sort_unstable();
    out.dedup();
    out
}

/// The command line of `pid`, arguments joined by spaces (process titles
/// such as Passenger's are one argument).
pub fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .replace('\0', " ")
        })
        .unwrap_or_default()
}

/// SIGKILLs each pid still alive (processes that left the benchmark's
/// process groups, found by the caller by ancestry or command line).
pub fn kill_pids(pids: &[i32]) {
    for &p in pids {
        if alive(p) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_sec() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v as u64)
}

/// Page size in bytes.
pub fn page_bytes() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

/// Whether `GET path` on 127.0.0.1:`port` answers 200 now.
pub fn answers(port: u16, path: &str) -> bool {
    crate::load::http_get(&crate::load::Target::local(port), path).is_ok_and(|r| r.status == 200)
}

/// The `X-Pid` of one `GET /` answered 200 on a fresh connection.
pub fn serving_pid(port: u16) -> Result<i32> {
    let r = crate::load::http_get(&crate::load::Target::local(port), "/?sleep=0")
        .map_err(|k| anyhow::anyhow!("GET / on 127.0.0.1:{port}: {k}"))?;
    if r.status != 200 {
        bail!("GET / on 127.0.0.1:{port}: status {}", r.status);
    }
    r.pid()
        .map(|p| p as i32)
        .with_context(|| format!("GET / on 127.0.0.1:{port}: no X-Pid header"))
}

/// The whole load average line of /proc/loadavg (first three fields).
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("(cannot read /proc/loadavg: {e})"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_stat_with_spaces_in_comm() {
        let s =
            "42 (a b) S 1 42 42 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 100 1000 55 18446744073709551615";
        let st = super::parse_stat(s).expect("parse");
        assert_eq!((st.state, st.ppid, st.pgid, st.sid), ('S', 1, 42, 42));
        assert_eq!(st.cpu_ticks, 10);
        assert_eq!(st.rss_pages, 55);
    }
}
