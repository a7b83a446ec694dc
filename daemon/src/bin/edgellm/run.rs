//! `edgellm run`: one request through the engine in-process, text streamed to stdout as it
//! is decoded, or one JSON object at the end with `--json`.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use clap::Args;
use edgellm::api::{Event, Input, Request};
use edgellm::sampler::SamplingParams;

use crate::{Effort, EngineArgs, read_messages};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Prompt text (sent as one user message through the chat template, unless --raw).
    #[arg(
        long,
        conflicts_with = "messages",
        required_unless_present = "messages"
    )]
    prompt: Option<String>,
    /// Skip the chat template: tokenize the prompt as transformers' tokenizer(prompt) does.
    #[arg(long, requires = "prompt")]
    raw: bool,
    /// JSON file: [{"role": "...", "content": "..."}]
    #[arg(long, value_name = "FILE.json")]
    messages: Option<PathBuf>,
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// 0 = greedy. Default: the package's search settings (greedy unless it samples).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f32>,
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// gpt-oss reasoning effort.
    #[arg(long, value_enum)]
    reasoning_effort: Option<Effort>,
    /// gpt-oss: also print the analysis channel (to stderr).
    #[arg(long)]
    show_reasoning: bool,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let mut engine = args.engine.engine()?;
    let input = match (&args.prompt, &args.messages) {
        (Some(text), None) => Input::Prompt {
            text: text.clone(),
            raw: args.raw,
        },
        (None, Some(path)) => Input::Messages(read_messages(path)?),
        _ => anyhow::bail!("give --prompt TEXT or --messages FILE.json"),
    };
    let search = package_sampling(engine.model());
    let mut req = Request::new(input);
    req.max_tokens = args.max_tokens;
    req.stop = args.stop.clone();
    req.reasoning_effort = args.reasoning_effort.map(Into::into);
    req.include_reasoning = args.show_reasoning;
    req.sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(search.temperature),
        top_p: args.top_p.unwrap_or(search.top_p),
        top_k: args.top_k.unwrap_or(search.top_k),
        min_p: args.min_p.unwrap_or(search.min_p),
        repetition_penalty: args.repetition_penalty.unwrap_or(search.repetition_penalty),
        seed: args.seed,
    };

    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let completion = engine.generate(&req, &mut |event| {
        match event {
            // A closed stdout (e.g. `| head`) ends the request.
            Event::Delta(text)
                if !json
                    && stdout
                        .write_all(text.as_bytes())
                        .and_then(|()| stdout.flush())
                        .is_err() =>
            {
                return ControlFlow::Break(());
            }
            Event::Reasoning(text) if !json => eprint!("{text}"),
            _ => {}
        }
        ControlFlow::Continue(())
    })?;
    if json {
        serde_json::to_writer(&mut stdout, &completion)?;
    }
    writeln!(stdout)?;
    Ok(())
}

/// Sampling defaults from genai_config.json's `search` section (greedy unless `do_sample`).
fn package_sampling(model: &edgellm::model::Model) -> SamplingParams {
    let s = &model.package.config.search;
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
