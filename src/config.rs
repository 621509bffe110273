//! The configuration: TOML schema, defaults, validation, and errors that name
//! the file, line and column.
//!
//! Validation happens while deserializing (every checked value is a type whose
//! `Deserialize` refuses bad input), so toml attaches the exact span to every
//! error and there is no second pass that could forget to report a position.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;

/// Every config problem, with where it was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
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

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a path, e.g. \"unix:/run/app.sock\"".into());
            }
            if path.len() >= 108 {
                return Err(format!(
                    "unix socket path {path} is {} bytes; the kernel allows at most 107",
                    path.len()
                ));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(name) = s.strip_prefix("systemd:") {
            if name.is_empty() {
                return Err("`systemd:` needs the socket's FileDescriptorName".into());
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
        s.parse().map_err(serde::de::Error::custom)
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
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_start_matches("SIG"))
    }
}

/// A command line: never empty, never run through a shell.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Argv(pub Vec<String>);

impl<'de> Deserialize<'de> for Argv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        if v.is_empty() || v[0].is_empty() {
            return Err(serde::de::Error::custom(
                "command is empty; give the program and its arguments, e.g. [\"bundle\", \"exec\", \"puma\"]",
            ));
        }
        Ok(Argv(v))
    }
}

/// A unix file mode written as an octal string, e.g. "0660".
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
        match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o7777 => Ok(Mode(m)),
            _ => Err(serde::de::Error::custom(format!(
                "mode `{s}` is not an octal file mode like \"0660\""
            ))),
        }
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub name: Option<String>,
    pub address: Address,
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    pub mode: Option<Mode>,
}

fn default_backlog() -> u32 {
    1024
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub command: Argv,
    #[serde(default = "default_workers")]
    pub workers: NonZeroU32,
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
    /// ready; `None`: every listener it is given.
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

/// `[memory]`: recycling bloated and old workers.
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

/// `[logs]`: where workers' stdout/stderr go.
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

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub control_socket: Option<PathBuf>,
    /// Prometheus text format at `/metrics`; off when unset.
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub listen: Vec<ListenConfig>,
    pub app: Option<AppConfig>,
    pub memory: Option<MemoryConfig>,
    pub logs: Option<LogsConfig>,
}

/// What the command line may say instead of, or on top of, the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Vec<Address>,
    pub workers: Option<u32>,
    pub command: Vec<String>,
}

