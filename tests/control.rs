//! The control socket, the CLI commands and `/metrics`, against the real
//! binary: every command in both output forms, `restart --wait` on success and
//! failure, the drain and the accept queue made visible, protocol abuse, and
//! a Prometheus scrape with curl.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, pid_alive, wait_until, Holdfast, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

fn config(workers: u32, extra_app: &str) -> String {
    format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"
backlog = 64

[[listen]]
name = "sock"
address = "unix:app.sock"
backlog = 32

[app]
command = ["{{test_worker}}"]
workers = {workers}
ready_timeout = "30s"
drain_timeout = "30s"
{extra_app}
"#
    )
}

fn start(workers: u32) -> Holdfast {
    let h = Holdfast::start(&config(workers, ""));
    h.wait_log_count("worker ready", workers as usize);
    h
}

fn sock(h: &Holdfast) -> PathBuf {
    h.dir.path().join("holdfast.sock")
}

fn text(o: &Output) -> String {
    common::describe(o)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `holdfast ARGS --config {config}` and asserts its exit code.
fn cli(h: &Holdfast, args: &[&str], want: i32) -> Output {
    let mut all = args.to_vec();
    all.extend(["--config", "{config}"]);
    let o = h.cli(&all);
    assert_eq!(
        o.status.code(),
        Some(want),
        "holdfast {args:?}: {}",
        text(&o)
    );
    o
}

fn status(h: &Holdfast) -> Value {
    let o = cli(h, &["status", "--json"], 0);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {}", text(&o)))
}

/// (pid, state, connections) of every worker.
fn workers(s: &Value) -> Vec<(u32, String, Option<u64>)> {
    s["workers"]
        .as_array()
        .expect("workers array")
        .iter()
        .map(|w| {
            (
                w["pid"].as_u64().map_or(0, |p| p as u32),
                w["state"].as_str().unwrap_or("").to_string(),
                w["connections"].as_u64(),
            )
        })
        .collect()
}

fn ready_pids(s: &Value) -> BTreeSet<u32> {
    workers(s)
        .into_iter()
        .filter(|(_, state, _)| state == "ready")
        .map(|(p, _, _)| p)
        .collect()
}

fn listener<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("listener {name} in {s}"))
}

/// Runs `cmd` to completion within [`DEADLINE`], killing it after.
fn run_bounded(mut cmd: Command) -> Output {
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(o) => o.unwrap_or_else(|e| panic!("{desc}: {e}")),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("{desc} still running after {DEADLINE:?}");
        }
    }
}

fn holdfast_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_holdfast"));
    c.env_remove("HOLDFAST_CONTROL");
    c
}

/// One request line on a fresh connection; returns the response line parsed.
fn raw_request(path: &Path, line: &[u8]) -> Value {
    let mut s = UnixStream::connect(path).expect("connect control socket");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s.write_all(line).expect("write request");
    read_response(&mut BufReader::new(s))
}

fn read_response(r: &mut impl BufRead) -> Value {
    let mut reply = String::new();
    r.read_line(&mut reply).expect("read response");
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("response {reply:?}: {e}"))
}

