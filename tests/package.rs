//! The Debian package (`examples/debian/build-deb`, cargo-deb): built from this
//! test's own binary, checked by lintian, installed with `dpkg -i` on this
//! machine, used (`holdfast check` on the shipped example, `systemd-analyze
//! verify` on the installed units, the man pages, completions and logrotate
//! file), then purged, leaving nothing.
//!
//! Installing must not start anything: the package has no maintainer
//! scripts (checked), so nothing is enabled or started, and a policy-rc.d
//! that forbids starting services is in place meanwhile (as tests/run does).
//! [`Installed`]'s `Drop` purges the package and removes the policy file it
//! created, whatever happened. The test refuses to run where a holdfast
//! package is already installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const POLICY: &str = "/usr/sbin/policy-rc.d";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("{desc}: {e} (tests/run installs it)"));
    eprintln!(
        "package: {desc}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

/// The package while it is installed: `Drop` purges it (and removes the
/// policy-rc.d this test created), even when the test failed.
struct Installed {
    created_policy: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if installed("holdfast") || Path::new("/var/lib/dpkg/info/holdfast.list").exists() {
            let o = Command::new("dpkg").args(["--purge", "holdfast"]).output();
            if let Ok(o) = o {
                eprintln!(
                    "package: cleanup: dpkg --purge holdfast: {}\n{}",
                    o.status,
                    text(&o)
                );
            }
        }
        if self.created_policy {
            let _ = std::fs::remove_file(POLICY);
        }
    }
}

#[test]
fn the_debian_package_builds_passes_lintian_installs_works_and_purges_to_nothing() {
    assert!(
        !installed("holdfast"),
        "a holdfast package is installed on this machine already; this test installs and purges its own and will not touch that one"
    );
    // 1. Build it from this test's binary (no second cargo build).
    let o = run(Command::new(root().join("examples/debian/build-deb"))
        .env("HOLDFAST_BIN", env!("CARGO_BIN_EXE_holdfast"))
        .current_dir(root()));
    assert!(o.status.success(), "build-deb: {}", text(&o));
    let deb: PathBuf = root().join(format!(
        "target/debian/holdfast_{}-1_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(deb.is_file(), "{} not built", deb.display());

    // 2. lintian: no error (warnings are printed above).
    let o = run(Command::new("lintian")
        .args(["--no-tag-display-limit"])
        .arg(&deb));
    assert!(o.status.success(), "lintian: {}", text(&o));
    let errors: Vec<String> = text(&o)
        .lines()
        .filter(|l| l.starts_with("E: "))
        .map(String::from)
        .collect();
    assert_eq!(errors, Vec::<String>::new(), "lintian errors");

    // Its contents: no maintainer script, so nothing is enabled or started.
    let o = run(Command::new("dpkg-deb").args(["--ctrl-tarfile"]).arg(&deb));
    assert!(o.status.success());
    let o2 = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for script in ["postinst", "preinst", "prerm", "postrm"] {
        assert!(
            !text(&o2).contains(&format!(" {script}")),
            "the package has a {script}:\n{}",
            text(&o2)
        );
    }
    let o = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let files: Vec<String> = text(&o)
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let want = [
        "/usr/bin/holdfast",
        "/lib/systemd/system/holdfast.service",
        "/lib/systemd/system/holdfast@.service",
        "/lib/systemd/system/holdfast.socket",
        "/etc/logrotate.d/holdfast",
        "/usr/share/man/man1/holdfast.1.gz",
        "/usr/share/man/man1/holdfast-run.1.gz",
        "/usr/share/man/man1/holdfast-status.1.gz",
        "/usr/share/man/man5/holdfast.toml.5.gz",
        "/usr/share/bash-completion/completions/holdfast",
        "/usr/share/zsh/vendor-completions/_holdfast",
        "/usr/share/fish/vendor_completions.d/holdfast.fish",
        "/usr/share/doc/holdfast/examples/holdfast.toml",
        "/usr/share/doc/holdfast/copyright",
        "/usr/share/doc/holdfast/changelog.Debian.gz",
    ];
    for f in want {
        assert!(
            files.iter().any(|x| x == f),
            "{f} not in the package: {files:?}"
        );
    }
    for f in &files {
        assert!(
            !Path::new(f).exists(),
            "{f} exists before the install: it would be overwritten"
        );
    }

    // 3. Install, with starting services forbidden meanwhile.
    let created_policy = !Path::new(POLICY).exists();
    if created_policy {
        std::fs::write(POLICY, "#!/bin/sh\nexit 101\n").expect("policy-rc.d");
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(POLICY).expect("stat").permissions(),
            0o755,
        );
        let _ = Command::new("chmod").args(["755", POLICY]).status();
    }
    let guard = Installed { created_policy };
    let o = run(Command::new("dpkg")
        .arg("-i")
        .arg(&deb)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(o.status.success(), "dpkg -i: {}", text(&o));
    assert!(installed("holdfast"));

    // 4. Use it.
    let o = run(Command::new("/usr/bin/holdfast").args([
        "check",
        "--config",
        "/usr/share/doc/holdfast/examples/holdfast.toml",
    ]));
    assert!(
        o.status.success(),
        "holdfast check on the shipped example: {}",
        text(&o)
    );
    assert!(
        text(&o).contains(": ok (1 listener(s), 2 worker(s) of [\"puma\""),
        "{}",
        text(&o)
    );
    let o = run(Command::new("systemd-analyze").args([
        "verify",
        "--man=no",
        "/lib/systemd/system/holdfast.service",
        "/lib/systemd/system/holdfast.socket",
        "holdfast@verify.service",
    ]));
    // `verify` exits 0 on unknown keys: any line about holdfast's units fails too.
    let about: Vec<&str> = std::str::from_utf8(&o.stderr)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("holdfast"))
        .collect();
    assert!(
        o.status.success() && about.is_empty(),
        "systemd-analyze verify: {}",
        text(&o)
    );
    for page in ["holdfast", "holdfast-restart", "holdfast.toml"] {
        let o = run(Command::new("man")
            .args(["--warnings", page])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"));
        assert!(o.status.success(), "man {page}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).trim().is_empty(),
            "man {page} warns: {}",
            text(&o)
        );
    }
    let o = run(Command::new("man")
        .args(["holdfast.toml"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100"));
    assert!(
        text(&o).contains("drain_timeout") && text(&o).contains("Default: 30s."),
        "{}",
        text(&o)
    );
    let o = run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/holdfast && complete -p holdfast",
    ]));
    assert!(
        o.status.success() && text(&o).contains("holdfast"),
        "bash completion: {}",
        text(&o)
    );
    let o = run(Command::new("logrotate").args(["--debug", "/etc/logrotate.d/holdfast"]));
    assert!(o.status.success(), "logrotate --debug: {}", text(&o));
    assert!(!text(&o).contains("error"), "logrotate: {}", text(&o));

    // 5. Purge: nothing of it is left.
    let o = run(Command::new("dpkg").args(["--purge", "holdfast"]));
    assert!(o.status.success(), "dpkg --purge: {}", text(&o));
    assert!(!installed("holdfast"));
    let left: Vec<&String> = files
        .iter()
        .filter(|f| Path::new(f.as_str()).exists())
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    for dir in [
        "/usr/share/doc/holdfast",
        "/var/lib/dpkg/info/holdfast.list",
    ] {
        assert!(!Path::new(dir).exists(), "{dir} left after purge");
    }
    drop(guard);
    if created_policy {
        assert!(!Path::new(POLICY).exists(), "policy-rc.d left behind");
    }
}
