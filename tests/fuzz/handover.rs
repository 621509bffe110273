//! An in-place upgrade's handover, as the new image reads it: the state
//! (JSON in a memfd) and the manifest (text, one fd per line).
//!
//! The state: arbitrary bytes; and structure-aware mutations of two states
//! recorded from real upgrades (`handover/state-*.json`: two workers idle,
//! and three during a rollout with a control connection waiting): any value
//! in the tree replaced by one of another type or at the edge of its range,
//! removed, repeated or dropped from its array, or replaced by another part
//! of the state, then the text cut and spliced. Properties: no panic, no
//! hang; the new image gets either the state (the supervisor restored from
//! it also survives its first steps: timers, every worker's exit, a scale,
//! a stop) or an error, which makes it fall back to a rolling restart. The
//! recorded states themselves are adopted, and their manifests read back.
//!
//! The manifest: arbitrary text never panics, and what it parses to renders
//! to text that parses back to the same; any manifest of generated entries
//! (names and paths with `%`, spaces, newlines) renders and parses back to
//! itself.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use holdfast::fuzzing::{adopt_state, Entry, Manifest};
use holdfast::ids::{Pid, Slot};
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::support::{ensure, fuzz, Splice};

const STATES: &[(&str, &str, usize)] = &[
    ("idle", include_str!("handover/state-idle.json"), 2),
    ("rollout", include_str!("handover/state-rollout.json"), 3),
];

/// The manifests written with them, and how many workers each names.
const MANIFESTS: &[(&str, &str, usize)] = &[
    ("idle", include_str!("handover/manifest-idle.txt"), 2),
    ("rollout", include_str!("handover/manifest-rollout.txt"), 3),
];

/// A recorded state, as if this process had written it.
fn seed(i: usize) -> Value {
    let mut v: Value = serde_json::from_str(STATES[i].1).expect("a recorded state parses");
    v["pid"] = json!(std::process::id());
    v
}

#[test]
fn handover_recorded_states_are_adopted() {
    for (i, (name, _, workers)) in STATES.iter().enumerate() {
        let bytes = serde_json::to_vec(&seed(i)).expect("encode");
        assert_eq!(
            adopt_state(&bytes, std::process::id()),
            Ok(*workers),
            "{name}"
        );
        // Written by another pid: not ours.
        let e = adopt_state(&bytes, std::process::id() + 1).expect_err(name);
        assert!(e.contains("was written by pid"), "{e}");
    }
    for (name, text, workers) in MANIFESTS {
        let m = Manifest::parse(text);
        assert_eq!(&m.render(), text, "{name}");
        let named = m.0.iter().filter(|e| matches!(e, Entry::Worker { .. }));
        assert_eq!(named.count(), *workers, "{name}");
    }
}

/// One change to the JSON tree. A node is picked by its number in a
/// depth-first walk of the whole tree (modulo their count), so a deep field
/// (a worker's slot, a deadline) is as likely as a top-level one.
#[derive(Debug, Clone)]
enum Edit {
    Set {
        node: usize,
        value: Value,
    },
    /// Removes the node from its object or array.
    Remove {
        node: usize,
    },
    /// Repeats the node in its array (two workers with one id, ...).
    Repeat {
        node: usize,
    },
    /// Puts a copy of the node `from` in place of the node `node`.
    Graft {
        node: usize,
        from: usize,
    },
}

fn values() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::sample::select(vec![
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(1),
            json!(2),
            json!(3),
            json!(-1),
            json!(255),
            json!(256),
            json!(i32::MAX),
            json!(i64::from(i32::MAX) + 1),
            json!(i32::MIN),
            json!(u32::MAX),
            json!(u64::from(u32::MAX) + 1),
            json!(i64::MAX),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(1.5),
            json!(-0.0),
            json!(1e300),
            json!(""),
            json!("0"),
            json!("TERM"),
            json!("KILL"),
            json!("1s"),
            json!("0s"),
            json!("500000000000years"),
            json!("512.0 MiB"),
            json!("18446744073709551615 B"),
            json!("127.0.0.1:0"),
            json!("unix:"),
            json!("systemd:x"),
            json!("/"),
            json!("ready"),
            json!({"ready": {"since": 0}}),
            json!({"draining": {"kill_at": i64::MIN}}),
            json!({"starting": {"ready_by": i64::MAX}}),
            json!("killed"),
            json!("spawning"),
            json!({"stopping": {"waiters": [1, 1]}}),
            json!("running"),
            json!([]),
            json!([0]),
            json!([[0, 0]]),
            json!({}),
        ]),
        1 => ".{0,12}".prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let node = any::<usize>;
    prop_oneof![
        6 => (node(), values()).prop_map(|(node, value)| Edit::Set { node, value }),
        2 => node().prop_map(|node| Edit::Remove { node }),
        1 => node().prop_map(|node| Edit::Repeat { node }),
        1 => (node(), node()).prop_map(|(node, from)| Edit::Graft { node, from }),
    ]
}

