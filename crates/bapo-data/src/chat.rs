//! Chat templates: the tokenizer's Jinja `chat_template` (HF semantics: `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`), or a plain-text
//! fallback for models that ship none.

use serde::{Deserialize, Serialize};

/// Error raised while compiling or rendering a template.
pub type TemplateError = minijinja::Error;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// A chat template ready to render.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: Option<String>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

impl ChatTemplate {
    /// `source`: the Jinja text (`None`: plain-text fallback `"User: …\nAssistant: "`).
    pub fn new(
        source: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        Self {
            source,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        }
    }

    /// Whether a Jinja template (rather than the fallback) is used.
    pub fn is_jinja(&self) -> bool {
        self.source.is_some()
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// answer begins.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let Some(src) = &self.source else {
            let mut out = String::new();
            for m in messages {
                let role = match m.role.as_str() {
                    "user" => "User",
                    "assistant" => "Assistant",
                    "system" => "System",
                    other => other,
                };
                out.push_str(&format!("{role}: {}\n", m.content));
            }
            if add_generation_prompt {
                out.push_str("Assistant: ");
            }
            return Ok(out);
        };
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", raise_exception);
        env.add_template("chat", src)?;
        env.get_template("chat")?.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_with_generation_prompt() {
        let t = ChatTemplate::new(
            Some(CHATML.into()),
            Some("<|im_start|>".into()),
            Some("<|im_end|>".into()),
        );
        let out = t.render(&[Message::user("Hi")], true).unwrap();
        assert_eq!(out, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let no_gen = t.render(&[Message::user("Hi")], false).unwrap();
        assert!(no_gen.ends_with("Hi<|im_end|>\n"));
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            Some("{{ raise_exception('roles must alternate') }}".into()),
            None,
            None,
        );
        let err = t.render(&[Message::user("x")], true).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn fallback_without_template() {
        let t = ChatTemplate::new(None, None, None);
        assert_eq!(
            t.render(&[Message::user("Hi")], true).unwrap(),
            "User: Hi\nAssistant: "
        );
    }
}
