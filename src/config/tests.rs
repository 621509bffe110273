//! Parsing and building configs: values, sections and every rule, each
//! error with its file:line:col.

use super::*;

mod rules;
mod sections;

fn err(text: &str) -> String {
    parse(Path::new("h.toml"), text)
        .and_then(|f| Config::build(Some(Path::new("h.toml")), Some(f), &Overrides::default()))
        .expect_err("must fail")
        .to_string()
}

#[test]
fn uncatchable_signals_and_holdfasts_own_env_are_refused() {
    let base = "[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\n";
    let e = err(&format!("{base}drain_signal = \"KILL\"\n"));
    assert!(
        e.contains("h.toml:5:16") && e.contains("KILL cannot be caught"),
        "{e}"
    );
    let e = err(&format!("{base}[logs]\nreopen_signal = \"SIGSTOP\"\n"));
    assert!(
        e.contains("h.toml:6:17") && e.contains("STOP cannot be caught"),
        "{e}"
    );
    let e = err(&format!("{base}env = {{ LISTEN_FDS = \"3\" }}\n"));
    assert!(
        e.contains("h.toml:5:") && e.contains("`LISTEN_FDS` is set by holdfast itself"),
        "{e}"
    );
    let e = err(&format!("{base}env = {{ EINHORN_FD_0 = \"3\" }}\n"));
    assert!(
        e.contains("`EINHORN_FD_0` is set by holdfast itself"),
        "{e}"
    );
}

#[test]
fn unknown_key_names_position_and_suggestion() {
    let e = err("[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\nworker = 2\n");
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
    let e = err("[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\nworkers = 0\n");
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

/// Found by tests/fuzz (config_mutated): `holdfast run -- ''` was taken, and
/// failed later as "exec : not found in PATH (...)", naming neither the
/// command nor where it came from; the file's `command` refused the same
/// argv as empty. The command line's argv now meets the file's rules.
#[test]
fn the_command_lines_argv_meets_the_files_rules() {
    let text = "[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\n";
    let f = parse(Path::new("/etc/h.toml"), text).expect("parses");
    for (argv, says) in [
        (vec![""], "the command after `--` is empty"),
        (vec!["", "-x"], "the command after `--` is empty"),
        (
            vec!["sh", "a\0b"],
            "the command after `--` argv[1] \"a\\0b\" contains a NUL byte",
        ),
    ] {
        let o = Overrides {
            command: argv.iter().map(|a| a.to_string()).collect(),
            ..Overrides::default()
        };
        let e = Config::build(Some(Path::new("/etc/h.toml")), Some(f.clone()), &o)
            .expect_err("refused")
            .to_string();
        assert!(e.contains(says), "{e}");
    }
    let e = err("[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"\"]\n");
    assert!(e.contains("h.toml:4:11: command is empty;"), "{e}");
}

/// Found by tests/fuzz (config_arbitrary): a file that is not UTF-8 (here
/// the single byte 0x80) was "config PATH: stream did not contain valid
/// UTF-8", with no line or column to find it by.
#[test]
fn bytes_that_are_not_utf8_are_positioned() {
    let p = Path::new("/etc/h.toml");
    let e = utf8(p, vec![0x80]).expect_err("not UTF-8").to_string();
    assert_eq!(
        e,
        "config /etc/h.toml:1:1: byte 0x80 is not UTF-8; a TOML file is UTF-8 text (was it saved in another encoding?)"
    );
    let e = utf8(p, b"[app]\ncommand = [\"caf\xe9\"]\n".to_vec())
        .expect_err("Latin-1")
        .to_string();
    assert!(
        e.starts_with("config /etc/h.toml:2:16: byte 0xe9 is"),
        "{e}"
    );
    let ok = utf8(p, "é\n".as_bytes().to_vec()).map(|t| t.len());
    assert_eq!(ok.ok(), Some(3), "valid text passes");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("h.toml");
    std::fs::write(&file, b"# caf\xe9\n").expect("write");
    let e = Config::load(Some(&file), &Overrides::default())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("h.toml:1:6: byte 0xe9"), "{e}");
}

/// Found by tests/fuzz (config_mutated): a value or key with a newline in it
/// (`address = "systemd:\n"`, TOML's `\n` escape) was quoted as is, so the
/// error came out on two lines ("`systemd:` then "`: a FileDescriptorName
/// ..."), which a log or journald splits into two records. Control
/// characters are now written as escapes.
#[test]
fn an_error_quoting_a_newline_is_one_line() {
    let base = "[app]\ncommand = [\"x\"]\n[[listen]]\n";
    let e = err(&format!("{base}address = \"systemd:\\n\"\n"));
    assert_eq!(
        e,
        "config h.toml:4:11: `systemd:\\n`: a FileDescriptorName must not contain a control character (key `address` in [[listen]])"
    );
    let e = err(&format!(
        "{base}address = \"127.0.0.1:1\"\n\"a\\nb\u{2028}\" = 1\n"
    ));
    assert!(!e.contains('\n') && !e.contains('\u{2028}'), "{e}");
    assert!(e.contains("unknown field `a\\nb\\u{2028}`"), "{e}");
}
