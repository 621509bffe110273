//! The config loader: `Config::load` (what `check` and `run` both read a
//! file with) and `spec_of` (what both build from it before anything is
//! bound or spawned: the program resolved, the generation's spec).
//!
//! Inputs: arbitrary bytes; and structure-aware mutations of valid configs
//! (examples/*.toml and a config that sets every key): keys set to values
//! at and past the edges of their ranges or of the wrong type, removed,
//! misspelt, tables duplicated, then the text cut, spliced and salted with
//! TOML syntax and bytes that are not UTF-8; with or without the command
//! line's `--workers`, `--listen` and command. Properties:
//! - no panic, no hang (each case under the runner's time bound);
//! - every error names file:line:col (inside the file), or the keys or
//!   command-line options involved, in one line;
//! - whatever the loader accepts, run's start-up path accepts too: the spec
//!   builds (or the command's program is missing, which `check` says the
//!   same way), and the accepted config keeps every rule `run` relies on
//!   (listeners named apart, absolute paths, ranges, `workers <= max_workers`);
//! - the `holdfast check` binary gives the in-process verdict and message,
//!   and `holdfast run` exits 78 with the same line for a refused file.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use holdfast::config::{Address, Config, ConfigError, Overrides, ReadyMode};
use holdfast::fuzzing::spec_of;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use toml::Value;

use crate::support::{ensure, fuzz, Splice};

/// The seeds: the examples, and a config that sets every key.
fn seeds() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut out: Vec<String> = [
        "puma.toml",
        "puma-cluster.toml",
        "gunicorn.toml",
        "unicorn.toml",
        "uwsgi.toml",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")))
    .collect();
    out.push(
        r#"control_socket = "run/holdfast.sock"
metrics_listen = "127.0.0.1:9100"

[[listen]]
name = "http"
address = "127.0.0.1:8080"
backlog = 511

[[listen]]
name = "unix"
address = "unix:app.sock"
mode = "0660"

[app]
command = ["true", "--flag"]
workers = 3
cwd = "apps"
env = { RACK_ENV = "production", PATH = "/usr/bin:/bin" }
handoff = ["systemd", "server_starter", "einhorn", "unicorn"]
ready = "delay"
ready_delay = "2s"
ready_path = "/health"
ready_timeout = "30s"
drain_signal = "QUIT"
drain_timeout = "20s"
max_surge = 2
restart_backoff_max = "10s"
max_workers = 8
ready_listeners = ["http"]

[memory]
limit = "512MiB"
metric = "pss"
scope = "tree"
interval = "5s"
grace = 3
min_lifetime = "1m"
child_signal = "QUIT"
max_lifetime = "1h"
lifetime_jitter = "10m"

[logs]
stdout = "log/out.log"
stderr = "log/err.log"
prefix = true
reopen_signal = "USR1"
holdfast_log = "log/holdfast.log"
"#
        .to_string(),
    );
    out
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Duration,
    Count,
    Size,
    Address,
    MetricsAddr,
    Signal,
    Path,
    Name,
    Mode,
    Bool,
    Ready,
    Metric,
    Scope,
    Handoff,
    Argv,
    Env,
    ReadyPath,
    Names,
}

/// Every key of the schema: its table (`listen` is the array of tables), name and kind.
const KEYS: &[(&str, &str, Kind)] = &[
    ("", "control_socket", Kind::Path),
    ("", "metrics_listen", Kind::MetricsAddr),
    ("listen", "name", Kind::Name),
    ("listen", "address", Kind::Address),
    ("listen", "backlog", Kind::Count),
    ("listen", "mode", Kind::Mode),
    ("app", "command", Kind::Argv),
    ("app", "workers", Kind::Count),
    ("app", "cwd", Kind::Path),
    ("app", "env", Kind::Env),
    ("app", "handoff", Kind::Handoff),
    ("app", "ready", Kind::Ready),
    ("app", "ready_delay", Kind::Duration),
    ("app", "ready_path", Kind::ReadyPath),
    ("app", "ready_timeout", Kind::Duration),
    ("app", "drain_signal", Kind::Signal),
    ("app", "drain_timeout", Kind::Duration),
    ("app", "max_surge", Kind::Count),
    ("app", "restart_backoff_max", Kind::Duration),
    ("app", "max_workers", Kind::Count),
    ("app", "ready_listeners", Kind::Names),
    ("memory", "limit", Kind::Size),
    ("memory", "metric", Kind::Metric),
    ("memory", "scope", Kind::Scope),
    ("memory", "interval", Kind::Duration),
    ("memory", "grace", Kind::Count),
    ("memory", "min_lifetime", Kind::Duration),
    ("memory", "child_signal", Kind::Signal),
    ("memory", "max_lifetime", Kind::Duration),
    ("memory", "lifetime_jitter", Kind::Duration),
    ("logs", "stdout", Kind::Path),
    ("logs", "stderr", Kind::Path),
    ("logs", "prefix", Kind::Bool),
    ("logs", "reopen_signal", Kind::Signal),
    ("logs", "holdfast_log", Kind::Path),
];

