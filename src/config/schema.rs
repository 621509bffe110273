//! The public, validated config types that the rest of holdfast reads.

use super::*;

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

pub(super) fn default_backlog() -> u32 {
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

pub(super) fn default_workers() -> NonZeroU32 {
    NonZeroU32::MIN
}
/// The default bound on the worker count.
pub(crate) const DEFAULT_MAX_WORKERS: u32 = 256;
pub(super) fn default_max_workers() -> NonZeroU32 {
    NonZeroU32::new(DEFAULT_MAX_WORKERS).unwrap_or(NonZeroU32::MAX)
}
pub(super) fn default_handoff() -> Vec<Handoff> {
    vec![Handoff::Systemd, Handoff::ServerStarter, Handoff::Einhorn]
}
pub(super) fn default_ready_delay() -> Duration {
    Duration::from_secs(1)
}
pub(super) fn default_ready_path() -> String {
    "/".into()
}
pub(super) fn default_ready_timeout() -> Duration {
    Duration::from_secs(60)
}
pub(super) fn default_drain_signal() -> SignalName {
    SignalName(Signal::SIGTERM)
}
pub(super) fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn default_max_surge() -> u32 {
    1
}
pub(super) fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}

/// `[app]` for a command given on the command line: every default.
pub(super) fn default_app(command: Argv) -> AppConfig {
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

pub(super) fn default_interval() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn default_grace() -> u32 {
    3
}
pub(super) fn default_min_lifetime() -> Duration {
    Duration::from_secs(60)
}
pub(super) fn default_child_signal() -> SignalName {
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

pub(super) fn default_true() -> bool {
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
    pub(super) at: Places,
}

/// What the command line may say instead of, or on top of, the file.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, Deserialize)]
pub struct Overrides {
    pub listen: Vec<Address>,
    pub workers: Option<u32>,
    pub command: Vec<String>,
}

/// The validated configuration holdfast runs with. It serializes: an
/// in-place upgrade hands the running config over as it is (the file may
/// have changed since it was read).
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
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
