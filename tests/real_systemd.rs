//! holdfast's own units driven by a real systemd (Debian 12's 252) through
//! `systemctl`, in a throwaway container (`common::sandbox`): start, reload
//! and restart under load, socket activation, the watchdog, a crash with
//! requests in flight, stop, the fd store and cgroup delegation.
//!
//! Every test shares one sandbox (booted once per run of this file, about a
//! second) and runs its own `holdfast@NAME.service` with its own port on the
//! container's loopback; the load clients join the container's network
//! namespace. Counts are exact: every request is counted once, as answered or
//! as one failure kind.

mod common;

use std::time::{Duration, Instant};

use common::sandbox::{shared, App, Sandbox};
use common::{http_get, Target};

/// `GET path` once from inside the sandbox; the status and X-Pid.
fn get(app: &App<'_>, target: &Target, path: &str) -> Result<(u16, u32), String> {
    let target = target.clone();
    let path = path.to_string();
    app.sb.in_netns(move || {
        http_get(&target, &path)
            .map(|r| (r.status, r.pid().unwrap_or(0)))
            .map_err(|k| format!("{target}{path}: {k}"))
    })
}

/// The position of the first line containing `needle`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle))
}

#[test]
fn sandbox_is_isolated_and_leaves_nothing_behind() {
    let sb = Sandbox::boot("isolation");
    // Its own filesystem view: a file written inside is not on the host.
    let probe = format!("/tmp/holdfast-sandbox-probe-{}", std::process::id());
    sb.sh(&format!(
        "echo inside > {probe} && mkdir -p /etc/holdfast-probe"
    ));
    assert!(
        !std::path::Path::new(&probe).exists(),
        "{probe} reached the host"
    );
    assert!(!std::path::Path::new("/etc/holdfast-probe").exists());
    // Its own network: only a loopback, not the host's.
    let links = sb.run(&["cat", "/proc/net/dev"]);
    let names: Vec<&str> = links
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    assert_eq!(names, ["lo"], "{links}");
    assert_ne!(
        std::fs::read_link(sb.netns()).expect("netns"),
        std::fs::read_link("/proc/self/ns/net").expect("own netns")
    );
    // systemd 252 as PID 1, none of the image's services.
    assert_eq!(sb.run(&["cat", "/proc/1/comm"]).trim(), "systemd");
    assert!(sb
        .run(&["systemctl", "--version"])
        .starts_with("systemd 252"));
    for unit in ["nginx.service", "postgresql.service", "apache2.service"] {
        assert_eq!(sb.show(unit, "ActiveState"), "inactive", "{unit}");
    }
    // Something running at teardown is ended with it.
    sb.run(&["systemd-run", "--unit", "sleeper", "sleep", "1000"]);
    sb.wait_show("sleeper.service", "ActiveState", "active");
    let boot = sb.boot_time;
    let t = Instant::now();
    let left = sb.shutdown();
    eprintln!(
        "sandbox: booted in {:.2}s, torn down in {:.2}s",
        boot.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(left, Default::default(), "the sandbox left things behind");
}

#[test]
fn start_is_ready_only_once_every_worker_serves() {
    let sb = shared("start");
    let app = App::new(
        &sb,
        "start",
        8081,
        r#"
[app]
command = ["{worker}", "--ready-delay-ms", "1500"]
workers = 2
"#,
    );
    let t = Instant::now();
    app.must("start");
    let took = t.elapsed();
    // Type=notify: `systemctl start` returns on READY=1, which holdfast sends
    // once both workers are ready (each waits 1.5 s before its READY=1).
    assert!(
        took >= Duration::from_millis(1500),
        "start returned after {took:?}"
    );
    assert_eq!(app.show("ActiveState"), "active");
    assert_eq!(app.show("SubState"), "running");
    let mut pids = std::collections::BTreeSet::new();
    for target in [app.tcp(), app.unix()] {
        for _ in 0..20 {
            let (status, pid) = get(&app, &target, "/").expect("served at once");
            assert_eq!(status, 200);
            pids.insert(pid);
        }
    }
    assert_eq!(pids.len(), 2, "both workers serve: {pids:?}");
    let log = app.messages();
    let ready = line_of(&log, "all workers ready").expect("holdfast said ready");
    let started = line_of(&log, "Started holdfast@start.service").expect("systemd said started");
    assert!(
        ready < started,
        "systemd saw READY=1 before the workers were ready:\n{log}"
    );
    eprintln!(
        "start: systemctl start took {:.2}s (workers ready after 1.5 s)",
        took.as_secs_f64()
    );
}
