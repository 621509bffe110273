//! The workers, with the indexes that keep each event's cost independent of
//! how many there are.
//!
//! Every change of a worker goes through [`Workers::insert`],
//! [`Workers::remove`] or [`Workers::update`], which take it out of every
//! index and put it back: by pid, by slot, ready counts per slot and per
//! generation, the slots with no active or no ready worker, and its next
//! deadline (state deadline or age recycling) in an ordered set. Then
//! "which worker has pid P", "is every slot ready", "when is the next
//! deadline" and "which deadlines passed" cost O(log N), and a whole-table
//! walk is left to answers that need every worker (status, a rollout's
//! plan, a stop). The indexes are derived: an upgrade's handover carries
//! the workers only, and [`Workers::insert`] rebuilds them on restore.
//! [`Workers::check`] recomputes them from scratch; the core's table tests
//! run it after every step.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use super::{later, Spec, Worker, WorkerState};
use crate::config::ReadyMode;
use crate::ids::{Generation, Pid, Slot, WorkerId};

/// What the deadline of a worker depends on besides the worker itself.
pub(super) struct Rules<'a> {
    pub(super) specs: &'a BTreeMap<Generation, Spec>,
    /// The lifetime jitter's seed.
    pub(super) seed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Workers {
    map: BTreeMap<WorkerId, Worker>,
    by_pid: HashMap<Pid, WorkerId>,
    by_slot: BTreeSet<(Slot, WorkerId)>,
    active_in: HashMap<Slot, u32>,
    ready_in: HashMap<Slot, u32>,
    ready_by_generation: BTreeMap<Generation, usize>,
    by_generation: BTreeMap<Generation, usize>,
    ready: usize,
    /// The slot count: slots at or above it are never empty nor unready.
    slots: u32,
    /// Slots below `slots` with no active worker.
    empty: BTreeSet<Slot>,
    /// Slots below `slots` with no ready worker.
    unready: BTreeSet<Slot>,
    deadlines: BTreeSet<(Instant, WorkerId)>,
    deadline_of: HashMap<WorkerId, Instant>,
    /// Walks of every worker ([`Self::values`], [`Self::keys`]) so far: a
    /// table test asserts a worker's start, readiness and exit make none.
    #[cfg(test)]
    pub(crate) walks: std::cell::Cell<u64>,
}

/// The moment something must happen to `w` by itself: the end of its state
/// (ready timeout or ready delay, drain's SIGKILL) or, ready, its age
/// recycling (see `Supervisor::age_deadline`).
fn deadline(w: &Worker, rules: &Rules<'_>) -> Option<Instant> {
    let spec = rules.specs.get(&w.generation);
    match w.state {
        WorkerState::Starting { ready_by } => {
            let delay = spec
                .filter(|s| s.ready() == ReadyMode::Delay)
                .map(|s| later(w.started, s.app.ready_delay));
            Some(delay.map_or(ready_by, |d| d.min(ready_by)))
        }
        WorkerState::Checking { ready_by } => Some(ready_by),
        WorkerState::Draining { kill_at } | WorkerState::Stopping { kill_at } => Some(kill_at),
        WorkerState::Ready { since } if !w.memory.aged => {
            let r = spec?.recycle()?;
            let due = later(
                since,
                r.max_lifetime?.saturating_add(r.jitter(w.slot, rules.seed)),
            );
            Some(w.memory.retry_at.map_or(due, |t| t.max(due)))
        }
        _ => None,
    }
}

fn bump<K: Ord>(m: &mut BTreeMap<K, usize>, k: K, up: bool) {
    let n = m.entry(k).or_default();
    if up {
        *n += 1;
    } else {
        *n = n.saturating_sub(1);
    }
}

