//! What an in-place upgrade hands to the new image, and how it finds it.
//!
//! Two things cross the exec, besides the fds themselves:
//!
//! - **The state** ([`Handover`]), serde JSON in a memfd whose fd number is
//!   in `HOLDFAST_HANDOVER_FD`: the core's whole state ([`CoreState`]) and
//!   the edge's (config, listeners, sockets, log plumbing, cgroups,
//!   systemd, counters), each fd by number. It starts with its format
//!   version; an image reads only the versions in [`READS`], and says which
//!   those are in `holdfast version --json`, which the old image checks
//!   before it execs anything.
//! - **The manifest** ([`Manifest`]), text in a second memfd whose fd number
//!   is in `HOLDFAST_HANDOVER_FDS` (an fd, not the text: thousands of workers
//!   would pass the kernel's 128 KiB limit on one environment string): one
//!   line per fd handed over, with its role (`listen`, `worker`, `pipe`,
//!   `control`, ...). Its shape never changes with the state format, so an
//!   image that cannot read the state (a corrupt one, an unknown format)
//!   still keeps every socket and every worker it can identify, and falls
//!   back to a rolling restart instead of dropping them.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::config::{Config, Overrides};
use crate::control::ControlRecord;
use crate::core::{At, CoreState};
use crate::ids::{Pid, ReplyTo, Slot, WorkerId};
use crate::logs::LogsRecord;
use crate::os::listener::ListenerRecord;
use crate::os::proc::cgroup::CgroupRecord;
use crate::systemd::{NotifierRecord, PassedRecord};

/// The format this image writes.
pub const FORMAT: u32 = 1;
/// The formats this image reads.
pub const READS: &[u32] = &[1];
/// The variable naming the fd of the state.
pub const STATE_VAR: &str = "HOLDFAST_HANDOVER_FD";
/// The variable naming the fd of the [`Manifest`].
pub const MANIFEST_VAR: &str = "HOLDFAST_HANDOVER_FDS";
/// The largest state an image reads, in bytes.
pub const MAX_STATE: u64 = 256 * 1024 * 1024;

/// The version fields every format starts with: read first, alone, so an
/// unknown format is reported as such rather than as a parse error.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Envelope {
    pub format: u32,
    pub from_version: String,
    pub pid: u32,
}

/// The whole state an upgrade hands over (format [`FORMAT`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Handover {
    pub format: u32,
    /// The version of the image that wrote it.
    pub from_version: String,
    /// The pid that wrote it: the new image's own, or it is not ours.
    pub pid: u32,
    pub core: CoreState,
    pub edge: EdgeRecord,
}

impl Envelope {
    /// Reads the version fields of a state and checks them: a format this
    /// image reads, written by `pid` (this process). Any error makes the
    /// new image fall back to a rolling restart.
    pub fn read(bytes: &[u8], pid: u32) -> Result<Envelope, String> {
        let env: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| format!("the handover state is not readable: {e}"))?;
        if !READS.contains(&env.format) {
            return Err(format!(
                "the handover state is in format {} (written by holdfast {}); this holdfast ({}) reads format(s) {READS:?}",
                env.format,
                env.from_version,
                super::upgrade::VERSION
            ));
        }
        if env.pid != pid {
            return Err(format!(
                "the handover state was written by pid {}, not by this process ({pid})",
                env.pid
            ));
        }
        Ok(env)
    }

    /// The whole state of the format [`Envelope::read`] accepted.
    pub fn decode(&self, bytes: &[u8]) -> Result<Handover, String> {
        serde_json::from_slice::<Handover>(bytes).map_err(|e| {
            format!(
                "the handover state of holdfast {} (format {}) cannot be read: {e}",
                self.from_version, self.format
            )
        })
    }
}

/// For `tests/fuzz` (through `holdfast::fuzzing`): what an image exec'd by
/// an upgrade makes of the handover state `bytes` before it touches an fd:
/// the envelope checked (format, and written by `pid`), the state decoded,
/// the supervisor restored from it
/// (`Supervisor::restore`) and run through the steps that follow an
/// adoption (the upgrade's answer, the timers now and an hour on, every
/// worker's exit, a scale and a stop). `Ok`: how many workers it
/// adopted; `Err`: why the image falls back to a rolling restart.
#[doc(hidden)]
pub fn adopt_state(bytes: &[u8], pid: u32) -> Result<usize, String> {
    use crate::core::{Event, ExitReason, Request, Scale, Supervisor};
    let h = Envelope::read(bytes, pid)?.decode(bytes)?;
    let now = std::time::Instant::now();
    let mut sv = Supervisor::restore(h.core, now)?;
    let pids: Vec<_> = sv.workers().filter_map(|w| w.pid).collect();
    let _ = sv.step(
        now,
        Event::Upgraded {
            message: "upgraded".into(),
        },
    );
    let _ = sv.step(now, Event::Tick);
    let _ = sv.status_line();
    if let Some(at) = sv.next_deadline() {
        let _ = sv.step(at, Event::Tick);
    }
    let later = now + std::time::Duration::from_secs(3600);
    let _ = sv.step(later, Event::Tick);
    for pid in &pids {
        let reason = ExitReason::Code(1);
        let _ = sv.step(later, Event::Exited { pid: *pid, reason });
    }
    let request = |request| Event::Request {
        request,
        reply: None,
    };
    let _ = sv.step(later, request(Request::Scale(Scale::Up)));
    let _ = sv.step(later, request(Request::Stop));
    let _ = sv.step(later + std::time::Duration::from_secs(3600), Event::Tick);
    Ok(pids.len())
}

