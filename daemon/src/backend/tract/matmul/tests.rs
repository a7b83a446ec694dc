//! [`super`]'s tests: every layout through a one-node graph against an f64 reference (and ONNX
//! Runtime when a library is found), and a timing of each layout. The kernels against each
//! other: the `edgellm-kernels` crate's tests.

use edgellm_export::onnx::Attr;

use super::super::test_graph::{Arg, Init, Input, Model, Rng, run_state};

/// A MatMulNBits layout and its random contents.
struct Case {
    k: usize,
    n: usize,
    /// Leading dimensions of A (its shape is `[lead.., K]`).
    lead: Vec<usize>,
    bits: usize,
    block: usize,
    /// `[N, ceil(K/block), block*bits/8]`.
    b: Vec<u8>,
    scales: Vec<f32>,
    zero_points: Option<Zp>,
    bias: Option<Vec<f32>>,
    a: Vec<f32>,
    /// Whether ONNX Runtime runs the layout (checked against it when a library is found).
    #[cfg_attr(not(feature = "ort"), allow(dead_code))]
    ort: bool,
}

/// Zero points as the graph stores them.
#[derive(Clone)]
enum Zp {
    /// uint8 `[N, ceil(blocks*bits/8)]`, packed like B.
    Packed(Vec<u8>),
    /// f32 `[N, blocks]`.
    Float(Vec<f32>),
}

impl Case {
    fn new(seed: u64, lead: &[usize], k: usize, n: usize, bits: usize, block: usize) -> Case {
        let mut rng = Rng::new(seed);
        let blocks = k.div_ceil(block);
        let m: usize = lead.iter().product();
        // Signed scales of different magnitudes (0.001..0.02).
        let scales = (0..n * blocks)
            .map(|_| {
                let s = rng.f32();
                s.signum() * (0.001 + 0.019 * s.abs())
            })
            .collect();
        Case {
            k,
            n,
            lead: lead.to_vec(),
            bits,
            block,
            b: rng.u8s(n * blocks * block * bits / 8),
            scales,
            zero_points: None,
            bias: None,
            a: rng.f32s(m * k),
            ort: true,
        }
    }

    fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Random packed zero points.
    fn with_zero_points(mut self, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let per_row = (self.blocks() * self.bits).div_ceil(8);
        self.zero_points = Some(Zp::Packed(rng.u8s(self.n * per_row)));
        self
    }

    /// Random float zero points in [0, 2^bits).
    fn with_float_zero_points(mut self, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let top = (1 << self.bits) as f32;
        let z = (0..self.n * self.blocks())
            .map(|_| (rng.f32() + 1.0) / 2.0 * top)
            .collect();
        self.zero_points = Some(Zp::Float(z));
        self
    }

    fn with_bias(mut self, seed: u64) -> Case {
        self.bias = Some(Rng::new(seed).f32s(self.n));
        self
    }

    fn m(&self) -> usize {
        self.a.len() / self.k
    }

    fn input(&self) -> Input {
        let mut shape = self.lead.clone();
        shape.push(self.k);
        Input::F32(shape, self.a.clone())
    }

    fn model(&self, accuracy_level: i64) -> Model {
        let (n, k, blocks) = (self.n, self.k, self.blocks());
        let mut args = vec![
            Arg::X,
            Arg::Init(Init::U8(
                vec![n, blocks, self.block * self.bits / 8],
                self.b.clone(),
            )),
            Arg::Init(Init::F32(vec![n, blocks], self.scales.clone())),
        ];
        if self.zero_points.is_some() || self.bias.is_some() {
            args.push(match &self.zero_points {
                Some(Zp::Packed(z)) => Arg::Init(Init::U8(vec![n, z.len() / n], z.clone())),
                Some(Zp::Float(z)) => Arg::Init(Init::F32(vec![n, blocks], z.clone())),
                None => Arg::None,
            });
        }
        if let Some(bias) = &self.bias {
            args.push(Arg::None);
            args.push(Arg::Init(Init::F32(vec![n], bias.clone())));
        }
        Model::one(
            "MatMulNBits",
            args,
            vec![
                ("K", Attr::I(k as i64)),
                ("N", Attr::I(n as i64)),
                ("bits", Attr::I(self.bits as i64)),
                ("block_size", Attr::I(self.block as i64)),
                ("accuracy_level", Attr::I(accuracy_level)),
            ],
            &self.input(),
            self.lead.len() + 1,
        )
    }

