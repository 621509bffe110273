//! The in-place upgrade (issue 13): `holdfast upgrade` and SIGUSR2 exec the
//! new binary in the same pid and the workers never notice; every way it can
//! fail leaves everything serving. Each test runs the real binary with real
//! test workers under load and asserts: no failed request, holdfast's pid
//! unchanged, the same worker pids before and after (unless the test is
//! about replacing them), and the counters carrying on.
//!
//! The "bad binaries" are real executables: files written by the test (a
//! script, an ELF header for another machine, a file without +x), system
//! binaries (`/bin/false`), and copies of the test worker that act as a new
//! holdfast by the name they are copied under (see the test worker's
//! `impostor.rs`): one that aborts, one that hangs, one that reads only
//! format 2, and one that passes the check but spoils the state it hands to
//! the real holdfast, so that the fallback after the exec runs for real.
//! holdfast itself has no test hook.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{wait_until, Holdfast, Load, LoadSpec, DEADLINE};
use nix::sys::signal::Signal;
use serde_json::Value;

const CONFIG: &str = r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}", "--lame-duck-ms", "200"]
workers = 2
drain_timeout = "10s"
"#;

fn text(o: &Output) -> String {
    common::describe(o)
}

/// `holdfast ARGS --control {dir}/holdfast.sock`.
fn ctl(h: &Holdfast, args: &[&str]) -> Output {
    h.ctl(args)
}

