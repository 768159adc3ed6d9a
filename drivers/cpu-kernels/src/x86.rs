//! AVX2 + F16C + FMA primitives (x86-64): the reference's order of operations, eight lanes per
//! register — a product then a sum per lane (never fused), the lanes reduced by the
//! reference's own code, the remainder done by scalar code in order.

use std::arch::x86_64::{
    __m128i, __m256, _mm256_add_ps, _mm256_castps256_ps128, _mm256_cvtph_ps, _mm256_extractf128_ps,
    _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    _mm256_sub_ps, _mm_add_ps, _mm_cvtss_f32, _mm_hadd_ps, _mm_loadu_si128, _mm_prefetch,
    _mm_storeu_ps, _MM_HINT_T0,
};
use std::sync::OnceLock;

use half::{bf16, f16};

use crate::ops::{Ops, RunShape};
use crate::reference::LANES;

/// Bytes per cache line (what one prefetch brings in).
const CACHE_LINE: usize = 64;

/// Proof that this CPU has AVX2, F16C and FMA: the only way to get one is [`Avx2::get`], which
/// detects them at run time. Every `unsafe` call of a `#[target_feature]` function below
/// rests on holding this token.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2 {
    _detected: (),
}

impl Avx2 {
    /// The token, if this CPU has the features (and `LLMOS_CPU_KERNELS` does not force the
    /// portable path); detected once per process.
    pub(crate) fn get() -> Option<Avx2> {
        static DETECTED: OnceLock<Option<Avx2>> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let present = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("fma");
            (present && !crate::portable_forced()).then_some(Avx2 { _detected: () })
        })
    }
}

impl Ops for Avx2 {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot(a, b) }
    }

    #[inline(always)]
    fn dot_f16(self, a: &[f32], b: &[f16]) -> f32 {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot(a, b) }
    }

    #[inline(always)]
    fn dot4(self, rows: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot4(rows, w) }
    }

    #[inline(always)]
    fn dot_pairs(self, a: [&[f32]; 4], b: [&[f32]; 4]) -> [f32; 4] {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot_pairs(a, b) }
    }

    #[inline(always)]
    fn dot_pairs_f16(self, a: [&[f32]; 4], b: [&[f16]; 4]) -> [f32; 4] {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot_pairs(a, b) }
    }

    #[inline(always)]
    fn dot_pairs8(self, a: [&[f32]; 8], b: [&[f32]; 8]) -> [f32; 8] {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot_pairs8(a, b) }
    }

    #[inline(always)]
    fn dot_pairs8_f16(self, a: [&[f32]; 8], b: [&[f16]; 8]) -> [f32; 8] {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot_pairs8(a, b) }
    }

    #[inline(always)]
    fn head_dots(self, q: &[f32], keys: &[f32], shape: RunShape<'_>, out: &mut [f32]) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { head_dots(q, keys, shape, out) }
    }

    #[inline(always)]
    fn head_dots_f16(self, q: &[f32], keys: &[f16], shape: RunShape<'_>, out: &mut [f32]) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { head_dots(q, keys, shape, out) }
    }

    #[inline(always)]
    fn head_axpy(self, acc: &mut [f32], weights: &[f32], values: &[f32], shape: RunShape<'_>) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { head_axpy(acc, weights, values, shape) }
    }

    #[inline(always)]
    fn head_axpy_f16(self, acc: &mut [f32], weights: &[f32], values: &[f16], shape: RunShape<'_>) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { head_axpy(acc, weights, values, shape) }
    }

    #[inline(always)]
    fn max_assign(self, max: &mut [f32], x: &[f32]) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { max_assign(max, x) }
    }

    #[inline(always)]
    fn axpy_rows(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[f32]) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { axpy_rows(acc, stride, weights, x) }
    }

    #[inline(always)]
    fn axpy_rows_f16(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[f16]) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { axpy_rows(acc, stride, weights, x) }
    }

    #[inline(always)]
    fn dot_bf16(self, a: &[f32], b: &[bf16]) -> f32 {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot(a, b) }
    }

    #[inline(always)]
    fn dot_pairs_bf16(self, a: [&[f32]; 4], b: [&[bf16]; 4]) -> [f32; 4] {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { dot_pairs(a, b) }
    }

    #[inline(always)]
    fn axpy_rows_bf16(self, acc: &mut [f32], stride: usize, weights: &[f32], x: &[bf16]) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { axpy_rows(acc, stride, weights, x) }
    }

    #[inline(always)]
    fn exp_sums(self, scores: &mut [f32], max: &[f32], sums: &mut [f32]) {
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { exp_sums(scores, max, sums) }
    }

    #[inline(always)]
    fn prefetch<T>(self, data: &[T]) {
        prefetch(data)
    }

    #[inline(always)]
    fn vectorize<R>(self, f: impl FnOnce() -> R) -> R {
        #[target_feature(enable = "avx2,f16c,fma")]
        fn with_features<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
        unsafe { with_features(f) }
    }
}

/// Brings `data` towards the cache (a hint: no effect on any result).
#[inline(always)]
fn prefetch<T>(data: &[T]) {
    let bytes = std::mem::size_of_val(data);
    let base = data.as_ptr().cast::<i8>();
    let mut at = 0;
    while at < bytes {
        // SAFETY: a prefetch is a hint that never faults; the address is inside `data`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(at)) };
        at += CACHE_LINE;
    }
}

