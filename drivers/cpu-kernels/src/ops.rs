//! The primitives every kernel is written in, as a trait implemented once per instruction
//! set; the kernels are generic over it, so each instruction set runs the same algorithm.

use half::{bf16, f16};

use crate::reference;

/// The primitives, each bit-identical to its [`reference`] counterpart.
pub(crate) trait Ops: Copy + Send + Sync {
    /// [`reference::dot`].
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// [`reference::dot_f16`].
    fn dot_f16(self, a: &[f32], b: &[f16]) -> f32;
    /// [`reference::dot4`].
    fn dot4(self, rows: [&[f32]; 4], w: &[f32]) -> [f32; 4];
    /// [`reference::dot_pairs`].
    fn dot_pairs(self, a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4];
    /// [`reference::dot_pairs_f16`].
    fn dot_pairs_f16(self, a: [&[f32]; 4], b: [&[f16]; 4]) -> [f32; 4];
    /// [`reference::axpy_rows`].
    fn axpy_rows(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[f32]);
    /// [`reference::axpy_rows_f16`].
    fn axpy_rows_f16(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[f16]);
    /// [`reference::dot_bf16`].
    fn dot_bf16(self, a: &[f32], b: &[bf16]) -> f32;
    /// [`reference::dot_pairs_bf16`].
    fn dot_pairs_bf16(self, a: [&[f32]; 4], b: [&[bf16]; 4]) -> [f32; 4];
    /// [`reference::axpy_rows_bf16`].
    fn axpy_rows_bf16(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[bf16]);
    /// [`reference::exp_sums`].
    fn exp_sums(self, scores: &mut [f32], max: &[f32], sums: &mut [f32]);
    /// A hint to bring `data` into the cache soon (no effect on any result).
    fn prefetch<T>(self, data: &[T]);
    /// Runs `f` compiled for this instruction set: `f`'s body, inlined into a function
    /// with the set's target features, inlines the primitives in turn (no call per dot).
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R;
}

/// The scalar reference, for any CPU.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

impl Ops for Portable {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        reference::dot(a, b)
    }

    #[inline(always)]
    fn dot_f16(self, a: &[f32], b: &[f16]) -> f32 {
        reference::dot_f16(a, b)
    }

    #[inline(always)]
    fn dot4(self, rows: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
        reference::dot4(rows, w)
    }

    #[inline(always)]
    fn dot_pairs(self, a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
        reference::dot_pairs(a, b)
    }

    #[inline(always)]
    fn dot_pairs_f16(self, a: [&[f32]; 4], b: [&[f16]; 4]) -> [f32; 4] {
        reference::dot_pairs_f16(a, b)
    }

    #[inline(always)]
    fn axpy_rows(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[f32]) {
        reference::axpy_rows(acc, stride, weights, x)
    }

    #[inline(always)]
    fn axpy_rows_f16(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[f16]) {
        reference::axpy_rows_f16(acc, stride, weights, x)
    }

    #[inline(always)]
    fn dot_bf16(self, a: &[f32], b: &[bf16]) -> f32 {
        reference::dot_bf16(a, b)
    }

    #[inline(always)]
    fn dot_pairs_bf16(self, a: [&[f32]; 4], b: [&[bf16]; 4]) -> [f32; 4] {
        reference::dot_pairs_bf16(a, b)
    }

    #[inline(always)]
    fn axpy_rows_bf16(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[bf16]) {
        reference::axpy_rows_bf16(acc, stride, weights, x)
    }

    #[inline(always)]
    fn exp_sums(self, scores: &mut [f32], max: &[f32], sums: &mut [f32]) {
        reference::exp_sums(scores, max, sums)
    }

    #[inline(always)]
    fn prefetch<T>(self, _data: &[T]) {}

    #[inline(always)]
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// An element type K/V rows and dense weights may be stored in.
pub(crate) trait Elem: Copy + Send + Sync {
    /// `ops.dot4` of four f32 rows against these elements (each `dot(rows[i], w)`).
    fn dot4<O: Ops>(ops: O, rows: [&[f32]; 4], w: &[Self]) -> [f32; 4];
    /// `dot(x, columns[i])` for four weight rows: one row's products against four columns.
    fn dot_columns4<O: Ops>(ops: O, x: &[f32], columns: [&[Self]; 4]) -> [f32; 4];
    /// `ops.dot` of f32 `q` against these elements.
    fn dot<O: Ops>(ops: O, q: &[f32], k: &[Self]) -> f32;
    /// `ops.dot_pairs` of f32 `q`s against these elements.
    fn dot_pairs<O: Ops>(ops: O, q: [&[f32]; 4], k: [&[Self]; 4]) -> [f32; 4];
    /// `ops.axpy_rows` of these elements into `acc`.
    fn axpy_rows<O: Ops>(ops: O, acc: &mut [f32], stride: usize, weights: &[f32], x: &[Self]);
}

