//! lmtrain-backend (being built).
