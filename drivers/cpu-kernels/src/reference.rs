//! The scalar reference of every primitive: it defines the order of operations (see the
//! crate docs) that the SIMD paths reproduce bit for bit, and it is the portable path.

use half::{bf16, f16};

/// Accumulator lanes of a dot product.
pub const LANES: usize = 8;

/// The lanes' reduction: `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7))`.
#[inline(always)]
pub fn reduce(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// An element type the primitives read, widened exactly to f32 first.
pub trait Widen: Copy {
    /// The value as f32 (exact: every f16 and bf16 is an f32).
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `Σ a[i]·b[i]` over the shorter length: eight lanes over the whole multiple of eight,
/// reduced by [`reduce`], plus the remainder summed in order (`b` widened first).
#[inline]
pub fn dot_wide<E: Widen>(a: &[f32], b: &[E]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l].widen();
        }
    }
    let whole = n - n % LANES;
    let mut tail = 0f32;
    for i in whole..n {
        tail += a[i] * b[i].widen();
    }
    reduce(&acc) + tail
}

/// [`dot_wide`] of f32.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_wide(a, b)
}

/// [`dot_wide`] with `b` widened from f16.
#[inline]
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    dot_wide(a, b)
}

/// [`dot_wide`] with `b` widened from bf16.
#[inline]
pub fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
    dot_wide(a, b)
}

/// Four [`dot`]s of `rows` against one `w`, reading `w` once; each result is exactly
/// `dot(rows[r], w)` (the lengths are `w`'s; every row is at least as long).
#[inline]
pub fn dot4(rows: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let n = w.len();
    let mut acc = [[0f32; LANES]; 4];
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
    let mut out = [0f32; 4];
    for (r, row) in rows.iter().enumerate() {
        let mut tail = 0f32;
        for i in whole..n {
            tail += row[i] * w[i];
        }
        out[r] = reduce(&acc[r]) + tail;
    }
    out
}

/// `acc[i] += w·x[i]` over the shorter length (the product rounded, then the sum), `x`
/// widened first.
#[inline]
pub fn axpy_wide<E: Widen>(acc: &mut [f32], w: f32, x: &[E]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a += w * x.widen();
    }
}

/// [`axpy_wide`] of f32.
#[inline]
pub fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    axpy_wide(acc, w, x)
}

/// [`axpy_wide`] with `x` widened from f16.
#[inline]
pub fn axpy_f16(acc: &mut [f32], w: f32, x: &[f16]) {
    axpy_wide(acc, w, x)
}

/// Four independent [`dot_wide`]s (one per pair), each exactly `dot_wide(a[i], b[i])`.
#[inline]
pub fn dot_pairs_wide<E: Widen>(a: [&[f32]; 4], b: [&[E]; 4]) -> [f32; 4] {
    std::array::from_fn(|i| dot_wide(a[i], b[i]))
}

/// Eight independent [`dot_wide`]s, each exactly `dot_wide(a[i], b[i])`.
#[inline]
pub fn dot_pairs8_wide<E: Widen>(a: [&[f32]; 8], b: [&[E]; 8]) -> [f32; 8] {
    std::array::from_fn(|i| dot_wide(a[i], b[i]))
}

/// [`dot_pairs8_wide`] of f32.
#[inline]
pub fn dot_pairs8(a: [&[f32]; 8], b: [&[f32]; 8]) -> [f32; 8] {
    dot_pairs8_wide(a, b)
}

/// [`dot_pairs8_wide`] of f16.
#[inline]
pub fn dot_pairs8_f16(a: [&[f32]; 8], b: [&[f16]; 8]) -> [f32; 8] {
    dot_pairs8_wide(a, b)
}

/// [`dot_pairs_wide`] of f32.
#[inline]
pub fn dot_pairs(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
    dot_pairs_wide(a, b)
}

/// [`dot_pairs_wide`] of f16.
#[inline]
pub fn dot_pairs_f16(a: [&[f32]; 4], b: [&[f16]; 4]) -> [f32; 4] {
    dot_pairs_wide(a, b)
}

/// [`dot_pairs_wide`] of bf16.
#[inline]
pub fn dot_pairs_bf16(a: [&[f32]; 4], b: [&[bf16]; 4]) -> [f32; 4] {
    dot_pairs_wide(a, b)
}

/// [`axpy_wide`] of one `x` into `weights.len()` rows of `acc`, row `i` starting at
/// `i * stride` and `x.len()` long: `acc[i·stride + e] += weights[i]·x[e]`.
#[inline]
pub fn axpy_rows_wide<E: Widen>(acc: &mut [f32], stride: usize, weights: &[f32], x: &[E]) {
    for (i, &w) in weights.iter().enumerate() {
        axpy_wide(&mut acc[i * stride..i * stride + x.len()], w, x);
    }
}

/// [`axpy_rows_wide`] of f32.
#[inline]
pub fn axpy_rows(acc: &mut [f32], stride: usize, weights: &[f32], x: &[f32]) {
    axpy_rows_wide(acc, stride, weights, x)
}

/// [`axpy_rows_wide`] of f16.
#[inline]
pub fn axpy_rows_f16(acc: &mut [f32], stride: usize, weights: &[f32], x: &[f16]) {
    axpy_rows_wide(acc, stride, weights, x)
}

/// [`axpy_rows_wide`] of bf16.
#[inline]
pub fn axpy_rows_bf16(acc: &mut [f32], stride: usize, weights: &[f32], x: &[bf16]) {
    axpy_rows_wide(acc, stride, weights, x)
}

