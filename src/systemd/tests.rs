//! Tables: environment parsing, socket matching, and the messages systemd is
//! sent for a sequence of supervisor states. No processes, no sockets.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use socket2::Domain;

use super::intake::*;
use super::notifier::*;
use crate::config::{Address, Listen};
use crate::core::Supervisor;
use crate::core::{Event, ReadyVia, Request, Settings, Spec};
use crate::ids::{Generation, Pid, WorkerId};
use crate::os::listener::SocketFacts;

#[test]
fn listen_vars_follow_sd_listen_fds() {
    let me = 4242;
    type Row<'a> = (Option<&'a str>, Option<&'a str>, Result<ListenVars, ()>);
    let table: &[Row] = &[
        (None, None, Ok(ListenVars::None)),
        (None, Some("2"), Ok(ListenVars::None)),
        (Some("4242"), None, Ok(ListenVars::None)),
        (Some("4242"), Some("0"), Ok(ListenVars::None)),
        (Some("4242"), Some("2"), Ok(ListenVars::Mine(2))),
        (Some(" 4242 "), Some("1"), Ok(ListenVars::Mine(1))),
        (Some("17"), Some("2"), Ok(ListenVars::OtherPid("17".into()))),
        (Some("x"), Some("2"), Err(())),
        (Some("4242"), Some("two"), Err(())),
        (Some("4242"), Some("-1"), Err(())),
        (Some("4242"), Some("999999"), Err(())),
    ];
    for (pid, fds, want) in table {
        let got = listen_vars(*pid, *fds, me).map_err(|_| ());
        assert_eq!(&got, want, "LISTEN_PID={pid:?} LISTEN_FDS={fds:?}");
    }
}

#[test]
fn fd_names_are_padded_with_unknown() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(fd_names(Some("http:app"), 2), (s(&["http", "app"]), true));
    assert_eq!(fd_names(None, 2), (s(&["unknown", "unknown"]), true));
    assert_eq!(fd_names(Some("http"), 2), (s(&["http", "unknown"]), false));
    assert_eq!(fd_names(Some("a:b:c"), 2), (s(&["a", "b"]), false));
    assert_eq!(fd_names(Some(""), 1), (s(&["unknown"]), false));
}

fn tcp(a: &str) -> Address {
    Address::Tcp(a.parse::<SocketAddr>().expect("addr"))
}
fn unix(p: &str) -> Address {
    Address::Unix(PathBuf::from(p))
}
fn entry(name: &str, address: Address) -> Listen {
    Listen {
        name: name.into(),
        address,
        backlog: 1024,
        mode: None,
    }
}
fn facts(address: &Address, stream: bool, listening: bool) -> SocketFacts {
    let domain = match address {
        Address::Tcp(a) if a.is_ipv4() => Domain::IPV4,
        Address::Tcp(_) => Domain::IPV6,
        _ => Domain::UNIX,
    };
    SocketFacts {
        domain,
        stream,
        listening,
        local: Some(address.clone()),
        description: format!("socket on {address}"),
    }
}
fn offer(number: RawFd, name: &str, address: &Address) -> Offer {
    Offer::new(
        number,
        name.into(),
        Ok(facts(address, true, true)),
        number as u64 * 100,
    )
}

