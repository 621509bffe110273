//! Honest proxies: nginx and Apache in front of holdfast with their
//! **default retry behaviour** (nginx: one `server` line, no
//! `non_idempotent`; Apache: no `retry=`, no `disablereuse`), their
//! keep-alive pools to the app in use, and POSTs in the load. Every 5xx and
//! every reset counts; none may happen across 20 rollouts.
//!
//! The pool is checked, not assumed: each test runs in a network namespace
//! of its own ([`PrivateNet`]), where the kernel's `Tcp: PassiveOpens` counts
//! every TCP connection accepted. The load client counts the connections it
//! opened to the proxy, so what is left is the proxy's connections to the
//! app; requests minus those is how many requests went over a reused
//! upstream connection.
//!
//! The configs are `examples/nginx.conf` and `examples/apache.conf` with
//! only the listening port and the upstream address replaced (TCP here, so
//! the kernel counts the upstream connections).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::netns::PrivateNet;
use common::proxy::{proxy_dir, require, Proxy};
use common::{wait_until, Holdfast, Load, LoadReport, LoadSpec, Target};
use nix::sys::signal::Signal;

/// Rollouts per test; `HOLDFAST_PROXY_ROLLOUTS=N` runs more, to measure a
/// rate (README, "nginx and Apache in front").
fn rollouts() -> u32 {
    std::env::var("HOLDFAST_PROXY_ROLLOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        .max(20)
}

/// Requests the load finishes after each rollout before the next SIGHUP.
const BETWEEN: u64 = 100;

/// Readiness deadline for a generation of Puma, and any wait including one.
const READY: Duration = Duration::from_secs(90);

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn apps_dir() -> String {
    examples_dir().join("apps").to_string_lossy().into_owned()
}

/// `text` with the one occurrence of `from` replaced; panics otherwise.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    let n = text.matches(from).count();
    assert_eq!(
        n, 1,
        "expected `{from}` exactly once, found {n} times in:\n{text}"
    );
    text.replacen(from, to, 1)
}

/// examples/nginx.conf, listening on the proxy's port, upstream `upstream`
/// (`127.0.0.1:PORT` or `unix:/path`).
fn nginx_site(upstream: &str) -> String {
    let site = fs::read_to_string(examples_dir().join("nginx.conf")).expect("examples/nginx.conf");
    for banned in ["non_idempotent", "proxy_next_upstream_tries", "max_fails"] {
        assert!(
            !site
                .lines()
                .any(|l| !l.trim_start().starts_with('#') && l.contains(banned)),
            "examples/nginx.conf must run nginx with its default retries, and has `{banned}`"
        );
    }
    let site = replace_once(&site, "listen 80;", "listen 127.0.0.1:{port};");
    replace_once(
        &site,
        "server unix:/run/holdfast/app.sock;",
        &format!("server {upstream};"),
    )
}

/// examples/apache.conf on the proxy's port, upstream `url`
/// (`http://127.0.0.1:PORT/` or `unix:/path|http://holdfast/`).
fn apache_site(url: &str) -> String {
    let site =
        fs::read_to_string(examples_dir().join("apache.conf")).expect("examples/apache.conf");
    for banned in ["disablereuse", "retry=", "proxy-nokeepalive"] {
        assert!(
            !site.lines().any(|l| !l.trim_start().starts_with('#') && l.contains(banned)),
            "examples/apache.conf must run Apache with its default reuse and retries, and has `{banned}`"
        );
    }
    let site = replace_once(&site, "<VirtualHost *:80>", "<VirtualHost *:{port}>");
    replace_once(
        &site,
        "\"unix:/run/holdfast/app.sock|http://holdfast/\"",
        &format!("\"{url}\""),
    )
}

/// A proxy in front of holdfast's TCP listener on `port`.
fn start_proxy(kind: &str, h: &Holdfast, port: u16) -> Proxy {
    let dir = proxy_dir(h.dir.path(), kind);
    let proxy = match kind {
        "nginx" => Proxy::nginx(&dir, h.port2, &nginx_site(&format!("127.0.0.1:{port}"))),
        "apache" => Proxy::apache(
            &dir,
            h.port2,
            &["proxy", "proxy_http"],
            &apache_site(&format!("http://127.0.0.1:{port}/")),
        ),
        other => panic!("unknown proxy {other}"),
    };
    proxy.wait_serving("/", READY);
    proxy
}

