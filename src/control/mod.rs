//! The control socket: a unix stream socket speaking JSON lines, its server
//! (inside `holdfast run`) and its client (the `status`, `restart`,
//! `reopen-logs`, `scale` and `stop` subcommands).
//!
//! # Protocol (version 1)
//! One request per line, one response line per request, several requests per
//! connection allowed:
//! ```text
//! → {"v":1,"cmd":"status"}
//! ← {"v":1,"ok":true,"status":{...}}
//! → {"v":1,"cmd":"restart","wait":true}
//! ← {"v":1,"ok":false,"kind":"failed","error":"rollout of generation 2 failed: ..."}
//! ```
//! Commands: `status`, `restart` (`wait`), `reopen-logs`, `scale`
//! (`workers`), `stop` (`wait`). Error kinds: `bad_request`, `permission`,
//! `failed`, `busy`, `unavailable`.
//!
//! # Why it cannot hurt holdfast
//! The server never touches supervisor state: every request becomes an
//! [`Call`] for the one event loop, which answers over a oneshot. Each
//! connection is its own task with a bounded line (64 KiB), a read deadline
//! (5 s) and a write deadline; at most [`MAX_CLIENTS`] are served at once,
//! the rest get a `busy` line. The loop only builds the cheap half of a
//! status snapshot; the /proc half runs on a blocking thread
//! ([`crate::status::enrich`]). Peers are checked with `SO_PEERCRED`: only
//! holdfast's own uid and root may talk to it, on top of the socket's 0600.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, info, warn};

use crate::status::Snapshot;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Longest request line accepted, newline included.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send a complete request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing one response may take.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more get a `busy` error and are closed.
pub const MAX_CLIENTS: usize = 256;

/// A reply the event loop sends once: the outcome's message, or why it failed.
pub type Reply = oneshot::Sender<Result<String, String>>;

/// What the control socket and `/metrics` ask of the event loop. This module
/// defines it and the edge consumes it, so control never imports the edge:
/// the loop receives calls on the [`Calls`] channel it hands to
/// [`Server::start`] and answers over the oneshots.
#[derive(Debug)]
pub enum Call {
    /// The cheap half of a status snapshot (see [`crate::status`]).
    Status { reply: oneshot::Sender<Snapshot> },
    /// Re-read the config and roll every worker (as SIGHUP). `reply`: when
    /// the rollout ends; `started`: when it has started (or was refused).
    Reload {
        reply: Option<Reply>,
        started: Option<Reply>,
    },
    /// Reopen every log file by path (as SIGUSR1); the reply comes once all
    /// are reopened, or names each that failed.
    ReopenLogs { reply: Reply },
    /// Run `workers` workers from now on.
    Scale { workers: u32, reply: Reply },
    /// Graceful stop (as SIGTERM); the reply comes when every worker exited.
    Stop { reply: Reply },
}

/// The event loop's end of [`Call`]s.
pub type Calls = mpsc::UnboundedSender<Call>;

/// One request, as sent on the wire (`{"v":1,"cmd":"...",...}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    Status,
    /// Re-read the config and roll every worker (SIGHUP); `wait`: answer when the rollout ends.
    Restart {
        #[serde(default)]
        wait: bool,
    },
    /// Reopen the log files (SIGUSR1); answers when they are reopened.
    ReopenLogs,
    Scale {
        workers: u32,
    },
    /// Graceful stop; `wait`: answer when every worker has exited, then
    /// close the connection when holdfast exits.
    Stop {
        #[serde(default)]
        wait: bool,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON, unknown command, wrong version, too long, too slow.
    BadRequest,
    /// The peer's uid is neither holdfast's nor root's.
    Permission,
    /// holdfast refused or could not do it (rollout failed, config invalid...).
    Failed,
    /// Too many control connections at once.
    Busy,
    /// holdfast is exiting and its loop no longer answers.
    Unavailable,
}