#[test]
fn every_command_in_both_output_forms() {
    let mut h = start(2);
    let first: BTreeSet<u32> = h.worker_pids().into_iter().collect();

    // status: the table, then JSON.
    let o = cli(&h, &["status"], 0);
    let table = stdout(&o);
    assert!(
        table.contains(&format!("pid {}", h.pid())),
        "table: {table}"
    );
    for needle in [
        "holdfast 0.1.0",
        "generation 1",
        "no rollout in progress",
        "SLOT",
        "CONNS",
        "ACCEPT QUEUE",
        "ListenOverflows",
        "replacements:",
        "log reopens 0",
    ] {
        assert!(table.contains(needle), "{needle:?} missing in:\n{table}");
    }
    for pid in &first {
        assert!(
            table.contains(&pid.to_string()),
            "pid {pid} missing:\n{table}"
        );
    }
    let s = status(&h);
    assert_eq!(s["holdfast"]["pid"].as_u64(), Some(u64::from(h.pid())));
    assert_eq!(s["holdfast"]["generation"].as_u64(), Some(1));
    assert_eq!(ready_pids(&s), first);
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .expect("number");
    let http = listener(&s, "http");
    assert_eq!(http["accept_queue"].as_u64(), Some(0));
    assert_eq!(http["accept_queue_max"].as_u64(), Some(64.min(somaxconn)));
    let unix = listener(&s, "sock");
    assert_eq!(unix["accept_queue"].as_u64(), Some(0));
    assert_eq!(unix["accept_queue_max"].as_u64(), Some(32.min(somaxconn)));
    for w in s["workers"].as_array().expect("workers") {
        assert_eq!(w["connections"].as_u64(), Some(0), "{w}");
        assert!(w["memory"]["rss_bytes"].as_u64().unwrap_or(0) > 0, "{w}");
        assert_eq!(w["memory"]["metric"], "pss", "{w}");
    }

    // scale, both forms.
    let o = cli(&h, &["scale", "3"], 0);
    assert_eq!(stdout(&o).trim(), "scaled to 3 workers");
    wait_until(DEADLINE, "3 ready workers", || {
        (ready_pids(&status(&h)).len() == 3).then_some(())
    });
    let o = cli(&h, &["scale", "2", "--json"], 0);
    let r: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["v"], 1, "{r}");
    assert_eq!(r["message"], "scaled to 2 workers");
    wait_until(DEADLINE, "2 workers", || {
        (workers(&status(&h)).len() == 2).then_some(())
    });

    // restart without --wait: returns once the rollout started.
    let o = cli(&h, &["restart"], 0);
    assert_eq!(stdout(&o).trim(), "rollout of generation 2 started");
    h.wait_log("rollout finished generation=2");
    // restart --wait --json: returns when it is done.
    let o = cli(&h, &["restart", "--wait", "--json"], 0);
    let r: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(r["ok"], true, "{r}");
    let m = r["message"].as_str().unwrap_or("");
    assert!(m.starts_with("generation 3 is serving"), "{r}");
    let s = status(&h);
    assert_eq!(s["holdfast"]["generation"].as_u64(), Some(3));
    assert_eq!(s["holdfast"]["last_rollout"]["ok"], true);
    assert_eq!(s["counters"]["replacements"]["rollout"].as_u64(), Some(4));
    let now = ready_pids(&s);
    assert_eq!(now.len(), 2);
    assert!(now.is_disjoint(&first), "{now:?} vs {first:?}");
    // restart --wait, text form.
    let o = cli(&h, &["restart", "--wait"], 0);
    assert!(
        stdout(&o).starts_with("generation 4 is serving"),
        "{}",
        text(&o)
    );

    // reopen-logs: no [logs] in this config, so it fails with the reason.
    let o = cli(&h, &["reopen-logs"], 1);
    assert!(stderr(&o).contains("[logs]"), "{}", text(&o));
    let o = cli(&h, &["reopen-logs", "--json"], 1);
    let r: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (r["ok"].as_bool(), r["kind"].as_str()),
        (Some(false), Some("failed")),
        "{r}"
    );

    // Usage errors.
    cli(&h, &["scale", "0"], 64);
    cli(&h, &["status", "--no-such-flag"], 64);

    // stop (no wait), JSON form: returns at once, holdfast then exits 0.
    let o = cli(&h, &["stop", "--json"], 0);
    let r: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["message"].as_str().unwrap_or("").starts_with("stopping"),
        "{r}"
    );
    assert_eq!(r["pid"].as_u64(), Some(u64::from(h.pid())));
    let st = h.wait_exit(DEADLINE);
    assert_eq!(st.code(), Some(0));
    assert!(!sock(&h).exists(), "control socket left behind");
    // Not running: 69, naming the socket.
    let o = cli(&h, &["status"], 69);
    assert!(
        stderr(&o).contains("not running") && stderr(&o).contains(&sock(&h).display().to_string()),
        "{}",
        text(&o)
    );
    cli(&h, &["status", "--json"], 69);
}

