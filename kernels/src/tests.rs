use super::*;

/// xorshift64*, seeded: the same inputs on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `n` values uniform in [-1, 1).
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    fn u8s(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }
}

/// One row's dot product over `k` (a multiple of 32) on `kernel`.
fn dot_on(
    kernel: Kernel,
    bits: usize,
    block: usize,
    k: usize,
    w: &[u8],
    x: &QuantRow,
    ws: &[f32],
) -> f32 {
    let shift = (block / 32).max(1).trailing_zeros();
    let subs = k / 32;
    match (bits, block == 16) {
        (4, false) => row_dot::<4, false>(kernel, w, x, ws, shift, subs),
        (4, true) => row_dot::<4, true>(kernel, w, x, ws, shift, subs),
        (_, false) => row_dot::<8, false>(kernel, w, x, ws, shift, subs),
        (_, true) => row_dot::<8, true>(kernel, w, x, ws, shift, subs),
    }
}

/// `got` (from `kernel`) against the portable kernel's `p`: AVX2 within float rounding of
/// `scale` (it sums in another order), the others bit for bit.
fn assert_matches_portable(
    kernel: Kernel,
    p: f32,
    got: f32,
    scale: f32,
    what: impl Fn() -> String,
) {
    if kernel == Kernel::Avx2 {
        assert!(
            (p - got).abs() <= 1e-5 * scale,
            "{}: portable {p}, AVX2 {got}",
            what()
        );
    } else {
        assert_eq!(
            p.to_bits(),
            got.to_bits(),
            "{}: portable {p}, {kernel:?} {got}",
            what()
        );
    }
}

/// Compares every kernel this CPU has with the portable one: AVX2 within float rounding (it
/// sums in another order), NEON bit for bit (the same integer sums, then the same float
/// arithmetic).
fn check_all_kernels(bits: usize, block: usize, k: usize, w: &[u8], x: &QuantRow, ws: &[f32]) {
    let p = dot_on(Kernel::Portable, bits, block, k, w, x, ws);
    let scale: f32 = ws.iter().map(|s| s.abs()).sum::<f32>() * 255.0;
    for kernel in kernels_here() {
        let v = dot_on(kernel, bits, block, k, w, x, ws);
        assert_matches_portable(kernel, p, v, scale, || {
            format!("bits {bits} block {block} k {k}")
        });
    }
}

/// Which kernels run here, by name: under qemu-aarch64 the CPU model decides (cortex-a53:
/// neon; cortex-a76: neon-dotprod; max: neon-i8mm). `EDGELLM_EXPECT_KERNEL` (set by
/// scripts/test-aarch64-qemu.sh) names the one the CPU must pick.
#[test]
fn the_fastest_kernel_here_is_the_one_expected() {
    let here = kernels_here();
    eprintln!("kernels here: {here:?}");
    assert_eq!(here[0], Kernel::Portable);
    #[cfg(target_arch = "aarch64")]
    assert!(here.contains(&Kernel::Neon), "NEON is part of aarch64");
    if let Ok(want) = std::env::var("EDGELLM_EXPECT_KERNEL") {
        let fastest = here.last().expect("the portable kernel is always there");
        assert_eq!(fastest.name(), want);
    }
}

/// Random codes, scales and activations on every layout (4 and 8 bits; blocks 16, 32, 64, 128,
/// 256; K from one sub-block to 4096), many rows each.
#[test]
fn portable_and_simd_dot_products_agree() {
    let mut rng = Rng::new(70);
    for (bits, block) in [
        (4, 16),
        (4, 32),
        (4, 64),
        (4, 128),
        (8, 16),
        (8, 32),
        (8, 128),
        (8, 256),
    ] {
        for k in [32, 256, 4096] {
            if k % block != 0 {
                continue;
            }
            for _ in 0..20 {
                let w = rng.u8s(k * bits / 8);
                let ws = rng.f32s(k / block);
                let x = quantize(&rng.f32s(k), bits, block, k);
                check_all_kernels(bits, block, k, &w, &x, &ws);
            }
        }
    }
}

