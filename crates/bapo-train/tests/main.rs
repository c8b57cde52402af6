//! The training crate's integration tests, as one test binary (each test binary compiles and
//! links its own copy of the backend's code: minutes of a 2-core build). The tests run one at a
//! time (`common::serial`).

mod common;
mod heldout;
mod resume;
mod shared;
mod train;
