//! Memory and age recycling with real processes under load: bloated workers
//! are replaced start-before-stop without a failed request, spikes are
//! ignored, max_surge holds, pss and rss differ as they should, scope =
//! "process" signals children, max_lifetime spreads, and Unicorn's leaking
//! children are recycled.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{http_get, pid_alive, wait_until, Holdfast, Load, LoadSpec, DEADLINE};

/// The copy-on-write process tree of the memory tests (python3; see the file).
const FORKING_PY: &str = include_str!("../src/bin/holdfast-test-worker/forking.py");

/// Readiness of a fresh holdfast (2-core CI: generous).
const READY: Duration = Duration::from_secs(45);

/// Starts holdfast on `config` and waits for its workers to be ready.
fn start(config: &str) -> Holdfast {
    let h = Holdfast::start(config);
    wait_until(READY, "all workers ready", || {
        h.log().contains("all workers ready").then_some(())
    });
    h
}

/// 32 keep-alive connections of slow-ish requests, at most 15 s.
fn load(h: &Holdfast, path: &str) -> Load {
    let mut spec = LoadSpec::new(h.tcp());
    spec.connections = 32;
    spec.path = path.to_string();
    spec.max_duration = Duration::from_secs(15);
    spec.max_requests = 200_000;
    Load::start(spec)
}

/// The value of `key=value` in a log line (a word starting with `key=`).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn num(line: &str, key: &str) -> u32 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// The number right before `unit` after `after` in `line` ("pss 611 MiB" → 611).
fn number_after(line: &str, after: &str) -> u64 {
    let rest = &line[line
        .find(after)
        .unwrap_or_else(|| panic!("no {after:?} in {line:?}"))
        + after.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after {after:?} in {line:?}"))
}

/// Lines of holdfast's log containing `needle`.
fn lines(h: &Holdfast, needle: &str) -> Vec<String> {
    h.log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// The `slot=` of the `worker spawned` line of `pid`.
fn slot_of(h: &Holdfast, pid: u32) -> u32 {
    lines(h, "worker spawned")
        .iter()
        .find(|l| field(l, "pid") == Some(&pid.to_string()))
        .map(|l| num(l, "slot"))
        .unwrap_or_else(|| panic!("no worker spawned line for pid {pid}"))
}

/// A duration as humantime prints it ("2s 472ms", "3s", "150ms").
fn parse_duration(s: &str) -> Duration {
    let mut total = Duration::ZERO;
    for part in s.split_whitespace() {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits
            .parse()
            .unwrap_or_else(|_| panic!("bad duration {s:?}"));
        total += match &part[digits.len()..] {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "us" => Duration::from_micros(n),
            "ns" => Duration::from_nanos(n),
            unit => panic!("unit {unit:?} in {s:?}"),
        };
    }
    total
}

/// The text between `from` and `to` in `line`.
fn between<'a>(line: &'a str, from: &str, to: &str) -> &'a str {
    let start = line
        .find(from)
        .unwrap_or_else(|| panic!("no {from:?} in {line:?}"))
        + from.len();
    let len = line[start..]
        .find(to)
        .unwrap_or_else(|| panic!("no {to:?} after {from:?} in {line:?}"));
    &line[start..start + len]
}

fn test_worker(args: &str) -> String {
    let mut argv = vec!["{test_worker}"];
    argv.extend(args.split_whitespace());
    format!("{argv:?}")
}

