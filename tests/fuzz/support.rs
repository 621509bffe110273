//! The fuzz runner: proptest's `TestRunner` with holdfast's rules for CI.
//!
//! Every property runs twice: with [`FIXED_SEED`] (the same cases on every
//! run, so a change that breaks one fails every CI run), then with a fresh
//! random seed (new cases each run). A failure names the seed, the minimal
//! input proptest shrank it to, and the command that replays it:
//!
//! ```text
//! HOLDFAST_FUZZ_SEED=<seed> HOLDFAST_FUZZ_CASES=<n> cargo test --release --test fuzz <name>
//! ```
//!
//! - `HOLDFAST_FUZZ_CASES=N`: N cases per property and pass instead of the
//!   property's CI count (the long run: `N=1000000`).
//! - `HOLDFAST_FUZZ_SEED=S`: one pass with seed S only (to replay a failure).
//!
//! The seed of every failing case is also appended to
//! `tests/fuzz/regressions/<name>.txt`; proptest replays those seeds first on
//! every later run, so an input that once failed stays a test case (check
//! the file in with the fix). Each defect also has an explicit regression
//! test with its input written out.
//!
//! Time is bounded per case: a case slower than [`SLOW_CASE`] fails (and
//! shrinks to the smallest slow input); one that runs past [`HUNG_CASE`]
//! aborts the whole binary after printing its input, so a hang cannot stall
//! CI.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};

/// The seed of the deterministic pass.
pub const FIXED_SEED: u64 = 0x686f_6c64_6661_7374; // "holdfast"
/// A case that takes longer fails the property.
pub const SLOW_CASE: Duration = Duration::from_secs(5);
/// A case that takes longer is a hang: the binary aborts.
pub const HUNG_CASE: Duration = Duration::from_secs(60);

/// Runs `test` on cases of `strategy`: `ci_cases` per pass unless
/// `HOLDFAST_FUZZ_CASES` says otherwise. Panics with the seed, the minimal
/// input and the replay command on the first failure.
pub fn fuzz<S>(
    name: &'static str,
    ci_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Clone + Debug + Send + 'static,
{
    let cases =
        env_u64("HOLDFAST_FUZZ_CASES").map_or(ci_cases, |n| n.clamp(1, u32::MAX as u64) as u32);
    let seeds: Vec<(u64, &str)> = match env_u64("HOLDFAST_FUZZ_SEED") {
        Some(s) => vec![(s, "the seed of HOLDFAST_FUZZ_SEED")],
        None => vec![
            (FIXED_SEED, "the fixed seed"),
            (random_seed(), "a random seed"),
        ],
    };
    let regressions: &'static str = Box::leak(
        format!(
            "{}/tests/fuzz/regressions/{name}.txt",
            env!("CARGO_MANIFEST_DIR")
        )
        .into_boxed_str(),
    );
    for (seed, which) in seeds {
        let started = Instant::now();
        let config = Config {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
            max_shrink_iters: 4096,
            max_shrink_time: 60_000,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&strategy, |value| timed(name, value, &test));
        match result {
            Ok(()) => eprintln!(
                "fuzz {name}: {cases} cases with {which} {seed} passed in {:.2?}",
                started.elapsed()
            ),
            Err(TestError::Fail(reason, value)) => panic!(
                "fuzz {name} failed with {which} {seed}: {reason}\n\
                 minimal input: {value:#?}\n\
                 replay: HOLDFAST_FUZZ_SEED={seed} HOLDFAST_FUZZ_CASES={cases} cargo test --release --test fuzz {name}"
            ),
            Err(TestError::Abort(reason)) => {
                panic!("fuzz {name} aborted with {which} {seed}: {reason}")
            }
        }
    }
}

/// Runs one case under the watchdog and fails it when it is slow.
fn timed<V: Clone + Debug + Send + 'static>(
    name: &'static str,
    value: V,
    test: &impl Fn(V) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let me = watch(name, Box::new(value.clone()));
    let started = Instant::now();
    let result = test(value);
    unwatch(me);
    let took = started.elapsed();
    if result.is_ok() && took > SLOW_CASE {
        return Err(TestCaseError::fail(format!(
            "a case took {took:.2?} (the bound is {SLOW_CASE:?})"
        )));
    }
    result
}

type Running = BTreeMap<u64, (&'static str, Instant, Box<dyn Debug + Send>)>;

fn running() -> &'static Mutex<Running> {
    static RUNNING: OnceLock<Mutex<Running>> = OnceLock::new();
    RUNNING.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = Instant::now();
            let map = running().lock().unwrap_or_else(|e| e.into_inner());
            for (name, since, input) in map.values() {
                if now.duration_since(*since) > HUNG_CASE {
                    eprintln!(
                        "fuzz {name}: a case has run for more than {HUNG_CASE:?}: a hang. Input:\n{input:#?}"
                    );
                    std::process::abort();
                }
            }
        });
        Mutex::new(BTreeMap::new())
    })
}

fn watch(name: &'static str, input: Box<dyn Debug + Send>) -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    running()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, (name, Instant::now(), input));
    id
}

fn unwatch(id: u64) {
    running()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
}

fn env_u64(var: &str) -> Option<u64> {
    let v = std::env::var(var).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{var}={v:?} is not a whole number"),
    }
}

/// A seed nobody chose: the std hasher's per-process random keys.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// `Err(fail)` unless `cond`, with the message: for `?` in properties
/// (proptest's `prop_assert!` works too; this one formats lazily).
pub fn ensure(cond: bool, why: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(why()))
    }
}

/// One byte-level edit of a text, after any structural ones: the config,
/// control and handover fuzzers each draw them with their own tokens and
/// ranges (offsets wrap around the text's length).
#[derive(Debug, Clone)]
pub enum Splice {
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// The line at that index (wrapping) written twice.
    RepeatLine {
        line: usize,
    },
}

impl Splice {
    pub fn apply(&self, text: &mut Vec<u8>) {
        let n = text.len();
        match self {
            Splice::Insert { at, bytes } => {
                let at = at % (n + 1);
                text.splice(at..at, bytes.iter().copied());
            }
            Splice::Delete { at, len } => {
                let at = at % (n + 1);
                text.drain(at..(at + len).min(n));
            }
            Splice::Truncate { at } => text.truncate(at % (n + 1)),
            Splice::RepeatLine { line } => {
                let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
                let l = lines[line % lines.len()].to_vec();
                let mut out = Vec::new();
                for (i, x) in lines.iter().enumerate() {
                    out.extend_from_slice(x);
                    out.push(b'\n');
                    if i == line % lines.len() {
                        out.extend_from_slice(&l);
                        out.push(b'\n');
                    }
                }
                *text = out;
            }
        }
    }
}
