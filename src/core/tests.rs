//! Tables of (event, expected actions): no processes, no clock, no sleeps.
//!
//! `play` leaves out [`Action::Service`] and [`Action::Released`] (they
//! follow nearly every step); the tables that are about them use `step_all`.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::*;
use crate::config::{Address, AppConfig, Listen, Metric, ReadyMode};
use crate::ids::{Generation, Pid, ReplyTo, Slot, WorkerId};

mod decisions;
mod handover;
mod model;
mod ops;

fn t(ms: u64) -> Instant {
    thread_local!(static T0: Instant = Instant::now());
    T0.with(|t0| *t0 + Duration::from_millis(ms))
}

/// A generation's spec: `workers` test workers, `max_surge`, ready =
/// "notify", and no listener required to count as ready (the socket check
/// has tables of its own).
fn policy(workers: u32, max_surge: u32) -> Spec {
    let mut app: AppConfig = toml::from_str("command = [\"worker\"]").expect("app");
    app.workers = NonZeroU32::new(workers).expect("workers");
    app.max_surge = max_surge;
    app.ready_listeners = Some(Vec::new());
    Spec {
        app,
        program: "/usr/bin/worker".into(),
        listeners: vec![Listen {
            name: "http".into(),
            address: Address::Tcp("127.0.0.1:8080".parse().expect("addr")),
            backlog: 1024,
            mode: None,
        }],
        memory: None,
    }
}

fn new(spec: Spec) -> Supervisor {
    Supervisor::new(spec, Settings::default())
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
    Event::Ready {
        id: WorkerId(id),
        via: ReadyVia::Notify,
    }
}
fn drain(id: u64, pid: i32, signal: Signal) -> Action {
    Action::Drain {
        id: WorkerId(id),
        pid: Pid(pid),
        signal,
    }
}
fn term(id: u64, pid: i32) -> Action {
    drain(id, pid, Signal::SIGTERM)
}
fn kill(id: u64, pid: i32) -> Action {
    Action::Kill {
        id: WorkerId(id),
        pid: Pid(pid),
    }
}
fn exited(pid: i32) -> Event {
    exited_with(pid, ExitReason::Code(0))
}
fn exited_with(pid: i32, reason: ExitReason) -> Event {
    Event::Exited {
        pid: Pid(pid),
        reason,
        output: Vec::new(),
    }
}
fn rollout(p: Spec) -> Event {
    Event::Request {
        request: Request::Rollout { spec: Box::new(p) },
        reply: Some(ReplyTo(9)),
    }
}
fn retire(generation: u64) -> Action {
    Action::Retire {
        generation: Generation(generation),
    }
}

/// Every action of one step.
fn step_all(sv: &mut Supervisor, ms: u64, event: Event) -> Vec<Action> {
    sv.step(t(ms), event)
}

/// One step's actions without the bookkeeping ones (Service, Released).
fn step(sv: &mut Supervisor, ms: u64, event: Event) -> Vec<Action> {
    step_all(sv, ms, event)
        .into_iter()
        .filter(|a| !matches!(a, Action::Service { .. } | Action::Released { .. }))
        .collect()
}

/// A supervisor whose generation 1 is ready: worker ids 1..=n, pids 100...
fn running(workers: u32, max_surge: u32) -> Supervisor {
    running_with(policy(workers, max_surge))
}

fn running_with(spec: Spec) -> Supervisor {
    let workers = spec.app.workers.get();
    let mut sv = new(spec);
    let first = step(&mut sv, 0, Event::Tick);
    assert_eq!(
        first,
        (0..workers)
            .map(|s| spawn(s as u64 + 1, s, 1))
            .collect::<Vec<_>>()
    );
    for s in 0..workers as u64 {
        assert_eq!(step(&mut sv, 1, spawned(s + 1, 100 + s as i32)), vec![]);
    }
    for s in 0..workers as u64 {
        assert_eq!(step(&mut sv, 2, ready(s + 1)), vec![], "ready {s}");
    }
    assert_eq!(sv.service_state(), ServiceState::Ready);
    sv
}

