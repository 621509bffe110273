//! holdfast under systemd (issue 8), with the real tools and no systemd
//! running: socket activation through `systemd-socket-activate`;
//! notifications recorded on a datagram socket of the test (READY,
//! RELOADING, STOPPING, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, FDSTORE); the
//! fd store handed back to a second holdfast through a python3 launcher, as
//! systemd would on a restart; and `systemd-analyze verify` on units/.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{http_get, wait_until, Holdfast, Launch, Load, LoadSpec, Target, DEADLINE};
use nix::sys::signal::Signal;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde_json::Value;

/// An fd received over SCM_RIGHTS, closed on drop.
#[derive(Debug)]
struct Fd(RawFd);

impl Drop for Fd {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}

/// The socket inode behind an fd of this process (`socket:[N]`).
fn socket_inode_of(fd: RawFd) -> u64 {
    let link = fs::read_link(format!("/proc/self/fd/{fd}")).expect("readlink fd");
    let s = link.to_string_lossy().into_owned();
    s.strip_prefix("socket:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("fd {fd} is not a socket: {s}"))
}

/// One datagram holdfast sent to NOTIFY_SOCKET.
#[derive(Debug)]
struct Note {
    at: Instant,
    text: String,
    fds: Vec<Fd>,
    /// Wall-clock time it arrived. holdfast's own log is written by a thread
    /// of its own, so the log file may lag a notification; the timestamp of a
    /// log line, though, is taken before any send that follows it.
    wall: std::time::SystemTime,
}

/// The lines of holdfast's log stamped no later than `at` (tracing's RFC 3339
/// UTC timestamps); lines without a timestamp (worker output) are left out.
fn logged_by(log: &str, at: std::time::SystemTime) -> String {
    log.lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .is_some_and(|t| t <= at)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Note {
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }
    /// The READY/RELOADING/STOPPING lines, in order.
    fn phases(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(l))
            .collect()
    }
}

/// A NOTIFY_SOCKET that records every datagram, its fds, and how much of
/// holdfast's log existed when it arrived.
struct Recorder {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: Option<UnixDatagram>,
    notes: Arc<Mutex<Vec<Note>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Binds the socket; datagrams queue until [`Recorder::start`].
    fn bind() -> Recorder {
        let dir = tempfile::Builder::new()
            .prefix("holdfast-notify-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        Recorder::with(dir, path, sock)
    }

    /// Binds an abstract socket; [`Recorder::path`] is then `@NAME`.
    fn bind_abstract() -> Recorder {
        use std::os::linux::net::SocketAddrExt;
        let dir = tempfile::Builder::new()
            .prefix("holdfast-notify-")
            .tempdir()
            .expect("temp dir");
        let name = format!("holdfast-test-{}", dir.path().display());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract name");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket");
        Recorder::with(dir, PathBuf::from(format!("@{name}")), sock)
    }

