//! Delivery of a request's output to its client, exactly once per token index across task
//! restarts: the sink remembers how far it delivered and ignores repeats.

use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::mpsc;

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
    /// The request failed (its task kept crashing); journaled so no resume retries it.
    Error,
}

impl FinishReason {
    pub(crate) fn code(self) -> u8 {
        match self {
            FinishReason::Stop => 0,
            FinishReason::Length => 1,
            FinishReason::Error => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            0 => FinishReason::Stop,
            1 => FinishReason::Length,
            _ => FinishReason::Error,
        }
    }
}

/// What a client receives.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// A generated token and the text it makes visible (may be empty while held back).
    Token {
        /// 0-based index of the token among the generated ones.
        index: u32,
        /// The token id.
        token: u32,
        /// Newly visible text.
        text: String,
    },
    /// The generation ended.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// The request failed; nothing more comes.
    Failed {
        /// The error.
        error: String,
    },
}

struct Cursor {
    delivered: u32,
    text_sent: usize,
    done: bool,
}

/// A request's delivery channel.
pub struct RequestSink {
    cursor: Mutex<Cursor>,
    tx: mpsc::UnboundedSender<StreamEvent>,
}

impl RequestSink {
    /// A sink that already delivered `delivered` tokens and `text_sent` bytes of text (a
    /// resumed request), and its receiving end.
    pub fn new(delivered: u32, text_sent: usize) -> (Self, mpsc::UnboundedReceiver<StreamEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                cursor: Mutex::new(Cursor {
                    delivered,
                    text_sent,
                    done: false,
                }),
                tx,
            },
            rx,
        )
    }

    /// Tokens delivered so far.
    pub fn delivered(&self) -> u32 {
        self.cursor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .delivered
    }

    /// Delivers token `index` whose visible text (of the whole generation) is `visible`.
    /// Repeats of delivered indices are ignored; returns whether this call delivered.
    pub fn deliver(&self, index: u32, token: u32, visible: &str) -> bool {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        if cursor.done || index != cursor.delivered {
            return false;
        }
        let text = visible.get(cursor.text_sent..).unwrap_or("").to_string();
        cursor.text_sent = cursor.text_sent.max(visible.len());
        cursor.delivered += 1;
        let _ = self.tx.send(StreamEvent::Token { index, token, text });
        true
    }

    /// Ends the stream (once). The last token's delivery already carried the final text.
    pub fn finish(&self, reason: FinishReason, prompt: usize, completion: usize) {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        if cursor.done {
            return;
        }
        cursor.done = true;
        let _ = self.tx.send(StreamEvent::Finished {
            reason,
            prompt_tokens: prompt,
            completion_tokens: completion,
        });
    }

    /// Fails the stream (once).
    pub fn fail(&self, error: String) {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        if !cursor.done {
            cursor.done = true;
            let _ = self.tx.send(StreamEvent::Failed { error });
        }
    }
}
