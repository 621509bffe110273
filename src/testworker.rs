//! The test worker: a tiny HTTP/1.1 app server that holdfast's integration
//! tests and demo supervise (`holdfast test-worker ARGS...`, a hidden
//! subcommand).
//!
//! It owns nothing of holdfast's: it is a stand-in for Puma, Gunicorn or
//! uWSGI that behaves like a well-mannered server by default and misbehaves
//! on request (flags), so that tests can check what holdfast sees and does:
//!
//! - what a worker inherits (`GET /inherited`: fds, sockets and the
//!   socket-activation environment, captured before anything else opens an fd);
//! - readiness by `READY=1` (sd_notify(3)), from the worker or from a
//!   descendant, late, never, or by a probe socket that fails;
//! - draining on SIGTERM/SIGQUIT with a lame-duck period for idle keep-alive
//!   connections (see the Puma notes in SERVERS.md for why);
//! - log volume, partial last lines, memory growth (`/grow`, and `/spike`
//!   that frees it again), children, crashes;
//! - a "clean crash" on request (`GET /exit?code=N`, or SIGUSR2 with
//!   `--exit-on-usr2`: stop accepting, finish what is in flight, exit N),
//!   a quick TERM (Unicorn's: requests in
//!   flight are dropped), a daemon that escapes the process group with a
//!   copy of the listening sockets (`--daemon`), and a server that keeps
//!   only some of the sockets it was given (`--close-listener`).
//!
//! Layout: [`main`] captures the inherited state, parses flags, takes the
//! listeners (sd_listen_fds(3) through the `listenfd` crate, or `UNICORN_FD`)
//! and runs [`Worker::run`] on a current-thread tokio runtime. The HTTP
//! parser ([`parse_head`]) is a pure function so it can be unit-tested
//! without sockets. There is no `unsafe` here: the "children" are re-execs of
//! this binary with a hidden `--child-role` (the daemon gets its sockets as
//! `dup`s without close-on-exec, and calls `setsid` through nix), and
//! [`FORKING_PY`] covers the copy-on-write case that needs a real `fork`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{getpeername, getsockname, SockaddrLike, SockaddrStorage};
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_tokio::Signals;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// sysexits.h `EX_USAGE`.
const EX_USAGE: u8 = 64;
/// sysexits.h `EX_SOFTWARE`.
const EX_SOFTWARE: u8 = 70;
/// Exit code of `--crash-after-ms`.
const CRASH_CODE: i32 = 3;

/// Largest request head (request line and headers) accepted; larger gets 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines accepted in one request.
const MAX_HEADERS: usize = 100;
/// Largest request body accepted (it is read and discarded); larger gets 413.
const MAX_BODY_BYTES: u64 = 1 << 30;
/// Most connections served at once; past it, connections wait in the backlog.
const MAX_CONNECTIONS: usize = 4096;
/// How long a partly received request may stall between reads.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle keep-alive connection is kept while serving.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Cap on `sleep=` and `--sleep-ms`.
const MAX_SLEEP_MS: u64 = 3_600_000;
/// Cap on one `/grow?mb=` or `--grow-mb` step, in MiB.
const MAX_GROW_MB: u64 = 64 * 1024;
/// Name holdfast gives its private probe socket in `LISTEN_FDNAMES`.
const PROBE_FDNAME: &str = "holdfast-probe";
const MIB: u64 = 1024 * 1024;
const PAGE: usize = 4096;
/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A Python 3 script for the memory tests that need pages really shared
/// copy-on-write between a parent and forked children, which this module
/// cannot do without `unsafe`.
///
/// Usage: `python3 forking.py SHARED_MB CHILDREN`. It allocates and touches
/// SHARED_MB MiB, forks CHILDREN children that sleep (sharing those pages),
/// sends `READY=1` to `NOTIFY_SOCKET` if set (a leading `@` means the
/// abstract namespace), and waits. On SIGTERM or SIGINT it terminates and
/// reaps the children and exits 0. A child exits when its parent is gone.
pub const FORKING_PY: &str = r#"import os, signal, socket, sys, time
mb, count = int(sys.argv[1]), int(sys.argv[2])
buf = bytearray(mb * 1024 * 1024)
for i in range(0, len(buf), 4096):
    buf[i] = 1
kids = []
def stop(signum, frame):
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in kids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
me = os.getpid()
for _ in range(count):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        while os.getppid() == me:
            time.sleep(0.2)
        os._exit(0)
    kids.append(pid)
addr = os.environ.get("NOTIFY_SOCKET")
if addr:
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(b"READY=1\nSTATUS=serving\n", addr)
    s.close()
print("forking.py %d: %d MiB shared with %d children" % (me, mb, count), flush=True)
while True:
    signal.pause()
"#;

/// Flags of `holdfast test-worker`. Durations are in milliseconds, sizes in
/// MiB.
#[derive(Debug, Parser)]
#[command(
    name = "holdfast test-worker",
    about = "HTTP/1.1 test app for holdfast's tests and demo"
)]
struct Args {
    /// Bind ADDR (HOST:PORT or unix:PATH) when no listener is inherited.
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// Take the listeners from UNICORN_FD=3,4 instead of LISTEN_FDS.
    #[arg(long)]
    unicorn_fd: bool,
    /// Default per-request sleep when the request has no `sleep=` parameter.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    sleep_ms: u64,
    /// Wait this long after serving starts before sending READY=1.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    ready_delay_ms: u64,
    /// Never send READY=1 (still serve).
    #[arg(long, conflicts_with = "ready_from_child")]
    never_ready: bool,
    /// Send READY=1 from a child process instead of this pid.
    #[arg(long)]
    ready_from_child: bool,
    /// Answer 503 on the last listener if LISTEN_FDNAMES names it holdfast-probe.
    #[arg(long)]
    probe_fail: bool,
    /// Exit at once with CODE, before serving.
    #[arg(long, value_name = "CODE")]
    exit_at_start: Option<u8>,
    /// Serve, then exit 3 after this long.
    #[arg(long, value_name = "MS")]
    crash_after_ms: Option<u64>,
    /// Only crash (`--crash-after-ms`) in the worker whose HOLDFAST_WORKER_ID
    /// is N, so a test can crash-loop one slot while the others serve.
    #[arg(long, value_name = "N", requires = "crash_after_ms")]
    crash_slot: Option<u32>,
    /// Ignore SIGTERM and SIGQUIT (keep serving).
    #[arg(long)]
    ignore_term: bool,
    /// SIGUSR2 is a clean crash aimed at this pid: drain as on the drain
    /// signal, then exit with CODE (as `GET /exit?code=CODE`). Without it,
    /// SIGUSR2 keeps its default action.
    #[arg(long, value_name = "CODE")]
    exit_on_usr2: Option<u8>,
    /// SIGTERM is a quick exit, as in Unicorn: exit 0 at once, dropping the
    /// requests in flight and the idle connections. SIGQUIT still drains.
    #[arg(long, conflicts_with = "ignore_term")]
    quick_term: bool,
    /// Close the inherited listeners; a child without them sends READY=1.
    #[arg(long)]
    close_inherited: bool,
    /// Close the inherited listener of this LISTEN_FDNAMES name and serve
    /// the others (repeatable). READY=1 is sent as usual.
    #[arg(long, value_name = "NAME", conflicts_with = "close_inherited")]
    close_listener: Vec<String>,
    /// After this long serving, close every listener (the accept loops
    /// end) but keep serving the connections already accepted and stay
    /// alive: a server whose accept loop died after it was ready.
    #[arg(long, value_name = "MS", conflicts_with = "close_inherited")]
    close_listeners_after_ms: Option<u64>,
    /// After this long, point fds 1 and 2 at /dev/null (closing this
    /// process's ends of holdfast's pipes) and keep serving, as a server
    /// that daemonises its stdio does. Helpers spawned before keep theirs.
    #[arg(long, value_name = "MS")]
    close_stdio_after_ms: Option<u64>,
    /// At start, spawn a daemon: a child that calls setsid(2) (leaving this
    /// worker's process group and session), holds a copy of every inherited
    /// listener, does not die with this worker, has /dev/null as stdio, and
    /// sleeps until SIGTERM, SIGINT or SIGQUIT. The worker never signals or
    /// waits for it.
    #[arg(long, conflicts_with = "close_inherited")]
    daemon: bool,
    /// After the drain signal, keep idle keep-alive connections this long.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    lame_duck_ms: u64,
    /// Write N numbered lines at start.
    #[arg(long, value_name = "N", default_value_t = 0)]
    log_lines: u64,
    /// Pad each log line with 'x' to B bytes, newline included.
    #[arg(long, value_name = "B", default_value_t = 64)]
    log_line_bytes: usize,
    /// Write the log lines to stderr instead of stdout.
    #[arg(long)]
    log_stderr: bool,
    /// Keep writing log lines until drained.
    #[arg(long)]
    log_forever: bool,
    /// Log lines per second, for every line (0 = flat out).
    #[arg(long, value_name = "N", default_value_t = 0)]
    log_rate: u64,
    /// At exit, write "w<slot> <pid> partial" with no newline as the last output.
    #[arg(long)]
    partial_last_line: bool,
    /// Allocate and touch N MiB per second, forever.
    #[arg(long, value_name = "N", default_value_t = 0)]
    grow_mb_per_sec: u64,
    /// After every R requests grow by --grow-mb MiB.
    #[arg(long, value_name = "R", requires = "grow_mb")]
    grow_after_requests: Option<u64>,
    /// MiB added every --grow-after-requests requests.
    #[arg(long, value_name = "M", requires = "grow_after_requests")]
    grow_mb: Option<u64>,
    /// Allocate and touch M MiB at start (each child too: not shared, see FORKING_PY).
    #[arg(long, value_name = "M", default_value_t = 0)]
    shared_mb: u64,
    /// Spawn K idle child processes (re-execs of this binary).
    #[arg(long, value_name = "K", default_value_t = 0)]
    children: u32,
    /// The children grow N MiB per second each (the parent does not).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "children")]
    child_grow_mb_per_sec: u64,
    /// Internal: run as a helper child of a test worker.
    #[arg(long, hide = true, value_enum)]
    child_role: Option<ChildRole>,
    /// Internal: the pid of the test worker that spawned this child.
    #[arg(long, hide = true)]
    parent_pid: Option<i32>,
}

