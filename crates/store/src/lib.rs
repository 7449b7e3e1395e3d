//! lmtrain-store (being built).
