//! A bounded HTTP/1.1 load client that counts failures by kind.
//!
//! holdfast exists so that a restart loses no request: no refused connect, no
//! reset keep-alive connection, no truncated body. The client therefore never
//! retries: every request is counted once, as OK or as one [`FailKind`], and
//! the report keeps the first failures with enough detail to match them to the
//! holdfast log (time since the load started, connection, reuse).
//!
//! Each connection is one std thread with blocking sockets. Every loop is
//! bounded by a shared request budget and a wall-clock limit, so a test that
//! forgets to stop a load still ends. Only loopback addresses and unix sockets
//! are accepted as targets.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};

/// Where requests go. Only loopback TCP addresses and unix sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Target {
    /// `127.0.0.1:port`.
    pub fn local(port: u16) -> Target {
        Target::Tcp(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Panics unless the target is on this machine (127.0.0.0/8, ::1, unix).
    pub fn assert_local(&self) {
        if let Target::Tcp(addr) = self {
            let ok = match addr.ip() {
                IpAddr::V4(ip) => ip.is_loopback(),
                IpAddr::V6(ip) => ip.is_loopback(),
            };
            assert!(
                ok,
                "load target {addr} is not a loopback address; refusing to connect"
            );
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp(addr) => write!(f, "{addr}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// One complete HTTP response (any status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names as the server sent them; use [`Response::header`] to look up.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this name (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `X-Pid` header, if present and numeric.
    pub fn pid(&self) -> Option<u32> {
        self.header("x-pid").and_then(|v| v.trim().parse().ok())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the server asked to close the connection after this response.
    fn wants_close(&self, http10: bool) -> bool {
        let conn = self.header("connection").map(|v| v.to_ascii_lowercase());
        match conn.as_deref() {
            Some(v) if v.split(',').any(|t| t.trim() == "close") => true,
            Some(v) if v.split(',').any(|t| t.trim() == "keep-alive") => false,
            _ => http10,
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailKind {
    /// Connect got ECONNREFUSED, or a unix socket whose backlog was full
    /// (EAGAIN) or whose file was missing (ENOENT).
    Refused,
    /// ECONNRESET or EPIPE, or the server closed the connection before sending
    /// any byte of the response (on a reused keep-alive connection too).
    Reset,
    /// Connect, write or read took longer than the request timeout.
    Timeout,
    /// The server closed the connection mid-headers or mid-body.
    ShortBody,
    Status5xx(u16),
    /// A complete response whose status is neither 200 nor 5xx.
    OtherStatus(u16),
    Other(String),
}

impl FailKind {
    /// The key used in [`LoadReport::failures`].
    pub fn name(&self) -> &'static str {
        match self {
            FailKind::Refused => "refused",
            FailKind::Reset => "reset",
            FailKind::Timeout => "timeout",
            FailKind::ShortBody => "short_body",
            FailKind::Status5xx(_) => "5xx",
            FailKind::OtherStatus(_) => "other_status",
            FailKind::Other(_) => "other",
        }
    }
}

impl fmt::Display for FailKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailKind::Status5xx(s) | FailKind::OtherStatus(s) => write!(f, "{} ({s})", self.name()),
            FailKind::Other(msg) => write!(f, "other ({msg})"),
            _ => f.write_str(self.name()),
        }
    }
}

/// A failed request: the kind and a human-readable detail.
#[derive(Debug, Clone)]
struct Failure {
    kind: FailKind,
    detail: String,
}

impl Failure {
    fn new(kind: FailKind, detail: impl Into<String>) -> Failure {
        Failure {
            kind,
            detail: detail.into(),
        }
    }
}

/// What load to generate. Build one with [`LoadSpec::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub target: Target,
    /// Number of client threads, each with at most one open connection.
    pub connections: usize,
    /// Reuse connections (HTTP/1.1 keep-alive) unless the server says `Connection: close`.
    pub keepalive: bool,
    /// How long a client waits after a failed request before its next one
    /// (0: at once). A benchmark sets it so a server that refuses is not
    /// hammered, and failures count requests a client would have made.
    pub fail_pause: Duration,
    pub path: String,
    /// Wall-clock bound for the whole load.
    pub max_duration: Duration,
    /// Total request budget across all connections.
    pub max_requests: u64,
    /// Bound on connect, each write and each read.
    pub request_timeout: Duration,
    /// Send `POST` with this body instead of `GET`.
    pub post_body: Option<Vec<u8>>,
    /// A network namespace (`/proc/PID/ns/net`) each client thread joins
    /// before it connects: the loopback of a systemd sandbox
    /// (`sandbox::Sandbox::netns`). `None`: the test's own.
    pub netns: Option<PathBuf>,
}

impl LoadSpec {
    /// 4 keep-alive connections, `GET /`, at most 30 s and 1,000,000 requests, 10 s per request.
    pub fn new(target: Target) -> LoadSpec {
        LoadSpec {
            target,
            connections: 4,
            keepalive: true,
            fail_pause: Duration::ZERO,
            path: "/".to_string(),
            max_duration: Duration::from_secs(30),
            max_requests: 1_000_000,
            request_timeout: Duration::from_secs(10),
            post_body: None,
            netns: None,
        }
    }
}

/// Results shared by all client threads while the load runs.
#[derive(Default)]
struct Tally {
    ok: u64,
    failures: BTreeMap<String, u64>,
    failure_samples: Vec<String>,
    pids: BTreeSet<u32>,
    pid_order: Vec<u32>,
    per_pid: BTreeMap<u32, u64>,
    timeline: Vec<Sample>,
    latencies_ms: Vec<f64>,
}

const MAX_SAMPLES: usize = 20;

struct Shared {
    spec: LoadSpec,
    started: Instant,
    stop: AtomicBool,
    /// Requests claimed from the budget (may overshoot max_requests by the thread count).
    claimed: AtomicU64,
    /// Requests finished, OK or failed.
    done: AtomicU64,
    /// Connections opened (connect succeeded).
    connections: AtomicU64,
    tally: Mutex<Tally>,
}

impl Shared {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        // A panicking client thread must not hide the others' results.
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_ok(&self, resp: &Response, latency: Duration) {
        let ended = self.started.elapsed();
        let mut t = self.tally();
        t.ok += 1;
        t.timeline.push(Sample {
            ended,
            outcome: Ok(latency),
        });
        t.latencies_ms.push(latency.as_secs_f64() * 1000.0);
        if let Some(pid) = resp.pid() {
            if t.pids.insert(pid) {
                t.pid_order.push(pid);
            }
            *t.per_pid.entry(pid).or_default() += 1;
        }
        drop(t);
        self.done.fetch_add(1, Ordering::SeqCst);
    }

    fn record_failure(&self, conn_no: usize, failure: Failure) {
        let at = self.started.elapsed();
        let mut t = self.tally();
        *t.failures
            .entry(failure.kind.name().to_string())
            .or_default() += 1;
        t.timeline.push(Sample {
            ended: at,
            outcome: Err(failure.kind.name()),
        });
        if t.failure_samples.len() < MAX_SAMPLES {
            t.failure_samples.push(format!(
                "t={:.3}s conn#{conn_no} {}: {}",
                at.as_secs_f64(),
                failure.kind,
                failure.detail
            ));
        }
        drop(t);
        self.done.fetch_add(1, Ordering::SeqCst);
        if !self.spec.fail_pause.is_zero() {
            std::thread::sleep(self.spec.fail_pause); // the client's pace after a failure
        }
    }

    fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.started.elapsed() >= self.spec.max_duration
    }

    /// Takes one request from the budget; false when it is spent.
    fn claim(&self) -> bool {
        self.claimed.fetch_add(1, Ordering::SeqCst) < self.spec.max_requests
    }
}

/// A running load. Dropping it stops the threads (and discards the report).
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `spec.connections` client threads. Panics if the target is not local.
    pub fn start(spec: LoadSpec) -> Load {
        spec.target.assert_local();
        assert!(spec.connections > 0, "load needs at least one connection");
        let shared = Arc::new(Shared {
            spec,
            started: Instant::now(),
            stop: AtomicBool::new(false),
            claimed: AtomicU64::new(0),
            done: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            tally: Mutex::new(Tally::default()),
        });
        let threads = (0..shared.spec.connections)
            .map(|conn_no| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("load-{conn_no}"))
                    .spawn(move || client_loop(&shared, conn_no))
                    .expect("spawn load thread")
            })
            .collect();
        Load { shared, threads }
    }

    /// Requests finished so far (OK or failed).
    pub fn requests_so_far(&self) -> u64 {
        self.shared.done.load(Ordering::SeqCst)
    }

    /// Stops the load: each thread finishes its request in flight (bounded by
    /// the request timeout) and sends no other.
    pub fn stop(mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.join_and_report()
    }

    /// Waits until the load ends by itself (request budget or max_duration).
    pub fn finish(mut self) -> LoadReport {
        self.join_and_report()
    }

    fn join_and_report(&mut self) -> LoadReport {
        let mut panics = Vec::new();
        for handle in self.threads.drain(..) {
            if let Err(e) = handle.join() {
                panics.push(panic_message(&*e));
            }
        }
        assert!(panics.is_empty(), "load client thread panicked: {panics:?}");
        let elapsed = self.shared.started.elapsed();
        let t = std::mem::take(&mut *self.shared.tally());
        LoadReport {
            target: self.shared.spec.target.to_string(),
            ok: t.ok,
            failures: t.failures,
            failure_samples: t.failure_samples,
            pids: t.pids,
            pid_order: t.pid_order,
            per_pid: t.per_pid,
            timeline: t.timeline,
            latencies_ms: t.latencies_ms,
            elapsed,
            connections: self.shared.connections.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

/// One finished request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When it finished, since the load started.
    pub ended: Duration,
    /// `Ok(latency)`, or the [`FailKind::name`] of its failure.
    pub outcome: Result<Duration, &'static str>,
}

/// What a load saw.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub target: String,
    /// Requests answered 200 with the whole body.
    pub ok: u64,
    /// Failed requests by [`FailKind::name`].
    pub failures: BTreeMap<String, u64>,
    /// The first 20 failures with detail.
    pub failure_samples: Vec<String>,
    /// Distinct `X-Pid` values of OK responses.
    pub pids: BTreeSet<u32>,
    /// Distinct `X-Pid` values in the order first seen.
    pub pid_order: Vec<u32>,
    /// OK responses per `X-Pid`.
    pub per_pid: BTreeMap<u32, u64>,
    /// Every finished request in the order it finished, for figures over
    /// time (examples/bench_alternatives).
    pub timeline: Vec<Sample>,
    /// Latency of each OK request in ms, connect included when it opened a connection.
    pub latencies_ms: Vec<f64>,
    pub elapsed: Duration,
    /// Connections the clients opened (each successful connect), so a test
    /// can tell its own connections from a proxy's in kernel counters.
    pub connections: u64,
}

