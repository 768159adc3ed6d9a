//! The GGUF-metadata tokenizer and the tokenizer.json tokenizer of stories260K agree with
//! each other (and with the `tokenizers` crate's own decode), and streaming decode
//! reassembles exactly what `decode` returns.

mod common;

use common::*;
use llmos_models::Tokenizer;

fn both() -> (Tokenizer, Tokenizer) {
    let dir = stories_dir();
    let gguf = Tokenizer::from_gguf_file(dir.join("stories260K-f32.gguf")).unwrap();
    let hf = Tokenizer::from_hf_file(dir.join("tokenizer.json"), None, None).unwrap();
    (gguf, hf)
}

const TEXTS: &[&str] = &[
    "Once upon a time",
    "",
    " ",
    "a",
    "  two  spaces,  here ",
    "Hello, world! How are you? I'm fine; thanks: \"quoted\" (parens) [brackets] {braces}",
    "Numbers 0 1 23 456 7890 3.14159 -42 1,000,000 and 2024-11-26.",
    "Tabs\tand\nnewlines\r\n too",
    "Unicode: café naïve Zürich — “smart quotes” … ñ é",
    "CJK 日本語 中文 한국어, emoji 😀🎉👍🏽, math ∑∫√∞ ≠ ≤",
    "Control <s> and </s> and <unk> spelled out",
    "Lily's mom said, \"Don't touch the hot stove!\" She was scared.",
    "\u{0}\u{7f}\u{80}\u{10FFFF}",
];

#[test]
fn gguf_metadata_and_tokenizer_json_agree() {
    let (gguf, hf) = both();
    assert_eq!(
        gguf.encode("Once upon a time", true).unwrap(),
        [1, 403, 407, 261, 378]
    );
    assert_eq!(
        hf.encode("Once upon a time", true).unwrap(),
        [1, 403, 407, 261, 378]
    );
    assert_eq!((gguf.bos_id(), gguf.eos_id()), (1, 2));
    assert_eq!((hf.bos_id(), hf.eos_id()), (1, 2));
    assert_eq!(gguf.vocab_size(), 512);
    assert_eq!(hf.vocab_size(), 512);
    for text in TEXTS {
        for add_bos in [false, true] {
            let a = gguf.encode(text, add_bos).unwrap();
            let b = hf.encode(text, add_bos).unwrap();
            assert_eq!(a, b, "{text:?}");
        }
        let ids = gguf.encode(text, true).unwrap();
        assert_eq!(gguf.decode(&ids), *text, "round trip {text:?}");
        assert_eq!(hf.decode(&ids), *text);
    }
    // Characters outside the vocabulary fall back to their UTF-8 bytes.
    let ids = gguf.encode("日", false).unwrap();
    let bytes: Vec<u32> = "日".bytes().map(|b| 3 + b as u32).collect();
    assert_eq!(&ids[ids.len() - 3..], bytes.as_slice());
}

#[test]
fn decode_matches_the_tokenizers_crate() {
    let dir = stories_dir();
    let (gguf, _) = both();
    let reference = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // Arbitrary id sequences, including control ids in odd places and every piece.
    let mut seqs: Vec<Vec<u32>> = TEXTS
        .iter()
        .map(|t| gguf.encode(t, true).unwrap())
        .collect();
    seqs.push((0..3).chain(259..512).collect());
    seqs.push(vec![1, 300, 2, 1, 259, 265]);
    seqs.push(vec![3 + 0xE2, 3 + 0x82, 3 + 0xAC, 400]);
    for ids in seqs {
        let want = reference.decode(&ids, true).unwrap();
        assert_eq!(gguf.decode(&ids), want, "{ids:?}");
    }
    // Invalid UTF-8 differs on purpose: `tokenizers` turns a whole run of byte tokens
    // into U+FFFDs when any of it is invalid; we replace only the invalid bytes.
    let ids = [3 + b'a' as u32, 3 + 0xE2, 400];
    assert_eq!(gguf.decode(&ids), "a\u{FFFD} do");
    assert_eq!(reference.decode(&ids, true).unwrap(), "\u{FFFD}\u{FFFD} do");
}

#[test]
fn streaming_decode_reassembles_decode() {
    let (gguf, hf) = both();
    for tok in [&gguf, &hf] {
        for text in TEXTS {
            let ids = tok.encode(text, true).unwrap();
            let mut out = String::new();
            for i in 0..ids.len() {
                out.push_str(&tok.decode_next(&ids[..i], ids[i]));
            }
            out.push_str(&tok.decode_pending(&ids));
            assert_eq!(out, tok.decode(&ids), "{text:?}");
        }
        // Model output with a story separator (BOS) in the middle.
        let ids = [1, 403, 407, 261, 378, 1, 403];
        let mut out = String::new();
        for i in 0..ids.len() {
            out.push_str(&tok.decode_next(&ids[..i], ids[i]));
        }
        assert_eq!(out, tok.decode(&ids));
    }
}
