//! The scalar reference of every primitive: it defines the order of operations (see the
//! crate docs) that the SIMD paths reproduce bit for bit, and it is the portable path.

use half::f16;

/// Accumulator lanes of a dot product.
pub const LANES: usize = 8;

/// The lanes' reduction: `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7))`.
#[inline(always)]
pub fn reduce(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `Σ a[i]·b[i]` over the shorter length: eight lanes over the whole multiple of eight,
/// reduced by [`reduce`], plus the remainder summed in order.
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

/// [`dot`] with `b` widened from f16.
#[inline]
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l].to_f32();
        }
    }
    let whole = n - n % LANES;
    let mut tail = 0f32;
    for i in whole..n {
        tail += a[i] * b[i].to_f32();
    }
    reduce(&acc) + tail
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

/// `acc[i] += w·x[i]` over the shorter length (the product rounded, then the sum).
#[inline]
pub fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a += w * x;
    }
}

/// [`axpy`] with `x` widened from f16.
#[inline]
pub fn axpy_f16(acc: &mut [f32], w: f32, x: &[f16]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a += w * x.to_f32();
    }
}

/// Four independent [`dot`]s (one per pair), each exactly `dot(a[i], b[i])`.
#[inline]
pub fn dot_pairs(a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
    [
        dot(a[0], b[0]),
        dot(a[1], b[1]),
        dot(a[2], b[2]),
        dot(a[3], b[3]),
    ]
}

/// Four independent [`dot_f16`]s (one per pair).
#[inline]
pub fn dot_pairs_f16(a: [&[f32]; 4], b: [&[f16]; 4]) -> [f32; 4] {
    [
        dot_f16(a[0], b[0]),
        dot_f16(a[1], b[1]),
        dot_f16(a[2], b[2]),
        dot_f16(a[3], b[3]),
    ]
}

/// [`axpy`] of one `x` into `weights.len()` rows of `acc`, row `i` starting at
/// `i * stride` and `x.len()` long: `acc[i·stride + e] += weights[i]·x[e]`.
#[inline]
pub fn axpy_rows(acc: &mut [f32], stride: usize, weights: &[f32], x: &[f32]) {
    for (i, &w) in weights.iter().enumerate() {
        axpy(&mut acc[i * stride..i * stride + x.len()], w, x);
    }
}

/// [`axpy_rows`] with `x` widened from f16.
#[inline]
pub fn axpy_rows_f16(acc: &mut [f32], stride: usize, weights: &[f32], x: &[f16]) {
    for (i, &w) in weights.iter().enumerate() {
        axpy_f16(&mut acc[i * stride..i * stride + x.len()], w, x);
    }
}
