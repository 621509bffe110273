//! No config input can crash holdfast, and `check` refuses everything `run`
//! refuses (issue 11, item 4), proven with the real binary:
//! - a table of bad configs: `check` and `run` both exit 78 with the same
//!   one-line message naming file:line:col and the key; good configs at the
//!   edges of every range are accepted by both and run;
//! - an absurd duration in a reload (SIGHUP, `restart --wait`) is rejected
//!   with its position and changes nothing, under load;
//! - the same durations at start: exit 78, no panic.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{pid_alive, wait_until, Holdfast, Load, LoadSpec, DEADLINE};
use nix::sys::signal::Signal;
use serde_json::Value;

/// How long a `run` of a bad config may take to exit (it binds nothing).
const EXIT_BOUND: Duration = Duration::from_secs(10);

/// An absurd duration: within what humantime parses (u64 seconds), far
/// beyond what `Instant` can add.
const ABSURD: &str = "500000000000years";

/// `[[listen]]` on `{port}` and two test workers.
fn good_config() -> String {
    r#"[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}"]
workers = 2
drain_timeout = "10s"
"#
    .to_string()
}

/// `good_config()` with `line` added at the end of `[app]` (`[memory]` lines
/// start their own table).
fn with(line: &str) -> String {
    format!("{}{line}\n", good_config())
}

/// 1-based line:column of the first `marker` in `text`; a `|` in the
/// marker stands for the position itself (default: the marker's start).
fn position(text: &str, marker: &str) -> String {
    let skip = marker.find('|').unwrap_or(0);
    let offset = skip
        + text
            .find(&marker.replace('|', ""))
            .unwrap_or_else(|| panic!("marker {marker:?} not in:\n{text}"));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{line}:{column}")
}

/// One bad config: its name, its text (harness placeholders allowed), the
/// text at the position the error must name, and what the message must say.
struct Bad {
    name: &'static str,
    config: String,
    at: &'static str,
    says: &'static [&'static str],
}

fn bad(name: &'static str, config: String, at: &'static str, says: &'static [&'static str]) -> Bad {
    Bad {
        name,
        config,
        at,
        says,
    }
}

