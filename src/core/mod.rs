//! The classification pipeline, with no protocol in it (no tonic, axum or http): see the crate's layers.

pub mod admission;
pub mod batching;
pub mod capture;
pub mod classify;
pub mod control;
pub mod drift;
pub mod model;
pub mod ood;
pub mod preprocess;
pub mod reason;
pub mod registry;
pub mod repository;
pub mod statistics;
pub mod verdict;
