//! Issue 16's decisions: `restart --slot N`, a failure that quotes the
//! worker's last lines (and points at pid files), and, as PID 1, orphans
//! that are no worker's.

use super::model::{adopted, terminate};
use super::*;

fn replace(slot: u32) -> Event {
    Event::Request {
        request: Request::ReplaceSlot(Slot(slot)),
        reply: Some(ReplyTo(7)),
    }
}

fn answer(outcome: Result<&str, &str>) -> Action {
    Action::Reply {
        to: ReplyTo(7),
        outcome: outcome.map(str::to_string).map_err(str::to_string),
    }
}

fn exited_saying(pid: i32, code: i32, lines: &[&str]) -> Event {
    Event::Exited {
        pid: Pid(pid),
        reason: ExitReason::Code(code),
        output: lines.iter().map(|l| l.to_string()).collect(),
    }
}

fn orphan(pid: i32, holds_listener: bool) -> Event {
    Event::Adopted {
        procs: vec![AdoptedProc {
            pid: Pid(pid),
            pgid: Pid(pid),
            worker: None,
            comm: "sleep".into(),
            holds_listener,
        }],
    }
}

fn as_init(workers: u32) -> Supervisor {
    let mut sv = running(workers, 1);
    sv.settings.init = true;
    sv
}

#[test]
fn restart_slot_replaces_one_worker_start_before_stop_and_answers_when_ready() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            // Slot 1 only, with its own generation (1): no config is read.
            (10, replace(1), vec![spawn(3, 1, 1)]),
            (11, spawned(3, 200), vec![]),
            (
                20,
                ready(3),
                vec![
                    answer(Ok(
                        "slot 1 replaced: pid 101 → pid 200 (generation 1) is ready",
                    )),
                    term(2, 101),
                ],
            ),
            (30, exited(101), vec![]),
        ],
    );
    assert_eq!(sv.counters.replacements.get(&Reason::Manual), Some(&1));
    let pids: Vec<_> = sv.workers().filter_map(|w| w.pid).collect();
    assert_eq!(pids, [Pid(100), Pid(200)], "slot 0 untouched");
    assert_eq!(sv.stable(), Generation(1));
}

#[test]
fn restart_slot_with_max_surge_zero_drains_first_then_answers() {
    let mut sv = running(2, 0);
    play(
        &mut sv,
        vec![
            (10, replace(0), vec![term(1, 100)]),
            (20, exited(100), vec![spawn(3, 0, 1)]),
            (21, spawned(3, 200), vec![]),
            (
                30,
                ready(3),
                vec![answer(Ok(
                    "slot 0 replaced: pid 200 (generation 1) is ready",
                ))],
            ),
        ],
    );
}

#[test]
fn restart_slot_is_refused_for_a_slot_that_does_not_exist_or_has_no_ready_worker() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (
                10,
                replace(2),
                vec![answer(Err(
                    "slot 2 does not exist: holdfast runs 2 worker(s), slots 0 to 1",
                ))],
            ),
            // Slot 1 crashes: nothing ready to replace while it waits.
            (20, exited_with(101, ExitReason::Code(1)), vec![]),
            (
                21,
                replace(1),
                vec![answer(Err(
                    "slot 1 has no ready worker to replace (it is starting or waiting to restart)",
                ))],
            ),
            (30, stop(), vec![term(1, 100)]),
            (31, replace(0), vec![answer(Err("holdfast is stopping"))]),
        ],
    );
}

#[test]
fn restart_slot_whose_new_worker_fails_answers_why_and_the_old_one_keeps_serving() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, replace(0), vec![spawn(3, 0, 1)]),
            (11, spawned(3, 200), vec![]),
        ],
    );
    let out = step(&mut sv, 12, exited_saying(200, 1, &["booting", "boom"]));
    assert_eq!(
        out,
        [answer(Err(
            "slot 0: the new worker (generation 1) failed: exited before ready (exit status 1); its last output lines:\n  | booting\n  | boom; the old worker (pid 100) keeps serving"
        ))]
    );
    assert_eq!(sv.ready_count(), 2);
    assert!(sv.workers().any(|w| w.pid == Some(Pid(100))));
}

