//! Benchmark: holdfast's own cost as the worker count grows, against the
//! floor of a trivial launcher.
//!
//! For each N (default 2, 16, 64, 256, 1024) it starts holdfast with N test
//! workers and measures: the time from its spawn to "all workers ready",
//! holdfast's CPU (user + system, /proc/PID/stat) until then and per worker,
//! one rollout (`holdfast restart --wait`) at `max_surge = S` with its CPU,
//! the latency of `holdfast status --json` (median of 5), and holdfast's
//! RSS, open fds and threads once all are ready. The floor is the same N
//! test workers forked and exec'd by this benchmark itself on one inherited
//! socket (`UNICORN_FD`), until each has sent READY=1 to a datagram socket.
//!
//! `--baseline PATH` runs a second holdfast binary in the same run,
//! interleaved with the first (the order alternates per round), and prints
//! the ratios: on a shared machine absolute numbers drift, ratios measured
//! side by side do not drift as much. The load average is printed per N.
//!
//! ```sh
//! cargo build --release --bins && cp target/release/holdfast /tmp/holdfast-before  # before a change
//! cargo run --release --example bench_scale -- --baseline /tmp/holdfast-before \
//!     [--holdfast PATH] [--ns 2,16,64,256,1024] [--surge 32] [--rounds 1] [--timeout 300]
//! ```
//!
//! Bounded (each run of each N has `--timeout` seconds), local only
//! (127.0.0.1 and unix sockets in a temp dir), and it kills only the pids it
//! started: holdfast by its pid (which stops its workers), the launcher's
//! workers by theirs; Ctrl-C stops the current run and cleans up.

#[path = "bench_common/mod.rs"]
mod bench_common;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_common::{cpu_time, rss_kib};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

struct Opts {
    holdfast: PathBuf,
    baseline: Option<PathBuf>,
    worker: PathBuf,
    ns: Vec<u32>,
    surge: u32,
    rounds: usize,
    timeout: Duration,
    floor: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_scale [--holdfast PATH] [--baseline PATH] [--worker PATH] [--ns 2,16,64,256,1024] [--surge S] [--rounds R] [--timeout SECS] [--no-floor]"
    );
    std::process::exit(64)
}

fn opts() -> Opts {
    let mut o = Opts {
        holdfast: bench_common::holdfast_bin(),
        baseline: None,
        worker: bench_common::test_worker_bin(),
        ns: vec![2, 16, 64, 256, 1024],
        surge: 32,
        rounds: 1,
        timeout: Duration::from_secs(300),
        floor: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--holdfast" => o.holdfast = PathBuf::from(val()),
            "--baseline" => o.baseline = Some(PathBuf::from(val())),
            "--worker" => o.worker = PathBuf::from(val()),
            "--ns" => {
                o.ns = val()
                    .split(',')
                    .map(|n| n.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--surge" => o.surge = val().parse().unwrap_or_else(|_| usage()),
            "--rounds" => o.rounds = val().parse().unwrap_or_else(|_| usage()),
            "--timeout" => {
                o.timeout = Duration::from_secs(val().parse().unwrap_or_else(|_| usage()))
            }
            "--no-floor" => o.floor = false,
            _ => usage(),
        }
    }
    o
}

/// Set by SIGINT / SIGTERM: every wait gives up, the guards clean up.
static STOP: AtomicBool = AtomicBool::new(false);

fn interrupted() -> bool {
    STOP.load(Ordering::Relaxed)
}

#[derive(Debug)]
enum Failed {
    Timeout(&'static str),
    Interrupted,
    Other(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Timeout(what) => write!(f, "timed out waiting for {what}"),
            Failed::Interrupted => write!(f, "interrupted"),
            Failed::Other(m) => write!(f, "{m}"),
        }
    }
}

/// Polls `cond` every `every` until it holds or `deadline` passes.
fn poll_until(
    deadline: Instant,
    what: &'static str,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), Failed> {
    loop {
        if cond() {
            return Ok(());
        }
        if interrupted() {
            return Err(Failed::Interrupted);
        }
        if Instant::now() >= deadline {
            return Err(Failed::Timeout(what));
        }
        std::thread::sleep(every); // polling with a deadline
    }
}

/// Reads a growing log file from where it last stopped.
struct LogTail {
    file: fs::File,
    pos: u64,
    carry: String,
}

impl LogTail {
    fn open(path: &Path) -> LogTail {
        LogTail {
            file: fs::File::open(path).expect("open log"),
            pos: 0,
            carry: String::new(),
        }
    }
    /// Whether a line containing `needle` has been written since the last call
    /// that returned true.
    fn seen(&mut self, needle: &str) -> bool {
        let mut buf = Vec::new();
        if self.file.seek(SeekFrom::Start(self.pos)).is_err()
            || self.file.read_to_end(&mut buf).is_err()
        {
            return false;
        }
        self.pos += buf.len() as u64;
        self.carry.push_str(&String::from_utf8_lossy(&buf));
        let found = self.carry.contains(needle);
        // Keep only the unfinished last line for the next call.
        self.carry = match self.carry.rfind('\n') {
            _ if found => String::new(),
            Some(i) => self.carry[i + 1..].to_string(),
            None => std::mem::take(&mut self.carry),
        };
        found
    }
}

/// A holdfast under test; SIGTERM then SIGKILL to its pid on drop.
struct Holdfast {
    bin: PathBuf,
    child: Child,
    config: PathBuf,
    dir: tempfile::TempDir,
}

impl Holdfast {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    fn ctl(&self, args: &[&str]) -> Result<std::process::Output, Failed> {
        Command::new(&self.bin)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Failed::Other(format!("{}: {e}", self.bin.display())))
    }
    fn stop(&mut self, limit: Duration) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Holdfast {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(30));
        }
        let _ = &self.dir;
    }
}

