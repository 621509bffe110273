//! The production stories holdfast exists for, each reproduced first with the
//! setup from the story and the real programs (Debian's Apache, nginx,
//! Passenger, Puma, Unicorn), then shown gone with holdfast in the same place.
//!
//! 1. Apache `mod_proxy_balancer` with its defaults in front of an app server
//!    restarted by stop/start: connects fail, Apache disables the member for
//!    60 s and answers 503. Under holdfast (Unicorn, Puma): 0.
//! 3. A small listen backlog under a burst while the workers are busy: the
//!    kernel drops SYNs (ListenOverflows), connects hang for a second and
//!    more. `holdfast status` shows the queue at its max; with the
//!    recommended backlog: 0. And the start-up warning when `backlog` is
//!    above `net.core.somaxconn`.
//! 4. Passenger's SIGUSR1 to a busy app process (what memory-killer scripts
//!    send): 502s. Under holdfast + Puma, `[memory]` recycles the bloated
//!    worker: 0. And logrotate: a `postrotate` that reloads Apache with HUP
//!    (`service httpd reload`) resets connections; holdfast's
//!    `units/holdfast.logrotate` loses no request and no line.
//! 5. nginx to an app server's own unix socket with a small backlog:
//!    `connect() to unix:... failed (11: Resource temporarily unavailable)`
//!    and 502s. To holdfast's socket with the recommended backlog, across
//!    bursts and rollouts: 0.
//!
//! Story 2 (pooled keep-alive connections across rollouts) is
//! `tests/proxies.rs`. Each test runs in a network namespace of its own
//! ([`PrivateNet`]): exact kernel counters, its own somaxconn, and ports no
//! other test can take.

mod common;
use common::examples::{apps_dir, example_config, examples_dir, replace_once};

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::PrivateNet;
use common::proxy::{proxy_dir, require, Proxy};
use common::{
    free_port, http_get, pid_alive, wait_until, Holdfast, Load, LoadReport, LoadSpec, Target,
};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Deadline for a Ruby server to boot, and any wait that includes one.
const BOOT: Duration = Duration::from_secs(90);

