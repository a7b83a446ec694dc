//! Arbitrary token ids through the streaming detokenizer (`tokenizer::Detokenizer`, what every
//! generated token goes through), for a byte-level BPE tokenizer (Llama 3's kind) and a
//! SentencePiece one. The input is little-endian u16 ids, some past the vocabulary.
//! Invariant: the streamed pieces join to exactly what decoding the whole sequence at once
//! gives (`tokenizers`' own decode, special tokens skipped). Where bytes are invalid UTF-8 the
//! byte-level tokenizer's decode agrees too (U+FFFD per invalid sequence, as
//! `String::from_utf8_lossy`); SentencePiece's byte-fallback decoder in `tokenizers` turns every
//! byte token of a run with an invalid sequence into U+FFFD, valid bytes included, where the
//! stream (like llama.cpp) replaces only the invalid bytes: there the texts are compared only
//! when the whole decode is valid.
#![no_main]

use std::sync::OnceLock;

use edgellm::tokenizer::{Detokenizer, Tokenizer};
use edgellm_fuzz::fixture;
use libfuzzer_sys::fuzz_target;

fn tokenizers() -> &'static [Tokenizer] {
    static T: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        ["llama/checkpoint", "gguf/spm_q8_0/reference"]
            .iter()
            .map(|rel| Tokenizer::load(&fixture(rel)).expect("a committed tokenizer"))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let ids: Vec<u32> = data
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    for (i, tok) in tokenizers().iter().enumerate() {
        let byte_fallback = i == 1;
        let mut d = Detokenizer::new(tok);
        let mut streamed = String::new();
        let mut failed = false;
        for &id in &ids {
            if d.push(tok, id, &mut streamed).is_err() {
                failed = true;
                break;
            }
        }
        if failed || d.finish(tok, &mut streamed).is_err() {
            continue;
        }
        let Ok(whole) = tok.decode(&ids, true) else {
            continue;
        };
        if byte_fallback && whole.contains(char::REPLACEMENT_CHARACTER) {
            continue;
        }
        assert_eq!(
            streamed, whole,
            "streamed and whole decodes differ for {ids:?}"
        );
    }
});