#[test]
fn a_bloated_worker_is_replaced_in_its_slot_without_a_failed_request() {
    let h = start(&format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = {}
workers = 2
ready = "notify"
drain_timeout = "20s"
[memory]
limit = "96MiB"
metric = "pss"
interval = "200ms"
grace = 3
min_lifetime = "1s"
"#,
        test_worker("--sleep-ms 20")
    ));
    let load = load(&h, "/?sleep=50");
    let grown = http_get(&h.tcp(), "/grow?mb=160").expect("GET /grow");
    assert_eq!(grown.status, 200, "{}", grown.body_str());
    let bloated = grown.pid().expect("X-Pid");
    let slot = slot_of(&h, bloated);

    let line = wait_until(DEADLINE, "the replacing line", || {
        lines(&h, &format!("(pid {bloated}) pss "))
            .into_iter()
            .find(|l| l.contains(": replacing"))
    });
    // `worker 1 (pid 4121) pss 161 MiB > 96 MiB for 3 samples: replacing`
    let samples = number_after(&line, "MiB > 96 MiB for ");
    assert!(
        line.contains(&format!(
            "worker {slot} (pid {bloated}) pss {} MiB > 96 MiB for {samples} samples: replacing",
            number_after(&line, ") pss ")
        )),
        "{line}"
    );
    // grace = 3; more only while it was younger than min_lifetime, which is logged once.
    let young = lines(&h, "under min_lifetime 1s: not recycling it before then");
    match samples {
        3 => assert!(young.is_empty(), "{young:?}"),
        4.. => assert_eq!(young.len(), 1, "{line}"),
        _ => panic!("acted before grace: {line}"),
    }
    assert!(number_after(&line, ") pss ") >= 160, "{line}");
    assert!(line.contains("reason=memory"), "{line}");

    // Its replacement: the next worker spawned in that slot, ready before the drain.
    let exited = format!("worker exited slot={slot} pid={bloated} ");
    h.wait_log(&exited);
    let log = h.log();
    let after = &log[log.find(": replacing").expect("replacing")..];
    let spawned = after
        .lines()
        .find(|l| l.contains("worker spawned"))
        .expect("a worker spawned after the replacing line");
    assert_eq!(num(spawned, "slot"), slot, "{spawned}");
    let new = num(spawned, "pid");
    let ready_at = log
        .find(&format!("worker ready slot={slot} pid={new} "))
        .expect("replacement ready");
    let drain_at = log
        .find(&format!("draining worker slot={slot} pid={bloated} "))
        .expect("old drained");
    assert!(
        ready_at < drain_at,
        "the replacement was ready before the drain"
    );
    // The app sees the same HOLDFAST_WORKER_ID.
    let body = wait_until(DEADLINE, "an answer from the replacement", || {
        http_get(&h.tcp(), "/")
            .ok()
            .filter(|r| r.pid() == Some(new))
            .map(|r| r.body_str())
    });
    assert!(body.contains(&format!(" slot={slot} ")), "{body}");

    let report = load.stop();
    report.assert_clean(200);
    // The load ran on the bloated worker (the oldest, which wins the idle
    // accepts); the new one's answer is the request above: which of the two
    // younger workers the load's connections reached is the scheduler's.
    assert!(report.pids.contains(&bloated), "{:?}", report.pids);
    assert_eq!(lines(&h, ": replacing").len(), 1, "one replacement only");
    assert!(!pid_alive(bloated));
}

#[test]
fn a_spike_shorter_than_grace_is_not_acted_on() {
    let h = start(&format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = {}
workers = 1
ready = "notify"
[memory]
limit = "64MiB"
interval = "200ms"
grace = 6
min_lifetime = "0s"
"#,
        test_worker("--sleep-ms 20")
    ));
    let worker = h.worker_pids()[0];
    let load = load(&h, "/?sleep=30");
    // 128 MiB for 500 ms: at most about 3 samples of 200 ms see it; grace is 6.
    let spike = http_get(&h.tcp(), "/spike?mb=128&ms=500").expect("GET /spike");
    assert_eq!(spike.status, 200, "{}", spike.body_str());
    let over = h.wait_log(&format!("worker 0 (pid {worker}) pss "));
    assert!(over.contains("over the limit (1 of 6 samples)"), "{over}");
    let under = h.wait_log("back under 64 MiB after");
    let seen = number_after(&under, "back under 64 MiB after ");
    assert!((1..6).contains(&seen), "{under}");
    assert!(under.contains("not replacing"), "{under}");
    let report = load.stop();
    report.assert_clean(100);
    // The count went back to zero on the first sample under the limit, so
    // nothing can come of this spike any more.
    assert!(lines(&h, ": replacing").is_empty(), "{}", h.log());
    assert_eq!(h.worker_pids(), vec![worker]);
    assert_eq!(report.pids, BTreeSet::from([worker]));
}

/// One worker lifecycle line.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Spawned,
    Ready,
    Draining,
    Exited,
}

