//! Tables of (event, expected actions): no processes, no clock, no sleeps.

use super::*;

fn t(ms: u64) -> Instant {
    thread_local!(static T0: Instant = Instant::now());
    T0.with(|t0| *t0 + Duration::from_millis(ms))
}

fn policy(workers: u32, max_surge: u32) -> Policy {
    Policy {
        workers,
        max_surge,
        ready: ReadyMode::Notify,
        ready_delay: Duration::from_secs(1),
        ready_timeout: Duration::from_secs(60),
        drain_signal: Signal::SIGTERM,
        drain_timeout: Duration::from_secs(30),
        backoff_max: Duration::from_secs(30),
    }
}

fn spawn(id: u64, slot: u32, generation: u64) -> Action {
    Action::Spawn {
        id: WorkerId(id),
        slot: Slot(slot),
        generation: Generation(generation),
    }
}
fn spawned(id: u64, pid: i32) -> Event {
    Event::Spawned {
        id: WorkerId(id),
        pid: Pid(pid),
    }
}
fn ready(id: u64) -> Event {
    Event::Ready { id: WorkerId(id) }
}
fn verify(id: u64, pid: i32) -> Action {
    Action::Verify {
        id: WorkerId(id),
        pid: Pid(pid),
    }
}
fn term(id: u64, pid: i32) -> Action {
    Action::Signal {
        id: WorkerId(id),
        pid: Pid(pid),
        signal: Signal::SIGTERM,
    }
}
fn kill(id: u64, pid: i32) -> Action {
    Action::Kill {
        id: WorkerId(id),
        pid: Pid(pid),
    }
}
fn exited(pid: i32) -> Event {
    Event::Exited {
        pid: Pid(pid),
        reason: ExitReason::Code(0),
    }
}
fn rollout(p: Policy) -> Event {
    Event::Request {
        request: Request::Rollout { policy: p },
        reply: Some(ReplyTo(9)),
    }
}

/// A supervisor whose generation 1 is ready: worker ids 1..=n, pids 100...
fn running(workers: u32, max_surge: u32) -> Supervisor {
    let mut sv = Supervisor::new(policy(workers, max_surge));
    let first = sv.step(t(0), Event::Tick);
    assert_eq!(
        first,
        (0..workers)
            .map(|s| spawn(s as u64 + 1, s, 1))
            .collect::<Vec<_>>()
    );
    for s in 0..workers as u64 {
        assert_eq!(sv.step(t(1), spawned(s + 1, 100 + s as i32)), vec![]);
    }
    for s in 0..workers as u64 {
        let mut want = vec![verify(s + 1, 100 + s as i32)];
        if s + 1 == workers as u64 {
            want.push(Action::AllReady);
        }
        assert_eq!(sv.step(t(2), ready(s + 1)), want, "ready {s}");
    }
    sv
}

fn play(sv: &mut Supervisor, script: Vec<(u64, Event, Vec<Action>)>) {
    for (i, (ms, event, want)) in script.into_iter().enumerate() {
        let got = sv.step(t(ms), event.clone());
        assert_eq!(got, want, "step {i}: {event:?}");
    }
}

fn done(generation: u64, keep: u64) -> Action {
    Action::RolloutDone {
        generation: Generation(generation),
        outcome: Ok(()),
        keep: Generation(keep),
    }
}

fn reply_ok(a: &Action) -> bool {
    matches!(
        a,
        Action::Reply {
            to: ReplyTo(9),
            outcome: Ok(_)
        }
    )
}

#[test]
fn rollout_starts_new_before_stopping_old() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
            (20, ready(3), vec![verify(3, 200), term(1, 100)]),
            (30, exited(100), vec![spawn(4, 1, 2)]),
            (31, spawned(4, 201), vec![]),
            (40, ready(4), vec![verify(4, 201), term(2, 101)]),
        ],
    );
    let out = sv.step(t(50), exited(101));
    assert!(reply_ok(&out[0]), "{out:?}");
    assert_eq!(out[1..], [done(2, 2)]);
    assert_eq!(sv.stable(), Generation(2));
    assert_eq!(sv.counters.replacements.get(&Reason::Rollout), Some(&2));
}

