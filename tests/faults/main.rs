//! The fault suite (issue 14): every fault we can produce on one machine,
//! each with a bounded load running and every outcome counted.
//!
//! For each fault a test asserts what holdfast does, what its log and
//! `status --json` say, that healthy workers keep serving with 0 failed
//! requests (see [`support`] for the healthy port and the side port), that
//! no process is left behind (by pid, and by the test's tag whatever group
//! or session a process moved to), and that holdfast is alive and
//! consistent afterwards (the right number of workers, all ready, one
//! current generation).
//!
//! Some tests describe what holdfast should do and fail today: each such
//! test says so in its doc comment, with the fix it asks for.
//!
//! Layout: [`killed`] (holdfast itself SIGKILLed), [`crashes`] (workers
//! that die, will not start or will not stop), [`hangs`] (workers that
//! live on but wrong), [`resources`] (holdfast's own fds, control socket,
//! run directory), [`logfiles`] (the log disk fills, its directory goes),
//! [`storms`] (signal storms), [`clock`] (no deadline reads the wall
//! clock); [`support`] is what they share.

mod clock;
#[path = "../common/mod.rs"]
mod common;

mod crashes;
mod hangs;
mod killed;
mod logfiles;
mod resources;
mod storms;
mod support;
