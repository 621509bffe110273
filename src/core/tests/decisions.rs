//! The core's model of its workers (issue 11), continued: "ready" means
//! serving, no input can break it, and every decision is here (reopen
//! targets, sampling, scale arithmetic, what systemd is told).

use super::model::*;
use super::*;
use crate::config::MemoryConfig;

// ---------------------------------------------------------------- 3. ready means serving

fn serving(workers: u32) -> Spec {
    let mut p = policy(workers, 1);
    p.app.ready_listeners = None;
    p
}

fn check(id: u64, pid: i32, generation: u64) -> Action {
    Action::CheckSockets {
        id: WorkerId(id),
        pid: Pid(pid),
        generation: Generation(generation),
    }
}

fn checked(id: u64, missing: &[&str]) -> Event {
    Event::SocketsChecked {
        id: WorkerId(id),
        missing: missing.iter().map(|m| m.to_string()).collect(),
    }
}

#[test]
fn ready_is_checked_against_the_sockets_before_it_counts() {
    let mut sv = new(serving(1));
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (1, spawned(1, 100), vec![]),
            (2, ready(1), vec![check(1, 100, 1)]),
        ],
    );
    assert_eq!(sv.ready_count(), 0);
    assert_eq!(sv.service_state(), ServiceState::Starting);
    play(&mut sv, vec![(3, checked(1, &[]), vec![])]);
    assert_eq!(sv.ready_count(), 1);
    assert_eq!(sv.service_state(), ServiceState::Ready);
}

#[test]
fn ready_without_the_sockets_fails_the_rollout_and_keeps_the_old_generation() {
    let mut sv = new(serving(1));
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (1, spawned(1, 100), vec![]),
            (2, ready(1), vec![check(1, 100, 1)]),
            (3, checked(1, &[]), vec![]),
            (10, rollout(serving(1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
            (12, ready(2), vec![check(2, 200, 2)]),
        ],
    );
    let out = step(&mut sv, 13, checked(2, &["127.0.0.1:8080"]));
    assert_eq!(out[0], term(2, 200), "{out:?}");
    assert!(
        matches!(&out[1], Action::Reply { outcome: Err(e), .. }
            if e.contains("no process of its tree holds 127.0.0.1:8080") && e.contains("ready_listeners")),
        "{out:?}"
    );
    // The good worker was never signalled.
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(sv.ready_count(), 1);
    assert!(matches!(sv.last_rollout(), Some((Generation(2), Err(_)))));
}

#[test]
fn a_first_worker_without_its_sockets_is_restarted_after_backoff() {
    let mut sv = new(serving(1));
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (1, spawned(1, 100), vec![]),
            (2, ready(1), vec![check(1, 100, 1)]),
            (3, checked(1, &["unix:/run/app.sock"]), vec![term(1, 100)]),
            (4, exited(100), vec![]),
            (103, Event::Tick, vec![spawn(2, 0, 1)]),
        ],
    );
    assert_eq!(sv.slot_info(Slot(0)).map(|s| s.restarts), Some(1));
}

#[test]
fn a_ready_claim_in_the_wrong_mode_is_ignored() {
    let mut p = policy(1, 1);
    p.app.ready = ReadyMode::Probe;
    let mut sv = new(p);
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (1, spawned(1, 100), vec![]),
            // Gunicorn's arbiter says READY=1 before its workers boot.
            (2, ready(1), vec![]),
        ],
    );
    assert_eq!(sv.ready_count(), 0);
    play(&mut sv, vec![(3, probe_ready(1), vec![])]);
    assert_eq!(sv.ready_count(), 1);
}

// ---------------------------------------------------------------- 4. no input can break it

#[test]
fn absurd_durations_saturate_instead_of_overflowing() {
    let mut p = policy(1, 1);
    p.app.ready_timeout = Duration::MAX;
    p.app.drain_timeout = Duration::MAX;
    p.app.restart_backoff_max = Duration::MAX;
    let mut sv = new(p);
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (1, spawned(1, 100), vec![]),
            (2, ready(1), vec![]),
            (3, stop(), vec![term(1, 100)]),
        ],
    );
    assert!(sv.next_deadline().is_some_and(|d| d > t(3)));
    assert!(later(t(0), Duration::MAX) > t(0));
}

// ---------------------------------------------------------------- 5. decisions in the core

