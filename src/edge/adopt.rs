//! The in-place upgrade, the new image's half.
//!
//! `holdfast`'s `main` looks for `HOLDFAST_HANDOVER_FD` before anything
//! else, as it looks for LISTEN_FDS: [`Incoming::from_env`] takes every fd
//! the manifest names (close-on-exec again) and reads the state. Then:
//!
//! - **Adoption** ([`Runtime::adopt`]): the state is checked — its format,
//!   that it was written by this very pid, that every process it names is a
//!   child of this holdfast (`/proc/PID/stat`), that every fd it names is
//!   open and every listener is a listening socket — and everything is
//!   rebuilt from it: the core ([`Supervisor::restore`]), the listeners, the
//!   notify, control and metrics sockets, the log sinks with their partial
//!   lines, the cgroups, the exec reports, the probes of starting workers,
//!   the systemd notifier's schedule, the counters and the start time.
//!   Nothing is bound, opened, linked or spawned again. `run` then answers
//!   the waiting control connections, pings the watchdog and tells systemd
//!   READY=1 (through the core, as always).
//! - **Fallback** ([`Runtime::fallback`]): when the state cannot be read
//!   or does not check, the image keeps what the format-independent
//!   manifest identifies — the listening sockets (claimed by the config's
//!   entries as systemd's would be), the control and metrics sockets, the
//!   workers that are its children, their log pipes — logs loudly, and rolls
//!   out a fresh generation from the config file: start-before-stop, so no
//!   socket is closed and no request dropped. Everything else the old image
//!   handed over is closed.
//!
//! Adoption works on duplicates of the inherited fds, the originals staying
//! in the [`FdBank`] until it succeeded, and creates what removes files on
//! drop (listener paths, the control socket path, the run directory) last:
//! an adoption that fails halfway leaves the fallback everything intact.

use super::handover::{Entry, Envelope, Handover, Manifest, MAX_STATE};
use super::upgrade::VERSION;
use super::*;
use crate::control::ControlRecord;
use crate::logs::{LogsHandover, PipeFd};
use crate::os::handover::{read_all, FdBank};
use crate::os::proc::{Cgroups, WorkerCgroup};
use crate::os::sys::ExecReport;
use crate::systemd::Notifier;

/// What an image exec'd by an upgrade found at its start.
pub struct Incoming {
    manifest: Manifest,
    bank: FdBank,
    state: Result<Handover, String>,
}

/// What `run` does first in an image that an upgrade exec'd.
pub(super) struct Adopted {
    /// Control connections waiting for an answer, by reply id.
    conns: Vec<(ReplyTo, OwnedFd)>,
    /// Idle control connections, with the bytes read from them.
    idle: Vec<(OwnedFd, Vec<u8>)>,
    kind: AdoptedKind,
}

enum AdoptedKind {
    /// The state was adopted: tell the core (`Event::Upgraded`).
    State { message: String },
    /// It was not: roll out a fresh generation (`rollout`: there are old
    /// workers to replace).
    Fallback { error: String, rollout: bool },
}

/// An adoption that failed: what is left for the fallback.
pub struct Fallback {
    manifest: Manifest,
    bank: FdBank,
    error: String,
}

impl Fallback {
    /// Why the state could not be adopted.
    pub fn error(&self) -> &str {
        &self.error
    }
}

/// What the fallback keeps of the previous image (see [`Runtime::start`]).
pub(super) struct Leftovers {
    pub(super) control: Option<ControlSocket>,
    pub(super) metrics: Option<std::net::TcpListener>,
    workers: Vec<(WorkerId, Pid)>,
    pipes: Vec<(PipeFd, OwnedFd)>,
    conns: Vec<OwnedFd>,
    error: String,
}