fn bad_configs() -> Vec<Bad> {
    let long = "a".repeat(100);
    vec![
        // Durations that once panicked `run` (overflow when adding duration to instant).
        bad(
            "absurd drain_timeout",
            with(&format!("drain_timeout = \"{ABSURD}\"")).replace("drain_timeout = \"10s\"\n", ""),
            "\"500000000000years\"",
            &["`drain_timeout`", "maximum of 24h"],
        ),
        bad(
            "absurd ready_timeout",
            with(&format!("ready_timeout = \"{ABSURD}\"")),
            "\"500000000000years\"",
            &["`ready_timeout`", "maximum of 24h"],
        ),
        bad(
            "absurd ready_delay",
            with(&format!("ready = \"delay\"\nready_delay = \"{ABSURD}\"")),
            "\"500000000000years\"",
            &["`ready_delay`", "maximum of 24h"],
        ),
        bad(
            "absurd restart_backoff_max",
            with(&format!("restart_backoff_max = \"{ABSURD}\"")),
            "\"500000000000years\"",
            &["`restart_backoff_max`", "maximum of 24h"],
        ),
        bad(
            "absurd interval",
            with(&format!(
                "[memory]\nlimit = \"1GiB\"\ninterval = \"{ABSURD}\""
            )),
            "\"500000000000years\"",
            &["`interval`", "maximum of 24h", "[memory]"],
        ),
        bad(
            "absurd min_lifetime",
            with(&format!(
                "[memory]\nlimit = \"1GiB\"\nmin_lifetime = \"{ABSURD}\""
            )),
            "\"500000000000years\"",
            &["`min_lifetime`", "maximum of 365days"],
        ),
        bad(
            "absurd max_lifetime",
            with(&format!("[memory]\nmax_lifetime = \"{ABSURD}\"")),
            "\"500000000000years\"",
            &["`max_lifetime`", "maximum of 365days"],
        ),
        bad(
            "absurd lifetime_jitter",
            with(&format!(
                "[memory]\nmax_lifetime = \"1h\"\nlifetime_jitter = \"{ABSURD}\""
            )),
            "\"500000000000years\"",
            &["`lifetime_jitter`", "maximum of 365days"],
        ),
        // Zero (or too little) where it breaks something.
        bad(
            "zero drain_timeout",
            good_config().replace("\"10s\"", "\"0s\""),
            "\"0s\"",
            &["`drain_timeout`", "minimum of 100ms", "SIGKILL"],
        ),
        bad(
            "zero ready_timeout",
            with("ready_timeout = \"0s\""),
            "\"0s\"",
            &["`ready_timeout`", "minimum of 100ms"],
        ),
        bad(
            "zero restart_backoff_max",
            with("restart_backoff_max = \"0s\""),
            "\"0s\"",
            &["`restart_backoff_max`", "minimum of 100ms"],
        ),
        bad(
            "interval under 100ms",
            with("[memory]\nlimit = \"1GiB\"\ninterval = \"10ms\""),
            "\"10ms\"",
            &["`interval`", "minimum of 100ms"],
        ),
        bad(
            "zero max_lifetime",
            with("[memory]\nmax_lifetime = \"0s\""),
            "\"0s\"",
            &["`max_lifetime`", "minimum of 1s"],
        ),
        bad(
            "zero grace",
            with("[memory]\nlimit = \"1GiB\"\ngrace = 0"),
            "grace = |0",
            &["`grace`", "minimum of 1"],
        ),
        bad(
            "grace beyond bound",
            with("[memory]\nlimit = \"1GiB\"\ngrace = 4294967295"),
            "4294967295",
            &["`grace`", "maximum of 1000"],
        ),
        bad(
            "tiny memory limit",
            with("[memory]\nlimit = \"1KiB\""),
            "\"1KiB\"",
            &["`limit`", "minimum of 1MiB"],
        ),
        bad(
            "huge memory limit",
            with("[memory]\nlimit = \"2EiB\""),
            "\"2EiB\"",
            &["`limit`", "maximum of 1PiB"],
        ),
        bad(
            "zero backlog",
            good_config().replace("name = \"http\"\n", "name = \"http\"\nbacklog = 0\n"),
            "backlog = |0",
            &["`backlog`", "minimum of 1"],
        ),
        bad(
            "backlog above what listen(2) takes",
            good_config().replace(
                "name = \"http\"\n",
                "name = \"http\"\nbacklog = 4294967295\n",
            ),
            "4294967295",
            &["`backlog`", "maximum of 2147483647", "listen(2)"],
        ),
        bad(
            "max_workers beyond bound",
            with("max_workers = 100000"),
            "100000",
            &["`max_workers`", "maximum of 65536"],
        ),
        bad(
            "max_surge beyond bound",
            with("max_surge = 100000"),
            "100000",
            &["`max_surge`", "maximum of 65536"],
        ),
        // What `run` refused (or looped on) while `check` said ok.
        bad(
            "empty control_socket",
            format!("control_socket = \"\"\n{}", good_config()),
            "\"\"",
            &["`control_socket`", "empty"],
        ),
        bad(
            "control_socket is a directory",
            format!("control_socket = \"{{dir}}\"\n{}", good_config()),
            "\"/",
            &["`control_socket`", "is a directory"],
        ),
        bad(
            "empty logs stdout",
            with("[logs]\nstdout = \"\""),
            "\"\"",
            &["`stdout`", "empty", "[logs]"],
        ),
        bad(
            "empty logs stderr",
            with("[logs]\nstderr = \"\""),
            "\"\"",
            &["`stderr`", "empty", "[logs]"],
        ),
        bad(
            "empty holdfast_log",
            with("[logs]\nholdfast_log = \"\""),
            "\"\"",
            &["`holdfast_log`", "empty", "[logs]"],
        ),
        bad(
            "log file is a directory",
            with("[logs]\nstdout = \".\""),
            "\".\"",
            &["`stdout`", "is a directory"],
        ),
        bad(
            "NUL in a command argument",
            good_config().replace("\"{test_worker}\"]", "\"{test_worker}\", \"a\\u0000b\"]"),
            "[\"{test_worker}\"",
            &["`command`", "argv[1]", "NUL"],
        ),
        bad(
            "NUL in an env value",
            with("env = { A = \"x\\u0000y\" }"),
            "\"x\\u0000y\"",
            &["`env`", "`A`", "NUL"],
        ),
        bad(
            "NUL in an env key",
            with("env = { \"A\\u0000\" = \"x\" }"),
            "\"A\\u0000\"",
            &["`env`", "NUL"],
        ),
        bad(
            "= in an env key",
            with("env = { \"A=B\" = \"x\" }"),
            "\"A=B\"",
            &["`env`", "`A=B`", "`=`"],
        ),
        bad(
            "empty env key",
            with("env = { \"\" = \"x\" }"),
            "\"\" =",
            &["`env`", "empty"],
        ),
        bad(
            "mode with a sign",
            good_config().replace(
                "[app]",
                "[[listen]]\naddress = \"unix:app.sock\"\nmode = \"+660\"\n\n[app]",
            ),
            "\"+660\"",
            &["mode `+660`", "octal"],
        ),
        bad(
            "mode with a non-octal digit",
            good_config().replace(
                "[app]",
                "[[listen]]\naddress = \"unix:app.sock\"\nmode = \"0689\"\n\n[app]",
            ),
            "\"0689\"",
            &["mode `0689`", "octal"],
        ),
        bad(
            "mode nobody can connect with",
            good_config().replace(
                "[app]",
                "[[listen]]\naddress = \"unix:app.sock\"\nmode = \"0444\"\n\n[app]",
            ),
            "\"0444\"",
            &["mode `0444`", "write"],
        ),
        bad(
            "mode on a TCP address",
            good_config().replace("name = \"http\"\n", "name = \"http\"\nmode = \"0660\"\n"),
            "\"0660\"",
            &["`mode`", "unix sockets only", "127.0.0.1:"],
        ),
        bad(
            "cwd that does not exist",
            with("cwd = \"nowhere\""),
            "\"nowhere\"",
            &["`cwd`", "does not exist"],
        ),
        bad(
            "cwd that is a file",
            with("cwd = \"holdfast.toml\""),
            "\"holdfast.toml\"",
            &["`cwd`", "not a directory"],
        ),
        bad(
            "ready_path with a space",
            with("ready = \"probe\"\nready_path = \"/health check\""),
            "\"/health check\"",
            &["`ready_path`", "whitespace"],
        ),
        bad(
            "ready_path with CRLF",
            with("ready = \"probe\"\nready_path = \"/\\r\\nX-Injected: 1\""),
            "\"/\\r",
            &["`ready_path`", "control character"],
        ),
        bad(
            "NUL in a unix address",
            good_config().replace("127.0.0.1:{port}", "unix:a\\u0000b.sock"),
            "\"unix:",
            &["NUL", "`address`"],
        ),
        bad(
            "unix path too long once made absolute",
            good_config().replace("127.0.0.1:{port}", &format!("unix:{long}.sock")),
            "\"unix:",
            &["`address`", "107 bytes"],
        ),
        bad(
            "listen name with a control character",
            good_config().replace("name = \"http\"", "name = \"ht\\ttp\""),
            "\"ht\\ttp\"",
            &["listen name", "control character"],
        ),
        // Relations between keys, each at a key it names.
        bad(
            "workers above max_workers",
            with("max_workers = 1"),
            "workers = |2",
            &["`workers` = 2", "`max_workers` = 1"],
        ),
        bad(
            "ready_listeners naming no listener",
            with("ready_listeners = [\"http\", \"admin\"]"),
            "\"admin\"",
            &["`ready_listeners`", "`admin`", "http"],
        ),
        bad(
            "empty ready_listeners",
            with("ready_listeners = []"),
            "[]",
            &["`ready_listeners`", "empty"],
        ),
        bad(
            "two listeners with one name",
            good_config().replace(
                "[app]",
                "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:{port2}\"\n\n[app]",
            ),
            "\"http\"\naddress = \"127.0.0.1:{port2}",
            &["named `http`", "2:8"],
        ),
        bad(
            "one address listed twice",
            good_config().replace(
                "[app]",
                "[[listen]]\nname = \"again\"\naddress = \"127.0.0.1:{port}\"\n\n[app]",
            ),
            "\"127.0.0.1:{port}\"\n\n[app]",
            &["listed twice", "`http`", "`again`"],
        ),
        bad(
            "a wildcard address and a specific one on the same port",
            good_config().replace(
                "[app]",
                "[[listen]]\nname = \"all\"\naddress = \"0.0.0.0:{port}\"\n\n[app]",
            ),
            "\"0.0.0.0:{port}\"",
            &["`all`", "`http`", "0.0.0.0"],
        ),
        bad(
            "control_socket at a listener's path",
            format!("control_socket = \"app.sock\"\n{}", good_config()).replace(
                "[app]",
                "[[listen]]\nname = \"local\"\naddress = \"unix:app.sock\"\n\n[app]",
            ),
            "\"app.sock\"",
            &["`control_socket`", "`local`"],
        ),
        bad(
            "metrics_listen on a listener's address",
            format!("metrics_listen = \"127.0.0.1:{{port}}\"\n{}", good_config()),
            "\"127.0.0.1:{port}\"\n[[listen]]",
            &["`metrics_listen`", "`http`"],
        ),
        bad(
            "[memory] without limit or max_lifetime",
            with("[memory]\ngrace = 2"),
            "[memory]",
            &["[memory]", "`limit`", "`max_lifetime`"],
        ),
        bad(
            "ready_delay not below ready_timeout",
            with("ready = \"delay\"\nready_delay = \"5s\"\nready_timeout = \"5s\""),
            "\"5s\"\nready_timeout",
            &["`ready_delay`", "`ready_timeout`"],
        ),
    ]
}

