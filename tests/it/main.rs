mod cli;
mod gallery;
mod model;
mod parity;
mod saliency;
mod scores;
mod transforms;
mod util;
