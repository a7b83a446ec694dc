//! `edgellm bench`: prefill and decode speed, time to first token and peak RSS, as medians
//! over runs of the same synthetic prompt (deterministic ids, greedy, end-of-sequence ignored).
//! Also reports the share of each decode step spent outside the backend's forward pass.
//! `--cached-prefix N` keeps the prompt's first N tokens as a computed prefix (what
//! `[model] system_prompts` does), so the runs measure the warm time to first token.
//! `--parallel N` measures continuous batching instead: N requests (different prompts of the
//! same length) submitted at once to the scheduler with `parallel = N`, against the same N run
//! one at a time in the same process: aggregate decode tok/s and time to first token (from
//! submission: queueing included) of each.
//! `--json-schema FILE --grammar-text TEXT` also measures structured output's cost on the
//! package's vocabulary ([`grammar_walk`]): the token mask's time per step against the decode
//! step measured in the same run, and the share of tokens the grammar forces; `--tools FILE
//! --grammar-text REPLY` does the same for a harmony model's tool-call grammar, which masks
//! every token of the reply (reasoning included); `--grammar-only` walks without loading the
//! weights (a package too large for the machine).
//! `--paced` keeps the engine loaded and runs once per line read on stdin, printing each run's
//! figures as it ends: a driver alternates these warm in-process runs with requests to edgellmd
//! to compare the two seconds apart (`scripts/bench-transports.sh`).

use std::ops::ControlFlow;

use clap::Args;
use edgellm::api::{Input, Request};
use edgellm::sampler::SamplingParams;

use crate::EngineArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Keep the prompt's first N tokens computed (a system prompt): TTFT then covers the rest.
    #[arg(long, default_value_t = 0)]
    cached_prefix: usize,
    /// N concurrent requests, batched (`[limits] parallel = N`) and one at a time.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Structured output's cost: a JSON schema, walked along `--grammar-text`.
    #[arg(
        long,
        value_name = "FILE.json",
        requires = "grammar_text",
        group = "walked"
    )]
    json_schema: Option<std::path::PathBuf>,
    /// Tool calls' cost: OpenAI's `tools` list (`tool_choice` auto), walked along
    /// `--grammar-text`, a reply that calls one (special tokens written as text, e.g.
    /// harmony's `<|channel|>`).
    #[arg(
        long,
        value_name = "FILE.json",
        requires = "grammar_text",
        group = "walked"
    )]
    tools: Option<std::path::PathBuf>,
    /// The answer the walk follows: a JSON text valid against `--json-schema`, or a reply
    /// that calls one of `--tools`.
    #[arg(long, value_name = "TEXT", requires = "walked")]
    grammar_text: Option<String>,
    /// Only the walk: load the package's tokenizer, not its weights, and report the mask's
    /// times alone (no decode step to compare with): for packages too large for this machine.
    #[arg(long, requires = "grammar_text")]
    grammar_only: bool,
    /// After the warm-up run, each run waits for a line on stdin and then prints its own
    /// figures as one JSON line (EOF ends): for a driver that alternates these in-process runs
    /// with requests to edgellmd, seconds apart, with no process start or model load between
    /// them (`scripts/bench-transports.sh`'s paired decode comparison). An empty line runs the
    /// synthetic prompt; a line of text runs it as a chat request as edgellmd would (one user
    /// message through the chat template, the model's sampling defaults at temperature 0,
    /// `--gen-tokens` at most, the engine's cache kept from the run before).
    #[arg(long, conflicts_with_all = ["parallel", "walked", "grammar_only", "cached_prefix"])]
    paced: bool,
    #[arg(long)]
    json: bool,
}