/// Rows of a run ahead of the one being read that are prefetched: K/V rows of wide heads
/// are a few KiB, in blocks scattered over the pool.
const PREFETCH_ROWS: usize = 2;

/// Prefetches row `p + PREFETCH_ROWS` of `run` (rows of `row_len`) when the run has it.
#[inline(always)]
fn prefetch_ahead<E>(run: &[E], p: usize, row_len: usize) {
    let at = (p + PREFETCH_ROWS) * row_len;
    if at + row_len <= run.len() {
        prefetch(&run[at..at + row_len]);
    }
}

/// [`reference::exp`] of eight lanes, each step the same single IEEE operation (the
/// vector min and max are the reference's comparisons, the rounding is to nearest even,
/// the multiply-adds fused).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn exp8(x: __m256) -> __m256 {
    use crate::reference::{EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO, LOG2_E};
    use std::arch::x86_64::{
        _mm256_add_epi32, _mm256_andnot_ps, _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cvtps_epi32,
        _mm256_fmadd_ps, _mm256_fnmadd_ps, _mm256_max_ps, _mm256_min_ps, _mm256_round_ps,
        _mm256_set1_epi32, _mm256_slli_epi32, _CMP_LT_OQ, _MM_FROUND_NO_EXC,
        _MM_FROUND_TO_NEAREST_INT,
    };
    let c = _mm256_min_ps(x, _mm256_set1_ps(EXP_HI));
    let c = _mm256_max_ps(c, _mm256_set1_ps(EXP_LO));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        c,
        _mm256_set1_ps(LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), c);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &coefficient in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(coefficient));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased));
    let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_LO));
    _mm256_andnot_ps(under, _mm256_mul_ps(y, scale))
}

/// [`reference::exp_sums`], eight lanes at a time; the remainder through a padded register
/// (the same lane-wise operations).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn exp_sums(scores: &mut [f32], max: &[f32], sums: &mut [f32]) {
    let n = scores.len().min(max.len()).min(sums.len());
    let step = |s: &mut [f32], m: &[f32], sum: &mut [f32]| {
        let e = exp8(_mm256_sub_ps(load(s, 0), load(m, 0)));
        let total = _mm256_add_ps(load(sum, 0), e);
        // SAFETY: `s` and `sum` are eight f32 each, written by unaligned stores.
        unsafe {
            _mm256_storeu_ps(s.as_mut_ptr(), e);
            _mm256_storeu_ps(sum.as_mut_ptr(), total);
        }
    };
    let whole = n - n % LANES;
    let mut at = 0;
    while at < whole {
        step(
            &mut scores[at..at + LANES],
            &max[at..at + LANES],
            &mut sums[at..at + LANES],
        );
        at += LANES;
    }
    if whole < n {
        let rest = n - whole;
        let (mut s, mut m, mut sum) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        s[..rest].copy_from_slice(&scores[whole..n]);
        m[..rest].copy_from_slice(&max[whole..n]);
        sum[..rest].copy_from_slice(&sums[whole..n]);
        step(&mut s, &m, &mut sum);
        scores[whole..n].copy_from_slice(&s[..rest]);
        sums[whole..n].copy_from_slice(&sum[..rest]);
    }
}

/// The eight lanes of `v`, reduced as the reference does, in registers: the halves' sum
/// gives `(l0+l4, l1+l5, l2+l6, l3+l7)`, and two horizontal adds the reference's pairs
/// of those, then their sum (each add the same single IEEE operation as the reference's).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn reduce_lanes(v: __m256) -> f32 {
    let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pairs = _mm_hadd_ps(halves, halves);
    _mm_cvtss_f32(_mm_hadd_ps(pairs, pairs))
}

/// [`reduce_lanes`] of four registers at once (one horizontal add serves two of them).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn reduce_lanes4(v: [__m256; 4]) -> [f32; 4] {
    let halves = v.map(|v| _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)));
    let pairs01 = _mm_hadd_ps(halves[0], halves[1]);
    let pairs23 = _mm_hadd_ps(halves[2], halves[3]);
    let mut out = [0f32; 4];
    // SAFETY: `out` holds exactly the four f32 one unaligned store writes.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_hadd_ps(pairs01, pairs23)) };
    out
}

/// Eight f32 of `s` from `at` (`at + 8 <= s.len()`, checked).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn load(s: &[f32], at: usize) -> __m256 {
    let chunk = &s[at..at + LANES];
    // SAFETY: `chunk` is eight initialised f32; the load is unaligned.
    unsafe { _mm256_loadu_ps(chunk.as_ptr()) }
}

/// Eight f16 of `s` from `at` widened to f32 (`at + 8 <= s.len()`, checked).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn load_f16(s: &[f16], at: usize) -> __m256 {
    let chunk = &s[at..at + LANES];
    // SAFETY: `chunk` is eight f16, i.e. sixteen initialised bytes; the load is unaligned.
    let raw = unsafe { _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>()) };
    _mm256_cvtph_ps(raw)
}

