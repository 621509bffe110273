//! The configuration: TOML schema, defaults, validation, and errors that name
//! the file, line and column.
//!
//! Nothing that `run` would refuse, loop on or panic on gets past this module,
//! so `check` (this module plus the command lookup) refuses it too, with the
//! same message. A file is read in two steps, and every error of either names
//! file:line:col when the value came from the file:
//! - [`parse`] deserializes the TOML into private raw structs whose fields are
//!   checked types: their `Deserialize` refuses a bad value (a duration, count
//!   or size outside its key's [`Bounds`], a NUL byte, a malformed mode, name
//!   or path), so toml attaches the value's span to the error. The values are
//!   kept [`Spanned`], so the conversion into the public types (relative paths
//!   made absolute and looked at, keys of one table against each other) has
//!   the position of every key it names.
//! - [`Config::build`] relates the file to the command line (`--workers`,
//!   `--listen`) and the tables to each other (listener names and addresses,
//!   the control socket, metrics) with the positions `parse` kept in
//!   [`FileConfig`]. Nothing checks the config after `build`.
//!
//! The public types (`AppConfig`, `MemoryConfig`, ...) also derive
//! `Deserialize`, to read back what their `Serialize` wrote (a handover between
//! holdfasts); a config file is only ever read through [`parse`].

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::de::Error as _;
use serde::Deserialize;
use toml::Spanned;

/// Every config problem, with where it was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A value (or a relation of values) written at `line:column` of `path`.
    #[error("config {path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A problem with no position in a file: the command line, or a default.
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Where a listening socket lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// A socket that only systemd passes (socket activation), matched by name.
    Systemd(String),
}

/// The longest unix socket path the kernel takes: `sun_path` is 108 bytes,
/// NUL included (unix(7)).
const UNIX_PATH_MAX: usize = 107;

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a path, e.g. \"unix:/run/app.sock\"".into());
            }
            if path.contains('\0') {
                return Err(format!(
                    "unix socket path {path:?} contains a NUL byte; the kernel takes paths as C strings"
                ));
            }
            if path.len() > UNIX_PATH_MAX {
                return Err(format!(
                    "unix socket path {path} is {} bytes; the kernel allows at most {UNIX_PATH_MAX}",
                    path.len()
                ));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(name) = s.strip_prefix("systemd:") {
            if name.is_empty() {
                return Err("`systemd:` needs the socket's FileDescriptorName".into());
            }
            if let Some(problem) = fd_name_problem(name) {
                return Err(format!("`systemd:{name}`: a FileDescriptorName {problem}"));
            }
            return Ok(Address::Systemd(name.to_string()));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Address::Tcp(addr));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "address `{s}` is neither \"host:port\", \"[v6]:port\" nor \"unix:/path\""
            ));
        };
        let port: u16 = match port.parse::<u64>() {
            Ok(p) if p <= u16::MAX as u64 => p as u16,
            Ok(p) => return Err(format!("port {p} in `{s}` is out of range (0-65535)")),
            Err(_) => return Err(format!("port `{port}` in `{s}` is not a number")),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host == "localhost" {
            return Ok(Address::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(Address::Tcp(SocketAddr::new(ip, port))),
            Err(_) => Err(format!(
                "host `{host}` in `{s}` is not an IP address (holdfast binds addresses, it does not resolve names)"
            )),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Systemd(n) => write!(f, "systemd:{n}"),
        }
    }
}

impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

/// Why `name` cannot be a file descriptor name, if it cannot: systemd takes
/// at most 255 bytes, no `:` (the LISTEN_FDNAMES separator) and no control
/// characters (sd_pid_notify_with_fds(3), FDNAME=).
fn fd_name_problem(name: &str) -> Option<&'static str> {
    if name.contains(':') {
        Some("must not contain `:` (it separates the names in LISTEN_FDNAMES)")
    } else if name.chars().any(char::is_control) {
        Some("must not contain a control character")
    } else if name.len() > 255 {
        Some("is at most 255 bytes")
    } else {
        None
    }
}

/// A signal name such as "TERM" or "SIGQUIT".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalName(pub Signal);

impl FromStr for SignalName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Signal::from_str(&full)
            .map(SignalName)
            .map_err(|_| format!("`{s}` is not a signal name (e.g. \"TERM\", \"QUIT\", \"HUP\")"))
    }
}

impl serde::Serialize for SignalName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SignalName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_start_matches("SIG"))
    }
}

/// A signal a process can handle: `drain_signal` and `reopen_signal` must
/// give the worker a chance (KILL and STOP cannot be caught: a drain would cut
/// every request, a log reopen would kill or freeze every worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Catchable(SignalName);

impl<'de> Deserialize<'de> for Catchable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = SignalName::deserialize(d)?;
        if matches!(s.0, Signal::SIGKILL | Signal::SIGSTOP) {
            return Err(D::Error::custom(format!(
                "{s} cannot be caught: the worker could not finish its requests (or would freeze); use the signal your server handles, e.g. \"TERM\" or \"QUIT\""
            )));
        }
        Ok(Catchable(s))
    }
}

/// Variables holdfast sets in every worker's environment itself; `[app]
/// env` may not set them (the worker would see two values).
pub const OWN_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "SERVER_STARTER_PORT",
    "EINHORN_FD_COUNT",
    "UNICORN_FD",
    "HOLDFAST_WORKER_ID",
    "HOLDFAST_GENERATION",
    "HOLDFAST_WORKER_SERIAL",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    // systemd ≥ 254: the size of holdfast's fd store, not a worker's.
    "FDSTORE",
];

/// Whether holdfast sets `name` in a worker's environment itself.
pub fn is_own_env(name: &str) -> bool {
    OWN_ENV.contains(&name) || name.starts_with("EINHORN_FD_")
}

/// A command line: never empty, never run through a shell, no NUL byte in
/// any argument (execve(2) takes C strings, which end at the first NUL).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Argv(pub Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        if v.is_empty() || v[0].is_empty() {
            return Err(D::Error::custom(
                "command is empty; give the program and its arguments, e.g. [\"bundle\", \"exec\", \"puma\"]",
            ));
        }
        if let Some((i, arg)) = v.iter().enumerate().find(|(_, a)| a.contains('\0')) {
            return Err(D::Error::custom(format!(
                "`command` argv[{i}] {arg:?} contains a NUL byte; execve(2) takes C strings, which end at the first NUL"
            )));
        }
        Ok(Argv(v))
    }
}

/// A unix file mode written as an octal string, e.g. "0660": octal digits
/// only (no sign), optionally after `0o`, at most 0o7777, and write
/// permission for someone (connect(2) to a unix socket needs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let digits = s.strip_prefix("0o").unwrap_or(&s);
        let octal = !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
        let mode = match u32::from_str_radix(digits, 8) {
            Ok(m) if octal && m <= 0o7777 => m,
            _ => {
                return Err(D::Error::custom(format!(
                    "mode `{s}` is not an octal file mode like \"0660\""
                )))
            }
        };
        if mode & 0o222 == 0 {
            return Err(D::Error::custom(format!(
                "mode `{s}` gives nobody write permission, which connect(2) to a unix socket needs: only root could connect (e.g. \"0660\": owner and group)"
            )));
        }
        Ok(Mode(mode))
    }
}

/// How a worker says it is ready to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadyMode {
    /// READY=1 over holdfast's NOTIFY_SOCKET (sd_notify(3)).
    #[default]
    Notify,
    /// Ready after `ready_delay` alive.
    Delay,
    /// Ready when GET `ready_path` on the worker's private probe socket answers < 500.
    Probe,
}

/// The fd-passing conventions a worker is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Handoff {
    Systemd,
    ServerStarter,
    Einhorn,
    Unicorn,
}

// ---------------------------------------------------------------------------
// Ranges

/// One key's range and the reason for it: `MIN..=MAX` in the key's unit
/// (milliseconds for a duration, bytes for a size, a plain number for a
/// count). Each marker's doc is the rationale; `WHY` says it in the error.
///
/// Upper bounds keep every deadline holdfast computes (`Instant` + duration,
/// durations summed) far from overflow, and every count far from an
/// allocation that aborts; lower bounds refuse the values that break
/// something (a zero drain is a SIGKILL).
trait Bounds {
    const KEY: &'static str;
    const MIN: u64;
    const MAX: u64;
    const WHY: &'static str;
    /// Refuse 0 with serde's own "expected a nonzero u32" (the words users
    /// and tests know for `workers`) rather than with `MIN` and `WHY`.
    const NONZERO: bool = false;
}