#[derive(Default, Clone)]
struct Figures {
    ready: Option<Duration>,
    cpu_ready: Option<Duration>,
    rollout: Option<Duration>,
    cpu_rollout: Option<Duration>,
    status: Option<Duration>,
    rss_kib: Option<u64>,
    fds: Option<usize>,
    threads: Option<u64>,
    error: Option<String>,
}

fn count_fds(pid: i32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

fn threads(pid: i32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

fn config(port: u16, n: u32, surge: u32, worker: &Path, dir: &Path) -> String {
    format!(
        r#"
control_socket = "{dir}/control.sock"
[[listen]]
address = "127.0.0.1:{port}"
[app]
command = ["{worker}", "--lame-duck-ms", "0"]
workers = {n}
max_workers = {max}
max_surge = {surge}
ready_timeout = "600s"
drain_timeout = "60s"
"#,
        dir = dir.display(),
        worker = worker.display(),
        max = n.max(256),
    )
}

fn run_holdfast(bin: &Path, o: &Opts, n: u32) -> Figures {
    let mut f = Figures::default();
    if let Err(e) = measure_holdfast(bin, o, n, &mut f) {
        f.error = Some(e.to_string());
    }
    f
}

fn measure_holdfast(bin: &Path, o: &Opts, n: u32, f: &mut Figures) -> Result<(), Failed> {
    let deadline = Instant::now() + o.timeout;
    let dir = tempfile::Builder::new()
        .prefix("holdfast-bench-scale-")
        .tempdir()
        .map_err(|e| Failed::Other(format!("tempdir: {e}")))?;
    let port = bench_common::free_port();
    let cfg = dir.path().join("holdfast.toml");
    fs::write(&cfg, config(port, n, o.surge, &o.worker, dir.path()))
        .map_err(|e| Failed::Other(format!("write config: {e}")))?;
    let log = dir.path().join("holdfast.log");
    let out = fs::File::create(&log).map_err(|e| Failed::Other(format!("log: {e}")))?;
    let err = out
        .try_clone()
        .map_err(|e| Failed::Other(format!("log: {e}")))?;
    let t0 = Instant::now();
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("NO_COLOR", "1")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .spawn()
        .map_err(|e| Failed::Other(format!("{}: {e}", bin.display())))?;
    let mut h = Holdfast {
        bin: bin.to_path_buf(),
        child,
        config: cfg,
        dir,
    };
    let pid = h.pid();
    let mut tail = LogTail::open(&log);
    let mut exited = None;
    let waited = poll_until(
        deadline,
        "all workers ready",
        Duration::from_millis(5),
        || {
            exited = h.child.try_wait().ok().flatten();
            exited.is_some() || tail.seen("all workers ready")
        },
    );
    if let Err(e) = waited {
        // What it cost until it was given up on.
        f.cpu_ready = cpu_time(pid);
        f.threads = threads(pid);
        return Err(e);
    }
    if let Some(status) = exited {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let last: Vec<&str> = text.lines().rev().take(3).collect();
        return Err(Failed::Other(format!(
            "holdfast exited ({status}): {}",
            last.join(" / ")
        )));
    }
    f.ready = Some(t0.elapsed());
    f.cpu_ready = cpu_time(pid);
    f.rss_kib = rss_kib(pid);
    f.fds = count_fds(pid);
    f.threads = threads(pid);

    let mut lat = Vec::new();
    for _ in 0..5 {
        let s = Instant::now();
        let r = h.ctl(&["status", "--json"])?;
        if !r.status.success() {
            return Err(Failed::Other(format!(
                "status: {}",
                String::from_utf8_lossy(&r.stderr)
            )));
        }
        lat.push(s.elapsed());
    }
    lat.sort();
    f.status = Some(lat[lat.len() / 2]);

    let cpu0 = cpu_time(pid);
    let s = Instant::now();
    let mut restart = Command::new(bin)
        .args(["restart", "--wait", "--config"])
        .arg(&h.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failed::Other(format!("restart: {e}")))?;
    let mut status = None;
    let waited = poll_until(deadline, "restart --wait", Duration::from_millis(5), || {
        status = restart.try_wait().ok().flatten();
        status.is_some()
    });
    if waited.is_err() {
        let _ = restart.kill();
        let _ = restart.wait();
    }
    waited?;
    if !status.is_some_and(|s| s.success()) {
        let mut e = String::new();
        if let Some(mut p) = restart.stderr.take() {
            let _ = p.read_to_string(&mut e);
        }
        return Err(Failed::Other(format!("restart --wait failed: {e}")));
    }
    f.rollout = Some(s.elapsed());
    f.cpu_rollout = cpu0.zip(cpu_time(pid)).map(|(a, b)| b.saturating_sub(a));
    h.stop(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5)),
    );
    Ok(())
}