#[test]
fn max_surge_two_replaces_two_at_a_time() {
    let mut sv = running(4, 2);
    play(
        &mut sv,
        vec![
            (
                10,
                rollout(policy(4, 2)),
                vec![spawn(5, 0, 2), spawn(6, 1, 2)],
            ),
            (11, spawned(5, 200), vec![]),
            (11, spawned(6, 201), vec![]),
            (20, ready(5), vec![verify(5, 200), term(1, 100)]),
            (21, exited(100), vec![spawn(7, 2, 2)]),
        ],
    );
}

#[test]
fn max_surge_zero_stops_first_then_starts() {
    let mut sv = running(2, 0);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 0)), vec![term(1, 100)]),
            (20, exited(100), vec![spawn(3, 0, 2)]),
            (21, spawned(3, 200), vec![]),
            (30, ready(3), vec![verify(3, 200), term(2, 101)]),
            (40, exited(101), vec![spawn(4, 1, 2)]),
        ],
    );
}

#[test]
fn new_worker_exiting_fails_the_rollout_and_old_keeps_serving() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
        ],
    );
    let out = sv.step(
        t(12),
        Event::Exited {
            pid: Pid(200),
            reason: ExitReason::Code(1),
        },
    );
    assert!(
        matches!(&out[0], Action::Reply { to: ReplyTo(9), outcome: Err(e) } if e.contains("exited before ready (exit status 1)")),
        "{out:?}"
    );
    assert!(matches!(
        &out[1],
        Action::RolloutDone {
            outcome: Err(_),
            keep: Generation(1),
            ..
        }
    ));
    assert_eq!(out.len(), 2, "no rollback needed, nothing else: {out:?}");
    assert_eq!(sv.counters.failed_rollouts, 1);
    // The old workers were never signalled and nothing restarts.
    assert_eq!(sv.step(t(5000), Event::Tick), vec![]);
    assert_eq!(sv.ready_count(), 2);
}

#[test]
fn not_ready_by_timeout_drains_new_and_fails() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(1, 1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
        ],
    );
    assert_eq!(sv.next_deadline(), Some(t(11) + Duration::from_secs(60)));
    let out = sv.step(t(11 + 60_000), Event::Tick);
    // The drain signal, not SIGKILL: a worker that never said READY=1 may be
    // serving requests from the shared socket already (bug: they were reset).
    assert_eq!(out[0], term(2, 200));
    assert!(
        matches!(&out[1], Action::Reply { outcome: Err(e), .. } if e.contains("not ready after 1m") && e.contains("ready = \"delay\"")),
        "{out:?}"
    );
    // SIGKILL only after drain_timeout, like any worker that does not drain.
    play(
        &mut sv,
        vec![
            (11 + 60_000 + 29_999, Event::Tick, vec![]),
            (11 + 90_000, Event::Tick, vec![kill(2, 200)]),
        ],
    );
    // Its exit later changes nothing.
    assert_eq!(
        sv.step(
            t(100_000),
            Event::Exited {
                pid: Pid(200),
                reason: ExitReason::Signal(9)
            }
        ),
        vec![]
    );
    assert_eq!(sv.ready_count(), 1);
    assert_eq!(sv.counters.failed_rollouts, 1);
}