/// Checks a log from `all workers ready` on: never more than `max_surge`
/// workers starting, never fewer than `workers` ready (every drain comes after
/// a ready replacement in its slot). Returns the number of drains.
fn check_surge(log: &str, workers: usize, max_surge: usize) -> usize {
    let mut starting = BTreeSet::new();
    let mut ready: BTreeMap<u32, u32> = BTreeMap::new(); // pid -> slot
    let mut running = false;
    let mut drains = 0;
    for line in log.lines() {
        if line.contains("all workers ready") {
            assert_eq!(ready.len(), workers, "{line}");
            running = true;
            continue;
        }
        let step = if line.contains("worker spawned") {
            Step::Spawned
        } else if line.contains("worker ready") {
            Step::Ready
        } else if line.contains("draining worker") {
            Step::Draining
        } else if line.contains("worker exited") {
            Step::Exited
        } else {
            continue;
        };
        assert!(!line.contains("unexpectedly"), "{line}");
        let (pid, slot) = (num(line, "pid"), num(line, "slot"));
        match step {
            Step::Spawned => {
                starting.insert(pid);
            }
            Step::Ready => {
                starting.remove(&pid);
                ready.insert(pid, slot);
            }
            Step::Draining => {
                assert_eq!(
                    ready.remove(&pid),
                    Some(slot),
                    "drained while not ready: {line}"
                );
                drains += 1;
                if running {
                    assert!(
                        ready.len() >= workers,
                        "fewer than {workers} ready after: {line}"
                    );
                    assert!(
                        ready.values().any(|s| *s == slot),
                        "no ready replacement in slot {slot} before: {line}"
                    );
                }
            }
            Step::Exited => {
                starting.remove(&pid);
                assert!(
                    ready.remove(&pid).is_none(),
                    "a ready worker exited: {line}"
                );
            }
        }
        if running {
            assert!(
                starting.len() <= max_surge,
                "{} workers starting at once (max_surge {max_surge}) at: {line}",
                starting.len()
            );
        }
    }
    drains
}

#[test]
fn several_bloated_workers_go_at_most_max_surge_at_a_time() {
    let h = start(&format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = {}
workers = 4
max_surge = 2
ready = "notify"
drain_timeout = "20s"
[memory]
limit = "64MiB"
interval = "250ms"
grace = 2
min_lifetime = "1s"
"#,
        test_worker("--sleep-ms 20 --grow-after-requests 10 --grow-mb 2")
    ));
    let first = h.worker_pids();
    assert_eq!(first.len(), 4);
    // Under load each grows about 2 MiB per 10 requests: all four cross
    // 64 MiB at about the same time, a few seconds in.
    let load = load(&h, "/?sleep=50");
    wait_until(DEADLINE, "the first four workers drained", || {
        first
            .iter()
            .all(|p| {
                h.log()
                    .contains(&format!("worker exited slot={} pid={p} ", slot_of(&h, *p)))
            })
            .then_some(())
    });
    let report = load.stop();
    report.assert_clean(200);
    let log = h.log();
    let drains = check_surge(&log, 4, 2);
    assert!(drains >= 4, "{drains} drains");
    let replacing = lines(&h, ": replacing");
    assert!(replacing.len() >= 4, "{replacing:#?}");
    for l in &replacing {
        assert!(
            l.contains("reason=memory") && l.contains("MiB > 64 MiB for"),
            "{l}"
        );
    }
}

/// `metric` summed over `root` and its descendants, from /proc, in MiB.
fn tree_mib(root: u32, key: &str) -> u64 {
    let mut pids = vec![root];
    let mut i = 0;
    while i < pids.len() {
        let children = std::fs::read_dir(format!("/proc/{}/task", pids[i]))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        pids.extend(children);
        i += 1;
    }
    let kib: u64 = pids
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum();
    kib / 1024
}

fn forking_config(metric: &str) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = ["python3", "{{dir}}/forking.py", "64", "3"]
workers = 1
ready = "notify"
drain_timeout = "10s"
[memory]
limit = "160MiB"
metric = "{metric}"
interval = "200ms"
grace = 2
min_lifetime = "0s"
"#
    )
}

