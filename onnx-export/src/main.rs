//! `edgellm-export`: CLI over [`edgellm_export::export`]. Parses, dispatches, maps errors to
//! exit codes; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use edgellm_export::{ExportOptions, Precision, random_init};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Prec {
    Int4,
    Int8,
    Fp32,
}

impl From<Prec> for Precision {
    fn from(p: Prec) -> Self {
        match p {
            Prec::Int4 => Precision::Int4,
            Prec::Int8 => Precision::Int8,
            Prec::Fp32 => Precision::Fp32,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Logits {
    Last,
    All,
}

/// Export a Hugging Face checkpoint to an int4 ONNX model package (onnxruntime-genai layout).
#[derive(Debug, Parser)]
#[command(version, after_help = random_init::SHAPES_HELP)]
struct Cli {
    /// Local Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["random_init", "random_init_hf", "gguf"])]
    hf: Option<PathBuf>,
    /// A GGUF file (llama.cpp's format): quantized blocks are kept exactly where ONNX Runtime
    /// has a matching form (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), float tensors are
    /// quantized like --hf.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["random_init", "random_init_hf"])]
    gguf: Option<PathBuf>,
    /// GGUF: dequantize and re-quantize tensors whose type has no exact form instead of failing.
    #[arg(long)]
    allow_requantize: bool,
    /// GGUF: dequantize every tensor and quantize it again with --quant (compare schemes on
    /// the same weights).
    #[arg(long)]
    requantize: bool,
    /// MatMulNBits accuracy_level: 4 quantizes activations to int8 (fast), 0 keeps them f32.
    #[arg(long, default_value_t = 4)]
    accuracy_level: i64,
    /// Output package folder (or, with --random-init-hf, the checkpoint folder).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// int4 or fp32 (fp32: every weight float, --embeddings ignored; int8 is for --embeddings
    /// only).
    #[arg(long, value_enum, default_value = "int4")]
    precision: Prec,
    #[arg(long, default_value_t = 32)]
    block_size: usize,
    /// How float weights are quantized: `offset` (float minimum and scale per block, searched
    /// for the least squared error; Q4_1's grid), `asym` (uint8 zero point), `mse` (symmetric,
    /// scale searched), `rtn` (round to nearest, byte-compatible with onnxruntime-genai's
    /// builder). See docs/export-models.md.
    #[arg(long, value_parser = ["offset", "asym", "mse", "rtn"], default_value = "offset")]
    quant: String,
    /// The embedding table: int4 (shared with a tied lm_head), int8 (the lm_head 8-bit too),
    /// or fp32.
    #[arg(long, value_enum, default_value = "int4")]
    embeddings: Prec,
    /// `last`: lm_head on the last position only (logits [B,1,V]); `all`: every position.
    #[arg(long, value_enum, default_value = "last")]
    logits: Logits,
    /// Longest sequence the package serves (RoPE cache rows, genai max_length).
    #[arg(long, value_name = "N")]
    max_length: Option<usize>,
    /// Export a deterministic random-weight model of a real shape (no download).
    #[arg(long, value_name = "SHAPE", conflicts_with = "random_init_hf")]
    random_init: Option<String>,
    /// Write a deterministic random-weight checkpoint of a real shape in HF layout to --out.
    #[arg(long, value_name = "SHAPE")]
    random_init_hf: Option<String>,
    /// Seed for --random-init / --random-init-hf.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgellm-export: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let opts = ExportOptions {
        precision: cli.precision.into(),
        embeddings: cli.embeddings.into(),
        block_size: cli.block_size,
        logits_all: matches!(cli.logits, Logits::All),
        max_length: cli.max_length,
        force: cli.force,
        quant: edgellm_export::quant::Scheme::parse(&cli.quant).expect("clap checked the name"),
        accuracy_level: cli.accuracy_level,
        allow_requantize: cli.allow_requantize,
        requantize: cli.requantize,
    };
    if let Some(file) = &cli.gguf {
        let s = edgellm_export::export_gguf(file, &cli.out, &opts)?;
        summary(&s);
        return Ok(());
    }
    if let Some(shape) = &cli.random_init_hf {
        random_init::write_checkpoint(shape, &cli.out, cli.seed, cli.force)?;
        eprintln!(
            "wrote random-init {shape} checkpoint to {}",
            cli.out.display()
        );
        return Ok(());
    }
    let tmp;
    let hf = match (&cli.hf, &cli.random_init) {
        (Some(hf), None) => hf.clone(),
        (None, Some(shape)) => {
            tmp = random_init::TempCheckpoint::new(shape, &cli.out, cli.seed)?;
            tmp.dir().to_path_buf()
        }
        _ => anyhow::bail!(
            "give --hf DIR, --gguf FILE, --random-init SHAPE or --random-init-hf SHAPE"
        ),
    };
    let s = edgellm_export::export(&hf, &cli.out, &opts)?;
    summary(&s);
    Ok(())
}

fn summary(s: &edgellm_export::ExportSummary) {
    eprintln!(
        "exported {} ({} layers, {:.1} MiB of weights) to {}",
        s.architecture,
        s.layers,
        s.data_bytes as f64 / (1 << 20) as f64,
        s.out.display()
    );
}
