//! Dense `x·wᵀ` (f32, f16 or bf16 weights, kept at their width): whole output columns per
//! parallel task, each weight row read once for a tile of four input rows; element
//! `(r, c)` is exactly `dot(x[r], w[c])` (16-bit weights widened exactly).

use half::{bf16, f16};

use crate::ops::{Elem, Ops};
use crate::scratch::Scratch;
use crate::{for_each_chunk, with_ops, Dispatch};

/// Output columns per parallel work item.
const COLUMNS_PER_TASK: usize = 16;

/// Multiply-adds below which the product runs on the calling thread (a tiny model's
/// projections cost less than handing them to the pool).
const PARALLEL_MATMUL_WORK: usize = 1 << 18;

/// Rows computed together against one weight row.
const ROW_TILE: usize = 4;

/// `x · wᵀ`: `x` is `rows × k`, `w` is `n × k` (one output column per weight row), the
/// result `rows × n`. Element `(r, c)` is exactly [`crate::dot`]`(x[r], w[c])`; work is
/// split across rayon's current pool by output columns.
pub fn matmul_t(x: &[f32], rows: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    matmul_t_into(x, rows, w, n, &mut out);
    out
}

/// [`matmul_t`] into `out` (`rows × n`, every element written; no allocation once this
/// thread's temporaries are sized).
pub fn matmul_t_into(x: &[f32], rows: usize, w: &[f32], n: usize, out: &mut [f32]) {
    dispatch(x, rows, w, n, out)
}

/// [`matmul_t`] over f16 weights, read at their width (half the bytes of f32) and widened
/// exactly in registers: element `(r, c)` is exactly [`crate::reference::dot_f16`]`(x[r],
/// w[c])`.
pub fn matmul_t_f16(x: &[f32], rows: usize, w: &[f16], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    matmul_t_f16_into(x, rows, w, n, &mut out);
    out
}

/// [`matmul_t_f16`] into `out` (see [`matmul_t_into`]).
pub fn matmul_t_f16_into(x: &[f32], rows: usize, w: &[f16], n: usize, out: &mut [f32]) {
    dispatch(x, rows, w, n, out)
}

/// [`matmul_t`] over bf16 weights, read at their width and widened exactly in registers:
/// element `(r, c)` is exactly [`crate::reference::dot_bf16`]`(x[r], w[c])`.
pub fn matmul_t_bf16(x: &[f32], rows: usize, w: &[bf16], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    matmul_t_bf16_into(x, rows, w, n, &mut out);
    out
}

/// [`matmul_t_bf16`] into `out` (see [`matmul_t_into`]).
pub fn matmul_t_bf16_into(x: &[f32], rows: usize, w: &[bf16], n: usize, out: &mut [f32]) {
    dispatch(x, rows, w, n, out)
}

fn dispatch<E: Elem>(x: &[f32], rows: usize, w: &[E], n: usize, out: &mut [f32]) {
    struct Matmul<'a, E> {
        x: &'a [f32],
        rows: usize,
        w: &'a [E],
        n: usize,
        out: &'a mut [f32],
    }
    impl<E: Elem> Dispatch<()> for Matmul<'_, E> {
        fn run<O: Ops>(self, ops: O) {
            matmul_t_with(ops, self.x, self.rows, self.w, self.n, self.out)
        }
    }
    with_ops(Matmul { x, rows, w, n, out })
}

pub(crate) fn matmul_t_with<O: Ops, E: Elem>(
    ops: O,
    x: &[f32],
    rows: usize,
    w: &[E],
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), rows * n, "out is not rows × n");
    if rows == 0 || n == 0 {
        return;
    }
    let k = x.len() / rows;
    assert_eq!(x.len(), rows * k, "x is not rows × k");
    assert_eq!(w.len(), n * k, "w is not n × k");
    let columns = |(task, out): (usize, &mut [f32])| {
        ops.vectorize(
            #[inline(always)]
            || columns_task(ops, x, rows, k, w, task * COLUMNS_PER_TASK, out),
        )
    };
    let parallel = rows * n * k >= PARALLEL_MATMUL_WORK;
    if rows == 1 {
        // One row: column-major is row-major.
        for_each_chunk(out, COLUMNS_PER_TASK, parallel, columns);
        return;
    }
    // Column-major while computing (each task owns whole columns), row-major at the end.
    let mut by_column = Scratch::<f32>::overwritten(n * rows);
    for_each_chunk(&mut by_column, COLUMNS_PER_TASK * rows, parallel, columns);
    for (c, column) in by_column.chunks_exact(rows).enumerate() {
        for (r, value) in column.iter().enumerate() {
            out[r * n + c] = *value;
        }
    }
}

/// The columns from `first` that `out` (column-major, `rows` per column) holds.
#[inline(always)]
fn columns_task<O: Ops, E: Elem>(
    ops: O,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[E],
    first: usize,
    out: &mut [f32],
) {
    let row = |r: usize| &x[r * k..(r + 1) * k];
    let weights = |j: usize| &w[(first + j) * k..(first + j + 1) * k];
    let tiled = rows - rows % ROW_TILE;
    for (j, column) in out.chunks_exact_mut(rows).enumerate() {
        let wc = weights(j);
        for r in (0..tiled).step_by(ROW_TILE) {
            let tile = E::dot4(ops, [row(r), row(r + 1), row(r + 2), row(r + 3)], wc);
            column[r..r + ROW_TILE].copy_from_slice(&tile);
        }
    }
    // The rows left over (all of them when decoding one): four columns at a time, so
    // that four independent sums are in flight rather than one latency-bound chain.
    let columns = out.len() / rows;
    for r in tiled..rows {
        let x_r = row(r);
        let mut j = 0;
        while j + ROW_TILE <= columns {
            let four = E::dot_columns4(
                ops,
                x_r,
                [weights(j), weights(j + 1), weights(j + 2), weights(j + 3)],
            );
            for (i, value) in four.into_iter().enumerate() {
                out[(j + i) * rows + r] = value;
            }
            j += ROW_TILE;
        }
        for j in j..columns {
            out[j * rows + r] = E::dot(ops, x_r, weights(j));
        }
    }
}
