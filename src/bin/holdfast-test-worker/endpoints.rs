//! The HTTP endpoints: `/`, `/inherited`, `/grow`, `/spike`, `/exit`,
//! `/status/N`, and `sleep=` on any of them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::sleep;

use crate::http::{Request, Response};
use crate::memory::touched;
use crate::worker::Worker;
use crate::{say, MAX_GROW_MB, MAX_SLEEP_MS, MIB};

impl Worker {
    /// Answers one request. `n` counts every request of this process.
    pub(crate) async fn respond(&self, req: &Request, probe_fail: bool) -> Response {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if probe_fail {
            return Response::text(503, "probe failing on purpose (--probe-fail)\n".into());
        }
        if let (Some(every), Some(mb)) = (self.args.grow_after_requests, self.args.grow_mb) {
            if every > 0 && n % every == 0 {
                self.memory.grow(mb.min(MAX_GROW_MB) * MIB);
            }
        }
        let sleep_ms = match req.param("sleep") {
            Some(ms) => match ms.parse::<u64>() {
                Ok(ms) => ms,
                Err(_) => return Response::text(400, format!("bad sleep={ms}\n")),
            },
            None => self.args.sleep_ms,
        };
        if sleep_ms > 0 {
            sleep(Duration::from_millis(sleep_ms.min(MAX_SLEEP_MS))).await;
        }
        let path = req.path();
        if path == "/inherited" {
            return Response {
                status: 200,
                content_type: "application/json",
                body: format!(
                    "{}\n",
                    self.inherited_json.get_or_init(|| self.inherited.render())
                )
                .into_bytes(),
            };
        }
        if path == "/spike" {
            return self.spike(req).await;
        }
        if path == "/exit" {
            return self.exit_on_request(req);
        }
        if path == "/grow" {
            return match req.param("mb").map(str::parse::<u64>) {
                Some(Ok(mb)) if mb <= MAX_GROW_MB => {
                    let total = self.memory.grow(mb * MIB);
                    Response::text(200, format!("total_mb={}\n", total / MIB))
                }
                _ => Response::text(400, format!("want /grow?mb=N with N <= {MAX_GROW_MB}\n")),
            };
        }
        if let Some(code) = path.strip_prefix("/status/") {
            return match code.parse::<u16>() {
                Ok(code) if (200..=599).contains(&code) => {
                    Response::text(code, format!("status={code} pid={}\n", self.pid))
                }
                _ => Response::text(400, format!("bad status {code:?}: want 200..=599\n")),
            };
        }
        Response::text(
            200,
            format!(
                "pid={} slot={} gen={} n={n}\n",
                self.pid, self.slot, self.generation
            ),
        )
    }

    /// `/exit?code=N`: a clean crash. Answers 200, then the worker drains
    /// as on its drain signal (stops accepting, finishes what is in flight,
    /// keeps idle keep-alive connections for the lame duck) and exits with
    /// N instead of 0. Whichever worker accepts the request exits: under
    /// load an idle worker wins nearly every accept, so to aim at one pid
    /// use SIGUSR2 with `--exit-on-usr2`.
    pub(crate) fn exit_on_request(&self, req: &Request) -> Response {
        let code = match req.param("code").map(str::parse::<u8>) {
            Some(Ok(code)) => code,
            _ => return Response::text(400, "want /exit?code=N with N in 0..=255\n".into()),
        };
        self.exit_request.send_replace(Some(code));
        Response::text(200, format!("pid={} exiting with {code}\n", self.pid))
    }

    /// `/spike?mb=N&ms=D`: allocates and touches N MiB, holds it D ms
    /// (default 500), then frees it (a block this big is its own mmap, so
    /// freeing it returns the pages to the kernel). A short spike for the
    /// memory tests' grace check.
    pub(crate) async fn spike(&self, req: &Request) -> Response {
        let mb = match req.param("mb").map(str::parse::<u64>) {
            Some(Ok(mb)) if mb <= MAX_GROW_MB => mb,
            _ => return Response::text(400, format!("want /spike?mb=N with N <= {MAX_GROW_MB}\n")),
        };
        let ms = match req.param("ms").map(str::parse::<u64>) {
            None => 500,
            Some(Ok(ms)) if ms <= MAX_SLEEP_MS => ms,
            Some(_) => return Response::text(400, "bad ms=\n".into()),
        };
        let block = match touched(mb * MIB) {
            Ok(block) => block,
            Err(e) => return Response::text(500, format!("spike of {mb} MiB: {e}\n")),
        };
        say(&format!(
            "test-worker {}: spike of {mb} MiB for {ms} ms",
            self.pid
        ));
        sleep(Duration::from_millis(ms)).await;
        drop(std::hint::black_box(block));
        say(&format!(
            "test-worker {}: spike of {mb} MiB freed",
            self.pid
        ));
        Response::text(200, format!("pid={} spiked={mb}MiB ms={ms}\n", self.pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;
    use crate::http::parse_head;
    use crate::inherited::Inherited;
    use clap::Parser;

    fn request(raw: &str) -> Request {
        match parse_head(raw.as_bytes()) {
            Ok(Some((req, _))) => req,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn exit_endpoint_asks_for_a_drain_with_the_code() {
        let args = Args::try_parse_from(["x"]).map_err(|e| e.to_string());
        let worker = Worker::new(args.expect("no flags"), Inherited::capture())
            .map_err(|e| e.to_string())
            .expect("worker");
        let table = [
            ("/exit", 400, None),
            ("/exit?code=256", 400, None),
            ("/exit?code=x", 400, None),
            ("/exit?code=3", 200, Some(3)),
            ("/exit?code=0", 200, Some(0)),
        ];
        for (target, status, asked) in table {
            worker.exit_request.send_replace(None);
            let req = request(&format!("GET {target} HTTP/1.1\r\n\r\n"));
            assert_eq!(worker.exit_on_request(&req).status, status, "{target}");
            assert_eq!(*worker.exit_request.borrow(), asked, "{target}");
        }
    }
}