    /// The code and zero point of weight `[n, k]`, read the way ONNX Runtime's
    /// `MlasDequantizeBlockwise` reads them.
    fn code_zp(&self, n: usize, k: usize) -> (f64, f64) {
        let blocks = self.blocks();
        let b = k / self.block;
        let row = &self.b[n * blocks * self.block * self.bits / 8..];
        let code = match self.bits {
            4 => (row[k / 2] >> (4 * (k % 2))) & 0x0f,
            _ => row[k],
        };
        let zp = match &self.zero_points {
            None => (1 << (self.bits - 1)) as f64,
            Some(Zp::Packed(z)) => {
                let per_row = z.len() / self.n;
                (match self.bits {
                    4 => (z[n * per_row + b / 2] >> (4 * (b % 2))) & 0x0f,
                    _ => z[n * per_row + b],
                }) as f64
            }
            Some(Zp::Float(z)) => z[n * blocks + b] as f64,
        };
        (code as f64, zp)
    }

    /// `w[n, k]` dequantized.
    fn weight(&self, n: usize, k: usize) -> f64 {
        let (code, zp) = self.code_zp(n, k);
        self.scales[n * self.blocks() + k / self.block] as f64 * (code - zp)
    }

    /// A's rows quantized as the kernel does (per `chunk` values from 0, round to nearest;
    /// the kernel's chunk is 32), dequantized, and each value's quantization step.
    fn quantized_a(&self, chunk: usize) -> (Vec<f64>, Vec<f64>) {
        let mut out = Vec::with_capacity(self.a.len());
        let mut step = Vec::with_capacity(self.a.len());
        for row in self.a.chunks(self.k) {
            for xs in row.chunks(chunk) {
                let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = max / 127.0;
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                for &x in xs {
                    out.push(s as f64 * (x * inv).round() as f64);
                    step.push(s as f64);
                }
            }
        }
        (out, step)
    }

    /// `A @ W^T + bias` in f64 over `a`, with the sum of `|a w|` and of `|a| * s * (|code| +
    /// |zp|)` (what f32 rounding inside the kernel scales with) per output.
    fn reference(&self, a: &[f64]) -> Vec<(f64, f64)> {
        let (k, n) = (self.k, self.n);
        let mut out = Vec::new();
        for row in a.chunks(k) {
            for j in 0..n {
                let (mut y, mut mag) = (0f64, 0f64);
                for (i, &x) in row.iter().enumerate() {
                    let (code, zp) = self.code_zp(j, i);
                    let s = self.scales[j * self.blocks() + i / self.block] as f64;
                    y += x * s * (code - zp);
                    mag += (x * s).abs() * (code + zp.abs());
                }
                y += self.bias.as_ref().map_or(0.0, |b| b[j] as f64);
                out.push((y, mag));
            }
        }
        out
    }

    /// How far rounding row `m` of A to `step`s can move `y[m, j]`: rounding to a multiple
    /// of s moves a value by at most s/2, so y by at most `sum_k |w[j, k]| s_k / 2`.
    fn int8_bound(&self, m: usize, j: usize, step: &[f64]) -> f64 {
        (0..self.k)
            .map(|kk| self.weight(j, kk).abs() * step[m * self.k + kk] / 2.0)
            .sum()
    }