/// What a re-exec'd helper child does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ChildRole {
    /// Send READY=1 and STATUS=serving, then exit 0.
    Notify,
    /// Send READY=1, then sleep until SIGTERM/SIGINT/SIGQUIT, then exit 0.
    ServeNothing,
    /// Allocate `--shared-mb`, grow at `--grow-mb-per-sec`, sleep until killed.
    Idle,
    /// `--daemon`: setsid(2), keep the fds it inherited (the listeners),
    /// sleep until SIGTERM/SIGINT/SIGQUIT, then exit 0. No parent-death
    /// signal: it outlives the worker.
    Daemon,
}

/// Entry for `holdfast test-worker ARGS...`; `args` excludes the program name
/// and the word `test-worker`.
///
/// Exit codes: 0 after a drain, SIGINT or a `--quick-term` SIGTERM, 1 when
/// there is no listener, 3 for `--crash-after-ms`, 64 for bad flags, 70 for
/// other start-up failures, the `--exit-at-start` code, or the code a
/// `GET /exit?code=N` asked for.
pub fn main(args: Vec<OsString>) -> ExitCode {
    // First, before anything opens an fd or reads the env destructively.
    let inherited = Inherited::capture();
    let args = match Args::try_parse_from(
        std::iter::once(OsString::from("holdfast test-worker")).chain(args),
    ) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Some(code) = args.exit_at_start {
        say(&format!(
            "test-worker {}: exiting at start with {code} on purpose",
            std::process::id()
        ));
        return ExitCode::from(code);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            say(&format!("test-worker: tokio runtime: {e}"));
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    if let Some(role) = args.child_role {
        return runtime.block_on(run_child(role, &args));
    }
    let listeners = match take_listeners(&args, &inherited) {
        Ok(listeners) if listeners.is_empty() => {
            say("test-worker: no inherited listening socket (LISTEN_FDS unset or LISTEN_PID is not my pid)");
            return ExitCode::from(1);
        }
        Ok(listeners) => listeners,
        Err(e) => {
            say(&format!("test-worker: {e}"));
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        match Worker::new(args, inherited) {
            Ok(worker) => Arc::new(worker).run(listeners).await,
            Err(e) => {
                say(&format!("test-worker: {e}"));
                ExitCode::from(EX_SOFTWARE)
            }
        }
    })
}

/// Start-up failures, each naming the object.
#[derive(Debug)]
enum Error {
    /// An inherited fd that is neither a TCP nor a unix stream socket.
    NotStreamSocket { fd: i32, source: io::Error },
    /// `UNICORN_FD` is unset or not a comma-separated list of fds.
    UnicornFd(String),
    /// `--bind` could not be parsed or bound.
    Bind { addr: String, source: io::Error },
    /// `NOTIFY_SOCKET` could not be written.
    Notify { socket: String, source: io::Error },
    /// Installing signal handlers or spawning a child failed.
    Setup {
        what: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotStreamSocket { fd, source } => {
                write!(
                    f,
                    "inherited fd {fd}: not a TCP or unix stream socket: {source}"
                )
            }
            Error::UnicornFd(value) => write!(f, "UNICORN_FD={value:?}: want a list like 3,4"),
            Error::Bind { addr, source } => write!(f, "bind {addr}: {source}"),
            Error::Notify { socket, source } => write!(f, "notify {socket}: {source}"),
            Error::Setup { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

/// What the process inherited, captured at the top of [`main`] and served
/// as JSON by `GET /inherited`.
///
/// Only the fd numbers and their link targets are read at start; the sockets
/// are described on the first `/inherited` ([`Inherited::render`]), because
/// that reads the whole socket table (/proc/net/tcp), which after a load of
/// one-shot connections holds tens of thousands of TIME_WAIT entries and
/// took 1.5-4 s on a busy 2-core box: every worker's start, and so every
/// rollout step, waited for it.
#[derive(Debug, Clone, serde::Serialize)]
struct Inherited {
    /// Every open fd, in order.
    fds: Vec<i32>,
    /// For each fd ≥ 3: `tcp:IP:PORT listening`, `unix:/path listening`,
    /// `... connected`, `... open`, or the `/proc/self/fd` link target.
    /// Filled by [`Inherited::render`].
    sockets: BTreeMap<i32, String>,
    /// The `/proc/self/fd` link target of each fd ≥ 3, as captured.
    #[serde(skip)]
    targets: BTreeMap<i32, String>,
    /// The socket-activation and holdfast variables that were set.
    env: BTreeMap<String, String>,
}

/// Variables reported by `/inherited` (and every `EINHORN_FD_<n>`).
const CAPTURED_VARS: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "SERVER_STARTER_PORT",
    "EINHORN_FD_COUNT",
    "UNICORN_FD",
    "HOLDFAST_WORKER_ID",
    "HOLDFAST_GENERATION",
    "NOTIFY_SOCKET",
];

impl Inherited {
    fn capture() -> Inherited {
        // Collect the names first and close the directory handle, so that
        // its own fd no longer resolves and drops out below.
        let names: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
            Ok(dir) => dir
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut fds = Vec::new();
        let mut targets = BTreeMap::new();
        for fd in names {
            if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
                fds.push(fd);
                targets.insert(fd, target.to_string_lossy().into_owned());
            }
        }
        fds.sort_unstable();
        targets.retain(|fd, _| *fd >= 3);
        let env = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                let wanted = CAPTURED_VARS.contains(&k.as_str())
                    || k.strip_prefix("EINHORN_FD_")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                wanted.then(|| (k, v.to_string_lossy().into_owned()))
            })
            .collect();
        Inherited {
            fds,
            sockets: BTreeMap::new(),
            targets,
            env,
        }
    }

    /// The JSON of `/inherited`, describing each inherited fd that is still
    /// the file it was at start (the worker keeps its inherited fds open).
    fn render(&self) -> String {
        let table = SocketTable::read();
        let sockets = self
            .targets
            .iter()
            .map(|(&fd, target)| {
                let now = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                    .map(|t| t.to_string_lossy().into_owned());
                let described = match now {
                    Ok(now) if now == *target => describe_fd(fd, target, &table),
                    _ => format!("{target} (closed since start)"),
                };
                (fd, described)
            })
            .collect();
        let full = Inherited {
            sockets,
            ..self.clone()
        };
        serde_json::to_string(&full).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }
}

