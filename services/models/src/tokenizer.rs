//! Text ↔ token ids: SentencePiece-style BPE from GGUF metadata (so a GGUF file is
//! self-contained) or a Hugging Face `tokenizer.json`, with byte-exact streaming decode.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;

use crate::error::ModelError;

/// SentencePiece's visible space.
const SPACE_MARK: char = '\u{2581}';

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const BYTE: i64 = 6;
}

/// A tokenizer for one model. Cheap to share (`Arc`); all methods take `&self`.
///
/// Text is always treated as plain text: a literal `<s>` in user input is spelled out,
/// never turned into a control token (control tokens are added only through `add_bos`
/// or by the caller), so user text cannot forge sequence boundaries.
pub struct Tokenizer {
    backend: Backend,
    /// Bytes each id decodes to (empty for control tokens). Decoding is done from these
    /// for every backend, so `decode`, `decode_next` and streaming agree byte for byte.
    pieces: Vec<Vec<u8>>,
    /// Whether decoding drops the space the encoder's "▁" prefix put before the text.
    strip_leading_space: bool,
    bos_id: u32,
    eos_id: u32,
    source: PathBuf,
}

enum Backend {
    Spm(Box<Spm>),
    Hf(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "backend",
                &match self.backend {
                    Backend::Spm(_) => "gguf-spm",
                    Backend::Hf(_) => "tokenizer.json",
                },
            )
            .field("vocab_size", &self.pieces.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("source", &self.source)
            .finish()
    }
}

