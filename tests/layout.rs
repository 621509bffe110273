//! The shape of `src/`, checked: the top-level modules import each other
//! without cycles, and `unsafe` lives in `src/os/sys.rs` only.
//!
//! A top-level module is a file or folder directly under `src/` (`core`,
//! `edge`, `os`, `ids`, ...). Module `a` depends on `b` when a file under `a`
//! names `crate::b` outside a comment: in a `use` line or inline. A cycle
//! means a type lives in the wrong home (see STYLE.md, "Layout"); the
//! failure names the cycle and, for each step, a file and line that makes it.
//!
//! `src/main.rs` and `src/lib.rs` are the roots and `src/bin/` is other
//! crates (the test worker): they are not modules of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// For each module, the modules it names, with one place that names each.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module `path` belongs to, or `None` for the crate roots and
/// the other binaries.
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).expect("under src/");
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" | "bin" => None,
        file => Some(file.trim_end_matches(".rs").to_string()),
    }
}

/// The code of a line: without its `//` comment (a `//` inside a string is
/// rare enough in this code base to ignore).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or_default()
}

/// The modules named as `crate::NAME` in `text`, with their line numbers.
fn named_modules(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = code(line);
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + "crate::".len()..];
            // `holdfast_crate::` or `$crate::` are not ours.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push((i + 1, name));
            }
        }
    }
    out
}

/// The module graph of the files under `src/` (`texts`: path and content).
fn graph(texts: &[(PathBuf, String)]) -> Graph {
    let mut g = Graph::new();
    for (path, text) in texts {
        let Some(from) = module_of(path) else {
            continue;
        };
        let edges = g.entry(from.clone()).or_default();
        for (line, to) in named_modules(text) {
            if to != from {
                edges
                    .entry(to)
                    .or_insert_with(|| format!("{}:{line}", path.display()));
            }
        }
    }
    g
}

/// One cycle of `g`, as the list of modules around it (first = last), if any.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in g.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

fn sources() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let g = graph(&sources());
    assert!(g.len() >= 8, "too few modules found: {g:?}");
    let picture: Vec<String> = g
        .iter()
        .map(|(m, to)| {
            format!(
                "{m} -> {}",
                to.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    eprintln!("module graph:\n  {}", picture.join("\n  "));
    if let Some(cycle) = find_cycle(&g) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("  {} -> {} ({})", w[0], w[1], g[&w[0]][&w[1]]))
            .collect();
        panic!(
            "import cycle between top-level modules: {}\n{}\nmove the shared type to its one home (ids.rs for ids), or let the lower module define the type the upper one consumes",
            cycle.join(" -> "),
            steps.join("\n")
        );
    }
    // ids is the bottom: it imports nothing of holdfast's.
    assert_eq!(g.get("ids").map(BTreeMap::len).unwrap_or(0), 0, "{g:?}");
    // The pure core imports only ids and config.
    let core: BTreeSet<&str> = g["core"].keys().map(String::as_str).collect();
    assert!(
        core.is_subset(&["config", "ids"].into_iter().collect()),
        "the core imports {core:?}: it may use ids and config only"
    );
}

#[test]
fn unsafe_is_only_in_the_os_layer() {
    let allowed = src().join("os").join("sys.rs");
    let mut found = Vec::new();
    for (path, text) in sources() {
        for (i, line) in text.lines().enumerate() {
            let line = code(line);
            let has_unsafe = line
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|w| w == "unsafe");
            if has_unsafe && path != allowed {
                found.push(format!("{}:{}: {}", path.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "`unsafe` outside src/os/sys.rs:\n{}",
        found.join("\n")
    );
    assert!(fs::read_to_string(&allowed).is_ok_and(|t| t.contains("unsafe")));
}

/// The checker itself: a cycle of three, made of files as they would be
/// written, is found; the same graph without its back edge is not.
#[test]
fn the_cycle_check_finds_a_cycle() {
    let file = |module: &str, text: &str| (src().join(module).join("mod.rs"), text.to_string());
    let mut texts = vec![
        file("core", "use crate::ids::Pid;\n"),
        file(
            "edge",
            "use crate::core::Event;\n// crate::status in a comment\n",
        ),
        file("status", "pub fn f() { crate::edge::run(); }\n"),
        file("ids", ""),
    ];
    assert_eq!(find_cycle(&graph(&texts)), None);
    texts[0].1.push_str("use crate::status::Snapshot;\n");
    let cycle = find_cycle(&graph(&texts)).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    let members: BTreeSet<&str> = cycle.iter().map(String::as_str).collect();
    assert_eq!(members, ["core", "edge", "status"].into_iter().collect());
    // A comment does not make an edge; `$crate::` is not ours.
    assert_eq!(
        named_modules("// crate::edge\nlet x = 1; // crate::os"),
        vec![]
    );
    assert_eq!(named_modules("$crate::fmt"), vec![]);
}
