//! Chat templates found in model files (GGUF metadata, Hugging Face tokenizer_config.json)
//! and load progress reports.

mod common;

use std::cell::RefCell;
use std::path::Path;

use candle_core::Device;
use common::*;
use llmos_models::synth::{self, Preset};
use llmos_models::{
    load, load_gguf, load_hf_dir, load_with_progress, ChatMessage, GgmlDType, LoadProgress,
};
use serde_json::json;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const INST: &str = "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}[INST] {{ m.content.strip() }} [/INST]{% else %} {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}";

fn hi() -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", " Hi ")]
}

#[test]
fn gguf_round_trip_carries_the_template_and_special_strings() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("chat.gguf");
    synth::write_gguf_with_template(&p, &Preset::TINY, GgmlDType::F32, 3, INST).unwrap();
    let loaded = load_gguf(&p, &Device::Cpu).unwrap();
    let t = loaded.chat_template.expect("template loaded");
    assert_eq!(t.source(), INST);
    assert_eq!((t.bos_token(), t.eos_token()), ("<s>", "</s>"));
    assert_eq!(t.render(&hi()).unwrap(), "<s>[INST] Hi [/INST]");

    let plain = dir.path().join("plain.gguf");
    synth::write_gguf(&plain, &Preset::TINY, GgmlDType::F32, 3).unwrap();
    assert!(load(&plain, &Device::Cpu).unwrap().chat_template.is_none());
    // The real stories260K has no template either.
    assert!(load_gguf(stories_gguf(), &Device::Cpu)
        .unwrap()
        .chat_template
        .is_none());
}

#[test]
fn a_template_that_does_not_compile_leaves_the_model_usable() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    synth::write_gguf_with_template(&p, &Preset::TINY, GgmlDType::F32, 3, "{% for %}").unwrap();
    let loaded = load_gguf(&p, &Device::Cpu).unwrap();
    assert!(loaded.chat_template.is_none());
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

#[test]
fn hf_tokenizer_config_templates_and_special_tokens() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("hf");
    synth::write_hf_dir(&d, &Preset::TINY, 3).unwrap();
    // No tokenizer_config.json: no template.
    assert!(load_hf_dir(&d, &Device::Cpu)
        .unwrap()
        .chat_template
        .is_none());

    // A string template; bos_token as an AddedToken object, eos_token as a string.
    write_json(
        &d.join("tokenizer_config.json"),
        &json!({
            "chat_template": INST,
            "bos_token": {"content": "<s>", "lstrip": false, "special": true},
            "eos_token": "</s>",
        }),
    );
    let t = load_hf_dir(&d, &Device::Cpu)
        .unwrap()
        .chat_template
        .unwrap();
    assert_eq!((t.bos_token(), t.eos_token()), ("<s>", "</s>"));
    assert_eq!(t.render(&hi()).unwrap(), "<s>[INST] Hi [/INST]");

    // A list of named templates: "default" wins over the first.
    write_json(
        &d.join("tokenizer_config.json"),
        &json!({
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": CHATML},
            ],
        }),
    );
    let t = load_hf_dir(&d, &Device::Cpu)
        .unwrap()
        .chat_template
        .unwrap();
    assert_eq!(t.source(), CHATML);
    // Without bos_token/eos_token in the config, the strings come from tokenizer.json.
    assert_eq!((t.bos_token(), t.eos_token()), ("<s>", "</s>"));
    assert_eq!(
        t.render(&hi()).unwrap(),
        "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n"
    );

    // Without "default", the first.
    write_json(
        &d.join("tokenizer_config.json"),
        &json!({"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]}),
    );
    let t = load_hf_dir(&d, &Device::Cpu)
        .unwrap()
        .chat_template
        .unwrap();
    assert_eq!(t.render(&hi()).unwrap(), "A");

    // chat_template.jinja when the config has none.
    write_json(
        &d.join("tokenizer_config.json"),
        &json!({"eos_token": "</s>"}),
    );
    std::fs::write(d.join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
    let t = load_hf_dir(&d, &Device::Cpu)
        .unwrap()
        .chat_template
        .unwrap();
    assert_eq!(t.render(&hi()).unwrap(), "J</s>");

    // A tokenizer_config.json that is not JSON is a corrupt file, named.
    std::fs::write(d.join("tokenizer_config.json"), "{not json").unwrap();
    let err = load_hf_dir(&d, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
}

fn check_progress(reports: &[LoadProgress]) {
    assert!(reports.len() >= 3, "{reports:?}");
    let first = reports[0];
    assert_eq!((first.tensors_done, first.bytes_done), (0, 0));
    assert!(first.tensors_total > 0 && first.bytes_total > 0);
    for w in reports.windows(2) {
        assert!(w[1].tensors_done >= w[0].tensors_done, "{w:?}");
        assert!(w[1].bytes_done >= w[0].bytes_done, "{w:?}");
        assert!(w[1].fraction() >= w[0].fraction(), "{w:?}");
        assert_eq!(w[1].tensors_total, first.tensors_total);
        assert_eq!(w[1].bytes_total, first.bytes_total);
    }
    for r in reports {
        assert!(r.tensors_done <= r.tensors_total && r.bytes_done <= r.bytes_total);
    }
    let last = reports.last().unwrap();
    assert!(last.is_complete(), "{last:?}");
    assert_eq!(last.fraction(), 1.0);
    // Only the last report is complete: 100% means done.
    assert!(reports[..reports.len() - 1]
        .iter()
        .all(|r| !r.is_complete()));
}

#[test]
fn load_progress_is_monotone_and_reaches_100_percent() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let p = Preset::TINY;
    // Per layer 9 tensors, plus the embedding, the final norm and the untied output.
    let tensors = p.n_layers * 9 + 3;

    let gguf = dir.path().join("tiny.gguf");
    synth::write_gguf(&gguf, &p, GgmlDType::Q8_0, 3).unwrap();
    let seen = RefCell::new(Vec::new());
    load_with_progress(&gguf, &Device::Cpu, &|r| seen.borrow_mut().push(r)).unwrap();
    let seen = seen.into_inner();
    check_progress(&seen);
    assert_eq!(seen[0].tensors_total, tensors);
    assert_eq!(
        seen.len(),
        tensors + 1,
        "one report per tensor after the start"
    );
    let file_len = std::fs::metadata(&gguf).unwrap().len();
    assert!(seen[0].bytes_total < file_len && seen[0].bytes_total > file_len / 2);

    let hf = dir.path().join("hf");
    synth::write_hf_dir(&hf, &p, 3).unwrap();
    let seen = RefCell::new(Vec::new());
    load_with_progress(&hf, &Device::Cpu, &|r| seen.borrow_mut().push(r)).unwrap();
    let seen = seen.into_inner();
    check_progress(&seen);
    assert_eq!(seen[0].tensors_total, tensors);
    assert_eq!(seen[0].bytes_total, p.param_count() as u64 * 4);

    // Tied quantized embeddings are read twice but counted once.
    let tied = dir.path().join("tied.gguf");
    let preset = Preset {
        tied_embeddings: true,
        ..Preset::TINY
    };
    synth::write_gguf(&tied, &preset, GgmlDType::Q8_0, 3).unwrap();
    let seen = RefCell::new(Vec::new());
    load_with_progress(&tied, &Device::Cpu, &|r| seen.borrow_mut().push(r)).unwrap();
    let seen = seen.into_inner();
    check_progress(&seen);
    assert_eq!(seen[0].tensors_total, tensors - 1);
}
