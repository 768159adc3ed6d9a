//! Byte layout of a pool (the same for a file and for anonymous memory): superblock, one
//! metadata record per block, block data; plus the token-hash chain and the K/V checksum
//! that let a reopened pool tell which blocks still hold what they claim.
//!
//! ```text
//! offset 0                superblock (SUPER_BYTES): magic, version, geometry, model tag, K/V type, crc32
//! offset SUPER_BYTES      n_blocks × META_BYTES block records, padded to PAGE
//! offset data_off         n_blocks × bytes_per_block of K/V data
//! ```
//!
//! Inside a block the data is layer-major — `[layer][K|V][position][n_kv_heads·head_dim]`
//! f32 or f16 (the pool's [`KvDtype`]), little-endian — so one layer's keys in one block
//! are a single contiguous run, read in place.
//!
//! A block record (all little-endian):
//!
//! ```text
//!  0..4   state        SEALED, or anything else: the record says nothing
//!  4..8   filled       positions 0..filled of this block are sealed (1..=block_tokens)
//!  8..16  seq_id       owner sequence
//! 16..20  index        this block's index in the owner's block table
//! 20..24  data_crc     crc32 of the sealed positions' K/V, position-major (see crc_positions)
//! 24..32  token_hash   chain hash of the sequence's tokens 0..index·block_tokens+filled
//! 32..60  reserved, zero
//! 60..64  record_crc   crc32 of the block id followed by bytes 0..60
//! ```
//!
//! The data checksum runs position by position (every layer's K row then V row for
//! position 0, then position 1…), not layer by layer, so sealing one more position extends
//! the previous checksum instead of recomputing the block: the commit path pays for the new
//! position's bytes only. The token hash is chained from the sequence's first token, so a
//! block whose hash matches the caller's tokens also vouches for every token before it.

use crate::store::{KvDtype, KvShape};

/// Bytes reserved for the superblock (one page, so the records start page-aligned).
pub(crate) const SUPER_BYTES: usize = 4096;
/// Bytes of one block record.
pub(crate) const META_BYTES: usize = 64;
const PAGE: usize = 4096;
const MAGIC: [u8; 8] = *b"LLMOSKV\x01";
/// 2: the K/V element type joined the superblock (version 1 pools were all f32).
const VERSION: u32 = 2;
/// Bytes of the superblock that carry fields (the rest of its page stays zero):
/// magic, version, META_BYTES, n_layers, n_kv_heads, head_dim, block_tokens, n_blocks,
/// model tag, K/V type (u64 each after the first three), crc32 of everything before it.
pub(crate) const SUPER_USED: usize = 76;
/// The record state of a sealed block: a random-looking value rather than 1 so that zeroed
/// or stray bytes are unlikely to claim it (the record crc is the real guard).
const SEALED: u32 = 0x5EA1_ED01;
/// Where the token-hash chain starts: not zero, so the hash of an empty prefix is not a
/// value zeroed memory already holds.
pub(crate) const CHAIN_SEED: u64 = 0x6C6C_6D6F_735F_6B76;

/// What a pool is: the shape of its blocks, how many there are, and which weights its K/V
/// belong to. Everything needed to find a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub shape: KvShape,
    pub block_tokens: usize,
    pub n_blocks: usize,
    pub model_tag: u64,
    pub dtype: KvDtype,
}

impl Geometry {
    /// Bytes of K/V data in one block, or `None` on overflow.
    pub fn bytes_per_block(shape: KvShape, block_tokens: usize, dtype: KvDtype) -> Option<usize> {
        shape
            .n_layers
            .checked_mul(2)?
            .checked_mul(block_tokens)?
            .checked_mul(shape.n_kv_heads.checked_mul(shape.head_dim)?)?
            .checked_mul(dtype.bytes())
    }

