//! Manual pages, generated from the definitions the code runs on, so they
//! cannot drift from it: `holdfast(1)` and one page per command
//! (`holdfast-run(1)`, ...) from the clap command line (`clap_mangen`), and
//! `holdfast.toml(5)` from the config's own reference
//! ([`crate::config::doc`]: keys, defaults and ranges as the parser has
//! them). `holdfast man` prints them; the Debian package installs them.

use std::fmt::Write as _;

use crate::config::doc;

/// Every page as (file name, roff text): `holdfast.1`, `holdfast-run.1`,
/// ..., `holdfast.toml.5`. `cli` is the command line's `clap::Command`.
pub fn pages(cli: clap::Command) -> Vec<(String, String)> {
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    let mut out = Vec::new();
    let mut add = |cmd: clap::Command| {
        let man = clap_mangen::Man::new(cmd)
            .date(DATE)
            .manual("holdfast manual");
        let mut text = Vec::new();
        if man.render(&mut text).is_ok() {
            out.push((
                man.get_filename(),
                String::from_utf8_lossy(&text).into_owned(),
            ));
        }
    };
    add(cli.clone());
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        add(sub.clone());
    }
    out.push(("holdfast.toml.5".to_string(), config_page()));
    out
}

/// The date on every page: the version's, never the build's (reproducible).
const DATE: &str = "2026-01-01";

/// Text for a roff line: backslashes escaped, hyphens as minus signs where
/// they start an option, and a leading `.` or `'` made literal.
fn esc(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// `holdfast.toml(5)`.
pub fn config_page() -> String {
    let mut p = String::new();
    let version = env!("CARGO_PKG_VERSION");
    let _ = writeln!(
        p,
        ".TH HOLDFAST.TOML 5 \"{DATE}\" \"holdfast {version}\" \"holdfast manual\""
    );
    p.push_str(".SH NAME\nholdfast.toml \\- holdfast's configuration file\n");
    p.push_str(".SH SYNOPSIS\n/etc/holdfast/holdfast.toml, /etc/holdfast/NAME.toml (holdfast@NAME.service)\n");
    p.push_str(".SH DESCRIPTION\n");
    p.push_str(&esc("A TOML file read by holdfast run and holdfast check, and again on SIGHUP or holdfast restart. Unknown keys are errors, reported with file, line and column and the key that was probably meant. Relative paths are relative to the file's directory. Durations are written like \"250ms\", \"30s\", \"1m 30s\", \"24h\"; sizes like \"512MiB\", \"1.5GiB\" or a number of bytes. A value outside its range is refused with the reason given below."));
    p.push('\n');
    for t in doc::reference() {
        let title = if t.name.is_empty() {
            "TOP LEVEL".to_string()
        } else {
            t.name.to_uppercase()
        };
        let _ = writeln!(p, ".SH \"{}\"", esc(&title));
        let _ = writeln!(p, "{}", esc(t.about));
        for k in &t.keys {
            let _ = writeln!(p, ".TP\n.B {}\n({})", esc(k.name), esc(k.kind));
            let _ = writeln!(p, "{}", esc(k.about));
            if let Some(d) = &k.default {
                let _ = writeln!(p, ".br\nDefault: {}.", esc(d));
            }
            if let Some(r) = &k.range {
                let _ = writeln!(p, ".br\nRange: {}.", esc(r));
            }
        }
    }
    p.push_str(".SH EXAMPLE\n.nf\n");
    for line in EXAMPLE.lines() {
        let _ = writeln!(p, "{}", esc(line));
    }
    p.push_str(
        ".fi\n.SH \"SEE ALSO\"\n.BR holdfast (1),\n.BR systemd.socket (5),\n.BR sd_notify (3)\n",
    );
    p
}

const EXAMPLE: &str = r#"[[listen]]
name = "http"
address = "127.0.0.1:8080"

[app]
command = ["bundle", "exec", "puma", "-C", "puma.rb", "--bind-to-activated-sockets=only"]
workers = 2
cwd = "/srv/app"
ready = "notify"
drain_timeout = "35s"

[logs]
stdout = "/var/log/app/app.log"
stderr = "/var/log/app/app.log""#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_page_names_every_key_with_its_default() {
        let page = config_page();
        assert!(page.starts_with(".TH HOLDFAST.TOML 5 "), "{page}");
        for t in doc::reference() {
            for k in t.keys {
                assert!(
                    page.contains(&format!(".B {}\n", esc(k.name))),
                    "{}",
                    k.name
                );
            }
        }
        assert!(page.contains("Default: 30s.\n"), "drain_timeout's default");
        // No line starts with a stray control character.
        for line in page.lines() {
            assert!(!line.starts_with('\''), "{line}");
        }
    }
}
