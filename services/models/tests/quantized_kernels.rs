//! Our quantized kernels read every GGML format as GGML does and are as accurate as
//! candle's: on the same quantised weights, our dequantisation equals candle's bit for bit,
//! and both products' errors against the exact product of the dequantised weights agree
//! (both dominated by the activations' 8-bit quantisation; ours within 1.25× of candle's).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use llmos_cpu_kernels::{Q4Format, Q4Matrix, Q8Format, Q8Matrix};

/// (dequantised weights, `x · Wᵀ`) by our kernel for the GGML bytes of `q`.
fn ours(
    dtype: GgmlDType,
    q: &QTensor,
    x: &[f32],
    (rows, n, k): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let data = q.data().unwrap();
    let q8 = |format| Q8Matrix::from_ggml(format, &data, n, k).unwrap();
    let q4 = |format| Q4Matrix::from_ggml(format, &data, n, k).unwrap();
    match dtype {
        GgmlDType::Q8_0 => (
            q8(Q8Format::Q8_0).dequantize(),
            q8(Q8Format::Q8_0).matmul_t(x, rows),
        ),
        GgmlDType::Q6K => (
            q8(Q8Format::Q6K).dequantize(),
            q8(Q8Format::Q6K).matmul_t(x, rows),
        ),
        GgmlDType::Q4_0 => (
            q4(Q4Format::Q4_0).dequantize(),
            q4(Q4Format::Q4_0).matmul_t(x, rows),
        ),
        GgmlDType::Q4_1 => (
            q4(Q4Format::Q4_1).dequantize(),
            q4(Q4Format::Q4_1).matmul_t(x, rows),
        ),
        GgmlDType::Q4K => (
            q4(Q4Format::Q4K).dequantize(),
            q4(Q4Format::Q4K).matmul_t(x, rows),
        ),
        other => panic!("no kernel of ours for {other:?}"),
    }
}

#[test]
fn own_quantized_kernels_decode_as_ggml_and_err_no_more_than_candles() {
    let (n, k, rows) = (96usize, 512usize, 5usize);
    let mut state = 12345u64;
    let mut random = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    // Weights with an offset per row (so q4_1 and q4_K's minimums matter).
    let w: Vec<f32> = (0..n * k)
        .map(|i| random() * 0.1 + (i / k) as f32 * 0.001)
        .collect();
    let x: Vec<f32> = (0..rows * k).map(|_| random()).collect();
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q6K,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
    ] {
        let q = QTensor::quantize(
            &Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap(),
            dtype,
        )
        .unwrap();
        let dequantized = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (our_weights, our_product) = ours(dtype, &q, &x, (rows, n, k));
        let differing = our_weights
            .iter()
            .zip(&dequantized)
            // Equal values, bit for bit but for the sign of zero (q4_0's `d·q − 8d` is +0
            // where GGML's `(q − 8)·d` is −0 for negative `d`: the same in any sum).
            .filter(|(a, b)| a != b || a.is_nan() != b.is_nan())
            .count();
        assert_eq!(differing, 0, "{dtype:?}: weights decoded unlike candle");
        let theirs = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (mut err_ours, mut err_theirs, mut norm) = (0f64, 0f64, 0f64);
        for r in 0..rows {
            for c in 0..n {
                let exact: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(dequantized[c * k + i]))
                    .sum();
                err_ours += (f64::from(our_product[r * n + c]) - exact).powi(2);
                err_theirs += (f64::from(theirs[r * n + c]) - exact).powi(2);
                norm += exact * exact;
            }
        }
        let (ours, theirs) = ((err_ours / norm).sqrt(), (err_theirs / norm).sqrt());
        eprintln!("{dtype:?}: relative error ours {ours:.2e}, candle's {theirs:.2e}");
        assert!(ours < 1e-2, "{dtype:?}: relative error {ours}");
        assert!(
            ours < theirs * 1.25,
            "{dtype:?}: ours {ours} vs candle's {theirs}"
        );
    }
}