fn status(h: &Holdfast) -> Value {
    let o = ctl(h, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {}", text(&o)))
}

/// Every worker process's pid, sorted.
fn pids(s: &Value) -> Vec<u32> {
    let mut v: Vec<u32> = s["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect();
    v.sort_unstable();
    v
}

fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {s}"))
}

/// A load of `connections` keep-alive clients on holdfast's TCP listener.
fn load(h: &Holdfast, connections: usize, path: &str) -> Load {
    let mut spec = LoadSpec::new(h.tcp());
    spec.connections = connections;
    spec.path = path.into();
    spec.max_duration = Duration::from_secs(240);
    spec.max_requests = 5_000_000;
    let load = Load::start(spec);
    wait_until(DEADLINE, "the load to start", || {
        (load.requests_so_far() >= 50).then_some(())
    });
    load
}

/// Lets the load make `n` more requests.
fn more(load: &Load, n: u64) {
    let at = load.requests_so_far();
    wait_until(DEADLINE, "more requests", || {
        (load.requests_so_far() >= at + n).then_some(())
    });
}

/// Starts holdfast with `config` and waits until every worker is ready.
fn start(config: &str) -> Holdfast {
    let h = Holdfast::start(config);
    h.wait_log("all workers ready");
    h
}

/// `src` copied to `{dir}/name`, executable.
fn copy_as(h: &Holdfast, src: &str, name: &str) -> PathBuf {
    let dst = h.dir.path().join(name);
    fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {src} to {}: {e}", dst.display()));
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod");
    dst
}

/// What a refused upgrade must leave: the same pids, the same holdfast, the
/// refusal counted, nothing upgrading, every request answered.
fn assert_refused(binary: &Path, h: &Holdfast, want: &str) {
    let load = load(h, 8, "/?sleep=2");
    let before = status(h);
    let o = ctl(
        h,
        &["upgrade", "--wait", "--binary", &binary.to_string_lossy()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("upgrade refused, still running holdfast") && said.contains(want),
        "want {want:?} in:\n{}",
        text(&o)
    );
    let after = status(h);
    assert_eq!(pids(&after), pids(&before));
    assert_eq!(after["holdfast"]["pid"], before["holdfast"]["pid"]);
    assert_eq!(after["holdfast"]["upgrading"], false);
    assert_eq!(counter(&after, "failed_upgrades"), 1);
    assert_eq!(counter(&after, "upgrades"), 0);
    assert!(
        h.log().contains("upgrade of holdfast failed"),
        "{}",
        h.log()
    );
    // Still whole: a rollout works.
    let o = ctl(h, &["restart", "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    more(&load, 100);
    let report = load.stop();
    eprintln!("refused ({want}): {report}");
    report.assert_clean(200);
}

#[test]
fn a_missing_binary_is_refused_and_nothing_changes() {
    let h = start(CONFIG);
    let missing = h.dir.path().join("no-such-holdfast");
    assert_refused(&missing, &h, "No such file or directory");
}

#[test]
fn a_binary_that_is_not_executable_is_refused() {
    let h = start(CONFIG);
    let bin = copy_as(&h, env!("CARGO_BIN_EXE_holdfast"), "holdfast-no-x");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o644)).expect("chmod");
    assert_refused(&bin, &h, "not executable (mode 644)");
}

#[test]
fn a_binary_for_another_machine_or_a_script_is_refused() {
    let h = start(CONFIG);
    // A 64-bit little-endian ELF executable for AArch64 (e_machine 183).
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    let arm = h.dir.path().join("holdfast-aarch64");
    fs::write(&arm, &elf).expect("write");
    fs::set_permissions(&arm, fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_refused(
        &arm,
        &h,
        "built for 64-bit little-endian AArch64, but this machine runs 64-bit little-endian x86-64",
    );
    let script = h.dir.path().join("holdfast-script");
    fs::write(&script, "#!/bin/sh\nexit 1\n").expect("write");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
    let o = ctl(
        &h,
        &["upgrade", "--wait", "--binary", &script.to_string_lossy()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("it is a script (#!/bin/sh), not a holdfast binary"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_binary_that_crashes_or_fails_at_start_is_refused() {
    let h = start(CONFIG);
    let abort = copy_as(&h, common::test_worker_bin(), "holdfast-abort");
    assert_refused(&abort, &h, "`version --json` ended with killed by SIGABRT");
    // An ELF that runs and exits 1, and a program that is no holdfast.
    for (bin, want) in [
        (
            PathBuf::from("/bin/false"),
            "`version --json` ended with exit status 1",
        ),
        (
            PathBuf::from(common::test_worker_bin()),
            "`version --json` ended with exit status 64",
        ),
    ] {
        let o = ctl(
            &h,
            &["upgrade", "--wait", "--binary", &bin.to_string_lossy()],
        );
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(want),
            "want {want:?}: {}",
            text(&o)
        );
    }
    assert_eq!(counter(&status(&h), "failed_upgrades"), 3);
}

#[test]
fn a_binary_that_cannot_read_this_state_format_is_refused() {
    let h = start(CONFIG);
    let future = copy_as(&h, common::test_worker_bin(), "holdfast-future");
    assert_refused(
        &future,
        &h,
        "is holdfast 9.0.0, which reads handover format(s) [2]; this holdfast (0.1.0) writes format 1",
    );
}

#[test]
fn a_binary_that_never_answers_is_killed_and_refused() {
    let h = start(CONFIG);
    let hang = copy_as(&h, common::test_worker_bin(), "holdfast-hang");
    assert_refused(
        &hang,
        &h,
        "`version --json` did not finish within 10s; killed it",
    );
    // The trial run was killed (its group) and reaped.
    assert!(
        common::tagged_pids(h.tag())
            .iter()
            .all(|p| !fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.to_string_lossy().contains("holdfast-hang"))),
        "the hanging trial run is still there"
    );
}

/// The number of fds `pid` has open: the fewest of 5 looks 20 ms apart, so
/// a control connection of the moment is not counted as a leak.
fn fds(pid: u32) -> usize {
    (0..5)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
        })
        .min()
        .unwrap_or(0)
}

/// `upgrade --wait` (plus `args`): asserts it succeeded, returns its message
/// and how long the command took.
fn upgrade_wait(h: &Holdfast, args: &[&str]) -> (String, Duration) {
    let mut all = vec!["upgrade", "--wait"];
    all.extend(args);
    let t = Instant::now();
    let o = ctl(h, &all);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    (String::from_utf8_lossy(&o.stdout).trim().to_string(), took)
}

fn listener_inode(s: &Value) -> u64 {
    s["listeners"][0]["inode"].as_u64().expect("inode")
}

#[test]
fn an_upgrade_to_the_same_binary_keeps_every_worker_socket_and_counter() {
    let mut h = start(CONFIG);
    let load = load(&h, 16, "/?sleep=2");
    // Counters to carry over: a rollout (2 replacements) first.
    let o = ctl(&h, &["restart", "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let before = status(&h);
    let fds_before = fds(h.pid());
    let workers = pids(&before);
    assert_eq!(workers.len(), 2);
    // Status requests all along, each on a fresh connection, as scripts do:
    // the upgrade waits for those under way; new ones queue on the socket.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let statuses = {
        let (stop, sock) = (stop.clone(), h.dir.path().join("holdfast.sock"));
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let answer = std::os::unix::net::UnixStream::connect(&sock).and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_secs(10)))?;
                    c.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n")?;
                    let mut line = String::new();
                    std::io::BufReader::new(c).read_line(&mut line)?;
                    Ok(line)
                });
                match answer {
                    Ok(l) if l.starts_with("{\"v\":1,\"ok\":true") => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };

    // A script's connection held open across the upgrades, with half a
    // request line sent before them: the new image reads the rest and
    // answers, then the next request on the same connection.
    let mut held = std::os::unix::net::UnixStream::connect(h.dir.path().join("holdfast.sock"))
        .expect("connect");
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    {
        use std::io::Write;
        held.write_all(b"{\"v\":1,\"cmd\":")
            .expect("half a request");
    }

    // `upgrade --wait`: answered by the new image, on the same connection.
    let (said, took) = upgrade_wait(&h, &[]);
    assert_eq!(
        said,
        format!(
            "upgraded from 0.1.0 to 0.1.0 (pid {}, 2 workers adopted)",
            h.pid()
        )
    );
    more(&load, 50);
    // SIGUSR2 does the same.
    h.signal(Signal::SIGUSR2);
    h.wait_log_count("workers adopted) took=", 2);
    more(&load, 50);
    // Without --wait: answered as the exec starts.
    let o = ctl(&h, &["upgrade"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("upgrading holdfast 0.1.0 in place to "),
        "{}",
        text(&o)
    );
    h.wait_log_count("workers adopted) took=", 3);

    {
        use std::io::{BufRead, Write};
        held.write_all(b"\"status\"}\n").expect("the rest");
        let mut reader = std::io::BufReader::new(held.try_clone().expect("clone"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("answer");
        assert!(line.starts_with("{\"v\":1,\"ok\":true"), "{line}");
        held.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n")
            .expect("again");
        line.clear();
        reader.read_line(&mut line).expect("answer");
        assert!(line.starts_with("{\"v\":1,\"ok\":true"), "{line}");
    }
    drop(held);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (answered, failed) = statuses.join().expect("status thread");
    assert!(
        answered > 0 && failed.is_empty(),
        "{answered} answered, failed: {failed:?}"
    );
    let after = status(&h);
    assert_eq!(pids(&after), workers, "the workers were replaced");
    assert_eq!(after["holdfast"]["pid"].as_u64(), Some(u64::from(h.pid())));
    assert_eq!(listener_inode(&after), listener_inode(&before));
    assert_eq!(counter(&after, "upgrades"), 3);
    assert_eq!(counter(&after, "failed_upgrades"), 0);
    assert_eq!(after["counters"]["replacements"]["rollout"], 2);
    assert!(
        after["holdfast"]["uptime_secs"].as_f64() > before["holdfast"]["uptime_secs"].as_f64(),
        "uptime restarted"
    );
    assert_eq!(fds(h.pid()), fds_before, "holdfast's fd count changed");
    // The adopted holdfast runs everything as before: a rollout, whose new
    // workers report READY=1 on the same notify socket, and a clean stop.
    let o = ctl(&h, &["restart", "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    more(&load, 100);
    let report = load.stop();
    eprintln!("3 upgrades, the first took {took:?} (client side): {report}");
    report.assert_clean(300);
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "{}", h.log());
    let log = h.log();
    assert!(!log.contains("ERROR"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
}

#[test]
fn an_upgrade_in_the_middle_of_a_rollout_hands_the_rollout_over() {
    // New workers take 2 s to be ready: the upgrade lands while slot 0's
    // replacement is starting.
    let config = CONFIG.replace(
        "\"--lame-duck-ms\", \"200\"",
        "\"--lame-duck-ms\", \"200\", \"--ready-delay-ms\", \"2000\"",
    );
    let h = Holdfast::start(&config);
    h.wait_log("all workers ready");
    let load = load(&h, 16, "/?sleep=2");
    // A deploy, whose client waits for its end.
    let waiter = {
        let sock = h.dir.path().join("holdfast.sock");
        let bin = env!("CARGO_BIN_EXE_holdfast");
        std::thread::spawn(move || {
            std::process::Command::new(bin)
                .args(["restart", "--wait", "--control"])
                .arg(sock)
                .output()
                .expect("restart --wait")
        })
    };
    h.wait_log("rollout started generation=2");
    wait_until(DEADLINE, "the new worker of slot 0", || {
        h.log()
            .lines()
            .any(|l| l.contains("worker spawned slot=0") && l.contains("generation=2"))
            .then_some(())
    });
    let before = status(&h);
    assert_eq!(before["holdfast"]["rollout"]["generation"], 2);
    let (said, _) = upgrade_wait(&h, &[]);
    assert!(said.contains("3 workers adopted"), "{said}");
    let after = status(&h);
    // The starting worker is the same process, still starting, in the same rollout.
    assert_eq!(pids(&after), pids(&before));
    assert_eq!(after["holdfast"]["rollout"]["generation"], 2);
    // The rollout ends in the new image; the deploy's client hears it there.
    let o = waiter.join().expect("waiter");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("generation 2 is serving (2 workers"),
        "{}",
        text(&o)
    );
    more(&load, 100);
    let report = load.stop();
    eprintln!("upgrade during a rollout: {report}");
    report.assert_clean(200);
    let s = status(&h);
    assert_eq!(s["holdfast"]["generation"], 2);
    assert_eq!(counter(&s, "upgrades"), 1);
    assert_eq!(s["counters"]["replacements"]["rollout"], 2);
    assert!(!h.log().contains("ERROR"), "{}", h.log());
}

#[test]
fn an_upgrade_while_a_worker_drains_lets_it_finish_its_request() {
    let h = start(CONFIG);
    let before = status(&h);
    let old = pids(&before);
    // A slow request on each old worker keeps it draining for 5 s: slow
    // requests go out until each worker holds one.
    let mut slow = Vec::new();
    wait_until(DEADLINE, "a slow request on each worker", || {
        let t = h.tcp();
        slow.push(std::thread::spawn(move || {
            common::http_get(&t, "/?sleep=5000")
        }));
        std::thread::sleep(Duration::from_millis(100));
        let s = status(&h);
        let busy = s["workers"]
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["connections"].as_u64().unwrap_or(0) > 0));
        busy.then_some(())
    });
    let load = load(&h, 8, "/?sleep=2");
    let o = ctl(&h, &["restart"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    h.wait_log("draining worker");
    let draining = status(&h);
    let states: Vec<&str> = draining["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["state"].as_str())
        .collect();
    assert!(states.contains(&"draining"), "{states:?}");
    let (said, _) = upgrade_wait(&h, &[]);
    assert!(said.contains("upgraded from"), "{said}");
    let adopted = status(&h);
    assert_eq!(pids(&adopted), pids(&draining));
    // The drained workers finish their requests and exit; the new image reaps them.
    for t in slow {
        let r = t.join().expect("slow request").expect("answered");
        assert_eq!(r.status, 200);
        assert!(old.contains(&r.pid().expect("X-Pid")), "{r:?}");
    }
    h.wait_log("rollout finished generation=2");
    wait_until(DEADLINE, "the old workers to be reaped", || {
        let log = h.log();
        old.iter()
            .all(|p| {
                log.lines()
                    .any(|l| l.contains("worker exited") && l.contains(&format!("pid={p} ")))
            })
            .then_some(())
    });
    more(&load, 100);
    let report = load.stop();
    eprintln!("upgrade while draining: {report}");
    report.assert_clean(200);
    let s = status(&h);
    assert!(pids(&s).iter().all(|p| !old.contains(p)));
    assert_eq!(s["counters"]["drain_kills"], 0);
    assert!(!h.log().contains("ERROR"), "{}", h.log());
}

/// Upgrades to an impostor that passes the check and then hands the real
/// holdfast a spoiled state: the new image keeps the sockets and the
/// workers, logs loudly, and replaces the workers with a rolling restart.
fn falls_back(impostor: &str, want: &str) {
    let h = Holdfast::launch(
        common::Launch {
            program: "{holdfast}",
            args: &["run", "--config", "{config}"],
            env: &[("HOLDFAST_IMPOSTOR_REAL", env!("CARGO_BIN_EXE_holdfast"))],
            stdin: None,
        },
        Some(&CONFIG.replace(
            "\"--lame-duck-ms\", \"200\"",
            "\"--lame-duck-ms\", \"200\", \"--log-lines\", \"5\"",
        )),
    );
    h.wait_log("all workers ready");
    let load = load(&h, 16, "/?sleep=2");
    let bin = copy_as(&h, common::test_worker_bin(), impostor);
    let before = status(&h);
    let old = pids(&before);
    let o = ctl(
        &h,
        &["upgrade", "--wait", "--binary", &bin.to_string_lossy()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("upgrade failed after the exec: the new holdfast (0.1.0, pid")
            && said.contains(want)
            && said.contains("it kept 1 listening socket(s) and 2 worker(s) and replaces them with a rolling restart from the config file"),
        "{}",
        text(&o)
    );
    h.wait_log("rollout finished");
    let after = status(&h);
    assert_eq!(after["holdfast"]["pid"], before["holdfast"]["pid"]);
    assert_eq!(listener_inode(&after), listener_inode(&before));
    let new = pids(&after);
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|p| !old.contains(p)), "{old:?} -> {new:?}");
    more(&load, 200);
    let report = load.stop();
    eprintln!("fallback ({impostor}): {report}");
    report.assert_clean(300);
    // The old workers drained (exit 0) and their output arrived, once.
    let log = h.log();
    for p in &old {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("pid={p} ")) && l.contains("reason=exit status 0")),
            "worker {p} did not drain:\n{log}"
        );
        assert_eq!(
            log.matches(&format!("] w0 {p} 1 ")).count()
                + log.matches(&format!("] w1 {p} 1 ")).count(),
            1,
            "{log}"
        );
        assert_eq!(
            log.lines()
                .filter(|l| l.contains(&format!("{p} done 5")))
                .count(),
            1,
            "{log}"
        );
    }
    let loud = log
        .lines()
        .find(|l| l.contains("could not adopt the previous image's state"))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(loud.contains("ERROR"), "{loud}");
    // And it runs on: another upgrade, to itself, adopts cleanly.
    let (said, _) = upgrade_wait(&h, &[]);
    assert!(said.contains("2 workers adopted"), "{said}");
}

#[test]
fn a_state_in_a_format_the_new_image_cannot_read_falls_back_to_a_rolling_restart() {
    falls_back(
        "holdfast-impostor-format",
        "the handover state is in format 99 (written by holdfast 9.9.9-impostor/0.1.0); this holdfast (0.1.0) reads format(s) [1]",
    );
}

#[test]
fn a_corrupt_state_falls_back_to_a_rolling_restart() {
    falls_back(
        "holdfast-impostor-corrupt",
        "the handover state is not readable: EOF while parsing",
    );
}

/// Why the exec must come from the thread that forked the workers, on this
/// kernel: PR_SET_PDEATHSIG fires when the *thread* that forked a child
/// exits, and an exec ends every other thread. A child forked by holdfast's
/// main thread (as every worker is) survives the main thread's exec; one
/// forked by another thread is signalled by that exec.
#[test]
fn the_parent_death_signal_follows_the_forking_thread_across_an_exec() {
    const SCRIPT: &str = r#"
import ctypes, os, signal, sys, threading, time
mode, out = sys.argv[1], sys.argv[2]
r, w = os.pipe()
def fork_child():
    pid = os.fork()
    if pid == 0:
        def got(sig, frame):
            open(out, "w").write("signalled")
            os._exit(0)
        signal.signal(signal.SIGUSR1, got)
        ctypes.CDLL(None).prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
        os.write(w, b"x")
        time.sleep(3)
        open(out, "w").write("not signalled")
        os._exit(0)
    return pid
if mode == "main":
    fork_child()
else:
    # The forking thread lives on until the exec ends it.
    threading.Thread(target=lambda: (fork_child(), time.sleep(60)), daemon=True).start()
os.read(r, 1)
os.execv("/bin/sleep", ["sleep", "4"])
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut outcomes = Vec::new();
    for mode in ["main", "thread"] {
        let out = dir.path().join(mode);
        let mut child = std::process::Command::new("python3")
            .args(["-c", SCRIPT, mode])
            .arg(&out)
            .spawn()
            .expect("python3");
        let said = wait_until(DEADLINE, "the forked child's report", || {
            fs::read_to_string(&out).ok().filter(|s| !s.is_empty())
        });
        let _ = child.kill();
        let _ = child.wait();
        outcomes.push((mode, said));
    }
    assert_eq!(
        outcomes,
        [
            ("main", "not signalled".to_string()),
            ("thread", "signalled".to_string())
        ]
    );
}

/// A NOTIFY_SOCKET that records each datagram with the time it arrived.
struct Recorder {
    _dir: tempfile::TempDir,
    path: PathBuf,
    notes: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start() -> Recorder {
        let dir = tempfile::Builder::new()
            .prefix("holdfast-notify-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let notes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (n, s) = (notes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let started = Instant::now();
            while !s.load(std::sync::atomic::Ordering::SeqCst)
                && started.elapsed() < Duration::from_secs(300)
            {
                if let Ok(len) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                    n.lock().expect("notes").push((Instant::now(), text));
                }
            }
        });
        Recorder {
            _dir: dir,
            path,
            notes,
            stop,
            thread: Some(thread),
        }
    }

    fn notes(&self) -> Vec<(Instant, String)> {
        self.notes.lock().expect("notes").clone()
    }

    fn wait(&self, what: &str, cond: impl Fn(&[(Instant, String)]) -> bool) {
        wait_until(DEADLINE, what, || cond(&self.notes()).then_some(()));
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn has(note: &str, line: &str) -> bool {
    note.lines().any(|l| l == line)
}

fn get<'a>(note: &'a str, key: &str) -> Option<&'a str> {
    note.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// CLOCK_MONOTONIC in µs, the clock of MONOTONIC_USEC.
fn monotonic_usec() -> i128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as i128 * 1_000_000 + t.tv_nsec() as i128 / 1000
}

#[test]
fn under_systemd_the_upgrade_says_reloading_then_ready_and_the_watchdog_is_fed() {
    let rec = Recorder::start();
    let socket = rec.path.to_string_lossy().into_owned();
    let h = Holdfast::launch(
        common::Launch {
            program: "{holdfast}",
            args: &["run", "--config", "{config}"],
            env: &[
                ("NOTIFY_SOCKET", socket.as_str()),
                ("WATCHDOG_USEC", "1000000"),
            ],
            stdin: None,
        },
        Some(CONFIG),
    );
    rec.wait("READY=1", |n| n.iter().any(|(_, t)| has(t, "READY=1")));
    rec.wait("pings", |n| {
        n.iter().filter(|(_, t)| has(t, "WATCHDOG=1")).count() >= 3
    });
    let load = load(&h, 8, "/?sleep=2");
    let asked = Instant::now();
    let asked_usec = monotonic_usec();
    let (said, _) = upgrade_wait(&h, &[]);
    assert!(said.contains("2 workers adopted"), "{said}");
    rec.wait("READY=1 after the upgrade", |n| {
        n.iter()
            .filter(|(at, t)| *at > asked && has(t, "READY=1"))
            .count()
            == 1
    });
    // Pings go on for 2 s after it.
    let adopted = Instant::now();
    rec.wait("pings after the upgrade", |n| {
        n.iter()
            .any(|(at, t)| *at > adopted + Duration::from_secs(2) && has(t, "WATCHDOG=1"))
    });
    more(&load, 50);
    let report = load.stop();
    report.assert_clean(100);
    let notes = rec.notes();
    let since: Vec<&(Instant, String)> = notes.iter().filter(|(at, _)| *at > asked).collect();
    let states: Vec<&str> = since
        .iter()
        .flat_map(|(_, t)| t.lines())
        .filter(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(l))
        .collect();
    assert_eq!(states, ["RELOADING=1", "READY=1"], "{since:#?}");
    let reloading = since
        .iter()
        .find(|(_, t)| has(t, "RELOADING=1"))
        .map(|(_, t)| t.as_str())
        .unwrap_or_default();
    let mono: i128 = get(reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    assert!(
        (mono - asked_usec).abs() < 2_000_000,
        "{mono} vs {asked_usec}"
    );
    assert_eq!(
        get(reloading, "STATUS"),
        Some("2/2 workers ready, generation 1; upgrading holdfast")
    );
    let ready = since
        .iter()
        .find(|(_, t)| has(t, "READY=1"))
        .map(|(_, t)| t.as_str())
        .unwrap_or_default();
    assert_eq!(
        get(ready, "STATUS"),
        Some("2/2 workers ready, generation 1")
    );
    // The watchdog: never a gap of WATCHDOG_USEC; pings right before the
    // exec and right after the adoption.
    let pings: Vec<Instant> = notes
        .iter()
        .filter(|(_, t)| has(t, "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    let gaps: Vec<f64> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    assert!(gaps.iter().all(|g| *g < 0.8), "{gaps:?}");
    let around = pings
        .iter()
        .filter(|at| **at > asked && **at < adopted)
        .count();
    assert!(
        around >= 2,
        "no ping right before the exec and after: {gaps:?}"
    );
    // The pid systemd knows never changes: no MAINPID, no second FDSTORE.
    assert!(!notes.iter().any(|(_, t)| get(t, "MAINPID").is_some()));
    assert_eq!(
        notes.iter().filter(|(_, t)| has(t, "FDSTORE=1")).count(),
        1,
        "{notes:#?}"
    );
    assert!(!h.log().contains("cannot notify systemd"), "{}", h.log());
}

/// The thread of `pid` named `name`, and the kernel function it sleeps in.
fn thread_wchan(pid: u32, name: &str) -> Option<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find_map(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.trim() == name)
                .then(|| fs::read_to_string(t.path().join("wchan")).ok())
                .flatten()
        })
}

/// Counts each `w<slot> <pid> <n> xxx` line of `text` by (pid, n).
fn numbered(text: &str) -> std::collections::BTreeMap<(u32, u64), usize> {
    let mut seen = std::collections::BTreeMap::new();
    for line in text.lines() {
        let body = line.split_once("] ").map_or(line, |(_, b)| b);
        let mut w = body.split(' ');
        let (Some(slot), Some(pid), Some(n)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        if !slot.starts_with('w') {
            continue;
        }
        if let (Ok(pid), Ok(n)) = (pid.parse::<u32>(), n.parse::<u64>()) {
            *seen.entry((pid, n)).or_insert(0) += 1;
        }
    }
    seen
}

#[test]
fn a_log_writer_that_cannot_pause_refuses_the_upgrade_and_loses_no_line() {
    use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
    use nix::sys::stat::Mode;
    use std::io::Read;
    const LINES: u64 = 3000;
    let dir = tempfile::Builder::new()
        .prefix("holdfast-fifo-")
        .tempdir()
        .expect("dir");
    let fifo = dir.path().join("out.fifo");
    nix::unistd::mkfifo(&fifo, Mode::S_IRWXU).expect("mkfifo");
    // The reader end first (holdfast's open for writing waits for one), read
    // by nobody yet: the workers' output fills it and the sink blocks.
    let reader = open(&fifo, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty()).expect("open");
    let config = format!(
        "{}\n[logs]\nstdout = {:?}\n",
        CONFIG.replace(
            "\"--lame-duck-ms\", \"200\"",
            &format!("\"--lame-duck-ms\", \"200\", \"--log-lines\", \"{LINES}\", \"--log-line-bytes\", \"100\""),
        ),
        fifo.to_string_lossy()
    );
    let h = start(&config);
    wait_until(
        DEADLINE,
        "the log sink to block writing to the full FIFO",
        || {
            thread_wchan(h.pid(), "logs-0")
                .filter(|w| w.contains("pipe_write"))
                .map(|_| ())
        },
    );
    let load = load(&h, 8, "/?sleep=2");
    let before = status(&h);
    let o = ctl(&h, &["upgrade", "--wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains(&format!(
            "upgrade failed, still running holdfast 0.1.0: the log writer of {} did not pause within 2s",
            fifo.display()
        )),
        "{}",
        text(&o)
    );
    let after = status(&h);
    assert_eq!(pids(&after), pids(&before));
    assert_eq!(counter(&after, "failed_upgrades"), 1);
    // Someone reads the FIFO now: every line arrives, once.
    fcntl(&reader, FcntlArg::F_SETFL(OFlag::empty())).expect("blocking");
    let read = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = read.clone();
    let mut file = fs::File::from(reader);
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            r.lock().expect("read").extend_from_slice(&buf[..n]);
        }
    });
    let workers = pids(&before);
    let all = || {
        let text = String::from_utf8_lossy(&read.lock().expect("read")).into_owned();
        numbered(&text)
    };
    wait_until(DEADLINE, "every worker's lines", || {
        (all().len() as u64 == 2 * LINES).then_some(())
    });
    // Now the upgrade goes through, and the lines still come once each.
    let (said, _) = upgrade_wait(&h, &[]);
    assert!(said.contains("2 workers adopted"), "{said}");
    more(&load, 100);
    let report = load.stop();
    report.assert_clean(200);
    let seen = all();
    for p in &workers {
        for n in 1..=LINES {
            assert_eq!(seen.get(&(*p, n)), Some(&1), "line {n} of worker {p}");
        }
    }
    assert_eq!(seen.len() as u64, 2 * LINES);
}

