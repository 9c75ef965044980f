//! Chat templates: the Jinja template stored in the GGUF, rendered with minijinja.

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// The model's template; ChatML when the file has none.
    pub fn from_model(m: &flea_model::Model) -> Result<ChatTemplate> {
        let h = &m.file.header;
        let source = match h.get_str("tokenizer.chat_template")? {
            Some(s) => s.to_string(),
            None => CHATML.to_string(),
        };
        let tok = |id: Option<u32>| {
            id.and_then(|i| m.tokenizer.token_text(i))
                .unwrap_or("")
                .to_string()
        };
        Ok(ChatTemplate {
            source,
            bos: tok(m.tokenizer.bos()),
            eos: tok(m.tokenizer.eos()),
        })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .context("parsing the chat template")?;
        let t = env
            .get_template("chat")
            .map_err(|e| anyhow!("chat template: {e}"))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| anyhow!("rendering the chat template: {e}"))
    }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
