//! An MQTT request payload -> a request (`transport::mqtt::payload_fields` and
//! `request_from_fields`, exactly what the daemon runs on every message). Invariants: a
//! refusal names its problem; an accepted request written back as fields
//! (`transport::request_fields`) parses to the same request.
#![no_main]

use edgellm::sampler::SamplingParams;
use edgellm::transport::{mqtt, request_fields};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let defaults = SamplingParams::default();
    let parsed = mqtt::payload_fields(data)
        .and_then(|f| mqtt::request_from_fields(&f, data.len(), 1 << 20, defaults.clone()));
    match parsed {
        Err(e) => assert!(!e.message.is_empty(), "a refusal without a message"),
        Ok((req, _stream)) => {
            let fields = request_fields(&req);
            let text = serde_json::to_string(&Value::Object(fields.clone())).expect("JSON");
            let again = mqtt::payload_fields(text.as_bytes())
                .and_then(|f| mqtt::request_from_fields(&f, text.len(), usize::MAX, defaults))
                .unwrap_or_else(|e| panic!("its own fields are refused: {}\n{text}", e.message));
            assert_eq!(
                request_fields(&again.0),
                fields,
                "the request changed on a round trip"
            );
        }
    }
});
