//! Chat templates: the tokenizer's Jinja `chat_template`, rendered as transformers'
//! `apply_chat_template` renders it (Jinja2 with `trim_blocks` and `lstrip_blocks`, Python's
//! string and dict methods, `raise_exception`, `strftime_now`, `tojson` with its options,
//! `namespace`, loop controls; the special tokens and template arguments as variables), or a
//! plain-text fallback for models that ship none.

mod completion;
mod python;

pub use completion::PairTexts;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Error raised while compiling or rendering a template.
pub type TemplateError = minijinja::Error;

/// Template arguments (transformers' `**kwargs` of `apply_chat_template`, e.g. Qwen3's
/// `enable_thinking`).
pub type TemplateKwargs = serde_json::Map<String, serde_json::Value>;
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
    /// `bos_token`, `eos_token`, ...: the tokenizer's special tokens, as variables.
    special: BTreeMap<String, String>,
    kwargs: TemplateKwargs,
    /// The fallback's text starts with `bos_token` (tokenizers that add BOS, as HF's
    /// post-processor does for plain text).
    fallback_bos: bool,
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

/// The Jinja environment transformers renders chat templates in.
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python::formatter);
    env.add_filter("tojson", python::tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", python::strftime_now);
    env.add_test("iterable", python::is_iterable);
    env
}

/// transformers' `{% generation %}…{% endgeneration %}` (it marks the assistant's tokens for
/// `return_assistant_tokens_mask` and renders its body unchanged) as `{% if true %}…{% endif %}`,
/// whitespace control kept.
fn generation_blocks_as_ifs(src: &str) -> std::borrow::Cow<'_, str> {
    if !src.contains("generation") {
        return src.into();
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let end = tag.find("%}").map_or(tag.len(), |e| e + 2);
        let inner =
            tag[2..end.saturating_sub(2).max(2)].trim_matches(|c: char| c == '-' || c == '+');
        let replacement = match inner.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&tag[..end].replacen(inner.trim(), r, 1)),
            None => out.push_str(&tag[..end]),
        }
        rest = &tag[end..];
    }
    out.push_str(rest);
    out.into()
}

impl ChatTemplate {
    /// `source`: the Jinja text (`None`: plain-text fallback `"User: …\nAssistant: "`).
    pub fn new(
        source: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        let mut special = BTreeMap::new();
        special.insert("bos_token".into(), bos_token.unwrap_or_default());
        special.insert("eos_token".into(), eos_token.unwrap_or_default());
        Self {
            source,
            special,
            kwargs: TemplateKwargs::new(),
            fallback_bos: false,
        }
    }

    /// Whether the plain-text fallback starts with the BOS token (the tokenizer's `add_bos`:
    /// plain text tokenised with special tokens gets it; a Jinja template writes its own).
    pub fn with_fallback_bos(mut self, yes: bool) -> Self {
        self.fallback_bos = yes;
        self
    }

    /// Another special token the template may read (`unk_token`, `pad_token`, ...).
    pub fn with_special(mut self, name: &str, text: Option<String>) -> Self {
        match text {
            Some(t) => self.special.insert(name.to_string(), t),
            None => self.special.remove(name),
        };
        self
    }

    /// Template arguments passed to every rendering (`data.chat_template_kwargs`).
    pub fn with_kwargs(mut self, kwargs: TemplateKwargs) -> Self {
        self.kwargs = kwargs;
        self
    }

    /// The template arguments every rendering gets.
    pub fn kwargs(&self) -> &TemplateKwargs {
        &self.kwargs
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
        self.render_with(messages, add_generation_prompt, &TemplateKwargs::new())
    }

    /// [`render`](Self::render) with arguments of this call on top of the template's own
    /// (`serve`'s per-request `chat_template_kwargs`).
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &TemplateKwargs,
    ) -> Result<String, TemplateError> {
        let Some(src) = &self.source else {
            let mut out = String::new();
            if self.fallback_bos {
                out.push_str(self.special.get("bos_token").map_or("", String::as_str));
            }
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
        let env = environment();
        let src = generation_blocks_as_ifs(src);
        let template = env.template_from_named_str("chat_template", &src)?;
        // As transformers: the special tokens, then the arguments (which may override them),
        // with `tools` and `documents` defined as None.
        let mut ctx: BTreeMap<String, minijinja::Value> = BTreeMap::new();
        for (k, v) in &self.special {
            ctx.insert(k.clone(), minijinja::Value::from(v.as_str()));
        }
        for (k, v) in self.kwargs.iter().chain(extra) {
            ctx.insert(k.clone(), minijinja::Value::from_serialize(v));
        }
        ctx.insert(
            "messages".into(),
            minijinja::Value::from_serialize(messages),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            minijinja::Value::from(add_generation_prompt),
        );
        for k in ["tools", "documents"] {
            ctx.entry(k.into()).or_insert(minijinja::Value::from(()));
        }
        template.render(minijinja::Value::from_serialize(&ctx))
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
    fn kwargs_reach_the_template_and_a_call_overrides_them() {
        let src = "{{ bos_token }}{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}{{ messages[0].content }}";
        let t = ChatTemplate::new(Some(src.into()), Some("<s>".into()), None);
        assert_eq!(t.render(&[Message::user("x")], true).unwrap(), "<s>x");
        let mut kw = TemplateKwargs::new();
        kw.insert("enable_thinking".into(), false.into());
        let t = t.with_kwargs(kw);
        assert_eq!(
            t.render(&[Message::user("x")], true).unwrap(),
            "<s><think></think>x"
        );
        let mut call = TemplateKwargs::new();
        call.insert("enable_thinking".into(), true.into());
        call.insert("bos_token".into(), "<B>".into());
        assert_eq!(
            t.render_with(&[Message::user("x")], true, &call).unwrap(),
            "<B>x"
        );
    }

    #[test]
    fn fallback_starts_with_bos_when_the_tokenizer_adds_it() {
        let t = ChatTemplate::new(None, Some("<s>".into()), None).with_fallback_bos(true);
        assert_eq!(
            t.render(&[Message::user("Hi")], true).unwrap(),
            "<s>User: Hi\nAssistant: "
        );
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
