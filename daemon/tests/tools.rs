//! Tool calls end to end in the engine, on fixture packages with the vendors' chat templates:
//! Qwen2.5's (`<tool_call>` JSON) and gpt-oss's harmony. The tiny random models cannot choose
//! to call a tool, so a scripted backend "says" the text under test ([`common::ScriptedText`]:
//! whatever tokens the grammar lets through, the script's text when it is allowed). A round
//! trip is request with tools -> `tool_calls` -> request with the `tool` result -> answer.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use common::collect;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgellm::api::{Completion, FinishReason, Input, Request};
use edgellm::chat::Message;
use edgellm::engine::Engine;
use edgellm::model::Model;
use edgellm::tools::Tools;
use serde_json::{Value, json};

/// The qwen2 fixture exported with Qwen2.5-Instruct's chat template and its tool-call tokens
/// (`<tool_call>`, `</tool_call>`: added, not special, as in Qwen's tokenizer) at 512, 513;
/// `<|im_end|>` ends an answer, as in Qwen.
fn qwen_package(tmp: &Path) -> PathBuf {
    let out = qwen_template_package(tmp);
    let tj = out.join("tokenizer.json");
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    for (i, t) in ["<tool_call>", "</tool_call>"].iter().enumerate() {
        tok["added_tokens"].as_array_mut().unwrap().push(json!({
            "id": 512 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": false
        }));
    }
    std::fs::write(&tj, tok.to_string()).unwrap();
    let gc = out.join("genai_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&gc).unwrap()).unwrap();
    cfg["model"]["vocab_size"] = 514.into();
    cfg["model"]["eos_token_id"] = json!([5]); // <|im_end|>
    std::fs::write(&gc, cfg.to_string()).unwrap();
    out
}

/// The qwen2 fixture exported with Qwen2.5-Instruct's chat template (its vocabulary as it is:
/// the template and grammar write `<tool_call>` as text).
fn qwen_template_package(tmp: &Path) -> PathBuf {
    let out = tmp.join("qwen2");
    let opts = edgellm_export::ExportOptions {
        max_length: Some(1024),
        ..Default::default()
    };
    edgellm_export::export(&common::fixture_checkpoint("qwen2"), &out, &opts).unwrap();
    with_template(out, "qwen2.5-instruct")
}

/// `pkg` with a vendor chat template from tests/fixtures/chat_templates (its checksums file
/// dropped, as the package changed).
fn with_template(pkg: PathBuf, template: &str) -> PathBuf {
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/chat_templates/templates")
            .join(format!("{template}.jinja")),
        pkg.join("chat_template.jinja"),
    )
    .unwrap();
    std::fs::remove_file(pkg.join("SHA256SUMS")).unwrap();
    pkg
}

fn engine(pkg: &Path, says: &str) -> Engine {
    let model = Model::load(pkg).unwrap();
    let fallback = model.eos[0];
    let backend = common::ScriptedText::new(&model, says, fallback);
    // No real cache behind the script: room for the fixtures' long tool prompts.
    Engine::new(model, Box::new(backend), 2048)
}

fn tools(choice: Value) -> Arc<Tools> {
    let list = json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "get_time", "parameters": {"type": "object",
            "properties": {"tz": {"type": "string", "maxLength": 20}}, "required": ["tz"],
            "additionalProperties": false}}}
    ]);
    Arc::new(Tools::parse(Some(&list), Some(&choice)).unwrap())
}

fn request(messages: Vec<Message>, choice: Value) -> Request {
    let mut r = Request::new(Input::Messages(messages));
    r.sampling.temperature = 0.0;
    r.max_tokens = Some(120);
    r.include_reasoning = true;
    r.tools = Some(tools(choice));
    r
}

fn args(c: &Completion, i: usize) -> Value {
    serde_json::from_str(&c.tool_calls[i].arguments).unwrap()
}

/// The history after a call: the user's question, the assistant's call, the tool's result.
fn history(question: &str, call: &Completion, result: &str) -> Vec<Message> {
    let calls: Vec<Value> = call.tool_calls.iter().map(|c| c.to_json()).collect();
    let mut assistant = Message::new("assistant", call.text.clone());
    assistant.tool_calls = Some(calls);
    let mut tool = Message::new("tool", result);
    tool.tool_call_id = Some(call.tool_calls[0].id.clone());
    vec![Message::new("user", question), assistant, tool]
}

