//! A sequence's view of the block pool: its block table, the [`KvStore`] the forward
//! writes through, the sealing that makes committed positions restorable, and restore.
//!
//! When the checksums are computed: on [`KvStore::commit`], for the newly committed
//! positions whose token ids are known ([`PagedKv::record_tokens`]), and only for them —
//! the block checksum runs position-major, so sealing one more position extends the tail
//! block's checksum over that position's bytes (`n_layers × 2 × row` f32) instead of
//! rehashing the block. A decode step therefore pays one pass over the bytes it just wrote,
//! and everything committed is restorable the moment `commit` returns: a process killed
//! after that loses nothing from the pool. Positions committed before their tokens are
//! recorded stay readable but are sealed only once the tokens arrive.

use std::borrow::Cow;

use crate::error::KvError;
use crate::layout::{self, BlockMeta};
use crate::pool::{BlockId, BlockPool, SharedPool};
use crate::store::{check_rows, KvDtype, KvRows, KvShape, KvStore, KvView};

/// One sequence's K/V in a shared [`BlockPool`]: a handle on the pool plus the sequence's
/// block table. Dropping it gives the blocks back; blocks already sealed stay restorable
/// (for [`SharedPool::restore`]) until the pool needs the space — so a sequence dropped by
/// a panicking engine can be taken back. [`PagedKv::release`] gives them back for good.
pub struct PagedKv {
    pool: SharedPool,
    seq: SeqState,
}

/// A sequence taken back from the pool by [`SharedPool::restore`].
#[derive(Debug)]
pub struct Restored {
    /// The sequence, holding positions `0..valid_len` (committed, sealed, and its tokens
    /// recorded); the caller recomputes from `valid_len` on.
    pub kv: PagedKv,
    /// Length of the longest prefix whose blocks verified.
    pub valid_len: usize,
    /// Blocks of the sequence that did not verify (or lay past the first that did not)
    /// and went to the free list.
    pub dropped_blocks: usize,
}

/// Everything about a sequence except the pool handle, so its methods can take the
/// locked pool as a separate borrow.
struct SeqState {
    shape: KvShape,
    dtype: KvDtype,
    block_tokens: usize,
    seq_id: u64,
    table: Vec<BlockId>,
    /// Positions committed.
    len: usize,
    /// Per layer, positions written (a write at `start` forgets that layer's positions
    /// after it, as in [`crate::ContiguousKv`]).
    written: Vec<usize>,
    /// Token ids of positions `0..tokens.len()`, as far as known.
    tokens: Vec<u32>,
    /// `chain[p]`: token hash of positions `0..=p`.
    chain: Vec<u64>,
    /// Positions `0..sealed` are covered by block records.
    sealed: usize,
    /// Checksum of the sealed positions of block `sealed / block_tokens` (the partly
    /// sealed tail block), continued by the next seal.
    tail_crc: u32,
}

impl SharedPool {
    /// A new, empty sequence. Fails with [`KvError::SequenceInUse`] while another view of
    /// `seq_id` lives; restorable blocks left under `seq_id` are dropped (use
    /// [`SharedPool::restore`] to keep them).
    pub fn sequence(&self, seq_id: u64) -> Result<PagedKv, KvError> {
        let mut pool = self.lock();
        pool.open_sequence(seq_id)?;
        let seq = SeqState::new(&pool, seq_id);
        drop(pool);
        Ok(PagedKv {
            pool: self.clone(),
            seq,
        })
    }

    /// Takes back sequence `seq_id` from the blocks it sealed (in this process, or in the
    /// process that last had the pool file): its blocks are walked in order and each must
    /// carry a record that verifies, a token hash equal to the hash of `tokens` up to the
    /// block's end (so it also vouches for every block before it) and a K/V checksum that
    /// matches. The longest such prefix is kept; the rest is freed. Never returns K/V that
    /// did not verify; with nothing to restore, `valid_len` is 0.
    pub fn restore(&self, seq_id: u64, tokens: &[u32]) -> Result<Restored, KvError> {
        let mut pool = self.lock();
        let found = pool.restore_blocks(seq_id, tokens)?;
        let mut seq = SeqState::new(&pool, seq_id);
        drop(pool);
        let valid_len = found.valid_len;
        seq.table = found.table;
        seq.len = valid_len;
        seq.written.fill(valid_len);
        seq.tokens = tokens[..valid_len].to_vec();
        seq.chain = found.chain;
        seq.sealed = valid_len;
        seq.tail_crc = found.tail_crc;
        tracing::debug!(
            target: "llmos::kv",
            seq_id,
            valid_len,
            asked = tokens.len(),
            dropped = found.dropped,
            "KV sequence restored"
        );
        Ok(Restored {
            kv: PagedKv {
                pool: self.clone(),
                seq,
            },
            valid_len,
            dropped_blocks: found.dropped,
        })
    }
}

