//! The edge's hands on workers: spawning one (fds, pipes, cgroup, probe),
//! reaping, listing adopted descendants, checking a worker's sockets,
//! attributing notify datagrams, signals to process groups.

use super::*;

/// How far up its parents a notify sender is followed to find its worker.
const ANCESTRY_DEPTH: usize = 32;
/// Notify senders outside their worker's group remembered at most.
const SENDER_CACHE: usize = 4096;

/// One queued check of the listeners a worker's tree must hold.
pub(super) struct SocketCheck {
    id: WorkerId,
    /// (address, socket inode) of each listener it must hold.
    want: Vec<(String, u64)>,
    /// Its pid and its adopted descendants'.
    roots: Vec<i32>,
    /// The check of a READY=1 claim (else a periodic recheck).
    claim: bool,
}

pub(super) struct Probe {
    path: PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Probe {
    /// The probe socket of a worker (its path in the run directory), probed
    /// until ready when `ready_path` is given.
    pub(super) fn start(
        path: PathBuf,
        ready_path: Option<String>,
        id: WorkerId,
        tx: &mpsc::UnboundedSender<Input>,
    ) -> Probe {
        let task = ready_path.map(|p| {
            tokio::spawn(crate::edge::probe::until_ready(
                path.clone(),
                p,
                id,
                tx.clone(),
            ))
        });
        Probe { path, task }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Runtime {
    /// The listeners of `spec`, in fd order.
    pub(super) fn listeners_of(&self, spec: &Spec) -> Result<Vec<Rc<Listener>>, String> {
        spec.listeners
            .iter()
            .map(|want| {
                self.held
                    .iter()
                    .find(|l| l.serves(&want.address))
                    .cloned()
                    .ok_or_else(|| {
                        format!("listener {} is not held (internal error)", want.address)
                    })
            })
            .collect()
    }

    pub(super) fn spawn(
        &mut self,
        id: WorkerId,
        slot: Slot,
        generation: Generation,
    ) -> Result<Pid, String> {
        let Some(spec) = self.sv.spec(generation) else {
            return Err(format!(
                "no spec for generation {generation} (internal error)"
            ));
        };
        let listeners = self.listeners_of(spec)?;
        let probe = if spec.ready() == ReadyMode::Probe {
            let path = self.rundir.path().join(format!("probe-{id}.sock"));
            let fd = listener::bind_probe(&path)
                .map_err(|e| format!("probe socket {}: {e}", path.display()))?;
            Some((path, fd))
        } else {
            None
        };
        let pipes = self.logs.pipes().map_err(|e| e.to_string())?;
        let [out, err] = pipes.child_ends();
        let cgroup = match &self.cgroups {
            Some(c) => Some(
                c.create(id.0)
                    .map_err(|e| format!("cgroup for worker {id} in {}: {e}", c.dir().display()))?,
            ),
            None => None,
        };
        let start = Start {
            slot,
            generation,
            serial: id.0,
            cgroup_procs: cgroup
                .as_ref()
                .and_then(|c| c.procs_fd())
                .map(|fd| fd.as_raw_fd()),
            notify_socket: self.notify.path(),
            probe: probe.as_ref().map(|(_, fd)| fd.as_raw_fd()),
            stdio: [self.devnull.as_raw_fd(), out, err],
        };
        let started = spawn::start(spec, &listeners, &start).map_err(|e| e.to_string())?;
        let pid = started.pid.as_raw();
        if let Some(cg) = cgroup {
            self.worker_cgroups.insert(id, cg);
        }
        let tail = self.logs.attach(pipes, slot, Pid(pid));
        self.tails.insert(pid, tail);
        self.pids.insert(pid, id);
        self.execs.insert(pid, (id, started.report));
        if let Some((path, _fd)) = probe {
            // The worker has the probe socket now; holdfast only connects to it.
            let ready_path = Some(spec.app.ready_path.clone());
            self.probes
                .insert(id, Probe::start(path, ready_path, id, &self.tx));
        }
        Ok(Pid(pid))
    }

    pub(super) fn reap(&mut self) {
        let mut any = false;
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.reaped(pid.as_raw(), ExitReason::Code(code))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.reaped(pid.as_raw(), ExitReason::Signal(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "waitpid failed");
                    break;
                }
            }
            any = true;
        }
        if any {
            // An exit may have orphaned descendants, or unlinked a unix path:
            // the supervisor hears of both before it decides anything else.
            self.housekeeping(true);
        }
    }

    pub(super) fn reaped(&mut self, pid: i32, reason: ExitReason) {
        if self.is_trial(pid) {
            return self.trial_exited(reason);
        }
        // An exec that failed reports before the child's exit counts.
        if let Some((id, mut report)) = self.execs.remove(&pid) {
            if let Some(Err(e)) = report.poll() {
                self.pids.remove(&pid);
                self.feed(Event::SpawnFailed {
                    id,
                    error: e.to_string(),
                });
            }
        }
        self.pids.remove(&pid);
        let tail = self.tails.remove(&pid);
        if let Some(tail) = tail.filter(|_| self.sv.exit_would_fail(Pid(pid))) {
            // Its failure quotes its last lines: report the exit once the
            // log threads have read what it wrote before it died. Meanwhile
            // the worker is not signalled (it is out of `pids`).
            let synced = self.logs.sync();
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(super::OUTPUT_WAIT, synced).await;
                let _ = tx.send(Input::Exited(Event::Exited {
                    pid: Pid(pid),
                    reason,
                    output: tail.lines(),
                }));
            });
            return;
        }
        self.feed(Event::Exited {
            pid: Pid(pid),
            reason,
            output: Vec::new(),
        });
    }

    /// Every second and after exits (`after_exit`): settle exec reports,
    /// list adopted descendants, restore unlinked unix paths.
    pub(super) fn housekeeping(&mut self, after_exit: bool) {
        self.previous.check(Instant::now());
        self.execs
            .retain(|_, (_, report)| !matches!(report.poll(), Some(Ok(()))));
        self.repair_paths();
        if !self.notify.is_in_place() {
            // Workers were given this path: a socket bound there again gets
            // their READY=1 (the run directory is made again if it is gone).
            let path = self.notify.path().to_path_buf();
            let rebound = path
                .parent()
                .map_or(Ok(()), |d| {
                    std::os::unix::fs::DirBuilderExt::mode(
                        std::fs::DirBuilder::new().recursive(true),
                        0o700,
                    )
                    .create(d)
                })
                .and_then(|()| crate::edge::notify::NotifySocket::bind(&path));
            match rebound {
                Ok(s) => {
                    warn!(path = %path.display(), "the workers' notify socket was removed (its run directory cleaned?); bound it again");
                    self.notify = s;
                }
                Err(e) => {
                    error!(path = %path.display(), error = %e, "the workers' notify socket was removed and cannot be bound again; workers' READY=1 are lost until it can")
                }
            }
        }
        let pids = &self.pids;
        // As PID 1, an orphan that names no worker is only reaped, unless it
        // holds a listening socket (the core decides: `strays.rs`).
        let init = std::process::id() == 1;
        let listening: HashSet<u64> = if init {
            self.held
                .iter()
                .filter_map(|l| l.socket_inode().ok())
                .collect()
        } else {
            HashSet::new()
        };
        // An upgrade's trial run is holdfast's own child, not a stray.
        let trial = self.trial_pid();
        let procs: Vec<AdoptedProc> = crate::os::proc::adopted(
            |p| pids.contains_key(&p) || Some(p) == trial,
            self.cgroups.as_ref(),
        )
        .into_iter()
        .map(|a| {
            let worker = a.cgroup_serial.or(a.serial).map(WorkerId);
            let holds_listener = init
                && worker.is_none()
                && !crate::os::proc::socket_inodes(a.pid).is_disjoint(&listening);
            AdoptedProc {
                pid: Pid(a.pid),
                pgid: Pid(a.pgid),
                worker,
                comm: a.comm,
                holds_listener,
            }
        })
        .collect();
        if after_exit || !procs.is_empty() || self.sv.strays().next().is_some() {
            self.feed(Event::Adopted { procs });
        }
    }

    /// After READY, and every `RECHECK_EVERY`: which required listeners
    /// does the worker's tree (with its adopted descendants) not hold?
    /// Queued here, run off the loop by [`Self::run_socket_checks`] after the
    /// step; answers as an event.
    pub(super) fn check_sockets(&mut self, id: WorkerId, pid: Pid, generation: Generation) {
        let want: Vec<(String, u64)> = match self.sv.spec(generation) {
            Some(spec) => spec
                .required_listeners()
                .filter_map(|w| {
                    let l = self.held.iter().find(|l| l.serves(&w.address))?;
                    Some((w.address.to_string(), l.socket_inode().ok()?))
                })
                .collect(),
            None => Vec::new(),
        };
        let mut roots = vec![pid.0];
        roots.extend(
            self.sv
                .strays()
                .filter(|s| s.worker == Some(id))
                .map(|s| s.pid.0),
        );
        let claim = self
            .sv
            .worker(id)
            .is_some_and(|w| matches!(w.state, crate::core::WorkerState::Checking { .. }));
        self.socket_checks.push(SocketCheck {
            id,
            want,
            roots,
            claim,
        });
    }

    /// Runs the socket checks queued by this step on one blocking thread.
    /// Each walks its worker's tree down from its root(s): its /proc reads
    /// grow with that tree, not with the number of workers.
    pub(super) fn run_socket_checks(&mut self) {
        if self.socket_checks.is_empty() {
            return;
        }
        self.repair_paths();
        let checks = std::mem::take(&mut self.socket_checks);
        let tx = self.tx.clone();
        let guard = self.in_flight.enter();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            for c in checks {
                let (held, reads) = crate::os::proc::counting(|| {
                    c.roots
                        .iter()
                        .flat_map(|&p| crate::os::proc::socket_inodes(p))
                        .collect::<HashSet<u64>>()
                });
                let missing: Vec<String> = c
                    .want
                    .into_iter()
                    .filter(|(_, inode)| !held.contains(inode))
                    .map(|(a, _)| a)
                    .collect();
                let _ = tx.send(Input::SocketsChecked {
                    id: c.id,
                    missing,
                    claim: c.claim,
                    reads,
                });
            }
        });
    }

    /// A datagram on the workers' notify socket. The sender is the pid the
    /// kernel attached: a worker's own pid is one lookup; a descendant in
    /// its worker's process group one read of its stat; any other
    /// descendant a walk up its parents (off the loop, at most
    /// [`ANCESTRY_DEPTH`] reads), remembered by pid and start time. Never a
    /// listing of /proc.
    pub(super) fn on_notify(&mut self, m: notify::Message) {
        if m.fields.iter().all(|(k, _)| k == "BARRIER") {
            // sd_notify_barrier(3): receiving it (and closing its fd) is the answer.
            return;
        }
        if let Some(&id) = self.pids.get(&m.pid) {
            return self.notified(id, m.fields);
        }
        // One small read, here and now, before a sender that exits at once is gone.
        let (stat, reads) = crate::os::proc::counting(|| crate::os::proc::stat(m.pid));
        self.cost.notify_lookups += 1;
        self.cost.notify_lookup_reads += reads;
        let Some(stat) = stat else {
            return self.notify_stranger(m.pid, &m.fields);
        };
        // A descendant in its worker's process group (most are).
        if let Some(&id) = self.pids.get(&stat.pgrp) {
            return self.notified(id, m.fields);
        }
        let sender = (m.pid, stat.starttime);
        if let Some(&id) = self.senders.get(&sender) {
            return self.notified(id, m.fields);
        }
        let (tx, parent) = (self.tx.clone(), stat.ppid);
        let guard = self.in_flight.enter();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let (ancestors, reads) = crate::os::proc::counting(|| {
                crate::os::proc::ancestors(parent, ANCESTRY_DEPTH, std::process::id() as i32)
            });
            let _ = tx.send(Input::NotifyAncestry {
                sender,
                ancestors,
                reads,
                fields: m.fields,
            });
        });
    }

    /// The parents of a notify sender came back: the nearest that is a
    /// live worker owns it.
    pub(super) fn notify_ancestry(
        &mut self,
        sender: (i32, u64),
        ancestors: Vec<i32>,
        reads: u64,
        fields: Vec<(String, String)>,
    ) {
        self.cost.notify_lookup_reads += reads;
        let Some(id) = ancestors.iter().find_map(|p| self.pids.get(p).copied()) else {
            return self.notify_stranger(sender.0, &fields);
        };
        if self.senders.len() >= SENDER_CACHE {
            self.senders.clear();
        }
        self.senders.insert(sender, id);
        self.notified(id, fields);
    }

    fn notify_stranger(&mut self, sender: i32, fields: &[(String, String)]) {
        debug!(sender, message = ?fields, "notify message from a process that is not a worker's");
        if self.ignored_senders.insert(sender) {
            warn!(
                sender,
                "ignoring notify messages from a process that is not a worker of holdfast"
            );
        }
    }

    pub(super) fn notified(&mut self, id: WorkerId, fields: Vec<(String, String)>) {
        let get = |key: &str| {
            fields
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if let Some(status) = get("STATUS") {
            self.feed(Event::Status {
                id,
                status: status.to_string(),
            });
        }
        if get("READY") == Some("1") {
            debug!(worker = %id, "READY=1");
            self.feed(Event::Ready {
                id,
                via: ReadyVia::Notify,
            });
        }
        if get("STOPPING") == Some("1") {
            debug!(worker = %id, "STOPPING=1");
        }
    }

    /// A worker and its descendants are gone: its cgroup goes too (if it is
    /// still busy, a later release retries).
    pub(super) fn remove_cgroup(&mut self, id: WorkerId) {
        let Some(cg) = self.worker_cgroups.remove(&id) else {
            return;
        };
        match cg.pids() {
            Ok(p) if !p.is_empty() => {
                debug!(worker = %id, pids = ?p, "worker cgroup still has processes; kept for now");
                self.worker_cgroups.insert(id, cg);
            }
            _ => {
                let dir = cg.dir().to_path_buf();
                if let Err(e) = cg.remove() {
                    warn!(cgroup = %dir.display(), error = %e, "cannot remove a worker's cgroup");
                }
            }
        }
    }

    pub(super) fn repair_paths(&self) {
        for l in &self.held {
            match l.repair() {
                Ok(true) => {
                    warn!(address = %l.address, "the unix socket path was removed or replaced (a worker unlinked it; Puma does this to inherited unix sockets it does not bind with a matching -b); restored it to holdfast's listening socket")
                }
                Ok(false) => {}
                Err(e) => {
                    error!(address = %l.address, error = %e, "cannot restore the unix socket path")
                }
            }
        }
    }
}

/// `signal` to the process group `pid` leads, or to `pid` alone when it left
/// the group (a server that called setsid itself).
pub(super) fn signal_group(pid: Pid, signal: Signal) {
    let p = nix::unistd::Pid::from_raw(pid.0);
    match nix::sys::signal::killpg(p, signal) {
        Ok(()) => {}
        Err(nix::errno::Errno::ESRCH) => {
            if let Err(e) = nix::sys::signal::kill(p, signal) {
                debug!(%pid, %signal, error = %e, "signal failed");
            }
        }
        Err(e) => warn!(%pid, %signal, error = %e, "signal to the process group failed"),
    }
}