#[test]
fn qwen_tool_call_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = qwen_package(tmp.path());
    let says = "Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call><|im_end|>";
    let mut e = engine(&pkg, says);
    let q = "Weather in Paris?";
    let (c, streamed, _) = collect(
        &mut e,
        &request(vec![Message::new("user", q)], json!("auto")),
    );
    assert_eq!(c.finish_reason, FinishReason::ToolCalls, "{c:?}");
    assert_eq!(c.text, "Let me check.");
    assert_eq!(
        streamed, c.text,
        "the call's text is not streamed as answer text"
    );
    assert_eq!(c.tool_calls.len(), 1);
    assert_eq!(c.tool_calls[0].name, "get_weather");
    assert_eq!(
        c.tool_calls[0].arguments,
        r#"{"city": "Paris", "unit": "celsius"}"#
    );
    assert!(c.tool_calls[0].id.starts_with("call_"));

    // The result goes back: the prompt shows the call and the result as Qwen's template
    // does, and the model answers in prose.
    let msgs = history(q, &c, r#"{"temp": 21}"#);
    let model = Model::load(&pkg).unwrap();
    let t = tools(json!("auto"));
    let prompt = model.render_with_tools(&msgs, None, Some(&t)).unwrap();
    assert!(
        prompt
            .contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""),
        "{prompt}"
    );
    assert!(prompt.contains("<|im_start|>assistant\nLet me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"), "{prompt}");
    let mut e = engine(&pkg, "It is 21 degrees in Paris.<|im_end|>");
    let (c, streamed, _) = collect(&mut e, &request(msgs, json!("auto")));
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.text, "It is 21 degrees in Paris.");
    assert_eq!(streamed, c.text);
    assert!(c.tool_calls.is_empty());
}

#[test]
fn qwen_forced_calls_are_valid_whatever_the_model_says() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = qwen_package(tmp.path());
    let user = vec![Message::new("user", "Time in Tokyo?")];

    // A named function: the model wants to chat, the answer is still one call to it.
    let mut e = engine(&pkg, "I think it is noon.<|im_end|>");
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let (c, streamed, _) = collect(&mut e, &request(user.clone(), named));
    assert_eq!(c.finish_reason, FinishReason::ToolCalls, "{c:?}");
    assert_eq!(streamed, "");
    assert_eq!(c.tool_calls.len(), 1);
    assert_eq!(c.tool_calls[0].name, "get_time");
    assert!(args(&c, 0)["tz"].is_string(), "{:?}", c.tool_calls);

    // Required: a call to a function that does not exist, with arguments of the wrong type,
    // becomes a call to a real one whose arguments match its schema.
    let mut e = engine(
        &pkg,
        "<tool_call>\n{\"name\": \"launch\", \"arguments\": {\"city\": 5}}\n</tool_call><|im_end|>",
    );
    let (c, _, _) = collect(&mut e, &request(user.clone(), json!("required")));
    assert_eq!(c.finish_reason, FinishReason::ToolCalls, "{c:?}");
    let a = args(&c, 0);
    match c.tool_calls[0].name.as_str() {
        "get_weather" => assert!(a["city"].is_string(), "{a}"),
        "get_time" => assert!(a["tz"].is_string(), "{a}"),
        other => panic!("call to {other}"),
    }

    // Auto: prose stays prose; a call cut short by max_tokens is text, not a call.
    let mut e = engine(&pkg, "Noon, I think.<|im_end|>");
    let (c, _, _) = collect(&mut e, &request(user.clone(), json!("auto")));
    assert_eq!(
        (c.text.as_str(), c.finish_reason),
        ("Noon, I think.", FinishReason::Stop)
    );
    let mut e = engine(
        &pkg,
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"Asia/Tokyo\"}}\n</tool_call><|im_end|>",
    );
    let mut req = request(user.clone(), json!("auto"));
    req.max_tokens = Some(6);
    let (c, _, _) = collect(&mut e, &req);
    assert_eq!(c.finish_reason, FinishReason::Length);
    assert!(c.tool_calls.is_empty());
    assert!(c.text.starts_with("<tool_call>\n{"), "{:?}", c.text);

    // None: the tools are not shown and nothing is parsed.
    let mut e = engine(&pkg, "<tool_call>\n{}<|im_end|>");
    let (c, _, _) = collect(&mut e, &request(user, json!("none")));
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.text, "<tool_call>\n{}");
}

/// The llama fixture exported with Llama 3.1-Instruct's chat template (JSON tool calls).
fn llama_package(tmp: &Path) -> PathBuf {
    with_template(common::export("llama", tmp), "llama-3.1-instruct")
}

