//! Writing an ONNX model: [`GraphBuilder`] collects nodes and initializer *descriptions* while
//! the initializer bytes go straight to `model.onnx.data` through [`DataFile`], one tensor (or
//! one row chunk) at a time. `model.onnx` itself then holds only the graph.
//!
//! External-data layout: offsets are aligned to 64 bytes, and to 64 KiB for tensors of 1 MiB or
//! more, so ONNX Runtime can memory-map large initializers in place (as `onnx`'s
//! `convert_model_to_external_data(align_offset=True)` does).

pub mod proto;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use proto::{
    AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    TypeProtoTensor, ValueInfoProto, attribute_type, data_type,
};

use crate::error::{ExportError, Result};

pub const DATA_FILE: &str = "model.onnx.data";

/// The append-only external data file.
#[derive(Debug)]
pub struct DataFile {
    path: PathBuf,
    out: BufWriter<File>,
    offset: u64,
}

impl DataFile {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(ExportError::io(path))?;
        Ok(DataFile {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            offset: 0,
        })
    }

    fn align(&mut self, len: u64) -> Result<()> {
        let a: u64 = if len >= 1 << 20 { 1 << 16 } else { 64 };
        let pad = (a - self.offset % a) % a;
        if pad > 0 {
            self.out
                .write_all(&vec![0u8; pad as usize])
                .map_err(ExportError::io(&self.path))?;
            self.offset += pad;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(ExportError::io(&self.path))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.out.flush().map_err(ExportError::io(&self.path))?;
        let file = self.out.into_inner().map_err(|e| ExportError::Io {
            path: self.path.clone(),
            err: e.into_error(),
        })?;
        file.sync_all().map_err(ExportError::io(&self.path))?;
        Ok(())
    }
}

/// Something that can be appended to the data file.
pub trait Pod: Copy {
    const DATA_TYPE: i32;
    fn put(values: &[Self], out: &mut Vec<u8>);
}

impl Pod for f32 {
    const DATA_TYPE: i32 = data_type::FLOAT;
    fn put(values: &[Self], out: &mut Vec<u8>) {
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
}

impl Pod for u8 {
    const DATA_TYPE: i32 = data_type::UINT8;
    fn put(values: &[Self], out: &mut Vec<u8>) {
        out.extend_from_slice(values);
    }
}

impl Pod for i64 {
    const DATA_TYPE: i32 = data_type::INT64;
    fn put(values: &[Self], out: &mut Vec<u8>) {
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
}

/// An initializer being streamed into the data file: call [`TensorSink::put`] with consecutive
/// chunks in row-major order until `numel` values have been written.
#[derive(Debug)]
pub struct TensorSink<'a> {
    data: &'a mut DataFile,
    remaining: u64,
    scratch: Vec<u8>,
    name: String,
}

impl TensorSink<'_> {
    pub fn put<T: Pod>(&mut self, values: &[T]) -> Result<()> {
        self.scratch.clear();
        T::put(values, &mut self.scratch);
        if self.scratch.len() as u64 > self.remaining {
            return Err(ExportError::BadTensor {
                name: self.name.clone(),
                msg: "more data than its shape holds (exporter bug)".into(),
            });
        }
        self.remaining -= self.scratch.len() as u64;
        let scratch = std::mem::take(&mut self.scratch);
        self.data.write(&scratch)?;
        self.scratch = scratch;
        Ok(())
    }
}

/// Builds one graph. Node output names follow the genai builder: `{node_name}/output_{k}`.
#[derive(Debug)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    data: DataFile,
}

/// An ONNX attribute value.
#[derive(Debug, Clone)]
pub enum Attr {
    I(i64),
    F(f32),
    S(&'static str),
    Ints(Vec<i64>),
}

/// A dimension of a graph input or output.
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(i64),
    Named(&'static str),
}

impl GraphBuilder {
    pub fn new(data: DataFile) -> Self {
        GraphBuilder {
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            data,
        }
    }

    /// Adds a node and returns its output names (`n_outputs` of them; an empty output name
    /// in `outputs` is never produced, so callers pick the ones they use).
    pub fn node(
        &mut self,
        name: &str,
        op_type: &str,
        domain: &str,
        inputs: &[&str],
        n_outputs: usize,
        attrs: &[(&str, Attr)],
    ) -> Vec<String> {
        let output: Vec<String> = (0..n_outputs)
            .map(|k| format!("{name}/output_{k}"))
            .collect();
        self.node_named(name, op_type, domain, inputs, &output, attrs);
        output
    }

