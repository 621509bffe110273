//! Reloads (SIGHUP, `restart`): the config is read and its new sockets are
//! bound on a blocking thread; reloads asked for meanwhile fold into one
//! more; listeners no generation uses any more are closed.

use super::*;

impl Runtime {
    /// Re-reads the config and binds its new sockets on a blocking thread;
    /// the result comes back as [`Input::Prepared`]. Reloads asked for
    /// while one is prepared are folded into one more after it (a hundred
    /// SIGHUPs make at most two rollouts).
    pub(super) fn reload(&mut self, w: ReloadWaiter) {
        if self.sv.is_stopping() {
            info!("reload ignored: holdfast is stopping");
            for r in [w.reply, w.started].into_iter().flatten() {
                let _ = r.send(Err("holdfast is stopping".into()));
            }
            return;
        }
        self.reload_pending.push(w);
        if self.reloading.is_none() {
            self.start_reload();
        } else {
            debug!("a reload is being prepared; another follows it");
        }
    }

    pub(super) fn start_reload(&mut self) {
        let Some(mut inherited) = self.inherited.take() else {
            return;
        };
        self.reloading = Some(std::mem::take(&mut self.reload_pending));
        let path = self.config.path.clone();
        let overrides = self.overrides.clone();
        let held: Vec<(Address, u64)> = self
            .held
            .iter()
            .map(|l| (l.address.clone(), l.socket_inode().unwrap_or(0)))
            .chain(
                // An activated socket is also known by its systemd: name.
                self.held.iter().filter_map(|l| match &l.origin {
                    listener::Origin::Activated { name } => Some((
                        Address::Systemd(name.clone()),
                        l.socket_inode().unwrap_or(0),
                    )),
                    _ => None,
                }),
            )
            .collect();
        let tx = self.tx.clone();
        let guard = self.in_flight.enter();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let result = prepare(path.as_deref(), &overrides, &held, &mut inherited);
            let _ = tx.send(Input::Prepared(Box::new(Prepared { result, inherited })));
        });
    }

    /// A reload came back from its thread: roll out, or refuse with its error.
    pub(super) fn prepared(&mut self, p: Prepared) {
        self.inherited = Some(p.inherited);
        let waiters = self.reloading.take().unwrap_or_default();
        let (replies, started): (Vec<_>, Vec<_>) =
            waiters.into_iter().map(|w| (w.reply, w.started)).unzip();
        let reply = self.hold_replies(replies.into_iter().flatten().collect());
        let started: Vec<Reply> = started.into_iter().flatten().collect();
        // Each reload must be answered RELOADING=1 … READY=1 (see
        // `Notifier::reload_began`), also one that lands during a rollout.
        let during_rollout = self.systemd.told() == crate::core::ServiceState::Reloading;
        let answer = match p.result {
            Err(error) => {
                let answer = Err(format!("reload rejected: {error}"));
                self.feed(Event::ReloadRejected { error, reply });
                answer
            }
            Ok((config, spec, bound)) => {
                for l in bound {
                    info!(name = %l.name, address = %l.address, origin = %l.origin, "listening (new in this config)");
                    self.held.push(Rc::new(l));
                }
                let listeners: Vec<Rc<Listener>> = config
                    .listen
                    .iter()
                    .filter_map(|want| self.held.iter().find(|l| l.serves(&want.address)))
                    .cloned()
                    .collect();
                if !same_logs(&config.logs, self.logs.config()) {
                    warn!("[logs] changes take effect only on a restart of holdfast");
                }
                if config.control_socket != self.config.control_socket {
                    warn!(old = %self.config.control_socket.display(), new = %config.control_socket.display(), "control_socket changes take effect only on a restart of holdfast");
                }
                self.systemd.store_changes(&self.listeners, &listeners);
                self.listeners = listeners;
                self.config = config;
                self.feed(Event::Request {
                    request: Request::Rollout {
                        spec: Box::new(spec),
                    },
                    reply,
                });
                match self.sv.rollout() {
                    Some(r) => Ok(format!("rollout of generation {} started", r.generation)),
                    None if self.sv.is_stopping() => Err("holdfast is stopping".to_string()),
                    None => Ok("rollout done".to_string()),
                }
            }
        };
        if during_rollout {
            self.systemd.reload_began();
        }
        for s in started {
            let _ = s.send(answer.clone());
        }
        if self.reload_pending.is_empty() {
            return;
        }
        if self.sv.is_stopping() {
            for w in std::mem::take(&mut self.reload_pending) {
                for r in [w.reply, w.started].into_iter().flatten() {
                    let _ = r.send(Err("holdfast is stopping".into()));
                }
            }
        } else {
            self.start_reload();
        }
    }

    /// Closes the listeners no generation uses any more (a reload dropped
    /// them and the last worker that had them is gone).
    pub(super) fn release_listeners(&mut self) {
        let specs: Vec<&Spec> = self.sv.specs().map(|(_, s)| s).collect();
        let listeners = &self.listeners;
        self.held.retain(|l| {
            let used = listeners.iter().any(|c| Rc::ptr_eq(c, l))
                || specs
                    .iter()
                    .any(|s| s.listeners.iter().any(|w| l.serves(&w.address)));
            if !used {
                info!(address = %l.address, "closing a listener no generation uses any more");
            }
            used
        });
    }
}

/// The reload's blocking half: read and validate the config, resolve the
/// command, and take or bind the sockets it names that `held` lacks.
fn prepare(
    path: Option<&Path>,
    overrides: &Overrides,
    held: &[(Address, u64)],
    inherited: &mut Inherited,
) -> Result<(Config, Spec, Vec<Listener>), String> {
    let config = Config::load(path, overrides).map_err(|e| e.to_string())?;
    let spec = spec_of(&config).map_err(|e| e.to_string())?;
    let mut bound: Vec<Listener> = Vec::new();
    for l in &config.listen {
        if held.iter().any(|(a, _)| a == &l.address) || bound.iter().any(|b| b.serves(&l.address)) {
            continue;
        }
        let in_use: Vec<u64> = held
            .iter()
            .map(|(_, i)| *i)
            .chain(bound.iter().filter_map(|b| b.socket_inode().ok()))
            .collect();
        let listener = match inherited.claim(l, &in_use).map_err(|e| e.to_string())? {
            Some(a) => a,
            None => Listener::bind(l).map_err(|e| e.to_string())?,
        };
        bound.push(listener);
    }
    Ok((config, spec, bound))
}

/// Whether two `[logs]` tables ask for the same thing.
fn same_logs(a: &LogsConfig, b: &LogsConfig) -> bool {
    a.stdout == b.stdout
        && a.stderr == b.stderr
        && a.prefix == b.prefix
        && a.holdfast_log == b.holdfast_log
        && a.reopen_signal.as_ref().map(|s| s.0) == b.reopen_signal.as_ref().map(|s| s.0)
}
