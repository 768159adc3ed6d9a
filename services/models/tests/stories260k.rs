//! Our forward on the real stories260K model: the known greedy story, token-for-token
//! agreement with candle-transformers' quantized_llama, and batched = unbatched.

mod common;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::*;
use llmos_kv::{ContiguousKv, KvStore};
use llmos_models::{load_gguf, SeqStep};

const KNOWN: &str = ", there was a little girl named Lily. She loved to play outside in the park. \
One day, she saw a big, red ball. She wanted to play with it, but it was too high.";

#[test]
fn greedy_decode_reproduces_the_known_story() {
    init();
    let loaded = load_gguf(stories_gguf(), &Device::Cpu).unwrap();
    let prompt = loaded.tokenizer.encode("Once upon a time", true).unwrap();
    assert_eq!(prompt, [1, 403, 407, 261, 378]);
    let out = greedy(&loaded.model, &prompt, 60);
    let text = loaded.tokenizer.decode(&out);
    assert!(text.starts_with(KNOWN), "got {text:?}");
    // The same inside rayon's pool, as engines run it.
    let model = &loaded.model;
    let pooled = llmos_models::on_cpu_pool(|| greedy(model, &prompt, 60));
    assert_eq!(pooled, out);
}

/// Greedy decoding with candle-transformers' implementation of the same file.
fn reference_greedy(prompt: &[u32], steps: usize) -> Vec<u32> {
    let path = stories_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let dev = Device::Cpu;
    let mut model = ModelWeights::from_gguf(content, &mut file, &dev).unwrap();
    let input = Tensor::new(prompt, &dev).unwrap().unsqueeze(0).unwrap();
    let mut logits = model.forward(&input, 0).unwrap().squeeze(0).unwrap();
    let mut out = Vec::with_capacity(steps);
    for i in 0..steps {
        let next = argmax(&logits);
        out.push(next);
        let input = Tensor::new(&[next], &dev).unwrap().unsqueeze(0).unwrap();
        logits = model
            .forward(&input, prompt.len() + i)
            .unwrap()
            .squeeze(0)
            .unwrap();
    }
    out
}

#[test]
fn matches_candle_transformers_token_for_token() {
    init();
    let loaded = load_gguf(stories_gguf(), &Device::Cpu).unwrap();
    let prompts = [
        "Once upon a time",
        "The little dog ran to the park and",
        "Tom and Sue found a box. Inside the box",
    ];
    for text in prompts {
        let prompt = loaded.tokenizer.encode(text, true).unwrap();
        let ours = greedy(&loaded.model, &prompt, 200);
        let theirs = reference_greedy(&prompt, 200);
        let first_diff = ours.iter().zip(&theirs).position(|(a, b)| a != b);
        assert_eq!(
            first_diff,
            None,
            "{text:?}: diverged at step {first_diff:?}\nours:   {:?}\ntheirs: {:?}",
            loaded.tokenizer.decode(&ours),
            loaded.tokenizer.decode(&theirs)
        );
    }
}

