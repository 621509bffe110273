//! The Debian package (`examples/debian/build-deb`, cargo-deb), built once
//! from this test's own binary, then:
//!
//! - on this machine: lintian (every tag, info and pedantic ones included,
//!   is fixed or overridden with its reason in
//!   `examples/debian/holdfast.lintian-overrides`), `dpkg -i`, its files used
//!   (`holdfast check` on the shipped example, `systemd-analyze verify` on the
//!   installed units, the man pages, completions, logrotate file, `dpkg
//!   --verify`), then `dpkg --purge`, leaving nothing. No systemd runs here,
//!   so the maintainer scripts must do nothing (they act only when
//!   `/run/systemd/system` exists), and a policy-rc.d that forbids starting
//!   services is in place meanwhile, as tests/run does.
//! - under a real systemd (the throwaway container of
//!   `tests/common/sandbox.rs`, an overlay over this machine's root, so the
//!   install lands in a tmpfs): installing starts and enables nothing; the
//!   packaged `holdfast@.service` runs an app; installing the package again
//!   (postinst `configure` with the previous version: an upgrade) upgrades
//!   the running holdfast in place under load (same MainPID, same workers,
//!   no request failed) unless policy-rc.d forbids it; purging stops the
//!   unit (prerm) and leaves nothing.
//!
//! The two tests take turns (one lock): the container's lower layer is this
//! machine's root, which the first one installs into. Each refuses to run
//! where a holdfast package is installed already.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::sandbox::Sandbox;
use common::{wait_until, Load, LoadSpec, Target, DEADLINE};

const POLICY: &str = "/usr/sbin/policy-rc.d";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    common::run_logged("package", cmd)
}

fn text(o: &Output) -> String {
    common::output_text(o)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

/// The package, built by the first test that asks; the guard keeps the
/// other test out until this one is done.
struct Built {
    _turn: MutexGuard<'static, Option<PathBuf>>,
    deb: PathBuf,
}

static DEB: Mutex<Option<PathBuf>> = Mutex::new(None);

fn package() -> Built {
    let mut turn = DEB.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        !installed("holdfast"),
        "a holdfast package is installed on this machine already; this test installs and purges its own and will not touch that one"
    );
    if turn.is_none() {
        // From this test's binary: no second cargo build.
        let o = run(Command::new(root().join("examples/debian/build-deb"))
            .env("HOLDFAST_BIN", env!("CARGO_BIN_EXE_holdfast"))
            .current_dir(root()));
        assert!(o.status.success(), "build-deb: {}", text(&o));
        let deb = root().join(format!(
            "target/debian/holdfast_{}-1_amd64.deb",
            env!("CARGO_PKG_VERSION")
        ));
        assert!(deb.is_file(), "{} not built", deb.display());
        *turn = Some(deb);
    }
    let deb = turn.clone().expect("built");
    Built { _turn: turn, deb }
}

/// The package while it is installed on this machine: `Drop` purges it (and
/// removes the policy-rc.d this test created), even when the test failed.
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

