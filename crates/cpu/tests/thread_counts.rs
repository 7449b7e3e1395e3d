//! Determinism across core counts: every op, and three training steps of a small GPT-2, give the
//! same bits on 1, 2, 3 and 4 rayon threads (so a run resumed on a machine with another core
//! count continues the same run).

mod fingerprint;

#[test]
fn every_op_gives_the_same_bits_on_1_2_3_and_4_threads() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut o = fingerprint::run_ops();
            o.extend(fingerprint::run_gpt2_steps());
            o
        })
    };
    let want = run(1);
    let mut differ = Vec::new();
    for threads in 2..=4 {
        for (g, w) in run(threads).iter().zip(&want) {
            assert_eq!(g.name, w.name);
            let same = g.values.iter().zip(&w.values).all(|(a, b)| a.to_bits() == b.to_bits())
                && g.wide.iter().zip(&w.wide).all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                let scale = w.values.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
                let worst = g.values.iter().zip(&w.values).map(|(a, b)| (a - b).abs() / scale).fold(0f32, f32::max);
                differ.push(format!("{} on {threads} threads (max diff {worst:.1e} of the largest magnitude)", g.name));
            }
        }
    }
    assert!(differ.is_empty(), "results depend on the thread count:\n  {}", differ.join("\n  "));
}

/// Shapes whose slabs could fall into another path of the `gemm` crate than the whole product
/// (sides at most 64 with K > 512 and not a multiple of 512, a last slab of one row), on up to
/// 8 threads.
#[test]
fn matmul_gives_the_same_bits_on_1_to_8_threads() {
    use lmtrain_backend::GemmShape;
    let shapes = [(300, 48, 1000), (48, 300, 1000), (129, 24, 2000), (289, 100, 1500), (1000, 50, 777), (333, 384, 96), (64, 64, 5000)];
    for (m, n, k) in shapes {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true)] {
            let a = fingerprint::rand_vec(m * k, 1, 1.0);
            let b = fingerprint::rand_vec(k * n, 2, 1.0);
            let s = GemmShape { m, n, k, trans_a, trans_b, accumulate: true };
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut c = fingerprint::rand_vec(m * n, 3, 1.0);
                pool.install(|| lmtrain_cpu::ops::matmul(&mut c, &a, &b, s));
                c
            };
            let want = run(1);
            for threads in 2..=8 {
                let same = run(threads).iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{m}x{n}x{k} trans_a={trans_a} trans_b={trans_b}: other bits on {threads} threads than on 1");
            }
        }
    }
}
