//! Batch invariance, bit for bit, per weight type: a sequence's logits after any position
//! are identical whether it ran alone one token at a time, with its prompt in chunks of
//! any size, or in a batch with any other sequences at any offsets, on contiguous or paged
//! KV — and the same with K/V stored as f16. This is the contract exact resume under concurrency rests on (a recomputed or
//! rebatched sequence must reproduce its original logits exactly). Schedules are drawn
//! from a seed that every failure prints.

mod common;

use std::path::Path;

use candle_core::DType;
use llmos_kv::{Backing, ContiguousKv, KvDtype, KvStore, PoolConfig, SharedPool};
use llmos_models::synth::{self, HfOptions, Preset};
use llmos_models::{load, GgmlDType, Model, SeqStep, StepOptions};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sequences per schedule and their lengths.
const SEQUENCES: usize = 6;
const MIN_LEN: usize = 12;
const MAX_LEN: usize = 48;
/// Random schedules per model.
const SCHEDULES: u64 = 6;

/// A one-sequence store: contiguous f32, or a pool of `dtype`.
fn store(model: &Model, dtype: Option<KvDtype>) -> Box<dyn KvStore> {
    match dtype {
        None => Box::new(ContiguousKv::new(model.kv_shape())),
        Some(dtype) => {
            let config =
                PoolConfig::new(model.kv_shape(), 16, 4 << 20, Backing::Memory).with_dtype(dtype);
            let pool = SharedPool::new(llmos_kv::BlockPool::new(config).unwrap());
            Box::new(pool.sequence(0).unwrap())
        }
    }
}

/// Logits of `seq` after each position, computed alone, one token per step, on
/// contiguous f32 KV (`dtype` `None`) or a pool of `dtype`.
fn alone(model: &Model, tokens: &[u32], dtype: Option<KvDtype>) -> Vec<Vec<u32>> {
    let mut kv = store(model, dtype);
    let mut out = Vec::with_capacity(tokens.len());
    for (p, t) in tokens.iter().enumerate() {
        let logits = model
            .forward_with(
                &mut [SeqStep {
                    tokens: std::slice::from_ref(t),
                    start_pos: p,
                    kv: kv.as_mut(),
                }],
                StepOptions::default(),
            )
            .unwrap();
        out.push(bits(logits[0].as_ref().unwrap()));
    }
    out
}

fn bits(logits: &[f32]) -> Vec<u32> {
    logits.iter().map(|x| x.to_bits()).collect()
}

/// Runs one random schedule (random subsets of the sequences per step, random chunk sizes,
/// random order in the batch, logits asked for at random) and checks every logits row it
/// produced against the sequence run alone. With `dtype` `None`, K/V is f32 in contiguous
/// stores or a pool (at random); with a dtype, in a pool of that type.
fn check_schedule(
    model: &Model,
    name: &str,
    seed: u64,
    seqs: &[Vec<u32>],
    reference: &[Vec<Vec<u32>>],
    dtype: Option<KvDtype>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let paged = dtype.is_some() || rng.gen_bool(0.5);
    let pool = SharedPool::new(
        llmos_kv::BlockPool::new(
            PoolConfig::new(
                model.kv_shape(),
                *[1usize, 4, 16].choose(&mut rng).unwrap(),
                4 << 20,
                Backing::Memory,
            )
            .with_dtype(dtype.unwrap_or_default()),
        )
        .unwrap(),
    );
    let mut stores: Vec<Box<dyn KvStore>> = (0..seqs.len())
        .map(|i| -> Box<dyn KvStore> {
            if paged {
                Box::new(pool.sequence(i as u64).unwrap())
            } else {
                Box::new(ContiguousKv::new(model.kv_shape()))
            }
        })
        .collect();
    let mut done = vec![0usize; seqs.len()];
    let mut steps = 0;
    while done.iter().zip(seqs).any(|(d, s)| *d < s.len()) {
        steps += 1;
        let mut pick: Vec<usize> = (0..seqs.len())
            .filter(|&i| done[i] < seqs[i].len() && rng.gen_bool(0.6))
            .collect();
        if pick.is_empty() {
            continue;
        }
        pick.shuffle(&mut rng);
        let chunks: Vec<(usize, usize)> = pick
            .iter()
            .map(|&i| {
                let left = seqs[i].len() - done[i];
                let n = if rng.gen_bool(0.5) {
                    1
                } else {
                    rng.gen_range(1..=left.min(13))
                };
                (i, n)
            })
            .collect();
        let wanted: Vec<bool> = chunks.iter().map(|_| rng.gen_bool(0.8)).collect();
        let mut taken: Vec<(usize, Box<dyn KvStore>)> = chunks
            .iter()
            .map(|&(i, _)| {
                (
                    i,
                    std::mem::replace(
                        &mut stores[i],
                        Box::new(ContiguousKv::new(model.kv_shape())),
                    ),
                )
            })
            .collect();
        let mut batch: Vec<SeqStep<'_>> = taken
            .iter_mut()
            .zip(&chunks)
            .map(|((i, kv), &(_, n))| SeqStep {
                tokens: &seqs[*i][done[*i]..done[*i] + n],
                start_pos: done[*i],
                kv: kv.as_mut(),
            })
            .collect();
        let logits = model
            .forward_with(
                &mut batch,
                StepOptions {
                    logits: Some(&wanted),
                    on_layer: None,
                },
            )
            .unwrap();
        drop(batch);
        for (((i, kv), &(_, n)), (want, logits)) in taken
            .into_iter()
            .zip(&chunks)
            .zip(wanted.iter().zip(logits))
        {
            let end = done[i] + n;
            match logits {
                Some(logits) => {
                    assert!(want);
                    assert!(
                        bits(&logits) == reference[i][end - 1],
                        "{name}: seed {seed}: sequence {i} at position {} (chunk of {n}, \
                         batch of {}, step {steps}, paged {paged}, K/V {dtype:?}) differs \
                         from running alone",
                        end - 1,
                        chunks.len()
                    );
                }
                None => assert!(!want),
            }
            done[i] = end;
            stores[i] = kv;
        }
    }
}

