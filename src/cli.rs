//! The command line: `holdfast run | check | demo | ...`; `man` and
//! `completions` print what the Debian package installs.
//!
//! Exit codes follow sysexits.h: 0 ok, 64 usage, 69 an address cannot be
//! bound (unavailable), 70 internal error, 71 an OS resource failed, 78 the
//! config (or its command) is wrong. The control commands (status, restart,
//! reopen-logs, scale, stop, upgrade): 0 ok, 1 the request failed
//! (`status --ready`: not ready), 69 holdfast is not running, 77 permission
//! denied, 78 the --config file is unreadable.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Address, Config, Overrides};
use crate::edge::{Fallback, Incoming, Invocation, Runtime};

#[derive(Debug, Parser)]
#[command(
    name = "holdfast",
    version,
    about = "Graceful-restart supervisor for Unix app servers: holds the listening sockets, replaces workers start-before-stop.",
    after_help = "The config file: holdfast.toml(5) (holdfast man holdfast.toml). Each command: holdfast COMMAND --help, or holdfast-COMMAND(1)."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bind the listeners and run the workers.
    Run(RunArgs),
    /// Validate a config file and exit (0 valid, 78 invalid).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a demo: two test workers on 127.0.0.1:8080.
    Demo {
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Show holdfast's workers, listeners and counters (a table, or --json); --ready and --live are probes.
    Status {
        /// Readiness probe: exit 0 when every slot has a ready worker of the current generation and holdfast is not stopping; else 1 with the reason in one line.
        #[arg(long, conflicts_with = "live")]
        ready: bool,
        /// Liveness probe: exit 0 when holdfast's event loop answers.
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Rolling restart (as SIGHUP: the config is re-read); --wait returns when it ends.
    Restart {
        /// Return when the rollout ends: exit 0 when it succeeded, 1 with the reason when not.
        #[arg(long)]
        wait: bool,
        /// Replace only this slot's worker, start-before-stop, with its own generation (the config is not re-read); returns when the new worker is ready (exit 0) or failed (1, with why).
        #[arg(long, value_name = "N")]
        slot: Option<u32>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Reopen the log files (as SIGUSR1); returns when they are reopened.
    ReopenLogs(ControlArgs),
    /// Run N workers from now on.
    Scale {
        /// How many workers (at least 1).
        workers: u32,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Graceful stop (as SIGTERM); --wait returns when holdfast has exited.
    Stop {
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Print a manual page (roff): holdfast(1) by default; --dir writes every page.
    Man {
        /// holdfast, holdfast-COMMAND (holdfast-run, holdfast-status, ...) or holdfast.toml (the config file, section 5).
        #[arg(default_value = "holdfast")]
        page: String,
        /// Write every page (holdfast.1, holdfast-run.1, ..., holdfast.toml.5) into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, ...).
    Completions { shell: clap_complete::Shell },
    /// Upgrade holdfast in place (as SIGUSR2): exec the new binary in the
    /// same pid, workers untouched. Refused, with nothing changed, when the
    /// binary cannot adopt holdfast's state.
    Upgrade {
        /// Return when the new image has adopted everything (exit 0 with its
        /// message), or the upgrade failed (exit 1 with the reason).
        #[arg(long)]
        wait: bool,
        /// The new binary; default: the path holdfast was started from.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Print holdfast's version; --json adds the handover formats this
    /// binary reads (what `upgrade` checks before it execs a binary).
    Version {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The TOML config file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// A listening address ("127.0.0.1:8080", "[::1]:8080", "unix:/path"); repeatable; replaces [[listen]].
    #[arg(long, value_parser = parse_address)]
    pub listen: Vec<Address>,
    /// How many workers; overrides [app] workers.
    #[arg(long)]
    pub workers: Option<u32>,
    /// The worker command, after `--`; overrides [app] command.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// How the control commands find holdfast: `--control`, then `--config`'s
/// `control_socket`, then `$HOLDFAST_CONTROL`, then the default rule
/// ([`crate::config::default_control_socket`]).
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The control socket.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The config file holdfast runs with (its control_socket, or the socket next to it).
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the response as JSON (for scripts).
    #[arg(long)]
    pub json: bool,
}

impl ControlArgs {
    /// The socket path, or a config error.
    pub fn socket(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.control {
            return Ok(p.clone());
        }
        if let Some(file) = &self.config {
            // Only `control_socket` matters here: a config that holdfast
            // would refuse (a removed cwd, a typo being fixed) must not stop
            // `stop` or `status` from reaching the running holdfast.
            let path = std::path::absolute(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("config {}: {e}", path.display()))?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| {
                format!(
                    "config {}: not TOML, so its control_socket is unknown ({}); name the socket with --control",
                    path.display(),
                    e.message().trim()
                )
            })?;
            let base = path.parent().map(PathBuf::from).unwrap_or_default();
            return Ok(match table.get("control_socket").and_then(|v| v.as_str()) {
                Some(p) => base.join(p),
                None => crate::config::default_control_socket(Some(&path)),
            });
        }
        if let Some(p) = std::env::var_os("HOLDFAST_CONTROL").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        Ok(crate::config::default_control_socket(None))
    }
}

fn control(args: &ControlArgs, command: crate::control::Command) -> ExitCode {
    match args.socket() {
        Ok(path) => code(crate::control::run_client(&path, command, args.json)),
        Err(e) => {
            eprintln!("holdfast: {e}");
            code(exitcode::CONFIG)
        }
    }
}

fn parse_address(s: &str) -> Result<Address, String> {
    s.parse()
}

/// Sends holdfast's log to stderr, or to `own_log` (`[logs] holdfast_log`,
/// reopened with the workers' logs); [`run`] moves the writing to a thread of
/// its own: see [`crate::logs::OwnLog`].
pub fn init_logging(own_log: Option<&Path>) -> Result<(), crate::logs::LogsError> {
    if let Some(path) = own_log {
        crate::logs::own_log().open(path)?;
    }
    subscriber(own_log.is_none() && std::io::stderr().is_terminal());
    Ok(())
}

/// The tracing subscriber, writing to [`crate::logs::own_log`].
fn subscriber(ansi: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::logs::own_log().writer())
        .with_ansi(ansi)
        .try_init();
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(70))
}

pub fn main() -> ExitCode {
    // First, before any thread or fd: an image exec'd by an in-place
    // upgrade takes what the previous one handed over (as LISTEN_FDS below).
    if let Some(incoming) = Incoming::from_env() {
        return code(upgraded(incoming, Invocation::current()));
    }
    let invocation = Invocation::current();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    ExitCode::SUCCESS
                }
                _ => code(exitcode::USAGE),
            };
        }
    };
    use crate::control::Command as C;
    match cli.command {
        Command::Status {
            ready,
            live,
            control: a,
        } => {
            let what = match (ready, live) {
                (true, _) => C::Ready,
                (_, true) => C::Live,
                _ => C::Status,
            };
            control(&a, what)
        }
        Command::Restart {
            wait,
            slot,
            control: a,
        } => control(&a, C::Restart { wait, slot }),
        Command::Man { page, dir } => man(&page, dir.as_deref()),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "holdfast",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::ReopenLogs(args) => control(&args, C::ReopenLogs),
        Command::Scale {
            workers,
            control: a,
        } => {
            if workers == 0 {
                eprintln!("holdfast: scale: workers must be at least 1");
                return code(exitcode::USAGE);
            }
            control(&a, C::Scale { workers })
        }
        Command::Stop { wait, control: a } => control(&a, C::Stop { wait }),
        Command::Upgrade {
            wait,
            binary,
            control: a,
        } => {
            // holdfast runs elsewhere: a relative path means ours.
            let binary = match binary.map(std::path::absolute).transpose() {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("holdfast: upgrade: --binary: {e}");
                    return code(exitcode::USAGE);
                }
            };
            control(&a, C::Upgrade { wait, binary })
        }
        Command::Version { json } => {
            if json {
                println!("{}", crate::edge::version_json());
            } else {
                println!("holdfast {}", env!("CARGO_PKG_VERSION"));
            }
            ExitCode::SUCCESS
        }
        Command::Check { config } => match Config::load(Some(&config), &Overrides::default())
            .map_err(|e| e.to_string())
            .and_then(|c| {
                // `run` refuses a command it cannot find; so does `check`.
                crate::os::spawn::resolve_program(&c.app).map_err(|e| e.to_string())?;
                Ok(c)
            }) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} worker(s) of {:?})",
                    config.display(),
                    c.listen.len(),
                    c.app.workers,
                    c.app.command.0
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("holdfast: {e}");
                code(exitcode::CONFIG)
            }
        },
        Command::Run(args) => {
            let overrides = Overrides {
                listen: args.listen,
                workers: args.workers,
                command: args.command,
            };
            match Config::load(args.config.as_deref(), &overrides) {
                Ok(config) => match init_logging(config.logs.holdfast_log.as_deref()) {
                    Ok(()) => code(run_as(config, overrides, invocation)),
                    Err(e) => {
                        eprintln!("holdfast: {e}");
                        code(exitcode::CANTCREAT)
                    }
                },
                Err(e) => {
                    eprintln!("holdfast: {e}");
                    code(exitcode::CONFIG)
                }
            }
        }
        Command::Demo { port } => {
            let _ = init_logging(None);
            code(demo(port, invocation))
        }
    }
}

