//! A batch job in a crate of its own: loads a model (the path given as the
//! first argument; by default tch-vis's bundled `digits_cnn`, found from
//! this folder's place in the tch-vis tree) and prints the gradient of
//! class 3 for a random input of its sidecar's size, on CUDA when there is
//! one.

use tch::{Kind, Tensor};
use tch_vis::preprocess::Sidecar;
use tch_vis::scores::{CategoricalScore, Score};
use tch_vis::{DeviceSpec, Model};

fn main() -> Result<(), tch_vis::Error> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/digits_cnn.pt").to_string()
    });
    let device = DeviceSpec::Auto.resolve()?;
    let model = Model::load(&path, device)?;
    let sidecar = Sidecar::for_model(&path)?;
    let [h, w] = sidecar.size_i64();
    let c = sidecar.channels as i64;
    let x = Tensor::f_randn([2, c, h, w], (Kind::Float, tch::Device::Cpu))?;
    let score = CategoricalScore::new(3)?;
    let g = model.gradients(&[x], &[&score as &dyn Score])?;
    println!(
        "device {device:?}, cuda available {}, gradient shape {:?}, scores {:?}",
        tch::Cuda::is_available(),
        g.inputs[0].size(),
        Vec::<f32>::try_from(&g.scores[0])?
    );
    Ok(())
}
