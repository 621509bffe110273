//! The core's model of its workers (issue 11): every generation keeps its
//! own spec, every descendant is accounted for, "ready" means serving, no
//! input can break it, and every decision is here (reopen targets, sampling,
//! scale arithmetic, what systemd is told).

use super::*;
use crate::config::{MemoryConfig, SignalName};

pub(super) fn probe_failing(workers: u32) -> Spec {
    let mut p = policy(workers, 1);
    p.app.ready = ReadyMode::Probe;
    p.app.ready_timeout = Duration::from_secs(3);
    p.app.command = crate::config::Argv(vec!["worker".into(), "--probe-fail".into()]);
    p
}

pub(super) fn with_signal(mut p: Spec, signal: Signal, timeout: u64) -> Spec {
    p.app.drain_signal = SignalName(signal);
    p.app.drain_timeout = Duration::from_secs(timeout);
    p
}

pub(super) fn probe_ready(id: u64) -> Event {
    Event::Ready {
        id: WorkerId(id),
        via: ReadyVia::Probe,
    }
}

pub(super) fn terminate(pid: i32) -> Action {
    Action::Terminate { pid: Pid(pid) }
}

pub(super) fn signal(pid: i32, signal: Signal) -> Action {
    Action::Signal {
        pid: Pid(pid),
        signal,
    }
}

pub(super) fn adopted(procs: &[(i32, i32, Option<u64>)]) -> Event {
    Event::Adopted {
        procs: procs
            .iter()
            .map(|&(pid, pgid, worker)| AdoptedProc {
                pid: Pid(pid),
                pgid: Pid(pgid),
                worker: worker.map(WorkerId),
                comm: "daemon".into(),
                holds_listener: false,
            })
            .collect(),
    }
}

pub(super) fn released(id: u64) -> Action {
    Action::Released { id: WorkerId(id) }
}

// ---------------------------------------------------------------- 1. a spec per generation

#[test]
fn after_a_failed_deploy_a_crashed_old_worker_restarts_with_its_own_spec() {
    // Generation 1: ready = "notify". Generation 2: a probe that fails.
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(probe_failing(2)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
        ],
    );
    let out = step(&mut sv, 3_011, Event::Tick);
    assert_eq!(out[0], term(3, 200), "{out:?}");
    assert!(
        matches!(&out[1], Action::Reply { outcome: Err(e), .. } if e.contains("not ready after 3s")),
        "{out:?}"
    );
    assert_eq!(step(&mut sv, 3_100, exited(200)), vec![retire(2)]);
    // Now every old worker crashes, one after the other.
    for (slot, pid, new_id, new_pid) in [(0u32, 100, 4u64, 300), (1, 101, 5, 301)] {
        let t0 = 5_000 + slot as u64 * 1_000;
        assert_eq!(
            step(&mut sv, t0, exited_with(pid, ExitReason::Code(3))),
            vec![]
        );
        play(
            &mut sv,
            vec![
                // Restarted with generation 1 after the backoff...
                (t0 + 100, Event::Tick, vec![spawn(new_id, slot, 1)]),
                (t0 + 101, spawned(new_id, new_pid), vec![]),
                // ...judged by generation 1's ready mode: a probe answer does not count,
                (t0 + 150, probe_ready(new_id), vec![]),
                // READY=1 does.
                (t0 + 200, ready(new_id), vec![]),
            ],
        );
        assert!(sv
            .worker(WorkerId(new_id))
            .is_some_and(|w| w.state.is_ready()));
    }
    // No crash loop: three seconds later nothing happens, both slots serve.
    assert_eq!(step(&mut sv, 20_000, Event::Tick), vec![]);
    assert_eq!(sv.ready_count(), 2);
    // A failed rollout worker is no restart of the slot; each crash is one.
    assert_eq!(sv.slot_info(Slot(0)).map(|s| s.restarts), Some(1));
    assert_eq!(sv.slot_info(Slot(1)).map(|s| s.restarts), Some(1));
    assert!(sv.all_current_ready());
}

