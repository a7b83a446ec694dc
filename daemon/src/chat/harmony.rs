//! OpenAI's harmony format (gpt-oss): rendering a conversation for completion, and a streaming
//! parser that splits what the model writes into channels.
//!
//! Rendered prompt (one line per message here; the text has no newlines between messages):
//! ```text
//! <|start|>system<|message|>{identity}\nKnowledge cutoff: 2024-06\nCurrent date: D\n\nReasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
//! <|start|>developer<|message|># Instructions\n\n{system/developer messages}<|end|>
//! <|start|>user<|message|>{text}<|end|>
//! <|start|>assistant<|channel|>final<|message|>{text}<|end|>
//! <|start|>assistant
//! ```
//! A `system` or `developer` message of the request becomes the developer instructions (the
//! harmony system message carries identity, dates and reasoning effort), as in gpt-oss's chat
//! template. The model answers `<|channel|>analysis<|message|>...<|end|><|start|>assistant
//! <|channel|>final<|message|>...<|return|>` (or `<|call|>` for a tool call).

use super::{ChatError, Message};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// The parameters of the harmony system message.
#[derive(Debug, Clone)]
pub struct SystemOptions {
    pub model_identity: String,
    pub knowledge_cutoff: String,
    /// `YYYY-MM-DD`; `None` omits the line.
    pub current_date: Option<String>,
    pub reasoning_effort: ReasoningEffort,
}

impl Default for SystemOptions {
    fn default() -> Self {
        SystemOptions {
            model_identity: "You are ChatGPT, a large language model trained by OpenAI.".into(),
            knowledge_cutoff: "2024-06".into(),
            current_date: None,
            reasoning_effort: ReasoningEffort::Medium,
        }
    }
}

/// Renders `messages` for completion (ending with `<|start|>assistant`).
pub fn render(messages: &[Message], sys: &SystemOptions) -> Result<String, ChatError> {
    let mut out = String::new();
    out.push_str("<|start|>system<|message|>");
    out.push_str(&sys.model_identity);
    out.push_str("\nKnowledge cutoff: ");
    out.push_str(&sys.knowledge_cutoff);
    if let Some(date) = &sys.current_date {
        out.push_str("\nCurrent date: ");
        out.push_str(date);
    }
    out.push_str("\n\nReasoning: ");
    out.push_str(sys.reasoning_effort.as_str());
    out.push_str("\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>");

    let instructions: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == "system" || m.role == "developer")
        .map(|m| m.content.as_str())
        .collect();
    if !instructions.is_empty() {
        out.push_str("<|start|>developer<|message|># Instructions\n\n");
        out.push_str(&instructions.join("\n\n"));
        out.push_str("<|end|>");
    }
    for m in messages {
        match m.role.as_str() {
            "system" | "developer" => {}
            "user" => {
                out.push_str("<|start|>user<|message|>");
                out.push_str(&m.content);
                out.push_str("<|end|>");
            }
            "assistant" => {
                out.push_str("<|start|>assistant<|channel|>final<|message|>");
                out.push_str(&m.content);
                out.push_str("<|end|>");
            }
            other => {
                return Err(ChatError::Render(format!(
                    "role {other:?} is not supported in harmony conversations (system, developer, user, assistant)"
                )));
            }
        }
    }
    out.push_str("<|start|>assistant");
    Ok(out)
}

/// Ids of harmony's structural tokens in a tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct HarmonyTokens {
    pub start: u32,
    pub end: u32,
    pub message: u32,
    pub channel: u32,
    pub ret: u32,
    pub call: u32,
    pub constrain: Option<u32>,
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
            constrain: lookup("<|constrain|>"),
        })
    }
}

