//! The server inside `holdfast run`: a task per connection, bounded lines
//! and deadlines, peer credentials checked, every request a [`Call`] to the
//! event loop; concurrent status requests share one walk of /proc.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use super::{
    parse_request, Answer, Answering, Call, Calls, Command, ErrorKind, Reply, Response,
    MAX_CLIENTS, MAX_REQUEST, READ_TIMEOUT, WRITE_TIMEOUT,
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
        let keeper = keeper_of(path).filter(|k| {
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

    /// The socket a previous image bound (an in-place upgrade): listening,
    /// non-blocking, its path owned as long as it is still this inode.
    pub fn adopt(r: ControlRecord, fd: OwnedFd) -> io::Result<ControlSocket> {
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener,
            guard: PathGuard {
                path: r.path,
                inode: r.inode,
                keeper: r.keeper,
            },
        })
    }
}

/// The hard link beside the control socket's path that restores it: `.NAME.holdfast`.
pub(crate) fn keeper_of(path: &Path) -> Option<PathBuf> {
    path.file_name()
        .map(|n| path.with_file_name(format!(".{}.holdfast", n.to_string_lossy())))
}

/// The control socket as an upgrade hands it over.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ControlRecord {
    pub path: PathBuf,
    pub inode: u64,
    pub fd: RawFd,
    /// The hard link that restores the path (see `Server::repair_path`).
    #[serde(default)]
    pub keeper: Option<PathBuf>,
}

/// What connection tasks share.
struct Shared {
    tx: Calls,
    /// `ListenOverflows`, `ListenDrops` when holdfast started.
    baseline: Option<(u64, u64)>,
    uid: u32,
    slots: Arc<Semaphore>,
    busy: Arc<Busy>,
    /// Set while an upgrade is about to exec (see [`super::Pause`]).
    pause: watch::Receiver<bool>,
    /// Connection tasks alive, and those of them awaiting an answer the
    /// loop still owes (those are handed over by their [`Reply`]).
    live: Arc<AtomicUsize>,
    waiting: Arc<AtomicUsize>,
    /// Connections parked by a pause: the stream and the bytes read from it
    /// but not used yet.
    parked: Mutex<Vec<(std::os::unix::net::UnixStream, Vec<u8>)>>,
}