/// Kind and state of the sockets of this network namespace, by inode, from
/// /proc/net. (SO_ACCEPTCONN via getsockopt would need a `BorrowedFd` made
/// from a raw fd number, which is `unsafe`; the kernel's tables say the same.)
#[derive(Debug, Default)]
struct SocketTable {
    by_inode: BTreeMap<u64, SocketInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketInfo {
    kind: &'static str,
    state: SocketState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SocketState {
    Listening,
    Connected,
    Open,
}

impl SocketTable {
    fn read() -> SocketTable {
        let mut table = SocketTable::default();
        for (file, kind) in [
            ("/proc/net/tcp", "tcp"),
            ("/proc/net/tcp6", "tcp"),
            ("/proc/net/udp", "udp"),
            ("/proc/net/udp6", "udp"),
        ] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (Some(st), Some(inode)) = (cols.get(3), cols.get(9)) else {
                    continue;
                };
                let state = match (kind, *st) {
                    ("tcp", "0A") => SocketState::Listening,
                    ("tcp", "01") => SocketState::Connected,
                    _ => SocketState::Open,
                };
                if let Ok(inode) = inode.parse() {
                    table.by_inode.insert(inode, SocketInfo { kind, state });
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string("/proc/net/unix") {
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (Some(flags), Some(st), Some(inode)) = (cols.get(3), cols.get(5), cols.get(6))
                else {
                    continue;
                };
                const SO_ACCEPTCON: u32 = 0x10000;
                let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & SO_ACCEPTCON != 0);
                let state = if listening {
                    SocketState::Listening
                } else if *st == "03" {
                    SocketState::Connected
                } else {
                    SocketState::Open
                };
                if let Ok(inode) = inode.parse() {
                    table.by_inode.insert(
                        inode,
                        SocketInfo {
                            kind: "unix",
                            state,
                        },
                    );
                }
            }
        }
        table
    }
}

/// One fd ≥ 3 for `/inherited`: the socket's kind, local address and state,
/// or the link target for anything that is not a known socket.
fn describe_fd(fd: i32, target: &str, table: &SocketTable) -> String {
    let Some(info) = target
        .strip_prefix("socket:[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inode| inode.parse::<u64>().ok())
        .and_then(|inode| table.by_inode.get(&inode))
    else {
        return target.to_string();
    };
    let Ok(local) = getsockname::<SockaddrStorage>(fd) else {
        return target.to_string();
    };
    let address = if let Some(unix) = local.as_unix_addr() {
        if let Some(path) = unix.path() {
            path.display().to_string()
        } else if let Some(name) = unix.as_abstract() {
            format!("@{}", String::from_utf8_lossy(name))
        } else {
            "(unnamed)".to_string()
        }
    } else if let Some(v4) = local.as_sockaddr_in() {
        SocketAddr::from(std::net::SocketAddrV4::from(*v4)).to_string()
    } else if let Some(v6) = local.as_sockaddr_in6() {
        SocketAddr::from(std::net::SocketAddrV6::from(*v6)).to_string()
    } else {
        format!("family {:?}", local.family())
    };
    let state = match info.state {
        SocketState::Listening => "listening",
        // A unix socket's table entry may not say; the peer does.
        SocketState::Connected => "connected",
        SocketState::Open if getpeername::<SockaddrStorage>(fd).is_ok() => "connected",
        SocketState::Open => "open",
    };
    format!("{}:{address} {state}", info.kind)
}

/// A listening socket taken over from the parent, or bound by `--bind`.
#[derive(Debug)]
enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl std::os::fd::AsFd for StdListener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            StdListener::Tcp(l) => l.as_fd(),
            StdListener::Unix(l) => l.as_fd(),
        }
    }
}

/// A listener and its `LISTEN_FDNAMES` name, if any.
#[derive(Debug)]
struct Inbound {
    listener: StdListener,
    name: Option<String>,
}

/// Takes every inherited listener: `LISTEN_FDS` (sd_listen_fds(3), checked
/// against `LISTEN_PID` by `listenfd`), or `UNICORN_FD` with
/// `--unicorn-fd`; failing those, binds `--bind`. An empty list means there
/// was nothing to take or bind. The fds are marked close-on-exec.
fn take_listeners(args: &Args, inherited: &Inherited) -> Result<Vec<Inbound>, Error> {
    let mut out = Vec::new();
    if args.unicorn_fd {
        let value = inherited.var("UNICORN_FD").unwrap_or_default();
        let fds = value
            .split(',')
            .map(|fd| fd.trim().parse::<i32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::UnicornFd(value.to_string()))?;
        for fd in fds {
            // listenfd only takes fds named by LISTEN_FDS; point it at one
            // fd at a time (it removes LISTEN_FDS and LISTEN_PID itself).
            std::env::set_var("LISTEN_FDS", "1");
            std::env::set_var("LISTEN_FDS_FIRST_FD", fd.to_string());
            std::env::remove_var("LISTEN_PID");
            let mut fds = listenfd::ListenFd::from_env();
            if let Some(listener) = take_one(&mut fds, 0, fd)? {
                out.push(Inbound {
                    listener,
                    name: None,
                });
            }
        }
        std::env::remove_var("LISTEN_FDS_FIRST_FD");
    } else {
        let names: Vec<&str> = inherited
            .var("LISTEN_FDNAMES")
            .map(|names| names.split(':').collect())
            .unwrap_or_default();
        // listenfd's extension to sd_listen_fds(3); only for error messages.
        let first: i32 = std::env::var("LISTEN_FDS_FIRST_FD")
            .ok()
            .and_then(|fd| fd.parse().ok())
            .unwrap_or(3);
        let mut fds = listenfd::ListenFd::from_env();
        for idx in 0..fds.len() {
            let fd = first + i32::try_from(idx).unwrap_or(i32::MAX - first);
            if let Some(listener) = take_one(&mut fds, idx, fd)? {
                out.push(Inbound {
                    listener,
                    name: names.get(idx).map(|name| name.to_string()),
                });
            }
        }
    }
    if out.is_empty() {
        if let Some(addr) = &args.bind {
            let bind_err = |source| Error::Bind {
                addr: addr.clone(),
                source,
            };
            let listener = match addr.strip_prefix("unix:") {
                Some(path) => StdListener::Unix(
                    std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?,
                ),
                None => StdListener::Tcp(std::net::TcpListener::bind(addr).map_err(bind_err)?),
            };
            out.push(Inbound {
                listener,
                name: None,
            });
        }
    }
    Ok(out)
}

fn take_one(
    fds: &mut listenfd::ListenFd,
    idx: usize,
    fd: i32,
) -> Result<Option<StdListener>, Error> {
    match fds.take_tcp_listener(idx) {
        Ok(tcp) => Ok(tcp.map(StdListener::Tcp)),
        Err(_) => fds
            .take_unix_listener(idx)
            .map(|unix| unix.map(StdListener::Unix))
            .map_err(|source| Error::NotStreamSocket { fd, source }),
    }
}

/// Where the worker is in its life; connections watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving.
    Serving,
    /// The drain signal came: listeners are closed, idle connections are
    /// kept until `lame_duck_until`, requests get `Connection: close`.
    Draining { lame_duck_until: Instant },
}

/// The running worker: flags, captured state and counters shared by every
/// connection.
struct Worker {
    args: Args,
    pid: u32,
    /// `HOLDFAST_WORKER_ID` or `-`.
    slot: String,
    /// `HOLDFAST_GENERATION` or `-`.
    generation: String,
    inherited: Inherited,
    /// `/inherited`'s body, rendered on first use.
    inherited_json: std::sync::OnceLock<String>,
    requests: AtomicU64,
    memory: Memory,
    /// Set by `GET /exit?code=N`: drain, then exit with N.
    exit_request: watch::Sender<Option<u8>>,
}

impl Worker {
    fn new(args: Args, inherited: Inherited) -> Result<Worker, Error> {
        let var = |name| inherited.var(name).unwrap_or("-").to_string();
        Ok(Worker {
            pid: std::process::id(),
            slot: var("HOLDFAST_WORKER_ID"),
            generation: var("HOLDFAST_GENERATION"),
            inherited_json: std::sync::OnceLock::new(),
            inherited,
            requests: AtomicU64::new(0),
            memory: Memory::default(),
            exit_request: watch::Sender::new(None),
            args,
        })
    }