#[test]
fn pss_counts_copy_on_write_pages_once_and_rss_in_every_process() {
    // Two holdfasts on the same forking app (64 MiB shared by a parent and 3
    // children): rss sees about 4 × 64 MiB, pss about 64 MiB; the limit is 160 MiB.
    let with = |metric: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("forking.py");
        std::fs::write(&script, FORKING_PY).expect("write forking.py");
        let config = forking_config(metric).replace("{dir}/forking.py", &script.to_string_lossy());
        (dir, start(&config))
    };
    let (_rss_dir, rss) = with("rss");
    let (_pss_dir, pss) = with("pss");

    // The premise, measured here from /proc on the pss instance's tree.
    let root = pss.worker_pids()[0];
    let first = pss.wait_log(&format!("(pid {root}) first memory sample"));
    let (tree_rss, tree_pss) = (tree_mib(root, "Rss:"), tree_mib(root, "Pss:"));
    assert!(
        tree_rss > 4 * 64 && tree_pss < 160,
        "rss {tree_rss} MiB, pss {tree_pss} MiB"
    );
    // holdfast saw the same: pss under the limit, rss over it, 4 processes.
    let seen_pss = number_after(&first, "first memory sample: pss ");
    let seen_rss = number_after(&first, "tree rss ");
    assert!((64..160).contains(&seen_pss), "{first}");
    assert!(seen_rss > 4 * 64, "{first}");
    assert!(first.contains(", 4 process(es); limit 160 MiB"), "{first}");

    // The rss instance replaces its worker, twice (the new one is just as big).
    let r0 = rss.worker_pids()[0];
    let line = rss.wait_log(": replacing");
    assert!(
        line.contains(&format!("worker 0 (pid {r0}) rss "))
            && line.contains("MiB > 160 MiB for 2 samples"),
        "{line}"
    );
    assert!(number_after(&line, ") rss ") > 4 * 64, "{line}");
    rss.wait_log_count(": replacing", 2);

    // Meanwhile (as many samples) the pss instance never went over.
    assert!(lines(&pss, "over the limit").is_empty(), "{}", pss.log());
    assert!(lines(&pss, ": replacing").is_empty(), "{}", pss.log());
    assert_eq!(pss.worker_pids(), vec![root]);
}

#[test]
fn process_scope_signals_a_bloated_child_and_keeps_the_master() {
    let h = start(&format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = {}
workers = 1
ready = "notify"
[memory]
limit = "64MiB"
scope = "process"
child_signal = "QUIT"
interval = "200ms"
grace = 2
min_lifetime = "0s"
"#,
        test_worker("--sleep-ms 20 --children 2 --child-grow-mb-per-sec 30")
    ));
    let master = h.worker_pids()[0];
    let load = load(&h, "/?sleep=30");
    let first = h.wait_log(&format!("(pid {master}) first memory sample"));
    assert!(
        first.contains("own uss") && first.contains("3 process(es)"),
        "{first}"
    );
    h.wait_log_count("samples: sending SIGQUIT", 2);
    let signalled: BTreeSet<u32> = lines(&h, "samples: sending SIGQUIT")
        .iter()
        .map(|l| {
            assert!(
                l.contains(&format!("worker 0 (pid {master}) child pid ")),
                "{l}"
            );
            assert!(
                l.contains(" uss ") && l.contains("MiB > 64 MiB for "),
                "{l}"
            );
            number_after(l, "child pid ") as u32
        })
        .collect();
    assert_eq!(signalled.len(), 2, "two different children: {signalled:?}");
    for child in &signalled {
        // The child got child_signal (it says so) and exited; the master stays.
        h.wait_log(&format!("test-worker {child} (child): SIGQUIT, exiting"));
        wait_until(DEADLINE, "the child to exit", || {
            (!pid_alive(*child)).then_some(())
        });
    }
    let report = load.stop();
    report.assert_clean(100);
    assert_eq!(report.pids, BTreeSet::from([master]));
    assert!(pid_alive(master));
    assert_eq!(h.worker_pids(), vec![master]);
    assert!(lines(&h, ": replacing").is_empty(), "{}", h.log());
}

