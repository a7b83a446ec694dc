//! D-Bus `Chat` arguments (`a(ss)a{sv}`, D-Bus little-endian encoding as a bus delivers them)
//! -> a request (`transport::dbus::chat_request_from`, what `Chat` and `StartChat` run).
//! Invariants: a refusal names its problem; an accepted request is the same request when its
//! fields go through the MQTT/HTTP parser (the transports agree on every option).
#![no_main]

use edgellm::sampler::SamplingParams;
use edgellm::transport::dbus::{Options, chat_request_from};
use edgellm::transport::{mqtt, request_fields};
use libfuzzer_sys::fuzz_target;
use zbus::wire::LE;
use zbus::wire::serialized::{Context, Data};

fuzz_target!(|data: &[u8]| {
    let body = Data::new(data, Context::new(LE, 0));
    let Ok(((messages, options), _)) = body.deserialize::<(Vec<(String, String)>, Options)>()
    else {
        return;
    };
    let defaults = SamplingParams::default();
    match chat_request_from(messages, &options, defaults.clone()) {
        Err(e) => assert!(!e.message.is_empty(), "a refusal without a message"),
        Ok(req) => {
            let fields = request_fields(&req);
            let (again, _) = mqtt::request_from_fields(&fields, 0, usize::MAX, defaults)
                .unwrap_or_else(|e| {
                    panic!(
                        "its fields are refused over MQTT: {}\n{fields:?}",
                        e.message
                    )
                });
            assert_eq!(
                request_fields(&again),
                fields,
                "D-Bus and MQTT read it differently"
            );
        }
    }
});
