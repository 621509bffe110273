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
use common::{http_get, wait_until, Load, Target, DEADLINE};

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
    // Serving at once, on both sockets, and both workers are ready.
    for target in [app.tcp(), app.unix()] {
        assert_eq!(get(&app, &target, "/").expect("served at once").0, 200);
    }
    let status = app.status();
    assert_eq!(status["holdfast"]["ready"], true, "{status}");
    let states: Vec<&str> = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["state"].as_str())
        .collect();
    assert_eq!(states, ["ready", "ready"], "{status}");
    // holdfast logs through a thread of its own, so the journal may file its
    // line after systemd's; the line's own timestamp was taken before READY=1.
    // (journald reads a service's output on its own time: wait for the line.)
    sb.wait_messages(&app.unit(), "all workers ready", 1);
    let entries = app.sb.entries(&app.unit());
    let message = |e: &serde_json::Value| e["MESSAGE"].as_str().unwrap_or("").to_string();
    let ready_line = entries
        .iter()
        .map(message)
        .find(|m| m.contains("all workers ready"))
        .expect("holdfast said ready");
    let ready_at = humantime::parse_rfc3339(ready_line.split_whitespace().next().expect("ts"))
        .expect("holdfast's timestamp");
    let started = entries
        .iter()
        .find(|e| message(e).starts_with("Started holdfast@start.service"))
        .expect("systemd said started");
    let started_us: u64 = started["__REALTIME_TIMESTAMP"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("realtime");
    let started_at = std::time::UNIX_EPOCH + Duration::from_micros(started_us);
    assert!(
        ready_at <= started_at,
        "systemd said started before the workers were ready: {ready_line}"
    );
    eprintln!(
        "start: systemctl start took {:.2}s (workers ready after 1.5 s)",
        took.as_secs_f64()
    );
}

