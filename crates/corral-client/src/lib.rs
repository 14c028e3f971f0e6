//! A client of Corral's REST API, generated from the OpenAPI document the controller serves
//! (docs/openapi.json) when this crate is built. It exists to prove the document is one a standard
//! generator turns into a working client (every operation its own method, every body a type); the
//! tests of the `corral` crate drive a live controller with it. The CLI keeps its own small client.
//!
//! Build a `reqwest::Client` with the `Authorization: Bearer TOKEN` header (and, for an HTTPS
//! controller, reqwest's TLS feature enabled in your crate) and pass it to
//! `Client::new_with_client`.

// Generated code: its style is the generator's.
#![allow(clippy::all, clippy::unwrap_used, missing_docs, unused)]

include!(concat!(env!("OUT_DIR"), "/corral_client.rs"));
