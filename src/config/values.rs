//! The value types of the config: addresses, signal names, argv, modes,
//! ready modes and hand-off kinds, each parsed and checked on its own.

use super::*;

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
pub(super) const UNIX_PATH_MAX: usize = 107;

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
pub(super) fn fd_name_problem(name: &str) -> Option<&'static str> {
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
pub(super) struct Catchable(pub(super) SignalName);

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
pub(crate) const OWN_ENV: &[&str] = &[
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
pub(crate) fn is_own_env(name: &str) -> bool {
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
        match argv_problem(&v) {
            Some(p @ ArgvProblem::Empty) => Err(D::Error::custom(format!("command {p}"))),
            Some(p) => Err(D::Error::custom(format!("`command` {p}"))),
            None => Ok(Argv(v)),
        }
    }
}

/// Why an argv cannot be exec'd, if it cannot: the file's `command` and the
/// command line's (after `--`) are held to the same rules.
pub(super) enum ArgvProblem {
    Empty,
    Nul { index: usize, arg: String },
}

impl fmt::Display for ArgvProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgvProblem::Empty => f.write_str(
                "is empty; give the program and its arguments, e.g. [\"bundle\", \"exec\", \"puma\"]",
            ),
            ArgvProblem::Nul { index, arg } => write!(
                f,
                "argv[{index}] {arg:?} contains a NUL byte; execve(2) takes C strings, which end at the first NUL"
            ),
        }
    }
}

pub(super) fn argv_problem(v: &[String]) -> Option<ArgvProblem> {
    if v.first().map_or(true, String::is_empty) {
        return Some(ArgvProblem::Empty);
    }
    v.iter()
        .enumerate()
        .find(|(_, a)| a.contains('\0'))
        .map(|(index, arg)| ArgvProblem::Nul {
            index,
            arg: arg.clone(),
        })
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
