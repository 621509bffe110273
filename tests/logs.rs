//! holdfast owns the workers' stdout and stderr: lines go to the files whole,
//! none lost, and log rotation (rename + reopen, by SIGUSR1, by `holdfast
//! reopen-logs`, by the real logrotate) never touches a worker.
//!
//! Every test has test workers print numbered lines flat out
//! (`w<slot> <pid> <seq> xxx...`, padded to LINE_BYTES) and, when drained,
//! `w<slot> <pid> done <last seq>`; [`Lines::check`] then proves that the
//! union of the files holds each line exactly once, whole, in order per
//! worker.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http_get, wait_until, Holdfast, Load, LoadSpec, DEADLINE};
use nix::sys::signal::Signal;

/// `--log-line-bytes`: every numbered line is exactly this long, newline included.
const LINE_BYTES: usize = 120;

/// How many times the rotation tests rename and reopen.
const REOPENS: usize = 20;

/// A config with `workers` test workers printing lines flat out, and `logs`
/// as its `[logs]` table.
fn config(workers: u32, extra_worker_args: &str, app_extra: &str, logs: &str) -> String {
    format!(
        r#"
[[listen]]
address = "127.0.0.1:{{port}}"

[app]
command = ["{{test_worker}}", "--log-forever", "--log-line-bytes", "{LINE_BYTES}", "--lame-duck-ms", "200" {extra_worker_args}]
workers = {workers}
ready = "notify"
{app_extra}

[logs]
{logs}
"#
    )
}

/// A directory for the log files, made before holdfast starts (it opens
/// them at start) and apart from the harness's own `{dir}/holdfast.log`.
fn logs_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("holdfast-logs-")
        .tempdir()
        .expect("tempdir");
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).expect("mkdir logs");
    (dir, logs)
}

/// What the files said about one worker.
#[derive(Debug, Default)]
struct WorkerLines {
    slot: u32,
    /// The last sequence number seen (0: none yet).
    last: u64,
    /// `done N` seen.
    done: Option<u64>,
    partial: bool,
}

/// The union of the captured output, checked line by line.
#[derive(Debug, Default)]
struct Lines {
    workers: BTreeMap<u32, WorkerLines>,
    /// Lines per source (file) in the order given.
    per_source: Vec<(String, u64)>,
    other: u64,
    /// `test-worker <pid>: USR1` lines: the worker got SIGUSR1.
    usr1: u64,
}

