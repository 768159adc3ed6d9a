//! Streaming text from tokens, incrementally: each token appends its bytes, complete
//! characters become text, and what may be shown is the text up to the first stop string,
//! holding back what could still become one (and an incomplete UTF-8 character). Work per
//! token is proportional to the token and the stop strings, never to the text so far.
//!
//! The text of a generation is *defined* by this stream run over its tokens from the
//! first: the engine streams with it, and a replay (resume, re-attach) runs it again over
//! the journaled tokens, so every path shows exactly the same text.

use llmos_models::{incomplete_tail_len, Tokenizer};

/// The visible part of a generation after some tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visible<'a> {
    /// Text that may be shown now (a prefix of the final text).
    pub text: &'a str,
    /// A stop string was found: `text` is final and generation must end.
    pub stopped: bool,
}

/// The generated text of one request as its tokens arrive.
#[derive(Clone, Debug)]
pub struct TextStream {
    stop: Vec<String>,
    /// Complete characters decoded so far (invalid byte sequences as U+FFFD).
    text: String,
    /// Bytes of an unfinished character at the end.
    pending: Vec<u8>,
    /// The next non-empty piece loses one leading space (the tokenizer strips the space
    /// that begins a text, and the prompt ended without text of its own).
    strip_space: bool,
    /// Start of the earliest stop string found.
    stop_at: Option<usize>,
    /// Every stop string lying inside `text[..searched]` has been looked for.
    searched: usize,
    /// The stream was finished (the pending bytes were released).
    finished: bool,
}

impl TextStream {
    /// A stream for a generation after `prompt` (only its last token matters: a leading
    /// space is dropped when it has no text of its own, as decoding the whole sequence
    /// would) that stops at any of `stop`.
    pub fn new(tokenizer: &Tokenizer, prompt: &[u32], stop: &[String]) -> Self {
        let last_is_text = prompt
            .last()
            .is_some_and(|&t| !tokenizer.piece(t).is_empty());
        Self {
            stop: stop.to_vec(),
            text: String::new(),
            pending: Vec::new(),
            strip_space: tokenizer.strips_leading_space() && !last_is_text,
            stop_at: None,
            searched: 0,
            finished: false,
        }
    }

    /// A stream that has seen `generated` (the state a replay reaches).
    pub fn replayed(
        tokenizer: &Tokenizer,
        prompt: &[u32],
        stop: &[String],
        generated: &[u32],
    ) -> Self {
        let mut stream = Self::new(tokenizer, prompt, stop);
        for &t in generated {
            stream.push(tokenizer, t);
        }
        stream
    }

    /// Appends one token's bytes.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) {
        let mut piece = tokenizer.piece(token);
        if piece.is_empty() || self.finished {
            return;
        }
        if self.strip_space {
            self.strip_space = false;
            if piece[0] == b' ' {
                piece = &piece[1..];
            }
        }
        self.pending.extend_from_slice(piece);
        let keep = incomplete_tail_len(&self.pending);
        let ready = self.pending.len() - keep;
        if ready > 0 {
            self.text
                .push_str(&String::from_utf8_lossy(&self.pending[..ready]));
            self.pending.drain(..ready);
            self.search_stops();
        }
    }

    /// Ends the stream: an unfinished character is released (as U+FFFD) and nothing is
    /// held back any more.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if !self.pending.is_empty() {
            self.text.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
            self.search_stops();
        }
    }

    /// Looks for stop strings that may end in the text added since the last search.
    fn search_stops(&mut self) {
        if self.stop_at.is_some() || self.stop.is_empty() {
            self.searched = self.text.len();
            return;
        }
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.searched.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let window = &self.text[from..];
        self.stop_at = self
            .stop
            .iter()
            .filter_map(|s| window.find(s.as_str()))
            .min()
            .map(|at| from + at);
        self.searched = self.text.len();
    }

    /// What may be shown now.
    pub fn visible(&self) -> Visible<'_> {
        if let Some(cut) = self.stop_at {
            return Visible {
                text: &self.text[..cut],
                stopped: true,
            };
        }
        let mut end = self.text.len();
        if !self.finished {
            let mut holdback = 0;
            for s in &self.stop {
                for len in (1..s.len()).rev() {
                    if s.is_char_boundary(len) && self.text.ends_with(&s[..len]) {
                        holdback = holdback.max(len);
                        break;
                    }
                }
            }
            end -= holdback;
        }
        Visible {
            text: &self.text[..end],
            stopped: false,
        }
    }

    /// Whether a stop string has appeared.
    pub fn stopped(&self) -> bool {
        self.stop_at.is_some()
    }
}

