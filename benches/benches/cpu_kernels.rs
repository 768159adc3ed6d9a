//! CPU kernel micro-bench: GB/s and GFLOP/s of each hot-path kernel of the forward
//! (`llmos-cpu-kernels`: dense f32 and f16 matmul, our q8_0 / q6_K / q4_0 / q4_K matmuls,
//! attention over f16 and f32 K/V; candle's quantized matmuls beside ours for
//! comparison), printed against this machine's read bandwidth measured in the same run. Shapes are the 134M
//! bench model's (dim 768, 12 heads of 64). `cargo bench -p llmos-benches --bench cpu_kernels`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use llmos_cpu_kernels::{
    attention, f16, matmul_t, matmul_t_f16, AttentionShape, Q4Format, Q4Matrix, Q8Format, Q8Matrix,
    Rows,
};

const THREADS: usize = 2;
const DIM: usize = 768;
const HEADS: usize = 12;
const HEAD_DIM: usize = 64;
/// Each measurement repeats its kernel until this much time has passed, then takes the
/// median of the rounds.
const BUDGET: Duration = Duration::from_millis(600);

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Median seconds of one call of `f`.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut rounds = Vec::new();
    let started = Instant::now();
    while started.elapsed() < BUDGET || rounds.len() < 5 {
        let t = Instant::now();
        f();
        rounds.push(t.elapsed().as_secs_f64());
    }
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

struct Line {
    name: String,
    seconds: f64,
    bytes: f64,
    flops: f64,
}

fn print(line: &Line, bandwidth: f64) {
    let gbs = line.bytes / line.seconds / 1e9;
    println!(
        "  {:<44} {:>9.3} ms  {:>7.2} GB/s ({:>3.0}% of read bandwidth)  {:>7.2} GFLOP/s",
        line.name,
        line.seconds * 1e3,
        gbs,
        100.0 * gbs / bandwidth,
        line.flops / line.seconds / 1e9
    );
}