/// Client connections the workers hold, from `holdfast status`.
fn connections(app: &App<'_>) -> u64 {
    app.status()["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["connections"].as_u64()).sum())
        .unwrap_or(0)
}

/// `n` requests of `path`, each on its own thread in the sandbox's network
/// namespace; joined by [`InFlight::results`].
struct InFlight {
    threads: Vec<std::thread::JoinHandle<Result<(u16, u32), common::FailKind>>>,
}

impl InFlight {
    fn start(app: &App<'_>, target: &Target, path: &str, n: usize) -> InFlight {
        let threads = (0..n)
            .map(|_| {
                let (ns, target, path) = (app.sb.netns(), target.clone(), path.to_string());
                std::thread::spawn(move || {
                    common::load::join_netns(&ns);
                    http_get(&target, &path).map(|r| (r.status, r.pid().unwrap_or(0)))
                })
            })
            .collect();
        InFlight { threads }
    }

    /// (answered 200, failures by kind).
    fn results(self) -> (u64, std::collections::BTreeMap<String, u64>) {
        let mut ok = 0;
        let mut failed = std::collections::BTreeMap::new();
        for t in self.threads {
            match t.join().expect("request thread") {
                Ok((200, _)) => ok += 1,
                Ok((s, _)) => *failed.entry(format!("status {s}")).or_insert(0) += 1,
                Err(k) => *failed.entry(k.name().to_string()).or_insert(0) += 1,
            }
        }
        (ok, failed)
    }
}

#[test]
fn reload_under_load_returns_only_when_the_rollout_ended() {
    let sb = shared("reload");
    let app = App::new(
        &sb,
        "reload",
        8082,
        r#"
[app]
command = ["{worker}"]
workers = 2
drain_timeout = "10s"
"#,
    );
    app.must("start");
    let mut spec = app.load_spec(app.tcp());
    spec.path = "/?sleep=5".into();
    spec.max_duration = Duration::from_secs(240);
    let load = Load::start(spec);
    const RELOADS: u64 = 30;
    let mut still_reloading = 0;
    let t = Instant::now();
    for i in 0..RELOADS {
        app.must("reload");
        // What a deploy script sees right after `systemctl reload` returned.
        let state = app.show("ActiveState");
        if state != "active" {
            still_reloading += 1;
            eprintln!("reload {i}: systemctl reload returned while the unit is {state}");
        }
        app.sb.wait_show(&app.unit(), "ActiveState", "active");
    }
    let took = t.elapsed();
    let report = load.stop();
    let status = app.status();
    eprintln!(
        "reload: {RELOADS} reloads in {:.1}s, {still_reloading} returned while still reloading; {report}",
        took.as_secs_f64()
    );
    assert_eq!(status["holdfast"]["generation"], RELOADS + 1, "{status}");
    assert_eq!(
        still_reloading, 0,
        "systemctl reload returned before the rollout ended"
    );
    report.assert_clean(100);
}

#[test]
fn a_rejected_reload_fails_systemctl_reload_and_keeps_the_workers() {
    let sb = shared("rejected");
    let good = r#"
[app]
command = ["{worker}"]
workers = 2
"#;
    let app = App::new(&sb, "rejected", 8083, good);
    app.must("start");
    let before = app.status();
    // A typo, as a deploy might ship it.
    app.write_config("[app]\ncommand = [\"{worker}\"]\nworkers = 2\nwokers = 3\n");
    let out = app.systemctl("reload");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("rejected reload: systemctl reload: {} {err}", out.status);
    assert_eq!(
        out.status.code(),
        Some(1),
        "systemctl reload of a broken config must fail: {err}"
    );
    assert_eq!(app.show("ReloadResult"), "exit-code");
    assert_eq!(app.show("ActiveState"), "active");
    let after = app.status();
    assert_eq!(
        after["holdfast"]["generation"],
        before["holdfast"]["generation"]
    );
    let workers = |s: &serde_json::Value| -> Vec<(u64, u64, u64, String)> {
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| {
                (
                    w["slot"].as_u64().expect("slot"),
                    w["pid"].as_u64().expect("pid"),
                    w["generation"].as_u64().expect("generation"),
                    w["state"].as_str().expect("state").to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        workers(&after),
        workers(&before),
        "the workers were touched"
    );
    // The reason, in the journal: from holdfast, and from the ExecReload=
    // client that systemd ran (what `systemctl status` shows last).
    let want = format!("config {}:14:1: unknown field `wokers`", app.config());
    let log = sb.wait_messages(&app.unit(), &want, 2);
    let said: Vec<&str> = log.lines().filter(|l| l.contains(&want)).collect();
    // Two writers (holdfast's log thread, the client's stderr): either order.
    assert_eq!(said.len(), 2, "want {want:?} twice in:\n{log}");
    assert!(
        said.iter()
            .any(|l| l.contains("reload rejected, still running the previous config: config")),
        "{said:?}"
    );
    assert!(
        said.iter()
            .any(|l| l.starts_with("holdfast: reload rejected: config")),
        "{said:?}"
    );
    assert!(
        log.contains("Control process exited, code=exited, status=1/FAILURE"),
        "{log}"
    );
    assert!(
        log.contains("Reload failed for holdfast@rejected.service"),
        "{log}"
    );
    eprintln!(
        "rejected reload: the journal says:\n  {}",
        said.join("\n  ")
    );
    // Fixed, it reloads.
    app.write_config(good);
    app.must("reload");
    assert_eq!(app.show("ReloadResult"), "success");
    assert_eq!(app.status()["holdfast"]["generation"], 2);
}

#[test]
fn a_crash_lets_the_requests_in_flight_finish() {
    let sb = shared("crash");
    // Unicorn's signals: TERM drops what is in flight, QUIT drains.
    let app = App::new(
        &sb,
        "crash",
        8084,
        r#"
[app]
command = ["{worker}", "--quick-term"]
workers = 2
drain_signal = "QUIT"
drain_timeout = "10s"
"#,
    );
    app.must("start");
    let first = app.main_pid();
    // 3 s: still in flight when systemd restarts holdfast (RestartSec=1s).
    let inflight = InFlight::start(&app, &app.tcp(), "/?sleep=3000", 4);
    wait_until(DEADLINE, "4 requests in flight", || {
        (connections(&app) == 4).then_some(())
    });
    sb.run(&["kill", "-KILL", &first.to_string()]);
    let (ok, failed) = inflight.results();
    eprintln!("crash: 4 requests in flight during kill -KILL: {ok} answered, failed {failed:?}");
    wait_until(DEADLINE, "holdfast restarted", || {
        let pid = app.main_pid();
        (pid != 0 && pid != first && app.show("ActiveState") == "active").then_some(())
    });
    assert_eq!((ok, failed.len()), (4, 0), "failed: {failed:?}");
    assert_eq!(
        get(&app, &app.tcp(), "/")
            .expect("served after the restart")
            .0,
        200
    );
    // The new holdfast accounted for the old workers until they exited:
    // their cgroups are gone, its own are numbered after theirs.
    let log = sb.wait_messages(
        &app.unit(),
        "the previous holdfast of this unit left workers running",
        1,
    );
    assert!(log.contains("Found left-over process"), "{log}");
    let warned = log
        .lines()
        .find(|l| l.contains("the previous holdfast of this unit left workers running"))
        .unwrap_or_else(|| panic!("no word of the old workers:\n{log}"));
    let left: Vec<u64> = warned
        .split("worker-")
        .skip(1)
        .map(|t| {
            t.split('"')
                .next()
                .expect("serial")
                .parse()
                .expect("serial")
        })
        .collect();
    assert!(!left.is_empty(), "{warned}");
    sb.wait_messages(
        &app.unit(),
        "a worker of the previous holdfast has exited",
        left.len(),
    );
    let dir = format!(
        "/sys/fs/cgroup/system.slice/system-holdfast.slice/{}",
        app.unit()
    );
    let cgroups = sb.sh(&format!("cd {dir} && ls -d worker-*"));
    let last = left.iter().max().expect("one");
    assert_eq!(
        cgroups.split_whitespace().collect::<Vec<_>>(),
        [
            format!("worker-{}", last + 1),
            format!("worker-{}", last + 2)
        ]
    );
    eprintln!(
        "crash: the new holdfast waited for {} old worker(s): {left:?}",
        left.len()
    );
    app.must("stop");
    assert_eq!(app.cgroup_pids(), Vec::<u32>::new());
}

#[test]
fn stop_drains_and_leaves_nothing_while_a_restart_keeps_the_socket_files() {
    let sb = shared("stop");
    let app = App::new(
        &sb,
        "stop",
        8085,
        "[app]\ncommand = [\"{worker}\", \"--daemon\"]\nworkers = 2\n",
    );
    app.must("start");
    let sock = sb.path(&app.unix_path());
    let keeper = sb.path(&format!("/run/holdfast/{}/.app.sock.holdfast", app.name));
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(&sock).expect("app.sock").ino();
    assert_eq!(
        std::fs::metadata(&keeper).expect("keeper link").ino(),
        inode
    );
    // A restart keeps the path: the socket lives on in the fd store.
    app.must("restart");
    assert_eq!(
        std::fs::metadata(&sock)
            .expect("app.sock after restart")
            .ino(),
        inode
    );
    assert_eq!(get(&app, &app.unix(), "/").expect("served").0, 200);
    // A final stop drains what is in flight and leaves nothing: no process
    // (the workers' setsid daemons included), no socket file, no keeper.
    let inflight = InFlight::start(&app, &app.unix(), "/?sleep=1000", 4);
    wait_until(DEADLINE, "4 requests in flight", || {
        (connections(&app) == 4).then_some(())
    });
    assert_eq!(app.cgroup_pids().len(), 5, "holdfast, 2 workers, 2 daemons");
    app.must("stop");
    let (ok, failed) = inflight.results();
    eprintln!("stop: 4 requests in flight: {ok} answered, failed {failed:?}");
    assert_eq!((ok, failed.len()), (4, 0), "{failed:?}");
    assert_eq!(app.show("ActiveState"), "inactive");
    assert_eq!(app.show("Result"), "success");
    assert_eq!(app.cgroup_pids(), Vec::<u32>::new());
    assert!(
        !sock.exists(),
        "a dead socket file is left at {}",
        app.unix_path()
    );
    assert!(!keeper.exists(), "the keeper link is left behind");
    assert!(
        !sb.path(&format!("/run/holdfast/{}", app.name)).exists(),
        "the runtime directory is left behind"
    );
}

/// The inode of each listener, by name, from `holdfast status`.
fn listener_inodes(app: &App<'_>) -> std::collections::BTreeMap<String, u64> {
    app.status()["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| {
            (
                l["name"].as_str().expect("name").to_string(),
                l["inode"].as_u64().expect("inode"),
            )
        })
        .collect()
}

#[test]
fn restart_under_load_keeps_the_very_sockets_and_refuses_nothing() {
    let sb = shared("restart");
    let app = App::new(
        &sb,
        "restart",
        8086,
        r#"
[app]
command = ["{worker}"]
workers = 2
"#,
    );
    app.must("start");
    let inodes = listener_inodes(&app);
    let first = app.main_pid();
    let mut loads = Vec::new();
    for target in [app.tcp(), app.unix()] {
        let mut spec = app.load_spec(target);
        spec.path = "/?sleep=5".into();
        spec.max_duration = Duration::from_secs(120);
        loads.push(Load::start(spec));
    }
    wait_until(DEADLINE, "load before the restart", || {
        loads
            .iter()
            .all(|l| l.requests_so_far() >= 50)
            .then_some(())
    });
    const RESTARTS: usize = 3;
    for _ in 0..RESTARTS {
        app.must("restart");
        let at = loads.iter().map(Load::requests_so_far).collect::<Vec<_>>();
        wait_until(DEADLINE, "load after the restart", || {
            loads
                .iter()
                .zip(&at)
                .all(|(l, a)| l.requests_so_far() >= a + 50)
                .then_some(())
        });
    }
    let reports: Vec<_> = loads.into_iter().map(Load::stop).collect();
    for r in &reports {
        eprintln!("restart ×{RESTARTS}: {r}");
    }
    assert_ne!(app.main_pid(), first);
    assert_eq!(app.show("NFileDescriptorStore"), "2");
    assert_eq!(listener_inodes(&app), inodes, "not the same sockets");
    let log = sb.wait_messages(
        &app.unit(),
        "adopted a socket passed by systemd",
        2 * RESTARTS,
    );
    assert_eq!(
        log.matches("adopted a socket passed by systemd").count(),
        2 * RESTARTS,
        "{log}"
    );
    assert_eq!(
        log.matches("origin=fd-store").count(),
        4 * RESTARTS,
        "{log}"
    );
    for r in &reports {
        assert_eq!(r.count("refused"), 0, "{r}");
        r.assert_clean(100);
    }
}

#[test]
fn socket_activation_through_holdfast_socket() {
    let sb = shared("activation");
    sb.owns("holdfast.socket");
    sb.owns("holdfast.service");
    let sock_path = sb
        .run(&[
            "systemctl",
            "show",
            "-p",
            "Listen",
            "--value",
            "holdfast.socket",
        ])
        .lines()
        .filter_map(|l| l.strip_suffix(" (Stream)"))
        .find(|l| l.starts_with('/'))
        .expect("the unit's unix path")
        .to_string();
    sb.write(
        "/etc/holdfast/holdfast.toml",
        &format!(
            r#"control_socket = "/run/holdfast/holdfast.sock"

[[listen]]
name = "http"
address = "127.0.0.1:8080"

[[listen]]
name = "unix"
address = "unix:{sock_path}"

[app]
command = ["{bin}/holdfast-test-worker"]
workers = 2
"#,
            bin = common::sandbox::BIN
        ),
    );
    sb.run(&["systemctl", "start", "holdfast.socket"]);
    assert_eq!(sb.show("holdfast.service", "ActiveState"), "inactive");
    // The first connection starts holdfast; it waits in the queue meanwhile.
    let tcp = Target::local(8080);
    let t = Instant::now();
    let first = sb
        .in_netns(|| http_get(&tcp, "/"))
        .expect("the activating request");
    assert_eq!(first.status, 200);
    eprintln!(
        "socket activation: first request answered in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    sb.wait_show("holdfast.service", "ActiveState", "active");
    let log = sb.wait_messages("holdfast.service", "origin=socket-activated", 4);
    assert_eq!(
        log.matches("adopted a socket passed by systemd").count(),
        2,
        "{log}"
    );
    assert_eq!(log.matches("origin=socket-activated").count(), 4, "{log}");
    // A restart of the service under load: the socket unit holds the queue.
    let unix = Target::Unix(sb.path(&sock_path));
    let mut loads = Vec::new();
    for target in [tcp.clone(), unix.clone()] {
        loads.push(Load::start(common::LoadSpec {
            netns: Some(sb.netns()),
            path: "/?sleep=5".into(),
            max_duration: Duration::from_secs(120),
            ..common::LoadSpec::new(target)
        }));
    }
    wait_until(DEADLINE, "load", || {
        loads
            .iter()
            .all(|l| l.requests_so_far() >= 50)
            .then_some(())
    });
    sb.run(&["systemctl", "restart", "holdfast.service"]);
    let at: Vec<u64> = loads.iter().map(Load::requests_so_far).collect();
    wait_until(DEADLINE, "load after the restart", || {
        loads
            .iter()
            .zip(&at)
            .all(|(l, a)| l.requests_so_far() >= a + 50)
            .then_some(())
    });
    let reports: Vec<_> = loads.into_iter().map(Load::stop).collect();
    for r in &reports {
        eprintln!("socket activation, then restart of the service under load: {r}");
    }
    // A final stop of the service: the socket unit still listens, its path
    // stays (systemd's), holdfast's keeper link goes; a connection starts
    // holdfast again.
    sb.run(&["systemctl", "stop", "holdfast.service"]);
    assert_eq!(sb.show("holdfast.service", "ActiveState"), "inactive");
    assert_eq!(sb.show("holdfast.socket", "ActiveState"), "active");
    let keeper = sock_path.replace("/app.sock", "/.app.sock.holdfast");
    assert!(sb.path(&sock_path).exists());
    assert!(!sb.path(&keeper).exists(), "{keeper} left behind");
    let again = sb
        .in_netns(move || http_get(&unix, "/"))
        .expect("re-activated by the unix socket");
    assert_eq!(again.status, 200);
    sb.wait_show("holdfast.service", "ActiveState", "active");
    assert!(
        sb.path(&keeper).exists(),
        "{keeper}: holdfast keeps a link while it runs"
    );
    // Both stopped: no socket file left (RemoveOnStop=yes), no keeper.
    sb.run(&["systemctl", "stop", "holdfast.service", "holdfast.socket"]);
    assert!(!sb.path(&sock_path).exists(), "{sock_path} left behind");
    assert!(!sb.path(&keeper).exists(), "{keeper} left behind");
    for r in &reports {
        assert_eq!(r.count("refused"), 0, "{r}");
        r.assert_clean(100);
    }
}

#[test]
fn the_watchdog_restarts_a_stalled_holdfast_and_requests_in_flight_finish() {
    let sb = shared("watchdog");
    let app = App::new(
        &sb,
        "watchdog",
        8087,
        r#"
[app]
command = ["{worker}"]
workers = 2
drain_timeout = "10s"
"#,
    );
    app.dropin("watchdog", "[Service]\nWatchdogSec=2s\n");
    app.must("start");
    let inodes = listener_inodes(&app);
    let first = app.main_pid();
    let inflight = InFlight::start(&app, &app.tcp(), "/?sleep=3500", 4);
    wait_until(DEADLINE, "4 requests in flight", || {
        (connections(&app) == 4).then_some(())
    });
    // A stalled event loop: the pings stop.
    let stalled = Instant::now();
    sb.run(&["kill", "-STOP", &first.to_string()]);
    let (ok, failed) = inflight.results();
    wait_until(DEADLINE, "holdfast restarted", || {
        let pid = app.main_pid();
        (pid != 0 && pid != first && app.show("ActiveState") == "active").then_some(())
    });
    eprintln!(
        "watchdog: restarted {:.2}s after the stall; 4 requests in flight: {ok} answered, failed {failed:?}",
        stalled.elapsed().as_secs_f64()
    );
    let log = app.messages();
    assert!(log.contains("Watchdog timeout (limit 2s)!"), "{log}");
    assert!(
        log.contains("Main process exited, code=killed, status=6/ABRT"),
        "{log}"
    );
    assert_eq!(listener_inodes(&app), inodes, "the sockets did not survive");
    assert_eq!((ok, failed.len()), (4, 0), "failed: {failed:?}");
    assert_eq!(get(&app, &app.tcp(), "/").expect("served").0, 200);
}

#[test]
fn fd_store_limits_are_warned_about_as_the_readme_says() {
    let sb = shared("fdstore");
    let app = App::new(&sb, "fdstore", 8088, "[app]\ncommand = [\"{worker}\"]\n");
    // No store: one warning per socket holdfast offers.
    app.dropin("fdstore", "[Service]\nFileDescriptorStoreMax=0\n");
    app.must("start");
    let warning = "Cannot store more fds than FileDescriptorStoreMax=0, closing remaining.";
    let log = sb.wait_messages(&app.unit(), warning, 2);
    assert_eq!(log.matches(warning).count(), 2, "{log}");
    assert_eq!(app.show("NFileDescriptorStore"), "0");
    app.must("stop");
    // The unit's own 16: both stored. Lowered to 1 by a daemon-reload while
    // holdfast runs, systemd drops one of them.
    app.dropin("fdstore", "[Service]\n");
    app.must("start");
    sb.wait_show(&app.unit(), "NFileDescriptorStore", "2");
    app.dropin("fdstore", "[Service]\nFileDescriptorStoreMax=1\n");
    let full = "Failed to add fd to store: Exchange full";
    let log = sb.wait_messages(&app.unit(), full, 1);
    assert_eq!(log.matches(full).count(), 1, "{log}");
    assert_eq!(app.show("NFileDescriptorStore"), "1");
    // The next restart takes the one left and binds the other anew.
    app.must("restart");
    // The third holdfast of this unit (0, 16, then 1 stored socket).
    let log = sb.wait_messages(&app.unit(), "holdfast started", 3);
    let last_start = log.rfind("holdfast started").expect("started");
    let restarted = &log[..last_start];
    let restarted = &restarted[restarted
        .rfind("socket activation: taking")
        .expect("taking")..];
    assert_eq!(
        restarted.matches("origin=fd-store").count(),
        2,
        "{restarted}"
    );
    assert_eq!(restarted.matches("origin=bound").count(), 1, "{restarted}");
    app.must("stop");
    // FDSTORE=0 in the unit's environment: no offer, no warning.
    app.dropin(
        "fdstore",
        "[Service]\nFileDescriptorStoreMax=0\nEnvironment=FDSTORE=0\n",
    );
    app.must("start");
    app.must("stop");
    assert_eq!(
        app.messages().matches(warning).count(),
        2,
        "{}",
        app.messages()
    );
}

#[test]
fn delegate_gives_each_worker_a_cgroup_its_daemon_dies_with() {
    let sb = shared("delegate");
    let app = App::new(
        &sb,
        "delegate",
        8089,
        r#"
[app]
command = ["{worker}", "--daemon"]
workers = 2
"#,
    );
    app.must("start");
    sb.wait_messages(&app.unit(), "a cgroup per worker", 1);
    let dir = format!(
        "/sys/fs/cgroup/system.slice/system-holdfast.slice/{}",
        app.unit()
    );
    // Each worker's cgroup holds the worker and its setsid daemon.
    let members = |name: &str| -> Vec<u32> {
        sb.sh(&format!("cat {dir}/{name}/cgroup.procs"))
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let cgroups = || -> Vec<String> {
        let mut v: Vec<String> = sb
            .sh(&format!("cd {dir} && ls -d worker-* 2>/dev/null; true"))
            .split_whitespace()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    let before = cgroups();
    assert_eq!(before.len(), 2, "{before:?}");
    let mut daemons = Vec::new();
    for cg in &before {
        let pids = wait_until(DEADLINE, "worker and daemon in the cgroup", || {
            let m = members(cg);
            (m.len() == 2).then_some(m)
        });
        // The daemon left the worker's session (setsid): only the cgroup holds it.
        let sids: Vec<String> = pids
            .iter()
            .map(|p| {
                sb.sh(&format!("cut -d' ' -f6 /proc/{p}/stat"))
                    .trim()
                    .to_string()
            })
            .collect();
        assert_ne!(sids[0], sids[1], "{cg}: {pids:?}");
        daemons.extend(pids);
    }
    // A rolling restart replaces both workers: their cgroups, daemons included, go.
    app.must("reload");
    wait_until(DEADLINE, "the old cgroups removed", || {
        let now = cgroups();
        (now.len() == 2 && now.iter().all(|c| !before.contains(c))).then_some(())
    });
    for p in &daemons {
        assert!(
            !sb.path(&format!("/proc/{p}")).exists(),
            "process {p} outlived its worker"
        );
    }
    app.must("stop");
    assert_eq!(app.cgroup_pids(), Vec::<u32>::new());
}

/// Today's way to run a new holdfast: a package replaces the binary, then
/// `systemctl restart`. The sockets survive (fd store) and no request fails,
/// but every worker starts again (the test worker serves before it is
/// ready, so the gap an app's boot leaves is not measured here). This is the
/// baseline, and the pattern, for a test of the in-place upgrade
/// (`holdfast upgrade`, same pid): install with `copy_in`, run it with
/// `run_binary`, replace it, then upgrade instead of restart.
#[test]
fn a_package_upgrade_then_restart_runs_the_new_binary_and_fails_nothing() {
    let sb = shared("package");
    let app = App::new(
        &sb,
        "package",
        8090,
        r#"
[app]
command = ["{worker}", "--ready-delay-ms", "1000"]
workers = 2
"#,
    );
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_holdfast"));
    let installed = "/usr/local/lib/holdfast/holdfast";
    sb.copy_in(built, installed);
    app.run_binary(installed);
    app.must("start");
    let first = app.main_pid();
    let exe = |pid: u32| {
        sb.sh(&format!("readlink /proc/{pid}/exe"))
            .trim()
            .to_string()
    };
    assert_eq!(exe(first), installed);
    let mut spec = app.load_spec(app.tcp());
    spec.path = "/?sleep=5".into();
    spec.max_duration = Duration::from_secs(60);
    let load = Load::start(spec);
    wait_until(DEADLINE, "load", || {
        (load.requests_so_far() >= 100).then_some(())
    });
    // The package manager: a new file renamed over the old one.
    sb.copy_in(built, installed);
    assert_eq!(exe(first), format!("{installed} (deleted)"));
    let t = Instant::now();
    app.must("restart");
    let took = t.elapsed();
    let at = load.requests_so_far();
    wait_until(DEADLINE, "load after the restart", || {
        (load.requests_so_far() >= at + 100).then_some(())
    });
    let report = load.stop();
    let second = app.main_pid();
    eprintln!(
        "package upgrade + systemctl restart: took {:.2}s (workers ready after 1 s); {report}",
        took.as_secs_f64()
    );
    assert_ne!(second, first);
    assert_eq!(exe(second), installed);
    report.assert_clean(200);
    // READY=1 waited for the new workers (1 s each to READY=1).
    assert!(took >= Duration::from_secs(1), "{took:?}");
}

/// The in-place upgrade under systemd: a package renames a new binary over
/// the installed one, its postinst runs `holdfast upgrade --wait`, then an
/// operator sends SIGUSR2 with `systemctl kill --kill-whom=main`. MAINPID
/// never changes, the main process runs the new file, every worker is the
/// same process, no request fails, systemd sees the unit active with
/// holdfast's STATUS= and a watchdog ping after each adoption, and never
/// restarts it.
#[test]
fn an_in_place_upgrade_keeps_mainpid_and_every_worker() {
    let sb = shared("upgrade");
    let app = App::new(
        &sb,
        "upgrade",
        8091,
        r#"
[app]
command = ["{worker}", "--ready-delay-ms", "1000", "--lame-duck-ms", "100"]
workers = 2
"#,
    );
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_holdfast"));
    let installed = "/usr/local/lib/holdfast/holdfast";
    sb.copy_in(built, installed);
    app.run_binary(installed);
    // A watchdog short enough to notice a missed ping across the upgrades.
    app.dropin("watchdog", "[Service]\nWatchdogSec=2s\n");
    app.must("start");
    let pid = app.main_pid();
    let exe = |pid: u32| {
        sb.sh(&format!("readlink /proc/{pid}/exe"))
            .trim()
            .to_string()
    };
    assert_eq!(exe(pid), installed);
    let workers = |s: &serde_json::Value| {
        let mut v: Vec<u64> = s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter_map(|w| w["pid"].as_u64())
            .collect();
        v.sort_unstable();
        v
    };
    let before = workers(&app.status());
    let mut spec = app.load_spec(app.tcp());
    spec.path = "/?sleep=5".into();
    spec.max_duration = Duration::from_secs(60);
    let load = Load::start(spec);
    wait_until(DEADLINE, "load", || {
        (load.requests_so_far() >= 100).then_some(())
    });
    let pinged = |sb: &Sandbox| -> u64 {
        sb.show(&app.unit(), "WatchdogTimestampMonotonic")
            .parse()
            .unwrap_or(0)
    };
    // systemd logs each notification at debug level: what it was told.
    sb.run(&["systemd-analyze", "log-level", "debug"]);
    // The package manager: a new file renamed over the old one; its postinst.
    sb.copy_in(built, installed);
    assert_eq!(exe(pid), format!("{installed} (deleted)"));
    let ping_before = pinged(&sb);
    let out = sb.exec(&[installed, "upgrade", "--wait", "--control", &app.control()]);
    assert!(
        out.status.success(),
        "upgrade: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        app.messages()
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        format!("upgraded from 0.1.0 to 0.1.0 (pid {pid}, 2 workers adopted)")
    );
    assert_eq!(app.main_pid(), pid);
    assert_eq!(
        exe(pid),
        installed,
        "the main process does not run the new file"
    );
    assert!(
        pinged(&sb) > ping_before,
        "no watchdog ping since the upgrade"
    );
    // RELOADING=1 (with MONOTONIC_USEC) from holdfast's pid before the exec,
    // READY=1 from the same pid after the adoption.
    let from_pid = format!("Got notification message from PID {pid} (");
    let notes = sb.wait_messages(&app.unit(), &format!("{from_pid}READY=1"), 1);
    sb.run(&["systemd-analyze", "log-level", "info"]);
    let told: Vec<&str> = notes
        .lines()
        .filter_map(|l| l.split_once(&from_pid).map(|(_, rest)| rest))
        .collect();
    // In order: RELOADING=1, the ping before the exec, the ping after the
    // adoption, READY=1 (periodic pings may fall in between).
    let reloading = told
        .iter()
        .position(|l| l.starts_with("RELOADING=1, MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no RELOADING=1: {told:#?}"));
    let ready = told
        .iter()
        .position(|l| l.starts_with("READY=1, STATUS=2/2 workers ready, generation 1)"))
        .unwrap_or_else(|| panic!("no READY=1: {told:#?}"));
    assert!(
        told[reloading].contains("STATUS=2/2 workers ready, generation 1; upgrading holdfast)"),
        "{told:#?}"
    );
    let pings = told[reloading..ready]
        .iter()
        .filter(|l| l.starts_with("WATCHDOG=1"))
        .count();
    assert!(reloading < ready && pings >= 2, "{told:#?}");
    // By signal, to the main process only.
    let ping_before = pinged(&sb);
    sb.run(&[
        "systemctl",
        "kill",
        "--kill-whom=main",
        "--signal=USR2",
        &app.unit(),
    ]);
    sb.wait_messages(&app.unit(), "workers adopted) took=", 2);
    wait_until(DEADLINE, "a ping after the second upgrade", || {
        (pinged(&sb) > ping_before).then_some(())
    });
    let at = load.requests_so_far();
    wait_until(DEADLINE, "load after the upgrades", || {
        (load.requests_so_far() >= at + 100).then_some(())
    });
    let report = load.stop();
    eprintln!("upgrade in place under systemd: {report}");
    report.assert_clean(200);
    let status = app.status();
    assert_eq!(workers(&status), before, "the workers were replaced");
    assert_eq!(status["counters"]["upgrades"], 2, "{status}");
    assert_eq!(app.main_pid(), pid);
    assert_eq!(app.show("ActiveState"), "active");
    assert_eq!(app.show("NRestarts"), "0");
    assert_eq!(app.show("StatusText"), "2/2 workers ready, generation 1");
    let messages = app.messages();
    assert!(!messages.contains("Watchdog timeout"), "{messages}");
    // A stop still drains and leaves nothing.
    app.must("stop");
    assert_eq!(app.cgroup_pids(), Vec::<u32>::new());
}