fn s(v: &[&str]) -> Vec<Value> {
    v.iter().map(|x| Value::String((*x).to_string())).collect()
}

fn ints(v: &[i64]) -> Vec<Value> {
    v.iter().map(|x| Value::Integer(*x)).collect()
}

fn array(items: &[&[&str]]) -> Vec<Value> {
    items.iter().map(|a| Value::Array(s(a))).collect()
}

/// Values for a key of `kind`: at and past the edges of its range, of the
/// wrong shape, and generated ones.
fn values(kind: Kind) -> BoxedStrategy<Value> {
    let long_path = format!("unix:/{}", "a".repeat(110));
    let pool: Vec<Value> = match kind {
        Kind::Duration => s(&[
            "0s",
            "1ms",
            "99ms",
            "100ms",
            "250ms",
            "1s",
            "30s",
            "1m 30s",
            "24h",
            "24h 1ms",
            "86400001ms",
            "365days",
            "365days 1s",
            "500000000000years",
            "18446744073709551615s",
            "1.5s",
            "-1s",
            "",
            "30",
            "1ns",
            "1 fortnight",
        ])
        .into_iter()
        .chain(ints(&[30, 0]))
        .collect(),
        Kind::Count => ints(&[
            0,
            1,
            2,
            3,
            255,
            256,
            257,
            1000,
            1001,
            65535,
            65536,
            65537,
            2147483647,
            2147483648,
            4294967295,
            4294967296,
            -1,
            i64::MAX,
            i64::MIN,
        ])
        .into_iter()
        .chain([Value::Float(1.5), Value::String("2".into())])
        .collect(),
        Kind::Size => s(&[
            "1MiB",
            "1048575",
            "1 MiB",
            "1023KiB",
            "512MiB",
            "1.5GiB",
            "1PiB",
            "1025TiB",
            "1EiB",
            "16EiB",
            "NaN GiB",
            "inf B",
            "-1MiB",
            "",
            "1e3 MB",
            "0.0000001 PiB",
            "18446744073709551616",
        ])
        .into_iter()
        .chain(ints(&[0, 1048576, 1 << 50, (1 << 50) + 1, -1, i64::MAX]))
        .collect(),
        Kind::Address => s(&[
            "127.0.0.1:0",
            "127.0.0.1:8080",
            "0.0.0.0:8080",
            "[::1]:8080",
            "[::]:8080",
            "localhost:1",
            "127.0.0.1:65536",
            "127.0.0.1:-1",
            "unix:a.sock",
            "unix:./a.sock",
            "unix:sub/../a.sock",
            "unix:",
            &long_path,
            "unix:x\0y",
            "systemd:http",
            "systemd:",
            "systemd:a:b",
            "systemd:\n",
            "host:80",
            "[::1]",
            "127.0.0.1",
            " 127.0.0.1:80",
            "unix:holdfast.sock",
            "unix:run/holdfast.sock",
            "unix:apps",
        ]),
        Kind::MetricsAddr => s(&[
            "127.0.0.1:9100",
            "127.0.0.1:8080",
            "0.0.0.0:8080",
            "[::]:0",
            "unix:/x",
            "x",
            "",
        ]),
        Kind::Signal => s(&[
            "TERM",
            "SIGTERM",
            "QUIT",
            "KILL",
            "SIGKILL",
            "STOP",
            "sigstop",
            "usr1",
            "HUP",
            "RTMIN",
            "SIGRTMIN+1",
            "",
            "SIG",
            "TERM ",
            "WINCH",
            "CHLD",
        ]),
        Kind::Path => s(&[
            "a",
            "a/b",
            "",
            ".",
            "..",
            "/",
            "dir/",
            "./",
            "x\0y",
            "/tmp",
            "/nonexistent/dir/x",
            "apps",
            "h.toml",
            "log/x.log",
            "run/holdfast.sock",
            "app.sock",
        ])
        .into_iter()
        .chain([Value::String("a/".repeat(100))])
        .collect(),
        Kind::Name => s(&[
            "http",
            "",
            "a:b",
            "holdfast-probe",
            "\t",
            "listen0",
            "listen1",
            "é",
            "unix",
        ])
        .into_iter()
        .chain([Value::String("x".repeat(256))])
        .collect(),
        Kind::Mode => s(&[
            "0660", "0o660", "660", "0000", "0444", "7777", "17777", "-660", "0x1b6", "", "08",
        ])
        .into_iter()
        .chain(ints(&[660]))
        .collect(),
        Kind::Bool => vec![
            Value::Boolean(true),
            Value::Boolean(false),
            Value::String("true".into()),
        ],
        Kind::Ready => s(&["notify", "delay", "probe", "Notify", ""]),
        Kind::Metric => s(&["rss", "pss", "uss", "RSS"]),
        Kind::Scope => s(&["tree", "process", "x"]),
        Kind::Handoff => array(&[
            &[],
            &["systemd"],
            &["systemd", "server_starter", "einhorn", "unicorn"],
            &["systemd", "systemd"],
            &["x"],
        ])
        .into_iter()
        .chain(s(&["systemd"]))
        .collect(),
        Kind::Argv => array(&[
            &["true"],
            &["sh", "-c", "exit 0"],
            &[],
            &[""],
            &["/bin/true"],
            &["./apps"],
            &["apps/"],
            &["x\0"],
            &["true", "a\0b"],
            &["holdfast-no-such-program"],
        ])
        .into_iter()
        .chain(s(&["true"]))
        .collect(),
        Kind::Env => [
            &[("A", "b")][..],
            &[("", "x")],
            &[("A=B", "x")],
            &[("LISTEN_FDS", "3")],
            &[("EINHORN_FD_9", "1")],
            &[("X", "a\0b")],
            &[("A\0", "x")],
            &[("PATH", "/nonexistent")],
            &[("PATH", "")],
        ]
        .iter()
        .map(|pairs| {
            Value::Table(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
                    .collect(),
            )
        })
        .chain([Value::Table(
            [("A".to_string(), Value::Integer(1))].into_iter().collect(),
        )])
        .collect(),
        Kind::ReadyPath => s(&[
            "/",
            "/health",
            "health",
            "/a b",
            "/a\r\nX: y",
            "/é",
            "",
            "/\u{7f}",
        ]),
        Kind::Names => array(&[
            &[],
            &["http"],
            &["listen0"],
            &["nope"],
            &["http", "http"],
            &["unix", "http"],
        ]),
    };
    let pool = prop::sample::select(pool);
    let any_value = prop_oneof![
        any::<i64>().prop_map(Value::Integer),
        any::<f64>().prop_map(Value::Float),
        any::<bool>().prop_map(Value::Boolean),
        ".{0,12}".prop_map(Value::String),
        prop::collection::vec(any::<i64>().prop_map(Value::Integer), 0..3).prop_map(Value::Array),
        Just(Value::Table(toml::Table::new())),
        Just(
            "1979-05-27T07:32:00Z"
                .parse::<toml::value::Datetime>()
                .map(Value::Datetime)
                .expect("datetime")
        ),
    ];
    let generated: BoxedStrategy<Value> = match kind {
        Kind::Duration => (
            "[0-9]{1,22}",
            prop::sample::select(vec!["ns", "ms", "s", "m", "h", "days", "years", ""]),
        )
            .prop_map(|(n, u)| Value::String(format!("{n}{u}")))
            .boxed(),
        Kind::Count | Kind::Size => prop_oneof![any::<i64>(), -2i64..70000]
            .prop_map(Value::Integer)
            .boxed(),
        Kind::Address => prop_oneof![
            (any::<std::net::IpAddr>(), any::<u16>()).prop_map(|(ip, p)| {
                Value::String(std::net::SocketAddr::new(ip, p).to_string())
            }),
            "unix:[a-z./]{1,20}".prop_map(Value::String),
            "[ -~]{0,20}".prop_map(Value::String),
        ]
        .boxed(),
        Kind::Path => "[a-z./]{1,30}".prop_map(Value::String).boxed(),
        _ => ".{0,16}".prop_map(Value::String).boxed(),
    };
    prop_oneof![6 => pool, 2 => generated, 1 => any_value].boxed()
}

