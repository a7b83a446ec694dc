#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/seeds/TARGET/) from the committed fixtures and a
few hand-made requests: valid inputs of each parser, so that libFuzzer starts from the formats'
real structure. Run once; the output is committed. Standard library only.

    python3 fuzz/make_seeds.py
"""
import hashlib
import json
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = ROOT / "fuzz" / "seeds"


def write(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
]
REQUESTS = {
    "chat": {"id": 7, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
    "prompt": {"prompt": "Once upon", "temperature": 0.7, "top_p": 0.9, "top_k": 40,
               "min_p": 0.05, "repetition_penalty": 1.1, "seed": 42, "stream": False},
    "stop": {"messages": [{"role": "user", "content": "Count"}], "stop": ["5", "\n\n"],
             "reply_to": "a/b", "reasoning_effort": "low"},
    "schema": {"messages": [{"role": "user", "content": "JSON"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}},
    "json_object": {"prompt": "x", "response_format": {"type": "json_object"}},
    "lark": {"prompt": "x", "grammar": {"type": "lark", "value": "start: \"yes\" | \"no\""}},
    "regex": {"prompt": "x", "grammar": {"type": "regex", "value": "[0-9]{3}"}},
    "tools": {"messages": HISTORY, "tools": TOOLS, "tool_choice": "auto",
              "parallel_tool_calls": False},
    "tool_named": {"messages": HISTORY[:2], "tools": TOOLS,
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
}
for name, req in REQUESTS.items():
    write("mqtt_request", name + ".json", json.dumps(req))
write("mqtt_request", "duplicate_key.json", '{"prompt": "a", "max_tokens": 1, "max_tokens": 2}')
write("mqtt_request", "not_object.json", "[1, 2]")

for name in ("chat", "tools", "stop"):
    req = REQUESTS[name]
    write("chat_template", name + ".json",
          json.dumps({"messages": req["messages"], "tools": req.get("tools")}))
write("chat_template", "reasoning.json", json.dumps({"messages": [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "adding"},
    {"role": "user", "content": "\u0001\u001f\u2028"}]}))


# D-Bus marshalling (little-endian) of Chat's arguments: a(ss) messages, a{sv} options.
class Buf:
    def __init__(self):
        self.b = bytearray()

    def pad(self, n):
        while len(self.b) % n:
            self.b.append(0)

    def u32(self, v):
        self.pad(4)
        self.b += struct.pack("<I", v)

    def string(self, s):
        e = s.encode()
        self.u32(len(e))
        self.b += e + b"\0"

    def sig(self, s):
        self.b.append(len(s))
        self.b += s.encode() + b"\0"

    def array(self, align, items, put):
        self.u32(0)
        at = len(self.b) - 4
        self.pad(align)
        start = len(self.b)
        for item in items:
            put(item)
        self.b[at:at + 4] = struct.pack("<I", len(self.b) - start)


def variant(buf, v):
    if isinstance(v, bool):
        buf.sig("b")
        buf.u32(int(v))
    elif isinstance(v, int):
        buf.sig("t")
        buf.pad(8)
        buf.b += struct.pack("<Q", v)
    elif isinstance(v, float):
        buf.sig("d")
        buf.pad(8)
        buf.b += struct.pack("<d", v)
    elif isinstance(v, str):
        buf.sig("s")
        buf.string(v)
    elif isinstance(v, list):
        buf.sig("as")
        buf.array(4, v, buf.string)
    else:
        raise TypeError(v)


def chat_args(messages, options):
    buf = Buf()

    def msg(m):
        buf.pad(8)
        buf.string(m[0])
        buf.string(m[1])

    def entry(kv):
        buf.pad(8)
        buf.string(kv[0])
        variant(buf, kv[1])

    buf.array(8, messages, msg)
    buf.array(8, list(options.items()), entry)
    return bytes(buf.b)


write("dbus_options", "plain", chat_args([("user", "Hi")], {}))
write("dbus_options", "sampling", chat_args([("system", "Be brief."), ("user", "Hi")], {
    "max_tokens": 16, "temperature": 0.5, "top_k": 20, "seed": 3, "stop": ["\n"]}))
write("dbus_options", "schema", chat_args([("user", "JSON")], {
    "response_format": json.dumps(REQUESTS["schema"]["response_format"])}))
write("dbus_options", "tools", chat_args([], {
    "messages": json.dumps(HISTORY), "tools": json.dumps(TOOLS), "tool_choice": "required"}))

# Harmony: 0 <|start|> 1 <|end|> 2 <|message|> 3 <|channel|> 4 <|return|> 5 <|call|>,
# 6 assistant, 7 " to=", 8 functions, 9 .get_weather, 10 analysis, 11 commentary, 12 final,
# 13 " <|constrain|>", 14 json, 15.. other pieces.
write("harmony_stream", "final", bytes([3, 10, 2, 30, 31, 1, 0, 6, 3, 12, 2, 32, 33, 4]))
write("harmony_stream", "call", bytes([3, 10, 2, 30, 1, 0, 6, 7, 8, 9, 3, 11, 13, 14, 2, 40, 5]))
write("harmony_stream", "end_final", bytes([3, 12, 2, 30, 31, 1]))

write("detokenizer", "ascii", struct.pack("<40H", *range(60, 100)))
write("detokenizer", "bytes", struct.pack("<40H", *range(3, 43)))
write("detokenizer", "high", struct.pack("<8H", 1000, 2000, 5000, 20000, 31999, 32000, 65535, 1))

genai = FIX / "genai-qwen2" / "package" / "genai_config.json"
cfg = genai.read_bytes()
write("package_config", "qwen2", cfg)
write("package_config", "qwen2_sums", cfg + b"\0" + hashlib.sha256(b"graph").hexdigest().encode()
      + b"  model.onnx\n")


def safetensors(tensors):
    header, data = {}, bytearray()
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + bytes(data)


st = safetensors({"a": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
                  "b": ("BF16", [3], b"\x80\x3f" * 3), "c": ("U8", [4], b"\x01\x02\x03\x04")})
write("safetensors", "single", st)
index = json.dumps({"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors"}})
write("safetensors", "sharded", index.encode() + b"\0" + st)

for arch in ("llama", "mistral", "phi3", "phi3-longrope", "qwen2", "qwen3", "gptoss"):
    ck = FIX / arch / "checkpoint"
    gen = ck / "generation_config.json"
    data = (ck / "config.json").read_bytes()
    if gen.exists():
        data += b"\0" + gen.read_bytes()
    write("hf_config", arch, data)

for name in ("q4_0", "spm_q8_0"):
    shutil.copyfile(FIX / "gguf" / name / "model.gguf", (OUT / "gguf").mkdir(
        parents=True, exist_ok=True) or OUT / "gguf" / name)
