//! Tool calls (OpenAI's `tools` and `tool_choice`): the function definitions a request brings,
//! how each model family writes a call, the grammar that keeps a call well formed, and reading
//! the calls back out of the answer.
//!
//! Three call formats, chosen from the model, not the request:
//! * [`ToolFormat::Harmony`] (gpt-oss): a message to `functions.NAME` in the commentary channel,
//!   `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{args}<|call|>`. The
//!   grammar covers the whole reply (reasoning and preambles stay free text, but every header
//!   names a real channel or function, and a call's arguments match its schema).
//! * [`ToolFormat::Hermes`] (Qwen2.5, Qwen3 and the other templates that say `<tool_call>`):
//!   `<tool_call>\n{"name": "NAME", "arguments": {args}}\n</tool_call>`, possibly several.
//! * [`ToolFormat::Llama3`] (Llama 3.1-3.3's JSON tool calling): the whole answer is
//!   `{"name": "NAME", "parameters": {args}}`, one call.
//!
//! With `tool_choice` `auto`, template models write text freely until the call's opening
//! (`<tool_call>`, or `{"name"` at the very start for Llama): the engine holds back text that
//! could be that opening, and once it is written the grammar takes over (a lazy grammar, as
//! llama.cpp's tool calling does). `required` and a named function constrain from the first
//! token, to exactly one call. `none` renders no tools and parses nothing. Arguments are
//! constrained to the function's `parameters` schema (llguidance, as for `response_format`),
//! so they always parse and validate.

use serde_json::{Value, json};

use crate::grammar::GrammarError;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema for the arguments object (`{"type": "object", "properties": {}}` when the
    /// request gave none: a function without parameters).
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// Text or calls, as the model decides.
    #[default]
    Auto,
    /// No calls: the tools are not shown to the model.
    None,
    /// One call, to any of the tools.
    Required,
    /// One call, to this function.
    Function(String),
}

/// A request's tools and its choice among them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub list: Vec<Tool>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): with `auto`, whether one answer may make several
    /// calls (a format that writes one call per answer makes one either way).
    pub parallel: bool,
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ToolCall {
    /// `call_` and 24 hex digits, unique within the daemon's life.
    pub id: String,
    pub name: String,
    /// The arguments, a JSON object as text (OpenAI's `function.arguments`).
    pub arguments: String,
}

