//! The foundation (issue 3), proven with the real binary and the test worker:
//! what a worker inherits (fds, environment, handoff conventions), that every
//! kind of listener serves, crash replacement, clean shutdown, and the exit
//! codes and messages of every start-up failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{http_get, pid_alive, run_holdfast, wait_until, Holdfast, Target, DEADLINE};
use nix::sys::signal::Signal;
use serde_json::Value;

/// `(slot, pid, generation)` of every `worker spawned` line, in log order.
fn spawned(h: &Holdfast) -> Vec<(u32, u32, u64)> {
    h.log()
        .lines()
        .filter(|l| l.contains("worker spawned"))
        .filter_map(|l| {
            Some((
                field(l, "slot")?.parse().ok()?,
                field(l, "pid")?.parse().ok()?,
                field(l, "generation")?.parse().ok()?,
            ))
        })
        .collect()
}

/// The value of `key=value` in a tracing line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
}

/// GETs `/inherited` until `n` distinct workers answered; their JSON by pid.
fn inherited_of_workers(target: &Target, n: usize) -> BTreeMap<u32, Value> {
    let mut seen = BTreeMap::new();
    let mut asked = 0u32;
    wait_until(
        DEADLINE,
        &format!("{n} distinct workers on {target}"),
        || {
            asked += 1;
            let resp = http_get(target, "/inherited")
                .unwrap_or_else(|e| panic!("GET /inherited on {target} (request {asked}): {e}"));
            assert_eq!(resp.status, 200, "GET /inherited: {}", resp.body_str());
            let pid = resp.pid().expect("X-Pid header");
            let json: Value = serde_json::from_slice(&resp.body)
                .unwrap_or_else(|e| panic!("/inherited is not JSON ({e}): {}", resp.body_str()));
            seen.insert(pid, json);
            (seen.len() >= n).then(|| seen.clone())
        },
    )
}

