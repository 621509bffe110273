//! Memory and age recycling: tables of samples and ticks, expected actions.

use super::*;
use crate::config::{MemoryConfig, Metric, Scope};
use crate::core::recycle::MIB;
use crate::core::{ProcessSample, TreeSample, Usage};

fn recycle(scope: Scope) -> MemoryConfig {
    let scope = match scope {
        Scope::Tree => "tree",
        Scope::Process => "process",
    };
    toml::from_str(&format!(
        "limit = \"512MiB\"\nscope = \"{scope}\"\ngrace = 3\nmin_lifetime = \"0s\"\ninterval = \"1h\""
    ))
    .expect("[memory]")
}

/// `running(workers, max_surge)` with `[memory]` set.
fn watched(workers: u32, max_surge: u32, m: MemoryConfig) -> Supervisor {
    watched_seeded(workers, max_surge, m, 0)
}

fn watched_seeded(workers: u32, max_surge: u32, m: MemoryConfig, seed: u64) -> Supervisor {
    let mut spec = policy(workers, max_surge);
    spec.memory = Some(m);
    let mut sv = Supervisor::new(
        spec,
        Settings {
            seed,
            reopen_signal: None,
            init: false,
        },
    );
    step(&mut sv, 0, Event::Tick);
    for s in 0..workers as u64 {
        step(&mut sv, 1, spawned(s + 1, 100 + s as i32));
    }
    for s in 0..workers as u64 {
        step(&mut sv, 2, ready(s + 1));
    }
    sv
}

fn usage(mib: u64) -> Usage {
    Usage {
        rss: mib * MIB * 2,
        pss: Some(mib * MIB),
        uss: Some(mib * MIB),
    }
}

/// Worker `id` (pid `pid`) whose processes are `(pid, MiB)`, the worker's own first.
fn tree(id: u64, pid: i32, processes: &[(i32, u64)]) -> TreeSample {
    TreeSample {
        id: WorkerId(id),
        pid: Pid(pid),
        processes: processes
            .iter()
            .map(|&(p, mib)| ProcessSample {
                pid: Pid(p),
                usage: usage(mib),
            })
            .collect(),
    }
}

/// One round of single-process workers: `(id, pid, MiB)`.
fn round(workers: &[(u64, i32, u64)]) -> Event {
    Event::MemorySample {
        samples: workers
            .iter()
            .map(|&(id, pid, mib)| tree(id, pid, &[(pid, mib)]))
            .collect(),
    }
}

fn signal_child(id: u64, worker: i32, pid: i32) -> Action {
    Action::SignalProcess {
        id: WorkerId(id),
        worker: Pid(worker),
        pid: Pid(pid),
        signal: Signal::SIGQUIT,
    }
}

#[test]
fn grace_samples_over_the_limit_replace_start_before_stop() {
    let mut sv = watched(2, 1, recycle(Scope::Tree));
    play(
        &mut sv,
        vec![
            (1000, round(&[(1, 100, 600), (2, 101, 100)]), vec![]),
            (2000, round(&[(1, 100, 600), (2, 101, 100)]), vec![]),
            // Third sample over: the replacement starts in the same slot.
            (
                3000,
                round(&[(1, 100, 611), (2, 101, 100)]),
                vec![spawn(3, 0, 1)],
            ),
            (3001, spawned(3, 200), vec![]),
            // Still over while its replacement starts: not queued again.
            (4000, round(&[(1, 100, 650), (2, 101, 100)]), vec![]),
            (4500, ready(3), vec![term(1, 100)]),
            (5000, exited(100), vec![]),
        ],
    );
    assert_eq!(sv.counters.replacements.get(&Reason::Memory), Some(&1));
    assert_eq!(sv.ready_count(), 2);
}

