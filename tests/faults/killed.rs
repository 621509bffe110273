//! holdfast itself is SIGKILLed: it can do nothing at that moment, so what
//! it prepared beforehand must hold. Every worker has a parent-death signal
//! (SIGTERM): it drains and exits, the listening socket dies with the last
//! copy, and the next holdfast binds the same port at once.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::{tagged_pids, DEADLINE};
use crate::support::*;

/// Workers of a SIGKILLed holdfast are gone within a second; requests in
/// flight are answered (the workers drain on their parent-death SIGTERM);
/// the only failures are connections the kernel refused or reset once no
/// process held the listening socket (without systemd's fd store nothing
/// can keep it); a new holdfast binds the same ports and serves without a
/// failure.
#[test]
fn sigkill_of_holdfast_takes_its_workers_and_frees_the_port() {
    let _serial = serial();
    let cfg = Cfg {
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    };
    let mut h = cfg.start();
    let tag = h.tag().to_string();
    wait_consistent(&h, 2);
    let before = tagged_pids(&tag);
    let traffic = Traffic::start(&h, false);
    let mut p = Problems::default();

    h.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let gone = poll(Duration::from_secs(1), || {
        let left = tagged_pids(&tag);
        left.is_empty()
            .then(|| killed.elapsed())
            .ok_or(format!("of {before:?}, still alive: {left:?}"))
    });
    p.check(gone.is_ok(), || {
        format!(
            "after SIGKILL of holdfast: {}",
            gone.clone().err().unwrap_or_default()
        )
    });
    let code = h.wait_exit(DEADLINE);
    p.check(code.code().is_none(), || format!("holdfast: {code}"));
    // Once nothing holds the socket, new connections are refused: the load
    // ends by itself soon after.
    let [ka, one] = traffic.into_reports();
    for r in [&ka, &one] {
        let bad: Vec<(&String, &u64)> = r
            .failures
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "refused" | "reset"))
            .collect();
        p.check(bad.is_empty(), || {
            format!("after SIGKILL of holdfast, failures other than refused/reset (a request in flight lost): {bad:?}\n{r}")
        });
    }
    nothing_left(&h, &tag, &mut p);

    // The next holdfast, same ports.
    let again = cfg
        .render()
        .replace("{port2}", &h.port2.to_string())
        .replace("{port}", &h.port.to_string());
    let mut next = start_config(&again);
    let up = poll(DEADLINE, || consistent(&next, 2));
    if p.check(up.is_ok(), || {
        format!(
            "a new holdfast on ports {} and {}: {} (log: {})",
            h.port,
            h.port2,
            up.clone().err().unwrap_or_default(),
            log_tail(&next, 3)
        )
    }) {
        let traffic = Traffic::start_on(crate::common::Target::local(h.port), None);
        traffic.stop(&mut p, 100);
        stop_and_check_nothing_left(&mut next, &mut p);
    }
    eprintln!(
        "sigkill: workers gone after {:?}; load until the port closed: ok {} + {}, failed {:?} + {:?}",
        gone.ok(),
        ka.ok,
        one.ok,
        ka.failures,
        one.failures
    );
    p.assert_none();
}
