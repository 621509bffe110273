//! The contenders: how each is started, restarted and stopped, and where its
//! supervisor's pids are.
//!
//! A "restart" is whatever the contender does to replace its workers, and it
//! returns once the contender itself says it is done (its log line, the old
//! pid gone, or the port answering again); nothing waits a fixed time. Each
//! contender's own documentation is where its drain semantics come from:
//! README "Benchmarks and figures" lists them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bench_common::Running;
pub use crate::kinds::Kind;
use crate::kinds::{MOD_PASSENGER_SO, PASSENGER_ROOT};
use crate::procs::{self, wait_until, Group};

/// Longest a restart may take before the run is given up on.
const RESTART_LIMIT: Duration = Duration::from_secs(90);
/// Longest a server may take to answer after it was started.
const START_LIMIT: Duration = Duration::from_secs(90);
/// Lines per second each test worker writes in the log rows.
const LOG_RATE: &str = "10000";

/// Where the apps and the holdfast binaries are.
pub struct Env {
    /// examples/apps, absolute.
    pub apps: PathBuf,
    /// `APP_BOOT_SLEEP_MS` for the Ruby, Python and Perl apps: how long
    /// loading the app takes (a real app's boot), in ms.
    pub boot_ms: u64,
}

/// Where the benchmark reads the supervisor's pids from, in its sampler thread.
#[derive(Debug, Clone)]
pub enum SupProbe {
    None,
    Pid(i32),
    /// Unicorn's pid file (and `.oldbin` during USR2).
    PidFiles(Vec<PathBuf>),
    /// Passenger's watchdog (a child of Apache's master) and its core.
    PassengerAgents {
        apache: i32,
    },
}

impl SupProbe {
    pub fn pids(&self) -> Vec<i32> {
        match self {
            SupProbe::None => vec![],
            SupProbe::Pid(p) => vec![*p],
            SupProbe::PidFiles(files) => files
                .iter()
                .filter_map(|f| fs::read_to_string(f).ok()?.trim().parse().ok())
                .filter(|&p| procs::alive(p))
                .collect(),
            SupProbe::PassengerAgents { apache } => {
                let mut out = Vec::new();
                for w in procs::children(*apache) {
                    if procs::cmdline(w).starts_with("Passenger watchdog") {
                        out.push(w);
                        out.extend(
                            procs::children(w)
                                .into_iter()
                                .filter(|&c| procs::cmdline(c).starts_with("Passenger core")),
                        );
                    }
                }
                out
            }
        }
    }
}

enum Server {
    Group(Group),
    Holdfast(Running),
    /// A private Apache with Passenger; `watchdogs` are every Passenger
    /// watchdog seen under it (each in a session of its own).
    Apache {
        group: Group,
        approot: PathBuf,
        watchdogs: Vec<i32>,
    },
    /// Between the stop and the start of a naive restart.
    Stopped,
}