impl ToolCall {
    /// OpenAI's shape: `{"id", "type": "function", "function": {"name", "arguments"}}`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// The most tools a request may bring.
pub const MAX_TOOLS: usize = 128;

fn err(msg: impl Into<String>) -> GrammarError {
    GrammarError(msg.into())
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    /// `tools` (a list of `{"type": "function", "function": {"name", "description",
    /// "parameters"}}`) and `tool_choice` (`"auto"`, `"none"`, `"required"` or `{"type":
    /// "function", "function": {"name"}}`), checked: names are 1-64 letters, digits, `_` or
    /// `-`, unique, and a named choice is one of them.
    pub fn parse(tools: Option<&Value>, choice: Option<&Value>) -> Result<Tools, GrammarError> {
        let list = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                if items.len() > MAX_TOOLS {
                    return Err(err(format!(
                        "tools: at most {MAX_TOOLS} functions, got {}",
                        items.len()
                    )));
                }
                let mut list: Vec<Tool> = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let tool = parse_tool(i, item)?;
                    if list.iter().any(|t| t.name == tool.name) {
                        return Err(err(format!(
                            "tools[{i}].function.name: {:?} is defined twice",
                            tool.name
                        )));
                    }
                    list.push(tool);
                }
                list
            }
            Some(other) => {
                return Err(err(format!(
                    "tools: expected a list of function definitions, got {}",
                    crate::transport::type_name(other)
                )));
            }
        };
        let choice = match choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                other => {
                    return Err(err(format!(
                        "tool_choice: {other:?}: expected auto, none, required or \
                         {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    )));
                }
            },
            Some(Value::Object(o)) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        err("tool_choice: expected {\"type\": \"function\", \"function\": {\"name\": ...}}")
                    })?;
                ToolChoice::Function(name.to_string())
            }
            Some(other) => {
                return Err(err(format!(
                    "tool_choice: expected a string or an object, got {}",
                    crate::transport::type_name(other)
                )));
            }
        };
        match &choice {
            ToolChoice::Function(name) if !list.iter().any(|t| &t.name == name) => {
                return Err(err(format!(
                    "tool_choice: no function named {name:?} in tools (known: {})",
                    list.iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            ToolChoice::Function(_) | ToolChoice::Required if list.is_empty() => {
                return Err(err("tool_choice: requires tools"));
            }
            _ => {}
        }
        Ok(Tools {
            list,
            choice,
            parallel: true,
        })
    }

    /// Whether the model is to see the tools (and may call them).
    pub fn active(&self) -> bool {
        !self.list.is_empty() && self.choice != ToolChoice::None
    }

    /// The tools as chat templates read them (OpenAI's request shape).
    pub fn template_json(&self) -> Value {
        Value::Array(
            self.list
                .iter()
                .map(|t| {
                    let mut f = serde_json::Map::new();
                    f.insert("name".into(), t.name.clone().into());
                    if let Some(d) = &t.description {
                        f.insert("description".into(), d.clone().into());
                    }
                    f.insert("parameters".into(), t.parameters.clone());
                    json!({"type": "function", "function": f})
                })
                .collect(),
        )
    }

    /// The tools a call may go to under the choice.
    fn callable(&self) -> Vec<&Tool> {
        match &self.choice {
            ToolChoice::Function(n) => self.list.iter().filter(|t| &t.name == n).collect(),
            ToolChoice::None => Vec::new(),
            _ => self.list.iter().collect(),
        }
    }

    /// Whether the answer must be a call (`required` or a named function).
    pub fn forced(&self) -> bool {
        matches!(self.choice, ToolChoice::Required | ToolChoice::Function(_))
    }
}

fn parse_tool(i: usize, item: &Value) -> Result<Tool, GrammarError> {
    let o = item
        .as_object()
        .ok_or_else(|| err(format!("tools[{i}]: expected an object")))?;
    match o.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(err(format!(
                "tools[{i}].type: {other:?}: only \"function\" tools are supported"
            )));
        }
        None => return Err(err(format!("tools[{i}].type is missing (\"function\")"))),
    }
    let f = o
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| err(format!("tools[{i}].function: expected an object")))?;
    if let Some(k) = f
        .keys()
        .find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
    {
        return Err(err(format!(
            "tools[{i}].function: unknown field {k:?} (known: name, description, parameters, strict)"
        )));
    }
    let name = match f.get("name").and_then(Value::as_str) {
        Some(n) if valid_name(n) => n.to_string(),
        Some(_) => {
            return Err(err(format!(
                "tools[{i}].function.name: 1 to 64 letters, digits, _ or -"
            )));
        }
        None => return Err(err(format!("tools[{i}].function.name is missing"))),
    };
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(err(format!(
                "tools[{i}].function.description: expected a string"
            )));
        }
    };
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(err(format!(
                "tools[{i}].function.parameters: expected a JSON schema object"
            )));
        }
    };
    Ok(Tool {
        name,
        description,
        parameters,
    })
}

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Harmony,
    Hermes,
    Llama3,
}

/// When a request's grammar applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum When {
    /// The answer text (with harmony, the `final` channel's content): `response_format`,
    /// `grammar`.
    #[default]
    Answer,
    /// Every token the model writes, harmony's headers and reasoning included.
    Reply,
    /// From the first occurrence of this text in the answer (with `anchored`, only at the
    /// answer's start, after whitespace); the text itself is part of the call when `keep`.
    After(Trigger),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trigger {
    pub text: &'static str,
    pub anchored: bool,
    /// Whether the grammar starts with the trigger (`{"name"`) rather than after it
    /// (`<tool_call>`).
    pub keep: bool,
}

