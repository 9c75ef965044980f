//! Units of weights in device memory: resident copies, and a ring of device slots that
//! streamed units are copied into on a separate copy stream.
//!
//! ```text
//!   copy stream:    wait computed[i] ─ copy host → slot i ─ record copied[i]     (stage)
//!   compute stream: wait copied[i] ─ the unit's kernels ─ record computed[i]   (begin … finish)
//! ```
//!
//! The host never waits for the device inside the token loop except to hand a host ring
//! slot back to the I/O thread (`finish(.., release_host)`), which waits for that slot's
//! copy only. Weight views name a unit by its bytes in the model's file mapping; `mapped`
//! turns such an address into the device address of the unit's current copy.

use crate::{be, dptr, CudaBackend};
use cudarc::driver::{CudaEvent, CudaSlice};
use flea_gguf::GgmlType;
use flea_model::backend::{UnitStaging, UnitWeight};
use flea_model::Result;

/// A host address range resolved to device memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mapping {
    pub host: usize,
    pub len: usize,
    pub dev: u64,
}

/// The device side of the streaming ring.
pub(crate) struct DeviceRing {
    _slots: Vec<CudaSlice<u8>>,
    ptrs: Vec<u64>,
    slot_bytes: usize,
    /// Recorded on the copy stream after a slot's copy.
    copied: Vec<CudaEvent>,
    /// Recorded on the compute stream after the kernels that read a slot.
    computed: Vec<CudaEvent>,
    next: usize,
}

/// A unit between `stage` and `finish`.
pub struct CudaStaged {
    slot: usize,
    key: usize,
    key_len: usize,
}

impl CudaBackend {
    /// The device address of host bytes `[p, p + len)` if they lie in a mapped unit.
    pub(crate) fn mapped(&self, p: usize, len: usize) -> Option<u64> {
        let maps = self.mappings.lock().unwrap();
        maps.iter()
            .find(|m| p >= m.host && p + len <= m.host + m.len)
            .map(|m| m.dev + (p - m.host) as u64)
    }

    fn map(&self, key: &[u8], dev: u64) {
        self.map_range(key.as_ptr() as usize, key.len(), dev)
    }

    fn map_range(&self, host: usize, len: usize, dev: u64) {
        let mut maps = self.mappings.lock().unwrap();
        maps.retain(|m| m.host != host);
        maps.push(Mapping { host, len, dev });
        self.note_remap();
    }

    fn unmap(&self, host: usize) {
        self.mappings.lock().unwrap().retain(|m| m.host != host);
        self.note_remap();
    }

