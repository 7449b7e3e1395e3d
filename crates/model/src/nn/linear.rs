//! `y = x · W (+ b)`, in either Hugging Face weight layout, with the bias (and optionally a GELU)
//! applied as the matrix product's epilogue.

use lmtrain_backend::{Backend, Epilogue, GeluKind, GemmDesc, GemmShape, Result};

use crate::params::{Grads, Init, ParamBuilder, ParamRef, Weights, join};

/// How the weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[in, out]`: Hugging Face `Conv1D` (GPT-2).
    Conv1D,
    /// `[out, in]`: `torch.nn.Linear` (BERT family).
    Linear,
}

/// A dense layer.
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    /// The weight (for a stacked layer: all weights, back to back).
    pub w: ParamRef,
    /// The bias, if any.
    pub b: Option<ParamRef>,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Weight layout.
    pub layout: Layout,
}

impl Linear {
    /// A `Conv1D` layer: `weight [n_in, n_out]`, `bias [n_out]` under `p`.
    pub fn conv1d(p: &ParamBuilder, n_in: usize, n_out: usize, init: Init) -> Self {
        let w = p.weight("weight", &[n_in, n_out], init);
        let b = p.bias("bias", n_out);
        Linear { w, b: Some(b), n_in, n_out, layout: Layout::Conv1D }
    }

    /// An `nn.Linear` layer: `weight [n_out, n_in]` and, with `bias`, `bias [n_out]` under `p`.
    pub fn dense(p: &ParamBuilder, n_in: usize, n_out: usize, init: Init, bias: bool) -> Self {
        let w = p.weight("weight", &[n_out, n_in], init);
        let b = bias.then(|| p.bias("bias", n_out));
        Linear { w, b, n_in, n_out, layout: Layout::Linear }
    }

    /// Several `nn.Linear` layers over the same input computed as one product: their weights are
    /// declared back to back (so they form one `[parts * n_out, n_in]` matrix), then their
    /// biases. Separate q/k/v projections become one fused qkv activation this way.
    pub fn stacked(parts: &[ParamBuilder], n_in: usize, n_out: usize, init: Init) -> Self {
        let w = parts.iter().map(|p| p.weight("weight", &[n_out, n_in], init)).reduce(join).expect("at least one part");
        let b = parts.iter().map(|p| p.bias("bias", n_out)).reduce(join).expect("at least one part");
        Linear { w, b: Some(b), n_in, n_out: n_out * parts.len(), layout: Layout::Linear }
    }

    fn forward_desc(&self, rows: usize) -> GemmDesc {
        let trans_b = self.layout == Layout::Linear;
        GemmShape { m: rows, n: self.n_out, k: self.n_in, trans_a: false, trans_b, accumulate: false }.into()
    }

    /// `out = x · W + b` (`x`: `[rows, n_in]`, `out`: `[rows, n_out]`).
    pub fn forward<B: Backend>(&self, be: &B, w: &Weights<'_, B>, out: B::ViewMut<'_>, x: B::View<'_>, rows: usize) -> Result<()> {
        let epi = match self.b {
            Some(b) => Epilogue::Bias(w.get(b)),
            None => Epilogue::None,
        };
        be.gemm(out, x, w.get(self.w), &self.forward_desc(rows), epi)
    }

    /// `pre = x · W + b`, `out = gelu(pre)` (the layer must have a bias).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_gelu<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        out: B::ViewMut<'_>,
        pre: B::ViewMut<'_>,
        x: B::View<'_>,
        rows: usize,
        kind: GeluKind,
    ) -> Result<()> {
        let bias = w.get(self.b.expect("a GELU epilogue follows a layer with a bias"));
        be.gemm(out, x, w.get(self.w), &self.forward_desc(rows), Epilogue::BiasGelu { bias, kind, pre })
    }

    /// Backward: `dx = dout · W^T` (overwritten, when asked for), `dW += x^T · dout` in the
    /// weight's layout, `db += column sums of dout`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        g: &mut Grads<'_, B>,
        dx: Option<B::ViewMut<'_>>,
        x: B::View<'_>,
        dout: B::View<'_>,
        rows: usize,
    ) -> Result<()> {
        let (i, o) = (self.n_in, self.n_out);
        let conv = self.layout == Layout::Conv1D;
        if let Some(dx) = dx {
            let s = GemmShape { m: rows, n: i, k: o, trans_a: false, trans_b: conv, accumulate: false };
            be.gemm(dx, dout, w.get(self.w), &s.into(), Epilogue::None)?;
        }
        if conv {
            // dW [in, out] += x^T · dout
            let s = GemmShape { m: i, n: o, k: rows, trans_a: true, trans_b: false, accumulate: true };
            be.gemm(g.get(self.w), x, dout, &s.into(), Epilogue::None)?;
        } else {
            // dW [out, in] += dout^T · x
            let s = GemmShape { m: o, n: i, k: rows, trans_a: true, trans_b: false, accumulate: true };
            be.gemm(g.get(self.w), dout, x, &s.into(), Epilogue::None)?;
        }
        if let Some(b) = self.b {
            be.bias_backward(g.get(b), dout, rows, o)?;
        }
        Ok(())
    }
}
