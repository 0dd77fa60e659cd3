//! A batch job in a crate of its own: loads a bundled model and prints the
//! gradient of class 3 for a random input, on CUDA when there is one.

use tch::{Kind, Tensor};
use tch_vis::scores::{CategoricalScore, Score};
use tch_vis::{DeviceSpec, Model};

fn main() -> Result<(), tch_vis::Error> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/digits_cnn.pt");
    let device = DeviceSpec::Auto.resolve()?;
    let model = Model::load(root, device)?;
    let x = Tensor::f_randn([2, 1, 32, 32], (Kind::Float, tch::Device::Cpu))?;
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
