//! Range readers for streaming transformer-layer weights from disk into aligned RAM slots.
//!
//! Three backends share one contract ([`RangeReader::read`]):
//!
//! * [`IoBackend::Pread`]: a `pread(2)` loop (EINTR and short reads handled), optionally on an
//!   `O_DIRECT` descriptor; falls back to a buffered descriptor where the filesystem refuses
//!   `O_DIRECT` (tmpfs, overlayfs, ...).
//! * [`IoBackend::IoUring`]: the range split into `block_size` requests with up to `queue_depth`
//!   in flight, `O_DIRECT` where possible, the caller's buffers registered with the ring; falls
//!   back to `pread` where io_uring cannot be set up (old kernel, seccomp).
//! * [`IoBackend::Mmap`]: the file mapped read-only and the range copied out, after checking the
//!   file's current size so that a file that shrank gives an error rather than `SIGBUS`.
//!
//! Every backend places the wanted bytes at the same spot of the buffer: the returned range is
//! always `offset % ALIGN .. offset % ALIGN + len`, whatever backend or fallback is in use, so the
//! layout of a slot does not depend on the filesystem.
//!
//! Measured on the development VM (Linux 6.18, ext4 on a virtio disk, 2 shared cores): ext4 and
//! tmpfs (Linux >= 6.6) both accept `O_DIRECT`; the buffered fallback is covered by fault
//! injection in the unit tests. A cold sequential read of 1 GiB ran at about 1.0-1.3 GiB/s with
//! `O_DIRECT` for every backend, block size (256 KiB-4 MiB) and queue depth (1-16), within run-to-
//! run noise of each other; buffered reads with kernel readahead reached 1.3-2 GiB/s. Hence the
//! defaults: pread + `O_DIRECT`, 1 MiB blocks, queue depth 8 (for io_uring).
//!
//! io_uring registered buffers: see the `uring` module; readers keep the last 8 distinct
//! buffers registered, so reuse a fixed set of slot buffers rather than allocating per read.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

mod buf;
mod mmap;
mod pread;
#[cfg(target_os = "linux")]
mod uring;

pub use buf::{AlignedBuf, ALIGN};

/// Errors from opening and reading files. Each message is one line naming the file (and the
/// offset, for reads).
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The file could not be opened.
    #[error("cannot open {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `fstat` (or a metadata query) failed.
    #[error("cannot stat {}: {source}", .path.display())]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Mapping the file failed.
    #[error("cannot mmap {}: {source}", .path.display())]
    Mmap {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A read system call (or an io_uring read) failed.
    #[error("read of {len} bytes at offset {offset} of {} failed: {source}", .path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        source: std::io::Error,
    },
    /// The file ended before the wanted range did.
    #[error("file truncated: wanted bytes [{start}, {end}) of {} but it ends at {file_len}", .path.display())]
    Truncated {
        path: PathBuf,
        start: u64,
        end: u64,
        file_len: u64,
    },
    /// The buffer handed to [`RangeReader::read`] is smaller than [`required_capacity`].
    #[error("buffer of {have} bytes too small to read {len} bytes at offset {offset} of {} (needs {need})", .path.display())]
    BufferTooSmall {
        path: PathBuf,
        offset: u64,
        len: usize,
        have: usize,
        need: usize,
    },
    /// `offset + len` does not fit in a u64 / usize.
    #[error("range at offset {offset} with length {len} of {} overflows", .path.display())]
    RangeOverflow {
        path: PathBuf,
        offset: u64,
        len: usize,
    },
    /// Allocating an [`AlignedBuf`] failed.
    #[error("cannot allocate an aligned buffer of {size} bytes")]
    Alloc { size: usize },
    /// io_uring setup or submission failed in a way that is not a plain read error.
    #[error("io_uring failure on {} at offset {offset}: {source}", .path.display())]
    Uring {
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    /// [`IoBackend::from_str`] got a name it does not know.
    #[error("unknown I/O backend {0:?} (expected mmap, pread or io_uring)")]
    UnknownBackend(String),
}

/// Which system interface reads the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBackend {
    /// Map the file read-only and copy ranges out of the mapping.
    Mmap,
    /// `pread(2)` loop, optionally on an `O_DIRECT` descriptor.
    Pread,
    /// io_uring with several block-sized reads in flight.
    IoUring,
}

impl FromStr for IoBackend {
    type Err = IoError;

    fn from_str(s: &str) -> Result<Self, IoError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mmap" => Ok(IoBackend::Mmap),
            "pread" => Ok(IoBackend::Pread),
            "io_uring" | "uring" | "io-uring" | "iouring" => Ok(IoBackend::IoUring),
            _ => Err(IoError::UnknownBackend(s.to_string())),
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoBackend::Mmap => "mmap",
            IoBackend::Pread => "pread",
            IoBackend::IoUring => "io_uring",
        })
    }
}

