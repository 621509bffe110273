//! The in-place upgrade, the old image's half.
//!
//! 1. **Check** ([`Runtime::begin_upgrade`]): the binary is opened once,
//!    must be an executable ELF for this machine ([`Binary::open`]), and
//!    must run: `BINARY version --json`, a child of holdfast reaped by the
//!    loop like every other, must exit 0 within [`TRIAL_WITHIN`] and name
//!    the handover format this image writes among those it reads. Nothing
//!    is touched before that; a refusal leaves everything as it was.
//! 2. **Wait for a quiet moment** ([`Runtime::upgrade_if_quiet`]): the loop
//!    runs on as usual (a rollout goes on, a SIGHUP is prepared) until no
//!    work is under way whose answer would die with this image — no reload
//!    being prepared, no socket check, memory round, notify attribution or
//!    log reopen on a helper thread, nothing queued for the loop, no status
//!    or control answer on its way out — or gives up after [`QUIET_WITHIN`]
//!    ("busy, retry"). A control connection waiting for an answer the loop
//!    still owes (`restart --wait`, `upgrade --wait`) is not waited for: it
//!    is handed over, and the new image answers it.
//! 3. **Quiesce, hand over, exec** ([`Runtime::exec_upgrade`]): the log
//!    sinks pause and hand back their files and pipes with each partial
//!    line; holdfast's own log and the systemd notifier flush (WATCHDOG=1 is
//!    sent; RELOADING=1 went out when the upgrade started); the state goes
//!    into a memfd; exactly the handed-over fds lose CLOEXEC; the handled
//!    signals are blocked; the binary is exec'd in this pid, from this
//!    thread (the main thread, which forked every worker: see
//!    [`crate::os::handover`]). If the exec fails, every step is undone in
//!    reverse and the core hears `UpgradeFailed`: the old image runs on.

use std::os::fd::AsFd;
use std::process::Stdio;

use super::handover::{EdgeRecord, Entry, Handover, Manifest, FORMAT, READS};
use super::*;
use crate::core::At;
use crate::os::handover::{block_signals, inherit, memfd, reclaim, unblock_signals, Binary};

/// How long the trial run (`BINARY version --json`) may take.
pub(super) const TRIAL_WITHIN: Duration = Duration::from_secs(10);
/// How long a checked upgrade waits for the loop to have nothing under way.
pub(super) const QUIET_WITHIN: Duration = Duration::from_secs(10);
/// How often a paused control server is looked at until it has settled.
const SETTLE_POLL: Duration = Duration::from_millis(1);
/// The most bytes of a trial's stdout and stderr read, each.
const TRIAL_OUTPUT: u64 = 64 * 1024;
/// This build's version.
pub(super) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What `holdfast version --json` prints: the version, and the handover
/// formats this build can read (an upgrade checks its own is among them).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub handover: Vec<u32>,
}

/// The line `holdfast version --json` prints.
pub fn version_json() -> String {
    serde_json::to_string(&VersionInfo {
        version: VERSION.to_string(),
        handover: READS.to_vec(),
    })
    .unwrap_or_default()
}

/// The edge's half of an upgrade under way.
pub(super) struct Job {
    binary: Binary,
    stage: Stage,
}

enum Stage {
    /// `BINARY version --json` runs as `pid`; it must be done by `until`.
    Trial {
        pid: i32,
        until: Instant,
        exit: Option<ExitReason>,
        output: Option<TrialOutput>,
        /// SIGKILLed because a stop cancelled the upgrade.
        killed: bool,
    },
    /// Checked: exec at the first quiet moment before `until`.
    Ready { version: String, until: Instant },
}