#[test]
fn a_spike_shorter_than_grace_is_not_acted_on() {
    let mut sv = watched(1, 1, recycle(Scope::Tree));
    play(
        &mut sv,
        vec![
            (1000, round(&[(1, 100, 900)]), vec![]),
            (2000, round(&[(1, 100, 900)]), vec![]),
            (3000, round(&[(1, 100, 100)]), vec![]),
            // The count starts again from zero.
            (4000, round(&[(1, 100, 900)]), vec![]),
            (5000, round(&[(1, 100, 900)]), vec![]),
            (6000, round(&[(1, 100, 900)]), vec![spawn(2, 0, 1)]),
        ],
    );
}

#[test]
fn tree_scope_sums_the_processes() {
    let mut sv = watched(1, 1, recycle(Scope::Tree));
    // 3 × 200 MiB: no single process is over 512 MiB, the tree is.
    let sample = || Event::MemorySample {
        samples: vec![tree(1, 100, &[(100, 200), (150, 200), (151, 200)])],
    };
    play(
        &mut sv,
        vec![
            (1000, sample(), vec![]),
            (2000, sample(), vec![]),
            (3000, sample(), vec![spawn(2, 0, 1)]),
        ],
    );
}

#[test]
fn the_limit_applies_to_the_configured_metric() {
    // rss is twice pss in these samples: 300 MiB pss is 600 MiB rss.
    let mut pss = watched(1, 1, recycle(Scope::Tree));
    let mut r = recycle(Scope::Tree);
    r.metric = Some(Metric::Rss);
    let mut rss = watched(1, 1, r);
    for ms in [1000, 2000, 3000] {
        assert_eq!(pss.step(t(ms), round(&[(1, 100, 300)])), vec![]);
    }
    assert_eq!(rss.step(t(1000), round(&[(1, 100, 300)])), vec![]);
    assert_eq!(rss.step(t(2000), round(&[(1, 100, 300)])), vec![]);
    assert_eq!(
        rss.step(t(3000), round(&[(1, 100, 300)])),
        vec![spawn(2, 0, 1)]
    );
}

#[test]
fn a_young_worker_is_not_recycled_before_min_lifetime() {
    let mut r = recycle(Scope::Tree);
    r.min_lifetime = Duration::from_secs(60);
    let mut sv = watched(1, 1, r);
    // Spawned at t(1): young until t(60_001).
    let mut script: Vec<(u64, Event, Vec<Action>)> = (1..=5)
        .map(|i| (i * 1000, round(&[(1, 100, 900)]), vec![]))
        .collect();
    script.push((60_000, round(&[(1, 100, 900)]), vec![]));
    script.push((61_000, round(&[(1, 100, 900)]), vec![spawn(2, 0, 1)]));
    play(&mut sv, script);
}

#[test]
fn biggest_goes_first_and_at_most_max_surge_at_once() {
    let mut sv = watched(3, 1, recycle(Scope::Tree));
    let all = || round(&[(1, 100, 600), (2, 101, 900), (3, 102, 700)]);
    play(
        &mut sv,
        vec![
            (1000, all(), vec![]),
            (2000, all(), vec![]),
            // Slot 1 (900 MiB) first; one at a time.
            (3000, all(), vec![spawn(4, 1, 1)]),
            (3001, spawned(4, 201), vec![]),
            (4000, all(), vec![]),
            (4500, ready(4), vec![term(2, 101)]),
        ],
    );
    assert_eq!(sv.ready_count(), 3, "never below workers ready");
    // Slot 2 (700 MiB) next, then slot 0.
    play(
        &mut sv,
        vec![
            (5000, exited(101), vec![spawn(5, 2, 1)]),
            (5001, spawned(5, 202), vec![]),
            (6000, ready(5), vec![term(3, 102)]),
            (7000, exited(102), vec![spawn(6, 0, 1)]),
        ],
    );
    assert_eq!(sv.counters.replacements.get(&Reason::Memory), Some(&3));
}

