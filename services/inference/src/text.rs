//! Streaming text from tokens: what may be shown of the generated text so far, holding
//! back what could still become a stop string or an incomplete UTF-8 character. A pure
//! function of the token sequence, so a resumed request shows exactly the same text.

/// The visible part of a generation after some tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visible {
    /// Text that may be shown now (a prefix of the final text).
    pub text: String,
    /// A stop string was found: `text` is final and generation must end.
    pub stopped: bool,
}

/// Computes the visible text of `generated` (already decoded to text) under `stop`
/// strings. With `finished` the holdback is released (no stop string can complete any more).
pub fn visible(generated: &str, stop: &[String], finished: bool) -> Visible {
    if let Some(cut) = stop.iter().filter_map(|s| generated.find(s.as_str())).min() {
        return Visible {
            text: generated[..cut].to_string(),
            stopped: true,
        };
    }
    let mut end = generated.len();
    if !finished {
        // An undecodable tail (a multi-byte character split across byte tokens) decodes to
        // U+FFFD until its last byte arrives.
        while generated[..end].ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let mut holdback = 0;
        for s in stop {
            for len in (1..s.len()).rev() {
                if s.is_char_boundary(len) && generated[..end].ends_with(&s[..len]) {
                    holdback = holdback.max(len);
                    break;
                }
            }
        }
        end -= holdback;
    }
    Visible {
        text: generated[..end].to_string(),
        stopped: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn without_stop_strings_everything_shows() {
        assert_eq!(visible("abc", &[], false).text, "abc");
    }

    #[test]
    fn a_possible_stop_prefix_is_held_back_until_resolved() {
        let stop = stops(&["The end"]);
        assert_eq!(visible("Once. The e", &stop, false).text, "Once. ");
        assert_eq!(visible("Once. The ex", &stop, false).text, "Once. The ex");
        let done = visible("Once. The end. More", &stop, false);
        assert_eq!((done.text.as_str(), done.stopped), ("Once. ", true));
        assert_eq!(visible("Once. The e", &stop, true).text, "Once. The e");
    }

    #[test]
    fn the_earliest_stop_string_wins_and_partial_characters_wait() {
        let stop = stops(&["b", "a"]);
        assert_eq!(visible("xxaxb", &stop, false).text, "xx");
        assert_eq!(visible("caf\u{FFFD}", &[], false).text, "caf");
    }

    #[test]
    fn the_visible_text_only_grows() {
        let stop = stops(&["\n\n", "END"]);
        let full = "Hello E\nworld EN, then\n\nEND";
        let mut last = String::new();
        for end in 0..=full.len() {
            if !full.is_char_boundary(end) {
                continue;
            }
            let v = visible(&full[..end], &stop, false);
            assert!(v.text.starts_with(&last), "{:?} then {:?}", last, v.text);
            last = v.text;
        }
        assert_eq!(last, "Hello E\nworld EN, then");
    }
}
