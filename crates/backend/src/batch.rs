//! The integer inputs of one micro-batch: what the host hands a backend ([`HostBatch`]) and the
//! owned, derived form a backend keeps ([`Inputs`], the CPU backend's batch type; a device
//! backend uploads the same arrays).

use crate::{BackendError, IGNORE_INDEX, Result};

/// One micro-batch as host slices, row-major `[b, t]`.
#[derive(Clone, Copy, Debug)]
pub struct HostBatch<'a> {
    /// Rows.
    pub b: usize,
    /// Positions per row.
    pub t: usize,
    /// Token ids.
    pub input_ids: &'a [u32],
    /// The target of each position's prediction (already aligned with the positions: a causal
    /// model has shifted its labels), `-100` = none. `None`: no loss is computed.
    pub targets: Option<&'a [i32]>,
    /// `true` = a real token, `false` = padding no query attends to. `None`: no padding.
    pub attention_mask: Option<&'a [bool]>,
    /// Token-type (segment) ids. `None`: the model has none, or all are 0.
    pub token_type_ids: Option<&'a [u32]>,
    /// Position ids. `None`: position `t` of each row is `t`.
    pub position_ids: Option<&'a [u32]>,
}

impl HostBatch<'_> {
    /// Checks every array's length and every value against the model's table sizes, so no op
    /// ever indexes out of range: one line naming the first bad value.
    pub fn validate(&self, vocab: usize, positions: usize, token_types: usize) -> Result<()> {
        let n = self.b * self.t;
        let bad = |m: String| Err(BackendError(m));
        if n == 0 {
            return bad("empty batch".into());
        }
        let len = |name: &str, l: usize| {
            if l != n { Err(BackendError(format!("{name} has {l} entries, the batch is {} x {} = {n}", self.b, self.t))) } else { Ok(()) }
        };
        len("input_ids", self.input_ids.len())?;
        if let Some(&id) = self.input_ids.iter().find(|&&id| id as usize >= vocab) {
            return bad(format!("token id {id} is outside the model's vocabulary of {vocab}"));
        }
        if let Some(tg) = self.targets {
            len("labels", tg.len())?;
            if let Some(&y) = tg.iter().find(|&&y| y != IGNORE_INDEX && (y < 0 || y as usize >= vocab)) {
                return bad(format!("label {y} is outside the vocabulary (size {vocab}) and is not -100"));
            }
        }
        if let Some(m) = self.attention_mask {
            len("attention_mask", m.len())?;
        }
        if let Some(tt) = self.token_type_ids {
            len("token_type_ids", tt.len())?;
            if let Some(&x) = tt.iter().find(|&&x| x as usize >= token_types.max(1)) {
                return bad(format!("token type id {x} is outside the model's {token_types} token types"));
            }
        }
        match self.position_ids {
            Some(p) => {
                len("position_ids", p.len())?;
                if let Some(&x) = p.iter().find(|&&x| x as usize >= positions) {
                    return bad(format!("position id {x} is beyond the model's {positions} positions"));
                }
            }
            None if self.t > positions => {
                return bad(format!("sequence length {} exceeds the model's {positions} positions", self.t));
            }
            None => {}
        }
        Ok(())
    }
}

/// A micro-batch's integer inputs, owned, with the derived index lists the ops use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    /// Rows.
    pub b: usize,
    /// Positions per row.
    pub t: usize,
    /// Token ids `[b, t]`.
    pub ids: Vec<u32>,
    /// Targets `[b, t]` (`-100` = none; empty when the batch has no targets).
    pub targets: Vec<i32>,
    /// Key padding `[b, t]` (`true` = real token), if any.
    pub key_padding: Option<Vec<bool>>,
    /// Token-type ids `[b, t]`, if any.
    pub token_types: Option<Vec<u32>>,
    /// Position ids `[b, t]`, if given.
    pub positions: Option<Vec<u32>>,
    /// The positions (`row * t + col`) whose target is not `-100`, ascending.
    pub labelled_rows: Vec<u32>,
    /// Their targets, in the same order.
    pub labelled_targets: Vec<i32>,
}

impl Inputs {
    /// Copies the host batch and derives the labelled rows.
    pub fn new(h: &HostBatch<'_>) -> Self {
        let targets = h.targets.map(<[i32]>::to_vec).unwrap_or_default();
        let (labelled_rows, labelled_targets) =
            targets.iter().enumerate().filter(|(_, y)| **y != IGNORE_INDEX).map(|(i, &y)| (i as u32, y)).unzip();
        Inputs {
            b: h.b,
            t: h.t,
            ids: h.input_ids.to_vec(),
            targets,
            key_padding: h.attention_mask.map(<[bool]>::to_vec),
            token_types: h.token_type_ids.map(<[u32]>::to_vec),
            positions: h.position_ids.map(<[u32]>::to_vec),
            labelled_rows,
            labelled_targets,
        }
    }

    /// Positions that carry a label.
    pub fn n_labels(&self) -> usize {
        self.labelled_rows.len()
    }
}