/// One structural edit of a config.
#[derive(Debug, Clone)]
enum Edit {
    /// Sets `KEYS[key]` (in `[[listen]]` entry `entry`, made if missing).
    Set {
        key: usize,
        entry: usize,
        value: Value,
    },
    Remove {
        key: usize,
        entry: usize,
    },
    /// Adds a key no table knows (a near miss of a real one).
    Unknown {
        key: usize,
        name: String,
    },
    /// Repeats a `[[listen]]` entry (its name and address clash).
    RepeatListen {
        entry: usize,
    },
    DropTable {
        table: usize,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    let key = 0..KEYS.len();
    prop_oneof![
        6 => (key.clone(), 0usize..3).prop_flat_map(|(key, entry)| {
            values(KEYS[key].2).prop_map(move |value| Edit::Set { key, entry, value })
        }),
        2 => (key.clone(), 0usize..3).prop_map(|(key, entry)| Edit::Remove { key, entry }),
        1 => (key, "[a-z_]{0,3}").prop_map(|(key, extra)| {
            let real = KEYS[key].1;
            let name = match extra.len() % 3 {
                0 => real.trim_end_matches('s').to_string(),
                1 => format!("{real}{extra}"),
                _ => real.replace('_', "-"),
            };
            Edit::Unknown { key, name }
        }),
        1 => (0usize..3).prop_map(|entry| Edit::RepeatListen { entry }),
        1 => (0usize..4).prop_map(|table| Edit::DropTable { table }),
    ]
}

fn table_of<'a>(root: &'a mut toml::Table, name: &str, entry: usize) -> &'a mut toml::Table {
    if name.is_empty() {
        return root;
    }
    if name == "listen" {
        let list = root
            .entry("listen")
            .or_insert_with(|| Value::Array(Vec::new()));
        if !list.is_array() {
            *list = Value::Array(Vec::new());
        }
        let list = list.as_array_mut().expect("array");
        if list.is_empty() || entry >= list.len() {
            list.push(Value::Table(toml::Table::new()));
        }
        let n = list.len();
        let t = &mut list[entry.min(n - 1)];
        if !t.is_table() {
            *t = Value::Table(toml::Table::new());
        }
        return t.as_table_mut().expect("table");
    }
    let t = root
        .entry(name)
        .or_insert_with(|| Value::Table(toml::Table::new()));
    if !t.is_table() {
        *t = Value::Table(toml::Table::new());
    }
    t.as_table_mut().expect("table")
}