/// The launcher's workers; SIGKILL to each pid (they are its children) on drop.
struct Launched(Vec<Child>);

impl Drop for Launched {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// The floor: fork/exec N test workers on one inherited listening socket,
/// until each has sent READY=1. Returns the time and this process's CPU.
fn run_floor(o: &Opts, n: u32) -> Figures {
    let mut f = Figures::default();
    if let Err(e) = measure_floor(o, n, &mut f) {
        f.error = Some(e.to_string());
    }
    f
}

fn measure_floor(o: &Opts, n: u32, f: &mut Figures) -> Result<(), Failed> {
    use nix::sys::socket::{recv, setsockopt, sockopt, MsgFlags};
    let deadline = Instant::now() + o.timeout;
    let dir = tempfile::Builder::new()
        .prefix("holdfast-bench-floor-")
        .tempdir()
        .map_err(|e| Failed::Other(format!("tempdir: {e}")))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Failed::Other(format!("bind: {e}")))?;
    // Inherited by the workers: clear close-on-exec on this one fd.
    nix::fcntl::fcntl(
        listener.as_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| Failed::Other(format!("fcntl: {e}")))?;
    let sock_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock_path)
        .map_err(|e| Failed::Other(format!("notify socket: {e}")))?;
    notify
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| Failed::Other(format!("notify socket: {e}")))?;
    let _ = setsockopt(&notify, sockopt::PassCred, &false);
    let me = Pid::this();
    let cpu0 = cpu_time(me.as_raw());
    let t0 = Instant::now();
    let mut launched = Launched(Vec::with_capacity(n as usize));
    for slot in 0..n {
        let c = Command::new(&o.worker)
            .args(["--unicorn-fd", "--lame-duck-ms", "0"])
            .env("UNICORN_FD", listener.as_raw_fd().to_string())
            .env("NOTIFY_SOCKET", &sock_path)
            .env("HOLDFAST_WORKER_ID", slot.to_string())
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Failed::Other(format!("spawn worker {slot}: {e}")))?;
        launched.0.push(c);
    }
    let mut ready = 0;
    let mut buf = [0u8; 4096];
    while ready < n {
        if interrupted() {
            return Err(Failed::Interrupted);
        }
        if Instant::now() >= deadline {
            return Err(Failed::Timeout("READY=1 from every launched worker"));
        }
        match recv(notify.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(len) if buf[..len].windows(7).any(|w| w == b"READY=1") => ready += 1,
            _ => {}
        }
    }
    f.ready = Some(t0.elapsed());
    f.cpu_ready = cpu0
        .zip(cpu_time(me.as_raw()))
        .map(|(a, b)| b.saturating_sub(a));
    drop(launched);
    Ok(())
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1000.0))
}

