//! `holdfast-test-worker`: the HTTP test worker that holdfast's tests,
//! benchmarks and demo supervise. Not part of the product binary.
use std::process::ExitCode;

fn main() -> ExitCode {
    holdfast::testworker::main(std::env::args_os().skip(1).collect())
}
