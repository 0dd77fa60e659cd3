mod cli;
mod ig;
mod maximize;
mod model;
mod parity;
mod scores;
mod util;
