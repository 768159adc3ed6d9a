//! The forward's per-row steps besides the matmuls and attention — RMS norm, rotary
//! embedding, SiLU gating, residual sums — on plain row-major f32 buffers, each element by
//! the same IEEE operations in the same order as candle's CPU ops (so logits are the ones
//! the candle-op forward produced, bit for bit), with no tensor or allocation per op.
//! Every row is computed from that row alone: batch-invariant by construction.

use rayon::prelude::*;

use crate::config::RopeLayout;

/// Elements from which an elementwise step is split across the compute pool (below, the
/// hand-off costs more than it saves).
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// Rows of `width` elements of `data`, across the pool when there are many.
fn each_row(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if data.len() >= PARALLEL_ELEMENTS {
        data.par_chunks_mut(width)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        data.chunks_mut(width)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    }
}

/// `x / √(mean(x²) + eps) · weight` per row of `weight.len()` elements, into `out`
/// (resized; no allocation once it has the capacity): the sum of squares in order, then
/// `(x / m) · w` per element (candle's `rms_norm`).
pub(crate) fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(x);
    let n = weight.len();
    each_row(out, n, |_, row| {
        let sum2: f32 = row.iter().map(|&v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v / m * w;
        }
    });
}

/// Rotary tables: `[position][head_dim / 2]` cosines and sines, computed as the reference
/// implementations do (f32 frequencies, f32 angle = position × frequency).
#[derive(Debug)]
pub(crate) struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    layout: RopeLayout,
}

impl Rotary {
    pub(crate) fn new(
        head_dim: usize,
        theta: f32,
        max_positions: usize,
        layout: RopeLayout,
    ) -> Self {
        let half = head_dim / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| 1f32 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &freqs {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Rotary {
            cos,
            sin,
            half,
            layout,
        }
    }

    /// Rotates every head of every row in place (row `r` at `positions[r]`), then
    /// multiplies by `scale` (`v · scale + 0`, as candle's `affine`) when given. Pairs are
    /// adjacent (`Interleaved`) or half a head apart (`HalfSplit`); per pair
    /// `(a·c − b·s, a·s + b·c)`.
    pub(crate) fn apply(
        &self,
        x: &mut [f32],
        row_width: usize,
        positions: &[usize],
        scale: Option<f32>,
    ) {
        let (half, layout) = (self.half, self.layout);
        each_row(x, row_width, |r, row| {
            let at = positions[r] * half;
            let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
            for head in row.chunks_exact_mut(2 * half) {
                for i in 0..half {
                    let (i1, i2) = match layout {
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        RopeLayout::HalfSplit => (i, i + half),
                    };
                    let (a, b) = (head[i1], head[i2]);
                    head[i1] = a * cos[i] - b * sin[i];
                    head[i2] = a * sin[i] + b * cos[i];
                }
            }
            if let Some(scale) = scale {
                for v in row.iter_mut() {
                    *v = *v * scale + 0.0;
                }
            }
        });
    }
}

/// `silu(gate) · up` elementwise into `gate`: `g / (1 + e^(−g))`, then the product.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32], width: usize) {
    each_row(gate, width, |r, row| {
        for (g, &u) in row.iter_mut().zip(&up[r * width..(r + 1) * width]) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    });
}

/// `x += y` elementwise.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
