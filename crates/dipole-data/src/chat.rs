//! Hugging Face chat templates (Jinja, from `tokenizer_config.json`) rendered with minijinja in the
//! environment transformers gives them: `trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! `bos_token`/`eos_token`, `add_generation_prompt`, loop controls, `tojson` and Python string methods.

use minijinja::{Environment, Error, ErrorKind, context};

use crate::record::Message;
use crate::tokenizer::Tokenizer;

/// A chat template that does not parse, or fails on the messages it is given (a
/// `raise_exception` call of the template included).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("chat_template does not parse: {0}")]
    Parse(#[source] Error),
    #[error("chat_template failed: {0}")]
    Render(#[source] Error),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    pad: String,
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// The tokenizer's template, or `None` when it has none.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Option<Self>, TemplateError> {
        let Some(source) = &tokenizer.chat_template else {
            return Ok(None);
        };
        let text = |t: &Option<crate::tokenizer::SpecialToken>| t.as_ref().map(|t| t.text.clone()).unwrap_or_default();
        Self::new(source, text(&tokenizer.bos), text(&tokenizer.eos), text(&tokenizer.pad)).map(Some)
    }

    pub fn new(source: &str, bos: String, eos: String, pad: String) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(TemplateError::Parse)?;
        Ok(Self { env, bos, eos, pad })
    }

    /// Renders `messages`; with `add_generation_prompt` the assistant header is appended.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TemplateError> {
        let messages: Vec<_> = messages
            .iter()
            .map(|m| context! { role => m.role.clone(), content => m.content.clone() })
            .collect();
        let template = self.env.get_template("chat").expect("added in new()");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos.clone(),
                eos_token => self.eos.clone(),
                pad_token => self.pad.clone(),
            })
            .map_err(TemplateError::Render)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_with_hf_helpers() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}\
                      [{{ m['role'] | upper }}]{{ m['content'].strip() }}{{ eos_token }}{% endfor %}\
                      {% if add_generation_prompt %}[ASSISTANT]{% endif %}";
        let t = ChatTemplate::new(source, "<s>".into(), "</s>".into(), String::new()).unwrap();
        let out = t
            .render(&[msg("system", "be nice"), msg("user", "  hi  ")], true)
            .unwrap();
        assert_eq!(out, "<s>[USER]hi</s>[ASSISTANT]");
    }

    #[test]
    fn raise_exception_is_an_error_with_its_message() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
        let t = ChatTemplate::new(source, String::new(), String::new(), String::new()).unwrap();
        let err = t.render(&[msg("assistant", "x")], false).unwrap_err();
        assert!(err.to_string().contains("Conversation must start with user"), "{err}");
    }
}
