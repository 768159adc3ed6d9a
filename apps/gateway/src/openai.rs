//! OpenAI request bodies → a prompt and [`SamplingParams`], checked field by field so
//! every refusal names its `param`; and the response/chunk JSON shapes.
//!
//! Parameters read: `model`, `prompt` (a string, or an array of one string), `messages`,
//! `max_tokens` (`max_completion_tokens` for chat), `temperature`, `top_p`, `top_k`
//! (extension), `seed`, `stop` (string or array of ≤ 4), `repetition_penalty` (extension),
//! `stream`, `stream_options`, `n` (1 only), `user` (ignored). Parameters we cannot honour
//! are refused with 422 unless they hold their neutral value: `frequency_penalty` and
//! `presence_penalty` (0; OpenAI's additive penalties are not our multiplicative
//! repetition penalty, so mapping one onto the other would be dishonest), `logprobs`,
//! `top_logprobs`, `echo`, `best_of` (1), `suffix`, `logit_bias`, `tools`, `functions`,
//! `tool_choice`, `response_format` (`text` only). Any other field is ignored.
//!
//! Chat `messages` are checked here (roles `system`, `developer`, `user`, `assistant`;
//! content a string or a list of text parts, joined) and rendered by
//! [`LoadedModel::chat_prompt`]: with the model's own chat template (GGUF
//! `tokenizer.chat_template`, or `chat_template` in a Hugging Face
//! `tokenizer_config.json`), else with the documented default — one line `ROLE: CONTENT`
//! per message, then `assistant:`. A template that refuses the messages (its
//! `raise_exception`, e.g. roles that do not alternate) or fails is a 400
//! `chat_template_error` naming `messages`.

use axum::http::StatusCode;
use llmos_inference::{ChatMessage, LoadedModel, SamplingParams};
use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// Which endpoint a request came through: decides the id prefix and the JSON shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

impl Kind {
    /// The public id of runtime request `id`.
    pub fn public_id(self, id: u64) -> String {
        match self {
            Kind::Completion => format!("cmpl-{id}"),
            Kind::Chat => format!("chatcmpl-{id}"),
        }
    }

    /// Parses `cmpl-N`, `chatcmpl-N` or a bare `N`.
    pub fn parse_id(text: &str) -> Option<(Kind, u64)> {
        if let Some(n) = text.strip_prefix("chatcmpl-") {
            return n.parse().ok().map(|n| (Kind::Chat, n));
        }
        let n = text.strip_prefix("cmpl-").unwrap_or(text);
        n.parse().ok().map(|n| (Kind::Completion, n))
    }
}

/// A checked request.
#[derive(Debug)]
pub struct Parsed {
    /// The prompt text given to the runtime.
    pub prompt: String,
    /// Sampling.
    pub params: SamplingParams,
    /// Server-sent events instead of one JSON body.
    pub stream: bool,
}

/// Parses a request body: malformed JSON is 400, a wrong field 422, an unknown model 404.
/// `context` bounds the default `max_tokens` of chat; chat messages are rendered into the
/// prompt with `model`'s chat template ([`chat_prompt`]).
pub fn parse(
    kind: Kind,
    body: &[u8],
    model_id: &str,
    context: usize,
    model: &LoadedModel,
) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid(
            "body",
            "the request body must be a JSON object",
        ));
    };
    if let Some(model) = obj.get("model") {
        let name = model
            .as_str()
            .ok_or_else(|| ApiError::invalid("model", "model must be a string"))?;
        if name != model_id {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "model_not_found",
                format!("the model `{name}` does not exist; this server serves `{model_id}`"),
            )
            .param("model"));
        }
    }
    refuse_unsupported(&obj)?;
    let prompt = match kind {
        Kind::Completion => completion_prompt(obj.get("prompt"))?,
        Kind::Chat => chat_prompt(obj.get("messages"), model)?,
    };
    let default_max = match kind {
        Kind::Completion => 16,
        Kind::Chat => context,
    };
    let max_tokens = match kind {
        Kind::Chat if obj.contains_key("max_completion_tokens") => {
            uint(&obj, "max_completion_tokens")?
        }
        _ => uint(&obj, "max_tokens")?,
    }
    .unwrap_or(default_max as u64);
    if max_tokens == 0 {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    let temperature = number(&obj, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            "temperature must be in [0, 2]",
        ));
    }
    let params = SamplingParams {
        temperature: temperature as f32,
        top_k: uint(&obj, "top_k")?.unwrap_or(0) as usize,
        top_p: number(&obj, "top_p")?.unwrap_or(1.0) as f32,
        repetition_penalty: number(&obj, "repetition_penalty")?.unwrap_or(1.0) as f32,
        max_tokens: max_tokens.min(usize::MAX as u64) as usize,
        stop: stop(obj.get("stop"))?,
        seed: uint(&obj, "seed")?.unwrap_or(0),
    };
    params.validate().map_err(|e| {
        let param = first_word(&e.to_string());
        ApiError::from(e).param(param)
    })?;
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "stream must be a boolean")),
    };
    Ok(Parsed {
        prompt,
        params,
        stream,
    })
}

/// The field name a sampler validation message starts with (`top_p: …`).
fn first_word(message: &str) -> String {
    let rest = message
        .strip_prefix("invalid sampling parameters: ")
        .unwrap_or(message);
    rest.split(':').next().unwrap_or("").to_string()
}