/// What one generated token means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A token of the current message's content, in `channel`.
    Content { channel: Channel, id: u32 },
    /// The current message ended (`<|end|>`); another may follow.
    MessageEnd,
    /// Generation is over: `<|return|>` (answer complete) or `<|call|>` (tool call).
    Stop { call: bool },
    /// Header or structural token: nothing to show.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Analysis,
    Commentary,
    Final,
    /// A message with no or an unknown channel.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After `<|start|>`: the role, up to `<|channel|>` or `<|message|>`.
    Role,
    /// After `<|channel|>`: the channel name (and recipient/constraint), up to `<|message|>`.
    Header,
    Content,
    Done,
}

/// Token-level streaming parser for the assistant's reply. Starts right after the prompt's
/// trailing `<|start|>assistant`.
#[derive(Debug)]
pub struct Parser {
    tokens: HarmonyTokens,
    state: State,
    header: Vec<u32>,
    channel: Channel,
}

fn channel_from_header(ids: &[u32], decode: &dyn Fn(&[u32]) -> String) -> Channel {
    let text = decode(ids);
    match text.split_whitespace().next().unwrap_or("") {
        "analysis" => Channel::Analysis,
        "commentary" => Channel::Commentary,
        "final" => Channel::Final,
        _ => Channel::Other,
    }
}

impl Parser {
    pub fn new(tokens: HarmonyTokens) -> Self {
        Parser {
            tokens,
            state: State::Role,
            header: Vec::new(),
            channel: Channel::Other,
        }
    }

    /// Feeds one generated id. `decode` turns header ids into text.
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
            State::Role => {
                if id == t.channel {
                    self.state = State::Header;
                    self.header.clear();
                } else if id == t.message {
                    self.channel = Channel::Other;
                    self.state = State::Content;
                }
                Event::None
            }
            State::Header => {
                if id == t.message {
                    self.channel = channel_from_header(&self.header, decode);
                    self.state = State::Content;
                } else {
                    self.header.push(id);
                }
                Event::None
            }
            State::Content => {
                if id == t.end {
                    self.state = State::Role;
                    Event::MessageEnd
                } else if id == t.start {
                    // A new message without <|end|>: tolerate it.
                    self.state = State::Role;
                    Event::MessageEnd
                } else {
                    Event::Content {
                        channel: self.channel,
                        id,
                    }
                }
            }
            State::Done => Event::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_system_developer_user_and_generation_prompt() {
        let sys = SystemOptions {
            current_date: Some("2025-06-28".into()),
            reasoning_effort: ReasoningEffort::High,
            ..SystemOptions::default()
        };
        let out = render(&[msg("system", "Be brief."), msg("user", "Hi")], &sys).unwrap();
        assert_eq!(
            out,
            "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n\
             Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: high\n\n\
             # Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>\
             <|start|>developer<|message|># Instructions\n\nBe brief.<|end|>\
             <|start|>user<|message|>Hi<|end|><|start|>assistant"
        );
    }

    #[test]
    fn parser_splits_analysis_and_final_and_stops_on_return() {
        let t = HarmonyTokens {
            start: 1,
            end: 2,
            message: 3,
            channel: 4,
            ret: 5,
            call: 6,
            constrain: None,
        };
        // ids >= 100 are text; header text "analysis" = [100], "final" = [101]
        let decode = |ids: &[u32]| -> String {
            ids.iter()
                .map(|&i| if i == 100 { "analysis" } else { "final" })
                .collect()
        };
        let mut p = Parser::new(t);
        let stream = [4, 100, 3, 200, 201, 2, 1, 7, 4, 101, 3, 300, 5];
        let events: Vec<Event> = stream.iter().map(|&id| p.push(id, &decode)).collect();
        let analysis: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                Event::Content {
                    channel: Channel::Analysis,
                    id,
                } => Some(*id),
                _ => None,
            })
            .collect();
        let fin: Vec<u32> = events
            .iter()
            .filter_map(|e| match e {
                Event::Content {
                    channel: Channel::Final,
                    id,
                } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(analysis, vec![200, 201]);
        assert_eq!(fin, vec![300]);
        assert_eq!(events.last(), Some(&Event::Stop { call: false }));
    }
}
