//! Shared pieces of the benchmarks: find and start the release `holdfast`,
//! read its CPU time and RSS from /proc, wait for log lines.
#![allow(dead_code)] // each benchmark uses a subset

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `holdfast` binary next to this example's directory (`target/<profile>/holdfast`).
pub fn holdfast_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("holdfast"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --release`",
        bin.display()
    );
    bin
}

/// The test worker next to `holdfast` (`target/<profile>/holdfast-test-worker`).
pub fn test_worker_bin() -> PathBuf {
    let bin = holdfast_bin().with_file_name("holdfast-test-worker");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --release --bins`",
        bin.display()
    );
    bin
}

/// A running holdfast with its log in a temp dir; killed (group) on drop.
pub struct Running {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub started: Instant,
}

impl Running {
    pub fn start(config: &str) -> Running {
        let dir = tempfile::Builder::new()
            .prefix("holdfast-bench-")
            .tempdir()
            .expect("tempdir");
        let cfg = dir.path().join("holdfast.toml");
        let bin = holdfast_bin();
        fs::write(
            &cfg,
            config
                .replace("{holdfast}", &bin.to_string_lossy())
                .replace("{test_worker}", &test_worker_bin().to_string_lossy())
                .replace("{dir}", &dir.path().to_string_lossy()),
        )
        .expect("write config");
        let log = dir.path().join("holdfast.log");
        let out = fs::File::create(&log).expect("log");
        let started = Instant::now();
        let child = Command::new(&bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .spawn()
            .expect("spawn holdfast");
        Running {
            child,
            dir,
            log,
            started,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `needle` has appeared `n` times; panics after `limit`.
    pub fn wait_log_count(&self, needle: &str, n: usize, limit: Duration) {
        let t = Instant::now();
        while self.log_text().matches(needle).count() < n {
            assert!(
                t.elapsed() < limit,
                "timed out waiting for {n}x {needle:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .expect("signal holdfast");
    }

    /// holdfast's own user+system CPU time so far.
    pub fn cpu(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// holdfast's own resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    pub fn stop(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

/// utime + stime of `pid` from /proc/PID/stat.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after ')' start at field 3 (state); utime is field 14, stime 15.
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}
