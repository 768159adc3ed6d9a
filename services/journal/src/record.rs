//! Journal records and their binary encoding: the file header, the checksummed frame
//! around each record, and the payload of each record kind.
//!
//! Decoding never panics and never trusts a length before checking it against what is
//! actually there, so any byte string — a torn tail, a flipped bit, a foreign file —
//! decodes to a record or to a [`DamageKind`] saying what was wrong.

use serde::Serialize;

use crate::error::JournalError;

/// The first eight bytes of every journal file.
pub const MAGIC: [u8; 8] = *b"LLMOSJNL";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes in the file header: magic, version, CRC-32 of both.
pub const FILE_HEADER_LEN: usize = 16;
/// Bytes in a frame header: payload length, CRC-32, kind.
pub const FRAME_HEADER_LEN: usize = 9;
/// The largest payload a frame may carry. A larger length field can only be damage, and
/// the limit keeps a flipped length bit from making recovery allocate gigabytes.
pub const MAX_PAYLOAD_LEN: usize = 64 << 20;

const KIND_BEGIN: u8 = 1;
const KIND_TOKEN: u8 = 2;
const KIND_END: u8 = 3;
const KIND_DELIVERED: u8 = 4;

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Record {
    /// A request was admitted.
    Begin {
        /// The request's id, unique within the journal.
        request: u64,
        /// The prompt, tokenized.
        prompt_tokens: Vec<u32>,
        /// Opaque: the caller's serialized sampling parameters and model id.
        params: Vec<u8>,
    },
    /// A token was sampled; once appended it may be handed to the client.
    Token {
        /// The request it belongs to.
        request: u64,
        /// 0-based index of the generated token.
        index: u32,
        /// The token id.
        token: u32,
        /// Opaque: the sampler's RNG state after sampling this token.
        sampler_state: Vec<u8>,
    },
    /// A request finished.
    End {
        /// The request that finished.
        request: u64,
        /// Opaque finish code.
        reason: u8,
    },
    /// The client acknowledged tokens `0..cursor`.
    Delivered {
        /// The request.
        request: u64,
        /// Number of tokens delivered so far.
        cursor: u32,
    },
}

impl Record {
    /// The request this record belongs to.
    pub fn request(&self) -> u64 {
        match self {
            Record::Begin { request, .. }
            | Record::Token { request, .. }
            | Record::End { request, .. }
            | Record::Delivered { request, .. } => *request,
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Record::Begin { .. } => KIND_BEGIN,
            Record::Token { .. } => KIND_TOKEN,
            Record::End { .. } => KIND_END,
            Record::Delivered { .. } => KIND_DELIVERED,
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Record::Begin {
                prompt_tokens,
                params,
                ..
            } => 8 + 4 + 4 * prompt_tokens.len() + 4 + params.len(),
            Record::Token { sampler_state, .. } => 8 + 4 + 4 + 4 + sampler_state.len(),
            Record::End { .. } => 8 + 1,
            Record::Delivered { .. } => 8 + 4,
        }
    }