/// The visible text after the first `count` of `generated`, released as at the end when
/// `finished` (the text a client had been shown then).
pub fn visible_after(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    stop: &[String],
    generated: &[u32],
    count: usize,
    finished: bool,
) -> String {
    let mut stream = TextStream::replayed(tokenizer, prompt, stop, &generated[..count]);
    if finished {
        stream.finish();
    }
    stream.visible().text.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tokenizer() -> Tokenizer {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/models/stories260K/stories260K-f32.gguf");
        Tokenizer::from_gguf_file(path).unwrap()
    }

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// The generated text of `ids` after `prompt`, by decoding the whole sequence.
    fn decoded(tok: &Tokenizer, prompt: &[u32], ids: &[u32]) -> String {
        let mut all = prompt.to_vec();
        all.extend_from_slice(ids);
        let full = tok.decode(&all);
        full[tok.decode(prompt).len()..].to_string()
    }

    /// The visible text of `text`'s tokens after a prompt, token by token, and the text
    /// as a whole decode gives it.
    fn stream(tok: &Tokenizer, text: &str, stop: &[String]) -> (Vec<(String, bool)>, String) {
        let prompt = tok.encode("Once", true).unwrap();
        let ids = tok.encode(text, false).unwrap();
        let mut s = TextStream::new(tok, &prompt, stop);
        let steps = ids
            .iter()
            .map(|&t| {
                s.push(tok, t);
                let v = s.visible();
                (v.text.to_string(), v.stopped)
            })
            .collect();
        (steps, decoded(tok, &prompt, &ids))
    }

    #[test]
    fn streamed_text_equals_the_decoded_text() {
        let tok = tokenizer();
        let prompt = tok.encode("Once upon", true).unwrap();
        let ids = tok
            .encode("a time, there was a café — naïve 😀 and 中文 text.", false)
            .unwrap();
        let whole = decoded(&tok, &prompt, &ids);
        let mut s = TextStream::new(&tok, &prompt, &[]);
        for &t in &ids {
            s.push(&tok, t);
            let shown = s.visible().text.to_string();
            assert!(whole.starts_with(&shown), "{shown:?} of {whole:?}");
        }
        s.finish();
        assert_eq!(s.visible().text, whole);
    }

    #[test]
    fn a_possible_stop_prefix_is_held_back_until_resolved() {
        let tok = tokenizer();
        let stop = stops(&["The end"]);
        let (steps, whole) = stream(&tok, "and so. The end. More", &stop);
        let cut = whole.find("The end").unwrap();
        let last = steps.last().unwrap();
        assert_eq!(last.0, whole[..cut]);
        assert!(last.1);
        // Never showed any part of the stop string.
        assert!(steps.iter().all(|(t, _)| !t.contains("The")));
        let (open, whole) = stream(&tok, "and so. The e", &stop);
        assert_eq!(open.last().unwrap().0, whole[..whole.find("The").unwrap()]);
    }

    #[test]
    fn the_earliest_stop_string_wins_and_text_only_grows() {
        let tok = tokenizer();
        let stop = stops(&["b", "a"]);
        let (steps, whole) = stream(&tok, "xxaxb", &stop);
        assert_eq!(steps.last().unwrap().0, whole[..whole.find('a').unwrap()]);
        let mut last = String::new();
        let (steps, whole) = stream(&tok, "Hello E world EN then END", &stops(&["END"]));
        for (text, _) in steps {
            assert!(text.starts_with(&last), "{last:?} then {text:?}");
            last = text;
        }
        assert_eq!(last, whole[..whole.find("END").unwrap()]);
    }

    #[test]
    fn a_split_character_waits_for_its_last_byte() {
        let tok = tokenizer();
        let prompt = tok.encode("Once", true).unwrap();
        let ids = tok.encode("😀", false).unwrap();
        assert!(ids.len() > 2, "the emoji is spelled in byte tokens");
        let whole = decoded(&tok, &prompt, &ids);
        assert!(whole.ends_with('😀'));
        let mut s = TextStream::new(&tok, &prompt, &[]);
        for &t in &ids[..ids.len() - 1] {
            s.push(&tok, t);
            assert!(!s.visible().text.contains('\u{FFFD}'));
        }
        s.push(&tok, ids[ids.len() - 1]);
        assert_eq!(s.visible().text, whole);
        // Cut short, the unfinished bytes come out as one replacement character.
        let mut cut = TextStream::replayed(&tok, &prompt, &[], &ids[..ids.len() - 1]);
        cut.finish();
        assert_eq!(cut.visible().text, whole.replace('😀', "\u{FFFD}"));
    }

    #[test]
    fn a_replayed_stream_shows_what_the_live_one_showed() {
        let tok = tokenizer();
        let prompt = tok.encode("Once", true).unwrap();
        let ids = tok.encode(" one two. STOP three", false).unwrap();
        let stop = stops(&["STOP"]);
        let mut live = TextStream::new(&tok, &prompt, &stop);
        for (i, &t) in ids.iter().enumerate() {
            live.push(&tok, t);
            assert_eq!(
                live.visible().text,
                visible_after(&tok, &prompt, &stop, &ids, i + 1, false)
            );
        }
    }
}
