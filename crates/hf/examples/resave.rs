//! Load a fixture (GPT-2, a BERT-family masked LM or DeBERTa-v2), move its weights by one gradient step on
//! the fixture's batch, save it with lmtrain-hf, and print the new model's loss on that batch as
//! JSON. Used by `scripts/golden/check_hf_load.py` (GPT-2) and by hand with
//! `scripts/golden/check_mlm_load.py` (masked LM) to check that `transformers` loads what
//! lmtrain saves and computes the same loss.
//!
//! `cargo run --release -p lmtrain-hf --example resave -- FIXTURE_DIR OUT_DIR`

use std::path::{Path, PathBuf};

use lmtrain_cpu::Cpu;
use lmtrain_model::bert::{Bert, Roberta};
use lmtrain_model::deberta::Deberta;
use lmtrain_model::distilbert::DistilBert;
use lmtrain_model::gpt2::Gpt2;
use lmtrain_model::{Input, LanguageModel};
use safetensors::SafeTensors;

type Error = Box<dyn std::error::Error>;

fn step_and_save<M: LanguageModel<Cpu>>(fixture: &Path, out: &Path, input: &Input<'_>) -> Result<(), Error> {
    let mut model: M = lmtrain_hf::load_model(Cpu, fixture)?;
    model.zero_grad()?;
    let before = model.loss_and_gradients(input, None)?;
    let (_, store) = model.parts_mut();
    let (params, grads) = store.params_and_grads_mut();
    for (p, g) in params.iter_mut().zip(grads.iter()) {
        *p -= 0.5 * g;
    }
    lmtrain_hf::save_model(&model, out)?;
    let after = model.eval_loss(input)?;
    println!("{{\"loss_before\": {before}, \"loss\": {after}}}");
    Ok(())
}

fn main() -> Result<(), Error> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [fixture, out] = &args[..] else {
        return Err("usage: resave FIXTURE_DIR OUT_DIR".into());
    };
    let bytes = std::fs::read(fixture.join("golden.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let (b, t) = (st.tensor("input_ids")?.shape()[0], st.tensor("input_ids")?.shape()[1]);
    let i64s = |name: &str| -> Option<Vec<i64>> {
        st.tensor(name).ok().map(|t| t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let ids: Vec<u32> = i64s("input_ids").unwrap_or_default().into_iter().map(|x| x as u32).collect();
    let labels: Vec<i32> = i64s("labels").unwrap_or_default().into_iter().map(|x| x as i32).collect();
    let mask: Option<Vec<bool>> = i64s("attention_mask").map(|m| m.into_iter().map(|x| x != 0).collect());
    let types: Option<Vec<u32>> = i64s("token_type_ids").map(|v| v.into_iter().map(|x| x as u32).collect());
    let input = Input { b, t, input_ids: &ids, labels: Some(&labels), attention_mask: mask.as_deref(), token_type_ids: types.as_deref() };
    match lmtrain_hf::read_model_type(fixture)?.as_str() {
        "gpt2" => step_and_save::<Gpt2<Cpu>>(fixture, out, &input),
        "bert" => step_and_save::<Bert<Cpu>>(fixture, out, &input),
        "distilbert" => step_and_save::<DistilBert<Cpu>>(fixture, out, &input),
        "roberta" => step_and_save::<Roberta<Cpu>>(fixture, out, &input),
        "deberta-v2" => step_and_save::<Deberta<Cpu>>(fixture, out, &input),
        other => Err(format!("model type {other:?} is not supported").into()),
    }
}