/// A listener after defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Listen {
    pub name: String,
    pub address: Address,
    pub backlog: u32,
    pub mode: Option<u32>,
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

    fn build(
        path: Option<&Path>,
        file: Option<FileConfig>,
        o: &Overrides,
    ) -> Result<Config, ConfigError> {
        let origin = match path {
            Some(p) => p.display().to_string(),
            None => "(command line)".to_string(),
        };
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.clone(),
            message,
        };
        let base = path
            .and_then(|p| p.parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let file = file.unwrap_or(FileConfig {
            control_socket: None,
            metrics_listen: None,
            listen: Vec::new(),
            app: None,
            memory: None,
            logs: None,
        });

        let mut app = match (file.app, o.command.is_empty()) {
            (Some(mut app), false) => {
                app.command = Argv(o.command.clone());
                app
            }
            (Some(app), true) => app,
            (None, false) => cli_app(o.command.clone()),
            (None, true) => {
                return Err(invalid(
                    "no [app] command: add an [app] table with `command = [...]`, or give it after `--` on the command line".into(),
                ))
            }
        };
        if let Some(w) = o.workers {
            app.workers =
                NonZeroU32::new(w).ok_or_else(|| invalid("--workers must be at least 1".into()))?;
        }
        if app.workers > app.max_workers {
            return Err(invalid(format!(
                "[app] workers = {} is above max_workers = {} (raise max_workers if you mean it)",
                app.workers, app.max_workers
            )));
        }
        if let Some(cwd) = &app.cwd {
            if cwd.is_relative() {
                app.cwd = Some(base.join(cwd));
            }
        }
        if !app.ready_path.starts_with('/') {
            return Err(invalid(format!(
                "ready_path `{}` must start with `/`",
                app.ready_path
            )));
        }

        let listen: Vec<Listen> = if o.listen.is_empty() {
            file.listen
                .into_iter()
                .enumerate()
                .map(|(i, l)| Listen {
                    name: l.name.unwrap_or_else(|| format!("listen{i}")),
                    address: absolute(&base, l.address),
                    backlog: l.backlog,
                    mode: l.mode.map(|m| m.0),
                })
                .collect()
        } else {
            o.listen
                .iter()
                .enumerate()
                .map(|(i, a)| Listen {
                    name: format!("listen{i}"),
                    address: absolute(&base, a.clone()),
                    backlog: default_backlog(),
                    mode: None,
                })
                .collect()
        };
        if listen.is_empty() {
            return Err(invalid(
                "no listening socket: add a [[listen]] entry with an `address`, or `--listen ADDR`"
                    .into(),
            ));
        }
        for (i, l) in listen.iter().enumerate() {
            if l.name.is_empty() || l.name.contains(':') || l.name == PROBE_NAME {
                return Err(invalid(format!(
                    "listen name `{}` must be non-empty, without `:`, and not `{PROBE_NAME}`",
                    l.name
                )));
            }
            if let Some(dup) = listen[..i].iter().find(|m| m.name == l.name) {
                return Err(invalid(format!(
                    "two [[listen]] entries are named `{}` ({} and {})",
                    l.name, dup.address, l.address
                )));
            }
            if let Some(dup) = listen[..i].iter().find(|m| m.address == l.address) {
                return Err(invalid(format!(
                    "address {} is listed twice (`{}` and `{}`)",
                    l.address, dup.name, l.name
                )));
            }
            if l.mode.is_some() && !matches!(l.address, Address::Unix(_)) {
                return Err(invalid(format!(
                    "`mode` is for unix sockets only; {} is not one",
                    l.address
                )));
            }
        }
        if let Some(names) = &app.ready_listeners {
            for n in names {
                if !listen.iter().any(|l| &l.name == n) {
                    let known: Vec<&str> = listen.iter().map(|l| l.name.as_str()).collect();
                    return Err(invalid(format!(
                        "[app] ready_listeners names `{n}`, which is no [[listen]] name (names: {})",
                        known.join(", ")
                    )));
                }
            }
        }
        let control_socket = match file.control_socket {
            Some(p) if p.is_relative() => base.join(p),
            Some(p) => p,
            None => default_control_socket(path),
        };
        if let Some(m) = &file.memory {
            if m.limit.is_none() && m.max_lifetime.is_none() {
                return Err(invalid(
                    "[memory] needs `limit` or `max_lifetime` (or both)".into(),
                ));
            }
            if m.grace == 0 || m.interval.is_zero() {
                return Err(invalid(
                    "[memory] `grace` and `interval` must be above zero".into(),
                ));
            }
        }
        let mut logs = file.logs.unwrap_or_default();
        for p in [&mut logs.stdout, &mut logs.stderr, &mut logs.holdfast_log]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(Config {
            path: path.map(Path::to_path_buf),
            control_socket,
            metrics_listen: file.metrics_listen,
            listen,
            app,
            memory: file.memory,
            logs,
        })
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

fn cli_app(command: Vec<String>) -> AppConfig {
    // Deserializing an empty table gives exactly the documented defaults.
    let mut app: AppConfig = toml::from_str("command = [\"x\"]").unwrap_or_else(|e| {
        unreachable!("defaults must deserialize: {e}");
    });
    app.command = Argv(command);
    app
}

/// Parses `text` (the contents of `path`), turning toml's byte span into
/// line:column and suggesting the key that was probably meant.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
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
