//! holdfast's own resources fail: its fd limit, the control socket path,
//! the run directory (removed, read-only). holdfast must stay up, keep the
//! workers serving (0 failed requests), say what is wrong, and recover by
//! itself once the resource is back. (The log files' faults are in
//! [`crate::logfiles`].)

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::common::{pid_alive, Holdfast, Launch, Swept, DEADLINE};
use crate::support::*;

/// One request line on the control socket at `path`; the response, or why
/// none came within `within`.
fn raw_request(path: &str, line: &str, within: Duration) -> Result<Value, String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("connect {path}: {e}"))?;
    s.set_read_timeout(Some(within))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send {line}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| format!("{line}: no reply within {within:?}: {e}"))?;
    serde_json::from_str(&reply).map_err(|e| format!("{line}: reply {reply:?}: {e}"))
}

/// The open fd numbers of `pid`.
fn fds_of(pid: u32) -> BTreeSet<u32> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The soft RLIMIT_NOFILE that leaves `pid` exactly `free` more fds: the
/// kernel hands out the lowest free number and refuses one at or above
/// the soft limit.
fn limit_leaving(pid: u32, free: u32) -> u32 {
    let open = fds_of(pid);
    let mut limit = 0;
    let mut left = free;
    loop {
        if !open.contains(&limit) {
            if left == 0 {
                return limit;
            }
            left -= 1;
        }
        limit += 1;
    }
}

/// `pid`'s (soft, hard) RLIMIT_NOFILE from /proc/PID/limits.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .to_string();
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (
        v.first().copied().unwrap_or(0),
        v.get(1).copied().unwrap_or(0),
    )
}

/// Sets `pid`'s soft RLIMIT_NOFILE (the hard one unchanged) with
/// util-linux `prlimit --pid`.
fn set_soft_nofile(pid: u32, soft: u64) {
    let (_, hard) = nofile(pid);
    let o = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={soft}:{hard}"),
        ])
        .output()
        .expect("run prlimit");
    assert!(
        o.status.success() && nofile(pid).0 == soft,
        "prlimit --pid {pid} --nofile={soft}:{hard}: {}",
        text(&o)
    );
}

