//! `edgellm`: the client and tool CLI. Parses, dispatches on the subcommand, and maps errors
//! to exit codes in one place (1: the request failed; 2: bad arguments, from clap).
//!
//! - `run`: generate from a package in-process, streaming to stdout.
//! - `ask`: one request to a running `edgellmd`, over D-Bus or MQTT.
//! - `prompt`: print the exact prompt text the model would see.
//! - `inspect`: describe a package.
//! - `bench`: prefill/decode speed, time to first token, peak RSS.
//! - `perplexity`: llama.cpp's perplexity of the package on a text file.

mod ask;
mod bench;
mod inspect;
mod perplexity;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use edgellm::backend::{BackendChoice, BackendOptions};
use edgellm::chat::harmony::ReasoningEffort;
use edgellm::sampler::SamplingParams;

#[derive(Debug, Parser)]
#[command(
    name = "edgellm",
    version,
    about = "Run int4 ONNX language models on edge devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate from a model package, streaming text to stdout.
    Run(Box<run::RunArgs>),
    /// Ask a running edgellmd over D-Bus or MQTT.
    Ask(Box<ask::AskArgs>),
    /// Print the exact prompt text the model will see for a messages file.
    Prompt(PromptArgs),
    /// Describe a model package: architecture, sizes, quantization, context, KV bytes per token.
    Inspect {
        /// Model package folder.
        dir: PathBuf,
    },
    /// Measure prefill and decode speed, time to first token and peak memory.
    Bench(bench::BenchArgs),
    /// Perplexity of the model on a text file, as llama.cpp's llama-perplexity measures it.
    Perplexity(perplexity::PerplexityArgs),
}

#[derive(Debug, Args)]
struct PromptArgs {
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// JSON file: [{"role": "...", "content": "..."}]
    #[arg(long, value_name = "FILE.json")]
    messages: PathBuf,
    #[arg(long, value_enum)]
    reasoning_effort: Option<Effort>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Effort {
    Low,
    Medium,
    High,
}

impl From<Effort> for ReasoningEffort {
    fn from(e: Effort) -> Self {
        match e {
            Effort::Low => ReasoningEffort::Low,
            Effort::Medium => ReasoningEffort::Medium,
            Effort::High => ReasoningEffort::High,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum BackendArg {
    #[default]
    Auto,
    Ort,
    Tract,
}

impl From<BackendArg> for BackendChoice {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Ort => BackendChoice::Ort,
            BackendArg::Tract => BackendChoice::Tract,
        }
    }
}

/// Options shared by the subcommands that load a model into a backend.
#[derive(Debug, Args)]
pub struct EngineArgs {
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// Intra-op threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// KV capacity in tokens, prompt included (default: 4096, or the package's context if smaller).
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,
    /// Keep ONNX Runtime's threads from spinning between operators (slower, for the last bit of idle CPU).
    #[arg(long)]
    pub no_spin: bool,
    /// ONNX Runtime execution provider, repeatable: `cuda` (Jetson, with a CUDA-enabled ONNX
    /// Runtime; failing to register it is an error) or `cpu` (the default).
    #[arg(long = "ep", value_name = "EP", value_parser = ["cpu", "cuda"])]
    pub execution_providers: Vec<String>,
}

impl EngineArgs {
    /// Loads the model and builds its backend and engine.
    pub fn engine(&self) -> anyhow::Result<edgellm::engine::Engine> {
        let model = edgellm::model::Model::load(&self.model)?;
        self.engine_for(model, self.max_length.unwrap_or(4096))
    }

