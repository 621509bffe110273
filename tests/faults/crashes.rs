//! Workers that die, will not start, or will not stop: they ignore their
//! drain signal, never get ready, crash (at start, under load, in a loop
//! with helpers and a daemon), leave a daemon behind, are OOM-killed. One
//! worker (a slot, sometimes one generation's) is faulty and serves only
//! the side port; the healthy load on `http` must not see a single
//! failure, and the side load may lose only what the faulty worker itself
//! held (each test says which kinds).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::{pid_alive, proc_ids, tagged_pids};
use crate::support::*;

/// The slot-0 worker of generation 1 ignores SIGTERM and keeps serving
/// the side port. A rollout drains it: SIGKILL at `drain_timeout` (1 s),
/// counted once in `drain_kills`, and named in the log. Only the side
/// connections it held at the kill fail.
#[test]
fn a_worker_that_ignores_its_drain_signal_is_killed_at_drain_timeout() {
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
    let stubborn = first[&0];
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    let started = Instant::now();
    roll_to_healthy(&h, &mut p, 2);
    let gone = poll(Duration::from_secs(5), || {
        (!pid_alive(stubborn))
            .then(|| started.elapsed())
            .ok_or(format!("the worker {stubborn} ignoring SIGTERM still runs"))
    });
    p.note(gone.clone());
    if let Some(s) = p.note(status(&h)) {
        p.check(counter(&s, "drain_kills") == 1, || {
            format!("want drain_kills 1, status counters {}", s["counters"])
        });
        p.check(counter(&s, "replacements.rollout") == 2, || {
            format!(
                "want 2 rollout replacements, status counters {}",
                s["counters"]
            )
        });
    }
    let killed = log_lines(
        &h,
        &["did not exit within drain_timeout", &stubborn.to_string()],
    );
    p.check(killed.len() == 1, || {
        format!("want one log line saying worker {stubborn} did not exit within drain_timeout, got {killed:?}")
    });
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, DEATH, "drain ignored");
    stop_and_check_nothing_left(&mut h, &mut p);
    eprintln!("drain ignored: worker gone {gone:?} after the restart began");
    p.assert_none();
}

