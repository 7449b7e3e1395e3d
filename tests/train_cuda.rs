//! `train --device cuda` end to end against `train --device cpu`: training (GPT-2 causal LM,
//! BERT and DeBERTa masked LM with padding), checkpoints, resume, `train eval`, `train generate` and
//! `train fill-mask`. The CUDA runs go to lmtrain's CPU emulator of the CUDA libraries (the
//! fake `libcuda.so`/`libcublas*.so` of `lmtrain-cuda-emu`, which execute the real kernel
//! sources) or, with `LMTRAIN_CUDA_REAL=1` (scripts/gpu-check.sh), to the GPU. Without nvcc at
//! build time there is no emulator and the CUDA parts print SKIP.
//!
//! Tolerances: f32 on CUDA follows the CPU's loss curve to 1e-5 relative per step (cuBLAS in full
//! f32, the same dropout masks), bf16 (the CUDA default) to 2%; a resumed CUDA run ends
//! bit-identical to an uninterrupted one.

mod train_support;

use std::path::Path;
use std::process::{Command, Output};

use train_support::*;

const VOCAB: usize = 40;

/// How the CUDA runs reach a device: `Some(env)` to set on the child, `None` = skip.
fn cuda_env(test: &str) -> Option<Vec<(&'static str, &'static str)>> {
    if std::env::var("LMTRAIN_CUDA_REAL").is_ok_and(|v| v == "1") {
        return Some(Vec::new());
    }
    match lmtrain_cuda_emu::DIR {
        Some(dir) if lmtrain_cuda::kernels_built() => Some(vec![("LD_LIBRARY_PATH", dir), ("LMTRAIN_CUEMU", "1")]),
        _ => {
            eprintln!("SKIP {test}: no CUDA kernels in this build (nvcc not found at build time; see README, CUDA)");
            None
        }
    }
}

/// Runs `train args` on CUDA.
fn train_cuda(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(train_bin()).args(args).envs(env.iter().copied()).output().expect("run train")
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every logged `key` of the CUDA run within `tol` (relative) of the CPU run's, step by step.
fn assert_same_curve(cpu: &Path, cuda: &Path, key: &str, tol: f64, steps: usize) {
    let (a, b) = (logged(cpu, key), logged(cuda, key));
    assert_eq!(a.len(), steps, "{key}: {a:?}");
    assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), b.iter().map(|x| x.0).collect::<Vec<_>>(), "{key} steps");
    let worst = a.iter().zip(&b).map(|(x, y)| (x.1 - y.1).abs() / x.1.abs()).fold(0.0, f64::max);
    eprintln!("{key}: worst relative difference CUDA vs CPU over {steps} records: {worst:.2e}");
    assert!(worst <= tol, "{key}: CUDA {b:?} vs CPU {a:?}: {worst:.2e} > {tol:e}");
}