macro_rules! bounds {
    ($($(#[$doc:meta])* $name:ident = $key:literal, $min:expr, $max:expr, $why:literal
        $(, nonzero = $nz:literal)?;)+) => {$(
        $(#[$doc])*
        struct $name;
        impl Bounds for $name {
            const KEY: &'static str = $key;
            const MIN: u64 = $min;
            const MAX: u64 = $max;
            const WHY: &'static str = $why;
            $(const NONZERO: bool = $nz;)?
        }
    )+};
}

const SECOND: u64 = 1000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const YEAR: u64 = 365 * DAY;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const PIB: u64 = 1 << 50;

/// The most workers holdfast runs: the ceiling of `workers`, `max_workers`
/// and `max_surge`.
pub const WORKERS_CEILING: u32 = 65_536;

bounds! {
    /// `[app] workers`: 1 to 65536 ([`WORKERS_CEILING`]), and at most
    /// `max_workers`. Each worker is a process tree with pipes and fds of its
    /// own; no host serves better with more, and the ceiling keeps a typo
    /// from asking the supervisor for millions of slots.
    Workers = "workers", 1, WORKERS_CEILING as u64,
        "holdfast runs at most 65536 workers", nonzero = true;
    /// `[app] max_workers`: 1 to 65536, default 256; the bound on `workers`,
    /// `scale` and SIGTTIN.
    MaxWorkers = "max_workers", 1, WORKERS_CEILING as u64,
        "it bounds `workers`, `scale` and SIGTTIN, and holdfast runs at most 65536 workers",
        nonzero = true;
    /// `[app] max_surge`: 0 (stop each old worker first) to 65536 (all at once).
    MaxSurge = "max_surge", 0, WORKERS_CEILING as u64,
        "it counts workers started at once, and there are at most 65536";
    /// `[app] ready_delay`: 0 (ready at once) to 24 h.
    ReadyDelay = "ready_delay", 0, DAY,
        "a worker that needs more than a day to start is not starting";
    /// `[app] ready_timeout`: 100 ms to 24 h. Below 100 ms no server can exec
    /// and bind before it is judged not ready, so every rollout fails; a
    /// timeout of a day already means "never".
    ReadyTimeout = "ready_timeout", 100, DAY,
        "below 100ms every worker is judged not ready before it can start; a day already means never";
    /// `[app] drain_timeout`: 100 ms to 24 h. Below 100 ms SIGKILL follows
    /// the drain signal at once and cuts the requests in flight; a drain
    /// longer than a day is a hung worker, not a slow request.
    DrainTimeout = "drain_timeout", 100, DAY,
        "below 100ms SIGKILL follows the drain signal at once and cuts requests in flight; a drain longer than a day is a hung worker";
    /// `[app] restart_backoff_max`: 100 ms to 24 h. The delay before a
    /// crashed worker's restart starts at 100 ms and doubles up to this cap:
    /// a smaller cap restarts a crashing worker in a busy loop.
    RestartBackoffMax = "restart_backoff_max", 100, DAY,
        "the restart delay after a crash starts at 100ms and doubles up to this cap; below that a crashing worker restarts in a busy loop";
    /// `[[listen]] backlog`: 1 to 2147483647. listen(2) takes an `int`, and
    /// the kernel caps it at `net.core.somaxconn` (holdfast warns when it
    /// does); 0 queues at most one connection, so clients are refused while
    /// workers are being replaced.
    Backlog = "backlog", 1, i32::MAX as u64,
        "listen(2) takes an int (the kernel then caps it at net.core.somaxconn); 0 queues at most one connection, so clients are refused during rollouts";
    /// `[memory] limit`: 1 MiB to 1 PiB. No app server fits in less, so
    /// every worker would be recycled as soon as `min_lifetime` allows; no
    /// host has more.
    MemoryLimit = "limit", MIB, PIB,
        "no app server fits in less than 1MiB (every worker would be recycled), and no host has more than 1PiB";
    /// `[memory] interval`: 100 ms to 24 h. Each sample walks /proc for every
    /// worker's tree; more often costs more CPU than it tells.
    Interval = "interval", 100, DAY,
        "each sample walks /proc for every worker's tree: more often than every 100ms costs more than it tells, less often than daily is no sampling";
    /// `[memory] grace`: 1 to 1000 consecutive samples over the limit before
    /// a worker is recycled. Beyond 1000 it no longer filters spikes (raise
    /// `interval` instead).
    Grace = "grace", 1, 1000,
        "it counts consecutive samples over the limit before a worker is recycled; beyond 1000 raise `interval` instead";
    /// `[memory] min_lifetime`: 0 to 365 days.
    MinLifetime = "min_lifetime", 0, YEAR,
        "a worker protected for more than a year is never recycled; leave out [memory] `limit` instead";
    /// `[memory] max_lifetime`: 1 s to 365 days. Below a second a worker is
    /// replaced as soon as it is ready, in a loop.
    MaxLifetime = "max_lifetime", SECOND, YEAR,
        "below 1s a worker is replaced as soon as it is ready, in a loop; for more than a year leave it out";
    /// `[memory] lifetime_jitter`: 0 to 365 days (it is added to `max_lifetime`).
    LifetimeJitter = "lifetime_jitter", 0, YEAR,
        "it is added to max_lifetime; more than a year is a typo";
}

/// The sentence for a value outside `B`'s range; `written` is the value as
/// the file says it, `bound` the broken bound in the key's unit.
fn out_of_range<B: Bounds>(written: &str, below: bool, bound: &str) -> String {
    let (side, which) = if below {
        ("below", "minimum")
    } else {
        ("above", "maximum")
    };
    format!(
        "`{}` = {written} is {side} the {which} of {bound}: {}",
        B::KEY,
        B::WHY
    )
}

/// A humantime duration ("30s", "1m 30s", "250ms") within `B`'s range.
struct Dur<B>(Duration, PhantomData<B>);

impl<'de, B: Bounds> Deserialize<'de> for Dur<B> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let v = humantime::parse_duration(&s).map_err(|e| {
            D::Error::custom(format!(
                "`{}` = {s:?} is not a duration ({e}); write e.g. \"30s\", \"1m 30s\" or \"250ms\"",
                B::KEY
            ))
        })?;
        let (min, max) = (Duration::from_millis(B::MIN), Duration::from_millis(B::MAX));
        if v < min || v > max {
            let (below, bound) = if v < min {
                (true, B::MIN)
            } else {
                (false, B::MAX)
            };
            return Err(D::Error::custom(out_of_range::<B>(
                &format!("{s:?}"),
                below,
                &fmt_ms(bound),
            )));
        }
        Ok(Dur(v, PhantomData))
    }
}

/// `ms` as humantime writes it back: "100ms", "30s", "24h", "365days".
fn fmt_ms(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        ms if ms >= 2 * DAY && ms % DAY == 0 => format!("{}days", ms / DAY),
        ms if ms % HOUR == 0 => format!("{}h", ms / HOUR),
        ms if ms % MINUTE == 0 => format!("{}m", ms / MINUTE),
        ms if ms % SECOND == 0 => format!("{}s", ms / SECOND),
        ms => format!("{ms}ms"),
    }
}

/// A whole number within `B`'s range.
struct Count<B>(u32, PhantomData<B>);

impl<'de, B: Bounds> Deserialize<'de> for Count<B> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = if B::NONZERO {
            NonZeroU32::deserialize(d)?.get()
        } else {
            u32::deserialize(d)?
        };
        let n = u64::from(v);
        if n < B::MIN || n > B::MAX {
            let (below, bound) = if n < B::MIN {
                (true, B::MIN)
            } else {
                (false, B::MAX)
            };
            return Err(D::Error::custom(out_of_range::<B>(
                &v.to_string(),
                below,
                &bound.to_string(),
            )));
        }
        Ok(Count(v, PhantomData))
    }
}

impl<B> Count<B> {
    /// The count of a key whose `Bounds::MIN` is at least 1.
    fn nonzero(&self) -> NonZeroU32 {
        NonZeroU32::new(self.0).unwrap_or(NonZeroU32::MIN)
    }
}

/// A size ("512MiB", "1.5GiB", "300MB", or bytes) within `B`'s range.
struct Size<B>(bytesize::ByteSize, PhantomData<B>);

impl<'de, B: Bounds> Deserialize<'de> for Size<B> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (written, v) = d.deserialize_any(SizeVisitor::<B>(PhantomData))?;
        if v < B::MIN || v > B::MAX {
            let (below, bound) = if v < B::MIN {
                (true, B::MIN)
            } else {
                (false, B::MAX)
            };
            return Err(D::Error::custom(out_of_range::<B>(
                &written,
                below,
                &fmt_bytes(bound),
            )));
        }
        Ok(Size(bytesize::ByteSize::b(v), PhantomData))
    }
}

/// A size as written (for the error) and in bytes.
struct SizeVisitor<B>(PhantomData<B>);

impl<B: Bounds> serde::de::Visitor<'_> for SizeVisitor<B> {
    type Value = (String, u64);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size like \"512MiB\" or a number of bytes")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok((v.to_string(), v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        u64::try_from(v)
            .map(|b| (v.to_string(), b))
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        s.parse::<bytesize::ByteSize>()
            .map(|b| (format!("{s:?}"), b.as_u64()))
            .map_err(|e| {
                E::custom(format!(
                    "`{}` = {s:?} is not a size ({e}); write e.g. \"512MiB\", \"1.5GiB\" or \"300MB\"",
                    B::KEY
                ))
            })
    }
}

/// `bytes` as "1MiB", "1PiB" (the bounds are powers of two).
fn fmt_bytes(bytes: u64) -> String {
    for (unit, name) in [(PIB, "PiB"), (TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB")] {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

// ---------------------------------------------------------------------------
// Checked strings

/// A path in the file: not empty, no NUL byte (the kernel takes C strings).
struct PathValue(PathBuf);

impl<'de> Deserialize<'de> for PathValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(D::Error::custom("the path is empty; it names no file"));
        }
        if s.contains('\0') {
            return Err(D::Error::custom(format!(
                "path {s:?} contains a NUL byte; the kernel takes paths as C strings"
            )));
        }
        Ok(PathValue(PathBuf::from(s)))
    }
}

/// A `[[listen]] name`: goes into LISTEN_FDNAMES (sd_listen_fds(3)).
struct ListenName(String);

impl<'de> Deserialize<'de> for ListenName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = String::deserialize(d)?;
        let problem = if n.is_empty() {
            Some("must not be empty")
        } else if n == PROBE_NAME {
            Some("is the probe socket's own name")
        } else {
            fd_name_problem(&n)
        };
        match problem {
            Some(p) => Err(D::Error::custom(format!("listen name {n:?} {p}"))),
            None => Ok(ListenName(n)),
        }
    }
}

/// `[app] ready_path`: the request-target of the probe's `GET`, written into
/// its request line as is: so `/` first, then printable ASCII only
/// (whitespace would split the request line, CR or LF would end it and let
/// the rest inject headers; RFC 9112 §3.2 wants anything else percent-encoded).
struct ReadyPath(String);

impl<'de> Deserialize<'de> for ReadyPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = String::deserialize(d)?;
        let problem = if !p.starts_with('/') {
            Some("must start with `/`")
        } else if p.chars().any(char::is_control) {
            Some("contains a control character, which would end the probe's request line and inject the rest")
        } else if p.chars().any(char::is_whitespace) {
            Some("contains whitespace, which would split the probe's request line; percent-encode it (%20)")
        } else if !p.is_ascii() {
            Some("contains a non-ASCII character; percent-encode it")
        } else {
            None
        };
        match problem {
            Some(why) => Err(D::Error::custom(format!("`ready_path` {p:?} {why}"))),
            None => Ok(ReadyPath(p)),
        }
    }
}

// ---------------------------------------------------------------------------
// The public, validated types

/// A listener after defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Listen {
    pub name: String,
    pub address: Address,
    pub backlog: u32,
    pub mode: Option<u32>,
}