/// Generation 2 serves but never sends READY=1 (slot 0's worker is the
/// first and only one started). The rollout fails at `ready_timeout`,
/// `restart --wait` says why and exits 1, the never-ready worker gets its
/// drain signal (not SIGKILL: it may hold requests) and finishes them, and
/// generation 1 keeps serving: nothing fails on either port.
#[test]
fn a_generation_that_never_gets_ready_fails_and_its_worker_drains() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(0),
        generation: Some(2),
        flags: "--never-ready",
        app: "drain_timeout = \"5s\"\nready_timeout = \"1500ms\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    let o = ctl(&h, &["restart", "--wait"]);
    let err = String::from_utf8_lossy(&o.stderr);
    p.check(
        o.status.code() == Some(1) && err.contains("READY=1"),
        || {
            format!(
                "restart --wait to a never-ready generation: want exit 1 naming READY=1, {}",
                text(&o)
            )
        },
    );
    let never = h
        .worker_pids()
        .into_iter()
        .find(|pid| !first.values().any(|p| p == pid));
    if let Some(never) = never {
        p.note(poll(Duration::from_secs(5), || {
            (!pid_alive(never))
                .then_some(())
                .ok_or(format!("the never-ready worker {never} still runs"))
        }));
        let exits = log_lines(&h, &["worker exited", &format!("pid={never}")]);
        p.check(
            exits.len() == 1 && exits[0].contains("exit status 0"),
            || format!("the never-ready worker {never} must drain and exit 0: {exits:?}"),
        );
    } else {
        p.push("no generation-2 worker was spawned".into());
    }
    p.check(consistent(&h, 2).ok() == Some(first.clone()), || {
        format!(
            "generation 1's {first:?} must keep serving: {:?}",
            consistent(&h, 2)
        )
    });
    if let Some(s) = p.note(status(&h)) {
        let last = &s["holdfast"]["last_rollout"];
        p.check(
            last["generation"] == 2 && last["ok"] == false && counter(&s, "failed_rollouts") == 1,
            || {
                format!(
                    "status: want last_rollout generation 2 failed, failed_rollouts 1: {last} {}",
                    s["counters"]
                )
            },
        );
    }
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, &[], "never ready");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// Generation 2 exits 7 at start. The rollout fails at once with the exit
/// status, no slot of generation 1 is touched, nothing fails.
#[test]
fn a_generation_that_crashes_at_start_fails_its_rollout() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(0),
        generation: Some(2),
        flags: "--exit-at-start 7",
        app: "drain_timeout = \"5s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    let o = ctl(&h, &["restart", "--wait"]);
    p.check(
        o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("exit status 7"),
        || format!("restart --wait to a generation exiting 7 at start: want exit 1 naming exit status 7, {}", text(&o)),
    );
    p.check(consistent(&h, 2).ok() == Some(first.clone()), || {
        format!(
            "generation 1's {first:?} must keep serving: {:?}",
            consistent(&h, 2)
        )
    });
    if let Some(s) = p.note(status(&h)) {
        p.check(
            counter(&s, "failed_rollouts") == 1 && counter(&s, "replacements.crash") == 0,
            || {
                format!(
                    "status: want failed_rollouts 1 and no crash replacement: {}",
                    s["counters"]
                )
            },
        );
    }
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, &[], "crash at start");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// Slot 1 (generation 1) exits 3 after 1.2 s of serving the side port,
/// again and again. holdfast restarts it in the same slot after a backoff,
/// slot 0 keeps its pid, status counts every crash (restarts, last exit,
/// `replacements.crash`, one log line each), and only the side connections
/// the crashing worker held fail.
#[test]
fn a_worker_crashing_under_load_is_restarted_in_its_slot() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        generation: Some(1),
        flags: "--crash-after-ms 1200",
        app: "drain_timeout = \"5s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    // Two crashes (the second after a 100 ms backoff and 1.2 s of serving).
    let seen = poll(Duration::from_secs(6), || {
        let s = status(&h)?;
        let w = ready_in(&s, 1).filter(|w| w.restarts >= 2);
        w.map(|w| (s.clone(), w))
            .ok_or(format!("slot 1 not yet restarted twice: {:?}", workers(&s)))
    });
    if let Some((s, w)) = p.note(seen) {
        p.check(
            w.last_exit
                .as_deref()
                .is_some_and(|e| e.starts_with("exit status 3"))
                && w.generation == 1,
            || format!("slot 1 after its crashes: {w:?}"),
        );
        p.check(ready_in(&s, 0).map(|w| w.pid) == Some(first[&0]), || {
            format!("slot 0 must keep pid {}: {:?}", first[&0], workers(&s))
        });
        // Read after the status: one more crash may have come meanwhile.
        let crashes = log_lines(&h, &["worker crashed", "slot=1"]).len() as u64;
        p.check(
            counter(&s, "replacements.crash") == w.restarts
                && (w.restarts..=w.restarts + 1).contains(&crashes),
            || format!("slot 1 restarted {} times; replacements.crash {}, `worker crashed` log lines {crashes}", w.restarts, counter(&s, "replacements.crash")),
        );
    }
    roll_to_healthy(&h, &mut p, 2);
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, DEATH, "crash under load");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// Slot 1 starts two helper children and a setsid daemon, then crashes
/// 300 ms later, restarted every 100-400 ms for 3 s. The process count
/// stays bounded (the children die with their parent, holdfast stops each
/// daemon once its worker is gone), and nothing is left after the stop.
#[test]
fn a_crash_loop_forking_helpers_leaves_no_process_behind() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        generation: Some(1),
        flags: "--crash-after-ms 300 --children 2 --daemon",
        app: "drain_timeout = \"2s\"\nready_timeout = \"10s\"\nrestart_backoff_max = \"400ms\"",
        ..Cfg::default()
    }
    .start();
    let tag = h.tag().to_string();
    wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    // holdfast + slot 0 + slot 1 with 2 children and a daemon, plus one
    // dying set of slot 1 (its worker, children and daemon on their way out).
    const BOUND: usize = 1 + 1 + 4 + 4;
    let (mut most, mut daemons) = (0, BTreeSet::<u32>::new());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let pids = tagged_pids(&tag);
        most = most.max(pids.len());
        daemons.extend(
            pids.iter()
                .filter(|&&pid| proc_ids(pid).is_some_and(|i| i.sid == pid && pid != h.pid())),
        );
        std::thread::sleep(POLL);
    }
    let s = status(&h).unwrap_or_default();
    let crashes = counter(&s, "replacements.crash");
    assert!(
        crashes >= 3 && daemons.len() >= 3,
        "the loop did not loop: {crashes} crashes, {} daemons seen",
        daemons.len()
    );
    p.check(most <= BOUND, || {
        format!("{most} processes with the test's tag at once (bound {BOUND}) in a crash loop of {crashes} crashes")
    });
    p.check(
        counter(&s, "strays_stopped") >= crashes.saturating_sub(1),
        || {
            format!(
                "{crashes} crashes, each leaving a daemon: strays_stopped {}",
                counter(&s, "strays_stopped")
            )
        },
    );
    roll_to_healthy(&h, &mut p, 2);
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, DEATH, "crash loop with helpers");
    stop_and_check_nothing_left(&mut h, &mut p);
    eprintln!(
        "crash loop: {crashes} crashes, {} daemons, at most {most} processes at once",
        daemons.len()
    );
    p.assert_none();
}