#[test]
fn a_bigger_worker_queued_later_overtakes_a_waiting_smaller_one() {
    let mut sv = watched(3, 1, recycle(Scope::Tree));
    play(
        &mut sv,
        vec![
            (1000, round(&[(1, 100, 600), (2, 101, 600)]), vec![]),
            (2000, round(&[(1, 100, 600), (2, 101, 600)]), vec![]),
            // Slot 0 goes (tie: the first); slot 1 waits in the queue.
            (
                3000,
                round(&[(1, 100, 600), (2, 101, 600)]),
                vec![spawn(4, 0, 1)],
            ),
            (3001, spawned(4, 200), vec![]),
            (4000, round(&[(2, 101, 600), (3, 102, 800)]), vec![]),
            (5000, round(&[(2, 101, 600), (3, 102, 800)]), vec![]),
            (6000, round(&[(2, 101, 600), (3, 102, 800)]), vec![]),
            (6500, ready(4), vec![term(1, 100)]),
            // Slot 2 (800 MiB) overtakes slot 1 (600 MiB).
            (7000, exited(100), vec![spawn(5, 2, 1)]),
        ],
    );
}

#[test]
fn memory_and_rollout_share_the_queue_and_the_budget() {
    let mut sv = watched(2, 1, recycle(Scope::Tree));
    play(
        &mut sv,
        vec![
            (1000, round(&[(2, 101, 900)]), vec![]),
            (2000, round(&[(2, 101, 900)]), vec![]),
            (3000, round(&[(2, 101, 900)]), vec![spawn(3, 1, 1)]),
            (3001, spawned(3, 201), vec![]),
            // A rollout now waits for the memory replacement's surge slot.
            (3500, rollout(policy(2, 1)), vec![]),
            (4000, ready(3), vec![term(2, 101)]),
            (5000, exited(101), vec![spawn(4, 0, 2)]),
        ],
    );
}

#[test]
fn workers_not_ready_and_stale_samples_are_ignored() {
    let mut sv = watched(1, 1, recycle(Scope::Tree));
    play(
        &mut sv,
        vec![
            (10, rollout(policy(1, 1)), vec![spawn(2, 0, 2)]),
            (11, spawned(2, 200), vec![]),
        ],
    );
    for ms in [1000, 2000, 3000, 4000] {
        // Worker 2 is starting; worker 1 is sampled under a pid it does not have.
        let out = step(&mut sv, ms, round(&[(2, 200, 900), (1, 999, 900)]));
        assert_eq!(out, vec![], "at {ms}");
    }
    assert_eq!(sv.worker(WorkerId(2)).map(|w| w.memory.over), Some(0));
    assert_eq!(sv.worker(WorkerId(1)).map(|w| w.memory.over), Some(0));
}

#[test]
fn stopping_ignores_samples() {
    let mut sv = watched(1, 1, recycle(Scope::Tree));
    let stop = Event::Request {
        request: Request::Stop,
        reply: None,
    };
    play(&mut sv, vec![(10, stop, vec![term(1, 100)])]);
    for ms in [1000, 2000, 3000, 4000] {
        assert_eq!(step(&mut sv, ms, round(&[(1, 100, 900)])), vec![]);
    }
}

#[test]
fn process_scope_signals_a_bloated_child_and_keeps_the_master() {
    let mut sv = watched(1, 1, recycle(Scope::Process));
    // Master 100 (50 MiB), children 150 (bloated) and 151.
    let sample = |child: u64| Event::MemorySample {
        samples: vec![tree(1, 100, &[(100, 50), (150, child), (151, 100)])],
    };
    play(
        &mut sv,
        vec![
            (1000, sample(600), vec![]),
            (2000, sample(600), vec![]),
            (3000, sample(600), vec![signal_child(1, 100, 150)]),
            // Still finishing its request: not signalled again before drain_timeout (30 s).
            (4000, sample(600), vec![]),
            (32_999, sample(600), vec![]),
            (33_000, sample(600), vec![signal_child(1, 100, 150)]),
        ],
    );
    assert_eq!(sv.counters.child_signals, 2);
    assert_eq!(sv.counters.replacements.get(&Reason::Memory), None);
    assert_eq!(sv.ready_count(), 1);
}