/// One response line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<Snapshot>>,
    /// holdfast's pid, on `stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            v: VERSION,
            ok: true,
            message: Some(message.into()),
            kind: None,
            error: None,
            status: None,
            pid: None,
        }
    }
    pub fn err(kind: ErrorKind, error: impl Into<String>) -> Response {
        Response {
            v: VERSION,
            ok: false,
            message: None,
            kind: Some(kind),
            error: Some(error.into()),
            status: None,
            pid: None,
        }
    }
    fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(
                r#"{{"v":1,"ok":false,"kind":"failed","error":"cannot encode the response: {e}"}}"#
            )
            .into_bytes()
        });
        v.push(b'\n');
        v
    }
}

/// Parses one request line; the error is the response to send.
pub fn parse_request(line: &[u8]) -> Result<Command, Response> {
    let bad = |m: String| Response::err(ErrorKind::BadRequest, m);
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        bad(format!(
            "not a JSON request line ({e}); send e.g. {{\"v\":1,\"cmd\":\"status\"}}"
        ))
    })?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(bad(format!(
                "unsupported protocol version {v}; this holdfast speaks {VERSION}"
            )))
        }
        None => return Err(bad(format!("missing \"v\": {VERSION}"))),
    }
    serde_json::from_value::<Request>(value)
        .map(|r| r.command)
        .map_err(|e| {
            bad(format!(
                "bad request: {e} (commands: status, restart, reopen-logs, scale, stop)"
            ))
        })
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: {reason}", .path.display())]
    Bind { path: PathBuf, reason: String },
    #[error("control socket {}: another holdfast is running with it (it accepts connections)", .path.display())]
    InUse { path: PathBuf },
}

/// The bound control socket, before the server runs. Dropping it removes the
/// path (only while the path is still this socket).
#[derive(Debug)]
pub struct ControlSocket {
    listener: std::os::unix::net::UnixListener,
    guard: PathGuard,
}

#[derive(Debug)]
struct PathGuard {
    path: PathBuf,
    inode: u64,
}

impl Drop for PathGuard {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ControlSocket {
    /// Binds `path` with mode 0600 (set on the socket before `bind`, so there
    /// is no window with the umask's mode). A socket file nobody accepts on
    /// is stale and replaced; one that accepts means another holdfast.
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| ControlError::Bind {
            path: path.to_path_buf(),
            reason: format!("{what}: {e}"),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| fail(&format!("create directory {}", dir.display()), &e))?;
            }
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(fail("exists and is not a socket", &"not removing it"));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                });
            }
            info!(path = %path.display(), "removing stale control socket (nothing listens on it)");
            std::fs::remove_file(path).map_err(|e| fail("remove stale socket", &e))?;
        }
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .map_err(|e| fail("socket", &e))?;
        nix::sys::stat::fchmod(s.as_fd(), nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| fail("fchmod", &e))?;
        let addr = socket2::SockAddr::unix(path).map_err(|e| fail("address", &e))?;
        s.bind(&addr).map_err(|e| fail("bind", &e))?;
        let inode = std::fs::metadata(path).map_err(|e| fail("stat", &e))?.ino();
        let guard = PathGuard {
            path: path.to_path_buf(),
            inode,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail("chmod 0600", &e))?;
        s.listen(128).map_err(|e| fail("listen", &e))?;
        s.set_nonblocking(true)
            .map_err(|e| fail("O_NONBLOCK", &e))?;
        Ok(ControlSocket {
            listener: s.into(),
            guard,
        })
    }

    pub fn path(&self) -> &Path {
        &self.guard.path
    }
}

/// What connection tasks share.
struct Shared {
    tx: Calls,
    /// `ListenOverflows`, `ListenDrops` when holdfast started.
    baseline: Option<(u64, u64)>,
    uid: u32,
    slots: Arc<Semaphore>,
    busy: Arc<Busy>,
}

/// Requests being answered; [`Server::finish`] waits until there are none.
#[derive(Default)]
struct Busy {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

struct BusyToken(Arc<Busy>);

impl Busy {
    fn enter(self: &Arc<Self>) -> BusyToken {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        BusyToken(self.clone())
    }
}

impl Drop for BusyToken {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_one();
        }
    }
}