#[test]
fn llama3_json_tool_call_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = llama_package(tmp.path());
    let model = Model::load(&pkg).unwrap();
    assert_eq!(
        model.tool_format(),
        Some(edgellm::tools::ToolFormat::Llama3)
    );
    let eos = model.tokenizer.decode(&[model.eos[0]], false).unwrap();
    let says =
        format!("{{\"name\": \"get_weather\", \"parameters\": {{\"city\": \"Oslo\"}}}}{eos}");
    let mut e = engine(&pkg, &says);
    let q = "Weather in Oslo?";
    let (c, streamed, _) = collect(
        &mut e,
        &request(vec![Message::new("user", q)], json!("auto")),
    );
    assert_eq!(c.finish_reason, FinishReason::ToolCalls, "{c:?}");
    assert_eq!((c.text.as_str(), streamed.as_str()), ("", ""));
    assert_eq!(c.tool_calls[0].name, "get_weather");
    assert_eq!(c.tool_calls[0].arguments, r#"{"city": "Oslo"}"#);
    // Prose that starts like JSON but is not a call stays prose.
    let mut e = engine(&pkg, &format!("{{\"answer\": 1}}{eos}"));
    let (c, streamed, _) = collect(
        &mut e,
        &request(vec![Message::new("user", q)], json!("auto")),
    );
    assert_eq!(
        (c.text.as_str(), c.finish_reason),
        (r#"{"answer": 1}"#, FinishReason::Stop)
    );
    assert_eq!(streamed, c.text);

    let msgs = history(q, &calls_of(&pkg, &says), r#"{"temp": 3}"#);
    let prompt = model
        .render_with_tools(&msgs, None, Some(&tools(json!("auto"))))
        .unwrap();
    assert!(prompt.contains("<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"), "{prompt}");
    let mut e = engine(&pkg, &format!("Cold: 3 degrees.{eos}"));
    let (c, _, _) = collect(&mut e, &request(msgs, json!("auto")));
    assert_eq!(
        (c.text.as_str(), c.finish_reason),
        ("Cold: 3 degrees.", FinishReason::Stop)
    );
}

/// The completion of a request that makes the call `says` spells.
fn calls_of(pkg: &Path, says: &str) -> Completion {
    let mut e = engine(pkg, says);
    collect(
        &mut e,
        &request(vec![Message::new("user", "x")], json!("auto")),
    )
    .0
}

#[test]
fn gpt_oss_tool_call_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = common::harmony_package(tmp.path());
    let says = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>";
    let mut e = engine(&pkg, says);
    let q = "Weather in Paris?";
    let (c, streamed, reasoning) = collect(
        &mut e,
        &request(vec![Message::new("user", q)], json!("auto")),
    );
    assert_eq!(c.finish_reason, FinishReason::ToolCalls, "{c:?}");
    assert_eq!((c.text.as_str(), streamed.as_str()), ("", ""));
    assert_eq!(reasoning, "Need the weather.");
    assert_eq!(c.tool_calls.len(), 1);
    assert_eq!(c.tool_calls[0].name, "get_weather");
    assert_eq!(c.tool_calls[0].arguments, r#"{"city": "Paris"}"#);

    let msgs = history(q, &c, r#"{"temp": 21}"#);
    let model = Model::load(&pkg).unwrap();
    let prompt = model
        .render_with_tools(&msgs, None, Some(&tools(json!("auto"))))
        .unwrap();
    assert!(prompt.contains("namespace functions {\n\n// Current weather in a city\ntype get_weather = (_: {\ncity: string,\nunit?: \"celsius\" | \"fahrenheit\",\n}) => any;"), "{prompt}");
    assert!(prompt.ends_with("<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temp\": 21}<|end|><|start|>assistant"), "{prompt}");
    let mut e = engine(
        &pkg,
        "<|channel|>analysis<|message|>21 degrees.<|end|><|start|>assistant<|channel|>final<|message|>Sunny, 21 degrees.<|return|>",
    );
    let (c, streamed, _) = collect(&mut e, &request(msgs, json!("auto")));
    assert_eq!(c.finish_reason, FinishReason::Stop, "{c:?}");
    assert_eq!(
        (c.text.as_str(), streamed.as_str()),
        ("Sunny, 21 degrees.", "Sunny, 21 degrees.")
    );
    assert!(c.tool_calls.is_empty());
}

#[test]
fn gpt_oss_calls_go_to_real_functions_with_valid_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = common::harmony_package(tmp.path());
    // A made-up function and a channel harmony does not have: the grammar keeps the reply to
    // real channels and functions.
    let says = "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>commentary to=functions.launch_rocket <|constrain|>json<|message|>{\"when\": \"now\"}<|call|>";
    let mut e = engine(&pkg, says);
    let user = vec![Message::new("user", "Go")];
    let (c, _, reasoning) = collect(&mut e, &request(user.clone(), json!("required")));
    assert_eq!(reasoning, "Hmm.");
    assert_eq!(c.finish_reason, FinishReason::ToolCalls, "{c:?}");
    assert!(["get_weather", "get_time"].contains(&c.tool_calls[0].name.as_str()));
    assert!(args(&c, 0).is_object());

    // Named: a model that wants to call another function calls this one.
    let mut e = engine(
        &pkg,
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Rome\"}<|call|>",
    );
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    let (c, _, _) = collect(&mut e, &request(user, named));
    assert_eq!(c.finish_reason, FinishReason::ToolCalls, "{c:?}");
    assert_eq!(c.tool_calls[0].name, "get_time");
    assert!(args(&c, 0)["tz"].is_string());
}

/// The vendors' templates are read as the format their models write.
#[test]
fn tool_formats_are_found_from_the_templates() {
    use edgellm::tools::ToolFormat;
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat_templates/templates");
    for (file, format) in [
        ("qwen2.5-instruct", Some(ToolFormat::Hermes)),
        ("qwen3", Some(ToolFormat::Hermes)),
        ("llama-3.1-instruct", Some(ToolFormat::Llama3)),
        ("llama-3.2-instruct", Some(ToolFormat::Llama3)),
        ("phi-3.5-mini-instruct", None),
        ("fixture-chatml", None),
    ] {
        let src = std::fs::read_to_string(dir.join(format!("{file}.jinja"))).unwrap();
        assert_eq!(ToolFormat::detect(&src), format, "{file}");
    }
}

#[test]
fn tools_that_cannot_be_expressed_or_combined_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // The plain qwen2 fixture's ChatML template renders no tools.
    let plain = common::export("qwen2", tmp.path());
    let model = Model::load(&plain).unwrap();
    let t = tools(json!("auto"));
    let e = model.compile_request(None, Some(&t)).unwrap_err();
    assert!(e.0.starts_with("tools: the chat template"), "{e}");
    let e = model
        .render_with_tools(&[Message::new("user", "x")], None, Some(&t))
        .unwrap_err();
    assert!(e.to_string().contains("cannot express tools"), "{e}");
    // tool_choice none: nothing to express, the request is fine.
    let none = tools(json!("none"));
    assert!(model.compile_request(None, Some(&none)).unwrap().is_none());

    let tmp2 = tempfile::tempdir().unwrap();
    let qwen = Model::load(&qwen_package(tmp2.path())).unwrap();
    let e = qwen
        .compile_request(Some(&edgellm::grammar::Format::JsonObject), Some(&t))
        .unwrap_err();
    assert!(
        e.0.starts_with("response_format: cannot be combined with tools"),
        "{e}"
    );
    // A function whose parameters are not a schema llguidance can compile.
    let bad = Tools::parse(
        Some(&json!([{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}}}])),
        None,
    )
    .unwrap();
    let e = qwen.compile_request(None, Some(&bad)).unwrap_err();
    assert!(e.0.starts_with("tools: ") && e.0.contains("strin"), "{e}");
    let raw = Input::Prompt {
        text: "x".into(),
        raw: true,
    };
    let mut req = Request::new(raw);
    req.tools = Some(t);
    assert!(
        qwen.request_ids(&req)
            .unwrap_err()
            .to_string()
            .contains("need chat messages")
    );
}

