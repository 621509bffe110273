//! Workers that live on but wrong: they stop holding their listeners
//! after they were ready, close their stdout and stderr, are stopped
//! (SIGSTOP) outside and during a rollout, run out of fds. The faulty
//! worker serves only the side port (see [`crate::support`]); the healthy
//! load must not see a single failure.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::{pid_alive, DEADLINE};
use crate::support::*;

/// Inodes of the listeners `http` and `side`, from status.
fn listener_inodes(h: &crate::common::Holdfast) -> BTreeSet<u64> {
    let s = status(h).expect("status");
    ["http", "side"]
        .iter()
        .map(|n| listener_inode(&s, n).expect("listener inode"))
        .collect()
}

/// (Failed before its fix.) Slot 1's worker is ready, then closes its listeners
/// (its accept loop died) and lives on serving nothing new. holdfast
/// checks the listeners only once, at READY=1, so status keeps calling it
/// ready forever; were every worker to do this, every request would wait
/// in the queue until it timed out while status said all is well.
///
/// The fix: the check that makes "ready mean serving" is repeated (the
/// housekeeping walk, every few seconds), and a ready worker whose tree
/// holds none of its required listeners is logged (naming its pid and the
/// addresses) and replaced like a memory replacement, start before stop.
/// Nothing fails meanwhile: the other workers take the queue.
#[test]
fn a_ready_worker_that_stops_holding_its_listeners_is_replaced() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        generation: Some(1),
        flags: "--close-listeners-after-ms 500",
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let deaf = first[&1];
    let inodes = listener_inodes(&h);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    // The fault happened: the worker holds no listener any more.
    poll(Duration::from_secs(5), || {
        let held: Vec<u64> = socket_inodes(deaf).intersection(&inodes).copied().collect();
        held.is_empty()
            .then_some(())
            .ok_or(format!("worker {deaf} still holds listeners {held:?}"))
    })
    .unwrap_or_else(|e| panic!("precondition: {e}"));
    let closed_at = Instant::now();
    let replaced = poll(Duration::from_secs(6), || {
        let s = status(&h)?;
        match ready_in(&s, 1) {
            Some(w) if w.pid != deaf => Ok(closed_at.elapsed()),
            w => Err(format!(
                "slot 1 still runs worker {deaf}, which holds none of the listeners; status shows it as {w:?}"
            )),
        }
    });
    let ok = p.note(replaced.clone()).is_some();
    if ok {
        let said = log_lines(&h, &[&deaf.to_string(), &format!("127.0.0.1:{}", h.port2)]);
        p.check(!said.is_empty(), || {
            format!(
                "no log line names worker {deaf} and the listener 127.0.0.1:{} it stopped holding",
                h.port2
            )
        });
    }
    roll_to_healthy(&h, &mut p, 2);
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, &[], "listeners closed after ready");
    stop_and_check_nothing_left(&mut h, &mut p);
    eprintln!("listeners closed after ready: replaced {replaced:?} after the close");
    p.assert_none();
}