    /// Count a change of the host → device mappings (tables built from them, the fused
    /// decode's, are rebuilt).
    pub(crate) fn note_remap(&self) {
        self.map_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether units are being placed by an executor (then an unmapped weight is an error,
    /// never a silent upload outside the budget).
    pub(crate) fn staging_active(&self) -> bool {
        self.staging.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Bytes of a GGML Q6_K block: ql 128 | qh 64 | scales 16 | d 2.
const Q6K_BLOCK: usize = 210;

/// GGML Q6_K blocks → the layout of `Q6KS` in kernels.cu: every block's ql, then every qh,
/// every scales, every d. Same bytes, same size; `t` holds whole blocks.
pub(crate) fn repack_q6k(t: &mut [u8]) {
    let nb = t.len() / Q6K_BLOCK;
    let mut out = vec![0u8; nb * Q6K_BLOCK];
    {
        let (ql, rest) = out.split_at_mut(nb * 128);
        let (qh, rest) = rest.split_at_mut(nb * 64);
        let (sc, d) = rest.split_at_mut(nb * 16);
        for (b, blk) in t.chunks_exact(Q6K_BLOCK).enumerate() {
            ql[b * 128..][..128].copy_from_slice(&blk[..128]);
            qh[b * 64..][..64].copy_from_slice(&blk[128..192]);
            sc[b * 16..][..16].copy_from_slice(&blk[192..208]);
            d[b * 2..][..2].copy_from_slice(&blk[208..]);
        }
    }
    t[..out.len()].copy_from_slice(&out);
}

impl UnitStaging for CudaBackend {
    type Staged = CudaStaged;

    fn computes_in_place(&self) -> bool {
        false
    }

    fn pin(&self, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: buf is a live, exclusively borrowed allocation of buf.len() bytes; flags 0
        // page-locks it for this context (cacheable, not write-combined). It is unregistered
        // by `unpin` before the owner frees it (the executor's Drop).
        unsafe {
            cudarc::driver::sys::cuMemHostRegister_v2(buf.as_mut_ptr().cast(), buf.len(), 0)
                .result()
        }
        .map_err(|e| be(format!("pinning {} bytes of host memory: {e:?}", buf.len())))?;
        Ok(())
    }

    fn unpin(&self, addr: usize, len: usize) {
        if len == 0 || self.bind().is_err() {
            return;
        }
        // A copy out of the buffer may still be queued: let both streams drain first.
        let _ = self.copy_stream.synchronize();
        let _ = self.stream.synchronize();
        // SAFETY: addr was registered by `pin` and is still allocated (caller's contract).
        let _ = unsafe { cudarc::driver::sys::cuMemHostUnregister(addr as *mut _).result() };
    }

    fn prepare_slots(&self, depth: usize, slot_bytes: usize) -> Result<()> {
        let mut slots = Vec::with_capacity(depth);
        let mut copied = Vec::with_capacity(depth);
        let mut computed = Vec::with_capacity(depth);
        for _ in 0..depth.max(1) {
            // SAFETY: the slot is fully written by a copy before any kernel reads it.
            let s = unsafe { self.stream.alloc::<u8>(slot_bytes.max(1)) }
                .map_err(|e| be(format!("allocating a {slot_bytes}-byte device slot: {e:?}")))?;
            slots.push(s);
            copied.push(
                self.ctx
                    .new_event(None)
                    .map_err(|e| be(format!("event: {e:?}")))?,
            );
            computed.push(
                self.ctx
                    .new_event(None)
                    .map_err(|e| be(format!("event: {e:?}")))?,
            );
        }
        let ptrs = slots.iter().map(|s| dptr(s, &self.stream)).collect();
        // The slots must exist before the copy stream writes them.
        self.synchronize()?;
        *self.ring.lock().unwrap() = Some(DeviceRing {
            _slots: slots,
            ptrs,
            slot_bytes,
            copied,
            computed,
            next: 0,
        });
        self.staging
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn make_resident(&self, key: &[u8], host: &[u8]) -> Result<()> {
        if key.len() != host.len() {
            return Err(be("make_resident: key and host bytes differ in length"));
        }
        let mut s = unsafe { self.stream.alloc::<u8>(host.len().max(1)) }.map_err(|e| {
            be(format!(
                "allocating {} bytes of resident weights: {e:?}",
                host.len()
            ))
        })?;
        self.stream
            .memcpy_htod(host, &mut s.slice_mut(0..host.len()))
            .map_err(|e| be(format!("uploading resident weights: {e:?}")))?;
        // The host buffer is freed by the caller right after this returns.
        self.synchronize()?;
        self.uploaded
            .fetch_add(host.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.map(key, dptr(&s, &self.stream));
        self.resident.lock().unwrap().push(s);
        self.staging
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn make_resident_weights(
        &self,
        key: &[u8],
        host: &mut [u8],
        matmul_weights: &[UnitWeight],
    ) -> Result<()> {
        // Q6_K weights the repacked kernels can take: whole blocks, 8-aligned in the unit
        // (whose device copy starts 256-aligned), inside it.
        let unit_len = host.len();
        let q6k = |w: &&UnitWeight| {
            w.ty == GgmlType::Q6_K
                && w.cols.is_multiple_of(256)
                && w.bytes == w.rows * (w.cols / 256) * Q6K_BLOCK
                && w.offset.is_multiple_of(8)
                && w.offset
                    .checked_add(w.bytes)
                    .is_some_and(|end| end <= unit_len)
        };
        let repack = crate::mmvq::enabled()
            && std::env::var_os("FLEA_CUDA_NO_REPACK").is_none()
            && matmul_weights.iter().any(|w| q6k(&w));
        if !repack {
            return self.make_resident(key, host);
        }
        // `host` is the executor's scratch read of the unit: rearranged in place.
        for w in matmul_weights.iter().filter(q6k) {
            if let Some(t) = host.get_mut(w.offset..w.offset + w.bytes) {
                repack_q6k(t);
            }
        }
        self.make_resident(key, host)?;
        let mut set = self.repacked.lock().unwrap();
        for w in matmul_weights.iter().filter(q6k) {
            let dev = self
                .mapped(key.as_ptr() as usize + w.offset, w.bytes)
                .ok_or_else(|| be("make_resident_weights: a weight outside its unit"))?;
            set.insert(dev);
        }
        Ok(())
    }

    fn stage(&self, key: &[u8], host: &[u8]) -> Result<CudaStaged> {
        let mut guard = self.ring.lock().unwrap();
        let ring = guard
            .as_mut()
            .ok_or_else(|| be("stage: no device slots (prepare_slots not called)"))?;
        if host.len() > ring.slot_bytes || key.len() != host.len() {
            return Err(be(format!(
                "stage: a unit of {} bytes does not fit a {}-byte slot",
                host.len(),
                ring.slot_bytes
            )));
        }
        let i = ring.next % ring.ptrs.len();
        ring.next += 1;
        let err = |what: &str, e: cudarc::driver::DriverError| be(format!("{what}: {e:?}"));
        // The slot's previous unit must have been computed before it is overwritten.
        self.copy_stream
            .wait(&ring.computed[i])
            .map_err(|e| err("copy stream wait", e))?;
        // SAFETY: ptrs[i] is a live device slot of slot_bytes ≥ host.len(); host is pinned
        // (or pageable, which the driver stages) and the caller keeps it unchanged until
        // `finish` with release_host, which waits for this copy.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                ring.ptrs[i],
                host,
                self.copy_stream.cu_stream(),
            )
        }
        .map_err(|e| err("host-to-device copy of a unit", e))?;
        ring.copied[i]
            .record(&self.copy_stream)
            .map_err(|e| err("record copy event", e))?;
        Ok(CudaStaged {
            slot: i,
            key: key.as_ptr() as usize,
            key_len: key.len(),
        })
    }

    fn begin(&self, st: &CudaStaged) -> Result<()> {
        let guard = self.ring.lock().unwrap();
        let ring = guard.as_ref().ok_or_else(|| be("begin: no device slots"))?;
        // Only here, not in `stage`: a wait queued at stage time would hold back everything
        // the compute stream is given before this unit, including the hidden-state read
        // the CPU side of a hybrid pass is waiting for.
        self.stream
            .wait(&ring.copied[st.slot])
            .map_err(|e| be(format!("compute stream wait: {e:?}")))?;
        self.map_range(st.key, st.key_len, ring.ptrs[st.slot]);
        Ok(())
    }

    fn finish(&self, st: CudaStaged, release_host: bool) -> Result<()> {
        self.unmap(st.key);
        let guard = self.ring.lock().unwrap();
        let ring = guard
            .as_ref()
            .ok_or_else(|| be("finish: no device slots"))?;
        ring.computed[st.slot]
            .record(&self.stream)
            .map_err(|e| be(format!("record compute event: {e:?}")))?;
        if release_host {
            ring.copied[st.slot]
                .synchronize()
                .map_err(|e| be(format!("waiting for a unit's copy: {e:?}")))?;
        }
        Ok(())
    }

    fn release_units(&self) {
        if self.bind().is_err() {
            return;
        }
        // Kernels or copies may still read the units: drain both streams before freeing.
        let _ = self.copy_stream.synchronize();
        let _ = self.stream.synchronize();
        self.mappings.lock().unwrap().clear();
        self.note_remap();
        self.resident.lock().unwrap().clear();
        self.repacked.lock().unwrap().clear();
        *self.ring.lock().unwrap() = None;
        self.staging
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    fn wait_idle(&self) -> Result<()> {
        self.synchronize()
    }

    fn driver_memory(&self) -> Option<(u64, u64)> {
        self.mem_info()
            .ok()
            .map(|(free, total)| ((total - free) as u64, total as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repack_q6k_moves_each_field_to_its_array() {
        // Three blocks whose every byte names its block and position.
        let nb = 3;
        let mut t: Vec<u8> = (0..nb * Q6K_BLOCK)
            .map(|i| ((i / Q6K_BLOCK) * 70 + (i % Q6K_BLOCK) / 3) as u8)
            .collect();
        let raw = t.clone();
        repack_q6k(&mut t);
        for b in 0..nb {
            let blk = &raw[b * Q6K_BLOCK..(b + 1) * Q6K_BLOCK];
            assert_eq!(&t[b * 128..b * 128 + 128], &blk[..128]);
            assert_eq!(&t[nb * 128 + b * 64..][..64], &blk[128..192]);
            assert_eq!(&t[nb * 192 + b * 16..][..16], &blk[192..208]);
            assert_eq!(&t[nb * 208 + b * 2..][..2], &blk[208..]);
        }
    }
}
