//! q8_0 matmul `x · Wᵀ` over GGML q8_0 weights, repacked at load so one AVX-512 VNNI
//! instruction multiplies sixteen output columns' int8 weights by four int8 activations
//! (AVX2 without VNNI: `maddubs` on the weights' magnitudes, the same integer sums).
//! Activations are quantised per block of 32 (as llama.cpp does), the integer dot of a
//! block is exact, and each output element accumulates its blocks in order:
//! `acc += (isum as f32) · (d_w · d_x)` — a product, a product, then a sum, never fused —
//! so row `r`'s result depends only on row `r` (batch-invariant by construction) and the
//! SIMD path equals [`Q8Matrix::matmul_t_reference`] bit for bit.

use half::f16;
use rayon::prelude::*;

use crate::for_each_chunk;
use crate::scratch::Scratch;

/// Elements per q8_0 block.
pub const Q8_0_BLOCK: usize = 32;
/// Bytes per GGML q8_0 block: an f16 scale, then 32 int8.
const GGML_BLOCK_BYTES: usize = 2 + Q8_0_BLOCK;
/// Output columns per tile: one 512-bit register of i32/f32 lanes.
const TILE: usize = 16;
/// Weight bytes of one block of one tile.
const TILE_BLOCK_BYTES: usize = TILE * Q8_0_BLOCK;
/// Tiles per parallel task (few rows).
const TILES_PER_TASK: usize = 4;
/// Rows computed together against one tile (the register block of the SIMD kernel).
pub(crate) const ROW_BLOCK: usize = 8;
/// Row count from which work is split by rows rather than by column tiles.
const ROWS_SPLIT_FROM: usize = 32;
/// Multiply-adds below which the product runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 18;

/// Malformed GGML blocks handed to a packed matrix (q8_0, q4_0, q4_1, q4_K, q6_K).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantError(pub String);

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "quantized matrix: {}", self.0)
    }
}

impl std::error::Error for QuantError {}

/// Whether this CPU runs [`Q8Matrix`] with SIMD (AVX-512 VNNI, else AVX2). Without it the matrix
/// still computes, on the scalar reference (slow: callers may prefer another kernel).
pub fn quantized_accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::x86::Avx512Vnni::get().is_some() || crate::x86::Avx2::get().is_some() {
        return true;
    }
    false
}

/// The GGML formats with 8-bit-or-narrower signed weights that [`Q8Matrix`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q8Format {
    /// 32 weights: f16 `d`, 32 int8; `w = d·q`.
    Q8_0,
    /// 256 weights: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, f16
    /// `d`; sub-block `s` of 16: `w = d·sc_s·(q − 32)` (`d·sc_s` exact in f32).
    Q6K,
}

impl Q8Format {
    /// (elements, bytes) of one GGML block.
    fn block(self) -> (usize, usize) {
        match self {
            Q8Format::Q8_0 => (Q8_0_BLOCK, GGML_BLOCK_BYTES),
            Q8Format::Q6K => (256, 210),
        }
    }

    /// Sub-blocks (each with its own scale) per block of 32.
    fn sub_blocks(self) -> usize {
        match self {
            Q8Format::Q8_0 => 1,
            Q8Format::Q6K => 2,
        }
    }

    /// One GGML block's weights and the scale of each of its sub-blocks.
    fn decode(self, bytes: &[u8], weights: &mut [i8], scales: &mut [f32]) {
        let half = |at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
        match self {
            Q8Format::Q8_0 => {
                scales[0] = half(0);
                for (w, &b) in weights.iter_mut().zip(&bytes[2..]) {
                    *w = b as i8;
                }
            }
            Q8Format::Q6K => {
                let (low, high, sub_scales) = (&bytes[..128], &bytes[128..192], &bytes[192..208]);
                let d = half(208);
                for (scale, &sc) in scales.iter_mut().zip(sub_scales) {
                    *scale = d * f32::from(sc as i8);
                }
                for c in 0..2 {
                    let (low, high) = (&low[64 * c..64 * c + 64], &high[32 * c..32 * c + 32]);
                    let out = &mut weights[128 * c..128 * c + 128];
                    for l in 0..32 {
                        let six = |nibble: u8, shift: u32| {
                            ((nibble & 15) | (((high[l] >> shift) & 3) << 4)) as i8 - 32
                        };
                        out[l] = six(low[l], 0);
                        out[l + 32] = six(low[l + 32], 2);
                        out[l + 64] = six(low[l] >> 4, 4);
                        out[l + 96] = six(low[l + 32] >> 4, 6);
                    }
                }
            }
        }
    }
}

