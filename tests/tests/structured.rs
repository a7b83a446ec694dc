//! Structured output (issue 14 §1, §3) on the real model, SmolLM2-135M-Instruct (imported from
//! its Q4_1 GGUF): every answer to a set of JSON schemas (required fields, enums, arrays,
//! bounded numbers, nested objects), a regex and a Lark grammar, greedy and sampled, is
//! checked by the reference validators (`jsonschema`, `lark`, Python's `re`:
//! tests/structured/validate.py in the venv of scripts/setup-test-venv.sh), ends with finish
//! reason `stop` and reports its mask time and forced tokens; the same requests over D-Bus,
//! MQTT and HTTP (the `openai` client's `response_format`, the `ollama` client's `format`),
//! and invalid schemas and grammars refused on each with an error naming the problem. (Harmony,
//! whose reasoning stays free while its final answer is constrained, is tested with the
//! scripted model of daemon/tests/engine.rs.)

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use edgellm::api::{FinishReason, Input, Request};
use edgellm::backend::{BackendChoice, BackendOptions};
use edgellm::chat::Message;
use edgellm::engine::Engine;
use edgellm::grammar::Format;
use edgellm::model::Model;
use edgellm::sampler::SamplingParams;
use edgellm_tests::harness::{DbusBus, Mosquitto, free_port};
use edgellm_tests::service::*;
use serde_json::{Value, json};

const MAX_LENGTH: usize = 512;

fn package() -> &'static std::path::Path {
    edgellm_tests::smollm2_package(4, Some(MAX_LENGTH), false)
}

/// (label, prompt, schema): the shapes of issue 14 §3.
fn schemas() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "required fields",
            "Invent a person. Reply with JSON giving their name and age.",
            json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "enum",
            "Is the sentence 'I love this phone' positive, negative or neutral? Reply with JSON.",
            json!({"type": "object", "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]}},
                "required": ["sentiment"], "additionalProperties": false}),
        ),
        (
            "array",
            "List three colours of the rainbow as JSON.",
            json!({"type": "object", "properties": {
                "colors": {"type": "array", "items": {"type": "string", "maxLength": 20},
                           "minItems": 2, "maxItems": 4}},
                "required": ["colors"], "additionalProperties": false}),
        ),
        (
            "bounded numbers",
            "A vibration sensor read 9.7 mm/s, four times its usual level. Is this abnormal? \
             Reply with JSON.",
            json!({"type": "object", "properties": {
                "abnormal": {"type": "boolean"},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "level": {"type": "integer", "minimum": 1, "maximum": 5}},
                "required": ["abnormal", "confidence", "level"], "additionalProperties": false}),
        ),
        (
            "nested objects",
            "Describe the capital of France as JSON: its name and population, and its country.",
            json!({"type": "object", "properties": {
                "city": {"type": "object", "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "population": {"type": "integer", "minimum": 0, "maximum": 100000000}},
                    "required": ["name", "population"], "additionalProperties": false},
                "country": {"type": "string", "maxLength": 40}},
                "required": ["city", "country"], "additionalProperties": false}),
        ),
    ]
}

const REGEX: &str = r"(yes|no), because [a-z ]{3,60}\.";
const LARK: &str = r#"start: "The answer is " NUMBER " " UNIT "."
NUMBER: /[0-9]{1,4}/
UNIT: "meters" | "kilometers" | "miles"
"#;

/// Greedy, and two sampled settings (temperature with top-p; top-k with min-p and a
/// repetition penalty).
fn settings() -> Vec<(&'static str, SamplingParams)> {
    vec![
        (
            "greedy",
            SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
        ),
        (
            "t0.8 p0.95 seed 1",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: Some(1),
                ..SamplingParams::default()
            },
        ),
        (
            "t1.0 k40 min_p0.05 rep1.1 seed 2",
            SamplingParams {
                temperature: 1.0,
                top_k: 40,
                min_p: 0.05,
                repetition_penalty: 1.1,
                seed: Some(2),
                ..SamplingParams::default()
            },
        ),
    ]
}

/// Runs tests/structured/validate.py on `items`; panics with its report if any fails.
fn validate(items: &[Value]) {
    use std::io::Write;
    let mut child = std::process::Command::new(test_python())
        .arg(edgellm_tests::repo_root().join("tests/structured/validate.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tests/structured/validate.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::from(items.to_vec()).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "answers failed their reference validator: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["checked"], items.len(), "{report}");
}

fn schema_format(schema: &Value) -> Format {
    Format::from_response_format(&json!({"type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": true}}))
    .unwrap()
    .unwrap()
}

