//! The test worker's flags. Durations are in milliseconds, sizes in MiB.

use clap::Parser;

/// Flags of `holdfast-test-worker`. Durations are in milliseconds, sizes in
/// MiB.
#[derive(Debug, Parser)]
#[command(
    name = "holdfast-test-worker",
    about = "HTTP/1.1 test app for holdfast's tests and demo"
)]
pub(crate) struct Args {
    /// Bind ADDR (HOST:PORT or unix:PATH) when no listener is inherited.
    #[arg(long, value_name = "ADDR")]
    pub(crate) bind: Option<String>,
    /// Take the listeners from UNICORN_FD=3,4 instead of LISTEN_FDS.
    #[arg(long)]
    pub(crate) unicorn_fd: bool,
    /// Default per-request sleep when the request has no `sleep=` parameter.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub(crate) sleep_ms: u64,
    /// Wait this long after serving starts before sending READY=1.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub(crate) ready_delay_ms: u64,
    /// Never send READY=1 (still serve).
    #[arg(long, conflicts_with = "ready_from_child")]
    pub(crate) never_ready: bool,
    /// Send READY=1 from a child process instead of this pid.
    #[arg(long)]
    pub(crate) ready_from_child: bool,
    /// Answer 503 on the last listener if LISTEN_FDNAMES names it holdfast-probe.
    #[arg(long)]
    pub(crate) probe_fail: bool,
    /// Exit at once with CODE, before serving.
    #[arg(long, value_name = "CODE")]
    pub(crate) exit_at_start: Option<u8>,
    /// Serve, then exit 3 after this long.
    #[arg(long, value_name = "MS")]
    pub(crate) crash_after_ms: Option<u64>,
    /// Only crash (`--crash-after-ms`) in the worker whose HOLDFAST_WORKER_ID
    /// is N, so a test can crash-loop one slot while the others serve.
    #[arg(long, value_name = "N", requires = "crash_after_ms")]
    pub(crate) crash_slot: Option<u32>,
    /// Ignore SIGTERM and SIGQUIT (keep serving).
    #[arg(long)]
    pub(crate) ignore_term: bool,
    /// SIGUSR2 is a clean crash aimed at this pid: drain as on the drain
    /// signal, then exit with CODE (as `GET /exit?code=CODE`). Without it,
    /// SIGUSR2 keeps its default action.
    #[arg(long, value_name = "CODE")]
    pub(crate) exit_on_usr2: Option<u8>,
    /// SIGTERM is a quick exit, as in Unicorn: exit 0 at once, dropping the
    /// requests in flight and the idle connections. SIGQUIT still drains.
    #[arg(long, conflicts_with = "ignore_term")]
    pub(crate) quick_term: bool,
    /// Close the inherited listeners; a child without them sends READY=1.
    #[arg(long)]
    pub(crate) close_inherited: bool,
    /// Close the inherited listener of this LISTEN_FDNAMES name and serve
    /// the others (repeatable). READY=1 is sent as usual.
    #[arg(long, value_name = "NAME", conflicts_with = "close_inherited")]
    pub(crate) close_listener: Vec<String>,
    /// After this long serving, close every listener (the accept loops
    /// end) but keep serving the connections already accepted and stay
    /// alive: a server whose accept loop died after it was ready.
    #[arg(long, value_name = "MS", conflicts_with = "close_inherited")]
    pub(crate) close_listeners_after_ms: Option<u64>,
    /// After this long, point fds 1 and 2 at /dev/null (closing this
    /// process's ends of holdfast's pipes) and keep serving, as a server
    /// that daemonises its stdio does. Helpers spawned before keep theirs.
    #[arg(long, value_name = "MS")]
    pub(crate) close_stdio_after_ms: Option<u64>,
    /// At start, spawn a daemon: a child that calls setsid(2) (leaving this
    /// worker's process group and session), holds a copy of every inherited
    /// listener, does not die with this worker, has /dev/null as stdio, and
    /// sleeps until SIGTERM, SIGINT or SIGQUIT. The worker never signals or
    /// waits for it.
    #[arg(long, conflicts_with = "close_inherited")]
    pub(crate) daemon: bool,
    /// After the drain signal, keep idle keep-alive connections this long.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub(crate) lame_duck_ms: u64,
    /// Write N numbered lines at start.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) log_lines: u64,
    /// Pad each log line with 'x' to B bytes, newline included.
    #[arg(long, value_name = "B", default_value_t = 64)]
    pub(crate) log_line_bytes: usize,
    /// Write the log lines to stderr instead of stdout.
    #[arg(long)]
    pub(crate) log_stderr: bool,
    /// Keep writing log lines until drained.
    #[arg(long)]
    pub(crate) log_forever: bool,
    /// Log lines per second, for every line (0 = flat out).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) log_rate: u64,
    /// Write each log line in two halves, this many microseconds apart, so
    /// that whoever reads the pipe meanwhile holds half a line.
    #[arg(long, value_name = "US")]
    pub(crate) log_torn_us: Option<u64>,
    /// At exit, write "w<slot> <pid> partial" with no newline as the last output.
    #[arg(long)]
    pub(crate) partial_last_line: bool,
    /// Allocate and touch N MiB per second, forever.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) grow_mb_per_sec: u64,
    /// After every R requests grow by --grow-mb MiB.
    #[arg(long, value_name = "R", requires = "grow_mb")]
    pub(crate) grow_after_requests: Option<u64>,
    /// MiB added every --grow-after-requests requests.
    #[arg(long, value_name = "M", requires = "grow_after_requests")]
    pub(crate) grow_mb: Option<u64>,
    /// Allocate and touch M MiB at start (each child too: not shared, see FORKING_PY).
    #[arg(long, value_name = "M", default_value_t = 0)]
    pub(crate) shared_mb: u64,
    /// Spawn K idle child processes (re-execs of this binary).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub(crate) children: u32,
    /// The children grow N MiB per second each (the parent does not).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "children")]
    pub(crate) child_grow_mb_per_sec: u64,
    /// Internal: run as a helper child of a test worker.
    #[arg(long, hide = true, value_enum)]
    pub(crate) child_role: Option<ChildRole>,
    /// Internal: the pid of the test worker that spawned this child.
    #[arg(long, hide = true)]
    pub(crate) parent_pid: Option<i32>,
}

/// What a re-exec'd helper child does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ChildRole {
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
}