/// 8 keep-alive GET clients, 8 with one request per connection, and 4
/// keep-alive clients POSTing 4 KiB: a proxy may retry a failed GET on a
/// fresh connection by itself, a POST only when told to.
fn load_mix(target: Target) -> Vec<LoadSpec> {
    let base = |n, keepalive| LoadSpec {
        connections: n,
        keepalive,
        max_duration: Duration::from_secs(240),
        max_requests: 400_000,
        request_timeout: Duration::from_secs(20),
        ..LoadSpec::new(target.clone())
    };
    let post = LoadSpec {
        post_body: Some(vec![b'x'; 4096]),
        ..base(4, true)
    };
    vec![base(8, true), base(8, false), post]
}

fn field_u32(line: &str, key: &str) -> Option<u32> {
    line.split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

fn wait_log(h: &Holdfast, what: &str, cond: impl Fn(&str) -> bool) {
    wait_until(READY, what, || {
        let log = h.log();
        if let Some(l) = log.lines().find(|l| l.contains("keeps serving")) {
            panic!("while waiting for {what}: {l}");
        }
        cond(&log).then_some(())
    });
}

/// What one test saw.
struct Seen {
    reports: Vec<LoadReport>,
    /// Connections the proxy opened to the app (kernel count minus the
    /// load's own connections to the proxy).
    upstream_connections: u64,
    took: Duration,
}

impl Seen {
    fn ok(&self) -> u64 {
        self.reports.iter().map(|r| r.ok).sum()
    }
    fn failed(&self) -> u64 {
        self.reports.iter().map(LoadReport::failed).sum()
    }
    /// Requests the app answered over a connection the proxy had used before.
    fn reused(&self) -> u64 {
        (self.ok() + self.failed()).saturating_sub(self.upstream_connections)
    }
    fn summary(&self, name: &str) -> String {
        let requests = self.ok() + self.failed();
        format!(
            "proxies {name}: {} rollouts in {:.1}s, requests {requests} failed {} ({:?}); \
             upstream connections {}, requests on a reused upstream connection {} ({:.1}%)",
            rollouts(),
            self.took.as_secs_f64(),
            self.failed(),
            self.reports
                .iter()
                .map(|r| r.failures.clone())
                .collect::<Vec<_>>(),
            self.upstream_connections,
            self.reused(),
            100.0 * self.reused() as f64 / requests.max(1) as f64
        )
    }
}

/// [`rollouts`] SIGHUP rollouts of `h` under [`load_mix`] through `proxy`,
/// each waiting for `rollout finished` and [`BETWEEN`] requests more.
fn roll_through(net: &PrivateNet, h: &Holdfast, proxy: &Proxy) -> Seen {
    let started = Instant::now();
    let opens_before = net.tcp("PassiveOpens");
    let loads: Vec<Load> = load_mix(proxy.target())
        .into_iter()
        .map(Load::start)
        .collect();
    let done = |loads: &[Load]| loads.iter().map(Load::requests_so_far).sum::<u64>();
    let serve = |loads: &[Load], what: &str| {
        let base = done(loads);
        wait_until(READY, what, || {
            (done(loads) >= base + BETWEEN).then_some(())
        });
    };
    serve(&loads, "requests before the first rollout");
    for generation in 2..=rollouts() + 1 {
        h.signal(Signal::SIGHUP);
        wait_log(
            h,
            &format!("rollout finished generation={generation}"),
            |log| {
                log.lines().any(|l| {
                    l.contains("rollout finished") && field_u32(l, "generation") == Some(generation)
                })
            },
        );
        serve(&loads, &format!("requests after rollout {generation}"));
    }
    let reports: Vec<LoadReport> = loads.into_iter().map(Load::stop).collect();
    let took: Vec<String> = h
        .log()
        .lines()
        .filter(|l| l.contains("rollout finished"))
        .filter_map(|l| l.split("took=").nth(1))
        .map(|t| t.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    eprintln!("rollouts took {}", took.join(" "));
    let opens = net.tcp("PassiveOpens") - opens_before;
    let client_connections: u64 = reports.iter().map(|r| r.connections).sum();
    assert!(
        opens >= client_connections,
        "PassiveOpens grew by {opens}, less than the {client_connections} connections the load opened"
    );
    Seen {
        reports,
        upstream_connections: opens - client_connections,
        took: started.elapsed(),
    }
}

/// Lines of the proxy's error log that say a request to the app failed.
fn proxy_errors(proxy: &Proxy) -> Vec<String> {
    let needles = [
        "upstream prematurely closed",
        "Connection reset by peer",
        "connect() failed",
        "AH01102",
        "AH00898",
        "AH01097",
        "error reading status line",
        "disabling worker",
    ];
    proxy
        .error_log()
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// The test worker: 2 workers on a TCP listener, 20 ms per request, its
/// default lame-duck drain (idle keep-alive connections kept 2 s after the
/// drain signal, answered with `Connection: close`).
fn test_worker_config() -> &'static str {
    r#"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"

[app]
command = ["{test_worker}", "--sleep-ms", "20"]
workers = 2
ready = "notify"
ready_timeout = "30s"
drain_timeout = "10s"
"#
}

/// Asserts zero failures, a clean proxy error log, and the pool in use:
/// at least half of the requests rode a reused upstream connection.
fn assert_honest(name: &str, seen: &Seen, proxy: &Proxy) {
    eprintln!("{}", seen.summary(name));
    for r in &seen.reports {
        eprint!("{r}");
    }
    assert_eq!(seen.failed(), 0, "{}", seen.summary(name));
    assert!(
        seen.ok() >= BETWEEN * u64::from(rollouts()),
        "{}",
        seen.summary(name)
    );
    assert_eq!(
        proxy_errors(proxy),
        Vec::<String>::new(),
        "{name}: the proxy's error log"
    );
    assert!(
        seen.reused() * 2 >= seen.ok(),
        "{name}: the keep-alive pool is hardly used: {}",
        seen.summary(name)
    );
}

fn test_worker_behind(kind: &str) {
    let net = PrivateNet::enter();
    let h = Holdfast::start(test_worker_config());
    h.wait_log("all workers ready");
    let proxy = start_proxy(kind, &h, h.port);
    let seen = roll_through(&net, &h, &proxy);
    assert_honest(&format!("{kind} -> test worker"), &seen, &proxy);
}

#[test]
fn nginx_defaults_test_worker_keepalive_pool_20_rollouts() {
    test_worker_behind("nginx");
}

#[test]
fn apache_defaults_test_worker_keepalive_pool_20_rollouts() {
    test_worker_behind("apache");
}

/// Puma on a TCP listener, with `args` after `puma`.
fn puma_config(args: &str) -> String {
    format!(
        r#"
[[listen]]
name = "http"
address = "127.0.0.1:{{port}}"

[app]
command = ["puma", {args}, "--bind-to-activated-sockets=only", "-t", "32:32", "config.ru"]
cwd = "{apps}"
workers = 2
env = {{ RACK_ENV = "production" }}
handoff = ["systemd"]
ready = "notify"
ready_timeout = "60s"
drain_signal = "TERM"
drain_timeout = "35s"
"#,
        apps = apps_dir()
    )
}

fn puma_behind(kind: &str, args: &str) -> (Seen, Proxy, Holdfast) {
    require("puma", "puma ruby-sd-notify");
    let net = PrivateNet::enter();
    let h = Holdfast::start(&puma_config(args));
    wait_log(&h, "all workers ready", |log| {
        log.contains("all workers ready")
    });
    let proxy = start_proxy(kind, &h, h.port);
    let seen = roll_through(&net, &h, &proxy);
    (seen, proxy, h)
}

#[test]
fn measure_puma_defaults_nginx() {
    let (seen, proxy, _h) = puma_behind("nginx", r#""-C", "/dev/null""#);
    eprintln!("{}", seen.summary("nginx -> puma defaults"));
    for r in &seen.reports {
        eprint!("{r}");
    }
    eprintln!("{:?}", proxy_errors(&proxy));
}

#[test]
fn measure_puma_defaults_apache() {
    let (seen, proxy, _h) = puma_behind("apache", r#""-C", "/dev/null""#);
    eprintln!("{}", seen.summary("apache -> puma defaults"));
    for r in &seen.reports {
        eprint!("{r}");
    }
    eprintln!("{:?}", proxy_errors(&proxy));
}
