//! Stand-ins for a new holdfast binary in the upgrade tests, chosen by the
//! name this binary is copied under (as busybox does), so that the tests
//! upgrade holdfast to real ELF executables that misbehave, and holdfast
//! itself needs no test hook:
//!
//! - `holdfast-abort*`: dies by SIGABRT at once (a binary that crashes at
//!   start: the check's trial run catches it);
//! - `holdfast-hang*`: never answers (the trial run's timeout);
//! - `holdfast-future*`: a holdfast that reads only handover format 2;
//! - `holdfast-impostor-format*` / `holdfast-impostor-corrupt*`: passes the
//!   check (claims to read format 1) but, when exec'd by the upgrade, hands
//!   the real holdfast (`$HOLDFAST_IMPOSTOR_REAL`) a state in format 99 or a
//!   truncated one: an adoption that fails after the exec, which must fall
//!   back to a rolling restart;
//! - `holdfast-relay*`: the real holdfast (`$HOLDFAST_IMPOSTOR_REAL`),
//!   but slow to exec: exec'd by the upgrade, it writes `GATE.waiting`
//!   (`$HOLDFAST_RELAY_GATE`) and holds the pid, between the old image and
//!   the new one, until the file `GATE` exists (at most 60 s), then execs
//!   the real holdfast with everything as it came. A test can act inside
//!   the exec window, deterministically (signals sent then stay pending:
//!   the old image blocked them).
//!
//! Any other name: `None`, the test worker runs as usual.

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;

/// The impostor this binary runs as, if its file name names one.
pub(crate) fn run() -> Option<ExitCode> {
    let exe = std::env::current_exe().ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    let version = std::env::args().nth(1).as_deref() == Some("version");
    if name.starts_with("holdfast-abort") {
        std::process::abort();
    }
    if name.starts_with("holdfast-hang") {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        return Some(ExitCode::from(1));
    }
    if name.starts_with("holdfast-future") {
        if version {
            println!(r#"{{"version":"9.0.0","handover":[2]}}"#);
            return Some(ExitCode::SUCCESS);
        }
        return Some(ExitCode::from(64));
    }
    if name.starts_with("holdfast-relay") {
        if !version {
            if let Err(e) = hold_at_the_gate() {
                eprintln!("holdfast-relay: {e}");
                return Some(ExitCode::from(70));
            }
        }
        return Some(exec_real());
    }
    if name.starts_with("holdfast-impostor") {
        if version {
            println!(r#"{{"version":"9.9.9-impostor","handover":[1]}}"#);
            return Some(ExitCode::SUCCESS);
        }
        let corrupt = name.starts_with("holdfast-impostor-corrupt");
        return Some(hand_on(corrupt));
    }
    None
}

/// Exec'd by an upgrade: spoil the state, then exec the real holdfast in
/// this very pid with everything else as it came.
fn hand_on(corrupt: bool) -> ExitCode {
    let fail = |what: &str| {
        eprintln!("holdfast-impostor: {what}");
        ExitCode::from(70)
    };
    let Some(fd) = std::env::var("HOLDFAST_HANDOVER_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return fail("no HOLDFAST_HANDOVER_FD");
    };
    // The memfd holdfast handed over, opened again by path: rewritten in
    // place, the fd (and its offset, 0) stays as holdfast left it.
    let path = format!("/proc/self/fd/{fd}");
    let Ok(json) = std::fs::read_to_string(&path) else {
        return fail("cannot read the state");
    };
    let spoiled = if corrupt {
        json[..json.len() / 2].to_string()
    } else {
        json.replacen("\"format\":1", "\"format\":99", 1).replacen(
            "\"from_version\":\"",
            "\"from_version\":\"9.9.9-impostor/",
            1,
        )
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(spoiled.as_bytes()));
    if written.is_err() {
        return fail("cannot rewrite the state");
    }
    exec_real()
}

/// Says it is waiting (`GATE.waiting`), then waits for `GATE` to exist.
fn hold_at_the_gate() -> Result<(), String> {
    let gate = std::env::var_os("HOLDFAST_RELAY_GATE").ok_or("no HOLDFAST_RELAY_GATE")?;
    let gate = std::path::PathBuf::from(gate);
    let mut waiting = gate.clone().into_os_string();
    waiting.push(".waiting");
    std::fs::write(&waiting, std::process::id().to_string())
        .map_err(|e| format!("write {}: {e}", waiting.to_string_lossy()))?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !gate.exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(())
}

/// Execs the real holdfast (`$HOLDFAST_IMPOSTOR_REAL`) in this pid, with
/// this process's arguments and environment; returns only if that fails.
fn exec_real() -> ExitCode {
    let fail = |what: &str| {
        eprintln!("holdfast-impostor: {what}");
        ExitCode::from(70)
    };
    let Some(real) = std::env::var_os("HOLDFAST_IMPOSTOR_REAL") else {
        return fail("no HOLDFAST_IMPOSTOR_REAL");
    };
    let c = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).unwrap_or_default();
    let argv: Vec<CString> = std::env::args_os().map(|a: OsString| c(&a)).collect();
    let env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).unwrap_or_default()
        })
        .collect();
    let _ = std::io::stderr().flush();
    let e = nix::unistd::execve(&c(&real), &argv, &env);
    fail(&format!("exec {}: {e:?}", real.to_string_lossy()))
}
