//! `POST /v1/chat/completions` renders the messages with the model's own chat template
//! when it has one (a synthetic GGUF carrying Meta's Llama 2 template) and with the
//! documented default otherwise: `usage.prompt_tokens` is the token count of exactly the
//! expected prompt (one BOS token, not BOS plus the letters of `<s>`), and the answer is
//! the greedy completion of that prompt. Driven in-process through the real router.

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use llmos_gateway::GatewayConfig;
use llmos_inference::{Runtime, RuntimeConfig};
use llmos_models::synth::{self, Preset};
use llmos_models::GgmlDType;
use serde_json::{json, Value};
use tower::ServiceExt;

/// One runtime at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A guard for requests that should never take this long (not a synchronisation).
const GUARD: Duration = Duration::from_secs(60);

/// Meta's Llama 2 chat template, as its Hugging Face repositories ship it.
const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

async fn boot(model: &Path, dir: &Path) -> (Runtime, Router) {
    llmos_device::init_cpu_threads(2);
    let mut config = RuntimeConfig::new(model, dir.join("state"));
    config.kv_budget_bytes = 8 << 20;
    let runtime = Runtime::boot(config).await.expect("boot");
    let router = llmos_gateway::router(runtime.clone(), GatewayConfig::default()).expect("router");
    (runtime, router)
}

async fn post(router: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let response = tokio::time::timeout(GUARD, router.clone().oneshot(request))
        .await
        .expect("answered within the hang guard")
        .expect("the router is infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, serde_json::from_slice(&bytes).expect("JSON body"))
}

/// Tokens of `prompt` as the runtime counts them (with the one BOS token).
fn token_count(runtime: &Runtime, prompt: &str) -> u64 {
    let model = runtime.services().model().expect("model");
    model.tokenizer.encode(prompt, true).expect("encode").len() as u64
}

/// The chat answer equals the completion of `expected`, and its prompt_tokens count
/// `expected`'s tokens.
async fn assert_chat_uses(runtime: &Runtime, router: &Router, messages: Value, expected: &str) {
    let (status, chat) = post(
        router,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    assert_eq!(
        chat["usage"]["prompt_tokens"].as_u64(),
        Some(token_count(runtime, expected)),
        "{chat}"
    );
    let (status, plain) = post(
        router,
        "/v1/completions",
        json!({"prompt": expected, "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    assert_eq!(
        chat["choices"][0]["message"]["content"],
        plain["choices"][0]["text"]
    );
    assert_eq!(chat["llmos"]["tokens"], plain["llmos"]["tokens"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_uses_the_models_template() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("llama2-chat.gguf");
    synth::write_gguf_with_template(&model, &Preset::TINY, GgmlDType::F32, 7, LLAMA2).unwrap();
    let (runtime, router) = boot(&model, dir.path()).await;

    let messages = json!([
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "one. "}]},
    ]);
    // The template's leading `<s>` is the runtime's BOS token, not text.
    let expected = "[INST] <<SYS>>\nYou tell stories.\n<</SYS>>\n\nTell me one. [/INST]";
    assert_chat_uses(&runtime, &router, messages, expected).await;
    assert!(
        token_count(&runtime, &format!("<s>{expected}")) > token_count(&runtime, expected),
        "a literal <s> would have cost tokens"
    );

    // The template's raise_exception is a 400 naming `messages`, with its message.
    let (status, body) = post(
        &router,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "chat_template_error");
    assert_eq!(body["error"]["param"], "messages");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Conversation roles must alternate"),
        "{message}"
    );

    // Message validation still comes first: 422 for a bad role.
    let (status, body) = post(
        &router,
        "/v1/chat/completions",
        json!({"messages": [{"role": "wizard", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["param"], "messages[0].role");
    runtime.shutdown("test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_a_template_uses_the_documented_default() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("plain.gguf");
    synth::write_gguf(&model, &Preset::TINY, GgmlDType::F32, 7).unwrap();
    let (runtime, router) = boot(&model, dir.path()).await;
    let messages = json!([
        {"role": "system", "content": "You tell stories."},
        {"role": "user", "content": "Tell me one."},
    ]);
    let expected = "system: You tell stories.\nuser: Tell me one.\nassistant:";
    assert_chat_uses(&runtime, &router, messages, expected).await;
    runtime.shutdown("test").await;
}
