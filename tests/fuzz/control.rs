//! The control protocol: its parser (`parse_request`), and its server on a
//! real unix socket with a stand-in event loop.
//!
//! Inputs: arbitrary bytes; and structure-aware mutations of valid request
//! lines of every command (`upgrade` with its `wait` and `binary` too):
//! fields set to values of the wrong type or past their range, removed,
//! unknown ones added, `v` and `cmd` changed, then the text cut, spliced and
//! salted with JSON syntax and bytes that are not UTF-8. A session is a
//! sequence of such lines, lines longer than [`MAX_REQUEST`] among them,
//! written in arbitrary chunks, maybe with no newline at the end, maybe with
//! the server paused (as for an upgrade) in the middle and then resumed, or
//! its idle connection handed over to a second server (the new image).
//! Properties:
//! - the parser never panics; what it accepts is a request that encodes
//!   back to the same command; what it refuses is a `bad_request` response
//!   that is one JSON line;
//! - the server answers every line exactly once, in order, with what the
//!   parser and the loop decided, and forwards exactly the calls the lines
//!   ask for; a line longer than [`MAX_REQUEST`] gets one `bad_request` and
//!   the connection closes (nothing past the limit is buffered); `stop` with
//!   `wait` is the last line answered (the connection is then held until
//!   holdfast exits);
//! - a pause parks the connection with every byte it had read and not used:
//!   resumed, or adopted by another server, it answers exactly as if there
//!   had been no pause.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast::fuzzing::{
    parse_request, Call, Command, ControlSocket, ErrorKind, Request, Response, Server, MAX_REQUEST,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{ensure, fuzz, Splice};

fn command() -> impl Strategy<Value = Command> {
    let binary = prop_oneof![
        2 => Just(None),
        2 => "/[a-z/]{0,30}".prop_map(|p| Some(PathBuf::from(p))),
        1 => ".{0,30}".prop_map(|p| Some(PathBuf::from(p))),
    ];
    prop_oneof![
        Just(Command::Status),
        (
            any::<bool>(),
            prop_oneof![3 => Just(None), 1 => any::<u32>().prop_map(Some)]
        )
            .prop_map(|(wait, slot)| Command::Restart { wait, slot }),
        Just(Command::Live),
        Just(Command::Ready),
        Just(Command::ReopenLogs),
        prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()]
            .prop_map(|workers| Command::Scale { workers }),
        any::<bool>().prop_map(|wait| Command::Stop { wait }),
        (any::<bool>(), binary).prop_map(|(wait, binary)| Command::Upgrade { wait, binary }),
    ]
}

/// One change to a request's JSON object.
#[derive(Debug, Clone)]
enum Edit {
    Set(&'static str, Value),
    Remove(&'static str),
    /// The whole value replaced (an array, a string, a number...).
    Replace(Value),
}

fn values() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec![
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(1),
            json!(2),
            json!(-1),
            json!(1.0),
            json!(1.5),
            json!(4294967295u64),
            json!(4294967296u64),
            json!(u64::MAX),
            json!(i64::MIN),
            json!("1"),
            json!(""),
            json!("status"),
            json!("Status"),
            json!("upgrade"),
            json!("upgrade "),
            json!("reopen_logs"),
            json!("reopen-logs"),
            json!("restart"),
            json!("scale"),
            json!("stop"),
            json!("/usr/bin/holdfast"),
            json!("relative/holdfast"),
            json!("/x\u{0}y"),
            json!([]),
            json!([1]),
            json!({}),
            json!({"cmd": "status"}),
        ]),
        1 => ".{0,20}".prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let key = prop::sample::select(vec![
        "v", "cmd", "wait", "workers", "binary", "slot", "extra", "",
    ]);
    prop_oneof![
        6 => (key.clone(), values()).prop_map(|(k, v)| Edit::Set(k, v)),
        3 => key.prop_map(Edit::Remove),
        1 => values().prop_map(Edit::Replace),
    ]
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u0000",
    "\\uD800",
    " ",
    "\t",
    "\r",
    "\u{feff}",
    "null",
    "1e999",
    "-0",
    "\"v\":1",
    "\"cmd\":\"upgrade\"",
    "é",
];

