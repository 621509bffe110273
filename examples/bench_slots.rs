//! What two of the README's choices cost, measured with the real servers
//! (Debian's puma 5.6.5 and unicorn 6.0.0) under the release holdfast:
//!
//! `cargo build --release --bins && cargo run --release --example bench_slots`
//!
//! 1. **Slots or the server's own workers.** The same two request-serving
//!    processes, laid out as holdfast slots (`workers = 2`, one single-process
//!    server each) or as one slot whose server forks its own two workers
//!    (Unicorn `worker_processes 2`, Puma `-w 2`). Once every worker has
//!    served, the whole tree under holdfast is summed: RSS (what `ps` and
//!    most dashboards show; shared copy-on-write pages counted in every
//!    process) and PSS (each shared page split among its sharers: what the
//!    machine really spends).
//! 2. **Puma's `queue_requests`.** One Puma (single mode, 8 threads) with its
//!    defaults and with `-C puma.rb` (`queue_requests false`), 8 keep-alive
//!    clients sending one request after the other (each sleeps 10 ms in the
//!    app), and a `holdfast restart --wait` in the middle: how many requests
//!    reused their connection, how many responses said `Connection: close`,
//!    how long the rollout (that is, the old worker's drain) took, and how
//!    many requests failed.
//!
//! Run from the repository root (the apps are `examples/apps`).

#[path = "bench_common/mod.rs"]
mod bench_common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_common::{free_port, holdfast_bin, Running};

fn apps() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/apps")
        .to_string_lossy()
        .into_owned()
}

