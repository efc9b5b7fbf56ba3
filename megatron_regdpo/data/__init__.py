"""The GT-Pair data path (offline): decode -> normalise -> encode -> zarr store -> negatives -> pairs.

  decode/     probe (PyAV), DALI (NVDEC / CPU) and PyAV backends chosen per codec, normalisation
  encode/     the frozen Wan VAE, UMT5 text encoder, CLIP image encoder; tiny random versions for tests
  store/      the zarr 3 store (resumable commits, bf16 as uint16), its checker
  negatives/  flow-matching samplers and negative generation with our Wan; import from other generators
  inputs.py, preprocess.py, sampler.py, pairs.py, errors.py, progress.py

Submodules are imported on use: this package imports nothing heavy by itself.
"""
