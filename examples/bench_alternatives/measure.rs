//! One measured run (a contender under load, restarted N times), the
//! supervisor's CPU and memory while it runs, and the table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::contenders::{Instance, Kind, SupProbe};
use crate::load::{Load, LoadReport, LoadSpec, Target};
use crate::procs;

/// How the clients use their connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Variant {
    /// One request per connection (`Connection: close`).
    Close,
    /// HTTP/1.1 keep-alive, as long as the server keeps the connection.
    Keepalive,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Close => "close",
            Variant::Keepalive => "keep-alive",
        }
    }
}

/// The knobs of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub connections: usize,
    pub restarts: usize,
    /// Load with no restart before the first one: the baseline.
    pub baseline: Duration,
    /// Pause after each restart before the next one, and after the last.
    pub settle: Duration,
    pub request_timeout: Duration,
    /// Per-request sleep in the app, in ms.
    pub sleep_ms: u64,
    /// A client's pause after a failed request.
    pub fail_pause: Duration,
}

/// CPU and memory of the supervisor's processes over one run.
#[derive(Debug, Clone)]
pub enum Usage {
    /// The contender has no supervisor (a server bound directly).
    NoSupervisor,
    /// No sample could be read (the pids were never found).
    Failed,
    Read {
        cpu: Duration,
        rss_max_kib: u64,
        wall: Duration,
    },
}

/// Samples the supervisor's pids every 200 ms on a thread of its own.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Usage>,
}

impl Sampler {
    fn start(probe: SupProbe) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || sample(&probe, &flag));
        Sampler { stop, handle }
    }

    fn finish(self) -> Usage {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or(Usage::Failed)
    }
}

fn sample(probe: &SupProbe, stop: &AtomicBool) -> Usage {
    if matches!(probe, SupProbe::None) {
        return Usage::NoSupervisor;
    }
    let started = Instant::now();
    let hz = procs::ticks_per_sec();
    let page_kib = procs::page_bytes() / 1024;
    // pid -> (ticks at first sight, last ticks); pids seen at the first
    // sample count from then, later ones (born during the run) from 0.
    let mut ticks: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
    let mut rss_max = 0;
    let mut first = true;
    let mut read_any = false;
    loop {
        let mut rss = 0;
        for pid in probe.pids() {
            if let Some(st) = procs::stat(pid) {
                read_any = true;
                rss += st.rss_pages * page_kib;
                let base = if first { st.cpu_ticks } else { 0 };
                ticks
                    .entry(pid)
                    .and_modify(|e| e.1 = st.cpu_ticks)
                    .or_insert((base, st.cpu_ticks));
            }
        }
        first = false;
        rss_max = rss_max.max(rss);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200)); // a sampling period, not synchronisation
    }
    if !read_any {
        return Usage::Failed;
    }
    let used: u64 = ticks.values().map(|(a, b)| b.saturating_sub(*a)).sum();
    Usage::Read {
        cpu: Duration::from_millis(used * 1000 / hz),
        rss_max_kib: rss_max,
        wall: started.elapsed(),
    }
}

/// What one run of one contender saw.
pub struct Run {
    pub kind: Kind,
    pub variant: Variant,
    pub round: usize,
    pub report: LoadReport,
    /// (trigger, done) of each restart, since the load started.
    pub windows: Vec<(Duration, Duration)>,
    pub usage: Usage,
    /// Log lines lost (the log rows only).
    pub lost_lines: Option<Result<u64, String>>,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
}

impl Run {
    /// OK latencies (ms) of requests that finished before the first restart.
    pub fn baseline_ms(&self) -> Vec<f64> {
        let first = self.windows.first().map_or(Duration::MAX, |w| w.0);
        self.ok_samples()
            .filter(|(_, end)| *end < first)
            .map(|(lat, _)| lat)
            .collect()
    }

