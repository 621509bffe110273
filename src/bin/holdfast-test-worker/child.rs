//! The re-exec'd helper children (`--child-role`).

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook_tokio::Signals;

use crate::args::{Args, ChildRole};
use crate::memory::{grow_at, Memory};
use crate::notify::{notify_barrier, notify_ready};
use crate::{say, EX_SOFTWARE, MAX_GROW_MB, MIB};

/// The re-exec'd helpers. Each dies with its parent (PR_SET_PDEATHSIG),
/// except the daemon, which leaves its session instead.
pub(crate) async fn run_child(role: ChildRole, args: &Args) -> ExitCode {
    let pid = std::process::id();
    if role == ChildRole::Daemon {
        if let Err(e) = nix::unistd::setsid() {
            say(&format!("test-worker {pid} (daemon): setsid: {e}"));
            return ExitCode::from(EX_SOFTWARE);
        }
    } else {
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
        if args
            .parent_pid
            .is_some_and(|parent| nix::unistd::getppid() != Pid::from_raw(parent))
        {
            return ExitCode::SUCCESS; // The parent is already gone.
        }
    }
    if role == ChildRole::Notify {
        // This child exits right after READY=1: wait until the manager has
        // handled it, or it may find the sender gone before it can tell whose
        // descendant it was.
        return match notify_ready().and_then(|()| notify_barrier(Duration::from_secs(5))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say(&format!("test-worker {pid} (notify child): {e}"));
                ExitCode::from(1)
            }
        };
    }
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGQUIT]) {
        Ok(signals) => signals,
        Err(e) => {
            say(&format!("test-worker {pid} (child): signal handlers: {e}"));
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let memory = Memory::default();
    match role {
        ChildRole::ServeNothing => {
            if let Err(e) = notify_ready() {
                say(&format!("test-worker {pid} (serve-nothing child): {e}"));
            }
        }
        ChildRole::Idle if args.shared_mb > 0 => {
            memory.grow(args.shared_mb.min(MAX_GROW_MB) * MIB);
        }
        _ => {}
    }
    let growth = async {
        if args.grow_mb_per_sec > 0 {
            grow_at(&memory, args.grow_mb_per_sec).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        signal = signals.next() => {
            let name = match signal {
                Some(SIGTERM) => "SIGTERM",
                Some(SIGQUIT) => "SIGQUIT",
                Some(SIGINT) => "SIGINT",
                _ => "end of signals",
            };
            say(&format!("test-worker {pid} (child): {name}, exiting"));
        }
        _ = growth => {}
    }
    ExitCode::SUCCESS
}
