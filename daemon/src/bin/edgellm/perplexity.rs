//! `edgellm perplexity`: the field's quality measure, computed exactly as llama.cpp's
//! `llama-perplexity` does (`perplexity()` in its tools/perplexity/perplexity.cpp), so numbers
//! compare across engines and quantizations.
//!
//! The whole file, less one final newline (as llama.cpp's `-f` reads it), is tokenized as
//! transformers' `tokenizer(text)` does (BOS included when the tokenizer adds one) and cut into
//! `n_chunks = tokens / ctx` windows of `ctx` tokens (fewer with `--chunks`); when the tokenizer
//! adds a BOS, each window's first token is replaced by it.
//! Each window runs from an empty KV cache; the logits at positions `ctx/2 ..= ctx-2` score the
//! tokens after them, so every scored token sees at least `ctx/2` tokens of context. Then
//! `PPL = exp(mean NLL)` and its standard error `PPL * sqrt(var(NLL) / (count - 1))`.
//!
//! One difference: llama.cpp also turns backslash escapes in the file (`\n`, `\t`, ...) into
//! the characters they name (its `--escape`, on by default); edgellm scores the text as written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;

use crate::EngineArgs;

#[derive(Debug, Args)]
// The KV capacity is --ctx: --max-length is refused, and so not offered.
#[command(mut_arg("max_length", |a| a.hide(true)))]
pub struct PerplexityArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// UTF-8 text to score (e.g. wikitext-2's wiki.test.raw).
    #[arg(long, value_name = "TEXT")]
    file: PathBuf,
    /// Tokens per window (even, at least 4, at most the package's context length); the second
    /// half of each window is scored. Also the KV capacity.
    #[arg(long, value_name = "N", default_value_t = 512)]
    ctx: usize,
    /// Score only the first N windows (default: every whole window of the text).
    #[arg(long, value_name = "N")]
    chunks: Option<usize>,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

/// Sums of per-token negative log-likelihoods (nats), as llama.cpp accumulates them.
#[derive(Debug, Default, Clone, Copy)]
struct Nll {
    sum: f64,
    sum_sq: f64,
    count: usize,
}

impl Nll {
    /// Adds `-log softmax(row)[target]`, in f64 after subtracting the row's maximum.
    fn add(&mut self, row: &[f32], target: u32) {
        let max = f64::from(row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let sum_exp: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
        let nll = sum_exp.ln() - (f64::from(row[target as usize]) - max);
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }

    fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }

    /// llama.cpp's "+/-": `PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1))`; 0 when it is
    /// undefined (one scored token, or no spread).
    fn stderr(&self) -> f64 {
        let n = self.count as f64;
        let mean = self.sum / n;
        let var = self.sum_sq / n - mean * mean;
        if self.count < 2 || var <= 0.0 {
            return 0.0;
        }
        self.ppl() * (var / (n - 1.0)).sqrt()
    }
}

/// Reads `path` as UTF-8 text less one final newline, naming the file in every error.
fn read_text(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid bytes at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.ends_with('\n') {
        text.pop();
    }
    Ok(text)
}