impl Lines {
    /// Checks `sources` (name, bytes) in order: every byte belongs to a whole
    /// line; each numbered line is the next of its worker; `prefix` says
    /// whether lines begin with `[w<slot> <pid>] `.
    fn check(sources: &[(String, Vec<u8>)], prefix: bool) -> Lines {
        let mut all = Lines::default();
        for (name, bytes) in sources {
            let mut count = 0;
            if !bytes.is_empty() {
                assert_eq!(
                    bytes.last(),
                    Some(&b'\n'),
                    "{name} ends in the middle of a line"
                );
            }
            for (no, raw) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
                let line = std::str::from_utf8(&raw[..raw.len() - 1])
                    .unwrap_or_else(|_| panic!("{name}:{}: not UTF-8: {raw:?}", no + 1));
                all.line(line, prefix)
                    .unwrap_or_else(|e| panic!("{name}:{}: {e}: {line:?}", no + 1));
                count += 1;
            }
            all.per_source.push((name.clone(), count));
        }
        all
    }

    fn line(&mut self, line: &str, prefix: bool) -> Result<(), String> {
        let (label, body) = if prefix {
            let rest = line.strip_prefix("[w").ok_or("no [w prefix")?;
            let (label, body) = rest.split_once("] ").ok_or("no ] in the prefix")?;
            let (slot, pid) = label.split_once(' ').ok_or("bad prefix")?;
            (Some((num(slot)?, num(pid)?)), body)
        } else {
            (None, line)
        };
        if body.starts_with("test-worker") {
            // The worker's own chatter on stderr.
            self.other += 1;
            if body.ends_with(": USR1") {
                self.usr1 += 1;
            }
            return Ok(());
        }
        let mut f = body.splitn(4, ' ');
        let slot = num(f
            .next()
            .and_then(|s| s.strip_prefix('w'))
            .ok_or("no w<slot>")?)?;
        let pid = num(f.next().ok_or("no pid")?)?;
        if let Some(l) = label {
            if l != (slot, pid) {
                return Err(format!("prefix {l:?} does not match the line's worker"));
            }
        }
        let w = self.workers.entry(pid as u32).or_default();
        w.slot = slot as u32;
        if w.partial {
            return Err("a line after the partial last line".into());
        }
        match (f.next(), f.next()) {
            (Some("done"), Some(n)) => {
                let n = num(n)?;
                if w.done.is_some() || n != w.last {
                    return Err(format!("done {n} after seq {} (done {:?})", w.last, w.done));
                }
                w.done = Some(n);
            }
            (Some("partial"), None) => w.partial = true,
            (Some(seq), Some(pad)) => {
                let seq = num(seq)?;
                if w.done.is_some() {
                    return Err("a numbered line after done".into());
                }
                if seq != w.last + 1 {
                    return Err(format!(
                        "seq {seq} after {}: lost, repeated or out of order",
                        w.last
                    ));
                }
                if body.len() != LINE_BYTES - 1 || pad.bytes().any(|b| b != b'x') {
                    return Err(format!("torn: {} bytes", body.len()));
                }
                w.last = seq;
            }
            _ => return Err("not a worker line".into()),
        }
        Ok(())
    }

    /// Panics unless every worker in `pids` printed lines and its `done` line.
    fn assert_complete(&self, pids: &[u32]) {
        for pid in pids {
            let w = self
                .workers
                .get(pid)
                .unwrap_or_else(|| panic!("no lines from worker {pid}: {self:#?}"));
            assert!(w.last > 0, "worker {pid} printed no numbered line");
            assert_eq!(
                w.done,
                Some(w.last),
                "worker {pid}: no `done` line (last seq {})",
                w.last
            );
        }
    }

    /// Numbered lines seen, all workers.
    fn total(&self) -> u64 {
        self.workers.values().map(|w| w.last).sum()
    }
}

fn num(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

fn read(path: &Path) -> (String, Vec<u8>) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    (path.display().to_string(), bytes)
}

/// The pids of the `worker spawned` lines in `log`.
fn spawned_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("worker spawned"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|t| t.strip_prefix("pid="))?
                .parse()
                .ok()
        })
        .collect()
}

/// Renames `{dir}/logs/app.log` away and sends SIGUSR1, REOPENS times, each
/// time waiting until holdfast logged the reopen of every sink (`sinks`) and
/// the workers wrote to the new app.log (so every file of the series holds
/// lines). Returns the renamed files in order.
fn rotate_by_rename(h: &Holdfast, logs: &Path, sinks: usize, also: &[&str]) -> Vec<PathBuf> {
    let mut rotated = Vec::new();
    for i in 0..REOPENS {
        wait_until(DEADLINE, "lines in the current app.log", || {
            fs::metadata(logs.join("app.log"))
                .is_ok_and(|m| m.len() > 0)
                .then_some(())
        });
        for name in std::iter::once("app.log").chain(also.iter().copied()) {
            let to = logs.join(format!("{name}.{i}"));
            fs::rename(logs.join(name), &to).expect("rename log");
            rotated.push(to);
        }
        h.signal(Signal::SIGUSR1);
        h.wait_log_count("log file reopened", sinks * (i + 1));
    }
    rotated
}