/// Slot 1's worker writes numbered lines, then points its stdout and
/// stderr at /dev/null (as a server that daemonises its stdio) and keeps
/// serving. holdfast closes its two read ends at once (it holds neither
/// pipe any more), does not spin on them, keeps every line written before
/// (whole, numbered 1..n without a gap), and keeps the worker: it is ready
/// and serves until a rollout drains it.
#[test]
fn a_worker_that_closes_stdout_and_stderr_keeps_serving() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        generation: Some(1),
        flags: "--close-stdio-after-ms 800 --log-forever --log-rate 500",
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        tables: "[logs]\nstdout = \"{dir}/app.log\"\nstderr = \"{dir}/app.log\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let quiet = first[&1];
    // The pipes of the worker's stdout and stderr; holdfast holds their
    // read ends.
    let pipes: BTreeSet<String> = [1, 2]
        .iter()
        .filter_map(|fd| std::fs::read_link(format!("/proc/{quiet}/fd/{fd}")).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("pipe:"))
        .collect();
    assert_eq!(
        pipes.len(),
        2,
        "worker {quiet}'s stdout and stderr: {pipes:?}"
    );
    let held = |pid: u32| -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .filter(|l| pipes.contains(&*l.to_string_lossy()))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(
        held(h.pid()),
        2,
        "holdfast holds the read ends of {pipes:?}"
    );
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    let closed = poll(Duration::from_secs(5), || {
        let now = held(h.pid());
        (now == 0).then_some(()).ok_or(format!(
            "holdfast still holds {now} of the pipes {pipes:?} worker {quiet} closed its ends of"
        ))
    });
    p.note(closed);
    let cpu = cpu_share(h.pid(), Duration::from_secs(1));
    p.check(cpu < 0.25, || {
        format!(
            "holdfast used {:.0}% of a core with a worker's pipes closed",
            cpu * 100.0
        )
    });
    p.check(consistent(&h, 2).ok() == Some(first.clone()), || {
        format!("both workers must stay: {:?}", consistent(&h, 2))
    });
    // The lines from before the close: whole and without a gap.
    let log = std::fs::read_to_string(h.dir.path().join("app.log")).unwrap_or_default();
    let prefix = format!("[w1 {quiet}] w1 {quiet} ");
    let seqs: Vec<u64> = log
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            rest.split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    p.check(
        seqs.len() >= 100 && seqs.iter().copied().eq(1..=seqs.len() as u64),
        || format!("worker {quiet}'s lines before it closed its stdio: want 1..n (n >= 100), got {} lines, first {:?}", seqs.len(), &seqs[..seqs.len().min(5)]),
    );
    roll_to_healthy(&h, &mut p, 2);
    let exits = log_lines(&h, &["worker exited", &format!("pid={quiet}")]);
    p.check(
        exits.len() == 1 && exits[0].contains("exit status 0"),
        || format!("worker {quiet} must drain and exit 0: {exits:?}"),
    );
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, &[], "stdio closed");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// Opens idle side connections until `pid` holds one (`others` stopped
/// meanwhile: see [`hold_connections_until`]), so that it has
/// connections to be stuck with once stopped. Keep the result until the end.
fn give_connections(
    h: &crate::common::Holdfast,
    pid: u32,
    others: &[u32],
) -> Vec<std::net::TcpStream> {
    hold_connections_until(h, h.port2, others, || {
        (established_on(pid, h.port2) > 0)
            .then_some(())
            .ok_or(format!("worker {pid} holds no side connection"))
    })
}

/// Waits (a precondition) until `pid`, stopped, holds at least one
/// connection on the side port: its side requests are stuck.
fn stuck_with_connections(h: &crate::common::Holdfast, pid: u32) {
    poll(Duration::from_secs(5), || {
        let n = established_on(pid, h.port2);
        (proc_state(pid) == Some('T') && n > 0)
            .then_some(())
            .ok_or(format!(
                "worker {pid}: state {:?}, {n} side connections",
                proc_state(pid)
            ))
    })
    .unwrap_or_else(|e| panic!("precondition: {e}"));
}

