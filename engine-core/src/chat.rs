//! Chat prompts rendered with the model's own Jinja template (from the GGUF metadata or
//! `tokenizer_config.json`), as the model was trained to see them.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::KvqError;
use crate::loader::Tokenizer;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML, for models that ship no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Renders `messages` with `template`; `add_generation_prompt` opens the assistant's turn.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, KvqError> {
    let mut env = Environment::new();
    // HF templates call Python string methods (`.strip()`, `.startswith()`, …).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    let bad = |e: Error| KvqError::InvalidArgument(format!("chat template: {e}"));
    env.add_template("chat", template).map_err(bad)?;
    env.get_template("chat")
        .map_err(bad)?
        .render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(bad)
}

/// `messages` in the tokenizer's chat template (ChatML when the model ships none), with the
/// assistant's turn opened: the prompt text of a chat request.
pub fn apply_chat_template(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<String, KvqError> {
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
    let template = tok.chat_template().unwrap_or(CHATML_TEMPLATE);
    render_chat(
        template,
        messages,
        true,
        &name(tok.bos_id()),
        &name(tok.eos_id()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let m = [ChatMessage::new("user", "Hi")];
        let s = render_chat(CHATML_TEMPLATE, &m, true, "", "").unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_work() {
        let t = "{{ messages[0]['content'].strip() }}";
        let s = render_chat(t, &[ChatMessage::new("user", "  x  ")], false, "", "").unwrap();
        assert_eq!(s, "x");
    }

    #[test]
    fn template_errors_are_reported() {
        let t = "{{ raise_exception('only user turns') }}";
        let e = render_chat(t, &[], false, "", "").unwrap_err().to_string();
        assert!(e.contains("only user turns"), "{e}");
    }
}