fn default_backlog() -> u32 {
    1024
}

/// `[app]`. Ranges: see the [`Bounds`] markers (`Workers`, `DrainTimeout`, ...).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub command: Argv,
    #[serde(default = "default_workers")]
    pub workers: NonZeroU32,
    /// Absolute, an existing directory.
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_handoff")]
    pub handoff: Vec<Handoff>,
    #[serde(default)]
    pub ready: ReadyMode,
    #[serde(default = "default_ready_delay", with = "humantime_serde")]
    pub ready_delay: Duration,
    #[serde(default = "default_ready_path")]
    pub ready_path: String,
    #[serde(default = "default_ready_timeout", with = "humantime_serde")]
    pub ready_timeout: Duration,
    #[serde(default = "default_drain_signal")]
    pub drain_signal: SignalName,
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(default = "default_max_surge")]
    pub max_surge: u32,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// The most workers `scale`, SIGTTIN or `workers` may ask for.
    #[serde(default = "default_max_workers")]
    pub max_workers: NonZeroU32,
    /// The `[[listen]]` names a worker's process tree must hold to count as
    /// ready; `None`: every listener it is given. Never empty; every name is
    /// a listener's.
    #[serde(default)]
    pub ready_listeners: Option<Vec<String>>,
}

fn default_workers() -> NonZeroU32 {
    NonZeroU32::MIN
}
/// The default bound on the worker count.
pub const DEFAULT_MAX_WORKERS: u32 = 256;
fn default_max_workers() -> NonZeroU32 {
    NonZeroU32::new(DEFAULT_MAX_WORKERS).unwrap_or(NonZeroU32::MAX)
}
fn default_handoff() -> Vec<Handoff> {
    vec![Handoff::Systemd, Handoff::ServerStarter, Handoff::Einhorn]
}
fn default_ready_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_ready_path() -> String {
    "/".into()
}
fn default_ready_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_drain_signal() -> SignalName {
    SignalName(Signal::SIGTERM)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_surge() -> u32 {
    1
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}

/// `[app]` for a command given on the command line: every default.
fn default_app(command: Argv) -> AppConfig {
    AppConfig {
        command,
        workers: default_workers(),
        cwd: None,
        env: BTreeMap::new(),
        handoff: default_handoff(),
        ready: ReadyMode::default(),
        ready_delay: default_ready_delay(),
        ready_path: default_ready_path(),
        ready_timeout: default_ready_timeout(),
        drain_signal: default_drain_signal(),
        drain_timeout: default_drain_timeout(),
        max_surge: default_max_surge(),
        restart_backoff_max: default_backoff_max(),
        max_workers: default_max_workers(),
        ready_listeners: None,
    }
}

/// Which memory figure is compared to the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Rss,
    Pss,
    Uss,
}

/// What one memory figure covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The worker and all its descendants, summed.
    #[default]
    Tree,
    /// Each process under the worker on its own.
    Process,
}

/// `[memory]`: recycling bloated and old workers. At least one of `limit`
/// and `max_lifetime`; ranges: see the [`Bounds`] markers.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    pub limit: Option<bytesize::ByteSize>,
    /// Default: pss for scope = "tree", uss for scope = "process".
    pub metric: Option<Metric>,
    #[serde(default)]
    pub scope: Scope,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_grace")]
    pub grace: u32,
    #[serde(default = "default_min_lifetime", with = "humantime_serde")]
    pub min_lifetime: Duration,
    #[serde(default = "default_child_signal")]
    pub child_signal: SignalName,
    #[serde(default, with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub lifetime_jitter: Option<Duration>,
}

impl MemoryConfig {
    pub fn metric(&self) -> Metric {
        self.metric.unwrap_or(match self.scope {
            Scope::Tree => Metric::Pss,
            Scope::Process => Metric::Uss,
        })
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_grace() -> u32 {
    3
}
fn default_min_lifetime() -> Duration {
    Duration::from_secs(60)
}
fn default_child_signal() -> SignalName {
    SignalName(Signal::SIGQUIT)
}

/// `[logs]`: where workers' stdout/stderr go. Paths are absolute and name no
/// directory.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    #[serde(default = "default_true")]
    pub prefix: bool,
    pub reopen_signal: Option<SignalName>,
    pub holdfast_log: Option<PathBuf>,
}

/// No `[logs]` table means the same as an empty one (so `prefix` is on).
impl Default for LogsConfig {
    fn default() -> LogsConfig {
        LogsConfig {
            stdout: None,
            stderr: None,
            prefix: true,
            reopen_signal: None,
            holdfast_log: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// A file after [`parse`]: every value checked, relative paths made absolute,
/// listener names defaulted; what relates it to the command line and its
/// tables to each other is left to [`Config::build`], with `at`.
#[derive(Debug, Clone, Default)]
pub struct FileConfig {
    /// Absolute.
    pub control_socket: Option<PathBuf>,
    /// Prometheus text format at `/metrics`; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    pub listen: Vec<Listen>,
    pub app: Option<AppConfig>,
    pub memory: Option<MemoryConfig>,
    pub logs: Option<LogsConfig>,
    /// Where the keys `build` relates were written.
    at: Places,
}

/// What the command line may say instead of, or on top of, the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Vec<Address>,
    pub workers: Option<u32>,
    pub command: Vec<String>,
}

/// The validated configuration holdfast runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, if any; relative paths in it are relative to its directory.
    pub path: Option<PathBuf>,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub listen: Vec<Listen>,
    pub app: AppConfig,
    pub memory: Option<MemoryConfig>,
    /// `[logs]`, with relative paths made absolute.
    pub logs: LogsConfig,
}

// ---------------------------------------------------------------------------
// Positions

/// A place in the config file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct At {
    line: usize,
    column: usize,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// " (7:11)" for a key written in the file, " (the default)" otherwise.
fn written(at: Option<At>) -> String {
    match at {
        Some(a) => format!(" ({a})"),
        None => " (the default)".into(),
    }
}

/// Where the keys that [`Config::build`] relates to each other were written.
#[derive(Debug, Clone, Default)]
struct Places {
    control_socket: Option<At>,
    metrics_listen: Option<At>,
    /// One per `[[listen]]` entry, in order.
    listen: Vec<ListenAt>,
    workers: Option<At>,
    max_workers: Option<At>,
    /// One per `ready_listeners` name, in order.
    ready_listeners: Vec<At>,
}

/// Where one `[[listen]]` entry was written: its header, its name (unless
/// defaulted) and its address.
#[derive(Debug, Clone, Copy)]
struct ListenAt {
    entry: At,
    name: Option<At>,
    address: At,
}

/// The text being parsed: turns spans into positions and errors, and
/// relative paths into absolute ones.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    /// The file's directory.
    base: PathBuf,
}

impl Source<'_> {
    fn at(&self, span: Range<usize>) -> At {
        let (line, column) = line_col(self.text, span.start);
        At { line, column }
    }

    fn error(&self, span: Range<usize>, message: String) -> ConfigError {
        let At { line, column } = self.at(span);
        ConfigError::Parse {
            path: self.path.to_path_buf(),
            line,
            column,
            message,
        }
    }

    fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_relative() {
            self.base.join(p)
        } else {
            p
        }
    }
}

/// Why `p` (absolute) cannot be a unix socket's path, if it cannot.
fn socket_path_problem(p: &Path) -> Option<String> {
    let len = p.as_os_str().as_bytes().len();
    if len > UNIX_PATH_MAX {
        return Some(format!(
            "{} is {len} bytes once made absolute; the kernel allows at most {UNIX_PATH_MAX} bytes for a unix socket path",
            p.display()
        ));
    }
    file_path_problem(p)
}

/// Why `p` (absolute) cannot be a file holdfast creates, if it cannot: it
/// names a directory.
fn file_path_problem(p: &Path) -> Option<String> {
    let b = p.as_os_str().as_bytes();
    // `Path::components` drops a trailing "." (and "/"), so look at the bytes.
    let dir = [&b"/"[..], b"/.", b"/.."]
        .iter()
        .any(|end| b.ends_with(end))
        || b == b"."
        || b == b".."
        || std::fs::metadata(p).is_ok_and(|m| m.is_dir());
    dir.then(|| format!("{} is a directory", p.display()))
}

/// Whether two unix socket paths name the same file (`a/./b` is `a/b`).
fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

/// Whether two TCP listeners cannot both be bound: the same address, or the
/// same port (not 0, which the kernel picks) where one is the wildcard of the
/// other's family (IPV6_V6ONLY is set, so the families are apart).
fn tcp_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

// ---------------------------------------------------------------------------
// The file as written

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    control_socket: Option<Spanned<PathValue>>,
    metrics_listen: Option<Spanned<SocketAddr>>,
    #[serde(default)]
    listen: Vec<Spanned<RawListen>>,
    app: Option<Spanned<RawApp>>,
    memory: Option<Spanned<RawMemory>>,
    logs: Option<RawLogs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    name: Option<Spanned<ListenName>>,
    address: Spanned<Address>,
    backlog: Option<Count<Backlog>>,
    mode: Option<Spanned<Mode>>,
}

/// `[app]`; the fields in `AppConfig`'s order, which serde's "expected one
/// of" lists.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    command: Argv,
    workers: Option<Spanned<Count<Workers>>>,
    cwd: Option<Spanned<PathValue>>,
    env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    handoff: Option<Vec<Handoff>>,
    ready: Option<ReadyMode>,
    ready_delay: Option<Spanned<Dur<ReadyDelay>>>,
    ready_path: Option<ReadyPath>,
    ready_timeout: Option<Spanned<Dur<ReadyTimeout>>>,
    drain_signal: Option<Catchable>,
    drain_timeout: Option<Dur<DrainTimeout>>,
    max_surge: Option<Count<MaxSurge>>,
    restart_backoff_max: Option<Dur<RestartBackoffMax>>,
    max_workers: Option<Spanned<Count<MaxWorkers>>>,
    ready_listeners: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    limit: Option<Size<MemoryLimit>>,
    metric: Option<Metric>,
    scope: Option<Scope>,
    interval: Option<Dur<Interval>>,
    grace: Option<Count<Grace>>,
    min_lifetime: Option<Dur<MinLifetime>>,
    child_signal: Option<SignalName>,
    max_lifetime: Option<Dur<MaxLifetime>>,
    lifetime_jitter: Option<Dur<LifetimeJitter>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    stdout: Option<Spanned<PathValue>>,
    stderr: Option<Spanned<PathValue>>,
    prefix: Option<bool>,
    reopen_signal: Option<Catchable>,
    holdfast_log: Option<Spanned<PathValue>>,
}