    /// Builds the backend and engine of a loaded `model`, with a KV capacity of `max_length`
    /// tokens (clamped to the package's context length).
    pub fn engine_for(
        &self,
        model: edgellm::model::Model,
        max_length: usize,
    ) -> anyhow::Result<edgellm::engine::Engine> {
        let opts = BackendOptions {
            threads: self.threads,
            max_length,
            allow_spinning: !self.no_spin,
            execution_providers: if self.execution_providers.is_empty() {
                BackendOptions::default().execution_providers
            } else {
                self.execution_providers
                    .iter()
                    .filter_map(|ep| edgellm::backend::ExecutionProvider::parse(ep))
                    .collect()
            },
            ..BackendOptions::default()
        };
        let max_length = model.package.kv_layout(opts.max_length).max_length;
        let loaded = edgellm::backend::load(&model.package, self.backend.into(), &opts)?;
        if matches!(loaded.reason, edgellm::backend::Reason::Fallback(_)) {
            eprintln!(
                "edgellm: running on {}: {}",
                loaded.backend.name(),
                loaded.reason
            );
        }
        Ok(edgellm::engine::Engine::new(
            model,
            loaded.backend,
            max_length,
        ))
    }
}

/// What to complete, for `run` (in-process) and `ask` (over a transport).
#[derive(Debug, Args)]
pub struct InputArgs {
    /// Prompt text, sent as one user message through the chat template (unless --raw).
    #[arg(
        long,
        conflicts_with = "messages",
        required_unless_present = "messages"
    )]
    pub prompt: Option<String>,
    /// Plain-text completion, no chat template: the prompt is tokenized as transformers'
    /// tokenizer(prompt) does (over D-Bus: `Complete`; over MQTT: the `prompt` field).
    #[arg(long, requires = "prompt")]
    pub raw: bool,
    /// JSON file: [{"role": "...", "content": "..."}]
    #[arg(long, value_name = "FILE.json")]
    pub messages: Option<PathBuf>,
}

impl InputArgs {
    pub fn input(&self) -> anyhow::Result<edgellm::api::Input> {
        use edgellm::api::Input;
        Ok(match (&self.prompt, &self.messages) {
            (Some(text), None) => Input::Prompt {
                text: text.clone(),
                raw: self.raw,
            },
            (None, Some(path)) => Input::Messages(read_messages(path)?),
            _ => anyhow::bail!("give --prompt TEXT or --messages FILE.json"),
        })
    }
}

/// Request options shared by `run` (in-process) and `ask` (over a transport).
#[derive(Debug, Args)]
pub struct RequestArgs {
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// 0 = greedy. Default: the package's search settings (greedy unless it samples).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// gpt-oss reasoning effort.
    #[arg(long, value_enum)]
    pub reasoning_effort: Option<Effort>,
    /// Structured output: `json_object`, or OpenAI's whole `response_format` object as JSON
    /// (`@FILE` reads it from a file).
    #[arg(long, value_name = "FORMAT", group = "structured")]
    pub response_format: Option<String>,
    /// Structured output: the answer is JSON valid against this schema (a file).
    #[arg(long, value_name = "FILE.json", group = "structured")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Structured output: the answer matches this Lark grammar (a file; `start` is the start
    /// rule).
    #[arg(long, value_name = "FILE.lark", group = "structured")]
    pub lark: Option<std::path::PathBuf>,
    /// Structured output: the answer matches this regular expression.
    #[arg(long, value_name = "REGEX", group = "structured")]
    pub regex: Option<String>,
    /// Tools the model may call: a file with OpenAI's `tools` list (`[{"type": "function",
    /// "function": {"name", "description", "parameters"}}]`).
    #[arg(long, value_name = "FILE.json")]
    pub tools: Option<std::path::PathBuf>,
    /// `auto` (default), `none`, `required`, or a function's name.
    #[arg(long, value_name = "CHOICE", requires = "tools")]
    pub tool_choice: Option<String>,
}

