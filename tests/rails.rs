//! A real Rails 6.1 app (`examples/rails`, Debian's ruby-rails, no Bundler)
//! under holdfast + Puma 5.6.5, single and cluster mode, as
//! `examples/rails.toml` runs it: rollouts, a memory recycle and log
//! rotations, all under load (GETs, POSTs, slow requests a drain must wait
//! for), and not one failed request nor one lost log line.
//!
//! Rails' boot is real (2-3 s on a busy 2-core box, against milliseconds for
//! the test worker), so readiness and drain timing are tested for real: a
//! rollout that drained the old worker before the new one served would show
//! up as refused or timed-out requests.

mod common;
use common::examples::{examples_dir, replace_once};

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::netns::PrivateNet;
use common::proxy::require;
use common::{http_get, pid_alive, wait_until, Holdfast, Load, LoadReport, LoadSpec, Target};
use nix::sys::signal::Signal;

/// Deadline for a Rails boot, and any wait that includes one.
const BOOT: Duration = Duration::from_secs(120);

/// examples/rails.toml with the port, `cwd`, the log file and `-C` made
/// absolute, `puma_args` added (cluster mode), and the memory sampling
/// faster (the test bloats a worker on purpose).
fn rails_config(puma_args: &str, app_log: &Path) -> String {
    let text = fs::read_to_string(examples_dir().join("rails.toml")).expect("rails.toml");
    let text = replace_once(
        &text,
        "address = \"127.0.0.1:8080\"",
        "address = \"127.0.0.1:{port}\"",
    );
    let rails = examples_dir().join("rails");
    let text = replace_once(
        &text,
        "cwd = \"rails\"",
        &format!("cwd = {:?}", rails.display().to_string()),
    );
    let text = replace_once(
        &text,
        "\"../apps/puma.rb\",",
        &format!(
            "{:?}, {puma_args}",
            examples_dir().join("apps/puma.rb").display().to_string()
        ),
    );
    let text = replace_once(
        &text,
        "interval = \"5s\"",
        "interval = \"250ms\"\nmin_lifetime = \"0s\"",
    );
    let text = replace_once(&text, "grace = 3", "grace = 2");
    let text = text.replace(
        "\"rails/log/app.log\"",
        &format!("{:?}", app_log.display().to_string()),
    );
    assert!(!text.contains("rails/log"), "{text}");
    text
}

fn field_u32(line: &str, key: &str) -> Option<u32> {
    line.split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

fn wait_log(h: &Holdfast, what: &str, cond: impl Fn(&str) -> bool) {
    wait_until(BOOT, what, || {
        let log = h.log();
        if let Some(l) = log.lines().find(|l| l.contains("keeps serving")) {
            panic!("while waiting for {what}: {l}");
        }
        assert!(
            pid_alive(h.pid()),
            "holdfast exited while waiting for {what}"
        );
        cond(&log).then_some(())
    });
}

/// Lines containing `needle` in app.log and its rotated copies.
fn logged(dir: &Path, needle: &str) -> usize {
    fs::read_dir(dir)
        .expect("read logs dir")
        .flatten()
        .map(|e| {
            fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(needle))
                .count()
        })
        .sum()
}

const GET_PATH: &str = "/?sleep=20&load=rails";
const SLOW_PATH: &str = "/slow?sleep=1500&load=rails";

fn loads(target: Target) -> Vec<Load> {
    let base = |n, keepalive, path: &str| LoadSpec {
        connections: n,
        keepalive,
        path: path.to_string(),
        max_duration: Duration::from_secs(240),
        max_requests: 200_000,
        request_timeout: Duration::from_secs(30),
        ..LoadSpec::new(target.clone())
    };
    vec![
        base(4, true, GET_PATH),
        base(4, false, GET_PATH),
        LoadSpec {
            post_body: Some(vec![b'r'; 4096]),
            ..base(2, true, "/?load=rails")
        },
        // Always one request a drain has to wait for.
        base(2, true, SLOW_PATH),
    ]
    .into_iter()
    .map(Load::start)
    .collect()
}