    /// OK latencies (ms) of requests in flight at any time between a
    /// restart's trigger and 500 ms after it was done.
    pub fn during_ms(&self) -> Vec<f64> {
        let tail = Duration::from_millis(500);
        self.ok_samples()
            .filter(|(lat, end)| {
                let start = end.saturating_sub(Duration::from_secs_f64(lat / 1000.0));
                self.windows
                    .iter()
                    .any(|(t, d)| start <= *d + tail && *end >= *t)
            })
            .map(|(lat, _)| lat)
            .collect()
    }

    /// (latency ms, finished at) of each OK request.
    pub fn ok_samples(&self) -> impl Iterator<Item = (f64, Duration)> + '_ {
        self.report
            .timeline
            .iter()
            .filter_map(|s| s.outcome.ok().map(|l| (l.as_secs_f64() * 1000.0, s.ended)))
    }
}

fn spec(port: u16, variant: Variant, plan: &Plan, bound: Duration) -> LoadSpec {
    let mut s = LoadSpec::new(Target::local(port));
    s.connections = plan.connections;
    s.keepalive = variant == Variant::Keepalive;
    s.path = format!("/?sleep={}", plan.sleep_ms);
    s.max_duration = bound;
    s.max_requests = u64::MAX / 2;
    s.request_timeout = plan.request_timeout;
    s.fail_pause = plan.fail_pause;
    s
}

/// Starts `kind`, loads it, restarts it `plan.restarts` times, stops it.
/// Any failure of the contender itself (start, a restart) ends the run early
/// and is kept in `error`; the load's report covers what ran.
pub fn run(
    kind: Kind,
    variant: Variant,
    round: usize,
    plan: &Plan,
    env: &crate::contenders::Env,
) -> Run {
    let mut inst = match Instance::start(kind, env) {
        Ok(i) => i,
        Err(e) => {
            return Run {
                kind,
                variant,
                round,
                report: Load::start(spec(1, variant, plan, Duration::ZERO)).finish(),
                windows: vec![],
                usage: Usage::Failed,
                lost_lines: None,
                error: Some(format!("{e:#}")),
            }
        }
    };
    // Warm-up (not counted): the first requests of a Ruby or Python app are slow.
    let _ = Load::start(spec(inst.port, variant, plan, Duration::from_secs(1))).finish();

    let sampler = Sampler::start(inst.sup_probe());
    let bound =
        plan.baseline + (plan.settle + Duration::from_secs(100)) * (plan.restarts as u32 + 1);
    let t0 = Instant::now();
    let load = Load::start(spec(inst.port, variant, plan, bound));
    pace(t0, plan.baseline);
    let mut windows = Vec::new();
    let mut error = None;
    for i in 1..=plan.restarts {
        let trigger = t0.elapsed();
        match inst.restart(round * 100 + i) {
            Ok(()) => windows.push((trigger, t0.elapsed())),
            Err(e) => {
                error = Some(format!("{e:#}"));
                break;
            }
        }
        // A contender may call a restart done before its new workers serve
        // (Gunicorn, Server::Starter): the next one waits until the clients
        // have finished another `connections` requests, then `settle`.
        let n0 = load.requests_so_far();
        let served =
            procs::wait_until("the server to serve again", Duration::from_secs(60), || {
                load.requests_so_far() >= n0 + plan.connections as u64
            });
        if let Err(e) = served {
            error = Some(format!("{e:#}"));
            break;
        }
        pace(t0, t0.elapsed() + plan.settle);
    }
    let report = load.stop();
    let usage = sampler.finish();
    let lost_lines = inst.finish().map(|r| r.map_err(|e| format!("{e:#}")));
    Run {
        kind,
        variant,
        round,
        report,
        windows,
        usage,
        lost_lines,
        error,
    }
}

/// Sleeps until `t0 + at`: pacing the load's phases, not synchronisation.
fn pace(t0: Instant, at: Duration) {
    if let Some(left) = at.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
}

/// Nearest-rank percentile; None when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.saturating_sub(1).min(v.len() - 1)])
}

/// One row of the table: every round of one contender and variant.
pub struct Row<'a> {
    pub kind: Kind,
    pub variant: Variant,
    pub runs: Vec<&'a Run>,
}