#[test]
fn every_line_exactly_once_across_20_renames_and_reopens() {
    let (_keep, logs) = logs_dir();
    let app = logs.join("app.log");
    let mut h = Holdfast::start(&config(
        2,
        r#", "--partial-last-line""#,
        "",
        &format!("stdout = {app:?}\nstderr = {app:?}\nprefix = true"),
    ));
    h.wait_log("all workers ready");
    let pids = h.worker_pids();
    assert_eq!(pids.len(), 2);

    let mut files = rotate_by_rename(&h, &logs, 1, &[]);
    let status = status_json(&h);
    assert_eq!(status["counters"]["log_reopens"], REOPENS, "{status:#}");
    assert_eq!(status["counters"]["log_write_errors"], 0, "{status:#}");
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "holdfast exit status");
    files.push(app);

    let sources: Vec<_> = files.iter().map(|f| read(f)).collect();
    let lines = Lines::check(&sources, true);
    lines.assert_complete(&pids);
    for pid in &pids {
        assert!(
            lines.workers[pid].partial,
            "worker {pid}: partial last line not written"
        );
    }
    assert_eq!(lines.usr1, 0, "no reopen_signal, yet a worker got SIGUSR1");
    assert_eq!(h.worker_pids(), pids, "a worker was restarted");
    // Every file of the series holds lines: each rotation split the stream.
    assert_eq!(lines.per_source.len(), REOPENS + 1);
    assert!(
        lines.per_source.iter().all(|(_, n)| *n > 0),
        "the rotations did not split the stream: {:?}",
        lines.per_source
    );
    eprintln!(
        "{} numbered lines in {} files, each once and whole",
        lines.total(),
        files.len()
    );
}

#[test]
fn reopen_under_http_load_fails_no_request_and_restarts_no_worker() {
    let (_keep, logs) = logs_dir();
    let (app, err) = (logs.join("app.log"), logs.join("err.log"));
    let mut h = Holdfast::start(&config(
        2,
        "",
        "",
        &format!("stdout = {app:?}\nstderr = {err:?}\nprefix = false"),
    ));
    h.wait_log("all workers ready");
    let pids = h.worker_pids();

    let load = Load::start(LoadSpec {
        max_duration: Duration::from_secs(15),
        max_requests: 200_000,
        ..LoadSpec::new(h.tcp())
    });
    wait_until(DEADLINE, "requests before the rotations", || {
        (load.requests_so_far() >= 50).then_some(())
    });
    // stdout and stderr are two files here: two sinks, two reopens each time.
    let mut files = rotate_by_rename(&h, &logs, 2, &["err.log"]);
    let before = load.requests_so_far();
    wait_until(DEADLINE, "requests after the rotations", || {
        (load.requests_so_far() >= before + 50).then_some(())
    });
    let report = load.stop();
    report.assert_clean(100);
    assert!(
        report.pids.iter().all(|p| pids.contains(p)),
        "answered by pids {:?}, workers were {pids:?}",
        report.pids
    );
    assert_eq!(h.worker_pids(), pids, "a worker was restarted");

    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "holdfast exit status");
    files.push(app);
    files.push(err);
    // Worker lines are on stdout: check the app.log series in order, and that
    // the err.log series holds only the workers' stderr chatter.
    let (app, err): (Vec<_>, Vec<_>) = files
        .iter()
        .partition(|f| f.to_string_lossy().contains("app.log"));
    let lines = Lines::check(&app.iter().map(|f| read(f)).collect::<Vec<_>>(), false);
    lines.assert_complete(&pids);
    let chatter = Lines::check(&err.iter().map(|f| read(f)).collect::<Vec<_>>(), false);
    assert_eq!(chatter.total(), 0, "numbered lines in err.log");
    assert!(
        chatter.other >= 2,
        "the workers' stderr did not reach err.log"
    );
    eprintln!(
        "{report}{} numbered lines, each once and whole",
        lines.total()
    );
}

