//! Delivery of a request's output to its clients, exactly once per token index across task
//! restarts: the sink remembers how far it delivered and ignores repeats. Several clients
//! may watch one request (a reconnecting HTTP client, a second viewer): each subscriber
//! gets the events delivered in this process so far and then every later one, taken under
//! one lock so nothing falls between the history and the live channel.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
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
    /// When the last token was delivered in this process.
    last_at: Option<Instant>,
    text_sent: usize,
    done: bool,
    /// Every event delivered by this sink, in order (tokens from `base` on, then the end):
    /// replayed to a subscriber that attaches late.
    history: Vec<StreamEvent>,
    /// Live subscribers; a closed one is dropped at the next send.
    subscribers: Vec<mpsc::UnboundedSender<StreamEvent>>,
}

impl Cursor {
    fn send(&mut self, event: StreamEvent) {
        self.subscribers.retain(|tx| tx.send(event.clone()).is_ok());
        self.history.push(event);
    }
}

/// What a subscriber attaching to a live sink gets.
pub(crate) struct Subscription {
    /// Tokens below this index were delivered before this sink existed (a resumed
    /// request): they are only in the journal.
    pub base: u32,
    /// Events this sink delivered so far.
    pub history: Vec<StreamEvent>,
    /// Every later event.
    pub live: mpsc::UnboundedReceiver<StreamEvent>,
}

/// What one delivery did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// Time since the previous token was delivered in this process (`None` for the first).
    pub gap: Option<Duration>,
}

/// A request's delivery channel.
pub struct RequestSink {
    cursor: Mutex<Cursor>,
    base: u32,
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
                    last_at: None,
                    text_sent,
                    done: false,
                    history: Vec::new(),
                    subscribers: vec![tx],
                }),
                base: delivered,
            },
            rx,
        )
    }

    /// Attaches one more client: the history so far and a channel of what follows.
    pub(crate) fn subscribe(&self) -> Subscription {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, live) = mpsc::unbounded_channel();
        cursor.subscribers.push(tx);
        Subscription {
            base: self.base,
            history: cursor.history.clone(),
            live,
        }
    }

    /// Tokens delivered so far.
    pub fn delivered(&self) -> u32 {
        self.cursor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .delivered
    }

    /// Delivers token `index` whose visible text (of the whole generation) is `visible`.
    /// Repeats of delivered indices are ignored (`None`); a delivery reports the time since
    /// the previous one in this process (what a client waited between tokens, across any
    /// restart of the task or engine in between).
    pub fn deliver(&self, index: u32, token: u32, visible: &str) -> Option<Delivered> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        if cursor.done || index != cursor.delivered {
            return None;
        }
        let text = visible.get(cursor.text_sent..).unwrap_or("").to_string();
        cursor.text_sent = cursor.text_sent.max(visible.len());
        cursor.delivered += 1;
        let now = Instant::now();
        let gap = cursor.last_at.map(|last| now.duration_since(last));
        cursor.last_at = Some(now);
        cursor.send(StreamEvent::Token { index, token, text });
        Some(Delivered { gap })
    }

    /// Ends the stream (once). The last token's delivery already carried the final text.
    pub fn finish(&self, reason: FinishReason, prompt: usize, completion: usize) {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        if cursor.done {
            return;
        }
        cursor.done = true;
        cursor.send(StreamEvent::Finished {
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
            cursor.send(StreamEvent::Failed { error });
        }
    }
}