/// The reference's dot product of f32 `a` against `b` (f32 or f16, widened exactly).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn dot<E: Wide>(a: &[f32], b: &[E]) -> f32 {
    let n = a.len().min(b.len());
    let whole = n - n % LANES;
    let mut acc = _mm256_setzero_ps();
    let mut at = 0;
    while at < whole {
        acc = _mm256_add_ps(acc, _mm256_mul_ps(load(a, at), E::load8(b, at)));
        at += LANES;
    }
    let mut tail = 0f32;
    for i in whole..n {
        tail += a[i] * b[i].to_f32();
    }
    reduce_lanes(acc) + tail
}

#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn dot4(rows: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let n = w.len();
    let whole = n - n % LANES;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut at = 0;
    while at < whole {
        let wv = load(w, at);
        for (a, row) in acc.iter_mut().zip(rows) {
            *a = _mm256_add_ps(*a, _mm256_mul_ps(load(row, at), wv));
        }
        at += LANES;
    }
    let mut out = reduce_lanes4(acc);
    for (o, row) in out.iter_mut().zip(rows) {
        let mut tail = 0f32;
        for i in whole..n {
            tail += row[i] * w[i];
        }
        *o += tail;
    }
    out
}

/// An element type the primitives widen to f32 lanes. Private to this module: `load8` is
/// called only from `#[target_feature(enable = "avx2,f16c,fma")]` functions, themselves reached
/// only through an [`Avx2`] token.
trait Wide: Copy {
    fn to_f32(self) -> f32;
    /// Eight elements from `at`, widened.
    fn load8(s: &[Self], at: usize) -> __m256;
}

impl Wide for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn load8(s: &[f32], at: usize) -> __m256 {
        // SAFETY: reached only from AVX2 + F16C + FMA code (see the trait).
        unsafe { load(s, at) }
    }
}

impl Wide for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[inline(always)]
    fn load8(s: &[f16], at: usize) -> __m256 {
        // SAFETY: reached only from AVX2 + F16C + FMA code (see the trait).
        unsafe { load_f16(s, at) }
    }
}

impl Wide for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    #[inline(always)]
    fn load8(s: &[bf16], at: usize) -> __m256 {
        // SAFETY: reached only from AVX2 + F16C + FMA code (see the trait).
        unsafe { load_bf16(s, at) }
    }
}

/// Eight bf16 of `s` from `at` widened to f32 (`at + 8 <= s.len()`, checked): each is the
/// top half of its f32, so zero-extend and shift (exact).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn load_bf16(s: &[bf16], at: usize) -> __m256 {
    use std::arch::x86_64::{_mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_slli_epi32};
    let chunk = &s[at..at + LANES];
    // SAFETY: `chunk` is eight initialised bf16 (16 bytes); the load is unaligned.
    let raw = unsafe { _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
}

/// `N` independent dots (the pairs may differ in length), their chains interleaved: each
/// pair's lane accumulators over its whole multiple of eight, and its remainder summed in
/// order, as the reference computes them before the reduction.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn dot_lanes<E: Wide, const N: usize>(a: [&[f32]; N], b: [&[E]; N]) -> ([__m256; N], [f32; N]) {
    let n: [usize; N] = std::array::from_fn(|i| a[i].len().min(b[i].len()));
    let whole: [usize; N] = std::array::from_fn(|i| n[i] - n[i] % LANES);
    let common = whole.iter().copied().min().unwrap_or(0);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut at = 0;
    while at < common {
        for i in 0..N {
            acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(load(a[i], at), E::load8(b[i], at)));
        }
        at += LANES;
    }
    let mut tails = [0f32; N];
    for i in 0..N {
        let mut lane_at = common;
        while lane_at < whole[i] {
            acc[i] = _mm256_add_ps(
                acc[i],
                _mm256_mul_ps(load(a[i], lane_at), E::load8(b[i], lane_at)),
            );
            lane_at += LANES;
        }
        for e in whole[i]..n[i] {
            tails[i] += a[i][e] * b[i][e].to_f32();
        }
    }
    (acc, tails)
}

/// Four independent dots, their chains interleaved (the pairs may differ in length).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn dot_pairs<E: Wide>(a: [&[f32]; 4], b: [&[E]; 4]) -> [f32; 4] {
    let (acc, tails) = dot_lanes(a, b);
    let mut out = reduce_lanes4(acc);
    for (o, tail) in out.iter_mut().zip(tails) {
        *o += tail;
    }
    out
}

/// [`reduce_lanes`] of eight registers at once, into one register (lane `i` is register
/// `i`'s sum): the halves of registers `i` and `i + 4` are brought side by side and added
/// (`l + l'` of each), then three horizontal adds form the reference's pairs and their
/// sum, each the same single IEEE operation as the reference's.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn reduce_lanes8(v: [__m256; 8]) -> __m256 {
    use std::arch::x86_64::{_mm256_hadd_ps, _mm256_permute2f128_ps};
    let halves = |a: __m256, b: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    };
    let (h04, h15) = (halves(v[0], v[4]), halves(v[1], v[5]));
    let (h26, h37) = (halves(v[2], v[6]), halves(v[3], v[7]));
    _mm256_hadd_ps(_mm256_hadd_ps(h04, h15), _mm256_hadd_ps(h26, h37))
}