impl RequestArgs {
    /// The structured-output option given, as its request field: `response_format` or
    /// `grammar` and its JSON value.
    pub fn format_field(&self) -> anyhow::Result<Option<(&'static str, serde_json::Value)>> {
        use serde_json::json;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        };
        let parse = |what: &str, text: &str| -> anyhow::Result<serde_json::Value> {
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{what}: not JSON: {e}"))
        };
        Ok(if let Some(f) = &self.response_format {
            let v = match f.as_str() {
                "json_object" | "text" => json!({"type": f}),
                _ => match f.strip_prefix('@') {
                    Some(path) => parse(path, &read(std::path::Path::new(path))?)?,
                    None => parse("--response-format", f)?,
                },
            };
            Some(("response_format", v))
        } else if let Some(path) = &self.json_schema {
            let schema = parse(&path.display().to_string(), &read(path)?)?;
            Some((
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}),
            ))
        } else if let Some(path) = &self.lark {
            Some(("grammar", json!({"type": "lark", "value": read(path)?})))
        } else {
            self.regex
                .as_ref()
                .map(|r| ("grammar", json!({"type": "regex", "value": r})))
        })
    }

    /// `tools` and `tool_choice` as request fields.
    pub fn tools_fields(&self) -> anyhow::Result<Option<(serde_json::Value, serde_json::Value)>> {
        use serde_json::json;
        let Some(path) = &self.tools else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let tools: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
        let choice = match self.tool_choice.as_deref() {
            None => json!("auto"),
            Some(c @ ("auto" | "none" | "required")) => json!(c),
            Some(name) => json!({"type": "function", "function": {"name": name}}),
        };
        Ok(Some((tools, choice)))
    }

    /// Sets the given options on `req`, the package's defaults for the rest.
    pub fn apply(
        &self,
        req: &mut edgellm::api::Request,
        defaults: SamplingParams,
    ) -> anyhow::Result<()> {
        use edgellm::grammar::Format;
        req.format = match self.format_field()? {
            Some(("grammar", v)) => Some(Format::from_grammar(&v)?),
            Some((_, v)) => Format::from_response_format(&v)?,
            None => None,
        };
        req.tools = match self.tools_fields()? {
            Some((tools, choice)) => Some(std::sync::Arc::new(edgellm::tools::Tools::parse(
                Some(&tools),
                Some(&choice),
            )?)),
            None => None,
        };
        req.max_tokens = self.max_tokens;
        req.stop = self.stop.clone();
        req.reasoning_effort = self.reasoning_effort.map(Into::into);
        req.sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            seed: self.seed,
        };
        Ok(())
    }

    /// The options given, as the transports' request fields (the daemon applies its package's
    /// defaults to the rest).
    pub fn to_json(&self) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        use serde_json::Value;
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("max_tokens", self.max_tokens.map(Value::from));
        put(
            "temperature",
            self.temperature.map(|f| Value::from(f64::from(f))),
        );
        put("top_p", self.top_p.map(|f| Value::from(f64::from(f))));
        put("top_k", self.top_k.map(Value::from));
        put("min_p", self.min_p.map(|f| Value::from(f64::from(f))));
        put(
            "repetition_penalty",
            self.repetition_penalty.map(|f| Value::from(f64::from(f))),
        );
        put("seed", self.seed.map(Value::from));
        put(
            "stop",
            (!self.stop.is_empty()).then(|| Value::from(self.stop.clone())),
        );
        put(
            "reasoning_effort",
            self.reasoning_effort
                .map(|e| Value::from(ReasoningEffort::from(e).as_str())),
        );
        if let Some((k, v)) = self.format_field()? {
            m.insert(k.to_string(), v);
        }
        if let Some((tools, choice)) = self.tools_fields()? {
            m.insert("tools".into(), tools);
            m.insert("tool_choice".into(), choice);
        }
        Ok(m)
    }
}

/// Reads a messages file: `[{"role": "...", "content": "..."}]`.
pub fn read_messages(path: &std::path::Path) -> anyhow::Result<Vec<edgellm::chat::Message>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a messages list [{{\"role\": ..., \"content\": ...}}]: {e}",
            path.display()
        )
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Library diagnostics (backend loading and the like) on stderr when EDGELLM_LOG asks.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("EDGELLM_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Ask(args) => ask::ask(&args),
        Command::Prompt(args) => prompt(&args),
        Command::Inspect { dir } => inspect::inspect(&dir),
        Command::Bench(args) => bench::bench(&args),
        Command::Perplexity(args) => perplexity::perplexity(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgellm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn prompt(args: &PromptArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let model = edgellm::model::Model::load(&args.model)?;
    let messages = read_messages(&args.messages)?;
    let text = model.render(&messages, args.reasoning_effort.map(Into::into))?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