impl RawFile {
    fn check(self, src: &Source<'_>) -> Result<FileConfig, ConfigError> {
        let mut at = Places::default();
        let control_socket = match self.control_socket {
            Some(s) => {
                let span = s.span();
                let p = src.resolve(s.into_inner().0);
                if let Some(problem) = socket_path_problem(&p) {
                    return Err(src.error(span, format!("`control_socket` {problem}")));
                }
                at.control_socket = Some(src.at(span));
                Some(p)
            }
            None => None,
        };
        let metrics_listen = self.metrics_listen.map(|m| {
            at.metrics_listen = Some(src.at(m.span()));
            m.into_inner()
        });
        let mut listen = Vec::new();
        for (i, entry) in self.listen.into_iter().enumerate() {
            let entry_at = src.at(entry.span());
            let raw = entry.into_inner();
            let (name, name_at) = match raw.name {
                Some(n) => (n.get_ref().0.clone(), Some(src.at(n.span()))),
                None => (format!("listen{i}"), None),
            };
            let address_span = raw.address.span();
            let address = absolute(&src.base, raw.address.into_inner());
            if let Some(problem) = address.unix_path().and_then(socket_path_problem) {
                return Err(src.error(address_span, format!("[[listen]] `address` {problem}")));
            }
            let mode = match raw.mode {
                Some(m) if !matches!(address, Address::Unix(_)) => {
                    return Err(src.error(
                        m.span(),
                        format!("`mode` is for unix sockets only; {address} is not one"),
                    ))
                }
                Some(m) => Some(m.into_inner().0),
                None => None,
            };
            at.listen.push(ListenAt {
                entry: entry_at,
                name: name_at,
                address: src.at(address_span),
            });
            listen.push(Listen {
                name,
                address,
                backlog: raw.backlog.map_or_else(default_backlog, |b| b.0),
                mode,
            });
        }
        let app = match self.app {
            Some(a) => Some(a.into_inner().check(src, &mut at)?),
            None => None,
        };
        let memory = self
            .memory
            .map(|m| {
                let span = m.span();
                m.into_inner().check(span, src)
            })
            .transpose()?;
        let logs = self.logs.map(|l| l.check(src)).transpose()?;
        Ok(FileConfig {
            control_socket,
            metrics_listen,
            listen,
            app,
            memory,
            logs,
            at,
        })
    }
}

impl RawApp {
    fn check(self, src: &Source<'_>, at: &mut Places) -> Result<AppConfig, ConfigError> {
        let workers = match self.workers {
            Some(w) => {
                at.workers = Some(src.at(w.span()));
                w.into_inner().nonzero()
            }
            None => default_workers(),
        };
        let max_workers = match self.max_workers {
            Some(m) => {
                at.max_workers = Some(src.at(m.span()));
                m.into_inner().nonzero()
            }
            None => default_max_workers(),
        };
        let cwd = match self.cwd {
            Some(c) => {
                let span = c.span();
                let dir = src.resolve(c.into_inner().0);
                let problem = match std::fs::metadata(&dir) {
                    Ok(m) if m.is_dir() => None,
                    Ok(_) => Some("is not a directory".to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Some("does not exist".to_string())
                    }
                    Err(e) => Some(format!("cannot be reached: {e}")),
                };
                if let Some(p) = problem {
                    return Err(src.error(span, format!("[app] `cwd` {} {p}", dir.display())));
                }
                Some(dir)
            }
            None => None,
        };
        let mut env = BTreeMap::new();
        for (k, v) in self.env.unwrap_or_default() {
            let problem = if k.get_ref().is_empty() {
                Some((k.span(), "a variable name is empty".to_string()))
            } else if k.get_ref().contains('\0') {
                Some((
                    k.span(),
                    format!("name {:?} contains a NUL byte", k.get_ref()),
                ))
            } else if k.get_ref().contains('=') {
                Some((
                    k.span(),
                    format!(
                        "name `{}` contains `=`: the environment is NAME=value strings, so the worker would see another name",
                        k.get_ref()
                    ),
                ))
            } else if is_own_env(k.get_ref()) {
                Some((
                    k.span(),
                    format!(
                        "`{}` is set by holdfast itself for every worker (socket handoff, readiness, identity); it cannot be set here",
                        k.get_ref()
                    ),
                ))
            } else if v.get_ref().contains('\0') {
                Some((
                    v.span(),
                    format!("`{}`: the value contains a NUL byte", k.get_ref()),
                ))
            } else {
                None
            };
            if let Some((span, p)) = problem {
                let why = if p.contains("NUL") {
                    "; execve(2) takes C strings"
                } else {
                    ""
                };
                return Err(src.error(span, format!("[app] `env` {p}{why}")));
            }
            env.insert(k.into_inner(), v.into_inner());
        }
        let ready = self.ready.unwrap_or_default();
        let (ready_delay, delay_at) = match self.ready_delay {
            Some(d) => (d.get_ref().0, Some(d.span())),
            None => (default_ready_delay(), None),
        };
        let (ready_timeout, timeout_at) = match self.ready_timeout {
            Some(t) => (t.get_ref().0, Some(t.span())),
            None => (default_ready_timeout(), None),
        };
        if ready == ReadyMode::Delay && ready_delay >= ready_timeout {
            // One of them was written: the defaults (1s, 60s) are in order.
            let span = delay_at.clone().or(timeout_at.clone()).unwrap_or(0..0);
            return Err(src.error(
                span,
                format!(
                    "[app] `ready_delay` = {}{} is not below `ready_timeout` = {}{}: with ready = \"delay\" every worker would time out before it counts as ready",
                    humantime::format_duration(ready_delay),
                    written(delay_at.map(|s| src.at(s))),
                    humantime::format_duration(ready_timeout),
                    written(timeout_at.map(|s| src.at(s))),
                ),
            ));
        }
        let ready_listeners = match self.ready_listeners {
            Some(list) if list.get_ref().is_empty() => {
                return Err(src.error(
                    list.span(),
                    "[app] `ready_listeners` is empty: a worker holding no listening socket would count as ready; leave the key out to mean every listener".into(),
                ))
            }
            Some(list) => Some(
                list.into_inner()
                    .into_iter()
                    .map(|n| {
                        at.ready_listeners.push(src.at(n.span()));
                        n.into_inner()
                    })
                    .collect(),
            ),
            None => None,
        };
        Ok(AppConfig {
            command: self.command,
            workers,
            cwd,
            env,
            handoff: self.handoff.unwrap_or_else(default_handoff),
            ready,
            ready_delay,
            ready_path: self.ready_path.map_or_else(default_ready_path, |p| p.0),
            ready_timeout,
            drain_signal: self.drain_signal.map_or_else(default_drain_signal, |c| c.0),
            drain_timeout: self
                .drain_timeout
                .map_or_else(default_drain_timeout, |d| d.0),
            max_surge: self.max_surge.map_or_else(default_max_surge, |m| m.0),
            restart_backoff_max: self
                .restart_backoff_max
                .map_or_else(default_backoff_max, |d| d.0),
            max_workers,
            ready_listeners,
        })
    }
}

impl RawMemory {
    /// `span`: the `[memory]` header.
    fn check(self, span: Range<usize>, src: &Source<'_>) -> Result<MemoryConfig, ConfigError> {
        let m = self;
        if m.limit.is_none() && m.max_lifetime.is_none() {
            return Err(src.error(
                span,
                "[memory] needs `limit` or `max_lifetime` (or both)".into(),
            ));
        }
        Ok(MemoryConfig {
            limit: m.limit.map(|l| l.0),
            metric: m.metric,
            scope: m.scope.unwrap_or_default(),
            interval: m.interval.map_or_else(default_interval, |d| d.0),
            grace: m.grace.map_or_else(default_grace, |g| g.0),
            min_lifetime: m.min_lifetime.map_or_else(default_min_lifetime, |d| d.0),
            child_signal: m.child_signal.unwrap_or_else(default_child_signal),
            max_lifetime: m.max_lifetime.map(|d| d.0),
            lifetime_jitter: m.lifetime_jitter.map(|d| d.0),
        })
    }
}

impl RawLogs {
    fn check(self, src: &Source<'_>) -> Result<LogsConfig, ConfigError> {
        let path = |key: &str, p: Option<Spanned<PathValue>>| -> Result<_, ConfigError> {
            let Some(p) = p else {
                return Ok(None);
            };
            let span = p.span();
            let file = src.resolve(p.into_inner().0);
            match file_path_problem(&file) {
                Some(problem) => Err(src.error(span, format!("[logs] `{key}` {problem}"))),
                None => Ok(Some(file)),
            }
        };
        Ok(LogsConfig {
            stdout: path("stdout", self.stdout)?,
            stderr: path("stderr", self.stderr)?,
            prefix: self.prefix.unwrap_or_else(default_true),
            reopen_signal: self.reopen_signal.map(|c| c.0),
            holdfast_log: path("holdfast_log", self.holdfast_log)?,
        })
    }
}

// ---------------------------------------------------------------------------
// Reading and building

