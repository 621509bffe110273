//! The server inside `holdfast run`: a task per connection, bounded lines
//! and deadlines, peer credentials checked, every request a [`Call`] to the
//! event loop; concurrent status requests share one walk of /proc.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, info, warn};

use super::{
    parse_request, Call, Calls, Command, ErrorKind, Response, MAX_CLIENTS, MAX_REQUEST,
    READ_TIMEOUT, WRITE_TIMEOUT,
};
use crate::status::Snapshot;

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

/// The socket's path, and a hidden hard link to the same socket next to
/// it (`.NAME.holdfast`) from which the path is restored if something
/// removes it (a tmp cleaner, a careless `rm`): the CLI must find holdfast.
#[derive(Debug)]
struct PathGuard {
    path: PathBuf,
    inode: u64,
    keeper: Option<PathBuf>,
}

impl PathGuard {
    /// Puts the path back to this socket if it is gone or replaced; `Ok(true)` when it had to.
    fn repair(&self) -> std::io::Result<bool> {
        let Some(keeper) = &self.keeper else {
            return Ok(false);
        };
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.ino() == self.inode => return Ok(false),
            Ok(_) => std::fs::remove_file(&self.path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::hard_link(keeper, &self.path)?;
        Ok(true)
    }
}

impl Drop for PathGuard {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(k) = &self.keeper {
            let _ = std::fs::remove_file(k);
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
        let keeper = path
            .file_name()
            .map(|n| path.with_file_name(format!(".{}.holdfast", n.to_string_lossy())));
        let keeper = keeper.filter(|k| {
            let _ = std::fs::remove_file(k);
            std::fs::hard_link(path, k)
                .map_err(|e| warn!(path = %k.display(), error = %e, "cannot keep a link to the control socket; a removed control socket path will not be restored"))
                .is_ok()
        });
        let guard = PathGuard {
            path: path.to_path_buf(),
            inode,
            keeper,
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
    /// Restores the control socket's path if it was removed; `Ok(true)` when it had to.
    pub fn repair_path(&self) -> io::Result<bool> {
        self.guard.repair()
    }

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

/// The liveness probe: the event loop answered (the cheap half of a
/// status request, no walk of /proc).
pub async fn live(tx: &Calls) -> Response {
    let start = std::time::Instant::now();
    match loop_status(tx).await {
        Ok(s) => Response::ok(format!(
            "live: holdfast {} (pid {}) answered in {} ms",
            s.holdfast.version,
            s.holdfast.pid,
            start.elapsed().as_millis()
        )),
        Err(r) => r,
    }
}

/// The readiness probe, from the cheap half of a status request: `ok`, or
/// `failed` with the one-line reason.
pub async fn ready(tx: &Calls) -> Response {
    match loop_status(tx).await {
        Ok(s) if s.holdfast.ready => Response::ok(format!(
            "ready: {} worker(s) of generation {}",
            s.holdfast.workers_wanted, s.holdfast.generation
        )),
        Ok(s) => Response::err(
            ErrorKind::Failed,
            format!(
                "not ready: {}",
                s.holdfast.not_ready.as_deref().unwrap_or("unknown")
            ),
        ),
        Err(r) => r,
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
        Command::Restart {
            slot: Some(slot), ..
        } => {
            let (reply, rx) = oneshot::channel();
            if tx.send(Call::ReplaceSlot { slot, reply }).is_err() {
                return (gone(), After::Close);
            }
            info!(
                slot,
                "replacement of one slot requested over the control socket"
            );
            (outcome(rx.await), After::Next)
        }
        Command::Live => (live(tx).await, After::Next),
        Command::Ready => (ready(tx).await, After::Next),
        Command::Restart { wait, slot: None } => {
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
