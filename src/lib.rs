//! holdfast: a graceful-restart supervisor for Unix app servers.
//!
//! holdfast binds the listening sockets once and never closes them; workers
//! (N copies of the app server's command) inherit them at fds 3.. and are
//! replaced start-before-stop, so a restart never refuses or resets a request.
//! holdfast is never on the data path: it holds sockets, it never accepts.
//!
//! # Layout
//! - [`config`]: TOML schema, defaults, validation, positioned errors.
//! - [`listener`]: binding and holding the sockets; restoring unlinked unix paths.
//! - [`supervisor`]: the pure state machine (events in, actions out).
//! - [`runtime`]: the one event loop that feeds the supervisor and acts.
//! - [`spawn`] / [`sys`]: the worker's fd plan and environment; fork/exec (the only `unsafe`).
//! - [`notify`]: holdfast's NOTIFY_SOCKET for workers.
//! - [`systemd`]: socket activation, the fd store, and notifications to systemd.
//! - [`logs`]: workers' stdout/stderr through pipes into files, whole lines, reopen.
//! - [`tree`]: process trees and socket inodes from /proc.
//! - [`procs`]: /proc/PID/stat, processes adopted as subreaper, worker cgroups (cgroup v2, delegated).
//! - [`memory`]: rss / pss / uss of worker trees from /proc (facts for memory recycling).
//! - [`control`]: the control socket (JSON lines) and its CLI client.
//! - [`status`]: the status snapshot (workers, listeners' accept queues, counters).
//! - [`metrics`]: the same figures in the Prometheus text format, when enabled.
//! - [`cli`]: the command line.
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
