//! Device memory through the `train` binary: `--dry-run` reports the bytes of each part, a
//! `--device-memory` too small for the batch stops the run naming the largest batch that fits,
//! and `--auto-find-batch-size` trains at that batch with more accumulation.

mod train_support;

use std::path::Path;

use lmtrain_model::LanguageModel;
use lmtrain_model::bert::Bert;
use lmtrain_model::gpt2::Gpt2;
use train_support::{make_data, model_config, s, train, train_err, train_ok};

const VOCAB: usize = 64;
const BLOCK: usize = 16;

/// The byte count of a `--dry-run` table row.
fn row(out: &str, what: &str) -> u64 {
    let line = out.lines().find(|l| l.trim_start().starts_with(what)).unwrap_or_else(|| panic!("no `{what}` row in:\n{out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "bytes").unwrap_or_else(|| panic!("no byte count in `{line}`"));
    words[at - 1].parse().unwrap()
}

fn n_params<M: LanguageModel<lmtrain_cpu::Cpu>>(config_file: &Path) -> u64 {
    let config: M::Config = serde_json::from_str(&std::fs::read_to_string(config_file).unwrap()).unwrap();
    M::param_table(&config).unwrap().last().map(|p| (p.offset + p.len) as u64).unwrap()
}

fn bert_config(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.json");
    let cfg = serde_json::json!({
        "model_type": "bert", "vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32,
    });
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

#[test]
fn dry_run_reports_the_bytes_of_parameters_gradients_and_optimizer_state() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, BLOCK, 8, 4);
    let gpt2 = model_config(&tmp.path().join("gpt2"), VOCAB, 32, 0.0);
    let n = n_params::<Gpt2<lmtrain_cpu::Cpu>>(&gpt2);
    let base = ["--dry-run", "--data", &s(&data), "--model-config", &s(&gpt2), "--device-memory", "1GB"];
    let out = train_ok(&base);
    assert!(out.contains("GPT2LMHeadModel"), "{out}");
    assert_eq!((row(&out, "parameters"), row(&out, "gradients"), row(&out, "optimizer state")), (4 * n, 4 * n, 8 * n), "{out}");
    assert!(out.contains("fits; the largest per-device batch that fits is"), "{out}");
    let activations = row(&out, "activations");
    assert!(activations > 0);
    assert_eq!(
        row(&out, "total"),
        16 * n + activations + row(&out, "workspace") + row(&out, "checkpoint copies"),
        "the parts add up: {out}"
    );
    // bf16 on CUDA: 2-byte parameters and gradients, f32 moments and master weights; the
    // fused attention keeps less than the CPU's probabilities
    let cuda = train_ok(&[&base[..], &["--device", "cuda", "--dtype", "bf16"]].concat());
    assert_eq!((row(&cuda, "parameters"), row(&cuda, "gradients"), row(&cuda, "optimizer state")), (2 * n, 2 * n, 12 * n), "{cuda}");
    assert!(row(&cuda, "activations") < activations / 2 + 1, "{cuda}");
    // --recompute: one GELU output of [8 x BLOCK, 4 x 16] f32 kept instead of one per layer (2)
    let recomputed = train_ok(&[&base[..], &["--recompute"]].concat());
    assert_eq!(activations - row(&recomputed, "activations"), (8 * BLOCK * 64 * 4) as u64, "{recomputed}");
    // twice the batch: more activations, the same parameters
    let b16 = train_ok(&[&base[..], &["--per-device-train-batch-size", "16"]].concat());
    assert_eq!(row(&b16, "parameters"), 4 * n);
    assert!(row(&b16, "activations") > activations, "{b16}");

    let bert = bert_config(&tmp.path().join("bert"));
    let n = n_params::<Bert<lmtrain_cpu::Cpu>>(&bert);
    let out = train_ok(&["--dry-run", "--data", &s(&data), "--model-config", &s(&bert), "--device-memory", "1GiB"]);
    assert!(out.contains("BertForMaskedLM"), "{out}");
    assert_eq!((row(&out, "parameters"), row(&out, "gradients"), row(&out, "optimizer state")), (4 * n, 4 * n, 8 * n), "{out}");
    assert!(out.contains("device memory: 1.07 GB (--device-memory)"), "GiB is 2^30 bytes: {out}");
}

/// A `--device-memory` (in bytes) that holds batch 2 of `args` but not batch 3.
fn room_for_batch_2(args: &[&str]) -> String {
    let total =
        |b: &str| row(&train_ok(&[args, &["--dry-run", "--device-memory", "1GB", "--per-device-train-batch-size", b]].concat()), "total");
    let (two, three) = (total("2"), total("3"));
    format!("{}B", two + (three - two) / 2)
}

#[test]
fn too_little_device_memory_names_the_largest_batch_and_auto_find_trains_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, BLOCK, 16, 4);
    let gpt2 = model_config(&tmp.path().join("gpt2"), VOCAB, 32, 0.0);
    let model = ["--data", &s(&data), "--model-config", &s(&gpt2)];
    let memory = room_for_batch_2(&model);
    let out = tmp.path().join("out");
    let out_arg = s(&out);
    let run =
        [&model[..], &["--output-dir", &out_arg, "--device-memory", &memory, "--per-device-train-batch-size", "8", "--max-steps", "2"]]
            .concat();

    let e = train_err(&[&run[..], &["--dry-run"]].concat());
    assert!(e.contains("batch 8 does not fit"), "{e}");
    assert!(e.contains("the largest batch that fits is 2: use --per-device-train-batch-size 2 --gradient-accumulation-steps 4"), "{e}");
    // training refuses it before building anything
    let e = train_err(&run);
    assert!(e.contains("the largest batch that fits is 2: use --per-device-train-batch-size 2 --gradient-accumulation-steps 4"), "{e}");
    assert!(!out.join("checkpoint-2").exists());
    // a batch of 2 fits as it is
    train_ok(&[&run[..], &["--dry-run", "--per-device-train-batch-size", "2"]].concat());

    let done = train(&[&run[..], &["--auto-find-batch-size"]].concat());
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(
        stderr.contains("training with --per-device-train-batch-size 2 --gradient-accumulation-steps 4 (the same effective batch of 8)"),
        "{stderr}"
    );
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("checkpoint-2/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(
        (state["args"]["per_device_train_batch_size"].as_u64(), state["args"]["gradient_accumulation_steps"].as_u64()),
        (Some(2), Some(4))
    );
    // 2 steps of 8 blocks of 16 tokens: the effective batch was kept
    assert_eq!(state["tokens_seen"].as_u64(), Some(2 * 8 * BLOCK as u64));

    // not even batch 1
    let e = train_err(&[&model[..], &["--dry-run", "--device-memory", "1MB"]].concat());
    assert!(e.contains("not even batch 1 fits"), "{e}");
}

#[test]
fn memory_flags_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let data = make_data(&tmp.path().join("data"), VOCAB, BLOCK, 8, 4);
    let e = train_err(&["--dry-run", "--data", &s(&data), "--device-memory", "80 parsecs"]);
    assert!(e.contains("expected a number and a unit"), "{e}");
    let e = train_err(&["--data", &s(&data), "--output-dir", &s(&tmp.path().join("o")), "--dtype", "bf16"]);
    assert!(e.contains("--dtype bf16 needs --device cuda"), "{e}");
}
