//! What memory sampling costs.
//!
//! `cargo run --release --example bench_memory`
//!
//! 1. One sampling round (`holdfast::os::proc::memory::sample`) over a process tree of
//!    64 and of 256 processes, per metric. The tree is `forking.py` (beside the test worker): a
//!    Python parent that touches 64 MiB and forks the rest, so every process
//!    maps 64 MiB of copy-on-write pages (like a preloading Unicorn or Puma
//!    cluster) and PSS/USS have real page tables to walk, without using
//!    N × 64 MiB of RAM.
//! 2. holdfast's own CPU share with 64 test workers, with and without
//!    `[memory] interval = "1s"`, from utime + stime in `/proc/<pid>/stat`
//!    over a measured window (`BENCH_SECS`, default 30).
//!
//! Needs `python3` on PATH. Builds `holdfast` itself (`cargo build --release`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast::config::Metric;
use holdfast::ids::{Pid, WorkerId};
use holdfast::os::proc::memory;

/// The copy-on-write process tree of the memory tests (python3; see the file).
const FORKING_PY: &str = include_str!("../src/bin/holdfast-test-worker/forking.py");

const ROUNDS: usize = 30;

fn main() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("bench-memory-").tempdir()?;
    let script = dir.path().join("forking.py");
    std::fs::write(&script, FORKING_PY)?;
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);

    let load = std::fs::read_to_string("/proc/loadavg").map_or_else(
        |e| format!("unreadable ({e})"),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    let cpus = std::thread::available_parallelism()
        .map_or_else(|e| format!("unknown ({e})"), |n| n.get().to_string());
    println!("{cpus} CPUs, load average {load}");
    println!("## One sampling round (median / p95 of {ROUNDS} rounds)");
    println!("processes | metric | round median | round p95 | per process");
    for n in [64usize, 256] {
        let tree = ForkingTree::start(&script, n)?;
        for metric in [Metric::Rss, Metric::Pss, Metric::Uss] {
            let mut took = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                let t = Instant::now();
                let round = memory::sample(&[holdfast::core::SampleTarget {
                    id: WorkerId(1),
                    pid: tree.root,
                    metric,
                }]);
                took.push(t.elapsed());
                let seen = round.first().map_or(0, |r| r.processes.len());
                anyhow::ensure!(seen == n, "sampled {seen} of {n} processes");
            }
            took.sort();
            let (median, p95) = (took[ROUNDS / 2], took[ROUNDS * 95 / 100]);
            println!(
                "{n} | {} | {:.2} ms | {:.2} ms | {:.1} µs",
                format!("{metric:?}").to_lowercase(),
                ms(median),
                ms(p95),
                median.as_secs_f64() * 1e6 / n as f64
            );
        }
        let t = Instant::now();
        let all = holdfast::os::proc::parents().len();
        println!(
            "(a kernel without children files scans all of /proc instead: {all} processes, +{:.2} ms)",
            ms(t.elapsed())
        );
    }

    let holdfast = build_holdfast()?;
    println!();
    println!("## holdfast CPU with 64 test workers, {secs} s window");
    for memory in [false, true] {
        let share = cpu_share(&holdfast, dir.path(), memory, Duration::from_secs(secs))?;
        println!(
            "[memory] {}: {:.3} % of one core ({:.1} ms CPU per second)",
            if memory {
                "interval = 1s, metric = pss"
            } else {
                "off"
            },
            share * 100.0,
            share * 1000.0
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `python3 forking.py 64 N-1`: N processes sharing 64 MiB.
struct ForkingTree {
    child: Child,
    root: Pid,
}

impl ForkingTree {
    fn start(script: &Path, n: usize) -> anyhow::Result<ForkingTree> {
        let mut child = Command::new("python3")
            .arg(script)
            .arg("64")
            .arg((n - 1).to_string())
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::piped())
            .spawn()?;
        let root = Pid(i32::try_from(child.id())?);
        // It prints one line once every child is forked.
        let mut out = child.stdout.take().ok_or(anyhow::anyhow!("no stdout"))?;
        let mut buf = [0u8; 256];
        let _ = std::io::Read::read(&mut out, &mut buf)?;
        let tree = ForkingTree { child, root };
        let deadline = Instant::now() + Duration::from_secs(30);
        while holdfast::os::proc::descendants(root.0).len() < n {
            anyhow::ensure!(Instant::now() < deadline, "forking.py did not fork {n}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(tree)
    }
}

impl Drop for ForkingTree {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.root.0);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn build_holdfast() -> anyhow::Result<PathBuf> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "holdfast"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()?;
    anyhow::ensure!(status.success(), "cargo build --release failed");
    Ok(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/holdfast"))
}

/// holdfast's utime + stime over `window`, as a fraction of one core.
fn cpu_share(holdfast: &Path, dir: &Path, memory: bool, window: Duration) -> anyhow::Result<f64> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join(format!("holdfast-{memory}.toml"));
    let mut text = format!(
        "[[listen]]\naddress = \"127.0.0.1:{port}\"\n[app]\ncommand = [{:?}]\nworkers = 64\nready = \"notify\"\nready_timeout = \"120s\"\n",
        holdfast
            .with_file_name("holdfast-test-worker")
            .display()
            .to_string()
    );
    if memory {
        text.push_str("[memory]\nlimit = \"10GiB\"\nmetric = \"pss\"\ninterval = \"1s\"\n");
    }
    std::fs::write(&config, text)?;
    let log = dir.join(format!("holdfast-{memory}.log"));
    let mut child = Command::new(holdfast)
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("stderr"))?)
        .env("HOLDFAST_LOG", "info")
        .env("RUST_LOG_STYLE", "never")
        .spawn()?;
    let pid = child.id();
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let text = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
            if text.contains("all workers ready") {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "64 workers not ready in 180 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        // Settle: until holdfast's thread count (the blocking pool the
        // first rounds start) is the same in two reads a second apart.
        let threads = || holdfast::os::proc::stat(pid as i32).map(|s| s.num_threads);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = threads();
        loop {
            std::thread::sleep(Duration::from_secs(1)); // the stability window
            let now = threads();
            anyhow::ensure!(now.is_some(), "holdfast's /proc/{pid}/stat is unreadable");
            if now == last {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "holdfast's threads never settled"
            );
            last = now;
        }
        let (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
        std::thread::sleep(window);
        let (t1, c1) = (Instant::now(), cpu_ticks(pid)?);
        let hz = clock_ticks()?;
        Ok((c1 - c0) as f64 / hz / (t1 - t0).as_secs_f64())
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let _ = std::io::stdout().flush();
    result
}

/// utime + stime of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').ok_or(anyhow::anyhow!("bad stat"))? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ... utime(11) stime(12).
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; no unsafe sysconf here).
fn clock_ticks() -> anyhow::Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