/// Slot 1 forks a setsid daemon that holds a copy of the listeners. Status
/// counts it among the worker's descendants (`descendants` 1; `escaped`
/// counts only descendants holdfast adopted, after their parent died). Then the worker is SIGKILLed (a crash that
/// leaves its daemon behind): holdfast stops the daemon, counts it in
/// `strays_stopped`, and restarts the slot; only the side connections of
/// the killed worker fail.
#[test]
fn a_daemon_left_by_a_killed_worker_is_stopped() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        generation: Some(1),
        flags: "--daemon",
        app: "drain_timeout = \"2s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let tag = h.tag().to_string();
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    let worker = first[&1];
    let shown = poll(Duration::from_secs(5), || {
        let s = status(&h)?;
        match ready_in(&s, 1) {
            Some(w) if w.descendants == Some(1) => Ok(()),
            w => Err(format!("want slot 1 with 1 descendant: {w:?}")),
        }
    });
    p.note(shown);
    let daemon = tagged_pids(&tag)
        .into_iter()
        .find(|&pid| proc_ids(pid).is_some_and(|i| i.sid == pid && pid != h.pid()))
        .expect("the daemon of slot 1");
    signal_ours(&h, worker, Signal::SIGKILL).expect("SIGKILL the worker");
    let stopped = poll(Duration::from_secs(4), || {
        (!pid_alive(daemon)).then_some(()).ok_or(format!(
            "daemon {daemon} of the killed worker {worker} still runs"
        ))
    });
    p.note(stopped);
    let back = poll(Duration::from_secs(5), || {
        let s = status(&h)?;
        match ready_in(&s, 1) {
            Some(w) if w.pid != worker && w.restarts == 1 => Ok(s),
            w => Err(format!("slot 1 not back after the kill: {w:?}")),
        }
    });
    if let Some(s) = p.note(back) {
        p.check(counter(&s, "strays_stopped") == 1, || {
            format!("want strays_stopped 1: {}", s["counters"])
        });
        p.check(
            ready_in(&s, 1)
                .and_then(|w| w.last_exit)
                .is_some_and(|e| e.starts_with("killed by SIGKILL")),
            || format!("slot 1's last exit: {:?}", workers(&s)),
        );
    }
    roll_to_healthy(&h, &mut p, 2);
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, DEATH, "daemon of a killed worker");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// Slot 1's worker (generation 1) lives in a memory cgroup of the test's
/// own limited to 48 MiB and allocates 100 MiB/s: the kernel's OOM killer
/// kills it (the cgroup counts the kill) within a second of each start.
/// holdfast restarts it in its slot, status says how it ended, and only the
/// side connections the killed worker held fail.
#[test]
fn a_worker_killed_by_the_oom_killer_is_restarted_in_its_slot() {
    let _serial = serial();
    let cg = MemoryCgroup::new("oom", 48 << 20);
    let dir = cg.dir.to_string_lossy().into_owned();
    let mut h = Cfg {
        slot: Some(1),
        generation: Some(1),
        flags: "--grow-mb-per-sec 100",
        cgroup: Some(&dir),
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    let seen = poll(Duration::from_secs(8), || {
        let s = status(&h)?;
        let w = workers(&s)
            .into_iter()
            .find(|w| w.slot == 1 && w.restarts >= 2);
        w.map(|w| (s.clone(), w)).ok_or(format!(
            "slot 1 not yet killed twice ({} OOM kills in the cgroup): {:?}",
            cg.oom_kills(),
            workers(&s)
        ))
    });
    if let Some((s, w)) = p.note(seen) {
        p.check(
            w.last_exit
                .as_deref()
                .is_some_and(|e| e.starts_with("killed by SIGKILL")),
            || format!("slot 1's last exit after an OOM kill: {w:?}"),
        );
        p.check(cg.oom_kills() >= 2, || {
            format!(
                "the cgroup counts {} OOM kills, slot 1 restarted {} times",
                cg.oom_kills(),
                w.restarts
            )
        });
        p.check(ready_in(&s, 0).map(|w| w.pid) == Some(first[&0]), || {
            format!("slot 0 must keep pid {}: {:?}", first[&0], workers(&s))
        });
        let said = log_lines(&h, &["worker crashed", "slot=1", "killed by SIGKILL"]);
        eprintln!(
            "oom: {} kills; holdfast says: {:?}",
            cg.oom_kills(),
            said.first()
        );
    }
    roll_to_healthy(&h, &mut p, 2);
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, DEATH, "OOM killed");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}