/// `holdfast man`: one page to stdout, or every page into `dir`.
fn man(page: &str, dir: Option<&Path>) -> ExitCode {
    use clap::CommandFactory;
    let pages = crate::man::pages(Cli::command());
    if let Some(dir) = dir {
        for (file, text) in &pages {
            let path = dir.join(file);
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("holdfast: man: {}: {e}", path.display());
                return code(exitcode::CANTCREAT);
            }
        }
        return ExitCode::SUCCESS;
    }
    match pages
        .iter()
        .find(|(file, _)| file.rsplit_once('.').map(|(n, _)| n) == Some(page))
    {
        Some((_, text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        None => {
            let names: Vec<&str> = pages
                .iter()
                .filter_map(|(f, _)| f.rsplit_once('.').map(|(n, _)| n))
                .collect();
            eprintln!(
                "holdfast: man: no page {page:?}; pages: {}",
                names.join(", ")
            );
            code(exitcode::USAGE)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("holdfast: tokio runtime: {e}");
            exitcode::OSERR
        })
}

/// An image exec'd by an in-place upgrade: adopt what the previous one
/// handed over and run on; if that cannot be done, fall back (see
/// `edge::adopt`). The runtime is current-thread: the main thread that
/// forks the workers is the one that may exec the next upgrade.
fn upgraded(incoming: Incoming, invocation: Invocation) -> i32 {
    let incoming = match incoming.unreadable() {
        Ok(i) => i,
        Err(fb) => return fall_back(fb, invocation, None),
    };
    let own = incoming.own_log();
    let ansi = own.is_none() && std::io::stderr().is_terminal();
    if let Some((path, file)) = own {
        crate::logs::own_log().adopt(&path, file);
    }
    subscriber(ansi);
    crate::logs::own_log().start_writer();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let adopted = rt.block_on(async { Runtime::adopt(incoming) });
    let code = match adopted {
        Ok(r) => rt.block_on(r.run()),
        Err(fb) => fall_back(fb, invocation, Some(rt)),
    };
    crate::logs::own_log().flush(std::time::Duration::from_secs(5));
    code
}

/// The state could not be adopted: start from the command line the
/// previous image ran with (the exec kept it), keeping the sockets and
/// workers it handed over. `rt`: logging and the runtime are set up already.
fn fall_back(fb: Fallback, invocation: Invocation, rt: Option<tokio::runtime::Runtime>) -> i32 {
    let args = match Cli::try_parse_from(&invocation.argv).map(|c| c.command) {
        Ok(Command::Run(args)) => args,
        _ => {
            eprintln!(
                "holdfast: the upgrade's new image could not adopt the state ({}) and its command line {:?} is not `holdfast run`: cannot fall back; exiting",
                fb.error(),
                invocation.argv
            );
            return exitcode::SOFTWARE;
        }
    };
    let overrides = Overrides {
        listen: args.listen,
        workers: args.workers,
        command: args.command,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "holdfast: the upgrade's new image could not adopt the state ({}), and its config cannot be loaded for a fresh start: {e}",
                fb.error()
            );
            return exitcode::CONFIG;
        }
    };
    let rt = match rt {
        Some(rt) => rt,
        None => {
            if let Err(e) = init_logging(config.logs.holdfast_log.as_deref()) {
                eprintln!("holdfast: {e}");
            }
            crate::logs::own_log().start_writer();
            match runtime() {
                Ok(rt) => rt,
                Err(c) => return c,
            }
        }
    };
    let code = rt.block_on(async move {
        match Runtime::fallback(config, overrides, fb, invocation) {
            Ok(r) => r.run().await,
            Err(e) => {
                eprintln!("holdfast: {e}");
                e.exit_code()
            }
        }
    });
    crate::logs::own_log().flush(std::time::Duration::from_secs(5));
    code
}

