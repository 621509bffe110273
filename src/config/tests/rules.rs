//! One test per rule: each error names file:line:col and the key.

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