/// What the trial run printed.
pub struct TrialOutput {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Whether the trial run says this binary can adopt what this image writes.
fn judge(path: &Path, exit: ExitReason, out: &TrialOutput) -> Result<VersionInfo, String> {
    let name = path.display();
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.trim();
    let tail = if said.is_empty() {
        String::new()
    } else {
        let t: String = said
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(" (it said: {t})")
    };
    if exit != ExitReason::Code(0) {
        return Err(format!(
            "binary {name}: `version --json` ended with {exit}{tail}"
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let info: VersionInfo = serde_json::from_str(text.trim()).map_err(|e| {
        let shown: String = text.trim().chars().take(200).collect();
        format!(
            "binary {name}: `version --json` printed {shown:?}, not a holdfast version ({e}); is it a holdfast with in-place upgrades?"
        )
    })?;
    if !info.handover.contains(&FORMAT) {
        return Err(format!(
            "binary {name} is holdfast {}, which reads handover format(s) {:?}; this holdfast ({VERSION}) writes format {FORMAT}",
            info.version, info.handover
        ));
    }
    Ok(info)
}

fn read_capped(r: impl std::io::Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = std::io::Read::read_to_end(&mut r.take(TRIAL_OUTPUT), &mut v);
    v
}

impl Runtime {
    /// `Action::Upgrade`: open and check the binary, start its trial run.
    /// Called while actions run: a refusal is queued as `UpgradeFailed`.
    pub(super) fn begin_upgrade(&mut self, binary: Option<PathBuf>) {
        let path = binary.unwrap_or_else(|| self.invocation.exe.clone());
        let started = Binary::open(&path).and_then(|b| {
            self.start_trial(&b)
                .map(|pid| (b, pid))
                .map_err(|e| format!("binary {}: cannot run it: {e}", path.display()))
        });
        match started {
            Ok((binary, pid)) => {
                info!(binary = %path.display(), inode = binary.inode(), trial_pid = pid,
                    "checking the new holdfast binary: `{} version --json`", path.display());
                self.upgrade = Some(Job {
                    binary,
                    stage: Stage::Trial {
                        pid,
                        until: Instant::now() + TRIAL_WITHIN,
                        exit: None,
                        output: None,
                        killed: false,
                    },
                });
            }
            Err(e) => self
                .pending
                .push_back(Event::UpgradeFailed { error: refused(&e) }),
        }
    }

    /// Runs `BINARY version --json` through the open file, in a process
    /// group of its own; returns its pid. The loop reaps it (see `reaped`);
    /// a thread reads its output.
    fn start_trial(&mut self, binary: &Binary) -> std::io::Result<i32> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(binary.proc_path());
        cmd.arg0(&binary.path)
            .args(["version", "--json"])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for var in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            STATE_VAR,
            MANIFEST_VAR,
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        let (out, err) = (child.stdout.take(), child.stderr.take());
        // Not waited for here: holdfast reaps every child in `reap`.
        drop(child);
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("holdfast-trial".into())
            .spawn(move || {
                let stderr = std::thread::spawn(move || err.map(read_capped).unwrap_or_default());
                let stdout = out.map(read_capped).unwrap_or_default();
                let stderr = stderr.join().unwrap_or_default();
                let _ = tx.send(Input::Trial(TrialOutput { stdout, stderr }));
            })?;
        Ok(pid)
    }

    /// The pid of the upgrade's trial run, while it has not been reaped.
    pub(super) fn trial_pid(&self) -> Option<i32> {
        match &self.upgrade {
            Some(Job {
                stage: Stage::Trial {
                    pid, exit: None, ..
                },
                ..
            }) => Some(*pid),
            _ => None,
        }
    }

    /// Whether `pid` is the trial run of the upgrade under way.
    pub(super) fn is_trial(&self, pid: i32) -> bool {
        self.trial_pid() == Some(pid)
    }

    /// The trial run was reaped.
    pub(super) fn trial_exited(&mut self, reason: ExitReason) {
        if let Some(Job {
            stage: Stage::Trial { exit, .. },
            ..
        }) = &mut self.upgrade
        {
            *exit = Some(reason);
        }
        self.trial_done();
    }

    /// The trial run's output was read.
    pub(super) fn trial_output(&mut self, t: TrialOutput) {
        if let Some(Job {
            stage: Stage::Trial { output, .. },
            ..
        }) = &mut self.upgrade
        {
            *output = Some(t);
        }
        self.trial_done();
    }

    fn trial_done(&mut self) {
        let Some(Job {
            binary,
            stage:
                Stage::Trial {
                    exit: Some(exit),
                    output: Some(output),
                    ..
                },
        }) = &self.upgrade
        else {
            return;
        };
        match judge(&binary.path, *exit, output) {
            Ok(v) => {
                info!(binary = %binary.path.display(), version = %v.version, handover = ?v.handover,
                    "the new holdfast binary passed its checks; handing over once nothing is under way");
                if let Some(job) = &mut self.upgrade {
                    job.stage = Stage::Ready {
                        version: v.version,
                        until: Instant::now() + QUIET_WITHIN,
                    };
                }
            }
            Err(e) => self.fail_upgrade(refused(&e)),
        }
    }

    fn fail_upgrade(&mut self, error: String) {
        self.upgrade = None;
        self.end_pause();
        self.feed(Event::UpgradeFailed { error });
    }

    /// The control server and /metrics take requests again.
    fn end_pause(&mut self) {
        if self.pause.is_paused() {
            self.pause.set(false);
            if let Some(s) = &self.control_server {
                s.resume_parked();
            }
        }
    }

    /// When the upgrade under way must be looked at again: its deadline,
    /// and while the control server settles, every few milliseconds.
    pub(super) fn upgrade_due(&self) -> Option<Instant> {
        match &self.upgrade.as_ref()?.stage {
            Stage::Trial { until, .. } => Some(*until),
            Stage::Ready { until, .. } if self.pause.is_paused() => {
                Some((*until).min(Instant::now() + SETTLE_POLL))
            }
            Stage::Ready { until, .. } => Some(*until),
        }
    }

    /// A deadline passed: a trial run that did not finish is killed, an
    /// upgrade that found no quiet moment is given up.
    pub(super) fn upgrade_timers(&mut self) {
        let now = Instant::now();
        let Some(job) = &self.upgrade else { return };
        match &job.stage {
            Stage::Trial {
                pid, until, exit, ..
            } if *until <= now => {
                if exit.is_none() {
                    // Not reaped yet, so the group is still the trial's.
                    let _ =
                        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
                }
                let e = format!(
                    "binary {}: `version --json` did not finish within {}s; killed it",
                    job.binary.path.display(),
                    TRIAL_WITHIN.as_secs()
                );
                self.fail_upgrade(refused(&e));
            }
            Stage::Ready { until, .. } if *until <= now => {
                let e = format!(
                    "busy: holdfast had work under way for {}s (a reload being prepared, socket checks, a memory round); retry",
                    QUIET_WITHIN.as_secs()
                );
                self.fail_upgrade(refused(&e));
            }
            _ => {}
        }
    }

    /// Nothing under way in the loop whose answer the exec would lose.
    fn quiet(&self) -> bool {
        self.reloading.is_none()
            && self.reload_pending.is_empty()
            && self.inherited.is_some()
            && self.in_flight.none()
            && self.pending.is_empty()
            && self.rx.is_empty()
            && self.calls.is_empty()
    }

    /// The control server and /metrics hold still: nothing new accepted or
    /// read, every answer under way written.
    fn settled(&self) -> bool {
        self.pause.is_paused()
            && self.control_server.as_ref().map_or(true, |s| s.settled())
            && crate::control::answering() == 0
    }

    /// Execs a checked upgrade once the loop is quiet (see the module).
    /// An upgrade a stop cancelled is dropped; its trial run, if still
    /// going, is killed (the loop reaps it as usual), or it would outlive
    /// a holdfast that exits before the trial's deadline.
    pub(super) fn upgrade_if_quiet(&mut self) {
        if let Some(Job {
            stage:
                Stage::Trial {
                    pid,
                    exit: None,
                    killed: killed @ false,
                    ..
                },
            ..
        }) = &mut self.upgrade
        {
            if !self.sv.is_upgrading() {
                // Not reaped yet, so the group is still the trial's.
                info!(trial_pid = *pid, "upgrade cancelled: killing its trial run");
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
                *killed = true;
            }
        }
        let Some(Job {
            stage: Stage::Ready { .. },
            ..
        }) = &self.upgrade
        else {
            return;
        };
        if !self.sv.is_upgrading() {
            // A stop cancelled it (the core answered its waiters).
            self.upgrade = None;
            self.end_pause();
            return;
        }
        if !self.quiet() {
            return;
        }
        if !self.pause.is_paused() {
            // Requests under way are answered first; then it all holds still.
            self.pause.set(true);
            return;
        }
        if !self.settled() {
            return;
        }
        let Some(Job {
            binary,
            stage: Stage::Ready { version, .. },
        }) = self.upgrade.take()
        else {
            return;
        };
        let error = self.exec_upgrade(&binary, &version);
        self.end_pause();
        error!(binary = %binary.path.display(), %error, "the exec of the new holdfast failed; everything was put back");
        self.feed(Event::UpgradeFailed {
            error: format!("upgrade failed, still running holdfast {VERSION}: {error}"),
        });
    }

    /// Quiesces, hands everything over and execs `binary` in this pid.
    /// Returns only if the exec did not happen, with everything put back;
    /// the error says what failed.
    fn exec_upgrade(&mut self, binary: &Binary, version: &str) -> String {
        let now = Instant::now();
        let workers = self.sv.workers().filter(|w| w.pid.is_some()).count();
        info!(from = VERSION, to = %version, binary = %binary.path.display(), pid = std::process::id(), workers,
            "handing over to the new holdfast: exec in place");
        // Control connections waiting for an answer: the new image answers
        // them (`upgrade` without --wait is answered now, just before).
        let mut conns: Vec<(ReplyTo, OwnedFd)> = Vec::new();
        let mut early: Vec<OwnedFd> = Vec::new();
        for (to, rs) in &self.replies {
            for r in rs {
                let Some(fd) = r.waiting_conn() else { continue };
                match crate::os::sys::dup(fd) {
                    Ok(d) if self.early.contains(to) => early.push(d),
                    Ok(d) => conns.push((*to, d)),
                    Err(e) => {
                        warn!(fd, error = %e, "cannot hand over a waiting control connection; its client will see it closed")
                    }
                }
            }
        }
        let control = match self
            .control_server
            .as_ref()
            .map(|s| s.handover())
            .transpose()
        {
            Ok(c) => c,
            Err(e) => return format!("control socket: {e}"),
        };
        let idle = self
            .control_server
            .as_ref()
            .map(|s| s.parked())
            .unwrap_or_default();
        let metrics = match self.metrics_fd.map(crate::os::sys::dup).transpose() {
            Ok(m) => m,
            Err(e) => return format!("metrics listener: {e}"),
        };
        let own_log = crate::logs::own_log().handover_fd();
        // The sink threads pause and hand back their files and pipes.
        let logs = match self.logs.handover() {
            Ok(h) => h,
            Err(e) => return e,
        };
        let (pipes, partial_lines) = logs.pipes();
        info!(
            pipes,
            partial_lines, "log sinks paused; worker pipes handed over"
        );
        let error = self.exec_with(
            binary,
            now,
            Handed {
                logs: &logs,
                conns: &conns,
                idle: &idle,
                early,
                control: control.as_ref(),
                metrics: metrics.as_ref(),
                own_log: own_log.as_ref(),
            },
        );
        match crate::logs::Logs::resume(logs) {
            Ok(l) => self.logs = l,
            Err(e) => {
                error!(error = %e, "cannot restart the log threads after the failed exec; worker output is lost")
            }
        }
        error
    }

    /// The state, the manifest, the fds and the exec (see [`Self::exec_upgrade`]).
    fn exec_with(&mut self, binary: &Binary, now: Instant, h: Handed<'_>) -> String {
        let handover = self.handover_state(binary, now, &h);
        let json = match serde_json::to_vec(&handover) {
            Ok(j) => j,
            Err(e) => return format!("serializing the state: {e}"),
        };
        let state = match memfd("holdfast-handover", &json) {
            Ok(m) => m,
            Err(e) => return format!("memfd for the state: {e}"),
        };
        let manifest = match memfd(
            "holdfast-handover-fds",
            self.manifest(&h).render().as_bytes(),
        ) {
            Ok(m) => m,
            Err(e) => return format!("memfd for the manifest: {e}"),
        };
        let mut fds: Vec<std::os::fd::BorrowedFd<'_>> = Vec::new();
        fds.extend(self.held.iter().map(|l| l.as_fd()));
        if let Some(i) = &self.inherited {
            fds.extend(i.fds());
        }
        fds.push(self.notify.as_fd());
        fds.extend(self.execs.values().map(|(_, r)| r.as_fd()));
        fds.extend(h.logs.fds());
        fds.extend(h.conns.iter().map(|(_, f)| f.as_fd()));
        fds.extend(h.idle.iter().map(|(f, _)| f.as_fd()));
        fds.extend(h.control.map(|(_, f)| f.as_fd()));
        fds.extend(h.metrics.map(|f| f.as_fd()));
        fds.extend(h.own_log.map(|f| f.as_fd()));
        fds.push(state.as_fd());
        fds.push(manifest.as_fd());
        if let Err(e) = inherit(&fds) {
            return e.to_string();
        }
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| k != STATE_VAR && k != MANIFEST_VAR)
            .collect();
        env.push((STATE_VAR.into(), state.as_raw_fd().to_string().into()));
        env.push((MANIFEST_VAR.into(), manifest.as_raw_fd().to_string().into()));
        for fd in h.early {
            crate::control::answer_now(
                fd,
                Ok(format!(
                    "upgrading holdfast {VERSION} in place to {} (pid {})",
                    binary.path.display(),
                    std::process::id()
                )),
            );
        }
        self.systemd.ping_now(now);
        self.systemd.flush(Duration::from_secs(2));
        crate::logs::own_log().flush(Duration::from_secs(2));
        let blocked = block_signals();
        let error = match blocked {
            Ok(()) => binary.exec(&self.invocation.argv, &env),
            Err(e) => e,
        };
        // Still here: the exec failed. Put everything back.
        if let Err(e) = unblock_signals() {
            error!(error = %e, "cannot unblock signals after the failed exec");
        }
        reclaim(&fds);
        format!("exec {}: {error}", binary.path.display())
    }

    fn handover_state(&self, binary: &Binary, now: Instant, h: &Handed<'_>) -> Handover {
        Handover {
            format: FORMAT,
            from_version: VERSION.to_string(),
            pid: std::process::id(),
            core: self.sv.handover(now),
            edge: EdgeRecord {
                config: self.config.clone(),
                overrides: self.overrides.clone(),
                argv: self.invocation.argv.clone(),
                binary: binary.path.clone(),
                listeners: self.held.iter().map(|l| l.record()).collect(),
                current: self
                    .listeners
                    .iter()
                    .filter_map(|c| self.held.iter().position(|l| Rc::ptr_eq(l, c)))
                    .collect(),
                inherited: self
                    .inherited
                    .as_ref()
                    .map(|i| i.record())
                    .unwrap_or_default(),
                notify_fd: self.notify.as_fd().as_raw_fd(),
                notify_path: self.notify.path().to_path_buf(),
                rundir: self.rundir.path().to_path_buf(),
                control: h.control.map(|(r, _)| r.clone()),
                metrics_fd: h.metrics.map(|f| f.as_raw_fd()),
                conns: h.conns.iter().map(|(to, f)| (*to, f.as_raw_fd())).collect(),
                idle: h
                    .idle
                    .iter()
                    .map(|(f, bytes)| (f.as_raw_fd(), bytes.clone()))
                    .collect(),
                next_reply: self.next_reply,
                pids: self.pids.iter().map(|(p, id)| (Pid(*p), *id)).collect(),
                execs: self
                    .execs
                    .iter()
                    .map(|(p, (id, r))| {
                        let (fd, program, read) = r.record();
                        (Pid(*p), *id, fd, program, read)
                    })
                    .collect(),
                probes: self
                    .probes
                    .iter()
                    .map(|(id, p)| (*id, p.path().to_path_buf()))
                    .collect(),
                cgroups: self.cgroups.as_ref().map(|c| c.record()),
                worker_cgroups: self
                    .worker_cgroups
                    .iter()
                    .map(|(id, c)| (*id, c.record()))
                    .collect(),
                logs: h.logs.record(),
                own_log: h.own_log.map(|f| f.as_raw_fd()),
                systemd: self.systemd.record(now),
                ignored_senders: self.ignored_senders.iter().copied().collect(),
                started: At::of(self.started, now),
                baseline: self.baseline,
                previous: self.previous.record(now),
                notify_inode: self.notify.inode(),
            },
        }
    }

    /// Every fd handed over with its role (see `handover`).
    fn manifest(&self, h: &Handed<'_>) -> Manifest {
        let mut m = Vec::new();
        for l in &self.held {
            let name = match &l.origin {
                listener::Origin::Activated { name } => name.clone(),
                _ => format!("{}{}", crate::systemd::STORE_PREFIX, l.name),
            };
            m.push(Entry::Listen {
                fd: l.raw_fd(),
                name,
            });
        }
        if let Some(i) = &self.inherited {
            for p in i.record() {
                m.push(Entry::Listen {
                    fd: p.fd,
                    name: p.name,
                });
            }
        }
        for w in self.sv.workers() {
            if let Some(pid) = w.pid {
                m.push(Entry::Worker { pid, slot: w.slot });
            }
        }
        for p in h.logs.pipe_fds() {
            m.push(Entry::Pipe {
                fd: p.fd,
                pid: p.pid,
                slot: p.slot,
                stream: p.stream,
            });
        }
        if let Some((r, _)) = h.control {
            m.push(Entry::Control {
                fd: r.fd,
                path: r.path.clone(),
            });
        }
        if let Some(f) = h.metrics {
            m.push(Entry::Metrics { fd: f.as_raw_fd() });
        }
        for (_, f) in h.conns {
            m.push(Entry::Conn { fd: f.as_raw_fd() });
        }
        m.push(Entry::Rundir {
            path: self.rundir.path().to_path_buf(),
        });
        let mut other: Vec<RawFd> = vec![self.notify.as_fd().as_raw_fd()];
        other.extend(self.execs.values().map(|(_, r)| r.as_fd().as_raw_fd()));
        let pipes: Vec<RawFd> = h.logs.pipe_fds().iter().map(|p| p.fd).collect();
        other.extend(
            h.logs
                .fds()
                .iter()
                .map(|f| f.as_raw_fd())
                .filter(|fd| !pipes.contains(fd)),
        );
        other.extend(h.own_log.map(|f| f.as_raw_fd()));
        other.extend(h.idle.iter().map(|(f, _)| f.as_raw_fd()));
        m.extend(other.into_iter().map(|fd| Entry::Other { fd }));
        Manifest(m)
    }
}

/// What `exec_upgrade` prepared for the exec, owned by it.
struct Handed<'a> {
    logs: &'a crate::logs::LogsHandover,
    conns: &'a [(ReplyTo, OwnedFd)],
    idle: &'a [(OwnedFd, Vec<u8>)],
    early: Vec<OwnedFd>,
    control: Option<&'a (crate::control::ControlRecord, OwnedFd)>,
    metrics: Option<&'a OwnedFd>,
    own_log: Option<&'a OwnedFd>,
}

/// The message of an upgrade refused before anything was touched.
fn refused(e: &str) -> String {
    format!("upgrade refused, still running holdfast {VERSION}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(stdout: &str, stderr: &str) -> TrialOutput {
        TrialOutput {
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_trial_run_is_judged_by_its_exit_and_its_formats() {
        let p = Path::new("/usr/bin/holdfast");
        let ok = format!(r#"{{"version":"9.1.0","handover":[1,{}]}}"#, FORMAT + 1);
        assert_eq!(
            judge(p, ExitReason::Code(0), &out(&ok, "")).map(|v| v.version),
            Ok("9.1.0".to_string())
        );
        let table = [
            (
                ExitReason::Code(64),
                out("", "error: unrecognized subcommand 'version'"),
                "binary /usr/bin/holdfast: `version --json` ended with exit status 64 (it said: error: unrecognized subcommand 'version')",
            ),
            (
                ExitReason::Signal(11),
                out("", ""),
                "binary /usr/bin/holdfast: `version --json` ended with killed by SIGSEGV",
            ),
            (
                ExitReason::Code(0),
                out("holdfast 0.1.0\n", ""),
                "binary /usr/bin/holdfast: `version --json` printed \"holdfast 0.1.0\", not a holdfast version",
            ),
            (
                ExitReason::Code(0),
                out(r#"{"version":"0.0.1","handover":[0]}"#, ""),
                "binary /usr/bin/holdfast is holdfast 0.0.1, which reads handover format(s) [0]; this holdfast",
            ),
        ];
        for (exit, output, want) in table {
            let got = judge(p, exit, &output).expect_err(want);
            assert!(got.starts_with(want), "want {want:?}\n got {got:?}");
        }
    }

    #[test]
    fn version_json_names_the_formats_this_build_reads() {
        let v: VersionInfo = serde_json::from_str(&version_json()).expect("json");
        assert_eq!(v.version, VERSION);
        assert_eq!(v.handover, READS);
        assert!(v.handover.contains(&FORMAT));
    }
}