/// Runs holdfast with `config` until it is stopped; returns the exit code.
pub fn run(config: Config, overrides: Overrides) -> i32 {
    run_as(config, overrides, Invocation::current())
}

/// [`run`], started as `invocation` (read at the very start of `main`).
fn run_as(config: Config, overrides: Overrides, invocation: Invocation) -> i32 {
    // First, before any thread or fd of holdfast's own exists: the sockets
    // systemd passed, with LISTEN_* taken out of the environment.
    let inherited = match crate::systemd::Inherited::from_env() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("holdfast: {e}");
            return exitcode::CONFIG;
        }
    };
    // The first thread of holdfast's own, now that the environment is settled.
    crate::logs::own_log().start_writer();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(c) => return c,
    };
    let code = rt.block_on(async move {
        match Runtime::with_inherited(config, overrides, inherited, invocation) {
            Ok(runtime) => runtime.run().await,
            Err(e) => {
                // One report: stderr is the journal under systemd.
                eprintln!("holdfast: {e}");
                e.exit_code()
            }
        }
    });
    crate::logs::own_log().flush(std::time::Duration::from_secs(5));
    code
}

/// The demo's app: the `holdfast-test-worker` binary next to this one.
/// Under `cargo run` (which builds only the binary it runs) it is built
/// first, with the same profile.
fn demo_worker(exe: &Path) -> Result<PathBuf, String> {
    let worker = exe.with_file_name("holdfast-test-worker");
    if worker.is_file() {
        return Ok(worker);
    }
    let (Some(cargo), Some(manifest)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) else {
        return Err(format!(
            "the demo runs {}, which is not there; build it with `cargo build --release --bins`",
            worker.display()
        ));
    };
    let release = exe.parent().and_then(Path::file_name) == Some(std::ffi::OsStr::new("release"));
    eprintln!("holdfast demo: building the demo app (holdfast-test-worker) first...");
    let mut build = std::process::Command::new(cargo);
    build
        .arg("build")
        .args(release.then_some("--release"))
        .args(["--bin", "holdfast-test-worker", "--manifest-path"])
        .arg(Path::new(&manifest).join("Cargo.toml"));
    match build.status() {
        Ok(s) if s.success() && worker.is_file() => Ok(worker),
        Ok(s) => Err(format!("building holdfast-test-worker failed ({s})")),
        Err(e) => Err(format!("running cargo to build holdfast-test-worker: {e}")),
    }
}

