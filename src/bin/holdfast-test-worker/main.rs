//! `holdfast-test-worker`: a tiny HTTP/1.1 app server that holdfast's
//! integration tests, benchmarks and demo supervise. It is its own binary, so
//! the product binary (`holdfast`) holds none of it.
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
//! # Layout
//! - `main.rs`: [`main`] captures the inherited state, parses the flags
//!   ([`args`]), takes the listeners ([`listeners`]: sd_listen_fds(3) through
//!   the `listenfd` crate, or `UNICORN_FD`) and runs [`worker::Worker::run`]
//!   on a current-thread tokio runtime.
//! - [`inherited`]: what the process inherited, for `GET /inherited`.
//! - [`worker`]: serving, draining, the endpoints; [`conn`]: one connection.
//! - [`http`]: request heads (parsed by `httparse`) and responses, pure
//!   functions unit-tested without sockets.
//! - [`memory`], [`logwriter`], [`notify`], [`child`]: memory growth, log
//!   volume, sd_notify(3), and the re-exec'd helper children.
//! - `forking.py`: the copy-on-write case that needs a real `fork`, which
//!   tests and benchmarks run with python3.
//! - [`impostor`]: copied under a `holdfast-*` name, a stand-in new holdfast
//!   binary that misbehaves, for the upgrade tests.
//!
//! There is no `unsafe` here: the "children" are re-execs of this binary with
//! a hidden `--child-role` (the daemon gets its sockets as `dup`s without
//! close-on-exec, and calls `setsid` through nix).
#![warn(clippy::unwrap_used)]

mod args;
mod child;
mod conn;
mod endpoints;
mod http;
mod impostor;
mod inherited;
mod listeners;
mod logwriter;
mod memory;
mod notify;
mod worker;

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::args::Args;
use crate::child::run_child;
use crate::inherited::Inherited;
use crate::listeners::take_listeners;
use crate::worker::Worker;

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

/// The test worker's flags are [`Args`].
///
/// Exit codes: 0 after a drain, SIGINT or a `--quick-term` SIGTERM, 1 when
/// there is no listener, 3 for `--crash-after-ms`, 64 for bad flags, 70 for
/// other start-up failures, the `--exit-at-start` code, or the code a
/// `GET /exit?code=N` asked for.
fn main() -> ExitCode {
    // Copied under a `holdfast-*` name, it is a stand-in new holdfast binary
    // for the upgrade tests (see `impostor`).
    if let Some(code) = impostor::run() {
        return code;
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // First, before anything opens an fd or reads the env destructively.
    let inherited = Inherited::capture();
    let args = match Args::try_parse_from(
        std::iter::once(std::ffi::OsString::from("holdfast-test-worker")).chain(args),
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

/// A line on stderr, written in one piece.
fn say(msg: &str) {
    let _ = io::stderr().lock().write_all(format!("{msg}\n").as_bytes());
}
