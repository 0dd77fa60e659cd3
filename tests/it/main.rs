mod cli;
mod ig;
mod model;
mod parity;
mod scores;
mod util;
