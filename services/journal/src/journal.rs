//! The journal itself: one log file in a state directory, recovered on open (torn tail
//! truncated), appended under a flush and a sync policy, compacted on demand.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::JournalError;
use crate::record::{file_header, Damage, Record};
use crate::scan::scan;
use crate::state::{RequestLog, State, Undo};

/// The log's file name inside the state directory.
pub const LOG_FILE_NAME: &str = "journal.log";
/// Where compaction builds the new log before renaming it over the old one. A file by
/// this name found at open is a compaction that never finished; it is deleted.
pub const COMPACT_TMP_NAME: &str = "journal.log.compact";
/// Fault point evaluated before every write of record bytes.
pub const APPEND_FAULT_POINT: &str = "journal.append";
/// Fault point evaluated in `compact` after the new log is written and synced, before
/// it is renamed over the old one.
pub const COMPACT_FAULT_POINT: &str = "journal.compact";

const TARGET: &str = "llmos::journal";

/// When appended bytes are handed to the operating system (`write`). Bytes the OS has
/// survive the death of the process (panic, SIGKILL, OOM kill); bytes still in the
/// journal's buffer do not. Power loss is [`SyncPolicy`]'s business.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum FlushPolicy {
    /// One `write` per `append`/`append_batch`, before it returns: a record whose append
    /// returned `Ok` survives a process kill. What the token path needs.
    #[default]
    EveryRecord,
    /// Buffer; an append writes the buffer (itself included) when at least this many
    /// milliseconds have passed since the last write. `flush`, `poll` once the deadline
    /// ([`Journal::next_deadline`]) has passed, `close` and drop write too. A process
    /// kill loses at most the records appended since the last write.
    IntervalMs(u64),
    /// Buffer until `flush`, `sync`, `compact`, `close` or drop. A process kill loses
    /// every record appended since the last of those.
    Off,
}

/// When written bytes are forced to stable storage (`fdatasync`). Only this protects
/// against power loss or a kernel crash; the file's length is covered by `fdatasync`.
/// Under any policy but `Never`, `open` also syncs the truncation of a damaged tail and
/// the header of a new log (and its directory entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum SyncPolicy {
    /// Never (except in `compact`, whose rename needs it). Power loss may lose any
    /// record not yet written back by the OS; recovery still finds a valid prefix.
    #[default]
    Never,
    /// After every write, before the append (or `flush`) returns: with
    /// [`FlushPolicy::EveryRecord`], a record whose append returned `Ok` survives power
    /// loss.
    EveryAppend,
    /// After a write when at least this many milliseconds have passed since the last
    /// sync, and from `poll` once due. Power loss loses at most about that much.
    IntervalMs(u64),
}

/// How a journal writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JournalOptions {
    /// When bytes go to the OS. Default: every record.
    pub flush: FlushPolicy,
    /// When the OS is made to put them on disk. Default: never.
    pub sync: SyncPolicy,
}

/// What `open` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Recovered {
    /// Every request the log describes, finished ones included until compaction.
    pub requests: BTreeMap<u64, RequestLog>,
    /// Bytes cut from the end of the file (a torn or damaged tail).
    pub truncated_bytes: u64,
    /// Good records read.
    pub records: u64,
    /// Where and why the tail was cut, when it was.
    pub damage: Option<Damage>,
}

impl Recovered {
    /// Requests without `End`: the ones to resume.
    pub fn unfinished(&self) -> impl Iterator<Item = (u64, &RequestLog)> {
        self.requests
            .iter()
            .filter(|(_, log)| !log.is_finished())
            .map(|(id, log)| (*id, log))
    }
}

/// Counters for measuring what the journal costs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JournalStats {
    /// Records in the log, buffered ones included.
    pub records: u64,
    /// Length of the log once the buffer is written.
    pub len_bytes: u64,
    /// Records appended but not yet written.
    pub pending_records: u64,
    /// Bytes appended but not yet written.
    pub pending_bytes: u64,
    /// Records accepted by `append`/`append_batch` since open (exact repeats excluded).
    pub appended_records: u64,
    /// Their encoded bytes.
    pub appended_bytes: u64,
    /// Successful `write` calls.
    pub writes: u64,
    /// Time spent in `write` calls.
    pub write_time: Duration,
    /// Successful `fdatasync` calls.
    pub syncs: u64,
    /// Time spent in `fdatasync` calls.
    pub sync_time: Duration,
    /// Writes (or the syncs right after them) that failed and were rolled back.
    pub failed_writes: u64,
    /// Successful compactions since open.
    pub compactions: u64,
    /// Requests in memory.
    pub requests: usize,
    /// Requests without `End`.
    pub unfinished_requests: usize,
}