/// Walks `text` through a fresh constraint as a model that wants to write it would: at each
/// step the mask is computed (timed), then the allowed token that covers the most of what is
/// left of the text is taken, and the tokens the grammar then forces are taken as they come.
/// The walk is independent of the model's weights (a random-init package's vocabulary serves),
/// and every mask is the one a real generation of this text would compute.
/// Returns (mask times in microseconds, tokens taken by choice, tokens forced).
fn grammar_walk(
    model: &edgellm::model::Model,
    grammar: &edgellm::grammar::Grammar,
    text: &str,
) -> anyhow::Result<(Vec<f64>, usize, usize)> {
    use edgellm::grammar::Constraint;
    let vocab = model.package.config.model.vocab_size;
    let words = model
        .tokenizer
        .token_bytes(vocab)
        .ok_or_else(|| anyhow::anyhow!("this tokenizer has no byte table"))?;
    // Special tokens are marked in the byte table (0xFF and their text): mark them so in the
    // text too.
    let mut text = text.as_bytes().to_vec();
    let added = model.tokenizer.added_ids();
    let specials = added
        .iter()
        .filter_map(|&id| words.get(id as usize))
        .filter(|w| w.len() > 1 && w[0] == 0xFF);
    for w in specials {
        let name = &w[1..];
        let mut out = Vec::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            if text[i..].starts_with(name) && (i == 0 || text[i - 1] != 0xFF) {
                out.extend_from_slice(w);
                i += name.len();
            } else {
                out.push(text[i]);
                i += 1;
            }
        }
        text = out;
    }
    let mut c = Constraint::new(grammar);
    let (mut rest, mut times, mut chosen, mut forced) = (&text[..], Vec::new(), 0, 0);
    while !rest.is_empty() && !c.is_complete() {
        let t = std::time::Instant::now();
        let mask = c.mask()?.to_vec();
        times.push(t.elapsed().as_secs_f64() * 1e6);
        let allowed = |i: usize| mask.get(i / 32).is_some_and(|w| (w >> (i % 32)) & 1 == 1);
        let best = (0..vocab)
            .filter(|&i| allowed(i) && !words[i].is_empty() && rest.starts_with(&words[i]))
            .max_by_key(|&i| words[i].len())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "the grammar allows no token that continues {:?}: is the text valid for \
                     the schema, in its layout (`\", \"`, `\": \"`)?",
                    String::from_utf8_lossy(rest)
                )
            })?;
        rest = &rest[words[best].len()..];
        chosen += 1;
        let mut ff = Vec::new();
        c.commit(best as u32, &mut ff)?;
        for f in ff {
            let w = &words[f as usize];
            anyhow::ensure!(
                rest.starts_with(w),
                "the grammar forced {:?} where the text goes on with {:?}",
                String::from_utf8_lossy(w),
                String::from_utf8_lossy(rest)
            );
            rest = &rest[w.len()..];
            forced += 1;
        }
    }
    anyhow::ensure!(
        rest.is_empty() && c.is_complete(),
        "the walk ended early: {:?} left, grammar complete: {}",
        String::from_utf8_lossy(rest),
        c.is_complete()
    );
    Ok((times, chosen, forced))
}