#[test]
fn real_logrotate_rotates_and_holdfast_reopens_without_losing_a_line() {
    // holdfast's own log is rotated too, so tracing goes to logs/holdfast.log
    // instead of the harness's log: wait on that file, and stop holdfast
    // explicitly (on a failure the workers go with holdfast: PDEATHSIG).
    let logrotate = which("logrotate");
    let (_keep, logs) = logs_dir();
    let (app, own) = (logs.join("app.log"), logs.join("holdfast.log"));
    let mut h = Holdfast::start(&config(
        2,
        "",
        "",
        &format!("stdout = {app:?}\nstderr = {app:?}\nholdfast_log = {own:?}\nprefix = true"),
    ));
    wait_for_file(&own, "all workers ready", 1);

    // The snippet from units/, paths adapted: its postrotate runs this build's
    // `holdfast reopen-logs --config`, which answers once every file is reopened.
    let snippet = include_str!("../units/holdfast.logrotate");
    let adapted = replace_checked(snippet, "/var/log/app", &logs.to_string_lossy());
    let adapted = replace_checked(&adapted, "create 0640 app adm", "create 0640");
    let adapted = replace_checked(
        &adapted,
        "/usr/bin/holdfast reopen-logs --config /etc/holdfast/app.toml",
        &h.fill("{holdfast} reopen-logs --config {config}"),
    );
    let conf = logs.with_file_name("logrotate.conf");
    fs::write(&conf, adapted).expect("write logrotate.conf");
    let state = logs.with_file_name("logrotate.state");

    let load = Load::start(LoadSpec {
        max_duration: Duration::from_secs(15),
        max_requests: 200_000,
        ..LoadSpec::new(h.tcp())
    });
    wait_until(DEADLINE, "requests before the rotations", || {
        (load.requests_so_far() >= 50).then_some(())
    });
    const ROTATIONS: usize = 3;
    // `notifempty`: an app.log still empty would not be rotated.
    wait_until(DEADLINE, "lines in app.log", || {
        (fs::metadata(&app).ok()?.len() > 0).then_some(())
    });
    for _ in 0..ROTATIONS {
        let out = Command::new(&logrotate)
            .arg("-f")
            .arg("-s")
            .arg(&state)
            .arg(&conf)
            .output()
            .expect("run logrotate");
        assert!(
            out.status.success(),
            "logrotate failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // logrotate created both files empty before the postrotate, and
        // holdfast is their only writer: lines in them mean it reopened.
        wait_for_file(&own, "holdfast's log reopened", 1);
        wait_until(DEADLINE, "lines in the new app.log", || {
            (fs::metadata(&app).ok()?.len() > 0).then_some(())
        });
    }
    let report = load.stop();
    report.assert_clean(100);
    let mode = fs::metadata(&app).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o640, "the file logrotate created");

    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "holdfast exit status");
    // Oldest first: app.log.3.gz, app.log.2.gz (compressed), app.log.1
    // (delaycompress), app.log.
    let series = |name: &str| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = (2..=ROTATIONS)
            .rev()
            .map(|n| {
                let gz = logs.join(format!("{name}.{n}.gz"));
                let out = Command::new("gzip")
                    .arg("-dc")
                    .arg(&gz)
                    .output()
                    .expect("gzip");
                assert!(
                    out.status.success(),
                    "gzip -dc {}: {}; the directory holds {:?}",
                    gz.display(),
                    String::from_utf8_lossy(&out.stderr),
                    fs::read_dir(&logs)
                        .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                );
                (gz.display().to_string(), out.stdout)
            })
            .collect();
        v.push(read(&logs.join(format!("{name}.1"))));
        v.push(read(&logs.join(name)));
        v
    };
    let own_text: String = series("holdfast.log")
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    let lines = Lines::check(&series("app.log"), true);
    let pids = spawned_pids(&own_text);
    assert_eq!(pids.len(), 2, "workers spawned: {pids:?}");
    lines.assert_complete(&pids);
    assert_eq!(
        lines.workers.len(),
        2,
        "lines from more workers than spawned"
    );
    assert!(report.pids.iter().all(|p| pids.contains(p)), "{report}");
    assert_eq!(
        own_text.matches("holdfast's log reopened").count(),
        ROTATIONS,
        "holdfast's own log:\n{own_text}"
    );
    assert!(own_text.contains("holdfast exiting"));
    eprintln!(
        "{report}{} numbered lines, each once and whole",
        lines.total()
    );
}