/// holdfast's fds from 3 up that an exec would pass on (no O_CLOEXEC in
/// /proc/PID/fdinfo).
fn inheritable_fds(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<i32>().is_ok_and(|n| n < 3) {
            continue;
        }
        let Ok(info) = fs::read_to_string(e.path()) else {
            continue; // closed meanwhile
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & 0o2_000_000 == 0 {
            let target = fs::read_link(format!("/proc/{pid}/fd/{name}")).unwrap_or_default();
            out.push(format!("{name} -> {}", target.display()));
        }
    }
    out
}

/// An exec that fails after every check passed (the binary is opened for
/// writing in between: ETXTBSY) puts everything back: the log sinks run
/// again, every fd is close-on-exec again, the signals are unblocked, and
/// the next upgrade works. The window is held open honestly: the upgrade
/// waits for a reload that reads its config from a FIFO the test writes.
#[test]
fn an_exec_that_fails_puts_everything_back() {
    use nix::sys::stat::Mode;
    use std::io::Write;
    let fifo_dir = tempfile::Builder::new()
        .prefix("holdfast-fifo-")
        .tempdir()
        .expect("dir");
    let fifo = fifo_dir.path().join("holdfast.toml");
    nix::unistd::mkfifo(&fifo, Mode::S_IRWXU).expect("mkfifo");
    let h = Holdfast::start_args(&["run", "--config", &fifo.to_string_lossy()], None);
    let config = h.fill(&format!(
        "control_socket = \"{{dir}}/holdfast.sock\"\n{}",
        CONFIG.replace(
            "\"--lame-duck-ms\", \"200\"",
            "\"--lame-duck-ms\", \"200\", \"--log-lines\", \"5\""
        )
    ));
    let feed = |text: String| {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(&fifo)
                .expect("open fifo");
            f.write_all(text.as_bytes()).expect("write fifo");
        })
    };
    feed(config.clone()).join().expect("config");
    h.wait_log("all workers ready");
    // What holdfast inherited itself (from whatever runs the tests) stays so.
    let inherited = inheritable_fds(h.pid());
    let next = copy_as(&h, env!("CARGO_BIN_EXE_holdfast"), "holdfast-next");
    let load = load(&h, 8, "/?sleep=2");
    // A reload that waits for its config: the upgrade waits for it.
    h.signal(Signal::SIGHUP);
    let client = {
        let sock = h.dir.path().join("holdfast.sock");
        let next = next.clone();
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
                .args(["upgrade", "--wait", "--binary"])
                .arg(next)
                .arg("--control")
                .arg(sock)
                .output()
                .expect("upgrade")
        })
    };
    h.wait_log("passed its checks; handing over once nothing is under way");
    // Checked and tried; now a writer holds the binary: its exec fails.
    let busy = fs::OpenOptions::new()
        .write(true)
        .open(&next)
        .expect("open for writing");
    feed(config.clone()).join().expect("config");
    let o = client.join().expect("client");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let want = format!(
        "upgrade failed, still running holdfast 0.1.0: exec {}: Text file busy (os error 26)",
        next.display()
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&want),
        "{}",
        text(&o)
    );
    h.wait_log("rollout finished generation=2");
    // Everything is back: no fd of holdfast's left inheritable, the
    // counters, the logs.
    assert_eq!(inheritable_fds(h.pid()), inherited);
    let s = status(&h);
    assert_eq!(counter(&s, "failed_upgrades"), 1);
    assert_eq!(counter(&s, "upgrades"), 0);
    let gen2 = pids(&s);
    for p in &gen2 {
        h.wait_log(&format!("{p} 5 x"));
    }
    // Signals work (they were blocked for the exec): a reload, read from the FIFO.
    h.signal(Signal::SIGHUP);
    feed(config.clone()).join().expect("config");
    h.wait_log("rollout finished generation=3");
    // The writer gone, the same binary upgrades.
    drop(busy);
    let (said, _) = upgrade_wait(&h, &["--binary", &next.to_string_lossy()]);
    assert!(said.contains("2 workers adopted"), "{said}");
    more(&load, 100);
    let report = load.stop();
    eprintln!("exec failure: {report}");
    report.assert_clean(200);
    assert_eq!(inheritable_fds(h.pid()), inherited);
    assert!(
        fs::read_link(format!("/proc/{}/exe", h.pid())).is_ok_and(|e| e == next),
        "holdfast does not run {}",
        next.display()
    );
}

