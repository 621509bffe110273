//! The readiness probe: `GET ready_path` on a worker's private unix socket
//! (`ready = "probe"`), every 100 ms until it answers below 500.
//!
//! The probe socket is the last fd a worker gets (LISTEN_FDNAMES names it
//! `holdfast-probe`); holdfast only connects to it, so a probe never competes
//! with clients on the shared listeners.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

use crate::core::{Event, ReadyVia};
use crate::edge::Input;
use crate::ids::WorkerId;

/// GETs `path` on the probe socket every 100 ms until it answers below 500.
pub async fn until_ready(
    sock: PathBuf,
    path: String,
    id: WorkerId,
    tx: mpsc::UnboundedSender<Input>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        match tokio::time::timeout(Duration::from_secs(5), once(&sock, &path)).await {
            Ok(Ok(status)) if status < 500 => {
                let _ = tx.send(Input::Event(Event::Ready {
                    id,
                    via: ReadyVia::Probe,
                }));
                return;
            }
            Ok(Ok(status)) => debug!(worker = %id, status, "probe: not ready yet"),
            Ok(Err(e)) => debug!(worker = %id, error = %e, "probe: not ready yet"),
            Err(_) => debug!(worker = %id, "probe: timed out"),
        }
    }
}

pub async fn once(sock: &Path, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock).await?;
    s.write_all(
        format!(
            "GET {path} HTTP/1.0\r\nHost: holdfast-probe\r\nUser-Agent: holdfast-probe\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let k = s.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    parse_status(&buf[..n])
}

/// The status code of an HTTP response's first bytes (`HTTP/1.x NNN ...`).
pub fn parse_status(head: &[u8]) -> std::io::Result<u16> {
    let line = String::from_utf8_lossy(head);
    let mut words = line.split_whitespace();
    let version = words.next().unwrap_or("");
    let code = words.next().unwrap_or("");
    match code.parse::<u16>() {
        Ok(c) if version.starts_with("HTTP/") && code.len() == 3 && (100..600).contains(&c) => {
            Ok(c)
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP status line: {line:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_status;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n").ok(), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503").ok(), Some(503));
        assert!(parse_status(b"").is_err());
        assert!(parse_status(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_status(b"HTTP/1.1 99999 x").is_err());
        assert!(parse_status(b"HTTP/1.1 2000").is_err());
        assert!(parse_status(b"\xff\xfe HTTP/1.1").is_err());
    }
}
