//! lmtrain-cuda (being built).
