//! The table `holdfast status` prints.

use std::fmt::Write as _;

use super::*;

pub fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m, s) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

fn bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let m = b as f64 / MIB;
    if m >= 1024.0 {
        format!("{:.2}G", m / 1024.0)
    } else {
        format!("{m:.1}M")
    }
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::Rss => "RSS",
        Metric::Pss => "PSS",
        Metric::Uss => "USS",
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = width[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The table `holdfast status` prints.
pub fn render(s: &Snapshot) -> String {
    let h = &s.holdfast;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "holdfast {}  pid {}  up {}  config {}",
        h.version,
        h.pid,
        short_duration(h.uptime_secs),
        h.config.as_ref().map_or_else(
            || "(none: command line)".into(),
            |p| p.display().to_string()
        )
    );
    let mut line = format!("generation {}  workers {}", h.generation, h.workers_wanted);
    if h.stopping {
        line.push_str("  STOPPING");
    }
    if h.upgrading {
        line.push_str("  UPGRADING holdfast");
    }
    match &h.rollout {
        Some(r) => {
            let _ = write!(
                line,
                "  {} to generation {}: {}/{} ready ({})",
                if r.rollback { "ROLLBACK" } else { "rollout" },
                r.generation,
                r.ready,
                r.total,
                short_duration(r.elapsed_secs)
            );
        }
        None => line.push_str("  no rollout in progress"),
    }
    let _ = writeln!(out, "{line}");
    let _ = match &h.last_rollout {
        Some(r) if r.ok => writeln!(out, "last rollout: generation {} ok", r.generation),
        Some(r) => writeln!(
            out,
            "last rollout: generation {} FAILED: {}",
            r.generation,
            r.error.as_deref().unwrap_or("?")
        ),
        None => writeln!(out, "last rollout: none"),
    };
    if let Some(why) = &h.reload_rejected {
        let _ = writeln!(out, "{why}");
    }
    out.push('\n');

    let metric = s
        .workers
        .iter()
        .find_map(|w| w.memory.as_ref().map(|m| metric_name(m.metric)))
        .unwrap_or(metric_name(s.sampling.metric));
    let mut rows = vec![[
        "SLOT",
        "PID",
        "GEN",
        "STATE",
        "AGE",
        metric,
        "RSS",
        "CONNS",
        "DESC",
        "RESTARTS",
        "LAST EXIT",
    ]
    .map(String::from)
    .to_vec()];
    for w in &s.workers {
        let state = match (w.restart_in_secs, &w.process_state) {
            (Some(secs), _) => format!("{} (start in {})", w.state, short_duration(secs)),
            (None, Some(p)) => format!("{} ({p})", w.state),
            (None, None) => w.state.clone(),
        };
        let desc = match (w.descendants, w.escaped) {
            (Some(n), 0) => n.to_string(),
            (Some(n), e) => format!("{n} ({e} escaped)"),
            (None, 0) => "-".to_string(),
            (None, e) => format!("? ({e} escaped)"),
        };
        rows.push(vec![
            w.slot.to_string(),
            or_dash(w.pid),
            w.generation.to_string(),
            state,
            if w.pid.is_some() {
                short_duration(w.age_secs)
            } else {
                "-".to_string()
            },
            or_dash(w.memory.as_ref().map(|m| bytes(m.bytes))),
            or_dash(w.memory.as_ref().map(|m| bytes(m.rss_bytes))),
            or_dash(w.connections),
            desc,
            w.restarts.to_string(),
            or_dash(w.last_exit.clone()),
        ]);
    }
    out.push_str(&table(&rows));
    out.push('\n');

    let mut rows = vec![["LISTENER", "ADDRESS", "FD", "ACCEPT QUEUE (now/max)"]
        .map(String::from)
        .to_vec()];
    for l in &s.listeners {
        let queue = match (l.accept_queue, l.accept_queue_max) {
            (Some(n), Some(m)) => format!("{n}/{m}"),
            _ => "n/a".to_string(),
        };
        rows.push(vec![
            l.name.clone(),
            l.address.clone(),
            l.fd.to_string(),
            queue,
        ]);
    }
    out.push_str(&table(&rows));
    match &s.kernel {
        Some(k) => {
            let _ = writeln!(
                out,
                "kernel (this network namespace): ListenOverflows {} (+{} since start)  ListenDrops {} (+{} since start)",
                k.listen_overflows,
                k.listen_overflows_since_start,
                k.listen_drops,
                k.listen_drops_since_start
            );
            if let Some(w) = &k.warning {
                let _ = writeln!(out, "WARNING: {w}");
            }
        }
        None => out.push_str("kernel: /proc/net/netstat unreadable\n"),
    }
    out.push('\n');
    let c = &s.counters;
    let reasons: Vec<String> = c
        .replacements
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(out, "replacements: {}", reasons.join(", "));
    let _ = writeln!(
        out,
        "failed rollouts {}  drain kills {}  child signals {}  log reopens {} (failed {})  log write errors {}  log lines lost {}",
        c.failed_rollouts,
        c.drain_kills,
        c.child_signals,
        c.log_reopens,
        c.log_reopen_failures,
        c.log_write_errors,
        c.log_lines_lost
    );
    let _ = writeln!(
        out,
        "holdfast upgrades {} (failed {})",
        c.upgrades, c.failed_upgrades
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(5.9), "5s");
        assert_eq!(short_duration(125.0), "2m5s");
        assert_eq!(short_duration(3.0 * 3600.0 + 720.0), "3h12m");
        assert_eq!(short_duration(2.0 * 86400.0 + 3.0 * 3600.0), "2d3h");
    }
}