/// Counts one task in `live` or `waiting` while it exists.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn enter(c: &Arc<AtomicUsize>) -> Counted {
        c.fetch_add(1, Ordering::SeqCst);
        Counted(c.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Returns once `pause` says paused (never, if its sender is gone).
pub(crate) async fn paused(pause: &mut watch::Receiver<bool>) {
    loop {
        if *pause.borrow_and_update() {
            return;
        }
        if pause.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
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
    shared: Arc<Shared>,
    /// The listening socket's fd, owned by the accept task while it runs.
    listener_fd: RawFd,
}

impl Server {
    /// Restores the control socket's path if it was removed; `Ok(true)` when it had to.
    pub fn repair_path(&self) -> io::Result<bool> {
        self.guard.repair()
    }

    /// Starts accepting on `socket`; requests go to the loop through `tx`.
    /// While `pause` says so, nothing new is accepted or read (see
    /// [`super::Pause`]).
    pub fn start(
        socket: ControlSocket,
        tx: Calls,
        baseline: Option<(u64, u64)>,
        pause: watch::Receiver<bool>,
    ) -> io::Result<Server> {
        let ControlSocket { listener, guard } = socket;
        let listener_fd = listener.as_raw_fd();
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let busy = Arc::new(Busy::default());
        let shared = Arc::new(Shared {
            tx,
            baseline,
            uid: nix::unistd::geteuid().as_raw(),
            slots: Arc::new(Semaphore::new(MAX_CLIENTS)),
            busy: busy.clone(),
            pause,
            live: Arc::default(),
            waiting: Arc::default(),
            parked: Mutex::new(Vec::new()),
        });
        info!(path = %guard.path.display(), "control socket listening");
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Server {
            accept,
            guard,
            busy,
            shared,
            listener_fd,
        })
    }

    /// Paused, every connection is parked or awaits an answer the loop
    /// still owes: nothing the exec of an upgrade would lose.
    pub fn settled(&self) -> bool {
        let s = &self.shared;
        *s.pause.borrow() && s.live.load(Ordering::SeqCst) == s.waiting.load(Ordering::SeqCst)
    }

    /// After a pause that did not end in an exec: the parked connections
    /// are served again (accepting resumes with the pause's end).
    pub fn resume_parked(&self) {
        let parked = std::mem::take(&mut *lock(&self.shared.parked));
        for (stream, bytes) in parked {
            self.spawn_serve(stream, bytes);
        }
    }

    /// For an upgrade: duplicates (close-on-exec until the exec inherits
    /// them) of the parked connections, with the bytes read from each and
    /// not used yet. The originals stay parked for [`Server::resume_parked`].
    pub fn parked(&self) -> Vec<(OwnedFd, Vec<u8>)> {
        lock(&self.shared.parked)
            .iter()
            .filter_map(|(s, bytes)| {
                Some((crate::os::sys::dup(s.as_raw_fd()).ok()?, bytes.clone()))
            })
            .collect()
    }

    /// An idle connection a previous image handed over, with the bytes it
    /// had read from it: served from those bytes on.
    pub fn adopt_idle(&self, fd: OwnedFd, bytes: Vec<u8>) {
        self.spawn_serve(std::os::unix::net::UnixStream::from(fd), bytes);
    }

    fn spawn_serve(&self, stream: std::os::unix::net::UnixStream, bytes: Vec<u8>) {
        let shared = self.shared.clone();
        let live = Counted::enter(&shared.live);
        tokio::spawn(async move {
            let stream = match stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(stream))
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot serve a control connection again");
                    return;
                }
            };
            serve(stream, &shared, bytes, live).await;
        });
    }

    /// For an upgrade: a duplicate of the listening socket (close-on-exec
    /// until the exec inherits it) and what the new image needs to know.
    pub fn handover(&self) -> io::Result<(ControlRecord, OwnedFd)> {
        let fd = crate::os::sys::dup(self.listener_fd)?;
        let record = ControlRecord {
            path: self.guard.path.clone(),
            inode: self.guard.inode,
            fd: fd.as_raw_fd(),
            keeper: self.guard.keeper.clone(),
        };
        Ok((record, fd))
    }

    /// A connection a previous image handed over while it waited for an
    /// answer: the answer is written when the returned reply is sent, then
    /// the connection is served like any other.
    pub fn adopt_waiting(&self, fd: OwnedFd) -> Reply {
        let (tx, rx) = oneshot::channel();
        let conn = fd.as_raw_fd();
        let shared = self.shared.clone();
        let live = Counted::enter(&shared.live);
        let waiting = Counted::enter(&shared.waiting);
        tokio::spawn(async move {
            let std = std::os::unix::net::UnixStream::from(fd);
            let stream = match std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(std))
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot serve a control connection handed over by the previous image");
                    return;
                }
            };
            let answer = rx.await;
            drop(waiting);
            let Ok(answer) = answer else { return };
            let token = shared.busy.enter();
            let (response, answering) = outcome(Ok(answer));
            let mut stream = stream;
            let written =
                tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&response.line())).await;
            drop((token, answering));
            if matches!(written, Ok(Ok(()))) {
                serve(stream, &shared, Vec::new(), live).await;
            }
        });
        Reply::new(tx, Some(conn))
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
    let mut pause = shared.pause.clone();
    loop {
        // Paused: connections wait in the listen queue (for the new image).
        if *pause.borrow_and_update() {
            if pause.changed().await.is_err() {
                return;
            }
            continue;
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = paused(&mut pause) => continue,
        };
        let stream = match accepted {
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
        let live = Counted::enter(&shared.live);
        tokio::spawn(async move {
            serve(stream, &shared, Vec::new(), live).await;
            drop(permit);
        });
    }
}

