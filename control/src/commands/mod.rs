//! The `mvc` subcommands, one module per noun: each holds its clap arguments and the
//! function that runs them.
pub mod agent;
pub mod cluster;
pub mod doctor;
pub mod gendocs;
pub mod key;
pub mod site;
pub mod stack;
pub mod vm;
