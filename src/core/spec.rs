//! A generation's spec: everything a worker of that generation is started,
//! judged ready, drained and recycled by.
//!
//! A reload never changes a running generation: it makes a new one. So after
//! a failed deploy the previous generation keeps running exactly as it did —
//! its crash restarts use its own command, its readiness its own mode, its
//! drains its own signal — and nothing of the rejected config leaks into it.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::recycle::Recycle;
use crate::config::{AppConfig, Listen, MemoryConfig, ReadyMode};

/// One generation's whole spec. Plain data: it compares, clones and
/// serializes (an upgrade of holdfast hands it over).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Spec {
    /// The `[app]` table: command, env, cwd, handoff, readiness, drain, surge.
    pub app: AppConfig,
    /// `app.command[0]` resolved on PATH when the config was loaded.
    pub program: PathBuf,
    /// The listeners its workers get, in fd order from 3 (the edge holds the sockets).
    pub listeners: Vec<Listen>,
    /// `[memory]`: memory and age rules; `None` when not configured.
    pub memory: Option<MemoryConfig>,
}

impl Spec {
    pub fn ready(&self) -> ReadyMode {
        self.app.ready
    }

    pub fn drain_signal(&self) -> Signal {
        self.app.drain_signal.0
    }

    pub fn drain_timeout(&self) -> Duration {
        self.app.drain_timeout
    }

    pub fn ready_timeout(&self) -> Duration {
        self.app.ready_timeout
    }

    /// The memory and age rules, as the core applies them.
    pub(crate) fn recycle(&self) -> Option<Recycle> {
        self.memory.as_ref().map(Recycle::from_config)
    }

    /// The listeners a worker's tree must hold to count as ready:
    /// `ready_listeners` when the config names them, else every one it gets.
    pub(crate) fn required_listeners(&self) -> impl Iterator<Item = &Listen> {
        self.listeners.iter().filter(|l| {
            self.app
                .ready_listeners
                .as_ref()
                .map_or(true, |names| names.contains(&l.name))
        })
    }
}
