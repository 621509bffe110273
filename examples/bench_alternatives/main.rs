//! Benchmark: holdfast against the alternatives, the same app under the same
//! load through every way of restarting it.
//!
//! Each contender serves the same app (a 20 ms `GET /?sleep=20`, answered
//! with its pid: examples/apps/config.ru, app.py, app.psgi, or the test
//! worker) with 2 workers, under 32 client connections (one variant with
//! `Connection: close`, one with keep-alive), and is restarted 5 times its
//! own way. Contenders run interleaved: round 1 runs each once, round 2 runs
//! each again, so a noisy machine hits all alike. It prints one table, the
//! data-path check (the test worker's requests per second behind holdfast ÷
//! bound directly) and writes the figure (examples/bench_alternatives.svg).
//!
//! ```sh
//! cargo build --release --bins && cargo run --release --example bench_alternatives
//! cargo run --release --example bench_alternatives -- --help   # rounds, restarts, --only, ...
//! ```
//!
//! Layout: `contenders` starts, restarts and stops each contender;
//! `measure` runs one under load and builds the table; `plot` draws the
//! figure; `procs` is the process groups and /proc. The load client is the
//! tests' (tests/common/load.rs): it never retries and counts every failure.

#[path = "../bench_common/mod.rs"]
mod bench_common;
mod contenders;
mod kinds;
#[path = "../../tests/common/load.rs"]
#[allow(dead_code)] // the tests' client; the benchmark uses part of it
mod load;
mod measure;
mod plot;
mod procs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use contenders::{Env, Kind};
use measure::{Plan, Row, Run, Variant};

/// holdfast against the alternatives: the same app, the same load, every
/// way of restarting it.
#[derive(Debug, Parser)]
#[command(name = "bench_alternatives")]
struct Opts {
    /// Rounds; each runs every contender once (interleaved).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Restarts per run.
    #[arg(long, default_value_t = 5)]
    restarts: usize,
    /// Seconds of load before the first restart (the baseline).
    #[arg(long, default_value_t = 3.0)]
    baseline: f64,
    /// Seconds of load after each restart before the next (and after the last).
    #[arg(long, default_value_t = 1.0)]
    settle: f64,
    /// Client connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Per-request time in the app, in ms.
    #[arg(long, default_value_t = 20)]
    sleep_ms: u64,
    /// A client's pause after a failed request, in ms (so a server that
    /// refuses is not hammered: failures count requests a client would make).
    #[arg(long, default_value_t = 20)]
    fail_pause_ms: u64,
    /// How long loading the app takes (APP_BOOT_SLEEP_MS of the Ruby,
    /// Python and Perl apps), in ms: a real app's boot, so a restart that
    /// stops before it starts shows its gap.
    #[arg(long, default_value_t = 1000)]
    boot_ms: u64,
    /// Client timeout for connect, write and read, in seconds.
    #[arg(long, default_value_t = 10.0)]
    request_timeout: f64,
    /// Connection variants to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "close,keepalive"
    )]
    variants: Vec<Variant>,
    /// Run only these contenders (ids from --list), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Leave out these contenders.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// List the contenders and exit.
    #[arg(long)]
    list: bool,
    /// Where to write the figure (relative to the crate root).
    #[arg(long, default_value = "examples/bench_alternatives.svg")]
    svg: PathBuf,
    /// Do not write the figure.
    #[arg(long)]
    no_svg: bool,
    /// Seconds per measurement of the data-path check (0: skip it).
    #[arg(long, default_value_t = 3.0)]
    datapath_secs: f64,
    /// Interleaved rounds of the data-path check.
    #[arg(long, default_value_t = 5)]
    datapath_rounds: usize,
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    if opts.list {
        for k in Kind::ALL {
            println!("{:<16} {}", k.id(), k.label());
        }
        return ExitCode::SUCCESS;
    }
    match run(&opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench_alternatives: {e:#}");
            ExitCode::from(exitcode::SOFTWARE as u8)
        }
    }
}