/// The timestamp that starts a holdfast log line, in seconds since the epoch.
fn timestamp(line: &str) -> f64 {
    // 2026-11-23T17:05:14.397068Z
    let t = line.split_whitespace().next().unwrap_or("");
    let parse = |r: std::ops::Range<usize>| -> i64 {
        t.get(r)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no timestamp in {line:?}"))
    };
    let (y, m, d) = (parse(0..4), parse(5..7), parse(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs: f64 = t
        .get(17..t.len() - 1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no seconds in {line:?}"));
    (days * 86_400 + parse(11..13) * 3600 + parse(14..16) * 60) as f64 + secs
}

#[test]
fn max_lifetime_with_jitter_recycles_at_spread_out_times() {
    let h = Holdfast::start(&format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = {}
workers = 4
max_surge = 1
ready = "notify"
drain_timeout = "20s"
[memory]
max_lifetime = "3s"
lifetime_jitter = "4s"
"#,
        test_worker("--sleep-ms 20")
    ));
    h.wait_log_count("worker ready", 4);
    let first: Vec<u32> = h.worker_pids().into_iter().take(4).collect();
    let load = load(&h, "/?sleep=50");
    let replaced = |h: &Holdfast| -> Vec<(u32, String)> {
        let all = lines(h, ": replacing");
        first
            .iter()
            .filter_map(|p| {
                all.iter()
                    .find(|l| l.contains(&format!("(pid {p}) ")))
                    .map(|l| (*p, l.clone()))
            })
            .collect()
    };
    wait_until(DEADLINE, "the first four workers replaced for age", || {
        (replaced(&h).len() == 4).then_some(())
    });
    let report = load.stop();
    report.assert_clean(200);

    // `worker 2 (pid 4121) ready for 5s 474ms > max_lifetime 3s + jitter 2s 472ms: replacing`
    let mut slots = BTreeSet::new();
    let mut jitters = Vec::new();
    let mut at = Vec::new();
    for (pid, l) in replaced(&h) {
        assert!(l.contains("reason=age"), "{l}");
        slots.insert(number_after(&l, "worker "));
        let served = parse_duration(between(&l, ") ready for ", " > max_lifetime 3s"));
        let jitter = parse_duration(between(&l, "+ jitter ", ": replacing"));
        assert!(jitter <= Duration::from_secs(4), "{l}");
        assert!(served >= Duration::from_secs(3) + jitter, "{l}");
        // And in real time: ready, then max_lifetime + jitter later (within a second).
        let ready = lines(
            &h,
            &format!("worker ready slot={} pid={pid} ", slot_of(&h, pid)),
        );
        let waited = timestamp(&l) - timestamp(&ready[0]);
        let due = 3.0 + jitter.as_secs_f64();
        assert!(
            waited >= due - 0.01 && waited < due + 1.0,
            "{waited}s after ready, due {due}s: {l}"
        );
        jitters.push(jitter);
        at.push(timestamp(&l));
    }
    assert_eq!(slots, BTreeSet::from([0, 1, 2, 3]));
    jitters.sort();
    // The slots' jitters cover the range, well apart (0.146 × 4 s at least).
    for w in jitters.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(580),
            "jitters {jitters:?}"
        );
    }
    assert!(
        jitters[3] - jitters[0] >= Duration::from_millis(2470),
        "{jitters:?}"
    );
    at.sort_by(f64::total_cmp);
    assert!(at[3] - at[0] >= 0.5, "replaced at {at:?}: not spread out");
    check_surge(&h.log(), 4, 1);
}

#[test]
fn unicorn_children_that_leak_are_recycled_under_load() {
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/apps");
    let h = start(&format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = ["unicorn", "-E", "production", "-c", "{apps}/unicorn.conf.rb", "{apps}/config.ru"]
workers = 1
env = {{ UNICORN_WORKERS = "2" }}
handoff = ["systemd"]
ready = "probe"
ready_timeout = "60s"
drain_signal = "QUIT"
drain_timeout = "35s"
[memory]
limit = "32MiB"
scope = "process"
child_signal = "QUIT"
interval = "250ms"
grace = 2
min_lifetime = "0s"
"#
    ));
    let master = h.worker_pids()[0];
    let load = load(&h, "/?sleep=20");
    // Leaks of 1 MiB, at most 400 of them in at most 12 s, among the load.
    let mut spec = LoadSpec::new(h.tcp());
    spec.connections = 8;
    spec.path = "/leak".into();
    spec.max_requests = 400;
    spec.max_duration = Duration::from_secs(12);
    let leaks = Load::start(spec).finish();
    let report = load.stop();
    leaks.assert_clean(150);
    report.assert_clean(200);

    let signals = lines(&h, "samples: sending SIGQUIT");
    assert!(signals.len() >= 2, "{}", h.log());
    for l in &signals {
        assert!(
            l.contains(&format!("worker 0 (pid {master}) child pid ")) && l.contains(" uss "),
            "{l}"
        );
    }
    // Unicorn forked fresh children for the signalled ones: more pids served
    // than the 2 it started with, and the master never changed.
    assert!(
        report.pids.len() >= 3,
        "pids that answered: {:?}",
        report.pids
    );
    assert!(!report.pids.contains(&master));
    assert_eq!(h.worker_pids(), vec![master]);
    assert!(pid_alive(master));
    assert!(lines(&h, ": replacing").is_empty(), "{}", h.log());
}