/// The run directory of holdfast, from a worker's NOTIFY_SOCKET.
fn rundir_of(worker: u32) -> PathBuf {
    let env = fs::read(format!("/proc/{worker}/environ")).expect("environ");
    let notify = env
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
        .expect("NOTIFY_SOCKET");
    Path::new(std::str::from_utf8(notify).expect("utf-8"))
        .parent()
        .expect("dir")
        .to_path_buf()
}

fn probe_sockets(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with("probe-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A unix listener (its path and keeper link), readiness probes and
/// holdfast's own log file are handed over as they are: the path keeps its
/// inode and is removed at the final stop, probes of later workers work and
/// the released ones' sockets go, the log file is written on, not reopened.
#[test]
fn unix_listeners_probes_and_holdfasts_own_log_are_handed_over() {
    let mut h = Holdfast::start(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[[listen]]
name = "sock"
address = "unix:{dir}/app.sock"

[app]
command = ["{test_worker}", "--lame-duck-ms", "200"]
workers = 2
ready = "probe"
drain_timeout = "10s"

[logs]
holdfast_log = "{dir}/own.log"
"#,
    );
    let own = h.dir.path().join("own.log");
    let own_log = || fs::read_to_string(&own).unwrap_or_default();
    wait_until(DEADLINE, "all workers ready", || {
        own_log().contains("all workers ready").then_some(())
    });
    let sock = h.dir.path().join("app.sock");
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).expect("stat"));
    let (path_inode, keeper_inode) = (
        inode(&sock),
        inode(&h.dir.path().join(".app.sock.holdfast")),
    );
    let load = load(&h, 8, "/?sleep=2");
    let workers = pids(&status(&h));
    let rundir = rundir_of(workers[0]);
    assert_eq!(probe_sockets(&rundir).len(), 2);
    for _ in 0..2 {
        let (said, _) = upgrade_wait(&h, &[]);
        assert!(said.contains("2 workers adopted"), "{said}");
    }
    assert_eq!(pids(&status(&h)), workers);
    assert_eq!(inode(&sock), path_inode);
    assert_eq!(
        inode(&h.dir.path().join(".app.sock.holdfast")),
        keeper_inode
    );
    let r = common::http_get(&h.unix("app.sock"), "/").expect("served on the unix path");
    assert_eq!(r.status, 200);
    // Later workers are probed; the released ones' probe sockets go.
    let o = ctl(&h, &["restart", "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    wait_until(DEADLINE, "the old probe sockets removed", || {
        (probe_sockets(&rundir).len() == 2).then_some(())
    });
    more(&load, 100);
    let report = load.stop();
    report.assert_clean(200);
    // One log file all along, never reopened, holding both images' lines.
    let text = own_log();
    assert_eq!(text.matches("workers adopted) took=").count(), 2, "{text}");
    assert!(!text.contains("reopened"), "{text}");
    assert!(text.contains("rollout finished generation=2"), "{text}");
    // The final stop removes the unix path and its keeper (they are ours).
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "{}", own_log());
    assert!(!sock.exists() && !h.dir.path().join(".app.sock.holdfast").exists());
    assert!(!rundir.exists(), "the run directory was left behind");
}