    /// Like [`GraphBuilder::node`] but with explicit output names (graph outputs such as
    /// `present.N.key` or `logits`).
    pub fn node_named(
        &mut self,
        name: &str,
        op_type: &str,
        domain: &str,
        inputs: &[&str],
        outputs: &[String],
        attrs: &[(&str, Attr)],
    ) {
        let attribute = attrs
            .iter()
            .map(|(n, a)| {
                let mut p = AttributeProto {
                    name: n.to_string(),
                    ..Default::default()
                };
                match a {
                    Attr::I(v) => {
                        p.i = *v;
                        p.r#type = attribute_type::INT;
                    }
                    Attr::F(v) => {
                        p.f = *v;
                        p.r#type = attribute_type::FLOAT;
                    }
                    Attr::S(v) => {
                        p.s = v.as_bytes().to_vec();
                        p.r#type = attribute_type::STRING;
                    }
                    Attr::Ints(v) => {
                        p.ints = v.clone();
                        p.r#type = attribute_type::INTS;
                    }
                }
                p
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.to_vec(),
            name: name.to_string(),
            op_type: op_type.to_string(),
            attribute,
            domain: domain.to_string(),
        });
    }

    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim]) {
        self.inputs.push(value_info(name, elem_type, dims));
    }

    pub fn output(&mut self, name: &str, elem_type: i32, dims: &[Dim]) {
        self.outputs.push(value_info(name, elem_type, dims));
    }

    /// A small constant stored inline in the graph (shapes, axes, scalars).
    pub fn constant_i64(&mut self, name: &str, dims: &[i64], values: &[i64]) -> String {
        let mut raw = Vec::new();
        i64::put(values, &mut raw);
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: data_type::INT64,
            name: name.to_string(),
            raw_data: raw,
            ..Default::default()
        });
        name.to_string()
    }

    /// Streams an external initializer: `fill` receives a sink and must write exactly
    /// `product(dims)` values of type `T`.
    pub fn tensor<T: Pod>(
        &mut self,
        name: &str,
        dims: &[usize],
        fill: impl FnOnce(&mut TensorSink<'_>) -> Result<()>,
    ) -> Result<String> {
        let numel: u64 = dims.iter().map(|&d| d as u64).product();
        let len = numel * std::mem::size_of::<T>() as u64;
        self.data.align(len)?;
        let offset = self.data.offset;
        let mut sink = TensorSink {
            data: &mut self.data,
            remaining: len,
            scratch: Vec::new(),
            name: name.to_string(),
        };
        fill(&mut sink)?;
        if sink.remaining != 0 {
            return Err(ExportError::BadTensor {
                name: name.to_string(),
                msg: format!(
                    "{} bytes short of its shape {dims:?} (exporter bug)",
                    sink.remaining
                ),
            });
        }
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: k.to_string(),
            value: v,
        };
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: T::DATA_TYPE,
            name: name.to_string(),
            external_data: vec![
                entry("location", DATA_FILE.to_string()),
                entry("offset", offset.to_string()),
                entry("length", len.to_string()),
            ],
            data_location: 1,
            ..Default::default()
        });
        Ok(name.to_string())
    }

    /// An external initializer from values already in memory.
    pub fn tensor_from<T: Pod>(
        &mut self,
        name: &str,
        dims: &[usize],
        values: &[T],
    ) -> Result<String> {
        self.tensor::<T>(name, dims, |s| s.put(values))
    }

    /// Serializes `model.onnx` and closes the data file.
    pub fn finish(self, graph_name: &str, model_path: &Path, producer_version: &str) -> Result<()> {
        let graph = GraphProto {
            node: self.nodes,
            name: graph_name.to_string(),
            initializer: self.initializers,
            input: self.inputs,
            output: self.outputs,
        };
        let model = ModelProto {
            // IR 10: what the genai builder writes; ORT 1.31 accepts at most 13.
            ir_version: 10,
            producer_name: "edgellm-export".into(),
            producer_version: producer_version.to_string(),
            graph: Some(graph),
            opset_import: vec![
                OperatorSetIdProto {
                    domain: String::new(),
                    version: 21,
                },
                OperatorSetIdProto {
                    domain: "com.microsoft".into(),
                    version: 1,
                },
            ],
            ..Default::default()
        };
        self.data.finish()?;
        let bytes = prost::Message::encode_to_vec(&model);
        let mut f = File::create(model_path).map_err(ExportError::io(model_path))?;
        f.write_all(&bytes).map_err(ExportError::io(model_path))?;
        f.sync_all().map_err(ExportError::io(model_path))?;
        Ok(())
    }
}

fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Dim::Fixed(v) => DimensionValue::DimValue(*v),
                                Dim::Named(s) => DimensionValue::DimParam(s.to_string()),
                            }),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}
