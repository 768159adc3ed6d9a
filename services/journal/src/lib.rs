//! Write-ahead token journal: the durable state of every inference request (prompt,
//! sampling parameters, generated tokens, sampler RNG state, delivery cursor), so a
//! request whose task, engine or process died resumes exactly where it stopped.
//!
//! # Use
//!
//! ```no_run
//! # use llmos_journal::*;
//! # fn main() -> Result<(), JournalError> {
//! let (mut journal, recovered) = Journal::open("state".as_ref(), JournalOptions::default())?;
//! for (id, log) in recovered.unfinished() {
//!     // resume `id` from log.tokens / log.last_sampler_state
//! #   let _ = (id, log);
//! }
//! journal.append(&Record::Begin { request: 7, prompt_tokens: vec![1, 2], params: vec![] })?;
//! journal.append(&Record::Token { request: 7, index: 0, token: 42, sampler_state: vec![] })?;
//! // only now hand token 42 to the client
//! journal.append(&Record::End { request: 7, reason: 0 })?;
//! # Ok(()) }
//! ```
//!
//! # On-disk format (version 1)
//!
//! One file, `<dir>/journal.log`. All integers little-endian.
//!
//! File header, 16 bytes:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `LLMOSJNL` |
//! | 8..12 | version `u32` = 1 |
//! | 12..16 | CRC-32 (IEEE, as `crc32fast`) of bytes 0..12 |
//!
//! Then records, back to back, each framed as:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | `len: u32`, payload length (at most 64 MiB) |
//! | 4..8 | `crc: u32`, CRC-32 over bytes 0..4, byte 8 and the payload |
//! | 8 | `kind: u8` |
//! | 9..9+len | payload |
//!
//! Payloads (`vec<T>` is a `u32` count followed by the elements):
//!
//! | kind | record | payload |
//! | --- | --- | --- |
//! | 1 | `Begin` | `request: u64`, `prompt_tokens: vec<u32>`, `params: vec<u8>` |
//! | 2 | `Token` | `request: u64`, `index: u32`, `token: u32`, `sampler_state: vec<u8>` |
//! | 3 | `End` | `request: u64`, `reason: u8` |
//! | 4 | `Delivered` | `request: u64`, `cursor: u32` |
//!
//! A payload must be consumed exactly. A token record costs 29 bytes plus its sampler
//! state.
//!
//! # Recovery
//!
//! [`Journal::open`] reads records until the end of the file or the first frame that is
//! short, has a length over the limit, fails its checksum, has an unknown kind or a
//! payload that does not parse; it truncates the file there (`set_len`), keeping every
//! record before. A file shorter than the header that is a prefix of it (a crash while
//! creating the log) is started over. A damaged header is an error and the file is left
//! alone: that is not a torn tail, and the file may not be a journal at all.
//!
//! # Sequence rules
//!
//! Checked on append (the call is refused, nothing written: [`JournalError::Rejected`])
//! and again on replay, so a log this crate wrote always replays:
//! - `Token`, `End`, `Delivered` need an earlier `Begin` of that request.
//! - Tokens are contiguous: `index == tokens.len()` appends. An exact repeat (same index,
//!   same token, or a repeated identical `Begin` or `End`) is accepted and ignored. A gap
//!   (`index > tokens.len()`), another token at a journaled index, a new token after
//!   `End`, a different second `Begin` or `End`, or a `Delivered` cursor beyond the
//!   journaled tokens is a violation. `Delivered` cursors only move forward (a lower one
//!   is ignored).
//!
//! On replay a violation is [`JournalError::Corrupt`], naming the offset, the request
//! and the token index, and the file is left untouched — not truncated: the record has a
//! valid checksum, so a crash did not produce it, and the records after it hold
//! acknowledged tokens of other requests that truncating would lose.
//!
//! # Fault points
//!
//! `journal.append` (before each write of record bytes; an injected fault first leaves
//! half the bytes behind, like a torn write) and `journal.compact` (after the compacted
//! log is synced, before the rename).

mod error;
mod journal;
mod record;
mod scan;
mod state;

pub use error::JournalError;
pub use journal::{
    CompactStats, FlushPolicy, Journal, JournalOptions, JournalStats, Recovered, SyncPolicy,
    APPEND_FAULT_POINT, COMPACT_FAULT_POINT, COMPACT_TMP_NAME, LOG_FILE_NAME,
};
pub use record::{
    file_header, Damage, DamageKind, Record, FILE_HEADER_LEN, FRAME_HEADER_LEN, MAGIC,
    MAX_PAYLOAD_LEN, VERSION,
};
pub use scan::{read_log, LogContents};
pub use state::{RequestLog, Violation};
