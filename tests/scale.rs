//! holdfast's own cost per worker does not grow with the number of workers,
//! against the real binary: the /proc reads each worker's start takes
//! (`status --json`, `cost`) are counted with 4 workers and with 64 and
//! compared. No clock is read: speed lives in `examples/bench_scale`.

mod common;

use common::{wait_until, Holdfast, DEADLINE};
use serde_json::Value;

/// `n` test workers that send READY=1 from a child in their process group
/// (so every datagram takes the lookup of a sender that is not a worker's
/// own pid), with the listener check of every READY=1.
fn config(n: u32) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = ["{{test_worker}}", "--ready-from-child"]
workers = {n}
max_surge = {n}
ready_timeout = "120s"
drain_timeout = "30s"
"#
    )
}

fn status(h: &Holdfast) -> Value {
    let o = h.cli(&["status", "--json", "--config", "{config}"]);
    assert!(
        o.status.success(),
        "status: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("status JSON")
}

/// The cost counters once all `n` workers are ready and every check of a
/// READY=1 has come back.
fn cost_of_start(n: u32) -> Value {
    let h = Holdfast::start(&config(n));
    h.wait_log("all workers ready");
    let cost = wait_until(DEADLINE, "every READY=1 checked", || {
        let s = status(&h);
        (s["cost"]["ready_checks"].as_u64() == Some(u64::from(n))).then(|| s["cost"].clone())
    });
    let ready = status(&h)["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["state"] == "ready")
        .count();
    assert_eq!(ready, n as usize, "{cost}");
    cost
}

fn get(cost: &Value, key: &str) -> u64 {
    cost[key]
        .as_u64()
        .unwrap_or_else(|| panic!("cost.{key} in {cost}"))
}

/// A worker's READY=1 costs the same /proc reads with 64 workers as with 4:
/// finding the sender's worker is one read of its stat (its process group
/// leads to the worker), never a listing of /proc; the check that it holds
/// its listener walks its own tree down (a few reads per process in it),
/// never every process on the machine, which is at least the 64 workers
/// themselves.
#[test]
fn proc_reads_per_ready_do_not_grow_with_the_worker_count() {
    let small = cost_of_start(4);
    let large = cost_of_start(64);
    for (n, cost) in [(4u64, &small), (64, &large)] {
        // Exact: one datagram from a descendant per worker, one stat read each.
        assert_eq!(get(cost, "notify_lookups"), n, "{cost}");
        assert_eq!(get(cost, "notify_lookup_reads"), n, "{cost}");
        assert_eq!(get(cost, "ready_checks"), n, "{cost}");
    }
    // Bounded: a tree's threads and fds at the moment of its check vary by
    // a few (the notify child may be alive, a zombie or reaped), so the
    // average per check may too; a walk of the machine would add at least
    // one read per worker (64) to each check.
    let per_check = |c: &Value| get(c, "ready_check_reads") as f64 / get(c, "ready_checks") as f64;
    let (s, l) = (per_check(&small), per_check(&large));
    assert!(s > 0.0, "checks made no /proc read: {small}");
    assert!(
        l <= s + 8.0,
        "/proc reads per READY=1 check grew from {s:.1} (4 workers) to {l:.1} (64): {small} {large}"
    );
}

/// `n` workers that are a shell whose child left its process group and
/// session (`setsid`) and sends READY=1 itself, serving the listeners it got
/// through UNICORN_FD.
fn setsid_config(n: u32) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"
[app]
command = ["sh", "-c", "setsid {{test_worker}} --unicorn-fd & wait"]
handoff = ["unicorn"]
workers = {n}
max_surge = {n}
ready_timeout = "120s"
drain_timeout = "30s"
"#
    )
}

/// A READY=1 from a descendant outside its worker's process group is found
/// by a walk up its parents: one read of the sender's stat on the loop (its
/// group is no worker's), then one of its parent's off the loop (the shell:
/// a worker). Exactly two reads per sender, with 16 workers as with 2; never
/// a listing of /proc.
#[test]
fn a_sender_outside_its_workers_group_costs_a_walk_up_its_parents() {
    for n in [2u32, 16] {
        let h = Holdfast::start(&setsid_config(n));
        h.wait_log("all workers ready");
        let cost = status(&h)["cost"].clone();
        assert_eq!(get(&cost, "notify_lookups"), u64::from(n), "{cost}");
        assert_eq!(
            get(&cost, "notify_lookup_reads"),
            2 * u64::from(n),
            "{cost}"
        );
        assert_eq!(get(&cost, "ready_checks"), u64::from(n), "{cost}");
    }
}