    /// Serves until drained (exit 0, or the `/exit` code), SIGINT (exit 0) or
    /// a `--quick-term` SIGTERM (exit 0), or `--close-inherited` hands over
    /// to a child. `--close-listener` names are closed first.
    async fn run(self: Arc<Self>, mut listeners: Vec<Inbound>) -> ExitCode {
        let mut handled = vec![SIGTERM, SIGQUIT, SIGINT, SIGUSR1];
        if self.args.exit_on_usr2.is_some() {
            handled.push(SIGUSR2);
        }
        let signals = match Signals::new(handled) {
            Ok(signals) => signals,
            Err(source) => {
                say(&format!(
                    "test-worker: {}",
                    Error::Setup {
                        what: "signal handlers",
                        source
                    }
                ));
                return ExitCode::from(EX_SOFTWARE);
            }
        };
        if self.args.close_inherited {
            drop(listeners);
            return self.run_without_listeners(signals).await;
        }
        for name in &self.args.close_listener {
            let before = listeners.len();
            listeners.retain(|l| l.name.as_deref() != Some(name.as_str()));
            if listeners.len() == before {
                say(&format!(
                    "test-worker {}: --close-listener {name}: no inherited listener of that name",
                    self.pid
                ));
            }
        }
        match self.serve(listeners, signals).await {
            Ok(code) => code,
            Err(e) => {
                say(&format!("test-worker {}: {e}", self.pid));
                ExitCode::from(EX_SOFTWARE)
            }
        }
    }

