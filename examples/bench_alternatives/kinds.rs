//! Which contenders there are, their names, and what each needs installed
//! (so the benchmark can name the missing Debian package).

use std::path::{Path, PathBuf};

/// One way of restarting an app server. Each serves the same app with 2
/// workers; "restart" is the contender's own trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Unicorn (2 workers) bound by itself: QUIT, wait until it exited, start it again.
    NaiveUnicorn,
    /// Unicorn's own re-exec: USR2, wait until the new master's workers are
    /// ready, then QUIT the old master.
    UnicornUsr2,
    /// Unicorn HUP: reload the config, QUIT every worker, fork new ones
    /// (with `preload_app true` the master loads the app first).
    UnicornHup,
    /// Puma cluster (`-w 2`), USR1: workers replaced one at a time.
    PumaPhased,
    /// Puma cluster, USR2: the master stops its workers and re-execs.
    PumaHot,
    /// Gunicorn (2 sync workers), HUP: new workers forked, old ones stopped.
    GunicornHup,
    /// start_server (Server::Starter) with Starlet (2 workers), HUP.
    StarterHup,
    /// Apache + Passenger (2 app processes), SIGUSR1 to one app process: what
    /// the memory-killer scripts send.
    PassengerUsr1,
    /// holdfast (2 workers, each a Unicorn with 1 worker process), SIGHUP.
    HoldfastUnicorn,
    /// holdfast (2 workers, each a single-mode Puma), SIGHUP.
    HoldfastPuma,
    /// holdfast (2 workers, each a Gunicorn with 1 worker), SIGHUP.
    HoldfastGunicorn,
    /// holdfast (2 test workers) with a `[memory]` limit; one worker grows
    /// past it (`GET /grow`) and is replaced start-before-stop.
    HoldfastMemory,
    /// holdfast (2 test workers); one worker gets SIGKILL, holdfast restarts it.
    KillOne,
    /// holdfast (2 test workers); one worker gets SIGTERM (it drains), holdfast restarts it.
    TermOne,
    /// holdfast (2 test workers writing log lines to holdfast's file):
    /// `logrotate -f` with units/holdfast.logrotate's method (rename,
    /// create, postrotate `holdfast reopen-logs`).
    HoldfastReopen,
    /// One test worker bound by itself, appending to its own log file:
    /// `logrotate -f` with `copytruncate`.
    CopyTruncate,
    /// Apache + Passenger: rename the error log, graceful reload (SIGUSR1 to
    /// Apache), as a logrotate `postrotate` does.
    ApacheGraceful,
}

/// Something a contender needs on the machine, and the Debian package with it.
pub struct Need {
    pub what: &'static str,
    pub package: &'static str,
    pub present: fn() -> bool,
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(cmd).is_file())
    })
}

fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const UNICORN: Need = Need {
    what: "unicorn",
    package: "unicorn",
    present: || on_path("unicorn"),
};
const RACK: Need = Need {
    what: "ruby's rack library",
    package: "ruby-rack",
    present: || runs("ruby", &["-e", "require 'rack'"]),
};
const PUMA: Need = Need {
    what: "puma",
    package: "puma",
    present: || on_path("puma"),
};
const SD_NOTIFY: Need = Need {
    what: "ruby's sd_notify gem (Puma's READY=1)",
    package: "ruby-sd-notify",
    present: || runs("ruby", &["-e", "require 'sd_notify'"]),
};
const GUNICORN: Need = Need {
    what: "gunicorn",
    package: "gunicorn",
    present: || on_path("gunicorn"),
};
const STARTER: Need = Need {
    what: "start_server",
    package: "libserver-starter-perl",
    present: || on_path("start_server"),
};
const STARLET: Need = Need {
    what: "plackup with Starlet",
    package: "starlet",
    present: || on_path("plackup") && runs("perl", &["-MStarlet::Server", "-e", "1"]),
};
const LOGROTATE: Need = Need {
    what: "logrotate",
    package: "logrotate",
    present: || on_path("logrotate"),
};
const APACHE: Need = Need {
    what: "apache2",
    package: "apache2",
    present: || on_path("apache2"),
};
const MOD_PASSENGER: Need = Need {
    what: "mod_passenger.so",
    package: "libapache2-mod-passenger",
    present: || Path::new(MOD_PASSENGER_SO).is_file(),
};
const PASSENGER: Need = Need {
    what: "Passenger's locations.ini",
    package: "passenger",
    present: || Path::new(PASSENGER_ROOT).is_file(),
};