impl LoadReport {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Failures of one kind name ("refused", "reset", ...); 0 if none.
    pub fn count(&self, kind: &str) -> u64 {
        self.failures.get(kind).copied().unwrap_or(0)
    }

    /// Panics with the full report unless nothing failed and at least `min_ok` requests succeeded.
    pub fn assert_clean(&self, min_ok: u64) {
        assert!(
            self.failed() == 0 && self.ok >= min_ok,
            "load was not clean (want 0 failures and ok >= {min_ok}):\n{self}"
        );
    }

    /// Nearest-rank percentile of OK latencies in ms, `p` in 0..=100. NaN if there were none.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "load on {} for {:.3}s: ok={} failed={} {:?}",
            self.target,
            self.elapsed.as_secs_f64(),
            self.ok,
            self.failed(),
            self.failures
        )?;
        writeln!(
            f,
            "latency ms: p50={:.2} p99={:.2} max={:.2}",
            self.percentile(50.0),
            self.percentile(99.0),
            self.percentile(100.0)
        )?;
        writeln!(f, "pids in order first seen: {:?}", self.pid_order)?;
        writeln!(f, "ok per pid: {:?}", self.per_pid)?;
        for s in &self.failure_samples {
            writeln!(f, "  {s}")?;
        }
        Ok(())
    }
}

