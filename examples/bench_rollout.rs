//! Benchmark: the stall a rolling restart causes.
//!
//! Runs the same fixed load against holdfast + test workers twice in one run:
//! once with no rollouts (the baseline) and once while rolling N times, and
//! prints requests, failures, p50/p99/max latency, the ratio p99 with
//! rollouts ÷ p99 without, the rollout durations, and holdfast's own CPU time
//! and RSS. Also measures start-up time (spawn → "all workers ready") for 2
//! and 64 workers and holdfast's RSS with 64 workers.
//!
//! ```sh
//! cargo build --release && cargo run --release --example bench_rollout [-- ROLLOUTS SECONDS]
//! ```

#[path = "bench_common/mod.rs"]
mod bench_common;
#[path = "../tests/common/load.rs"]
#[allow(dead_code)]
mod load;

use std::time::{Duration, Instant};

use bench_common::{free_port, Running};
use load::{Load, LoadReport, LoadSpec, Target};
use nix::sys::signal::Signal;

const WORKERS: u32 = 4;
const CONNECTIONS: usize = 32;

fn config(port: u16, workers: u32) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:{port}"
[app]
command = ["{{test_worker}}", "--lame-duck-ms", "1000"]
workers = {workers}
max_surge = 1
ready_timeout = "120s"
drain_timeout = "30s"
"#
    )
}

fn spec(port: u16, duration: Duration) -> LoadSpec {
    let mut s = LoadSpec::new(Target::local(port));
    s.connections = CONNECTIONS;
    s.keepalive = true;
    s.path = "/?sleep=20".into();
    s.max_duration = duration;
    s.max_requests = u64::MAX / 2;
    s.request_timeout = Duration::from_secs(10);
    s
}

fn line(name: &str, r: &LoadReport) {
    println!(
        "{name:<16} requests {:>7}  failures {:>3}  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  ({:.0} req/s)",
        r.ok + r.failed(),
        r.failed(),
        r.percentile(50.0),
        r.percentile(99.0),
        r.latencies_ms.iter().cloned().fold(0.0, f64::max),
        r.ok as f64 / r.elapsed.as_secs_f64()
    );
    if r.failed() > 0 {
        println!("  failures: {:?}", r.failures);
    }
}

fn startup(workers: u32) -> (Duration, u64) {
    let port = free_port();
    let h = Running::start(&config(port, workers));
    h.wait_log_count("all workers ready", 1, Duration::from_secs(120));
    let took = h.started.elapsed();
    let rss = h.rss_kib();
    h.stop();
    (took, rss)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rollouts: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let duration = Duration::from_secs(seconds);

    println!("== start-up (spawn of holdfast → every worker READY=1), 3 runs each");
    for workers in [2, 64] {
        let runs: Vec<(Duration, u64)> = (0..3).map(|_| startup(workers)).collect();
        let times: Vec<String> = runs
            .iter()
            .map(|(t, _)| format!("{:.0} ms", t.as_secs_f64() * 1000.0))
            .collect();
        let rss: Vec<String> = runs.iter().map(|(_, r)| format!("{} KiB", r)).collect();
        println!(
            "{workers:>3} workers: start-up {}  holdfast RSS {}",
            times.join(", "),
            rss.join(", ")
        );
    }

    println!("\n== rollouts under load: {WORKERS} test workers, {CONNECTIONS} keep-alive connections, 20 ms requests, {seconds} s per phase");
    let port = free_port();
    let h = Running::start(&config(port, WORKERS));
    h.wait_log_count("all workers ready", 1, Duration::from_secs(60));

    // Warm-up, then the baseline.
    Load::start(spec(port, Duration::from_secs(2))).finish();
    let cpu0 = h.cpu();
    let base = Load::start(spec(port, duration)).finish();
    let cpu_base = h.cpu() - cpu0;

    let cpu1 = h.cpu();
    let load = Load::start(spec(port, duration));
    let gap = duration / (rollouts as u32 + 1);
    let mut took = Vec::new();
    let t0 = Instant::now();
    for i in 1..=rollouts {
        let at = gap * i as u32;
        if let Some(wait) = at.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait); // pacing the benchmark, not synchronisation
        }
        let r0 = Instant::now();
        h.signal(Signal::SIGHUP);
        h.wait_log_count("rollout finished", i, Duration::from_secs(120));
        took.push(r0.elapsed());
    }
    let rolled = load.finish();
    let cpu_roll = h.cpu() - cpu1;
    let rss = h.rss_kib();
    h.stop();

    line("no rollouts", &base);
    line(&format!("{rollouts} rollouts"), &rolled);
    let ratio = rolled.percentile(99.0) / base.percentile(99.0);
    println!("p99 with rollouts / p99 without: {ratio:.3}");
    let ms: Vec<String> = took
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
        .collect();
    println!(
        "rollout durations (SIGHUP → rollout finished, ms): {}",
        ms.join(" ")
    );
    println!(
        "holdfast CPU: {:?} during the baseline, {:?} during the rollouts; RSS {} KiB",
        cpu_base, cpu_roll, rss
    );
}
