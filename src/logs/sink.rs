//! One sink thread per destination: it owns the open file and every pipe
//! routed to it, polls them, cuts what it reads into lines and writes whole
//! lines only (see the module above for why).

use super::*;

/// What the event loop asks of a sink thread.
pub(super) enum Command {
    Attach(Pipe),
    /// Reopen by path; answers with the path reopened (None: not a file).
    Reopen(oneshot::Sender<Result<Option<PathBuf>, String>>),
    /// Drain what the pipes hold now, write it, and end the thread.
    Shutdown,
    /// Read what the pipes hold now (an exited worker's last lines reach
    /// its [`Tail`]), write it, then answer.
    Sync(oneshot::Sender<()>),
    /// An upgrade of holdfast, step 1: write the whole lines collected so
    /// far, answer, and wait for the next command without reading the pipes
    /// (step 2 or [`Command::Resume`]). A sink stuck in write(2) answers
    /// late; the loop then resumes everyone instead of waiting.
    Pause(mpsc::Sender<()>),
    /// Leave the pause: read the pipes again.
    Resume,
    /// Step 2, while paused: hand back the destination file and every pipe,
    /// each with its partial line, open, and end the thread. What the pipes
    /// hold stays there for whoever reads them next.
    Handover(mpsc::Sender<Handed>),
}

/// What a sink thread hands back for an upgrade (see [`Command::Handover`]).
pub(super) struct Handed {
    pub(super) file: File,
    pub(super) pipes: Vec<Pipe>,
}

/// The loop's handle on one sink thread.
pub(super) struct SinkHandle {
    pub(super) dest: Dest,
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) wake: File,
}

impl SinkHandle {
    pub(super) fn send(&self, c: Command) -> bool {
        if self.tx.send(c).is_err() {
            return false;
        }
        // The pipe is non-blocking: when it is full a wake-up is pending anyway.
        let _ = (&self.wake).write(&[1]);
        true
    }
}

/// The read end of one worker stream, as the sink thread holds it.
pub(super) struct Pipe {
    pub(super) file: File,
    /// Whose stream: the worker's slot and pid, and 1 (stdout) or 2 (stderr).
    pub(super) worker: (Slot, Pid, u8),
    /// `[w<slot> <pid>] `, or empty.
    pub(super) prefix: Vec<u8>,
    /// The start of a line whose newline has not arrived yet (at most MAX_LINE bytes).
    pub(super) partial: Vec<u8>,
    pub(super) closed: bool,
    /// The worker's last lines, shared with the edge.
    pub(super) tail: Option<Tail>,
}

/// Lines collected for one write.
#[derive(Default)]
pub(super) struct Out {
    pub(super) buf: Vec<u8>,
    pub(super) lines: u64,
    pub(super) split: u64,
}

impl Out {
    pub(super) fn line(&mut self, prefix: &[u8], head: &[u8], tail: &[u8]) {
        self.buf.extend_from_slice(prefix);
        self.buf.extend_from_slice(head);
        self.buf.extend_from_slice(tail);
        self.buf.push(b'\n');
        self.lines += 1;
    }
}

impl Pipe {
    /// Cuts `data` (the next bytes of this stream) into lines for `out`; keeps
    /// an unfinished last line for later.
    pub(super) fn consume(&mut self, mut data: &[u8], out: &mut Out) {
        loop {
            let room = MAX_LINE - self.partial.len();
            // One byte past the room: a line of exactly MAX_LINE bytes is not cut.
            let window = &data[..data.len().min(room + 1)];
            if let Some(i) = memchr::memchr(b'\n', window) {
                self.keep(&data[..i]);
                out.line(&self.prefix, &self.partial, &data[..i]);
                self.clear_partial();
                data = &data[i + 1..];
            } else if window.len() > room {
                self.keep(&data[..room]);
                out.line(&self.prefix, &self.partial, &data[..room]);
                out.split += 1;
                self.clear_partial();
                data = &data[room..];
            } else {
                self.partial.extend_from_slice(data);
                return;
            }
        }
    }

    /// End of stream: an unfinished last line is written with a newline added.
    pub(super) fn finish(&mut self, out: &mut Out) {
        if !self.partial.is_empty() {
            self.keep(&[]);
            out.line(&self.prefix, &self.partial, &[]);
            self.clear_partial();
        }
        self.closed = true;
    }

    /// The line `partial` + `rest` is complete: the tail keeps (the start of) it.
    fn keep(&self, rest: &[u8]) {
        let Some(tail) = &self.tail else { return };
        if self.partial.is_empty() {
            return tail.push(rest);
        }
        let bound = super::tail::TAIL_LINE_MAX + 4;
        let mut line = self.partial[..self.partial.len().min(bound)].to_vec();
        line.extend_from_slice(&rest[..rest.len().min(bound.saturating_sub(line.len()))]);
        tail.push(&line);
    }

