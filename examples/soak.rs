//! The soak (issue 14): holdfast under steady load and a steady stream of
//! replacements for a bounded time, against the test worker and against
//! Puma at once, counting everything.
//!
//! ```sh
//! cargo build --release --bins --examples
//! cargo run --release --example soak -- --minutes 10     # default 10
//! ```
//!
//! Each server gets its own holdfast and 64 connections (48 keep-alive, 16
//! one-shot; the load client never retries and counts every failure by
//! kind). Every few seconds (`--every SECS`, default 5) each server gets
//! the next event of [`ROTATION`]: a rollout (`restart --wait`), a memory
//! replacement (`GET /grow` makes one worker exceed `[memory] limit`), a
//! log reopen (rename the file, `reopen-logs`), or an in-place upgrade of
//! holdfast itself (`upgrade --wait`, alternately to the installed binary
//! and to a copy of it at another path, so that every exec switches files
//! as a package upgrade does). Age replacements come by themselves
//! (`max_lifetime` 12 s + jitter).
//!
//! Phases: warm-up (one event of each kind, so first-time allocations are
//! done), a quiet phase (load, no events: the latency baseline, ending with
//! the "start" figures of holdfast's RSS, fds and threads), the event
//! phase, and a settle phase (load, no events, then the "end" figures).
//! Both measurements come at least 12 s after the last event, past tokio's
//! 10 s keep-alive of blocking threads that got no work.
//!
//! **Figures across upgrades.** An upgrade execs a new image in the same
//! pid: its heap and threads are made anew, only the fds and the state
//! cross. So the start and end figures are both taken in an image that an
//! upgrade started (the warm-up ends with one) and that has run under load
//! for at least 12 s since its last event. fds compare as they are (the
//! exec hands over exactly the open ones). RSS compares with a margin, and
//! is also sampled right before each exec (the report prints the first,
//! largest and last, and checks the last against the first): a leak that
//! an exec wipes shows within one image's life, one that crosses it (a
//! state that grows) in both. Threads: holdfast's own (the event loop, the
//! log and notify threads) must not grow; tokio's blocking pool is counted
//! apart, since an exec starts it empty and it then keeps as many threads
//! as blocking tasks ran at once lately (the 1 s memory round keeps them
//! warm), so its size says what the image did, not whether it leaks.
//! Instead every pool thread must be idle, waiting for work, at the end.
//!
//! It prints total requests, failed requests by kind, log lines written by
//! the workers against lines found in the files, holdfast's RSS, fd count
//! and thread count at start and end, and the p99 latency of the event
//! phase divided by the quiet phase's. It exits 1 if any request failed,
//! any log line is missing, torn or counted lost, holdfast's fds or own
//! threads grew, a pool thread stayed busy, its RSS (at the end, or right
//! before the last exec) grew by more than max(4 MiB, 25 %), an event or
//! an upgrade failed or never happened, or any process it started is left
//! behind.

#[path = "bench_common/mod.rs"]
mod bench_common;
#[path = "../tests/common/load.rs"]
#[allow(dead_code)] // the soak uses a subset of the load client
mod load;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use load::{http_get, Load, LoadReport, LoadSpec, Target};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const POLL: Duration = Duration::from_millis(50);
/// Past tokio's 10 s keep-alive of idle blocking threads.
const SETTLE: Duration = Duration::from_secs(12);
const MIB: u64 = 1024 * 1024;

/// What happens to a server every `--every` seconds, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Rollout,
    Memory,
    Reopen,
    /// `holdfast upgrade --wait --binary B`: holdfast execs B in its own
    /// pid, the workers untouched (see [`Server::upgrade`]).
    Upgrade,
}

/// An event that ran: what, how long it took, how it ended.
type Ran = (Event, Duration, Result<(), String>);

const ROTATION: &[Event] = &[
    Event::Rollout,
    Event::Upgrade,
    Event::Memory,
    Event::Reopen,
    Event::Upgrade,
    Event::Memory,
    Event::Rollout,
    Event::Reopen,
    Event::Upgrade,
];

struct Args {
    minutes: f64,
    every: Duration,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        minutes: 10.0,
        every: Duration::from_secs(5),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => {
                a.minutes = value()?.parse().map_err(|e| format!("--minutes: {e}"))?;
            }
            "--every" => {
                a.every =
                    Duration::from_secs_f64(value()?.parse().map_err(|e| format!("--every: {e}"))?);
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: soak [--minutes N] [--every SECS]"
                ))
            }
        }
    }
    if !(2.0..=24.0 * 60.0).contains(&a.minutes) {
        return Err(format!(
            "--minutes {}: from 2 (the quiet and settle phases take 45 s) to 1440",
            a.minutes
        ));
    }
    Ok(a)
}

/// The app one server runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum App {
    TestWorker,
    Puma,
}

impl App {
    fn name(self) -> &'static str {
        match self {
            App::TestWorker => "test-worker",
            App::Puma => "puma",
        }
    }
}

