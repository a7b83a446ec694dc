//! Tool calls (issue 14 §2, §3) over every transport, against a live daemon on a real backend:
//! the qwen2 fixture packaged with Qwen2.5-Instruct's chat template and tool-call tokens. Its
//! random weights cannot decide to call a tool, so the requests name the function
//! (`tool_choice`) or require a call: the grammar then makes the answer one call whose
//! arguments match the function's schema, whatever the weights say. Each transport: the call
//! comes back in its shape (D-Bus `tool_calls` `a(sss)` in the stats, MQTT's final message,
//! OpenAI's `message.tool_calls` whole and streamed), the result goes back in the history and
//! is answered, and an unknown function in `tool_choice`, or tools for a model whose template
//! cannot show them, are refused naming the problem. The round trip's choices on scripted
//! gpt-oss and Qwen models are in daemon/tests/tools.rs.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgellm_export::{ExportOptions, Precision};
use edgellm_tests::harness::{DbusBus, Mosquitto, free_port};
use edgellm_tests::service::*;
use serde_json::{Value, json};

/// The qwen2 fixture (fp32) with Qwen2.5-Instruct's chat template.
fn qwen_tools_package(dir: &Path) -> PathBuf {
    let out = dir.join("qwen-tools");
    let opts = ExportOptions {
        precision: Precision::Fp32,
        max_length: Some(1024),
        ..ExportOptions::default()
    };
    edgellm_export::export(&edgellm_tests::fixture_checkpoint("qwen2"), &out, &opts).unwrap();
    let root = edgellm_tests::repo_root();
    std::fs::copy(
        root.join("tests/fixtures/chat_templates/templates/qwen2.5-instruct.jinja"),
        out.join("chat_template.jinja"),
    )
    .unwrap();
    // The fixture's vocabulary has no `<tool_call>` token (Qwen's has): the template and the
    // grammar write it as text, which works the same.
    std::fs::remove_file(out.join("SHA256SUMS")).unwrap();
    out
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"], "additionalProperties": false}}})
}

