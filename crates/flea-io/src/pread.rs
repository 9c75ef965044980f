//! `pread(2)` backend, optionally `O_DIRECT`.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{check_range, fadvise_dontneed, AlignedBuf, IoError, IoOptions, RangeReader, ALIGN};

/// Opens `path` read-only, with `O_DIRECT` if `direct`. Returns the file and whether it really is
/// `O_DIRECT`; a filesystem that refuses `O_DIRECT` (EINVAL) gets a buffered descriptor instead.
pub(crate) fn open_file(path: &Path, direct: bool) -> Result<(File, bool), IoError> {
    let open_err = |source| IoError::Open {
        path: path.to_path_buf(),
        source,
    };
    if direct {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let attempt = if fault::refuse_direct_open() {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
            };
            match attempt {
                Ok(f) => return Ok((f, true)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(open_err(e)),
            }
        }
    }
    let f = OpenOptions::new().read(true).open(path).map_err(open_err)?;
    Ok((f, false))
}

/// Fault injection for the unit tests: this machine's filesystems (ext4, and tmpfs since Linux
/// 6.6) all accept O_DIRECT, so the fallbacks are exercised by pretending they do not.
pub(crate) mod fault {
    #[cfg(test)]
    thread_local! {
        pub(crate) static REFUSE_DIRECT_OPEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        pub(crate) static REFUSE_DIRECT_READ: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Pretend `open(O_DIRECT)` fails with EINVAL.
    pub(crate) fn refuse_direct_open() -> bool {
        #[cfg(test)]
        return REFUSE_DIRECT_OPEN.with(|c| c.get());
        #[cfg(not(test))]
        false
    }

    /// Pretend O_DIRECT reads fail with EINVAL.
    pub(crate) fn refuse_direct_read() -> bool {
        #[cfg(test)]
        return REFUSE_DIRECT_READ.with(|c| c.get());
        #[cfg(not(test))]
        false
    }
}

pub(crate) const DIRECT_REFUSED_AT_OPEN: &str =
    "O_DIRECT unsupported on this filesystem: fell back to buffered";
pub(crate) const DIRECT_REFUSED_AT_READ: &str =
    "O_DIRECT read refused with EINVAL: fell back to buffered";

pub(crate) struct PreadReader {
    file: File,
    path: PathBuf,
    /// The descriptor really is O_DIRECT.
    direct: bool,
    drop_cache: bool,
    /// Why this is not exactly what was asked for.
    notes: Vec<String>,
}

impl PreadReader {
    pub(crate) fn open(
        path: &Path,
        opts: &IoOptions,
        note: Option<String>,
    ) -> Result<PreadReader, IoError> {
        let (file, direct) = open_file(path, opts.direct)?;
        let mut notes: Vec<String> = note.into_iter().collect();
        if opts.direct && !direct {
            notes.push(DIRECT_REFUSED_AT_OPEN.to_string());
        }
        Ok(PreadReader {
            file,
            path: path.to_path_buf(),
            direct,
            drop_cache: opts.drop_cache,
            notes,
        })
    }

    /// Swap the O_DIRECT descriptor for a buffered one.
    fn fall_back_to_buffered(&mut self) -> Result<(), IoError> {
        let (file, _) = open_file(&self.path, false)?;
        self.file = file;
        self.direct = false;
        self.notes.push(DIRECT_REFUSED_AT_READ.to_string());
        Ok(())
    }
}

/// Outcome of [`pread_full`].
pub(crate) enum Filled {
    /// `done` bytes were read; fewer than asked means the file ended at `start + done`.
    Bytes(usize),
    /// The kernel said EINVAL (O_DIRECT refused at read time).
    Einval,
}

/// `pread` `dst.len()` bytes from `start`, retrying on EINTR and continuing after short reads,
/// until done or end of file. With `direct`, a read that ends off a block boundary is the end of
/// the file (an O_DIRECT descriptor cannot continue from an unaligned offset).
pub(crate) fn pread_full(
    file: &File,
    path: &Path,
    dst: &mut [u8],
    start: u64,
    direct: bool,
) -> Result<Filled, IoError> {
    let fd = file.as_raw_fd();
    let dst_len = dst.len();
    let mut done = 0usize;
    while done < dst.len() {
        let rest = &mut dst[done..];
        let pos = start + done as u64;
        let off = libc::off_t::try_from(pos).map_err(|_| IoError::RangeOverflow {
            path: path.to_path_buf(),
            offset: start,
            len: dst_len,
        })?;
        // Linux transfers at most 0x7ffff000 bytes per call; ask for no more than 1 GiB.
        let want = rest.len().min(1 << 30);
        if direct && fault::refuse_direct_read() {
            return Ok(Filled::Einval);
        }
        // SAFETY: `rest` is a valid, exclusively borrowed region of at least `want` bytes, so the
        // kernel may write up to `want` bytes at its start.
        let r = unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), want, off) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                Some(libc::EINVAL) if direct => return Ok(Filled::Einval),
                _ => {
                    return Err(IoError::Read {
                        path: path.to_path_buf(),
                        offset: pos,
                        len: rest.len(),
                        source: err,
                    })
                }
            }
        }
        if r == 0 {
            break;
        }
        done += r as usize;
        if direct && !done.is_multiple_of(ALIGN) {
            break;
        }
    }
    Ok(Filled::Bytes(done))
}