#[test]
fn process_scope_judges_each_process_on_its_own() {
    let mut sv = watched(1, 1, recycle(Scope::Process));
    // 4 × 300 MiB: the tree is far over 512 MiB, no process is.
    let sample = || Event::MemorySample {
        samples: vec![tree(
            1,
            100,
            &[(100, 300), (150, 300), (151, 300), (152, 300)],
        )],
    };
    for ms in [1000, 2000, 3000, 4000] {
        assert_eq!(step(&mut sv, ms, sample()), vec![]);
    }
}

#[test]
fn process_scope_forgets_a_child_that_went_away() {
    let mut sv = watched(1, 1, recycle(Scope::Process));
    let with = |kids: &[(i32, u64)]| {
        let mut p = vec![(100, 50)];
        p.extend_from_slice(kids);
        Event::MemorySample {
            samples: vec![tree(1, 100, &p)],
        }
    };
    play(
        &mut sv,
        vec![
            (1000, with(&[(150, 600)]), vec![]),
            (2000, with(&[(150, 600)]), vec![]),
            (3000, with(&[(150, 600)]), vec![signal_child(1, 100, 150)]),
            // 150 exited; its replacement 160 starts its own count.
            (4000, with(&[(160, 600)]), vec![]),
            (5000, with(&[(160, 600)]), vec![]),
            (6000, with(&[(160, 600)]), vec![signal_child(1, 100, 160)]),
        ],
    );
}

#[test]
fn process_scope_replaces_a_bloated_master_like_a_tree() {
    let mut sv = watched(1, 1, recycle(Scope::Process));
    let sample = || Event::MemorySample {
        samples: vec![tree(1, 100, &[(100, 700), (150, 10)])],
    };
    play(
        &mut sv,
        vec![
            (1000, sample(), vec![]),
            (2000, sample(), vec![]),
            (3000, sample(), vec![spawn(2, 0, 1)]),
        ],
    );
}

fn aging(workers: u32, max_surge: u32, seed: u64) -> Supervisor {
    let mut r = recycle(Scope::Tree);
    r.limit = None;
    r.max_lifetime = Some(Duration::from_secs(10));
    r.lifetime_jitter = Some(Duration::from_secs(4));
    watched_seeded(workers, max_surge, r, seed)
}

#[test]
fn max_lifetime_plus_jitter_recycles_at_the_deadline() {
    let mut sv = aging(1, 1, 0);
    let r = sv.current_spec().recycle().expect("recycle");
    // Seed 0, slot 0: no jitter. Ready at t(2): due 10 s later.
    assert_eq!(r.jitter(Slot(0), 0), Duration::ZERO);
    assert_eq!(sv.next_deadline(), Some(t(10_002)));
    play(
        &mut sv,
        vec![
            (10_001, Event::Tick, vec![]),
            (10_002, Event::Tick, vec![spawn(2, 0, 1)]),
            (10_003, spawned(2, 200), vec![]),
        ],
    );
    // Worker 1 is already being replaced: its deadline is done with; the
    // new one's counts from the moment it is ready.
    assert_eq!(
        sv.next_deadline(),
        Some(t(10_003) + Duration::from_secs(60))
    );
    play(&mut sv, vec![(11_000, ready(2), vec![term(1, 100)])]);
    // Its age deadline comes before worker 1's drain deadline.
    assert_eq!(sv.next_deadline(), Some(t(21_000)));
    step(&mut sv, 11_500, exited(100));
    assert_eq!(sv.next_deadline(), Some(t(21_000)));
    assert_eq!(sv.counters.replacements.get(&Reason::Age), Some(&1));
}

#[test]
fn a_worker_slow_to_start_is_not_due_the_moment_it_is_ready() {
    let mut sv = aging(1, 1, 0);
    play(
        &mut sv,
        vec![
            (10_002, Event::Tick, vec![spawn(2, 0, 1)]),
            (10_003, spawned(2, 200), vec![]),
            // Ready 15 s after its spawn, more than max_lifetime (10 s).
            (25_003, ready(2), vec![term(1, 100)]),
            (25_004, Event::Tick, vec![]),
        ],
    );
    assert_eq!(sv.age_deadline(WorkerId(2)), Some(t(35_003)));
}

