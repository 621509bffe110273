//! The proof of the in-place upgrade (issue 13), with the figures the
//! README quotes: 20 upgrades back to back under 32 connections, with a
//! rolling restart and a log reopen between each two, for the test worker
//! and for Puma: no failed request, the same worker pids before and after
//! each upgrade, every log line once, holdfast's fd count and RSS flat.
//! And the comparison: an upgrade against a restart of holdfast through the
//! fd store (what systemd does on `systemctl restart`), emulated as in
//! tests/systemd.rs, with workers that take 2 s to boot.
//!
//! `cargo test --release --test upgrade_proof -- --test-threads=1 --nocapture`
//! prints the figures (lines starting with `upgrade proof`).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{wait_until, Holdfast, Load, LoadReport, LoadSpec, DEADLINE};
use nix::sys::signal::Signal;
use serde_json::Value;

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ctl(h: &Holdfast, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--control", "{dir}/holdfast.sock"]);
    let o = h.cli(&all);
    assert_eq!(o.status.code(), Some(0), "holdfast {args:?}: {}", text(&o));
    o
}

fn status(h: &Holdfast) -> Value {
    let o = ctl(h, &["status", "--json"]);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {}", text(&o)))
}

fn pids(s: &Value) -> Vec<u32> {
    let mut v: Vec<u32> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect();
    v.sort_unstable();
    v
}