pub const MOD_PASSENGER_SO: &str = "/usr/lib/apache2/modules/mod_passenger.so";
pub const PASSENGER_ROOT: &str = "/usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini";

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::NaiveUnicorn,
        Kind::UnicornUsr2,
        Kind::UnicornHup,
        Kind::PumaPhased,
        Kind::PumaHot,
        Kind::GunicornHup,
        Kind::StarterHup,
        Kind::PassengerUsr1,
        Kind::HoldfastUnicorn,
        Kind::HoldfastPuma,
        Kind::HoldfastGunicorn,
        Kind::HoldfastMemory,
        Kind::KillOne,
        Kind::TermOne,
        Kind::HoldfastReopen,
        Kind::CopyTruncate,
        Kind::ApacheGraceful,
    ];

    /// The name `--only` and `--skip` take.
    pub fn id(self) -> &'static str {
        match self {
            Kind::NaiveUnicorn => "naive",
            Kind::UnicornUsr2 => "unicorn-usr2",
            Kind::UnicornHup => "unicorn-hup",
            Kind::PumaPhased => "puma-phased",
            Kind::PumaHot => "puma-hot",
            Kind::GunicornHup => "gunicorn-hup",
            Kind::StarterHup => "starter",
            Kind::PassengerUsr1 => "passenger-usr1",
            Kind::HoldfastUnicorn => "hf-unicorn",
            Kind::HoldfastPuma => "hf-puma",
            Kind::HoldfastGunicorn => "hf-gunicorn",
            Kind::HoldfastMemory => "hf-memory",
            Kind::KillOne => "kill-one",
            Kind::TermOne => "term-one",
            Kind::HoldfastReopen => "hf-reopen",
            Kind::CopyTruncate => "copytruncate",
            Kind::ApacheGraceful => "apache-reload",
        }
    }

    /// The row label of the table and the figure.
    pub fn label(self) -> &'static str {
        match self {
            Kind::NaiveUnicorn => "naive stop/start (Unicorn)",
            Kind::UnicornUsr2 => "Unicorn USR2+QUIT",
            Kind::UnicornHup => "Unicorn HUP",
            Kind::PumaPhased => "Puma phased (USR1)",
            Kind::PumaHot => "Puma hot (USR2)",
            Kind::GunicornHup => "Gunicorn HUP",
            Kind::StarterHup => "Server::Starter HUP",
            Kind::PassengerUsr1 => "Passenger USR1 one proc",
            Kind::HoldfastUnicorn => "holdfast + Unicorn",
            Kind::HoldfastPuma => "holdfast + Puma",
            Kind::HoldfastGunicorn => "holdfast + Gunicorn",
            Kind::HoldfastMemory => "holdfast memory repl.",
            Kind::KillOne => "SIGKILL one worker",
            Kind::TermOne => "SIGTERM one worker",
            Kind::HoldfastReopen => "holdfast log reopen",
            Kind::CopyTruncate => "copytruncate",
            Kind::ApacheGraceful => "Apache graceful reload",
        }
    }

    /// What the contender's "supervisor" column measures.
    pub fn supervisor(self) -> &'static str {
        match self {
            Kind::NaiveUnicorn | Kind::UnicornUsr2 | Kind::UnicornHup => "unicorn master",
            Kind::PumaPhased | Kind::PumaHot => "puma master",
            Kind::GunicornHup => "gunicorn arbiter",
            Kind::StarterHup => "start_server",
            Kind::PassengerUsr1 | Kind::ApacheGraceful => "Passenger watchdog+core",
            Kind::CopyTruncate => "none",
            _ => "holdfast",
        }
    }

    pub fn needs(self) -> Vec<Need> {
        match self {
            Kind::NaiveUnicorn | Kind::UnicornUsr2 | Kind::UnicornHup | Kind::HoldfastUnicorn => {
                vec![UNICORN, RACK]
            }
            Kind::PumaPhased | Kind::PumaHot => vec![PUMA, RACK],
            Kind::HoldfastPuma => vec![PUMA, RACK, SD_NOTIFY],
            Kind::GunicornHup | Kind::HoldfastGunicorn => vec![GUNICORN],
            Kind::StarterHup => vec![STARTER, STARLET],
            Kind::PassengerUsr1 | Kind::ApacheGraceful => {
                vec![APACHE, MOD_PASSENGER, PASSENGER, RACK]
            }
            Kind::HoldfastReopen | Kind::CopyTruncate => vec![LOGROTATE],
            _ => vec![],
        }
    }
}