    fn with(dir: tempfile::TempDir, path: PathBuf, sock: UnixDatagram) -> Recorder {
        Recorder {
            _dir: dir,
            path,
            sock: Some(sock),
            notes: Arc::default(),
            stop: Arc::default(),
            thread: None,
        }
    }

    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Starts reading.
    fn start(&mut self) {
        let sock = self.sock.take().expect("started once");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let (notes, stop) = (self.notes.clone(), self.stop.clone());
        let started = Instant::now();
        self.thread = Some(std::thread::spawn(move || {
            // Bounded: a test never runs this long.
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(300) {
                let mut buf = vec![0u8; 4096];
                let mut cmsg = nix::cmsg_space!([RawFd; 16]);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let (len, fds) = match recvmsg::<()>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(msg) => {
                        let mut fds = Vec::new();
                        for c in msg.cmsgs().expect("cmsgs") {
                            if let ControlMessageOwned::ScmRights(v) = c {
                                fds.extend(v.into_iter().map(Fd));
                            }
                        }
                        (msg.bytes, fds)
                    }
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                    Err(e) => panic!("recvmsg on the notify socket: {e}"),
                };
                notes.lock().expect("notes").push(Note {
                    at: Instant::now(),
                    text: String::from_utf8_lossy(&buf[..len]).into_owned(),
                    fds,
                    wall: std::time::SystemTime::now(),
                });
            }
        }));
    }

    /// Waits until `cond` holds over the notes so far.
    fn wait<T>(&self, what: &str, cond: impl Fn(&[Note]) -> Option<T>) -> T {
        wait_until(DEADLINE, what, || cond(&self.notes.lock().expect("notes")))
    }

    fn take(&self) -> Vec<Note> {
        std::mem::take(&mut *self.notes.lock().expect("notes"))
    }

    fn texts(&self) -> String {
        self.notes
            .lock()
            .expect("notes")
            .iter()
            .map(|n| format!("{:?}", n.text))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// holdfast run under `NOTIFY_SOCKET` = the recorder, plus `env`.
fn start_notified(rec: &mut Recorder, config: &str, env: &[(&str, &str)]) -> Holdfast {
    let socket = rec.path();
    let mut all = vec![("NOTIFY_SOCKET", socket.as_str())];
    all.extend_from_slice(env);
    let h = Holdfast::launch(
        Launch {
            program: "{holdfast}",
            args: &["run", "--config", "{config}"],
            env: &all,
            stdin: None,
        },
        Some(config),
    );
    rec.start();
    h
}

/// The value of `key=value` in a tracing line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

/// One `GET path` with `Connection: close`, waiting up to `timeout` for the
/// whole answer: (status, X-Pid).
fn get_slow(target: &Target, path: &str, timeout: Duration) -> Result<(u16, u32), String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    let io = |e: std::io::Error| format!("{target}: {e}");
    match target {
        Target::Tcp(a) => {
            let mut s = std::net::TcpStream::connect_timeout(a, timeout).map_err(io)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.write_all(request.as_bytes()).map_err(io)?;
            s.read_to_end(&mut out).map_err(io)?;
        }
        Target::Unix(p) => {
            let mut s = UnixStream::connect(p).map_err(io)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.write_all(request.as_bytes()).map_err(io)?;
            s.read_to_end(&mut out).map_err(io)?;
        }
    }
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{target}: no status line in {text:?}"))?;
    let pid = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-pid")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| format!("{target}: no X-Pid in {text:?}"))?;
    Ok((status, pid))
}

/// GETs `/inherited` until `n` distinct workers answered; their JSON by pid.
fn inherited_of_workers(target: &Target, n: usize) -> BTreeMap<u32, Value> {
    let mut seen = BTreeMap::new();
    wait_until(DEADLINE, &format!("{n} workers on {target}"), || {
        let resp = http_get(target, "/inherited")
            .unwrap_or_else(|e| panic!("GET /inherited on {target}: {e}"));
        assert_eq!(resp.status, 200, "GET /inherited: {}", resp.body_str());
        let pid = resp.pid().expect("X-Pid header");
        let json: Value = serde_json::from_slice(&resp.body).expect("/inherited JSON");
        seen.insert(pid, json);
        (seen.len() >= n).then(|| seen.clone())
    })
}

fn str_at<'a>(json: &'a Value, path: &[&str]) -> &'a str {
    let mut v = json;
    for p in path {
        v = &v[*p];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("{path:?} missing in {json}"))
}

/// Waits until `path` exists (systemd-socket-activate has bound everything).
fn wait_for_path(path: &Path) {
    wait_until(DEADLINE, &format!("{} to exist", path.display()), || {
        path.exists().then_some(())
    });
}

fn activate_args<'a>(listen: &[&'a str], fdnames: &'a str) -> Vec<&'a str> {
    let mut args = Vec::new();
    for l in listen {
        args.extend(["-l", l]);
    }
    args.extend([
        fdnames,
        "-E",
        "{tag}",
        "-E",
        "NO_COLOR=1",
        "--",
        "{holdfast}",
        "run",
        "--config",
        "{config}",
    ]);
    args
}