fn splice() -> impl Strategy<Value = Splice> {
    let at = 0usize..200;
    let bytes = prop_oneof![
        4 => prop::sample::select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..6),
        1 => prop::sample::select(vec![vec![0xffu8], vec![0xc3], vec![0xed, 0xa0, 0x80], vec![0]]),
    ];
    prop_oneof![
        4 => (at.clone(), bytes).prop_map(|(at, bytes)| Splice::Insert { at, bytes }),
        2 => (at.clone(), 1usize..10).prop_map(|(at, len)| Splice::Delete { at, len }),
        1 => at.prop_map(|at| Splice::Truncate { at }),
    ]
}

fn encode(command: Command) -> Value {
    serde_json::to_value(Request { v: 1, command }).expect("a request encodes")
}

/// One request line, without its newline (a splice may add one).
fn line() -> impl Strategy<Value = Vec<u8>> {
    let valid = command().prop_map(|c| encode(c).to_string().into_bytes());
    let mutated = (
        command(),
        prop::collection::vec(edit(), 1..4),
        prop::collection::vec(splice(), 0..3),
    )
        .prop_map(|(c, edits, splices)| {
            let mut v = encode(c);
            for e in edits {
                match (e, v.as_object_mut()) {
                    (Edit::Set(k, x), Some(o)) => {
                        o.insert(k.to_string(), x);
                    }
                    (Edit::Remove(k), Some(o)) => {
                        o.remove(k);
                    }
                    (Edit::Replace(x), _) => v = x,
                    (_, None) => {}
                }
            }
            let mut text = v.to_string().into_bytes();
            for s in &splices {
                s.apply(&mut text);
            }
            text
        });
    let arbitrary = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80),
        prop::collection::vec(prop::sample::select(TOKENS), 0..20)
            .prop_map(|t| t.concat().into_bytes()),
    ];
    prop_oneof![4 => valid, 4 => mutated, 2 => arbitrary]
}

#[test]
fn control_parse_request() {
    fuzz(
        "control_parse_request",
        5000,
        line(),
        |line| match parse_request(&line) {
            Ok(cmd) => {
                let again = serde_json::to_vec(&Request {
                    v: 1,
                    command: cmd.clone(),
                })
                .expect("encode");
                ensure(parse_request(&again) == Ok(cmd.clone()), || {
                    format!("{cmd:?} does not round-trip")
                })
            }
            Err(r) => {
                ensure(
                    !r.ok && r.kind == Some(ErrorKind::BadRequest) && r.error.is_some(),
                    || format!("refused without bad_request: {r:?}"),
                )?;
                one_json_line(&r)
            }
        },
    );
}

/// `r` as sent: one line, which reads back as `r`.
fn one_json_line(r: &Response) -> Result<(), TestCaseError> {
    let mut text = serde_json::to_vec(r).expect("encode");
    text.push(b'\n');
    ensure(text.iter().filter(|&&b| b == b'\n').count() == 1, || {
        format!("a response of more than one line: {r:?}")
    })?;
    let back: Response = serde_json::from_slice(&text).expect("decode");
    ensure(&back == r, || format!("{r:?} reads back as {back:?}"))
}

/// What to do in the middle of a session.
#[derive(Debug, Clone, Copy)]
enum Pause {
    /// Resume the same server (the upgrade was not exec'd).
    Resume,
    /// Hand the idle connection over to a second server (the new image).
    Handover,
}

#[derive(Clone)]
struct Session {
    /// The bytes written, in order.
    bytes: Vec<u8>,
    /// The sizes they are written in (cycled).
    chunks: Vec<usize>,
    /// After this many replies, pause the server.
    pause: Option<(usize, Pause)>,
    /// How much of the next line is written before the pause, in percent.
    partial: usize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self
            .bytes
            .split_inclusive(|&b| b == b'\n')
            .map(|l| {
                let shown = String::from_utf8_lossy(&l[..l.len().min(200)]).into_owned();
                match l.len() > 200 {
                    true => format!("{shown:?} ... ({} bytes)", l.len()),
                    false => format!("{shown:?}"),
                }
            })
            .collect();
        f.debug_struct("Session")
            .field("lines", &lines)
            .field("chunks", &self.chunks)
            .field("pause", &self.pause)
            .field("partial", &self.partial)
            .finish()
    }
}