impl ToolFormat {
    /// The format a chat template's tool rendering speaks, if any.
    pub fn detect(template: &str) -> Option<ToolFormat> {
        if template.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if template.contains("\"parameters\": dictionary of argument name")
            || (template.contains("<|python_tag|>") && template.contains("tool_calls"))
        {
            Some(ToolFormat::Llama3)
        } else {
            None
        }
    }

    /// The text that opens a call when the model may also answer in prose.
    pub fn trigger(self) -> Option<Trigger> {
        match self {
            ToolFormat::Harmony => None,
            ToolFormat::Hermes => Some(Trigger {
                text: "<tool_call>",
                anchored: false,
                keep: false,
            }),
            ToolFormat::Llama3 => Some(Trigger {
                text: "{\"name\"",
                anchored: true,
                keep: true,
            }),
        }
    }

    /// The Lark grammar (llguidance's dialect) of the calls `tools` allows, and when it
    /// applies. `final_schema`: harmony's final answer (`None`: free text).
    /// `constrain`: whether the tokenizer has harmony's `<|constrain|>` token.
    pub fn grammar(
        self,
        tools: &Tools,
        final_schema: Option<&Value>,
        constrain: bool,
    ) -> (String, When) {
        let callable = tools.callable();
        let alts = (0..callable.len())
            .map(|i| format!("f{i}"))
            .collect::<Vec<_>>()
            .join(" | ");
        // Function i: `head` (its name, in the format's words), then its arguments.
        let funcs = |head: &dyn Fn(&str) -> String| {
            callable
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    format!(
                        "f{i}: {} %json {}\n",
                        head(&t.name),
                        with_layout(&t.parameters)
                    )
                })
                .collect::<String>()
        };
        match self {
            ToolFormat::Harmony => {
                let end = if tools.forced() {
                    "call"
                } else {
                    "(final | call)"
                };
                let body = match final_schema {
                    Some(s) => format!("%json {}", with_layout(s)),
                    None => "TEXT".into(),
                };
                let json = if constrain {
                    "\" \" <|constrain|> \"json\""
                } else {
                    "\" json\""
                };
                let g = format!(
                    "start: pre* {end}\n\
                     pre: <|channel|> \"analysis\" <|message|> TEXT <|end|> <|start|> \"assistant\"\n\
                     \x20  | <|channel|> \"commentary\" <|message|> TEXT <|end|> <|start|> \"assistant\"\n\
                     final: <|channel|> \"final\" <|message|> {body} (<|return|> | <|end|>)\n\
                     call: <|channel|> \"commentary to=functions.\" ({alts}) <|call|>\n\
                     {}\
                     TEXT: /(?s:.*)/\n",
                    funcs(&|name| format!("{} {json} <|message|>", lit(name)))
                );
                (g, When::Reply)
            }
            ToolFormat::Hermes => {
                // Forced: exactly one call, opened by the grammar. Auto: the watch saw the
                // opening; more calls may follow unless parallel calls are off.
                let open = if tools.forced() {
                    format!("{} ", lit("<tool_call>"))
                } else {
                    String::new()
                };
                let more = if tools.forced() || !tools.parallel {
                    String::new()
                } else {
                    format!(" ({} call)*", lit("\n<tool_call>"))
                };
                let g = format!(
                    "start: {open}call{more}\ncall: {} ({alts}) {}\n{}",
                    lit("\n{\"name\": "),
                    lit("}\n</tool_call>"),
                    funcs(&|name| lit(&format!("\"{name}\", \"arguments\": ")))
                );
                (g, self.when(tools))
            }
            ToolFormat::Llama3 => {
                let g = format!(
                    "start: {} ({alts}) {}\n{}",
                    lit("{\"name\": "),
                    lit("}"),
                    funcs(&|name| lit(&format!("\"{name}\", \"parameters\": ")))
                );
                (g, self.when(tools))
            }
        }
    }

    fn when(self, tools: &Tools) -> When {
        match self.trigger() {
            Some(t) if !tools.forced() => When::After(t),
            _ => When::Answer,
        }
    }

    /// The calls in `text`, the answer from the call's opening (`<tool_call>`, `{"name"`) on. `None` when the text holds no complete, well-formed call
    /// (the answer ran out of tokens inside it).
    pub fn parse_calls(self, text: &str) -> Option<Vec<(String, String)>> {
        // The arguments as the model wrote them (so a history that sends them back renders
        // the same tokens), when they can be cut out of the call; else re-serialized.
        let one = |body: &str, args_key: &str| -> Option<(String, String)> {
            let body = body.trim();
            let v: Value = serde_json::from_str(body).ok()?;
            let name = v.get("name")?.as_str()?.to_string();
            let args = v.get(args_key).filter(|a| a.is_object())?;
            let key = format!("\"{args_key}\": ");
            let raw = body
                .find(&key)
                .and_then(|at| body[at + key.len()..].strip_suffix('}'))
                .map(str::trim)
                .filter(|raw| serde_json::from_str::<Value>(raw).ok().as_ref() == Some(args));
            Some((name, raw.map_or_else(|| args.to_string(), str::to_string)))
        };
        match self {
            ToolFormat::Hermes => {
                let mut calls = Vec::new();
                for part in text.split("<tool_call>") {
                    if part.trim().is_empty() {
                        continue;
                    }
                    let (body, rest) = part.split_once("</tool_call>")?;
                    if !rest.trim().is_empty() {
                        return None;
                    }
                    calls.push(one(body, "arguments")?);
                }
                (!calls.is_empty()).then_some(calls)
            }
            ToolFormat::Llama3 => one(text, "parameters").map(|c| vec![c]),
            ToolFormat::Harmony => None,
        }
    }
}

