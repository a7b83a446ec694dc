//! A GGUF file through `gguf::Gguf::open` (header, metadata, tensor table) and
//! `gguf::model::GgufModel::from_gguf` (architecture, hyperparameters, vocabulary, tensor
//! names), what `edgellm-export --gguf` runs on a downloaded file. Invariants: the reader
//! allocates in proportion to the file (a count field cannot ask for 64 GiB); a model it
//! accepts maps to a checkpoint whose tensors can be read.
#![no_main]

use edgellm_export::checkpoint::Checkpoint;
use edgellm_export::gguf::Gguf;
use edgellm_export::gguf::model::GgufModel;
use edgellm_fuzz::{check_allocation, peak_during, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("model.gguf");
    std::fs::write(&path, data).expect("write");
    let (model, peak) = peak_during(|| {
        let g = Gguf::open(&path).ok()?;
        let m = GgufModel::from_gguf(&g).ok()?;
        Some((g, m))
    });
    check_allocation("Gguf::open + GgufModel::from_gguf", data.len(), peak, 64);
    if let Some((g, m)) = model {
        let ck = Checkpoint::from_gguf(g, &m);
        for name in ck.names() {
            let info = ck.info(name).expect("a listed tensor");
            if let Some(rows) = info.shape.first().map(|&r| 0..r.min(1)) {
                let _ = ck.raw_rows(name, rows);
            }
        }
    }
});
