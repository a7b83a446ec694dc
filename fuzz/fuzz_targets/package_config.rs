//! A model package's `genai_config.json` and `SHA256SUMS` (the two bytes strings around the
//! input's first NUL) through `package::Package::open`, what the daemon runs at start-up, then
//! the KV layout the daemon sizes its cache with. Invariants: every file the package names lies
//! inside its folder; the layout's arithmetic cannot overflow (a panic here would be a daemon
//! that dies at start on a hostile package); the reader allocates in proportion to its input.
#![no_main]

use edgellm::package::Package;
use edgellm_fuzz::{check_allocation, peak_during, scratch, split2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (config, sums) = split2(data);
    let dir = scratch();
    std::fs::write(dir.join("genai_config.json"), config).expect("write");
    if !sums.is_empty() {
        std::fs::write(dir.join("SHA256SUMS"), sums).expect("write");
    }
    std::fs::write(dir.join("model.onnx"), b"graph").expect("write");
    let (opened, peak) = peak_during(|| Package::open(&dir));
    check_allocation("Package::open", data.len(), peak, 64);
    if let Ok(pkg) = opened {
        let graph = pkg.graph_path();
        assert!(
            graph.starts_with(&dir)
                && graph
                    .components()
                    .all(|c| !matches!(c, std::path::Component::ParentDir)),
            "the graph {graph:?} lies outside the package"
        );
        for max_length in [1, 4096, usize::MAX] {
            let kv = pkg.kv_layout(max_length);
            let _ = (kv.total_bytes(), kv.bytes_per_token());
        }
    }
});
