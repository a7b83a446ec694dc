//! The HTTP face (`[http]`), driven by the official `openai` Python client
//! (`tests/http/openai_checks.py`, in the venv of `scripts/setup-test-venv.sh`, found through
//! `EDGELLM_TEST_PYTHON`) against an in-process daemon: chat and completions streamed and not,
//! models, a bad request, API keys, a full queue (429 with Retry-After) and shutdown (503 for
//! a queued request, `shutdown` for the running stream).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Stdio;
use std::time::Duration;

use edgellm::config::{Config, Listen};
use edgellm_tests::harness::free_port;
use edgellm_tests::service::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A configuration serving `package` over HTTP only, on a free port; the base URL.
fn http_config(backend: &str, package: &std::path::Path) -> (Config, String) {
    let mut c = config(backend, package, None, None, "http");
    let port = free_port();
    c.http.enabled = true;
    c.http.listen = Listen::Tcp(([127, 0, 0, 1], port).into());
    (c, format!("http://127.0.0.1:{port}"))
}

/// `GET path` over a plain TCP connection: (status, body).
async fn get(base: &str, path: &str) -> Option<(u16, String)> {
    exchange(base, "GET", path, None).await
}

/// `POST path` with a JSON body, the same way.
async fn post(base: &str, path: &str, body: &Value) -> (u16, String) {
    exchange(base, "POST", path, Some(body)).await.unwrap()
}

