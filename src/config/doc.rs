//! The config file's reference, as data: every key of every table with its
//! type, default and range, for `holdfast.toml(5)` (`holdfast man
//! holdfast.toml`). Defaults come from the `default_*` functions the parser
//! uses and ranges from the [`Bounds`] markers it checks, so the page cannot
//! drift from them; the tests check that every table lists exactly the keys
//! its deserializer accepts.

use super::*;

/// One table of the file (`""` is the top level).
#[derive(Debug, Clone)]
pub struct Table {
    pub name: &'static str,
    pub about: &'static str,
    pub keys: Vec<Key>,
}

/// One key: its TOML type, its default (`None`: none, or required), its
/// range, and what it does.
#[derive(Debug, Clone)]
pub struct Key {
    pub name: &'static str,
    pub kind: &'static str,
    pub default: Option<String>,
    pub range: Option<String>,
    pub about: &'static str,
}

fn key(
    name: &'static str,
    kind: &'static str,
    default: Option<String>,
    about: &'static str,
) -> Key {
    Key {
        name,
        kind,
        default,
        range: None,
        about,
    }
}

/// A duration key checked by `B`.
fn dur<B: Bounds>(default: Option<Duration>, about: &'static str) -> Key {
    Key {
        name: B::KEY,
        kind: "duration",
        default: default.map(|d| fmt_ms(d.as_millis() as u64)),
        range: Some(format!(
            "{} to {}: {}",
            fmt_ms(B::MIN),
            fmt_ms(B::MAX),
            B::WHY
        )),
        about,
    }
}

/// A count key checked by `B`.
fn count<B: Bounds>(default: Option<u64>, about: &'static str) -> Key {
    Key {
        name: B::KEY,
        kind: "integer",
        default: default.map(|n| n.to_string()),
        range: Some(format!("{} to {}: {}", B::MIN, B::MAX, B::WHY)),
        about,
    }
}

fn quoted(s: impl fmt::Display) -> Option<String> {
    Some(format!("\"{s}\""))
}

fn signal(s: SignalName) -> Option<String> {
    quoted(s.0.as_str().trim_start_matches("SIG"))
}

