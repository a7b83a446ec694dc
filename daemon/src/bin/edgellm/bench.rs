//! `edgellm bench`: prefill and decode speed, time to first token and peak RSS, as medians
//! over runs of the same synthetic prompt (deterministic ids, greedy, end-of-sequence ignored).
//! Also reports the share of each decode step spent outside the backend's forward pass.
//! `--cached-prefix N` keeps the prompt's first N tokens as a computed prefix (what
//! `[model] system_prompts` does), so the runs measure the warm time to first token.

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
    #[arg(long)]
    json: bool,
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

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
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
    if args.cached_prefix > 0 {
        engine.keep_prefix(&prompt[..args.cached_prefix])?;
    }
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
    let result = serde_json::json!({
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
    }
    Ok(())
}