    /// Offset of the first block's data, or `None` on overflow.
    pub fn data_off(&self) -> Option<usize> {
        let meta = self.n_blocks.checked_mul(META_BYTES)?;
        SUPER_BYTES.checked_add(meta.checked_next_multiple_of(PAGE)?)
    }

    /// Bytes the whole pool occupies, or `None` on overflow.
    pub fn total_len(&self) -> Option<usize> {
        let data = self.n_blocks.checked_mul(Self::bytes_per_block(
            self.shape,
            self.block_tokens,
            self.dtype,
        )?)?;
        self.data_off()?.checked_add(data)
    }

    /// The superblock's leading bytes.
    pub fn encode(&self) -> [u8; SUPER_USED] {
        let mut b = [0u8; SUPER_USED];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(META_BYTES as u32).to_le_bytes());
        let words = [
            self.shape.n_layers as u64,
            self.shape.n_kv_heads as u64,
            self.shape.head_dim as u64,
            self.block_tokens as u64,
            self.n_blocks as u64,
            self.model_tag,
            self.dtype.code(),
        ];
        for (i, w) in words.into_iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a superblock, checking everything a later offset computation relies on.
    /// `Err` says why the bytes are not a pool this build can use.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < SUPER_USED {
            return Err(format!(
                "{} bytes, shorter than a superblock ({SUPER_USED})",
                b.len()
            ));
        }
        if b[0..8] != MAGIC {
            return Err("not a KV pool file (bad magic)".into());
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(format!(
                "format version {version}, this build reads {VERSION}"
            ));
        }
        if u32_at(b, 72) != crc32fast::hash(&b[..72]) {
            return Err("superblock checksum mismatch".into());
        }
        let meta = u32_at(b, 12);
        if meta as usize != META_BYTES {
            return Err(format!(
                "block records of {meta} bytes, expected {META_BYTES}"
            ));
        }
        let word = |i: usize| u64_at(b, 16 + 8 * i);
        let size = |i: usize, what: &str| -> Result<usize, String> {
            let v = word(i);
            match usize::try_from(v) {
                Ok(v) if v > 0 => Ok(v),
                _ => Err(format!("{what} = {v} is out of range")),
            }
        };
        let geometry = Self {
            shape: KvShape {
                n_layers: size(0, "n_layers")?,
                n_kv_heads: size(1, "n_kv_heads")?,
                head_dim: size(2, "head_dim")?,
            },
            block_tokens: size(3, "block_tokens")?,
            n_blocks: size(4, "n_blocks")?,
            model_tag: word(5),
            dtype: KvDtype::from_code(word(6))
                .ok_or_else(|| format!("unknown K/V type {}", word(6)))?,
        };
        if geometry.block_tokens > u32::MAX as usize || geometry.n_blocks > u32::MAX as usize {
            return Err("block count or block size beyond u32".into());
        }
        if geometry.total_len().is_none() {
            return Err("geometry overflows the address space".into());
        }
        Ok(geometry)
    }
}

/// What a sealed block's record says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockMeta {
    pub seq_id: u64,
    pub index: u32,
    pub filled: u32,
    pub data_crc: u32,
    pub token_hash: u64,
}

