//! An app's checkpointed state: named values in its own directory
//! (`<state-dir>/apps/NAME/`), each written atomically and checksummed, so what an app
//! checkpointed survives its crash and the process's.
//!
//! One file per key, `KEY.ckpt`: a header line `llmos-app-checkpoint 1 CRC32 LEN`, then
//! LEN bytes of JSON. A write goes to `KEY.ckpt.tmp`, is synced, renamed over the old file,
//! and the directory is synced: a crash leaves the old value or the new one, never a mix.
//! A read verifies length and checksum; damage is an error, never silently a default.
//! Writes are synchronous (an fsync, about a millisecond on a disk): checkpoint at
//! milestones (a finished turn, a finished item), not per token — the runtime's journal
//! already makes every token durable.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::AppError;

const MAGIC: &str = "llmos-app-checkpoint 1";
const EXT: &str = "ckpt";

/// Fault point evaluated before every checkpoint write of every app (`return` fails it).
pub const CHECKPOINT_FAULT_POINT: &str = "app.checkpoint";

/// The per-app point: `app.checkpoint:NAME`.
pub fn checkpoint_fault_point(app: &str) -> String {
    format!("{CHECKPOINT_FAULT_POINT}:{app}")
}

/// An app's durable key → value store.
#[derive(Clone, Debug)]
pub struct AppStore {
    app: Arc<str>,
    dir: PathBuf,
    fault_point: Arc<str>,
}

impl AppStore {
    /// Opens (creating) the store in `dir`, removing half-written temporaries of a crash.
    pub fn open(app: &str, dir: impl Into<PathBuf>) -> Result<Self, AppError> {
        let dir = dir.into();
        let store = Self {
            app: app.into(),
            fault_point: checkpoint_fault_point(app).into(),
            dir,
        };
        fs::create_dir_all(&store.dir).map_err(|e| store.io_error("*", "create directory", &e))?;
        let entries = fs::read_dir(&store.dir).map_err(|e| store.io_error("*", "list", &e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        llmos_kernel::faults::declare(CHECKPOINT_FAULT_POINT, "every app checkpoint write fails");
        llmos_kernel::faults::declare(&store.fault_point, "this app's checkpoint writes fail");
        Ok(store)
    }

    /// The directory (an app may keep other files of its own here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Durably stores `value` under `key`, replacing what was there.
    pub fn put<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), AppError> {
        check_key(key)?;
        self.inject(key)?;
        let json = serde_json::to_vec(value)
            .map_err(|e| self.error(key, format!("cannot serialise: {e}")))?;
        let crc = crc32fast::hash(&json);
        let path = self.path(key);
        let tmp = path.with_extension(format!("{EXT}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&tmp)?;
            writeln!(file, "{MAGIC} {crc:08x} {}", json.len())?;
            file.write_all(&json)?;
            file.sync_data()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io_error(key, "write", &e)
        })
    }

    /// The value under `key`, if any. A damaged file is an error.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AppError> {
        check_key(key)?;
        let bytes = match fs::read(self.path(key)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_error(key, "read", &e)),
        };
        let corrupt = |why: &str| self.error(key, format!("damaged checkpoint: {why}"));
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| corrupt("no header"))?;
        let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| corrupt("bad header"))?;
        let mut fields = header
            .strip_prefix(MAGIC)
            .ok_or_else(|| corrupt("bad header"))?
            .split_whitespace();
        let crc = fields
            .next()
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or_else(|| corrupt("bad header"))?;
        let len: usize = fields
            .next()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| corrupt("bad header"))?;
        let body = &bytes[newline + 1..];
        if body.len() != len {
            return Err(corrupt("length mismatch"));
        }
        if crc32fast::hash(body) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| self.error(key, format!("cannot read as the expected type: {e}")))
    }

    /// Removes `key`; returns whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool, AppError> {
        check_key(key)?;
        match fs::remove_file(self.path(key)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io_error(key, "delete", &e)),
        }
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Result<Vec<String>, AppError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| self.io_error("*", "list", &e))?;
        let mut keys: Vec<String> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let key = name.strip_suffix(&format!(".{EXT}"))?;
                check_key(key).is_ok().then(|| key.to_string())
            })
            .collect();
        keys.sort();
        Ok(keys)
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.{EXT}"))
    }

    fn inject(&self, key: &str) -> Result<(), AppError> {
        let fire = |point: &str| -> Result<(), AppError> {
            llmos_kernel::fault_point!(point, |detail: Option<String>| {
                Err(self.error(
                    key,
                    format!(
                        "injected fault `{point}`{}",
                        detail.map(|d| format!(": {d}")).unwrap_or_default()
                    ),
                ))
            });
            Ok(())
        };
        fire(CHECKPOINT_FAULT_POINT)?;
        fire(&self.fault_point)
    }

    fn error(&self, key: &str, reason: String) -> AppError {
        AppError::Checkpoint {
            app: self.app.to_string(),
            key: key.to_string(),
            reason,
        }
    }

    fn io_error(&self, key: &str, what: &str, e: &std::io::Error) -> AppError {
        self.error(key, format!("cannot {what} in {}: {e}", self.dir.display()))
    }
}