/// holdfast's fd limit is brought to 2 free fds, then to none, under load;
/// then raised again.
///
/// With 2 free: a rollout fails at once (`restart --wait` exits 1 naming
/// `Too many open files`) and generation 1 keeps serving; slot 1's worker,
/// SIGKILLed, cannot be restarted (its slot waits, retrying with backoff,
/// and status says why); status and reopen-logs still answer. With none
/// free: the control socket cannot accept, which the log says (at most 10
/// times a second), and a SIGHUP is rejected (the config cannot be read)
/// naming the reason.
/// holdfast never spins (under 25 % of a core) and never exits. Once the
/// limit is back, slot 1 is restarted by its backoff, a rollout succeeds,
/// and holdfast holds as many fds as before: nothing leaked.
#[test]
fn holdfast_at_its_fd_limit_keeps_serving_and_recovers() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        app: "drain_timeout = \"3s\"\nready_timeout = \"5s\"\nrestart_backoff_max = \"1s\"",
        tables: "[logs]\nstdout = \"{dir}/app.log\"\nstderr = \"{dir}/app.log\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let pid = h.pid();
    let baseline = fds_of(pid).len();
    let (soft, _) = nofile(pid);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();
    let sock = h.fill(SOCK);

    // Two free fds.
    set_soft_nofile(pid, u64::from(limit_leaving(pid, 2)));
    let o = ctl(&h, &["restart", "--wait"]);
    p.check(
        o.status.code() == Some(1)
            && String::from_utf8_lossy(&o.stderr).contains("Too many open files"),
        || {
            format!(
                "restart --wait at the fd limit: want exit 1 naming `Too many open files`, {}",
                text(&o)
            )
        },
    );
    p.check(consistent(&h, 2).ok() == Some(first.clone()), || {
        format!(
            "generation 1's {first:?} must keep serving: {:?}",
            consistent(&h, 2)
        )
    });
    signal_ours(&h, first[&1], Signal::SIGKILL).expect("SIGKILL slot 1");
    let waiting = poll(Duration::from_secs(5), || {
        let s = status(&h)?;
        let w = workers(&s).into_iter().find(|w| w.slot == 1);
        match w {
            Some(w)
                if w.restarts >= 2
                    && w.pid == 0
                    && w.last_exit.as_deref().is_some_and(|e| e.contains("Too many open files")) =>
            {
                Ok(())
            }
            w => Err(format!("slot 1 at the fd limit: want it waiting, its restarts failing with `Too many open files`: {w:?}")),
        }
    });
    p.note(waiting);
    let o = ctl(&h, &["reopen-logs"]);
    eprintln!("fd limit, 2 free: reopen-logs: {}", text(&o));
    let cpu = cpu_share(pid, Duration::from_secs(1));
    p.check(cpu < 0.25, || {
        format!(
            "holdfast used {:.0}% of a core at its fd limit",
            cpu * 100.0
        )
    });

    // None free.
    set_soft_nofile(pid, u64::from(limit_leaving(pid, 0)));
    let warned_before = log_lines(&h, &["control socket accept failed"]).len();
    let asked = Instant::now();
    let r = raw_request(&sock, r#"{"v":1,"cmd":"status"}"#, Duration::from_secs(2));
    eprintln!(
        "fd limit, 0 free: status over the control socket: {:?}",
        r.as_ref().map(|_| "answered")
    );
    h.signal(Signal::SIGHUP);
    p.note(poll(Duration::from_secs(5), || {
        let rejected = log_lines(&h, &["reload rejected", "Too many open files"]);
        (rejected.len() == 1)
            .then_some(())
            .ok_or(format!("the SIGHUP at the fd limit: want one `reload rejected` line naming `Too many open files`: {rejected:?}"))
    }));
    let warned = log_lines(&h, &["control socket accept failed"]).len() - warned_before;
    let per_sec = warned as f64 / asked.elapsed().as_secs_f64();
    p.check(per_sec <= 12.0, || {
        format!(
            "{warned} `control socket accept failed` lines in {:?}",
            asked.elapsed()
        )
    });
    let cpu = cpu_share(pid, Duration::from_secs(1));
    p.check(cpu < 0.25 && pid_alive(pid), || {
        format!(
            "holdfast at 0 free fds: alive {}, {:.0}% of a core",
            pid_alive(pid),
            cpu * 100.0
        )
    });

    // The limit is back.
    set_soft_nofile(pid, soft);
    p.note(poll(Duration::from_secs(5), || {
        let s = status(&h)?;
        ready_in(&s, 1).map(|_| ()).ok_or(format!(
            "slot 1 not back after the fd limit was raised: {:?}",
            workers(&s)
        ))
    }));
    let o = ctl(&h, &["restart", "--wait"]);
    p.check(o.status.success(), || {
        format!("restart --wait after the fd limit was raised: {}", text(&o))
    });
    p.note(poll(DEADLINE, || consistent(&h, 2)));
    let leaked = poll(Duration::from_secs(5), || {
        let now = fds_of(pid).len();
        (now == baseline).then_some(()).ok_or(format!(
            "holdfast holds {now} fds, {baseline} before the fd limit"
        ))
    });
    p.note(leaked);
    let (_, side) = traffic.stop(&mut p, 100);
    if let Some(side) = side {
        // Only the SIGKILLed slot-1 worker's side connections may fail.
        let bad = side.failed_except(&["reset", "short_body"]);
        p.check(bad.is_empty(), || format!("side load: {bad:?}\n{side}"));
    }
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// (Failed before its fix.) The control socket's path is removed under load (a tmp
/// cleaner, a wrong `rm`). Today holdfast keeps accepting on a socket
/// nobody can reach: every `holdfast status/restart/stop` says holdfast is
/// not running (exit 69) for as long as it runs, and a deploy script's
/// `restart --wait` fails. Signals still work (a SIGHUP rollout finishes).
///
/// The fix (as for the listeners' unix paths, src/listener.rs `repair`):
/// the control socket keeps a hard link next to it at bind time
/// (src/control.rs `ControlSocket::bind`), and the housekeeping pass
/// (src/runtime.rs `repair_paths`, every second) restores the path from
/// it, logging a warning; `status` then answers again within a few
/// seconds. Nothing fails meanwhile.
#[test]
fn a_removed_control_socket_path_is_restored() {
    let _serial = serial();
    let mut h = Cfg {
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();

    let sock = PathBuf::from(h.fill(SOCK));
    fs::remove_file(&sock).expect("remove the control socket");
    let o = ctl(&h, &["status"]);
    eprintln!("control socket removed: holdfast status says {}", text(&o));
    let back = poll(Duration::from_secs(4), || {
        let o = ctl(&h, &["status", "--json"]);
        o.status.success().then_some(()).ok_or(format!(
            "control socket removed: status still fails: {}",
            text(&o)
        ))
    });
    p.note(back);
    // Signals do not need the socket.
    h.signal(Signal::SIGHUP);
    p.note(poll(DEADLINE, || {
        (!log_lines(&h, &["rollout finished", "generation=2"]).is_empty())
            .then_some(())
            .ok_or("no `rollout finished generation=2` after SIGHUP".to_string())
    }));
    traffic.stop(&mut p, 100);
    // The stop by signal: the control socket may be gone.
    let tag = h.tag().to_string();
    h.signal(Signal::SIGTERM);
    let code = h.wait_exit(DEADLINE).code();
    p.check(code == Some(0), || format!("holdfast exited with {code:?}"));
    nothing_left(&h, &tag, &mut p);
    p.assert_none();
}

/// holdfast's run directory (`$XDG_RUNTIME_DIR/holdfast-XXXXXX`, else
/// `$TMPDIR`: /tmp under the shipped units) with `notify.sock` in it.
fn run_dir(h: &Holdfast, base: &std::path::Path) -> PathBuf {
    poll(DEADLINE, || {
        fs::read_dir(base)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("holdfast-"))
                    && p.join("notify.sock").exists()
            })
            .ok_or(format!("no holdfast-*/notify.sock in {}", base.display()))
    })
    .unwrap_or_else(|e| panic!("{e} (holdfast pid {})", h.pid()))
}