impl RangeReader for PreadReader {
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
        loop {
            // Direct: the aligned superset into buf[0..]; buffered: exactly the range into
            // buf[head..].
            let (start, dst) = if self.direct {
                let start = offset - head as u64;
                let total = crate::required_capacity(offset, len);
                (start, &mut buf.as_mut_slice()[..total])
            } else {
                (offset, &mut buf.as_mut_slice()[head..head + len])
            };
            let total = dst.len();
            match pread_full(&self.file, &self.path, dst, start, self.direct)? {
                Filled::Einval => {
                    self.fall_back_to_buffered()?;
                    continue;
                }
                Filled::Bytes(done) => {
                    let got_to = start + done as u64;
                    if got_to < end {
                        return Err(IoError::Truncated {
                            path: self.path.clone(),
                            start: offset,
                            end,
                            file_len: crate::eof_len(&self.file, got_to),
                        });
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
        let mut s = if self.direct {
            "pread+O_DIRECT".to_string()
        } else {
            "pread (buffered)".to_string()
        };
        if self.drop_cache {
            s.push_str(", fadvise DONTNEED");
        }
        for n in &self.notes {
            s.push_str(" (");
            s.push_str(n);
            s.push(')');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open_reader, IoBackend};

    fn with_file(f: impl FnOnce(&Path, &[u8])) {
        let path = std::env::temp_dir().join(format!(
            "flea-io-pread-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let data: Vec<u8> = (0..50_001u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        f(&path, &data);
        std::fs::remove_file(&path).unwrap();
    }

    fn check_reads(r: &mut dyn RangeReader, data: &[u8]) {
        let mut buf = AlignedBuf::new(1 << 17).unwrap();
        for (off, len) in [
            (0u64, 1usize),
            (1, 4096),
            (4095, 2),
            (40_000, 10_001),
            (50_000, 1),
        ] {
            let got = r.read(off, len, &mut buf).unwrap();
            assert_eq!(buf.as_slice()[got], data[off as usize..off as usize + len]);
        }
        assert!(matches!(
            r.read(49_000, 1002, &mut buf),
            Err(IoError::Truncated {
                file_len: 50_001,
                ..
            })
        ));
    }

    #[test]
    fn direct_refused_at_open_falls_back_to_buffered() {
        with_file(|path, data| {
            fault::REFUSE_DIRECT_OPEN.with(|c| c.set(true));
            for backend in [IoBackend::Pread, IoBackend::IoUring] {
                let opts = IoOptions {
                    backend,
                    direct: true,
                    ..Default::default()
                };
                let mut r = open_reader(path, &opts).unwrap();
                let d = r.describe();
                assert!(
                    d.contains("O_DIRECT unsupported on this filesystem: fell back to buffered"),
                    "{d}"
                );
                assert!(
                    !d.contains("O_DIRECT,") && !d.starts_with("pread+O_DIRECT"),
                    "{d}"
                );
                check_reads(r.as_mut(), data);
            }
            fault::REFUSE_DIRECT_OPEN.with(|c| c.set(false));
        });
    }

    #[test]
    fn direct_refused_at_read_falls_back_to_buffered() {
        with_file(|path, data| {
            fault::REFUSE_DIRECT_READ.with(|c| c.set(true));
            for backend in [IoBackend::Pread, IoBackend::IoUring] {
                let opts = IoOptions {
                    backend,
                    direct: true,
                    queue_depth: 2,
                    block_size: 8192,
                    ..Default::default()
                };
                let mut r = open_reader(path, &opts).unwrap();
                check_reads(r.as_mut(), data);
                let d = r.describe();
                assert!(
                    d.contains("O_DIRECT read refused with EINVAL: fell back to buffered"),
                    "{d}"
                );
            }
            fault::REFUSE_DIRECT_READ.with(|c| c.set(false));
        });
    }
}