/// Every table and key of a config file, in the order of the file.
pub fn reference() -> Vec<Table> {
    let size = |b: u64| fmt_bytes(b);
    vec![
        Table {
            name: "",
            about: "Keys before the first table.",
            keys: vec![
                key("control_socket", "path", Some("\"holdfast.sock\" next to the config file".into()),
                    "The unix socket of the control commands (status, restart, scale, stop, reopen-logs), mode 0600. Relative paths are relative to the config file's directory."),
                key("metrics_listen", "\"host:port\"", None,
                    "Serve Prometheus metrics at /metrics, and the probes /livez and /readyz, on this TCP address. Off when absent."),
            ],
        },
        Table {
            name: "[[listen]]",
            about: "One entry per listening socket, bound once by holdfast and inherited by every worker at fds 3, 4, ... in this order.",
            keys: vec![
                key("name", "string", Some("\"listen0\", \"listen1\", ...".into()),
                    "The socket's name in LISTEN_FDNAMES; referred to by ready_listeners."),
                key("address", "string", None,
                    "Required. \"host:port\", \"[::1]:8080\", \"unix:/path/to.sock\", or \"systemd:NAME\" for a socket systemd passes."),
                Key { default: Some(default_backlog().to_string()), ..count::<Backlog>(None,
                    "listen(2)'s backlog: the accept queue that holds connections while workers are replaced.") },
                key("mode", "string (octal)", None,
                    "Unix sockets only: the socket file's mode, e.g. \"0660\"; someone must have write permission."),
            ],
        },
        Table {
            name: "[app]",
            about: "The workers: N copies of one command.",
            keys: vec![
                key("command", "array of strings", None,
                    "Required. The worker's argv, never run through a shell; the program is looked up on PATH."),
                Key { default: Some(default_workers().to_string()), ..count::<Workers>(None,
                    "How many copies of command run (slots 0..workers-1, HOLDFAST_WORKER_ID). A server's own workers multiply it: workers = 2 of a Unicorn with worker_processes 4 is 2 masters and 8 workers.") },
                key("cwd", "path", None, "The workers' working directory; must exist."),
                key("env", "table of strings", None, "Variables added to holdfast's own environment for the workers."),
                key("handoff", "array of strings",
                    Some(format!("{:?}", default_handoff()).to_lowercase().replace("serverstarter", "server_starter")),
                    "The fd-passing conventions a worker is given: \"systemd\" (LISTEN_FDS), \"server_starter\", \"einhorn\", \"unicorn\" (UNICORN_FD; never together with systemd for Unicorn)."),
                key("ready", "string", quoted("notify"),
                    "When a new worker counts as ready: \"notify\" (READY=1 on NOTIFY_SOCKET), \"delay\" (alive ready_delay), \"probe\" (GET ready_path on a private socket answers below 500). In every mode its process tree must also hold its listening sockets."),
                dur::<ReadyDelay>(Some(default_ready_delay()), "ready = \"delay\": how long a worker must be alive."),
                key("ready_path", "string", quoted(default_ready_path()),
                    "ready = \"probe\": the path asked; printable ASCII, no spaces."),
                dur::<ReadyTimeout>(Some(default_ready_timeout()), "A new worker not ready by then fails, and so does its rollout; the old generation keeps serving."),
                Key { kind: "string", default: signal(default_drain_signal()), range: None, ..key("drain_signal", "", None,
                    "The signal that makes a worker stop accepting and finish its requests (Unicorn: \"QUIT\", uWSGI: \"HUP\").") },
                dur::<DrainTimeout>(Some(default_drain_timeout()), "How long a draining worker may take; then SIGKILL to its process group and descendants."),
                Key { default: Some(default_max_surge().to_string()), ..count::<MaxSurge>(None,
                    "Extra workers during a replacement; 0 stops each old worker first.") },
                dur::<RestartBackoffMax>(Some(default_backoff_max()), "The cap of the crash restart delay (100ms, doubled per crash in a row)."),
                Key { default: Some(default_max_workers().to_string()), ..count::<MaxWorkers>(None,
                    "The bound on workers, holdfast scale and SIGTTIN.") },
                key("ready_listeners", "array of strings", Some("every listener".into()),
                    "The [[listen]] names a worker's process tree must hold to count as ready."),
            ],
        },
        Table {
            name: "[memory]",
            about: "Recycling bloated and old workers, start-before-stop. Needs limit, max_lifetime or both.",
            keys: vec![
                Key {
                    name: MemoryLimit::KEY,
                    kind: "size",
                    default: None,
                    range: Some(format!("{} to {}: {}", size(MemoryLimit::MIN), size(MemoryLimit::MAX), MemoryLimit::WHY)),
                    about: "Per worker, e.g. \"512MiB\": over it for grace samples, the worker is replaced.",
                },
                key("metric", "string", Some("\"pss\" for scope = \"tree\", \"uss\" for scope = \"process\"".into()),
                    "\"rss\", \"pss\" or \"uss\"."),
                key("scope", "string", quoted("tree"),
                    "\"tree\": the worker's processes summed; \"process\": each process on its own (a bloated child of a preforking master gets child_signal)."),
                dur::<Interval>(Some(default_interval()), "The sampling period."),
                count::<Grace>(Some(u64::from(default_grace())), "Samples in a row over the limit before acting."),
                dur::<MinLifetime>(Some(default_min_lifetime()), "No worker younger than this is recycled for memory."),
                Key { kind: "string", default: signal(default_child_signal()), range: None, ..key("child_signal", "", None,
                    "scope = \"process\": what a bloated child of the worker gets.") },
                dur::<MaxLifetime>(None, "Replace a worker this long after it became ready (plus its share of lifetime_jitter)."),
                dur::<LifetimeJitter>(None, "Spreads max_lifetime over the slots, so they do not recycle together."),
            ],
        },
        Table {
            name: "[logs]",
            about: "Where the workers' stdout and stderr go: holdfast reads them through pipes and writes whole lines.",
            keys: vec![
                key("stdout", "path", Some("holdfast's own stdout".into()), "Worker stdout is appended here."),
                key("stderr", "path", Some("holdfast's own stderr".into()), "Worker stderr is appended here; may be the same file as stdout."),
                key("prefix", "boolean", Some(default_true().to_string()), "Begin each line with \"[w<slot> <pid>] \"."),
                key("reopen_signal", "string", None, "Also sent to every worker when the logs are reopened (holdfast reopen-logs, SIGUSR1)."),
                key("holdfast_log", "path", Some("stderr".into()), "holdfast's own log."),
            ],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys serde accepts in one table, from its own error message for
    /// an unknown key: "unknown field `zz`, expected one of `a`, `b`".
    fn accepted(table: &str, required: &str) -> Vec<String> {
        let text = if table.is_empty() {
            "zz_unknown = 1\n".to_string()
        } else {
            format!("{table}\n{required}\nzz_unknown = 1\n")
        };
        let e = toml::from_str::<RawFile>(&text)
            .err()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        let list = e
            .split_once("expected one of ")
            .map(|(_, l)| l)
            .or_else(|| e.split_once("expected ").map(|(_, l)| l))
            .unwrap_or_else(|| panic!("{table}: {e}"));
        list.split(", ")
            .map(|k| {
                k.trim_matches(|c| c == '`' || c == ' ' || c == '.')
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn every_table_lists_exactly_the_keys_its_parser_accepts() {
        let required = |t: &str| match t {
            "[[listen]]" => "address = \"127.0.0.1:1\"",
            "[app]" => "command = [\"x\"]",
            _ => "",
        };
        let tables = reference();
        let names: Vec<&str> = tables.iter().map(|t| t.name).collect();
        assert_eq!(names, ["", "[[listen]]", "[app]", "[memory]", "[logs]"]);
        for t in &tables {
            let mut want = accepted(t.name, required(t.name));
            if t.name.is_empty() {
                // Tables of the top level are documented as tables.
                want.retain(|k| !matches!(k.as_str(), "listen" | "app" | "memory" | "logs"));
            }
            let got: Vec<String> = t.keys.iter().map(|k| k.name.to_string()).collect();
            assert_eq!(got, want, "table {:?}", t.name);
            for k in &t.keys {
                assert!(
                    !k.about.is_empty() && !k.kind.is_empty(),
                    "{}: {k:?}",
                    t.name
                );
            }
        }
    }

    #[test]
    fn defaults_and_ranges_are_the_parsers() {
        let tables = reference();
        let find = |t: &str, k: &str| {
            tables
                .iter()
                .find(|x| x.name == t)
                .and_then(|x| x.keys.iter().find(|y| y.name == k))
                .cloned()
                .unwrap_or_else(|| panic!("{t} {k}"))
        };
        let d = find("[app]", "drain_timeout");
        assert_eq!(d.default.as_deref(), Some("30s"));
        assert!(
            d.range
                .as_deref()
                .is_some_and(|r| r.starts_with("100ms to 24h: ")),
            "{d:?}"
        );
        assert_eq!(find("[app]", "workers").default.as_deref(), Some("1"));
        assert_eq!(
            find("[app]", "drain_signal").default.as_deref(),
            Some("\"TERM\"")
        );
        assert_eq!(
            find("[app]", "handoff").default.as_deref(),
            Some("[systemd, server_starter, einhorn]")
        );
        assert_eq!(
            find("[[listen]]", "backlog").default.as_deref(),
            Some("1024")
        );
        assert!(find("[memory]", "limit")
            .range
            .is_some_and(|r| r.starts_with("1MiB to 1PiB")));
        assert_eq!(
            find("[memory]", "child_signal").default.as_deref(),
            Some("\"QUIT\"")
        );
    }
}
