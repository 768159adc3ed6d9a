//! Our q8_0 kernel is as accurate as candle's: on the same quantised weights, both
//! products' errors against the exact product of the dequantised weights agree.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

#[test]
fn own_q8_0_kernel_errs_no_more_than_candles() {
    let (n, k, rows) = (96usize, 256usize, 5usize);
    let mut state = 12345u64;
    let mut random = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let w: Vec<f32> = (0..n * k).map(|_| random() * 0.1).collect();
    let x: Vec<f32> = (0..rows * k).map(|_| random()).collect();
    let q = QTensor::quantize(
        &Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(),
        GgmlDType::Q8_0,
    )
    .unwrap();
    let dequantized = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ours = llmos_cpu_kernels::Q8_0Matrix::from_ggml(&q.data().unwrap(), n, k)
        .unwrap()
        .matmul_t(&x, rows);
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
            err_ours += (f64::from(ours[r * n + c]) - exact).powi(2);
            err_theirs += (f64::from(theirs[r * n + c]) - exact).powi(2);
            norm += exact * exact;
        }
    }
    let (ours, theirs) = ((err_ours / norm).sqrt(), (err_theirs / norm).sqrt());
    assert!(ours < 1e-2, "relative error {ours}");
    assert!(ours < theirs * 1.1, "ours {ours} vs candle's {theirs}");
}