#[test]
fn stop_wait_returns_after_holdfast_exited() {
    for json in [false, true] {
        let mut h = start(1);
        let pids = h.worker_pids();
        let mut args = vec!["stop", "--wait"];
        if json {
            args.push("--json");
        }
        let o = cli(&h, &args, 0);
        // holdfast has exited (maybe not yet reaped by us): not alive.
        assert!(
            !pid_alive(h.pid()),
            "holdfast still alive after stop --wait"
        );
        for p in pids {
            assert!(!pid_alive(p), "worker {p} still alive");
        }
        if json {
            let r: Value = serde_json::from_slice(&o.stdout).expect("json");
            assert_eq!(
                (r["ok"].as_bool(), r["message"].as_str()),
                (Some(true), Some("stopped"))
            );
        } else {
            assert_eq!(stdout(&o), "stopped\nholdfast exited\n");
        }
        assert_eq!(h.wait_exit(Duration::from_secs(5)).code(), Some(0));
        assert!(!sock(&h).exists());
    }
}

#[test]
fn restart_wait_fails_with_the_reason_when_the_new_generation_dies() {
    let h = start(2);
    let before = ready_pids(&status(&h));
    h.rewrite_config(&config(2, "").replace(
        r#"command = ["{test_worker}"]"#,
        r#"command = ["{test_worker}", "--exit-at-start", "7"]"#,
    ));
    let o = cli(&h, &["restart", "--wait"], 1);
    let err = stderr(&o);
    assert!(
        err.contains("rollout of generation 2 failed") && err.contains("exit status 7"),
        "{}",
        text(&o)
    );
    let s = status(&h);
    assert_eq!(ready_pids(&s), before, "the old workers must keep serving");
    assert_eq!(s["holdfast"]["last_rollout"]["ok"], false);
    assert_eq!(
        s["holdfast"]["last_rollout"]["generation"].as_u64(),
        Some(2)
    );
    assert_eq!(s["counters"]["failed_rollouts"].as_u64(), Some(1));
    let table = stdout(&cli(&h, &["status"], 0));
    assert!(
        table.contains("last rollout: generation 2 FAILED"),
        "{table}"
    );

    // The same in JSON.
    let o = cli(&h, &["restart", "--wait", "--json"], 1);
    let r: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (r["ok"].as_bool(), r["kind"].as_str()),
        (Some(false), Some("failed")),
        "{r}"
    );
    assert!(
        r["error"].as_str().unwrap_or("").contains("exit status 7"),
        "{r}"
    );

    // A config that does not parse: refused at once, with or without --wait.
    std::fs::write(&h.config_path, "[app\n").expect("write config");
    for args in [&["restart"][..], &["restart", "--wait"][..]] {
        let o = h.cli(&[args, &["--control", "{dir}/holdfast.sock"]].concat());
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(stderr(&o).contains("reload rejected"), "{}", text(&o));
    }
    let o = h.cli(&["status", "--json", "--control", "{dir}/holdfast.sock"]);
    let s: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(ready_pids(&s), before);
}

