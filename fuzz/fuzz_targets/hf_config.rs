//! A checkpoint's `config.json` (and `generation_config.json`, after the input's first NUL)
//! through `spec::ModelSpec::from_json`, what the exporter reads first, then the sizes it
//! derives. Invariant: a config it accepts gives sizes without overflow (a panic would be an
//! exporter that dies instead of naming the bad field).
#![no_main]

use std::path::Path;

use edgellm_export::spec::ModelSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cfg, gen_cfg) = edgellm_fuzz::split2(data);
    let Ok(cfg) = serde_json::from_slice::<serde_json::Value>(cfg) else {
        return;
    };
    let gen_cfg = serde_json::from_slice::<serde_json::Value>(gen_cfg).ok();
    let Ok(mut spec) = ModelSpec::from_json(&cfg, gen_cfg.as_ref(), Path::new("config.json"))
    else {
        return;
    };
    for has_lm_head in [false, true] {
        spec.resolve(has_lm_head, 4096);
        let _ = (spec.q_dim(), spec.kv_dim(), spec.window(), spec.tied());
    }
});
