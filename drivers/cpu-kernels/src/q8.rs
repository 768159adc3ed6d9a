//! q8_0 matmul `x · Wᵀ` over GGML q8_0 weights, repacked at load so one AVX-512 VNNI
//! instruction multiplies sixteen output columns' int8 weights by four int8 activations
//! (AVX2 without VNNI: `maddubs` on the weights' magnitudes, the same integer sums).
//! Activations are quantised per block of 32 (as llama.cpp does), the integer dot of a
//! block is exact, and each output element accumulates its blocks in order:
//! `acc += (isum as f32) · (d_w · d_x)` — a product, a product, then a sum, never fused —
//! so row `r`'s result depends only on row `r` (batch-invariant by construction) and the
//! SIMD path equals [`Q8_0Matrix::matmul_t_reference`] bit for bit.

use half::f16;
use rayon::prelude::*;

use crate::for_each_chunk;

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
const PARALLEL_WORK: usize = 1 << 16;

/// A malformed q8_0 matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Q8_0Error(pub String);

impl std::fmt::Display for Q8_0Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "q8_0 matrix: {}", self.0)
    }
}

impl std::error::Error for Q8_0Error {}

/// Whether this CPU runs [`Q8_0Matrix`] with SIMD (AVX-512 VNNI, else AVX2). Without it the matrix
/// still computes, on the scalar reference (slow: callers may prefer another kernel).
pub fn q8_0_accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::x86::Avx512Vnni::get().is_some() || crate::x86::Avx2::get().is_some() {
        return true;
    }
    false
}

/// A q8_0 weight matrix `[n, k]` (one output column per row of the GGML tensor), repacked
/// in tiles of 16 columns.
#[derive(Clone)]
pub struct Q8_0Matrix {
    n: usize,
    k: usize,
    blocks: usize,
    tiles: usize,
    /// `[tile][block][16]`: the columns' scales, widened from f16 (exact).
    scales: Vec<f32>,
    /// `[tile][block][16]`: 128 × the sum of the column's block weights (the VNNI path
    /// multiplies activations offset by +128 to make them unsigned).
    offsets: Vec<i32>,
    /// `[tile][block][group of 4][16 columns][4]`: the int8 weights, interleaved so that
    /// one 64-byte load holds four consecutive weights of each of the 16 columns.
    weights: Vec<i8>,
}

impl std::fmt::Debug for Q8_0Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8_0Matrix({}×{})", self.n, self.k)
    }
}