/// Sends `GET PATH` on a keep-alive connection and reads the whole response
/// (by Content-Length); returns its head and body.
fn exchange(c: &mut BufReader<TcpStream>, path: &str) -> (String, String) {
    write!(
        c.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n"
    )
    .expect("send request");
    let mut head = String::new();
    loop {
        let mut line = String::new();
        c.read_line(&mut line).expect("read head");
        assert!(!line.is_empty(), "connection closed mid-head: {head:?}");
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("Content-Length");
    let mut body = vec![0; len];
    c.read_exact(&mut body).expect("read body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn status_shows_the_draining_worker_connections_falling() {
    // A long lame-duck period: the draining worker keeps idle keep-alive
    // connections until their clients leave, so every step below is exact.
    let h = Holdfast::start(&config(1, "").replace(
        r#"command = ["{test_worker}"]"#,
        r#"command = ["{test_worker}", "--lame-duck-ms", "60000"]"#,
    ));
    h.wait_log("worker ready");
    let old = h.worker_pids()[0];
    let mut conns: Vec<BufReader<TcpStream>> = (0..4)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", h.port)).expect("connect");
            s.set_read_timeout(Some(DEADLINE)).expect("timeout");
            let mut c = BufReader::new(s);
            let (head, _) = exchange(&mut c, "/");
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            c
        })
        .collect();
    wait_until(DEADLINE, "4 open connections on the worker", || {
        let w = workers(&status(&h));
        (w == vec![(old, "ready".to_string(), Some(4))]).then_some(())
    });
    let table = stdout(&cli(&h, &["status"], 0));
    assert!(table.contains("CONNS"), "{table}");

    cli(&h, &["restart"], 0);
    let draining = |n: u64| {
        wait_until(
            DEADLINE,
            &format!("draining worker {old} with {n} connections"),
            || {
                let w = workers(&status(&h));
                w.iter()
                    .any(|(p, state, c)| *p == old && state == "draining" && *c == Some(n))
                    .then_some(())
            },
        )
    };
    draining(4);
    // A request during the drain is served, then the worker closes the connection.
    let mut c = conns.remove(0);
    let (head, body) = exchange(&mut c, "/?sleep=200");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(body.contains(&format!("pid={old} ")), "{body}");
    draining(3);
    // Clients leaving.
    drop(conns.remove(0));
    draining(2);
    drop(conns.remove(0));
    draining(1);
    let mut last = conns.remove(0);
    let (head, _) = exchange(&mut last, "/?sleep=500");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The last connection closed: the old worker exits.
    h.wait_log(&format!("worker exited slot=0 pid={old}"));
    let w = workers(&status(&h));
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!((w[0].1.as_str(), w[0].2), ("ready", Some(0)), "{w:?}");
    assert_ne!(w[0].0, old);
}

/// SIGCONTs the pids it holds when dropped, so a failing test never leaves
/// stopped workers behind.
struct Continue(Vec<u32>);

impl Drop for Continue {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGCONT);
        }
    }
}

#[test]
fn accept_queue_rises_while_workers_are_stopped_and_falls_after() {
    let h = start(2);
    let pids = ready_pids(&status(&h));
    assert_eq!(pids.len(), 2);
    let guard = Continue(pids.iter().copied().collect());
    for p in &pids {
        kill(Pid::from_raw(*p as i32), Signal::SIGSTOP).expect("SIGSTOP worker");
    }
    let mut tcp = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(("127.0.0.1", h.port)).expect("connect tcp");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        tcp.push(s);
    }
    let mut unix = Vec::new();
    for _ in 0..3 {
        let mut s = UnixStream::connect(h.dir.path().join("app.sock")).expect("connect unix");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        unix.push(s);
    }
    let s = wait_until(DEADLINE, "accept queues 5 and 3", || {
        let s = status(&h);
        let q = |name| listener(&s, name)["accept_queue"].as_u64();
        (q("http") == Some(5) && q("sock") == Some(3)).then_some(s)
    });
    let table = stdout(&cli(&h, &["status"], 0));
    assert!(table.contains("5/64") && table.contains("3/32"), "{table}");
    assert_eq!(
        s["workers"].as_array().map(Vec::len),
        Some(2),
        "stopped workers are still workers"
    );
    drop(guard);
    wait_until(DEADLINE, "accept queues empty again", || {
        let s = status(&h);
        let q = |name| listener(&s, name)["accept_queue"].as_u64();
        (q("http") == Some(0) && q("sock") == Some(0)).then_some(())
    });
    for mut s in tcp {
        let mut body = String::new();
        s.read_to_string(&mut body).expect("tcp response");
        assert!(body.starts_with("HTTP/1.1 200"), "{body:?}");
    }
    for mut s in unix {
        let mut body = String::new();
        s.read_to_string(&mut body).expect("unix response");
        assert!(body.starts_with("HTTP/1.1 200"), "{body:?}");
    }
    assert_eq!(ready_pids(&status(&h)), pids);
}

