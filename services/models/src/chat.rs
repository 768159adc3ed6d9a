//! Chat prompts: a model's own Jinja chat template rendered with minijinja, or the
//! documented default for models without one.
//!
//! The template comes from GGUF metadata `tokenizer.chat_template` or a Hugging Face
//! directory's `tokenizer_config.json` (`chat_template`). It is rendered the way Hugging
//! Face `transformers` renders it (`apply_chat_template`): Jinja with `trim_blocks` and
//! `lstrip_blocks`, the context `messages` (a list of `{role, content}`),
//! `add_generation_prompt = true`, `bos_token`, `eos_token`, and a
//! `raise_exception(message)` function that fails the render with that message. Python
//! string and dict methods that templates call (`.strip()`, `.startswith()`, `.items()`,
//! …) come from `minijinja-contrib`'s `pycompat`. Undefined variables (`tools`,
//! `date_string`, …) are falsy, as in Jinja. Not provided: transformers' `{% generation %}`
//! blocks (such a template does not compile; the loader warns and the model gets the
//! default prompt) and `strftime_now` (templates test `is defined` before calling it).

use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind, Value};

use crate::error::{ModelError, Result};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant` (the template decides what it accepts).
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The name the template is compiled under; it shows in error messages (`in chat_template:3`).
const NAME: &str = "chat_template";

/// A compiled chat template with the BOS/EOS strings it is rendered with. Cheap to clone.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: Arc<str>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. A syntax error is [`ModelError::ChatTemplate`] (with the line).
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let source: String = source.into();
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks; templates are written
        // for that whitespace handling.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error("syntax configuration", &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| template_error("does not compile", &e))?;
        Ok(Self {
            env: Arc::new(env),
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// What `{{ bos_token }}` renders to.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// What `{{ eos_token }}` renders to.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The prompt for `messages`, ending with the template's generation prompt (the start
    /// of the assistant's turn). A template that raises (e.g. roles that do not alternate)
    /// or fails at run time is [`ModelError::ChatTemplate`]; nothing here panics.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error("does not compile", &e))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let ctx = context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template
            .render(ctx)
            .map_err(|e| template_error("failed", &e))
    }
}

/// The documented default chat prompt, for models without a template of their own: one
/// line `ROLE: CONTENT` per message, then `assistant:` for the reply. For example
/// `[system "Be brief.", user "Hi"]` → `"system: Be brief.\nuser: Hi\nassistant:"`.
pub fn default_chat_prompt(messages: &[ChatMessage]) -> String {
    let mut prompt = String::new();
    for m in messages {
        prompt.push_str(&m.role);
        prompt.push_str(": ");
        prompt.push_str(&m.content);
        prompt.push('\n');
    }
    prompt.push_str("assistant:");
    prompt
}

/// `messages` rendered with `template`, or with [`default_chat_prompt`] when there is none.
pub fn render_chat(template: Option<&ChatTemplate>, messages: &[ChatMessage]) -> Result<String> {
    match template {
        Some(t) => t.render(messages),
        None => Ok(default_chat_prompt(messages)),
    }
}

/// Marks the errors of `raise_exception`, so that their message is reported as the
/// template wrote it.
const RAISED: &str = "\u{1}raise_exception:";

/// The template's `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

fn template_error(what: &str, e: &Error) -> ModelError {
    let raised = e.detail().and_then(|d| d.strip_prefix(RAISED));
    ModelError::ChatTemplate(match (raised, e.line()) {
        (Some(message), Some(line)) => format!("raised: {message} (line {line})"),
        (Some(message), None) => format!("raised: {message}"),
        (None, _) => format!("{what}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ChatML template (as Qwen/Hermes models ship it, without tool handling).
    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// The Llama 2 chat template as Meta's Hugging Face repositories ship it.
    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    fn msgs(list: &[(&str, &str)]) -> Vec<ChatMessage> {
        list.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn chatml_renders_exactly() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let out = t
            .render(&msgs(&[("system", "You are terse."), ("user", "Hi!")]))
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama2_renders_exactly_with_bos_eos_and_strip() {
        let t = ChatTemplate::new(LLAMA2, "<s>", "</s>").unwrap();
        let out = t
            .render(&msgs(&[
                ("system", "Be kind."),
                ("user", "Hello "),
                ("assistant", " Hi there. "),
                ("user", "\n Tell me a story.  "),
            ]))
            .unwrap();
        assert_eq!(
            out,
            "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHello [/INST] Hi there. </s><s>[INST] Tell me a story. [/INST]"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_as_transformers() {
        let src = "{% for m in messages %}\n    {{ m.role }}={{ m.content }}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t
            .render(&msgs(&[("user", "a"), ("assistant", "b")]))
            .unwrap();
        assert_eq!(out, "    user=a\n    assistant=b\n");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let t = ChatTemplate::new(LLAMA2, "<s>", "</s>").unwrap();
        let err = t
            .render(&msgs(&[("user", "one"), ("user", "two")]))
            .unwrap_err();
        assert!(matches!(err, ModelError::ChatTemplate(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("Conversation roles must alternate"), "{text}");
        assert!(text.starts_with("chat template raised"), "{text}");
    }

    #[test]
    fn broken_templates_are_errors_not_panics() {
        for src in [
            "{% for m in messages %}{{ m.content }}",
            "{{ messages[0].content ",
            "{% if %}x{% endif %}",
            "{% endfor %}",
        ] {
            let err = ChatTemplate::new(src, "<s>", "</s>").unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("chat template does not compile"), "{text}");
            assert!(text.contains("chat_template:1"), "{text}");
        }
        // Compiles, fails at run time: an unknown filter and a call of a non-function.
        for src in [
            "{{ messages | no_such_filter }}",
            "{{ messages[0].content() }}",
        ] {
            let t = ChatTemplate::new(src, "", "").unwrap();
            let err = t.render(&msgs(&[("user", "x")])).unwrap_err();
            assert!(matches!(err, ModelError::ChatTemplate(_)), "{err:?}");
        }
    }

    #[test]
    fn python_methods_and_namespace_work() {
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.content.startswith('x') %}{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}{{ ns.n }}|{{ messages[0].content.upper() }}|{{ 'a b'.split() | length }}|{{ tools is defined }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t
            .render(&msgs(&[
                ("user", "xy"),
                ("assistant", "ab"),
                ("user", "xz"),
            ]))
            .unwrap();
        assert_eq!(out, "2|XY|2|False");
    }

    #[test]
    fn default_without_a_template() {
        let m = msgs(&[("system", "You tell stories."), ("user", "Tell me one.")]);
        let expected = "system: You tell stories.\nuser: Tell me one.\nassistant:";
        assert_eq!(default_chat_prompt(&m), expected);
        assert_eq!(render_chat(None, &m).unwrap(), expected);
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        assert_ne!(render_chat(Some(&t), &m).unwrap(), expected);
    }
}