/// `/inherited`'s env as a map.
fn env_of(json: &Value) -> BTreeMap<String, String> {
    json["env"]
        .as_object()
        .expect("env object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("env value string").to_string()))
        .collect()
}

fn fds_of(json: &Value) -> Vec<i64> {
    json["fds"]
        .as_array()
        .expect("fds array")
        .iter()
        .map(|v| v.as_i64().expect("fd number"))
        .collect()
}

fn socket_of(json: &Value, fd: u32) -> String {
    json["sockets"][fd.to_string()]
        .as_str()
        .unwrap_or_else(|| panic!("no socket description for fd {fd}: {json}"))
        .to_string()
}

/// The body of `GET /` through `target`: `pid=.. slot=.. gen=.. n=..`.
fn get_root(target: &Target) -> String {
    let resp = http_get(target, "/").unwrap_or_else(|e| panic!("GET / on {target}: {e}"));
    assert_eq!(resp.status, 200, "GET / on {target}: {}", resp.body_str());
    let body = resp.body_str();
    assert!(body.starts_with("pid="), "GET / on {target}: {body}");
    body
}

#[test]
fn workers_inherit_exactly_the_listeners_and_the_default_handoff_env() {
    let h = Holdfast::start(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[[listen]]
address = "unix:{dir}/app.sock"

[app]
command = ["{test_worker}"]
workers = 2
"#,
    );
    h.wait_log("all workers ready");
    let sock = h.dir.path().join("app.sock");
    let by_pid = inherited_of_workers(&h.tcp(), 2);
    let mut slots = BTreeSet::new();
    for (pid, json) in &by_pid {
        assert_eq!(fds_of(json), vec![0, 1, 2, 3, 4], "worker {pid}: {json}");
        assert_eq!(
            socket_of(json, 3),
            format!("tcp:127.0.0.1:{} listening", h.port),
            "worker {pid}"
        );
        assert_eq!(
            socket_of(json, 4),
            format!("unix:{} listening", sock.display()),
            "worker {pid}"
        );
        let mut env = env_of(json);
        let notify = env.remove("NOTIFY_SOCKET").expect("NOTIFY_SOCKET set");
        assert!(notify.ends_with("notify.sock"), "NOTIFY_SOCKET={notify}");
        let slot = env
            .remove("HOLDFAST_WORKER_ID")
            .expect("HOLDFAST_WORKER_ID");
        slots.insert(slot);
        let want: BTreeMap<String, String> = [
            ("LISTEN_FDS", "2".to_string()),
            ("LISTEN_PID", pid.to_string()),
            ("LISTEN_FDNAMES", "http:listen1".to_string()),
            (
                "SERVER_STARTER_PORT",
                format!("127.0.0.1:{}=3;{}=4", h.port, sock.display()),
            ),
            ("EINHORN_FD_COUNT", "2".to_string()),
            ("EINHORN_FD_0", "3".to_string()),
            ("EINHORN_FD_1", "4".to_string()),
            ("HOLDFAST_GENERATION", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // Exactly these: in particular no UNICORN_FD by default.
        assert_eq!(env, want, "worker {pid} environment");
    }
    assert_eq!(
        slots,
        BTreeSet::from(["0".to_string(), "1".to_string()]),
        "one worker per slot"
    );
    // The workers that answered are the ones holdfast spawned.
    let logged: BTreeSet<u32> = spawned(&h).iter().map(|s| s.1).collect();
    assert_eq!(logged, by_pid.keys().copied().collect::<BTreeSet<_>>());
    // Both listeners serve.
    get_root(&h.tcp());
    get_root(&h.unix("app.sock"));
}

#[test]
fn unicorn_handoff_gives_unicorn_fd_and_no_listen_fds() {
    let h = Holdfast::start(
        r#"
[[listen]]
address = "127.0.0.1:{port}"

[[listen]]
address = "unix:{dir}/app.sock"

[app]
command = ["{test_worker}", "--unicorn-fd"]
handoff = ["unicorn"]
workers = 1
"#,
    );
    h.wait_log("all workers ready");
    let by_pid = inherited_of_workers(&h.unix("app.sock"), 1);
    let (pid, json) = by_pid.iter().next().expect("one worker");
    assert_eq!(fds_of(json), vec![0, 1, 2, 3, 4], "worker {pid}: {json}");
    let env = env_of(json);
    let keys: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "UNICORN_FD",
            "NOTIFY_SOCKET",
            "HOLDFAST_WORKER_ID",
            "HOLDFAST_GENERATION"
        ]),
        "worker {pid}: only UNICORN_FD of the handoff conventions: {env:?}"
    );
    assert_eq!(env["UNICORN_FD"], "3,4");
    get_root(&h.tcp());
}

#[test]
fn ipv6_loopback_listener_serves() {
    // The test needs ::1; a machine without it is a broken test machine, not a pass.
    let probe = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap_or_else(|e| {
        panic!("this test needs the IPv6 loopback address ::1, and binding [::1]:0 failed: {e}")
    });
    let port = probe.local_addr().expect("local_addr").port();
    drop(probe);
    let h = Holdfast::start(&format!(
        r#"
[[listen]]
address = "[::1]:{port}"

[app]
command = ["{{test_worker}}"]
workers = 1
"#
    ));
    h.wait_log("all workers ready");
    let target = Target::Tcp(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    let by_pid = inherited_of_workers(&target, 1);
    let json = by_pid.values().next().expect("one worker");
    assert_eq!(socket_of(json, 3), format!("tcp:[::1]:{port} listening"));
    assert_eq!(
        env_of(json)["SERVER_STARTER_PORT"],
        format!("[::1]:{port}=3")
    );
    get_root(&target);
}

#[test]
fn somaxconn_warning_names_the_listener_above_it_and_no_other() {
    let max: u32 = fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("read /proc/sys/net/core/somaxconn")
        .trim()
        .parse()
        .expect("somaxconn is a number");
    let h = Holdfast::start(&format!(
        r#"
[[listen]]
name = "above"
address = "127.0.0.1:{{port}}"
backlog = {above}

[[listen]]
name = "at"
address = "127.0.0.1:{{port2}}"
backlog = {max}

[app]
command = ["{{test_worker}}"]
workers = 1
"#,
        above = max + 1
    ));
    h.wait_log("all workers ready");
    let log = h.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("somaxconn")).collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, for the listener above somaxconn:\n{log}"
    );
    let w = warnings[0];
    assert!(w.contains("WARN"), "{w}");
    assert!(w.contains(&format!("127.0.0.1:{}", h.port)), "{w}");
    assert!(w.contains(&format!("backlog {}", max + 1)), "{w}");
    assert!(w.contains(&format!("net.core.somaxconn = {max}")), "{w}");
    assert!(
        w.contains(&format!("sysctl -w net.core.somaxconn={}", max + 1)),
        "{w}"
    );
    // Both serve regardless.
    get_root(&h.tcp());
    get_root(&Target::local(h.port2));
}

