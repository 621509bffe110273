//! A real systemd for the tests: Debian's own systemd as PID 1 of a
//! throwaway container, booted by `tests/sandbox/keeper` (read its header for
//! what isolates what), with holdfast's own units installed.
//!
//! - [`Sandbox::boot`] starts the keeper (`unshare --mount` over the script)
//!   with a pipe as its stdin, waits for the container's PID 1 and for
//!   `systemctl is-system-running --wait`. The keeper tears the container
//!   down when that pipe closes: in [`Drop`], or when the test process dies
//!   however it dies (the kernel closes the pipe), so a killed test leaves
//!   nothing behind either.
//! - [`Sandbox::exec`] runs a command inside (all of the container's
//!   namespaces, its root, a clean environment), bounded by 30 s.
//! - Files are read and written through `/proc/LEADER/root`, i.e. in the
//!   container's overlay (a tmpfs), never on the host.
//! - Clients reach the container's loopback from the test's own threads by
//!   joining its network namespace ([`Sandbox::netns`], `LoadSpec::netns`,
//!   [`Sandbox::in_netns`]); unix sockets by path through its root.
//! - [`shared`] gives a test file one sandbox for all its tests, one test at
//!   a time (each boot costs about a second, each test drives systemd).
//!
//! The build's binaries (the directory of `CARGO_BIN_EXE_holdfast`) are bound
//! read-only at [`BIN`] inside; [`Sandbox::install_units`] installs
//! `units/*` with `/usr/bin/holdfast` pointed there.
//!
//! A test: `let sb = shared("name");` then an [`App`] (its own
//! `holdfast@NAME.service`, config, port, drop-ins), `app.must("start")`, a
//! `Load` from `app.load_spec(app.tcp())`, `systemctl` verbs, and facts from
//! `app.show(PROP)`, `app.status()` (holdfast's JSON), `app.messages()` or
//! `sb.entries(unit)` (the journal, with timestamps), `app.cgroup_pids()`.
//! An upgrade of holdfast itself: `sb.copy_in(new_binary, "/usr/local/lib/holdfast/holdfast")`
//! and `app.run_binary(..)` before the start, the same `copy_in` again (a
//! rename over the running file, as a package does), then `systemctl kill -s
//! USR2` or `holdfast upgrade` through `sb.run(..)`: `app.main_pid()` must not
//! change, nor the worker pids in `app.status()`.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{pid_alive, run_bounded, wait_until, DEADLINE};

/// Where the build's binaries are inside the sandbox.
pub const BIN: &str = "/opt/holdfast";

/// The keeper script.
const KEEPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sandbox/keeper");

/// PATH inside.
const INSIDE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a boot may take (about a second here).
const BOOT_DEADLINE: Duration = Duration::from_secs(60);

/// How long the keeper may take to tear down (an orderly poweroff, at most
/// 15 s, then SIGKILL).
const TEARDOWN_DEADLINE: Duration = Duration::from_secs(60);

/// One booted container and its keeper.
pub struct Sandbox {
    name: String,
    /// The keeper's state directory (it removes it when done).
    dir: PathBuf,
    keeper: Child,
    /// Closing it tells the keeper to tear down.
    pipe: Option<ChildStdin>,
    /// The console log (the keeper's and nspawn's output), read by fd: the
    /// keeper unlinks it at the end.
    console: File,
    /// The container's PID 1, as the host sees it.
    leader: u32,
    /// Its pid and mount namespaces (`pid:[N]`), to prove them empty at the end.
    pid_ns: String,
    keeper_mnt_ns: String,
    /// cgroup directories the keeper made (to prove them gone).
    cgroups: Vec<PathBuf>,
    pub boot_time: Duration,
}

/// What a torn-down sandbox left behind (all empty when clean).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub processes: Vec<u32>,
    pub cgroups: Vec<PathBuf>,
    pub paths: Vec<PathBuf>,
    pub keeper_running: bool,
}

fn ns_of(pid: u32, kind: &str) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Every pid on the host whose `kind` namespace is `ns`.
fn pids_in_ns(kind: &str, ns: &str) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut v: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| pid_alive(p) && ns_of(p, kind).as_deref() == Some(ns))
        .collect();
    v.sort_unstable();
    v
}

/// (pid, ppid) of every process on the host.
fn process_table() -> Vec<(u32, u32)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, super::proc_ids(pid)?.ppid)))
        .collect()
}