impl Incoming {
    /// Whether an upgrade exec'd this process: reads and removes
    /// `HOLDFAST_HANDOVER_FD` and `HOLDFAST_HANDOVER_FDS`, takes every fd
    /// they name and reads the state. Call it first thing, before any thread
    /// exists (it changes the environment) and before anything opens an fd.
    pub fn from_env() -> Option<Incoming> {
        let state_var = std::env::var_os(STATE_VAR)?;
        let manifest_var = std::env::var_os(MANIFEST_VAR);
        std::env::remove_var(STATE_VAR);
        std::env::remove_var(MANIFEST_VAR);
        let number = |v: &std::ffi::OsStr| v.to_str().and_then(|s| s.trim().parse::<RawFd>().ok());
        let state_fd = number(&state_var);
        let manifest_fd = manifest_var.as_deref().and_then(number).filter(|n| *n > 2);
        // Read through /proc before anything is taken: it names the rest.
        let manifest = Manifest::parse(
            &manifest_fd
                .and_then(|n| std::fs::read_to_string(format!("/proc/self/fd/{n}")).ok())
                .unwrap_or_default(),
        );
        let mut numbers = manifest.fds();
        numbers.extend(state_fd);
        numbers.extend(manifest_fd);
        let (mut bank, missing) = FdBank::take(&numbers);
        let state = read_state(state_fd, &mut bank, &missing);
        Some(Incoming {
            manifest,
            bank,
            state,
        })
    }

    /// holdfast's own log file as the previous image had it open, if it had one.
    pub fn own_log(&self) -> Option<(PathBuf, std::fs::File)> {
        let h = self.state.as_ref().ok()?;
        let path = h.edge.config.logs.holdfast_log.clone()?;
        let fd = self.bank.dup(h.edge.own_log?, "holdfast's log").ok()?;
        Some((path, std::fs::File::from(fd)))
    }

    /// The state could not be read: the fallback is all that is left.
    pub fn unreadable(self) -> Result<Incoming, Fallback> {
        match &self.state {
            Ok(_) => Ok(self),
            Err(e) => Err(Fallback {
                error: e.clone(),
                manifest: self.manifest,
                bank: self.bank,
            }),
        }
    }
}

/// Reads and checks the state's envelope, then the state.
fn read_state(
    fd: Option<RawFd>,
    bank: &mut FdBank,
    missing: &[(RawFd, std::io::Error)],
) -> Result<Handover, String> {
    let fd = fd.ok_or(format!("{STATE_VAR} is not an fd number"))?;
    let file = bank.claim(fd, "the handover state")?;
    let bytes =
        read_all(file, MAX_STATE).map_err(|e| format!("reading the handover state: {e}"))?;
    let env = Envelope::read(&bytes, std::process::id())?;
    if let Some((n, e)) = missing.first() {
        return Err(format!("fd {n}, named in {MANIFEST_VAR}, is not open: {e}"));
    }
    env.decode(&bytes)
}

/// Whether `pid` is a child of this process (a zombie still is).
fn is_child(pid: Pid) -> bool {
    let me = i32::try_from(std::process::id()).unwrap_or(0);
    crate::os::proc::stat(pid.0).is_some_and(|s| s.ppid == me)
}

impl Runtime {
    /// The runtime the state of `incoming` describes (see the module), or
    /// what the fallback needs when it cannot be.
    pub fn adopt(incoming: Incoming) -> Result<Runtime, Fallback> {
        let Incoming {
            manifest,
            bank,
            state,
        } = incoming;
        let built = state.and_then(|h| Runtime::build(h, &bank));
        match built {
            // The originals in the bank close now; the runtime has duplicates.
            Ok(rt) => Ok(rt),
            Err(error) => Err(Fallback {
                manifest,
                bank,
                error,
            }),
        }
    }