#[test]
fn a_killed_worker_is_replaced_in_the_same_slot() {
    let h = Holdfast::start(
        r#"
[[listen]]
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}"]
workers = 2
"#,
    );
    h.wait_log("all workers ready");
    let by_pid = inherited_of_workers(&h.tcp(), 2);
    let (&victim, json) = by_pid.iter().next().expect("a worker");
    let slot = env_of(json)["HOLDFAST_WORKER_ID"].clone();
    let survivor = *by_pid.keys().find(|p| **p != victim).expect("other worker");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
        .expect("kill -9 worker");
    h.wait_log(&format!(
        "pid={victim} generation=1 reason=killed by SIGKILL"
    ));
    let (new_slot, new_pid, generation) = wait_until(DEADLINE, "a replacement worker", || {
        spawned(&h).get(2).copied()
    });
    assert_eq!(
        new_slot.to_string(),
        slot,
        "replacement takes the same slot"
    );
    assert_ne!(new_pid, victim);
    assert_eq!(generation, 1, "a crash replacement keeps the generation");
    h.wait_log(&format!("worker ready slot={slot} pid={new_pid}"));
    assert!(!pid_alive(victim), "killed worker {victim} was reaped");
    // The replacement answers with its own pid and the slot of the one it replaced.
    let by_pid = inherited_of_workers(&h.tcp(), 2);
    assert_eq!(
        by_pid.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([survivor, new_pid])
    );
    let env = env_of(&by_pid[&new_pid]);
    assert_eq!(env["HOLDFAST_WORKER_ID"], slot);
    assert_eq!(env["LISTEN_PID"], new_pid.to_string());
    assert_eq!(spawned(&h).len(), 3, "exactly one replacement");
}

/// Every descendant of `pid` (from /proc/PID/task/*/children).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

#[test]
fn sigterm_stops_everything_and_exits_0() {
    let mut h = Holdfast::start(
        r#"
[[listen]]
address = "127.0.0.1:{port}"

[[listen]]
address = "unix:{dir}/app.sock"

[app]
command = ["{test_worker}", "--children", "1"]
workers = 3
"#,
    );
    h.wait_log("all workers ready");
    get_root(&h.tcp());
    let workers: Vec<u32> = spawned(&h).iter().map(|s| s.1).collect();
    assert_eq!(workers.len(), 3);
    // Each worker's helper child too: nothing of the tree may outlive holdfast.
    let tree = wait_until(DEADLINE, "each worker's child process", || {
        let all = descendants(h.pid());
        (all.len() >= 6).then_some(all)
    });
    for w in &workers {
        assert!(tree.contains(w), "worker {w} is holdfast's child: {tree:?}");
    }
    let sock = h.dir.path().join("app.sock");
    let keeper = h.dir.path().join(".app.sock.holdfast");
    assert!(fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()));
    assert!(keeper.exists(), "holdfast keeps a hard link to its socket");

    h.signal(Signal::SIGTERM);
    let status = h.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "exit status {status}\n{}", h.log());
    let alive: Vec<u32> = tree
        .iter()
        .copied()
        .chain([h.pid()])
        .filter(|p| pid_alive(*p))
        .collect();
    assert!(
        alive.is_empty(),
        "still alive after holdfast exited: {alive:?}"
    );
    let log = h.log();
    for w in &workers {
        assert!(
            log.contains(&format!("pid={w} generation=1 reason=exit status 0")),
            "worker {w} drained and exited 0:\n{log}"
        );
    }
    assert!(log.contains("holdfast exiting code=0"), "{log}");
    // holdfast removes its own socket files on exit.
    assert!(!sock.exists(), "{} left behind", sock.display());
    assert!(!keeper.exists(), "{} left behind", keeper.display());
}