fn refuse_unsupported(obj: &Map<String, Value>) -> Result<(), ApiError> {
    let neutral = |name: &str, ok: &dyn Fn(&Value) -> bool| -> Result<(), ApiError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if ok(v) => Ok(()),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("{name} is not supported by this server (see the gateway docs)"),
            )),
        }
    };
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    let one = |v: &Value| v.as_u64() == Some(1);
    let falsy = |v: &Value| v == &Value::Bool(false) || v.as_u64() == Some(0);
    let empty = |v: &Value| {
        v.as_object().is_some_and(Map::is_empty) || v.as_array().is_some_and(Vec::is_empty)
    };
    neutral("frequency_penalty", &zero)?;
    neutral("presence_penalty", &zero)?;
    neutral("n", &one)?;
    neutral("best_of", &one)?;
    neutral("logprobs", &falsy)?;
    neutral("top_logprobs", &falsy)?;
    neutral("echo", &falsy)?;
    neutral("suffix", &|v: &Value| v.as_str() == Some(""))?;
    neutral("logit_bias", &empty)?;
    neutral("tools", &empty)?;
    neutral("functions", &empty)?;
    neutral("tool_choice", &|v: &Value| v.as_str() == Some("none"))?;
    neutral("response_format", &|v: &Value| {
        v.get("type").and_then(Value::as_str) == Some("text")
    })?;
    Ok(())
}

fn completion_prompt(value: Option<&Value>) -> Result<String, ApiError> {
    match value {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Ok(items[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "prompt",
            "prompt must be a string or an array of exactly one string (batches are not supported)",
        )),
        None | Some(Value::Null) => Err(ApiError::invalid("prompt", "prompt is required")),
        Some(_) => Err(ApiError::invalid("prompt", "prompt must be a string")),
    }
}

/// The prompt of a chat request: its checked `messages` ([`chat_messages`]) rendered by
/// [`LoadedModel::chat_prompt`] (the model's chat template, or the documented default
/// `ROLE: CONTENT` lines then `assistant:`). A render error is 400 `chat_template_error`.
pub fn chat_prompt(value: Option<&Value>, model: &LoadedModel) -> Result<String, ApiError> {
    let messages = chat_messages(value)?;
    model.chat_prompt(&messages).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "chat_template_error",
            format!("cannot build the chat prompt: {e}"),
        )
        .param("messages")
    })
}

/// The `messages` of a chat request, checked: a non-empty array of `{role, content}` with
/// a role of `system`, `developer`, `user` or `assistant` and a string content or a list
/// of text parts (joined). Each refusal is a 422 naming the message.
pub fn chat_messages(value: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = match value {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid("messages", "messages must not be empty"))
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("messages", "messages is required"))
        }
        Some(_) => return Err(ApiError::invalid("messages", "messages must be an array")),
    };
    let mut checked = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(&param, "each message needs a string `role`"))?;
        if !matches!(role, "system" | "developer" | "user" | "assistant") {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!("unsupported role `{role}` (system, developer, user, assistant)"),
            ));
        }
        let content = match message.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                &format!("{param}.content"),
                                "only text content parts are supported",
                            ))
                        }
                    }
                }
                text
            }
            _ => {
                return Err(ApiError::invalid(
                    &format!("{param}.content"),
                    "each message needs a string `content`",
                ))
            }
        };
        checked.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    Ok(checked)
}

fn uint(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::invalid(name, format!("{name} must be a non-negative integer"))
        }),
    }
}

fn number(obj: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(name, format!("{name} must be a number"))),
    }
}

fn stop(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid("stop", "stop must be a string or an array of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop must be a string or an array of strings",
            ))
        }
    };
    if list.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(list)
}

/// Usage counts.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// What every response object of one request repeats.
#[derive(Clone, Copy, Debug)]
pub struct Head<'a> {
    /// The endpoint's shapes.
    pub kind: Kind,
    /// The public request id.
    pub id: &'a str,
    /// Unix seconds.
    pub created: u64,
    /// The model id.
    pub model: &'a str,
}

impl Head<'_> {
    fn object(&self, object: &str, choice: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

/// One streamed chunk: a token's text (`token` = `(index, id)`) or the end (`finish`,
/// with `usage`).
pub fn chunk(
    head: Head<'_>,
    text: &str,
    token: Option<(u32, u32)>,
    finish: Option<&str>,
    usage: Option<Value>,
) -> Value {
    let choice = match head.kind {
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
        }),
        Kind::Chat => {
            let mut delta = Map::new();
            if token.is_some_and(|(index, _)| index == 0) {
                delta.insert("role".into(), json!("assistant"));
            }
            if finish.is_none() {
                delta.insert("content".into(), json!(text));
            }
            json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
        }
    };
    let object = match head.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    let mut out = head.object(object, choice);
    if let Some((index, token)) = token {
        // Extension: which token this chunk carries, so a client can check a resumed
        // stream token by token.
        out["llmos"] = json!({ "index": index, "token": token });
    }
    if let Some(usage) = usage {
        out["usage"] = usage;
    }
    out
}

/// A whole (non-streamed) answer; `tokens` are the generated token ids (extension).
pub fn complete(head: Head<'_>, text: &str, finish: &str, tokens: &[u32], usage: Value) -> Value {
    let (object, choice) = match head.kind {
        Kind::Completion => (
            "text_completion",
            json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
        ),
        Kind::Chat => (
            "chat.completion",
            json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": null,
                "finish_reason": finish,
            }),
        ),
    };
    let mut out = head.object(object, choice);
    out["usage"] = usage;
    out["llmos"] = json!({ "tokens": tokens });
    out
}