fn apply(root: &mut toml::Table, e: &Edit) {
    match e {
        Edit::Set { key, entry, value } => {
            let (table, name, _) = KEYS[*key];
            table_of(root, table, *entry).insert(name.to_string(), value.clone());
        }
        Edit::Remove { key, entry } => {
            let (table, name, _) = KEYS[*key];
            table_of(root, table, *entry).remove(name);
        }
        Edit::Unknown { key, name } => {
            let (table, ..) = KEYS[*key];
            table_of(root, table, 0).insert(name.clone(), Value::Integer(1));
        }
        Edit::RepeatListen { entry } => {
            let copy = table_of(root, "listen", *entry).clone();
            if let Some(Value::Array(list)) = root.get_mut("listen") {
                list.push(Value::Table(copy));
            }
        }
        Edit::DropTable { table } => {
            root.remove(["listen", "app", "memory", "logs"][*table]);
        }
    }
}

const TOKENS: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "=",
    "\"",
    "'",
    "\n",
    "#",
    "[[listen]]\n",
    "[app]\n",
    "[memory]\n",
    "[logs]\n",
    "[app.env]\n",
    "a.b = 1\n",
    "\"\"\"",
    "'''",
    "\\",
    "\\u0000",
    "\\uD800",
    "\u{feff}",
    "\r",
    "\r\n",
    "{",
    "}",
    ",",
    "1979-05-27",
    "inf",
    "nan",
    "0x1F",
    "1_000",
    "+",
    "-",
    "é",
    "workers = 3\n",
    "command = [\"true\"]\n",
    "\u{2028}",
    "\t",
];