impl Q8_0Matrix {
    /// Repacks GGML q8_0 blocks: `n` rows of `k` elements (`k` a multiple of 32), each row
    /// `k/32` blocks of 34 bytes.
    pub fn from_ggml(bytes: &[u8], n: usize, k: usize) -> Result<Self, Q8_0Error> {
        if k == 0 || !k.is_multiple_of(Q8_0_BLOCK) {
            return Err(Q8_0Error(format!(
                "row length {k} is not a positive multiple of 32"
            )));
        }
        let blocks = k / Q8_0_BLOCK;
        let expected = n
            .checked_mul(blocks * GGML_BLOCK_BYTES)
            .ok_or_else(|| Q8_0Error(format!("{n} rows of {k} overflow")))?;
        if bytes.len() != expected {
            return Err(Q8_0Error(format!(
                "{} bytes for {n} rows of {k} (expected {expected})",
                bytes.len()
            )));
        }
        let tiles = n.div_ceil(TILE);
        let mut scales = vec![0f32; tiles * blocks * TILE];
        let mut offsets = vec![0i32; tiles * blocks * TILE];
        let mut weights = vec![0i8; tiles * blocks * TILE_BLOCK_BYTES];
        for col in 0..n {
            let (t, j) = (col / TILE, col % TILE);
            for b in 0..blocks {
                let at = (col * blocks + b) * GGML_BLOCK_BYTES;
                let block = &bytes[at..at + GGML_BLOCK_BYTES];
                let tb = t * blocks + b;
                scales[tb * TILE + j] = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let mut sum = 0i32;
                for (i, &byte) in block[2..].iter().enumerate() {
                    let w = byte as i8;
                    sum += i32::from(w);
                    let (g, within) = (i / 4, i % 4);
                    weights[tb * TILE_BLOCK_BYTES + g * TILE * 4 + j * 4 + within] = w;
                }
                offsets[tb * TILE + j] = 128 * sum;
            }
        }
        Ok(Self {
            n,
            k,
            blocks,
            tiles,
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

    /// Weight `(column, i)` and its block scale, read back from the packed layout.
    fn weight(&self, col: usize, i: usize) -> (i8, f32) {
        let (t, j, b, e) = (col / TILE, col % TILE, i / Q8_0_BLOCK, i % Q8_0_BLOCK);
        let tb = t * self.blocks + b;
        let w = self.weights[tb * TILE_BLOCK_BYTES + (e / 4) * TILE * 4 + j * 4 + e % 4];
        (w, self.scales[tb * TILE + j])
    }

    /// `x · Wᵀ` for `x` of `rows × k`: `rows × n`, row-major. Each element is exactly
    /// [`Q8_0Matrix::matmul_t_reference`]'s.
    pub fn matmul_t(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.k, "x is not rows × k");
        #[cfg(target_arch = "x86_64")]
        if let Some(vnni) = crate::x86::Avx512Vnni::get() {
            return self.matmul_t_with(x, rows, |xq, first, count, t, out| {
                vnni.q8_0_tile(self, xq, first, count, t, out)
            });
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = crate::x86::Avx2::get() {
            return self.matmul_t_avx2(avx2, x, rows);
        }
        self.matmul_t_reference(x, rows)
    }

    /// [`Q8_0Matrix::matmul_t`] on the AVX2 path whatever else the CPU has.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn matmul_t_avx2(&self, avx2: crate::x86::Avx2, x: &[f32], rows: usize) -> Vec<f32> {
        self.matmul_t_with(x, rows, |xq, first, count, t, out| {
            avx2.q8_0_tile(self, xq, first, count, t, out)
        })
    }

    /// The scalar definition: activations quantised by [`quantize_row`], then per element
    /// `acc += (isum as f32) · (d_w · d_x)` over the blocks in order.
    pub fn matmul_t_reference(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.k, "x is not rows × k");
        let mut out = vec![0f32; rows * self.n];
        for r in 0..rows {
            let (xq, dx) = quantize_row(&x[r * self.k..(r + 1) * self.k]);
            for c in 0..self.n {
                let mut acc = 0f32;
                for b in 0..self.blocks {
                    let mut isum = 0i32;
                    let mut scale_w = 0f32;
                    for e in 0..Q8_0_BLOCK {
                        let (w, s) = self.weight(c, b * Q8_0_BLOCK + e);
                        scale_w = s;
                        isum += i32::from(w) * i32::from(xq[b * Q8_0_BLOCK + e]);
                    }
                    acc += isum as f32 * (scale_w * dx[b]);
                }
                out[r * self.n + c] = acc;
            }
        }
        out
    }

    /// Quantises the rows, then computes every (rows, tile) pair with `tile(xq, first,
    /// count, t, out)` (`out` is `[count][16]`). Many rows are split across the pool by
    /// rows (each task writes whole output rows, reading the weights from cache); few rows
    /// (decode) by column tiles.
    fn matmul_t_with(
        &self,
        x: &[f32],
        rows: usize,
        tile: impl Fn(&QuantRows, usize, usize, usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let parallel = rows * self.n * self.k >= PARALLEL_WORK;
        let xq = QuantRows::new(x, rows, self.k, parallel);
        let n = self.n;
        let mut out = vec![0f32; rows * n];
        if rows >= ROWS_SPLIT_FROM {
            let rows_task = |(index, chunk): (usize, &mut [f32])| {
                let (first, count) = (index * ROW_BLOCK, chunk.len() / n);
                let mut stripe = [0f32; ROW_BLOCK * TILE];
                for t in 0..self.tiles {
                    tile(&xq, first, count, t, &mut stripe[..count * TILE]);
                    let cols = TILE.min(n - t * TILE);
                    for r in 0..count {
                        chunk[r * n + t * TILE..r * n + t * TILE + cols]
                            .copy_from_slice(&stripe[r * TILE..r * TILE + cols]);
                    }
                }
            };
            for_each_chunk(&mut out, ROW_BLOCK * n, parallel, rows_task);
            return out;
        }
        // by_tile[t][r][j]: tile t, row r, column j of the tile.
        let mut by_tile = vec![0f32; self.tiles * rows * TILE];
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
        out
    }

    /// The packed data of tile `t`, block `b`: scales, offsets and weights.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn tile_block(&self, t: usize, b: usize) -> (&[f32], &[i32], &[i8]) {
        let tb = t * self.blocks + b;
        (
            &self.scales[tb * TILE..(tb + 1) * TILE],
            &self.offsets[tb * TILE..(tb + 1) * TILE],
            &self.weights[tb * TILE_BLOCK_BYTES..(tb + 1) * TILE_BLOCK_BYTES],
        )
    }

    /// Blocks per row.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn blocks(&self) -> usize {
        self.blocks
    }
}

/// Rows of activations quantised for the VNNI path: int8 values offset by +128 (unsigned)
/// and one scale per block.
pub(crate) struct QuantRows {
    /// `[row][k]`.
    pub(crate) unsigned: Vec<u8>,
    /// `[row][block]`.
    pub(crate) scales: Vec<f32>,
    pub(crate) k: usize,
}

impl QuantRows {
    fn new(x: &[f32], rows: usize, k: usize, parallel: bool) -> Self {
        let blocks = k / Q8_0_BLOCK;
        let mut unsigned = vec![0u8; rows * k];
        let mut scales = vec![0f32; rows * blocks];
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
        Self {
            unsigned,
            scales,
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
