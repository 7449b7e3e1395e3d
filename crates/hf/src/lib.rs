//! lmtrain-hf (being built).
