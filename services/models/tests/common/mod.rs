//! Helpers shared by the integration tests: data paths, greedy decoding, comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::Tensor;
use llmos_kv::{ContiguousKv, KvStore};
use llmos_models::{Model, SeqStep};

/// The stories260K directory (`shared/` beside the checkout, as in CI).
pub fn stories_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LLMOS_STORIES260K") {
        return PathBuf::from(dir);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for base in manifest.ancestors() {
        for shared in [base.join("shared"), base.join("../shared")] {
            let dir = shared.join("models/stories260K");
            if dir.join("stories260K-f32.gguf").exists() {
                return dir;
            }
        }
    }
    panic!("stories260K not found: put shared/ beside the checkout or set LLMOS_STORIES260K");
}

pub fn stories_gguf() -> PathBuf {
    stories_dir().join("stories260K-f32.gguf")
}

/// Sets the thread count once per test binary (see `init_cpu_threads`).
pub fn init() {
    llmos_device::init_cpu_threads(2);
}

pub fn argmax(logits: &Tensor) -> u32 {
    let v = logits.to_vec1::<f32>().unwrap();
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding of `steps` tokens after `prompt` with our forward.
pub fn greedy(model: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut kv = ContiguousKv::new(model.kv_shape());
    let mut out = Vec::with_capacity(steps);
    let mut logits = model
        .forward(&mut [SeqStep {
            tokens: prompt,
            start_pos: 0,
            kv: &mut kv,
        }])
        .unwrap();
    for _ in 0..steps {
        let next = argmax(&logits[0]);
        out.push(next);
        let pos = kv.len();
        logits = model
            .forward(&mut [SeqStep {
                tokens: &[next],
                start_pos: pos,
                kv: &mut kv,
            }])
            .unwrap();
    }
    out
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Rewrites a GGUF file through candle's reader and writer, letting `edit` change the
/// metadata and tensors in between.
pub fn rewrite_gguf(
    src: &std::path::Path,
    dst: &std::path::Path,
    edit: impl FnOnce(
        &mut Vec<(String, candle_core::quantized::gguf_file::Value)>,
        &mut Vec<(String, candle_core::quantized::QTensor)>,
    ),
) {
    use candle_core::quantized::gguf_file;
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, candle_core::quantized::QTensor)> = names
        .into_iter()
        .map(|n| {
            (
                n.clone(),
                content
                    .tensor(&mut f, n, &candle_core::Device::Cpu)
                    .unwrap(),
            )
        })
        .collect();
    let mut md: Vec<(String, gguf_file::Value)> = content.metadata.into_iter().collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut md, &mut tensors);
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
}

/// Prefill `prompt`, then decode `steps` greedy tokens; returns every step's logits.
pub fn logits_trace(model: &Model, prompt: &[u32], steps: usize) -> Vec<Tensor> {
    let mut kv = ContiguousKv::new(model.kv_shape());
    let mut out = model
        .forward(&mut [SeqStep {
            tokens: prompt,
            start_pos: 0,
            kv: &mut kv,
        }])
        .unwrap();
    for _ in 0..steps {
        let next = argmax(out.last().unwrap());
        let pos = kv.len();
        let l = model
            .forward(&mut [SeqStep {
                tokens: &[next],
                start_pos: pos,
                kv: &mut kv,
            }])
            .unwrap();
        out.extend(l);
    }
    out
}

pub fn all_finite(t: &Tensor) -> bool {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite())
}

/// Largest |a-b| relative to the largest |b|.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()));
    max_abs_diff(a, b) / scale.max(1e-6)
}

/// Logits after `prompt` and after each of `forced` (teacher forcing), with our forward.
pub fn forced_trace(model: &Model, prompt: &[u32], forced: &[u32]) -> Vec<Tensor> {
    let mut kv = ContiguousKv::new(model.kv_shape());
    let mut out = model
        .forward(&mut [SeqStep {
            tokens: prompt,
            start_pos: 0,
            kv: &mut kv,
        }])
        .unwrap();
    for &t in forced {
        let pos = kv.len();
        out.extend(
            model
                .forward(&mut [SeqStep {
                    tokens: &[t],
                    start_pos: pos,
                    kv: &mut kv,
                }])
                .unwrap(),
        );
    }
    out
}

/// The same trace with candle-transformers' quantized_llama on the same GGUF file.
pub fn reference_trace(path: &std::path::Path, prompt: &[u32], forced: &[u32]) -> Vec<Tensor> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let dev = candle_core::Device::Cpu;
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut m = ModelWeights::from_gguf(content, &mut file, &dev).unwrap();
    let run = |m: &mut ModelWeights, ids: &[u32], pos: usize| {
        let x = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
        m.forward(&x, pos).unwrap().squeeze(0).unwrap()
    };
    let mut out = vec![run(&mut m, prompt, 0)];
    for (i, &t) in forced.iter().enumerate() {
        out.push(run(&mut m, &[t], prompt.len() + i));
    }
    out
}

/// cos(a, b) of two flattened tensors.
pub fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}
