//! End-to-end proof with the real app servers of Debian 12: Puma 5.6 (with
//! ruby-sd-notify), Unicorn 6, Gunicorn 20 and uWSGI 2.0 under holdfast, each rolled
//! [`ROLLOUTS`] times by SIGHUP under a bounded load that must see no failed
//! request; the two traps of real servers that holdfast must catch and
//! explain (a wrapper that closes the inherited fds, Puma unlinking a unix
//! socket path); and nginx and Apache in front, started as real processes.
//!
//! The configs of the first four tests are the files in `examples/`, with
//! only the port and `cwd` made absolute, so what the README recommends is
//! what runs here. A missing server binary fails the test with the package to
//! install: nothing here is ever skipped.
//!
//! Shared shape: [`rollouts_under_load`] is the one rollout loop (load
//! running, SIGHUP, wait for `rollout finished`, wait for the new generation
//! to serve), [`Proxy`] the one place that starts nginx or Apache, and
//! [`finish`] the one place that stops holdfast and checks every drained
//! worker's exit.

mod common;
use common::examples::{apps_dir, example_config, examples_dir, replace_once};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::{proxy_dir, require, Proxy};
use common::{
    http_get, pid_alive, run_holdfast, wait_until, Holdfast, Load, LoadReport, LoadSpec, Target,
};
use nix::sys::signal::Signal;

/// Readiness deadline for a generation of a Ruby or Python server, and for
/// any wait that includes one: generous, as CI is a busy 2-core box.
const READY: Duration = Duration::from_secs(90);

/// SIGHUP rollouts per test.
const ROLLOUTS: u32 = 5;

/// SIGHUP rollouts of the tests with nginx or Apache in front, which run
/// the proxies with their default retries: at least 20 (tests/proxies.rs).
const PROXY_ROLLOUTS: u32 = 20;

/// Requests the load must finish after each rollout before the next SIGHUP,
/// so that every generation is seen serving.
const BETWEEN: u64 = 150;

// ---------------------------------------------------------------------------
// Finding the servers and the example configs

/// Puma, and the gem without which it never sends READY=1.
fn require_puma() {
    require("puma", "puma ruby-sd-notify");
    let ruby = require("ruby", "ruby");
    let out = Command::new(ruby)
        .args(["-e", "require 'sd_notify'"])
        .output()
        .expect("run ruby");
    assert!(
        out.status.success(),
        "ruby cannot load sd_notify: run `apt-get install ruby-sd-notify` (without it Puma never sends READY=1): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Reading holdfast's log

/// The value of `key=value` in a tracing line (`key` at a word start).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

fn field_u32(line: &str, key: &str) -> Option<u32> {
    field(line, key)?.parse().ok()
}

/// Polls the log until `cond` finds something, for up to `deadline`. Panics
/// at once (with the log, through the harness) when holdfast has exited, and
/// when a rollout failed: a failed rollout never turns into a pass by waiting.
fn wait_log<T>(
    h: &Holdfast,
    deadline: Duration,
    what: &str,
    mut cond: impl FnMut(&str) -> Option<T>,
) -> T {
    wait_until(deadline, what, || {
        let alive = pid_alive(h.pid());
        let log = h.log();
        if let Some(v) = cond(&log) {
            return Some(v);
        }
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("failed; the previous generation keeps serving"))
        {
            panic!("while waiting for {what}: {line}");
        }
        assert!(alive, "holdfast exited while waiting for {what}");
        None
    })
}

fn wait_all_ready(h: &Holdfast) {
    wait_log(h, READY, "all workers ready", |log| {
        log.contains("all workers ready").then_some(())
    });
}

fn wait_rollout_finished(h: &Holdfast, generation: u32) {
    wait_log(
        h,
        READY,
        &format!("rollout finished generation={generation}"),
        |log| {
            log.lines()
                .any(|l| {
                    l.contains("rollout finished") && field_u32(l, "generation") == Some(generation)
                })
                .then_some(())
        },
    );
}

/// The pids holdfast spawned for `generation`.
fn generation_pids(log: &str, generation: u32) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("worker spawned") && field_u32(l, "generation") == Some(generation))
        .filter_map(|l| field_u32(l, "pid"))
        .collect()
}