fn play(sv: &mut Supervisor, script: Vec<(u64, Event, Vec<Action>)>) {
    for (i, (ms, event, want)) in script.into_iter().enumerate() {
        let got = step(sv, ms, event.clone());
        assert_eq!(got, want, "step {i}: {event:?}");
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
            (20, ready(3), vec![term(1, 100)]),
            (30, exited(100), vec![spawn(4, 1, 2)]),
            (31, spawned(4, 201), vec![]),
            (40, ready(4), vec![term(2, 101)]),
        ],
    );
    let out = step(&mut sv, 50, exited(101));
    assert!(reply_ok(&out[0]), "{out:?}");
    assert_eq!(out[1..], [retire(1)]);
    assert_eq!(sv.stable(), Generation(2));
    assert_eq!(sv.counters.replacements.get(&Reason::Rollout), Some(&2));
}

#[test]
fn workers_are_numbered_after_those_a_previous_holdfast_left() {
    // Its cgroups worker-1..worker-7 still drain: the first id is 8.
    let mut sv = new(policy(2, 1));
    sv.number_workers_from(8);
    assert_eq!(
        step(&mut sv, 0, Event::Tick),
        vec![spawn(8, 0, 1), spawn(9, 1, 1)]
    );
    // Never backwards.
    sv.number_workers_from(3);
    play(
        &mut sv,
        vec![
            (1, spawned(8, 100), vec![]),
            (1, exited_with(100, ExitReason::Code(1)), vec![]),
        ],
    );
    let respawn = step(&mut sv, 60_000, Event::Tick);
    assert_eq!(respawn, vec![spawn(10, 0, 1)]);
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
            (20, ready(5), vec![term(1, 100)]),
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
            (30, ready(3), vec![term(2, 101)]),
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
    let out = step(&mut sv, 12, exited_with(200, ExitReason::Code(1)));
    assert!(
        matches!(&out[0], Action::Reply { to: ReplyTo(9), outcome: Err(e) } if e.contains("exited before ready (exit status 1)")),
        "{out:?}"
    );
    // Nothing of generation 2 is left: its spec goes; no rollback needed.
    assert_eq!(out[1..], [retire(2)], "{out:?}");
    assert_eq!(sv.counters.failed_rollouts, 1);
    // The old workers were never signalled and nothing restarts.
    assert_eq!(step(&mut sv, 5000, Event::Tick), vec![]);
    assert_eq!(sv.ready_count(), 2);
    assert!(matches!(sv.last_rollout(), Some((Generation(2), Err(_)))));
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
    let out = step(&mut sv, 11 + 60_000, Event::Tick);
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
    // Its exit later changes nothing, but its spec can go.
    assert_eq!(
        step(&mut sv, 100_000, exited_with(200, ExitReason::Signal(9))),
        vec![retire(2)]
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
    let out = step(&mut sv, 12, exited_with(200, ExitReason::Code(1)));
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
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(step(&mut sv, 20, exited(201)), vec![retire(2)]);
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
            (20, ready(3), vec![term(1, 100)]),
            (30, exited(100), vec![spawn(4, 1, 2)]),
            (31, spawned(4, 201), vec![]),
        ],
    );
    let out = step(&mut sv, 40, exited_with(201, ExitReason::Code(1)));
    assert!(matches!(
        out[0],
        Action::Reply {
            outcome: Err(_),
            ..
        }
    ));
    // Back to generation 1, for slot 0, start-before-stop.
    assert_eq!(out[1..], [spawn(5, 0, 1)]);
    play(
        &mut sv,
        vec![
            (41, spawned(5, 300), vec![]),
            (50, ready(5), vec![term(3, 200)]),
            // The rollback is done when worker 3 is gone; so is generation 2.
            (60, exited(200), vec![retire(2)]),
        ],
    );
    assert!(sv.rollout().is_none());
    assert_eq!(sv.stable(), Generation(1));
}

