//! What every fault test shares: the config with a healthy port and a side
//! port, the two loads, the consistency and leftover checks, and
//! [`Problems`], which collects everything wrong a test saw so that a
//! failure tells the whole story.
//!
//! **Two ports.** A fault aimed at one worker (it crashes, hangs, is OOM
//! killed) costs the requests that worker holds: nobody can answer them. To
//! check that *healthy* workers lose nothing, every worker gets two
//! listeners: `http` on `{port}` and `side` on `{port2}`. The faulty worker
//! is started with `--close-listener http`, so it serves only `side`, and
//! `ready_listeners = ["side"]` lets it count as ready. The healthy load on
//! `http` reaches healthy workers only and must see 0 failures; the side
//! load reaches every worker, and each test says which failures it allows
//! there (usually: none but those of the faulty worker's own connections).
//!
//! The faulty worker is picked by a `sh -c` wrapper that `exec`s the test
//! worker (same pid, so `LISTEN_PID` holds) with extra flags when
//! `HOLDFAST_WORKER_ID` (and, if set, `HOLDFAST_GENERATION`) match.

use std::collections::BTreeMap;
use std::fs;
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::common::observe::{established_on, poll, socket_inodes, Problems, POLL};
use crate::common::{
    pid_alive, tagged_pids, Holdfast, Launch, Load, LoadReport, LoadSpec, Swept, Target, DEADLINE,
};

/// The control socket of every test here (next to the config).
pub const SOCK: &str = "{dir}/holdfast.sock";

/// Every test here runs real workers under load: two at once on a 2-core
/// box starve each other and the timings they check.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    // A failed test must not fail the others.
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A config: listeners `http` (`{port}`) and `side` (`{port2}`), the test
/// worker behind the fault wrapper, and the fault itself.
pub struct Cfg<'a> {
    pub workers: u32,
    /// The slot whose worker misbehaves; `None`: every worker is healthy.
    pub slot: Option<u32>,
    /// Only this generation's worker of `slot` misbehaves (`None`: every one).
    pub generation: Option<u64>,
    /// Flags added to the faulty worker's command line (it always gets
    /// `--close-listener http` as well).
    pub flags: &'a str,
    /// A command the faulty worker is exec'd through (`prlimit --nofile=24 --`).
    pub prefix: &'a str,
    /// A cgroup directory the faulty worker moves itself into first.
    pub cgroup: Option<&'a str>,
    /// Flags of every worker (after the defaults `--lame-duck-ms 300`).
    pub all_flags: &'a str,
    /// Lines added to `[app]`.
    pub app: &'a str,
    /// Tables appended after `[app]` (`[logs]`, `[memory]`).
    pub tables: &'a str,
}

impl Default for Cfg<'_> {
    fn default() -> Self {
        Cfg {
            workers: 2,
            slot: None,
            generation: None,
            flags: "",
            prefix: "",
            cgroup: None,
            all_flags: "",
            app: "",
            tables: "",
        }
    }
}

/// The wrapper: `$0`-less `sh -c SCRIPT fault TEST_WORKER FLAGS...`.
const WRAPPER: &str = r#"if [ "$HOLDFAST_WORKER_ID" = "$FAULT_SLOT" ] && { [ -z "$FAULT_GEN" ] || [ "$HOLDFAST_GENERATION" = "$FAULT_GEN" ]; }; then if [ -n "$FAULT_CGROUP" ]; then echo $$ > "$FAULT_CGROUP/cgroup.procs" || exit 71; fi; exec $FAULT_PREFIX "$@" --close-listener http $FAULT_FLAGS; fi; exec "$@""#;

