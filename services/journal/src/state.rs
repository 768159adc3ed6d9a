//! The per-request state a journal describes, and the sequence rules a record must keep
//! to change it. The same rules run when a record is appended and when it is replayed,
//! so a log this crate wrote never holds a record that replay would reject.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::record::Record;

/// Everything the journal knows about one request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestLog {
    /// The prompt, tokenized.
    pub prompt_tokens: Vec<u32>,
    /// Opaque sampling parameters and model id, as given in `Begin`.
    pub params: Vec<u8>,
    /// Generated tokens; `tokens[i]` is the token journaled with index `i`.
    pub tokens: Vec<u32>,
    /// The sampler state journaled with the last token; empty before the first token.
    pub last_sampler_state: Vec<u8>,
    /// The finish code, once `End` is journaled.
    pub finished: Option<u8>,
    /// How many tokens the client has acknowledged (the highest `Delivered` cursor).
    pub delivered: u32,
}

impl RequestLog {
    /// Whether `End` has been journaled.
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// The records that rebuild this state in a fresh log: what compaction writes.
    /// Intermediate tokens carry an empty sampler state, since only the last one is kept.
    pub fn to_records(&self, request: u64) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.tokens.len() + 3);
        out.push(Record::Begin {
            request,
            prompt_tokens: self.prompt_tokens.clone(),
            params: self.params.clone(),
        });
        let last = self.tokens.len().saturating_sub(1);
        for (i, &token) in self.tokens.iter().enumerate() {
            out.push(Record::Token {
                request,
                index: i as u32,
                token,
                sampler_state: if i == last {
                    self.last_sampler_state.clone()
                } else {
                    Vec::new()
                },
            });
        }
        if self.delivered > 0 {
            out.push(Record::Delivered {
                request,
                cursor: self.delivered,
            });
        }
        if let Some(reason) = self.finished {
            out.push(Record::End { request, reason });
        }
        out
    }
}

/// A record that breaks the sequence rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum Violation {
    /// `Token`, `End` or `Delivered` for a request with no `Begin`.
    #[error("request {request} was never begun")]
    UnknownRequest {
        /// The request.
        request: u64,
    },
    /// A second `Begin` with a different prompt or parameters.
    #[error("request {request} was already begun with a different prompt or parameters")]
    ConflictingBegin {
        /// The request.
        request: u64,
    },
    /// A token index past the next expected one.
    #[error(
        "request {request}: token index {index} leaves a gap (next expected index is {expected})"
    )]
    Gap {
        /// The request.
        request: u64,
        /// The index in the record.
        index: u32,
        /// The next index the request expects.
        expected: u32,
    },
    /// A token index already journaled with another token.
    #[error("request {request}: token index {index} is {got}, but {journaled} is already journaled there")]
    ConflictingToken {
        /// The request.
        request: u64,
        /// The index in the record.
        index: u32,
        /// The token already journaled at that index.
        journaled: u32,
        /// The token in the record.
        got: u32,
    },
    /// A new token after `End`.
    #[error("request {request}: token index {index} after the request ended")]
    TokenAfterEnd {
        /// The request.
        request: u64,
        /// The index in the record.
        index: u32,
    },
    /// A second `End` with another finish code.
    #[error(
        "request {request}: ended with reason {got}, but already ended with reason {journaled}"
    )]
    ConflictingEnd {
        /// The request.
        request: u64,
        /// The finish code already journaled.
        journaled: u8,
        /// The finish code in the record.
        got: u8,
    },
    /// A delivery cursor past the journaled tokens: a token was sent before it was durable.
    #[error("request {request}: delivery cursor {cursor} is beyond the {tokens} journaled tokens")]
    CursorBeyondTokens {
        /// The request.
        request: u64,
        /// The cursor in the record.
        cursor: u32,
        /// Tokens journaled.
        tokens: u32,
    },
}

impl Violation {
    /// The request the offending record names.
    pub fn request(&self) -> u64 {
        match self {
            Violation::UnknownRequest { request }
            | Violation::ConflictingBegin { request }
            | Violation::Gap { request, .. }
            | Violation::ConflictingToken { request, .. }
            | Violation::TokenAfterEnd { request, .. }
            | Violation::ConflictingEnd { request, .. }
            | Violation::CursorBeyondTokens { request, .. } => *request,
        }
    }

