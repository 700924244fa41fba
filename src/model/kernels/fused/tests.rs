//! Each fused kernel against the composed reference (`kernels::reference`), forward and backward,
//! on random f32 inputs (never zeros) at several shapes, odd sizes and padded masks included.
//! Backward: the gradient of `sum(out * probe)` for a random `probe`, with respect to every input.
//! Tolerance: the largest difference at most 2e-5 of the largest reference magnitude (both run in
//! f32 and sum in different orders; a wrong formula is off by the size of the values).

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::{Dropout, reference};

const TOLERANCE: f32 = 2e-5;

fn random(rng: &mut ChaCha8Rng, dims: &[usize], range: f32) -> Tensor {
    let n: usize = dims.iter().product();
    // Bounded away from zero as well as random: no input can hide a missing term by being 0.
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(0.05 * range..range);
            if rng.random_bool(0.5) { v } else { -v }
        })
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu).expect("a random tensor")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 values")
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (got, want) = (values(got), values(want));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= TOLERANCE * scale,
        "{what}: off by {worst} (largest value {scale})"
    );
}

/// Runs `fused` and `reference` on fresh `Var`s holding `inputs` and compares the outputs and the
/// gradients of `sum(out * probe)` with respect to each input whose index is in `differentiable`.
fn compare(
    what: &str,
    inputs: &[Tensor],
    differentiable: &[usize],
    fused: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    rng: &mut ChaCha8Rng,
) {
    let run = |kernel: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).expect("a var"))
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = kernel(&tensors).expect("the kernel runs");
        (vars, out)
    };
    let (fused_vars, fused_out) = run(&fused);
    let (reference_vars, reference_out) = run(&reference);
    assert_close(&fused_out, &reference_out, &format!("{what} forward"));

    let probe = random(rng, fused_out.dims(), 1.);
    let backward = |out: &Tensor, vars: &[Var]| {
        let grads = (out * &probe)
            .and_then(|t| t.sum_all())
            .and_then(|loss| loss.backward())
            .expect("backward");
        differentiable
            .iter()
            .map(|&i| {
                grads
                    .get(vars[i].as_tensor())
                    .unwrap_or_else(|| panic!("{what}: input {i} got no gradient"))
                    .clone()
            })
            .collect::<Vec<_>>()
    };
    let fused_grads = backward(&fused_out, &fused_vars);
    let reference_grads = backward(&reference_out, &reference_vars);
    for ((i, f), r) in differentiable
        .iter()
        .zip(&fused_grads)
        .zip(&reference_grads)
    {
        assert_close(f, r, &format!("{what} gradient of input {i}"));
    }
}

/// A mask bias `[batch, 1, 1, seq]`: each sequence keeps a random prefix of at least one token,
/// the rest is padding.
fn padding_mask(rng: &mut ChaCha8Rng, batch: usize, seq: usize) -> Tensor {
    let mut bias = vec![0f32; batch * seq];
    for row in bias.chunks_mut(seq) {
        let keep = rng.random_range(1..=seq);
        row[keep..].fill(f32::MIN);
    }
    Tensor::from_vec(bias, (batch, 1, 1, seq), &Device::Cpu).expect("bias")
}

#[test]
fn linear_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (lead, inp, out) in [
        (vec![3], 5, 4),
        (vec![2, 7], 33, 17),
        (vec![130], 384, 65),
        (vec![4, 32], 96, 288),
    ] {
        let x_dims = [lead.as_slice(), &[inp]].concat();
        let inputs = [
            random(&mut rng, &x_dims, 1.),
            random(&mut rng, &[out, inp], 0.5),
            random(&mut rng, &[out], 1.),
        ];
        compare(
            &format!("linear {x_dims:?} -> {out}"),
            &inputs,
            &[0, 1, 2],
            |t| super::linear(&t[0], &t[1], &t[2]),
            |t| reference::linear(&t[0], &t[1], &t[2]),
            &mut rng,
        );
    }
}

