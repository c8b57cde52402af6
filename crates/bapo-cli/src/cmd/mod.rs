//! One module per `bapo` command: its arguments (`Args`) and what it does (`run`).

pub mod anchor;
pub mod compare;
pub mod eval;
pub mod export;
pub mod generate;
pub mod score;
pub mod serve;
pub mod synth;
pub mod train;