#[test]
fn reopen_into_a_removed_directory_keeps_the_old_file_and_recovers() {
    let (_keep, logs) = logs_dir();
    let app = logs.join("app.log");
    let mut h = Holdfast::start(&config(
        2,
        "",
        "",
        &format!("stdout = {app:?}\nstderr = {app:?}\nreopen_signal = \"USR1\""),
    ));
    h.wait_log("all workers ready");
    let pids = h.worker_pids();

    // The directory goes away (renamed, so the test can still read the file
    // holdfast keeps writing to).
    let gone = logs.with_file_name("logs.gone");
    fs::rename(&logs, &gone).expect("rename logs dir");
    // `holdfast reopen-logs` takes the same path as SIGUSR1 and answers.
    let reopen = || h.cli(&["reopen-logs", "--config", "{config}"]);
    let out = reopen();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "reopen-logs: {stderr}");
    assert!(
        stderr.contains(&*app.to_string_lossy())
            && stderr.contains("still writing to the old file"),
        "reopen-logs: {stderr}"
    );
    let report = h.wait_log("cannot reopen the log file");
    assert!(report.contains(&*app.to_string_lossy()), "{report}");
    let old = gone.join("app.log");
    let size = fs::metadata(&old).expect("stat").len();
    wait_until(DEADLINE, "lines still going to the old file", || {
        (fs::metadata(&old).ok()?.len() > size).then_some(())
    });

    let usr1_lines = |files: &[&Path]| {
        files
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .map(|t| t.matches(": USR1\n").count())
            .sum::<usize>()
    };
    // Signals of one kind coalesce: let the workers take the first USR1.
    wait_until(DEADLINE, "both workers' USR1 lines", || {
        (usr1_lines(&[&old]) >= 2).then_some(())
    });
    fs::create_dir(&logs).expect("mkdir logs again");
    let out = reopen();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "reopen-logs: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&*app.to_string_lossy()),
        "reopen-logs: {stdout}"
    );
    assert!(
        stdout.contains("sent SIGUSR1 to 2 worker(s)"),
        "reopen-logs: {stdout}"
    );
    h.wait_log("log file reopened");
    wait_until(DEADLINE, "the second USR1 lines", || {
        (usr1_lines(&[&old, &app]) >= 4).then_some(())
    });
    wait_until(DEADLINE, "lines in the new file", || {
        (fs::metadata(&app).ok()?.len() > 0).then_some(())
    });
    let mode = fs::metadata(&app).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o640, "created with the old file's mode");
    assert_eq!(h.log().matches("cannot reopen the log file").count(), 1);

    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "holdfast exit status");
    let lines = Lines::check(&[read(&old), read(&app)], true);
    lines.assert_complete(&pids);
    // reopen_signal: both workers got USR1 on both reopens, failed or not.
    assert_eq!(lines.usr1, 4, "USR1 lines from the workers");
}

