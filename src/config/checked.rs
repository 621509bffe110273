//! Checked types for the file's values: every duration, count and size
//! within its key's [`Bounds`], and strings (paths, listener names, ready
//! paths) that are not empty and have no NUL byte. Their `Deserialize`
//! refuses a bad value, so toml attaches the value's span to the error.

use super::*;

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
pub(super) trait Bounds {
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
        pub(super) struct $name;
        impl Bounds for $name {
            const KEY: &'static str = $key;
            const MIN: u64 = $min;
            const MAX: u64 = $max;
            const WHY: &'static str = $why;
            $(const NONZERO: bool = $nz;)?
        }
    )+};
}

pub(super) const SECOND: u64 = 1000;
pub(super) const MINUTE: u64 = 60 * SECOND;
pub(super) const HOUR: u64 = 60 * MINUTE;
pub(super) const DAY: u64 = 24 * HOUR;
pub(super) const YEAR: u64 = 365 * DAY;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;
pub(super) const TIB: u64 = 1 << 40;
pub(super) const PIB: u64 = 1 << 50;

/// The most workers holdfast runs: the ceiling of `workers`, `max_workers`
/// and `max_surge`.
pub(crate) const WORKERS_CEILING: u32 = 65_536;

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
pub(super) fn out_of_range<B: Bounds>(written: &str, below: bool, bound: &str) -> String {
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
pub(super) struct Dur<B>(pub(super) Duration, PhantomData<B>);

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
pub(super) fn fmt_ms(ms: u64) -> String {
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
pub(super) struct Count<B>(pub(super) u32, PhantomData<B>);

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
    pub(super) fn nonzero(&self) -> NonZeroU32 {
        NonZeroU32::new(self.0).unwrap_or(NonZeroU32::MIN)
    }
}

/// A size ("512MiB", "1.5GiB", "300MB", or bytes) within `B`'s range.
pub(super) struct Size<B>(pub(super) bytesize::ByteSize, PhantomData<B>);

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
pub(super) struct SizeVisitor<B>(pub(super) PhantomData<B>);

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
pub(super) fn fmt_bytes(bytes: u64) -> String {
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
pub(super) struct PathValue(pub(super) PathBuf);

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
pub(super) struct ListenName(pub(super) String);

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
pub(super) struct ReadyPath(pub(super) String);

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
