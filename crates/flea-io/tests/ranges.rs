//! Every backend × O_DIRECT on/off against a file of random bytes, on each filesystem at hand:
//! the cargo target dir (where O_DIRECT usually works), the system temp dir and /dev/shm (tmpfs:
//! O_DIRECT is refused there, so the buffered fallback runs).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use flea_io::{
    open_reader, required_capacity, sequential_read_bandwidth, AlignedBuf, IoBackend, IoError,
    IoOptions, ALIGN,
};

/// A directory removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new_in(parent: &Path) -> Option<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = parent.join(format!(
            "flea-io-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).ok()?;
        Some(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dirs() -> Vec<TempDir> {
    let mut v = Vec::new();
    let candidates = [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::env::temp_dir(),
        PathBuf::from("/dev/shm"),
    ];
    for c in candidates {
        if let Some(d) = TempDir::new_in(&c) {
            v.push(d);
        }
    }
    assert!(!v.is_empty());
    v
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn all_options() -> Vec<IoOptions> {
    let mut v = Vec::new();
    for direct in [false, true] {
        for drop_cache in [false, true] {
            v.push(IoOptions {
                backend: IoBackend::Pread,
                direct,
                drop_cache,
                ..Default::default()
            });
            v.push(IoOptions {
                backend: IoBackend::Mmap,
                direct,
                drop_cache,
                ..Default::default()
            });
        }
        // Small blocks so that a range spans many requests; qd 1 and deeper; with and without
        // registered buffers.
        for (qd, bs, reg) in [
            (1, 3 * ALIGN, true),
            (4, 2 * ALIGN, true),
            (8, 1 << 20, true),
            (3, 5 * ALIGN, false),
        ] {
            v.push(IoOptions {
                backend: IoBackend::IoUring,
                direct,
                queue_depth: qd,
                block_size: bs,
                register_buffers: reg,
                drop_cache: true,
            });
        }
    }
    v
}

const SIZE: usize = 3 * 1024 * 1024 + 12_345;

fn ranges(size: u64, rng: &mut Rng) -> Vec<(u64, usize)> {
    let a = ALIGN as u64;
    let mut v = vec![
        (0, 0),
        (0, 1),
        (0, ALIGN),
        (0, size as usize),
        (1, ALIGN),
        (a - 1, 2),
        (a, ALIGN),
        (a + 17, ALIGN),
        (12_345, 100_000),
        (size - 1, 1),
        (size - 5000, 5000),
        (size - size % a, (size % a) as usize),
        (size - size % a - 10, (size % a) as usize + 10),
        (size - 3 * a - 1, 3 * ALIGN + 1),
        (size, 0),
    ];
    for _ in 0..150 {
        let off = rng.below(size);
        let max = (size - off).min(300_000);
        let len = match rng.below(4) {
            0 => 1 + rng.below(64),
            1 => ALIGN as u64,
            _ => rng.below(max + 1),
        }
        .min(max) as usize;
        v.push((off, len));
    }
    v
}

#[test]
fn every_backend_reads_every_range() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let data = rng.bytes(SIZE);
    let size = data.len() as u64;
    for dir in dirs() {
        let path = dir.0.join("model.bin");
        std::fs::write(&path, &data).unwrap();
        let cap = required_capacity(0, SIZE) + ALIGN;
        // More buffers than the io_uring registration table holds, used in rotation.
        let mut bufs: Vec<AlignedBuf> = (0..10).map(|_| AlignedBuf::new(cap).unwrap()).collect();
        for opts in all_options() {
            let mut r = open_reader(&path, &opts).unwrap();
            let what = format!("{} [{}]", r.describe(), path.display());
            eprintln!("{what}");
            for (k, (off, len)) in ranges(size, &mut rng).into_iter().enumerate() {
                let buf = &mut bufs[k % 10];
                let got = r
                    .read(off, len, buf)
                    .unwrap_or_else(|e| panic!("{what}: read({off}, {len}): {e}"));
                let head = (off % ALIGN as u64) as usize;
                assert_eq!(got, head..head + len, "{what}: read({off}, {len})");
                assert!(
                    buf.as_slice()[got] == data[off as usize..off as usize + len],
                    "{what}: wrong bytes for read({off}, {len})"
                );
            }
        }
    }
}

#[test]
fn o_direct_where_supported_and_fallback_where_not() {
    for dir in dirs() {
        let path = dir.0.join("f.bin");
        std::fs::write(&path, vec![1u8; 10_000]).unwrap();
        for backend in [IoBackend::Pread, IoBackend::IoUring] {
            let opts = IoOptions {
                backend,
                direct: true,
                ..Default::default()
            };
            let r = open_reader(&path, &opts).unwrap();
            let d = r.describe();
            eprintln!("{}: {d}", dir.0.display());
            // ext4 and tmpfs (Linux >= 6.6) accept O_DIRECT; older tmpfs, overlayfs... do not,
            // and then describe() says so (the fallback itself is unit-tested by fault injection).
            assert!(d.contains("O_DIRECT"), "{d}");
            let mut r = r;
            let mut buf = AlignedBuf::new(3 * ALIGN).unwrap();
            let got = r.read(9_000, 1_000, &mut buf).unwrap();
            assert!(buf.as_slice()[got].iter().all(|&b| b == 1));
            let buffered = open_reader(
                &path,
                &IoOptions {
                    backend,
                    direct: false,
                    ..Default::default()
                },
            )
            .unwrap()
            .describe();
            assert!(!buffered.contains("O_DIRECT"), "{buffered}");
        }
    }
}

fn expect_truncated(res: Result<std::ops::Range<usize>, IoError>, what: &str, file_len: u64) {
    match res {
        Err(IoError::Truncated { file_len: got, .. }) => {
            assert_eq!(got, file_len, "{what}");
        }
        other => panic!("{what}: expected Truncated, got {other:?}"),
    }
}

#[test]
fn reads_past_the_end_are_truncation_errors() {
    let mut rng = Rng(42);
    let data = rng.bytes(100_003);
    let size = data.len() as u64;
    for dir in dirs() {
        let path = dir.0.join("short.bin");
        std::fs::write(&path, &data).unwrap();
        let mut buf = AlignedBuf::new(1 << 20).unwrap();
        for opts in all_options() {
            let mut r = open_reader(&path, &opts).unwrap();
            let what = r.describe();
            expect_truncated(r.read(size - 10, 11, &mut buf), &what, size);
            expect_truncated(r.read(0, size as usize + 1, &mut buf), &what, size);
            expect_truncated(r.read(size, 1, &mut buf), &what, size);
            expect_truncated(r.read(size + 50_000, 4096, &mut buf), &what, size);
            let e = r.read(size - 1, 2, &mut buf).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "file truncated: wanted bytes [{}, {}) of {} but it ends at {size}",
                    size - 1,
                    size + 1,
                    path.display()
                ),
                "{what}"
            );
            // Still usable afterwards.
            let got = r.read(size - 1, 1, &mut buf).unwrap();
            assert_eq!(buf.as_slice()[got], data[size as usize - 1..], "{what}");
        }
    }
}

