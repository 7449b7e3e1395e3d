//! lmtrain-trainer (being built).
