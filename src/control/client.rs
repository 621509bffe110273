//! The client: the `status`, `restart`, `reopen-logs`, `scale` and `stop`
//! subcommands, and their exit codes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Command, ErrorKind, Request, Response, VERSION};

/// Why the client could not get a response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("holdfast is not running: no control socket at {} ({source})", .path.display())]
    NotRunning { path: PathBuf, source: io::Error },
    #[error("permission denied: cannot connect to the control socket {} ({source}); run as holdfast's user or root", .path.display())]
    Permission { path: PathBuf, source: io::Error },
    #[error("control socket {}: {what}: {source}", .path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("control socket {}: {message}", .path.display())]
    Protocol { path: PathBuf, message: String },
}

/// A connected client.
pub struct Client {
    path: PathBuf,
    reader: BufReader<std::os::unix::net::UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
            let path = path.to_path_buf();
            match source.raw_os_error() {
                Some(libc::EACCES | libc::EPERM) => ClientError::Permission { path, source },
                Some(libc::ENOENT | libc::ECONNREFUSED | libc::ENOTDIR) => {
                    ClientError::NotRunning { path, source }
                }
                _ => ClientError::Io {
                    path,
                    what: "connect",
                    source,
                },
            }
        })?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
        })
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> ClientError + '_ {
        move |source| ClientError::Io {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Sends `command` and waits up to `timeout` (forever when `None`) for the response.
    pub fn request(
        &mut self,
        command: Command,
        timeout: Option<Duration>,
    ) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(&Request {
            v: VERSION,
            command,
        })
        .map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        let stream = self.reader.get_mut();
        stream
            .set_read_timeout(timeout)
            .map_err(self.io("set timeout"))?;
        // A refused peer gets its error line and a close before it writes:
        // the send fails, and the reason is in the line still to be read.
        let sent = self.reader.get_mut().write_all(&line);
        let mut reply = Vec::new();
        let read = (&mut self.reader)
            .take(256 * 1024 * 1024)
            .read_until(b'\n', &mut reply);
        let n = match (sent, read) {
            (_, Ok(n)) if n > 0 => n,
            (Err(e), _) => return Err(self.io("send")(e)),
            (Ok(()), r) => r.map_err(self.io("read the response"))?,
        };
        if n == 0 {
            return Err(ClientError::Protocol {
                path: self.path.clone(),
                message: "holdfast closed the connection without answering".into(),
            });
        }
        serde_json::from_slice(&reply).map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            message: format!(
                "not a response: {e}: {}",
                String::from_utf8_lossy(&reply).trim_end()
            ),
        })
    }

    /// Blocks until holdfast closes the connection (at its exit), at most `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(ClientError::Protocol {
                    path: self.path.clone(),
                    message: format!(
                        "holdfast still running {}s after it stopped its workers",
                        timeout.as_secs()
                    ),
                });
            }
            self.reader
                .get_mut()
                .set_read_timeout(Some(left))
                .map_err(self.io("set timeout"))?;
            match self.reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                // A reset is a close too.
                Err(_) => return Ok(()),
            }
        }
    }
}

/// CLI exit codes (sysexits.h where one fits).
pub mod exit {
    pub const OK: i32 = 0;
    /// The request reached holdfast and failed (e.g. the rollout failed).
    pub const FAILED: i32 = 1;
    /// holdfast is not running (socket missing or refusing).
    pub const NOT_RUNNING: i32 = exitcode::UNAVAILABLE;
    pub const PERMISSION: i32 = exitcode::NOPERM;
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    let pid = i32::try_from(pid).unwrap_or(i32::MAX);
    crate::os::proc::stat(pid).map_or(true, |s| s.is_exited())
}

/// Runs one CLI command against the socket at `path`; prints the result and
/// returns the exit code.
pub fn run_client(path: &Path, command: Command, json: bool) -> i32 {
    let waits = matches!(
        command,
        Command::Restart { wait: true, .. }
            | Command::Restart { slot: Some(_), .. }
            | Command::Stop { wait: true }
            | Command::Upgrade { wait: true, .. }
    );
    let stop_wait = matches!(command, Command::Stop { wait: true });
    let is_status = matches!(command, Command::Status);
    let fail = |e: ClientError| {
        let code = match &e {
            ClientError::NotRunning { .. } => exit::NOT_RUNNING,
            ClientError::Permission { .. } => exit::PERMISSION,
            _ => exit::FAILED,
        };
        eprintln!("holdfast: {e}");
        code
    };
    let mut client = match Client::connect(path) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let timeout = (!waits).then_some(Duration::from_secs(60));
    let response = match client.request(command, timeout) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if json {
        let out = if is_status && response.ok {
            serde_json::to_string_pretty(&response.status)
        } else {
            serde_json::to_string(&response)
        };
        match out {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("holdfast: cannot print the response: {e}");
                return exit::FAILED;
            }
        }
    }
    if !response.ok {
        let code = match response.kind {
            Some(ErrorKind::Permission) => exit::PERMISSION,
            _ => exit::FAILED,
        };
        eprintln!(
            "holdfast: {}",
            response.error.as_deref().unwrap_or("request failed")
        );
        return code;
    }
    if stop_wait {
        if let Err(e) = client.wait_closed(Duration::from_secs(60)) {
            return fail(e);
        }
        if let Some(pid) = response.pid {
            let start = Instant::now();
            while !exited(pid) && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if !json {
        match (&response.status, &response.message) {
            (Some(s), _) => print!("{}", crate::status::render(s)),
            (None, Some(m)) => println!("{m}"),
            (None, None) => {}
        }
        if stop_wait {
            println!("holdfast exited");
        }
    }
    exit::OK
}