impl Cfg<'_> {
    pub fn render(&self) -> String {
        let words = |s: &str| -> String {
            s.split_whitespace()
                .map(|w| format!(", '{w}'"))
                .collect::<String>()
        };
        let slot = self.slot.map_or("none".to_string(), |s| s.to_string());
        let generation = self.generation.map_or(String::new(), |g| g.to_string());
        format!(
            r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[[listen]]
name = "side"
address = "127.0.0.1:{{port2}}"

[app]
command = ['sh', '-c', '{WRAPPER}', 'fault', '{{test_worker}}', '--lame-duck-ms', '300'{all}]
workers = {workers}
ready_listeners = ["side"]
env = {{ FAULT_SLOT = "{slot}", FAULT_GEN = "{generation}", FAULT_FLAGS = '{flags}', FAULT_PREFIX = '{prefix}', FAULT_CGROUP = '{cgroup}' }}
{app}
{tables}
"#,
            all = words(self.all_flags),
            workers = self.workers,
            flags = self.flags,
            prefix = self.prefix,
            cgroup = self.cgroup.unwrap_or(""),
            app = self.app,
            tables = self.tables,
        )
    }

    /// Writes the config and starts holdfast on it.
    pub fn start(&self) -> Swept {
        start_config(&self.render())
    }

    /// [`Cfg::start`] with `env` added to holdfast's environment
    /// (placeholders filled).
    pub fn start_with_env(&self, env: &[(&str, &str)]) -> Swept {
        let env: Vec<(&str, &str)> = [("XDG_RUNTIME_DIR", "{dir}")]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
        Swept::new(Holdfast::launch(
            Launch {
                program: "{holdfast}",
                args: &["run", "--config", "{config}"],
                env: &env,
                stdin: None,
            },
            Some(&self.render()),
        ))
    }
}

/// `holdfast run --config` on `config`, its run directory inside the
/// test's temp dir (`XDG_RUNTIME_DIR={dir}`): a holdfast that is SIGKILLed
/// (a fault here, or the harness's cleanup) cannot remove its run
/// directory, and in /tmp those would pile up.
pub fn start_config(config: &str) -> Swept {
    Swept::new(Holdfast::launch(
        Launch {
            program: "{holdfast}",
            args: &["run", "--config", "{config}"],
            env: &[("XDG_RUNTIME_DIR", "{dir}")],
            stdin: None,
        },
        Some(config),
    ))
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// `holdfast ARGS --control {dir}/holdfast.sock`.
pub fn ctl(h: &Holdfast, args: &[&str]) -> Output {
    h.cli(&[args, &["--control", SOCK]].concat())
}

/// `status --json`, or why not.
pub fn status(h: &Holdfast) -> Result<Value, String> {
    let o = ctl(h, &["status", "--json"]);
    if !o.status.success() {
        return Err(format!("status: {}", text(&o)));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("status JSON: {e}: {}", text(&o)))
}

/// One worker row of `status --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct W {
    pub slot: u32,
    /// 0 for a slot waiting for its restart.
    pub pid: u32,
    pub generation: u64,
    pub state: String,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub connections: Option<u64>,
    /// Processes of its tree besides its own (`None`: /proc unreadable).
    pub descendants: Option<u64>,
    /// Of those, adopted by holdfast after leaving the worker's group.
    pub escaped: u64,
}