#[test]
fn drain_timeout_sends_sigkill() {
    let mut sv = running(1, 1);
    play(
        &mut sv,
        vec![
            (10, rollout(policy(1, 1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
            (20, ready(2), vec![term(1, 100)]),
            (20 + 29_999, Event::Tick, vec![]),
            (20 + 30_000, Event::Tick, vec![kill(1, 100)]),
        ],
    );
    assert_eq!(sv.counters.drain_kills, 1);
}

#[test]
fn crash_restarts_back_off_and_cap() {
    let mut p = policy(1, 1);
    p.app.restart_backoff_max = Duration::from_millis(400);
    let mut sv = new(p);
    let mut now = 0;
    let mut id = 1;
    let mut delays = Vec::new();
    assert_eq!(step(&mut sv, now, Event::Tick), vec![spawn(1, 0, 1)]);
    for round in 0..6 {
        let pid = 100 + round;
        step(&mut sv, now, spawned(id, pid));
        step(&mut sv, now, ready(id));
        now += 1;
        assert_eq!(
            step(&mut sv, now, exited_with(pid, ExitReason::Code(3))),
            vec![]
        );
        let at = sv.next_deadline().expect("a restart is scheduled");
        delays.push(at.duration_since(t(now)).as_millis());
        now = at.duration_since(t(0)).as_millis() as u64;
        id += 1;
        assert_eq!(step(&mut sv, now, Event::Tick), vec![spawn(id, 0, 1)]);
    }
    assert_eq!(delays, vec![100, 200, 400, 400, 400, 400]);
}

#[test]
fn backoff_resets_after_a_long_life() {
    let mut sv = running(1, 1);
    step(&mut sv, 10, exited_with(100, ExitReason::Code(3)));
    assert_eq!(sv.next_deadline(), Some(t(110)));
    step(&mut sv, 110, Event::Tick);
    step(&mut sv, 110, spawned(2, 200));
    step(&mut sv, 120, ready(2));
    step(&mut sv, 120 + 10_000, exited_with(200, ExitReason::Code(3)));
    assert_eq!(sv.next_deadline(), Some(t(120 + 10_000 + 100)));
}

#[test]
fn graceful_stop_then_second_stop_kills() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (10, stop(), vec![term(1, 100), term(2, 101)]),
            (20, exited(100), vec![]),
            (30, stop(), vec![kill(2, 101)]),
            (40, exited(101), vec![]),
            // The edge lists adopted processes after every exit: nothing left.
            (
                41,
                Event::Adopted { procs: vec![] },
                vec![Action::Exit { code: 0 }],
            ),
            // Decided once: what still comes in changes nothing.
            (42, Event::Adopted { procs: vec![] }, vec![]),
            (43, stop(), vec![]),
        ],
    );
}

fn stop() -> Event {
    Event::Request {
        request: Request::Stop,
        reply: None,
    }
}

fn scale(n: u32) -> Event {
    Event::Request {
        request: Request::Scale(Scale::To(n)),
        reply: Some(ReplyTo(9)),
    }
}

fn reply_err(a: &[Action], needle: &str) -> bool {
    matches!(a, [Action::Reply { to: ReplyTo(9), outcome: Err(e) }] if e.contains(needle))
}

#[test]
fn scale_up_and_down() {
    let mut sv = running(2, 1);
    let ok = |msg: &str| Action::Reply {
        to: ReplyTo(9),
        outcome: Ok(msg.to_string()),
    };
    play(
        &mut sv,
        vec![
            (
                10,
                scale(3),
                vec![ok("scaled to 3 workers"), spawn(3, 2, 1)],
            ),
            (11, spawned(3, 102), vec![]),
            (12, ready(3), vec![]),
            (
                20,
                scale(1),
                vec![term(2, 101), term(3, 102), ok("scaled to 1 workers")],
            ),
            (30, exited(101), vec![]),
            (30, exited(102), vec![]),
        ],
    );
    assert_eq!(sv.ready_count(), 1);
    assert_eq!(sv.workers_wanted(), 1);
}