#[test]
fn the_reopen_signal_goes_to_running_workers_only() {
    let mut sv = Supervisor::new(
        policy(2, 1),
        Settings {
            seed: 0,
            reopen_signal: Some(Signal::SIGUSR1),
            init: false,
        },
    );
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1), spawn(2, 1, 1)]),
            (1, spawned(1, 100), vec![]),
            (1, spawned(2, 101), vec![]),
            (2, ready(1), vec![]),
            (2, ready(2), vec![]),
            (10, rollout(policy(2, 1)), vec![spawn(3, 0, 2)]),
            (11, spawned(3, 200), vec![]),
            (12, ready(3), vec![term(1, 100)]),
        ],
    );
    // Worker 1 drains: USR1 (Puma: a phased restart) must not reach it.
    let out = step(
        &mut sv,
        20,
        Event::Request {
            request: Request::ReopenLogs,
            reply: Some(ReplyTo(9)),
        },
    );
    assert_eq!(
        out,
        vec![
            signal(101, Signal::SIGUSR1),
            signal(200, Signal::SIGUSR1),
            Action::ReopenLogs {
                reply: Some(ReplyTo(9)),
                signalled: Some((Signal::SIGUSR1, 2)),
            },
        ]
    );
}

#[test]
fn sampling_rounds_are_scheduled_and_a_lost_one_is_replaced() {
    let limited: MemoryConfig =
        toml::from_str("limit = \"1GiB\"\ninterval = \"5s\"").expect("[memory]");
    let mut p = policy(1, 1);
    p.memory = Some(limited);
    let mut sv = running_with(p);
    let round = || Action::Sample {
        targets: vec![SampleTarget {
            id: WorkerId(1),
            pid: Pid(100),
            metric: Metric::Pss,
        }],
    };
    // Scheduled at the first step (t(0)): due an interval later.
    assert_eq!(step(&mut sv, 3, Event::Tick), vec![]);
    assert_eq!(sv.next_deadline(), Some(t(5_000)));
    assert_eq!(step(&mut sv, 5_000, Event::Tick), vec![round()]);
    // Still running at the next interval: skipped.
    assert_eq!(step(&mut sv, 10_000, Event::Tick), vec![]);
    // Answered: the next one goes.
    step(&mut sv, 11_000, Event::MemorySample { samples: vec![] });
    assert_eq!(step(&mut sv, 15_000, Event::Tick), vec![round()]);
    // Never answered: a minute later it is lost, and a new one starts.
    assert_eq!(step(&mut sv, 20_000, Event::Tick), vec![]);
    assert_eq!(step(&mut sv, 80_000, Event::Tick), vec![round()]);
}

#[test]
fn systemd_is_told_each_state_once() {
    let mut sv = new(policy(1, 1));
    let told = |out: Vec<Action>| -> Vec<ServiceState> {
        out.into_iter()
            .filter_map(|a| match a {
                Action::Service { state, .. } => Some(state),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        told(step_all(&mut sv, 0, Event::Tick)),
        [ServiceState::Starting]
    );
    step_all(&mut sv, 1, spawned(1, 100));
    assert_eq!(told(step_all(&mut sv, 2, ready(1))), [ServiceState::Ready]);
    assert_eq!(
        told(step_all(&mut sv, 10, rollout(policy(1, 1)))),
        [ServiceState::Reloading]
    );
    step_all(&mut sv, 11, spawned(2, 200));
    step_all(&mut sv, 12, ready(2));
    assert_eq!(
        told(step_all(&mut sv, 13, exited(100))),
        [ServiceState::Ready]
    );
    assert_eq!(
        told(step_all(&mut sv, 20, stop())),
        [ServiceState::Stopping]
    );
    // Nothing changed: nothing said.
    assert_eq!(told(step_all(&mut sv, 21, Event::Tick)), []);
}

#[test]
fn a_crash_loop_keeps_the_slot_with_its_restarts_and_next_start() {
    let mut sv = running(1, 1);
    step(&mut sv, 10, exited_with(100, ExitReason::Code(3)));
    let info = sv.slot_info(Slot(0)).expect("slot 0");
    assert_eq!(info.restarts, 1);
    assert_eq!(info.restart_at, Some(t(110)));
    assert_eq!(info.last_exit.as_deref(), Some("exit status 3 after 9ms"));
    assert!(!sv.all_current_ready());
    assert_eq!(
        sv.status_line(),
        "0/1 workers ready, generation 1",
        "STATUS= shows the lost capacity"
    );
}

#[test]
fn a_memory_replacement_does_not_hold_back_the_first_ready() {
    let aged: MemoryConfig = toml::from_str("max_lifetime = \"1s\"").expect("[memory]");
    let mut p = policy(2, 1);
    p.memory = Some(aged);
    let mut sv = new(p);
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1), spawn(2, 1, 1)]),
            (0, spawned(1, 100), vec![]),
            (0, spawned(2, 101), vec![]),
            (1, ready(1), vec![]),
            // Slot 0 is recycled before slot 1 is ready: its surge worker starts.
            (1_001, Event::Tick, vec![spawn(3, 0, 1)]),
            (1_002, spawned(3, 102), vec![]),
        ],
    );
    assert_eq!(sv.service_state(), ServiceState::Starting);
    play(&mut sv, vec![(1_003, ready(2), vec![])]);
    assert_eq!(sv.service_state(), ServiceState::Ready);
}

