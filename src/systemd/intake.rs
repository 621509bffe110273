//! Sockets on the way in (sd_listen_fds(3)): LISTEN_* read once, passed
//! sockets claimed by `[[listen]]` entries and checked, the rest kept or
//! closed (see the module above).

use std::io::{self};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use socket2::Domain;
use tracing::{debug, info, warn};

use super::Notifier;
use crate::config::{Address, Listen};
use crate::os::listener::{self, Listener, Origin, SocketFacts};

/// `FDNAME=` of a socket holdfast puts in the fd store: this prefix and the
/// `[[listen]]` entry's name. It tells a stored socket (holdfast's own, may be
/// stale after a config change) from an activated one (systemd's).
pub const STORE_PREFIX: &str = "holdfast.store.";

/// The name sd_listen_fds_with_names(3) gives an fd LISTEN_FDNAMES does not name.
pub(super) const UNNAMED: &str = "unknown";

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
    pub(super) fn new(
        number: RawFd,
        name: String,
        facts: Result<SocketFacts, String>,
        inode: u64,
    ) -> Offer {
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
    pub(super) fn stored_for(&self) -> Option<&str> {
        match self.origin {
            Origin::Stored => self.name.strip_prefix(STORE_PREFIX),
            _ => None,
        }
    }

    pub(super) fn activated_as(&self, want: &str) -> bool {
        matches!(&self.origin, Origin::Activated { name } if name == want)
    }

    /// A listening stream socket at exactly `address`.
    pub(super) fn is_at(&self, address: &Address) -> bool {
        self.facts
            .as_ref()
            .is_ok_and(|f| f.stream && f.listening && f.local.as_ref() == Some(address))
    }

    /// Why this offer cannot serve `spec`, if it cannot.
    pub(super) fn problem(&self, spec: &Listen) -> Option<String> {
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
pub(super) struct Passed {
    offer: Offer,
    fd: OwnedFd,
}

/// A socket systemd passed, as an upgrade hands it over.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PassedRecord {
    /// Where it is open now.
    pub fd: RawFd,
    /// The number it was passed as (3, 4, ...), for messages.
    pub number: RawFd,
    /// Its LISTEN_FDNAMES name.
    pub name: String,
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
        for (i, (taken, name)) in crate::os::sys::take_listen_fds(count)
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

    /// What an upgrade hands over: each socket still held (its fd), with
    /// the number and name it was passed as.
    pub fn record(&self) -> Vec<PassedRecord> {
        self.passed
            .iter()
            .map(|p| PassedRecord {
                fd: p.fd.as_raw_fd(),
                number: p.offer.number,
                name: p.offer.name.clone(),
            })
            .collect()
    }

    /// The held sockets' fds, for the exec.
    pub fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.passed.iter().map(|p| p.fd.as_fd()).collect()
    }

    /// The sockets a previous image held, as it handed them over: each looked
    /// at again (family, address, listening), never re-announced.
    pub fn from_records(
        records: Vec<PassedRecord>,
        bank: &crate::os::handover::FdBank,
    ) -> Result<Inherited, String> {
        let mut passed = Vec::new();
        for r in records {
            let fd = bank.dup(r.fd, &format!("socket passed by systemd as `{}`", r.name))?;
            let facts = listener::inspect(fd.as_fd()).map_err(|e| e.to_string());
            let inode = nix::sys::stat::fstat(fd.as_fd()).map_or(0, |st| st.st_ino);
            passed.push(Passed {
                offer: Offer::new(r.number, r.name, facts, inode),
                fd,
            });
        }
        Ok(Inherited {
            passed,
            warned: true,
        })
    }

    /// Sockets handed over without a record (an upgrade's fallback): each as
    /// if passed by systemd under `name` (`holdfast.store.NAME` for one
    /// holdfast bound itself), claimed by the entries of the config as usual.
    pub fn from_handed(fds: Vec<(OwnedFd, String)>) -> Inherited {
        let passed = fds
            .into_iter()
            .map(|(fd, name)| {
                let facts = listener::inspect(fd.as_fd()).map_err(|e| e.to_string());
                let inode = nix::sys::stat::fstat(fd.as_fd()).map_or(0, |st| st.st_ino);
                Passed {
                    offer: Offer::new(fd.as_raw_fd(), name, facts, inode),
                    fd,
                }
            })
            .collect();
        Inherited {
            passed,
            warned: false,
        }
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
            _ => crate::os::sys::dup(self.passed[i].fd.as_raw_fd()).map_err(|source| {
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
