//! Arbitrary token streams through harmony's streaming parser (`chat::harmony::Parser`, what
//! the engine runs on every gpt-oss token). Ids 0..6 are harmony's special tokens, the rest
//! pieces of header text (roles, channels, recipients, `<|constrain|>json`) or plain text.
//! Invariants: a content event carries the id pushed; after the stop event nothing more comes
//! out; a header never holds more than `HEADER_TOKENS` pieces of text per part.
#![no_main]

use edgellm::chat::harmony::{Event, HEADER_TOKENS, HarmonyTokens, Parser};
use libfuzzer_sys::fuzz_target;

const SPECIAL: [&str; 6] = [
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|return|>",
    "<|call|>",
];
const PIECES: [&str; 16] = [
    "assistant",
    " to=",
    "functions",
    ".get_weather",
    "analysis",
    "commentary",
    "final",
    " <|constrain|>",
    "json",
    " ",
    "=",
    ".",
    "browser",
    "user",
    "\u{fffd}",
    "\u{1F600}x",
];
/// The longest piece, in bytes.
const LONGEST: usize = 14;

fn decode(ids: &[u32]) -> String {
    ids.iter()
        .map(|&id| match id {
            0..6 => SPECIAL[id as usize],
            _ => PIECES[(id as usize - 6) % PIECES.len()],
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let tokens = HarmonyTokens::resolve(|s| SPECIAL.iter().position(|t| *t == s).map(|i| i as u32))
        .expect("all six");
    let mut p = Parser::new(tokens);
    let mut stopped = false;
    for &b in data {
        let id = u32::from(b);
        let ev = p.push(id, &decode);
        if stopped {
            assert_eq!(ev, Event::None, "an event after the stop");
        }
        match ev {
            Event::Content { id: got, .. } => assert_eq!(got, id, "content of another id"),
            Event::Stop { .. } => stopped = true,
            _ => {}
        }
        let h = p.header();
        let most = 2 * HEADER_TOKENS * LONGEST;
        assert!(
            format!("{h:?}").len() <= most + 256,
            "a header grew past its bound: {h:?}"
        );
    }
});