pub fn workers(s: &Value) -> Vec<W> {
    s["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| W {
                    slot: w["slot"].as_u64().unwrap_or(u64::MAX) as u32,
                    pid: w["pid"].as_u64().unwrap_or(0) as u32,
                    generation: w["generation"].as_u64().unwrap_or(0),
                    state: w["state"].as_str().unwrap_or("?").to_string(),
                    restarts: w["restarts"].as_u64().unwrap_or(u64::MAX),
                    last_exit: w["last_exit"].as_str().map(str::to_string),
                    connections: w["connections"].as_u64(),
                    descendants: w["descendants"].as_u64(),
                    escaped: w["escaped"].as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The worker of `slot` with state `ready`, if exactly one.
pub fn ready_in(s: &Value, slot: u32) -> Option<W> {
    let mut ws = workers(s)
        .into_iter()
        .filter(|w| w.slot == slot && w.state == "ready");
    match (ws.next(), ws.next()) {
        (Some(w), None) => Some(w),
        _ => None,
    }
}

/// Slot → pid when holdfast is consistent with `n` workers: `n` wanted,
/// exactly `n` rows, every one ready and of the current generation, slots
/// 0..n, no rollout under way, `holdfast.ready`. Why not otherwise.
pub fn consistent(h: &Holdfast, n: u32) -> Result<BTreeMap<u32, u32>, String> {
    if !pid_alive(h.pid()) {
        return Err(format!(
            "holdfast is gone; its log ends: {}",
            log_tail(h, 3)
        ));
    }
    let s = status(h)?;
    let current = s["holdfast"]["generation"].as_u64().unwrap_or(0);
    let ws = workers(&s);
    let slots: BTreeMap<u32, u32> = ws.iter().map(|w| (w.slot, w.pid)).collect();
    let good = s["holdfast"]["workers_wanted"].as_u64() == Some(u64::from(n))
        && ws.len() == n as usize
        && ws
            .iter()
            .all(|w| w.state == "ready" && w.generation == current && w.pid != 0)
        && slots.keys().copied().eq(0..n)
        && s["holdfast"]["rollout"].is_null()
        && s["holdfast"]["ready"] == true;
    if good {
        Ok(slots)
    } else {
        Err(format!(
            "want {n} ready workers of the current generation {current} in slots 0..{n}, no rollout, ready; status shows wanted {}, rollout {}, ready {}, {ws:?}",
            s["holdfast"]["workers_wanted"], s["holdfast"]["rollout"], s["holdfast"]["ready"]
        ))
    }
}

/// Waits (a precondition: panics) until holdfast is [`consistent`] with `n`.
pub fn wait_consistent(h: &Holdfast, n: u32) -> BTreeMap<u32, u32> {
    poll(DEADLINE, || consistent(h, n)).unwrap_or_else(|e| panic!("{e}"))
}

pub fn log_tail(h: &Holdfast, n: usize) -> String {
    let log = h.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Log lines containing every one of `needles`.
pub fn log_lines(h: &Holdfast, needles: &[&str]) -> Vec<String> {
    h.log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// The healthy load (on `http`) and, if asked, the side load (on `side`).
/// Requests are held 20 ms in the worker, bounded in count and time, 5 s
/// each so that one nobody answers fails as a timeout soon.
pub struct Traffic {
    healthy: [Load; 2],
    side: Option<[Load; 2]>,
}

/// What the side load saw (keep-alive, one-shot).
pub struct Side {
    pub keepalive: LoadReport,
    pub oneshot: LoadReport,
}

impl Side {
    pub fn failed(&self) -> u64 {
        self.keepalive.failed() + self.oneshot.failed()
    }

    pub fn ok(&self) -> u64 {
        self.keepalive.ok + self.oneshot.ok
    }

    /// Failures of any kind but `allowed`.
    pub fn failed_except(&self, allowed: &[&str]) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for r in [&self.keepalive, &self.oneshot] {
            for (k, v) in &r.failures {
                if !allowed.contains(&k.as_str()) {
                    *out.entry(k.clone()).or_default() += v;
                }
            }
        }
        out
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.keepalive, self.oneshot)
    }
}

fn spec(target: Target, connections: usize, keepalive: bool) -> LoadSpec {
    LoadSpec {
        connections,
        keepalive,
        path: "/?sleep=20".to_string(),
        max_duration: Duration::from_secs(60),
        max_requests: 400_000,
        request_timeout: Duration::from_secs(5),
        ..LoadSpec::new(target)
    }
}

impl Traffic {
    /// 12 keep-alive and 4 one-shot connections on `http`; with `side`,
    /// 6 and 2 more on `side`. Returns once 100 healthy requests are done.
    pub fn start(h: &Holdfast, side: bool) -> Traffic {
        Traffic::start_on(h.tcp(), side.then(|| Target::local(h.port2)))
    }

    pub fn start_on(healthy: Target, side: Option<Target>) -> Traffic {
        let t = Traffic {
            healthy: [
                Load::start(spec(healthy.clone(), 12, true)),
                Load::start(spec(healthy, 4, false)),
            ],
            side: side.map(|side| {
                [
                    Load::start(spec(side.clone(), 6, true)),
                    Load::start(spec(side, 2, false)),
                ]
            }),
        };
        poll(DEADLINE, || {
            let n: u64 = t.healthy.iter().map(Load::requests_so_far).sum();
            (n >= 100).then_some(()).ok_or(format!("{n} requests done"))
        })
        .unwrap_or_else(|e| panic!("load did not start: {e}"));
        t
    }

    /// Stops both loads and returns the healthy load's reports (keep-alive,
    /// one-shot) unjudged, for a fault where healthy requests may fail.
    pub fn into_reports(self) -> [LoadReport; 2] {
        let [ka, one] = self.healthy;
        if let Some([a, b]) = self.side {
            let _ = (a.stop(), b.stop());
        }
        [ka.stop(), one.stop()]
    }

    /// Healthy requests done so far.
    pub fn healthy_so_far(&self) -> u64 {
        self.healthy.iter().map(Load::requests_so_far).sum()
    }

    /// Stops both loads; records a problem unless the healthy load had 0
    /// failures and at least `min_ok` successes. Returns the side load's
    /// reports for the test to judge, and the healthy total.
    pub fn stop(self, p: &mut Problems, min_ok: u64) -> (u64, Option<Side>) {
        let [ka, one] = self.healthy;
        let (ka, one) = (ka.stop(), one.stop());
        p.check(
            ka.failed() + one.failed() == 0 && ka.ok + one.ok >= min_ok,
            || format!("healthy load: want 0 failed and >= {min_ok} ok; got\n{ka}{one}"),
        );
        let side = self.side.map(|[ka, one]| Side {
            keepalive: ka.stop(),
            oneshot: one.stop(),
        });
        (ka.ok + one.ok + ka.failed() + one.failed(), side)
    }
}

/// Stops holdfast with `stop --wait` and checks what must be true after
/// every fault: exit 0, no process with the test's tag left (whatever
/// group or session it moved to), no worker pid from the log alive, and
/// nothing holding either port (a new bind succeeds).
pub fn stop_and_check_nothing_left(h: &mut Swept, p: &mut Problems) {
    let tag = h.tag().to_string();
    let o = ctl(h, &["stop", "--wait"]);
    p.check(o.status.success(), || format!("stop --wait: {}", text(&o)));
    let code = h.wait_exit(DEADLINE).code();
    p.check(code == Some(0), || format!("holdfast exited with {code:?}"));
    nothing_left(h, &tag, p);
}

/// The leftover checks of [`stop_and_check_nothing_left`] alone.
pub fn nothing_left(h: &Holdfast, tag: &str, p: &mut Problems) {
    // holdfast exits only once every descendant is gone: no grace here.
    let left = tagged_pids(tag);
    p.check(left.is_empty(), || {
        format!(
            "processes with the test's tag alive after holdfast exited: {:?}",
            left.iter().map(|&pid| (pid, comm(pid))).collect::<Vec<_>>()
        )
    });
    let alive: Vec<u32> = h
        .worker_pids()
        .into_iter()
        .filter(|&pid| pid_alive(pid))
        .collect();
    p.check(alive.is_empty(), || {
        format!("worker pids from the log still alive: {alive:?}")
    });
    for port in [h.port, h.port2] {
        let bound = std::net::TcpListener::bind(("127.0.0.1", port));
        p.check(bound.is_ok(), || {
            format!("port {port} still held after holdfast exited: {bound:?}")
        });
    }
}

pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// utime + stime of `pid` in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(i) = stat.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = stat[i + 1..].split_whitespace().collect();
    // After the name: state(0) ... utime(11) stime(12).
    let get = |n: usize| f.get(n).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Share of one core `pid` used over `window` (ticks are 1/100 s here).
pub fn cpu_share(pid: u32, window: Duration) -> f64 {
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    (cpu_ticks(pid) - before) as f64 / 100.0 / window.as_secs_f64()
}

/// The kernel state letter of `pid` (`R`, `S`, `T`, `Z`, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The inode of listener `name` from status.
pub fn listener_inode(s: &Value, name: &str) -> Option<u64> {
    s["listeners"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)?["inode"]
        .as_u64()
}

/// Sends `sig` to `pid` if it carries `h`'s tag (a pid we started).
pub fn signal_ours(h: &Holdfast, pid: u32, sig: nix::sys::signal::Signal) -> Result<(), String> {
    if !crate::common::has_tag(pid, h.tag()) {
        return Err(format!("pid {pid} is not this test's process"));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .map_err(|e| format!("{sig:?} to {pid}: {e}"))
}

/// The accept queue of the TCP listener on local `port` (a LISTEN row's
/// rx_queue in /proc/net/tcp is its count of connections not yet accepted).
pub fn accept_queue(port: u16) -> Option<u64> {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .find_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c.len() > 4 && c[1].ends_with(&local) && c[3] == "0A")
                .then(|| u64::from_str_radix(c[4].split(':').nth(1)?, 16).ok())?
        })
}