#[test]
fn protocol_abuse_leaves_holdfast_and_workers_untouched() {
    let h = start(2);
    let path = sock(&h);
    let pids = ready_pids(&status(&h));
    let mode = std::fs::metadata(&path)
        .expect("stat socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    // A client that connects and never writes: it holds its connection while
    // everything else goes on, and is closed with an error line after 5 s.
    let silent = UnixStream::connect(&path).expect("connect");
    silent.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let silent_since = Instant::now();
    let silent = std::thread::spawn(move || {
        let r = read_response(&mut BufReader::new(silent));
        (r, silent_since.elapsed())
    });

    // Garbage, wrong version, unknown command, a partial line then EOF.
    for (line, want) in [
        (&b"garbage\n"[..], "not a JSON request line"),
        (
            b"{\"v\":2,\"cmd\":\"status\"}\n",
            "unsupported protocol version 2",
        ),
        (b"{\"v\":1,\"cmd\":\"explode\"}\n", "unknown variant"),
        (b"\x00\xff\xfe\n", "not a JSON request line"),
    ] {
        let r = raw_request(&path, line);
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["kind"], "bad_request", "{r}");
        assert!(r["error"].as_str().unwrap_or("").contains(want), "{r}");
    }
    let mut half = UnixStream::connect(&path).expect("connect");
    half.set_read_timeout(Some(DEADLINE)).expect("timeout");
    half.write_all(b"{\"v\":1,").expect("write");
    half.shutdown(Shutdown::Write).expect("shutdown");
    let r = read_response(&mut BufReader::new(half));
    assert_eq!(r["kind"], "bad_request", "{r}");
    // A complete request without its newline, then EOF, is answered.
    let mut half = UnixStream::connect(&path).expect("connect");
    half.set_read_timeout(Some(DEADLINE)).expect("timeout");
    half.write_all(b"{\"v\":1,\"cmd\":\"status\"}")
        .expect("write");
    half.shutdown(Shutdown::Write).expect("shutdown");
    let r = read_response(&mut BufReader::new(half));
    assert_eq!(r["ok"], true, "{r}");

    // A 10 MB line: refused after 64 KiB, connection closed.
    let big = UnixStream::connect(&path).expect("connect");
    big.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut writer = big.try_clone().expect("clone");
    let w = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..10 {
            if writer.write_all(&chunk).is_err() {
                return false;
            }
        }
        true
    });
    let mut reader = BufReader::new(big);
    let r = read_response(&mut reader);
    assert_eq!(r["kind"], "bad_request", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("longer than 65536"),
        "{r}"
    );
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(rest.is_empty(), "more after the error: {}", rest.len());
    assert!(!w.join().expect("writer"), "all 10 MB were accepted");

    // Several requests on one connection.
    let mut c = UnixStream::connect(&path).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    c.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n{\"v\":1,\"cmd\":\"scale\",\"workers\":2}\n")
        .expect("write");
    let mut c = BufReader::new(c);
    assert_eq!(read_response(&mut c)["ok"], true);
    assert_eq!(read_response(&mut c)["message"], "scaled to 2 workers");

    // 200 clients at once, all answered.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(200));
    let clients: Vec<_> = (0..200)
        .map(|_| {
            let path = path.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&path).map_err(|e| e.to_string())?;
                barrier.wait();
                s.set_read_timeout(Some(DEADLINE))
                    .map_err(|e| e.to_string())?;
                s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n")
                    .map_err(|e| e.to_string())?;
                let mut line = String::new();
                BufReader::new(s)
                    .read_line(&mut line)
                    .map_err(|e| e.to_string())?;
                let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
                Ok::<usize, String>(v["status"]["workers"].as_array().map_or(0, Vec::len))
            })
        })
        .collect();
    let results: Vec<Result<usize, String>> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let ok = results.iter().filter(|r| **r == Ok(2)).count();
    assert_eq!(
        ok,
        200,
        "failures: {:?}",
        results
            .iter()
            .filter(|r| **r != Ok(2))
            .take(5)
            .collect::<Vec<_>>()
    );

    // The silent client got its error line about 5 s after it connected.
    let (r, waited) = silent.join().expect("silent client");
    assert_eq!(r["kind"], "bad_request", "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("no complete request line"),
        "{r}"
    );
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(15),
        "silent client closed after {waited:?}"
    );

    // Another uid. The temp dir is 0700: let nobody traverse it, so that it is
    // the socket's own 0600 that refuses the connect.
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod dir");
    let as_nobody = || {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_holdfast"))
            .args(["status", "--control"])
            .arg(&path)
            .env_remove("HOLDFAST_CONTROL");
        run_bounded(c)
    };
    let o = as_nobody();
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(stderr(&o).contains("permission denied"), "{}", text(&o));
    // With the socket opened up, SO_PEERCRED refuses the peer.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let o = as_nobody();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(
        stderr(&o).contains("uid 65534 may not control holdfast"),
        "{}",
        text(&o)
    );
    h.wait_log("control connection refused");

    // holdfast is up, its workers untouched, and normal commands work.
    assert!(pid_alive(h.pid()));
    let s = status(&h);
    assert_eq!(ready_pids(&s), pids);
    assert_eq!(s["counters"]["replacements"]["crash"].as_u64(), Some(0));
    for p in &pids {
        assert!(pid_alive(*p));
    }
    let resp = http_get(&h.tcp(), "/").expect("request to a worker");
    assert_eq!(resp.status, 200);
    cli(&h, &["restart", "--wait"], 0);
}