    /// Runs the case through tract (checking our kernel took it) and checks it against
    /// the references; returns tract's output.
    fn check(&self) -> Vec<f32> {
        let model = self.model(4);
        let input = self.input();
        let mut state = model.tract_state(&input).unwrap();
        let ops: Vec<String> = state
            .model()
            .nodes()
            .iter()
            .map(|n| n.op().name().to_string())
            .collect();
        assert!(
            ops.iter().any(|o| o == "EdgellmMatMulNBits"),
            "our kernel runs the layout, not {ops:?}"
        );
        let y = run_state(&mut state, &input).unwrap();
        assert_eq!(y.len(), self.m() * self.n);
        let (aq, step) = self.quantized_a(32);
        let exact_a: Vec<f64> = self.a.iter().map(|&x| x as f64).collect();
        let same_quant = self.reference(&aq);
        let exact = self.reference(&exact_a);
        let mut worst = 0f64;
        for (i, ((&y, &(yq, mag)), &(ye, _))) in y.iter().zip(&same_quant).zip(&exact).enumerate() {
            let (m, j) = (i / self.n, i % self.n);
            // 1. The same activation quantization in f64: only the kernel's f32 rounding
            //    (exact i32 dot products, then a few hundred f32 multiply-adds at most)
            //    separates them.
            let tol = 1e-6 + 2e-6 * mag;
            assert!(
                (y as f64 - yq).abs() <= tol,
                "y[{m}, {j}] = {y}, reference with the same int8 activations {yq} (tolerance {tol})"
            );
            // 2. Exact f32 activations: rounding a to a multiple of its sub-block's step s
            //    moves it by at most s/2, so y moves by at most sum_k |w[j, k]| s_k / 2.
            let bound = self.int8_bound(m, j, &step) + tol;
            assert!(
                (y as f64 - ye).abs() <= bound,
                "y[{m}, {j}] = {y}, exact {ye}: error over the int8 bound {bound}"
            );
            worst = worst.max((y as f64 - ye).abs() / bound);
        }
        eprintln!(
            "bits {} block {} K {} N {} M {} zp {}: worst error {:.2} of the int8 bound",
            self.bits,
            self.block,
            self.k,
            self.n,
            self.m(),
            self.zero_points.is_some(),
            worst
        );
        // 3. accuracy_level 0: f32 activations against dequantized rows, like ONNX Runtime's
        //    level 0: the exact reference up to f32 summation.
        let y0 = run_state(&mut self.model(0).tract_state(&input).unwrap(), &input).unwrap();
        for (i, (&y0, &(ye, mag))) in y0.iter().zip(&exact).enumerate() {
            let tol = 1e-5 + 1e-5 * mag;
            assert!(
                (y0 as f64 - ye).abs() <= tol,
                "f32 activations: y[{i}] = {y0}, reference {ye} (tolerance {tol})"
            );
        }
        #[cfg(feature = "ort")]
        if self.ort {
            self.check_ort(&y, &exact);
        }
        y
    }

