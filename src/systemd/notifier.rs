//! State on the way out (sd_notify(3)): the supervisor's states, status
//! lines, watchdog pings, timeout extensions and the fd store, written by a
//! thread of its own (see the module above).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use sd_notify::NotifyState;
use tracing::{debug, info, warn};

use super::STORE_PREFIX;
use crate::core::{At, ServiceState, Supervisor, WorkerState};
use crate::os::listener::{Listener, Origin};

/// What systemd has been told about holdfast's state: the supervisor's
/// [`ServiceState`], as the notifier last sent it.
pub type Told = ServiceState;

/// Where notifications go.
#[derive(Debug)]
pub(super) enum Target {
    /// No NOTIFY_SOCKET: every notification is a no-op.
    Off,
    /// Datagrams go through the sender thread, so a full receive queue on
    /// systemd's side never blocks the event loop.
    Socket(Sender),
    /// Unit tests: the payloads, in order.
    #[cfg(test)]
    Record(Vec<String>),
}

/// How long after the last message systemd may time holdfast out, on top of
/// the deadline holdfast itself enforces (ready_timeout, drain_timeout).
pub const EXTEND_MARGIN: Duration = Duration::from_secs(5);
/// How often EXTEND_TIMEOUT_USEC is repeated while progress continues.
pub const EXTEND_EVERY: Duration = Duration::from_secs(2);
/// Messages queued for the sender thread before new ones are dropped (a
/// service manager that has not read its socket for minutes).
pub(super) const QUEUE: usize = 1024;

/// holdfast's side of sd_notify(3).
#[derive(Debug)]
pub struct Notifier {
    target: Target,
    /// Half of WATCHDOG_USEC (sd_watchdog_enabled(3)): how often to ping.
    watchdog: Option<Duration>,
    next_ping: Option<Instant>,
    next_extend: Option<Instant>,
    /// Put listening sockets in the fd store.
    fd_store: bool,
    told: Told,
    status: String,
}

impl Notifier {
    /// A notifier that sends nothing.
    #[cfg(test)]
    pub(super) fn off() -> Notifier {
        Notifier::new(Target::Off, None, false, Instant::now())
    }

    pub(crate) fn told(&self) -> Told {
        self.told
    }

