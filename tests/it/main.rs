mod cli;
mod gallery;
mod model;
mod parity;
mod scores;
mod transforms;
mod util;