fn config(port: u16, workers: u32, command: &str, ready: &str, env: &str) -> String {
    format!(
        r#"control_socket = "{{dir}}/holdfast.sock"

[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = {command}
workers = {workers}
cwd = "{apps}"
env = {{ RACK_ENV = "production"{env} }}
ready = "{ready}"
ready_timeout = "90s"
drain_signal = "{drain}"
drain_timeout = "35s"
"#,
        apps = apps(),
        drain = if command.contains("unicorn") {
            "QUIT"
        } else {
            "TERM"
        },
    )
}

fn ctl(h: &Running, args: &[&str]) -> std::process::Output {
    let sock = h.dir.path().join("holdfast.sock");
    Command::new(holdfast_bin())
        .args(args)
        .arg("--control")
        .arg(&sock)
        .output()
        .expect("holdfast client")
}

fn wait_ready(h: &Running) {
    let t = Instant::now();
    loop {
        if ctl(h, &["status", "--ready"]).status.success() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not ready after 120 s:\n{}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One HTTP/1.1 request on `s`: (status line ok, the response said
/// `Connection: close`).
fn request(s: &mut BufReader<TcpStream>, path: &str) -> std::io::Result<bool> {
    s.get_mut().write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n").as_bytes(),
    )?;
    let mut line = String::new();
    if s.read_line(&mut line)? == 0 || !line.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status line {line:?}")));
    }
    let (mut len, mut close) = (0usize, false);
    loop {
        line.clear();
        if s.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("EOF in the headers"));
        }
        let l = line.trim_end().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if l == "connection: close" {
            close = true;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(close)
}

/// Every process below `root` (not `root` itself).
fn descendants(root: i32) -> Vec<i32> {
    let mut parent = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        if let Some(ppid) = rest.split(' ').nth(1).and_then(|p| p.parse::<i32>().ok()) {
            parent.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parent {
            if pp == p {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

fn kib(file: &str, key: &str) -> u64 {
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Starts `cfg`, lets every worker serve, and sums the tree's memory.
fn memory(name: &str, port: u16, cfg: &str) {
    let h = Running::start(cfg);
    wait_ready(&h);
    // Each worker serves: 400 requests over 8 connections, as many served
    // by each process as the kernel's accept order gives.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..50 {
                    if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                        let mut s = BufReader::new(s);
                        let _ = request(&mut s, "/?sleep=1");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let procs = descendants(h.pid());
    let rss: u64 = procs
        .iter()
        .map(|p| kib(&format!("/proc/{p}/status"), "VmRSS:"))
        .sum();
    let pss: u64 = procs
        .iter()
        .map(|p| kib(&format!("/proc/{p}/smaps_rollup"), "Pss:"))
        .sum();
    println!(
        "| {name} | {} | {:.0} MiB | {:.0} MiB |",
        procs.len(),
        rss as f64 / 1024.0,
        pss as f64 / 1024.0
    );
    h.stop();
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    reused: AtomicU64,
    closed: AtomicU64,
    failed: AtomicU64,
}

fn keepalive(name: &str, port: u16, cfg: &str, pause: Duration) {
    let h = Running::start(cfg);
    wait_ready(&h);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, c) = (stop.clone(), counts.clone());
            std::thread::spawn(move || {
                let mut conn: Option<BufReader<TcpStream>> = None;
                while !stop.load(Ordering::Relaxed) {
                    let reused = conn.is_some();
                    let mut s = match conn.take() {
                        Some(s) => s,
                        None => match TcpStream::connect(("127.0.0.1", port)) {
                            Ok(s) => BufReader::new(s),
                            Err(_) => {
                                c.failed.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        },
                    };
                    match request(&mut s, "/?sleep=10") {
                        Ok(close) => {
                            c.requests.fetch_add(1, Ordering::Relaxed);
                            c.reused.fetch_add(u64::from(reused), Ordering::Relaxed);
                            c.closed.fetch_add(u64::from(close), Ordering::Relaxed);
                            if !close {
                                conn = Some(s);
                            }
                            std::thread::sleep(pause);
                        }
                        Err(_) => {
                            c.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    let out = ctl(&h, &["restart", "--wait"]);
    let took = t.elapsed();
    let answer = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .trim()
    .to_string();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let n = counts.requests.load(Ordering::Relaxed);
    println!(
        "| {name} | {n} | {} | {} | {:.1} s | {} | {answer} |",
        counts.reused.load(Ordering::Relaxed),
        counts.closed.load(Ordering::Relaxed),
        took.as_secs_f64(),
        counts.failed.load(Ordering::Relaxed),
    );
    h.stop();
}

fn main() {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("\n## Two request-serving processes: slots or the server's own workers\n");
    println!("| layout | processes under holdfast | RSS | PSS |\n|---|---|---|---|");
    let unicorn = r#"["unicorn", "-E", "production", "-c", "unicorn.conf.rb", "config.ru"]"#;
    let port = free_port();
    memory(
        "Unicorn, 2 slots × `worker_processes 1`",
        port,
        &config(port, 2, unicorn, "probe", r#", UNICORN_WORKERS = "1""#),
    );
    let port = free_port();
    memory(
        "Unicorn, 1 slot × `worker_processes 2`",
        port,
        &config(port, 1, unicorn, "probe", r#", UNICORN_WORKERS = "2""#),
    );
    let puma = |cluster: &str| {
        format!(
            r#"["puma", "-C", "puma.rb", "--bind-to-activated-sockets=only",{cluster} "-t", "16:16", "config.ru"]"#
        )
    };
    let port = free_port();
    memory(
        "Puma, 2 slots × single mode",
        port,
        &config(port, 2, &puma(""), "notify", ""),
    );
    let port = free_port();
    memory(
        "Puma, 1 slot × cluster `-w 2`",
        port,
        &config(port, 1, &puma(r#" "-w", "2","#), "notify", ""),
    );

    for pause in [0, 1000] {
        println!("\n## Puma single mode, 8 keep-alive clients pausing {pause} ms between requests, one `restart --wait`\n");
        println!("| config | requests | on a reused connection | answered `Connection: close` | restart --wait took | failed | its answer |\n|---|---|---|---|---|---|---|");
        puma_keepalive(Duration::from_millis(pause));
    }
}

fn puma_keepalive(pause: Duration) {
    let port = free_port();
    keepalive(
        "Puma defaults (`queue_requests true`)",
        port,
        &config(
            port,
            1,
            r#"["puma", "--bind-to-activated-sockets=only", "-t", "8:8", "config.ru"]"#,
            "notify",
            "",
        ),
        pause,
    );
    let port = free_port();
    keepalive(
        "`-C puma.rb` (`queue_requests false`)",
        port,
        &config(
            port,
            1,
            r#"["puma", "-C", "puma.rb", "--bind-to-activated-sockets=only", "-t", "8:8", "config.ru"]"#,
            "notify",
            "",
        ),
        pause,
    );
}
