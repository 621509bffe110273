//! nginx and Apache as private instances: their own config files, logs, pid
//! file and temp dirs inside a test's directory, listening on a loopback
//! port of the test's; never the system service.
//!
//! [`Proxy`] starts one in a process group of its own, waits until it
//! answers, and its `Drop` stops it (SIGTERM, then SIGKILL to the group) and
//! prints its logs if the test failed. The config texts are the test's:
//! these helpers only wrap them in a minimal main config.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::{http_get, pid_alive, wait_until, Target};

/// The absolute path of `cmd` on PATH or in the sbin directories (nginx and
/// apache2 live in /usr/sbin, which a non-login PATH may lack). Panics naming
/// the Debian package when it is missing: a missing program fails the test.
pub fn require(cmd: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(cmd))
        .find(|p| {
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| {
            panic!(
                "`{cmd}` is not installed (not in PATH or /usr/sbin): run `apt-get install {package}` \
                 as root, or tests/run, which installs it. These tests never skip a program."
            )
        })
}

/// `base/NAME`, created, with `base` opened for traversal (0711) so a
/// proxy's unprivileged workers (www-data, nobody) can reach sockets in it.
pub fn proxy_dir(base: &Path, name: &str) -> PathBuf {
    fs::set_permissions(base, fs::Permissions::from_mode(0o711)).expect("chmod the temp dir 0711");
    let dir = base.join(name);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod the proxy dir");
    dir
}

/// A running nginx or Apache.
pub struct Proxy {
    pub name: &'static str,
    child: Child,
    /// The proxy's own directory (configs, logs, pid file, temp files).
    pub dir: PathBuf,
    /// Its listening port on 127.0.0.1.
    pub port: u16,
}

impl Proxy {
    /// nginx with `http_body` inside `http { }`, after temp paths of its own
    /// and `access_log off` (a `log_format`/`access_log` in the body wins).
    /// `{pdir}` in the body is the proxy's directory. 2 worker processes.
    pub fn nginx(dir: &Path, port: u16, http_body: &str) -> Proxy {
        let bin = require("nginx", "nginx");
        let main = format!(
            r#"
worker_processes 2;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {{pdir}}/body;
    proxy_temp_path {{pdir}}/proxy;
    fastcgi_temp_path {{pdir}}/fastcgi;
    uwsgi_temp_path {{pdir}}/uwsgi;
    scgi_temp_path {{pdir}}/scgi;
{http_body}
}}
"#
        );
        let conf = dir.join("nginx.conf");
        fs::write(&conf, fill(&main, dir, port)).expect("write nginx.conf");
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .arg("-g")
            .arg(format!(
                "daemon off; pid {};",
                dir.join("nginx.pid").display()
            ));
        Proxy::spawn("nginx", cmd, dir, port)
    }

    /// Apache (mpm_event unless `body` loads another MPM) with `modules`
    /// (names as in `mod_NAME.so`, beside mpm and authz_core) and `body` after
    /// a main config of its own: ServerRoot, pid file and `error.log` in its
    /// directory, `Listen 127.0.0.1:{port}`, LogLevel warn (the body may
    /// override it). `{pdir}` and `{port}` in the body are filled in.
    pub fn apache(dir: &Path, port: u16, modules: &[&str], body: &str) -> Proxy {
        let bin = require("apache2", "apache2");
        let lib = "/usr/lib/apache2/modules";
        // Apache refuses to serve as root; its children run as www-data.
        let user = if nix::unistd::geteuid().is_root() {
            "User www-data\nGroup www-data\n"
        } else {
            ""
        };
        let mut loads = String::new();
        if !body.contains("mpm_") {
            loads.push_str(&format!(
                "LoadModule mpm_event_module {lib}/mod_mpm_event.so\n"
            ));
        }
        for m in std::iter::once(&"authz_core").chain(modules) {
            loads.push_str(&format!("LoadModule {m}_module {lib}/mod_{m}.so\n"));
        }
        let main = format!(
            r#"
ServerRoot "{{pdir}}"
ServerName 127.0.0.1
DefaultRuntimeDir "{{pdir}}"
PidFile "{{pdir}}/apache.pid"
ErrorLog "{{pdir}}/error.log"
LogLevel warn
{user}Listen 127.0.0.1:{{port}}
{loads}
{body}
"#
        );
        let conf = dir.join("apache.conf");
        fs::write(&conf, fill(&main, dir, port)).expect("write apache.conf");
        let mut cmd = Command::new(bin);
        cmd.arg("-f").arg(&conf).arg("-DFOREGROUND");
        Proxy::spawn("apache", cmd, dir, port)
    }

    /// Spawns `cmd` (output to `dir/output.log`) in its own process group.
    fn spawn(name: &'static str, mut cmd: Command, dir: &Path, port: u16) -> Proxy {
        let out = File::create(dir.join("output.log")).expect("create proxy output log");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .current_dir(dir)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proxy {
            name,
            child,
            dir: dir.to_path_buf(),
            port,
        }
    }

    /// Waits up to `deadline` until `GET path` through the proxy answers 200.
    pub fn wait_serving(&self, path: &str, deadline: Duration) {
        let target = self.target();
        wait_until(
            deadline,
            &format!("{} on {target} to answer 200", self.name),
            || {
                assert!(
                    pid_alive(self.child.id()),
                    "{} exited at start ({}):\n{}",
                    self.name,
                    zombie_status(self.child.id()),
                    self.logs()
                );
                http_get(&target, path).ok().filter(|r| r.status == 200)
            },
        );
    }

    pub fn target(&self) -> Target {
        Target::local(self.port)
    }

    /// The pid of the master process (group leader).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the master process.
    pub fn signal(&self, sig: Signal) {
        kill(pid_of(self.child.id()), sig)
            .unwrap_or_else(|e| panic!("kill {} {sig:?}: {e}", self.name));
    }

    /// The proxy's error log (`{dir}/error.log`).
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Lines of the error log containing `needle`.
    pub fn error_lines(&self, needle: &str) -> Vec<String> {
        self.error_log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Every *.log in the proxy's directory.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        paths.sort();
        for p in paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            let text = fs::read_to_string(p).unwrap_or_default();
            // The tail: an access log can be long.
            let tail: Vec<&str> = text.lines().rev().take(200).collect();
            out.push_str(&format!(
                "--- {} (last {} lines)\n",
                p.display(),
                tail.len()
            ));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// How an unreaped child ended, from the `exit_code` field of
/// /proc/PID/stat (proc(5)): "exit status N" or "killed by signal N".
fn zombie_status(pid: u32) -> String {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let code = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().last())
        .and_then(|v| v.parse::<i32>().ok());
    match code {
        Some(c) if c & 0x7f != 0 => format!("killed by signal {}", c & 0x7f),
        Some(c) => format!("exit status {}", (c >> 8) & 0xff),
        None => "status unknown".to_string(),
    }
}

fn fill(text: &str, dir: &Path, port: u16) -> String {
    text.replace("{pdir}", &dir.to_string_lossy())
        .replace("{port}", &port.to_string())
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"))
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let pid = pid_of(self.child.id());
        // Not reaped yet, so the pid and its group id are still ours.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(self.child.id()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Workers the master left behind are in its group.
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== {} logs:\n{}", self.name, self.logs());
        }
    }
}