/// A running contender.
pub struct Instance {
    pub kind: Kind,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// `APP_BOOT_SLEEP_MS` for a server started again (the naive restart).
    boot: String,
    server: Server,
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

fn holdfast_app(port: u16, apps: &Path, body: &str) -> String {
    format!(
        "control_socket = \"{{dir}}/holdfast.sock\"\n[[listen]]\naddress = \"127.0.0.1:{port}\"\nbacklog = 2048\n[app]\ncwd = \"{}\"\nworkers = 2\nmax_surge = 1\nready_timeout = \"60s\"\n{body}",
        apps.display()
    )
}

/// The `env = {...}` line of a holdfast config: the boot delay and `extra`.
fn holdfast_env(boot_ms: u64, extra: &str) -> String {
    format!("env = {{ APP_BOOT_SLEEP_MS = \"{boot_ms}\"{extra} }}\n")
}

const TEST_WORKER_APP: &str =
    "command = [\"{test_worker}\", \"--lame-duck-ms\", \"1000\"]\ndrain_timeout = \"30s\"\n";

impl Instance {
    /// Starts the contender on a free port and waits until it answers `GET /`.
    pub fn start(kind: Kind, env: &Env) -> Result<Instance> {
        let dir = tempfile::Builder::new()
            .prefix("holdfast-bench-alt-")
            .tempdir()
            .context("tempdir")?;
        let port = crate::bench_common::free_port();
        let d = dir.path().to_path_buf();
        let apps = env.apps.as_path();
        let boot = env.boot_ms.to_string();
        let boot_env = [("APP_BOOT_SLEEP_MS", boot.as_str())];
        let server = match kind {
            Kind::NaiveUnicorn | Kind::UnicornUsr2 | Kind::UnicornHup => {
                write(
                    &d.join("unicorn.rb"),
                    &format!(
                        "worker_processes 2\npreload_app true\ntimeout 30\nlisten \"127.0.0.1:{port}\"\npid \"{}\"\n",
                        d.join("unicorn.pid").display()
                    ),
                )?;
                Server::Group(spawn_unicorn(&d, apps, &boot)?)
            }
            Kind::PumaPhased | Kind::PumaHot => {
                let bind = format!("tcp://127.0.0.1:{port}");
                Server::Group(Group::spawn(
                    "puma",
                    &["-C", "puma.rb", "-w", "2", "-t", "16:16", "-b", &bind, "config.ru"],
                    apps,
                    &[("RACK_ENV", "production"), boot_env[0]],
                    d.join("server.log"),
                )?)
            }
            Kind::GunicornHup => {
                let bind = format!("127.0.0.1:{port}");
                Server::Group(Group::spawn(
                    "gunicorn",
                    &["--workers", "2", "--graceful-timeout", "25", "-b", &bind, "app:application"],
                    apps,
                    &boot_env,
                    d.join("server.log"),
                )?)
            }
            Kind::StarterHup => {
                let listen = format!("--port=127.0.0.1:{port}");
                Server::Group(Group::spawn(
                    "start_server",
                    &[
                        &listen,
                        "--interval=1",
                        "--",
                        "plackup",
                        "-s",
                        "Starlet",
                        "-E",
                        "deployment",
                        "--max-workers=2",
                        "--max-reqs-per-child=1000000000",
                        "app.psgi",
                    ],
                    apps,
                    &boot_env,
                    d.join("server.log"),
                )?)
            }
            Kind::PassengerUsr1 | Kind::ApacheGraceful => start_apache(&d, apps, port, env.boot_ms)?,
            Kind::HoldfastUnicorn => Server::Holdfast(Running::start(&holdfast_app(
                port,
                apps,
                &format!("command = [\"unicorn\", \"-E\", \"production\", \"-c\", \"unicorn.conf.rb\", \"config.ru\"]\n{}handoff = [\"systemd\"]\nready = \"probe\"\ndrain_signal = \"QUIT\"\ndrain_timeout = \"35s\"\n", holdfast_env(env.boot_ms, ", UNICORN_WORKERS = \"1\"")),
            ))),
            Kind::HoldfastPuma => Server::Holdfast(Running::start(&holdfast_app(
                port,
                apps,
                &format!("command = [\"puma\", \"-C\", \"puma.rb\", \"--bind-to-activated-sockets=only\", \"-t\", \"16:16\", \"config.ru\"]\n{}handoff = [\"systemd\"]\nready = \"notify\"\ndrain_signal = \"TERM\"\ndrain_timeout = \"35s\"\n", holdfast_env(env.boot_ms, ", RACK_ENV = \"production\"")),
            ))),
            Kind::HoldfastGunicorn => Server::Holdfast(Running::start(&holdfast_app(
                port,
                apps,
                &format!("command = [\"gunicorn\", \"--workers\", \"1\", \"--graceful-timeout\", \"25\", \"app:application\"]\n{}handoff = [\"systemd\"]\nready = \"probe\"\ndrain_signal = \"TERM\"\ndrain_timeout = \"30s\"\n", holdfast_env(env.boot_ms, "")),
            ))),
            Kind::HoldfastMemory => Server::Holdfast(Running::start(&holdfast_app(
                port,
                apps,
                &format!(
                    "{TEST_WORKER_APP}[memory]\nlimit = \"96MiB\"\nmetric = \"rss\"\nscope = \"tree\"\ninterval = \"200ms\"\ngrace = 1\nmin_lifetime = \"0s\"\n"
                ),
            ))),
            Kind::KillOne | Kind::TermOne => {
                Server::Holdfast(Running::start(&holdfast_app(port, apps, TEST_WORKER_APP)))
            }
            Kind::HoldfastReopen => Server::Holdfast(Running::start(&holdfast_app(
                port,
                apps,
                &format!(
                    "command = [\"{{test_worker}}\", \"--lame-duck-ms\", \"1000\", \"--log-forever\", \"--log-rate\", \"{LOG_RATE}\"]\ndrain_timeout = \"30s\"\n[logs]\nstdout = \"{}\"\nprefix = false\n",
                    d.join("app.log").display()
                ),
            ))),
            Kind::CopyTruncate => {
                let bind = format!("127.0.0.1:{port}");
                let worker = crate::bench_common::test_worker_bin();
                Server::Group(Group::spawn(
                    &worker.to_string_lossy(),
                    &[
                        "--bind",
                        &bind,
                        "--lame-duck-ms",
                        "1000",
                        "--log-forever",
                        "--log-rate",
                        LOG_RATE,
                    ],
                    &d,
                    &[],
                    d.join("app.log"),
                )?)
            }
        };
        if let Server::Holdfast(h) = &server {
            procs::remember(procs::Live::Holdfast(h.pid()));
        }
        let inst = Instance {
            kind,
            port,
            dir,
            boot,
            server,
        };
        inst.wait_answering()
            .with_context(|| format!("{} did not start:\n{}", kind.id(), inst.log_tail()))?;
        if let Server::Holdfast(h) = &inst.server {
            let h_log = h.log.clone();
            wait_until("holdfast: all workers ready", START_LIMIT, || {
                count(&procs::read_lossy(&h_log), "all workers ready") >= 1
            })?;
        }
        if matches!(kind, Kind::PassengerUsr1 | Kind::ApacheGraceful) {
            // PassengerMinInstances 2: wait until both app processes serve.
            wait_until("Passenger's 2 app processes", START_LIMIT, || {
                inst.passenger_apps().len() >= 2
            })?;
        }
        Ok(inst)
    }