    /// Reads NOTIFY_SOCKET, WATCHDOG_USEC/WATCHDOG_PID and FDSTORE.
    ///
    /// The fd store is used when NOTIFY_SOCKET is set and FDSTORE is not 0:
    /// systemd ≥ 254 sets `$FDSTORE` to FileDescriptorStoreMax= when that is
    /// above 0; systemd 252 gives no hint, and a unit without the setting
    /// logs one warning per FDSTORE message ("Cannot store more fds than
    /// FileDescriptorStoreMax=0, closing remaining."). `FDSTORE=0` in the
    /// unit's Environment= turns it off.
    pub fn from_env(now: Instant) -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let target = match socket.as_deref().map(|s| s.as_encoded_bytes()) {
            None | Some(b"") => Target::Off,
            Some(s) => {
                let addr = match s.strip_prefix(b"@") {
                    Some(name) => UnixAddr::new_abstract(name),
                    None if s.starts_with(b"/") => UnixAddr::new(s),
                    None => Err(nix::errno::Errno::EAFNOSUPPORT),
                };
                match addr.map(Sender::start) {
                    Ok(Ok(sender)) => Target::Socket(sender),
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot start the thread that notifies systemd; not notifying");
                        Target::Off
                    }
                    Err(e) => {
                        warn!(notify_socket = %String::from_utf8_lossy(s), error = %e,
                            "NOTIFY_SOCKET is neither an absolute path nor an abstract @name; not notifying");
                        Target::Off
                    }
                }
            }
        };
        let on = !matches!(target, Target::Off);
        let fd_store = on && std::env::var("FDSTORE").map_or(true, |v| v.trim() != "0");
        let watchdog = if on {
            sd_notify::watchdog_enabled()
                .filter(|d| !d.is_zero())
                .map(|d| d / 2)
        } else {
            None
        };
        if let Some(every) = watchdog {
            info!(every = ?every, "systemd watchdog: pinging at half of WATCHDOG_USEC");
        }
        Notifier::new(target, watchdog, fd_store, now)
    }

    /// What an upgrade hands over: what systemd was told, and when the next
    /// ping and timeout extension are due (relative to `now`).
    pub fn record(&self, now: Instant) -> NotifierRecord {
        NotifierRecord {
            told: self.told,
            status: self.status.clone(),
            next_ping: self.next_ping.map(|t| At::of(t, now)),
            next_extend: self.next_extend.map(|t| At::of(t, now)),
        }
    }

    /// The notifier of a new image: NOTIFY_SOCKET, WATCHDOG_USEC and FDSTORE
    /// read again (the exec kept the environment and the pid), what systemd
    /// was told and the schedule as the old image left them.
    pub fn restore(r: NotifierRecord, now: Instant) -> Notifier {
        let mut n = Notifier::from_env(now);
        n.told = r.told;
        n.status = r.status;
        if n.watchdog.is_some() {
            n.next_ping = r.next_ping.map(|a| a.at(now)).or(n.next_ping);
        }
        if n.is_on() {
            n.next_extend = r.next_extend.map(|a| a.at(now)).or(n.next_extend);
        }
        n
    }

    /// WATCHDOG=1 now, when the watchdog is on (around an upgrade's exec),
    /// and the next ping half a WATCHDOG_USEC from now.
    pub fn ping_now(&mut self, now: Instant) {
        if let Some(every) = self.watchdog {
            self.send(&[NotifyState::Watchdog], &[]);
            self.next_ping = Some(now + every);
        }
    }

    pub(super) fn new(
        target: Target,
        watchdog: Option<Duration>,
        fd_store: bool,
        now: Instant,
    ) -> Notifier {
        let on = !matches!(target, Target::Off);
        Notifier {
            target,
            watchdog,
            next_ping: watchdog.map(|_| now),
            next_extend: on.then_some(now + EXTEND_EVERY),
            fd_store,
            told: Told::Starting,
            status: String::new(),
        }
    }

    /// Whether NOTIFY_SOCKET is set.
    pub fn is_on(&self) -> bool {
        !matches!(self.target, Target::Off)
    }

    /// Sends what the supervisor decided ([`Action::Service`](crate::core::Action::Service)):
    /// READY=1 (every slot ready, or a rollout ended), RELOADING=1 with
    /// MONOTONIC_USEC (a rollout started), STOPPING=1, and STATUS= when the
    /// line changed. Stopping is final; Starting is never re-entered.
    pub fn tell(&mut self, state: ServiceState, status: &str) {
        if !self.is_on() {
            return;
        }
        let status_changed = status != self.status;
        self.status = status.to_string();
        let st = NotifyState::Status(status);
        if self.told == state || self.told == Told::Stopping || state == Told::Starting {
            if status_changed {
                self.send(&[st], &[]);
            }
            return;
        }
        match state {
            Told::Stopping => self.send(&[NotifyState::Stopping, st], &[]),
            Told::Ready => self.send(&[NotifyState::Ready, st], &[]),
            Told::Reloading => {
                if self.told == Told::Starting {
                    self.send(&[NotifyState::Ready], &[]);
                }
                match NotifyState::monotonic_usec_now() {
                    Ok(mono) => self.send(&[NotifyState::Reloading, mono, st], &[]),
                    Err(e) => {
                        warn!(error = %e, "CLOCK_MONOTONIC unreadable; RELOADING=1 without MONOTONIC_USEC");
                        self.send(&[NotifyState::Reloading, st], &[]);
                    }
                }
            }
            Told::Starting => {}
        }
        debug!(from = ?self.told, to = ?state, "told systemd");
        self.told = state;
    }

    /// A reload began (accepted or rejected) while systemd is told a rollout
    /// is under way: RELOADING=1 again, with a fresh MONOTONIC_USEC. systemd
    /// ≥ 253 (`Type=notify-reload`) ends a reload it signalled only on a
    /// RELOADING=1 stamped after its signal, then READY=1; without this, a
    /// SIGHUP that lands during a rollout waits for TimeoutStartSec= and
    /// fails. READY=1 still comes when the (newest) rollout ends. systemd 252
    /// only keeps the unit "reloading", as it already is.
    pub fn reload_began(&mut self) {
        if !self.is_on() || self.told != Told::Reloading {
            return;
        }
        let status = self.status.clone();
        let st = NotifyState::Status(&status);
        match NotifyState::monotonic_usec_now() {
            Ok(mono) => self.send(&[NotifyState::Reloading, mono, st], &[]),
            Err(e) => {
                warn!(error = %e, "CLOCK_MONOTONIC unreadable; RELOADING=1 without MONOTONIC_USEC");
                self.send(&[NotifyState::Reloading, st], &[]);
            }
        }
        debug!("told systemd: reloading again");
    }

    /// Runs `f` once every message queued so far has been sent (at once
    /// when nothing is sent to systemd). The edge sends its replies through
    /// here, so that `holdfast restart --wait` run as `ExecReload=` exits
    /// only after READY=1 is in systemd's queue: systemd reads notifications
    /// before SIGCHLD, so it sees the reload end before its command's exit.
    pub fn then(&self, f: Box<dyn FnOnce() + Send>) {
        match &self.target {
            Target::Socket(s) => s.then(f),
            _ => f(),
        }
    }

    /// When [`Notifier::due`] must run next: the next watchdog ping or
    /// timeout extension. None when NOTIFY_SOCKET is unset.
    pub fn next_due(&self) -> Option<Instant> {
        if !self.is_on() {
            return None;
        }
        [self.next_ping, self.next_extend]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs from the event loop's timer: WATCHDOG=1 every half of
    /// WATCHDOG_USEC, and EXTEND_TIMEOUT_USEC= every [`EXTEND_EVERY`] while
    /// systemd is timing holdfast (starting, reloading, stopping) and the
    /// work under way is bounded by a deadline holdfast enforces.
    pub fn due(&mut self, now: Instant, sv: &Supervisor) {
        if let (Some(at), Some(every)) = (self.next_ping, self.watchdog) {
            if at <= now {
                self.send(&[NotifyState::Watchdog], &[]);
                self.next_ping = Some(now + every);
            }
        }
        if let Some(at) = self.next_extend {
            if at <= now {
                self.next_extend = Some(now + EXTEND_EVERY);
                if let Some(extend) = extension(sv, self.told, now) {
                    let usec = u32::try_from(extend.as_micros()).unwrap_or(u32::MAX);
                    self.send(&[NotifyState::ExtendTimeoutUsec(usec)], &[]);
                }
            }
        }
    }

    /// Puts every listener holdfast owns (bound or stored, not activated: a
    /// `.socket` unit keeps those itself) in the fd store, one message per
    /// name, `FDNAME=` [`STORE_PREFIX`]`NAME`. systemd keeps one copy of each
    /// socket however often it is sent.
    pub fn store(&mut self, listeners: &[Rc<Listener>]) {
        if !self.fd_store {
            return;
        }
        for l in listeners {
            if matches!(l.origin, Origin::Activated { .. }) {
                continue;
            }
            let name = format!("{STORE_PREFIX}{}", l.name);
            debug!(fdname = %name, address = %l.address, "FDSTORE=1");
            self.send(
                &[
                    NotifyState::Custom("FDSTORE=1"),
                    NotifyState::Custom(&format!("FDNAME={name}")),
                ],
                &[l.raw_fd()],
            );
        }
    }

    /// After a reload: removes from the fd store what `old` had and `new`
    /// lacks (or has under a different socket), then stores `new`.
    pub fn store_changes(&mut self, old: &[Rc<Listener>], new: &[Rc<Listener>]) {
        if !self.fd_store {
            return;
        }
        for o in old {
            if matches!(o.origin, Origin::Activated { .. }) {
                continue;
            }
            let kept = new.iter().any(|n| Rc::ptr_eq(n, o) && n.name == o.name);
            if !kept {
                self.store_remove(&format!("{STORE_PREFIX}{}", o.name));
            }
        }
        let added: Vec<Rc<Listener>> = new
            .iter()
            .filter(|n| !old.iter().any(|o| Rc::ptr_eq(n, o) && n.name == o.name))
            .cloned()
            .collect();
        self.store(&added);
    }

    /// `FDSTOREREMOVE=1` for every stored fd named `fdname`.
    pub fn store_remove(&mut self, fdname: &str) {
        if !self.fd_store {
            return;
        }
        debug!(%fdname, "FDSTOREREMOVE=1");
        self.send(
            &[
                NotifyState::Custom("FDSTOREREMOVE=1"),
                NotifyState::Custom(&format!("FDNAME={fdname}")),
            ],
            &[],
        );
    }

    /// Unit tests: a notifier that records its messages.
    #[cfg(test)]
    pub(super) fn recording(watchdog: Option<Duration>, now: Instant) -> Notifier {
        Notifier::new(Target::Record(Vec::new()), watchdog, true, now)
    }

    /// Unit tests: the messages recorded since the last call.
    #[cfg(test)]
    pub(super) fn take_sent(&mut self) -> Vec<String> {
        match &mut self.target {
            Target::Record(v) => std::mem::take(v),
            _ => Vec::new(),
        }
    }

    /// Whether listening sockets go to the fd store.
    pub fn uses_fd_store(&self) -> bool {
        self.fd_store
    }

    /// Waits up to `within` for the queued messages to be sent (at exit).
    pub fn flush(&self, within: Duration) {
        if let Target::Socket(s) = &self.target {
            s.flush(within);
        }
    }

    pub(super) fn send(&mut self, states: &[NotifyState<'_>], fds: &[RawFd]) {
        let text: String = states.iter().map(|s| format!("{s}\n")).collect();
        match &mut self.target {
            Target::Off => {}
            #[cfg(test)]
            Target::Record(v) => v.push(text),
            Target::Socket(sender) => sender.send(text, fds),
        }
    }
}

/// A [`Notifier`]'s state as an upgrade hands it over.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NotifierRecord {
    told: Told,
    status: String,
    next_ping: Option<At>,
    next_extend: Option<At>,
}

