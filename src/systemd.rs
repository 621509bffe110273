//! Talking to systemd: sockets on the way in (sd_listen_fds(3)), state on the
//! way out (sd_notify(3)).
//!
//! **Intake** ([`Inherited`]). `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` are
//! read once, checked against holdfast's own pid and removed from its
//! environment before any thread exists, so nothing holdfast starts can take
//! them for its own (workers get holdfast's LISTEN_* for their fds from
//! `spawn`). A passed socket is either *activated* (a `.socket` unit or
//! `systemd-socket-activate`; systemd owns it) or *stored* (an earlier
//! holdfast put it in the fd store under [`STORE_PREFIX`]`NAME`). Each
//! `[[listen]]` entry claims at most one ([`Inherited::claim`]): by name,
//! then by address; a claimed socket is checked (family, type, listening,
//! address) and a mismatch is an error naming the fd. An activated socket no
//! entry claims is warned about and kept open; a stale stored one is closed
//! and removed from the store.
//!
//! **Notifications** ([`Notifier`]). What systemd is told (READY, RELOADING,
//! STOPPING, STATUS) is decided by the supervisor and arrives as an action
//! ([`Notifier::tell`]); a thread of its own writes the datagrams, so a slow
//! service manager never blocks the event loop. WATCHDOG
//! and EXTEND_TIMEOUT_USEC are sent from a timer of the event loop itself
//! ([`Notifier::due`]): a stuck loop stops them, which is the point of a
//! watchdog. The fd store gets every listening socket holdfast owns
//! (`FDSTORE=1`, `FDNAME=`), so a restart of holdfast itself gets the very
//! same sockets back and the kernel's queue is never closed.
//!
//! The messages are sd-notify's [`NotifyState`]s. Sending them is done here:
//! sd-notify 0.5 connects `NOTIFY_SOCKET` as a filesystem path, so an abstract
//! `@name` (which sd_notify(3) allows) fails, and its fd passing needs an
//! optional feature with one more dependency, while nix already does
//! `sendmsg` with `SCM_RIGHTS`.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use sd_notify::NotifyState;
use socket2::Domain;
use tracing::{debug, info, warn};

use crate::config::{Address, Listen};
use crate::listener::{self, Listener, Origin, SocketFacts};
use crate::supervisor::{ServiceState, Supervisor, WorkerState};

/// `FDNAME=` of a socket holdfast puts in the fd store: this prefix and the
/// `[[listen]]` entry's name. It tells a stored socket (holdfast's own, may be
/// stale after a config change) from an activated one (systemd's).
pub const STORE_PREFIX: &str = "holdfast.store.";

/// The name sd_listen_fds_with_names(3) gives an fd LISTEN_FDNAMES does not name.
const UNNAMED: &str = "unknown";

/// Socket activation that cannot be used as the config says.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: {var}={value:?} is not a number")]
    BadVar { var: &'static str, value: String },
    #[error("socket activation: fd {fd} (`{name}` in LISTEN_FDNAMES) for [[listen]] `{entry}` ({address}): {problem}")]
    Mismatch {
        fd: RawFd,
        name: String,
        entry: String,
        address: Address,
        problem: String,
    },
    #[error("socket activation: [[listen]] `{entry}` ({address}): fds {fds} are all named `{name}`; give each socket its own FileDescriptorName= (one .socket unit each), or give the entries their addresses")]
    Ambiguous {
        entry: String,
        address: Address,
        name: String,
        fds: String,
    },
    #[error("socket activation: fd {fd} for [[listen]] `{entry}`: {source}")]
    Io {
        fd: RawFd,
        entry: String,
        source: io::Error,
    },
}

/// What LISTEN_PID and LISTEN_FDS say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenVars {
    /// Not set (or LISTEN_FDS=0).
    None,
    /// Set for another process (LISTEN_PID is not ours): not for holdfast.
    OtherPid(String),
    /// `count` fds from 3 are ours.
    Mine(usize),
}

