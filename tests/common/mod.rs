//! Shared integration-test harness: runs the real `holdfast` binary in a temp
//! dir of its own, waits on its log instead of sleeping, and cleans up every
//! process it started.
//!
//! Cleanup is by process group. holdfast runs as its own group leader and
//! puts each worker in a group of its own, so [`Holdfast`]'s `Drop` kills
//! holdfast's group and the group of every pid logged as `worker spawned`.
//! pids are recycled (pid_max may be 32768), so a worker group is only killed
//! while the pid is gone (any group members left are ours) or the process
//! carries this instance's `HOLDFAST_TEST_TAG` in its environment.

// Each test binary uses a subset of the harness.
#![allow(dead_code)]

pub mod cgroup;
pub mod examples;
pub mod load;
pub mod netns;
pub mod observe;
pub mod proxy;
pub mod sandbox;

// Re-exported for the test binaries; each uses a subset.
#[allow(unused_imports)]
pub use cgroup::TestCgroup;
#[allow(unused_imports)]
pub use load::{http_get, FailKind, Load, LoadReport, LoadSpec, Response, Target};

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// How long any single wait in a test may take.
pub const DEADLINE: Duration = Duration::from_secs(30);

const POLL: Duration = Duration::from_millis(20);

/// Environment a test holdfast must not inherit from whatever runs the tests.
const SCRUBBED_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
];

/// Calls `cond` every 20 ms until it returns `Some`; panics naming `what` after `deadline`.
pub fn wait_until<T>(deadline: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, read, closed).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain anything.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

/// Live (not zombie) processes whose environment holds the entry `tag`
/// exactly (`HOLDFAST_TEST_TAG=...`, see [`Holdfast::tag`]), in pid order.
/// This finds every process a test's holdfast started, whatever group or
/// session it moved to; environments are read, never names.
pub fn tagged_pids(tag: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| has_tag(pid, tag) && pid_alive(pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether `pid`'s environment holds the entry `tag` exactly.
pub fn has_tag(pid: u32, tag: &str) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == tag.as_bytes()))
}

/// A process's parent, process group and session, from /proc/PID/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcIds {
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
}

/// [`ProcIds`] of `pid`; `None` once it is gone.
pub fn proc_ids(pid: u32) -> Option<ProcIds> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state ppid pgrp session ...
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace().skip(1);
    Some(ProcIds {
        ppid: f.next()?.parse().ok()?,
        pgid: f.next()?.parse().ok()?,
        sid: f.next()?.parse().ok()?,
    })
}

/// A [`Holdfast`] whose `Drop`, after the Holdfast's own cleanup (which
/// kills holdfast's group and its workers' groups), SIGKILLs every process
/// still carrying the instance's tag: those that left their worker's
/// process group (`setsid`, double fork), which no group kill reaches.
/// Each pid's tag is read again right before it is killed.
pub struct Swept {
    h: Option<Holdfast>,
    tag: String,
}

impl Swept {
    pub fn new(h: Holdfast) -> Swept {
        Swept {
            tag: h.tag().to_string(),
            h: Some(h),
        }
    }
}

impl std::ops::Deref for Swept {
    type Target = Holdfast;
    fn deref(&self) -> &Holdfast {
        self.h
            .as_ref()
            .expect("Swept holds its Holdfast until dropped")
    }
}

impl std::ops::DerefMut for Swept {
    fn deref_mut(&mut self) -> &mut Holdfast {
        self.h
            .as_mut()
            .expect("Swept holds its Holdfast until dropped")
    }
}

impl Drop for Swept {
    fn drop(&mut self) {
        drop(self.h.take());
        let mut swept = Vec::new();
        // A process being killed may still be listed for a moment; a
        // bounded number of passes, each killing what is left.
        for _ in 0..50 {
            let left = tagged_pids(&self.tag);
            if left.is_empty() {
                break;
            }
            for pid in left {
                if has_tag(pid, &self.tag) {
                    let _ = kill(pid_of(pid), Signal::SIGKILL);
                    if !swept.contains(&pid) {
                        swept.push(pid);
                    }
                }
            }
            std::thread::sleep(POLL);
        }
        if !swept.is_empty() {
            eprintln!(
                "holdfast test cleanup: killed {} process(es) left with {}: {swept:?}",
                swept.len(),
                self.tag
            );
        }
    }
}