fn splice() -> impl Strategy<Value = Splice> {
    let at = 0usize..4096;
    let bytes = prop_oneof![
        4 => prop::sample::select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..8),
        1 => prop::sample::select(vec![vec![0xffu8], vec![0xc3], vec![0xed, 0xa0, 0x80], vec![0]]),
    ];
    prop_oneof![
        4 => (at.clone(), bytes).prop_map(|(at, bytes)| Splice::Insert { at, bytes }),
        2 => (at.clone(), 1usize..20).prop_map(|(at, len)| Splice::Delete { at, len }),
        1 => at.prop_map(|at| Splice::Truncate { at }),
        1 => (0usize..100).prop_map(|line| Splice::RepeatLine { line }),
    ]
}

/// What `--workers`, `--listen` and the command after `--` may add.
fn overrides() -> impl Strategy<Value = Overrides> {
    let workers = prop_oneof![6 => Just(None), 1 => prop::sample::select(vec![0u32, 1, 2, 8, 300, 70000]).prop_map(Some)];
    let listen = prop_oneof![
        6 => Just(Vec::new()),
        1 => prop::collection::vec(
            prop::sample::select(vec!["127.0.0.1:0", "127.0.0.1:8080", "unix:cli.sock", "unix:app.sock", "[::1]:0"]),
            1..3,
        )
        .prop_map(|v| v.iter().map(|a| a.parse::<Address>().expect("address")).collect()),
    ];
    let command = prop_oneof![
        6 => Just(Vec::new()),
        1 => prop::sample::select(vec![vec!["true"], vec![""], vec!["holdfast-no-such-program", "-x"], vec!["sh", "-c", ":"]])
            .prop_map(|v| v.iter().map(|s| s.to_string()).collect()),
    ];
    (workers, listen, command).prop_map(|(workers, listen, command)| Overrides {
        listen,
        workers,
        command,
    })
}

/// A config file's bytes, and the command line.
#[derive(Clone)]
struct Input {
    text: Vec<u8>,
    overrides: Overrides,
}

/// The text as a string literal (bytes that are not UTF-8 as `\xNN`).
impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text: String = self
            .text
            .utf8_chunks()
            .fold(String::new(), |mut out, chunk| {
                out.push_str(&chunk.valid().escape_debug().to_string());
                for b in chunk.invalid() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
                out
            });
        f.debug_struct("Input")
            .field("text", &format_args!("\"{text}\""))
            .field("overrides", &self.overrides)
            .finish()
    }
}

fn mutated() -> impl Strategy<Value = Input> {
    let seeds = seeds();
    (
        0..seeds.len(),
        prop::collection::vec(edit(), 0..6),
        prop::collection::vec(splice(), 0..3),
        overrides(),
    )
        .prop_map(move |(seed, edits, splices, overrides)| {
            let mut root: toml::Table = toml::from_str(&seeds[seed]).expect("seed parses");
            for e in &edits {
                apply(&mut root, e);
            }
            // toml cannot write every value it holds (a NaN key order is fine;
            // a NUL in a key is written escaped): fall back to the seed.
            let mut text = toml::to_string(&root)
                .unwrap_or_else(|_| seeds[seed].clone())
                .into_bytes();
            for s in &splices {
                s.apply(&mut text);
            }
            Input { text, overrides }
        })
}

fn arbitrary() -> impl Strategy<Value = Input> {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(prop::sample::select(TOKENS), 0..40)
            .prop_map(|t| t.concat().into_bytes()),
    ];
    (bytes, overrides()).prop_map(|(text, overrides)| Input { text, overrides })
}

/// A directory like the examples' (an `apps` folder next to the file).
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("holdfast-fuzz-config-")
        .tempdir()
        .expect("tempdir");
    std::fs::create_dir(dir.path().join("apps")).expect("apps");
    dir
}