#[test]
fn socket_activation_tcp_and_unix_names_matched_and_served() {
    let config = r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[[listen]]
name = "app"
address = "systemd:app"

[app]
command = ["{test_worker}"]
workers = 2
"#;
    let args = activate_args(&["127.0.0.1:{port}", "{dir}/app.sock"], "--fdname=http:app");
    let h = Holdfast::launch(
        Launch {
            program: "systemd-socket-activate",
            args: &args,
            env: &[],
            stdin: None,
        },
        Some(config),
    );
    let sock = h.dir.path().join("app.sock");
    wait_for_path(&sock);
    // systemd-socket-activate execs holdfast on this first connection; it
    // waits in the queue until a worker serves it.
    let first = get_slow(&h.tcp(), "/", DEADLINE).expect("the activating request is served");
    assert_eq!(first.0, 200);
    h.wait_log("all workers ready");

    // holdfast's own LISTEN_PID was its pid (the launcher exec'd it).
    let taking = h.wait_log("socket activation: taking the sockets systemd passed");
    assert_eq!(
        field(&taking, "listen_pid"),
        Some(h.pid().to_string().as_str()),
        "{taking}"
    );
    assert_eq!(
        field(&taking, "listen_fdnames"),
        Some("http:app"),
        "{taking}"
    );
    let log = h.log();
    let adopted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("adopted a socket passed by systemd"))
        .collect();
    assert_eq!(adopted.len(), 2, "{log}");
    assert_eq!(field(adopted[0], "name"), Some("http"));
    assert_eq!(field(adopted[0], "fd"), Some("3"));
    assert_eq!(field(adopted[1], "name"), Some("app"));
    assert_eq!(field(adopted[1], "fd"), Some("4"));
    assert_eq!(
        log.matches("origin=socket-activated").count(),
        4,
        "adopted and listening lines, both sockets: {log}"
    );

    // Workers serve on both, with their own LISTEN_PID and holdfast's names.
    let tcp = format!("tcp:127.0.0.1:{} listening", h.port);
    let unix = format!("unix:{} listening", sock.display());
    for target in [h.tcp(), Target::Unix(sock.clone())] {
        for (pid, json) in inherited_of_workers(&target, 2) {
            assert_eq!(
                str_at(&json, &["env", "LISTEN_PID"]),
                pid.to_string(),
                "{json}"
            );
            assert_eq!(str_at(&json, &["env", "LISTEN_FDS"]), "2", "{json}");
            assert_eq!(str_at(&json, &["env", "LISTEN_FDNAMES"]), "http:app");
            assert_eq!(str_at(&json, &["sockets", "3"]), tcp, "{json}");
            assert_eq!(str_at(&json, &["sockets", "4"]), unix, "{json}");
            assert_eq!(json["fds"], serde_json::json!([0, 1, 2, 3, 4]), "{json}");
        }
    }

    // A rolling restart keeps the adopted sockets (`systemd:app` included).
    h.signal(Signal::SIGHUP);
    h.wait_log("rollout finished");
    assert!(!h.log().contains("reload rejected"), "{}", h.log());
    for target in [h.tcp(), Target::Unix(sock.clone())] {
        for json in inherited_of_workers(&target, 2).values() {
            assert_eq!(str_at(json, &["env", "HOLDFAST_GENERATION"]), "2");
            assert_eq!(str_at(json, &["sockets", "3"]), tcp, "{json}");
            assert_eq!(str_at(json, &["sockets", "4"]), unix, "{json}");
        }
    }
}

#[test]
fn socket_activation_family_mismatch_fails_naming_the_fd() {
    let config = r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}"]
"#;
    let args = activate_args(&["{dir}/app.sock"], "--fdname=http");
    let mut h = Holdfast::launch(
        Launch {
            program: "systemd-socket-activate",
            args: &args,
            env: &[],
            stdin: None,
        },
        Some(config),
    );
    let sock = h.dir.path().join("app.sock");
    wait_for_path(&sock);
    let _trigger = UnixStream::connect(&sock).expect("connect to activate");
    let status = h.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(78), "{}", h.log());
    let want = format!(
        "fd 3 (`http` in LISTEN_FDNAMES) for [[listen]] `http` (127.0.0.1:{port}): it is a listening unix stream socket on {sock}, the entry wants a listening TCP socket on 127.0.0.1:{port}",
        port = h.port,
        sock = sock.display()
    );
    let log = h.log();
    assert!(log.contains(&want), "want {want:?} in:\n{log}");
    assert!(!log.contains("worker spawned"), "{log}");
}

#[test]
fn socket_activation_unclaimed_socket_is_warned_about_and_kept_open() {
    let config = r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}"]
"#;
    let args = activate_args(
        &["127.0.0.1:{port}", "{dir}/extra.sock"],
        "--fdname=http:extra",
    );
    let mut h = Holdfast::launch(
        Launch {
            program: "systemd-socket-activate",
            args: &args,
            env: &[],
            stdin: None,
        },
        Some(config),
    );
    let extra = h.dir.path().join("extra.sock");
    wait_for_path(&extra);
    assert_eq!(get_slow(&h.tcp(), "/", DEADLINE).expect("served").0, 200);
    h.wait_log("all workers ready");
    let warned = h.wait_log("systemd passed a socket that no [[listen]] entry claims");
    assert!(warned.contains("WARN"), "{warned}");
    assert_eq!(field(&warned, "fd"), Some("4"), "{warned}");
    assert_eq!(field(&warned, "fdname"), Some("extra"), "{warned}");
    // Kept open by holdfast (the launcher became holdfast): connects succeed...
    UnixStream::connect(&extra).expect("the unclaimed socket is still listening");
    // ...and workers never got it.
    let (_, json) = inherited_of_workers(&h.tcp(), 1)
        .into_iter()
        .next()
        .expect("one worker");
    assert_eq!(json["fds"], serde_json::json!([0, 1, 2, 3]), "{json}");
    assert_eq!(str_at(&json, &["env", "LISTEN_FDNAMES"]), "http");
    // Once holdfast is gone, nothing listens there any more.
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "{}", h.log());
    let after = UnixStream::connect(&extra).expect_err("holdfast held the last copy");
    assert_eq!(
        after.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{after}"
    );
}

