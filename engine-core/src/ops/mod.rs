//! CPU numeric kernels shared by codecs and the model.

pub mod hadamard;