/// Parks a connection (a pause): the stream, and what was read from it and
/// not used yet, in order: the partial request `line`, the reader's buffer,
/// the rest of the bytes it started with.
fn park(shared: &Shared, rd: Reader, wr: tokio::net::unix::OwnedWriteHalf, line: Vec<u8>) {
    let mut bytes = line;
    bytes.extend_from_slice(rd.buffer());
    let (start, rd) = rd.into_inner().into_inner();
    let at = usize::try_from(start.position()).unwrap_or(usize::MAX);
    bytes.extend_from_slice(start.get_ref().get(at..).unwrap_or_default());
    match rd.reunite(wr).map(|s| s.into_std()) {
        Ok(Ok(stream)) => lock(&shared.parked).push((stream, bytes)),
        _ => debug!("a parked control connection could not be kept"),
    }
}

type Reader = tokio::io::BufReader<
    tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::unix::OwnedReadHalf>,
>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What happens to a connection after a response is written.
enum After {
    Next,
    Close,
    /// Keep it open until holdfast exits (`stop --wait`): the client sees EOF then.
    HoldUntilExit,
}

/// Serves one connection, starting with the bytes `start` (read from it
/// by a previous image or before a pause). `_live` counts the task. A pause
/// parks the connection at the next request boundary, or in the middle of a
/// request line still coming in; a request being answered is answered first.
async fn serve(stream: tokio::net::UnixStream, shared: &Shared, start: Vec<u8>, _live: Counted) {
    let conn = stream.as_raw_fd();
    let (rd, mut wr) = stream.into_split();
    if let Err(response) = check_peer(&rd, shared.uid) {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&response.line())).await;
        return;
    }
    let mut rd: Reader = tokio::io::BufReader::new(std::io::Cursor::new(start).chain(rd));
    let mut pause = shared.pause.clone();
    let mut served = 0u64;
    loop {
        let mut line = Vec::new();
        let limit = (MAX_REQUEST + 1) as u64;
        let read = {
            let mut take = (&mut rd).take(limit);
            let read = tokio::time::timeout(READ_TIMEOUT, take.read_until(b'\n', &mut line));
            tokio::select! {
                r = read => Some(r),
                _ = paused(&mut pause) => None,
            }
        };
        let Some(read) = read else {
            return park(shared, rd, wr, line);
        };
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
        let (response, after, answering) = match parse_request(&line) {
            Ok(cmd) => handle(cmd, shared, conn).await,
            Err(r) => (r, After::Next, None),
        };
        let written = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&response.line())).await;
        drop((token, answering));
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

/// Awaits an answer the loop owes, counted as waiting meanwhile (an upgrade
/// hands such a connection over rather than wait for it).
async fn owed(
    shared: &Shared,
    rx: oneshot::Receiver<Answer>,
) -> Result<Answer, oneshot::error::RecvError> {
    let _waiting = Counted::enter(&shared.waiting);
    rx.await
}

/// The response to an answer from the loop, and the answer's token (kept
/// until the response is written).
fn outcome(r: Result<Answer, oneshot::error::RecvError>) -> (Response, Option<Answering>) {
    match r {
        Ok(Answer {
            outcome: Ok(m),
            token,
        }) => (Response::ok(m), Some(token)),
        Ok(Answer {
            outcome: Err(e),
            token,
        }) => (Response::err(ErrorKind::Failed, e), Some(token)),
        Err(_) => (gone(), None),
    }
}

/// For requests without `wait`: the loop handles inputs in order, so once it
/// answered a status request sent after `rx`'s request, the request was
/// taken (or already refused).
async fn accepted(
    tx: &Calls,
    mut rx: oneshot::Receiver<Answer>,
    started: impl FnOnce(&Snapshot) -> String,
) -> (Response, Option<Answering>) {
    let snap = match loop_status(tx).await {
        Ok(s) => s,
        Err(r) => return (r, None),
    };
    match rx.try_recv() {
        Ok(a) => outcome(Ok(a)),
        Err(oneshot::error::TryRecvError::Empty) => {
            (Response::ok(started(&snap)), Some(Answering::new()))
        }
        Err(oneshot::error::TryRecvError::Closed) => (gone(), None),
    }
}

