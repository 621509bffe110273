//! Signal storms. Standard signals coalesce while pending, so a storm's
//! effect is judged from what holdfast logged it received (one line per
//! signal handled, in order), never from what was sent; the end state must
//! be consistent whatever got through.
//!
//! The storms are paced (a signal every few milliseconds, the storm's
//! shape); nothing waits on a sleep: every outcome is polled for.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::{http_get, tagged_pids, Swept, Target, DEADLINE};
use crate::support::*;

/// Sends `signals` to holdfast, one every `gap`.
fn storm(h: &crate::common::Holdfast, signals: &[Signal], gap: Duration) {
    for &sig in signals {
        h.signal(sig);
        std::thread::sleep(gap);
    }
}

/// Waits until holdfast is consistent and has stayed so with no rollout
/// started for `quiet`: the storm's effects are over. Returns slot → pid.
fn settled(
    h: &crate::common::Holdfast,
    n: u32,
    quiet: Duration,
) -> Result<std::collections::BTreeMap<u32, u32>, String> {
    let mut since: Option<(Instant, usize)> = None;
    poll(DEADLINE, || {
        let slots = consistent(h, n)?;
        let started = log_lines(h, &["rollout started"]).len();
        match since {
            Some((at, count)) if count == started && at.elapsed() >= quiet => Ok(slots),
            Some((_, count)) if count == started => Err("settling".into()),
            _ => {
                since = Some((Instant::now(), started));
                Err("settling".into())
            }
        }
    })
}

/// 100 SIGHUPs in one second under load, the config unchanged, workers
/// that take 300 ms to get ready (as a real app does). Reloads of the
/// config a rollout is already rolling out fold into one more rollout after
/// it (so every worker starts after the last SIGHUP: a deploy's new code
/// runs everywhere), never supersede it: no rollout is superseded, at most
/// one more starts for each that ends during the storm, the last starts
/// after the last SIGHUP, the process count stays bounded, nothing fails,
/// and holdfast ends consistent on one generation. (It used to start one
/// rollout per SIGHUP, each superseding the last: 100 rollouts, 100
/// RELOADING=1 to systemd, and every `restart --wait` but the last told
/// its rollout was superseded.)
#[test]
fn a_hundred_sighups_in_a_second_make_at_most_two_rollouts() {
    let _serial = serial();
    let mut h = Cfg {
        all_flags: "--ready-delay-ms 300",
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let tag = h.tag().to_string();
    wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();

    let watcher = {
        let tag = tag.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let mut most = 0;
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(tagged_pids(&tag).len());
                std::thread::sleep(POLL);
            }
            most
        });
        (stop, t)
    };
    storm(&h, &[Signal::SIGHUP; 100], Duration::from_millis(10));
    let end = settled(&h, 2, Duration::from_secs(1));
    p.note(end.clone());
    watcher.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = watcher.1.join().unwrap_or(0);
    let received = log_lines(&h, &["SIGHUP: re-reading"]).len();
    let started = log_lines(&h, &["rollout started"]).len();
    let superseded = log_lines(&h, &["superseded"]).len();
    p.check(superseded == 0, || {
        format!("{superseded} rollouts superseded by a reload of the same config")
    });
    // In the log's order: how many rollouts ended before the last SIGHUP,
    // and whether a rollout started after it.
    let log = h.log();
    let last_hup = log.rfind("SIGHUP: re-reading").unwrap_or(0);
    let ended_during = log[..last_hup].matches("rollout finished").count();
    p.check(started <= 2 + ended_during, || {
        format!(
            "{received} SIGHUPs handled (of 100 sent) started {started} rollouts while {ended_during} ended during the storm; want at most {}",
            2 + ended_during
        )
    });
    p.check(log[last_hup..].contains("rollout started"), || {
        "no rollout started after the last SIGHUP".to_string()
    });
    // holdfast, 2 workers, max_surge 1 new one, and the old ones draining.
    p.check(most <= 1 + 2 + 1 + 2, || {
        format!("{most} processes with the test's tag at once during the storm")
    });
    if let Some(s) = p.note(status(&h)) {
        let generation = s["holdfast"]["generation"].as_u64().unwrap_or(0);
        p.check(generation == 1 + started as u64, || {
            format!("generation {generation} after {started} rollouts")
        });
    }
    traffic.stop(&mut p, 100);
    stop_and_check_nothing_left(&mut h, &mut p);
    eprintln!(
        "SIGHUP storm: {received} of 100 handled, {started} rollouts, at most {most} processes"
    );
    p.assert_none();
}