pub fn perplexity(args: &PerplexityArgs) -> anyhow::Result<()> {
    let ctx = args.ctx;
    anyhow::ensure!(
        ctx >= 4 && ctx.is_multiple_of(2),
        "--ctx must be an even number of at least 4 (got {ctx})"
    );
    anyhow::ensure!(args.chunks != Some(0), "--chunks must be at least 1");
    anyhow::ensure!(
        args.engine.max_length.is_none(),
        "perplexity takes no --max-length: the KV capacity is --ctx"
    );
    let text = read_text(&args.file)?;
    let model = edgellm::model::Model::load(&args.engine.model)?;
    let context = model.package.config.model.context_length;
    anyhow::ensure!(
        ctx <= context,
        "--ctx {ctx} exceeds the package's context length {context}"
    );
    let tokens = model.tokenizer.encode(&text, true)?;
    let bos = model.tokenizer.added_bos()?;
    anyhow::ensure!(
        tokens.len() >= 2 * ctx,
        "{} tokenizes to {} tokens; perplexity with --ctx {ctx} needs at least {} (2 x ctx)",
        args.file.display(),
        tokens.len(),
        2 * ctx
    );
    // Targets are never run through the backend (whose step checks ids), so check them here.
    let vocab = model.package.config.model.vocab_size;
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!("the tokenizer gives id {id}, outside the model's vocabulary (size {vocab})");
    }
    let n_chunks = (tokens.len() / ctx).min(args.chunks.unwrap_or(usize::MAX));

    let mut engine = args.engine.engine_for(model, ctx)?;
    let first = ctx / 2;
    let mut nll = Nll::default();
    let mut processed = 0;
    // Not locked across the evaluation: backend threads may log to stderr meanwhile.
    let progress = std::io::stderr;
    let start = Instant::now();
    for (i, window) in tokens.chunks_exact(ctx).take(n_chunks).enumerate() {
        let mut window = window.to_vec();
        if let Some(bos) = bos {
            window[0] = bos;
        }
        // Scored positions start at ctx/2 >= 2, so the BOS never stands in for a target.
        processed += engine.teacher_forced(&window, first, &mut |p, row| {
            nll.add(row, window[p + 1]);
        })?;
        // llama.cpp's running estimate: "[1]12.3456,[2]11.9876,..."
        let _ = write!(progress(), "[{}]{:.4},", i + 1, nll.ppl());
    }
    let seconds = start.elapsed().as_secs_f64();
    let _ = writeln!(progress());

    let (ppl, stderr) = (nll.ppl(), nll.stderr());
    let tokens_per_s = processed as f64 / seconds.max(1e-9);
    if args.json {
        let result = serde_json::json!({
            "ppl": ppl,
            "stderr": stderr,
            "nll_sum": nll.sum,
            "count": nll.count,
            "n_tokens": tokens.len(),
            "n_chunks": n_chunks,
            "ctx": ctx,
            "tokens_per_s": tokens_per_s,
            "backend": engine.backend_name(),
            "model": args.engine.model.display().to_string(),
        });
        println!("{result}");
    } else {
        println!("model:    {}", args.engine.model.display());
        println!("backend:  {}", engine.backend_name());
        println!(
            "text:     {} tokens{}; {n_chunks} chunks of {ctx}",
            tokens.len(),
            if bos.is_some() { " (BOS first)" } else { "" }
        );
        println!(
            "scored:   {} tokens (the last {} of each chunk)",
            nll.count,
            ctx - first - 1
        );
        println!("speed:    {processed} tokens in {seconds:.2} s: {tokens_per_s:.1} tokens/s");
        println!("Final estimate: PPL = {ppl:.4} +/- {stderr:.5}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `-f` drops one final newline, no more.
    #[test]
    fn one_final_newline_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.txt");
        for (written, read) in [("a\n\n", "a\n"), ("a\n", "a"), ("a", "a"), ("a\r\n", "a\r")] {
            std::fs::write(&file, written).unwrap();
            assert_eq!(read_text(&file).unwrap(), read, "{written:?}");
        }
    }

    /// Uniform logits over V tokens: every NLL is ln V, so PPL is V with no spread.
    #[test]
    fn uniform_logits_give_the_vocabulary_size() {
        let mut nll = Nll::default();
        for t in 0..10 {
            nll.add(&[3.0; 50], t);
        }
        assert!((nll.ppl() - 50.0).abs() < 1e-9);
        // No spread, up to the rounding of llama.cpp's mean(x^2) - mean(x)^2.
        assert!(nll.stderr() < 1e-5, "{}", nll.stderr());
    }

    /// Two tokens with probabilities 1/2 and 1/4 (logits ln 2 apart): NLLs ln 2 and ln 4.
    #[test]
    fn perplexity_and_stderr_follow_llama_cpp() {
        let row = [2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let mut nll = Nll::default();
        nll.add(&row, 0);
        nll.add(&row, 1);
        let (a, b) = (2f64.ln(), 4f64.ln());
        assert!((nll.sum - (a + b)).abs() < 1e-6);
        let ppl = ((a + b) / 2.0).exp();
        assert!((nll.ppl() - ppl).abs() < 1e-6);
        // mean(nll^2) - mean(nll)^2 = ((a - b) / 2)^2; count - 1 = 1.
        assert!((nll.stderr() - ppl * (b - a) / 2.0).abs() < 1e-6);
    }
}