/// The running server; [`Server::finish`] it when the loop has ended.
pub struct Server {
    accept: tokio::task::JoinHandle<()>,
    guard: PathGuard,
    busy: Arc<Busy>,
}

impl Server {
    /// Starts accepting on `socket`; requests go to the loop through `tx`.
    pub fn start(
        socket: ControlSocket,
        tx: Calls,
        baseline: Option<(u64, u64)>,
    ) -> io::Result<Server> {
        let ControlSocket { listener, guard } = socket;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let busy = Arc::new(Busy::default());
        let shared = Arc::new(Shared {
            tx,
            baseline,
            uid: nix::unistd::geteuid().as_raw(),
            slots: Arc::new(Semaphore::new(MAX_CLIENTS)),
            busy: busy.clone(),
        });
        info!(path = %guard.path.display(), "control socket listening");
        let accept = tokio::spawn(accept_loop(listener, shared));
        Ok(Server {
            accept,
            guard,
            busy,
        })
    }

    /// After the loop ended: stop accepting, remove the socket path, and give
    /// replies already decided (e.g. `stop --wait`'s) up to 2 s to be written.
    pub async fn finish(self) {
        drop(self.guard);
        self.accept.abort();
        let _ = self.accept.await;
        let busy = self.busy;
        let drained = async {
            while busy.count.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                busy.idle.notified().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
    }
}

async fn accept_loop(listener: tokio::net::UnixListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            let line = Response::err(
                ErrorKind::Busy,
                format!("busy: {MAX_CLIENTS} control connections are open; try again"),
            )
            .line();
            let _ = stream.try_write(&line);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve(stream, &shared).await;
            drop(permit);
        });
    }
}

/// What happens to a connection after a response is written.
enum After {
    Next,
    Close,
    /// Keep it open until holdfast exits (`stop --wait`): the client sees EOF then.
    HoldUntilExit,
}

async fn serve(stream: tokio::net::UnixStream, shared: &Shared) {
    let (rd, mut wr) = stream.into_split();
    if let Err(response) = check_peer(&rd, shared.uid) {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&response.line())).await;
        return;
    }
    let mut rd = tokio::io::BufReader::new(rd);
    let mut served = 0u64;
    loop {
        let mut line = Vec::new();
        let limit = (MAX_REQUEST + 1) as u64;
        let read = tokio::time::timeout(
            READ_TIMEOUT,
            (&mut rd).take(limit).read_until(b'\n', &mut line),
        )
        .await;
        let error = match read {
            Ok(Ok(0)) => return,
            Ok(Ok(_)) if line.len() > MAX_REQUEST => Some(format!(
                "request line longer than {MAX_REQUEST} bytes; closing"
            )),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                debug!(error = %e, "control connection read failed");
                return;
            }
            Err(_) if line.is_empty() && served > 0 => return,
            Err(_) => Some(format!(
                "no complete request line within {}s; closing",
                READ_TIMEOUT.as_secs()
            )),
        };
        if let Some(e) = error {
            let r = Response::err(ErrorKind::BadRequest, e);
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&r.line())).await;
            return;
        }
        served += 1;
        let token = shared.busy.enter();
        let (response, after) = match parse_request(&line) {
            Ok(cmd) => handle(cmd, shared).await,
            Err(r) => (r, After::Next),
        };
        let written = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&response.line())).await;
        drop(token);
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        match after {
            After::Next => {}
            After::Close => return,
            After::HoldUntilExit => {
                // Dropped with the runtime, just before the process exits.
                std::future::pending::<()>().await;
            }
        }
    }
}

fn check_peer(rd: &tokio::net::unix::OwnedReadHalf, uid: u32) -> Result<(), Response> {
    let cred = rd.as_ref().peer_cred().map_err(|e| {
        Response::err(
            ErrorKind::Permission,
            format!("permission denied: cannot read the peer's credentials: {e}"),
        )
    })?;
    if cred.uid() == uid || cred.uid() == 0 {
        return Ok(());
    }
    warn!(peer_uid = cred.uid(), peer_pid = ?cred.pid(), "control connection refused: uid is neither holdfast's nor root");
    Err(Response::err(
        ErrorKind::Permission,
        format!(
            "permission denied: uid {} may not control holdfast (only uid {uid} and root may)",
            cred.uid()
        ),
    ))
}

