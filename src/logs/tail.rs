//! The last lines of one worker's output, kept for the message that reports
//! its failure: a rollout that fails because a new worker exited before it
//! was ready says *why* in the worker's own words ("Already running on PID
//! 1234", a backtrace), where the operator looks first (`restart --wait`,
//! `status`, holdfast's log), not only in the log file.
//!
//! The sink threads see every line; each worker's two pipes share one
//! [`Tail`], bounded by [`TAIL_LINES`] and [`TAIL_BYTES`]. The edge holds the
//! other handle and reads it when the worker exits.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Lines kept per worker.
pub const TAIL_LINES: usize = 10;
/// Bytes kept per worker, over all its lines.
pub const TAIL_BYTES: usize = 2048;
/// The longest line kept, in bytes (cut at a character boundary).
pub const TAIL_LINE_MAX: usize = 512;

/// One worker's last lines (stdout and stderr, in the order read).
#[derive(Debug, Clone, Default)]
pub struct Tail(Arc<Mutex<Lines>>);

#[derive(Debug, Default)]
struct Lines {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    /// Keeps `line` (without its newline), dropping the oldest lines beyond the bounds.
    pub(super) fn push(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(&line[..line.len().min(TAIL_LINE_MAX + 3)]);
        let mut text = text.trim_end_matches('\r').to_string();
        if text.len() > TAIL_LINE_MAX {
            let mut cut = TAIL_LINE_MAX;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        let mut l = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        l.bytes += text.len();
        l.lines.push_back(text);
        while l.lines.len() > TAIL_LINES || l.bytes > TAIL_BYTES {
            match l.lines.pop_front() {
                Some(old) => l.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The lines kept, oldest first.
    pub fn lines(&self) -> Vec<String> {
        let l = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        l.lines.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_within_both_bounds() {
        let t = Tail::default();
        for i in 0..25 {
            t.push(format!("line {i}").as_bytes());
        }
        let want: Vec<String> = (15..25).map(|i| format!("line {i}")).collect();
        assert_eq!(t.lines(), want);

        let t = Tail::default();
        t.push(b"short");
        for _ in 0..5 {
            t.push(&[b'x'; 600]);
        }
        let lines = t.lines();
        // Each cut to 512 bytes + "…" (3 bytes): three fit in 2 KiB, four do not.
        assert_eq!(lines.len(), 3);
        assert!(lines
            .iter()
            .all(|l| l.len() == TAIL_LINE_MAX + 3 && l.ends_with('…')));
        assert!(lines.iter().map(String::len).sum::<usize>() <= TAIL_BYTES);

        let t = Tail::default();
        t.push("crlf\r".as_bytes());
        t.push(&[0xff, b'a']);
        assert_eq!(t.lines(), ["crlf", "\u{fffd}a"]);
    }
}