#[test]
fn choose_matches_by_name_then_store_then_address() {
    let http = tcp("127.0.0.1:8080");
    let sock = unix("/run/app.sock");
    let other = tcp("127.0.0.1:9090");
    /// (entry, offers, inodes in use, the offer taken or the fd an error names)
    type Row = (Listen, Vec<Offer>, Vec<u64>, Result<Option<usize>, RawFd>);
    let table: Vec<Row> = vec![
        // By name, at the entry's address.
        (
            entry("http", http.clone()),
            vec![offer(3, "app", &sock), offer(4, "http", &http)],
            vec![],
            Ok(Some(1)),
        ),
        // systemd:NAME takes the one socket of that name, whatever its address.
        (
            entry("listen0", Address::Systemd("app".into())),
            vec![offer(3, "http", &http), offer(4, "app", &sock)],
            vec![],
            Ok(Some(1)),
        ),
        // systemd:NAME with nothing of that name: bind (which fails with its own message).
        (
            entry("listen0", Address::Systemd("app".into())),
            vec![offer(3, "http", &http)],
            vec![],
            Ok(None),
        ),
        // Named as the entry but another family: an error naming fd 3.
        (
            entry("http", http.clone()),
            vec![offer(3, "http", &sock)],
            vec![],
            Err(3),
        ),
        // Named as the entry but another port: an error too.
        (
            entry("http", http.clone()),
            vec![offer(3, "http", &other)],
            vec![],
            Err(3),
        ),
        // One .socket unit names all its fds alike: the one at the address.
        (
            entry("http", sock.clone()),
            vec![offer(3, "http", &http), offer(4, "http", &sock)],
            vec![],
            Ok(Some(1)),
        ),
        // No fd of that name: by address (systemd-socket-activate without --fdname).
        (
            entry("unix", sock.clone()),
            vec![offer(3, "unknown", &http), offer(4, "unknown", &sock)],
            vec![],
            Ok(Some(1)),
        ),
        // Stored for this entry at its address.
        (
            entry("http", http.clone()),
            vec![offer(3, "holdfast.store.http", &http)],
            vec![],
            Ok(Some(0)),
        ),
        // Stored for this entry but the config moved it: not taken (bind anew).
        (
            entry("http", http.clone()),
            vec![offer(3, "holdfast.store.http", &other)],
            vec![],
            Ok(None),
        ),
        // Stored under an old name, same address: taken by address.
        (
            entry("web", http.clone()),
            vec![offer(3, "holdfast.store.http", &http)],
            vec![],
            Ok(Some(0)),
        ),
        // Already held by another entry: not taken twice.
        (
            entry("http", http.clone()),
            vec![offer(3, "http", &http)],
            vec![300],
            Ok(None),
        ),
        // Nothing for this address at all.
        (
            entry("http", http.clone()),
            vec![offer(3, "app", &sock)],
            vec![],
            Ok(None),
        ),
    ];
    for (i, (spec, offers, in_use, want)) in table.into_iter().enumerate() {
        let got = choose(&spec, &offers, &in_use).map_err(|e| match e {
            ActivationError::Mismatch { fd, .. } => fd,
            other => panic!("row {i}: unexpected error {other}"),
        });
        assert_eq!(got, want, "row {i}: {spec:?}");
    }
}

#[test]
fn mismatch_messages_name_the_fd_and_what_it_is() {
    let http = tcp("127.0.0.1:8080");
    let mut dgram = offer(3, "http", &http);
    dgram.facts = Ok(facts(&http, false, false));
    let e = choose(&entry("http", http.clone()), &[dgram], &[]).expect_err("datagram");
    let msg = e.to_string();
    assert!(msg.contains("fd 3") && msg.contains("`http`"), "{msg}");
    assert!(
        msg.contains("wants a listening TCP socket on 127.0.0.1:8080"),
        "{msg}"
    );

    let mut conn = offer(4, "http", &http);
    conn.facts = Ok(facts(&http, true, false));
    let msg = choose(&entry("http", http.clone()), &[conn], &[])
        .expect_err("connection")
        .to_string();
    assert!(msg.contains("fd 4") && msg.contains("Accept=no"), "{msg}");

    let mut fifo = offer(5, "app", &http);
    fifo.facts = Err("it is a FIFO, not a socket".into());
    let msg = choose(&entry("x", Address::Systemd("app".into())), &[fifo], &[])
        .expect_err("fifo")
        .to_string();
    assert!(msg.contains("fd 5") && msg.contains("FIFO"), "{msg}");

    let twice = [offer(3, "app", &http), offer(4, "app", &unix("/a"))];
    let msg = choose(&entry("x", Address::Systemd("app".into())), &twice, &[])
        .expect_err("ambiguous")
        .to_string();
    assert!(msg.contains("fds 3, 4"), "{msg}");
}

fn t(ms: u64) -> Instant {
    thread_local!(static T0: Instant = Instant::now());
    T0.with(|t0| *t0 + Duration::from_millis(ms))
}

fn policy(workers: u32) -> Spec {
    let mut app: crate::config::AppConfig =
        toml::from_str(&format!("command = [\"worker\"]\nworkers = {workers}")).expect("app");
    app.ready_listeners = Some(Vec::new());
    Spec {
        app,
        program: "/usr/bin/worker".into(),
        listeners: Vec::new(),
        memory: None,
    }
}

