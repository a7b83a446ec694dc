//! Test support for the backend's own operators: a one-node ONNX model written to a temporary
//! folder by the exporter's writer (initializers in `model.onnx.data`, as packages store them),
//! then run through [`super::read_graph`] (our op register, as the backend loads a package) and,
//! with the `ort` feature and a library found, through ONNX Runtime.

use std::path::PathBuf;

use edgellm_export::onnx::proto::data_type;
use edgellm_export::onnx::{Attr, DATA_FILE, DataFile, Dim, GraphBuilder};
use tract_onnx::prelude::*;

/// The graph input `x`.
#[derive(Debug, Clone)]
pub enum Input {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

impl Input {
    fn shape(&self) -> &[usize] {
        match self {
            Input::F32(s, _) | Input::I64(s, _) => s,
        }
    }

    fn tensor(&self) -> Tensor {
        match self {
            Input::F32(s, v) => Tensor::from_shape(s, v),
            Input::I64(s, v) => Tensor::from_shape(s, v),
        }
        .expect("input values match their shape")
    }
}

/// An initializer input of the node.
#[derive(Debug, Clone)]
pub enum Init {
    F32(Vec<usize>, Vec<f32>),
    U8(Vec<usize>, Vec<u8>),
    /// `[shape]` int64, written inline (Reshape's shape input).
    I64(Vec<i64>),
}

/// Inputs of a node in a model being built: the graph input, an initializer, another node's
/// output, or an omitted optional input.
#[derive(Debug, Clone)]
pub enum Arg {
    X,
    Init(Init),
    Node(usize),
    /// The same value as input `.1` of node `.0` (an initializer two nodes share).
    Same(usize, usize),
    None,
}

/// One node of a model: com.microsoft when `ms`.
#[derive(Debug, Clone)]
pub struct Node {
    pub op: &'static str,
    pub ms: bool,
    pub args: Vec<Arg>,
    pub attrs: Vec<(&'static str, Attr)>,
}

/// A model on disk: `nodes` in order, the graph input `x`, the last node's output `y` of rank
/// `out_rank`.
pub struct Model {
    dir: tempfile::TempDir,
}

impl Model {
    pub fn new(input: &Input, nodes: &[Node], out_rank: usize) -> Model {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let data = DataFile::create(&dir.path().join(DATA_FILE)).expect("the data file");
        let mut g = GraphBuilder::new(data);
        let elem = match input {
            Input::F32(..) => data_type::FLOAT,
            Input::I64(..) => data_type::INT64,
        };
        let dims: Vec<Dim> = input
            .shape()
            .iter()
            .map(|&d| Dim::Fixed(d as i64))
            .collect();
        g.input("x", elem, &dims);
        let mut outputs: Vec<String> = Vec::new();
        let mut node_inputs: Vec<Vec<String>> = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let mut names = Vec::new();
            for (j, arg) in node.args.iter().enumerate() {
                let name = format!("n{i}_in{j}");
                names.push(match arg {
                    Arg::X => "x".to_string(),
                    Arg::None => String::new(),
                    Arg::Node(k) => outputs[*k].clone(),
                    Arg::Same(k, j) => node_inputs[*k][*j].clone(),
                    Arg::Init(Init::F32(s, v)) => g.tensor_from(&name, s, v).expect("written"),
                    Arg::Init(Init::U8(s, v)) => g.tensor_from(&name, s, v).expect("written"),
                    Arg::Init(Init::I64(v)) => g.constant_i64(&name, &[v.len() as i64], v),
                });
            }
            let inputs: Vec<&str> = names.iter().map(String::as_str).collect();
            let last = i + 1 == nodes.len();
            let out = if last {
                "y".to_string()
            } else {
                format!("n{i}_out")
            };
            let domain = if node.ms { "com.microsoft" } else { "" };
            g.node_named(
                &format!("n{i}"),
                node.op,
                domain,
                &inputs,
                std::slice::from_ref(&out),
                &node.attrs,
            );
            outputs.push(out);
            node_inputs.push(names);
        }
        let out_dims: Vec<Dim> = (0..out_rank).map(|_| Dim::Named("d")).collect();
        g.output("y", data_type::FLOAT, &out_dims);
        g.finish("test", &dir.path().join("model.onnx"), "test")
            .expect("the model is written");
        Model { dir }
    }

