//! What a worker is started with: the listeners at fds 3.., and the
//! environment conventions servers already read (sd_listen_fds(3),
//! Server::Starter, Einhorn, Unicorn), plus holdfast's own variables.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::config::{Address, AppConfig, Handoff, PROBE_NAME};
use crate::core::Spec;
use crate::ids::{Generation, Slot};
use crate::os::listener::Listener;
use crate::os::proc::SERIAL_VAR;
use crate::os::sys::{self, ExecPlan, SpawnError};

/// Resolves `app.command[0]` the way exec will (the app's PATH, its cwd),
/// so a missing program is a config error at load, not a crash loop.
pub(crate) fn resolve_program(app: &AppConfig) -> Result<PathBuf, SpawnError> {
    let path_var = app
        .env
        .get("PATH")
        .map(OsString::from)
        .or_else(|| std::env::var_os("PATH"));
    sys::resolve(&app.command.0[0], path_var.as_deref(), app.cwd.as_deref()).map_err(|reason| {
        SpawnError::NotFound {
            program: app.command.0[0].clone(),
            reason,
        }
    })
}

/// One worker's start: which slot, which generation, and its private fds.
pub struct Start<'a> {
    pub slot: Slot,
    pub generation: Generation,
    /// The worker's unique serial ([`SERIAL_VAR`]): its descendants carry it.
    pub serial: u64,
    /// Its cgroup's `cgroup.procs`, open for writing: the child moves itself
    /// there before exec (see [`crate::os::proc::WorkerCgroup`]).
    pub cgroup_procs: Option<RawFd>,
    pub notify_socket: &'a Path,
    /// The private readiness-probe listener, passed last, if `ready = "probe"`.
    pub probe: Option<RawFd>,
    pub stdio: [RawFd; 3],
}

/// The environment a worker gets, in order; LISTEN_PID is added by `sys`.
pub fn environment(
    spec: &Spec,
    listeners: &[Rc<Listener>],
    start: &Start<'_>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !crate::config::is_own_env(k))
        .filter(|(k, _)| !spec.app.env.contains_key(k))
        .collect();
    env.extend(spec.app.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let n = listeners.len() + usize::from(start.probe.is_some());
    let names: Vec<&str> = spec
        .listeners
        .iter()
        .map(|l| l.name.as_str())
        .chain(start.probe.map(|_| PROBE_NAME))
        .collect();
    for h in &spec.app.handoff {
        match h {
            Handoff::Systemd => {
                env.push(("LISTEN_FDS".into(), n.to_string()));
                env.push(("LISTEN_FDNAMES".into(), names.join(":")));
            }
            Handoff::ServerStarter => {
                let ports: Vec<String> = listeners
                    .iter()
                    .enumerate()
                    .map(|(i, l)| match &l.address {
                        Address::Unix(p) => format!("{}={}", p.display(), 3 + i),
                        other => format!("{other}={}", 3 + i),
                    })
                    .collect();
                env.push(("SERVER_STARTER_PORT".into(), ports.join(";")));
            }
            Handoff::Einhorn => {
                env.push(("EINHORN_FD_COUNT".into(), listeners.len().to_string()));
                for i in 0..listeners.len() {
                    env.push((format!("EINHORN_FD_{i}"), (3 + i).to_string()));
                }
            }
            Handoff::Unicorn => {
                let fds: Vec<String> = (0..listeners.len()).map(|i| (3 + i).to_string()).collect();
                env.push(("UNICORN_FD".into(), fds.join(",")));
            }
        }
    }
    env.push((
        "NOTIFY_SOCKET".into(),
        start.notify_socket.display().to_string(),
    ));
    env.push(("HOLDFAST_WORKER_ID".into(), start.slot.to_string()));
    env.push(("HOLDFAST_GENERATION".into(), start.generation.to_string()));
    env.push((SERIAL_VAR.into(), start.serial.to_string()));
    env
}

/// A worker just forked: its pid, and the report of its exec (which may
/// still fail: poll it when the child is reaped).
pub struct Started {
    pub pid: nix::unistd::Pid,
    pub report: sys::ExecReport,
}

/// Forks and execs one worker of `spec` with `listeners` (the sockets of
/// `spec.listeners`, in order); returns once it is forked.
pub fn start(
    spec: &Spec,
    listeners: &[Rc<Listener>],
    start: &Start<'_>,
) -> Result<Started, SpawnError> {
    let fds: Vec<RawFd> = listeners
        .iter()
        .map(|l| l.raw_fd())
        .chain(start.probe)
        .collect();
    let plan = ExecPlan {
        program: &spec.app.command.0[0],
        args: &spec.app.command.0[1..],
        env: environment(spec, listeners, start),
        listen_pid: spec.app.handoff.contains(&Handoff::Systemd),
        cwd: spec.app.cwd.as_deref(),
        stdio: start.stdio,
        fds: &fds,
        // If holdfast dies (a crash, the watchdog), the worker drains as it
        // would in a rollout: systemd restarts holdfast with the same
        // sockets (fd store, KillMode=process) while the old workers
        // finish their requests. SIGTERM would drop them in Unicorn.
        parent_death_signal: spec.app.drain_signal.0,
        cgroup_procs: start.cgroup_procs,
    };
    let spawned = sys::spawn(&plan, &spec.program)?;
    Ok(Started {
        pid: spawned.pid,
        report: spawned.report,
    })
}