impl PagedKv {
    /// The sequence's id in the pool.
    pub fn seq_id(&self) -> u64 {
        self.seq.seq_id
    }

    /// The block table: block `i` holds positions `i·block_tokens..(i+1)·block_tokens`.
    pub fn blocks(&self) -> &[BlockId] {
        &self.seq.table
    }

    /// Positions the reserved blocks can hold.
    pub fn capacity(&self) -> usize {
        self.seq.table.len() * self.seq.block_tokens
    }

    /// Token ids recorded so far.
    pub fn tokens(&self) -> &[u32] {
        &self.seq.tokens
    }

    /// Positions a restore would get back if the process died now.
    pub fn sealed_len(&self) -> usize {
        self.seq.sealed
    }

    /// The pool this sequence lives in.
    pub fn pool(&self) -> &SharedPool {
        &self.pool
    }

    /// Records the token ids of positions `start..start + tokens.len()` and forgets those
    /// recorded after them. Committed positions are sealed (restorable) only once their
    /// tokens are known. A recorded token that changes or is dropped takes the K/V from its
    /// position on with it — they were computed from the old token — so `len` and every
    /// layer's written extent drop to that position, as after [`KvStore::truncate`] (the
    /// blocks stay reserved).
    pub fn record_tokens(&mut self, start: usize, tokens: &[u32]) -> Result<(), KvError> {
        let seq = &mut self.seq;
        let known = seq.tokens.len();
        if start > known {
            return Err(KvError::OutOfRange(format!(
                "tokens recorded from {start}, only {known} known"
            )));
        }
        let same = seq.tokens[start..]
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let from = start + same;
        if from < known {
            let mut pool = self.pool.lock();
            seq.unseal_to(&mut pool, from);
            seq.len = seq.len.min(from);
            for w in &mut seq.written {
                *w = (*w).min(from);
            }
            seq.tokens.truncate(from);
            seq.chain.truncate(from);
        }
        let mut hash = seq.chain.last().copied().unwrap_or(layout::CHAIN_SEED);
        for &t in &tokens[same..] {
            hash = layout::chain(hash, t);
            seq.tokens.push(t);
            seq.chain.push(hash);
        }
        let target = seq.len.min(seq.tokens.len());
        if target > seq.sealed {
            let mut pool = self.pool.lock();
            seq.seal_to(&mut pool, target);
        }
        Ok(())
    }

    /// Ends the sequence and frees its blocks for good (nothing of it stays restorable).
    pub fn release(mut self) {
        let mut pool = self.pool.lock();
        self.seq.unseal_to(&mut pool, 0);
        // Drop now hands the whole table back as plain free blocks.
    }
}

impl std::fmt::Debug for PagedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKv")
            .field("seq_id", &self.seq.seq_id)
            .field("len", &self.seq.len)
            .field("sealed", &self.seq.sealed)
            .field("blocks", &self.seq.table)
            .finish_non_exhaustive()
    }
}

impl Drop for PagedKv {
    fn drop(&mut self) {
        let sealed_blocks = self.seq.sealed.div_ceil(self.seq.block_tokens);
        self.pool
            .lock()
            .retire(self.seq.seq_id, &self.seq.table, sealed_blocks);
    }
}

impl SeqState {
    fn new(pool: &BlockPool, seq_id: u64) -> Self {
        let g = pool.geometry();
        Self {
            shape: g.shape,
            dtype: g.dtype,
            block_tokens: g.block_tokens,
            seq_id,
            table: Vec::new(),
            len: 0,
            written: vec![0; g.shape.n_layers],
            tokens: Vec::new(),
            chain: Vec::new(),
            sealed: 0,
            tail_crc: 0,
        }
    }

    /// Seals positions `sealed..target` (their K/V written, their tokens known): block by
    /// block, extend the checksum over the new positions and rewrite the block's record.
    fn seal_to(&mut self, pool: &mut BlockPool, target: usize) {
        let bt = self.block_tokens;
        let mut pos = self.sealed;
        while pos < target {
            let index = pos / bt;
            let first = index * bt;
            let end = target.min(first + bt);
            let init = if pos == first { 0 } else { self.tail_crc };
            let block = self.table[index];
            let crc = layout::crc_positions(
                init,
                pool.block_data(block),
                self.shape,
                bt,
                pos - first,
                end - first,
                self.dtype.bytes(),
            );
            pool.write_meta(
                block,
                &BlockMeta {
                    seq_id: self.seq_id,
                    index: index as u32,
                    filled: (end - first) as u32,
                    data_crc: crc,
                    token_hash: self.chain[end - 1],
                },
            );
            self.tail_crc = crc;
            pos = end;
        }
        self.sealed = self.sealed.max(target);
    }