    /// A single node reading `args`.
    pub fn one(
        op: &'static str,
        args: Vec<Arg>,
        attrs: Vec<(&'static str, Attr)>,
        input: &Input,
        out_rank: usize,
    ) -> Model {
        let node = Node {
            op,
            ms: true,
            args,
            attrs,
        };
        Model::new(input, &[node], out_rank)
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("model.onnx")
    }

    /// The optimized plan, as the backend builds it (with the input's concrete shape).
    pub fn tract_state(&self, input: &Input) -> TractResult<TypedSimpleState> {
        let mut model = super::read_graph(&self.path())?;
        let fact: InferenceFact = match input {
            Input::F32(s, _) => f32::fact(s).into(),
            Input::I64(s, _) => i64::fact(s).into(),
        };
        model.set_input_fact(0, fact)?;
        let plan = model.into_optimized()?.into_runnable()?;
        TypedSimpleState::new(&plan)
    }

    /// `y` through ONNX Runtime (one intra-op thread); `None` without a library.
    #[cfg(feature = "ort")]
    pub fn run_ort(&self, input: &Input) -> Option<Vec<f32>> {
        use ::ort::session::Session;
        use ::ort::value::Tensor as OrtTensor;
        let env = ort_env()?;
        let mut session = Session::builder(env)
            .expect("a session builder")
            .with_intra_threads(1)
            .expect("one thread")
            .commit_from_file(self.path())
            .expect("ONNX Runtime loads the model");
        let outputs = match input {
            Input::F32(s, v) => session.run(::ort::inputs![
                "x" => OrtTensor::from_array((s.clone(), v.clone())).expect("x")
            ]),
            Input::I64(s, v) => session.run(::ort::inputs![
                "x" => OrtTensor::from_array((s.clone(), v.clone())).expect("x")
            ]),
        }
        .expect("ONNX Runtime runs the model");
        let (_, y) = outputs["y"]
            .try_extract_tensor::<f32>()
            .expect("an f32 output");
        Some(y.to_vec())
    }
}

/// Runs a plan built by [`Model::tract_state`].
pub fn run_state(state: &mut TypedSimpleState, input: &Input) -> TractResult<Vec<f32>> {
    let out = state.run(tvec![input.tensor().into()])?;
    Ok(out[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
}

/// What a test says when ONNX Runtime cannot be loaded: a failure, never a skip.
#[cfg(feature = "ort")]
pub const NO_ORT: &str =
    "no usable ONNX Runtime library (scripts/test.sh fetches one and sets ORT_DYLIB_PATH)";

/// The process's ONNX Runtime environment for tests (ONNX Runtime allows one per process), from
/// the places the backend looks; `None` when no library loads.
#[cfg(feature = "ort")]
fn ort_env() -> Option<&'static ::ort::environment::Environment> {
    static ENV: std::sync::OnceLock<Option<::ort::environment::Environment>> =
        std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let lib = crate::backend::ort_library_candidates(None)
            .into_iter()
            .find(|p| p.exists())?;
        let env = ::ort::init_from(&lib)
            .ok()?
            .with_name("edgellm-tests")
            .build();
        match env {
            Ok(env) => Some(env),
            Err(e) => {
                eprintln!("ONNX Runtime from {}: {e}", lib.display());
                None
            }
        }
    })
    .as_ref()
}

/// A small deterministic generator (xorshift64*), so tests need no extra crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn u8(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    pub fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    pub fn u8s(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}
