//! The forward's dense products and attention, computed by our own kernels
//! ([`llmos_cpu_kernels`]) where candle's results would depend on the batch: each output
//! element is one fixed sequence of operations that depends only on its own inputs — never
//! on how many rows share the call, where a row sits in it, how a prompt was chunked, how
//! many threads run or which SIMD instructions the CPU has — so a sequence's logits are
//! bit-identical whatever else is batched with it. That is what makes recomputed KV equal
//! to the original, and resume exact, under load. This module adapts the pool's
//! [`KvView`] to the kernels' runs of rows.

use llmos_cpu_kernels::{KvRuns, Rows};
use llmos_kv::{KvRows, KvView};

pub use llmos_cpu_kernels::{
    dot, matmul_t, matmul_t_bf16_into, matmul_t_f16_into, matmul_t_into, AttentionShape,
};

fn rows<'a>(rows: &'a KvRows<'_>) -> Rows<'a> {
    match rows {
        KvRows::F32(r) => Rows::F32(r),
        KvRows::F16(r) => Rows::F16(r),
    }
}

/// A view's runs as the attention kernel reads them, formed on demand (nothing collected).
struct ViewRuns<'v, 'a>(&'v KvView<'a>);

impl KvRuns for ViewRuns<'_, '_> {
    fn count(&self) -> usize {
        self.0.run_count()
    }

    fn with_run<R>(&self, i: usize, f: impl FnOnce(Rows<'_>, Rows<'_>) -> R) -> R {
        let (keys, values) = self.0.run(i);
        f(rows(&keys), rows(&values))
    }
}

/// Causal attention of `n` new rows at positions `start..start + n` over the keys and
/// values of positions `0..start + n` in `kv` (already holding the new rows), read in
/// place; see [`llmos_cpu_kernels::attention`] for the order of operations.
pub fn attention(q: &[f32], kv: &KvView<'_>, start: usize, shape: AttentionShape, out: &mut [f32]) {
    llmos_cpu_kernels::attention(q, &ViewRuns(kv), kv.row_len(), start, shape, out)
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