/// Interprets LISTEN_PID and LISTEN_FDS as sd_listen_fds(3) does: no
/// LISTEN_PID, or one that is not `me`, means no fds.
pub fn listen_vars(
    pid: Option<&str>,
    fds: Option<&str>,
    me: u32,
) -> Result<ListenVars, ActivationError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(ListenVars::None);
    };
    let bad = |var, value: &str| ActivationError::BadVar {
        var,
        value: value.to_string(),
    };
    let pid_n: u32 = pid.trim().parse().map_err(|_| bad("LISTEN_PID", pid))?;
    if pid_n != me {
        return Ok(ListenVars::OtherPid(pid.to_string()));
    }
    let n: usize = fds.trim().parse().map_err(|_| bad("LISTEN_FDS", fds))?;
    // Beyond any fd table: a corrupt value, not a count.
    if n > 65_536 {
        return Err(bad("LISTEN_FDS", fds));
    }
    Ok(if n == 0 {
        ListenVars::None
    } else {
        ListenVars::Mine(n)
    })
}

/// The names of `count` fds from LISTEN_FDNAMES: colon-separated, padded with
/// "unknown", extra names dropped. The bool is false when the count differed.
pub fn fd_names(raw: Option<&str>, count: usize) -> (Vec<String>, bool) {
    let given: Vec<String> = match raw {
        Some(r) if !r.is_empty() => r.split(':').map(str::to_string).collect(),
        _ => Vec::new(),
    };
    let exact = raw.is_none() || given.len() == count;
    let names = (0..count)
        .map(|i| given.get(i).cloned().unwrap_or_else(|| UNNAMED.to_string()))
        .collect();
    (names, exact)
}

/// One passed fd as the matcher sees it.
#[derive(Debug, Clone)]
pub struct Offer {
    /// The fd number it was passed as (3, 4, ...): what messages name.
    pub number: RawFd,
    /// Its LISTEN_FDNAMES name, as passed.
    pub name: String,
    /// Activated (by that name) or stored (for the entry named after the prefix).
    pub origin: Origin,
    /// What the kernel says it is, or why it is not a socket.
    pub facts: Result<SocketFacts, String>,
    /// The socket's inode: the same socket passed twice has the same one.
    pub inode: u64,
}

impl Offer {
    fn new(number: RawFd, name: String, facts: Result<SocketFacts, String>, inode: u64) -> Offer {
        let origin = match name.strip_prefix(STORE_PREFIX) {
            Some(_) => Origin::Stored,
            None => Origin::Activated { name: name.clone() },
        };
        Offer {
            number,
            name,
            origin,
            facts,
            inode,
        }
    }

    /// For a stored socket: the `[[listen]]` name it was stored for.
    fn stored_for(&self) -> Option<&str> {
        match self.origin {
            Origin::Stored => self.name.strip_prefix(STORE_PREFIX),
            _ => None,
        }
    }

    fn activated_as(&self, want: &str) -> bool {
        matches!(&self.origin, Origin::Activated { name } if name == want)
    }

    /// A listening stream socket at exactly `address`.
    fn is_at(&self, address: &Address) -> bool {
        self.facts
            .as_ref()
            .is_ok_and(|f| f.stream && f.listening && f.local.as_ref() == Some(address))
    }

    /// Why this offer cannot serve `spec`, if it cannot.
    fn problem(&self, spec: &Listen) -> Option<String> {
        let facts = match &self.facts {
            Ok(f) => f,
            Err(e) => return Some(e.clone()),
        };
        let want = match &spec.address {
            Address::Tcp(a) => format!("a listening TCP socket on {a}"),
            Address::Unix(p) => format!("a listening unix stream socket on {}", p.display()),
            Address::Systemd(_) => "a listening TCP or unix stream socket".to_string(),
        };
        let family_ok = match &spec.address {
            Address::Tcp(a) if a.is_ipv4() => facts.domain == Domain::IPV4,
            Address::Tcp(_) => facts.domain == Domain::IPV6,
            Address::Unix(_) => facts.domain == Domain::UNIX,
            Address::Systemd(_) => {
                [Domain::IPV4, Domain::IPV6, Domain::UNIX].contains(&facts.domain)
            }
        };
        let address_ok = match &spec.address {
            Address::Systemd(_) => true,
            a => facts.local.as_ref() == Some(a),
        };
        if family_ok && facts.stream && facts.listening && address_ok {
            return None;
        }
        let hint = if facts.stream && !facts.listening {
            " (a .socket unit with Accept=yes passes connections; holdfast needs Accept=no)"
        } else {
            ""
        };
        Some(format!(
            "it is {}, the entry wants {want}{hint}",
            facts.description
        ))
    }
}

