//! Log volume on purpose: numbered lines, padded, at a rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::worker::Worker;
use crate::write_stream;

/// The `--log-lines` writer: a std thread that writes whole numbered lines
/// with one blocking `write_all` each, so a slow reader never stalls HTTP.
pub(crate) struct LogThread {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle: std::thread::JoinHandle<u64>,
}

impl LogThread {
    /// Starts the writer if `--log-lines` or `--log-forever` asks for lines.
    pub(crate) fn start(worker: &Worker) -> Option<LogThread> {
        let args = &worker.args;
        if args.log_lines == 0 && !args.log_forever {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let spec = LogSpec {
            prefix: format!("w{} {}", worker.slot, worker.pid),
            lines: args.log_lines,
            forever: args.log_forever,
            rate: args.log_rate,
            line_bytes: args.log_line_bytes,
            stderr: args.log_stderr,
            torn: args.log_torn_us.map(Duration::from_micros),
        };
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("log-lines".into())
            .spawn(move || spec.write_lines(&flag))
            .ok()?;
        Some(LogThread { stop, handle })
    }

    /// Asks the writer to stop after the line it is writing.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
    }

    /// Stops the writer and returns the last sequence number written.
    /// Blocks while the writer is stuck on a full pipe.
    pub(crate) fn finish(self) -> u64 {
        self.stop();
        self.handle.join().unwrap_or(0)
    }
}

pub(crate) struct LogSpec {
    /// `w<slot> <pid>`.
    pub(crate) prefix: String,
    pub(crate) lines: u64,
    pub(crate) forever: bool,
    /// Lines per second, 0 for flat out.
    pub(crate) rate: u64,
    pub(crate) line_bytes: usize,
    pub(crate) stderr: bool,
    /// Write each line in two halves this far apart.
    pub(crate) torn: Option<Duration>,
}

impl LogSpec {
    /// Writes lines until done or stopped; returns the last sequence number.
    pub(crate) fn write_lines(&self, stop: &AtomicBool) -> u64 {
        let started = std::time::Instant::now();
        let mut seq = 0u64;
        while (self.forever || seq < self.lines) && !stop.load(Ordering::Relaxed) {
            if self.rate > 0 {
                let due = started + Duration::from_secs_f64(seq as f64 / self.rate as f64);
                loop {
                    let now = std::time::Instant::now();
                    if now >= due || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::park_timeout(due - now);
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            seq += 1;
            let line = self.line(seq);
            let written = match self.torn {
                // Half a line, a pause, the rest: a reader sees the line cut.
                Some(pause) => {
                    let (a, b) = line.split_at(line.len() / 2);
                    write_stream(self.stderr, a).and_then(|()| {
                        std::thread::sleep(pause);
                        write_stream(self.stderr, b)
                    })
                }
                None => write_stream(self.stderr, &line),
            };
            if written.is_err() {
                break;
            }
        }
        seq
    }

    /// `w<slot> <pid> <seq> xxx...\n`, padded to `line_bytes` when it fits.
    pub(crate) fn line(&self, seq: u64) -> Vec<u8> {
        let mut line = format!("{} {seq} ", self.prefix).into_bytes();
        let want = self.line_bytes.saturating_sub(1);
        if line.len() < want {
            line.resize(want, b'x');
        } else {
            line.pop();
        }
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_padded() {
        let spec = LogSpec {
            prefix: "w0 42".into(),
            lines: 1,
            forever: false,
            rate: 0,
            line_bytes: 16,
            stderr: false,
            torn: None,
        };
        assert_eq!(spec.line(7), b"w0 42 7 xxxxxxx\n");
        let short = LogSpec {
            line_bytes: 4,
            ..spec
        };
        assert_eq!(short.line(7), b"w0 42 7\n");
    }
}