/// What a compaction did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompactStats {
    /// Log length before (buffered bytes included).
    pub bytes_before: u64,
    /// Log length after.
    pub bytes_after: u64,
    /// Records in the new log.
    pub records_after: u64,
    /// Unfinished requests carried over.
    pub kept_requests: usize,
    /// Finished requests dropped.
    pub dropped_requests: usize,
    /// Wall time, fsyncs included.
    pub duration: Duration,
}

/// A write-ahead token log in a state directory. One `Journal` per directory: a second
/// `open` of the same directory in this process fails with `AlreadyOpen`; across
/// processes the caller must keep it single (two writers would interleave garbage).
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    options: JournalOptions,
    state: State,
    /// Bytes the OS has: the file's length, and where the next write goes.
    written_len: u64,
    /// Encoded records not yet written.
    pending: Vec<u8>,
    pending_records: u64,
    records: u64,
    last_write: Instant,
    last_sync: Instant,
    /// Bytes were written since the last successful sync.
    unsynced: bool,
    poisoned: Option<String>,
    /// Set by `close` and `abandon`: drop must not write.
    done: bool,
    undo: Vec<Undo>,
    stats: JournalStats,
    _lock: DirLock,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir` and recovers it: reads every good
    /// record, truncates a torn or damaged tail to the last good record, and rebuilds
    /// every request. A damaged file header or a checksum-valid record that breaks the
    /// sequence rules is an error and leaves the file as it was.
    pub fn open(dir: &Path, options: JournalOptions) -> Result<(Journal, Recovered), JournalError> {
        llmos_kernel::faults::declare(APPEND_FAULT_POINT, "an I/O error writing a journal record");
        llmos_kernel::faults::declare(
            COMPACT_FAULT_POINT,
            "an I/O error after compaction wrote the new log, before it replaces the old one",
        );
        let io = |path: &Path, op| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, op, source }
        };
        fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        let lock = DirLock::acquire(dir)?;
        let durable = options.sync != SyncPolicy::Never;

        let tmp = dir.join(COMPACT_TMP_NAME);
        match fs::remove_file(&tmp) {
            Ok(()) => tracing::warn!(
                target: TARGET,
                path = %tmp.display(),
                "removed the output of an unfinished compaction; the log it would have replaced is intact"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&tmp, "remove")(e)),
        }

        let path = dir.join(LOG_FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path, "open"))?;
        let mut state = State::default();
        let end = scan(&file, &path, |offset, record| {
            state
                .apply(&record)
                .map(drop)
                .map_err(|violation| JournalError::Corrupt {
                    path: path.clone(),
                    offset,
                    violation,
                })
        })?;

        let mut written_len = end.valid_len;
        if end.valid_len == 0 {
            // New, or torn while its header was being written: start it over.
            file.set_len(0).map_err(io(&path, "truncate"))?;
            file.seek(SeekFrom::Start(0)).map_err(io(&path, "seek"))?;
            file.write_all(&file_header())
                .map_err(io(&path, "write header"))?;
            written_len = file_header().len() as u64;
            if durable {
                file.sync_all().map_err(io(&path, "fsync"))?;
                sync_dir(dir)?;
            }
        } else if end.valid_len < end.file_len {
            tracing::warn!(
                target: TARGET,
                path = %path.display(),
                offset = end.valid_len,
                bytes = end.file_len - end.valid_len,
                damage = %end.damage.as_ref().map(|d| d.kind.to_string()).unwrap_or_default(),
                "truncating the journal's damaged tail to the last good record"
            );
            file.set_len(end.valid_len).map_err(io(&path, "truncate"))?;
            if durable {
                file.sync_data().map_err(io(&path, "fdatasync"))?;
            }
        }
        file.seek(SeekFrom::Start(written_len))
            .map_err(io(&path, "seek"))?;

        let recovered = Recovered {
            requests: state.requests.clone(),
            truncated_bytes: end.file_len - end.valid_len,
            records: end.records,
            damage: end.damage,
        };
        let now = Instant::now();
        let journal = Journal {
            dir: dir.to_path_buf(),
            path,
            file,
            options,
            state,
            written_len,
            pending: Vec::new(),
            pending_records: 0,
            records: end.records,
            last_write: now,
            last_sync: now,
            unsynced: false,
            poisoned: None,
            done: false,
            undo: Vec::new(),
            stats: JournalStats::default(),
            _lock: lock,
        };
        Ok((journal, recovered))
    }

    /// Appends one record. See [`Journal::append_batch`].
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        self.append_batch(std::slice::from_ref(record))
    }

    /// Appends records as one unit (group commit: one `write` for the tokens of one
    /// engine step). Every record is checked against the sequence rules first, in order,
    /// each seeing the ones before it; exact repeats of journaled records are accepted
    /// and skipped. All or nothing: on any error nothing of this call is written or
    /// applied, and a failed write is truncated away. When the flush policy writes, `Ok`
    /// means the bytes are with the OS (and synced, if the sync policy says so).
    pub fn append_batch(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.check_poisoned()?;
        let mark = self.pending.len();
        let mut undo = std::mem::take(&mut self.undo);
        let mut added = 0u64;
        let mut result = Ok(());
        for record in records {
            match self.state.apply(record) {
                Ok(None) => continue,
                Ok(Some(u)) => undo.push(u),
                Err(violation) => {
                    result = Err(JournalError::Rejected { violation });
                    break;
                }
            }
            if let Err(e) = record.encode_into(&mut self.pending) {
                result = Err(e);
                break;
            }
            added += 1;
        }
        // Measured before a write drains the buffer (earlier buffered records included).
        let bytes = (self.pending.len() - mark) as u64;
        if result.is_ok() && added > 0 && self.flush_due() {
            result = self.write_pending();
        }
        if result.is_err() {
            self.pending.truncate(mark);
            while let Some(u) = undo.pop() {
                self.state.undo(u);
            }
        } else {
            if !self.pending.is_empty() {
                self.pending_records += added;
            }
            self.records += added;
            self.stats.appended_records += added;
            self.stats.appended_bytes += bytes;
            undo.clear();
        }
        self.undo = undo;
        result
    }

    /// Writes buffered records, then syncs if the sync policy says one is due.
    pub fn flush(&mut self) -> Result<(), JournalError> {
        self.write_pending()?;
        if self.unsynced && self.sync_due() {
            self.sync_now()?;
        }
        Ok(())
    }

    /// Writes buffered records and forces everything to stable storage, whatever the
    /// policies. If `fdatasync` fails, records written before are of unknown durability
    /// (Linux may have dropped the dirty pages); reopen to see what the disk holds.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.write_pending()?;
        if self.unsynced {
            self.sync_now()?;
        }
        Ok(())
    }

    /// Does what the interval policies say is due now; for the owner's timer (see
    /// [`Journal::next_deadline`]). Cheap when nothing is due.
    pub fn poll(&mut self) -> Result<(), JournalError> {
        if !self.pending.is_empty() && self.flush_due() {
            self.write_pending()?;
        }
        if self.unsynced && self.sync_due() {
            self.sync_now()?;
        }
        Ok(())
    }

    /// When `poll` next has work: buffered bytes under `FlushPolicy::IntervalMs` or
    /// unsynced ones under `SyncPolicy::IntervalMs`. `None` when nothing will fall due
    /// by itself (`Off` leaves the buffer to `flush`).
    pub fn next_deadline(&self) -> Option<Instant> {
        let flush = match self.options.flush {
            FlushPolicy::IntervalMs(ms) if !self.pending.is_empty() => {
                Some(self.last_write + Duration::from_millis(ms))
            }
            _ => None,
        };
        let sync = match self.options.sync {
            SyncPolicy::IntervalMs(ms) if self.unsynced => {
                Some(self.last_sync + Duration::from_millis(ms))
            }
            _ => None,
        };
        match (flush, sync) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Rewrites the log with only the unfinished requests (each as `Begin`, its tokens
    /// — the last one carrying the sampler state — and `Delivered`), dropping finished
    /// ones from disk and memory. Buffered records are included. The new log is built in
    /// [`COMPACT_TMP_NAME`], fsynced, renamed over the log, and the directory fsynced:
    /// a crash at any point leaves the old log or the new one, both complete. On error
    /// the journal keeps working on whichever log is in place. Also repairs a poisoned
    /// journal, since it rewrites the log from memory.
    pub fn compact(&mut self) -> Result<CompactStats, JournalError> {
        let started = Instant::now();
        let bytes_before = self.len_bytes();
        let tmp = self.dir.join(COMPACT_TMP_NAME);
        let built = self.write_compacted(&tmp).and_then(|built| {
            injected_compact_fault()?;
            fs::rename(&tmp, &self.path).map_err(|source| JournalError::Io {
                path: tmp.clone(),
                op: "rename over the log",
                source,
            })?;
            Ok(built)
        });
        let (file, len, records, kept) = match built {
            Ok(built) => built,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // The new log is in place: switch to it before anything else can fail.
        let before = self.state.requests.len();
        self.state.requests.retain(|_, log| !log.is_finished());
        self.file = file;
        self.written_len = len;
        self.pending.clear();
        self.pending_records = 0;
        self.records = records;
        self.poisoned = None;
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.stats.compactions += 1;
        sync_dir(&self.dir)?;
        let stats = CompactStats {
            bytes_before,
            bytes_after: len,
            records_after: records,
            kept_requests: kept,
            dropped_requests: before - kept,
            duration: started.elapsed(),
        };
        tracing::info!(target: TARGET, ?stats, "journal compacted");
        Ok(stats)
    }

    fn write_compacted(&self, tmp: &Path) -> Result<(File, u64, u64, usize), JournalError> {
        let io = |op| {
            let path = tmp.to_path_buf();
            move |source| JournalError::Io { path, op, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(io("create"))?;
        let mut out = BufWriter::with_capacity(256 << 10, &file);
        let header = file_header();
        out.write_all(&header).map_err(io("write"))?;
        let mut len = header.len() as u64;
        let (mut records, mut kept) = (0, 0);
        let mut buf = Vec::new();
        for (&id, log) in &self.state.requests {
            if log.is_finished() {
                continue;
            }
            kept += 1;
            for record in log.to_records(id) {
                buf.clear();
                record.encode_into(&mut buf)?;
                out.write_all(&buf).map_err(io("write"))?;
                len += buf.len() as u64;
                records += 1;
            }
        }
        out.flush().map_err(io("write"))?;
        drop(out);
        file.sync_all().map_err(io("fsync"))?;
        file.seek(SeekFrom::Start(len)).map_err(io("seek"))?;
        Ok((file, len, records, kept))
    }

    /// Writes what is buffered and syncs as the sync policy says (any sync, if it is not
    /// `Never`), reporting errors that drop could only log.
    pub fn close(mut self) -> Result<(), JournalError> {
        self.done = true;
        self.write_pending()?;
        if self.unsynced && self.options.sync != SyncPolicy::Never {
            self.sync_now()?;
        }
        Ok(())
    }

    /// Lets go of the journal the way a killed process would: buffered records are
    /// discarded, not written. For crash tests; returns the bytes discarded.
    pub fn abandon(mut self) -> u64 {
        self.done = true;
        self.pending.len() as u64
    }

    /// Every request in memory, finished ones included until compaction.
    pub fn requests(&self) -> &BTreeMap<u64, RequestLog> {
        &self.state.requests
    }

    /// One request.
    pub fn request(&self, id: u64) -> Option<&RequestLog> {
        self.state.requests.get(&id)
    }

    /// Requests without `End`.
    pub fn unfinished(&self) -> impl Iterator<Item = (u64, &RequestLog)> {
        self.state
            .requests
            .iter()
            .filter(|(_, log)| !log.is_finished())
            .map(|(id, log)| (*id, log))
    }

    /// Length of the log once buffered records are written.
    pub fn len_bytes(&self) -> u64 {
        self.written_len + self.pending.len() as u64
    }

    /// Bytes handed to the OS: the file's length.
    pub fn written_bytes(&self) -> u64 {
        self.written_len
    }

    /// Bytes appended but not yet written.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.len() as u64
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The policies it runs under.
    pub fn options(&self) -> JournalOptions {
        self.options
    }

    /// Counters.
    pub fn stats(&self) -> JournalStats {
        JournalStats {
            records: self.records,
            len_bytes: self.len_bytes(),
            pending_records: self.pending_records,
            pending_bytes: self.pending.len() as u64,
            requests: self.state.requests.len(),
            unfinished_requests: self.unfinished().count(),
            ..self.stats.clone()
        }
    }

    fn flush_due(&self) -> bool {
        match self.options.flush {
            FlushPolicy::EveryRecord => true,
            FlushPolicy::IntervalMs(ms) => self.last_write.elapsed() >= Duration::from_millis(ms),
            FlushPolicy::Off => false,
        }
    }

    fn sync_due(&self) -> bool {
        match self.options.sync {
            SyncPolicy::Never => false,
            SyncPolicy::EveryAppend => true,
            SyncPolicy::IntervalMs(ms) => self.last_sync.elapsed() >= Duration::from_millis(ms),
        }
    }

    fn check_poisoned(&self) -> Result<(), JournalError> {
        match &self.poisoned {
            None => Ok(()),
            Some(reason) => Err(JournalError::Poisoned {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
        let path = self.path.clone();
        move |source| JournalError::Io { path, op, source }
    }

    /// Writes the whole buffer with one `write`, then syncs if due. On failure the
    /// file is cut back to `written_len` and the buffer kept: the caller decides which of
    /// it to drop.
    fn write_pending(&mut self) -> Result<(), JournalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.check_poisoned()?;
        match self.write_and_maybe_sync() {
            Ok(()) => {
                self.written_len += self.pending.len() as u64;
                self.pending.clear();
                self.pending_records = 0;
                self.last_write = Instant::now();
                Ok(())
            }
            Err(e) => {
                self.stats.failed_writes += 1;
                self.cut_back();
                Err(e)
            }
        }
    }

    fn write_and_maybe_sync(&mut self) -> Result<(), JournalError> {
        if let Err(fault) = injected_append_fault() {
            // Leave a torn write behind, as a real failure half-way through might, so the
            // injected fault exercises the clean-up too.
            let half = self.pending.len() / 2;
            let _ = self.file.write_all(&self.pending[..half]);
            return Err(fault);
        }
        let started = Instant::now();
        self.file
            .write_all(&self.pending)
            .map_err(self.io("write"))?;
        self.stats.writes += 1;
        self.stats.write_time += started.elapsed();
        self.unsynced = true;
        if self.sync_due() {
            self.sync_now()?;
        }
        Ok(())
    }

    fn sync_now(&mut self) -> Result<(), JournalError> {
        let started = Instant::now();
        self.file.sync_data().map_err(self.io("fdatasync"))?;
        self.stats.syncs += 1;
        self.stats.sync_time += started.elapsed();
        self.last_sync = Instant::now();
        self.unsynced = false;
        Ok(())
    }

    /// Removes whatever a failed write left past the last good byte, so the next write
    /// lands right after the last good record. If that fails too the file may end in
    /// garbage, and writing after it would hide good records behind it at recovery.
    fn cut_back(&mut self) {
        let len = self.written_len;
        let result = self
            .file
            .set_len(len)
            .and_then(|()| self.file.seek(SeekFrom::Start(len)).map(drop));
        if let Err(e) = result {
            let reason = format!("could not truncate to {len} bytes after a failed write: {e}");
            tracing::error!(target: TARGET, path = %self.path.display(), %reason);
            self.poisoned = Some(reason);
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut result = self.write_pending();
        if result.is_ok() && self.unsynced && self.options.sync != SyncPolicy::Never {
            result = self.sync_now();
        }
        if let Err(e) = result {
            tracing::error!(
                target: TARGET,
                error = %e,
                lost_bytes = self.pending.len(),
                "journal dropped with records it could not write"
            );
        }
    }
}

fn injected_append_fault() -> Result<(), JournalError> {
    llmos_kernel::fault_point!(APPEND_FAULT_POINT, |detail: Option<String>| {
        Err(JournalError::Injected(format!(
            "{APPEND_FAULT_POINT}: {}",
            detail.unwrap_or_else(|| "I/O error writing a record".into())
        )))
    });
    Ok(())
}

fn injected_compact_fault() -> Result<(), JournalError> {
    llmos_kernel::fault_point!(COMPACT_FAULT_POINT, |detail: Option<String>| {
        Err(JournalError::Injected(format!(
            "{COMPACT_FAULT_POINT}: {}",
            detail.unwrap_or_else(|| "I/O error before the rename".into())
        )))
    });
    Ok(())
}

/// Makes a rename or creation in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    #[cfg(unix)]
    {
        let io = |op| {
            let path = dir.to_path_buf();
            move |source| JournalError::Io { path, op, source }
        };
        File::open(dir)
            .map_err(io("open directory"))?
            .sync_all()
            .map_err(io("fsync directory"))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn open_dirs() -> &'static Mutex<HashSet<PathBuf>> {
    static OPEN: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
}

/// Marks a directory as open in this process. A restarted journal actor must not open
/// the log while its previous instance can still write (on drop, for one).
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, JournalError> {
        let canonical = dir.canonicalize().map_err(|source| JournalError::Io {
            path: dir.to_path_buf(),
            op: "canonicalize",
            source,
        })?;
        let mut open = open_dirs().lock().unwrap_or_else(|e| e.into_inner());
        if !open.insert(canonical.clone()) {
            return Err(JournalError::AlreadyOpen {
                path: dir.to_path_buf(),
            });
        }
        Ok(DirLock(canonical))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        open_dirs()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}
