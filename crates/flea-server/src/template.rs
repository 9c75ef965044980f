//! Chat templates: the Jinja template stored in the GGUF, rendered with minijinja.

use serde::Serialize;

/// A chat template that cannot be parsed or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("reading the chat template: {0}")]
    Metadata(#[from] flea_gguf::GgufError),
    #[error("chat template: {0}")]
    Render(String),
}

type Result<T> = std::result::Result<T, TemplateError>;

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
    /// The model's template; when the file has none, Gemma's turn format for vocabularies
    /// that have `<start_of_turn>` (like llama.cpp's built-in detection), else ChatML.
    pub fn from_model(m: &flea_model::Model) -> Result<ChatTemplate> {
        let h = &m.file.header;
        let source = match h.get_str("tokenizer.chat_template")? {
            Some(s) => s.to_string(),
            None if m.tokenizer.token_id("<start_of_turn>").is_some() => GEMMA.to_string(),
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
            .map_err(|e| TemplateError::Render(format!("parsing: {e}")))?;
        let t = env
            .get_template("chat")
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| TemplateError::Render(format!("rendering: {e}")))
    }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Gemma's turns: the system prompt is folded into the first user turn; the assistant is "model".
const GEMMA: &str = "{{ bos_token }}{% set sys = namespace(text='') %}{% for message in messages %}{% if message['role'] == 'system' %}{% set sys.text = message['content'] + '\n\n' %}{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' + (sys.text if loop.index0 <= 1 and message['role'] == 'user' else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";