fn check_key(key: &str) -> Result<(), AppError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AppError::BadKey(key.chars().take(140).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_keys_list() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::open("t", dir.path()).unwrap();
        assert_eq!(store.get::<Vec<u32>>("a").unwrap(), None);
        store.put("a", &vec![1u32, 2, 3]).unwrap();
        store.put("b.c_d-e", &"text").unwrap();
        store.put("a", &vec![4u32]).unwrap();
        assert_eq!(store.get::<Vec<u32>>("a").unwrap(), Some(vec![4]));
        assert_eq!(store.keys().unwrap(), vec!["a", "b.c_d-e"]);
        assert!(store.delete("a").unwrap());
        assert!(!store.delete("a").unwrap());
        let reopened = AppStore::open("t", dir.path()).unwrap();
        assert_eq!(
            reopened.get::<String>("b.c_d-e").unwrap().as_deref(),
            Some("text")
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::open("t", dir.path()).unwrap();
        for key in ["", ".hidden", "a/b", "../x", "sp ace", &"k".repeat(129)] {
            assert!(
                matches!(store.put(key, &1), Err(AppError::BadKey(_))),
                "{key:?}"
            );
            assert!(matches!(store.get::<u32>(key), Err(AppError::BadKey(_))));
        }
    }

    #[test]
    fn damage_is_an_error_never_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::open("t", dir.path()).unwrap();
        store.put("k", &"hello world").unwrap();
        let path = dir.path().join("k.ckpt");
        let good = fs::read(&path).unwrap();
        // Every truncation and every single-bit flip is detected.
        for cut in 0..good.len() {
            fs::write(&path, &good[..cut]).unwrap();
            assert!(store.get::<String>("k").is_err(), "cut at {cut}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            match store.get::<String>("k") {
                Err(AppError::Checkpoint { .. }) => {}
                // A flip inside the JSON that still checks out is impossible (crc32 catches
                // every single-bit error); a flip in the header may still parse as a number
                // but then the checksum or length disagree.
                other => panic!("flip at {i}: {other:?}"),
            }
        }
        fs::write(&path, &good).unwrap();
        assert_eq!(
            store.get::<String>("k").unwrap().as_deref(),
            Some("hello world")
        );
    }

    #[test]
    fn a_leftover_temporary_is_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::open("t", dir.path()).unwrap();
        store.put("k", &1u32).unwrap();
        fs::write(dir.path().join("k.ckpt.tmp"), b"half written").unwrap();
        let store = AppStore::open("t", dir.path()).unwrap();
        assert_eq!(store.get::<u32>("k").unwrap(), Some(1));
        assert!(!dir.path().join("k.ckpt.tmp").exists());
    }
}