fn field_u32(line: &str, key: &str) -> Option<u32> {
    line.split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// Waits for `cond` on holdfast's log; a failed rollout fails at once.
fn wait_log(h: &Holdfast, what: &str, cond: impl Fn(&str) -> bool) {
    wait_until(BOOT, what, || {
        let log = h.log();
        if let Some(l) = log.lines().find(|l| l.contains("keeps serving")) {
            panic!("while waiting for {what}: {l}");
        }
        assert!(
            pid_alive(h.pid()),
            "holdfast exited while waiting for {what}"
        );
        cond(&log).then_some(())
    });
}

fn wait_ready(h: &Holdfast) {
    wait_log(h, "all workers ready", |log| {
        log.contains("all workers ready")
    });
}

/// `n` SIGHUP rollouts, each once the previous finished and the load did
/// `between` more requests.
fn rollouts(h: &Holdfast, loads: &[Load], n: u32, between: u64) {
    let done = || loads.iter().map(Load::requests_so_far).sum::<u64>();
    let serve = |what: &str| {
        let base = done();
        wait_until(BOOT, what, || (done() >= base + between).then_some(()));
    };
    serve("requests before the first rollout");
    let first = h
        .log()
        .lines()
        .filter(|l| l.contains("rollout finished"))
        .count() as u32;
    for i in 1..=n {
        let generation = first + i + 1;
        h.signal(Signal::SIGHUP);
        wait_log(
            h,
            &format!("rollout finished generation={generation}"),
            |log| {
                log.lines().any(|l| {
                    l.contains("rollout finished") && field_u32(l, "generation") == Some(generation)
                })
            },
        );
        serve(&format!(
            "requests after rollout to generation {generation}"
        ));
    }
}

/// 4 keep-alive GET clients, 4 with a connection per request, 2 keep-alive
/// POST clients (4 KiB): bounded at 200 s.
fn mix(target: Target, path: &str) -> Vec<LoadSpec> {
    let base = |n, keepalive| LoadSpec {
        connections: n,
        keepalive,
        path: path.to_string(),
        max_duration: Duration::from_secs(200),
        max_requests: 300_000,
        request_timeout: Duration::from_secs(20),
        ..LoadSpec::new(target.clone())
    };
    vec![
        base(4, true),
        base(4, false),
        LoadSpec {
            post_body: Some(vec![b'p'; 4096]),
            ..base(2, true)
        },
    ]
}

fn stop_all(loads: Vec<Load>) -> Vec<LoadReport> {
    loads.into_iter().map(Load::stop).collect()
}

fn total_ok(r: &[LoadReport]) -> u64 {
    r.iter().map(|r| r.ok).sum()
}

fn total_failed(r: &[LoadReport]) -> u64 {
    r.iter().map(LoadReport::failed).sum()
}

fn failures(r: &[LoadReport]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for rep in r {
        for (k, v) in &rep.failures {
            *m.entry(k.clone()).or_default() += v;
        }
    }
    m
}

fn print_reports(what: &str, r: &[LoadReport]) {
    eprintln!(
        "story {what}: ok={} failed={} {:?}",
        total_ok(r),
        total_failed(r),
        failures(r)
    );
    for rep in r {
        eprintln!(
            "  {}: ok={} failed={} {:?}; first failures: {:?}",
            rep.target,
            rep.ok,
            rep.failed(),
            rep.failures,
            rep.failure_samples.iter().take(3).collect::<Vec<_>>()
        );
    }
}

// ---------------------------------------------------------------------------
// A server as the stories ran it: bound by itself, restarted by stop/start.

/// An app server started directly (no holdfast), in a process group of its
/// own, output in `log`. `Drop` kills the group.
struct Plain {
    child: Child,
    log: PathBuf,
}

impl Plain {
    fn start(program: &str, args: &[&str], cwd: &Path, log: &Path, env: &[(&str, &str)]) -> Plain {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open server log");
        let child = Command::new(program)
            .args(args)
            .current_dir(cwd)
            .envs(env.iter().copied())
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Plain {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Sends `sig` to the group and waits for the leader to exit. What is
    /// left of the group is killed while the leader is an unreaped zombie:
    /// its pid, the group's id, cannot be reused by then.
    fn stop(&mut self, sig: Signal) {
        let leader = self.child.id();
        let pid = Pid::from_raw(leader as i32);
        let _ = killpg(pid, sig);
        wait_until(BOOT, "the plain server to exit", || {
            (!pid_alive(leader)).then_some(())
        });
        let _ = killpg(pid, Signal::SIGKILL);
        self.child.wait().expect("reap the plain server");
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("===== plain server log:\n{}", self.log());
        }
    }
}

/// Waits until GET / on `target` answers 200.
fn wait_serving(target: &Target, what: &str) {
    wait_until(BOOT, what, || {
        http_get(target, "/").ok().filter(|r| r.status == 200)
    });
}

// ---------------------------------------------------------------------------
// Story 1: Apache mod_proxy_balancer, "disabling worker"

/// A balancer with one member and every default (retry=60, no failonstatus,
/// no hot standby), as the story had it.
fn balancer_site(member: &str) -> String {
    format!(
        r#"
<VirtualHost *:{{port}}>
    <Proxy "balancer://app">
        BalancerMember "{member}"
    </Proxy>
    ProxyPass        "/" "balancer://app/"
    ProxyPassReverse "/" "balancer://app/"
</VirtualHost>
"#
    )
}

const BALANCER_MODULES: &[&str] = &[
    "proxy",
    "proxy_http",
    "proxy_balancer",
    "slotmem_shm",
    "lbmethod_byrequests",
];

/// Lines of Apache's error log that say it could not reach the app.
fn apache_connect_errors(proxy: &Proxy) -> (usize, usize) {
    let log = proxy.error_log();
    let failed = log.lines().filter(|l| l.contains("AH00957")).count();
    let disabled = log.lines().filter(|l| l.contains("AH00959")).count();
    (failed, disabled)
}

#[test]
fn story1_balancer_plain_restart_disables_the_worker() {
    require("unicorn", "unicorn");
    let _net = PrivateNet::enter();
    let tmp = tempfile::Builder::new()
        .prefix("holdfast-story1-")
        .tempdir()
        .expect("tempdir");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let unicorn_args = [
        "-E",
        "production",
        "-c",
        "unicorn.conf.rb",
        "-l",
        addr.as_str(),
        "config.ru",
    ];
    let log = tmp.path().join("unicorn.log");
    let mut unicorn = Plain::start("unicorn", &unicorn_args, &apps_dir(), &log, &[]);
    let direct = Target::local(port);
    wait_serving(&direct, "unicorn to serve");
    let dir = proxy_dir(tmp.path(), "apache");
    let proxy = Proxy::apache(
        &dir,
        free_port(),
        BALANCER_MODULES,
        &balancer_site(&format!("http://{addr}")),
    );
    proxy.wait_serving("/", BOOT);

    // A restart under load, the way the story did it: stop, then start.
    let loads: Vec<Load> = mix(proxy.target(), "/")
        .into_iter()
        .map(Load::start)
        .collect();
    let done = |loads: &[Load]| loads.iter().map(Load::requests_so_far).sum::<u64>();
    wait_until(BOOT, "requests before the restart", || {
        (done(&loads) >= 100).then_some(())
    });
    unicorn.stop(Signal::SIGQUIT);
    // While no server listens, connects are refused.
    let base = done(&loads);
    wait_until(BOOT, "requests while unicorn is down", || {
        (done(&loads) >= base + 20).then_some(())
    });
    let _unicorn = Plain::start("unicorn", &unicorn_args, &apps_dir(), &log, &[]);
    wait_serving(&direct, "unicorn to serve again");
    let base = done(&loads);
    wait_until(BOOT, "requests after the restart", || {
        (done(&loads) >= base + 50).then_some(())
    });
    let reports = stop_all(loads);
    print_reports("1 reproduced: balancer, plain restart", &reports);
    let (connect_failed, disabled) = apache_connect_errors(&proxy);
    eprintln!("story 1 reproduced: AH00957 connect failed {connect_failed}, AH00959 disabling worker {disabled}");
    assert!(
        disabled >= 1 && connect_failed >= 1,
        "Apache did not log a failed connect and `disabling worker`:\n{}",
        proxy.error_log()
    );
    // 503 from the disabled member (502 for a request whose connect was
    // refused), and a reset for a pooled connection the stop closed.
    let f = failures(&reports);
    assert!(
        f.keys().all(|k| k == "5xx" || k == "reset"),
        "only 5xx and resets: {f:?}"
    );
    assert!(f["5xx"] >= 1, "{f:?}");
    // Apache's default forcerecovery=On brings a lone member back as soon
    // as it answers again: once Unicorn serves, so does Apache.
    wait_serving(&direct, "unicorn, direct");
    let statuses: Vec<u16> = (0..10)
        .map(|_| {
            http_get(&proxy.target(), "/")
                .map(|r| r.status)
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(statuses, vec![200; 10], "the member recovered");
}

/// holdfast in place of the stop/start: same balancer, `n` rollouts under
/// load, not one 5xx and no connect error in Apache's log.
fn balancer_in_front_of(example: &str, name: &str, rollouts_n: u32) {
    let _net = PrivateNet::enter();
    let h = Holdfast::start(&example_config(example));
    wait_ready(&h);
    let dir = proxy_dir(h.dir.path(), "apache");
    let proxy = Proxy::apache(
        &dir,
        h.port2,
        BALANCER_MODULES,
        &balancer_site(&format!("http://127.0.0.1:{}", h.port)),
    );
    proxy.wait_serving("/", BOOT);
    let loads: Vec<Load> = mix(proxy.target(), "/")
        .into_iter()
        .map(Load::start)
        .collect();
    rollouts(&h, &loads, rollouts_n, 100);
    let reports = stop_all(loads);
    print_reports(&format!("1 with holdfast + {name}"), &reports);
    assert_eq!(total_failed(&reports), 0, "{:?}", failures(&reports));
    assert!(total_ok(&reports) >= 100 * u64::from(rollouts_n));
    assert_eq!(
        apache_connect_errors(&proxy),
        (0, 0),
        "AH00957/AH00959 in Apache's log:\n{}",
        proxy.error_log()
    );
}

#[test]
fn story1_balancer_holdfast_unicorn_no_5xx() {
    require("unicorn", "unicorn");
    balancer_in_front_of("unicorn.toml", "unicorn", 5);
}

#[test]
fn story1_balancer_holdfast_puma_no_5xx() {
    require("puma", "puma ruby-sd-notify");
    balancer_in_front_of("puma.toml", "puma", 5);
}

// ---------------------------------------------------------------------------
// Story 3: the listen backlog

/// `n` TCP connects to `addr` at once (non-blocking SYNs), each then given
/// up to `patience` to complete. Returns the connections that completed in
/// time and how many did not (their SYN was dropped: the kernel retries it
/// only after 1 s).
fn burst(addr: SocketAddr, n: usize, patience: Duration) -> (Vec<TcpStream>, usize) {
    let handles: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || TcpStream::connect_timeout(&addr, patience).ok()))
        .collect();
    let mut ok = Vec::new();
    let mut late = 0;
    for h in handles {
        match h.join().expect("connect thread") {
            Some(s) => ok.push(s),
            None => late += 1,
        }
    }
    (ok, late)
}

/// Sends `GET path` on each stream and reads each answer (bounded); returns
/// the status of each (0: none).
fn answer_all(streams: &mut [TcpStream], path: &str) -> Vec<u16> {
    for s in streams.iter_mut() {
        let _ = s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
    }
    streams
        .iter_mut()
        .map(|s| {
            s.set_read_timeout(Some(BOOT)).expect("timeout");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out)
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// One Puma with one thread that takes a connection only when the thread is
/// free (`queue_requests false`): while it serves a slow request, every
/// other connection waits in holdfast's queue.
fn busy_puma_config(backlog: u32) -> String {
    format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"
backlog = {backlog}

[app]
command = ["puma", "-C", "puma.rb", "--bind-to-activated-sockets=only", "-t", "1:1", "config.ru"]
cwd = "{apps}"
workers = 1
env = {{ RACK_ENV = "production" }}
handoff = ["systemd"]
ready = "notify"
ready_timeout = "60s"
drain_signal = "TERM"
drain_timeout = "35s"
"#,
        apps = apps_dir().display()
    )
}

/// `holdfast status --json`'s accept queue (now, max) of the first listener.
fn status_queue(h: &Holdfast) -> (u64, u64, String) {
    let out = h.cli(&["status", "--control", "{dir}/holdfast.sock"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("http "))
        .unwrap_or_else(|| panic!("no listener row in status:\n{text}"))
        .to_string();
    let q = line
        .split_whitespace()
        .last()
        .and_then(|q| q.split_once('/'))
        .map(|(a, b)| (a.parse().unwrap_or(0), b.parse().unwrap_or(0)))
        .unwrap_or_else(|| panic!("no now/max in {line:?}"));
    (q.0, q.1, text)
}

/// Occupies the one Puma thread with GET /?sleep=MS on a connection of its
/// own, and returns that connection (read the answer later).
fn occupy(h: &Holdfast, ms: u64) -> TcpStream {
    let addr = SocketAddr::from(([127, 0, 0, 1], h.port));
    let mut c = TcpStream::connect(addr).expect("connect");
    c.write_all(
        format!("GET /?sleep={ms} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .expect("write");
    // Accepted by Puma (not in the queue any more).
    wait_until(BOOT, "Puma to take the slow request", || {
        (status_queue(h).0 == 0).then_some(())
    });
    c
}

/// Burst of `n` connects while the only Puma thread is busy for `busy_ms`.
/// Returns (connections not accepted within 800 ms, ListenOverflows growth,
/// status text at the peak, statuses of the accepted ones).
fn backlog_burst(
    net: &PrivateNet,
    h: &Holdfast,
    n: usize,
    busy_ms: u64,
) -> (usize, u64, String, Vec<u16>) {
    let mut slow = occupy(h, busy_ms);
    let before = net.tcp_ext("ListenOverflows");
    let started = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], h.port));
    let (mut accepted, late) = burst(addr, n, Duration::from_millis(800));
    let overflows = net.tcp_ext("ListenOverflows") - before;
    let (_, _, status) = status_queue(h);
    assert!(
        started.elapsed() < Duration::from_millis(busy_ms),
        "the burst outlasted the busy request; the figures mean nothing"
    );
    let statuses = answer_all(&mut accepted, "/");
    let mut first = String::new();
    slow.set_read_timeout(Some(BOOT)).expect("timeout");
    let _ = slow.read_to_string(&mut first);
    assert!(
        first.starts_with("HTTP/1.1 200"),
        "the slow request: {first:?}"
    );
    (late, overflows, status, statuses)
}

#[test]
fn story3_small_backlog_overflows_recommended_does_not() {
    require("puma", "puma ruby-sd-notify");
    let net = PrivateNet::enter();
    const BURST: usize = 64;
    const SMALL: u32 = 16;

    // The story: a backlog of 16 (think 100 and a bigger burst). The queue
    // holds backlog + 1 connections; the kernel drops the SYNs of the rest.
    let h = Holdfast::start(&busy_puma_config(SMALL));
    wait_ready(&h);
    let mut slow = occupy(&h, 6000);
    let before = net.tcp_ext("ListenOverflows");
    let addr = SocketAddr::from(([127, 0, 0, 1], h.port));
    let (mut accepted, late) = burst(addr, BURST, Duration::from_millis(800));
    let (now, max, status) = status_queue(&h);
    let overflows = net.tcp_ext("ListenOverflows") - before;
    eprintln!("story 3 reproduced: backlog {SMALL}, burst {BURST}: {} accepted, {late} not within 800 ms, ListenOverflows +{overflows}\n{status}", accepted.len());
    assert_eq!(
        (now, max),
        (u64::from(SMALL) + 1, u64::from(SMALL)),
        "queue at its max:\n{status}"
    );
    assert_eq!(
        accepted.len(),
        SMALL as usize + 1,
        "connections the queue held"
    );
    assert_eq!(
        late,
        BURST - SMALL as usize - 1,
        "connects whose SYN was dropped"
    );
    assert!(
        overflows >= late as u64,
        "ListenOverflows grew by {overflows}, fewer than the {late} dropped SYNs"
    );
    assert!(
        status.contains("WARNING") && status.contains("ListenOverflows"),
        "status warns about overflows:\n{status}"
    );
    let statuses = answer_all(&mut accepted, "/");
    assert_eq!(
        statuses,
        vec![200; SMALL as usize + 1],
        "queued connections are served"
    );
    let mut first = String::new();
    slow.set_read_timeout(Some(BOOT)).expect("timeout");
    let _ = slow.read_to_string(&mut first);
    drop(h);

    // The recommended backlog (1024, the default): the whole burst waits in
    // the queue and is served.
    let h = Holdfast::start(&busy_puma_config(1024));
    wait_ready(&h);
    let (late, overflows, status, statuses) = backlog_burst(&net, &h, BURST, 6000);
    eprintln!("story 3 with backlog 1024: {late} late, ListenOverflows +{overflows}\n{status}");
    assert_eq!((late, overflows), (0, 0), "{status}");
    assert_eq!(statuses, vec![200; BURST]);
    assert!(!status.contains("WARNING"), "{status}");
}

#[test]
fn story3_backlog_above_somaxconn_is_warned_and_capped() {
    let net = PrivateNet::enter();
    net.set_somaxconn(128);
    let config = |backlog: u32| {
        format!(
            r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"
backlog = {backlog}

[app]
command = ["{{test_worker}}"]
workers = 1
"#
        )
    };
    let h = Holdfast::start(&config(1024));
    wait_ready(&h);
    let warning = h.wait_log("is above net.core.somaxconn");
    assert!(
        warning.contains("WARN")
            && warning.contains("listen backlog 1024 is above net.core.somaxconn = 128")
            && warning.contains("sysctl -w net.core.somaxconn=1024"),
        "{warning}"
    );
    let (_, max, status) = status_queue(&h);
    assert_eq!(max, 128, "the kernel's cap, as status shows it:\n{status}");
    drop(h);
    let h = Holdfast::start(&config(128));
    wait_ready(&h);
    let (_, max, _) = status_queue(&h);
    assert_eq!(max, 128);
    assert!(!h.log().contains("somaxconn"), "no warning at the cap");
}

// ---------------------------------------------------------------------------
// Story 5: nginx to a unix socket

/// nginx with one `server unix:PATH` upstream and its defaults (no
/// keepalive: a connection per request, as the story had it).
fn nginx_unix_site(path: &Path) -> String {
    format!(
        r#"
upstream app {{
    server unix:{};
}}
server {{
    listen 127.0.0.1:{{port}};
    location / {{
        proxy_pass http://app;
    }}
}}
"#,
        path.display()
    )
}

/// `n` clients at once through `proxy`, one request each: statuses.
fn proxy_burst(proxy: &Proxy, n: usize, path: &str) -> Vec<u16> {
    let target = proxy.target();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let t = target.clone();
            let p = path.to_string();
            std::thread::spawn(move || http_get(&t, &p).map(|r| r.status).unwrap_or(0))
        })
        .collect();
    let mut v: Vec<u16> = handles
        .into_iter()
        .map(|h| h.join().expect("client"))
        .collect();
    v.sort_unstable();
    v
}

/// The accept queue of the listening unix socket at `path` (`ss`'s Recv-Q).
fn unix_queue(path: &Path) -> Option<u64> {
    let out = Command::new(require("ss", "iproute2"))
        .args(["-xlnH", "src"])
        .arg(path)
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?;
    line.split_whitespace().nth(2)?.parse().ok()
}

const EAGAIN_LINE: &str = "failed (11: Resource temporarily unavailable)";

#[test]
fn story5_nginx_unix_socket_small_backlog_eagain_then_none() {
    require("puma", "puma ruby-sd-notify");
    let _net = PrivateNet::enter();
    const BURST: usize = 48;
    const SMALL: u32 = 16;
    let tmp = tempfile::Builder::new()
        .prefix("holdfast-story5-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    let sock = tmp.path().join("puma.sock");

    // The story: Puma's own unix socket with a small backlog, one busy thread.
    let bind = format!("unix://{}?backlog={SMALL}&umask=0000", sock.display());
    let log = tmp.path().join("puma.log");
    let mut puma = Plain::start(
        "puma",
        &["-C", "puma.rb", "-t", "1:1", "-b", &bind, "config.ru"],
        &apps_dir(),
        &log,
        &[("RACK_ENV", "production")],
    );
    wait_until(BOOT, "puma's unix socket", || {
        http_get(&Target::Unix(sock.clone()), "/")
            .ok()
            .filter(|r| r.status == 200)
    });
    let dir = proxy_dir(tmp.path(), "nginx");
    let proxy = Proxy::nginx(&dir, free_port(), &nginx_unix_site(&sock));
    proxy.wait_serving("/", BOOT);
    let mut slow = UnixStream::connect(&sock).expect("connect puma.sock");
    slow.write_all(b"GET /?sleep=5000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    wait_until(BOOT, "Puma to take the slow request", || {
        (unix_queue(&sock) == Some(0)).then_some(())
    });
    let statuses = proxy_burst(&proxy, BURST, "/");
    let bad = statuses.iter().filter(|s| **s == 502).count();
    let eagain = proxy.error_lines(EAGAIN_LINE).len();
    eprintln!(
        "story 5 reproduced: burst {BURST} on a unix socket with backlog {SMALL}: {bad} x 502, {eagain} EAGAIN lines; statuses {statuses:?}"
    );
    assert_eq!(bad, eagain, "one 502 per refused connect");
    assert_eq!(
        bad,
        BURST - SMALL as usize - 1,
        "the queue holds backlog + 1: {statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), BURST - bad);
    let mut first = String::new();
    let _ = slow.read_to_string(&mut first);
    puma.stop(Signal::SIGTERM);
    drop(proxy);

    // holdfast's unix socket, backlog 1024 (the default), same burst while
    // the worker is busy, then bursts during rollouts: no EAGAIN, no 502.
    let config = format!(
        r#"
[[listen]]
name = "unix"
address = "unix:{{dir}}/app.sock"
mode = "0666"

[app]
command = ["puma", "-C", "puma.rb", "--bind-to-activated-sockets=only", "-t", "1:1", "config.ru"]
cwd = "{apps}"
workers = 2
env = {{ RACK_ENV = "production" }}
handoff = ["systemd"]
ready = "notify"
ready_timeout = "60s"
drain_signal = "TERM"
drain_timeout = "35s"
"#,
        apps = apps_dir().display()
    );
    let h = Holdfast::start(&config);
    wait_ready(&h);
    let sock = h.dir.path().join("app.sock");
    let dir = proxy_dir(h.dir.path(), "nginx");
    let proxy = Proxy::nginx(&dir, h.port2, &nginx_unix_site(&sock));
    proxy.wait_serving("/", BOOT);
    let statuses = proxy_burst(&proxy, BURST, "/?sleep=200");
    assert_eq!(statuses, vec![200; BURST], "a burst on holdfast's socket");
    let loads: Vec<Load> = mix(proxy.target(), "/")
        .into_iter()
        .map(Load::start)
        .collect();
    let mut burst_statuses = Vec::new();
    for generation in 2..=4u32 {
        h.signal(Signal::SIGHUP);
        burst_statuses.extend(proxy_burst(&proxy, 32, "/"));
        wait_log(
            &h,
            &format!("rollout finished generation={generation}"),
            |log| {
                log.lines().any(|l| {
                    l.contains("rollout finished") && field_u32(l, "generation") == Some(generation)
                })
            },
        );
    }
    rollouts(&h, &loads, 2, 50);
    let reports = stop_all(loads);
    print_reports(
        "5 with holdfast: nginx -> unix socket, bursts and rollouts",
        &reports,
    );
    assert_eq!(total_failed(&reports), 0, "{:?}", failures(&reports));
    assert_eq!(burst_statuses, vec![200; burst_statuses.len()]);
    assert_eq!(proxy.error_lines(EAGAIN_LINE), Vec::<String>::new());
    assert_eq!(proxy.error_lines("connect() to unix"), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// Story 4: Passenger's SIGUSR1, and a logrotate that reloads Apache

/// A copy of examples/apps/config.ru as a Passenger app (`public/`, `tmp/`)
/// in `base/app`, readable by `nobody` (Passenger runs a root-owned app as
/// nobody).
fn passenger_app(base: &Path) -> PathBuf {
    let app = base.join("app");
    for d in ["public", "tmp", "log"] {
        fs::create_dir_all(app.join(d)).expect("mkdir app dir");
        fs::set_permissions(app.join(d), fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    fs::copy(apps_dir().join("config.ru"), app.join("config.ru")).expect("copy config.ru");
    fs::set_permissions(&app, fs::Permissions::from_mode(0o755)).expect("chmod app");
    fs::set_permissions(app.join("config.ru"), fs::Permissions::from_mode(0o644))
        .expect("chmod config.ru");
    app
}

/// Apache + mod_passenger (Debian's libapache2-mod-passenger) serving `app`
/// with 2 app processes, each one request at a time, and an access log.
fn passenger_body(app: &Path) -> String {
    format!(
        r#"
PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini
PassengerDefaultRuby /usr/bin/ruby
PassengerInstanceRegistryDir {{pdir}}/instreg
PassengerMaxPoolSize 2
PassengerMinInstances 2
PassengerDisableAnonymousTelemetry on
PassengerDisableSecurityUpdateCheck on
LogFormat "%h %l %u %t \"%r\" %>s %b" common
<VirtualHost *:{{port}}>
    ServerName 127.0.0.1
    DocumentRoot {app}/public
    PassengerAppRoot {app}
    PassengerAppEnv production
    CustomLog {{pdir}}/access.log common
    <Directory {app}/public>
        Require all granted
    </Directory>
</VirtualHost>
"#,
        app = app.display()
    )
}

/// Processes whose command line (title) contains `needle`: Passenger's app
/// processes carry the app's path, which is this test's temp dir.
fn pids_titled(needle: &str) -> Vec<u32> {
    let mut v: Vec<u32> = fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            pid_alive(*pid)
                && fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect();
    v.sort_unstable();
    v
}

/// Kills, at drop, every process whose title names this test's app dir (a
/// Passenger helper left behind by a failed test).
struct PassengerSweep(String);

impl Drop for PassengerSweep {
    fn drop(&mut self) {
        for pid in pids_titled(&self.0) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

#[test]
fn story4_passenger_sigusr1_to_a_busy_app_process_fails_requests() {
    require("passenger-config", "passenger libapache2-mod-passenger");
    assert!(
        Path::new("/usr/lib/apache2/modules/mod_passenger.so").exists(),
        "mod_passenger.so missing: apt-get install libapache2-mod-passenger"
    );
    let _net = PrivateNet::enter();
    let tmp = tempfile::Builder::new()
        .prefix("holdfast-story4-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    let app = passenger_app(tmp.path());
    let title = format!("Passenger RubyApp: {}", app.display());
    let _sweep = PassengerSweep(app.display().to_string());
    let dir = proxy_dir(tmp.path(), "apache");
    fs::create_dir_all(dir.join("instreg")).expect("mkdir instreg");
    let proxy = Proxy::apache(&dir, free_port(), &["passenger"], &passenger_body(&app));
    proxy.wait_serving("/", BOOT);
    wait_until(BOOT, "two Passenger app processes", || {
        (pids_titled(&title).len() == 2).then_some(())
    });

    // Every app process always busy: 8 clients, 100 ms per request, 2
    // processes. SIGUSR1, what memory-killer scripts send, to one of them.
    const KILLS: usize = 5;
    let load = Load::start(LoadSpec {
        connections: 8,
        path: "/?sleep=100".into(),
        max_duration: Duration::from_secs(120),
        max_requests: 100_000,
        request_timeout: Duration::from_secs(30),
        ..LoadSpec::new(proxy.target())
    });
    let mut killed = Vec::new();
    for _ in 0..KILLS {
        let base = load.requests_so_far();
        wait_until(BOOT, "requests between kills", || {
            (load.requests_so_far() >= base + 20).then_some(())
        });
        let pid = wait_until(BOOT, "two app processes", || {
            let pids = pids_titled(&title);
            (pids.len() == 2).then(|| pids[0])
        });
        nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGUSR1).expect("SIGUSR1");
        killed.push(pid);
        wait_until(BOOT, "the signalled app process to go", || {
            (!pid_alive(pid)).then_some(())
        });
    }
    let base = load.requests_so_far();
    wait_until(BOOT, "requests after the last kill", || {
        (load.requests_so_far() >= base + 20).then_some(())
    });
    let report = load.stop();
    let incomplete = proxy
        .error_lines("application did not send a complete response")
        .len();
    print_reports(
        "4 reproduced: Passenger, SIGUSR1 to a busy app process",
        std::slice::from_ref(&report),
    );
    eprintln!("story 4 reproduced: {KILLS} SIGUSR1 -> {} failed, {incomplete} `did not send a complete response` lines", report.failed());
    assert_eq!(
        report.failures.keys().cloned().collect::<Vec<_>>(),
        vec!["5xx".to_string()],
        "{report}"
    );
    assert!(
        report.failed() >= KILLS as u64,
        "each SIGUSR1 lost at least the request in flight: {report}"
    );
    assert_eq!(
        incomplete as u64,
        report.failed(),
        "one Passenger `Sending 502 response` line per failed request"
    );
}

/// Apache (examples/apache.conf, mod_proxy with its defaults) in front of
/// holdfast's TCP listener.
fn apache_in_front(h: &Holdfast) -> Proxy {
    let site = fs::read_to_string(examples_dir().join("apache.conf")).expect("apache.conf");
    let site = replace_once(&site, "<VirtualHost *:80>", "<VirtualHost *:{port}>");
    let site = replace_once(
        &site,
        "\"unix:/run/holdfast/app.sock|http://holdfast/\"",
        &format!("\"http://127.0.0.1:{}/\"", h.port),
    );
    let body = format!(
        "LogFormat \"%h %l %u %t \\\"%r\\\" %>s %b\" common\nCustomLog {{pdir}}/access.log common\n{site}"
    );
    let dir = proxy_dir(h.dir.path(), "apache");
    let proxy = Proxy::apache(&dir, h.port2, &["proxy", "proxy_http"], &body);
    proxy.wait_serving("/", BOOT);
    proxy
}

/// Puma as examples/puma.toml runs it, on a TCP listener, with `extra`
/// appended to the config and `args` before the rackup file.
fn puma_holdfast(args: &str, extra: &str) -> String {
    format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[app]
command = ["puma", "-C", "puma.rb", "--bind-to-activated-sockets=only", "-t", "16:16", {args} "config.ru"]
cwd = "{apps}"
workers = 2
env = {{ RACK_ENV = "production" }}
handoff = ["systemd"]
ready = "notify"
ready_timeout = "60s"
drain_signal = "TERM"
drain_timeout = "35s"
{extra}
"#,
        apps = apps_dir().display()
    )
}

#[test]
fn story4_holdfast_memory_recycling_behind_apache_fails_nothing() {
    require("puma", "puma ruby-sd-notify");
    let _net = PrivateNet::enter();
    let h = Holdfast::start(&puma_holdfast(
        "",
        r#"
[memory]
limit = "192MiB"
interval = "250ms"
grace = 2
min_lifetime = "0s"
"#,
    ));
    wait_ready(&h);
    let proxy = apache_in_front(&h);
    // The load of the Passenger run, through Apache.
    const BLOATS: usize = 5;
    let load = Load::start(LoadSpec {
        connections: 8,
        path: "/?sleep=100".into(),
        max_duration: Duration::from_secs(150),
        max_requests: 100_000,
        request_timeout: Duration::from_secs(30),
        ..LoadSpec::new(proxy.target())
    });
    for i in 1..=BLOATS {
        let base = load.requests_so_far();
        wait_until(BOOT, "requests between bloats", || {
            (load.requests_so_far() >= base + 20).then_some(())
        });
        // One worker (whichever answers) grows past the limit.
        let grown = http_get(&h.tcp(), "/grow?mb=200").expect("GET /grow");
        assert_eq!(grown.status, 200);
        let bloated = grown.pid().expect("X-Pid");
        wait_log(
            &h,
            &format!("memory replacement {i} of pid {bloated}"),
            |log| {
                log.lines()
                    .any(|l| l.contains(&format!("(pid {bloated})")) && l.contains(": replacing"))
            },
        );
        wait_log(&h, &format!("pid {bloated} to exit"), |log| {
            log.lines()
                .any(|l| l.contains("worker exited") && field_u32(l, "pid") == Some(bloated))
        });
    }
    let base = load.requests_so_far();
    wait_until(BOOT, "requests after the last recycle", || {
        (load.requests_so_far() >= base + 20).then_some(())
    });
    let report = load.stop();
    print_reports(
        "4 with holdfast: Apache -> Puma, [memory] recycling",
        std::slice::from_ref(&report),
    );
    report.assert_clean(100);
    let replaced = h.log().matches(": replacing").count();
    assert_eq!(replaced, BLOATS, "one memory replacement per bloat");
    assert_eq!(proxy.error_lines("AH01102"), Vec::<String>::new());
}

/// A logrotate config for `log`, with `postrotate`.
fn logrotate_conf(log: &Path, postrotate: &str) -> String {
    format!(
        "{} {{\n    su root root\n    rotate 10\n    missingok\n    sharedscripts\n    postrotate\n        {postrotate}\n    endscript\n}}\n",
        log.display()
    )
}

fn logrotate(conf: &Path, state: &Path) {
    let out = Command::new(require("logrotate", "logrotate"))
        .arg("-f")
        .arg("-s")
        .arg(state)
        .arg(conf)
        .output()
        .expect("run logrotate");
    assert!(
        out.status.success(),
        "logrotate: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lines containing `needle` in `path` and its rotated copies (`path.N`).
fn lines_in_series(path: &Path, needle: &str) -> usize {
    let name = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let dir = path.parent().expect("dir");
    fs::read_dir(dir)
        .expect("read log dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&name))
        .map(|e| {
            fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(needle))
                .count()
        })
        .sum()
}

const ROTATIONS: usize = 3;

#[test]
fn story4_logrotate_reloading_apache_resets_connections() {
    require("passenger-config", "passenger libapache2-mod-passenger");
    let _net = PrivateNet::enter();
    let tmp = tempfile::Builder::new()
        .prefix("holdfast-story4r-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    let app = passenger_app(tmp.path());
    let _sweep = PassengerSweep(app.display().to_string());
    let dir = proxy_dir(tmp.path(), "apache");
    fs::create_dir_all(dir.join("instreg")).expect("mkdir instreg");
    let proxy = Proxy::apache(&dir, free_port(), &["passenger"], &passenger_body(&app));
    proxy.wait_serving("/", BOOT);
    // The story's postrotate: `service httpd reload`, which was
    // `kill -HUP $(cat httpd.pid)`: Apache restarts its children.
    let access = dir.join("access.log");
    let conf = tmp.path().join("logrotate.conf");
    fs::write(
        &conf,
        logrotate_conf(
            &access,
            &format!("/bin/kill -HUP $(cat {})", dir.join("apache.pid").display()),
        ),
    )
    .expect("write logrotate.conf");
    let path = "/?sleep=20&story=4";
    let load = Load::start(LoadSpec {
        connections: 8,
        path: path.into(),
        max_duration: Duration::from_secs(150),
        max_requests: 100_000,
        request_timeout: Duration::from_secs(30),
        ..LoadSpec::new(proxy.target())
    });
    for _ in 0..ROTATIONS {
        let base = load.requests_so_far();
        wait_until(BOOT, "requests between rotations", || {
            (load.requests_so_far() >= base + 100).then_some(())
        });
        logrotate(&conf, &tmp.path().join("logrotate.state"));
    }
    let base = load.requests_so_far();
    wait_until(BOOT, "requests after the last rotation", || {
        (load.requests_so_far() >= base + 100).then_some(())
    });
    let report = load.stop();
    let logged = lines_in_series(&access, &format!("\"GET {path} HTTP/1.1\" 200"));
    print_reports(
        "4 reproduced: logrotate with `kill -HUP` of Apache",
        std::slice::from_ref(&report),
    );
    eprintln!(
        "story 4 reproduced: {ROTATIONS} rotations: {} failed; {} answered 200, {logged} logged",
        report.failed(),
        report.ok
    );
    assert!(report.failed() >= 1, "no request failed: {report}");
}

#[test]
fn story4_logrotate_with_holdfast_loses_no_request_and_no_line() {
    require("puma", "puma ruby-sd-notify");
    let _net = PrivateNet::enter();
    let h0 = tempfile::Builder::new()
        .prefix("holdfast-story4l-")
        .tempdir()
        .expect("tempdir");
    let logs = h0.path().join("logs");
    fs::create_dir_all(&logs).expect("mkdir logs");
    let app_log = logs.join("app.log");
    let h = Holdfast::start(&puma_holdfast(
        r#""--log-requests","#,
        &format!("[logs]\nstdout = {app_log:?}\nstderr = {app_log:?}\n"),
    ));
    wait_ready(&h);
    let proxy = apache_in_front(&h);
    // units/holdfast.logrotate, paths adapted.
    let snippet = include_str!("../units/holdfast.logrotate");
    let adapted = replace_once(snippet, "/var/log/app/*.log", &app_log.to_string_lossy());
    let adapted = replace_once(&adapted, "create 0640 app adm", "create 0640");
    let adapted = replace_once(
        &adapted,
        "/usr/bin/holdfast reopen-logs --config /etc/holdfast/app.toml",
        &h.fill("{holdfast} reopen-logs --config {config}"),
    );
    // Uncompressed, so every rotated file can be counted line by line
    // (tests/logs.rs rotates with compression).
    let adapted = replace_once(&adapted, "    compress\n    delaycompress\n", "");
    let conf = h0.path().join("logrotate.conf");
    fs::write(&conf, adapted).expect("write logrotate.conf");
    let path = "/?sleep=20&story=4";
    let load = Load::start(LoadSpec {
        connections: 8,
        path: path.into(),
        max_duration: Duration::from_secs(150),
        max_requests: 100_000,
        request_timeout: Duration::from_secs(30),
        ..LoadSpec::new(proxy.target())
    });
    for _ in 0..ROTATIONS {
        let base = load.requests_so_far();
        wait_until(BOOT, "requests between rotations", || {
            (load.requests_so_far() >= base + 100).then_some(())
        });
        logrotate(&conf, &h0.path().join("logrotate.state"));
        wait_until(BOOT, "lines in the new app.log", || {
            (fs::metadata(&app_log).ok()?.len() > 0).then_some(())
        });
    }
    let base = load.requests_so_far();
    wait_until(BOOT, "requests after the last rotation", || {
        (load.requests_so_far() >= base + 100).then_some(())
    });
    let report = load.stop();
    print_reports(
        "4 with holdfast: logrotate + reopen-logs",
        std::slice::from_ref(&report),
    );
    report.assert_clean(300);
    let needle = format!("\"GET {path} HTTP/1.1\" 200");
    // Puma writes its request line after the response; let the last ones land.
    wait_until(BOOT, "every answered request in the logs", || {
        (lines_in_series(&app_log, &needle) as u64 >= report.ok).then_some(())
    });
    let logged = lines_in_series(&app_log, &needle);
    eprintln!(
        "story 4 with holdfast: {ROTATIONS} rotations, {} answered, {logged} logged",
        report.ok
    );
    assert_eq!(
        logged as u64, report.ok,
        "each answered request logged once"
    );
    let rotated = fs::read_dir(&logs).expect("logs").count();
    assert_eq!(
        rotated,
        ROTATIONS + 1,
        "app.log and {ROTATIONS} rotated files"
    );
}
