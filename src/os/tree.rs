//! Process trees from /proc: a worker and all its descendants.
//!
//! Processes vanish between listing and reading; that is normal and skipped.

use std::collections::{HashMap, HashSet};

/// All live pids with their parent, from one pass over /proc.
pub fn parents() -> HashMap<i32, i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| crate::os::procs::stat(pid).map(|s| (pid, s.ppid)))
        .collect()
}

/// `root` and every descendant of it, root first.
pub fn descendants(root: i32) -> Vec<i32> {
    descendants_in(root, &parents())
}

/// Like [`descendants`], over a parent map already read.
pub fn descendants_in(root: i32, parents: &HashMap<i32, i32>) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// Socket inodes held open by `pid` (from the `socket:[N]` links in /proc/PID/fd).
pub fn process_socket_inodes(pid: i32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        let link = std::fs::read_link(e.ok()?.path()).ok()?;
        let s = link.to_str()?;
        s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// Socket inodes held by `root` or any of its descendants.
pub fn socket_inodes(root: i32) -> HashSet<u64> {
    descendants(root)
        .into_iter()
        .flat_map(process_socket_inodes)
        .collect()
}