/// Eight independent dots (the pairs may differ in length), their chains interleaved and
/// their lanes reduced together.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn dot_pairs8<E: Wide>(a: [&[f32]; 8], b: [&[E]; 8]) -> [f32; 8] {
    let (acc, tails) = dot_lanes(a, b);
    // The remainders are added to every sum, as the reference does (`+ 0.0` included:
    // it turns a sum of -0 into +0).
    let sums = _mm256_add_ps(reduce_lanes8(acc), load(&tails, 0));
    let mut out = [0f32; 8];
    // SAFETY: `out` holds exactly the eight f32 one unaligned store writes.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) };
    out
}

/// [`reference::head_dots_wide`]. Heads of one register: eight at a time, the query
/// held in registers for the whole run, their lanes reduced together by
/// [`reduce_lanes8`] (plus the reference's empty remainder). Wider heads (where the
/// query would not fit in registers): row by row, four heads at a time by [`dot_pairs`]
/// then one by one, the next rows prefetched.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn head_dots<E: Wide>(q: &[f32], keys: &[E], shape: RunShape<'_>, out: &mut [f32]) {
    let RunShape { row_len, hd, kv_at } = shape;
    let n_heads = kv_at.len();
    let rows = out.len() / n_heads.max(1);
    let key = |p: usize| &keys[p * row_len..(p + 1) * row_len];
    let mut h = 0;
    if hd == LANES {
        while h + 8 <= n_heads {
            let k_at: [usize; 8] = std::array::from_fn(|i| kv_at[h + i]);
            let q_head: [__m256; 8] = std::array::from_fn(|i| load(q, (h + i) * hd));
            for p in 0..rows {
                let key = key(p);
                let acc: [__m256; 8] = std::array::from_fn(|i| {
                    _mm256_add_ps(
                        _mm256_setzero_ps(),
                        _mm256_mul_ps(q_head[i], E::load8(key, k_at[i])),
                    )
                });
                let sums = _mm256_add_ps(reduce_lanes8(acc), _mm256_setzero_ps());
                let o = &mut out[p * n_heads + h..p * n_heads + h + 8];
                // SAFETY: `o` is eight f32 of `out`, written by one unaligned store.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr(), sums) };
            }
            h += 8;
        }
    }
    if h == n_heads {
        return;
    }
    for p in 0..rows {
        prefetch_ahead(keys, p, row_len);
        let key = key(p);
        let mut hh = h;
        while hh + 4 <= n_heads {
            let qs: [&[f32]; 4] = std::array::from_fn(|i| &q[(hh + i) * hd..(hh + i + 1) * hd]);
            let ks: [&[E]; 4] = std::array::from_fn(|i| &key[kv_at[hh + i]..kv_at[hh + i] + hd]);
            out[p * n_heads + hh..p * n_heads + hh + 4].copy_from_slice(&dot_pairs(qs, ks));
            hh += 4;
        }
        for (hh, &at) in kv_at.iter().enumerate().skip(hh) {
            out[p * n_heads + hh] = dot(&q[hh * hd..(hh + 1) * hd], &key[at..at + hd]);
        }
    }
}

/// [`reference::head_axpy_wide`]. Heads of one register: eight heads at a time (then
/// one), their accumulators kept in registers for the whole run while the rows' values
/// are multiplied by their weights and added in row order. Wider heads: row by row,
/// each head by [`axpy_rows`], the next rows prefetched.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn head_axpy<E: Wide>(acc: &mut [f32], weights: &[f32], values: &[E], shape: RunShape<'_>) {
    let RunShape { row_len, hd, kv_at } = shape;
    let n_heads = kv_at.len();
    let rows = weights.len() / n_heads.max(1);
    let value = |p: usize| &values[p * row_len..(p + 1) * row_len];
    if hd != LANES {
        for p in 0..rows {
            prefetch_ahead(values, p, row_len);
            let (value, w) = (value(p), &weights[p * n_heads..(p + 1) * n_heads]);
            for (h, (&w, &at)) in w.iter().zip(kv_at).enumerate() {
                axpy_rows(
                    &mut acc[h * hd..(h + 1) * hd],
                    hd,
                    &[w],
                    &value[at..at + hd],
                );
            }
        }
        return;
    }
    let mut h = 0;
    while h < n_heads {
        let count = if h + 8 <= n_heads { 8 } else { 1 };
        let mut sums = [_mm256_setzero_ps(); 8];
        for (i, sum) in sums[..count].iter_mut().enumerate() {
            *sum = load(acc, (h + i) * LANES);
        }
        for p in 0..rows {
            let (value, w) = (value(p), &weights[p * n_heads + h..p * n_heads + h + count]);
            for i in 0..count {
                let product = _mm256_mul_ps(_mm256_set1_ps(w[i]), E::load8(value, kv_at[h + i]));
                sums[i] = _mm256_add_ps(sums[i], product);
            }
        }
        for (i, sum) in sums[..count].iter().enumerate() {
            let out = &mut acc[(h + i) * LANES..(h + i + 1) * LANES];
            // SAFETY: `out` is eight f32 of `acc`, written by one unaligned store.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *sum) };
        }
        h += count;
    }
}