impl Config {
    /// Reads, parses and validates `path` (if any), then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let absolute_path = path
            .map(std::path::absolute)
            .transpose()
            .map_err(|source| ConfigError::Read {
                path: path.map(Path::to_path_buf).unwrap_or_default(),
                source,
            })?;
        let path = absolute_path.as_deref();
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Some(parse(p, &text)?)
            }
            None => None,
        };
        Self::build(path, file, overrides)
    }

    /// Applies `o` to `file` and checks what relates the two, and the
    /// tables to each other. An error names the file position of the key it
    /// is about, or the command-line option.
    fn build(
        path: Option<&Path>,
        file: Option<FileConfig>,
        o: &Overrides,
    ) -> Result<Config, ConfigError> {
        let origin = match path {
            Some(p) => p.display().to_string(),
            None => "(command line)".to_string(),
        };
        let refuse = |Refusal { at, message }: Refusal| match (path, at) {
            (Some(p), Some(At { line, column })) => ConfigError::Parse {
                path: p.to_path_buf(),
                line,
                column,
                message,
            },
            _ => ConfigError::Invalid {
                origin: origin.clone(),
                message,
            },
        };
        let base = path
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let file = file.unwrap_or_default();
        let places = file.at;

        let mut app = match (file.app, o.command.is_empty()) {
            (Some(mut app), false) => {
                app.command = Argv(o.command.clone());
                app
            }
            (Some(app), true) => app,
            (None, false) => default_app(Argv(o.command.clone())),
            (None, true) => {
                return Err(refuse(Refusal::cli(
                    "no [app] command: add an [app] table with `command = [...]`, or give it after `--` on the command line",
                )))
            }
        };
        set_workers(&mut app, o.workers, &places).map_err(refuse)?;
        let listeners = if o.listen.is_empty() {
            Listeners {
                at: places.listen.iter().copied().map(Some).collect(),
                list: file.listen,
            }
        } else {
            Listeners::from_command_line(&o.listen, &base).map_err(refuse)?
        };
        listeners.check().map_err(refuse)?;
        if let Some(names) = &app.ready_listeners {
            listeners
                .check_ready(names, &places.ready_listeners, !o.listen.is_empty())
                .map_err(refuse)?;
        }
        let control_socket = match file.control_socket {
            Some(p) => p,
            None => {
                let p = default_control_socket(path);
                // Without a file, `run` goes on without a control socket it cannot bind.
                if let (Some(_), Some(problem)) = (path, socket_path_problem(&p)) {
                    return Err(refuse(Refusal::cli(format!(
                        "the control socket next to the config file: {problem}; set `control_socket` to a shorter path"
                    ))));
                }
                p
            }
        };
        listeners
            .check_control_socket(&control_socket, places.control_socket)
            .map_err(refuse)?;
        if let Some(m) = file.metrics_listen {
            listeners
                .check_metrics(m, places.metrics_listen)
                .map_err(refuse)?;
        }
        Ok(Config {
            path: path.map(Path::to_path_buf),
            control_socket,
            metrics_listen: file.metrics_listen,
            listen: listeners.list,
            app,
            memory: file.memory,
            logs: file.logs.unwrap_or_default(),
        })
    }
}

/// A value `build` refuses: where it was written (`None`: on the command
/// line, or a default) and why.
struct Refusal {
    at: Option<At>,
    message: String,
}

impl Refusal {
    fn at(at: Option<At>, message: impl Into<String>) -> Refusal {
        Refusal {
            at,
            message: message.into(),
        }
    }

    fn cli(message: impl Into<String>) -> Refusal {
        Refusal::at(None, message)
    }
}

/// Applies `--workers` and bounds `workers` by `max_workers`.
fn set_workers(app: &mut AppConfig, cli: Option<u32>, places: &Places) -> Result<(), Refusal> {
    let (what, at) = match cli {
        Some(w) => {
            app.workers =
                NonZeroU32::new(w).ok_or_else(|| Refusal::cli("--workers must be at least 1"))?;
            (format!("--workers {w}"), None)
        }
        None => (format!("[app] `workers` = {}", app.workers), places.workers),
    };
    if app.workers > app.max_workers {
        return Err(Refusal::at(
            at,
            format!(
                "{what} is above `max_workers` = {}{}; raise max_workers if you mean it",
                app.max_workers,
                written(places.max_workers)
            ),
        ));
    }
    Ok(())
}

/// The listeners holdfast will hold, from `[[listen]]` (with where each was
/// written) or from `--listen` (positions `None`).
struct Listeners {
    list: Vec<Listen>,
    at: Vec<Option<ListenAt>>,
}

impl Listeners {
    fn from_command_line(addresses: &[Address], base: &Path) -> Result<Listeners, Refusal> {
        let mut list = Vec::new();
        for (i, a) in addresses.iter().enumerate() {
            let address = absolute(base, a.clone());
            if let Some(problem) = address.unix_path().and_then(socket_path_problem) {
                return Err(Refusal::cli(format!("--listen {a}: {problem}")));
            }
            list.push(Listen {
                name: format!("listen{i}"),
                address,
                backlog: default_backlog(),
                mode: None,
            });
        }
        let at = vec![None; list.len()];
        Ok(Listeners { list, at })
    }

    /// "[[listen]] `http` (2:8)", or "--listen ADDR".
    fn describe(&self, i: usize) -> String {
        let l = &self.list[i];
        match self.at[i] {
            Some(at) => format!("[[listen]] `{}` ({})", l.name, at.name.unwrap_or(at.entry)),
            None => format!("--listen {}", l.address),
        }
    }

