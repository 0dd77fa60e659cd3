mod cli;
mod model;
mod parity;
mod scores;
mod transforms;
mod util;