#[test]
fn ready_delay_mode_uses_the_timer() {
    let mut p = policy(1, 1);
    p.app.ready = ReadyMode::Delay;
    let mut sv = new(p);
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (0, spawned(1, 100), vec![]),
            // READY=1 is not how a delay-mode worker becomes ready.
            (500, ready(1), vec![]),
            (999, Event::Tick, vec![]),
            (1000, Event::Tick, vec![]),
        ],
    );
    assert_eq!(sv.ready_count(), 1);
}

/// `p` with one thing changed (an env var): another config.
fn changed(mut p: Spec, v: &str) -> Spec {
    p.app.env.insert("DEPLOY".into(), v.into());
    p
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
    let out = step(&mut sv, 12, rollout(changed(policy(1, 1), "b")));
    assert!(
        matches!(&out[..], [Action::Reply { outcome: Err(e), .. }] if e.contains("superseded")),
        "{out:?}"
    );
    play(
        &mut sv,
        vec![
            (20, ready(2), vec![term(1, 100)]),
            (30, exited(100), vec![spawn(3, 0, 3)]),
        ],
    );
}

#[test]
fn a_reload_of_the_same_config_during_a_rollout_runs_once_it_ends() {
    let mut sv = running(1, 1);
    let again = |to| Event::Request {
        request: Request::Rollout {
            spec: Box::new(policy(1, 1)),
        },
        reply: Some(ReplyTo(to)),
    };
    play(
        &mut sv,
        vec![
            (10, rollout(policy(1, 1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
            // A storm of the same reload: nothing superseded, nothing spawned.
            (12, again(20), vec![]),
            (13, again(21), vec![]),
            (14, again(22), vec![]),
            (20, ready(2), vec![term(1, 100)]),
        ],
    );
    // The first rollout ends; the folded ones are one more, from now.
    let out = step(&mut sv, 30, exited(100));
    assert!(reply_ok(&out[0]), "{out:?}");
    assert_eq!(out[1..], [spawn(3, 0, 3), retire(1)], "{out:?}");
    play(
        &mut sv,
        vec![
            (31, spawned(3, 300), vec![]),
            (40, ready(3), vec![term(2, 200)]),
        ],
    );
    // Its end answers every folded request.
    let out = step(&mut sv, 50, exited(200));
    let answered: Vec<ReplyTo> = out
        .iter()
        .filter_map(|a| match a {
            Action::Reply { to, outcome: Ok(_) } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(answered, [ReplyTo(20), ReplyTo(21), ReplyTo(22)], "{out:?}");
    assert_eq!(sv.stable(), Generation(3));
}

mod recycle;

/// A worker's crash, restart, spawn, readiness, a scale-down and its
/// drained worker's exit cost no walk of every worker, with 4 workers as
/// with 64: each event's cost must not grow with the table (a walk is left
/// to answers about every worker: status, a rollout's plan, a stop).
#[test]
fn a_workers_life_walks_no_table_whatever_its_size() {
    for n in [4u32, 64] {
        let mut sv = running(n, 1);
        sv.workers.walks.set(0);
        let next = u64::from(n) + 1;
        let last = 100 + n as i32 - 1;
        let script = vec![
            (10, exited_with(100, ExitReason::Code(3)), vec![]),
            (200, Event::Tick, vec![spawn(next, 0, 1)]),
            (201, spawned(next, 5000), vec![]),
            (202, ready(next), vec![]),
        ];
        play(&mut sv, script);
        let down = Event::Request {
            request: Request::Scale(Scale::Down),
            reply: None,
        };
        assert_eq!(step(&mut sv, 300, down), vec![term(u64::from(n), last)]);
        assert_eq!(step(&mut sv, 301, exited(last)), vec![]);
        assert_eq!(sv.workers.walks.get(), 0, "{n} workers");
        assert_eq!(sv.ready_count(), n as usize - 1);
        assert!(sv.all_current_ready());
    }
}