/// A Lark string literal of `s`.
fn lit(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// A schema with our JSON layout (one space after `:` and `,`) unless it sets its own.
fn with_layout(schema: &Value) -> Value {
    let mut s = schema.clone();
    if let Value::Object(o) = &mut s
        && !o.contains_key("x-guidance")
    {
        o.insert("x-guidance".into(), crate::grammar::json_layout());
    }
    s
}

/// A fresh call id: `call_` and 24 hex digits from the clock and a counter.
pub fn call_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64 of both, so ids do not read as a sequence.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    format!(
        "call_{:016x}{:08x}",
        mix(t ^ n.rotate_left(32)),
        mix(n) as u32
    )
}

/// Watches answer text for a call's opening, holding back what could still become it.
#[derive(Debug)]
pub struct Watch {
    trigger: Trigger,
    /// Text that could be the start of the trigger, not yet passed on.
    held: String,
    /// Anchored: text other than whitespace was passed on, so the trigger cannot come.
    passed: bool,
}

/// What [`Watch::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Text to pass on as answer text (maybe empty).
    Text(String),
    /// The call opened: text before it to pass on, and the call's text so far (from the
    /// trigger when it is kept, else after it).
    Call { before: String, call: String },
}

impl Watch {
    pub fn new(trigger: Trigger) -> Self {
        Watch {
            trigger,
            held: String::new(),
            passed: false,
        }
    }

    pub fn push(&mut self, piece: &str) -> Seen {
        let t = self.trigger.text;
        if self.passed {
            return Seen::Text(piece.to_string());
        }
        self.held.push_str(piece);
        if self.trigger.anchored {
            let lead = self.held.len() - self.held.trim_start().len();
            let rest = &self.held[lead..];
            if rest.starts_with(t) {
                let before = self.held[..lead].to_string();
                let call = rest.to_string();
                self.held.clear();
                return Seen::Call { before, call };
            }
            if t.starts_with(rest) {
                return Seen::Text(String::new());
            }
            self.passed = true;
            return Seen::Text(std::mem::take(&mut self.held));
        }
        if let Some(at) = self.held.find(t) {
            let before = self.held[..at].to_string();
            let from = if self.trigger.keep { at } else { at + t.len() };
            let call = self.held[from..].to_string();
            self.held.clear();
            return Seen::Call { before, call };
        }
        // Keep the longest suffix that starts the trigger.
        let keep = (1..t.len().min(self.held.len() + 1))
            .rev()
            .find(|&n| {
                let start = self.held.len() - n;
                self.held.is_char_boundary(start) && t.starts_with(&self.held[start..])
            })
            .unwrap_or(0);
        let safe = self.held.len() - keep;
        Seen::Text(self.held.drain(..safe).collect())
    }