/// A weight matrix `[n, k]` of int8 weights with a scale per block of 32 (q8_0) or 16
/// (q6_K), one output column per row of the GGML tensor, repacked in tiles of 16 columns.
#[derive(Clone)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    blocks: usize,
    tiles: usize,
    /// Sub-blocks per block of 32 (1 or 2), each with its own scale.
    sub: usize,
    /// `[tile][block][sub-block][16]`: the columns' scales (exact in f32).
    scales: Vec<f32>,
    /// `[tile][block][sub-block][16]`: 128 × the sum of the column's sub-block weights
    /// (the VNNI path multiplies activations offset by +128 to make them unsigned).
    offsets: Vec<i32>,
    /// `[tile][block][group of 4][16 columns][4]`: the int8 weights, interleaved so that
    /// one 64-byte load holds four consecutive weights of each of the 16 columns.
    weights: Vec<i8>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix({}×{})", self.n, self.k)
    }
}

impl Q8Matrix {
    /// Repacks GGML blocks of `format`: `n` rows of `k` elements, each row whole blocks.
    pub fn from_ggml(
        format: Q8Format,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Self, QuantError> {
        let (block_len, block_bytes) = format.block();
        let row_bytes = ggml_row_bytes(bytes.len(), n, k, format.block(), &format!("{format:?}"))?;
        let (blocks, sub) = (k / Q8_0_BLOCK, format.sub_blocks());
        let sub_len = Q8_0_BLOCK / sub;
        let tiles = n.div_ceil(TILE);
        let mut scales = vec![0f32; tiles * blocks * sub * TILE];
        let mut offsets = vec![0i32; tiles * blocks * sub * TILE];
        let mut weights = vec![0i8; tiles * blocks * TILE_BLOCK_BYTES];
        let (mut row_weights, mut row_scales) = (vec![0i8; k], vec![0f32; k / sub_len]);
        for (col, row) in bytes.chunks_exact(row_bytes).enumerate() {
            for ((ggml, w), d) in row
                .chunks_exact(block_bytes)
                .zip(row_weights.chunks_exact_mut(block_len))
                .zip(row_scales.chunks_exact_mut(block_len / sub_len))
            {
                format.decode(ggml, w, d);
            }
            let (t, j) = (col / TILE, col % TILE);
            for (s, (sub_weights, &d)) in row_weights
                .chunks_exact(sub_len)
                .zip(&row_scales)
                .enumerate()
            {
                let (b, within_block) = (s / sub, s % sub);
                let tb = t * blocks + b;
                let at = (tb * sub + within_block) * TILE + j;
                scales[at] = d;
                offsets[at] = 128 * sub_weights.iter().map(|&w| i32::from(w)).sum::<i32>();
                for (e, &w) in sub_weights.iter().enumerate() {
                    let i = within_block * sub_len + e;
                    weights[tb * TILE_BLOCK_BYTES + (i / 4) * TILE * 4 + j * 4 + i % 4] = w;
                }
            }
        }
        Ok(Self {
            n,
            k,
            blocks,
            tiles,
            sub,
            scales,
            offsets,
            weights,
        })
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Weight `(column, i)` and its sub-block's scale, read back from the packed layout.
    fn weight(&self, col: usize, i: usize) -> (i8, f32) {
        let (t, j, b, e) = (col / TILE, col % TILE, i / Q8_0_BLOCK, i % Q8_0_BLOCK);
        let tb = t * self.blocks + b;
        let w = self.weights[tb * TILE_BLOCK_BYTES + (e / 4) * TILE * 4 + j * 4 + e % 4];
        let within_block = e / (Q8_0_BLOCK / self.sub);
        (w, self.scales[(tb * self.sub + within_block) * TILE + j])
    }

    /// The weights as f32, row-major `[n][k]`: `d·q` (GGML's own dequantisation, bit for
    /// bit).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.n * self.k);
        for c in 0..self.n {
            for i in 0..self.k {
                let (q, d) = self.weight(c, i);
                w.push(d * f32::from(q));
            }
        }
        w
    }

    /// `x · Wᵀ` for `x` of `rows × k`: `rows × n`, row-major. Each element is exactly
    /// [`Q8Matrix::matmul_t_reference`]'s.
    pub fn matmul_t(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * self.n];
        self.matmul_t_into(x, rows, &mut out);
        out
    }