#[test]
fn gpt2_on_cuda_trains_resumes_evaluates_and_generates_as_on_the_cpu() {
    let Some(env) = cuda_env("gpt2_on_cuda_trains_resumes_evaluates_and_generates_as_on_the_cpu") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = s(&make_data(&tmp.path().join("data"), VOCAB, 16, 48, 8));
    // HF's dropout 0.1 everywhere: both backends draw the same masks
    let cfg = s(&model_config(&tmp.path().join("cfg"), VOCAB, 16, 0.1));
    let (cpu, cuda) = (tmp.path().join("cpu"), tmp.path().join("cuda"));
    let run = |out: &Path| {
        let mut a = vec!["--data", &data, "--model-config", &cfg, "--max-steps", "20", "--learning-rate", "3e-3"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        a.extend(
            ["--per-device-train-batch-size", "4", "--logging-steps", "1", "--eval-strategy", "steps", "--eval-steps", "10"]
                .map(String::from),
        );
        a.extend(["--save-steps", "10", "--seed", "5", "--no-progress", "--output-dir", &s(out)].map(String::from));
        a
    };
    let args = run(&cpu);
    train_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args = run(&cuda);
    args.extend(["--device", "cuda", "--dtype", "f32"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = train_cuda(&env, &argv);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out, "train --device cuda");
    assert!(stderr.contains("device: "), "the device is named: {stderr}");
    assert_same_curve(&cpu, &cuda, "loss", 1e-5, 20);
    assert_same_curve(&cpu, &cuda, "grad_norm", 1e-4, 20);
    assert_same_curve(&cpu, &cuda, "eval_loss", 1e-5, 2);

    // the checkpoint has the CPU's files and tensors
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&cpu.join("checkpoint-10")), names(&cuda.join("checkpoint-10")));
    let (a, b) = (std::fs::read(cpu.join("model.safetensors")).unwrap(), std::fs::read(cuda.join("model.safetensors")).unwrap());
    let (a, b) = (safetensors::SafeTensors::deserialize(&a).unwrap(), safetensors::SafeTensors::deserialize(&b).unwrap());
    let mut a_names = a.names();
    a_names.sort();
    let mut b_names = b.names();
    b_names.sort();
    assert_eq!(a_names, b_names);

    // resuming on CUDA from step 10 ends bit-identical to the uninterrupted CUDA run
    let resumed = tmp.path().join("resumed");
    copy_dir(&cuda.join("checkpoint-10"), &resumed.join("checkpoint-10"));
    let mut args = run(&resumed);
    args.extend(["--device", "cuda", "--dtype", "f32", "--resume-from-checkpoint"].map(String::from));
    args.push(s(&resumed.join("checkpoint-10")));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(train_cuda(&env, &argv), "resume on cuda");
    for file in ["model.safetensors", "checkpoint-20/optimizer.safetensors"] {
        assert!(std::fs::read(cuda.join(file)).unwrap() == std::fs::read(resumed.join(file)).unwrap(), "{file} differs after resume");
    }

    // bf16 (the CUDA default): the same curve within 2%
    let bf16 = tmp.path().join("bf16");
    let mut args = run(&bf16);
    args.extend(["--device", "cuda"].map(String::from));
    ok(train_cuda(&env, &args.iter().map(String::as_str).collect::<Vec<_>>()), "train --device cuda (bf16)");
    assert_same_curve(&cpu, &bf16, "loss", 2e-2, 20);
    assert_same_curve(&cpu, &bf16, "eval_loss", 2e-2, 2);

    // eval and generate on CUDA print what the CPU prints
    let eval = ["eval", "--checkpoint", &s(&cuda), "--data", &data];
    let on_cpu = train_ok(&eval);
    let on_cuda = ok(train_cuda(&env, &[&eval[..], &["--device", "cuda", "--dtype", "f32"]].concat()), "eval on cuda");
    assert_eq!(on_cpu, on_cuda);
    let generate = ["generate", "--checkpoint", &s(&cuda), "--prompt", "w3 w4 w5", "--max-new-tokens", "12", "--ignore-eos"];
    let on_cpu = train_ok(&generate);
    let on_cuda = ok(train_cuda(&env, &[&generate[..], &["--device", "cuda", "--dtype", "f32"]].concat()), "generate on cuda");
    assert_eq!(on_cpu, on_cuda);
    assert!(on_cpu.split_whitespace().count() > 3, "{on_cpu}");

    // the dry run reads the device's free memory without opening it for work
    let plan = ok(train_cuda(&env, &["--dry-run", "--data", &data, "--model-config", &cfg, "--device", "cuda"]), "dry run on cuda");
    assert!(plan.contains("device memory: ") && plan.contains("free on "), "{plan}");
}

/// A masked-LM store of one verse per row, padded: the key-padding masks and the -100 labels of
/// padding rows.
fn masked_store(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    let corpus = data_dir().join("corpus/kjv.txt.gz");
    train_ok(&[
        "prepare",
        &s(&corpus),
        "--model-type",
        "masked",
        "--line-by-line",
        "--vocab-size",
        "300",
        "--block-size",
        "24",
        "--max-train-blocks",
        "64",
        "-o",
        &s(&data),
    ]);
    data
}

