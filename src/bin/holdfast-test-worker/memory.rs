//! Memory allocated on purpose: growth, spikes, shared pages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::{say, MAX_GROW_MB, MIB, PAGE};

/// Memory allocated on purpose and kept for the process lifetime.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    pub(crate) blocks: Mutex<Vec<Vec<u8>>>,
    pub(crate) total: AtomicU64,
}

impl Memory {
    /// Allocates `bytes` and writes every page, so they count in RSS.
    /// Returns the total grown so far, in bytes. An allocation the allocator
    /// refuses is skipped (reported on stderr), not fatal.
    pub(crate) fn grow(&self, bytes: u64) -> u64 {
        let block = match touched(bytes) {
            Ok(block) => block,
            Err(e) => {
                say(&format!(
                    "test-worker {}: grow {bytes} bytes: {e}",
                    std::process::id()
                ));
                return self.total.load(Ordering::Relaxed);
            }
        };
        if let Ok(mut blocks) = self.blocks.lock() {
            blocks.push(block);
        }
        self.total.fetch_add(bytes, Ordering::Relaxed) + bytes
    }
}

/// `bytes` of memory with every page written, so they count in RSS.
pub(crate) fn touched(bytes: u64) -> Result<Vec<u8>, String> {
    let len = usize::try_from(bytes).map_err(|e| e.to_string())?;
    // Ask first, so a refused size is an error rather than an abort; then
    // take zeroed memory (calloc: fast even unoptimised, unlike `resize`).
    Vec::<u8>::new()
        .try_reserve_exact(len)
        .map_err(|e| e.to_string())?;
    let mut block = vec![0u8; len];
    for page in block.iter_mut().step_by(PAGE) {
        *page = 1;
    }
    Ok(std::hint::black_box(block))
}

/// Grows `memory` by `mb_per_sec` MiB per second, a tenth every 100 ms.
pub(crate) async fn grow_at(memory: &Memory, mb_per_sec: u64) {
    let step = mb_per_sec.min(MAX_GROW_MB) * MIB / 10;
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    loop {
        ticks.tick().await;
        memory.grow(step);
    }
}
