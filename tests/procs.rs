//! The OS layer against the real kernel, as root: a spawn that returns before
//! exec and reports the exec later, processes re-parented to a subreaper
//! (`procs::adopted`), and per-worker cgroups (`procs::Cgroups`) in a
//! delegated cgroup v2 directory made for the test.
//!
//! Scenarios that change process-wide state (becoming a subreaper, moving into
//! a cgroup) run in a child: the test re-executes this test binary with only
//! itself selected and `ROLE` set, and asserts that the child passed. The
//! child kills and reaps every process it started, even when it fails (a
//! `Drop` guard); the parent's guard kills whatever is left in the test
//! cgroup and removes it.

mod common;

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_until, TestCgroup, DEADLINE};
use holdfast::os::proc::{self as procs, Cgroups, SERIAL_VAR};
use holdfast::os::sys::{self, ExecPlan, SpawnError, Spawned};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Set in a re-executed child to the name of the test it runs the scenario of.
const ROLE: &str = "HOLDFAST_PROCS_TEST_ROLE";
/// The test cgroup's directory, for the cgroup scenario's child.
const CGROUP_DIR: &str = "HOLDFAST_PROCS_TEST_CGROUP";

// ---------------------------------------------------------------- helpers

/// An exec plan for `program` at `args` with PATH and `env`, stdio inherited.
fn plan<'a>(program: &'a str, args: &'a [String], env: &[(&str, &str)]) -> ExecPlan<'a> {
    let mut vars = vec![(
        "PATH".to_string(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
    )];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ExecPlan {
        program,
        args,
        env: vars,
        listen_pid: false,
        cwd: None,
        stdio: [0, 1, 2],
        fds: &[],
        parent_death_signal: Signal::SIGKILL,
        cgroup_procs: None,
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Processes this test started (or adopted) and has not reaped: `Drop` sends
/// SIGKILL to each and reaps it, so a failing assertion leaves nothing behind.
#[derive(Default)]
struct Started(Vec<i32>);

impl Started {
    fn add(&mut self, pid: i32) -> i32 {
        self.0.push(pid);
        pid
    }

    /// SIGKILL and reap `pid`, which must be one of ours.
    fn kill(&mut self, pid: i32) {
        assert!(self.0.contains(&pid), "pid {pid} is not ours");
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        self.reap(pid);
    }

    /// Waits for `pid` (ours) to exit and reaps it.
    fn reap(&mut self, pid: i32) -> WaitStatus {
        self.0.retain(|&p| p != pid);
        waitpid(Pid::from_raw(pid), None).expect("waitpid")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        for pid in std::mem::take(&mut self.0) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
        }
    }
}

/// Reaps any exited child without blocking (adopted ones included).
fn reap_any() {
    while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Whether this process is the re-executed child that runs `name`'s scenario.
fn in_role(name: &str) -> bool {
    std::env::var(ROLE).as_deref() == Ok(name)
}

/// Runs this test binary again with only test `name` selected and `ROLE` set
/// (plus `env`); panics with its output unless it passes within the deadline.
fn run_in_child(name: &str, env: &[(&str, &str)]) {
    let out = tempfile::tempdir().expect("tempdir");
    let stdout = out.path().join("stdout");
    let stderr = out.path().join("stderr");
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(&exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, name)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).expect("stdout file"))
        .stderr(fs::File::create(&stderr).expect("stderr file"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("re-exec the test binary");
    let status = {
        let mut status = None;
        let deadline = std::time::Instant::now() + 2 * DEADLINE;
        while status.is_none() && std::time::Instant::now() < deadline {
            status = child.try_wait().expect("try_wait");
            if status.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if status.is_none() {
            let _ = child.kill();
        }
        status.or_else(|| child.wait().ok())
    };
    let dump = || {
        format!(
            "{} {name} --exact\nstatus: {status:?}\n--- stdout\n{}\n--- stderr\n{}",
            exe.display(),
            fs::read_to_string(&stdout).unwrap_or_default(),
            fs::read_to_string(&stderr).unwrap_or_default()
        )
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "the child scenario failed:\n{}",
        dump()
    );
    // The child ran the scenario (and did not just filter it away).
    let printed = fs::read_to_string(&stdout).unwrap_or_default();
    assert!(printed.contains("1 passed"), "{}", dump());
}

/// Polls `report` until it is known.
fn poll_until_known(report: &mut holdfast::os::sys::ExecReport) -> Result<(), SpawnError> {
    wait_until(DEADLINE, "the exec report", || report.poll())
}

// ---------------------------------------------------------------- spawn

#[test]
fn spawn_returns_before_exec_and_reports_it_later() {
    let mut started = Started::default();

    // The child writes "0" to `cgroup_procs` before exec. Make that a full,
    // blocking pipe: the child blocks there, before exec, until we read.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    set_nonblocking(&w, true);
    let chunk = [b'x'; 4096];
    while nix::unistd::write(&w, &chunk).is_ok() {}
    set_nonblocking(&w, false);

    let no_args = args(&[]);
    let mut p = plan("true", &no_args, &[]);
    p.cgroup_procs = Some(w.as_raw_fd());
    let Spawned { pid, mut report } = sys::spawn(&p, Path::new("/bin/true")).expect("fork");
    started.add(pid.as_raw());
    assert_eq!(report.program(), "true");
    // spawn returned while the child is still before exec.
    assert!(
        report.poll().is_none(),
        "exec reported before it could happen"
    );
    assert!(report.poll().is_none());
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    assert_ne!(comm.trim(), "true", "the child exec'd while blocked");

    // Unblock it: exec succeeds, the report says so (and keeps saying so).
    let mut buf = [0u8; 65536];
    let _ = nix::unistd::read(&r, &mut buf).expect("drain");
    assert!(matches!(poll_until_known(&mut report), Ok(())));
    assert!(matches!(report.poll(), Some(Ok(()))));
    assert_eq!(
        started.reap(pid.as_raw()),
        WaitStatus::Exited(pid, 0),
        "/bin/true ran"
    );
}

fn set_nonblocking(fd: &OwnedFd, on: bool) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).expect("F_GETFL"));
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags)).expect("F_SETFL");
}