/// [`reference::max_assign`]: `max_ps(x, m)` is `x > m ? x : m`, the reference's
/// comparison; the remainder through a padded register.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn max_assign(max: &mut [f32], x: &[f32]) {
    use std::arch::x86_64::_mm256_max_ps;
    let n = max.len().min(x.len());
    let whole = n - n % LANES;
    let mut at = 0;
    while at < whole {
        let m = _mm256_max_ps(load(x, at), load(max, at));
        let out = &mut max[at..at + LANES];
        // SAFETY: `out` is eight f32 of `max`, written by one unaligned store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), m) };
        at += LANES;
    }
    for i in whole..n {
        max[i] = if x[i] > max[i] { x[i] } else { max[i] };
    }
}

/// `acc[i·stride + e] += weights[i]·x[e]`, each chunk of `x` loaded (and widened) once.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn axpy_rows<E: Wide>(acc: &mut [f32], stride: usize, weights: &[f32], x: &[E]) {
    let n = x.len();
    let whole = n - n % LANES;
    let mut at = 0;
    while at < whole {
        let xv = E::load8(x, at);
        for (i, &w) in weights.iter().enumerate() {
            let base = i * stride + at;
            let sum = _mm256_add_ps(load(acc, base), _mm256_mul_ps(_mm256_set1_ps(w), xv));
            let out = &mut acc[base..base + LANES];
            // SAFETY: `out` is eight f32 of `acc`, written by one unaligned store.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        }
        at += LANES;
    }
    for (i, &w) in weights.iter().enumerate() {
        for e in whole..n {
            acc[i * stride + e] += w * x[e].to_f32();
        }
    }
}

/// Proof that this CPU has AVX-512 (F, BW) and AVX-512 VNNI, detected at run time (and
/// `LLMOS_CPU_KERNELS` does not force the portable path).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Vnni {
    _detected: (),
}

impl Avx512Vnni {
    pub(crate) fn get() -> Option<Avx512Vnni> {
        static DETECTED: OnceLock<Option<Avx512Vnni>> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let present = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni");
            (present && !crate::portable_forced()).then_some(Avx512Vnni { _detected: () })
        })
    }

    /// Tile `t` of `matrix` (16 columns) for rows `first..first + count` of `xq`
    /// (`count` ≤ 8), into `out` (`[count][16]`).
    pub(crate) fn q8_0_tile(
        self,
        matrix: &crate::q8::Q8Matrix,
        xq: &crate::q8::QuantRows,
        first: usize,
        count: usize,
        t: usize,
        out: &mut [f32],
    ) {
        // SAFETY: an `Avx512Vnni` token exists only where the features were detected.
        unsafe {
            if matrix.sub_blocks() == 1 {
                by_row_count!(count, q8_rows, [1], (matrix, xq, first, t, out))
            } else {
                by_row_count!(count, q8_rows, [2], (matrix, xq, first, t, out))
            }
        }
    }

    /// [`Avx512Vnni::q8_0_tile`] for a 4-bit matrix.
    pub(crate) fn q4_tile(
        self,
        matrix: &crate::q4::Q4Matrix,
        xq: &crate::q8::QuantRows,
        first: usize,
        count: usize,
        t: usize,
        out: &mut [f32],
    ) {
        // SAFETY: an `Avx512Vnni` token exists only where the features were detected.
        unsafe { by_row_count!(count, q4_rows, (matrix, xq, first, t, out)) }
    }
}

/// Calls `kernel::<count, extra…>(args)` for a run-time `count` of 1..=8 rows (the
/// const-generic register block of a kernel).
macro_rules! by_row_count {
    ($count:expr, $kernel:ident, ($($arg:expr),*)) => {
        by_row_count!($count, $kernel, [], ($($arg),*))
    };
    ($count:expr, $kernel:ident, [$($extra:expr),*], ($($arg:expr),*)) => {
        match $count {
            8 => $kernel::<8 $(, $extra)*>($($arg),*),
            7 => $kernel::<7 $(, $extra)*>($($arg),*),
            6 => $kernel::<6 $(, $extra)*>($($arg),*),
            5 => $kernel::<5 $(, $extra)*>($($arg),*),
            4 => $kernel::<4 $(, $extra)*>($($arg),*),
            3 => $kernel::<3 $(, $extra)*>($($arg),*),
            2 => $kernel::<2 $(, $extra)*>($($arg),*),
            1 => $kernel::<1 $(, $extra)*>($($arg),*),
            _ => unreachable!("at most ROW_BLOCK rows per call"),
        }
    };
}
use by_row_count;