#[test]
fn layer_norm_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for dims in [vec![3, 8], vec![2, 5, 33], vec![7, 384], vec![3, 40, 384]] {
        let width = *dims.last().expect("dims");
        let x = (random(&mut rng, &dims, 3.) + 0.7).expect("shift");
        let gamma = (random(&mut rng, &[width], 0.5) + 1.).expect("shift");
        let inputs = [x, gamma, random(&mut rng, &[width], 1.)];
        compare(
            &format!("layer_norm {dims:?}"),
            &inputs,
            &[0, 1, 2],
            |t| super::layer_norm(&t[0], &t[1], &t[2], 1e-12),
            |t| reference::layer_norm(&t[0], &t[1], &t[2], 1e-12),
            &mut rng,
        );
    }
}

#[test]
fn linear_gelu_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    // Small ones take the gemm crate; the rest AMX where the CPU has it, with partial blocks
    // and (600 inputs) a product in two chunks of `k`, the epilogue after the last.
    for (lead, inp, out) in [
        (vec![3], 5, 4),
        (vec![2, 7], 33, 17),
        (vec![130], 384, 65),
        (vec![4, 32], 96, 288),
        (vec![70], 600, 100),
    ] {
        let x_dims = [lead.as_slice(), &[inp]].concat();
        let inputs = [
            random(&mut rng, &x_dims, 1.),
            random(&mut rng, &[out, inp], 0.5),
            random(&mut rng, &[out], 1.),
        ];
        let what = format!("linear+gelu {x_dims:?} -> {out}");
        let reference = |t: &[Tensor]| reference::gelu(&reference::linear(&t[0], &t[1], &t[2])?);
        compare(
            &what,
            &inputs,
            &[0, 1, 2],
            |t| super::linear_gelu(&t[0], &t[1], &t[2]),
            reference,
            &mut rng,
        );
        // Without gradients GELU overwrites the product in place.
        let untracked = super::linear_gelu(&inputs[0], &inputs[1], &inputs[2]).expect("runs");
        let want = reference(&inputs).expect("the reference runs");
        assert_close(&untracked, &want, &format!("{what} without gradients"));
    }
}

#[test]
fn dropout_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for (dims, p) in [(vec![5], 0.5), (vec![3, 77], 0.1), (vec![40_001], 0.3)] {
        let inputs = [random(&mut rng, &dims, 2.)];
        let params = Dropout { p, seed: 42 };
        compare(
            &format!("dropout {dims:?} p={p}"),
            &inputs,
            &[0],
            |t| super::dropout(&t[0], params),
            |t| reference::dropout(&t[0], params),
            &mut rng,
        );
    }
}

#[test]
fn attention_matches_reference_with_padding_and_dropout() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for (batch, heads, seq, dim) in [(2, 3, 5, 4), (3, 2, 9, 8), (2, 12, 33, 32), (1, 1, 1, 3)] {
        let hidden = heads * dim;
        let bias = padding_mask(&mut rng, batch, seq);
        let qkv = random(&mut rng, &[batch, seq, 3 * hidden], 2.);
        let scale = 1. / (dim as f64).sqrt();
        for dropout in [None, Some(Dropout { p: 0.2, seed: 5 })] {
            compare(
                &format!("attention {batch}x{heads}x{seq}x{dim} dropout {dropout:?}"),
                &[qkv.clone(), bias.clone()],
                &[0, 1],
                |t| {
                    super::attention(
                        &t[0],
                        &t[1].reshape((batch, seq))?,
                        None,
                        heads,
                        scale,
                        dropout,
                    )
                },
                |t| reference::attention(&t[0], &t[1], None, heads, scale, dropout),
                &mut rng,
            );
        }
    }
}