#[test]
fn spawn_reports_the_failing_stage() {
    let mut started = Started::default();
    let no_args = args(&[]);

    // A missing program, through poll: stage "execve", ENOENT, the program named.
    let p = plan("holdfast-no-such-program", &no_args, &[]);
    let Spawned { pid, mut report } =
        sys::spawn(&p, Path::new("/nonexistent/holdfast-no-such-program")).expect("fork");
    started.add(pid.as_raw());
    let err = poll_until_known(&mut report).expect_err("exec of a missing program");
    match &err {
        SpawnError::Child { stage, source, .. } => {
            assert_eq!(*stage, "execve");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().contains("holdfast-no-such-program"),
        "{err}"
    );
    // Asked again: the same answer.
    assert!(matches!(
        report.poll(),
        Some(Err(SpawnError::Child {
            stage: "execve",
            ..
        }))
    ));
    assert_eq!(started.reap(pid.as_raw()), WaitStatus::Exited(pid, 127));

    // The same through wait.
    let Spawned { pid, report } =
        sys::spawn(&p, Path::new("/nonexistent/holdfast-no-such-program")).expect("fork");
    started.add(pid.as_raw());
    let err = report.wait().expect_err("exec of a missing program");
    assert!(
        err.to_string()
            .starts_with("execve for holdfast-no-such-program"),
        "{err}"
    );
    started.reap(pid.as_raw());

    // A cgroup.procs that cannot be written (read-only fd): stage "cgroup".
    let ro = fs::File::open("/dev/null").expect("/dev/null");
    let mut p = plan("true", &no_args, &[]);
    p.cgroup_procs = Some(ro.as_raw_fd());
    let Spawned { pid, report } = sys::spawn(&p, Path::new("/bin/true")).expect("fork");
    started.add(pid.as_raw());
    match report.wait() {
        Err(SpawnError::Child { stage, source, .. }) => {
            assert_eq!(stage, "cgroup");
            assert_eq!(source.raw_os_error(), Some(libc::EBADF));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(started.reap(pid.as_raw()), WaitStatus::Exited(pid, 127));

    // A good program, through wait.
    let Spawned { pid, report } =
        sys::spawn(&plan("true", &no_args, &[]), Path::new("/bin/true")).expect("fork");
    started.add(pid.as_raw());
    report.wait().expect("exec of /bin/true");
    assert_eq!(started.reap(pid.as_raw()), WaitStatus::Exited(pid, 0));
}

// ---------------------------------------------------------------- adoption

/// A worker's child calls setsid() and its parent exits: the subreaper adopts
/// it, and `adopted` lists it with the worker's serial.
#[test]
fn adopted_lists_a_setsid_grandchild_with_its_serial() {
    const NAME: &str = "adopted_lists_a_setsid_grandchild_with_its_serial";
    if !in_role(NAME) {
        return run_in_child(NAME, &[]);
    }
    sys::become_subreaper().expect("PR_SET_CHILD_SUBREAPER");
    let me = std::process::id() as i32;
    let mut started = Started::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("daemon.pid");

    // The worker starts a setsid daemon and exits at once.
    let worker_args = args(&[
        "-c",
        "setsid sleep 120 & echo $! > \"$1\"",
        "sh",
        pidfile.to_str().expect("utf-8 path"),
    ]);
    let p = plan("sh", &worker_args, &[(SERIAL_VAR, "42")]);
    let Spawned {
        pid: worker,
        report,
    } = sys::spawn(&p, Path::new("/bin/sh")).expect("fork");
    started.add(worker.as_raw());
    report.wait().expect("exec sh");
    let daemon: i32 = wait_until(DEADLINE, "the daemon's pid", || {
        fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    // Ours from here on: once its parent exits, we are its parent.
    started.add(daemon);
    assert_eq!(started.reap(worker.as_raw()), WaitStatus::Exited(worker, 0));

    // Re-parented to us (the subreaper), not to init.
    let st = wait_until(DEADLINE, "the daemon re-parented to us", || {
        procs::stat(daemon).filter(|s| s.ppid == me)
    });
    assert_eq!((st.session, st.pgrp), (daemon, daemon), "setsid: {st:?}");
    let children = procs::children(me).expect("children files (CONFIG_PROC_CHILDREN)");
    assert!(children.contains(&daemon), "{children:?}");
    assert!(procs::children_by_scan(me).contains(&daemon));

    let worker_pid = worker.as_raw();
    let found = wait_until(DEADLINE, "the daemon in adopted()", || {
        procs::adopted(|p| p == worker_pid, None)
            .into_iter()
            .find(|a| a.pid == daemon)
    });
    assert_eq!(
        found,
        procs::Adopted {
            pid: daemon,
            pgid: daemon,
            sid: daemon,
            serial: Some(42),
            cgroup_serial: None,
            comm: "sleep".into(),
        }
    );

    // A live worker is not adopted; the same process is, when not a worker.
    let sleep_args = args(&["120"]);
    let Spawned { pid: live, report } = sys::spawn(
        &plan("sleep", &sleep_args, &[(SERIAL_VAR, "43")]),
        Path::new("/bin/sleep"),
    )
    .expect("fork");
    let live = started.add(live.as_raw());
    report.wait().expect("exec sleep");
    let listed = procs::adopted(|p| p == live, None);
    assert!(listed.iter().all(|a| a.pid != live), "{listed:?}");
    let all = procs::adopted(|_| false, None);
    let a = all.iter().find(|a| a.pid == live).expect("listed");
    assert_eq!(
        (a.serial, a.pgid, a.sid),
        (Some(43), live, procs::stat(me).expect("stat").session)
    );

    // Dead children are not adopted (the zombie waits for the reaper).
    let _ = kill(Pid::from_raw(daemon), Signal::SIGKILL);
    wait_until(DEADLINE, "the daemon gone from adopted()", || {
        procs::adopted(|p| p == live, None)
            .iter()
            .all(|a| a.pid != daemon)
            .then_some(())
    });
    started.reap(daemon);
    started.kill(live);
}

// ---------------------------------------------------------------- cgroups

/// Detection in a delegated directory, then a worker cgroup through its whole
/// life: spawn into it, list every member (a setsid one too), attribute an
/// escaped member, kill, remove; an EBUSY remove; the kill fallback.
#[test]
fn cgroup_create_spawn_kill_remove() {
    const NAME: &str = "cgroup_create_spawn_kill_remove";
    if !in_role(NAME) {
        let cg = TestCgroup::new("cgroups");
        let dir = cg.dir.to_str().expect("utf-8 path").to_string();
        return run_in_child(NAME, &[(CGROUP_DIR, &dir)]);
    }
    let dir = PathBuf::from(std::env::var(CGROUP_DIR).expect("test cgroup dir"));
    let mut started = Started::default();
    sys::become_subreaper().expect("PR_SET_CHILD_SUBREAPER");
    // Into the test cgroup: from here on, as holdfast in its unit's cgroup.
    fs::write(dir.join("cgroup.procs"), "0").expect("move into the test cgroup");

    // Not delegated yet: a reason naming the directory.
    let why = Cgroups::detect().expect_err("not delegated");
    assert!(
        why.contains("not delegated") && why.contains(dir.to_str().expect("utf-8")),
        "{why}"
    );
    // What systemd does for Delegate=yes.
    rustix::fs::setxattr(
        &dir,
        "trusted.delegate",
        b"1",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("set trusted.delegate");
    let cgroups = Cgroups::detect().expect("delegated");
    assert_eq!(cgroups.dir(), dir);

    // A worker that starts a setsid daemon: both are members.
    let wc = cgroups.create(7).expect("create worker-7");
    assert_eq!(wc.dir(), dir.join("worker-7"));
    assert_eq!(wc.serial(), 7);
    assert!(wc.pids().expect("pids").is_empty());
    let worker_args = args(&["-c", "setsid sleep 120 & exec sleep 120"]);
    let mut p = plan("sh", &worker_args, &[(SERIAL_VAR, "7")]);
    p.cgroup_procs = wc.procs_fd().map(|fd| fd.as_raw_fd());
    let Spawned {
        pid: worker,
        report,
    } = sys::spawn(&p, Path::new("/bin/sh")).expect("fork");
    let worker = started.add(worker.as_raw());
    report.wait().expect("exec sh");
    assert_eq!(procs::cgroup_v2_path(worker).as_deref(), Some(wc.path()));
    // Two members, the second one in a session of its own once its setsid
    // ran (the shell forks it first: until then it is in the worker's).
    let (members, daemon) =
        wait_until(DEADLINE, "worker and its setsid daemon in worker-7", || {
            let pids = wc.pids().expect("pids");
            let daemon = *pids.iter().find(|&&p| p != worker)?;
            let leads = procs::stat(daemon).is_some_and(|s| s.session == daemon);
            (pids.len() == 2 && leads).then_some((pids, daemon))
        });
    assert!(members.contains(&worker), "{members:?}");
    started.add(daemon);

    // The worker dies; the daemon is adopted and attributed by its cgroup.
    started.kill(worker);
    let found = wait_until(DEADLINE, "the daemon in adopted()", || {
        procs::adopted(|_| false, Some(&cgroups))
            .into_iter()
            .find(|a| a.pid == daemon)
    });
    assert_eq!((found.cgroup_serial, found.serial), (Some(7), Some(7)));
    assert_eq!(wc.pids().expect("pids"), vec![daemon]);

    // kill: every member goes; remove then succeeds.
    wc.kill().expect("kill");
    wait_until(DEADLINE, "worker-7 empty", || {
        reap_any();
        wc.pids().expect("pids").is_empty().then_some(())
    });
    started.0.retain(|&p| p != daemon);
    wc.remove().expect("remove worker-7");
    assert!(!dir.join("worker-7").exists());

    // remove with a member left: an error naming the directory.
    let wc = cgroups.create(8).expect("create worker-8");
    let sleep_args = args(&["120"]);
    let mut p = plan("sleep", &sleep_args, &[]);
    p.cgroup_procs = wc.procs_fd().map(|fd| fd.as_raw_fd());
    let Spawned {
        pid: sleeper,
        report,
    } = sys::spawn(&p, Path::new("/bin/sleep")).expect("fork");
    let sleeper = started.add(sleeper.as_raw());
    report.wait().expect("exec sleep");
    let err = wc.remove().expect_err("EBUSY");
    assert!(
        err.to_string()
            .contains(&*dir.join("worker-8").to_string_lossy()),
        "{err}"
    );
    assert!(err.to_string().contains("processes are left"), "{err}");
    started.kill(sleeper);
    wait_until(DEADLINE, "worker-8 removable", || {
        fs::remove_dir(dir.join("worker-8")).ok()
    });

    // The fallback for kernels without cgroup.kill: freeze, SIGKILL each.
    let wc = cgroups.create(9).expect("create worker-9");
    let tree_args = args(&["-c", "sleep 120 & sleep 120 & wait"]);
    let mut p = plan("sh", &tree_args, &[]);
    p.cgroup_procs = wc.procs_fd().map(|fd| fd.as_raw_fd());
    let Spawned { pid: tree, report } = sys::spawn(&p, Path::new("/bin/sh")).expect("fork");
    let tree = started.add(tree.as_raw());
    report.wait().expect("exec sh");
    wait_until(DEADLINE, "3 members in worker-9", || {
        (wc.pids().expect("pids").len() == 3).then_some(())
    });
    wc.kill_each().expect("kill_each");
    wait_until(DEADLINE, "worker-9 empty", || {
        wc.pids().expect("pids").is_empty().then_some(())
    });
    started.reap(tree);
    reap_any();
    wc.remove().expect("remove worker-9");

    // An empty cgroup is removed on drop; an empty leftover is replaced.
    drop(cgroups.create(10).expect("create worker-10"));
    assert!(!dir.join("worker-10").exists());
    fs::create_dir(dir.join("worker-11")).expect("a leftover");
    let wc = cgroups.create(11).expect("replace an empty leftover");
    wc.remove().expect("remove worker-11");
}