#[test]
fn jitter_spreads_slots_over_the_range() {
    for seed in [0, 1, 0x9e37_79b9_7f4a_7c15, u64::MAX] {
        let sv = aging(4, 1, seed);
        let r = sv.current_spec().recycle().expect("recycle");
        let mut j: Vec<Duration> = (0..4).map(|s| r.jitter(Slot(s), seed)).collect();
        j.sort();
        for w in j.windows(2) {
            assert!(
                w[1] - w[0] >= Duration::from_millis(580),
                "seed {seed}: {j:?}"
            );
        }
        assert!(j[3] <= Duration::from_secs(4), "seed {seed}: {j:?}");
        assert!(j[3] - j[0] >= Duration::from_millis(2470), "{j:?}");
    }
}

#[test]
fn due_workers_wait_for_surge_budget_without_spinning() {
    // Seed 0: ready at t(2), slot 0 due at 10.002 s, slot 1 at 10.002 s +
    // 4 s × 0.618 = 12.474136 s.
    let mut sv = aging(2, 1, 0);
    play(
        &mut sv,
        vec![
            (10_002, Event::Tick, vec![spawn(3, 0, 1)]),
            (10_003, spawned(3, 200), vec![]),
            (12_474, Event::Tick, vec![]),
        ],
    );
    let due = sv.next_deadline().expect("slot 1's age deadline");
    assert!(due > t(12_474) && due < t(12_475));
    play(&mut sv, vec![(12_475, Event::Tick, vec![])]);
    // Slot 1 is queued, waiting: its deadline no longer wakes the loop.
    assert_eq!(
        sv.next_deadline(),
        Some(t(10_003) + Duration::from_secs(60))
    );
    play(
        &mut sv,
        vec![
            (13_000, ready(3), vec![term(1, 100)]),
            (13_500, exited(100), vec![spawn(4, 1, 1)]),
        ],
    );
    assert_eq!(sv.counters.replacements.get(&Reason::Age), Some(&2));
}

#[test]
fn without_memory_config_samples_do_nothing() {
    let mut sv = running(1, 1);
    for ms in [1000, 2000, 3000, 4000] {
        assert_eq!(step(&mut sv, ms, round(&[(1, 100, 100_000)])), vec![]);
    }
    assert_eq!(sv.next_deadline(), None);
}

#[test]
fn a_failed_age_replacement_is_retried_after_backoff_max() {
    let mut sv = aging(1, 1, 0);
    play(
        &mut sv,
        vec![
            (10_002, Event::Tick, vec![spawn(2, 0, 1)]),
            (10_003, spawned(2, 200), vec![]),
        ],
    );
    let failed = Event::Exited {
        pid: Pid(200),
        reason: ExitReason::Code(1),
        output: Vec::new(),
    };
    play(&mut sv, vec![(10_500, failed, vec![])]);
    // The old worker keeps serving; the next try is backoff_max (30 s) later.
    assert_eq!(sv.next_deadline(), Some(t(40_500)));
    play(
        &mut sv,
        vec![
            (40_499, Event::Tick, vec![]),
            (40_500, Event::Tick, vec![spawn(3, 0, 1)]),
        ],
    );
}

#[test]
fn a_failed_memory_replacement_is_retried_after_backoff_max() {
    let mut sv = watched(1, 1, recycle(Scope::Tree));
    let over = || round(&[(1, 100, 900)]);
    play(
        &mut sv,
        vec![
            (1000, over(), vec![]),
            (2000, over(), vec![]),
            (3000, over(), vec![spawn(2, 0, 1)]),
            (3001, spawned(2, 200), vec![]),
            (
                3500,
                Event::Exited {
                    pid: Pid(200),
                    reason: ExitReason::Code(1),
                    output: Vec::new(),
                },
                vec![],
            ),
            (4000, over(), vec![]),
            (33_499, over(), vec![]),
            (33_500, over(), vec![spawn(3, 0, 1)]),
        ],
    );
}
