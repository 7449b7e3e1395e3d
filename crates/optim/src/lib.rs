//! lmtrain-optim (being built).
