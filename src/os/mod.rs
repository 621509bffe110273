//! The OS layer: fork/exec and fds (`sys`, the only `unsafe`), the spawn
//! plan, the listening sockets, reading /proc and cgroupfs, and the OS half
//! of holdfast's in-place upgrade (`handover`).

pub mod handover;
pub mod listener;
pub mod proc;
pub mod sock_diag;
pub mod spawn;
pub mod sys;