/// CLOCK_MONOTONIC in µs, the clock of MONOTONIC_USEC.
fn monotonic_usec() -> i128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as i128 * 1_000_000 + t.tv_nsec() as i128 / 1000
}

#[test]
fn notify_ready_reloading_ready_stopping_in_order_with_status() {
    let mut rec = Recorder::bind();
    let config = r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}", "--ready-delay-ms", "300"]
workers = 2
drain_timeout = "10s"
"#;
    let mut h = start_notified(&mut rec, config, &[]);

    // READY=1 only once both workers are ready.
    let ready_log = rec.wait("READY=1", |notes| {
        notes.iter().find(|n| n.has("READY=1")).map(|n| {
            assert_eq!(n.get("STATUS"), Some("2/2 workers ready, generation 1"));
            n.wall
        })
    });
    let before_ready = &logged_by(&h.log(), ready_log);
    assert_eq!(
        before_ready.matches("worker ready").count(),
        2,
        "READY=1 came before both workers were ready:\n{before_ready}"
    );
    assert!(before_ready.contains("all workers ready"));
    // Workers report to holdfast, never to systemd's socket.
    for json in inherited_of_workers(&h.tcp(), 2).values() {
        let theirs = str_at(json, &["env", "NOTIFY_SOCKET"]);
        assert_ne!(theirs, rec.path(), "{json}");
        assert!(theirs.ends_with("/notify.sock"), "{json}");
    }

    h.signal(Signal::SIGHUP);
    let sent_at = monotonic_usec();
    rec.wait("RELOADING=1 then READY=1", |notes| {
        let i = notes.iter().position(|n| n.has("RELOADING=1"))?;
        notes[i + 1..].iter().find(|n| n.has("READY=1")).map(|_| ())
    });
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "{}", h.log());
    rec.wait("STOPPING=1", |notes| {
        notes.iter().find(|n| n.has("STOPPING=1")).map(|_| ())
    });
    let notes = rec.take();
    let texts: Vec<&str> = notes.iter().map(|n| n.text.as_str()).collect();
    let log = h.log();
    let log_at = |n: &Note| logged_by(&log, n.wall);

    // The exact order of the state messages.
    let phases: Vec<&str> = notes.iter().flat_map(|n| n.phases()).collect();
    assert_eq!(
        phases,
        ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "{texts:#?}"
    );
    let reloading = notes
        .iter()
        .find(|n| n.has("RELOADING=1"))
        .expect("reloading");
    let mono: i128 = reloading
        .get("MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {texts:#?}"));
    assert!(
        (mono - sent_at).abs() < 5_000_000,
        "MONOTONIC_USEC={mono} is not CLOCK_MONOTONIC (~{sent_at})"
    );
    assert!(
        reloading.get("STATUS").is_some_and(
            |s| s.starts_with("2/2 workers ready, generation 1, rollout 0/2 to generation 2")
        ),
        "{texts:#?}"
    );
    let ready2 = notes
        .iter()
        .filter(|n| n.has("READY=1"))
        .nth(1)
        .expect("second READY=1");
    assert!(
        log_at(ready2).contains("rollout finished"),
        "READY=1 before the rollout finished"
    );
    assert_eq!(
        ready2.get("STATUS"),
        Some("2/2 workers ready, generation 2")
    );

    // STATUS= changes with the state, never repeats itself.
    let statuses: Vec<&str> = notes.iter().filter_map(|n| n.get("STATUS")).collect();
    assert!(statuses[0].starts_with("starting: 0/2"), "{statuses:#?}");
    assert!(
        statuses
            .iter()
            .any(|s| s.ends_with("rollout 1/2 to generation 2")),
        "{statuses:#?}"
    );
    assert!(
        statuses.last().is_some_and(|s| s.starts_with("stopping:")),
        "{statuses:#?}"
    );
    assert!(statuses.windows(2).all(|w| w[0] != w[1]), "{statuses:#?}");
    // The listening socket went to the fd store; MAINPID is never sent.
    let stored: Vec<&Note> = notes.iter().filter(|n| n.has("FDSTORE=1")).collect();
    assert_eq!(stored.len(), 1, "{texts:#?}");
    assert_eq!(stored[0].get("FDNAME"), Some("holdfast.store.http"));
    assert_eq!(stored[0].fds.len(), 1);
    assert!(!notes.iter().any(|n| n.get("MAINPID").is_some()));
}