    /// ONNX Runtime on the same model: with f32 activations (`accuracy_level` 0) it
    /// dequantizes the weights and multiplies in f32, so it must match the f64 reference
    /// closely; that pins the layout and zero-point reading of [`Case::code_zp`] to ONNX
    /// Runtime's. With int8 activations (level 4) it is within both int8 bounds of ours.
    #[cfg(feature = "ort")]
    fn check_ort(&self, y: &[f32], exact: &[(f64, f64)]) {
        let input = self.input();
        let ort0 = self
            .model(0)
            .run_ort(&input)
            .expect("ONNX Runtime runs the model (scripts/test.sh sets ORT_DYLIB_PATH)");
        let ort4 = self
            .model(4)
            .run_ort(&input)
            .expect("ONNX Runtime runs int8 activations too");
        // ONNX Runtime's int8 path quantizes A per weight block.
        let (_, ours) = self.quantized_a(32);
        let (_, theirs) = self.quantized_a(self.block);
        let (mut diff0, mut diff4, mut norm) = (0f64, 0f64, 0f64);
        for (i, (&(ye, mag), (&o0, &o4))) in exact.iter().zip(ort0.iter().zip(&ort4)).enumerate() {
            let tol = 1e-5 + 1e-5 * mag;
            assert!(
                (o0 as f64 - ye).abs() <= tol,
                "ONNX Runtime (f32 activations) y[{i}] = {o0}, reference {ye}"
            );
            let (m, j) = (i / self.n, i % self.n);
            let bound = self.int8_bound(m, j, &ours) + self.int8_bound(m, j, &theirs) + tol;
            assert!(
                (o4 - y[i]).abs() as f64 <= bound,
                "ONNX Runtime (int8 activations) y[{i}] = {o4}, tract {}: over both int8 bounds {bound}",
                y[i]
            );
            diff0 = diff0.max((o0 - y[i]).abs() as f64);
            diff4 = diff4.max((o4 - y[i]).abs() as f64);
            norm = norm.max(ye.abs());
        }
        eprintln!(
            "  vs ONNX Runtime: max |tract - ort| {diff0:.2e} (ort f32 activations), {diff4:.2e} (ort int8 activations), max |y| {norm:.2e}"
        );
    }
}

#[test]
fn int4_block32_default_zero_point() {
    Case::new(1, &[3], 64, 70, 4, 32).check();
    Case::new(2, &[1], 32, 1, 4, 32).check();
}

#[test]
fn int4_block32_packed_zero_points_odd_block_count() {
    Case::new(3, &[2], 96, 70, 4, 32)
        .with_zero_points(4)
        .check();
}

#[test]
fn int4_block16_default_and_packed_zero_points() {
    // One block (a half sub-block only), an odd count (a trailing half), an even count.
    for (i, k) in [16, 48, 64].into_iter().enumerate() {
        let seed = 10 + 2 * i as u64;
        Case::new(seed, &[3], k, 67, 4, 16).check();
        Case::new(seed + 1, &[2], k, 67, 4, 16)
            .with_zero_points(seed)
            .check();
    }
}

#[test]
fn int4_large_blocks_and_k_not_a_multiple_of_the_block() {
    Case::new(20, &[2], 256, 66, 4, 128).check();
    Case::new(21, &[2], 256, 66, 4, 256)
        .with_zero_points(22)
        .check();
    // K = 96 in blocks of 64: the second block is half padding.
    Case::new(23, &[2], 96, 66, 4, 64)
        .with_zero_points(24)
        .check();
}

#[test]
fn int8_block32_default_and_explicit_zero_points() {
    Case::new(30, &[3], 32, 70, 8, 32).check();
    Case::new(31, &[3], 96, 70, 8, 32).check();
    Case::new(32, &[2], 96, 70, 8, 32)
        .with_zero_points(33)
        .check();
}

#[test]
fn int8_block16_default_and_explicit_zero_points() {
    for (i, k) in [16, 48, 64, 80].into_iter().enumerate() {
        let seed = 40 + 2 * i as u64;
        Case::new(seed, &[3], k, 67, 8, 16).check();
        Case::new(seed + 1, &[2], k, 67, 8, 16)
            .with_zero_points(seed)
            .check();
    }
}

#[test]
fn int8_large_blocks_bias_and_rank3_input() {
    Case::new(50, &[1, 3], 256, 65, 8, 128)
        .with_bias(51)
        .check();
    Case::new(52, &[2], 512, 65, 8, 256)
        .with_zero_points(53)
        .check();
    Case::new(54, &[2], 80, 65, 8, 64)
        .with_zero_points(55)
        .with_bias(56)
        .check();
    Case::new(57, &[1, 2], 48, 65, 4, 16).with_bias(58).check();
}