fn gone() -> Response {
    Response::err(
        ErrorKind::Unavailable,
        "holdfast is exiting; its event loop no longer answers",
    )
}

type StatusResult = Result<Snapshot, Response>;

/// Status requests waiting for the next walk of /proc.
static WAITING: std::sync::Mutex<Vec<oneshot::Sender<StatusResult>>> =
    std::sync::Mutex::new(Vec::new());
/// One walk at a time.
static WALK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A status snapshot no older than this call: the loop's half is taken after
/// the call began, then enriched from /proc on a blocking thread.
///
/// Concurrent callers share one walk: whoever holds [`WALK`] takes every
/// caller waiting so far, asks the loop (so the snapshot is newer than all of
/// them), walks /proc once and answers them all. 200 clients at once cost a
/// few walks, not 200.
pub async fn fetch_status(tx: &Calls, baseline: Option<(u64, u64)>) -> StatusResult {
    let (me, rx) = oneshot::channel();
    WAITING.lock().unwrap_or_else(|e| e.into_inner()).push(me);
    {
        let _walk = WALK.lock().await;
        let batch = std::mem::take(&mut *WAITING.lock().unwrap_or_else(|e| e.into_inner()));
        if !batch.is_empty() {
            let result = walk(tx, baseline).await;
            for w in batch {
                let _ = w.send(result.clone());
            }
        }
    }
    rx.await.unwrap_or_else(|_| Err(gone()))
}

async fn walk(tx: &Calls, baseline: Option<(u64, u64)>) -> StatusResult {
    let mut snap = loop_status(tx).await?;
    tokio::task::spawn_blocking(move || {
        crate::status::enrich(&mut snap, baseline);
        snap
    })
    .await
    .map_err(|e| Response::err(ErrorKind::Failed, format!("status: {e}")))
}

async fn loop_status(tx: &Calls) -> Result<Snapshot, Response> {
    let (reply, rx) = oneshot::channel();
    tx.send(Call::Status { reply }).map_err(|_| gone())?;
    match tokio::time::timeout(crate::status::LOOP_TIMEOUT, rx).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(_)) => Err(gone()),
        Err(_) => Err(Response::err(
            ErrorKind::Unavailable,
            format!(
                "holdfast's event loop did not answer within {}s",
                crate::status::LOOP_TIMEOUT.as_secs()
            ),
        )),
    }
}

fn outcome(r: Result<Result<String, String>, oneshot::error::RecvError>) -> Response {
    match r {
        Ok(Ok(m)) => Response::ok(m),
        Ok(Err(e)) => Response::err(ErrorKind::Failed, e),
        Err(_) => gone(),
    }
}