    /// [`Q8Matrix::matmul_t`] into `out` (`rows × n`, every element written; no
    /// allocation once this thread's temporaries are sized).
    pub fn matmul_t_into(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert_eq!(x.len(), rows * self.k, "x is not rows × k");
        #[cfg(target_arch = "x86_64")]
        if let Some(vnni) = crate::x86::Avx512Vnni::get() {
            return tiled_matmul(
                (self.n, self.k, self.tiles),
                x,
                rows,
                false,
                |xq, first, count, t, out| vnni.q8_0_tile(self, xq, first, count, t, out),
                out,
            );
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = crate::x86::Avx2::get() {
            return self.matmul_t_avx2(avx2, x, rows, out);
        }
        out.copy_from_slice(&self.matmul_t_reference(x, rows));
    }

    /// [`Q8Matrix::matmul_t`] on the AVX2 path whatever else the CPU has.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn matmul_t_avx2(
        &self,
        avx2: crate::x86::Avx2,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
    ) {
        tiled_matmul(
            (self.n, self.k, self.tiles),
            x,
            rows,
            false,
            |xq, first, count, t, out| avx2.q8_0_tile(self, xq, first, count, t, out),
            out,
        )
    }

    /// The scalar definition: activations quantised by [`quantize_row`], then per element
    /// `acc += (isum as f32) · (d_w · d_x)` over the sub-blocks in order.
    pub fn matmul_t_reference(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.k, "x is not rows × k");
        let sub_len = Q8_0_BLOCK / self.sub;
        let mut out = vec![0f32; rows * self.n];
        for r in 0..rows {
            let (xq, dx) = quantize_row(&x[r * self.k..(r + 1) * self.k]);
            for c in 0..self.n {
                let mut acc = 0f32;
                for s in 0..self.k / sub_len {
                    let mut isum = 0i32;
                    let mut scale_w = 0f32;
                    let first = s * sub_len;
                    for (e, &xe) in xq[first..first + sub_len].iter().enumerate() {
                        let (w, d) = self.weight(c, first + e);
                        scale_w = d;
                        isum += i32::from(w) * i32::from(xe);
                    }
                    acc += isum as f32 * (scale_w * dx[s / self.sub]);
                }
                out[r * self.n + c] = acc;
            }
        }
        out
    }

    /// The packed data of tile `t`, block `b`: scales and offsets (`[sub-block][16]`) and
    /// weights.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn tile_block(&self, t: usize, b: usize) -> (&[f32], &[i32], &[i8]) {
        let tb = t * self.blocks + b;
        let per_block = self.sub * TILE;
        (
            &self.scales[tb * per_block..(tb + 1) * per_block],
            &self.offsets[tb * per_block..(tb + 1) * per_block],
            &self.weights[tb * TILE_BLOCK_BYTES..(tb + 1) * TILE_BLOCK_BYTES],
        )
    }

    /// Blocks of 32 per row.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn blocks(&self) -> usize {
        self.blocks
    }

    /// Sub-blocks per block of 32 (1: q8_0, 2: q6_K).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn sub_blocks(&self) -> usize {
        self.sub
    }
}