/// Every node's path (child indexes from the root), depth first.
fn paths(v: &Value) -> Vec<Vec<usize>> {
    fn go(v: &Value, at: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        out.push(at.clone());
        let children: Vec<&Value> = match v {
            Value::Array(a) => a.iter().collect(),
            Value::Object(o) => o.values().collect(),
            _ => Vec::new(),
        };
        for (i, c) in children.into_iter().enumerate() {
            at.push(i);
            go(c, at, out);
            at.pop();
        }
    }
    let mut out = Vec::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

fn walk<'a>(mut v: &'a mut Value, path: &[usize]) -> &'a mut Value {
    for &i in path {
        v = match v {
            Value::Array(a) => &mut a[i],
            Value::Object(o) => o.values_mut().nth(i).expect("a child"),
            _ => unreachable!("a path from paths()"),
        };
    }
    v
}

fn apply(root: &mut Value, e: &Edit) {
    let all = paths(root);
    let pick = |n: usize| all[n % all.len()].clone();
    match e {
        Edit::Set { node, value } => *walk(root, &pick(*node)) = value.clone(),
        Edit::Graft { node, from } => {
            let copy = walk(root, &pick(*from)).clone();
            *walk(root, &pick(*node)) = copy;
        }
        Edit::Remove { node } | Edit::Repeat { node } => {
            let path = pick(*node);
            let Some((last, parent)) = path.split_last() else {
                return;
            };
            match (walk(root, parent), e) {
                (Value::Array(a), Edit::Remove { .. }) => {
                    a.remove(*last);
                }
                (Value::Array(a), _) => {
                    let copy = a[*last].clone();
                    a.insert(*last, copy);
                }
                (Value::Object(o), Edit::Remove { .. }) => {
                    let key = o.keys().nth(*last).cloned().expect("a key");
                    o.remove(&key);
                }
                _ => {}
            }
        }
    }
}

fn splice() -> impl Strategy<Value = Splice> {
    let at = 0usize..8000;
    let bytes = prop_oneof![
        prop::sample::select(vec![
            "{", "}", "[", "]", ",", ":", "\"", "\\", "null", "-", "0", "1e999", "\\ud800",
        ])
        .prop_map(|t| t.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 1..6),
    ];
    prop_oneof![
        3 => (at.clone(), bytes).prop_map(|(at, bytes)| Splice::Insert { at, bytes }),
        2 => (at.clone(), 1usize..20).prop_map(|(at, len)| Splice::Delete { at, len }),
        1 => at.prop_map(|at| Splice::Truncate { at }),
    ]
}

/// A state's bytes, shown as text.
#[derive(Clone)]
struct State(Vec<u8>);

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "State({:?})", String::from_utf8_lossy(&self.0))
    }
}

fn mutated() -> impl Strategy<Value = (usize, Vec<Edit>, Vec<Splice>)> {
    (
        0..STATES.len(),
        prop::collection::vec(edit(), 1..5),
        prop_oneof![
            4 => Just(Vec::new()),
            1 => prop::collection::vec(splice(), 1..3),
        ],
    )
}

