//! Conversational preference pairs as TRL renders them (`maybe_apply_chat_template`): the
//! prompt is what the prompt alone (with the generation prompt), prompt + chosen and prompt +
//! rejected have in common; each completion is the rest of its rendering. So whatever the
//! template writes around an answer (Qwen3's empty think block before it, ChatML's
//! `<|im_end|>\n` after it) belongs to the completion, and no EOS is added: the template's end
//! of turn ends it.

use super::{ChatTemplate, Message, TemplateError};

/// A pair's texts: the shared prompt and each completion after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairTexts {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// The prompt alone with the generation prompt (what the model answers at inference, and
    /// what base responses are generated after); `prompt` is a prefix of it.
    pub generation_prompt: String,
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

impl ChatTemplate {
    /// TRL's texts of a conversational pair: `prompt` ends with a user turn, `chosen` and
    /// `rejected` are the assistant's answers.
    pub fn pair_texts(
        &self,
        prompt: &[Message],
        chosen: &str,
        rejected: &str,
    ) -> Result<PairTexts, TemplateError> {
        let generation_prompt = self.render(prompt, true)?;
        let with = |answer: &str| {
            let mut conv = prompt.to_vec();
            conv.push(Message::assistant(answer));
            self.render(&conv, false)
        };
        let (c, r) = (with(chosen)?, with(rejected)?);
        let n = common_prefix(&generation_prompt, &c);
        let n = common_prefix(&generation_prompt[..n], &r);
        Ok(PairTexts {
            prompt: generation_prompt[..n].to_string(),
            chosen: c[n..].to_string(),
            rejected: r[n..].to_string(),
            generation_prompt,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_split_on_char_boundaries() {
        assert_eq!(common_prefix("aé", "aè"), 1);
        assert_eq!(common_prefix("abc", "ab"), 2);
        assert_eq!(common_prefix("", "x"), 0);
    }
}