/// The Rack app of the Puma server: `examples/apps/config.ru`'s `/` and
/// `/grow`, plus one numbered line on stdout per request (`soak PID N`)
/// and `soak PID done N` at exit, so that every line a Puma wrote can be
/// found again.
const CONFIG_RU: &str = r#"require "rack"
$stdout.sync = true
COUNT = [0]
LOCK = Mutex.new
KEPT = []
at_exit { LOCK.synchronize { $stdout.write("soak #{Process.pid} done #{COUNT[0]}\n") } }
run lambda { |env|
  req = Rack::Request.new(env)
  if req.path_info == "/grow"
    mb = Integer(req.params.fetch("mb", "1"), exception: false) || 1
    s = "\0".b * (mb * 1024 * 1024)
    (0...s.bytesize).step(4096) { |i| s.setbyte(i, 1) }
    KEPT << s
  else
    ms = Integer(req.params.fetch("sleep", ""), exception: false) || 20
    sleep(ms / 1000.0)
  end
  n = LOCK.synchronize { COUNT[0] += 1 }
  $stdout.write("soak #{Process.pid} #{n}\n")
  body = "pid=#{Process.pid} n=#{n}\n"
  [200, { "Content-Type" => "text/plain", "Content-Length" => body.bytesize.to_s, "X-Pid" => Process.pid.to_s }, [body]]
}
"#;

/// holdfast's config for `app`; `aging` adds `max_lifetime` (the event
/// phase only, so the quiet phases stay quiet).
fn config(app: App, port: u16, dir: &Path, aging: bool) -> String {
    let worker = bench_common::test_worker_bin();
    let (command, workers, extra, limit) = match app {
        App::TestWorker => (
            format!(
                r#"["{}", "--lame-duck-ms", "1000", "--log-forever", "--log-rate", "50"]"#,
                worker.display()
            ),
            4,
            "",
            "32MiB",
        ),
        App::Puma => (
            r#"["puma", "-C", "puma.rb", "--bind-to-activated-sockets=only", "-t", "32:32", "config.ru"]"#.to_string(),
            2,
            "env = { RACK_ENV = \"production\" }\nhandoff = [\"systemd\"]\n",
            "96MiB",
        ),
    };
    let aging = if aging {
        "max_lifetime = \"12s\"\nlifetime_jitter = \"6s\"\n"
    } else {
        ""
    };
    format!(
        r#"control_socket = "holdfast.sock"

[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = {command}
workers = {workers}
cwd = "{dir}"
{extra}ready_timeout = "60s"
drain_timeout = "35s"
max_surge = 1

[memory]
limit = "{limit}"
metric = "rss"
interval = "1s"
grace = 2
min_lifetime = "0s"
{aging}
[logs]
stdout = "{dir}/app.log"
stderr = "{dir}/app.log"
"#,
        dir = dir.display(),
    )
}

/// holdfast's RSS (KiB), open fds and threads.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    rss_kib: u64,
    fds: usize,
    /// Every thread, tokio's blocking pool included.
    threads: u64,
    /// Of those, tokio's blocking pool (`tokio-rt-worker`): as many as
    /// blocking tasks (memory rounds, socket checks, status answers) ran at
    /// once lately. An idle one exits after 10 s without work, but the 1 s
    /// memory round keeps the warm ones busy, and an exec starts the pool
    /// empty: its size depends on the image's recent history, not on a leak.
    pool: u64,
    /// Pool threads not waiting for work (in a futex wait): a blocking task
    /// that never ends would hold one.
    pool_busy: u64,
}

impl Figures {
    /// holdfast's own threads: the event loop and the log, notify and
    /// trial threads, which must not grow.
    fn own_threads(&self) -> u64 {
        self.threads.saturating_sub(self.pool)
    }
}

/// [`Figures`] of `pid`: the fewest fds, threads and busy pool threads over
/// 10 samples 100 ms apart (a status request's socket or /proc read of the
/// moment, a memory round, is not holdfast's to keep), the RSS of the last.
fn figures(pid: u32) -> Figures {
    let mut least = one_sample(pid);
    for _ in 0..9 {
        std::thread::sleep(Duration::from_millis(100));
        let f = one_sample(pid);
        least.fds = least.fds.min(f.fds);
        if f.threads < least.threads {
            (least.threads, least.pool) = (f.threads, f.pool);
        }
        least.pool_busy = least.pool_busy.min(f.pool_busy);
        least.rss_kib = f.rss_kib;
    }
    least
}

fn one_sample(pid: u32) -> Figures {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let (mut pool, mut pool_busy) = (0, 0);
    for task in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let read = |f: &str| fs::read_to_string(task.path().join(f)).unwrap_or_default();
        if read("comm").trim() == "tokio-rt-worker" {
            pool += 1;
            if !read("wchan").contains("futex") {
                pool_busy += 1;
            }
        }
    }
    Figures {
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        pool,
        pool_busy,
        fds: fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
    }
}

