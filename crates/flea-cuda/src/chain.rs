//! A greedy decode chained on the GPU (`Backend::token_slots`): each pass's token goes from
//! `argmax_slot` into a device slot the next pass's embedding reads, and into mapped host
//! memory the host reads one pass behind, after the slot's event. Nothing the host does
//! between tokens then leaves the GPU idle.
//!
//! Also the small uploads of a pass (row positions): from page-locked memory, because a copy
//! from pageable memory may wait for the stream's queued work — in a chained decode, the
//! whole pass before it.

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaSlice, CudaStream};
use std::sync::Arc;

/// Most candidates `topk_slot` keeps (TOPK_SLOT_MAX in kernels.cu).
pub(crate) const TOP_K_MAX: usize = 64;

/// Logits one block of `topk_part` takes at most (1024 threads × TOPK_BATCH, one batch), and
/// the most blocks (parts) it runs: a vocabulary of up to 1 Mi in one batch each.
pub(crate) const TOPK_PART_KEYS: usize = 8192;
pub(crate) const TOPK_PARTS_MAX: usize = 128;

/// How many `topk_part` blocks a chunk of `width` logits takes first (0: `topk_slot` alone,
/// one batch of its one block).
pub(crate) fn topk_parts(width: usize) -> usize {
    if width <= TOPK_PART_KEYS {
        0
    } else {
        width.div_ceil(TOPK_PART_KEYS).min(TOPK_PARTS_MAX)
    }
}

/// Blocks of `vocab_max` (VOCAB_PARTS in kernels.cu).
pub(crate) const VOCAB_PARTS: usize = 128;
/// Most tiles of 1024 logits `vocab_pick` walks (VOCAB_MAX_TILES): vocabularies up to 1 Mi.
pub(crate) const VOCAB_MAX: usize = 1024 * 1024;
/// Top-p's first-level histogram (TOPP_BINS masses, then as many counts) and, at this
/// index, the lowest key kept (TOPP_KEEP in kernels.cu); after it, in the low half of the
/// next word, how many candidates `vocab_top_p_gather` listed.
pub(crate) const TOP_P_KEEP: usize = 2 * 2048;
/// Words of the top-p buffer: the histogram, the key kept and the candidates' count.
pub(crate) const TOP_P_WORDS: usize = TOP_P_KEEP + 2;

/// Token slots the GPU keeps: a chained decode has at most two passes queued, and a slot is
/// rewritten only after the host has read it.
pub(crate) const TOKEN_SLOTS: usize = 4;
/// Slots after those for the rows of one `pick_rows` call (the executor picks a batch's
/// tokens LOGIT_CHUNK rows at a time).
pub(crate) const ROW_SLOTS: usize = flea_model::forward::LOGIT_CHUNK;
pub(crate) const ALL_SLOTS: usize = TOKEN_SLOTS + ROW_SLOTS;

fn ce(what: &str, e: impl std::fmt::Debug) -> String {
    format!("{what}: {e:?}")
}

/// Page-locked host memory the device may write (`CU_MEMHOSTALLOC_DEVICEMAP`), freed on drop
/// after the events of its users (the owner waits for them first).
struct MappedHost {
    /// The host address (kept as an integer: the backend is shared between threads).
    host: usize,
    dev: u64,
}

impl MappedHost {
    fn new(bytes: usize) -> Result<MappedHost, String> {
        // SAFETY: a plain pinned, device-mapped host allocation; freed in Drop.
        let host =
            unsafe { cudarc::driver::result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
                .map_err(|e| ce("mapped host buffer", e))?;
        let mut dev = 0u64;
        // SAFETY: host is a live mapped allocation of the current context.
        if let Err(e) = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0).result() } {
            // SAFETY: allocated just above, never handed out.
            let _ = unsafe { cudarc::driver::result::free_host(host) };
            return Err(ce("mapped host buffer address", e));
        }
        Ok(MappedHost {
            host: host as usize,
            dev,
        })
    }
}

