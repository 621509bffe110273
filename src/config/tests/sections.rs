//! The `[memory]` and `[logs]` sections.

use super::*;

#[test]
fn memory_and_logs_sections_parse() {
    let c = super::tests::valid(
            "[[listen]]\naddress = \"127.0.0.1:1\"\n[app]\ncommand = [\"x\"]\n[memory]\nlimit = \"512MiB\"\nscope = \"process\"\nmax_lifetime = \"24h\"\nlifetime_jitter = \"1h\"\n[logs]\nstdout = \"app.log\"\nreopen_signal = \"USR1\"\n",
        );
    let m = c.memory.expect("memory");
    assert_eq!(m.limit, Some(bytesize::ByteSize::mib(512)));
    assert_eq!(m.metric(), Metric::Uss);
    assert_eq!(m.max_lifetime, Some(Duration::from_secs(86400)));
    assert_eq!(c.logs.stdout, Some(PathBuf::from("/etc/app.log")));
    assert!(c.logs.prefix);
    let f = parse(Path::new("h.toml"), "[memory]\nlimit = \"1.5GiB\"\n").expect("parses");
    assert_eq!(
        f.memory.expect("memory").limit,
        Some(bytesize::ByteSize::b(1024 * 1024 * 1024 * 3 / 2))
    );
}
