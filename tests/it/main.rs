mod cli;
mod gallery;
mod model;
mod parity;
mod scores;
mod util;