#[test]
fn a_worker_forked_after_its_rollout_failed_is_killed() {
    let mut sv = running(1, 2);
    let mut p = policy(2, 2);
    p.app.ready_timeout = Duration::from_secs(3);
    // Two new workers; the first one's spawn fails before the second's fork
    // has come back: the rollout fails and gives up on the second too.
    let out = step(&mut sv, 10, rollout(p));
    assert_eq!(out, vec![spawn(2, 1, 2), spawn(3, 0, 2)]);
    let out = step(
        &mut sv,
        11,
        Event::SpawnFailed {
            id: WorkerId(2),
            error: "exec worker: No such file or directory".into(),
        },
    );
    assert!(
        matches!(
            &out[0],
            Action::Reply {
                outcome: Err(_),
                ..
            }
        ),
        "{out:?}"
    );
    assert!(sv.worker(WorkerId(3)).is_none());
    // Its fork comes back now: killed at once, not left running untracked.
    assert_eq!(step(&mut sv, 12, spawned(3, 300)), vec![kill(3, 300)]);
}

#[test]
fn an_exec_failure_of_a_draining_worker_is_no_crash() {
    let mut sv = running(2, 1);
    play(
        &mut sv,
        vec![
            (
                10,
                scale(1),
                vec![
                    term(2, 101),
                    Action::Reply {
                        to: ReplyTo(9),
                        outcome: Ok("scaled to 1 workers".into()),
                    },
                ],
            ),
            (
                11,
                Event::SpawnFailed {
                    id: WorkerId(2),
                    error: "execve: Exec format error".into(),
                },
                vec![],
            ),
        ],
    );
    assert_eq!(sv.slot_info(Slot(0)).map(|s| s.crashes), Some(0));
}

#[test]
fn a_ready_worker_that_stops_holding_its_sockets_is_replaced() {
    let mut sv = new(serving(1));
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (1, spawned(1, 100), vec![]),
            (2, ready(1), vec![check(1, 100, 1)]),
            (3, checked(1, &[]), vec![]),
            // Checked again every RECHECK_EVERY from when it is ready.
            (2_003, Event::Tick, vec![check(1, 100, 1)]),
            (2_004, checked(1, &[]), vec![]),
            (4_003, Event::Tick, vec![check(1, 100, 1)]),
            // Once without them is not enough (a moment of fd shuffling)...
            (4_004, checked(1, &["127.0.0.1:8080"]), vec![]),
            (6_003, Event::Tick, vec![check(1, 100, 1)]),
            // ...twice in a row is: replaced, start-before-stop.
            (6_004, checked(1, &["127.0.0.1:8080"]), vec![spawn(2, 0, 1)]),
            (6_005, spawned(2, 200), vec![]),
            (6_010, ready(2), vec![check(2, 200, 1)]),
            (6_011, checked(2, &[]), vec![term(1, 100)]),
        ],
    );
    assert_eq!(sv.counters.replacements.get(&Reason::NotServing), Some(&1));
}

#[test]
fn a_worker_holding_its_sockets_again_starts_the_count_afresh() {
    let mut sv = new(serving(1));
    play(
        &mut sv,
        vec![
            (0, Event::Tick, vec![spawn(1, 0, 1)]),
            (1, spawned(1, 100), vec![]),
            (2, ready(1), vec![check(1, 100, 1)]),
            (3, checked(1, &[]), vec![]),
            (2_003, Event::Tick, vec![check(1, 100, 1)]),
            (2_004, checked(1, &["127.0.0.1:8080"]), vec![]),
            (4_003, Event::Tick, vec![check(1, 100, 1)]),
            (4_004, checked(1, &[]), vec![]),
            (6_003, Event::Tick, vec![check(1, 100, 1)]),
            (6_004, checked(1, &["127.0.0.1:8080"]), vec![]),
        ],
    );
    assert_eq!(sv.counters.replacements.get(&Reason::NotServing), None);
}