fn ms1(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

fn per_worker_us(d: Option<Duration>, n: u32) -> String {
    d.map_or("-".into(), |d| {
        format!("{:.0}", d.as_secs_f64() * 1e6 / f64::from(n))
    })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some(v[v.len() / 2])
}

/// The median of each figure over the rounds (errors keep the first one).
fn combine(runs: &[Figures]) -> Figures {
    let pick = |f: fn(&Figures) -> Option<Duration>| median(runs.iter().filter_map(f).collect());
    let last = runs.iter().rev().find(|r| r.error.is_none());
    Figures {
        ready: pick(|f| f.ready),
        cpu_ready: pick(|f| f.cpu_ready),
        rollout: pick(|f| f.rollout),
        cpu_rollout: pick(|f| f.cpu_rollout),
        status: pick(|f| f.status),
        rss_kib: last.and_then(|r| r.rss_kib),
        fds: last.and_then(|r| r.fds),
        threads: last.and_then(|r| r.threads),
        error: runs.iter().find_map(|r| r.error.clone()),
    }
}

fn row(name: &str, n: u32, f: &Figures) {
    println!(
        "| {n:>5} | {name:<8} | {:>8} | {:>8} | {:>6} | {:>8} | {:>7} | {:>6} | {:>6} | {:>5} | {:>3} | {}",
        ms(f.ready),
        ms(f.cpu_ready),
        per_worker_us(f.cpu_ready, n),
        ms(f.rollout),
        ms(f.cpu_rollout),
        ms1(f.status),
        f.rss_kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        opt(f.fds),
        opt(f.threads),
        f.error.as_deref().unwrap_or(""),
    );
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    }
}

fn main() {
    let o = opts();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let flag = Arc::new(AtomicBool::new(false));
        // The flag of each signal is only read through STOP below.
        let _ = signal_hook::flag::register(sig, Arc::clone(&flag));
        std::thread::spawn(move || loop {
            if flag.load(Ordering::Relaxed) {
                STOP.store(true, Ordering::Relaxed);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        });
    }
    let mut bins: Vec<(&str, &Path)> = vec![("holdfast", o.holdfast.as_path())];
    if let Some(b) = &o.baseline {
        bins.push(("baseline", b.as_path()));
    }
    println!(
        "holdfast: {}\nbaseline: {}\ntest worker: {}\nmax_surge {}, rounds {}, timeout {:?} per run; cores {}",
        o.holdfast.display(),
        o.baseline.as_ref().map_or("(none)".into(), |b| b.display().to_string()),
        o.worker.display(),
        o.surge,
        o.rounds,
        o.timeout,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "\n| N | binary | ready ms | CPU ms | CPU µs/worker | rollout ms | rollout CPU ms | status ms | RSS MiB | fds | thr | note"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for &n in &o.ns {
        if interrupted() {
            break;
        }
        let load0 = loadavg();
        let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); bins.len()];
        let mut floor = Vec::new();
        for round in 0..o.rounds {
            // Alternate the order so neither binary always runs first.
            let order: Vec<usize> = if round % 2 == 0 {
                (0..bins.len()).collect()
            } else {
                (0..bins.len()).rev().collect()
            };
            for i in order {
                if interrupted() {
                    break;
                }
                runs[i].push(run_holdfast(bins[i].1, &o, n));
            }
            if o.floor && !interrupted() {
                floor.push(run_floor(&o, n));
            }
        }
        let figs: Vec<Figures> = runs.iter().map(|r| combine(r)).collect();
        for (i, f) in figs.iter().enumerate() {
            row(bins[i].0, n, f);
        }
        let fl = combine(&floor);
        if o.floor {
            row("launcher", n, &fl);
        }
        println!("|       | load average {load0} → {}", loadavg());
        summary.push((n, figs, fl));
    }
    if o.baseline.is_some() {
        println!("\nholdfast ÷ baseline (same run, interleaved):");
        println!("| N | ready | CPU to ready | rollout | rollout CPU | status |");
        println!("|---|---|---|---|---|---|");
        for (n, f, _) in &summary {
            println!(
                "| {n} | {} | {} | {} | {} | {} |",
                ratio(f[0].ready, f[1].ready),
                ratio(f[0].cpu_ready, f[1].cpu_ready),
                ratio(f[0].rollout, f[1].rollout),
                ratio(f[0].cpu_rollout, f[1].cpu_rollout),
                ratio(f[0].status, f[1].status),
            );
        }
    }
    if o.floor {
        println!("\nholdfast ÷ launcher floor, time to all ready:");
        for (n, f, fl) in &summary {
            println!("  N={n}: {}", ratio(f[0].ready, fl.ready));
        }
    }
}