/// Runs `holdfast ARGS` to completion (for `check`, `status`, ...). Panics
/// with whatever it printed if it takes longer than 30 s.
pub fn run_holdfast(args: &[&str]) -> Output {
    let mut cmd = Command::new(holdfast_bin());
    cmd.args(args);
    run_bounded(cmd, DEADLINE)
}

fn holdfast_bin() -> &'static str {
    env!("CARGO_BIN_EXE_holdfast")
}

/// The test worker (`src/bin/holdfast-test-worker`), `{test_worker}` in configs.
pub fn test_worker_bin() -> &'static str {
    env!("CARGO_BIN_EXE_holdfast-test-worker")
}

fn run_bounded(mut cmd: Command, deadline: Duration) -> Output {
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if start.elapsed() >= deadline {
            break None;
        }
        std::thread::sleep(POLL);
    };
    let status = match status {
        Some(s) => s,
        None => {
            // Own group, not yet reaped: the group id is still ours.
            let _ = killpg(pid_of(child.id()), Signal::SIGKILL);
            let _ = child.wait();
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "{desc} still running after {deadline:?}; killed\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    // A grandchild holding the pipes open would block these joins; holdfast's
    // one-shot commands start no processes.
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"))
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// How [`Holdfast::launch`] starts holdfast through another program.
/// Strings may use the placeholders, plus `{tag}` (`HOLDFAST_TEST_TAG=...`,
/// for launchers that clear the environment, e.g. `-E {tag}`).
pub struct Launch<'a> {
    /// The launcher, or `{holdfast}` itself.
    pub program: &'a str,
    pub args: &'a [&'a str],
    /// Set on top of the test's environment (NOTIFY_SOCKET, LISTEN_*,
    /// WATCHDOG_* are removed first, so these are the only ones holdfast sees).
    pub env: &'a [(&'a str, &'a str)],
    /// holdfast's stdin; /dev/null when `None`.
    pub stdin: Option<std::os::fd::OwnedFd>,
}

/// A running `holdfast` with its own temp dir, log file and ports.
///
/// Placeholders replaced in configs and args: `{dir}` (the temp dir),
/// `{holdfast}` (the binary), `{config}` (config_path), `{port}`, `{port2}`.
pub struct Holdfast {
    pub dir: tempfile::TempDir,
    /// `{dir}/holdfast.toml`; written only when a config was given.
    pub config_path: PathBuf,
    pub port: u16,
    pub port2: u16,
    child: Option<Child>,
    pid: u32,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    command_line: String,
    /// `HOLDFAST_TEST_TAG=<value>`, inherited by holdfast and its workers.
    tag: String,
}

impl Holdfast {
    /// Writes `config` to `{dir}/holdfast.toml` and starts `holdfast run --config` on it.
    /// Returns at once; wait for a log line before using it.
    pub fn start(config: &str) -> Holdfast {
        Holdfast::start_args(&["run", "--config", "{config}"], Some(config))
    }

    /// Starts `holdfast ARGS` (placeholders replaced in each arg), writing
    /// `config` to `config_path` first if given.
    pub fn start_args(args: &[&str], config: Option<&str>) -> Holdfast {
        Holdfast::launch(
            Launch {
                program: "{holdfast}",
                args,
                env: &[],
                stdin: None,
            },
            config,
        )
    }