impl Row<'_> {
    fn failures(&self, kinds: &[&str]) -> u64 {
        self.runs
            .iter()
            .map(|r| kinds.iter().map(|k| r.report.count(k)).sum::<u64>())
            .sum()
    }

    fn all<T>(&self, f: impl Fn(&Run) -> Vec<T>) -> Vec<T> {
        self.runs.iter().flat_map(|r| f(r)).collect()
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    })
}

/// Prints the table, one row per contender and variant, rounds pooled.
pub fn table(rows: &[Row<'_>]) -> String {
    let mut out = String::new();
    let head = [
        "contender",
        "conns",
        "requests",
        "refused",
        "reset",
        "5xx",
        "timeout",
        "other",
        "p99 ms",
        "max ms",
        "p99 restart/base",
        "restart s (med/max)",
        "sup RSS MiB",
        "sup CPU",
        "lost lines",
    ];
    out.push_str(&format!("| {} |\n", head.join(" | ")));
    out.push_str(&format!(
        "|{}\n",
        head.iter()
            .enumerate()
            .map(|(i, _)| if i < 2 { "---|" } else { "---:|" })
            .collect::<String>()
    ));
    for row in rows {
        let requests: u64 = row
            .runs
            .iter()
            .map(|r| r.report.ok + r.report.failed())
            .sum();
        let all_ok = row.all(|r| r.ok_samples().map(|(l, _)| l).collect());
        let base = row.all(Run::baseline_ms);
        let during = row.all(Run::during_ms);
        let ratio = match (percentile(&during, 99.0), percentile(&base, 99.0)) {
            (Some(d), Some(b)) if b > 0.0 => format!("{:.2}", d / b),
            _ => "n/a".into(),
        };
        let mut walls: Vec<f64> = row.all(|r| {
            r.windows
                .iter()
                .map(|(t, d)| (*d - *t).as_secs_f64())
                .collect()
        });
        walls.sort_by(f64::total_cmp);
        let walls_s = if walls.is_empty() {
            "n/a".into()
        } else {
            format!(
                "{:.2} / {:.2}",
                walls[walls.len() / 2],
                walls[walls.len() - 1]
            )
        };
        let (rss, cpu) = usage_cells(&row.runs);
        let lost = lost_cell(&row.runs);
        let cells = [
            row.kind.label().to_string(),
            row.variant.name().to_string(),
            requests.to_string(),
            row.failures(&["refused"]).to_string(),
            row.failures(&["reset"]).to_string(),
            row.failures(&["5xx"]).to_string(),
            row.failures(&["timeout"]).to_string(),
            row.failures(&["short_body", "other_status", "other"])
                .to_string(),
            ms(percentile(&all_ok, 99.0)),
            ms(all_ok.iter().cloned().reduce(f64::max)),
            ratio,
            walls_s,
            rss,
            cpu,
            lost,
        ];
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

/// Supervisor RSS (max over the rounds) and CPU (% of one core over the
/// rounds' wall time). "failed" when it could not be read, never 0.
fn usage_cells(runs: &[&Run]) -> (String, String) {
    let mut rss = 0;
    let mut cpu = Duration::ZERO;
    let mut wall = Duration::ZERO;
    let mut none = false;
    let mut failed = false;
    for r in runs {
        match &r.usage {
            Usage::NoSupervisor => none = true,
            Usage::Failed => failed = true,
            Usage::Read {
                cpu: c,
                rss_max_kib,
                wall: w,
            } => {
                rss = rss.max(*rss_max_kib);
                cpu += *c;
                wall += *w;
            }
        }
    }
    if none {
        return ("none".into(), "none".into());
    }
    if failed || wall.is_zero() {
        return ("read failed".into(), "read failed".into());
    }
    (
        format!("{:.1}", rss as f64 / 1024.0),
        format!("{:.1}%", 100.0 * cpu.as_secs_f64() / wall.as_secs_f64()),
    )
}

fn lost_cell(runs: &[&Run]) -> String {
    let mut total = 0;
    for r in runs {
        match &r.lost_lines {
            None => return "–".into(),
            Some(Err(_)) => return "count failed".into(),
            Some(Ok(n)) => total += n,
        }
    }
    total.to_string()
}
