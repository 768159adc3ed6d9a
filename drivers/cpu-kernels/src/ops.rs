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
    /// [`reference::dot_pairs8`].
    fn dot_pairs8(self, a: [&[f32]; 8], b: [&[f32]; 8]) -> [f32; 8];
    /// [`reference::dot_pairs8_f16`].
    fn dot_pairs8_f16(self, a: [&[f32]; 8], b: [&[f16]; 8]) -> [f32; 8];
    /// [`reference::max_assign`].
    fn max_assign(self, max: &mut [f32], x: &[f32]);
    /// [`reference::head_dots`].
    fn head_dots(self, q: &[f32], keys: &[f32], shape: RunShape<'_>, out: &mut [f32]);
    /// [`reference::head_dots_f16`].
    fn head_dots_f16(self, q: &[f32], keys: &[f16], shape: RunShape<'_>, out: &mut [f32]);
    /// [`reference::head_axpy`].
    fn head_axpy(self, acc: &mut [f32], weights: &[f32], values: &[f32], shape: RunShape<'_>);
    /// [`reference::head_axpy_f16`].
    fn head_axpy_f16(self, acc: &mut [f32], weights: &[f32], values: &[f16], shape: RunShape<'_>);
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
    fn dot_pairs8(self, a: [&[f32]; 8], b: [&[f32]; 8]) -> [f32; 8] {
        reference::dot_pairs8(a, b)
    }

    #[inline(always)]
    fn dot_pairs8_f16(self, a: [&[f32]; 8], b: [&[f16]; 8]) -> [f32; 8] {
        reference::dot_pairs8_f16(a, b)
    }

    #[inline(always)]
    fn max_assign(self, max: &mut [f32], x: &[f32]) {
        reference::max_assign(max, x)
    }

    #[inline(always)]
    fn head_dots(self, q: &[f32], keys: &[f32], shape: RunShape<'_>, out: &mut [f32]) {
        reference::head_dots(q, keys, shape.row_len, shape.hd, shape.kv_at, out)
    }

    #[inline(always)]
    fn head_dots_f16(self, q: &[f32], keys: &[f16], shape: RunShape<'_>, out: &mut [f32]) {
        reference::head_dots_f16(q, keys, shape.row_len, shape.hd, shape.kv_at, out)
    }

    #[inline(always)]
    fn head_axpy(self, acc: &mut [f32], weights: &[f32], values: &[f32], shape: RunShape<'_>) {
        reference::head_axpy(acc, weights, values, shape.row_len, shape.hd, shape.kv_at)
    }

    #[inline(always)]
    fn head_axpy_f16(self, acc: &mut [f32], weights: &[f32], values: &[f16], shape: RunShape<'_>) {
        reference::head_axpy_f16(acc, weights, values, shape.row_len, shape.hd, shape.kv_at)
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

/// How a run of K/V rows is laid out for the decode primitives: rows of `row_len`
/// elements, heads of `hd`, query head `h` reading `row[kv_at[h]..kv_at[h] + hd]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunShape<'a> {
    pub(crate) row_len: usize,
    pub(crate) hd: usize,
    pub(crate) kv_at: &'a [usize],
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
    /// Eight such pairs ([`reference::dot_pairs8_wide`]).
    fn dot_pairs8<O: Ops>(ops: O, q: [&[f32]; 8], k: [&[Self]; 8]) -> [f32; 8];
    /// [`reference::head_dots_wide`] of these keys.
    fn head_dots<O: Ops>(ops: O, q: &[f32], keys: &[Self], shape: RunShape<'_>, out: &mut [f32]);
    /// [`reference::head_axpy_wide`] of these values.
    fn head_axpy<O: Ops>(
        ops: O,
        acc: &mut [f32],
        weights: &[f32],
        values: &[Self],
        shape: RunShape<'_>,
    );
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
    fn dot_pairs8<O: Ops>(ops: O, q: [&[f32]; 8], k: [&[f32]; 8]) -> [f32; 8] {
        ops.dot_pairs8(q, k)
    }

    #[inline(always)]
    fn head_dots<O: Ops>(ops: O, q: &[f32], keys: &[f32], shape: RunShape<'_>, out: &mut [f32]) {
        ops.head_dots(q, keys, shape, out)
    }

    #[inline(always)]
    fn head_axpy<O: Ops>(
        ops: O,
        acc: &mut [f32],
        weights: &[f32],
        values: &[f32],
        shape: RunShape<'_>,
    ) {
        ops.head_axpy(acc, weights, values, shape)
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
    fn dot_pairs8<O: Ops>(ops: O, q: [&[f32]; 8], k: [&[f16]; 8]) -> [f32; 8] {
        ops.dot_pairs8_f16(q, k)
    }

    #[inline(always)]
    fn head_dots<O: Ops>(ops: O, q: &[f32], keys: &[f16], shape: RunShape<'_>, out: &mut [f32]) {
        ops.head_dots_f16(q, keys, shape, out)
    }

    #[inline(always)]
    fn head_axpy<O: Ops>(
        ops: O,
        acc: &mut [f32],
        weights: &[f32],
        values: &[f16],
        shape: RunShape<'_>,
    ) {
        ops.head_axpy_f16(acc, weights, values, shape)
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

    /// Two groups of four (bf16 is a weight type; attention never reads it).
    #[inline(always)]
    fn dot_pairs8<O: Ops>(ops: O, q: [&[f32]; 8], k: [&[bf16]; 8]) -> [f32; 8] {
        let low = ops.dot_pairs_bf16([q[0], q[1], q[2], q[3]], [k[0], k[1], k[2], k[3]]);
        let high = ops.dot_pairs_bf16([q[4], q[5], q[6], q[7]], [k[4], k[5], k[6], k[7]]);
        std::array::from_fn(|i| if i < 4 { low[i] } else { high[i - 4] })
    }

    /// The reference itself (bf16 is a weight type; attention never reads it).
    #[inline(always)]
    fn head_dots<O: Ops>(_: O, q: &[f32], keys: &[bf16], shape: RunShape<'_>, out: &mut [f32]) {
        reference::head_dots_wide(q, keys, shape.row_len, shape.hd, shape.kv_at, out)
    }

    /// The reference itself (see `head_dots`).
    #[inline(always)]
    fn head_axpy<O: Ops>(
        _: O,
        acc: &mut [f32],
        weights: &[f32],
        values: &[bf16],
        shape: RunShape<'_>,
    ) {
        reference::head_axpy_wide(acc, weights, values, shape.row_len, shape.hd, shape.kv_at)
    }

    #[inline(always)]
    fn axpy_rows<O: Ops>(ops: O, acc: &mut [f32], stride: usize, weights: &[f32], x: &[bf16]) {
        ops.axpy_rows_bf16(acc, stride, weights, x)
    }
}