/// One HTTP/1.0 request (the server closes when the answer is complete): (status, body), or
/// None when the server cannot be reached or answers no HTTP.
async fn exchange(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Option<(u16, String)> {
    let addr = base.strip_prefix("http://")?;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(body) = body {
        let body = body.to_string();
        request += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    } else {
        request += "\r\n";
    }
    s.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Starts the daemon and waits until `/health` answers.
async fn start(config: Config, base: &str) -> Daemon {
    let d = Daemon::start(config).await;
    for _ in 0..1200 {
        if get(base, "/health").await.is_some() {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the HTTP server did not come up within 120 s");
}

fn text_of(pieces: &Value) -> String {
    pieces
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect()
}

async fn openai_client_chats_completes_and_lists_models(backend: &'static str) {
    let (config, base) = http_config(backend, tiny_package());
    let d = start(config, &base).await;
    let r = http_checks(&["basics", &base]).await;

    let chat = &r["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["role"], "assistant");
    assert_eq!(chat["finish"], "length", "{r}");
    assert_eq!(chat["usage"]["completion_tokens"], 8);
    let prompt_tokens = chat["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        chat["usage"]["total_tokens"].as_u64().unwrap(),
        prompt_tokens + 8
    );
    let text = chat["text"].as_str().unwrap();
    assert!(!text.is_empty());
    // Streamed, the same greedy answer arrives in pieces, with its usage at the end; the
    // conversation is the same, so all but its last prompt token come from the cache.
    let stream = &r["chat_stream"];
    assert!(stream["pieces"].as_array().unwrap().len() > 1, "{r}");
    assert_eq!(text_of(&stream["pieces"]), text);
    assert_eq!(stream["finish"], "length");
    assert_eq!(stream["usage"]["completion_tokens"], 8);
    assert_eq!(
        stream["usage"]["prompt_tokens"].as_u64(),
        Some(prompt_tokens)
    );
    assert_eq!(
        stream["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(prompt_tokens - 1)
    );

    let t = &r["text"];
    assert_eq!(t["usage"]["completion_tokens"], 6);
    assert_eq!(t["finish"], "length");
    assert_eq!(text_of(&r["text_stream"]), t["text"].as_str().unwrap());

    assert_eq!(r["models"], serde_json::json!([model_name(tiny_package())]));
    let bad = &r["bad_request"];
    assert_eq!(bad["status"], 400);
    assert_eq!(bad["body"]["code"], "invalid_request");
    assert!(
        bad["body"]["message"]
            .as_str()
            .unwrap()
            .starts_with("temperature"),
        "{bad}"
    );
    d.stop().await;
}

fn model_name(pkg: &std::path::Path) -> String {
    edgellm::service::model_name(pkg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_every_route_but_health() {
    let backend = edgellm_tests::backends()[0].as_str();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# the fleet's keys\nsk-edge-1\nsk-edge-2\n").unwrap();
    let (mut config, base) = http_config(backend, tiny_package());
    config.http.api_key_file = Some(keys);
    let d = start(config, &base).await;
    let r = http_checks(&["auth", &base, "sk-edge-2"]).await;
    assert_eq!(r["right"], "length", "{r}");
    for refused in ["wrong", "none"] {
        assert_eq!(r[refused]["status"], 401, "{r}");
        assert_eq!(r[refused]["body"]["code"], "invalid_api_key", "{r}");
    }
    assert_eq!(r["health"], 200);
    // Ollama's routes too, in Ollama's error shape.
    assert_eq!(r["ollama_none"]["status"], 401, "{r}");
    assert!(r["ollama_none"]["body"]["error"].is_string(), "{r}");
    assert_eq!(
        r["ollama_right"],
        serde_json::json!([model_name(tiny_package())])
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let backend = edgellm_tests::backends()[0].as_str();
    let (mut config, base) = http_config(backend, slow_package());
    config.limits.queue_depth = 1;
    let d = start(config, &base).await;
    let r = http_checks(&["busy", &base, "4"]).await;
    let results = r["results"].as_array().unwrap();
    let ok = results.iter().filter(|x| x["status"] == 200).count();
    let busy: Vec<&Value> = results.iter().filter(|x| x["status"] == 429).collect();
    // One runs, one waits, the others are refused at once (one more may be refused when it
    // arrives before the engine has taken the first from the queue).
    assert!(ok >= 1 && busy.len() >= 2 && ok + busy.len() == 4, "{r}");
    for b in busy {
        assert_eq!(b["retry_after"], "1", "{r}");
        assert_eq!(b["body"]["code"], "busy", "{r}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_503_and_ends_the_running_stream() {
    let backend = edgellm_tests::backends()[0].as_str();
    let (config, base) = http_config(backend, slow_package());
    let d = start(config, &base).await;
    let mut child = tokio::process::Command::new(test_python())
        .arg(http_checks_script())
        .args(["shutdown", &base])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), stdout.next_line())
        .await
        .expect("the stream did not start within 120 s")
        .unwrap();
    assert_eq!(line.as_deref(), Some("streaming"));
    // The second request is queued behind the stream before the service stops.
    let mut queued = false;
    for _ in 0..600 {
        let (_, body) = get(&base, "/health").await.unwrap();
        let h: Value = serde_json::from_str(&body).unwrap();
        if h["queue_length"] == 1 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(queued, "the second request never showed in the queue");
    d.shutdown.cancel();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    drop(stdin);
    let answer = tokio::time::timeout(Duration::from_secs(120), stdout.next_line())
        .await
        .expect("the checks did not finish")
        .unwrap()
        .unwrap();
    assert!(child.wait().await.unwrap().success());
    let r: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(r["finish"], "shutdown", "{r}");
    assert_eq!(r["queued"]["status"], 503, "{r}");
    assert_eq!(r["queued"]["body"]["code"], "shutting_down", "{r}");
    // A request after that finds the service stopping or already closed.
    let late = &r["late"];
    assert!(
        late["status"] == 503 || late.get("connection_error").is_some(),
        "{r}"
    );
    d.exited(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_their_status_and_the_daemon_keeps_serving() {
    let backend = edgellm_tests::backends()[0].as_str();
    let (mut config, base) = http_config(backend, tiny_package());
    config.http.max_body_bytes = 65536;
    let d = start(config, &base).await;
    let r = http_checks(&["malformed", &base]).await;
    let expect = [
        ("not_json", 400, "invalid_request", "not valid JSON"),
        ("not_utf8", 400, "invalid_request", "not UTF-8"),
        ("wrong_type", 400, "invalid_request", "max_tokens"),
        ("unknown_field", 400, "invalid_request", "functions"),
        ("twice", 400, "invalid_request", "twice"),
        ("too_large", 413, "request_too_large", "max_body_bytes"),
    ];
    for (case, status, code, says) in expect {
        assert_eq!(r[case]["status"], status, "{case}: {r}");
        assert_eq!(r[case]["code"], code, "{case}: {r}");
        assert!(
            r[case]["message"].as_str().unwrap().contains(says),
            "{case}: {r}"
        );
    }
    assert_eq!(r["no_route"]["status"], 404);
    // Still serving.
    let b = http_checks(&["basics", &base]).await;
    assert_eq!(b["chat"]["finish"], "length");
    d.stop().await;
}

/// A 900-token answer takes the slow package ~18 s: a client that leaves after the first chunk
/// (stream) or after 2 s (whole answer) must free the engine within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_request() {
    let backend = edgellm_tests::backends()[0].as_str();
    // With `stream_interval` 64 the engine sends nothing between the first piece and the 65th:
    // the departure must be seen without a failed send.
    for interval in [1, 64] {
        let (mut config, base) = http_config(backend, slow_package());
        config.limits.stream_interval = interval;
        let d = start(config, &base).await;
        let r = http_checks(&["disconnect", &base]).await;
        assert!(
            r["stream_idle_after_s"].as_f64().is_some(),
            "stream_interval {interval}: {r}"
        );
        assert_eq!(r["whole"], "gave up", "{r}");
        assert!(r["whole_idle_after_s"].as_f64().is_some(), "{r}");
        d.stop().await;
    }
}

/// `/metrics`, read by `prometheus_client`'s OpenMetrics parser, counts each transport's
/// requests by outcome, the tokens and the latencies, and shows the model and the process; the
/// same counters back D-Bus's `RequestsTotal`/`CompletionTokensTotal` and the MQTT status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_transport_and_parse_as_openmetrics() {
    let backend = edgellm_tests::backends()[0].as_str();
    let bus = edgellm_tests::harness::DbusBus::start();
    let broker = edgellm_tests::harness::Mosquitto::start();
    let (mut config, base) = http_config(backend, tiny_package());
    config.dbus.enabled = true;
    config.dbus.address = bus.address().to_string();
    config.mqtt.enabled = true;
    config.mqtt.url = broker.url();
    let d = start(config, &base).await;
    // One D-Bus chat first.
    let c = edgellm_tests::service::bus(bus.address()).await.unwrap();
    let options = opts(&[("max_tokens", zbus::OwnedVariant::from(3u32))]);
    chat(&c, &user("hello"), &options).await.unwrap();
    let r = http_checks(&["metrics", &base]).await;
    let (before, after) = (&r["before"], &r["after"]);
    let get = |m: &Value, key: &str| m[key].as_f64().unwrap_or(0.0);
    let moved = |key: &str| get(after, key) - get(before, key);
    assert_eq!(
        get(
            before,
            "edgellm_requests_total{outcome=length,transport=dbus}"
        ),
        1.0,
        "{r}"
    );
    assert_eq!(
        moved("edgellm_requests_total{outcome=length,transport=http}"),
        1.0,
        "{r}"
    );
    assert_eq!(
        moved("edgellm_requests_total{outcome=invalid_request,transport=http}"),
        1.0,
        "{r}"
    );
    assert_eq!(moved("edgellm_completion_tokens_total{}"), 5.0, "{r}");
    assert!(moved("edgellm_prompt_tokens_total{}") > 0.0, "{r}");
    assert_eq!(
        moved("edgellm_time_to_first_token_seconds_count{}"),
        1.0,
        "{r}"
    );
    assert_eq!(
        moved("edgellm_time_per_output_token_seconds_count{}"),
        1.0,
        "{r}"
    );
    let info = format!(
        "edgellm_model_info{{backend={backend},model={}}}",
        edgellm::service::model_name(tiny_package())
    );
    assert_eq!(get(after, &info), 1.0, "{r}");
    assert!(
        get(after, "edgellm_process_resident_memory_bytes{}") > 1e6,
        "{r}"
    );
    assert_eq!(get(after, "edgellm_running_sequences{}"), 0.0, "{r}");
    assert_eq!(get(after, "edgellm_queue_length{}"), 0.0, "{r}");
    assert_eq!(get(after, "edgellm_parallel{}"), 1.0, "{r}");
    assert!(get(after, "edgellm_model_load_seconds{}") > 0.0, "{r}");

    let property = |name: &'static str| {
        let c = c.clone();
        async move { u64::try_from(get_property(&c, name).await.unwrap()).unwrap() }
    };
    let tokens = get(after, "edgellm_completion_tokens_total{}") as u64;
    assert_eq!(property("RequestsTotal").await, 3);
    assert_eq!(property("CompletionTokensTotal").await, tokens);
    // The retained status was published when the last answered request left (the refusal
    // after it changed no status): two requests, every token.
    let mut m = MqttClient::connect(&broker.url()).await;
    m.subscribe("edgellm/http/status").await;
    let status = m.recv(Duration::from_secs(30)).await;
    assert_eq!(status.json["requests_total"], 2, "{}", status.json);
    assert_eq!(
        status.json["completion_tokens_total"], tokens,
        "{}",
        status.json
    );
    d.stop().await;
}

async fn ollama_client_chats_generates_and_lists_the_model(backend: &'static str) {
    let (config, base) = http_config(backend, tiny_package());
    let d = start(config, &base).await;
    let r = http_checks(&["ollama", &base]).await;
    let chat = &r["chat"];
    assert_eq!(chat["role"], "assistant");
    assert_eq!(chat["done"], true);
    assert_eq!(chat["done_reason"], "length", "{r}");
    assert_eq!(chat["eval_count"], 8);
    assert!(chat["prompt_eval_count"].as_u64().unwrap() > 0);
    let text = chat["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let stream = &r["chat_stream"];
    assert!(stream["pieces"].as_array().unwrap().len() > 1, "{r}");
    assert_eq!(text_of(&stream["pieces"]), text);
    assert_eq!(stream["done_reason"], "length");
    assert_eq!(stream["eval_count"], 8);
    let g = &r["generate"];
    assert_eq!(g["eval_count"], 6);
    assert_eq!(
        text_of(&r["generate_stream"]),
        g["response"].as_str().unwrap()
    );
    let name = model_name(tiny_package());
    assert_eq!(r["tags"], serde_json::json!([name]));
    assert_eq!(r["ps"], serde_json::json!([name]));
    assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(r["bad"]["status"], 400, "{r}");
    assert!(
        r["bad"]["error"]
            .as_str()
            .unwrap()
            .starts_with("options.mirostat"),
        "{r}"
    );
    d.stop().await;
}

edgellm_tests::on_both_backends!(
    openai_client_chats_completes_and_lists_models,
    ollama_client_chats_generates_and_lists_the_model,
);

/// 20 clients x 5 requests (whole answers, full streams, streams left after their first chunk)
/// with `parallel` = 4: each request ends exactly once (one finish chunk and one `[DONE]` per
/// full stream; /metrics counts 100 ended HTTP requests), nothing is left running, and the
/// daemon goes on serving.
// One worker, as edgellmd runs its transports: load and abuse must not stall it.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn twenty_clients_times_five_requests_each_end_once() {
    let backend = edgellm_tests::backends()[0].as_str();
    let (mut config, base) = http_config(backend, tiny_package());
    config.limits.parallel = 4;
    config.limits.queue_depth = 8;
    let d = start(config, &base).await;
    let r = http_checks(&["load", &base, "20", "5"]).await;
    let outcomes = r["outcomes"].as_object().unwrap();
    let total: u64 = outcomes.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 100, "{r}");
    assert_eq!(r["violations"], serde_json::json!([]), "{r}");
    assert!(r["idle_after_s"].as_f64().is_some(), "{r}");
    assert_eq!(r["metrics_http_requests"], 100.0, "{r}");
    // Every outcome is an answer, a stream the client left, or a 429 (the queue was full).
    for k in outcomes.keys() {
        assert!(
            k.ends_with("length")
                || k.ends_with("stop")
                || k == "stream left"
                || k.ends_with("status 429"),
            "unexpected outcome {k}: {r}"
        );
    }
    let b = http_checks(&["basics", &base]).await;
    assert_eq!(b["chat"]["finish"], "length");
    d.stop().await;
}

// One worker, as edgellmd runs its transports: load and abuse must not stall it.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_trickled_body_and_a_flood_of_connections_are_answered() {
    let backend = edgellm_tests::backends()[0].as_str();
    let (config, base) = http_config(backend, tiny_package());
    let d = start(config, &base).await;
    let r = http_checks(&["abuse", &base]).await;
    assert_eq!(r["trickled"], 200, "{r}");
    assert_eq!(r["flood"], serde_json::json!({"200": 400}), "{r}");
    assert_eq!(r["after"], 200);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_listens_on_a_unix_socket() {
    use std::os::unix::fs::PermissionsExt;
    let backend = edgellm_tests::backends()[0].as_str();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    // A stale socket from a previous run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut config = config(backend, tiny_package(), None, None, "uds");
    config.http.enabled = true;
    config.http.listen = Listen::Unix(sock.clone());
    let d = Daemon::start(config).await;
    for _ in 0..1200 {
        if tokio::net::UnixStream::connect(&sock).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let r = http_checks(&["uds", sock.to_str().unwrap()]).await;
    assert_eq!(r["health"], 200, "{r}");
    assert_eq!(r["chat"], "length", "{r}");
    d.stop().await;
    assert!(
        !sock.exists(),
        "the socket is removed when the daemon stops"
    );
}

/// `[limits] stream_interval = 3`: the streamed text goes out three pieces at a time after the
/// first, and the chunks still add up to the whole answer (the rest is flushed before the
/// finish reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_interval_sends_text_in_fewer_chunks_that_add_up_to_the_answer() {
    let backend = edgellm_tests::backends()[0].as_str();
    let (mut config, base) = http_config(backend, tiny_package());
    config.limits.stream_interval = 3;
    let d = start(config, &base).await;
    let ask = |stream: bool| {
        serde_json::json!({"model": "m", "prompt": "The quick brown fox", "max_tokens": 13,
            "temperature": 0, "stream": stream})
    };
    let (status, whole) = post(&base, "/v1/completions", &ask(false)).await;
    assert_eq!(status, 200, "{whole}");
    let whole: Value = serde_json::from_str(&whole).unwrap();
    assert_eq!(whole["usage"]["completion_tokens"], 13, "{whole}");
    let text = whole["choices"][0]["text"].as_str().unwrap();

    let (status, sse) = post(&base, "/v1/completions", &ask(true)).await;
    assert_eq!(status, 200, "{sse}");
    let chunks: Vec<String> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(chunks.concat(), text, "{sse}");
    // 13 tokens: the first piece at once, then chunks of three (12 = 4 x 3). A piece is about a
    // token (the detokenizer holds back an incomplete character), so at most 5 chunks; each
    // token its own chunk would be 13.
    assert!(
        (2..=5).contains(&chunks.len()),
        "{} chunks: {chunks:?}",
        chunks.len()
    );
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    d.stop().await;
}