/// Writes `text` as `{dir}/NAME.toml` and returns its path.
fn write_config(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).expect("write config");
    path
}

/// Runs `holdfast ARGS` and returns (exit code, stderr).
fn run_for_code(args: &[&str]) -> (Option<i32>, String) {
    let out = run_holdfast(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_exit_78_with_file_line_and_column() {
    let dir = tempfile::tempdir().expect("temp dir");
    // (name, config, "line:col", what the message must also say)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "unknown_key",
            "[[listen]]\naddress = \"127.0.0.1:8080\"\n\n[app]\ncommand = [\"true\"]\nworker = 2\n",
            "6:1",
            &["unknown field `worker`", "did you mean `workers`? (in [app])"],
        ),
        (
            "wrong_type",
            "[[listen]]\naddress = \"127.0.0.1:8080\"\n\n[app]\ncommand = [\"true\"]\nworkers = \"two\"\n",
            "6:11",
            &["invalid type: string \"two\", expected a nonzero u32 (key `workers` in [app])"],
        ),
        (
            "missing_command",
            "[[listen]]\naddress = \"127.0.0.1:8080\"\n\n[app]\nworkers = 2\n",
            "4:1",
            &["missing field `command` (in [app])"],
        ),
        (
            "zero_workers",
            "[[listen]]\naddress = \"127.0.0.1:8080\"\n\n[app]\ncommand = [\"true\"]\nworkers = 0\n",
            "6:11",
            &["integer `0`, expected a nonzero u32 (key `workers` in [app])"],
        ),
        (
            "bad_address",
            "[[listen]]\naddress = \"localhost\"\n\n[app]\ncommand = [\"true\"]\n",
            "2:11",
            &["`localhost`", "host:port", "(key `address` in [[listen]])"],
        ),
        (
            "port_out_of_range",
            "[[listen]]\naddress = \"127.0.0.1:99999\"\n\n[app]\ncommand = [\"true\"]\n",
            "2:11",
            &["port 99999", "out of range", "(key `address` in [[listen]])"],
        ),
    ];
    let mut problems = Vec::new();
    for (name, text, pos, needles) in cases {
        let path = write_config(dir.path(), name, text);
        let path_s = path.to_str().expect("utf-8 path");
        for args in [
            vec!["check", "--config", path_s],
            vec!["run", "--config", path_s],
        ] {
            let (code, stderr) = run_for_code(&args);
            let at = format!("{path_s}:{pos}:");
            let mut missing: Vec<&str> = needles
                .iter()
                .copied()
                .filter(|n| !stderr.contains(n))
                .collect();
            if !stderr.contains(&at) {
                missing.push(&at);
            }
            if code != Some(78) || !missing.is_empty() {
                problems.push(format!(
                    "{name}: `holdfast {}` exited {code:?} (want 78), message lacks {missing:?}:\n{stderr}",
                    args[0]
                ));
            }
            assert!(
                !stderr.contains("worker spawned"),
                "{name}: a bad config must start nothing:\n{stderr}"
            );
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_second_holdfast_on_the_same_addresses_exits_69_naming_the_address() {
    let h = Holdfast::start(
        r#"
[[listen]]
address = "127.0.0.1:{port}"

[[listen]]
address = "unix:{dir}/app.sock"

[app]
command = ["{test_worker}"]
"#,
    );
    h.wait_log("all workers ready");
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = h.dir.path().join("app.sock");
    let tcp = write_config(
        dir.path(),
        "tcp",
        &h.fill(
            "[[listen]]\naddress = \"127.0.0.1:{port}\"\n[app]\ncommand = [\"{test_worker}\"]\n",
        ),
    );
    let (code, stderr) = run_for_code(&["run", "--config", tcp.to_str().expect("utf-8")]);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!("bind 127.0.0.1:{}", h.port))
            && stderr.contains("Address already in use"),
        "{stderr}"
    );
    let unix = write_config(
        dir.path(),
        "unix",
        &h.fill(
            "[[listen]]\naddress = \"unix:{dir}/app.sock\"\n[app]\ncommand = [\"{test_worker}\"]\n",
        ),
    );
    let (code, stderr) = run_for_code(&["run", "--config", unix.to_str().expect("utf-8")]);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another process is already listening on {}",
            sock.display()
        )),
        "{stderr}"
    );
    // The failed attempts took nothing from the first one.
    assert!(fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()));
    get_root(&h.tcp());
    get_root(&h.unix("app.sock"));
}