fn chat_input(prompt: &str) -> Input {
    Input::Messages(vec![Message::new("user", prompt)])
}

fn engine(choice: BackendChoice) -> Engine {
    let model = Model::load(package()).unwrap();
    let opts = BackendOptions {
        threads: 2,
        max_length: MAX_LENGTH,
        ..BackendOptions::default()
    };
    let backend = edgellm::backend::load(&model.package, choice, &opts)
        .unwrap_or_else(|e| panic!("{choice:?} loads the real model: {e}"))
        .backend;
    Engine::new(model, backend, MAX_LENGTH)
}

/// Every schema, the regex and the Lark grammar under every sampling setting: each answer
/// validates, ends with `stop` (the grammar completed or the model ended inside it), and its
/// usage reports the mask time; greedy JSON answers take forced tokens.
fn answers_validate(choice: BackendChoice) {
    let mut engine = engine(choice);
    let mut cases: Vec<(String, Input, Format, Value)> = Vec::new();
    for (label, prompt, schema) in schemas() {
        cases.push((
            label.into(),
            chat_input(prompt),
            schema_format(&schema),
            json!({"kind": "json_schema", "spec": schema}),
        ));
    }
    cases.push((
        "json_object".into(),
        chat_input("Give me a JSON object with the keys city and country for Paris."),
        Format::JsonObject,
        json!({"kind": "json_object", "spec": null}),
    ));
    cases.push((
        "regex".into(),
        chat_input("Is the sea salty? Answer yes or no and say why."),
        Format::Regex(REGEX.into()),
        json!({"kind": "regex", "spec": REGEX}),
    ));
    cases.push((
        "lark".into(),
        chat_input("How tall is the Eiffel tower?"),
        Format::Lark(LARK.into()),
        json!({"kind": "lark", "spec": LARK}),
    ));
    let mut items = Vec::new();
    let mut forced = 0;
    for (label, input, format, check) in &cases {
        for (setting, sampling) in settings() {
            let mut req = Request::new(input.clone());
            req.format = Some(format.clone());
            req.sampling = sampling;
            req.max_tokens = Some(160);
            let c = engine
                .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
                .unwrap_or_else(|e| panic!("{label} ({setting}): {e}"));
            let what = format!("{label} ({setting}, {choice:?})");
            assert_eq!(
                c.finish_reason,
                FinishReason::Stop,
                "{what}: {:?} did not complete its grammar within 160 tokens",
                c.text
            );
            assert!(c.usage.grammar_ms > 0.0, "{what}: no mask time in usage");
            assert!(
                c.usage.forced_tokens <= c.usage.completion_tokens,
                "{what}: {:?}",
                c.usage
            );
            if setting == "greedy" && label != "regex" && label != "lark" {
                forced += c.usage.forced_tokens;
            }
            let mut item = check.clone();
            item["text"] = json!(c.text);
            item["label"] = json!(what);
            items.push(item);
        }
    }
    // Keys of a schema with required properties are forced: `{"name": "` follows `{`.
    assert!(forced > 0, "no forced tokens in greedy schema answers");
    validate(&items);
}

#[cfg(feature = "ort")]
#[test]
fn real_model_answers_validate_on_onnxruntime() {
    answers_validate(BackendChoice::Ort);
}

#[cfg(feature = "tract")]
#[test]
fn real_model_answers_validate_on_tract() {
    answers_validate(BackendChoice::Tract);
}

/// An unconstrained greedy answer to a JSON question is not the constrained one: the mask is
/// what makes the answer valid, not the prompt.
#[test]
fn the_constraint_changes_the_answer() {
    let mut engine = engine(edgellm_tests::backends()[0]);
    let (_, prompt, schema) = &schemas()[0];
    let mut req = Request::new(chat_input(prompt));
    req.max_tokens = Some(60);
    req.sampling.temperature = 0.0;
    let free = engine
        .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    req.format = Some(schema_format(schema));
    let constrained = engine
        .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap();
    assert_ne!(free.text, constrained.text);
    assert!(
        serde_json::from_str::<Value>(&free.text).is_err(),
        "the free answer parses as JSON: {:?}",
        free.text
    );
    let v: Value = serde_json::from_str(&constrained.text).unwrap();
    assert!(v["name"].is_string() && v["age"].is_u64(), "{v}");
}