/// The container's PID 1: a descendant of `nspawn` whose innermost pid is 1.
fn find_leader(nspawn: u32) -> Option<u32> {
    let table = process_table();
    let mut family = vec![nspawn];
    let mut i = 0;
    while i < family.len() && i < 64 {
        let parent = family[i];
        family.extend(
            table
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    family.into_iter().skip(1).find(|p| {
        fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("NSpid:"))?.to_string();
                let f: Vec<&str> = line.split_whitespace().collect();
                Some(f.len() > 2 && f.last() == Some(&"1"))
            })
            .unwrap_or(false)
    })
}

/// cgroup roots the keeper uses (see its `cgroup_roots`).
fn cgroup_roots() -> Vec<PathBuf> {
    // Unified: /sys/fs/cgroup is the cgroup2 mount itself.
    if Path::new("/sys/fs/cgroup/cgroup.procs").exists() {
        return vec![PathBuf::from("/sys/fs/cgroup")];
    }
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

impl Sandbox {
    /// Boots a sandbox named after `hint` and this process. Panics, with the
    /// console log, if it does not reach `running` within a minute.
    pub fn boot(hint: &str) -> Sandbox {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the systemd sandbox needs root (it mounts and boots a container)"
        );
        assert!(
            Path::new("/usr/bin/systemd-nspawn").exists(),
            "systemd-nspawn is missing: tests/run installs it (apt-get install systemd-container)"
        );
        let started = Instant::now();
        let hint: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(20)
            .collect();
        let name = format!("hf-{hint}-{}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("holdfast-sandbox-")
            .tempdir_in("/var/tmp")
            .expect("state dir in /var/tmp")
            .keep();
        let console_path = dir.join("console.log");
        let console = File::create(&console_path).expect("console log");
        let console_err = console.try_clone().expect("dup console");
        let reader = File::open(&console_path).expect("read console log");
        let bins = Path::new(env!("CARGO_BIN_EXE_holdfast"))
            .parent()
            .expect("binary dir")
            .to_path_buf();
        let mut keeper = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", KEEPER])
            .arg(&dir)
            .arg(&name)
            .arg(format!("{}:{BIN}", bins.display()))
            .stdin(Stdio::piped())
            .stdout(console)
            .stderr(console_err)
            // Not the test's group: a ^C reaches the test, whose exit closes
            // the pipe, and the keeper then tears down in order.
            .process_group(0)
            .spawn()
            .expect("start tests/sandbox/keeper");
        let pipe = keeper.stdin.take();
        let mut sb = Sandbox {
            name,
            dir: dir.clone(),
            keeper,
            pipe,
            console: reader,
            leader: 0,
            pid_ns: String::new(),
            keeper_mnt_ns: String::new(),
            cgroups: Vec::new(),
            boot_time: Duration::ZERO,
        };
        sb.keeper_mnt_ns = wait_until(BOOT_DEADLINE, "the keeper's mount namespace", || {
            let ns = ns_of(sb.keeper.id(), "mnt")?;
            (Some(&ns) != ns_of(std::process::id(), "mnt").as_ref()).then_some(ns)
        });
        sb.cgroups = cgroup_roots()
            .into_iter()
            .map(|r| r.join(&sb.name))
            .collect();
        let leader = {
            let sb = &mut sb;
            wait_until(BOOT_DEADLINE, "the container's PID 1", || {
                if let Ok(Some(status)) = sb.keeper.try_wait() {
                    panic!("the sandbox keeper exited ({status}):\n{}", sb.console());
                }
                let nspawn: u32 = fs::read_to_string(dir.join("nspawn.pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                find_leader(nspawn)
            })
        };
        sb.leader = leader;
        sb.pid_ns = ns_of(leader, "pid").expect("pid ns of the container");
        wait_until(BOOT_DEADLINE, "systemd's private socket", || {
            sb.path("/run/systemd/private").exists().then_some(())
        });
        let out = sb.exec(&["systemctl", "is-system-running", "--wait"]);
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state != "running" {
            let failed = sb.exec(&["systemctl", "--failed", "--no-legend", "--plain"]);
            panic!(
                "the sandbox booted to {state:?}, not running; failed units:\n{}\nconsole:\n{}",
                String::from_utf8_lossy(&failed.stdout),
                sb.console()
            );
        }
        sb.boot_time = started.elapsed();
        eprintln!(
            "sandbox {}: systemd 252 up as PID 1 (host pid {}) in {:.2}s",
            sb.name,
            sb.leader,
            sb.boot_time.as_secs_f64()
        );
        sb
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the container still runs.
    pub fn alive(&self) -> bool {
        pid_alive(self.leader) && ns_of(self.leader, "pid").as_deref() == Some(&self.pid_ns)
    }

    /// The console log so far.
    pub fn console(&self) -> String {
        let mut f = self.console.try_clone().expect("dup console fd");
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    }

    /// A path inside the container, as the host reaches it.
    pub fn path(&self, inside: &str) -> PathBuf {
        assert!(inside.starts_with('/'), "absolute path inside: {inside}");
        PathBuf::from(format!("/proc/{}/root{inside}", self.leader))
    }

    /// The container's network namespace (for `LoadSpec::netns`).
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.leader))
    }

    /// Runs `f` on a thread of its own inside the container's network
    /// namespace (a loopback client).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = self.netns();
        std::thread::scope(|s| {
            s.spawn(move || {
                super::load::join_netns(&ns);
                f()
            })
            .join()
            .expect("client thread in the sandbox's netns panicked")
        })
    }

    /// Writes `contents` to `inside` (parents created), in the container.
    pub fn write(&self, inside: &str, contents: &str) {
        let p = self.path(inside);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {inside} in the sandbox: {e}"));
    }

    /// Copies a host file to `inside` (e.g. another holdfast binary to
    /// upgrade to), executable, via a temp name and a rename, as a package
    /// manager replaces a file.
    pub fn copy_in(&self, host: &Path, inside: &str) {
        let dest = self.path(inside);
        let tmp = dest.with_extension("holdfast-tmp");
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).expect("mkdir inside");
        }
        fs::copy(host, &tmp).unwrap_or_else(|e| panic!("copy {} in: {e}", host.display()));
        fs::rename(&tmp, &dest).unwrap_or_else(|e| panic!("rename to {inside}: {e}"));
    }

    /// Runs `args` inside: every namespace of the container, its root, cwd
    /// `/`, a clean environment. Bounded by 30 s.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg("--target")
            .arg(self.leader.to_string())
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--root", "--wd",
            ])
            .args(["--", "/usr/bin/env", "-i"])
            .arg(format!("PATH={INSIDE_PATH}"))
            .args([
                "HOME=/root",
                "LANG=C.UTF-8",
                "TERM=dumb",
                "SYSTEMD_PAGER=cat",
            ])
            .args(["SYSTEMD_COLORS=0", "SYSTEMD_LOG_COLOR=0"])
            .args(args);
        run_bounded(cmd, DEADLINE)
    }

    /// [`Sandbox::exec`] that must succeed; its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in the sandbox: {args:?}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sh -c script` inside, must succeed.
    pub fn sh(&self, script: &str) -> String {
        self.run(&["sh", "-c", script])
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub fn show(&self, unit: &str, prop: &str) -> String {
        self.run(&["systemctl", "show", "-p", prop, "--value", unit])
            .trim()
            .to_string()
    }

    /// Waits until `systemctl show -p PROP` of `unit` is `want`.
    pub fn wait_show(&self, unit: &str, prop: &str, want: &str) {
        wait_until(DEADLINE, &format!("{unit} {prop}={want}"), || {
            (self.show(unit, prop) == want).then_some(())
        });
    }

    /// The journal (short-precise), all of it or one unit's (`-u UNIT`).
    pub fn journal(&self, unit: Option<&str>) -> String {
        let mut args = vec!["journalctl", "--no-pager", "-o", "short-precise"];
        if let Some(u) = unit {
            args.extend(["-u", u]);
        }
        String::from_utf8_lossy(&self.exec(&args).stdout).into_owned()
    }

    /// The messages (`-o cat`) of `unit` since the sandbox booted.
    pub fn messages(&self, unit: &str) -> String {
        self.run(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
    }

    /// `unit`'s journal entries (`-o json`), oldest first.
    pub fn entries(&self, unit: &str) -> Vec<serde_json::Value> {
        self.run(&["journalctl", "--no-pager", "-o", "json", "-u", unit])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal json: {e}: {l}")))
            .collect()
    }

    /// Waits until `unit`'s journal has `n` messages containing `needle`.
    pub fn wait_messages(&self, unit: &str, needle: &str, n: usize) -> String {
        wait_until(
            DEADLINE,
            &format!("{n} × {needle:?} in the journal of {unit}"),
            || {
                let m = self.messages(unit);
                (m.matches(needle).count() >= n).then_some(m)
            },
        )
    }

    /// Installs `units/*.service` and `units/*.socket` in
    /// /etc/systemd/system with `/usr/bin/holdfast` pointed at [`BIN`], and
    /// reloads systemd.
    pub fn install_units(&self) {
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
        for entry in fs::read_dir(&units).expect("units/") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            if !(name.ends_with(".service") || name.ends_with(".socket")) {
                continue;
            }
            let text = fs::read_to_string(&path).expect("read unit");
            self.write(
                &format!("/etc/systemd/system/{name}"),
                &text.replace("/usr/bin/holdfast", &format!("{BIN}/holdfast")),
            );
        }
        self.run(&["systemctl", "daemon-reload"]);
    }

    /// Tears down now and reports what is left (all empty when clean).
    pub fn shutdown(mut self) -> Leftovers {
        self.teardown()
    }

    fn teardown(&mut self) -> Leftovers {
        let Some(pipe) = self.pipe.take() else {
            return Leftovers::default();
        };
        drop(pipe);
        let start = Instant::now();
        let exited = loop {
            match self.keeper.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if start.elapsed() < TEARDOWN_DEADLINE => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => break false,
            }
        };
        if !exited {
            eprintln!(
                "sandbox {}: the keeper did not finish within {TEARDOWN_DEADLINE:?}; SIGKILL to the container's PID 1 and the keeper",
                self.name
            );
            if self.alive() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.leader as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = self.keeper.kill();
            let _ = self.keeper.wait();
        }
        // A process exiting may still be listed for a moment.
        let settle = Instant::now();
        let left = loop {
            let mut left = pids_in_ns("pid", &self.pid_ns);
            left.extend(pids_in_ns("mnt", &self.keeper_mnt_ns));
            if left.is_empty() || settle.elapsed() > Duration::from_secs(5) {
                break left;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let leftovers = Leftovers {
            processes: left,
            cgroups: self
                .cgroups
                .iter()
                .filter(|c| c.exists())
                .cloned()
                .collect(),
            paths: [&self.dir]
                .iter()
                .filter(|p| p.exists())
                .map(|p| p.to_path_buf())
                .collect(),
            keeper_running: !exited,
        };
        if !exited || leftovers != Leftovers::default() {
            eprintln!(
                "sandbox {}: left behind {leftovers:?}\nconsole:\n{}",
                self.name,
                self.console()
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
        leftovers
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() && self.alive() {
            eprintln!(
                "===== sandbox {} journal:\n{}===== end of journal",
                self.name,
                self.journal(None)
            );
        }
        self.teardown();
    }
}

/// The file's one sandbox, booted by the first test that asks, with
/// holdfast's units installed; tests that share it run one at a time. It is
/// torn down when the test process exits (its pipe to the keeper closes).
pub struct Shared {
    guard: MutexGuard<'static, Option<Sandbox>>,
    /// Units the test started: stopped (and reset) when it ends.
    units: RefCell<Vec<String>>,
}

static SHARED: Mutex<Option<Sandbox>> = Mutex::new(None);

/// See [`Shared`].
pub fn shared(hint: &str) -> Shared {
    let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if !guard.as_ref().is_some_and(Sandbox::alive) {
        let sb = Sandbox::boot(hint);
        sb.install_units();
        *guard = Some(sb);
    }
    Shared {
        guard,
        units: RefCell::new(Vec::new()),
    }
}

impl Shared {
    /// Records `unit` as this test's: stopped when the test ends.
    pub fn owns(&self, unit: &str) {
        let mut units = self.units.borrow_mut();
        if !units.iter().any(|u| u == unit) {
            units.push(unit.to_string());
        }
    }
}

impl std::ops::Deref for Shared {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        self.guard.as_ref().expect("a booted sandbox")
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let Some(sb) = self.guard.as_ref() else {
            return;
        };
        if !sb.alive() {
            return;
        }
        if std::thread::panicking() {
            for u in self.units.borrow().iter() {
                eprintln!(
                    "===== journal of {u} in sandbox {}:\n{}===== end",
                    sb.name(),
                    sb.journal(Some(u))
                );
            }
            eprintln!(
                "===== systemctl status:\n{}",
                String::from_utf8_lossy(
                    &sb.exec(&["systemctl", "status", "--no-pager", "--full"])
                        .stdout
                )
            );
        }
        for u in self.units.borrow().iter().rev() {
            let _ = sb.exec(&["systemctl", "stop", u]);
            let _ = sb.exec(&["systemctl", "reset-failed", u]);
        }
    }
}

/// One `holdfast@NAME.service` of the sandbox, with its config
/// `/etc/holdfast/NAME.toml`: a TCP listener `http` on 127.0.0.1:PORT (the
/// container's own loopback) and a unix listener `unix` at
/// `/run/holdfast/NAME/app.sock`, the control socket beside it.
pub struct App<'a> {
    pub sb: &'a Shared,
    pub name: String,
    pub port: u16,
}

impl<'a> App<'a> {
    /// Writes the config: the listeners above, then `app` (the `[app]` table
    /// and anything after; `{worker}` is the test worker's path). The unit is
    /// stopped when the test ends.
    pub fn new(sb: &'a Shared, name: &str, port: u16, app: &str) -> App<'a> {
        let a = App {
            sb,
            name: name.to_string(),
            port,
        };
        sb.owns(&a.unit());
        a.write_config(app);
        a
    }

    /// Rewrites the config (a temp file renamed over it).
    pub fn write_config(&self, app: &str) {
        let text = format!(
            "control_socket = \"{control}\"\n\n[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:{port}\"\n\n[[listen]]\nname = \"unix\"\naddress = \"unix:{unix}\"\n\n{app}",
            control = self.control(),
            port = self.port,
            unix = self.unix_path(),
            app = app.replace("{worker}", &format!("{BIN}/holdfast-test-worker")),
        );
        let tmp = format!("{}.tmp", self.config());
        self.sb.write(&tmp, &text);
        fs::rename(self.sb.path(&tmp), self.sb.path(&self.config())).expect("rename config");
    }

    pub fn unit(&self) -> String {
        format!("holdfast@{}.service", self.name)
    }

    pub fn config(&self) -> String {
        format!("/etc/holdfast/{}.toml", self.name)
    }

    pub fn control(&self) -> String {
        format!("/run/holdfast/{}/holdfast.sock", self.name)
    }

    pub fn unix_path(&self) -> String {
        format!("/run/holdfast/{}/app.sock", self.name)
    }

    /// The TCP listener, reached from the sandbox's network namespace.
    pub fn tcp(&self) -> super::Target {
        super::Target::local(self.port)
    }

    /// The unix listener, reached by path through the container's root.
    pub fn unix(&self) -> super::Target {
        super::Target::Unix(self.sb.path(&self.unix_path()))
    }

    /// A load on `target` from inside the sandbox's network namespace.
    pub fn load_spec(&self, target: super::Target) -> super::LoadSpec {
        super::LoadSpec {
            netns: Some(self.sb.netns()),
            ..super::LoadSpec::new(target)
        }
    }

    /// Adds a drop-in (`[Service]` lines) for this instance and reloads systemd.
    pub fn dropin(&self, file: &str, text: &str) {
        self.sb.write(
            &format!("/etc/systemd/system/{}.d/{file}.conf", self.unit()),
            text,
        );
        self.sb.run(&["systemctl", "daemon-reload"]);
    }

    /// Runs this instance from `binary` (a path inside, e.g. one installed
    /// with [`Sandbox::copy_in`] as a package would) instead of [`BIN`]:
    /// a drop-in replacing ExecStart= and ExecReload=. For upgrade tests: the
    /// file can then be replaced while holdfast runs.
    pub fn run_binary(&self, binary: &str) {
        self.dropin(
            "binary",
            &format!(
                "[Service]\nExecStart=\nExecStart={binary} run --config {config}\nExecReload=\nExecReload={binary} restart --wait --control {control}\n",
                config = self.config(),
                control = self.control()
            ),
        );
    }

    /// `systemctl VERB UNIT` (bounded); its output.
    pub fn systemctl(&self, verb: &str) -> Output {
        self.sb.exec(&["systemctl", verb, &self.unit()])
    }

    /// `systemctl VERB UNIT`, which must succeed.
    pub fn must(&self, verb: &str) {
        let out = self.systemctl(verb);
        assert!(
            out.status.success(),
            "systemctl {verb} {}: {}\n{}\njournal:\n{}",
            self.unit(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.sb.journal(Some(&self.unit()))
        );
    }

    pub fn show(&self, prop: &str) -> String {
        self.sb.show(&self.unit(), prop)
    }

    /// holdfast's pid inside the container (MainPID).
    pub fn main_pid(&self) -> u32 {
        self.show("MainPID").parse().expect("MainPID")
    }

    /// The unit's messages so far (`journalctl -o cat -u UNIT`).
    pub fn messages(&self) -> String {
        self.sb.messages(&self.unit())
    }

    /// `holdfast status --json` through the control socket: the snapshot.
    pub fn status(&self) -> serde_json::Value {
        let out = self.sb.run(&[
            &format!("{BIN}/holdfast"),
            "status",
            "--json",
            "--control",
            &self.control(),
        ]);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
    }

    /// The processes of the unit's cgroup (and its sub-cgroups), inside pids.
    pub fn cgroup_pids(&self) -> Vec<u32> {
        let out = self.sb.sh(&format!(
            "cat $(find /sys/fs/cgroup/system.slice/system-holdfast.slice/{} -name cgroup.procs 2>/dev/null) 2>/dev/null; true",
            self.unit()
        ));
        let mut v: Vec<u32> = out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        v.sort_unstable();
        v
    }
}