#[test]
fn batched_forward_equals_unbatched() {
    init();
    let loaded = load_gguf(stories_gguf(), &Device::Cpu).unwrap();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let a = tok.encode("Once upon a time there was", true).unwrap();
    let b = tok
        .encode("The cat sat on the mat and looked at the", true)
        .unwrap();
    let c = tok.encode("Lily and Ben", true).unwrap();
    // Histories: b has 9 cached positions and decodes 1 token; c has 2 cached and
    // prefills the rest; a starts empty and prefills everything.
    let (b_hist, b_new) = b.split_at(b.len() - 1);
    let (c_hist, c_new) = c.split_at(2);
    let prime = |hist: &[u32]| {
        let mut kv = ContiguousKv::new(model.kv_shape());
        if !hist.is_empty() {
            model
                .forward(&mut [SeqStep {
                    tokens: hist,
                    start_pos: 0,
                    kv: &mut kv,
                }])
                .unwrap();
        }
        kv
    };
    let (mut ka, mut kb, mut kc) = (prime(&[]), prime(b_hist), prime(c_hist));
    let (mut ua, mut ub, mut uc) = (ka.clone(), kb.clone(), kc.clone());
    let batched = model
        .forward(&mut [
            SeqStep {
                tokens: &a,
                start_pos: 0,
                kv: &mut ka,
            },
            SeqStep {
                tokens: b_new,
                start_pos: b_hist.len(),
                kv: &mut kb,
            },
            SeqStep {
                tokens: c_new,
                start_pos: c_hist.len(),
                kv: &mut kc,
            },
        ])
        .unwrap();
    let single = |tokens: &[u32], start_pos: usize, kv: &mut ContiguousKv| {
        model
            .forward(&mut [SeqStep {
                tokens,
                start_pos,
                kv,
            }])
            .unwrap()
            .remove(0)
    };
    let unbatched = [
        single(&a, 0, &mut ua),
        single(b_new, b_hist.len(), &mut ub),
        single(c_new, c_hist.len(), &mut uc),
    ];
    for (i, (x, y)) in batched.iter().zip(&unbatched).enumerate() {
        assert_eq!(x.dims(), [512]);
        let d = max_abs_diff(x, y);
        assert!(d < 1e-4, "sequence {i}: max |Δ| = {d}");
    }
    assert_eq!((ka.len(), kb.len(), kc.len()), (a.len(), b.len(), c.len()));
    // Both paths leave the same caches behind: decode one more step from each.
    let next: Vec<u32> = batched.iter().map(argmax).collect();
    let x = model
        .forward(&mut [
            SeqStep {
                tokens: &next[0..1],
                start_pos: a.len(),
                kv: &mut ka,
            },
            SeqStep {
                tokens: &next[1..2],
                start_pos: b.len(),
                kv: &mut kb,
            },
            SeqStep {
                tokens: &next[2..3],
                start_pos: c.len(),
                kv: &mut kc,
            },
        ])
        .unwrap();
    let y = [
        single(&next[0..1], a.len(), &mut ua),
        single(&next[1..2], b.len(), &mut ub),
        single(&next[2..3], c.len(), &mut uc),
    ];
    for (i, (x, y)) in x.iter().zip(&y).enumerate() {
        let d = max_abs_diff(x, y);
        assert!(d < 1e-4, "decode step, sequence {i}: max |Δ| = {d}");
    }
}

#[test]
fn prefill_equals_token_by_token() {
    init();
    let loaded = load_gguf(stories_gguf(), &Device::Cpu).unwrap();
    let model = &loaded.model;
    let ids = loaded
        .tokenizer
        .encode("One day, a big bird flew over the town.", true)
        .unwrap();
    let mut kv = ContiguousKv::new(model.kv_shape());
    let whole = model
        .forward(&mut [SeqStep {
            tokens: &ids,
            start_pos: 0,
            kv: &mut kv,
        }])
        .unwrap()
        .remove(0);
    let mut kv = ContiguousKv::new(model.kv_shape());
    let mut last = None;
    for (i, t) in ids.iter().enumerate() {
        last = Some(
            model
                .forward(&mut [SeqStep {
                    tokens: std::slice::from_ref(t),
                    start_pos: i,
                    kv: &mut kv,
                }])
                .unwrap()
                .remove(0),
        );
    }
    let d = max_abs_diff(&whole, &last.unwrap());
    assert!(d < 1e-4, "max |Δ| = {d}");
    // Recomputing a suffix after truncation gives the same logits again.
    kv.truncate(4);
    let again = model
        .forward(&mut [SeqStep {
            tokens: &ids[4..],
            start_pos: 4,
            kv: &mut kv,
        }])
        .unwrap()
        .remove(0);
    assert!(max_abs_diff(&whole, &again) < 1e-4);
}