impl Tokenizer {
    /// Token ids of `text`, with the BOS id in front when `add_bos`.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            ids.push(self.bos_id);
        }
        match &self.backend {
            Backend::Spm(spm) => spm.encode(text, &mut ids),
            Backend::Hf(hf) => {
                let enc = hf.encode(text, false).map_err(|e| ModelError::Tokenizer {
                    path: self.source.clone(),
                    detail: format!("encode failed: {e}"),
                })?;
                ids.extend_from_slice(enc.get_ids());
            }
        }
        Ok(ids)
    }

    /// The text of `ids`. Control tokens (BOS, EOS, …) produce nothing; bytes that do not
    /// form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.piece(id));
        }
        let start = usize::from(self.strip_leading_space && bytes.first() == Some(&b' '));
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// The text `next` adds to a stream that has already produced `prev`: the
    /// concatenation of `decode_next(&ids[..i], ids[i])` over a sequence equals
    /// `decode(ids)` minus any incomplete UTF-8 character at its very end (which
    /// [`Tokenizer::decode_pending`] returns). A character split across byte tokens is
    /// emitted once, by the token that completes it. Stateless, so a resumed stream needs
    /// only its ids.
    pub fn decode_next(&self, prev: &[u32], next: u32) -> String {
        let (mut pending, started) = self.tail_state(prev);
        let piece = self.piece(next);
        let piece = if !started && self.strip_leading_space && piece.first() == Some(&b' ') {
            &piece[1..]
        } else {
            piece
        };
        pending.extend_from_slice(piece);
        let keep = incomplete_tail_len(&pending);
        String::from_utf8_lossy(&pending[..pending.len() - keep]).into_owned()
    }

    /// What [`Tokenizer::decode_next`] has held back at the end of `ids` (an unfinished
    /// multi-byte character), as U+FFFD; empty when the stream ends cleanly. Call it when
    /// a stream stops.
    pub fn decode_pending(&self, ids: &[u32]) -> String {
        let (pending, _) = self.tail_state(ids);
        String::from_utf8_lossy(&pending).into_owned()
    }

    /// Bytes the stream has held back after `ids`, and whether the stream has begun (its
    /// first byte is behind us, so no later space is dropped).
    fn tail_state(&self, ids: &[u32]) -> (Vec<u8>, bool) {
        // Only the last few bytes can be an unfinished character (at most 3), so walk back
        // just far enough to see 3 bytes and to learn whether anything precedes them.
        let mut tail: Vec<u8> = Vec::new();
        let mut i = ids.len();
        while i > 0 && tail.len() < 4 {
            i -= 1;
            let p = self.piece(ids[i]);
            if !p.is_empty() {
                let mut t = p.to_vec();
                t.extend_from_slice(&tail);
                tail = t;
            }
        }
        let text_before_tail = ids[..i].iter().any(|&id| !self.piece(id).is_empty());
        // The one leading space `decode` drops belongs to the first byte of the stream.
        let started = text_before_tail || !tail.is_empty();
        if !text_before_tail && self.strip_leading_space && tail.first() == Some(&b' ') {
            tail.remove(0);
        }
        let keep = incomplete_tail_len(&tail);
        (tail[tail.len() - keep..].to_vec(), started)
    }

    /// Whether decoding drops the one space that begins a text (the encoder's "▁" prefix).
    pub fn strips_leading_space(&self) -> bool {
        self.strip_leading_space
    }

    /// The raw bytes of one token (empty for control tokens and unknown ids).
    pub fn piece(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Number of ids the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The vocabulary's spelling of token `id` (`<s>`, `<|begin_of_text|>`…) where the
    /// backend keeps it (tokenizer.json), for templates that need a special token's text.
    pub(crate) fn token_text(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(hf) => hf.id_to_token(id),
            Backend::Spm(_) => None,
        }
    }

    /// The file the tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Reads the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let content = crate::gguf::read_content(path)?;
        Self::from_gguf_metadata(path, &content.metadata)
    }

    /// Builds the tokenizer from GGUF `tokenizer.ggml.*` metadata (`model = "llama"`).
    pub fn from_gguf_metadata(
        path: &Path,
        md: &HashMap<String, Value>,
    ) -> Result<Self, ModelError> {
        let err = |detail: String| ModelError::Tokenizer {
            path: path.to_path_buf(),
            detail,
        };
        match md.get("tokenizer.ggml.model") {
            Some(Value::String(m)) if m == "llama" => {}
            Some(Value::String(m)) => {
                return Err(err(format!(
                    "tokenizer.ggml.model {m:?} is not supported (only \"llama\" SentencePiece BPE)"
                )))
            }
            Some(_) => return Err(err("tokenizer.ggml.model is not a string".into())),
            None => return Err(err("no tokenizer.ggml.model in metadata".into())),
        }
        let tokens: Vec<String> = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(err("tokenizer.ggml.tokens holds a non-string".into())),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(err("tokenizer.ggml.tokens missing or not an array".into())),
        };
        if tokens.is_empty() {
            return Err(err("tokenizer.ggml.tokens is empty".into()));
        }
        let n = tokens.len();
        let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| value_f64(v).map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| err("tokenizer.ggml.scores holds a non-number".into()))?,
            Some(_) => {
                return Err(err(format!(
                    "tokenizer.ggml.scores is not an array of {n} numbers"
                )))
            }
            None => vec![0.0; n],
        };
        let special = |key: &str, default: u32| -> Result<u32, ModelError> {
            match md.get(key) {
                None => Ok(default),
                Some(v) => value_u64(v)
                    .and_then(|x| u32::try_from(x).ok())
                    .filter(|&x| (x as usize) < n)
                    .ok_or_else(|| err(format!("{key} is not an id below {n}"))),
            }
        };
        let bos_id = special("tokenizer.ggml.bos_token_id", 1)?;
        let eos_id = special("tokenizer.ggml.eos_token_id", 2)?;
        let unk_id = special("tokenizer.ggml.unknown_token_id", 0)?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .map(value_i64)
                .collect::<Option<_>>()
                .ok_or_else(|| err("tokenizer.ggml.token_type holds a non-integer".into()))?,
            Some(_) => {
                return Err(err(format!(
                    "tokenizer.ggml.token_type is not an array of {n} integers"
                )))
            }
            None => tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    if parse_byte_token(t).is_some() {
                        token_type::BYTE
                    } else if [bos_id, eos_id].contains(&(i as u32)) {
                        token_type::CONTROL
                    } else if i as u32 == unk_id {
                        token_type::UNKNOWN
                    } else {
                        token_type::NORMAL
                    }
                })
                .collect(),
        };
        let add_space_prefix = match md.get("tokenizer.ggml.add_space_prefix") {
            Some(Value::Bool(b)) => *b,
            _ => true,
        };
        let spm = Spm::new(&tokens, scores, &types, unk_id, add_space_prefix);
        let pieces = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| match ty {
                token_type::BYTE => parse_byte_token(t).map_or_else(Vec::new, |b| vec![b]),
                token_type::NORMAL | token_type::USER_DEFINED => {
                    t.replace(SPACE_MARK, " ").into_bytes()
                }
                _ => Vec::new(),
            })
            .collect();
        Ok(Tokenizer {
            backend: Backend::Spm(Box::new(spm)),
            pieces,
            strip_leading_space: add_space_prefix,
            bos_id,
            eos_id,
            source: path.to_path_buf(),
        })
    }

    /// Reads a Hugging Face `tokenizer.json`. `bos`/`eos` come from the model's config when
    /// known; otherwise the usual names (`<s>`, `</s>`, `<|begin_of_text|>`, …) are looked up.
    pub fn from_hf_file(
        path: impl AsRef<Path>,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let map = crate::mmap::map_file(path)?;
        let err = |detail: String| ModelError::Tokenizer {
            path: path.to_path_buf(),
            detail,
        };
        let mut hf = tokenizers::Tokenizer::from_bytes(&map[..])
            .map_err(|e| err(format!("cannot parse: {e}")))?;
        // Plain-text semantics, as for the GGUF tokenizer (see the type's docs).
        hf.set_encode_special_tokens(true);
        let n = hf.get_vocab_size(true);
        let byte_level = hf
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|s| s.contains("ByteLevel"));
        let unbyte = gpt2_unicode_to_byte();
        let max_id = hf.get_vocab(true).values().copied().max().unwrap_or(0) as usize;
        let mut pieces = vec![Vec::new(); n.max(max_id + 1)];
        for (id, piece) in pieces.iter_mut().enumerate() {
            let Some(tok) = hf.id_to_token(id as u32) else {
                continue;
            };
            if hf.get_added_vocabulary().is_special_token(&tok) {
                continue;
            }
            *piece = if let Some(b) = parse_byte_token(&tok) {
                vec![b]
            } else if byte_level {
                tok.chars()
                    .map(|c| unbyte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| tok.clone().into_bytes())
            } else {
                tok.replace(SPACE_MARK, " ").into_bytes()
            };
        }
        let find = |names: &[&str]| names.iter().find_map(|n| hf.token_to_id(n));
        let bos_id = bos
            .or_else(|| find(&["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"]))
            .ok_or_else(|| err("no BOS token (config bos_token_id or <s>)".into()))?;
        let eos_id = eos
            .or_else(|| find(&["</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"]))
            .ok_or_else(|| err("no EOS token (config eos_token_id or </s>)".into()))?;
        for (what, id) in [("BOS", bos_id), ("EOS", eos_id)] {
            if id as usize >= pieces.len() {
                return Err(err(format!("{what} id {id} is outside the vocabulary")));
            }
        }
        // Whether the decoder drops the space its normalizer prepends is a property of the
        // whole pipeline; measure it rather than parse every decoder variant.
        let probe = hf
            .encode("a", false)
            .map_err(|e| err(format!("encode failed: {e}")))?;
        let raw: Vec<u8> = probe
            .get_ids()
            .iter()
            .flat_map(|&id| pieces.get(id as usize).cloned().unwrap_or_default())
            .collect();
        let decoded = hf
            .decode(probe.get_ids(), true)
            .map_err(|e| err(format!("decode failed: {e}")))?;
        let strip_leading_space = raw.first() == Some(&b' ') && !decoded.starts_with(' ');
        Ok(Tokenizer {
            backend: Backend::Hf(Box::new(hf)),
            pieces,
            strip_leading_space,
            bos_id,
            eos_id,
            source: path.to_path_buf(),
        })
    }
}

