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
    common::describe(o)
}

fn ctl(h: &Holdfast, args: &[&str]) -> Output {
    let o = h.ctl(args);
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

/// A Rack app that boots for 2 s (an app's load time), then answers in 5 ms.
const BOOTING_RU: &str = r#"
sleep 2
run lambda { |env|
  sleep 0.005
  [200, { "content-type" => "text/plain", "x-pid" => Process.pid.to_s }, ["ok\n"]]
}
"#;

fn booting_puma(app: &Path) -> String {
    let apps = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/apps");
    format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[app]
command = ["puma", "-C", "{puma_rb}", "--bind-to-activated-sockets=only", "-t", "32:32", "booting.ru"]
workers = 2
cwd = "{cwd}"
env = {{ RACK_ENV = "production" }}
handoff = ["systemd"]
ready = "notify"
drain_timeout = "35s"
"#,
        puma_rb = apps.join("puma.rb").display(),
        cwd = app.display()
    )
}

/// Holds a listening socket and runs holdfast on it twice, one after the
/// other, as systemd does with the fd store on `systemctl restart`: the
/// socket stays open while no holdfast runs, connections wait in its queue.
/// Prints each holdfast's pid; their logs go to OUT.0 and OUT.1.
const RESTARTER: &str = r#"
import os, socket, subprocess, sys
port, config, holdfast, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(1024)
def passed():
    os.dup2(s.fileno(), 3)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_FDNAMES"] = "http"
    os.environ["LISTEN_PID"] = str(os.getpid())
for n in range(2):
    log = open("%s.%d" % (out, n), "w")
    p = subprocess.Popen([holdfast, "run", "--config", config], preexec_fn=passed,
                         pass_fds=(3, s.fileno()), stdout=log, stderr=log)
    print(p.pid, flush=True)
    p.wait()
"#;

/// The restarter and everything it started, stopped on drop.
struct Restarter {
    child: std::process::Child,
    pids: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

impl Drop for Restarter {
    fn drop(&mut self) {
        for pid in self.pids.lock().expect("pids").iter() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(40) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// The upgrade against a restart of holdfast through held sockets, with
/// Puma workers that boot in 2 s: how long from the signal until holdfast
/// serves with every worker ready again, how many requests failed, and the
/// longest request (a request queued while no worker accepted waits that long).
#[test]
fn an_upgrade_against_a_restart_through_the_fd_store() {
    let app = tempfile::Builder::new()
        .prefix("holdfast-puma-app-")
        .tempdir()
        .expect("app dir");
    fs::write(app.path().join("booting.ru"), BOOTING_RU).expect("write booting.ru");
    let config = booting_puma(app.path());

    // The upgrade.
    let h = Holdfast::start(&config);
    h.wait_log("all workers ready");
    let load_a = load(&h);
    let settle = load_a.requests_so_far();
    wait_until(DEADLINE, "load", || {
        (load_a.requests_so_far() >= settle + 500).then_some(())
    });
    let t = Instant::now();
    h.signal(Signal::SIGUSR2);
    h.wait_log("workers adopted) took=");
    let upgrade_wall = t.elapsed();
    let at = load_a.requests_so_far();
    wait_until(DEADLINE, "load after", || {
        (load_a.requests_so_far() >= at + 500).then_some(())
    });
    let a = load_a.stop();
    let adopted = adoption_times(&h.log());
    drop(h);

    // The restart: the same config, its socket held by the restarter.
    let dir = tempfile::Builder::new()
        .prefix("holdfast-restart-")
        .tempdir()
        .expect("dir");
    let port = common::free_port();
    let cfg = dir.path().join("holdfast.toml");
    fs::write(&cfg, config.replace("{port}", &port.to_string())).expect("config");
    let out = dir.path().join("holdfast.log");
    let mut child = std::process::Command::new("python3")
        .args(["-c", RESTARTER, &port.to_string()])
        .arg(&cfg)
        .arg(env!("CARGO_BIN_EXE_holdfast"))
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .spawn()
        .expect("python3");
    let stdout = child.stdout.take().expect("stdout");
    let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = pids.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(pid) = line.trim().parse::<u32>() {
                p.lock().expect("pids").push(pid);
            }
        }
    });
    let restarter = Restarter { child, pids };
    let log =
        |n: u32| fs::read_to_string(out.with_extension(format!("log.{n}"))).unwrap_or_default();
    wait_until(DEADLINE, "the first holdfast ready", || {
        log(0).contains("all workers ready").then_some(())
    });
    let mut spec = LoadSpec::new(common::Target::local(port));
    spec.connections = 32;
    spec.path = "/?sleep=5".into();
    spec.max_duration = Duration::from_secs(120);
    let load_b = Load::start(spec);
    wait_until(DEADLINE, "load", || {
        (load_b.requests_so_far() >= 600).then_some(())
    });
    let first = restarter.pids.lock().expect("pids")[0];
    let t = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGTERM)
        .expect("kill");
    wait_until(Duration::from_secs(60), "the second holdfast ready", || {
        log(1).contains("all workers ready").then_some(())
    });
    let restart_wall = t.elapsed();
    let at = load_b.requests_so_far();
    wait_until(DEADLINE, "load after", || {
        (load_b.requests_so_far() >= at + 500).then_some(())
    });
    let b = load_b.stop();
    drop(restarter);

    eprintln!(
        "upgrade proof (vs restart): upgrade (SIGUSR2): signal to adoption {} (wall {:.0} ms), {} requests, {} failed, longest request {:.0} ms",
        spread(adopted),
        ms(upgrade_wall),
        a.ok + a.failed(),
        a.failed(),
        a.percentile(100.0)
    );
    eprintln!(
        "upgrade proof (vs restart): restart through held sockets (SIGTERM, new holdfast): signal to every worker ready {:.0} ms, {} requests, {} failed, longest request {:.0} ms",
        ms(restart_wall),
        b.ok + b.failed(),
        b.failed(),
        b.percentile(100.0)
    );
    a.assert_clean(1000);
    b.assert_clean(1000);
    // The restart leaves no worker for the length of a boot; the upgrade none.
    assert!(restart_wall > Duration::from_secs(2), "{restart_wall:?}");
    assert!(b.percentile(100.0) > 1500.0, "{b}");
    assert!(a.percentile(100.0) < 1000.0, "{a}");
}