    /// Bytes this record occupies on disk, frame included.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload_len()
    }

    /// Appends the framed record to `out`. Fails, leaving `out` unchanged, when the
    /// payload exceeds [`MAX_PAYLOAD_LEN`]: recovery would read such a frame as damage.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), JournalError> {
        let payload_len = self.payload_len();
        if payload_len > MAX_PAYLOAD_LEN {
            return Err(JournalError::TooLarge {
                request: self.request(),
                bytes: payload_len,
                max: MAX_PAYLOAD_LEN,
            });
        }
        let start = out.len();
        out.reserve(FRAME_HEADER_LEN + payload_len);
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]); // CRC, filled in below
        out.push(self.kind());
        match self {
            Record::Begin {
                request,
                prompt_tokens,
                params,
            } => {
                out.extend_from_slice(&request.to_le_bytes());
                out.extend_from_slice(&(prompt_tokens.len() as u32).to_le_bytes());
                for t in prompt_tokens {
                    out.extend_from_slice(&t.to_le_bytes());
                }
                out.extend_from_slice(&(params.len() as u32).to_le_bytes());
                out.extend_from_slice(params);
            }
            Record::Token {
                request,
                index,
                token,
                sampler_state,
            } => {
                out.extend_from_slice(&request.to_le_bytes());
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&token.to_le_bytes());
                out.extend_from_slice(&(sampler_state.len() as u32).to_le_bytes());
                out.extend_from_slice(sampler_state);
            }
            Record::End { request, reason } => {
                out.extend_from_slice(&request.to_le_bytes());
                out.push(*reason);
            }
            Record::Delivered { request, cursor } => {
                out.extend_from_slice(&request.to_le_bytes());
                out.extend_from_slice(&cursor.to_le_bytes());
            }
        }
        debug_assert_eq!(out.len() - start, FRAME_HEADER_LEN + payload_len);
        let frame = &out[start..];
        let crc = frame_crc(&frame[0..4], frame[8], &frame[FRAME_HEADER_LEN..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// The framed record as bytes.
    pub fn encode(&self) -> Result<Vec<u8>, JournalError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Decodes the frame at the start of `bytes`: the record and the bytes it used.
    pub fn decode(bytes: &[u8]) -> Result<(Record, usize), DamageKind> {
        let header: &[u8; FRAME_HEADER_LEN] = bytes
            .get(..FRAME_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(DamageKind::ShortHeader {
                have: bytes.len() as u64,
            })?;
        let frame = FrameHeader::parse(header)?;
        let have = (bytes.len() - FRAME_HEADER_LEN) as u64;
        let payload = bytes
            .get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + frame.len)
            .ok_or(DamageKind::ShortRecord {
                need: frame.len as u64,
                have,
            })?;
        let record = frame.decode_payload(payload)?;
        Ok((record, FRAME_HEADER_LEN + frame.len))
    }
}

fn frame_crc(len: &[u8], kind: u8, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(&[kind]);
    hasher.update(payload);
    hasher.finalize()
}

/// A parsed frame header whose length is within bounds; the payload is still unchecked.
pub(crate) struct FrameHeader {
    pub(crate) len: usize,
    crc: u32,
    kind: u8,
}

impl FrameHeader {
    pub(crate) fn parse(header: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, DamageKind> {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_PAYLOAD_LEN {
            return Err(DamageKind::BadLength { len: len as u64 });
        }
        Ok(FrameHeader {
            len,
            crc,
            kind: header[8],
        })
    }

    /// Checks the CRC, then decodes. The CRC comes first so that a damaged kind byte is
    /// reported as damage, not as a record of another kind.
    pub(crate) fn decode_payload(&self, payload: &[u8]) -> Result<Record, DamageKind> {
        let computed = frame_crc(&(self.len as u32).to_le_bytes(), self.kind, payload);
        if computed != self.crc {
            return Err(DamageKind::BadChecksum {
                stored: self.crc,
                computed,
            });
        }
        let mut r = Reader { bytes: payload };
        let record = match self.kind {
            KIND_BEGIN => {
                let request = r.u64()?;
                let n = r.u32()? as usize;
                let raw = r.take(
                    n.checked_mul(4)
                        .ok_or(DamageKind::Malformed("prompt token count overflows"))?,
                )?;
                let prompt_tokens = raw
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let params = r.bytes()?;
                Record::Begin {
                    request,
                    prompt_tokens,
                    params,
                }
            }
            KIND_TOKEN => Record::Token {
                request: r.u64()?,
                index: r.u32()?,
                token: r.u32()?,
                sampler_state: r.bytes()?,
            },
            KIND_END => Record::End {
                request: r.u64()?,
                reason: r.take(1)?[0],
            },
            KIND_DELIVERED => Record::Delivered {
                request: r.u64()?,
                cursor: r.u32()?,
            },
            other => return Err(DamageKind::UnknownKind(other)),
        };
        if !r.bytes.is_empty() {
            return Err(DamageKind::Malformed("trailing bytes after the record"));
        }
        Ok(record)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DamageKind> {
        if n > self.bytes.len() {
            return Err(DamageKind::Malformed(
                "a field runs past the end of the record",
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, DamageKind> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DamageKind> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DamageKind> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
}

/// The file header this build writes.
pub fn file_header() -> [u8; FILE_HEADER_LEN] {
    let mut h = [0; FILE_HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What is wrong with a file header: `Err(reason)` for damage or a foreign file,
/// `Ok(Err(version))` for a well-formed header of another version.
pub(crate) fn check_file_header(h: &[u8; FILE_HEADER_LEN]) -> Result<Result<(), u32>, String> {
    if h[..8] != MAGIC {
        return Err(format!(
            "magic is {:02x?}, expected {:02x?} (\"LLMOSJNL\")",
            &h[..8],
            MAGIC
        ));
    }
    let stored = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let computed = crc32fast::hash(&h[..12]);
    if stored != computed {
        return Err(format!(
            "header checksum is {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    Ok(if version == VERSION {
        Ok(())
    } else {
        Err(version)
    })
}

/// Where recovery stopped reading and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// File offset of the first byte that is not part of a good record.
    pub offset: u64,
    /// What was found there.
    pub kind: DamageKind,
}

/// What made a frame unreadable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum DamageKind {
    /// The file ends inside its 16-byte header (a crash while creating it).
    #[error("the file header is torn ({have} of {FILE_HEADER_LEN} bytes)")]
    TornFileHeader {
        /// Bytes present.
        have: u64,
    },
    /// Fewer bytes than a frame header remain.
    #[error("short frame header ({have} of {FRAME_HEADER_LEN} bytes)")]
    ShortHeader {
        /// Bytes present.
        have: u64,
    },
    /// The length field exceeds [`MAX_PAYLOAD_LEN`].
    #[error("bad length {len} (at most {MAX_PAYLOAD_LEN})")]
    BadLength {
        /// The length read.
        len: u64,
    },
    /// The file ends inside the payload.
    #[error("short record (payload of {need} bytes, {have} present)")]
    ShortRecord {
        /// Payload length from the frame header.
        need: u64,
        /// Bytes present after the frame header.
        have: u64,
    },
    /// The CRC does not match.
    #[error("bad checksum (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// CRC in the frame header.
        stored: u32,
        /// CRC of the bytes present.
        computed: u32,
    },
    /// The checksum matches but the kind byte names no record kind of this version.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// The checksum matches but the payload does not parse.
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_and_reports_its_length() {
        let records = [
            Record::Begin {
                request: u64::MAX,
                prompt_tokens: vec![1, 2, u32::MAX],
                params: b"{\"seed\":7}".to_vec(),
            },
            Record::Token {
                request: 3,
                index: 0,
                token: 42,
                sampler_state: vec![9; 40],
            },
            Record::End {
                request: 3,
                reason: 255,
            },
            Record::Delivered {
                request: 3,
                cursor: 17,
            },
        ];
        for record in records {
            let bytes = record.encode().unwrap();
            assert_eq!(bytes.len(), record.encoded_len());
            assert_eq!(Record::decode(&bytes), Ok((record, bytes.len())));
        }
    }

    #[test]
    fn header_is_checked_field_by_field() {
        let good = file_header();
        assert_eq!(check_file_header(&good), Ok(Ok(())));
        let mut foreign = good;
        foreign[0] = b'X';
        assert!(check_file_header(&foreign).unwrap_err().contains("magic"));
        let mut newer = good;
        newer[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&newer[..12]);
        newer[12..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(check_file_header(&newer), Ok(Err(2)));
        let mut flipped = good;
        flipped[9] ^= 1;
        assert!(check_file_header(&flipped)
            .unwrap_err()
            .contains("checksum"));
    }

    #[test]
    fn unknown_kind_with_a_valid_checksum_is_damage() {
        let mut bytes = Record::End {
            request: 1,
            reason: 0,
        }
        .encode()
        .unwrap();
        bytes[8] = 99;
        let crc = frame_crc(&bytes[..4], 99, &bytes[FRAME_HEADER_LEN..]);
        bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Record::decode(&bytes), Err(DamageKind::UnknownKind(99)));
    }

    #[test]
    fn oversized_records_are_refused_before_anything_is_written() {
        let record = Record::Begin {
            request: 1,
            prompt_tokens: vec![],
            params: vec![0; MAX_PAYLOAD_LEN],
        };
        let mut out = vec![7];
        assert!(matches!(
            record.encode_into(&mut out),
            Err(JournalError::TooLarge { request: 1, .. })
        ));
        assert_eq!(out, vec![7]);
    }
}