    /// Starts holdfast through `launch.program`, a launcher that ends by
    /// exec'ing holdfast (so its pid is holdfast's), e.g.
    /// `systemd-socket-activate`. Like [`Holdfast::start_args`] otherwise:
    /// `config` is written to `config_path` first, holdfast's output goes to
    /// the log, and `Drop` cleans up.
    pub fn launch(launch: Launch<'_>, config: Option<&str>) -> Holdfast {
        let dir = tempfile::Builder::new()
            .prefix("holdfast-test-")
            .tempdir()
            .expect("create temp dir");
        let port = free_port();
        let port2 = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let mut h = Holdfast {
            config_path: dir.path().join("holdfast.toml"),
            log_path: dir.path().join("holdfast.log"),
            dir,
            port,
            port2,
            child: None,
            pid: 0,
            status: None,
            command_line: String::new(),
            tag: format!(
                "HOLDFAST_TEST_TAG={}-{}",
                std::process::id(),
                INSTANCE.fetch_add(1, Ordering::SeqCst)
            ),
        };
        if let Some(config) = config {
            fs::write(&h.config_path, h.fill(config))
                .unwrap_or_else(|e| panic!("write {}: {e}", h.config_path.display()));
        }
        let fill = |s: &str| h.fill(&s.replace("{tag}", &h.tag));
        let program = fill(launch.program);
        let args: Vec<String> = launch.args.iter().map(|a| fill(a)).collect();
        let env: Vec<(String, String)> = launch
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), fill(v)))
            .collect();
        h.command_line = std::iter::once(program.clone())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", h.log_path.display()));
        let log2 = log.try_clone().expect("dup log fd");
        let (tag_key, tag_value) = h.tag.split_once('=').expect("tag has =");
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .current_dir(h.dir.path())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        // The run directory inside the test's temp dir (a test may say
        // otherwise): a holdfast the harness SIGKILLs cannot remove it, and
        // in /tmp those would pile up.
        cmd.env(tag_key, tag_value)
            .env("NO_COLOR", "1")
            .env("XDG_RUNTIME_DIR", h.dir.path())
            .envs(env);
        match launch.stdin {
            Some(fd) => cmd.stdin(Stdio::from(fd)),
            None => cmd.stdin(Stdio::null()),
        };
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", h.command_line));
        h.pid = child.id();
        h.child = Some(child);
        h
    }

    /// `holdfast ARGS --control {dir}/holdfast.sock`: the control socket
    /// the tests' configs put next to the config file.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.cli(&[args, &["--control", "{dir}/holdfast.sock"]].concat())
    }

    /// Replaces the placeholders in `s`.
    pub fn fill(&self, s: &str) -> String {
        s.replace("{dir}", &self.dir.path().to_string_lossy())
            .replace("{holdfast}", holdfast_bin())
            .replace("{test_worker}", test_worker_bin())
            .replace("{config}", &self.config_path.to_string_lossy())
            .replace("{port2}", &self.port2.to_string())
            .replace("{port}", &self.port.to_string())
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `HOLDFAST_TEST_TAG=<value>`: the environment entry holdfast and every
    /// process it starts inherit (see [`tagged_pids`]).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits up to [`DEADLINE`] for a log line containing `needle`; returns the first one.
    /// Panics early (after a 2 s grace for late writers) if holdfast has exited.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_cond(&format!("log line containing {needle:?}"), |log| {
            log.lines().find(|l| l.contains(needle)).map(str::to_string)
        })
    }

    /// Waits up to [`DEADLINE`] until `needle` occurs at least `n` times in the log.
    pub fn wait_log_count(&self, needle: &str, n: usize) {
        self.wait_log_cond(
            &format!("{n} occurrences of {needle:?} in the log"),
            |log| (log.matches(needle).count() >= n).then_some(()),
        )
    }

    fn wait_log_cond<T>(&self, what: &str, mut cond: impl FnMut(&str) -> Option<T>) -> T {
        let mut exited_at: Option<Instant> = None;
        wait_until(DEADLINE, what, || {
            if let Some(v) = cond(&self.log()) {
                return Some(v);
            }
            if self.status.is_some() || !pid_alive(self.pid) {
                let at = *exited_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_secs(2) {
                    panic!("holdfast exited while waiting for {what}");
                }
            }
            None
        })
    }

    /// Sends `sig` to holdfast (the process, not its group). Panics if it was already reaped.
    pub fn signal(&self, sig: Signal) {
        assert!(
            self.status.is_none(),
            "signal {sig:?}: holdfast already exited ({:?})",
            self.status
        );
        kill(pid_of(self.pid), sig).unwrap_or_else(|e| panic!("kill {} {sig:?}: {e}", self.pid));
    }

    /// Waits for holdfast to exit and reaps it; panics if it still runs after `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let child = self.child.as_mut().expect("holdfast child");
        let status = wait_until(deadline, "holdfast to exit", || {
            child.try_wait().expect("try_wait holdfast")
        });
        self.status = Some(status);
        status
    }

    /// Every pid logged in a `worker spawned` line, first occurrence order, no duplicates.
    pub fn worker_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for line in self.log().lines().filter(|l| l.contains("worker spawned")) {
            if let Some(pid) = field(line, "pid").and_then(|v| v.parse::<u32>().ok()) {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Replaces the config file atomically (write a temp file, rename over).
    pub fn rewrite_config(&self, config: &str) {
        let tmp = self.dir.path().join(".holdfast.toml.tmp");
        fs::write(&tmp, self.fill(config))
            .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        fs::rename(&tmp, &self.config_path)
            .unwrap_or_else(|e| panic!("rename to {}: {e}", self.config_path.display()));
    }

    /// `http://127.0.0.1:{port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `127.0.0.1:{port}`.
    pub fn tcp(&self) -> Target {
        Target::local(self.port)
    }

    /// The unix socket `{dir}/{name}`.
    pub fn unix(&self, name: &str) -> Target {
        Target::Unix(self.dir.path().join(name))
    }

    /// Runs a one-shot `holdfast ARGS` with this instance's placeholders (e.g.
    /// `status --control {dir}/holdfast.sock`), bounded by 30 s.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(holdfast_bin());
        cmd.args(args.iter().map(|a| self.fill(a)));
        run_bounded(cmd, DEADLINE)
    }

    /// Kills the process group `pgid` if it can only hold our processes.
    fn kill_group_if_ours(&self, pgid: u32) {
        if !self.group_is_ours(pgid) {
            return;
        }
        match killpg(pid_of(pgid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => eprintln!("holdfast test cleanup: killpg {pgid}: {e}"),
        }
    }

    fn group_is_ours(&self, pgid: u32) -> bool {
        match fs::read(format!("/proc/{pgid}/environ")) {
            // No process has this pid, so it cannot be a new group's leader:
            // what is left in the group was started by our worker.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(_) => false,
            Ok(env) => {
                env.split(|b| *b == 0).any(|kv| kv == self.tag.as_bytes())
                    || (self.status.is_none() && parent_of(pgid) == Some(self.pid))
            }
        }
    }
}

/// The value of `key=value` in a tracing line (`key` at a word start).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for Holdfast {
    fn drop(&mut self) {
        if let (Some(child), None) = (self.child.as_mut(), self.status) {
            if let Ok(Some(status)) = child.try_wait() {
                self.status = Some(status);
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            eprintln!("===== holdfast test failed; command: {}", self.command_line);
            eprintln!("===== dir: {}", self.dir.path().display());
            match self.status {
                Some(s) => eprintln!("===== exit status: {s}"),
                None => eprintln!("===== still running (pid {})", self.pid),
            }
            let alive: Vec<u32> = self
                .worker_pids()
                .into_iter()
                .filter(|p| pid_alive(*p))
                .collect();
            eprintln!(
                "===== workers logged: {:?}; alive: {alive:?}",
                self.worker_pids()
            );
            eprintln!(
                "===== log ({}):\n{log}===== end of log",
                self.log_path.display()
            );
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.status.is_none() {
            // Not reaped, so the group id is still ours. Freeze holdfast so it
            // spawns nothing new while its workers are killed.
            let _ = killpg(pid_of(self.pid), Signal::SIGSTOP);
        }
        for pid in self.worker_pids() {
            self.kill_group_if_ours(pid);
        }
        if self.status.is_none() {
            let _ = killpg(pid_of(self.pid), Signal::SIGKILL);
        } else {
            self.kill_group_if_ours(self.pid);
        }
        let _ = child.wait();
        // Descendants that left every group above (a setsid daemon of a
        // worker) outlive a SIGKILLed holdfast: they carry this instance's
        // tag, so they are ours, and nothing else would ever stop them.
        for pid in tagged_pids(&self.tag) {
            let _ = kill(pid_of(pid), Signal::SIGKILL);
        }
    }
}

/// Runs a tool to completion, its command line, status and output printed
/// under `label` (shown when the test fails); a tool that cannot start is
/// a failure naming it (tests/run installs every tool the tests use).
pub fn run_logged(label: &str, cmd: &mut Command) -> std::process::Output {
    let desc = format!("{cmd:?}");
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{desc}: {e} (tests/run installs it)"));
    eprintln!(
        "{label}: {desc}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A finished command's stdout then stderr, as text.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A finished command's exit code, stdout and stderr, for a failure message.
pub fn describe(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