    /// At least one; names and addresses apart.
    fn check(&self) -> Result<(), Refusal> {
        if self.list.is_empty() {
            return Err(Refusal::cli(
                "no listening socket: add a [[listen]] entry with an `address`, or `--listen ADDR`",
            ));
        }
        for (i, l) in self.list.iter().enumerate() {
            let here = self.at[i];
            for (j, m) in self.list[..i].iter().enumerate() {
                if m.name == l.name {
                    let note = match here {
                        Some(ListenAt { name: None, .. }) => " (its default name)",
                        _ => "",
                    };
                    return Err(Refusal::at(
                        here.map(|a| a.name.unwrap_or(a.entry)),
                        format!(
                            "two [[listen]] entries are named `{}`{note}: this one and {}; LISTEN_FDNAMES must tell them apart",
                            l.name,
                            self.describe(j)
                        ),
                    ));
                }
                let at = here.map(|a| a.address);
                let same = match (&m.address, &l.address) {
                    (Address::Unix(a), Address::Unix(b)) => same_path(a, b),
                    (a, b) => a == b,
                };
                if same {
                    return Err(Refusal::at(
                        at,
                        format!(
                            "address {} is listed twice: {} and {}",
                            l.address,
                            self.describe(j),
                            self.describe(i)
                        ),
                    ));
                }
                if let (Address::Tcp(a), Address::Tcp(b)) = (&m.address, &l.address) {
                    if tcp_clash(*a, *b) {
                        return Err(Refusal::at(
                            at,
                            format!(
                                "{} on {b} and {} on {a} cannot both be bound: a wildcard address takes its port on every address of its family",
                                self.describe(i),
                                self.describe(j),
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every `ready_listeners` name (written at `at`) is a listener's.
    fn check_ready(&self, names: &[String], at: &[At], cli: bool) -> Result<(), Refusal> {
        for (k, n) in names.iter().enumerate() {
            if !self.list.iter().any(|l| &l.name == n) {
                let known: Vec<&str> = self.list.iter().map(|l| l.name.as_str()).collect();
                let hint = if cli {
                    "; --listen replaces [[listen]], and its sockets are named listen0, listen1, ..."
                } else {
                    ""
                };
                return Err(Refusal::at(
                    at.get(k).copied(),
                    format!(
                        "[app] `ready_listeners` names `{n}`, which is no [[listen]] name (names: {}){hint}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The control socket (written at `at`, or the default) is no listener's path.
    fn check_control_socket(&self, path: &Path, at: Option<At>) -> Result<(), Refusal> {
        for (i, l) in self.list.iter().enumerate() {
            if l.address.unix_path().is_some_and(|p| same_path(p, path)) {
                return Err(Refusal::at(
                    at.or(self.at[i].map(|a| a.address)),
                    format!(
                        "`control_socket` {}{} is also the path of {}; one socket file cannot be both",
                        path.display(),
                        if at.is_some() { "" } else { " (the default)" },
                        self.describe(i)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `metrics_listen` (written at `at`) can be bound next to the listeners.
    fn check_metrics(&self, metrics: SocketAddr, at: Option<At>) -> Result<(), Refusal> {
        for (i, l) in self.list.iter().enumerate() {
            if matches!(l.address, Address::Tcp(a) if tcp_clash(a, metrics)) {
                return Err(Refusal::at(
                    at,
                    format!(
                        "`metrics_listen` {metrics} and {} on {} cannot both be bound",
                        self.describe(i),
                        l.address
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Address {
    fn unix_path(&self) -> Option<&Path> {
        match self {
            Address::Unix(p) => Some(p),
            _ => None,
        }
    }
}

/// The LISTEN_FDNAMES name of the private readiness probe socket.
pub const PROBE_NAME: &str = "holdfast-probe";

fn absolute(base: &Path, a: Address) -> Address {
    match a {
        Address::Unix(p) if p.is_relative() => Address::Unix(base.join(p)),
        other => other,
    }
}

/// The control socket when the config does not name one: next to the config
/// file, else in `$XDG_RUNTIME_DIR`, else `/run/holdfast/`.
pub fn default_control_socket(config: Option<&Path>) -> PathBuf {
    if let Some(dir) = config.and_then(|p| p.parent()) {
        return dir.join("holdfast.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("holdfast.sock"),
        _ => PathBuf::from("/run/holdfast/holdfast.sock"),
    }
}

/// Parses and checks `text` (the contents of `path`; relative paths in it are
/// relative to `path`'s directory). Every error names `path:line:column`;
/// serde's get a hint at the key that was probably meant.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => line_col(text, span.start),
            None => (1, 1),
        };
        let mut message = e.message().trim().to_string();
        if let Some(hint) = suggest(&message) {
            message.push_str(&format!("; did you mean `{hint}`?"));
        }
        if let Some(place) = e.span().and_then(|span| place(text, span.start, &message)) {
            message.push_str(&format!(" ({place})"));
        }
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message,
        }
    })?;
    raw.check(&Source {
        path,
        text,
        base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
    })
}

/// Where `offset` is in the TOML: "key `workers` in [app]", or "in [app]"
/// when the key is not known or `message` already names it. serde's messages
/// for a bad value ("invalid type: string \"two\", expected a nonzero u32")
/// do not say which key they are about.
fn place(text: &str, offset: usize, message: &str) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let header = |l: &str| {
        let l = l.trim();
        (l.starts_with('[')).then(|| l[..l.rfind(']').map_or(l.len(), |i| i + 1)].to_string())
    };
    let table = header(line).or_else(|| text[..line_start].lines().rev().find_map(header));
    let key = match line.find('=') {
        Some(eq) if header(line).is_none() && line_start + eq < offset => {
            Some(line[..eq].trim()).filter(|k| !k.is_empty())
        }
        _ => None,
    }
    .filter(|k| !message.contains(&format!("`{k}`")));
    match (key, table) {
        (Some(k), Some(t)) => Some(format!("key `{k}` in {t}")),
        (Some(k), None) => Some(format!("key `{k}`")),
        (None, Some(t)) => Some(format!("in {t}")),
        (None, None) => None,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the closest `a`/`b`.
fn suggest(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (strsim::damerau_levenshtein(unknown, cand), cand))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("h.toml"), text)
            .and_then(|f| Config::build(Some(Path::new("h.toml")), Some(f), &Overrides::default()))
            .expect_err("must fail")
            .to_string()
    }

    #[test]
    fn uncatchable_signals_and_holdfasts_own_env_are_refused() {
        let base = "[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\n";
        let e = err(&format!("{base}drain_signal = \"KILL\"\n"));
        assert!(
            e.contains("h.toml:5:16") && e.contains("KILL cannot be caught"),
            "{e}"
        );
        let e = err(&format!("{base}[logs]\nreopen_signal = \"SIGSTOP\"\n"));
        assert!(
            e.contains("h.toml:6:17") && e.contains("STOP cannot be caught"),
            "{e}"
        );
        let e = err(&format!("{base}env = {{ LISTEN_FDS = \"3\" }}\n"));
        assert!(
            e.contains("h.toml:5:") && e.contains("`LISTEN_FDS` is set by holdfast itself"),
            "{e}"
        );
        let e = err(&format!("{base}env = {{ EINHORN_FD_0 = \"3\" }}\n"));
        assert!(
            e.contains("`EINHORN_FD_0` is set by holdfast itself"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_position_and_suggestion() {
        let e =
            err("[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\nworker = 2\n");
        assert!(
            e.starts_with("config h.toml:5:1: unknown field `worker`"),
            "{e}"
        );
        assert!(e.contains("did you mean `workers`?"), "{e}");
    }

    #[test]
    fn bad_values_are_positioned() {
        let e = err("[[listen]]\naddress = \"127.0.0.1:99999\"\n[app]\ncommand = [\"x\"]\n");
        assert!(e.contains("h.toml:2:11") && e.contains("99999"), "{e}");
        let e =
            err("[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\nworkers = 0\n");
        assert!(e.contains("h.toml:5:11") && e.contains("nonzero"), "{e}");
        assert!(e.ends_with("nonzero u32 (key `workers` in [app])"), "{e}");
        let e = err("[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\nworkers = 1\n");
        assert!(e.contains("missing field `command` (in [app])"), "{e}");
        let e = err("[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = []\n");
        assert!(
            e.contains("h.toml:4:11") && e.contains("command is empty"),
            "{e}"
        );
        let e = err("[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = \"puma\"\n");
        assert!(
            e.contains("h.toml:4:11") && e.contains("expected a sequence"),
            "{e}"
        );
        let e = err("[[listen]]\naddress = \"nowhere\"\n[app]\ncommand = [\"x\"]\n");
        assert!(e.contains("h.toml:2:11"), "{e}");
        assert!(e.ends_with("(key `address` in [[listen]])"), "{e}");
        let e = err("control_socket = 3\n[app]\ncommand = [\"x\"]\n");
        assert!(e.ends_with("(key `control_socket`)"), "{e}");
    }

    #[test]
    fn addresses() {
        assert_eq!(
            "[::1]:80".parse::<Address>(),
            Ok(Address::Tcp("[::1]:80".parse().expect("v6")))
        );
        assert_eq!(
            "unix:/a.sock".parse::<Address>(),
            Ok(Address::Unix("/a.sock".into()))
        );
        assert!("example.com:80".parse::<Address>().is_err());
    }

    /// Parses and validates `text` as if it were /etc/h.toml.
    pub(super) fn valid(text: &str) -> Config {
        let path = Path::new("/etc/h.toml");
        let f = parse(path, text).expect("parses");
        Config::build(Some(path), Some(f), &Overrides::default()).expect("valid")
    }

    #[test]
    fn defaults_and_names() {
        let c = valid(
            "[[listen]]\naddress = \"127.0.0.1:1\"\n[[listen]]\nname = \"u\"\naddress = \"unix:a.sock\"\n[app]\ncommand = [\"x\"]\n",
        );
        assert_eq!(c.listen[0].name, "listen0");
        assert_eq!(c.listen[1].address, Address::Unix("/etc/a.sock".into()));
        assert_eq!(c.control_socket, PathBuf::from("/etc/holdfast.sock"));
        assert_eq!(c.app.ready, ReadyMode::Notify);
        assert_eq!(c.app.max_surge, 1);
    }
}

#[cfg(test)]
mod section_tests {
    use super::*;

    #[test]
    fn memory_and_logs_sections_parse() {
        let c = super::tests::valid(
            "[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\n[memory]\nlimit = \"512MiB\"\nscope = \"process\"\nmax_lifetime = \"24h\"\nlifetime_jitter = \"1h\"\n[logs]\nstdout = \"app.log\"\nreopen_signal = \"USR1\"\n",
        );
        let m = c.memory.expect("memory");
        assert_eq!(m.limit, Some(bytesize::ByteSize::mib(512)));
        assert_eq!(m.metric(), Metric::Uss);
        assert_eq!(m.max_lifetime, Some(Duration::from_secs(86400)));
        assert_eq!(c.logs.stdout, Some(PathBuf::from("/etc/app.log")));
        assert!(c.logs.prefix);
        let f = parse(Path::new("h.toml"), "[memory]\nlimit = \"1.5GiB\"\n").expect("parses");
        assert_eq!(
            f.memory.expect("memory").limit,
            Some(bytesize::ByteSize::b(1024 * 1024 * 1024 * 3 / 2))
        );
    }
}

/// One test per rule: each error names file:line:col and the key.
#[cfg(test)]
mod rule_tests {
    use super::*;

    /// A temp dir holding the config file `h.toml`.
    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Dir {
            Dir(tempfile::tempdir().expect("temp dir"))
        }

        fn path(&self) -> PathBuf {
            self.0.path().join("h.toml")
        }

        /// `text` with `{dir}` replaced by the temp dir.
        fn fill(&self, text: &str) -> String {
            text.replace("{dir}", &self.0.path().display().to_string())
        }

        fn load(&self, text: &str, o: &Overrides) -> Result<Config, ConfigError> {
            let path = self.path();
            parse(&path, &self.fill(text)).and_then(|f| Config::build(Some(&path), Some(f), o))
        }

        fn error(&self, text: &str, o: &Overrides) -> String {
            match self.load(text, o) {
                Ok(c) => panic!("must fail:\n{text}\ngot {c:?}"),
                Err(e) => e.to_string(),
            }
        }

        /// "config DIR/h.toml:L:C: " where `marker` (with `|` at the
        /// position, else its start) is in `text`.
        fn at(&self, text: &str, marker: &str) -> String {
            let text = self.fill(text);
            let marker = self.fill(marker);
            let skip = marker.find('|').unwrap_or(0);
            let offset = skip
                + text
                    .find(&marker.replace('|', ""))
                    .unwrap_or_else(|| panic!("{marker:?} not in {text}"));
            let (line, column) = line_col(&text, offset);
            format!("config {}:{line}:{column}: ", self.path().display())
        }

        /// Asserts that `text` fails at `marker` with a message containing `says`.
        fn assert_fails(&self, text: &str, marker: &str, says: &[&str]) {
            self.assert_fails_with(text, &Overrides::default(), marker, says)
        }

        fn assert_fails_with(&self, text: &str, o: &Overrides, marker: &str, says: &[&str]) {
            let e = self.error(text, o);
            let at = self.at(text, marker);
            assert!(e.starts_with(&at), "want {at:?} in\n{e}\nfor\n{text}");
            for s in says {
                assert!(e.contains(s), "want {s:?} in\n{e}\nfor\n{text}");
            }
        }
    }

    const LISTEN: &str = "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:1\"\n";
    const APP: &str = "[app]\ncommand = [\"x\"]\n";

    /// A config with `key = value` in `table`, everything else valid.
    fn with_key(table: &str, key: &str, value: &str) -> String {
        let line = format!("{key} = {value}\n");
        match table {
            "[[listen]]" => format!("{LISTEN}{line}{APP}"),
            "[app]" if key == "workers" => format!("{LISTEN}{APP}max_workers = 65536\n{line}"),
            "[app]" => format!("{LISTEN}{APP}{line}"),
            "[memory]" if key == "max_lifetime" => format!("{LISTEN}{APP}[memory]\n{line}"),
            "[memory]" => format!("{LISTEN}{APP}[memory]\nmax_lifetime = \"1h\"\n{line}"),
            other => panic!("no table {other}"),
        }
    }

    /// (table, key, refused below, lowest, highest, refused above); values as TOML.
    type BoundRow = (
        &'static str,
        &'static str,
        Option<&'static str>,
        &'static str,
        &'static str,
        &'static str,
    );

    #[test]
    fn every_duration_count_and_size_is_range_checked_at_its_position() {
        let rows: &[BoundRow] = &[
            (
                "[app]",
                "ready_delay",
                None,
                "\"0s\"",
                "\"24h\"",
                "\"24h 1ms\"",
            ),
            (
                "[app]",
                "ready_timeout",
                Some("\"99ms\""),
                "\"100ms\"",
                "\"24h\"",
                "\"1day 1s\"",
            ),
            (
                "[app]",
                "drain_timeout",
                Some("\"0s\""),
                "\"100ms\"",
                "\"24h\"",
                "\"100000000000years\"",
            ),
            (
                "[app]",
                "restart_backoff_max",
                Some("\"99ms\""),
                "\"100ms\"",
                "\"24h\"",
                "\"25h\"",
            ),
            ("[app]", "workers", Some("0"), "1", "65536", "65537"),
            (
                "[app]",
                "max_workers",
                Some("0"),
                "1",
                "65536",
                "4294967295",
            ),
            ("[app]", "max_surge", None, "0", "65536", "65537"),
            (
                "[[listen]]",
                "backlog",
                Some("0"),
                "1",
                "2147483647",
                "2147483648",
            ),
            (
                "[memory]",
                "limit",
                Some("\"1023KiB\""),
                "\"1MiB\"",
                "\"1PiB\"",
                "\"1025TiB\"",
            ),
            (
                "[memory]",
                "interval",
                Some("\"99ms\""),
                "\"100ms\"",
                "\"24h\"",
                "\"24h 1s\"",
            ),
            ("[memory]", "grace", Some("0"), "1", "1000", "1001"),
            (
                "[memory]",
                "min_lifetime",
                None,
                "\"0s\"",
                "\"365days\"",
                "\"366days\"",
            ),
            (
                "[memory]",
                "max_lifetime",
                Some("\"999ms\""),
                "\"1s\"",
                "\"365days\"",
                "\"1year\"",
            ),
            (
                "[memory]",
                "lifetime_jitter",
                None,
                "\"0s\"",
                "\"365days\"",
                "\"366days\"",
            ),
        ];
        let dir = Dir::new();
        for &(table, key, below, lowest, highest, above) in rows {
            for ok in [lowest, highest] {
                let text = with_key(table, key, ok);
                if let Err(e) = dir.load(&text, &Overrides::default()) {
                    panic!("{key} = {ok} must be accepted: {e}");
                }
            }
            let marker = format!("\n{key} = |");
            let place = format!("in {table}");
            if let Some(v) = below {
                let text = with_key(table, key, v);
                // `workers` and `max_workers` keep serde's words for zero.
                let words = if v == "0" && key.ends_with("workers") {
                    "expected a nonzero u32".to_string()
                } else {
                    format!("is below the minimum of {}", lowest.trim_matches('"'))
                };
                dir.assert_fails(&text, &marker, &[key, &words, &place]);
            }
            let text = with_key(table, key, above);
            let words = format!(
                "`{key}` = {above} is above the maximum of {}",
                highest.trim_matches('"')
            );
            dir.assert_fails(&text, &marker, &[&words, &place]);
        }
    }

    #[test]
    fn values_run_cannot_use_are_refused_at_their_position() {
        let dir = Dir::new();
        std::fs::create_dir(dir.0.path().join("sub")).expect("mkdir");
        std::fs::write(dir.0.path().join("file"), "").expect("write");
        let long = "a".repeat(100);
        // (config, marker, what the message says)
        let rows: Vec<(String, &str, Vec<&str>)> = vec![
            (
                format!("control_socket = \"\"\n{LISTEN}{APP}"),
                "\"\"",
                vec!["empty", "(key `control_socket`)"],
            ),
            (
                format!("control_socket = \"sub\"\n{LISTEN}{APP}"),
                "\"sub\"",
                vec!["`control_socket`", "sub is a directory"],
            ),
            (
                format!("control_socket = \"sub/\"\n{LISTEN}{APP}"),
                "\"sub/\"",
                vec!["`control_socket`", "is a directory"],
            ),
            (
                format!("control_socket = \"{long}\"\n{LISTEN}{APP}"),
                "\"aaa",
                vec![
                    "`control_socket`",
                    "bytes once made absolute",
                    "at most 107",
                ],
            ),
            (
                format!("control_socket = \"a\\u0000b\"\n{LISTEN}{APP}"),
                "\"a",
                vec!["NUL", "(key `control_socket`)"],
            ),
            (
                format!("{LISTEN}{APP}[logs]\nstdout = \"\"\n"),
                "\"\"",
                vec!["empty", "(key `stdout` in [logs])"],
            ),
            (
                format!("{LISTEN}{APP}[logs]\nstderr = \"sub\"\n"),
                "\"sub\"",
                vec!["[logs] `stderr`", "is a directory"],
            ),
            (
                format!("{LISTEN}{APP}[logs]\nholdfast_log = \"..\"\n"),
                "\"..\"",
                vec!["[logs] `holdfast_log`", "is a directory"],
            ),
            (
                format!("{LISTEN}{APP}[logs]\nstdout = \"new/\"\n"),
                "\"new/\"",
                vec!["[logs] `stdout`", "is a directory"],
            ),
            (
                format!("{LISTEN}[app]\ncommand = [\"x\", \"\\u0000\"]\n"),
                "[\"x\"",
                vec!["`command`", "argv[1]", "NUL", "(in [app])"],
            ),
            (
                format!("{LISTEN}{APP}env = {{ A = \"a\\u0000\" }}\n"),
                "\"a\\u0000\"",
                vec!["[app] `env` `A`", "NUL"],
            ),
            (
                format!("{LISTEN}{APP}env = {{ \"A\\u0000\" = \"a\" }}\n"),
                "\"A\\u0000\"",
                vec!["[app] `env`", "NUL"],
            ),
            (
                format!("{LISTEN}{APP}[app.env]\nOK = \"1\"\n\"A=B\" = \"a\"\n"),
                "\"A=B\"",
                vec!["[app] `env`", "`A=B`", "`=`"],
            ),
            (
                format!("{LISTEN}{APP}env = {{ \"\" = \"a\" }}\n"),
                "\"\" =",
                vec!["[app] `env`", "empty"],
            ),
            (
                format!("{LISTEN}{APP}cwd = \"nowhere\"\n"),
                "\"nowhere\"",
                vec!["[app] `cwd`", "nowhere does not exist"],
            ),
            (
                format!("{LISTEN}{APP}cwd = \"file\"\n"),
                "\"file\"",
                vec!["[app] `cwd`", "is not a directory"],
            ),
            (
                format!("{LISTEN}{APP}ready_path = \"health\"\n"),
                "\"health\"",
                vec!["`ready_path`", "start with `/`"],
            ),
            (
                format!("{LISTEN}{APP}ready_path = \"/a b\"\n"),
                "\"/a b\"",
                vec!["`ready_path`", "whitespace"],
            ),
            (
                format!("{LISTEN}{APP}ready_path = \"/a\\nHost: x\"\n"),
                "\"/a",
                vec!["`ready_path`", "control character"],
            ),
            (
                format!("{LISTEN}{APP}ready_path = \"/é\"\n"),
                "\"/",
                vec!["`ready_path`", "non-ASCII"],
            ),
            (
                format!("[[listen]]\naddress = \"unix:{long}.sock\"\n{APP}"),
                "\"unix:",
                vec!["[[listen]] `address`", "at most 107"],
            ),
            (
                format!("[[listen]]\naddress = \"unix:a\\u0000\"\n{APP}"),
                "\"unix:",
                vec!["NUL", "(key `address` in [[listen]])"],
            ),
            (
                format!("[[listen]]\naddress = \"unix:sub\"\n{APP}"),
                "\"unix:sub\"",
                vec!["[[listen]] `address`", "is a directory"],
            ),
            (
                format!("[[listen]]\naddress = \"systemd:a:b\"\n{APP}"),
                "\"systemd",
                vec!["`:`", "(key `address` in [[listen]])"],
            ),
            (
                format!("[[listen]]\nname = \"\"\naddress = \"127.0.0.1:1\"\n{APP}"),
                "\"\"",
                vec!["listen name", "empty", "(key `name` in [[listen]])"],
            ),
            (
                format!("[[listen]]\nname = \"a:b\"\naddress = \"127.0.0.1:1\"\n{APP}"),
                "\"a:b\"",
                vec!["listen name", "`:`"],
            ),
            (
                format!("[[listen]]\nname = \"holdfast-probe\"\naddress = \"127.0.0.1:1\"\n{APP}"),
                "\"holdfast-probe\"",
                vec!["listen name", "probe"],
            ),
            (
                format!(
                    "[[listen]]\nname = \"{}\"\naddress = \"127.0.0.1:1\"\n{APP}",
                    "n".repeat(256)
                ),
                "\"nnn",
                vec!["listen name", "255 bytes"],
            ),
            (
                format!("[[listen]]\nname = \"a\\u007f\"\naddress = \"127.0.0.1:1\"\n{APP}"),
                "\"a",
                vec!["listen name", "control character"],
            ),
            (
                format!("[[listen]]\naddress = \"unix:a.sock\"\nmode = \"+660\"\n{APP}"),
                "\"+660\"",
                vec!["mode `+660`", "octal", "(key `mode` in [[listen]])"],
            ),
            (
                format!("[[listen]]\naddress = \"unix:a.sock\"\nmode = \"\"\n{APP}"),
                "\"\"",
                vec!["mode ``", "octal"],
            ),
            (
                format!("[[listen]]\naddress = \"unix:a.sock\"\nmode = \"017777\"\n{APP}"),
                "\"017777\"",
                vec!["mode `017777`", "octal"],
            ),
            (
                format!("[[listen]]\naddress = \"unix:a.sock\"\nmode = \"0o8\"\n{APP}"),
                "\"0o8\"",
                vec!["mode `0o8`", "octal"],
            ),
            (
                format!("[[listen]]\naddress = \"unix:a.sock\"\nmode = \"0555\"\n{APP}"),
                "\"0555\"",
                vec!["mode `0555`", "write permission"],
            ),
            (
                format!("{LISTEN}{APP}drain_timeout = \"soon\"\n"),
                "\"soon\"",
                vec!["`drain_timeout` = \"soon\" is not a duration", "(in [app])"],
            ),
        ];
        let memory = |limit: &str| format!("{LISTEN}{APP}[memory]\nlimit = {limit}\n");
        dir.assert_fails(
            &memory("-1"),
            "-1",
            &[
                "invalid value: integer `-1`",
                "a size like",
                "(key `limit` in [memory])",
            ],
        );
        dir.assert_fails(
            &memory("\"lots\""),
            "\"lots\"",
            &["`limit` = \"lots\" is not a size", "(in [memory])"],
        );
        dir.assert_fails(
            &memory("1048575"),
            "1048575",
            &["`limit` = 1048575 is below the minimum of 1MiB"],
        );
        let c = dir
            .load(&memory("1048576"), &Overrides::default())
            .expect("bytes");
        assert_eq!(
            c.memory.and_then(|m| m.limit),
            Some(bytesize::ByteSize::mib(1))
        );
        for (text, marker, says) in &rows {
            dir.assert_fails(text, marker, says);
        }
    }

    #[test]
    fn relations_between_keys_name_both_keys_and_positions() {
        let dir = Dir::new();
        let two = |second: &str| format!("{LISTEN}[[listen]]\n{second}\n{APP}");
        // (config, marker, what the message says)
        let rows: Vec<(String, &str, Vec<&str>)> = vec![
            (format!("{LISTEN}{APP}workers = 3\nmax_workers = 2\n"), "workers = |3", vec!["[app] `workers` = 3", "`max_workers` = 2 (7:15)"]),
            (format!("{LISTEN}{APP}workers = 300\n"), "workers = |300", vec!["`workers` = 300", "`max_workers` = 256 (the default)"]),
            (format!("{LISTEN}{APP}ready_listeners = [\"http\", \"nope\"]\n"), "\"nope\"", vec!["[app] `ready_listeners` names `nope`", "(names: http)"]),
            (format!("{LISTEN}{APP}ready_listeners = []\n"), "[]", vec!["[app] `ready_listeners` is empty"]),
            (two("name = \"http\"\naddress = \"127.0.0.1:2\""), "\"http\"\naddress = \"127.0.0.1:2", vec!["named `http`", "[[listen]] `http` (2:8)"]),
            (two("address = \"127.0.0.1:2\"\n[[listen]]\nname = \"listen1\"\naddress = \"127.0.0.1:3\""), "\"listen1\"", vec!["named `listen1`", "[[listen]] `listen1` (4:1)"]),
            (two("name = \"b\"\naddress = \"127.0.0.1:1\""), "\"127.0.0.1:1\"\n[app]", vec!["address 127.0.0.1:1 is listed twice", "`http` (2:8)", "`b` (5:8)"]),
            (format!("[[listen]]\naddress = \"unix:a.sock\"\n[[listen]]\naddress = \"unix:./a.sock\"\n{APP}"), "\"unix:./", vec!["is listed twice", "`listen0` (1:1)"]),
            (two("name = \"any\"\naddress = \"0.0.0.0:1\""), "\"0.0.0.0:1\"", vec!["`any`", "`http` (2:8)", "cannot both be bound"]),
            (format!("[[listen]]\naddress = \"[::]:5\"\n[[listen]]\naddress = \"[::1]:5\"\n{APP}"), "\"[::1]", vec!["cannot both be bound"]),
            (format!("[[listen]]\nname = \"h\"\naddress = \"127.0.0.1:1\"\nmode = \"0660\"\n{APP}"), "\"0660\"", vec!["`mode` is for unix sockets only", "127.0.0.1:1"]),
            (format!("control_socket = \"a.sock\"\n[[listen]]\nname = \"u\"\naddress = \"unix:a.sock\"\n{APP}"), "\"a.sock\"", vec!["`control_socket`", "a.sock is also the path of [[listen]] `u` (3:8)"]),
            (format!("[[listen]]\naddress = \"unix:holdfast.sock\"\n{APP}"), "\"unix:", vec!["`control_socket`", "(the default)", "[[listen]] `listen0`"]),
            (format!("metrics_listen = \"0.0.0.0:1\"\n{LISTEN}{APP}"), "\"0.0.0.0:1\"", vec!["`metrics_listen` 0.0.0.0:1", "[[listen]] `http` (3:8)"]),
            (format!("{LISTEN}{APP}[memory]\ngrace = 2\n"), "[memory]", vec!["[memory] needs `limit` or `max_lifetime`"]),
            (format!("{LISTEN}{APP}ready = \"delay\"\nready_delay = \"2m\"\n"), "\"2m\"", vec!["`ready_delay` = 2m (7:15)", "`ready_timeout` = 1m (the default)"]),
            (format!("{LISTEN}{APP}ready = \"delay\"\nready_timeout = \"1s\"\n"), "\"1s\"", vec!["`ready_delay` = 1s (the default)", "`ready_timeout` = 1s (7:17)"]),
        ];
        for (text, marker, says) in &rows {
            dir.assert_fails(text, marker, says);
        }
        // ready_delay at or above ready_timeout is fine unless ready = "delay".
        dir.load(
            &format!("{LISTEN}{APP}ready_delay = \"2m\"\n"),
            &Overrides::default(),
        )
        .expect("notify ignores ready_delay");
        // Port 0 is the kernel's pick: never a clash.
        dir.load(
            &format!("metrics_listen = \"127.0.0.1:0\"\n[[listen]]\naddress = \"127.0.0.1:0\"\n[[listen]]\naddress = \"0.0.0.0:0\"\n{APP}"),
            &Overrides::default(),
        )
        .expect("port 0 twice");
    }

    #[test]
    fn the_command_line_is_related_to_the_file() {
        let dir = Dir::new();
        let o = |workers: Option<u32>, listen: &[&str]| Overrides {
            workers,
            listen: listen.iter().map(|a| a.parse().expect("address")).collect(),
            command: Vec::new(),
        };
        let origin = format!("config {}: ", dir.path().display());
        let text = format!("{LISTEN}{APP}max_workers = 2\n");
        let e = dir.error(&text, &o(Some(3), &[]));
        assert_eq!(
            e,
            format!("{origin}--workers 3 is above `max_workers` = 2 (6:15); raise max_workers if you mean it")
        );
        let e = dir.error(&format!("{LISTEN}{APP}"), &o(Some(0), &[]));
        assert_eq!(e, format!("{origin}--workers must be at least 1"));
        // --workers may fix the file's own `workers`.
        let c = dir
            .load(
                &format!("{LISTEN}{APP}workers = 3\nmax_workers = 2\n"),
                &o(Some(2), &[]),
            )
            .expect("--workers 2 is within max_workers");
        assert_eq!(c.app.workers.get(), 2);
        // --listen replaces [[listen]]: ready_listeners must name its listeners.
        let text = format!("{LISTEN}{APP}ready_listeners = [\"http\"]\n");
        dir.assert_fails_with(
            &text,
            &o(None, &["127.0.0.1:5"]),
            "\"http\"]",
            &["names `http`", "--listen replaces [[listen]]"],
        );
        let e = dir.error(APP, &o(None, &["127.0.0.1:5", "127.0.0.1:5"]));
        assert_eq!(e, format!("{origin}address 127.0.0.1:5 is listed twice: --listen 127.0.0.1:5 and --listen 127.0.0.1:5"));
        let long = format!("unix:{}", "a".repeat(100));
        let e = dir.error(APP, &o(None, &[&long]));
        assert!(
            e.starts_with(&format!("{origin}--listen {long}: ")) && e.contains("at most 107"),
            "{e}"
        );
        let e = dir.error("", &o(None, &["127.0.0.1:5"]));
        assert!(e.starts_with(&format!("{origin}no [app] command")), "{e}");
    }

    #[test]
    fn a_long_config_directory_is_refused_for_the_default_control_socket() {
        let deep = PathBuf::from(format!("/{}/h.toml", "d".repeat(100)));
        let f = parse(&deep, &format!("{LISTEN}{APP}")).expect("parses");
        let e = Config::build(Some(&deep), Some(f), &Overrides::default())
            .expect_err("too long")
            .to_string();
        assert!(
            e.starts_with(&format!(
                "config {}: the control socket next to the config file: ",
                deep.display()
            )),
            "{e}"
        );
        assert!(e.contains("set `control_socket`"), "{e}");
    }

    #[test]
    fn accepted_values_come_out_as_written() {
        let dir = Dir::new();
        std::fs::create_dir(dir.0.path().join("app")).expect("mkdir");
        let c = dir
            .load(
                "control_socket = \"run/ctl.sock\"\n[[listen]]\nname = \"u\"\naddress = \"unix:a.sock\"\nmode = \"0o660\"\nbacklog = 7\n[app]\ncommand = [\"x\", \"\"]\ncwd = \"app\"\nenv = { A = \"\", B = \"b=c\" }\nready_path = \"/up?x=%20\"\nready_listeners = [\"u\"]\n[memory]\nlimit = \"1.5GiB\"\n[logs]\nstdout = \"log/out\"\n",
                &Overrides::default(),
            )
            .expect("valid");
        let d = dir.0.path();
        assert_eq!(c.control_socket, d.join("run/ctl.sock"));
        assert_eq!(c.listen[0].mode, Some(0o660));
        assert_eq!(c.listen[0].backlog, 7);
        assert_eq!(c.app.cwd, Some(d.join("app")));
        assert_eq!(c.app.env.get("B").map(String::as_str), Some("b=c"));
        assert_eq!(c.app.ready_path, "/up?x=%20");
        assert_eq!(c.app.ready_listeners, Some(vec!["u".to_string()]));
        assert_eq!(c.logs.stdout, Some(d.join("log/out")));
        assert_eq!(
            c.memory.and_then(|m| m.limit),
            Some(bytesize::ByteSize::mib(1536))
        );
    }

    #[test]
    fn modes_are_octal_with_write_permission_for_someone() {
        let mode = |s: &str| Mode::deserialize(toml::Value::String(s.into())).map(|m| m.0);
        for (written, want) in [
            ("0660", 0o660),
            ("660", 0o660),
            ("0o600", 0o600),
            ("00666", 0o666),
            ("07777", 0o7777),
            ("0200", 0o200),
        ] {
            assert_eq!(mode(written).ok(), Some(want), "{written}");
        }
        for refused in [
            "", "0o", "+660", "-660", "0x1b6", "0_660", " 660", "017777", "0444", "0",
        ] {
            assert!(mode(refused).is_err(), "{refused:?} must be refused");
        }
    }

    #[test]
    fn bounds_are_written_as_humantime_and_sizes_read_them() {
        assert_eq!(fmt_ms(100), "100ms");
        assert_eq!(fmt_ms(SECOND), "1s");
        assert_eq!(fmt_ms(DAY), "24h");
        assert_eq!(fmt_ms(YEAR), "365days");
        for ms in [100, SECOND, DAY, YEAR] {
            assert_eq!(
                humantime::parse_duration(&fmt_ms(ms)).ok(),
                Some(Duration::from_millis(ms))
            );
        }
        assert_eq!(fmt_bytes(MIB), "1MiB");
        assert_eq!(fmt_bytes(PIB), "1PiB");
        for b in [MIB, PIB] {
            assert_eq!(
                fmt_bytes(b)
                    .parse::<bytesize::ByteSize>()
                    .map(|s| s.as_u64()),
                Ok(b)
            );
        }
    }
}
