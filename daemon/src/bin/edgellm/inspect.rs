//! `edgellm inspect DIR`: what a package holds, from its genai_config.json, edgellm.json (when
//! the package came from edgellm-export) and the graph's op types.

use std::path::Path;

use edgellm::package::Package;

pub fn inspect(dir: &Path) -> anyhow::Result<()> {
    let pkg = Package::open(dir)?;
    let m = &pkg.config.model;
    let d = &m.decoder;
    let read_json = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    let info = read_json("edgellm.json");
    let hf = read_json("config.json");
    let arch = hf
        .as_ref()
        .and_then(|c| c["architectures"][0].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let graph = std::fs::read(pkg.graph_path())?;
    let has = |op: &str| graph.windows(op.len()).any(|w| w == op.as_bytes());
    let mut quant = Vec::new();
    let field = |k: &str| {
        info.as_ref()
            .and_then(|i| i[k].as_str().map(str::to_string))
    };
    let gguf = info.as_ref().and_then(|i| i["gguf_blocks_kept"].as_bool()) == Some(true);
    if has("MatMulNBits") {
        let block = info.as_ref().and_then(|i| i["block_size"].as_u64());
        if gguf {
            quant.push("the GGUF file's blocks kept as MatMulNBits".to_string());
        }
        quant.push(format!(
            "MatMulNBits (--quant {}, block {})",
            field("quant").unwrap_or_else(|| "?".into()),
            block.map_or("?".to_string(), |b| b.to_string())
        ));
    } else {
        quant.push("float MatMul".into());
    }
    if has("QMoE") {
        quant.push("int4 QMoE experts".into());
    } else if has("MoE") {
        quant.push("float MoE experts".into());
    }
    quant.push(if has("GatherBlockQuantized") {
        match (gguf, field("embeddings")) {
            (false, Some(e)) => format!("{e} embeddings (GatherBlockQuantized)"),
            _ => "quantized embeddings (GatherBlockQuantized)".into(),
        }
    } else {
        "float embeddings".into()
    });
    let windowed: Vec<usize> = match &d.sliding_window {
        Some(w) => (0..d.num_hidden_layers)
            .filter(|i| w.layers.as_ref().is_none_or(|l| l.contains(i)))
            .collect(),
        None => Vec::new(),
    };
    let layout = pkg.kv_layout(m.context_length);
    let per_token = layout.bytes_per_token();
    let windowed_bytes: usize = layout
        .capacity
        .iter()
        .filter(|&&c| c != layout.max_length)
        .map(|c| c * 2 * d.num_key_value_heads * d.head_size * 4)
        .sum();
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!("package:       {}", dir.display());
    println!("architecture:  {arch} (model.type {})", m.model_type);
    println!(
        "layers:        {}{}",
        d.num_hidden_layers,
        match &d.sliding_window {
            Some(w) => format!(
                " ({} with a {}-token sliding window, {} full attention)",
                windowed.len(),
                w.window_size,
                d.num_hidden_layers - windowed.len()
            ),
            None => String::new(),
        }
    );
    println!(
        "dimensions:    hidden {}, {} heads x {}, {} KV heads, vocab {}",
        d.hidden_size, d.num_attention_heads, d.head_size, d.num_key_value_heads, m.vocab_size
    );
    println!("context:       {} tokens", m.context_length);
    println!("quantization:  {}", quant.join(", "));
    println!(
        "files:         model.onnx {:.1} MiB, model.onnx.data {:.1} MiB",
        mib(size(&d.filename)),
        mib(size(&format!("{}.data", d.filename)))
    );
    println!(
        "KV cache:      {per_token} bytes per token (f32 K+V of {} full-attention layers){}",
        d.num_hidden_layers - windowed.len(),
        if windowed_bytes > 0 {
            format!(
                ", plus {:.1} MiB fixed for the windowed layers",
                mib(windowed_bytes as u64)
            )
        } else {
            String::new()
        }
    );
    println!("eos ids:       {:?}", m.eos_token_id);
    if let Some(i) = info {
        println!(
            "exported by:   {} ({} weights, {} logits)",
            i["exporter"].as_str().unwrap_or("?"),
            i["precision"].as_str().unwrap_or("?"),
            i["logits"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}