/// For requests without `wait`: the loop handles inputs in order, so once it
/// answered a status request sent after `rx`'s request, the request was
/// taken (or already refused).
async fn accepted(
    tx: &Calls,
    mut rx: oneshot::Receiver<Result<String, String>>,
    started: impl FnOnce(&Snapshot) -> String,
) -> Response {
    let snap = match loop_status(tx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match rx.try_recv() {
        Ok(Ok(m)) => Response::ok(m),
        Ok(Err(e)) => Response::err(ErrorKind::Failed, e),
        Err(oneshot::error::TryRecvError::Empty) => Response::ok(started(&snap)),
        Err(oneshot::error::TryRecvError::Closed) => gone(),
    }
}

async fn handle(cmd: Command, shared: &Shared) -> (Response, After) {
    let tx = &shared.tx;
    debug!(?cmd, "control request");
    match cmd {
        Command::Status => match fetch_status(tx, shared.baseline).await {
            Ok(s) => {
                let mut r = Response::ok("status");
                r.message = None;
                r.status = Some(Box::new(s));
                (r, After::Next)
            }
            Err(r) => (r, After::Next),
        },
        Command::Restart { wait } => {
            // --wait: answered when the rollout ends; else once it started
            // (the config read and its sockets bound) or was refused.
            let (reply, rx) = oneshot::channel();
            let input = if wait {
                Call::Reload {
                    reply: Some(reply),
                    started: None,
                }
            } else {
                Call::Reload {
                    reply: None,
                    started: Some(reply),
                }
            };
            if tx.send(input).is_err() {
                return (gone(), After::Close);
            }
            info!(wait, "restart requested over the control socket");
            (outcome(rx.await), After::Next)
        }
        Command::ReopenLogs => {
            let (reply, rx) = oneshot::channel();
            if tx.send(Call::ReopenLogs { reply }).is_err() {
                return (gone(), After::Close);
            }
            (outcome(rx.await), After::Next)
        }
        Command::Scale { workers } => {
            let (reply, rx) = oneshot::channel();
            let input = Call::Scale { workers, reply };
            if tx.send(input).is_err() {
                return (gone(), After::Close);
            }
            (outcome(rx.await), After::Next)
        }
        Command::Stop { wait } => {
            let (reply, rx) = oneshot::channel();
            let input = Call::Stop { reply };
            if tx.send(input).is_err() {
                return (gone(), After::Close);
            }
            info!(wait, "stop requested over the control socket");
            let mut r = if wait {
                outcome(rx.await)
            } else {
                accepted(tx, rx, |s| {
                    format!("stopping: draining {} worker(s)", s.workers.len())
                })
                .await
            };
            r.pid = Some(std::process::id());
            let after = if wait && r.ok {
                After::HoldUntilExit
            } else {
                After::Next
            };
            (r, after)
        }
    }
}

// ---------------------------------------------------------------- client --

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
    pub const USAGE: i32 = exitcode::USAGE;
    /// holdfast is not running (socket missing or refusing).
    pub const NOT_RUNNING: i32 = exitcode::UNAVAILABLE;
    pub const PERMISSION: i32 = exitcode::NOPERM;
    pub const CONFIG: i32 = exitcode::CONFIG;
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .is_some_and(|c| matches!(c, 'Z' | 'X')),
        Err(_) => true,
    }
}

/// Runs one CLI command against the socket at `path`; prints the result and
/// returns the exit code.
pub fn run_client(path: &Path, command: Command, json: bool) -> i32 {
    let waits = matches!(
        command,
        Command::Restart { wait: true } | Command::Stop { wait: true }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_round_trip() {
        let cases = [
            (r#"{"v":1,"cmd":"status"}"#, Command::Status),
            (
                r#"{"v":1,"cmd":"restart"}"#,
                Command::Restart { wait: false },
            ),
            (
                r#"{"v":1,"cmd":"restart","wait":true}"#,
                Command::Restart { wait: true },
            ),
            (r#"{"v":1,"cmd":"reopen-logs"}"#, Command::ReopenLogs),
            (
                r#"{"v":1,"cmd":"scale","workers":3}"#,
                Command::Scale { workers: 3 },
            ),
            (
                r#"{"cmd":"stop","v":1,"wait":true}"#,
                Command::Stop { wait: true },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_request(line.as_bytes()), Ok(want.clone()), "{line}");
            let sent = serde_json::to_vec(&Request {
                v: VERSION,
                command: want.clone(),
            })
            .expect("encode");
            assert_eq!(parse_request(&sent), Ok(want));
        }
    }

    #[test]
    fn bad_requests_say_why() {
        let cases = [
            ("garbage", "not a JSON request line"),
            (r#"{"cmd":"status"}"#, "missing \"v\""),
            (
                r#"{"v":2,"cmd":"status"}"#,
                "unsupported protocol version 2",
            ),
            (r#"{"v":1,"cmd":"explode"}"#, "unknown variant"),
            (r#"{"v":1,"cmd":"scale"}"#, "missing field `workers`"),
            (r#"[1,2]"#, "missing \"v\""),
        ];
        for (line, want) in cases {
            let r = parse_request(line.as_bytes()).expect_err(line);
            assert_eq!(r.kind, Some(ErrorKind::BadRequest), "{line}");
            let e = r.error.unwrap_or_default();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