fn new_sv(workers: u32) -> Supervisor {
    Supervisor::new(policy(workers), Settings::default())
}

/// Steps `sv`, feeds `Spawned` for every spawn (pid = 100 + id) and passes
/// what the supervisor tells systemd on to the notifier, as the runtime does.
fn step(sv: &mut Supervisor, n: &mut Notifier, at: Instant, event: Event) {
    let mut pending = vec![event];
    while let Some(e) = pending.pop() {
        for a in sv.step(at, e) {
            match a {
                crate::core::Action::Spawn { id, .. } => pending.push(Event::Spawned {
                    id,
                    pid: Pid(100 + id.0 as i32),
                }),
                crate::core::Action::Service { state, status } => n.tell(state, &status),
                _ => {}
            }
        }
    }
}

fn ready(id: u64) -> Event {
    Event::Ready {
        id: WorkerId(id),
        via: ReadyVia::Notify,
    }
}

#[test]
fn notifications_follow_the_supervisor() {
    let mut sv = new_sv(2);
    let mut n = Notifier::recording(None, t(0));
    let script: Vec<(Event, Vec<&str>)> = vec![
        (
            Event::Tick,
            vec!["STATUS=starting: 0/2 workers ready, generation 1\n"],
        ),
        (
            ready(1),
            vec!["STATUS=starting: 1/2 workers ready, generation 1\n"],
        ),
        // Only once every worker is ready.
        (
            ready(2),
            vec!["READY=1\nSTATUS=2/2 workers ready, generation 1\n"],
        ),
        (
            Event::Request {
                request: Request::Rollout {
                    spec: Box::new(policy(2)),
                },
                reply: None,
            },
            vec!["RELOADING=1\nMONOTONIC_USEC=*\nSTATUS=2/2 workers ready, generation 1, rollout 0/2 to generation 2\n"],
        ),
        // Worker 3 (slot 0, generation 2) ready: worker 1 drains.
        (
            ready(3),
            vec!["STATUS=2/2 workers ready, generation 1, rollout 1/2 to generation 2\n"],
        ),
        (
            Event::Exited {
                pid: Pid(101),
                reason: crate::core::ExitReason::Code(0),
                output: Vec::new(),
            },
            vec![],
        ),
        // Worker 4 ready: worker 2 drains; the rollout ends when it is gone.
        (
            ready(4),
            vec!["STATUS=2/2 workers ready, generation 1, rollout 2/2 to generation 2\n"],
        ),
        (
            Event::Exited {
                pid: Pid(102),
                reason: crate::core::ExitReason::Code(0),
                output: Vec::new(),
            },
            vec!["READY=1\nSTATUS=2/2 workers ready, generation 2\n"],
        ),
        (
            Event::Request {
                request: Request::Stop,
                reply: None,
            },
            vec!["STOPPING=1\nSTATUS=stopping: 2 process(es) left\n"],
        ),
        (
            Event::Exited {
                pid: Pid(103),
                reason: crate::core::ExitReason::Code(0),
                output: Vec::new(),
            },
            vec!["STATUS=stopping: 1 process(es) left\n"],
        ),
    ];
    for (i, (event, want)) in script.into_iter().enumerate() {
        step(&mut sv, &mut n, t(i as u64 * 10), event);
        let got = n.take_sent();
        assert_eq!(got.len(), want.len(), "step {i}: {got:?}");
        for (g, w) in got.iter().zip(&want) {
            match w.split_once('*') {
                Some((head, tail)) => {
                    assert!(g.starts_with(head) && g.ends_with(tail), "step {i}: {g:?}");
                    let mono = &g[head.len()..g.len() - tail.len()];
                    assert!(mono.parse::<u64>().is_ok(), "step {i}: {g:?}");
                }
                None => assert_eq!(g, w, "step {i}"),
            }
        }
    }
    assert_eq!(n.told(), Told::Stopping);
}