    pub fn trigger(&self) -> Trigger {
        self.trigger
    }

    /// End of the answer: what is still held back is text after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Tools {
        Tools::parse(
            Some(
                &json!([{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}}}]),
            ),
            None,
        )
        .unwrap()
    }

    #[test]
    fn tools_and_choices_are_checked() {
        let e = |t: Value, c: Value| Tools::parse(Some(&t), Some(&c)).unwrap_err().0;
        let f = json!([{"type": "function", "function": {"name": "f"}}]);
        assert!(e(f.clone(), json!("sometimes")).starts_with("tool_choice: \"sometimes\""));
        assert!(
            e(
                f.clone(),
                json!({"type": "function", "function": {"name": "g"}})
            )
            .starts_with("tool_choice: no function named \"g\"")
        );
        assert!(e(json!([]), json!("required")).contains("requires tools"));
        assert!(e(json!([{"type": "retrieval"}]), json!("auto")).contains("only \"function\""));
        assert!(
            e(
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!("auto")
            )
            .starts_with("tools[0].function.name")
        );
        assert!(e(json!([f[0], f[0]]), json!("auto")).contains("defined twice"));
        let t = Tools::parse(
            Some(&f),
            Some(&json!({"type": "function", "function": {"name": "f"}})),
        )
        .unwrap();
        assert_eq!(t.choice, ToolChoice::Function("f".into()));
        assert_eq!(
            t.list[0].parameters,
            json!({"type": "object", "properties": {}})
        );
    }

    #[test]
    fn hermes_calls_parse_and_partial_ones_do_not() {
        let h = ToolFormat::Hermes;
        let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        assert_eq!(
            h.parse_calls(text).unwrap(),
            [("a".into(), "{\"x\": 1}".into()), ("b".into(), "{}".into())]
        );
        assert_eq!(h.parse_calls("\n{\"name\": \"a\", \"argu"), None);
        assert_eq!(
            ToolFormat::Llama3
                .parse_calls("{\"name\": \"a\", \"parameters\": {\"x\": \"y\"}}")
                .unwrap(),
            [("a".into(), "{\"x\": \"y\"}".into())]
        );
    }

    #[test]
    fn the_watch_holds_back_what_could_open_a_call() {
        let mut w = Watch::new(ToolFormat::Hermes.trigger().unwrap());
        assert_eq!(
            w.push("Let me check <to"),
            Seen::Text("Let me check ".into())
        );
        assert_eq!(w.push("ol"), Seen::Text(String::new()));
        assert_eq!(
            w.push("_call>\n{"),
            Seen::Call {
                before: String::new(),
                call: "\n{".into()
            }
        );
        let mut w = Watch::new(ToolFormat::Hermes.trigger().unwrap());
        assert_eq!(w.push("a <b"), Seen::Text("a <b".into()));
        let mut w = Watch::new(ToolFormat::Llama3.trigger().unwrap());
        assert_eq!(w.push(" {\""), Seen::Text(String::new()));
        assert_eq!(
            w.push("name\": "),
            Seen::Call {
                before: " ".into(),
                call: "{\"name\": ".into()
            }
        );
        let mut w = Watch::new(ToolFormat::Llama3.trigger().unwrap());
        assert_eq!(w.push("{\"x"), Seen::Text("{\"x".into()));
        assert_eq!(w.push("{\"name\""), Seen::Text("{\"name\"".into()));
    }

    #[test]
    fn call_ids_differ() {
        let (a, b) = (call_id(), call_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 24);
        let _ = tools();
    }
}
