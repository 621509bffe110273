//! Log capture throughput: 4 test workers writing numbered lines flat out,
//! (a) straight into a file (their stdout is the file, O_APPEND), and
//! (b) through holdfast (`[logs] stdout = file`), with and without the
//! `[w<slot> <pid>] ` prefix. Prints MB/s, lines/s, holdfast's CPU time over
//! the window (utime + stime from /proc/<pid>/stat) and the ratio to (a).
//!
//! ```text
//! cargo run --release --example bench_logs [-- SECONDS [LINE_BYTES [WORKERS]]]
//! ```
//! Defaults: 5 s per run, 100-byte lines, 4 workers. The binary re-executes
//! itself as holdfast and as the test worker, so nothing else must be built.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    match args.next().as_deref().and_then(|a| a.to_str()) {
        Some("holdfast") => run_holdfast(args.next()),
        first => {
            let rest: Vec<String> = first
                .map(str::to_string)
                .into_iter()
                .chain(args.map(|a| a.to_string_lossy().into_owned()))
                .collect();
            bench(&rest)
        }
    }
}

/// `bench_logs holdfast CONFIG`: holdfast itself, in this binary.
fn run_holdfast(config: Option<OsString>) -> ExitCode {
    let Some(config) = config else {
        eprintln!("usage: bench_logs holdfast CONFIG");
        return ExitCode::from(64);
    };
    let overrides = holdfast::config::Overrides::default();
    let config = match holdfast::config::Config::load(Some(Path::new(&config)), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("holdfast: {e}");
            return ExitCode::from(78);
        }
    };
    if let Err(e) = holdfast::cli::init_logging(config.logs.holdfast_log.as_deref()) {
        eprintln!("holdfast: {e}");
        return ExitCode::from(73);
    }
    let code = holdfast::cli::run(config, overrides);
    ExitCode::from(u8::try_from(code).unwrap_or(70))
}

struct Params {
    seconds: f64,
    line_bytes: usize,
    workers: usize,
}

/// What one run measured over its window.
struct Figures {
    bytes: u64,
    lines: u64,
    secs: f64,
    /// holdfast's CPU seconds in the window: None for the direct run,
    /// Some(None) when /proc/PID/stat could not be read.
    cpu: Option<Option<f64>>,
}

impl Figures {
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    fn lines_s(&self) -> f64 {
        self.lines as f64 / self.secs
    }
}

fn bench(args: &[String]) -> ExitCode {
    let num = |i: usize, d: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let p = Params {
        seconds: num(0, 5.0),
        line_bytes: num(1, 100.0) as usize,
        workers: num(2, 4.0) as usize,
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("bench_logs: current_exe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = match tempfile::Builder::new().prefix("bench-logs-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("bench_logs: temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "bench_logs: {} workers, {}-byte lines, {} s per run, files in {}",
        p.workers,
        p.line_bytes,
        p.seconds,
        dir.path().display()
    );
    let direct = direct_run(&exe, dir.path(), &p, false);
    let own_files = direct_run(&exe, dir.path(), &p, true);
    let plain = holdfast_run(&exe, dir.path(), &p, false);
    let prefixed = holdfast_run(&exe, dir.path(), &p, true);
    println!();
    println!(
        "{:<30} {:>9} {:>12} {:>14} {:>9}",
        "run", "MB/s", "lines/s", "holdfast CPU", "ratio"
    );
    let row = |name: &str, f: &Figures| {
        let cpu = match f.cpu {
            None => "-".to_string(),
            Some(None) => "unreadable".to_string(),
            Some(Some(c)) => format!("{c:.2} s ({:.0}%)", 100.0 * c / f.secs),
        };
        println!(
            "{name:<30} {:>9.1} {:>12.0} {cpu:>14} {:>8.2}x",
            f.mb_s(),
            f.lines_s(),
            f.lines_s() / direct.lines_s()
        );
    };
    row("straight into one file", &direct);
    row("straight into a file each", &own_files);
    row("through holdfast, prefix=false", &plain);
    row("through holdfast, prefix=true", &prefixed);
    ExitCode::SUCCESS
}

/// The test worker built next to the examples (`cargo build --release --bins`).
fn test_worker(exe: &Path) -> PathBuf {
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("holdfast-test-worker"))
        .unwrap_or_else(|| PathBuf::from("holdfast-test-worker"))
}

fn worker_args(p: &Params) -> Vec<String> {
    vec![
        "--log-forever".into(),
        "--log-line-bytes".into(),
        p.line_bytes.to_string(),
        "--lame-duck-ms".into(),
        "0".into(),
    ]
}

/// The workers with their stdout on the file itself (`apart`: one file each;
/// the figures then cover all of them).
fn direct_run(exe: &Path, dir: &Path, p: &Params, apart: bool) -> Figures {
    let path = dir.join("direct.log");
    let file_of = |i: usize| {
        if apart && i > 0 {
            dir.join(format!("direct-{i}.log"))
        } else {
            path.clone()
        }
    };
    let mut children: Vec<Child> = (0..p.workers)
        .map(|i| {
            let out = OpenOptions::new()
                .create(true)
                .append(true)
                .open(file_of(i))
                .expect("open direct log");
            Command::new(test_worker(exe))
                .args(worker_args(p))
                .args(["--bind", "127.0.0.1:0"])
                .env("HOLDFAST_WORKER_ID", i.to_string())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn test worker")
        })
        .collect();
    let files: Vec<PathBuf> = (0..if apart { p.workers } else { 1 })
        .map(file_of)
        .collect();
    let f = measure(&files, p, None);
    for c in &children {
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGINT);
    }
    for c in &mut children {
        let _ = c.wait();
    }
    for f in files {
        let _ = fs::remove_file(f);
    }
    f
}