/// `R` rows from `first` against tile `t` of a 4-bit matrix: per block, four 64-byte loads
/// of nibbles, each split by a mask and a shift into two groups of four weights of the 16
/// columns, multiplied by the rows' signed activations (VNNI: unsigned × signed) into exact
/// integer sums; then per lane `acc + isum·(d·d_x)`, then `+ m·(d_x·s_x)`, as the
/// reference does.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q4_rows<const R: usize>(
    matrix: &crate::q4::Q4Matrix,
    xq: &crate::q8::QuantRows,
    first: usize,
    t: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::{
        __m512i, _mm512_add_ps, _mm512_and_si512, _mm512_cvtepi32_ps, _mm512_dpbusd_epi32,
        _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mul_ps, _mm512_set1_epi32, _mm512_set1_epi8,
        _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512, _mm512_srli_epi16,
        _mm512_storeu_ps,
    };
    let k = xq.k;
    let blocks = matrix.blocks();
    let rows: [&[i8]; R] =
        std::array::from_fn(|i| &xq.signed[(first + i) * k..(first + i + 1) * k]);
    let low_nibble = _mm512_set1_epi8(15);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        let (scales, mins, nibbles) = matrix.tile_block(t, b);
        let nibbles = &nibbles[..256];
        let mut isum = [_mm512_setzero_si512(); R];
        for p in 0..4 {
            // SAFETY: `nibbles` is 256 initialised bytes and `p < 4`; the load is unaligned.
            let v = unsafe { _mm512_loadu_si512(nibbles.as_ptr().add(p * 64).cast::<__m512i>()) };
            let lo = _mm512_and_si512(v, low_nibble);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low_nibble);
            for (sum, row) in isum.iter_mut().zip(rows) {
                let row = &row[b * 32 + p * 8..b * 32 + p * 8 + 8];
                // SAFETY: `row` is 8 initialised bytes: two unaligned reads of four.
                let (first4, second4) = unsafe {
                    (
                        row.as_ptr().cast::<i32>().read_unaligned(),
                        row.as_ptr().add(4).cast::<i32>().read_unaligned(),
                    )
                };
                let first4 = _mm512_set1_epi32(first4);
                let second4 = _mm512_set1_epi32(second4);
                *sum = _mm512_dpbusd_epi32(*sum, lo, first4);
                *sum = _mm512_dpbusd_epi32(*sum, hi, second4);
            }
        }
        // SAFETY: `scales` and `mins` are 16 initialised f32 each.
        let (d, m) = unsafe {
            (
                _mm512_loadu_ps(scales.as_ptr()),
                _mm512_loadu_ps(mins.as_ptr()),
            )
        };
        for (i, (a, sum)) in acc.iter_mut().zip(isum).enumerate() {
            let at = (first + i) * blocks + b;
            let dx = xq.scales[at];
            let offset_term = dx * xq.sums[at] as f32;
            let exact = _mm512_cvtepi32_ps(sum);
            let with_scale = _mm512_add_ps(
                *a,
                _mm512_mul_ps(exact, _mm512_mul_ps(d, _mm512_set1_ps(dx))),
            );
            *a = _mm512_add_ps(with_scale, _mm512_mul_ps(m, _mm512_set1_ps(offset_term)));
        }
    }
    for (i, a) in acc.into_iter().enumerate() {
        let o = &mut out[i * 16..i * 16 + 16];
        // SAFETY: `o` is 16 f32 of `out`, written by one unaligned store.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
    }
}

/// `R` rows from `first` against the 16 columns of tile `t`: per sub-block (`SUB` per block
/// of 32), VNNI dot products per row accumulate the exact integer sums of the 16 columns,
/// then per lane `acc + (isum as f32) · (d_w · d_x)`, as the reference does.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q8_rows<const R: usize, const SUB: usize>(
    matrix: &crate::q8::Q8Matrix,
    xq: &crate::q8::QuantRows,
    first: usize,
    t: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::{
        __m512i, _mm512_add_ps, _mm512_cvtepi32_ps, _mm512_dpbusd_epi32, _mm512_loadu_ps,
        _mm512_loadu_si512, _mm512_mul_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps,
        _mm512_setzero_si512, _mm512_storeu_ps, _mm512_sub_epi32,
    };
    let k = xq.k;
    let blocks = matrix.blocks();
    let groups = 8 / SUB;
    // Each row's quantised activations (32 per block, read as eight groups of four).
    let rows: [&[u8]; R] =
        std::array::from_fn(|i| &xq.unsigned[(first + i) * k..(first + i + 1) * k]);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        let (scales, offsets, weights) = matrix.tile_block(t, b);
        let (scales, offsets, weights) =
            (&scales[..16 * SUB], &offsets[..16 * SUB], &weights[..512]);
        for s in 0..SUB {
            let mut isum = [_mm512_setzero_si512(); R];
            for g in s * groups..(s + 1) * groups {
                // SAFETY: `weights` is 512 initialised bytes and `g < 8`; the load is unaligned.
                let wv =
                    unsafe { _mm512_loadu_si512(weights.as_ptr().add(g * 64).cast::<__m512i>()) };
                for (sum, row) in isum.iter_mut().zip(rows) {
                    let row = &row[b * 32..b * 32 + 32];
                    // SAFETY: `row` is 32 initialised bytes and `g < 8`; the read is unaligned.
                    let four = unsafe { row.as_ptr().add(g * 4).cast::<i32>().read_unaligned() };
                    *sum = _mm512_dpbusd_epi32(*sum, _mm512_set1_epi32(four), wv);
                }
            }
            // SAFETY: `scales` and `offsets` hold 16 f32 / i32 per sub-block and `s < SUB`.
            let (dw, off) = unsafe {
                (
                    _mm512_loadu_ps(scales.as_ptr().add(16 * s)),
                    _mm512_loadu_si512(offsets.as_ptr().add(16 * s).cast::<__m512i>()),
                )
            };
            for (i, (a, sum)) in acc.iter_mut().zip(isum).enumerate() {
                let dx = xq.scales[(first + i) * blocks + b];
                let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, off));
                *a = _mm512_add_ps(
                    *a,
                    _mm512_mul_ps(exact, _mm512_mul_ps(dw, _mm512_set1_ps(dx))),
                );
            }
        }
    }
    for (i, a) in acc.into_iter().enumerate() {
        let o = &mut out[i * 16..i * 16 + 16];
        // SAFETY: `o` is 16 f32 of `out`, written by one unaligned store.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
    }
}

