//! Property-based fuzzing of every parser holdfast has, on stable Rust
//! (proptest): the config loader, the control protocol and its server's
//! line framing, the notify datagrams and their receive path, the readiness
//! probe's response parser, the /proc parsers and sock_diag's, and what an
//! in-place upgrade hands the new image (its state and its manifest).
//!
//! `cargo test --release --test fuzz` is the short pass CI runs (a fixed
//! seed, then a random one, a few hundred to a few thousand cases per
//! property, well under a minute in all); `HOLDFAST_FUZZ_CASES=1000000`
//! makes it the long one. See `support.rs` for the seeds, the replay
//! command, the regression files and the time bounds.

mod config;
mod control;
mod handover;
mod notify;
mod probe;
mod procfs;
mod sock_diag;
mod support;