/// What `check` says of `path`: `Ok` with the config, or the error line.
fn check(path: &Path, o: &Overrides) -> Result<(Config, Result<(), String>), ConfigError> {
    let config = Config::load(Some(path), o)?;
    let spec = spec_of(&config).map(|spec| {
        assert_eq!(spec.app, config.app);
        assert_eq!(spec.listeners, config.listen);
        assert_eq!(spec.memory, config.memory);
    });
    Ok((config, spec.map_err(|e| e.to_string())))
}

fn lines_of(text: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(text)
        .split('\n')
        .map(str::to_string)
        .collect()
}

/// An error names file:line:col inside the file, or the keys or options.
fn named(e: &ConfigError, path: &Path, text: &[u8]) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    ensure(!shown.contains('\n'), || {
        format!("a message of more than one line: {shown:?}")
    })?;
    match e {
        ConfigError::Parse {
            path: p,
            line,
            column,
            message,
        } => {
            ensure(p == path, || format!("{shown}: not the file's path"))?;
            let lines = lines_of(text);
            ensure(*line >= 1 && *line <= lines.len(), || {
                format!("{shown}: line {line} of {}", lines.len())
            })?;
            let width = lines[line - 1].chars().count();
            ensure(*column >= 1 && *column <= width + 1, || {
                format!("{shown}: column {column} of {width}")
            })?;
            ensure(!message.trim().is_empty(), || {
                format!("{shown}: no message")
            })
        }
        ConfigError::Invalid { message, .. } => ensure(
            message.contains('`') || message.contains("--") || message.contains('['),
            || format!("{shown}: names no key or option"),
        ),
        ConfigError::Read { .. } => Err(TestCaseError::fail(format!(
            "{shown}: a file that exists gives no read error without a position"
        ))),
    }
}

/// The rules `run` relies on, which an accepted config must keep.
fn sound(c: &Config, o: &Overrides) -> Result<(), TestCaseError> {
    let at = || format!("{c:#?}");
    ensure(!c.listen.is_empty(), || format!("no listener: {}", at()))?;
    for (i, l) in c.listen.iter().enumerate() {
        ensure(
            c.listen[..i]
                .iter()
                .all(|m| m.name != l.name && m.address != l.address),
            || format!("listener {i} repeats a name or address: {}", at()),
        )?;
        if let Address::Unix(p) = &l.address {
            ensure(p.is_absolute() && p.as_os_str().len() <= 107, || {
                format!("unix path {p:?}")
            })?;
            ensure(*p != c.control_socket, || {
                format!("{p:?} is the control socket too")
            })?;
        } else {
            ensure(l.mode.is_none(), || format!("a mode on {}", l.address))?;
        }
        ensure(l.backlog >= 1 && l.backlog <= i32::MAX as u32, || {
            format!("backlog {}", l.backlog)
        })?;
    }
    let app = &c.app;
    ensure(!app.command.0.is_empty(), || "an empty command".into())?;
    ensure(app.command.0.iter().all(|a| !a.contains('\0')), || {
        "a NUL in argv".into()
    })?;
    ensure(app.workers <= app.max_workers, || {
        format!("workers {} > max {}", app.workers, app.max_workers)
    })?;
    if let Some(w) = o.workers {
        ensure(app.workers.get() == w, || {
            format!("--workers {w} not applied")
        })?;
    }
    let day = Duration::from_secs(86400);
    let ms100 = Duration::from_millis(100);
    for (k, d, min) in [
        ("ready_timeout", app.ready_timeout, ms100),
        ("drain_timeout", app.drain_timeout, ms100),
        ("restart_backoff_max", app.restart_backoff_max, ms100),
        ("ready_delay", app.ready_delay, Duration::ZERO),
    ] {
        ensure(d >= min && d <= day, || format!("{k} = {d:?}"))?;
    }
    if app.ready == ReadyMode::Delay {
        ensure(app.ready_delay < app.ready_timeout, || {
            "ready_delay >= ready_timeout".into()
        })?;
    }
    ensure(
        app.ready_path.starts_with('/') && app.ready_path.bytes().all(|b| b.is_ascii_graphic()),
        || format!("ready_path {:?}", app.ready_path),
    )?;
    ensure(
        app.cwd
            .as_ref()
            .map_or(true, |d| d.is_absolute() && d.is_dir()),
        || format!("cwd {:?}", app.cwd),
    )?;
    for k in app.env.keys() {
        ensure(
            !k.is_empty() && !k.contains('=') && !k.contains('\0'),
            || format!("env name {k:?}"),
        )?;
    }
    if let Some(names) = &app.ready_listeners {
        ensure(!names.is_empty(), || "ready_listeners empty".into())?;
        ensure(
            names.iter().all(|n| c.listen.iter().any(|l| &l.name == n)),
            || format!("{names:?}"),
        )?;
    }
    ensure(c.control_socket.is_absolute(), || {
        format!("control_socket {:?}", c.control_socket)
    })?;
    for p in [&c.logs.stdout, &c.logs.stderr, &c.logs.holdfast_log]
        .into_iter()
        .flatten()
    {
        ensure(p.is_absolute() && !p.is_dir(), || format!("log path {p:?}"))?;
    }
    if let Some(m) = &c.memory {
        ensure(m.limit.is_some() || m.max_lifetime.is_some(), || {
            "[memory] with neither".into()
        })?;
        ensure(m.grace >= 1 && m.grace <= 1000, || {
            format!("grace {}", m.grace)
        })?;
    }
    Ok(())
}