    fn build(h: Handover, bank: &FdBank) -> Result<Runtime, String> {
        let now = Instant::now();
        let edge = h.edge;
        let strangers: Vec<i32> = h
            .core
            .workers
            .iter()
            .filter_map(|w| w.pid)
            .chain(edge.pids.iter().map(|(p, _)| *p))
            .chain(h.core.strays.iter().map(|s| s.pid))
            .filter(|p| !is_child(*p))
            .map(|p| p.0)
            .collect();
        if !strangers.is_empty() {
            return Err(format!(
                "the state names processes that are not children of this holdfast: {strangers:?}"
            ));
        }
        let workers = h.core.workers.iter().filter(|w| w.pid.is_some()).count();
        let sv = Supervisor::restore(h.core, now)?;
        // Kept across the exec by the kernel; said again, it costs nothing.
        crate::os::sys::become_subreaper().map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| format!("{what}: {e}")
        };
        // Fallible steps first; what removes files on drop comes last.
        let mut handed_logs = LogsHandover::adopt(edge.logs, bank)?;
        let tails = handed_logs.take_tails();
        let logs = Logs::resume(handed_logs).map_err(|e| e.to_string())?;
        let notify = NotifySocket::adopt(
            bank.dup(edge.notify_fd, "notify socket")?,
            edge.notify_path,
            edge.notify_inode,
        )
        .map_err(io("notify socket"))?;
        let inherited = Inherited::from_records(edge.inherited, bank)?;
        let devnull = std::fs::File::open("/dev/null")
            .map_err(io("/dev/null"))?
            .into();
        let mut execs = HashMap::new();
        for (pid, id, fd, program, read) in edge.execs {
            let pipe = bank.dup(fd, &format!("exec report of worker {id}"))?;
            execs.insert(pid.0, (id, ExecReport::adopt(pipe, program, &read)));
        }
        let metrics = match edge.metrics_fd {
            Some(fd) => Some(std::net::TcpListener::from(
                bank.dup(fd, "metrics listener")?,
            )),
            None => None,
        };
        let mut conns = Vec::new();
        for (to, fd) in edge.conns {
            conns.push((to, bank.dup(fd, "waiting control connection")?));
        }
        let mut idle = Vec::new();
        for (fd, bytes) in edge.idle {
            idle.push((bank.dup(fd, "idle control connection")?, bytes));
        }
        let mut held = Vec::new();
        let mut keep = Vec::new();
        for r in edge.listeners {
            let what = format!("listener {} ({})", r.name, r.address);
            keep.push(r.keeps_path());
            let fd = bank.dup(r.fd, &what)?;
            let l = Listener::from_record(r, fd).map_err(io(&what))?;
            // Left in place should anything below fail.
            l.keep_path();
            held.push(Rc::new(l));
        }
        let listeners: Vec<Rc<Listener>> = edge
            .current
            .iter()
            .filter_map(|&i| held.get(i).cloned())
            .collect();
        let control = match edge.control {
            Some(r) => {
                let fd = bank.dup(r.fd, "control socket")?;
                Some(ControlSocket::adopt(r, fd).map_err(io("control socket"))?)
            }
            None => None,
        };
        // Nothing below fails.
        let (tx, rx) = mpsc::unbounded_channel();
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let mut probes = HashMap::new();
        for (id, path) in edge.probes {
            // Still starting with ready = "probe": probe it again.
            let ready_path = sv.workers().find(|w| w.id == id).and_then(|w| {
                let spec = sv.spec(w.generation)?;
                let starting = matches!(w.state, crate::core::WorkerState::Starting { .. });
                (starting && spec.ready() == ReadyMode::Probe).then(|| spec.app.ready_path.clone())
            });
            probes.insert(id, Probe::start(path, ready_path, id, &tx));
        }
        for (l, keep) in held.iter().zip(keep) {
            l.set_keep_path(keep);
        }
        let message = format!(
            "upgraded from {} to {VERSION} (pid {}, {workers} workers adopted)",
            h.from_version,
            std::process::id()
        );
        Ok(Runtime {
            config: edge.config,
            overrides: edge.overrides,
            sv,
            listeners,
            held,
            pids: edge.pids.into_iter().map(|(p, id)| (p.0, id)).collect(),
            tails: tails.into_iter().map(|(p, t)| (p.0, t)).collect(),
            execs,
            probes,
            cgroups: edge.cgroups.map(Cgroups::adopt),
            worker_cgroups: edge
                .worker_cgroups
                .into_iter()
                .map(|(id, r)| (id, WorkerCgroup::adopt(r)))
                .collect(),
            previous: super::previous::Previous::adopt(edge.previous, now),
            notify,
            rundir: RunDir(edge.rundir),
            devnull,
            logs,
            tx,
            rx,
            calls_tx,
            calls,
            replies: HashMap::new(),
            next_reply: edge.next_reply,
            pending: VecDeque::new(),
            exit: None,
            ignored_senders: edge.ignored_senders.into_iter().collect(),
            systemd: Notifier::restore(edge.systemd, now),
            inherited: Some(inherited),
            reloading: None,
            reload_pending: Vec::new(),
            started: edge.started.at(now),
            control,
            metrics,
            control_server: None,
            metrics_task: None,
            metrics_fd: None,
            baseline: edge.baseline,
            invocation: Invocation {
                argv: edge.argv,
                exe: edge.binary,
            },
            in_flight: InFlight::default(),
            upgrade: None,
            early: HashSet::new(),
            pause: crate::control::Pause::new(),
            adopted: Some(Adopted {
                conns,
                idle,
                kind: AdoptedKind::State { message },
            }),
            socket_checks: Vec::new(),
            senders: HashMap::new(),
            cost: crate::status::Cost::default(),
        })
    }

    /// The fallback of an adoption that failed (see the module): `config`
    /// and `overrides` come from the command line, as at a fresh start.
    pub fn fallback(
        config: Config,
        overrides: Overrides,
        fb: Fallback,
        invocation: Invocation,
    ) -> Result<Runtime, StartError> {
        let Fallback {
            manifest,
            mut bank,
            error,
        } = fb;
        let mut sockets = Vec::new();
        let mut left = Leftovers {
            control: None,
            metrics: None,
            workers: Vec::new(),
            pipes: Vec::new(),
            conns: Vec::new(),
            error,
        };
        let mut rundir = None;
        for e in manifest.0 {
            match e {
                Entry::Listen { fd, name } => {
                    if let Ok(f) = bank.claim(fd, "listener") {
                        sockets.push((f, name));
                    }
                }
                Entry::Worker { pid, .. } if is_child(pid) => {
                    // Its serial is its id (and its cgroup's name).
                    let serial = crate::os::proc::serial(pid.0).unwrap_or(0);
                    left.workers.push((WorkerId(serial), pid));
                }
                Entry::Worker { pid, .. } => {
                    warn!(%pid, "the previous image's worker {pid} is not a child of this holdfast; leaving it alone");
                }
                Entry::Pipe {
                    fd,
                    pid,
                    slot,
                    stream,
                } => {
                    if let Ok(f) = bank.claim(fd, "log pipe") {
                        left.pipes.push((
                            PipeFd {
                                fd,
                                slot,
                                pid,
                                stream,
                            },
                            f,
                        ));
                    }
                }
                Entry::Control { fd, path } => {
                    if let Ok(f) = bank.claim(fd, "control socket") {
                        let inode = std::fs::metadata(&path)
                            .map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
                        // The keeper link beside it, as `ControlSocket::bind` makes it.
                        let keeper = crate::control::keeper_of(&path).filter(|k| k.exists());
                        let r = ControlRecord {
                            path,
                            inode,
                            fd,
                            keeper,
                        };
                        left.control = ControlSocket::adopt(r, f).ok();
                    }
                }
                Entry::Metrics { fd } => {
                    left.metrics = bank
                        .claim(fd, "metrics")
                        .ok()
                        .map(std::net::TcpListener::from);
                }
                Entry::Conn { fd } => left.conns.extend(bank.claim(fd, "connection").ok()),
                Entry::Rundir { path } => rundir = Some(path),
                Entry::Other { .. } => {}
            }
        }
        // Workers with no serial (a very old image) get ids above the rest.
        let top = left.workers.iter().map(|(id, _)| id.0).max().unwrap_or(0);
        for (i, w) in left
            .workers
            .iter_mut()
            .filter(|(id, _)| id.0 == 0)
            .enumerate()
        {
            w.0 = WorkerId(top + 1 + i as u64);
        }
        // The rest (notify socket, exec reports, log files) closes now.
        drop(bank);
        if let Some(dir) = rundir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let inherited = Inherited::from_handed(sockets);
        Runtime::start(config, overrides, inherited, invocation, Some(left))
    }

    /// `run`'s first step in an image an upgrade exec'd.
    pub(super) fn resume_adopted(&mut self, a: Adopted) {
        self.systemd.ping_now(Instant::now());
        match a.kind {
            AdoptedKind::State { message } => {
                if let Some(s) = &self.control_server {
                    for (to, fd) in a.conns {
                        let reply = s.adopt_waiting(fd);
                        self.replies.entry(to).or_default().push(reply);
                    }
                    for (fd, bytes) in a.idle {
                        s.adopt_idle(fd, bytes);
                    }
                }
                // Exits during the exec: their SIGCHLD may be merged.
                self.reap();
                self.feed(Event::Upgraded { message });
                self.feed(Event::Tick);
            }
            AdoptedKind::Fallback { error, rollout } => {
                let workers = self.sv.workers().count();
                let message = format!(
                    "the new holdfast ({VERSION}, pid {}) could not adopt the previous image's state: {error}; it kept {} listening socket(s) and {workers} worker(s) and replaces them with a rolling restart from the config file",
                    std::process::id(),
                    self.held.len()
                );
                error!(workers, listeners = self.held.len(), "{message}");
                for (_, fd) in a.conns {
                    crate::control::answer_now(
                        fd,
                        Err(format!("upgrade failed after the exec: {message}")),
                    );
                }
                self.reap();
                if rollout {
                    let spec = self.sv.current_spec().clone();
                    self.feed(Event::Request {
                        request: Request::Rollout {
                            spec: Box::new(spec),
                        },
                        reply: None,
                    });
                }
                self.feed(Event::Tick);
            }
        }
    }
}