    /// The token index the offending record names, for token records.
    pub fn index(&self) -> Option<u32> {
        match self {
            Violation::Gap { index, .. }
            | Violation::ConflictingToken { index, .. }
            | Violation::TokenAfterEnd { index, .. } => Some(*index),
            _ => None,
        }
    }
}

/// How to take back one applied record, so a failed append leaves no trace.
#[derive(Debug)]
pub(crate) enum Undo {
    Begin(u64),
    Token { request: u64, prev_state: Vec<u8> },
    End(u64),
    Delivered { request: u64, prev: u32 },
}

/// All requests, keyed by id.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) requests: BTreeMap<u64, RequestLog>,
}

impl State {
    /// Applies `record` if it keeps the rules. `Ok(None)`: an exact repeat of something
    /// already journaled, which changes nothing (a resumed task may re-append the token it
    /// was not sure had been acknowledged).
    pub(crate) fn apply(&mut self, record: &Record) -> Result<Option<Undo>, Violation> {
        let request = record.request();
        match record {
            Record::Begin {
                prompt_tokens,
                params,
                ..
            } => match self.requests.get(&request) {
                Some(log) if log.prompt_tokens == *prompt_tokens && log.params == *params => {
                    Ok(None)
                }
                Some(_) => Err(Violation::ConflictingBegin { request }),
                None => {
                    self.requests.insert(
                        request,
                        RequestLog {
                            prompt_tokens: prompt_tokens.clone(),
                            params: params.clone(),
                            ..RequestLog::default()
                        },
                    );
                    Ok(Some(Undo::Begin(request)))
                }
            },
            Record::Token {
                index,
                token,
                sampler_state,
                ..
            } => {
                let log = self.begun(request)?;
                let (index, token) = (*index, *token);
                let expected = log.tokens.len() as u32;
                if index < expected {
                    let journaled = log.tokens[index as usize];
                    return if journaled == token {
                        Ok(None)
                    } else {
                        Err(Violation::ConflictingToken {
                            request,
                            index,
                            journaled,
                            got: token,
                        })
                    };
                }
                if log.finished.is_some() {
                    return Err(Violation::TokenAfterEnd { request, index });
                }
                if index > expected {
                    return Err(Violation::Gap {
                        request,
                        index,
                        expected,
                    });
                }
                log.tokens.push(token);
                let prev_state =
                    std::mem::replace(&mut log.last_sampler_state, sampler_state.clone());
                Ok(Some(Undo::Token {
                    request,
                    prev_state,
                }))
            }
            Record::End { reason, .. } => {
                let log = self.begun(request)?;
                match log.finished {
                    Some(journaled) if journaled == *reason => Ok(None),
                    Some(journaled) => Err(Violation::ConflictingEnd {
                        request,
                        journaled,
                        got: *reason,
                    }),
                    None => {
                        log.finished = Some(*reason);
                        Ok(Some(Undo::End(request)))
                    }
                }
            }
            Record::Delivered { cursor, .. } => {
                let log = self.begun(request)?;
                let tokens = log.tokens.len() as u32;
                if *cursor > tokens {
                    return Err(Violation::CursorBeyondTokens {
                        request,
                        cursor: *cursor,
                        tokens,
                    });
                }
                // Acknowledgements may arrive out of order; the cursor only moves forward.
                if *cursor <= log.delivered {
                    return Ok(None);
                }
                let prev = std::mem::replace(&mut log.delivered, *cursor);
                Ok(Some(Undo::Delivered { request, prev }))
            }
        }
    }

    fn begun(&mut self, request: u64) -> Result<&mut RequestLog, Violation> {
        self.requests
            .get_mut(&request)
            .ok_or(Violation::UnknownRequest { request })
    }

