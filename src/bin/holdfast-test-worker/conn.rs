//! One accepted connection: read request heads, answer, keep alive or close.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::{sleep, sleep_until, timeout};

use crate::http::{parse_head, ParseError, Request, Response, Version};
use crate::worker::{Phase, Worker};
use crate::{CONTINUE, IDLE_TIMEOUT, MAX_BODY_BYTES, READ_TIMEOUT};

/// One accepted connection. Dropping it releases its tracker (the drain
/// waits for all of them) and its permit.
pub(crate) struct Conn {
    pub(crate) worker: Arc<Worker>,
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) probe_fail: bool,
    pub(crate) _tracker: mpsc::Sender<()>,
    pub(crate) _permit: OwnedSemaphorePermit,
}

/// Why a connection stopped before a complete request head.
#[derive(Debug)]
pub(crate) enum ConnEnd {
    /// EOF, lame duck over, idle timeout, read timeout or I/O error: close
    /// without answering.
    Close,
    /// A bad request: answer with an error and close.
    Bad(ParseError),
}

impl Conn {
    pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut self, mut stream: S) {
        let mut buf = Vec::with_capacity(4096);
        loop {
            let (req, head_len) = match self.read_head(&mut stream, &mut buf).await {
                Ok(head) => head,
                Err(ConnEnd::Close) => return,
                Err(ConnEnd::Bad(e)) => {
                    let resp = Response::text(e.status(), format!("{e}\n"));
                    let _ = stream.write_all(&resp.encode(false, true, false)).await;
                    let _ = stream.shutdown().await;
                    return;
                }
            };
            buf.drain(..head_len);
            if req.content_length > MAX_BODY_BYTES {
                let e = ParseError::BodyTooLarge;
                let resp = Response::text(e.status(), format!("{e}\n"));
                let _ = stream.write_all(&resp.encode(false, true, false)).await;
                return;
            }
            let send_continue = req.expect_continue && req.content_length > 0 && buf.is_empty();
            if send_continue && stream.write_all(CONTINUE).await.is_err() {
                return;
            }
            if discard_body(&mut stream, &mut buf, req.content_length)
                .await
                .is_err()
            {
                return;
            }
            let resp = self.worker.respond(&req, self.probe_fail).await;
            let draining = matches!(*self.phase.borrow(), Phase::Draining { .. });
            let close = !req.keep_alive || draining;
            let head_only = req.method == "HEAD";
            let bytes = resp.encode(head_only, close, req.version == Version::Http10);
            if stream.write_all(&bytes).await.is_err() {
                return;
            }
            if close {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }

    /// Reads until `buf` holds a whole request head. While no byte of the
    /// next request is there, the connection is idle: it is closed at the
    /// end of the lame duck or after [`IDLE_TIMEOUT`]. A request that has
    /// started is read to its end, whatever the phase.
    pub(crate) async fn read_head<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        buf: &mut Vec<u8>,
    ) -> Result<(Request, usize), ConnEnd> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(head) = parse_head(buf).map_err(ConnEnd::Bad)? {
                return Ok(head);
            }
            let idle = buf.iter().all(|&b| b == b'\r' || b == b'\n');
            let read = if idle {
                tokio::select! {
                    read = stream.read(&mut chunk) => read,
                    _ = lame_duck_over(&mut self.phase) => return Err(ConnEnd::Close),
                    _ = sleep(IDLE_TIMEOUT) => return Err(ConnEnd::Close),
                }
            } else {
                timeout(READ_TIMEOUT, stream.read(&mut chunk))
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            };
            match read {
                Ok(0) | Err(_) => return Err(ConnEnd::Close),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Reads and drops `len` body bytes, first from `buf`, then from `stream`.
pub(crate) async fn discard_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    len: u64,
) -> io::Result<()> {
    let buffered = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
    buf.drain(..buffered);
    let mut left = len - buffered as u64;
    let mut chunk = [0u8; 8192];
    while left > 0 {
        let want = usize::try_from(left)
            .unwrap_or(chunk.len())
            .min(chunk.len());
        let n = timeout(READ_TIMEOUT, stream.read(&mut chunk[..want]))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(())
}

/// Resolves once the worker is draining and its lame duck is over; never
/// while serving.
pub(crate) async fn lame_duck_over(phase: &mut watch::Receiver<Phase>) {
    loop {
        let current = *phase.borrow_and_update();
        match current {
            Phase::Draining { lame_duck_until } => {
                sleep_until(lame_duck_until).await;
                return;
            }
            Phase::Serving => {
                if phase.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