impl Drop for MappedHost {
    fn drop(&mut self) {
        // SAFETY: from malloc_host; the owner has waited for every kernel and copy using it.
        let _ = unsafe { cudarc::driver::result::free_host(self.host as *mut _) };
    }
}

/// The token slots of a chained decode.
pub(crate) struct TokenSlots {
    /// Where `argmax_slot` writes each slot's token for the next pass's embedding.
    pub(crate) dev: CudaSlice<i32>,
    /// The largest logit so far among the chunks of one token's output rows, then
    /// `argmax_slot`'s blocks' maximum and their count (zero between launches).
    pub(crate) best: CudaSlice<u64>,
    /// The best candidates so far of a sampled token (`topk_slot`), then their count.
    pub(crate) candidates: CudaSlice<u64>,
    /// `topk_part`'s blocks' best keys (TOP_K_MAX a block) for `topk_slot`.
    pub(crate) topk_parts: CudaSlice<u64>,
    /// Whole-vocabulary sampling: `vocab_max`'s maxima, `vocab_tiles`' sums, and the logits
    /// of a head computed in chunks, gathered (allocated at the first such token).
    pub(crate) vocab_parts: CudaSlice<f32>,
    pub(crate) vocab_tiles: CudaSlice<f64>,
    pub(crate) vocab_stash: Option<CudaSlice<f32>>,
    /// Top-p: `vocab_mass`'s histogram and `vocab_top_p`'s key, and each token's mass
    /// followed by room for as many (key, mass) candidates (3 words a token; allocated at the
    /// first such token).
    pub(crate) vocab_top_p: CudaSlice<u64>,
    pub(crate) vocab_mass: Option<CudaSlice<u64>>,
    /// The same tokens in host memory, written by the kernel.
    host: MappedHost,
    /// Recorded after the kernel that wrote each slot last.
    written: Vec<CudaEvent>,
}