/// Length of an unfinished (but so far valid) UTF-8 sequence at the end of `bytes`: the
/// bytes a streaming decoder holds back until the character completes (0 to 3).
pub fn incomplete_tail_len(bytes: &[u8]) -> usize {
    for k in 1..=bytes.len().min(3) {
        let start = bytes.len() - k;
        let lead = bytes[start];
        let need = match lead {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            0x80..=0xBF => continue,
            _ => return 0,
        };
        if need <= k {
            return 0;
        }
        // A valid prefix of a longer sequence is reported by std as "incomplete" (no
        // error length); an impossible one (bad second byte) is invalid, not pending.
        return match std::str::from_utf8(&bytes[start..]) {
            Err(e) if e.error_len().is_none() => k,
            _ => 0,
        };
    }
    0
}

/// `<0xAB>` → 0xAB.
fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The inverse of GPT-2's `bytes_to_unicode`, used by byte-level BPE vocabularies.
fn gpt2_unicode_to_byte() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\u{FFFD}')
        };
        map.insert(c, b);
    }
    map
}

fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I8(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::I64(x) => Some(x),
        _ => value_u64(v).and_then(|x| i64::try_from(x).ok()),
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x.into()),
        Value::F64(x) => Some(x),
        _ => value_i64(v).map(|x| x as f64),
    }
}