#[test]
fn explicit_default_zero_points_change_nothing() {
    for (bits, block, k) in [(4, 32, 96), (4, 16, 48), (8, 32, 64), (8, 16, 48)] {
        let mut case = Case::new(60, &[2], k, 66, bits, block);
        let plain = case.check();
        let per_row = (case.blocks() * bits).div_ceil(8);
        let default = if bits == 4 { 0x88 } else { 0x80 };
        case.zero_points = Some(Zp::Packed(vec![default; case.n * per_row]));
        assert_eq!(case.check(), plain, "bits {bits} block {block}");
    }
}

#[test]
fn float_zero_points() {
    Case::new(80, &[2], 96, 66, 4, 32)
        .with_float_zero_points(81)
        .check();
    Case::new(82, &[3], 48, 66, 4, 16)
        .with_float_zero_points(83)
        .check();
    // ONNX Runtime has no 8-bit float zero points (it dequantizes those only for 4 bits).
    let mut case = Case::new(84, &[2], 64, 66, 8, 32).with_float_zero_points(85);
    case.ort = false;
    case.check();
}

#[test]
fn two_bit_weights_go_to_tracts_importer() {
    let (n, k) = (8, 64);
    let input = Input::F32(vec![1, k], Rng::new(90).f32s(k));
    let model = Model::one(
        "MatMulNBits",
        vec![
            Arg::X,
            Arg::Init(Init::U8(vec![n, 2, 8], Rng::new(91).u8s(n * 16))),
            Arg::Init(Init::F32(vec![n, 2], vec![0.01; n * 2])),
        ],
        vec![
            ("K", Attr::I(k as i64)),
            ("N", Attr::I(n as i64)),
            ("bits", Attr::I(2)),
            ("block_size", Attr::I(32)),
        ],
        &input,
        2,
    );
    let mut state = model.tract_state(&input).unwrap();
    assert!(
        !state
            .model()
            .nodes()
            .iter()
            .any(|n| n.op().name() == "EdgellmMatMulNBits")
    );
    assert_eq!(run_state(&mut state, &input).unwrap().len(), n);
}

/// Best and median time of one run of each layout, single-threaded (no pool in unit tests).
/// Before/after comparisons: the 4-bit block-32 rows.
#[test]
#[ignore = "timing: cargo test -p edgellm --lib bench_mat_mul_nbits -- --ignored --nocapture"]
fn bench_mat_mul_nbits() {
    let layouts = [
        (4, 32, false),
        (4, 16, false),
        (4, 128, true),
        (8, 32, false),
        (8, 16, true),
    ];
    for (bits, block, zp) in layouts {
        let shapes: &[(usize, usize)] = if (bits, block, zp) == (4, 32, false) {
            &[(896, 4864), (4864, 896), (2048, 8192)]
        } else {
            &[(896, 4864), (2048, 8192)]
        };
        for &(k, n) in shapes {
            for m in [1usize, 16] {
                let mut case = Case::new(7, &[m], k, n, bits, block);
                if zp {
                    case = case.with_zero_points(8);
                }
                let input = case.input();
                let mut state = case.model(4).tract_state(&input).unwrap();
                run_state(&mut state, &input).unwrap();
                let mut times = Vec::new();
                let start = std::time::Instant::now();
                while times.len() < 10 || start.elapsed().as_secs_f64() < 1.0 {
                    let t = std::time::Instant::now();
                    run_state(&mut state, &input).unwrap();
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                let (best, med) = (times[0], times[times.len() / 2]);
                eprintln!(
                    "int{bits} block {block:3}{}: K={k:5} N={n:5} M={m:2}: best {:8.1} us ({:5.2} GMAC/s), median {:8.1} us ({} runs)",
                    if zp { " zp" } else { "   " },
                    best * 1e6,
                    (k * n * m) as f64 / best / 1e9,
                    med * 1e6,
                    times.len()
                );
            }
        }
    }
}