fn rails_story(name: &str, puma_args: &str) {
    require("puma", "puma ruby-sd-notify");
    let ruby = require("ruby", "ruby");
    let out = std::process::Command::new(ruby)
        .args([
            "-e",
            "require 'rails'; require 'action_controller/railtie'; print Rails.version",
        ])
        .output()
        .expect("run ruby");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("6.1"),
        "Rails 6.1 is needed: apt-get install ruby-rails (not `rails`, broken on Debian 12): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _net = PrivateNet::enter();
    let logs_dir = tempfile::Builder::new()
        .prefix("holdfast-rails-logs-")
        .tempdir()
        .expect("tempdir");
    let logs = logs_dir.path().to_path_buf();
    let app_log = logs.join("app.log");
    let mut h = Holdfast::start(&rails_config(puma_args, &app_log));
    wait_log(&h, "Rails to boot", |log| log.contains("all workers ready"));
    let running = loads(h.tcp());
    let done = |l: &[Load]| l.iter().map(Load::requests_so_far).sum::<u64>();
    let serve = |l: &[Load], what: &str| {
        let base = done(l);
        wait_until(BOOT, what, || (done(l) >= base + 60).then_some(()));
    };
    serve(&running, "requests to Rails");

    // Rollouts: each new Rails must boot and serve before the old drains.
    const ROLLOUTS: u32 = 3;
    for generation in 2..=ROLLOUTS + 1 {
        h.signal(Signal::SIGHUP);
        wait_log(
            &h,
            &format!("rollout finished generation={generation}"),
            |log| {
                log.lines().any(|l| {
                    l.contains("rollout finished") && field_u32(l, "generation") == Some(generation)
                })
            },
        );
        serve(&running, "requests after a rollout");
    }

    // A memory recycle: one worker bloats past the limit.
    let grown = http_get(&h.tcp(), "/grow?mb=400").expect("GET /grow");
    assert_eq!(grown.status, 200, "{}", grown.body_str());
    let answered_by = grown.pid().expect("X-Pid");
    wait_log(&h, "a memory replacement", |log| {
        log.lines()
            .any(|l| l.contains(": replacing") && l.contains("reason=memory"))
    });
    let replaced = h
        .log()
        .lines()
        .find(|l| l.contains(": replacing"))
        .and_then(|l| field_u32(l, "pid"))
        .expect("the replaced pid");
    wait_log(&h, "the bloated worker to exit", |log| {
        log.lines()
            .any(|l| l.contains("worker exited") && field_u32(l, "pid") == Some(replaced))
    });
    serve(&running, "requests after the memory recycle");

    // Log rotations: rename, then holdfast reopens (as the logrotate snippet does).
    const ROTATIONS: usize = 2;
    for n in 1..=ROTATIONS {
        fs::rename(&app_log, logs.join(format!("app.log.{n}"))).expect("rotate app.log");
        let out = h.cli(&["reopen-logs", "--config", "{config}"]);
        assert!(
            out.status.success(),
            "reopen-logs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until(BOOT, "lines in the new app.log", || {
            (fs::metadata(&app_log).ok()?.len() > 0).then_some(())
        });
        serve(&running, "requests after a rotation");
    }
    let reports: Vec<LoadReport> = running.into_iter().map(Load::stop).collect();
    let ok: u64 = reports.iter().map(|r| r.ok).sum();
    let failed: u64 = reports.iter().map(LoadReport::failed).sum();
    let slow_ok = reports[3].ok;
    let took: Vec<String> = h
        .log()
        .lines()
        .filter(|l| l.contains("rollout finished"))
        .filter_map(|l| l.split("took=").nth(1))
        .map(|t| t.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    eprintln!(
        "rails {name}: {ROLLOUTS} rollouts (took {}), 1 memory recycle (pid {replaced}; /grow answered by {answered_by}), {ROTATIONS} log rotations: ok={ok} ({slow_ok} slow) failed={failed}",
        took.join(" ")
    );
    for r in &reports {
        eprint!("{r}");
        r.assert_clean(1);
    }

    // Every request Rails answered is in the logs exactly once, across the
    // rotated files: Rails logs `Completed 200 OK` after the response body
    // is built, so wait for the last ones to be written.
    let started = |path: &str| format!("Started GET \"{path}\"");
    let want = reports[0].ok + reports[1].ok;
    wait_until(BOOT, "every answered GET in the logs", || {
        (logged(&logs, &started(GET_PATH)) as u64 >= want).then_some(())
    });
    assert_eq!(
        logged(&logs, &started(GET_PATH)) as u64,
        want,
        "GETs logged once each"
    );
    assert_eq!(
        logged(&logs, &started(SLOW_PATH)) as u64,
        slow_ok,
        "slow GETs logged once each"
    );
    assert_eq!(
        logged(&logs, "Started POST \"/?load=rails\"") as u64,
        reports[2].ok,
        "POSTs logged once each"
    );
    let rotated = fs::read_dir(&logs).expect("logs").count();
    assert_eq!(rotated, ROTATIONS + 1);

    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(BOOT).success(), "holdfast's exit");
    let log = h.log();
    assert!(
        !log.contains("did not exit within drain_timeout"),
        "a drain ran into its deadline"
    );
}

#[test]
fn rails_puma_single_rollouts_memory_and_logs_under_load() {
    rails_story("puma single", "");
}

#[test]
fn rails_puma_cluster_rollouts_memory_and_logs_under_load() {
    rails_story("puma cluster (-w 2)", r#""-w", "2","#);
}