    fn wait_answering(&self) -> Result<()> {
        let port = self.port;
        wait_until(&format!("GET / on 127.0.0.1:{port}"), START_LIMIT, || {
            procs::answers(port, "/?sleep=0")
        })
    }

    fn log_path(&self) -> PathBuf {
        match &self.server {
            Server::Group(g) => g.log.clone(),
            Server::Apache { .. } => self.dir.path().join("error.log"),
            Server::Holdfast(h) => h.log.clone(),
            Server::Stopped => self.dir.path().join("server.log"),
        }
    }

    fn log_text(&self) -> String {
        procs::read_lossy(&self.log_path())
    }

    /// The last 40 lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Where the sampler finds the supervisor's pids.
    pub fn sup_probe(&self) -> SupProbe {
        match (&self.server, self.kind) {
            (_, Kind::CopyTruncate) => SupProbe::None,
            (Server::Group(_), Kind::NaiveUnicorn | Kind::UnicornUsr2 | Kind::UnicornHup) => {
                let pid = self.dir.path().join("unicorn.pid");
                let old = self.dir.path().join("unicorn.pid.oldbin");
                SupProbe::PidFiles(vec![pid, old])
            }
            (Server::Group(g), _) => SupProbe::Pid(g.pid()),
            (Server::Holdfast(h), _) => SupProbe::Pid(h.pid()),
            (Server::Apache { group, .. }, _) => SupProbe::PassengerAgents {
                apache: group.pid(),
            },
            (Server::Stopped, _) => SupProbe::None,
        }
    }