impl BlockMeta {
    /// The record of block `block` (its id is inside the crc, so a record copied to another
    /// slot does not verify).
    pub fn encode(&self, block: u32) -> [u8; META_BYTES] {
        let mut b = [0u8; META_BYTES];
        b[0..4].copy_from_slice(&SEALED.to_le_bytes());
        b[4..8].copy_from_slice(&self.filled.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..24].copy_from_slice(&self.data_crc.to_le_bytes());
        b[24..32].copy_from_slice(&self.token_hash.to_le_bytes());
        let crc = record_crc(block, &b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The sealed record in `b`, or `None` when `b` is not one (free, torn, damaged, or
    /// claiming an impossible fill).
    pub fn decode(b: &[u8], block: u32, block_tokens: usize) -> Option<Self> {
        if b.len() < META_BYTES
            || u32_at(b, 0) != SEALED
            || u32_at(b, 60) != record_crc(block, &b[..60])
        {
            return None;
        }
        let meta = Self {
            filled: u32_at(b, 4),
            seq_id: u64_at(b, 8),
            index: u32_at(b, 16),
            data_crc: u32_at(b, 20),
            token_hash: u64_at(b, 24),
        };
        (meta.filled >= 1 && meta.filled as usize <= block_tokens).then_some(meta)
    }
}

fn record_crc(block: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block.to_le_bytes());
    h.update(body);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Extends the token-hash chain by one token. A 64-bit mix (splitmix64's finaliser over the
/// previous hash and the token): the chain guards against accidental mismatches — a
/// different prompt, a lost or reordered token — not against an adversary who can already
/// write the state directory.
pub(crate) fn chain(prev: u64, token: u32) -> u64 {
    let mut x = prev ^ u64::from(token).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Offset inside a block of `layer`'s keys (`kind` 0) or values (`kind` 1) at position
/// `pos`, in bytes, for elements of `elem` bytes.
pub(crate) fn run_offset(
    row: usize,
    block_tokens: usize,
    layer: usize,
    kind: usize,
    pos: usize,
    elem: usize,
) -> usize {
    ((layer * 2 + kind) * block_tokens + pos) * row * elem
}

/// Extends `crc` (the checksum of positions `0..from` of `block`, 0 for none) over
/// positions `from..to`, position-major: for each position, every layer's K row then V row.
pub(crate) fn crc_positions(
    crc: u32,
    block: &[u8],
    shape: KvShape,
    block_tokens: usize,
    from: usize,
    to: usize,
    elem: usize,
) -> u32 {
    let row_bytes = shape.row_len() * elem;
    let mut h = crc32fast::Hasher::new_with_initial(crc);
    for pos in from..to {
        for layer in 0..shape.n_layers {
            for kind in 0..2 {
                let at = run_offset(shape.row_len(), block_tokens, layer, kind, pos, elem);
                h.update(&block[at..at + row_bytes]);
            }
        }
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry {
            shape: KvShape {
                n_layers: 2,
                n_kv_heads: 3,
                head_dim: 4,
            },
            block_tokens: 5,
            n_blocks: 7,
            model_tag: 0xDEAD_BEEF_0123_4567,
            dtype: KvDtype::F16,
        }
    }

    #[test]
    fn superblock_round_trips_and_rejects_any_flipped_byte() {
        let g = geometry();
        let bytes = g.encode();
        assert_eq!(Geometry::decode(&bytes), Ok(g));
        for i in 0..SUPER_USED {
            let mut bad = bytes;
            bad[i] ^= 0x20;
            assert!(Geometry::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(Geometry::decode(&bytes[..10]).is_err());
    }

    #[test]
    fn record_round_trips_only_in_its_own_slot() {
        let m = BlockMeta {
            seq_id: 9,
            index: 2,
            filled: 5,
            data_crc: 77,
            token_hash: 123,
        };
        let bytes = m.encode(4);
        assert_eq!(BlockMeta::decode(&bytes, 4, 5), Some(m));
        assert_eq!(BlockMeta::decode(&bytes, 5, 5), None, "moved record");
        assert_eq!(BlockMeta::decode(&bytes, 4, 4), None, "overfilled");
        assert_eq!(BlockMeta::decode(&[0; META_BYTES], 0, 5), None);
    }

    #[test]
    fn position_checksum_extends_incrementally() {
        let g = geometry();
        let len = Geometry::bytes_per_block(g.shape, g.block_tokens, g.dtype).unwrap();
        let block: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let whole = crc_positions(0, &block, g.shape, 5, 0, 5, g.dtype.bytes());
        let mut step = 0;
        for pos in 0..5 {
            step = crc_positions(step, &block, g.shape, 5, pos, pos + 1, g.dtype.bytes());
        }
        assert_eq!(step, whole);
    }
}