/// Whether any string field of `pid`'s row in `status --json`, or its row
/// of the text status, says "stopped"; with what each showed.
fn says_stopped(h: &crate::common::Holdfast, pid: u32) -> Result<(bool, bool, String), String> {
    let s = status(h)?;
    let row = s["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["pid"] == pid).cloned())
        .ok_or(format!("no status row for worker {pid}"))?;
    let json = row.as_object().is_some_and(|o| {
        o.values()
            .any(|v| v.as_str().is_some_and(|t| t.contains("stopped")))
    });
    let out = ctl(h, &["status"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(&pid.to_string()))
        .unwrap_or_default()
        .to_string();
    let side = s["listeners"][1].clone();
    Ok((
        json,
        line.contains("stopped"),
        format!("JSON row {row}; table row {line:?}; side listener {side}"),
    ))
}

/// (Failed before its fix.) Slot 1's worker is SIGSTOPped (hung) while it holds
/// side connections. Status must make it visible. Today it shows `ready`
/// with its connection count (CONNS, which does not fall) and the side
/// listener's accept queue stays 0 (the other worker accepts): nothing
/// says the worker is stopped.
///
/// The fix: status reads the process state that the /proc walk already
/// passes (`/proc/PID/stat`, field 3) and shows it: in `--json` a field of
/// the worker's row (e.g. `"process_state": "stopped"`), in the table the
/// STATE column (`ready (stopped)`); `D` (uninterruptible) likewise. After
/// SIGCONT it no longer says so. Nothing fails: the stop is shorter than a
/// request's timeout.
#[test]
fn a_stopped_worker_is_visible_in_status() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let hung = first[&1];
    let _held = give_connections(&h, hung, &[first[&0]]);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    signal_ours(&h, hung, Signal::SIGSTOP).expect("SIGSTOP");
    let stopped_at = Instant::now();
    stuck_with_connections(&h, hung);
    match says_stopped(&h, hung) {
        Ok((json, table, shown)) => {
            p.check(json && table, || {
                format!("worker {hung} is stopped (state T) but status does not say so (JSON: {json}, table: {table}): {shown}")
            });
            eprintln!("stopped worker in status: {shown}");
        }
        Err(e) => p.push(e),
    }
    signal_ours(&h, hung, Signal::SIGCONT).expect("SIGCONT");
    eprintln!("stopped for {:?}", stopped_at.elapsed());
    if let Some((json, table, shown)) = p.note(says_stopped(&h, hung)) {
        p.check(!json && !table, || {
            format!("worker {hung} runs again but status says stopped: {shown}")
        });
    }
    p.check(consistent(&h, 2).ok() == Some(first.clone()), || {
        format!("both workers must stay: {:?}", consistent(&h, 2))
    });
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, &[], "stopped worker, continued");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// (Failed before its fix.) Slot 1's worker is SIGSTOPped holding side requests,
/// then a rollout replaces it. Its drain signal stays pending while it is
/// stopped, so today it is SIGKILLed at `drain_timeout` (`drain_kills` 1)
/// and the requests it held are reset.
///
/// The fix (as systemd does after its stop signal): SIGCONT to the group
/// right after the drain signal, so a stopped worker drains like any
/// other: it answers what it holds and exits 0, `drain_kills` stays 0,
/// and nothing fails on either port.
#[test]
fn a_stopped_worker_is_drained_not_killed_when_replaced() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        generation: Some(1),
        app: "drain_timeout = \"2s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let hung = first[&1];
    let _held = give_connections(&h, hung, &[first[&0]]);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    signal_ours(&h, hung, Signal::SIGSTOP).expect("SIGSTOP");
    stuck_with_connections(&h, hung);
    roll_to_healthy(&h, &mut p, 2);
    p.note(poll(Duration::from_secs(5), || {
        (!pid_alive(hung))
            .then_some(())
            .ok_or(format!("the stopped worker {hung} still runs"))
    }));
    let exits = log_lines(&h, &["worker exited", &format!("pid={hung}")]);
    p.check(
        exits.len() == 1 && exits[0].contains("exit status 0"),
        || format!("the stopped worker {hung} must drain and exit 0: {exits:?}"),
    );
    if let Some(s) = p.note(status(&h)) {
        p.check(counter(&s, "drain_kills") == 0, || {
            format!(
                "want drain_kills 0 (the stopped worker drained): {}",
                s["counters"]
            )
        });
    }
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, &[], "stopped worker replaced");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}