#[test]
fn cli_finds_the_socket_by_flag_config_env_and_refuses_a_second_holdfast() {
    // A stale socket file where the control socket goes: replaced.
    let other = tempfile::tempdir().expect("tempdir");
    let ctl = other.path().join("ctl.sock");
    drop(std::os::unix::net::UnixListener::bind(&ctl).expect("bind stale"));
    assert!(ctl.exists());
    let cfg = format!(
        "control_socket = {:?}\n{}",
        ctl.display().to_string(),
        config(1, "")
    );
    let h = Holdfast::start(&cfg);
    h.wait_log("worker ready");
    h.wait_log("removing stale control socket");

    let run = |args: &[&str], env: Option<&Path>| {
        let mut c = holdfast_cmd();
        c.args(args.iter().map(|a| h.fill(a)));
        if let Some(e) = env {
            c.env("HOLDFAST_CONTROL", e);
        }
        run_bounded(c)
    };
    let missing = other.path().join("missing.sock");
    // --config names control_socket.
    let o = run(&["status", "--config", "{config}"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // --config beats the environment.
    let o = run(&["status", "--config", "{config}"], Some(&missing));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The environment alone.
    let o = run(&["status"], Some(&ctl));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // --control beats --config and the environment.
    let o = run(
        &[
            "status",
            "--control",
            missing.to_str().expect("utf-8"),
            "--config",
            "{config}",
        ],
        Some(&ctl),
    );
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    assert!(
        stderr(&o).contains(&missing.display().to_string()),
        "{}",
        text(&o)
    );
    // An unreadable --config: 78.
    let o = run(&["status", "--config", "{dir}/nope.toml"], None);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));

    // A second holdfast with the same control socket refuses to start.
    let cfg2 = cfg.replace("{port}", "{port2}");
    let mut second = Holdfast::start(&cfg2);
    let st = second.wait_exit(DEADLINE);
    assert_eq!(st.code(), Some(69), "{}", second.log());
    assert!(
        second.log().contains("another holdfast is running"),
        "{}",
        second.log()
    );
    // ... and leaves the first one's socket alone.
    let o = run(&["status", "--control", ctl.to_str().expect("utf-8")], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Checks the OpenMetrics text: HELP and TYPE for every family, every other
/// line `name{labels} value`, `# EOF` last. Returns (name+labels, value).
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF at the end");
    let mut helped = BTreeSet::new();
    let mut typed = BTreeSet::new();
    let mut samples = Vec::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            assert!(name_ok(name), "HELP name {line:?}");
            helped.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut f = rest.split(' ');
            let (name, kind) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            assert!(name_ok(name), "TYPE name {line:?}");
            assert!(
                [
                    "counter",
                    "gauge",
                    "info",
                    "histogram",
                    "summary",
                    "unknown"
                ]
                .contains(&kind),
                "TYPE {line:?}"
            );
            typed.insert(name.to_string());
        } else {
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample {line:?}"));
            let name = series.split('{').next().unwrap_or("");
            assert!(name_ok(name), "metric name in {line:?}");
            if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("labels in {line:?}"));
                for pair in inner.split("\",") {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("label {pair:?} in {line:?}"));
                    assert!(name_ok(k), "label name {k:?} in {line:?}");
                    assert!(v.starts_with('"'), "label value {v:?} in {line:?}");
                }
            }
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            let family = helped
                .iter()
                .filter(|f| name.starts_with(f.as_str()))
                .max_by_key(|f| f.len())
                .unwrap_or_else(|| panic!("sample {line:?} before its HELP"));
            assert!(typed.contains(family), "no TYPE for {family}");
            samples.push((series.to_string(), v));
        }
    }
    assert_eq!(helped, typed, "HELP and TYPE differ");
    samples
}