/// SentencePiece BPE as llama.cpp runs it on a GGUF vocabulary: split the normalised
/// text into characters, repeatedly merge the adjacent pair whose concatenation is a
/// vocabulary piece of highest score (leftmost on ties), then fall back to byte tokens
/// for characters the vocabulary lacks.
struct Spm {
    /// Pieces that may result from merging (normal and user-defined tokens).
    vocab: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_ids: [Option<u32>; 256],
    unk_id: u32,
    add_space_prefix: bool,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl Spm {
    fn new(
        tokens: &[String],
        scores: Vec<f32>,
        types: &[i64],
        unk_id: u32,
        add_space_prefix: bool,
    ) -> Self {
        let mut vocab = HashMap::with_capacity(tokens.len());
        let mut byte_ids = [None; 256];
        for (i, (t, &ty)) in tokens.iter().zip(types).enumerate() {
            match ty {
                token_type::NORMAL | token_type::USER_DEFINED => {
                    // First id wins for duplicated pieces, as in the HF conversion.
                    vocab.entry(t.clone()).or_insert(i as u32);
                }
                token_type::BYTE => {
                    if let Some(b) = parse_byte_token(t) {
                        byte_ids[b as usize].get_or_insert(i as u32);
                    }
                }
                _ => {}
            }
        }
        Spm {
            vocab,
            scores,
            byte_ids,
            unk_id,
            add_space_prefix,
        }
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut norm = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            norm.push(SPACE_MARK);
        }
        for c in text.chars() {
            norm.push(if c == ' ' { SPACE_MARK } else { c });
        }
        let mut syms: Vec<Symbol> = Vec::with_capacity(norm.len());
        for (start, c) in norm.char_indices() {
            let i = syms.len();
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Symbol], l: usize, r: usize| {
            let (a, b) = (syms[l], syms[r]);
            let piece = &norm[a.start..a.start + a.len + b.len];
            if let Some(&id) = self.vocab.get(piece) {
                heap.push(Bigram {
                    score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                    left: l,
                    right: r,
                    size: piece.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            // Stale entries: one side was merged away or grew since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size || l.next != Some(bg.right) {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.left].next = r.next;
            syms[bg.right].len = 0;
            if let Some(n) = r.next {
                syms[n].prev = Some(bg.left);
            }
            if let Some(p) = l.prev {
                try_add(&mut heap, &syms, p, bg.left);
            }
            if let Some(n) = r.next {
                try_add(&mut heap, &syms, bg.left, n);
            }
        }
        let mut cur = Some(0);
        while let Some(i) = cur {
            let s = syms[i];
            let piece = &norm[s.start..s.start + s.len];
            match self.vocab.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.push(self.byte_ids[b as usize].unwrap_or(self.unk_id));
                    }
                }
            }
            cur = s.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Tokenizer {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let words = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "é"];
        tokens.extend(words.iter().map(|s| s.to_string()));
        let n = tokens.len();
        let mut types = vec![2, 3, 3];
        types.extend(std::iter::repeat_n(6, 256));
        types.extend(std::iter::repeat_n(1, words.len()));
        let scores: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
        let md: HashMap<String, Value> = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Tokenizer::from_gguf_metadata(Path::new("mem"), &md).unwrap()
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let t = tiny();
        let id = |s: &str| {
            259 + ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "é"]
                .iter()
                .position(|w| *w == s)
                .unwrap() as u32
        };
        // "▁a" (score of id 263) outranks "ab" (264): ▁a + b, then ▁ab.
        assert_eq!(t.encode("ab", false).unwrap(), vec![id("▁ab")]);
        assert_eq!(t.encode("abc", true).unwrap(), vec![1, id("▁ab"), id("c")]);
        // 'z' is not in the vocabulary: byte fallback; 'é' is.
        assert_eq!(
            t.encode("z", false).unwrap(),
            vec![id("▁"), 3 + b'z' as u32]
        );
        assert_eq!(t.encode("é", false).unwrap(), vec![id("▁"), id("é")]);
        let ids = t.encode("a zü bc", true).unwrap();
        assert_eq!(t.decode(&ids), "a zü bc");
        assert!(t.encode("", false).unwrap().is_empty());
    }

