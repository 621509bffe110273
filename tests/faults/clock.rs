//! A wall-clock jump (NTP step, `date -s`, a VM resumed) must not move any
//! deadline: drain timeouts, ready timeouts, crash backoff, memory sample
//! intervals, lifetimes, the watchdog.
//!
//! Why no test jumps the clock: Linux has no per-process CLOCK_REALTIME
//! (a time namespace, `unshare --time`, offsets only CLOCK_MONOTONIC and
//! CLOCK_BOOTTIME), so a jump seen by holdfast alone needs an LD_PRELOAD
//! shim (libfaketime), and `date -s` moves the clock of everything on the
//! machine, other people's builds and tests included. Instead, two proofs:
//!
//! 1. the source: no wall-clock API anywhere in `src/` (every time is a
//!    `std::time::Instant` or tokio's, CLOCK_MONOTONIC per std's docs; the
//!    supervisor's deadlines are Instants handed in by the edge). The only
//!    wall-clock reads in the binary are tracing-subscriber's log
//!    timestamps, which format and decide nothing;
//! 2. the syscalls: under strace, through a run that hits a drain
//!    deadline, a crash backoff and the housekeeping timer, every wait
//!    holdfast makes has a relative timeout (epoll_wait, poll) or none, and
//!    no timer or sleep is armed on CLOCK_REALTIME. (clock_gettime itself
//!    goes through the vDSO and is invisible to strace; proof 1 covers it.)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::pid_alive;
use crate::support::*;

/// APIs that read or wait on the wall clock.
const WALL_CLOCK: &[&str] = &[
    "SystemTime",
    "UNIX_EPOCH",
    "CLOCK_REALTIME",
    "ClockId::CLOCK_REALTIME",
    "gettimeofday",
    "chrono::",
    "OffsetDateTime",
    "Utc::now",
    "Local::now",
    "clock_gettime",
    "libc::time(",
    "timerfd",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
    {
        let path = e.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// Proof 1. A new use of the wall clock fails here and must say why it
/// sets no deadline (then list it here, with that reason).
#[test]
fn no_wall_clock_api_in_the_source() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() >= 10,
        "only {} files under {}",
        files.len(),
        src.display()
    );
    let mut hits = Vec::new();
    let mut instants = 0;
    for f in &files {
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            instants += code.matches("Instant").count();
            for api in WALL_CLOCK {
                if code.contains(api) {
                    hits.push(format!("{}:{}: {api}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        instants > 20,
        "only {instants} uses of Instant: is this the right tree?"
    );
    assert!(
        hits.is_empty(),
        "wall-clock APIs in src/ (a deadline must use Instant):\n{}",
        hits.join("\n")
    );
}

/// Proof 2: strace attached to holdfast (and everything it forks) while a
/// worker ignoring SIGTERM is killed at its 1 s drain deadline and a
/// killed worker is restarted after its backoff.
#[test]
fn no_timer_waits_on_the_wall_clock_under_strace() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(0),
        generation: Some(1),
        flags: "--ignore-term",
        app: "drain_timeout = \"1s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let trace = h.dir.path().join("strace.txt");
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=futex,epoll_wait,epoll_pwait,epoll_pwait2,poll,ppoll,select,pselect6,nanosleep,clock_nanosleep,clock_gettime,timerfd_create,timerfd_settime,timer_create,timer_settime,setitimer,alarm",
            "-o",
        ])
        .arg(&trace)
        .args(["-p", &h.pid().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run strace (package strace)");
    // Attached once it writes its first line.
    poll(Duration::from_secs(10), || {
        let n = fs::metadata(&trace).map(|m| m.len()).unwrap_or(0);
        (n > 0)
            .then_some(())
            .ok_or("strace has not attached".to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut p = Problems::default();

    let o = ctl(&h, &["restart", "--wait"]);
    p.check(o.status.success(), || {
        format!("restart --wait: {}", text(&o))
    });
    let killed = log_lines(
        &h,
        &["did not exit within drain_timeout", &first[&0].to_string()],
    );
    p.check(killed.len() == 1, || {
        format!("want the drain deadline to fire once: {killed:?}")
    });
    let now = consistent(&h, 2).unwrap_or_default();
    if let Some(&pid) = now.get(&1) {
        signal_ours(&h, pid, Signal::SIGKILL).expect("SIGKILL slot 1");
        p.note(poll(Duration::from_secs(10), || {
            let s = status(&h)?;
            ready_in(&s, 1)
                .filter(|w| w.pid != pid)
                .map(|_| ())
                .ok_or("slot 1 not restarted".to_string())
        }));
    }
    // strace is ours: SIGTERM makes it detach and exit.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(strace.id() as i32),
        Signal::SIGTERM,
    );
    let _ = strace.wait();
    p.check(pid_alive(h.pid()), || {
        "holdfast died under strace".to_string()
    });

    let text = fs::read_to_string(&trace).unwrap_or_default();
    let mut realtime = Vec::new();
    let (mut waits, mut timed) = (0, 0);
    for line in text.lines() {
        if line.contains("epoll_wait") || line.contains("poll(") {
            waits += 1;
            // `epoll_wait(fd, events, max, TIMEOUT_MS)`: a deadline as a
            // relative wait.
            let timeout = line
                .split(") ")
                .next()
                .and_then(|call| call.rsplit(", ").next())
                .and_then(|t| t.trim().parse::<i64>().ok());
            if line.contains("epoll_wait") && timeout.is_some_and(|t| t > 0) {
                timed += 1;
            }
        }
        let timed_realtime = if line.contains("futex(") {
            // futex(addr, OP|FUTEX_CLOCK_REALTIME, val, TIMEOUT, ...):
            // a wait with no timeout (glibc's pthread_join) sets no deadline.
            line.contains("FUTEX_CLOCK_REALTIME")
                && line
                    .split(", ")
                    .nth(3)
                    .is_some_and(|timeout| timeout != "NULL")
        } else {
            line.contains("CLOCK_REALTIME") || line.contains("ITIMER_REAL")
        };
        if timed_realtime {
            realtime.push(line.to_string());
        }
    }
    p.check(waits > 20 && timed > 0, || {
        format!("{waits} waits traced, {timed} epoll_wait with a timeout: strace saw too little ({} bytes)", text.len())
    });
    p.check(realtime.is_empty(), || {
        format!(
            "waits or timers on the wall clock:\n{}",
            realtime.join("\n")
        )
    });
    stop_and_check_nothing_left(&mut h, &mut p);
    eprintln!("strace: {} lines, {waits} epoll/poll waits ({timed} with a relative timeout), none on the wall clock", text.lines().count());
    p.assert_none();
}