/// `check` and `run` refuse every bad config the same way: exit 78 and one
/// line naming file:line:col, never 101 (panic), 69 or a hang.
#[test]
fn check_and_run_refuse_the_same_bad_configs_with_the_same_positioned_line() {
    let mut problems = Vec::new();
    for case in bad_configs() {
        let mut h = Holdfast::start_args(&["run", "--config", "{config}"], Some(&case.config));
        let text = h.fill(&case.config);
        let at = format!(
            "holdfast: config {}:{}: ",
            h.config_path.display(),
            position(&text, &h.fill(case.at))
        );
        let check = h.cli(&["check", "--config", "{config}"]);
        let run = h.wait_exit(EXIT_BOUND);
        let check_err = String::from_utf8_lossy(&check.stderr).into_owned();
        let run_err = h.log();
        let mut wrong = Vec::new();
        if check.status.code() != Some(78) {
            wrong.push(format!("check exited {:?}", check.status.code()));
        }
        if run.code() != Some(78) {
            wrong.push(format!("run exited {run}"));
        }
        if !check.stdout.is_empty() {
            wrong.push("check printed to stdout".into());
        }
        if check_err.lines().count() != 1 || !check_err.starts_with(&at) {
            wrong.push(format!("check's message is not one line starting {at:?}"));
        }
        for needle in case.says {
            if !check_err.contains(needle) {
                wrong.push(format!("check's message lacks {needle:?}"));
            }
        }
        if run_err != check_err {
            wrong.push("run's output differs from check's".into());
        }
        if !wrong.is_empty() {
            problems.push(format!(
                "{}: {}\n  config:\n{}\n  check: {check_err}  run: {run_err}",
                case.name,
                wrong.join("; "),
                text.lines()
                    .map(|l| format!("    {l}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} case(s) wrong:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Configs at the edges of every range: `check` says ok, `run` starts every
/// worker and stops cleanly (the largest durations are added to instants at
/// start, during readiness and at stop).
#[test]
fn check_and_run_accept_configs_at_the_edges_of_every_range() {
    let longest = r#"control_socket = "ctl.sock"
metrics_listen = "127.0.0.1:0"

[[listen]]
name = "http"
address = "127.0.0.1:{port}"
backlog = 2147483647

[[listen]]
name = "local"
address = "unix:app.sock"
mode = "0660"

[app]
command = ["{test_worker}"]
workers = 2
max_workers = 65536
max_surge = 65536
cwd = "."
env = { APP_ENV = "test", EMPTY = "" }
ready_timeout = "24h"
drain_timeout = "24h"
restart_backoff_max = "24h"
ready_listeners = ["http"]

[memory]
limit = "1PiB"
interval = "24h"
grace = 1000
min_lifetime = "365days"
max_lifetime = "365days"
lifetime_jitter = "365days"

[logs]
stdout = "out.log"
"#;
    let shortest = r#"[[listen]]
address = "127.0.0.1:{port}"
backlog = 1

[app]
command = ["{test_worker}"]
workers = 1
max_workers = 1
max_surge = 0
ready = "delay"
ready_delay = "0s"
ready_timeout = "100ms"
drain_timeout = "100ms"
restart_backoff_max = "100ms"
ready_path = "/health?probe=1&x=%20"

[memory]
limit = "1MiB"
interval = "24h"
grace = 1
min_lifetime = "0s"
max_lifetime = "1s"
lifetime_jitter = "0s"
"#;
    for (name, config) in [("longest", longest), ("shortest", shortest)] {
        let mut h = Holdfast::start(config);
        let check = h.cli(&["check", "--config", "{config}"]);
        assert_eq!(
            check.status.code(),
            Some(0),
            "{name}: check: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let ok = String::from_utf8_lossy(&check.stdout).into_owned();
        assert!(
            ok.starts_with(&format!("{}: ok (", h.config_path.display())),
            "{name}: {ok}"
        );
        h.wait_log("all workers ready");
        h.signal(Signal::SIGTERM);
        assert_eq!(h.wait_exit(DEADLINE).code(), Some(0), "{name}: run exit");
        assert!(!h.log().contains("panicked"), "{name}");
    }
}

/// The same absurd durations at start: exit 78 with the key's position, no panic.
#[test]
fn an_absurd_duration_at_start_exits_78_naming_its_position() {
    let cases = [
        ("", "drain_timeout"),
        ("", "ready_timeout"),
        ("ready = \"delay\"\n", "ready_delay"),
        ("", "restart_backoff_max"),
        ("[memory]\nlimit = \"1GiB\"\n", "interval"),
        ("[memory]\nlimit = \"1GiB\"\n", "min_lifetime"),
        ("[memory]\n", "max_lifetime"),
        ("[memory]\nmax_lifetime = \"1h\"\n", "lifetime_jitter"),
    ];
    for (before, key) in cases {
        let config = good_config().replace("drain_timeout = \"10s\"\n", "")
            + before
            + &format!("{key} = \"{ABSURD}\"\n");
        let mut h = Holdfast::start(&config);
        let status = h.wait_exit(EXIT_BOUND);
        let log = h.log();
        let text = h.fill(&config);
        let line = text
            .lines()
            .position(|l| l.starts_with(key))
            .expect("key line")
            + 1;
        let want = format!(
            "holdfast: config {}:{line}:{}: `{key}` = \"{ABSURD}\" is above the maximum of ",
            h.config_path.display(),
            key.len() + 4
        );
        assert_eq!(status.code(), Some(78), "{key}: {log}");
        assert!(log.starts_with(&want), "{key}: want {want:?}, got {log}");
        assert_eq!(log.lines().count(), 1, "{key}: {log}");
        assert!(!log.contains("panicked"), "{key}: {log}");
    }
}

/// `status --json`: the generation and the sorted pids of the workers.
fn generation_and_pids(h: &Holdfast) -> (u64, BTreeSet<i64>) {
    let out = h.cli(&["status", "--json", "--control", "{dir}/holdfast.sock"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let generation = v["holdfast"]["generation"].as_u64().expect("generation");
    let pids = v["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["pid"].as_i64().expect("pid"))
        .collect();
    (generation, pids)
}

/// A reload whose config holds an absurd duration (SIGHUP, and `restart
/// --wait` over the control socket) is rejected with file:line:col and
/// changes nothing: holdfast lives on, same workers, same generation, no
/// request lost.
#[test]
fn an_absurd_duration_in_a_reload_is_rejected_and_changes_nothing() {
    let mut h = Holdfast::start(&good_config());
    h.wait_log("all workers ready");
    let (generation, pids) = generation_and_pids(&h);
    assert_eq!(generation, 1);
    assert_eq!(pids.len(), 2, "{pids:?}");
    let spawned = h.worker_pids();
    let load = Load::start(LoadSpec {
        connections: 32,
        path: "/?sleep=2".to_string(),
        max_duration: Duration::from_secs(60),
        max_requests: 1_000_000,
        ..LoadSpec::new(h.tcp())
    });
    let progress = |what: &str| {
        let from = load.requests_so_far();
        wait_until(DEADLINE, &format!("200 more requests {what}"), || {
            (load.requests_so_far() >= from + 200).then_some(())
        });
    };
    progress("before the first reload");

    let absurd = [
        (
            "drain_timeout",
            good_config().replace("\"10s\"", &format!("\"{ABSURD}\"")),
        ),
        (
            "ready_timeout",
            with(&format!("ready_timeout = \"{ABSURD}\"")),
        ),
        (
            "interval",
            with(&format!(
                "[memory]\nlimit = \"1GiB\"\ninterval = \"{ABSURD}\""
            )),
        ),
    ];
    let mut rejected = 0;
    for (key, config) in &absurd {
        h.rewrite_config(config);
        let at = format!(
            "{}:{}: `{key}` = \"{ABSURD}\" is above the maximum of ",
            h.config_path.display(),
            position(&h.fill(config), &format!("\"{ABSURD}\""))
        );
        h.signal(Signal::SIGHUP);
        rejected += 1;
        h.wait_log_count("reload rejected", rejected);
        let line = h
            .log()
            .lines()
            .filter(|l| l.contains("reload rejected"))
            .nth(rejected - 1)
            .expect("rejection line")
            .to_string();
        assert!(line.contains(&at), "{key}: want {at:?} in {line}");
        progress(&format!("after the SIGHUP with an absurd {key}"));
    }

    // `restart --wait`, finding the socket by `--config` (only its
    // control_socket is read) or by `--control`: holdfast itself rejects
    // the reload, with `check`'s message, and the client exits 1.
    let (key, config) = &absurd[0];
    h.rewrite_config(config);
    let at = format!(
        "holdfast: reload rejected: config {}:{}: `{key}` = \"{ABSURD}\"",
        h.config_path.display(),
        position(&h.fill(config), &format!("\"{ABSURD}\""))
    );
    for how in [
        ["--config", "{config}"],
        ["--control", "{dir}/holdfast.sock"],
    ] {
        let o = h.cli(&[&["restart", "--wait"][..], &how[..]].concat());
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{how:?}: {err}");
        assert!(err.starts_with(&at), "{how:?}: want {at:?}, got {err}");
        rejected += 1;
        h.wait_log_count("reload rejected", rejected);
    }
    progress("after the restarts over the control socket");

    let report = load.stop();
    eprintln!("load through rejected reloads: {report}");
    assert!(pid_alive(h.pid()), "holdfast is alive");
    assert_eq!(generation_and_pids(&h), (generation, pids.clone()));
    assert_eq!(h.worker_pids(), spawned, "nothing was spawned");
    assert!(!h.log().contains("rollout started"), "no rollout started");
    assert!(!h.log().contains("panicked"));
    report.assert_clean(800);

    // Still alive and able: the good config rolls.
    h.rewrite_config(&good_config());
    h.signal(Signal::SIGHUP);
    h.wait_log("rollout finished generation=2");
    h.signal(Signal::SIGTERM);
    assert_eq!(h.wait_exit(DEADLINE).code(), Some(0));
}
