//! lmtrain-cpu (being built).
