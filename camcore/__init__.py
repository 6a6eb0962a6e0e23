"""camserve's model core: what the training job and the HTTP service share, and nothing of either.

* :mod:`camcore.network`: the network, its named blocks and their geometry;
* :mod:`camcore.bundle`: the serving bundle format (write, read, verify);
* :mod:`camcore.preprocess`: decoded image -> the network's uint8 input, and normalisation;
* :mod:`camcore.forward`: the one forward recipe (normalise, precision, TTA views, probabilities);
* :mod:`camcore.cam`: class activation maps computed from one batched forward and backward;
* :mod:`camcore.cam_methods`: the CAM methods (Grad-CAM, HiResCAM, Grad-CAM++, XGrad-CAM, LayerCAM);
* :mod:`camcore.road`: ROAD, how faithful a heatmap is, on :mod:`camcore.imputation`'s linear infill.

It imports torch, numpy, scipy (LAPACK's banded solver), Pillow and safetensors only: never
``training`` (Lightning) nor ``service`` (FastAPI), so both stand on it side by side and the serving
image needs no Lightning.
"""