#[test]
fn a_rejected_reload_still_answers_reloading_then_ready() {
    let mut sv = new_sv(1);
    let mut n = Notifier::recording(None, t(0));
    step(&mut sv, &mut n, t(0), Event::Tick);
    step(&mut sv, &mut n, t(1), ready(1));
    n.take_sent();
    step(
        &mut sv,
        &mut n,
        t(2),
        Event::ReloadRejected {
            error: "config h.toml:3:1: oops".into(),
            reply: None,
        },
    );
    let sent = n.take_sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{sent:?}"
    );
    assert!(
        sent[0].ends_with(
            "STATUS=1/1 workers ready, generation 1; last reload rejected: config h.toml:3:1: oops\n"
        ),
        "{sent:?}"
    );
    assert_eq!(sent[1], "READY=1\nSTATUS=1/1 workers ready, generation 1; last reload rejected: config h.toml:3:1: oops\n");
    // The note stays until a reload is accepted.
    step(&mut sv, &mut n, t(2), Event::Tick);
    assert_eq!(n.take_sent(), Vec::<String>::new());
    step(
        &mut sv,
        &mut n,
        t(3),
        Event::Request {
            request: Request::Rollout {
                spec: Box::new(policy(1)),
            },
            reply: None,
        },
    );
    let sent = n.take_sent();
    assert!(
        sent[0].ends_with("STATUS=1/1 workers ready, generation 1, rollout 0/1 to generation 2\n"),
        "{sent:?}"
    );
}

#[test]
fn watchdog_pings_at_the_interval_from_the_loop_timer() {
    let sv = new_sv(1);
    let mut n = Notifier::recording(Some(Duration::from_millis(500)), t(0));
    assert_eq!(n.next_due(), Some(t(0)));
    n.due(t(0), &sv);
    assert_eq!(n.take_sent(), vec!["WATCHDOG=1\n".to_string()]);
    assert_eq!(n.next_due(), Some(t(500)));
    n.due(t(499), &sv);
    assert_eq!(n.take_sent(), Vec::<String>::new());
    // A late timer (a stalled loop) pings once, then keeps the interval.
    n.due(t(3000), &sv);
    assert_eq!(n.take_sent(), vec!["WATCHDOG=1\n".to_string()]);
    assert_eq!(n.next_due(), Some(t(3500)));
}

#[test]
fn timeouts_are_extended_only_while_bounded_work_progresses() {
    let mut sv = new_sv(2);
    let mut n = Notifier::off();
    step(&mut sv, &mut n, t(0), Event::Tick);
    // Both starting, ready_timeout 60 s from t(0).
    assert_eq!(
        extension(&sv, Told::Starting, t(10_000)),
        Some(Duration::from_secs(50) + EXTEND_MARGIN)
    );
    assert_eq!(extension(&sv, Told::Ready, t(10_000)), None);
    // A crash in the first generation is not progress.
    step(
        &mut sv,
        &mut n,
        t(11_000),
        Event::Exited {
            pid: Pid(101),
            reason: crate::core::ExitReason::Code(1),
            output: Vec::new(),
        },
    );
    assert_eq!(extension(&sv, Told::Starting, t(11_000)), None);

    let mut sv = new_sv(1);
    step(&mut sv, &mut n, t(0), Event::Tick);
    step(&mut sv, &mut n, t(1000), ready(1));
    step(
        &mut sv,
        &mut n,
        t(2000),
        Event::Request {
            request: Request::Stop,
            reply: None,
        },
    );
    // Draining until drain_timeout (30 s from t(2000)).
    assert_eq!(
        extension(&sv, Told::Stopping, t(12_000)),
        Some(Duration::from_secs(20) + EXTEND_MARGIN)
    );
    assert_eq!(sv.stable(), Generation(1));
}

#[test]
fn extend_is_sent_every_few_seconds_while_starting() {
    let mut sv = new_sv(1);
    let mut n = Notifier::recording(None, t(0));
    step(&mut sv, &mut n, t(0), Event::Tick);
    n.take_sent();
    assert_eq!(n.next_due(), Some(t(0) + EXTEND_EVERY));
    n.due(t(2000), &sv);
    assert_eq!(
        n.take_sent(),
        vec![format!(
            "EXTEND_TIMEOUT_USEC={}\n",
            (Duration::from_secs(58) + EXTEND_MARGIN).as_micros()
        )]
    );
    step(&mut sv, &mut n, t(2500), ready(1));
    n.take_sent();
    n.due(t(4000), &sv);
    assert_eq!(
        n.take_sent(),
        Vec::<String>::new(),
        "ready: nothing to extend"
    );
}
