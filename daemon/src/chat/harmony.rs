//! OpenAI's harmony format (gpt-oss): rendering a conversation for completion, byte for byte as
//! the `openai-harmony` library does (tests/fixtures/harmony has its goldens), and a streaming
//! parser that splits what the model writes into channels.
//!
//! Rendered prompt (messages follow each other with no separator):
//! ```text
//! <|start|>system<|message|>{identity}\nKnowledge cutoff: {cutoff}\nCurrent date: {date}\n\nReasoning: {effort}\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
//! <|start|>developer<|message|># Instructions\n\n{instructions}[\n\n# Tools\n\n## functions\n\nnamespace functions {...} // namespace functions]<|end|>
//! <|start|>user<|message|>{text}<|end|>
//! <|start|>assistant<|channel|>final<|message|>{text}<|end|>
//! <|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{args}<|call|>
//! <|start|>functions.f to=assistant<|channel|>commentary<|message|>{result}<|end|>
//! <|start|>assistant
//! ```
//! A request's `system` and `developer` messages become the developer instructions; the harmony
//! system message carries identity, dates and reasoning effort. The model answers
//! `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>`.

use serde::Deserialize;
use serde_json::Value;

use super::{ChatError, Message};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    Low,
    #[default]
    Medium,
    High,
}

impl ReasoningEffort {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "low" => Self::Low,
            "medium" => Self::Medium,
            "high" => Self::High,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
}

/// The harmony system message. `None` fields leave their line out.
#[derive(Debug, Clone, Deserialize)]
pub struct SystemOptions {
    pub model_identity: Option<String>,
    pub knowledge_cutoff: Option<String>,
    /// `YYYY-MM-DD`.
    pub current_date: Option<String>,
    pub reasoning_effort: ReasoningEffort,
}

impl Default for SystemOptions {
    fn default() -> Self {
        SystemOptions {
            model_identity: Some(
                "You are ChatGPT, a large language model trained by OpenAI.".into(),
            ),
            knowledge_cutoff: Some("2024-06".into()),
            current_date: None,
            reasoning_effort: ReasoningEffort::Medium,
        }
    }
}

/// One harmony message: an author (`role`, or `name` for tools), optional channel, recipient
/// (`to=`), and content type (e.g. `<|constrain|>json`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HarmonyMessage {
    pub role: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub recipient: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    pub content: String,
}

/// A whole conversation to render for completion.
#[derive(Debug, Clone, Default)]
pub struct Conversation<'a> {
    pub system: Option<&'a SystemOptions>,
    pub developer: Option<&'a str>,
    /// Function tools: `{"name", "description", "parameters": JSON schema}`.
    pub tools: &'a [Value],
    pub messages: &'a [HarmonyMessage],
    /// Drop analysis messages before the first final one when the last assistant message is
    /// final (harmony's default).
    pub auto_drop_analysis: bool,
}

/// Renders a request's messages for completion.
pub fn render(messages: &[Message], sys: &SystemOptions) -> Result<String, ChatError> {
    render_with_tools(messages, sys, &[])
}