/// Bytes per row of `n` rows of `k` elements stored in GGML blocks of `(elements, bytes)`,
/// checked against the `len` bytes given: rows of whole blocks, no overflow, no excess.
pub(crate) fn ggml_row_bytes(
    len: usize,
    n: usize,
    k: usize,
    (block_len, block_bytes): (usize, usize),
    format: &str,
) -> Result<usize, QuantError> {
    if k == 0 || !k.is_multiple_of(block_len) {
        return Err(QuantError(format!(
            "row length {k} is not a positive multiple of {block_len} ({format})"
        )));
    }
    let row_bytes = k / block_len * block_bytes;
    let expected = n
        .checked_mul(row_bytes)
        .ok_or_else(|| QuantError(format!("{n} rows of {k} overflow")))?;
    if len != expected {
        return Err(QuantError(format!(
            "{len} bytes for {n} rows of {k} as {format} (expected {expected})"
        )));
    }
    Ok(row_bytes)
}

/// `x · Wᵀ` for a matrix of `n` columns in `tiles` tiles of 16: quantises the rows, then computes every (rows, tile) pair with `tile(xq, first,
/// count, t, out)` (`out` is `[count][16]`). Many rows are split across the pool by
/// rows (each task writes whole output rows, reading the weights from cache); few rows
/// (decode) by column tiles.
pub(crate) fn tiled_matmul(
    (n, k, tiles): (usize, usize, usize),
    x: &[f32],
    rows: usize,
    signed: bool,
    tile: impl Fn(&QuantRows, usize, usize, usize, &mut [f32]) + Sync,
    out: &mut [f32],
) {
    assert_eq!(out.len(), rows * n, "out is not rows × n");
    let parallel = rows * n * k >= PARALLEL_WORK;
    let xq = QuantRows::new(x, rows, k, parallel, signed);
    if rows >= ROWS_SPLIT_FROM {
        let rows_task = |(index, chunk): (usize, &mut [f32])| {
            let (first, count) = (index * ROW_BLOCK, chunk.len() / n);
            let mut stripe = [0f32; ROW_BLOCK * TILE];
            for t in 0..tiles {
                tile(&xq, first, count, t, &mut stripe[..count * TILE]);
                let cols = TILE.min(n - t * TILE);
                for r in 0..count {
                    chunk[r * n + t * TILE..r * n + t * TILE + cols]
                        .copy_from_slice(&stripe[r * TILE..r * TILE + cols]);
                }
            }
        };
        for_each_chunk(out, ROW_BLOCK * n, parallel, rows_task);
        return;
    }
    // by_tile[t][r][j]: tile t, row r, column j of the tile.
    let mut by_tile = Scratch::<f32>::overwritten(tiles * rows * TILE);
    let tiles_task = |(index, chunk): (usize, &mut [f32])| {
        for (i, stripe) in chunk.chunks_exact_mut(rows * TILE).enumerate() {
            let t = index * TILES_PER_TASK + i;
            let mut first = 0;
            while first < rows {
                let count = ROW_BLOCK.min(rows - first);
                tile(
                    &xq,
                    first,
                    count,
                    t,
                    &mut stripe[first * TILE..(first + count) * TILE],
                );
                first += count;
            }
        }
    };
    for_each_chunk(
        &mut by_tile,
        TILES_PER_TASK * rows * TILE,
        parallel,
        tiles_task,
    );
    for (t, stripe) in by_tile.chunks_exact(rows * TILE).enumerate() {
        let cols = TILE.min(n - t * TILE);
        for r in 0..rows {
            out[r * n + t * TILE..r * n + t * TILE + cols]
                .copy_from_slice(&stripe[r * TILE..r * TILE + cols]);
        }
    }
}