/// Which offer `spec` takes, if any: `Ok(None)` means bind it anew.
///
/// 1. Activated sockets named as the entry (`systemd:NAME`: NAME; else the
///    entry's `name`): the one at the entry's address, or for `systemd:NAME`
///    the only one; one with that name but the wrong family, type or address
///    is an error naming the fd.
/// 2. A stored socket for this entry at its address (a stale one, stored for
///    another address, is not taken).
/// 3. Any unused activated or stored socket at the entry's address.
///
/// `in_use` are inodes already taken by other entries.
pub fn choose(
    spec: &Listen,
    offers: &[Offer],
    in_use: &[u64],
) -> Result<Option<usize>, ActivationError> {
    let free = |o: &Offer| !in_use.contains(&o.inode);
    let mismatch = |o: &Offer, problem: String| ActivationError::Mismatch {
        fd: o.number,
        name: o.name.clone(),
        entry: spec.name.clone(),
        address: spec.address.clone(),
        problem,
    };
    if let Address::Systemd(want) = &spec.address {
        let named: Vec<usize> = (0..offers.len())
            .filter(|&i| free(&offers[i]) && offers[i].activated_as(want))
            .collect();
        return match named.as_slice() {
            [] => Ok(None),
            [i] => match offers[*i].problem(spec) {
                None => Ok(Some(*i)),
                Some(p) => Err(mismatch(&offers[*i], p)),
            },
            many => Err(ActivationError::Ambiguous {
                entry: spec.name.clone(),
                address: spec.address.clone(),
                name: want.clone(),
                fds: many
                    .iter()
                    .map(|&i| offers[i].number.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        };
    }
    let named: Vec<usize> = (0..offers.len())
        .filter(|&i| free(&offers[i]) && offers[i].activated_as(&spec.name))
        .collect();
    if let Some(&i) = named.iter().find(|&&i| offers[i].is_at(&spec.address)) {
        return Ok(Some(i));
    }
    if let Some(&i) = named.first() {
        let problem = offers[i]
            .problem(spec)
            .unwrap_or_else(|| "it is not the socket the entry names".to_string());
        return Err(mismatch(&offers[i], problem));
    }
    let stored = (0..offers.len()).find(|&i| {
        free(&offers[i])
            && offers[i].stored_for() == Some(spec.name.as_str())
            && offers[i].is_at(&spec.address)
    });
    if stored.is_some() {
        return Ok(stored);
    }
    Ok((0..offers.len()).find(|&i| free(&offers[i]) && offers[i].is_at(&spec.address)))
}

/// One fd systemd passed, held open until an entry claims it (activated ones
/// stay held for holdfast's whole life: systemd owns them).
#[derive(Debug)]
struct Passed {
    offer: Offer,
    fd: OwnedFd,
}

/// The sockets systemd passed to holdfast, taken from the environment once.
#[derive(Debug, Default)]
pub struct Inherited {
    passed: Vec<Passed>,
    warned: bool,
}

impl Inherited {
    /// Nothing passed.
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Reads LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, removes them from the
    /// environment, and takes the fds (close-on-exec from now on).
    ///
    /// Call it once, first thing: before any thread starts (it changes the
    /// environment) and before holdfast opens fds of its own.
    pub fn from_env() -> Result<Inherited, ActivationError> {
        let var = |k| std::env::var(k).ok();
        let (pid, fds, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
        let me = std::process::id();
        let count = match listen_vars(pid.as_deref(), fds.as_deref(), me)? {
            ListenVars::None => return Ok(Inherited::none()),
            ListenVars::OtherPid(p) => {
                warn!(listen_pid = %p, pid = me, "LISTEN_FDS was set for another process (LISTEN_PID is not holdfast's pid); ignoring the passed fds");
                return Ok(Inherited::none());
            }
            ListenVars::Mine(n) => n,
        };
        let (names, exact) = fd_names(names.as_deref(), count);
        if !exact {
            warn!(listen_fds = count, listen_fdnames = ?names, "LISTEN_FDNAMES does not name every fd of LISTEN_FDS; the rest are called `unknown`");
        }
        info!(
            listen_pid = me,
            listen_fds = count,
            listen_fdnames = %names.join(":"),
            "socket activation: taking the sockets systemd passed (LISTEN_PID is holdfast's own pid)"
        );
        let mut passed: Vec<Passed> = Vec::new();
        for (i, (taken, name)) in crate::sys::take_listen_fds(count)
            .into_iter()
            .zip(names)
            .enumerate()
        {
            let number = 3 + i as RawFd;
            let fd = match taken {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(fd = number, %name, error = %e, "LISTEN_FDS names an fd that is not open; skipping it");
                    continue;
                }
            };
            let facts = listener::inspect(fd.as_fd()).map_err(|e| e.to_string());
            let inode = nix::sys::stat::fstat(fd.as_fd()).map_or(0, |st| st.st_ino);
            let offer = Offer::new(number, name, facts, inode);
            debug!(fd = number, name = %offer.name, origin = %offer.origin, socket = ?offer.facts, "passed fd");
            // The same socket from a .socket unit and from the store: keep systemd's.
            if offer.origin == Origin::Stored
                && passed
                    .iter()
                    .any(|p| p.offer.inode == inode && p.offer.origin != Origin::Stored)
            {
                debug!(fd = number, name = %offer.name, "stored socket is also passed by its .socket unit; using that one");
                continue;
            }
            passed.push(Passed { offer, fd });
        }
        Ok(Inherited {
            passed,
            warned: false,
        })
    }

    /// Whether anything was passed.
    pub fn is_empty(&self) -> bool {
        self.passed.is_empty()
    }

    /// The passed socket for `spec`, adopted as a listener; `Ok(None)` when
    /// none is meant for it (bind it). `in_use`: inodes other entries hold.
    ///
    /// A stored socket moves into the listener; an activated one is
    /// duplicated and the original stays held here, so a config that drops
    /// the entry later leaves systemd's socket open and claimable again.
    pub fn claim(
        &mut self,
        spec: &Listen,
        in_use: &[u64],
    ) -> Result<Option<Listener>, ActivationError> {
        let offers: Vec<Offer> = self.passed.iter().map(|p| p.offer.clone()).collect();
        let Some(i) = choose(spec, &offers, in_use)? else {
            return Ok(None);
        };
        let offer = offers[i].clone();
        let local = match offer.facts.as_ref().ok().and_then(|f| f.local.clone()) {
            Some(a) => a,
            None => {
                return Err(ActivationError::Mismatch {
                    fd: offer.number,
                    name: offer.name,
                    entry: spec.name.clone(),
                    address: spec.address.clone(),
                    problem: "it has no address holdfast can name (an abstract or unnamed socket)"
                        .into(),
                })
            }
        };
        let fd = match offer.origin {
            Origin::Stored => self.passed.remove(i).fd,
            _ => crate::sys::dup(self.passed[i].fd.as_raw_fd()).map_err(|source| {
                ActivationError::Io {
                    fd: offer.number,
                    entry: spec.name.clone(),
                    source,
                }
            })?,
        };
        info!(name = %spec.name, address = %local, fd = offer.number, fdname = %offer.name, origin = %offer.origin, inode = offer.inode,
            "adopted a socket passed by systemd");
        Ok(Some(Listener::adopt(spec, local, fd, offer.origin)))
    }

    /// After start-up: closes stored sockets no entry took (stale: the config
    /// changed) and removes them from the fd store; warns about activated
    /// ones no entry took and keeps them open (systemd owns them).
    pub fn settle(&mut self, listeners: &[Rc<Listener>], notifier: &mut Notifier) {
        let used: Vec<u64> = listeners
            .iter()
            .filter_map(|l| l.socket_inode().ok())
            .collect();
        let mut i = 0;
        while i < self.passed.len() {
            let p = &self.passed[i];
            if p.offer.origin == Origin::Stored && !used.contains(&p.offer.inode) {
                info!(fd = p.offer.number, fdname = %p.offer.name, socket = ?p.offer.facts,
                    "a socket from the fd store matches no [[listen]] entry any more; closing it and removing it from the store");
                notifier.store_remove(&p.offer.name);
                self.passed.remove(i);
                continue;
            }
            i += 1;
        }
        if self.warned {
            return;
        }
        self.warned = true;
        for p in &self.passed {
            if !used.contains(&p.offer.inode) {
                let socket = match &p.offer.facts {
                    Ok(f) => f.description.clone(),
                    Err(e) => e.clone(),
                };
                warn!(fd = p.offer.number, fdname = %p.offer.name, %socket,
                    "systemd passed a socket that no [[listen]] entry claims (by name, `systemd:NAME`, or address); keeping it open, unused");
            }
        }
    }
}

/// What systemd has been told about holdfast's state: the supervisor's
/// [`ServiceState`], as the notifier last sent it.
pub type Told = ServiceState;

/// Where notifications go.
#[derive(Debug)]
enum Target {
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
const QUEUE: usize = 1024;

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

    fn new(target: Target, watchdog: Option<Duration>, fd_store: bool, now: Instant) -> Notifier {
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

    /// A notifier that sends nothing.
    pub fn off() -> Notifier {
        Notifier::new(Target::Off, None, false, Instant::now())
    }

    /// Whether NOTIFY_SOCKET is set.
    pub fn is_on(&self) -> bool {
        !matches!(self.target, Target::Off)
    }

    pub fn told(&self) -> Told {
        self.told
    }

    /// Sends what the supervisor decided ([`Action::Service`](crate::supervisor::Action::Service)):
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
    fn recording(watchdog: Option<Duration>, now: Instant) -> Notifier {
        Notifier::new(Target::Record(Vec::new()), watchdog, true, now)
    }

    /// Unit tests: the messages recorded since the last call.
    #[cfg(test)]
    fn take_sent(&mut self) -> Vec<String> {
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

    fn send(&mut self, states: &[NotifyState<'_>], fds: &[RawFd]) {
        let text: String = states.iter().map(|s| format!("{s}\n")).collect();
        match &mut self.target {
            Target::Off => {}
            #[cfg(test)]
            Target::Record(v) => v.push(text),
            Target::Socket(sender) => sender.send(text, fds),
        }
    }
}

/// One datagram for the sender thread: its text and its fds (duplicates,
/// closed once sent).
struct Datagram {
    text: String,
    fds: Vec<OwnedFd>,
    /// Run once every datagram queued before it was sent (flush, replies).
    then: Option<Box<dyn FnOnce() + Send>>,
}

/// The thread that writes to NOTIFY_SOCKET, in order, with a 2 s send
/// timeout per datagram: the event loop only queues.
#[derive(Debug)]
struct Sender {
    queue: std::sync::mpsc::SyncSender<Datagram>,
}

impl Sender {
    fn start(addr: UnixAddr) -> io::Result<Sender> {
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

    fn send(&self, text: String, fds: &[RawFd]) {
        let mut owned = Vec::with_capacity(fds.len());
        for &fd in fds {
            match crate::sys::dup(fd) {
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

    fn flush(&self, within: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.then(Box::new(move || {
            let _ = tx.send(());
        }));
        let _ = rx.recv_timeout(within);
    }

    /// Queues `f` behind the datagrams; runs it now if the queue is full or
    /// the thread is gone (nothing before it can be sent then anyway).
    fn then(&self, f: Box<dyn FnOnce() + Send>) {
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
fn send_to(addr: &UnixAddr, text: &str, fds: &[RawFd]) -> nix::Result<()> {
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
    let starting = |w: &crate::supervisor::Worker| match w.state {
        WorkerState::Starting { ready_by } | WorkerState::Checking { ready_by } => Some(ready_by),
        _ => None,
    };
    let draining = |w: &crate::supervisor::Worker| match w.state {
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

#[cfg(test)]
mod tests;