fn check_model(path: &Path, name: &str) {
    common::init();
    let model = load(path, &candle_core::Device::Cpu).unwrap().model;
    let vocab = model.config().vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let seqs: Vec<Vec<u32>> = (0..SEQUENCES)
        .map(|_| {
            let len = rng.gen_range(MIN_LEN..=MAX_LEN);
            (0..len).map(|_| rng.gen_range(3..vocab)).collect()
        })
        .collect();
    for dtype in [None, Some(KvDtype::F16)] {
        let reference: Vec<_> = seqs.iter().map(|s| alone(&model, s, dtype)).collect();
        for seed in 0..SCHEDULES {
            check_schedule(&model, name, seed, &seqs, &reference, dtype);
        }
    }
}

fn synth_gguf(dir: &Path, preset: &Preset, dtype: GgmlDType) -> std::path::PathBuf {
    let path = dir.join(format!("{}-{dtype:?}.gguf", preset.name));
    synth::write_gguf(&path, preset, dtype, 7).unwrap();
    path
}

#[test]
fn stories260k_f32_is_batch_invariant() {
    check_model(&common::stories_gguf(), "stories260K f32");
}

#[test]
fn f32_weights_are_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    check_model(
        &synth_gguf(dir.path(), &Preset::TINY, GgmlDType::F32),
        "tiny f32",
    );
}

#[test]
fn f16_weights_are_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    check_model(
        &synth_gguf(dir.path(), &Preset::TINY, GgmlDType::F16),
        "tiny f16 gguf",
    );
    let hf = dir.path().join("hf-f16");
    synth::write_hf_dir_with(
        &hf,
        &Preset::TINY,
        7,
        HfOptions {
            dtype: DType::F16,
            shards: 1,
        },
    )
    .unwrap();
    check_model(&hf, "tiny f16 safetensors");
}

#[test]
fn bf16_weights_are_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf-bf16");
    synth::write_hf_dir_with(
        &hf,
        &Preset::TINY,
        7,
        HfOptions {
            dtype: DType::BF16,
            shards: 1,
        },
    )
    .unwrap();
    check_model(&hf, "tiny bf16 safetensors");
}

#[test]
fn q8_0_weights_are_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    check_model(
        &synth_gguf(dir.path(), &Preset::TINY, GgmlDType::Q8_0),
        "tiny q8_0",
    );
}

#[test]
fn q4_0_weights_are_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    check_model(
        &synth_gguf(dir.path(), &Preset::TINY, GgmlDType::Q4_0),
        "tiny q4_0",
    );
}

#[test]
fn q4_1_weights_are_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    check_model(
        &synth_gguf(dir.path(), &Preset::TINY, GgmlDType::Q4_1),
        "tiny q4_1",
    );
}

#[test]
fn q4_k_weights_are_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    check_model(
        &synth_gguf(dir.path(), &Preset::TINY_K, GgmlDType::Q4K),
        "tiny-k q4_K",
    );
}

#[test]
fn q6_k_weights_are_batch_invariant() {
    let dir = tempfile::tempdir().unwrap();
    check_model(
        &synth_gguf(dir.path(), &Preset::TINY_K, GgmlDType::Q6K),
        "tiny-k q6_K",
    );
}