/// The `reason=` of each `worker exited` line, by pid (reason is the last field).
fn exit_reasons(log: &str) -> HashMap<u32, String> {
    log.lines()
        .filter(|l| l.contains("worker exited"))
        .filter_map(|l| {
            let pid = field_u32(l, "pid")?;
            let (_, reason) = l.split_once(" reason=")?;
            Some((pid, reason.trim().to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Process trees, for telling which generation answered

/// `root` and its descendants (holdfast's own /proc walk).
fn process_tree(root: u32) -> Vec<u32> {
    holdfast::os::proc::descendants(root as i32)
        .into_iter()
        .map(|p| p as u32)
        .collect()
}

// ---------------------------------------------------------------------------
// The rollout loop

/// A load of `connections` clients on `target`: bounded at 150 s and 200,000
/// requests, 20 s per request.
fn load(target: Target, connections: usize, keepalive: bool) -> LoadSpec {
    LoadSpec {
        connections,
        keepalive,
        max_duration: Duration::from_secs(150),
        max_requests: 200_000,
        request_timeout: Duration::from_secs(20),
        ..LoadSpec::new(target)
    }
}

/// What [`rollouts_under_load`] saw.
struct Rolled {
    reports: Vec<LoadReport>,
    /// Processes of each generation (the worker and its descendants), sampled
    /// while that generation served.
    trees: BTreeMap<u32, Vec<u32>>,
    /// `took=` of each `rollout finished` line.
    rollouts: Vec<String>,
    took: Duration,
    /// How many rollouts ran.
    count: u32,
}

impl Rolled {
    fn ok(&self) -> u64 {
        self.reports.iter().map(|r| r.ok).sum()
    }

    fn failed(&self) -> u64 {
        self.reports.iter().map(LoadReport::failed).sum()
    }

    /// Prints the figures, then asserts every load clean with at least
    /// `min_ok` answers each, and that every generation answered some.
    fn assert_clean(&self, name: &str, min_ok: u64) {
        eprintln!(
            "e2e {name}: {} rollouts, requests ok={} failed={} in {:.1}s; rollouts took {}",
            self.count,
            self.ok(),
            self.failed(),
            self.took.as_secs_f64(),
            self.rollouts.join(" ")
        );
        for r in &self.reports {
            eprint!("{r}");
            r.assert_clean(min_ok);
        }
        let answered: BTreeSet<u32> = self.reports.iter().flat_map(|r| r.pids.clone()).collect();
        for (generation, tree) in &self.trees {
            assert!(
                tree.iter().any(|p| answered.contains(p)),
                "no answer came from generation {generation} (processes {tree:?}; answered: {answered:?})"
            );
        }
    }
}

/// Runs one load per spec while holdfast gets [`ROLLOUTS`] SIGHUPs, each sent
/// once the previous rollout finished and the new generation answered
/// [`BETWEEN`] requests. `after` runs after each rollout with the generation
/// now serving (2, 3, ...). Generation 1 must already be ready; the config
/// file is not changed.
fn rollouts_under_load(h: &Holdfast, specs: Vec<LoadSpec>, after: impl FnMut(u32)) -> Rolled {
    rollouts_under_load_n(h, specs, ROLLOUTS, after)
}

/// [`rollouts_under_load`] with `count` rollouts.
fn rollouts_under_load_n(
    h: &Holdfast,
    specs: Vec<LoadSpec>,
    count: u32,
    mut after: impl FnMut(u32),
) -> Rolled {
    let started = Instant::now();
    let loads: Vec<Load> = specs.into_iter().map(Load::start).collect();
    let done = |loads: &[Load]| loads.iter().map(Load::requests_so_far).sum::<u64>();
    let mut trees = BTreeMap::new();
    let serve = |loads: &[Load], generation: u32, trees: &mut BTreeMap<u32, Vec<u32>>| {
        let base = done(loads);
        wait_until(
            READY,
            &format!("{BETWEEN} requests answered by generation {generation}"),
            || (done(loads) >= base + BETWEEN).then_some(()),
        );
        let tree = generation_pids(&h.log(), generation)
            .into_iter()
            .flat_map(process_tree)
            .collect();
        trees.insert(generation, tree);
    };
    serve(&loads, 1, &mut trees);
    for generation in 2..=count + 1 {
        h.signal(Signal::SIGHUP);
        wait_rollout_finished(h, generation);
        after(generation);
        serve(&loads, generation, &mut trees);
    }
    let reports = loads.into_iter().map(Load::stop).collect();
    let rollouts = h
        .log()
        .lines()
        .filter(|l| l.contains("rollout finished"))
        .filter_map(|l| field(l, "took").map(str::to_string))
        .collect();
    Rolled {
        reports,
        trees,
        rollouts,
        took: started.elapsed(),
        count,
    }
}

/// The error holdfast logs when a worker says it is ready but its tree does
/// not hold the listening sockets it must serve.
const NO_SOCKET: &str = "said it was ready, but no process of its tree holds";

/// Stops holdfast with SIGTERM, checks that it exits 0, and that every
/// worker it started ended with `reason` (e.g. `exit status 0`): a drain that
/// ran into drain_timeout shows up as `killed by SIGKILL`.
fn stop(h: &mut Holdfast, reason: &str) {
    h.signal(Signal::SIGTERM);
    check_stopped(h, reason);
}

/// The checks of [`stop`] once SIGTERM was sent.
fn check_stopped(h: &mut Holdfast, reason: &str) {
    let status = h.wait_exit(READY);
    assert!(status.success(), "holdfast exited with {status}");
    let log = h.log();
    let reasons = exit_reasons(&log);
    let pids = h.worker_pids();
    assert!(!pids.is_empty(), "no worker was spawned");
    for pid in pids {
        assert_eq!(
            reasons.get(&pid).map(String::as_str),
            Some(reason),
            "how worker {pid} ended (all: {reasons:?})"
        );
    }
}

/// [`stop`], after checking that holdfast raised no false alarm about a
/// well-configured server: no worker without sockets, no unlinked path.
fn finish(h: &mut Holdfast, reason: &str) {
    assert_no_alarm(h);
    stop(h, reason);
}

fn assert_no_alarm(h: &Holdfast) {
    let log = h.log();
    for alarm in [NO_SOCKET, "restored it to holdfast's listening socket"] {
        assert!(
            !log.contains(alarm),
            "holdfast logged `{alarm}` for a well-configured server"
        );
    }
}

/// The accept queue of the TCP listener on 127.0.0.1:`port` (the rx_queue
/// column of /proc/net/tcp for a socket in state LISTEN).
fn accept_queue(port: u16) -> Option<u64> {
    let table = fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.get(1) != Some(&local.as_str()) || cols.get(3) != Some(&"0A") {
            return None;
        }
        let rx = cols.get(4)?.split(':').nth(1)?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// The socket inode of holdfast's listener named `name` (its `listening`
/// line gives the fd; /proc/PID/fd/FD links to `socket:[INODE]`).
fn listener_inode(h: &Holdfast, name: &str) -> String {
    let log = h.log();
    let fd = log
        .lines()
        .find(|l| l.contains("listening") && field(l, "name") == Some(name))
        .and_then(|l| field(l, "fd"))
        .unwrap_or_else(|| panic!("no `listening name={name}` line with fd="));
    let link = fs::read_link(format!("/proc/{}/fd/{fd}", h.pid())).expect("read holdfast's fd");
    link.to_string_lossy().into_owned()
}

/// Whether `pid` has `socket` (`socket:[INODE]`) open.
fn holds(pid: u32, socket: &str) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .any(|e| fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == socket))
        })
        .unwrap_or(false)
}

/// [`finish`], proving on the way that a draining server answers the
/// connections it accepted before its drain signal whose request came after.
/// Opens `n` connections to the listener `http` that send nothing, waits
/// until the workers have accepted every one (the accept queue is empty),
/// stops holdfast, waits until every serving process (each live worker, or
/// its children when it has some: a cluster master's workers) has closed
/// its copy of the listener, which a draining Puma does after its reactor
/// has shut down, and only then sends a request on each. All must be
/// answered 200.
fn finish_with_silent_connections(h: &mut Holdfast, n: usize, reason: &str) {
    assert_no_alarm(h);
    let socket = listener_inode(h, "http");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], h.port));
    let mut conns: Vec<std::net::TcpStream> = (0..n)
        .map(|i| std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect #{i}: {e}")))
        .collect();
    wait_until(
        READY,
        "the workers to accept every silent connection",
        || (accept_queue(h.port) == Some(0)).then_some(()),
    );
    let serving: Vec<u32> = h
        .worker_pids()
        .into_iter()
        .filter(|p| pid_alive(*p))
        .flat_map(|p| {
            let tree = process_tree(p);
            if tree.len() > 1 {
                tree[1..].to_vec()
            } else {
                tree
            }
        })
        .collect();
    assert!(
        serving.iter().any(|p| holds(*p, &socket)),
        "no serving process {serving:?} holds {socket}"
    );
    h.signal(Signal::SIGTERM);
    wait_until(READY, "the draining servers to close the listener", || {
        (!serving.iter().any(|p| holds(*p, &socket))).then_some(())
    });
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap_or_else(|e| panic!("write on silent connection #{i}: {e}"));
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(READY)).expect("read timeout");
        let mut answer = Vec::new();
        let read = c.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(
            read.is_ok() && text.starts_with("HTTP/1.1 200"),
            "silent connection #{i}, whose request came during the drain: {read:?} {text:?}"
        );
    }
    eprintln!(
        "e2e: {n} connections accepted before the drain, request sent during it: all answered 200"
    );
    check_stopped(h, reason);
}