impl Workers {
    pub(crate) fn get(&self, id: &WorkerId) -> Option<&Worker> {
        self.map.get(id)
    }
    pub(crate) fn contains_key(&self, id: &WorkerId) -> bool {
        self.map.contains_key(id)
    }
    /// Every worker, by id (the order they were started in): a walk of the
    /// whole table, for answers that need every worker.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Worker> {
        #[cfg(test)]
        self.walks.set(self.walks.get() + 1);
        self.map.values()
    }
    pub(crate) fn keys(&self) -> impl Iterator<Item = &WorkerId> {
        #[cfg(test)]
        self.walks.set(self.walks.get() + 1);
        self.map.keys()
    }
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    /// The unreaped worker whose own pid is `pid`.
    pub(crate) fn by_pid(&self, pid: Pid) -> Option<WorkerId> {
        self.by_pid.get(&pid).copied()
    }
    /// The workers of `slot`, by id.
    pub(crate) fn in_slot(&self, slot: Slot) -> impl Iterator<Item = &Worker> {
        self.by_slot
            .range((slot, WorkerId(0))..=(slot, WorkerId(u64::MAX)))
            .filter_map(|(_, id)| self.map.get(id))
    }
    /// The workers of slots `from` and above, by slot.
    pub(crate) fn in_slots_from(&self, from: Slot) -> impl Iterator<Item = &Worker> {
        self.by_slot
            .range((from, WorkerId(0))..)
            .filter_map(|(_, id)| self.map.get(id))
    }
    pub(crate) fn ready_count(&self) -> usize {
        self.ready
    }
    /// Ready workers of `generation`.
    pub(crate) fn ready_in_generation(&self, generation: Generation) -> usize {
        self.ready_by_generation
            .get(&generation)
            .copied()
            .unwrap_or(0)
    }
    /// The generations that ready workers run.
    pub(crate) fn ready_generations(&self) -> impl Iterator<Item = Generation> + '_ {
        self.ready_by_generation
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(g, _)| *g)
    }
    /// The generations that some worker runs.
    pub(crate) fn generations(&self) -> impl Iterator<Item = Generation> + '_ {
        self.by_generation
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(g, _)| *g)
    }
    /// Slots (below the slot count) with no active worker, in order.
    pub(crate) fn empty_slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.empty.iter().copied()
    }
    /// Whether every slot has a ready worker.
    pub(crate) fn all_slots_ready(&self) -> bool {
        self.unready.is_empty()
    }
    /// The earliest deadline of any worker.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }
    /// The workers whose deadline is `now` or earlier, earliest first.
    pub(crate) fn due(&self, now: Instant) -> Vec<WorkerId> {
        self.deadlines
            .range(..=(now, WorkerId(u64::MAX)))
            .map(|(_, id)| *id)
            .collect()
    }

    /// Sets the slot count.
    pub(crate) fn set_slots(&mut self, slots: u32) {
        if slots < self.slots {
            self.empty.split_off(&Slot(slots));
            self.unready.split_off(&Slot(slots));
        }
        for s in self.slots..slots {
            let slot = Slot(s);
            if self.active_in.get(&slot).copied().unwrap_or(0) == 0 {
                self.empty.insert(slot);
            }
            if self.ready_in.get(&slot).copied().unwrap_or(0) == 0 {
                self.unready.insert(slot);
            }
        }
        self.slots = slots;
    }

    pub(crate) fn insert(&mut self, w: Worker, rules: &Rules<'_>) {
        let id = w.id;
        self.remove(&id);
        self.map.insert(id, w);
        self.index(id, rules);
    }

    pub(crate) fn remove(&mut self, id: &WorkerId) -> Option<Worker> {
        self.unindex(*id);
        self.map.remove(id)
    }

    /// Worker `id` to change fields that no index reads: `status`,
    /// `not_serving`, and `memory` except `aged` and `retry_at` (which move
    /// its age deadline: change those through [`Self::update`]).
    pub(crate) fn get_mut_unindexed(&mut self, id: &WorkerId) -> Option<&mut Worker> {
        self.map.get_mut(id)
    }

    /// Changes worker `id` with `f`, and its indexes with it.
    pub(crate) fn update<R>(
        &mut self,
        id: &WorkerId,
        rules: &Rules<'_>,
        f: impl FnOnce(&mut Worker) -> R,
    ) -> Option<R> {
        if !self.map.contains_key(id) {
            return None;
        }
        self.unindex(*id);
        let out = self.map.get_mut(id).map(f);
        self.index(*id, rules);
        out
    }

    fn count_slot(
        map: &mut HashMap<Slot, u32>,
        set: &mut BTreeSet<Slot>,
        slots: u32,
        slot: Slot,
        up: bool,
    ) {
        let n = map.entry(slot).or_default();
        if up {
            *n += 1;
            if *n == 1 {
                set.remove(&slot);
            }
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&slot);
                if slot.0 < slots {
                    set.insert(slot);
                }
            }
        }
    }

    fn index(&mut self, id: WorkerId, rules: &Rules<'_>) {
        let Some(w) = self.map.get(&id) else { return };
        self.change(id, true, deadline(w, rules));
    }

    fn unindex(&mut self, id: WorkerId) {
        if self.map.contains_key(&id) {
            self.change(id, false, None);
        }
    }

    fn change(&mut self, id: WorkerId, up: bool, at: Option<Instant>) {
        let Some(w) = self.map.get(&id) else { return };
        let (slot, generation, pid) = (w.slot, w.generation, w.pid);
        let (active, ready) = (w.state.is_active(), w.state.is_ready());
        if up {
            if let Some(pid) = pid {
                self.by_pid.insert(pid, id);
            }
            self.by_slot.insert((slot, id));
        } else {
            if let Some(pid) = pid {
                if self.by_pid.get(&pid) == Some(&id) {
                    self.by_pid.remove(&pid);
                }
            }
            self.by_slot.remove(&(slot, id));
        }
        bump(&mut self.by_generation, generation, up);
        if active {
            Self::count_slot(&mut self.active_in, &mut self.empty, self.slots, slot, up);
        }
        if ready {
            Self::count_slot(&mut self.ready_in, &mut self.unready, self.slots, slot, up);
            bump(&mut self.ready_by_generation, generation, up);
            if up {
                self.ready += 1;
            } else {
                self.ready = self.ready.saturating_sub(1);
            }
        }
        if up {
            if let Some(at) = at {
                self.deadlines.insert((at, id));
                self.deadline_of.insert(id, at);
            }
        } else if let Some(at) = self.deadline_of.remove(&id) {
            self.deadlines.remove(&(at, id));
        }
    }

    /// Recomputes every index from the workers and compares: `Err` names
    /// the first that differs.
    #[cfg(test)]
    pub(crate) fn check(&self, rules: &Rules<'_>) -> Result<(), String> {
        let mut fresh = Workers::default();
        fresh.set_slots(self.slots);
        for w in self.map.values() {
            fresh.insert(w.clone(), rules);
        }
        let nonzero = |m: &BTreeMap<Generation, usize>| -> BTreeMap<Generation, usize> {
            m.iter()
                .filter(|(_, n)| **n > 0)
                .map(|(g, n)| (*g, *n))
                .collect()
        };
        let pairs: [(&str, bool); 10] = [
            ("by_pid", fresh.by_pid == self.by_pid),
            ("by_slot", fresh.by_slot == self.by_slot),
            ("active_in", fresh.active_in == self.active_in),
            ("ready_in", fresh.ready_in == self.ready_in),
            (
                "ready_by_generation",
                nonzero(&fresh.ready_by_generation) == nonzero(&self.ready_by_generation),
            ),
            (
                "by_generation",
                nonzero(&fresh.by_generation) == nonzero(&self.by_generation),
            ),
            ("ready", fresh.ready == self.ready),
            ("empty", fresh.empty == self.empty),
            ("unready", fresh.unready == self.unready),
            (
                "deadlines",
                fresh.deadlines == self.deadlines && fresh.deadline_of == self.deadline_of,
            ),
        ];
        match pairs.iter().find(|(_, same)| !same) {
            Some((name, _)) => Err(format!("index {name} differs from the workers: {self:?}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::MemoryState;

    fn worker(id: u64, slot: u32, pid: Option<i32>, state: WorkerState, t0: Instant) -> Worker {
        Worker {
            id: WorkerId(id),
            slot: Slot(slot),
            generation: Generation(1),
            pid: pid.map(Pid),
            state,
            started: t0,
            status: None,
            memory: MemoryState::default(),
            not_serving: 0,
        }
    }

    /// Slots that shrink and grow around workers, a pid taken over by a
    /// new worker after the old one left, and deadlines that move with the
    /// state: every index equals one recomputed from scratch at each turn.
    #[test]
    fn indexes_follow_slots_pids_and_states() {
        let specs = BTreeMap::new();
        let rules = Rules {
            specs: &specs,
            seed: 0,
        };
        let t0 = Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let mut t = Workers::default();
        t.set_slots(3);
        assert_eq!(
            t.empty_slots().collect::<Vec<_>>(),
            [Slot(0), Slot(1), Slot(2)]
        );
        t.insert(
            worker(
                1,
                0,
                Some(100),
                WorkerState::Starting { ready_by: at(50) },
                t0,
            ),
            &rules,
        );
        t.insert(
            worker(2, 2, Some(101), WorkerState::Ready { since: t0 }, t0),
            &rules,
        );
        t.check(&rules).expect("after insert");
        assert_eq!(t.empty_slots().collect::<Vec<_>>(), [Slot(1)]);
        assert_eq!(t.next_deadline(), Some(at(50)));
        assert_eq!(t.due(at(49)), []);
        assert_eq!(t.due(at(50)), [WorkerId(1)]);
        assert!(!t.all_slots_ready());
        // Shrink below the ready worker's slot, then grow back over it.
        t.set_slots(2);
        t.check(&rules).expect("after shrink");
        assert_eq!(t.empty_slots().collect::<Vec<_>>(), [Slot(1)]);
        t.set_slots(4);
        t.check(&rules).expect("after grow");
        assert_eq!(t.empty_slots().collect::<Vec<_>>(), [Slot(1), Slot(3)]);
        t.set_slots(2);
        // Slot 0 becomes ready, slot 1 gets one: every slot ready.
        t.update(&WorkerId(1), &rules, |w| {
            w.state = WorkerState::Ready { since: at(10) }
        });
        t.insert(
            worker(3, 1, Some(102), WorkerState::Ready { since: t0 }, t0),
            &rules,
        );
        assert!(t.all_slots_ready());
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.ready_count(), 3);
        assert_eq!(t.ready_in_generation(Generation(1)), 3);
        // Worker 1 drains and exits; its pid is reused by a new worker.
        t.update(&WorkerId(1), &rules, |w| {
            w.state = WorkerState::Draining { kill_at: at(90) }
        });
        assert_eq!(t.next_deadline(), Some(at(90)));
        assert!(!t.all_slots_ready());
        assert!(t.remove(&WorkerId(1)).is_some());
        t.insert(worker(4, 0, Some(100), WorkerState::Spawning, t0), &rules);
        assert_eq!(t.by_pid(Pid(100)), Some(WorkerId(4)));
        assert_eq!(
            t.in_slot(Slot(0)).map(|w| w.id).collect::<Vec<_>>(),
            [WorkerId(4)]
        );
        assert_eq!(t.next_deadline(), None);
        t.check(&rules).expect("after reuse");
        assert_eq!(t.walks.get(), 0);
    }
}
