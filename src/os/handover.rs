//! The OS half of an in-place upgrade of holdfast: the new binary checked
//! before anything is touched, the state carried in a memfd, exactly the
//! handed-over fds made inheritable for the exec, the exec itself, and in
//! the new image the fds taken back.
//!
//! Why it has this shape:
//! - **The binary is opened once** ([`Binary::open`]) and everything — the
//!   checks, the trial run (`BINARY version --json`), the exec — goes
//!   through that open file, so a package manager renaming another file
//!   over the path in between cannot slip an unchecked binary in.
//! - **CLOEXEC is cleared only on the fds handed over**, right before the
//!   exec ([`inherit`]), and set again if the exec fails ([`reclaim`]):
//!   every other fd holdfast has (epoll, wake-up pipes, the previous
//!   image's leftovers) is closed by the kernel at the exec.
//! - **The exec keeps the pid and the workers**: the caller must exec from
//!   the thread that forked the workers (holdfast's main thread), because
//!   PR_SET_PDEATHSIG fires when the *thread* that forked a child exits, and
//!   an exec from another thread ends that one.
//! - **Signals are blocked across the exec** ([`block_signals`]): the mask
//!   survives execve, and so do pending signals, so a SIGTERM or SIGCHLD that
//!   arrives while the new image has no handlers yet waits for them instead
//!   of killing holdfast or being lost. The new image unblocks once its
//!   handlers are installed ([`unblock_signals`]).

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{SigSet, Signal};

/// The signals holdfast handles: blocked across the exec.
pub const HANDLED: [Signal; 8] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
];

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Blocks [`HANDLED`] on this thread: across an exec, pending signals wait
/// for the new image's handlers.
pub fn block_signals() -> io::Result<()> {
    handled().thread_block().map_err(io::Error::from)
}

/// Unblocks [`HANDLED`] on this thread (after an exec failed, or in a new
/// image once its handlers are installed; a no-op when nothing was blocked).
pub fn unblock_signals() -> io::Result<()> {
    handled().thread_unblock().map_err(io::Error::from)
}

/// The new holdfast binary, opened once: checked, tried and exec'd through
/// this one open file.
#[derive(Debug)]
pub struct Binary {
    /// As the operator named it (or holdfast was started from).
    pub path: PathBuf,
    file: File,
}

/// What an ELF header says about the machine it is for: class (32/64 bit),
/// byte order and `e_machine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfKind {
    pub class: u8,
    pub data: u8,
    pub machine: u16,
}

impl std::fmt::Display for ElfKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bits = match self.class {
            1 => "32-bit",
            2 => "64-bit",
            _ => "unknown-class",
        };
        let order = match self.data {
            1 => "little-endian",
            2 => "big-endian",
            _ => "unknown-order",
        };
        let machine = match self.machine {
            3 => "x86".to_string(),
            40 => "ARM".to_string(),
            62 => "x86-64".to_string(),
            183 => "AArch64".to_string(),
            243 => "RISC-V".to_string(),
            m => format!("machine {m}"),
        };
        write!(f, "{bits} {order} {machine}")
    }
}

/// The machine an ELF header is for; an error says what the bytes are
/// instead (a script, not ELF, a core file, ...).
pub fn elf_kind(head: &[u8]) -> Result<ElfKind, String> {
    if head.starts_with(b"#!") {
        let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
        return Err(format!(
            "it is a script ({}), not a holdfast binary",
            String::from_utf8_lossy(line).trim_end()
        ));
    }
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return Err("it is not an ELF executable".into());
    }
    let (class, data) = (head[4], head[5]);
    let word = |i: usize| match data {
        2 => u16::from_be_bytes([head[i], head[i + 1]]),
        _ => u16::from_le_bytes([head[i], head[i + 1]]),
    };
    // e_type: 2 ET_EXEC, 3 ET_DYN (a PIE).
    if !matches!(word(16), 2 | 3) {
        return Err(format!(
            "it is an ELF file of type {}, not an executable",
            word(16)
        ));
    }
    Ok(ElfKind {
        class,
        data,
        machine: word(18),
    })
}

fn read_head(file: &File) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; 64];
    let n = nix::sys::uio::pread(file.as_fd(), &mut head, 0)?;
    head.truncate(n);
    Ok(head)
}

impl Binary {
    /// Opens `path` and checks it can be what holdfast execs: an existing,
    /// executable regular file, an ELF executable for this very machine
    /// (the class, byte order and machine of the running holdfast). The
    /// error names the path and what is wrong.
    pub fn open(path: &Path) -> Result<Binary, String> {
        let name = path.display();
        if !path.is_absolute() {
            return Err(format!("binary {name}: the path must be absolute"));
        }
        let file = File::open(path).map_err(|e| format!("binary {name}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("binary {name}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("binary {name}: not a regular file"));
        }
        if meta.permissions().mode() & 0o111 == 0
            || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err()
        {
            return Err(format!(
                "binary {name}: not executable (mode {:o})",
                meta.permissions().mode() & 0o7777
            ));
        }
        let head = read_head(&file).map_err(|e| format!("binary {name}: {e}"))?;
        let theirs = elf_kind(&head).map_err(|e| format!("binary {name}: {e}"))?;
        let ours = File::open("/proc/self/exe")
            .and_then(|f| read_head(&f))
            .map_err(|e| format!("reading holdfast's own binary: {e}"))
            .and_then(|h| elf_kind(&h))?;
        if theirs != ours {
            return Err(format!(
                "binary {name}: built for {theirs}, but this machine runs {ours}"
            ));
        }
        Ok(Binary {
            path: path.to_path_buf(),
            file,
        })
    }