/// How [`open_reader`] reads a file.
///
/// Build it with `IoOptions { backend: IoBackend::IoUring, ..Default::default() }` so that
/// fields added later keep their defaults.
#[derive(Clone, Debug)]
pub struct IoOptions {
    pub backend: IoBackend,
    /// Open with `O_DIRECT` where the filesystem allows it (pread and io_uring backends).
    pub direct: bool,
    /// io_uring: the most block reads in flight at once (0 is taken as 1).
    pub queue_depth: u32,
    /// io_uring: bytes per read request (rounded up to [`ALIGN`]; at most 1 GiB).
    pub block_size: usize,
    /// After each read, `posix_fadvise(POSIX_FADV_DONTNEED)` the range (and for mmap, drop it
    /// from this process's mapping first), so that streaming does not fill the page cache.
    pub drop_cache: bool,
    /// io_uring: register the caller's buffers with the ring (`IORING_OP_READ_FIXED`).
    pub register_buffers: bool,
}

impl Default for IoOptions {
    fn default() -> Self {
        IoOptions {
            backend: IoBackend::Pread,
            direct: true,
            queue_depth: 8,
            block_size: 1 << 20,
            drop_cache: true,
            register_buffers: true,
        }
    }
}

/// Reads byte ranges of one file into aligned buffers.
pub trait RangeReader: Send {
    /// Read file bytes `[offset, offset+len)` into `buf`, returning the range of `buf` that holds
    /// them. The range is always `offset % ALIGN .. offset % ALIGN + len` (for `O_DIRECT` the read
    /// covers the 4 KiB-aligned superset, which starts at `buf[0]`; the other backends place the
    /// data at the same spot). `buf.capacity()` must be at least
    /// [`required_capacity`]`(offset, len)`.
    ///
    /// A file that ends before `offset + len` gives [`IoError::Truncated`].
    fn read(
        &mut self,
        offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Result<Range<usize>, IoError>;

    /// What this reader actually is after fallbacks, e.g. `"pread+O_DIRECT"`,
    /// `"pread (O_DIRECT unsupported on this filesystem: fell back to buffered)"`,
    /// `"io_uring qd 8 bs 1MiB O_DIRECT registered"`.
    fn describe(&self) -> String;
}

/// Capacity a buffer needs to read `[offset, offset+len)` with any backend: the length of the
/// 4 KiB-aligned superset `[floor(offset), ceil(offset+len))` (saturating at `usize::MAX`).
pub fn required_capacity(offset: u64, len: usize) -> usize {
    let a = ALIGN as u64;
    let start = offset - offset % a;
    let end = offset.saturating_add(len as u64);
    let end = match end % a {
        0 => end,
        r => end.saturating_add(a - r),
    };
    usize::try_from(end - start).unwrap_or(usize::MAX)
}

/// Checks the buffer size and the range, returning `(head, end)`: where the data goes in the
/// buffer and the exclusive end offset in the file.
pub(crate) fn check_range(
    path: &Path,
    offset: u64,
    len: usize,
    buf: &AlignedBuf,
) -> Result<(usize, u64), IoError> {
    let end = offset
        .checked_add(len as u64)
        .filter(|e| e.checked_add(ALIGN as u64).is_some())
        .ok_or_else(|| IoError::RangeOverflow {
            path: path.to_path_buf(),
            offset,
            len,
        })?;
    let need = required_capacity(offset, len);
    if buf.capacity() < need {
        return Err(IoError::BufferTooSmall {
            path: path.to_path_buf(),
            offset,
            len,
            have: buf.capacity(),
            need,
        });
    }
    Ok(((offset % ALIGN as u64) as usize, end))
}

/// Open `path` with the chosen backend. Falls back (pread `O_DIRECT` → buffered pread; io_uring
/// unavailable → pread) and records why in [`RangeReader::describe`].
pub fn open_reader(path: &Path, opts: &IoOptions) -> Result<Box<dyn RangeReader>, IoError> {
    match opts.backend {
        IoBackend::Pread => Ok(Box::new(pread::PreadReader::open(path, opts, None)?)),
        IoBackend::Mmap => Ok(Box::new(mmap::MmapReader::open(path, opts)?)),
        IoBackend::IoUring => open_uring(path, opts),
    }
}

#[cfg(target_os = "linux")]
fn open_uring(path: &Path, opts: &IoOptions) -> Result<Box<dyn RangeReader>, IoError> {
    match uring::UringReader::open(path, opts)? {
        Ok(r) => Ok(Box::new(r)),
        Err(why) => uring_fallback(path, opts, &why),
    }
}

/// The pread reader used where io_uring cannot be set up, saying why in describe().
fn uring_fallback(
    path: &Path,
    opts: &IoOptions,
    why: &str,
) -> Result<Box<dyn RangeReader>, IoError> {
    let note = format!("io_uring unavailable ({why}): fell back to pread");
    Ok(Box::new(pread::PreadReader::open(path, opts, Some(note))?))
}

#[cfg(not(target_os = "linux"))]
fn open_uring(path: &Path, opts: &IoOptions) -> Result<Box<dyn RangeReader>, IoError> {
    uring_fallback(path, opts, "not Linux")
}

/// The size of the file at `path`.
pub fn file_len(path: &Path) -> Result<u64, IoError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| IoError::Stat {
            path: path.to_path_buf(),
            source,
        })
}