impl Leftovers {
    /// The serials of the previous image's workers taken on.
    pub(super) fn serials(&self) -> Vec<u64> {
        self.workers.iter().map(|(id, _)| id.0).collect()
    }

    /// The core of a fallback: the previous image's workers as generation 1
    /// (see [`Supervisor::inherit`]), their pids, their cgroups, and their
    /// log pipes attached to `logs`.
    pub(super) fn inherit(
        &mut self,
        spec: Spec,
        settings: Settings,
        logs: &Logs,
        cgroups: Option<&Cgroups>,
        now: Instant,
    ) -> (
        Supervisor,
        HashMap<i32, WorkerId>,
        HashMap<WorkerId, WorkerCgroup>,
    ) {
        let sv = Supervisor::inherit(spec, settings, self.workers.clone(), now);
        let pids = self.workers.iter().map(|(id, p)| (p.0, *id)).collect();
        let cgroups = self
            .workers
            .iter()
            .filter_map(|(id, _)| Some((*id, cgroups?.existing_worker(id.0)?)))
            .collect();
        let kept: Vec<Pid> = self.workers.iter().map(|(_, p)| *p).collect();
        let pipes = std::mem::take(&mut self.pipes)
            .into_iter()
            .filter(|(p, _)| kept.contains(&p.pid))
            .collect();
        LogsHandover::attach_pipes(logs, pipes);
        (sv, pids, cgroups)
    }

    pub(super) fn into_adopted(self) -> Adopted {
        Adopted {
            conns: Vec::new(),
            idle: Vec::new(),
            kind: AdoptedKind::Fallback {
                error: self.error,
                rollout: !self.workers.is_empty(),
            },
        }
        .with_early(self.conns)
    }
}

impl Adopted {
    /// Connections the fallback answers with its error (no reply ids).
    fn with_early(mut self, conns: Vec<OwnedFd>) -> Adopted {
        self.conns = conns.into_iter().map(|fd| (ReplyTo(0), fd)).collect();
        self
    }
}