/// (Failed before its fix, nearly every run.) SIGTTIN and SIGTTOU back to back,
/// 40 times: each TTIN spawns a worker and the TTOU drains it at once, often
/// before it has exec'd (holdfast logs `worker spawned` and `draining
/// worker` for the same pid 250 µs apart). In that window the child still
/// has holdfast's signal handlers (signal-hook's, for TERM, HUP, TTIN,
/// ...) and an empty signal mask (src/sys.rs `child_after_fork`, which
/// resets only SIGPIPE): the SIGTERM runs holdfast's handler *in the
/// child* and is gone. The exec'd server never sees its drain signal,
/// serves on, and is SIGKILLed at `drain_timeout` with the connections it
/// holds: a keep-alive client sees resets. (The mixed storm below hit this
/// and lost 11 requests.)
///
/// The fix (src/sys.rs `spawn`, around the fork at `let fork = unsafe`, and
/// `child_after_fork`): block every signal in the parent before fork and
/// restore the mask after; in the child, set every handled signal back to
/// SIG_DFL *before* emptying the mask (as `posix_spawn` does with
/// POSIX_SPAWN_SETSIGDEF). A drain signal that arrives before exec then
/// stays pending and ends the child (it has served nothing yet), or
/// reaches the server after exec. Then no drain kill, no failed request.
#[test]
fn a_worker_drained_right_after_its_spawn_gets_its_drain_signal() {
    let _serial = serial();
    let mut h = Cfg {
        app: "drain_timeout = \"1s\"\nready_timeout = \"10s\"\nmax_workers = 4",
        ..Cfg::default()
    }
    .start();
    wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();
    for i in 0..40 {
        h.signal(Signal::SIGTTIN);
        h.signal(Signal::SIGTTOU);
        // Back at 2 workers with nothing draining (a worker that lost its
        // drain signal is there until its drain_timeout).
        if let Err(e) = poll(Duration::from_secs(5), || {
            let s = status(&h)?;
            let n = workers(&s).len();
            (n == 2 && consistent(&h, 2).is_ok())
                .then_some(())
                .ok_or(format!("round {i}: {n} worker rows"))
        }) {
            p.push(e);
            break;
        }
    }
    let killed = log_lines(&h, &["did not exit within drain_timeout"]);
    p.check(killed.is_empty(), || {
        let pids: Vec<&str> = killed
            .iter()
            .filter_map(|l| l.split("pid=").nth(1)?.split(' ').next())
            .collect();
        let spawned_then_drained: Vec<String> = pids
            .iter()
            .map(|pid| {
                let at = |what: &str| {
                    log_lines(&h, &[what, &format!("pid={pid} ")])
                        .first()
                        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
                        .unwrap_or_default()
                };
                format!("pid {pid}: spawned {}, drained {}", at("worker spawned"), at("draining worker"))
            })
            .collect();
        format!(
            "{} worker(s) drained right after their spawn ignored the drain signal and were SIGKILLed: {spawned_then_drained:?}",
            killed.len()
        )
    });
    traffic.stop(&mut p, 100);
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// 40 SIGTTIN/SIGTTOU in a fixed mixed order, 5 ms apart, under load, with
/// `max_workers = 5`. The count holdfast must end at is replayed from its
/// log (each signal it handled, in order, bounded to 1..=5): it must run
/// exactly that many workers, ready, in slots 0..n. Then a second storm
/// mixes in SIGHUPs; a last SIGHUP must bring it back to the config's 2.
/// (Failed before the fix now and then, about half the runs here:) a worker drained
/// right after its spawn loses its drain signal (see the test above).
#[test]
fn ttin_ttou_storm_with_sighups_ends_consistent() {
    let _serial = serial();
    let mut h = Cfg {
        app: "drain_timeout = \"2s\"\nready_timeout = \"10s\"\nmax_workers = 5",
        ..Cfg::default()
    }
    .start();
    wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();

    // A fixed pseudo-random order (LCG), more TTIN than TTOU at first.
    let mut x: u32 = 12345;
    let signals: Vec<Signal> = (0..40)
        .map(|i| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let up = (x >> 16) % 100 < if i < 20 { 65 } else { 35 };
            if up {
                Signal::SIGTTIN
            } else {
                Signal::SIGTTOU
            }
        })
        .collect();
    storm(&h, &signals, Duration::from_millis(5));
    let handled: Vec<bool> = h
        .log()
        .lines()
        .filter_map(|l| {
            if l.contains("SIGTTIN: one more worker") {
                Some(true)
            } else if l.contains("SIGTTOU: one worker fewer") {
                Some(false)
            } else {
                None
            }
        })
        .collect();
    assert!(
        handled.len() >= 10,
        "only {} of 40 TTIN/TTOU handled: the storm did not happen",
        handled.len()
    );
    let want = handled.iter().fold(
        2u32,
        |n, &up| if up { (n + 1).min(5) } else { (n - 1).max(1) },
    );
    p.note(settled(&h, want, Duration::from_millis(500)));
    eprintln!(
        "TTIN/TTOU storm: {} of 40 handled, {want} workers wanted",
        handled.len()
    );

    let mut mixed = signals.clone();
    for i in (0..mixed.len()).step_by(7) {
        mixed[i] = Signal::SIGHUP;
    }
    storm(&h, &mixed, Duration::from_millis(5));
    h.signal(Signal::SIGHUP);
    p.note(settled(&h, 2, Duration::from_secs(1)));
    traffic.stop(&mut p, 100);
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// SIGTERM with requests in flight (800 ms each), then a storm of SIGHUP,
/// SIGTTIN and SIGUSR1 while holdfast drains. holdfast ignores the reloads
/// and the scale-up ("reload ignored: holdfast is stopping"), spawns no
/// worker after the stop began, answers every request in flight, exits 0,
/// and leaves nothing behind.
#[test]
fn signals_during_shutdown_start_nothing_and_holdfast_exits_0() {
    let _serial = serial();
    let mut h = Cfg {
        app: "drain_timeout = \"5s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let tag = h.tag().to_string();
    let first = wait_consistent(&h, 2);
    let mut p = Problems::default();
    // Requests that are in the workers when the stop comes.
    let target = h.tcp();
    let inflight: Vec<_> = (0..4)
        .map(|_| {
            let t: Target = target.clone();
            std::thread::spawn(move || http_get(&t, "/?sleep=800"))
        })
        .collect();
    poll(DEADLINE, || {
        let held: usize = first.values().map(|&pid| established_on(pid, h.port)).sum();
        (held >= 4)
            .then_some(())
            .ok_or(format!("{held} requests accepted"))
    })
    .unwrap_or_else(|e| panic!("precondition: {e}"));

    h.signal(Signal::SIGTERM);
    storm(
        &h,
        &[
            Signal::SIGHUP,
            Signal::SIGTTIN,
            Signal::SIGUSR1,
            Signal::SIGHUP,
            Signal::SIGTTIN,
            Signal::SIGHUP,
        ],
        Duration::from_millis(20),
    );
    let code = h.wait_exit(DEADLINE).code();
    p.check(code == Some(0), || format!("holdfast exited with {code:?}"));
    for (i, r) in inflight.into_iter().enumerate() {
        match r.join().expect("request thread") {
            Ok(resp) if resp.status == 200 => {}
            other => p.push(format!("request {i} in flight at SIGTERM: {other:?}")),
        }
    }
    let log = h.log();
    let after_stop = log.split("stop requested").nth(1).unwrap_or_default();
    p.check(!after_stop.contains("worker spawned"), || {
        format!(
            "a worker was spawned after the stop began: {}",
            log_tail(&h, 30)
        )
    });
    p.check(
        after_stop.contains("reload ignored: holdfast is stopping"),
        || {
            format!(
                "no `reload ignored: holdfast is stopping` after the stop: {}",
                log_tail(&h, 30)
            )
        },
    );
    nothing_left(&h, &tag, &mut p);
    p.assert_none();
}

/// Three rollouts under load while both workers write 1000 numbered lines
/// a second; in the middle of each (its first new worker spawned), the log
/// file is renamed and SIGUSR1 sent. Every rollout finishes; every line of
/// every drained worker is in one of the four files, once and whole;
/// nothing is counted lost; nothing fails.
#[test]
fn usr1_during_rollouts_reopens_and_loses_no_line() {
    let _serial = serial();
    let mut h = Cfg {
        all_flags: "--log-forever --log-rate 1000 --log-line-bytes 100",
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        tables: "[logs]\nstdout = \"{dir}/app.log\"\nstderr = \"{dir}/app.log\"",
        ..Cfg::default()
    }
    .start();
    wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();
    let dir = h.dir.path().to_path_buf();

    for k in 1..=3u64 {
        let o = ctl(&h, &["restart"]);
        p.check(o.status.success(), || format!("restart {k}: {}", text(&o)));
        let generation = k + 1;
        p.note(poll(DEADLINE, || {
            (!log_lines(&h, &["worker spawned", &format!("generation={generation}")]).is_empty())
                .then_some(())
                .ok_or(format!("no generation-{generation} worker spawned"))
        }));
        std::fs::rename(dir.join("app.log"), dir.join(format!("app.log.{k}")))
            .expect("rename app.log");
        h.signal(Signal::SIGUSR1);
        p.note(poll(DEADLINE, || {
            (!log_lines(
                &h,
                &["rollout finished", &format!("generation={generation}")],
            )
            .is_empty())
            .then_some(())
            .ok_or(format!("rollout to generation {generation} did not finish"))
        }));
    }
    p.note(poll(DEADLINE, || consistent(&h, 2)));
    let current: Vec<u32> = consistent(&h, 2)
        .unwrap_or_default()
        .into_values()
        .collect();
    let drained: Vec<u32> = h
        .worker_pids()
        .into_iter()
        .filter(|pid| !current.contains(pid))
        .collect();
    let read = poll(Duration::from_secs(10), || {
        let mut text = String::new();
        for name in ["app.log.1", "app.log.2", "app.log.3", "app.log"] {
            text.push_str(
                &std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{name}: {e}"))?,
            );
        }
        let lines = crate::logfiles::parse_lines(&text);
        drained
            .iter()
            .all(|pid| lines.done.contains_key(pid))
            .then_some(lines)
            .ok_or(format!(
                "no `done` line yet of every drained worker of {drained:?}"
            ))
    });
    if let Some(lines) = p.note(read) {
        p.check(lines.torn.is_empty(), || {
            format!("torn lines: {:?}", lines.torn)
        });
        if let Some((lost, dups)) = p.note(crate::logfiles::missing(&lines, &drained)) {
            p.check(lost == 0 && dups.is_empty(), || {
                format!("{lost} lines of the drained workers {drained:?} in no file; {dups:?}")
            });
        }
    }
    if let Some(s) = p.note(status(&h)) {
        p.check(
            counter(&s, "log_lines_lost") == 0 && counter(&s, "log_reopens") >= 3,
            || format!("want log_lines_lost 0, log_reopens >= 3: {}", s["counters"]),
        );
    }
    traffic.stop(&mut p, 100);
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// The config of the upgrade storms: 2 workers, a drain that takes 300 ms
/// (the lame duck), room for requests of 800 ms in flight at the stop.
fn upgrade_cfg() -> Cfg<'static> {
    Cfg {
        app: "drain_timeout = \"5s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
}

/// The test worker copied to `{dir}/name`, executable: a stand-in new
/// holdfast chosen by its name (`src/bin/holdfast-test-worker/impostor.rs`).
fn stand_in(h: &crate::common::Holdfast, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dst = h.dir.path().join(name);
    std::fs::copy(crate::common::test_worker_bin(), &dst).expect("copy the test worker");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dst
}

/// `upgrade --wait --binary BINARY` on a thread of its own (bounded:
/// the harness kills it after its deadline).
fn upgrade_client(
    h: &crate::common::Holdfast,
    binary: &std::path::Path,
) -> std::thread::JoinHandle<std::process::Output> {
    let sock = h.fill(SOCK);
    let binary = binary.to_string_lossy().into_owned();
    std::thread::spawn(move || {
        crate::common::run_holdfast(&["upgrade", "--wait", "--binary", &binary, "--control", &sock])
    })
}

type InFlight =
    Vec<std::thread::JoinHandle<Result<crate::common::Response, crate::common::FailKind>>>;

/// Four requests of 800 ms each, once the `workers` hold all four.
fn requests_in_flight(
    h: &crate::common::Holdfast,
    workers: &std::collections::BTreeMap<u32, u32>,
) -> InFlight {
    let target = h.tcp();
    let inflight: InFlight = (0..4)
        .map(|_| {
            let t: Target = target.clone();
            std::thread::spawn(move || http_get(&t, "/?sleep=800"))
        })
        .collect();
    poll(DEADLINE, || {
        let held: usize = workers
            .values()
            .map(|&pid| established_on(pid, h.port))
            .sum();
        (held >= 4)
            .then_some(())
            .ok_or(format!("{held} requests accepted"))
    })
    .unwrap_or_else(|e| panic!("precondition: {e}"));
    inflight
}

/// What every stop during an upgrade must end with: each request in
/// flight at the SIGTERM answered 200, each worker of `workers` drained
/// (`worker exited ... reason=exit status 0`, once), holdfast exited 0,
/// nothing left behind.
fn stopped_clean(h: &mut Swept, workers: &[u32], inflight: InFlight, p: &mut Problems) {
    let tag = h.tag().to_string();
    let code = h.wait_exit(DEADLINE).code();
    p.check(code == Some(0), || format!("holdfast exited with {code:?}"));
    for (i, r) in inflight.into_iter().enumerate() {
        match r.join().expect("request thread") {
            Ok(resp) if resp.status == 200 => {}
            other => p.push(format!("request {i} in flight at SIGTERM: {other:?}")),
        }
    }
    for pid in workers {
        let exits = log_lines(h, &["worker exited", &format!("pid={pid} ")]);
        p.check(
            exits.len() == 1 && exits[0].contains("reason=exit status 0"),
            || format!("worker {pid}: want one `worker exited ... reason=exit status 0`, got {exits:?}"),
        );
    }
    nothing_left(h, &tag, p);
}

/// SIGTERM while an upgrade's new binary is on trial (`BINARY version
/// --json` runs; this one never answers: `holdfast-hang`). The stop
/// cancels the upgrade: its `upgrade --wait` client is told so (exit 1,
/// `holdfast is stopping; upgrade cancelled`), nothing is exec'd, the
/// workers drain (requests in flight answered, exit status 0), holdfast
/// exits 0 without waiting out the trial's 10 s, and the trial run is gone
/// with it.
///
/// (Failed before its fix:) holdfast exited 0 and left the trial run
/// behind, an orphan with holdfast's environment, alive for as long as the
/// binary hung (an hour here; under systemd's `KillMode=process`, nobody
/// kills it). The stop answered the upgrade's waiters, but the edge kept
/// the trial until its own deadline, which the exit came before. The fix
/// (src/edge/upgrade.rs, `upgrade_if_quiet`): once the core no longer
/// wants the upgrade, a trial run still going is SIGKILLed (its group, not
/// yet reaped) and reaped as usual.
#[test]
fn term_while_an_upgrade_checks_its_binary_cancels_it_and_leaves_nothing() {
    let _serial = serial();
    let mut h = upgrade_cfg().start();
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();
    let hang = stand_in(&h, "holdfast-hang");
    let client = upgrade_client(&h, &hang);
    // Inside the window: the trial runs (and would for an hour).
    let trial: u32 = poll(DEADLINE, || {
        log_lines(&h, &["checking the new holdfast binary"])
            .first()
            .and_then(|l| {
                l.split("trial_pid=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .ok_or("no trial run started".to_string())
    })
    .unwrap_or_else(|e| panic!("precondition: {e}"));
    assert!(
        crate::common::pid_alive(trial),
        "precondition: trial run {trial} alive"
    );
    let inflight = requests_in_flight(&h, &first);
    traffic.stop(&mut p, 100);
    h.signal(Signal::SIGTERM);

    let o = client.join().expect("upgrade client");
    p.check(
        o.status.code() == Some(1)
            && String::from_utf8_lossy(&o.stderr)
                .contains("holdfast is stopping; upgrade cancelled"),
        || {
            format!(
                "upgrade --wait: want exit 1, `holdfast is stopping; upgrade cancelled`; got {}",
                text(&o)
            )
        },
    );
    let workers: Vec<u32> = first.values().copied().collect();
    stopped_clean(&mut h, &workers, inflight, &mut p);
    p.check(!crate::common::pid_alive(trial), || {
        format!("the trial run {trial} ({}) outlived holdfast", comm(trial))
    });
    let log = h.log();
    for (want, what) in [
        (true, "upgrade of holdfast cancelled: holdfast is stopping"),
        (true, "upgrade cancelled: killing its trial run"),
        (false, "did not finish within"),
        (false, "handing over to the new holdfast"),
    ] {
        p.check(log.contains(what) == want, || {
            format!("want {what:?} in the log: {want}; {}", log_tail(&h, 30))
        });
    }
    p.check(h.worker_pids().len() == 2, || {
        format!(
            "workers spawned: {:?}, want only the first 2",
            h.worker_pids()
        )
    });
    p.assert_none();
}

/// SIGTERM in the middle of an upgrade's exec: the old image is gone (it
/// blocked its signals and exec'd), the new one has not adopted yet. The
/// stand-in `holdfast-relay` holds the pid there until the test opens its
/// gate, then execs the real holdfast. The SIGTERM, sent in that window,
/// stays pending and is the new image's: it adopts everything, answers the
/// `upgrade --wait` client (`upgraded from ... 2 workers adopted`), and
/// only then stops: the same workers drain (requests in flight answered,
/// exit status 0), holdfast exits 0, nothing is left, and no worker was
/// started by the upgrade.
#[test]
fn term_in_the_middle_of_an_upgrade_exec_is_the_new_images_which_adopts_then_stops() {
    let _serial = serial();
    let mut h = upgrade_cfg().start_with_env(&[
        ("HOLDFAST_IMPOSTOR_REAL", "{holdfast}"),
        ("HOLDFAST_RELAY_GATE", "{dir}/gate"),
    ]);
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();
    let relay = stand_in(&h, "holdfast-relay");
    let client = upgrade_client(&h, &relay);
    let gate = h.dir.path().join("gate");
    let waiting = h.dir.path().join("gate.waiting");
    // Inside the window: holdfast's pid runs the relay.
    let held_by = poll(DEADLINE, || {
        std::fs::read_to_string(&waiting).map_err(|e| format!("{}: {e}", waiting.display()))
    })
    .unwrap_or_else(|e| panic!("precondition: the exec never reached the relay: {e}"));
    assert_eq!(
        held_by.trim(),
        h.pid().to_string(),
        "precondition: the relay runs in holdfast's pid"
    );
    let inflight = requests_in_flight(&h, &first);
    traffic.stop(&mut p, 100);
    h.signal(Signal::SIGTERM);
    std::fs::write(&gate, "").expect("open the gate");

    let o = client.join().expect("upgrade client");
    let said = String::from_utf8_lossy(&o.stdout);
    p.check(
        o.status.code() == Some(0)
            && said.contains("upgraded from")
            && said.contains(&format!("(pid {}, 2 workers adopted)", h.pid())),
        || format!("upgrade --wait: want exit 0, `upgraded from ... (pid {}, 2 workers adopted)`; got {}", h.pid(), text(&o)),
    );
    let workers: Vec<u32> = first.values().copied().collect();
    stopped_clean(&mut h, &workers, inflight, &mut p);
    let log = h.log();
    let upgraded = log.find("upgraded from");
    let stop = log.find("stop requested");
    p.check(
        matches!((upgraded, stop), (Some(u), Some(s)) if u < s),
        || {
            format!(
                "want `upgraded from` before `stop requested`: {}",
                log_tail(&h, 40)
            )
        },
    );
    p.check(log.matches("stop requested").count() == 1, || {
        format!("want one `stop requested`: {}", log_tail(&h, 40))
    });
    p.check(h.worker_pids().len() == 2, || {
        format!(
            "workers spawned: {:?}, want only the first 2",
            h.worker_pids()
        )
    });
    p.assert_none();
}

/// 20 SIGUSR2 in a second under load, then 20 in 40 ms, then 20 back to
/// back. Each one
/// handled asks for an upgrade to the same binary; one under way refuses
/// the next ("another upgrade of holdfast is under way"); signals that
/// come during an exec wait, blocked, for the new image (and coalesce).
/// After each storm: every SIGUSR2 handled was either an upgrade or a
/// refusal as busy, every upgrade asked for was adopted and counted, none
/// failed, and nothing else moved: the same holdfast pid, the same two
/// workers, generation 1, no worker spawned, no request failed; then
/// holdfast stops clean.
#[test]
fn sigusr2_storms_upgrade_in_place_and_move_nothing_else() {
    let _serial = serial();
    let mut h = upgrade_cfg().start();
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();
    for (shape, gap) in [
        ("20 in a second", Duration::from_millis(50)),
        ("20 in 40 ms", Duration::from_millis(2)),
        ("20 back to back", Duration::ZERO),
    ] {
        storm(&h, &[Signal::SIGUSR2; 20], gap);
        // Over once nothing is upgrading and every upgrade asked for is adopted.
        let end = poll(DEADLINE, || {
            let s = status(&h)?;
            let requested = log_lines(&h, &["upgrade of holdfast requested"]).len();
            let upgraded = log_lines(&h, &["upgraded from"]).len();
            (s["holdfast"]["upgrading"] == false && requested == upgraded)
                .then_some(s)
                .ok_or(format!(
                    "{shape}: {requested} upgrades asked for, {upgraded} adopted"
                ))
        });
        let handled = log_lines(&h, &["SIGUSR2: upgrading holdfast in place"]).len();
        let requested = log_lines(&h, &["upgrade of holdfast requested"]).len();
        let busy = log_lines(
            &h,
            &["upgrade refused: another upgrade of holdfast is under way"],
        )
        .len();
        let upgraded = log_lines(&h, &["upgraded from"]).len();
        p.check(handled >= 2 && requested >= 1, || {
            format!("{shape}: {handled} SIGUSR2 handled, {requested} upgrades: the storm did not happen")
        });
        p.check(requested + busy == handled, || {
            format!("{shape}: {handled} SIGUSR2 handled: {requested} upgrades asked for + {busy} refused as busy")
        });
        if let Some(s) = p.note(end) {
            p.check(
                counter(&s, "upgrades") == upgraded as u64 && counter(&s, "failed_upgrades") == 0,
                || {
                    format!(
                        "{shape}: want upgrades {upgraded}, failed_upgrades 0: {}",
                        s["counters"]
                    )
                },
            );
            p.check(
                s["holdfast"]["pid"].as_u64() == Some(u64::from(h.pid())),
                || {
                    format!(
                        "{shape}: holdfast's pid {} became {}",
                        h.pid(),
                        s["holdfast"]["pid"]
                    )
                },
            );
            p.check(s["holdfast"]["generation"].as_u64() == Some(1), || {
                format!("{shape}: generation {}", s["holdfast"]["generation"])
            });
        }
        let now = p.note(consistent(&h, 2));
        p.check(now.as_ref() == Some(&first), || {
            format!("{shape}: workers {first:?} became {now:?}")
        });
        eprintln!(
            "SIGUSR2 storms so far ({shape}): {handled} handled, {upgraded} upgrades, {busy} refused as busy"
        );
    }
    p.check(h.worker_pids().len() == 2, || {
        format!(
            "workers spawned: {:?}, want only the first 2",
            h.worker_pids()
        )
    });
    traffic.stop(&mut p, 100);
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}