impl Elem for f32 {
    #[inline(always)]
    fn dot4<O: Ops>(ops: O, rows: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
        ops.dot4(rows, w)
    }

    /// `dot(w, x)` is `dot(x, w)` bit for bit (each product commutes): four columns as
    /// the "rows" of `dot4`, the one input row shared.
    #[inline(always)]
    fn dot_columns4<O: Ops>(ops: O, x: &[f32], columns: [&[f32]; 4]) -> [f32; 4] {
        ops.dot4(columns, x)
    }

    #[inline(always)]
    fn dot<O: Ops>(ops: O, q: &[f32], k: &[f32]) -> f32 {
        ops.dot(q, k)
    }

    #[inline(always)]
    fn dot_pairs<O: Ops>(ops: O, q: [&[f32]; 4], k: [&[f32]; 4]) -> [f32; 4] {
        ops.dot_pairs(q, k)
    }

    #[inline(always)]
    fn axpy_rows<O: Ops>(ops: O, acc: &mut [f32], stride: usize, weights: &[f32], x: &[f32]) {
        ops.axpy_rows(acc, stride, weights, x)
    }
}

impl Elem for f16 {
    /// Four pairs sharing one weight row: the same four dots, element for element.
    #[inline(always)]
    fn dot4<O: Ops>(ops: O, rows: [&[f32]; 4], w: &[f16]) -> [f32; 4] {
        ops.dot_pairs_f16(rows, [w; 4])
    }

    #[inline(always)]
    fn dot_columns4<O: Ops>(ops: O, x: &[f32], columns: [&[f16]; 4]) -> [f32; 4] {
        ops.dot_pairs_f16([x; 4], columns)
    }

    #[inline(always)]
    fn dot<O: Ops>(ops: O, q: &[f32], k: &[f16]) -> f32 {
        ops.dot_f16(q, k)
    }

    #[inline(always)]
    fn dot_pairs<O: Ops>(ops: O, q: [&[f32]; 4], k: [&[f16]; 4]) -> [f32; 4] {
        ops.dot_pairs_f16(q, k)
    }

    #[inline(always)]
    fn axpy_rows<O: Ops>(ops: O, acc: &mut [f32], stride: usize, weights: &[f32], x: &[f16]) {
        ops.axpy_rows_f16(acc, stride, weights, x)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn dot4<O: Ops>(ops: O, rows: [&[f32]; 4], w: &[bf16]) -> [f32; 4] {
        ops.dot_pairs_bf16(rows, [w; 4])
    }

    #[inline(always)]
    fn dot_columns4<O: Ops>(ops: O, x: &[f32], columns: [&[bf16]; 4]) -> [f32; 4] {
        ops.dot_pairs_bf16([x; 4], columns)
    }

    #[inline(always)]
    fn dot<O: Ops>(ops: O, q: &[f32], k: &[bf16]) -> f32 {
        ops.dot_bf16(q, k)
    }

    #[inline(always)]
    fn dot_pairs<O: Ops>(ops: O, q: [&[f32]; 4], k: [&[bf16]; 4]) -> [f32; 4] {
        ops.dot_pairs_bf16(q, k)
    }

    #[inline(always)]
    fn axpy_rows<O: Ops>(ops: O, acc: &mut [f32], stride: usize, weights: &[f32], x: &[bf16]) {
        ops.axpy_rows_bf16(acc, stride, weights, x)
    }
}
