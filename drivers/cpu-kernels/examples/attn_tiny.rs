//! Decode attention at stories260K's shape (8 query heads, 4 KV heads of 8), timed per
//! call: `cargo run --release -p llmos-cpu-kernels --example attn_tiny [CONTEXT] [CALLS]`.

use std::time::Instant;

use llmos_cpu_kernels::{attention, AttentionShape, Rows};

fn main() {
    let mut args = std::env::args().skip(1);
    let context: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(160);
    let calls: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let shape = AttentionShape {
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: 8,
    };
    let row = shape.n_kv_heads * shape.head_dim;
    let width = shape.n_heads * shape.head_dim;
    let data = |seed: usize, n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0) * 0.5)
            .collect()
    };
    let (keys, values, q) = (
        data(1, context * row),
        data(2, context * row),
        data(3, width),
    );
    let block = 16 * row;
    let runs: Vec<(Rows<'_>, Rows<'_>)> = keys
        .chunks(block)
        .zip(values.chunks(block))
        .map(|(k, v)| (Rows::F32(k), Rows::F32(v)))
        .collect();
    let mut out = vec![0f32; width];
    let mut check = 0f32;
    let started = Instant::now();
    for _ in 0..calls {
        attention(&q, &runs, row, context - 1, shape, &mut out);
        check += out[0];
    }
    let per_call = started.elapsed().as_secs_f64() / calls as f64;
    println!(
        "context {context}: {:.0} ns per call, {:.1} ns per position (check {check})",
        per_call * 1e9,
        per_call * 1e9 / context as f64
    );
}