fn session() -> impl Strategy<Value = Session> {
    let long = prop_oneof![
        Just(MAX_REQUEST - 1),
        Just(MAX_REQUEST),
        Just(MAX_REQUEST + 1),
        Just(3 * MAX_REQUEST),
    ]
    .prop_map(|n| {
        let mut l = br#"{"v":1,"cmd":"status","pad":""#.to_vec();
        l.resize(n.saturating_sub(2), b'x');
        l.extend_from_slice(b"\"}");
        l
    });
    let piece = prop_oneof![30 => line(), 1 => long];
    (
        prop::collection::vec(piece, 0..8),
        any::<bool>(),
        prop::collection::vec(1usize..400, 1..4),
        prop::option::of((
            1usize..6,
            prop_oneof![Just(Pause::Resume), Just(Pause::Handover)],
        )),
        0usize..=100,
    )
        .prop_map(|(lines, newline_at_end, chunks, pause, partial)| {
            let mut bytes = lines.join(&b'\n');
            if newline_at_end && !lines.is_empty() {
                bytes.push(b'\n');
            }
            Session {
                bytes,
                chunks,
                pause,
                partial,
            }
        })
}

/// A call as the stand-in loop saw it.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Status,
    Reload { wait: bool },
    ReopenLogs,
    Scale(u32),
    Stop,
    Upgrade(Option<PathBuf>, bool),
    ReplaceSlot(u32),
}

/// The reply a line must get.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    Exactly(Response),
    Ok(String),
    Failed(String),
    /// The loop did not give a status (the stand-in has none): `unavailable`.
    Unavailable,
}

/// What the server must answer to `bytes` and ask of the loop: the replies
/// in order; whether the connection then closes (EOF) or is held
/// (`stop --wait`); the calls.
fn model(bytes: &[u8]) -> (Vec<Want>, bool, Vec<Seen>) {
    let mut wants = Vec::new();
    let mut seen = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let window = &rest[..rest.len().min(MAX_REQUEST + 1)];
        let line = match window.iter().position(|&b| b == b'\n') {
            Some(i) => &window[..=i],
            None => window,
        };
        if line.len() > MAX_REQUEST {
            wants.push(Want::Exactly(Response::err(
                ErrorKind::BadRequest,
                format!("request line longer than {MAX_REQUEST} bytes; closing"),
            )));
            return (wants, true, seen);
        }
        rest = &rest[line.len()..];
        match parse_request(line) {
            Err(r) => wants.push(Want::Exactly(r)),
            // The probes ask the loop for the cheap status, as status does.
            Ok(Command::Status | Command::Live | Command::Ready) => {
                seen.push(Seen::Status);
                wants.push(Want::Unavailable);
            }
            Ok(Command::Restart {
                slot: Some(slot), ..
            }) => {
                seen.push(Seen::ReplaceSlot(slot));
                wants.push(Want::Ok(format!("slot {slot} replaced")));
            }
            Ok(Command::Restart { wait, slot: None }) => {
                seen.push(Seen::Reload { wait });
                wants.push(Want::Ok(format!("reload, wait {wait}")));
            }
            Ok(Command::ReopenLogs) => {
                seen.push(Seen::ReopenLogs);
                wants.push(Want::Ok("reopened".into()));
            }
            Ok(Command::Scale { workers }) => {
                seen.push(Seen::Scale(workers));
                wants.push(match workers {
                    0 => Want::Failed("no workers".into()),
                    n => Want::Ok(format!("{n} workers")),
                });
            }
            Ok(Command::Stop { wait: true }) => {
                seen.push(Seen::Stop);
                wants.push(Want::Ok("stopped".into()));
                return (wants, false, seen);
            }
            Ok(Command::Stop { wait: false }) => {
                // Answered once the loop confirms with a status it took it.
                seen.extend([Seen::Stop, Seen::Status]);
                wants.push(Want::Unavailable);
            }
            Ok(Command::Upgrade { wait, binary }) => {
                wants.push(Want::Ok(format!("upgrade to {binary:?}, wait {wait}")));
                seen.push(Seen::Upgrade(binary, wait));
            }
        }
    }
    (wants, true, seen)
}