#[test]
fn a_command_that_does_not_exist_exits_78_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(
        dir.path(),
        "missing",
        "[[listen]]\naddress = \"127.0.0.1:0\"\n[app]\ncommand = [\"holdfast-no-such-program\", \"--flag\"]\nworkers = 2\n",
    );
    let started = Instant::now();
    let (code, stderr) = run_for_code(&["run", "--config", path.to_str().expect("utf-8")]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("exec holdfast-no-such-program: not found in PATH"),
        "{stderr}"
    );
    for never in ["worker spawned", "restart", "crashed"] {
        assert!(
            !stderr.contains(never),
            "no respawn loop ({never}):\n{stderr}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_stale_unix_socket_file_is_replaced_and_a_regular_file_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("app.sock");
    // A socket file nobody listens on, as a crashed server leaves it.
    drop(UnixListener::bind(&sock).expect("bind a socket to leave behind"));
    assert!(fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()));
    let mut h = Holdfast::start(&format!(
        "[[listen]]\naddress = \"unix:{}\"\n[app]\ncommand = [\"{{test_worker}}\"]\n",
        sock.display()
    ));
    h.wait_log("all workers ready");
    let line = h.wait_log("removing stale unix socket");
    assert!(line.contains(&sock.display().to_string()), "{line}");
    get_root(&Target::Unix(sock.clone()));
    h.signal(Signal::SIGTERM);
    assert_eq!(h.wait_exit(DEADLINE).code(), Some(0));
    assert!(!sock.exists(), "holdfast removes its socket file on exit");

    // A regular file at the path is not holdfast's to remove.
    fs::write(&sock, "not a socket\n").expect("write a regular file");
    let config = write_config(
        dir.path(),
        "plain",
        &format!(
            "[[listen]]\naddress = \"unix:{}\"\n[app]\ncommand = [\"true\"]\n",
            sock.display()
        ),
    );
    let (code, stderr) = run_for_code(&["run", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "bind unix:{0}: {0} exists and is not a socket; not removing it",
            sock.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        fs::read_to_string(&sock).expect("the file is still there"),
        "not a socket\n"
    );
}

#[test]
fn command_line_form_runs_without_a_config_file() {
    let h = Holdfast::start_args(
        &[
            "run",
            "--listen",
            "127.0.0.1:{port}",
            "--listen",
            "unix:{dir}/cli.sock",
            "--workers",
            "2",
            "--",
            "{test_worker}",
        ],
        None,
    );
    h.wait_log("all workers ready");
    let by_pid = inherited_of_workers(&h.tcp(), 2);
    for (pid, json) in &by_pid {
        let env = env_of(json);
        assert_eq!(env["LISTEN_FDS"], "2", "worker {pid}");
        assert_eq!(env["LISTEN_PID"], pid.to_string());
        assert_eq!(env["LISTEN_FDNAMES"], "listen0:listen1");
    }
    get_root(&h.unix("cli.sock"));
}