/// Read bandwidth: a sum over a buffer far larger than the caches, both cores at once.
fn read_bandwidth() -> f64 {
    let data = random(64 << 20, 1); // 256 MiB
    let chunk = data.len() / THREADS;
    let seconds = time(|| {
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut acc = [0f32; 16];
                        for c in part.chunks_exact(16) {
                            for (a, x) in acc.iter_mut().zip(c) {
                                *a += x;
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        black_box(total);
    });
    (data.len() * 4) as f64 / seconds / 1e9
}

fn dense(rows: usize, n: usize) -> Line {
    let x = random(rows * DIM, 2);
    let w = random(n * DIM, 3);
    let seconds = time(|| {
        black_box(matmul_t(&x, rows, &w, n));
    });
    Line {
        name: format!("dense f32 matmul {rows}×{DIM} · ({n}×{DIM})ᵀ"),
        seconds,
        bytes: ((n * DIM + rows * DIM + rows * n) * 4) as f64,
        flops: (2 * rows * n * DIM) as f64,
    }
}

fn quantized(dtype: GgmlDType, rows: usize, n: usize) -> Line {
    let dev = Device::Cpu;
    let w = Tensor::from_vec(random(n * DIM, 4), (n, DIM), &dev).expect("weights");
    let q = QTensor::quantize(&w, dtype).expect("quantize");
    let weight_bytes = q.storage_size_in_bytes();
    let mm = QMatMul::from_qtensor(q).expect("qmatmul");
    let x = Tensor::from_vec(random(rows * DIM, 5), (rows, DIM), &dev).expect("x");
    let seconds = time(|| {
        black_box(mm.forward(&x).expect("forward"));
    });
    Line {
        name: format!("candle {dtype:?} matmul {rows}×{DIM} · ({n}×{DIM})ᵀ"),
        seconds,
        bytes: (weight_bytes + (rows * DIM + rows * n) * 4) as f64,
        flops: (2 * rows * n * DIM) as f64,
    }
}

/// `x · Wᵀ` for `rows` rows of `x`.
type Matmul = dyn Fn(&[f32], usize) -> Vec<f32>;

/// Our own kernel for GGML `dtype` (q8_0, q6_K: `Q8Matrix`; q4_0, q4_1, q4_K: `Q4Matrix`).
fn own_quantized(dtype: GgmlDType, rows: usize, n: usize) -> Line {
    let dev = Device::Cpu;
    let w = Tensor::from_vec(random(n * DIM, 4), (n, DIM), &dev).expect("weights");
    let q = QTensor::quantize(&w, dtype).expect("quantize");
    let raw = q.data().expect("GGML bytes");
    let x = random(rows * DIM, 5);
    let matmul: Box<Matmul> = match dtype {
        GgmlDType::Q8_0 | GgmlDType::Q6K => {
            let format = if dtype == GgmlDType::Q8_0 {
                Q8Format::Q8_0
            } else {
                Q8Format::Q6K
            };
            let m = Q8Matrix::from_ggml(format, &raw, n, DIM).expect("repack");
            Box::new(move |x, rows| m.matmul_t(x, rows))
        }
        _ => {
            let format = match dtype {
                GgmlDType::Q4_0 => Q4Format::Q4_0,
                GgmlDType::Q4_1 => Q4Format::Q4_1,
                _ => Q4Format::Q4K,
            };
            let m = Q4Matrix::from_ggml(format, &raw, n, DIM).expect("repack");
            Box::new(move |x, rows| m.matmul_t(x, rows))
        }
    };
    let seconds = time(|| {
        black_box(matmul(&x, rows));
    });
    Line {
        name: format!("own {dtype:?} matmul {rows}×{DIM} · ({n}×{DIM})ᵀ"),
        seconds,
        bytes: (raw.len() + (rows * DIM + rows * n) * 4) as f64,
        flops: (2 * rows * n * DIM) as f64,
    }
}

fn dense_f16(rows: usize, n: usize) -> Line {
    let x = random(rows * DIM, 2);
    let w: Vec<f16> = random(n * DIM, 3).into_iter().map(f16::from_f32).collect();
    let seconds = time(|| {
        black_box(matmul_t_f16(&x, rows, &w, n));
    });
    Line {
        name: format!("dense f16 matmul {rows}×{DIM} · ({n}×{DIM})ᵀ"),
        seconds,
        bytes: (n * DIM * 2 + (rows * DIM + rows * n) * 4) as f64,
        flops: (2 * rows * n * DIM) as f64,
    }
}

/// `seqs` sequences of `context` positions, `rows` new rows each (decode: 1), K/V in
/// blocks of 16 positions.
fn attend(seqs: usize, context: usize, rows: usize, half: bool) -> Line {
    let shape = AttentionShape {
        n_heads: HEADS,
        n_kv_heads: HEADS,
        head_dim: HEAD_DIM,
    };
    attend_shaped(shape, seqs, context, rows, half)
}

fn attend_shaped(
    shape: AttentionShape,
    seqs: usize,
    context: usize,
    rows: usize,
    half: bool,
) -> Line {
    let row = shape.n_kv_heads * shape.head_dim;
    let q_row = shape.n_heads * shape.head_dim;
    // Each sequence its own K/V, as in a server (not one cache-resident copy).
    let keys: Vec<Vec<f32>> = (0..seqs)
        .map(|i| random(context * row, 6 + 2 * i as u64))
        .collect();
    let values: Vec<Vec<f32>> = (0..seqs)
        .map(|i| random(context * row, 7 + 2 * i as u64))
        .collect();
    let widen = |v: &Vec<f32>| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<f16>>();
    let keys_h: Vec<Vec<f16>> = keys.iter().map(widen).collect();
    let values_h: Vec<Vec<f16>> = values.iter().map(widen).collect();
    let block = 16 * row;
    let runs: Vec<Vec<(Rows<'_>, Rows<'_>)>> = (0..seqs)
        .map(|s| {
            if half {
                keys_h[s]
                    .chunks(block)
                    .zip(values_h[s].chunks(block))
                    .map(|(k, v)| (Rows::F16(k), Rows::F16(v)))
                    .collect()
            } else {
                keys[s]
                    .chunks(block)
                    .zip(values[s].chunks(block))
                    .map(|(k, v)| (Rows::F32(k), Rows::F32(v)))
                    .collect()
            }
        })
        .collect();
    let q = random(rows * q_row, 8);
    let mut out = vec![0f32; rows * q_row];
    let start = context - rows;
    let seconds = time(|| {
        for runs in &runs {
            attention(&q, runs, row, start, shape, &mut out);
        }
        black_box(&out);
    });
    let element = if half { 2 } else { 4 };
    // Every key and value row up to the last position is read once per tile of 8 rows.
    let tiles = rows.div_ceil(8);
    let kv_bytes = seqs * tiles * 2 * context * row * element;
    // Scores and weighted values: 2 flops per element of each, over the causal triangle.
    let pairs: usize = (0..rows).map(|t| start + t + 1).sum();
    Line {
        name: format!(
            "attention {} K/V, {seqs} seq × {rows} row(s) at {context}{}",
            if half { "f16" } else { "f32" },
            if shape.head_dim == HEAD_DIM {
                String::new()
            } else {
                format!(
                    " ({}/{} heads of {})",
                    shape.n_heads, shape.n_kv_heads, shape.head_dim
                )
            }
        ),
        seconds,
        bytes: kv_bytes as f64,
        flops: (seqs * pairs * q_row * 4) as f64,
    }
}

fn main() {
    std::env::set_var("RAYON_NUM_THREADS", THREADS.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build_global();
    println!(
        "CPU kernels ({} threads, instruction set {})",
        THREADS,
        llmos_cpu_kernels::isa().name()
    );
    let bandwidth = read_bandwidth();
    println!("  measured read bandwidth (2 threads summing 256 MiB): {bandwidth:.2} GB/s");
    // `BENCH_ONLY=attention` (a substring of the names) runs only those kernels.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    type Kernel = (&'static str, Box<dyn Fn() -> Line + Sync>);
    let kernels: Vec<Kernel> = vec![
        ("dense 1", Box::new(|| dense(1, DIM))),
        ("dense 16", Box::new(|| dense(16, DIM))),
        ("dense 512", Box::new(|| dense(512, DIM))),
        ("q8_0 1", Box::new(|| quantized(GgmlDType::Q8_0, 1, DIM))),
        ("q8_0 16", Box::new(|| quantized(GgmlDType::Q8_0, 16, DIM))),
        (
            "q8_0 512",
            Box::new(|| quantized(GgmlDType::Q8_0, 512, DIM)),
        ),
        ("dense f16 1", Box::new(|| dense_f16(1, DIM))),
        ("dense f16 16", Box::new(|| dense_f16(16, DIM))),
        (
            "own q8_0 1",
            Box::new(|| own_quantized(GgmlDType::Q8_0, 1, DIM)),
        ),
        (
            "own q8_0 16",
            Box::new(|| own_quantized(GgmlDType::Q8_0, 16, DIM)),
        ),
        (
            "own q8_0 512",
            Box::new(|| own_quantized(GgmlDType::Q8_0, 512, DIM)),
        ),
        ("q4_k 1", Box::new(|| quantized(GgmlDType::Q4K, 1, DIM))),
        ("q4_k 16", Box::new(|| quantized(GgmlDType::Q4K, 16, DIM))),
        ("q4_k 512", Box::new(|| quantized(GgmlDType::Q4K, 512, DIM))),
        (
            "own q4_k 1",
            Box::new(|| own_quantized(GgmlDType::Q4K, 1, DIM)),
        ),
        (
            "own q4_k 16",
            Box::new(|| own_quantized(GgmlDType::Q4K, 16, DIM)),
        ),
        (
            "own q4_k 512",
            Box::new(|| own_quantized(GgmlDType::Q4K, 512, DIM)),
        ),
        (
            "own q4_0 16",
            Box::new(|| own_quantized(GgmlDType::Q4_0, 16, DIM)),
        ),
        ("q6_k 16", Box::new(|| quantized(GgmlDType::Q6K, 16, DIM))),
        (
            "own q6_k 1",
            Box::new(|| own_quantized(GgmlDType::Q6K, 1, DIM)),
        ),
        (
            "own q6_k 16",
            Box::new(|| own_quantized(GgmlDType::Q6K, 16, DIM)),
        ),
        (
            "attention decode f16",
            Box::new(|| attend(16, 256, 1, true)),
        ),
        (
            "attention decode f32",
            Box::new(|| attend(16, 256, 1, false)),
        ),
        (
            "attention decode f16 long",
            Box::new(|| attend(64, 512, 1, true)),
        ),
        (
            // stories260K's shape: per-score overheads dominate, not bandwidth.
            "attention decode tiny heads",
            Box::new(|| {
                let tiny = AttentionShape {
                    n_heads: 8,
                    n_kv_heads: 4,
                    head_dim: 8,
                };
                attend_shaped(tiny, 1, 160, 1, false)
            }),
        ),
        (
            "attention prefill f16",
            Box::new(|| attend(1, 512, 512, true)),
        ),
    ];
    // On a worker of the compute pool, as the engine runs its forward
    // (`llmos_models::on_cpu_pool`): a kernel's parallel parts fork within the pool.
    let lines: Vec<Line> = rayon::scope(|_| {
        kernels
            .iter()
            .filter(|(name, _)| name.contains(only.as_str()))
            .map(|(_, run)| run())
            .collect()
    });
    for line in &lines {
        print(line, bandwidth);
    }
}