/// The stand-in event loop: records each call and answers as [`model`] says.
async fn stand_in(mut rx: tokio::sync::mpsc::UnboundedReceiver<Call>, seen: Arc<Mutex<Vec<Seen>>>) {
    while let Some(call) = rx.recv().await {
        let mut log = seen.lock().expect("seen");
        match call {
            // No snapshot: dropped, the connection answers `unavailable`.
            Call::Status { reply } => {
                log.push(Seen::Status);
                drop(reply);
            }
            Call::Reload { reply, started } => {
                log.push(Seen::Reload {
                    wait: reply.is_some(),
                });
                let wait = reply.is_some();
                if let Some(r) = reply.or(started) {
                    let _ = r.send(Ok(format!("reload, wait {wait}")));
                }
            }
            Call::ReopenLogs { reply } => {
                log.push(Seen::ReopenLogs);
                let _ = reply.send(Ok("reopened".into()));
            }
            Call::Scale { workers, reply } => {
                log.push(Seen::Scale(workers));
                let _ = reply.send(match workers {
                    0 => Err("no workers".into()),
                    n => Ok(format!("{n} workers")),
                });
            }
            Call::ReplaceSlot { slot, reply } => {
                log.push(Seen::ReplaceSlot(slot));
                let _ = reply.send(Ok(format!("slot {slot} replaced")));
            }
            Call::Stop { reply } => {
                log.push(Seen::Stop);
                let _ = reply.send(Ok("stopped".into()));
            }
            Call::Upgrade {
                binary,
                wait,
                reply,
            } => {
                let _ = reply.send(Ok(format!("upgrade to {binary:?}, wait {wait}")));
                log.push(Seen::Upgrade(binary, wait));
            }
        }
    }
}

fn matches(got: &Response, want: &Want) -> bool {
    let pid = Some(std::process::id());
    match want {
        Want::Exactly(r) => got == r,
        Want::Ok(m) => got.ok && got.message.as_deref() == Some(m),
        Want::Failed(e) => {
            !got.ok && got.kind == Some(ErrorKind::Failed) && got.error.as_deref() == Some(e)
        }
        Want::Unavailable => {
            !got.ok
                && got.kind == Some(ErrorKind::Unavailable)
                && (got.pid.is_none() || got.pid == pid)
        }
    }
}

/// Polls `cond` (a state of the server's tasks) until it holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), TestCaseError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        if Instant::now() > deadline {
            return Err(TestCaseError::fail(format!("{what}: not within 5 s")));
        }
        tokio::task::yield_now().await;
    }
    Ok(())
}

