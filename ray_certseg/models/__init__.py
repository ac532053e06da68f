"""Models of the base classifier f(x + delta) = segment(denoise(x + delta)), one job per module:

* ``specs``: the pydantic spec model of each ``kind`` (torch-free, checked on the driver);
* ``registry``: kind -> (spec model, builder); ``load_segmenter`` / ``load_denoiser`` build from a spec;
* ``schedule``: DDPM noise-schedule maths (t*, x0 from the network output, the multistep posterior);
* ``adm``: the guided-diffusion UNet network and its checkpoint reader;
* ``denoisers``: the one-shot / multistep ``DiffusionDenoiser`` and its resolution strategies;
* ``loading``: diffusers folders and ADM checkpoints -> denoisers;
* ``segmenters``: the ``Segmenter`` wrapper and its kinds' builders; ``tiny``: the shipped tiny networks;
* ``util``: dtype names and short hashes.
"""