impl Avx512Vnni {
    /// [`crate::quantize_row`] of `x`, stored offset by +128 (`unsigned`) with the block
    /// scales in `scales`; bit-identical to it for finite inputs.
    pub(crate) fn quantize_row_unsigned(self, x: &[f32], unsigned: &mut [u8], scales: &mut [f32]) {
        // SAFETY: an `Avx512Vnni` token exists only where the features were detected.
        unsafe { quantize_row_unsigned(x, unsigned, scales) }
    }
}

/// Per block of 32: the exact maximum magnitude, the scale and its reciprocal in scalar
/// code as the reference computes them, then `x · (1/d)` rounded to nearest even by the
/// conversion (the default MXCSR mode), clamped to ±127 and offset by +128.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn quantize_row_unsigned(x: &[f32], unsigned: &mut [u8], scales: &mut [f32]) {
    use std::arch::x86_64::{
        __m128i, _mm512_abs_ps, _mm512_add_epi32, _mm512_cvtepi32_epi8, _mm512_cvtps_epi32,
        _mm512_loadu_ps, _mm512_max_epi32, _mm512_max_ps, _mm512_min_epi32, _mm512_mul_ps,
        _mm512_reduce_max_ps, _mm512_set1_epi32, _mm512_set1_ps, _mm_storeu_si128,
    };
    for ((block, out), scale) in x
        .chunks_exact(32)
        .zip(unsigned.chunks_exact_mut(32))
        .zip(scales.iter_mut())
    {
        // SAFETY: `block` is 32 initialised f32: two unaligned loads of 16.
        let (x0, x1) = unsafe {
            (
                _mm512_loadu_ps(block.as_ptr()),
                _mm512_loadu_ps(block.as_ptr().add(16)),
            )
        };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        let d = amax / 127.0;
        let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
        *scale = d;
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        for (half, v) in [x0, x1].into_iter().enumerate() {
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inverse)));
            let q = _mm512_add_epi32(
                _mm512_min_epi32(_mm512_max_epi32(q, lo), hi),
                _mm512_set1_epi32(128),
            );
            let bytes = _mm512_cvtepi32_epi8(q);
            let dst = &mut out[half * 16..half * 16 + 16];
            // SAFETY: `dst` is 16 bytes of `out`, written by one unaligned store.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast::<__m128i>(), bytes) };
        }
    }
}

impl Avx2 {
    /// [`Avx512Vnni::q8_0_tile`] for CPUs with AVX2 but not AVX-512 VNNI: the same integer
    /// sums (by `maddubs` on `|w|` and the activations carrying `w`'s sign), the same
    /// float operations per output element.
    pub(crate) fn q8_0_tile(
        self,
        matrix: &crate::q8::Q8Matrix,
        xq: &crate::q8::QuantRows,
        first: usize,
        count: usize,
        t: usize,
        out: &mut [f32],
    ) {
        let mut r = 0;
        while r < count {
            let n = (count - r).min(4);
            let o = &mut out[r * 16..(r + n) * 16];
            // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
            unsafe {
                if matrix.sub_blocks() == 1 {
                    by_row_count!(n, q8_rows_avx2, [1], (matrix, xq, first + r, t, o))
                } else {
                    by_row_count!(n, q8_rows_avx2, [2], (matrix, xq, first + r, t, o))
                }
            }
            r += n;
        }
    }

    /// [`Avx512Vnni::q4_tile`] for CPUs with AVX2 but not AVX-512 VNNI: `maddubs` of the
    /// unsigned nibbles by the signed activations, the same integer sums and float
    /// operations.
    pub(crate) fn q4_tile(
        self,
        matrix: &crate::q4::Q4Matrix,
        xq: &crate::q8::QuantRows,
        first: usize,
        count: usize,
        t: usize,
        out: &mut [f32],
    ) {
        let mut r = 0;
        while r < count {
            let n = (count - r).min(4);
            let o = &mut out[r * 16..(r + n) * 16];
            // SAFETY: an `Avx2` token exists only where AVX2, F16C and FMA were detected.
            unsafe { by_row_count!(n, q4_rows_avx2, (matrix, xq, first + r, t, o)) }
            r += n;
        }
    }
}

