//! lmtrain-model (being built).