/// (Failed before its fix.) holdfast's run directory is removed under load, as a
/// tmp cleaner that ages /tmp (systemd-tmpfiles `q /tmp ... 10d` on Fedora
/// and Arch) may do to a holdfast that has run for weeks: its
/// `notify.sock` is gone. Today no new worker can send READY=1: slot 1's
/// worker, killed, is restarted but never becomes ready (a crash loop of
/// `ready_timeout`s), and every rollout fails with "never sent READY=1",
/// which points at the app, not at holdfast.
///
/// The fix: the housekeeping pass (src/runtime.rs `housekeeping`, every
/// second) checks that the notify socket's path still is its socket (by
/// inode, as `Listener::repair` does) and, if not, recreates the run
/// directory (0700) and binds a new notify socket at the same path
/// (src/notify.rs), logging a warning; better still, holdfast uses
/// `$RUNTIME_DIRECTORY` (the unit's `RuntimeDirectory=holdfast`,
/// units/holdfast.service:71) when set, where no tmp cleaner goes.
#[test]
fn a_removed_run_directory_does_not_break_readiness() {
    let _serial = serial();
    let cfg = Cfg {
        slot: Some(1),
        app: "drain_timeout = \"3s\"\nready_timeout = \"2s\"\nrestart_backoff_max = \"1s\"",
        ..Cfg::default()
    };
    let mut h = Swept::new(Holdfast::launch(
        Launch {
            program: "{holdfast}",
            args: &["run", "--config", "{config}"],
            env: &[("XDG_RUNTIME_DIR", "{dir}")],
            stdin: None,
        },
        Some(&cfg.render()),
    ));
    let first = wait_consistent(&h, 2);
    let rundir = run_dir(&h, h.dir.path());
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    fs::remove_dir_all(&rundir).expect("remove the run directory");
    // A crash restart after the removal.
    signal_ours(&h, first[&1], Signal::SIGKILL).expect("SIGKILL slot 1");
    let back = poll(Duration::from_secs(6), || {
        let s = status(&h)?;
        ready_in(&s, 1)
            .filter(|w| w.pid != first[&1])
            .map(|_| ())
            .ok_or(format!(
                "slot 1, restarted after its run directory was removed, is not ready: {:?}",
                workers(&s)
                    .into_iter()
                    .filter(|w| w.slot == 1)
                    .collect::<Vec<_>>()
            ))
    });
    p.note(back);
    let o = ctl(&h, &["restart", "--wait"]);
    p.check(o.status.success(), || {
        format!(
            "restart --wait after the run directory was removed: {}",
            text(&o)
        )
    });
    let (_, side) = traffic.stop(&mut p, 100);
    if let Some(side) = side {
        let bad = side.failed_except(&["reset", "short_body"]);
        p.check(bad.is_empty(), || format!("side load: {bad:?}\n{side}"));
    }
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// The run directory (a tmpfs of holdfast's own namespace) turns read-only
/// under load, with `ready = "probe"`: each new worker needs a probe socket
/// there. A rollout fails at once naming the path and `Read-only file
/// system`; generation 1 keeps serving; slot 1's worker, killed, waits in
/// its slot, its restarts failing with the same reason. Once the directory
/// is writable again, slot 1 is back by its backoff and a rollout succeeds.
#[test]
fn a_read_only_run_directory_fails_probe_starts_cleanly_and_recovers() {
    let _serial = serial();
    let cfg = Cfg {
        slot: Some(1),
        app: "ready = \"probe\"\ndrain_timeout = \"3s\"\nready_timeout = \"5s\"\nrestart_backoff_max = \"1s\"",
        ..Cfg::default()
    };
    let mut h = start_with_tmpfs(
        &cfg.render(),
        "run",
        "1m",
        &[("XDG_RUNTIME_DIR", "{dir}/run")],
    );
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();
    let remount = |how: &str| {
        let target = h.fill("{dir}/run");
        let o = std::process::Command::new("nsenter")
            .args([
                "-t",
                &h.pid().to_string(),
                "-m",
                "mount",
                "-o",
                &format!("remount,{how}"),
                &target,
            ])
            .output()
            .expect("run nsenter");
        assert!(o.status.success(), "remount {how} {target}: {}", text(&o));
    };

    remount("ro");
    let o = ctl(&h, &["restart", "--wait"]);
    p.check(
        o.status.code() == Some(1)
            && String::from_utf8_lossy(&o.stderr).contains("Read-only file system"),
        || format!("restart --wait with a read-only run directory: want exit 1 naming `Read-only file system`, {}", text(&o)),
    );
    p.check(consistent(&h, 2).ok() == Some(first.clone()), || {
        format!(
            "generation 1's {first:?} must keep serving: {:?}",
            consistent(&h, 2)
        )
    });
    signal_ours(&h, first[&1], Signal::SIGKILL).expect("SIGKILL slot 1");
    p.note(poll(Duration::from_secs(5), || {
        let s = status(&h)?;
        match workers(&s).into_iter().find(|w| w.slot == 1) {
            Some(w)
                if w.pid == 0
                    && w.restarts >= 2
                    && w.last_exit.as_deref().is_some_and(|e| e.contains("Read-only file system")) =>
            {
                Ok(())
            }
            w => Err(format!("slot 1 with a read-only run directory: want it waiting, its restarts failing with `Read-only file system`: {w:?}")),
        }
    }));
    remount("rw");
    p.note(poll(Duration::from_secs(5), || {
        let s = status(&h)?;
        ready_in(&s, 1).map(|_| ()).ok_or(format!(
            "slot 1 not back once the run directory is writable: {:?}",
            workers(&s)
        ))
    }));
    let o = ctl(&h, &["restart", "--wait"]);
    p.check(o.status.success(), || {
        format!(
            "restart --wait once the run directory is writable: {}",
            text(&o)
        )
    });
    p.note(poll(DEADLINE, || consistent(&h, 2)));
    let (_, side) = traffic.stop(&mut p, 100);
    if let Some(side) = side {
        let bad = side.failed_except(&["reset", "short_body"]);
        p.check(bad.is_empty(), || format!("side load: {bad:?}\n{side}"));
    }
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}