/// `R` rows from `first` against tile `t` of a 4-bit matrix, eight columns at a time.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn q4_rows_avx2<const R: usize>(
    matrix: &crate::q4::Q4Matrix,
    xq: &crate::q8::QuantRows,
    first: usize,
    t: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi16, _mm256_add_epi32, _mm256_and_si256, _mm256_cvtepi32_ps,
        _mm256_loadu_si256, _mm256_madd_epi16, _mm256_maddubs_epi16, _mm256_set1_epi16,
        _mm256_set1_epi32, _mm256_set1_epi8, _mm256_setzero_si256, _mm256_srli_epi16,
    };
    let k = xq.k;
    let blocks = matrix.blocks();
    let rows: [&[i8]; R] =
        std::array::from_fn(|i| &xq.signed[(first + i) * k..(first + i + 1) * k]);
    let ones = _mm256_set1_epi16(1);
    let low_nibble = _mm256_set1_epi8(15);
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let (scales, mins, nibbles) = matrix.tile_block(t, b);
            let nibbles = &nibbles[..256];
            let mut isum = [_mm256_setzero_si256(); R];
            for p in 0..4 {
                let at = p * 64 + half * 32;
                // SAFETY: `nibbles` is 256 initialised bytes and `at + 32 <= 256`; unaligned.
                let v = unsafe { _mm256_loadu_si256(nibbles.as_ptr().add(at).cast::<__m256i>()) };
                let lo = _mm256_and_si256(v, low_nibble);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low_nibble);
                for (sum, row) in isum.iter_mut().zip(rows) {
                    let row = &row[b * 32 + p * 8..b * 32 + p * 8 + 8];
                    // SAFETY: `row` is 8 initialised bytes: two unaligned reads of four.
                    let (first4, second4) = unsafe {
                        (
                            row.as_ptr().cast::<i32>().read_unaligned(),
                            row.as_ptr().add(4).cast::<i32>().read_unaligned(),
                        )
                    };
                    let first4 = _mm256_set1_epi32(first4);
                    let second4 = _mm256_set1_epi32(second4);
                    // |15 · 127| · 4 fits an i16: the pairs of both groups add exactly.
                    let pairs = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, first4),
                        _mm256_maddubs_epi16(hi, second4),
                    );
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                }
            }
            let (d, m) = (load(scales, half * 8), load(mins, half * 8));
            for (i, (a, sum)) in acc.iter_mut().zip(isum).enumerate() {
                let at = (first + i) * blocks + b;
                let dx = xq.scales[at];
                let offset_term = dx * xq.sums[at] as f32;
                let exact = _mm256_cvtepi32_ps(sum);
                let with_scale = _mm256_add_ps(
                    *a,
                    _mm256_mul_ps(exact, _mm256_mul_ps(d, _mm256_set1_ps(dx))),
                );
                *a = _mm256_add_ps(with_scale, _mm256_mul_ps(m, _mm256_set1_ps(offset_term)));
            }
        }
        for (i, a) in acc.into_iter().enumerate() {
            let o = &mut out[i * 16 + half * 8..i * 16 + half * 8 + 8];
            // SAFETY: `o` is 8 f32 of `out`, written by one unaligned store.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
        }
    }
}

/// `R` rows from `first` against tile `t`, eight columns (one half of the tile) at a time.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
fn q8_rows_avx2<const R: usize, const SUB: usize>(
    matrix: &crate::q8::Q8Matrix,
    xq: &crate::q8::QuantRows,
    first: usize,
    t: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_cvtepi32_ps, _mm256_loadu_si256, _mm256_madd_epi16,
        _mm256_maddubs_epi16, _mm256_set1_epi16, _mm256_set1_epi32, _mm256_setzero_si256,
        _mm256_sign_epi8,
    };
    let k = xq.k;
    let blocks = matrix.blocks();
    let groups = 8 / SUB;
    let rows: [&[u8]; R] =
        std::array::from_fn(|i| &xq.unsigned[(first + i) * k..(first + i + 1) * k]);
    let ones = _mm256_set1_epi16(1);
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            let (scales, _, weights) = matrix.tile_block(t, b);
            let weights = &weights[..512];
            for s in 0..SUB {
                let mut isum = [_mm256_setzero_si256(); R];
                for g in s * groups..(s + 1) * groups {
                    let at = g * 64 + half * 32;
                    // SAFETY: `weights` is 512 initialised bytes and `at + 32 <= 512`; unaligned.
                    let w =
                        unsafe { _mm256_loadu_si256(weights.as_ptr().add(at).cast::<__m256i>()) };
                    let magnitude = _mm256_sign_epi8(w, w);
                    for (sum, row) in isum.iter_mut().zip(rows) {
                        let row = &row[b * 32..b * 32 + 32];
                        // SAFETY: `row` is 32 initialised bytes and `g < 8`; unaligned read.
                        let four =
                            unsafe { row.as_ptr().add(g * 4).cast::<u32>().read_unaligned() };
                        // Back from offset-by-128 to signed, then carrying the weights' signs.
                        let signed = _mm256_set1_epi32((four ^ 0x8080_8080) as i32);
                        let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(signed, w));
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                    }
                }
                let dw = load(scales, s * 16 + half * 8);
                for (i, (a, sum)) in acc.iter_mut().zip(isum).enumerate() {
                    let dx = xq.scales[(first + i) * blocks + b];
                    let exact = _mm256_cvtepi32_ps(sum);
                    *a = _mm256_add_ps(
                        *a,
                        _mm256_mul_ps(exact, _mm256_mul_ps(dw, _mm256_set1_ps(dx))),
                    );
                }
            }
        }
        for (i, a) in acc.into_iter().enumerate() {
            let o = &mut out[i * 16 + half * 8..i * 16 + half * 8 + 8];
            // SAFETY: `o` is 8 f32 of `out`, written by one unaligned store.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
        }
    }
}
