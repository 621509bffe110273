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
    /// A notify datagram whose sender was found to belong to worker `id`.
    Notified {
        id: WorkerId,
        fields: Vec<(String, String)>,
    },
    /// A notify datagram from a process that belongs to no worker.
    NotifyStranger {
        sender: i32,
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