/// One request on a fresh connection with `Connection: close` and a 10 s
/// timeout. Returns any complete response, whatever its status; `Err` only
/// when no complete response arrived.
pub fn http_get(target: &Target, path: &str) -> Result<Response, FailKind> {
    target.assert_local();
    let timeout = Duration::from_secs(10);
    let mut conn = Conn::open(target, timeout).map_err(|f| f.kind)?;
    let req = build_request(path, false, None);
    conn.exchange(&req, false)
        .map(|(resp, _)| resp)
        .map_err(|f| f.kind)
}

fn build_request(path: &str, keepalive: bool, post_body: Option<&[u8]>) -> Vec<u8> {
    let method = if post_body.is_some() { "POST" } else { "GET" };
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if !keepalive {
        req.push_str("Connection: close\r\n");
    }
    if let Some(body) = post_body {
        req.push_str(&format!(
            "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(body) = post_body {
        bytes.extend_from_slice(body);
    }
    bytes
}

fn client_loop(shared: &Shared, conn_no: usize) {
    let spec = &shared.spec;
    if let Some(ns) = &spec.netns {
        join_netns(ns);
    }
    let req = build_request(&spec.path, spec.keepalive, spec.post_body.as_deref());
    let mut conn: Option<Conn> = None;
    while !shared.should_stop() && shared.claim() {
        let started = Instant::now();
        let mut c = match conn.take() {
            Some(c) => c,
            None => match Conn::open(&spec.target, spec.request_timeout) {
                Ok(c) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    c
                }
                Err(f) => {
                    shared.record_failure(conn_no, f);
                    continue;
                }
            },
        };
        let reused = c.served > 0;
        match c.exchange(&req, reused) {
            Ok((resp, keep)) => {
                match resp.status {
                    200 => shared.record_ok(&resp, started.elapsed()),
                    s @ 500..=599 => {
                        let detail = format!("status {s}: {}", snippet(&resp.body));
                        shared
                            .record_failure(conn_no, Failure::new(FailKind::Status5xx(s), detail));
                    }
                    s => {
                        let detail = format!("status {s}: {}", snippet(&resp.body));
                        shared.record_failure(
                            conn_no,
                            Failure::new(FailKind::OtherStatus(s), detail),
                        );
                    }
                }
                if keep && spec.keepalive {
                    c.served += 1;
                    conn = Some(c);
                }
            }
            Err(f) => shared.record_failure(conn_no, f),
        }
    }
}

/// Moves the calling thread (only it: setns(2) on a network namespace is
/// per thread) into the network namespace at `ns`. Panics if it cannot.
pub fn join_netns(ns: &std::path::Path) {
    let f = std::fs::File::open(ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display()));
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {}: {e}", ns.display()));
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    s.trim().to_string()
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One client connection and the bytes read past the last response.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    /// Responses completed on this connection; > 0 means the next request reuses it.
    served: u64,
}