#[test]
fn file_truncated_while_open() {
    let mut rng = Rng(7);
    let data = rng.bytes(1 << 20);
    for dir in dirs() {
        for opts in all_options() {
            let path = dir.0.join("shrinks.bin");
            std::fs::write(&path, &data).unwrap();
            let mut r = open_reader(&path, &opts).unwrap();
            let what = r.describe();
            let mut buf = AlignedBuf::new(1 << 20).unwrap();
            let got = r.read(500_000, 1000, &mut buf).unwrap();
            assert_eq!(buf.as_slice()[got], data[500_000..501_000], "{what}");
            // Another writer truncates the file under the open reader.
            let new_len = 300_001u64;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(new_len)
                .unwrap();
            expect_truncated(r.read(500_000, 1000, &mut buf), &what, new_len);
            expect_truncated(r.read(300_000, 2, &mut buf), &what, new_len);
            let got = r.read(299_000, 1001, &mut buf).unwrap();
            assert_eq!(buf.as_slice()[got], data[299_000..300_001], "{what}");
            // And grows again: readable again.
            std::fs::write(&path, &data).unwrap();
            let got = r.read(500_000, 1000, &mut buf).unwrap();
            assert_eq!(buf.as_slice()[got], data[500_000..501_000], "{what}");
        }
    }
}