    async fn serve(
        self: &Arc<Self>,
        listeners: Vec<Inbound>,
        mut signals: Signals,
    ) -> Result<ExitCode, Error> {
        if self.args.shared_mb > 0 {
            self.memory.grow(self.args.shared_mb.min(MAX_GROW_MB) * MIB);
        }
        if self.args.daemon {
            self.spawn_daemon(&listeners)?;
        }
        let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
        let (conn_tx, mut conn_rx) = mpsc::channel::<()>(1);
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        // Only the last listener can be holdfast's probe socket.
        let probe_index = listeners.len().checked_sub(1).filter(|&last| {
            self.args.probe_fail && listeners[last].name.as_deref() == Some(PROBE_FDNAME)
        });
        let mut acceptors = Vec::new();
        for (idx, inbound) in listeners.into_iter().enumerate() {
            let listener = Listener::from_std(inbound.listener).map_err(|source| Error::Setup {
                what: "register listener",
                source,
            })?;
            acceptors.push(tokio::spawn(Arc::clone(self).accept_loop(
                listener,
                probe_index == Some(idx),
                phase_rx.clone(),
                conn_tx.clone(),
                Arc::clone(&permits),
            )));
        }
        let mut children = self.spawn_children().await?;
        if !self.args.never_ready {
            tokio::spawn(Arc::clone(self).announce_ready());
        }
        let crash_here = match self.args.crash_slot {
            Some(slot) => self.slot == slot.to_string(),
            None => true,
        };
        if let Some(ms) = self.args.crash_after_ms.filter(|_| crash_here) {
            tokio::spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                say(&format!("test-worker: crashing on purpose after {ms} ms"));
                std::process::exit(CRASH_CODE);
            });
        }
        if self.args.grow_mb_per_sec > 0 {
            tokio::spawn(Arc::clone(self).grow_forever(self.args.grow_mb_per_sec));
        }
        if let Some(ms) = self.args.close_listeners_after_ms {
            let accepting: Vec<_> = acceptors.iter().map(|a| a.abort_handle()).collect();
            let pid = self.pid;
            tokio::spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                // Each accept loop owns its listener: ending it closes the fd.
                for a in accepting {
                    a.abort();
                }
                say(&format!(
                    "test-worker {pid}: closed its listeners on purpose after {ms} ms (--close-listeners-after-ms)"
                ));
            });
        }
        if let Some(ms) = self.args.close_stdio_after_ms {
            let pid = self.pid;
            tokio::spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                say(&format!(
                    "test-worker {pid}: closing stdout and stderr on purpose (--close-stdio-after-ms)"
                ));
                if let Err(e) = close_stdio() {
                    say(&format!("test-worker {pid}: --close-stdio-after-ms: {e}"));
                }
            });
        }
        let log = LogThread::start(self);

        // Serving: wait for the drain signal or `/exit`.
        let mut exit_request = self.exit_request.subscribe();
        let code = loop {
            tokio::select! {
                signal = signals.next() => match signal {
                    Some(SIGTERM | SIGQUIT) if self.args.ignore_term => {
                        say(&format!("test-worker {}: ignoring drain signal", self.pid));
                    }
                    Some(SIGTERM) if self.args.quick_term => {
                        return Ok(self.exit_now("SIGTERM (--quick-term)"));
                    }
                    Some(SIGTERM | SIGQUIT) => break 0,
                    Some(SIGINT) | None => return Ok(self.exit_now("SIGINT")),
                    Some(SIGUSR1) => say(&format!("test-worker {}: USR1", self.pid)),
                    // Only handled (registered) with --exit-on-usr2.
                    Some(SIGUSR2) => if let Some(code) = self.args.exit_on_usr2 {
                        say(&format!("test-worker {}: SIGUSR2 (--exit-on-usr2): draining, then exiting with {code}", self.pid));
                        break code;
                    },
                    Some(_) => {}
                },
                Ok(()) = exit_request.changed() => {
                    if let Some(code) = *exit_request.borrow_and_update() {
                        say(&format!("test-worker {}: GET /exit: draining, then exiting with {code}", self.pid));
                        break code;
                    }
                }
            }
        };

        // Draining.
        say(&format!("test-worker {}: draining", self.pid));
        let lame_duck_until = Instant::now() + Duration::from_millis(self.args.lame_duck_ms);
        let _ = phase_tx.send(Phase::Draining { lame_duck_until });
        for acceptor in &acceptors {
            acceptor.abort();
        }
        if let Some(log) = &log {
            log.stop();
        }
        for child in &children {
            if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        drop(conn_tx);
        loop {
            tokio::select! {
                _ = conn_rx.recv() => break,
                signal = signals.next() => match signal {
                    Some(SIGINT) | None => return Ok(self.exit_now("SIGINT")),
                    Some(SIGTERM) if self.args.quick_term => {
                        return Ok(self.exit_now("SIGTERM (--quick-term)"));
                    }
                    Some(SIGUSR1) => say(&format!("test-worker {}: USR1", self.pid)),
                    Some(_) => {}
                },
            }
        }
        for child in &mut children {
            let _ = child.wait().await;
        }
        if let Some(log) = log {
            let last = log.finish();
            let _ = self.write_log(format!("w{} {} done {last}\n", self.slot, self.pid).as_bytes());
        }
        say(&format!(
            "test-worker {}: drained, exiting with {code}",
            self.pid
        ));
        self.write_partial_line();
        Ok(ExitCode::from(code))
    }

    /// SIGINT, or SIGTERM with `--quick-term`: exit 0 at once. Returning
    /// drops the runtime, which closes every connection unanswered;
    /// children are killed on drop.
    fn exit_now(&self, why: &str) -> ExitCode {
        say(&format!("test-worker {}: {why}, exiting at once", self.pid));
        self.write_partial_line();
        ExitCode::SUCCESS
    }

    fn write_partial_line(&self) {
        if self.args.partial_last_line {
            let _ = self.write_log(format!("w{} {} partial", self.slot, self.pid).as_bytes());
        }
    }

    /// Writes bytes to the log stream (stdout, or stderr with `--log-stderr`)
    /// in one `write_all` under the stream's lock.
    fn write_log(&self, bytes: &[u8]) -> io::Result<()> {
        write_stream(self.args.log_stderr, bytes)
    }

    /// `--close-inherited`: the listeners are already closed; a child with no
    /// listener sends READY=1 and sleeps. Signals are passed on to it; this
    /// process exits with the child's code.
    async fn run_without_listeners(&self, mut signals: Signals) -> ExitCode {
        let mut child = match self.spawn_helper(ChildRole::ServeNothing, &[], true) {
            Ok(child) => child,
            Err(e) => {
                say(&format!("test-worker {}: {e}", self.pid));
                return ExitCode::from(EX_SOFTWARE);
            }
        };
        let child_pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        loop {
            tokio::select! {
                status = child.wait() => {
                    let code = status.ok().and_then(|s| s.code()).unwrap_or(1);
                    say(&format!("test-worker {}: child exited with {code}", self.pid));
                    return ExitCode::from(u8::try_from(code).unwrap_or(1));
                }
                signal = signals.next() => match signal {
                    Some(SIGUSR1) => say(&format!("test-worker {}: USR1", self.pid)),
                    Some(_) | None => {
                        if let Some(pid) = child_pid {
                            let _ = kill(pid, Signal::SIGTERM);
                        }
                    }
                },
            }
        }
    }

    /// Spawns `--children` idle helpers, each allocating `--shared-mb` and
    /// growing at `--child-grow-mb-per-sec`.
    async fn spawn_children(&self) -> Result<Vec<tokio::process::Child>, Error> {
        let mut extra = Vec::new();
        if self.args.shared_mb > 0 {
            extra.push(format!("--shared-mb={}", self.args.shared_mb));
        }
        if self.args.child_grow_mb_per_sec > 0 {
            extra.push(format!(
                "--grow-mb-per-sec={}",
                self.args.child_grow_mb_per_sec
            ));
        }
        (0..self.args.children)
            .map(|_| self.spawn_helper(ChildRole::Idle, &extra, false))
            .collect()
    }

    /// Re-execs this binary as `test-worker --child-role ROLE`, without the
    /// socket-activation variables (the listeners are close-on-exec) and,
    /// unless `notify`, without `NOTIFY_SOCKET`. The child is killed when
    /// its handle is dropped.
    fn spawn_helper(
        &self,
        role: ChildRole,
        extra: &[String],
        notify: bool,
    ) -> Result<tokio::process::Child, Error> {
        let mut command = self.helper_command(role, extra, notify)?;
        command.kill_on_drop(true);
        command.spawn().map_err(|source| Error::Setup {
            what: "spawn child",
            source,
        })
    }

    /// `--daemon`: spawns the [`ChildRole::Daemon`] helper with a `dup` of
    /// every listener. `dup` leaves close-on-exec off, so the child inherits
    /// the copies (at whatever numbers they got); this process closes them
    /// again as soon as the child is spawned. Nothing else spawns meanwhile:
    /// this runs before any helper, task or thread is started. The child is
    /// not tracked: not killed on drop, not signalled at the drain.
    fn spawn_daemon(&self, listeners: &[Inbound]) -> Result<(), Error> {
        let copies = listeners
            .iter()
            .map(|l| nix::unistd::dup(std::os::fd::AsFd::as_fd(&l.listener)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Setup {
                what: "dup listener for the daemon",
                source: e.into(),
            })?;
        let mut command = self.helper_command(ChildRole::Daemon, &[], false)?;
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false);
        let child = command.spawn().map_err(|source| Error::Setup {
            what: "spawn daemon",
            source,
        })?;
        drop(copies);
        say(&format!(
            "test-worker {}: daemon {} holds {} listener(s)",
            self.pid,
            child.id().unwrap_or(0),
            listeners.len()
        ));
        Ok(())
    }

    /// The command line and environment of a helper (see [`Worker::spawn_helper`]).
    fn helper_command(
        &self,
        role: ChildRole,
        extra: &[String],
        notify: bool,
    ) -> Result<tokio::process::Command, Error> {
        let exe = std::env::current_exe().map_err(|source| Error::Setup {
            what: "current_exe",
            source,
        })?;
        let role_name = match role {
            ChildRole::Notify => "notify",
            ChildRole::ServeNothing => "serve-nothing",
            ChildRole::Idle => "idle",
            ChildRole::Daemon => "daemon",
        };
        let mut command = tokio::process::Command::new(exe);
        command
            .arg(format!("--child-role={role_name}"))
            .arg(format!("--parent-pid={}", self.pid))
            .args(extra)
            .stdin(std::process::Stdio::null());
        for var in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "LISTEN_FDS_FIRST_FD",
            "UNICORN_FD",
        ] {
            command.env_remove(var);
        }
        if !notify {
            command.env_remove("NOTIFY_SOCKET");
        }
        Ok(command)
    }

    /// Sends READY=1 (after `--ready-delay-ms`), from this pid or, with
    /// `--ready-from-child`, from a short-lived child.
    async fn announce_ready(self: Arc<Self>) {
        if self.args.ready_delay_ms > 0 {
            sleep(Duration::from_millis(self.args.ready_delay_ms)).await;
        }
        if self.args.ready_from_child {
            match self.spawn_helper(ChildRole::Notify, &[], true) {
                Ok(mut child) => {
                    if let Ok(status) = child.wait().await {
                        if !status.success() {
                            say(&format!(
                                "test-worker {}: notify child failed: {status}",
                                self.pid
                            ));
                        }
                    }
                }
                Err(e) => say(&format!("test-worker {}: {e}", self.pid)),
            }
        } else if let Err(e) = notify_ready() {
            say(&format!("test-worker {}: {e}", self.pid));
        }
    }

    async fn grow_forever(self: Arc<Self>, mb_per_sec: u64) {
        grow_at(&self.memory, mb_per_sec).await;
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: Listener,
        probe_fail: bool,
        phase: watch::Receiver<Phase>,
        conns: mpsc::Sender<()>,
        permits: Arc<Semaphore>,
    ) {
        loop {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let conn = Conn {
                worker: Arc::clone(&self),
                phase: phase.clone(),
                probe_fail,
                _tracker: conns.clone(),
                _permit: permit,
            };
            let accepted = match &listener {
                Listener::Tcp(l) => l.accept().await.map(|(stream, _)| {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(conn.serve(stream));
                }),
                Listener::Unix(l) => l.accept().await.map(|(stream, _)| {
                    tokio::spawn(conn.serve(stream));
                }),
            };
            if let Err(e) = accepted {
                // EMFILE and friends: back off instead of spinning.
                say(&format!("test-worker {}: accept: {e}", self.pid));
                sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Answers one request. `n` counts every request of this process.
    async fn respond(&self, req: &Request, probe_fail: bool) -> Response {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if probe_fail {
            return Response::text(503, "probe failing on purpose (--probe-fail)\n".into());
        }
        if let (Some(every), Some(mb)) = (self.args.grow_after_requests, self.args.grow_mb) {
            if every > 0 && n % every == 0 {
                self.memory.grow(mb.min(MAX_GROW_MB) * MIB);
            }
        }
        let sleep_ms = match req.param("sleep") {
            Some(ms) => match ms.parse::<u64>() {
                Ok(ms) => ms,
                Err(_) => return Response::text(400, format!("bad sleep={ms}\n")),
            },
            None => self.args.sleep_ms,
        };
        if sleep_ms > 0 {
            sleep(Duration::from_millis(sleep_ms.min(MAX_SLEEP_MS))).await;
        }
        let path = req.path();
        if path == "/inherited" {
            return Response {
                status: 200,
                content_type: "application/json",
                body: format!(
                    "{}\n",
                    self.inherited_json.get_or_init(|| self.inherited.render())
                )
                .into_bytes(),
            };
        }
        if path == "/spike" {
            return self.spike(req).await;
        }
        if path == "/exit" {
            return self.exit_on_request(req);
        }
        if path == "/grow" {
            return match req.param("mb").map(str::parse::<u64>) {
                Some(Ok(mb)) if mb <= MAX_GROW_MB => {
                    let total = self.memory.grow(mb * MIB);
                    Response::text(200, format!("total_mb={}\n", total / MIB))
                }
                _ => Response::text(400, format!("want /grow?mb=N with N <= {MAX_GROW_MB}\n")),
            };
        }
        if let Some(code) = path.strip_prefix("/status/") {
            return match code.parse::<u16>() {
                Ok(code) if (200..=599).contains(&code) => {
                    Response::text(code, format!("status={code} pid={}\n", self.pid))
                }
                _ => Response::text(400, format!("bad status {code:?}: want 200..=599\n")),
            };
        }
        Response::text(
            200,
            format!(
                "pid={} slot={} gen={} n={n}\n",
                self.pid, self.slot, self.generation
            ),
        )
    }
}

impl Worker {
    /// `/exit?code=N`: a clean crash. Answers 200, then the worker drains
    /// as on its drain signal (stops accepting, finishes what is in flight,
    /// keeps idle keep-alive connections for the lame duck) and exits with
    /// N instead of 0. Whichever worker accepts the request exits: under
    /// load an idle worker wins nearly every accept, so to aim at one pid
    /// use SIGUSR2 with `--exit-on-usr2`.
    fn exit_on_request(&self, req: &Request) -> Response {
        let code = match req.param("code").map(str::parse::<u8>) {
            Some(Ok(code)) => code,
            _ => return Response::text(400, "want /exit?code=N with N in 0..=255\n".into()),
        };
        self.exit_request.send_replace(Some(code));
        Response::text(200, format!("pid={} exiting with {code}\n", self.pid))
    }

    /// `/spike?mb=N&ms=D`: allocates and touches N MiB, holds it D ms
    /// (default 500), then frees it (a block this big is its own mmap, so
    /// freeing it returns the pages to the kernel). A short spike for the
    /// memory tests' grace check.
    async fn spike(&self, req: &Request) -> Response {
        let mb = match req.param("mb").map(str::parse::<u64>) {
            Some(Ok(mb)) if mb <= MAX_GROW_MB => mb,
            _ => return Response::text(400, format!("want /spike?mb=N with N <= {MAX_GROW_MB}\n")),
        };
        let ms = match req.param("ms").map(str::parse::<u64>) {
            None => 500,
            Some(Ok(ms)) if ms <= MAX_SLEEP_MS => ms,
            Some(_) => return Response::text(400, "bad ms=\n".into()),
        };
        let block = match touched(mb * MIB) {
            Ok(block) => block,
            Err(e) => return Response::text(500, format!("spike of {mb} MiB: {e}\n")),
        };
        say(&format!(
            "test-worker {}: spike of {mb} MiB for {ms} ms",
            self.pid
        ));
        sleep(Duration::from_millis(ms)).await;
        drop(std::hint::black_box(block));
        say(&format!(
            "test-worker {}: spike of {mb} MiB freed",
            self.pid
        ));
        Response::text(200, format!("pid={} spiked={mb}MiB ms={ms}\n", self.pid))
    }
}

/// A listener registered with tokio.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Sets the socket non-blocking (on the open file description it shares
    /// with holdfast) and registers it with the runtime.
    fn from_std(listener: StdListener) -> io::Result<Listener> {
        Ok(match listener {
            StdListener::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            StdListener::Unix(l) => {
                l.set_nonblocking(true)?;
                Listener::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        })
    }
}

/// One accepted connection. Dropping it releases its tracker (the drain
/// waits for all of them) and its permit.
struct Conn {
    worker: Arc<Worker>,
    phase: watch::Receiver<Phase>,
    probe_fail: bool,
    _tracker: mpsc::Sender<()>,
    _permit: OwnedSemaphorePermit,
}

/// Why a connection stopped before a complete request head.
#[derive(Debug)]
enum ConnEnd {
    /// EOF, lame duck over, idle timeout, read timeout or I/O error: close
    /// without answering.
    Close,
    /// A bad request: answer with an error and close.
    Bad(ParseError),
}

impl Conn {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut self, mut stream: S) {
        let mut buf = Vec::with_capacity(4096);
        loop {
            let (req, head_len) = match self.read_head(&mut stream, &mut buf).await {
                Ok(head) => head,
                Err(ConnEnd::Close) => return,
                Err(ConnEnd::Bad(e)) => {
                    let resp = Response::text(e.status(), format!("{e}\n"));
                    let _ = stream.write_all(&resp.encode(false, true, false)).await;
                    let _ = stream.shutdown().await;
                    return;
                }
            };
            buf.drain(..head_len);
            if req.content_length > MAX_BODY_BYTES {
                let e = ParseError::BodyTooLarge;
                let resp = Response::text(e.status(), format!("{e}\n"));
                let _ = stream.write_all(&resp.encode(false, true, false)).await;
                return;
            }
            let send_continue = req.expect_continue && req.content_length > 0 && buf.is_empty();
            if send_continue && stream.write_all(CONTINUE).await.is_err() {
                return;
            }
            if discard_body(&mut stream, &mut buf, req.content_length)
                .await
                .is_err()
            {
                return;
            }
            let resp = self.worker.respond(&req, self.probe_fail).await;
            let draining = matches!(*self.phase.borrow(), Phase::Draining { .. });
            let close = !req.keep_alive || draining;
            let head_only = req.method == "HEAD";
            let bytes = resp.encode(head_only, close, req.version == Version::Http10);
            if stream.write_all(&bytes).await.is_err() {
                return;
            }
            if close {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }

    /// Reads until `buf` holds a whole request head. While no byte of the
    /// next request is there, the connection is idle: it is closed at the
    /// end of the lame duck or after [`IDLE_TIMEOUT`]. A request that has
    /// started is read to its end, whatever the phase.
    async fn read_head<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        buf: &mut Vec<u8>,
    ) -> Result<(Request, usize), ConnEnd> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(head) = parse_head(buf).map_err(ConnEnd::Bad)? {
                return Ok(head);
            }
            let idle = buf.iter().all(|&b| b == b'\r' || b == b'\n');
            let read = if idle {
                tokio::select! {
                    read = stream.read(&mut chunk) => read,
                    _ = lame_duck_over(&mut self.phase) => return Err(ConnEnd::Close),
                    _ = sleep(IDLE_TIMEOUT) => return Err(ConnEnd::Close),
                }
            } else {
                timeout(READ_TIMEOUT, stream.read(&mut chunk))
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            };
            match read {
                Ok(0) | Err(_) => return Err(ConnEnd::Close),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Reads and drops `len` body bytes, first from `buf`, then from `stream`.
async fn discard_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    len: u64,
) -> io::Result<()> {
    let buffered = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
    buf.drain(..buffered);
    let mut left = len - buffered as u64;
    let mut chunk = [0u8; 8192];
    while left > 0 {
        let want = usize::try_from(left)
            .unwrap_or(chunk.len())
            .min(chunk.len());
        let n = timeout(READ_TIMEOUT, stream.read(&mut chunk[..want]))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(())
}

/// Resolves once the worker is draining and its lame duck is over; never
/// while serving.
async fn lame_duck_over(phase: &mut watch::Receiver<Phase>) {
    loop {
        let current = *phase.borrow_and_update();
        match current {
            Phase::Draining { lame_duck_until } => {
                sleep_until(lame_duck_until).await;
                return;
            }
            Phase::Serving => {
                if phase.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http10,
    Http11,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    method: String,
    /// The request target as sent (path and query).
    target: String,
    version: Version,
    /// Body length from `Content-Length` (0 if absent).
    content_length: u64,
    /// Whether the connection stays open after the answer, from the version
    /// and `Connection` header.
    keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    expect_continue: bool,
}

impl Request {
    fn path(&self) -> &str {
        let path = self.target.split('?').next().unwrap_or_default();
        // Absolute form (`http://host/path`), as a proxy may send.
        match path.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |at| &rest[at..]),
            None => path,
        }
    }

    /// The value of query parameter `key`, undecoded.
    fn param(&self, key: &str) -> Option<&str> {
        let (_, query) = self.target.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then_some(v)
        })
    }
}

/// Why a request head was refused; each maps to a status code.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ParseError {
    HeadTooLarge,
    BodyTooLarge,
    Malformed(&'static str),
    UnsupportedVersion,
    TransferEncoding,
}

impl ParseError {
    fn status(&self) -> u16 {
        match self {
            ParseError::HeadTooLarge => 431,
            ParseError::BodyTooLarge => 413,
            ParseError::Malformed(_) => 400,
            ParseError::UnsupportedVersion => 505,
            ParseError::TransferEncoding => 501,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::HeadTooLarge => write!(f, "request head over {MAX_HEAD_BYTES} bytes"),
            ParseError::BodyTooLarge => write!(f, "request body over {MAX_BODY_BYTES} bytes"),
            ParseError::Malformed(what) => write!(f, "bad request: {what}"),
            ParseError::UnsupportedVersion => write!(f, "only HTTP/1.0 and HTTP/1.1"),
            ParseError::TransferEncoding => write!(f, "Transfer-Encoding is not supported"),
        }
    }
}

/// Parses one request head from the start of `buf`: the request line and
/// headers up to `\r\n\r\n` (empty lines before the request line are
/// skipped, as RFC 9112 allows). Returns the request and the number of bytes
/// it took, or `None` if the head is not complete yet.
fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, ParseError> {
    let start = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let Some(end) = buf[start..].windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() - start > MAX_HEAD_BYTES {
            Err(ParseError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEAD_BYTES {
        return Err(ParseError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[start..start + end])
        .map_err(|_| ParseError::Malformed("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::Malformed("request line"));
    };
    if method.is_empty()
        || !method
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
    {
        return Err(ParseError::Malformed("method"));
    }
    if target.is_empty() || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(ParseError::Malformed("request target"));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        v if v.starts_with("HTTP/") => return Err(ParseError::UnsupportedVersion),
        _ => return Err(ParseError::Malformed("version")),
    };
    let mut content_length: Option<u64> = None;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    for (i, line) in lines.enumerate() {
        if i >= MAX_HEADERS {
            return Err(ParseError::HeadTooLarge);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ParseError::Malformed("header line without ':'"));
        };
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(ParseError::Malformed("header name"));
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if name.eq_ignore_ascii_case("content-length") {
            let len = value
                .parse::<u64>()
                .map_err(|_| ParseError::Malformed("Content-Length"))?;
            if content_length.is_some_and(|old| old != len) {
                return Err(ParseError::Malformed("conflicting Content-Length"));
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::TransferEncoding);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue |= value.eq_ignore_ascii_case("100-continue");
        }
    }
    let keep_alive = match version {
        Version::Http11 => !close,
        Version::Http10 => keep_alive && !close,
    };
    let request = Request {
        method: method.to_string(),
        target: target.to_string(),
        version,
        content_length: content_length.unwrap_or(0),
        keep_alive,
        expect_continue,
    };
    Ok(Some((request, start + end + 4)))
}

/// An answer before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "text/plain",
            body: body.into_bytes(),
        }
    }

    /// The bytes on the wire. `head_only` for HEAD; `close` adds
    /// `Connection: close`; `http10_keep_alive` adds `Connection: keep-alive`
    /// when not closing (an HTTP/1.0 client asked for it).
    fn encode(&self, head_only: bool, close: bool, http10_keep_alive: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        let no_body = matches!(self.status, 204 | 304);
        if !no_body {
            out.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        out.push_str(&format!("X-Pid: {}\r\n", std::process::id()));
        if close {
            out.push_str("Connection: close\r\n");
        } else if http10_keep_alive {
            out.push_str("Connection: keep-alive\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only && !no_body {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Memory allocated on purpose and kept for the process lifetime.
#[derive(Debug, Default)]
struct Memory {
    blocks: Mutex<Vec<Vec<u8>>>,
    total: AtomicU64,
}

impl Memory {
    /// Allocates `bytes` and writes every page, so they count in RSS.
    /// Returns the total grown so far, in bytes. An allocation the allocator
    /// refuses is skipped (reported on stderr), not fatal.
    fn grow(&self, bytes: u64) -> u64 {
        let block = match touched(bytes) {
            Ok(block) => block,
            Err(e) => {
                say(&format!(
                    "test-worker {}: grow {bytes} bytes: {e}",
                    std::process::id()
                ));
                return self.total.load(Ordering::Relaxed);
            }
        };
        if let Ok(mut blocks) = self.blocks.lock() {
            blocks.push(block);
        }
        self.total.fetch_add(bytes, Ordering::Relaxed) + bytes
    }
}

/// `bytes` of memory with every page written, so they count in RSS.
fn touched(bytes: u64) -> Result<Vec<u8>, String> {
    let len = usize::try_from(bytes).map_err(|e| e.to_string())?;
    // Ask first, so a refused size is an error rather than an abort; then
    // take zeroed memory (calloc: fast even unoptimised, unlike `resize`).
    Vec::<u8>::new()
        .try_reserve_exact(len)
        .map_err(|e| e.to_string())?;
    let mut block = vec![0u8; len];
    for page in block.iter_mut().step_by(PAGE) {
        *page = 1;
    }
    Ok(std::hint::black_box(block))
}

/// Grows `memory` by `mb_per_sec` MiB per second, a tenth every 100 ms.
async fn grow_at(memory: &Memory, mb_per_sec: u64) {
    let step = mb_per_sec.min(MAX_GROW_MB) * MIB / 10;
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    loop {
        ticks.tick().await;
        memory.grow(step);
    }
}

/// The `--log-lines` writer: a std thread that writes whole numbered lines
/// with one blocking `write_all` each, so a slow reader never stalls HTTP.
struct LogThread {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl LogThread {
    /// Starts the writer if `--log-lines` or `--log-forever` asks for lines.
    fn start(worker: &Worker) -> Option<LogThread> {
        let args = &worker.args;
        if args.log_lines == 0 && !args.log_forever {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let spec = LogSpec {
            prefix: format!("w{} {}", worker.slot, worker.pid),
            lines: args.log_lines,
            forever: args.log_forever,
            rate: args.log_rate,
            line_bytes: args.log_line_bytes,
            stderr: args.log_stderr,
        };
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("log-lines".into())
            .spawn(move || spec.write_lines(&flag))
            .ok()?;
        Some(LogThread { stop, handle })
    }

    /// Asks the writer to stop after the line it is writing.
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
    }

    /// Stops the writer and returns the last sequence number written.
    /// Blocks while the writer is stuck on a full pipe.
    fn finish(self) -> u64 {
        self.stop();
        self.handle.join().unwrap_or(0)
    }
}

struct LogSpec {
    /// `w<slot> <pid>`.
    prefix: String,
    lines: u64,
    forever: bool,
    /// Lines per second, 0 for flat out.
    rate: u64,
    line_bytes: usize,
    stderr: bool,
}

impl LogSpec {
    /// Writes lines until done or stopped; returns the last sequence number.
    fn write_lines(&self, stop: &AtomicBool) -> u64 {
        let started = std::time::Instant::now();
        let mut seq = 0u64;
        while (self.forever || seq < self.lines) && !stop.load(Ordering::Relaxed) {
            if self.rate > 0 {
                let due = started + Duration::from_secs_f64(seq as f64 / self.rate as f64);
                loop {
                    let now = std::time::Instant::now();
                    if now >= due || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::park_timeout(due - now);
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            seq += 1;
            if write_stream(self.stderr, &self.line(seq)).is_err() {
                break;
            }
        }
        seq
    }

    /// `w<slot> <pid> <seq> xxx...\n`, padded to `line_bytes` when it fits.
    fn line(&self, seq: u64) -> Vec<u8> {
        let mut line = format!("{} {seq} ", self.prefix).into_bytes();
        let want = self.line_bytes.saturating_sub(1);
        if line.len() < want {
            line.resize(want, b'x');
        } else {
            line.pop();
        }
        line.push(b'\n');
        line
    }
}

/// One `write_all` (and flush) to stdout or stderr under its lock.
fn write_stream(stderr: bool, bytes: &[u8]) -> io::Result<()> {
    if stderr {
        io::stderr().lock().write_all(bytes)
    } else {
        let mut out = io::stdout().lock();
        out.write_all(bytes)?;
        out.flush()
    }
}

/// Points fds 1 and 2 at /dev/null: the pipes to holdfast are closed for
/// this process, and later writes go nowhere instead of failing (or, were
/// the fds merely closed, landing in whatever opens as fd 1 next).
fn close_stdio() -> io::Result<()> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}

/// A line on stderr, written in one piece.
fn say(msg: &str) {
    let _ = io::stderr().lock().write_all(format!("{msg}\n").as_bytes());
}

/// Sends `READY=1` and `STATUS=serving` to `NOTIFY_SOCKET` (sd_notify(3));
/// nothing if it is unset. sd-notify 0.5 treats an `@` name as a path, so
/// the abstract namespace is handled here.
/// sd_notify_barrier(3): sends `BARRIER=1` with the write end of a pipe and
/// waits up to `timeout` for the manager to close it, which it does only
/// after handling every earlier message of this sender. systemd-notify does
/// this by default; a sender that exits right after `READY=1` needs it.
fn notify_barrier(timeout: Duration) -> Result<(), Error> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::{AsFd, AsRawFd};
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let notify_err = |source: io::Error| Error::Notify {
        socket: socket.to_string_lossy().into_owned(),
        source,
    };
    let sock = std::os::unix::net::UnixDatagram::unbound().map_err(notify_err)?;
    match socket.to_str().and_then(|s| s.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(notify_err)?;
            sock.connect_addr(&addr).map_err(notify_err)?;
        }
        None => sock.connect(&socket).map_err(notify_err)?,
    }
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| notify_err(e.into()))?;
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[io::IoSlice::new(b"BARRIER=1\n")],
        &[ControlMessage::ScmRights(&[write.as_raw_fd()])],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| notify_err(e.into()))?;
    drop(write);
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, ms) {
        Ok(0) => Err(notify_err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("BARRIER=1 not released within {timeout:?}"),
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(notify_err(e.into())),
    }
}

fn notify_ready() -> Result<(), Error> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let states = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ];
    let notify_err = |source| Error::Notify {
        socket: socket.to_string_lossy().into_owned(),
        source,
    };
    match socket.to_str().and_then(|s| s.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(notify_err)?;
            let sock = std::os::unix::net::UnixDatagram::unbound().map_err(notify_err)?;
            sock.connect_addr(&addr).map_err(notify_err)?;
            sock.send(b"READY=1\nSTATUS=serving\n")
                .map(drop)
                .map_err(notify_err)
        }
        None => sd_notify::notify(&states).map_err(notify_err),
    }
}

/// The re-exec'd helpers. Each dies with its parent (PR_SET_PDEATHSIG),
/// except the daemon, which leaves its session instead.
async fn run_child(role: ChildRole, args: &Args) -> ExitCode {
    let pid = std::process::id();
    if role == ChildRole::Daemon {
        if let Err(e) = nix::unistd::setsid() {
            say(&format!("test-worker {pid} (daemon): setsid: {e}"));
            return ExitCode::from(EX_SOFTWARE);
        }
    } else {
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
        if args
            .parent_pid
            .is_some_and(|parent| nix::unistd::getppid() != Pid::from_raw(parent))
        {
            return ExitCode::SUCCESS; // The parent is already gone.
        }
    }
    if role == ChildRole::Notify {
        // This child exits right after READY=1: wait until the manager has
        // handled it, or it may find the sender gone before it can tell whose
        // descendant it was.
        return match notify_ready().and_then(|()| notify_barrier(Duration::from_secs(5))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say(&format!("test-worker {pid} (notify child): {e}"));
                ExitCode::from(1)
            }
        };
    }
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGQUIT]) {
        Ok(signals) => signals,
        Err(e) => {
            say(&format!("test-worker {pid} (child): signal handlers: {e}"));
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let memory = Memory::default();
    match role {
        ChildRole::ServeNothing => {
            if let Err(e) = notify_ready() {
                say(&format!("test-worker {pid} (serve-nothing child): {e}"));
            }
        }
        ChildRole::Idle if args.shared_mb > 0 => {
            memory.grow(args.shared_mb.min(MAX_GROW_MB) * MIB);
        }
        _ => {}
    }
    let growth = async {
        if args.grow_mb_per_sec > 0 {
            grow_at(&memory, args.grow_mb_per_sec).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        signal = signals.next() => {
            let name = match signal {
                Some(SIGTERM) => "SIGTERM",
                Some(SIGQUIT) => "SIGQUIT",
                Some(SIGINT) => "SIGINT",
                _ => "end of signals",
            };
            say(&format!("test-worker {pid} (child): {name}, exiting"));
        }
        _ = growth => {}
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<(Request, usize)>, ParseError> {
        parse_head(raw.as_bytes())
    }

    fn request(raw: &str) -> Request {
        match parse(raw) {
            Ok(Some((req, used))) => {
                assert_eq!(used, raw.len(), "consumed the whole head of {raw:?}");
                req
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn simple_get_keeps_alive_on_http11() {
        let req = request("GET /?sleep=30 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(req.method, "GET");
        assert_eq!(req.path(), "/");
        assert_eq!(req.param("sleep"), Some("30"));
        assert_eq!(req.param("mb"), None);
        assert_eq!(req.version, Version::Http11);
        assert!(req.keep_alive);
        assert_eq!(req.content_length, 0);
    }

    #[test]
    fn connection_header_rules() {
        let table = [
            ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                "GET / HTTP/1.1\r\nconnection: Keep-Alive, CLOSE\r\n\r\n",
                false,
            ),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n", true),
        ];
        for (raw, keep_alive) in table {
            assert_eq!(request(raw).keep_alive, keep_alive, "{raw:?}");
        }
    }

    #[test]
    fn incomplete_head_waits_for_more() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(parse("\r\n"), Ok(None));
    }

    #[test]
    fn post_body_length_and_pipelining() {
        let raw = "POST /x HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        let Ok(Some((req, used))) = parse(raw) else {
            panic!("no request");
        };
        assert_eq!(req.content_length, 5);
        assert!(req.expect_continue);
        assert_eq!(&raw[used..used + 5], "hello");
        assert_eq!(request(&raw[used + 5..]).method, "GET");
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let req = request("\r\nGET /inherited HTTP/1.1\r\n\r\n");
        assert_eq!(req.path(), "/inherited");
    }

    #[test]
    fn absolute_form_target() {
        let req = request("GET http://h:1/status/503?sleep=1 HTTP/1.1\r\n\r\n");
        assert_eq!(req.path(), "/status/503");
        assert_eq!(req.param("sleep"), Some("1"));
    }

    #[test]
    fn refusals() {
        let table = [
            ("GET / HTTP/2.0\r\n\r\n", 505),
            ("GET / FOO\r\n\r\n", 400),
            ("GET /\r\n\r\n", 400),
            ("GET  / HTTP/1.1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        ];
        for (raw, status) in table {
            match parse(raw) {
                Err(e) => assert_eq!(e.status(), status, "{raw:?}"),
                other => panic!("{raw:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn head_size_is_bounded() {
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(&long), Err(ParseError::HeadTooLarge));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse(&many), Err(ParseError::HeadTooLarge));
    }

    #[test]
    fn response_encoding() {
        let resp = Response::text(200, "hi\n".into());
        let text = String::from_utf8(resp.encode(false, true, false)).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(
            text.contains(&format!("X-Pid: {}\r\n", std::process::id())),
            "{text}"
        );
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nhi\n"), "{text}");
        let head = String::from_utf8(resp.encode(true, false, true)).unwrap_or_default();
        assert!(head.contains("Connection: keep-alive\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[test]
    fn log_lines_are_padded() {
        let spec = LogSpec {
            prefix: "w0 42".into(),
            lines: 1,
            forever: false,
            rate: 0,
            line_bytes: 16,
            stderr: false,
        };
        assert_eq!(spec.line(7), b"w0 42 7 xxxxxxx\n");
        let short = LogSpec {
            line_bytes: 4,
            ..spec
        };
        assert_eq!(short.line(7), b"w0 42 7\n");
    }

    #[test]
    fn flags_parse() {
        let args = Args::try_parse_from([
            "holdfast test-worker",
            "--lame-duck-ms=50",
            "--grow-after-requests=3",
            "--grow-mb=1",
            "--children=2",
            "--child-grow-mb-per-sec=4",
        ]);
        let args = args.map_err(|e| e.to_string());
        assert!(args.is_ok(), "{args:?}");
        assert!(Args::try_parse_from(["x", "--grow-mb=1"]).is_err());
        assert!(Args::try_parse_from(["x", "--never-ready", "--ready-from-child"]).is_err());
        let args = Args::try_parse_from([
            "x",
            "--daemon",
            "--quick-term",
            "--close-listener=admin",
            "--close-listener",
            "sock",
            "--exit-on-usr2=3",
            "--close-listeners-after-ms=500",
            "--close-stdio-after-ms=0",
        ])
        .map_err(|e| e.to_string());
        assert!(
            args.as_ref().is_ok_and(|a| a.daemon
                && a.quick_term
                && a.close_listener == ["admin", "sock"]
                && a.exit_on_usr2 == Some(3)
                && a.close_listeners_after_ms == Some(500)
                && a.close_stdio_after_ms == Some(0)),
            "{args:?}"
        );
        for conflict in [
            ["x", "--quick-term", "--ignore-term"],
            ["x", "--daemon", "--close-inherited"],
            ["x", "--close-listener=a", "--close-inherited"],
            ["x", "--close-listeners-after-ms=1", "--close-inherited"],
        ] {
            assert!(Args::try_parse_from(conflict).is_err(), "{conflict:?}");
        }
    }

    #[test]
    fn exit_endpoint_asks_for_a_drain_with_the_code() {
        let args = Args::try_parse_from(["x"]).map_err(|e| e.to_string());
        let worker = Worker::new(args.expect("no flags"), Inherited::capture())
            .map_err(|e| e.to_string())
            .expect("worker");
        let table = [
            ("/exit", 400, None),
            ("/exit?code=256", 400, None),
            ("/exit?code=x", 400, None),
            ("/exit?code=3", 200, Some(3)),
            ("/exit?code=0", 200, Some(0)),
        ];
        for (target, status, asked) in table {
            worker.exit_request.send_replace(None);
            let req = request(&format!("GET {target} HTTP/1.1\r\n\r\n"));
            assert_eq!(worker.exit_on_request(&req).status, status, "{target}");
            assert_eq!(*worker.exit_request.borrow(), asked, "{target}");
        }
    }
}
