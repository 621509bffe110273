//! holdfast: a graceful-restart supervisor for Unix app servers.
//!
//! holdfast binds the listening sockets once and never closes them; workers
//! (N copies of the app server's command) inherit them at fds 3.. and are
//! replaced start-before-stop, so a restart never refuses or resets a request.
//! holdfast is never on the data path: it holds sockets, it never accepts.
//!
//! # Layout
//! Folders mirror the architecture; imports only point down
//! (`ids` ← `config` ← `core` ← `os` ← `logs`, `systemd`, `status` ←
//! `control` ← `metrics` ← `edge` ← `cli`), which `tests/layout.rs` checks.
//! - [`ids`]: `Slot`, `Generation`, `WorkerId`, `Pid`, `ReplyTo`: the only
//!   types every module may import.
//! - [`core`]: the pure supervisor: `Supervisor::step` takes an event
//!   and returns actions; no syscalls, no clock, table tests.
//! - `edge`: the one event loop: receive (signals, child exits, notify
//!   datagrams, probes, timers, control calls) → step → perform the actions →
//!   feed their results back as events. Reloads, readiness probes, the
//!   workers' NOTIFY_SOCKET and the in-place upgrade (exec of a new holdfast
//!   in the same pid, and its adoption of the state) live here.
//! - [`os`]: fork/exec and fds ([`os::sys`], the only `unsafe`), the spawn
//!   plan, the listening sockets, the one /proc reader ([`os::proc`]) and
//!   sock_diag.
//! - `systemd`: socket intake (sd_listen_fds(3)) and the notifier
//!   (sd_notify(3)), driven by actions.
//! - `logs`: workers' stdout/stderr through pipes into files, whole lines,
//!   reopen; holdfast's own log.
//! - `control`: the control socket's protocol, server and client; `status`:
//!   the snapshot (loop half, /proc half) and its rendering; `metrics`: the
//!   same figures for Prometheus.
//! - [`config`]: TOML schema, defaults, validation, positioned errors.
//! - [`cli`]: the command line.
//!
//! How a signal becomes a worker: SIGHUP reaches the edge, which prepares the
//! new config off the loop and feeds `Event::Request { Rollout }`; the core
//! answers `Action::Spawn` within `max_surge`; the edge spawns through
//! `os::spawn` and `os::sys` and feeds `Event::Spawned`; READY=1 on the
//! notify socket becomes `Event::Ready`; the core checks the worker holds its
//! sockets, marks it ready and answers `Action::Drain` for the old worker.
//!
//! The public modules are what the binary, the integration tests and the
//! benchmarks use; the rest is crate-private. The test worker is a binary of
//! its own (`src/bin/holdfast-test-worker/`), not part of this library.
#![warn(clippy::unwrap_used)]

pub mod cli;
pub mod config;
pub(crate) mod control;
pub mod core;
pub(crate) mod edge;
pub mod ids;
pub(crate) mod logs;
pub(crate) mod metrics;
pub mod os;
pub(crate) mod status;
pub(crate) mod systemd;

/// The parsers of untrusted input that live in crate-private modules (the
/// control protocol and its server's line framing, the notify socket, the
/// readiness probe, an upgrade's handover state and manifest) and the spec
/// `check` and `run` build from a config, reachable for `tests/fuzz` only:
/// not an API, hidden from the docs.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::control::{
        parse_request, Call, Command, ControlSocket, ErrorKind, Request, Response, Server,
        MAX_REQUEST,
    };
    pub use crate::edge::notify::{parse as parse_notify, Message, NotifySocket};
    pub use crate::edge::probe::{once as probe_once, parse_status};
    pub use crate::edge::spec_of;
    pub use crate::edge::{adopt_state, Entry, Manifest};
}
