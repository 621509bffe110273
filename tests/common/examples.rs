//! The project's own `examples/` as tests use them: the example configs
//! with their listener and `cwd` pointed at the test's.

use std::fs;
use std::path::PathBuf;

pub fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// `examples/apps`: the Rack and WSGI apps the example configs run.
pub fn apps_dir() -> PathBuf {
    examples_dir().join("apps")
}

/// `text` with the one occurrence of `from` replaced; panics if it occurs
/// other than once (the example changed under the test).
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    let n = text.matches(from).count();
    assert_eq!(
        n, 1,
        "expected `{from}` exactly once, found {n} times in:\n{text}"
    );
    text.replacen(from, to, 1)
}

/// `examples/NAME` ready to run in a test's temp dir: its listener on
/// `{port}` and its `cwd` made absolute. Everything else is the example.
pub fn example_config(name: &str) -> String {
    let path = examples_dir().join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let text = replace_once(
        &text,
        "address = \"127.0.0.1:8080\"",
        "address = \"127.0.0.1:{port}\"",
    );
    replace_once(
        &text,
        "cwd = \"apps\"",
        &format!("cwd = \"{}\"", apps_dir().display()),
    )
}
