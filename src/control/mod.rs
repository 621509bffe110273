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
//! `reopen-logs`, `scale` (`workers`), `stop` (`wait`), `live` and `ready`
//! (probes: the loop answers; every slot ready and not stopping). Error kinds: `bad_request`, `permission`,
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

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::status::Snapshot;

pub use client::run_client;
pub use protocol::{parse_request, Command, ErrorKind, Request, Response};
pub use server::{fetch_status, live, ready, ControlError, ControlSocket, Server};

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

/// A reply the event loop sends once: the outcome's message, or why it failed.
pub type Reply = oneshot::Sender<Result<String, String>>;

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
}

/// The event loop's end of [`Call`]s.
pub type Calls = mpsc::UnboundedSender<Call>;
