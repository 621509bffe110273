//! `metrics_listen`: the status figures in the Prometheus text format
//! (OpenMetrics 1.0, encoded by the `prometheus-client` crate) at `/metrics`.
//!
//! A scrape is a status request like `holdfast status`: the loop builds the
//! cheap half of a [`Snapshot`], the /proc half runs on a blocking thread,
//! and a fresh registry is encoded from it. So a scraper can never stall the
//! loop, and there is no second copy of the state to keep in sync. Each
//! connection is its own task with a bounded request head (8 KiB), a 5 s read
//! deadline and `Connection: close`; at most [`MAX_SCRAPERS`] at once.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::control::Calls;
use crate::status::Snapshot;

/// Scrapes served at once; more are closed at once.
pub const MAX_SCRAPERS: usize = 64;
const MAX_HEAD: usize = 8 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);
/// The OpenMetrics text content type (Prometheus negotiates it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("metrics_listen {addr}: {source}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `metrics_listen` (a std listener, so it can be bound before the
/// runtime's loop starts).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, MetricsError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| MetricsError { addr, source })?;
    l.set_nonblocking(true)
        .map_err(|source| MetricsError { addr, source })?;
    Ok(l)
}

/// Serves `/metrics` on `listener` until the task is aborted.
pub fn start(
    listener: std::net::TcpListener,
    tx: Calls,
    baseline: Option<(u64, u64)>,
    mut pause: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    if let Ok(a) = listener.local_addr() {
        info!(address = %a, "metrics listening at /metrics");
    }
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    Ok(tokio::spawn(async move {
        loop {
            // Paused for an upgrade: scrapes wait in the listen queue.
            if *pause.borrow_and_update() {
                if pause.changed().await.is_err() {
                    return;
                }
                continue;
            }
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = crate::control::paused(&mut pause) => continue,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue; // dropped: closed
            };
            let tx = tx.clone();
            // Counted from the accept: an upgrade waits for it.
            let answering = crate::control::Answering::new();
            tokio::spawn(async move {
                let _answering = answering;
                if let Err(e) = serve(stream, &tx, baseline).await {
                    debug!(error = %e, "metrics connection");
                }
                drop(permit);
            });
        }
    }))
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    tx: &Calls,
    baseline: Option<(u64, u64)>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_HEAD {
                return Err(std::io::Error::other("request head too large"));
            }
        }
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(TIMEOUT, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    }
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or(&[]));
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match crate::control::fetch_status(tx, baseline).await {
            Ok(s) => ("200 OK", CONTENT_TYPE, render(&s)),
            Err(r) => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                format!("{}\n", r.error.unwrap_or_default()),
            ),
        },
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_string(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    tokio::time::timeout(TIMEOUT, stream.write_all(&out))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.shutdown().await;
    Ok(())
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

fn gauge_family() -> Family<Labels, Gauge> {
    Family::default()
}

fn float_family() -> Family<Labels, Gauge<f64, AtomicU64>> {
    Family::default()
}

/// Encodes `s` as OpenMetrics text (ends with `# EOF`).
pub fn render(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("holdfast");
    let h = &s.holdfast;
    r.register(
        "build",
        "holdfast's version",
        Info::new(vec![("version".to_string(), h.version.clone())]),
    );
    r.register(
        "uptime_seconds",
        "Seconds since holdfast started",
        ConstGauge::<f64>::new(h.uptime_secs),
    );
    r.register(
        "generation",
        "The last good generation (what crash restarts and new slots run)",
        ConstGauge::<i64>::new(i64::try_from(h.generation).unwrap_or(i64::MAX)),
    );
    r.register(
        "workers_wanted",
        "Workers configured (after scale requests)",
        ConstGauge::<i64>::new(i64::from(h.workers_wanted)),
    );
    r.register(
        "rollout_in_progress",
        "1 while a rollout (or rollback) is under way",
        ConstGauge::<i64>::new(i64::from(h.rollout.is_some())),
    );
    r.register(
        "rollout_ready_workers",
        "Workers of the rolling-out generation that are ready (0 without a rollout)",
        ConstGauge::<i64>::new(h.rollout.as_ref().map_or(0, |x| i64::from(x.ready))),
    );
    if let Some(last) = &h.last_rollout {
        r.register(
            "last_rollout_ok",
            "1 if the last finished rollout succeeded, 0 if it failed (absent before the first)",
            ConstGauge::<i64>::new(i64::from(last.ok)),
        );
    }

    let states = gauge_family();
    for state in ["starting", "ready", "draining", "stopping", "killed"] {
        states
            .get_or_create(&labels(&[("state", state.into())]))
            .set(0);
    }
    let conns = gauge_family();
    let memory = gauge_family();
    let age = float_family();
    let restarts = gauge_family();
    for w in &s.workers {
        states
            .get_or_create(&labels(&[("state", w.state.clone())]))
            .inc();
        let id = labels(&[
            ("slot", w.slot.to_string()),
            ("generation", w.generation.to_string()),
            ("state", w.state.clone()),
        ]);
        age.get_or_create(&id).set(w.age_secs);
        restarts
            .get_or_create(&labels(&[("slot", w.slot.to_string())]))
            .set(i64::from(w.restarts));
        if let Some(c) = w.connections {
            conns
                .get_or_create(&id)
                .set(i64::try_from(c).unwrap_or(i64::MAX));
        }
        if let Some(m) = &w.memory {
            for (metric, v) in [
                (format!("{:?}", m.metric).to_lowercase(), m.bytes),
                ("rss".to_string(), m.rss_bytes),
            ] {
                let mut l = id.clone();
                l.push(("metric".into(), metric));
                memory
                    .get_or_create(&l)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
    }
    r.register("workers", "Workers by state", states);
    r.register(
        "worker_age_seconds",
        "Seconds since the worker was spawned",
        age,
    );
    r.register(
        "worker_connections",
        "Client connections the worker's process tree holds open (accepted from holdfast's listeners)",
        conns,
    );
    r.register(
        "worker_memory_bytes",
        "Worker memory: the configured metric (pss, uss or rss) and rss, over its tree or its largest process per [memory] scope",
        memory,
    );
    r.register(
        "slot_restarts",
        "Unexpected exits of the workers in this slot",
        restarts,
    );

    let queue = gauge_family();
    let queue_max = gauge_family();
    for l in &s.listeners {
        let id = labels(&[("listener", l.name.clone()), ("address", l.address.clone())]);
        if let (Some(n), Some(m)) = (l.accept_queue, l.accept_queue_max) {
            queue.get_or_create(&id).set(i64::from(n));
            queue_max.get_or_create(&id).set(i64::from(m));
        }
    }
    r.register(
        "listener_accept_queue",
        "Connections waiting in the listener's accept queue",
        queue,
    );
    r.register(
        "listener_accept_queue_max",
        "The accept queue's limit (backlog capped by net.core.somaxconn)",
        queue_max,
    );
    if let Some(k) = &s.kernel {
        r.register(
            "kernel_listen_overflows",
            "TcpExt ListenOverflows (every socket of this network namespace)",
            ConstCounter::new(k.listen_overflows),
        );
        r.register(
            "kernel_listen_drops",
            "TcpExt ListenDrops (every socket of this network namespace)",
            ConstCounter::new(k.listen_drops),
        );
    }

    let c = &s.counters;
    let replacements: Family<Labels, prometheus_client::metrics::counter::Counter> =
        Family::default();
    for (reason, n) in &c.replacements {
        replacements
            .get_or_create(&labels(&[("reason", reason.clone())]))
            .inc_by(*n);
    }
    r.register(
        "replacements",
        "Worker replacements started, by reason",
        replacements,
    );
    for (name, help, v) in [
        ("failed_rollouts", "Rollouts that failed", c.failed_rollouts),
        (
            "drain_kills",
            "Workers SIGKILLed after drain_timeout",
            c.drain_kills,
        ),
        ("log_reopens", "Log file reopens", c.log_reopens),
        (
            "log_reopen_failures",
            "Log reopens that failed (the old file was kept)",
            c.log_reopen_failures,
        ),
        ("log_write_errors", "Log write errors", c.log_write_errors),
        (
            "log_lines_lost",
            "Worker log lines that could not be written",
            c.log_lines_lost,
        ),
        (
            "child_signals",
            "Worker children signalled for memory",
            c.child_signals,
        ),
        (
            "upgrades",
            "In-place upgrades of holdfast adopted by the new image",
            c.upgrades,
        ),
        (
            "failed_upgrades",
            "In-place upgrades of holdfast refused or failed before the exec",
            c.failed_upgrades,
        ),
    ] {
        r.register(name, help, ConstCounter::new(v));
    }
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &r) {
        warn!(error = %e, "encoding metrics failed");
    }
    out
}
