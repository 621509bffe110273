//! Reading and building a [`Config`]: the file against the command line
//! (`--workers`, `--listen`), and the tables against each other (listener
//! names and addresses, the control socket, metrics).

use super::*;

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
                let bytes = std::fs::read(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Some(parse(p, &utf8(p, bytes)?)?)
            }
            None => None,
        };
        Self::build(path, file, overrides)
    }

    /// Applies `o` to `file` and checks what relates the two, and the
    /// tables to each other. An error names the file position of the key it
    /// is about, or the command-line option.
    pub(super) fn build(
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
                message: one_line(message),
            },
            _ => ConfigError::Invalid {
                origin: origin.clone(),
                message: one_line(message),
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
        if let (false, Some(p)) = (o.command.is_empty(), argv_problem(&o.command)) {
            return Err(refuse(Refusal::cli(format!("the command after `--` {p}"))));
        }
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
pub(super) struct Refusal {
    pub(super) at: Option<At>,
    pub(super) message: String,
}

impl Refusal {
    pub(super) fn at(at: Option<At>, message: impl Into<String>) -> Refusal {
        Refusal {
            at,
            message: message.into(),
        }
    }

    pub(super) fn cli(message: impl Into<String>) -> Refusal {
        Refusal::at(None, message)
    }
}

/// Applies `--workers` and bounds `workers` by `max_workers`.
pub(super) fn set_workers(
    app: &mut AppConfig,
    cli: Option<u32>,
    places: &Places,
) -> Result<(), Refusal> {
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
pub(super) struct Listeners {
    pub(super) list: Vec<Listen>,
    pub(super) at: Vec<Option<ListenAt>>,
}

impl Listeners {
    pub(super) fn from_command_line(
        addresses: &[Address],
        base: &Path,
    ) -> Result<Listeners, Refusal> {
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
    pub(super) fn describe(&self, i: usize) -> String {
        let l = &self.list[i];
        match self.at[i] {
            Some(at) => format!("[[listen]] `{}` ({})", l.name, at.name.unwrap_or(at.entry)),
            None => format!("--listen {}", l.address),
        }
    }

    /// At least one; names and addresses apart.
    pub(super) fn check(&self) -> Result<(), Refusal> {
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
    pub(super) fn check_ready(
        &self,
        names: &[String],
        at: &[At],
        cli: bool,
    ) -> Result<(), Refusal> {
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
    pub(super) fn check_control_socket(&self, path: &Path, at: Option<At>) -> Result<(), Refusal> {
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
    pub(super) fn check_metrics(&self, metrics: SocketAddr, at: Option<At>) -> Result<(), Refusal> {
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
    pub(super) fn unix_path(&self) -> Option<&Path> {
        match self {
            Address::Unix(p) => Some(p),
            _ => None,
        }
    }
}

/// The LISTEN_FDNAMES name of the private readiness probe socket.
pub(crate) const PROBE_NAME: &str = "holdfast-probe";

pub(super) fn absolute(base: &Path, a: Address) -> Address {
    match a {
        Address::Unix(p) if p.is_relative() => Address::Unix(base.join(p)),
        other => other,
    }
}

/// The control socket when the config does not name one: next to the config
/// file, else in `$XDG_RUNTIME_DIR`, else `/run/holdfast/`.
pub(crate) fn default_control_socket(config: Option<&Path>) -> PathBuf {
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
            message: one_line(message),
        }
    })?;
    raw.check(&Source {
        path,
        text,
        base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
    })
}

/// The file's text; bytes that are not UTF-8 (TOML files are UTF-8) are an
/// error at their line and column, like any other.
pub(super) fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let text = std::str::from_utf8(&bytes[..valid]).unwrap_or_default();
        let (line, column) = line_col(text, valid);
        let bad: Vec<String> = bytes[valid..]
            .iter()
            .take(e.utf8_error().error_len().unwrap_or(bytes.len() - valid).min(4))
            .map(|b| format!("0x{b:02x}"))
            .collect();
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: format!(
                "byte {} is not UTF-8; a TOML file is UTF-8 text (was it saved in another encoding?)",
                bad.join(" ")
            ),
        }
    })
}

/// Where `offset` is in the TOML: "key `workers` in [app]", or "in [app]"
/// when the key is not known or `message` already names it. serde's messages
/// for a bad value ("invalid type: string \"two\", expected a nonzero u32")
/// do not say which key they are about.
pub(super) fn place(text: &str, offset: usize, message: &str) -> Option<String> {
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

/// `message` on one line: control characters (a `"\n"` in a TOML string is
/// a newline in the value a message quotes) and line separators written as
/// Rust escapes, so an error is one line in a terminal, a log and journald.
pub(super) fn one_line(message: String) -> String {
    if !message.chars().any(breaks_line) {
        return message;
    }
    message
        .chars()
        .map(|c| match breaks_line(c) {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

fn breaks_line(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{85}')
}

pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the closest `a`/`b`.
pub(super) fn suggest(message: &str) -> Option<String> {
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