/// Renders a request's messages and function tools (OpenAI's `{"type": "function",
/// "function": {...}}` or the bare function object) for completion. An assistant turn's
/// `tool_calls` become messages to `functions.NAME` in the commentary channel (its text, if
/// any, a commentary message before them); a `tool` turn becomes the function's answer, its
/// name found from `tool_call_id` among the earlier calls (or its own `name`).
pub fn render_with_tools(
    messages: &[Message],
    sys: &SystemOptions,
    tools: &[Value],
) -> Result<String, ChatError> {
    let instructions: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == "system" || m.role == "developer")
        .map(|m| m.content.as_str())
        .collect();
    let instructions = instructions.join("\n\n");
    let mut convo = Vec::new();
    // (id, name) of the calls so far, for tool results that name their call by id.
    let mut calls: Vec<(Option<String>, String)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "system" | "developer" => continue,
            "user" => convo.push(HarmonyMessage {
                role: m.role.clone(),
                content: m.content.clone(),
                ..HarmonyMessage::default()
            }),
            "assistant" if m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) => {
                if !m.content.is_empty() {
                    convo.push(HarmonyMessage {
                        role: "assistant".into(),
                        channel: Some("commentary".into()),
                        content: m.content.clone(),
                        ..HarmonyMessage::default()
                    });
                }
                for (j, call) in m.tool_calls.iter().flatten().enumerate() {
                    let f = call.get("function").unwrap_or(call);
                    let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                        ChatError::Render(format!(
                            "messages[{i}].tool_calls[{j}].function.name is missing"
                        ))
                    })?;
                    let args = match f.get("arguments") {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                        None => "{}".into(),
                    };
                    calls.push((
                        call.get("id").and_then(Value::as_str).map(str::to_string),
                        name.to_string(),
                    ));
                    convo.push(HarmonyMessage {
                        role: "assistant".into(),
                        channel: Some("commentary".into()),
                        recipient: Some(format!("functions.{name}")),
                        content_type: Some("<|constrain|>json".into()),
                        content: args,
                        ..HarmonyMessage::default()
                    });
                }
            }
            "assistant" => convo.push(HarmonyMessage {
                role: m.role.clone(),
                channel: Some("final".into()),
                content: m.content.clone(),
                ..HarmonyMessage::default()
            }),
            "tool" => {
                let by_id = m.tool_call_id.as_ref().and_then(|id| {
                    calls
                        .iter()
                        .find(|(c, _)| c.as_ref() == Some(id))
                        .map(|(_, n)| n.clone())
                });
                let name = by_id.or_else(|| m.name.clone()).ok_or_else(|| {
                    ChatError::Render(format!(
                        "messages[{i}]: a tool result needs the tool_call_id of an earlier call \
                         (or the function's name)"
                    ))
                })?;
                convo.push(HarmonyMessage {
                    role: "tool".into(),
                    name: Some(format!("functions.{name}")),
                    recipient: Some("assistant".into()),
                    channel: Some("commentary".into()),
                    content: m.content.clone(),
                    ..HarmonyMessage::default()
                });
            }
            other => {
                return Err(ChatError::Render(format!(
                    "role {other:?} is not supported for gpt-oss (system, developer, user, assistant, tool)"
                )));
            }
        }
    }
    Ok(render_conversation(&Conversation {
        system: Some(sys),
        developer: (!instructions.is_empty()).then_some(instructions.as_str()),
        tools,
        messages: &convo,
        auto_drop_analysis: true,
    }))
}

pub fn render_conversation(c: &Conversation<'_>) -> String {
    let mut out = String::new();
    if let Some(sys) = c.system {
        let mut lines: Vec<String> = Vec::new();
        lines.extend(sys.model_identity.clone());
        lines.extend(
            sys.knowledge_cutoff
                .as_ref()
                .map(|k| format!("Knowledge cutoff: {k}")),
        );
        lines.extend(
            sys.current_date
                .as_ref()
                .map(|d| format!("Current date: {d}")),
        );
        out.push_str("<|start|>system<|message|>");
        out.push_str(&lines.join("\n"));
        out.push_str("\n\nReasoning: ");
        out.push_str(sys.reasoning_effort.as_str());
        out.push_str("\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.");
        if !c.tools.is_empty() {
            out.push_str("\nCalls to these tools must go to the commentary channel: 'functions'.");
        }
        out.push_str("<|end|>");
    }
    if c.developer.is_some() || !c.tools.is_empty() {
        out.push_str("<|start|>developer<|message|>");
        if let Some(instr) = c.developer {
            out.push_str("# Instructions\n\n");
            out.push_str(instr);
        }
        if !c.tools.is_empty() {
            if c.developer.is_some() {
                out.push_str("\n\n");
            }
            out.push_str("# Tools\n\n## functions\n\nnamespace functions {\n\n");
            for tool in c.tools {
                render_tool(tool, &mut out);
            }
            out.push_str("} // namespace functions");
        }
        out.push_str("<|end|>");
    }
    let last_assistant_final = c
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "assistant")
        .is_some_and(|m| m.channel.as_deref() == Some("final"));
    let first_final = c
        .messages
        .iter()
        .position(|m| m.role == "assistant" && m.channel.as_deref() == Some("final"));
    for (i, m) in c.messages.iter().enumerate() {
        let analysis = m.role == "assistant" && m.channel.as_deref() == Some("analysis");
        if c.auto_drop_analysis
            && last_assistant_final
            && analysis
            && first_final.is_some_and(|f| i < f)
        {
            continue;
        }
        out.push_str("<|start|>");
        out.push_str(if m.role == "tool" {
            m.name.as_deref().unwrap_or("tool")
        } else {
            &m.role
        });
        if let Some(r) = &m.recipient {
            out.push_str(" to=");
            out.push_str(r);
        }
        if let Some(ch) = &m.channel {
            out.push_str("<|channel|>");
            out.push_str(ch);
        }
        if let Some(ct) = &m.content_type {
            out.push(' ');
            out.push_str(ct);
        }
        out.push_str("<|message|>");
        out.push_str(&m.content);
        let tool_call = m.role == "assistant" && m.recipient.is_some();
        out.push_str(if tool_call { "<|call|>" } else { "<|end|>" });
    }
    out.push_str("<|start|>assistant");
    out
}