/// Opens idle connections to local `port`, one at a time, each until it
/// was accepted, until `done` holds (a precondition: panics after 64
/// connections or 10 s), with the workers `others` stopped (SIGSTOP, then
/// SIGCONT) meanwhile, so that the connections go to the rest. Which of
/// the workers sharing a listener wins an accept is not for a test to
/// leave to chance: all are woken, and the one first in the listener's
/// wait queue (the oldest) wins nearly every race while it is idle.
/// A connection no worker can take (EMFILE) is left for `others` once
/// they run again. The connections stay open, idle (the test worker keeps
/// them for minutes), until the returned streams are dropped.
pub fn hold_connections_until(
    h: &Holdfast,
    port: u16,
    others: &[u32],
    mut done: impl FnMut() -> Result<(), String>,
) -> Vec<std::net::TcpStream> {
    use nix::sys::signal::Signal;
    for &pid in others {
        signal_ours(h, pid, Signal::SIGSTOP).unwrap_or_else(|e| panic!("{e}"));
    }
    let started = Instant::now();
    let mut held = Vec::new();
    let outcome = loop {
        let why = match done() {
            Ok(()) => break Ok(()),
            Err(why) => why,
        };
        if held.len() >= 64 || started.elapsed() > Duration::from_secs(10) {
            break Err(format!(
                "{} idle connections to port {port}: {why}",
                held.len()
            ));
        }
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => held.push(c),
            Err(e) => break Err(format!("connect to 127.0.0.1:{port}: {e}")),
        }
        let accepted = poll(Duration::from_secs(2), || {
            if accept_queue(port) == Some(0) || done().is_ok() {
                return Ok(());
            }
            Err(format!(
                "accept queue of port {port}: {:?}",
                accept_queue(port)
            ))
        });
        if let Err(e) = accepted {
            break Err(e);
        }
    };
    for &pid in others {
        signal_ours(h, pid, Signal::SIGCONT).unwrap_or_else(|e| panic!("{e}"));
    }
    outcome.unwrap_or_else(|e| panic!("precondition: {e}"));
    poll(Duration::from_secs(5), || match accept_queue(port) {
        Some(0) => Ok(()),
        q => Err(format!("accept queue of port {port} after SIGCONT: {q:?}")),
    })
    .unwrap_or_else(|e| panic!("precondition: {e}"));
    held
}

