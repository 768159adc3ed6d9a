//! Synthetic models: both formats load, give finite logits, and describe the same
//! function for the same seed; every supported storage type runs.

mod common;

use candle_core::{DType, Device};
use common::*;
use llmos_kv::{ContiguousKv, KvShape};
use llmos_models::synth::{self, HfOptions, Preset};
use llmos_models::{load_gguf, load_hf_dir, GgmlDType, ModelError, RopeLayout, SeqStep};

const PROMPT: &[u32] = &[1, 300, 301, 302, 400, 401, 7, 8, 500];

#[test]
fn gguf_and_hf_of_one_seed_are_the_same_model() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let gguf_path = dir.path().join("tiny.gguf");
    let hf_dir = dir.path().join("tiny-hf");
    synth::write_gguf(&gguf_path, &Preset::TINY, GgmlDType::F32, 7).unwrap();
    synth::write_hf_dir(&hf_dir, &Preset::TINY, 7).unwrap();
    let g = load_gguf(&gguf_path, &Device::Cpu).unwrap();
    let h = load_hf_dir(&hf_dir, &Device::Cpu).unwrap();
    assert_eq!(g.model.config().rope_layout, RopeLayout::Interleaved);
    assert_eq!(h.model.config().rope_layout, RopeLayout::HalfSplit);
    assert_eq!(g.model.kv_shape(), h.model.kv_shape());
    assert_eq!(
        g.model.kv_shape(),
        KvShape {
            n_layers: 4,
            n_kv_heads: 2,
            head_dim: 16
        }
    );
    let a = logits_trace(&g.model, PROMPT, 20);
    let b = logits_trace(&h.model, PROMPT, 20);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(all_finite(x), "step {i} not finite");
        let d = max_abs_diff(x, y);
        assert!(d < 1e-4, "step {i}: max |Δ| = {d}");
    }
    // Logits of a random model are O(1), not saturated.
    let spread = a[0].max(0).unwrap().to_scalar::<f32>().unwrap()
        - a[0].min(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(spread > 0.5 && spread < 100.0, "logit spread {spread}");

    // The two self-contained tokenizers agree too.
    for text in ["hello world", "The quick brown fox, 42 times!", "naïve ☃"] {
        assert_eq!(
            g.tokenizer.encode(text, true).unwrap(),
            h.tokenizer.encode(text, true).unwrap(),
            "{text:?}"
        );
        let ids = g.tokenizer.encode(text, true).unwrap();
        assert_eq!(g.tokenizer.decode(&ids), text);
    }

    // Another seed is another model.
    let other = dir.path().join("other.gguf");
    synth::write_gguf(&other, &Preset::TINY, GgmlDType::F32, 8).unwrap();
    let o = load_gguf(&other, &Device::Cpu).unwrap();
    assert!(max_abs_diff(&logits_trace(&o.model, PROMPT, 0)[0], &a[0]) > 1e-2);
    // The same seed writes the same bytes.
    let again = dir.path().join("again.gguf");
    synth::write_gguf(&again, &Preset::TINY, GgmlDType::F32, 7).unwrap();
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&gguf_path).unwrap()
    );
}