fn demo(port: u16, invocation: Invocation) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("holdfast demo: cannot find my own executable: {e}");
            return exitcode::OSERR;
        }
    };
    let worker = match demo_worker(&exe) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("holdfast demo: {e}");
            return exitcode::UNAVAILABLE;
        }
    };
    let dir = match tempfile::Builder::new().prefix("holdfast-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("holdfast demo: temp dir: {e}");
            return exitcode::CANTCREAT;
        }
    };
    let config_path = dir.path().join("holdfast.toml");
    let text = format!(
        r#"# holdfast demo: two test workers behind 127.0.0.1:{port}
control_socket = "holdfast.sock"

[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = [{worker:?}, "--sleep-ms", "20"]
workers = 2
ready = "notify"
drain_timeout = "10s"
"#
    );
    if let Err(e) = std::fs::write(&config_path, text) {
        eprintln!("holdfast demo: {}: {e}", config_path.display());
        return exitcode::CANTCREAT;
    }
    let pid = std::process::id();
    println!(
        r#"
holdfast demo (pid {pid}): 2 test workers behind http://127.0.0.1:{port}/  config: {config}

Try, in another terminal:
  curl http://127.0.0.1:{port}/                      # the worker's pid, slot and generation
  while curl -fsS http://127.0.0.1:{port}/?sleep=50; do :; done    # load to keep on while you restart
  {exe} status --control {sock}          # workers, accept queue, counters
  {exe} restart --wait --control {sock}  # rolling restart: new pids, no request lost
  {exe} scale 4 --control {sock}         # more workers (or kill -TTIN {pid} / -TTOU)
  kill -HUP {pid}                                    # the same rolling restart, by signal
  kill -TERM {pid}  (or Ctrl-C here)                 # graceful stop
"#,
        config = config_path.display(),
        exe = exe.display(),
        sock = dir.path().join("holdfast.sock").display(),
    );
    match Config::load(Some(&config_path), &Overrides::default()) {
        Ok(config) => run_as(config, Overrides::default(), invocation),
        Err(e) => {
            eprintln!("holdfast demo: {e}");
            exitcode::SOFTWARE
        }
    }
}
