//! A loaded model, immutable and shareable: the package, its tokenizer and how prompts are
//! rendered (chat template or harmony). The mutable per-sequence state lives in the backend
//! the engine owns.

use std::path::Path;

use crate::api::Input;
use crate::chat::harmony::{self, HarmonyTokens, ReasoningEffort, SystemOptions};
use crate::chat::{ChatError, ChatTemplate, Message};
use crate::grammar::{Format, Grammar, GrammarError, Grammars};
use crate::package::{Package, PackageError};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::tools::{ToolFormat, Tools, When};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("{0}")]
    Invalid(String),
}

/// How messages become prompt text.
#[derive(Debug)]
enum Prompter {
    Harmony(HarmonyTokens),
    Template(Box<ChatTemplate>),
    None,
}

#[derive(Debug)]
pub struct Model {
    pub package: Package,
    pub tokenizer: Tokenizer,
    prompter: Prompter,
    /// End-of-sequence ids (genai_config's list; for harmony, `<|return|>` and `<|call|>`).
    pub eos: Vec<u32>,
    /// Structured output's token trie and parser factory, built on first use (a model that
    /// never gets a constrained request does not pay for it).
    grammars: std::sync::OnceLock<Result<Grammars, GrammarError>>,
}

impl Model {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let package = Package::open(dir)?;
        let tokenizer = Tokenizer::load(dir)?;
        // gpt-oss speaks harmony when its tokenizer has harmony's tokens; otherwise (and for
        // every other model) the tokenizer's chat template decides, as in transformers.
        let harmony = (package.config.model.model_type == "gptoss")
            .then(|| HarmonyTokens::resolve(|t| tokenizer.token_to_id(t)))
            .flatten();
        let prompter = if let Some(tokens) = harmony {
            Prompter::Harmony(tokens)
        } else if let Some(src) = &tokenizer.chat_template {
            Prompter::Template(Box::new(ChatTemplate::new(
                src,
                tokenizer.bos_token.as_deref(),
                tokenizer.eos_token.as_deref(),
            )?))
        } else {
            Prompter::None
        };
        let mut eos = package.config.model.eos_token_id.clone();
        if let Prompter::Harmony(t) = &prompter {
            for id in [t.ret, t.call] {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(Model {
            package,
            tokenizer,
            prompter,
            eos,
            grammars: std::sync::OnceLock::new(),
        })
    }

    /// Sampling defaults from genai_config.json's `search` section (greedy unless
    /// `do_sample`): what a request gets for the options it does not set.
    pub fn default_sampling(&self) -> crate::sampler::SamplingParams {
        use crate::sampler::SamplingParams;
        let s = &self.package.config.search;
        if s.do_sample {
            SamplingParams {
                temperature: s.temperature.unwrap_or(1.0),
                top_k: s.top_k.unwrap_or(0),
                top_p: s.top_p.unwrap_or(1.0),
                repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
                ..SamplingParams::default()
            }
        } else {
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
                ..SamplingParams::default()
            }
        }
    }

    /// Compiles a request's output format against this model's vocabulary (building the
    /// token trie the first time).
    pub fn compile(&self, format: &Format) -> Result<Grammar, GrammarError> {
        self.grammars()?.compile(format)
    }

