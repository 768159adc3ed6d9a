//! 4-bit matmul `x · Wᵀ` over GGML q4_0, q4_1 and q4_K weights, kept at four bits: every
//! format is, per block of 32 weights, `w = d·q + m` with `q` in 0..=15 (q4_0: `m = −8d`;
//! q4_K: `d` and `m` from the super-block's 6-bit scales and mins, exact in f32), so one
//! kernel serves all three. Weights are repacked at load as nibbles in tiles of 16 columns
//! (two groups of four weights per byte), activations quantised per block of 32 as for
//! q8_0, and per output element each block adds
//! `acc + isum·(d·d_x)`, then `+ m·(d_x·s_x)` (`s_x`: the block's quantised activation sum)
//! — products then sums, never fused — so a row's result depends only on that row, and
//! the SIMD paths equal [`Q4Matrix::matmul_t_reference`] bit for bit.

use half::f16;

use crate::q8::{ggml_row_bytes, quantize_row, tiled_matmul, QuantError, Q8_0_BLOCK};

/// Output columns per tile.
const TILE: usize = 16;
/// Packed bytes of one block of one tile: 16 columns × 32 nibbles.
const TILE_BLOCK_BYTES: usize = TILE * Q8_0_BLOCK / 2;
/// Elements per k-quant super-block.
const SUPER_BLOCK: usize = 256;

/// The GGML 4-bit formats [`Q4Matrix`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q4Format {
    /// 32 weights: f16 `d`, 16 bytes of nibbles; `w = d·(q − 8)`.
    Q4_0,
    /// 32 weights: f16 `d`, f16 `m`, 16 bytes of nibbles; `w = d·q + m`.
    Q4_1,
    /// 256 weights: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins, 128 bytes of
    /// nibbles; sub-block `j` of 32: `w = d·sc_j·q − dmin·m_j`.
    Q4K,
}

impl Q4Format {
    /// (elements, bytes) of one GGML block.
    fn block(self) -> (usize, usize) {
        match self {
            Q4Format::Q4_0 => (32, 18),
            Q4Format::Q4_1 => (32, 20),
            Q4Format::Q4K => (SUPER_BLOCK, 144),
        }
    }

    /// Calls `each(sub_block, nibbles, d, m)` for every block of 32 weights of one GGML
    /// block (`bytes`), in order.
    fn decode(self, bytes: &[u8], mut each: impl FnMut(usize, [u8; 32], f32, f32)) {
        let half = |at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
        // GGML's 32-weight blocks: element i in the low nibble of byte i, i + 16 in the high.
        let split = |qs: &[u8]| -> [u8; 32] {
            std::array::from_fn(|i| if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 })
        };
        match self {
            Q4Format::Q4_0 => {
                let d = half(0);
                each(0, split(&bytes[2..18]), d, -8.0 * d);
            }
            Q4Format::Q4_1 => each(0, split(&bytes[4..20]), half(0), half(2)),
            Q4Format::Q4K => {
                let (d, dmin) = (half(0), half(2));
                let packed = &bytes[4..16];
                let qs = &bytes[16..144];
                for j in 0..8 {
                    let (sc, m) = k_scale_min(packed, j);
                    // Sub-blocks 2c and 2c+1 share 32 bytes: low nibbles, then high.
                    let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                    let q = std::array::from_fn(|l| {
                        if j % 2 == 0 {
                            chunk[l] & 15
                        } else {
                            chunk[l] >> 4
                        }
                    });
                    each(j, q, d * f32::from(sc), -(dmin * f32::from(m)));
                }
            }
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from a k-quant's 12 packed bytes of 6-bit values.
fn k_scale_min(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 15) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// A 4-bit weight matrix `[n, k]` (one output column per row of the GGML tensor), repacked
/// in tiles of 16 columns.
#[derive(Clone)]
pub struct Q4Matrix {
    n: usize,
    k: usize,
    blocks: usize,
    tiles: usize,
    /// `[tile][block][16]`: each column's block scale `d`.
    scales: Vec<f32>,
    /// `[tile][block][16]`: each column's block offset `m`.
    mins: Vec<f32>,
    /// `[tile][block][pair of groups][16 columns][4]`: byte `(p, j, i)` holds weight
    /// `8p + i` of column `j` in its low nibble and weight `8p + 4 + i` in its high one,
    /// so one 64-byte load and a mask give four consecutive weights of all 16 columns.
    nibbles: Vec<u8>,
}

impl std::fmt::Debug for Q4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4Matrix({}×{})", self.n, self.k)
    }
}