#[test]
fn a_stalled_sink_does_not_stall_rollouts() {
    // The workers' output goes to a FIFO that the test reads slowly, then not
    // at all: the pipes fill, the workers block in write(2), and holdfast must
    // still run a SIGHUP rollout to the end.
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("slow.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // Opened before holdfast so its open for writing does not wait.
    let reader_file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open fifo");
    // A writer of our own until holdfast has opened it: without a writer the
    // reader would see end-of-file at once.
    let placeholder = fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open fifo for writing");
    nix::fcntl::fcntl(
        &reader_file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .expect("fifo blocking");
    let reading = Arc::new(AtomicBool::new(true));
    let fast = Arc::new(AtomicBool::new(false));
    let reader = {
        let (reading, fast) = (Arc::clone(&reading), Arc::clone(&fast));
        std::thread::spawn(move || slow_reader(reader_file, &reading, &fast))
    };

    let fifo_s = fifo.to_string_lossy();
    let mut h = Holdfast::start(&config(
        2,
        "",
        r#"drain_timeout = "3s""#,
        &format!("stdout = {fifo_s:?}\nstderr = {fifo_s:?}\nprefix = true"),
    ));
    h.wait_log("all workers ready");
    drop(placeholder);
    let old = h.worker_pids();
    // Stop reading: the sink blocks on the FIFO, the pipes fill.
    reading.store(false, Ordering::SeqCst);
    for pid in &old {
        wait_until(
            DEADLINE,
            "a worker blocked writing to its full pipe",
            || blocked_in_pipe_write(*pid).then_some(()),
        );
    }
    let resp = http_get(&h.tcp(), "/").expect("a request while logs are stalled");
    assert_eq!(resp.status, 200);
    status_json(&h);

    h.signal(Signal::SIGHUP);
    h.wait_log("rollout finished generation=2");
    let new: Vec<u32> = h
        .worker_pids()
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    assert_eq!(new.len(), 2, "new workers: {new:?}");
    status_json(&h);
    let resp = http_get(&h.tcp(), "/").expect("a request after the rollout");
    assert!(
        new.contains(&resp.pid().expect("X-Pid")),
        "answered by {:?}",
        resp.pid()
    );

    // Read again, flat out: everything the workers wrote arrives, whole.
    fast.store(true, Ordering::SeqCst);
    reading.store(true, Ordering::SeqCst);
    h.signal(Signal::SIGTERM);
    assert!(h.wait_exit(DEADLINE).success(), "holdfast exit status");
    let bytes = reader.join().expect("reader thread");
    let lines = Lines::check(&[("fifo".to_string(), bytes)], true);
    // The old workers, stuck in write(2) when drained, may have been killed
    // at drain_timeout: their lines are whole and in order, maybe without
    // `done`. The new ones drained normally.
    lines.assert_complete(&new);
    for pid in &old {
        assert!(
            lines.workers.get(pid).is_some_and(|w| w.last > 0),
            "no lines from {pid}"
        );
    }
}

/// `holdfast status --json`, which must succeed.
fn status_json(h: &Holdfast) -> serde_json::Value {
    let out = h.cli(&["status", "--json", "--config", "{config}"]);
    assert!(
        out.status.success(),
        "status: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Reads the FIFO: 4 KiB per 20 ms while `reading`, nothing while not, flat
/// out once `fast`; returns everything read when the writers are gone (or
/// after 120 s).
fn slow_reader(mut f: fs::File, reading: &AtomicBool, fast: &AtomicBool) -> Vec<u8> {
    let started = Instant::now();
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while started.elapsed() < Duration::from_secs(120) {
        if !reading.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let want = if fast.load(Ordering::SeqCst) {
            buf.len()
        } else {
            4096
        };
        match f.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read fifo: {e}"),
        }
        if !fast.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    all
}

/// Whether a thread of `pid` sleeps in pipe_write (its pipe is full).
fn blocked_in_pipe_write(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|t| fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.contains("pipe_write")))
}

/// Waits until `path` holds `needle` at least `n` times (holdfast's own log).
fn wait_for_file(path: &Path, needle: &str, n: usize) {
    wait_until(
        DEADLINE,
        &format!("{n} × {needle:?} in {}", path.display()),
        || {
            let text = fs::read_to_string(path).ok()?;
            (text.matches(needle).count() >= n).then_some(())
        },
    );
}

fn replace_checked(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "units/holdfast.logrotate no longer has {from:?}"
    );
    text.replace(from, to)
}

/// The path of `cmd` on PATH (sbin included); panics if it is not installed.
fn which(cmd: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file());
    found
        .unwrap_or_else(|| panic!("{cmd} is not installed (tests/run installs the Debian package)"))
}