/// The same workers under holdfast, stdout captured into a file.
fn holdfast_run(exe: &Path, dir: &Path, p: &Params, prefix: bool) -> Figures {
    let path = dir.join(format!("holdfast-prefix-{prefix}.log"));
    let config = dir.join("holdfast.toml");
    let command: Vec<String> = std::iter::once(test_worker(exe).display().to_string())
        .chain(worker_args(p))
        .collect();
    let text = format!(
        "[[listen]]\naddress = \"127.0.0.1:0\"\n\n[app]\ncommand = {command:?}\nworkers = {}\nready = \"notify\"\n\n[logs]\nstdout = {:?}\nstderr = \"/dev/null\"\nprefix = {prefix}\n",
        p.workers,
        path.display().to_string()
    );
    fs::write(&config, text).expect("write config");
    let mut child = Command::new(exe)
        .arg("holdfast")
        .arg(&config)
        .env("HOLDFAST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn holdfast");
    let pid = child.id();
    let f = measure(std::slice::from_ref(&path), p, Some(pid));
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let _ = child.wait();
    let _ = fs::remove_file(&path);
    f
}

/// Bytes each file grows by before the measurement starts.
const WARM_UP: u64 = 4 << 20;

/// Waits for output in every file, warms up by [`WARM_UP`] bytes each, then measures the growth of
/// `files` (and the CPU time of `pid`) over `p.seconds`.
fn measure(files: &[PathBuf], p: &Params, pid: Option<u32>) -> Figures {
    let started = Instant::now();
    while files.iter().any(|f| size(f) == 0) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no output in {files:?} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Warm-up: until every file has grown by WARM_UP bytes past its first output.
    let first: Vec<u64> = files.iter().map(|f| size(f)).collect();
    while files.iter().zip(&first).any(|(f, s)| size(f) < s + WARM_UP) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{files:?} did not grow by {WARM_UP} bytes in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sizes = || files.iter().map(|f| size(f)).collect::<Vec<_>>();
    let (t0, s0, c0) = (Instant::now(), sizes(), pid.and_then(cpu_seconds));
    std::thread::sleep(Duration::from_secs_f64(p.seconds));
    let (s1, c1) = (sizes(), pid.and_then(cpu_seconds));
    let secs = t0.elapsed().as_secs_f64();
    let mut f = Figures {
        bytes: 0,
        lines: 0,
        secs,
        cpu: pid.map(|_| c0.zip(c1).map(|(a, b)| b - a)),
    };
    for (i, file) in files.iter().enumerate() {
        f.bytes += s1[i] - s0[i];
        f.lines += newlines(file, s0[i], s1[i]);
    }
    f
}

fn size(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

fn newlines(path: &Path, from: u64, to: u64) -> u64 {
    let mut f = File::open(path).expect("open log");
    f.seek(SeekFrom::Start(from)).expect("seek");
    let mut left = to - from;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let got = f.read(&mut buf[..want]).expect("read log");
        if got == 0 {
            break;
        }
        n += buf[..got].iter().filter(|&&b| b == b'\n').count() as u64;
        left -= got as u64;
    }
    n
}

/// utime + stime of `pid`, all threads, in seconds; `None` when unreadable.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime 14, stime 15 (1-based) → 11, 12 here.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 / hz as f64)
}