/// The files the package holds (not its directories), as absolute paths.
fn contents(deb: &Path) -> Vec<String> {
    let o = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    assert!(o.status.success());
    text(&o)
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

#[test]
fn the_debian_package_builds_passes_lintian_installs_works_and_purges_to_nothing() {
    let built = package();
    let deb = &built.deb;
    assert!(
        !Path::new("/run/systemd/system").exists(),
        "systemd runs this machine: this test expects none (the maintainer scripts would act); the systemd half is the sandbox test"
    );

    // lintian, info and pedantic tags included: nothing but overrides.
    // Except spelling-error-in-binary: lintian looks for misspelt words in
    // the binary's bytes, and machine code spells a different one in some
    // builds ("wTH" once), so an override would be unused in the others
    // (which lintian reports too).
    let o = run(Command::new("lintian")
        .args(["--tag-display-limit", "0", "-I", "--pedantic"])
        .args(["--suppress-tags", "spelling-error-in-binary"])
        .arg(deb));
    assert!(o.status.success(), "lintian: {}", text(&o));
    let tags: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains(": "))
        .map(String::from)
        .collect();
    assert_eq!(tags, Vec::<String>::new(), "lintian tags not overridden");

    // The maintainer scripts are ours (examples/debian/), nothing generated.
    let o = run(Command::new("dpkg-deb").arg("-I").arg(deb));
    for script in ["postinst", "prerm", "postrm"] {
        let o = run(Command::new("dpkg-deb").arg("-I").arg(deb).arg(script));
        let want = std::fs::read_to_string(root().join("examples/debian").join(script))
            .expect("examples/debian script");
        assert_eq!(String::from_utf8_lossy(&o.stdout), want, "{script}");
    }
    assert!(!text(&o).contains(" preinst"), "{}", text(&o));

    let files = contents(deb);
    let mut want: Vec<String> = [
        "/usr/bin/holdfast",
        "/lib/systemd/system/holdfast.service",
        "/lib/systemd/system/holdfast@.service",
        "/lib/systemd/system/holdfast.socket",
        "/etc/logrotate.d/holdfast",
        "/usr/share/man/man5/holdfast.toml.5.gz",
        "/usr/share/bash-completion/completions/holdfast",
        "/usr/share/zsh/vendor-completions/_holdfast",
        "/usr/share/fish/vendor_completions.d/holdfast.fish",
        "/usr/share/doc/holdfast/examples/holdfast.toml",
        "/usr/share/doc/holdfast/examples/logrotate.app",
        "/usr/share/doc/holdfast/README.md",
        "/usr/share/doc/holdfast/copyright",
        "/usr/share/doc/holdfast/changelog.Debian.gz",
        "/usr/share/lintian/overrides/holdfast",
    ]
    .map(String::from)
    .to_vec();
    // One page per command, from the CLI itself: the upgrade and version too.
    want.push("/usr/share/man/man1/holdfast.1.gz".into());
    for cmd in [
        "run",
        "check",
        "demo",
        "status",
        "restart",
        "reopen-logs",
        "scale",
        "stop",
        "man",
        "completions",
        "upgrade",
        "version",
    ] {
        want.push(format!("/usr/share/man/man1/holdfast-{cmd}.1.gz"));
    }
    let mut got = files.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the package's files");
    for f in &files {
        assert!(
            !Path::new(f).exists(),
            "{f} exists before the install: it would be overwritten"
        );
    }

    // Install, with starting services forbidden meanwhile.
    let created_policy = !Path::new(POLICY).exists();
    if created_policy {
        std::fs::write(POLICY, "#!/bin/sh\nexit 101\n").expect("policy-rc.d");
        let o = run(Command::new("chmod").args(["755", POLICY]));
        assert!(o.status.success());
    }
    let guard = Installed { created_policy };
    let o = run(Command::new("dpkg")
        .arg("-i")
        .arg(deb)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(o.status.success(), "dpkg -i: {}", text(&o));
    assert!(installed("holdfast"));
    // No systemd: the postinst said and did nothing.
    assert!(
        !text(&o).contains("holdfast:"),
        "the postinst acted without systemd: {}",
        text(&o)
    );

    // dpkg has a digest of every file it installed (cargo-deb ships no
    // md5sums: see the lintian override), and all match.
    let o = run(Command::new("dpkg").args(["--verify", "holdfast"]));
    assert!(o.status.success() && text(&o).is_empty(), "{}", text(&o));
    let sums = std::fs::read_to_string("/var/lib/dpkg/info/holdfast.md5sums")
        .expect("dpkg's md5sums of holdfast");
    assert!(sums.contains("  usr/bin/holdfast\n"), "{sums}");

    // Use it.
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
    for page in [
        "holdfast",
        "holdfast-restart",
        "holdfast-upgrade",
        "holdfast.toml",
    ] {
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
    let o = run(Command::new("man")
        .args(["holdfast-upgrade"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100"));
    assert!(text(&o).contains("--binary"), "{}", text(&o));
    // bash completes the commands, upgrade included, from the installed file.
    let o = run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/holdfast && complete -p holdfast && \
         COMP_WORDS=(holdfast up) COMP_CWORD=1 COMP_LINE='holdfast up' COMP_POINT=11 && \
         _holdfast holdfast up holdfast && echo \"${COMPREPLY[@]}\"",
    ]));
    assert!(o.status.success(), "bash completion: {}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().last(),
        Some("upgrade"),
        "bash completion of `holdfast up`: {}",
        text(&o)
    );
    for f in [
        "/usr/share/zsh/vendor-completions/_holdfast",
        "/usr/share/fish/vendor_completions.d/holdfast.fish",
    ] {
        let s = std::fs::read_to_string(f).expect("completion file");
        assert!(s.contains("upgrade") && s.contains("slot"), "{f}");
    }
    let o = run(Command::new("logrotate").args(["--debug", "/etc/logrotate.d/holdfast"]));
    assert!(o.status.success(), "logrotate --debug: {}", text(&o));
    assert!(!text(&o).contains("error"), "logrotate: {}", text(&o));

    // Purge: nothing of it is left.
    let o = run(Command::new("dpkg").args(["--purge", "holdfast"]));
    assert!(o.status.success(), "dpkg --purge: {}", text(&o));
    assert!(!installed("holdfast"));
    let left: Vec<&String> = files
        .iter()
        .filter(|f| Path::new(f.as_str()).exists())
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    let info: Vec<String> = std::fs::read_dir("/var/lib/dpkg/info")
        .expect("/var/lib/dpkg/info")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("holdfast."))
        .collect();
    assert_eq!(info, Vec::<String>::new(), "dpkg's records left");
    for dir in [
        "/usr/share/doc/holdfast",
        "/usr/share/man/man1/holdfast.1.gz",
    ] {
        assert!(!Path::new(dir).exists(), "{dir} left after purge");
    }
    drop(guard);
    if created_policy {
        assert!(!Path::new(POLICY).exists(), "policy-rc.d left behind");
    }
}

/// The port of the sandbox test's app, on the container's own loopback.
const PORT: u16 = 8095;
const SOCK: &str = "/run/holdfast/app/holdfast.sock";

fn status(sb: &Sandbox) -> serde_json::Value {
    let out = sb.run(&["/usr/bin/holdfast", "status", "--json", "--control", SOCK]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

fn worker_pids(s: &serde_json::Value) -> Vec<u64> {
    let mut v: Vec<u64> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .collect();
    v.sort_unstable();
    v
}

fn main_pid(sb: &Sandbox) -> u32 {
    sb.show("holdfast@app.service", "MainPID")
        .parse()
        .expect("MainPID")
}

#[test]
fn under_systemd_the_package_starts_nothing_upgrades_running_units_in_place_and_purge_stops_them() {
    let built = package();
    let sb = Sandbox::boot("package");
    let dpkg = |args: &[&str]| {
        let mut all = vec!["dpkg"];
        all.extend_from_slice(args);
        let o = sb.exec(&all);
        eprintln!("package: sandbox: {all:?}: {}\n{}", o.status, text(&o));
        assert!(o.status.success(), "{all:?}: {}", text(&o));
        text(&o)
    };
    sb.copy_in(&built.deb, "/tmp/holdfast.deb");
    // The container's root is this machine's: a policy-rc.d of the host's
    // (tests/run makes one while it installs packages) is removed inside
    // only (a whiteout in the overlay). The test writes its own below.
    sb.run(&["rm", "-f", POLICY]);

    // A fresh install: systemd knows the units, none is enabled or started.
    let said = dpkg(&["-i", "/tmp/holdfast.deb"]);
    assert!(!said.contains("holdfast:"), "{said}");
    for unit in ["holdfast.service", "holdfast.socket"] {
        assert_eq!(sb.show(unit, "LoadState"), "loaded", "{unit}");
        assert_eq!(sb.show(unit, "ActiveState"), "inactive", "{unit}");
        assert_eq!(sb.show(unit, "UnitFileState"), "disabled", "{unit}");
    }

    // An app under the packaged template unit and binary.
    sb.write(
        "/etc/holdfast/app.toml",
        &format!(
            "control_socket = \"{SOCK}\"\n\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:{PORT}\"\n\n[app]\ncommand = [\"{}/holdfast-test-worker\", \"--ready-delay-ms\", \"500\"]\nworkers = 2\n",
            common::sandbox::BIN
        ),
    );
    sb.run(&["systemctl", "start", "holdfast@app.service"]);
    let pid = main_pid(&sb);
    let exe = |pid: u32| {
        sb.sh(&format!("readlink /proc/{pid}/exe"))
            .trim()
            .to_string()
    };
    assert_eq!(exe(pid), "/usr/bin/holdfast");
    let workers = worker_pids(&status(&sb));
    assert_eq!(workers.len(), 2, "{workers:?}");

    let mut spec = LoadSpec {
        netns: Some(sb.netns()),
        ..LoadSpec::new(Target::local(PORT))
    };
    spec.path = "/?sleep=5".into();
    spec.max_duration = Duration::from_secs(60);
    let load = Load::start(spec);
    wait_until(DEADLINE, "load", || {
        (load.requests_so_far() >= 100).then_some(())
    });

    // The package again: dpkg renames the new /usr/bin/holdfast over the
    // running one, and the postinst upgrades holdfast@app in place.
    let said = dpkg(&["-i", "/tmp/holdfast.deb"]);
    assert!(
        said.contains(&format!(
            "holdfast: holdfast@app.service: upgraded from {v} to {v} (pid {pid}, 2 workers adopted)",
            v = env!("CARGO_PKG_VERSION")
        )),
        "{said}"
    );
    assert_eq!(main_pid(&sb), pid, "MainPID changed");
    assert_eq!(exe(pid), "/usr/bin/holdfast", "not the new file");
    assert_eq!(worker_pids(&status(&sb)), workers, "the workers changed");
    assert_eq!(sb.show("holdfast@app.service", "NRestarts"), "0");
    let at = load.requests_so_far();
    wait_until(DEADLINE, "load after the upgrade", || {
        (load.requests_so_far() >= at + 100).then_some(())
    });

    // policy-rc.d forbids it: the file is replaced, the running image stays.
    sb.write(POLICY, "#!/bin/sh\nexit 101\n");
    sb.run(&["chmod", "755", POLICY]);
    let said = dpkg(&["-i", "/tmp/holdfast.deb"]);
    assert!(
        said.contains(
            "holdfast: holdfast@app.service: not upgraded in place (policy-rc.d forbids it)"
        ),
        "{said}"
    );
    assert_eq!(exe(pid), "/usr/bin/holdfast (deleted)");
    sb.run(&["rm", POLICY]);
    let report = load.stop();
    eprintln!("package: load across the in-place upgrade: {report}");
    report.assert_clean(200);

    // Purge: prerm stops the unit gracefully, nothing of the package is left.
    dpkg(&["--purge", "holdfast"]);
    assert_eq!(sb.show("holdfast@app.service", "ActiveState"), "inactive");
    let left = sb.sh(
        "ls /usr/bin/holdfast /lib/systemd/system/holdfast* /etc/logrotate.d/holdfast \
         /usr/share/doc/holdfast /var/lib/dpkg/info/holdfast.* 2>/dev/null; true",
    );
    assert_eq!(left.trim(), "", "left after purge");
    for p in workers
        .iter()
        .map(|p| p.to_string())
        .chain([pid.to_string()])
    {
        assert!(
            sb.exec(&["kill", "-0", &p]).status.code() != Some(0),
            "pid {p} still runs after the purge"
        );
    }
    let leftovers = sb.shutdown();
    assert_eq!(leftovers, common::sandbox::Leftovers::default());
}
