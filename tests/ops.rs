//! What an operator of a fleet meets (issue 16), with the real binary:
//! `restart --slot N`, the probes (`status --ready/--live`, `/readyz`,
//! `/livez`), a failed rollout that quotes the worker's own last lines
//! (a real Unicorn's pid file), holdfast as PID 1 of a pid namespace (a
//! container without an init), and `/metrics` through `promtool`.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    http_get, pid_alive, tagged_pids, wait_until, Holdfast, Launch, Load, LoadSpec, Target,
    DEADLINE,
};
use nix::sys::signal::Signal;
use serde_json::Value;

fn config(workers: u32, extra_top: &str, extra_app: &str, flags: &str) -> String {
    let flags: String = flags
        .split_whitespace()
        .map(|f| format!(", \"{f}\""))
        .collect();
    let defaults: String = [("ready_timeout", "30s"), ("drain_timeout", "30s")]
        .iter()
        .filter(|(k, _)| !extra_app.contains(k))
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    format!(
        r#"
{extra_top}
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[app]
command = ["{{test_worker}}"{flags}]
workers = {workers}
{defaults}
{extra_app}
"#
    )
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn status_json(h: &Holdfast) -> Value {
    let o = h.cli(&["status", "--json", "--control", "{dir}/holdfast.sock"]);
    assert!(o.status.success(), "status: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("status JSON")
}

/// (slot, pid) of every ready worker.
fn ready_slots(h: &Holdfast) -> Vec<(u64, i64)> {
    let s = status_json(h);
    let mut v: Vec<(u64, i64)> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| {
            (
                w["slot"].as_u64().expect("slot"),
                w["pid"].as_i64().expect("pid"),
            )
        })
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn restart_slot_replaces_one_worker_under_load_and_refuses_a_slot_that_does_not_exist() {
    let h = Holdfast::start(&config(2, "", "", ""));
    h.wait_log("all workers ready");
    let before = ready_slots(&h);
    assert_eq!(before.len(), 2, "{before:?}");
    let mut spec = LoadSpec::new(h.tcp());
    spec.connections = 8;
    spec.path = "/?sleep=20".into();
    spec.max_duration = Duration::from_secs(60);
    let load = Load::start(spec);
    wait_until(DEADLINE, "load under way", || {
        (load.requests_so_far() >= 50).then_some(())
    });

    let t = Instant::now();
    let o = h.cli(&["restart", "--slot", "1", "--control", "{dir}/holdfast.sock"]);
    let took = t.elapsed();
    assert!(o.status.success(), "restart --slot 1: {}", stderr(&o));
    let after = ready_slots(&h);
    let new_pid = after[1].1;
    assert_eq!(
        stdout(&o).trim(),
        format!(
            "slot 1 replaced: pid {} → pid {new_pid} (generation 1) is ready",
            before[1].1
        )
    );
    // Slot 0 untouched; slot 1 a new pid of the same generation.
    assert_eq!(after[0], before[0]);
    assert_ne!(new_pid, before[1].1);
    // Start-before-stop: the new worker was ready before the old one drained.
    let log = h.log();
    let ready_at = log
        .find(&format!("worker ready slot=1 pid={new_pid}"))
        .expect("new ready");
    let drain_at = log
        .find(&format!("draining worker slot=1 pid={}", before[1].1))
        .expect("old drained");
    assert!(ready_at < drain_at, "{log}");

    // A slot that does not exist: exit 1, one line, nothing replaced.
    let o = h.cli(&["restart", "--slot", "5", "--control", "{dir}/holdfast.sock"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        "holdfast: slot 5 does not exist: holdfast runs 2 worker(s), slots 0 to 1"
    );
    // Over the control socket, as JSON.
    let o = h.cli(&[
        "restart",
        "--slot",
        "0",
        "--json",
        "--control",
        "{dir}/holdfast.sock",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(r["ok"], true);
    assert!(
        r["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("slot 0 replaced: pid ")),
        "{r}"
    );

    let done = load.requests_so_far();
    wait_until(DEADLINE, "more load after the replacements", || {
        (load.requests_so_far() >= done + 200).then_some(())
    });
    let report = load.stop();
    report.assert_clean(250);
    let s = status_json(&h);
    assert_eq!(s["counters"]["replacements"]["manual"], 2);
    eprintln!(
        "ops: restart --slot 1 took {took:?}; load {} ok, {} failed",
        report.ok,
        report.failed()
    );
}

#[test]
fn ready_and_live_probes_and_readiness_goes_at_once_when_a_stop_begins() {
    let mport = common::free_port();
    let h = Holdfast::start(&config(
        2,
        &format!("metrics_listen = \"127.0.0.1:{mport}\""),
        "drain_timeout = \"4s\"",
        "--ignore-term",
    ));
    h.wait_log("all workers ready");
    let metrics = Target::local(mport);
    let ready = || h.cli(&["status", "--ready", "--control", "{dir}/holdfast.sock"]);
    let o = ready();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "ready: 2 worker(s) of generation 1");
    let o = h.cli(&["status", "--live", "--control", "{dir}/holdfast.sock"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("live: holdfast "), "{}", stdout(&o));
    let r = http_get(&metrics, "/readyz").expect("/readyz");
    assert_eq!(
        (r.status, r.body_str()),
        (200, "ready: 2 worker(s) of generation 1\n".into())
    );
    let r = http_get(&metrics, "/livez").expect("/livez");
    assert_eq!(r.status, 200);

    // The workers ignore TERM: the stop lasts drain_timeout (4 s), and
    // readiness is gone from its first moment.
    h.signal(Signal::SIGTERM);
    h.wait_log("stopping: draining every worker");
    let o = ready();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        "holdfast: not ready: holdfast is stopping"
    );
    let r = http_get(&metrics, "/readyz").expect("/readyz while stopping");
    assert_eq!(
        (r.status, r.body_str()),
        (503, "not ready: holdfast is stopping\n".into())
    );
    // Still alive: the loop answers while the workers drain.
    let r = http_get(&metrics, "/livez").expect("/livez while stopping");
    assert_eq!(r.status, 200);
    let o = h.cli(&["status", "--live", "--control", "{dir}/holdfast.sock"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn not_running_probes_exit_69() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    for flag in ["--ready", "--live"] {
        let o = common::run_holdfast(&["status", flag, "--control", sock.to_str().expect("utf8")]);
        assert_eq!(o.status.code(), Some(69), "{flag}: {}", stderr(&o));
    }
}

/// The story of the issue: a Unicorn config that writes a pid file. The
/// new worker of a rollout finds the old one's pid file and exits 1; the
/// rollout's failure says so in Unicorn's own words, and what to do.
#[test]
fn a_failed_rollout_quotes_the_workers_last_lines_unicorn_pid_file() {
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/apps");
    let h = Holdfast::start(&format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[app]
command = ["unicorn", "-E", "production", "-c", "{{dir}}/unicorn.conf.rb", "{apps}/config.ru"]
workers = 1
handoff = ["systemd"]
ready = "probe"
drain_signal = "QUIT"
ready_timeout = "30s"
drain_timeout = "30s"
env = {{ UNICORN_WORKERS = "1" }}
"#
    ));
    std::fs::write(
        h.dir.path().join("unicorn.conf.rb"),
        h.fill("worker_processes 1\npid \"{dir}/unicorn.pid\"\n"),
    )
    .expect("unicorn.conf.rb");
    h.wait_log("all workers ready");
    let old = ready_slots(&h);
    let o = h.cli(&["restart", "--wait", "--control", "{dir}/holdfast.sock"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with("holdfast: rollout of generation 2 failed: slot 0 (generation 2): exited before ready (exit status 1); its last output lines:\n  | "),
        "{err}"
    );
    assert!(err.contains("Already running on PID:"), "{err}");
    assert!(
        err.contains("\nhint: the server found a pid file written by another copy of it."),
        "{err}"
    );
    // The same in status, and the old worker serves on.
    let s = status_json(&h);
    assert_eq!(s["holdfast"]["last_rollout"]["ok"], false);
    let e = s["holdfast"]["last_rollout"]["error"]
        .as_str()
        .expect("error");
    assert!(
        e.contains("Already running on PID:") && e.contains("hint:"),
        "{e}"
    );
    assert_eq!(ready_slots(&h), old);
    let r = http_get(&h.tcp(), "/").expect("served");
    assert_eq!(r.status, 200);

    // The README's fix: one pid file per worker, named by its serial (the
    // old and the new worker of a slot share HOLDFAST_WORKER_ID, never the
    // serial). The next rollout succeeds.
    std::fs::write(
        h.dir.path().join("unicorn.conf.rb"),
        h.fill("worker_processes 1\npid \"{dir}/unicorn-#{ENV.fetch('HOLDFAST_WORKER_SERIAL')}.pid\"\n"),
    )
    .expect("unicorn.conf.rb");
    let o = h.cli(&["restart", "--wait", "--control", "{dir}/holdfast.sock"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("generation 3 is serving (1 workers"),
        "{}",
        stdout(&o)
    );
    let new = ready_slots(&h);
    assert_eq!(new.len(), 1);
    assert_ne!(new, old);
    let serial = std::fs::read_to_string(format!("/proc/{}/environ", new[0].1))
        .expect("environ")
        .split('\0')
        .find_map(|v| v.strip_prefix("HOLDFAST_WORKER_SERIAL=").map(String::from))
        .expect("HOLDFAST_WORKER_SERIAL");
    let pidfile = h.dir.path().join(format!("unicorn-{serial}.pid"));
    let written = std::fs::read_to_string(&pidfile).expect("the new worker's pid file");
    assert_eq!(written.trim(), new[0].1.to_string());
}

/// A worker that an in-place upgrade adopted while it was starting, and
/// that then fails: the failure quotes what it wrote after the upgrade (the
/// new image gives every adopted worker a tail of its own), in the answer
/// to the `restart --wait` that was waiting across the exec.
#[test]
fn a_worker_adopted_by_an_upgrade_that_fails_quotes_its_last_lines() {
    let h = Holdfast::start(&config(1, "", "", ""));
    h.wait_log("all workers ready");
    // The new worker blocks on a FIFO until the upgrade is done, then
    // writes one line and exits 1.
    let fifo = h.dir.path().join("go");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    std::fs::write(
        &h.config_path,
        h.fill(&format!(
            r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[app]
command = ["sh", "-c", "read -r _ < {fifo}; echo 'boom: cannot load the app' >&2; exit 1"]
workers = 1
ready_timeout = "30s"
drain_timeout = "30s"
"#,
            fifo = fifo.display()
        )),
    )
    .expect("config");
    let sock = h.dir.path().join("holdfast.sock");
    let sock = sock.to_str().expect("utf-8").to_string();
    let restart = std::thread::spawn(move || {
        common::run_holdfast(&["restart", "--wait", "--control", &sock])
    });
    h.wait_log("worker spawned slot=0 pid=");
    wait_until(DEADLINE, "the new worker spawned", || {
        h.log().contains("generation=2").then_some(())
    });
    let o = h.cli(&["upgrade", "--wait", "--control", "{dir}/holdfast.sock"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("upgraded from "), "{}", stdout(&o));
    // Now the starting worker writes its line and exits 1.
    std::fs::write(&fifo, "go\n").expect("write the FIFO");
    let out = restart.join().expect("restart thread");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "holdfast: rollout of generation 2 failed: slot 0 (generation 2): exited before ready (exit status 1); its last output lines:\n  | boom: cannot load the app\n"
    );
}

/// holdfast's pid in the host's pid namespace: `unshare --fork`'s child.
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Established connections to 127.0.0.1:`port` held by `pids`.
fn connections_held(pids: &BTreeSet<u32>, port: u16) -> usize {
    let inodes: BTreeSet<u64> = pids
        .iter()
        .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
        .flat_map(|d| d.flatten())
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            link.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let local = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() > 9
                && c[1].ends_with(&local)
                && c[3] == "01"
                && c[9].parse::<u64>().is_ok_and(|i| inodes.contains(&i))
        })
        .count()
}

fn nsenter(target: u32, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .args(["--target", &target.to_string(), "--pid", "--mount", "--"])
        .args(args)
        .output()
        .expect("nsenter")
}

/// A container without an init: holdfast is PID 1 of a new pid namespace
/// (`unshare --pid --fork --mount-proc`, as root). Orphans an exec into the
/// namespace leaves are re-parented to it and reaped, not stopped; `kill
/// -TERM 1` inside drains with the requests in flight answered, and holdfast
/// exits 0 with nothing left.
#[test]
fn as_pid_1_of_a_pid_namespace_it_reaps_orphans_and_drains_on_term() {
    let mut h = Holdfast::launch(
        Launch {
            program: "unshare",
            args: &[
                "--pid",
                "--fork",
                "--mount-proc",
                "{holdfast}",
                "run",
                "--config",
                "{config}",
            ],
            env: &[],
            stdin: None,
        },
        Some(&config(2, "", "", "")),
    );
    h.wait_log("all workers ready");
    let init = wait_until(DEADLINE, "holdfast under unshare", || child_of(h.pid()));
    assert_eq!(comm(init), "holdfast");
    let status = std::fs::read_to_string(format!("/proc/{init}/status")).expect("status");
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .expect("NSpid");
    assert!(
        nspid.ends_with("\t1"),
        "holdfast is not PID 1 of its namespace: {nspid}"
    );
    let workers: BTreeSet<u32> = wait_until(DEADLINE, "2 workers", || {
        let w: BTreeSet<u32> = children(init)
            .into_iter()
            .filter(|p| comm(*p).starts_with("holdfast-test"))
            .collect();
        (w.len() == 2).then_some(w)
    });

    let mut spec = LoadSpec::new(h.tcp());
    spec.connections = 8;
    spec.path = "/?sleep=20".into();
    spec.max_duration = Duration::from_secs(60);
    let load = Load::start(spec);

    // An exec into the container whose shell leaves two children behind:
    // they become PID 1's (holdfast's).
    // (Their output goes to /dev/null: a pipe they held would keep
    // `nsenter` from returning until they exit.)
    let o = nsenter(
        init,
        &[
            "sh",
            "-c",
            "exec >/dev/null 2>&1; sleep 2 & sleep 3 & exit 0",
        ],
    );
    assert!(
        o.status.success(),
        "nsenter: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let orphans: Vec<u32> = wait_until(DEADLINE, "2 orphans re-parented to holdfast", || {
        let s: Vec<u32> = children(init)
            .into_iter()
            .filter(|p| comm(*p) == "sleep")
            .collect();
        (s.len() == 2).then_some(s)
    });
    h.wait_log_count(
        "was re-parented to holdfast as PID 1 but is no worker's descendant",
        2,
    );
    // Left alone: both still run their course; each is reaped when it ends
    // (no zombie is left: its /proc entry goes).
    for p in &orphans {
        wait_until(
            Duration::from_secs(10),
            &format!("orphan {p} reaped"),
            || (!std::path::Path::new(&format!("/proc/{p}")).exists()).then_some(()),
        );
    }
    let log = h.log();
    assert!(
        !log.contains("SIGTERM now"),
        "an orphan that is no worker's was stopped:\n{log}"
    );

    // Requests in flight when the stop comes, then `kill -TERM 1` inside.
    let report = load.stop();
    report.assert_clean(100);
    let before = connections_held(&workers, h.port);
    let inflight: Vec<_> = (0..4)
        .map(|_| {
            let t = h.tcp();
            std::thread::spawn(move || http_get(&t, "/?sleep=1500"))
        })
        .collect();
    wait_until(DEADLINE, "4 requests in flight", || {
        (connections_held(&workers, h.port) >= before + 4).then_some(())
    });
    let o = nsenter(init, &["kill", "-TERM", "1"]);
    assert!(
        o.status.success(),
        "kill -TERM 1: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (i, r) in inflight.into_iter().enumerate() {
        match r.join().expect("request thread") {
            Ok(r) => assert_eq!(r.status, 200, "request {i}"),
            Err(e) => panic!("request {i} in flight at kill -TERM 1 failed: {e}"),
        }
    }
    let status = h.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "unshare reports holdfast's exit");
    assert!(!pid_alive(init));
    for w in &workers {
        assert!(!pid_alive(*w), "worker {w} left");
    }
    assert_eq!(tagged_pids(h.tag()), Vec::<u32>::new(), "processes left");
    eprintln!(
        "ops: PID 1: load {} ok, 0 failed; 4 of 4 in flight answered at kill -TERM 1",
        report.ok
    );
}

/// `/metrics` as Prometheus's own linter reads it.
#[test]
fn metrics_pass_promtool_check_metrics() {
    let mport = common::free_port();
    let cfg = config(
        2,
        &format!("metrics_listen = \"127.0.0.1:{mport}\""),
        "",
        "",
    ) + "\n[memory]\nlimit = \"1GiB\"\ninterval = \"200ms\"\n";
    let h = Holdfast::start(&cfg);
    h.wait_log("all workers ready");
    // A rollout and a replacement, so every family has samples.
    let o = h.cli(&["restart", "--wait", "--control", "{dir}/holdfast.sock"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let body = wait_until(DEADLINE, "memory figures in /metrics", || {
        let r = http_get(&Target::local(mport), "/metrics").ok()?;
        let b = r.body_str();
        b.contains("holdfast_worker_memory_bytes{").then_some(b)
    });
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; tests/run installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let o = child.wait_with_output().expect("promtool");
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}\n{body}",
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(stdout(&o) + &stderr(&o), "", "promtool printed problems");
}