async fn run_session(dir: &std::path::Path, s: Session) -> Result<(), TestCaseError> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("c{n}.sock"));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let seen = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(stand_in(rx, seen.clone()));
    let pause = tokio::sync::watch::Sender::new(false);
    let socket = ControlSocket::bind(&path).expect("bind the control socket");
    let mut server =
        Some(Server::start(socket, tx.clone(), None, pause.subscribe()).expect("start"));
    let (wants, closes, calls) = model(&s.bytes);

    // With a pause after k replies: the first k lines and part of the next
    // are written before it (so the server parks in the middle of a line,
    // never while the loop owes an answer), the rest after it.
    let pause_at = s.pause.filter(|(k, _)| *k < wants.len());
    let split = match pause_at {
        Some((k, _)) => {
            let ends: Vec<usize> = s
                .bytes
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
                .map(|(i, _)| i + 1)
                .collect();
            let start = ends[k - 1];
            let next = ends.get(k).map_or(s.bytes.len(), |e| e - 1);
            start + (next - start) * s.partial / 100
        }
        None => s.bytes.len(),
    };
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let (bytes, chunks) = (s.bytes.clone(), s.chunks.clone());
    let (go, gone) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let mut at = 0;
        let mut gone = Some(gone);
        for size in chunks.iter().cycle() {
            if at == split {
                if let Some(g) = gone.take() {
                    let _ = g.await;
                }
            }
            if at >= bytes.len() {
                break;
            }
            let limit = if at < split { split } else { bytes.len() };
            let end = (at + size).min(limit);
            // The server closes after a line that is too long: the rest is refused.
            if wr.write_all(&bytes[at..end]).await.is_err() {
                return;
            }
            at = end;
            tokio::task::yield_now().await;
        }
        let _ = wr.shutdown().await;
        // Kept open (half-closed) until the session is read.
        std::future::pending::<()>().await;
    });
    let mut go = Some(go);
    if pause_at.is_none() {
        go.take().map(|g| g.send(()));
    }
    // The second server's pause, kept for as long as it runs.
    let mut next_pause = None;

    let mut got: Vec<Response> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut eof = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut paused = false;
    while got.len() < wants.len() || (closes && !eof) {
        if let (Some((k, how)), false) = (pause_at, paused) {
            if got.len() == k {
                paused = true;
                PAUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                pause.send_replace(true);
                let sv = server.as_ref().expect("server");
                until("the server settles", || sv.settled()).await?;
                match how {
                    Pause::Resume => {
                        pause.send_replace(false);
                        sv.resume_parked();
                    }
                    Pause::Handover => {
                        let old = server.take().expect("server");
                        let (record, listener) = old.handover().expect("handover");
                        let idle = old.parked();
                        old.finish().await;
                        let next = tokio::sync::watch::Sender::new(false);
                        let socket = ControlSocket::adopt(record, listener).expect("adopt");
                        let new = Server::start(socket, tx.clone(), None, next.subscribe())
                            .expect("start the second server");
                        for (fd, bytes) in idle {
                            new.adopt_idle(fd, bytes);
                        }
                        server = Some(new);
                        next_pause = Some(next);
                    }
                }
                go.take().map(|g| g.send(()));
            }
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let r: Response = serde_json::from_slice(&line).map_err(|e| {
                TestCaseError::fail(format!(
                    "reply {} is not a response ({e}): {:?}",
                    got.len(),
                    String::from_utf8_lossy(&line)
                ))
            })?;
            got.push(r);
            ensure(got.len() <= wants.len(), || {
                format!("more replies than lines: {got:#?}")
            })?;
            continue;
        }
        if eof {
            break;
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await;
        match read {
            Ok(Ok(0)) => eof = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => {
                return Err(TestCaseError::fail(format!(
                    "read after {} replies: {e}",
                    got.len()
                )))
            }
            Err(_) => {
                return Err(TestCaseError::fail(format!(
                    "no reply or EOF within 10 s; {} replies of {}: {got:#?}",
                    got.len(),
                    wants.len()
                )))
            }
        }
    }
    writer.abort();
    drop(next_pause);
    ensure(buf.is_empty(), || {
        format!("a reply cut short: {:?}", String::from_utf8_lossy(&buf))
    })?;
    ensure(got.len() == wants.len(), || {
        format!("{} replies for {} lines: {got:#?}", got.len(), wants.len())
    })?;
    for (i, (g, w)) in got.iter().zip(&wants).enumerate() {
        ensure(matches(g, w), || format!("reply {i}: {g:?}, want {w:?}"))?;
        one_json_line(g)?;
    }
    ensure(closes == eof, || format!("closed {eof}, want {closes}"))?;
    let seen = seen.lock().expect("seen").clone();
    ensure(seen == calls, || {
        format!("the loop saw {seen:?}, want {calls:?}")
    })
}

/// Sessions paused midway (a check that the pauses happen).
static PAUSED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn control_sessions() {
    let dir = tempfile::Builder::new()
        .prefix("holdfast-fuzz-control-")
        .tempdir()
        .expect("tempdir");
    fuzz("control_sessions", 300, session(), |s| {
        // A runtime per case: a held connection (`stop --wait`) ends with it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run_session(dir.path(), s))
    });
    eprintln!(
        "fuzz control_sessions: {} sessions paused midway",
        PAUSED.load(std::sync::atomic::Ordering::Relaxed)
    );
}
