//! Output plumbing: a file sink whose writes happen on a background thread (so generating
//! the next tensor overlaps writing the previous one), progress reporting, and a free-space
//! check.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes per hand-off to the writer thread, and how many such buffers may be in flight.
const PIECE: usize = 16 << 20;
const MAX_PIECES: usize = 4;

/// A `Write` that copies into large buffers and hands them to a thread that writes them to
/// the file. Errors of the writer thread surface at the next `write` or at `finish`.
pub(crate) struct PipeSink {
    tx: Option<SyncSender<Vec<u8>>>,
    free: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    allocated: usize,
    thread: Option<JoinHandle<io::Result<()>>>,
    written: Arc<AtomicU64>,
}

impl PipeSink {
    /// `total` (bytes expected) and `label` are for progress lines, printed to stderr about
    /// once a second when `progress` is set.
    pub(crate) fn new(file: File, total: u64, label: String, progress: bool) -> PipeSink {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(MAX_PIECES);
        let (free_tx, free) = mpsc::channel::<Vec<u8>>();
        let written = Arc::new(AtomicU64::new(0));
        let w = Arc::clone(&written);
        let thread = std::thread::spawn(move || -> io::Result<()> {
            let mut file = file;
            let start = Instant::now();
            let mut last = start;
            for mut buf in rx {
                file.write_all(&buf)?;
                let done = w.fetch_add(buf.len() as u64, Ordering::Relaxed) + buf.len() as u64;
                if progress && last.elapsed() >= Duration::from_secs(1) {
                    last = Instant::now();
                    let s = start.elapsed().as_secs_f64();
                    eprintln!(
                        "{label}: {:.2} / {:.2} GB ({:.0}%), {:.2} GB/s",
                        done as f64 / 1e9,
                        total as f64 / 1e9,
                        100.0 * done as f64 / total.max(1) as f64,
                        done as f64 / 1e9 / s.max(1e-9)
                    );
                }
                buf.clear();
                // The main side may be gone already (finishing); then the buffer is freed.
                let _ = free_tx.send(buf);
            }
            file.flush()
        });
        PipeSink {
            tx: Some(tx),
            free,
            cur: Vec::with_capacity(PIECE),
            allocated: 1,
            thread: Some(thread),
            written,
        }
    }

    /// The writer thread's error (it stopped early), or a generic one if it gave none.
    fn thread_error(&mut self) -> io::Error {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("writer thread panicked"),
            _ => io::Error::other("writer thread stopped"),
        }
    }

    fn send_cur(&mut self) -> io::Result<()> {
        let next = if self.allocated < MAX_PIECES + 2 {
            self.allocated += 1;
            Vec::with_capacity(PIECE)
        } else {
            match self.free.recv() {
                Ok(b) => b,
                Err(_) => return Err(self.thread_error()),
            }
        };
        let buf = std::mem::replace(&mut self.cur, next);
        let sent = match &self.tx {
            Some(tx) => tx.send(buf).is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.thread_error());
        }
        Ok(())
    }

    /// Send what is buffered, wait for the writer thread to write and flush everything.
    pub(crate) fn finish(mut self) -> io::Result<u64> {
        if !self.cur.is_empty() {
            self.send_cur()?;
        }
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r?,
            Some(Err(_)) => return Err(io::Error::other("writer thread panicked")),
            None => return Err(io::Error::other("writer thread stopped")),
        }
        Ok(self.written.load(Ordering::Relaxed))
    }
}

impl Write for PipeSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = PIECE - self.cur.len();
        let n = data.len().min(room);
        self.cur.extend_from_slice(&data[..n]);
        if self.cur.len() == PIECE {
            self.send_cur()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // The real flush happens in `finish`; the GGUF writer flushes once at its end.
        Ok(())
    }
}

/// Write `w`'s file to `path` through a [`PipeSink`], producing deferred tensors with
/// `fill`. Returns the bytes written. On failure the partial file is removed and I/O errors
/// name `path`.
pub(crate) fn write_gguf<F>(
    w: &flea_gguf::GgufWriter,
    path: &Path,
    total: u64,
    progress: bool,
    fill: F,
) -> crate::Result<u64>
where
    F: FnMut(usize, &mut [u8]) -> flea_gguf::Result<()>,
{
    let label = path.display().to_string();
    let io = |source| crate::SynthError::Io {
        path: label.clone(),
        source,
    };
    let file = File::create(path).map_err(io)?;
    let mut out = PipeSink::new(file, total, label.clone(), progress);
    let r = match w.write_with(&mut out, fill) {
        // The writer labels its sink "<output>"; say which file it was.
        Err(flea_gguf::GgufError::Io { source, .. }) => Err(io(source)),
        Err(e) => Err(e.into()),
        Ok(()) => out.finish().map_err(io),
    };
    if r.is_err() {
        // Leave no truncated model behind (best effort: the error is what matters).
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Bytes available to an unprivileged user on the filesystem holding `dir`, or None where
/// that cannot be asked (non-Linux) or the call fails.
pub(crate) fn free_space(dir: &Path) -> Option<u64> {
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        extern "C" {
            fn statvfs(path: *const std::ffi::c_char, buf: *mut u64) -> std::ffi::c_int;
        }
        let c = CString::new(dir.as_os_str().as_bytes()).ok()?;
        // On 64-bit Linux (glibc and musl) struct statvfs starts with f_bsize, f_frsize,
        // f_blocks, f_bfree, f_bavail as 8-byte fields and is 112 bytes long; a larger
        // zeroed buffer keeps us safe from layout growth without pulling in libc.
        let mut buf = [0u64; 32];
        // SAFETY: `c` is a valid NUL-terminated path and `buf` is writable and larger than
        // struct statvfs on this target.
        let rc = unsafe { statvfs(c.as_ptr(), buf.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        Some(buf[4].saturating_mul(buf[1]))
    }
    #[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
    {
        let _ = dir;
        None
    }
}

/// The directory a new file at `path` will live in (for the free-space check).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Fail with [`crate::SynthError::NoSpace`] unless `need` bytes (plus a small margin) fit
/// next to `path`. An existing file at `path` will be truncated, so its size counts as free.
pub(crate) fn check_space(path: &Path, need: u64) -> crate::Result<()> {
    let dir = parent_dir(path);
    let Some(avail) = free_space(dir) else {
        return Ok(());
    };
    let reclaim = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let margin = 64 << 20;
    if need.saturating_add(margin) > avail.saturating_add(reclaim) {
        return Err(crate::SynthError::NoSpace {
            path: path.display().to_string(),
            need,
            avail: avail.saturating_add(reclaim),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_space_of_tmp() {
        if cfg!(target_os = "linux") {
            let f = super::free_space(&std::env::temp_dir());
            assert!(f.is_some_and(|b| b > 0));
        }
    }
}