/// `edgellm run --tools`: a real backend (the fixture's random weights) made to call a named
/// function prints the text, then the call as a JSON line; `--json` carries `tool_calls`.
#[test]
fn the_cli_calls_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = qwen_template_package(tmp.path());
    let tools_file = tmp.path().join("tools.json");
    std::fs::write(
        &tools_file,
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string",
            "maxLength": 12}}, "required": ["city"], "additionalProperties": false}}}])
        .to_string(),
    )
    .unwrap();
    for backend in common::backends() {
        let out = common::edgellm(&[
            "run",
            "--model",
            pkg.to_str().unwrap(),
            "--backend",
            backend,
            "--threads",
            "1",
            "--max-length",
            "1024",
            "--prompt",
            "Weather in Paris?",
            "--temperature",
            "0",
            "--max-tokens",
            "200",
            "--tools",
            tools_file.to_str().unwrap(),
            "--tool-choice",
            "get_weather",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{backend}: {stdout:?}");
        assert_eq!(lines[0], "", "{backend}: no text before the call");
        let call: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(call["function"]["name"], "get_weather", "{backend}: {call}");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        let city = args["city"].as_str().unwrap();
        assert!(city.chars().count() <= 12, "{backend}: {args}");
        assert_eq!(args.as_object().unwrap().len(), 1, "{backend}: {args}");
    }
    let out = common::edgellm(&[
        "run",
        "--model",
        pkg.to_str().unwrap(),
        "--threads",
        "1",
        "--max-length",
        "1024",
        "--prompt",
        "Weather?",
        "--max-tokens",
        "200",
        "--tools",
        tools_file.to_str().unwrap(),
        "--tool-choice",
        "required",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["finish_reason"], "tool_calls", "{v}");
    assert_eq!(v["tool_calls"][0]["name"], "get_weather", "{v}");
    let out = common::edgellm(&[
        "run",
        "--model",
        pkg.to_str().unwrap(),
        "--prompt",
        "x",
        "--tools",
        tools_file.to_str().unwrap(),
        "--tool-choice",
        "launch",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no function named \"launch\""), "{err}");
}