    #[test]
    fn streaming_matches_decode_across_split_characters() {
        let t = tiny();
        for text in ["a ü €x 😀 bc", "😀", " a", "  a", "ab\u{0}"] {
            let ids = t.encode(text, true).unwrap();
            let mut out = String::new();
            for i in 0..ids.len() {
                out.push_str(&t.decode_next(&ids[..i], ids[i]));
            }
            assert_eq!(out, t.decode(&ids), "{text:?}");
            assert_eq!(out, text);
            assert_eq!(t.decode_pending(&ids), "");
        }
        // A character cut in the middle is held back, then reported as pending.
        let euro = [3 + 0xE2, 3 + 0x82];
        assert_eq!(t.decode_next(&euro[..1], euro[1]), "");
        assert_eq!(t.decode_pending(&euro), "\u{FFFD}");
        assert_eq!(t.decode_next(&euro, 3 + 0xAC), "€");
    }

    #[test]
    fn incomplete_tail_detection() {
        assert_eq!(incomplete_tail_len(b"ab"), 0);
        assert_eq!(incomplete_tail_len(&[b'a', 0xE2]), 1);
        assert_eq!(incomplete_tail_len(&[0xE2, 0x82]), 2);
        assert_eq!(incomplete_tail_len(&[0xE2, 0x82, 0xAC]), 0);
        assert_eq!(incomplete_tail_len(&[0xF0, 0x9F, 0x98]), 3);
        assert_eq!(incomplete_tail_len(&[0xE2, b'a']), 0);
        assert_eq!(incomplete_tail_len(&[0xFF]), 0);
        assert_eq!(
            incomplete_tail_len(&[0xE0, 0x80]),
            0,
            "overlong: invalid, not pending"
        );
    }
}