#[test]
fn a_failed_rollout_drains_its_other_starting_workers() {
    let mut sv = running(2, 2);
    play(
        &mut sv,
        vec![
            (
                10,
                rollout(policy(2, 2)),
                vec![spawn(3, 0, 2), spawn(4, 1, 2)],
            ),
            (11, spawned(3, 200), vec![]),
            (11, spawned(4, 201), vec![]),
        ],
    );
    let out = sv.step(
        t(12),
        Event::Exited {
            pid: Pid(200),
            reason: ExitReason::Code(1),
        },
    );
    // Worker 4 has not proven itself but may be serving: drained, not killed.
    assert_eq!(out[0], term(4, 201), "{out:?}");
    assert!(
        matches!(
            &out[1],
            Action::Reply {
                outcome: Err(_),
                ..
            }
        ),
        "{out:?}"
    );
    assert!(
        matches!(
            &out[2],
            Action::RolloutDone {
                outcome: Err(_),
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(sv.step(t(20), exited(201)), vec![]);
    assert_eq!(sv.ready_count(), 2);
    assert!(sv.rollout().is_none());
}

#[test]
fn failure_after_some_slots_moved_rolls_back() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
            (20, ready(3), vec![verify(3, 200), term(1, 100)]),
            (30, exited(100), vec![spawn(4, 1, 2)]),
            (31, spawned(4, 201), vec![]),
        ],
    );
    let out = sv.step(
        t(40),
        Event::Exited {
            pid: Pid(201),
            reason: ExitReason::Code(1),
        },
    );
    assert!(matches!(
        out[0],
        Action::Reply {
            outcome: Err(_),
            ..
        }
    ));
    assert!(matches!(
        out[1],
        Action::RolloutDone {
            outcome: Err(_),
            ..
        }
    ));
    // Back to generation 1, for slot 0, start-before-stop.
    assert_eq!(out[2..], [spawn(5, 0, 1)]);
    play(
        &mut sv,
        vec![
            (41, spawned(5, 300), vec![]),
            (50, ready(5), vec![verify(5, 300), term(3, 200)]),
        ],
    );
    let out = sv.step(t(60), exited(200));
    assert!(
        matches!(
            &out[..],
            [Action::RolloutDone {
                generation: Generation(1),
                outcome: Err(_),
                ..
            }]
        ),
        "{out:?}"
    );
    assert!(sv.rollout().is_none());
}

#[test]
fn drain_timeout_sends_sigkill() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(1, 1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
            (20, ready(2), vec![verify(2, 200), term(1, 100)]),
            (20 + 29_999, Event::Tick, vec![]),
            (20 + 30_000, Event::Tick, vec![kill(1, 100)]),
        ],
    );
    assert_eq!(sv.counters.drain_kills, 1);
}

#[test]
fn crash_restarts_back_off_and_cap() {
    let mut p = policy(1, 1);
    p.backoff_max = Duration::from_millis(400);
    let mut sv = Supervisor::new(p);
    let mut now = 0;
    let mut id = 1;
    let mut delays = Vec::new();
    assert_eq!(sv.step(t(now), Event::Tick), vec![spawn(1, 0, 1)]);
    for round in 0..6 {
        let pid = 100 + round;
        sv.step(t(now), spawned(id, pid));
        sv.step(t(now), ready(id));
        now += 1;
        assert_eq!(
            sv.step(
                t(now),
                Event::Exited {
                    pid: Pid(pid),
                    reason: ExitReason::Code(3)
                }
            ),
            vec![]
        );
        let at = sv.next_deadline().expect("a restart is scheduled");
        delays.push(at.duration_since(t(now)).as_millis());
        now = at.duration_since(t(0)).as_millis() as u64;
        id += 1;
        assert_eq!(sv.step(t(now), Event::Tick), vec![spawn(id, 0, 1)]);
    }
    assert_eq!(delays, vec![100, 200, 400, 400, 400, 400]);
}

#[test]
fn backoff_resets_after_a_long_life() {
    let mut sv = running(1, 1);
    sv.step(
        t(10),
        Event::Exited {
            pid: Pid(100),
            reason: ExitReason::Code(3),
        },
    );
    assert_eq!(sv.next_deadline(), Some(t(110)));
    sv.step(t(110), Event::Tick);
    sv.step(t(110), spawned(2, 200));
    sv.step(t(120), ready(2));
    sv.step(
        t(120 + 10_000),
        Event::Exited {
            pid: Pid(200),
            reason: ExitReason::Code(3),
        },
    );
    assert_eq!(sv.next_deadline(), Some(t(120 + 10_000 + 100)));
}