impl Conn {
    /// Connects with `timeout` as connect, read and write timeout.
    ///
    /// A unix connect is non-blocking, as nginx does it: a full backlog is an
    /// immediate EAGAIN (counted as refused), not a wait.
    fn open(target: &Target, timeout: Duration) -> Result<Conn, Failure> {
        let stream = match target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, timeout)
                    .map_err(|e| connect_failure(&e, &format!("connect {addr}")))?;
                s.set_nodelay(true).ok();
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| other("set timeout", &e))?;
                s.set_write_timeout(Some(timeout))
                    .map_err(|e| other("set timeout", &e))?;
                Stream::Tcp(s)
            }
            Target::Unix(path) => {
                let s = connect_unix(path)?;
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| other("set timeout", &e))?;
                s.set_write_timeout(Some(timeout))
                    .map_err(|e| other("set timeout", &e))?;
                Stream::Unix(s)
            }
        };
        Ok(Conn {
            stream,
            buf: Vec::new(),
            served: 0,
        })
    }

    /// Sends one request and reads one response. On success also says whether
    /// the connection may carry another request.
    fn exchange(&mut self, req: &[u8], reused: bool) -> Result<(Response, bool), Failure> {
        let conn_desc = if reused {
            format!(
                "reused keep-alive connection (after {} responses)",
                self.served
            )
        } else {
            "fresh connection".to_string()
        };
        if let Err(e) = self.stream.write_all(req) {
            return Err(io_failure(&e, 0, &format!("write on {conn_desc}")));
        }
        // Headers.
        let header_end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(Failure::new(
                    FailKind::Other("headers too long".into()),
                    conn_desc,
                ));
            }
            match self.fill() {
                Ok(0) if self.buf.is_empty() => {
                    return Err(Failure::new(
                        FailKind::Reset,
                        format!("closed with no response on {conn_desc}"),
                    ))
                }
                Ok(0) => {
                    return Err(Failure::new(
                        FailKind::ShortBody,
                        format!(
                            "closed mid-headers after {} bytes on {conn_desc}",
                            self.buf.len()
                        ),
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    let got = self.buf.len();
                    return Err(io_failure(&e, got, &format!("read headers on {conn_desc}")));
                }
            }
        };
        let (status, http10, headers) = parse_head(&self.buf[..header_end]).map_err(|msg| {
            let head = String::from_utf8_lossy(&self.buf[..header_end]);
            Failure::new(
                FailKind::Other(msg),
                format!("on {conn_desc}: {}", head.trim_end()),
            )
        })?;
        self.buf.drain(..header_end);
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let no_body = matches!(status, 100..=199 | 204 | 304);
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = resp
            .header("content-length")
            .map(|v| v.trim().parse::<usize>());
        let mut keep = !resp.wants_close(http10);
        if no_body {
            // 1xx, 204 and 304 carry no body whatever the headers say.
        } else if chunked {
            resp.body = self.read_chunked(&conn_desc, status)?;
        } else if let Some(length) = length {
            let length = length.map_err(|_| {
                Failure::new(
                    FailKind::Other("bad Content-Length".into()),
                    conn_desc.clone(),
                )
            })?;
            while self.buf.len() < length {
                match self.fill() {
                    Ok(0) => {
                        return Err(Failure::new(
                            FailKind::ShortBody,
                            format!(
                                "status {status}: closed after {} of {length} body bytes on {conn_desc}",
                                self.buf.len()
                            ),
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let desc = format!("status {status}: read body on {conn_desc}");
                        return Err(io_failure(&e, 1, &desc));
                    }
                }
            }
            resp.body = self.buf.drain(..length).collect();
        } else {
            // No length: the body runs to EOF and the connection is done.
            keep = false;
            loop {
                match self.fill() {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        let desc = format!("status {status}: read body to EOF on {conn_desc}");
                        return Err(io_failure(&e, 1, &desc));
                    }
                }
            }
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok((resp, keep))
    }

    fn read_chunked(&mut self, conn_desc: &str, status: u16) -> Result<Vec<u8>, Failure> {
        let mut body = Vec::new();
        loop {
            let line_end = self.need_until(b"\r\n", conn_desc, status)?;
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            self.buf.drain(..line_end + 2);
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
                Failure::new(
                    FailKind::Other(format!("bad chunk size {line:?}")),
                    conn_desc.to_string(),
                )
            })?;
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    let end = self.need_until(b"\r\n", conn_desc, status)?;
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                self.fill_or_short(conn_desc, status)?;
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    fn need_until(&mut self, pat: &[u8], conn_desc: &str, status: u16) -> Result<usize, Failure> {
        loop {
            if let Some(pos) = find(&self.buf, pat) {
                return Ok(pos);
            }
            self.fill_or_short(conn_desc, status)?;
        }
    }

    fn fill_or_short(&mut self, conn_desc: &str, status: u16) -> Result<(), Failure> {
        match self.fill() {
            Ok(0) => Err(Failure::new(
                FailKind::ShortBody,
                format!("status {status}: closed mid chunked body on {conn_desc}"),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(io_failure(
                &e,
                1,
                &format!("status {status}: read chunked body on {conn_desc}"),
            )),
        }
    }

    /// Reads once, appending to `buf`; Ok(0) at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn connect_unix(path: &std::path::Path) -> Result<UnixStream, Failure> {
    let what = format!("connect unix:{}", path.display());
    let addr = UnixAddr::new(path).map_err(|e| other(&what, &io::Error::from(e)))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| other("socket(AF_UNIX)", &io::Error::from(e)))?;
    loop {
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                return Err(Failure::new(
                    FailKind::Refused,
                    format!("{what}: eagain (backlog full)"),
                ))
            }
            Err(Errno::ENOENT) => {
                return Err(Failure::new(
                    FailKind::Refused,
                    format!("{what}: enoent (no socket file)"),
                ))
            }
            Err(e) => return Err(connect_failure(&io::Error::from(e), &what)),
        }
    }
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|e| other("clear O_NONBLOCK", &e))?;
    Ok(stream)
}

