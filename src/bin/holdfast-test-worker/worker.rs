//! The running worker: serving, draining, and the HTTP endpoints.

use std::io;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook_tokio::Signals;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep, Instant};

use crate::args::{Args, ChildRole};
use crate::conn::Conn;
use crate::inherited::Inherited;
use crate::listeners::{Inbound, Listener};
use crate::logwriter::LogThread;
use crate::memory::{grow_at, Memory};
use crate::notify::notify_ready;
use crate::{
    say, write_stream, Error, CRASH_CODE, EX_SOFTWARE, MAX_CONNECTIONS, MAX_GROW_MB, MIB,
    PROBE_FDNAME,
};

/// Where the worker is in its life; connections watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepting and serving.
    Serving,
    /// The drain signal came: listeners are closed, idle connections are
    /// kept until `lame_duck_until`, requests get `Connection: close`.
    Draining { lame_duck_until: Instant },
}

/// The running worker: flags, captured state and counters shared by every
/// connection.
pub(crate) struct Worker {
    pub(crate) args: Args,
    pub(crate) pid: u32,
    /// `HOLDFAST_WORKER_ID` or `-`.
    pub(crate) slot: String,
    /// `HOLDFAST_GENERATION` or `-`.
    pub(crate) generation: String,
    pub(crate) inherited: Inherited,
    /// `/inherited`'s body, rendered on first use.
    pub(crate) inherited_json: std::sync::OnceLock<String>,
    pub(crate) requests: AtomicU64,
    pub(crate) memory: Memory,
    /// Set by `GET /exit?code=N`: drain, then exit with N.
    pub(crate) exit_request: watch::Sender<Option<u8>>,
}

impl Worker {
    pub(crate) fn new(args: Args, inherited: Inherited) -> Result<Worker, Error> {
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
    pub(crate) async fn run(self: Arc<Self>, mut listeners: Vec<Inbound>) -> ExitCode {
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

    pub(crate) async fn serve(
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
    pub(crate) fn exit_now(&self, why: &str) -> ExitCode {
        say(&format!("test-worker {}: {why}, exiting at once", self.pid));
        self.write_partial_line();
        ExitCode::SUCCESS
    }

    pub(crate) fn write_partial_line(&self) {
        if self.args.partial_last_line {
            let _ = self.write_log(format!("w{} {} partial", self.slot, self.pid).as_bytes());
        }
    }

    /// Writes bytes to the log stream (stdout, or stderr with `--log-stderr`)
    /// in one `write_all` under the stream's lock.
    pub(crate) fn write_log(&self, bytes: &[u8]) -> io::Result<()> {
        write_stream(self.args.log_stderr, bytes)
    }

    /// `--close-inherited`: the listeners are already closed; a child with no
    /// listener sends READY=1 and sleeps. Signals are passed on to it; this
    /// process exits with the child's code.
    pub(crate) async fn run_without_listeners(&self, mut signals: Signals) -> ExitCode {
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
    pub(crate) async fn spawn_children(&self) -> Result<Vec<tokio::process::Child>, Error> {
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
    pub(crate) fn spawn_helper(
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
    pub(crate) fn spawn_daemon(&self, listeners: &[Inbound]) -> Result<(), Error> {
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
    pub(crate) fn helper_command(
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
    pub(crate) async fn announce_ready(self: Arc<Self>) {
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

    pub(crate) async fn grow_forever(self: Arc<Self>, mb_per_sec: u64) {
        grow_at(&self.memory, mb_per_sec).await;
    }

    pub(crate) async fn accept_loop(
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