/// The response to `cmd`, what to do after writing it, and the token that
/// counts it as on its way out (see [`super::answering`]) until written.
async fn handle(
    cmd: Command,
    shared: &Shared,
    conn: RawFd,
) -> (Response, After, Option<Answering>) {
    let tx = &shared.tx;
    let reply = |tx| Reply::new(tx, Some(conn));
    debug!(?cmd, "control request");
    match cmd {
        Command::Status => {
            let token = Answering::new();
            match fetch_status(tx, shared.baseline).await {
                Ok(s) => {
                    let mut r = Response::ok("status");
                    r.message = None;
                    r.status = Some(Box::new(s));
                    (r, After::Next, Some(token))
                }
                Err(r) => (r, After::Next, Some(token)),
            }
        }
        Command::Restart {
            slot: Some(slot), ..
        } => {
            let (r, rx) = oneshot::channel();
            if tx
                .send(Call::ReplaceSlot {
                    slot,
                    reply: reply(r),
                })
                .is_err()
            {
                return (gone(), After::Close, None);
            }
            info!(
                slot,
                "replacement of one slot requested over the control socket"
            );
            let (r, token) = outcome(owed(shared, rx).await);
            (r, After::Next, token)
        }
        Command::Live => {
            let token = Answering::new();
            (live(tx).await, After::Next, Some(token))
        }
        Command::Ready => {
            let token = Answering::new();
            (ready(tx).await, After::Next, Some(token))
        }
        Command::Restart { wait, slot: None } => {
            // --wait: answered when the rollout ends; else once it started
            // (the config read and its sockets bound) or was refused.
            let (r, rx) = oneshot::channel();
            let input = if wait {
                Call::Reload {
                    reply: Some(reply(r)),
                    started: None,
                }
            } else {
                Call::Reload {
                    reply: None,
                    started: Some(reply(r)),
                }
            };
            if tx.send(input).is_err() {
                return (gone(), After::Close, None);
            }
            info!(wait, "restart requested over the control socket");
            let (r, token) = outcome(owed(shared, rx).await);
            (r, After::Next, token)
        }
        Command::ReopenLogs => {
            let (r, rx) = oneshot::channel();
            if tx.send(Call::ReopenLogs { reply: reply(r) }).is_err() {
                return (gone(), After::Close, None);
            }
            let (r, token) = outcome(owed(shared, rx).await);
            (r, After::Next, token)
        }
        Command::Scale { workers } => {
            let (r, rx) = oneshot::channel();
            let input = Call::Scale {
                workers,
                reply: reply(r),
            };
            if tx.send(input).is_err() {
                return (gone(), After::Close, None);
            }
            let (r, token) = outcome(owed(shared, rx).await);
            (r, After::Next, token)
        }
        Command::Stop { wait } => {
            let (r, rx) = oneshot::channel();
            let input = Call::Stop { reply: reply(r) };
            if tx.send(input).is_err() {
                return (gone(), After::Close, None);
            }
            info!(wait, "stop requested over the control socket");
            let (mut r, token) = if wait {
                outcome(owed(shared, rx).await)
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
            (r, after, token)
        }
        Command::Upgrade { wait, binary } => {
            let (r, rx) = oneshot::channel();
            let input = Call::Upgrade {
                binary,
                wait,
                reply: reply(r),
            };
            if tx.send(input).is_err() {
                return (gone(), After::Close, None);
            }
            info!(
                wait,
                "upgrade of holdfast requested over the control socket"
            );
            // Answered here when it fails or (without `wait`) starts; with
            // `wait`, by the new image on this very connection.
            let (r, token) = outcome(owed(shared, rx).await);
            (r, After::Next, token)
        }
    }
}

/// Writes `outcome` as a response line to the connection `fd` at once,
/// from the loop (an upgrade without `wait`, right before the exec): the
/// socket is non-blocking, so a full buffer is waited for up to 1 s.
pub fn answer_now(fd: OwnedFd, outcome: Result<String, String>) {
    let line = match outcome {
        Ok(m) => Response::ok(m),
        Err(e) => Response::err(ErrorKind::Failed, e),
    }
    .line();
    let mut file = std::fs::File::from(fd);
    let until = std::time::Instant::now() + Duration::from_secs(1);
    let mut done = 0;
    while done < line.len() && std::time::Instant::now() < until {
        match std::io::Write::write(&mut file, &line[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut p = [nix::poll::PollFd::new(
                    file.as_fd(),
                    nix::poll::PollFlags::POLLOUT,
                )];
                let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(100u16));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