/// The edge's state: every fd by the number it has in the new image.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct EdgeRecord {
    pub config: Config,
    pub overrides: Overrides,
    /// holdfast's command line, as it was started (the exec keeps it).
    pub argv: Vec<OsString>,
    /// The binary exec'd: the default of the next upgrade.
    pub binary: PathBuf,
    /// Every listener some generation uses; `current`: indexes of the
    /// current config's, in its order.
    pub listeners: Vec<ListenerRecord>,
    pub current: Vec<usize>,
    /// Sockets systemd passed that no entry holds now.
    pub inherited: Vec<PassedRecord>,
    pub notify_fd: RawFd,
    pub notify_path: PathBuf,
    pub rundir: PathBuf,
    pub control: Option<ControlRecord>,
    pub metrics_fd: Option<RawFd>,
    /// Control connections waiting for an answer: the new image answers.
    pub conns: Vec<(ReplyTo, RawFd)>,
    /// Idle control connections, with the bytes read from them and not used
    /// yet (a request line on its way in).
    pub idle: Vec<(RawFd, Vec<u8>)>,
    pub next_reply: u64,
    /// Unreaped worker processes.
    pub pids: Vec<(Pid, WorkerId)>,
    /// Exec reports still to be read: (pid, worker, fd, program, bytes read).
    pub execs: Vec<(Pid, WorkerId, RawFd, String, Vec<u8>)>,
    /// Readiness probe sockets by worker.
    pub probes: Vec<(WorkerId, PathBuf)>,
    pub cgroups: Option<CgroupRecord>,
    pub worker_cgroups: Vec<(WorkerId, CgroupRecord)>,
    pub logs: LogsRecord,
    /// holdfast's own log file (`[logs] holdfast_log`), if it has one.
    pub own_log: Option<RawFd>,
    pub systemd: NotifierRecord,
    pub ignored_senders: Vec<i32>,
    /// When holdfast first started (uptime continues).
    pub started: At,
    /// `ListenOverflows`, `ListenDrops` when holdfast first started.
    pub baseline: Option<(u64, u64)>,
    /// The workers a crashed holdfast before this one left, still waited for.
    pub previous: super::previous::PreviousRecord,
    /// The notify socket file's inode (to tell when its path is removed).
    pub notify_inode: u64,
}

/// One fd of the manifest and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A listening socket, named as LISTEN_FDNAMES would name it
    /// (`holdfast.store.NAME` for one holdfast bound or stored itself).
    Listen { fd: RawFd, name: String },
    /// A worker's own process (no fd).
    Worker { pid: Pid, slot: Slot },
    /// A worker's stdout (1) or stderr (2), read end.
    Pipe {
        fd: RawFd,
        pid: Pid,
        slot: Slot,
        stream: u8,
    },
    /// The control socket, bound at `path`.
    Control { fd: RawFd, path: PathBuf },
    /// The metrics listener.
    Metrics { fd: RawFd },
    /// A control connection waiting for the upgrade's answer.
    Conn { fd: RawFd },
    /// holdfast's run directory (notify and probe sockets).
    Rundir { path: PathBuf },
    /// Any other fd handed over (closed by an image that does not use it).
    Other { fd: RawFd },
}

/// Every fd handed over, with its role: the format-independent part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest(pub Vec<Entry>);

/// `%` and newline escaped, so a name or path stays on its line.
fn escape(s: &str) -> String {
    s.replace('%', "%25").replace('\n', "%0A")
}

fn unescape(s: &str) -> String {
    s.replace("%0A", "\n").replace("%25", "%")
}