/// The property: the state, or an error; never a panic (the runner fails
/// a case that panics, and one that hangs).
fn adopted_or_refused(bytes: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
    match adopt_state(bytes, std::process::id()) {
        Ok(_) => {
            ADOPTED.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => ensure(!e.trim().is_empty(), || "an empty error".into()),
    }
}

/// How many cases were adopted (the others fell back): a mutation that is
/// always refused would test little past the decoder.
static ADOPTED: AtomicUsize = AtomicUsize::new(0);

#[test]
fn handover_state_mutated() {
    let seeds: Vec<Value> = (0..STATES.len()).map(seed).collect();
    let input = mutated().prop_map(move |(i, edits, splices)| {
        let mut v = seeds[i].clone();
        for e in &edits {
            apply(&mut v, e);
        }
        let mut text = serde_json::to_vec(&v).expect("encode");
        for s in &splices {
            s.apply(&mut text);
        }
        State(text)
    });
    fuzz("handover_state_mutated", 3000, input, |s| {
        adopted_or_refused(&s.0)
    });
    eprintln!(
        "fuzz handover_state_mutated: {} cases adopted, the rest refused",
        ADOPTED.load(Ordering::Relaxed)
    );
}

#[test]
fn handover_state_arbitrary() {
    let input = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        // An envelope this image reads, then anything.
        prop::collection::vec(any::<u8>(), 0..200).prop_map(|tail| {
            let mut b = format!(
                "{{\"format\":1,\"from_version\":\"0\",\"pid\":{},\"core\":",
                std::process::id()
            )
            .into_bytes();
            b.extend(tail);
            b
        }),
    ]
    .prop_map(State);
    fuzz("handover_state_arbitrary", 3000, input, |s| {
        adopted_or_refused(&s.0)
    });
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,20}",
        ".{0,12}",
        prop::sample::select(vec![
            "", " ", "%", "%25", "%0A", "\n", "a b", "x\r", "\r\n", "%0"
        ])
        .prop_map(str::to_string),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    let fd = prop_oneof![3..1024i32, any::<i32>()];
    prop_oneof![
        (fd.clone(), text()).prop_map(|(fd, name)| Entry::Listen { fd, name }),
        (1..i32::MAX, any::<u32>()).prop_map(|(p, s)| Entry::Worker {
            pid: Pid(p),
            slot: Slot(s),
        }),
        (fd.clone(), 1..i32::MAX, any::<u32>(), 1u8..=2).prop_map(|(fd, p, s, stream)| {
            Entry::Pipe {
                fd,
                pid: Pid(p),
                slot: Slot(s),
                stream,
            }
        }),
        (fd.clone(), text()).prop_map(|(fd, p)| Entry::Control {
            fd,
            path: PathBuf::from(p),
        }),
        fd.clone().prop_map(|fd| Entry::Metrics { fd }),
        fd.clone().prop_map(|fd| Entry::Conn { fd }),
        text().prop_map(|p| Entry::Rundir {
            path: PathBuf::from(p),
        }),
        fd.prop_map(|fd| Entry::Other { fd }),
    ]
}

/// Whether an entry is one an image can write: a socket's name and the
/// paths are not empty (an empty one is no entry of its role).
fn writable(e: &Entry) -> bool {
    match e {
        Entry::Listen { name, .. } => !name.is_empty(),
        Entry::Control { path, .. } | Entry::Rundir { path } => !path.as_os_str().is_empty(),
        Entry::Other { fd } | Entry::Metrics { fd } | Entry::Conn { fd } => *fd > 2,
        Entry::Pipe { fd, .. } => *fd > 2,
        Entry::Worker { .. } => true,
    }
}

#[test]
fn handover_manifest_round_trips() {
    let input =
        prop::collection::vec(entry().prop_filter("writable", writable), 0..8).prop_map(Manifest);
    fuzz("handover_manifest_round_trips", 3000, input, |m| {
        let text = m.render();
        let back = Manifest::parse(&text);
        ensure(back == m, || format!("{text:?} parses as {back:?}"))
    });
}

#[test]
fn handover_manifest_arbitrary() {
    let line = prop_oneof![
        "[ -~]{0,30}",
        (
            prop::sample::select(vec![
                "listen", "worker", "pipe", "control", "metrics", "conn", "rundir", "other", "x",
            ]),
            prop_oneof![any::<i64>().prop_map(|n| n.to_string()), "[0-9 -]{0,6}"],
            text(),
        )
            .prop_map(|(r, n, rest)| format!("{r} {n} {rest}")),
    ];
    let input = prop::collection::vec(line, 0..10).prop_map(|l| l.join("\n"));
    fuzz("handover_manifest_arbitrary", 3000, input, |text| {
        let m = Manifest::parse(&text);
        let again = Manifest::parse(&m.render());
        ensure(again == m, || {
            format!("{m:?} renders and parses as {again:?}")
        })
    });
}