    fn group(&self) -> Result<&Group> {
        match &self.server {
            Server::Group(g) => Ok(g),
            Server::Apache { group, .. } => Ok(group),
            _ => bail!("{}: no process group", self.kind.id()),
        }
    }

    fn holdfast(&self) -> Result<&Running> {
        match &self.server {
            Server::Holdfast(h) => Ok(h),
            _ => bail!("{}: not under holdfast", self.kind.id()),
        }
    }

    /// Replaces the workers (or rotates the log) once, the contender's way,
    /// and returns when the contender says it is done.
    pub fn restart(&mut self, round: usize) -> Result<()> {
        let r = self.restart_inner(round);
        r.with_context(|| {
            format!(
                "restart of {}; log tail:\n{}",
                self.kind.id(),
                self.log_tail()
            )
        })
    }

    fn restart_inner(&mut self, round: usize) -> Result<()> {
        let log = self.log_path();
        let mark = procs::read_lossy(&log).len();
        let since = move || {
            let text = procs::read_lossy(&log);
            text.get(mark..).unwrap_or("").to_string()
        };
        match self.kind {
            Kind::NaiveUnicorn => {
                let Server::Group(mut old) = std::mem::replace(&mut self.server, Server::Stopped)
                else {
                    bail!("naive: not running");
                };
                old.signal(Signal::SIGQUIT)?;
                old.wait_gone(RESTART_LIMIT)?;
                drop(old);
                self.server =
                    Server::Group(spawn_unicorn(self.dir.path(), &apps_dir(), &self.boot)?);
                self.wait_answering()
            }
            Kind::UnicornUsr2 => {
                let pidfile = self.dir.path().join("unicorn.pid");
                let old = read_pid(&pidfile)?;
                signal(old, Signal::SIGUSR2)?;
                wait_until("the new master's 2 workers ready", RESTART_LIMIT, || {
                    let s = since();
                    count(&s, "worker=0 ready") >= 1 && count(&s, "worker=1 ready") >= 1
                })?;
                signal(old, Signal::SIGQUIT)?;
                wait_until("the old master to exit", RESTART_LIMIT, || {
                    procs::reap(old);
                    !procs::alive(old)
                })
            }
            Kind::UnicornHup => {
                let master = read_pid(&self.dir.path().join("unicorn.pid"))?;
                let old = procs::children(master);
                signal(master, Signal::SIGHUP)?;
                wait_until("2 new workers ready, old ones gone", RESTART_LIMIT, || {
                    let s = since();
                    count(&s, "worker=0 ready") >= 1
                        && count(&s, "worker=1 ready") >= 1
                        && old.iter().all(|&p| !procs::alive(p))
                })
            }
            Kind::PumaPhased | Kind::PumaHot => {
                let sig = if self.kind == Kind::PumaPhased {
                    Signal::SIGUSR1
                } else {
                    Signal::SIGUSR2
                };
                self.group()?.signal(sig)?;
                wait_until("2 Puma workers booted", RESTART_LIMIT, || {
                    count(&since(), "booted in") >= 2
                })
            }
            Kind::GunicornHup => {
                let g = self.group()?;
                let old = procs::children(g.pid());
                g.signal(Signal::SIGHUP)?;
                wait_until("2 workers booted, old ones gone", RESTART_LIMIT, || {
                    count(&since(), "Booting worker") >= 2 && old.iter().all(|&p| !procs::alive(p))
                })
            }
            Kind::StarterHup => {
                self.group()?.signal(Signal::SIGHUP)?;
                wait_until("start_server: old worker died", RESTART_LIMIT, || {
                    let s = since();
                    s.contains("old worker") && s.contains("died")
                })
            }
            Kind::PassengerUsr1 => {
                let apps = self.passenger_apps();
                let Some(&victim) = apps.get(round % apps.len().max(1)) else {
                    bail!("no Passenger app process found");
                };
                signal(victim, Signal::SIGUSR1)?;
                wait_until("the app process gone and 2 again", RESTART_LIMIT, || {
                    !procs::alive(victim) && self.passenger_apps().len() >= 2
                })
            }
            Kind::ApacheGraceful => {
                let d = self.dir.path();
                fs::rename(d.join("error.log"), d.join(format!("error.log.{round}")))
                    .context("rotate error.log")?;
                let old = self.passenger_apps();
                self.group()?.signal(Signal::SIGUSR1)?;
                wait_until("old app processes gone, 2 new", RESTART_LIMIT, || {
                    let now = self.passenger_apps();
                    old.iter().all(|&p| !procs::alive(p))
                        && now.iter().filter(|p| !old.contains(p)).count() >= 2
                })?;
                self.note_watchdogs();
                Ok(())
            }
            Kind::HoldfastUnicorn | Kind::HoldfastPuma | Kind::HoldfastGunicorn => {
                self.holdfast()?.signal(Signal::SIGHUP);
                wait_until("holdfast: rollout finished", RESTART_LIMIT, || {
                    let s = since();
                    s.contains("rollout finished") || s.contains("rollout failed")
                })?;
                if since().contains("rollout failed") {
                    bail!("holdfast: rollout failed");
                }
                Ok(())
            }
            Kind::HoldfastMemory => {
                let r =
                    crate::load::http_get(&crate::load::Target::local(self.port), "/grow?mb=128")
                        .map_err(|k| anyhow::anyhow!("GET /grow: {k}"))?;
                let pid = r.pid().context("GET /grow: no X-Pid")? as i32;
                wait_until("the grown worker replaced", RESTART_LIMIT, || {
                    let s = since();
                    !procs::alive(pid) && s.contains("worker ready") && s.contains("replacing")
                })
            }
            Kind::KillOne | Kind::TermOne => {
                let pid = procs::serving_pid(self.port)?;
                let sig = if self.kind == Kind::KillOne {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                signal(pid, sig)?;
                wait_until("the worker gone and a new one ready", RESTART_LIMIT, || {
                    !procs::alive(pid) && since().contains("worker ready")
                })
            }
            Kind::HoldfastReopen => {
                // units/holdfast.logrotate: rename, create, and a postrotate
                // that returns once holdfast has reopened every file.
                let h = self.holdfast()?;
                let cfg = h.dir.path().join("holdfast.toml");
                let holdfast = crate::bench_common::holdfast_bin();
                logrotate(
                    self.dir.path(),
                    &format!(
                        "create 0640\nsharedscripts\npostrotate\n    {} reopen-logs --config {}\nendscript",
                        holdfast.display(),
                        cfg.display()
                    ),
                )?;
                if !since().contains("log file reopened") {
                    bail!("logrotate's postrotate returned, but holdfast logged no reopen");
                }
                Ok(())
            }
            Kind::CopyTruncate => logrotate(self.dir.path(), "copytruncate"),
        }
    }

    /// Passenger's app processes of this instance: descendants of its Apache
    /// whose title names its app root.
    fn passenger_apps(&self) -> Vec<i32> {
        let Server::Apache { group, approot, .. } = &self.server else {
            return vec![];
        };
        let title = format!("Passenger RubyApp: {}", approot.display());
        let mut out = Vec::new();
        let mut todo = vec![group.pid()];
        while let Some(p) = todo.pop() {
            for c in procs::children(p) {
                if procs::cmdline(c).starts_with(&title) {
                    out.push(c);
                }
                todo.push(c);
            }
        }
        out.sort_unstable();
        out
    }

    fn note_watchdogs(&mut self) {
        if let Server::Apache {
            group, watchdogs, ..
        } = &mut self.server
        {
            for w in procs::children(group.pid()) {
                if procs::cmdline(w).starts_with("Passenger watchdog") && !watchdogs.contains(&w) {
                    watchdogs.push(w);
                }
            }
        }
    }

    /// Stops the contender gracefully (bounded), then counts the log lines
    /// lost, for the log rows: `None` for the others.
    pub fn finish(mut self) -> Option<Result<u64>> {
        self.note_watchdogs();
        match std::mem::replace(&mut self.server, Server::Stopped) {
            Server::Holdfast(h) => {
                let pid = h.pid();
                h.stop();
                procs::forget(procs::Live::Holdfast(pid));
            }
            Server::Group(g) => g.stop(Signal::SIGTERM, Duration::from_secs(40)),
            Server::Apache {
                group, watchdogs, ..
            } => {
                group.stop(Signal::SIGTERM, Duration::from_secs(30));
                // The watchdog stops its core and apps once Apache is gone;
                // each runs in the watchdog's session.
                let left = || -> Vec<i32> {
                    procs::all_stats()
                        .into_iter()
                        .filter(|(_, s)| watchdogs.contains(&s.sid) && s.state != 'Z')
                        .map(|(p, _)| p)
                        .collect()
                };
                if wait_until("Passenger to exit", Duration::from_secs(20), || {
                    left().is_empty()
                })
                .is_err()
                {
                    procs::kill_pids(&left());
                }
                procs::reap_orphans();
            }
            Server::Stopped => {}
        }
        match self.kind {
            Kind::HoldfastReopen | Kind::CopyTruncate => Some(lost_lines(self.dir.path())),
            _ => None,
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // finish() empties `server`; on a panic or an early return the
        // guards inside (Group, Running) kill what is left. Passenger's
        // session leaders are killed by pid.
        if let Server::Holdfast(h) = &self.server {
            procs::forget(procs::Live::Holdfast(h.pid()));
        }
        if let Server::Apache { watchdogs, .. } = &self.server {
            let w = watchdogs.clone();
            self.server = Server::Stopped;
            let left: Vec<i32> = procs::all_stats()
                .into_iter()
                .filter(|(_, s)| w.contains(&s.sid))
                .map(|(p, _)| p)
                .collect();
            procs::kill_pids(&left);
        }
    }
}

fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/apps")
}

fn spawn_unicorn(dir: &Path, apps: &Path, boot_ms: &str) -> Result<Group> {
    let conf = dir.join("unicorn.rb");
    Group::spawn(
        "unicorn",
        &[
            "-E",
            "production",
            "-c",
            &conf.to_string_lossy(),
            "config.ru",
        ],
        apps,
        &[("APP_BOOT_SLEEP_MS", boot_ms)],
        dir.join("server.log"),
    )
}

fn read_pid(path: &Path) -> Result<i32> {
    fs::read_to_string(path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parse {}", path.display()))
}

fn signal(pid: i32, sig: Signal) -> Result<()> {
    kill(Pid::from_raw(pid), sig).with_context(|| format!("kill -{sig} {pid}"))
}

/// Runs the real `logrotate -f` on `dir`/app.log with `method` (its
/// rotation directives), a state file of its own, and waits for it (bounded).
fn logrotate(dir: &Path, method: &str) -> Result<()> {
    let conf = dir.join("logrotate.conf");
    write(
        &conf,
        &format!(
            "{} {{\n    rotate 1000\n    missingok\n    nocompress\n    {}\n}}\n",
            dir.join("app.log").display(),
            method.replace('\n', "\n    ")
        ),
    )?;
    let out = dir.join("logrotate.out");
    let mut g = Group::spawn(
        "logrotate",
        &[
            "-f",
            "-s",
            &dir.join("logrotate.state").to_string_lossy(),
            &conf.to_string_lossy(),
        ],
        dir,
        &[],
        out.clone(),
    )?;
    g.wait_gone(RESTART_LIMIT)?;
    match g.child.try_wait() {
        Ok(Some(st)) if st.success() => Ok(()),
        other => bail!("logrotate: {other:?}: {}", procs::read_lossy(&out).trim()),
    }
}

/// A private Apache (its own config, pid file and logs in `dir`) with
/// Passenger serving examples/apps/config.ru with 2 app processes.
fn start_apache(dir: &Path, apps: &Path, port: u16, boot_ms: u64) -> Result<Server> {
    use std::os::unix::fs::PermissionsExt;
    // Passenger runs the app as nobody when its files are root's: the
    // directories must be readable and tmp/ writable by it.
    let approot = dir.join("app");
    for sub in ["public", "tmp", "run", "instreg"] {
        let p = if sub == "run" || sub == "instreg" {
            dir.join(sub)
        } else {
            approot.join(sub)
        };
        fs::create_dir_all(&p).with_context(|| format!("mkdir {}", p.display()))?;
    }
    fs::copy(apps.join("config.ru"), approot.join("config.ru")).context("copy config.ru")?;
    for (p, mode) in [
        (dir.to_path_buf(), 0o755),
        (approot.clone(), 0o755),
        (approot.join("public"), 0o755),
        (approot.join("tmp"), 0o1777),
        (dir.join("instreg"), 0o1777),
        (dir.join("run"), 0o755),
    ] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", p.display()))?;
    }
    let d = dir.display();
    let conf = format!(
        r#"ServerRoot /etc/apache2
PidFile {d}/run/apache.pid
Mutex file:{d}/run default
DefaultRuntimeDir {d}/run
LoadModule mpm_event_module /usr/lib/apache2/modules/mod_mpm_event.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule env_module /usr/lib/apache2/modules/mod_env.so
LoadModule passenger_module {MOD_PASSENGER_SO}
Listen 127.0.0.1:{port}
ServerName localhost
ErrorLog {d}/error.log
LogLevel warn
User nobody
Group nogroup
ServerLimit 2
ThreadsPerChild 64
MaxRequestWorkers 128
KeepAlive On
MaxKeepAliveRequests 0
PassengerRoot {PASSENGER_ROOT}
PassengerDefaultRuby /usr/bin/ruby
PassengerInstanceRegistryDir {d}/instreg
PassengerDisableAnonymousTelemetry on
PassengerDisableSecurityUpdateCheck on
PassengerMaxPoolSize 2
PassengerMinInstances 2
PassengerPreStart http://127.0.0.1:{port}/
PassengerAppEnv production
SetEnv APP_BOOT_SLEEP_MS {boot_ms}
DocumentRoot {approot}/public
<Directory {approot}/public>
  Require all granted
</Directory>
"#,
        approot = approot.display()
    );
    write(&dir.join("apache.conf"), &conf)?;
    let group = Group::spawn(
        "apache2",
        &[
            "-f",
            &dir.join("apache.conf").to_string_lossy(),
            "-DFOREGROUND",
        ],
        dir,
        &[],
        dir.join("apache.out"),
    )?;
    Ok(Server::Apache {
        group,
        approot,
        watchdogs: vec![],
    })
}

/// Lines lost across `app.log` and its rotated copies: each test worker
/// numbers its lines (`w<slot> <pid> <seq> ...`) and ends with `w<slot>
/// <pid> done <last>` when it drains; a number missing below `last` is lost.
fn lost_lines(dir: &Path) -> Result<u64> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut seen: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    let mut files = 0;
    for e in fs::read_dir(dir).context("read_dir")?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("app.log") {
            continue;
        }
        files += 1;
        for line in procs::read_lossy(&e.path()).lines() {
            let t: Vec<&str> = line.split_whitespace().take(4).collect();
            let (Some(w), Some(pid), Some(third)) = (t.first(), t.get(1), t.get(2)) else {
                continue;
            };
            let Ok(pid) = pid.parse::<u64>() else {
                continue;
            };
            if !w.starts_with('w') {
                continue;
            }
            if *third == "done" {
                if let Some(n) = t.get(3).and_then(|v| v.parse().ok()) {
                    last.insert(pid, n);
                }
            } else if let Ok(seq) = third.parse::<u64>() {
                seen.entry(pid).or_default().insert(seq);
            }
        }
    }
    if files == 0 || seen.is_empty() {
        bail!("no numbered log lines found in {}", dir.display());
    }
    let mut lost = 0;
    for (pid, seqs) in &seen {
        let Some(&end) = last.get(pid) else {
            bail!(
                "worker {pid} wrote no `done` line (it did not drain): its loss cannot be counted"
            );
        };
        lost += (1..=end).filter(|s| !seqs.contains(s)).count() as u64;
    }
    Ok(lost)
}
