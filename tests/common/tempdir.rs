//! Scratch directories: a fixture keeps its process's config, logs and data in one, and
//! nothing of it outlives the fixture. Shared by the tests and the benches (which include
//! this file by path), so it uses nothing but std.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

// === impl TempDir ===

impl TempDir {
    /// A fresh directory named for `tag`; panics when none can be made, since a fixture
    /// without its directory cannot start.
    pub fn new(tag: &str) -> TempDir {
        TempDir::create(tag).expect("create a scratch directory")
    }

    /// A fresh directory `waitless-PID-N-TAG` in the system's temp dir. One of that name
    /// left behind by a dead process that had the same pid is skipped, not reused: its
    /// contents (a MariaDB data directory, say) would leak into the new fixture.
    pub fn create(tag: &str) -> io::Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let name = format!("waitless-{}-{n}-{tag}", std::process::id());
            let dir = std::env::temp_dir().join(name);
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(TempDir(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