/// With a cgroup per worker (a delegated cgroup, as under systemd with
/// `Delegate=yes`) and a daemon per worker outside its process group: the
/// cgroups and the daemons are adopted; a rollout after the upgrade removes
/// the old workers' cgroups with their daemons; a stop leaves nothing.
#[test]
fn worker_cgroups_and_their_daemons_are_handed_over() {
    let cg = common::TestCgroup::new("upgrade");
    cg.delegate();
    let dir = cg.dir.to_str().expect("utf-8").to_string();
    let mut h = common::Swept::new(Holdfast::launch(
        common::Launch {
            program: "sh",
            args: &[
                "-c",
                "echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"",
                "sh",
                &dir,
                "{holdfast}",
                "run",
                "--config",
                "{config}",
            ],
            env: &[],
            stdin: None,
        },
        Some(&CONFIG.replace(
            "\"--lame-duck-ms\", \"200\"",
            "\"--lame-duck-ms\", \"200\", \"--daemon\"",
        )),
    ));
    h.wait_log("all workers ready");
    assert!(h.log().contains("a cgroup per worker"), "{}", h.log());
    let tag = h.tag().to_string();
    let daemons = || {
        common::tagged_pids(&tag)
            .into_iter()
            .filter(|p| common::proc_ids(*p).is_some_and(|i| i.sid == *p))
            .collect::<Vec<u32>>()
    };
    wait_until(DEADLINE, "a daemon per worker", || {
        (daemons().len() == 2).then_some(())
    });
    let cgroups = cg.children();
    assert_eq!(cgroups.len(), 2, "{cgroups:?}");
    let before = status(&h);
    let load = load(&h, 8, "/?sleep=2");
    let (said, _) = upgrade_wait(&h, &[]);
    assert!(said.contains("2 workers adopted"), "{said}");
    let after = status(&h);
    assert_eq!(pids(&after), pids(&before));
    assert_eq!(cg.children(), cgroups);
    assert_eq!(daemons().len(), 2);
    let o = ctl(&h, &["restart", "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    wait_until(DEADLINE, "the old cgroups and their daemons gone", || {
        let now = cg.children();
        (now.len() == 2 && now.iter().all(|c| !cgroups.contains(c)) && daemons().len() == 2)
            .then_some(())
    });
    more(&load, 100);
    let report = load.stop();
    report.assert_clean(200);
    let o = ctl(&h, &["stop", "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(h.wait_exit(DEADLINE).code(), Some(0));
    assert_eq!(common::tagged_pids(&tag), Vec::<u32>::new());
    assert_eq!(cg.children(), Vec::<String>::new());
}