/// The arguments parse and match get_weather's schema.
fn check_args(args: &str, via: &str) {
    let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{via}: {args:?}: {e}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{via}: {v}"));
    let city = o["city"].as_str().unwrap_or_else(|| panic!("{via}: {v}"));
    assert!(city.chars().count() <= 20, "{via}: {v}");
    if let Some(u) = o.get("unit") {
        assert!(u == "celsius" || u == "fahrenheit", "{via}: {v}");
    }
    assert!(o.keys().all(|k| k == "city" || k == "unit"), "{via}: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_on_every_transport() {
    let dbus = DbusBus::start();
    let broker = Mosquitto::start();
    let tmp = tempfile::tempdir().unwrap();
    let pkg = qwen_tools_package(tmp.path());
    let backend = edgellm_tests::preferred_backend();
    let mut c = config(
        backend,
        &pkg,
        Some(dbus.address()),
        Some(&broker.url()),
        "t1",
    );
    c.model.max_length = 1024;
    let port = free_port();
    c.http.enabled = true;
    c.http.listen = edgellm::config::Listen::Tcp(([127, 0, 0, 1], port).into());
    let d = Daemon::start(c).await;
    let tools = json!([weather_tool()]).to_string();
    let named = json!({"type": "function", "function": {"name": "get_weather"}}).to_string();

    // D-Bus: tools and tool_choice as JSON strings; the call in the stats as a(sss).
    let conn = bus(dbus.address()).await.unwrap();
    let options = opts(&[
        ("max_tokens", 100u32.into()),
        ("temperature", 0.0f64.into()),
        ("tools", zbus::Str::from(tools.clone()).into()),
        ("tool_choice", zbus::Str::from(named.clone()).into()),
    ]);
    let q = "What is the weather in Paris?";
    let (text, stats) = chat(&conn, &user(q), &options).await.unwrap();
    assert_eq!(stat_str(&stats, "finish_reason"), "tool_calls");
    assert_eq!(text, "");
    let calls: Vec<(String, String, String)> =
        stats["tool_calls"].try_clone().unwrap().try_into().unwrap();
    assert_eq!(calls.len(), 1);
    let (id, name, args) = &calls[0];
    assert!(id.starts_with("call_"), "{id}");
    assert_eq!(name, "get_weather");
    check_args(args, "D-Bus");
    // The result goes back in the `messages` option (a(ss) cannot carry calls) and is answered.
    let history = json!([
        {"role": "user", "content": q},
        {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
            "function": {"name": name, "arguments": args}}]},
        {"role": "tool", "tool_call_id": id, "content": "{\"temp\": 21}"},
    ]);
    let options = opts(&[
        ("max_tokens", 8u32.into()),
        ("temperature", 0.0f64.into()),
        ("tools", zbus::Str::from(tools.clone()).into()),
        ("messages", zbus::Str::from(history.to_string()).into()),
    ]);
    let (_, after) = chat(&conn, &[], &options).await.unwrap();
    let reason = stat_str(&after, "finish_reason");
    assert!(reason == "stop" || reason == "length", "{reason}");
    assert!(
        stat_u32(&after, "prompt_tokens") > stat_u32(&stats, "prompt_tokens"),
        "the call and its result are in the prompt"
    );
    let bad = opts(&[
        ("tools", zbus::Str::from(tools.clone()).into()),
        (
            "tool_choice",
            zbus::Str::from(r#"{"type":"function","function":{"name":"launch"}}"#).into(),
        ),
    ]);
    let (name, msg) = chat(&conn, &user(q), &bad).await.unwrap_err();
    assert!(name.ends_with("InvalidRequest"), "{name}");
    assert!(msg.contains("no function named \"launch\""), "{msg}");

    // MQTT: tool_choice required; the calls in the final message.
    let mut m = MqttClient::connect(&broker.url()).await;
    m.subscribe("edgellm/t1/response/#").await;
    m.subscribe("edgellm/t1/errors").await;
    m.publish(
        "edgellm/t1/request",
        json!({"id": "t1", "messages": [{"role": "user", "content": q}], "max_tokens": 100,
               "temperature": 0.8, "seed": 5, "tools": [weather_tool()], "tool_choice": "required"})
        .to_string(),
    )
    .await;
    let (_, fin) = m.until_done().await;
    assert_eq!(fin.json["finish_reason"], "tool_calls", "{}", fin.json);
    let call = &fin.json["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    check_args(call["function"]["arguments"].as_str().unwrap(), "MQTT");
    m.publish(
        "edgellm/t1/request",
        json!({"id": "t2", "messages": [{"role": "user", "content": q},
                {"role": "assistant", "content": null, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp\": 21}"}],
               "max_tokens": 8, "tools": [weather_tool()]})
        .to_string(),
    )
    .await;
    let (_, fin) = m.until_done().await;
    assert!(
        fin.json["finish_reason"] == "stop" || fin.json["finish_reason"] == "length",
        "{}",
        fin.json
    );
    m.publish(
        "edgellm/t1/request",
        json!({"id": "t3", "prompt": "x", "tools": [weather_tool()],
               "tool_choice": {"type": "function", "function": {"name": "launch"}}})
        .to_string(),
    )
    .await;
    let e = m.recv(Duration::from_secs(60)).await;
    assert_eq!(e.json["error"]["code"], "invalid_request", "{}", e.json);
    assert!(
        e.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no function named"),
        "{}",
        e.json
    );

    // HTTP: the openai and ollama clients (tests/http/openai_checks.py tools).
    let r = http_checks(&["tools", &format!("http://127.0.0.1:{port}")]).await;
    assert_eq!(r["finish"], "tool_calls", "{r}");
    assert_eq!(r["content"], Value::Null, "{r}");
    let call = &r["calls"][0];
    assert_eq!(
        (&call["type"], &call["name"]),
        (&json!("function"), &json!("get_weather"))
    );
    check_args(call["arguments"].as_str().unwrap(), "openai client");
    assert_eq!(r["streamed_finish"], "tool_calls", "{r}");
    assert_eq!(r["streamed"][0]["name"], "get_weather", "{r}");
    assert_eq!(
        r["streamed"][0]["arguments"], call["arguments"],
        "greedy: streamed and whole calls agree"
    );
    assert!(
        r["after_finish"] == "stop" || r["after_finish"] == "length",
        "{r}"
    );
    assert!(
        r["after_prompt_tokens"].as_u64() > r["first_prompt_tokens"].as_u64(),
        "{r}"
    );
    assert!(
        r["unknown"]
            .as_str()
            .unwrap()
            .contains("no function named \"launch\""),
        "{r}"
    );
    assert!(
        r["ollama_done"] == "stop" || r["ollama_done"] == "length",
        "{r}"
    );
    assert!(
        r["ollama_prompt_tokens"].as_u64() > r["first_prompt_tokens"].as_u64(),
        "{r}"
    );
    d.stop().await;

    // A model whose chat template shows no tools refuses them, naming the problem.
    let mut c = config(backend, tiny_package(), Some(dbus.address()), None, "t2");
    c.model.max_length = 256;
    let d = Daemon::start(c).await;
    let conn = bus(dbus.address()).await.unwrap();
    let options = opts(&[("tools", zbus::Str::from(tools).into())]);
    let (name, msg) = chat(&conn, &user(q), &options).await.unwrap_err();
    assert!(name.ends_with("InvalidRequest"), "{name}");
    assert!(msg.contains("cannot express tools"), "{msg}");
    d.stop().await;
}