/// During a rollout, the new slot-0 worker (which sends READY=1 after
/// 1.5 s) is SIGSTOPped right after it is spawned. The rollout fails at
/// `ready_timeout` (3 s) with the reason, the stopped worker is gone by
/// `drain_timeout` after that, generation 1 serves on, and the healthy
/// port loses nothing. (What the stopped worker held on the side port is
/// lost until SIGCONT follows the drain signal; see the test above.)
#[test]
fn a_new_worker_stopped_during_a_rollout_fails_it_and_is_removed() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(0),
        generation: Some(2),
        flags: "--ready-delay-ms 1500",
        app: "drain_timeout = \"1s\"\nready_timeout = \"3s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();

    let restart = {
        let cli = h.fill(SOCK);
        let bin = env!("CARGO_BIN_EXE_holdfast");
        std::thread::spawn(move || {
            std::process::Command::new(bin)
                .args(["restart", "--wait", "--control", &cli])
                .output()
        })
    };
    let new = poll(DEADLINE, || {
        h.worker_pids()
            .into_iter()
            .find(|pid| !first.values().any(|p| p == pid))
            .ok_or("no generation-2 worker spawned yet".to_string())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    signal_ours(&h, new, Signal::SIGSTOP).expect("SIGSTOP the new worker");
    let stopped_at = Instant::now();
    let o = restart
        .join()
        .expect("restart thread")
        .expect("restart --wait");
    p.check(
        o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("not ready after 3s"),
        || format!("restart --wait with its new worker stopped: want exit 1 naming `not ready after 3s`, {}", text(&o)),
    );
    let gone = poll(Duration::from_secs(4), || {
        (!pid_alive(new))
            .then(|| stopped_at.elapsed())
            .ok_or(format!("the stopped new worker {new} still runs"))
    });
    p.note(gone.clone());
    p.check(consistent(&h, 2).ok() == Some(first.clone()), || {
        format!(
            "generation 1's {first:?} must keep serving: {:?}",
            consistent(&h, 2)
        )
    });
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(
        &mut p,
        &side,
        &["reset", "short_body", "timeout"],
        "new worker stopped",
    );
    stop_and_check_nothing_left(&mut h, &mut p);
    eprintln!("new worker stopped: gone {gone:?} after its SIGSTOP");
    p.assert_none();
}

/// Slot 1's worker runs with 16 fds (`prlimit --nofile=16`): a few
/// connections and every accept fails with EMFILE. Such an accept leaves
/// the connection in the shared queue, and the other worker takes it:
/// nothing fails on either port, the worker stays (ready, same pid).
#[test]
fn a_worker_out_of_fds_leaves_its_connections_to_the_others() {
    let _serial = serial();
    let mut h = Cfg {
        slot: Some(1),
        prefix: "prlimit --nofile=16 --",
        app: "drain_timeout = \"3s\"\nready_timeout = \"10s\"",
        ..Cfg::default()
    }
    .start();
    let first = wait_consistent(&h, 2);
    let starved = first[&1];
    // The fault happens: idle side connections (the other worker stopped
    // meanwhile) until the worker says its accept failed with EMFILE; the
    // connection it could not take goes to the other worker.
    let _held = hold_connections_until(&h, h.port2, &[first[&0]], || {
        let said = log_lines(
            &h,
            &[
                &format!("test-worker {starved}: accept"),
                "Too many open files",
            ],
        );
        (!said.is_empty()).then_some(()).ok_or(format!(
            "worker {starved} has not hit its fd limit ({} side connections, other {})",
            established_on(starved, h.port2),
            established_on(first[&0], h.port2)
        ))
    });
    let traffic = Traffic::start(&h, true);
    let mut p = Problems::default();
    // Two more seconds of load at the limit.
    let until = traffic.healthy_so_far() + 1000;
    p.note(poll(Duration::from_secs(10), || {
        (traffic.healthy_so_far() >= until)
            .then_some(())
            .ok_or("load too slow".to_string())
    }));
    p.check(consistent(&h, 2).ok() == Some(first.clone()), || {
        format!("both workers must stay: {:?}", consistent(&h, 2))
    });
    let (_, side) = traffic.stop(&mut p, 100);
    side_only(&mut p, &side, &[], "out of fds");
    stop_and_check_nothing_left(&mut h, &mut p);
    p.assert_none();
}
