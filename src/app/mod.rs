//! The application: the command line and every settings type built from it (`config`), the wiring of the
//! layers into a running server (`server`), the metrics port, the browser page and the CLI's client. Nothing
//! below imports it.

pub mod budget;
pub mod client;
pub mod config;
pub mod metrics;
pub mod server;
pub mod web;
