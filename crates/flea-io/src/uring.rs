//! io_uring backend: a range split into `block_size` reads, up to `queue_depth` in flight.
//!
//! Buffers: the caller's [`AlignedBuf`]s are registered with the ring lazily, in a small table
//! keyed by the buffer's process-unique id (a new buffer at a recycled address never matches an
//! old entry). A buffer in the table is read with `IORING_OP_READ_FIXED`; when registration is
//! unavailable or fails, plain `IORING_OP_READ` is used. When the table is full the least
//! recently used entry is replaced. An entry whose buffer has been freed keeps that memory's
//! pages pinned by the kernel (not reachable from user space, never written again) until the
//! entry is replaced or the reader is dropped: at most [`REG_SLOTS`] buffers' worth.
//!
//! Safety of in-flight reads: `read` never returns while a request it submitted is still in
//! flight, errors included, so the kernel never writes into a buffer the caller got back.

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};

use crate::pread::{open_file, DIRECT_REFUSED_AT_OPEN, DIRECT_REFUSED_AT_READ};
use crate::{
    check_range, fadvise_dontneed, human_size, AlignedBuf, IoError, IoOptions, RangeReader, ALIGN,
};

/// Size of the registered-buffer table.
pub(crate) const REG_SLOTS: u32 = 8;

struct RegEntry {
    id: u64,
    last_use: u64,
}

struct RegTable {
    slots: Vec<Option<RegEntry>>,
    tick: u64,
}

pub(crate) struct UringReader {
    ring: IoUring,
    file: File,
    path: PathBuf,
    direct: bool,
    queue_depth: u32,
    block_size: usize,
    drop_cache: bool,
    reg: Option<RegTable>,
    /// Registration of some buffer failed (it was then read unregistered).
    reg_failed: Option<String>,
    notes: Vec<String>,
    /// A wait for completions failed for good while reads were in flight: this reader must not
    /// be used again.
    poisoned: bool,
}

/// One block read: file bytes `[foff, foff+len)` into the buffer at `boff`.
#[derive(Clone, Copy)]
struct Chunk {
    foff: u64,
    boff: usize,
    len: usize,
    done: usize,
}

impl UringReader {
    /// Outer error: the file cannot be opened. Inner error: io_uring cannot be set up (the caller
    /// falls back to pread), as a message.
    pub(crate) fn open(
        path: &Path,
        opts: &IoOptions,
    ) -> Result<Result<UringReader, String>, IoError> {
        let queue_depth = opts.queue_depth.clamp(1, 4096);
        let entries = queue_depth.next_power_of_two();
        let ring = match IoUring::new(entries) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let (file, direct) = open_file(path, opts.direct)?;
        let mut notes = Vec::new();
        if opts.direct && !direct {
            notes.push(DIRECT_REFUSED_AT_OPEN.to_string());
        }
        let mut reg = None;
        if opts.register_buffers {
            match ring.submitter().register_buffers_sparse(REG_SLOTS) {
                Ok(()) => {
                    reg = Some(RegTable {
                        slots: (0..REG_SLOTS).map(|_| None).collect(),
                        tick: 0,
                    })
                }
                Err(e) => notes.push(format!("buffer registration unavailable: {e}")),
            }
        }
        let block_size = opts
            .block_size
            .clamp(ALIGN, 1 << 30)
            .next_multiple_of(ALIGN);
        Ok(Ok(UringReader {
            ring,
            file,
            path: path.to_path_buf(),
            direct,
            queue_depth,
            block_size,
            drop_cache: opts.drop_cache,
            reg,
            reg_failed: None,
            notes,
            poisoned: false,
        }))
    }