/// Bad formats are refused before anything is queued, naming the problem.
#[test]
fn invalid_formats_name_their_problem() {
    let model = Model::load(package()).unwrap();
    let bad = [
        (
            Format::JsonSchema {
                name: "x".into(),
                schema: json!({"type": "object", "properties": {"a": {"type": "strin"}}}),
            },
            "strin",
        ),
        (
            Format::JsonSchema {
                name: "x".into(),
                schema: json!({"type": "integer", "minimum": 5, "maximum": 1}),
            },
            "response_format",
        ),
        (Format::Regex("(unclosed".into()), "grammar"),
        (
            Format::Lark("start: undefined_rule".into()),
            "undefined_rule",
        ),
    ];
    for (format, needle) in bad {
        let e = model.compile(&format).map(|_| ()).unwrap_err().0;
        assert!(e.contains(needle), "{format:?}: {e}");
        assert!(e.starts_with(format.field()), "{format:?}: {e}");
    }
}

// ------------------------------------------------------------------------------------------
// The transports

const SCHEMA_PROMPT: &str = "Invent a person. Reply with JSON giving their name and age.";

fn person_schema() -> Value {
    schemas()[0].2.clone()
}

fn check_person(text: &str, via: &str) -> Value {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{via}: {text:?}: {e}"));
    assert!(
        v["name"].is_string() && v["age"].as_u64().is_some_and(|a| a <= 120),
        "{via}: {v}"
    );
    assert_eq!(v.as_object().unwrap().len(), 2, "{via}: {v}");
    v
}

/// D-Bus (`response_format` as a JSON string, `grammar` as a nested dictionary), MQTT (JSON
/// fields) and HTTP (the openai and ollama clients): constrained answers, their usage, and
/// invalid formats refused with the problem named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_constrains_and_refuses_bad_formats() {
    let dbus = DbusBus::start();
    let broker = Mosquitto::start();
    let backend = edgellm_tests::preferred_backend();
    let mut c = config(
        backend,
        package(),
        Some(dbus.address()),
        Some(&broker.url()),
        "s1",
    );
    c.model.max_length = MAX_LENGTH;
    let port = free_port();
    c.http.enabled = true;
    c.http.listen = edgellm::config::Listen::Tcp(([127, 0, 0, 1], port).into());
    let d = Daemon::start(c).await;
    let base = format!("http://127.0.0.1:{port}");

    // D-Bus.
    let conn = bus(dbus.address()).await.unwrap();
    let rf = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema()}});
    let options = opts(&[
        ("max_tokens", 120u32.into()),
        ("temperature", 0.0f64.into()),
        ("response_format", zbus::Str::from(rf.to_string()).into()),
    ]);
    let (text, stats) = chat(&conn, &user(SCHEMA_PROMPT), &options).await.unwrap();
    check_person(&text, "D-Bus");
    assert_eq!(stat_str(&stats, "finish_reason"), "stop");
    assert!(stat_u32(&stats, "forced_tokens") > 0);
    let mut grammar = Dict::new();
    grammar.insert("type".into(), zbus::Str::from("regex").into());
    grammar.insert("value".into(), zbus::Str::from(REGEX).into());
    let options = opts(&[
        ("max_tokens", 80u32.into()),
        (
            "grammar",
            zbus::OwnedVariant::try_from(zbus::Variant::from(grammar)).unwrap(),
        ),
    ]);
    let (text, _) = chat(&conn, &user("Is the sea salty?"), &options)
        .await
        .unwrap();
    assert!(
        regex_full_match(REGEX, &text),
        "D-Bus grammar answer {text:?}"
    );
    let bad = opts(&[(
        "response_format",
        zbus::Str::from(
            r#"{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"strin"}}}"#,
        )
        .into(),
    )]);
    let (name, msg) = chat(&conn, &user("x"), &bad).await.unwrap_err();
    assert!(name.ends_with("InvalidRequest"), "{name}: {msg}");
    assert!(
        msg.contains("response_format") && msg.contains("strin"),
        "{msg}"
    );

    // MQTT.
    let mut m = MqttClient::connect(&broker.url()).await;
    m.subscribe("edgellm/s1/response/#").await;
    m.subscribe("edgellm/s1/errors").await;
    m.publish(
        "edgellm/s1/request",
        json!({"id": "j1", "messages": [{"role": "user", "content": SCHEMA_PROMPT}],
               "max_tokens": 120, "temperature": 0.7, "seed": 3, "response_format": rf})
        .to_string(),
    )
    .await;
    let (_, fin) = m.until_done().await;
    check_person(fin.json["text"].as_str().unwrap(), "MQTT");
    assert_eq!(fin.json["finish_reason"], "stop");
    assert!(fin.json["usage"]["grammar_ms"].as_f64().unwrap() > 0.0);
    m.publish(
        "edgellm/s1/request",
        json!({"id": "j2", "prompt": "x", "grammar": {"type": "lark", "value": "start: nothing_here"}})
            .to_string(),
    )
    .await;
    let e = m.recv(Duration::from_secs(60)).await;
    assert_eq!(e.json["error"]["code"], "invalid_request", "{}", e.json);
    let msg = e.json["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("grammar") && msg.contains("nothing_here"),
        "{msg}"
    );

    // HTTP: the openai and ollama clients (tests/http/openai_checks.py structured).
    let r = http_checks(&["structured", &base]).await;
    check_person(r["openai"].as_str().unwrap(), "openai client");
    check_person(r["ollama"].as_str().unwrap(), "ollama client");
    let e = r["openai_invalid"].as_str().unwrap();
    assert!(e.contains("response_format") && e.contains("strin"), "{e}");

    d.stop().await;
}

