//! The messages into the loop and who waits for an answer: [`Input`] from
//! the loop's own helpers (probes, blocking threads), and the waiters of a
//! reload. Requests from outside come as [`crate::control::Call`]s.

use super::*;

/// Who waits on a reload: for its end, and for its start.
#[derive(Default)]
pub(super) struct ReloadWaiter {
    pub(super) reply: Option<Reply>,
    pub(super) started: Option<Reply>,
}

/// Messages into the loop from its helpers (probes, blocking threads).
/// Requests from the control socket and `/metrics` come on their own
/// channel, as [`Call`]s.
pub enum Input {
    Event(Event),
    /// A reload prepared off the loop.
    Prepared(Box<Prepared>),
    /// A notify datagram from a descendant outside its worker's process
    /// group, with the parents of `sender.0` (started at `sender.1`),
    /// nearest first, read off the loop in `reads` /proc reads.
    NotifyAncestry {
        sender: (i32, u64),
        ancestors: Vec<i32>,
        reads: u64,
        fields: Vec<(String, String)>,
    },
    /// Which required listeners worker `id`'s tree does not hold; `claim`:
    /// the check of a READY=1 (not a periodic recheck); `reads`: its /proc reads.
    SocketsChecked {
        id: WorkerId,
        missing: Vec<String>,
        claim: bool,
        reads: u64,
    },
    /// A worker reaped before it was ready, reported once the log threads
    /// read its last lines (see `Runtime::reaped`).
    Exited(Event),
    /// What an upgrade's trial run of the new binary printed.
    Trial(super::upgrade::TrialOutput),
}

/// What a reload read and bound on its blocking thread.
pub struct Prepared {
    pub(super) result: Result<(Config, Spec, Vec<Listener>), String>,
    /// The sockets systemd passed, handed back to the loop.
    pub(super) inherited: Inherited,
}