/// Upper clamp of [`exp`]'s argument: `e^88` is the largest power it computes (finite).
pub const EXP_HI: f32 = 88.0;
/// Lower clamp of [`exp`]'s argument; below it the result is 0 (e^-87 ≈ 1.6e-38 is the
/// smallest normal result the scaling by 2^n reaches).
pub const EXP_LO: f32 = -87.0;
pub(crate) const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody–Waite; the high part is 0.693359375 = 355/512, so `n·LN2_HI`
/// is exact for the `n` used here).
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// The minimax polynomial of Cephes' `expf` on [-ln2/2, ln2/2].
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` within 2 ulp for `x` in `[EXP_LO, EXP_HI]` (0 below, `e^88` above; NaN gives
/// `e^88` too): `n = round(x·log2 e)` (ties to even), `r = x − n·ln2` in two fused steps,
/// `e^r ≈ 1 + r + r²·p(r)` by Horner's rule with fused multiply-adds, scaled by `2^n`
/// built in the exponent bits. Every step is one IEEE operation a vector unit has, so
/// the SIMD paths compute it lane by lane bit for bit (libm's `expf` differs between
/// libraries and has no vector form).
#[inline]
pub fn exp(x: f32) -> f32 {
    // `a < b ? a : b` then `a > b ? a : b`: the vector min and max, NaN included.
    let c = if x < EXP_HI { x } else { EXP_HI };
    let c = if c > EXP_LO { c } else { EXP_LO };
    let n = (c * LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_HI, c);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = EXP_POLY[0];
    for &coefficient in &EXP_POLY[1..] {
        p = p.mul_add(r, coefficient);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // n is in -125..=127 here, so the biased exponent is a normal one.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < EXP_LO {
        0.0
    } else {
        y * scale
    }
}

/// The attention scores of a decode row against a run of key rows: for key row `p` of
/// `keys` (rows of `row_len`, `out.len() / kv_at.len()` of them) and query head `h` of `q`
/// (heads of `hd`), `out[p·heads + h]` is `dot_wide` of the head with
/// `key[kv_at[h]..kv_at[h] + hd]` (its key head).
#[inline]
pub fn head_dots_wide<E: Widen>(
    q: &[f32],
    keys: &[E],
    row_len: usize,
    hd: usize,
    kv_at: &[usize],
    out: &mut [f32],
) {
    for (key, scores) in keys
        .chunks_exact(row_len)
        .zip(out.chunks_exact_mut(kv_at.len()))
    {
        for (h, o) in scores.iter_mut().enumerate() {
            *o = dot_wide(&q[h * hd..(h + 1) * hd], &key[kv_at[h]..kv_at[h] + hd]);
        }
    }
}

/// [`head_dots_wide`] of f32 keys.
#[inline]
pub fn head_dots(
    q: &[f32],
    keys: &[f32],
    row_len: usize,
    hd: usize,
    kv_at: &[usize],
    out: &mut [f32],
) {
    head_dots_wide(q, keys, row_len, hd, kv_at, out)
}

/// [`head_dots_wide`] of f16 keys.
#[inline]
pub fn head_dots_f16(
    q: &[f32],
    keys: &[f16],
    row_len: usize,
    hd: usize,
    kv_at: &[usize],
    out: &mut [f32],
) {
    head_dots_wide(q, keys, row_len, hd, kv_at, out)
}

/// A run of value rows weighed into a decode row, row by row in order: for value row `p`
/// (rows of `row_len`, `weights.len() / kv_at.len()` of them) and each query head `h`,
/// [`axpy_wide`] of `value[kv_at[h]..kv_at[h] + hd]` with `weights[p·heads + h]` into
/// `acc[h·hd..(h + 1)·hd]`.
#[inline]
pub fn head_axpy_wide<E: Widen>(
    acc: &mut [f32],
    weights: &[f32],
    values: &[E],
    row_len: usize,
    hd: usize,
    kv_at: &[usize],
) {
    for (value, w) in values
        .chunks_exact(row_len)
        .zip(weights.chunks_exact(kv_at.len()))
    {
        for (h, (&w, &at)) in w.iter().zip(kv_at).enumerate() {
            axpy_wide(&mut acc[h * hd..(h + 1) * hd], w, &value[at..at + hd]);
        }
    }
}

/// [`head_axpy_wide`] of f32 values.
#[inline]
pub fn head_axpy(
    acc: &mut [f32],
    weights: &[f32],
    values: &[f32],
    row_len: usize,
    hd: usize,
    kv_at: &[usize],
) {
    head_axpy_wide(acc, weights, values, row_len, hd, kv_at)
}

/// [`head_axpy_wide`] of f16 values.
#[inline]
pub fn head_axpy_f16(
    acc: &mut [f32],
    weights: &[f32],
    values: &[f16],
    row_len: usize,
    hd: usize,
    kv_at: &[usize],
) {
    head_axpy_wide(acc, weights, values, row_len, hd, kv_at)
}

/// `max[i] = if x[i] > max[i] { x[i] } else { max[i] }` over the shorter length (the
/// running maximum of the softmax; a NaN never replaces the maximum).
#[inline]
pub fn max_assign(max: &mut [f32], x: &[f32]) {
    for (m, &x) in max.iter_mut().zip(x) {
        *m = if x > *m { x } else { *m };
    }
}

/// The softmax's terms in place: `scores[i] = exp(scores[i] − max[i])`, then
/// `sums[i] += scores[i]` (over the shortest of the three).
#[inline]
pub fn exp_sums(scores: &mut [f32], max: &[f32], sums: &mut [f32]) {
    for ((s, &m), sum) in scores.iter_mut().zip(max).zip(sums) {
        *s = exp(*s - m);
        *sum += *s;
    }
}
