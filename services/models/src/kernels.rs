//! Our own CPU kernels for the two parts of the forward where candle's results depend on
//! the batch: dense (f32) matrix products and attention. Each output element is computed
//! by one fixed sequence of operations that depends only on its own inputs — never on how
//! many rows share the call, where a row sits in it, how a prompt was chunked or how many
//! threads run — so a sequence's logits are bit-identical whatever else is batched with it.
//! That is what makes recomputed KV equal to the original, and resume exact, under load.
//!
//! The summation order is part of the contract: a dot product accumulates eight lanes
//! (element `i` into lane `i % 8`) over the whole multiple of eight, reduces the lanes
//! pairwise, then adds the remainder in order ([`dot`]). Faster kernels (SIMD) must
//! reproduce exactly this order.

use llmos_kv::KvView;
use rayon::prelude::*;

/// Accumulator lanes of [`dot`].
const LANES: usize = 8;

/// Output columns per parallel work item of [`matmul_t`].
const COLUMNS_PER_TASK: usize = 16;

/// Multiply-adds below which [`matmul_t`] runs on the calling thread (a tiny model's
/// projections cost less than handing them to the pool).
const PARALLEL_MATMUL_WORK: usize = 1 << 16;

/// Rows computed together against one weight row in [`matmul_t`] (the weight row is read
/// once for all of them; each row's arithmetic is still exactly [`dot`]'s).
const ROW_TILE: usize = 4;

#[inline(always)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `Σ a[i]·b[i]` over the shorter length, in the fixed order described in the module docs.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let whole = n - n % LANES;
    let mut tail = 0f32;
    for i in whole..n {
        tail += a[i] * b[i];
    }
    reduce(&acc) + tail
}

/// [`dot`] of `ROW_TILE` rows against one weight row, reading the weight row once. Each
/// result is bit-identical to `dot(rows[r], w)`.
#[inline]
fn dot_tile(rows: [&[f32]; ROW_TILE], w: &[f32]) -> [f32; ROW_TILE] {
    let n = w.len();
    let mut acc = [[0f32; LANES]; ROW_TILE];
    for (c, wc) in w.chunks_exact(LANES).enumerate() {
        let at = c * LANES;
        for (r, row) in rows.iter().enumerate() {
            let xc = &row[at..at + LANES];
            for l in 0..LANES {
                acc[r][l] += xc[l] * wc[l];
            }
        }
    }
    let whole = n - n % LANES;
    let mut out = [0f32; ROW_TILE];
    for (r, row) in rows.iter().enumerate() {
        let mut tail = 0f32;
        for i in whole..n {
            tail += row[i] * w[i];
        }
        out[r] = reduce(&acc[r]) + tail;
    }
    out
}

