//! Greedy-decode throughput: our forward over `ContiguousKv` vs candle-transformers'
//! quantized_llama on the same GGUF file, interleaved in one run; plus batched decode.
//!
//! `cargo run --release -p llmos-models --example decode_bench -- [FILE.gguf] [TOKENS] [ROUNDS] [BATCH...]`
//! FILE defaults to shared/models/stories260K/stories260K-f32.gguf; `synth:PRESET:TYPE`
//! (e.g. `synth:small-100m:q8_0`) writes a synthetic model to a temp file first.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use llmos_kv::{ContiguousKv, KvStore};
use llmos_models::{load_gguf, synth, GgmlDType, Model, SeqStep};

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn ours(model: &Model, prompt: &[u32], n: usize) -> (f64, Vec<u32>) {
    let mut kv = ContiguousKv::new(model.kv_shape());
    let mut logits = model
        .forward(&mut [SeqStep {
            tokens: prompt,
            start_pos: 0,
            kv: &mut kv,
        }])
        .unwrap();
    let t = Instant::now();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let next = argmax(&logits[0].to_vec1::<f32>().unwrap());
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
    (n as f64 / t.elapsed().as_secs_f64(), out)
}

fn reference(path: &PathBuf, prompt: &[u32], n: usize) -> (f64, Vec<u32>) {
    let dev = Device::Cpu;
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut m = ModelWeights::from_gguf(c, &mut f, &dev).unwrap();
    let x = Tensor::new(prompt, &dev).unwrap().unsqueeze(0).unwrap();
    let mut logits = m.forward(&x, 0).unwrap();
    let t = Instant::now();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let next = argmax(&logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        out.push(next);
        let x = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
        logits = m.forward(&x, prompt.len() + i).unwrap();
    }
    (n as f64 / t.elapsed().as_secs_f64(), out)
}

/// Decode throughput with `b` sequences per step (tokens/s summed over the batch).
fn batched(model: &Model, prompt: &[u32], n: usize, b: usize) -> f64 {
    let mut kvs: Vec<ContiguousKv> = (0..b)
        .map(|_| ContiguousKv::new(model.kv_shape()))
        .collect();
    let mut next = vec![0u32; b];
    for (i, kv) in kvs.iter_mut().enumerate() {
        let p: Vec<u32> = prompt.iter().take(prompt.len() - i % 2).copied().collect();
        let l = model
            .forward(&mut [SeqStep {
                tokens: &p,
                start_pos: 0,
                kv,
            }])
            .unwrap();
        next[i] = argmax(&l[0].to_vec1::<f32>().unwrap());
    }
    let t = Instant::now();
    for _ in 0..n {
        let mut steps: Vec<SeqStep<'_>> = Vec::with_capacity(b);
        for (kv, tok) in kvs.iter_mut().zip(next.iter()) {
            let pos = kv.len();
            steps.push(SeqStep {
                tokens: std::slice::from_ref(tok),
                start_pos: pos,
                kv,
            });
        }
        let logits = model.forward(&mut steps).unwrap();
        drop(steps);
        for (i, l) in logits.iter().enumerate() {
            next[i] = argmax(&l.to_vec1::<f32>().unwrap());
        }
    }
    (n * b) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let threads = llmos_device::init_cpu_threads(2);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = match args.first().map(String::as_str) {
        Some(s) if s.starts_with("synth:") => {
            let parts: Vec<&str> = s.split(':').collect();
            let preset = synth::Preset::by_name(parts[1]).expect("preset");
            let dtype = match parts.get(2).copied().unwrap_or("f32") {
                "f32" => GgmlDType::F32,
                "f16" => GgmlDType::F16,
                "q8_0" => GgmlDType::Q8_0,
                "q4_0" => GgmlDType::Q4_0,
                "q4_k" => GgmlDType::Q4K,
                other => panic!("type {other}"),
            };
            let p = tmp.path().join("synth.gguf");
            let t = Instant::now();
            synth::write_gguf(&p, &preset, dtype, 1).unwrap();
            eprintln!(
                "wrote {} ({} params) in {:.1?}",
                s,
                preset.param_count(),
                t.elapsed()
            );
            p
        }
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/models/stories260K/stories260K-f32.gguf"),
    };
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(400);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let batches: Vec<usize> = args.iter().skip(3).filter_map(|s| s.parse().ok()).collect();
    let t = Instant::now();
    let loaded = load_gguf(&path, &Device::Cpu).unwrap();
    eprintln!("loaded {} in {:.1?}", path.display(), t.elapsed());
    let prompt = loaded.tokenizer.encode("Once upon a time", true).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    // IN_POOL: run both decode loops on a rayon worker (no per-op hop into the pool);
    // SKIP_REF: time only ours (for profiling).
    let in_pool = std::env::var("IN_POOL").is_ok();
    let skip_ref = std::env::var("SKIP_REF").is_ok();
    for r in 0..rounds {
        let (x, ox) = if in_pool {
            llmos_models::on_cpu_pool(|| ours(&loaded.model, &prompt, n))
        } else {
            ours(&loaded.model, &prompt, n)
        };
        let (y, oy) = if skip_ref {
            (f64::NAN, ox.clone())
        } else if in_pool {
            llmos_models::on_cpu_pool(|| reference(&path, &prompt, n))
        } else {
            reference(&path, &prompt, n)
        };
        assert_eq!(ox, oy, "token streams differ");
        println!("round {r}: ours {x:8.0} tok/s   candle-transformers {y:8.0} tok/s");
        a.push(x);
        b.push(y);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ma, mb) = (med(&mut a), med(&mut b));
    println!(
        "median over {rounds} rounds of {n} greedy tokens, {threads} threads: ours {ma:.0} tok/s, \
         candle-transformers quantized_llama {mb:.0} tok/s, ratio {:.2}",
        ma / mb
    );
    for bsz in batches {
        let run = || batched(&loaded.model, &prompt, n.min(200), bsz);
        let tps = if in_pool {
            llmos_models::on_cpu_pool(run)
        } else {
            run()
        };
        println!("batched decode, {bsz} sequences: {tps:.0} tok/s total");
    }
}