/// Rows of activations quantised for the VNNI path: int8 values offset by +128 (unsigned)
/// and one scale per block.
pub(crate) struct QuantRows {
    /// `[row][k]`.
    pub(crate) unsigned: Scratch<u8>,
    /// `[row][k]`: the same activations signed (what the 4-bit kernels multiply their
    /// unsigned nibbles by, broadcast straight from memory); empty for the int8 kernels.
    pub(crate) signed: Scratch<i8>,
    /// `[row][block]`.
    pub(crate) scales: Scratch<f32>,
    /// `[row][block]`: the sum of the block's quantised activations (what a weight
    /// format with a per-block offset, `w = d·q + m`, multiplies by `m`); empty for the
    /// int8 kernels.
    pub(crate) sums: Scratch<i32>,
    pub(crate) k: usize,
}

impl QuantRows {
    /// `signed`: also the signed copy and the block sums (what the 4-bit kernels read).
    fn new(x: &[f32], rows: usize, k: usize, parallel: bool, signed: bool) -> Self {
        let blocks = k / Q8_0_BLOCK;
        let mut unsigned = Scratch::<u8>::overwritten(rows * k);
        let mut scales = Scratch::<f32>::overwritten(rows * blocks);
        let row = |((u, d), x): ((&mut [u8], &mut [f32]), &[f32])| {
            #[cfg(target_arch = "x86_64")]
            if let Some(vnni) = crate::x86::Avx512Vnni::get() {
                return vnni.quantize_row_unsigned(x, u, d);
            }
            for ((block, u), d) in x
                .chunks_exact(Q8_0_BLOCK)
                .zip(u.chunks_exact_mut(Q8_0_BLOCK))
                .zip(d.iter_mut())
            {
                let (q, scale) = quantize_block(block);
                for (u, q) in u.iter_mut().zip(q) {
                    *u = (i16::from(q) + 128) as u8;
                }
                *d = scale;
            }
        };
        if parallel && rows > 1 {
            unsigned
                .par_chunks_mut(k)
                .zip(scales.par_chunks_mut(blocks))
                .zip(x.par_chunks(k))
                .for_each(row);
        } else {
            unsigned
                .chunks_mut(k)
                .zip(scales.chunks_mut(blocks))
                .zip(x.chunks(k))
                .for_each(row);
        }
        let (signed, sums) = if signed {
            let mut signed = Scratch::<i8>::overwritten(rows * k);
            for (s, &u) in signed.iter_mut().zip(unsigned.iter()) {
                *s = (u ^ 0x80) as i8;
            }
            let mut sums = Scratch::<i32>::overwritten(rows * blocks);
            for (sum, block) in sums.iter_mut().zip(signed.chunks_exact(Q8_0_BLOCK)) {
                *sum = block.iter().map(|&q| i32::from(q)).sum();
            }
            (signed, sums)
        } else {
            (Scratch::zeroed(0), Scratch::zeroed(0))
        };
        Self {
            unsigned,
            signed,
            scales,
            sums,
            k,
        }
    }
}

/// One row's activations as q8_0: per block of 32, `d = max|x| / 127`, `q = round(x / d)`
/// (ties to even, via the reciprocal `1/d`, clamped to ±127; a block of zeros has `d = 0`).
/// Defined for finite inputs.
pub fn quantize_row(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(x.len());
    let mut d = Vec::with_capacity(x.len() / Q8_0_BLOCK);
    for block in x.chunks_exact(Q8_0_BLOCK) {
        let (qb, scale) = quantize_block(block);
        q.extend_from_slice(&qb);
        d.push(scale);
    }
    (q, d)
}

/// [`quantize_row`] of one block of 32.
fn quantize_block(block: &[f32]) -> ([i8; Q8_0_BLOCK], f32) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
    let mut q = [0i8; Q8_0_BLOCK];
    for (qi, &v) in q.iter_mut().zip(block) {
        *qi = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    (q, scale)
}
