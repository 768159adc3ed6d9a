//! Property tests: every SIMD path bit for bit against the scalar reference on random
//! shapes with ragged tails, and the kernels' batch and chunk invariance.

use half::f16;
use proptest::prelude::*;

use crate::attention::attention_with;
use crate::dense::matmul_t_with;
use crate::ops::Elem;
use crate::ops::{Ops, Portable};
use crate::reference;
use crate::{AttentionShape, Rows};

/// Values of mixed magnitudes (products and sums round differently in another order).
fn values(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![-1.0f32..1.0, -1.0e4f32..1.0e4, -1.0e-4f32..1.0e-4],
        len,
    )
}

fn halves(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

/// [`matmul_t_with`] into a new buffer.
fn matmul<O: Ops, E: Elem>(ops: O, x: &[f32], rows: usize, w: &[E], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows * n];
    matmul_t_with(ops, x, rows, w, n, &mut out);
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every instruction set this CPU has (the reference always).
fn isas() -> Vec<Isas> {
    #[allow(unused_mut)]
    let mut isas = vec![Isas::Portable(Portable)];
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = crate::x86::Avx2::get() {
        isas.push(Isas::Avx2(avx2));
    }
    isas
}

/// One instruction set, as a value the checks can match on.
#[derive(Clone, Copy)]
enum Isas {
    Portable(Portable),
    #[cfg(target_arch = "x86_64")]
    Avx2(crate::x86::Avx2),
}

macro_rules! with_isa {
    ($isa:expr, |$ops:ident| $body:expr) => {
        match $isa {
            Isas::Portable($ops) => $body,
            #[cfg(target_arch = "x86_64")]
            Isas::Avx2($ops) => $body,
        }
    };
}

fn attention_case(shape: AttentionShape, len: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rand_like::Lcg;
    let row = shape.n_kv_heads * shape.head_dim;
    let width = shape.n_heads * shape.head_dim;
    let mut lcg = Lcg(seed);
    let keys = (0..len * row).map(|_| lcg.next()).collect();
    let values = (0..len * row).map(|_| lcg.next()).collect();
    let q = (0..len * width).map(|_| lcg.next() * 0.3).collect();
    (keys, values, q)
}

/// A tiny generator for the attention cases (proptest draws the shapes and the seed).
mod rand_like {
    pub struct Lcg(pub u64);
    impl Lcg {
        pub fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }
}

/// `data`'s rows `0..upto` as runs of `run` rows, f32 or f16.
fn runs_of<'a>(
    f32_data: &'a [f32],
    f16_data: &'a [f16],
    row: usize,
    upto: usize,
    run: usize,
    as_f16: bool,
) -> Vec<Rows<'a>> {
    (0..upto.div_ceil(run))
        .map(|i| {
            let range = i * run * row..upto.min((i + 1) * run) * row;
            if as_f16 {
                Rows::F16(&f16_data[range])
            } else {
                Rows::F32(&f32_data[range])
            }
        })
        .collect()
}

/// Arguments of the softmax's exponential: the working range, its edges, beyond them.
fn exp_arguments(len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            -20.0f32..0.0,
            -120.0f32..100.0,
            prop::sample::select(vec![
                0.0,
                -0.0,
                88.0,
                88.5,
                -87.0,
                -87.000_01,
                -86.999_99,
                -1.0e30,
                1.0e30,
                f32::NEG_INFINITY,
                f32::INFINITY,
            ]),
        ],
        len,
    )
}

