//! A chat session as checkpointed: its settings, finished turns and the pending one; and
//! how its prompt is built within the model's context.

use llmos_app::{AppError, ChatMessage, Completions};
use serde::{Deserialize, Serialize};

/// Sampling of a session's replies.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnParams {
    /// Reply length limit, tokens.
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// Seed of the sampler (each turn uses it; replies differ through their prompts).
    pub seed: u64,
}

/// A finished turn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// The user's message.
    pub user: String,
    /// The reply (empty when the turn failed).
    pub assistant: String,
    /// The runtime request that generated it.
    pub request: Option<u64>,
    /// `stop` or `length`.
    pub finish_reason: Option<String>,
    /// Why the turn failed; a failed turn is left out of later prompts.
    pub error: Option<String>,
}

/// The turn in progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// Its number (1-based).
    pub turn: u32,
    /// The user's message.
    pub user: String,
    /// Reply length limit.
    pub max_tokens: usize,
    /// The runtime request, once submitted.
    pub request: Option<u64>,
}

/// One session: the unit of checkpointing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// `s-N`.
    pub id: String,
    /// System message.
    pub system: Option<String>,
    /// Sampling of replies.
    pub params: TurnParams,
    /// Finished turns, oldest first.
    pub turns: Vec<Turn>,
    /// The turn in progress.
    pub pending: Option<Pending>,
}

/// A message as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// A session as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    /// `s-N`.
    pub id: String,
    /// The conversation: system message, then user and assistant messages of each
    /// successful turn.
    pub messages: Vec<MessageView>,
    /// Every finished turn.
    pub turns: Vec<TurnView>,
    /// The turn in progress, if any.
    pub pending_turn: Option<u32>,
    /// Sampling of replies.
    pub params: TurnParams,
}

/// A finished turn as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnView {
    /// Turn number (1-based).
    pub turn: u32,
    /// The user's message.
    pub user: String,
    /// The reply.
    pub reply: String,
    /// The runtime request id.
    pub request: Option<u64>,
    /// `stop` or `length`.
    pub finish_reason: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl Session {
    /// Turn `turn` if it has ended.
    pub fn turn_view(&self, turn: u32) -> Option<TurnView> {
        let index = usize::try_from(turn).ok()?.checked_sub(1)?;
        self.turns.get(index).map(|t| TurnView {
            turn,
            user: t.user.clone(),
            reply: t.assistant.clone(),
            request: t.request,
            finish_reason: t.finish_reason.clone(),
            error: t.error.clone(),
        })
    }

    /// The whole session for clients.
    pub fn view(&self) -> SessionView {
        let messages = self
            .history(0)
            .into_iter()
            .map(|m| MessageView {
                role: m.role,
                content: m.content,
            })
            .collect();
        SessionView {
            id: self.id.clone(),
            messages,
            turns: (1..=self.turns.len() as u32)
                .filter_map(|t| self.turn_view(t))
                .collect(),
            pending_turn: self.pending.as_ref().map(|p| p.turn),
            params: self.params,
        }
    }

    /// One line for the session list.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "turns": self.turns.len(),
            "pending_turn": self.pending.as_ref().map(|p| p.turn),
        })
    }

    /// The system message and the successful turns from `first` on, as chat messages.
    fn history(&self, first: usize) -> Vec<ChatMessage> {
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        for turn in self.turns.iter().skip(first).filter(|t| t.error.is_none()) {
            messages.push(ChatMessage::new("user", turn.user.clone()));
            messages.push(ChatMessage::new("assistant", turn.assistant.clone()));
        }
        messages
    }

    /// The prompt of a new turn saying `user`: the model's chat template over the history
    /// and the new message, leaving out the oldest turns until the prompt and
    /// `max_tokens` fit the context (or only the new message is left).
    pub fn prompt(
        &self,
        completions: &Completions,
        user: &str,
        max_tokens: usize,
        context: usize,
    ) -> Result<String, AppError> {
        let mut first = 0;
        loop {
            let mut messages = self.history(first);
            messages.push(ChatMessage::new("user", user));
            let prompt = completions.chat_prompt(&messages)?;
            let fits = completions.count_tokens(&prompt)? + max_tokens <= context;
            if fits || first >= self.turns.len() {
                return Ok(prompt);
            }
            first += 1;
        }
    }
}
