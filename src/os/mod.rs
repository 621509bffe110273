//! The OS layer: fork/exec and fds (`sys`, the only `unsafe`), the spawn
//! plan, the listening sockets, and reading /proc and cgroupfs.

pub mod listener;
pub mod proc;
pub mod sock_diag;
pub mod spawn;
pub mod sys;
