//! The generation loop's own logic (harmony channels, stop tokens, stop strings, max_tokens,
//! cancellation) on a real package and tokenizer, with a backend that returns scripted logits
//! so the model "says" exactly the tokens under test. The backends themselves are tested
//! against transformers elsewhere (tests/tests/export_ort.rs, tests/cli.rs).

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use edgellm::api::{FinishReason, Input, Request};
use edgellm::chat::Message;
use edgellm::engine::Engine;
use edgellm::model::Model;

use common::{VOCAB, collect, harmony_package};

fn engine(pkg: &Path, completion: &str) -> Engine {
    let model = Model::load(pkg).unwrap();
    let script = model.tokenizer.encode(completion, false).unwrap();
    let backend = common::Scripted::new(script, VOCAB, std::time::Duration::ZERO);
    Engine::new(model, Box::new(backend), 256)
}

fn greedy(input: Input) -> Request {
    let mut r = Request::new(input);
    r.sampling.temperature = 0.0;
    r
}

fn user(text: &str) -> Input {
    Input::Messages(vec![Message::new("user", text)])
}

#[test]
fn harmony_answer_is_the_final_channel_and_return_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = harmony_package(tmp.path());
    let completion = "<|channel|>analysis<|message|>Think: 2+2.<|end|><|start|>assistant<|channel|>final<|message|>Four — 4.<|return|>ignored";
    let mut e = engine(&pkg, completion);
    let mut req = greedy(user("2+2?"));
    let (c, text, reasoning) = collect(&mut e, &req);
    assert_eq!(text, "Four — 4.");
    assert_eq!(c.text, "Four — 4.");
    assert_eq!(reasoning, "", "reasoning is only streamed when asked for");
    assert_eq!(c.finish_reason, FinishReason::Stop);

    req.include_reasoning = true;
    let (c, text, reasoning) = collect(&mut e, &req);
    assert_eq!(
        (text.as_str(), reasoning.as_str()),
        ("Four — 4.", "Think: 2+2.")
    );
    assert_eq!(c.finish_reason, FinishReason::Stop);
}

/// Structured output with harmony: the script reasons with text no grammar would allow
/// (`{not json`), then opens the `final` channel and goes on with prose the grammar does not
/// allow either. The reasoning comes through untouched, the final answer matches the grammar,
/// and the sequence stops when the grammar is complete.
#[test]
fn harmony_reasoning_stays_free_and_the_final_channel_is_constrained() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = harmony_package(tmp.path());
    let completion = format!(
        "<|channel|>analysis<|message|>Thinking {{not json<|end|><|start|>assistant\
         <|channel|>final<|message|>{}",
        "Hello there, this is not it. ".repeat(6)
    );
    let mut e = engine(&pkg, &completion);
    let mut req = greedy(user("Is the sea salty?"));
    req.include_reasoning = true;
    req.max_tokens = Some(80);
    req.format = Some(edgellm::grammar::Format::Regex("(yes|no)".into()));
    let (c, text, reasoning) = collect(&mut e, &req);
    assert_eq!(reasoning, "Thinking {not json");
    assert!(
        c.text == "yes" || c.text == "no",
        "final answer {:?}",
        c.text
    );
    assert_eq!(text, c.text);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert!(c.usage.grammar_ms > 0.0);
}

#[test]
fn harmony_prompt_is_rendered_for_gpt_oss() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = harmony_package(tmp.path());
    let model = Model::load(&pkg).unwrap();
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
    ];
    let out = model
        .render(&msgs, Some(edgellm::chat::harmony::ReasoningEffort::High))
        .unwrap();
    assert!(out.starts_with("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: "));
    assert!(out.ends_with("\n\nReasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|><|start|>developer<|message|># Instructions\n\nBe brief.<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"));
}

#[test]
fn stop_strings_cut_across_tokens_and_max_tokens_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let out = common::export("qwen2", tmp.path());
    let model = Model::load(&out).unwrap();
    let script = model
        .tokenizer
        .encode("Hello world. STOP here</s>", false)
        .unwrap();
    let eos = model.tokenizer.token_to_id("</s>").unwrap();
    let mut e = Engine::new(
        model,
        Box::new(common::Scripted::new(
            script,
            512,
            std::time::Duration::ZERO,
        )),
        256,
    );

    let mut req = greedy(Input::Prompt {
        text: "x".into(),
        raw: true,
    });
    req.stop = vec!["ST".into(), "P h".into()];
    let (c, text, _) = collect(&mut e, &req);
    assert_eq!(
        (text.as_str(), c.text.as_str(), c.finish_reason),
        ("Hello world. ", "Hello world. ", FinishReason::Stop)
    );

    req.stop.clear();
    let (c, _, _) = collect(&mut e, &req);
    assert_eq!(c.text, "Hello world. STOP here");
    assert_eq!(c.finish_reason, FinishReason::Stop, "eos ends the answer");
    assert_eq!(c.token_ids.last(), Some(&eos));

    req.max_tokens = Some(3);
    let (c, _, _) = collect(&mut e, &req);
    assert_eq!(
        (c.token_ids.len(), c.finish_reason),
        (3, FinishReason::Length)
    );

    // Cancelling from the event callback ends the request with `cancelled`, and decoding
    // stops there: the first token's text was the only event, no token was generated after it.
    req.max_tokens = None;
    let mut events = 0;
    let c = e
        .generate(&req, &mut |_| {
            events += 1;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert_eq!(events, 1, "events after the cancellation");
    assert_eq!(
        c.token_ids.len(),
        1,
        "tokens generated after the cancellation"
    );
}