#[test]
fn restart_slot_joins_a_replacement_under_way_and_a_crash_before_it_answers_why() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            // Slot 0 is being replaced by the rollout: joined, no second spawn.
            (11, replace(0), vec![]),
            // Slot 1 is queued for the rollout: joined too.
            (
                12,
                Event::Request {
                    request: Request::ReplaceSlot(Slot(1)),
                    reply: Some(ReplyTo(8)),
                },
                vec![],
            ),
            (13, spawned(3, 200), vec![]),
            (
                20,
                ready(3),
                vec![
                    answer(Ok(
                        "slot 0 replaced: pid 100 → pid 200 (generation 2) is ready",
                    )),
                    term(1, 100),
                ],
            ),
        ],
    );
    // Slot 1's worker crashes before its turn: its waiter learns it.
    let out = step(&mut sv, 30, exited_with(101, ExitReason::Code(1)));
    assert!(
        out.contains(&Action::Reply {
            to: ReplyTo(8),
            outcome: Err("the worker of slot 1 (pid 101) stopped before its replacement was ready (it exited, or its slot was scaled away); a crashed slot restarts on its own".into())
        }),
        "{out:?}"
    );
}

#[test]
fn a_stop_answers_restart_slot_waiters() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, replace(0), vec![spawn(2, 0, 1)]),
            (11, spawned(2, 200), vec![]),
        ],
    );
    let out = step(&mut sv, 12, stop());
    assert_eq!(out[0], answer(Err("holdfast is stopping")), "{out:?}");
}

#[test]
fn a_failed_rollout_quotes_the_workers_last_lines_and_points_at_pid_files() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
        ],
    );
    assert!(
        sv.exit_would_fail(Pid(200)),
        "a starting worker's exit is a failure"
    );
    assert!(
        !sv.exit_would_fail(Pid(100)),
        "a ready worker's exit is a crash"
    );
    let lines = [
        "I, [2026-01-01T00:00:00 #200]  INFO -- : reaped",
        "F, [2026-01-01T00:00:00 #200] FATAL -- : error adding listener addr=127.0.0.1:8080",
        "ArgumentError: Already running on PID:100 (or pid=/srv/app/unicorn.pid is stale)",
    ];
    let out = step(&mut sv, 12, exited_saying(200, 1, &lines));
    let Some(Action::Reply {
        outcome: Err(e), ..
    }) = out.first()
    else {
        panic!("{out:?}")
    };
    let want = format!(
        "rollout of generation 2 failed: slot 0 (generation 2): exited before ready (exit status 1); its last output lines:\n  | {}\n  | {}\n  | {}\nhint: the server found a pid file written by another copy of it.",
        lines[0], lines[1], lines[2]
    );
    assert!(e.starts_with(&want), "{e}");
    assert!(e.contains("HOLDFAST_WORKER_SERIAL"), "{e}");
    let last = sv.last_rollout().cloned();
    assert!(matches!(last, Some((Generation(2), Err(m))) if m == *e));
}

#[test]
fn output_is_quoted_only_when_there_is_some_and_the_hint_only_for_pid_files() {
    use crate::core::lifecycle::with_output;
    let table: [(&[&str], &str); 4] = [
        (&[], "exited"),
        (&["boom"], "exited; its last output lines:\n  | boom"),
        // Gunicorn's wording.
        (
            &["Error: Already running on PID 4242 (or pid file '/run/g.pid' is stale)"],
            "exited; its last output lines:\n  | Error: Already running on PID 4242 (or pid file '/run/g.pid' is stale)\nhint: the server found a pid file",
        ),
        // "already running" without a pid is something else.
        (
            &["a job is already running"],
            "exited; its last output lines:\n  | a job is already running",
        ),
    ];
    for (i, (lines, want)) in table.into_iter().enumerate() {
        let lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let got = with_output("exited".into(), &lines);
        assert!(got.starts_with(want), "row {i}: {got}");
        assert_eq!(
            got.contains("hint:"),
            want.contains("hint:"),
            "row {i}: {got}"
        );
    }
    // At most ten lines are quoted, the last ones.
    let many: Vec<String> = (0..15).map(|i| format!("l{i}")).collect();
    let got = with_output("x".into(), &many);
    assert!(got.contains("| l5\n") && !got.contains("| l4\n"), "{got}");
}