/// MPNet's attention: a `[heads, seq, seq]` position bias added to every sequence's scores, its
/// gradient (summed over the batch) compared with the reference's as well.
#[test]
fn attention_with_a_position_bias_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    for (batch, heads, seq, dim) in [(2, 3, 5, 4), (3, 2, 9, 8), (1, 1, 1, 3)] {
        let hidden = heads * dim;
        let mut bias = vec![0f32; batch * seq];
        for row in bias.chunks_mut(seq) {
            let keep = rng.random_range(1..=seq);
            row[keep..].fill(f32::MIN);
        }
        let mask = Tensor::from_vec(bias, (batch, 1, 1, seq), &Device::Cpu).expect("mask");
        let qkv = random(&mut rng, &[batch, seq, 3 * hidden], 2.);
        let position = random(&mut rng, &[heads, seq, seq], 1.);
        let scale = 1. / (dim as f64).sqrt();
        for dropout in [None, Some(Dropout { p: 0.2, seed: 6 })] {
            compare(
                &format!("biased attention {batch}x{heads}x{seq}x{dim} dropout {dropout:?}"),
                &[qkv.clone(), mask.clone(), position.clone()],
                &[0, 2],
                |t| {
                    super::attention(
                        &t[0],
                        &t[1].reshape((batch, seq))?,
                        Some(&t[2]),
                        heads,
                        scale,
                        dropout,
                    )
                },
                |t| reference::attention(&t[0], &t[1], Some(&t[2]), heads, scale, dropout),
                &mut rng,
            );
        }
    }
    let wrong_bias = super::attention(
        &Tensor::ones((1, 2, 6), DType::F32, &Device::Cpu).expect("ones"),
        &Tensor::zeros((1, 2), DType::F32, &Device::Cpu).expect("zeros"),
        Some(&Tensor::zeros((2, 2, 2), DType::F32, &Device::Cpu).expect("zeros")),
        1,
        1.,
        None,
    );
    assert!(wrong_bias.is_err(), "one head, but a bias for two");
}

/// The whole layer as one op against the seam's kernels composed (each tested above against the
/// reference), with padding and every dropout on: output, and the gradients of the input, the
/// mask bias and all sixteen parameters.
#[test]
fn bert_layer_matches_its_kernels_composed() {
    use super::super::{LayerDropouts, LayerParams, LayerShape, LinearParams, NormParams};
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    for (batch, seq, heads, dim, inter) in [(2, 5, 2, 4, 12), (3, 9, 3, 8, 40), (2, 33, 12, 32, 96)]
    {
        let hidden = heads * dim;
        let bias = padding_mask(&mut rng, batch, seq);
        let mut inputs = vec![random(&mut rng, &[batch, seq, hidden], 1.), bias];
        // Each linear layer's weight and bias, each LayerNorm's gain (about 1) and bias.
        for (out, inp) in [(hidden, hidden); 4] {
            inputs.push(random(&mut rng, &[out, inp], 0.3));
            inputs.push(random(&mut rng, &[out], 0.2));
        }
        for (out, inp) in [(inter, hidden), (hidden, inter)] {
            inputs.push(random(&mut rng, &[out, inp], 0.3));
            inputs.push(random(&mut rng, &[out], 0.2));
        }
        for _ in 0..2 {
            inputs.push(
                random(&mut rng, &[hidden], 0.5)
                    .affine(1., 1.)
                    .expect("gain"),
            );
            inputs.push(random(&mut rng, &[hidden], 0.2));
        }
        let shape = LayerShape {
            heads,
            scale: 1. / (dim as f64).sqrt(),
            eps: 1e-12,
        };
        let dropouts = LayerDropouts {
            probs: Some(Dropout { p: 0.1, seed: 3 }),
            attention_output: Some(Dropout { p: 0.2, seed: 4 }),
            output: Some(Dropout { p: 0.15, seed: 5 }),
        };
        // inputs: x, mask, then (weight, bias) of query, key, value, attention output,
        // intermediate, output, then (gain, bias) of the two LayerNorms.
        fn layer(t: &[Tensor]) -> LayerParams<'_> {
            let linear = |i: usize| LinearParams {
                weight: &t[i],
                bias: &t[i + 1],
            };
            let norm = |i: usize| NormParams {
                gamma: &t[i],
                beta: &t[i + 1],
            };
            LayerParams {
                query: linear(2),
                key: linear(4),
                value: linear(6),
                attention_output: linear(8),
                attention_norm: norm(14),
                intermediate: linear(10),
                output: linear(12),
                output_norm: norm(16),
            }
        }
        let differentiable: Vec<usize> = (0..inputs.len()).collect();
        compare(
            &format!("BERT layer {batch}x{seq}, {heads} heads of {dim}, {inter} inner"),
            &inputs,
            &differentiable,
            |t| {
                let flat = layer(t)
                    .tensors()
                    .iter()
                    .map(|t| t.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                super::bert_layer(
                    &t[0],
                    &Tensor::cat(&flat, 0)?,
                    &t[1].reshape((batch, seq))?,
                    (shape.heads, shape.scale, shape.eps),
                    inter,
                    dropouts,
                )
            },
            |t| super::super::composed_bert_layer(&t[0], &layer(t), &t[1], None, shape, dropouts),
            &mut rng,
        );
    }
}