/// One datagram for the sender thread: its text and its fds (duplicates,
/// closed once sent).
pub(super) struct Datagram {
    text: String,
    fds: Vec<OwnedFd>,
    /// Run once every datagram queued before it was sent (flush, replies).
    then: Option<Box<dyn FnOnce() + Send>>,
}

/// The thread that writes to NOTIFY_SOCKET, in order, with a 2 s send
/// timeout per datagram: the event loop only queues.
#[derive(Debug)]
pub(super) struct Sender {
    queue: std::sync::mpsc::SyncSender<Datagram>,
}

impl Sender {
    pub(super) fn start(addr: UnixAddr) -> io::Result<Sender> {
        let (queue, rx) = std::sync::mpsc::sync_channel::<Datagram>(QUEUE);
        std::thread::Builder::new()
            .name("holdfast-sd-notify".into())
            .spawn(move || {
                let mut failed = false;
                for d in rx {
                    if let Some(then) = d.then {
                        then();
                        continue;
                    }
                    let raw: Vec<RawFd> = d.fds.iter().map(|f| f.as_raw_fd()).collect();
                    match send_to(&addr, &d.text, &raw) {
                        Ok(()) if failed => {
                            info!("NOTIFY_SOCKET works again");
                            failed = false;
                        }
                        Ok(()) => {}
                        Err(e) if !failed => {
                            failed = true;
                            warn!(error = %e, message = %d.text.trim_end().replace('\n', " "), "cannot notify systemd (NOTIFY_SOCKET)");
                        }
                        Err(e) => debug!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)"),
                    }
                }
            })?;
        Ok(Sender { queue })
    }

    pub(super) fn send(&self, text: String, fds: &[RawFd]) {
        let mut owned = Vec::with_capacity(fds.len());
        for &fd in fds {
            match crate::os::sys::dup(fd) {
                Ok(f) => owned.push(f),
                Err(e) => {
                    warn!(fd, error = %e, "cannot duplicate an fd for the fd store; not storing it");
                    return;
                }
            }
        }
        let d = Datagram {
            text,
            fds: owned,
            then: None,
        };
        if let Err(e) = self.queue.try_send(d) {
            warn!(error = %e, "the queue to systemd is full or gone; dropping a notification");
        }
    }

    pub(super) fn flush(&self, within: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.then(Box::new(move || {
            let _ = tx.send(());
        }));
        let _ = rx.recv_timeout(within);
    }

    /// Queues `f` behind the datagrams; runs it now if the queue is full or
    /// the thread is gone (nothing before it can be sent then anyway).
    pub(super) fn then(&self, f: Box<dyn FnOnce() + Send>) {
        let d = Datagram {
            text: String::new(),
            fds: Vec::new(),
            then: Some(f),
        };
        if let Err(
            std::sync::mpsc::TrySendError::Full(d) | std::sync::mpsc::TrySendError::Disconnected(d),
        ) = self.queue.try_send(d)
        {
            if let Some(f) = d.then {
                f();
            }
        }
    }
}

