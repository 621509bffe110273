//! A cgroup v2 directory made for one test, as systemd's `Delegate=yes`
//! would give holdfast one.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use holdfast::os::proc as procs;

use super::DEADLINE;

/// A cgroup made for one test under the cgroup2 mount's root, removed in
/// `Drop` with everything in it (only our processes can be in it).
pub struct TestCgroup {
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let mount = procs::parse_cgroup2_mounts(&mountinfo)
            .into_iter()
            .find(|m| m.root == "/")
            .expect("a cgroup2 mount (these tests need cgroup v2 and root)");
        let dir = mount
            .mount_point
            .join(format!("holdfast-test-{}-{name}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup { dir }
    }

    /// Marks it delegated, as systemd does for `Delegate=yes` (the
    /// `trusted.delegate` xattr holdfast checks).
    pub fn delegate(&self) {
        rustix::fs::setxattr(
            &self.dir,
            "trusted.delegate",
            b"1",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap_or_else(|e| panic!("set trusted.delegate on {}: {e}", self.dir.display()));
    }

    /// Its child cgroups (holdfast's `worker-N`).
    pub fn children(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("cgroup.kill"), "1");
        // Deepest first.
        let mut dirs = vec![self.dir.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = fs::read_dir(&dirs[i]) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            let deadline = std::time::Instant::now() + DEADLINE;
            while fs::remove_dir(dir).is_err()
                && dir.exists()
                && std::time::Instant::now() < deadline
            {
                let _ = fs::write(dir.join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
