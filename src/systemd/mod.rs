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

mod intake;
mod notifier;

pub use intake::{ActivationError, Inherited, PassedRecord, STORE_PREFIX};
pub use notifier::Notifier;
pub use notifier::NotifierRecord;

#[cfg(test)]
mod tests;
