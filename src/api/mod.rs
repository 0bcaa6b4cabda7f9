//! One thin adapter per API: wire types in, the core's request; the core's answer out. No classification
//! logic lives here.

pub mod fashion_mnist;
pub mod oip;