    pub(super) fn clear_partial(&mut self) {
        if self.partial.capacity() > 8 * 1024 {
            self.partial = Vec::new();
        } else {
            self.partial.clear();
        }
    }
}

/// A write failure that lasts until a write succeeds again.
pub(super) struct Incident {
    pub(super) lost: u64,
    pub(super) since: Instant,
}

/// One destination, owned by its thread.
pub(super) struct Sink {
    pub(super) dest: Dest,
    pub(super) file: File,
    /// The largest single write: unbounded for regular files, else ATOMIC_WRITE.
    pub(super) piece: usize,
    pub(super) incident: Option<Incident>,
    pub(super) stats: Arc<LogStats>,
}

impl Sink {
    pub(super) fn new(dest: Dest, file: File, stats: Arc<LogStats>) -> Sink {
        let piece = piece_for(&file);
        Sink {
            dest,
            file,
            piece,
            incident: None,
            stats,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>, wake: File) {
        let mut pipes: Vec<Pipe> = Vec::new();
        let mut out = Out::default();
        let mut scratch = vec![0u8; READ_CHUNK];
        let mut stopping = false;
        let mut ready: Vec<bool> = Vec::new();
        let mut syncs = Vec::new();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Command::Attach(p)) => pipes.push(p),
                    Ok(Command::Sync(done)) => syncs.push(done),
                    Ok(Command::Reopen(done)) => {
                        let _ = done.send(self.reopen());
                    }
                    Ok(Command::Pause(ack)) => {
                        self.flush(&mut out);
                        let _ = ack.send(());
                        loop {
                            match rx.recv() {
                                Ok(Command::Resume) => break,
                                Ok(Command::Handover(reply)) => {
                                    let _ = reply.send(Handed {
                                        file: self.file,
                                        pipes,
                                    });
                                    return;
                                }
                                Ok(Command::Attach(p)) => pipes.push(p),
                                // Answered once resumed (or dropped by a
                                // handover: the waiter then stops waiting).
                                Ok(Command::Sync(done)) => syncs.push(done),
                                Ok(Command::Reopen(done)) => {
                                    let _ = done.send(self.reopen());
                                }
                                Ok(Command::Pause(ack)) => {
                                    let _ = ack.send(());
                                }
                                Ok(Command::Shutdown) | Err(_) => {
                                    stopping = true;
                                    break;
                                }
                            }
                        }
                    }
                    Ok(Command::Resume | Command::Handover(_)) => {}
                    Ok(Command::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if !syncs.is_empty() {
                self.read_all(&mut pipes, &mut out, &mut scratch);
                pipes.retain(|p| !p.closed);
                for done in syncs.drain(..) {
                    let _ = done.send(());
                }
            }
            let timeout = if stopping {
                PollTimeout::ZERO
            } else {
                PollTimeout::NONE
            };
            let mut fds: Vec<PollFd<'_>> = std::iter::once(&wake)
                .chain(pipes.iter().map(|p| &p.file))
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // Cannot happen with valid fds; do not spin if it does.
                    error!(path = %self.dest, error = %e, "poll on worker pipes failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            ready.clear();
            ready.extend(
                fds.iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty())),
            );
            drop(fds);
            if ready[0] {
                let mut drain = [0u8; 64];
                while matches!((&wake).read(&mut drain), Ok(n) if n > 0) {}
            }
            let mut busy = false;
            for (p, _) in pipes.iter_mut().zip(&ready[1..]).filter(|(_, r)| **r) {
                match (&p.file).read(&mut scratch) {
                    Ok(0) => p.finish(&mut out),
                    Ok(n) => p.consume(&scratch[..n], &mut out),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => {
                        warn!(path = %self.dest, error = %e, "reading a worker pipe failed; closing it");
                        p.finish(&mut out);
                    }
                }
                busy = true;
                if out.buf.len() >= FLUSH_AT {
                    self.flush(&mut out);
                }
            }
            self.flush(&mut out);
            pipes.retain(|p| !p.closed);
            if stopping && !busy {
                break;
            }
        }
        for p in &mut pipes {
            p.finish(&mut out);
        }
        self.flush(&mut out);
    }

    /// Reads every pipe until it is empty (at most 16 chunks each: a
    /// worker that writes without pause cannot hold the thread) and writes
    /// the lines.
    fn read_all(&mut self, pipes: &mut [Pipe], out: &mut Out, scratch: &mut [u8]) {
        for p in pipes.iter_mut().filter(|p| !p.closed) {
            for _ in 0..16 {
                match (&p.file).read(scratch) {
                    Ok(0) => {
                        p.finish(out);
                        break;
                    }
                    Ok(n) => p.consume(&scratch[..n], out),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        warn!(path = %self.dest, error = %e, "reading a worker pipe failed; closing it");
                        p.finish(out);
                        break;
                    }
                }
                if out.buf.len() >= FLUSH_AT {
                    self.flush(out);
                }
            }
        }
        self.flush(out);
    }

    /// Writes the collected lines; on an error drops the rest and counts it.
    pub(super) fn flush(&mut self, out: &mut Out) {
        if out.buf.is_empty() {
            return;
        }
        let (mut written, result) = self.write_out(&out.buf);
        if result.is_err() {
            // A short write (a full disk) may have cut a line: take its
            // head back, so the next line written does not glue onto it.
            written = self.unwrite_partial(&out.buf[..written]);
        }
        let lost = match &result {
            Ok(()) => 0,
            Err(_) => out.buf[written..].iter().filter(|&&b| b == b'\n').count() as u64,
        };
        let s = &self.stats;
        LogStats::add(&s.lines_written, out.lines - lost);
        LogStats::add(&s.bytes_written, written as u64);
        LogStats::add(&s.lines_split, out.split);
        match result {
            Ok(()) => {
                if let Some(i) = self.incident.take() {
                    warn!(path = %self.dest, lines_lost = i.lost, after = ?i.since.elapsed(), "writing worker output works again");
                }
            }
            Err(e) => {
                LogStats::add(&s.write_errors, 1);
                LogStats::add(&s.lines_lost, lost);
                match &mut self.incident {
                    Some(i) => i.lost += lost,
                    None => {
                        error!(path = %self.dest, error = %e, lines_lost = lost, "cannot write worker output; dropping lines until writing works again");
                        self.incident = Some(Incident {
                            lost,
                            since: Instant::now(),
                        });
                    }
                }
            }
        }
        out.buf.clear();
        out.lines = 0;
        out.split = 0;
    }

    /// `written` went out and ends inside a line: truncates a regular file
    /// back to the end of its last whole line (holdfast is its only writer;
    /// it appends); returns how much of `written` stays. Anything else (a
    /// pipe, a tty) cannot be taken back: it gets the line's end now.
    pub(super) fn unwrite_partial(&mut self, written: &[u8]) -> usize {
        let whole = memchr::memrchr(b'\n', written).map_or(0, |i| i + 1);
        let partial = (written.len() - whole) as u64;
        if partial == 0 {
            return written.len();
        }
        let truncated = self
            .file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| {
                let len = m.len().checked_sub(partial)?;
                self.file.set_len(len).ok()
            });
        if truncated.is_some() {
            return whole;
        }
        // The head stays; end it so the next line starts on its own.
        let _ = self.file.write(b"\n");
        written.len()
    }

    /// Writes `buf` (whole lines) in pieces of at most `self.piece` bytes cut
    /// at line ends; returns how much was written and how it ended.
    pub(super) fn write_out(&mut self, buf: &[u8]) -> (usize, io::Result<()>) {
        let mut done = 0;
        while done < buf.len() {
            let end = piece_end(buf, done, self.piece);
            match self.file.write(&buf[done..end]) {
                Ok(0) => return (done, Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Someone made our stdout non-blocking: wait until it takes more.
                    let mut fd = [PollFd::new(self.file.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fd, PollTimeout::NONE);
                }
                Err(e) => return (done, Err(e)),
            }
        }
        (done, Ok(()))
    }

    pub(super) fn reopen(&mut self) -> Result<Option<PathBuf>, String> {
        let Dest::File(path) = &self.dest else {
            return Ok(None);
        };
        let mode = self
            .file
            .metadata()
            .map_or(CREATE_MODE, |m| m.permissions().mode() & 0o7777);
        match open_log(path, mode) {
            Ok(f) => {
                self.piece = piece_for(&f);
                self.file = f;
                LogStats::add(&self.stats.reopens, 1);
                info!(path = %path.display(), "log file reopened");
                Ok(Some(path.clone()))
            }
            Err(e) => {
                LogStats::add(&self.stats.reopen_failures, 1);
                error!(path = %path.display(), error = %e, "cannot reopen the log file; still writing to the old one");
                Err(format!(
                    "reopen {}: {e} (still writing to the old file)",
                    path.display()
                ))
            }
        }
    }
}