/// GET `url` asking for OpenMetrics, as a Prometheus scrape does (without
/// the header, `/metrics` answers in Prometheus's 0.0.4 text format:
/// `tests/ops.rs` checks that with `promtool`).
fn curl(url: &str) -> Output {
    let mut c = Command::new("curl");
    c.args([
        "-H",
        "Accept: application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5",
        "-sS",
        "--max-time",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        url,
    ]);
    run_bounded(c)
}

#[test]
fn metrics_scrape_with_curl_parses_as_prometheus_text_and_never_stalls_the_loop() {
    let cfg = format!(
        "metrics_listen = \"127.0.0.1:{{port2}}\"\n{}",
        config(2, "")
    );
    let h = Holdfast::start(&cfg);
    h.wait_log_count("worker ready", 2);
    h.wait_log("metrics listening");
    let url = format!("http://127.0.0.1:{}/metrics", h.port2);

    // Scrapers that connect and never send hold their connections...
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(("127.0.0.1", h.port2)).expect("connect metrics"))
        .collect();
    // ...while a scrape, a status and a whole rollout go on.
    let o = curl(&url);
    let out = stdout(&o);
    let (body, code) = out.rsplit_once('\n').expect("status code line");
    assert_eq!(code, "200", "{}", text(&o));
    let samples = parse_metrics(body);
    let get = |series: &str| {
        samples
            .iter()
            .find(|(s, _)| s == series)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{series} missing in:\n{body}"))
    };
    assert_eq!(get("holdfast_workers{state=\"ready\"}"), 2.0);
    assert_eq!(get("holdfast_generation"), 1.0);
    assert_eq!(get("holdfast_replacements_total{reason=\"rollout\"}"), 0.0);
    let http_max = format!(
        "holdfast_listener_accept_queue_max{{listener=\"http\",address=\"127.0.0.1:{}\"}}",
        h.port
    );
    // The queue's limit is the backlog (64) capped by net.core.somaxconn.
    let somaxconn: f64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .expect("a number");
    assert_eq!(get(&http_max), somaxconn.min(64.0), "{http_max}");
    assert!(samples
        .iter()
        .any(|(s, _)| s.starts_with("holdfast_worker_connections{")));
    assert!(samples
        .iter()
        .any(|(s, _)| s.starts_with("holdfast_worker_memory_bytes{")));
    assert!(samples
        .iter()
        .any(|(s, _)| s == "holdfast_build_info{version=\"0.1.0\"}"));

    // Scrape in a loop during a rollout: every scrape answers, the rollout ends.
    let scraper = {
        let url = url.clone();
        std::thread::spawn(move || {
            (0..15)
                .map(|_| {
                    let o = curl(&url);
                    stdout(&o).ends_with("\n200")
                })
                .filter(|ok| *ok)
                .count()
        })
    };
    let started = Instant::now();
    cli(&h, &["restart", "--wait"], 0);
    let rollout = started.elapsed();
    assert_eq!(scraper.join().expect("scraper"), 15);
    assert!(
        rollout < Duration::from_secs(20),
        "rollout took {rollout:?}"
    );
    let o = curl(&url);
    assert!(
        stdout(&o).contains("holdfast_generation 2\n"),
        "{}",
        text(&o)
    );
    let o = curl(&format!("http://127.0.0.1:{}/other", h.port2));
    assert!(stdout(&o).ends_with("\n404"), "{}", text(&o));
    drop(idle);
}
