//! lmtrain-text (being built).