    /// The registered-buffer index for `buf`, registering it if needed; None → read unregistered.
    fn buffer_index(&mut self, buf: &mut AlignedBuf) -> Option<u16> {
        let table = self.reg.as_mut()?;
        table.tick += 1;
        let tick = table.tick;
        if let Some(i) = table
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|e| e.id == buf.id()))
        {
            if let Some(e) = table.slots[i].as_mut() {
                e.last_use = tick;
            }
            return u16::try_from(i).ok();
        }
        // Free slot, else the least recently used one.
        let i = table.slots.iter().position(|s| s.is_none()).or_else(|| {
            table
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.as_ref().map_or(0, |e| e.last_use))
                .map(|(i, _)| i)
        })?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.capacity(),
        };
        // SAFETY: the iovec describes the caller's live allocation. The kernel pins its pages at
        // registration, so they stay valid for the kernel even after the buffer is freed; this
        // reader issues READ_FIXED against the entry only while the buffer with this unique id
        // is the one passed to `read` (and therefore alive and exclusively borrowed).
        let res = unsafe {
            self.ring
                .submitter()
                .register_buffers_update(i as u32, &[iov], None)
        };
        match res {
            Ok(()) => {
                table.slots[i] = Some(RegEntry {
                    id: buf.id(),
                    last_use: tick,
                });
                u16::try_from(i).ok()
            }
            Err(e) => {
                // The slot's previous content is unknown now: forget it.
                table.slots[i] = None;
                self.reg_failed = Some(e.to_string());
                None
            }
        }
    }

    /// Submit queued entries and wait for at least one completion, retrying on EINTR / EAGAIN /
    /// EBUSY.
    fn submit_and_wait(&mut self, offset: u64) -> Result<(), IoError> {
        let mut tries = 0u32;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) =>
                {
                    tries += 1;
                    if tries > 1000 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    if tries > 100_000 {
                        return Err(IoError::Uring {
                            path: self.path.clone(),
                            offset,
                            source: e,
                        });
                    }
                }
                Err(e) => {
                    return Err(IoError::Uring {
                        path: self.path.clone(),
                        offset,
                        source: e,
                    })
                }
            }
        }
    }

    /// Wait (polling, up to 10 s) for `in_flight` completions after `io_uring_enter` failed.
    fn drain(&mut self, mut in_flight: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while in_flight > 0 && std::time::Instant::now() < deadline {
            let n = self.ring.completion().count() as u32;
            in_flight = in_flight.saturating_sub(n);
            if in_flight > 0 {
                // Sleeping also lets the kernel run this task's pending completion work.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// One attempt at reading `[start, start+total)` into `buf[boff..]`. Returns the file
    /// position where EOF was seen (if any), or `Einval` when O_DIRECT was refused at read time.
    fn read_span(
        &mut self,
        start: u64,
        total: usize,
        boff: usize,
        buf: &mut AlignedBuf,
    ) -> Result<SpanResult, IoError> {
        if self.direct && crate::pread::fault::refuse_direct_read() {
            return Ok(SpanResult::Einval);
        }
        let buf_index = self.buffer_index(buf);
        let base = buf.as_mut_ptr();
        let bs = self.block_size;
        let mut chunks = Vec::with_capacity(total.div_ceil(bs));
        let mut pos = 0usize;
        while pos < total {
            let len = bs.min(total - pos);
            chunks.push(Chunk {
                foff: start + pos as u64,
                boff: boff + pos,
                len,
                done: 0,
            });
            pos += len;
        }
        let mut pending: VecDeque<usize> = (0..chunks.len()).collect();
        let mut in_flight = 0u32;
        let mut first_err: Option<IoError> = None;
        let mut einval = false;
        let mut eof_at: Option<u64> = None;
        let fd = types::Fd(self.file.as_raw_fd());
        let direct = self.direct;

        loop {
            // Queue more requests while there is room and nothing has failed.
            while first_err.is_none() && !einval && in_flight < self.queue_depth {
                let Some(i) = pending.pop_front() else { break };
                let c = chunks[i];
                // SAFETY: boff + done .. boff + len lies inside buf (check_range guaranteed the
                // capacity), and buf stays exclusively borrowed until every request completes.
                let ptr = unsafe { base.add(c.boff + c.done) };
                let len = (c.len - c.done) as u32;
                let foff = c.foff + c.done as u64;
                let entry = match buf_index {
                    Some(idx) => opcode::ReadFixed::new(fd, ptr, len, idx)
                        .offset(foff)
                        .build(),
                    None => opcode::Read::new(fd, ptr, len).offset(foff).build(),
                }
                .user_data(i as u64);
                // SAFETY: the entry's buffer and fd stay valid until its completion is reaped
                // (this function drains all completions before returning).
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_err() {
                    // Submission queue full (cannot happen: in_flight < entries); retry later.
                    pending.push_front(i);
                    break;
                }
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            if let Err(e) = self.submit_and_wait(start) {
                // Not expected on a working ring (io_uring_enter only fails like this for a bad
                // ring fd or arguments). Requests may still be in flight and writing into buf:
                // poll for their completions for a while before returning, and refuse further
                // use of this reader if they never arrive.
                self.drain(in_flight);
                self.poisoned = true;
                return Err(e);
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in cqes {
                in_flight -= 1;
                let i = ud as usize;
                let c = &mut chunks[i];
                if res < 0 {
                    let errno = -res;
                    if errno == libc::EINTR || errno == libc::EAGAIN {
                        pending.push_front(i);
                    } else if errno == libc::EINVAL && direct {
                        einval = true;
                    } else if first_err.is_none() {
                        first_err = Some(IoError::Read {
                            path: self.path.clone(),
                            offset: c.foff + c.done as u64,
                            len: c.len - c.done,
                            source: std::io::Error::from_raw_os_error(errno),
                        });
                    }
                    continue;
                }
                if res == 0 {
                    let at = c.foff + c.done as u64;
                    eof_at = Some(eof_at.map_or(at, |e: u64| e.min(at)));
                    continue;
                }
                c.done += res as usize;
                if c.done < c.len {
                    if direct && !c.done.is_multiple_of(ALIGN) {
                        // O_DIRECT read ending off a block boundary: the end of the file.
                        let at = c.foff + c.done as u64;
                        eof_at = Some(eof_at.map_or(at, |e: u64| e.min(at)));
                    } else {
                        // Short read: resubmit the remainder.
                        pending.push_front(i);
                    }
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if einval {
            return Ok(SpanResult::Einval);
        }
        Ok(SpanResult::Done { eof_at })
    }
}

enum SpanResult {
    Done { eof_at: Option<u64> },
    Einval,
}

impl RangeReader for UringReader {
    fn read(
        &mut self,
        offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Result<Range<usize>, IoError> {
        let (head, end) = check_range(&self.path, offset, len, buf)?;
        if self.poisoned {
            return Err(IoError::Uring {
                path: self.path.clone(),
                offset,
                source: std::io::Error::other("reader unusable after an earlier io_uring failure"),
            });
        }
        if len == 0 {
            return Ok(head..head);
        }
        loop {
            let (start, total, boff) = if self.direct {
                (
                    offset - head as u64,
                    crate::required_capacity(offset, len),
                    0,
                )
            } else {
                (offset, len, head)
            };
            match self.read_span(start, total, boff, buf)? {
                SpanResult::Einval => {
                    let (file, _) = open_file(&self.path, false)?;
                    self.file = file;
                    self.direct = false;
                    self.notes.push(DIRECT_REFUSED_AT_READ.to_string());
                }
                SpanResult::Done { eof_at } => {
                    if let Some(at) = eof_at {
                        if at < end {
                            return Err(IoError::Truncated {
                                path: self.path.clone(),
                                start: offset,
                                end,
                                file_len: crate::eof_len(&self.file, at),
                            });
                        }
                    }
                    if self.drop_cache {
                        fadvise_dontneed(self.file.as_raw_fd(), start, total as u64);
                    }
                    return Ok(head..head + len);
                }
            }
        }
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "io_uring qd {} bs {}",
            self.queue_depth,
            human_size(self.block_size)
        );
        if self.direct {
            s.push_str(" O_DIRECT");
        } else {
            s.push_str(" buffered");
        }
        if self.reg.is_some() {
            s.push_str(" registered");
        }
        if self.drop_cache {
            s.push_str(", fadvise DONTNEED");
        }
        for n in &self.notes {
            s.push_str(" (");
            s.push_str(n);
            s.push(')');
        }
        if let Some(e) = &self.reg_failed {
            s.push_str(&format!(
                " (a buffer registration failed, read unregistered: {e})"
            ));
        }
        s
    }
}
