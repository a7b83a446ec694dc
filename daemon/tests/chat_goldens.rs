//! Prompt rendering against references produced outside this project:
//! - vendor chat templates (Llama 3.1/3.2, Qwen2.5, Qwen3, Phi-3.5, Mistral-Nemo, gpt-oss and
//!   the fixtures' ChatML) rendered by Hugging Face transformers (`tests/fixtures/chat_templates`);
//! - OpenAI's harmony format as the `openai-harmony` library renders and parses it
//!   (`tests/fixtures/harmony`).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::{Path, PathBuf};

use edgellm::chat::ChatTemplate;
use edgellm::chat::harmony::{
    self, Channel, Conversation, HarmonyMessage, HarmonyTokens, SystemOptions,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(rel)).unwrap()).unwrap()
}

/// `2025-06-28T12:00:00` -> Unix seconds (the goldens' fixed clock).
fn unix(iso: &str) -> i64 {
    let (date, time) = iso.split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let t: Vec<i64> = time.split(':').map(|x| x.parse().unwrap()).collect();
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]
}

#[test]
fn chat_templates_render_as_transformers_does() {
    let cases = load("chat_templates/cases.json");
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let src = std::fs::read_to_string(
            fixtures()
                .join("chat_templates/templates")
                .join(format!("{}.jinja", case["template"].as_str().unwrap())),
        )
        .unwrap();
        let mut t = ChatTemplate::new(&src, case["bos_token"].as_str(), case["eos_token"].as_str())
            .unwrap();
        t.set_clock(unix(case["strftime_now_at"].as_str().unwrap()));
        let tools = Some(&case["tools"]).filter(|t| !t.is_null());
        let got = t.render(
            case["messages"].as_array().unwrap(),
            case["add_generation_prompt"].as_bool().unwrap(),
            tools,
            case["extra"].as_object().unwrap(),
        );
        match (case.get("expected"), case.get("expected_error"), got) {
            (Some(exp), _, Ok(out)) if out == exp.as_str().unwrap() => {}
            (_, Some(err), Err(e)) if e.to_string().contains(err.as_str().unwrap()) => {}
            (exp, err, got) => failures.push(format!(
                "{name}: expected {exp:?} / error {err:?}, got {got:?}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.as_array().unwrap().len(),
        failures.join("\n\n")
    );
}

#[test]
fn harmony_renders_byte_for_byte_as_openai_harmony() {
    let cases = load("harmony/cases.json");
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let system: Option<SystemOptions> = serde_json::from_value(case["system"].clone()).unwrap();
        let messages: Vec<HarmonyMessage> =
            serde_json::from_value(case["messages"].clone()).unwrap();
        let tools: Vec<Value> = case["tools"].as_array().cloned().unwrap_or_default();
        let out = harmony::render_conversation(&Conversation {
            system: system.as_ref(),
            developer: case["developer"].as_str(),
            tools: &tools,
            messages: &messages,
            auto_drop_analysis: case["auto_drop_analysis"].as_bool().unwrap(),
        });
        if out != case["expected"].as_str().unwrap() {
            failures.push(format!(
                "{name}:\n  expected {:?}\n  got      {out:?}",
                case["expected"].as_str().unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn request_messages_map_to_harmony_as_gpt_oss_expects() {
    // A request's system message becomes the developer instructions; assistant turns are finals.
    let case = load("harmony/cases.json")
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "multiturn-final-only")
        .cloned()
        .unwrap();
    let msgs: Vec<edgellm::chat::Message> = case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            edgellm::chat::Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
        })
        .collect();
    let sys: SystemOptions = serde_json::from_value(case["system"].clone()).unwrap();
    assert_eq!(
        harmony::render(&msgs, &sys).unwrap(),
        case["expected"].as_str().unwrap()
    );
}

/// Splits a completion into structural tokens (their harmony ids) and one pseudo-token per
/// character, so the parser runs on the exact streams openai-harmony parsed.
fn tokenize(completion: &str, specials: &[(&str, u32)]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let mut rest = completion;
    'outer: while !rest.is_empty() {
        for (text, id) in specials {
            if let Some(r) = rest.strip_prefix(text) {
                out.push((*id, text.to_string()));
                rest = r;
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap();
        out.push((1_000_000 + out.len() as u32, c.to_string()));
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[test]
fn harmony_stream_parser_splits_channels_like_openai_harmony() {
    let meta = load("harmony/meta.json");
    let ids = &meta["special_token_ids"];
    let id = |t: &str| ids[t].as_u64().unwrap() as u32;
    let tokens =
        HarmonyTokens::resolve(|t| ids.get(t).and_then(Value::as_u64).map(|v| v as u32)).unwrap();
    let specials: Vec<(&str, u32)> = [
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|channel|>",
        "<|constrain|>",
        "<|return|>",
        "<|call|>",
    ]
    .iter()
    .map(|t| (*t, id(t)))
    .collect();
    for case in load("harmony/parse_cases.json").as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let stream = tokenize(case["completion"].as_str().unwrap(), &specials);
        let text_of: std::collections::HashMap<u32, String> = stream.iter().cloned().collect();
        let decode = |ids: &[u32]| ids.iter().map(|i| text_of[i].as_str()).collect::<String>();
        let mut parser = harmony::Parser::new(tokens);
        let (mut analysis, mut fin, mut commentary) = (
            Vec::<String>::new(),
            Vec::<String>::new(),
            Vec::<String>::new(),
        );
        let mut calls = Vec::new();
        let mut current = String::new();
        let mut stop = Value::Null;
        let mut flush = |channel: Channel, text: &mut String, header: &harmony::Header| {
            let t = std::mem::take(text);
            match channel {
                Channel::Analysis => analysis.push(t),
                Channel::Final => fin.push(t),
                Channel::Commentary => commentary.push(t),
                Channel::ToolCall => calls.push(serde_json::json!({
                    "recipient": header.recipient, "channel": header.channel,
                    "content_type": header.content_type, "content": t,
                })),
                Channel::Other => {}
            }
        };
        let mut channel = Channel::Other;
        let mut open = false;
        for (tid, text) in &stream {
            match parser.push(*tid, &decode) {
                harmony::Event::Content { channel: c, .. } => {
                    channel = c;
                    open = true;
                    current.push_str(text);
                }
                event @ (harmony::Event::MessageEnd | harmony::Event::Stop { .. }) => {
                    let header = parser.header().clone();
                    // A message with empty content still counts (e.g. empty analysis).
                    let c = if open { channel } else { header.kind() };
                    flush(c, &mut current, &header);
                    open = false;
                    if let harmony::Event::Stop { call } = event {
                        assert_eq!(call, *tid == id("<|call|>"), "{name}: call flag");
                        stop = Value::String(text.clone());
                    }
                }
                harmony::Event::None => {
                    if *tid == id("<|message|>") {
                        channel = parser.header().kind();
                    }
                }
            }
        }
        if open || !current.is_empty() {
            let header = parser.header().clone();
            flush(channel, &mut current, &header);
        }
        let exp = &case["expected"];
        assert_eq!(
            analysis.join("\n"),
            exp["analysis"].as_str().unwrap(),
            "{name}: analysis"
        );
        assert_eq!(
            fin.join("\n"),
            exp["final"].as_str().unwrap(),
            "{name}: final"
        );
        assert_eq!(
            commentary.join("\n"),
            exp["commentary"].as_str().unwrap(),
            "{name}: commentary"
        );
        assert_eq!(Value::Array(calls), exp["tool_calls"], "{name}: tool calls");
        assert_eq!(stop, exp["stop"], "{name}: stop token");
    }
}