impl Manifest {
    /// One line per entry: `ROLE FD [ARGS...]`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in &self.0 {
            let line = match e {
                Entry::Listen { fd, name } => format!("listen {fd} {}", escape(name)),
                Entry::Worker { pid, slot } => format!("worker {pid} {slot}"),
                Entry::Pipe {
                    fd,
                    pid,
                    slot,
                    stream,
                } => format!("pipe {fd} {pid} {slot} {stream}"),
                Entry::Control { fd, path } => {
                    format!("control {fd} {}", escape(&path.to_string_lossy()))
                }
                Entry::Metrics { fd } => format!("metrics {fd}"),
                Entry::Conn { fd } => format!("conn {fd}"),
                Entry::Rundir { path } => format!("rundir 0 {}", escape(&path.to_string_lossy())),
                Entry::Other { fd } => format!("other {fd}"),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Reads what [`Manifest::render`] wrote; a line it does not understand
    /// (a role of a newer image) is skipped, its fd kept as `other`. Lines
    /// end at `\n` only, as written: a `\r` is part of a name or path.
    pub fn parse(text: &str) -> Manifest {
        let mut out = Vec::new();
        for line in text.split('\n') {
            let mut words = line.splitn(3, ' ');
            let role = words.next().unwrap_or_default();
            let Some(fd) = words.next().and_then(|w| w.parse::<i32>().ok()) else {
                continue;
            };
            let rest = words.next().unwrap_or_default();
            let nums: Vec<i64> = rest
                .split(' ')
                .filter_map(|w| w.parse::<i64>().ok())
                .collect();
            let entry = match (role, nums.as_slice()) {
                ("listen", _) if !rest.is_empty() => Entry::Listen {
                    fd,
                    name: unescape(rest),
                },
                ("worker", [slot]) => Entry::Worker {
                    pid: Pid(fd),
                    slot: Slot(u32::try_from(*slot).unwrap_or(0)),
                },
                ("pipe", [pid, slot, stream]) => Entry::Pipe {
                    fd,
                    pid: Pid(i32::try_from(*pid).unwrap_or(0)),
                    slot: Slot(u32::try_from(*slot).unwrap_or(0)),
                    stream: u8::try_from(*stream).unwrap_or(1),
                },
                ("control", _) if !rest.is_empty() => Entry::Control {
                    fd,
                    path: PathBuf::from(unescape(rest)),
                },
                ("metrics", _) => Entry::Metrics { fd },
                ("conn", _) => Entry::Conn { fd },
                ("rundir", _) if !rest.is_empty() => Entry::Rundir {
                    path: PathBuf::from(unescape(rest)),
                },
                (_, _) if fd > 2 => Entry::Other { fd },
                _ => continue,
            };
            out.push(entry);
        }
        Manifest(out)
    }

    /// Every fd number in it.
    pub fn fds(&self) -> Vec<RawFd> {
        self.0
            .iter()
            .filter_map(|e| match e {
                Entry::Listen { fd, .. }
                | Entry::Pipe { fd, .. }
                | Entry::Control { fd, .. }
                | Entry::Metrics { fd }
                | Entry::Conn { fd }
                | Entry::Other { fd } => Some(*fd),
                Entry::Worker { .. } | Entry::Rundir { .. } => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_round_trips_and_skips_what_it_does_not_know() {
        let m = Manifest(vec![
            Entry::Listen {
                fd: 5,
                name: "holdfast.store.http api".into(),
            },
            Entry::Listen {
                fd: 6,
                name: "odd%name\nx".into(),
            },
            Entry::Worker {
                pid: Pid(1234),
                slot: Slot(1),
            },
            Entry::Pipe {
                fd: 9,
                pid: Pid(1234),
                slot: Slot(1),
                stream: 2,
            },
            Entry::Control {
                fd: 7,
                path: "/run/holdfast/holdfast.sock".into(),
            },
            Entry::Metrics { fd: 8 },
            Entry::Conn { fd: 11 },
            Entry::Rundir {
                path: "/run/user/0/holdfast-x".into(),
            },
            Entry::Other { fd: 12 },
        ]);
        let text = m.render();
        assert_eq!(text.lines().count(), 9, "{text}");
        assert_eq!(Manifest::parse(&text), m);
        assert_eq!(m.fds(), [5, 6, 9, 7, 8, 11, 12]);
        // A newer image's role: its fd is still known (and closed), not lost.
        let newer = format!("{text}telepathy 13 x y\nnonsense\n");
        let parsed = Manifest::parse(&newer);
        assert_eq!(parsed.0.last(), Some(&Entry::Other { fd: 13 }));
        assert_eq!(parsed.0.len(), 10);
    }

    /// Found by tests/fuzz (handover_manifest_round_trips): a control
    /// socket or run directory path ending in `\r` (a legal file name) was
    /// written as `control 7 /run/x\r\n` and read back as `/run/x`, since
    /// `str::lines` also ends a line at `\r\n`: the new image would have
    /// guarded, repaired and finally removed another path than its socket's.
    #[test]
    fn a_carriage_return_in_a_path_or_name_is_kept() {
        let m = Manifest(vec![
            Entry::Control {
                fd: 7,
                path: "/run/x\r".into(),
            },
            Entry::Rundir {
                path: "/run/y\r".into(),
            },
            Entry::Listen {
                fd: 5,
                name: "a\r".into(),
            },
        ]);
        assert_eq!(Manifest::parse(&m.render()), m);
        assert_eq!(
            Manifest::parse("control 7 /run/x\r"),
            Manifest(vec![Entry::Control {
                fd: 7,
                path: "/run/x\r".into()
            }])
        );
    }
}
