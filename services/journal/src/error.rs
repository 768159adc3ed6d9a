//! The journal's error type: every variant says which file, where, and what was wrong.

use std::path::PathBuf;

use crate::state::Violation;

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An operating-system call failed. After a failed write the file was truncated back
    /// to its last good length and the in-memory state was left as before the call.
    #[error("journal I/O error: {op} {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`write`, `fdatasync`, `rename`, …).
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A fault injected at the `journal.append` or `journal.compact` point. Handled
    /// exactly like an I/O error (an injected append fault even leaves a torn write behind
    /// to clean up first).
    #[error("injected fault: {0}")]
    Injected(String),
    /// The file does not start with a valid journal header. Nothing was changed: a
    /// damaged header is not a torn tail, and the file may not be a journal at all.
    #[error("{}: not a readable journal file: {reason}", path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file is a journal of a format version this build does not read.
    #[error("{}: journal format version {found}, this build reads version {supported}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the header.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// A record with a valid checksum breaks the sequence rules. Recovery stops and
    /// changes nothing: the records after it carry acknowledged tokens of other requests,
    /// so truncating there would lose them. This is not what a crash produces; it takes a
    /// bug or a file edited by hand.
    #[error("{}: record at offset {offset} breaks the sequence rules: {violation}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// File offset of the offending record.
        offset: u64,
        /// The rule it breaks (names the request and, for tokens, the index).
        violation: Violation,
    },
    /// An append was refused because a record breaks the sequence rules; nothing of the
    /// call was written or applied.
    #[error("append refused: {violation}")]
    Rejected {
        /// The rule broken (names the request and, for tokens, the index).
        violation: Violation,
    },
    /// A record's payload exceeds the format's limit; nothing of the call was written.
    #[error(
        "record for request {request} is {bytes} bytes, more than the {max} a record may hold"
    )]
    TooLarge {
        /// The request.
        request: u64,
        /// Payload bytes the record needs.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Another `Journal` in this process has the directory open.
    #[error("{} is already open by another Journal in this process", path.display())]
    AlreadyOpen {
        /// The directory.
        path: PathBuf,
    },
    /// A failed write could not be cleaned up (truncating the partial bytes failed too),
    /// so the file may end in garbage. Every write is refused from then on; `compact`
    /// (which rewrites the log from memory) or reopening repairs it.
    #[error("{}: journal refuses writes: {reason}", path.display())]
    Poisoned {
        /// The file.
        path: PathBuf,
        /// The failure that could not be cleaned up.
        reason: String,
    },
}

impl JournalError {
    /// The sequence rule behind a `Corrupt` or `Rejected` error.
    pub fn violation(&self) -> Option<&crate::state::Violation> {
        match self {
            JournalError::Corrupt { violation, .. } | JournalError::Rejected { violation } => {
                Some(violation)
            }
            _ => None,
        }
    }
}