    /// The model's structured-output state, built the first time it is asked for.
    pub fn grammars(&self) -> Result<&Grammars, GrammarError> {
        self.grammars
            .get_or_init(|| {
                Grammars::new(
                    &self.tokenizer,
                    self.package.config.model.vocab_size,
                    &self.eos,
                )
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    pub fn harmony(&self) -> Option<HarmonyTokens> {
        match self.prompter {
            Prompter::Harmony(t) => Some(t),
            _ => None,
        }
    }

    /// The exact text the model sees for `messages` (what `edgellm prompt` prints).
    pub fn render(
        &self,
        messages: &[Message],
        effort: Option<ReasoningEffort>,
    ) -> Result<String, ModelError> {
        self.render_with_tools(messages, effort, None)
    }

    /// How this model writes tool calls: harmony for gpt-oss, otherwise what its chat
    /// template's tool rendering speaks; `None`: it cannot be given tools.
    pub fn tool_format(&self) -> Option<ToolFormat> {
        match &self.prompter {
            Prompter::Harmony(_) => Some(ToolFormat::Harmony),
            Prompter::Template(_) => self
                .tokenizer
                .chat_template
                .as_deref()
                .and_then(ToolFormat::detect),
            Prompter::None => None,
        }
    }

    /// Checks that this model can be given `tools` (when they are to be shown).
    fn check_tools(&self, tools: Option<&Tools>) -> Result<Option<ToolFormat>, GrammarError> {
        match tools {
            Some(t) if t.active() => self.tool_format().map(Some).ok_or_else(|| {
                GrammarError(format!(
                    "tools: the chat template of {} cannot express tools (it renders no \
                     tool definitions in a format edgellm knows: harmony, <tool_call> or \
                     Llama 3's JSON calls)",
                    self.package.config.model.model_type
                ))
            }),
            _ => Ok(None),
        }
    }

    /// [`Model::render`] with the request's tools shown to the model (unless `tool_choice` is
    /// `none`).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        effort: Option<ReasoningEffort>,
        tools: Option<&Tools>,
    ) -> Result<String, ModelError> {
        if messages.is_empty() {
            return Err(ModelError::Invalid("messages is empty".into()));
        }
        let shown = self
            .check_tools(tools)
            .map_err(|e| ModelError::Invalid(e.0))?
            .and(tools);
        match &self.prompter {
            Prompter::Harmony(_) => {
                let sys = SystemOptions {
                    reasoning_effort: effort.unwrap_or_default(),
                    current_date: Some(crate::chat::strftime_utc(
                        "%Y-%m-%d",
                        crate::chat::now_unix(),
                    )),
                    ..SystemOptions::default()
                };
                let list = shown.map(|t| t.template_json());
                let list = list
                    .as_ref()
                    .and_then(|v| v.as_array())
                    .map_or(&[][..], |v| v);
                Ok(harmony::render_with_tools(messages, &sys, list)?)
            }
            Prompter::Template(t) => Ok(t.render(
                &arguments_as_objects(messages),
                true,
                shown.map(Tools::template_json).as_ref(),
                &serde_json::Map::new(),
            )?),
            Prompter::None => Err(ChatError::NoTemplate.into()),
        }
    }

    /// Compiles what constrains a request's answer: its `response_format`/`grammar`, and with
    /// tools the grammar of their calls (harmony: the whole reply, the final answer in
    /// `format` if one is given; template models: the calls, `format` cannot be combined).
    pub fn compile_request(
        &self,
        format: Option<&Format>,
        tools: Option<&Tools>,
    ) -> Result<Option<(Grammar, When)>, GrammarError> {
        let Some((fmt, tools)) = self.check_tools(tools)?.zip(tools) else {
            return format
                .map(|f| Ok((self.compile(f)?, When::Answer)))
                .transpose();
        };
        let final_schema = match (fmt, format) {
            (_, None) => None,
            (ToolFormat::Harmony, Some(Format::JsonObject)) => {
                Some(serde_json::json!({"type": "object"}))
            }
            (ToolFormat::Harmony, Some(Format::JsonSchema { schema, .. })) => Some(schema.clone()),
            (_, Some(f)) => {
                return Err(GrammarError(format!(
                    "{}: cannot be combined with tools for this model (give tool_choice \
                     \"none\", or leave one out)",
                    f.field()
                )));
            }
        };
        let constrain = self.tokenizer.token_to_id("<|constrain|>").is_some();
        let (lark, when) = fmt.grammar(tools, final_schema.as_ref(), constrain);
        let grammar = self.grammars()?.compile_lark(&lark, "tools")?;
        Ok(Some((grammar, when)))
    }

    /// The token ids every chat with `system` as its system message starts with: the rendered
    /// system turn alone, cut after its last added token (special tokens such as `<|im_end|>`
    /// or harmony's `<|start|>`), since plain text after it could tokenize differently once
    /// the rest of the conversation follows. The engine keeps a computed copy of it
    /// (`[model] system_prompts`). Harmony's system turn carries the date: a prefix kept
    /// across midnight stops matching and is computed again per request.
    pub fn system_prefix_ids(&self, system: &str) -> Result<Vec<u32>, ModelError> {
        let msg = [Message::new("system", system.to_string())];
        let text = match &self.prompter {
            Prompter::Template(t) => t.render(&msg, false, None, &serde_json::Map::new())?,
            _ => self.render(&msg, None)?,
        };
        let mut ids = self.tokenizer.encode(&text, false)?;
        let added = self.tokenizer.added_ids();
        match ids.iter().rposition(|id| added.contains(id)) {
            Some(last) => ids.truncate(last + 1),
            None => {
                return Err(ModelError::Invalid(
                    "the chat template renders the system message without special tokens, so \
                     no token prefix is shared by every conversation"
                        .into(),
                ));
            }
        }
        Ok(ids)
    }

    /// The most bytes of text that could still tokenize to `max_length` tokens: no token of
    /// the vocabulary spells more than [`Tokenizer::max_token_bytes`] bytes, and normalization
    /// (NFC/NFKC) shrinks text by at most 4x. A longer text cannot fit and is refused without
    /// tokenizing it.
    pub fn max_prompt_bytes(&self, max_length: usize) -> usize {
        4 * self.tokenizer.max_token_bytes().max(1) * max_length
    }

    /// Prompt token ids for `input`.
    pub fn prompt_ids(
        &self,
        input: &Input,
        effort: Option<ReasoningEffort>,
    ) -> Result<Vec<u32>, ModelError> {
        self.prompt_ids_with_tools(input, effort, None)
    }

    /// Prompt token ids for a request: its input, reasoning effort and tools.
    pub fn request_ids(&self, req: &crate::api::Request) -> Result<Vec<u32>, ModelError> {
        self.prompt_ids_with_tools(&req.input, req.reasoning_effort, req.tools.as_deref())
    }

    fn prompt_ids_with_tools(
        &self,
        input: &Input,
        effort: Option<ReasoningEffort>,
        tools: Option<&Tools>,
    ) -> Result<Vec<u32>, ModelError> {
        if let (Input::Prompt { raw: true, .. }, Some(t)) = (input, tools)
            && t.active()
        {
            return Err(ModelError::Invalid(
                "tools: need chat messages (a raw prompt has no chat template to show them)".into(),
            ));
        }
        let ids = match input {
            Input::Prompt { text, raw: true } => self.tokenizer.encode(text, true)?,
            Input::Prompt { text, raw: false } => {
                let msg = Message::new("user", text.clone());
                self.tokenizer
                    .encode(&self.render_with_tools(&[msg], effort, tools)?, false)?
            }
            Input::Messages(m) => self
                .tokenizer
                .encode(&self.render_with_tools(m, effort, tools)?, false)?,
        };
        if ids.is_empty() {
            return Err(ModelError::Invalid("the prompt is empty".into()));
        }
        Ok(ids)
    }
}

/// OpenAI sends a call's `arguments` as a JSON string; chat templates such as Qwen2.5's write
/// them with `tojson`, which would quote the string again. As vLLM and llama.cpp do, arguments
/// that parse as a JSON object are given to the template as that object.
fn arguments_as_objects(messages: &[Message]) -> std::borrow::Cow<'_, [Message]> {
    let has_string_args = |m: &Message| {
        m.tool_calls.iter().flatten().any(|c| {
            c.pointer("/function/arguments")
                .is_some_and(serde_json::Value::is_string)
        })
    };
    if !messages.iter().any(has_string_args) {
        return std::borrow::Cow::Borrowed(messages);
    }
    let mut out = messages.to_vec();
    for call in out
        .iter_mut()
        .flat_map(|m| m.tool_calls.iter_mut().flatten())
    {
        if let Some(args) = call.pointer_mut("/function/arguments")
            && let Some(text) = args.as_str()
            && let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(text)
        {
            *args = v;
        }
    }
    std::borrow::Cow::Owned(out)
}