#[test]
fn as_pid_1_an_orphan_that_is_no_workers_is_reaped_not_stopped() {
    let mut sv = as_init(1);
    play(
        &mut sv,
        vec![
            // A `docker exec`'s orphan: no worker serial, no worker's group.
            (10, orphan(500, false), vec![]),
            // Listed again every second: still left alone, logged once.
            (1_010, orphan(500, false), vec![]),
            // It exits: reaped (the edge's waitpid), nothing to decide.
            (2_000, exited(500), vec![]),
        ],
    );
    assert_eq!(sv.counters.strays_stopped, 0);
    assert_eq!(sv.strays().count(), 0);
    // A stop does not wait for such a process: holdfast exits (and the
    // kernel ends the namespace's processes with its PID 1).
    play(
        &mut sv,
        vec![
            (3_000, orphan(501, false), vec![]),
            (3_001, stop(), vec![term(1, 100)]),
        ],
    );
    let out = step(&mut sv, 3_010, exited(100));
    let out: Vec<_> = out
        .into_iter()
        .filter(|a| !matches!(a, Action::Retire { .. }))
        .collect();
    assert_eq!(out, vec![]);
    let out = step(&mut sv, 3_011, orphan(501, false));
    assert_eq!(out, vec![Action::Exit { code: 0 }]);
}

#[test]
fn as_pid_1_an_orphan_holding_a_listener_is_stopped_and_outside_a_namespace_every_orphan_is() {
    // It holds holdfast's listening socket: a worker's descendant that
    // lost its trace, keeping the port busy.
    let mut sv = as_init(1);
    assert_eq!(step(&mut sv, 10, orphan(500, true)), vec![terminate(500)]);
    assert_eq!(sv.counters.strays_stopped, 1);
    // Not PID 1: only holdfast's descendants are re-parented to it.
    let mut sv = running(1, 1);
    assert_eq!(step(&mut sv, 10, orphan(500, false)), vec![terminate(500)]);
    // As PID 1, a worker's own descendant is still handled as one.
    let mut sv = as_init(1);
    assert_eq!(step(&mut sv, 10, adopted(&[(600, 600, Some(1))])), vec![]);
    assert_eq!(step(&mut sv, 20, exited(100)), vec![terminate(600)]);
}

#[test]
fn readiness_holds_through_a_healthy_rollout_and_goes_at_once_on_stop() {
    let mut sv = running(2, 1);
    assert_eq!(
        sv.readiness(),
        Ok("ready: 2/2 slots have a ready worker, generation 1".into())
    );
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
            (20, ready(3), vec![term(1, 100)]),
            (30, exited(100), vec![spawn(4, 1, 2)]),
        ],
    );
    // Slot 0 runs generation 2, slot 1 still 1: both count.
    assert_eq!(
        sv.readiness(),
        Ok("ready: 2/2 slots have a ready worker, generation 1 (rollout to 2)".into())
    );
    // A crash empties a slot: unready, with the count.
    play(
        &mut sv,
        vec![(31, exited_with(101, ExitReason::Code(1)), vec![])],
    );
    assert_eq!(
        sv.readiness(),
        Err("1/2 slots have a ready worker of generation 1 (rollout to 2)".into())
    );
    // A stop: unready before any worker has drained.
    let _ = step(&mut sv, 40, stop());
    assert_eq!(sv.readiness(), Err("holdfast is stopping".into()));
    assert!(!sv.all_current_ready());
}

#[test]
fn an_upgrade_hands_over_restart_slot_waiters_pid_1_and_the_orphans_reported() {
    let mut sv = as_init(2);
    play(
        &mut sv,
        vec![
            (5, orphan(900, false), vec![]),
            (10, replace(1), vec![spawn(3, 1, 1)]),
            (11, spawned(3, 200), vec![]),
        ],
    );
    let state = sv.handover(t(12));
    let json = serde_json::to_string(&state).expect("serialize");
    let mut restored =
        Supervisor::restore(serde_json::from_str(&json).expect("read"), t(12)).expect("restore");
    assert_eq!(restored.handover(t(12)), state);
    assert!(restored.settings.init);
    // The new image answers the waiter once the new worker is ready.
    play(
        &mut restored,
        vec![(
            20,
            ready(3),
            vec![
                answer(Ok(
                    "slot 1 replaced: pid 101 → pid 200 (generation 1) is ready",
                )),
                term(2, 101),
            ],
        )],
    );
}
