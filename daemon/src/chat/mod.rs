//! Prompt rendering: messages -> the exact text the model sees.
//!
//! * [`ChatTemplate`]: the model's Jinja chat template, rendered with minijinja in the
//!   environment transformers' `apply_chat_template` sets up: `trim_blocks`, `lstrip_blocks`,
//!   loop controls, `raise_exception`, `strftime_now`, a `tojson` that writes what Python's
//!   `json.dumps(ensure_ascii=False)` writes, and Python's string/dict methods
//!   (`.strip()`, `.startswith()`, `.items()`, ...).
//! * [`harmony`]: OpenAI's harmony format for gpt-oss, rendered and parsed in code.

pub mod harmony;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

/// One chat message (OpenAI field names). Besides `role` and `content`, the fields of tool
/// calling: an assistant turn's `tool_calls` (`[{"id", "type": "function", "function": {"name",
/// "arguments"}}]`, kept as given: templates read them as they are) and a `tool` turn's
/// `tool_call_id` (and optional `name`). Absent fields are left out of what templates see.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    /// `null` in a request (an assistant turn that only calls tools) reads as empty.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    /// A message with only a role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            ..Message::default()
        }
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::Deserialize;
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not compile: {0}")]
    Compile(String),
    #[error("chat template: {0}")]
    Render(String),
    #[error("the model has no chat template; send a plain prompt instead")]
    NoTemplate,
}

/// A compiled chat template with the special tokens it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// Python's `str.isspace()` set, which `strip()` and Jinja's `trim` use: Unicode whitespace
/// plus the ASCII separators U+001C..U+001F that Rust does not count.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.strip/lstrip/rstrip` with Python's whitespace; everything else goes to minijinja's
/// Python-compatibility methods.
fn py_methods(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let (Some(s), true) = (value.as_str(), args.is_empty()) {
        match method {
            "strip" => return Ok(Value::from(s.trim_matches(py_space))),
            "lstrip" => return Ok(Value::from(s.trim_start_matches(py_space))),
            "rstrip" => return Ok(Value::from(s.trim_end_matches(py_space))),
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_unknown_method_callback(py_methods);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| strftime_utc(&fmt, now_unix()));
        env.add_filter("tojson", tojson);
        env.add_filter("trim", |s: String| s.trim_matches(py_space).to_string());
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ChatError::Compile(format!("{e:#}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// Makes `strftime_now` read a fixed clock (Unix seconds) instead of the system's.
    pub fn set_clock(&mut self, unix: i64) {
        self.env
            .add_function("strftime_now", move |fmt: String| strftime_utc(&fmt, unix));
    }

    /// Renders `messages` (JSON objects: `role`, `content`, and whatever else the template
    /// reads, e.g. `tool_calls`, `thinking`) as `apply_chat_template(tokenize=False)` does:
    /// `tools` and `documents` are always defined (`none` when absent), special tokens are
    /// defined when the tokenizer has them, `extra` holds further keyword arguments
    /// (`enable_thinking`, `reasoning_effort`, `date_string`, ...).
    pub fn render<M: serde::Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatError> {
        if messages.is_empty() {
            return Err(ChatError::Render(
                "Cannot apply chat template to an empty conversation. Provide at least one message.".into(),
            ));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .expect("the template was added in new()");
        let mut ctx = serde_json::Map::new();
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let mut msgs =
            serde_json::to_value(messages).map_err(|e| ChatError::Render(e.to_string()))?;
        alias_reasoning_fields(&mut msgs);
        ctx.insert("messages".into(), msgs);
        ctx.insert(
            "tools".into(),
            tools.cloned().unwrap_or(serde_json::Value::Null),
        );
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token".into(), b.clone().into());
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token".into(), e.clone().into());
        }
        tmpl.render(Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| ChatError::Render(render_error(&e)))
    }
}

/// transformers 5 gives a message with any of `reasoning_content`, `thinking`, `reasoning`
/// both `thinking` (its own value if set) and `reasoning_content` (the first set of the three),
/// so templates reading either name see the reasoning.
fn alias_reasoning_fields(messages: &mut serde_json::Value) {
    let Some(list) = messages.as_array_mut() else {
        return;
    };
    for m in list.iter_mut().filter_map(|m| m.as_object_mut()) {
        let get = |k: &str| m.get(k).filter(|v| !v.is_null()).cloned();
        let first = get("reasoning_content")
            .or_else(|| get("thinking"))
            .or_else(|| get("reasoning"));
        if let Some(r) = first {
            let thinking = get("thinking").unwrap_or_else(|| r.clone());
            m.insert("thinking".into(), thinking);
            m.insert("reasoning_content".into(), r);
        }
    }
}

/// The message of a `raise_exception` call alone, otherwise minijinja's description.
fn render_error(e: &Error) -> String {
    let mut err: &dyn std::error::Error = e;
    while let Some(next) = err.source() {
        err = next;
    }
    match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => format!("{e} ({err})"),
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)` (no HTML escaping, Python's separators).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    py_json(
        &value,
        &Fmt {
            indent,
            item,
            key,
            sort_keys: sort_keys.unwrap_or(false),
        },
        0,
        &mut out,
    )?;
    Ok(Value::from_safe_string(out))
}

struct Fmt {
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
}

fn py_json(v: &Value, f: &Fmt, level: usize, out: &mut String) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = f.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                out.push_str(&i.to_string());
            } else {
                let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                // Python's repr of floats: shortest round-trip, always with a '.' or exponent.
                let s = format!("{x:?}");
                out.push_str(&s);
            }
        }
        ValueKind::String | ValueKind::Bytes => {
            out.push_str(
                &serde_json::to_string(v.as_str().unwrap_or_default()).expect("strings serialize"),
            );
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&f.item);
                }
                newline(out, level + 1);
                py_json(item, f, level + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, level);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if f.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&f.item);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(&k.to_string()).expect("strings serialize"));
                out.push_str(&f.key);
                py_json(&v.get_item(k)?, f, level + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, level);
            }
            out.push('}');
        }
        _ => out.push_str(&serde_json::to_string(&v.to_string()).expect("strings serialize")),
    }
    Ok(())
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `strftime` for the fields chat templates use (`%d %b %Y`, `%B`, `%A`, `%H:%M`, ...), UTC.
pub fn strftime_utc(fmt: &str, unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        Message::new("user", "hi")
    }

    #[test]
    fn strftime_matches_known_dates() {
        // 2025-06-28 was a Saturday.
        assert_eq!(
            strftime_utc("%d %b %Y %A", 1_751_068_800),
            "28 Jun 2025 Saturday"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", 0), "1970-01-01 00:00:00");
    }

    #[test]
    fn tojson_writes_python_json_dumps() {
        let t =
            ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", None, None).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert(
            "x".into(),
            serde_json::json!({"a": [1, 2.5, "é<"], "b": null}),
        );
        let out = t.render(&[msg()], false, None, &extra).unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5, \"é<\"], \"b\": null}|{\n  \"a\": [\n    1,\n    2.5,\n    \"é<\"\n  ],\n  \"b\": null\n}"
        );
    }

    #[test]
    fn raise_exception_surfaces_its_message() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let err = t
            .render(&[msg()], false, None, &serde_json::Map::new())
            .unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }
}