#[test]
fn graceful_stop_then_second_stop_kills() {
    let mut sv = running(2, 1);
    let stop = || Event::Request {
        request: Request::Stop,
        reply: None,
    };
    play(
        &mut sv,
        vec![
            (10, stop(), vec![term(1, 100), term(2, 101)]),
            (20, exited(100), vec![]),
            (30, stop(), vec![kill(2, 101)]),
            (40, exited(101), vec![Action::Exit { code: 0 }]),
        ],
    );
}

#[test]
fn scale_up_and_down() {
    let mut sv = running(2, 1);
    let scale = |n| Event::Request {
        request: Request::Scale { workers: n },
        reply: None,
    };
    play(
        &mut sv,
        vec![
            (10, scale(3), vec![spawn(3, 2, 1)]),
            (11, spawned(3, 102), vec![]),
            (12, ready(3), vec![verify(3, 102)]),
            (20, scale(1), vec![term(2, 101), term(3, 102)]),
            (30, exited(101), vec![]),
            (30, exited(102), vec![]),
        ],
    );
    assert_eq!(sv.ready_count(), 1);
}

#[test]
fn memory_replacements_share_the_surge_budget_and_are_not_queued_twice() {
    let mut sv = running(3, 1);
    let replace = |pid| Event::Replace {
        pid: Pid(pid),
        reason: Reason::Memory,
        detail: "pss 600 MiB > 512 MiB".into(),
    };
    play(
        &mut sv,
        vec![
            (10, replace(101), vec![spawn(4, 1, 1)]),
            (10, replace(100), vec![]),
            (10, replace(101), vec![]),
            (11, spawned(4, 201), vec![]),
            (20, ready(4), vec![verify(4, 201), term(2, 101)]),
            (30, exited(101), vec![spawn(5, 0, 1)]),
        ],
    );
    assert_eq!(sv.counters.replacements.get(&Reason::Memory), Some(&2));
}

#[test]
fn ready_delay_mode_uses_the_timer() {
    let mut p = policy(1, 1);
    p.ready = ReadyMode::Delay;
    let mut sv = Supervisor::new(p);
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (0, spawned(1, 100), vec![]),
            (999, Event::Tick, vec![]),
            (1000, Event::Tick, vec![verify(1, 100), Action::AllReady]),
        ],
    );
}

#[test]
fn second_rollout_supersedes_the_first() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(1, 1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
        ],
    );
    let out = sv.step(t(12), rollout(policy(1, 1)));
    assert!(
        matches!(&out[..], [Action::Reply { outcome: Err(e), .. }] if e.contains("superseded")),
        "{out:?}"
    );
    play(
        &mut sv,
        vec![
            (20, ready(2), vec![verify(2, 200), term(1, 100)]),
            (30, exited(100), vec![spawn(3, 0, 3)]),
        ],
    );
}

mod recycle;

#[test]
fn first_ready_is_not_held_back_by_a_replacement_under_way() {
    let mut sv = Supervisor::new(policy(2, 1));
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1), spawn(2, 1, 1)]),
            (0, spawned(1, 100), vec![]),
            (0, spawned(2, 101), vec![]),
            (1, ready(1), vec![verify(1, 100)]),
            // Slot 0 is recycled before slot 1 is ready: its surge worker starts.
            (
                2,
                Event::Replace {
                    pid: Pid(100),
                    reason: Reason::Age,
                    detail: "age".into(),
                },
                vec![spawn(3, 0, 1)],
            ),
            (2, spawned(3, 102), vec![]),
            (3, ready(2), vec![verify(2, 101), Action::AllReady]),
        ],
    );
}
