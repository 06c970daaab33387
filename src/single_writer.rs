//! One store, one writer: a second `enrolld serve` on a SQLite file that a live enrolld
//! serves refuses to start (exit 2), naming the holder's pid.
//!
//! Why: each enrolld decides seats from its own memory and trusts that its persist thread
//! is the only writer of the store. Two processes on one file would each sell from their
//! own copy of the catalog: their answers disagree, and a seat one of them frees is never
//! offered by the other.
//!
//! How: an exclusive OS lock (`flock`, through std's `File::try_lock`) on `<db>.lock`
//! beside the database, taken before the store is opened and held for the life of the
//! process. The kernel drops it when the process ends, however it ends (`kill -9`
//! included), so a file left behind never blocks a restart; the pid written into it is only
//! read while someone holds the lock, to name them.
//!
//! MySQL/MariaDB is not covered here: one database takes one process until the cluster's
//! leases give that store the same guarantee.
//! Must never: be taken by `enrolld token` (it runs beside a live server and only reads the
//! secret file), or be released before the persist thread has stopped.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::persist::store::Dialect;

/// Reads of a held lock file that found no pid yet (its holder locks, then writes).
const PID_READ_TRIES_MAX: u32 = 20;
/// Between two of those reads.
const PID_READ_PAUSE_MS: u64 = 10;

/// The lock on a SQLite store, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// Why the store could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum StoreLockError {
    /// A live process holds the lock: start-up refuses (exit 2).
    #[error("{} is served by another enrolld ({}; lock {}); one SQLite file takes one process", .store.display(), pid_text(*.pid), .lock.display())]
    Held {
        store: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    #[error("locking {}: {source}", .lock.display())]
    Io { lock: PathBuf, source: std::io::Error },
}

fn pid_text(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".into(),
    }
}

/// Claims the store for this process: `Ok(None)` for a store this module does not cover
/// (MySQL, in-memory SQLite).
pub fn hold(store_url: &str) -> Result<Option<StoreLock>, StoreLockError> {
    let Some(store) = sqlite_file(store_url) else {
        return Ok(None);
    };
    let lock = lock_path(&store);
    let io = |source| StoreLockError::Io {
        lock: lock.clone(),
        source,
    };
    // Not truncated on open: the holder's pid must survive until we know we hold it.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let pid = holder_pid(&mut file);
            return Err(StoreLockError::Held { store, lock, pid });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(Some(StoreLock { _file: file }))
}

/// The SQLite file a store URL names; `None` for MySQL and for an in-memory store.
pub fn sqlite_file(store_url: &str) -> Option<PathBuf> {
    if Dialect::of_url(store_url) != Some(Dialect::Sqlite) || store_url.contains("mode=memory") {
        return None;
    }
    match crate::config::sqlite_path(store_url) {
        "" | ":memory:" => None,
        path => Some(PathBuf::from(path)),
    }
}

/// `data/e.db` → `data/e.db.lock`.
fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The pid the holder wrote, waiting a little for a holder that has just taken the lock.
fn holder_pid(file: &mut File) -> Option<u32> {
    for _ in 0..PID_READ_TRIES_MAX {
        let mut text = String::new();
        if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(PID_READ_PAUSE_MS));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, expected: Option<&str>) {
        assert_eq!(sqlite_file(url), expected.map(PathBuf::from), "{url}");
    }

    #[test]
    fn the_file_a_store_url_names() {
        check("sqlite://enrolld.db", Some("enrolld.db"));
        check("sqlite:enrolld.db", Some("enrolld.db"));
        check("sqlite://data/e.db?mode=rwc", Some("data/e.db"));
        check("sqlite:///var/lib/enrolld/e.db", Some("/var/lib/enrolld/e.db"));
        check("sqlite::memory:", None);
        check("sqlite://:memory:", None);
        check("sqlite://e.db?mode=memory", None);
        check("mysql://u:p@127.0.0.1:3306/enrolld", None);
    }

    #[test]
    fn a_second_claim_names_the_first_holder() {
        let dir = std::env::temp_dir().join(format!("enrolld-single-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("e.db").display());
        let first = hold(&url).unwrap().expect("a file store is locked");
        match hold(&url) {
            Err(StoreLockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second claim: {other:?}"),
        }
        drop(first);
        let again = hold(&url).unwrap();
        assert!(again.is_some(), "released with its holder");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