fn selected(opts: &Opts) -> anyhow::Result<Vec<Kind>> {
    for name in opts.only.iter().chain(&opts.skip) {
        if !Kind::ALL.iter().any(|k| k.id() == name) {
            anyhow::bail!("unknown contender {name:?} (see --list)");
        }
    }
    Ok(Kind::ALL
        .into_iter()
        .filter(|k| opts.only.is_empty() || opts.only.iter().any(|n| n == k.id()))
        .filter(|k| !opts.skip.iter().any(|n| n == k.id()))
        .collect())
}

/// Says which Debian package is missing for which contender; false if any is.
fn prerequisites(kinds: &[Kind]) -> bool {
    let mut missing: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for k in kinds {
        for need in k.needs() {
            if (need.present)() {
                continue;
            }
            match missing.iter_mut().find(|m| m.0 == need.package) {
                Some(m) => m.2.push(k.id()),
                None => missing.push((need.package, need.what, vec![k.id()])),
            }
        }
    }
    for (package, what, users) in &missing {
        eprintln!(
            "missing: Debian package {package} ({what} not found), needed by {}",
            users.join(", ")
        );
    }
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|m| m.0).collect();
        eprintln!(
            "install them with:\n  apt-get install -y --no-install-recommends {}\n(or leave those contenders out with --skip)",
            names.join(" ")
        );
    }
    missing.is_empty()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "CPU model: cannot read /proc/cpuinfo".into());
    let nproc = std::thread::available_parallelism().map_or("?".into(), |n| n.to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("?".into(), |s| s.trim().to_string());
    format!("{nproc} CPUs ({cpu}), Linux {kernel}")
}

