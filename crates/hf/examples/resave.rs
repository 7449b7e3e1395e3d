//! Load a GPT-2 fixture, move its weights by one gradient step on the fixture's batch, save it
//! with lmtrain-hf, and print the new model's loss on that batch as JSON. Used by
//! `scripts/golden/check_hf_load.py` to check that `transformers` loads what lmtrain saves and
//! computes the same loss.
//!
//! `cargo run --release -p lmtrain-hf --example resave -- FIXTURE_DIR OUT_DIR`

use std::path::PathBuf;

use lmtrain_cpu::Cpu;
use lmtrain_model::LanguageModel;
use lmtrain_model::gpt2::Gpt2;
use safetensors::SafeTensors;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [fixture, out] = &args[..] else {
        return Err("usage: resave FIXTURE_DIR OUT_DIR".into());
    };
    let bytes = std::fs::read(fixture.join("golden.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let ids_t = st.tensor("input_ids")?;
    let (b, t) = (ids_t.shape()[0], ids_t.shape()[1]);
    let i64s = |name: &str| -> Result<Vec<i64>, safetensors::SafeTensorError> {
        Ok(st.tensor(name)?.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let ids: Vec<u32> = i64s("input_ids")?.into_iter().map(|x| x as u32).collect();
    let labels: Vec<i32> = i64s("labels")?.into_iter().map(|x| x as i32).collect();

    let mut model: Gpt2<Cpu> = lmtrain_hf::load_model(Cpu, fixture)?;
    model.zero_grad()?;
    let before = model.forward_backward(&ids, &labels, b, t, None)?;
    let (params, grads) = model.params_and_grads_mut();
    for (p, g) in params.iter_mut().zip(grads) {
        *p -= 0.5 * g;
    }
    lmtrain_hf::save_model(&model, out)?;
    let after = model.forward_loss(&ids, &labels, b, t)?;
    println!("{{\"loss_before\": {before}, \"loss\": {after}}}");
    Ok(())
}
