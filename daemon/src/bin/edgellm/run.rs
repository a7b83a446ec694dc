//! `edgellm run`: one request through the engine in-process, text streamed to stdout as it
//! is decoded, or one JSON object at the end with `--json`.

use std::io::Write;
use std::ops::ControlFlow;

use clap::Args;
use edgellm::api::{Event, Request};

use crate::{EngineArgs, InputArgs, RequestArgs};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    request: RequestArgs,
    /// gpt-oss: also print the analysis channel (to stderr).
    #[arg(long)]
    show_reasoning: bool,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let mut engine = args.engine.engine()?;
    let input = args.input.input()?;
    let mut req = Request::new(input);
    args.request
        .apply(&mut req, engine.model().default_sampling())?;
    req.include_reasoning = args.show_reasoning;

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
    if !json {
        // Tool calls, one JSON object a line (OpenAI's shape).
        for call in &completion.tool_calls {
            writeln!(stdout, "{}", call.to_json())?;
        }
    }
    Ok(())
}