    /// Takes back one applied record; undo entries must be replayed newest first.
    pub(crate) fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Begin(request) => {
                self.requests.remove(&request);
            }
            Undo::Token {
                request,
                prev_state,
            } => {
                if let Some(log) = self.requests.get_mut(&request) {
                    log.tokens.pop();
                    log.last_sampler_state = prev_state;
                }
            }
            Undo::End(request) => {
                if let Some(log) = self.requests.get_mut(&request) {
                    log.finished = None;
                }
            }
            Undo::Delivered { request, prev } => {
                if let Some(log) = self.requests.get_mut(&request) {
                    log.delivered = prev;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(request: u64) -> Record {
        Record::Begin {
            request,
            prompt_tokens: vec![1, 2],
            params: vec![7],
        }
    }

    fn token(request: u64, index: u32, token: u32) -> Record {
        Record::Token {
            request,
            index,
            token,
            sampler_state: vec![index as u8],
        }
    }

    #[test]
    fn rules_accept_contiguous_tokens_and_ignore_exact_repeats() {
        let mut s = State::default();
        assert!(s.apply(&begin(1)).unwrap().is_some());
        assert!(s.apply(&begin(1)).unwrap().is_none());
        assert!(s.apply(&token(1, 0, 10)).unwrap().is_some());
        assert!(s.apply(&token(1, 1, 11)).unwrap().is_some());
        assert!(s.apply(&token(1, 0, 10)).unwrap().is_none());
        let log = &s.requests[&1];
        assert_eq!(log.tokens, vec![10, 11]);
        assert_eq!(
            log.last_sampler_state,
            vec![1],
            "a repeat leaves the state alone"
        );
    }

    #[test]
    fn rules_name_the_request_and_index_of_each_violation() {
        let mut s = State::default();
        assert_eq!(
            s.apply(&token(5, 0, 1)).err(),
            Some(Violation::UnknownRequest { request: 5 })
        );
        s.apply(&begin(5)).unwrap();
        let conflicting_begin = Record::Begin {
            request: 5,
            prompt_tokens: vec![9],
            params: vec![],
        };
        assert_eq!(
            s.apply(&conflicting_begin).err(),
            Some(Violation::ConflictingBegin { request: 5 })
        );
        let gap = s.apply(&token(5, 1, 1)).unwrap_err();
        assert_eq!((gap.request(), gap.index()), (5, Some(1)));
        s.apply(&token(5, 0, 1)).unwrap();
        assert_eq!(
            s.apply(&token(5, 0, 2)).err(),
            Some(Violation::ConflictingToken {
                request: 5,
                index: 0,
                journaled: 1,
                got: 2
            })
        );
        assert!(matches!(
            s.apply(&Record::Delivered {
                request: 5,
                cursor: 2
            }),
            Err(Violation::CursorBeyondTokens { .. })
        ));
        s.apply(&Record::End {
            request: 5,
            reason: 1,
        })
        .unwrap();
        assert!(s
            .apply(&Record::End {
                request: 5,
                reason: 1
            })
            .unwrap()
            .is_none());
        assert!(matches!(
            s.apply(&Record::End {
                request: 5,
                reason: 2
            }),
            Err(Violation::ConflictingEnd { .. })
        ));
        assert_eq!(
            s.apply(&token(5, 1, 3)).err(),
            Some(Violation::TokenAfterEnd {
                request: 5,
                index: 1
            })
        );
        assert!(
            s.apply(&token(5, 0, 1)).unwrap().is_none(),
            "repeat after End"
        );
    }

    #[test]
    fn undo_restores_the_previous_state_exactly() {
        let mut s = State::default();
        s.apply(&begin(1)).unwrap();
        s.apply(&token(1, 0, 10)).unwrap();
        let before = s.requests.clone();
        let mut undo = Vec::new();
        for r in [
            token(1, 1, 11),
            Record::Delivered {
                request: 1,
                cursor: 2,
            },
            Record::End {
                request: 1,
                reason: 0,
            },
            begin(2),
        ] {
            undo.extend(s.apply(&r).unwrap());
        }
        while let Some(u) = undo.pop() {
            s.undo(u);
        }
        assert_eq!(s.requests, before);
    }

    #[test]
    fn to_records_rebuilds_the_same_state() {
        let mut s = State::default();
        s.apply(&begin(4)).unwrap();
        for i in 0..3 {
            s.apply(&token(4, i, 100 + i)).unwrap();
        }
        s.apply(&Record::Delivered {
            request: 4,
            cursor: 2,
        })
        .unwrap();
        let mut rebuilt = State::default();
        for r in s.requests[&4].to_records(4) {
            rebuilt.apply(&r).unwrap();
        }
        assert_eq!(rebuilt.requests, s.requests);
    }
}