/// `x · wᵀ`: `x` is `rows × k`, `w` is `n × k` (one output column per weight row), the
/// result `rows × n`. Element `(r, c)` is exactly `dot(x[r], w[c])`; work is split across
/// rayon's current pool by output columns.
pub fn matmul_t(x: &[f32], rows: usize, w: &[f32], n: usize) -> Vec<f32> {
    if rows == 0 || n == 0 {
        return Vec::new();
    }
    let k = x.len() / rows;
    debug_assert_eq!(x.len(), rows * k);
    debug_assert_eq!(w.len(), n * k);
    let row = |r: usize| &x[r * k..(r + 1) * k];
    // Column-major while computing (each task owns whole columns), row-major at the end.
    let mut by_column = vec![0f32; n * rows];
    let columns = |(task, out): (usize, &mut [f32])| {
        let first = task * COLUMNS_PER_TASK;
        for (j, column) in out.chunks_exact_mut(rows).enumerate() {
            let c = first + j;
            let wc = &w[c * k..(c + 1) * k];
            let mut r = 0;
            while r + ROW_TILE <= rows {
                let tile = dot_tile([row(r), row(r + 1), row(r + 2), row(r + 3)], wc);
                column[r..r + ROW_TILE].copy_from_slice(&tile);
                r += ROW_TILE;
            }
            for (rr, value) in column.iter_mut().enumerate().skip(r) {
                *value = dot(row(rr), wc);
            }
        }
    };
    if rows * n * k < PARALLEL_MATMUL_WORK {
        by_column
            .chunks_mut(COLUMNS_PER_TASK * rows)
            .enumerate()
            .for_each(columns);
    } else {
        by_column
            .par_chunks_mut(COLUMNS_PER_TASK * rows)
            .enumerate()
            .for_each(columns);
    }
    let mut out = vec![0f32; rows * n];
    for (c, column) in by_column.chunks_exact(rows).enumerate() {
        for (r, value) in column.iter().enumerate() {
            out[r * n + c] = *value;
        }
    }
    out
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (query head `h` reads KV head `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Multiply-adds below which one attention call runs on the calling thread: spreading a
/// decode row's dozen heads over the pool costs more than it saves.
const PARALLEL_ATTENTION_WORK: usize = 1 << 18;

/// Query rows attended together: each key and value row is read once for the whole tile.
const ATTENTION_TILE: usize = 8;

/// Causal attention of `n` new rows at positions `start..start + n` over the keys and
/// values of positions `0..start + n` in `kv` (already holding the new rows). `q` is
/// `n × (n_heads·head_dim)`, pre-scaled by `1/√head_dim`; the result goes to `out`, same
/// shape.
///
/// For each row (at position `p`) and head, in this order: the scores of positions
/// `0..=p` by [`dot`], their maximum, `exp(score − max)` summed in position order, the
/// values weighted and summed in position order, then divided by the sum — so a row's
/// result is the same whatever chunk it arrived in, whatever else shares its tile, and
/// whatever the run (block) layout of `kv`. Rows are taken in tiles, and each key and
/// value row is read once per tile, every head at a time (one pass over the cache); f16
/// rows are widened (exactly) one row at a time.
pub fn attention(q: &[f32], kv: &KvView<'_>, start: usize, shape: AttentionShape, out: &mut [f32]) {
    let width = shape.n_heads * shape.head_dim;
    let rows = out.len() / width.max(1);
    let tile = |(index, o): (usize, &mut [f32])| {
        let first = index * ATTENTION_TILE;
        let count = o.len() / width;
        attend_tile(
            &q[first * width..(first + count) * width],
            kv,
            start + first,
            shape,
            o,
        );
    };
    let work = rows * width * (start + rows);
    if work < PARALLEL_ATTENTION_WORK || rows < 2 {
        out.chunks_mut(ATTENTION_TILE * width)
            .enumerate()
            .for_each(tile);
    } else {
        out.par_chunks_mut(ATTENTION_TILE * width)
            .enumerate()
            .for_each(tile);
    }
}

/// [`attention`] of the rows of one tile, the first at position `first`.
fn attend_tile(q: &[f32], kv: &KvView<'_>, first: usize, shape: AttentionShape, out: &mut [f32]) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = shape;
    let group = (n_heads / n_kv_heads.max(1)).max(1);
    let width = n_heads * hd;
    let rows = out.len() / width;
    let len = first + rows;
    let row_len = kv.row_len();
    // scores[(t·heads + h)·len + j]: row t, head h, position j (j ≤ first + t).
    let mut scores = vec![0f32; rows * n_heads * len];
    let mut max = vec![f32::NEG_INFINITY; rows * n_heads];
    let mut j = 0;
    for (keys, _) in kv.runs() {
        keys.for_each_row(row_len, &mut |key| {
            if j >= len {
                return false;
            }
            for t in j.saturating_sub(first)..rows {
                for h in 0..n_heads {
                    let at = (h / group) * hd;
                    let qh = &q[t * width + h * hd..t * width + (h + 1) * hd];
                    let s = dot(qh, &key[at..at + hd]);
                    let th = t * n_heads + h;
                    scores[th * len + j] = s;
                    max[th] = max[th].max(s);
                }
            }
            j += 1;
            true
        });
        if j >= len {
            break;
        }
    }
    let mut sums = vec![0f32; rows * n_heads];
    for t in 0..rows {
        for h in 0..n_heads {
            let th = t * n_heads + h;
            let mut sum = 0f32;
            for s in &mut scores[th * len..th * len + first + t + 1] {
                *s = (*s - max[th]).exp();
                sum += *s;
            }
            sums[th] = sum;
        }
    }
    out.fill(0.0);
    let mut j = 0;
    for (_, values) in kv.runs() {
        values.for_each_row(row_len, &mut |value| {
            if j >= len {
                return false;
            }
            for t in j.saturating_sub(first)..rows {
                for h in 0..n_heads {
                    let at = (h / group) * hd;
                    let weight = scores[(t * n_heads + h) * len + j];
                    let o = &mut out[t * width + h * hd..t * width + (h + 1) * hd];
                    for (acc, x) in o.iter_mut().zip(&value[at..at + hd]) {
                        *acc += weight * x;
                    }
                }
            }
            j += 1;
            true
        });
        if j >= len {
            break;
        }
    }
    for t in 0..rows {
        for h in 0..n_heads {
            let sum = sums[t * n_heads + h];
            for acc in &mut out[t * width + h * hd..t * width + (h + 1) * hd] {
                *acc /= sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmos_kv::KvRows;
    use rand::{Rng, SeedableRng};
    use std::borrow::Cow;

    fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn matmul_rows_are_the_same_whatever_the_batch() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (k, n) in [(64, 172), (172, 64), (768, 96), (13, 7)] {
            let rows = 23;
            let x = random(&mut rng, rows * k);
            let w = random(&mut rng, n * k);
            let full = matmul_t(&x, rows, &w, n);
            for r in 0..rows {
                for c in 0..n {
                    assert_eq!(
                        full[r * n + c].to_bits(),
                        dot(&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]).to_bits()
                    );
                }
            }
            for (from, len) in [(0, 1), (5, 2), (3, 7), (19, 4)] {
                let part = matmul_t(&x[from * k..(from + len) * k], len, &w, n);
                for i in 0..len * n {
                    assert_eq!(part[i].to_bits(), full[from * n + i].to_bits());
                }
            }
        }
    }

    #[test]
    fn attention_rows_do_not_depend_on_the_chunk() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let len = 37;
        let row = shape.n_kv_heads * shape.head_dim;
        let keys = random(&mut rng, len * row);
        let values = random(&mut rng, len * row);
        let q = random(&mut rng, len * shape.n_heads * shape.head_dim);
        let width = shape.n_heads * shape.head_dim;
        let view = |upto: usize, run: usize| {
            let runs = |data: &[f32]| {
                (0..upto.div_ceil(run))
                    .map(|i| {
                        KvRows::F32(Cow::Owned(
                            data[i * run * row..(upto.min((i + 1) * run)) * row].to_vec(),
                        ))
                    })
                    .collect::<Vec<_>>()
            };
            KvView::new(row, run, upto, runs(&keys), runs(&values))
        };
        // Every row alone, with the keys in one run.
        let mut alone = vec![0f32; len * width];
        for p in 0..len {
            attention(
                &q[p * width..(p + 1) * width],
                &view(p + 1, len),
                p,
                shape,
                &mut alone[p * width..(p + 1) * width],
            );
        }
        // In chunks, with the keys in blocks of 5.
        for chunk in [2, 7, 16, 37] {
            let mut start = 0;
            while start < len {
                let n = chunk.min(len - start);
                let mut out = vec![0f32; n * width];
                attention(
                    &q[start * width..(start + n) * width],
                    &view(start + n, 5),
                    start,
                    shape,
                    &mut out,
                );
                for i in 0..n * width {
                    assert_eq!(out[i].to_bits(), alone[start * width + i].to_bits());
                }
                start += n;
            }
        }
    }
}
