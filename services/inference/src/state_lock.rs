//! One process per state directory: an exclusive OS lock (`flock`) on `DIR/llmos.lock`,
//! taken by every command that boots a runtime on the directory (`serve`, `run`, resume
//! on boot) and held while it runs. Without it a second process would truncate the KV
//! pool file under the first one's memory map (SIGBUS) and interleave journal writes. The
//! file names its holder for the refusal's message; the OS drops the lock when the
//! holder exits however it exits, so a file left behind by a killed process is harmless.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::InferenceError;

/// The lock file's name inside a state directory.
pub const LOCK_FILE: &str = "llmos.lock";

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock of `dir` without waiting, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<StateLock, InferenceError> {
        let path = dir.join(LOCK_FILE);
        let io = |what: &str, e: std::io::Error| {
            InferenceError::Internal(format!("cannot {what} {}: {e}", path.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("open", e))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(|e| io("truncate", e))?;
                file.seek(SeekFrom::Start(0)).map_err(|e| io("seek", e))?;
                file.write_all(holder().as_bytes())
                    .map_err(|e| io("write", e))?;
                Ok(StateLock { _file: file })
            }
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The holder's line is best effort: a refusal names what it can.
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                Err(InferenceError::StateDirInUse {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "a process that did not say who it is".into()
                    } else {
                        holder.to_string()
                    },
                })
            }
            Err(TryLockError::Error(e)) => Err(io("lock", e)),
        }
    }
}

/// Who holds the lock: this process's id, command line and start time.
fn holder() -> String {
    let command: Vec<String> = std::env::args().collect();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "pid {} `{}`, holding it since unix time {since}\n",
        std::process::id(),
        command.join(" ")
    )
}
