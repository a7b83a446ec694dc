//! A Hugging Face checkpoint's weights: `model.safetensors`, or (when the input has a NUL) a
//! `model.safetensors.index.json` and the one shard it may name, through
//! `checkpoint::Checkpoint::open`, what the exporter runs on a downloaded checkpoint.
//! Invariants: the reader allocates in proportion to its input; every tensor it accepts can
//! be read. (Shard names that leave the folder are refused: onnx-export's test
//! `index_shards_outside_the_checkpoint_are_refused`.)
#![no_main]

use edgellm_export::checkpoint::{Checkpoint, Dtype};
use edgellm_fuzz::{check_allocation, peak_during, scratch, split2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    match split2(data) {
        (weights, []) => std::fs::write(dir.join("model.safetensors"), weights).expect("write"),
        (index, shard) => {
            std::fs::write(dir.join("model.safetensors.index.json"), index).expect("write");
            std::fs::write(dir.join("model-00001-of-00001.safetensors"), shard).expect("write");
        }
    }
    let (opened, peak) = peak_during(|| Checkpoint::open(&dir));
    check_allocation("Checkpoint::open", data.len(), peak, 64);
    if let Ok(ck) = opened {
        for name in ck.names() {
            let info = ck.info(name).expect("a listed tensor");
            let rows = 0..info.shape.first().copied().unwrap_or(1).min(1);
            let (read, peak) = peak_during(|| match info.dtype {
                Dtype::U8 => ck.bytes(name, 0..0).map(drop),
                _ => ck.f32_rows(name, rows).map(drop),
            });
            read.unwrap_or_else(|e| panic!("an accepted tensor does not read: {e}"));
            check_allocation("Checkpoint::f32_rows", data.len(), peak, 8);
        }
    }
});