fn run(opts: &Opts) -> anyhow::Result<ExitCode> {
    let kinds = selected(opts)?;
    if !prerequisites(&kinds) {
        return Ok(ExitCode::from(exitcode::UNAVAILABLE as u8));
    }
    // Both binaries must be built (they assert, naming the cargo command).
    let _ = bench_common::test_worker_bin();
    procs::become_subreaper()?;
    procs::stop_everything_on_interrupt()?;
    let env = Env {
        apps: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/apps"),
        boot_ms: opts.boot_ms,
    };
    let plan = Plan {
        connections: opts.connections,
        restarts: opts.restarts,
        baseline: Duration::from_secs_f64(opts.baseline),
        settle: Duration::from_secs_f64(opts.settle),
        request_timeout: Duration::from_secs_f64(opts.request_timeout),
        sleep_ms: opts.sleep_ms,
        fail_pause: Duration::from_millis(opts.fail_pause_ms),
    };
    let started = Instant::now();
    let load_before = procs::loadavg();
    println!("machine: {}", machine());
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "command: cargo run --release --example bench_alternatives{}",
        if args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", args.join(" "))
        }
    );
    println!(
        "plan: {} rounds x {} contenders x {:?}; {} connections, {} ms requests, {} ms app boot, {} restarts, {} s baseline, {} s settle",
        opts.rounds,
        kinds.len(),
        opts.variants.iter().map(|v| v.name()).collect::<Vec<_>>(),
        plan.connections,
        plan.sleep_ms,
        opts.boot_ms,
        plan.restarts,
        opts.baseline,
        opts.settle
    );
    println!("load average at start: {load_before}");

    let mut runs: Vec<Run> = Vec::new();
    for round in 1..=opts.rounds {
        for &kind in &kinds {
            for &variant in &opts.variants {
                let t = Instant::now();
                let r = measure::run(kind, variant, round, &plan, &env);
                println!(
                    "round {round} {:<16} {:<10} {:>6} requests {:>4} failed {:>5.1}s{}",
                    kind.id(),
                    variant.name(),
                    r.report.ok + r.report.failed(),
                    r.report.failed(),
                    t.elapsed().as_secs_f64(),
                    r.error
                        .as_ref()
                        .map_or(String::new(), |e| format!("  ERROR: {}", first_line(e)))
                );
                runs.push(r);
            }
        }
        println!("load average after round {round}: {}", procs::loadavg());
    }

    let datapath = if opts.datapath_secs > 0.0 {
        Some(datapath_check(opts)?)
    } else {
        None
    };

    let mut rows = Vec::new();
    for &kind in &kinds {
        for &variant in &opts.variants {
            rows.push(Row {
                kind,
                variant,
                runs: runs
                    .iter()
                    .filter(|r| r.kind == kind && r.variant == variant)
                    .collect(),
            });
        }
    }
    println!();
    println!(
        "== {} rounds, interleaved; {} connections, {} ms requests, {} restarts per run; {}",
        opts.rounds,
        plan.connections,
        plan.sleep_ms,
        plan.restarts,
        machine()
    );
    println!(
        "== load average: {load_before} at start, {} at the end; took {:.0} s; a shared box",
        procs::loadavg(),
        started.elapsed().as_secs_f64()
    );
    print!("{}", measure::table(&rows));
    let sups: Vec<String> = kinds
        .iter()
        .map(|k| format!("{}: {}", k.label(), k.supervisor()))
        .collect();
    println!("sup = {}", sups.join("; "));
    if let Some(d) = datapath {
        println!("{d}");
    }
    print_details(&runs);

    if !opts.no_svg {
        let last: Vec<&Run> = rows.iter().filter_map(|r| r.runs.last().copied()).collect();
        let path = if opts.svg.is_absolute() {
            opts.svg.clone()
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&opts.svg)
        };
        let title = format!(
            "Latency of OK requests (blue: max, grey: median per 100 ms; log scale), restarts shaded, failures red; round {}, {}",
            opts.rounds,
            machine()
        );
        plot::write_svg(&path, &last, opts.variants.len(), &title)?;
        println!("figure: {}", path.display());
    }
    let errors = runs.iter().filter(|r| r.error.is_some()).count();
    Ok(if errors > 0 {
        eprintln!("{errors} run(s) ended early: see ERROR above");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// Failure samples and errors, per run that had any.
fn print_details(runs: &[Run]) {
    for r in runs {
        if r.report.failed() == 0 && r.error.is_none() && !matches!(r.lost_lines, Some(Err(_))) {
            continue;
        }
        println!(
            "-- round {} {} {}: {:?}",
            r.round,
            r.kind.id(),
            r.variant.name(),
            r.report.failures
        );
        for s in r.report.failure_samples.iter().take(5) {
            println!("   {s}");
        }
        if let Some(Err(e)) = &r.lost_lines {
            println!("   lost lines: {e}");
        }
        if let Some(e) = &r.error {
            for l in e.lines().take(30) {
                println!("   ! {l}");
            }
        }
    }
}

/// Requests per second of the test worker behind holdfast (1 worker) ÷
/// bound directly (`--bind`), no per-request sleep, interleaved rounds that
/// alternate which goes first; and holdfast's own CPU meanwhile.
fn datapath_check(opts: &Opts) -> anyhow::Result<String> {
    use load::{Load, LoadSpec, Target};
    let secs = Duration::from_secs_f64(opts.datapath_secs);
    let mut out = String::from(
        "\n== data path: the test worker (GET /, no sleep), 1 process, behind holdfast ÷ bound directly\n",
    );
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    for variant in [Variant::Keepalive, Variant::Close] {
        let mut direct = Vec::new();
        let mut held = Vec::new();
        // Clock ticks of holdfast's CPU; None once a read failed.
        let mut holdfast_ticks = Some(0u64);
        // The worker's CPU per request (µs), direct and behind holdfast.
        let mut direct_cost = Vec::new();
        let mut held_cost = Vec::new();
        let mut held_requests = 0;
        for round in 0..opts.datapath_rounds {
            // Alternate which goes first, so a drift in the machine's load
            // does not always favour the same one.
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for behind in order {
                let dir = tempfile::tempdir()?;
                let port = bench_common::free_port();
                let bind = format!("127.0.0.1:{port}");
                let (holdfast, _direct) = if behind {
                    let h = bench_common::Running::start(&format!(
                        "control_socket = \"{{dir}}/holdfast.sock\"\n[[listen]]\naddress = \"{bind}\"\nbacklog = 2048\n[app]\ncommand = [\"{{test_worker}}\"]\nworkers = 1\n"
                    ));
                    procs::remember(procs::Live::Holdfast(h.pid()));
                    (Some(h), None)
                } else {
                    let worker = bench_common::test_worker_bin();
                    let g = procs::Group::spawn(
                        &worker.to_string_lossy(),
                        &["--bind", &bind],
                        dir.path(),
                        &[],
                        dir.path().join("worker.log"),
                    )?;
                    (None, Some(g))
                };
                procs::wait_until("the test worker to answer", Duration::from_secs(30), || {
                    procs::answers(port, "/")
                })?;
                let mut s = LoadSpec::new(Target::local(port));
                s.connections = opts.connections;
                s.keepalive = variant == Variant::Keepalive;
                s.max_duration = secs;
                s.max_requests = u64::MAX / 2;
                let ticks = |h: &bench_common::Running| procs::stat(h.pid()).map(|s| s.cpu_ticks);
                let worker_pid = match (&holdfast, &_direct) {
                    (Some(h), _) => procs::children(h.pid()).first().copied(),
                    (None, Some(g)) => Some(g.pid()),
                    _ => None,
                };
                let worker_ticks = || worker_pid.and_then(procs::stat).map(|s| s.cpu_ticks);
                let w0 = worker_ticks();
                let cpu0 = holdfast.as_ref().map(ticks);
                let r = Load::start(s).finish();
                if let (Some(a), Some(b)) = (w0, worker_ticks()) {
                    let us =
                        (b - a) as f64 * 1e6 / procs::ticks_per_sec() as f64 / r.ok.max(1) as f64;
                    if holdfast.is_some() {
                        held_cost.push(us);
                    } else {
                        direct_cost.push(us);
                    }
                }
                if let (Some(h), Some(c0)) = (&holdfast, cpu0) {
                    holdfast_ticks = match (holdfast_ticks, c0, ticks(h)) {
                        (Some(sum), Some(a), Some(b)) => Some(sum + b.saturating_sub(a)),
                        _ => None,
                    };
                    held_requests += r.ok;
                }
                let rps = r.ok as f64 / r.elapsed.as_secs_f64();
                if r.failed() > 0 {
                    out.push_str(&format!(
                        "   ({} behind={behind}: {} failed: {:?})\n",
                        variant.name(),
                        r.failed(),
                        r.failures
                    ));
                }
                if let Some(h) = holdfast {
                    procs::forget(procs::Live::Holdfast(h.pid()));
                    h.stop();
                    held.push(rps);
                } else {
                    direct.push(rps);
                }
            }
        }
        let ratios: Vec<f64> = held.iter().zip(&direct).map(|(h, d)| h / d).collect();
        let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let cost = if direct_cost.len() == opts.datapath_rounds
            && held_cost.len() == opts.datapath_rounds
        {
            format!(
                "worker CPU per request {:.1} µs direct, {:.1} µs behind holdfast (ratio {:.3})",
                median(&direct_cost),
                median(&held_cost),
                median(&held_cost) / median(&direct_cost)
            )
        } else {
            "worker CPU per request: failed to read".into()
        };
        out.push_str(&format!(
            "{:<10} direct {:>6.0} req/s, behind holdfast {:>6.0} req/s (medians); ratio {:.3} (median; per round {}); {cost}; holdfast CPU {} for {} requests\n",
            variant.name(),
            median(&direct),
            median(&held),
            median(&ratios),
            per_round.join(" "),
            holdfast_ticks.map_or("failed to read".into(), |t| format!(
                "{t} clock ticks ({} ms)",
                t * 1000 / procs::ticks_per_sec()
            )),
            held_requests
        ));
    }
    Ok(out)
}