    /// Shrinks the sealed prefix to `0..to`, before anything overwrites positions after
    /// it: the records of later blocks are erased, the block holding `to` is resealed over
    /// its positions before `to`.
    fn unseal_to(&mut self, pool: &mut BlockPool, to: usize) {
        if to >= self.sealed {
            return;
        }
        let bt = self.block_tokens;
        let keep = to / bt;
        for &block in self.table[keep..self.sealed.div_ceil(bt)].iter().rev() {
            pool.clear_meta(block);
        }
        self.sealed = keep * bt;
        self.tail_crc = 0;
        // Reseal the kept part of the block holding `to` (its data is untouched so far).
        self.seal_to(pool, to);
    }

    fn check_layer(&self, layer: usize) -> Result<(), KvError> {
        if layer >= self.shape.n_layers {
            return Err(KvError::OutOfRange(format!(
                "layer {layer} of {}",
                self.shape.n_layers
            )));
        }
        Ok(())
    }
}

/// Copies rows for positions `start..` into the blocks of `table`, in the pool's type.
fn scatter(
    pool: &mut BlockPool,
    seq: &SeqState,
    layer: usize,
    kind: usize,
    start: usize,
    rows: &[f32],
) {
    let row = seq.shape.row_len();
    let bt = seq.block_tokens;
    let elem = seq.dtype.bytes();
    let count = rows.len() / row;
    let mut done = 0;
    while done < count {
        let pos = start + done;
        let off = pos % bt;
        let run = (bt - off).min(count - done);
        let at = layout::run_offset(row, bt, layer, kind, off, elem);
        let dst = &mut pool.block_data_mut(seq.table[pos / bt])[at..at + run * row * elem];
        let src = &rows[done * row..(done + run) * row];
        match seq.dtype {
            KvDtype::F32 => put_f32s(dst, src),
            KvDtype::F16 => put_f16s(dst, src),
        }
        done += run;
    }
}

/// A paged sequence's blocks of one layer, as a view's runs: each borrowed in place where
/// the mapped bytes can be read as their type (aligned, on a little-endian target), else
/// converted.
pub(crate) struct BlockRuns<'p> {
    pool: &'p BlockPool,
    seq: &'p SeqState,
    layer: usize,
    len: usize,
}

impl std::fmt::Debug for BlockRuns<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockRuns")
            .field("seq", &self.seq.seq_id)
            .field("layer", &self.layer)
            .field("len", &self.len)
            .finish()
    }
}

impl BlockRuns<'_> {
    /// Block `i`'s key rows and value rows among positions `0..len` (in place).
    pub(crate) fn run(&self, i: usize) -> (KvRows<'_>, KvRows<'_>) {
        let seq = self.seq;
        let row = seq.shape.row_len();
        let bt = seq.block_tokens;
        let elem = seq.dtype.bytes();
        let run = bt.min(self.len - i * bt);
        let data = self.pool.block_data(seq.table[i]);
        let rows = |kind: usize| {
            let at = layout::run_offset(row, bt, self.layer, kind, 0, elem);
            let bytes = &data[at..at + run * row * elem];
            match seq.dtype {
                KvDtype::F32 => KvRows::F32(f32s(bytes)),
                KvDtype::F16 => KvRows::F16(f16s(bytes)),
            }
        };
        (rows(0), rows(1))
    }
}

/// The pool stores f32 or f16 little-endian in bytes (a file has no endianness of its
/// own). On a little-endian target with aligned bytes (the map is page-aligned and rows
/// are whole elements, so always in practice) the rows are viewed in place through
/// `bytemuck`'s checked cast; anything else is converted.
fn put_f32s(dst: &mut [u8], src: &[f32]) {
    if cfg!(target_endian = "little") {
        if let Ok(rows) = bytemuck::try_cast_slice_mut::<u8, f32>(dst) {
            rows.copy_from_slice(src);
            return;
        }
    }
    for (d, s) in dst.chunks_exact_mut(4).zip(src) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

/// `src` rounded to f16 into `dst` (see [`put_f32s`]).
fn put_f16s(dst: &mut [u8], src: &[f32]) {
    use half::slice::HalfFloatSliceExt;
    if cfg!(target_endian = "little") {
        if let Ok(rows) = bytemuck::try_cast_slice_mut::<u8, half::f16>(dst) {
            rows.convert_from_f32_slice(src);
            return;
        }
    }
    for (d, s) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&half::f16::from_f32(*s).to_le_bytes());
    }
}