#[test]
fn old_workers_drain_with_their_own_generations_signal_and_deadline() {
    // Unicorn: QUIT is graceful, TERM drops requests. A new config says TERM.
    let mut sv = running_with(with_signal(policy(1, 1), Signal::SIGQUIT, 30));
    play(
        &mut sv,
        vec![
            (
                10,
                rollout(with_signal(policy(1, 1), Signal::SIGTERM, 5)),
                vec![spawn(2, 0, 2)],
            ),
            (11, spawned(2, 200), vec![]),
            // The old worker gets generation 1's QUIT...
            (20, ready(2), vec![drain(1, 100, Signal::SIGQUIT)]),
            // ...and generation 1's 30 s, not generation 2's 5 s.
            (5_020, Event::Tick, vec![]),
            (30_019, Event::Tick, vec![]),
            (30_020, Event::Tick, vec![kill(1, 100)]),
        ],
    );
    // Generation 2's own workers get its TERM.
    play(&mut sv, vec![]);
    let out = step(&mut sv, 30_030, exited_with(100, ExitReason::Signal(9)));
    assert!(reply_ok(&out[0]), "{out:?}");
    assert_eq!(out[1..], [retire(1)]);
    play(&mut sv, vec![(30_040, stop(), vec![term(2, 200)])]);
}

#[test]
fn ready_timeout_is_the_generations() {
    let mut slow = policy(1, 1);
    slow.app.ready_timeout = Duration::from_secs(120);
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(slow), vec![spawn(2, 0, 2)]),
            (10, spawned(2, 200), vec![]),
        ],
    );
    assert_eq!(sv.next_deadline(), Some(t(10) + Duration::from_secs(120)));
}

#[test]
fn a_failed_rollout_restores_the_worker_count_of_the_good_generation() {
    let mut sv = running(2, 1);
    // Three workers wanted: slot 2 is new, slots 0 and 1 are replaced in turn.
    let out = step(&mut sv, 10, rollout(policy(3, 1)));
    assert_eq!(out, vec![spawn(3, 2, 2), spawn(4, 0, 2)]);
    play(
        &mut sv,
        vec![
            (11, spawned(3, 200), vec![]),
            (11, spawned(4, 201), vec![]),
            (20, ready(4), vec![term(1, 100)]),
            (30, exited(100), vec![spawn(5, 1, 2)]),
            (31, spawned(5, 202), vec![]),
        ],
    );
    // Slot 2's new worker dies before it is ready: the rollout fails, the
    // count goes back to 2, slot 1's starting worker drains, slot 0 rolls back.
    let out = step(&mut sv, 40, exited_with(200, ExitReason::Code(1)));
    assert_eq!(out[0], term(5, 202), "{out:?}");
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
    assert_eq!(out[2..], [spawn(6, 0, 1)], "{out:?}");
    assert_eq!(sv.workers_wanted(), 2);
    assert_eq!(sv.rollout().map(|r| r.rollback), Some(true));
    play(
        &mut sv,
        vec![
            (41, exited(202), vec![]),
            (42, spawned(6, 300), vec![]),
            (50, ready(6), vec![term(4, 201)]),
            (60, exited(201), vec![retire(2)]),
        ],
    );
    assert_eq!(sv.stable(), Generation(1));
    assert_eq!(sv.ready_count(), 2);
    assert!(sv.rollout().is_none());
}

#[test]
fn a_crash_during_a_rollout_restarts_the_slot_with_its_own_generation() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
            // Slot 1 (generation 1, not yet replaced) crashes.
            (12, exited_with(101, ExitReason::Code(3)), vec![]),
            (112, Event::Tick, vec![spawn(4, 1, 1)]),
            (113, spawned(4, 201), vec![]),
            (114, ready(4), vec![]),
            // The rollout goes on and replaces it in its turn.
            (120, ready(3), vec![term(1, 100)]),
            (130, exited(100), vec![spawn(5, 1, 2)]),
        ],
    );
}

#[test]
fn memory_rules_are_the_workers_generations() {
    let limited: MemoryConfig =
        toml::from_str("limit = \"100MiB\"\ngrace = 1\nmin_lifetime = \"0s\"\ninterval = \"1s\"")
            .expect("[memory]");
    let mut g1 = policy(2, 1);
    g1.memory = Some(limited);
    let mut sv = running_with(g1);
    // Generation 2 has no [memory]: its workers are neither sampled nor judged.
    play(
        &mut sv,
        vec![
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
            (12, ready(3), vec![term(1, 100)]),
        ],
    );
    let out = step(&mut sv, 1_000, Event::Tick);
    assert_eq!(
        out,
        vec![Action::Sample {
            targets: vec![SampleTarget {
                id: WorkerId(2),
                pid: Pid(101),
                metric: Metric::Pss,
            }]
        }]
    );
}

