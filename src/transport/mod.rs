//! What every call crosses, whatever its protocol: the accepted connections and their limits, the tower
//! layers, the gRPC codec, and the one map from an error kind to a gRPC code and an HTTP status.

pub mod codec;
pub mod connections;
pub mod failure_log;
pub mod layers;
pub mod status;
