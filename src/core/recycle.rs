//! Memory and age recycling: the supervisor's decisions on memory samples
//! and worker lifetimes.
//!
//! The sampler (`crate::os::proc::memory`, run by the edge) only reports figures;
//! everything decided about them is here, pure: consecutive samples over the
//! limit (`grace`), `min_lifetime`, biggest first, child signals and their
//! rate limit, and `max_lifetime` deadlines. A worker to recycle goes into the
//! one replacement queue ([`Supervisor::queue_replacement`]), so memory, age,
//! rollout and crash replacements share `max_surge` and the start-before-stop
//! step.
//!
//! Lifetime jitter needs randomness, which a pure core cannot draw: the edge
//! passes a random `seed` in [`Recycle`]. Slot `s` gets the fraction
//! `frac(seed + s × 0.618…)` of `lifetime_jitter` (a golden-ratio sequence),
//! so the slots' deadlines are spread over the whole jitter range (no two
//! closer than about 1/(2·workers) of it), and differ from one holdfast start
//! to the next.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{debug, info, warn};

use super::{
    later, Action, Reason, SampleTarget, Supervisor, TreeSample, WorkerState, SAMPLE_LOST_AFTER,
};
use crate::config::{MemoryConfig, Metric, Scope};
use crate::ids::{Pid, Slot, WorkerId};

/// One MiB, the unit of memory figures in logs.
pub(crate) const MIB: u64 = 1024 * 1024;

/// `bytes` as whole MiB, for log lines ("611 MiB").
pub(crate) fn mib(bytes: u64) -> String {
    format!("{} MiB", (bytes + MIB / 2) / MIB)
}

/// The `[memory]` keys of one generation, as the supervisor uses them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recycle {
    /// Bytes; `None`: no memory limit (age only).
    pub limit: Option<u64>,
    pub metric: Metric,
    pub scope: Scope,
    /// Consecutive samples over the limit before acting (at least 1).
    pub grace: u32,
    pub min_lifetime: Duration,
    pub child_signal: Signal,
    pub max_lifetime: Option<Duration>,
    pub lifetime_jitter: Duration,
}

impl Recycle {
    pub(crate) fn from_config(m: &MemoryConfig) -> Recycle {
        Recycle {
            limit: m.limit.map(|b| b.as_u64()),
            metric: m.metric(),
            scope: m.scope,
            grace: m.grace,
            min_lifetime: m.min_lifetime,
            child_signal: m.child_signal.0,
            max_lifetime: m.max_lifetime,
            lifetime_jitter: m.lifetime_jitter.unwrap_or_default(),
        }
    }

    /// The jitter added to `max_lifetime` for workers of `slot`; `seed` is
    /// the random input the edge drew once.
    pub fn jitter(&self, slot: Slot, seed: u64) -> Duration {
        const GOLDEN: f64 = 0.618_033_988_749_894_9;
        let phase = (seed >> 11) as f64 / (1u64 << 53) as f64;
        let f = (phase + f64::from(slot.0) * GOLDEN).fract();
        self.lifetime_jitter.mul_f64(f)
    }
}

/// Per-worker recycling state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryState {
    /// Consecutive samples of the worker (tree, or its own process) over the limit.
    pub over: u32,
    /// The latest figure compared to the limit, in bytes.
    pub last: Option<u64>,
    /// The first sample was logged.
    pub(super) sampled: bool,
    /// "Too young to recycle" was logged.
    pub(super) young_logged: bool,
    /// Its age replacement was queued (its deadline no longer counts).
    pub(super) aged: bool,
    /// scope = "process": the worker's descendants seen in the latest sample.
    pub(super) children: BTreeMap<Pid, ChildState>,
    /// A replacement of this worker failed: no new memory or age one before then.
    pub(super) retry_at: Option<Instant>,
}