/// Where the write that starts at `buf[done..]` ends: the whole rest if it
/// fits in `piece` bytes, else after the last newline within `piece` bytes,
/// else (one line longer than a piece) after that line's newline.
pub(super) fn piece_end(buf: &[u8], done: usize, piece: usize) -> usize {
    if buf.len() - done <= piece {
        return buf.len();
    }
    let window = &buf[done..done + piece];
    match memchr::memrchr(b'\n', window) {
        Some(i) => done + i + 1,
        // One line longer than a piece: it goes in one write.
        None => memchr::memchr(b'\n', &buf[done..]).map_or(buf.len(), |i| done + i + 1),
    }
}

pub(super) fn piece_for(file: &File) -> usize {
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => usize::MAX,
        _ => ATOMIC_WRITE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn pipe(prefix: &str) -> Pipe {
        let file = File::open("/dev/null").expect("open /dev/null");
        Pipe {
            file,
            worker: (Slot(0), Pid(1), 1),
            prefix: prefix.as_bytes().to_vec(),
            partial: Vec::new(),
            closed: false,
            tail: None,
        }
    }

    pub(super) fn lines(out: &Out) -> Vec<String> {
        String::from_utf8_lossy(&out.buf)
            .split_inclusive('\n')
            .map(str::to_string)
            .collect()
    }

    #[test]
    pub(super) fn whole_lines_only_and_partial_carried() {
        let mut p = pipe("[w0 1] ");
        let mut out = Out::default();
        p.consume(b"a\nbb\ncc", &mut out);
        assert_eq!(lines(&out), ["[w0 1] a\n", "[w0 1] bb\n"]);
        p.consume(b"c\n\nd", &mut out);
        assert_eq!(
            lines(&out),
            ["[w0 1] a\n", "[w0 1] bb\n", "[w0 1] ccc\n", "[w0 1] \n"]
        );
        p.finish(&mut out);
        assert_eq!(lines(&out)[4], "[w0 1] d\n");
        assert_eq!(out.lines, 5);
        assert!(p.closed);
    }

    #[test]
    pub(super) fn long_lines_are_cut_at_the_bound() {
        let mut p = pipe("");
        let mut out = Out::default();
        // Exactly MAX_LINE then a newline: not cut, even across reads.
        let exact = vec![b'x'; MAX_LINE];
        p.consume(&exact[..10], &mut out);
        p.consume(&exact[10..], &mut out);
        p.consume(b"\n", &mut out);
        assert_eq!(out.lines, 1);
        assert_eq!(out.split, 0);
        assert_eq!(out.buf.len(), MAX_LINE + 1);
        // MAX_LINE + 5: one cut line, then the 5 left as a line of their own.
        let mut out = Out::default();
        let mut long = vec![b'y'; MAX_LINE + 5];
        long.push(b'\n');
        p.consume(&long[..3], &mut out);
        p.consume(&long[3..], &mut out);
        assert_eq!(out.split, 1);
        assert_eq!(
            lines(&out).iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE + 1, 6]
        );
        // Three bounds' worth with no newline at all: cut without waiting for one.
        let mut out = Out::default();
        p.consume(&vec![b'z'; 3 * MAX_LINE], &mut out);
        assert_eq!(out.split, 2);
        assert_eq!(p.partial.len(), MAX_LINE);
        p.finish(&mut out);
        assert_eq!(out.lines, 3);
    }

    #[test]
    pub(super) fn writes_to_a_pipe_are_cut_at_line_ends() {
        // 20 lines of 1000 bytes into a pipe: writes of at most PIPE_BUF
        // bytes (so none is split by a concurrent writer), each ending at a
        // line end.
        let mut buf = Vec::new();
        for _ in 0..20 {
            buf.extend_from_slice(&[b'q'; 999]);
            buf.push(b'\n');
        }
        let mut pieces = Vec::new();
        let mut done = 0;
        while done < buf.len() {
            let end = piece_end(&buf, done, ATOMIC_WRITE);
            pieces.push(end - done);
            assert_eq!(
                buf[end - 1],
                b'\n',
                "a write that ends inside a line: {pieces:?}"
            );
            done = end;
        }
        let full = ATOMIC_WRITE / 1000 * 1000;
        let mut want = vec![full; 20_000 / full];
        if 20_000 % full > 0 {
            want.push(20_000 % full);
        }
        assert_eq!(pieces, want);
        // One line longer than a piece goes in one write, with its newline.
        let long = [&[b'x'; 5000][..], b"\nab\n"].concat();
        assert_eq!(piece_end(&long, 0, ATOMIC_WRITE), 5001);
        assert_eq!(piece_end(&long, 5001, ATOMIC_WRITE), long.len());
        assert_eq!(piece_end(b"no newline at all", 0, 4), 17);

        // And through a real pipe, every byte arrives.
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
        let mut sink = Sink::new(Dest::Stdout, File::from(w), Arc::default());
        assert_eq!(sink.piece, ATOMIC_WRITE);
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = File::from(r).read_to_end(&mut v);
            v
        });
        let mut out = Out::default();
        let mut p = pipe("");
        for _ in 0..20 {
            p.consume(&[b'q'; 999], &mut out);
            p.consume(b"\n", &mut out);
        }
        sink.flush(&mut out);
        drop(sink);
        assert_eq!(reader.join().expect("reader"), buf);
    }
}