/// 8 keep-alive clients, 8 with one request per connection, and 4
/// keep-alive clients POSTing 4 KiB (a proxy may retry a failed GET on a
/// fresh connection by itself, a POST only when told to).
fn load_mix(target: Target) -> Vec<LoadSpec> {
    let post = LoadSpec {
        post_body: Some(vec![b'x'; 4096]),
        ..load(target.clone(), 4, true)
    };
    vec![load(target.clone(), 8, true), load(target, 8, false), post]
}

// ---------------------------------------------------------------------------
// 1-4: each server with its example config

#[test]
fn puma_single_mode_ready_by_notify() {
    require_puma();
    let mut h = Holdfast::start(&example_config("puma.toml"));
    wait_all_ready(&h);
    let rolled = rollouts_under_load(&h, load_mix(h.tcp()), |_| {});
    rolled.assert_clean("puma single", 100);
    // Puma finishes its requests on TERM, then re-raises it.
    finish_with_silent_connections(&mut h, 8, "killed by SIGTERM");
}

#[test]
fn puma_cluster_mode() {
    require_puma();
    let mut h = Holdfast::start(&example_config("puma-cluster.toml"));
    wait_all_ready(&h);
    let rolled = rollouts_under_load(&h, load_mix(h.tcp()), |_| {});
    rolled.assert_clean("puma cluster", 100);
    finish_with_silent_connections(&mut h, 8, "killed by SIGTERM");
}