/// One pass of `n` requests submitted at once: (aggregate tok/s over the generated tokens
/// after each first one, TTFTs from submission in ms, sorted).
fn concurrent_pass(
    engine: edgellm::engine::Engine,
    parallel: usize,
    prompts: &[Vec<u32>],
    req: &Request,
) -> anyhow::Result<(f64, Vec<f64>)> {
    use edgellm::scheduler::{Limits, RequestEvent, Scheduler};
    use std::time::{Duration, Instant};
    let limits = Limits {
        queue_depth: prompts.len().max(1),
        parallel,
        max_new_tokens: usize::MAX,
        request_timeout: Duration::from_secs(3600),
        stream_interval: 1,
    };
    let s = Scheduler::start(engine, limits, tokio_util::sync::CancellationToken::new());
    anyhow::ensure!(
        s.parallel() == parallel,
        "this backend and package run one request at a time (see the log)"
    );
    let start = Instant::now();
    let mut handles = Vec::new();
    for p in prompts {
        let mut r = req.clone();
        r.input = Input::Prompt {
            text: String::new(),
            raw: true,
        };
        handles.push(s.submit_ids(r, p.clone())?);
    }
    // Each request's events are read on a thread of its own, so that one request's first
    // token is timed when it comes, not after the requests before it are done.
    let results: Vec<anyhow::Result<(Instant, Instant, usize)>> = std::thread::scope(|scope| {
        let readers: Vec<_> = handles
            .into_iter()
            .map(|mut h| {
                scope.spawn(move || {
                    let mut first = None;
                    loop {
                        match h.events.blocking_recv() {
                            Some(RequestEvent::Event(_)) => {
                                first.get_or_insert_with(Instant::now);
                            }
                            Some(RequestEvent::Done(c)) => {
                                let end = Instant::now();
                                let tokens = c.usage.completion_tokens.saturating_sub(1);
                                return Ok((first.unwrap_or(end), end, tokens));
                            }
                            Some(RequestEvent::Error(e)) => anyhow::bail!("request failed: {e}"),
                            None => anyhow::bail!("the engine thread stopped"),
                        }
                    }
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader panicked")))
            })
            .collect()
    });
    let mut ttft = Vec::new();
    let (mut tokens, mut last) = (0usize, start);
    for r in results {
        let (first, end, n) = r?;
        ttft.push((first - start).as_secs_f64() * 1e3);
        last = last.max(end);
        tokens += n;
    }
    ttft.sort_by(f64::total_cmp);
    let wall = (last - start).as_secs_f64();
    Ok((tokens as f64 / wall.max(1e-9), ttft))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `--parallel N`: the same N requests batched and one at a time.
fn bench_parallel(args: &BenchArgs, prompt: &[u32], req: &Request) -> anyhow::Result<()> {
    let vocab = prompt.len().max(1) as u32;
    let prompts: Vec<Vec<u32>> = (0..args.parallel as u32)
        .map(|k| {
            // Each request its own prompt: rotate the ids, so no prefix is shared.
            let mut p = prompt.to_vec();
            p.rotate_left((k * 17 % vocab) as usize);
            p
        })
        .collect();
    let mut rows = Vec::new();
    for parallel in [1, args.parallel] {
        // A warm-up pass first (first-run allocations), then the measured one.
        let (_, _) = concurrent_pass(args.engine.engine()?, parallel, &prompts[..1], req)?;
        let (tok_s, ttft) = concurrent_pass(args.engine.engine()?, parallel, &prompts, req)?;
        rows.push(serde_json::json!({
            "parallel": parallel,
            "requests": prompts.len(),
            "aggregate_decode_tok_s": tok_s,
            "ttft_p50_ms": percentile(&ttft, 0.5),
            "ttft_p95_ms": percentile(&ttft, 0.95),
        }));
    }
    let ratio = rows[1]["aggregate_decode_tok_s"].as_f64().unwrap_or(0.0)
        / rows[0]["aggregate_decode_tok_s"]
            .as_f64()
            .unwrap_or(1.0)
            .max(1e-9);
    let result = serde_json::json!({
        "model": args.engine.model.display().to_string(),
        "threads": args.engine.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "one_at_a_time": rows[0],
        "batched": rows[1],
        "batched_over_one_at_a_time": ratio,
    });
    if args.json {
        println!("{result}");
    } else {
        for r in &rows {
            println!(
                "parallel {:>2}: {} requests of {} + {} tokens: aggregate decode {:.1} tok/s, TTFT p50 {:.0} ms, p95 {:.0} ms",
                r["parallel"],
                r["requests"],
                args.prompt_tokens,
                args.gen_tokens,
                r["aggregate_decode_tok_s"].as_f64().unwrap_or(0.0),
                r["ttft_p50_ms"].as_f64().unwrap_or(0.0),
                r["ttft_p95_ms"].as_f64().unwrap_or(0.0)
            );
        }
        println!("batched / one at a time: {ratio:.2}x");
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The mask's cost along `--grammar-text` ([`grammar_walk`]) for `--json-schema` or `--tools`,
/// as a share of `step_us` (the decode step measured in the same run) when there is one.
fn grammar_figures(
    args: &BenchArgs,
    model: &edgellm::model::Model,
    step_us: Option<f64>,
) -> anyhow::Result<serde_json::Value> {
    let text = args.grammar_text.as_deref().unwrap_or_default();
    let read = |path: &std::path::Path| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        )?)
    };
    let grammar = match (&args.json_schema, &args.tools) {
        (Some(path), _) => model.compile(&edgellm::grammar::Format::JsonSchema {
            name: "bench".into(),
            schema: read(path)?,
        })?,
        (None, Some(path)) => {
            let tools = edgellm::tools::Tools::parse(Some(&read(path)?), None)?;
            let (grammar, when) = model
                .compile_request(None, Some(&tools))?
                .ok_or_else(|| anyhow::anyhow!("no tool grammar for this model"))?;
            anyhow::ensure!(
                when == edgellm::tools::When::Reply,
                "--tools walks a whole reply: harmony models only (a template model's calls \
                 are constrained from their opening only, as --json-schema measures)"
            );
            grammar
        }
        (None, None) => anyhow::bail!("--grammar-text needs --json-schema or --tools"),
    };
    let (mut times, chosen, forced) = grammar_walk(model, &grammar, text)?;
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let mut g = serde_json::json!({
        "vocab": model.package.config.model.vocab_size,
        "masked_steps": chosen,
        "forced_tokens": forced,
        "forced_share": forced as f64 / (chosen + forced).max(1) as f64,
        "mask_us_mean": mean,
        "mask_us_p50": percentile(&times, 0.5),
        "mask_us_p99": percentile(&times, 0.99),
        "mask_us_max": times.last().copied().unwrap_or(0.0),
    });
    if let Some(step_us) = step_us {
        g["decode_step_us"] = step_us.into();
        g["mask_share_of_step"] = (mean / step_us).into();
    }
    Ok(g)
}

/// `--paced`: a warm-up run (the synthetic prompt), then up to `--runs` runs, each when a line
/// arrives on stdin (empty: the synthetic prompt; text: a chat request), each answered with one
/// JSON line on stdout (flushed).
fn bench_paced(
    args: &BenchArgs,
    engine: &mut edgellm::engine::Engine,
    prompt: &[u32],
    req: &Request,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut line = String::new();
    for run in 0..=args.runs {
        if run > 0 {
            line.clear();
            if stdin.read_line(&mut line)? == 0 {
                break;
            }
        }
        let text = line.trim_end_matches(['\r', '\n']);
        let c = if text.is_empty() {
            engine.forget_cache();
            engine.generate_from_ids(req, prompt.to_vec(), &mut |_| ControlFlow::Continue(()))?
        } else {
            let mut chat = Request::new(Input::Prompt {
                text: text.to_string(),
                raw: false,
            });
            chat.max_tokens = Some(args.gen_tokens);
            chat.sampling = SamplingParams {
                temperature: 0.0,
                ..engine.model().default_sampling()
            };
            engine.generate(&chat, &mut |_| ControlFlow::Continue(()))?
        };
        if run == 0 {
            continue; // warm-up
        }
        let result = serde_json::json!({
            "run": run,
            "prompt_tokens": c.usage.prompt_tokens,
            "cached_tokens": c.usage.cached_tokens,
            "gen_tokens": c.usage.completion_tokens,
            "prefill_tok_s": c.usage.prefill_tok_s,
            "decode_tok_s": c.usage.decode_tok_s,
            "ttft_ms": c.usage.ttft_ms,
        });
        writeln!(stdout, "{result}")?;
        stdout.flush()?;
    }
    Ok(())
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if args.grammar_only {
        // The package's vocabulary and tokenizer only: no weights are loaded.
        let model = edgellm::model::Model::load(&args.engine.model)?;
        let g = grammar_figures(args, &model, None)?;
        let model = args.engine.model.display().to_string();
        println!("{}", serde_json::json!({"model": model, "grammar": g}));
        return Ok(());
    }
    anyhow::ensure!(
        args.runs > 0 && args.prompt_tokens > 0 && args.gen_tokens > 0,
        "--runs, --prompt-tokens and --gen-tokens must be positive"
    );
    let mut engine = args.engine.engine()?;
    let vocab = engine.model().package.config.model.vocab_size as u64;
    let eos = engine.model().eos.clone();
    // Deterministic ids spread over the vocabulary, avoiding end-of-sequence ids.
    let prompt: Vec<u32> = (0..args.prompt_tokens as u64)
        .map(|i| ((i * 7919 + 101) % vocab) as u32)
        .map(|t| {
            if eos.contains(&t) {
                (t + 1) % vocab as u32
            } else {
                t
            }
        })
        .collect();
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= engine.max_length(),
        "--prompt-tokens + --gen-tokens ({}) exceeds the KV capacity {} (raise --max-length)",
        args.prompt_tokens + args.gen_tokens,
        engine.max_length()
    );
    anyhow::ensure!(
        args.cached_prefix < args.prompt_tokens,
        "--cached-prefix must be shorter than --prompt-tokens"
    );
    let mut req = Request::new(Input::Prompt {
        text: String::new(),
        raw: true,
    });
    req.max_tokens = Some(args.gen_tokens);
    req.ignore_eos = true;
    req.sampling = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    if args.parallel > 1 {
        drop(engine);
        return bench_parallel(args, &prompt, &req);
    }
    if args.cached_prefix > 0 {
        engine.keep_prefix(&prompt[..args.cached_prefix])?;
    }

    if args.paced {
        return bench_paced(args, &mut engine, &prompt, &req);
    }

    let (mut ttft, mut prefill, mut decode, mut overhead) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut cached = 0;
    for run in 0..=args.runs {
        // Every run computes the whole prompt: the prefill is part of what is measured.
        engine.forget_cache();
        let c =
            engine.generate_from_ids(&req, prompt.clone(), &mut |_| ControlFlow::Continue(()))?;
        let stats = engine.last_stats();
        if run == 0 {
            continue; // warm-up: first-run allocations and page faults
        }
        ttft.push(c.usage.ttft_ms);
        cached = c.usage.cached_tokens;
        prefill.push(c.usage.prefill_tok_s);
        decode.push(c.usage.decode_tok_s);
        overhead.push(stats.decode_overhead_fraction() * 100.0);
    }
    let mut result = serde_json::json!({
        "model": args.engine.model.display().to_string(),
        "backend": engine.backend_name(),
        "threads": args.engine.threads,
        "prompt_tokens": args.prompt_tokens,
        "cached_tokens": cached,
        "gen_tokens": args.gen_tokens,
        "runs": args.runs,
        "prefill_tok_s": median(prefill),
        "decode_tok_s": median(decode),
        "ttft_ms": median(ttft),
        "decode_overhead_pct": median(overhead),
        "peak_rss_mib": peak_rss_mib(),
    });
    if args.grammar_text.is_some() {
        let step_us = 1e6 / result["decode_tok_s"].as_f64().unwrap_or(f64::INFINITY);
        result["grammar"] = grammar_figures(args, engine.model(), Some(step_us))?;
    }
    if args.json {
        println!("{result}");
    } else {
        println!(
            "backend:        {}",
            result["backend"].as_str().unwrap_or("?")
        );
        println!(
            "prompt / gen:   {} / {} tokens ({cached} cached), {} runs (medians)",
            args.prompt_tokens, args.gen_tokens, args.runs
        );
        println!(
            "prefill:        {:.1} tok/s",
            result["prefill_tok_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "decode:         {:.1} tok/s",
            result["decode_tok_s"].as_f64().unwrap_or(0.0)
        );
        println!(
            "ttft:           {:.1} ms",
            result["ttft_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "outside forward: {:.2}% of each decode step",
            result["decode_overhead_pct"].as_f64().unwrap_or(0.0)
        );
        println!(
            "peak RSS:       {:.0} MiB",
            result["peak_rss_mib"].as_f64().unwrap_or(0.0)
        );
        if let Some(g) = result.get("grammar") {
            let f = |k: &str| g[k].as_f64().unwrap_or(0.0);
            println!(
                "grammar mask:   {:.1} us mean, {:.1} p99, {:.1} max = {:.2}% of a decode step \
                 ({} masked steps, {} forced tokens, vocabulary {})",
                f("mask_us_mean"),
                f("mask_us_p99"),
                f("mask_us_max"),
                100.0 * f("mask_share_of_step"),
                g["masked_steps"],
                g["forced_tokens"],
                g["vocab"]
            );
        }
    }
    Ok(())
}