/// holdfast's open fds: the fewest of 5 looks 20 ms apart (a control
/// connection of the moment is no leak).
fn fds(pid: u32) -> usize {
    (0..5)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
        })
        .min()
        .unwrap_or(0)
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The `took=` of each `upgraded from ... took=` line: from the request
/// reaching the old image's loop to the new image having adopted it all.
fn adoption_times(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains("workers adopted)"))
        .filter_map(|l| l.split("took=").nth(1))
        .filter_map(|t| humantime::parse_duration(t.trim()).ok())
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// min / median / max in ms.
fn spread(mut v: Vec<Duration>) -> String {
    v.sort();
    if v.is_empty() {
        return "-".into();
    }
    format!(
        "{:.1} / {:.1} / {:.1} ms",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

/// What 20 upgrades did.
struct Rounds {
    upgrades: usize,
    client: Vec<Duration>,
    fds: Vec<usize>,
    rss: Vec<u64>,
}

/// 20 rounds of: upgrade (same pids before and after, same holdfast pid),
/// rolling restart, log rotation (rename `log` away, `reopen-logs`).
fn twenty_rounds(h: &Holdfast, log: &Path, rotated: &mut Vec<PathBuf>) -> Rounds {
    let mut r = Rounds {
        upgrades: 0,
        client: Vec::new(),
        fds: Vec::new(),
        rss: Vec::new(),
    };
    for i in 0..20 {
        let before = status(h);
        let t = Instant::now();
        let o = ctl(h, &["upgrade", "--wait"]);
        r.client.push(t.elapsed());
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(said.contains("workers adopted"), "{said}");
        let after = status(h);
        assert_eq!(
            pids(&after),
            pids(&before),
            "round {i}: the workers changed"
        );
        assert_eq!(after["holdfast"]["pid"], before["holdfast"]["pid"]);
        assert_eq!(after["counters"]["upgrades"], i + 1);
        r.upgrades += 1;
        r.fds.push(fds(h.pid()));
        r.rss.push(rss_kib(h.pid()));
        ctl(h, &["restart", "--wait"]);
        let to = log.with_extension(format!("log.{i}"));
        fs::rename(log, &to).expect("rename the log");
        rotated.push(to);
        ctl(h, &["reopen-logs"]);
    }
    r
}

/// Counts of each numbered line, by (pid, n): `key` finds them in a line.
fn count_lines(
    files: &[PathBuf],
    key: impl Fn(&str) -> Option<(u32, u64)>,
) -> BTreeMap<(u32, u64), usize> {
    let mut seen = BTreeMap::new();
    for f in files {
        let text = fs::read_to_string(f).unwrap_or_default();
        for line in text.lines() {
            if let Some(k) = key(line) {
                *seen.entry(k).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Every number from 1 to the highest, once, for each pid.
fn assert_each_once(seen: &BTreeMap<(u32, u64), usize>) -> (usize, usize) {
    let mut top: BTreeMap<u32, u64> = BTreeMap::new();
    for ((pid, n), count) in seen {
        assert_eq!(*count, 1, "line {n} of {pid} appears {count} times");
        let t = top.entry(*pid).or_default();
        *t = (*t).max(*n);
    }
    for (pid, max) in &top {
        for n in 1..=*max {
            assert!(
                seen.contains_key(&(*pid, n)),
                "line {n} of {pid} is missing"
            );
        }
    }
    (seen.len(), top.len())
}

fn report_line(name: &str, report: &LoadReport, r: &Rounds, adopted: Vec<Duration>) {
    eprintln!(
        "upgrade proof ({name}): {} upgrades, {} requests, {} failed; signal to adoption {}; `upgrade --wait` {}; holdfast fds {} -> {}; RSS {} -> {} KiB",
        r.upgrades,
        report.ok + report.failed(),
        report.failed(),
        spread(adopted),
        spread(r.client.clone()),
        r.fds.first().copied().unwrap_or(0),
        r.fds.last().copied().unwrap_or(0),
        r.rss.first().copied().unwrap_or(0),
        r.rss.last().copied().unwrap_or(0),
    );
}

fn assert_flat(r: &Rounds) {
    // The first upgrade sets the baseline (the first image still held what
    // start-up needed); from then on nothing grows.
    let fds = &r.fds[1..];
    assert!(fds.iter().all(|n| *n == fds[0]), "fd counts {:?}", r.fds);
    let (first, last) = (r.rss[1], r.rss[r.rss.len() - 1]);
    assert!(
        last <= first + first / 5,
        "RSS grew from {first} to {last} KiB: {:?}",
        r.rss
    );
}

fn load(h: &Holdfast) -> Load {
    let mut spec = LoadSpec::new(h.tcp());
    spec.connections = 32;
    spec.path = "/?sleep=5".into();
    spec.max_duration = Duration::from_secs(600);
    spec.max_requests = 50_000_000;
    let load = Load::start(spec);
    wait_until(DEADLINE, "the load", || {
        (load.requests_so_far() >= 100).then_some(())
    });
    load
}

#[test]
fn twenty_upgrades_under_load_with_rollouts_and_reopens_test_worker() {
    // Each line is written in two halves 0.5 ms apart, 1000 lines a second:
    // most upgrades land with half a line in a sink.
    let mut h = Holdfast::start(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}", "--log-forever", "--log-rate", "1000", "--log-line-bytes", "5000", "--log-torn-us", "500", "--lame-duck-ms", "200"]
workers = 2
drain_timeout = "10s"

[logs]
stdout = "{dir}/app.log"
"#,
    );
    h.wait_log("all workers ready");
    let log = h.dir.path().join("app.log");
    let load = load(&h);
    let mut files = Vec::new();
    let r = twenty_rounds(&h, &log, &mut files);
    let report = load.stop();
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "{}", h.log());
    files.push(log);
    report_line("test worker", &report, &r, adoption_times(&h.log()));
    report.assert_clean(1000);
    assert_flat(&r);
    // Every numbered line once and whole, up to each worker's `done N`.
    let seen = count_lines(&files, |l| {
        let body = l.split_once("] ")?.1;
        let mut w = body.splitn(4, ' ');
        let (_, pid, n, pad) = (w.next()?, w.next()?, w.next()?, w.next()?);
        let n: u64 = n.parse().ok()?;
        let whole = body.len() == 4999;
        assert!(whole, "a torn line: {} bytes: {:.80}", body.len(), body);
        let _ = pad;
        Some((pid.parse().ok()?, n))
    });
    let done = count_lines(&files, |l| {
        let body = l.split_once("] ")?.1;
        let mut w = body.split(' ');
        let (_, pid, word, n) = (w.next()?, w.next()?, w.next()?, w.next()?);
        (word == "done").then_some(())?;
        Some((pid.parse().ok()?, n.parse().ok()?))
    });
    let (lines, workers) = assert_each_once(&seen);
    let cut = h
        .log()
        .lines()
        .filter(|l| l.contains("worker pipes handed over") && !l.contains("partial_lines=0"))
        .count();
    eprintln!(
        "upgrade proof (test worker): {cut} of 20 upgrades handed over a line cut in the middle"
    );
    for (pid, last) in done.keys() {
        if *last > 0 {
            assert!(
                seen.contains_key(&(*pid, *last)),
                "worker {pid}: done {last} but lines missing"
            );
        }
    }
    assert_eq!(done.len(), workers, "every worker wrote its done line once");
    eprintln!(
        "upgrade proof (test worker): {lines} numbered lines of {workers} workers in {} files, each once and whole",
        files.len()
    );
}

/// A Rack app that writes one numbered line per request (per process).
const NUMBERED_RU: &str = r#"
$stdout.sync = true
count = 0
lock = Mutex.new
run lambda { |env|
  n = lock.synchronize { count += 1 }
  $stdout.puts "p #{Process.pid} #{n}"
  sleep 0.005
  [200, { "content-type" => "text/plain", "x-pid" => Process.pid.to_s }, ["ok\n"]]
}
"#;

#[test]
fn twenty_upgrades_under_load_with_rollouts_and_reopens_puma() {
    let apps = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/apps");
    let app = tempfile::Builder::new()
        .prefix("holdfast-puma-app-")
        .tempdir()
        .expect("app dir");
    fs::write(app.path().join("numbered.ru"), NUMBERED_RU).expect("write numbered.ru");
    let config = format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[app]
command = ["puma", "-C", "{puma_rb}", "--bind-to-activated-sockets=only", "-t", "32:32", "numbered.ru"]
workers = 2
cwd = "{cwd}"
env = {{ RACK_ENV = "production" }}
handoff = ["systemd"]
ready = "notify"
ready_timeout = "60s"
drain_timeout = "35s"

[logs]
stdout = "{{dir}}/app.log"
"#,
        puma_rb = apps.join("puma.rb").display(),
        cwd = app.path().display()
    );
    let mut h = Holdfast::start(&config);
    h.wait_log("all workers ready");
    let log = h.dir.path().join("app.log");
    let load = load(&h);
    let mut files = Vec::new();
    let r = twenty_rounds(&h, &log, &mut files);
    let report = load.stop();
    h.signal(Signal::SIGTERM);
    assert!(
        h.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        h.log()
    );
    files.push(log);
    report_line("Puma", &report, &r, adoption_times(&h.log()));
    report.assert_clean(1000);
    assert_flat(&r);
    let seen = count_lines(&files, |l| {
        let body = l.split_once("] ")?.1;
        let mut w = body.split(' ');
        (w.next()? == "p").then_some(())?;
        Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
    });
    let (lines, workers) = assert_each_once(&seen);
    // Every answered request was logged, once.
    assert_eq!(lines as u64, report.ok, "lines vs answered requests");
    eprintln!("upgrade proof (Puma): {lines} request lines of {workers} Puma processes, each once");
}