#[test]
fn unicorn_quit_through_listen_fds_exits_0() {
    require("unicorn", "unicorn");
    let mut h = Holdfast::start(&example_config("unicorn.toml"));
    wait_all_ready(&h);
    let rolled = rollouts_under_load(&h, load_mix(h.tcp()), |_| {});
    rolled.assert_clean("unicorn", 100);
    // Not 1 (EBADF), which is what Unicorn does on QUIT when it gets the
    // sockets through both LISTEN_FDS and UNICORN_FD.
    finish(&mut h, "exit status 0");
}

#[test]
fn gunicorn_through_listen_fds_ready_by_probe() {
    require("gunicorn", "gunicorn");
    let mut h = Holdfast::start(&example_config("gunicorn.toml"));
    wait_all_ready(&h);
    let rolled = rollouts_under_load(&h, load_mix(h.tcp()), |_| {});
    rolled.assert_clean("gunicorn", 100);
    finish(&mut h, "exit status 0");
}

#[test]
fn uwsgi_hup_exit_on_reload_ready_by_probe() {
    require("uwsgi", "uwsgi-core uwsgi-plugin-python3");
    let mut h = Holdfast::start(&example_config("uwsgi.toml"));
    wait_all_ready(&h);
    let rolled = rollouts_under_load(&h, load_mix(h.tcp()), |_| {});
    rolled.assert_clean("uwsgi", 100);
    // HUP with --exit-on-reload: requests finished, then exit 0.
    finish(&mut h, "exit status 0");
}