/// `// description\ntype name = (_: {...}) => any;\n\n`, harmony's TypeScript-like signature.
fn render_tool(tool: &Value, out: &mut String) {
    let f = tool.get("function").unwrap_or(tool);
    if let Some(d) = f.get("description").and_then(Value::as_str) {
        out.push_str(&format!("// {d}\n"));
    }
    let name = f.get("name").and_then(Value::as_str).unwrap_or("tool");
    let props = f
        .pointer("/parameters/properties")
        .and_then(Value::as_object);
    match props {
        Some(props) if !props.is_empty() => {
            let required: Vec<&str> = f
                .pointer("/parameters/required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            out.push_str(&format!("type {name} = (_: {{\n"));
            for (p, schema) in props {
                if let Some(d) = schema.get("description").and_then(Value::as_str) {
                    out.push_str(&format!("// {d}\n"));
                }
                let opt = if required.contains(&p.as_str()) {
                    ""
                } else {
                    "?"
                };
                out.push_str(&format!("{p}{opt}: {},\n", ts_type(schema)));
            }
            out.push_str("}) => any;\n\n");
        }
        _ => out.push_str(&format!("type {name} = () => any;\n\n")),
    }
}

fn ts_type(schema: &Value) -> String {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" | ");
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => "string".into(),
        Some("number") | Some("integer") => "number".into(),
        Some("boolean") => "boolean".into(),
        Some("array") => format!("{}[]", schema.get("items").map_or("any".into(), ts_type)),
        _ => "any".into(),
    }
}

/// Ids of harmony's structural tokens in a tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HarmonyTokens {
    pub start: u32,
    pub end: u32,
    pub message: u32,
    pub channel: u32,
    pub ret: u32,
    pub call: u32,
}

impl HarmonyTokens {
    pub fn resolve(lookup: impl Fn(&str) -> Option<u32>) -> Option<Self> {
        Some(HarmonyTokens {
            start: lookup("<|start|>")?,
            end: lookup("<|end|>")?,
            message: lookup("<|message|>")?,
            channel: lookup("<|channel|>")?,
            ret: lookup("<|return|>")?,
            call: lookup("<|call|>")?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Analysis,
    Commentary,
    Final,
    /// A message addressed to a tool (`to=...`): a call, not text for the user.
    ToolCall,
    /// No or an unknown channel.
    Other,
}

/// What one generated token means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A token of the current message's content.
    Content { channel: Channel, id: u32 },
    /// The current message ended with `<|end|>`; another may follow.
    MessageEnd,
    /// Generation is over: `<|return|>`, `<|call|>`, or `<|end|>` after a final message.
    Stop { call: bool },
    /// Header or structural token.
    None,
}

/// The header of the message being parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub channel: String,
    pub recipient: Option<String>,
    pub content_type: Option<String>,
}

impl Header {
    /// What the message is for: a message addressed to a recipient is a tool call, whatever
    /// its channel.
    pub fn kind(&self) -> Channel {
        match (self.recipient.is_some(), self.channel.as_str()) {
            (true, _) => Channel::ToolCall,
            (_, "analysis") => Channel::Analysis,
            (_, "commentary") => Channel::Commentary,
            (_, "final") => Channel::Final,
            _ => Channel::Other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After `<|start|>`: the role (and maybe `to=recipient`), up to `<|channel|>`/`<|message|>`.
    Role,
    /// After `<|channel|>`: `name [to=recipient] [content type]`, up to `<|message|>`.
    Header,
    Content,
    Done,
}

/// The most tokens of a message header the parser keeps (role part and channel part each).
pub const HEADER_TOKENS: usize = 64;

/// Token-level streaming parser for the assistant's reply, starting right after the prompt's
/// trailing `<|start|>assistant`.
#[derive(Debug)]
pub struct Parser {
    tokens: HarmonyTokens,
    state: State,
    /// A header's tokens, in fixed-capacity buffers: real headers are a few tokens
    /// (`assistant to=functions.get_weather`, `commentary <|constrain|>json`); past
    /// [`HEADER_TOKENS`] the rest is dropped (such a header names no known channel anyway), so
    /// a model that never ends its header cannot grow them.
    role_ids: heapless::Vec<u32, HEADER_TOKENS>,
    header_ids: heapless::Vec<u32, HEADER_TOKENS>,
    header: Header,
    channel: Channel,
}

impl Parser {
    pub fn new(tokens: HarmonyTokens) -> Self {
        Parser {
            tokens,
            state: State::Role,
            role_ids: heapless::Vec::new(),
            header_ids: heapless::Vec::new(),
            header: Header::default(),
            channel: Channel::Other,
        }
    }

    /// The header of the current (or last) message.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The channel of the message whose content the next id continues, if a header was
    /// read and the message has not ended.
    pub fn content_channel(&self) -> Option<Channel> {
        (self.state == State::Content).then_some(self.channel)
    }

    /// Feeds one generated id. `decode` turns header ids into text, special tokens included.
    pub fn push(&mut self, id: u32, decode: &dyn Fn(&[u32]) -> String) -> Event {
        let t = self.tokens;
        if self.state == State::Done {
            return Event::None;
        }
        if id == t.ret || id == t.call {
            self.state = State::Done;
            return Event::Stop { call: id == t.call };
        }
        match self.state {
            State::Role | State::Header if id == t.message => {
                self.header = parse_header(&decode(&self.role_ids), &decode(&self.header_ids));
                self.channel = self.header.kind();
                self.state = State::Content;
                Event::None
            }
            State::Role if id == t.channel => {
                self.state = State::Header;
                Event::None
            }
            State::Role => {
                let _ = self.role_ids.push(id);
                Event::None
            }
            State::Header => {
                let _ = self.header_ids.push(id);
                Event::None
            }
            State::Content if id == t.end || id == t.start => {
                self.role_ids.clear();
                self.header_ids.clear();
                if self.channel == Channel::Final && id == t.end {
                    self.state = State::Done;
                    return Event::Stop { call: false };
                }
                self.state = State::Role;
                Event::MessageEnd
            }
            State::Content => Event::Content {
                channel: self.channel,
                id,
            },
            State::Done => Event::None,
        }
    }
}

/// `role_text` is what followed `<|start|>` (e.g. `assistant to=functions.f`), `channel_text`
/// what followed `<|channel|>` (e.g. `commentary to=functions.f <|constrain|>json`).
fn parse_header(role_text: &str, channel_text: &str) -> Header {
    let mut h = Header::default();
    let mut rest = Vec::new();
    for (i, word) in channel_text
        .split(' ')
        .filter(|w| !w.is_empty())
        .enumerate()
    {
        if i == 0 {
            h.channel = word.to_string();
        } else if let Some(r) = word.strip_prefix("to=") {
            h.recipient = Some(r.to_string());
        } else {
            rest.push(word);
        }
    }
    if let Some(r) = role_text.split(' ').find_map(|w| w.strip_prefix("to=")) {
        h.recipient = Some(r.to_string());
    }
    if !rest.is_empty() {
        h.content_type = Some(rest.join(" "));
    }
    h
}