#[test]
fn scale_is_bounded_and_one_step_at_a_time() {
    let mut p = policy(2, 1);
    p.app.max_workers = std::num::NonZeroU32::new(3).expect("3");
    let mut sv = running_with(p);
    let up = || Event::Request {
        request: Request::Scale(Scale::Up),
        reply: Some(ReplyTo(9)),
    };
    let down = || Event::Request {
        request: Request::Scale(Scale::Down),
        reply: Some(ReplyTo(9)),
    };
    let out = step(&mut sv, 10, up());
    assert_eq!(out[1..], [spawn(3, 2, 1)], "{out:?}");
    assert!(reply_err(&step(&mut sv, 11, up()), "above max_workers = 3"));
    assert!(reply_err(
        &step(&mut sv, 12, scale(u32::MAX)),
        "cannot scale to 4294967295 workers: above max_workers = 3"
    ));
    assert!(reply_err(&step(&mut sv, 13, scale(0)), "at least 1"));
    assert_eq!(sv.workers_wanted(), 3);
    play(
        &mut sv,
        vec![(20, spawned(3, 102), vec![]), (21, ready(3), vec![])],
    );
    let out = step(&mut sv, 30, down());
    assert_eq!(out[0], term(3, 102), "{out:?}");
    let out = step(&mut sv, 31, down());
    assert_eq!(out[0], term(2, 101), "{out:?}");
    assert!(reply_err(&step(&mut sv, 32, down()), "at least 1"));
    assert_eq!(sv.workers_wanted(), 1);
}

#[test]
fn a_scale_during_a_rollout_outlives_its_failure() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(probe_failing(1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
        ],
    );
    // Scaled to 2 while the rollout runs: the new slot starts at the target.
    let out = step(&mut sv, 12, scale(2));
    assert_eq!(out[1..], [spawn(3, 1, 2)], "{out:?}");
    step(&mut sv, 13, spawned(3, 201));
    // The rollout fails; the operator's 2 workers stay, slot 1 at generation 1.
    let out = step(&mut sv, 3_013, Event::Tick);
    assert!(
        out.contains(&term(2, 200)) && out.contains(&term(3, 201)),
        "{out:?}"
    );
    // Slot 1 starts again at once, with generation 1, while its failed worker drains.
    assert!(out.contains(&spawn(4, 1, 1)), "{out:?}");
    assert_eq!(sv.workers_wanted(), 2);
}

#[test]
fn a_generation_is_retired_once_nothing_uses_it() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(1, 1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
        ],
    );
    // A second rollout, of another config, supersedes the first before it ends.
    let mut other = policy(1, 1);
    other.app.env.insert("DEPLOY".into(), "b".into());
    let out = step(&mut sv, 12, rollout(other));
    assert!(
        matches!(&out[..], [Action::Reply { outcome: Err(e), .. }] if e.contains("superseded")),
        "{out:?}"
    );
    assert!(sv.spec(Generation(2)).is_some(), "worker 2 still runs it");
    play(
        &mut sv,
        vec![
            (20, ready(2), vec![term(1, 100)]),
            (30, exited(100), vec![spawn(3, 0, 3)]),
            (31, spawned(3, 300), vec![]),
            (40, ready(3), vec![term(2, 200)]),
        ],
    );
    let out = step(&mut sv, 50, exited(200));
    assert!(
        out.contains(&retire(1)) && out.contains(&retire(2)),
        "{out:?}"
    );
    let kept: Vec<Generation> = sv.specs().map(|(g, _)| g).collect();
    assert_eq!(kept, vec![Generation(3)]);
}

// ---------------------------------------------------------------- 2. every descendant

#[test]
fn a_daemon_of_a_live_worker_is_left_alone_and_ends_with_it() {
    let mut sv = running(1, 1);
    // pid 500 left worker 1's group (setsid) and was re-parented to holdfast.
    play(
        &mut sv,
        vec![
            (10, adopted(&[(500, 500, Some(1))]), vec![]),
            (20, adopted(&[(500, 500, Some(1))]), vec![]),
            (30, rollout(policy(1, 1)), vec![spawn(2, 0, 2)]),
            (31, spawned(2, 200), vec![]),
            (40, ready(2), vec![term(1, 100)]),
        ],
    );
    assert_eq!(sv.strays().count(), 1);
    // The worker's own process is gone: its daemon gets SIGTERM now...
    let out = step_all(&mut sv, 50, exited(100));
    assert!(out.contains(&terminate(500)), "{out:?}");
    // ...the worker is not released while its daemon lives...
    assert!(!out.contains(&released(1)), "{out:?}");
    // ...and SIGKILL after generation 1's drain_timeout.
    play(
        &mut sv,
        vec![
            (30_049, Event::Tick, vec![]),
            (30_050, Event::Tick, vec![signal(500, Signal::SIGKILL)]),
        ],
    );
    let out = step_all(&mut sv, 30_060, exited_with(500, ExitReason::Signal(9)));
    assert!(out.contains(&released(1)), "{out:?}");
    assert_eq!(sv.counters.strays_stopped, 1);
}