/// Units in the last place between `got` and the f64 exponential of `x`, rounded to f32.
fn exp_ulps(x: f32, got: f32) -> u32 {
    let want = (f64::from(x)).exp() as f32;
    (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn exp_is_within_two_ulp_over_its_range_and_zero_below_it() {
    let mut worst = (0u32, 0f32);
    let mut x = reference::EXP_LO;
    while x <= reference::EXP_HI {
        let ulps = exp_ulps(x, reference::exp(x));
        if ulps > worst.0 {
            worst = (ulps, x);
        }
        x += 1.0e-3;
    }
    assert!(worst.0 <= 2, "exp({}) is {} ulp off", worst.1, worst.0);
    assert_eq!(reference::exp(0.0), 1.0);
    assert_eq!(reference::exp(-87.5), 0.0);
    assert_eq!(reference::exp(f32::NEG_INFINITY), 0.0);
    assert!(reference::exp(1.0e30).is_finite());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn exp_sums_are_the_reference_bit_for_bit(
        (scores, max, sums) in (0usize..40).prop_flat_map(|n| (exp_arguments(n), exp_arguments(n), values(n))),
    ) {
        let (mut expected, mut expected_sums) = (scores.clone(), sums.clone());
        reference::exp_sums(&mut expected, &max, &mut expected_sums);
        for (i, (&s, &m)) in scores.iter().zip(&max).enumerate() {
            prop_assert_eq!(expected[i].to_bits(), reference::exp(s - m).to_bits());
        }
        for isa in isas() { with_isa!(isa, |ops| {
            let (mut got, mut got_sums) = (scores.clone(), sums.clone());
            ops.exp_sums(&mut got, &max, &mut got_sums);
            prop_assert_eq!(bits(&got), bits(&expected));
            prop_assert_eq!(bits(&got_sums), bits(&expected_sums));
        }) }
    }

    #[test]
    fn dot_pairs8_and_max_are_the_reference_bit_for_bit(
        a in prop::collection::vec(values(40), 8), b in prop::collection::vec(values(40), 8),
        lens in prop::array::uniform8(0usize..41), extra in 0usize..3,
        (max, x) in (0usize..30).prop_flat_map(|n| (exp_arguments(n), exp_arguments(n))),
    ) {
        let qs: [&[f32]; 8] = std::array::from_fn(|i| &a[i][..lens[i]]);
        // Keys may be longer than their queries (the dot takes the shorter).
        let ks: [&[f32]; 8] = std::array::from_fn(|i| &b[i][..(lens[i] + extra).min(40)]);
        let kh: Vec<Vec<f16>> = ks.iter().map(|k| halves(k)).collect();
        let kh: [&[f16]; 8] = std::array::from_fn(|i| &kh[i][..]);
        let expected = reference::dot_pairs8(qs, ks);
        let expected_f16 = reference::dot_pairs8_f16(qs, kh);
        for i in 0..8 {
            prop_assert_eq!(expected[i].to_bits(), reference::dot(qs[i], ks[i]).to_bits());
        }
        let mut expected_max = max.clone();
        reference::max_assign(&mut expected_max, &x);
        for isa in isas() { with_isa!(isa, |ops| {
            prop_assert_eq!(bits(&ops.dot_pairs8(qs, ks)), bits(&expected));
            prop_assert_eq!(bits(&ops.dot_pairs8_f16(qs, kh)), bits(&expected_f16));
            let mut got = max.clone();
            ops.max_assign(&mut got, &x);
            prop_assert_eq!(bits(&got), bits(&expected_max));
        }) }
    }

    #[test]
    fn head_dots_and_head_axpy_are_the_reference_bit_for_bit_for_any_width(
        n_kv_heads in 1usize..4, group in 1usize..5, hd in prop_oneof![Just(8usize), Just(16), Just(64), 1usize..20],
        rows in 0usize..20, seed in any::<u64>(),
    ) {
        let shape = AttentionShape { n_heads: n_kv_heads * group, n_kv_heads, head_dim: hd };
        let (keys, values, q) = attention_case(shape, rows.max(1), seed);
        let row_len = n_kv_heads * hd;
        let n_heads = shape.n_heads;
        let kv_at: Vec<usize> = (0..n_heads).map(|h| (h / group) * hd).collect();
        let (keys, values) = (&keys[..rows * row_len], &values[..rows * row_len]);
        let (keys_h, values_h) = (halves(keys), halves(values));
        let q = &q[..n_heads * hd];
        let run = crate::ops::RunShape { row_len, hd, kv_at: &kv_at };
        let mut expected = vec![0f32; rows * n_heads];
        reference::head_dots(q, keys, row_len, hd, &kv_at, &mut expected);
        let mut expected_h = vec![0f32; rows * n_heads];
        reference::head_dots_f16(q, &keys_h, row_len, hd, &kv_at, &mut expected_h);
        let weights: Vec<f32> = expected.iter().map(|s| s * 0.25).collect();
        let start: Vec<f32> = (0..n_heads * hd).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut expected_acc = start.clone();
        reference::head_axpy(&mut expected_acc, &weights, values, row_len, hd, &kv_at);
        let mut expected_acc_h = start.clone();
        reference::head_axpy_f16(&mut expected_acc_h, &weights, &values_h, row_len, hd, &kv_at);
        for isa in isas() { with_isa!(isa, |ops| {
            let mut got = vec![f32::NAN; rows * n_heads];
            ops.head_dots(q, keys, run, &mut got);
            prop_assert_eq!(bits(&got), bits(&expected));
            ops.head_dots_f16(q, &keys_h, run, &mut got);
            prop_assert_eq!(bits(&got), bits(&expected_h));
            let mut acc = start.clone();
            ops.head_axpy(&mut acc, &weights, values, run);
            prop_assert_eq!(bits(&acc), bits(&expected_acc));
            let mut acc = start.clone();
            ops.head_axpy_f16(&mut acc, &weights, &values_h, run);
            prop_assert_eq!(bits(&acc), bits(&expected_acc_h));
        }) }
    }

    #[test]
    fn dot_is_the_reference_bit_for_bit(
        (a, b) in (0usize..300, 0usize..9).prop_flat_map(|(n, extra)| (values(n + extra), values(n))),
    ) {
        let bh = halves(&b);
        let expected = reference::dot(&a, &b).to_bits();
        let expected_f16 = reference::dot_f16(&a, &bh).to_bits();
        // The f16 path equals the f32 one on the widened values.
        let widened: Vec<f32> = bh.iter().map(|x| x.to_f32()).collect();
        prop_assert_eq!(expected_f16, reference::dot(&a, &widened).to_bits());
        for isa in isas() { with_isa!(isa, |ops| {
            assert_eq!(ops.dot(&a, &b).to_bits(), expected);
            assert_eq!(ops.dot_f16(&a, &bh).to_bits(), expected_f16);
        }) }
    }

    #[test]
    fn dot4_dot_pairs_and_axpy_rows_are_the_reference_bit_for_bit(
        a in values(77), b in values(77), c in values(77), d in values(77),
        w in values(77), n in 0usize..78, lens in prop::array::uniform4(0usize..78),
        weights in prop::collection::vec(-3.0f32..3.0, 0..9), stride_extra in 0usize..5,
    ) {
        let wn = &w[..n];
        let rows = [&a[..], &b[..], &c[..], &d[..]];
        let expected: Vec<u32> = rows.iter().map(|r| reference::dot(r, wn).to_bits()).collect();
        prop_assert_eq!(bits(&reference::dot4(rows, wn)), expected.clone());
        // Pairs of different lengths, f32 and f16.
        let pa: [&[f32]; 4] = std::array::from_fn(|i| &rows[i][..lens[i]]);
        let pb: [&[f32]; 4] = std::array::from_fn(|i| rows[(i + 1) % 4]);
        let pb_h: Vec<Vec<f16>> = pb.iter().map(|x| halves(x)).collect();
        let pb_h: [&[f16]; 4] = std::array::from_fn(|i| &pb_h[i][..]);
        let pairs_ref: Vec<u32> = (0..4).map(|i| reference::dot(pa[i], pb[i]).to_bits()).collect();
        let pairs_f16_ref: Vec<u32> = (0..4).map(|i| reference::dot_f16(pa[i], pb_h[i]).to_bits()).collect();
        // Rows of `stride` apart, each `n` long, one weight per row.
        let stride = n + stride_extra;
        let acc0: Vec<f32> = (0..weights.len() * stride).map(|i| a[i % 77]).collect();
        let wh = halves(wn);
        let mut rows_ref = acc0.clone();
        for (i, &wi) in weights.iter().enumerate() {
            reference::axpy(&mut rows_ref[i * stride..i * stride + n], wi, wn);
        }
        let mut rows_f16_ref = acc0.clone();
        for (i, &wi) in weights.iter().enumerate() {
            reference::axpy_f16(&mut rows_f16_ref[i * stride..i * stride + n], wi, &wh);
        }
        for isa in isas() { with_isa!(isa, |ops| {
            assert_eq!(bits(&ops.dot4(rows, wn)), expected);
            assert_eq!(bits(&ops.dot_pairs(pa, pb)), pairs_ref);
            assert_eq!(bits(&ops.dot_pairs_f16(pa, pb_h)), pairs_f16_ref);
            let mut acc = acc0.clone();
            ops.axpy_rows(&mut acc, stride, &weights, wn);
            assert_eq!(bits(&acc), bits(&rows_ref));
            let mut acc = acc0.clone();
            ops.axpy_rows_f16(&mut acc, stride, &weights, &wh);
            assert_eq!(bits(&acc), bits(&rows_f16_ref));
        }) }
    }

    #[test]
    fn matmul_rows_are_their_dots_whatever_the_batch(
        k in 1usize..90, n in 1usize..40, rows in 1usize..11, seed in any::<u64>(),
    ) {
        let mut lcg = rand_like::Lcg(seed);
        let x: Vec<f32> = (0..rows * k).map(|_| lcg.next()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg.next()).collect();
        let expected: Vec<u32> = (0..rows)
            .flat_map(|r| (0..n).map(move |c| (r, c)))
            .map(|(r, c)| reference::dot(&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]).to_bits())
            .collect();
        let wb: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let expected_bf16: Vec<u32> = (0..rows)
            .flat_map(|r| (0..n).map(move |c| (r, c)))
            .map(|(r, c)| reference::dot_bf16(&x[r * k..(r + 1) * k], &wb[c * k..(c + 1) * k]).to_bits())
            .collect();
        let wh = halves(&w);
        let expected_f16: Vec<u32> = (0..rows)
            .flat_map(|r| (0..n).map(move |c| (r, c)))
            .map(|(r, c)| reference::dot_f16(&x[r * k..(r + 1) * k], &wh[c * k..(c + 1) * k]).to_bits())
            .collect();
        for isa in isas() { with_isa!(isa, |ops| {
            assert_eq!(bits(&matmul(ops, &x, rows, &w, n)), expected);
            assert_eq!(bits(&matmul(ops, &x, rows, &wh, n)), expected_f16);
            assert_eq!(bits(&matmul(ops, &x, rows, &wb, n)), expected_bf16);
            // Each row alone gives the same bits as in the batch.
            for r in 0..rows {
                let alone = matmul(ops, &x[r * k..(r + 1) * k], 1, &w, n);
                assert_eq!(bits(&alone), expected[r * n..(r + 1) * n].to_vec());
                let alone = matmul(ops, &x[r * k..(r + 1) * k], 1, &wh, n);
                assert_eq!(bits(&alone), expected_f16[r * n..(r + 1) * n].to_vec());
                let alone = matmul(ops, &x[r * k..(r + 1) * k], 1, &wb, n);
                assert_eq!(bits(&alone), expected_bf16[r * n..(r + 1) * n].to_vec());
            }
        }) }
    }

    #[test]
    fn attention_is_the_reference_whatever_the_chunks_runs_and_isa(
        n_kv_heads in 1usize..5, group in 1usize..5, head_dim in prop_oneof![Just(8usize), Just(64), 1usize..20],
        len in 1usize..40, chunk in 1usize..17, run in 1usize..9, as_f16 in any::<bool>(), seed in any::<u64>(),
    ) {
        let shape = AttentionShape { n_heads: n_kv_heads * group, n_kv_heads, head_dim };
        let (keys, vals, q) = attention_case(shape, len, seed);
        let (keys_h, vals_h) = (halves(&keys), halves(&vals));
        let row = n_kv_heads * head_dim;
        let width = shape.n_heads * head_dim;
        let runs = |upto: usize, run: usize| -> Vec<(Rows<'_>, Rows<'_>)> {
            runs_of(&keys, &keys_h, row, upto, run, as_f16)
                .into_iter()
                .zip(runs_of(&vals, &vals_h, row, upto, run, as_f16))
                .collect()
        };
        // Every row alone on the reference, the keys in one run.
        let mut alone = vec![0f32; len * width];
        for p in 0..len {
            attention_with(Portable, &q[p * width..(p + 1) * width], runs(p + 1, len).as_slice(), row, p, shape,
                &mut alone[p * width..(p + 1) * width]);
        }
        for isa in isas() { with_isa!(isa, |ops| {
            let mut start = 0;
            while start < len {
                let count = chunk.min(len - start);
                let mut out = vec![0f32; count * width];
                attention_with(ops, &q[start * width..(start + count) * width], runs(start + count, run).as_slice(),
                    row, start, shape, &mut out);
                assert_eq!(bits(&out), bits(&alone[start * width..(start + count) * width]));
                start += count;
            }
        }) }
    }
}

#[test]
fn the_public_entry_points_use_the_detected_isa() {
    // Whatever was detected, the public functions agree with the reference.
    let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
    assert_eq!(
        crate::dot(&a, &b).to_bits(),
        reference::dot(&a, &b).to_bits()
    );
    let m = crate::matmul_t(&a[..36], 4, &b[..27], 3);
    assert_eq!(m.len(), 12);
    assert_eq!(
        m[5].to_bits(),
        reference::dot(&a[9..18], &b[18..27]).to_bits()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("fma")
        && !crate::portable_forced()
    {
        assert_eq!(crate::isa(), crate::Isa::Avx2);
    }
}

/// Random GGML q8_0 blocks for `n` rows of `k`: f16 scales of mixed magnitude, int8
/// weights over the whole range.
fn ggml_q8_0(n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut lcg = rand_like::Lcg(seed);
    let mut bytes = Vec::new();
    for _ in 0..n * k / crate::Q8_0_BLOCK {
        let scale = f16::from_f32(lcg.next() * 0.05);
        bytes.extend_from_slice(&scale.to_le_bytes());
        for _ in 0..crate::Q8_0_BLOCK {
            bytes.push(((lcg.next() * 127.0).round() as i8) as u8);
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn q8_0_matmul_is_the_reference_bit_for_bit_whatever_the_batch(
        n in 1usize..40, blocks in 1usize..9, rows in prop_oneof![1usize..10, 30usize..45], seed in any::<u64>(),
    ) {
        let k = blocks * crate::Q8_0_BLOCK;
        let raw = ggml_q8_0(n, k, seed);
        let m = crate::Q8Matrix::from_ggml(crate::Q8Format::Q8_0, &raw, n, k).unwrap();
        let mut lcg = rand_like::Lcg(seed ^ 0x5555);
        let x: Vec<f32> = (0..rows * k).map(|i| lcg.next() * if i % 7 == 0 { 30.0 } else { 1.0 }).collect();
        // The reference, straight from the GGML bytes (not the packed layout).
        let mut direct = vec![0f32; rows * n];
        for r in 0..rows {
            let (xq, dx) = crate::quantize_row(&x[r * k..(r + 1) * k]);
            for c in 0..n {
                let mut acc = 0f32;
                for b in 0..blocks {
                    let at = (c * blocks + b) * 34;
                    let dw = f16::from_le_bytes([raw[at], raw[at + 1]]).to_f32();
                    let isum: i32 = (0..32)
                        .map(|e| i32::from(raw[at + 2 + e] as i8) * i32::from(xq[b * 32 + e]))
                        .sum();
                    acc += isum as f32 * (dw * dx[b]);
                }
                direct[r * n + c] = acc;
            }
        }
        prop_assert_eq!(bits(&m.matmul_t_reference(&x, rows)), bits(&direct));
        let fast = m.matmul_t(&x, rows);
        prop_assert_eq!(bits(&fast), bits(&direct));
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = crate::x86::Avx2::get() {
            let mut avx2_out = vec![f32::NAN; rows * n];
            m.matmul_t_avx2(avx2, &x, rows, &mut avx2_out);
            prop_assert_eq!(bits(&avx2_out), bits(&direct));
        }
        for r in 0..rows {
            let alone = m.matmul_t(&x[r * k..(r + 1) * k], 1);
            prop_assert_eq!(bits(&alone), bits(&direct[r * n..(r + 1) * n]));
        }
    }
}

#[test]
fn q8_0_activation_quantisation_is_exact_to_its_definition() {
    let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
    let (q, d) = crate::quantize_row(&x);
    assert_eq!(d[0], ((0.0f32 - 20.0) * 0.37).abs() / 127.0);
    assert!(q.iter().all(|&v| (-127..=127).contains(&v)));
    assert_eq!(q[0], -127, "the block's largest magnitude maps to ±127");
    #[cfg(target_arch = "x86_64")]
    if let Some(vnni) = crate::x86::Avx512Vnni::get() {
        // The SIMD quantisation is the definition's, bit for bit, on awkward values too.
        let mut lcg = rand_like::Lcg(77);
        for round in 0..200 {
            let x: Vec<f32> = (0..96)
                .map(|i| match (round + i) % 9 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => lcg.next() * 1e-30,
                    3 => (i as f32 - 48.0) * 0.5,
                    _ => lcg.next() * (round as f32 + 1.0),
                })
                .collect();
            let (q, d) = crate::quantize_row(&x);
            let (mut u, mut s) = (vec![0u8; 96], vec![0f32; 3]);
            vnni.quantize_row_unsigned(&x, &mut u, &mut s);
            assert_eq!(bits(&s), bits(&d));
            let back: Vec<i8> = u.iter().map(|&u| (i16::from(u) - 128) as i8).collect();
            assert_eq!(back, q);
        }
    }
    let zeros = crate::quantize_row(&[0.0; 32]);
    assert_eq!((zeros.0, zeros.1), (vec![0i8; 32], vec![0.0]));
}

#[test]
fn q8_0_matrix_rejects_malformed_sizes() {
    assert!(crate::Q8Matrix::from_ggml(crate::Q8Format::Q8_0, &[0; 34], 1, 33).is_err());
    assert!(crate::Q8Matrix::from_ggml(crate::Q8Format::Q8_0, &[0; 33], 1, 32).is_err());
    assert!(crate::Q8Matrix::from_ggml(crate::Q8Format::Q8_0, &[0; 68], 1, 32).is_err());
    assert!(crate::Q8Matrix::from_ggml(crate::Q8Format::Q8_0, &[0; 68], 2, 32).is_ok());
}

/// Random GGML blocks of a 4-bit `format` for `n` rows of `k`: f16 scales and offsets of
/// mixed magnitude and sign, every nibble and 6-bit scale value.
fn ggml_q4(format: crate::Q4Format, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut lcg = rand_like::Lcg(seed);
    let mut byte = move || ((lcg.next() + 1.0) * 127.99) as u8;
    let half = |scale: f32, b: &mut dyn FnMut() -> u8| {
        let v = (f32::from(b()) - 128.0) / 128.0 * scale;
        f16::from_f32(v).to_le_bytes()
    };
    let mut bytes = Vec::new();
    let (elements, header) = match format {
        crate::Q4Format::Q4_0 => (32, 2),
        crate::Q4Format::Q4_1 => (32, 4),
        crate::Q4Format::Q4K => (256, 16),
    };
    for _ in 0..n * k / elements {
        bytes.extend_from_slice(&half(0.05, &mut byte));
        if header >= 4 {
            bytes.extend_from_slice(&half(0.5, &mut byte));
        }
        for _ in 4..header {
            bytes.push(byte()); // q4_K's 12 bytes of packed 6-bit scales and mins
        }
        for _ in 0..elements / 2 {
            bytes.push(byte());
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn q4_matmul_is_the_reference_bit_for_bit_whatever_the_batch(
        format in prop_oneof![Just(crate::Q4Format::Q4_0), Just(crate::Q4Format::Q4_1), Just(crate::Q4Format::Q4K)],
        n in 1usize..40, blocks in 1usize..4, rows in prop_oneof![1usize..10, 30usize..45], seed in any::<u64>(),
    ) {
        let k = blocks * if format == crate::Q4Format::Q4K { 256 } else { 64 };
        let raw = ggml_q4(format, n, k, seed);
        let m = crate::Q4Matrix::from_ggml(format, &raw, n, k).unwrap();
        let mut lcg = rand_like::Lcg(seed ^ 0x5555);
        let x: Vec<f32> = (0..rows * k).map(|i| lcg.next() * if i % 7 == 0 { 30.0 } else { 1.0 }).collect();
        check_packed(&m, &x, (rows, n, k))?;
    }

    #[test]
    fn q6_k_matmul_is_the_reference_bit_for_bit_whatever_the_batch(
        n in 1usize..40, blocks in 1usize..3, rows in prop_oneof![1usize..10, 30usize..45], seed in any::<u64>(),
    ) {
        let k = blocks * 256;
        let mut lcg = rand_like::Lcg(seed);
        let mut raw = Vec::new();
        for _ in 0..n * blocks {
            raw.extend((0..208).map(|_| ((lcg.next() + 1.0) * 127.99) as u8));
            raw.extend_from_slice(&f16::from_f32(lcg.next() * 0.01).to_le_bytes());
        }
        let m = crate::Q8Matrix::from_ggml(crate::Q8Format::Q6K, &raw, n, k).unwrap();
        let x: Vec<f32> = (0..rows * k).map(|i| lcg.next() * if i % 7 == 0 { 30.0 } else { 1.0 }).collect();
        check_packed(&m, &x, (rows, n, k))?;
    }
}

/// A packed quantized matrix as the tests see it.
trait Packed {
    fn fast(&self, x: &[f32], rows: usize) -> Vec<f32>;
    #[cfg(target_arch = "x86_64")]
    fn avx2(&self, avx2: crate::x86::Avx2, x: &[f32], rows: usize) -> Vec<f32>;
    fn reference(&self, x: &[f32], rows: usize) -> Vec<f32>;
    fn weights(&self) -> Vec<f32>;
}

macro_rules! packed {
    ($t:ty) => {
        impl Packed for $t {
            fn fast(&self, x: &[f32], rows: usize) -> Vec<f32> {
                self.matmul_t(x, rows)
            }
            #[cfg(target_arch = "x86_64")]
            fn avx2(&self, avx2: crate::x86::Avx2, x: &[f32], rows: usize) -> Vec<f32> {
                let mut out = vec![f32::NAN; rows * self.n()];
                self.matmul_t_avx2(avx2, x, rows, &mut out);
                out
            }
            fn reference(&self, x: &[f32], rows: usize) -> Vec<f32> {
                self.matmul_t_reference(x, rows)
            }
            fn weights(&self) -> Vec<f32> {
                self.dequantize()
            }
        }
    };
}
packed!(crate::Q4Matrix);
packed!(crate::Q8Matrix);

/// Every path of `m` (the best SIMD, AVX2, each row alone) equals its scalar reference bit
/// for bit, and the reference is the dequantised product up to activation rounding.
fn check_packed(
    m: &impl Packed,
    x: &[f32],
    (rows, n, k): (usize, usize, usize),
) -> Result<(), TestCaseError> {
    let reference = m.reference(x, rows);
    prop_assert_eq!(bits(&m.fast(x, rows)), bits(&reference));
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = crate::x86::Avx2::get() {
        prop_assert_eq!(bits(&m.avx2(avx2, x, rows)), bits(&reference));
    }
    for r in (0..rows).step_by(3) {
        let alone = m.fast(&x[r * k..(r + 1) * k], 1);
        prop_assert_eq!(bits(&alone), bits(&reference[r * n..(r + 1) * n]));
    }
    check_against_dequantized(&reference, x, &m.weights(), (rows, n, k))
}

/// `reference` (`x · wᵀ` through quantised activations) is the exact product with the
/// dequantised weights `w`, up to the activations' quantisation: each activation off by at
/// most half its block's step.
fn check_against_dequantized(
    reference: &[f32],
    x: &[f32],
    w: &[f32],
    (rows, n, k): (usize, usize, usize),
) -> Result<(), TestCaseError> {
    for r in 0..rows.min(3) {
        let xr = &x[r * k..(r + 1) * k];
        let (_, dx) = crate::quantize_row(xr);
        for c in 0..n {
            let wc = &w[c * k..(c + 1) * k];
            let exact: f64 = (0..k).map(|i| f64::from(xr[i]) * f64::from(wc[i])).sum();
            let scale: f64 = (0..k)
                .map(|i| (f64::from(xr[i]) * f64::from(wc[i])).abs())
                .sum();
            let rounding: f64 = (0..k)
                .map(|i| f64::from(wc[i]).abs() * f64::from(dx[i / 32]) * 0.5)
                .sum();
            let got = f64::from(reference[r * n + c]);
            prop_assert!(
                (got - exact).abs() <= rounding * 1.001 + 1e-5 * scale + 1e-6,
                "{got} vs {exact} (bound {rounding})"
            );
        }
    }
    Ok(())
}

#[test]
fn q4_matrix_rejects_malformed_sizes() {
    use crate::Q4Format::{Q4K, Q4_0, Q4_1};
    assert!(crate::Q4Matrix::from_ggml(Q4_0, &[0; 18], 1, 33).is_err());
    assert!(crate::Q4Matrix::from_ggml(Q4_0, &[0; 17], 1, 32).is_err());
    assert!(crate::Q4Matrix::from_ggml(Q4_1, &[0; 40], 2, 32).is_ok());
    assert!(crate::Q4Matrix::from_ggml(Q4K, &[0; 144], 1, 128).is_err());
    assert!(crate::Q4Matrix::from_ggml(Q4K, &[0; 144], 1, 256).is_ok());
    assert!(crate::Q4Matrix::from_ggml(Q4K, &[0; 144], usize::MAX, 256).is_err());
    assert!(crate::Q8Matrix::from_ggml(crate::Q8Format::Q6K, &[0; 210], 1, 128).is_err());
    assert!(crate::Q8Matrix::from_ggml(crate::Q8Format::Q6K, &[0; 210], 1, 256).is_ok());
    assert!(crate::Q8Matrix::from_ggml(crate::Q8Format::Q6K, &[0; 209], 1, 256).is_err());
}