/// Read the whole file front to back in `chunk`-sized pieces with the given options and return
/// the bandwidth in bytes per second (opening the reader is not timed).
pub fn sequential_read_bandwidth(
    path: &Path,
    opts: &IoOptions,
    chunk: usize,
) -> Result<f64, IoError> {
    let size = file_len(path)?;
    let chunk = chunk.max(1);
    let mut reader = open_reader(path, opts)?;
    // Every chunk starts at a multiple of `chunk`; the largest superset is chunk + 2 blocks.
    let mut buf = AlignedBuf::new(chunk.saturating_add(2 * ALIGN))?;
    let start = Instant::now();
    let mut off = 0u64;
    let mut sink = 0u8;
    while off < size {
        let len = (size - off).min(chunk as u64) as usize;
        let r = reader.read(off, len, &mut buf)?;
        // Touch the data so the copy cannot be optimised away (mmap).
        sink ^= buf.as_slice()[r.start];
        off += len as u64;
    }
    std::hint::black_box(sink);
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(size as f64 / secs)
}

/// The length to report in [`IoError::Truncated`] after a read saw end of file at file position
/// `observed`: the file's current size where `fstat` gives one no larger (a read that starts past
/// the end sees EOF at its own start), else `observed`.
pub(crate) fn eof_len(file: &std::fs::File, observed: u64) -> u64 {
    match file.metadata() {
        Ok(m) if m.len() <= observed => m.len(),
        _ => observed,
    }
}

/// `"1MiB"`-style size for describe() strings.
pub(crate) fn human_size(n: usize) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{}GiB", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

/// `posix_fadvise(fd, start, len, DONTNEED)`; advice only, errors are ignored.
pub(crate) fn fadvise_dontneed(fd: std::os::fd::RawFd, start: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        let (Ok(start), Ok(len)) = (libc::off_t::try_from(start), libc::off_t::try_from(len))
        else {
            return;
        };
        // SAFETY: posix_fadvise only takes integers; an invalid fd or range gives an error code,
        // which we ignore because the call is purely advisory.
        unsafe {
            libc::posix_fadvise(fd, start, len, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names() {
        for (s, b) in [
            ("mmap", IoBackend::Mmap),
            ("pread", IoBackend::Pread),
            ("io_uring", IoBackend::IoUring),
            ("uring", IoBackend::IoUring),
            ("IO_URING", IoBackend::IoUring),
        ] {
            assert_eq!(s.parse::<IoBackend>().unwrap(), b);
        }
        for b in [IoBackend::Mmap, IoBackend::Pread, IoBackend::IoUring] {
            assert_eq!(b.to_string().parse::<IoBackend>().unwrap(), b);
        }
        let e = "nvme".parse::<IoBackend>().unwrap_err();
        assert!(e.to_string().contains("nvme"), "{e}");
    }

    #[test]
    fn required_capacity_bounds() {
        let a = ALIGN as u64;
        assert_eq!(required_capacity(0, 0), 0);
        assert_eq!(required_capacity(0, 1), ALIGN);
        assert_eq!(required_capacity(0, ALIGN), ALIGN);
        assert_eq!(required_capacity(1, ALIGN), 2 * ALIGN);
        assert_eq!(required_capacity(a - 1, 2), 2 * ALIGN);
        assert_eq!(required_capacity(a, ALIGN), ALIGN);
        assert_eq!(required_capacity(5 * a + 7, 3 * ALIGN), 4 * ALIGN);
        for off in [0u64, 1, 4095, 4096, 4097, 123_456_789] {
            for len in [0usize, 1, 4095, 4096, 4097, 1 << 20, (1 << 20) + 3] {
                let c = required_capacity(off, len);
                let head = (off % a) as usize;
                assert!(c >= head + len, "off {off} len {len}");
                assert!(c < head + len + ALIGN, "off {off} len {len}");
                assert_eq!(c % ALIGN, 0);
            }
        }
        // Saturates rather than wrapping.
        assert!(required_capacity(u64::MAX - 10, 100) > 0);
    }

    #[test]
    fn uring_fallback_says_why() {
        let path = std::env::temp_dir().join(format!("flea-io-fallback-{}", std::process::id()));
        std::fs::write(&path, b"hello, world").unwrap();
        let opts = IoOptions {
            backend: IoBackend::IoUring,
            direct: false,
            ..Default::default()
        };
        let mut r = uring_fallback(&path, &opts, "setup refused: EPERM").unwrap();
        let d = r.describe();
        assert!(d.starts_with("pread"), "{d}");
        assert!(
            d.contains("io_uring unavailable (setup refused: EPERM)"),
            "{d}"
        );
        let mut buf = AlignedBuf::new(ALIGN).unwrap();
        let got = r.read(7, 5, &mut buf).unwrap();
        assert_eq!(&buf.as_slice()[got], b"world");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(1 << 20), "1MiB");
        assert_eq!(human_size(256 << 10), "256KiB");
        assert_eq!(human_size(4 << 20), "4MiB");
        assert_eq!(human_size(1000), "1000B");
    }
}
