//! The configuration: TOML schema, defaults, validation, and errors that name
//! the file, line and column.
//!
//! Nothing that `run` would refuse, loop on or panic on gets past this module,
//! so `check` (this module plus the command lookup) refuses it too, with the
//! same message. A file is read in two steps, and every error of either names
//! file:line:col when the value came from the file:
//! - [`parse`] deserializes the TOML into private raw structs whose fields are
//!   checked types: their `Deserialize` refuses a bad value (a duration, count
//!   or size outside its key's [`Bounds`], a NUL byte, a malformed mode, name
//!   or path), so toml attaches the value's span to the error. The values are
//!   kept [`Spanned`], so the conversion into the public types (relative paths
//!   made absolute and looked at, keys of one table against each other) has
//!   the position of every key it names.
//! - [`Config::build`] relates the file to the command line (`--workers`,
//!   `--listen`) and the tables to each other (listener names and addresses,
//!   the control socket, metrics) with the positions `parse` kept in
//!   [`FileConfig`]. Nothing checks the config after `build`.
//!
//! The public types (`AppConfig`, `MemoryConfig`, ...) also derive
//! `Deserialize`, to read back what their `Serialize` wrote (a handover between
//! holdfasts); a config file is only ever read through [`parse`].

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::de::Error as _;
use serde::Deserialize;
use toml::Spanned;

/// Every config problem, with where it was found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A value (or a relation of values) written at `line:column` of `path`.
    #[error("config {path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A problem with no position in a file: the command line, or a default.
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

mod build;
mod checked;
pub mod doc;
mod raw;
mod schema;
mod values;

pub use build::*;
/// The most workers any config may ask for (a handover's restore refuses more).
pub(crate) use checked::WORKERS_CEILING;
use checked::*;
use raw::*;
pub use schema::*;
pub use values::*;

#[cfg(test)]
mod tests;
