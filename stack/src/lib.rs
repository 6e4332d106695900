//! webnic-stack: the sans-IO core of webnic.
#![warn(missing_docs)]

pub mod protocol;
