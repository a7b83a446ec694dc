//! Hostile chat messages (and tools) through the vendors' chat templates and harmony, as a
//! request's `messages` and `tools` reach them: `{"messages": [...], "tools": [...]}`.
//! Invariant: rendering is linear in the request (at most 16 KiB + 8 bytes per input byte:
//! `tojson` writes a control character as 6), whatever the messages hold.
#![no_main]

use std::sync::OnceLock;

use edgellm::chat::ChatTemplate;
use edgellm::chat::harmony::{SystemOptions, render_with_tools};
use edgellm::tools::Tools;
use edgellm::transport::{messages_from_json, parse_json};
use edgellm_fuzz::fixture;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn templates() -> &'static [ChatTemplate] {
    static T: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        [
            "chat_templates/templates/qwen2.5-instruct.jinja",
            "chat_templates/templates/llama-3.1-instruct.jinja",
            "chat_templates/templates/mistral-nemo-instruct-2407.jinja",
            "gguf/q4_1/reference/chat_template.jinja",
        ]
        .iter()
        .map(|rel| {
            let src = std::fs::read_to_string(fixture(rel)).expect("a committed template");
            let mut t = ChatTemplate::new(&src, Some("<s>"), Some("</s>")).expect("compiles");
            t.set_clock(1_767_225_600);
            t
        })
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(v) = parse_json(text) else {
        return;
    };
    let Some(msgs) = v.get("messages") else {
        return;
    };
    let Ok(messages) = messages_from_json(msgs) else {
        return;
    };
    let tools = v
        .get("tools")
        .and_then(|t| Tools::parse(Some(t), None).ok())
        .map(|t| t.template_json());
    let bound = (16 << 10) + 8 * data.len();
    for t in templates() {
        if let Ok(out) = t.render(&messages, true, tools.as_ref(), &Map::new()) {
            assert!(
                out.len() <= bound,
                "{} bytes rendered from {}",
                out.len(),
                data.len()
            );
        }
    }
    let list: Vec<Value> = match &tools {
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    if let Ok(out) = render_with_tools(&messages, &SystemOptions::default(), &list) {
        assert!(
            out.len() <= bound,
            "harmony: {} bytes from {}",
            out.len(),
            data.len()
        );
    }
});
