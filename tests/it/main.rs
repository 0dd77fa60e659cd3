mod cam;
mod cli;
mod model;
mod parity;
mod scores;
mod util;