/// Whether systemd ≥ 253 (`Type=notify-reload`) would end a reload it
/// signalled at `begin` (CLOCK_MONOTONIC µs): a RELOADING=1 whose
/// MONOTONIC_USEC is not older than `begin`, then READY=1 (or both in one
/// message), as `service_notify_message()` in src/core/service.c reads them.
/// A READY=1 without a fresh RELOADING=1 before it leaves the reload waiting
/// until TimeoutStartSec= fails it.
fn notify_reload_ends(notes: &[Note], begin: i128) -> bool {
    let fresh = |n: &Note| {
        n.has("RELOADING=1")
            && n.get("MONOTONIC_USEC")
                .and_then(|v| v.parse::<i128>().ok())
                .is_some_and(|m| m >= begin)
    };
    notes.iter().enumerate().any(|(i, n)| {
        fresh(n) && (n.has("READY=1") || notes[i + 1..].iter().any(|r| r.has("READY=1")))
    })
}

#[test]
fn every_sighup_is_answered_as_type_notify_reload_wants() {
    let mut rec = Recorder::bind();
    let config = r#"
[[listen]]
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}", "--ready-delay-ms", "1000", "--lame-duck-ms", "100"]
workers = 2
"#;
    let h = start_notified(&mut rec, config, &[]);
    rec.wait("READY=1", |notes| {
        notes.iter().find(|n| n.has("READY=1")).map(|_| ())
    });
    let broken = "[app]\ncommand = [\"{test_worker}\"]\nwokers = 3\n";
    let good = h.fill(config);
    // What systemd does: note the time, send SIGHUP, wait for the protocol.
    let reload = |what: &str, during_rollout: bool| {
        if during_rollout {
            let n = h.log().matches("rollout started").count();
            h.signal(Signal::SIGHUP);
            h.wait_log_count("rollout started", n + 1);
        }
        let begin = monotonic_usec();
        h.signal(Signal::SIGHUP);
        rec.wait(
            &format!("{what}: RELOADING=1 (fresh) ... READY=1"),
            |notes| notify_reload_ends(notes, begin).then_some(()),
        );
    };
    reload("an accepted reload", false);
    reload("a reload asked for during a rollout", true);
    h.rewrite_config(broken);
    reload("a rejected reload", false);
    h.rewrite_config(&good);
    let n = h.log().matches("rollout started").count();
    h.signal(Signal::SIGHUP);
    h.wait_log_count("rollout started", n + 1);
    h.rewrite_config(broken);
    let begin = monotonic_usec();
    h.signal(Signal::SIGHUP);
    rec.wait(
        "a reload rejected during a rollout: RELOADING=1 (fresh) ... READY=1",
        |notes| notify_reload_ends(notes, begin).then_some(()),
    );
}

#[test]
fn notify_socket_may_be_an_abstract_name() {
    let mut rec = Recorder::bind_abstract();
    let config = r#"
[[listen]]
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}"]
"#;
    let mut h = start_notified(&mut rec, config, &[]);
    rec.wait("READY=1 on @name", |notes| {
        notes.iter().find(|n| n.has("READY=1")).map(|_| ())
    });
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "{}", h.log());
    rec.wait("STOPPING=1 on @name", |notes| {
        notes.iter().find(|n| n.has("STOPPING=1")).map(|_| ())
    });
    assert!(!h.log().contains("cannot notify systemd"), "{}", h.log());
}

/// SIGCONTs holdfast when dropped, so a failing test never leaves it stopped.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