impl std::fmt::Debug for Datagram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text.trim_end())
    }
}

/// One datagram to `addr` (sd_notify(3)), with `fds` as SCM_RIGHTS. A fresh
/// socket per message, as libsystemd does: it survives systemd re-executing.
pub(super) fn send_to(addr: &UnixAddr, text: &str, fds: &[RawFd]) -> nix::Result<()> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // A full receive queue on systemd's side must not hang the thread for long.
    let timeout = nix::sys::time::TimeVal::new(2, 0);
    setsockopt(&sock, sockopt::SendTimeout, &timeout)?;
    let iov = [IoSlice::new(text.as_bytes())];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let n = sendmsg(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(addr),
    )?;
    if n != text.len() {
        return Err(nix::errno::Errno::EMSGSIZE);
    }
    Ok(())
}

/// How far to extend systemd's timeout now, if the work it is timing is
/// still progressing: until the last deadline holdfast itself enforces on
/// that work, plus [`EXTEND_MARGIN`].
///
/// - starting: workers still within `ready_timeout`, and no slot has crashed
///   (a crash loop is not progress: systemd's own timeout should end it);
/// - reloading: new workers within `ready_timeout`, old ones within
///   `drain_timeout`;
/// - stopping: workers within `drain_timeout` (or killed, not yet reaped).
pub fn extension(sv: &Supervisor, told: Told, now: Instant) -> Option<Duration> {
    let starting = |w: &crate::core::Worker| match w.state {
        WorkerState::Starting { ready_by } | WorkerState::Checking { ready_by } => Some(ready_by),
        _ => None,
    };
    let draining = |w: &crate::core::Worker| match w.state {
        WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at } => Some(kill_at),
        WorkerState::Killed => Some(now),
        _ => None,
    };
    let until = match told {
        Told::Ready => return None,
        Told::Starting => {
            let crashed = sv.slots().any(|(_, i)| i.crashes > 0);
            if crashed {
                return None;
            }
            sv.workers().filter_map(starting).max()
        }
        Told::Reloading => sv
            .workers()
            .filter_map(|w| starting(w).or_else(|| draining(w)))
            .max(),
        Told::Stopping => sv.workers().filter_map(draining).max(),
    }?;
    Some(until.saturating_duration_since(now) + EXTEND_MARGIN)
}