fn other(what: &str, e: &io::Error) -> Failure {
    Failure::new(
        FailKind::Other(format!("{what}: {e}")),
        format!("{what}: {e}"),
    )
}

fn connect_failure(e: &io::Error, what: &str) -> Failure {
    let kind = match e.kind() {
        io::ErrorKind::ConnectionRefused => FailKind::Refused,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => FailKind::Timeout,
        io::ErrorKind::ConnectionReset => FailKind::Reset,
        _ => FailKind::Other(format!("{what}: {e}")),
    };
    Failure::new(kind, format!("{what}: {e}"))
}

/// Classifies an I/O error after `got` response bytes arrived.
fn io_failure(e: &io::Error, got: usize, what: &str) -> Failure {
    let kind = match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FailKind::Timeout,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => FailKind::Reset,
        io::ErrorKind::UnexpectedEof if got > 0 => FailKind::ShortBody,
        io::ErrorKind::UnexpectedEof => FailKind::Reset,
        _ => FailKind::Other(format!("{what}: {e}")),
    };
    Failure::new(kind, format!("{what}: {e} (after {got} response bytes)"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

type Head = (u16, bool, Vec<(String, String)>);

/// The status, whether the server spoke HTTP/1.0, and the headers of a
/// complete response head, parsed by httparse.
fn parse_head(head: &[u8]) -> Result<Head, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete response head".into()),
        Err(e) => return Err(format!("bad response head: {e}")),
    }
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err("bad status line".into());
    };
    let headers = resp
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).trim().to_string();
            (h.name.to_string(), value)
        })
        .collect();
    Ok((status, minor == 0, headers))
}