/// The arguments of 8 logged steps of a tiny `model_type` (2 layers, 2 heads, width 32) on `data`
/// into `out`.
fn masked_args(data: &Path, model_type: &str, out: &Path) -> Vec<String> {
    [
        "--data",
        &s(data),
        "--model-type",
        model_type,
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--max-steps",
        "8",
        "--learning-rate",
        "1e-3",
        "--per-device-train-batch-size",
        "4",
        "--logging-steps",
        "1",
        "--save-strategy",
        "no",
        "--no-progress",
        "--output-dir",
        &s(out),
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn bert_on_cuda_trains_with_padding_and_fills_masks_as_on_the_cpu() {
    let Some(env) = cuda_env("bert_on_cuda_trains_with_padding_and_fills_masks_as_on_the_cpu") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = masked_store(tmp.path());
    let (cpu, cuda) = (tmp.path().join("cpu"), tmp.path().join("cuda"));
    let common = |out: &Path| masked_args(&data, "bert", out);
    train_ok(&common(&cpu).iter().map(String::as_str).collect::<Vec<_>>());
    let mut args = common(&cuda);
    args.extend(["--device", "cuda", "--dtype", "f32"].map(String::from));
    ok(train_cuda(&env, &args.iter().map(String::as_str).collect::<Vec<_>>()), "bert on cuda");
    assert_same_curve(&cpu, &cuda, "loss", 1e-5, 8);

    let fill = ["fill-mask", "--checkpoint", &s(&cuda), "--top-k", "4", "--json", "and god said, let there be [MASK]."];
    let parse = |text: &str| -> Vec<(u64, f64)> {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        v.as_array().unwrap().iter().map(|c| (c["token"].as_u64().unwrap(), c["score"].as_f64().unwrap())).collect()
    };
    let on_cpu = parse(&train_ok(&fill));
    let on_cuda = parse(&ok(train_cuda(&env, &[&fill[..], &["--device", "cuda", "--dtype", "f32"]].concat()), "fill-mask on cuda"));
    assert_eq!(on_cpu.len(), 4);
    for ((ta, sa), (tb, sb)) in on_cpu.iter().zip(&on_cuda) {
        assert_eq!(ta, tb, "{on_cpu:?} vs {on_cuda:?}");
        assert!((sa - sb).abs() <= 1e-5 * sa.max(1e-3), "{on_cpu:?} vs {on_cuda:?}");
    }
}

/// DeBERTa (the v3 shape `--model-type deberta-v2` builds: relative attention over log buckets,
/// no position table) with padding: f32 on CUDA follows the CPU's curve, bf16 within 2%.
#[test]
fn deberta_on_cuda_trains_as_on_the_cpu() {
    let Some(env) = cuda_env("deberta_on_cuda_trains_as_on_the_cpu") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = masked_store(tmp.path());
    let (cpu, cuda, bf16) = (tmp.path().join("cpu"), tmp.path().join("cuda"), tmp.path().join("bf16"));
    train_ok(&masked_args(&data, "deberta-v2", &cpu).iter().map(String::as_str).collect::<Vec<_>>());
    let mut args = masked_args(&data, "deberta-v2", &cuda);
    args.extend(["--device", "cuda", "--dtype", "f32"].map(String::from));
    ok(train_cuda(&env, &args.iter().map(String::as_str).collect::<Vec<_>>()), "deberta on cuda");
    assert_same_curve(&cpu, &cuda, "loss", 1e-5, 8);
    let mut args = masked_args(&data, "deberta-v2", &bf16);
    args.extend(["--device", "cuda"].map(String::from));
    ok(train_cuda(&env, &args.iter().map(String::as_str).collect::<Vec<_>>()), "deberta on cuda (bf16)");
    assert_same_curve(&cpu, &bf16, "loss", 2e-2, 8);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(cuda.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["model_type"].as_str(), cfg["position_biased_input"].as_bool()), (Some("deberta-v2"), Some(false)));
}

#[test]
fn what_cuda_cannot_run_is_refused_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, 16, 8, 0);
    let out = s(&tmp.path().join("out"));
    let base = ["--data", &s(&data), "--output-dir", &out, "--max-steps", "1", "--no-progress"];
    let e = train_err(&[&base[..], &["--dtype", "bf16"]].concat());
    assert!(e.contains("--dtype bf16 needs --device cuda"), "{e}");
    let e = train_err(&[&base[..], &["--device", "tpu"]].concat());
    assert!(e.contains("tpu"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