impl TokenSlots {
    pub(crate) fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
    ) -> Result<TokenSlots, String> {
        let dev = stream
            .alloc_zeros::<i32>(ALL_SLOTS)
            .map_err(|e| ce("token slots", e))?;
        let best = stream
            .alloc_zeros::<u64>(3)
            .map_err(|e| ce("token slots' maximum", e))?;
        let candidates = stream
            .alloc_zeros::<u64>(TOP_K_MAX + 1)
            .map_err(|e| ce("token slots' candidates", e))?;
        let topk_parts = stream
            .alloc_zeros::<u64>(TOPK_PARTS_MAX * TOP_K_MAX)
            .map_err(|e| ce("token slots' top-k parts", e))?;
        let vocab_parts = stream
            .alloc_zeros::<f32>(VOCAB_PARTS)
            .map_err(|e| ce("token slots' vocabulary maxima", e))?;
        let vocab_tiles = stream
            .alloc_zeros::<f64>(VOCAB_MAX / 1024)
            .map_err(|e| ce("token slots' vocabulary sums", e))?;
        let vocab_top_p = stream
            .alloc_zeros::<u64>(TOP_P_WORDS)
            .map_err(|e| ce("token slots' top-p histogram", e))?;
        let host = MappedHost::new(ALL_SLOTS * 4)?;
        let written = (0..ALL_SLOTS)
            .map(|_| ctx.new_event(None).map_err(|e| ce("token slot event", e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TokenSlots {
            dev,
            best,
            candidates,
            topk_parts,
            vocab_parts,
            vocab_tiles,
            vocab_stash: None,
            vocab_top_p,
            vocab_mass: None,
            host,
            written,
        })
    }

    /// The device address the kernel writes slot `slot`'s host copy to.
    pub(crate) fn host_dev_ptr(&self, slot: usize) -> u64 {
        self.host.dev + 4 * slot as u64
    }

    /// After the kernel that writes `slot` is queued.
    pub(crate) fn mark_written(&self, slot: usize, stream: &CudaStream) -> Result<(), String> {
        let e = self
            .written
            .get(slot)
            .ok_or_else(|| format!("no token slot {slot}"))?;
        e.record(stream).map_err(|e| ce("token slot event", e))
    }

    /// The token in `slot`, once the kernel that wrote it has finished.
    pub(crate) fn read(&self, slot: usize) -> Result<u32, String> {
        let e = self
            .written
            .get(slot)
            .ok_or_else(|| format!("no token slot {slot}"))?;
        e.synchronize().map_err(|e| ce("token slot wait", e))?;
        // SAFETY: slot < ALL_SLOTS (the event exists), so the 4 bytes lie inside the
        // allocation; the kernel that wrote them has finished (the event), and volatile
        // because the device, not this thread, stored them.
        let t = unsafe { std::ptr::read_volatile((self.host.host as *const i32).add(slot)) };
        u32::try_from(t).map_err(|_| format!("token slot {slot} holds {t}"))
    }
}

impl Drop for TokenSlots {
    fn drop(&mut self) {
        // The mapped memory is freed only after the kernels writing it.
        for e in &self.written {
            let _ = e.synchronize();
        }
    }
}

/// Page-locked staging for a pass's small uploads: `SLOTS` slots of `SLOT_BYTES`, each
/// reused only after the copy that read it last has run (its event).
pub(crate) struct SmallUploads {
    host: MappedHost,
    done: Vec<CudaEvent>,
    next: usize,
}

impl SmallUploads {
    /// Largest upload staged here; larger ones (prompts' rows) go from pageable memory.
    pub(crate) const SLOT_BYTES: usize = 4096;
    const SLOTS: usize = 64;

    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<SmallUploads, String> {
        let host = MappedHost::new(Self::SLOTS * Self::SLOT_BYTES)?;
        let done = (0..Self::SLOTS)
            .map(|_| ctx.new_event(None).map_err(|e| ce("upload event", e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SmallUploads {
            host,
            done,
            next: 0,
        })
    }

    /// Queue a copy of `data` to device address `dst` (which holds at least `data.len()`
    /// values) on `stream`.
    pub(crate) fn upload(
        &mut self,
        data: &[i32],
        dst: u64,
        stream: &CudaStream,
    ) -> Result<(), String> {
        let bytes = std::mem::size_of_val(data);
        if bytes > Self::SLOT_BYTES {
            return Err(format!("small upload of {bytes} bytes"));
        }
        let slot = self.next;
        self.next = (self.next + 1) % Self::SLOTS;
        let done = &self.done[slot];
        // The copy that read this slot SLOTS uploads ago must have run.
        done.synchronize().map_err(|e| ce("upload slot wait", e))?;
        // SAFETY: slot < SLOTS, so the slot's SLOT_BYTES ≥ bytes lie inside the allocation,
        // and no copy reads them any more (waited above).
        let src = unsafe { (self.host.host as *mut u8).add(slot * Self::SLOT_BYTES) };
        // SAFETY: as above; the source and `data` do not overlap (`data` is the caller's).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, src, bytes) };
        // SAFETY: `dst` holds ≥ bytes (the caller's contract), `src` is page-locked and stays
        // untouched until `done` says the copy has run.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src as *const _, bytes, stream.cu_stream()).result()
        }
        .map_err(|e| ce("small upload", e))?;
        done.record(stream).map_err(|e| ce("upload event", e))
    }
}

impl Drop for SmallUploads {
    fn drop(&mut self) {
        for e in &self.done {
            let _ = e.synchronize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_parts_cover_any_row_in_at_most_the_buffers_blocks() {
        assert_eq!(topk_parts(1), 0);
        assert_eq!(topk_parts(TOPK_PART_KEYS), 0);
        assert_eq!(topk_parts(TOPK_PART_KEYS + 1), 2);
        assert_eq!(topk_parts(151_936), 19);
        assert_eq!(topk_parts(262_144), 32);
        for width in [TOPK_PART_KEYS + 1, 262_144, VOCAB_MAX, 3 * VOCAB_MAX + 7] {
            let parts = topk_parts(width);
            assert!((1..=TOPK_PARTS_MAX).contains(&parts));
            // Every logit in a part: the last part starts inside the row.
            assert!(parts * width.div_ceil(parts) >= width);
            assert!((parts - 1) * width.div_ceil(parts) < width);
        }
    }
}