#[test]
fn fused_kernels_refuse_what_they_cannot_run() {
    let x = Tensor::ones((2, 6), DType::F32, &Device::Cpu).expect("ones");
    let wrong_heads = super::attention(
        &x.reshape((1, 2, 6)).expect("reshape"),
        &Tensor::zeros((1, 2), DType::F32, &Device::Cpu).expect("zeros"),
        None,
        4,
        1.,
        None,
    );
    assert!(
        wrong_heads.is_err(),
        "hidden 2 is not a multiple of 4 heads"
    );
    let wrong_width = super::linear(
        &x,
        &Tensor::ones((3, 5), DType::F32, &Device::Cpu).expect("ones"),
        &Tensor::ones(3, DType::F32, &Device::Cpu).expect("ones"),
    );
    assert!(wrong_width.is_err(), "weight [3, 5] does not take 6 inputs");
}

/// The gradients of `sum(out * probe)` with respect to every input of `op`, as raw values.
fn gradients(
    inputs: &[Tensor],
    probe: &Tensor,
    op: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> Vec<Vec<f32>> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).expect("a var"))
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = op(&tensors).expect("forward");
    let grads = (out * probe)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("backward");
    vars.iter()
        .map(|v| values(grads.get(v.as_tensor()).expect("a gradient")))
        .collect()
}

/// Same inputs, same gradient bits, whatever the number of threads: the reductions across rayon
/// tasks (the bias and LayerNorm parameter gradients) add the tasks' sums in a fixed order.
#[test]
fn r18_12_parameter_gradients_do_not_depend_on_thread_scheduling() {
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    // Wide value ranges make the order of additions show in the last bits; 4096 rows make many
    // tasks.
    let (rows, width, out) = (4096, 384, 96);
    let x = random(&mut rng, &[rows, width], 1e3);
    let weight = random(&mut rng, &[out, width], 1.0);
    let bias = random(&mut rng, &[out], 1.0);
    let gamma = random(&mut rng, &[width], 1.0);
    let beta = random(&mut rng, &[width], 1.0);
    let linear_probe = random(&mut rng, &[rows, out], 1e3);
    let norm_probe = random(&mut rng, &[rows, width], 1e3);
    let run = || {
        (
            gradients(
                &[x.clone(), weight.clone(), bias.clone()],
                &linear_probe,
                |t| super::linear(&t[0], &t[1], &t[2]),
            ),
            gradients(
                &[x.clone(), gamma.clone(), beta.clone()],
                &norm_probe,
                |t| super::layer_norm(&t[0], &t[1], &t[2], 1e-12),
            ),
        )
    };
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a pool")
        .install(run);
    let many = rayon::ThreadPoolBuilder::new()
        .num_threads(8)
        .build()
        .expect("a pool");
    for _ in 0..4 {
        let parallel = many.install(run);
        assert!(parallel.0[2] == one_thread.0[2], "bias gradient");
        assert!(parallel.1[1] == one_thread.1[1], "gamma gradient");
        assert!(parallel.1[2] == one_thread.1[2], "beta gradient");
    }
}
