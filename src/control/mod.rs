//! The control socket: a unix stream socket speaking JSON lines, its server
//! (inside `holdfast run`) and its client (the `status`, `restart`,
//! `reopen-logs`, `scale` and `stop` subcommands).
//!
//! # Protocol (version 1)
//! One request per line, one response line per request, several requests per
//! connection allowed:
//! ```text
//! → {"v":1,"cmd":"status"}
//! ← {"v":1,"ok":true,"status":{...}}
//! → {"v":1,"cmd":"restart","wait":true}
//! ← {"v":1,"ok":false,"kind":"failed","error":"rollout of generation 2 failed: ..."}
//! ```
//! Commands: `status`, `restart` (`wait`; `slot`: replace one worker),
//! `reopen-logs`, `scale` (`workers`), `stop` (`wait`), `upgrade` (`wait`,
//! `binary`), `live` and `ready` (probes: the loop answers; every slot ready
//! and not stopping). Error kinds: `bad_request`, `permission`,
//! `failed`, `busy`, `unavailable`.
//!
//! # Why it cannot hurt holdfast
//! The server never touches supervisor state: every request becomes an
//! [`Call`] for the one event loop, which answers over a oneshot. Each
//! connection is its own task with a bounded line (64 KiB), a read deadline
//! (5 s) and a write deadline; at most [`MAX_CLIENTS`] are served at once,
//! the rest get a `busy` line. The loop only builds the cheap half of a
//! status snapshot; the /proc half runs on a blocking thread
//! ([`crate::status::enrich`]). Peers are checked with `SO_PEERCRED`: only
//! holdfast's own uid and root may talk to it, on top of the socket's 0600.

mod client;
mod protocol;
mod server;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::status::Snapshot;

pub use client::run_client;
pub use protocol::{parse_request, Command, ErrorKind, Request, Response};
pub use server::{
    answer_now, fetch_status, live, ready, ControlError, ControlRecord, ControlSocket, Server,
};
pub(crate) use server::{keeper_of, paused};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Longest request line accepted, newline included.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send a complete request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing one response may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more get a `busy` error and are closed.
pub const MAX_CLIENTS: usize = 256;

/// Answers on their way out: a status being built, or a reply the loop
/// sent whose response line is not written yet. An in-place upgrade execs
/// only when there are none, so no answer dies with the old image.
static ANSWERING: AtomicUsize = AtomicUsize::new(0);

/// How many answers are on their way out (see [`ANSWERING`]).
pub fn answering() -> usize {
    ANSWERING.load(Ordering::SeqCst)
}

/// Holds the control server and `/metrics` still for an upgrade about to
/// exec: nothing new is accepted (connections wait in the listen queues, for
/// the new image), idle connections park at their next request boundary
/// (handed over with the bytes already read), and requests under way are
/// answered first.
pub struct Pause(tokio::sync::watch::Sender<bool>);

impl Pause {
    pub fn new() -> Pause {
        Pause(tokio::sync::watch::Sender::new(false))
    }

    /// What the servers watch.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.subscribe()
    }

    pub fn set(&self, paused: bool) {
        self.0.send_replace(paused);
    }

    pub fn is_paused(&self) -> bool {
        *self.0.borrow()
    }
}

impl Default for Pause {
    fn default() -> Self {
        Pause::new()
    }
}

/// One answer on its way out, until dropped (after its line is written).
#[derive(Debug)]
pub struct Answering(());

impl Answering {
    pub fn new() -> Answering {
        ANSWERING.fetch_add(1, Ordering::SeqCst);
        Answering(())
    }
}

impl Default for Answering {
    fn default() -> Self {
        Answering::new()
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        ANSWERING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the loop sends a waiting connection: the outcome, and the token
/// that counts it as on its way out until the connection wrote it.
#[derive(Debug)]
pub struct Answer {
    pub outcome: Result<String, String>,
    pub token: Answering,
}

/// A reply the event loop sends once: the outcome's message, or why it
/// failed; and the control connection waiting for it, if any, which an
/// in-place upgrade hands to the new image so that it answers there.
#[derive(Debug)]
pub struct Reply {
    tx: oneshot::Sender<Answer>,
    conn: Option<RawFd>,
}

impl Reply {
    /// A reply to the connection at `conn` (its task owns the fd and awaits
    /// the other end of `tx`), or to no connection.
    pub fn new(tx: oneshot::Sender<Answer>, conn: Option<RawFd>) -> Reply {
        Reply { tx, conn }
    }

    /// Sends the outcome; an error when nobody waits any more.
    pub fn send(self, outcome: Result<String, String>) -> Result<(), ()> {
        let answer = Answer {
            outcome,
            token: Answering::new(),
        };
        self.tx.send(answer).map_err(drop)
    }

    /// The fd of the connection still waiting for this reply: its task is
    /// alive (and owns the fd) as long as it awaits the answer.
    pub fn waiting_conn(&self) -> Option<RawFd> {
        self.conn.filter(|_| !self.tx.is_closed())
    }
}

/// What the control socket and `/metrics` ask of the event loop. This module
/// defines it and the edge consumes it, so control never imports the edge:
/// the loop receives calls on the [`Calls`] channel it hands to
/// [`Server::start`] and answers over the oneshots.
#[derive(Debug)]
pub enum Call {
    /// The cheap half of a status snapshot (see [`crate::status`]).
    Status { reply: oneshot::Sender<Snapshot> },
    /// Re-read the config and roll every worker (as SIGHUP). `reply`: when
    /// the rollout ends; `started`: when it has started (or was refused).
    Reload {
        reply: Option<Reply>,
        started: Option<Reply>,
    },
    /// Reopen every log file by path (as SIGUSR1); the reply comes once all
    /// are reopened, or names each that failed.
    ReopenLogs { reply: Reply },
    /// Run `workers` workers from now on.
    Scale { workers: u32, reply: Reply },
    /// Replace the worker of `slot`, start-before-stop; the reply comes
    /// when the new worker is ready, or says why it failed.
    ReplaceSlot { slot: u32, reply: Reply },
    /// Graceful stop (as SIGTERM); the reply comes when every worker exited.
    Stop { reply: Reply },
    /// Upgrade holdfast in place (as SIGUSR2) to `binary` (absolute), or to
    /// the binary it was started from. `wait`: the reply comes from the new
    /// image once it has adopted everything; else once the exec is under way.
    Upgrade {
        binary: Option<std::path::PathBuf>,
        wait: bool,
        reply: Reply,
    },
}

/// The event loop's end of [`Call`]s.
pub type Calls = mpsc::UnboundedSender<Call>;