#[test]
fn file_replaced_while_open_keeps_reading_the_old_one() {
    let mut rng = Rng(99);
    let old = rng.bytes(700_001);
    let new = rng.bytes(10_000);
    for dir in dirs() {
        for opts in all_options() {
            let path = dir.0.join("replaced.bin");
            std::fs::write(&path, &old).unwrap();
            let mut r = open_reader(&path, &opts).unwrap();
            let what = r.describe();
            // Unlink and write a shorter file under the same name.
            std::fs::remove_file(&path).unwrap();
            std::fs::write(&path, &new).unwrap();
            let mut buf = AlignedBuf::new(1 << 20).unwrap();
            // The open reader still sees the old inode, in full.
            let got = r.read(600_000, 100_001, &mut buf).unwrap();
            assert_eq!(buf.as_slice()[got], old[600_000..], "{what}");
            // A new reader sees the new file and its end.
            let mut r2 = open_reader(&path, &opts).unwrap();
            expect_truncated(r2.read(600_000, 10, &mut buf), &what, new.len() as u64);
            let got = r2.read(0, new.len(), &mut buf).unwrap();
            assert_eq!(buf.as_slice()[got], new[..], "{what}");
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn small_buffer_is_an_error_not_a_panic() {
    let dirs = dirs();
    let path = dirs[0].0.join("x.bin");
    std::fs::write(&path, vec![5u8; 3 * ALIGN]).unwrap();
    for opts in all_options() {
        let mut r = open_reader(&path, &opts).unwrap();
        let mut buf = AlignedBuf::new(ALIGN).unwrap();
        // Fits: [0, 4096) needs one block.
        assert!(r.read(0, ALIGN, &mut buf).is_ok());
        // Unaligned 4096 bytes span two blocks.
        assert!(matches!(
            r.read(1, ALIGN, &mut buf),
            Err(IoError::BufferTooSmall { need, .. }) if need == 2 * ALIGN
        ));
        assert!(matches!(
            r.read(u64::MAX - 3, 10, &mut buf),
            Err(IoError::RangeOverflow { .. })
        ));
    }
}

#[test]
fn missing_file_is_an_open_error() {
    for opts in all_options() {
        let e = open_reader(Path::new("/nonexistent/flea-io/model.gguf"), &opts)
            .err()
            .unwrap();
        assert!(matches!(e, IoError::Open { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/flea-io/model.gguf"));
    }
}

#[test]
fn empty_file() {
    let dirs = dirs();
    let path = dirs[0].0.join("empty.bin");
    std::fs::write(&path, b"").unwrap();
    for opts in all_options() {
        let mut r = open_reader(&path, &opts).unwrap();
        let mut buf = AlignedBuf::new(ALIGN).unwrap();
        assert_eq!(r.read(0, 0, &mut buf).unwrap(), 0..0);
        expect_truncated(r.read(0, 1, &mut buf), &r.describe(), 0);
    }
}

#[test]
fn readers_move_between_threads() {
    let dirs = dirs();
    let path = dirs[0].0.join("threads.bin");
    let data = Rng(3).bytes(200_000);
    std::fs::write(&path, &data).unwrap();
    let mut handles = Vec::new();
    for opts in all_options() {
        let r = open_reader(&path, &opts).unwrap();
        let data = data.clone();
        handles.push(std::thread::spawn(move || {
            let mut r = r;
            let mut buf = AlignedBuf::new(1 << 20).unwrap();
            let got = r.read(1234, 150_000, &mut buf).unwrap();
            assert_eq!(buf.as_slice()[got], data[1234..151_234]);
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn bandwidth_runs() {
    let dirs = dirs();
    let path = dirs[0].0.join("bw.bin");
    std::fs::write(&path, Rng(5).bytes(2_000_001)).unwrap();
    for opts in all_options() {
        let bw = sequential_read_bandwidth(&path, &opts, 256 * 1024).unwrap();
        assert!(bw > 0.0 && bw.is_finite());
    }
}

/// A writer keeps truncating and rewriting the file while readers stream it: every read must end
/// in either the right bytes or a truncation error, never a hang, a panic or wrong bytes from
/// within the file's current extent. (mmap is left out: a truncation racing with its copy is the
/// documented SIGBUS window.)
#[test]
fn concurrent_truncation_stress() {
    let dirs = dirs();
    let path = dirs[0].0.join("churn.bin");
    let data = Rng(11).bytes(2 << 20);
    std::fs::write(&path, &data).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, data, stop) = (path.clone(), data.clone(), stop.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                f.set_len(k * 77_777 % (2 << 20)).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(200));
                use std::os::unix::fs::FileExt;
                f.write_all_at(&data, 0).unwrap();
            }
        })
    };
    let mut rng = Rng(12);
    let (mut ok, mut truncated) = (0, 0);
    for opts in all_options()
        .into_iter()
        .filter(|o| o.backend != IoBackend::Mmap)
    {
        let mut r = open_reader(&path, &opts).unwrap();
        let mut buf = AlignedBuf::new(1 << 20).unwrap();
        for _ in 0..150 {
            let off = rng.below(data.len() as u64 - 1000);
            let len = (rng.below(600_000) as usize).min(data.len() - off as usize);
            match r.read(off, len, &mut buf) {
                Ok(got) => {
                    // Bytes were either the data or zeroes from a truncate-then-extend.
                    let b = &buf.as_slice()[got];
                    let want = &data[off as usize..off as usize + len];
                    assert!(
                        b.iter().zip(want).all(|(x, y)| x == y || *x == 0),
                        "{}",
                        r.describe()
                    );
                    ok += 1;
                }
                Err(IoError::Truncated { .. }) => truncated += 1,
                Err(e) => panic!("{}: {e}", r.describe()),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!("concurrent truncation: {ok} reads ok, {truncated} truncated");
    assert!(ok + truncated > 0);
}
