//! Reading a log file front to back: checks the file header, then yields each good
//! record until the end or the first damage. Shared by recovery and [`read_log`].

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;

use crate::error::JournalError;
use crate::record::{
    check_file_header, file_header, Damage, DamageKind, FrameHeader, Record, FILE_HEADER_LEN,
    FRAME_HEADER_LEN, VERSION,
};

/// Where a scan stopped.
pub(crate) struct ScanEnd {
    /// Bytes up to the end of the last good record (0 if the header itself is missing).
    pub(crate) valid_len: u64,
    /// Length of the file when scanned.
    pub(crate) file_len: u64,
    /// Good records read.
    pub(crate) records: u64,
    /// Why the scan stopped before `file_len`, if it did.
    pub(crate) damage: Option<Damage>,
}

/// Scans `file`, calling `each(offset, record)` for every good record in order. Stops
/// early with `each`'s error. A header that is not a prefix of a valid one is an error;
/// a file shorter than the header that *is* such a prefix (or empty) scans as empty.
pub(crate) fn scan(
    file: &File,
    path: &Path,
    mut each: impl FnMut(u64, Record) -> Result<(), JournalError>,
) -> Result<ScanEnd, JournalError> {
    let io = |op: &'static str| {
        move |source| JournalError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let file_len = file.metadata().map_err(io("stat"))?.len();
    let mut reader = file;
    reader.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
    let mut reader = BufReader::with_capacity(64 << 10, reader);

    if file_len < FILE_HEADER_LEN as u64 {
        let mut torn = vec![0; file_len as usize];
        reader.read_exact(&mut torn).map_err(io("read"))?;
        if !file_header().starts_with(&torn) {
            return Err(JournalError::BadHeader {
                path: path.to_path_buf(),
                reason: format!("{file_len}-byte file that is not the start of a journal header"),
            });
        }
        return Ok(ScanEnd {
            valid_len: 0,
            file_len,
            records: 0,
            damage: (file_len > 0).then_some(Damage {
                offset: 0,
                kind: DamageKind::TornFileHeader { have: file_len },
            }),
        });
    }
    let mut header = [0; FILE_HEADER_LEN];
    reader.read_exact(&mut header).map_err(io("read"))?;
    match check_file_header(&header) {
        Ok(Ok(())) => {}
        Ok(Err(found)) => {
            return Err(JournalError::UnsupportedVersion {
                path: path.to_path_buf(),
                found,
                supported: VERSION,
            })
        }
        Err(reason) => {
            return Err(JournalError::BadHeader {
                path: path.to_path_buf(),
                reason,
            })
        }
    }

    let mut offset = FILE_HEADER_LEN as u64;
    let mut records = 0;
    let mut payload = Vec::new();
    let damage = loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            break None;
        }
        let damaged = |kind| Some(Damage { offset, kind });
        if remaining < FRAME_HEADER_LEN as u64 {
            break damaged(DamageKind::ShortHeader { have: remaining });
        }
        let mut raw = [0; FRAME_HEADER_LEN];
        reader.read_exact(&mut raw).map_err(io("read"))?;
        let frame = match FrameHeader::parse(&raw) {
            Ok(frame) => frame,
            Err(kind) => break damaged(kind),
        };
        let have = remaining - FRAME_HEADER_LEN as u64;
        if (frame.len as u64) > have {
            break damaged(DamageKind::ShortRecord {
                need: frame.len as u64,
                have,
            });
        }
        payload.resize(frame.len, 0);
        reader.read_exact(&mut payload).map_err(io("read"))?;
        match frame.decode_payload(&payload) {
            Ok(record) => each(offset, record)?,
            Err(kind) => break damaged(kind),
        }
        records += 1;
        offset += (FRAME_HEADER_LEN + frame.len) as u64;
    };
    Ok(ScanEnd {
        valid_len: offset,
        file_len,
        records,
        damage,
    })
}

/// The contents of a log file, read without changing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogContents {
    /// Every good record with its file offset, in order.
    pub records: Vec<(u64, Record)>,
    /// Bytes up to the end of the last good record; recovery truncates the file to this
    /// (or rewrites the header when it is 0).
    pub valid_len: u64,
    /// The file's length.
    pub file_len: u64,
    /// What follows the last good record, when something does.
    pub damage: Option<Damage>,
}

/// Reads a log file without changing it and without checking the sequence rules: the
/// frames as they are, for inspection tools and tests.
pub fn read_log(path: &Path) -> Result<LogContents, JournalError> {
    let file = File::open(path).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        op: "open",
        source,
    })?;
    let mut records = Vec::new();
    let end = scan(&file, path, |offset, record| {
        records.push((offset, record));
        Ok(())
    })?;
    Ok(LogContents {
        records,
        valid_len: end.valid_len,
        file_len: end.file_len,
        damage: end.damage,
    })
}