/// Python's `re.fullmatch` semantics for the test regex, without a regex crate: the answer is
/// `yes` or `no`, `, because `, 3 to 60 lowercase letters or spaces, and a full stop.
fn regex_full_match(re: &str, text: &str) -> bool {
    assert_eq!(re, REGEX, "this checker knows one pattern");
    let Some(rest) = text
        .strip_prefix("yes, because ")
        .or_else(|| text.strip_prefix("no, because "))
    else {
        return false;
    };
    let Some(body) = rest.strip_suffix('.') else {
        return false;
    };
    (3..=60).contains(&body.len()) && body.bytes().all(|b| b == b' ' || b.is_ascii_lowercase())
}

// ------------------------------------------------------------------------------------------
// Continuous batching

/// Structured requests batched together (`parallel = 3`: forced tokens fed one per step in
/// the slots) each validate, complete and take forced tokens. Their answers are not compared
/// with the same requests alone: alone, forced tokens go into one multi-token forward pass,
/// batched one per step, and the two compute keys and values with different kernels, so a
/// near-tie later in an answer can fall the other way (as with any other chunking).
#[cfg(feature = "ort")]
#[test]
fn batched_structured_answers_validate() {
    use edgellm::api::RequestEvent;
    use edgellm::scheduler::{Limits, Scheduler};
    let mut reqs = Vec::new();
    for (i, (_, prompt, schema)) in schemas().into_iter().take(3).enumerate() {
        let mut req = Request::new(chat_input(prompt));
        req.format = Some(schema_format(&schema));
        req.max_tokens = Some(120);
        req.sampling = settings()[i % 2].1.clone();
        reqs.push((req, schema));
    }
    let limits = Limits {
        queue_depth: 8,
        parallel: 3,
        max_new_tokens: 512,
        request_timeout: Duration::from_secs(600),
        stream_interval: 1,
    };
    let s = Scheduler::start(
        engine(BackendChoice::Ort),
        limits,
        tokio_util::sync::CancellationToken::new(),
    );
    assert_eq!(s.parallel(), 3, "ONNX Runtime batches the real model");
    let handles: Vec<_> = reqs
        .iter()
        .map(|(r, _)| s.submit(r.clone()).unwrap())
        .collect();
    let mut items = Vec::new();
    for (mut h, (_, schema)) in handles.into_iter().zip(&reqs) {
        let got = loop {
            match h.events.blocking_recv() {
                Some(RequestEvent::Event(_)) => {}
                Some(RequestEvent::Done(c)) => break c,
                other => panic!("{other:?}"),
            }
        };
        assert!(got.usage.forced_tokens > 0, "{:?}", got.usage);
        assert_eq!(got.finish_reason, FinishReason::Stop, "{:?}", got.text);
        items.push(
            json!({"kind": "json_schema", "spec": schema, "text": got.text, "label": "batched"}),
        );
    }
    assert!(
        s.batch_steps().counts().iter().skip(2).any(|&n| n > 0),
        "no step decoded more than one sequence: {:?}",
        s.batch_steps().counts()
    );
    validate(&items);
}