/// Every example config passes `holdfast check` (relative paths resolve
/// against the file, so this works from any directory).
#[test]
fn example_configs_pass_check() {
    let mut checked = Vec::new();
    for entry in fs::read_dir(examples_dir()).expect("read examples/") {
        let path = entry.expect("examples/ entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let p = path.to_string_lossy().into_owned();
            let out = run_holdfast(&["check", "--config", &p]);
            assert!(
                out.status.success(),
                "holdfast check --config {p}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked.push(p);
        }
    }
    checked.sort();
    for name in ["gunicorn", "puma-cluster", "puma", "unicorn", "uwsgi"] {
        assert!(
            checked
                .iter()
                .any(|p| p.ends_with(&format!("/{name}.toml"))),
            "examples/{name}.toml missing (checked {checked:?})"
        );
    }
}

// ---------------------------------------------------------------------------
// 5: a wrapper that closes the inherited fds

#[test]
fn wrapper_closing_inherited_fds_is_reported() {
    let worker = |extra: &str| {
        format!(
            r#"
[[listen]]
address = "127.0.0.1:{{port}}"

[app]
command = ["{{test_worker}}"{extra}]
workers = 1
ready = "notify"
ready_timeout = "60s"
drain_timeout = "10s"
"#
        )
    };
    let mut h = Holdfast::start(&worker(""));
    wait_all_ready(&h);
    // Generation 2 says READY=1 from a child, with no listening socket left
    // anywhere in its tree: not ready; the rollout fails and generation 1
    // keeps serving (it used to be drained, and requests timed out).
    h.rewrite_config(&worker(r#", "--close-inherited""#));
    let o = h.cli(&["restart", "--wait", "--control", "{dir}/holdfast.sock"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "restart --wait must fail: {err}");
    let address = format!("127.0.0.1:{}", h.port);
    assert!(
        err.contains("rollout of generation 2 failed")
            && err.contains(&address)
            && err.contains("closed the inherited fds"),
        "the failure does not name the address and the cause: {err}"
    );
    let log = h.log();
    let good = generation_pids(&log, 1);
    let bad = generation_pids(&log, 2);
    assert_eq!((good.len(), bad.len()), (1, 1), "one worker per generation");
    let line = wait_log(&h, READY, "the error about the closed fds", |log| {
        log.lines()
            .find(|l| l.contains(NO_SOCKET) && field_u32(l, "pid") == Some(bad[0]))
            .map(str::to_string)
    });
    assert!(line.contains("ERROR"), "not logged as an error: {line}");
    assert!(
        line.contains("closed the inherited fds") && line.contains("--keep-file-descriptors"),
        "the error does not name the likely cause: {line}"
    );
    // The healthy first generation was checked the same way, and long before.
    let flagged: Vec<u32> = h
        .log()
        .lines()
        .filter(|l| l.contains(NO_SOCKET))
        .filter_map(|l| field_u32(l, "pid"))
        .collect();
    assert_eq!(flagged, bad, "workers reported as holding no socket");
    let answer = http_get(&h.tcp(), "/").expect("GET / after the failed rollout");
    assert_eq!(answer.pid(), Some(good[0]), "generation 1 still serves");
    stop(&mut h, "exit status 0");
}

// ---------------------------------------------------------------------------
// 6: Puma unlinks an inherited unix socket path; nginx in front

/// The inode of the socket file at `path`, if there is one.
fn socket_inode(path: &Path) -> Option<u64> {
    let m = fs::symlink_metadata(path).ok()?;
    m.file_type().is_socket().then(|| m.ino())
}

/// Two listeners, one Puma per generation; `puma_args` picks what it binds.
/// A Puma that binds only TCP holds only `http`: the config says so
/// (`ready_listeners`), or it would not count as ready.
fn puma_two_listeners(puma_args: &str) -> String {
    let ready_listeners = if puma_args.contains("tcp://") {
        r#"ready_listeners = ["http"]"#
    } else {
        ""
    };
    format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[[listen]]
name = "unix"
address = "unix:{{dir}}/app.sock"
mode = "0666"

[app]
command = ["puma", "-C", "puma.rb", {puma_args}, "-t", "16:16", "config.ru"]
cwd = "{apps}"
workers = 1
env = {{ RACK_ENV = "production" }}
handoff = ["systemd"]
ready = "notify"
ready_timeout = "60s"
drain_signal = "TERM"
drain_timeout = "35s"
{ready_listeners}
"#,
        apps = apps_dir().display()
    )
}

#[test]
fn puma_unlinking_the_unix_path_is_repaired() {
    require_puma();
    // Generation 1 serves both sockets and unlinks nothing: the path's inode
    // now is the one holdfast bound.
    let mut h = Holdfast::start(&puma_two_listeners(r#""--bind-to-activated-sockets=only""#));
    wait_all_ready(&h);
    let path = h.dir.path().join("app.sock");
    let inode = socket_inode(&path).expect("holdfast's unix socket at app.sock");
    let unix = Target::Unix(path.clone());
    let first = http_get(&unix, "/").expect("GET / on app.sock");
    assert_eq!(first.status, 200);

    // Generations 2..=6 bind only TCP: each Puma closes the unix socket at
    // boot and unlinks its path, and holdfast must put back the same socket.
    h.rewrite_config(&puma_two_listeners(r#""-b", "tcp://127.0.0.1:{port}""#));
    let rolled = rollouts_under_load(&h, load_mix(h.tcp()), |generation| {
        let now = wait_until(
            Duration::from_secs(5),
            &format!("app.sock back after rollout to generation {generation}"),
            || socket_inode(&path).filter(|i| *i == inode),
        );
        assert_eq!(now, inode);
    });
    rolled.assert_clean("puma unlinking app.sock (TCP load)", 100);
    let log = h.log();
    let closing = log
        .matches("Closing unused activated socket: unix://")
        .count();
    assert_eq!(
        closing, ROLLOUTS as usize,
        "each TCP-only Puma said it closed (and unlinked) the unix socket"
    );
    let restored = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("restored") && l.contains("app.sock"))
        .count();
    assert_eq!(
        restored, ROLLOUTS as usize,
        "one `restored` warning per Puma that unlinked app.sock"
    );

    // The restored path leads to holdfast's own socket: a request queued
    // there now, while no Puma accepts on it, is answered by the next
    // generation, which binds nothing of its own.
    let mut queued = UnixStream::connect(&path).expect("connect to the restored app.sock");
    queued
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("write the queued request");
    queued.set_read_timeout(Some(READY)).expect("read timeout");
    h.rewrite_config(&puma_two_listeners(r#""--bind-to-activated-sockets=only""#));
    h.signal(Signal::SIGHUP);
    let last = ROLLOUTS + 2;
    wait_rollout_finished(&h, last);
    let mut answer = String::new();
    queued
        .read_to_string(&mut answer)
        .expect("read the answer to the queued request");
    let pid = generation_pids(&h.log(), last)[0];
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains(&format!("pid={pid}")),
        "the queued request was not answered by generation {last} (pid {pid}): {answer:?}"
    );
    assert!(!h.log().contains(NO_SOCKET), "Puma holds the TCP socket");
    stop(&mut h, "killed by SIGTERM");
}

/// One unix listener (mode 0666, so a proxy's unprivileged workers can
/// connect) served by Puma on every inherited socket.
fn puma_on_unix() -> String {
    format!(
        r#"
[[listen]]
name = "unix"
address = "unix:{{dir}}/app.sock"
mode = "0666"

[app]
command = ["puma", "-C", "puma.rb", "--bind-to-activated-sockets=only", "-t", "32:32", "config.ru"]
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
    )
}

#[test]
fn nginx_in_front_of_puma_on_a_unix_socket() {
    require_puma();
    require("nginx", "nginx");
    let mut h = Holdfast::start(&puma_on_unix());
    wait_all_ready(&h);
    let proxy = nginx_proxy(&h);
    let rolled = rollouts_under_load_n(&h, load_mix(proxy.target()), PROXY_ROLLOUTS, |_| {});
    rolled.assert_clean("nginx -> puma", 100);
    drop(proxy);
    finish(&mut h, "killed by SIGTERM");
}

// ---------------------------------------------------------------------------
// 7: Apache in front

#[test]
fn apache_in_front_of_puma_on_a_unix_socket() {
    require_puma();
    require("apache2", "apache2");
    let mut h = Holdfast::start(&puma_on_unix());
    wait_all_ready(&h);
    let proxy = apache_proxy(&h);
    let rolled = rollouts_under_load_n(&h, load_mix(proxy.target()), PROXY_ROLLOUTS, |_| {});
    rolled.assert_clean("apache -> puma", 100);
    drop(proxy);
    finish(&mut h, "killed by SIGTERM");
}

// ---------------------------------------------------------------------------
// Front proxies: examples/nginx.conf and examples/apache.conf as they are,
// with only the socket path and the port replaced, run by the shared
// private-instance helper (tests/common/proxy.rs).

/// nginx with examples/nginx.conf in front of `{dir}/app.sock`, on
/// 127.0.0.1:`{port2}`.
fn nginx_proxy(h: &Holdfast) -> Proxy {
    let dir = proxy_dir(h.dir.path(), "nginx");
    let site = fs::read_to_string(examples_dir().join("nginx.conf")).expect("examples/nginx.conf");
    let site = replace_once(&site, "listen 80;", "listen 127.0.0.1:{port};");
    let sock = h.dir.path().join("app.sock");
    let site = replace_once(
        &site,
        "server unix:/run/holdfast/app.sock;",
        &format!("server unix:{};", sock.display()),
    );
    assert!(
        !site.contains("/run/holdfast/app.sock"),
        "nginx.conf: one upstream server, nginx's default retries (tests/proxies.rs)"
    );
    let proxy = Proxy::nginx(&dir, h.port2, &site);
    proxy.wait_serving("/", READY);
    proxy
}

/// Apache with examples/apache.conf in front of `{dir}/app.sock`, on
/// 127.0.0.1:`{port2}`.
fn apache_proxy(h: &Holdfast) -> Proxy {
    let dir = proxy_dir(h.dir.path(), "apache");
    let site =
        fs::read_to_string(examples_dir().join("apache.conf")).expect("examples/apache.conf");
    let site = replace_once(&site, "<VirtualHost *:80>", "<VirtualHost *:{port}>");
    let sock = h.dir.path().join("app.sock");
    let site = replace_once(
        &site,
        "\"unix:/run/holdfast/app.sock|http://holdfast/\"",
        &format!("\"unix:{}|http://holdfast/\"", sock.display()),
    );
    let proxy = Proxy::apache(&dir, h.port2, &["proxy", "proxy_http"], &site);
    proxy.wait_serving("/", READY);
    proxy
}
