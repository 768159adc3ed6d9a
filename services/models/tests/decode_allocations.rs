//! A decode step allocates nothing per op: every intermediate lives in buffers reused
//! across steps (the model's step buffers, the kernels' per-thread temporaries, K/V views
//! formed in place), so what a step allocates does not grow with the model's layers —
//! only its result (the logits handed to the caller) is new. Counted by dhat's heap
//! profiler as this test binary's global allocator (one test: one profiler per process).

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use common::*;
use llmos_kv::{Backing, ContiguousKv, KvDtype, KvStore, PoolConfig, SharedPool};
use llmos_models::synth::{self, Preset};
use llmos_models::{load_gguf, Model, SeqStep, StepOptions};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// One forward step of each store's sequence with its token `next[i]` at `pos`, built
/// without a heap allocation of its own (a batch of 1 or 3), the logits' argmax written
/// back into `next`.
fn decode(model: &Model, stores: &mut [Box<dyn KvStore>], next: &mut [[u32; 1]], pos: usize) {
    let logits = match (stores, &*next) {
        ([a], [ta]) => model.forward_with(
            &mut [SeqStep {
                tokens: ta,
                start_pos: pos,
                kv: a.as_mut(),
            }],
            StepOptions::default(),
        ),
        ([a, b, c], [ta, tb, tc]) => model.forward_with(
            &mut [
                SeqStep {
                    tokens: ta,
                    start_pos: pos,
                    kv: a.as_mut(),
                },
                SeqStep {
                    tokens: tb,
                    start_pos: pos,
                    kv: b.as_mut(),
                },
                SeqStep {
                    tokens: tc,
                    start_pos: pos,
                    kv: c.as_mut(),
                },
            ],
            StepOptions::default(),
        ),
        _ => panic!("batches of 1 or 3"),
    }
    .unwrap();
    for (t, l) in next.iter_mut().zip(logits) {
        let l = l.unwrap();
        t[0] = (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32;
    }
}

/// Heap blocks allocated per greedy decode step of every store's sequence, after the
/// prompt and a warm-up.
fn allocations_per_step(model: &Model, stores: &mut [Box<dyn KvStore>], steps: usize) -> f64 {
    let prompt = [1u32, 403, 407, 261, 378];
    for kv in stores.iter_mut() {
        model
            .forward(&mut [SeqStep {
                tokens: &prompt,
                start_pos: 0,
                kv: kv.as_mut(),
            }])
            .unwrap();
    }
    let mut next = vec![[prompt[4]]; stores.len()];
    let mut pos = prompt.len();
    // Warm-up: the buffers and the stores' tables reach their size.
    for _ in 0..8 {
        decode(model, stores, &mut next, pos);
        pos += 1;
    }
    let before = dhat::HeapStats::get().total_blocks;
    for _ in 0..steps {
        decode(model, stores, &mut next, pos);
        pos += 1;
    }
    let after = dhat::HeapStats::get().total_blocks;
    (after - before) as f64 / steps as f64
}

fn contiguous(model: &Model, n: usize) -> Vec<Box<dyn KvStore>> {
    (0..n)
        .map(|_| {
            let mut kv = ContiguousKv::new(model.kv_shape());
            kv.reserve(model.config().max_seq_len).unwrap();
            Box::new(kv) as Box<dyn KvStore>
        })
        .collect()
}

fn paged(model: &Model, n: usize, dtype: KvDtype) -> Vec<Box<dyn KvStore>> {
    let config = PoolConfig::new(model.kv_shape(), 16, 16 << 20, Backing::Memory).with_dtype(dtype);
    let pool = SharedPool::new(llmos_kv::BlockPool::new(config).unwrap());
    (0..n as u64)
        .map(|i| Box::new(pool.sequence(i).unwrap()) as Box<dyn KvStore>)
        .collect()
}

#[test]
fn a_decode_step_allocates_nothing_per_op() {
    init();
    let _profiler = dhat::Profiler::builder().testing().build();
    let stories = load_gguf(stories_gguf(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let q8 = dir.path().join("tiny-q8_0.gguf");
    synth::write_gguf(&q8, &Preset::TINY, GgmlDType::Q8_0, 7).unwrap();
    let q8 = load_gguf(&q8, &Device::Cpu).unwrap();
    let steps = 16;
    let mut models = vec![("stories260K f32", &stories)];
    // Below AVX2 quantized projections go through candle's matmul, which allocates.
    if llmos_cpu_kernels::quantized_accelerated() {
        models.push(("tiny q8_0", &q8));
    } else {
        println!("no AVX2: quantized projections run on candle's kernels; q8_0 not counted");
    }
    for (name, loaded) in models {
        let model = &loaded.model;
        let layers = model.config().n_layers;
        for (kv, batch, mut stores) in [
            ("contiguous", 1, contiguous(model, 1)),
            ("paged f16", 1, paged(model, 1, KvDtype::F16)),
            ("paged f32", 3, paged(model, 3, KvDtype::F32)),
        ] {
            let per_step = allocations_per_step(model, &mut stores, steps);
            println!("{name}, {kv} KV, {batch} sequence(s): {per_step:.2} allocations per step ({layers} layers)");
            // The result: its vector and one logits vector per sequence. The paged
            // stores' own bookkeeping (a new block every 16 positions, its seal record)
            // is amortised over the block's steps.
            let result = 1.0 + batch as f64;
            let amortised_store = if kv == "contiguous" {
                0.0
            } else {
                1.0 * batch as f64
            };
            assert!(
                per_step <= result + amortised_store,
                "{name}, {kv} KV, {batch} sequence(s): {per_step} allocations per decode step \
                 ({layers} layers)"
            );
        }
    }
}