#[test]
fn a_daemon_is_sigkilled_with_its_worker_at_the_drain_deadline() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, adopted(&[(500, 500, Some(1))]), vec![]),
            (20, stop(), vec![term(1, 100)]),
            (
                30_020,
                Event::Tick,
                vec![kill(1, 100), signal(500, Signal::SIGKILL)],
            ),
            // The worker is reaped first: holdfast does not exit yet.
            (30_030, exited_with(100, ExitReason::Signal(9)), vec![]),
            (30_031, adopted(&[(500, 500, Some(1))]), vec![]),
            (
                30_040,
                exited_with(500, ExitReason::Signal(9)),
                vec![Action::Exit { code: 0 }],
            ),
        ],
    );
}

#[test]
fn a_stop_waits_for_every_descendant() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, adopted(&[(500, 500, Some(1))]), vec![]),
            (20, stop(), vec![term(1, 100)]),
            // The worker drains in time; its daemon is told to go.
            (1_000, exited(100), vec![terminate(500)]),
            (1_001, adopted(&[(500, 500, Some(1))]), vec![]),
            (1_500, exited(500), vec![Action::Exit { code: 0 }]),
        ],
    );
}

#[test]
fn a_stop_ends_only_after_the_listing_that_follows_the_last_exit() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (20, stop(), vec![term(1, 100)]),
            // The daemon was the worker's child until now: not known yet.
            (1_000, exited(100), vec![]),
            (1_001, adopted(&[(700, 700, Some(1))]), vec![terminate(700)]),
            (1_002, exited(700), vec![Action::Exit { code: 0 }]),
        ],
    );
}

#[test]
fn a_descendant_of_no_live_worker_is_stopped() {
    let mut sv = running(1, 1);
    // No serial, and its group is nobody's.
    play(
        &mut sv,
        vec![
            (10, adopted(&[(600, 600, None)]), vec![terminate(600)]),
            // Listed again: not signalled twice.
            (20, adopted(&[(600, 600, None)]), vec![]),
            (30_010, Event::Tick, vec![signal(600, Signal::SIGKILL)]),
        ],
    );
    // Not listed any more: forgotten.
    assert_eq!(step(&mut sv, 30_020, adopted(&[])), vec![]);
    assert_eq!(sv.strays().count(), 0);
}

#[test]
fn a_descendant_is_attributed_by_its_process_group_without_a_serial() {
    let mut sv = running(1, 1);
    // A group member of worker 1 (pgid 100) whose parent died: the worker's.
    assert_eq!(step(&mut sv, 10, adopted(&[(700, 100, None)])), vec![]);
    assert_eq!(sv.strays().next().and_then(|s| s.worker), Some(WorkerId(1)));
}

#[test]
fn a_crash_looping_worker_leaves_no_daemons_behind() {
    let mut sv = running(1, 1);
    let mut id = 1;
    let mut pid = 100;
    let mut now = 10;
    for round in 0..5 {
        let daemon = 1000 + round;
        assert_eq!(
            step(&mut sv, now, adopted(&[(daemon, daemon, Some(id))])),
            vec![]
        );
        now += 10;
        let out = step(&mut sv, now, exited_with(pid, ExitReason::Code(3)));
        assert_eq!(out, vec![terminate(daemon)], "round {round}");
        now += 1;
        step(&mut sv, now, exited(daemon));
        now = sv
            .next_deadline()
            .map_or(now, |d| d.duration_since(t(0)).as_millis() as u64);
        id += 1;
        pid += 1;
        assert_eq!(step(&mut sv, now, Event::Tick), vec![spawn(id, 0, 1)]);
        step(&mut sv, now, spawned(id, pid));
        step(&mut sv, now, ready(id));
    }
    assert_eq!(sv.strays().count(), 0);
    assert_eq!(sv.counters.strays_stopped, 5);
}

#[test]
fn a_stop_gives_up_on_a_process_sigkill_cannot_end() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, adopted(&[(600, 600, None)]), vec![terminate(600)]),
            (20, stop(), vec![term(1, 100)]),
            (30, exited(100), vec![]),
            (31, adopted(&[(600, 600, None)]), vec![]),
            (30_010, Event::Tick, vec![signal(600, Signal::SIGKILL)]),
            (35_009, Event::Tick, vec![]),
            (35_010, Event::Tick, vec![Action::Exit { code: 0 }]),
        ],
    );
}
