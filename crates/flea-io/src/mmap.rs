//! mmap backend: the file mapped read-only, ranges copied out.
//!
//! A mapped file that shrinks makes access past its new end raise `SIGBUS`. Before every copy the
//! file's current size is checked with `fstat`, so a file truncated before the read gives
//! [`IoError::Truncated`]. The remaining race: a truncation landing between that `fstat` and the
//! end of the copy still raises `SIGBUS` (only the pread and io_uring backends are immune).
//! A file replaced by rename or unlink-and-rewrite is harmless: the mapping keeps the old inode.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};

use crate::{check_range, fadvise_dontneed, AlignedBuf, IoError, IoOptions, RangeReader};

/// The VM page size (madvise needs page-aligned starts).
fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

pub(crate) struct MmapReader {
    file: File,
    path: PathBuf,
    /// None while the file is empty (a zero-length mapping is not allowed).
    map: Option<Mmap>,
    drop_cache: bool,
}

impl MmapReader {
    pub(crate) fn open(path: &Path, opts: &IoOptions) -> Result<MmapReader, IoError> {
        let file = File::open(path).map_err(|source| IoError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let mut r = MmapReader {
            file,
            path: path.to_path_buf(),
            map: None,
            drop_cache: opts.drop_cache,
        };
        let len = r.current_len()?;
        r.remap(len)?;
        Ok(r)
    }

    fn current_len(&self) -> Result<u64, IoError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| IoError::Stat {
                path: self.path.clone(),
                source,
            })
    }

    fn remap(&mut self, len: u64) -> Result<(), IoError> {
        self.map = None;
        if len == 0 {
            return Ok(());
        }
        let len = usize::try_from(len).map_err(|_| IoError::RangeOverflow {
            path: self.path.clone(),
            offset: 0,
            len: usize::MAX,
        })?;
        // SAFETY: the mapping is read-only and owned by this reader. Another process may still
        // truncate the file underneath it; `read` checks the current size before every copy so
        // that only a truncation racing with the copy itself can fault (see the module docs).
        let map = unsafe { MmapOptions::new().len(len).map(&self.file) }.map_err(|source| {
            IoError::Mmap {
                path: self.path.clone(),
                source,
            }
        })?;
        self.map = Some(map);
        Ok(())
    }
}

impl RangeReader for MmapReader {
    fn read(
        &mut self,
        offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Result<Range<usize>, IoError> {
        let (head, end) = check_range(&self.path, offset, len, buf)?;
        if len == 0 {
            return Ok(head..head);
        }
        let size = self.current_len()?;
        if end > size {
            return Err(IoError::Truncated {
                path: self.path.clone(),
                start: offset,
                end,
                file_len: size,
            });
        }
        let mapped = self.map.as_ref().map_or(0, |m| m.len() as u64);
        if end > mapped {
            // The file grew since it was mapped.
            self.remap(size)?;
        }
        let Some(map) = self.map.as_ref() else {
            return Err(IoError::Truncated {
                path: self.path.clone(),
                start: offset,
                end,
                file_len: 0,
            });
        };
        // end <= size <= map.len(), and both fit in usize since the map does.
        let (s, e) = (offset as usize, end as usize);
        buf.as_mut_slice()[head..head + len].copy_from_slice(&map[s..e]);
        if self.drop_cache {
            // Unmap the pages from this process so that the page cache may drop them.
            let page = page_size();
            let a_start = s - s % page;
            let a_end = e.next_multiple_of(page).min(map.len());
            // SAFETY: [a_start, a_end) lies inside the mapping, whose start is page-aligned, and
            // a_start is a multiple of the page size.
            // MADV_DONTNEED on a read-only shared file mapping only drops page-table entries;
            // later accesses fault the data back in from the file, so no content is lost.
            unsafe {
                libc::madvise(
                    map.as_ptr().add(a_start) as *mut libc::c_void,
                    a_end - a_start,
                    libc::MADV_DONTNEED,
                );
            }
            fadvise_dontneed(
                self.file.as_raw_fd(),
                a_start as u64,
                (a_end - a_start) as u64,
            );
        }
        Ok(head..head + len)
    }

    fn describe(&self) -> String {
        if self.drop_cache {
            "mmap (copy out, size checked per read; madvise+fadvise DONTNEED)".to_string()
        } else {
            "mmap (copy out, size checked per read)".to_string()
        }
    }
}