/// One holdfast and its app, in a temp dir of its own.
struct Server {
    app: App,
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
    /// `HOLDFAST_SOAK_TAG=...`, inherited by holdfast and every worker.
    tag: String,
    /// Requests the event driver made itself (`/grow`), by answering pid.
    grow_by_pid: Mutex<BTreeMap<u32, u64>>,
    reopens: Mutex<u32>,
    /// The binaries upgrades alternate between: the installed one, and a
    /// copy of it at `{dir}/next/holdfast` (the first upgrade goes there).
    binaries: [PathBuf; 2],
    /// Upgrades done, and holdfast's [`Figures`] right before each.
    upgrades: Mutex<Vec<Figures>>,
}

impl Server {
    fn start(app: App) -> Server {
        let dir = tempfile::Builder::new()
            .prefix(&format!("holdfast-soak-{}-", app.name()))
            .tempdir()
            .expect("temp dir");
        if app == App::Puma {
            let apps = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/apps");
            fs::copy(apps.join("puma.rb"), dir.path().join("puma.rb")).expect("copy puma.rb");
            fs::write(dir.path().join("config.ru"), CONFIG_RU).expect("write config.ru");
        }
        let installed = bench_common::holdfast_bin();
        let next = dir.path().join("next");
        fs::create_dir(&next).expect("mkdir next");
        fs::copy(&installed, next.join("holdfast")).expect("copy holdfast");
        let port = bench_common::free_port();
        let config = dir.path().join("holdfast.toml");
        fs::write(&config, self::config(app, port, dir.path(), false)).expect("write config");
        let log = fs::File::create(dir.path().join("holdfast.log")).expect("holdfast.log");
        let tag = format!("{}-{}", std::process::id(), app.name());
        // setpriv: holdfast gets SIGTERM (a graceful stop) if the soak dies.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "TERM", "--"])
            .arg(&installed)
            .args(["run", "--config"])
            .arg(&config)
            .env("HOLDFAST_SOAK_TAG", &tag)
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn setpriv holdfast (util-linux)");
        Server {
            app,
            dir,
            port,
            child,
            tag: format!("HOLDFAST_SOAK_TAG={tag}"),
            grow_by_pid: Mutex::new(BTreeMap::new()),
            reopens: Mutex::new(0),
            binaries: [installed, next.join("holdfast")],
            upgrades: Mutex::new(Vec::new()),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn target(&self) -> Target {
        Target::local(self.port)
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bench_common::holdfast_bin())
            .args(args)
            .arg("--control")
            .arg(self.dir.path().join("holdfast.sock"))
            .stdin(Stdio::null())
            .output()
            .expect("run holdfast")
    }

    fn status(&self) -> Result<Value, String> {
        let o = self.ctl(&["status", "--json"]);
        if !o.status.success() {
            return Err(format!(
                "status: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| format!("status JSON: {e}"))
    }

    fn counter(&self, s: &Value, path: &str) -> u64 {
        path.split('.')
            .fold(&s["counters"], |v, k| &v[k])
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits until every slot has a ready worker of the current generation
    /// and no rollout is under way.
    fn wait_ready(&self, within: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let s = self.status();
            if let Ok(s) = &s {
                if s["holdfast"]["ready"] == true && s["holdfast"]["rollout"].is_null() {
                    return Ok(());
                }
            }
            if start.elapsed() > within {
                return Err(format!(
                    "{}: not ready after {within:?}: {s:?}",
                    self.app.name()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Switches `max_lifetime` on or off (a rollout applies it).
    fn aging(&self, on: bool) {
        let text = config(self.app, self.port, self.dir.path(), on);
        let tmp = self.dir.path().join(".holdfast.toml.tmp");
        fs::write(&tmp, text).expect("write config");
        fs::rename(&tmp, self.dir.path().join("holdfast.toml")).expect("rename config");
    }

    /// Runs one event to its end; `Err` says what went wrong.
    fn event(&self, e: Event) -> Result<(), String> {
        match e {
            Event::Rollout => {
                let o = self.ctl(&["restart", "--wait"]);
                o.status.success().then_some(()).ok_or(format!(
                    "restart --wait: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Event::Memory => {
                let before = self
                    .status()
                    .map(|s| self.counter(&s, "replacements.memory"))?;
                let mb = match self.app {
                    App::TestWorker => 48,
                    App::Puma => 96,
                };
                let r = http_get(&self.target(), &format!("/grow?mb={mb}"))
                    .map_err(|k| format!("GET /grow: {k}"))?;
                let pid = r
                    .pid()
                    .ok_or(format!("GET /grow: status {}, no X-Pid", r.status))?;
                *self
                    .grow_by_pid
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(pid)
                    .or_default() += 1;
                // Replaced for its memory, or first for its age or a rollout.
                let start = Instant::now();
                loop {
                    let s = self.status()?;
                    let gone = !s["workers"]
                        .as_array()
                        .is_some_and(|ws| ws.iter().any(|w| w["pid"] == pid));
                    if self.counter(&s, "replacements.memory") > before || gone {
                        return Ok(());
                    }
                    if start.elapsed() > Duration::from_secs(60) {
                        return Err(format!(
                            "worker {pid} grown by {mb} MiB not replaced in 60 s"
                        ));
                    }
                    std::thread::sleep(POLL);
                }
            }
            Event::Reopen => {
                let mut n = self.reopens.lock().unwrap_or_else(|e| e.into_inner());
                *n += 1;
                let from = self.dir.path().join("app.log");
                fs::rename(&from, self.dir.path().join(format!("app.log.{n}")))
                    .map_err(|e| format!("rename {}: {e}", from.display()))?;
                let o = self.ctl(&["reopen-logs"]);
                o.status.success().then_some(()).ok_or(format!(
                    "reopen-logs: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Event::Upgrade => self.upgrade(),
        }
    }

    /// `upgrade --wait` to the other binary, then: holdfast is the same
    /// pid and runs that file, its control socket answers, the upgrade was
    /// counted and adopted (no fallback rollout), and every worker that was
    /// ready before is still there, unless holdfast logged draining it for
    /// its age or memory (those go on meanwhile, the upgrade does not stop
    /// them).
    fn upgrade(&self) -> Result<(), String> {
        let pid = self.pid();
        let before = self.status()?;
        let n = {
            let mut u = self.upgrades.lock().unwrap_or_else(|e| e.into_inner());
            u.push(one_sample(pid));
            u.len()
        };
        let binary = &self.binaries[n % 2];
        let ready = |s: &Value| -> BTreeSet<u64> {
            s["workers"]
                .as_array()
                .map(|ws| {
                    ws.iter()
                        .filter(|w| w["state"] == "ready")
                        .filter_map(|w| w["pid"].as_u64())
                        .collect()
                })
                .unwrap_or_default()
        };
        let o = self.ctl(&["upgrade", "--wait", "--binary", &binary.to_string_lossy()]);
        let said = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !o.status.success() {
            return Err(format!(
                "upgrade --wait --binary {}: {}",
                binary.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        if !(said.starts_with("upgraded from") && said.contains(&format!("(pid {pid},"))) {
            return Err(format!(
                "upgrade --wait said {said:?}, not `upgraded from ... (pid {pid}, ...)`"
            ));
        }
        let after = self
            .status()
            .map_err(|e| format!("after the upgrade: {e}"))?;
        if after["holdfast"]["pid"].as_u64() != Some(u64::from(pid)) {
            return Err(format!(
                "holdfast's pid was {pid}, status now says {}",
                after["holdfast"]["pid"]
            ));
        }
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .map_err(|e| format!("/proc/{pid}/exe: {e}"))?;
        if Some(&exe) != fs::canonicalize(binary).ok().as_ref() {
            return Err(format!(
                "holdfast runs {}, not {}",
                exe.display(),
                binary.display()
            ));
        }
        let delta = |path: &str| {
            self.counter(&after, path)
                .saturating_sub(self.counter(&before, path))
        };
        if delta("upgrades") != 1
            || delta("failed_upgrades") != 0
            || delta("replacements.rollout") != 0
            || delta("replacements.crash") != 0
        {
            return Err(format!(
                "counters: upgrades +{}, failed upgrades +{}, rollout replacements +{}, crash replacements +{}: want +1, 0, 0, 0",
                delta("upgrades"),
                delta("failed_upgrades"),
                delta("replacements.rollout"),
                delta("replacements.crash")
            ));
        }
        let gone: Vec<u64> = ready(&before).difference(&ready(&after)).copied().collect();
        if !gone.is_empty() {
            let log = fs::read_to_string(self.dir.path().join("holdfast.log")).unwrap_or_default();
            let unexplained: Vec<u64> = gone
                .iter()
                .copied()
                .filter(|p| {
                    !log.lines()
                        .any(|l| l.contains("draining worker") && l.contains(&format!("pid={p} ")))
                })
                .collect();
            let recycled = delta("replacements.age") + delta("replacements.memory");
            if !unexplained.is_empty() || (gone.len() as u64) > recycled {
                return Err(format!(
                    "ready workers {gone:?} gone across the upgrade, {recycled} age/memory replacements meanwhile, not drained by holdfast: {unexplained:?}"
                ));
            }
        }
        Ok(())
    }

    /// Every log file, oldest first, as one text.
    fn app_logs(&self) -> String {
        let n = *self.reopens.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        for k in 1..=n {
            text.push_str(
                &fs::read_to_string(self.dir.path().join(format!("app.log.{k}")))
                    .unwrap_or_default(),
            );
        }
        text.push_str(&fs::read_to_string(self.dir.path().join("app.log")).unwrap_or_default());
        text
    }

    /// Stops holdfast (`stop --wait`); its exit code.
    fn stop(&mut self) -> Result<(), String> {
        let o = self.ctl(&["stop", "--wait"]);
        if !o.status.success() {
            return Err(format!(
                "stop --wait: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return (st.code() == Some(0))
                    .then_some(())
                    .ok_or(format!("holdfast exited: {st}"));
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err("holdfast still runs 60 s after stop --wait".into());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Live processes carrying this server's tag.
    fn left(&self) -> Vec<u32> {
        let Ok(dir) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let alive = fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| Some(s[s.rfind(')')? + 2..].chars().next()? != 'Z'))
                    .unwrap_or(false);
                alive
                    && fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == self.tag.as_bytes()))
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Our group: holdfast and the workers it did not move elsewhere.
            let _ = killpg(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        for pid in self.left() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// 48 keep-alive and 16 one-shot connections on `target`.
fn loads(target: &Target) -> [Load; 2] {
    let spec = |connections, keepalive| LoadSpec {
        connections,
        keepalive,
        path: "/?sleep=20".to_string(),
        max_duration: Duration::from_secs(25 * 3600),
        max_requests: u64::MAX / 2,
        request_timeout: Duration::from_secs(10),
        ..LoadSpec::new(target.clone())
    };
    [Load::start(spec(48, true)), Load::start(spec(16, false))]
}

fn stop_loads(l: [Load; 2]) -> Vec<LoadReport> {
    l.into_iter().map(Load::stop).collect()
}

/// p99 over every OK request of `reports`, in ms.
fn p99(reports: &[LoadReport]) -> f64 {
    let mut all: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.latencies_ms.clone())
        .collect();
    if all.is_empty() {
        return f64::NAN;
    }
    all.sort_by(f64::total_cmp);
    all[((all.len() as f64 * 0.99).ceil() as usize)
        .saturating_sub(1)
        .min(all.len() - 1)]
}

/// One life of a worker process: its slot and pid, and which life of that
/// (slot, pid) it is. pids are reused (pid_max is 32768 on many machines
/// and a 10-minute run on a shared box sees thousands of processes); a
/// worker's `done N` line ends its life, so the next lines with the same
/// prefix belong to the next process that got the pid.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Life {
    pid: u32,
    slot: String,
    n: u32,
}

/// What a server's log files hold: each worker life's numbered lines, its
/// `done N`, and lines that are torn (not a whole line of a known form).
#[derive(Default)]
struct LogCount {
    seqs: BTreeMap<Life, Vec<u64>>,
    done: BTreeMap<Life, u64>,
    torn: Vec<String>,
}

fn count_lines(app: App, text: &str) -> LogCount {
    let mut c = LogCount::default();
    let mut lives: BTreeMap<(String, u32), u32> = BTreeMap::new();
    for line in text.lines() {
        // "[wS PID] body"
        let Some((slot, pid, body)) = line
            .strip_prefix("[w")
            .and_then(|r| r.split_once("] "))
            .and_then(|(sp, body)| {
                let (slot, pid) = sp.split_once(' ')?;
                Some((slot.to_string(), pid.parse::<u32>().ok()?, body))
            })
        else {
            c.torn.push(line.chars().take(120).collect());
            continue;
        };
        let numbered = match app {
            // "wS PID SEQ xxx" / "wS PID done N"
            App::TestWorker => body.strip_prefix(&format!("w{slot} {pid} ")),
            // "soak PID N" / "soak PID done N"
            App::Puma => body.strip_prefix(&format!("soak {pid} ")),
        };
        let Some(rest) = numbered else {
            continue; // the server's own messages
        };
        let key = (slot.clone(), pid);
        let life = Life {
            pid,
            slot,
            n: lives.get(&key).copied().unwrap_or(0),
        };
        if let Some(n) = rest
            .strip_prefix("done ")
            .and_then(|n| n.trim().parse().ok())
        {
            c.done.insert(life, n);
            *lives.entry(key).or_default() += 1;
        } else if let Some(seq) = rest.split(' ').next().and_then(|n| n.parse().ok()) {
            let whole = match app {
                App::TestWorker => rest
                    .split_once(' ')
                    .is_some_and(|(_, pad)| pad.bytes().all(|b| b == b'x')),
                App::Puma => !rest.contains(' '),
            };
            if whole {
                c.seqs.entry(life).or_default().push(seq);
            } else {
                c.torn.push(line.chars().take(120).collect());
            }
        } else {
            c.torn.push(line.chars().take(120).collect());
        }
    }
    c
}

/// Everything a server's run produced, for the report.
struct Outcome {
    app: App,
    warm: Vec<LoadReport>,
    quiet: Vec<LoadReport>,
    events: Vec<LoadReport>,
    settle: Vec<LoadReport>,
    event_log: Vec<Ran>,
    start: Figures,
    end: Figures,
    counters: Value,
    lines_written: u64,
    lines_found: u64,
    lines_missing: u64,
    lines_twice: u64,
    torn: Vec<String>,
    /// Worker processes whose lines were counted, and how many of them had
    /// a (slot, pid) an earlier one had.
    worker_lives: usize,
    pids_reused: usize,
    per_pid_mismatch: Vec<String>,
    left: Vec<u32>,
    stop: Result<(), String>,
    /// holdfast's figures right before each upgrade's exec.
    pre_exec: Vec<Figures>,
    /// The file holdfast ran at the end.
    exe: String,
}

fn main() -> ExitCode {
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(64);
        }
    };
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let quiet = Duration::from_secs_f64((total.as_secs_f64() * 0.15).clamp(20.0, 60.0));
    let began = Instant::now();
    println!(
        "soak: {} minute(s), an event every {:?} per server, quiet phase {quiet:?}",
        args.minutes, args.every
    );

    let servers: Vec<Arc<Server>> = [App::TestWorker, App::Puma]
        .into_iter()
        .map(|app| Arc::new(Server::start(app)))
        .collect();
    for s in &servers {
        if let Err(e) = s.wait_ready(Duration::from_secs(120)) {
            eprintln!("soak: {e}");
            return ExitCode::FAILURE;
        }
    }

    // Warm-up: load, and one event of each kind.
    let warm: Vec<[Load; 2]> = servers.iter().map(|s| loads(&s.target())).collect();
    let mut event_logs: Vec<Vec<Ran>> = vec![Vec::new(); servers.len()];
    for (i, s) in servers.iter().enumerate() {
        // The upgrade last: the start figures come from an image it started.
        for e in [Event::Rollout, Event::Memory, Event::Reopen, Event::Upgrade] {
            let t = Instant::now();
            let r = s.event(e);
            event_logs[i].push((e, t.elapsed(), r));
        }
    }
    let mut warm_reports: Vec<Vec<LoadReport>> = warm.into_iter().map(stop_loads).collect();

    // Quiet: the latency baseline, then the start figures.
    let quiet_loads: Vec<[Load; 2]> = servers.iter().map(|s| loads(&s.target())).collect();
    std::thread::sleep(quiet.max(SETTLE));
    let start: Vec<Figures> = servers.iter().map(|s| figures(s.pid())).collect();
    let quiet_reports: Vec<Vec<LoadReport>> = quiet_loads.into_iter().map(stop_loads).collect();
    println!(
        "soak: quiet phase done at {:?}; events start",
        began.elapsed()
    );

    // Events, until SETTLE + one rollout before the end.
    let event_loads: Vec<[Load; 2]> = servers.iter().map(|s| loads(&s.target())).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let events_until = total
        .saturating_sub(began.elapsed())
        .saturating_sub(SETTLE + Duration::from_secs(15));
    let drivers: Vec<JoinHandle<Vec<Ran>>> = servers
        .iter()
        .map(|s| {
            let s = Arc::clone(s);
            let stop = Arc::clone(&stop);
            let every = args.every;
            std::thread::spawn(move || {
                s.aging(true);
                let mut done = Vec::new();
                for e in ROTATION.iter().cycle() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let t = Instant::now();
                    let r = s.event(*e);
                    done.push((*e, t.elapsed(), r));
                    // Pacing between events, not synchronisation.
                    std::thread::sleep(every);
                }
                // Age replacements off again, applied by one last rollout.
                s.aging(false);
                let t = Instant::now();
                done.push((Event::Rollout, t.elapsed(), s.event(Event::Rollout)));
                done
            })
        })
        .collect();
    std::thread::sleep(events_until);
    stop.store(true, Ordering::SeqCst);
    for (i, d) in drivers.into_iter().enumerate() {
        event_logs[i].extend(d.join().unwrap_or_default());
    }
    let event_reports: Vec<Vec<LoadReport>> = event_loads.into_iter().map(stop_loads).collect();
    println!("soak: events done at {:?}; settling", began.elapsed());

    // Settle, then the end figures.
    let settle_loads: Vec<[Load; 2]> = servers.iter().map(|s| loads(&s.target())).collect();
    for s in &servers {
        let _ = s.wait_ready(Duration::from_secs(60));
    }
    std::thread::sleep(SETTLE);
    let end: Vec<Figures> = servers.iter().map(|s| figures(s.pid())).collect();
    let settle_reports: Vec<Vec<LoadReport>> = settle_loads.into_iter().map(stop_loads).collect();

    // Stop, then count.
    let mut outcomes = Vec::new();
    let servers: Vec<Server> = servers
        .into_iter()
        .map(|s| Arc::try_unwrap(s).unwrap_or_else(|_| panic!("a driver still holds a server")))
        .collect();
    for (i, mut s) in servers.into_iter().enumerate() {
        let counters = s
            .status()
            .map(|v| v["counters"].clone())
            .unwrap_or(Value::Null);
        let exe = fs::read_link(format!("/proc/{}/exe", s.pid()))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("? ({e})"));
        let pre_exec = s.upgrades.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let stopped = s.stop();
        let left = s.left();
        let logs = count_lines(s.app, &s.app_logs());
        let mut written = 0;
        let mut found = 0;
        let mut missing = 0;
        let mut twice = 0;
        let mut per_pid_mismatch = Vec::new();
        let all: Vec<&LoadReport> = warm_reports[i]
            .iter()
            .chain(&quiet_reports[i])
            .chain(&event_reports[i])
            .chain(&settle_reports[i])
            .collect();
        let grows = s
            .grow_by_pid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let lives: BTreeSet<Life> = logs.seqs.keys().chain(logs.done.keys()).cloned().collect();
        let worker_lives = lives.len();
        let pids_reused = lives.iter().filter(|l| l.n > 0).count();
        let mut lines_by_pid: BTreeMap<u32, u64> = BTreeMap::new();
        for life in lives {
            let seqs = logs.seqs.get(&life).cloned().unwrap_or_default();
            let set: BTreeSet<u64> = seqs.iter().copied().collect();
            if set.len() != seqs.len() {
                per_pid_mismatch.push(format!(
                    "{} worker {life:?}: {} lines twice",
                    s.app.name(),
                    seqs.len() - set.len()
                ));
            }
            twice += (seqs.len() - set.len()) as u64;
            found += set.len() as u64;
            match logs.done.get(&life) {
                Some(&n) => {
                    written += n;
                    missing += n - set.range(1..=n).count() as u64;
                    *lines_by_pid.entry(life.pid).or_default() += n;
                }
                None => per_pid_mismatch
                    .push(format!("{} worker {life:?}: no `done` line", s.app.name())),
            }
        }
        if s.app == App::Puma {
            // Every request a Puma answered wrote one line (a pid's lives
            // are summed: the load client knows only the pid).
            for (pid, n) in &lines_by_pid {
                let answered: u64 = all
                    .iter()
                    .map(|r| r.per_pid.get(pid).copied().unwrap_or(0))
                    .sum::<u64>()
                    + grows.get(pid).copied().unwrap_or(0);
                if answered != *n {
                    per_pid_mismatch.push(format!(
                        "puma {pid}: {n} lines, {answered} requests answered"
                    ));
                }
            }
        }
        outcomes.push(Outcome {
            app: s.app,
            warm: std::mem::take(&mut warm_reports[i]),
            quiet: quiet_reports[i].clone(),
            events: event_reports[i].clone(),
            settle: settle_reports[i].clone(),
            event_log: std::mem::take(&mut event_logs[i]),
            start: start[i],
            end: end[i],
            counters,
            lines_written: written,
            lines_found: found,
            lines_missing: missing,
            lines_twice: twice,
            torn: logs.torn,
            worker_lives,
            pids_reused,
            per_pid_mismatch,
            left,
            stop: stopped,
            pre_exec,
            exe,
        });
    }
    report(&outcomes, began.elapsed())
}

/// Prints the figures; the exit code says whether anything failed.
fn report(outcomes: &[Outcome], took: Duration) -> ExitCode {
    let mut problems: Vec<String> = Vec::new();
    println!("\nsoak: ran {:.1} min", took.as_secs_f64() / 60.0);
    for o in outcomes {
        let name = o.app.name();
        let all: Vec<&LoadReport> = o
            .warm
            .iter()
            .chain(&o.quiet)
            .chain(&o.events)
            .chain(&o.settle)
            .collect();
        let ok: u64 = all.iter().map(|r| r.ok).sum();
        let failed: u64 = all.iter().map(|r| r.failed()).sum();
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        for r in &all {
            for (k, v) in &r.failures {
                *kinds.entry(k.clone()).or_default() += v;
            }
        }
        let mut events: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for (e, _, r) in &o.event_log {
            let entry = events.entry(format!("{e:?}").to_lowercase()).or_default();
            entry.0 += 1;
            if let Err(why) = r {
                entry.1 += 1;
                problems.push(format!("{name}: {e:?} failed: {why}"));
            }
        }
        let (p99_quiet, p99_events) = (p99(&o.quiet), p99(&o.events));
        let c = &o.counters;
        let get = |path: &str| path.split('.').fold(c, |v, k| &v[k]).as_u64().unwrap_or(0);
        println!("\n== {name}");
        println!(
            "requests: {} ({ok} ok, {failed} failed {kinds:?})",
            ok + failed
        );
        println!("events run (count, failed): {events:?}");
        println!(
            "replacements: rollout {}, memory {}, age {}, crash {}; log reopens {}; upgrades {} (failed {}); drain kills {}; log lines lost {}",
            get("replacements.rollout"),
            get("replacements.memory"),
            get("replacements.age"),
            get("replacements.crash"),
            get("log_reopens"),
            get("upgrades"),
            get("failed_upgrades"),
            get("drain_kills"),
            get("log_lines_lost"),
        );
        println!(
            "log lines: written by workers {}, found in the files {} (missing {}, twice {}, torn {}); {} worker processes ({} with a reused pid)",
            o.lines_written,
            o.lines_found,
            o.lines_missing,
            o.lines_twice,
            o.torn.len(),
            o.worker_lives,
            o.pids_reused
        );
        println!(
            "holdfast: RSS {} -> {} KiB, fds {} -> {}, threads {} -> {} (its own {} -> {}, tokio's blocking pool {} -> {}, busy at the end {})",
            o.start.rss_kib,
            o.end.rss_kib,
            o.start.fds,
            o.end.fds,
            o.start.threads,
            o.end.threads,
            o.start.own_threads(),
            o.end.own_threads(),
            o.start.pool,
            o.end.pool,
            o.end.pool_busy,
        );
        let rss: Vec<u64> = o.pre_exec.iter().map(|f| f.rss_kib).collect();
        let (first, last) = (
            rss.first().copied().unwrap_or(0),
            rss.last().copied().unwrap_or(0),
        );
        let most = rss.iter().copied().max().unwrap_or(0);
        println!(
            "holdfast right before each of {} execs: RSS first {first}, largest {most}, last {last} KiB; fds {} -> {}; runs {} at the end",
            rss.len(),
            o.pre_exec.first().map_or(0, |f| f.fds),
            o.pre_exec.last().map_or(0, |f| f.fds),
            o.exe,
        );
        println!(
            "p99 latency: {p99_events:.1} ms with events / {p99_quiet:.1} ms without = {:.2}",
            p99_events / p99_quiet
        );
        for r in &all {
            for s in &r.failure_samples {
                println!("  failure: {s}");
            }
        }
        if failed > 0 {
            problems.push(format!("{name}: {failed} requests failed {kinds:?}"));
        }
        if o.lines_written != o.lines_found || o.lines_missing > 0 || o.lines_twice > 0 {
            problems.push(format!(
                "{name}: log lines written {} but found {} (missing {}, twice {})",
                o.lines_written, o.lines_found, o.lines_missing, o.lines_twice
            ));
        }
        if !o.torn.is_empty() {
            problems.push(format!(
                "{name}: torn log lines: {:?}",
                &o.torn[..o.torn.len().min(5)]
            ));
        }
        if get("log_lines_lost") > 0 {
            problems.push(format!(
                "{name}: holdfast counted {} log lines lost",
                get("log_lines_lost")
            ));
        }
        problems.extend(
            o.per_pid_mismatch
                .iter()
                .take(10)
                .map(|m| format!("{name}: {m}")),
        );
        if o.per_pid_mismatch.len() > 10 {
            problems.push(format!(
                "{name}: and {} more worker(s) whose lines do not add up",
                o.per_pid_mismatch.len() - 10
            ));
        }
        if o.end.fds > o.start.fds {
            problems.push(format!(
                "{name}: holdfast's fds grew {} -> {}",
                o.start.fds, o.end.fds
            ));
        }
        if o.end.own_threads() > o.start.own_threads() {
            problems.push(format!(
                "{name}: holdfast's own threads grew {} -> {}",
                o.start.own_threads(),
                o.end.own_threads()
            ));
        }
        if o.end.pool_busy > 0 {
            problems.push(format!(
                "{name}: {} of tokio's blocking pool threads busy for a whole second at the end: a blocking task that does not end",
                o.end.pool_busy
            ));
        }
        let allowed = o.start.rss_kib + (o.start.rss_kib / 4).max(4 * MIB / 1024);
        if o.end.rss_kib > allowed {
            problems.push(format!(
                "{name}: holdfast's RSS grew {} -> {} KiB (allowed up to {allowed})",
                o.start.rss_kib, o.end.rss_kib
            ));
        }
        let allowed = first + (first / 4).max(4 * MIB / 1024);
        if last > allowed {
            problems.push(format!(
                "{name}: holdfast's RSS right before an exec grew across the upgrades {first} -> {last} KiB (allowed up to {allowed})"
            ));
        }
        for (kind, path) in [
            ("rollout", "replacements.rollout"),
            ("memory", "replacements.memory"),
            ("age", "replacements.age"),
            ("reopen", "log_reopens"),
            ("upgrade", "upgrades"),
        ] {
            if get(path) == 0 {
                problems.push(format!(
                    "{name}: no {kind} happened: the soak did not test it"
                ));
            }
        }
        if get("failed_upgrades") > 0 {
            problems.push(format!(
                "{name}: {} upgrades failed",
                get("failed_upgrades")
            ));
        }
        if !o.left.is_empty() {
            problems.push(format!(
                "{name}: processes left after holdfast stopped: {:?}",
                o.left
            ));
        }
        if let Err(e) = &o.stop {
            problems.push(format!("{name}: {e}"));
        }
    }
    if problems.is_empty() {
        println!("\nsoak: OK");
        ExitCode::SUCCESS
    } else {
        println!("\nsoak: FAILED");
        for p in &problems {
            println!("- {p}");
        }
        ExitCode::FAILURE
    }
}