/// The state letter of `/proc/PID/stat` (`T` while stopped).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[test]
fn watchdog_pings_at_half_the_interval_and_stop_while_the_loop_stalls() {
    const STALL: Duration = Duration::from_secs(3);
    /// A ping already in flight when the stop lands may arrive this late.
    const IN_FLIGHT: Duration = Duration::from_millis(50);
    let mut rec = Recorder::bind();
    let config = r#"
[[listen]]
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}"]
"#;
    let h = start_notified(&mut rec, config, &[("WATCHDOG_USEC", "1000000")]);
    rec.wait("7 pings", |notes| {
        (notes.iter().filter(|n| n.has("WATCHDOG=1")).count() >= 7).then_some(())
    });
    // An honest stall, with no hook in holdfast: SIGSTOP holds its whole
    // process, event loop included, until SIGCONT.
    let stopped = Stopped(h.pid());
    h.signal(Signal::SIGSTOP);
    wait_until(DEADLINE, "holdfast to be stopped", || {
        (proc_state(h.pid()) == Some('T')).then_some(())
    });
    let stopped_at = Instant::now();
    rec.wait("the stall to last 3 s", |notes| {
        let late = notes
            .iter()
            .filter(|n| n.has("WATCHDOG=1") && n.at > stopped_at + IN_FLIGHT)
            .count();
        assert_eq!(late, 0, "a watchdog ping while holdfast was stopped");
        (stopped_at.elapsed() >= STALL).then_some(())
    });
    drop(stopped); // SIGCONT
    let continued_at = Instant::now();
    rec.wait("the loop to ping again", |notes| {
        let after = notes
            .iter()
            .filter(|n| n.has("WATCHDOG=1") && n.at > continued_at)
            .count();
        (after >= 4).then_some(())
    });
    let notes = rec.take();
    let pings: Vec<&Note> = notes.iter().filter(|n| n.has("WATCHDOG=1")).collect();
    let gaps: Vec<f64> = pings
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect();
    // The gap across the stall: from the last ping before it to the first after.
    let stall = pings.iter().filter(|n| n.at <= continued_at).count() - 1;
    assert!(
        pings[stall].at <= stopped_at + IN_FLIGHT,
        "a ping during the stall: {gaps:?}"
    );
    assert!(
        (2.9..4.5).contains(&gaps[stall]),
        "no ping while the loop was stalled for 3 s: gap {:.3}s; gaps {gaps:?}",
        gaps[stall]
    );
    let resumed = (pings[stall + 1].at - continued_at).as_secs_f64();
    assert!(
        resumed < 0.6,
        "the first ping came {resumed:.3}s after SIGCONT: an overdue ping is sent at once"
    );
    // Every other gap: about half of WATCHDOG_USEC, never near the timeout.
    let mut steady: Vec<f64> = gaps
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != stall)
        .map(|(_, g)| *g)
        .collect();
    assert!(steady.len() >= 8, "{gaps:?}");
    assert!(
        steady.iter().all(|g| *g < 1.0),
        "a gap of WATCHDOG_USEC or more, which would trip the watchdog: {gaps:?}"
    );
    steady.sort_by(f64::total_cmp);
    let median = steady[steady.len() / 2];
    eprintln!(
        "watchdog: {} pings, median gap {median:.3}s, max {:.3}s; gap across the 3 s stall {:.3}s",
        pings.len(),
        steady.last().copied().unwrap_or(f64::NAN),
        gaps[stall]
    );
    assert!(
        (0.4..0.65).contains(&median),
        "median ping interval {median:.3}s, want ~0.5s: {gaps:?}"
    );
}

#[test]
fn timeouts_are_extended_while_a_slow_boot_and_a_slow_drain_progress() {
    let mut rec = Recorder::bind();
    let config = r#"
[[listen]]
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}", "--ready-delay-ms", "5000", "--ignore-term"]
ready_timeout = "60s"
drain_timeout = "4s"
"#;
    let mut h = start_notified(&mut rec, config, &[]);
    rec.wait("READY=1", |notes| {
        notes.iter().find(|n| n.has("READY=1")).map(|_| ())
    });
    h.signal(Signal::SIGTERM);
    let status = h.wait_exit(DEADLINE);
    assert!(status.success(), "{}", h.log());
    assert!(h.log().contains("did not exit within drain_timeout"));
    rec.wait("STOPPING=1", |notes| {
        notes.iter().find(|n| n.has("STOPPING=1")).map(|_| ())
    });
    let notes = rec.take();
    let ready = notes.iter().position(|n| n.has("READY=1")).expect("ready");
    let stopping = notes
        .iter()
        .position(|n| n.has("STOPPING=1"))
        .expect("stop");
    let usec = |n: &Note| -> Option<u64> { n.get("EXTEND_TIMEOUT_USEC")?.parse().ok() };
    let boot: Vec<u64> = notes[..ready].iter().filter_map(usec).collect();
    let idle: Vec<u64> = notes[ready..stopping].iter().filter_map(usec).collect();
    let drain: Vec<u64> = notes[stopping..].iter().filter_map(usec).collect();
    // Boot: up to the worker's ready_timeout (60 s) plus 5 s.
    assert!(!boot.is_empty(), "no EXTEND_TIMEOUT_USEC while booting");
    assert!(
        boot.iter().all(|u| (50_000_000..=65_000_000).contains(u)),
        "{boot:?}"
    );
    assert_eq!(idle, Vec::<u64>::new(), "nothing to extend while running");
    // Drain: up to drain_timeout (4 s) plus 5 s.
    assert!(!drain.is_empty(), "no EXTEND_TIMEOUT_USEC while draining");
    assert!(
        drain.iter().all(|u| (5_000_000..=9_000_000).contains(u)),
        "{drain:?}"
    );
}

