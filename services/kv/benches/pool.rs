//! Costs of the paged pool for a ~100M-parameter shape (12 layers, 12 KV heads of 64):
//! write + commit per decoded token (with and without sealing, memory and file backing),
//! gather of one layer at 128 and 500 positions, and restore of 500 positions — each next
//! to the contiguous store doing the same work, runs interleaved so machine noise hits
//! both sides. `cargo bench -p llmos-kv --bench pool`.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use llmos_kv::{
    Backing, BlockPool, ContiguousKv, KvShape, KvStore, PagedKv, PoolConfig, SharedPool,
};

const SHAPE: KvShape = KvShape {
    n_layers: 12,
    n_kv_heads: 12,
    head_dim: 64,
};
const BLOCK: usize = 16;
const POSITIONS: usize = 500;
const REPS: usize = 9;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn rows(count: usize, seed: f32) -> Tensor {
    let n = count * SHAPE.row_len();
    let data: Vec<f32> = (0..n).map(|i| seed + i as f32 * 1e-3).collect();
    Tensor::from_vec(
        data,
        (count, SHAPE.n_kv_heads, SHAPE.head_dim),
        &Device::Cpu,
    )
    .unwrap()
}

fn config(backing: Backing) -> PoolConfig {
    let per = PoolConfig::new(SHAPE, BLOCK, 0, Backing::Memory)
        .bytes_per_block()
        .unwrap() as u64;
    let blocks = POSITIONS.div_ceil(BLOCK) as u64 + 2;
    PoolConfig::new(SHAPE, BLOCK, per * blocks, backing)
}

/// Per-token time of one decode run: all of it, and the `commit` calls alone.
#[derive(Default)]
struct Steps {
    total: Vec<Duration>,
    commit: Vec<Duration>,
}

impl Steps {
    fn medians(self) -> (Duration, Duration) {
        (median(self.total), median(self.commit))
    }
}

/// Decodes `POSITIONS` tokens one at a time as the forward does (reserve, every layer's
/// write, commit), calling `before` first at each position.
fn decode<S: KvStore>(kv: &mut S, steps: &mut Steps, mut before: impl FnMut(&mut S, usize)) {
    let k = rows(1, 1.0);
    let v = rows(1, 2.0);
    let mut commit = Duration::ZERO;
    let start = Instant::now();
    for pos in 0..POSITIONS {
        before(kv, pos);
        kv.reserve(pos + 1).unwrap();
        for layer in 0..SHAPE.n_layers {
            kv.write(layer, pos, &k, &v).unwrap();
        }
        let c = Instant::now();
        kv.commit(pos + 1).unwrap();
        commit += c.elapsed();
    }
    steps.total.push(start.elapsed() / POSITIONS as u32);
    steps.commit.push(commit / POSITIONS as u32);
}

fn record(kv: &mut PagedKv, pos: usize) {
    kv.record_tokens(pos, &[pos as u32]).unwrap();
}

fn fill<S: KvStore>(kv: &mut S) {
    kv.reserve(POSITIONS).unwrap();
    for layer in 0..SHAPE.n_layers {
        let k = rows(POSITIONS, layer as f32);
        kv.write(layer, 0, &k, &k).unwrap();
    }
    kv.commit(POSITIONS).unwrap();
}

/// Time to read one layer's K and V at `len` positions (all layers, divided).
fn gather(kv: &dyn KvStore, len: usize) -> Duration {
    let dev = Device::Cpu;
    let start = Instant::now();
    for layer in 0..SHAPE.n_layers {
        std::hint::black_box(kv.read(layer, len, &dev).unwrap());
    }
    start.elapsed() / SHAPE.n_layers as u32
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.pool");
    let token_bytes = SHAPE.n_layers * 2 * SHAPE.row_len() * 4;
    println!(
        "shape {SHAPE:?}, {BLOCK} positions per block, {} KiB of K/V per token",
        token_bytes / 1024
    );

    let memory = SharedPool::new(BlockPool::new(config(Backing::Memory)).unwrap());
    let file = SharedPool::new(BlockPool::new(config(Backing::File(path.clone()))).unwrap());
    let mut contiguous = Steps::default();
    let mut runs: Vec<(&str, &SharedPool, bool, Steps)> = vec![
        (
            "memory, no tokens (no seal)",
            &memory,
            false,
            Steps::default(),
        ),
        (
            "memory, tokens + seal      ",
            &memory,
            true,
            Steps::default(),
        ),
        (
            "file,   no tokens (no seal)",
            &file,
            false,
            Steps::default(),
        ),
        ("file,   tokens + seal      ", &file, true, Steps::default()),
    ];
    for _ in 0..REPS {
        decode(&mut ContiguousKv::new(SHAPE), &mut contiguous, |_, _| {});
        for (_, pool, seal, steps) in &mut runs {
            let mut kv = pool.sequence(1).unwrap();
            if *seal {
                decode(&mut kv, steps, record);
            } else {
                decode(&mut kv, steps, |_, _| {});
            }
            kv.release();
        }
    }
    let (ct, cc) = contiguous.medians();
    println!("\nwrite + commit per token ({POSITIONS} decode steps, median of {REPS} runs):");
    println!(
        "  contiguous                        {:6.2} µs  (commit {:5.2} µs)",
        us(ct),
        us(cc)
    );
    for (name, _, _, steps) in runs {
        let (t, c) = steps.medians();
        println!(
            "  paged {name} {:6.2} µs  (commit {:5.2} µs)  {:.2}× contiguous",
            us(t),
            us(c),
            t.as_secs_f64() / ct.as_secs_f64()
        );
    }

    let mut c = ContiguousKv::new(SHAPE);
    fill(&mut c);
    let mut m = memory.sequence(2).unwrap();
    fill(&mut m);
    let mut f = file.sequence(2).unwrap();
    fill(&mut f);
    println!(
        "\ngather: read of one layer's K and V (median of {} runs, per layer):",
        REPS * 3
    );
    for len in [128, POSITIONS] {
        let (mut gc, mut gm, mut gf) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..REPS * 3 {
            gc.push(gather(&c, len));
            gm.push(gather(&m, len));
            gf.push(gather(&f, len));
        }
        let (gc, gm, gf) = (median(gc), median(gm), median(gf));
        let mb = (len * SHAPE.row_len() * 4 * 2) as f64 / 1e6;
        println!(
            "  {len:3} positions ({mb:.2} MB): contiguous {:7.1} µs, paged memory {:7.1} µs \
             ({:.2}×), paged file {:7.1} µs ({:.2}×)",
            us(gc),
            us(gm),
            gm.as_secs_f64() / gc.as_secs_f64(),
            us(gf),
            gf.as_secs_f64() / gc.as_secs_f64()
        );
    }

    let tokens: Vec<u32> = (0..POSITIONS as u32).collect();
    f.record_tokens(0, &tokens).unwrap();
    assert_eq!(f.sealed_len(), POSITIONS);
    drop((m, f, memory, file));
    let start = Instant::now();
    let reopened = SharedPool::new(BlockPool::new(config(Backing::File(path))).unwrap());
    let opened = start.elapsed();
    let start = Instant::now();
    let r = reopened.restore(2, &tokens).unwrap();
    let restored = start.elapsed();
    assert_eq!(r.valid_len, POSITIONS);
    println!("\nrestore after reopen ({POSITIONS} positions; token hashes and crcs checked):");
    println!(
        "  reopen {:.2} ms, restore {:.2} ms ({:.2} µs per position)",
        opened.as_secs_f64() * 1e3,
        restored.as_secs_f64() * 1e3,
        us(restored) / POSITIONS as f64
    );
}