    /// `/proc/self/fd/N`: the open file, for running it as a child (which
    /// resolves the path before its exec closes the CLOEXEC fd).
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// The file's inode, for log lines.
    pub fn inode(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.ino())
    }

    /// execve(2)s this file in place of holdfast (fexecve: the very file
    /// that was checked), with `argv` and `env`. Returns only on failure.
    /// Call it from the thread that forked the workers (see the module).
    pub fn exec(&self, argv: &[OsString], env: &[(OsString, OsString)]) -> io::Error {
        let c = |s: &OsStr| CString::new(s.as_bytes());
        let args: Result<Vec<CString>, _> = argv.iter().map(|a| c(a)).collect();
        let vars: Result<Vec<CString>, _> = env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv)
            })
            .collect();
        let (args, vars) = match (args, vars) {
            (Ok(a), Ok(v)) => (a, v),
            _ => {
                return io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a NUL byte in holdfast's argv or environment",
                )
            }
        };
        match nix::unistd::fexecve(self.file.as_fd(), &args, &vars) {
            Ok(never) => match never {},
            Err(e) => io::Error::from(e),
        }
    }
}

/// A memfd holding `bytes`, positioned at 0, close-on-exec until [`inherit`]ed.
pub fn memfd(name: &str, bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut f = File::from(fd);
    f.write_all(bytes)?;
    f.rewind()?;
    Ok(OwnedFd::from(f))
}

/// Reads all of `fd` from its current position (the state a previous image
/// wrote), at most `limit` bytes.
pub fn read_all(fd: OwnedFd, limit: u64) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::from(fd).take(limit).read_to_end(&mut v)?;
    Ok(v)
}

/// Clears FD_CLOEXEC on each of `fds`, so the exec passes them on. On an
/// error, the ones already cleared are set again.
pub fn inherit(fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    for (i, fd) in fds.iter().enumerate() {
        if let Err(e) = fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())) {
            reclaim(&fds[..i]);
            return Err(io::Error::other(format!(
                "clear FD_CLOEXEC on fd {}: {e}",
                fd.as_raw_fd()
            )));
        }
    }
    Ok(())
}

/// Sets FD_CLOEXEC on `fds` again (the exec failed).
pub fn reclaim(fds: &[BorrowedFd<'_>]) {
    for fd in fds {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

/// The fds a previous image handed over, taken back once, close-on-exec:
/// each part of the new image takes its own by number; what nobody takes
/// is closed when the bank is dropped.
#[derive(Debug, Default)]
pub struct FdBank {
    fds: BTreeMap<RawFd, OwnedFd>,
}

impl FdBank {
    /// Takes ownership of `numbers` (see [`crate::os::sys::take_inherited_fds`]);
    /// the second list names those that were not open, with the error.
    pub fn take(numbers: &[RawFd]) -> (FdBank, Vec<(RawFd, io::Error)>) {
        let mut fds = BTreeMap::new();
        let mut missing = Vec::new();
        for (n, r) in crate::os::sys::take_inherited_fds(numbers) {
            match r {
                Ok(fd) => {
                    fds.insert(n, fd);
                }
                Err(e) => missing.push((n, e)),
            }
        }
        (FdBank { fds }, missing)
    }

    /// The fd handed over as `number`, for `what` (named in the error).
    pub fn claim(&mut self, number: RawFd, what: &str) -> Result<OwnedFd, String> {
        self.fds
            .remove(&number)
            .ok_or_else(|| format!("{what}: fd {number} was not handed over (or taken twice)"))
    }

    /// A duplicate of the fd handed over as `number` (close-on-exec), the
    /// original staying here: an adoption that fails halfway leaves every
    /// original to the fallback.
    pub fn dup(&self, number: RawFd, what: &str) -> Result<OwnedFd, String> {
        let fd = self
            .fds
            .get(&number)
            .ok_or_else(|| format!("{what}: fd {number} was not handed over"))?;
        fd.try_clone()
            .map_err(|e| format!("{what}: duplicate fd {number}: {e}"))
    }

    /// The fd handed over as `number`, to look at.
    pub fn peek(&self, number: RawFd) -> Option<BorrowedFd<'_>> {
        self.fds.get(&number).map(|f| f.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, data: u8, etype: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = data;
        h[16..18].copy_from_slice(&etype.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn elf_headers_say_what_they_are() {
        assert_eq!(
            elf_kind(&header(2, 1, 3, 62)),
            Ok(ElfKind {
                class: 2,
                data: 1,
                machine: 62
            })
        );
        assert_eq!(
            elf_kind(&header(2, 1, 2, 183)).map(|k| k.to_string()),
            Ok("64-bit little-endian AArch64".to_string())
        );
        assert_eq!(
            elf_kind(b"#!/bin/sh\nexit 1\n"),
            Err("it is a script (#!/bin/sh), not a holdfast binary".to_string())
        );
        assert_eq!(
            elf_kind(b"hello"),
            Err("it is not an ELF executable".to_string())
        );
        assert_eq!(
            elf_kind(&header(2, 1, 4, 62)),
            Err("it is an ELF file of type 4, not an executable".to_string())
        );
    }

    #[test]
    fn a_memfd_reads_back_from_the_start() {
        let fd = memfd("test", b"{\"format\":1}").expect("memfd");
        assert_eq!(read_all(fd, 1024).expect("read"), b"{\"format\":1}");
    }
}