/// The property of one input, in-process.
fn one(dir: &Path, input: &Input) -> Result<(), TestCaseError> {
    let path = dir.join("h.toml");
    std::fs::write(&path, &input.text).expect("write the config");
    let first = check(&path, &input.overrides);
    // The same file twice: the same verdict (nothing depends on the run).
    let again = check(&path, &input.overrides);
    ensure(
        first
            .as_ref()
            .map_err(ToString::to_string)
            .map(|c| c.1.clone())
            == again
                .as_ref()
                .map_err(ToString::to_string)
                .map(|c| c.1.clone()),
        || "two loads of one file disagree".into(),
    )?;
    match first {
        Err(e) => named(&e, &path, &input.text),
        Ok((config, spec)) => {
            sound(&config, &input.overrides)?;
            if let Err(e) = spec {
                // The one refusal after the loader: the program is missing.
                let program = &config.app.command.0[0];
                ensure(
                    e.contains("`command`") && e.contains(program.as_str()),
                    || format!("{e}: names neither the key nor the program"),
                )?;
            }
            Ok(())
        }
    }
}

#[test]
fn config_mutated() {
    let dir = workdir();
    fuzz("config_mutated", 1500, mutated(), |input| {
        one(dir.path(), &input)
    });
}

#[test]
fn config_arbitrary() {
    let dir = workdir();
    fuzz("config_arbitrary", 1000, arbitrary(), |input| {
        one(dir.path(), &input)
    });
}

/// `holdfast check` and `holdfast run` (for a refused file) as binaries.
fn binaries(dir: &Path, input: &Input) -> Result<(), TestCaseError> {
    let path = dir.join("h.toml");
    std::fs::write(&path, &input.text).expect("write the config");
    let o = Overrides::default();
    let want = match check(&path, &o) {
        Ok((_, Ok(()))) => None,
        Ok((_, Err(e))) => Some(format!("holdfast: {e}\n")),
        Err(e) => Some(format!("holdfast: {e}\n")),
    };
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_holdfast"))
            .args(args)
            .current_dir(dir)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .output()
            .expect("run holdfast")
    };
    let config = path.to_str().expect("utf-8 path");
    let out = run(&["check", "--config", config]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match &want {
        None => ensure(out.status.code() == Some(0) && stderr.is_empty(), || {
            format!("check: {:?} {stderr}", out.status.code())
        })?,
        Some(line) => ensure(out.status.code() == Some(78) && &stderr == line, || {
            format!(
                "check: {:?} {stderr:?}, in-process: {line:?}",
                out.status.code()
            )
        })?,
    }
    // `run` of a file the loader refuses: the same line, before anything is bound.
    if let Err(e) = Config::load(Some(&path), &o) {
        let out = run(&["run", "--config", config]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = format!("holdfast: {e}\n");
        ensure(out.status.code() == Some(78) && stderr == line, || {
            format!("run: {:?} {stderr:?}, check: {line:?}", out.status.code())
        })?;
    }
    Ok(())
}

#[test]
fn config_check_and_run_binaries_agree() {
    let dir = workdir();
    let input = prop_oneof![3 => mutated(), 1 => arbitrary()];
    fuzz("config_check_and_run_binaries_agree", 48, input, |input| {
        binaries(dir.path(), &input)
    });
}
