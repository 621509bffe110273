//! TEMPORARY shim: replaced by the os branch's module.
pub const SERIAL_VAR: &str = "HOLDFAST_WORKER_SERIAL";

#[derive(Debug, Clone, PartialEq)]
pub struct Adopted {
    pub pid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub serial: Option<u64>,
    pub cgroup_serial: Option<u64>,
    pub comm: String,
}

pub struct Cgroups;

pub fn adopted(_is_worker: impl Fn(i32) -> bool, _cgroups: Option<&Cgroups>) -> Vec<Adopted> {
    Vec::new()
}