/// Receives fds on stdin (SCM_RIGHTS, names as the payload), puts them at
/// 3.., sets LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID (its own pid, which exec
/// keeps) and execs argv[1:]: what systemd does with the fd store on a restart.
const LAUNCHER: &str = r#"
import fcntl, os, socket, sys
s = socket.socket(fileno=0)
msg, fds, _flags, _addr = socket.recv_fds(s, 4096, 16)
s.detach()
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(high))
os.environ["LISTEN_FDNAMES"] = msg.decode()
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
"#;

#[test]
fn fd_store_gives_a_restarted_holdfast_the_same_sockets_and_refuses_nothing() {
    let mut rec = Recorder::bind();
    let config = r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[[listen]]
name = "app"
address = "unix:{dir}/app.sock"

[app]
command = ["{test_worker}"]
workers = 2
"#;
    let mut h1 = start_notified(&mut rec, config, &[]);
    rec.wait("READY=1", |notes| {
        notes.iter().find(|n| n.has("READY=1")).map(|_| ())
    });
    let listening: BTreeMap<String, u64> = h1
        .log()
        .lines()
        .filter(|l| l.contains(" listening ") || l.ends_with(" listening"))
        .filter_map(|l| {
            Some((
                field(l, "name")?.to_string(),
                field(l, "inode")?.parse().ok()?,
            ))
        })
        .collect();
    assert_eq!(listening.len(), 2, "{}", h1.log());
    let sock = h1.dir.path().join("app.sock");
    let path_inode = fs::metadata(&sock).expect("app.sock").ino();

    // The fd store got both sockets, as the very sockets holdfast listens on.
    let mut stored = rec.take();
    stored.retain(|n| n.has("FDSTORE=1"));
    assert_eq!(stored.len(), 2, "{}", rec.texts());
    let mut names = Vec::new();
    let mut fds = Vec::new();
    for n in &stored {
        let name = n.get("FDNAME").expect("FDNAME").to_string();
        let entry = name.strip_prefix("holdfast.store.").expect("prefix");
        assert_eq!(n.fds.len(), 1, "{name}");
        assert_eq!(socket_inode_of(n.fds[0].0), listening[entry], "{name}");
        names.push(name);
        fds.push(n.fds[0].0);
    }

    // A load runs across the restart of holdfast itself.
    let mut spec = LoadSpec::new(h1.tcp());
    spec.max_duration = Duration::from_secs(15);
    spec.max_requests = 200_000;
    spec.request_timeout = Duration::from_secs(20);
    spec.path = "/?sleep=2".into();
    let load = Load::start(spec);
    wait_until(DEADLINE, "load before the restart", || {
        (load.requests_so_far() >= 100).then_some(())
    });
    h1.signal(Signal::SIGTERM);
    assert!(h1.wait_exit(DEADLINE).success(), "{}", h1.log());
    assert!(
        sock.exists(),
        "holdfast removed the stored socket's path at exit"
    );

    // systemd's part: the stored fds at 3.. of the next holdfast, named.
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let payload = names.join(":");
    sendmsg::<()>(
        ours.as_raw_fd(),
        &[IoSlice::new(payload.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("send fds to the launcher");
    let config2 = fs::read_to_string(&h1.config_path).expect("config");
    let h2 = Holdfast::launch(
        Launch {
            program: "/usr/bin/python3",
            args: &["-c", LAUNCHER, "{holdfast}", "run", "--config", "{config}"],
            env: &[],
            stdin: Some(theirs.into()),
        },
        Some(&config2),
    );
    drop(ours);
    h2.wait_log("all workers ready");
    let at_ready = load.requests_so_far();
    wait_until(DEADLINE, "load after the restart", || {
        (load.requests_so_far() >= at_ready + 200).then_some(())
    });
    let report = load.stop();
    eprintln!("load across the restart of holdfast: {report}");
    report.assert_clean(300);
    let old: Vec<u32> = h1.worker_pids();
    let new: Vec<u32> = h2.worker_pids();
    assert!(
        report.pids.iter().any(|p| old.contains(p)) && report.pids.iter().any(|p| new.contains(p)),
        "served by old {old:?} and new {new:?} workers: {report}"
    );

    // The same sockets, adopted from the store, not bound anew.
    let log2 = h2.log();
    let adopted: BTreeMap<String, u64> = log2
        .lines()
        .filter(|l| l.contains("adopted a socket passed by systemd"))
        .map(|l| {
            assert_eq!(field(l, "origin"), Some("fd-store"), "{l}");
            (
                field(l, "name").expect("name").to_string(),
                field(l, "inode")
                    .and_then(|i| i.parse().ok())
                    .expect("inode"),
            )
        })
        .collect();
    assert_eq!(adopted, listening, "{log2}");
    assert_eq!(fs::metadata(&sock).expect("app.sock").ino(), path_inode);
    let (status, pid) = get_slow(&Target::Unix(sock.clone()), "/", DEADLINE).expect("unix");
    assert_eq!(status, 200);
    assert!(
        new.contains(&pid),
        "unix served by {pid}, new workers {new:?}"
    );
}

/// `units/*.service` and `units/*.socket` as tests/run checks them: ExecStart
/// pointed at the built binary, templates as NAME@verify.service.
#[test]
fn units_pass_systemd_analyze_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
    let tmp = tempfile::Builder::new()
        .prefix("holdfast-units-")
        .tempdir()
        .expect("temp dir");
    let bin = env!("CARGO_BIN_EXE_holdfast");
    let mut checked = Vec::new();
    let mut texts = BTreeMap::new();
    for entry in fs::read_dir(&units).expect("units/") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if !(name.ends_with(".service") || name.ends_with(".socket")) {
            continue;
        }
        let text = fs::read_to_string(&path).expect("unit");
        for line in text.lines().filter(|l| l.starts_with("ExecStart=")) {
            assert!(
                line.starts_with("ExecStart=/usr/bin/holdfast "),
                "{name}: tests/run rewrites /usr/bin/holdfast only: {line}"
            );
        }
        let copy = tmp.path().join(name.replace("@.", "@verify."));
        fs::write(&copy, text.replace("/usr/bin/holdfast", bin)).expect("write unit");
        checked.push(copy);
        texts.insert(name, text);
    }
    assert_eq!(
        texts.keys().collect::<Vec<_>>(),
        ["holdfast.service", "holdfast.socket", "holdfast@.service"]
    );
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&checked)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // Warnings about our units (unknown keys, bad values) do not fail verify.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains(&*tmp.path().to_string_lossy()) || l.contains("holdfast"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify warned: {ours:#?}");

    // The choices the issue asks for, in both services.
    let setting = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    for name in ["holdfast.service", "holdfast@.service"] {
        let t = &texts[name];
        for (key, want) in [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("KillMode", "process"),
            ("Restart", "on-failure"),
            ("RestartPreventExitStatus", "78"),
        ] {
            assert_eq!(setting(t, key), [want], "{name}: {key}");
        }
        let secs = |key: &str| -> u64 {
            let v = setting(t, key);
            assert_eq!(v.len(), 1, "{name}: {key}");
            v[0].trim_end_matches('s').parse().expect("seconds")
        };
        assert!(
            secs("TimeoutStopSec") > 30,
            "{name}: above the default drain_timeout"
        );
        assert!(secs("WatchdogSec") > 0, "{name}");
        assert!(secs("FileDescriptorStoreMax") > 0, "{name}");
    }
    // `systemctl reload` waits for the rollout, through the control socket
    // the units' comments tell the config to use.
    assert_eq!(
        setting(&texts["holdfast.service"], "ExecReload"),
        ["/usr/bin/holdfast restart --wait --control /run/holdfast/holdfast.sock"]
    );
    assert_eq!(
        setting(&texts["holdfast@.service"], "ExecReload"),
        ["/usr/bin/holdfast restart --wait --control /run/holdfast/%i/holdfast.sock"]
    );
    assert!(texts["holdfast.service"].contains("control_socket = \"/run/holdfast/holdfast.sock\""));
    assert!(texts["holdfast@.service"]
        .contains("control_socket = \"/run/holdfast/shop/holdfast.sock\""));
    let socket = &texts["holdfast.socket"];
    assert_eq!(
        setting(socket, "ListenStream"),
        ["127.0.0.1:8080", "/run/holdfast-socket/app.sock"]
    );
    assert_eq!(setting(socket, "FileDescriptorName"), ["http"]);
    assert_eq!(setting(socket, "Accept"), ["no"]);
    assert_eq!(setting(socket, "RemoveOnStop"), ["yes"]);
    for name in ["holdfast.service", "holdfast@.service"] {
        assert_eq!(
            setting(&texts[name], "RuntimeDirectoryPreserve"),
            ["restart"],
            "{name}"
        );
    }
    assert_eq!(setting(socket, "Backlog").len(), 1);
}