#[test]
fn every_gguf_storage_type_matches_the_reference_and_stays_near_f32() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let forced = [260, 261, 262, 263, 300];
    // (preset, type, least cosine similarity of the prefill logits to the f32 model's)
    let cases = [
        (Preset::TINY, GgmlDType::F32, 0.999_999),
        (Preset::TINY, GgmlDType::F16, 0.9999),
        (Preset::TINY, GgmlDType::Q8_0, 0.99),
        (Preset::TINY, GgmlDType::Q4_0, 0.8),
        (Preset::TINY, GgmlDType::Q4_1, 0.8),
        (Preset::TINY_K, GgmlDType::Q4K, 0.8),
        (Preset::TINY_K, GgmlDType::Q6K, 0.95),
    ];
    for (preset, dtype, min_cos) in cases {
        let base = dir.path().join(format!("{}-f32.gguf", preset.name));
        if !base.exists() {
            synth::write_gguf(&base, &preset, GgmlDType::F32, 3).unwrap();
        }
        let path = dir.path().join(format!("{}-{dtype:?}.gguf", preset.name));
        synth::write_gguf(&path, &preset, dtype, 3).unwrap();
        let q = load_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(
            q.model.config().weight_type,
            format!("{dtype:?}").to_lowercase()
        );
        let ours = forced_trace(&q.model, PROMPT, &forced);
        let theirs = reference_trace(&path, PROMPT, &forced);
        let f = load_gguf(&base, &Device::Cpu).unwrap();
        let exact = forced_trace(&f.model, PROMPT, &[]);
        let own_kernel = matches!(
            dtype,
            GgmlDType::Q8_0 | GgmlDType::Q6K | GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K
        ) && llmos_cpu_kernels::quantized_accelerated();
        for (i, (x, y)) in ours.iter().zip(&theirs).enumerate() {
            assert!(all_finite(x), "{dtype:?}");
            let r = rel_diff(x, y);
            if own_kernel {
                // Our quantized kernels round activations and sum blocks otherwise than
                // candle's (their accuracy is checked in quantized_kernels.rs); on this tiny
                // random model the logits differ by that rounding, amplified.
                assert!(
                    r < 0.05,
                    "{dtype:?} step {i}: relative difference to reference {r}"
                );
            } else {
                // Same file, same kernels: our forward and candle-transformers' agree.
                assert!(
                    r < 1e-3,
                    "{dtype:?} step {i}: relative difference to reference {r}"
                );
            }
        }
        // Quantization error stays that of the storage type.
        let c = cosine(&ours[0], &exact[0]);
        assert!(
            c > min_cos,
            "{dtype:?}: cosine to f32 logits {c} ≤ {min_cos}"
        );
    }
    // k-quants cannot pack 64-wide rows: a clear error, no file.
    let err = synth::write_gguf(dir.path().join("x.gguf"), &Preset::TINY, GgmlDType::Q4K, 1);
    assert!(matches!(err, Err(ModelError::InvalidInput(_))), "{err:?}");
}

#[test]
fn hf_half_precision_and_shards_load() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("f32");
    synth::write_hf_dir(&base, &Preset::TINY, 11).unwrap();
    let reference = logits_trace(&load_hf_dir(&base, &Device::Cpu).unwrap().model, PROMPT, 2);
    for (dtype, shards, tol) in [
        (DType::F16, 1, 1e-2),
        (DType::BF16, 3, 5e-2),
        (DType::F32, 4, 1e-6),
    ] {
        let d = dir.path().join(format!("{dtype:?}-{shards}"));
        synth::write_hf_dir_with(&d, &Preset::TINY, 11, HfOptions { dtype, shards }).unwrap();
        assert_eq!(d.join("model.safetensors.index.json").exists(), shards > 1);
        let m = load_hf_dir(&d, &Device::Cpu).unwrap();
        assert_eq!(
            m.model.config().weight_type,
            format!("{dtype:?}").to_lowercase()
        );
        for (x, y) in logits_trace(&m.model, PROMPT, 2).iter().zip(&reference) {
            let r = rel_diff(x, y);
            assert!(r < tol, "{dtype:?}/{shards}: relative error {r}");
        }
    }
}

#[test]
fn forward_rejects_bad_input_without_touching_the_cache() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synth::write_gguf(&path, &Preset::TINY, GgmlDType::F32, 1).unwrap();
    let m = load_gguf(&path, &Device::Cpu).unwrap().model;
    let mut kv = ContiguousKv::new(m.kv_shape());
    let bad = |tokens: &[u32], start_pos: usize, kv: &mut dyn llmos_kv::KvStore| {
        let r = m.forward(&mut [SeqStep {
            tokens,
            start_pos,
            kv,
        }]);
        assert!(matches!(r, Err(ModelError::InvalidInput(_))), "{r:?}");
    };
    bad(&[], 0, &mut kv);
    bad(&[512], 0, &mut kv);
    bad(&[1], 1, &mut kv);
    let long = vec![5u32; 257];
    bad(&long, 0, &mut kv);
    let mut wrong = ContiguousKv::new(KvShape {
        n_layers: 4,
        n_kv_heads: 4,
        head_dim: 16,
    });
    bad(&[1], 0, &mut wrong);
    assert!(matches!(
        m.forward(&mut []),
        Err(ModelError::InvalidInput(_))
    ));
    assert!(llmos_kv::KvStore::is_empty(&kv));
    // The whole context fits.
    let full = vec![5u32; 256];
    let l = m
        .forward(&mut [SeqStep {
            tokens: &full,
            start_pos: 0,
            kv: &mut kv,
        }])
        .unwrap();
    assert!(all_finite(&l[0]));
}