/// A counter of `status --json` (`counters.NAME`, or `counters.replacements.NAME`
/// with `replacements.NAME`).
pub fn counter(s: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(&s["counters"], |v, k| &v[k])
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// A memory cgroup of the test's own with a hard limit, so that the
/// kernel's OOM killer acts inside it and never on the whole machine.
///
/// cgroup v2's `memory.max` when the cgroup2 root has the memory
/// controller enabled for its children; otherwise (a hybrid host like this
/// one, where `memory` is bound to the v1 hierarchy) the v1 memory
/// controller's `memory.limit_in_bytes`. The cgroup sits at the root of
/// that hierarchy, next to the test's own, so that the machinery that runs
/// the tests keeps its cgroups untouched; `Drop` kills what is left in it
/// (only processes the test put there) and removes it.
pub struct MemoryCgroup {
    pub dir: std::path::PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    pub fn new(name: &str, limit_bytes: u64) -> MemoryCgroup {
        let leaf = format!("holdfast-test-{}-{name}", std::process::id());
        let v2_root = std::path::Path::new("/sys/fs/cgroup/unified");
        let v2_root = if v2_root.join("cgroup.subtree_control").exists() {
            v2_root.to_path_buf()
        } else {
            std::path::PathBuf::from("/sys/fs/cgroup")
        };
        let v2 = fs::read_to_string(v2_root.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let (dir, file) = if v2 {
            (v2_root.join(&leaf), "memory.max")
        } else {
            let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
            assert!(
                v1.join("memory.limit_in_bytes").exists(),
                "no memory controller: neither enabled in {}/cgroup.subtree_control nor a v1 hierarchy at {}",
                v2_root.display(),
                v1.display()
            );
            (v1.join(&leaf), "memory.limit_in_bytes")
        };
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cg = MemoryCgroup { dir, v2 };
        fs::write(cg.dir.join(file), limit_bytes.to_string())
            .unwrap_or_else(|e| panic!("{file} of {}: {e}", cg.dir.display()));
        cg
    }

    /// How many times the OOM killer killed a process in it.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            for pid in self.procs() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() || Instant::now() > deadline
            {
                break;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Failures a worker's death costs the connections it held: a reset, or a
/// response cut short. Never a refusal or a timeout (the queue is shared,
/// the other workers take the rest).
pub const DEATH: &[&str] = &["reset", "short_body"];

/// Side-load failures other than `allowed`, as a problem.
pub fn side_only(p: &mut Problems, side: &Option<Side>, allowed: &[&str], what: &str) {
    if let Some(side) = side {
        let bad = side.failed_except(allowed);
        p.check(bad.is_empty(), || {
            format!("side load ({what}): failures other than {allowed:?}: {bad:?}\n{side}")
        });
        eprintln!(
            "{what}: side load ok={} failed={} {:?} {:?}",
            side.ok(),
            side.failed(),
            side.keepalive.failures,
            side.oneshot.failures
        );
    }
}

/// `restart --wait` to a generation of healthy workers (the fault is
/// generation 1's), then holdfast must be consistent with `n` workers.
pub fn roll_to_healthy(h: &crate::common::Holdfast, p: &mut Problems, n: u32) {
    let o = ctl(h, &["restart", "--wait"]);
    p.check(o.status.success(), || {
        format!("restart --wait to a healthy generation: {}", text(&o))
    });
    p.note(poll(DEADLINE, || consistent(h, n)));
}

/// Starts holdfast in a mount namespace of its own with a tmpfs of `size`
/// mounted at `{dir}/MOUNT` first, and `env` added (placeholders filled).
///
/// The namespace is private (`unshare -m`, then `exec holdfast`): the
/// machine's mounts are never touched, and the mount ends with holdfast,
/// even if the test dies. The test reaches its files through
/// `/proc/PID/root` ([`in_ns`]).
pub fn start_with_tmpfs(config: &str, mount: &str, size: &str, env: &[(&str, &str)]) -> Swept {
    let script = format!(
        "mkdir -p \"$1\" && mount -t tmpfs -o size={size},mode=0755 holdfast-test \"$1\" && shift && exec \"$@\""
    );
    let target = format!("{{dir}}/{mount}");
    Swept::new(Holdfast::launch(
        Launch {
            program: "unshare",
            args: &[
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
                "sh",
                &target,
                "{holdfast}",
                "run",
                "--config",
                "{config}",
            ],
            env,
            stdin: None,
        },
        Some(config),
    ))
}

/// `path` (absolute) as holdfast's mount namespace sees it.
pub fn in_ns(h: &Holdfast, path: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/{}/root{}", h.pid(), h.fill(path)))
}