impl MemoryState {
    /// Its memory or age replacement failed to start: try again at `retry_at`.
    pub(super) fn replacement_failed(&mut self, retry_at: Instant) {
        self.aged = false;
        self.retry_at = Some(retry_at);
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct ChildState {
    pub(super) over: u32,
    pub(super) signalled_at: Option<Instant>,
}

/// A worker over the limit for `grace` samples, old enough to recycle.
struct Bloated {
    id: WorkerId,
    value: u64,
    detail: String,
}

impl Supervisor {
    /// When ready worker `id` is due for age recycling, if its generation
    /// sets `max_lifetime`: `max_lifetime` plus its slot's jitter after it
    /// became ready (so a slow start never makes a worker due the moment it
    /// is ready).
    pub(crate) fn age_deadline(&self, id: WorkerId) -> Option<Instant> {
        let w = self.workers.get(&id)?;
        let r = self.spec_of(w).recycle()?;
        let WorkerState::Ready { since } = w.state else {
            return None;
        };
        let due = later(
            since,
            r.max_lifetime?
                .saturating_add(r.jitter(w.slot, self.settings.seed)),
        );
        Some(w.memory.retry_at.map_or(due, |t| t.max(due)))
    }

    /// Queues every ready worker whose age deadline has passed (the age
    /// deadlines are among the workers' ordered deadlines, see `table.rs`).
    pub(super) fn expire_ages(&mut self, now: Instant) {
        if self.is_stopping() {
            return;
        }
        let due: Vec<(WorkerId, Instant)> = self
            .workers
            .due(now)
            .iter()
            .filter_map(|id| self.workers.get(id))
            .filter(|w| matches!(w.state, WorkerState::Ready { .. }) && !w.memory.aged)
            .filter_map(|w| Some((w.id, self.age_deadline(w.id)?)))
            .filter(|(_, at)| *at <= now)
            .collect();
        for (id, _) in due {
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            let Some(r) = self.spec_of(w).recycle() else {
                continue;
            };
            let WorkerState::Ready { since } = w.state else {
                continue;
            };
            let detail = format!(
                "ready for {} > max_lifetime {} + jitter {}",
                fmt_duration(now.saturating_duration_since(since)),
                fmt_duration(r.max_lifetime.unwrap_or_default()),
                fmt_duration(r.jitter(w.slot, self.settings.seed)),
            );
            self.workers
                .update(&id, super::rules!(self), |w| w.memory.aged = true);
            self.queue_replacement(id, Reason::Age, detail);
        }
    }

    /// One sampling round: count samples over the limit, signal bloated
    /// children (scope = "process"), and queue bloated workers biggest first.
    pub(super) fn on_memory_sample(
        &mut self,
        samples: Vec<TreeSample>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if self.is_stopping() {
            return;
        }
        let mut bloated = Vec::new();
        for s in samples {
            let Some(w) = self.workers.get(&s.id) else {
                continue;
            };
            // Judged by its own generation's rules.
            let spec = self.spec_of(w);
            let Some(r) = spec.recycle() else { continue };
            let resignal_after = spec.drain_timeout();
            // Neither `aged` nor `retry_at` changes here: no index moves.
            let Some(w) = self.workers.get_mut_unindexed(&s.id) else {
                continue;
            };
            if w.pid != Some(s.pid) {
                continue;
            }
            if !matches!(w.state, WorkerState::Ready { .. }) {
                w.memory.over = 0;
                w.memory.children.clear();
                continue;
            }
            let (slot, pid, m) = (w.slot, s.pid, r.metric);
            let value = match r.scope {
                Scope::Tree => s.total(m),
                Scope::Process => s.root().and_then(|p| p.usage.get(m)).unwrap_or(0),
            };
            let what = match r.scope {
                Scope::Tree => metric_name(m).to_string(),
                Scope::Process => format!("own {}", metric_name(m)),
            };
            let state = &mut w.memory;
            state.last = Some(value);
            if !state.sampled {
                state.sampled = true;
                info!(%slot, %pid, metric = metric_name(m), value, rss = s.total(Metric::Rss), processes = s.processes.len(),
                    "worker {slot} (pid {pid}) first memory sample: {what} {}, tree rss {}, {} process(es); limit {}",
                    mib(value), mib(s.total(Metric::Rss)), s.processes.len(), r.limit.map_or("none".into(), mib));
            }
            let Some(limit) = r.limit else { continue };
            if value > limit {
                state.over += 1;
                if state.over == 1 && r.grace > 1 {
                    info!(%slot, %pid, value, limit, "worker {slot} (pid {pid}) {what} {} > {}: over the limit (1 of {} samples)", mib(value), mib(limit), r.grace);
                }
            } else {
                if state.over > 0 {
                    info!(%slot, %pid, value, limit, "worker {slot} (pid {pid}) {what} {} back under {} after {} of {} samples: not replacing", mib(value), mib(limit), state.over, r.grace);
                }
                state.over = 0;
            }
            if state.over >= r.grace.max(1) {
                let age = now.saturating_duration_since(w.started);
                if state.retry_at.is_some_and(|t| now < t) {
                    // Its last replacement failed: wait for the retry time.
                } else if age < r.min_lifetime {
                    if !state.young_logged {
                        state.young_logged = true;
                        info!(%slot, %pid, value, limit, "worker {slot} (pid {pid}) {what} {} > {} for {} samples, but it is {} old, under min_lifetime {}: not recycling it before then",
                            mib(value), mib(limit), state.over, fmt_duration(age), fmt_duration(r.min_lifetime));
                    }
                } else {
                    bloated.push(Bloated {
                        id: s.id,
                        value,
                        detail: format!(
                            "{what} {} > {} for {} samples",
                            mib(value),
                            mib(limit),
                            state.over
                        ),
                    });
                }
            }
            if r.scope == Scope::Process {
                let children = &mut state.children;
                children.retain(|p, _| s.descendants().iter().any(|c| c.pid == *p));
                for c in s.descendants() {
                    let Some(v) = c.usage.get(m) else { continue };
                    let child = children.entry(c.pid).or_default();
                    if v <= limit {
                        child.over = 0;
                        continue;
                    }
                    child.over += 1;
                    if child.over < r.grace.max(1) {
                        continue;
                    }
                    match child.signalled_at {
                        Some(at) if now < later(at, resignal_after) => continue,
                        Some(at) => {
                            warn!(%slot, %pid, child = %c.pid, "worker {slot} (pid {pid}) child pid {} still there {} after {}: sending it again", c.pid, fmt_duration(now.saturating_duration_since(at)), r.child_signal)
                        }
                        None => {}
                    }
                    child.signalled_at = Some(now);
                    self.counters.child_signals += 1;
                    info!(%slot, %pid, child = %c.pid, value = v, limit, signal = %r.child_signal,
                        "worker {slot} (pid {pid}) child pid {} {} {} > {} for {} samples: sending {}",
                        c.pid, metric_name(m), mib(v), mib(limit), child.over, r.child_signal);
                    out.push(Action::SignalProcess {
                        id: s.id,
                        worker: pid,
                        pid: c.pid,
                        signal: r.child_signal,
                    });
                }
            }
        }
        bloated.sort_by_key(|b| std::cmp::Reverse(b.value));
        for b in bloated {
            self.queue_replacement(b.id, Reason::Memory, b.detail);
        }
        self.sort_memory_queue();
    }

    /// Waiting memory replacements, biggest (latest sample) first, in the
    /// queue positions memory entries already hold; other entries keep theirs.
    /// Schedules and starts memory sampling rounds for the ready workers
    /// whose generation has a memory limit.
    pub(super) fn sample_if_due(&mut self, now: Instant, out: &mut Vec<Action>) {
        let interval = self
            .specs
            .values()
            .filter_map(|s| s.memory.as_ref().filter(|m| m.limit.is_some()))
            .map(|m| m.interval)
            .min();
        let Some(interval) = interval else {
            self.sample_at = None;
            return;
        };
        let due = *self.sample_at.get_or_insert_with(|| later(now, interval));
        if now < due || self.is_stopping() {
            return;
        }
        self.sample_at = Some(later(now, interval));
        if let Some(since) = self.sampling {
            if now < later(since, SAMPLE_LOST_AFTER) {
                debug!("the previous memory round is still running; skipping this one");
                return;
            }
            warn!(
                "the memory sampling round started {:?} ago never answered; starting a new one",
                now.saturating_duration_since(since)
            );
        }
        // Only ready workers: decisions are about them, and a tree read while a
        // worker was still starting (children not yet forked) must not be
        // judged after it turned ready.
        let targets: Vec<SampleTarget> = self
            .workers
            .values()
            .filter(|w| w.state.is_ready())
            .filter_map(|w| {
                let r = self.spec_of(w).recycle()?;
                r.limit?;
                Some(SampleTarget {
                    id: w.id,
                    pid: w.pid?,
                    metric: r.metric,
                })
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        self.sampling = Some(now);
        out.push(Action::Sample { targets });
    }

    fn sort_memory_queue(&mut self) {
        let at: Vec<usize> = (0..self.queue.len())
            .filter(|&i| matches!(self.queue[i], (_, Reason::Memory, Some(_))))
            .collect();
        let mut entries: Vec<_> = at.iter().map(|&i| self.queue[i]).collect();
        let size = |e: &(Slot, Reason, Option<WorkerId>)| {
            e.2.and_then(|id| self.workers.get(&id))
                .and_then(|w| w.memory.last)
                .unwrap_or(0)
        };
        entries.sort_by_key(|e| std::cmp::Reverse(size(e)));
        for (i, e) in at.into_iter().zip(entries) {
            self.queue[i] = e;
        }
    }
}

/// "rss", "pss" or "uss", as in the config.
pub(crate) fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::Rss => "rss",
        Metric::Pss => "pss",
        Metric::Uss => "uss",
    }
}

/// A duration to the millisecond at most ("2s 231ms").
fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mib_rounds() {
        assert_eq!(mib(611 * MIB + 100), "611 MiB");
        assert_eq!(mib(MIB / 2), "1 MiB");
    }
}
