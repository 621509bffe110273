//! The file as written: private raw structs of checked types, kept
//! [`Spanned`] so that every error names file:line:col, and their
//! conversion into the public types.

use super::*;

// ---------------------------------------------------------------------------
// Positions

/// A place in the config file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct At {
    pub(super) line: usize,
    pub(super) column: usize,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// " (7:11)" for a key written in the file, " (the default)" otherwise.
pub(super) fn written(at: Option<At>) -> String {
    match at {
        Some(a) => format!(" ({a})"),
        None => " (the default)".into(),
    }
}

/// Where the keys that [`Config::build`] relates to each other were written.
#[derive(Debug, Clone, Default)]
pub(super) struct Places {
    pub(super) control_socket: Option<At>,
    pub(super) metrics_listen: Option<At>,
    /// One per `[[listen]]` entry, in order.
    pub(super) listen: Vec<ListenAt>,
    pub(super) workers: Option<At>,
    pub(super) max_workers: Option<At>,
    /// One per `ready_listeners` name, in order.
    pub(super) ready_listeners: Vec<At>,
}

/// Where one `[[listen]]` entry was written: its header, its name (unless
/// defaulted) and its address.
#[derive(Debug, Clone, Copy)]
pub(super) struct ListenAt {
    pub(super) entry: At,
    pub(super) name: Option<At>,
    pub(super) address: At,
}

/// The text being parsed: turns spans into positions and errors, and
/// relative paths into absolute ones.
pub(super) struct Source<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
    /// The file's directory.
    pub(super) base: PathBuf,
}

impl Source<'_> {
    pub(super) fn at(&self, span: Range<usize>) -> At {
        let (line, column) = line_col(self.text, span.start);
        At { line, column }
    }

    pub(super) fn error(&self, span: Range<usize>, message: String) -> ConfigError {
        let At { line, column } = self.at(span);
        ConfigError::Parse {
            path: self.path.to_path_buf(),
            line,
            column,
            message: one_line(message),
        }
    }

    pub(super) fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_relative() {
            self.base.join(p)
        } else {
            p
        }
    }
}

/// Why `p` (absolute) cannot be a unix socket's path, if it cannot.
pub(super) fn socket_path_problem(p: &Path) -> Option<String> {
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
pub(super) fn file_path_problem(p: &Path) -> Option<String> {
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
pub(super) fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

/// Whether two TCP listeners cannot both be bound: the same address, or the
/// same port (not 0, which the kernel picks) where one is the wildcard of the
/// other's family (IPV6_V6ONLY is set, so the families are apart).
pub(super) fn tcp_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

// ---------------------------------------------------------------------------
// The file as written

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) control_socket: Option<Spanned<PathValue>>,
    pub(super) metrics_listen: Option<Spanned<SocketAddr>>,
    #[serde(default)]
    pub(super) listen: Vec<Spanned<RawListen>>,
    pub(super) app: Option<Spanned<RawApp>>,
    pub(super) memory: Option<Spanned<RawMemory>>,
    pub(super) logs: Option<RawLogs>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) name: Option<Spanned<ListenName>>,
    pub(super) address: Spanned<Address>,
    pub(super) backlog: Option<Count<Backlog>>,
    pub(super) mode: Option<Spanned<Mode>>,
}

/// `[app]`; the fields in `AppConfig`'s order, which serde's "expected one
/// of" lists.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApp {
    pub(super) command: Argv,
    pub(super) workers: Option<Spanned<Count<Workers>>>,
    pub(super) cwd: Option<Spanned<PathValue>>,
    pub(super) env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub(super) handoff: Option<Vec<Handoff>>,
    pub(super) ready: Option<ReadyMode>,
    pub(super) ready_delay: Option<Spanned<Dur<ReadyDelay>>>,
    pub(super) ready_path: Option<ReadyPath>,
    pub(super) ready_timeout: Option<Spanned<Dur<ReadyTimeout>>>,
    pub(super) drain_signal: Option<Catchable>,
    pub(super) drain_timeout: Option<Dur<DrainTimeout>>,
    pub(super) max_surge: Option<Count<MaxSurge>>,
    pub(super) restart_backoff_max: Option<Dur<RestartBackoffMax>>,
    pub(super) max_workers: Option<Spanned<Count<MaxWorkers>>>,
    pub(super) ready_listeners: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMemory {
    pub(super) limit: Option<Size<MemoryLimit>>,
    pub(super) metric: Option<Metric>,
    pub(super) scope: Option<Scope>,
    pub(super) interval: Option<Dur<Interval>>,
    pub(super) grace: Option<Count<Grace>>,
    pub(super) min_lifetime: Option<Dur<MinLifetime>>,
    pub(super) child_signal: Option<SignalName>,
    pub(super) max_lifetime: Option<Dur<MaxLifetime>>,
    pub(super) lifetime_jitter: Option<Dur<LifetimeJitter>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLogs {
    pub(super) stdout: Option<Spanned<PathValue>>,
    pub(super) stderr: Option<Spanned<PathValue>>,
    pub(super) prefix: Option<bool>,
    pub(super) reopen_signal: Option<Catchable>,
    pub(super) holdfast_log: Option<Spanned<PathValue>>,
}

impl RawFile {
    pub(super) fn check(self, src: &Source<'_>) -> Result<FileConfig, ConfigError> {
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
    pub(super) fn check(self, src: &Source<'_>, at: &mut Places) -> Result<AppConfig, ConfigError> {
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
    pub(super) fn check(
        self,
        span: Range<usize>,
        src: &Source<'_>,
    ) -> Result<MemoryConfig, ConfigError> {
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
    pub(super) fn check(self, src: &Source<'_>) -> Result<LogsConfig, ConfigError> {
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