/// Rows of f32 from the pool's bytes (see [`put_f32s`]).
fn f32s(src: &[u8]) -> Cow<'_, [f32]> {
    if cfg!(target_endian = "little") {
        if let Ok(rows) = bytemuck::try_cast_slice::<u8, f32>(src) {
            return Cow::Borrowed(rows);
        }
    }
    Cow::Owned(
        src.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Rows of f16 from the pool's bytes (see [`put_f32s`]).
fn f16s(src: &[u8]) -> Cow<'_, [half::f16]> {
    if cfg!(target_endian = "little") {
        if let Ok(rows) = bytemuck::try_cast_slice::<u8, half::f16>(src) {
            return Cow::Borrowed(rows);
        }
    }
    Cow::Owned(
        src.chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
            .collect(),
    )
}

impl KvStore for PagedKv {
    fn shape(&self) -> KvShape {
        self.seq.shape
    }

    fn len(&self) -> usize {
        self.seq.len
    }

    /// Allocates the blocks positions `0..total` need, all or none.
    fn reserve(&mut self, total: usize) -> Result<(), KvError> {
        let need = total.div_ceil(self.seq.block_tokens);
        if need > self.seq.table.len() {
            let more = need - self.seq.table.len();
            let blocks = self.pool.lock().take_for(self.seq.seq_id, more)?;
            self.seq.table.extend(blocks);
        }
        Ok(())
    }

    fn write_rows(
        &mut self,
        layer: usize,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let seq = &mut self.seq;
        seq.check_layer(layer)?;
        let count = check_rows(seq.shape.row_len(), k, v)?;
        if start > seq.written[layer] {
            return Err(KvError::OutOfRange(format!(
                "write at {start} leaves a gap (have {})",
                seq.written[layer]
            )));
        }
        let end = start + count;
        let capacity = seq.table.len() * seq.block_tokens;
        if end > capacity {
            return Err(KvError::OutOfRange(format!(
                "write of positions {start}..{end}, {capacity} reserved"
            )));
        }
        let mut pool = self.pool.lock();
        // Sealed positions are about to change: their records go first.
        if start < seq.sealed {
            seq.unseal_to(&mut pool, start);
        }
        scatter(&mut pool, seq, layer, 0, start, k);
        scatter(&mut pool, seq, layer, 1, start, v);
        seq.written[layer] = end;
        // Positions from `start` are being rewritten: no longer complete in every layer
        // until the next commit (otherwise a later seal would vouch for stale rows).
        seq.len = seq.len.min(start);
        Ok(())
    }

    /// Lends the rows in place while holding the pool's lock for reading (other
    /// sequences may read at the same time).
    fn view(
        &self,
        layer: usize,
        len: usize,
        f: &mut dyn FnMut(&KvView<'_>),
    ) -> Result<(), KvError> {
        let seq = &self.seq;
        seq.check_layer(layer)?;
        if len > seq.written[layer] {
            return Err(KvError::OutOfRange(format!(
                "read of {len} positions, {} written",
                seq.written[layer]
            )));
        }
        let pool = self.pool.read();
        let blocks = BlockRuns {
            pool: &pool,
            seq,
            layer,
            len,
        };
        f(&KvView::blocks(
            seq.shape.row_len(),
            seq.block_tokens,
            len,
            blocks,
        ));
        Ok(())
    }

    /// Also seals what became committed (see the module docs for the cost).
    fn commit(&mut self, len: usize) -> Result<(), KvError> {
        let seq = &mut self.seq;
        if let Some((layer, &w)) = seq.written.iter().enumerate().find(|(_, &w)| w < len) {
            return Err(KvError::OutOfRange(format!(
                "commit of {len} positions, layer {layer} has {w} written"
            )));
        }
        seq.len = len;
        let target = len.min(seq.tokens.len());
        if target != seq.sealed {
            let mut pool = self.pool.lock();
            if target > seq.sealed {
                seq.seal_to(&mut pool, target);
            } else {
                seq.unseal_to(&mut pool, target);
            }
        }
        Ok(())
    }

    /// Also forgets the tokens recorded for positions `len..` and frees blocks past `len`.
    fn truncate(&mut self, len: usize) {
        let seq = &mut self.seq;
        let mut pool = self.pool.lock();
        seq.unseal_to(&mut pool, len);
        seq.len = seq.len.min(len);
        for w in &mut seq.written {
            *w = (*w).min(len);
        }
        seq.tokens.truncate(len);
        seq.chain.truncate(len);
        let keep = len.div_ceil(seq.block_tokens);
        if seq.table.len() > keep {
            pool.put_back(&seq.table[keep..]);
            seq.table.truncate(keep);
        }
    }
}