impl Q4Matrix {
    /// Repacks GGML blocks of `format`: `n` rows of `k` elements, each row whole blocks.
    pub fn from_ggml(
        format: Q4Format,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Self, QuantError> {
        let (block_len, block_bytes) = format.block();
        let row_bytes = ggml_row_bytes(bytes.len(), n, k, format.block(), &format!("{format:?}"))?;
        let blocks = k / Q8_0_BLOCK;
        let tiles = n.div_ceil(TILE);
        let mut scales = vec![0f32; tiles * blocks * TILE];
        let mut mins = vec![0f32; tiles * blocks * TILE];
        let mut nibbles = vec![0u8; tiles * blocks * TILE_BLOCK_BYTES];
        for (col, row) in bytes.chunks_exact(row_bytes).enumerate() {
            let (t, j) = (col / TILE, col % TILE);
            for (g, ggml_block) in row.chunks_exact(block_bytes).enumerate() {
                format.decode(ggml_block, |sub, q, d, m| {
                    let tb = t * blocks + g * (block_len / Q8_0_BLOCK) + sub;
                    scales[tb * TILE + j] = d;
                    mins[tb * TILE + j] = m;
                    for (e, &q) in q.iter().enumerate() {
                        let (at, high) = Self::nibble_at(tb, j, e);
                        nibbles[at] |= if high { q << 4 } else { q };
                    }
                });
            }
        }
        Ok(Self {
            n,
            k,
            blocks,
            tiles,
            scales,
            mins,
            nibbles,
        })
    }

    /// Where weight `e` (0..32) of column `j` of tile-block `tb` lives: byte, high nibble.
    fn nibble_at(tb: usize, j: usize, e: usize) -> (usize, bool) {
        let (group, within) = (e / 4, e % 4);
        let at = tb * TILE_BLOCK_BYTES + (group / 2) * TILE * 4 + j * 4 + within;
        (at, group % 2 == 1)
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input width.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Weight `(column, i)` as `(q, d, m)`, read back from the packed layout.
    fn weight(&self, col: usize, i: usize) -> (u8, f32, f32) {
        let (t, j, b) = (col / TILE, col % TILE, i / Q8_0_BLOCK);
        let tb = t * self.blocks + b;
        let (at, high) = Self::nibble_at(tb, j, i % Q8_0_BLOCK);
        let q = if high {
            self.nibbles[at] >> 4
        } else {
            self.nibbles[at] & 15
        };
        (q, self.scales[tb * TILE + j], self.mins[tb * TILE + j])
    }

    /// The weights as f32, row-major `[n][k]`: `d·q + m` (GGML's own dequantisation, bit
    /// for bit).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.n * self.k);
        for c in 0..self.n {
            for i in 0..self.k {
                let (q, d, m) = self.weight(c, i);
                w.push(d * f32::from(q) + m);
            }
        }
        w
    }

    /// `x · Wᵀ` for `x` of `rows × k`: `rows × n`, row-major. Each element is exactly
    /// [`Q4Matrix::matmul_t_reference`]'s.
    pub fn matmul_t(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * self.n];
        self.matmul_t_into(x, rows, &mut out);
        out
    }

    /// [`Q4Matrix::matmul_t`] into `out` (`rows × n`, every element written; no
    /// allocation once this thread's temporaries are sized).
    pub fn matmul_t_into(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        assert_eq!(x.len(), rows * self.k, "x is not rows × k");
        #[cfg(target_arch = "x86_64")]
        if let Some(vnni) = crate::x86::Avx512Vnni::get() {
            return tiled_matmul(
                (self.n, self.k, self.tiles),
                x,
                rows,
                true,
                |xq, first, count, t, out| vnni.q4_tile(self, xq, first, count, t, out),
                out,
            );
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = crate::x86::Avx2::get() {
            return self.matmul_t_avx2(avx2, x, rows, out);
        }
        out.copy_from_slice(&self.matmul_t_reference(x, rows));
    }

    /// [`Q4Matrix::matmul_t`] on the AVX2 path whatever else the CPU has.
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
            true,
            |xq, first, count, t, out| avx2.q4_tile(self, xq, first, count, t, out),
            out,
        )
    }

    /// The scalar definition: activations quantised by [`quantize_row`], then per element
    /// and block in order `acc = (acc + isum·(d·d_x)) + m·(d_x·s_x)`.
    pub fn matmul_t_reference(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.k, "x is not rows × k");
        let mut out = vec![0f32; rows * self.n];
        for r in 0..rows {
            let (xq, dx) = quantize_row(&x[r * self.k..(r + 1) * self.k]);
            for c in 0..self.n {
                let mut acc = 0f32;
                for b in 0..self.blocks {
                    let (mut isum, mut sum_x) = (0i32, 0i32);
                    let (mut d, mut m) = (0f32, 0f32);
                    for e in 0..Q8_0_BLOCK {
                        let (q, scale, min) = self.weight(c, b * Q8_0_BLOCK + e);
                        (d, m) = (scale, min);
                        let xe = i32::from(xq[b * Q8_0_BLOCK + e]);
                        isum += i32::from(q) * xe;
                        sum_x += xe;
                    }
                    acc += isum as f32 * (d * dx[b]);
                    acc += m * (dx[b] * sum_x as f32);
                }
                out[r * self.n + c] = acc;
            }
        }
        out
    }

    /// The packed data of tile `t`, block `b`: scales, mins and nibbles.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn tile_block(&self, t: usize, b: usize) -> (&[f32], &[f32], &[u8]) {
        let tb = t * self.blocks + b;
        (
            &self.scales[tb * TILE..(tb + 1) * TILE],
            &self.mins[tb * TILE..(tb + 1) * TILE],
            &self.nibbles[tb * TILE_BLOCK_BYTES..(tb + 1) * TILE_BLOCK_BYTES],
        )
    }

    /// Blocks of 32 per row.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn blocks(&self) -> usize {
        self.blocks
    }
}
