//! The identities every module may import, and nothing else: a worker's
//! slot, its generation, its serial and its pid, and the edge's reply ids.
//! They are newtypes, so a pid cannot be passed as a slot. This module sits
//! at the bottom of the module graph: it imports nothing of holdfast's.

use std::fmt;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub struct $name(pub $t);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
id_type!(
    /// A worker's stable position, 0..workers-1 (HOLDFAST_WORKER_ID).
    Slot(u32)
);
id_type!(
    /// A config generation; every accepted reload makes a new one.
    Generation(u64)
);
id_type!(
    /// One worker process's identity inside holdfast, known before its pid
    /// (HOLDFAST_WORKER_SERIAL in the worker's environment).
    WorkerId(u64)
);
id_type!(
    /// A process id.
    Pid(i32)
);
id_type!(
    /// Names the edge's reply channel for one request.
    ReplyTo(u64)
);