/// Extreme codes and activations (nibbles all 0 or 15, codes 0 and 255, activations at +-127):
/// the NEON widening paths (i16 lanes) must not overflow where the portable i32 sums do not.
#[test]
fn simd_kernels_at_the_extremes() {
    let k = 256;
    for bits in [4, 8] {
        for (wv, xv) in [
            (0xffu8, 1.0f32),
            (0xff, -1.0),
            (0x00, 1.0),
            (0x00, -1.0),
            (0x0f, -1.0),
            (0xf0, 1.0),
            (0x80, -1.0),
        ] {
            for block in [16, 32] {
                let w = vec![wv; k * bits / 8];
                let ws = vec![1.0f32; k / block];
                let x = quantize(&vec![xv; k], bits, block, k);
                check_all_kernels(bits, block, k, &w, &x, &ws);
                // And the value itself: every product at its extreme, summed exactly.
                let code = |c: u8| {
                    if bits == 4 {
                        [c & 0x0f, c >> 4]
                    } else {
                        [c, c]
                    }
                };
                let [lo, hi] = code(wv);
                let centre = if bits == 4 { 0.0 } else { 128.0 };
                let want =
                    127.0 * xv * (k as f32 / 2.0) * ((lo as f32 - centre) + (hi as f32 - centre));
                let got = dot_on(Kernel::Portable, bits, block, k, &w, &x, &ws) / x.scale[0];
                assert!(
                    (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                    "bits {bits} block {block} w {wv:#x} x {xv}: {got}, want {want}"
                );
            }
        }
    }
}

/// The quantized row: 4 bits reorders each sub-block to [even | odd] positions, 8 bits keeps the
/// order; values round to nearest on a scale of max|x| / 127; K pads with zeros.
#[test]
fn quantize_layouts() {
    let x: Vec<f32> = (0..40).map(|i| i as f32 - 20.0).collect();
    for bits in [4, 8] {
        let q = quantize(&x, bits, 32, 64);
        assert_eq!(q.q.len(), 64);
        assert_eq!(q.scale.len(), 2);
        let s = 20.0 / 127.0;
        assert!((q.scale[0] - s).abs() < 1e-6);
        let at = |i: usize| (x[i] / s).round() as i8;
        if bits == 4 {
            assert_eq!(q.q[0], at(0));
            assert_eq!(q.q[16], at(1));
            assert_eq!(q.q[1], at(2));
        } else {
            assert_eq!(q.q[..4], [at(0), at(1), at(2), at(3)]);
        }
        // Positions 40..64 are padding.
        assert!(q.q[32..].iter().enumerate().all(|(i, &v)| {
            let pos = if bits == 4 {
                32 + 2 * (i % 16) + i / 16
            } else {
                32 + i
            };
            pos < 40 || v == 0
        }));
    }
}

/// Two activation rows by two weight rows ([`rows_dot_2x2`]: `smmla` on i8mm CPUs, four
/// [`row_dot`] calls elsewhere): each product equals the portable single-row one, bit for bit on
/// the NEON kernels, on every layout and at the extremes.
#[test]
fn two_by_two_products_equal_single_rows() {
    let mut rng = Rng::new(71);
    for (bits, block) in [(4, 16), (4, 32), (4, 128), (8, 16), (8, 32), (8, 256)] {
        for k in [256, 4096] {
            for case in 0..12 {
                let (w0, w1, x0, x1) = if case < 10 {
                    (
                        rng.u8s(k * bits / 8),
                        rng.u8s(k * bits / 8),
                        rng.f32s(k),
                        rng.f32s(k),
                    )
                } else {
                    // Extremes: all codes 15 / 255 and 0, activations at +-127.
                    let hi = vec![0xffu8; k * bits / 8];
                    let lo = vec![0u8; k * bits / 8];
                    let sign = if case == 10 { 1.0 } else { -1.0 };
                    (hi, lo, vec![sign; k], vec![-sign; k])
                };
                let (ws0, ws1) = (rng.f32s(k / block), rng.f32s(k / block));
                let (x0, x1) = (quantize(&x0, bits, block, k), quantize(&x1, bits, block, k));
                let shift = (block / 32).max(1).trailing_zeros();
                let subs = k / 32;
                let want: Vec<f32> = [
                    (&x0, &w0, &ws0),
                    (&x0, &w1, &ws1),
                    (&x1, &w0, &ws0),
                    (&x1, &w1, &ws1),
                ]
                .iter()
                .map(|&(x, w, ws)| dot_on(Kernel::Portable, bits, block, k, w, x, ws))
                .collect();
                for kernel in kernels_here() {
                    let (w, x, ws) = ([&w0[..], &w1[..]], [&x0, &x1], [&ws0[..], &ws1[..]]);
                    let got = match (bits, block == 16) {
                        (4, false) => rows_dot_2x2::<4, false>(kernel, w, x, ws, shift, subs),
                        (4, true) => rows_dot_2x2::<4, true>(kernel, w, x, ws, shift, subs),
                        (_, false) => rows_dot_2x2::<8, false>(kernel, w, x, ws, shift, subs),
                        (_, true) => rows_dot_2x2::<8, true>(kernel, w, x, ws, shift, subs),
                    };
                    let scale = ws0.iter().chain(&ws1).map(|s| s.abs()).sum::<f32>() * 255.0;
                    for (i, (&g, &p)) in got.iter().zip(&want).enumerate() {
                        assert_matches_portable(kernel, p, g, scale, || {
                            format!("bits {bits} block {block} k {k} case {case} product {i}")
                        });
                    }
                }
            }
        }
    }
}
